//! The HTTP API (axum): ingest (`POST /v1/frames`), latest state, metrics and probes.
//!
//! `POST /v1/frames` answers 200 only after the accepted frames (and the rejections, which go to
//! the dead-letter store) are durable in the write-ahead log. A full intake answers 503 with
//! `Retry-After` at once instead of queueing without bound; readiness is not touched by
//! overload, so a load balancer keeps routing to a busy instance.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetpipe_pipeline::{
    now_micros, BoxError, Entry, Intake, NotDurable, Pushback, Readiness, Shutdown, Source, SourceContext,
    Submission,
};
use fleetpipe_processors::codec::{decode_message, frame_to_value, Message};
use fleetpipe_processors::latest::{LatestCache, Position, VehicleState};
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::{Decoded, Frame, Micros, Origin, Reason, Rejection};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::auth::{Credentials, Identity};

mod console;
mod events;
use crate::{Error, Result};

/// `[http]`: the API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// Request body limit (413 past it).
    pub max_body_bytes: usize,
    /// When set, every endpoint but `/health` and `/ready` requires `Authorization: Bearer
    /// <token>` (this token, or a credential's with `[auth] mode = "token"`).
    pub auth_token: Option<String>,
    /// An open listener for `/metrics`, `/health` and `/ready` only (Prometheus inside the
    /// cluster), beside the main one, which then still asks a token for `/metrics`.
    pub admin_addr: Option<SocketAddr>,
    /// Most connections open at once on each listener; past it a new one gets `503` with
    /// `Retry-After` and is closed.
    pub max_connections: usize,
    /// A request's headers must arrive within this long (seconds) of the connection being
    /// ready for them: bounds slow headers and idle keep-alive connections alike.
    pub header_timeout_secs: f64,
    /// A request's body must arrive within this long (seconds), else `408`.
    pub body_timeout_secs: f64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: ([127, 0, 0, 1], 8080).into(),
            max_body_bytes: 16 << 20,
            auth_token: None,
            admin_addr: None,
            max_connections: 10_000,
            header_timeout_secs: 10.0,
            body_timeout_secs: 30.0,
        }
    }
}

/// At most this many rejections are listed in a `POST /v1/frames` answer; `rejected_total`
/// gives the count (all of them are counted and kept).
pub const MAX_LISTED_REJECTIONS: usize = 1_000;

/// A read that failed, with the tier that failed it (`l2`, `postgres`, ...).
#[derive(Debug, thiserror::Error)]
#[error("{tier}: {source}")]
pub struct ReadError {
    pub tier: &'static str,
    #[source]
    pub source: BoxError,
    /// The tier could not be reached (answered `503` + `Retry-After`); else it answered with
    /// an error (`500`, logged: a retry will not help).
    pub unavailable: bool,
}

impl ReadError {
    /// The tier could not be reached.
    pub fn new(tier: &'static str, source: impl Into<BoxError>) -> Self {
        ReadError { tier, source: source.into(), unavailable: true }
    }

    /// The tier answered with an error.
    pub fn failed(tier: &'static str, source: impl Into<BoxError>) -> Self {
        ReadError { tier, source: source.into(), unavailable: false }
    }
}

/// Bodies larger than this are decoded off the async workers.
const INLINE_DECODE_BYTES: usize = 64 * 1024;

/// Latest state and the tier that served it (`l1`, `l2`, `postgres`).
pub type Found = (Arc<VehicleState>, &'static str);
/// A vehicle's latest state and its distance in metres.
pub type Nearby = (Arc<VehicleState>, f64);

/// A future the read path returns (boxed: the trait is used as an object).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where latest state and history are read from: L1 alone, or L1 → L2 → Postgres. The binary
/// provides the tiers it has; this crate knows none of their technologies.
pub trait ReadPath: Send + Sync {
    /// Latest state and the tier that served it (`l1`, `l2`, `postgres`), `None` if unknown.
    fn vehicle<'a>(&'a self, id: &'a str) -> BoxFuture<'a, std::result::Result<Option<Found>, ReadError>>;
    /// Vehicles whose latest location is within the radius, nearest first, with the distance.
    fn near(&self, q: Near) -> BoxFuture<'_, std::result::Result<Vec<Nearby>, ReadError>>;
    /// Location history in time order; `None` when no history store is configured.
    fn track<'a>(
        &'a self,
        id: &'a str,
        from: Micros,
        to: Micros,
        limit: usize,
    ) -> BoxFuture<'a, std::result::Result<Option<Vec<Frame>>, ReadError>>;
    /// The latest fixes of the first `limit` vehicles by id that `keep` lets through, and how
    /// many of them have one (this instance's L1: what the console draws).
    fn positions(
        &self,
        limit: usize,
        keep: VehicleFilter,
    ) -> BoxFuture<'_, std::result::Result<(Vec<Position>, u64), ReadError>>;
    /// Whether [`ReadPath::track`] has a history store to read.
    fn has_history(&self) -> bool;
}

