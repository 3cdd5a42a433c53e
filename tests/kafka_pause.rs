//! A stalled sink pauses the Kafka consumer: with Postgres refusing connections the write-ahead
//! log fills, the intake fills, and fleetpipe pauses its partitions (the rest stays in Kafka as
//! lag, not in fleetpipe's memory); once Postgres is back it resumes by itself, stores every
//! record exactly once and commits the end of the topic. (Its own test binary: it reads
//! process-wide gauges.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";
const RECORDS: usize = 60_000;

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").await.1.as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_pauses_the_consumer_which_resumes_by_itself_and_loses_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    kafka_client(&["create", &brokers, "vehicle-frames", "2"]);
    let name = format!("fp_kpause_{}", unique().replace('-', "_"));
    let admin = pg_connect(ADMIN).await;
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), None);
    cfg.postgres.url = Some(format!("postgres://postgres@127.0.0.1:5432/{name}"));
    cfg.kafka.brokers = Some(brokers.clone());
    cfg.kafka.group = format!("fleetpipe-{}", unique());
    cfg.kafka.clean_topic = String::new();
    cfg.kafka.dlq_topic = String::new();
    cfg.kafka.events_topic = String::new();
    cfg.kafka.batch_messages = 200;
    cfg.wal.segment_mib = 1;
    cfg.wal.max_mib = 2;
    cfg.pipeline.intake_entries = 2;
    let group = cfg.kafka.group.clone();
    let running = start(cfg).await;
    let addr = running.http_addr;

    // Postgres refuses connections; then the input arrives.
    admin.batch_execute(&format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")).await.unwrap();
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&name])
        .await
        .unwrap();
    let input = dir.path().join("input.ndjson");
    write_location_lines(&input, "KP", RECORDS);
    kafka_client(&["produce", &brokers, "vehicle-frames", input.to_str().unwrap()]);

    // The log fills, the intake fills: the partitions are paused, the rest waits in Kafka.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = metrics_text(addr).await;
        if metric(&text, "fleetpipe_kafka_paused") == 1.0 {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the consumer never paused: wal_bytes {}, wal_full {}, received {}",
            metric(&text, "fleetpipe_wal_bytes"),
            metric(&text, "fleetpipe_wal_full"),
            metric(&text, r#"fleetpipe_frames_received_total{source="kafka"}"#)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(&text, "fleetpipe_wal_full"), 1.0);
    let received = metric(&text, r#"fleetpipe_frames_received_total{source="kafka"}"#);
    assert!(received < RECORDS as f64, "paused with {received} of {RECORDS} taken: the rest is lag in Kafka");

    // Postgres is back: the consumer resumes by itself, every record lands once.
    admin.batch_execute(&format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")).await.unwrap();
    let db = pg_connect(&format!("host=127.0.0.1 port=5432 user=postgres dbname={name}")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (rows, distinct) = loop {
        let counts = db
            .query_one("SELECT count(*), count(DISTINCT seq) FROM locations", &[])
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap_or((0, 0));
        if counts.0 >= RECORDS as i64 {
            break counts;
        }
        if std::time::Instant::now() > deadline {
            let text = metrics_text(addr).await;
            let summary: Vec<&str> = text
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && ["received", "written", "paused", "behind", "wal_", "accepted"]
                            .iter()
                            .any(|k| l.contains(k))
                })
                .collect();
            panic!("{} of {RECORDS} rows in Postgres; {summary:#?}", counts.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((rows, distinct), (RECORDS as i64, RECORDS as i64), "every record once");
    assert_eq!(metric(&metrics_text(addr).await, "fleetpipe_kafka_paused"), 0.0);
    running.stop().await.unwrap();

    let ends = kafka_ends(&brokers, "vehicle-frames", RECORDS);
    let committed = kafka_committed(&brokers, &group, "vehicle-frames");
    assert_eq!(committed, ends, "the group committed the end of the topic");

    drop(db);
    admin.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).await.unwrap();
}
