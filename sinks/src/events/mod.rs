//! The events sinks: each runs the event engine ([`fleetpipe_processors::events`]) over the
//! log, in log order like every sink, and commits what it derives to one output together with
//! the engine's state and the log position they cover: [`files`] (Parquet `events/` and
//! `trips/`, and the [`EventStore`] the HTTP API reads), [`postgres`] (the `vehicle_events`
//! and `trips` tables, state and position in the same transaction) and [`kafka`] (the
//! `vehicle-events` topic, at-least-once).
//!
//! After a crash an output's last commit gives the state and the position; the log replays
//! what came after, so exactly the events not yet committed are derived again, with the same
//! ids (see the engine). Each output runs an engine of its own: one that falls behind (a
//! database down) catches up from the log without holding the others back.

pub mod files;
pub mod kafka;
pub mod postgres;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleetpipe_pipeline::event_store::EventStore;
use fleetpipe_pipeline::{Sink, SinkError};
use fleetpipe_processors::events::{event_json, trip_json, Engine, Event, EventRules, What};
use fleetpipe_processors::{Batch, Lsn, Micros};

use crate::{Error, Result};

/// How an events sink runs.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    pub rules: EventRules,
    /// Commits (rows or files, state, position) at most this often.
    pub commit_every: Duration,
}

/// Where an events sink commits.
pub trait EventOutput: Send {
    /// The sink's name (the `sink` label of metrics).
    fn name(&self) -> &'static str;
    /// The position and the engine's state of the last commit (taken once, at open).
    fn committed(&mut self) -> (Lsn, Option<Vec<u8>>);
    /// Makes `events` durable with the engine's `state` after the batch at `lsn`, at once.
    fn commit(&mut self, lsn: Lsn, events: &[Event], state: &State<'_>) -> Result<()>;
}

/// The engine's state as an output commits it: streamed into a file, or as bytes.
pub struct State<'a>(&'a Engine);

impl State<'_> {
    /// Creates `path` with `header` and then the state (JSON), streamed through a 1 MiB buffer
    /// (never all of it in memory), and fsyncs it.
    pub fn write_file(&self, path: &std::path::Path, header: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        w.write_all(header)?;
        self.0.snapshot_to(&mut w)?;
        w.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()
    }

    /// The state as bytes (for an output that stores it in one value).
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.snapshot()
    }
}

/// An engine over the log and the output it commits to.
pub struct EventsSink {
    engine: Engine,
    output: Box<dyn EventOutput>,
    /// Filled as events are derived (before they are committed), when this sink serves HTTP.
    store: Option<EventStore>,
    commit_every: Duration,
    durable: Lsn,
    /// The last batch taken.
    seen: Lsn,
    /// Derived since the last commit.
    pending: Vec<Event>,
    out: Vec<Event>,
    last_commit: Instant,
    /// Vehicles whose trip under way changed since the store last heard of it.
    dirty: foldhash::HashSet<String>,
    last_refresh: Instant,
    /// When the engine last looked at every vehicle (lateness, gaps, offline), and how long
    /// to wait before the next look.
    last_sweep: Instant,
    sweep_every: Duration,
    /// How long to wait between commits: `commit_every`, or longer when the state is large.
    commit_gap: Duration,
}

/// The engine's sweep over every vehicle (buffered frames past the lateness bound, gaps,
/// vehicles gone offline) runs at most this often, and takes at most a twentieth of the
/// sink's time: at a million vehicles a sweep costs tens of milliseconds, which after every
/// batch would cost more than the batch.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// A sweep or a snapshot of the state may take at most 1/`PACE` of the time between two.
const PACE: u32 = 20;

/// How stale the store's trip under way may get under load: it is rebuilt (as JSON) at most this
/// often per vehicle instead of after every batch that moved the vehicle.
const OPEN_TRIP_REFRESH: Duration = Duration::from_millis(100);

impl std::fmt::Debug for EventsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsSink")
            .field("output", &self.output.name())
            .field("durable", &self.durable)
            .field("seen", &self.seen)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// The Kafka events sink (topic `vehicle-events`).
pub fn open_kafka(cfg: &EventsConfig, kafka: &kafka::KafkaEventsConfig) -> Result<EventsSink> {
    EventsSink::new(cfg, Box::new(kafka::open(kafka)?), None)
}

/// The Postgres events sink (tables `vehicle_events` and `trips`).
pub fn open_postgres(cfg: &EventsConfig, pg: &crate::postgres::PostgresConfig) -> Result<EventsSink> {
    EventsSink::new(cfg, Box::new(postgres::open(pg)?), None)
}

/// The Parquet events sink, which also fills `store` (from its files at open, then as it derives).
pub fn open_files(cfg: &EventsConfig, root: &std::path::Path, store: EventStore) -> Result<EventsSink> {
    let output = files::open(root, &store)?;
    EventsSink::new(cfg, Box::new(output), Some(store))
}

