#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetpipe_pipeline::driver::{spawn, DriverConfig, LogAccess, SinkFeed, SinkHandle};
use fleetpipe_pipeline::{NotDurable, Poison, Sink, SinkError};
use fleetpipe_processors::{Batch, Body, Frame, Location, Lsn, Origin, Reason, Rejection};

#[derive(Default)]
struct Calls {
    writes: Vec<Lsn>,
    write_attempts: usize,
    ticks: usize,
    flushes: usize,
    /// The frames (by seq) of each successful write.
    written_seqs: Vec<Vec<u64>>,
}

/// Makes a batch durable at the next tick; fails the first `fail_writes` writes.
struct FakeSink {
    calls: Arc<Mutex<Calls>>,
    fail_writes: usize,
    poison_at: Option<Lsn>,
    /// Frames with this seq are refused as poison.
    refuse_seq: Option<u64>,
    /// `false`: only `flush` makes batches durable.
    durable_on_tick: bool,
    /// After the failure at `poison_at`, the sink can start over from its durable position
    /// (once: the failure does not repeat).
    recoverable: bool,
    written: Lsn,
    durable: Lsn,
}

impl FakeSink {
    fn new(calls: &Arc<Mutex<Calls>>) -> FakeSink {
        FakeSink {
            calls: Arc::clone(calls),
            fail_writes: 0,
            poison_at: None,
            refuse_seq: None,
            durable_on_tick: true,
            recoverable: false,
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
    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let mut calls = self.calls.lock().unwrap();
        calls.write_attempts += 1;
        if self.poison_at == Some(batch.lsn) {
            return Err(SinkError::fatal("disk on fire"));
        }
        if self.fail_writes > 0 {
            self.fail_writes -= 1;
            return Err(SinkError::retry(std::io::Error::other("transient")));
        }
        let refused: Vec<Poison> = batch
            .frames
            .iter()
            .enumerate()
            .filter(|(_, f)| Some(f.seq) == self.refuse_seq)
            .map(|(index, _)| Poison { index, detail: "too big for the store".into() })
            .collect();
        if !refused.is_empty() {
            return Err(SinkError::Poison(refused));
        }
        calls.writes.push(batch.lsn);
        calls.written_seqs.push(batch.frames.iter().map(|f| f.seq).collect());
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
    fn flush(&mut self) -> Result<(), SinkError> {
        self.calls.lock().unwrap().flushes += 1;
        self.durable = self.written;
        Ok(())
    }
    fn recover(&mut self) -> Result<bool, SinkError> {
        if !self.recoverable {
            return Ok(false);
        }
        self.poison_at = None;
        self.written = self.durable;
        Ok(true)
    }
}

fn batch(lsn: Lsn) -> Arc<Batch> {
    Arc::new(Batch { lsn, ..Batch::default() })
}

/// The log, as the driver sees it: every lsn from 1 to 1,000 is one record.
#[derive(Default)]
struct Log {
    reads: Mutex<Vec<(Lsn, Lsn)>>,
    kept: Mutex<Vec<Rejection>>,
}

impl LogAccess for Log {
    fn replay(
        &self,
        after: Lsn,
        through: Lsn,
        f: &mut dyn FnMut(Batch) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        self.reads.lock().unwrap().push((after, through));
        for lsn in after + 1..=through {
            f(Batch { lsn, ..Batch::default() })?;
        }
        Ok(())
    }

    fn keep(&self, rejections: Vec<Rejection>) -> Result<(), NotDurable> {
        self.kept.lock().unwrap().extend(rejections);
        Ok(())
    }
}

fn start(sink: FakeSink, queue: usize, tick_ms: u64) -> (SinkHandle, SinkFeed, Arc<Log>) {
    let log = Arc::new(Log::default());
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
    assert_eq!(calls.flushes, 1);
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
fn a_fatal_error_stops_the_sinks_thread_with_the_error_and_disconnects_the_sender() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let mut sink = FakeSink::new(&calls);
    sink.poison_at = Some(2);
    let (handle, tx, _) = start(sink, 4, 20);
    assert!(tx.offer(&batch(1)));
    assert!(tx.offer(&batch(2)));
    let err = handle.join().unwrap_err();
    assert!(matches!(err, SinkError::Fatal(_)), "{err}");
    assert_eq!(err.to_string(), "disk on fire");
    assert!(!err.is_retryable());
    assert!(!tx.offer(&batch(3)), "the receiver is gone");
    assert_eq!(calls.lock().unwrap().flushes, 0);
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
    let log = Arc::new(Log::default());
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
    assert!(calls.lock().unwrap().flushes >= 1);
    drop(tx);
    handle.join().unwrap();
}

fn frame(seq: u64) -> Frame {
    Frame {
        vehicle_id: "V1".into(),
        ts: 1_795_640_400_250_000 + seq as i64,
        seq,
        received_at: 1_795_640_400_250_000,
        body: Body::Location(Location { lat: 1.0, lon: 2.0, ..Location::default() }),
    }
}

#[test]
fn frames_a_sink_refuses_are_kept_through_the_log_and_the_batch_is_written_without_them() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let mut sink = FakeSink::new(&calls);
    sink.refuse_seq = Some(2);
    let (handle, tx, log) = start(sink, 4, 5);
    let b = Batch { lsn: 1, frames: (1..=4).map(frame).collect(), ..Batch::default() };
    assert!(tx.offer(&Arc::new(b)));
    drop(tx);
    handle.join().unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.writes, vec![1], "the batch is written once, at its own lsn");
    assert_eq!(calls.written_seqs, vec![vec![1, 3, 4]], "without the refused frame");
    let kept = log.kept.lock().unwrap();
    assert_eq!(kept.len(), 1);
    let r = &kept[0];
    assert_eq!(r.reason, Reason::OutOfRange);
    assert_eq!(r.detail, "fake: too big for the store");
    assert_eq!(r.origin, Origin::Sink { sink: "fake".into() });
    assert_eq!(r.index, None);
    assert_eq!(r.received_at, frame(2).received_at);
    let mut raw = Vec::new();
    fleetpipe_processors::codec::encode_json(&frame(2), &mut raw);
    assert_eq!(r.raw, Bytes::from(raw));
}

