//! Configuration: a TOML file (every key optional, unknown keys refused) and the contract's
//! environment variables, which win over the file. With neither, fleetpipe runs on embedded
//! defaults: the vehicle gateway on 127.0.0.1:1883, HTTP on 127.0.0.1:8080, Parquet under
//! `./data`, the L1 cache.
//!
//! Each section is the config type of the component it configures, defined (with its defaults)
//! next to that component; this file only puts them together, applies the environment and
//! checks what spans sections. `[kafka]` is the one section two components share (the source
//! and the outputs), so it is defined here and split for them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use fleetpipe_ingest::auth::{AuthConfig, AuthMode};
use fleetpipe_ingest::gateway::GatewayConfig;
use fleetpipe_ingest::http::HttpConfig;
use fleetpipe_ingest::kafka::KafkaConfig;
pub use fleetpipe_ingest::mqtt::parse_mqtt_url;
use fleetpipe_ingest::mqtt::MqttConfig;
use fleetpipe_ingest::teltonika::TeltonikaConfig;
use fleetpipe_pipeline::wal::WalConfig;
pub use fleetpipe_pipeline::AckMode;
use fleetpipe_pipeline::PipelineConfig;
use fleetpipe_processors::latest::CacheConfig;
use fleetpipe_processors::validate::Rules;
use fleetpipe_sinks::dead_letter::DeadLetterConfig;
use fleetpipe_sinks::kafka::KafkaSinkConfig;
use fleetpipe_sinks::parquet::ParquetConfig;
use fleetpipe_sinks::postgres::PostgresConfig;
use fleetpipe_sinks::redis::RedisConfig;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of Parquet files, the dead-letter store and the write-ahead log.
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub gateway: GatewayConfig,
    pub teltonika: TeltonikaConfig,
    pub auth: AuthConfig,
    pub mqtt: MqttConfig,
    pub validate: Rules,
    pub pipeline: PipelineConfig,
    pub wal: WalConfig,
    pub cache: CacheConfig,
    pub parquet: ParquetConfig,
    pub dead_letter: DeadLetterConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub kafka: KafkaSection,
    pub events: EventsSection,
}

/// `[events]`: vehicle events and trips derived by event time (CONTRACT.md §9).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSection {
    pub enabled: bool,
    /// A frame this much older than the newest of its vehicle is late for events.
    pub allowed_lateness_s: f64,
    /// A fix at this speed or faster moves (a motion trip starts at the first one).
    pub min_speed_kmh: f64,
    /// A fix this far from where the vehicle stood moves.
    pub min_move_m: f64,
    /// A motion trip ends at its last moving fix once the vehicle has stood this long.
    pub stop_after_s: f64,
    /// No frame for this long (event time, or receive time for a silent vehicle) ends a trip.
    pub gap_s: f64,
    /// Fixes less accurate than this add no distance and cross no geofence.
    pub max_accuracy_m: f64,
    /// No frame for this long on the receive clock: `vehicle_offline`.
    pub offline_after_s: f64,
    /// A GeoJSON FeatureCollection of geofences (polygons, points with `radius_m`).
    pub geofences: Option<PathBuf>,
    /// A fix within this distance of a geofence's boundary changes nothing.
    pub geofence_margin_m: f64,
    /// The events sink commits (files, state, checkpoint) at most this often.
    pub commit_secs: f64,
    /// Events and trips per vehicle the HTTP API keeps in memory.
    pub http_per_vehicle: usize,
}

impl Default for EventsSection {
    fn default() -> Self {
        let r = fleetpipe_processors::events::EventRules::default();
        let secs = |us: i64| us as f64 / 1e6;
        EventsSection {
            enabled: true,
            allowed_lateness_s: secs(r.allowed_lateness_us),
            min_speed_kmh: r.min_speed_kmh,
            min_move_m: r.min_move_m,
            stop_after_s: secs(r.stop_after_us),
            gap_s: secs(r.gap_us),
            max_accuracy_m: r.max_accuracy_m,
            offline_after_s: secs(r.offline_after_us),
            geofences: None,
            geofence_margin_m: r.geofence_margin_m,
            commit_secs: 1.0,
            http_per_vehicle: 1000,
        }
    }
}

