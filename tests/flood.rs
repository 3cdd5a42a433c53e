//! A connection flood at the descriptor limit: nearly 20,000 idle MQTT connections against one
//! instance. Past its connection cap new ones are refused in CONNACK, `/health` answers, a
//! vehicle connected before the flood goes on publishing, and the log stays small. (Its own
//! test binary: it uses nearly every descriptor the process may have.)
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::json;

fn connect_packet(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 120];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend(body);
    pkt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_is_refused_past_the_cap_and_the_instance_keeps_serving() {
    // The clients' descriptors: as many as this process may have, less some for the test.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let clients = usize::try_from(soft.saturating_sub(400)).unwrap().min(20_000);
    assert!(clients >= 2_000, "descriptor limit {soft} too low for a flood");
    // The instance's cap: below what it may hold (it keeps 1,500 descriptors for itself), so
    // that the last thousand or so of the flood are refused.
    let cap = (clients - 1_000).min(usize::try_from(soft.saturating_sub(2_000)).unwrap());

    let dir = tempfile::tempdir().unwrap();
    let (http_port, mqtt_port) = (free_port(), free_port());
    let config = dir.path().join("fleetpipe.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http_port}\"\n[gateway]\nlisten = \"127.0.0.1:{mqtt_port}\"\n\
             max_connections = {cap}\n[parquet]\nroll_secs = 0.3\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("fleetpipe.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let fp = Fleetpipe::start_with(&config, http_port, "info", Stdio::from(log)).await;

    // A vehicle connected before the flood.
    let mut vehicle = Publisher::connect(mqtt_port).await;
    let frame = |seq: u64| {
        serde_json::to_vec(&json!({"vehicle_id": "FLOOD-V", "ts": "2026-11-25T21:00:00Z", "seq": seq, "lat": 56.1, "lon": 10.2}))
            .unwrap()
    };
    vehicle.publish("vehicles/FLOOD-V/location", frame(1)).await;
    vehicle.all_acked().await;

    // The flood, off the async workers.
    let (held, refused) = tokio::task::spawn_blocking(move || {
        let mut held = Vec::with_capacity(clients);
        let mut refused = 0usize;
        for i in 0..clients {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).unwrap();
            s.write_all(&connect_packet(&format!("idle-{i}"))).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut connack = [0u8; 4];
            s.read_exact(&mut connack).unwrap();
            match connack {
                [0x20, 2, _, 0] => held.push(s),
                [0x20, 2, _, 3] => refused += 1, // server unavailable; the socket closes here
                other => panic!("unexpected CONNACK {other:?} at connection {i}"),
            }
        }
        (held, refused)
    })
    .await
    .unwrap();
    assert_eq!(held.len(), cap - 1, "the cap, less the vehicle's own connection");
    assert_eq!(refused, clients - (cap - 1));
    assert_eq!(fp.metric("fleetpipe_gateway_connects_total{result=\"busy\"}").await, refused as f64);

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

    // The log stays small: nothing is logged per refused connection.
    let size = std::fs::metadata(&log_path).unwrap().len();
    assert!(
        size < 64 * 1024,
        "{size} bytes of log: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert!(fp.sigterm().success());
}
