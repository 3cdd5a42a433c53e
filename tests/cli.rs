//! The `replay` and `simulate` commands against a running fleetpipe.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn fleetpipe_cmd(args: &[&str]) -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_fleetpipe")).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "fleetpipe {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_the_recorded_drive_over_http_and_every_frame_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let target = format!("http://{}", running.http_addr);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/css-drive-aarhus-2021-07-26-am.ndjson");
    let out = tokio::task::spawn_blocking(move || fleetpipe_cmd(&["replay", file, "--target", &target]))
        .await
        .unwrap();
    assert!(out.contains("replay: 2161 frames"), "{out}");
    let frames = drive_frames();
    let rows = wait_for("the drive in Parquet", Duration::from_secs(30), || {
        let rows = read_parquet(dir.path(), "locations");
        (rows.len() >= frames.len()).then_some(rows)
    })
    .await;
    assert_locations_equal(&rows, &frames);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_publishes_both_kinds_over_mqtt_and_every_frame_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let target = format!("mqtt://{}", running.mqtt_addr.unwrap());
    let out = tokio::task::spawn_blocking(move || {
        fleetpipe_cmd(&["simulate", "--vehicles", "20", "--hz", "10", "--duration", "1", "--target", &target])
    })
    .await
    .unwrap();
    let sent: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("simulate: ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary in {out:?}"));
    assert!(sent >= 20, "{out}");
    running.stop().await.unwrap();
    let locations = read_parquet(dir.path(), "locations");
    let diagnostics = read_parquet(dir.path(), "diagnostics");
    assert!(!diagnostics.is_empty(), "diagnostic frames too");
    assert_eq!(locations.len() + diagnostics.len(), sent, "every published frame stored once");
}
