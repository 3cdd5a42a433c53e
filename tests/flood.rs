//! A connection flood at the descriptor limit: nearly 20,000 idle connections against one
//! instance, most of them MQTT sessions, the rest TCP connections that never send CONNECT.
//! Past the session cap a CONNECT is refused in CONNACK; past the cap plus the room kept for
//! connections before CONNECT, a connection is closed at once; `/health` answers, a vehicle
//! connected before the flood goes on publishing, and the log stays small. (Its own test
//! binary: it uses nearly every descriptor the process may have.)
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Opens `n` connections, each sending CONNECT, and returns them with the CONNACK return code.
fn connect_sessions(port: u16, from: usize, n: usize) -> Vec<(TcpStream, u8)> {
    (from..from + n)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(&connect_packet(&format!("idle-{i}"))).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut connack = [0u8; 4];
            s.read_exact(&mut connack).unwrap_or_else(|e| panic!("no CONNACK for connection {i}: {e}"));
            assert_eq!(connack[..2], [0x20, 2], "connection {i}");
            (s, connack[3])
        })
        .collect()
}

/// Whether the server has closed `s` (a read sees the end of the stream), without waiting.
fn closed_by_server(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    match s.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_is_refused_past_the_caps_and_the_instance_keeps_serving() {
    // The clients' descriptors: as many as this process may have, less some for the test.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let clients = usize::try_from(soft.saturating_sub(400)).unwrap().min(20_000);
    assert!(clients >= 3_000, "descriptor limit {soft} too low for a flood");
    // The session cap leaves about 2,000 of the flood past it.
    let cap = clients - 2_000;
    let room = fleetpipe_ingest::gateway::open_limit(cap) - cap;
    let refused_in_connack = 10;

    let dir = tempfile::tempdir().unwrap();
    let (http_port, mqtt_port) = (free_port(), free_port());
    let config = gateway_config_file(
        dir.path(),
        http_port,
        mqtt_port,
        &format!("max_connections = {cap}\nconnect_timeout_secs = 300\n[parquet]\nroll_secs = 0.3\n"),
    );
    let log_path = dir.path().join("fleetpipe.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let fp = Fleetpipe::start_with(&config, http_port, "info", Stdio::from(log)).await;
    let sockets = async || fp.metric("fleetpipe_gateway_sockets").await;

    // A vehicle connected before the flood.
    let mut vehicle = Publisher::connect(mqtt_port).await;
    let frame = |seq: u64| {
        serde_json::to_vec(&json!({"vehicle_id": "FLOOD-V", "ts": "2026-11-25T21:00:00Z", "seq": seq, "lat": 56.1, "lon": 10.2}))
            .unwrap()
    };
    vehicle.publish("vehicles/FLOOD-V/location", frame(1)).await;
    vehicle.all_acked().await;

    // Sessions up to the cap (the vehicle holds one), then a few past it: CONNACK 3.
    let held = tokio::task::spawn_blocking(move || connect_sessions(mqtt_port, 0, cap - 1)).await.unwrap();
    assert!(held.iter().all(|(_, code)| *code == 0), "every session under the cap accepted");
    let refused = tokio::task::spawn_blocking(move || connect_sessions(mqtt_port, cap, refused_in_connack))
        .await
        .unwrap();
    assert!(refused.iter().all(|(_, code)| *code == 3), "past the cap: server unavailable");
    assert_eq!(
        fp.metric("fleetpipe_gateway_connects_total{result=\"busy\"}").await,
        refused_in_connack as f64
    );
    assert_eq!(fp.metric("fleetpipe_gateway_connections").await, cap as f64);
    drop(refused);
    wait_for("the refused connections closed", Duration::from_secs(30), || {
        (block_on(sockets()) == cap as f64).then_some(())
    })
    .await;

    // The rest of the flood never sends CONNECT: `room` of them are held (until the connect
    // timeout), every one past that is closed at once.
    let raw = clients - held.len() - refused_in_connack;
    let raw_conns = tokio::task::spawn_blocking(move || {
        (0..raw).map(|_| TcpStream::connect(("127.0.0.1", mqtt_port)).unwrap()).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let closed = wait_for("connections past the room closed", Duration::from_secs(60), || {
        let closed = raw_conns.iter().filter(|s| closed_by_server(s)).count();
        (closed == raw - room && block_on(sockets()) == (cap + room) as f64).then_some(closed)
    })
    .await;
    assert_eq!(closed, raw - room);
    let busy = fp.metric("fleetpipe_gateway_connects_total{result=\"busy\"}").await;
    assert_eq!(busy, (refused_in_connack + raw - room) as f64);

    // Still serving: probes, and the vehicle that was already connected.
    let r = reqwest::get(format!("http://127.0.0.1:{http_port}/health")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    vehicle.publish("vehicles/FLOOD-V/location", frame(2)).await;
    vehicle.all_acked().await;
    let rows = wait_for("both of the vehicle's frames", Duration::from_secs(30), || {
        let rows = read_parquet(&dir.path().join("data"), "locations");
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 2);
    drop(held);
    drop(raw_conns);

    // The log stays small: nothing is logged per refused connection.
    let size = std::fs::metadata(&log_path).unwrap().len();
    assert!(
        size < 64 * 1024,
        "{size} bytes of log: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert!(fp.sigterm().success());
}
