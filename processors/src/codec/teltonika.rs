//! Teltonika AVL records (Codec 8, 8 Extended and 16, decoded by `nom-teltonika`) to frames.
//!
//! Each record becomes
//!
//! - a **location** frame when it has a fix: the record's timestamp, latitude and longitude,
//!   altitude, angle as `heading_deg`, satellites, speed as `speed_kmh`, and the IO elements whose
//!   contract field is on the location frame (ignition, odometer). A record with no fix
//!   (latitude = longitude = 0, or no satellites: Teltonika then repeats the last known position)
//!   has no location frame — it is not a `no_fix` rejection;
//! - a **diagnostic** frame for its IO elements: the common ones mapped to contract fields
//!   ([`IO_MAP`]), every other one kept in `signals` as `Teltonika.IO.<id>`, and the record's
//!   priority and event IO id as `Teltonika.Priority` and `Teltonika.EventIO`.
//!
//! Both frames are validated like any other; a bad one is a rejection of its own (its packet's
//! bytes kept) and its neighbours are unaffected. A record carries no sequence number: its
//! frames have `seq` 0, so a record sent again (the device resends what was not acknowledged)
//! has the same identity and is folded by de-duplication.

use bytes::Bytes;
use nom_teltonika::decoder::{take_datagram, take_frame, DecodeDatagramError, DecodeFrameError};
use nom_teltonika::encoder::encode_udp_ack;
use nom_teltonika::protocol::{AvlPacketView, AvlRecordView, FrameView, IoValueView};
use serde_json::{Map, Value};

use crate::frame::{Body, Decoded, Diagnostic, Dtc, Frame, Location, Micros, Origin, Reason, Rejection};
use crate::validate::{self, Rules};

/// Where an IO element goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `ignition` of the location frame (value ≠ 0).
    Ignition,
    /// `odometer_m` of both frames, in metres as sent.
    OdometerM,
    /// `battery_v`, from millivolts.
    BatteryMillivolts,
    /// `fuel_level_pct`, as sent.
    FuelLevelPct,
    /// `engine_rpm`, as sent.
    EngineRpm,
    /// `coolant_temp_c`, a signed byte.
    CoolantC,
    /// `engine_load_pct`, as sent.
    EngineLoadPct,
    /// `engine_hours`, from minutes.
    EngineMinutes,
    /// `dtcs`: comma- or space-separated OBD-II codes (a variable-length element).
    ObdCodes,
    /// A signal: true when the value is not 0.
    SignalBool(&'static str),
    /// A signal: the number as sent.
    Signal(&'static str),
    /// A signal: text (a variable-length element).
    SignalText(&'static str),
}

/// One IO element fleetpipe maps: its AVL id, Teltonika's name for it, where it goes.
#[derive(Debug, Clone, Copy)]
pub struct IoMapping {
    pub id: u16,
    pub name: &'static str,
    pub target: Target,
}

const fn io(id: u16, name: &'static str, target: Target) -> IoMapping {
    IoMapping { id, name, target }
}

/// The IO elements mapped to contract fields or VSS signals (ids of Teltonika's FMB/FMC/FMM
/// "Data Sending Parameters ID" tables). Every other element is kept as `Teltonika.IO.<id>`.
/// The README's table is this list.
pub const IO_MAP: &[IoMapping] = &[
    io(239, "Ignition", Target::Ignition),
    io(240, "Movement", Target::SignalBool("Vehicle.IsMoving")),
    io(16, "Total Odometer", Target::OdometerM),
    io(66, "External Voltage", Target::BatteryMillivolts),
    io(24, "Speed", Target::Signal("Vehicle.Speed")),
    io(48, "Fuel Level (OBD)", Target::FuelLevelPct),
    io(89, "Fuel level (CAN)", Target::FuelLevelPct),
    io(36, "Engine RPM (OBD)", Target::EngineRpm),
    io(85, "Engine RPM (CAN)", Target::EngineRpm),
    io(32, "Coolant Temperature (OBD)", Target::CoolantC),
    io(31, "Engine Load (OBD)", Target::EngineLoadPct),
    io(102, "Engine Worked Time (CAN)", Target::EngineMinutes),
    io(256, "VIN", Target::SignalText("Vehicle.VehicleIdentification.VIN")),
    io(281, "Fault Codes", Target::ObdCodes),
];

/// The `signals` name of an element fleetpipe does not map.
pub fn io_signal(id: u16) -> String {
    format!("Teltonika.IO.{id}")
}

/// What a packet's frames are made with.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    /// The vehicle the tracker speaks for (its credential's, or the IMEI itself).
    pub vehicle_id: &'a str,
    pub origin: &'a Origin,
    pub received_at: Micros,
    /// The packet's bytes, kept with a rejection.
    pub raw: &'a Bytes,
}

/// The frames and rejections of every record of `packet`.
pub fn decode_packet(packet: AvlPacketView<'_>, at: &Packet<'_>, rules: &Rules) -> Decoded {
    let mut out = Decoded::default();
    for (i, record) in packet.records().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        for frame in record_frames(record, at) {
            out.received += 1;
            match validate::frame(&frame, rules) {
                Ok(()) => out.frames.push(frame),
                Err((reason, detail)) => out.rejections.push(Rejection {
                    reason,
                    detail: format!("record {i} ({}): {detail}", frame.kind().as_str()),
                    index: Some(index),
                    raw: at.raw.clone(),
                    origin: at.origin.clone(),
                    received_at: at.received_at,
                }),
            }
        }
    }
    out
}

