//! Wires configuration → sinks → pipeline → sources, and stops them in the reverse order.
//!
//! [`start`] returns a [`Running`] instance; [`Running::stop`] drains it: readiness goes false,
//! sources stop taking input and wait until what they handed over is durable and acknowledged,
//! the pipeline drains into the sinks, sinks close their files. Nothing accepted is lost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use fleetpipe_ingest::broker::{self, BrokerConfig};
use fleetpipe_ingest::http::{self, ApiState};
use fleetpipe_ingest::kafka::{self as kafka_source, KafkaConfig};
use fleetpipe_ingest::mqtt::{self, MqttConfig, Protocol};
use fleetpipe_processors::latest::LatestCache;
use fleetpipe_processors::validate::Rules;
use fleetpipe_sinks::dead_letter::{DeadLetterConfig, DeadLetterSink};
use fleetpipe_sinks::kafka::{KafkaSink, KafkaSinkConfig};
use fleetpipe_sinks::parquet::{ParquetConfig, ParquetSink};
use fleetpipe_sinks::postgres::{PostgresConfig, PostgresReader, PostgresSink};
use fleetpipe_sinks::redis_l2::{RedisConfig, RedisL2Reader, RedisL2Sink};
use fleetpipe_sinks::wal::WalConfig;
use fleetpipe_sinks::Sink;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{parse_mqtt_url, Config, MqttProtocol};
use crate::pipeline::{Pipeline, PipelineConfig};

/// The process-wide Prometheus recorder (installed once, shared by every instance in tests).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    60.0, 3600.0,
                ])
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A running fleetpipe.
pub struct Running {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where MQTT clients publish: the embedded broker, or the external one.
    pub mqtt_addr: Option<SocketAddr>,
    pub latest: LatestCache,
    stop_tx: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    mqtt_ready: Arc<AtomicBool>,
    http: JoinHandle<std::io::Result<()>>,
    mqtt: Option<JoinHandle<Result<(), mqtt::MqttError>>>,
    kafka_ready: Arc<AtomicBool>,
    kafka: Option<JoinHandle<Result<(), kafka_source::KafkaSourceError>>>,
    pipeline: Pipeline,
}

fn rules(cfg: &Config) -> anyhow::Result<Rules> {
    let min_ts = match &cfg.validate.min_ts {
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .with_context(|| format!("validate.min_ts {s:?} is not RFC 3339"))?
                .timestamp_micros(),
        ),
        None => None,
    };
    Ok(Rules {
        max_future_us: (cfg.validate.max_future_secs as i64).saturating_mul(1_000_000),
        min_ts,
        max_payload_bytes: cfg.validate.max_payload_bytes,
    })
}

