//! The loop that drives a sink on its own OS thread: batches in, timers, retries, catching up,
//! poison frames, metrics. No sink re-implements any of it.
//!
//! A call that fails with [`SinkError::Retry`] is retried with capped exponential backoff (10 ms
//! doubling to 5 s) while the batch is held, so the bounded channel in front of the sink fills
//! up. [`SinkError::Fatal`] ends the thread with that error; dropping the receiver tells the
//! sender. [`SinkError::Poison`] names frames the sink refuses: the driver keeps them in the
//! dead-letter store through the log ([`LogAccess::keep`]), durably, and writes the batch again
//! without them — one bad row never fails its batch.
//!
//! The driver is the one replay guard: a sink is never handed a batch at or below the position it
//! already took, whether the batch comes live or from the log.
//!
//! A sink that cannot keep up does not hold the others back. Its feeder ([`SinkFeed`]) never
//! blocks: when the sink's queue is full it stops sending and notes how far it skipped; once the
//! sink has worked off its queue it reads the skipped range back from the WAL ([`LogAccess`]) and
//! then takes live batches again. A sink outage is thus absorbed by the WAL, whose segments stay
//! until every sink is past them; only a full WAL pushes back on the sources.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use fleetpipe_processors::codec::encode_json;
use fleetpipe_processors::{Batch, Lsn, Origin, Reason, Rejection};

use crate::entry::NotDurable;
use crate::sink::{Poison, Sink, SinkError};

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_RECOVER: Duration = Duration::from_millis(100);
/// Attempts a failing call gets once the instance drains.
const DRAIN_ATTEMPTS: u32 = 3;

/// What the driver needs of the write-ahead log (the pipeline's log; a fake in tests).
pub trait LogAccess: Send + Sync {
    /// Calls `f` with batches covering every record with `after < lsn <= through`, in order,
    /// each of bounded size (so catching up holds bounded memory), each with `lsn` set to the
    /// last record it covers, de-duplicated as the shards would have. Stops at the first error
    /// `f` returns.
    fn replay(
        &self,
        after: Lsn,
        through: Lsn,
        f: &mut dyn FnMut(Batch) -> Result<(), SinkError>,
    ) -> Result<(), SinkError>;
    /// Makes `rejections` durable in the log, from where the dead-letter sink stores them like
    /// any other rejection; returns once they are.
    fn keep(&self, rejections: Vec<Rejection>) -> Result<(), NotDurable>;
}

#[derive(Debug, Default)]
struct LagState {
    /// The feeder stopped sending; the sink catches up from the WAL.
    behind: bool,
    /// The last batch the feeder skipped while `behind`.
    skipped_through: Lsn,
}

/// The hand-off between a sink's feeder and its driver.
#[derive(Debug, Default)]
struct Lag(Mutex<LagState>);