/// A packet refused whole (it did not decode): one `malformed_teltonika` rejection.
pub fn refuse(raw: Bytes, detail: String, origin: Origin, received_at: Micros) -> Decoded {
    Decoded {
        frames: Vec::new(),
        rejections: vec![Rejection {
            reason: Reason::MalformedTeltonika,
            detail,
            index: None,
            raw,
            origin,
            received_at,
        }],
        received: 1,
    }
}

/// What the bytes buffered on a TCP connection (after the IMEI handshake) begin with.
#[derive(Debug)]
pub enum TcpStep {
    /// Not a whole packet yet: read more.
    Need,
    /// `len` bytes of a packet that is not AVL data (a Codec 12 reply): nothing to store.
    Skip { len: usize },
    /// A packet of `count` records in `len` bytes: store, then answer with `count`.
    Records { decoded: Decoded, count: u32, len: usize },
    /// `len` bytes of a packet that does not decode: kept, to be answered with zero.
    Malformed { decoded: Decoded, len: usize },
    /// Bytes that cannot be delimited as a packet (all of them): kept; close the connection.
    Lost { decoded: Decoded },
}

/// The first packet of `buf` (a TCP connection's bytes after the handshake).
pub fn next_tcp(
    buf: &[u8],
    vehicle_id: &str,
    origin: &Origin,
    received_at: Micros,
    rules: &Rules,
) -> TcpStep {
    let mut input = buf;
    match take_frame(&mut input) {
        Ok(FrameView::Avl(packet)) => {
            let len = buf.len() - input.len();
            let raw = Bytes::copy_from_slice(buf.get(..len).unwrap_or_default());
            let count = u32::try_from(packet.records().len()).unwrap_or(u32::MAX);
            let at = Packet { vehicle_id, origin, received_at, raw: &raw };
            TcpStep::Records { decoded: decode_packet(packet, &at, rules), count, len }
        }
        Ok(_) => TcpStep::Skip { len: buf.len() - input.len() },
        Err(DecodeFrameError::Incomplete { .. }) => TcpStep::Need,
        Err(e @ DecodeFrameError::InvalidFrame { len, .. }) => {
            let len = len.min(buf.len());
            let raw = Bytes::copy_from_slice(buf.get(..len).unwrap_or_default());
            TcpStep::Malformed { decoded: refuse(raw, chain(&e), origin.clone(), received_at), len }
        }
        Err(e @ DecodeFrameError::InvalidHeader(_)) => {
            let raw = Bytes::copy_from_slice(buf);
            TcpStep::Lost { decoded: refuse(raw, chain(&e), origin.clone(), received_at) }
        }
    }
}