/// Starts every component; returns once sinks are open, the API listens and sources connect.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let handle = metrics_handle();
    let rules = Arc::new(rules(&cfg)?);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let latest =
        LatestCache::new(cfg.cache.max_vehicles, Duration::from_secs(cfg.cache.idle_ttl_secs.max(1)));

    // MQTT first: the external broker, or the embedded one (a taken port fails before anything
    // else has started).
    let (mqtt_cfg, mqtt_addr) = match &cfg.mqtt.url {
        Some(url) => {
            let (host, port) = parse_mqtt_url(url)?;
            let addr = tokio::net::lookup_host((host.as_str(), port)).await.ok().and_then(|mut a| a.next());
            let protocol = match cfg.mqtt.protocol {
                MqttProtocol::V5 => Protocol::V5,
                MqttProtocol::V311 => Protocol::V311,
            };
            (mqtt_config(&cfg, host, port, protocol), addr)
        }
        None => {
            broker::start(&BrokerConfig {
                listen: cfg.mqtt.listen,
                listen_v5: cfg.mqtt.listen_v5,
                max_payload_bytes: cfg.mqtt.max_packet_bytes,
                max_inflight: usize::from(cfg.mqtt.receive_maximum),
                topic_buffer_bytes: cfg.mqtt.embedded_topic_buffer_kib.saturating_mul(1024),
            })?;
            let l = cfg.mqtt.listen;
            let host = if l.ip().is_unspecified() { "127.0.0.1".to_string() } else { l.ip().to_string() };
            (mqtt_config(&cfg, host, l.port(), Protocol::V311), Some(l))
        }
    };
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if cfg.parquet.enabled {
        let p = ParquetSink::open(ParquetConfig {
            root: cfg.data_dir.clone(),
            roll_after: Duration::from_secs_f64(cfg.parquet.roll_secs),
            max_file_rows: cfg.parquet.max_file_rows,
            row_group_rows: cfg.parquet.row_group_rows,
            zstd_level: cfg.parquet.zstd_level,
        })
        .context("opening the Parquet sink")?;
        sinks.push(Box::new(p));
    }
    let mut dl_cfg = DeadLetterConfig::under(&cfg.data_dir);
    dl_cfg.roll_after = Duration::from_secs_f64(cfg.dead_letter.roll_secs);
    let dl = DeadLetterSink::open(dl_cfg).context("opening the dead-letter store")?;
    sinks.push(Box::new(dl));
    let mut store = None;
    if let Some(url) = &cfg.postgres.url {
        let mut pg = PostgresConfig::new(url.clone(), cfg.data_dir.join("dead-letter"));
        pg.schema = cfg.postgres.schema.clone();
        pg.partitions_ahead_days = cfg.postgres.partitions_ahead_days;
        pg.retention_days = cfg.postgres.retention_days;
        let sink = tokio::task::spawn_blocking(move || PostgresSink::open(pg))
            .await?
            .context("opening the Postgres sink")?;
        sinks.push(Box::new(sink));
        store = Some(PostgresReader::new(url, &cfg.postgres.schema)?);
    }
    let mut l2 = None;
    if let Some(url) = &cfg.redis.url {
        let mut rc = RedisConfig::new(url.clone());
        rc.prefix = cfg.redis.prefix.clone();
        rc.ttl = Duration::from_secs(cfg.redis.ttl_secs.max(1));
        l2 = Some(RedisL2Reader::open(&rc)?);
        let sink = tokio::task::spawn_blocking(move || RedisL2Sink::open(rc))
            .await?
            .context("opening the Redis L2 sink")?;
        sinks.push(Box::new(sink));
    }
    if let Some(brokers) = &cfg.kafka.brokers {
        let topic = |t: &str| (!t.is_empty()).then(|| t.to_owned());
        let (clean_topic, dlq_topic) = (topic(&cfg.kafka.clean_topic), topic(&cfg.kafka.dlq_topic));
        if clean_topic.is_some() || dlq_topic.is_some() {
            let sink = KafkaSink::open(KafkaSinkConfig {
                brokers: brokers.clone(),
                client_id: cfg.kafka_client_id(),
                clean_topic,
                dlq_topic,
                flush_timeout: Duration::from_secs(30),
                properties: cfg.kafka.properties.clone().into_iter().collect(),
                checkpoint: cfg.data_dir.join("_fleetpipe").join("kafka.checkpoint"),
            })
            .context("opening the Kafka outputs")?;
            sinks.push(Box::new(sink));
        }
    }

    let shards = if cfg.pipeline.shards == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        cfg.pipeline.shards
    };
    let pcfg = PipelineConfig {
        shards,
        queue_batches: cfg.pipeline.queue_batches,
        intake_entries: cfg.pipeline.intake_entries,
        dedup_frames: cfg.pipeline.dedup_frames,
        group_entries: cfg.wal.group_entries,
        group_linger: Duration::from_secs_f64(cfg.wal.group_linger_ms.max(0.0) / 1000.0),
        wal: WalConfig {
            dir: cfg.data_dir.join("_fleetpipe").join("wal"),
            segment_bytes: cfg.wal.segment_mib << 20,
            max_bytes: cfg.wal.max_mib << 20,
        },
        sink_tick: Duration::from_millis(100),
        ack_after_sinks: (cfg.pipeline.ack == crate::config::AckMode::Sinks)
            .then(|| Duration::from_secs_f64(cfg.pipeline.ack_flush_ms.max(0.0) / 1000.0)),
    };
    let pipeline = tokio::task::spawn_blocking({
        let latest = latest.clone();
        move || Pipeline::start(pcfg, sinks, latest)
    })
    .await??;
    let intake = pipeline.intake.clone();

    let (stop_tx, stop_rx) = watch::channel(false);
    let draining = Arc::new(AtomicBool::new(false));
    let mqtt_ready = Arc::new(AtomicBool::new(false));

    let mqtt = {
        let shutdown = wait_stop(stop_rx.clone());
        let ready = mqtt_ready.clone();
        let rules = rules.clone();
        let intake = intake.clone();
        Some(tokio::spawn(async move { mqtt::run(mqtt_cfg, intake, rules, ready, shutdown).await }))
    };

    let kafka_ready = Arc::new(AtomicBool::new(false));
    let kafka = match &cfg.kafka.brokers {
        Some(brokers) if cfg.kafka.consume => {
            let kcfg = KafkaConfig {
                brokers: brokers.clone(),
                topic: cfg.kafka.topic.clone(),
                group: cfg.kafka.group.clone(),
                client_id: cfg.kafka_client_id(),
                batch_messages: cfg.kafka.batch_messages,
                revoke_wait: Duration::from_secs_f64(cfg.kafka.revoke_wait_secs.max(0.0)),
                properties: cfg.kafka.properties.clone().into_iter().collect(),
            };
            let shutdown = wait_stop(stop_rx.clone());
            let ready = kafka_ready.clone();
            let rules = rules.clone();
            let intake = intake.clone();
            Some(tokio::spawn(async move { kafka_source::run(kcfg, intake, rules, ready, shutdown).await }))
        }
        _ => {
            kafka_ready.store(true, Ordering::Release);
            None
        }
    };

    // HTTP.
    let listener = http::bind(cfg.http.addr)
        .await
        .with_context(|| format!("cannot listen on {} for HTTP (set FLEETPIPE_HTTP_ADDR)", cfg.http.addr))?;
    let http_addr = listener.local_addr()?;
    let ready = {
        let draining = draining.clone();
        let mqtt_ready = mqtt_ready.clone();
        let kafka_ready = kafka_ready.clone();
        Arc::new(move || {
            !draining.load(Ordering::Acquire)
                && mqtt_ready.load(Ordering::Acquire)
                && kafka_ready.load(Ordering::Acquire)
        })
    };
    let state = ApiState {
        intake,
        rules,
        reads: Arc::new(crate::read::Tiers { l1: latest.clone(), l2, store }),
        max_body_bytes: cfg.http.max_body_bytes,
        auth_token: cfg.http.auth_token.as_deref().map(Arc::from),
        render_metrics: Arc::new(move || handle.render()),
        ready,
    };
    let http = tokio::spawn(http::serve(listener, state, wait_stop(stop_rx)));
    tracing::info!(http = %http_addr, mqtt = ?mqtt_addr, data_dir = %cfg.data_dir.display(), "fleetpipe started");
    Ok(Running {
        http_addr,
        mqtt_addr,
        latest,
        stop_tx,
        draining,
        mqtt_ready,
        http,
        mqtt,
        kafka_ready,
        kafka,
        pipeline,
    })
}

