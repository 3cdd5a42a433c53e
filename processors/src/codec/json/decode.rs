//! Decoding: a JSON payload (object, array, NDJSON) into validated frames and rejections.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::wire::{Ts, Wire, WireDtc};
use crate::codec::Ctx;
use crate::frame::{snippet, Body, Decoded, Diagnostic, Dtc, Frame, Kind, Location, Micros, Reason};
use crate::signals::Signals;
use crate::validate::{self, Fail};

fn missing(field: &str) -> Fail {
    (Reason::MissingField, format!("{field} is required"))
}

fn kind_of(w: &Wire<'_>) -> Result<Option<Kind>, String> {
    match &w.kind {
        None => Ok(None),
        Some(s) => Kind::parse(&s.0)
            .map(Some)
            .ok_or_else(|| format!("kind {} is not \"location\" or \"diagnostic\"", snippet(&s.0))),
    }
}

fn ts_of(ts: Option<Ts>, field: &str) -> Result<Micros, Fail> {
    match ts {
        None => Err(missing(field)),
        Some(Ts::Micros(ts)) => Ok(ts),
        Some(Ts::Invalid(detail)) => Err((Reason::InvalidTs, detail)),
    }
}

/// Turns a decoded wire frame into a validated [`Frame`].
fn build(ctx: &Ctx<'_>, w: &mut Wire<'_>) -> Result<Frame, Fail> {
    let vehicle_id = w.vehicle_id.take().ok_or_else(|| missing("vehicle_id"))?.0;
    validate::vehicle_id(&vehicle_id)?;
    let kind = ctx.resolve_kind(&vehicle_id, kind_of(w))?;
    let ts = ts_of(w.ts.take(), "ts")?;
    let frame = Frame {
        vehicle_id: vehicle_id.into_owned(),
        ts,
        seq: w.seq.unwrap_or(0),
        received_at: ctx.received_at,
        body: body(kind, w)?,
    };
    validate::frame_decoded(&frame, ctx.rules)?;
    Ok(frame)
}

/// A frame fleetpipe itself wrote as contract JSON (with its `received_at`), converted as it was
/// written: none of the checks it passed when it was received are made again.
pub(crate) fn stored(text: &[u8]) -> Result<Frame, Fail> {
    let mut w = serde_json::from_slice::<Wire<'_>>(text).map_err(|e| json_error(&e))?;
    let vehicle_id = w.vehicle_id.take().ok_or_else(|| missing("vehicle_id"))?.0.into_owned();
    let kind = kind_of(&w).map_err(|d| (Reason::InvalidKind, d))?.ok_or_else(|| missing("kind"))?;
    let ts = ts_of(w.ts.take(), "ts")?;
    let received_at = ts_of(w.received_at.take(), "received_at")?;
    Ok(Frame { vehicle_id, ts, seq: w.seq.unwrap_or(0), received_at, body: body(kind, &mut w)? })
}

/// The body of `kind` from the wire fields.
fn body(kind: Kind, w: &mut Wire<'_>) -> Result<Body, Fail> {
    Ok(match kind {
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
    })
}

fn dtc(w: WireDtc<'_>) -> Result<Dtc, Fail> {
    match w {
        WireDtc::Obd(code) => Ok(Dtc::Obd(code.into_owned())),
        WireDtc::J1939 { spn, fmi, oc, sa } => validate::j1939(spn, fmi, oc, sa),
        WireDtc::Invalid(detail) => Err((Reason::InvalidDtc, detail)),
    }
}

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
    // Valid UTF-8 (nearly every payload) is checked once here, so that serde_json reads it as
    // a `str` and does not check each string again; anything else is read as bytes, with the
    // errors it has always had.
    match std::str::from_utf8(p) {
        Ok(text) => stream(ctx, out, ndjson, serde_json::Deserializer::from_str(text).into_iter::<Wire>()),
        Err(_) => stream(ctx, out, ndjson, serde_json::Deserializer::from_slice(p).into_iter::<Wire>()),
    }
}

