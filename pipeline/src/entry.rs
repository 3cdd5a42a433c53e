//! What sources hand to the pipeline, and how they learn that it is durable.
//!
//! A source turns messages into an [`Entry`] (decoded, validated frames plus rejections) and
//! submits it to the [`Intake`], a bounded queue in front of the write-ahead log. Each
//! [`Submission`] may carry a [`Completion`] that the log calls exactly once: with the entry's
//! log position once it is durable, or with [`NotDurable`]. Only then does the source
//! acknowledge (MQTT PUBACK, HTTP 200, Kafka offset). A full intake is the pushback.

use fleetpipe_processors::trace::TraceContext;
use fleetpipe_processors::{Decoded, Frame, Lsn, Micros, Rejection};

/// What a source hands to the log: the outcome of decoding one or more messages.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Entry {
    pub received_at: Micros,
    pub frames: Vec<Frame>,
    pub rejections: Vec<Rejection>,
    /// The trace contexts of the requests or messages it came from (see [`crate::trace`]);
    /// never written to the log.
    pub trace: Vec<TraceContext>,
}

impl Entry {
    pub fn absorb(&mut self, decoded: Decoded) {
        // Into an empty entry the vectors move as they are (no copy).
        if self.frames.is_empty() {
            self.frames = decoded.frames;
        } else {
            self.frames.extend(decoded.frames);
        }
        if self.rejections.is_empty() {
            self.rejections = decoded.rejections;
        } else {
            self.rejections.extend(decoded.rejections);
        }
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

/// Counts `n` frames a source took (decoded, good or bad) in `fleetpipe_frames_received_total`
/// and in `fleetpipe_frames_in_flight`, which the log writer lowers as they become accepted or
/// rejected (or are refused while draining): `received = accepted + rejected + in_flight`.
pub fn count_received(source: &'static str, n: u64) {
    metrics::counter!("fleetpipe_frames_received_total", "source" => source).increment(n);
    metrics::gauge!("fleetpipe_frames_in_flight").increment(n as f64);
}

/// Frames that left flight: accepted, rejected, or refused.
pub(crate) fn landed(n: u64) {
    if n > 0 {
        metrics::gauge!("fleetpipe_frames_in_flight").decrement(n as f64);
    }
}

impl Entry {
    /// Frames (good and bad) the entry holds, as its source counted them received.
    pub(crate) fn received(&self) -> u64 {
        (self.frames.len() + self.rejections.len()) as u64
    }
}
