//! The Kafka source (rdkafka): a consumer group member reading the input topic.
//!
//! Delivery semantics: an offset is committed only once every message before it in its
//! partition is durable. Messages are folded into entries in arrival order and submitted to the
//! intake; the entry's completion (called by the log, in submission order) marks its messages
//! done; per partition the highest offset below which everything is done is the *watermark*,
//! stored with `enable.auto.offset.store = false` semantics and committed by librdkafka's
//! auto-commit timer, and synchronously on revoke and at shutdown, after waiting for the
//! revoked partitions' entries (rust-rdkafka's `at_least_once` pattern).
//!
//! Pushback: when the intake stays full the source stops taking records until there is room;
//! librdkafka stops fetching once its bounded prefetch queue is full, so lag grows in Kafka, not
//! memory here. (A stall longer than `max.poll.interval.ms`, 5 minutes, makes the member leave
//! the group, so that others can take its partitions; it rejoins when it polls again.) A rebalance loses nothing: a partition's new owner starts from the committed
//! watermark, so at worst it reads again what was durable but not yet committed, which the
//! sinks store once (de-duplication, idempotent Postgres writes).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetpipe_processors::codec::{decode_message_into, Message as Payload};
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::{Decoded, Origin};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc::error::TrySendError;

use fleetpipe_pipeline::{now_micros, Entry, Ready, Source, SourceContext, Submission};

use crate::{Error, Result};

/// How long a full intake is waited for before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_millis(250);

/// How the source joins its group.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// The input topic (contract default `vehicle-frames`).
    pub topic: String,
    /// Consumer group (contract default `fleetpipe`).
    pub group: String,
    /// Stable per instance (shows in the group's member list).
    pub client_id: String,
    /// Most messages folded into one log entry.
    pub batch_messages: usize,
    /// Longest a revoked partition's in-flight entries are waited for before its partition is
    /// let go without committing them (its next owner then reads them again).
    pub revoke_wait: Duration,
    /// Extra librdkafka properties (`security.protocol`, `sasl.*`, ...), applied last.
    pub properties: Vec<(String, String)>,
}

/// The Kafka source: a member of `cfg.group` on `cfg.topic`.
#[derive(Debug, Clone)]
pub struct KafkaSource {
    pub cfg: KafkaConfig,
}

impl Source for KafkaSource {
    type Error = Error;

    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        run(self.cfg, ctx).await
    }
}

/// One partition's submitted, not yet committable entries, oldest first.
#[derive(Debug, Default)]
struct PartitionTrack {
    /// (entry number, highest offset of this partition in the entry, durable yet).
    inflight: VecDeque<(u64, i64, bool)>,
    /// The next offset to commit (the watermark), when it moved and was not stored yet.
    committable: Option<i64>,
}

