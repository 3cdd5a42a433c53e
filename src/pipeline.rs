//! The staged pipeline behind the intake:
//!
//! ```text
//! intake (bounded) → log writer: group commit + fsync, then acks → shards (by vehicle):
//!   de-duplicate, enrich, L1 latest → resequencer (WAL order) → one queue per sink → sinks
//! ```
//!
//! Every stage is a thread joined to the next by a bounded queue (lock-free on the fast path);
//! a full queue blocks the stage before it, up to the intake, which the sources see as pushback.
//! Each shard receives a (possibly empty) part of every log group, so the resequencer can put
//! the groups back in log order and a sink's checkpoint is simply the last group it made
//! durable. A vehicle always maps to the same shard, so its frames keep their order and its
//! de-duplication window and latest state need no lock.
//!
//! The resequencer never waits for a sink: a sink whose queue is full is skipped and later reads
//! what it missed back from the log (see `fleetpipe_sinks::driver`), so a slow or failed sink
//! (Postgres down) is absorbed by the log until the log is full, and only then are the sources
//! pushed back.
//!
//! At start the log is replayed from its oldest retained record: shards see it all (which
//! refills the de-duplication windows and L1), each sink only what lies past its checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{bounded, Receiver, Sender};
use fleetpipe_ingest::{Completion, Entry, Intake, NotDurable, Submission};
use fleetpipe_processors::dedup::Dedup;
use fleetpipe_processors::latest::LatestCache;
use fleetpipe_processors::{Frame, Kind, Lsn, Rejection};
use fleetpipe_sinks::driver::{self, Backlog, DriverConfig, SinkFeed, SinkHandle};
use fleetpipe_sinks::wal::{self, Wal, WalConfig};
use fleetpipe_sinks::{Sink, SinkBatch, SinkError};
use tokio::sync::mpsc;

use crate::record;

/// Sizing of the stages.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub shards: usize,
    pub queue_batches: usize,
    pub intake_entries: usize,
    /// Recent frames remembered for de-duplication, over all shards.
    pub dedup_frames: usize,
    pub group_entries: usize,
    /// How long a group commit waits for more entries after the first: fewer, larger fsyncs
    /// and batches downstream, for that much more time-to-ack.
    pub group_linger: Duration,
    pub wal: WalConfig,
    pub sink_tick: Duration,
    /// `Some(flush_every)`: acknowledge an entry only once every durable sink (Parquet,
    /// Postgres, the dead-letter store) holds it, flushing them that often; `None`: once the
    /// log holds it.
    pub ack_after_sinks: Option<Duration>,
}

/// A log group's share for one shard.
struct ShardBatch {
    group: u64,
    lsn: Lsn,
    frames: Vec<Frame>,
    rejections: Vec<Rejection>,
}

/// The running pipeline. Dropping every [`Intake`] clone starts the drain; [`Pipeline::join`]
/// waits for it to reach the sinks and for them to close.
pub struct Pipeline {
    pub intake: Intake,
    draining: Arc<AtomicBool>,
    writer: JoinHandle<anyhow::Result<()>>,
    shards: Vec<JoinHandle<()>>,
    reseq: JoinHandle<()>,
    sinks: Vec<SinkHandle>,
    acker: Option<JoinHandle<()>>,
}

