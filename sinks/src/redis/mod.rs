//! Redis L2: the latest state of every vehicle, shared by fleetpipe instances — the sink
//! ([`sink`]) and the reader of the read path ([`reader`]), over the keys and script here.
//!
//! Keys (CONTRACT.md §5, prefix configurable, default `fleetpipe:`):
//!
//! - `{prefix}vehicle:{id}`: a hash with `location` and `diagnostic` (the frame's contract JSON,
//!   as `encode_json` writes it), `location_ts`, `location_seq`, `diagnostic_ts`,
//!   `diagnostic_seq` (integers, `ts` in epoch microseconds), expiring `ttl` after its last
//!   change;
//! - `{prefix}geo`: a geo set of every vehicle's newest location;
//! - `{prefix}geo:expires`: a sorted set of vehicle id → when its hash expires (Redis server
//!   time, ms), so that [`RedisL2Sink`]'s `tick` can drop vehicles from the geo set once their hash
//!   has expired (members of a geo set do not expire by themselves).
//!
//! "Latest" is newest by event time here too: a Lua script compares the stored `(ts, seq)` of a
//! kind and writes only a newer frame, atomically, so an older frame never overwrites a newer
//! one — not within a batch, not across batches, not when several instances write. A batch is
//! first reduced to the newest frame per (vehicle, kind); then every vehicle gets one script call
//! (`EVALSHA`, loaded on `NOSCRIPT`), all in one pipeline: one round trip per batch.
//!
//! Redis is a cache, not a durable sink. The sink's `durable_lsn` follows the batches it is
//! given whatever happens to Redis, and `write` never fails: a Redis error is counted
//! (`fleetpipe_cache_errors_total{tier="l2"}`) and opens a circuit breaker, which skips Redis for
//! `breaker_open_for` and then probes it with `PING`. While it is open the newest
//! skipped frames per vehicle are remembered (up to `max_pending_vehicles`; past
//! that the overflow is counted in `fleetpipe_cache_refill_dropped_total{tier="l2"}` and the
//! vehicles' next frames fill L2 again) and written once Redis is back.
//!
//! The scripts touch two or three keys of different hash slots: this is for a single Redis (or a
//! replicated primary), not Redis Cluster.

mod reader;
mod sink;

use std::collections::HashMap;
use std::time::Duration;

use fleetpipe_processors::codec::encode_json;
use fleetpipe_processors::{Body, Frame, Kind};
use redis::{Client, Connection, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind};
use serde::Deserialize;

pub use self::reader::{RedisL2Reader, RedisVehicle};
pub use self::sink::{RedisL2Sink, RedisL2Stats};
use crate::{Error, Result};

/// Metric label of this sink.
pub const SINK_NAME: &str = "redis";

/// Redis geo sets index latitudes within ±85.05112878° only (Web Mercator).
const GEO_MAX_LAT: f64 = 85.051_128_78;

/// The compare-and-set of one vehicle's latest state (`write.lua`).
const WRITE_SCRIPT: &str = include_str!("write.lua");
/// Drops expired vehicles from the geo set (`prune.lua`).
const PRUNE_SCRIPT: &str = include_str!("prune.lua");

/// `[redis]`: where and how to reach Redis. The last three are tuning, not read from the file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS. Unset: no L2.
    pub url: Option<String>,
    /// TLS (with a `rediss://` url): the CA that signs the server's certificate (else the
    /// system's roots), and a client certificate and key for mutual TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Prefix of every key (default `fleetpipe:`).
    pub prefix: String,
    /// A vehicle's hash expires this long after its last change (seconds; default 24 h).
    pub ttl_secs: f64,
    /// How long Redis is skipped after an error before it is probed again (default 5 s).
    #[serde(skip)]
    pub breaker_open_for: Duration,
    /// Connect, read and write timeout of every Redis call (default 2 s).
    #[serde(skip)]
    pub io_timeout: Duration,
    /// Most vehicles remembered while the breaker is open, for the refill (default 100,000).
    #[serde(skip)]
    pub max_pending_vehicles: usize,
    /// `validate.max_ahead_s` (microseconds): a frame further ahead of its `received_at` never
    /// becomes the vehicle's state here.
    #[serde(skip)]
    pub max_ahead_us: i64,
}

impl RedisConfig {
    /// The defaults, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig { url: Some(url.into()), ..RedisConfig::default() }
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs_f64(self.ttl_secs.clamp(0.001, 1e9))
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            prefix: "fleetpipe:".to_owned(),
            ttl_secs: 24.0 * 3600.0,
            breaker_open_for: Duration::from_secs(5),
            io_timeout: Duration::from_secs(2),
            max_pending_vehicles: 100_000,
            max_ahead_us: fleetpipe_processors::validate::Rules::default().max_ahead_us,
        }
    }
}

