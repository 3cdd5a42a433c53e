//! The live fleet console: its reads (`/v1/console/snapshot`) with token auth, and the page in
//! a real headless browser (Debian's chromium, driven by playwright-core from npm: see
//! `tests/console/console_check.mjs`) — it loads without console errors, lists the vehicles
//! published, updates when a new frame arrives, and shows a vehicle's state when clicked.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

fn frame(id: &str, second: u32, lat: f64) -> String {
    format!(
        r#"{{"vehicle_id":"{id}","kind":"location","ts":"2026-12-02T17:00:{second:02}.000Z","seq":{second},"lat":{lat},"lon":10.2,"speed_kmh":42.5}}"#
    )
}

async fn post(addr: std::net::SocketAddr, token: &str, body: String) -> u16 {
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/frames"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
    accept: &str,
) -> (u16, String, String) {
    let mut req = reqwest::Client::new().get(format!("http://{addr}{path}")).header("accept", accept);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_the_fleet_live_in_a_real_browser_with_token_auth() {
    let dir = tempfile::tempdir().unwrap();
    let ops = credentials(dir.path(), &["add", "--name", "ops", "--scope", "*"]);
    let van1 = credentials(dir.path(), &["add", "VAN-1"]);
    let mut cfg = test_config(dir.path(), None);
    cfg.auth.mode = Some(fleetpipe_ingest::auth::AuthMode::Token);
    let running = start(cfg).await;
    let addr = running.http_addr;
    assert_eq!(post(addr, &ops, frame("VAN-1", 1, 56.1)).await, 200);
    assert_eq!(post(addr, &ops, frame("VAN-2", 1, 56.2)).await, 200);
    assert_eq!(post(addr, &ops, frame("VAN-1", 0, 50.0)).await, 200, "older: history, not latest");

    // The page and its assets are open; a browser gets HTML, anything else the JSON index.
    let (status, ct, html) = get(addr, "/", None, "text/html,application/xhtml+xml").await;
    assert_eq!((status, ct.starts_with("text/html")), (200, true), "{ct}");
    assert!(html.contains("/console/app.js"), "{html}");
    let (status, ct, _) = get(addr, "/", None, "*/*").await;
    assert_eq!((status, ct.as_str()), (200, "application/json"));
    for (path, ct) in [
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
        ("/console/land.json", "application/json"),
    ] {
        let (status, got, body) = get(addr, path, None, "*/*").await;
        assert_eq!(status, 200, "{path}");
        assert!(got.starts_with(ct), "{path}: {got}");
        assert!(body.len() > 100, "{path}");
    }
    // The reads ask for a token, and show only what it covers.
    assert_eq!(get(addr, "/v1/console/snapshot", None, "*/*").await.0, 401);
    // Durable (200) comes before latest state is updated: wait for the shards.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let snap = loop {
        let (status, _, body) = get(addr, "/v1/console/snapshot", Some(&ops), "*/*").await;
        assert_eq!(status, 200);
        let snap: Value = serde_json::from_str(&body).unwrap();
        if snap["vehicles_total"] == 2 && snap["counters"]["accepted"]["location"] == 3.0 {
            break snap;
        }
        assert!(std::time::Instant::now() < deadline, "two vehicles in the snapshot: {snap}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        snap["vehicles"],
        json!([
            {"vehicle_id": "VAN-1", "ts": "2026-12-02T17:00:01.000Z", "lat": 56.1, "lon": 10.2, "speed_kmh": 42.5, "heading_deg": null},
            {"vehicle_id": "VAN-2", "ts": "2026-12-02T17:00:01.000Z", "lat": 56.2, "lon": 10.2, "speed_kmh": 42.5, "heading_deg": null},
        ])
    );
    assert_eq!(snap["counters"]["received"]["http"], 3.0);
    assert_eq!(snap["counters"]["accepted"]["location"], 3.0);
    assert_eq!(snap["track_available"], false);
    assert!(snap["queues"].as_array().unwrap().iter().any(|q| q["stage"] == "intake"), "{snap}");
    let (_, _, body) = get(addr, "/v1/console/snapshot", Some(&van1), "*/*").await;
    let mine: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (mine["vehicles_total"].clone(), mine["vehicles"][0]["vehicle_id"].clone()),
        (json!(1), json!("VAN-1"))
    );

    // The page in chromium.
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    let _ = std::fs::remove_file(&screenshot);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console/console_check.mjs");
    let (url, shot, token, next) =
        (format!("http://{addr}/"), screenshot.display().to_string(), ops.clone(), frame("VAN-3", 2, 56.3));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args(["--url", &url, "--token", &token, "--expect", "VAN-1,VAN-2"])
            .args(["--post-frame", &next, "--expect-after", "VAN-3", "--screenshot", &shot])
            .output()
            .expect("node (Debian's nodejs) must be installed; scripts/test.sh installs it")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("no report: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["rows"], json!(["VAN-1", "VAN-2", "VAN-3"]), "{report}");
    assert_eq!(report["console_errors"], json!([]), "{report}");
    assert!(report["snapshots"].as_u64().unwrap() >= 2, "it updated live: {report}");
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "a screenshot in {}",
        screenshot.display()
    );
    // The frame the browser check posted is stored like any other.
    let (status, _, body) = get(addr, "/v1/vehicles/VAN-3", Some(&ops), "*/*").await;
    assert_eq!(status, 200, "{body}");
    running.stop().await.unwrap();
}
