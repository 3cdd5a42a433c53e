//! Stages: plain functions over a batch in memory, run on the pipeline's shards.
//!
//! A [`Batch`] is what stages and sinks see: the accepted frames and the rejections of a run of
//! log records, in log order. On a shard it holds that shard's vehicles only (a vehicle always
//! lands on the same shard), so a stage keeps per-vehicle state without a lock. A stage never
//! blocks and never fails: what it drops or refuses it counts in [`Counters`], which the shard
//! turns into metrics once per batch.
//!
//! Adding a stage is one file here (a type that implements [`Stage`]) plus one line in the
//! binary's wiring that gives the pipeline a factory for it (one instance per shard).

use crate::frame::{Frame, Lsn, Rejection};

/// Frames and rejections of a run of log records, in log order. `lsn` is the highest log
/// position the batch covers: once a sink has made the batch durable its checkpoint may move
/// to `lsn`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    pub lsn: Lsn,
    pub frames: Vec<Frame>,
    pub rejections: Vec<Rejection>,
    /// The log commit's span when it is traced and sampled (the parent of every later stage's
    /// span); empty otherwise, which is almost always.
    pub trace: std::sync::Arc<[crate::trace::TraceContext]>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.rejections.is_empty()
    }
}

/// What the stages of a shard did to one batch, beyond the batch itself: turned into metrics
/// (per batch, never per frame) by the shard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Frames dropped as redeliveries of a frame already seen (`fleetpipe_frames_duplicate_total`).
    pub duplicates: u64,
}

/// One step on a shard: works on the shard's part of each log group, in log order.
pub trait Stage: Send {
    /// Short name, for logs.
    fn name(&self) -> &'static str;
    /// Transforms `batch` in place (it may drop frames); counts what it did in `counters`.
    fn apply(&mut self, batch: &mut Batch, counters: &mut Counters);
}
