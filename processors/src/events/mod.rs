//! The event engine: trips, DTC changes, offline/online and geofence crossings derived from
//! frames by event time (CONTRACT.md §9).
//!
//! Per vehicle, frames first wait in a reorder buffer of `allowed_lateness`: a frame leaves it
//! once a newer frame of that vehicle is more than the bound ahead of it, or once the bound has
//! passed on the receive clock ([`Engine::tick`]); frames leave in event-time order, so any
//! arrival order within the bound derives the same events. A frame later than that is counted
//! ([`Engine::late`]) and changes nothing. Everything an event holds but `detected_at` is a
//! function of the frames alone, and its id is a hash of the vehicle, the type and the frame
//! that caused it, so a replay or a redelivery re-derives the same event with the same id.
//!
//! Pure: no clock (the receive clock comes in as an argument), no I/O. The whole state is
//! serialisable ([`Engine::snapshot`]) so that its runner can persist it with its checkpoint.

pub mod geofence;
mod json;

use std::collections::VecDeque;

/// Vehicles by id, with a fast hasher seeded at random per process. The map holds the id and a
/// box: a table of whole states would be sized at twice the fleet (at 1 M vehicles, 2 M slots of
/// ~290 bytes, 590 MB, against 64 MB of slots and 1 M boxes).
type ByVehicle<V> = foldhash::HashMap<String, V>;

use serde::{Deserialize, Serialize};

pub use geofence::{parse_geojson, Geofence};
pub use json::{event_json, trip_json};

use crate::latest::haversine_m;
use crate::{Body, Dtc, Frame, Micros};

/// The thresholds of `[events]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRules {
    /// A frame this much older than the newest of its vehicle is late.
    pub allowed_lateness_us: Micros,
    /// A fix at this speed or faster moves.
    pub min_speed_kmh: f64,
    /// A fix this far from where the vehicle stood moves.
    pub min_move_m: f64,
    /// A motion trip ends once the vehicle has not moved for this long.
    pub stop_after_us: Micros,
    /// No frame for this long (event time, or receive time for a silent vehicle) ends a trip.
    pub gap_us: Micros,
    /// Fixes less accurate than this add no distance and cross no geofence.
    pub max_accuracy_m: f64,
    /// A jump implying more than this speed adds no distance.
    pub max_jump_kmh: f64,
    /// No frame for this long on the receive clock: `vehicle_offline`.
    pub offline_after_us: Micros,
    /// A fix within this distance of a geofence's boundary changes nothing (no flapping).
    pub geofence_margin_m: f64,
    pub geofences: Vec<Geofence>,
    /// Most frames held in one vehicle's reorder buffer (the oldest leaves first past it).
    pub max_buffered: usize,
}

impl Default for EventRules {
    fn default() -> Self {
        EventRules {
            allowed_lateness_us: 60_000_000,
            min_speed_kmh: 5.0,
            min_move_m: 50.0,
            stop_after_us: 180_000_000,
            gap_us: 300_000_000,
            max_accuracy_m: 50.0,
            max_jump_kmh: 250.0,
            offline_after_us: 300_000_000,
            geofence_margin_m: 20.0,
            geofences: Vec::new(),
            max_buffered: 4096,
        }
    }
}

/// A point of a trip: when and where.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub ts: Micros,
    pub lat: f64,
    pub lon: f64,
}

/// A DTC as the lifecycle tracks it: OBD by its string, J1939 by `(spn, fmi, sa)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DtcCode {
    Obd(String),
    J1939 { spn: u32, fmi: u8, sa: u8 },
}

impl DtcCode {
    fn of(d: &Dtc) -> DtcCode {
        match d {
            Dtc::Obd(s) => DtcCode::Obd(s.clone()),
            Dtc::J1939 { spn, fmi, sa, .. } => DtcCode::J1939 { spn: *spn, fmi: *fmi, sa: *sa },
        }
    }

    /// `P0301`, or `J1939:<spn>/<fmi>/<sa>`: the form in a trip's `dtcs` list.
    pub fn label(&self) -> String {
        match self {
            DtcCode::Obd(s) => s.clone(),
            DtcCode::J1939 { spn, fmi, sa } => format!("J1939:{spn}/{fmi}/{sa}"),
        }
    }
}

