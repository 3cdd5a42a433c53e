//! Per-frame validation: the contract's rules on identifiers, time, ranges, DTCs and signals
//! (CONTRACT.md §1).
//!
//! Every check returns `Err((reason, detail))` on the first violation, where `detail` is a short
//! human-readable sentence naming the field and the offending value (`lat 91.5 outside -90..90`).
//! The codecs call these after decoding; [`frame`] runs every check on a [`Frame`] built anywhere.

use crate::frame::{snippet, Body, Diagnostic, Dtc, Frame, Location, Micros, Range, Reason};
use crate::time::{format_ts, parse_rfc3339, MAX_TS, MIN_TS};

/// Limits that are configurable (the rest of the contract is fixed): the `[validate]` section,
/// read as the config file gives it (`max_future_secs`, `min_ts` as RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// How far `ts` may be ahead of the receiving clock (default 24 h); further is `future_ts`.
    #[serde(rename = "max_future_secs", deserialize_with = "secs_as_micros")]
    pub max_future_us: Micros,
    /// Optional lower bound on `ts` (default none: backfills of any age are accepted).
    #[serde(deserialize_with = "optional_rfc3339")]
    pub min_ts: Option<Micros>,
    /// Largest accepted message payload (default 16 MiB); larger is `oversized`.
    pub max_payload_bytes: usize,
    /// Most frames one message or request may carry (default 10,000); the excess is refused as
    /// one `too_many_frames` rejection.
    pub max_frames_per_message: usize,
    /// How far `ts` may be ahead of the receiving clock and still become latest state (default
    /// 300 s). A frame further ahead (but inside `max_future_secs`) is stored in history only
    /// and counted in `fleetpipe_frames_clock_ahead_total`.
    #[serde(rename = "max_ahead_s", deserialize_with = "secs_as_micros")]
    pub max_ahead_us: Micros,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            max_future_us: 24 * 3600 * 1_000_000,
            min_ts: None,
            max_payload_bytes: 16 * 1024 * 1024,
            max_frames_per_message: 10_000,
            max_ahead_us: 300 * 1_000_000,
        }
    }
}

/// Whether `frame` is so far ahead of the clock that received it that it must not become
/// latest state (CONTRACT.md §1): `ts > received_at + max_ahead`.
pub fn is_clock_ahead(frame: &Frame, max_ahead_us: Micros) -> bool {
    frame.ts > frame.received_at.saturating_add(max_ahead_us)
}

fn secs_as_micros<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Micros, D::Error> {
    let secs = <u64 as serde::Deserialize>::deserialize(d)?;
    Ok((secs as i64).saturating_mul(1_000_000))
}

fn optional_rfc3339<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Micros>, D::Error> {
    match <Option<String> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(s) => parse_rfc3339(&s)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not an RFC 3339 timestamp"))),
    }
}

/// A failed check: the reason (metric label) and a human-readable detail.
pub type Fail = (Reason, String);

/// The outcome of a check.
pub type Check = Result<(), Fail>;

/// Longest vehicle id the contract allows.
pub const MAX_VEHICLE_ID_LEN: usize = 64;

/// Runs every check on `frame`, with `frame.received_at` as the receiving clock.
pub fn frame(frame: &Frame, rules: &Rules) -> Check {
    vehicle_id(&frame.vehicle_id)?;
    frame_decoded(frame, rules)?;
    if let Body::Diagnostic(d) = &frame.body {
        if let Some(s) = &d.signals {
            signals(s)?;
        }
    }
    Ok(())
}

/// [`frame`] for frames the codecs built: they check `vehicle_id` first (before the topic rules)
/// and have already reduced `signals` to canonical text through [`signals`].
pub(crate) fn frame_decoded(frame: &Frame, rules: &Rules) -> Check {
    ts(frame.ts, frame.received_at, rules)?;
    seq(frame.seq)?;
    match &frame.body {
        Body::Location(l) => location(l),
        Body::Diagnostic(d) => diagnostic(d),
    }
}

/// Which bytes a vehicle id may hold: `[A-Za-z0-9._:-]`.
const ID_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        i += 1;
    }
    table
};

/// 1–64 characters of `[A-Za-z0-9._:-]`.
pub fn vehicle_id(id: &str) -> Check {
    let ok = !id.is_empty() && id.len() <= MAX_VEHICLE_ID_LEN && id.bytes().all(|b| ID_BYTE[usize::from(b)]);
    if ok {
        Ok(())
    } else {
        Err((
            Reason::InvalidVehicleId,
            format!("vehicle_id {} is not 1-64 characters of [A-Za-z0-9._:-]", snippet(id)),
        ))
    }
}