impl Lag {
    fn lock(&self) -> std::sync::MutexGuard<'_, LagState> {
        // The state is two plain values, valid whatever a panicking holder left.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side of a sink's queue, used by the pipeline; never blocks.
#[derive(Debug, Clone)]
pub struct SinkFeed {
    pub name: &'static str,
    tx: Sender<Arc<Batch>>,
    lag: Arc<Lag>,
}

impl SinkFeed {
    /// Hands `batch` to the sink, or, when its queue is full or it is already behind, notes that
    /// it skipped it (the sink reads it back from the WAL). `false` once the sink has stopped.
    pub fn offer(&self, batch: &Arc<Batch>) -> bool {
        let mut lag = self.lag.lock();
        if lag.behind {
            lag.skipped_through = batch.lsn;
            return true;
        }
        match self.tx.try_send(Arc::clone(batch)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                lag.behind = true;
                lag.skipped_through = batch.lsn;
                metrics::gauge!("fleetpipe_sink_behind", "sink" => self.name).set(1.0);
                tracing::info!(
                    sink = self.name,
                    lsn = batch.lsn,
                    "sink fell behind, it will catch up from the log"
                );
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// How a sink is driven.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Batches queued in front of the sink before it is skipped (and catches up from the log).
    pub queue: usize,
    /// How often the sink's `tick` runs when no batch arrives.
    pub tick: Duration,
    /// When set, acknowledgements wait for this sink: whatever it holds that is not durable yet
    /// is flushed once its queue is empty and this long has passed since the last flush.
    pub flush_every: Option<Duration>,
}

/// A running sink.
#[derive(Debug)]
pub struct SinkHandle {
    pub name: &'static str,
    /// Whether the sink stores what it is given ([`Sink::is_durable`]); a cache does not.
    pub is_durable: bool,
    /// The sink's `durable_lsn()`, updated after every call (Release); read with Acquire.
    pub durable: Arc<AtomicU64>,
    /// The last log position handed to the sink, durable there or not.
    pub taken: Arc<AtomicU64>,
    /// Cleared when the thread ends, normally or not.
    pub alive: Arc<std::sync::atomic::AtomicBool>,
    join: Result<JoinHandle<Result<(), SinkError>>, SinkError>,
}

impl SinkHandle {
    /// Waits for the thread: `Ok` after the channel disconnected and the last flush succeeded.
    pub fn join(self) -> Result<(), SinkError> {
        match self.join {
            Ok(handle) => handle.join().unwrap_or_else(|panic| {
                let detail = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".to_string());
                Err(SinkError::fatal(format!("sink {} panicked: {detail}", self.name)))
            }),
            Err(e) => Err(e),
        }
    }

    /// Whether the thread has ended (channel closed, fatal error or panic).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().map_or(true, |h| h.is_finished())
    }
}

/// Runs `sink` on an OS thread named `sink-{name}`, behind a queue fed by the returned
/// [`SinkFeed`]; what the feeder skips is read back from `log`, poison frames are kept there.
pub fn spawn(sink: Box<dyn Sink>, cfg: DriverConfig, log: Arc<dyn LogAccess>) -> (SinkHandle, SinkFeed) {
    spawn_draining(sink, cfg, log, Arc::new(std::sync::atomic::AtomicBool::new(false)))
}

/// [`spawn`], told when the instance drains (`draining`): from then on a failing sink gives up
/// after a few attempts instead of retrying for ever, and ends cleanly — what it lacks stays in
/// the log, which replays it at the next start.
pub fn spawn_draining(
    sink: Box<dyn Sink>,
    cfg: DriverConfig,
    log: Arc<dyn LogAccess>,
    draining: Arc<std::sync::atomic::AtomicBool>,
) -> (SinkHandle, SinkFeed) {
    let name = sink.name();
    let is_durable = sink.is_durable();
    let (tx, rx) = crossbeam_channel::bounded(cfg.queue.max(1));
    let lag = Arc::new(Lag::default());
    let feed = SinkFeed { name, tx, lag: Arc::clone(&lag) };
    let durable = Arc::new(AtomicU64::new(sink.durable_lsn()));
    let taken = Arc::new(AtomicU64::new(sink.durable_lsn()));
    let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (shared, shared_taken, still) = (Arc::clone(&durable), Arc::clone(&taken), Arc::clone(&alive));
    let join = std::thread::Builder::new()
        .name(format!("sink-{name}"))
        .spawn(move || {
            let written = sink.durable_lsn();
            let write_seconds = metrics::histogram!("fleetpipe_sink_write_seconds", "sink" => name);
            let mut driver = Driver {
                name,
                sink,
                written,
                durable: &shared,
                taken: &shared_taken,
                last_flush: Instant::now(),
                write_seconds,
                log: log.as_ref(),
                draining,
                recover_delay: FIRST_RECOVER,
            };
            let result = driver.run(rx, &lag, &cfg);
            still.store(false, Ordering::Release);
            result
        })
        .map_err(|e| {
            tracing::error!(sink = name, error = %e, "could not start sink thread");
            SinkError::fatal(format!("sink {name}: could not start its thread: {e}"))
        });
    if join.is_err() {
        alive.store(false, Ordering::Release);
    }
    (SinkHandle { name, is_durable, durable, taken, alive, join }, feed)
}

struct Driver<'a> {
    name: &'static str,
    sink: Box<dyn Sink>,
    /// The last WAL position handed to the sink (durable or not).
    written: Lsn,
    durable: &'a AtomicU64,
    /// `written`, for the log writer's drain.
    taken: &'a AtomicU64,
    last_flush: Instant,
    write_seconds: metrics::Histogram,
    log: &'a dyn LogAccess,
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Wait before the next in-place recovery; doubles while recoveries keep failing.
    recover_delay: Duration,
}

impl Driver<'_> {
    fn run(&mut self, rx: Receiver<Arc<Batch>>, lag: &Lag, cfg: &DriverConfig) -> Result<(), SinkError> {
        match self.drive(&rx, lag, cfg) {
            Err(e) if self.draining.load(Ordering::Acquire) => {
                // Safe: the log keeps every segment until this sink's durable position has
                // passed it, and replays the rest at the next start.
                tracing::warn!(
                    sink = self.name,
                    durable = self.sink.durable_lsn(),
                    error = %e,
                    "sink gave up while draining; the log replays what it lacks at the next start"
                );
                self.durable.store(self.sink.durable_lsn(), Ordering::Release);
                Ok(())
            }
            other => other,
        }
    }

