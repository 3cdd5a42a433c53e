//! fleetpipe's sources, each a [`fleetpipe_pipeline::Source`]: the vehicle gateway (fleetpipe's
//! own MQTT server, ntex-mqtt), Teltonika trackers over TCP and UDP (nom-teltonika), MQTT through
//! an external broker (rumqttc), Kafka (rdkafka, a consumer group member) and HTTP (axum, which
//! also serves reads, metrics and probes); and [`auth`], who may speak for which vehicle.
//!
//! A source turns messages into entries (decoded, validated frames plus rejections) and submits
//! them to the intake; it acknowledges a message (MQTT PUBACK, HTTP 200, Kafka offset) only once
//! the log reports its entry durable. A full intake is the pushback: MQTT stops reading (and so
//! withholds acks), HTTP answers 503 with `Retry-After`, Kafka stops taking records.
//!
//! Each module exports its `serde` config type and its source. This crate knows nothing of sinks.

pub mod auth;
pub mod gateway;
pub mod http;
pub mod kafka;
pub mod mqtt;
pub mod teltonika;

use std::net::SocketAddr;

/// What a source can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(
        "cannot listen on {addr} for the vehicle gateway (fleetpipe's MQTT server): {source}. \
         Another broker is probably running there: point fleetpipe at it with \
         FLEETPIPE_MQTT_URL=mqtt://{addr} (or [mqtt] url in the config file), or move the gateway \
         with FLEETPIPE_GATEWAY_LISTEN=127.0.0.1:PORT"
    )]
    GatewayAddrInUse {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("vehicle gateway: {0}")]
    Gateway(String),
    #[error("mqtt source: {0}")]
    MqttSource(String),
    #[error("gateway TLS: {0}")]
    Tls(String),
    #[error("credentials file {path}: {detail}")]
    Credentials { path: std::path::PathBuf, detail: String },
    #[error("gateway session file {path}: {detail}")]
    Sessions { path: std::path::PathBuf, detail: String },
    #[error("kafka: {what}: {source}")]
    Kafka {
        what: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error(
        "cannot listen on {addr} for Teltonika trackers ([teltonika] listen / udp_listen, or \
         FLEETPIPE_TELTONIKA_LISTEN): {source}"
    )]
    TeltonikaListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("teltonika: {0}")]
    Teltonika(String),
    #[error("cannot listen on {addr} for HTTP (set FLEETPIPE_HTTP_ADDR): {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A vehicle id as the contract allows it (for ids given on the command line or in config).
pub(crate) fn check_vehicle_id(id: &str) -> Result<()> {
    fleetpipe_processors::validate::vehicle_id(id).map_err(|(_, detail)| Error::Config(detail))
}
