//! De-duplication by frame identity over a bounded window per vehicle.
//!
//! The contract identifies a frame by `(vehicle_id, kind, ts, seq)`; the same frame delivered
//! twice (an MQTT redelivery, a replayed file) is stored once. Each vehicle keeps the
//! fingerprints of its last `window` frames; a frame whose fingerprint is in its vehicle's window
//! is a duplicate. The window bounds memory per vehicle; redeliveries older than the window fall
//! through to the sinks' own idempotency (Postgres' unique index).
//!
//! A `Dedup` belongs to one shard: frames are sharded by vehicle, so no lock is needed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::frame::{Frame, Kind};

/// A hasher for values that already are well-mixed 64-bit fingerprints.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type FingerprintSet = HashSet<u64, BuildHasherDefault<IdentityHasher>>;

#[derive(Default)]
struct VehicleWindow {
    /// Fingerprints in arrival order, oldest first: the eviction order.
    order: VecDeque<u64>,
    set: FingerprintSet,
}

/// Per-shard duplicate filter.
pub struct Dedup {
    window: usize,
    vehicles: HashMap<String, VehicleWindow>,
}

/// A 64-bit fingerprint of `(kind, ts, seq)` (the vehicle is the map key).
fn fingerprint(kind: Kind, ts: i64, seq: u64) -> u64 {
    // splitmix64 over the packed identity: cheap, well mixed, no allocation.
    let mut x = (ts as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seq.rotate_left(29))
        .wrapping_add(kind as u64);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Dedup {
    /// `window`: how many recent frames per vehicle are remembered (at least 1).
    pub fn new(window: usize) -> Self {
        Dedup { window: window.max(1), vehicles: HashMap::new() }
    }

    /// Drops the frames already seen (in the window or earlier in this batch), keeping order.
    /// Returns how many were dropped.
    pub fn retain_new(&mut self, frames: &mut Vec<Frame>) -> usize {
        let before = frames.len();
        let window = self.window;
        let vehicles = &mut self.vehicles;
        frames.retain(|f| {
            let fp = fingerprint(f.kind(), f.ts, f.seq);
            let w = match vehicles.get_mut(f.vehicle_id.as_str()) {
                Some(w) => w,
                None => vehicles.entry(f.vehicle_id.clone()).or_default(),
            };
            if !w.set.insert(fp) {
                return false;
            }
            w.order.push_back(fp);
            if w.order.len() > window {
                if let Some(old) = w.order.pop_front() {
                    w.set.remove(&old);
                }
            }
            true
        });
        before - frames.len()
    }

    /// Vehicles currently tracked.
    pub fn vehicles(&self) -> usize {
        self.vehicles.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Body, Location};

    fn frame(v: &str, ts: i64, seq: u64) -> Frame {
        Frame {
            vehicle_id: v.to_string(),
            ts,
            seq,
            received_at: 0,
            body: Body::Location(Location { lat: 1.0, lon: 2.0, ..Default::default() }),
        }
    }

    #[test]
    fn second_delivery_of_a_frame_is_dropped_within_and_across_batches() {
        let mut d = Dedup::new(16);
        let mut a = vec![frame("a", 1, 1), frame("a", 1, 1), frame("b", 1, 1)];
        assert_eq!(d.retain_new(&mut a), 1);
        assert_eq!(a.len(), 2);
        let mut b = vec![frame("b", 1, 1), frame("a", 2, 1), frame("a", 1, 2)];
        assert_eq!(d.retain_new(&mut b), 1);
        assert_eq!(b, vec![frame("a", 2, 1), frame("a", 1, 2)]);
    }

    #[test]
    fn frames_older_than_the_window_are_forgotten() {
        let mut d = Dedup::new(2);
        let mut a = vec![frame("a", 1, 0), frame("a", 2, 0), frame("a", 3, 0)];
        assert_eq!(d.retain_new(&mut a), 0);
        let mut again = vec![frame("a", 1, 0), frame("a", 3, 0)];
        assert_eq!(d.retain_new(&mut again), 1);
        assert_eq!(again, vec![frame("a", 1, 0)]);
    }

    #[test]
    fn same_ts_and_seq_of_another_kind_is_not_a_duplicate() {
        let mut d = Dedup::new(8);
        let mut diag = frame("a", 1, 1);
        diag.body = Body::Diagnostic(Box::default());
        let mut a = vec![frame("a", 1, 1), diag];
        assert_eq!(d.retain_new(&mut a), 0);
    }
}
