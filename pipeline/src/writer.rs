//! The log writer: takes entries from the intake in group commits (one write, one `fdatasync`),
//! acknowledges them, and hands each group to the shards.
//!
//! Beside the intake it serves a second, small lane: rejections a sink diverted (frames it
//! refused, see [`crate::driver`]). Those are committed even while the log is full — they are
//! few and small, and the sink that diverted them waits for them to be durable before it moves
//! on, so waiting for room would wait on that very sink.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use fleetpipe_processors::{Kind, Lsn, Rejection};
use tokio::sync::mpsc;

use crate::entry::{Completion, Entry, NotDurable, Submission};
use crate::shard::Dispatch;
use crate::wal::Wal;
use crate::{record, Result};

/// How long the drain waits for the sinks to take everything before it closes the stages.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// A failed log append is tried again after this, doubling up to [`FAULT_MAX_RETRY`].
const FAULT_FIRST_RETRY: Duration = Duration::from_millis(50);
const FAULT_MAX_RETRY: Duration = Duration::from_secs(1);

/// Rejections a sink refused, on their way into the log; `done` hears when they are durable.
pub(crate) struct Diversion {
    pub(crate) rejections: Vec<Rejection>,
    pub(crate) done: Sender<std::result::Result<Lsn, NotDurable>>,
}

/// The sending side of the diversion lane, held by the sink drivers.
#[derive(Clone)]
pub(crate) struct DivertLane {
    pub(crate) tx: Sender<Diversion>,
    /// Wakes a writer that waits on an empty intake; weak, so that it never keeps the intake
    /// open (the drain starts when the last source lets go of it).
    pub(crate) wake: mpsc::WeakSender<Submission>,
}

impl DivertLane {
    /// Makes `rejections` durable in the log; returns once they are.
    pub(crate) fn keep(&self, rejections: Vec<Rejection>) -> std::result::Result<Lsn, NotDurable> {
        let (done, rx) = crossbeam_channel::bounded(1);
        self.tx.send(Diversion { rejections, done }).map_err(|_| NotDurable::ShuttingDown)?;
        if let Some(intake) = self.wake.upgrade() {
            // An empty submission only wakes the writer; a full intake means it is awake anyway.
            let _ = intake.try_send(Submission { entry: Entry::default(), done: None });
        }
        rx.recv().unwrap_or(Err(NotDurable::ShuttingDown))
    }
}

pub(crate) struct Writer {
    pub(crate) wal: Wal,
    /// Set when the instance starts draining.
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) dispatch: Dispatch,
    /// Every sink's durable position: segments below the lowest are released.
    pub(crate) durables: Vec<Arc<AtomicU64>>,
    /// Every sink's taken position and whether it still runs, for the drain.
    pub(crate) taken: Vec<(Arc<AtomicU64>, Arc<AtomicBool>)>,
    /// Set when acknowledgements wait for the sinks.
    pub(crate) acker: Option<Sender<(Lsn, Completion)>>,
    pub(crate) diversions: Receiver<Diversion>,
    pub(crate) capacity: usize,
    pub(crate) group_entries: usize,
    pub(crate) linger: Duration,
    /// `validate.max_ahead_s`, for counting frames ahead of the receiving clock.
    pub(crate) max_ahead_us: i64,
    /// On while the log cannot be written.
    pub(crate) pushback: crate::source::Pushback,
}

impl Writer {
    fn min_durable(&self) -> Lsn {
        self.durables.iter().map(|d| d.load(Ordering::Acquire)).min().unwrap_or(Lsn::MAX)
    }

