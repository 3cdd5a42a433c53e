//! Wires configuration → sinks → pipeline → sources, and stops them in the reverse order.
//!
//! [`start`] returns a [`Running`] instance; [`Running::stop`] drains it: readiness goes false,
//! sources stop taking input and wait until what they handed over is durable and acknowledged,
//! the pipeline drains into the sinks, sinks close their files. Nothing accepted is lost.
//!
//! Adding a component is one line here: a sink pushed onto `sinks`, a stage onto `stages`, a
//! source spawned on `sources`.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use fleetpipe_ingest::auth::{AuthMode, Credentials};
use fleetpipe_ingest::gateway::GatewaySource;
use fleetpipe_ingest::http::HttpSource;
use fleetpipe_ingest::kafka::KafkaSource;
use fleetpipe_ingest::mqtt::MqttSource;
use fleetpipe_ingest::teltonika::TeltonikaSource;
use fleetpipe_pipeline::{Pipeline, Readiness, Sink, Sources, StageFactory};
use fleetpipe_processors::dedup::Dedup;
use fleetpipe_processors::latest::LatestCache;
use fleetpipe_sinks::{dead_letter, kafka, parquet, postgres, redis};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;

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
    /// Where MQTT clients publish: the gateway, or the external broker.
    pub mqtt_addr: Option<SocketAddr>,
    /// The gateway's TLS listener, when configured.
    pub mqtts_addr: Option<SocketAddr>,
    /// Where Teltonika trackers connect (TCP) and send (UDP), when configured.
    pub teltonika_addr: Option<SocketAddr>,
    pub teltonika_udp_addr: Option<SocketAddr>,
    pub latest: LatestCache,
    readiness: Arc<Readiness>,
    sources: Sources,
    pipeline: Pipeline,
}

