//! Tests of the whole decoding path: splitting, transport rules, validation, round trips.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use prost::Message as _;

use super::*;
use crate::frame::{Body, Diagnostic, Dtc, Location};

/// 2026-11-25T21:00:00.250Z, the contract examples' event time.
const TS: Micros = 1_795_640_400_250_000;
/// The receiving clock: an hour after the examples.
const NOW: Micros = TS + 3_600_000_000;
const VIN: &str = "WVWZZZ1JZXW000001";

/// The contract's examples, verbatim (each spans two lines).
const LOC: &str = r#"{"vehicle_id":"WVWZZZ1JZXW000001","ts":"2026-11-25T21:00:00.250Z","seq":1017,"kind":"location",
 "lat":56.102139,"lon":10.213695,"speed_kmh":33.8,"heading_deg":273.0,"alt_m":38.5,"accuracy_m":3.2}"#;
const DIAG: &str = r#"{"vehicle_id":"WVWZZZ1JZXW000001","ts":1795640400250,"seq":1018,"kind":"diagnostic",
 "engine_rpm":2150,"coolant_temp_c":88,"fuel_level_pct":61.5,"dtcs":["P0301",{"spn":110,"fmi":0,"oc":3,"sa":0}]}"#;

fn loc_frame() -> Frame {
    Frame {
        vehicle_id: VIN.to_owned(),
        ts: TS,
        seq: 1017,
        received_at: NOW,
        body: Body::Location(Location {
            lat: 56.102139,
            lon: 10.213695,
            speed_kmh: Some(33.8),
            heading_deg: Some(273.0),
            alt_m: Some(38.5),
            accuracy_m: Some(3.2),
            satellites: None,
            odometer_m: None,
            ignition: None,
        }),
    }
}

fn diag_frame() -> Frame {
    Frame {
        vehicle_id: VIN.to_owned(),
        ts: TS,
        seq: 1018,
        received_at: NOW,
        body: Body::Diagnostic(Box::new(Diagnostic {
            engine_rpm: Some(2150.0),
            coolant_temp_c: Some(88.0),
            fuel_level_pct: Some(61.5),
            dtcs: Some(vec![Dtc::Obd("P0301".to_owned()), Dtc::J1939 { spn: 110, fmi: 0, oc: 3, sa: 0 }]),
            ..Diagnostic::default()
        })),
    }
}

/// A diagnostic frame using every field.
pub(crate) fn full_diag_frame() -> Frame {
    Frame {
        vehicle_id: "truck-7".to_owned(),
        ts: TS + 17,
        seq: 5,
        received_at: NOW,
        body: Body::Diagnostic(Box::new(Diagnostic {
            engine_rpm: Some(812.25),
            coolant_temp_c: Some(-12.5),
            engine_load_pct: Some(0.1),
            fuel_level_pct: Some(100.0),
            battery_soc_pct: Some(0.0),
            battery_v: Some(12.6),
            engine_hours: Some(10432.7),
            odometer_m: Some(123_456_789.125),
            mil_on: Some(true),
            dtcs: Some(vec![]),
            signals: Some(
                r#"{"Vehicle.Cabin.Door.Row1.IsOpen":false,"Vehicle.Speed":12.5,"Vehicle.VIN":"x\"y"}"#
                    .to_owned(),
            ),
        })),
    }
}

pub(crate) fn full_loc_frame() -> Frame {
    Frame {
        vehicle_id: "a.b:c-d_e".to_owned(),
        ts: -86_400_000_001,
        seq: i64::MAX as u64,
        received_at: NOW,
        body: Body::Location(Location {
            lat: -89.999_999_999_999_99,
            lon: 179.999_999_999_999_97,
            speed_kmh: Some(0.0),
            heading_deg: Some(359.999),
            alt_m: Some(-420.1),
            accuracy_m: Some(1e-7),
            satellites: Some(12),
            odometer_m: Some(0.1 + 0.2),
            ignition: Some(false),
        }),
    }
}

fn msg_with(payload: &[u8], ct: Option<&str>, origin: &Origin, rules: &Rules) -> Decoded {
    let payload = Bytes::copy_from_slice(payload);
    let msg = Message { payload: &payload, content_type: ct, origin, received_at: NOW };
    let d = decode_message(&msg, rules);
    assert_eq!(
        d.frames.len() + d.rejections.len(),
        d.received as usize,
        "every received frame is either accepted or rejected"
    );
    for f in &d.frames {
        assert_eq!(f.received_at, NOW);
    }
    for r in &d.rejections {
        assert_eq!(&r.origin, origin);
        assert_eq!(r.received_at, NOW);
    }
    d
}

fn http(payload: &str) -> Decoded {
    msg_with(payload.as_bytes(), None, &Origin::Http, &Rules::default())
}

fn mqtt(topic: &str, payload: &[u8]) -> Decoded {
    let origin = Origin::Mqtt { topic: topic.to_owned() };
    msg_with(payload, None, &origin, &Rules::default())
}

fn reasons(d: &Decoded) -> Vec<Reason> {
    d.rejections.iter().map(|r| r.reason).collect()
}

fn one_frame(d: Decoded) -> Frame {
    assert_eq!(d.rejections, vec![], "unexpected rejections");
    assert_eq!(d.frames.len(), 1);
    d.frames.into_iter().next().unwrap()
}