/// Which vehicles a caller may see (its token's scope).
pub type VehicleFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The console's positions from L1 (a scan: off the async workers).
pub async fn l1_positions(
    latest: LatestCache,
    limit: usize,
    keep: VehicleFilter,
) -> std::result::Result<(Vec<Position>, u64), ReadError> {
    tokio::task::spawn_blocking(move || latest.positions(limit, |id| keep(id)))
        .await
        .map_err(|e| ReadError::new("l1", e))
}

/// A near query: at most `limit` vehicles within `radius_m` of (`lat`, `lon`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Near {
    pub lat: f64,
    pub lon: f64,
    pub radius_m: f64,
    pub limit: usize,
}

/// A near query over L1 (a scan: off the async workers).
pub async fn l1_near(latest: LatestCache, q: Near) -> std::result::Result<Vec<Nearby>, ReadError> {
    tokio::task::spawn_blocking(move || latest.near(q.lat, q.lon, q.radius_m, q.limit))
        .await
        .map_err(|e| ReadError::new("l1", e))
}

/// Counts a lookup in `fleetpipe_cache_requests_total{tier,result}`.
pub fn count_cache(tier: &'static str, hit: bool) {
    metrics::counter!("fleetpipe_cache_requests_total", "tier" => tier, "result" => if hit { "hit" } else { "miss" })
        .increment(1);
}

/// Everything the handlers need.
#[derive(Clone)]
pub struct ApiState {
    pub intake: Intake,
    pub rules: Arc<Rules>,
    pub reads: Arc<dyn ReadPath>,
    /// Request body limit (413 past it).
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (408 past it).
    pub body_timeout: Duration,
    /// Bearer token required on `POST /v1/frames` when set.
    pub auth_token: Option<Arc<str>>,
    /// With `[auth] mode = "token"`: credentials, one of which a request's bearer token must be.
    pub credentials: Option<Credentials>,
    /// Renders the Prometheus exposition.
    pub render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Readiness: sources subscribed, sinks initialised, not draining.
    pub readiness: Arc<Readiness>,
    /// On while the log cannot be written: ingest answers 503 at once.
    pub pushback: Pushback,
    /// Vehicle events and trips (`None`: events are off).
    pub events: Option<fleetpipe_pipeline::event_store::EventStore>,
}

/// The HTTP API as a source: ingest, reads, metrics and probes on one listener.
pub struct HttpSource {
    listener: TcpListener,
    /// Bound here, served on a runtime of its own (see [`serve_admin`]).
    admin: Option<std::net::TcpListener>,
    cfg: HttpConfig,
    reads: Arc<dyn ReadPath>,
    credentials: Option<Credentials>,
    render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    events: Option<fleetpipe_pipeline::event_store::EventStore>,
}

impl HttpSource {
    /// Serves vehicle events and trips from `store` (`GET …/trips`, `…/events`, the stream).
    pub fn with_events(mut self, store: fleetpipe_pipeline::event_store::EventStore) -> HttpSource {
        self.events = Some(store);
        self
    }

    /// Binds `cfg.addr` (port 0 picks a free one). With `credentials`, ingest requires a
    /// credential's token and takes only frames of vehicles in its scope.
    pub async fn bind(
        cfg: &HttpConfig,
        reads: Arc<dyn ReadPath>,
        credentials: Option<Credentials>,
        render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    ) -> Result<HttpSource> {
        let listener =
            TcpListener::bind(cfg.addr).await.map_err(|source| Error::Listen { addr: cfg.addr, source })?;
        let admin = match cfg.admin_addr {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| Error::Listen { addr, source })?;
                Some(l)
            }
            None => None,
        };
        Ok(HttpSource { listener, admin, cfg: cfg.clone(), reads, credentials, render_metrics, events: None })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|source| Error::Listen { addr: self.cfg.addr, source })
    }

    /// The address of the open admin listener, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

