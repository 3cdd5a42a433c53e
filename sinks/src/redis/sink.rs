//! The L2 sink: writes each batch's newest frame per vehicle and kind in one pipeline, behind a
//! circuit breaker (see the module documentation of [`super`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fleetpipe_pipeline::{Sink, SinkError};
use fleetpipe_processors::{Batch, Frame, Lsn};
use redis::{Client, Connection, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind};

use super::{
    cache_error_counter, client_name, connect, fold_in, is_newer, is_redis_away, open_client, slot,
    ttl_millis, update_cmd, Keys, RedisConfig, Reduced, PRUNE_SCRIPT, SINK_NAME, WRITE_SCRIPT,
};
use crate::Result;

/// Largest number of script calls sent in one pipeline (a refill after an outage may hold many
/// vehicles; a normal batch is far below it and takes one round trip).
const MAX_CALLS_PER_PIPELINE: usize = 10_000;

/// How often `tick` drops expired vehicles from the geo set, and how many per script call.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_LIMIT: usize = 1_000;

/// Counters of a sink since it was opened (also exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisL2Stats {
    /// Vehicles whose state moved forward in Redis.
    pub vehicles_written: u64,
    /// Redis errors: at most one per breaker period while Redis is away, plus commands Redis
    /// refused (counted once per batch).
    pub errors: u64,
    /// Times the breaker opened (including failed probes).
    pub breaker_trips: u64,
    /// Vehicles not remembered for the refill because the pending set was full.
    pub refill_dropped: u64,
    /// Vehicles now remembered for the refill.
    pub pending_vehicles: usize,
    /// Whether Redis is being skipped now.
    pub breaker_open: bool,
}

/// The L2 sink. See the module documentation.
pub struct RedisL2Sink {
    cfg: RedisConfig,
    client: Client,
    client_name: String,
    conn: Option<Connection>,
    /// Whether `conn` has served a call before (and so may have gone stale: idle timeout,
    /// Redis restart), which earns a failed call one retry on a new connection.
    conn_used: bool,
    keys: Keys,
    write_script: Script,
    prune_script: Script,
    /// `Some(until)`: Redis is skipped until then, then probed.
    open_until: Option<Instant>,
    /// Newest skipped frames per vehicle while the breaker was open.
    pending: HashMap<String, [Option<Frame>; 2]>,
    durable: Lsn,
    last_prune: Option<Instant>,
    stats: RedisL2Stats,
    written_total: metrics::Counter,
    errors_total: metrics::Counter,
    refill_dropped_total: metrics::Counter,
    breaker_gauge: metrics::Gauge,
}

