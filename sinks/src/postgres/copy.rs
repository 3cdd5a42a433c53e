//! `COPY … FROM STDIN (FORMAT binary)` encoding of frames, written by hand.
//!
//! tokio-postgres' generic `BinaryCopyInWriter` goes through `ToSql` and a boxed future per row;
//! writing the bytes ourselves is an order of magnitude faster (NOTES.md, "Postgres"). The format
//! (PostgreSQL docs, "COPY", "Binary Format"): an 11-byte signature, a 32-bit flags word and a
//! 32-bit header-extension length; per row a 16-bit field count and, per field, a 32-bit length
//! (-1 for NULL) and the value in the type's binary `send` form; a 16-bit -1 as trailer. All
//! integers are big-endian.
//!
//! Rows are encoded once into one buffer with their boundaries kept, so that any contiguous run
//! of rows (the halves of a bisection) can be sent again without re-encoding.
//!
//! This module does no I/O.

use bytes::Bytes;
use fleetpipe_processors::{Body, Diagnostic, Dtc, Frame, Kind, Location, Micros};

/// Signature, flags (no OIDs) and an empty header extension.
pub(crate) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The file trailer: a field count of -1.
pub(crate) const TRAILER: &[u8] = &[0xff, 0xff];

/// Microseconds from 1970-01-01 (the Unix epoch, [`Micros`]) to 2000-01-01 (Postgres' epoch).
pub(crate) const PG_EPOCH_OFFSET_US: Micros = 946_684_800_000_000;

/// Columns of `locations`, in the order the encoder writes them.
pub(crate) const LOCATION_COLUMNS: &[&str] = &[
    "vehicle_id",
    "ts",
    "seq",
    "received_at",
    "lat",
    "lon",
    "speed_kmh",
    "heading_deg",
    "alt_m",
    "accuracy_m",
    "satellites",
    "odometer_m",
    "ignition",
];

/// Columns of `diagnostics`, in the order the encoder writes them.
pub(crate) fn diagnostic_columns() -> Vec<&'static str> {
    let mut columns = vec!["vehicle_id", "ts", "seq", "received_at"];
    columns.extend(Diagnostic::MEASURES.iter().map(|m| m.name));
    columns.extend(["mil_on", "dtcs", "signals"]);
    columns
}

/// How many columns a `diagnostics` row has: the head, the measures, `mil_on`, `dtcs`, `signals`.
const DIAGNOSTIC_COLUMN_COUNT: usize = 4 + Diagnostic::MEASURES.len() + 3;

/// Columns of a kind's table, in the order the encoder writes them.
pub(crate) fn columns(kind: Kind) -> Vec<&'static str> {
    match kind {
        Kind::Location => LOCATION_COLUMNS.to_vec(),
        Kind::Diagnostic => diagnostic_columns(),
    }
}

/// A value the column cannot hold, found before sending (the binary format has no way to send
/// it). Reported like Postgres' own refusal, with the SQLSTATE Postgres would use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unencodable {
    pub(crate) sqlstate: &'static str,
    pub(crate) message: String,
}

/// Encoded rows of one table, without header and trailer.
#[derive(Debug, Clone, Default)]
pub(crate) struct EncodedRows {
    data: Bytes,
    /// `ends[i]` is where row `i` ends in `data`.
    ends: Vec<usize>,
    /// `sources[i]` is the position of row `i`'s frame in the input of [`EncodedRows::encode`].
    sources: Vec<usize>,
}

impl EncodedRows {
    /// Encodes `frames` (all of one kind). A frame that cannot be encoded is left out and
    /// returned with the reason, by its position in `frames`.
    pub(crate) fn encode<'a>(
        frames: impl IntoIterator<Item = &'a Frame>,
    ) -> (EncodedRows, Vec<(usize, Unencodable)>) {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        let mut sources = Vec::new();
        let mut refused = Vec::new();
        for (i, frame) in frames.into_iter().enumerate() {
            match check(frame) {
                Ok(()) => {
                    encode_row(frame, &mut buf);
                    ends.push(buf.len());
                    sources.push(i);
                }
                Err(e) => refused.push((i, e)),
            }
        }
        (EncodedRows { data: Bytes::from(buf), ends, sources }, refused)
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Position of row `row`'s frame in the input of [`EncodedRows::encode`].
    pub(crate) fn source(&self, row: usize) -> usize {
        self.sources[row]
    }

    /// The bytes of rows `range` (without header and trailer), shared, not copied.
    pub(crate) fn rows(&self, range: std::ops::Range<usize>) -> Bytes {
        if range.is_empty() {
            return Bytes::new();
        }
        let start = if range.start == 0 { 0 } else { self.ends[range.start - 1] };
        self.data.slice(start..self.ends[range.end - 1])
    }
}