impl Source for HttpSource {
    type Error = Error;

    fn name(&self) -> &'static str {
        "http"
    }

    fn drain_grace(&self) -> Option<Duration> {
        Some(DRAIN_GRACE)
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        let state = ApiState {
            intake: ctx.intake,
            rules: ctx.rules,
            reads: self.reads,
            max_body_bytes: self.cfg.max_body_bytes,
            body_timeout: secs(self.cfg.body_timeout_secs),
            auth_token: self.cfg.auth_token.as_deref().map(Arc::from),
            credentials: self.credentials,
            render_metrics: self.render_metrics,
            readiness: ctx.readiness,
            pushback: ctx.pushback,
            events: self.events,
        };
        ctx.ready.set(true);
        let limits = Limits {
            max_connections: self.cfg.max_connections.max(1),
            header_timeout: secs(self.cfg.header_timeout_secs),
        };
        if let Some(admin) = self.admin {
            serve_admin(admin, admin_router(state.clone()), limits, ctx.shutdown.clone())?;
        }
        serve(self.listener, router(state), limits, "api", ctx.shutdown).await;
        Ok(())
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.001, 1e6))
}

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_connections: usize,
    header_timeout: Duration,
}

/// A listener's accept loop: at most `max_connections` open (past it, `503` and close), every
/// connection's headers within `header_timeout` (slow and idle connections are closed), accept
/// errors (out of descriptors) logged at most once a second with a count. On shutdown it stops
/// accepting and waits up to [`DRAIN_GRACE`] for the requests in flight.
async fn serve(listener: TcpListener, app: Router, limits: Limits, name: &'static str, stop: Shutdown) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = metrics::gauge!("fleetpipe_http_connections", "listener" => name);
    let refused = metrics::counter!("fleetpipe_http_connections_refused_total", "listener" => name);
    let mut accept_errors = fleetpipe_pipeline::Throttle::new(Duration::from_secs(1));
    let stop = stop.wait();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if let Some(held_back) = accept_errors.allow() {
                        tracing::warn!(listener = name, error = %e, held_back, "http accept failed");
                    }
                    // Out of descriptors: give the ones in use a moment to close.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.increment(1);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), refuse(stream)).await;
            });
            continue;
        };
        connections.set((limits.max_connections - permits.available_permits()) as f64);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(app.clone()),
            );
        let conn = graceful.watch(conn);
        let (gauge, permits, max) = (connections.clone(), permits.clone(), limits.max_connections);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
            gauge.set((max - permits.available_permits()) as f64);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = name, "requests still open after the drain grace period");
    }
}

/// The admin listener on a thread and runtime of its own, so that probes and metrics answer
/// however busy the API's runtime is with ingest.
fn serve_admin(listener: std::net::TcpListener, app: Router, limits: Limits, stop: Shutdown) -> Result<()> {
    let addr =
        listener.local_addr().map_err(|source| Error::Listen { addr: ([0, 0, 0, 0], 0).into(), source })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Listen { addr, source })?;
    std::thread::Builder::new()
        .name("http-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, app, limits, "admin", stop).await,
                    Err(e) => tracing::error!(error = %e, "admin listener failed"),
                }
            });
        })
        .map_err(|source| Error::Listen { addr, source })?;
    Ok(())
}

/// The answer past the connection cap.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = br#"{"error":"overloaded","detail":"too many connections"}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

