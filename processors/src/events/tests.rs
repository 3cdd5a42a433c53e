#![allow(clippy::unwrap_used)]

use super::*;
use crate::codec::{decode_message, Message};
use crate::validate::Rules;
use crate::{Diagnostic, Location, Origin};

const DRIVE: &str = include_str!("../../../tests/data/css-drive-aarhus-2021-07-26-am.ndjson");
const S: Micros = 1_000_000;

/// The recorded drive, each frame received half a second after its event time.
fn drive() -> Vec<Frame> {
    let rules = Rules::default();
    DRIVE
        .lines()
        .map(|line| {
            let ts = crate::time::parse_rfc3339(
                serde_json::from_str::<serde_json::Value>(line).unwrap()["ts"].as_str().unwrap(),
            )
            .unwrap();
            let payload = bytes::Bytes::copy_from_slice(line.as_bytes());
            let msg = Message {
                payload: &payload,
                content_type: None,
                origin: &Origin::Http,
                received_at: ts + S / 2,
            };
            let mut d = decode_message(&msg, &rules);
            assert_eq!(d.frames.len(), 1, "{:?}", d.rejections);
            d.frames.remove(0)
        })
        .collect()
}

/// The default rules, with no vehicle going offline in the test.
fn quiet() -> EventRules {
    EventRules { offline_after_us: Micros::MAX / 4, ..EventRules::default() }
}

fn run(rules: &EventRules, frames: &[Frame]) -> (Vec<Event>, Engine) {
    let mut engine = Engine::new(rules.clone());
    let mut out = Vec::new();
    for f in frames {
        engine.push(f, &mut out);
    }
    let last = frames.iter().map(|f| f.received_at).max().unwrap_or_default();
    engine.tick(last + rules.gap_us.max(rules.allowed_lateness_us), &mut out);
    (out, engine)
}

fn trips(events: &[Event]) -> Vec<&Trip> {
    events
        .iter()
        .filter_map(|e| match &e.what {
            What::TripCompleted(t) => Some(&**t),
            _ => None,
        })
        .collect()
}

fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.what.type_name()).collect()
}

/// Everything but `detected_at`.
fn without_detection(events: &[Event]) -> Vec<Event> {
    let mut v: Vec<Event> = events.iter().cloned().map(|e| Event { detected_at: 0, ..e }).collect();
    v.sort_by(|a, b| (a.ts, &a.event_id).cmp(&(b.ts, &b.event_id)));
    v
}

fn fix(vid: &str, ts: Micros, lat: f64, lon: f64, speed: Option<f64>) -> Frame {
    Frame {
        vehicle_id: vid.into(),
        ts,
        seq: (ts / S) as u64,
        received_at: ts,
        body: Body::Location(Location { lat, lon, speed_kmh: speed, ..Location::default() }),
    }
}

fn diag(vid: &str, ts: Micros, d: Diagnostic) -> Frame {
    Frame {
        vehicle_id: vid.into(),
        ts,
        seq: (ts / S) as u64,
        received_at: ts,
        body: Body::Diagnostic(Box::new(d)),
    }
}

/// A small deterministic generator (xorshift64*), for shuffles.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn the_recorded_drive_is_one_trip_from_its_first_to_its_last_moving_fix() {
    let frames = drive();
    let (events, engine) = run(&quiet(), &frames);
    assert_eq!(types(&events), ["trip_started", "trip_completed"]);
    let trip = trips(&events)[0];
    let first_moving =
        frames.iter().find(|f| matches!(&f.body, Body::Location(l) if l.speed_kmh >= Some(5.0))).unwrap();
    let last_moving = frames
        .iter()
        .rev()
        .find(|f| matches!(&f.body, Body::Location(l) if l.speed_kmh >= Some(5.0)))
        .unwrap();
    assert_eq!((trip.start.ts, trip.end.ts), (first_moving.ts, last_moving.ts));
    let (odo_start, odo_end) = (trip.odometer_start_m.unwrap(), trip.odometer_end_m.unwrap());
    let delta = odo_end - odo_start;
    assert_eq!(delta, 41_000.0);
    assert!(
        (trip.distance_m - delta).abs() / delta < 0.02,
        "{} m along the fixes, {delta} m on the odometer",
        trip.distance_m
    );
    assert!(trip.moving_us > 30 * 60 * S && trip.moving_us <= trip.duration_us());
    let max = frames
        .iter()
        .filter_map(|f| match &f.body {
            Body::Location(l) => l.speed_kmh,
            _ => None,
        })
        .fold(0.0, f64::max);
    assert_eq!(trip.max_speed_kmh, Some(max));
    assert!(!trip.by_ignition && !trip.open);
    assert_eq!(engine.open_trips(), 0);
    // The started event names the same trip and place.
    assert!(
        matches!(&events[0].what, What::TripStarted { trip_id, start } if *trip_id == trip.trip_id && *start == trip.start)
    );
}