/// Starts every component; returns once sinks are open, the API listens and sources connect.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let handle = metrics_handle();
    let rules = Arc::new(cfg.validate.clone());
    let data_dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data_dir {}", data_dir.display()))?;
    let latest = cfg.cache.open().with_max_ahead(cfg.validate.max_ahead_us);

    // Identity, then the doors that bind a port first (a taken port fails before anything else
    // has started): the gateway, or the external broker's subscriber.
    let mode = cfg.auth.effective_mode(&cfg.listeners());
    let credentials = Credentials::load(&cfg.credentials_file())?;
    credentials.watch();
    if mode == AuthMode::Token && credentials.is_empty() {
        tracing::warn!(
            file = %cfg.credentials_file().display(),
            "auth mode token with no credentials: every vehicle is refused; add one with `fleetpipe credentials add VEHICLE_ID`"
        );
    }
    let gateway = match (cfg.gateway_listen(), cfg.gateway.tls_listen) {
        (None, None) => None,
        (listen, _) => {
            let teltonika_room =
                if cfg.teltonika.listen.is_some() { cfg.teltonika.max_connections } else { 0 };
            let gw = fit_connections(&cfg.gateway, teltonika_room as u64);
            Some(GatewaySource::bind(&gw, listen, mode, credentials.clone(), &data_dir)?)
        }
    };
    let teltonika = match (cfg.teltonika.listen, cfg.teltonika.udp_listen) {
        (None, None) => None,
        _ => Some(TeltonikaSource::bind(&cfg.teltonika, mode, credentials.clone())?),
    };
    let (teltonika_addr, teltonika_udp_addr) =
        teltonika.as_ref().map_or((None, None), |t| (t.tcp_addr(), t.udp_addr()));
    let mqtt = match &cfg.mqtt.url {
        Some(url) => Some(MqttSource::new(&cfg.mqtt, url, cfg.mqtt_client_id()?)?),
        None => None,
    };
    let (mqtt_addr, mqtts_addr) = match (&gateway, &mqtt) {
        (Some(g), _) => (g.local_addr(), g.tls_addr()),
        (None, Some(m)) => {
            let (host, port) = m.broker();
            (tokio::net::lookup_host((host, port)).await.ok().and_then(|mut a| a.next()), None)
        }
        (None, None) => (None, None),
    };

    // Sinks.
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if cfg.parquet.enabled {
        sinks.push(Box::new(parquet::open(&cfg.parquet, &data_dir).context("opening the Parquet sink")?));
    }
    let dl_root = dead_letter::root_under(&data_dir);
    sinks.push(Box::new(
        dead_letter::open(&cfg.dead_letter, &dl_root).context("opening the dead-letter store")?,
    ));
    let mut store = None;
    if cfg.postgres.url.is_some() {
        let pg = cfg.postgres.clone();
        let sink = tokio::task::spawn_blocking(move || postgres::open(&pg))
            .await?
            .context("opening the Postgres sink")?;
        sinks.push(Box::new(sink));
        store = Some(postgres::PostgresReader::new(&cfg.postgres, cfg.validate.max_ahead_us)?);
    }
    let mut l2 = None;
    if cfg.redis.url.is_some() {
        let rc = redis::RedisConfig { max_ahead_us: cfg.validate.max_ahead_us, ..cfg.redis.clone() };
        l2 = Some(redis::RedisL2Reader::open(&rc)?);
        let sink = tokio::task::spawn_blocking(move || redis::RedisL2Sink::open(rc))
            .await?
            .context("opening the Redis L2 sink")?;
        sinks.push(Box::new(sink));
    }
    if let Some(outputs) = cfg.kafka.outputs(&data_dir) {
        sinks.push(Box::new(kafka::KafkaSink::open(outputs).context("opening the Kafka outputs")?));
    }
    let mut event_store = None;
    if cfg.events.enabled {
        let store = fleetpipe_pipeline::event_store::EventStore::new(cfg.events.http_per_vehicle, 4096);
        let ecfg = fleetpipe_sinks::events::EventsConfig {
            rules: cfg.events.rules()?,
            commit_every: std::time::Duration::from_secs_f64(cfg.events.commit_secs.clamp(0.01, 3600.0)),
        };
        if let Some(kcfg) = cfg.kafka.events(&data_dir) {
            sinks.push(Box::new(
                fleetpipe_sinks::events::open_kafka(&ecfg, &kcfg)
                    .context("opening the Kafka events output")?,
            ));
        }
        if cfg.postgres.url.is_some() {
            let (ecfg, pg) = (ecfg.clone(), cfg.postgres.clone());
            let sink =
                tokio::task::spawn_blocking(move || fleetpipe_sinks::events::open_postgres(&ecfg, &pg))
                    .await?
                    .context("opening the Postgres events sink")?;
            sinks.push(Box::new(sink));
        }
        let (root, s) = (data_dir.clone(), store.clone());
        let sink = tokio::task::spawn_blocking(move || fleetpipe_sinks::events::open_files(&ecfg, &root, s))
            .await?
            .context("opening the events sink")?;
        sinks.push(Box::new(sink));
        event_store = Some(store);
    }

    // Stages, each made once per shard, in this order.
    let dedup_frames = cfg.pipeline.dedup_frames;
    let l1 = latest.clone();
    let stages: Vec<StageFactory> = vec![
        Box::new(move |shard| Box::new(Dedup::new((dedup_frames / shard.of).max(1)))),
        Box::new(move |_| Box::new(l1.clone())),
    ];

    let pcfg = fleetpipe_pipeline::PipelineConfig {
        max_ahead_us: cfg.validate.max_ahead_us,
        ..cfg.pipeline.clone()
    };
    let wcfg = cfg.wal.clone();
    let pipeline =
        tokio::task::spawn_blocking(move || Pipeline::start(&pcfg, &wcfg, &data_dir, stages, sinks))
            .await??;

    // Sources.
    let mut sources = Sources::new(pipeline.intake.clone(), rules, pipeline.pushback.clone());
    if let Some(g) = gateway {
        sources.spawn(g);
    }
    if let Some(m) = mqtt {
        sources.spawn(m);
    }
    if let Some(t) = teltonika {
        sources.spawn(t);
    }
    if let Some(k) = cfg.kafka.source() {
        sources.spawn(KafkaSource { cfg: k });
    }
    let reads = Arc::new(crate::read::Tiers { l1: latest.clone(), l2, store });
    let http_auth = (mode == AuthMode::Token).then(|| credentials.clone());
    let mut http = HttpSource::bind(&cfg.http, reads, http_auth, Arc::new(move || handle.render())).await?;
    if let Some(store) = event_store {
        http = http.with_events(store);
    }
    let http_addr = http.local_addr()?;
    sources.spawn(http);

    tracing::info!(http = %http_addr, mqtt = ?mqtt_addr, teltonika = ?teltonika_addr, data_dir = %cfg.data_dir.display(), "fleetpipe started");
    Ok(Running {
        http_addr,
        mqtt_addr,
        mqtts_addr,
        teltonika_addr,
        teltonika_udp_addr,
        latest,
        readiness: sources.readiness(),
        sources,
        pipeline,
    })
}

