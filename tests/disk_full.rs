//! A full disk is a state, not an ending: with the data directory on a small tmpfs, ingestion
//! fills it, fleetpipe pushes back (HTTP 503 at once, nothing acknowledged that is not stored),
//! and once the filesystem has room again it resumes by itself; every acknowledged frame ends up
//! in Parquet exactly once, and SIGTERM exits 0. (Its own test binary: it mounts a filesystem
//! and asserts on process-wide counters.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn batch(first: u64, n: u64) -> Vec<u8> {
    let lines: Vec<String> = (first..first + n)
        .map(|seq| {
            format!(
                r#"{{"vehicle_id":"DISK-1","kind":"location","ts":{},"seq":{seq},"lat":56.{:06},"lon":10.213695,"speed_kmh":33.8}}"#,
                1_795_640_400_000i64 + seq as i64 * 100,
                seq % 1_000_000
            )
        })
        .collect();
    lines.join("\n").into_bytes()
}

async fn post(port: u16, body: Vec<u8>) -> (u16, Option<String>) {
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/frames"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), retry_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pushes_back_and_ingestion_resumes_by_itself_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fs = Tmpfs::mount(&data, "3m");
    let http_port = free_port();
    let config = dir.path().join("fleetpipe.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http_port}\"\n[gateway]\nlisten = \"127.0.0.1:{}\"\n\
             [parquet]\nroll_secs = 0.3\n[dead_letter]\nroll_secs = 0.3\n",
            data.display(),
            free_port()
        ),
    )
    .unwrap();
    let fp = Fleetpipe::start(&config, http_port).await;

    // One client streams batches of 500 frames and notes which were acknowledged.
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let writer = {
        let (acked, next) = (acked.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let first = next.fetch_add(500, std::sync::atomic::Ordering::SeqCst);
                if first > 200_000 {
                    return;
                }
                match post(http_port, batch(first, 500)).await.0 {
                    200 => acked.lock().unwrap().extend(first..first + 500),
                    503 => tokio::time::sleep(Duration::from_millis(20)).await,
                    s => panic!("unexpected status {s}"),
                }
            }
        })
    };

    // The disk fills: the log cannot be written, ingestion pauses — a new request is refused at
    // once, with Retry-After, and the instance stays alive and ready.
    wait_for("the log to hit the full disk", Duration::from_secs(60), || {
        let errors = block_on(fp.metric("fleetpipe_wal_errors_total"));
        (errors > 0.0).then_some(())
    })
    .await;
    let (status, retry_after) = post(http_port, batch(900_000, 10)).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")));
    assert_eq!(fp.metric("fleetpipe_wal_full").await, 1.0);
    for probe in ["health", "ready"] {
        let r = reqwest::get(format!("http://127.0.0.1:{http_port}/{probe}")).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "/{probe} while the disk is full");
    }
    let acked_while_full = acked.lock().unwrap().len();

    // Room again: ingestion resumes by itself.
    fs.resize("256m");
    wait_for("acknowledgements to resume", Duration::from_secs(60), || {
        (acked.lock().unwrap().len() >= acked_while_full + 5_000).then_some(())
    })
    .await;
    writer.abort();
    let _ = writer.await;
    assert_eq!(fp.metric("fleetpipe_wal_full").await, 0.0);

    // Every acknowledged frame is in Parquet exactly once. (A request cut off by the abort may
    // have been stored without its answer being seen: only acknowledged ones are required, and
    // none may appear twice.)
    let acked = acked.lock().unwrap().clone();
    let rows = wait_for("every accepted frame in Parquet", Duration::from_secs(60), || {
        let rows = read_parquet(&data, "locations");
        let seqs: BTreeSet<u64> = rows.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        let accepted = block_on(fp.metric("fleetpipe_frames_accepted_total{kind=\"location\"}"));
        (acked.is_subset(&seqs) && rows.len() as f64 >= accepted).then_some(rows)
    })
    .await;
    let seqs: Vec<u64> = rows.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(seqs.len(), unique.len(), "no frame stored twice");
    let stray: Vec<u64> = unique.difference(&acked).copied().collect();
    assert!(stray.len() <= 500, "at most the one request whose answer the abort cut off: {}", stray.len());
    assert!(!unique.contains(&900_000), "the request refused while the disk was full is not stored");

    // The accounting holds: everything received was accepted (none was rejected), and stored.
    let received = fp.metric("fleetpipe_frames_received_total{source=\"http\"}").await;
    let accepted = fp.metric("fleetpipe_frames_accepted_total{kind=\"location\"}").await;
    assert_eq!(received, accepted);
    assert_eq!(accepted, unique.len() as f64);
    assert_eq!(
        fp.metric("fleetpipe_frames_in_flight").await,
        0.0,
        "received = accepted + rejected + in flight"
    );
    assert!(fp.sigterm().success(), "SIGTERM after a full disk exits 0");
}