#[test]
fn any_arrival_order_within_the_bound_and_redeliveries_give_the_same_events() {
    let frames = drive();
    let rules = quiet();
    let (ordered, _) = run(&rules, &frames);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Each frame arrives up to 50 s (of the 60 s bound) after its turn; a tenth twice.
    let mut arrivals: Vec<(Micros, Frame)> = Vec::new();
    for f in &frames {
        let delay = (rng.next() % 50_000) as Micros * 1000;
        arrivals.push((f.ts + delay, f.clone()));
        if rng.next() % 10 < 1 {
            arrivals.push((f.ts + (rng.next() % 50_000) as Micros * 1000, f.clone()));
        }
    }
    arrivals.sort_by_key(|(at, _)| *at);
    let shuffled: Vec<Frame> = arrivals.into_iter().map(|(at, f)| Frame { received_at: at, ..f }).collect();
    assert_ne!(
        shuffled.iter().map(|f| f.ts).collect::<Vec<_>>(),
        frames.iter().map(|f| f.ts).collect::<Vec<_>>()
    );
    let (reordered, mut engine) = run(&rules, &shuffled);
    assert_eq!(without_detection(&reordered), without_detection(&ordered));
    assert_eq!(engine.take_late(), 0, "within the bound nothing is late: redeliveries fold in the buffer");
}

#[test]
fn a_frame_later_than_the_bound_is_counted_and_changes_nothing() {
    let frames = drive();
    let rules = quiet();
    let (expected, _) = run(&rules, &frames);
    // The frame of the trip's start comes again (with another seq) ten minutes late.
    let mut late = frames[1].clone();
    late.seq = 99_999;
    let mut with_late = frames[..700].to_vec();
    with_late.push(late);
    with_late.extend_from_slice(&frames[700..]);
    let (got, mut engine) = run(&rules, &with_late);
    assert_eq!(without_detection(&got), without_detection(&expected));
    assert_eq!(engine.take_late(), 1);
}

#[test]
fn two_drives_hours_apart_are_two_trips() {
    let frames = drive();
    let later: Vec<Frame> = frames
        .iter()
        .map(|f| Frame { ts: f.ts + 5 * 3600 * S, received_at: f.received_at + 5 * 3600 * S, ..f.clone() })
        .collect();
    let both: Vec<Frame> = frames.iter().chain(&later).cloned().collect();
    let (events, _) = run(&quiet(), &both);
    let t = trips(&events);
    assert_eq!(t.len(), 2);
    assert_ne!(t[0].trip_id, t[1].trip_id);
    assert_eq!(t[1].start.ts - t[0].start.ts, 5 * 3600 * S);
    assert!((t[0].distance_m - t[1].distance_m).abs() < 1e-6, "the gap adds no distance");
}

/// 60 s moving east at 36 km/h, a stop of `stop_s` (a fix every 10 s, standing), 60 s moving on.
fn stop_and_go(stop_s: i64) -> Vec<Frame> {
    let mut frames = Vec::new();
    let (mut ts, mut lon) = (1_700_000_000 * S, 10.0);
    let step = 10.0 / (111_320.0 * 56f64.to_radians().cos()); // 10 m of longitude at 56° N
    for _ in 0..60 {
        frames.push(fix("STOP", ts, 56.0, lon, Some(36.0)));
        ts += S;
        lon += step;
    }
    for _ in 0..stop_s / 10 {
        frames.push(fix("STOP", ts, 56.0, lon, Some(0.0)));
        ts += 10 * S;
    }
    for _ in 0..60 {
        frames.push(fix("STOP", ts, 56.0, lon, Some(36.0)));
        ts += S;
        lon += step;
    }
    frames
}