    fn drive(&mut self, rx: &Receiver<Arc<Batch>>, lag: &Lag, cfg: &DriverConfig) -> Result<(), SinkError> {
        let name = self.name;
        let tick = cfg.flush_every.map_or(cfg.tick, |f| f.min(cfg.tick));
        let depth = metrics::gauge!("fleetpipe_queue_depth", "stage" => name);
        let capacity = metrics::gauge!("fleetpipe_queue_capacity", "stage" => name);
        tracing::debug!(sink = name, "sink thread started");
        loop {
            depth.set(rx.len() as f64);
            if let Some(cap) = rx.capacity() {
                capacity.set(cap as f64);
            }
            // Behind and the queue worked off: what was skipped comes next, from the log.
            if rx.is_empty() && lag.lock().behind {
                if let Err(e) = self.catch_up(lag) {
                    let through = lag.lock().skipped_through;
                    self.recover(e, lag, through, rx)?;
                }
                continue;
            }
            let step = match rx.recv_timeout(tick) {
                Ok(batch) => self.write(&batch).map_err(|e| (e, batch.lsn)),
                Err(RecvTimeoutError::Timeout) => {
                    self.retry("tick", |s| s.sink.tick(Instant::now())).map_err(|e| (e, self.written))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.retry("flush", |s| s.sink.flush())?;
                    self.durable.store(self.sink.durable_lsn(), Ordering::Release);
                    tracing::debug!(sink = name, durable = self.sink.durable_lsn(), "sink closed");
                    return Ok(());
                }
            };
            let step = step.and_then(|()| match cfg.flush_every {
                Some(every)
                    if rx.is_empty()
                        && self.written > self.sink.durable_lsn()
                        && self.last_flush.elapsed() >= every =>
                {
                    self.last_flush = Instant::now();
                    self.retry("flush", |s| s.sink.flush()).map_err(|e| (e, self.written))
                }
                _ => Ok(()),
            });
            if let Err((e, through)) = step {
                self.recover(e, lag, through, rx)?;
            }
            self.durable.store(self.sink.durable_lsn(), Ordering::Release);
        }
    }

