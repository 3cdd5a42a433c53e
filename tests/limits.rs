//! Limits: an MQTT packet over the announced maximum, an HTTP body over the limit, the
//! gateway's port already taken, and the process's memory kept off transparent huge pages.
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

/// Reads until the peer closes (or `within` passes); whether it closed, and what it sent.
fn read_until_closed(s: &mut std::net::TcpStream, within: Duration) -> (bool, Vec<u8>) {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (true, got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (true, got),
            Err(_) => return (false, got),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_header_and_slow_body_http_connections_are_closed_after_their_timeouts() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.http.header_timeout_secs = 1.0;
    cfg.http.body_timeout_secs = 1.0;
    let running = start(cfg).await;
    let addr = running.http_addr;

    // Idle: nothing sent at all.
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    // Slow headers: one byte every 200 ms, for ever.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    let dripper = {
        let mut s = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ".iter().chain(std::iter::repeat(&b'a')) {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // Slow body: the headers promise 1,000 bytes, 10 arrive.
    let mut body = std::net::TcpStream::connect(addr).unwrap();
    body.write_all(
        b"POST /v1/frames HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"vehicle",
    )
    .unwrap();

    assert!(read_until_closed(&mut idle, Duration::from_secs(20)).0, "an idle connection is closed");
    assert!(read_until_closed(&mut slow, Duration::from_secs(20)).0, "a slow-header connection is closed");
    let (closed, answer) = read_until_closed(&mut body, Duration::from_secs(20));
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "a slow body gets 408: {answer}");
    assert!(closed || answer.contains("timeout"));
    dripper.join().unwrap();
    // And the API still serves.
    let (status, _) = http_get(addr, "/health").await;
    assert_eq!(status, 200);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_http_connection_cap_a_new_connection_gets_503_and_the_admin_listener_still_answers() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.http.max_connections = 20;
    cfg.http.admin_addr = Some(([127, 0, 0, 1], free_port()).into());
    let admin = cfg.http.admin_addr.unwrap();
    let running = start(cfg).await;
    let addr = running.http_addr;
    // Each held connection has sent a request and been answered: it is open and counted.
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 256];
        std::io::Read::read(&mut s, &mut buf).unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = std::net::TcpStream::connect(addr).unwrap();
    let (closed, answer) = read_until_closed(&mut extra, Duration::from_secs(20));
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(closed && answer.starts_with("http/1.1 503") && answer.contains("retry-after: 1"), "{answer}");
    let (status, _) = http_get(admin, "/health").await;
    assert_eq!(status, 200, "the admin listener answers while the API is full");
    let text = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metric(&text, "fleetpipe_http_connections_refused_total{listener=\"api\"}") >= 1.0);
    // Once they close, new connections are served again.
    drop(held);
    wait_for("the API to take connections again", Duration::from_secs(20), || {
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let (_, answer) = read_until_closed(&mut s, Duration::from_secs(5));
        answer.starts_with(b"HTTP/1.1 200").then_some(())
    })
    .await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_gateway_connection_cap_connects_are_refused_and_a_connected_vehicle_goes_on() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.gateway.max_connections = 50;
    let running = start(cfg).await;
    let port = running.mqtt_addr.unwrap().port();
    let mut vehicle = Publisher::connect(port).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        let mut s = std::net::TcpStream::connect(running.mqtt_addr.unwrap()).unwrap();
        s.write_all(&connect_packet(&format!("FLOOD-{i}"))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        match connack {
            [0x20, 2, _, 0] => accepted.push(s),
            [0x20, 2, _, 3] => refused += 1, // server unavailable
            other => panic!("unexpected CONNACK {other:?}"),
        }
    }
    assert_eq!((accepted.len(), refused), (49, 11), "50 connections with the vehicle's own");
    let text =
        reqwest::get(format!("http://{}/metrics", running.http_addr)).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "fleetpipe_gateway_connects_total{result=\"busy\"}"), 11.0);
    // The vehicle already connected is unaffected.
    let frame =
        json!({"vehicle_id": "FLOOD-V", "ts": "2026-11-25T21:00:00Z", "seq": 1, "lat": 56.1, "lon": 10.2});
    vehicle.publish("vehicles/FLOOD-V/location", serde_json::to_vec(&frame).unwrap()).await;
    vehicle.all_acked().await;
    let rows = wait_for("its frame stored", Duration::from_secs(30), || {
        let rows = read_parquet(dir.path(), "locations");
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 1);
    drop(accepted);
    running.stop().await.unwrap();
}

/// The allocator's memory is not backed by transparent huge pages: every fresh 2 MiB page the
/// kernel zeroed on a fault was a sixth of fleetpipe's CPU under 20 publishers
/// (load-tests/RESULTS.md, "Huge pages").
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_binary_keeps_transparent_huge_pages_off() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let config = gateway_config_file(dir.path(), http_port, free_port(), "");
    let fp = Fleetpipe::start(&config, http_port).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", fp.pid())).unwrap();
    let thp: Vec<&str> = status.lines().filter(|l| l.starts_with("THP_enabled:")).collect();
    assert_eq!(thp, ["THP_enabled:\t0"], "{status}");
    assert!(fp.sigterm().success());
}
