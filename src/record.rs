//! How an [`Entry`] is stored in the write-ahead log: a small Protobuf envelope whose frames
//! are the public `FrameBatch` encoding (proto/fleetpipe.proto) and whose rejections keep their
//! reason, raw bytes and origin, so a replay feeds sinks exactly what the live path did.

use bytes::Bytes;
use fleetpipe_ingest::Entry;
use fleetpipe_processors::codec::{decode_message, encode_protobuf, Message};
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::{Origin, Reason, Rejection};
use prost::Message as _;

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

pub fn encode(entry: &Entry) -> Vec<u8> {
    let rejections = entry
        .rejections
        .iter()
        .map(|r| {
            let (topic, partition, offset) = match &r.origin {
                Origin::Mqtt { topic } => (Some(topic.clone()), 0, 0),
                Origin::Http => (None, 0, 0),
                Origin::Kafka { topic, partition, offset } => (Some(topic.clone()), *partition, *offset),
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

/// Decodes a stored entry. The frames were validated when first received, so they are decoded
/// with rules that accept any time; a record that does not decode is skipped by the caller.
pub fn decode(payload: &[u8]) -> Result<Entry, prost::DecodeError> {
    let stored = WalEntry::decode(payload)?;
    let mut entry = Entry { received_at: stored.received_at, ..Entry::default() };
    if !stored.frames.is_empty() {
        let rules = Rules { max_future_us: i64::MAX / 4, min_ts: None, max_payload_bytes: usize::MAX };
        let bytes = Bytes::from(stored.frames);
        let origin = Origin::Http;
        let msg = Message {
            payload: &bytes,
            content_type: Some("application/x-protobuf"),
            origin: &origin,
            received_at: stored.received_at,
        };
        entry.frames = decode_message(&msg, &rules).frames;
    }
    entry.rejections = stored
        .rejections
        .into_iter()
        .map(|r| {
            let origin = match (r.source.as_str(), r.topic) {
                ("mqtt", Some(topic)) => Origin::Mqtt { topic },
                ("kafka", Some(topic)) => Origin::Kafka { topic, partition: r.partition, offset: r.offset },
                _ => Origin::Http,
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