/// [`values`] over a stream of [`Wire`]s read from `ctx.payload`.
fn stream<'a, R: serde_json::de::Read<'a>>(
    ctx: &Ctx<'a>,
    out: &mut Decoded,
    ndjson: bool,
    mut stream: serde_json::StreamDeserializer<'a, R, Wire<'a>>,
) {
    let p: &[u8] = ctx.payload;
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
                if !ctx.push(out, index, raw, result) {
                    return;
                }
            }
            Some(Err(e)) => {
                let rest = p.get(start..).unwrap_or_default();
                if ndjson || is_line_shaped(rest) {
                    lines(ctx, out, rest, index);
                } else if index == 0 && e.classify() != serde_json::error::Category::Data {
                    ctx.reject_whole(out, Reason::MalformedJson, e.to_string());
                } else {
                    let _ =
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
        if !ctx.push(out, index, || sub_bytes(ctx.payload, line), result) {
            return;
        }
        index += 1;
    }
}

/// The first `max` elements of a JSON array, and whether there were more. The rest is parsed
/// only to find the array's end (well-formedness), never kept: a body of a million tiny
/// elements costs `max` elements of memory, not a million.
fn capped_array<'de, T: serde::Deserialize<'de>>(
    p: &'de [u8],
    max: usize,
) -> Result<(Vec<T>, bool), serde_json::Error> {
    // As in `values`: valid UTF-8 is checked once and read as a `str`.
    match std::str::from_utf8(p) {
        Ok(text) => capped_array_from(serde_json::Deserializer::from_str(text), max),
        Err(_) => capped_array_from(serde_json::Deserializer::from_slice(p), max),
    }
}

fn capped_array_from<'de, T: serde::Deserialize<'de>, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
    max: usize,
) -> Result<(Vec<T>, bool), serde_json::Error> {
    struct Capped<T>(usize, std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Capped<T> {
        type Value = (Vec<T>, bool);
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array of frames")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut kept = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.0).min(4096));
            while kept.len() < self.0 {
                match seq.next_element::<T>()? {
                    Some(v) => kept.push(v),
                    None => return Ok((kept, false)),
                }
            }
            let mut more = false;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                more = true;
            }
            Ok((kept, more))
        }
    }
    let out = serde::Deserializer::deserialize_seq(&mut de, Capped::<T>(max, std::marker::PhantomData))?;
    de.end()?;
    Ok(out)
}

/// A JSON array of frames: at most `max_frames_per_message` of them are decoded; the excess is
/// one `too_many_frames` rejection.
fn array(ctx: &Ctx<'_>, out: &mut Decoded) {
    let p: &[u8] = ctx.payload;
    let max = ctx.rules.max_frames_per_message;
    // Fast path: the whole array in one pass.
    if let Ok((wires, more)) = capped_array::<Wire>(p, max) {
        // Element bytes are needed only for rejections; split lazily, at most once.
        let mut raws: Option<Vec<&RawValue>> = None;
        out.frames.reserve(wires.len());
        for (i, mut w) in wires.into_iter().enumerate() {
            let result = build(ctx, &mut w);
            let _ = ctx.push(
                out,
                i,
                || {
                    let raws =
                        raws.get_or_insert_with(|| capped_array(p, max).map(|r| r.0).unwrap_or_default());
                    match raws.get(i) {
                        Some(r) => sub_bytes(ctx.payload, r.get().as_bytes()),
                        None => ctx.payload.clone(),
                    }
                },
                result,
            );
        }
        if more {
            ctx.reject_excess(out);
        }
        return;
    }
    // Slow path: split into elements so that a bad one rejects only itself.
    match capped_array::<&RawValue>(p, max) {
        Ok((raws, more)) => {
            for (i, raw) in raws.iter().enumerate() {
                let result = match serde_json::from_str::<Wire>(raw.get()) {
                    Ok(mut w) => build(ctx, &mut w),
                    Err(e) => Err(json_error(&e)),
                };
                let _ = ctx.push(out, i, || sub_bytes(ctx.payload, raw.get().as_bytes()), result);
            }
            if more {
                ctx.reject_excess(out);
            }
        }
        Err(e) => ctx.reject_whole(out, Reason::MalformedJson, e.to_string()),
    }
}
