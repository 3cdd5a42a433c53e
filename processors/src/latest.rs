//! Latest state per vehicle: the L1 cache (moka).
//!
//! "Latest" is newest by event time `ts`, never merely last received: a late, buffered or
//! re-delivered frame goes to history but never moves a vehicle's latest state backwards (the
//! bug that made other platforms show vehicles at old positions). Location and diagnostic
//! state are tracked separately, each by its own newest `ts` (ties broken by the higher `seq`).
//!
//! The cache is bounded by a maximum number of vehicles and an idle TTL. Writes come from the
//! shard that owns a vehicle, one per vehicle per batch.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::frame::{Body, Diagnostic, Dtc, Frame, Location, Micros};
use crate::stage::{Batch, Counters, Stage};

/// What L1 keeps for one vehicle: the newest frame of each kind, shared (a batch that moves one
/// kind forward does not copy the other).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VehicleState {
    pub location: Option<Arc<Frame>>,
    pub diagnostic: Option<Arc<Frame>>,
}

fn is_newer(frame: &Frame, held: Option<&Frame>) -> bool {
    held.is_none_or(|h| (frame.ts, frame.seq) > (h.ts, h.seq))
}

impl VehicleState {
    fn slot(&mut self, frame: &Frame) -> &mut Option<Arc<Frame>> {
        match frame.body {
            Body::Location(_) => &mut self.location,
            Body::Diagnostic(_) => &mut self.diagnostic,
        }
    }

    /// Folds `frame` in if it is newer (by `ts`, then `seq`) than what is held for its kind.
    /// Returns whether it was.
    pub fn merge(&mut self, frame: &Frame) -> bool {
        let slot = self.slot(frame);
        let newer = is_newer(frame, slot.as_deref());
        if newer {
            *slot = Some(Arc::new(frame.clone()));
        }
        newer
    }

    /// The newest `ts` of either kind.
    pub fn newest_ts(&self) -> Option<i64> {
        let l = self.location.as_ref().map(|f| f.ts);
        let d = self.diagnostic.as_ref().map(|f| f.ts);
        l.max(d)
    }
}

/// Bounded L1 cache of latest state, shared by the shards (writers) and the API (readers).
///
/// moka spends about 270 bytes of its own on every entry, more than a vehicle's packed state, so
/// an entry is not a vehicle but a bucket of them: the vehicle id's hash picks one of
/// `max_vehicles / 16` buckets, and a bucket holds its vehicles packed (the id inline, values as
/// plain `f64` behind a presence mask). moka bounds and ages the buckets, weighed by the vehicles
/// they hold; a bucket drops its own vehicles idle past the TTL when it is next written. Idle
/// time runs on fleetpipe's receive clock (`received_at`, or the time a fill was asked for),
/// never read here. Writes for one vehicle come from the shard that owns it; a bucket's lock is
/// held for one vehicle's compare-and-merge, never across moka calls.
#[derive(Clone)]
pub struct LatestCache {
    buckets: moka::sync::Cache<u64, Arc<Bucket>>,
    mask: u64,
    hasher: std::collections::hash_map::RandomState,
    idle_secs: u32,
    /// `validate.max_ahead_s`: a frame further ahead of its `received_at` never becomes latest.
    max_ahead_us: Micros,
}

/// The latest-state stage: folds each shard batch into the shared cache (every shard holds a
/// clone; a vehicle's writes come from its own shard).
impl Stage for LatestCache {
    fn name(&self) -> &'static str {
        "latest"
    }

    fn apply(&mut self, batch: &mut Batch, _counters: &mut Counters) {
        if !batch.frames.is_empty() {
            LatestCache::apply(self, &batch.frames);
        }
    }
}

/// `[cache]`: the L1 bounds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub max_vehicles: u64,
    pub idle_ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { max_vehicles: 1_000_000, idle_ttl_secs: 24 * 3600 }
    }
}

impl CacheConfig {
    /// An empty cache with these bounds.
    pub fn open(&self) -> LatestCache {
        LatestCache::new(self.max_vehicles, Duration::from_secs(self.idle_ttl_secs.max(1)))
    }
}

