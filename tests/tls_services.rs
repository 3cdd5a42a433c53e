//! TLS and passwords toward every service fleetpipe connects to, each a real server of the
//! test's own that accepts nothing else: Postgres (TLS-only `pg_hba`, SCRAM password), Redis
//! (TLS port only, client certificate required, `requirepass`) and Kafka (tansu behind a TLS
//! terminator). Frames come in over HTTP and over Kafka, and are read back with independent
//! clients (psql, redis-cli, confluent-kafka) over TLS. A server certificate from another CA is
//! refused with an error that says so. (MQTT over TLS: tests/gateway.rs and tests/hardening.rs.)
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PG_PASSWORD: &str = "pg-secret";
const REDIS_PASSWORD: &str = "redis-secret";

fn redis_cli(redis: &RedisServer, pki: &Pki, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "--tls", "--no-auth-warning"])
        .args([
            "--cacert",
            &pki.path("ca.pem"),
            "--cert",
            &pki.path("client.pem"),
            "--key",
            &pki.path("client.key"),
        ])
        .args(["-a", REDIS_PASSWORD])
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn frame(vehicle: &str, seq: i64) -> Value {
    json!({"vehicle_id": vehicle, "ts": 1_795_640_400_000i64 + seq * 1000, "seq": seq, "kind": "location",
           "lat": 48.1 + seq as f64 * 0.001, "lon": 11.5})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_redis_and_kafka_over_tls_with_passwords_store_every_frame() {
    let pki = Pki::new();
    let pg = PgServer::start_tls(&pki, PG_PASSWORD);
    let redis = RedisServer::start_tls(&pki, REDIS_PASSWORD);
    let tansu = Tansu::start_tls(&pki);
    let brokers = tansu.brokers();
    let ca = pki.path("ca.pem");
    let kafka_tls = [("KAFKA_TLS_CA", ca.as_str())];
    for topic in ["vehicle-frames", "vehicle-frames-clean", "vehicle-frames-dlq", "vehicle-events"] {
        kafka_client_with(&kafka_tls, &["create", &brokers, topic, "1"]);
    }

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.postgres.url = Some(format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/postgres", pg.port));
    cfg.postgres.tls_ca = Some(ca.clone().into());
    cfg.redis.url = Some(format!("rediss://:{REDIS_PASSWORD}@127.0.0.1:{}", redis.port));
    cfg.redis.tls_ca = Some(ca.clone().into());
    cfg.redis.tls_cert = Some(pki.path("client.pem").into());
    cfg.redis.tls_key = Some(pki.path("client.key").into());
    cfg.kafka.brokers = Some(brokers.clone());
    cfg.kafka.tls_ca = Some(ca.clone().into());
    cfg.kafka.group = format!("fleetpipe-{}", unique());
    let running = start(cfg.clone()).await;

    // Two frames over HTTP, two over the Kafka input topic.
    let http: Vec<Value> = (1..=2).map(|s| frame("TLS-HTTP", s)).collect();
    let body = http.iter().map(|f| f.to_string() + "\n").collect::<String>().into_bytes();
    let (status, answer) = http_post(running.http_addr, body, "application/x-ndjson").await;
    assert_eq!(status, 200, "{answer}");
    let input = dir.path().join("input.ndjson");
    let kafka: Vec<Value> = (1..=2).map(|s| frame("TLS-KAFKA", s)).collect();
    std::fs::write(&input, kafka.iter().map(|f| f.to_string() + "\n").collect::<String>()).unwrap();
    kafka_client_with(&kafka_tls, &["produce", &brokers, "vehicle-frames", input.to_str().unwrap()]);

    // Postgres, read with psql over verified TLS: every frame once.
    let count = "SELECT vehicle_id || ':' || count(*) FROM locations GROUP BY vehicle_id ORDER BY vehicle_id";
    wait_for("four rows in postgres", Duration::from_secs(60), || {
        let rows = pg.psql(&pki, PG_PASSWORD, count);
        (rows == "TLS-HTTP:2\nTLS-KAFKA:2").then_some(())
    })
    .await;
    assert_eq!(pg.psql(&pki, PG_PASSWORD, "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE datname = 'postgres' AND pid <> pg_backend_pid()"), "t");

    // Redis, with redis-cli over mutual TLS: each vehicle's latest location is its frame 2.
    for vehicle in ["TLS-HTTP", "TLS-KAFKA"] {
        let key = format!("fleetpipe:vehicle:{vehicle}");
        wait_for("latest state in redis", Duration::from_secs(30), || {
            (redis_cli(&redis, &pki, &["HGET", &key, "location_seq"]) == "2").then_some(())
        })
        .await;
    }

    // The clean topic, read over TLS by the other client: all four frames.
    let clean = kafka_records_with(&kafka_tls, &brokers, "vehicle-frames-clean", 5, 10);
    let mut seqs: Vec<String> = clean
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
            format!("{}/{}", v["vehicle_id"].as_str().unwrap(), v["seq"])
        })
        .collect();
    seqs.sort();
    assert_eq!(seqs, ["TLS-HTTP/1", "TLS-HTTP/2", "TLS-KAFKA/1", "TLS-KAFKA/2"]);
    running.stop().await.unwrap();

    // A Postgres certificate from another CA: refused, and the error says why.
    let mut rogue = cfg.clone();
    rogue.data_dir = dir.path().join("rogue");
    rogue.postgres.tls_ca = Some(pki.path("rogue.pem").into());
    rogue.redis.url = None;
    rogue.kafka.brokers = None;
    let err = match fleetpipe::app::start(rogue).await {
        Ok(_) => panic!("a server certificate from an unknown CA was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("certificate") && err.contains("UnknownIssuer"), "{err}");
}
