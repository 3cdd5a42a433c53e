//! The live fleet console: a page served at `/` (its assets embedded in the binary: no CDN, no
//! tile server, a Natural Earth 1:110m outline for the map) and the two reads it is drawn from,
//! `GET /v1/console/snapshot` and `GET /v1/console/stream` (the same snapshot as Server-Sent
//! Events, once a second).
//!
//! A snapshot is what an operator looks at: the latest fixes (the first vehicles by id, and how
//! many there are), the pipeline's counters and gauges as `/metrics` has them (rates are the
//! page's business: the difference between two snapshots), the queues' fill, which sinks are
//! catching up, and the newest events and trips. The page and its assets hold no data and are
//! open; the reads ask for a token like every other read, and list only the vehicles the
//! token covers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetpipe_processors::latest::Position;
use fleetpipe_processors::time::format_millis;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{error, ApiState, Caller};

const INDEX_HTML: &str = include_str!("../../console/index.html");
const APP_JS: &str = include_str!("../../console/app.js");
const APP_CSS: &str = include_str!("../../console/app.css");
const LAND_JSON: &str = include_str!("../../console/land.json");

/// Vehicles a snapshot lists unless asked otherwise, and at most.
const DEFAULT_VEHICLES: usize = 500;
const MAX_VEHICLES: usize = 5_000;

