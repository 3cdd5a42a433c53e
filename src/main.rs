//! The `fleetpipe` command: `run`, `credentials`, `simulate`, `replay`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleetpipe::config::Config;

#[derive(Parser)]
#[command(name = "fleetpipe", version, about = "Vehicle telemetry pipeline: acknowledged only when durable")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline (embedded defaults without a config).
    #[command(after_help = RUN_ENV)]
    Run {
        /// TOML configuration file (also FLEETPIPE_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check the configuration and everything it points at (data directory, listening
    /// addresses, broker, Kafka, Postgres, Redis): one line each; exit status 1 on any failure.
    Check {
        /// TOML configuration file (also FLEETPIPE_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage the credentials vehicles and backends connect with (a running instance picks
    /// changes up within seconds). The file is found as `run` finds it: --config,
    /// FLEETPIPE_CONFIG, FLEETPIPE_DATA_DIR.
    Credentials {
        /// TOML configuration file (also FLEETPIPE_CONFIG).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: CredentialsAction,
    },
    /// Drive a simulated fleet against a running fleetpipe.
    Simulate {
        #[arg(long, default_value_t = 100)]
        vehicles: usize,
        /// Location frames per vehicle per second (every 10th round adds a diagnostic frame).
        #[arg(long, default_value_t = 1.0)]
        hz: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Where frames go: mqtt://host:port (the gateway or a broker), http://host:port (the
        /// HTTP API) or kafka://host:port[,host:port]/topic (the input topic).
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        target: String,
        /// MQTT QoS (0 or 1).
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
    /// Replay recorded frames (NDJSON) against a running fleetpipe.
    Replay {
        /// NDJSON frames, e.g. tests/data/css-drive-aarhus-2021-07-26-am.ndjson.
        file: PathBuf,
        /// Where frames go: mqtt://host:port, http://host:port or kafka://host:port/topic.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        target: String,
        /// Playback speed relative to the recorded `ts` (0: as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        speed: f64,
        /// MQTT QoS (0 or 1).
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
}

#[derive(Subcommand)]
enum CredentialsAction {
    /// Make a credential and print its token (shown this once): for VEHICLE_ID, or with --name
    /// and --scope for a gateway or backend.
    Add {
        /// The vehicle the credential is for (its MQTT username).
        vehicle_id: Option<String>,
        /// Bind a tracker's IMEI to the vehicle (Teltonika).
        #[arg(long, requires = "vehicle_id")]
        imei: Option<String>,
        /// A scoped credential's name (its MQTT username).
        #[arg(long, conflicts_with = "vehicle_id", requires = "scope")]
        name: Option<String>,
        /// Vehicle ids and PREFIX* patterns, comma-separated ('*' is every vehicle).
        #[arg(long, requires = "name")]
        scope: Option<String>,
    },
    /// Remove a credential (by vehicle id or name): it stops working.
    Revoke { id_or_name: String },
    /// List the credentials (never their tokens).
    List,
}

/// mimalloc: the gateway's worker threads allocate a message's buffers and the log and shard
/// threads free them; glibc's allocator spent a sixth of the gateway's CPU on that hand-over.
/// Built without transparent huge pages (`no_thp`, and [`no_huge_pages`] for kernels that
/// use them unasked): pages that move between threads are handed back and taken afresh all
/// the time, and each fresh huge page is 2 MiB the kernel zeroes; that was a sixth of
/// fleetpipe's CPU under 20 publishers (load-tests/RESULTS.md, "Huge pages").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn credentials(config: Option<&std::path::Path>, action: CredentialsAction) -> anyhow::Result<()> {
    use fleetpipe_ingest::auth;
    let path = Config::load(config)?.credentials_file();
    match action {
        CredentialsAction::Add { vehicle_id: Some(vehicle_id), imei, .. } => {
            let token = auth::add(&path, auth::NewCredential::Vehicle { vehicle_id, imei }, &now_rfc3339())?;
            println!("{token}");
        }
        CredentialsAction::Add { name: Some(name), scope: Some(scope), .. } => {
            let patterns = scope.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect();
            let token = auth::add(&path, auth::NewCredential::Scoped { name, patterns }, &now_rfc3339())?;
            println!("{token}");
        }
        CredentialsAction::Add { .. } => {
            anyhow::bail!("give a VEHICLE_ID, or --name NAME --scope 'PATTERN,...'")
        }
        CredentialsAction::Revoke { id_or_name } => {
            if !auth::revoke(&path, &id_or_name)? {
                anyhow::bail!("no credential {id_or_name:?} in {}", path.display());
            }
            eprintln!("revoked {id_or_name}");
        }
        CredentialsAction::List => {
            for c in auth::list(&path)? {
                let scope = match &c.scope {
                    auth::Scope::Vehicle { vehicle_id } => vehicle_id.clone(),
                    auth::Scope::Patterns { patterns } => patterns.join(","),
                };
                let imei = c.imei.as_deref().map(|i| format!(" imei={i}")).unwrap_or_default();
                println!("{}\tscope={scope}{imei}\tcreated={}", c.name, c.created);
            }
        }
    }
    Ok(())
}

/// `fleetpipe check`: the report on standard output; exit status 1 when anything failed.
async fn check(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    use fleetpipe::check::{Line, Status};
    let source = match Config::file(config) {
        Some(f) => f.display().to_string(),
        None => "embedded defaults".to_owned(),
    };
    let cfg = match Config::load(config) {
        Ok(cfg) => {
            println!(
                "{}",
                Line {
                    status: Status::Ok,
                    what: "config",
                    detail: format!("{source}, then FLEETPIPE_* variables")
                }
            );
            cfg
        }
        Err(e) => {
            println!("{}", Line { status: Status::Fail, what: "config", detail: format!("{source}: {e:#}") });
            std::process::exit(1);
        }
    };
    let lines = fleetpipe::check::check(&cfg).await;
    for l in &lines {
        println!("{l}");
    }
    let failed = lines.iter().filter(|l| l.status == Status::Fail).count();
    if failed > 0 {
        println!("{failed} check(s) failed");
        std::process::exit(1);
    }
    println!("everything fleetpipe needs is there");
    Ok(())
}

fn now_rfc3339() -> String {
    fleetpipe_processors::time::format_millis(fleetpipe_pipeline::now_micros())
}

/// `fleetpipe run --help`: the environment, which wins over the file.
const RUN_ENV: &str = "\
Environment (wins over the file; see fleetpipe.example.toml for every setting):
  FLEETPIPE_CONFIG                 the configuration file (as --config)
  FLEETPIPE_DATA_DIR               write-ahead log, Parquet, dead letters, credentials [./data]
  FLEETPIPE_GATEWAY_LISTEN         the MQTT gateway vehicles connect to [127.0.0.1:1883]
  FLEETPIPE_MQTT_LISTEN            the same (the contract's older name)
  FLEETPIPE_HTTP_ADDR              the HTTP API and console [127.0.0.1:8080]
  FLEETPIPE_HTTP_AUTH_TOKEN        a bearer token the HTTP API asks for
  FLEETPIPE_AUTH                   none | token (default: token once a listener is not on loopback)
  FLEETPIPE_TELTONIKA_LISTEN       Teltonika trackers over TCP (off unless set)
  FLEETPIPE_TELTONIKA_UDP_LISTEN   Teltonika trackers over UDP (off unless set)
  FLEETPIPE_MQTT_URL               an external broker to subscribe to, mqtt:// or mqtts://
  FLEETPIPE_MQTT_CLIENT_ID, FLEETPIPE_MQTT_USERNAME, FLEETPIPE_MQTT_PASSWORD
  FLEETPIPE_KAFKA_BROKERS          Kafka: input topic, clean and dead-letter outputs
  FLEETPIPE_KAFKA_TOPIC, FLEETPIPE_KAFKA_GROUP, FLEETPIPE_KAFKA_USERNAME, FLEETPIPE_KAFKA_PASSWORD
  FLEETPIPE_POSTGRES_URL           history in day-partitioned tables, postgres://user@host:port/db
  FLEETPIPE_REDIS_URL              the L2 latest-state cache, redis:// or rediss://
  RUST_LOG                         log filter [info]; FLEETPIPE_LOG_FORMAT=json for JSON lines
  OTEL_EXPORTER_OTLP_ENDPOINT      send traces over OTLP/HTTP (off unless set); OTEL_SERVICE_NAME,
                                   OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_HEADERS honoured

Before the first run: `fleetpipe check` tries all of it and says what is wrong.";

/// The log filter when `RUST_LOG` is unset: fleetpipe's own `info`, and the libraries'
/// warnings only (ntex narrates its workers starting and stopping at `info`).
const DEFAULT_LOG: &str = "info,ntex=warn,ntex_server=warn,ntex_rt=warn,ntex_service=warn,ntex_io=warn,ntex_mqtt=warn,ntex_net=warn,rdkafka=warn";

/// Logs to standard error: `RUST_LOG` (default [`DEFAULT_LOG`]), plain text (colour only on
/// a terminal) or JSON lines with `FLEETPIPE_LOG_FORMAT=json`. With an OTLP endpoint in the
/// environment, traces too ([`traces`]); the provider returned is shut down (flushed) at exit.
fn init_logging() -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG))
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match std::env::var("FLEETPIPE_LOG_FORMAT").unwrap_or_default().as_str() {
        "json" => fmt.json().with_current_span(false).with_span_list(false).with_filter(filter()).boxed(),
        "" | "text" | "plain" => {
            fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_filter(filter()).boxed()
        }
        other => anyhow::bail!("FLEETPIPE_LOG_FORMAT={other:?}: use text or json"),
    };
    let provider = traces()?;
    // The pipeline's spans (target `fleetpipe::trace`) go to OpenTelemetry only, whatever
    // RUST_LOG says; logs are not spans.
    let otel = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(p.tracer("fleetpipe")).with_filter(
            tracing_subscriber::filter::Targets::new().with_target("fleetpipe::trace", tracing::Level::INFO),
        )
    });
    tracing_subscriber::registry().with(fmt).with(otel).try_init()?;
    if provider.is_some() {
        fleetpipe_pipeline::trace::enable();
    }
    Ok(provider)
}

