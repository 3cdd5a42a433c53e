//! The JSON wire format (CONTRACT.md §1): decoding objects, arrays and NDJSON into frames, and
//! encoding a frame back into normalised contract JSON.
//!
//! Decoding deserializes straight into a borrowed wire struct (`Wire`): strings borrow from the
//! payload, `ts` is parsed in its visitor, and nothing is buffered (no `serde(untagged)`, no
//! intermediate `Value`). Values whose *type* is wrong in a way the contract names a reason for
//! (`ts`, `dtcs` items, `signals`) are captured as "invalid" variants instead of serde errors, so
//! that the frame is rejected with that reason rather than a generic `invalid_field`.
//!
//! Splitting keeps one bad frame from rejecting its neighbours: an array is first decoded in one
//! pass into `Vec<Wire>`; only if that fails is it split into raw elements ([`RawValue`]) that
//! are decoded one by one. Objects (one, NDJSON, or several in a row) are read as a stream; if a
//! bad one breaks the stream, NDJSON-shaped input is split on newlines from there on.

use std::borrow::Cow;
use std::fmt;
use std::io;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::ser::{CompactFormatter, Formatter};
use serde_json::value::RawValue;

use super::{time, Ctx};
use crate::frame::{Body, Decoded, Diagnostic, Dtc, Frame, Kind, Location, Micros, Reason};
use crate::validate::{self, snippet, Fail};

// ---------------------------------------------------------------------------------------------
// Wire types

/// A string that borrows from the payload unless it contained escapes.
pub(crate) struct Str<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_str(V).map(Str)
    }
}