fn check(frame: &Frame) -> Result<(), Unencodable> {
    if i64::try_from(frame.seq).is_err() {
        return Err(Unencodable {
            sqlstate: "22003",
            message: format!("bigint out of range: seq {}", frame.seq),
        });
    }
    if let Body::Location(l) = &frame.body {
        if let Some(n) = l.satellites {
            if i32::try_from(n).is_err() {
                return Err(Unencodable {
                    sqlstate: "22003",
                    message: format!("integer out of range: satellites {n}"),
                });
            }
        }
    }
    Ok(())
}

/// Appends one row in the COPY binary form. `frame` must have passed [`check`].
fn encode_row(frame: &Frame, out: &mut Vec<u8>) {
    match &frame.body {
        Body::Location(l) => {
            out.extend_from_slice(&(LOCATION_COLUMNS.len() as i16).to_be_bytes());
            common(frame, out);
            location(l, out);
        }
        Body::Diagnostic(d) => {
            out.extend_from_slice(&(DIAGNOSTIC_COLUMN_COUNT as i16).to_be_bytes());
            common(frame, out);
            diagnostic(d, out);
        }
    }
}

fn common(frame: &Frame, out: &mut Vec<u8>) {
    text(&frame.vehicle_id, out);
    timestamptz(frame.ts, out);
    // `check` made sure it fits.
    int8(frame.seq as i64, out);
    timestamptz(frame.received_at, out);
}

fn location(l: &Location, out: &mut Vec<u8>) {
    float8(Some(l.lat), out);
    float8(Some(l.lon), out);
    float8(l.speed_kmh, out);
    float8(l.heading_deg, out);
    float8(l.alt_m, out);
    float8(l.accuracy_m, out);
    // `check` made sure it fits.
    int4(l.satellites.map(|n| n as i32), out);
    float8(l.odometer_m, out);
    boolean(l.ignition, out);
}

fn diagnostic(d: &Diagnostic, out: &mut Vec<u8>) {
    for m in &Diagnostic::MEASURES {
        float8((m.get)(d), out);
    }
    boolean(d.mil_on, out);
    match &d.dtcs {
        Some(dtcs) => jsonb(out, |out| dtcs_json(dtcs, out)),
        None => null(out),
    }
    match &d.signals {
        Some(s) => jsonb(out, |out| out.extend_from_slice(s.as_bytes())),
        None => null(out),
    }
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

fn text(s: &str, out: &mut Vec<u8>) {
    // A vehicle id is at most 64 bytes (validated); a longer one still fits an i32.
    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn timestamptz(micros: Micros, out: &mut Vec<u8>) {
    // Saturating: an unrepresentable instant becomes ±infinity, which no partition accepts, so
    // Postgres refuses the row instead of storing a wrapped-around time.
    int8(micros.saturating_sub(PG_EPOCH_OFFSET_US), out);
}

fn int8(v: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&v.to_be_bytes());
}

fn int4(v: Option<i32>, out: &mut Vec<u8>) {
    match v {
        Some(v) => {
            out.extend_from_slice(&4i32.to_be_bytes());
            out.extend_from_slice(&v.to_be_bytes());
        }
        None => null(out),
    }
}

fn float8(v: Option<f64>, out: &mut Vec<u8>) {
    match v {
        Some(v) => {
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&v.to_bits().to_be_bytes());
        }
        None => null(out),
    }
}

fn boolean(v: Option<bool>, out: &mut Vec<u8>) {
    match v {
        Some(v) => {
            out.extend_from_slice(&1i32.to_be_bytes());
            out.push(u8::from(v));
        }
        None => null(out),
    }
}

/// A `jsonb` value: version byte 1, then the JSON text; the length is patched in afterwards.
fn jsonb(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&0i32.to_be_bytes());
    out.push(1);
    write(out);
    let len = (out.len() - at - 4) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// `dtcs` in the contract's JSON form: code strings and `{"spn","fmi","oc","sa"}` objects.