fn mqtt_config(cfg: &Config, host: String, port: u16, protocol: Protocol) -> MqttConfig {
    let m = &cfg.mqtt;
    MqttConfig {
        host,
        port,
        protocol,
        client_id: cfg.mqtt_client_id(),
        username: m.username.clone(),
        password: m.password.clone(),
        topics: m.topics.clone(),
        shared_group: m.shared_group.clone(),
        qos: m.qos,
        keep_alive: Duration::from_secs(m.keep_alive_secs.max(5)),
        receive_maximum: m.receive_maximum,
        session_expiry: Duration::from_secs(m.session_expiry_secs),
        max_packet_bytes: m.max_packet_bytes,
        batch_messages: m.batch_messages,
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

impl Running {
    /// Drains and stops (see the module header).
    pub async fn stop(self) -> anyhow::Result<()> {
        let Running { stop_tx, draining, http, mqtt, kafka, pipeline, .. } = self;
        draining.store(true, Ordering::Release);
        pipeline.begin_drain();
        let _ = stop_tx.send(true);
        if let Some(m) = mqtt {
            m.await.context("mqtt source task")??;
        }
        if let Some(k) = kafka {
            k.await.context("kafka source task")??;
        }
        match tokio::time::timeout(http::DRAIN_GRACE, http).await {
            Ok(r) => r.context("http task")??,
            Err(_) => tracing::warn!("http requests still open after the drain grace period"),
        }
        tokio::task::spawn_blocking(move || pipeline.join()).await??;
        tracing::info!("fleetpipe stopped");
        Ok(())
    }

    /// Whether the MQTT source holds its subscriptions (and the Kafka source, when
    /// configured, its group membership).
    pub fn is_subscribed(&self) -> bool {
        self.mqtt_ready.load(Ordering::Acquire) && self.kafka_ready.load(Ordering::Acquire)
    }
}

/// Runs until `shutdown` resolves, then drains.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(cfg).await?;
    shutdown.await;
    tracing::info!("shutdown requested, draining");
    running.stop().await
}