#[test]
fn a_stop_longer_than_stop_after_splits_the_trip_a_shorter_one_does_not() {
    let rules = quiet();
    let (long, _) = run(&rules, &stop_and_go(200));
    assert_eq!(types(&long), ["trip_started", "trip_completed", "trip_started", "trip_completed"]);
    let t = trips(&long);
    assert!((t[0].distance_m - 590.0).abs() < 2.0, "{}", t[0].distance_m);
    let (short, _) = run(&rules, &stop_and_go(100));
    assert_eq!(types(&short), ["trip_started", "trip_completed"]);
    let t = trips(&short);
    assert!((t[0].distance_m - 1190.0).abs() < 4.0, "{}", t[0].distance_m);
    assert_eq!(
        t[0].moving_us,
        118 * S + 10 * S,
        "the standing fixes add no moving time, the first step off does"
    );
}

#[test]
fn ignition_decides_trips_when_frames_carry_it() {
    // 60 fixes moving, 20 standing (200 s), 60 moving; the ignition goes off at fix 130.
    let off = 130;
    let mut frames = stop_and_go(200);
    for (i, f) in frames.iter_mut().enumerate() {
        if let Body::Location(l) = &mut f.body {
            l.ignition = Some(i < off);
        }
    }
    let (events, _) = run(&quiet(), &frames);
    assert_eq!(types(&events), ["trip_started", "trip_completed"], "the stop does not end an ignition trip");
    let t = trips(&events)[0];
    assert!(t.by_ignition);
    assert_eq!(t.end.ts, frames[off].ts, "ends at the ignition-off fix");
}

#[test]
fn dtcs_are_raised_and_cleared_per_code_and_a_frame_without_dtcs_says_nothing() {
    let j = Dtc::J1939 { spn: 100, fmi: 1, oc: 3, sa: 0 };
    let list = |codes: &[Dtc]| Diagnostic { dtcs: Some(codes.to_vec()), ..Diagnostic::default() };
    let t0 = 1_700_000_000 * S;
    let frames = vec![
        diag("DTC", t0, list(&[Dtc::Obd("P0301".into())])),
        diag("DTC", t0 + S, list(&[Dtc::Obd("P0301".into()), j.clone()])),
        diag("DTC", t0 + 2 * S, Diagnostic { engine_rpm: Some(900.0), ..Diagnostic::default() }),
        // The same J1939 fault with another occurrence count is the same code.
        diag("DTC", t0 + 3 * S, list(&[Dtc::J1939 { spn: 100, fmi: 1, oc: 4, sa: 0 }])),
        diag("DTC", t0 + 4 * S, list(&[])),
    ];
    let (events, _) = run(&quiet(), &frames);
    let seen: Vec<(&str, String, Micros)> = events
        .iter()
        .map(|e| match &e.what {
            What::DtcRaised { code, .. } => ("raised", code.label(), e.ts),
            What::DtcCleared { code } => ("cleared", code.label(), e.ts),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("raised", "P0301".to_owned(), t0),
            ("raised", "J1939:100/1/0".to_owned(), t0 + S),
            ("cleared", "P0301".to_owned(), t0 + 3 * S),
            ("cleared", "J1939:100/1/0".to_owned(), t0 + 4 * S),
        ]
    );
}

