//! fleetpipe's pipeline core: everything between a source handing over an entry and a sink
//! making it durable.
//!
//! ```text
//! sources → intake (bounded) → log writer: group commit + fsync, then acks →
//!   shards (by vehicle): stages (de-duplicate, latest state, events) → resequencer (log order)
//!   → one queue per sink → sink drivers → sinks
//! ```
//!
//! - [`entry`]: what a source submits ([`Entry`], [`Submission`]) and how it hears that it is
//!   durable ([`Completion`]).
//! - [`source`]: the [`Source`] trait and the set of running [`Sources`].
//! - [`sink`]: the [`Sink`] trait and [`SinkError`], which says retry, give up, or divert.
//! - [`wal`]: the write-ahead log; the log record format and the writer are private.
//! - [`driver`]: the one loop that runs any sink (batching, timers, retries, catching up from
//!   the log, poison frames, metrics).
//!
//! Every stage is a thread joined to the next by a bounded queue (lock-free on the fast path);
//! a full queue blocks the stage before it, up to the intake, which the sources see as
//! pushback. The resequencer never waits for a sink: a slow or failed sink is skipped and reads
//! what it missed back from the log, so it costs disk (up to `wal.max_mib`), not throughput.
//! At start the log is replayed from its oldest retained record: shards see all of it (which
//! refills de-duplication windows and latest state), each sink only what lies past its
//! checkpoint.
//!
//! - [`tls`]: the TLS client settings every connection to a service shares.
//!
//! This crate knows no source or sink technology: it depends on `fleetpipe-processors` (and
//! rustls, for [`tls`]) only.

mod acker;
mod backlog;
pub mod driver;
pub mod entry;
pub mod event_store;
mod record;
mod shard;
pub mod sink;
pub mod source;
pub mod throttle;
pub mod tls;
pub mod trace;
pub mod wal;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::bounded;
use fleetpipe_processors::{Lsn, Stage};
use serde::Deserialize;
use tokio::sync::mpsc;

pub use entry::{count_received, now_micros, Completion, Entry, Intake, NotDurable, Submission};
pub use sink::{BoxError, Poison, Sink, SinkError};
pub use source::{Pushback, Readiness, Ready, Shutdown, Source, SourceContext, Sources};
pub use throttle::Throttle;

use driver::{DriverConfig, SinkHandle};
use wal::{Wal, WalConfig};

/// Failures of the pipeline itself (not of a frame: frames never fail it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("{0} stopped")]
    Stopped(&'static str),
    #[error("{0} panicked")]
    Panicked(&'static str),
    #[error("could not start the {what} thread: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("sink {sink} failed: {source}")]
    Sink {
        sink: &'static str,
        #[source]
        source: SinkError,
    },
    #[error("source {source_name} failed: {error}")]
    Source { source_name: &'static str, error: BoxError },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// When acknowledgements go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Once the entry is in fleetpipe's fsync'd log (the default).
    Log,
    /// Once every durable sink holds it as well.
    Sinks,
}

/// `[pipeline]`: sizing of the stages.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Shard workers (0: one per core).
    pub shards: usize,
    /// Capacity of each inter-stage queue, in batches.
    pub queue_batches: usize,
    /// Capacity of the intake in front of the log, in entries.
    pub intake_entries: usize,
    /// Recent frames remembered for de-duplication (all vehicles, all shards): about 40 bytes
    /// each, a fixed memory cost.
    pub dedup_frames: usize,
    /// When MQTT acks and HTTP 200s go out: once the entry is in fleetpipe's fsync'd log
    /// (`log`, the default), or once every durable sink holds it as well (`sinks`).
    pub ack: AckMode,
    /// With `ack = "sinks"`: how often sinks that hold unflushed data are flushed (ms). Each
    /// flush closes the open Parquet files, so shorter means faster acks and more files.
    pub ack_flush_ms: f64,
    /// `validate.max_ahead_s` in microseconds, for `fleetpipe_frames_clock_ahead_total`.
    #[serde(skip)]
    pub max_ahead_us: i64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            shards: 0,
            queue_batches: 64,
            intake_entries: 256,
            dedup_frames: 1 << 20,
            ack: AckMode::Log,
            ack_flush_ms: 100.0,
            max_ahead_us: fleetpipe_processors::validate::Rules::default().max_ahead_us,
        }
    }
}

