//! Postgres refuses connections mid-stream: the write-ahead log absorbs the outage while it has
//! room, then intake pushes back (HTTP 503 with `Retry-After`); once Postgres takes connections
//! again every acknowledged frame is stored exactly once and ingestion goes on without a
//! restart. (Its own test binary: it reads process-wide gauges.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::json;

const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";
const FRAMES_PER_POST: u64 = 500;

/// `FRAMES_PER_POST` location frames of 50 vehicles, numbered from `post * FRAMES_PER_POST`.
fn body(post: u64) -> Vec<u8> {
    let base = 1_795_132_800_000i64; // 2026-11-20T00:00:00Z
    let frames: Vec<_> = (post * FRAMES_PER_POST..(post + 1) * FRAMES_PER_POST)
        .map(|n| {
            json!({"vehicle_id": format!("OUT-{:02}", n % 50), "ts": base + n as i64 * 1000, "seq": n,
                   "kind": "location", "lat": 56.0 + (n % 1000) as f64 * 1e-4, "lon": 10.2})
        })
        .collect();
    serde_json::to_vec(&frames).unwrap()
}

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").await.1.as_str().unwrap().to_string()
}

async fn stored_seqs(db: &tokio_postgres::Client) -> Vec<i64> {
    db.query("SELECT seq FROM locations ORDER BY seq", &[])
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_is_absorbed_by_the_log_then_pushed_back_and_every_acked_frame_lands_once() {
    let name = format!("fp_outage_{}", unique().replace('-', "_"));
    let admin = pg_connect(ADMIN).await;
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    let db = pg_connect(&format!("host=127.0.0.1 port=5432 user=postgres dbname={name}")).await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.postgres.url = Some(format!("postgres://postgres@127.0.0.1:5432/{name}"));
    cfg.wal.segment_mib = 1;
    cfg.wal.max_mib = 3;
    cfg.pipeline.intake_entries = 2;
    let running = start(cfg).await;
    let addr = running.http_addr;

    // Before: a post lands in Postgres.
    let mut acked: BTreeSet<i64> = BTreeSet::new();
    let (status, resp) = http_post(addr, body(0), "application/json").await;
    assert_eq!(status, 200, "{resp}");
    acked.extend(0..FRAMES_PER_POST as i64);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stored_seqs(&db).await.len() < FRAMES_PER_POST as usize {
        assert!(std::time::Instant::now() < deadline, "the first post never reached Postgres");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Postgres refuses connections (and drops the ones it has).
    admin.batch_execute(&format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")).await.unwrap();
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&name])
        .await
        .unwrap();

    // During: posts are acknowledged (the log absorbs them) until the log is full; then the
    // intake fills and a post is turned away with 503. Posts that wait in the intake meanwhile
    // are kept and answered later.
    let mut absorbed = 0u64;
    let mut waiting = Vec::new();
    let mut post = 1u64;
    let retry_after = loop {
        assert!(post < 400, "no pushback after {post} posts into a log of 3 MiB");
        let mut task = tokio::spawn(http_post(addr, body(post), "application/json"));
        match tokio::time::timeout(Duration::from_secs(3), &mut task).await {
            Ok(Ok((200, _))) => {
                acked.extend((post * FRAMES_PER_POST) as i64..((post + 1) * FRAMES_PER_POST) as i64);
                absorbed += 1;
            }
            Ok(Ok((503, _))) => break post,
            Ok(other) => panic!("unexpected answer {other:?}"),
            // Waiting in the intake for room in the log: answered once there is some.
            Err(_) => waiting.push((post, task)),
        }
        post += 1;
    };
    eprintln!(
        "outage: {absorbed} posts absorbed by the log, {} waiting in the intake, post {retry_after} refused",
        waiting.len()
    );
    assert!(absorbed >= 5, "the log absorbed only {absorbed} posts before pushing back");
    let text = metrics_text(addr).await;
    assert_eq!(metric(&text, r#"fleetpipe_sink_behind{sink="postgres"}"#), 1.0);
    assert_eq!(metric(&text, "fleetpipe_wal_full"), 1.0);
    let wal_bytes = metric(&text, "fleetpipe_wal_bytes");
    assert!(wal_bytes <= (4 << 20) as f64, "the log stays within its bound (+ one group): {wal_bytes}");

    // After: Postgres takes connections again; the waiting posts are answered, everything
    // acknowledged reaches Postgres once, and new posts flow without a restart.
    admin.batch_execute(&format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")).await.unwrap();
    for (post, task) in waiting {
        let (status, resp) = task.await.unwrap();
        assert_eq!(status, 200, "post {post} waited for room in the log: {resp}");
        acked.extend((post * FRAMES_PER_POST) as i64..((post + 1) * FRAMES_PER_POST) as i64);
    }
    let (status, resp) = http_post(addr, body(retry_after), "application/json").await;
    assert_eq!(status, 200, "the refused post, retried: {resp}");
    acked.extend((retry_after * FRAMES_PER_POST) as i64..((retry_after + 1) * FRAMES_PER_POST) as i64);
    let db = pg_connect(&format!("host=127.0.0.1 port=5432 user=postgres dbname={name}")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut stored = stored_seqs(&db).await;
    while stored.len() < acked.len() {
        assert!(std::time::Instant::now() < deadline, "{} of {} rows in Postgres", stored.len(), acked.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = stored_seqs(&db).await;
    }
    let distinct: BTreeSet<i64> = stored.iter().copied().collect();
    assert_eq!(distinct.len(), stored.len(), "no frame stored twice");
    assert_eq!(distinct, acked, "exactly the acknowledged frames");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics_text(addr).await;
        let behind = metric(&text, r#"fleetpipe_sink_behind{sink="postgres"}"#);
        if behind == 0.0 && metric(&text, "fleetpipe_wal_full") == 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the sink never caught up (behind = {behind})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await.unwrap();

    drop(db);
    admin.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).await.unwrap();
}
