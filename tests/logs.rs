//! What fleetpipe logs in normal operation, with the default filter (no `RUST_LOG`): no ERROR
//! and no WARN while vehicles connect, publish good and bad frames over the gateway, HTTP and a
//! Teltonika connection, and the instance drains; JSON lines with `FLEETPIPE_LOG_FORMAT=json`;
//! plain text without colour codes when standard error is not a terminal. `GET /` says what
//! the server is.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Runs a normal session against a fresh instance with `format` (`None`: the default); its log.
async fn session(format: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (http, gw, tt) = (free_port(), free_port(), free_port());
    let config = dir.path().join("fleetpipe.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http}\"\n[gateway]\nlisten = \"127.0.0.1:{gw}\"\n\
             [teltonika]\nlisten = \"127.0.0.1:{tt}\"\n[parquet]\nroll_secs = 0.3\n[dead_letter]\nroll_secs = 0.3\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetpipe"));
    cmd.args(["run", "--config"]).arg(&config).env_remove("RUST_LOG").stdout(Stdio::null());
    cmd.stderr(std::fs::File::create(&log).unwrap());
    if let Some(f) = format {
        cmd.env("FLEETPIPE_LOG_FORMAT", f);
    }
    let mut child = cmd.spawn().unwrap();
    wait_for("ready", Duration::from_secs(30), || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).ok()?;
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        r.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    // Every counter a dashboard rates is there, at 0, before the first frame.
    let before = scrape(http);
    for series in [
        r#"fleetpipe_frames_received_total{source="mqtt"}"#,
        r#"fleetpipe_frames_received_total{source="teltonika"}"#,
        r#"fleetpipe_frames_received_total{source="http"}"#,
        r#"fleetpipe_frames_accepted_total{kind="location"}"#,
        r#"fleetpipe_frames_rejected_total{reason="malformed_json"}"#,
        r#"fleetpipe_frames_written_total{sink="parquet"}"#,
        r#"fleetpipe_frames_written_total{sink="wal"}"#,
        "fleetpipe_frames_duplicate_total",
    ] {
        assert!(
            before.lines().any(|l| l == format!("{series} 0")),
            "{series} 0 before the first frame: {before}"
        );
    }
    let frame = r#"{"vehicle_id":"VAN-1","ts":"2026-11-25T21:00:00.250Z","seq":1,"lat":56.1,"lon":10.2}"#;
    for (qos, payload) in
        [("1", frame), ("1", "hello"), ("0", frame), ("1", r#"{"vehicle_id":"VAN-1","lat":91}"#)]
    {
        let ok = Command::new("mosquitto_pub")
            .args(["-p", &gw.to_string(), "-q", qos, "-t", "vehicles/VAN-1/location", "-m", payload])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let addr = format!("127.0.0.1:{http}").parse().unwrap();
    let (status, _) = http_post(addr, frame.as_bytes().to_vec(), "application/json").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(addr, "/v1/vehicles/VAN-1").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(addr, "/v1/vehicles/nobody").await;
    assert_eq!(status, 404);
    let (status, index) = http_get(addr, "/").await;
    assert_eq!(status, 200, "GET / says what this is: {index}");
    assert_eq!(index["name"], "fleetpipe");
    assert!(index["endpoints"]["POST /v1/frames"].is_string(), "{index}");
    // A tracker: handshake, then a packet that does not decode (answered with zero).
    let mut t = std::net::TcpStream::connect(("127.0.0.1", tt)).unwrap();
    t.write_all(&[0, 15]).unwrap();
    t.write_all(b"356307042441013").unwrap();
    let mut b = [0u8; 4];
    t.read_exact(&mut b[..1]).unwrap();
    assert_eq!(b[0], 1);
    t.write_all(&[0, 0, 0, 0, 0, 0, 0, 3, 8, 1, 1, 0, 0, 0, 0]).unwrap();
    t.read_exact(&mut b).unwrap();
    assert_eq!(b, [0, 0, 0, 0]);
    drop(t);
    let data = dir.path().join("data");
    wait_for("the rejections kept", Duration::from_secs(30), || {
        let d = fleetpipe_sinks::dead_letter::read_dead_letters(&data.join("dead-letter")).unwrap();
        (d.len() >= 3).then_some(())
    })
    .await;
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_operation_logs_no_error_or_warning_and_json_lines_on_request() {
    let text = session(Some("json")).await;
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "fleetpipe started" && l["fields"]["http"].is_string()),
        "the start line, with its fields: {text}"
    );
    assert!(lines.iter().any(|l| l["fields"]["message"] == "fleetpipe stopped"), "{text}");
    let loud: Vec<&Value> = lines.iter().filter(|l| l["level"] == "ERROR" || l["level"] == "WARN").collect();
    assert!(loud.is_empty(), "no ERROR or WARN in normal operation: {loud:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_logs_off_a_terminal_carry_no_colour_codes() {
    let text = session(None).await;
    assert!(text.contains("fleetpipe started"), "{text}");
    assert!(!text.contains('\u{1b}'), "no ANSI escapes in a log file: {text}");
    for l in text.lines() {
        assert!(!l.contains(" ERROR ") && !l.contains(" WARN "), "no ERROR or WARN in normal operation: {l}");
    }
}