fn shard_of(vehicle_id: &str, shards: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    vehicle_id.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

impl Pipeline {
    /// Opens the log, starts every stage, and replays what the sinks still lack.
    pub fn start(
        cfg: PipelineConfig,
        sinks: Vec<Box<dyn Sink>>,
        latest: LatestCache,
    ) -> anyhow::Result<Pipeline> {
        let wal = Wal::open(cfg.wal.clone()).context("opening the write-ahead log")?;
        let shards = cfg.shards.max(1);
        let q = cfg.queue_batches.max(1);

        // Sinks, each behind its own queue, catching up from the log when they fall behind.
        let backlog: Arc<dyn Backlog> = Arc::new(LogBacklog {
            dir: cfg.wal.dir.clone(),
            dedup_frames: cfg.dedup_frames.clamp(1, CATCH_UP_DEDUP_FRAMES),
        });
        let mut sink_txs: Vec<(SinkFeed, Lsn)> = Vec::new();
        let mut handles = Vec::new();
        for sink in sinks {
            let from = sink.durable_lsn();
            tracing::info!(sink = sink.name(), durable_lsn = from, "sink opened");
            let dcfg = DriverConfig { queue: q, tick: cfg.sink_tick, flush_every: cfg.ack_after_sinks };
            let (handle, feed) = driver::spawn(sink, dcfg, backlog.clone());
            handles.push(handle);
            sink_txs.push((feed, from));
        }
        let durables: Vec<Arc<AtomicU64>> = handles.iter().map(|h| h.durable.clone()).collect();
        let (acker_tx, acker) = match cfg.ack_after_sinks {
            None => (None, None),
            Some(_) => {
                let watched: Vec<_> = handles
                    .iter()
                    .filter(|h| h.is_durable)
                    .map(|h| (h.durable.clone(), h.alive.clone()))
                    .collect();
                let (tx, rx) = bounded::<(Lsn, Completion)>(cfg.intake_entries.max(1) * 4);
                let join = std::thread::Builder::new()
                    .name("acker".into())
                    .spawn(move || ack_when_stored(rx, watched))
                    .context("spawning the acker")?;
                (Some(tx), Some(join))
            }
        };

        // Resequencer.
        let (out_tx, out_rx) = bounded::<ShardBatch>(q * shards);
        let reseq = std::thread::Builder::new()
            .name("resequencer".into())
            .spawn(move || resequence(out_rx, shards, sink_txs))
            .context("spawning the resequencer")?;

        // Shards.
        let mut shard_txs = Vec::new();
        let mut shard_joins = Vec::new();
        for i in 0..shards {
            let (tx, rx) = bounded::<ShardBatch>(q);
            let out = out_tx.clone();
            let latest = latest.clone();
            let window = (cfg.dedup_frames / shards).max(1);
            shard_joins.push(
                std::thread::Builder::new()
                    .name(format!("shard-{i}"))
                    .spawn(move || shard_loop(rx, out, Dedup::new(window), latest))
                    .context("spawning a shard")?,
            );
            shard_txs.push(tx);
        }
        drop(out_tx);

        let (intake, intake_rx) = mpsc::channel::<Submission>(cfg.intake_entries.max(1));
        let group_entries = cfg.group_entries.max(1);
        let linger = cfg.group_linger;
        let draining = Arc::new(AtomicBool::new(false));
        let writer_draining = draining.clone();
        let writer = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || {
                let mut w = Writer {
                    wal,
                    draining: writer_draining,
                    shard_txs,
                    durables,
                    acker: acker_tx,
                    next_group: 0,
                    capacity: intake_rx.max_capacity(),
                };
                w.replay()?;
                w.run(intake_rx, group_entries, linger)
            })
            .context("spawning the log writer")?;
        Ok(Pipeline { intake, draining, writer, shards: shard_joins, reseq, sinks: handles, acker })
    }

    /// Tells the log writer the instance is draining: should the log be full, queued entries are
    /// refused at once instead of waiting for room that may never come.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Waits for the drain: call after every intake clone (sources, API) is dropped.
    pub fn join(self) -> anyhow::Result<()> {
        let Pipeline { intake, writer, shards, reseq, sinks, acker, .. } = self;
        drop(intake);
        let written = writer.join().map_err(|_| anyhow::anyhow!("log writer panicked"))?;
        for s in shards {
            s.join().map_err(|_| anyhow::anyhow!("a shard panicked"))?;
        }
        reseq.join().map_err(|_| anyhow::anyhow!("resequencer panicked"))?;
        for s in sinks {
            let name = s.name;
            s.join().with_context(|| format!("sink {name} failed"))?;
        }
        if let Some(acker) = acker {
            acker.join().map_err(|_| anyhow::anyhow!("acker panicked"))?;
        }
        written
    }
}