/// Vehicles per bucket at `max_vehicles`: enough to spread moka's per-entry cost thin, few
/// enough that a linear scan of the bucket is a handful of cache lines.
const VEHICLES_PER_BUCKET: u64 = 16;

impl LatestCache {
    pub fn new(max_vehicles: u64, idle_ttl: Duration) -> Self {
        let nbuckets = (max_vehicles / VEHICLES_PER_BUCKET).max(1).next_power_of_two();
        let buckets = moka::sync::Cache::builder()
            .max_capacity(max_vehicles)
            .weigher(|_: &u64, b: &Arc<Bucket>| b.len())
            .time_to_idle(idle_ttl)
            .build();
        LatestCache {
            buckets,
            mask: nbuckets - 1,
            hasher: std::collections::hash_map::RandomState::new(),
            idle_secs: u32::try_from(idle_ttl.as_secs()).unwrap_or(u32::MAX).max(1),
            max_ahead_us: crate::validate::Rules::default().max_ahead_us,
        }
    }

    /// Frames more than `max_ahead_us` ahead of the clock that received them are kept out
    /// (CONTRACT.md §1: they are history, never latest state).
    pub fn with_max_ahead(mut self, max_ahead_us: Micros) -> Self {
        self.max_ahead_us = max_ahead_us;
        self
    }

    fn bucket_key(&self, id: &str) -> u64 {
        self.hasher.hash_one(id) & self.mask
    }

