//! Configuration: a TOML file (every key optional, unknown keys refused) and the contract's
//! environment variables, which win over the file. With neither, fleetpipe runs on embedded
//! defaults: embedded MQTT broker, HTTP on 127.0.0.1:8080, Parquet under `./data`, L1 cache.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of Parquet files, the dead-letter store and the write-ahead log.
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub mqtt: MqttSection,
    pub validate: ValidateConfig,
    pub pipeline: PipelineSection,
    pub wal: WalSection,
    pub cache: CacheConfig,
    pub parquet: ParquetSection,
    pub dead_letter: DeadLetterSection,
    pub postgres: PostgresSection,
    pub redis: RedisSection,
    pub kafka: KafkaSection,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            http: HttpConfig::default(),
            mqtt: MqttSection::default(),
            validate: ValidateConfig::default(),
            pipeline: PipelineSection::default(),
            wal: WalSection::default(),
            cache: CacheConfig::default(),
            parquet: ParquetSection::default(),
            dead_letter: DeadLetterSection::default(),
            postgres: PostgresSection::default(),
            redis: RedisSection::default(),
            kafka: KafkaSection::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    pub max_body_bytes: usize,
    /// When set, `POST /v1/frames` requires `Authorization: Bearer <token>`.
    pub auth_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { addr: ([127, 0, 0, 1], 8080).into(), max_body_bytes: 16 << 20, auth_token: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    V5,
    V311,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// External broker (`mqtt://host:port`). Unset: the embedded broker.
    pub url: Option<String>,
    /// The embedded broker's MQTT 3.1.1 address.
    pub listen: SocketAddr,
    /// The embedded broker's optional MQTT 5 address.
    pub listen_v5: Option<SocketAddr>,
    /// Protocol toward an external broker (the embedded one is always spoken to in 3.1.1).
    pub protocol: MqttProtocol,
    /// Stable per instance (e.g. the pod name), so each instance resumes its own session.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topics: Vec<String>,
    /// MQTT 5 shared-subscription group (`$share/{group}/…`) for several instances.
    pub shared_group: Option<String>,
    pub qos: u8,
    pub keep_alive_secs: u64,
    pub receive_maximum: u16,
    pub session_expiry_secs: u64,
    pub max_packet_bytes: usize,
    pub batch_messages: usize,
    /// Memory the embedded broker keeps per topic (also how far behind on one topic fleetpipe
    /// may fall before that broker drops the oldest messages).
    pub embedded_topic_buffer_kib: usize,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            url: None,
            listen: ([127, 0, 0, 1], 1883).into(),
            listen_v5: None,
            protocol: MqttProtocol::V5,
            client_id: None,
            username: None,
            password: None,
            topics: vec!["vehicles/+/+".into()],
            shared_group: None,
            qos: 1,
            keep_alive_secs: 30,
            receive_maximum: 65_535,
            session_expiry_secs: 7 * 24 * 3600,
            max_packet_bytes: (16 << 20) + 65_536,
            batch_messages: 1024,
            embedded_topic_buffer_kib: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidateConfig {
    /// Frames further ahead of the receiving clock are rejected (`future_ts`).
    pub max_future_secs: u64,
    /// Optional lower bound on `ts` (RFC 3339); none by default: backfills are normal.
    pub min_ts: Option<String>,
    /// A single MQTT message or Kafka record larger than this is rejected (`oversized`).
    pub max_payload_bytes: usize,
}

impl Default for ValidateConfig {
    fn default() -> Self {
        ValidateConfig { max_future_secs: 24 * 3600, min_ts: None, max_payload_bytes: 16 << 20 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSection {
    /// Shard workers (0: one per core).
    pub shards: usize,
    /// Capacity of each inter-stage queue, in batches.
    pub queue_batches: usize,
    /// Capacity of the intake in front of the log, in entries.
    pub intake_entries: usize,
    /// Recent frames remembered for de-duplication (all vehicles, all shards): about 40 bytes
    /// each, a fixed memory cost.
    pub dedup_frames: usize,
    /// When MQTT acks and HTTP 200s go out: once the entry is in fleetpipe's fsync'd log
    /// (`log`, the default), or once every durable sink holds it as well (`sinks`).
    pub ack: AckMode,
    /// With `ack = "sinks"`: how often sinks that hold unflushed data are flushed (ms). Each
    /// flush closes the open Parquet files, so shorter means faster acks and more files.
    pub ack_flush_ms: f64,
}

/// See [`PipelineSection::ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    Log,
    Sinks,
}

impl Default for PipelineSection {
    fn default() -> Self {
        PipelineSection {
            shards: 0,
            queue_batches: 64,
            intake_entries: 256,
            dedup_frames: 1 << 20,
            ack: AckMode::Log,
            ack_flush_ms: 100.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSection {
    pub segment_mib: u64,
    /// Bound on the log's disk use; past it, intake pushes back until sinks catch up.
    pub max_mib: u64,
    /// Most entries in one group commit (one fsync).
    pub group_entries: usize,
    /// How long a group commit waits at most for more entries after the first (milliseconds):
    /// fewer, larger fsyncs and batches, for up to that much more time-to-ack. It stops waiting
    /// as soon as an eighth of it passes with nothing new.
    pub group_linger_ms: f64,
}

impl Default for WalSection {
    fn default() -> Self {
        WalSection { segment_mib: 64, max_mib: 2048, group_entries: 512, group_linger_ms: 2.0 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub max_vehicles: u64,
    pub idle_ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { max_vehicles: 1_000_000, idle_ttl_secs: 24 * 3600 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetSection {
    pub enabled: bool,
    /// Open files are closed (and become visible) at least this often.
    pub roll_secs: f64,
    pub max_file_rows: usize,
    pub row_group_rows: usize,
    pub zstd_level: i32,
}

impl Default for ParquetSection {
    fn default() -> Self {
        ParquetSection {
            enabled: true,
            roll_secs: 30.0,
            max_file_rows: 1_000_000,
            row_group_rows: 128 * 1024,
            zstd_level: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterSection {
    pub roll_secs: f64,
}

impl Default for DeadLetterSection {
    fn default() -> Self {
        DeadLetterSection { roll_secs: 30.0 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSection {
    /// `postgres://user:pass@host:5432/db`. Unset: no Postgres history.
    pub url: Option<String>,
    pub schema: String,
    /// Day partitions created ahead of time.
    pub partitions_ahead_days: u32,
    /// Partitions older than this many days are dropped; none by default.
    pub retention_days: Option<u32>,
}

impl Default for PostgresSection {
    fn default() -> Self {
        PostgresSection { url: None, schema: "public".into(), partitions_ahead_days: 3, retention_days: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// `redis://host:6379`. Unset: no L2.
    pub url: Option<String>,
    pub prefix: String,
    pub ttl_secs: u64,
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection { url: None, prefix: "fleetpipe:".into(), ttl_secs: 24 * 3600 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSection {
    /// `host:port[,host:port…]`. Unset: no Kafka.
    pub brokers: Option<String>,
    /// Consume the input topic (as a member of `group`).
    pub consume: bool,
    /// The input topic.
    pub topic: String,
    pub group: String,
    /// Stable per instance; default `fleetpipe-<pod or host name>`, as for MQTT.
    pub client_id: Option<String>,
    /// Most records folded into one log entry.
    pub batch_messages: usize,
    /// Validated, normalised frames for stream consumers; `""` switches it off.
    pub clean_topic: String,
    /// Rejected input with a `reason` header; `""` switches it off.
    pub dlq_topic: String,
    /// Longest a revoked partition (or the drain) waits for its entries to become durable.
    pub revoke_wait_secs: f64,
    /// Extra librdkafka properties for every client (`"security.protocol" = "SASL_SSL"`, ...).
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaSection {
    fn default() -> Self {
        KafkaSection {
            brokers: None,
            consume: true,
            topic: "vehicle-frames".into(),
            group: "fleetpipe".into(),
            client_id: None,
            batch_messages: 1024,
            clean_topic: "vehicle-frames-clean".into(),
            dlq_topic: "vehicle-frames-dlq".into(),
            revoke_wait_secs: 10.0,
            properties: Default::default(),
        }
    }
}

impl Config {
    /// Reads the file (`--config`, else `FLEETPIPE_CONFIG`, else none), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let env_file = std::env::var_os("FLEETPIPE_CONFIG").map(PathBuf::from);
        let mut cfg = match file.map(Path::to_path_buf).or(env_file) {
            Some(path) => Self::from_file(&path)?,
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// Applies the contract's environment variables (they win over the file).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        let addr = |k: &str, v: String| -> anyhow::Result<SocketAddr> {
            v.parse().with_context(|| format!("{k}={v:?} is not an address like 127.0.0.1:8080"))
        };
        if let Some(v) = get("FLEETPIPE_MQTT_URL").filter(|v| !v.is_empty()) {
            self.mqtt.url = Some(v);
        }
        if let Some(v) = get("FLEETPIPE_MQTT_LISTEN") {
            self.mqtt.listen = addr("FLEETPIPE_MQTT_LISTEN", v)?;
        }
        if let Some(v) = get("FLEETPIPE_HTTP_ADDR") {
            self.http.addr = addr("FLEETPIPE_HTTP_ADDR", v)?;
        }
        if let Some(v) = get("FLEETPIPE_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("FLEETPIPE_MQTT_CLIENT_ID") {
            self.mqtt.client_id = Some(v);
        }
        // Credentials from the environment (e.g. a Kubernetes Secret), not only the file.
        if let Some(v) = get("FLEETPIPE_MQTT_USERNAME") {
            self.mqtt.username = Some(v);
        }
        if let Some(v) = get("FLEETPIPE_MQTT_PASSWORD") {
            self.mqtt.password = Some(v);
        }
        if let Some(v) = get("FLEETPIPE_HTTP_AUTH_TOKEN").filter(|v| !v.is_empty()) {
            self.http.auth_token = Some(v);
        }
        if let Some(v) = get("FLEETPIPE_POSTGRES_URL").filter(|v| !v.is_empty()) {
            self.postgres.url = Some(v);
        }
        if let Some(v) = get("FLEETPIPE_REDIS_URL").filter(|v| !v.is_empty()) {
            self.redis.url = Some(v);
        }
        if let Some(v) = get("FLEETPIPE_KAFKA_BROKERS").filter(|v| !v.is_empty()) {
            self.kafka.brokers = Some(v);
        }
        if let Some(v) = get("FLEETPIPE_KAFKA_TOPIC").filter(|v| !v.is_empty()) {
            self.kafka.topic = v;
        }
        if let Some(v) = get("FLEETPIPE_KAFKA_GROUP").filter(|v| !v.is_empty()) {
            self.kafka.group = v;
        }
        Ok(())
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.mqtt.qos > 1 {
            bail!("mqtt.qos must be 0 or 1, not {}", self.mqtt.qos);
        }
        if let Some(url) = &self.mqtt.url {
            parse_mqtt_url(url)?;
        }
        if self.parquet.roll_secs <= 0.0 || self.dead_letter.roll_secs <= 0.0 {
            bail!("parquet.roll_secs and dead_letter.roll_secs must be positive");
        }
        Ok(())
    }

    /// The stable Kafka client id: configured, else derived from the pod or host name.
    pub fn kafka_client_id(&self) -> String {
        match &self.kafka.client_id {
            Some(id) => id.clone(),
            None => instance_id(),
        }
    }

    /// The stable MQTT client id: configured, else derived from the pod or host name.
    pub fn mqtt_client_id(&self) -> String {
        match &self.mqtt.client_id {
            Some(id) => id.clone(),
            None => instance_id(),
        }
    }
}

/// `fleetpipe-<pod or host name>`.
fn instance_id() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into());
    format!("fleetpipe-{host}")
}

/// `mqtt://host:port` (or `tcp://`) → (host, port); the port defaults to 1883.
pub fn parse_mqtt_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .with_context(|| format!("MQTT url {url:?} must start with mqtt://"))?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) => {
            Ok((h.to_string(), p.parse().with_context(|| format!("bad port in MQTT url {url:?}"))?))
        }
        None if !rest.is_empty() => Ok((rest.to_string(), 1883)),
        None => bail!("MQTT url {url:?} has no host"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_is_refused_with_its_name_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetpipe.toml");
        std::fs::write(&path, "[parquet]\nrol_secs = 5\n").unwrap();
        let err = format!("{:#}", Config::from_file(&path).unwrap_err());
        assert!(err.contains("rol_secs"), "{err}");
        assert!(err.contains("fleetpipe.toml"), "{err}");
    }

    #[test]
    fn environment_wins_over_the_file() {
        let mut cfg: Config =
            toml::from_str("data_dir = \"/from/file\"\n[http]\naddr = \"127.0.0.1:1\"\n").unwrap();
        cfg.apply_env(|k| match k {
            "FLEETPIPE_DATA_DIR" => Some("/from/env".into()),
            "FLEETPIPE_MQTT_URL" => Some("mqtt://broker:1884".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/from/env"));
        assert_eq!(cfg.http.addr, "127.0.0.1:1".parse().unwrap());
        assert_eq!(parse_mqtt_url(cfg.mqtt.url.as_deref().unwrap()).unwrap(), ("broker".into(), 1884));
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../fleetpipe.example.toml");
        let cfg: Config = toml::from_str(text).unwrap();
        assert_eq!(cfg.http.addr, "127.0.0.1:8080".parse().unwrap());
    }
}