/// Event time: representable, not too far ahead of `received_at`, not before `rules.min_ts`.
pub fn ts(ts: Micros, received_at: Micros, rules: &Rules) -> Check {
    if !(MIN_TS..=MAX_TS).contains(&ts) {
        return Err((Reason::InvalidTs, format!("ts {ts} µs is outside years 0001..9999")));
    }
    let limit = received_at.saturating_add(rules.max_future_us);
    if ts > limit {
        return Err((
            Reason::FutureTs,
            format!(
                "ts {} is more than {} s ahead of the receiving clock {}",
                format_ts(ts),
                rules.max_future_us / 1_000_000,
                format_ts(received_at)
            ),
        ));
    }
    match rules.min_ts {
        Some(min) if ts < min => Err((
            Reason::PastTs,
            format!("ts {} is before the lower bound {}", format_ts(ts), format_ts(min)),
        )),
        _ => Ok(()),
    }
}

/// `seq` is stored as a signed 64-bit integer.
pub fn seq(seq: u64) -> Check {
    if i64::try_from(seq).is_ok() {
        Ok(())
    } else {
        Err((Reason::OutOfRange, format!("seq {seq} exceeds {}", i64::MAX)))
    }
}

/// Whether `v` lies in `range` (and is finite).
#[inline]
fn holds(range: Range, v: f64) -> bool {
    v.is_finite()
        && match range {
            Range::Finite => true,
            Range::NonNegative => v >= 0.0,
            Range::Closed(lo, hi) => lo <= v && v <= hi,
            Range::HalfOpen(lo, hi) => lo <= v && v < hi,
        }
}

#[cold]
fn out_of_range(name: &str, v: f64, bound: Range) -> Fail {
    let range = match bound {
        _ if !v.is_finite() => "is not a finite number".to_owned(),
        Range::Finite => "is not a finite number".to_owned(),
        Range::NonNegative => "is negative".to_owned(),
        Range::Closed(lo, hi) => format!("outside {lo}..{hi}"),
        Range::HalfOpen(lo, hi) => format!("outside [{lo}, {hi})"),
    };
    (Reason::OutOfRange, format!("{name} {v} {range}"))
}

#[inline]
fn measure(name: &str, v: f64, bound: Range) -> Check {
    if holds(bound, v) {
        Ok(())
    } else {
        Err(out_of_range(name, v, bound))
    }
}

#[inline]
fn optional(name: &str, v: Option<f64>, bound: Range) -> Check {
    match v {
        Some(v) => measure(name, v, bound),
        None => Ok(()),
    }
}

/// Location ranges; `lat == 0 && lon == 0` is a missing fix.
pub fn location(l: &Location) -> Check {
    measure("lat", l.lat, Range::Closed(-90.0, 90.0))?;
    measure("lon", l.lon, Range::Closed(-180.0, 180.0))?;
    if l.lat == 0.0 && l.lon == 0.0 {
        return Err((Reason::NoFix, "lat 0, lon 0: the device has no position fix".to_owned()));
    }
    optional("speed_kmh", l.speed_kmh, Range::NonNegative)?;
    optional("heading_deg", l.heading_deg, Range::HalfOpen(0.0, 360.0))?;
    optional("alt_m", l.alt_m, Range::Finite)?;
    optional("accuracy_m", l.accuracy_m, Range::NonNegative)?;
    optional("odometer_m", l.odometer_m, Range::Finite)
}

/// Diagnostic ranges and DTCs (not `signals`: see [`signals`]).
pub fn diagnostic(d: &Diagnostic) -> Check {
    if d.is_empty() {
        return Err((
            Reason::EmptyFrame,
            "diagnostic frame carries no diagnostic field (no measure, no dtcs, no signals)".to_owned(),
        ));
    }
    for m in &Diagnostic::MEASURES {
        optional(m.name, (m.get)(d), m.range)?;
    }
    for dtc in d.dtcs.iter().flatten() {
        self::dtc(dtc)?;
    }
    Ok(())
}

/// One trouble code.
pub fn dtc(dtc: &Dtc) -> Check {
    match dtc {
        Dtc::Obd(code) if obd_code(code) => Ok(()),
        Dtc::Obd(code) => Err((
            Reason::InvalidDtc,
            format!("dtc {} does not match ^[PCBU][0-3][0-9A-F]{{3}}(-?[0-9A-F]{{2}})?$", snippet(code)),
        )),
        Dtc::J1939 { spn, fmi, oc, sa } => {
            j1939(u64::from(*spn), u64::from(*fmi), u64::from(*oc), u64::from(*sa)).map(drop)
        }
    }
}

