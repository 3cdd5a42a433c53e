//! What the HTTP API reads of vehicle events without any database: each vehicle's recent events
//! and completed trips, its trip under way, and a stream of new events for Server-Sent Events.
//! The events sink fills it as it derives (before its files are committed, so a trip shows
//! within a second of the frame that completed it) and, at start, from its committed files.
//! Bounded: at most `max_per_vehicle` events and trips per vehicle, the oldest leaving first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use fleetpipe_processors::events::{trip_json, Trip};
use fleetpipe_processors::Micros;
use serde_json::Value;

/// One stored event or trip: its time (event time; a trip's start), id, type and JSON.
#[derive(Debug, Clone)]
struct Item {
    ts: Micros,
    id: Arc<str>,
    kind: &'static str,
    json: Arc<Value>,
}

#[derive(Debug, Default)]
struct VehicleLog {
    events: VecDeque<Item>,
    trips: VecDeque<Item>,
    /// The trip under way, as the engine has it (a JSON value is several times its size, and
    /// every vehicle of a moving fleet has one): rendered when read.
    open: Option<Box<Trip>>,
}

/// How many of the newest events and trips [`EventStore::recent`] keeps.
const RECENT_EVENTS: usize = 20;
const RECENT_TRIPS: usize = 10;

#[derive(Debug, Default)]
struct Recent {
    events: VecDeque<Arc<Value>>,
    trips: VecDeque<Arc<Value>>,
}

impl Recent {
    fn push(list: &mut VecDeque<Arc<Value>>, item: Arc<Value>, max: usize) {
        list.push_front(item);
        list.truncate(max);
    }
}

/// The shared store (cheap to clone). Per vehicle the map holds its id and a box, so that its
/// table (sized up to twice the fleet) holds 32 bytes a slot, not a whole log.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<Mutex<HashMap<String, Box<VehicleLog>>>>,
    /// The newest events and completed trips of every vehicle, newest first (the console's).
    recent: Arc<Mutex<Recent>>,
    stream: tokio::sync::broadcast::Sender<Arc<Value>>,
    max_per_vehicle: usize,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore").field("max_per_vehicle", &self.max_per_vehicle).finish_non_exhaustive()
    }
}

/// Inserts `item` in time order unless its id is there already; drops the oldest past `max`.
fn insert(list: &mut VecDeque<Item>, item: Item, max: usize) -> bool {
    if list.iter().rev().any(|i| i.id == item.id) {
        return false;
    }
    let at = list.iter().rposition(|i| (i.ts, &*i.id) <= (item.ts, &*item.id)).map_or(0, |p| p + 1);
    list.insert(at, item);
    while list.len() > max {
        list.pop_front();
    }
    true
}

