//! The `replay` and `simulate` commands against a running fleetpipe.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn fleetpipe_cmd(args: &[&str]) -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_fleetpipe")).args(args).env("RUST_LOG", "warn").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleetpipe {args:?} failed: {stderr}");
    // A run that went well warns of nothing (the end of the connection included).
    assert!(!stderr.contains("WARN") && !stderr.contains("ERROR"), "fleetpipe {args:?}: {stderr}");
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
    assert!(out.contains("replay: sent 2161 frames"), "{out}");
    assert!(out.contains("acknowledged 2161; rejected 0"), "{out}");
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
        .find_map(|l| l.strip_prefix("simulate: sent ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary in {out:?}"));
    assert!(sent >= 20, "{out}");
    assert!(
        out.contains(&format!("acknowledged {sent}; rejected -")),
        "every QoS 1 message acknowledged: {out}"
    );
    running.stop().await.unwrap();
    let locations = read_parquet(dir.path(), "locations");
    let diagnostics = read_parquet(dir.path(), "diagnostics");
    assert!(!diagnostics.is_empty(), "diagnostic frames too");
    assert_eq!(locations.len() + diagnostics.len(), sent, "every published frame stored once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_counts_what_the_api_accepted_and_rejected_and_prints_plain_progress_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let target = format!("http://{}", running.http_addr);
    let file = dir.path().join("mixed.ndjson");
    let good = |seq: u32| {
        format!(
            r#"{{"vehicle_id":"MIX-1","kind":"location","ts":"2026-11-25T21:00:0{seq}.000Z","seq":{seq},"lat":56.1,"lon":10.2}}"#
        )
    };
    let bad = r#"{"vehicle_id":"MIX-1","kind":"location","ts":"2026-11-25T21:00:09.000Z","seq":9,"lat":200.0,"lon":10.2}"#;
    std::fs::write(&file, [good(1), good(2), bad.to_owned(), good(3)].join("\n") + "\n").unwrap();
    let path = file.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
            .args(["replay", &path, "--target", &target])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("replay: sent 4 frames"), "{stdout}");
    assert!(stdout.contains("acknowledged 3; rejected 1"), "{stdout}");
    assert!(!stderr.contains('\u{1b}'), "no terminal codes off a terminal: {stderr:?}");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_works_against_the_gateway_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let port = running.mqtt_addr.unwrap().port().to_string();
    let frame = r#"{"vehicle_id":"VAN-1","ts":"2026-11-25T21:00:00.250Z","seq":1,"lat":56.1,"lon":10.2,"speed_kmh":33.8}"#;
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", "vehicles/VAN-1/location", "-m", frame])
        .status()
        .expect("mosquitto_pub (package mosquitto-clients) must be installed");
    assert!(status.success());
    let addr = running.http_addr;
    let doc = wait_for_vehicle(addr, "VAN-1").await;
    assert_eq!(doc["location"]["speed_kmh"], 33.8);
    assert_eq!(doc["location"]["ts"], "2026-11-25T21:00:00.250Z");
    let (status, near) = http_get(addr, "/v1/vehicles?near=56.1001,10.2&radius_m=100&limit=5").await;
    assert_eq!(status, 200);
    assert_eq!(near["vehicles"][0]["vehicle_id"], "VAN-1");
    assert_eq!(near["vehicles"][0]["distance_m"], 11.1);
    let (_, far) = http_get(addr, "/v1/vehicles?near=57.1,10.2&radius_m=100").await;
    assert_eq!(far["vehicles"], serde_json::json!([]));
    running.stop().await.unwrap();
}

async fn wait_for_vehicle(addr: std::net::SocketAddr, id: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, doc) = http_get(addr, &format!("/v1/vehicles/{id}")).await;
        if status == 200 {
            return doc;
        }
        assert!(std::time::Instant::now() < deadline, "vehicle {id} never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn simulate_against_an_unreachable_target_fails_at_once_and_names_the_address_and_the_cause() {
    for scheme in ["mqtt", "http"] {
        let port = free_port(); // nothing listens there
        let target = format!("{scheme}://127.0.0.1:{port}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
            .args(["simulate", "--vehicles", "3", "--duration", "30", "--target", &target])
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Not a speed assertion: a bound on waiting (the run itself would take 30 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(25);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "simulate kept going against {target}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!status.success(), "{target}: {stdout}");
        assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{target}: the address: {stderr}");
        assert!(stderr.contains("Connection refused"), "{target}: the cause: {stderr}");
        assert!(
            !stderr.contains("sent ") && !stdout.contains("frames in"),
            "{target}: nothing said sent: {stdout} {stderr}"
        );
        assert!(stderr.lines().count() <= 3, "{target}: one clear error, not a flood: {stderr}");
    }
}

#[test]
fn run_help_lists_the_environment_and_points_at_check() {
    let out = fleetpipe_cmd(&["run", "--help"]);
    for var in [
        "FLEETPIPE_POSTGRES_URL",
        "FLEETPIPE_GATEWAY_LISTEN",
        "FLEETPIPE_HTTP_ADDR",
        "RUST_LOG",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        assert!(out.contains(var), "{var} in {out}");
    }
    assert!(out.contains("fleetpipe check"), "{out}");
    assert!(fleetpipe_cmd(&["--help"]).contains("check"), "the check command is listed");
}