/// The API. With a token configured (`http.auth_token` or `[auth] mode = "token"`) every
/// route but the probes asks for one (CONTRACT.md §8).
pub fn router(state: ApiState) -> Router {
    let limit = state.max_body_bytes;
    let guarded = Router::new()
        .route("/v1/vehicles", get(near_vehicles))
        .route("/v1/vehicles/:id", get(get_vehicle))
        .route("/v1/vehicles/:id/track", get(track))
        .route("/v1/vehicles/:id/trips", get(events::trips))
        .route("/v1/vehicles/:id/events", get(events::events))
        .route("/v1/events/stream", get(events::stream))
        .route("/v1/console/snapshot", get(console::snapshot))
        .route("/v1/console/stream", get(console::stream))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/v1/frames", post(post_frames))
        .merge(guarded)
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/", get(console::page))
        .route("/console/app.js", get(console::app_js))
        .route("/console/app.css", get(console::app_css))
        .route("/console/land.json", get(console::land_json))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// `GET /` for a client that is not a browser: what this server is and where its endpoints
/// are (open: it holds no data).
async fn index() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "name": "fleetpipe",
        "version": env!("CARGO_PKG_VERSION"),
        "endpoints": {
            "POST /v1/frames": "ingest frames (JSON object, array, NDJSON or Protobuf); 200 once durable",
            "GET /v1/vehicles/{id}": "latest state, newest by event time",
            "GET /v1/vehicles/{id}/track?from=&to=&limit=": "location history (needs Postgres)",
            "GET /v1/vehicles?near=LAT,LON&radius_m=R&limit=N": "vehicles near a point",
            "GET /v1/vehicles/{id}/trips": "trips, newest last",
            "GET /v1/vehicles/{id}/events?type=": "vehicle events",
            "GET /v1/events/stream?vehicle=": "new events as Server-Sent Events",
            "GET / (from a browser)": "the live fleet console",
            "GET /v1/console/snapshot?limit=N": "what the console shows: latest fixes, counters, queues, events",
            "GET /v1/console/stream?limit=N": "the console's snapshot as Server-Sent Events, every second",
            "GET /metrics": "Prometheus metrics",
            "GET /health": "liveness",
            "GET /ready": "readiness"
        },
        "docs": "README.md, section HTTP API"
    }))
}

/// `http.admin_addr`: metrics and probes, open.
fn admin_router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .with_state(state)
}

/// Who is reading (`None`: no auth configured), for the read handlers' scope.
#[derive(Clone)]
struct Caller(Option<Identity>);

impl Caller {
    fn allows(&self, vehicle_id: &str) -> bool {
        self.0.as_ref().is_none_or(|i| i.allows(vehicle_id))
    }
}

fn unauthorized(reason: &'static str) -> Response {
    metrics::counter!("fleetpipe_auth_failures_total", "door" => "http", "reason" => reason).increment(1);
    error(StatusCode::UNAUTHORIZED, "unauthorized", "missing or unknown bearer token")
}

async fn require_token(
    State(st): State<ApiState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authenticate(&st, req.headers()) {
        Ok(identity) => {
            req.extensions_mut().insert(Caller(identity));
            next.run(req).await
        }
        Err(reason) => unauthorized(reason),
    }
}

fn error(status: StatusCode, reason: &str, detail: impl Into<String>) -> Response {
    (status, Json(json!({"error": reason, "detail": detail.into()}))).into_response()
}

fn overloaded(detail: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "overloaded", detail);
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// Who a request is: `Ok(None)` when no auth applies, `Err(reason)` a refusal (401).
fn authenticate(st: &ApiState, headers: &HeaderMap) -> std::result::Result<Option<Identity>, &'static str> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = &st.auth_token {
        if given == Some(token.as_ref()) {
            return Ok(None);
        }
        if st.credentials.is_none() {
            return Err(if given.is_some() { "bad_token" } else { "missing" });
        }
    }
    let Some(credentials) = &st.credentials else { return Ok(None) };
    let given = given.ok_or("missing")?;
    credentials.check_token(given.as_bytes()).map(Some).ok_or("bad_token")
}

/// Frames of vehicles outside `identity`'s scope become `unauthorized_vehicle` rejections (their
/// contract JSON kept as the raw bytes); the rest of the request proceeds.
fn confine(decoded: &mut Decoded, identity: &Identity) {
    let (mut kept, mut refused) = (Vec::with_capacity(decoded.frames.len()), 0);
    for f in decoded.frames.drain(..) {
        if identity.allows(&f.vehicle_id) {
            kept.push(f);
        } else {
            refused += 1;
            decoded.rejections.push(Rejection {
                reason: Reason::UnauthorizedVehicle,
                detail: format!("{} may not send frames of {}", identity.key(), f.vehicle_id),
                index: None,
                raw: {
                    let mut json = Vec::new();
                    fleetpipe_processors::codec::encode_json(&f, &mut json);
                    json.into()
                },
                origin: Origin::Http,
                received_at: f.received_at,
            });
        }
    }
    decoded.frames = kept;
    if refused > 0 {
        tracing::debug!(refused, "frames outside the token's scope");
    }
}

