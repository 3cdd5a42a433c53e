//! The compact Protobuf encoding (`proto/fleetpipe.proto`, package `fleetpipe.v1`).
//!
//! [`pb`] holds the message structs, written by hand with `prost` derives so that no `protoc` is
//! needed at build time; they mirror the `.proto` file field for field. A Protobuf payload is
//! always a [`pb::FrameBatch`]. Decoded frames go through the same kind/topic rules and the same
//! validation as JSON frames.

use bytes::Bytes;
use prost::Message as _;

use super::Ctx;
use crate::frame::{Body, Decoded, Diagnostic, Dtc, Frame, Kind, Location, Micros, Reason};
use crate::validate::{self, Fail};

/// Message structs of `fleetpipe.v1`, mirroring `proto/fleetpipe.proto`.
pub mod pb {
    /// What a Protobuf payload carries: one or more frames.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FrameBatch {
        #[prost(message, repeated, tag = "1")]
        pub frames: Vec<Frame>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Kind {
        Unspecified = 0,
        Location = 1,
        Diagnostic = 2,
    }

    /// One reading from one vehicle at one moment.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Frame {
        #[prost(string, tag = "1")]
        pub vehicle_id: String,
        /// Microseconds since the epoch, UTC; 0 means "not set".
        #[prost(int64, tag = "2")]
        pub ts_us: i64,
        #[prost(uint64, optional, tag = "3")]
        pub seq: Option<u64>,
        #[prost(enumeration = "Kind", tag = "4")]
        pub kind: i32,
        #[prost(oneof = "frame::Body", tags = "10, 11")]
        pub body: Option<frame::Body>,
    }

    /// Nested types of [`Frame`].
    pub mod frame {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Body {
            #[prost(message, tag = "10")]
            Location(super::Location),
            #[prost(message, tag = "11")]
            Diagnostic(super::Diagnostic),
        }
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(double, optional, tag = "1")]
        pub lat: Option<f64>,
        #[prost(double, optional, tag = "2")]
        pub lon: Option<f64>,
        #[prost(double, optional, tag = "3")]
        pub speed_kmh: Option<f64>,
        #[prost(double, optional, tag = "4")]
        pub heading_deg: Option<f64>,
        #[prost(double, optional, tag = "5")]
        pub alt_m: Option<f64>,
        #[prost(double, optional, tag = "6")]
        pub accuracy_m: Option<f64>,
        #[prost(uint32, optional, tag = "7")]
        pub satellites: Option<u32>,
        #[prost(double, optional, tag = "8")]
        pub odometer_m: Option<f64>,
        #[prost(bool, optional, tag = "9")]
        pub ignition: Option<bool>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Diagnostic {
        #[prost(double, optional, tag = "1")]
        pub engine_rpm: Option<f64>,
        #[prost(double, optional, tag = "2")]
        pub coolant_temp_c: Option<f64>,
        #[prost(double, optional, tag = "3")]
        pub engine_load_pct: Option<f64>,
        #[prost(double, optional, tag = "4")]
        pub fuel_level_pct: Option<f64>,
        #[prost(double, optional, tag = "5")]
        pub battery_soc_pct: Option<f64>,
        #[prost(double, optional, tag = "6")]
        pub battery_v: Option<f64>,
        #[prost(double, optional, tag = "7")]
        pub engine_hours: Option<f64>,
        #[prost(double, optional, tag = "8")]
        pub odometer_m: Option<f64>,
        #[prost(bool, optional, tag = "9")]
        pub mil_on: Option<bool>,
        #[prost(message, repeated, tag = "10")]
        pub dtcs: Vec<Dtc>,
        /// Distinguishes an explicit empty `dtcs` from an absent one.
        #[prost(bool, tag = "11")]
        pub dtcs_present: bool,
        /// The `signals` object as JSON text.
        #[prost(string, optional, tag = "12")]
        pub signals_json: Option<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dtc {
        #[prost(oneof = "dtc::Code", tags = "1, 2")]
        pub code: Option<dtc::Code>,
    }

    /// Nested types of [`Dtc`].
    pub mod dtc {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Code {
            #[prost(string, tag = "1")]
            Obd(String),
            #[prost(message, tag = "2")]
            J1939(super::J1939),
        }
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct J1939 {
        #[prost(uint32, tag = "1")]
        pub spn: u32,
        #[prost(uint32, tag = "2")]
        pub fmi: u32,
        #[prost(uint32, tag = "3")]
        pub oc: u32,
        #[prost(uint32, tag = "4")]
        pub sa: u32,
    }
}

/// `$to { lat, lon, …the optional fields of `$from` }`: `pb::Location` and [`Location`] share
/// their optional fields by name, listed here once for both directions.
macro_rules! location_with {
    ($from:ident => $($to:ident)::+ { $($field:ident: $value:expr),* $(,)? }) => {
        $($to)::+ {
            $($field: $value,)*
            speed_kmh: $from.speed_kmh,
            heading_deg: $from.heading_deg,
            alt_m: $from.alt_m,
            accuracy_m: $from.accuracy_m,
            satellites: $from.satellites,
            odometer_m: $from.odometer_m,
            ignition: $from.ignition,
        }
    };
}

/// The Protobuf form of one frame (`received_at` is not carried).
pub fn frame_to_pb(frame: &Frame) -> pb::Frame {
    let body = match &frame.body {
        Body::Location(l) => pb::frame::Body::Location(
            location_with!(l => pb::Location { lat: Some(l.lat), lon: Some(l.lon) }),
        ),
        Body::Diagnostic(d) => pb::frame::Body::Diagnostic(pb::Diagnostic {
            mil_on: d.mil_on,
            dtcs: d
                .dtcs
                .iter()
                .flatten()
                .map(|dtc| pb::Dtc {
                    code: Some(match dtc {
                        Dtc::Obd(code) => pb::dtc::Code::Obd(code.clone()),
                        Dtc::J1939 { spn, fmi, oc, sa } => pb::dtc::Code::J1939(pb::J1939 {
                            spn: *spn,
                            fmi: u32::from(*fmi),
                            oc: u32::from(*oc),
                            sa: u32::from(*sa),
                        }),
                    }),
                })
                .collect(),
            dtcs_present: d.dtcs.is_some(),
            signals_json: d.signals.clone(),
            ..measures_to_pb(d)
        }),
    };
    pb::Frame {
        vehicle_id: frame.vehicle_id.clone(),
        ts_us: frame.ts,
        seq: (frame.seq != 0).then_some(frame.seq),
        kind: match frame.kind() {
            Kind::Location => pb::Kind::Location,
            Kind::Diagnostic => pb::Kind::Diagnostic,
        } as i32,
        body: Some(body),
    }
}

/// Encodes `frames` as one `FrameBatch`.
pub fn encode_protobuf(frames: &[Frame]) -> Vec<u8> {
    pb::FrameBatch { frames: frames.iter().map(frame_to_pb).collect() }.encode_to_vec()
}

/// Decodes a `FrameBatch` without validating its frames.
pub fn decode_batch(payload: &[u8]) -> Result<pb::FrameBatch, prost::DecodeError> {
    pb::FrameBatch::decode(payload)
}

/// [`decode_batch`] of at most the first `max` frames, and whether there were more: the rest
/// is only skipped over (its framing checked), never decoded, so a message of a million tiny
/// frames costs `max` frames of memory.
pub(crate) fn decode_batch_capped(
    payload: &[u8],
    max: usize,
) -> Result<(pb::FrameBatch, bool), prost::DecodeError> {
    // Every field is at least two bytes (key, length): a payload this short cannot hold more
    // than `max` frames and is decoded without the scan (the usual case).
    if payload.len() / 2 <= max {
        return Ok((pb::FrameBatch::decode(payload)?, false));
    }
    let mut rest = payload;
    let mut fields = 0usize;
    let mut cut = None;
    while !rest.is_empty() {
        if fields == max && cut.is_none() {
            cut = Some(payload.len() - rest.len());
        }
        let (tag, wire_type) = prost::encoding::decode_key(&mut rest)?;
        prost::encoding::skip_field(wire_type, tag, &mut rest, prost::encoding::DecodeContext::default())?;
        fields += 1;
    }
    match cut {
        Some(at) => Ok((pb::FrameBatch::decode(payload.get(..at).unwrap_or(payload))?, true)),
        None => Ok((pb::FrameBatch::decode(payload)?, false)),
    }
}

/// The measures of `pb::Diagnostic`, in the order of [`Diagnostic::MEASURES`] (its tags 1–8; a
/// test checks the names).
type PbMeasure = (&'static str, fn(&pb::Diagnostic) -> Option<f64>, fn(&mut pb::Diagnostic, Option<f64>));

const PB_MEASURES: [PbMeasure; Diagnostic::MEASURES.len()] = {
    macro_rules! pb_measures {
        ($($field:ident),*) => { [$((stringify!($field), |d| d.$field, |d, v| d.$field = v)),*] };
    }
    pb_measures!(
        engine_rpm,
        coolant_temp_c,
        engine_load_pct,
        fuel_level_pct,
        battery_soc_pct,
        battery_v,
        engine_hours,
        odometer_m
    )
};

fn measures_to_pb(d: &Diagnostic) -> pb::Diagnostic {
    let mut out = pb::Diagnostic::default();
    for (m, (_, _, set)) in Diagnostic::MEASURES.iter().zip(PB_MEASURES) {
        set(&mut out, (m.get)(d));
    }
    out
}

/// [`decode`], then the excess of a batch cut at the per-message limit as one rejection.
pub(crate) fn decode_capped(ctx: &Ctx<'_>, out: &mut Decoded, batch: &pb::FrameBatch, more: bool) {
    decode(ctx, out, batch);
    if more {
        ctx.reject_excess(out);
    }
}

/// Converts, checks and records every frame of a decoded batch.
pub(crate) fn decode(ctx: &Ctx<'_>, out: &mut Decoded, batch: &pb::FrameBatch) {
    for (i, f) in batch.frames.iter().enumerate() {
        let result = build(ctx, f);
        if !ctx.push(out, i, || Bytes::from(f.encode_to_vec()), result) {
            break;
        }
    }
}

fn missing(field: &str) -> Fail {
    (Reason::MissingField, format!("{field} is required"))
}

/// The kind a frame declares (`Ok(None)`: unspecified).
fn declared_kind(f: &pb::Frame) -> Result<Option<Kind>, String> {
    match pb::Kind::try_from(f.kind) {
        Ok(pb::Kind::Unspecified) => Ok(None),
        Ok(pb::Kind::Location) => Ok(Some(Kind::Location)),
        Ok(pb::Kind::Diagnostic) => Ok(Some(Kind::Diagnostic)),
        Err(_) => Err(format!("kind {} is not a known Kind value", f.kind)),
    }
}

/// An untrusted frame: the transport's rules, conversion, then every contract check.
fn build(ctx: &Ctx<'_>, f: &pb::Frame) -> Result<Frame, Fail> {
    if f.vehicle_id.is_empty() {
        return Err(missing("vehicle_id"));
    }
    validate::vehicle_id(&f.vehicle_id)?;
    let kind = ctx.resolve_kind(&f.vehicle_id, declared_kind(f))?;
    if f.ts_us == 0 {
        return Err(missing("ts"));
    }
    let frame = convert(f, kind, ctx.received_at, validate::signals)?;
    validate::frame_decoded(&frame, ctx.rules)?;
    Ok(frame)
}

/// A frame fleetpipe itself stored (a log record): converted as it was written, without the
/// checks it passed when it was received. `Err` means the bytes are not what fleetpipe writes.
pub(crate) fn convert_stored(f: &pb::Frame, received_at: Micros) -> Result<Frame, Fail> {
    let kind =
        declared_kind(f).map_err(|detail| (Reason::InvalidKind, detail))?.ok_or_else(|| missing("kind"))?;
    convert(f, kind, received_at, |text| Ok(text.to_owned()))
}

/// The structural conversion shared by both paths: required fields present, the body of the
/// frame's kind. `signals` turns `signals_json` into the frame's text (canonicalising it, for
/// untrusted input).
fn convert(
    f: &pb::Frame,
    kind: Kind,
    received_at: Micros,
    signals: fn(&str) -> Result<String, Fail>,
) -> Result<Frame, Fail> {
    let body = match (kind, &f.body) {
        (Kind::Location, Some(pb::frame::Body::Location(l))) => Body::Location(location(l)?),
        (Kind::Location, None) => return Err(missing("lat")),
        (Kind::Diagnostic, Some(pb::frame::Body::Diagnostic(d))) => {
            Body::Diagnostic(Box::new(diagnostic(d, signals)?))
        }
        (Kind::Diagnostic, None) => Body::Diagnostic(Box::default()),
        (kind, Some(_)) => {
            return Err((Reason::InvalidKind, format!("kind {kind} but the body holds the other kind")))
        }
    };
    Ok(Frame { vehicle_id: f.vehicle_id.clone(), ts: f.ts_us, seq: f.seq.unwrap_or(0), received_at, body })
}

fn location(l: &pb::Location) -> Result<Location, Fail> {
    Ok(location_with!(l => Location {
        lat: l.lat.ok_or_else(|| missing("lat"))?,
        lon: l.lon.ok_or_else(|| missing("lon"))?,
    }))
}

fn diagnostic(d: &pb::Diagnostic, signals: fn(&str) -> Result<String, Fail>) -> Result<Diagnostic, Fail> {
    let dtcs = if d.dtcs_present || !d.dtcs.is_empty() {
        let dtcs = d
            .dtcs
            .iter()
            .map(|dtc| match &dtc.code {
                Some(pb::dtc::Code::Obd(code)) => Ok(Dtc::Obd(code.clone())),
                Some(pb::dtc::Code::J1939(j)) => {
                    validate::j1939(u64::from(j.spn), u64::from(j.fmi), u64::from(j.oc), u64::from(j.sa))
                }
                None => {
                    Err((Reason::InvalidDtc, "dtc carries neither an obd code nor a j1939 code".to_owned()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Some(dtcs)
    } else {
        None
    };
    let signals = match &d.signals_json {
        Some(text) => Some(signals(text)?),
        None => None,
    };
    let mut out = Diagnostic { mil_on: d.mil_on, dtcs, signals, ..Diagnostic::default() };
    for (m, (_, get, _)) in Diagnostic::MEASURES.iter().zip(PB_MEASURES) {
        (m.set)(&mut out, get(d));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pb_measures_follow_the_frame_measures() {
        let names: Vec<_> = PB_MEASURES.iter().map(|m| m.0).collect();
        let expected: Vec<_> = Diagnostic::MEASURES.iter().map(|m| m.name).collect();
        assert_eq!(names, expected);
    }
}
