//! Redis (the L2 cache) dies mid-stream and comes back empty: ingestion never stalls, errors
//! are counted, and L2 holds every vehicle's newest state again afterwards. (Its own test
//! binary: it reads a process-wide counter.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const VEHICLES: u64 = 20;
const FRAMES_PER_POST: u64 = 200;

/// Frames `post * FRAMES_PER_POST ..`, round robin over the vehicles, event time rising.
fn body(post: u64) -> Vec<u8> {
    let base = 1_795_132_800_000i64; // 2026-11-20T00:00:00Z
    let frames: Vec<_> = (post * FRAMES_PER_POST..(post + 1) * FRAMES_PER_POST)
        .map(|n| {
            json!({"vehicle_id": format!("RDS-{:02}", n % VEHICLES), "ts": base + n as i64 * 100, "seq": n,
                   "kind": "location", "lat": 56.0 + (n % 1000) as f64 * 1e-4, "lon": 10.2 + (n % VEHICLES) as f64 * 1e-3})
        })
        .collect();
    serde_json::to_vec(&frames).unwrap()
}

/// The newest seq per vehicle after `posts` posts.
fn newest(posts: u64) -> Vec<(String, i64)> {
    let last = posts * FRAMES_PER_POST - 1;
    (0..VEHICLES)
        .map(|v| {
            let n = last - ((last % VEHICLES) + VEHICLES - v) % VEHICLES;
            (format!("RDS-{v:02}"), n as i64)
        })
        .collect()
}

/// Whether Redis holds exactly `want` as every vehicle's latest location, and all in the geo set.
fn l2_holds(url: &str, prefix: &str, want: &[(String, i64)]) -> bool {
    let Ok(mut con) = redis::Client::open(url).and_then(|c| c.get_connection()) else { return false };
    let geo: Vec<String> =
        redis::cmd("ZRANGE").arg(format!("{prefix}geo")).arg(0).arg(-1).query(&mut con).unwrap_or_default();
    want.iter().all(|(id, seq)| {
        let held: Option<String> = redis::cmd("HGET")
            .arg(format!("{prefix}vehicle:{id}"))
            .arg("location")
            .query(&mut con)
            .unwrap_or(None);
        let held: Option<Value> = held.and_then(|h| serde_json::from_str(&h).ok());
        held.is_some_and(|h| h["seq"] == *seq) && geo.contains(id)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_and_coming_back_empty_never_stalls_ingestion_and_l2_is_refilled() {
    let mut redis = RedisServer::start();
    let prefix = "fleetpipe:";
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.redis.url = Some(redis.url());
    let running = start(cfg).await;
    let addr = running.http_addr;

    let mut posts = 0;
    for _ in 0..5 {
        let (status, resp) = http_post(addr, body(posts), "application/json").await;
        assert_eq!(status, 200, "{resp}");
        posts += 1;
    }
    let want = newest(posts);
    let url = redis.url();
    wait_for("L2 before the outage", Duration::from_secs(30), || l2_holds(&url, prefix, &want).then_some(()))
        .await;

    // Redis dies: every post is still answered 200 (L2 is a cache, not a durability point).
    redis.kill();
    for _ in 0..20 {
        let (status, resp) = http_post(addr, body(posts), "application/json").await;
        assert_eq!(status, 200, "ingestion goes on without Redis: {resp}");
        posts += 1;
    }
    let want = newest(posts);
    let parquet_rows = (posts * FRAMES_PER_POST) as usize;
    wait_for("every frame in Parquet meanwhile", Duration::from_secs(30), || {
        (read_parquet(dir.path(), "locations").len() == parquet_rows).then_some(())
    })
    .await;
    let (_, text) = http_get(addr, "/metrics").await;
    assert!(metric(text.as_str().unwrap(), r#"fleetpipe_cache_errors_total{tier="l2"}"#) >= 1.0);

    // Redis comes back empty: the breaker's probe finds it and L2 is refilled with the newest
    // state of every vehicle seen meanwhile, without any new frame arriving.
    redis.resume();
    wait_for("L2 refilled after the outage", Duration::from_secs(60), || {
        l2_holds(&url, prefix, &want).then_some(())
    })
    .await;
    let (status, doc) = http_get(addr, "/v1/vehicles/RDS-07").await;
    assert_eq!(status, 200);
    assert_eq!(doc["location"]["seq"], want[7].1);
    running.stop().await.unwrap();
}