#[test]
fn a_batch_at_or_below_what_the_sink_took_is_not_handed_to_it_again() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let mut sink = FakeSink::new(&calls);
    sink.written = 3;
    sink.durable = 3;
    let (handle, tx, _) = start(sink, 8, 5);
    for lsn in [2, 3, 4, 4, 1, 5] {
        assert!(tx.offer(&batch(lsn)));
    }
    drop(tx);
    handle.join().unwrap();
    assert_eq!(calls.lock().unwrap().writes, vec![4, 5]);
}

#[test]
fn a_sink_that_recovers_from_a_fatal_error_gets_everything_after_its_durable_position_once_in_order() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let mut sink = FakeSink::new(&calls);
    sink.poison_at = Some(5);
    sink.recoverable = true;
    // A queue long enough that batches after the failing one are waiting in it: they must be
    // read back from the log after the ones the sink lost, not written ahead of them.
    let (handle, tx, log) = start(sink, 64, 5);
    for lsn in 1..=30 {
        assert!(tx.offer(&batch(lsn)));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.durable.load(Ordering::Acquire) < 30 {
        assert!(Instant::now() < deadline, "never recovered");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(tx.offer(&batch(31)), "live batches flow again");
    drop(tx);
    handle.join().unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.writes, (1..=31).collect::<Vec<Lsn>>(), "every batch once, in order");
    let reads = log.reads.lock().unwrap();
    assert_eq!(reads.first().map(|r| r.0), Some(4), "read back from the durable position: {reads:?}");
}