impl PipelineConfig {
    /// The shard count: as configured, or one per core.
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

/// Which shard a stage instance serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub of: usize,
}

/// Makes one instance of a stage for each shard.
pub type StageFactory = Box<dyn Fn(Shard) -> Box<dyn Stage> + Send>;

/// How often a sink's `tick` runs when no batch arrives.
const SINK_TICK: Duration = Duration::from_millis(100);

/// The running pipeline. [`Pipeline::join`] drains it once every intake clone is dropped.
pub struct Pipeline {
    pub intake: Intake,
    /// On while the log cannot be written.
    pub pushback: source::Pushback,
    draining: Arc<AtomicBool>,
    writer: JoinHandle<Result<()>>,
    shards: Vec<JoinHandle<()>>,
    reseq: JoinHandle<()>,
    sinks: Vec<SinkHandle>,
    acker: Option<JoinHandle<()>>,
}

/// Decodes one write-ahead log record as the replay does: the number of frames and rejections
/// it holds, or why it is not a record fleetpipe wrote. For the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub fn decode_log_record(payload: &[u8]) -> std::result::Result<(usize, usize), String> {
    record::decode(payload).map(|e| (e.frames.len(), e.rejections.len())).map_err(|e| e.to_string())
}

fn spawn<T: Send + 'static>(
    what: &'static str,
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name).spawn(f).map_err(|source| Error::Spawn { what, source })
}

/// Every counter of the pipeline at 0 from the start, so that `/metrics` (and a dashboard's
/// `rate()`) has every series before the first frame: accepted by kind, rejected by reason,
/// written by sink (and the log), duplicates. `Sources::spawn` zeroes each source's
/// `frames_received_total`.
fn zero_counters<'a>(sinks: impl Iterator<Item = &'a str>) {
    for kind in ["location", "diagnostic"] {
        metrics::counter!("fleetpipe_frames_accepted_total", "kind" => kind).increment(0);
    }
    for reason in fleetpipe_processors::Reason::ALL {
        metrics::counter!("fleetpipe_frames_rejected_total", "reason" => reason.code()).increment(0);
    }
    for sink in sinks.map(str::to_owned).chain(["wal".to_owned()]) {
        metrics::counter!("fleetpipe_frames_written_total", "sink" => sink).increment(0);
    }
    metrics::counter!("fleetpipe_frames_duplicate_total").increment(0);
}