pub(crate) fn dtcs_json(dtcs: &[Dtc], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, dtc) in dtcs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match dtc {
            Dtc::Obd(code) => {
                // Validated codes need no escaping; serde_json escapes anything else correctly.
                let _ = serde_json::to_writer(&mut *out, code);
            }
            Dtc::J1939 { spn, fmi, oc, sa } => {
                out.extend_from_slice(
                    format!(r#"{{"spn":{spn},"fmi":{fmi},"oc":{oc},"sa":{sa}}}"#).as_bytes(),
                );
            }
        }
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn frame(body: Body) -> Frame {
        Frame {
            vehicle_id: "V1".into(),
            ts: PG_EPOCH_OFFSET_US + 1,
            seq: 7,
            received_at: PG_EPOCH_OFFSET_US,
            body,
        }
    }

    /// Splits one encoded row into its fields (`None` for NULL).
    fn fields(row: &[u8]) -> Vec<Option<Vec<u8>>> {
        let n = i16::from_be_bytes([row[0], row[1]]) as usize;
        let mut at = 2;
        let mut out = Vec::new();
        for _ in 0..n {
            let len = i32::from_be_bytes(row[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                out.push(None);
            } else {
                out.push(Some(row[at..at + len as usize].to_vec()));
                at += len as usize;
            }
        }
        assert_eq!(at, row.len(), "trailing bytes");
        out
    }

    #[test]
    fn header_is_the_signature_then_zero_flags_and_extension() {
        assert_eq!(HEADER.len(), 19);
        assert_eq!(&HEADER[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(TRAILER, (-1i16).to_be_bytes());
    }

    #[test]
    fn a_location_row_has_thirteen_fields_with_nulls_for_absent_values() {
        let l = Location {
            lat: 56.1,
            lon: -10.25,
            satellites: Some(9),
            ignition: Some(true),
            ..Location::default()
        };
        let (rows, refused) = EncodedRows::encode([&frame(Body::Location(l))]);
        assert!(refused.is_empty());
        let f = fields(&rows.rows(0..1));
        assert_eq!(f.len(), LOCATION_COLUMNS.len());
        assert_eq!(f[0].as_deref(), Some(&b"V1"[..]));
        assert_eq!(f[1].as_deref(), Some(&1i64.to_be_bytes()[..]), "ts counts from 2000-01-01");
        assert_eq!(f[2].as_deref(), Some(&7i64.to_be_bytes()[..]));
        assert_eq!(f[3].as_deref(), Some(&0i64.to_be_bytes()[..]));
        assert_eq!(f[4].as_deref(), Some(&56.1f64.to_bits().to_be_bytes()[..]));
        assert_eq!(f[5].as_deref(), Some(&(-10.25f64).to_bits().to_be_bytes()[..]));
        assert!(f[6..10].iter().all(Option::is_none));
        assert_eq!(f[10].as_deref(), Some(&9i32.to_be_bytes()[..]));
        assert_eq!(f[11], None);
        assert_eq!(f[12].as_deref(), Some(&[1u8][..]));
    }

    #[test]
    fn dtcs_and_signals_are_jsonb_version_one_followed_by_the_json_text() {
        let d = Diagnostic {
            dtcs: Some(vec![Dtc::Obd("P0301".into()), Dtc::J1939 { spn: 110, fmi: 0, oc: 3, sa: 0 }]),
            signals: Some(r#"{"a":1}"#.into()),
            ..Diagnostic::default()
        };
        let (rows, _) = EncodedRows::encode([&frame(Body::Diagnostic(Box::new(d)))]);
        let f = fields(&rows.rows(0..1));
        assert_eq!(f.len(), DIAGNOSTIC_COLUMN_COUNT);
        assert_eq!(diagnostic_columns().len(), DIAGNOSTIC_COLUMN_COUNT);
        assert_eq!(f[13].as_deref(), Some(&b"\x01[\"P0301\",{\"spn\":110,\"fmi\":0,\"oc\":3,\"sa\":0}]"[..]));
        assert_eq!(f[14].as_deref(), Some(&b"\x01{\"a\":1}"[..]));
    }

    #[test]
    fn values_a_column_cannot_hold_are_refused_before_sending_and_the_rest_stay_addressable() {
        let big = Location { lat: 1.0, lon: 1.0, satellites: Some(u32::MAX), ..Location::default() };
        let ok = Location { lat: 1.0, lon: 1.0, ..Location::default() };
        let mut huge_seq = frame(Body::Location(ok.clone()));
        huge_seq.seq = u64::MAX;
        let frames = [
            frame(Body::Location(ok.clone())),
            frame(Body::Location(big)),
            huge_seq,
            frame(Body::Location(ok)),
        ];
        let (rows, refused) = EncodedRows::encode(&frames);
        assert_eq!(
            refused.iter().map(|(i, e)| (*i, e.sqlstate)).collect::<Vec<_>>(),
            [(1, "22003"), (2, "22003")]
        );
        assert_eq!(rows.len(), 2);
        assert_eq!((rows.source(0), rows.source(1)), (0, 3));
        assert_eq!(rows.rows(0..1), rows.rows(1..2), "the two good rows are equal");
        assert_eq!(rows.rows(0..2).len(), 2 * rows.rows(0..1).len());
        assert!(rows.rows(1..1).is_empty());
    }
}
