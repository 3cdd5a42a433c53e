//! Codecs: from a received message (payload + content type + origin) to validated frames and
//! rejections, and from frames back to contract JSON or Protobuf.
//!
//! [`decode_message`] is the single entry point for every source (MQTT, HTTP, Kafka):
//!
//! 1. a payload over [`Rules::max_payload_bytes`] is refused whole (`oversized`);
//! 2. the encoding is taken from the content type, or sniffed ([`sniff`]);
//! 3. the payload is split into frames (JSON object, array, NDJSON, or a Protobuf `FrameBatch`);
//! 4. each frame gets the transport's rules — on MQTT the topic names the vehicle and usually the
//!    kind; on HTTP and Kafka `kind` is required — and is validated ([`crate::validate`]).
//!
//! A bad frame becomes a [`Rejection`] carrying its own bytes and index; its neighbours are
//! unaffected. A payload that cannot be split at all becomes one rejection with `index: None`.
//! Nothing here panics on any input.

pub mod json;
pub mod proto;
pub mod stored;
pub mod teltonika;
pub mod topic;

#[cfg(test)]
pub(crate) mod tests;

use bytes::Bytes;

use crate::frame::snippet;
use crate::frame::{Decoded, Frame, Kind, Micros, Origin, Reason, Rejection};
use crate::validate::{Fail, Rules};
use crate::{Error, Result};

pub use json::{encode_json, frame_to_value};
pub use proto::{decode_batch, encode_protobuf, frame_to_pb};
pub use topic::{parse_topic, Topic};

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// A JSON object or array — or several objects, one per line, which decode as NDJSON.
    Json,
    /// One JSON object per line.
    Ndjson,
    /// A Protobuf `fleetpipe.v1.FrameBatch`.
    Protobuf,
}

/// The encoding named by a content type: `Some(None)` means "look at the bytes".
fn from_content_type(content_type: &str) -> Result<Option<Encoding>> {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let is = |s: &str| media.eq_ignore_ascii_case(s);
    if media.is_empty()
        || is("application/octet-stream")
        // Defaults of curl -d and of many MQTT tools: not a statement about the payload.
        || is("application/x-www-form-urlencoded")
        || is("text/plain")
    {
        Ok(None)
    } else if is("application/json")
        || is("text/json")
        || media.len() > 5 && media.get(media.len() - 5..).is_some_and(|t| t.eq_ignore_ascii_case("+json"))
    {
        Ok(Some(Encoding::Json))
    } else if is("application/x-ndjson")
        || is("application/ndjson")
        || is("application/jsonl")
        || is("application/x-jsonlines")
        || is("application/jsonlines")
    {
        Ok(Some(Encoding::Ndjson))
    } else if is("application/x-protobuf")
        || is("application/protobuf")
        || is("application/vnd.google.protobuf")
        || is("application/x-google-protobuf")
    {
        Ok(Some(Encoding::Protobuf))
    } else {
        Err(Error::UnsupportedContentType(content_type.to_owned()))
    }
}

/// What the first bytes say.
enum Sniffed {
    Known(Encoding),
    /// JSON whitespace, then `{` or `[`: JSON with leading whitespace, or a Protobuf batch whose
    /// first frame happens to be 91 or 123 bytes long (`0x0A 0x5B` / `0x0A 0x7B`).
    Ambiguous,
}

fn sniff_bytes(payload: &[u8]) -> Sniffed {
    match payload.first() {
        Some(b'{' | b'[') => Sniffed::Known(Encoding::Json),
        Some(b' ' | b'\t' | b'\n' | b'\r') => match json::first_non_ws(payload) {
            Some(b'{' | b'[') => Sniffed::Ambiguous,
            _ => Sniffed::Known(Encoding::Protobuf),
        },
        _ => Sniffed::Known(Encoding::Protobuf),
    }
}

/// The encoding of a payload: from its content type (parameters such as `; charset=utf-8` are
/// ignored) when one is given, otherwise from its bytes — first non-whitespace byte `{` or `[` is
/// JSON, anything else Protobuf. A byte-sniffed payload that starts with whitespace and also
/// decodes as a Protobuf `FrameBatch` is Protobuf (its first byte is then `\n`, i.e. field 1).
///
/// NDJSON sent as `application/json` or sniffed reports [`Encoding::Json`]; [`decode_message`]
/// recognises it by the objects that follow the first.
pub fn sniff(content_type: Option<&str>, payload: &[u8]) -> Result<Encoding> {
    if let Some(enc) = content_type.map(from_content_type).transpose()?.flatten() {
        return Ok(enc);
    }
    Ok(match sniff_bytes(payload) {
        Sniffed::Known(enc) => enc,
        Sniffed::Ambiguous if decode_batch(payload).is_ok() => Encoding::Protobuf,
        Sniffed::Ambiguous => Encoding::Json,
    })
}