/// A trip's summary (open while under way).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub trip_id: String,
    pub vehicle_id: String,
    pub start: Point,
    /// The last moving fix (the ignition-off fix for ignition trips).
    pub end: Point,
    pub distance_m: f64,
    pub moving_us: Micros,
    pub max_speed_kmh: Option<f64>,
    pub odometer_start_m: Option<f64>,
    pub odometer_end_m: Option<f64>,
    pub fuel_start_pct: Option<f64>,
    pub fuel_end_pct: Option<f64>,
    pub soc_start_pct: Option<f64>,
    pub soc_end_pct: Option<f64>,
    /// Codes raised during the trip, in the order raised.
    pub dtcs: Vec<DtcCode>,
    /// By ignition (else by motion).
    pub by_ignition: bool,
    pub open: bool,
}

impl Trip {
    pub fn duration_us(&self) -> Micros {
        self.end.ts - self.start.ts
    }

    /// Distance over moving time, km/h; `None` without moving time.
    pub fn avg_speed_kmh(&self) -> Option<f64> {
        (self.moving_us > 0).then(|| self.distance_m / (self.moving_us as f64 / 1e6) * 3.6)
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum What {
    TripStarted {
        trip_id: String,
        start: Point,
    },
    TripCompleted(Box<Trip>),
    DtcRaised {
        code: DtcCode,
        trip_id: Option<String>,
    },
    DtcCleared {
        code: DtcCode,
    },
    /// `ts` is the newest event time seen from the vehicle.
    VehicleOffline,
    VehicleOnline {
        offline_since: Micros,
    },
    GeofenceEntered {
        geofence_id: String,
        lat: f64,
        lon: f64,
    },
    GeofenceExited {
        geofence_id: String,
        lat: f64,
        lon: f64,
    },
}

impl What {
    /// The contract's `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            What::TripStarted { .. } => "trip_started",
            What::TripCompleted(_) => "trip_completed",
            What::DtcRaised { .. } => "dtc_raised",
            What::DtcCleared { .. } => "dtc_cleared",
            What::VehicleOffline => "vehicle_offline",
            What::VehicleOnline { .. } => "vehicle_online",
            What::GeofenceEntered { .. } => "geofence_entered",
            What::GeofenceExited { .. } => "geofence_exited",
        }
    }

    /// Every type, for metrics and query validation.
    pub const TYPES: [&'static str; 8] = [
        "trip_started",
        "trip_completed",
        "dtc_raised",
        "dtc_cleared",
        "vehicle_offline",
        "vehicle_online",
        "geofence_entered",
        "geofence_exited",
    ];
}

/// One derived event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub vehicle_id: String,
    /// Event time.
    pub ts: Micros,
    /// Receive time of what made it known (a frame's `received_at`, or the tick's clock).
    pub detected_at: Micros,
    pub what: What,
}

/// Reorder-buffer key: event time, then kind (location first), then `seq`.
type Key = (Micros, u8, u64);

/// What the engine keeps of a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Slim {
    Fix {
        lat: f64,
        lon: f64,
        speed: Option<f64>,
        accuracy: Option<f64>,
        odometer: Option<f64>,
        ignition: Option<bool>,
    },
    Diag {
        fuel: Option<f64>,
        soc: Option<f64>,
        odometer: Option<f64>,
        dtcs: Option<Vec<DtcCode>>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pending {
    received_at: Micros,
    slim: Slim,
}

/// A fix as the trip logic remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Fix {
    ts: Micros,
    lat: f64,
    lon: f64,
}

/// A trip under way and what it has added up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenTrip {
    summary: Trip,
    /// Running totals, taken into the summary at each moving fix.
    distance_m: f64,
    moving_us: Micros,
    max_speed_kmh: Option<f64>,
    /// The previous usable fix of the trip (distance is measured from it).
    prev: Option<Fix>,
    /// The last moving fix.
    last_moving: Fix,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Fence {
    inside: bool,
    /// Event time of the first fix on the other side, while the dwell runs.
    since: Option<(Micros, f64, f64)>,
}

/// One vehicle's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Vehicle {
    newest_ts: Option<Micros>,
    released: Option<Key>,
    buffer: Reorder,
    last_received: Micros,
    /// Event time of the last released frame.
    last_ts: Option<Micros>,
    offline: bool,
    /// Times it went offline (part of the offline event's id).
    offline_episodes: u64,
    /// Where the vehicle stood (the last moving fix, or its first).
    anchor: Option<Fix>,
    uses_ignition: bool,
    ignition: bool,
    trip: Option<Box<OpenTrip>>,
    dtcs: Vec<DtcCode>,
    fuel: Option<f64>,
    soc: Option<f64>,
    odometer: Option<f64>,
    fences: Vec<Fence>,
}

