//! The L2 reader of the HTTP read path: a vehicle's latest state, filling L2 after a Postgres
//! read, and the geo query. Values are read back on the trusted path (what fleetpipe wrote).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetpipe_processors::codec::stored;
use fleetpipe_processors::latest::VehicleState;
use fleetpipe_processors::Kind;
use redis::{Client, Connection, ErrorKind, RedisResult, Script, ServerErrorKind};

use super::{
    cache_error_counter, client_name, connect, is_redis_away, open_client, ttl_millis, update_cmd, Keys,
    RedisConfig, WRITE_SCRIPT,
};
use crate::{Error, Result};

/// Idle connections a [`RedisL2Reader`] keeps for reuse.
const READER_IDLE_CONNECTIONS: usize = 8;

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
    pub fn open(cfg: &RedisConfig) -> Result<RedisL2Reader> {
        let client = open_client(cfg)?;
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
                ttl: cfg.ttl(),
            }),
        })
    }

    fn with_conn<T>(&self, what: &'static str, f: impl Fn(&mut Connection) -> RedisResult<T>) -> Result<T> {
        let inner = &*self.inner;
        if lock(&inner.open_until).is_some_and(|until| Instant::now() < until) {
            return Err(Error::RedisUnavailable);
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
                Err(Error::Redis { what, source: e })
            }
        }
    }

    /// The latest state of `id`, or `None` if L2 does not hold it.
    pub fn get(&self, id: &str) -> Result<Option<RedisVehicle>> {
        let key = self.inner.keys.vehicle(id);
        let (location, diagnostic): (Option<String>, Option<String>) = self
            .with_conn("read a vehicle", |c| {
                redis::cmd("HMGET").arg(&key).arg("location").arg("diagnostic").query(c)
            })?;
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
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
                path: format!("redis key {key}, {kind}").into(),
                detail: e.to_string(),
            })?;
            match stored::frame_from_json(text.as_bytes()) {
                Ok(frame) if frame.kind() == kind => {
                    v.state.merge(&frame);
                }
                Ok(frame) => {
                    tracing::warn!(key, %kind, held = %frame.kind(), "redis L2 document holds the other kind")
                }
                Err(e) => {
                    tracing::warn!(key, %kind, error = %e, "redis L2 document does not decode as a frame")
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
    pub fn fill(&self, id: &str, state: &VehicleState) -> Result<()> {
        let frames = [state.location.as_deref(), state.diagnostic.as_deref()];
        if frames.iter().all(Option::is_none) {
            return Ok(());
        }
        let inner = &*self.inner;
        let cmd =
            update_cmd(&inner.write_script, &inner.keys, ttl_millis(inner.ttl), id, frames, &mut Vec::new());
        self.with_conn("fill a vehicle", |c| match cmd.query::<u64>(c) {
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
    pub fn near(&self, lat: f64, lon: f64, radius_m: f64, limit: usize) -> Result<Vec<(String, f64)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let geo = &self.inner.keys.geo;
        self.with_conn("search near", |c| {
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