    /// A failure retrying cannot fix: if the sink can start over from its durable position, it
    /// does (after a pause that doubles while this keeps happening), and everything after that
    /// position through `through` is read back from the log. Otherwise the failure stands.
    fn recover(
        &mut self,
        err: SinkError,
        lag: &Lag,
        through: Lsn,
        rx: &Receiver<Arc<Batch>>,
    ) -> Result<(), SinkError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(err);
        }
        match self.sink.recover() {
            Ok(true) => {}
            Ok(false) => return Err(err),
            Err(e) => tracing::warn!(sink = self.name, error = %e, "sink could not start over yet"),
        }
        let durable = self.sink.durable_lsn();
        tracing::warn!(
            sink = self.name,
            error = %err,
            durable,
            through,
            retry_in_ms = self.recover_delay.as_millis() as u64,
            "sink failed and starts over; what it lost comes back from the log"
        );
        metrics::counter!("fleetpipe_sink_recoveries_total", "sink" => self.name).increment(1);
        {
            let mut state = lag.lock();
            if !state.behind {
                metrics::gauge!("fleetpipe_sink_behind", "sink" => self.name).set(1.0);
            }
            state.behind = true;
            state.skipped_through = state.skipped_through.max(through).max(self.written);
            // Batches already queued come after the ones to re-read: they are read back from
            // the log too, in order. (The feeder sends no more while `behind` is set.)
            while let Ok(batch) = rx.try_recv() {
                state.skipped_through = state.skipped_through.max(batch.lsn);
            }
        }
        self.written = durable;
        self.taken.store(durable, Ordering::Release);
        self.durable.store(durable, Ordering::Release);
        std::thread::sleep(self.recover_delay);
        self.recover_delay = (self.recover_delay * 2).min(MAX_BACKOFF);
        Ok(())
    }

    /// [`retry`] for this sink: once the instance drains, a few attempts only.
    fn retry(
        &mut self,
        op_name: &'static str,
        mut op: impl FnMut(&mut Self) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        let draining = Arc::clone(&self.draining);
        let name = self.name;
        retry(name, op_name, &draining, || op(self))
    }

    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let name = self.name;
        if batch.lsn <= self.written {
            return Ok(()); // already taken (read from the log while catching up, or a replay)
        }
        let mut kept: Option<Batch> = None;
        let draining = Arc::clone(&self.draining);
        let span = if batch.trace.is_empty() {
            None
        } else {
            crate::trace::stage_span(&format!("sink.{name}"), &batch.trace, batch.frames.len(), false)
        };
        let _entered = span.as_ref().map(|s| s.enter());
        retry(name, "write", &draining, || {
            let current = kept.as_ref().unwrap_or(batch);
            let started = Instant::now();
            let result = self.sink.write(current);
            self.write_seconds.record(started.elapsed().as_secs_f64());
            match result {
                Err(SinkError::Poison(poison)) => {
                    let rest = self.divert(current, &poison)?;
                    kept = Some(rest);
                    // Written again without the poison frames, at once.
                    Err(SinkError::Poison(Vec::new()))
                }
                other => other,
            }
        })?;
        self.written = batch.lsn;
        self.taken.store(batch.lsn, Ordering::Release);
        self.durable.store(self.sink.durable_lsn(), Ordering::Release);
        self.recover_delay = FIRST_RECOVER;
        retry(name, "tick", &draining, || self.sink.tick(Instant::now()))
    }

    /// Keeps the frames a sink refused in the dead-letter store (durably, through the log) and
    /// returns the batch without them.
    fn divert(&self, batch: &Batch, poison: &[Poison]) -> Result<Batch, SinkError> {
        let mut refused = vec![false; batch.frames.len()];
        let mut rejections = Vec::with_capacity(poison.len());
        for p in poison {
            let Some(frame) = batch.frames.get(p.index) else { continue };
            if std::mem::replace(&mut refused[p.index], true) {
                continue;
            }
            tracing::warn!(
                sink = self.name,
                vehicle_id = %frame.vehicle_id,
                ts = frame.ts,
                error = %p.detail,
                "a sink refused a frame; it goes to the dead-letter store"
            );
            let mut raw = Vec::new();
            encode_json(frame, &mut raw);
            rejections.push(Rejection {
                reason: Reason::OutOfRange,
                detail: format!("{}: {}", self.name, p.detail),
                index: None,
                raw: Bytes::from(raw),
                origin: Origin::Sink { sink: self.name.to_owned() },
                received_at: frame.received_at,
            });
        }
        let n = rejections.len() as u64;
        if n > 0 {
            self.log.keep(rejections).map_err(|e| match e {
                NotDurable::ShuttingDown => SinkError::fatal(format!(
                    "{}: refused frames cannot be kept, the log has stopped: {e}",
                    self.name
                )),
                NotDurable::Log(_) => SinkError::retry(e),
            })?;
            metrics::counter!("fleetpipe_frames_rejected_total", "reason" => refused_reason(self.name))
                .increment(n);
        }
        let frames =
            batch.frames.iter().zip(&refused).filter(|(_, r)| !**r).map(|(f, _)| f.clone()).collect();
        Ok(Batch {
            lsn: batch.lsn,
            frames,
            rejections: batch.rejections.clone(),
            trace: Arc::clone(&batch.trace),
        })
    }

    /// Reads from the log what the feeder skipped, until nothing is left to skip.
    fn catch_up(&mut self, lag: &Lag) -> Result<(), SinkError> {
        let from = self.written;
        loop {
            let through = {
                let mut state = lag.lock();
                if state.skipped_through <= self.written {
                    // Caught up: the feeder sends again from the batch after this one.
                    state.behind = false;
                    metrics::gauge!("fleetpipe_sink_behind", "sink" => self.name).set(0.0);
                    tracing::info!(
                        sink = self.name,
                        from,
                        through = self.written,
                        "sink caught up from the log"
                    );
                    return Ok(());
                }
                state.skipped_through
            };
            let log = self.log;
            log.replay(self.written, through, &mut |batch| self.write(&batch))?;
            // The log holds every record up to `through`; a batch may end short of it only when
            // its last records were empty groups.
            self.written = self.written.max(through);
            self.taken.store(self.written, Ordering::Release);
        }
    }
}

/// The `reason` label under which frames refused by `sink` are counted.
fn refused_reason(sink: &str) -> &'static str {
    match sink {
        "postgres" => "postgres_refused",
        _ => "sink_refused",
    }
}

/// Runs `op` until it succeeds or fails with an error that retrying cannot fix — or, once
/// `draining` is set, has failed [`DRAIN_ATTEMPTS`] times. An empty [`SinkError::Poison`] (the
/// poison frames were diverted) is retried at once.
fn retry(
    sink: &'static str,
    op_name: &'static str,
    draining: &std::sync::atomic::AtomicBool,
    mut op: impl FnMut() -> Result<(), SinkError>,
) -> Result<(), SinkError> {
    let mut delay = FIRST_BACKOFF;
    let mut attempt = 1u32;
    loop {
        let err = match op() {
            Ok(()) => return Ok(()),
            Err(SinkError::Poison(p)) if p.is_empty() => continue,
            Err(e) => e,
        };
        metrics::counter!("fleetpipe_sink_errors_total", "sink" => sink).increment(1);
        if !err.is_retryable() {
            tracing::error!(sink, op = op_name, error = %err, "sink operation failed; retrying cannot fix it");
            return Err(err);
        }
        if attempt >= DRAIN_ATTEMPTS && draining.load(Ordering::Acquire) {
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