/// The key names derived from the prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) prefix: String,
    pub(crate) geo: String,
    pub(crate) expires: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            geo: format!("{prefix}geo"),
            expires: format!("{prefix}geo:expires"),
        }
    }

    pub(crate) fn vehicle(&self, id: &str) -> String {
        format!("{}vehicle:{id}", self.prefix)
    }
}

fn open_client(cfg: &RedisConfig) -> Result<Client> {
    let url = cfg.url.as_deref().unwrap_or_default();
    let files = fleetpipe_pipeline::tls::TlsFiles {
        section: "[redis]",
        ca: cfg.tls_ca.clone(),
        cert: cfg.tls_cert.clone(),
        key: cfg.tls_key.clone(),
    };
    if !url.starts_with("rediss://") {
        if files.any() {
            return Err(Error::Config("[redis] tls_ca, tls_cert and tls_key need a rediss:// url".into()));
        }
        return Client::open(url).map_err(|source| Error::Redis { what: "parse the url", source });
    }
    let tls_err = |e: fleetpipe_pipeline::tls::TlsError| Error::Config(e.to_string());
    let certs = redis::TlsCertificates {
        client_tls: files
            .client_pem()
            .map_err(tls_err)?
            .map(|(client_cert, client_key)| redis::ClientTlsConfig { client_cert, client_key }),
        root_cert: files.ca_pem().map_err(tls_err)?,
    };
    // The client builds its rustls configuration with the process's default provider.
    fleetpipe_pipeline::tls::install_default_provider();
    Client::build_with_tls(url, certs).map_err(|source| Error::Redis { what: "set up TLS", source })
}

/// `fleetpipe check`: connects as the sink would and asks the server's version (blocking).
pub fn check(cfg: &RedisConfig) -> Result<String> {
    let client = open_client(cfg)?;
    let addr = client.get_connection_info().addr().to_string();
    let failed = |e: redis::RedisError| {
        Error::Config(format!(
            "{addr}: {e}; check that Redis runs there and that [redis] url (FLEETPIPE_REDIS_URL) is right"
        ))
    };
    let mut conn = connect(&client, cfg.io_timeout, &client_name("check", &cfg.prefix)).map_err(failed)?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut conn).map_err(failed)?;
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("unknown");
    Ok(format!("{addr}: Redis {}", version.trim()))
}

/// A connection with read/write timeouts, named `name` (`CLIENT LIST` shows who is who).
pub(crate) fn connect(client: &Client, timeout: Duration, name: &str) -> RedisResult<Connection> {
    let mut conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    redis::cmd("CLIENT").arg("SETNAME").arg(name).query::<()>(&mut conn)?;
    Ok(conn)
}

/// `fleetpipe-l2-{role}@{prefix}`, with anything a client name cannot hold replaced by `_`.
pub(crate) fn client_name(role: &str, prefix: &str) -> String {
    let prefix: String = prefix.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect();
    format!("fleetpipe-l2-{role}@{prefix}")
}

/// Whether an error means Redis is away or cannot take writes now (connection refused or lost,
/// timeout, loading, read-only, out of memory, denied), as opposed to refusing one command
/// (`WRONGTYPE` on one vehicle's key, say).
pub(crate) fn is_redis_away(e: &RedisError) -> bool {
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

pub(crate) fn cache_error_counter() -> metrics::Counter {
    metrics::counter!("fleetpipe_cache_errors_total", "tier" => "l2")
}

/// Newer by event time: greater `(ts, seq)`.
pub(crate) fn is_newer(frame: &Frame, held: Option<&Frame>) -> bool {
    held.is_none_or(|h| (frame.ts, frame.seq) > (h.ts, h.seq))
}

pub(crate) fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Location => 0,
        Kind::Diagnostic => 1,
    }
}

/// Newest location and diagnostic per vehicle.
pub(crate) type Reduced<'a> = HashMap<&'a str, [Option<&'a Frame>; 2]>;

pub(crate) fn fold_in<'a>(into: &mut Reduced<'a>, frame: &'a Frame) {
    let s = &mut into.entry(frame.vehicle_id.as_str()).or_default()[slot(frame.kind())];
    if is_newer(frame, *s) {
        *s = Some(frame);
    }
}

/// At least 1 ms, at most ~139 years (PEXPIRE refuses overflowing times).
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).clamp(1, 1 << 42)
}

/// One call of the write script: `id`'s newest location and/or diagnostic, each kept only if
/// newer by event time than what Redis holds.
pub(crate) fn update_cmd(
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
