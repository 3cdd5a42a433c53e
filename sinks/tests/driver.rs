#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetpipe_processors::{Body, Frame, Location, Lsn};
use fleetpipe_sinks::driver::{spawn, Backlog, DriverConfig, SinkFeed, SinkHandle};
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
    /// `false`: only `close` makes batches durable.
    durable_on_tick: bool,
    written: Lsn,
    durable: Lsn,
}

impl FakeSink {
    fn new(calls: &Arc<Mutex<Calls>>) -> FakeSink {
        FakeSink {
            calls: Arc::clone(calls),
            fail_writes: 0,
            poison_at: None,
            durable_on_tick: true,
            written: 0,
            durable: 0,
        }
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
        if self.durable_on_tick {
            self.durable = self.written;
        }
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

/// The log, as the driver sees it: every lsn from 1 to 1,000 is one record.
struct Log {
    reads: Mutex<Vec<(Lsn, Lsn)>>,
}

impl Backlog for Log {
    fn replay(
        &self,
        after: Lsn,
        through: Lsn,
        f: &mut dyn FnMut(SinkBatch) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        self.reads.lock().unwrap().push((after, through));
        for lsn in after + 1..=through {
            f(SinkBatch { lsn, ..SinkBatch::default() })?;
        }
        Ok(())
    }
}

fn start(sink: FakeSink, queue: usize, tick_ms: u64) -> (SinkHandle, SinkFeed, Arc<Log>) {
    let log = Arc::new(Log { reads: Mutex::new(Vec::new()) });
    let cfg = DriverConfig { queue, tick: Duration::from_millis(tick_ms), flush_every: None };
    let (handle, feed) = spawn(Box::new(sink), cfg, log.clone());
    (handle, feed, log)
}

#[test]
fn failed_writes_are_retried_with_the_batch_held_and_durable_follows_the_sink() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let mut sink = FakeSink::new(&calls);
    sink.fail_writes = 3;
    let (handle, tx, _) = start(sink, 4, 20);
    assert_eq!(handle.name, "fake");
    for lsn in 1..=3 {
        assert!(tx.offer(&batch(lsn)));
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
    let (handle, tx, _) = start(FakeSink::new(&calls), 1, 5);
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
    let (handle, tx, _) = start(sink, 4, 20);
    assert!(tx.offer(&batch(1)));
    assert!(tx.offer(&batch(2)));
    let err = handle.join().unwrap_err();
    assert!(matches!(err, SinkError::Poisoned { sink: "fake", .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(!tx.offer(&batch(3)), "the receiver is gone");
    assert_eq!(calls.lock().unwrap().closes, 0);
}

#[test]
fn the_parquet_sink_runs_under_the_driver_and_commits_on_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetSink::open(ParquetConfig::new(dir.path())).unwrap();
    let log = Arc::new(Log { reads: Mutex::new(Vec::new()) });
    let cfg = DriverConfig { queue: 8, tick: Duration::from_millis(10), flush_every: None };
    let (handle, tx) = spawn(Box::new(sink), cfg, log);
    let ts = 1_795_640_400_250_000;
    for lsn in 1..=5u64 {
        assert!(tx.offer(&Arc::new(SinkBatch {
            lsn,
            frames: vec![Frame {
                vehicle_id: "V1".into(),
                ts: ts + lsn as i64,
                seq: lsn,
                received_at: ts,
                body: Body::Location(Location { lat: 1.0, lon: 2.0, ..Location::default() }),
            }],
            rejections: Vec::new(),
        })));
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

#[test]
fn a_sink_whose_queue_is_full_is_skipped_and_catches_up_from_the_log_each_batch_once_in_order() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let mut sink = FakeSink::new(&calls);
    sink.fail_writes = 4; // about 150 ms of retries: the queue of 2 overflows meanwhile
    let (handle, tx, log) = start(sink, 2, 5);
    for lsn in 1..=200 {
        assert!(tx.offer(&batch(lsn)), "the feeder never blocks");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.durable.load(Ordering::Acquire) < 200 {
        assert!(Instant::now() < deadline, "never caught up");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Caught up: live batches flow through the queue again.
    for lsn in 201..=202 {
        assert!(tx.offer(&batch(lsn)));
    }
    drop(tx);
    handle.join().unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.writes, (1..=202).collect::<Vec<Lsn>>(), "every batch once, in order");
    let reads = log.reads.lock().unwrap();
    assert!(!reads.is_empty(), "the skipped batches came from the log");
    assert!(reads.iter().all(|&(after, through)| after < through && through <= 200), "{reads:?}");
}

#[test]
fn with_flush_every_a_sink_is_made_durable_soon_after_its_queue_empties() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let log = Arc::new(Log { reads: Mutex::new(Vec::new()) });
    // Only a flush makes the batches durable.
    let cfg = DriverConfig {
        queue: 8,
        tick: Duration::from_secs(3600),
        flush_every: Some(Duration::from_millis(10)),
    };
    let mut sink = FakeSink::new(&calls);
    sink.durable_on_tick = false;
    let (handle, tx) = spawn(Box::new(sink), cfg, log);
    for lsn in 1..=3 {
        assert!(tx.offer(&batch(lsn)));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.durable.load(Ordering::Acquire) < 3 {
        assert!(Instant::now() < deadline, "never flushed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(calls.lock().unwrap().closes >= 1);
    drop(tx);
    handle.join().unwrap();
}
