//! fleetpipe's sources, each a [`fleetpipe_pipeline::Source`]: MQTT (through rumqttc, against
//! an external broker or the embedded rumqttd one), Kafka (rdkafka, a consumer group member) and
//! HTTP (axum, which also serves reads, metrics and probes).
//!
//! A source turns messages into entries (decoded, validated frames plus rejections) and submits
//! them to the intake; it acknowledges a message (MQTT PUBACK, HTTP 200, Kafka offset) only once
//! the log reports its entry durable. A full intake is the pushback: MQTT stops reading (and so
//! withholds acks), HTTP answers 503 with `Retry-After`, Kafka stops taking records.
//!
//! Each module exports its `serde` config type and its source. This crate knows nothing of sinks.

pub mod broker;
pub mod http;
pub mod kafka;
pub mod mqtt;

use std::net::SocketAddr;

/// What a source can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(
        "cannot listen on {addr} for the embedded MQTT broker: {source}. Another broker is probably \
         running there: point fleetpipe at it with FLEETPIPE_MQTT_URL=mqtt://{addr} (or [mqtt] url in \
         the config file), or move the embedded broker with FLEETPIPE_MQTT_LISTEN=127.0.0.1:PORT"
    )]
    BrokerAddrInUse {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded MQTT broker: {0}")]
    Broker(String),
    #[error("kafka: {what}: {source}")]
    Kafka {
        what: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot listen on {addr} for HTTP (set FLEETPIPE_HTTP_ADDR): {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