impl std::fmt::Debug for RedisL2Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisL2Sink")
            .field("prefix", &self.cfg.prefix)
            .field("durable", &self.durable)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RedisL2Sink {
    /// Opens the sink. Fails only on an invalid URL: an unreachable Redis opens the breaker
    /// (and is counted), so that fleetpipe starts and runs without its cache.
    pub fn open(cfg: RedisConfig) -> Result<RedisL2Sink> {
        let client = open_client(&cfg)?;
        let keys = Keys::new(&cfg.prefix);
        let mut sink = RedisL2Sink {
            client,
            client_name: client_name("sink", &cfg.prefix),
            conn: None,
            conn_used: false,
            keys,
            write_script: Script::new(WRITE_SCRIPT),
            prune_script: Script::new(PRUNE_SCRIPT),
            open_until: None,
            pending: HashMap::new(),
            durable: 0,
            last_prune: None,
            stats: RedisL2Stats::default(),
            written_total: metrics::counter!("fleetpipe_frames_written_total", "sink" => SINK_NAME),
            errors_total: cache_error_counter(),
            refill_dropped_total: metrics::counter!("fleetpipe_cache_refill_dropped_total", "tier" => "l2"),
            breaker_gauge: metrics::gauge!("fleetpipe_cache_breaker_open", "tier" => "l2"),
            cfg,
        };
        sink.breaker_gauge.set(0.0);
        let ready = connect(&sink.client, sink.cfg.io_timeout, &sink.client_name)
            .and_then(|mut c| sink.write_script.load(&mut c).map(|_| c));
        match ready {
            Ok(conn) => sink.conn = Some(conn),
            Err(e) => sink.fail(&e, Instant::now(), "connect"),
        }
        Ok(sink)
    }

    /// Opens the circuit breaker now: Redis is skipped for `breaker_open_for`, frames meanwhile
    /// are remembered for the refill. For operators (e.g. to take Redis down for maintenance
    /// without a burst of errors) and for tests of the refill. Not counted as an error.
    pub fn trip_breaker(&mut self) {
        self.open_breaker(Instant::now());
    }

    /// Counters since open.
    pub fn stats(&self) -> RedisL2Stats {
        RedisL2Stats {
            pending_vehicles: self.pending.len(),
            breaker_open: self.open_until.is_some(),
            ..self.stats
        }
    }

    fn open_breaker(&mut self, now: Instant) {
        self.conn = None;
        self.open_until = Some(now + self.cfg.breaker_open_for);
        self.stats.breaker_trips += 1;
        self.breaker_gauge.set(1.0);
    }

    /// A Redis failure: counted once, breaker opened.
    fn fail(&mut self, e: &RedisError, now: Instant, op: &'static str) {
        self.stats.errors += 1;
        self.errors_total.increment(1);
        tracing::warn!(
            op,
            error = %e,
            skip_for_ms = self.cfg.breaker_open_for.as_millis() as u64,
            "redis L2 unavailable; skipping it (circuit breaker open)"
        );
        self.open_breaker(now);
    }

    /// Whether Redis may be used now: the breaker is closed, or its time is up and a `PING`
    /// succeeds (which closes it).
    fn ready(&mut self, now: Instant) -> bool {
        if let Some(until) = self.open_until {
            if now < until {
                return false;
            }
            match self.probe() {
                Ok(()) => {
                    tracing::info!(pending = self.pending.len(), "redis L2 is back; circuit breaker closed");
                    self.open_until = None;
                    self.breaker_gauge.set(0.0);
                }
                Err(e) => {
                    self.fail(&e, now, "probe");
                    return false;
                }
            }
        }
        if self.conn.is_none() {
            match self.connect() {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    self.fail(&e, now, "connect");
                    return false;
                }
            }
        }
        true
    }

    fn connect(&mut self) -> RedisResult<Connection> {
        self.conn_used = false;
        connect(&self.client, self.cfg.io_timeout, &self.client_name)
    }

    /// [`Self::send`], once more on a new connection if a used one failed (it may just have
    /// gone stale); the script makes resending harmless.
    fn send_retrying(&mut self, updates: &[(&str, [Option<&Frame>; 2])]) -> RedisResult<SendOutcome> {
        let result = match self.send(updates) {
            Err(e) if self.conn_used && is_redis_away(&e) => {
                tracing::debug!(error = %e, "redis L2 connection failed; reconnecting once");
                self.conn = Some(self.connect()?);
                self.send(updates)
            }
            other => other,
        };
        self.conn_used = result.is_ok();
        result
    }

    fn probe(&mut self) -> RedisResult<()> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self.connect()?,
        };
        redis::cmd("PING").query::<String>(&mut conn)?;
        self.conn = Some(conn);
        Ok(())
    }

    /// Remembers skipped frames for the refill, newest per (vehicle, kind), within the bound.
    fn remember(&mut self, reduced: &Reduced<'_>) {
        let mut dropped = 0u64;
        for (id, frames) in reduced {
            let room = self.pending.len() < self.cfg.max_pending_vehicles;
            let held = match self.pending.get_mut(*id) {
                Some(h) => h,
                None if room => self.pending.entry((*id).to_owned()).or_default(),
                None => {
                    dropped += 1;
                    continue;
                }
            };
            for f in frames.iter().flatten() {
                let s = &mut held[slot(f.kind())];
                if is_newer(f, s.as_ref()) {
                    *s = Some((*f).clone());
                }
            }
        }
        if dropped > 0 {
            if self.stats.refill_dropped == 0 {
                tracing::warn!(
                    max = self.cfg.max_pending_vehicles,
                    "redis L2 refill set is full; further vehicles refill from their next frames"
                );
            }
            self.stats.refill_dropped += dropped;
            self.refill_dropped_total.increment(dropped);
        }
    }

    /// Writes the batch's newest frames, and the remembered ones if Redis is back; skips and
    /// remembers when it is not.
    fn apply(&mut self, frames: &[Frame], now: Instant) {
        let mut reduced: Reduced<'_> = HashMap::new();
        let ahead = self.cfg.max_ahead_us;
        for f in frames.iter().filter(|f| !fleetpipe_processors::validate::is_clock_ahead(f, ahead)) {
            fold_in(&mut reduced, f);
        }
        if !self.ready(now) {
            self.remember(&reduced);
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        if !pending.is_empty() {
            for f in pending.values().flat_map(|p| p.iter().flatten()) {
                fold_in(&mut reduced, f);
            }
        }
        if reduced.is_empty() {
            return;
        }
        let updates: Vec<(&str, [Option<&Frame>; 2])> = reduced.iter().map(|(k, v)| (*k, *v)).collect();
        let mut written = 0u64;
        let mut refused = 0usize;
        let mut first_refusal = None;
        for (i, chunk) in updates.chunks(MAX_CALLS_PER_PIPELINE).enumerate() {
            match self.send_retrying(chunk) {
                Ok(outcome) => {
                    written += outcome.written;
                    refused += outcome.refused;
                    if first_refusal.is_none() {
                        first_refusal = outcome.first_refusal;
                    }
                }
                Err(e) => {
                    self.fail(&e, now, "write");
                    // Chunks before this one are in; the script makes rewriting them harmless
                    // anyway.
                    self.remember_updates(&updates[i * MAX_CALLS_PER_PIPELINE..]);
                    refused = 0;
                    break;
                }
            }
        }
        if refused > 0 {
            self.stats.errors += 1;
            self.errors_total.increment(1);
            tracing::warn!(
                vehicles = refused,
                error = ?first_refusal.map(|e| e.to_string()),
                "redis L2 refused the latest state of some vehicles; their next frames refill it"
            );
        }
        self.stats.vehicles_written += written;
        self.written_total.increment(written);
    }

    fn remember_updates(&mut self, updates: &[(&str, [Option<&Frame>; 2])]) {
        let reduced: Reduced<'_> = updates.iter().map(|(id, f)| (*id, *f)).collect();
        self.remember(&reduced);
    }

    /// One pipeline of script calls, one per vehicle; `NOSCRIPT` loads the script and resends
    /// those calls. `Err` when Redis is away ([`is_redis_away`]); a command Redis refuses for
    /// its own reasons is counted in the outcome and its vehicle left to its next frames.
    fn send(&mut self, updates: &[(&str, [Option<&Frame>; 2])]) -> RedisResult<SendOutcome> {
        let ttl_ms = ttl_millis(self.cfg.ttl());
        let mut json = Vec::with_capacity(512);
        let calls: Vec<redis::Cmd> = updates
            .iter()
            .map(|(id, frames)| update_cmd(&self.write_script, &self.keys, ttl_ms, id, *frames, &mut json))
            .collect();
        let Some(conn) = self.conn.as_mut() else {
            return Err(RedisError::from((ErrorKind::Io, "not connected")));
        };
        let mut outcome = SendOutcome::default();
        let mut todo: Vec<&redis::Cmd> = calls.iter().collect();
        for attempt in 0..2 {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for c in &todo {
                pipe.add_command((*c).clone());
            }
            let results: Vec<RedisResult<u64>> = pipe.query(conn)?;
            let mut noscript = Vec::new();
            for (c, r) in todo.iter().zip(results) {
                match r {
                    Ok(n) => outcome.written += u64::from(n > 0),
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) && attempt == 0 => {
                        noscript.push(*c);
                    }
                    Err(e) if is_redis_away(&e) => return Err(e),
                    Err(e) => {
                        outcome.refused += 1;
                        outcome.first_refusal.get_or_insert(e);
                    }
                }
            }
            if noscript.is_empty() {
                break;
            }
            self.write_script.load(conn)?;
            todo = noscript;
        }
        Ok(outcome)
    }

    /// Drops vehicles whose hash has expired from the geo set.
    fn prune(&mut self, now: Instant) {
        if self.last_prune.is_some_and(|t| now.duration_since(t) < PRUNE_EVERY) {
            return;
        }
        self.last_prune = Some(now);
        let Some(conn) = self.conn.as_mut() else { return };
        let mut pruned = 0u64;
        let mut result = Ok(());
        for _ in 0..10 {
            let mut inv = self.prune_script.prepare_invoke();
            inv.key(&self.keys.geo).key(&self.keys.expires).arg(PRUNE_LIMIT);
            match inv.invoke::<u64>(conn) {
                Ok(n) => {
                    pruned += n;
                    if n < PRUNE_LIMIT as u64 {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::debug!(pruned, "dropped expired vehicles from the redis geo set");
        }
        match result {
            Ok(()) => self.conn_used = true,
            // Perhaps a stale connection after a quiet spell: drop it and let the next write
            // (which reconnects, and opens the breaker if Redis is really away) decide.
            Err(e) if is_redis_away(&e) => {
                tracing::debug!(error = %e, "redis L2 connection failed while pruning; dropping it");
                self.conn = None;
            }
            Err(e) => {
                self.stats.errors += 1;
                self.errors_total.increment(1);
                tracing::warn!(error = %e, "redis L2 geo set pruning failed");
            }
        }
    }
}

#[derive(Debug, Default)]
struct SendOutcome {
    written: u64,
    refused: usize,
    first_refusal: Option<RedisError>,
}

impl Sink for RedisL2Sink {
    fn name(&self) -> &'static str {
        SINK_NAME
    }
    fn is_durable(&self) -> bool {
        false // a cache: acknowledgements never wait for it
    }

    /// The last batch's lsn: a cache never holds the write-ahead log back. (At open it is 0, so
    /// the log replays what it still holds into L2, which the script makes harmless.)
    fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    /// Never fails: Redis errors are counted and open the breaker.
    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.durable = self.durable.max(batch.lsn);
        if !batch.frames.is_empty() || !self.pending.is_empty() {
            self.apply(&batch.frames, Instant::now());
        }
        Ok(())
    }

    /// Refills remembered vehicles once the breaker's time is up (even when no batch comes),
    /// and now and then drops expired vehicles from the geo set.
    fn tick(&mut self, now: Instant) -> Result<(), SinkError> {
        let due = self.open_until.is_none_or(|until| now >= until);
        if due && !self.pending.is_empty() {
            self.apply(&[], now);
        }
        if self.open_until.is_none() && self.conn.is_some() {
            self.prune(now);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        if !self.pending.is_empty() && self.open_until.is_none_or(|until| Instant::now() >= until) {
            self.apply(&[], Instant::now());
        }
        if !self.pending.is_empty() {
            tracing::info!(vehicles = self.pending.len(), "redis L2 closed with vehicles not refilled");
        }
        self.conn = None;
        Ok(())
    }
}