impl Pipeline {
    /// Opens the log under `{data_dir}/_fleetpipe/wal`, starts every stage (each factory makes
    /// one instance per shard, applied in the order given) and sink, and replays what the sinks
    /// still lack.
    pub fn start(
        cfg: &PipelineConfig,
        wal_cfg: &WalConfig,
        data_dir: &Path,
        stages: Vec<StageFactory>,
        sinks: Vec<Box<dyn Sink>>,
    ) -> Result<Pipeline> {
        let layout = wal_cfg.layout(data_dir.join("_fleetpipe").join("wal"));
        let dir = layout.dir.clone();
        let wal = Wal::open(layout)?;
        let shards = cfg.shard_count();
        let q = cfg.queue_batches.max(1);
        let ack_after_sinks =
            (cfg.ack == AckMode::Sinks).then(|| Duration::from_secs_f64(cfg.ack_flush_ms.max(0.0) / 1000.0));

        let (intake, intake_rx) = mpsc::channel::<Submission>(cfg.intake_entries.max(1));
        let (divert_tx, diversions) = crossbeam_channel::unbounded();
        let log = Arc::new(backlog::PipelineLog {
            dir,
            dedup_frames: cfg.dedup_frames.clamp(1, backlog::CATCH_UP_DEDUP_FRAMES),
            divert: writer::DivertLane { tx: divert_tx, wake: intake.downgrade() },
        });

        let draining = Arc::new(AtomicBool::new(false));
        // Sinks, each behind its own queue, catching up from the log when they fall behind.
        let mut feeds = Vec::new();
        let mut handles = Vec::new();
        zero_counters(sinks.iter().map(|s| s.name()));
        for sink in sinks {
            let from = sink.durable_lsn();
            tracing::info!(sink = sink.name(), durable_lsn = from, "sink opened");
            let dcfg = DriverConfig { queue: q, tick: SINK_TICK, flush_every: ack_after_sinks };
            let (handle, feed) = driver::spawn_draining(sink, dcfg, log.clone(), draining.clone());
            handles.push(handle);
            feeds.push((feed, from));
        }
        // Only the drivers hold the diversion lane: the writer's drain ends when they do.
        drop(log);
        let durables: Vec<Arc<AtomicU64>> = handles.iter().map(|h| h.durable.clone()).collect();
        let taken = handles.iter().map(|h| (h.taken.clone(), h.alive.clone())).collect();
        let (acker_tx, acker) = match ack_after_sinks {
            None => (None, None),
            Some(_) => {
                let watched: Vec<_> = handles
                    .iter()
                    .filter(|h| h.is_durable)
                    .map(|h| (h.durable.clone(), h.alive.clone()))
                    .collect();
                let (tx, rx) = bounded::<(Lsn, Completion)>(cfg.intake_entries.max(1) * 4);
                let join = spawn("acker", "acker".into(), move || acker::ack_when_stored(rx, watched))?;
                (Some(tx), Some(join))
            }
        };

        let (out_tx, out_rx) = bounded::<shard::Part>(q * shards);
        let reseq =
            spawn("resequencer", "resequencer".into(), move || shard::resequence(out_rx, shards, feeds))?;

        let mut shard_txs = Vec::new();
        let mut shard_joins = Vec::new();
        for index in 0..shards {
            let (tx, rx) = bounded::<shard::Part>(q);
            let out = out_tx.clone();
            let instances: Vec<Box<dyn Stage>> =
                stages.iter().map(|make| make(Shard { index, of: shards })).collect();
            shard_joins.push(spawn("shard", format!("shard-{index}"), move || {
                shard::run_shard(rx, out, instances)
            })?);
            shard_txs.push(tx);
        }
        drop(out_tx);

        let pushback = source::Pushback::default();
        let mut w = writer::Writer {
            wal,
            draining: draining.clone(),
            dispatch: shard::Dispatch::new(shard_txs),
            durables,
            taken,
            acker: acker_tx,
            diversions,
            capacity: intake_rx.max_capacity(),
            group_entries: wal_cfg.group_entries.max(1),
            linger: wal_cfg.group_linger(),
            max_ahead_us: cfg.max_ahead_us,
            pushback: pushback.clone(),
        };
        let writer = spawn("log writer", "wal-writer".into(), move || {
            w.replay()?;
            w.run(intake_rx)
        })?;
        Ok(Pipeline { intake, pushback, draining, writer, shards: shard_joins, reseq, sinks: handles, acker })
    }

    /// Tells the log writer the instance is draining: should the log be full, queued entries are
    /// refused at once instead of waiting for room that may never come.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Waits for the drain: call after every intake clone (sources, API) is dropped.
    pub fn join(self) -> Result<()> {
        let Pipeline { intake, writer, shards, reseq, sinks, acker, .. } = self;
        drop(intake);
        let written = writer.join().map_err(|_| Error::Panicked("log writer"))?;
        for s in shards {
            s.join().map_err(|_| Error::Panicked("a shard"))?;
        }
        reseq.join().map_err(|_| Error::Panicked("resequencer"))?;
        for s in sinks {
            let sink = s.name;
            s.join().map_err(|source| Error::Sink { sink, source })?;
        }
        if let Some(acker) = acker {
            acker.join().map_err(|_| Error::Panicked("acker"))?;
        }
        written
    }
}
