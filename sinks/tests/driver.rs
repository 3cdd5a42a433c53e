#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetpipe_processors::{Body, Frame, Location, Lsn};
use fleetpipe_sinks::driver::spawn;
use fleetpipe_sinks::parquet::{ParquetConfig, ParquetSink};
use fleetpipe_sinks::{Sink, SinkBatch, SinkError};

#[derive(Default)]
struct Calls {
    writes: Vec<Lsn>,
    write_attempts: usize,
    ticks: usize,
    closes: usize,
}

/// Makes a batch durable at the next tick; fails the first `fail_writes` writes.
struct FakeSink {
    calls: Arc<Mutex<Calls>>,
    fail_writes: usize,
    poison_at: Option<Lsn>,
    written: Lsn,
    durable: Lsn,
}

impl FakeSink {
    fn new(calls: &Arc<Mutex<Calls>>) -> FakeSink {
        FakeSink { calls: Arc::clone(calls), fail_writes: 0, poison_at: None, written: 0, durable: 0 }
    }
}

impl Sink for FakeSink {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn durable_lsn(&self) -> Lsn {
        self.durable
    }
    fn write(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        let mut calls = self.calls.lock().unwrap();
        calls.write_attempts += 1;
        if self.poison_at == Some(batch.lsn) {
            return Err(SinkError::Poisoned {
                sink: "fake",
                durable: self.durable,
                detail: "disk on fire".into(),
            });
        }
        if self.fail_writes > 0 {
            self.fail_writes -= 1;
            return Err(SinkError::Io {
                path: PathBuf::from("/fake"),
                source: std::io::Error::other("transient"),
            });
        }
        calls.writes.push(batch.lsn);
        self.written = batch.lsn;
        Ok(())
    }
    fn tick(&mut self, _now: Instant) -> Result<(), SinkError> {
        self.calls.lock().unwrap().ticks += 1;
        self.durable = self.written;
        Ok(())
    }
    fn close(&mut self) -> Result<(), SinkError> {
        self.calls.lock().unwrap().closes += 1;
        self.durable = self.written;
        Ok(())
    }
}

fn batch(lsn: Lsn) -> Arc<SinkBatch> {
    Arc::new(SinkBatch { lsn, ..SinkBatch::default() })
}

#[test]
fn failed_writes_are_retried_with_the_batch_held_and_durable_follows_the_sink() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let mut sink = FakeSink::new(&calls);
    sink.fail_writes = 3;
    let (tx, rx) = crossbeam_channel::bounded(4);
    let handle = spawn(Box::new(sink), rx, Duration::from_millis(20));
    assert_eq!(handle.name, "fake");
    for lsn in 1..=3 {
        tx.send(batch(lsn)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.durable.load(Ordering::Acquire) < 3 {
        assert!(Instant::now() < deadline, "durable never reached 3");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(tx);
    let durable = Arc::clone(&handle.durable);
    handle.join().unwrap();
    assert_eq!(durable.load(Ordering::Acquire), 3);
    let calls = calls.lock().unwrap();
    assert_eq!(calls.writes, vec![1, 2, 3], "in order, each once");
    assert_eq!(calls.write_attempts, 6);
    assert_eq!(calls.closes, 1);
}

#[test]
fn the_sink_is_ticked_while_no_batch_arrives() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let (tx, rx) = crossbeam_channel::bounded::<Arc<SinkBatch>>(1);
    let handle = spawn(Box::new(FakeSink::new(&calls)), rx, Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(100));
    assert!(calls.lock().unwrap().ticks >= 3);
    drop(tx);
    handle.join().unwrap();
}

#[test]
fn a_poisoned_sink_stops_its_thread_with_the_error_and_disconnects_the_sender() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let mut sink = FakeSink::new(&calls);
    sink.poison_at = Some(2);
    let (tx, rx) = crossbeam_channel::bounded(4);
    let handle = spawn(Box::new(sink), rx, Duration::from_millis(20));
    tx.send(batch(1)).unwrap();
    tx.send(batch(2)).unwrap();
    let err = handle.join().unwrap_err();
    assert!(matches!(err, SinkError::Poisoned { sink: "fake", .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(tx.send(batch(3)).is_err(), "the receiver is gone");
    assert_eq!(calls.lock().unwrap().closes, 0);
}

#[test]
fn the_parquet_sink_runs_under_the_driver_and_commits_on_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetSink::open(ParquetConfig::new(dir.path())).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(8);
    let handle = spawn(Box::new(sink), rx, Duration::from_millis(10));
    let ts = 1_795_640_400_250_000;
    for lsn in 1..=5u64 {
        tx.send(Arc::new(SinkBatch {
            lsn,
            frames: vec![Frame {
                vehicle_id: "V1".into(),
                ts: ts + lsn as i64,
                seq: lsn,
                received_at: ts,
                body: Body::Location(Location { lat: 1.0, lon: 2.0, ..Location::default() }),
            }],
            rejections: Vec::new(),
        }))
        .unwrap();
    }
    drop(tx);
    let durable = Arc::clone(&handle.durable);
    handle.join().unwrap();
    assert_eq!(durable.load(Ordering::Acquire), 5);
    let file = dir.path().join("locations/date=2026-11-25/hour=21/part-0000000001-0000.parquet");
    assert!(file.exists());
    let reopened = ParquetSink::open(ParquetConfig::new(dir.path())).unwrap();
    assert_eq!(reopened.durable_lsn(), 5);
}
