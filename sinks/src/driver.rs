//! The loop that drives a sink on its own OS thread: batches in, timers, retries, metrics.
//!
//! A failed `write`, `tick` or `close` is retried with capped exponential backoff (10 ms doubling
//! to 5 s) while the batch is held, so the bounded channel in front of the sink fills up and
//! pushes back. An error that retrying cannot fix ([`SinkError::is_retryable`], e.g. a poisoned
//! sink) ends the thread with that error; dropping the receiver tells the sender.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::{Sink, SinkBatch, SinkError};

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A running sink.
#[derive(Debug)]
pub struct SinkHandle {
    pub name: &'static str,
    /// The sink's `durable_lsn()`, updated after every call (Release); read with Acquire.
    pub durable: Arc<AtomicU64>,
    join: Result<JoinHandle<Result<(), SinkError>>, SinkError>,
}

impl SinkHandle {
    /// Waits for the thread: `Ok` after the channel disconnected and `close` succeeded.
    pub fn join(self) -> Result<(), SinkError> {
        match self.join {
            Ok(handle) => handle.join().unwrap_or_else(|panic| {
                let detail = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".to_string());
                Err(SinkError::Thread { sink: self.name, detail: format!("panicked: {detail}") })
            }),
            Err(e) => Err(e),
        }
    }

    /// Whether the thread has ended (channel closed, fatal error or panic).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().map_or(true, |h| h.is_finished())
    }
}

/// Runs `sink` on an OS thread named `sink-{name}`, fed by `rx`; `tick` is how often the sink's
/// `tick` runs when no batch arrives.
pub fn spawn(sink: Box<dyn Sink>, rx: Receiver<Arc<SinkBatch>>, tick: Duration) -> SinkHandle {
    let name = sink.name();
    let durable = Arc::new(AtomicU64::new(sink.durable_lsn()));
    let shared = Arc::clone(&durable);
    let join = std::thread::Builder::new()
        .name(format!("sink-{name}"))
        .spawn(move || run(sink, rx, tick, &shared))
        .map_err(|e| {
            tracing::error!(sink = name, error = %e, "could not start sink thread");
            SinkError::Thread { sink: name, detail: format!("could not start: {e}") }
        });
    SinkHandle { name, durable, join }
}

fn run(
    mut sink: Box<dyn Sink>,
    rx: Receiver<Arc<SinkBatch>>,
    tick: Duration,
    durable: &AtomicU64,
) -> Result<(), SinkError> {
    let name = sink.name();
    let write_seconds = metrics::histogram!("fleetpipe_sink_write_seconds", "sink" => name);
    let depth = metrics::gauge!("fleetpipe_queue_depth", "stage" => name);
    let capacity = metrics::gauge!("fleetpipe_queue_capacity", "stage" => name);
    tracing::debug!(sink = name, "sink thread started");
    loop {
        depth.set(rx.len() as f64);
        if let Some(cap) = rx.capacity() {
            capacity.set(cap as f64);
        }
        match rx.recv_timeout(tick) {
            Ok(batch) => {
                retry(name, "write", || {
                    let started = Instant::now();
                    let result = sink.write(&batch);
                    write_seconds.record(started.elapsed().as_secs_f64());
                    result
                })?;
                durable.store(sink.durable_lsn(), Ordering::Release);
                retry(name, "tick", || sink.tick(Instant::now()))?;
            }
            Err(RecvTimeoutError::Timeout) => {
                retry(name, "tick", || sink.tick(Instant::now()))?;
            }
            Err(RecvTimeoutError::Disconnected) => {
                retry(name, "close", || sink.close())?;
                durable.store(sink.durable_lsn(), Ordering::Release);
                tracing::debug!(sink = name, durable = sink.durable_lsn(), "sink closed");
                return Ok(());
            }
        }
        durable.store(sink.durable_lsn(), Ordering::Release);
    }
}

/// Runs `op` until it succeeds or fails with an error that retrying cannot fix.
fn retry(
    sink: &'static str,
    op_name: &'static str,
    mut op: impl FnMut() -> Result<(), SinkError>,
) -> Result<(), SinkError> {
    let mut delay = FIRST_BACKOFF;
    let mut attempt = 1u32;
    loop {
        let err = match op() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        metrics::counter!("fleetpipe_sink_errors_total", "sink" => sink).increment(1);
        if !err.is_retryable() {
            tracing::error!(sink, op = op_name, error = %err, "sink failed, stopping it");
            return Err(err);
        }
        tracing::warn!(
            sink,
            op = op_name,
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            error = %err,
            "sink operation failed, retrying"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(MAX_BACKOFF);
        attempt = attempt.saturating_add(1);
    }
}
