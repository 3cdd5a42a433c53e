//! fleetpipe's sources: MQTT (through rumqttc, against an external broker or the embedded
//! rumqttd one), Kafka (rdkafka, a consumer group member) and HTTP (axum).
//!
//! A source turns messages into [`Entry`]s (decoded, validated frames plus rejections) and
//! submits them to the intake, a bounded queue in front of the write-ahead log. Each
//! [`Submission`] carries a [`Completion`] that the log calls once the entry is durable; only
//! then does the source acknowledge (MQTT PUBACK, HTTP 200). A full intake is the pushback:
//! MQTT stops reading (and so withholds acks), HTTP answers 503 with `Retry-After`.
//!
//! This crate knows nothing of sinks.

pub mod broker;
pub mod http;
pub mod kafka;
pub mod mqtt;

use fleetpipe_processors::{Decoded, Frame, Lsn, Micros, Rejection};

/// What a source hands to the log: the outcome of decoding one or more messages.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Entry {
    pub received_at: Micros,
    pub frames: Vec<Frame>,
    pub rejections: Vec<Rejection>,
}

impl Entry {
    pub fn absorb(&mut self, decoded: Decoded) {
        self.frames.extend(decoded.frames);
        self.rejections.extend(decoded.rejections);
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.rejections.is_empty()
    }
}

/// Why an entry could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotDurable {
    #[error("write-ahead log failed: {0}")]
    Log(String),
    #[error("pipeline is shutting down")]
    ShuttingDown,
}

/// Called once, by the log, when the entry is durable (with its LSN) or could not be made so.
pub type Completion = Box<dyn FnOnce(Result<Lsn, NotDurable>) + Send>;

/// An entry on its way to the log.
pub struct Submission {
    pub entry: Entry,
    pub done: Option<Completion>,
}

/// The bounded intake queue in front of the log.
pub type Intake = tokio::sync::mpsc::Sender<Submission>;

/// The wall clock in microseconds since the epoch.
pub fn now_micros() -> Micros {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_micros() as Micros
}
