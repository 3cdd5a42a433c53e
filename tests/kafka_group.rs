//! Scale-out on Kafka: two fleetpipe processes in one consumer group share the input topic's
//! partitions; one is killed with SIGKILL mid-stream, the other takes its partitions over, and
//! once the killed one is back (its write-ahead log replayed) every frame `fleetpipe simulate`
//! produced is in Postgres exactly once and in the instances' Parquet files.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn write_config(dir: &Path, http_port: u16, brokers: &str, group: &str, schema: &str, name: &str) -> PathBuf {
    let path = dir.join("fleetpipe.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http_port}\"\n[gateway]\nlisten = \"127.0.0.1:{}\"\n\
             [parquet]\nroll_secs = 0.5\n[postgres]\nurl = \"{PG_URL}\"\nschema = \"{schema}\"\n\
             [kafka]\nbrokers = \"{brokers}\"\ngroup = \"{group}\"\nclient_id = \"{name}\"\nclean_topic = \"\"\ndlq_topic = \"\"\nevents_topic = \"\"\n",
            dir.join("data").display(),
            free_port(),
        ),
    )
    .unwrap();
    path
}

/// `fleetpipe simulate` over Kafka; returns how many frames it produced (all acknowledged).
fn simulate(brokers: &str, secs: &str) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
        .args(["simulate", "--vehicles", "200", "--hz", "5", "--duration", secs, "--target"])
        .arg(format!("kafka://{brokers}/vehicle-frames"))
        .output()
        .unwrap();
    assert!(out.status.success(), "simulate: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    // "simulate: sent N frames in S s (R frames/s); acknowledged N; rejected …"
    assert!(text.contains("; acknowledged "), "summary: {text}");
    text.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("summary: {text}"))
}

/// (rows, distinct identities) over both tables.
async fn pg_counts(client: &tokio_postgres::Client, schema: &str) -> (i64, i64) {
    let sql = format!(
        "SELECT count(*), count(DISTINCT (vehicle_id, ts, seq)) FROM \
         (SELECT vehicle_id, ts, seq FROM {schema}.locations UNION ALL SELECT vehicle_id, ts, seq FROM {schema}.diagnostics) t"
    );
    client.query_one(&sql, &[]).await.map(|r| (r.get(0), r.get(1))).unwrap_or((0, 0))
}

async fn wait_pg(client: &tokio_postgres::Client, schema: &str, want: u64, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (rows, _) = pg_counts(client, schema).await;
        if rows as u64 >= want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {rows} of {want} rows in Postgres");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parquet_keys(data: &Path) -> BTreeSet<(String, i64, i64)> {
    let mut keys = BTreeSet::new();
    for table in ["locations", "diagnostics"] {
        for row in read_parquet(data, table) {
            let id = row["vehicle_id"].as_str().unwrap().to_owned();
            keys.insert((id, row["ts"].as_i64().unwrap(), row["seq"].as_i64().unwrap()));
        }
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_and_killing_one_loses_nothing() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    kafka_client(&["create", &brokers, "vehicle-frames", "4"]);
    let schema = format!("fp_group_{}", unique().replace('-', "_"));
    let group = format!("fleetpipe-{}", unique());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (port_a, port_b) = (free_port(), free_port());
    let config_a = write_config(dir_a.path(), port_a, &brokers, &group, &schema, "fleetpipe-a");
    let config_b = write_config(dir_b.path(), port_b, &brokers, &group, &schema, "fleetpipe-b");
    let a = Fleetpipe::start(&config_a, port_a).await;
    let b = Fleetpipe::start(&config_b, port_b).await;
    let client = pg().await;

    // Both members get partitions: both take frames.
    let first = simulate(&brokers, "2");
    wait_pg(&client, &schema, first, "before the kill").await;
    for (name, fp) in [("a", &a), ("b", &b)] {
        let taken = fp.metric("fleetpipe_frames_received_total{source=\"kafka\"}").await;
        assert!(taken > 0.0, "instance {name} received no partition");
    }

    // A dies; B takes its partitions over (after the group's session timeout).
    a.kill9();
    let second = simulate(&brokers, "2");
    wait_pg(&client, &schema, first + second, "after the kill, through b alone").await;

    // A comes back with its data directory: its log replays what it had acknowledged.
    let a = Fleetpipe::start(&config_a, port_a).await;
    assert!(a.sigterm().success());
    assert!(b.sigterm().success());
    let (rows, distinct) = pg_counts(&client, &schema).await;
    assert_eq!(rows as u64, first + second, "every produced frame in Postgres");
    assert_eq!(distinct, rows, "none twice");
    let mut parquet = parquet_keys(&dir_a.path().join("data"));
    parquet.extend(parquet_keys(&dir_b.path().join("data")));
    assert_eq!(parquet.len() as u64, first + second, "every produced frame in the instances' Parquet files");
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_and_restart_stores_every_record_once() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    kafka_client(&["create", &brokers, "vehicle-frames", "2"]);
    let schema = format!("fp_kcrash_{}", unique().replace('-', "_"));
    let group = format!("fleetpipe-{}", unique());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, &brokers, &group, &schema, "fleetpipe-crash");
    let records = 30_000usize;
    let input = dir.path().join("input.ndjson");
    write_location_lines(&input, "KC", records);
    kafka_client(&["produce", &brokers, "vehicle-frames", input.to_str().unwrap()]);

    // Killed once part of the topic is durable, before all of it is.
    let fp = Fleetpipe::start(&config, port).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let written = fp.metric("fleetpipe_frames_written_total{sink=\"wal\"}").await;
        if written >= 2_000.0 {
            assert!(written < records as f64, "all {written} durable before the kill: make the topic larger");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "only {written} frames durable");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fp.kill9();

    // Restarted: it reads on from the committed offsets (some records again) and replays its log.
    let fp = Fleetpipe::start(&config, port).await;
    let client = pg().await;
    wait_pg(&client, &schema, records as u64, "after the restart").await;
    assert!(fp.sigterm().success());
    let (rows, distinct) = pg_counts(&client, &schema).await;
    assert_eq!((rows, distinct), (records as i64, records as i64), "Postgres: every record once");
    let parquet = read_parquet(&dir.path().join("data"), "locations");
    let seqs: BTreeSet<i64> = parquet.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs.len(), records, "Parquet: every record");
    assert_eq!(parquet.len(), records, "Parquet: none twice (re-read records are de-duplicated)");
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}