async fn post_frames(State(st): State<ApiState>, headers: HeaderMap, body: axum::body::Body) -> Response {
    let identity = match authenticate(&st, &headers) {
        Ok(identity) => identity,
        Err(reason) => return unauthorized(reason),
    };
    if st.pushback.is_on() {
        metrics::counter!("fleetpipe_http_overloaded_total").increment(1);
        return overloaded("the write-ahead log cannot be written (disk full or failing); retry later");
    }
    let too_large =
        || error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("limit {} bytes", st.max_body_bytes));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > st.max_body_bytes) {
        return too_large();
    }
    let body =
        match tokio::time::timeout(st.body_timeout, axum::body::to_bytes(body, st.max_body_bytes)).await {
            Ok(Ok(body)) => body,
            // Over the limit (or the client went away mid-body).
            Ok(Err(_)) => return too_large(),
            Err(_) => {
                metrics::counter!("fleetpipe_http_timeouts_total").increment(1);
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!("the body did not arrive within {} s", st.body_timeout.as_secs_f64()),
                );
            }
        };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let received_at = now_micros();
    let rules = st.rules.clone();
    let body_len = body.len();
    let decode = move || {
        let origin = Origin::Http;
        let msg =
            Message { payload: &body, content_type: content_type.as_deref(), origin: &origin, received_at };
        decode_message(&msg, &rules)
    };
    let mut decoded: Decoded = if body_len > INLINE_DECODE_BYTES {
        match tokio::task::spawn_blocking(decode).await {
            Ok(d) => d,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    } else {
        decode()
    };
    let received = u64::from(decoded.received);
    if let Some(identity) = &identity {
        confine(&mut decoded, identity);
    }

    // A payload that could not be read at all is a 400 — and still kept in the dead-letter store.
    let unreadable = decoded.frames.is_empty()
        && decoded.rejections.len() == 1
        && decoded.rejections.first().is_some_and(|r| r.index.is_none());
    let accepted = decoded.frames.len();
    let rejected_total = decoded.rejections.len();
    let rejected: Vec<Value> = decoded
        .rejections
        .iter()
        .take(MAX_LISTED_REJECTIONS)
        .map(|r| json!({"index": r.index, "reason": r.reason.code(), "detail": r.detail}))
        .collect();

    let (tx, rx) = oneshot::channel();
    let mut entry = Entry { received_at, ..Entry::default() };
    if fleetpipe_pipeline::trace::is_on() {
        let incoming = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(fleetpipe_processors::trace::TraceContext::parse);
        entry.trace = fleetpipe_pipeline::trace::intake("http", incoming.as_slice(), accepted);
    }
    entry.absorb(decoded);
    let submission = Submission {
        entry,
        done: Some(Box::new(move |r| {
            let _ = tx.send(r);
        })),
    };
    match st.intake.try_send(submission) {
        // Counted once taken: a request refused with 503 (queue full, shutting down) is a
        // refusal before acceptance, so that received = accepted + rejected holds.
        Ok(()) => fleetpipe_pipeline::count_received("http", received),
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics::counter!("fleetpipe_http_overloaded_total").increment(1);
            return overloaded("ingest queue full");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => return overloaded("shutting down"),
    }
    match rx.await {
        Ok(Ok(_lsn)) if unreadable => {
            let r = rejected.first().cloned().unwrap_or(Value::Null);
            (StatusCode::BAD_REQUEST, Json(json!({"error": "unreadable_body", "rejected": [r]})))
                .into_response()
        }
        Ok(Ok(_lsn)) => {
            let body = json!({"accepted": accepted, "rejected": rejected, "rejected_total": rejected_total});
            (StatusCode::OK, Json(body)).into_response()
        }
        Ok(Err(NotDurable::ShuttingDown)) | Err(_) => overloaded("shutting down"),
        Ok(Err(e)) => overloaded(&e.to_string()),
    }
}

/// The contract's vehicle document.
pub fn vehicle_json(id: &str, state: &VehicleState, served_from: &str) -> Value {
    let mut doc = json!({"vehicle_id": id, "served_from": served_from});
    if let Some(f) = &state.location {
        doc["location"] = frame_to_value(f);
    }
    if let Some(f) = &state.diagnostic {
        doc["diagnostic"] = frame_to_value(f);
    }
    doc
}

fn out_of_scope(id: &str) -> Response {
    error(StatusCode::FORBIDDEN, "forbidden", format!("the token does not cover vehicle {id}"))
}

