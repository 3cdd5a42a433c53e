//! Kafka outputs for stream consumers (rdkafka, idempotent producer):
//!
//! - `vehicle-frames-clean`: every accepted frame after de-duplication, as the contract's
//!   normalised JSON, key = `vehicle_id` (so a vehicle's frames stay in one partition, in order);
//! - `vehicle-frames-dlq`: every rejected input, its raw bytes as the value, with headers
//!   `reason`, `detail`, `source`, `origin` (topic, or `partition/offset` of a Kafka input) and
//!   `index` when one frame of a message was refused.
//!
//! A batch is durable here once the broker acknowledged every record of it (`acks=all`,
//! `enable.idempotence=true`, then `flush`). A failed delivery fails the batch; the driver
//! retries it, so a consumer may see a record twice (at-least-once), never miss one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetpipe_pipeline::{Sink, SinkError};
use fleetpipe_processors::codec::json::encode_json;
use fleetpipe_processors::{Batch, Lsn, Origin};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::{io_err, Error, Result};

const NAME: &str = "kafka";

/// Where the outputs go.
#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    pub brokers: String,
    pub client_id: String,
    /// `None`: no clean output.
    pub clean_topic: Option<String>,
    /// `None`: no dead-letter output.
    pub dlq_topic: Option<String>,
    /// How long a batch may wait for the broker's acknowledgements before it fails (and is
    /// retried).
    pub flush_timeout: Duration,
    /// Extra librdkafka properties, applied last.
    pub properties: Vec<(String, String)>,
    /// Where the sink remembers how far in the WAL it got (written aside and renamed, at most
    /// every tick; a checkpoint older than the truth only means records published again).
    pub checkpoint: std::path::PathBuf,
}

/// Counts failed deliveries between flushes.
#[derive(Default)]
pub(crate) struct Deliveries {
    pub(crate) failed: AtomicU64,
    pub(crate) last_error: std::sync::Mutex<Option<String>>,
}

pub(crate) struct Context(pub(crate) Arc<Deliveries>);

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.0.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = self.0.last_error.lock() {
                *last = Some(e.to_string());
            }
        }
    }
}

/// The clean and dead-letter topics as one sink.
pub struct KafkaSink {
    cfg: KafkaSinkConfig,
    producer: BaseProducer<Context>,
    deliveries: Arc<Deliveries>,
    durable: Lsn,
    saved: Lsn,
    json: Vec<u8>,
}

fn origin_header(origin: &Origin) -> String {
    match origin {
        Origin::Mqtt { topic } => topic.clone(),
        Origin::Http => "http".to_owned(),
        Origin::Teltonika { imei } => format!("teltonika/{imei}"),
        Origin::Sink { sink } => sink.clone(),
        Origin::Kafka { topic, partition, offset } => format!("{topic}/{partition}/{offset}"),
    }
}

impl KafkaSink {
    /// Creates the producer; connections are made on use.
    pub fn open(cfg: KafkaSinkConfig) -> Result<KafkaSink> {
        let deliveries = Arc::new(Deliveries::default());
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.brokers)
            .set("client.id", &cfg.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", cfg.flush_timeout.as_millis().to_string());
        for (k, v) in &cfg.properties {
            client.set(k, v);
        }
        let producer = client
            .create_with_context(Context(deliveries.clone()))
            .map_err(|source| Error::Kafka { what: "create the producer", source })?;
        let durable = match std::fs::read_to_string(&cfg.checkpoint) {
            Ok(text) => text
                .trim()
                .parse::<Lsn>()
                .map_err(|e| Error::Checkpoint { path: cfg.checkpoint.clone(), detail: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(io_err(&cfg.checkpoint, source)),
        };
        Ok(KafkaSink { cfg, producer, deliveries, durable, saved: durable, json: Vec::with_capacity(512) })
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        if self.durable == self.saved {
            return Ok(());
        }
        let path = &self.cfg.checkpoint;
        let tmp = path.with_extension("tmp");
        let io = |source| io_err(path, source);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(&tmp, self.durable.to_string()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        self.saved = self.durable;
        Ok(())
    }

    /// Sends one record, waiting (serving delivery reports) while librdkafka's queue is full.
    fn send(&self, record: BaseRecord<'_, [u8], [u8]>) -> Result<()> {
        let mut record = record;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((source, _)) => return Err(Error::Kafka { what: "send", source }),
            }
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        Ok(self.write_batch(batch)?)
    }

    fn tick(&mut self, _now: Instant) -> Result<(), SinkError> {
        self.producer.poll(Duration::ZERO);
        Ok(self.save_checkpoint()?)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.producer
            .flush(self.cfg.flush_timeout)
            .map_err(|source| Error::Kafka { what: "flush", source })?;
        Ok(self.save_checkpoint()?)
    }
}

impl KafkaSink {
    fn write_batch(&mut self, batch: &Batch) -> Result<()> {
        let started = Instant::now();
        let mut json = std::mem::take(&mut self.json);
        let mut sent = 0u64;
        if let Some(topic) = &self.cfg.clean_topic {
            // A traced batch (the driver's `sink.kafka` span is current) carries its trace on.
            let traceparent = fleetpipe_pipeline::trace::current().map(|c| c.header());
            for f in &batch.frames {
                json.clear();
                encode_json(f, &mut json);
                let record = BaseRecord::to(topic).key(f.vehicle_id.as_bytes()).payload(&json[..]);
                let record = match &traceparent {
                    Some(tp) => record.headers(
                        OwnedHeaders::new().insert(Header { key: "traceparent", value: Some(tp.as_str()) }),
                    ),
                    None => record,
                };
                self.send(record)?;
                sent += 1;
            }
        }
        self.json = json;
        let mut rejected = 0u64;
        if let Some(topic) = &self.cfg.dlq_topic {
            for r in &batch.rejections {
                let index = r.index.map(|i| i.to_string());
                let origin = origin_header(&r.origin);
                let mut headers = OwnedHeaders::new()
                    .insert(Header { key: "reason", value: Some(r.reason.code()) })
                    .insert(Header { key: "detail", value: Some(r.detail.as_str()) })
                    .insert(Header { key: "source", value: Some(r.origin.source()) })
                    .insert(Header { key: "origin", value: Some(origin.as_str()) });
                if let Some(i) = &index {
                    headers = headers.insert(Header { key: "index", value: Some(i.as_str()) });
                }
                self.send(BaseRecord::to(topic).payload(&r.raw[..]).headers(headers))?;
                rejected += 1;
            }
        }
        if sent + rejected > 0 {
            self.producer
                .flush(self.cfg.flush_timeout)
                .map_err(|source| Error::Kafka { what: "flush", source })?;
            let failed = self.deliveries.failed.swap(0, Ordering::Relaxed);
            if failed > 0 {
                let last = self.deliveries.last_error.lock().ok().and_then(|mut l| l.take());
                return Err(Error::KafkaUndelivered {
                    failed,
                    records: sent + rejected,
                    last: last.unwrap_or_default(),
                });
            }
            metrics::counter!("fleetpipe_frames_written_total", "sink" => NAME).increment(sent);
            metrics::counter!("fleetpipe_kafka_dlq_records_total").increment(rejected);
            tracing::debug!(
                sink = NAME,
                sent,
                rejected,
                ms = started.elapsed().as_millis() as u64,
                "kafka batch delivered"
            );
        }
        self.durable = batch.lsn;
        Ok(())
    }
}