    /// Folds `frames` into vehicle `id`, touched at `now` (receive-clock seconds); re-weighs the
    /// bucket in moka when it gained or lost vehicles. Returns whether the vehicle moved forward.
    fn upsert<'a>(&self, id: &str, now: u32, frames: impl Iterator<Item = &'a Frame>) -> bool {
        let key = self.bucket_key(id);
        let bucket = self.buckets.get_with(key, || Arc::new(Bucket::default()));
        let (changed, resized) = bucket.upsert(id, now, self.idle_secs, frames);
        if resized {
            self.buckets.insert(key, bucket);
        }
        changed
    }

    /// Applies a batch: one bucket lookup per vehicle, not per frame, and only the frames that
    /// become latest are packed. The batch's newest `received_at` is "now" for the idle TTL.
    /// Returns how many vehicles moved forward.
    pub fn apply(&self, frames: &[Frame]) -> usize {
        let now = secs(frames.iter().map(|f| f.received_at).max().unwrap_or(0));
        // Newest location and diagnostic per vehicle within the batch.
        let mut newest: foldhash::HashMap<&str, [Option<&Frame>; 2]> =
            HashMap::with_capacity_and_hasher(frames.len().min(1 << 16), Default::default());
        for f in frames.iter().filter(|f| !crate::validate::is_clock_ahead(f, self.max_ahead_us)) {
            let slot = &mut newest.entry(f.vehicle_id.as_str()).or_default()[f.kind() as usize];
            if is_newer(f, *slot) {
                *slot = Some(f);
            }
        }
        newest
            .into_iter()
            .filter(|(id, candidates)| self.upsert(id, now, candidates.iter().flatten().copied()))
            .count()
    }

    /// Puts a state fetched from a lower tier (L2, Postgres) unless L1 already holds newer;
    /// `now` (receive-clock microseconds) starts its idle time.
    pub fn fill(&self, id: &str, state: &VehicleState, now: Micros) {
        self.upsert(id, secs(now), state.location.iter().chain(state.diagnostic.iter()).map(|f| &**f));
    }

    pub fn get(&self, id: &str) -> Option<Arc<VehicleState>> {
        let bucket = self.buckets.get(&self.bucket_key(id))?;
        let slots = bucket.slots.read().unwrap_or_else(PoisonError::into_inner);
        let slot = slots.iter().find(|s| s.id.as_bytes() == id.as_bytes())?;
        Some(Arc::new(slot.state()))
    }

    /// Vehicles whose latest location lies within `radius_m` of (lat, lon), nearest first.
    pub fn near(&self, lat: f64, lon: f64, radius_m: f64, limit: usize) -> Vec<(Arc<VehicleState>, f64)> {
        let mut hits = Vec::new();
        for (_, bucket) in self.buckets.iter() {
            let slots = bucket.slots.read().unwrap_or_else(PoisonError::into_inner);
            for s in slots.iter() {
                let Some(l) = &s.location else { continue };
                let d = haversine_m(lat, lon, l.lat, l.lon);
                if d <= radius_m {
                    hits.push((Arc::new(s.state()), d));
                }
            }
        }
        hits.sort_by(|a, b| a.1.total_cmp(&b.1));
        hits.truncate(limit);
        hits
    }

    /// The latest fixes of at most `limit` of the vehicles `keep` lets through, those first by
    /// vehicle id, and how many of them hold a fix (a scan of every bucket, for the console;
    /// call it off the async workers).
    pub fn positions(&self, limit: usize, keep: impl Fn(&str) -> bool) -> (Vec<Position>, u64) {
        // A max-heap of the `limit` smallest ids seen so far.
        let mut heap = std::collections::BinaryHeap::<ById>::new();
        let mut total = 0u64;
        for (_, bucket) in self.buckets.iter() {
            let slots = bucket.slots.read().unwrap_or_else(PoisonError::into_inner);
            for s in slots.iter() {
                let Some(l) = &s.location else { continue };
                if !keep(s.id.as_str()) {
                    continue;
                }
                total += 1;
                if limit == 0
                    || heap.len() == limit
                        && heap.peek().is_some_and(|top| *top.0.vehicle_id <= *s.id.as_str())
                {
                    continue;
                }
                let fix = l.unpack();
                heap.push(ById(Position {
                    vehicle_id: s.id.as_str().into(),
                    ts: l.stamp.ts,
                    lat: fix.lat,
                    lon: fix.lon,
                    speed_kmh: fix.speed_kmh,
                    heading_deg: fix.heading_deg,
                }));
                if heap.len() > limit {
                    heap.pop();
                }
            }
        }
        (heap.into_sorted_vec().into_iter().map(|p| p.0).collect(), total)
    }

    /// Vehicles held (as moka last weighed the buckets).
    pub fn len(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.weighted_size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A vehicle's latest fix, as the console lists it (ordered by vehicle id).
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub vehicle_id: Box<str>,
    pub ts: Micros,
    pub lat: f64,
    pub lon: f64,
    pub speed_kmh: Option<f64>,
    pub heading_deg: Option<f64>,
}

/// A position ordered by vehicle id alone (for the bounded heap of [`LatestCache::positions`]).
struct ById(Position);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.vehicle_id == other.0.vehicle_id
    }
}

impl Eq for ById {}

impl PartialOrd for ById {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ById {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.vehicle_id.cmp(&other.0.vehicle_id)
    }
}

/// Microseconds to whole seconds, clamped to `u32`.
fn secs(us: Micros) -> u32 {
    u32::try_from(us.div_euclid(1_000_000).max(0)).unwrap_or(u32::MAX)
}

/// One moka entry: the vehicles whose id hashes here.
#[derive(Default)]
struct Bucket {
    slots: RwLock<Vec<Slot>>,
    /// When idle vehicles were last dropped (receive-clock seconds).
    pruned_at: AtomicU32,
}

impl Bucket {
    fn len(&self) -> u32 {
        u32::try_from(self.slots.read().unwrap_or_else(PoisonError::into_inner).len()).unwrap_or(u32::MAX)
    }

