//! One stream mixing good frames with every kind of bad input: the good frames are stored, the
//! bad ones are in the dead-letter store with the right reasons, the counters agree, and the
//! pipeline keeps running. (Its own test binary: it asserts on the process-wide counters.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_frames_are_stored_and_every_bad_input_is_dead_lettered_with_its_reason() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(broker.url()));
    cfg.validate.max_payload_bytes = 4096;
    let running = start(cfg).await;
    let v = "VAN-1";
    let good = |seq: u64| json!({"vehicle_id": v, "ts": "2026-11-25T21:00:00Z", "seq": seq, "lat": 56.1, "lon": 10.2});
    let t = |kind: &str| format!("vehicles/{v}/{kind}");

    let mut p = Publisher::connect(broker.port).await;
    p.publish(&t("location"), serde_json::to_vec(&good(1)).unwrap()).await;
    p.publish(&t("location"), b"{\"vehicle_id\": \"VAN-1\", \"ts\": ".to_vec()).await; // malformed_json
    p.publish(
        &t("location"),
        br#"{"vehicle_id":"VAN-1","ts":"2026-11-25T21:00:00Z","lat":"north","lon":10.2}"#.to_vec(),
    )
    .await; // invalid_field
    p.publish(
        &t("location"),
        br#"{"vehicle_id":"VAN-1","ts":"2026-11-25T21:00:00Z","seq":3,"lat":91.5,"lon":10.2}"#.to_vec(),
    )
    .await; // out_of_range
    p.publish(
        &t("diagnostic"),
        br#"{"vehicle_id":"VAN-1","ts":"2026-11-25T21:00:00Z","seq":4,"dtcs":["X0301"]}"#.to_vec(),
    )
    .await; // invalid_dtc
    p.publish(
        &t("location"),
        br#"{"vehicle_id":"CAR-2","ts":"2026-11-25T21:00:00Z","seq":5,"lat":56.1,"lon":10.2}"#.to_vec(),
    )
    .await; // spoofed_vehicle
    let mut big = good(6);
    big["pad"] = json!("x".repeat(5000));
    p.publish(&t("location"), serde_json::to_vec(&big).unwrap()).await; // oversized
    let proto = fleetpipe_processors::codec::encode_protobuf(&[fleetpipe_processors::Frame {
        vehicle_id: v.into(),
        ts: 1_795_640_400_000_000,
        seq: 7,
        received_at: 0,
        body: fleetpipe_processors::Body::Location(fleetpipe_processors::Location {
            lat: 56.1,
            lon: 10.2,
            ..Default::default()
        }),
    }]);
    p.publish(&t("frames"), proto[..proto.len() - 3].to_vec()).await; // malformed_protobuf (truncated)
    p.publish(&t("location"), serde_json::to_vec(&good(8)).unwrap()).await;
    p.all_acked().await;

    // The same over HTTP, in one array: per-frame rejections with their index.
    let batch = json!([
        {"vehicle_id": v, "ts": "2026-11-25T21:00:00Z", "seq": 9, "kind": "location", "lat": 56.1, "lon": 10.2},
        {"vehicle_id": v, "ts": "2026-11-25T21:00:00Z", "seq": 10, "kind": "location", "lat": 0, "lon": 0},
        {"vehicle_id": v, "ts": "2026-11-25T21:00:00Z", "seq": 11, "kind": "location", "lat": -100, "lon": 10.2},
        {"vehicle_id": v, "ts": "2026-11-25T21:00:00Z", "seq": 12, "kind": "location", "lat": 56.1, "lon": 10.2, "speed_kmh": "fast"},
        {"vehicle_id": v, "ts": "2026-11-25T21:00:00Z", "seq": 13, "lat": 56.1, "lon": 10.2},
        {"vehicle_id": v, "ts": "2999-01-01T00:00:00Z", "seq": 14, "kind": "location", "lat": 56.1, "lon": 10.2},
        {"vehicle_id": v, "ts": "2026-11-25T21:00:00Z", "seq": 15, "kind": "location", "lat": 56.1, "lon": 10.3}
    ]);
    let (status, resp) =
        http_post(running.http_addr, serde_json::to_vec(&batch).unwrap(), "application/json").await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["accepted"], 2);
    let reasons: Vec<(u64, String)> = resp["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["reason"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (1, "no_fix".into()),
            (2, "out_of_range".into()),
            (3, "invalid_field".into()),
            (4, "missing_field".into()),
            (5, "future_ts".into())
        ]
    );
    // An unreadable body is a 400, and still kept.
    let (status, resp) = http_post(running.http_addr, b"not json at all".to_vec(), "application/json").await;
    assert_eq!(status, 400, "{resp}");

    // Good frames stored: seq 1, 8 (MQTT) and 9, 15 (HTTP).
    let rows = wait_for("4 good rows", Duration::from_secs(30), || {
        let rows = read_parquet(dir.path(), "locations");
        (rows.len() >= 4).then_some(rows)
    })
    .await;
    let mut seqs: Vec<i64> = rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 8, 9, 15]);

    let expected: BTreeMap<&str, usize> = [
        ("malformed_json", 2),
        ("invalid_field", 2),
        ("out_of_range", 2),
        ("invalid_dtc", 1),
        ("spoofed_vehicle", 1),
        ("oversized", 1),
        ("malformed_protobuf", 1),
        ("no_fix", 1),
        ("missing_field", 1),
        ("future_ts", 1),
    ]
    .into_iter()
    .collect();
    let total: usize = expected.values().sum();
    let dead = wait_for("every rejection in the dead-letter store", Duration::from_secs(30), || {
        let d = fleetpipe_sinks::dead_letter::read_dead_letters(&dir.path().join("dead-letter")).unwrap();
        (d.len() >= total).then_some(d)
    })
    .await;
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for d in &dead {
        *got.entry(d["reason"].as_str().unwrap().to_string()).or_default() += 1;
        assert!(d["detail"].as_str().is_some_and(|s| !s.is_empty()), "a clear detail: {d}");
        assert!(d["raw"].is_string() || d["raw_base64"].is_string(), "raw bytes kept: {d}");
    }
    let got: BTreeMap<&str, usize> = got.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(got, expected);
    let spoof = dead.iter().find(|d| d["reason"] == "spoofed_vehicle").unwrap();
    assert_eq!(spoof["source"], "mqtt");
    assert_eq!(spoof["topic"], Value::String(t("location")));
    assert!(spoof["raw"].as_str().unwrap().contains("CAR-2"));

    let (_, text) = http_get(running.http_addr, "/metrics").await;
    let text = text.as_str().unwrap().to_string();
    for (reason, n) in &expected {
        let m = metric(&text, &format!("fleetpipe_frames_rejected_total{{reason=\"{reason}\"}}"));
        assert_eq!(m, *n as f64, "frames_rejected_total{{reason={reason}}}");
    }
    assert_eq!(metric(&text, "fleetpipe_frames_accepted_total{kind=\"location\"}"), 4.0);
    assert!(text.contains("fleetpipe_queue_capacity{stage=\"intake\"}"), "{text}");

    // Still running: a good frame afterwards is stored.
    let (status, _) = http_post(running.http_addr, serde_json::to_vec(&json!([{"vehicle_id": v, "ts": "2026-11-25T21:00:00Z", "seq": 16, "kind": "location", "lat": 56.1, "lon": 10.2}])).unwrap(), "application/json").await;
    assert_eq!(status, 200);
    wait_for("the frame after the bad ones", Duration::from_secs(30), || {
        (read_parquet(dir.path(), "locations").len() == 5).then_some(())
    })
    .await;
    running.stop().await.unwrap();
}
