//! Kafka in and out against a real broker (tansu), with an independent client (Python
//! confluent-kafka) on the other side: the drive produced to the input topic lands in Parquet
//! exactly, the clean topic holds the same frames normalised, bad input reaches the dead-letter
//! topic with its reason, and the group's committed offsets reach the end of the input.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::Value;

const BAD: [(&str, &str); 3] = [
    (r#"{"vehicle_id":"BAD-1","ts":1795640400000,"seq":1,"kind":"location","#, "malformed_json"),
    (r#"{"vehicle_id":"BAD-2","ts":1795640400000,"seq":1,"kind":"location","lat":0,"lon":0}"#, "no_fix"),
    (
        r#"{"vehicle_id":"BAD-3","ts":1795640400000,"seq":1,"kind":"location","lat":123,"lon":10}"#,
        "out_of_range",
    ),
];

fn kafka_config(dir: &std::path::Path, brokers: &str, group: &str) -> fleetpipe::config::Config {
    let mut cfg = test_config(dir, None);
    cfg.kafka.brokers = Some(brokers.to_owned());
    cfg.kafka.group = group.to_owned();
    cfg.kafka.client_id = Some(format!("fleetpipe-test-{}", unique()));
    // Vehicle events have a test of their own (tests/events.rs).
    cfg.kafka.events_topic = String::new();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drive_produced_by_another_client_lands_in_parquet_and_the_clean_topic_and_bad_input_on_the_dlq()
{
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    for (topic, partitions) in
        [("vehicle-frames", "3"), ("vehicle-frames-clean", "3"), ("vehicle-frames-dlq", "1")]
    {
        kafka_client(&["create", &brokers, topic, partitions]);
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.ndjson");
    let mut text = DRIVE.to_string();
    for (line, _) in BAD {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(&input, text).unwrap();
    let frames = drive_frames();
    let produced: usize = kafka_client(&["produce", &brokers, "vehicle-frames", input.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(produced, frames.len() + BAD.len());

    let group = format!("fleetpipe-{}", unique());
    let running = start(kafka_config(dir.path(), &brokers, &group)).await;

    // Parquet: every frame once, every value equal.
    let rows = wait_for("the drive in Parquet", Duration::from_secs(60), || {
        let rows = read_parquet(dir.path(), "locations");
        (rows.len() >= frames.len()).then_some(rows)
    })
    .await;
    assert_locations_equal(&rows, &frames);

    // The clean topic, read by the other client: the same frames, normalised, keyed by vehicle.
    // (One more than expected is asked for, to see that there is none: a bounded read.)
    let clean = kafka_records(&brokers, "vehicle-frames-clean", frames.len() + 1, 10);
    assert_eq!(clean.len(), frames.len(), "each frame once on the clean topic");
    let by_seq: BTreeMap<i64, &Value> = frames.iter().map(|f| (f["seq"].as_i64().unwrap(), f)).collect();
    let mut seen = BTreeSet::new();
    for r in &clean {
        let v: Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
        let sent = by_seq[&v["seq"].as_i64().unwrap()];
        assert_eq!(r["key"], sent["vehicle_id"]);
        assert_eq!(v["vehicle_id"], sent["vehicle_id"]);
        assert_eq!(v["kind"], "location");
        assert_eq!(ts_micros(&v["ts"]), ts_micros(&sent["ts"]));
        assert_eq!(v["lat"], sent["lat"]);
        assert_eq!(v["lon"], sent["lon"]);
        assert!(v["received_at"].is_string(), "normalised: received_at added");
        seen.insert(v["seq"].as_i64().unwrap());
    }
    assert_eq!(seen.len(), frames.len());

    // The dead-letter topic: each bad record with its reason and its bytes.
    let dlq = kafka_records(&brokers, "vehicle-frames-dlq", BAD.len() + 1, 5);
    assert_eq!(dlq.len(), BAD.len());
    let got: BTreeMap<String, String> = dlq
        .iter()
        .map(|r| {
            (r["value"].as_str().unwrap().to_owned(), r["headers"]["reason"].as_str().unwrap().to_owned())
        })
        .collect();
    for (line, reason) in BAD {
        assert_eq!(got.get(line).map(String::as_str), Some(reason), "{line}");
    }
    assert!(dlq.iter().all(|r| r["headers"]["source"] == "kafka"));

    // The group commits the end of every input partition while running (watermarks are
    // stored on a timer, traffic or not), and still has it after the drain.
    let ends = kafka_ends(&brokers, "vehicle-frames", produced);
    let committed = || kafka_committed(&brokers, &group, "vehicle-frames");
    wait_for("the end committed while running", Duration::from_secs(30), || {
        (committed() == ends).then_some(())
    })
    .await;
    running.stop().await.unwrap();
    assert_eq!(committed(), ends);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protobuf_record_is_decoded_like_json() {
    use fleetpipe_processors::{Body, Frame, Location};
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    kafka_client(&["create", &brokers, "vehicle-frames", "1"]);
    let ts = 1_795_640_400_250_000i64; // 2026-11-25T21:00:00.250Z
    let frames: Vec<Frame> = (1..=3u64)
        .map(|seq| Frame {
            vehicle_id: "PB-1".into(),
            ts: ts + seq as i64 * 1_000_000,
            seq,
            received_at: 0,
            body: Body::Location(Location {
                lat: 56.1 + seq as f64 * 1e-4,
                lon: 10.2,
                speed_kmh: Some(33.8),
                ..Location::default()
            }),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("batch.pb");
    std::fs::write(&file, fleetpipe_processors::codec::encode_protobuf(&frames)).unwrap();
    kafka_client(&["produce-raw", &brokers, "vehicle-frames", "PB-1", file.to_str().unwrap()]);

    let mut cfg = kafka_config(dir.path(), &brokers, &format!("fleetpipe-{}", unique()));
    cfg.kafka.clean_topic = String::new();
    cfg.kafka.dlq_topic = String::new();
    let running = start(cfg).await;
    let mut rows = wait_for("the Protobuf frames in Parquet", Duration::from_secs(60), || {
        let rows = read_parquet(dir.path(), "locations");
        (rows.len() >= frames.len()).then_some(rows)
    })
    .await;
    running.stop().await.unwrap();
    rows.sort_by_key(|r| r["seq"].as_i64());
    assert_eq!(rows.len(), frames.len());
    for (row, sent) in rows.iter().zip(&frames) {
        let Body::Location(l) = &sent.body else { unreachable!() };
        assert_eq!(row["vehicle_id"], "PB-1");
        assert_eq!(row["seq"].as_i64().unwrap() as u64, sent.seq);
        assert_eq!(row["ts"].as_i64().unwrap(), sent.ts);
        assert_eq!(row["lat"].as_f64().unwrap(), l.lat);
        assert_eq!(row["speed_kmh"].as_f64().unwrap(), 33.8);
    }
}
