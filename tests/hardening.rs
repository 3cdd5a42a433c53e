//! Abuse around the input: messages that hold no frame or go to a topic fleetpipe does not
//! know, a clock that runs ahead, a request of a million frames, reads without a token. Each
//! ends up stored, or rejected with a reason and kept — never silently dropped — and the
//! answers stay bounded.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use fleetpipe_ingest::auth::AuthMode;
use serde_json::{json, Value};

fn dead_letters(dir: &std::path::Path) -> Vec<Value> {
    fleetpipe_sinks::dead_letter::read_dead_letters(&dir.join("dead-letter")).unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_messages_without_a_frame_or_on_an_unknown_topic_are_rejected_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let mut p = Publisher::connect(running.mqtt_addr.unwrap().port()).await;
    let frame = |seq: u64| {
        serde_json::to_vec(&json!({"vehicle_id": "VAN-9", "ts": "2026-11-25T21:00:00Z", "seq": seq, "lat": 56.1, "lon": 10.2}))
            .unwrap()
    };
    // (topic, payload, the reason it must be kept under)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("vehicles/VAN-9/location", Vec::new(), "empty_frame"),
        ("vehicles/VAN-9/frames", b"[]".to_vec(), "empty_frame"),
        ("vehicles/VAN-9/diagnostic", frame(3), "empty_frame"),
        ("vehicles/VAN-9", frame(4), "invalid_topic"),
        ("vehicles/VAN-9/location/extra", frame(5), "invalid_topic"),
        ("$SYS/foo", frame(6), "invalid_topic"),
    ];
    for (topic, payload, _) in &cases {
        p.publish(topic, payload.clone()).await;
    }
    p.publish("vehicles/VAN-9/location", frame(7)).await;
    p.all_acked().await;

    let dead = wait_for("every refused message kept", Duration::from_secs(30), || {
        let d = dead_letters(dir.path());
        (d.len() >= cases.len()).then_some(d)
    })
    .await;
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in &dead {
        got.entry(d["reason"].as_str().unwrap().to_owned())
            .or_default()
            .push(d["topic"].as_str().unwrap().to_owned());
        assert!(d["detail"].as_str().is_some_and(|s| !s.is_empty()), "a clear detail: {d}");
    }
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (topic, _, reason) in &cases {
        expected.entry((*reason).to_owned()).or_default().push((*topic).to_owned());
    }
    for v in got.values_mut().chain(expected.values_mut()) {
        v.sort();
    }
    assert_eq!(got, expected);
    // The one good frame is stored, and the location sent to the diagnostic topic is not
    // stored as an empty diagnostic.
    let rows = wait_for("the good frame stored", Duration::from_secs(30), || {
        let rows = read_parquet(dir.path(), "locations");
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect::<Vec<_>>(), vec![7]);
    assert!(read_parquet(dir.path(), "diagnostics").is_empty());
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_an_hour_ahead_is_history_but_never_latest_state_in_any_tier() {
    let id = unique().replace('-', "_");
    let schema = format!("fp_ahead_{id}");
    let prefix = format!("fpahead:{id}:");
    let config = |dir: &std::path::Path| storage_config(dir, &schema, &prefix);
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path())).await;
    let now = now_ms();
    let frame = |seq: u64, ts: i64, lat: f64| json!({"vehicle_id": "CLOCK-1", "kind": "location", "ts": ts, "seq": seq, "lat": lat, "lon": 10.2});
    let post = |frames: Vec<Value>| {
        let body = serde_json::to_vec(&frames).unwrap();
        let addr = running.http_addr;
        async move {
            let (status, resp) = http_post(addr, body, "application/json").await;
            assert_eq!((status, resp["accepted"].as_u64()), (200, Some(frames.len() as u64)), "{resp}");
        }
    };
    // One request: the shard folds both frames in one batch, so once the genuine one is
    // latest the one ahead has been seen too — and has not moved latest state.
    post(vec![frame(1, now - 10_000, 56.1), frame(2, now + 3_600_000, 57.9)]).await;
    let latest = |want: u64| {
        let addr = running.http_addr;
        wait_for("latest state in L1", Duration::from_secs(30), move || {
            let (_, v) = block_on(http_get(addr, "/v1/vehicles/CLOCK-1"));
            (v["location"]["seq"].as_u64().is_some())
                .then_some(v)
                .filter(|v| want == 0 || v["location"]["seq"] == want)
        })
    };
    let v = latest(0).await;
    assert_eq!(v["location"]["seq"], 1, "the frame an hour ahead is not latest: {v}");
    post(vec![frame(3, now, 56.2)]).await; // a genuine later frame moves it
    let v = latest(3).await;
    assert_eq!(v["served_from"], "l1", "{v}");

    // History holds all three.
    let client = pg().await;
    let sql = format!("SELECT seq FROM {schema}.locations WHERE vehicle_id = 'CLOCK-1' ORDER BY seq");
    let seqs = wait_for("three rows in Postgres", Duration::from_secs(30), || {
        let rows = block_on(client.query(&sql, &[]));
        let seqs: Vec<i64> = rows.map(|r| r.iter().map(|r| r.get::<_, i64>(0)).collect()).unwrap_or_default();
        (seqs.len() >= 3).then_some(seqs)
    })
    .await;
    assert_eq!(seqs, vec![1, 2, 3]);
    let text =
        reqwest::get(format!("http://{}/metrics", running.http_addr)).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "fleetpipe_frames_clock_ahead_total"), 1.0);
    assert_eq!(metric(&text, "fleetpipe_frames_rejected_total{reason=\"future_ts\"}"), 0.0);
    running.stop().await.unwrap();

    // A fresh instance (empty L1) reads Redis, then, with Redis emptied, Postgres: neither
    // serves the frame that was ahead.
    let dir2 = tempfile::tempdir().unwrap();
    let running = start(config(dir2.path())).await;
    let (_, v) = http_get(running.http_addr, "/v1/vehicles/CLOCK-1").await;
    assert_eq!((v["location"]["seq"].as_u64(), v["served_from"].as_str()), (Some(3), Some("l2")), "{v}");
    running.stop().await.unwrap();
    let redis = redis::Client::open(REDIS_URL).unwrap();
    let mut con = redis.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut con).unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL").arg(keys).query(&mut con).unwrap();
    let dir3 = tempfile::tempdir().unwrap();
    let running = start(config(dir3.path())).await;
    let (_, v) = http_get(running.http_addr, "/v1/vehicles/CLOCK-1").await;
    assert_eq!(
        (v["location"]["seq"].as_u64(), v["served_from"].as_str()),
        (Some(3), Some("postgres")),
        "{v}"
    );
    running.stop().await.unwrap();
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_empty_objects_get_a_bounded_answer_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let body = format!("[{}]", vec!["{}"; 1_000_000].join(","));
    let (status, resp) = http_post(running.http_addr, body.into_bytes(), "application/json").await;
    assert_eq!(status, 200);
    let listed = resp["rejected"].as_array().unwrap();
    assert_eq!(listed.len(), fleetpipe_ingest::http::MAX_LISTED_REJECTIONS);
    assert!(listed.iter().all(|r| r["reason"] == "missing_field"));
    // 10,000 frames (the per-message limit) each refused, and the excess as one.
    assert_eq!((resp["accepted"].as_u64(), resp["rejected_total"].as_u64()), (Some(0), Some(10_001)));
    let dead = wait_for("every rejection kept", Duration::from_secs(60), || {
        let d = dead_letters(dir.path());
        (d.len() >= 10_001).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 10_001);
    assert_eq!(dead.iter().filter(|d| d["reason"] == "too_many_frames").count(), 1);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_token_auth_every_read_and_metrics_need_a_token_but_probes_and_the_admin_listener_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.auth.mode = Some(AuthMode::Token);
    cfg.http.admin_addr = Some(([127, 0, 0, 1], free_port()).into());
    let admin = cfg.http.admin_addr.unwrap();
    let token = credentials(dir.path(), &["add", "VAN-A"]);
    let running = start(cfg).await;
    let base = format!("http://{}", running.http_addr);
    let client = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut r = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    let guarded =
        ["/v1/vehicles/VAN-A", "/v1/vehicles/VAN-A/track", "/v1/vehicles?near=56.1,10.2", "/metrics"];
    for path in guarded {
        assert_eq!(get(path, None).await, 401, "{path} without a token");
        assert_eq!(get(path, Some("not-a-token")).await, 401, "{path} with a wrong token");
    }
    for path in ["/health", "/ready"] {
        assert_eq!(get(path, None).await, 200, "{path} is a probe");
    }
    assert_eq!(get("/metrics", Some(&token)).await, 200);
    assert_eq!(get("/v1/vehicles/VAN-A", Some(&token)).await, 404, "its own vehicle, not seen yet");
    assert_eq!(get("/v1/vehicles/VAN-B", Some(&token)).await, 403, "another vehicle");
    let open = reqwest::get(format!("http://{admin}/metrics")).await.unwrap();
    assert_eq!(open.status().as_u16(), 200);
    assert!(open.text().await.unwrap().contains("fleetpipe_auth_failures_total"));
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_broker_over_mutual_tls_delivers_to_fleetpipe() {
    let pki = Pki::new();
    let broker = Mosquitto::start_tls(&pki);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(format!("mqtts://127.0.0.1:{}", broker.port)));
    cfg.mqtt.tls_ca = Some(pki.path("ca.pem").into());
    cfg.mqtt.tls_cert = Some(pki.path("client.pem").into());
    cfg.mqtt.tls_key = Some(pki.path("client.key").into());
    let running = start(cfg).await;
    let frame = r#"{"vehicle_id":"TLS-1","ts":"2026-11-25T21:00:00.250Z","seq":1,"lat":56.1,"lon":10.2}"#;
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1"])
        .args([
            "--cafile",
            &pki.path("ca.pem"),
            "--cert",
            &pki.path("client.pem"),
            "--key",
            &pki.path("client.key"),
        ])
        .args(["-t", "vehicles/TLS-1/location", "-m", frame])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = wait_for("the frame through the TLS broker", Duration::from_secs(30), || {
        let rows = read_parquet(dir.path(), "locations");
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!((rows.len(), rows[0]["vehicle_id"].as_str()), (1, Some("TLS-1")));
    running.stop().await.unwrap();
}