/// One received message, as a source hands it to [`decode_message`].
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub payload: &'a Bytes,
    /// HTTP `Content-Type` or the MQTT 5 content-type property, if any.
    pub content_type: Option<&'a str>,
    pub origin: &'a Origin,
    /// The receiving clock; becomes every frame's `received_at`.
    pub received_at: Micros,
}

/// What the transport says about vehicle and kind.
enum TopicRule<'a> {
    /// HTTP, Kafka: the frame must carry `kind`.
    Direct,
    /// MQTT `vehicles/{vehicle_id}/{kind}`; `kind: None` for `frames`.
    Mqtt { vehicle_id: &'a str, kind: Option<Kind> },
    /// An MQTT topic that does not follow the contract.
    Invalid(&'a str),
}

/// Per-message decoding context shared by the codecs.
pub(crate) struct Ctx<'a> {
    pub(crate) payload: &'a Bytes,
    pub(crate) received_at: Micros,
    pub(crate) rules: &'a Rules,
    origin: &'a Origin,
    topic: TopicRule<'a>,
}

impl<'a> Ctx<'a> {
    fn new(msg: &Message<'a>, rules: &'a Rules) -> Self {
        let topic = match msg.origin {
            Origin::Mqtt { topic } => match topic::split_topic(topic) {
                Some((vehicle_id, kind)) => TopicRule::Mqtt { vehicle_id, kind },
                None => TopicRule::Invalid(topic),
            },
            Origin::Http | Origin::Kafka { .. } | Origin::Teltonika { .. } | Origin::Sink { .. } => {
                TopicRule::Direct
            }
        };
        Ctx { payload: msg.payload, received_at: msg.received_at, rules, origin: msg.origin, topic }
    }

    /// The frame's kind after the transport's rules, given the payload's vehicle id and its
    /// `kind` (`Ok(None)` absent, `Err(detail)` not a known kind).
    pub(crate) fn resolve_kind(
        &self,
        vehicle_id: &str,
        kind: Result<Option<Kind>, String>,
    ) -> Result<Kind, Fail> {
        let kind = kind.map_err(|detail| (Reason::InvalidKind, detail))?;
        match (&self.topic, kind) {
            (TopicRule::Invalid(topic), _) => Err(invalid_topic(topic)),
            (TopicRule::Mqtt { vehicle_id: tid, .. }, _) if *tid != vehicle_id => Err((
                Reason::SpoofedVehicle,
                format!("vehicle_id {} differs from the topic's {}", snippet(vehicle_id), snippet(tid)),
            )),
            (TopicRule::Mqtt { kind: Some(t), .. }, None) => Ok(*t),
            (TopicRule::Mqtt { kind: Some(t), .. }, Some(k)) if *t != k => {
                Err((Reason::InvalidKind, format!("kind {k} disagrees with the topic's {t}")))
            }
            (TopicRule::Mqtt { kind: None, .. }, None) => {
                Err((Reason::MissingField, "kind is required on vehicles/{id}/frames".to_owned()))
            }
            (TopicRule::Direct, None) => {
                Err((Reason::MissingField, "kind is required (\"location\" or \"diagnostic\")".to_owned()))
            }
            (_, Some(k)) => Ok(k),
        }
    }

    fn rejection(&self, reason: Reason, detail: String, index: Option<u32>, raw: Bytes) -> Rejection {
        Rejection { reason, detail, index, raw, origin: self.origin.clone(), received_at: self.received_at }
    }

    /// Records frame `index` of the message: accepted, or rejected with `raw()` as its bytes.
    /// Returns `false` once the message is over [`Rules::max_frames_per_message`]: the frame at
    /// the limit and everything after it are one `too_many_frames` rejection (one received
    /// frame, without bytes), and the codec stops.
    #[must_use]
    pub(crate) fn push(
        &self,
        out: &mut Decoded,
        index: usize,
        raw: impl FnOnce() -> Bytes,
        result: Result<Frame, Fail>,
    ) -> bool {
        if index >= self.rules.max_frames_per_message {
            self.reject_excess(out);
            return false;
        }
        out.received = out.received.saturating_add(1);
        let result = match &self.topic {
            TopicRule::Invalid(topic) => Err(invalid_topic(topic)),
            _ => result,
        };
        match result {
            Ok(frame) => out.frames.push(frame),
            Err((reason, detail)) => {
                let index = Some(u32::try_from(index).unwrap_or(u32::MAX));
                let r = self.rejection(reason, detail, index, raw());
                out.rejections.push(r);
            }
        }
        true
    }

