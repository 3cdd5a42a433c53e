//! fleetpipe's durable destinations.
//!
//! - [`wal`]: fleetpipe's own write-ahead log. Sources append to it; an append is acknowledged
//!   (MQTT PUBACK, HTTP 200) once its group commit is fsync'd. Every other sink is fed from it
//!   and records how far it got, so a crash replays exactly what a sink had not made durable.
//! - [`parquet`]: hive-partitioned Parquet history.
//! - [`dead_letter`]: every rejected frame, with its reason, raw bytes and source.
//! - [`postgres`], [`redis_l2`]: history and the L2 latest-state cache.
//! - [`kafka`]: the clean and dead-letter topics for stream consumers.
//!
//! Sinks are driven by one generic loop ([`driver::spawn`]) that owns timers, retries and
//! per-sink metrics, so no sink re-implements them. A sink sees batches in WAL order.

pub mod dead_letter;
pub mod driver;
pub mod kafka;
pub mod parquet;
pub mod postgres;
pub mod redis_l2;
pub mod rolling;
pub mod wal;

use std::time::Instant;

use fleetpipe_processors::{Frame, Lsn, Rejection};

/// What a sink receives: the accepted frames and the rejections of a run of WAL records, in WAL
/// order. `lsn` is the highest WAL position the batch covers: once a sink has made this batch
/// durable, its checkpoint may move to `lsn`.
#[derive(Debug, Default)]
pub struct SinkBatch {
    pub lsn: Lsn,
    pub frames: Vec<Frame>,
    pub rejections: Vec<Rejection>,
}

/// Failures of a sink; the driver retries with backoff and holds the batch meanwhile.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parquet error: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("corrupt checkpoint {path}: {detail}")]
    Checkpoint { path: std::path::PathBuf, detail: String },
    #[error("corrupt file {path}: {detail}")]
    Corrupt { path: std::path::PathBuf, detail: String },
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    /// Reading the write-ahead log back failed (a sink catching up).
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    /// The sink lost its uncommitted files (a write or `fsync` failed half way, leaving files it
    /// cannot trust) and must be reopened: the WAL then replays everything after `durable`.
    /// Retrying the same call cannot help.
    #[error(
        "{sink} sink discarded its uncommitted files after an unrecoverable error ({detail}); \
         reopen it so that the WAL replays everything after lsn {durable}"
    )]
    Poisoned { sink: &'static str, durable: Lsn, detail: String },
    /// Redis (the L2 cache) failed or returned what fleetpipe cannot read. The L2 sink never
    /// returns it from `write`; the L2 reader does.
    #[error("redis: {0}")]
    Redis(String),
    /// The sink's thread could not be started or panicked.
    #[error("{sink} sink thread: {detail}")]
    Thread { sink: &'static str, detail: String },
    /// Kafka refused or did not acknowledge records in time; the batch is sent again.
    #[error("kafka: {0}")]
    Kafka(String),
    /// A Postgres call failed in a way a retry can fix: the connection was refused or lost, the
    /// server is shutting down or out of resources, a lock or serialization conflict. The sink
    /// reconnects on its next call.
    #[error("postgres: {0}")]
    Postgres(String),
    /// A Postgres error that retrying the same call cannot fix: an invalid schema name, a
    /// missing table, permission denied, failed authentication.
    #[error("postgres, not retryable: {0}")]
    PostgresFatal(String),
}

impl SinkError {
    /// Whether retrying the failed call can succeed. `false` for [`SinkError::Poisoned`],
    /// [`SinkError::Thread`] and [`SinkError::PostgresFatal`].
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            SinkError::Poisoned { .. }
                | SinkError::Thread { .. }
                | SinkError::PostgresFatal(_)
                | SinkError::Wal(_)
        )
    }
}

/// A destination fed from the WAL. Methods may block: each sink runs on its own thread.
pub trait Sink: Send {
    /// Short name, the `sink` label of metrics (`parquet`, `dead_letter`, ...).
    fn name(&self) -> &'static str;
    /// Everything up to this WAL position is durable here (read from the checkpoint at open,
    /// advanced by `tick`/`close`). The WAL replays from the position after it.
    fn durable_lsn(&self) -> Lsn;
    /// Take a batch. It need not be durable on return.
    fn write(&mut self, batch: &SinkBatch) -> Result<(), SinkError>;
    /// Called often; rolls and commits whatever is due (age, size).
    fn tick(&mut self, now: Instant) -> Result<(), SinkError>;
    /// Make everything written durable now (a flush, the drain, shutdown). The sink stays
    /// usable: writes may follow.
    fn close(&mut self) -> Result<(), SinkError>;
    /// Whether the sink stores what it is given, so that acknowledgements may wait for it
    /// (`[pipeline] ack = "sinks"`). A cache answers `false`.
    fn is_durable(&self) -> bool {
        true
    }
}