/// What a UDP datagram comes to.
#[derive(Debug)]
pub enum UdpStep {
    /// Store `decoded`, then send `answer` (none for a datagram too short to have ids).
    Store { decoded: Decoded, answer: Option<[u8; 7]>, records: usize },
    /// The tracker is refused (`reason`): the datagram is not answered.
    Refused { imei: String, reason: &'static str },
}

/// A UDP datagram: its IMEI goes through `vehicle_of` (the vehicle it speaks for, or why not).
pub fn datagram(
    bytes: &Bytes,
    received_at: Micros,
    rules: &Rules,
    vehicle_of: impl FnOnce(&str) -> Result<String, &'static str>,
) -> UdpStep {
    let mut input: &[u8] = bytes;
    match take_datagram(&mut input) {
        Ok(view) => {
            let imei = view.imei().as_str();
            let vehicle_id = match vehicle_of(imei) {
                Ok(v) => v,
                Err(reason) => return UdpStep::Refused { imei: imei.to_owned(), reason },
            };
            let origin = Origin::Teltonika { imei: imei.to_owned() };
            let at = Packet { vehicle_id: &vehicle_id, origin: &origin, received_at, raw: bytes };
            let records = view.packet().records().len();
            let count = u8::try_from(records).unwrap_or(u8::MAX);
            UdpStep::Store {
                decoded: decode_packet(view.packet(), &at, rules),
                answer: Some(encode_udp_ack(view.ids(), count)),
                records,
            }
        }
        Err(e) => {
            let answer = match e {
                DecodeDatagramError::InvalidDatagram { ids, .. } => Some(encode_udp_ack(ids, 0)),
                DecodeDatagramError::NoHeader => None,
            };
            let origin = Origin::Teltonika { imei: String::new() };
            UdpStep::Store {
                decoded: refuse(bytes.clone(), chain(&e), origin, received_at),
                answer,
                records: 0,
            }
        }
    }
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// A record's location frame (when it has a fix) and diagnostic frame.
fn record_frames(record: AvlRecordView<'_>, at: &Packet<'_>) -> Vec<Frame> {
    let ms = u64::from(record.timestamp());
    let ts = i64::try_from(ms).unwrap_or(i64::MAX).saturating_mul(1000);
    let gps = record.gps();
    let fix = gps.satellites > 0 && (gps.latitude_raw != 0 || gps.longitude_raw != 0);
    let mut location = fix.then(|| Location {
        lat: gps.latitude_degrees(),
        lon: gps.longitude_degrees(),
        speed_kmh: Some(f64::from(gps.speed_kph)),
        heading_deg: Some(f64::from(gps.angle_degrees)),
        alt_m: Some(f64::from(gps.altitude_meters_signed())),
        satellites: Some(u32::from(gps.satellites)),
        ..Location::default()
    });
    let mut diag = Diagnostic::default();
    let mut signals = Map::new();
    signals.insert("Teltonika.Priority".into(), Value::from(u8::from(record.priority())));
    signals.insert("Teltonika.EventIO".into(), Value::from(record.event_io_id().map_or(0, u16::from)));
    if let Some(generation) = record.generation_type() {
        signals.insert("Teltonika.GenerationType".into(), Value::from(u8::from(generation)));
    }
    for element in record.io_elements() {
        let id = u16::from(element.id());
        let value = element.value();
        let mapped = IO_MAP.iter().find(|m| m.id == id).map(|m| m.target);
        let placed = match (mapped, number(value)) {
            (Some(Target::Ignition), Some(n)) => match location.as_mut() {
                Some(l) => {
                    l.ignition = Some(n != 0);
                    true
                }
                None => false,
            },
            (Some(Target::OdometerM), Some(n)) => {
                let m = n as f64;
                if let Some(l) = location.as_mut() {
                    l.odometer_m = Some(m);
                }
                diag.odometer_m = Some(m);
                true
            }
            (Some(Target::BatteryMillivolts), Some(n)) => set(&mut diag.battery_v, n as f64 / 1000.0),
            (Some(Target::FuelLevelPct), Some(n)) => set(&mut diag.fuel_level_pct, n as f64),
            (Some(Target::EngineRpm), Some(n)) => set(&mut diag.engine_rpm, n as f64),
            (Some(Target::CoolantC), Some(n)) => set(&mut diag.coolant_temp_c, f64::from(n as u8 as i8)),
            (Some(Target::EngineLoadPct), Some(n)) => set(&mut diag.engine_load_pct, n as f64),
            (Some(Target::EngineMinutes), Some(n)) => set(&mut diag.engine_hours, n as f64 / 60.0),
            (Some(Target::SignalBool(name)), Some(n)) => {
                signals.insert(name.into(), Value::Bool(n != 0));
                true
            }
            (Some(Target::Signal(name)), Some(n)) => {
                signals.insert(name.into(), Value::from(n));
                true
            }
            (Some(Target::SignalText(name)), None) => match text(value) {
                Some(t) => {
                    signals.insert(name.into(), Value::String(t));
                    true
                }
                None => false,
            },
            (Some(Target::ObdCodes), None) => match obd_codes(value) {
                Some(codes) => {
                    diag.dtcs = Some(codes);
                    true
                }
                None => false,
            },
            _ => false,
        };
        if !placed {
            signals.insert(io_signal(id), raw_value(value));
        }
    }
    // Keys sorted, compact: the canonical text the contract stores (serde_json's map is ordered).
    diag.signals = Some(Value::Object(signals).to_string());
    let frame =
        |body| Frame { vehicle_id: at.vehicle_id.to_owned(), ts, seq: 0, received_at: at.received_at, body };
    let mut frames = Vec::with_capacity(2);
    if let Some(l) = location {
        frames.push(frame(Body::Location(l)));
    }
    frames.push(frame(Body::Diagnostic(Box::new(diag))));
    frames
}

fn set(field: &mut Option<f64>, v: f64) -> bool {
    *field = Some(v);
    true
}

fn number(value: IoValueView<'_>) -> Option<u64> {
    match value {
        IoValueView::U8(v) => Some(u64::from(v)),
        IoValueView::U16(v) => Some(u64::from(v)),
        IoValueView::U32(v) => Some(u64::from(v)),
        IoValueView::U64(v) => Some(v),
        IoValueView::Bytes(_) => None,
    }
}

/// Printable ASCII text of a variable-length element (NULs and blanks at the ends trimmed).
fn text(value: IoValueView<'_>) -> Option<String> {
    let IoValueView::Bytes(b) = value else {
        return None;
    };
    let t = std::str::from_utf8(b).ok()?.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!t.is_empty() && t.bytes().all(|c| c.is_ascii_graphic() || c == b' ')).then(|| t.to_owned())
}

/// OBD-II codes of a "Fault Codes" element; `None` when any item is not one.
fn obd_codes(value: IoValueView<'_>) -> Option<Vec<Dtc>> {
    let t = text(value)?;
    t.split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| validate::obd_code(s).then(|| Dtc::Obd(s.to_owned())))
        .collect()
}

