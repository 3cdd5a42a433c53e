//! The event stage: where trips, DTC changes, offline/online and geofence crossings will be
//! derived from frames by event time (CONTRACT.md §9).
//!
//! Today it is the skeleton the stage mechanism needs: it runs on every shard after latest state
//! and passes every batch through unchanged.

use crate::stage::{Batch, Counters, Stage};

/// The per-shard event stage (pass-through for now).
#[derive(Debug, Default)]
pub struct EventStage {
    /// Batches seen, so that a test can tell the stage ran.
    batches: u64,
}

impl EventStage {
    pub fn new() -> Self {
        EventStage::default()
    }

    /// Batches this instance has seen.
    pub fn batches(&self) -> u64 {
        self.batches
    }
}

impl Stage for EventStage {
    fn name(&self) -> &'static str {
        "events"
    }

    fn apply(&mut self, _batch: &mut Batch, _counters: &mut Counters) {
        self.batches += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::tests::{full_diag_frame, full_loc_frame};

    #[test]
    fn the_event_stage_passes_every_batch_through_unchanged() {
        let mut stage = EventStage::new();
        let mut batch =
            Batch { lsn: 7, frames: vec![full_loc_frame(), full_diag_frame()], rejections: vec![] };
        let before = batch.clone();
        let mut counters = Counters::default();
        stage.apply(&mut batch, &mut counters);
        assert_eq!(batch, before);
        assert_eq!(counters, Counters::default());
        assert_eq!(stage.batches(), 1);
    }
}