/// OpenTelemetry traces over OTLP/HTTP (protobuf), on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set. The SDK reads the other standard variables
/// itself: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `_ARG`
/// (e.g. `parentbased_traceidratio` and `0.01`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`.
fn traces() -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| anyhow::anyhow!("OpenTelemetry exporter (OTEL_EXPORTER_OTLP_ENDPOINT): {e}"))?;
    let detected = opentelemetry_sdk::Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let resource = if named {
        detected
    } else {
        opentelemetry_sdk::Resource::builder().with_service_name("fleetpipe").build()
    };
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Ok(Some(provider))
}

/// Turns transparent huge pages off for this process (Linux; `enabled = always` kernels would
/// otherwise back the allocator's memory with them). Not fatal: it only costs CPU.
fn no_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // First: the kernel checks the setting at each page fault, so memory the allocator took
    // before `main` is covered from here on as well.
    let huge_pages = no_huge_pages();
    let traces = init_logging()?;
    if let Err(e) = huge_pages {
        tracing::debug!(error = %e, "transparent huge pages stay on");
    }
    let cli = Cli::parse();
    if let Command::Credentials { config, action } = cli.command {
        return credentials(config.as_deref(), action);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(async move {
        match cli.command {
            Command::Run { config } => {
                fleetpipe::app::raise_fd_limit();
                let cfg = Config::load(config.as_deref())?;
                fleetpipe::app::run(cfg, shutdown_signal()).await
            }
            Command::Simulate { vehicles, hz, duration, target, qos } => {
                fleetpipe::sim::simulate(&target, vehicles, hz, Duration::from_secs_f64(duration), qos).await
            }
            Command::Replay { file, target, speed, qos } => {
                fleetpipe::sim::replay(&file, &target, speed, qos).await
            }
            Command::Check { config } => check(config.as_deref()).await,
            Command::Credentials { .. } => Ok(()),
        }
    });
    if let Some(provider) = traces {
        // Flushes the spans still queued.
        if let Err(e) = provider.shutdown() {
            tracing::warn!(error = %e, "traces not all exported at exit");
        }
    }
    result
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