/// An element kept as sent: a number, or text, or the bytes in hex.
fn raw_value(value: IoValueView<'_>) -> Value {
    if let Some(n) = number(value) {
        return Value::from(n);
    }
    if let Some(t) = text(value) {
        return Value::String(t);
    }
    let IoValueView::Bytes(b) = value else {
        return Value::Null;
    };
    Value::String(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nom_teltonika::decoder::{take_datagram, take_frame};
    use nom_teltonika::encoder::{encode_avl_frame, AvlRecordFields};
    use nom_teltonika::protocol::{AvlCodec, AvlTimestamp, FrameView, GpsElement, Priority};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn decode(bytes: &[u8]) -> Decoded {
        let raw = Bytes::copy_from_slice(bytes);
        let mut input = bytes;
        let FrameView::Avl(packet) = take_frame(&mut input).unwrap() else { panic!("not AVL") };
        let origin = Origin::Teltonika { imei: "356307042441013".into() };
        let at = Packet {
            vehicle_id: "356307042441013",
            origin: &origin,
            received_at: 1_800_000_000_000_000,
            raw: &raw,
        };
        decode_packet(packet, &at, &Rules::default())
    }

    fn signals(f: &Frame) -> Value {
        let Body::Diagnostic(d) = &f.body else { panic!("not diagnostic") };
        serde_json::from_str(d.signals.as_deref().unwrap()).unwrap()
    }

    /// Teltonika's documented Codec 8 example: one record, no fix, IO {21: 3, 1: 1, 66: 24079,
    /// 241: 24602, 78: 0}.
    #[test]
    fn the_codec_8_example_is_one_diagnostic_frame_with_its_io_mapped() {
        let d = decode(&hex("000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF"));
        assert!(d.rejections.is_empty(), "{:?}", d.rejections);
        assert_eq!(d.frames.len(), 1, "no fix: no location frame, no rejection");
        let f = &d.frames[0];
        assert_eq!(f.ts, 1_560_161_086_000_000);
        assert_eq!(crate::time::format_ts(f.ts), "2019-06-10T10:04:46.000Z");
        let Body::Diagnostic(diag) = &f.body else { panic!() };
        assert_eq!(diag.battery_v, Some(24.079));
        assert_eq!(
            signals(f),
            serde_json::json!({
                "Teltonika.Priority": 1, "Teltonika.EventIO": 1, "Teltonika.IO.21": 3,
                "Teltonika.IO.1": 1, "Teltonika.IO.241": 24602, "Teltonika.IO.78": 0
            })
        );
    }

    #[test]
    fn the_two_record_example_gives_two_frames_in_record_order() {
        let d = decode(&hex("000000000000004308020000016B40D57B480100000000000000000000000000000001010101000000000000016B40D5C198010000000000000000000000000000000101010101000000020000252C"));
        assert_eq!(d.frames.len(), 2);
        assert_eq!(crate::time::format_ts(d.frames[0].ts), "2019-06-10T10:01:01.000Z");
        assert_eq!(crate::time::format_ts(d.frames[1].ts), "2019-06-10T10:01:19.000Z");
        assert_eq!(signals(&d.frames[0])["Teltonika.IO.1"], 0);
        assert_eq!(signals(&d.frames[1])["Teltonika.IO.1"], 1);
    }

    #[test]
    fn the_codec_8_extended_example_maps_the_odometer() {
        let d = decode(&hex("000000000000004A8E010000016B412CEE000100000000000000000000000000000000010005000100010100010011001D00010010015E2C880002000B000000003544C87A000E000000001DD7E06A00000100002994"));
        assert_eq!(d.frames.len(), 1);
        let f = &d.frames[0];
        assert_eq!(crate::time::format_ts(f.ts), "2019-06-10T11:36:32.000Z");
        let Body::Diagnostic(diag) = &f.body else { panic!() };
        assert_eq!(diag.odometer_m, Some(22_949_000.0));
        let s = signals(f);
        assert_eq!(s["Teltonika.IO.1"], 1);
        assert_eq!(s["Teltonika.IO.17"], 29);
        assert_eq!(s["Teltonika.IO.11"], 893_700_218u64);
        assert_eq!(s["Teltonika.IO.14"], 500_686_954u64);
    }

    #[test]
    fn a_udp_datagram_decodes_to_the_same_frames() {
        let bytes = hex("003DCAFE0105000F33353230393330383634303336353508010000016B4F815B30010000000000000000000000000000000103021503010101425DBC000001");
        let mut input = &bytes[..];
        let dg = take_datagram(&mut input).unwrap();
        assert_eq!(dg.imei().as_str(), "352093086403655");
        let raw = Bytes::copy_from_slice(&bytes);
        let origin = Origin::Teltonika { imei: "352093086403655".into() };
        let at = Packet {
            vehicle_id: "352093086403655",
            origin: &origin,
            received_at: 1_560_500_000_000_000,
            raw: &raw,
        };
        let d = decode_packet(dg.packet(), &at, &Rules::default());
        assert_eq!(d.frames.len(), 1);
        let Body::Diagnostic(diag) = &d.frames[0].body else { panic!() };
        assert_eq!(diag.battery_v, Some(23.996));
    }

    fn fix_record(ts_ms: u64, angle: u16) -> Vec<u8> {
        let gps = GpsElement {
            longitude_raw: 102_136_950,
            latitude_raw: 561_021_390,
            altitude_meters: 38,
            angle_degrees: angle,
            satellites: 9,
            speed_kph: 34,
        };
        let u8s = [(239u16.into(), 1u8), (240u16.into(), 1u8), (21u16.into(), 4u8)];
        let u16s = [(66u16.into(), 12_850u16)];
        let u32s = [(16u16.into(), 123_456u32)];
        let vin: [(nom_teltonika::protocol::IoId, &[u8]); 2] =
            [(256u16.into(), b"WVWZZZ1JZXW000001"), (281u16.into(), b"P0301,P0171")];
        let record = AvlRecordFields::new(AvlTimestamp::from(ts_ms), Priority::High, gps)
            .with_event_io_id(239u16.into())
            .with_io_u8(&u8s)
            .with_io_u16(&u16s)
            .with_io_u32(&u32s)
            .with_io_bytes(&vin);
        encode_avl_frame(AvlCodec::Codec8Extended, &[record]).unwrap()
    }

    #[test]
    fn a_record_with_a_fix_gives_a_location_and_a_diagnostic_frame() {
        let d = decode(&fix_record(1_795_640_400_250, 273));
        assert!(d.rejections.is_empty(), "{:?}", d.rejections);
        assert_eq!(d.frames.len(), 2);
        let Body::Location(l) = &d.frames[0].body else { panic!("location first") };
        assert_eq!((l.lat, l.lon), (56.102139, 10.213695));
        assert_eq!(l.speed_kmh, Some(34.0));
        assert_eq!(l.heading_deg, Some(273.0));
        assert_eq!(l.alt_m, Some(38.0));
        assert_eq!(l.satellites, Some(9));
        assert_eq!(l.ignition, Some(true));
        assert_eq!(l.odometer_m, Some(123_456.0));
        let Body::Diagnostic(diag) = &d.frames[1].body else { panic!() };
        assert_eq!(diag.battery_v, Some(12.85));
        assert_eq!(diag.odometer_m, Some(123_456.0));
        assert_eq!(diag.dtcs, Some(vec![Dtc::Obd("P0301".into()), Dtc::Obd("P0171".into())]));
        let s = signals(&d.frames[1]);
        assert_eq!(s["Vehicle.VehicleIdentification.VIN"], "WVWZZZ1JZXW000001");
        assert_eq!(s["Vehicle.IsMoving"], true);
        assert_eq!(s["Teltonika.EventIO"], 239);
        assert_eq!(s["Teltonika.IO.21"], 4);
        assert!(s.get("Teltonika.IO.239").is_none(), "ignition went to the location frame");
    }

    #[test]
    fn a_bad_location_is_rejected_alone_and_the_diagnostic_frame_kept() {
        let d = decode(&fix_record(1_795_640_400_250, 360));
        assert_eq!(d.frames.len(), 1);
        assert_eq!(d.rejections.len(), 1);
        let r = &d.rejections[0];
        assert_eq!(r.reason, Reason::OutOfRange);
        assert_eq!(r.index, Some(0));
        assert!(r.detail.starts_with("record 0 (location): heading_deg"), "{}", r.detail);
        assert_eq!(d.received, 2);
    }
}