/// A circle around a point of the drive, and the fixes where the drive enters and leaves it
/// (beyond the margin), found here independently of the engine.
fn circle_on_the_drive(frames: &[Frame], radius_m: f64, margin_m: f64) -> (Geofence, Micros, Micros) {
    let center = match &frames[900].body {
        Body::Location(l) => (l.lat, l.lon),
        _ => unreachable!(),
    };
    let distance = |f: &Frame| match &f.body {
        Body::Location(l) => haversine_m(center.0, center.1, l.lat, l.lon),
        _ => f64::NAN,
    };
    let entered = frames.iter().find(|f| distance(f) < radius_m - margin_m).unwrap().ts;
    let exited = frames.iter().find(|f| f.ts > entered && distance(f) > radius_m + margin_m).unwrap().ts;
    let fence = Geofence {
        id: "zone".into(),
        shape: geofence::Shape::Circle { lat: center.0, lon: center.1, radius_m },
        dwell_us: 0,
    };
    (fence, entered, exited)
}

fn crossings(events: &[Event]) -> Vec<(&'static str, Micros)> {
    events
        .iter()
        .filter(|e| e.what.type_name().starts_with("geofence"))
        .map(|e| (e.what.type_name(), e.ts))
        .collect()
}

#[test]
fn a_geofence_on_the_drive_is_entered_and_exited_once_at_the_crossing_fixes_with_and_without_dwell() {
    let frames = drive();
    let (fence, entered, exited) = circle_on_the_drive(&frames, 1000.0, 20.0);
    let rules = EventRules { geofences: vec![fence.clone()], ..quiet() };
    let (events, _) = run(&rules, &frames);
    assert_eq!(crossings(&events), [("geofence_entered", entered), ("geofence_exited", exited)]);
    // With a dwell shorter than the stay: the same events, at the same fixes.
    let dwell = Geofence { dwell_us: 30 * S, ..fence.clone() };
    let (events, _) = run(&EventRules { geofences: vec![dwell], ..quiet() }, &frames);
    assert_eq!(crossings(&events), [("geofence_entered", entered), ("geofence_exited", exited)]);
    // With a dwell longer than the stay: nothing.
    let stay = exited - entered;
    let longer = Geofence { dwell_us: stay + 60 * S, ..fence };
    let (events, _) = run(&EventRules { geofences: vec![longer], ..quiet() }, &frames);
    assert_eq!(crossings(&events), []);
}

#[test]
fn a_track_along_the_boundary_does_not_flap() {
    // A circle of 500 m; the track runs along it, 10 m in and out in turn (GPS noise).
    let (lat0, lon0) = (56.0, 10.0);
    let fence = Geofence {
        id: "ring".into(),
        shape: geofence::Shape::Circle { lat: lat0, lon: lon0, radius_m: 500.0 },
        dwell_us: 0,
    };
    let m_lat = 1.0 / 111_195.0;
    let m_lon = m_lat / lat0.to_radians().cos();
    let t0 = 1_700_000_000 * S;
    let mut frames = vec![fix("EDGE", t0, lat0 + 2000.0 * m_lat, lon0, Some(30.0))];
    for i in 0..300 {
        let a = i as f64 / 300.0 * std::f64::consts::PI;
        let r = 500.0 + if i % 2 == 0 { 10.0 } else { -10.0 };
        frames.push(fix(
            "EDGE",
            t0 + (i + 1) * S,
            lat0 + r * a.cos() * m_lat,
            lon0 + r * a.sin() * m_lon,
            Some(30.0),
        ));
    }
    let (events, _) = run(&EventRules { geofences: vec![fence], ..quiet() }, &frames);
    assert_eq!(crossings(&events), []);
}

#[test]
fn a_silent_vehicle_goes_offline_on_the_receive_clock_and_online_with_its_next_frame() {
    let rules = EventRules { offline_after_us: 300 * S, ..EventRules::default() };
    let mut engine = Engine::new(rules);
    let mut out = Vec::new();
    let t0 = 1_700_000_000 * S;
    engine.push(&fix("QUIET", t0, 56.0, 10.0, Some(0.0)), &mut out);
    engine.tick(t0 + 299 * S, &mut out);
    assert_eq!(types(&out), Vec::<&str>::new());
    engine.tick(t0 + 300 * S, &mut out);
    engine.tick(t0 + 400 * S, &mut out);
    assert_eq!(types(&out), ["vehicle_offline"]);
    assert_eq!((out[0].ts, out[0].detected_at), (t0, t0 + 300 * S));
    engine.push(&fix("QUIET", t0 + 500 * S, 56.0, 10.0, Some(0.0)), &mut out);
    assert_eq!(types(&out), ["vehicle_offline", "vehicle_online"]);
    assert_eq!(out[1].what, What::VehicleOnline { offline_since: t0 });
}