impl EventsSection {
    /// The engine's rules, with the geofences read from their file.
    pub fn rules(&self) -> anyhow::Result<fleetpipe_processors::events::EventRules> {
        let us = |name: &str, s: f64| -> anyhow::Result<i64> {
            if !(0.0..=1e9).contains(&s) {
                bail!("events.{name} must be between 0 and 10^9 seconds, not {s}");
            }
            Ok((s * 1e6) as i64)
        };
        let geofences = match &self.geofences {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading events.geofences {}", path.display()))?;
                fleetpipe_processors::events::parse_geojson(&text)
                    .map_err(|e| anyhow::anyhow!("events.geofences {}: {e}", path.display()))?
            }
            None => Vec::new(),
        };
        Ok(fleetpipe_processors::events::EventRules {
            allowed_lateness_us: us("allowed_lateness_s", self.allowed_lateness_s)?,
            min_speed_kmh: self.min_speed_kmh,
            min_move_m: self.min_move_m,
            stop_after_us: us("stop_after_s", self.stop_after_s)?,
            gap_us: us("gap_s", self.gap_s)?,
            max_accuracy_m: self.max_accuracy_m,
            offline_after_us: us("offline_after_s", self.offline_after_s)?,
            geofence_margin_m: self.geofence_margin_m,
            geofences,
            ..fleetpipe_processors::events::EventRules::default()
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            http: HttpConfig::default(),
            gateway: GatewayConfig::default(),
            teltonika: TeltonikaConfig::default(),
            auth: AuthConfig::default(),
            mqtt: MqttConfig::default(),
            validate: Rules::default(),
            pipeline: PipelineConfig::default(),
            wal: WalConfig::default(),
            cache: CacheConfig::default(),
            parquet: ParquetConfig::default(),
            dead_letter: DeadLetterConfig::default(),
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            kafka: KafkaSection::default(),
            events: EventsSection::default(),
        }
    }
}

/// `[kafka]`: the connection, the input topic (the source) and the outputs (the sink).
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
    /// Vehicle events (with `[events]` on), key `vehicle_id`; `""` switches it off.
    pub events_topic: String,
    /// Longest a revoked partition (or the drain) waits for its entries to become durable.
    pub revoke_wait_secs: f64,
    /// TLS toward the brokers (on once any of these is set, or with `tls = true`): the CA that
    /// signs the brokers' certificates (else the system's roots), and a client certificate and
    /// key for mutual TLS. PEM files.
    pub tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// SASL (on with a username): `PLAIN` (the default), `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub username: Option<String>,
    pub password: Option<String>,
    pub sasl_mechanism: String,
    /// Extra librdkafka properties for every client (they win over the settings above).
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
            events_topic: "vehicle-events".into(),
            revoke_wait_secs: 10.0,
            tls: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            username: None,
            password: None,
            sasl_mechanism: "PLAIN".into(),
            properties: Default::default(),
        }
    }
}

impl KafkaSection {
    /// The source's settings, when Kafka is configured and consumption is on.
    pub fn source(&self) -> Option<KafkaConfig> {
        let brokers = self.brokers.clone().filter(|_| self.consume)?;
        Some(KafkaConfig {
            brokers,
            topic: self.topic.clone(),
            group: self.group.clone(),
            client_id: self.client_id(),
            batch_messages: self.batch_messages,
            revoke_wait: Duration::from_secs_f64(self.revoke_wait_secs.max(0.0)),
            properties: self.client_properties(),
        })
    }

    /// The outputs' settings, when Kafka is configured and an output topic is on.
    pub fn outputs(&self, data_dir: &Path) -> Option<KafkaSinkConfig> {
        let brokers = self.brokers.clone()?;
        let topic = |t: &str| (!t.is_empty()).then(|| t.to_owned());
        let (clean_topic, dlq_topic) = (topic(&self.clean_topic), topic(&self.dlq_topic));
        if clean_topic.is_none() && dlq_topic.is_none() {
            return None;
        }
        Some(KafkaSinkConfig {
            brokers,
            client_id: self.client_id(),
            clean_topic,
            dlq_topic,
            flush_timeout: Duration::from_secs(30),
            properties: self.client_properties(),
            checkpoint: data_dir.join("_fleetpipe").join("kafka.checkpoint"),
        })
    }