async fn get_vehicle(
    State(st): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    if !caller.allows(&id) {
        return out_of_scope(&id);
    }
    match st.reads.vehicle(&id).await {
        Ok(Some((state, tier))) => Json(vehicle_json(&id, &state, tier)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", format!("no vehicle {id}")),
        Err(e) => overloaded(&format!("read path unavailable: {e}")),
    }
}

#[derive(Deserialize)]
struct NearQuery {
    near: Option<String>,
    radius_m: Option<f64>,
    limit: Option<usize>,
}

async fn near_vehicles(
    State(st): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<NearQuery>,
) -> Response {
    let Some(near) = q.near else {
        return error(StatusCode::BAD_REQUEST, "bad_query", "near=LAT,LON is required");
    };
    let parsed = near
        .split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)));
    let Some((lat, lon)) = parsed.filter(|(a, b)| (-90.0..=90.0).contains(a) && (-180.0..=180.0).contains(b))
    else {
        return error(StatusCode::BAD_REQUEST, "bad_query", "near must be LAT,LON in degrees");
    };
    let radius = q.radius_m.unwrap_or(1_000.0);
    if !(radius.is_finite() && radius >= 0.0) {
        return error(StatusCode::BAD_REQUEST, "bad_query", "radius_m must be a non-negative number");
    }
    let limit = q.limit.unwrap_or(100).min(10_000);
    let hits = match st.reads.near(Near { lat, lon, radius_m: radius, limit }).await {
        Ok(h) => h,
        Err(e) => return overloaded(&format!("read path unavailable: {e}")),
    };
    let vehicles: Vec<Value> = hits
        .iter()
        .filter_map(|(state, d)| {
            let id = state.location.as_ref()?.vehicle_id.clone();
            if !caller.allows(&id) {
                return None;
            }
            let mut v = vehicle_json(&id, state, "near");
            if let Some(obj) = v.as_object_mut() {
                obj.remove("served_from");
            }
            v["distance_m"] = json!((d * 10.0).round() / 10.0);
            Some(v)
        })
        .collect();
    Json(json!({"vehicles": vehicles})).into_response()
}

#[derive(Deserialize)]
struct TrackQuery {
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
}

/// RFC 3339 or epoch milliseconds.
fn parse_time(s: &str) -> Option<Micros> {
    s.parse::<i64>()
        .ok()
        .map(|ms| ms.saturating_mul(1000))
        .or_else(|| fleetpipe_processors::time::parse_rfc3339(s))
}

async fn track(
    State(st): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<TrackQuery>,
) -> Response {
    if !caller.allows(&id) {
        return out_of_scope(&id);
    }
    // History bounds: the years 1 to 9999, what every store can hold.
    const OLDEST: Micros = -62_135_596_800_000_000;
    const NEWEST: Micros = 253_402_300_799_999_999;
    let from = match q.from.as_deref().map(parse_time) {
        None => OLDEST,
        Some(Some(t)) => t,
        Some(None) => {
            return error(StatusCode::BAD_REQUEST, "bad_query", "from must be RFC 3339 or epoch ms")
        }
    };
    let to = match q.to.as_deref().map(parse_time) {
        None => NEWEST,
        Some(Some(t)) => t,
        Some(None) => return error(StatusCode::BAD_REQUEST, "bad_query", "to must be RFC 3339 or epoch ms"),
    };
    let (from, to) = (from.clamp(OLDEST, NEWEST), to.clamp(OLDEST, NEWEST));
    let limit = q.limit.unwrap_or(1000).min(100_000);
    match st.reads.track(&id, from, to, limit).await {
        Ok(Some(frames)) => {
            let points: Vec<Value> = frames.iter().map(frame_to_value).collect();
            Json(json!({"vehicle_id": id, "track": points})).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_IMPLEMENTED,
            "not_configured",
            "track history is served from Postgres; none is configured",
        ),
        Err(e) if e.unavailable => overloaded(&format!("history unavailable: {e}")),
        Err(e) => {
            tracing::warn!(vehicle_id = %id, error = %e, "history read failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "history_error",
                format!("reading the history failed: {e}"),
            )
        }
    }
}

async fn metrics_text(State(st): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], (st.render_metrics)()).into_response()
}

async fn ready(State(st): State<ApiState>) -> Response {
    if st.readiness.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// How long shutdown waits for in-flight requests.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);
