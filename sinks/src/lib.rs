//! fleetpipe's sinks, each a [`fleetpipe_pipeline::Sink`] fed from the write-ahead log by the
//! pipeline's driver:
//!
//! - [`parquet`]: hive-partitioned Parquet history, and [`dead_letter`]: every rejected frame
//!   with its reason, raw bytes and source — both through [`files`], the one rolling-file
//!   mechanism (write aside, publish by generations with a checkpoint).
//! - [`postgres`]: day-partitioned history (and its reader for the API).
//! - [`redis`]: the L2 latest-state cache (and its reader).
//! - [`kafka`]: the clean and dead-letter topics for stream consumers.
//! - [`events`]: vehicle events and trips derived by event time, in Parquet and the store the
//!   HTTP API reads.
//!
//! Each module exports its `serde` config type (closed, defaults in one place) and an `open`.
//! This crate knows nothing of sources.

pub mod dead_letter;
pub mod events;
pub mod files;
pub mod kafka;
pub mod parquet;
pub mod postgres;
pub mod redis;

use std::path::PathBuf;

use fleetpipe_pipeline::SinkError;
use fleetpipe_processors::Lsn;

/// Everything a sink can fail with; [`Error::is_retryable`] decides what the driver does.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parquet error: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("corrupt checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
    #[error("corrupt file {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    /// The sink lost its uncommitted files (a write or `fsync` failed half way, leaving files it
    /// cannot trust) and must be reopened: the log then replays everything after `durable`.
    #[error(
        "{sink} sink discarded its uncommitted files after an unrecoverable error ({detail}); \
         reopen it so that the log replays everything after lsn {durable}"
    )]
    Poisoned { sink: &'static str, durable: Lsn, detail: String },
    /// A Redis call failed.
    #[error("redis: {what}: {source}")]
    Redis {
        what: &'static str,
        #[source]
        source: ::redis::RedisError,
    },
    /// Redis failed recently; readers fail fast for a while instead of waiting on it.
    #[error("redis L2 unavailable (circuit breaker open)")]
    RedisUnavailable,
    /// Kafka refused or did not acknowledge records in time; the batch is sent again.
    #[error("kafka: {what}: {source}")]
    Kafka {
        what: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("kafka: {failed} of {records} records not delivered ({last}); the batch is sent again")]
    KafkaUndelivered { failed: u64, records: u64, last: String },
    /// A Postgres call failed; whether a retry can fix it follows its SQLSTATE
    /// ([`postgres::is_retryable`]).
    #[error("postgres: {what}: {}", postgres::describe(.source))]
    Postgres {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Postgres could not be reached, or refused the connection (authentication, database).
    #[error(
        "postgres: connect to {target}: {}; check that Postgres runs there and that [postgres] url (FLEETPIPE_POSTGRES_URL) is right",
        postgres::describe(.source)
    )]
    PostgresConnect {
        /// `host:port/database as user`.
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("postgres: connect to {target}: no answer after {after:?}; check that Postgres runs there and that [postgres] url (FLEETPIPE_POSTGRES_URL) is right")]
    PostgresConnectTimeout { target: String, after: std::time::Duration },
    #[error("postgres: {what}: no answer after {after:?}")]
    PostgresTimeout { what: &'static str, after: std::time::Duration },
    #[error("postgres: not connected")]
    PostgresNotConnected,
    #[error("postgres: {0}")]
    PostgresSchema(String),
    #[error("postgres: log position {0} does not fit a bigint")]
    PostgresLsn(Lsn),
    #[error("could not start a runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A setting no retry can fix (a TLS file that cannot be read, a url that does not fit).
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether retrying the failed call can succeed: everything but a poisoned sink, a
    /// runtime that could not start, and what Postgres says no retry can fix (a bad schema
    /// name, a missing table, permission denied, failed authentication).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Postgres { source, .. } | Error::PostgresConnect { source, .. } => {
                postgres::is_retryable(source)
            }
            Error::Poisoned { .. }
            | Error::PostgresSchema(_)
            | Error::PostgresLsn(_)
            | Error::Runtime(_)
            | Error::Config(_) => false,
            _ => true,
        }
    }
}

impl From<Error> for SinkError {
    fn from(e: Error) -> Self {
        if e.is_retryable() {
            SinkError::Retry(e.into())
        } else {
            SinkError::Fatal(e.into())
        }
    }
}

pub(crate) fn io_err(path: &std::path::Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}