    /// The events output's settings, when Kafka is configured and its topic is on.
    pub fn events(&self, data_dir: &Path) -> Option<fleetpipe_sinks::events::kafka::KafkaEventsConfig> {
        let brokers = self.brokers.clone().filter(|_| !self.events_topic.is_empty())?;
        Some(fleetpipe_sinks::events::kafka::KafkaEventsConfig {
            brokers,
            client_id: self.client_id(),
            topic: self.events_topic.clone(),
            properties: self.client_properties(),
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// The librdkafka properties of every client: TLS and SASL as configured, then
    /// `[kafka.properties]`, which win.
    pub fn client_properties(&self) -> Vec<(String, String)> {
        let tls = self.tls || self.tls_ca.is_some() || self.tls_cert.is_some();
        let mut props = std::collections::BTreeMap::new();
        let mut set = |k: &str, v: String| {
            props.insert(k.to_owned(), v);
        };
        match (tls, self.username.is_some()) {
            (true, true) => set("security.protocol", "sasl_ssl".into()),
            (true, false) => set("security.protocol", "ssl".into()),
            (false, true) => set("security.protocol", "sasl_plaintext".into()),
            (false, false) => {}
        }
        let path = |p: &PathBuf| p.display().to_string();
        if let Some(ca) = &self.tls_ca {
            set("ssl.ca.location", path(ca));
        }
        if let Some(cert) = &self.tls_cert {
            set("ssl.certificate.location", path(cert));
        }
        if let Some(key) = &self.tls_key {
            set("ssl.key.location", path(key));
        }
        if let Some(user) = &self.username {
            set("sasl.mechanism", self.sasl_mechanism.clone());
            set("sasl.username", user.clone());
            set("sasl.password", self.password.clone().unwrap_or_default());
        }
        props.extend(self.properties.clone());
        props.into_iter().collect()
    }

    /// The stable Kafka client id: configured, else derived from the pod or host name.
    pub fn client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(instance_id)
    }
}

impl Config {
    /// The file `load` reads: `--config`, else `FLEETPIPE_CONFIG`, else none.
    pub fn file(arg: Option<&Path>) -> Option<PathBuf> {
        arg.map(Path::to_path_buf).or_else(|| std::env::var_os("FLEETPIPE_CONFIG").map(PathBuf::from))
    }

    /// Reads the file (`--config`, else `FLEETPIPE_CONFIG`, else none), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut cfg = match Self::file(file) {
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
        // FLEETPIPE_MQTT_LISTEN is the gateway's older name; FLEETPIPE_GATEWAY_LISTEN wins.
        for key in ["FLEETPIPE_MQTT_LISTEN", "FLEETPIPE_GATEWAY_LISTEN"] {
            if let Some(v) = get(key).filter(|v| !v.is_empty()) {
                self.gateway.listen = Some(addr(key, v)?);
            }
        }
        if let Some(v) = get("FLEETPIPE_TELTONIKA_LISTEN").filter(|v| !v.is_empty()) {
            self.teltonika.listen = Some(addr("FLEETPIPE_TELTONIKA_LISTEN", v)?);
        }
        if let Some(v) = get("FLEETPIPE_TELTONIKA_UDP_LISTEN").filter(|v| !v.is_empty()) {
            self.teltonika.udp_listen = Some(addr("FLEETPIPE_TELTONIKA_UDP_LISTEN", v)?);
        }
        if let Some(v) = get("FLEETPIPE_AUTH").filter(|v| !v.is_empty()) {
            self.auth.mode = Some(match v.as_str() {
                "token" => AuthMode::Token,
                "none" => AuthMode::None,
                _ => bail!("FLEETPIPE_AUTH={v:?} must be token or none"),
            });
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
        if let Some(v) = get("FLEETPIPE_KAFKA_USERNAME").filter(|v| !v.is_empty()) {
            self.kafka.username = Some(v);
        }
        if let Some(v) = get("FLEETPIPE_KAFKA_PASSWORD") {
            self.kafka.password = Some(v);
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
        for (section, cert, key) in [
            ("mqtt", &self.mqtt.tls_cert, &self.mqtt.tls_key),
            ("postgres", &self.postgres.tls_cert, &self.postgres.tls_key),
            ("redis", &self.redis.tls_cert, &self.redis.tls_key),
            ("kafka", &self.kafka.tls_cert, &self.kafka.tls_key),
        ] {
            if cert.is_some() != key.is_some() {
                bail!("[{section}] tls_cert and tls_key go together: set both or neither");
            }
        }
        if self.parquet.roll_secs <= 0.0 || self.dead_letter.roll_secs <= 0.0 {
            bail!("parquet.roll_secs and dead_letter.roll_secs must be positive");
        }
        Ok(())
    }

    /// The stable MQTT client id: configured, else derived from the pod or host name.
    /// The external broker client id: as configured, else `fleetpipe-{host}-{suffix}`, the
    /// suffix random, made once and kept in `{data_dir}/_fleetpipe/instance_id` (a guessable id
    /// lets any client of an open broker take fleetpipe's session away).
    pub fn mqtt_client_id(&self) -> anyhow::Result<String> {
        if let Some(id) = &self.mqtt.client_id {
            return Ok(id.clone());
        }
        let path = self.data_dir.join("_fleetpipe").join("instance_id");
        if let Ok(kept) = std::fs::read_to_string(&path) {
            let kept = kept.trim();
            if !kept.is_empty() {
                return Ok(kept.to_owned());
            }
        }
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for the client id: {e}"))?;
        let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let id = format!("{}-{suffix}", instance_id());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, format!("{id}\n")).with_context(|| format!("writing {}", path.display()))?;
        Ok(id)
    }

    /// Where the gateway listens for plain MQTT: as configured, else `127.0.0.1:1883` when no
    /// external broker is configured; `None` when it is off.
    pub fn gateway_listen(&self) -> Option<SocketAddr> {
        self.gateway.listen.or_else(|| self.mqtt.url.is_none().then(|| ([127, 0, 0, 1], 1883).into()))
    }

    /// Every address fleetpipe listens on (the auth default depends on them).
    pub fn listeners(&self) -> Vec<SocketAddr> {
        [
            self.gateway_listen(),
            self.gateway.tls_listen,
            self.teltonika.listen,
            self.teltonika.udp_listen,
            Some(self.http.addr),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The credentials file (`[auth] credentials_file`, else `{data_dir}/credentials`).
    pub fn credentials_file(&self) -> PathBuf {
        self.auth.file(&self.data_dir)
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
        // With an external broker the gateway is off unless its address is given.
        assert_eq!(cfg.gateway_listen(), None);
        cfg.apply_env(|k| (k == "FLEETPIPE_MQTT_LISTEN").then(|| "127.0.0.1:1999".into())).unwrap();
        assert_eq!(cfg.gateway_listen(), Some("127.0.0.1:1999".parse().unwrap()));
    }

    #[test]
    fn kafka_tls_and_sasl_become_librdkafka_properties_and_properties_win() {
        let cfg: Config = toml::from_str(
            "[kafka]\nbrokers = \"b:9093\"\ntls_ca = \"/ca.pem\"\nusername = \"fp\"\npassword = \"pw\"\n\
             sasl_mechanism = \"SCRAM-SHA-512\"\n[kafka.properties]\n\"ssl.endpoint.identification.algorithm\" = \"none\"\n",
        )
        .unwrap();
        let props: std::collections::BTreeMap<_, _> = cfg.kafka.client_properties().into_iter().collect();
        let get = |k: &str| props.get(k).map(String::as_str);
        assert_eq!(get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(get("ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!((get("sasl.username"), get("sasl.password")), (Some("fp"), Some("pw")));
        assert_eq!(get("ssl.endpoint.identification.algorithm"), Some("none"));
        let plain: Config = toml::from_str("[kafka]\nbrokers = \"b:9092\"\n").unwrap();
        assert!(plain.kafka.client_properties().is_empty());
        let half: Config = toml::from_str("[postgres]\ntls_cert = \"/c.pem\"\n").unwrap();
        let e = half.check().unwrap_err().to_string();
        assert!(e.contains("[postgres] tls_cert and tls_key go together"), "{e}");
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../fleetpipe.example.toml");
        let cfg: Config = toml::from_str(text).unwrap();
        assert_eq!(cfg.http.addr, "127.0.0.1:8080".parse().unwrap());
    }
}
