//! Latest state per vehicle: the L1 cache (moka).
//!
//! "Latest" is newest by event time `ts`, never merely last received: a late, buffered or
//! re-delivered frame goes to history but never moves a vehicle's latest state backwards (the
//! bug that made other platforms show vehicles at old positions). Location and diagnostic
//! state are tracked separately, each by its own newest `ts` (ties broken by the higher `seq`).
//!
//! The cache is bounded by a maximum number of vehicles and an idle TTL. Writes come from the
//! shard that owns a vehicle, one per vehicle per batch, so a read-compare-write needs no lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::frame::{Body, Frame};

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

    /// Like [`VehicleState::merge`], for a frame that is already shared.
    fn merge_shared(&mut self, frame: &Arc<Frame>) -> bool {
        let slot = self.slot(frame);
        let newer = is_newer(frame, slot.as_deref());
        if newer {
            *slot = Some(frame.clone());
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
#[derive(Clone)]
pub struct LatestCache {
    cache: moka::sync::Cache<Arc<str>, Arc<VehicleState>>,
}

impl LatestCache {
    pub fn new(max_vehicles: u64, idle_ttl: Duration) -> Self {
        let cache = moka::sync::Cache::builder().max_capacity(max_vehicles).time_to_idle(idle_ttl).build();
        LatestCache { cache }
    }

    /// Applies a batch: one lookup and at most one insert per vehicle, not per frame, and a
    /// copy only of the frames that become latest. Returns how many vehicles moved forward.
    pub fn apply(&self, frames: &[Frame]) -> usize {
        // Newest location and diagnostic per vehicle within the batch.
        let mut newest: HashMap<&str, [Option<&Frame>; 2]> = HashMap::new();
        for f in frames {
            let slot = &mut newest.entry(f.vehicle_id.as_str()).or_default()[f.kind() as usize];
            if is_newer(f, *slot) {
                *slot = Some(f);
            }
        }
        let mut moved = 0;
        for (id, candidates) in newest {
            let mut state = self.cache.get(id).map(|s| (*s).clone()).unwrap_or_default();
            let mut changed = false;
            for f in candidates.into_iter().flatten() {
                changed |= state.merge(f);
            }
            if changed {
                self.cache.insert(Arc::from(id), Arc::new(state));
                moved += 1;
            }
        }
        moved
    }

    /// Puts a state fetched from a lower tier (L2, Postgres) unless L1 already holds newer.
    pub fn fill(&self, id: &str, state: &VehicleState) {
        let mut held = self.cache.get(id).map(|s| (*s).clone()).unwrap_or_default();
        let mut changed = false;
        for f in state.location.iter().chain(state.diagnostic.iter()) {
            changed |= held.merge_shared(f);
        }
        if changed {
            self.cache.insert(Arc::from(id), Arc::new(held));
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<VehicleState>> {
        self.cache.get(id)
    }

    /// Vehicles whose latest location lies within `radius_m` of (lat, lon), nearest first.
    pub fn near(&self, lat: f64, lon: f64, radius_m: f64, limit: usize) -> Vec<(Arc<VehicleState>, f64)> {
        let mut hits: Vec<(Arc<VehicleState>, f64)> = self
            .cache
            .iter()
            .filter_map(|(_, state)| {
                let loc = state.location.as_ref()?;
                let Body::Location(l) = &loc.body else { return None };
                let d = haversine_m(lat, lon, l.lat, l.lon);
                (d <= radius_m).then_some((state, d))
            })
            .collect();
        hits.sort_by(|a, b| a.1.total_cmp(&b.1));
        hits.truncate(limit);
        hits
    }

    /// Vehicles held (approximate, as moka counts).
    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    use crate::frame::{Diagnostic, Location};

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
}