/// Per-partition watermarks, shared by the consumer task, the log's completions and the
/// rebalance callback.
#[derive(Debug, Default)]
struct Tracker {
    parts: Mutex<HashMap<i32, PartitionTrack>>,
    changed: Condvar,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, PartitionTrack>> {
        self.parts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn submitted(&self, entry: u64, highest: &HashMap<i32, i64>) {
        let mut parts = self.lock();
        for (&p, &offset) in highest {
            parts.entry(p).or_default().inflight.push_back((entry, offset, false));
        }
    }

    /// An entry is durable: moves the watermarks of its partitions.
    fn durable(&self, entry: u64, partitions: &[i32]) {
        let mut parts = self.lock();
        for p in partitions {
            let Some(t) = parts.get_mut(p) else { continue };
            if let Some(slot) = t.inflight.iter_mut().find(|(e, _, _)| *e == entry) {
                slot.2 = true;
            }
            while let Some(&(_, offset, true)) = t.inflight.front() {
                t.inflight.pop_front();
                t.committable = Some(offset + 1);
            }
        }
        self.changed.notify_all();
    }

    /// Takes the watermarks that moved since the last call.
    fn take_committable(&self, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        let mut parts = self.lock();
        parts
            .iter_mut()
            .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
            .filter_map(|(p, t)| t.committable.take().map(|o| (*p, o)))
            .collect()
    }

    /// Waits until `partitions` have nothing in flight, at most `timeout`. Returns those that
    /// still have.
    fn wait_idle(&self, partitions: &[i32], timeout: Duration) -> Vec<i32> {
        let deadline = Instant::now() + timeout;
        let mut parts = self.lock();
        loop {
            let busy: Vec<i32> = partitions
                .iter()
                .copied()
                .filter(|p| parts.get(p).is_some_and(|t| !t.inflight.is_empty()))
                .collect();
            let now = Instant::now();
            if busy.is_empty() || now >= deadline {
                return busy;
            }
            parts =
                self.changed.wait_timeout(parts, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn forget(&self, partitions: &[i32]) {
        let mut parts = self.lock();
        for p in partitions {
            parts.remove(p);
        }
    }

    fn is_idle(&self) -> bool {
        self.lock().values().all(|t| t.inflight.is_empty())
    }
}

/// Rebalance and statistics callbacks.
struct Context {
    topic: String,
    tracker: Arc<Tracker>,
    ready: Ready,
    revoke_wait: Duration,
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!("fleetpipe_kafka_consumer_lag", "topic" => topic.clone(), "partition" => p.to_string())
                    .set(part.consumer_lag as f64);
            }
        }
    }
}

/// Stores watermarks (the next offset to read) for the next commit.
fn store(consumer: &impl Consumer<Context>, topic: &str, offsets: &[(i32, i64)]) {
    for &(p, offset) in offsets {
        // librdkafka stores the given offset + 1: the last durable one is passed.
        if let Err(e) = consumer.store_offset(topic, p, offset - 1) {
            tracing::debug!(partition = p, offset, error = %e, "kafka offset not stored");
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let partitions: Vec<i32> =
            tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect();
        // Commit what is durable before letting go: wait for the partitions' entries first.
        let busy = self.tracker.wait_idle(&partitions, self.revoke_wait);
        if !busy.is_empty() {
            tracing::warn!(
                ?busy,
                "kafka partitions revoked with entries not yet durable; their next owner reads them again"
            );
        }
        store(consumer, &self.topic, &self.tracker.take_committable(Some(&partitions)));
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "kafka commit on revoke failed"),
        }
        self.tracker.forget(&partitions);
        tracing::info!(?partitions, "kafka partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "kafka partitions assigned");
                self.ready.set(true);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "kafka rebalance error"),
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            if !matches!(
                e,
                rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
            ) {
                tracing::warn!(error = %e, "kafka offset commit failed");
            }
        }
    }
}

/// A message taken off the consumer, owned.
struct Received {
    partition: i32,
    offset: i64,
    payload: Bytes,
    content_type: Option<String>,
    /// The record's `traceparent` header, read only while traces are on.
    trace: Option<fleetpipe_processors::trace::TraceContext>,
}

fn received(m: &rdkafka::message::BorrowedMessage<'_>) -> Received {
    let header = |name: &str| {
        m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key.eq_ignore_ascii_case(name))
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
        })
    };
    let trace = if fleetpipe_pipeline::trace::is_on() {
        header("traceparent").and_then(fleetpipe_processors::trace::TraceContext::parse)
    } else {
        None
    };
    Received {
        partition: m.partition(),
        offset: m.offset(),
        payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        content_type: header("content-type").map(str::to_owned),
        trace,
    }
}