struct Writer {
    wal: Wal,
    /// Set when the instance starts draining.
    draining: Arc<AtomicBool>,
    shard_txs: Vec<Sender<ShardBatch>>,
    durables: Vec<Arc<AtomicU64>>,
    /// Set when acknowledgements wait for the sinks.
    acker: Option<Sender<(Lsn, Completion)>>,
    next_group: u64,
    capacity: usize,
}

impl Writer {
    fn min_durable(&self) -> Lsn {
        self.durables.iter().map(|d| d.load(Ordering::Acquire)).min().unwrap_or(Lsn::MAX)
    }

    /// Feeds the retained log to the shards in groups.
    fn replay(&mut self) -> anyhow::Result<()> {
        let from = self.wal.first_lsn();
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
            if pending.len() >= 256 {
                groups.push((last, std::mem::take(&mut pending)));
            }
        })?;
        if !pending.is_empty() {
            groups.push((last, pending));
        }
        for (lsn, entries) in groups {
            self.dispatch(lsn, entries)?;
        }
        if records > 0 {
            tracing::info!(from, records, "write-ahead log replayed");
        }
        Ok(())
    }

    fn run(
        &mut self,
        mut rx: mpsc::Receiver<Submission>,
        group_entries: usize,
        linger: Duration,
    ) -> anyhow::Result<()> {
        let mut batch: Vec<Submission> = Vec::with_capacity(group_entries);
        loop {
            // Bounded disk: wait for sinks to release segments before taking more.
            self.release()?;
            while self.wal.is_full() {
                metrics::gauge!("fleetpipe_wal_full").set(1.0);
                if self.draining.load(Ordering::Acquire) || rx.is_closed() {
                    // Draining with a full log: what is queued cannot be made durable. Its
                    // sources learn so at once (MQTT withholds the acks, HTTP answers 503), so
                    // that they can finish and let go of the intake.
                    while let Ok(s) = rx.try_recv() {
                        if let Some(done) = s.done {
                            done(Err(NotDurable::ShuttingDown));
                        }
                    }
                    if rx.is_closed() {
                        tracing::warn!("write-ahead log full while draining; queued entries refused");
                        return Ok(());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
                self.release()?;
            }
            metrics::gauge!("fleetpipe_wal_full").set(0.0);
            batch.clear();
            if rx.blocking_recv_many(&mut batch, group_entries) == 0 {
                break;
            }
            linger_for_more(&mut rx, &mut batch, group_entries, linger);
            metrics::gauge!("fleetpipe_queue_depth", "stage" => "intake")
                .set((rx.len() + batch.len()) as f64);
            metrics::gauge!("fleetpipe_queue_capacity", "stage" => "intake").set(self.capacity as f64);
            self.commit(&mut batch)?;
        }
        self.release()?;
        tracing::info!(next_lsn = self.wal.next_lsn(), "log writer drained");
        Ok(())
    }

    fn release(&mut self) -> anyhow::Result<()> {
        let durable = self.min_durable();
        if durable > 0 {
            self.wal.release_through(durable)?;
        }
        metrics::gauge!("fleetpipe_wal_bytes").set(self.wal.bytes() as f64);
        Ok(())
    }

    fn commit(&mut self, batch: &mut Vec<Submission>) -> anyhow::Result<()> {
        let payloads: Vec<Vec<u8>> = batch.iter().map(|s| record::encode(&s.entry)).collect();
        let started = Instant::now();
        let first = match self.wal.append_group(&payloads) {
            Ok(first) => first,
            Err(e) => {
                tracing::error!(error = %e, entries = batch.len(), "log append failed");
                for s in batch.drain(..) {
                    if let Some(done) = s.done {
                        done(Err(NotDurable::Log(e.to_string())));
                    }
                }
                // The log is the durability point: without it nothing can be acknowledged.
                return Err(e.into());
            }
        };
        metrics::histogram!("fleetpipe_sink_write_seconds", "sink" => "wal")
            .record(started.elapsed().as_secs_f64());
        let last = first + batch.len() as u64 - 1;
        let mut entries = Vec::with_capacity(batch.len());
        let mut accepted = [0u64; 2];
        let mut rejected: HashMap<&'static str, u64> = HashMap::new();
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
            }
            for r in &s.entry.rejections {
                *rejected.entry(r.reason.code()).or_default() += 1;
            }
            entries.push(s.entry);
        }
        let frames = accepted[0] + accepted[1];
        metrics::counter!("fleetpipe_frames_accepted_total", "kind" => "location").increment(accepted[0]);
        metrics::counter!("fleetpipe_frames_accepted_total", "kind" => "diagnostic").increment(accepted[1]);
        for (reason, n) in rejected {
            metrics::counter!("fleetpipe_frames_rejected_total", "reason" => reason).increment(n);
        }
        metrics::counter!("fleetpipe_frames_written_total", "sink" => "wal").increment(frames);
        self.dispatch(last, entries)
    }

    /// Splits a group over the shards: every shard gets its part, possibly empty.
    fn dispatch(&mut self, lsn: Lsn, entries: Vec<Entry>) -> anyhow::Result<()> {
        let n = self.shard_txs.len();
        let mut parts: Vec<ShardBatch> = (0..n)
            .map(|_| ShardBatch { group: self.next_group, lsn, frames: Vec::new(), rejections: Vec::new() })
            .collect();
        for e in entries {
            if let Some(first) = parts.first_mut() {
                first.rejections.extend(e.rejections);
            }
            for f in e.frames {
                let s = shard_of(&f.vehicle_id, n);
                if let Some(p) = parts.get_mut(s) {
                    p.frames.push(f);
                }
            }
        }
        self.next_group += 1;
        let mut depth = 0;
        for (tx, part) in self.shard_txs.iter().zip(parts) {
            depth += tx.len();
            tx.send(part).map_err(|_| anyhow::anyhow!("a shard stopped"))?;
        }
        metrics::gauge!("fleetpipe_queue_depth", "stage" => "shards").set(depth as f64);
        metrics::gauge!("fleetpipe_queue_capacity", "stage" => "shards")
            .set(self.shard_txs.iter().filter_map(|t| t.capacity()).sum::<usize>() as f64);
        Ok(())
    }
}