/// The engine: every vehicle's state, and the rules.
#[derive(Debug)]
pub struct Engine {
    rules: EventRules,
    vehicles: ByVehicle<Box<Vehicle>>,
    late: u64,
}

/// The serialisable part of an [`Engine`].
#[derive(Debug, Serialize, Deserialize)]
struct State {
    vehicles: ByVehicle<Box<Vehicle>>,
}

impl Engine {
    pub fn new(rules: EventRules) -> Engine {
        Engine { rules, vehicles: ByVehicle::default(), late: 0 }
    }

    /// The state as bytes (JSON), for the runner's checkpoint.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        match self.snapshot_to(&mut bytes) {
            Ok(()) => bytes,
            Err(_) => Vec::new(),
        }
    }

    /// The same bytes as [`Engine::snapshot`], written to `w` as they are made (a million
    /// vehicles' state is about a gigabyte of JSON: a file need not hold it in memory first).
    pub fn snapshot_to<W: std::io::Write>(&self, w: W) -> std::io::Result<()> {
        serde_json::to_writer(w, &StateRef { vehicles: &self.vehicles }).map_err(std::io::Error::other)
    }

    /// An engine from [`Engine::snapshot`]'s bytes.
    pub fn restore(rules: EventRules, bytes: &[u8]) -> Result<Engine, String> {
        let state: State = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut engine = Engine { rules, vehicles: state.vehicles, late: 0 };
        let fences = engine.rules.geofences.len();
        for v in engine.vehicles.values_mut() {
            v.fences.resize(fences, Fence::default());
        }
        Ok(engine)
    }

    /// Frames that came later than the lateness bound since the last call (then reset).
    pub fn take_late(&mut self) -> u64 {
        std::mem::take(&mut self.late)
    }

    /// Vehicles tracked.
    pub fn vehicles(&self) -> usize {
        self.vehicles.len()
    }

    /// Trips under way.
    pub fn open_trips(&self) -> usize {
        self.vehicles.values().filter(|v| v.trip.is_some()).count()
    }

    /// The trip under way of `vehicle_id`, if any (its summary up to the last moving fix).
    pub fn open_trip(&self, vehicle_id: &str) -> Option<Trip> {
        self.vehicles.get(vehicle_id)?.trip.as_ref().map(|t| t.summary.clone())
    }

    /// Takes one frame; appends what it makes known to `out`.
    pub fn push(&mut self, frame: &Frame, out: &mut Vec<Event>) {
        let rules = &self.rules;
        let vid = frame.vehicle_id.as_str();
        // Looked up before inserting: the id is copied once per vehicle, not once per frame.
        if !self.vehicles.contains_key(vid) {
            let fresh = Box::new(Vehicle {
                fences: vec![Fence::default(); rules.geofences.len()],
                ..Vehicle::default()
            });
            self.vehicles.insert(vid.to_owned(), fresh);
        }
        let Some(v) = self.vehicles.get_mut(vid) else { return };
        if v.offline {
            v.offline = false;
            out.push(Event {
                event_id: id(vid, "vehicle_online", &[&frame.ts, &frame.seq]),
                vehicle_id: vid.to_owned(),
                ts: frame.ts,
                detected_at: frame.received_at,
                what: What::VehicleOnline { offline_since: v.last_received },
            });
        }
        v.last_received = v.last_received.max(frame.received_at);
        let key: Key = (frame.ts, frame.kind() as u8, frame.seq);
        let newest = v.newest_ts.unwrap_or(frame.ts).max(frame.ts);
        let late = v.released.is_some_and(|r| key <= r) || frame.ts < newest - rules.allowed_lateness_us;
        if late {
            self.late += 1;
            return;
        }
        v.newest_ts = Some(newest);
        v.buffer.insert(key, Pending { received_at: frame.received_at, slim: slim(frame) });
        // Release what a newer frame has passed by more than the bound (and the oldest past
        // the buffer's size).
        loop {
            let over = v.buffer.len() > rules.max_buffered;
            let Some(k) = v.buffer.first_key() else { break };
            if k.0 >= newest - rules.allowed_lateness_us && !over {
                break;
            }
            let Some((k, p)) = v.buffer.pop_first() else { break };
            release(rules, vid, v, k, p, out);
        }
    }

    /// The receive clock moved to `now`: releases buffered frames whose bound has passed, ends
    /// the trips of vehicles silent for `gap`, and reports vehicles silent for
    /// `offline_after`.
    pub fn tick(&mut self, now: Micros, out: &mut Vec<Event>) {
        let rules = &self.rules;
        for (vid, v) in &mut self.vehicles {
            while v.buffer.first_received().is_some_and(|at| at + rules.allowed_lateness_us <= now) {
                let Some((k, p)) = v.buffer.pop_first() else { break };
                release(rules, vid, v, k, p, out);
            }
            let silent = now - v.last_received;
            if v.buffer.is_empty() && silent >= rules.gap_us && v.trip.is_some() {
                complete_trip(vid, v, now, out);
            }
            if !v.offline && silent >= rules.offline_after_us {
                v.offline = true;
                v.offline_episodes += 1;
                let last_ts = v.newest_ts.unwrap_or_default();
                out.push(Event {
                    event_id: id(vid, "vehicle_offline", &[&last_ts, &v.offline_episodes]),
                    vehicle_id: vid.clone(),
                    ts: last_ts,
                    detected_at: now,
                    what: What::VehicleOffline,
                });
            }
        }
    }

    /// Releases every buffered frame (at the end of a bounded input, or in tests).
    pub fn flush(&mut self, out: &mut Vec<Event>) {
        let rules = &self.rules;
        for (vid, v) in &mut self.vehicles {
            while let Some((k, p)) = v.buffer.pop_first() {
                release(rules, vid, v, k, p, out);
            }
        }
    }
}