    /// Records the frames past [`Rules::max_frames_per_message`] (from index `max` on) as one
    /// `too_many_frames` rejection without bytes, counted as one received frame.
    pub(crate) fn reject_excess(&self, out: &mut Decoded) {
        let max = self.rules.max_frames_per_message;
        out.received = out.received.saturating_add(1);
        let detail = format!(
            "the message holds more than {max} frames (validate.max_frames_per_message): frame {max} and all after it are refused"
        );
        let index = Some(u32::try_from(max).unwrap_or(u32::MAX));
        out.rejections.push(self.rejection(Reason::TooManyFrames, detail, index, Bytes::new()));
    }

    /// Records a payload that could not be split into frames: one rejection, counted as one
    /// received frame.
    pub(crate) fn reject_whole(&self, out: &mut Decoded, reason: Reason, detail: String) {
        out.received = out.received.saturating_add(1);
        let r = self.rejection(reason, detail, None, self.payload.clone());
        out.rejections.push(r);
    }
}

fn invalid_topic(topic: &str) -> Fail {
    (
        Reason::InvalidTopic,
        format!("topic {} is not vehicles/{{vehicle_id}}/location|diagnostic|frames", snippet(topic)),
    )
}

/// Decodes and validates one message. Never fails and never panics: what is not accepted is in
/// [`Decoded::rejections`], and [`Decoded::received`] counts good and bad frames.
pub fn decode_message(msg: &Message<'_>, rules: &Rules) -> Decoded {
    let mut out = Decoded::default();
    decode_message_into(msg, rules, &mut out);
    out
}

/// [`decode_message`] appending to `out`: a source folding several messages into one log entry
/// decodes them all into one [`Decoded`] (no vectors per message, no copy into the entry), and
/// `out.received` grows by this message's frames.
pub fn decode_message_into(msg: &Message<'_>, rules: &Rules, out: &mut Decoded) {
    let ctx = Ctx::new(msg, rules);
    let before = out.received;
    let payload: &[u8] = msg.payload;
    if payload.len() > rules.max_payload_bytes {
        ctx.reject_whole(
            out,
            Reason::Oversized,
            format!(
                "payload of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                rules.max_payload_bytes
            ),
        );
        return;
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        ctx.reject_whole(out, Reason::EmptyFrame, "empty payload".to_owned());
        return;
    }
    let declared = match msg.content_type.map(from_content_type).transpose() {
        Ok(declared) => declared.flatten(),
        Err(e) => {
            ctx.reject_whole(out, Reason::UnsupportedContentType, e.to_string());
            return;
        }
    };
    match declared {
        Some(enc) => decode_as(&ctx, out, enc),
        None => match sniff_bytes(payload) {
            Sniffed::Known(Encoding::Protobuf) if looks_like_text(payload) => {
                // Text that is not JSON (`hello`, `lat=56.1`, a quoted string): say so, rather
                // than report the Protobuf wire-type error it also makes.
                match proto::decode_batch_capped(payload, rules.max_frames_per_message) {
                    Ok((batch, more)) => proto::decode_capped(&ctx, out, &batch, more),
                    Err(_) => ctx.reject_whole(
                        out,
                        Reason::MalformedJson,
                        format!(
                            "not JSON (a frame starts with {{ or [) and not Protobuf: text starting {}",
                            snippet(&String::from_utf8_lossy(payload))
                        ),
                    ),
                }
            }
            Sniffed::Known(enc) => decode_as(&ctx, out, enc),
            Sniffed::Ambiguous => match proto::decode_batch_capped(payload, rules.max_frames_per_message) {
                Ok((batch, more)) => proto::decode_capped(&ctx, out, &batch, more),
                Err(_) => decode_as(&ctx, out, Encoding::Json),
            },
        },
    }
    if out.received == before {
        // `[]`, blank NDJSON, an empty FrameBatch: nothing is dropped without a trace.
        ctx.reject_whole(out, Reason::EmptyFrame, "the message holds no frame".to_owned());
    }
}

/// Printable UTF-8 (whitespace allowed): what a person or a misconfigured client types, never a
/// Protobuf batch (whose first byte is a field tag, `0x0A`, then a length).
fn looks_like_text(payload: &[u8]) -> bool {
    std::str::from_utf8(payload).is_ok_and(|t| t.chars().all(|c| !c.is_control() || c.is_whitespace()))
        && payload.first() != Some(&0x0A)
}

fn decode_as(ctx: &Ctx<'_>, out: &mut Decoded, encoding: Encoding) {
    match encoding {
        Encoding::Json => json::decode(ctx, out, false),
        Encoding::Ndjson => json::decode(ctx, out, true),
        Encoding::Protobuf => match proto::decode_batch_capped(ctx.payload, ctx.rules.max_frames_per_message)
        {
            Ok((batch, more)) => proto::decode_capped(ctx, out, &batch, more),
            Err(e) => ctx.reject_whole(
                out,
                Reason::MalformedProtobuf,
                format!("not a fleetpipe.v1.FrameBatch: {e}"),
            ),
        },
    }
}
