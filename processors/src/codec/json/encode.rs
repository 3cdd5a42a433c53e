//! Encoding: a frame as normalised contract JSON.

use std::io;

use serde_json::ser::{CompactFormatter, Formatter};
use serde_json::value::RawValue;

use crate::frame::{Body, Diagnostic, Dtc, Frame, Micros};
use crate::time;

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
            for m in &Diagnostic::MEASURES {
                o.opt_f64(m.name, (m.get)(d))?;
            }
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
            for measure in &Diagnostic::MEASURES {
                put_f64(&mut m, measure.name, (measure.get)(d));
            }
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
