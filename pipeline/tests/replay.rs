//! The log replayed at start: a sink gets exactly what lies past its checkpoint.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fleetpipe_pipeline::wal::WalConfig;
use fleetpipe_pipeline::{Entry, Pipeline, PipelineConfig, Sink, SinkError, Submission};
use fleetpipe_processors::{Batch, Body, Frame, Location, Lsn};

/// Remembers the seq of every frame it is given; durable at once.
struct Recorder {
    seqs: Arc<Mutex<Vec<u64>>>,
    durable: Lsn,
}

impl Sink for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn durable_lsn(&self) -> Lsn {
        self.durable
    }
    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.seqs.lock().unwrap().extend(batch.frames.iter().map(|f| f.seq));
        self.durable = batch.lsn;
        Ok(())
    }
    fn tick(&mut self, _: Instant) -> Result<(), SinkError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

fn frame(seq: u64) -> Frame {
    Frame {
        vehicle_id: format!("V{}", seq % 3),
        ts: 1_795_640_400_000_000 + seq as i64,
        seq,
        received_at: 7,
        body: Body::Location(Location { lat: 1.0, lon: 2.0, ..Location::default() }),
    }
}

/// Runs a pipeline over `dir` with one recorder whose checkpoint is `checkpoint`, submitting
/// `entries` (one frame each, seq = its number), and returns the seqs the recorder got.
fn run(dir: &Path, checkpoint: Lsn, entries: std::ops::Range<u64>) -> Vec<u64> {
    let seqs = Arc::new(Mutex::new(Vec::new()));
    let sink = Recorder { seqs: Arc::clone(&seqs), durable: checkpoint };
    let cfg = PipelineConfig { shards: 2, ..PipelineConfig::default() };
    let pipeline =
        Pipeline::start(&cfg, &WalConfig::default(), dir, Vec::new(), vec![Box::new(sink)]).unwrap();
    for seq in entries {
        let (tx, rx) = std::sync::mpsc::channel();
        let entry = Entry { received_at: 7, frames: vec![frame(seq)], ..Entry::default() };
        let done: fleetpipe_pipeline::Completion = Box::new(move |r| {
            let _ = tx.send(r);
        });
        pipeline.intake.blocking_send(Submission { entry, done: Some(done) }).unwrap();
        assert_eq!(rx.recv().unwrap().unwrap(), seq, "one record per entry, lsn = seq");
    }
    pipeline.join().unwrap();
    let mut got = seqs.lock().unwrap().clone();
    got.sort_unstable();
    got
}

#[test]
fn a_sink_whose_checkpoint_lies_inside_the_log_is_replayed_only_what_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run(dir.path(), 0, 1..11), (1..11).collect::<Vec<_>>());
    // Restarted with the sink durable through lsn 4: it must get 5..=10 from the replay, once.
    assert_eq!(run(dir.path(), 4, 11..11), (5..11).collect::<Vec<_>>());
}
