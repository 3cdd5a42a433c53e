//! Events and trips as the contract's JSON (CONTRACT.md §9): times as RFC 3339 with
//! milliseconds, durations in seconds.

use serde_json::{json, Map, Value};

use super::{DtcCode, Event, Point, Trip, What};
use crate::time::format_millis;

fn point(p: &Point) -> Value {
    json!({"ts": format_millis(p.ts), "lat": p.lat, "lon": p.lon})
}

fn dtc_fields(out: &mut Map<String, Value>, code: &DtcCode) {
    match code {
        DtcCode::Obd(s) => {
            out.insert("code".into(), json!(s));
        }
        DtcCode::J1939 { spn, fmi, sa } => {
            out.insert("code".into(), json!(code.label()));
            out.insert("spn".into(), json!(spn));
            out.insert("fmi".into(), json!(fmi));
            out.insert("sa".into(), json!(sa));
        }
    }
}

fn used(start: Option<f64>, end: Option<f64>) -> Value {
    match (start, end) {
        (Some(s), Some(e)) => json!(((s - e) * 1000.0).round() / 1000.0),
        _ => Value::Null,
    }
}

/// A trip summary: `{trip_id, vehicle_id, start, end, distance_m, duration_s, moving_s,
/// max_speed_kmh, avg_speed_kmh, odometer_start_m, odometer_end_m, fuel_used_pct,
/// energy_used_pct, dtcs}`, and `"open": true` for a trip under way.
pub fn trip_json(t: &Trip) -> Value {
    let mut v = json!({
        "trip_id": t.trip_id,
        "vehicle_id": t.vehicle_id,
        "start": point(&t.start),
        "end": point(&t.end),
        "distance_m": (t.distance_m * 10.0).round() / 10.0,
        "duration_s": t.duration_us() as f64 / 1e6,
        "moving_s": t.moving_us as f64 / 1e6,
        "max_speed_kmh": t.max_speed_kmh,
        "avg_speed_kmh": t.avg_speed_kmh().map(|s| (s * 100.0).round() / 100.0),
        "odometer_start_m": t.odometer_start_m,
        "odometer_end_m": t.odometer_end_m,
        "fuel_used_pct": used(t.fuel_start_pct, t.fuel_end_pct),
        "energy_used_pct": used(t.soc_start_pct, t.soc_end_pct),
        "dtcs": t.dtcs.iter().map(DtcCode::label).collect::<Vec<_>>(),
        "by": if t.by_ignition { "ignition" } else { "motion" },
    });
    if t.open {
        v["open"] = json!(true);
    }
    v
}

/// An event: `{event_id, vehicle_id, type, ts, detected_at, …}`.
pub fn event_json(e: &Event) -> Value {
    let mut m = Map::new();
    m.insert("event_id".into(), json!(e.event_id));
    m.insert("vehicle_id".into(), json!(e.vehicle_id));
    m.insert("type".into(), json!(e.what.type_name()));
    m.insert("ts".into(), json!(format_millis(e.ts)));
    m.insert("detected_at".into(), json!(format_millis(e.detected_at)));
    match &e.what {
        What::TripStarted { trip_id, start } => {
            m.insert("trip_id".into(), json!(trip_id));
            m.insert("start".into(), point(start));
        }
        What::TripCompleted(t) => {
            m.insert("trip_id".into(), json!(t.trip_id));
            m.insert("trip".into(), trip_json(t));
        }
        What::DtcRaised { code, trip_id } => {
            dtc_fields(&mut m, code);
            m.insert("trip_id".into(), json!(trip_id));
        }
        What::DtcCleared { code } => dtc_fields(&mut m, code),
        What::VehicleOffline => {}
        What::VehicleOnline { offline_since } => {
            m.insert("offline_since".into(), json!(format_millis(*offline_since)));
        }
        What::GeofenceEntered { geofence_id, lat, lon } | What::GeofenceExited { geofence_id, lat, lon } => {
            m.insert("geofence_id".into(), json!(geofence_id));
            m.insert("lat".into(), json!(lat));
            m.insert("lon".into(), json!(lon));
        }
    }
    Value::Object(m)
}