    /// Returns (whether vehicle `id` moved forward, whether the bucket's vehicle count changed).
    fn upsert<'a>(
        &self,
        id: &str,
        now: u32,
        idle: u32,
        frames: impl Iterator<Item = &'a Frame>,
    ) -> (bool, bool) {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        let before = slots.len();
        if now.saturating_sub(self.pruned_at.load(Ordering::Relaxed)) >= (idle / 4).max(1) {
            slots.retain(|s| now.saturating_sub(s.touched) <= idle);
            self.pruned_at.store(now, Ordering::Relaxed);
        }
        let i = match slots.iter().position(|s| s.id.as_bytes() == id.as_bytes()) {
            Some(i) => i,
            None => {
                // Grow by an eighth, not double: the slack is paid by every bucket.
                if slots.len() == slots.capacity() {
                    let more = (slots.len() / 8).max(1);
                    slots.reserve_exact(more);
                }
                slots.push(Slot::new(id, now));
                slots.len() - 1
            }
        };
        let slot = &mut slots[i];
        slot.touched = slot.touched.max(now);
        let mut changed = false;
        for f in frames {
            changed |= slot.merge(f);
        }
        (changed, slots.len() != before)
    }
}

/// One vehicle's latest state, packed.
struct Slot {
    id: VehicleId,
    /// Newest receive time of its frames or fill (seconds), for the idle TTL.
    touched: u32,
    location: Option<PackedLocation>,
    diagnostic: Option<PackedDiagnostic>,
}

impl Slot {
    fn new(id: &str, now: u32) -> Self {
        Slot { id: VehicleId::new(id), touched: now, location: None, diagnostic: None }
    }

    fn merge(&mut self, f: &Frame) -> bool {
        let stamp = Stamp { ts: f.ts, seq: f.seq, received_at: f.received_at };
        let held = match &f.body {
            Body::Location(_) => self.location.as_ref().map(|l| &l.stamp),
            Body::Diagnostic(_) => self.diagnostic.as_ref().map(|d| &d.stamp),
        };
        if held.is_some_and(|h| (f.ts, f.seq) <= (h.ts, h.seq)) {
            return false;
        }
        match &f.body {
            Body::Location(l) => self.location = Some(PackedLocation::pack(stamp, l)),
            Body::Diagnostic(d) => self.diagnostic = Some(PackedDiagnostic::pack(stamp, d)),
        }
        true
    }

    fn state(&self) -> VehicleState {
        let frame = |stamp: &Stamp, body: Body| {
            Arc::new(Frame {
                vehicle_id: self.id.as_str().to_owned(),
                ts: stamp.ts,
                seq: stamp.seq,
                received_at: stamp.received_at,
                body,
            })
        };
        VehicleState {
            location: self.location.as_ref().map(|l| frame(&l.stamp, Body::Location(l.unpack()))),
            diagnostic: self
                .diagnostic
                .as_ref()
                .map(|d| frame(&d.stamp, Body::Diagnostic(Box::new(d.unpack())))),
        }
    }
}

/// A vehicle id held inline when it is short (a VIN is 17 characters), boxed otherwise.
enum VehicleId {
    Inline { len: u8, bytes: [u8; VehicleId::INLINE] },
    Boxed(Box<str>),
}

impl VehicleId {
    const INLINE: usize = 22;

