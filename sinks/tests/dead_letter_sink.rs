#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetpipe_pipeline::Sink;
use fleetpipe_processors::Batch;
use fleetpipe_processors::{Lsn, Micros, Origin, Reason, Rejection};
use fleetpipe_sinks::dead_letter::{self, base64, read_dead_letters, DeadLetterConfig, DeadLetterSink};
use serde_json::json;

/// 2026-11-25T21:00:00.250Z in microseconds.
const T: Micros = 1_795_640_400_250_000;
const HOUR: Micros = 3_600_000_000;

fn rejection(reason: Reason, index: Option<u32>, raw: &[u8], origin: Origin, at: Micros) -> Rejection {
    Rejection {
        reason,
        detail: format!("detail of {}", reason.code()),
        index,
        raw: Bytes::copy_from_slice(raw),
        origin,
        received_at: at,
    }
}

fn batch(lsn: Lsn, rejections: Vec<Rejection>) -> Batch {
    Batch { lsn, rejections, ..Batch::default() }
}

fn open(root: &Path) -> DeadLetterSink {
    dead_letter::open(&DeadLetterConfig { roll_secs: 3600.0, ..DeadLetterConfig::default() }, root).unwrap()
}

fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

fn decode_base64(s: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = alphabet.iter().position(|a| *a == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}

#[test]
fn rejections_round_trip_with_reason_source_and_raw_bytes_including_non_utf8_as_base64() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("dead-letter");
    let mut sink = open(&root);
    assert_eq!(sink.name(), "dead_letter");
    let binary = [0xff, 0xfe, 0x00, b'a', 0x80];
    sink.write(&batch(
        4,
        vec![
            rejection(
                Reason::OutOfRange,
                Some(2),
                br#"{"vehicle_id":"V1","lat":91,"note":"caf\u00e9 \u00fc"}"#,
                Origin::Mqtt { topic: "vehicles/V1/location".into() },
                T,
            ),
            rejection(Reason::MalformedProtobuf, None, &binary, Origin::Http, T + 1),
        ],
    ))
    .unwrap();
    sink.write(&batch(
        6,
        vec![rejection(
            Reason::MalformedJson,
            None,
            "{\"ünïcödé\": ".as_bytes(),
            Origin::Kafka { topic: "vehicle-frames".into(), partition: 3, offset: 1_234_567_890_123 },
            T + 3 * HOUR, // 2026-11-26T00:00:00.250Z: next date
        )],
    ))
    .unwrap();
    assert_eq!(read_dead_letters(&root).unwrap(), Vec::<serde_json::Value>::new());
    sink.flush().unwrap();
    assert_eq!(sink.durable_lsn(), 6);

    assert_eq!(
        files(&root),
        vec![
            "_fleetpipe/checkpoint.json",
            "date=2026-11-25/part-0000000001-0000.ndjson",
            "date=2026-11-26/part-0000000001-0000.ndjson",
        ]
    );
    let lines = read_dead_letters(&root).unwrap();
    assert_eq!(
        lines,
        vec![
            json!({
                "reason": "out_of_range",
                "detail": "detail of out_of_range",
                "index": 2,
                "source": "mqtt",
                "topic": "vehicles/V1/location",
                "received_at": "2026-11-25T21:00:00.250Z",
                "raw": r#"{"vehicle_id":"V1","lat":91,"note":"caf\u00e9 \u00fc"}"#,
            }),
            json!({
                "reason": "malformed_protobuf",
                "detail": "detail of malformed_protobuf",
                "index": null,
                "source": "http",
                "topic": null,
                "received_at": "2026-11-25T21:00:00.250Z",
                "raw_base64": "//4AYYA=",
            }),
            json!({
                "reason": "malformed_json",
                "detail": "detail of malformed_json",
                "index": null,
                "source": "kafka",
                "topic": "vehicle-frames",
                "partition": 3,
                "offset": 1_234_567_890_123_i64,
                "received_at": "2026-11-26T00:00:00.250Z",
                "raw": "{\"ünïcödé\": ",
            }),
        ]
    );
    assert_eq!(decode_base64(lines[1]["raw_base64"].as_str().unwrap()), binary.to_vec());
    // One JSON object per line, nothing else.
    let text = fs::read_to_string(root.join("date=2026-11-25/part-0000000001-0000.ndjson")).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.ends_with('\n'));
}

#[test]
fn base64_matches_rfc_4648_test_vectors() {
    for (input, output) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(input.as_bytes()), output);
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(decode_base64(&base64(&all)), all);
}

#[test]
fn a_crash_before_the_roll_loses_only_uncommitted_lines_and_leaves_no_tmp_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("dead-letter");
    let later = Instant::now() + Duration::from_secs(7200);
    {
        let mut sink = open(&root);
        sink.write(&batch(1, vec![rejection(Reason::NoFix, Some(0), b"{}", Origin::Http, T)])).unwrap();
        sink.tick(later).unwrap();
        assert_eq!(sink.durable_lsn(), 1);
        sink.write(&batch(2, vec![rejection(Reason::FutureTs, Some(0), b"[]", Origin::Http, T)])).unwrap();
        assert_eq!(sink.open_files(), 1);
        // kill -9
    }
    let mut sink = open(&root);
    assert_eq!(sink.durable_lsn(), 1);
    assert_eq!(sink.recovery().removed_tmp, 1);
    assert_eq!(
        files(&root),
        vec!["_fleetpipe/checkpoint.json", "date=2026-11-25/part-0000000001-0000.ndjson",]
    );
    let lines = read_dead_letters(&root).unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["reason"], "no_fix");

    // The log replays from lsn 2 (the driver never hands a sink lsn 1 again: see
    // pipeline/tests/driver.rs).
    sink.write(&batch(2, vec![rejection(Reason::FutureTs, Some(0), b"[]", Origin::Http, T)])).unwrap();
    sink.flush().unwrap();
    let reasons: Vec<String> =
        read_dead_letters(&root).unwrap().iter().map(|l| l["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(reasons, vec!["no_fix", "future_ts"]);
}

#[test]
fn a_renamed_file_without_its_checkpoint_is_neither_read_nor_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("dead-letter");
    {
        let mut sink = open(&root);
        sink.write(&batch(1, vec![rejection(Reason::NoFix, Some(0), b"{}", Origin::Http, T)])).unwrap();
        sink.flush().unwrap();
    }
    let extra = root.join("date=2026-11-25/part-0000000002-0000.ndjson");
    fs::write(&extra, "{\"reason\":\"ghost\"}\n").unwrap();
    assert_eq!(read_dead_letters(&root).unwrap().len(), 1);
    let sink = open(&root);
    assert_eq!(sink.recovery().removed_uncommitted, 1);
    assert!(!extra.exists());
}

#[test]
fn batches_without_rejections_keep_the_dead_letter_sink_current() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("dead-letter");
    let mut sink = open(&root);
    sink.write(&batch(10, vec![])).unwrap();
    assert_eq!(sink.durable_lsn(), 10);
    sink.flush().unwrap();
    drop(sink);
    let sink = open(&root);
    assert_eq!(sink.durable_lsn(), 10);
    assert_eq!(files(&root), vec!["_fleetpipe/checkpoint.json"]);
}
