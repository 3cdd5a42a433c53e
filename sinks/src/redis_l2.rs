//! Redis L2: the latest state of every vehicle, shared by fleetpipe instances.
//!
//! Keys (CONTRACT.md §5, prefix configurable, default `fleetpipe:`):
//!
//! - `{prefix}vehicle:{id}`: a hash with `location` and `diagnostic` (the frame's contract JSON,
//!   as [`encode_json`] writes it), `location_ts`, `location_seq`, `diagnostic_ts`,
//!   `diagnostic_seq` (integers, `ts` in epoch microseconds), expiring `ttl` after its last
//!   change;
//! - `{prefix}geo`: a geo set of every vehicle's newest location;
//! - `{prefix}geo:expires`: a sorted set of vehicle id → when its hash expires (Redis server
//!   time, ms), so that [`RedisL2Sink::tick`] can drop vehicles from the geo set once their hash
//!   has expired (members of a geo set do not expire by themselves).
//!
//! "Latest" is newest by event time here too: a Lua script compares the stored `(ts, seq)` of a
//! kind and writes only a newer frame, atomically, so an older frame never overwrites a newer
//! one — not within a batch, not across batches, not when several instances write. A batch is
//! first reduced to the newest frame per (vehicle, kind); then every vehicle gets one script call
//! (`EVALSHA`, loaded on `NOSCRIPT`), all in one pipeline: one round trip per batch.
//!
//! Redis is a cache, not a durable sink. [`RedisL2Sink::durable_lsn`] follows the batches it is
//! given whatever happens to Redis, and `write` never fails: a Redis error is counted
//! (`fleetpipe_cache_errors_total{tier="l2"}`) and opens a circuit breaker, which skips Redis for
//! [`RedisConfig::breaker_open_for`] and then probes it with `PING`. While it is open the newest
//! skipped frames per vehicle are remembered (up to [`RedisConfig::max_pending_vehicles`]; past
//! that the overflow is counted in `fleetpipe_cache_refill_dropped_total{tier="l2"}` and the
//! vehicles' next frames fill L2 again) and written once Redis is back.
//!
//! The scripts touch two or three keys of different hash slots: this is for a single Redis (or a
//! replicated primary), not Redis Cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetpipe_processors::codec::{decode_message, encode_json, parse_rfc3339, Message};
use fleetpipe_processors::latest::VehicleState;
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::{Body, Frame, Kind, Lsn, Origin};
use redis::{Client, Connection, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind};

use crate::{Sink, SinkBatch, SinkError};

/// Metric label of this sink.
pub const SINK_NAME: &str = "redis";

/// Largest number of script calls sent in one pipeline (a refill after an outage may hold many
/// vehicles; a normal batch is far below it and takes one round trip).
const MAX_CALLS_PER_PIPELINE: usize = 10_000;

/// How often `tick` drops expired vehicles from the geo set, and how many per script call.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_LIMIT: usize = 1_000;

/// Idle connections a [`RedisL2Reader`] keeps for reuse.
const READER_IDLE_CONNECTIONS: usize = 8;

/// Redis geo sets index latitudes within ±85.05112878° only (Web Mercator).
const GEO_MAX_LAT: f64 = 85.051_128_78;

/// Compare-and-set of one vehicle's latest state.
///
/// KEYS: vehicle hash, geo set, expiry set. ARGV: ttl in ms, vehicle id, then per frame six
/// values: kind, ts, seq, contract JSON, lon, lat (lon/lat empty for a diagnostic, or for a
/// location a geo set cannot index, which then removes the vehicle's older position).
/// `ts` and `seq` are compared exactly as decimal integers (they may exceed 2^53).
/// Returns how many frames were newer and written.
const WRITE_SCRIPT: &str = r"
local function cmp(a, b)
  local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if na ~= nb then if na then return -1 else return 1 end end
  local r
  if a == b then return 0
  elseif #a ~= #b then if #a < #b then r = -1 else r = 1 end
  elseif a < b then r = -1 else r = 1 end
  if na then return -r end
  return r
end
local wrote = 0
for i = 3, #ARGV, 6 do
  local kind, ts, seq = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local held = redis.call('HMGET', KEYS[1], kind .. '_ts', kind .. '_seq')
  local newer = true
  if held[1] then
    local c = cmp(ts, held[1])
    if c < 0 or (c == 0 and cmp(seq, held[2] or '0') <= 0) then newer = false end
  end
  if newer then
    redis.call('HSET', KEYS[1], kind, ARGV[i + 3], kind .. '_ts', ts, kind .. '_seq', seq)
    if kind == 'location' then
      if ARGV[i + 4] ~= '' then
        redis.call('GEOADD', KEYS[2], ARGV[i + 4], ARGV[i + 5], ARGV[2])
      else
        redis.call('ZREM', KEYS[2], ARGV[2])
      end
    end
    wrote = wrote + 1
  end
