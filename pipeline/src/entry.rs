//! What sources hand to the pipeline, and how they learn that it is durable.
//!
//! A source turns messages into an [`Entry`] (decoded, validated frames plus rejections) and
//! submits it to the [`Intake`], a bounded queue in front of the write-ahead log. Each
//! [`Submission`] may carry a [`Completion`] that the log calls exactly once: with the entry's
//! log position once it is durable, or with [`NotDurable`]. Only then does the source
//! acknowledge (MQTT PUBACK, HTTP 200, Kafka offset). A full intake is the pushback.

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

/// The wall clock in microseconds since the epoch: the receive clock of every source.
pub fn now_micros() -> Micros {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_micros() as Micros
}