fn upper_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'A'..=b'F').contains(&b)
}

/// `^[PCBU][0-3][0-9A-F]{3}(-?[0-9A-F]{2})?$`
pub fn obd_code(code: &str) -> bool {
    match code.as_bytes() {
        [sys, group, a, b, c, rest @ ..] => {
            let base = matches!(sys, b'P' | b'C' | b'B' | b'U')
                && (b'0'..=b'3').contains(group)
                && [a, b, c].iter().all(|&&x| upper_hex(x));
            let suffix = match rest {
                [] => true,
                [x, y] | [b'-', x, y] => upper_hex(*x) && upper_hex(*y),
                _ => false,
            };
            base && suffix
        }
        _ => false,
    }
}

/// A J1939 code from wire integers: `spn < 2^19`, `fmi <= 31`, `oc <= 126`, `sa <= 255`.
pub fn j1939(spn: u64, fmi: u64, oc: u64, sa: u64) -> Result<Dtc, Fail> {
    let bad = |name: &str, v: u64, range: &str| {
        Err((Reason::InvalidDtc, format!("J1939 {name} {v} outside {range}")))
    };
    let spn32 = match u32::try_from(spn) {
        Ok(v) if v < 1 << 19 => v,
        _ => return bad("spn", spn, "0..524287"),
    };
    let fmi8 = match u8::try_from(fmi) {
        Ok(v) if v <= 31 => v,
        _ => return bad("fmi", fmi, "0..31"),
    };
    let oc8 = match u8::try_from(oc) {
        Ok(v) if v <= 126 => v,
        _ => return bad("oc", oc, "0..126"),
    };
    let Ok(sa8) = u8::try_from(sa) else {
        return bad("sa", sa, "0..255");
    };
    Ok(Dtc::J1939 { spn: spn32, fmi: fmi8, oc: oc8, sa: sa8 })
}

