//! Limits: an MQTT packet over the announced maximum, an HTTP body over the limit, and the
//! gateway's port already taken.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_over_the_announced_mqtt5_maximum_is_refused_by_the_broker_without_a_reconnect_loop() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(broker.url()));
    cfg.mqtt.max_packet_bytes = 16 * 1024;
    let running = start(cfg).await;
    let mut p = Publisher::connect(broker.port).await;
    let mut big =
        json!({"vehicle_id": "BIG-1", "ts": "2026-11-25T21:00:00Z", "seq": 1, "lat": 56.1, "lon": 10.2});
    big["pad"] = json!("x".repeat(64 * 1024));
    p.publish("vehicles/BIG-1/location", serde_json::to_vec(&big).unwrap()).await;
    for seq in 2..=20 {
        let f = json!({"vehicle_id": "BIG-1", "ts": "2026-11-25T21:00:00Z", "seq": seq, "lat": 56.1, "lon": 10.2});
        p.publish("vehicles/BIG-1/location", serde_json::to_vec(&f).unwrap()).await;
    }
    p.all_acked().await;
    let rows = wait_for("the 19 frames after the oversized one", Duration::from_secs(30), || {
        let rows = read_parquet(dir.path(), "locations");
        (rows.len() >= 19).then_some(rows)
    })
    .await;
    let mut seqs: Vec<i64> = rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, (2..=20).collect::<Vec<i64>>());
    assert!(running.is_subscribed(), "still connected and subscribed");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_body_over_the_limit_gets_413_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.http.max_body_bytes = 1024;
    let running = start(cfg).await;
    let frames: Vec<Value> = (0..50)
        .map(|i| json!({"vehicle_id": "V", "ts": 1795640400000i64 + i, "kind": "location", "lat": 56.1, "lon": 10.2}))
        .collect();
    let (status, _) =
        http_post(running.http_addr, serde_json::to_vec(&frames).unwrap(), "application/json").await;
    assert_eq!(status, 413);
    let (status, _) = http_get(running.http_addr, "/v1/vehicles/V").await;
    assert_eq!(status, 404);
    running.stop().await.unwrap();
    assert!(read_parquet(dir.path(), "locations").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_port_in_use_is_a_clear_error_that_says_how_to_use_that_broker() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.gateway.listen = Some(taken.local_addr().unwrap());
    let err = match fleetpipe::app::start(cfg).await {
        Ok(_) => panic!("started on a port in use"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("FLEETPIPE_MQTT_URL"), "{err}");
    assert!(err.contains(&taken.local_addr().unwrap().to_string()), "{err}");
}