impl EventsSink {
    /// Restores the engine from the output's last commit.
    pub fn new(
        cfg: &EventsConfig,
        mut output: Box<dyn EventOutput>,
        store: Option<EventStore>,
    ) -> Result<EventsSink> {
        let (durable, state) = output.committed();
        let engine = match state {
            Some(bytes) => Engine::restore(cfg.rules.clone(), &bytes).map_err(|detail| {
                Error::Config(format!("{}: the saved event state is unreadable: {detail}", output.name()))
            })?,
            None => Engine::new(cfg.rules.clone()),
        };
        tracing::info!(
            sink = output.name(),
            lsn = durable,
            vehicles = engine.vehicles(),
            "opened events sink"
        );
        Ok(EventsSink {
            engine,
            output,
            store,
            commit_every: cfg.commit_every,
            durable,
            seen: durable,
            pending: Vec::new(),
            out: Vec::new(),
            last_commit: Instant::now(),
            dirty: foldhash::HashSet::default(),
            last_refresh: Instant::now(),
            last_sweep: Instant::now(),
            sweep_every: SWEEP_EVERY,
            commit_gap: cfg.commit_every,
        })
    }

    /// Hands what the engine derived to the store and the next commit; counts it.
    fn take_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut completed = Vec::new();
        for e in self.out.drain(..) {
            *counts.entry(e.what.type_name()).or_default() += 1;
            if let Some(store) = &self.store {
                record_event_json(store, event_json(&e), true);
                if let What::TripCompleted(t) = &e.what {
                    record_trip_json(store, trip_json(t));
                    completed.push(t.vehicle_id.clone());
                }
            }
            self.pending.push(e);
        }
        if let Some(store) = &self.store {
            for vid in completed {
                store.set_open_trip(&vid, self.engine.open_trip(&vid));
            }
            // Counted once, by the sink that serves HTTP.
            for (kind, n) in counts {
                metrics::counter!("fleetpipe_events_total", "type" => kind).increment(n);
            }
        }
    }

    /// Tells the store the trip under way of every vehicle moved since the last refresh.
    fn refresh_open_trips(&mut self) {
        self.last_refresh = Instant::now();
        let Some(store) = &self.store else {
            self.dirty.clear();
            return;
        };
        for vid in self.dirty.drain() {
            store.set_open_trip(&vid, self.engine.open_trip(&vid));
        }
    }

    fn commit(&mut self) -> Result<()> {
        if self.seen == self.durable && self.pending.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        self.output.commit(self.seen, &self.pending, &State(&self.engine))?;
        self.durable = self.seen;
        self.pending.clear();
        self.last_commit = Instant::now();
        // The state is a snapshot of every vehicle: a large fleet commits less often, so that
        // committing stays a small share of the sink's time.
        self.commit_gap = self.commit_every.max(started.elapsed() * PACE);
        Ok(())
    }
}

impl Sink for EventsSink {
    fn name(&self) -> &'static str {
        self.output.name()
    }

    fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    fn write(&mut self, batch: &Batch) -> std::result::Result<(), SinkError> {
        for f in &batch.frames {
            self.engine.push(f, &mut self.out);
            if self.store.is_some() && !self.dirty.contains(f.vehicle_id.as_str()) {
                self.dirty.insert(f.vehicle_id.clone());
            }
        }
        if self.last_refresh.elapsed() >= OPEN_TRIP_REFRESH {
            self.refresh_open_trips();
        }
        if self.store.is_some() {
            let late = self.engine.take_late();
            if late > 0 {
                metrics::counter!("fleetpipe_frames_late_for_events_total").increment(late);
            }
        }
        self.take_out();
        self.seen = batch.lsn;
        Ok(())
    }

    fn tick(&mut self, _now: Instant) -> std::result::Result<(), SinkError> {
        if self.last_sweep.elapsed() >= self.sweep_every {
            let started = Instant::now();
            self.refresh_open_trips();
            self.engine.tick(fleetpipe_pipeline::now_micros(), &mut self.out);
            self.take_out();
            if self.store.is_some() {
                // A count over every vehicle: once a sweep, not once a batch.
                metrics::gauge!("fleetpipe_trips_open").set(self.engine.open_trips() as f64);
            }
            self.last_sweep = Instant::now();
            self.sweep_every = SWEEP_EVERY.max(started.elapsed() * PACE);
        }
        if self.last_commit.elapsed() >= self.commit_gap {
            self.commit()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::result::Result<(), SinkError> {
        self.refresh_open_trips();
        Ok(self.commit()?)
    }
}

fn ts_of(v: &serde_json::Value, key: &str) -> Micros {
    v[key].as_str().and_then(fleetpipe_processors::time::parse_rfc3339).unwrap_or_default()
}

pub(crate) fn record_event_json(store: &EventStore, e: serde_json::Value, live: bool) {
    let kind = What::TYPES.iter().copied().find(|t| Some(*t) == e["type"].as_str()).unwrap_or("unknown");
    let vid = e["vehicle_id"].as_str().unwrap_or_default().to_owned();
    let id = e["event_id"].as_str().unwrap_or_default().to_owned();
    store.record_event(&vid, ts_of(&e, "ts"), &id, kind, e, live);
}

pub(crate) fn record_trip_json(store: &EventStore, t: serde_json::Value) {
    let vid = t["vehicle_id"].as_str().unwrap_or_default().to_owned();
    let id = t["trip_id"].as_str().unwrap_or_default().to_owned();
    let start = ts_of(&t["start"], "ts");
    store.record_trip(&vid, start, &id, t);
}
