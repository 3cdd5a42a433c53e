//! De-duplication by frame identity over a bounded window of recent frames.
//!
//! The contract identifies a frame by `(vehicle_id, kind, ts, seq)`; the same frame delivered
//! twice (an MQTT redelivery after a reconnect or a crash, a replayed file) is stored once and
//! still counts as accepted. A shard remembers the 128-bit fingerprints of its last `capacity`
//! frames, whichever their vehicle: memory is fixed by configuration (about 40 bytes a frame),
//! not by the number of vehicles, and the window covers any redelivery of the broker's in-flight
//! window many times over. A redelivery older than the window falls through to the sinks' own
//! idempotency (Postgres' unique index).
//!
//! A `Dedup` belongs to one shard: frames are sharded by vehicle, so no lock is needed.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use crate::frame::Frame;
use crate::stage::{Batch, Counters, Stage};

/// A hasher for values that already are well-mixed fingerprints.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A 128-bit fingerprint of the frame identity: collisions (a false "duplicate") are out of
/// reach in practice, unlike with 64 bits at billions of frames.
fn fingerprint(f: &Frame) -> u128 {
    let mut h = DefaultHasher::new();
    f.vehicle_id.hash(&mut h);
    let v = h.finish();
    let kind = f.kind() as u64;
    let hi = mix(v ^ mix((f.ts as u64) ^ kind.rotate_left(61)));
    let lo = mix(v.rotate_left(32) ^ mix(f.seq ^ 0x9E37_79B9_7F4A_7C15) ^ (f.ts as u64).rotate_left(17));
    (u128::from(hi) << 64) | u128::from(lo)
}

/// How much of the window is allocated up front (16 bytes a fingerprint in each of the two
/// collections; the hash set's control bytes, one per slot, are all that is touched at once).
const PRESIZE: usize = 1 << 20;

/// Per-shard duplicate filter over the last `capacity` frames.
pub struct Dedup {
    capacity: usize,
    /// Fingerprints in arrival order, oldest first: the eviction order.
    order: VecDeque<u128>,
    seen: HashSet<u128, BuildHasherDefault<PassThrough>>,
}

impl Dedup {
    /// `capacity`: how many recent frames are remembered (at least 1).
    pub fn new(capacity: usize) -> Self {
        // Room made once, up to a bound (a fresh window would otherwise rehash its way up while
        // the first frames flow); a larger window grows from there.
        let capacity = capacity.max(1);
        let room = capacity.min(PRESIZE);
        Dedup {
            capacity,
            order: VecDeque::with_capacity(room),
            seen: HashSet::with_capacity_and_hasher(room, BuildHasherDefault::default()),
        }
    }

    /// Drops the frames already seen (in the window or earlier in this batch), keeping order.
    /// Returns how many were dropped.
    pub fn retain_new(&mut self, frames: &mut Vec<Frame>) -> usize {
        let before = frames.len();
        frames.retain(|f| {
            let fp = fingerprint(f);
            if !self.seen.insert(fp) {
                return false;
            }
            self.order.push_back(fp);
            if self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
            true
        });
        before - frames.len()
    }

    /// Frames currently remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Stage for Dedup {
    fn name(&self) -> &'static str {
        "dedup"
    }

    fn apply(&mut self, batch: &mut Batch, counters: &mut Counters) {
        counters.duplicates += self.retain_new(&mut batch.frames) as u64;
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
    fn frames_older_than_the_window_are_forgotten_and_memory_stays_at_capacity() {
        let mut d = Dedup::new(2);
        let mut a = vec![frame("a", 1, 0), frame("b", 2, 0), frame("a", 3, 0)];
        assert_eq!(d.retain_new(&mut a), 0);
        assert_eq!(d.len(), 2);
        let mut again = vec![frame("a", 1, 0), frame("a", 3, 0)];
        assert_eq!(d.retain_new(&mut again), 1);
        assert_eq!(again, vec![frame("a", 1, 0)]);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn same_ts_and_seq_of_another_kind_or_vehicle_is_not_a_duplicate() {
        let mut d = Dedup::new(8);
        let mut diag = frame("a", 1, 1);
        diag.body = Body::Diagnostic(Box::default());
        let mut a = vec![frame("a", 1, 1), diag, frame("b", 1, 1)];
        assert_eq!(d.retain_new(&mut a), 0);
    }
}