#[derive(Serialize)]
struct StateRef<'a> {
    vehicles: &'a ByVehicle<Box<Vehicle>>,
}

fn slim(frame: &Frame) -> Slim {
    match &frame.body {
        Body::Location(l) => Slim::Fix {
            lat: l.lat,
            lon: l.lon,
            speed: l.speed_kmh,
            accuracy: l.accuracy_m,
            odometer: l.odometer_m,
            ignition: l.ignition,
        },
        Body::Diagnostic(d) => Slim::Diag {
            fuel: d.fuel_level_pct,
            soc: d.battery_soc_pct,
            odometer: d.odometer_m,
            dtcs: d.dtcs.as_ref().map(|list| {
                let mut codes: Vec<DtcCode> = Vec::with_capacity(list.len());
                for c in list.iter().map(DtcCode::of) {
                    if !codes.contains(&c) {
                        codes.push(c);
                    }
                }
                codes
            }),
        },
    }
}

/// A deterministic id: 128 bits of two FNV-1a hashes over the parts, as 32 hex digits.
fn id(vehicle_id: &str, kind: &str, parts: &[&dyn std::fmt::Display]) -> String {
    let mut text = format!("{vehicle_id}\u{1f}{kind}");
    for p in parts {
        text.push('\u{1f}');
        text.push_str(&p.to_string());
    }
    let fnv = |offset: u64| {
        text.bytes().fold(offset, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
    };
    format!("{:016x}{:016x}", fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142))
}

/// The trip id of a trip that starts at `start`.
fn trip_id(vehicle_id: &str, start: &Point) -> String {
    id(vehicle_id, "trip", &[&start.ts])
}