#[test]
fn a_restored_snapshot_goes_on_exactly_where_the_engine_stopped() {
    let frames = drive();
    let (fence, _, _) = circle_on_the_drive(&frames, 1000.0, 20.0);
    let rules = EventRules { geofences: vec![fence], ..quiet() };
    let (whole, _) = run(&rules, &frames);
    let mut first = Engine::new(rules.clone());
    let mut out = Vec::new();
    for f in &frames[..1000] {
        first.push(f, &mut out);
    }
    let mut second = Engine::restore(rules.clone(), &first.snapshot()).unwrap();
    assert_eq!(second.open_trip("CSS-3BA199E2"), first.open_trip("CSS-3BA199E2"));
    for f in &frames[1000..] {
        second.push(f, &mut out);
    }
    second.tick(frames.last().unwrap().received_at + rules.gap_us, &mut out);
    assert_eq!(out, whole);
}

#[test]
fn ids_are_functions_of_the_frames() {
    let frames = drive();
    let (a, _) = run(&quiet(), &frames);
    let (b, _) = run(&quiet(), &frames);
    assert_eq!(a, b);
    let ids: std::collections::HashSet<&str> = a.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), a.len());
    assert_eq!(a[0].event_id.len(), 32);
    let json = event_json(&a[1]);
    assert_eq!(json["type"], "trip_completed");
    assert_eq!(json["trip"]["trip_id"], json["trip_id"]);
    assert_eq!(json["trip"]["start"]["ts"], "2021-07-26T04:43:06.329Z");
}

#[test]
fn the_reorder_buffer_keeps_key_order_replaces_a_redelivery_and_grows_from_one_slot() {
    let at = |received_at| Pending {
        received_at,
        slim: Slim::Diag { fuel: None, soc: None, odometer: None, dtcs: None },
    };
    let mut b = Reorder::default();
    b.insert((30, 0, 3), at(1));
    assert_eq!(b.0.capacity(), 1, "a vehicle holding one frame holds one slot");
    b.insert((10, 0, 1), at(2));
    b.insert((20, 1, 2), at(3));
    b.insert((20, 0, 2), at(4));
    b.insert((10, 0, 1), at(5));
    b.insert((40, 0, 4), at(6));
    let keys: Vec<(Key, Micros)> = b.0.iter().map(|(k, p)| (*k, p.received_at)).collect();
    assert_eq!(keys, [((10, 0, 1), 5), ((20, 0, 2), 4), ((20, 1, 2), 3), ((30, 0, 3), 1), ((40, 0, 4), 6)]);
    let json = serde_json::to_string(&b).unwrap();
    let back: Reorder = serde_json::from_str(&json).unwrap();
    assert_eq!(back, b, "the snapshot's list of pairs, oldest first");
    assert_eq!(b.pop_first().map(|(k, _)| k), Some((10, 0, 1)));
    assert_eq!((b.len(), b.first_key(), b.first_received()), (4, Some((20, 0, 2)), Some(4)));
}

#[test]
fn a_tracked_vehicle_holds_a_few_hundred_bytes_beside_its_reorder_buffer() {
    // The state of a vehicle: its entry (the struct, its map slot and id), an open trip, and
    // per buffered frame a slot of key and what the engine keeps of it.
    let vehicle = std::mem::size_of::<Vehicle>() + std::mem::size_of::<String>() + 16;
    let trip = std::mem::size_of::<OpenTrip>();
    let per_frame = std::mem::size_of::<(Key, Pending)>();
    println!("vehicle {vehicle} B, open trip {trip} B, per buffered frame {per_frame} B");
    assert!(vehicle <= 320, "{vehicle}");
    assert!(trip <= 400, "{trip}");
    assert!(per_frame <= 128, "{per_frame}");
}
