//! fleetpipe's data model and pure pipeline stages.
//!
//! This crate does no I/O: no sockets, no files, no async runtime. Everything here is a plain
//! function or data structure over in-memory frames, so it is unit-tested without services and
//! benchmarked on its own. Sources (`fleetpipe-ingest`) and sinks (`fleetpipe-sinks`) depend on
//! it; it depends on neither.
//!
//! Modules form a one-way chain: the frame model ([`frame`]) → [`time`] and the `signals` bag →
//! [`validate`] → [`codec`]; [`stage`] and the stages ([`dedup`], [`latest`], [`events`]) sit on
//! the model. Nothing points back up the chain.
//!
//! Stages never fail on bad data: they return what they accepted and a list of rejections.

pub mod codec;
pub mod dedup;
pub mod events;
pub mod frame;
mod json_util;
pub mod latest;
mod signals;
pub mod stage;
pub mod time;
pub mod trace;
pub mod validate;

pub use frame::{
    Body, Decoded, Diagnostic, Dtc, Frame, Kind, Location, Lsn, Measure, Micros, Origin, Range, Reason,
    Rejection,
};
pub use stage::{Batch, Counters, Stage};

/// The few ways this crate's calls fail (frames never fail: they become rejections).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A content type fleetpipe does not read.
    #[error(
        "unsupported content type {0:?}; use application/json, application/x-ndjson or application/x-protobuf"
    )]
    UnsupportedContentType(String),
    /// Stored bytes that are not what fleetpipe writes (the trusted path, [`codec::stored`]).
    #[error("stored frame does not decode ({reason}): {detail}")]
    CorruptFrame { reason: Reason, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