/// Consumes the rest of a map.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Consumes the rest of a sequence.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// `ts`: an RFC 3339 string or integer epoch milliseconds, already converted to micros.
pub(crate) enum Ts {
    Micros(Micros),
    /// Present but unusable; the detail says why.
    Invalid(String),
}

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn millis(ms: Option<i64>, shown: &dyn fmt::Display) -> Ts {
                match ms.and_then(|ms| ms.checked_mul(1000)) {
                    Some(us) => Ts::Micros(us),
                    None => Ts::Invalid(format!("ts {shown} ms is out of range")),
                }
            }
            fn wrong(what: &str) -> Ts {
                Ts::Invalid(format!(
                    "ts must be an RFC 3339 string or integer epoch milliseconds, got {what}"
                ))
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = Ts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 string or integer epoch milliseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ts, E> {
                Ok(match time::parse_rfc3339(v) {
                    Some(us) => Ts::Micros(us),
                    None => Ts::Invalid(format!("ts {} is not an RFC 3339 timestamp", snippet(v))),
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ts, E> {
                Ok(V::millis(i64::try_from(v).ok(), &v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ts, E> {
                Ok(V::millis(Some(v), &v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Ts, E> {
                Ok(V::wrong(&format!("the non-integer number {v}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Ts, E> {
                Ok(V::wrong(&format!("the boolean {v}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Ts, E> {
                Ok(V::wrong("null"))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Ts, A::Error> {
                skip_map(map)?;
                Ok(V::wrong("an object"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Ts, A::Error> {
                skip_seq(seq)?;
                Ok(V::wrong("an array"))
            }
        }
        d.deserialize_any(V)
    }
}

/// An unsigned integer inside a J1939 object, or why it is not one.
struct UInt(Result<u64, String>);

impl<'de> Deserialize<'de> for UInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UInt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an unsigned integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<UInt, E> {
                Ok(UInt(Ok(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<UInt, E> {
                Ok(UInt(u64::try_from(v).map_err(|_| format!("{v} is negative"))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<UInt, E> {
                Ok(UInt(Err(format!("{v} is not an integer"))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UInt, E> {
                Ok(UInt(Err(format!("{} is a string", snippet(v)))))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<UInt, E> {
                Ok(UInt(Err(format!("{v} is a boolean"))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<UInt, E> {
                Ok(UInt(Err("is null".to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UInt, A::Error> {
                skip_map(map)?;
                Ok(UInt(Err("is an object".to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<UInt, A::Error> {
                skip_seq(seq)?;
                Ok(UInt(Err("is an array".to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `dtcs` item: an OBD code string or a J1939 object, not yet range-checked.
pub(crate) enum WireDtc<'a> {
    Obd(Cow<'a, str>),
    J1939 { spn: u64, fmi: u64, oc: u64, sa: u64 },
    Invalid(String),
}

impl<'de: 'a, 'a> Deserialize<'de> for WireDtc<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn wrong<'a>(what: &str) -> WireDtc<'a> {
            WireDtc::Invalid(format!(
                "dtc must be a code string or a J1939 object {{spn, fmi, oc, sa}}, got {what}"
            ))
        }
        impl<'de> Visitor<'de> for V {
            type Value = WireDtc<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a DTC string or J1939 object")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(WireDtc::Obd(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(WireDtc::Obd(Cow::Owned(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: [Option<u64>; 4] = [None; 4];
                let mut problem = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    let slot = match &*key.0 {
                        "spn" => 0,
                        "fmi" => 1,
                        "oc" => 2,
                        "sa" => 3,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    match map.next_value::<UInt>()?.0 {
                        Ok(v) => {
                            if let Some(f) = fields.get_mut(slot) {
                                *f = Some(v);
                            }
                        }
                        Err(e) => {
                            problem.get_or_insert_with(|| format!("J1939 {} {e}", key.0));
                        }
                    }
                }
                if let Some(p) = problem {
                    return Ok(WireDtc::Invalid(p));
                }
                Ok(match fields {
                    [Some(spn), Some(fmi), Some(oc), Some(sa)] => WireDtc::J1939 { spn, fmi, oc, sa },
                    _ => WireDtc::Invalid("J1939 dtc needs all of spn, fmi, oc and sa".to_owned()),
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(wrong(&format!("the boolean {v}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(wrong("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq)?;
                Ok(wrong("an array"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A `signals` value: number, bool or string.
struct SignalValue(Result<serde_json::Value, &'static str>);

impl<'de> Deserialize<'de> for SignalValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde_json::Value;
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SignalValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, boolean or string")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::Bool(v))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::from(v))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::from(v))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SignalValue, E> {
                Ok(SignalValue(
                    serde_json::Number::from_f64(v).map(Value::Number).ok_or("is not a finite number"),
                ))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::String(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::String(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<SignalValue, E> {
                Ok(SignalValue(Err("is null")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SignalValue, A::Error> {
                skip_map(map)?;
                Ok(SignalValue(Err("is an object")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<SignalValue, A::Error> {
                skip_seq(seq)?;
                Ok(SignalValue(Err("is an array")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `signals`: canonical JSON text of the object (keys sorted, compact), or why it is invalid.
pub(crate) struct Signals(pub(crate) Result<String, String>);

impl<'de> Deserialize<'de> for Signals {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn wrong(what: &str) -> Signals {
            Signals(Err(format!("signals must be an object of path -> number | bool | string, got {what}")))
        }
        impl<'de> Visitor<'de> for V {
            type Value = Signals;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a signals object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Signals, A::Error> {
                let mut out = serde_json::Map::new();
                let mut problem = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match map.next_value::<SignalValue>()?.0 {
                        Ok(v) if problem.is_none() => {
                            out.insert(key.0.into_owned(), v);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            problem.get_or_insert_with(|| {
                                format!(
                                    "signals {} {e}; values must be number, bool or string",
                                    snippet(&key.0)
                                )
                            });
                        }
                    }
                }
                if let Some(p) = problem {
                    return Ok(Signals(Err(p)));
                }
                Ok(Signals(serde_json::to_string(&out).map_err(|e| format!("signals: {e}"))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Signals, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Signals, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Signals, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Signals, E> {
                Ok(wrong(&format!("the boolean {v}")))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Signals, E> {
                Ok(wrong("a string"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Signals, E> {
                Ok(wrong("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Signals, A::Error> {
                skip_seq(seq)?;
                Ok(wrong("an array"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Canonical text of a `signals` object given as JSON text (used for Protobuf's `signals_json`
/// and by [`validate::signals`]).
pub(crate) fn canonical_signals(text: &str) -> Result<String, String> {
    match serde_json::from_str::<Signals>(text) {
        Ok(Signals(r)) => r,
        Err(e) => Err(format!("signals is not valid JSON: {e}")),
    }
}

/// An optional JSON number; NaN stands for absent or `null` (JSON has no NaN). Half the size of
/// `Option<f64>`, which keeps [`Wire`] small and cheap to move.
#[derive(Clone, Copy)]
pub(crate) struct Num(f64);

impl Default for Num {
    fn default() -> Self {
        Num(f64::NAN)
    }
}

impl Num {
    fn get(self) -> Option<f64> {
        (!self.0.is_nan()).then_some(self.0)
    }
}

impl<'de> Deserialize<'de> for Num {
    #[inline]
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<f64>::deserialize(d).map(|v| Num(v.unwrap_or(f64::NAN)))
    }
}

/// One frame as it appears on the wire. Every field is optional here so that a missing one is
/// reported with its own reason (`missing_field`), and `null` reads as absent.
#[derive(serde::Deserialize)]
pub(crate) struct Wire<'a> {
    #[serde(borrow, default)]
    vehicle_id: Option<Str<'a>>,
    #[serde(default)]
    ts: Option<Ts>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    kind: Option<Str<'a>>,
    // Location
    #[serde(default)]
    lat: Num,
    #[serde(default)]
    lon: Num,
    #[serde(default)]
    speed_kmh: Num,
    #[serde(default)]
    heading_deg: Num,
    #[serde(default)]
    alt_m: Num,
    #[serde(default)]
    accuracy_m: Num,
    #[serde(default)]
    satellites: Option<u32>,
    #[serde(default)]
    odometer_m: Num,
    #[serde(default)]
    ignition: Option<bool>,
    // Diagnostic
    #[serde(default)]
    engine_rpm: Num,
    #[serde(default)]
    coolant_temp_c: Num,
    #[serde(default)]
    engine_load_pct: Num,
    #[serde(default)]
    fuel_level_pct: Num,
    #[serde(default)]
    battery_soc_pct: Num,
    #[serde(default)]
    battery_v: Num,
    #[serde(default)]
    engine_hours: Num,
    #[serde(default)]
    mil_on: Option<bool>,
    #[serde(borrow, default)]
    dtcs: Option<Vec<WireDtc<'a>>>,
    #[serde(default)]
    signals: Option<Signals>,
}

fn missing(field: &str) -> Fail {
    (Reason::MissingField, format!("{field} is required"))
}

/// Turns a decoded wire frame into a validated [`Frame`].
fn build(ctx: &Ctx<'_>, w: &mut Wire<'_>) -> Result<Frame, Fail> {
    let vehicle_id = w.vehicle_id.take().ok_or_else(|| missing("vehicle_id"))?.0;
    validate::vehicle_id(&vehicle_id)?;
    let kind = match &w.kind {
        None => Ok(None),
        Some(s) => Kind::parse(&s.0)
            .map(Some)
            .ok_or_else(|| format!("kind {} is not \"location\" or \"diagnostic\"", snippet(&s.0))),
    };
    let kind = ctx.resolve_kind(&vehicle_id, kind)?;
    let ts = match w.ts.take() {
        None => return Err(missing("ts")),
        Some(Ts::Micros(ts)) => ts,
        Some(Ts::Invalid(detail)) => return Err((Reason::InvalidTs, detail)),
    };
    let body = match kind {
        Kind::Location => Body::Location(Location {
            lat: w.lat.get().ok_or_else(|| missing("lat"))?,
            lon: w.lon.get().ok_or_else(|| missing("lon"))?,
            speed_kmh: w.speed_kmh.get(),
            heading_deg: w.heading_deg.get(),
            alt_m: w.alt_m.get(),
            accuracy_m: w.accuracy_m.get(),
            satellites: w.satellites,
            odometer_m: w.odometer_m.get(),
            ignition: w.ignition,
        }),
        Kind::Diagnostic => {
            let dtcs = match w.dtcs.take() {
                None => None,
                Some(items) => Some(items.into_iter().map(dtc).collect::<Result<Vec<_>, _>>()?),
            };
            let signals = match w.signals.take() {
                None => None,
                Some(Signals(Ok(text))) => Some(text),
                Some(Signals(Err(detail))) => return Err((Reason::InvalidSignals, detail)),
            };
            Body::Diagnostic(Box::new(Diagnostic {
                engine_rpm: w.engine_rpm.get(),
                coolant_temp_c: w.coolant_temp_c.get(),
                engine_load_pct: w.engine_load_pct.get(),
                fuel_level_pct: w.fuel_level_pct.get(),
                battery_soc_pct: w.battery_soc_pct.get(),
                battery_v: w.battery_v.get(),
                engine_hours: w.engine_hours.get(),
                odometer_m: w.odometer_m.get(),
                mil_on: w.mil_on,
                dtcs,
                signals,
            }))
        }
    };
    let frame = Frame {
        vehicle_id: vehicle_id.into_owned(),
        ts,
        seq: w.seq.unwrap_or(0),
        received_at: ctx.received_at,
        body,
    };
    validate::frame_decoded(&frame, ctx.rules)?;
    Ok(frame)
}

fn dtc(w: WireDtc<'_>) -> Result<Dtc, Fail> {
    match w {
        WireDtc::Obd(code) => Ok(Dtc::Obd(code.into_owned())),
        WireDtc::J1939 { spn, fmi, oc, sa } => validate::j1939(spn, fmi, oc, sa),
        WireDtc::Invalid(detail) => Err((Reason::InvalidDtc, detail)),
    }
}

// ---------------------------------------------------------------------------------------------
// Splitting and decoding

/// A serde_json error as a rejection: syntax errors are malformed JSON, type errors a bad field.
fn json_error(e: &serde_json::Error) -> Fail {
    match e.classify() {
        serde_json::error::Category::Data => (Reason::InvalidField, e.to_string()),
        _ => (Reason::MalformedJson, e.to_string()),
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// `s` without leading and trailing JSON whitespace.
fn trim_ws(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_ws(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_ws(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// The first byte that is not JSON whitespace.
pub(crate) fn first_non_ws(s: &[u8]) -> Option<u8> {
    s.iter().copied().find(|&b| !is_ws(b))
}

/// The part of `parent` that `sub` (a sub-slice of it) covers, without copying; a copy if `sub`
/// is not inside `parent`.
fn sub_bytes(parent: &Bytes, sub: &[u8]) -> Bytes {
    let base = parent.as_ptr() as usize;
    let start = sub.as_ptr() as usize;
    match start.checked_sub(base) {
        Some(off) if off.checked_add(sub.len()).is_some_and(|end| end <= parent.len()) => {
            parent.slice(off..off + sub.len())
        }
        _ => Bytes::copy_from_slice(sub),
    }
}

/// Decodes a JSON payload (object, array or NDJSON) into `out`.
pub(crate) fn decode(ctx: &Ctx<'_>, out: &mut Decoded, ndjson: bool) {
    if !ndjson && first_non_ws(ctx.payload) == Some(b'[') {
        array(ctx, out);
    } else {
        values(ctx, out, ndjson);
    }
}

/// One object, NDJSON, or several objects one after another, parsed as a stream of [`Wire`]s
/// (whitespace, newlines included, separates values). A value the stream cannot parse ends it:
/// when the rest is NDJSON-shaped it is split into lines so that only the bad line is rejected;
/// otherwise the rest becomes one rejection — or, when nothing was parsed and the JSON is not
/// even well-formed, the whole payload is refused without an index.
fn values(ctx: &Ctx<'_>, out: &mut Decoded, ndjson: bool) {
    let p: &[u8] = ctx.payload;
    let mut stream = serde_json::Deserializer::from_slice(p).into_iter::<Wire>();
    let mut index = 0;
    loop {
        let start = stream.byte_offset();
        match stream.next() {
            None => {
                if index == 0 && !ndjson {
                    ctx.reject_whole(out, Reason::MalformedJson, "empty JSON payload".to_owned());
                }
                return;
            }
            Some(Ok(mut w)) => {
                let end = stream.byte_offset();
                let result = build(ctx, &mut w);
                let raw = || sub_bytes(ctx.payload, trim_ws(p.get(start..end).unwrap_or_default()));
                ctx.push(out, index, raw, result);
            }
            Some(Err(e)) => {
                let rest = p.get(start..).unwrap_or_default();
                if ndjson || is_line_shaped(rest) {
                    lines(ctx, out, rest, index);
                } else if index == 0 && e.classify() != serde_json::error::Category::Data {
                    ctx.reject_whole(out, Reason::MalformedJson, e.to_string());
                } else {
                    ctx.push(out, index, || sub_bytes(ctx.payload, trim_ws(rest)), Err(json_error(&e)));
                }
                return;
            }
        }
        index += 1;
    }
}

/// Whether `p` looks like NDJSON: at least two non-blank lines, each starting with `{`. (A
/// pretty-printed object fails this: its inner lines do not.)
fn is_line_shaped(p: &[u8]) -> bool {
    let mut lines = 0usize;
    for line in p.split(|&b| b == b'\n') {
        match first_non_ws(line) {
            None => {}
            Some(b'{') => lines += 1,
            Some(_) => return false,
        }
    }
    lines >= 2
}

/// NDJSON: one frame per non-blank line of `region` (a part of the payload), numbered from
/// `first_index`.
fn lines(ctx: &Ctx<'_>, out: &mut Decoded, region: &[u8], first_index: usize) {
    let mut index = first_index;
    for line in region.split(|&b| b == b'\n') {
        let line = trim_ws(line);
        if line.is_empty() {
            continue;
        }
        let result = match serde_json::from_slice::<Wire>(line) {
            Ok(mut w) => build(ctx, &mut w),
            Err(e) => Err(json_error(&e)),
        };
        ctx.push(out, index, || sub_bytes(ctx.payload, line), result);
        index += 1;
    }
}

/// A JSON array of frames.
fn array(ctx: &Ctx<'_>, out: &mut Decoded) {
    let p: &[u8] = ctx.payload;
    // Fast path: the whole array in one pass.
    if let Ok(wires) = serde_json::from_slice::<Vec<Wire>>(p) {
        // Element bytes are needed only for rejections; split lazily, at most once.
        let mut raws: Option<Vec<&RawValue>> = None;
        out.frames.reserve(wires.len());
        for (i, mut w) in wires.into_iter().enumerate() {
            let result = build(ctx, &mut w);
            ctx.push(
                out,
                i,
                || {
                    let raws = raws.get_or_insert_with(|| serde_json::from_slice(p).unwrap_or_default());
                    match raws.get(i) {
                        Some(r) => sub_bytes(ctx.payload, r.get().as_bytes()),
                        None => ctx.payload.clone(),
                    }
                },
                result,
            );
        }
        return;
    }
    // Slow path: split into elements so that a bad one rejects only itself.
    match serde_json::from_slice::<Vec<&RawValue>>(p) {
        Ok(raws) => {
            for (i, raw) in raws.iter().enumerate() {
                let result = match serde_json::from_str::<Wire>(raw.get()) {
                    Ok(mut w) => build(ctx, &mut w),
                    Err(e) => Err(json_error(&e)),
                };
                ctx.push(out, i, || sub_bytes(ctx.payload, raw.get().as_bytes()), result);
            }
        }
        Err(e) => ctx.reject_whole(out, Reason::MalformedJson, e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Writes `"name":` after a comma when needed.
struct Obj<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl Obj<'_> {
    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, name: &str, v: &str) {
        self.key(name);
        write_str(self.out, v);
    }

    fn ts(&mut self, name: &str, v: Micros) {
        self.key(name);
        self.out.push(b'"');
        time::write_ts(self.out, v);
        self.out.push(b'"');
    }

    fn u64(&mut self, name: &str, v: u64) -> io::Result<()> {
        self.key(name);
        CompactFormatter.write_u64(self.out, v)
    }

    fn f64(&mut self, name: &str, v: f64) -> io::Result<()> {
        self.key(name);
        write_f64(self.out, v)
    }

    fn opt_f64(&mut self, name: &str, v: Option<f64>) -> io::Result<()> {
        match v {
            Some(v) => self.f64(name, v),
            None => Ok(()),
        }
    }

    fn opt_bool(&mut self, name: &str, v: Option<bool>) {
        if let Some(v) = v {
            self.key(name);
            self.out.extend_from_slice(if v { b"true" } else { b"false" });
        }
    }
}

/// A float as the shortest text that reads back to the same value; `null` if not finite.
fn write_f64(out: &mut Vec<u8>, v: f64) -> io::Result<()> {
    if v.is_finite() {
        CompactFormatter.write_f64(out, v)
    } else {
        out.extend_from_slice(b"null");
        Ok(())
    }
}

/// A JSON string literal.
fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

fn write_frame(frame: &Frame, out: &mut Vec<u8>) -> io::Result<()> {
    out.push(b'{');
    let mut o = Obj { out, first: true };
    o.str("vehicle_id", &frame.vehicle_id);
    o.ts("ts", frame.ts);
    o.u64("seq", frame.seq)?;
    o.key("kind");
    write_str(o.out, frame.kind().as_str());
    match &frame.body {
        Body::Location(l) => {
            o.f64("lat", l.lat)?;
            o.f64("lon", l.lon)?;
            o.opt_f64("speed_kmh", l.speed_kmh)?;
            o.opt_f64("heading_deg", l.heading_deg)?;
            o.opt_f64("alt_m", l.alt_m)?;
            o.opt_f64("accuracy_m", l.accuracy_m)?;
            if let Some(s) = l.satellites {
                o.u64("satellites", u64::from(s))?;
            }
            o.opt_f64("odometer_m", l.odometer_m)?;
            o.opt_bool("ignition", l.ignition);
        }
        Body::Diagnostic(d) => {
            o.opt_f64("engine_rpm", d.engine_rpm)?;
            o.opt_f64("coolant_temp_c", d.coolant_temp_c)?;
            o.opt_f64("engine_load_pct", d.engine_load_pct)?;
            o.opt_f64("fuel_level_pct", d.fuel_level_pct)?;
            o.opt_f64("battery_soc_pct", d.battery_soc_pct)?;
            o.opt_f64("battery_v", d.battery_v)?;
            o.opt_f64("engine_hours", d.engine_hours)?;
            o.opt_f64("odometer_m", d.odometer_m)?;
            o.opt_bool("mil_on", d.mil_on);
            if let Some(dtcs) = &d.dtcs {
                o.key("dtcs");
                o.out.push(b'[');
                for (i, dtc) in dtcs.iter().enumerate() {
                    if i > 0 {
                        o.out.push(b',');
                    }
                    match dtc {
                        Dtc::Obd(code) => write_str(o.out, code),
                        Dtc::J1939 { spn, fmi, oc, sa } => {
                            o.out.push(b'{');
                            let mut j = Obj { out: o.out, first: true };
                            j.u64("spn", u64::from(*spn))?;
                            j.u64("fmi", u64::from(*fmi))?;
                            j.u64("oc", u64::from(*oc))?;
                            j.u64("sa", u64::from(*sa))?;
                            o.out.push(b'}');
                        }
                    }
                }
                o.out.push(b']');
            }
            if let Some(s) = &d.signals {
                // Decoded frames hold canonical text; guard against hand-built frames so the
                // output stays valid JSON.
                if serde_json::from_str::<&RawValue>(s).is_ok() {
                    o.key("signals");
                    o.out.extend_from_slice(s.as_bytes());
                }
            }
        }
    }
    o.ts("received_at", frame.received_at);
    out.push(b'}');
    Ok(())
}

/// Appends the normalised contract JSON of `frame` to `out`: `vehicle_id`, `ts` (RFC 3339 UTC),
/// `seq`, `kind`, every present field under its contract name, `dtcs`, `signals`, `received_at`.
/// Absent fields are omitted; floats read back bit-for-bit.
pub fn encode_json(frame: &Frame, out: &mut Vec<u8>) {
    // Writing into a Vec<u8> cannot fail.
    let _ = write_frame(frame, out);
}

/// The same content as [`encode_json`], as a [`serde_json::Value`].
pub fn frame_to_value(frame: &Frame) -> serde_json::Value {
    use serde_json::{Map, Value};
    fn put_f64(m: &mut Map<String, Value>, k: &str, v: Option<f64>) {
        if let Some(v) = v {
            m.insert(k.to_owned(), Value::from(v));
        }
    }
    fn put_bool(m: &mut Map<String, Value>, k: &str, v: Option<bool>) {
        if let Some(v) = v {
            m.insert(k.to_owned(), Value::Bool(v));
        }
    }
    let mut m = Map::new();
    m.insert("vehicle_id".to_owned(), Value::from(frame.vehicle_id.as_str()));
    m.insert("ts".to_owned(), Value::from(time::format_ts(frame.ts)));
    m.insert("seq".to_owned(), Value::from(frame.seq));
    m.insert("kind".to_owned(), Value::from(frame.kind().as_str()));
    match &frame.body {
        Body::Location(l) => {
            put_f64(&mut m, "lat", Some(l.lat));
            put_f64(&mut m, "lon", Some(l.lon));
            put_f64(&mut m, "speed_kmh", l.speed_kmh);
            put_f64(&mut m, "heading_deg", l.heading_deg);
            put_f64(&mut m, "alt_m", l.alt_m);
            put_f64(&mut m, "accuracy_m", l.accuracy_m);
            if let Some(s) = l.satellites {
                m.insert("satellites".to_owned(), Value::from(s));
            }
            put_f64(&mut m, "odometer_m", l.odometer_m);
            put_bool(&mut m, "ignition", l.ignition);
        }
        Body::Diagnostic(d) => {
            put_f64(&mut m, "engine_rpm", d.engine_rpm);
            put_f64(&mut m, "coolant_temp_c", d.coolant_temp_c);
            put_f64(&mut m, "engine_load_pct", d.engine_load_pct);
            put_f64(&mut m, "fuel_level_pct", d.fuel_level_pct);
            put_f64(&mut m, "battery_soc_pct", d.battery_soc_pct);
            put_f64(&mut m, "battery_v", d.battery_v);
            put_f64(&mut m, "engine_hours", d.engine_hours);
            put_f64(&mut m, "odometer_m", d.odometer_m);
            put_bool(&mut m, "mil_on", d.mil_on);
            if let Some(dtcs) = &d.dtcs {
                let items = dtcs
                    .iter()
                    .map(|dtc| match dtc {
                        Dtc::Obd(code) => Value::from(code.as_str()),
                        Dtc::J1939 { spn, fmi, oc, sa } => serde_json::json!({
                            "spn": spn, "fmi": fmi, "oc": oc, "sa": sa
                        }),
                    })
                    .collect();
                m.insert("dtcs".to_owned(), Value::Array(items));
            }
            if let Some(s) = &d.signals {
                if let Ok(v) = serde_json::from_str::<Value>(s) {
                    m.insert("signals".to_owned(), v);
                }
            }
        }
    }
    m.insert("received_at".to_owned(), Value::from(time::format_ts(frame.received_at)));
    Value::Object(m)
}