end
if wrote > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), ARGV[2])
end
return wrote
";

/// Drops vehicles whose hash has expired from the geo set.
/// KEYS: geo set, expiry set. ARGV: limit. Returns how many were dropped.
const PRUNE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('ZREM', KEYS[2], unpack(ids))
end
return #ids
";

/// Where and how to reach Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key (default `fleetpipe:`).
    pub prefix: String,
    /// A vehicle's hash expires this long after its last change (default 24 h).
    pub ttl: Duration,
    /// How long Redis is skipped after an error before it is probed again (default 5 s).
    pub breaker_open_for: Duration,
    /// Connect, read and write timeout of every Redis call (default 2 s).
    pub io_timeout: Duration,
    /// Most vehicles remembered while the breaker is open, for the refill (default 100,000).
    pub max_pending_vehicles: usize,
}

impl RedisConfig {
    /// The defaults, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "fleetpipe:".to_owned(),
            ttl: Duration::from_secs(24 * 3600),
            breaker_open_for: Duration::from_secs(5),
            io_timeout: Duration::from_secs(2),
            max_pending_vehicles: 100_000,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig::new("redis://127.0.0.1:6379")
    }
}

/// The key names derived from the prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    geo: String,
    expires: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            geo: format!("{prefix}geo"),
            expires: format!("{prefix}geo:expires"),
        }
    }

    fn vehicle(&self, id: &str) -> String {
        format!("{}vehicle:{id}", self.prefix)
    }
}

fn open_client(url: &str) -> Result<Client, SinkError> {
    Client::open(url).map_err(|e| SinkError::Redis(format!("invalid redis url: {e}")))
}

/// A connection with read/write timeouts, named `name` (`CLIENT LIST` shows who is who).
fn connect(client: &Client, timeout: Duration, name: &str) -> RedisResult<Connection> {
    let mut conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    redis::cmd("CLIENT").arg("SETNAME").arg(name).query::<()>(&mut conn)?;
    Ok(conn)
}

/// `fleetpipe-l2-{role}@{prefix}`, with anything a client name cannot hold replaced by `_`.
fn client_name(role: &str, prefix: &str) -> String {
    let prefix: String = prefix.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect();
    format!("fleetpipe-l2-{role}@{prefix}")
}

/// Whether an error means Redis is away or cannot take writes now (connection refused or lost,
/// timeout, loading, read-only, out of memory, denied), as opposed to refusing one command
/// (`WRONGTYPE` on one vehicle's key, say).
fn is_redis_away(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::NoPerm,
        ) => true,
        ErrorKind::Server(_) | ErrorKind::UnexpectedReturnType | ErrorKind::Parse => false,
        ErrorKind::Extension => {
            matches!(e.code(), Some("OOM" | "BUSY" | "MISCONF" | "NOREPLICAS" | "NOAUTH" | "WRONGPASS"))
        }
        _ => true,
    }
}

fn cache_error_counter() -> metrics::Counter {
    metrics::counter!("fleetpipe_cache_errors_total", "tier" => "l2")
}

/// Newer by event time: greater `(ts, seq)`.
fn is_newer(frame: &Frame, held: Option<&Frame>) -> bool {
    held.is_none_or(|h| (frame.ts, frame.seq) > (h.ts, h.seq))
}

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Location => 0,
        Kind::Diagnostic => 1,
    }
}

