//! Vehicle events over HTTP (CONTRACT.md §9): a vehicle's trips and events from the
//! [`EventStore`] (no database needed), and every new event as Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetpipe_pipeline::event_store::EventStore;
use fleetpipe_processors::events::What;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::{error, out_of_scope, parse_time, ApiState, Caller};

#[derive(Debug, Deserialize)]
pub(super) struct RangeQuery {
    from: Option<String>,
    to: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    include: Option<String>,
    limit: Option<usize>,
}

/// An answer that ends a request early.
type Refusal = Box<Response>;

/// The store, or the answer that events are off.
fn store(st: &ApiState) -> Result<&EventStore, Refusal> {
    st.events.as_ref().ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_IMPLEMENTED,
            "not_configured",
            "vehicle events are off ([events] enabled = false)",
        ))
    })
}

fn range(q: &RangeQuery) -> Result<(i64, i64), Refusal> {
    let bound = |v: &Option<String>, default: i64, name: &str| match v.as_deref().map(parse_time) {
        None => Ok(default),
        Some(Some(t)) => Ok(t),
        Some(None) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("{name} must be RFC 3339 or epoch ms"),
        ))),
    };
    Ok((bound(&q.from, i64::MIN, "from")?, bound(&q.to, i64::MAX, "to")?))
}

/// What both vehicle reads check first: the caller's scope, that events are on, the range.
fn scoped<'a>(
    st: &'a ApiState,
    caller: &Caller,
    id: &str,
    q: &RangeQuery,
) -> Result<(&'a EventStore, i64, i64), Refusal> {
    if !caller.allows(id) {
        return Err(Box::new(out_of_scope(id)));
    }
    let store = store(st)?;
    let (from, to) = range(q)?;
    Ok((store, from, to))
}

/// `GET /v1/vehicles/{id}/trips?from=&to=[&include=open]`: completed trips starting in the
/// range, oldest first; with `include=open`, the one under way last.
pub(super) async fn trips(
    State(st): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Response {
    let (store, from, to) = match scoped(&st, &caller, &id, &q) {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let open = match q.include.as_deref() {
        None | Some("") => false,
        Some("open") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("include={other:?}: only include=open"),
            )
        }
    };
    let trips = store.trips(&id, from, to, open, q.limit.unwrap_or(1000).min(10_000));
    Json(json!({"vehicle_id": id, "trips": trips.iter().map(|t| &**t).collect::<Vec<&Value>>()}))
        .into_response()
}

/// `GET /v1/vehicles/{id}/events?from=&to=&type=`: events in the range, oldest first.
pub(super) async fn events(
    State(st): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Response {
    let (store, from, to) = match scoped(&st, &caller, &id, &q) {
        Ok(v) => v,
        Err(e) => return *e,
    };
    if let Some(k) = q.kind.as_deref().filter(|k| !What::TYPES.contains(k)) {
        let known = What::TYPES.join(", ");
        return error(StatusCode::BAD_REQUEST, "bad_query", format!("type={k:?} is none of {known}"));
    }
    let events = store.events(&id, from, to, q.kind.as_deref(), q.limit.unwrap_or(1000).min(10_000));
    Json(json!({"vehicle_id": id, "events": events.iter().map(|e| &**e).collect::<Vec<&Value>>()}))
        .into_response()
}

/// What the stream sends: an event, or the end for a reader that fell behind.
#[derive(Debug, Clone, PartialEq)]
enum Update {
    Event { kind: String, data: String },
    End { data: String },
}

/// The events a reader may see (of `vehicle`, if given), until it falls behind by the store's
/// stream capacity: then one `End` saying so, and nothing more.
fn updates(
    rx: tokio::sync::broadcast::Receiver<Arc<Value>>,
    vehicle: Option<String>,
    caller: Arc<Caller>,
) -> impl futures_util::Stream<Item = Update> {
    futures_util::stream::unfold(Some(rx), move |rx| {
        let (vehicle, caller) = (vehicle.clone(), Arc::clone(&caller));
        async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        let vid = e["vehicle_id"].as_str().unwrap_or_default();
                        if vehicle.as_deref().is_some_and(|v| v != vid) || !caller.allows(vid) {
                            continue;
                        }
                        let kind = e["type"].as_str().unwrap_or("event").to_owned();
                        return Some((Update::Event { kind, data: e.to_string() }, Some(rx)));
                    }
                    Err(RecvError::Lagged(missed)) => {
                        metrics::counter!("fleetpipe_event_stream_dropped_total").increment(1);
                        let end = json!({
                            "error": "slow_reader",
                            "detail": format!("this reader fell {missed} events behind and was dropped; resume from GET /v1/vehicles/{{id}}/events, the vehicle-events topic or the tables"),
                        });
                        return Some((Update::End { data: end.to_string() }, None));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn record(store: &EventStore, vehicle: &str, id: &str) {
        let e = json!({"event_id": id, "vehicle_id": vehicle, "type": "dtc_raised"});
        store.record_event(vehicle, 0, id, "dtc_raised", e, true);
    }

    #[tokio::test]
    async fn a_reader_gets_its_vehicles_events_and_one_that_falls_behind_is_ended_with_a_reason() {
        let store = EventStore::new(100, 4);
        let mut reader = Box::pin(updates(store.subscribe(), Some("A".into()), Arc::new(Caller(None))));
        record(&store, "B", "b1");
        record(&store, "A", "a1");
        let first = reader.next().await.unwrap();
        assert!(
            matches!(&first, Update::Event { kind, data } if kind == "dtc_raised" && data.contains("\"a1\"")),
            "{first:?}"
        );
        // Ten more than the stream holds while the reader does not read: it is ended.
        for i in 0..10 {
            record(&store, "A", &format!("a{}", i + 2));
        }
        let end = reader.next().await.unwrap();
        assert!(
            matches!(&end, Update::End { data } if data.contains("slow_reader") && data.contains("fell 6 events behind")),
            "{end:?}"
        );
        assert_eq!(reader.next().await, None, "nothing after the end");
        // Others are not held up: a new reader gets what comes next.
        let mut other = Box::pin(updates(store.subscribe(), None, Arc::new(Caller(None))));
        record(&store, "B", "b2");
        assert!(matches!(other.next().await.unwrap(), Update::Event { data, .. } if data.contains("b2")));
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamQuery {
    vehicle: Option<String>,
}

/// `GET /v1/events/stream[?vehicle=]`: every new event as an SSE `event: <type>` with the
/// event's JSON. A reader that falls behind by the stream's capacity is dropped with a last
/// `event: end` saying so (and can resume from `GET …/events` or Kafka): it never holds up
/// the others or the pipeline.
pub(super) async fn stream(
    State(st): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<StreamQuery>,
) -> Response {
    let store = match store(&st) {
        Ok(s) => s,
        Err(e) => return *e,
    };
    if let Some(v) = &q.vehicle {
        if !caller.allows(v) {
            return out_of_scope(v);
        }
    }
    let caller = Arc::new(caller);
    let stream = futures_util::StreamExt::map(updates(store.subscribe(), q.vehicle, caller), |u| {
        Ok::<_, Infallible>(match u {
            Update::Event { kind, data } => SseEvent::default().event(kind).data(data),
            Update::End { data } => SseEvent::default().event("end").data(data),
        })
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}
