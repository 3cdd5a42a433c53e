//! How an [`Entry`] is stored in the write-ahead log: a small Protobuf envelope whose frames
//! are the public `FrameBatch` encoding (proto/fleetpipe.proto) and whose rejections keep their
//! reason, raw bytes and origin, so a replay feeds sinks exactly what the live path did.
//!
//! Reading a record back is the trusted path ([`fleetpipe_processors::codec::stored`]): the
//! frames were validated when they were received and are converted, not checked again.

use bytes::Bytes;
use fleetpipe_processors::codec::encode_protobuf;
use fleetpipe_processors::codec::stored;
use fleetpipe_processors::{Origin, Reason, Rejection};
use prost::Message as _;

use crate::entry::Entry;

/// A log record that is not what fleetpipe writes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("log record envelope does not decode: {0}")]
    Envelope(#[from] prost::DecodeError),
    #[error(transparent)]
    Frame(#[from] fleetpipe_processors::Error),
}

#[derive(Clone, PartialEq, prost::Message)]
struct WalEntry {
    #[prost(int64, tag = "1")]
    received_at: i64,
    /// A `FrameBatch`.
    #[prost(bytes = "vec", tag = "2")]
    frames: Vec<u8>,
    #[prost(message, repeated, tag = "3")]
    rejections: Vec<WalRejection>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WalRejection {
    #[prost(string, tag = "1")]
    reason: String,
    #[prost(string, tag = "2")]
    detail: String,
    #[prost(uint32, optional, tag = "3")]
    index: Option<u32>,
    #[prost(bytes = "bytes", tag = "4")]
    raw: Bytes,
    #[prost(string, tag = "5")]
    source: String,
    #[prost(string, optional, tag = "6")]
    topic: Option<String>,
    #[prost(int32, tag = "7")]
    partition: i32,
    #[prost(int64, tag = "8")]
    offset: i64,
    #[prost(int64, tag = "9")]
    received_at: i64,
}

pub(crate) fn encode(entry: &Entry) -> Vec<u8> {
    let rejections = entry
        .rejections
        .iter()
        .map(|r| {
            let (topic, partition, offset) = match &r.origin {
                Origin::Mqtt { topic } => (Some(topic.clone()), 0, 0),
                Origin::Http | Origin::Sink { .. } => (None, 0, 0),
                Origin::Kafka { topic, partition, offset } => (Some(topic.clone()), *partition, *offset),
                Origin::Teltonika { imei } => (Some(imei.clone()), 0, 0),
            };
            WalRejection {
                reason: r.reason.code().to_string(),
                detail: r.detail.clone(),
                index: r.index,
                raw: r.raw.clone(),
                source: r.origin.source().to_string(),
                topic,
                partition,
                offset,
                received_at: r.received_at,
            }
        })
        .collect();
    let frames = if entry.frames.is_empty() { Vec::new() } else { encode_protobuf(&entry.frames) };
    WalEntry { received_at: entry.received_at, frames, rejections }.encode_to_vec()
}

/// Decodes a stored entry; a record that does not decode is skipped by the caller.
pub(crate) fn decode(payload: &[u8]) -> Result<Entry, RecordError> {
    let stored = WalEntry::decode(payload)?;
    let mut entry = Entry { received_at: stored.received_at, ..Entry::default() };
    if !stored.frames.is_empty() {
        entry.frames = stored::frames_from_protobuf(&stored.frames, stored.received_at)?;
    }
    entry.rejections = stored
        .rejections
        .into_iter()
        .map(|r| {
            let origin = match (r.source.as_str(), r.topic) {
                ("mqtt", Some(topic)) => Origin::Mqtt { topic },
                ("kafka", Some(topic)) => Origin::Kafka { topic, partition: r.partition, offset: r.offset },
                ("http", _) => Origin::Http,
                ("teltonika", imei) => Origin::Teltonika { imei: imei.unwrap_or_default() },
                (sink, _) => Origin::Sink { sink: sink.to_owned() },
            };
            Rejection {
                reason: Reason::from_code(&r.reason).unwrap_or(Reason::InvalidField),
                detail: r.detail,
                index: r.index,
                raw: r.raw,
                origin,
                received_at: r.received_at,
            }
        })
        .collect();
    Ok(entry)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fleetpipe_processors::{Body, Frame, Location};

    #[test]
    fn an_entry_reads_back_as_written_origins_included() {
        let frame = Frame {
            vehicle_id: "V1".into(),
            ts: fleetpipe_processors::time::MAX_TS,
            seq: 3,
            received_at: 5,
            body: Body::Location(Location {
                lat: 1.5,
                lon: 2.5,
                speed_kmh: Some(3.0),
                ..Location::default()
            }),
        };
        let rejection = |origin: Origin| Rejection {
            reason: Reason::OutOfRange,
            detail: "lat 91 outside -90..90".into(),
            index: Some(2),
            raw: Bytes::from_static(b"{\"lat\":91}"),
            origin,
            received_at: 5,
        };
        let entry = Entry {
            received_at: 5,
            frames: vec![frame],
            rejections: vec![
                rejection(Origin::Mqtt { topic: "vehicles/V1/location".into() }),
                rejection(Origin::Http),
                rejection(Origin::Kafka { topic: "vehicle-frames".into(), partition: 3, offset: 99 }),
                rejection(Origin::Sink { sink: "postgres".into() }),
                rejection(Origin::Teltonika { imei: "356307042441013".into() }),
            ],
            ..Entry::default()
        };
        assert_eq!(decode(&encode(&entry)).unwrap(), entry);
    }
}