/// Checks a `signals` object given as JSON text (values number | bool | string only) and returns
/// its canonical text (keys sorted, no whitespace).
pub fn signals(json: &str) -> Result<String, Fail> {
    crate::signals::canonical(json).map_err(|d| (Reason::InvalidSignals, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicle_ids_follow_the_contract_alphabet_and_length() {
        assert!(vehicle_id("WVWZZZ1JZXW000001").is_ok());
        assert!(vehicle_id("fleet:truck-7_a.b").is_ok());
        assert!(vehicle_id(&"x".repeat(64)).is_ok());
        for bad in ["", "a b", "a/b", "ä", "a+b", "a\n"] {
            assert_eq!(vehicle_id(bad).map_err(|e| e.0), Err(Reason::InvalidVehicleId));
        }
        assert!(vehicle_id(&"x".repeat(65)).is_err());
    }

    #[test]
    fn obd_codes_follow_the_contract_pattern() {
        for ok in ["P0301", "U3FFF", "B1234-5A", "C0123AB", "P0A1F"] {
            assert!(obd_code(ok), "{ok}");
        }
        for bad in [
            "",
            "P030",
            "P4301",
            "X0301",
            "p0301",
            "P03011",
            "P0301-",
            "P0301-5",
            "P0301--5A",
            "P0301-5a",
            "P0301 ",
            "P0G01",
        ] {
            assert!(!obd_code(bad), "{bad}");
        }
    }

    #[test]
    fn j1939_ranges_are_enforced() {
        assert!(j1939(110, 0, 3, 0).is_ok());
        assert!(j1939((1 << 19) - 1, 31, 126, 255).is_ok());
        for (spn, fmi, oc, sa) in
            [(1 << 19, 0, 0, 0), (u64::MAX, 0, 0, 0), (0, 32, 0, 0), (0, 0, 127, 0), (0, 0, 0, 256)]
        {
            assert_eq!(j1939(spn, fmi, oc, sa).map_err(|e| e.0), Err(Reason::InvalidDtc));
        }
    }

    #[test]
    fn location_ranges_and_missing_fix_are_enforced() {
        let ok = Location { lat: 56.1, lon: 10.2, heading_deg: Some(0.0), ..Location::default() };
        assert!(location(&ok).is_ok());
        let reason = |l: Location| location(&l).err().map(|e| e.0);
        assert_eq!(reason(Location { lat: 91.5, ..ok.clone() }), Some(Reason::OutOfRange));
        assert_eq!(reason(Location { lon: -180.5, ..ok.clone() }), Some(Reason::OutOfRange));
        assert_eq!(reason(Location { lat: f64::NAN, ..ok.clone() }), Some(Reason::OutOfRange));
        assert_eq!(reason(Location { heading_deg: Some(360.0), ..ok.clone() }), Some(Reason::OutOfRange));
        assert_eq!(reason(Location { speed_kmh: Some(-0.1), ..ok.clone() }), Some(Reason::OutOfRange));
        assert_eq!(reason(Location { alt_m: Some(f64::INFINITY), ..ok.clone() }), Some(Reason::OutOfRange));
        assert_eq!(reason(Location { lat: 0.0, lon: 0.0, ..ok }), Some(Reason::NoFix));
        let detail = location(&Location { lat: 91.5, lon: 1.0, ..Location::default() });
        assert_eq!(detail.err().map(|e| e.1).as_deref(), Some("lat 91.5 outside -90..90"));
    }

    #[test]
    fn diagnostic_percentages_are_bounded() {
        let d = |f: fn(&mut Diagnostic)| {
            let mut d = Diagnostic::default();
            f(&mut d);
            diagnostic(&d).err().map(|e| e.0)
        };
        assert_eq!(d(|d| d.fuel_level_pct = Some(100.0)), None);
        assert_eq!(d(|d| d.fuel_level_pct = Some(100.1)), Some(Reason::OutOfRange));
        assert_eq!(d(|d| d.battery_soc_pct = Some(-1.0)), Some(Reason::OutOfRange));
        assert_eq!(d(|d| d.engine_load_pct = Some(101.0)), Some(Reason::OutOfRange));
        assert_eq!(d(|d| d.engine_rpm = Some(-5.0)), Some(Reason::OutOfRange));
        assert_eq!(d(|d| d.battery_v = Some(f64::NAN)), Some(Reason::OutOfRange));
        assert_eq!(d(|d| d.dtcs = Some(vec![Dtc::Obd("X".into())])), Some(Reason::InvalidDtc));
    }

    #[test]
    fn time_bounds_are_enforced() {
        let rules = Rules { min_ts: Some(1_000), ..Rules::default() };
        let now = 1_795_640_400_000_000;
        assert!(ts(now + rules.max_future_us, now, &rules).is_ok());
        assert_eq!(ts(now + rules.max_future_us + 1, now, &rules).map_err(|e| e.0), Err(Reason::FutureTs));
        assert_eq!(ts(999, now, &rules).map_err(|e| e.0), Err(Reason::PastTs));
        assert!(ts(-5_000_000_000_000_000, now, &Rules::default()).is_ok());
        assert_eq!(ts(MAX_TS + 1, i64::MAX, &Rules::default()).map_err(|e| e.0), Err(Reason::InvalidTs));
    }

    #[test]
    fn seq_must_fit_a_signed_64_bit_column() {
        assert!(seq(i64::MAX as u64).is_ok());
        assert_eq!(seq(i64::MAX as u64 + 1).map_err(|e| e.0), Err(Reason::OutOfRange));
    }

    #[test]
    fn frame_runs_every_check_including_vehicle_id_and_signals() {
        let now = 1_795_640_400_000_000;
        let good = Frame {
            vehicle_id: "V1".to_owned(),
            ts: now,
            seq: 1,
            received_at: now,
            body: Body::Diagnostic(Box::new(Diagnostic {
                signals: Some(r#"{"a":1}"#.to_owned()),
                ..Diagnostic::default()
            })),
        };
        assert_eq!(frame(&good, &Rules::default()), Ok(()));
        let bad_id = Frame { vehicle_id: "V 1".to_owned(), ..good.clone() };
        assert_eq!(frame(&bad_id, &Rules::default()).map_err(|e| e.0), Err(Reason::InvalidVehicleId));
        let bad_signals = Frame {
            body: Body::Diagnostic(Box::new(Diagnostic {
                signals: Some(r#"{"a":[1]}"#.to_owned()),
                ..Diagnostic::default()
            })),
            ..good
        };
        assert_eq!(frame(&bad_signals, &Rules::default()).map_err(|e| e.0), Err(Reason::InvalidSignals));
    }

    #[test]
    fn signals_are_canonicalised_and_scalars_only() {
        assert_eq!(
            signals(r#"{ "b": true, "a": 1.5, "c": "x" }"#).as_deref(),
            Ok(r#"{"a":1.5,"b":true,"c":"x"}"#)
        );
        for bad in [r#"{"a":null}"#, r#"{"a":{}}"#, r#"{"a":[1]}"#, "[]", "1", "{", ""] {
            assert_eq!(signals(bad).map_err(|e| e.0), Err(Reason::InvalidSignals), "{bad}");
        }
    }
}