/// Connects, joins the group and feeds the intake until shutdown; then drains: stops reading,
/// waits (at most `revoke_wait`) for what it submitted to be durable, commits, and leaves the
/// group. `ready` is set once the group has assigned this member its share.
async fn run(cfg: KafkaConfig, ctx: SourceContext) -> Result<()> {
    let SourceContext { intake, rules, ready, shutdown, .. } = ctx;
    let tracker = Arc::new(Tracker::default());
    let context = Context {
        topic: cfg.topic.clone(),
        tracker: tracker.clone(),
        ready: ready.clone(),
        revoke_wait: cfg.revoke_wait,
    };
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group)
        .set("client.id", &cfg.client_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // A dead member's partitions move to the others after this long (the group's session
        // timeout): short, for a quick take-over. (With the default 3 s heartbeat; tansu, the
        // Kafka-compatible broker of the tests, kept a killed member in the group with other
        // ratios.) Overridable through `[kafka.properties]`.
        .set("session.timeout.ms", "6000")
        // The prefetch bound: what a paused source holds at most.
        .set("queued.max.messages.kbytes", "16384")
        .set("statistics.interval.ms", "5000");
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    let consumer: Arc<StreamConsumer<Context>> = Arc::new(
        client
            .create_with_context(context)
            .map_err(|source| Error::Kafka { what: "create the consumer", source })?,
    );
    consumer.subscribe(&[cfg.topic.as_str()]).map_err(|source| Error::Kafka { what: "subscribe", source })?;
    tracing::info!(topic = %cfg.topic, group = %cfg.group, "kafka source subscribed");

    let mut shutdown = std::pin::pin!(shutdown.wait());
    let mut entry_no = 0u64;
    let mut last_store = Instant::now();
    let mut store_tick = tokio::time::interval(Duration::from_millis(200));
    store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(100);
    let batch = cfg.batch_messages.max(1);
    loop {
        // Wait for the first message of a batch (or the end).
        let first = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Watermarks move as entries become durable, traffic or not: store them.
            _ = store_tick.tick() => {
                store(consumer.as_ref(), &cfg.topic, &tracker.take_committable(None));
                continue;
            }
            m = consumer.recv() => m,
        };
        let mut msgs = match first {
            Ok(m) => vec![received(&m)],
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "kafka consumer error");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Whatever else is ready now joins the batch.
        while msgs.len() < batch {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(m)) => msgs.push(received(&m)),
                _ => break,
            }
        }
        entry_no += 1;
        let submission = build(&cfg.topic, msgs, entry_no, &rules, &tracker);
        let permit = match intake.try_reserve() {
            Ok(p) => p,
            Err(TrySendError::Closed(())) => break,
            Err(TrySendError::Full(())) => {
                // A momentarily full intake is simply waited out. One that stays full is
                // pushback: stop taking records until there is room. librdkafka keeps fetching
                // only until its bounded prefetch queue (`queued.max.messages.kbytes`) is full;
                // the rest stays in Kafka as lag. (Not `rd_kafka_pause` + resume, nor a seek:
                // both restart the fetcher mid-batch, which tansu, the broker of the tests,
                // answers with skipped and repeated records.)
                let permit = match tokio::time::timeout(PAUSE_AFTER, intake.reserve()).await {
                    Ok(permit) => permit,
                    Err(_) => {
                        metrics::gauge!("fleetpipe_kafka_paused").set(1.0);
                        tracing::info!("kafka consumption paused: intake full");
                        let permit = intake.reserve().await;
                        metrics::gauge!("fleetpipe_kafka_paused").set(0.0);
                        tracing::info!("kafka consumption resumed");
                        permit
                    }
                };
                let Ok(permit) = permit else { break };
                permit
            }
        };
        permit.send(submission);
        if last_store.elapsed() >= Duration::from_millis(100) {
            store(consumer.as_ref(), &cfg.topic, &tracker.take_committable(None));
            last_store = Instant::now();
        }
    }

    // Drain: what was submitted becomes durable, its offsets are committed, then we leave.
    ready.set(false);
    tracing::info!("kafka source draining");
    let deadline = Instant::now() + cfg.revoke_wait;
    while !tracker.is_idle() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store(consumer.as_ref(), &cfg.topic, &tracker.take_committable(None));
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "kafka commit at shutdown failed"),
    }
    consumer.unsubscribe();
    tracing::info!("kafka source stopped");
    Ok(())
}

fn build(
    topic: &str,
    msgs: Vec<Received>,
    entry_no: u64,
    rules: &Rules,
    tracker: &Arc<Tracker>,
) -> Submission {
    let received_at = now_micros();
    let mut entry = Entry { received_at, ..Entry::default() };
    let mut decoded = Decoded { frames: Vec::with_capacity(msgs.len()), ..Decoded::default() };
    let mut highest: HashMap<i32, i64> = HashMap::new();
    for m in &msgs {
        let origin = Origin::Kafka { topic: topic.to_owned(), partition: m.partition, offset: m.offset };
        let msg = Payload {
            payload: &m.payload,
            content_type: m.content_type.as_deref(),
            origin: &origin,
            received_at,
        };
        decode_message_into(&msg, rules, &mut decoded);
        let h = highest.entry(m.partition).or_insert(m.offset);
        *h = (*h).max(m.offset);
    }
    fleetpipe_pipeline::count_received("kafka", u64::from(decoded.received));
    entry.absorb(decoded);
    let incoming: Vec<_> = msgs.iter().filter_map(|m| m.trace).collect();
    entry.trace = fleetpipe_pipeline::trace::intake("kafka", &incoming, entry.frames.len());
    tracker.submitted(entry_no, &highest);
    let partitions: Vec<i32> = highest.keys().copied().collect();
    let tracker = tracker.clone();
    Submission {
        entry,
        done: Some(Box::new(move |result| match result {
            Ok(_) => tracker.durable(entry_no, &partitions),
            Err(e) => {
                // Not durable: the watermark stays; the partition's next reader reads it again.
                tracing::error!(error = %e, "kafka entry not durable, offsets not committed");
            }
        })),
    }
}
