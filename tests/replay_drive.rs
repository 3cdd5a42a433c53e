//! The recorded drive (tests/data), replayed through each front door, comes out of Parquet
//! once per frame with every value equal to what was sent.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

async fn parquet_rows(
    dir: &std::path::Path,
    n: usize,
) -> Vec<std::collections::BTreeMap<String, serde_json::Value>> {
    wait_for(&format!("{n} location rows in Parquet"), Duration::from_secs(60), || {
        let rows = read_parquet(dir, "locations");
        (rows.len() >= n).then_some(rows)
    })
    .await
}

async fn assert_latest_is_newest(running: &fleetpipe::app::Running, frames: &[serde_json::Value]) {
    let newest = frames.iter().max_by_key(|f| ts_micros(&f["ts"])).unwrap();
    let (status, doc) = http_get(running.http_addr, "/v1/vehicles/CSS-3BA199E2").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["served_from"], "l1");
    assert_eq!(doc["location"]["seq"], newest["seq"]);
    assert_eq!(doc["location"]["lat"], newest["lat"]);
    assert_eq!(doc["location"]["lon"], newest["lon"]);
    assert_eq!(doc["location"]["ts"], newest["ts"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_drive_through_mosquitto_at_qos1_lands_in_parquet_once_with_every_value_equal() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), Some(broker.url()))).await;
    let frames = drive_frames();
    let mut publisher = Publisher::connect(broker.port).await;
    for f in &frames {
        publisher.publish_frame(f).await;
    }
    publisher.all_acked().await;
    let rows = parquet_rows(dir.path(), frames.len()).await;
    assert_locations_equal(&rows, &frames);
    assert_latest_is_newest(&running, &frames).await;
    running.stop().await.unwrap();
    // Nothing more appears after a clean stop and nothing went to the dead-letter store.
    assert_locations_equal(&read_parquet(dir.path(), "locations"), &frames);
    assert!(fleetpipe_sinks::dead_letter::read_dead_letters(&dir.path().join("dead-letter"))
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_drive_through_the_gateway_lands_in_parquet_once_with_every_value_equal() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let port = running.mqtt_addr.unwrap().port();
    let frames = drive_frames();
    let mut publisher = Publisher::connect(port).await;
    for f in &frames {
        publisher.publish_frame(f).await;
    }
    publisher.all_acked().await;
    let rows = parquet_rows(dir.path(), frames.len()).await;
    assert_locations_equal(&rows, &frames);
    assert_latest_is_newest(&running, &frames).await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_drive_through_http_ndjson_is_acknowledged_and_lands_in_parquet_once() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let frames = drive_frames();
    let lines: Vec<&str> = DRIVE.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut accepted = 0;
    for chunk in lines.chunks(500) {
        let body = chunk.join("\n").into_bytes();
        let (status, resp) = http_post(running.http_addr, body, "application/x-ndjson").await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["rejected"], serde_json::json!([]));
        accepted += resp["accepted"].as_u64().unwrap();
    }
    assert_eq!(accepted, frames.len() as u64);
    let rows = parquet_rows(dir.path(), frames.len()).await;
    assert_locations_equal(&rows, &frames);
    assert_latest_is_newest(&running, &frames).await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing_and_fleetpipe_resubscribes() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), Some(broker.url()))).await;
    let frames = drive_frames();
    let (first, second) = frames.split_at(frames.len() / 2);
    let mut publisher = Publisher::connect(broker.port).await;
    for f in first {
        publisher.publish_frame(f).await;
    }
    publisher.all_acked().await;
    drop(publisher);
    let broker = broker.restart();
    wait_for("fleetpipe resubscribed", Duration::from_secs(30), || running.is_subscribed().then_some(()))
        .await;
    let mut publisher = Publisher::connect(broker.port).await;
    for f in second {
        publisher.publish_frame(f).await;
    }
    publisher.all_acked().await;
    let rows = parquet_rows(dir.path(), frames.len()).await;
    assert_locations_equal(&rows, &frames);
    running.stop().await.unwrap();
}