/// Acknowledges each entry once every durable sink holds it (`ack = "sinks"`), in log order.
/// An entry a stopped sink can no longer store is answered as not durable.
fn ack_when_stored(rx: Receiver<(Lsn, Completion)>, sinks: Vec<(Arc<AtomicU64>, Arc<AtomicBool>)>) {
    let mut pending: std::collections::VecDeque<(Lsn, Completion)> = std::collections::VecDeque::new();
    let mut open = true;
    while open || !pending.is_empty() {
        match rx.recv_timeout(Duration::from_millis(1)) {
            Ok(item) => {
                pending.push_back(item);
                pending.extend(rx.try_iter());
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => open = false,
        }
        let stored = sinks.iter().map(|(d, _)| d.load(Ordering::Acquire)).min().unwrap_or(Lsn::MAX);
        while pending.front().is_some_and(|(lsn, _)| *lsn <= stored) {
            if let Some((lsn, done)) = pending.pop_front() {
                done(Ok(lsn));
            }
        }
        if !pending.is_empty() && sinks.iter().any(|(_, alive)| !alive.load(Ordering::Acquire)) {
            // Re-read: a sink that closed normally made everything durable before it ended.
            let stored = sinks.iter().map(|(d, _)| d.load(Ordering::Acquire)).min().unwrap_or(Lsn::MAX);
            for (lsn, done) in pending.drain(..) {
                if lsn <= stored {
                    done(Ok(lsn));
                } else {
                    done(Err(NotDurable::Log("a sink stopped before storing the entry".into())));
                }
            }
        }
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

fn shard_loop(rx: Receiver<ShardBatch>, out: Sender<ShardBatch>, mut dedup: Dedup, latest: LatestCache) {
    for mut batch in rx {
        let dups = dedup.retain_new(&mut batch.frames);
        if dups > 0 {
            metrics::counter!("fleetpipe_frames_duplicate_total").increment(dups as u64);
        }
        if !batch.frames.is_empty() {
            latest.apply(&batch.frames);
        }
        if out.send(batch).is_err() {
            return;
        }
    }
}

fn resequence(rx: Receiver<ShardBatch>, shards: usize, sinks: Vec<(SinkFeed, Lsn)>) {
    // group → (parts still missing, merged batch)
    let mut pending: BTreeMap<u64, (usize, SinkBatch)> = BTreeMap::new();
    let mut next = 0u64;
    for part in rx.iter() {
        let slot = pending
            .entry(part.group)
            .or_insert_with(|| (shards, SinkBatch { lsn: part.lsn, ..Default::default() }));
        slot.0 -= 1;
        slot.1.frames.extend(part.frames);
        slot.1.rejections.extend(part.rejections);
        while pending.get(&next).is_some_and(|(missing, _)| *missing == 0) {
            let Some((_, batch)) = pending.remove(&next).map(|(_, b)| ((), b)) else { break };
            next += 1;
            record_lag(&batch);
            let batch = Arc::new(batch);
            for (feed, from) in &sinks {
                // During replay a sink only gets what lies past its own checkpoint.
                if batch.lsn > *from && !feed.offer(&batch) {
                    tracing::error!(sink = feed.name, "a sink stopped; its queue is closed");
                }
            }
        }
        metrics::gauge!("fleetpipe_queue_depth", "stage" => "resequencer").set(rx.len() as f64);
        metrics::gauge!("fleetpipe_queue_capacity", "stage" => "resequencer")
            .set(rx.capacity().unwrap_or(0) as f64);
    }
}

/// One observation per batch: how far behind event time the batch is (its newest frame).
fn record_lag(batch: &SinkBatch) {
    if let Some(newest) = batch.frames.iter().map(|f| f.ts).max() {
        let now = fleetpipe_ingest::now_micros();
        metrics::histogram!("fleetpipe_event_lag_seconds").record((now - newest) as f64 / 1e6);
    }
}

/// Frames remembered while a sink catches up from the log, to drop redeliveries as the shards
/// would have (at most; the pipeline's own window is used when smaller).
const CATCH_UP_DEDUP_FRAMES: usize = 262_144;
/// Frames (and rejections) per batch handed to a sink while it catches up.
const CATCH_UP_BATCH: usize = 8_192;

/// The log, read back for a sink that fell behind: the same frames the shards would have passed
/// (de-duplicated over the range read), in log order, in bounded batches.
struct LogBacklog {
    dir: std::path::PathBuf,
    dedup_frames: usize,
}

impl Backlog for LogBacklog {
    fn replay(
        &self,
        after: Lsn,
        through: Lsn,
        f: &mut dyn FnMut(SinkBatch) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        let mut dedup = Dedup::new(self.dedup_frames);
        let mut batch = SinkBatch::default();
        wal::read_range(&self.dir, after, through, |lsn, payload| -> Result<(), SinkError> {
            match record::decode(payload) {
                Ok(entry) => {
                    let mut frames = entry.frames;
                    dedup.retain_new(&mut frames);
                    batch.frames.extend(frames);
                    batch.rejections.extend(entry.rejections);
                }
                Err(e) => tracing::error!(lsn, error = %e, "undecodable log record skipped"),
            }
            batch.lsn = lsn;
            if batch.frames.len() + batch.rejections.len() >= CATCH_UP_BATCH {
                f(std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
        if batch.lsn > after {
            f(batch)?;
        }
        Ok(())
    }
}
