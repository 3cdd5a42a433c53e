//! fleetpipe: vehicle telemetry from MQTT and HTTP, through lock-free sharded stages, into
//! Parquet and the latest-state cache, acknowledged only once durable.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`app::run`], [`sim::simulate`] and
//! [`sim::replay`]. See README.md's architecture section for the map of the crates.

pub mod app;
pub mod check;
pub mod config;
pub mod read;
pub mod sim;

/// Wall clock in epoch milliseconds.
pub fn now_millis() -> i64 {
    fleetpipe_pipeline::now_micros() / 1000
}

/// A number unique enough to tell processes and test runs apart.
pub(crate) fn app_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