impl Running {
    /// Drains and stops (see the module header).
    pub async fn stop(self) -> anyhow::Result<()> {
        let Running { sources, pipeline, .. } = self;
        pipeline.begin_drain();
        let stopped = sources.stop().await;
        tokio::task::spawn_blocking(move || pipeline.join()).await??;
        stopped?;
        tracing::info!("fleetpipe stopped");
        Ok(())
    }

    /// Whether every source listens (the gateway, HTTP) or holds its subscriptions (an external
    /// broker, Kafka's group membership), and the instance is not draining.
    pub fn is_subscribed(&self) -> bool {
        self.readiness.is_ready()
    }
}

/// File descriptors kept for everything but vehicle connections: the log, the sinks' files and
/// connections, HTTP clients, and the connections the gateway accepts only to refuse.
const FD_HEADROOM: u64 = 1500;

/// The gateway's configuration with `max_connections` lowered, if need be, to what the
/// process's file-descriptor limit allows (less [`FD_HEADROOM`] and the room the gateway keeps
/// for connections before CONNECT, [`fleetpipe_ingest::gateway::open_limit`], and the `others`
/// another door may hold, Teltonika's): past its cap the gateway
/// refuses a connection cleanly, past the descriptor limit it could not even accept one.
fn fit_connections(
    cfg: &fleetpipe_ingest::gateway::GatewayConfig,
    others: u64,
) -> fleetpipe_ingest::gateway::GatewayConfig {
    let mut cfg = cfg.clone();
    let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
        return cfg;
    };
    let open_room =
        (fleetpipe_ingest::gateway::open_limit(0) as u64).saturating_add(FD_HEADROOM).saturating_add(others);
    let fit = usize::try_from(soft.saturating_sub(open_room)).unwrap_or(usize::MAX).max(1);
    if cfg.max_connections > fit {
        // A warning only when someone asked for more than fits; the default (sized for the
        // gateway alone) is lowered quietly.
        let asked =
            cfg.max_connections != fleetpipe_ingest::gateway::GatewayConfig::default().max_connections;
        let (configured, fd_limit) = (cfg.max_connections, soft);
        let what = "gateway.max_connections lowered to fit the file-descriptor limit";
        if asked {
            tracing::warn!(configured, max_connections = fit, fd_limit, "{what}");
        } else {
            tracing::info!(configured, max_connections = fit, fd_limit, "{what}");
        }
        cfg.max_connections = fit;
    }
    cfg
}

/// Raises the soft file-descriptor limit to the hard one (each vehicle connection holds one)
/// and logs both.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => {
            let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(soft, |(_, hard)| hard);
            tracing::info!(soft, hard, "file descriptor limit");
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
    }
}

/// Runs until `shutdown` resolves, then drains.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(cfg).await?;
    shutdown.await;
    tracing::info!("shutdown requested, draining");
    running.stop().await
}