/// One frame leaves the reorder buffer, in event-time order.
fn release(rules: &EventRules, vid: &str, v: &mut Vehicle, key: Key, p: Pending, out: &mut Vec<Event>) {
    let ts = key.0;
    v.released = Some(key);
    if v.last_ts.is_some_and(|last| ts - last > rules.gap_us) {
        // After a gap the vehicle starts afresh: where it stood before says nothing now.
        complete_trip(vid, v, p.received_at, out);
        v.anchor = None;
    }
    v.last_ts = Some(ts);
    match p.slim {
        Slim::Fix { lat, lon, speed, accuracy, odometer, ignition } => {
            if odometer.is_some() {
                v.odometer = odometer;
            }
            let fix = Fix { ts, lat, lon };
            let usable = accuracy.is_none_or(|a| a <= rules.max_accuracy_m);
            let moving = speed.is_some_and(|s| s >= rules.min_speed_kmh)
                || (usable
                    && v.anchor.is_some_and(|a| haversine_m(a.lat, a.lon, lat, lon) >= rules.min_move_m));
            if usable && (moving || v.anchor.is_none()) {
                v.anchor = Some(fix);
            }
            if let Some(on) = ignition {
                v.uses_ignition = true;
                v.ignition = on;
            }
            if v.uses_ignition {
                if v.trip.is_none() && v.ignition {
                    start_trip(vid, v, fix, true, p.received_at, out);
                }
                if let Some(t) = v.trip.as_mut() {
                    accumulate(rules, t, fix, usable, moving, speed);
                    take_totals(t, fix, v.odometer, v.fuel, v.soc);
                }
                if !v.ignition && v.trip.is_some() {
                    complete_trip(vid, v, p.received_at, out);
                }
            } else {
                if v.trip.is_none() && moving {
                    start_trip(vid, v, fix, false, p.received_at, out);
                }
                if let Some(t) = v.trip.as_mut() {
                    accumulate(rules, t, fix, usable, moving, speed);
                    if moving {
                        t.last_moving = fix;
                        take_totals(t, fix, v.odometer, v.fuel, v.soc);
                    }
                    if !moving && ts - t.last_moving.ts >= rules.stop_after_us {
                        complete_trip(vid, v, p.received_at, out);
                    }
                }
            }
            if usable {
                geofences(rules, vid, v, fix, p.received_at, out);
            }
        }
        Slim::Diag { fuel, soc, odometer, dtcs } => {
            if fuel.is_some() {
                v.fuel = fuel;
            }
            if soc.is_some() {
                v.soc = soc;
            }
            if odometer.is_some() {
                v.odometer = odometer;
            }
            if let Some(codes) = dtcs {
                let trip_id = v.trip.as_ref().map(|t| t.summary.trip_id.clone());
                for c in v.dtcs.iter().filter(|c| !codes.contains(c)) {
                    out.push(Event {
                        event_id: id(vid, "dtc_cleared", &[&ts, &c.label()]),
                        vehicle_id: vid.to_owned(),
                        ts,
                        detected_at: p.received_at,
                        what: What::DtcCleared { code: c.clone() },
                    });
                }
                for c in codes.iter().filter(|c| !v.dtcs.contains(c)) {
                    out.push(Event {
                        event_id: id(vid, "dtc_raised", &[&ts, &c.label()]),
                        vehicle_id: vid.to_owned(),
                        ts,
                        detected_at: p.received_at,
                        what: What::DtcRaised { code: c.clone(), trip_id: trip_id.clone() },
                    });
                    if let Some(t) = v.trip.as_mut() {
                        t.summary.dtcs.push(c.clone());
                    }
                }
                v.dtcs = codes;
            }
        }
    }
}

fn start_trip(
    vid: &str,
    v: &mut Vehicle,
    fix: Fix,
    by_ignition: bool,
    detected_at: Micros,
    out: &mut Vec<Event>,
) {
    let start = Point { ts: fix.ts, lat: fix.lat, lon: fix.lon };
    let trip_id = trip_id(vid, &start);
    out.push(Event {
        event_id: id(vid, "trip_started", &[&start.ts]),
        vehicle_id: vid.to_owned(),
        ts: start.ts,
        detected_at,
        what: What::TripStarted { trip_id: trip_id.clone(), start },
    });
    v.trip = Some(Box::new(OpenTrip {
        summary: Trip {
            trip_id,
            vehicle_id: vid.to_owned(),
            start,
            end: start,
            distance_m: 0.0,
            moving_us: 0,
            max_speed_kmh: None,
            odometer_start_m: v.odometer,
            odometer_end_m: v.odometer,
            fuel_start_pct: v.fuel,
            fuel_end_pct: v.fuel,
            soc_start_pct: v.soc,
            soc_end_pct: v.soc,
            dtcs: Vec::new(),
            by_ignition,
            open: true,
        },
        distance_m: 0.0,
        moving_us: 0,
        max_speed_kmh: None,
        prev: None,
        last_moving: fix,
    }));
}

/// Adds the step from the trip's previous usable fix to `fix`.
fn accumulate(
    rules: &EventRules,
    t: &mut OpenTrip,
    fix: Fix,
    usable: bool,
    moving: bool,
    speed: Option<f64>,
) {
    if let Some(s) = speed {
        t.max_speed_kmh = Some(t.max_speed_kmh.map_or(s, |m: f64| m.max(s)));
    }
    if !usable {
        return;
    }
    if let Some(prev) = t.prev {
        let dt = fix.ts - prev.ts;
        let d = haversine_m(prev.lat, prev.lon, fix.lat, fix.lon);
        if dt <= 0 || d / (dt as f64 / 1e6) * 3.6 > rules.max_jump_kmh {
            // No time passed, or an implausible jump: this fix adds nothing, and the next step
            // is measured from the previous one.
            return;
        }
        t.distance_m += d;
        if moving {
            t.moving_us += dt;
        }
    }
    t.prev = Some(fix);
}

