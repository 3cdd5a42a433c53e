//! The Kafka events output: every event on the `vehicle-events` topic (key `vehicle_id`, the
//! contract's JSON), through the idempotent producer; a commit is durable once the broker
//! acknowledged all of it, and only then are the engine's state and position saved (in
//! `{data_dir}/_fleetpipe/kafka_events.state`). A crash between the two publishes the events
//! of that commit again: at-least-once, with the same `event_id`s, so a consumer folds them.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fleetpipe_processors::events::{event_json, Event};
use fleetpipe_processors::Lsn;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::{EventOutput, State};
use crate::files::rolling::fsync_dir;
use crate::kafka::{Context, Deliveries};
use crate::{io_err, Error, Result};

const NAME: &str = "kafka_events";

/// Where the events go.
#[derive(Debug, Clone)]
pub struct KafkaEventsConfig {
    pub brokers: String,
    pub client_id: String,
    pub topic: String,
    /// Extra librdkafka properties, applied last.
    pub properties: Vec<(String, String)>,
    /// The data directory (the state file lives under `_fleetpipe/`).
    pub data_dir: PathBuf,
}

/// The Kafka events output.
pub struct KafkaOutput {
    producer: BaseProducer<Context>,
    deliveries: Arc<Deliveries>,
    topic: String,
    state_path: PathBuf,
    committed: Option<(Lsn, Option<Vec<u8>>)>,
}

/// Creates the producer and reads the saved state (8 bytes of position, then the state).
pub fn open(cfg: &KafkaEventsConfig) -> Result<KafkaOutput> {
    let deliveries = Arc::new(Deliveries::default());
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("{}-events", cfg.client_id))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    let producer = client
        .create_with_context(Context(Arc::clone(&deliveries)))
        .map_err(|source| Error::Kafka { what: "create the events producer", source })?;
    let state_path = cfg.data_dir.join("_fleetpipe").join("kafka_events.state");
    let committed = match std::fs::read(&state_path) {
        Ok(bytes) if bytes.len() >= 8 => {
            let mut lsn = [0u8; 8];
            lsn.copy_from_slice(&bytes[..8]);
            (u64::from_be_bytes(lsn), Some(bytes[8..].to_vec()))
        }
        Ok(_) => {
            return Err(Error::Checkpoint { path: state_path, detail: "shorter than its position".into() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, None),
        Err(e) => return Err(io_err(&state_path, e)),
    };
    Ok(KafkaOutput { producer, deliveries, topic: cfg.topic.clone(), state_path, committed: Some(committed) })
}

impl EventOutput for KafkaOutput {
    fn name(&self) -> &'static str {
        NAME
    }

    fn committed(&mut self) -> (Lsn, Option<Vec<u8>>) {
        self.committed.take().unwrap_or((0, None))
    }

    fn commit(&mut self, lsn: Lsn, events: &[Event], state: &State<'_>) -> Result<()> {
        for e in events {
            let payload = event_json(e).to_string();
            let mut record =
                BaseRecord::to(&self.topic).key(e.vehicle_id.as_bytes()).payload(payload.as_bytes());
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((source, _)) => return Err(Error::Kafka { what: "send an event", source }),
                }
            }
        }
        if !events.is_empty() {
            self.producer
                .flush(Duration::from_secs(30))
                .map_err(|source| Error::Kafka { what: "flush the events", source })?;
            let failed = self.deliveries.failed.swap(0, Ordering::Relaxed);
            if failed > 0 {
                let last = self.deliveries.last_error.lock().ok().and_then(|mut l| l.take());
                return Err(Error::KafkaUndelivered {
                    failed,
                    records: events.len() as u64,
                    last: last.unwrap_or_default(),
                });
            }
        }
        let tmp = self.state_path.with_extension("tmp");
        let io = |e| io_err(&tmp, e);
        if let Some(dir) = self.state_path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        state.write_file(&tmp, &lsn.to_be_bytes()).map_err(io)?;
        std::fs::rename(&tmp, &self.state_path).map_err(io)?;
        if let Some(dir) = self.state_path.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    }
}
