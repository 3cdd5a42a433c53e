//! Two fleetpipe instances on one MQTT 5 shared subscription (`$share/fleetpipe/vehicles/+/+`)
//! behind Mosquitto: both take a share of the load, and draining one mid-stream (scale-in:
//! unsubscribe, finish and acknowledge what the broker already sent it, leave) loses nothing:
//! every published frame is stored once, by one instance or the other.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::json;

const VEHICLES: u64 = 50;

fn member(dir: &std::path::Path, broker: &Mosquitto, name: &str) -> fleetpipe::config::Config {
    let mut cfg = test_config(dir, Some(broker.url()));
    cfg.mqtt.shared_group = Some("fleetpipe".into());
    cfg.mqtt.client_id = Some(format!("fleetpipe-{name}-{}", unique()));
    cfg
}

async fn publish(p: &mut Publisher, from: u64, to: u64) {
    let base = 1_795_132_800_000i64; // 2026-11-20T00:00:00Z
    for n in from..to {
        let f = json!({"vehicle_id": format!("SH-{:02}", n % VEHICLES), "ts": base + n as i64 * 100, "seq": n,
                       "kind": "location", "lat": 56.0 + (n % 1000) as f64 * 1e-4, "lon": 10.2});
        p.publish_frame(&f).await;
        if n % 100 == 99 {
            tokio::task::yield_now().await;
        }
    }
}

fn seqs(dir: &std::path::Path) -> Vec<i64> {
    read_parquet(dir, "locations").iter().map(|r| r["seq"].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_share_the_load_and_draining_one_mid_stream_loses_nothing() {
    let broker = Mosquitto::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(member(dir_a.path(), &broker, "a")).await;
    let b = start(member(dir_b.path(), &broker, "b")).await;
    let mut publisher = Publisher::connect(broker.port).await;

    // Both members take a share.
    publish(&mut publisher, 0, 2_000).await;
    publisher.all_acked().await;
    wait_for("the first 2,000 frames stored", Duration::from_secs(60), || {
        (seqs(dir_a.path()).len() + seqs(dir_b.path()).len() >= 2_000).then_some(())
    })
    .await;
    let (share_a, share_b) = (seqs(dir_a.path()).len(), seqs(dir_b.path()).len());
    assert!(share_a > 0 && share_b > 0, "both members receive: a {share_a}, b {share_b}");

    // A is drained while the vehicles keep publishing.
    let publishing = tokio::spawn(async move {
        publish(&mut publisher, 2_000, 8_000).await;
        publisher.all_acked().await;
        publisher
    });
    a.stop().await.unwrap();
    let _publisher = publishing.await.unwrap();

    let total = 8_000usize;
    wait_for("every frame stored", Duration::from_secs(60), || {
        (seqs(dir_a.path()).len() + seqs(dir_b.path()).len() >= total).then_some(())
    })
    .await;
    b.stop().await.unwrap();
    let (in_a, in_b) = (seqs(dir_a.path()), seqs(dir_b.path()));
    let all: BTreeSet<i64> = in_a.iter().chain(&in_b).copied().collect();
    assert_eq!(all.len(), total, "every frame stored");
    assert_eq!(in_a.len() + in_b.len(), total, "none stored twice");
}