/// Takes the running totals into the summary: the trip so far ends at `fix`.
fn take_totals(t: &mut OpenTrip, fix: Fix, odometer: Option<f64>, fuel: Option<f64>, soc: Option<f64>) {
    let s = &mut t.summary;
    s.end = Point { ts: fix.ts, lat: fix.lat, lon: fix.lon };
    s.distance_m = t.distance_m;
    s.moving_us = t.moving_us;
    s.max_speed_kmh = t.max_speed_kmh;
    s.odometer_end_m = odometer;
    s.fuel_end_pct = fuel;
    s.soc_end_pct = soc;
}

fn complete_trip(vid: &str, v: &mut Vehicle, detected_at: Micros, out: &mut Vec<Event>) {
    let Some(t) = v.trip.take() else { return };
    let mut summary = t.summary;
    summary.open = false;
    out.push(Event {
        event_id: id(vid, "trip_completed", &[&summary.start.ts]),
        vehicle_id: vid.to_owned(),
        ts: summary.end.ts,
        detected_at,
        what: What::TripCompleted(Box::new(summary)),
    });
    v.anchor = Some(Fix { ts: t.last_moving.ts, lat: t.last_moving.lat, lon: t.last_moving.lon });
}

fn geofences(
    rules: &EventRules,
    vid: &str,
    v: &mut Vehicle,
    fix: Fix,
    detected_at: Micros,
    out: &mut Vec<Event>,
) {
    for (fence, state) in rules.geofences.iter().zip(v.fences.iter_mut()) {
        let inside = match fence.side(fix.lat, fix.lon, rules.geofence_margin_m) {
            geofence::Side::Boundary => continue,
            geofence::Side::Inside => true,
            geofence::Side::Outside => false,
        };
        if inside == state.inside {
            state.since = None;
            continue;
        }
        let (since, lat, lon) = *state.since.get_or_insert((fix.ts, fix.lat, fix.lon));
        if fix.ts - since < fence.dwell_us {
            continue;
        }
        state.inside = inside;
        state.since = None;
        let (kind, what) = if inside {
            ("geofence_entered", What::GeofenceEntered { geofence_id: fence.id.clone(), lat, lon })
        } else {
            ("geofence_exited", What::GeofenceExited { geofence_id: fence.id.clone(), lat, lon })
        };
        out.push(Event {
            event_id: id(vid, kind, &[&since, &fence.id]),
            vehicle_id: vid.to_owned(),
            ts: since,
            detected_at,
            what,
        });
    }
}

/// A vehicle's reorder buffer: frames by key, oldest first, in a sorted ring. Frames mostly come
/// in order (a push at the back, a pop at the front), and the buffer grows by doubling from one
/// frame: a vehicle holding one frame costs one slot, where a B-tree map costs a node of eleven
/// (1.2 KB, 1.2 GB at 1 M vehicles each holding a frame).
#[derive(Debug, Clone, Default, PartialEq)]
struct Reorder(VecDeque<(Key, Pending)>);

impl Reorder {
    /// Inserts a frame; one with the key of a held frame replaces it.
    fn insert(&mut self, key: Key, p: Pending) {
        let at = match self.0.back() {
            Some((last, _)) if *last < key => self.0.len(),
            None => 0,
            Some(_) => self.0.partition_point(|(k, _)| *k < key),
        };
        if let Some(slot) = self.0.get_mut(at).filter(|(k, _)| *k == key) {
            slot.1 = p;
            return;
        }
        if self.0.len() == self.0.capacity() {
            self.0.reserve_exact(self.0.len().max(1));
        }
        self.0.insert(at, (key, p));
    }

    fn first_key(&self) -> Option<Key> {
        self.0.front().map(|(k, _)| *k)
    }

    fn first_received(&self) -> Option<Micros> {
        self.0.front().map(|(_, p)| p.received_at)
    }

    fn pop_first(&mut self) -> Option<(Key, Pending)> {
        self.0.pop_front()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The reorder buffer as a list of pairs, oldest first (JSON object keys must be strings).
impl Serialize for Reorder {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(k, p)| (k, p)))
    }
}

impl<'de> Deserialize<'de> for Reorder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Reorder, D::Error> {
        let mut buffer = Reorder::default();
        for (k, p) in Vec::<(Key, Pending)>::deserialize(d)? {
            buffer.insert(k, p);
        }
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests;
