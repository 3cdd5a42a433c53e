//! fleetpipe's data model and pure pipeline stages.
//!
//! This crate does no I/O: no sockets, no files, no async runtime. Everything here is a plain
//! function or data structure over in-memory frames, so it is unit-tested without services and
//! benchmarked on its own. Sources (`fleetpipe-ingest`) and sinks (`fleetpipe-sinks`) depend on
//! it; it depends on neither.
//!
//! Stages never fail on bad data: they return what they accepted and a list of rejections.

pub mod codec;
pub mod dedup;
pub mod frame;
pub mod latest;
pub mod validate;

pub use frame::{
    Body, Decoded, Diagnostic, Dtc, Frame, Kind, Location, Lsn, Micros, Origin, Reason, Rejection,
};