    /// Feeds the retained log to the shards in groups. A group never straddles a sink's
    /// checkpoint: a sink takes a group whole or not at all, so a group that ended past its
    /// checkpoint must not hold records at or below it.
    pub(crate) fn replay(&mut self) -> Result<()> {
        let from = self.wal.first_lsn();
        let checkpoints: std::collections::BTreeSet<Lsn> =
            self.durables.iter().map(|d| d.load(Ordering::Acquire)).collect();
        let mut pending: Vec<Entry> = Vec::new();
        let mut last = 0;
        let mut records = 0u64;
        let mut groups: Vec<(Lsn, Vec<Entry>)> = Vec::new();
        self.wal.read_from(from, |lsn, payload| {
            match record::decode(payload) {
                Ok(e) => pending.push(e),
                Err(e) => tracing::error!(lsn, error = %e, "undecodable log record skipped"),
            }
            last = lsn;
            records += 1;
            if pending.len() >= 256 || checkpoints.contains(&lsn) {
                groups.push((last, std::mem::take(&mut pending)));
            }
        })?;
        if !pending.is_empty() {
            groups.push((last, pending));
        }
        for (lsn, entries) in groups {
            self.dispatch.send(lsn, entries, Default::default())?;
        }
        if records > 0 {
            tracing::info!(from, records, "write-ahead log replayed");
        }
        Ok(())
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Submission>) -> Result<()> {
        let mut batch: Vec<Submission> = Vec::with_capacity(self.group_entries);
        loop {
            // Bounded disk: wait for sinks to release segments before taking more.
            self.release()?;
            while self.wal.is_full() {
                metrics::gauge!("fleetpipe_wal_full").set(1.0);
                self.commit_diversions()?;
                if self.draining.load(Ordering::Acquire) || rx.is_closed() {
                    // Draining with a full log: what is queued cannot be made durable. Its
                    // sources learn so at once (MQTT withholds the acks, HTTP answers 503), so
                    // that they can finish and let go of the intake.
                    while let Ok(s) = rx.try_recv() {
                        crate::entry::landed(s.entry.received());
                        if let Some(done) = s.done {
                            done(Err(NotDurable::ShuttingDown));
                        }
                    }
                    if rx.is_closed() {
                        tracing::warn!("write-ahead log full while draining; queued entries refused");
                        return self.finish();
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
                self.release()?;
            }
            metrics::gauge!("fleetpipe_wal_full").set(0.0);
            batch.clear();
            if rx.blocking_recv_many(&mut batch, self.group_entries) == 0 {
                break;
            }
            linger_for_more(&mut rx, &mut batch, self.group_entries, self.linger);
            metrics::gauge!("fleetpipe_queue_depth", "stage" => "intake")
                .set((rx.len() + batch.len()) as f64);
            metrics::gauge!("fleetpipe_queue_capacity", "stage" => "intake").set(self.capacity as f64);
            self.commit_diversions()?;
            self.commit(&mut batch)?;
        }
        self.finish()
    }

    /// The intake is closed: waits (a while) until every running sink took everything, so that
    /// what they divert meanwhile still reaches the dead-letter sink in this run; then lets the
    /// stages drain into the sinks, keeps committing what sinks divert until the last of them
    /// has stopped (that reaches the dead-letter sink at the next start), and releases what they
    /// no longer need.
    fn finish(mut self) -> Result<()> {
        let deadline = Instant::now() + DRAIN_WAIT;
        while Instant::now() < deadline {
            self.commit_diversions()?;
            let last = self.wal.next_lsn().saturating_sub(1);
            let behind = self
                .taken
                .iter()
                .any(|(t, alive)| alive.load(Ordering::Acquire) && t.load(Ordering::Acquire) < last);
            if !behind {
                break;
            }
            if let Ok(d) = self.diversions.recv_timeout(Duration::from_millis(2)) {
                self.commit_diversion(d)?;
            }
        }
        self.dispatch.close();
        while let Ok(d) = self.diversions.recv() {
            self.commit_diversion(d)?;
            self.commit_diversions()?;
        }
        self.release()?;
        tracing::info!(next_lsn = self.wal.next_lsn(), "log writer drained");
        Ok(())
    }

    fn release(&mut self) -> Result<()> {
        let durable = self.min_durable();
        if durable > 0 {
            self.wal.release_through(durable)?;
        }
        metrics::gauge!("fleetpipe_wal_bytes").set(self.wal.bytes() as f64);
        Ok(())
    }

    fn commit_diversions(&mut self) -> Result<()> {
        while let Ok(d) = self.diversions.try_recv() {
            self.commit_diversion(d)?;
        }
        Ok(())
    }

    /// One diversion, one record: durable before its sink goes on; reaches the dead-letter sink
    /// through the shards like any rejection (or, after the drain, at the next start).
    fn commit_diversion(&mut self, d: Diversion) -> Result<()> {
        let entry = Entry { received_at: crate::now_micros(), rejections: d.rejections, ..Entry::default() };
        match self.wal.append_group(&[record::encode(&entry)]) {
            Ok(lsn) => {
                let _ = d.done.send(Ok(lsn));
                if !self.dispatch.is_closed() {
                    self.dispatch.send(lsn, vec![entry], Default::default())?;
                }
                Ok(())
            }
            Err(e) => {
                // The sink that diverted them tries again later.
                metrics::counter!("fleetpipe_wal_errors_total").increment(1);
                tracing::warn!(error = %e, "could not keep a sink's refused frames in the log yet");
                let _ = d.done.send(Err(NotDurable::Log(e.to_string())));
                Ok(())
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<Submission>) -> Result<()> {
        // Empty submissions without a completion only woke the writer.
        batch.retain(|s| s.done.is_some() || !s.entry.is_empty());
        if batch.is_empty() {
            return Ok(());
        }
        let payloads: Vec<Vec<u8>> = batch.iter().map(|s| record::encode(&s.entry)).collect();
        let commit_span = if crate::trace::is_on() {
            let incoming: Vec<_> = batch.iter().flat_map(|s| s.entry.trace.iter().copied()).collect();
            let frames = batch.iter().map(|s| s.entry.frames.len()).sum();
            crate::trace::stage_span("log.commit", &incoming, frames, true)
        } else {
            None
        };
        let _entered = commit_span.as_ref().map(|s| s.enter());
        let mut started = Instant::now();
        let mut fault: Option<(Instant, u64)> = None;
        let mut delay = FAULT_FIRST_RETRY;
        // The log is the durability point: while it cannot be written nothing is acknowledged.
        // The group is held and tried again (the intake fills up behind it: MQTT reading stops,
        // Kafka pauses, HTTP answers 503 at once) until the disk takes it again.
        let first = loop {
            match self.wal.append_group(&payloads) {
                Ok(first) => break first,
                Err(e) => {
                    metrics::counter!("fleetpipe_wal_errors_total").increment(1);
                    let (since, attempts) = fault.get_or_insert_with(|| {
                        tracing::error!(
                            error = %e,
                            entries = batch.len(),
                            "log append failed; ingestion paused until the log can be written again"
                        );
                        self.pushback.set(true);
                        metrics::gauge!("fleetpipe_wal_full").set(1.0);
                        (Instant::now(), 0)
                    });
                    *attempts += 1;
                    if self.draining.load(Ordering::Acquire) {
                        tracing::warn!(
                            entries = batch.len(),
                            paused_ms = since.elapsed().as_millis() as u64,
                            "log still unwritable while draining: the held entries are refused, not acknowledged"
                        );
                        for s in batch.drain(..) {
                            crate::entry::landed(s.entry.received());
                            if let Some(done) = s.done {
                                done(Err(NotDurable::Log(e.to_string())));
                            }
                        }
                        return Ok(());
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(FAULT_MAX_RETRY);
                    // Sinks that caught up meanwhile free whole segments.
                    self.release()?;
                    started = Instant::now();
                }
            }
        };
        if let Some((since, attempts)) = fault {
            tracing::info!(
                paused_ms = since.elapsed().as_millis() as u64,
                attempts,
                "log writable again; ingestion resumed"
            );
            self.pushback.set(false);
            metrics::gauge!("fleetpipe_wal_full").set(0.0);
        }
        metrics::histogram!("fleetpipe_sink_write_seconds", "sink" => "wal")
            .record(started.elapsed().as_secs_f64());
        let last = first + batch.len() as u64 - 1;
        let mut entries = Vec::with_capacity(batch.len());
        let mut accepted = [0u64; 2];
        let mut rejected: HashMap<&'static str, u64> = HashMap::new();
        let mut ahead = 0u64;
        for (i, s) in batch.drain(..).enumerate() {
            if let Some(done) = s.done {
                let lsn = first + i as u64;
                match &self.acker {
                    Some(acker) => {
                        if let Err(e) = acker.send((lsn, done)) {
                            let (_, done) = e.into_inner();
                            done(Err(NotDurable::ShuttingDown));
                        }
                    }
                    None => done(Ok(lsn)),
                }
            }
            for f in &s.entry.frames {
                accepted[(f.kind() == Kind::Diagnostic) as usize] += 1;
                ahead += u64::from(fleetpipe_processors::validate::is_clock_ahead(f, self.max_ahead_us));
            }
            for r in &s.entry.rejections {
                *rejected.entry(r.reason.code()).or_default() += 1;
            }
            entries.push(s.entry);
        }
        let frames = accepted[0] + accepted[1];
        crate::entry::landed(frames + rejected.values().sum::<u64>());
        metrics::counter!("fleetpipe_frames_accepted_total", "kind" => "location").increment(accepted[0]);
        metrics::counter!("fleetpipe_frames_accepted_total", "kind" => "diagnostic").increment(accepted[1]);
        for (reason, n) in rejected {
            metrics::counter!("fleetpipe_frames_rejected_total", "reason" => reason).increment(n);
        }
        metrics::counter!("fleetpipe_frames_written_total", "sink" => "wal").increment(frames);
        metrics::counter!("fleetpipe_frames_clock_ahead_total").increment(ahead);
        let trace: std::sync::Arc<[_]> =
            commit_span.as_ref().and_then(crate::trace::sampled_context).into_iter().collect();
        self.dispatch.send(last, entries, trace)
    }
}

/// Lets a group commit gather more entries: up to `linger`, in steps of an eighth of it, for as
/// long as each step brought new ones. A steady stream (a broker delivering) fills the group for
/// the whole linger, so fsyncs stay few; a burst that has all arrived (HTTP clients each waiting
/// for their answer) is committed one quiet step later instead of a whole linger later.
fn linger_for_more(
    rx: &mut mpsc::Receiver<Submission>,
    batch: &mut Vec<Submission>,
    group_entries: usize,
    linger: Duration,
) {
    if linger.is_zero() {
        return;
    }
    let started = Instant::now();
    let step = linger / 8;
    while batch.len() < group_entries && started.elapsed() < linger {
        std::thread::sleep(step);
        let before = batch.len();
        while batch.len() < group_entries {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        if batch.len() == before {
            break;
        }
    }
}