/// `GET /`: the console for a browser (`Accept: text/html`), else what this server is.
pub(super) async fn page(headers: HeaderMap) -> Response {
    let html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if html {
        asset("text/html; charset=utf-8", INDEX_HTML)
    } else {
        super::index().await.into_response()
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

pub(super) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub(super) async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

pub(super) async fn land_json() -> Response {
    asset("application/json", LAND_JSON)
}

#[derive(Debug, Deserialize)]
pub(super) struct SnapshotQuery {
    limit: Option<usize>,
}

/// `GET /v1/console/snapshot?limit=N`.
pub(super) async fn snapshot(
    State(st): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<SnapshotQuery>,
) -> Response {
    match build(&st, &caller, limit(&q)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e,
    }
}

/// `GET /v1/console/stream?limit=N`: a snapshot at once, then one a second.
pub(super) async fn stream(
    State(st): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<SnapshotQuery>,
) -> Response {
    let limit = limit(&q);
    let ticks = every(Duration::from_secs(1));
    let stream = futures_util::StreamExt::then(ticks, move |()| {
        let (st, caller) = (st.clone(), caller.clone());
        async move {
            let data = match build(&st, &caller, limit).await {
                Ok(v) => v.to_string(),
                Err(_) => json!({"error": "unavailable"}).to_string(),
            };
            Ok::<_, Infallible>(SseEvent::default().event("snapshot").data(data))
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// Ticks at once and then every `period`, for as long as the reader reads.
fn every(period: Duration) -> impl futures_util::Stream<Item = ()> {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures_util::stream::unfold(interval, |mut interval| async move {
        interval.tick().await;
        Some(((), interval))
    })
}

fn limit(q: &SnapshotQuery) -> usize {
    q.limit.unwrap_or(DEFAULT_VEHICLES).min(MAX_VEHICLES)
}

async fn build(st: &ApiState, caller: &Caller, limit: usize) -> Result<Value, Response> {
    // A scoped token lists and counts its own vehicles only.
    let scope = caller.clone();
    let keep: super::VehicleFilter = std::sync::Arc::new(move |id: &str| scope.allows(id));
    let (positions, total) = st.reads.positions(limit, keep).await.map_err(|e| unavailable(&e))?;
    let vehicles: Vec<Value> = positions.iter().map(position_json).collect();
    let metrics = Exposition::parse(&(st.render_metrics)());
    let (events, trips) = st.events.as_ref().map(|s| s.latest()).unwrap_or_default();
    let mine = |v: &std::sync::Arc<Value>| v["vehicle_id"].as_str().is_some_and(|id| caller.allows(id));
    Ok(json!({
        "now": format_millis(fleetpipe_pipeline::now_micros()),
        "vehicles_total": total,
        "track_available": st.reads.has_history(),
        "vehicles": vehicles,
        "counters": {
            "received": metrics.by("fleetpipe_frames_received_total", "source"),
            "accepted": metrics.by("fleetpipe_frames_accepted_total", "kind"),
            "written": metrics.by("fleetpipe_frames_written_total", "sink"),
            "rejected": metrics.by("fleetpipe_frames_rejected_total", "reason"),
            "duplicates": metrics.sum("fleetpipe_frames_duplicate_total"),
        },
        "queues": metrics.queues(),
        "sinks": metrics.sinks(),
        "events": events.iter().filter(|v| mine(v)).map(|v| (**v).clone()).collect::<Vec<_>>(),
        "trips": trips.iter().filter(|v| mine(v)).map(|v| (**v).clone()).collect::<Vec<_>>(),
    }))
}

fn unavailable(e: &super::ReadError) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("latest state: {e}"))
}

fn position_json(p: &Position) -> Value {
    json!({
        "vehicle_id": &*p.vehicle_id,
        "ts": format_millis(p.ts),
        "lat": p.lat,
        "lon": p.lon,
        "speed_kmh": p.speed_kmh,
        "heading_deg": p.heading_deg,
    })
}

/// The Prometheus text exposition `/metrics` serves, read back into series (one source of
/// truth: the console shows what Prometheus scrapes).
struct Exposition {
    series: Vec<Series>,
}

struct Series {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Series {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let series = text.lines().filter(|l| !l.starts_with('#')).filter_map(parse_line).collect();
        Exposition { series }
    }

    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Series> + 'a {
        self.series.iter().filter(move |s| s.name == name)
    }

    /// A counter summed by one label's value.
    fn by(&self, name: &str, label: &str) -> Map<String, Value> {
        let mut sums: BTreeMap<&str, f64> = BTreeMap::new();
        for s in self.named(name) {
            *sums.entry(s.label(label).unwrap_or("")).or_default() += s.value;
        }
        sums.into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect()
    }

    fn sum(&self, name: &str) -> f64 {
        self.named(name).map(|s| s.value).sum()
    }

    /// `queue_depth` and `queue_capacity` by stage (summed over shards).
    fn queues(&self) -> Vec<Value> {
        let mut q: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        for s in self.named("fleetpipe_queue_depth") {
            q.entry(s.label("stage").unwrap_or("")).or_default().0 += s.value;
        }
        for s in self.named("fleetpipe_queue_capacity") {
            q.entry(s.label("stage").unwrap_or("")).or_default().1 += s.value;
        }
        q.into_iter()
            .map(|(stage, (depth, capacity))| json!({"stage": stage, "depth": depth, "capacity": capacity}))
            .collect()
    }

    /// Every sink that wrote or is catching up, and whether it is.
    fn sinks(&self) -> Vec<Value> {
        let mut sinks: BTreeMap<&str, bool> = BTreeMap::new();
        for s in self.named("fleetpipe_frames_written_total") {
            sinks.entry(s.label("sink").unwrap_or("")).or_default();
        }
        for s in self.named("fleetpipe_sink_behind") {
            *sinks.entry(s.label("sink").unwrap_or("")).or_default() |= s.value > 0.0;
        }
        sinks.into_iter().map(|(sink, behind)| json!({"sink": sink, "behind": behind})).collect()
    }
}

/// `name{k="v",…} value` (a timestamp after the value, if any, is ignored).
fn parse_line(line: &str) -> Option<Series> {
    let line = line.trim();
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(inner) => {
            let end = closing_brace(inner)?;
            (parse_labels(&inner[..end])?, &inner[end + 1..])
        }
        None => (Vec::new(), rest),
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Series { name: name.to_owned(), labels, value })
}

/// Where the label set ends: the first `}` outside a quoted value.
fn closing_brace(s: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.trim().is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        let after = rest[eq + 1..].strip_prefix('"')?;
        let (mut value, mut escaped, mut end) = (String::new(), false, None);
        for (i, c) in after.char_indices() {
            match c {
                _ if escaped => {
                    value.push(if c == 'n' { '\n' } else { c });
                    escaped = false;
                }
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key, value));
        rest = &after[end? + 1..];
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_read_back_into_counters_queues_and_sinks() {
        let text = "# TYPE fleetpipe_frames_received_total counter\n\
            fleetpipe_frames_received_total{source=\"mqtt\"} 120\n\
            fleetpipe_frames_received_total{source=\"http\"} 4\n\
            fleetpipe_frames_rejected_total{reason=\"malformed_json\"} 2\n\
            fleetpipe_frames_written_total{sink=\"parquet\"} 118\n\
            fleetpipe_sink_behind{sink=\"postgres\"} 1\n\
            fleetpipe_queue_depth{stage=\"shard\",shard=\"0\"} 3\n\
            fleetpipe_queue_depth{stage=\"shard\",shard=\"1\"} 4\n\
            fleetpipe_queue_capacity{stage=\"shard\",shard=\"0\"} 10\n\
            fleetpipe_queue_capacity{stage=\"shard\",shard=\"1\"} 10\n\
            fleetpipe_frames_duplicate_total 3\n\
            fleetpipe_odd{label=\"a \\\"quoted} value\\\"\"} 7 1700000000\n";
        let m = Exposition::parse(text);
        assert_eq!(
            Value::Object(m.by("fleetpipe_frames_received_total", "source")),
            json!({"http": 4.0, "mqtt": 120.0})
        );
        assert_eq!(m.sum("fleetpipe_frames_duplicate_total"), 3.0);
        assert_eq!(m.queues(), [json!({"stage": "shard", "depth": 7.0, "capacity": 20.0})]);
        assert_eq!(
            m.sinks(),
            [json!({"sink": "parquet", "behind": false}), json!({"sink": "postgres", "behind": true})]
        );
        let odd = m.named("fleetpipe_odd").next().unwrap();
        assert_eq!((odd.label("label"), odd.value), (Some("a \"quoted} value\""), 7.0));
        assert!(parse_line("garbage").is_none());
        assert!(parse_line("x{a=\"unterminated} 1").is_none());
    }
}