fn encode(frame: &Frame) -> String {
    let mut out = Vec::new();
    encode_json(frame, &mut out);
    String::from_utf8(out).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Contract examples and field forms

#[test]
fn the_contract_location_example_decodes_exactly() {
    assert_eq!(one_frame(http(LOC)), loc_frame());
}

#[test]
fn the_contract_diagnostic_example_decodes_exactly() {
    assert_eq!(one_frame(http(DIAG)), diag_frame());
}

#[test]
fn the_contract_example_block_of_two_multi_line_objects_decodes_as_two_frames() {
    let d = http(&format!("{LOC}\n{DIAG}\n"));
    assert_eq!(d.rejections, vec![]);
    assert_eq!(d.frames, vec![loc_frame(), diag_frame()]);
}

#[test]
fn rfc3339_with_an_offset_is_converted_to_utc() {
    let f = one_frame(http(
        r#"{"vehicle_id":"V1","ts":"2026-11-25T23:00:00.250+02:00","kind":"location","lat":1,"lon":2}"#,
    ));
    assert_eq!(f.ts, TS);
}

#[test]
fn rfc3339_without_a_fraction_is_accepted() {
    let f = one_frame(http(
        r#"{"vehicle_id":"V1","ts":"2026-11-25T21:00:00Z","kind":"location","lat":1,"lon":2}"#,
    ));
    assert_eq!(f.ts, TS - 250_000);
}

#[test]
fn an_integer_ts_is_epoch_milliseconds() {
    let f = one_frame(http(r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":1,"lon":2}"#));
    assert_eq!(f.ts, TS);
    let f = one_frame(http(r#"{"vehicle_id":"V1","ts":-1000,"kind":"location","lat":1,"lon":2}"#));
    assert_eq!(f.ts, -1_000_000);
}

#[test]
fn null_fields_are_absent() {
    let f = one_frame(http(
        r#"{"vehicle_id":"V1","ts":1795640400250,"seq":null,"kind":"location","lat":1,"lon":2,
            "speed_kmh":null,"heading_deg":null,"satellites":null,"ignition":null}"#,
    ));
    assert_eq!(f.seq, 0);
    assert_eq!(f.body, Body::Location(Location { lat: 1.0, lon: 2.0, ..Location::default() }));
    let f = one_frame(http(
        r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","engine_rpm":800,"dtcs":null,"signals":null,"mil_on":null}"#,
    ));
    assert_eq!(
        f.body,
        Body::Diagnostic(Box::new(Diagnostic { engine_rpm: Some(800.0), ..Diagnostic::default() }))
    );
    // With nothing but nulls, a diagnostic frame says nothing: empty_frame (CONTRACT.md §1).
    let d = http(
        r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","dtcs":null,"signals":null,"mil_on":null}"#,
    );
    assert_eq!(reasons(&d), vec![Reason::EmptyFrame]);
}

#[test]
fn an_explicit_empty_dtc_list_differs_from_an_absent_one() {
    let f = one_frame(http(r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","dtcs":[]}"#));
    let Body::Diagnostic(d) = f.body else { panic!("not a diagnostic") };
    assert_eq!(d.dtcs, Some(vec![]));
}

#[test]
fn a_missing_seq_is_zero() {
    let f = one_frame(http(r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":1,"lon":2}"#));
    assert_eq!(f.seq, 0);
}

#[test]
fn unknown_fields_are_ignored() {
    let f = one_frame(http(
        r#"{"future":{"nested":[1,{"x":null}]},"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":1,"lon":2,"v2":"x"}"#,
    ));
    assert_eq!(f.vehicle_id, "V1");
}

#[test]
fn signals_are_kept_as_canonical_json_text() {
    let f = one_frame(http(
        r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic",
            "signals":{ "Vehicle.Speed": 12.5, "Vehicle.Cabin.Door.Row1.IsOpen": false, "A": "\u0041" }}"#,
    ));
    let Body::Diagnostic(d) = f.body else { panic!("not a diagnostic") };
    assert_eq!(
        d.signals.as_deref(),
        Some(r#"{"A":"A","Vehicle.Cabin.Door.Row1.IsOpen":false,"Vehicle.Speed":12.5}"#)
    );
}

#[test]
fn escaped_strings_decode() {
    let f = one_frame(http(
        r#"{"vehicle_id":"V\u0031","ts":1795640400250,"kind":"diagnostic","dtcs":["P\u0030301"]}"#,
    ));
    assert_eq!(f.vehicle_id, "V1");
    let Body::Diagnostic(d) = f.body else { panic!("not a diagnostic") };
    assert_eq!(d.dtcs, Some(vec![Dtc::Obd("P0301".to_owned())]));
}

// ---------------------------------------------------------------------------------------------
// Splitting

#[test]
fn an_array_decodes_every_element() {
    let d = http(&format!("[{LOC},{DIAG}]"));
    assert_eq!(d.rejections, vec![]);
    assert_eq!(d.frames, vec![loc_frame(), diag_frame()]);
    assert_eq!(d.received, 2);
}

#[test]
fn an_empty_array_is_one_empty_frame_rejection() {
    let d = http(" [ ] ");
    assert_eq!((d.received, d.frames.len()), (1, 0));
    assert_eq!(reasons(&d), vec![Reason::EmptyFrame]);
}

#[test]
fn ndjson_decodes_one_frame_per_line() {
    let loc = LOC.replace('\n', "");
    let diag = DIAG.replace('\n', "");
    let payload = format!("{loc}\r\n\n{diag}\n");
    for ct in [Some("application/x-ndjson"), Some("application/json"), None] {
        let d = msg_with(payload.as_bytes(), ct, &Origin::Http, &Rules::default());
        assert_eq!(d.rejections, vec![], "{ct:?}");
        assert_eq!(d.frames, vec![loc_frame(), diag_frame()], "{ct:?}");
    }
}

#[test]
fn array_with_one_bad_element_rejects_only_that_element() {
    let bad = r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":91.5,"lon":2}"#;
    let d = http(&format!("[{LOC}, {bad} ,{DIAG}]"));
    assert_eq!(d.frames, vec![loc_frame(), diag_frame()]);
    assert_eq!(d.received, 3);
    let [r] = d.rejections.as_slice() else { panic!("{:?}", d.rejections) };
    assert_eq!(r.reason, Reason::OutOfRange);
    assert_eq!(r.index, Some(1));
    assert_eq!(r.raw, bad.as_bytes());
    assert_eq!(r.detail, "lat 91.5 outside -90..90");
}

#[test]
fn array_element_of_the_wrong_type_rejects_only_that_element() {
    let bad = r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":"north","lon":2}"#;
    let d = http(&format!("[{LOC},{bad},42,{DIAG}]"));
    assert_eq!(d.frames, vec![loc_frame(), diag_frame()]);
    assert_eq!(reasons(&d), vec![Reason::InvalidField, Reason::InvalidField]);
    assert_eq!(d.rejections[0].index, Some(1));
    assert_eq!(d.rejections[0].raw, bad.as_bytes());
    assert!(d.rejections[0].detail.contains("invalid type"), "{}", d.rejections[0].detail);
    assert_eq!(d.rejections[1].index, Some(2));
    assert_eq!(d.rejections[1].raw, &b"42"[..]);
}

#[test]
fn ndjson_with_one_bad_line_rejects_only_that_line() {
    let loc = LOC.replace('\n', "");
    let diag = DIAG.replace('\n', "");
    let d = http(&format!("{loc}\n{{\"vehicle_id\": \n{diag}\n"));
    assert_eq!(d.frames, vec![loc_frame(), diag_frame()]);
    let [r] = d.rejections.as_slice() else { panic!("{:?}", d.rejections) };
    assert_eq!((r.reason, r.index), (Reason::MalformedJson, Some(1)));
    assert_eq!(r.raw, &b"{\"vehicle_id\":"[..]);
}

#[test]
fn a_pretty_printed_object_is_one_frame() {
    let pretty = serde_json::to_string_pretty(&frame_to_value(&loc_frame())).unwrap();
    assert_eq!(one_frame(http(&pretty)), loc_frame());
}

#[test]
fn a_malformed_single_payload_is_one_rejection_without_index() {
    for payload in ["{\"vehicle_id\":", "{\n  \"vehicle_id\": \"V1\",\n  oops\n}", "[1, 2"] {
        let d = http(payload);
        assert_eq!(d.received, 1);
        let [r] = d.rejections.as_slice() else { panic!("{:?}", d.rejections) };
        assert_eq!((r.reason, r.index), (Reason::MalformedJson, None), "{payload}");
        assert_eq!(r.raw, payload.as_bytes());
    }
}

#[test]
fn a_malformed_value_in_a_sequence_rejects_it_and_the_rest() {
    let d = http(&format!("{LOC}\n{{\"x\":\n  }} {DIAG}"));
    assert_eq!(d.frames, vec![loc_frame()]);
    assert_eq!(reasons(&d), vec![Reason::MalformedJson]);
    assert_eq!(d.rejections[0].index, Some(1));
}

// ---------------------------------------------------------------------------------------------
// Rejection reasons

struct Case {
    name: &'static str,
    payload: Vec<u8>,
    content_type: Option<&'static str>,
    origin: Origin,
    rules: Rules,
    reason: Reason,
    index: Option<u32>,
}

fn case(name: &'static str, payload: &str, reason: Reason) -> Case {
    Case {
        name,
        payload: payload.as_bytes().to_vec(),
        content_type: None,
        origin: Origin::Http,
        rules: Rules::default(),
        reason,
        index: Some(0),
    }
}

fn on_topic(topic: &str) -> Origin {
    Origin::Mqtt { topic: topic.to_owned() }
}

#[test]
fn every_rejection_reason_is_reported() {
    let future = format!(
        r#"{{"vehicle_id":"V1","ts":{},"kind":"location","lat":1,"lon":2}}"#,
        (NOW + 24 * 3_600_000_000 + 1_000) / 1000
    );
    let mut truncated = encode_protobuf(&[loc_frame()]);
    truncated.pop();
    let cases = vec![
        Case { index: None, ..case("malformed json", r#"{"vehicle_id":"V1","#, Reason::MalformedJson) },
        case(
            "wrong field type",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":1,"lon":2,"satellites":-1}"#,
            Reason::InvalidField,
        ),
        Case {
            content_type: Some("application/json"),
            ..case("not an object", r#""hello""#, Reason::InvalidField)
        },
        Case { payload: truncated, index: None, ..case("truncated protobuf", "", Reason::MalformedProtobuf) },
        case(
            "no vehicle_id",
            r#"{"ts":1795640400250,"kind":"location","lat":1,"lon":2}"#,
            Reason::MissingField,
        ),
        case("no ts", r#"{"vehicle_id":"V1","kind":"location","lat":1,"lon":2}"#, Reason::MissingField),
        case(
            "no kind on http",
            r#"{"vehicle_id":"V1","ts":1795640400250,"lat":1,"lon":2}"#,
            Reason::MissingField,
        ),
        Case {
            origin: Origin::Kafka { topic: "vehicle-frames".to_owned(), partition: 0, offset: 7 },
            ..case(
                "no kind on kafka",
                r#"{"vehicle_id":"V1","ts":1795640400250,"lat":1,"lon":2}"#,
                Reason::MissingField,
            )
        },
        Case {
            origin: on_topic("vehicles/V1/frames"),
            ..case(
                "no kind on the frames topic",
                r#"{"vehicle_id":"V1","ts":1795640400250,"lat":1,"lon":2}"#,
                Reason::MissingField,
            )
        },
        case(
            "no lon",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":1}"#,
            Reason::MissingField,
        ),
        case(
            "bad vehicle id",
            r#"{"vehicle_id":"V 1","ts":1795640400250,"kind":"location","lat":1,"lon":2}"#,
            Reason::InvalidVehicleId,
        ),
        case(
            "unknown kind",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"speed","lat":1,"lon":2}"#,
            Reason::InvalidKind,
        ),
        Case {
            origin: on_topic("vehicles/V1/location"),
            ..case(
                "kind disagrees with topic",
                r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic"}"#,
                Reason::InvalidKind,
            )
        },
        case(
            "heading out of range",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":1,"lon":2,"heading_deg":360}"#,
            Reason::OutOfRange,
        ),
        case(
            "seq beyond i64",
            r#"{"vehicle_id":"V1","ts":1795640400250,"seq":9223372036854775808,"kind":"location","lat":1,"lon":2}"#,
            Reason::OutOfRange,
        ),
        case(
            "fuel over 100",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","fuel_level_pct":100.5}"#,
            Reason::OutOfRange,
        ),
        case(
            "no fix",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":0,"lon":0.0}"#,
            Reason::NoFix,
        ),
        case(
            "bad obd code",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","dtcs":["P0301","P4301"]}"#,
            Reason::InvalidDtc,
        ),
        case(
            "j1939 fmi out of range",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","dtcs":[{"spn":1,"fmi":32,"oc":0,"sa":0}]}"#,
            Reason::InvalidDtc,
        ),
        case(
            "j1939 member missing",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","dtcs":[{"spn":1,"fmi":3}]}"#,
            Reason::InvalidDtc,
        ),
        case(
            "dtc of the wrong type",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","dtcs":[301]}"#,
            Reason::InvalidDtc,
        ),
        case(
            "nested signal",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","signals":{"a":1,"b":{"c":2}}}"#,
            Reason::InvalidSignals,
        ),
        case(
            "signals not an object",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","signals":[1]}"#,
            Reason::InvalidSignals,
        ),
        case(
            "unparseable ts",
            r#"{"vehicle_id":"V1","ts":"2026-11-25 nine","kind":"location","lat":1,"lon":2}"#,
            Reason::InvalidTs,
        ),
        case(
            "fractional epoch ts",
            r#"{"vehicle_id":"V1","ts":1795640400250.5,"kind":"location","lat":1,"lon":2}"#,
            Reason::InvalidTs,
        ),
        case(
            "ts beyond year 9999",
            r#"{"vehicle_id":"V1","ts":9223372036854775,"kind":"location","lat":1,"lon":2}"#,
            Reason::InvalidTs,
        ),
        case(
            "ts overflowing micros",
            r#"{"vehicle_id":"V1","ts":18446744073709551615,"kind":"location","lat":1,"lon":2}"#,
            Reason::InvalidTs,
        ),
        case("future ts", &future, Reason::FutureTs),
        Case {
            rules: Rules { min_ts: Some(TS + 1), ..Rules::default() },
            ..case(
                "ts before the lower bound",
                r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":1,"lon":2}"#,
                Reason::PastTs,
            )
        },
        Case {
            origin: on_topic("vehicles/V2/location"),
            ..case("spoofed vehicle", LOC, Reason::SpoofedVehicle)
        },
        Case {
            rules: Rules { max_payload_bytes: 10, ..Rules::default() },
            index: None,
            ..case("oversized", LOC, Reason::Oversized)
        },
        Case { origin: on_topic("vehicles/V1/speed"), ..case("invalid topic", LOC, Reason::InvalidTopic) },
        Case {
            content_type: Some("application/xml"),
            index: None,
            ..case("unsupported content type", LOC, Reason::UnsupportedContentType)
        },
        Case { index: None, ..case("empty payload", "", Reason::EmptyFrame) },
        Case { index: None, ..case("blank payload", " \n\t ", Reason::EmptyFrame) },
        Case { index: None, ..case("an empty array", "[]", Reason::EmptyFrame) },
        Case {
            origin: on_topic("vehicles/V1/diagnostic"),
            ..case(
                "a location payload on the diagnostic topic",
                r#"{"vehicle_id":"V1","ts":1795640400250,"lat":56.1,"lon":10.2}"#,
                Reason::EmptyFrame,
            )
        },
        case(
            "a diagnostic frame with no diagnostic field",
            r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic"}"#,
            Reason::EmptyFrame,
        ),
        Case {
            rules: Rules { max_frames_per_message: 0, ..Rules::default() },
            ..case("too many frames", LOC, Reason::TooManyFrames)
        },
    ];
    let mut seen = std::collections::HashSet::new();
    for c in cases {
        let d = msg_with(&c.payload, c.content_type, &c.origin, &c.rules);
        assert_eq!(d.frames, vec![], "{}", c.name);
        assert_eq!(d.received, 1, "{}", c.name);
        let [r] = d.rejections.as_slice() else { panic!("{}: {:?}", c.name, d.rejections) };
        assert_eq!((r.reason, r.index), (c.reason, c.index), "{}: {}", c.name, r.detail);
        assert!(!r.detail.is_empty());
        if c.index.is_none() || !matches!(c.payload.first(), Some(b'{')) {
            assert_eq!(r.raw, c.payload, "{}", c.name);
        }
        seen.insert(r.reason);
    }
    let all: std::collections::HashSet<_> = (0..)
        .map_while(|i| {
            [
                "malformed_json",
                "invalid_field",
                "malformed_protobuf",
                "missing_field",
                "invalid_vehicle_id",
                "invalid_kind",
                "out_of_range",
                "no_fix",
                "invalid_dtc",
                "invalid_signals",
                "invalid_ts",
                "future_ts",
                "past_ts",
                "spoofed_vehicle",
                "oversized",
                "invalid_topic",
                "unsupported_content_type",
                "empty_frame",
                "too_many_frames",
            ]
            .get(i)
            .and_then(|c| Reason::from_code(c))
        })
        .collect();
    assert_eq!(seen, all);
}

#[test]
fn an_invalid_topic_rejects_every_frame_of_the_message() {
    let d = mqtt("cars/V1/location", format!("[{LOC},{DIAG}]").as_bytes());
    assert_eq!(d.frames, vec![]);
    assert_eq!(reasons(&d), vec![Reason::InvalidTopic; 2]);
    assert_eq!(d.rejections[1].index, Some(1));
}

// ---------------------------------------------------------------------------------------------
// MQTT topic rules

#[test]
fn the_topic_gives_the_kind_when_the_payload_has_none() {
    let payload = r#"{"vehicle_id":"WVWZZZ1JZXW000001","ts":"2026-11-25T21:00:00.250Z","seq":1017,
        "lat":56.102139,"lon":10.213695,"speed_kmh":33.8,"heading_deg":273.0,"alt_m":38.5,"accuracy_m":3.2}"#;
    let f = one_frame(mqtt("vehicles/WVWZZZ1JZXW000001/location", payload.as_bytes()));
    assert_eq!(f, loc_frame());
}

#[test]
fn a_payload_kind_agreeing_with_the_topic_is_accepted() {
    let f = one_frame(mqtt("vehicles/WVWZZZ1JZXW000001/diagnostic", DIAG.as_bytes()));
    assert_eq!(f, diag_frame());
}

#[test]
fn a_payload_kind_disagreeing_with_the_topic_is_rejected() {
    let d = mqtt("vehicles/WVWZZZ1JZXW000001/diagnostic", LOC.as_bytes());
    assert_eq!(reasons(&d), vec![Reason::InvalidKind]);
    assert_eq!(d.rejections[0].detail, "kind location disagrees with the topic's diagnostic");
}

#[test]
fn a_frame_claiming_another_vehicle_is_rejected_as_spoofed() {
    let d = mqtt(
        "vehicles/WVWZZZ1JZXW000001/frames",
        format!("[{LOC},{}]", LOC.replace("WVWZZZ1JZXW000001", "WVWZZZ1JZXW000002")).as_bytes(),
    );
    assert_eq!(d.frames, vec![loc_frame()]);
    assert_eq!(reasons(&d), vec![Reason::SpoofedVehicle]);
    assert_eq!(d.rejections[0].index, Some(1));
}

#[test]
fn the_frames_topic_takes_mixed_batches() {
    let d = mqtt("vehicles/WVWZZZ1JZXW000001/frames", format!("[{LOC},{DIAG}]").as_bytes());
    assert_eq!(d.frames, vec![loc_frame(), diag_frame()]);
}

// ---------------------------------------------------------------------------------------------
// Protobuf

fn pb_decode(payload: &[u8], origin: &Origin) -> Decoded {
    msg_with(payload, Some("application/x-protobuf"), origin, &Rules::default())
}

#[test]
fn protobuf_round_trip_equals_the_json_decode_of_the_same_frames() {
    let from_json = http(&format!("[{LOC},{DIAG}]")).frames;
    let mut frames = from_json.clone();
    frames.push(full_diag_frame());
    frames.push(full_loc_frame());
    let payload = encode_protobuf(&frames);
    let d = pb_decode(&payload, &Origin::Http);
    assert_eq!(d.rejections, vec![]);
    assert_eq!(d.frames, frames);
    assert_eq!(&d.frames[..2], &from_json[..]);
    // Sniffed too.
    let d = msg_with(&payload, None, &Origin::Http, &Rules::default());
    assert_eq!(d.frames, frames);
}

#[test]
fn protobuf_keeps_absent_and_empty_dtc_lists_apart() {
    for dtcs in [None, Some(vec![])] {
        let mut f = diag_frame();
        if let Body::Diagnostic(d) = &mut f.body {
            d.dtcs = dtcs;
        }
        let frames = vec![f];
        assert_eq!(pb_decode(&encode_protobuf(&frames), &Origin::Http).frames, frames);
    }
}

#[test]
fn truncated_protobuf_is_malformed_protobuf() {
    let payload = encode_protobuf(&[loc_frame(), diag_frame()]);
    let cut = payload.get(..payload.len() - 3).unwrap();
    let d = pb_decode(cut, &Origin::Http);
    assert_eq!(d.received, 1);
    let [r] = d.rejections.as_slice() else { panic!("{:?}", d.rejections) };
    assert_eq!((r.reason, r.index), (Reason::MalformedProtobuf, None));
    assert_eq!(r.raw, cut);
}

#[test]
fn a_bad_protobuf_frame_is_rejected_with_its_own_reencoded_bytes() {
    let mut bad = loc_frame();
    if let Body::Location(l) = &mut bad.body {
        l.lat = f64::NAN;
    }
    let d = pb_decode(&encode_protobuf(&[loc_frame(), bad.clone()]), &Origin::Http);
    assert_eq!(d.frames, vec![loc_frame()]);
    let [r] = d.rejections.as_slice() else { panic!("{:?}", d.rejections) };
    assert_eq!((r.reason, r.index), (Reason::OutOfRange, Some(1)));
    let raw = proto::pb::Frame::decode(r.raw.clone()).unwrap();
    assert_eq!(raw.encode_to_vec(), frame_to_pb(&bad).encode_to_vec());
}

#[test]
fn protobuf_frames_follow_the_same_kind_rules() {
    let mut pb = frame_to_pb(&loc_frame());
    pb.kind = proto::pb::Kind::Unspecified as i32;
    let batch = proto::pb::FrameBatch { frames: vec![pb.clone()] }.encode_to_vec();
    assert_eq!(reasons(&pb_decode(&batch, &Origin::Http)), vec![Reason::MissingField]);
    let topic = on_topic("vehicles/WVWZZZ1JZXW000001/location");
    assert_eq!(pb_decode(&batch, &topic).frames, vec![loc_frame()]);
    let topic = on_topic("vehicles/WVWZZZ1JZXW000001/diagnostic");
    assert_eq!(reasons(&pb_decode(&batch, &topic)), vec![Reason::InvalidKind]);

    let mut wrong_body = pb.clone();
    wrong_body.kind = proto::pb::Kind::Diagnostic as i32;
    let mut unknown_kind = pb.clone();
    unknown_kind.kind = 9;
    let mut no_ts = pb.clone();
    no_ts.ts_us = 0;
    let mut bad_signals = frame_to_pb(&diag_frame());
    if let Some(proto::pb::frame::Body::Diagnostic(d)) = &mut bad_signals.body {
        d.signals_json = Some("{\"a\":null}".to_owned());
    }
    let batch =
        proto::pb::FrameBatch { frames: vec![wrong_body, unknown_kind, no_ts, bad_signals] }.encode_to_vec();
    assert_eq!(
        reasons(&pb_decode(&batch, &Origin::Http)),
        vec![Reason::InvalidKind, Reason::InvalidKind, Reason::MissingField, Reason::InvalidSignals]
    );
}

#[test]
fn a_protobuf_batch_that_starts_like_json_after_a_newline_is_still_protobuf() {
    // A batch whose first frame is 91 or 123 bytes long starts with "\n[" or "\n{".
    let mut hits = 0;
    for n in 1..=64 {
        let mut f = loc_frame();
        f.vehicle_id = "V".repeat(n);
        let len = frame_to_pb(&f).encoded_len();
        if len == 91 || len == 123 {
            hits += 1;
            let payload = encode_protobuf(std::slice::from_ref(&f));
            assert!(matches!(payload.get(..2), Some(b"\n[" | b"\n{")));
            assert_eq!(sniff(None, &payload), Ok(Encoding::Protobuf));
            let d = msg_with(&payload, None, &Origin::Http, &Rules::default());
            assert_eq!(d.frames, vec![f]);
        }
    }
    assert!(hits > 0, "no vehicle id length gave an ambiguous first byte");
}

// ---------------------------------------------------------------------------------------------
// Sniffing

#[test]
fn the_content_type_decides_when_given() {
    let s = |ct, p: &[u8]| sniff(Some(ct), p);
    assert_eq!(s("application/json; charset=utf-8", b"\x0a\x01"), Ok(Encoding::Json));
    assert_eq!(s("Application/X-NDJSON", b"{}"), Ok(Encoding::Ndjson));
    assert_eq!(s("application/x-protobuf", b"{}"), Ok(Encoding::Protobuf));
    assert_eq!(s("application/octet-stream", b"[]"), Ok(Encoding::Json));
    assert_eq!(s("", b"\x0a\x00"), Ok(Encoding::Protobuf));
    assert!(s("application/xml", b"{}").is_err());
}

#[test]
fn without_a_content_type_the_first_byte_decides() {
    assert_eq!(sniff(None, b"{}"), Ok(Encoding::Json));
    assert_eq!(sniff(None, b" \n [{}]"), Ok(Encoding::Json));
    assert_eq!(sniff(None, b"\x0a\x00"), Ok(Encoding::Protobuf));
    assert_eq!(sniff(None, b""), Ok(Encoding::Protobuf));
}

#[test]
fn json_with_leading_whitespace_is_json() {
    let d = http(&format!("\n  {LOC}"));
    assert_eq!(d.frames, vec![loc_frame()]);
}

#[test]
fn an_empty_payload_is_one_empty_frame_rejection() {
    for payload in ["", "\n", "  \r\n "] {
        let d = http(payload);
        assert_eq!((d.received, d.frames.len()), (1, 0));
        assert_eq!(reasons(&d), vec![Reason::EmptyFrame], "{payload:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

#[test]
fn encode_json_writes_the_normalised_contract_form() {
    assert_eq!(
        encode(&loc_frame()),
        r#"{"vehicle_id":"WVWZZZ1JZXW000001","ts":"2026-11-25T21:00:00.250Z","seq":1017,"kind":"location","lat":56.102139,"lon":10.213695,"speed_kmh":33.8,"heading_deg":273.0,"alt_m":38.5,"accuracy_m":3.2,"received_at":"2026-11-25T22:00:00.250Z"}"#
    );
    assert_eq!(
        encode(&diag_frame()),
        r#"{"vehicle_id":"WVWZZZ1JZXW000001","ts":"2026-11-25T21:00:00.250Z","seq":1018,"kind":"diagnostic","engine_rpm":2150.0,"coolant_temp_c":88.0,"fuel_level_pct":61.5,"dtcs":["P0301",{"spn":110,"fmi":0,"oc":3,"sa":0}],"received_at":"2026-11-25T22:00:00.250Z"}"#
    );
}

#[test]
fn encode_json_then_decode_gives_the_same_frame() {
    for f in [loc_frame(), diag_frame(), full_diag_frame(), full_loc_frame()] {
        let json = encode(&f);
        assert_eq!(one_frame(http(&json)), f, "{json}");
    }
}

#[test]
fn frame_to_value_has_the_same_content_as_encode_json() {
    for f in [loc_frame(), diag_frame(), full_diag_frame(), full_loc_frame()] {
        let parsed: serde_json::Value = serde_json::from_str(&encode(&f)).unwrap();
        assert_eq!(frame_to_value(&f), parsed);
    }
}

#[test]
fn encode_json_stays_valid_json_for_hand_built_frames() {
    let mut f = full_diag_frame();
    f.vehicle_id = "a\"b\\c\n\u{1}é".to_owned();
    if let Body::Diagnostic(d) = &mut f.body {
        d.engine_rpm = Some(f64::NAN);
        d.signals = Some("{not json".to_owned());
    }
    let json = encode(&f);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["vehicle_id"], "a\"b\\c\n\u{1}é");
    assert_eq!(v["engine_rpm"], serde_json::Value::Null);
    assert!(v.get("signals").is_none());
}

// ---------------------------------------------------------------------------------------------
// Robustness

fn all_ways(payload: &[u8]) {
    let rules = Rules::default();
    for ct in [None, Some("application/json"), Some("application/x-ndjson"), Some("application/x-protobuf")] {
        for origin in [
            Origin::Http,
            on_topic("vehicles/WVWZZZ1JZXW000001/location"),
            on_topic("vehicles/WVWZZZ1JZXW000001/frames"),
        ] {
            msg_with(payload, ct, &origin, &rules);
        }
    }
}

#[test]
fn every_prefix_of_a_valid_payload_decodes_without_panic() {
    let json = format!("[{LOC},{DIAG},{}]", encode(&full_diag_frame()));
    let ndjson = format!("{}\n{}\n", encode(&loc_frame()), encode(&full_diag_frame()));
    let pb = encode_protobuf(&[loc_frame(), full_diag_frame(), full_loc_frame()]);
    for payload in [json.as_bytes(), ndjson.as_bytes(), LOC.as_bytes(), &pb[..]] {
        for n in 0..=payload.len() {
            all_ways(payload.get(..n).unwrap());
        }
    }
}

#[test]
fn random_byte_mutations_decode_without_panic() {
    let json = format!("[{LOC},{DIAG},{}]", encode(&full_diag_frame()));
    let pb = encode_protobuf(&[loc_frame(), full_diag_frame()]);
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for base in [json.into_bytes(), pb] {
        for _ in 0..400 {
            let mut p = base.clone();
            for _ in 0..=(next() % 4) {
                let i = (next() % p.len() as u64) as usize;
                p[i] = next() as u8;
            }
            all_ways(&p);
        }
    }
}

#[test]
fn deeply_nested_input_is_rejected_without_overflowing_the_stack() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let d = http(&deep);
    assert_eq!(d.frames, vec![]);
    assert_eq!(d.rejections.len(), 1);
    let deep = format!(r#"{{"x":{}1{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(http(&deep).frames, vec![]);
}

#[test]
fn frames_past_the_per_message_limit_are_one_rejection_and_decoding_stops() {
    let rules = Rules { max_frames_per_message: 3, ..Rules::default() };
    let one = r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"location","lat":1,"lon":2}"#;
    let array = format!("[{}]", [one; 10].join(","));
    let ndjson = [one; 10].join("\n");
    let bad_array = format!("[{}]", ["{}"; 10].join(","));
    for (name, payload) in [("array", array), ("ndjson", ndjson), ("array of bad frames", bad_array)] {
        let d = msg_with(payload.as_bytes(), None, &Origin::Http, &rules);
        assert_eq!(d.received, 4, "{name}: three frames and the excess");
        let last = d.rejections.last().unwrap();
        assert_eq!((last.reason, last.index), (Reason::TooManyFrames, Some(3)), "{name}");
        assert!(last.raw.is_empty(), "{name}: the excess is not copied");
    }
    let frames: Vec<Frame> = (0..10).map(|i| Frame { seq: i, ..loc_frame() }).collect();
    let proto = encode_protobuf(&frames);
    let d = msg_with(&proto, Some("application/x-protobuf"), &Origin::Http, &rules);
    assert_eq!((d.frames.len(), d.rejections.len()), (3, 1));
}

#[test]
fn a_diagnostic_frame_with_only_an_empty_dtc_list_or_mil_is_not_empty() {
    for payload in [
        r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","dtcs":[]}"#,
        r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","mil_on":false}"#,
        r#"{"vehicle_id":"V1","ts":1795640400250,"kind":"diagnostic","signals":{"Vehicle.Speed":1}}"#,
    ] {
        let d = msg_with(payload.as_bytes(), None, &Origin::Http, &Rules::default());
        assert_eq!((d.frames.len(), d.rejections.len()), (1, 0), "{payload}: {:?}", d.rejections);
    }
}

#[test]
fn text_that_is_not_json_is_malformed_json_not_a_protobuf_error() {
    let origin = Origin::Mqtt { topic: "vehicles/V1/location".into() };
    for text in ["hello", "lat=56.1 lon=10.2", "\"quoted\"", "56.1,10.2\n"] {
        let d = msg_with(text.as_bytes(), None, &origin, &Rules::default());
        let [r] = d.rejections.as_slice() else { panic!("{text}: {:?}", d.rejections) };
        assert_eq!(r.reason, Reason::MalformedJson, "{text}");
        assert!(
            r.detail.starts_with("not JSON (a frame starts with { or [) and not Protobuf"),
            "{}",
            r.detail
        );
        assert_eq!(r.raw, text.as_bytes());
    }
    // Binary that is no FrameBatch stays a Protobuf error.
    let d = msg_with(&[0xFF, 0x00, 0x13], None, &origin, &Rules::default());
    assert_eq!(d.rejections[0].reason, Reason::MalformedProtobuf);
}

#[test]
fn a_payload_that_is_not_utf8_rejects_only_the_frame_holding_the_bad_bytes() {
    // Valid UTF-8 is read as text (checked once); anything else by the byte reader, which
    // refuses the bad string where it is.
    let good =
        r#"{"vehicle_id":"V1","kind":"location","ts":1795640400250,"lat":1,"lon":2,"note":"Århus \u00e6"}"#;
    let bad = b"{\"vehicle_id\":\"V\xff2\",\"kind\":\"location\",\"ts\":1795640400250,\"lat\":1,\"lon\":2}";
    let mut ndjson = format!("{good}\n").into_bytes();
    ndjson.extend_from_slice(bad);
    ndjson.extend_from_slice(format!("\n{good}\n").as_bytes());
    let d = msg_with(&ndjson, None, &Origin::Http, &Rules::default());
    assert_eq!(d.frames.len(), 2, "{:?}", d.rejections);
    assert!(d.frames.iter().all(|f| f.vehicle_id == "V1"));
    assert_eq!(reasons(&d), vec![Reason::MalformedJson]);
    assert_eq!(d.rejections[0].index, Some(1));
    assert_eq!(&d.rejections[0].raw[..], &bad[..]);
    assert!(d.rejections[0].detail.contains("unicode"), "{}", d.rejections[0].detail);

    let one = msg_with(bad, None, &Origin::Http, &Rules::default());
    assert_eq!((one.frames.len(), reasons(&one)), (0, vec![Reason::MalformedJson]));
    assert_eq!(one_frame(http(good)).vehicle_id, "V1");
}

#[test]
fn messages_decoded_into_one_decoded_give_what_each_gives_alone_in_order() {
    let rules = Rules::default();
    let two = format!("{LOC}\n{DIAG}");
    let payloads: [&[u8]; 4] = [LOC.as_bytes(), b"[]", two.as_bytes(), b"{\"vehicle_id\":"];
    let origin = Origin::Mqtt { topic: format!("vehicles/{VIN}/frames") };
    let messages: Vec<Bytes> = payloads.iter().map(|p| Bytes::copy_from_slice(p)).collect();
    let mut together = Decoded::default();
    let mut alone = Decoded::default();
    for payload in &messages {
        let msg = Message { payload, content_type: None, origin: &origin, received_at: NOW };
        decode_message_into(&msg, &rules, &mut together);
        let d = decode_message(&msg, &rules);
        alone.received += d.received;
        alone.frames.extend(d.frames);
        alone.rejections.extend(d.rejections);
    }
    assert_eq!(together, alone);
    // The empty array is still its own `empty_frame`, though frames came before it.
    assert_eq!((together.received, together.frames.len()), (5, 3));
    assert_eq!(reasons(&together), vec![Reason::EmptyFrame, Reason::MalformedJson]);
}
