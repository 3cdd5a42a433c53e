//! Shards and the resequencer.
//!
//! The log writer splits each group by vehicle over a fixed set of shard threads ([`Dispatch`]):
//! a vehicle always lands on the same shard, so its order is kept and every stage's per-vehicle
//! state needs no lock. Every shard receives a (possibly empty) part of every group, so the
//! resequencer can put the groups back in log order and a sink's checkpoint is simply the last
//! group it made durable. The resequencer never waits for a sink: a sink whose queue is full is
//! skipped and later reads what it missed back from the log (see [`crate::driver`]).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use fleetpipe_processors::trace::TraceContext;
use fleetpipe_processors::{Batch, Counters, Lsn, Stage};

use crate::driver::SinkFeed;
use crate::entry::Entry;
use crate::{Error, Result};

/// A log group's share for one shard.
pub(crate) struct Part {
    group: u64,
    batch: Batch,
}

/// The writer's side of the shards: one bounded queue per shard.
pub(crate) struct Dispatch {
    txs: Vec<Sender<Part>>,
    next_group: u64,
}

pub(crate) fn shard_of(vehicle_id: &str, shards: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    vehicle_id.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

impl Dispatch {
    pub(crate) fn new(txs: Vec<Sender<Part>>) -> Dispatch {
        Dispatch { txs, next_group: 0 }
    }

    /// Splits a group over the shards: every shard gets its part, possibly empty. Rejections
    /// travel with the first shard's part.
    pub(crate) fn send(&mut self, lsn: Lsn, entries: Vec<Entry>, trace: Arc<[TraceContext]>) -> Result<()> {
        let n = self.txs.len();
        let group = self.next_group;
        // Room for an even split and a quarter more, so that a part rarely grows while filled.
        let even = entries.iter().map(|e| e.frames.len()).sum::<usize>() / n.max(1);
        let room = even + even / 4;
        let mut parts: Vec<Part> = (0..n)
            .map(|_| Part {
                group,
                batch: Batch {
                    lsn,
                    frames: Vec::with_capacity(room),
                    trace: Arc::clone(&trace),
                    ..Batch::default()
                },
            })
            .collect();
        for e in entries {
            if let Some(first) = parts.first_mut() {
                first.batch.rejections.extend(e.rejections);
            }
            for f in e.frames {
                let s = shard_of(&f.vehicle_id, n);
                if let Some(p) = parts.get_mut(s) {
                    p.batch.frames.push(f);
                }
            }
        }
        self.next_group += 1;
        let mut depth = 0;
        for (tx, part) in self.txs.iter().zip(parts) {
            depth += tx.len();
            tx.send(part).map_err(|_| Error::Stopped("a shard"))?;
        }
        metrics::gauge!("fleetpipe_queue_depth", "stage" => "shards").set(depth as f64);
        metrics::gauge!("fleetpipe_queue_capacity", "stage" => "shards")
            .set(self.txs.iter().filter_map(|t| t.capacity()).sum::<usize>() as f64);
        Ok(())
    }

    /// Lets the shards finish: they drain into the resequencer, which drains into the sinks.
    pub(crate) fn close(&mut self) {
        self.txs.clear();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.txs.is_empty()
    }
}

/// A shard: runs its stages over each part, in order, then hands it on.
pub(crate) fn run_shard(rx: Receiver<Part>, out: Sender<Part>, mut stages: Vec<Box<dyn Stage>>) {
    let duplicates = metrics::counter!("fleetpipe_frames_duplicate_total");
    for mut part in rx {
        let mut counters = Counters::default();
        let span = crate::trace::stage_span("shard", &part.batch.trace, part.batch.frames.len(), false);
        let _entered = span.as_ref().map(|s| s.enter());
        for stage in &mut stages {
            stage.apply(&mut part.batch, &mut counters);
        }
        if counters.duplicates > 0 {
            duplicates.increment(counters.duplicates);
        }
        if out.send(part).is_err() {
            return;
        }
    }
}

/// Merges the shards' parts back into log order and offers each group to every sink. During
/// the replay at start a sink only gets what lies past its own checkpoint (`from`).
pub(crate) fn resequence(rx: Receiver<Part>, shards: usize, sinks: Vec<(SinkFeed, Lsn)>) {
    // group → (parts still missing, merged batch)
    let mut pending: BTreeMap<u64, (usize, Batch)> = BTreeMap::new();
    let mut next = 0u64;
    for part in rx.iter() {
        let slot = pending.entry(part.group).or_insert_with(|| {
            (shards, Batch { lsn: part.batch.lsn, trace: Arc::clone(&part.batch.trace), ..Batch::default() })
        });
        slot.0 -= 1;
        append(&mut slot.1.frames, part.batch.frames);
        append(&mut slot.1.rejections, part.batch.rejections);
        while pending.get(&next).is_some_and(|(missing, _)| *missing == 0) {
            let Some((_, batch)) = pending.remove(&next) else { break };
            next += 1;
            record_lag(&batch);
            let batch = Arc::new(batch);
            for (feed, from) in &sinks {
                if batch.lsn > *from && !feed.offer(&batch) {
                    tracing::error!(sink = feed.name, "a sink stopped; its queue is closed");
                }
            }
        }
        metrics::gauge!("fleetpipe_queue_depth", "stage" => "resequencer").set(rx.len() as f64);
        metrics::gauge!("fleetpipe_queue_capacity", "stage" => "resequencer")
            .set(rx.capacity().unwrap_or(0) as f64);
    }
}

/// Appends `from` to `into`; into an empty `into` it is moved, not copied (the first part of a
/// group becomes the group's).
fn append<T>(into: &mut Vec<T>, from: Vec<T>) {
    if into.is_empty() {
        *into = from;
    } else {
        into.extend(from);
    }
}

/// One observation per batch: how far behind event time the batch is (its newest frame).
fn record_lag(batch: &Batch) {
    if let Some(newest) = batch.frames.iter().map(|f| f.ts).max() {
        let now = crate::now_micros();
        metrics::histogram!("fleetpipe_event_lag_seconds").record((now - newest) as f64 / 1e6);
    }
}
