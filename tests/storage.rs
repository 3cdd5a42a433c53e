//! Postgres history and the Redis L2 with the real drive: exact rows column by column, no
//! duplicates on a second delivery, the newest state in Redis, and the read path falling
//! through L1 → L2 → Postgres with the same answer from each tier.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

async fn post_drive(addr: std::net::SocketAddr) {
    let lines: Vec<&str> = DRIVE.lines().filter(|l| !l.trim().is_empty()).collect();
    for chunk in lines.chunks(500) {
        let (status, resp) = http_post(addr, chunk.join("\n").into_bytes(), "application/x-ndjson").await;
        assert_eq!(status, 200, "{resp}");
    }
}

fn redis_del_prefix(prefix: &str) {
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut con = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut con).unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query(&mut con).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_drive_lands_in_postgres_and_redis_and_reads_fall_through_l1_l2_postgres_with_one_answer() {
    let id = unique().replace('-', "_");
    let schema = format!("fp_it_{id}");
    let prefix = format!("fpit:{id}:");
    let client = pg().await;
    let frames = drive_frames();

    // 1. The drive over HTTP, then the same again: every row once, every value equal.
    let dir = tempfile::tempdir().unwrap();
    let running = start(storage_config(dir.path(), &schema, &prefix)).await;
    post_drive(running.http_addr).await;
    post_drive(running.http_addr).await;
    let count_sql = format!("SELECT count(*) FROM {schema}.locations");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client.query_one(&count_sql, &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(0)
        < frames.len() as i64
    {
        assert!(std::time::Instant::now() < deadline, "rows never reached Postgres");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let l1_doc = http_get(running.http_addr, "/v1/vehicles/CSS-3BA199E2").await.1;
    assert_eq!(l1_doc["served_from"], "l1");
    let (status, track) = http_get(
        running.http_addr,
        "/v1/vehicles/CSS-3BA199E2/track?from=2021-07-26T04:43:00Z&to=2021-07-26T04:43:08Z&limit=10",
    )
    .await;
    assert_eq!(status, 200, "{track}");
    let seqs: Vec<i64> =
        track["track"].as_array().unwrap().iter().map(|p| p["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3], "the track between 04:43:00 and 04:43:08, in time order");
    // Without `from` (or with only `limit` or `to`): from the start of history, not an error.
    for query in ["", "?limit=5", "?to=2021-07-26T04:43:08Z", "?from=-99999999999999&to=99999999999999999"] {
        let (status, track) =
            http_get(running.http_addr, &format!("/v1/vehicles/CSS-3BA199E2/track{query}")).await;
        assert_eq!(status, 200, "{query}: {track}");
        let first: Vec<i64> =
            track["track"].as_array().unwrap().iter().take(3).map(|p| p["seq"].as_i64().unwrap()).collect();
        assert_eq!(first, vec![1, 2, 3], "{query}");
    }
    running.stop().await.unwrap();

    let rows = client
        .query(
            &format!(
                "SELECT vehicle_id, (extract(epoch FROM ts) * 1000000)::int8, seq, lat, lon, speed_kmh, heading_deg, alt_m, \
                 accuracy_m, satellites, odometer_m, ignition FROM {schema}.locations"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), frames.len(), "a second delivery adds no rows");
    let mut by_seq = std::collections::HashMap::new();
    for r in &rows {
        by_seq.insert(r.get::<_, i64>(2), r);
    }
    for f in &frames {
        let r = by_seq[&f["seq"].as_i64().unwrap()];
        assert_eq!(r.get::<_, String>(0), f["vehicle_id"].as_str().unwrap());
        assert_eq!(r.get::<_, i64>(1), ts_micros(&f["ts"]));
        let num = |i: usize, k: &str| {
            let got: Option<f64> = r.get(i);
            assert_eq!(got, f.get(k).and_then(Value::as_f64), "seq {} {k}", f["seq"]);
        };
        for (i, k) in [
            (3, "lat"),
            (4, "lon"),
            (5, "speed_kmh"),
            (6, "heading_deg"),
            (7, "alt_m"),
            (8, "accuracy_m"),
            (10, "odometer_m"),
        ] {
            num(i, k);
        }
        assert_eq!(r.get::<_, Option<i32>>(9).map(i64::from), f.get("satellites").and_then(Value::as_i64));
        assert_eq!(r.get::<_, Option<bool>>(11), None);
    }

    // 2. Redis holds the newest location by event time.
    let newest = frames.iter().max_by_key(|f| ts_micros(&f["ts"])).unwrap();
    let mut con = redis::Client::open(REDIS_URL).unwrap().get_connection().unwrap();
    let held: String = redis::cmd("HGET")
        .arg(format!("{prefix}vehicle:CSS-3BA199E2"))
        .arg("location")
        .query(&mut con)
        .unwrap();
    let held: Value = serde_json::from_str(&held).unwrap();
    assert_eq!(held["seq"], newest["seq"]);
    assert_eq!(held["lat"], newest["lat"]);

    // 3. A new instance (empty L1) serves from L2, then L1; after Redis is flushed, another
    //    serves from Postgres, then L1. Same answer every time.
    for (flush, first) in [(false, "l2"), (true, "postgres")] {
        if flush {
            redis_del_prefix(&prefix);
        }
        let dir = tempfile::tempdir().unwrap();
        let running = start(storage_config(dir.path(), &schema, &prefix)).await;
        let a = http_get(running.http_addr, "/v1/vehicles/CSS-3BA199E2").await.1;
        let b = http_get(running.http_addr, "/v1/vehicles/CSS-3BA199E2").await.1;
        assert_eq!(a["served_from"], first);
        assert_eq!(b["served_from"], "l1");
        assert_eq!(a["location"], l1_doc["location"], "{first} answers as L1 did");
        assert_eq!(b["location"], l1_doc["location"]);
        if flush {
            // The Postgres read filled L2 too (in the background).
            let key = format!("{prefix}vehicle:CSS-3BA199E2");
            wait_for("L2 filled from Postgres", Duration::from_secs(10), || {
                let held: Option<String> =
                    redis::cmd("HGET").arg(&key).arg("location").query(&mut con).ok()?;
                let held: Value = serde_json::from_str(&held?).ok()?;
                (held["seq"] == newest["seq"] && held["lat"] == newest["lat"]).then_some(())
            })
            .await;
        }
        running.stop().await.unwrap();
    }

    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
    redis_del_prefix(&prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ack_after_sinks_a_200_means_the_frames_are_already_in_postgres_and_parquet() {
    let id = unique().replace('-', "_");
    let schema = format!("fp_ack_{id}");
    let client = pg().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.postgres.url = Some(PG_URL.into());
    cfg.postgres.schema = schema.clone();
    cfg.pipeline.ack = fleetpipe::config::AckMode::Sinks;
    cfg.pipeline.ack_flush_ms = 20.0;
    cfg.parquet.roll_secs = 3600.0; // only the acknowledgement's flush commits Parquet files
    let running = start(cfg).await;
    let lines: Vec<&str> = DRIVE.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut sent = 0;
    for chunk in lines.chunks(300).take(3) {
        let (status, resp) =
            http_post(running.http_addr, chunk.join("\n").into_bytes(), "application/x-ndjson").await;
        assert_eq!(status, 200, "{resp}");
        sent += chunk.len();
        // No waiting: the answer came after both sinks committed.
        let rows: i64 =
            client.query_one(&format!("SELECT count(*) FROM {schema}.locations"), &[]).await.unwrap().get(0);
        assert_eq!(rows as usize, sent, "in Postgres when acknowledged");
        assert_eq!(read_parquet(dir.path(), "locations").len(), sent, "in Parquet when acknowledged");
    }
    running.stop().await.unwrap();
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}
