//! `fleetpipe check`: reads the configuration as `run` would and tries everything `run` will
//! need — the data directory, every listening address, the broker, Kafka, Postgres, Redis —
//! printing one line each with what worked or why not. Nothing is left behind: probe files are
//! removed, listeners closed, the MQTT probe uses a clean session of its own.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::config::Config;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub status: Status,
    /// What was checked: `data dir`, `listen`, `postgres`, ...
    pub what: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Fail,
    /// Not configured, so not checked.
    Skip,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.status {
            Status::Ok => "ok",
            Status::Fail => "FAIL",
            Status::Skip => "-",
        };
        write!(f, "{status:<5} {:<10} {}", self.what, self.detail)
    }
}

fn line(what: &'static str, result: Result<String, String>) -> Line {
    match result {
        Ok(detail) => Line { status: Status::Ok, what, detail },
        Err(detail) => Line { status: Status::Fail, what, detail },
    }
}

fn skip(what: &'static str, detail: &str) -> Line {
    Line { status: Status::Skip, what, detail: detail.to_owned() }
}

/// Every check of `cfg`, in the order `run` meets them.
pub async fn check(cfg: &Config) -> Vec<Line> {
    let mut out = vec![line("data dir", data_dir(&cfg.data_dir))];
    for (name, addr, hint) in listeners(cfg) {
        out.push(line("listen", listen(name, addr, hint)));
    }
    if let Some(addr) = cfg.teltonika.udp_listen {
        out.push(line("listen", listen_udp(addr)));
    }
    out.push(credentials(cfg));
    out.push(match &cfg.mqtt.url {
        Some(url) => {
            line("mqtt", fleetpipe_ingest::mqtt::check(&cfg.mqtt, url).await.map_err(|e| e.to_string()))
        }
        None => skip("mqtt", "no external broker (FLEETPIPE_MQTT_URL): vehicles connect to the gateway"),
    });
    out.push(match cfg.kafka.brokers.clone() {
        Some(brokers) => line("kafka", kafka(cfg, brokers).await),
        None => skip("kafka", "not configured (FLEETPIPE_KAFKA_BROKERS)"),
    });
    out.push(match &cfg.postgres.url {
        Some(_) => {
            line("postgres", fleetpipe_sinks::postgres::check(&cfg.postgres).await.map_err(|e| e.to_string()))
        }
        None => skip("postgres", "not configured (FLEETPIPE_POSTGRES_URL)"),
    });
    out.push(match &cfg.redis.url {
        Some(_) => {
            let redis = cfg.redis.clone();
            let answer = tokio::task::spawn_blocking(move || fleetpipe_sinks::redis::check(&redis)).await;
            line("redis", answer.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())))
        }
        None => skip("redis", "not configured (FLEETPIPE_REDIS_URL)"),
    });
    out
}

/// The directory exists or can be made, takes a file and an fsync, and how much room it has.
fn data_dir(dir: &Path) -> Result<String, String> {
    let shown = dir.display();
    std::fs::create_dir_all(dir).map_err(|e| format!("{shown}: cannot be created: {e}"))?;
    let probe = dir.join(format!(".fleetpipe-check-{}", std::process::id()));
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(b"fleetpipe check\n")?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| format!("{shown}: cannot be written: {e} (set FLEETPIPE_DATA_DIR or data_dir)"))?;
    let stat = rustix::fs::statvfs(dir).map_err(|e| format!("{shown}: free space unknown: {e}"))?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    const LOW: u64 = 1 << 30;
    let gib = free as f64 / f64::from(1u32 << 30);
    if free < LOW {
        return Err(format!(
            "{shown}: only {gib:.2} GiB free; the write-ahead log stops taking frames when the disk is full"
        ));
    }
    Ok(format!("{shown}: writable, {gib:.1} GiB free"))
}

/// The TCP addresses `run` binds, with what each is and how to move it.
fn listeners(cfg: &Config) -> Vec<(&'static str, SocketAddr, &'static str)> {
    [
        (cfg.gateway_listen(), "gateway (MQTT)", "FLEETPIPE_GATEWAY_LISTEN or [gateway] listen"),
        (cfg.gateway.tls_listen, "gateway (MQTT over TLS)", "[gateway] tls_listen"),
        (cfg.teltonika.listen, "teltonika (TCP)", "FLEETPIPE_TELTONIKA_LISTEN or [teltonika] listen"),
        (Some(cfg.http.addr), "http", "FLEETPIPE_HTTP_ADDR or [http] addr"),
        (cfg.http.admin_addr, "http admin", "[http] admin_addr"),
    ]
    .into_iter()
    .filter_map(|(addr, name, hint)| addr.map(|a| (name, a, hint)))
    .collect()
}

fn listen(name: &str, addr: SocketAddr, hint: &str) -> Result<String, String> {
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            Ok(format!("{name} on {addr}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(format!(
            "{name} on {addr}: the address is taken (another server, or fleetpipe already running?); \
             stop it or set {hint}"
        )),
        Err(e) => Err(format!("{name} on {addr}: {e}; set {hint}")),
    }
}

fn listen_udp(addr: SocketAddr) -> Result<String, String> {
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => Ok(format!("teltonika (UDP) on {addr}")),
        Err(e) => Err(format!(
            "teltonika (UDP) on {addr}: {e}; set FLEETPIPE_TELTONIKA_UDP_LISTEN or [teltonika] udp_listen"
        )),
    }
}

/// With token auth, the credentials file: vehicles need one to connect.
fn credentials(cfg: &Config) -> Line {
    let mode = cfg.auth.effective_mode(&cfg.listeners());
    if mode == fleetpipe_ingest::auth::AuthMode::None {
        return skip("auth", "off (every listener on loopback): anyone may publish");
    }
    let path = cfg.credentials_file();
    match fleetpipe_ingest::auth::list(&path) {
        Ok(list) if list.is_empty() => line(
            "auth",
            Err(format!(
                "token auth, but {} holds no credential: nobody can connect; add one with \
                 `fleetpipe credentials add VEHICLE_ID`",
                path.display()
            )),
        ),
        Ok(list) => {
            line("auth", Ok(format!("token auth, {} credential(s) in {}", list.len(), path.display())))
        }
        Err(e) => line("auth", Err(format!("{}: {e}", path.display()))),
    }
}

/// Kafka: the cluster's metadata, and whether the topics fleetpipe uses are there.
async fn kafka(cfg: &Config, brokers: String) -> Result<String, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &brokers).set("group.id", "fleetpipe-check");
    for (k, v) in cfg.kafka.client_properties() {
        client.set(k, v);
    }
    let topics: Vec<String> = [&cfg.kafka.topic, &cfg.kafka.clean_topic, &cfg.kafka.dlq_topic]
        .into_iter()
        .filter(|t| !t.is_empty())
        .cloned()
        .collect();
    let shown = brokers.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client.create().map_err(|e| e.to_string())?;
        let md = consumer.fetch_metadata(None, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let found: Vec<String> = topics
            .iter()
            .map(|t| match md.topics().iter().find(|m| m.name() == t) {
                Some(m) => format!("{t} ({} partitions)", m.partitions().len()),
                None => format!("{t} (not there yet)"),
            })
            .collect();
        Ok::<_, String>(format!("{} broker(s); topics {}", md.brokers().len(), found.join(", ")))
    })
    .await
    .map_err(|e| e.to_string())?;
    answer.map(|a| format!("{shown}: {a}")).map_err(|e| {
        format!("{shown}: {e}; check that Kafka runs there and FLEETPIPE_KAFKA_BROKERS / [kafka] brokers")
    })
}