impl EventStore {
    /// `stream_capacity`: events a Server-Sent Events reader may fall behind before it is dropped.
    pub fn new(max_per_vehicle: usize, stream_capacity: usize) -> EventStore {
        let (stream, _) = tokio::sync::broadcast::channel(stream_capacity.max(1));
        EventStore {
            inner: Arc::default(),
            recent: Arc::default(),
            stream,
            max_per_vehicle: max_per_vehicle.max(1),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Box<VehicleLog>>) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Records an event (once per id); a new one goes to the stream when `live`.
    pub fn record_event(
        &self,
        vehicle_id: &str,
        ts: Micros,
        id: &str,
        kind: &'static str,
        json: Value,
        live: bool,
    ) {
        let json = Arc::new(json);
        let item = Item { ts, id: id.into(), kind, json: Arc::clone(&json) };
        let max = self.max_per_vehicle;
        let new = self.with(|m| insert(&mut m.entry(vehicle_id.to_owned()).or_default().events, item, max));
        if new {
            Recent::push(&mut self.recent().events, Arc::clone(&json), RECENT_EVENTS);
        }
        if new && live {
            let _ = self.stream.send(json);
        }
    }

    /// Records a completed trip (once per id); it is no longer the vehicle's open trip.
    pub fn record_trip(&self, vehicle_id: &str, start_ts: Micros, trip_id: &str, json: Value) {
        let json = Arc::new(json);
        let item = Item { ts: start_ts, id: trip_id.into(), kind: "trip", json: Arc::clone(&json) };
        let max = self.max_per_vehicle;
        let new = self.with(|m| {
            let log = m.entry(vehicle_id.to_owned()).or_default();
            if log.open.as_ref().is_some_and(|o| o.trip_id == trip_id) {
                log.open = None;
            }
            insert(&mut log.trips, item, max)
        });
        if new {
            Recent::push(&mut self.recent().trips, json, RECENT_TRIPS);
        }
    }

    /// The vehicle's trip under way (`None`: none).
    pub fn set_open_trip(&self, vehicle_id: &str, trip: Option<Trip>) {
        self.with(|m| match trip {
            Some(t) => match m.get_mut(vehicle_id) {
                Some(log) => log.open = Some(Box::new(t)),
                None => {
                    let log = VehicleLog { open: Some(Box::new(t)), ..VehicleLog::default() };
                    m.insert(vehicle_id.to_owned(), Box::new(log));
                }
            },
            None => {
                if let Some(log) = m.get_mut(vehicle_id) {
                    log.open = None;
                }
            }
        });
    }

    /// Events of a vehicle with `from <= ts < to`, oldest first, of one type if given.
    pub fn events(
        &self,
        vehicle_id: &str,
        from: Micros,
        to: Micros,
        kind: Option<&str>,
        limit: usize,
    ) -> Vec<Arc<Value>> {
        self.with(|m| {
            m.get(vehicle_id).map_or_else(Vec::new, |log| {
                log.events
                    .iter()
                    .filter(|i| i.ts >= from && i.ts < to && kind.is_none_or(|k| k == i.kind))
                    .take(limit)
                    .map(|i| Arc::clone(&i.json))
                    .collect()
            })
        })
    }

    /// Completed trips of a vehicle that start in `from <= start < to`, oldest first; with
    /// `include_open`, the trip under way after them.
    pub fn trips(
        &self,
        vehicle_id: &str,
        from: Micros,
        to: Micros,
        include_open: bool,
        limit: usize,
    ) -> Vec<Arc<Value>> {
        self.with(|m| {
            m.get(vehicle_id).map_or_else(Vec::new, |log| {
                let mut out: Vec<Arc<Value>> = log
                    .trips
                    .iter()
                    .filter(|i| i.ts >= from && i.ts < to)
                    .take(limit)
                    .map(|i| Arc::clone(&i.json))
                    .collect();
                if include_open {
                    out.extend(log.open.iter().map(|t| Arc::new(trip_json(t))));
                }
                out
            })
        })
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest events and completed trips of any vehicle, newest (recorded) first.
    pub fn latest(&self) -> (Vec<Arc<Value>>, Vec<Arc<Value>>) {
        let r = self.recent();
        (r.events.iter().cloned().collect(), r.trips.iter().cloned().collect())
    }

    /// A receiver of every new event from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Value>> {
        self.stream.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_kept_once_in_time_order_and_bounded_per_vehicle() {
        let store = EventStore::new(3, 16);
        let mut rx = store.subscribe();
        for (ts, id) in [(30, "c"), (10, "a"), (20, "b"), (10, "a"), (40, "d")] {
            store.record_event("V", ts, id, "dtc_raised", json!({"event_id": id}), true);
        }
        let ids: Vec<Value> =
            store.events("V", 0, 100, None, 10).iter().map(|v| v["event_id"].clone()).collect();
        assert_eq!(ids, [json!("b"), json!("c"), json!("d")], "once each, oldest first, three kept");
        assert!(store.events("V", 0, 100, Some("trip_started"), 10).is_empty());
        let streamed: Vec<Value> =
            std::iter::from_fn(|| rx.try_recv().ok()).map(|v| v["event_id"].clone()).collect();
        assert_eq!(streamed, [json!("c"), json!("a"), json!("b"), json!("d")]);
        let p = fleetpipe_processors::events::Point { ts: 5, lat: 56.0, lon: 10.0 };
        let open = Trip {
            trip_id: "t1".into(),
            vehicle_id: "V".into(),
            start: p,
            end: p,
            distance_m: 0.0,
            moving_us: 0,
            max_speed_kmh: None,
            odometer_start_m: None,
            odometer_end_m: None,
            fuel_start_pct: None,
            fuel_end_pct: None,
            soc_start_pct: None,
            soc_end_pct: None,
            dtcs: Vec::new(),
            by_ignition: false,
            open: true,
        };
        store.set_open_trip("V", Some(open));
        let trips = store.trips("V", 0, 100, true, 10);
        assert_eq!(trips.len(), 1);
        assert_eq!(
            (&trips[0]["trip_id"], &trips[0]["open"]),
            (&json!("t1"), &json!(true)),
            "rendered as JSON"
        );
        store.record_trip("V", 5, "t1", json!({"trip_id": "t1"}));
        let trips = store.trips("V", 0, 100, true, 10);
        assert_eq!(trips.len(), 1, "the completed trip replaces the open one");
        assert_eq!(trips[0]["trip_id"], "t1");
        assert!(trips[0].get("open").is_none());
        let (events, trips) = store.latest();
        let ids: Vec<&Value> = events.iter().map(|v| &v["event_id"]).collect();
        assert_eq!(
            ids,
            [&json!("d"), &json!("b"), &json!("a"), &json!("c")],
            "newest recorded first, once each"
        );
        assert_eq!(trips.len(), 1);
    }
}
