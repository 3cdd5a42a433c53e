//! `fleetpipe check` against real services: every configured one reached and named, and each
//! thing that cannot work (nothing listening, a taken port, a bad file) a FAIL line that says
//! where and why, with a non-zero exit.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Runs `fleetpipe check --config FILE`: (success, stdout lines).
fn check(config: &Path) -> (bool, Vec<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
        .args(["check", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("FLEETPIPE_MQTT_URL")
        .env_remove("FLEETPIPE_POSTGRES_URL")
        .env_remove("FLEETPIPE_REDIS_URL")
        .env_remove("FLEETPIPE_KAFKA_BROKERS")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (out.status.success(), stdout.lines().map(str::to_owned).collect())
}

fn line<'a>(lines: &'a [String], status: &str, what: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.split_whitespace().take(2).eq([status, what]))
        .unwrap_or_else(|| panic!("no `{status} {what}` line in {lines:#?}"))
}

#[test]
fn every_configured_service_is_reached_and_named() {
    let broker = Mosquitto::start();
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetpipe.toml");
    let (http, gw) = (free_port(), free_port());
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}/data\"\n[http]\naddr = \"127.0.0.1:{http}\"\n[gateway]\nlisten = \"127.0.0.1:{gw}\"\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n[kafka]\nbrokers = \"{}\"\n\
             [postgres]\nurl = \"{PG_URL}\"\n[redis]\nurl = \"{REDIS_URL}\"\n",
            dir.path().display(),
            broker.port,
            kafka.brokers()
        ),
    )
    .unwrap();
    let (ok, lines) = check(&config);
    assert!(ok, "{lines:#?}");
    assert!(line(&lines, "ok", "config").contains("fleetpipe.toml"), "{lines:#?}");
    assert!(line(&lines, "ok", "data").contains("writable"), "{lines:#?}");
    assert!(dir.path().join("data").is_dir(), "the data directory is made");
    assert_eq!(std::fs::read_dir(dir.path().join("data")).unwrap().count(), 0, "and left empty");
    let listens: Vec<&String> = lines.iter().filter(|l| l.starts_with("ok    listen")).collect();
    assert!(listens.iter().any(|l| l.contains(&format!("127.0.0.1:{gw}"))), "{lines:#?}");
    assert!(listens.iter().any(|l| l.contains(&format!("127.0.0.1:{http}"))), "{lines:#?}");
    assert!(
        line(&lines, "ok", "mqtt").contains(&format!("127.0.0.1:{}: connected", broker.port)),
        "{lines:#?}"
    );
    assert!(line(&lines, "ok", "kafka").contains("1 broker(s)"), "{lines:#?}");
    assert!(
        line(&lines, "ok", "postgres").contains("127.0.0.1:5432/postgres as postgres: PostgreSQL"),
        "{lines:#?}"
    );
    assert!(line(&lines, "ok", "redis").contains("Redis "), "{lines:#?}");
    assert_eq!(lines.last().map(String::as_str), Some("everything fleetpipe needs is there"));
}

#[test]
fn what_cannot_work_fails_with_its_address_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (pg, redis, broker, gw) = (free_port(), free_port(), free_port(), free_port());
    let config = dir.path().join("fleetpipe.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{taken_port}\"\n[gateway]\nlisten = \"127.0.0.1:{gw}\"\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{broker}\"\n\
             [postgres]\nurl = \"postgres://postgres@127.0.0.1:{pg}/fleet\"\n[redis]\nurl = \"redis://127.0.0.1:{redis}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (ok, lines) = check(&config);
    assert!(!ok, "{lines:#?}");
    let http = line(&lines, "FAIL", "listen");
    assert!(http.contains(&format!("127.0.0.1:{taken_port}: the address is taken")), "{http}");
    assert!(http.contains("FLEETPIPE_HTTP_ADDR"), "says what to set: {http}");
    let pg_line = line(&lines, "FAIL", "postgres");
    assert!(pg_line.contains(&format!("connect to 127.0.0.1:{pg}/fleet as postgres")), "{pg_line}");
    assert!(pg_line.contains("Connection refused"), "the cause: {pg_line}");
    assert!(pg_line.contains("FLEETPIPE_POSTGRES_URL"), "what to do: {pg_line}");
    let redis_line = line(&lines, "FAIL", "redis");
    assert!(redis_line.contains(&format!("{redis}")) && redis_line.contains("refused"), "{redis_line}");
    let mqtt = line(&lines, "FAIL", "mqtt");
    assert!(mqtt.contains(&format!("127.0.0.1:{broker}")) && mqtt.contains("refused"), "{mqtt}");
    assert!(line(&lines, "-", "kafka").contains("not configured"), "{lines:#?}");
    assert_eq!(lines.last().map(String::as_str), Some("4 check(s) failed"), "{lines:#?}");
    drop(taken);

    // A configuration that does not parse is the first failure, and the last.
    std::fs::write(&config, "[http]\naddr = 7\n").unwrap();
    let (ok, lines) = check(&config);
    assert!(!ok);
    assert!(
        line(&lines, "FAIL", "config").contains("fleetpipe.toml: TOML parse error at line 2"),
        "{lines:#?}"
    );
    assert!(lines[0].starts_with("FAIL  config"), "{lines:#?}");
    assert!(
        !lines.iter().any(|l| l.starts_with("ok") || l.starts_with("FAIL  listen")),
        "nothing else: {lines:#?}"
    );
}
