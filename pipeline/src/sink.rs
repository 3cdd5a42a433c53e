//! The sink contract: a destination fed from the write-ahead log in log order.
//!
//! A sink makes batches durable (or cached) and says how far it got ([`Sink::durable_lsn`]); the
//! log keeps every record some sink still lacks and replays it after a crash. Everything around
//! that — the queue, timers, retries with backoff, catching up from the log, diverting poison
//! frames, metrics — is the driver's ([`crate::driver`]), so a sink is only its technology.
//!
//! A sink tells the driver what to do with a failure through [`SinkError`]: retry the same call,
//! give up, or keep some frames in the dead-letter store and go on without them.

use std::time::Instant;

use fleetpipe_processors::{Batch, Lsn};

/// Any error a sink's technology raises, kept whole for the log line.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A frame of the batch a sink refuses (a value its store cannot hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// Position of the frame in [`Batch::frames`].
    pub index: usize,
    /// Why, in the store's words (`postgres: 22003 integer out of range`).
    pub detail: String,
}

/// How a sink failed, which says what the driver does next.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A retry of the same call can succeed (a connection refused or lost, a conflict): the
    /// driver retries with capped backoff, holding the batch, so the sink's queue fills and the
    /// log absorbs the rest.
    #[error("{0}")]
    Retry(#[source] BoxError),
    /// Retrying cannot help (a poisoned file sink, a schema that does not exist, a failed
    /// `fsync`): the sink's thread stops; the log still holds everything after its checkpoint.
    #[error("{0}")]
    Fatal(#[source] BoxError),
    /// The batch holds frames this sink refuses. The driver keeps each in the dead-letter store
    /// (through the log, so durably) and writes the batch again without them. Nothing of the
    /// batch may have been made durable by the failed call.
    #[error("{} frame(s) refused", .0.len())]
    Poison(Vec<Poison>),
}

impl SinkError {
    pub fn retry(e: impl Into<BoxError>) -> Self {
        SinkError::Retry(e.into())
    }

    pub fn fatal(e: impl Into<BoxError>) -> Self {
        SinkError::Fatal(e.into())
    }

    /// Whether retrying the failed call can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Retry(_))
    }
}

/// Reading the log back failed (a sink catching up): nothing a retry of the sink can fix.
impl From<crate::wal::WalError> for SinkError {
    fn from(e: crate::wal::WalError) -> Self {
        SinkError::Fatal(e.into())
    }
}

/// A destination fed from the log. Methods may block: each sink runs on its own thread. The
/// driver hands a sink each batch once, in log order, never one at or below the position it
/// already took.
pub trait Sink: Send {
    /// Short name, the `sink` label of metrics (`parquet`, `dead_letter`, ...).
    fn name(&self) -> &'static str;
    /// Everything up to this log position is durable here (read from the checkpoint at open,
    /// advanced by `write`, `tick` or `flush`). The log replays from the position after it.
    fn durable_lsn(&self) -> Lsn;
    /// Take a batch. It need not be durable on return.
    fn write(&mut self, batch: &Batch) -> Result<(), SinkError>;
    /// Called often; rolls and commits whatever is due (age, size).
    fn tick(&mut self, now: Instant) -> Result<(), SinkError>;
    /// Make everything written durable now (for `ack = "sinks"`, the drain, shutdown). The sink
    /// stays usable: writes may follow.
    fn flush(&mut self) -> Result<(), SinkError>;
    /// Whether the sink stores what it is given, so that acknowledgements may wait for it
    /// (`[pipeline] ack = "sinks"`). A cache answers `false`.
    fn is_durable(&self) -> bool {
        true
    }
    /// After a failure retrying cannot fix ([`SinkError::Fatal`]), drops whatever the sink
    /// holds that is not durable and makes it usable again from [`Sink::durable_lsn`]; the
    /// driver reads what comes after from the log. `Ok(false)` (the default): it cannot, the
    /// failure stops it.
    fn recover(&mut self) -> Result<bool, SinkError> {
        Ok(false)
    }
}
