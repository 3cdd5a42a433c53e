//! The `fleetpipe` command: `run`, `simulate`, `replay`.

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
    Run {
        /// TOML configuration file (also FLEETPIPE_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
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
        /// mqtt://host:port or http://host:port
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        target: String,
        /// MQTT QoS (0 or 1).
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
    /// Replay recorded frames (NDJSON) against a running fleetpipe.
    Replay {
        file: PathBuf,
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        target: String,
        /// Playback speed relative to the recorded `ts` (0: as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        speed: f64,
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Run { config } => {
                let cfg = Config::load(config.as_deref())?;
                fleetpipe::app::run(cfg, shutdown_signal()).await
            }
            Command::Simulate { vehicles, hz, duration, target, qos } => {
                fleetpipe::sim::simulate(&target, vehicles, hz, Duration::from_secs_f64(duration), qos).await
            }
            Command::Replay { file, target, speed, qos } => {
                fleetpipe::sim::replay(&file, &target, speed, qos).await
            }
        }
    })
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
