//! The fleetpipe binary killed with SIGKILL mid-stream, or stopped with SIGTERM under load, then
//! restarted: every frame the broker acknowledged to the vehicle is in Parquet (and, in the
//! kill -9 case, in Postgres) exactly once, redeliveries and the log's replay included.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn write_config(
    dir: &Path,
    broker: &Mosquitto,
    http_port: u16,
    pg_schema: Option<&str>,
) -> std::path::PathBuf {
    let path = dir.join("fleetpipe.toml");
    let mut text = format!(
        "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http_port}\"\n[mqtt]\nurl = \"{}\"\nclient_id = \"fleetpipe-crash-{}\"\n\
         [parquet]\nroll_secs = 0.5\n[dead_letter]\nroll_secs = 0.5\n",
        dir.join("data").display(),
        broker.url(),
        unique()
    );
    if let Some(schema) = pg_schema {
        text.push_str(&format!("[postgres]\nurl = \"{PG_URL}\"\nschema = \"{schema}\"\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Publishes the drive slowly enough that a stop lands mid-stream.
fn publish_drive(port: u16) -> tokio::task::JoinHandle<Publisher> {
    tokio::spawn(async move {
        let mut p = Publisher::connect(port).await;
        for (i, f) in drive_frames().iter().enumerate() {
            p.publish_frame(f).await;
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        p.all_acked().await;
        p
    })
}

async fn assert_all_stored_once(data: &Path) {
    let frames = drive_frames();
    let rows = wait_for("every frame in Parquet", Duration::from_secs(60), || {
        let rows = read_parquet(data, "locations");
        (rows.len() >= frames.len()).then_some(rows)
    })
    .await;
    assert_locations_equal(&rows, &frames);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_stores_every_acknowledged_frame_exactly_once() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let schema = format!("fp_crash_{}", unique().replace('-', "_"));
    let config = write_config(dir.path(), &broker, http_port, Some(&schema));
    let fp = Fleetpipe::start(&config, http_port).await;
    let publisher = publish_drive(broker.port);
    let mut written = 0.0;
    for _ in 0..600 {
        written = fp.metric("fleetpipe_frames_written_total{sink=\"wal\"}").await;
        if written >= 400.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(written >= 400.0, "only {written} frames durable");
    fp.kill9();
    let publisher = publisher.await.unwrap();
    assert_eq!(publisher.acked(), drive_frames().len() as u64, "the broker acknowledged every frame");
    let fp = Fleetpipe::start(&config, http_port).await;
    assert_all_stored_once(&dir.path().join("data")).await;
    // After a drain nothing is pending anywhere: replayed and redelivered frames were folded
    // into the same rows, not added as copies.
    assert!(fp.sigterm().success());
    assert_locations_equal(&read_parquet(&dir.path().join("data"), "locations"), &drive_frames());
    // Postgres too: every frame once (its checkpoint moves in the rows' transaction; a redo
    // after the crash meets the unique index and is folded in).
    let client = pg().await;
    let row = client
        .query_one(
            &format!("SELECT count(*), count(DISTINCT (vehicle_id, ts, seq)) FROM {schema}.locations"),
            &[],
        )
        .await
        .unwrap();
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(rows as usize, drive_frames().len(), "every acknowledged frame in Postgres");
    assert_eq!(distinct, rows, "none twice");
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_a_restart_loses_nothing() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let config = write_config(dir.path(), &broker, http_port, None);
    let fp = Fleetpipe::start(&config, http_port).await;
    let publisher = publish_drive(broker.port);
    for _ in 0..600 {
        if fp.metric("fleetpipe_frames_written_total{sink=\"wal\"}").await >= 400.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = fp.sigterm();
    assert!(status.success(), "graceful stop exits 0, got {status}");
    // What was acknowledged before the stop is already in Parquet: the drain closed the files.
    let before = read_parquet(&dir.path().join("data"), "locations").len();
    assert!(before >= 400, "only {before} rows after the drain");
    publisher.await.unwrap();
    let fp = Fleetpipe::start(&config, http_port).await;
    assert_all_stored_once(&dir.path().join("data")).await;
    assert!(fp.sigterm().success());
    assert_locations_equal(&read_parquet(&dir.path().join("data"), "locations"), &drive_frames());
}