/// Newest location and diagnostic per vehicle.
type Reduced<'a> = HashMap<&'a str, [Option<&'a Frame>; 2]>;

fn fold_in<'a>(into: &mut Reduced<'a>, frame: &'a Frame) {
    let s = &mut into.entry(frame.vehicle_id.as_str()).or_default()[slot(frame.kind())];
    if is_newer(frame, *s) {
        *s = Some(frame);
    }
}

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
    pub fn open(cfg: RedisConfig) -> Result<RedisL2Sink, SinkError> {
        let client = open_client(&cfg.url)?;
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

    /// A reader over the same Redis and prefix, for the HTTP read path.
    pub fn reader(&self) -> Result<RedisL2Reader, SinkError> {
        RedisL2Reader::open(&self.cfg)
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
        for f in frames {
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
        let ttl_ms = ttl_millis(self.cfg.ttl);
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

/// At least 1 ms, at most ~139 years (PEXPIRE refuses overflowing times).
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).clamp(1, 1 << 42)
}

/// One call of the write script: `id`'s newest location and/or diagnostic, each kept only if
/// newer by event time than what Redis holds.
fn update_cmd(
    script: &Script,
    keys: &Keys,
    ttl_ms: u64,
    id: &str,
    frames: [Option<&Frame>; 2],
    json: &mut Vec<u8>,
) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(3)
        .arg(keys.vehicle(id))
        .arg(&keys.geo)
        .arg(&keys.expires)
        .arg(ttl_ms)
        .arg(id);
    for f in frames.iter().flatten() {
        json.clear();
        encode_json(f, json);
        cmd.arg(f.kind().as_str()).arg(f.ts).arg(f.seq).arg(&json[..]);
        match &f.body {
            Body::Location(l) if l.lat.abs() <= GEO_MAX_LAT => {
                cmd.arg(l.lon.to_string()).arg(l.lat.to_string());
            }
            _ => {
                cmd.arg("").arg("");
            }
        }
    }
    cmd
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
    fn write(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
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

    fn close(&mut self) -> Result<(), SinkError> {
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

/// A vehicle's latest state as L2 holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisVehicle {
    pub vehicle_id: String,
    /// The newest location frame's contract JSON.
    pub location: Option<serde_json::Value>,
    /// The newest diagnostic frame's contract JSON.
    pub diagnostic: Option<serde_json::Value>,
    /// The same frames decoded, to fill L1 ([`fleetpipe_processors::latest::LatestCache::fill`]).
    /// A document that no longer decodes (written by an incompatible version) is left out here
    /// and logged; its JSON above is still served.
    pub state: VehicleState,
}

struct ReaderInner {
    client: Client,
    keys: Keys,
    io_timeout: Duration,
    breaker_open_for: Duration,
    name: String,
    idle: Mutex<Vec<Connection>>,
    open_until: Mutex<Option<Instant>>,
    errors_total: metrics::Counter,
    write_script: Script,
    ttl: Duration,
}

/// Reads L2 for the HTTP read path. Blocking (call it from `spawn_blocking` or a thread pool);
/// cheap to clone, clones share a small pool of connections. A connection that fails is
/// dropped and a new one made on the next call; after a connection-level failure calls fail
/// fast for `breaker_open_for`, so that a Redis outage does not slow every request down.
#[derive(Clone)]
pub struct RedisL2Reader {
    inner: Arc<ReaderInner>,
}

impl std::fmt::Debug for RedisL2Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisL2Reader").field("prefix", &self.inner.keys.prefix).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RedisL2Reader {
    /// Fails only on an invalid URL; connections are made on use.
    pub fn open(cfg: &RedisConfig) -> Result<RedisL2Reader, SinkError> {
        let client = open_client(&cfg.url)?;
        Ok(RedisL2Reader {
            inner: Arc::new(ReaderInner {
                client,
                keys: Keys::new(&cfg.prefix),
                name: client_name("reader", &cfg.prefix),
                io_timeout: cfg.io_timeout,
                breaker_open_for: cfg.breaker_open_for,
                idle: Mutex::new(Vec::new()),
                open_until: Mutex::new(None),
                errors_total: cache_error_counter(),
                write_script: Script::new(WRITE_SCRIPT),
                ttl: cfg.ttl,
            }),
        })
    }

    fn with_conn<T>(&self, f: impl Fn(&mut Connection) -> RedisResult<T>) -> Result<T, SinkError> {
        let inner = &*self.inner;
        if lock(&inner.open_until).is_some_and(|until| Instant::now() < until) {
            return Err(SinkError::Redis("redis L2 unavailable (circuit breaker open)".to_owned()));
        }
        let fresh = || connect(&inner.client, inner.io_timeout, &inner.name);
        let run = |mut c: Connection| f(&mut c).map(|v| (v, c));
        let pooled = lock(&inner.idle).pop();
        let result = match pooled {
            // A pooled connection may have gone stale (idle timeout, Redis restart): one retry
            // on a new connection before calling Redis away.
            Some(c) => match run(c) {
                Err(e) if is_redis_away(&e) => {
                    tracing::debug!(error = %e, "redis L2 reader connection failed; reconnecting once");
                    fresh().and_then(run)
                }
                other => other,
            },
            None => fresh().and_then(run),
        };
        match result {
            Ok((v, c)) => {
                *lock(&inner.open_until) = None;
                let mut idle = lock(&inner.idle);
                if idle.len() < READER_IDLE_CONNECTIONS {
                    idle.push(c);
                }
                Ok(v)
            }
            Err(e) => {
                inner.errors_total.increment(1);
                if is_redis_away(&e) {
                    tracing::warn!(error = %e, "redis L2 unavailable to readers; failing fast for a while");
                    *lock(&inner.open_until) = Some(Instant::now() + inner.breaker_open_for);
                    lock(&inner.idle).clear();
                }
                Err(SinkError::Redis(e.to_string()))
            }
        }
    }

    /// The latest state of `id`, or `None` if L2 does not hold it.
    pub fn get(&self, id: &str) -> Result<Option<RedisVehicle>, SinkError> {
        let key = self.inner.keys.vehicle(id);
        let (location, diagnostic): (Option<String>, Option<String>) =
            self.with_conn(|c| redis::cmd("HMGET").arg(&key).arg("location").arg("diagnostic").query(c))?;
        if location.is_none() && diagnostic.is_none() {
            return Ok(None);
        }
        let mut v = RedisVehicle {
            vehicle_id: id.to_owned(),
            location: None,
            diagnostic: None,
            state: VehicleState::default(),
        };
        for (text, kind) in [(location, Kind::Location), (diagnostic, Kind::Diagnostic)] {
            let Some(text) = text else { continue };
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| SinkError::Redis(format!("{key} {kind} is not JSON: {e}")))?;
            match decode_frame(text.into_bytes(), &value, kind) {
                Ok(frame) => {
                    v.state.merge(&frame);
                }
                Err(detail) => {
                    tracing::warn!(key, %kind, detail, "redis L2 document does not decode as a frame")
                }
            }
            match kind {
                Kind::Location => v.location = Some(value),
                Kind::Diagnostic => v.diagnostic = Some(value),
            }
        }
        Ok(Some(v))
    }

    /// Writes `state` (read from Postgres after an L2 miss) into L2, under the same rule as the
    /// sink: a frame never replaces a newer one, so a fill racing live traffic is harmless.
    pub fn fill(&self, id: &str, state: &VehicleState) -> Result<(), SinkError> {
        let frames = [state.location.as_deref(), state.diagnostic.as_deref()];
        if frames.iter().all(Option::is_none) {
            return Ok(());
        }
        let inner = &*self.inner;
        let cmd =
            update_cmd(&inner.write_script, &inner.keys, ttl_millis(inner.ttl), id, frames, &mut Vec::new());
        self.with_conn(|c| match cmd.query::<u64>(c) {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                inner.write_script.load(c)?;
                cmd.query::<u64>(c)
            }
            other => other,
        })
        .map(drop)
    }

    /// Vehicles whose latest location lies within `radius_m` of (lat, lon), nearest first, at most
    /// `limit`, with their distance in metres.
    pub fn near(
        &self,
        lat: f64,
        lon: f64,
        radius_m: f64,
        limit: usize,
    ) -> Result<Vec<(String, f64)>, SinkError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let geo = &self.inner.keys.geo;
        self.with_conn(|c| {
            redis::cmd("GEOSEARCH")
                .arg(geo)
                .arg("FROMLONLAT")
                .arg(lon)
                .arg(lat)
                .arg("BYRADIUS")
                .arg(radius_m.max(0.0))
                .arg("m")
                .arg("ASC")
                .arg("COUNT")
                .arg(limit)
                .arg("WITHDIST")
                .query(c)
        })
    }
}

/// Rebuilds a frame from its contract JSON with the contract's own decoder (permissive rules:
/// what was valid when written stays readable), keeping its `received_at`.
fn decode_frame(text: Vec<u8>, value: &serde_json::Value, kind: Kind) -> Result<Frame, String> {
    let received_at = value.get("received_at").and_then(|v| v.as_str()).and_then(parse_rfc3339).unwrap_or(0);
    let rules = Rules { max_future_us: i64::MAX, min_ts: None, max_payload_bytes: usize::MAX };
    let payload = Bytes::from(text);
    let origin = Origin::Http;
    let msg =
        Message { payload: &payload, content_type: Some("application/json"), origin: &origin, received_at };
    let mut decoded = decode_message(&msg, &rules);
    if let Some(r) = decoded.rejections.first() {
        return Err(format!("{}: {}", r.reason.code(), r.detail));
    }
    match decoded.frames.pop() {
        Some(f) if decoded.frames.is_empty() && f.kind() == kind => Ok(f),
        _ => Err(format!("expected one {kind} frame")),
    }
}
