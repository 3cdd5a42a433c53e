//! Pushback: when nothing can be made durable, HTTP answers 503 with `Retry-After` instead of
//! queueing without bound. (Its own test binary: it reads a process-wide gauge.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_ahead_log_pushes_back_with_503_and_retry_after_and_accepts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.wal.max_mib = 0; // full from the start: nothing can be made durable
    cfg.pipeline.intake_entries = 1;
    let running = start(cfg).await;
    let addr = running.http_addr;
    let frame = |seq: u64| {
        serde_json::to_vec(&json!([{"vehicle_id": "V", "ts": 1795640400000i64, "seq": seq, "kind": "location", "lat": 56.1, "lon": 10.2}]))
            .unwrap()
    };
    // The first request waits in the intake for a durability that cannot come ...
    let waiting = tokio::spawn(http_post(addr, frame(1), "application/json"));
    let resp = wait_for_503(addr, frame(2)).await;
    // ... the next one is turned away at once, with a hint when to retry.
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    let (_, text) = http_get(addr, "/metrics").await;
    assert!(text.as_str().unwrap().contains("fleetpipe_wal_full 1"));
    running.stop().await.unwrap();
    let (status, _) = waiting.await.unwrap();
    assert_eq!(status, 503, "the waiting request learns it was not made durable");
    assert!(read_parquet(dir.path(), "locations").is_empty());
}

async fn wait_for_503(addr: std::net::SocketAddr, body: Vec<u8>) -> reqwest::Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = reqwest::Client::new()
            .post(format!("http://{addr}/v1/frames"))
            .header("content-type", "application/json")
            .body(body.clone())
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(r) = resp {
            if r.status() == 503 {
                return r;
            }
        }
        assert!(std::time::Instant::now() < deadline, "never got a 503");
    }
}