    fn new(id: &str) -> Self {
        match u8::try_from(id.len()) {
            Ok(len) if id.len() <= Self::INLINE => {
                let mut bytes = [0; Self::INLINE];
                bytes[..id.len()].copy_from_slice(id.as_bytes());
                VehicleId::Inline { len, bytes }
            }
            _ => VehicleId::Boxed(id.into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            VehicleId::Inline { len, bytes } => &bytes[..usize::from(*len)],
            VehicleId::Boxed(s) => s.as_bytes(),
        }
    }

    fn as_str(&self) -> &str {
        // Inline bytes are a whole `&str` copied, so always UTF-8.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

#[derive(Clone, Copy)]
struct Stamp {
    ts: i64,
    seq: u64,
    received_at: i64,
}

/// Sets bit `i` of `present` and `vals[i]` when `v` is `Some`.
fn put(vals: &mut [f64], present: &mut u16, i: usize, v: Option<f64>) {
    if let Some(v) = v {
        vals[i] = v;
        *present |= 1 << i;
    }
}

fn take(vals: &[f64], present: u16, i: usize) -> Option<f64> {
    (present & (1 << i) != 0).then(|| vals[i])
}

struct PackedLocation {
    stamp: Stamp,
    lat: f64,
    lon: f64,
    /// speed_kmh, heading_deg, alt_m, accuracy_m, odometer_m.
    vals: [f64; 5],
    satellites: u32,
    /// Bits 0–4: `vals`; 5: satellites; 6: ignition.
    present: u16,
    ignition: bool,
}

impl PackedLocation {
    fn pack(stamp: Stamp, l: &Location) -> Self {
        let (mut vals, mut present) = ([0.0; 5], 0u16);
        for (i, v) in
            [l.speed_kmh, l.heading_deg, l.alt_m, l.accuracy_m, l.odometer_m].into_iter().enumerate()
        {
            put(&mut vals, &mut present, i, v);
        }
        if l.satellites.is_some() {
            present |= 1 << 5;
        }
        if l.ignition.is_some() {
            present |= 1 << 6;
        }
        PackedLocation {
            stamp,
            lat: l.lat,
            lon: l.lon,
            vals,
            satellites: l.satellites.unwrap_or(0),
            present,
            ignition: l.ignition.unwrap_or(false),
        }
    }

    fn unpack(&self) -> Location {
        let v = |i| take(&self.vals, self.present, i);
        Location {
            lat: self.lat,
            lon: self.lon,
            speed_kmh: v(0),
            heading_deg: v(1),
            alt_m: v(2),
            accuracy_m: v(3),
            odometer_m: v(4),
            satellites: (self.present & (1 << 5) != 0).then_some(self.satellites),
            ignition: (self.present & (1 << 6) != 0).then_some(self.ignition),
        }
    }
}

/// A diagnostic's DTCs and signals.
type DiagExtra = (Option<Vec<Dtc>>, Option<String>);

struct PackedDiagnostic {
    stamp: Stamp,
    /// [`Diagnostic::MEASURES`], in that order.
    vals: [f64; Diagnostic::MEASURES.len()],
    /// Bits 0–7: `vals`; 8: mil_on.
    present: u16,
    mil_on: bool,
    /// DTCs and signals, boxed: most frames carry neither.
    extra: Option<Box<DiagExtra>>,
}

impl PackedDiagnostic {
    fn pack(stamp: Stamp, d: &Diagnostic) -> Self {
        let (mut vals, mut present) = ([0.0; Diagnostic::MEASURES.len()], 0u16);
        for (i, m) in Diagnostic::MEASURES.iter().enumerate() {
            put(&mut vals, &mut present, i, (m.get)(d));
        }
        if d.mil_on.is_some() {
            present |= 1 << 8;
        }
        let extra =
            (d.dtcs.is_some() || d.signals.is_some()).then(|| Box::new((d.dtcs.clone(), d.signals.clone())));
        PackedDiagnostic { stamp, vals, present, mil_on: d.mil_on.unwrap_or(false), extra }
    }

    fn unpack(&self) -> Diagnostic {
        let (dtcs, signals) = self.extra.as_deref().cloned().unwrap_or_default();
        let mut d = Diagnostic {
            mil_on: (self.present & (1 << 8) != 0).then_some(self.mil_on),
            dtcs,
            signals,
            ..Diagnostic::default()
        };
        for (i, m) in Diagnostic::MEASURES.iter().enumerate() {
            (m.set)(&mut d, take(&self.vals, self.present, i));
        }
        d
    }
}

/// Great-circle distance in metres (mean Earth radius 6,371,008.8 m).
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6_371_008.8 * a.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::{full_diag_frame, full_loc_frame};

    fn loc(v: &str, ts: i64, lat: f64) -> Frame {
        Frame {
            vehicle_id: v.into(),
            ts,
            seq: 0,
            received_at: 0,
            body: Body::Location(Location { lat, lon: 10.0, ..Default::default() }),
        }
    }

    #[test]
    fn a_late_frame_never_moves_latest_backwards() {
        let c = LatestCache::new(100, Duration::from_secs(60));
        c.apply(&[loc("a", 20, 2.0), loc("a", 10, 1.0)]);
        c.apply(&[loc("a", 15, 1.5)]);
        let s = c.get("a").expect("vehicle a");
        assert_eq!(s.location.as_ref().map(|f| f.ts), Some(20));
        assert!(s.diagnostic.is_none());
    }

    #[test]
    fn location_and_diagnostic_are_tracked_by_their_own_ts() {
        let c = LatestCache::new(100, Duration::from_secs(60));
        let diag = Frame {
            vehicle_id: "a".into(),
            ts: 5,
            seq: 0,
            received_at: 0,
            body: Body::Diagnostic(Box::new(Diagnostic { engine_rpm: Some(900.0), ..Default::default() })),
        };
        c.apply(&[loc("a", 20, 2.0), diag.clone()]);
        let s = c.get("a").expect("vehicle a");
        assert_eq!(s.diagnostic.as_deref(), Some(&diag));
        assert_eq!(s.newest_ts(), Some(20));
    }

    #[test]
    fn near_returns_vehicles_within_radius_nearest_first() {
        let c = LatestCache::new(100, Duration::from_secs(60));
        c.apply(&[loc("far", 1, 56.2), loc("near", 1, 56.1001), loc("here", 1, 56.1)]);
        let hits = c.near(56.1, 10.0, 1_000.0, 10);
        let ids: Vec<&str> =
            hits.iter().filter_map(|(s, _)| s.location.as_ref().map(|f| f.vehicle_id.as_str())).collect();
        assert_eq!(ids, vec!["here", "near"]);
        assert!((hits[1].1 - 11.1).abs() < 0.2, "distance {}", hits[1].1);
    }

    #[test]
    fn positions_lists_the_first_vehicles_by_id_with_their_newest_fix_and_counts_them_all() {
        let c = LatestCache::new(1_000, Duration::from_secs(60));
        let frames: Vec<Frame> =
            (0..50).rev().map(|i| loc(&format!("V{i:02}"), 10 + i, f64::from(i as u8))).collect();
        c.apply(&frames);
        c.apply(&[loc("V03", 5, 99.0), loc("V04", 100, 44.5)]);
        let all = |_: &str| true;
        let (first, total) = c.positions(5, all);
        assert_eq!(total, 50);
        let ids: Vec<&str> = first.iter().map(|p| &*p.vehicle_id).collect();
        assert_eq!(ids, ["V00", "V01", "V02", "V03", "V04"]);
        assert_eq!((first[3].ts, first[3].lat), (13, 3.0), "a late fix is not latest");
        assert_eq!((first[4].ts, first[4].lat, first[4].lon), (100, 44.5, 10.0));
        assert_eq!(c.positions(0, all).0.len(), 0);
        assert_eq!(c.positions(500, all).0.len(), 50);
        let (mine, total) = c.positions(5, |id| id >= "V47");
        let ids: Vec<&str> = mine.iter().map(|p| &*p.vehicle_id).collect();
        assert_eq!((ids, total), (vec!["V47", "V48", "V49"], 3), "only what `keep` lets through, counted");
    }

    #[test]
    fn packed_state_reads_back_exactly() {
        let c = LatestCache::new(100, Duration::from_secs(60));
        let long_id = "V".repeat(64);
        // The codec tests' frames using every field, under a 64-character id.
        let full_loc = Frame { vehicle_id: long_id.clone(), seq: u64::MAX, ..full_loc_frame() };
        let mut full_diag = Frame { vehicle_id: long_id.clone(), ..full_diag_frame() };
        if let Body::Diagnostic(d) = &mut full_diag.body {
            d.dtcs = Some(vec![Dtc::Obd("P0301".into()), Dtc::J1939 { spn: 100, fmi: 1, oc: 3, sa: 0 }]);
        }
        let bare_diag = Frame {
            vehicle_id: "short".into(),
            ts: 9,
            seq: 0,
            received_at: 10,
            body: Body::Diagnostic(Box::new(Diagnostic { dtcs: Some(vec![]), ..Default::default() })),
        };
        let frames = [full_loc.clone(), full_diag.clone(), loc("short", 8, 1.0), bare_diag.clone()];
        c.apply(&frames);
        let long = c.get(&long_id).expect("long id held");
        assert_eq!(long.location.as_deref(), Some(&full_loc));
        assert_eq!(long.diagnostic.as_deref(), Some(&full_diag));
        let short = c.get("short").expect("short id held");
        assert_eq!(short.location.as_deref(), Some(&loc("short", 8, 1.0)));
        assert_eq!(short.diagnostic.as_deref(), Some(&bare_diag));
        assert!(c.get("shor").is_none());
    }

    #[test]
    fn many_vehicles_share_buckets_without_mixing_them_up() {
        // 16 vehicles at most: one bucket for all.
        let c = LatestCache::new(16, Duration::from_secs(60));
        let frames: Vec<Frame> = (0..16).map(|i| loc(&format!("v{i}"), i, f64::from(i as u8))).collect();
        assert_eq!(c.apply(&frames), 16);
        assert_eq!(c.len(), 16);
        for i in 0..16 {
            let s = c.get(&format!("v{i}")).expect("held");
            assert_eq!(s.location.as_deref(), Some(&frames[i as usize]));
        }
        // A fill with older state moves nothing; with newer state, it does.
        let older = VehicleState { location: Some(Arc::new(loc("v3", 1, 9.0))), diagnostic: None };
        c.fill("v3", &older, 0);
        assert_eq!(c.get("v3").and_then(|s| s.location.as_ref().map(|f| f.ts)), Some(3));
        let newer = VehicleState { location: Some(Arc::new(loc("v3", 99, 9.0))), diagnostic: None };
        c.fill("v3", &newer, 0);
        assert_eq!(c.get("v3").and_then(|s| s.location.as_ref().map(|f| f.ts)), Some(99));
    }

    #[test]
    fn the_cache_stays_within_max_vehicles() {
        let c = LatestCache::new(256, Duration::from_secs(60));
        for round in 0..20 {
            let frames: Vec<Frame> = (0..500).map(|i| loc(&format!("r{round}v{i}"), 1, 1.0)).collect();
            c.apply(&frames);
        }
        let held = c.len();
        assert!(held > 0 && held <= 256, "held {held}");
    }

    #[test]
    fn vehicles_idle_past_the_ttl_by_the_receive_clock_are_dropped() {
        // One bucket (16 vehicles at most), a 60 s idle TTL.
        let c = LatestCache::new(16, Duration::from_secs(60));
        c.apply(&[loc("parked", 1, 1.0)]);
        let mut moving = loc("moving", 2, 1.0);
        moving.received_at = 30_000_000;
        c.apply(&[moving.clone()]);
        assert!(c.get("parked").is_some(), "30 s idle is within the TTL");
        moving.received_at = 61_000_000;
        moving.ts = 3;
        c.apply(&[moving]);
        assert!(c.get("parked").is_none(), "61 s idle is past the TTL");
        assert_eq!(c.len(), 1);
        // A fill starts the idle time at the time given.
        let parked = VehicleState { location: Some(Arc::new(loc("parked", 1, 1.0))), diagnostic: None };
        c.fill("parked", &parked, 62_000_000);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_bucket_drops_vehicles_idle_past_the_ttl_when_written() {
        let b = Bucket::default();
        let f = loc("a", 1, 1.0);
        assert_eq!(b.upsert("a", 0, 10, [&f].into_iter()), (true, true));
        assert_eq!(b.upsert("b", 5, 10, [&loc("b", 1, 1.0)].into_iter()), (true, true));
        // At 12 s, "a" (touched at 0) is idle past 10 s: dropped; "b" stays.
        assert_eq!(b.upsert("b", 12, 10, [&loc("b", 2, 1.0)].into_iter()), (true, true));
        assert_eq!(b.len(), 1);
        assert!(b.slots.read().expect("lock").iter().all(|s| s.id.as_str() == "b"));
    }
}
