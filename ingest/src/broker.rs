//! The embedded MQTT broker (rumqttd), started when no external broker is configured, so that
//! `fleetpipe run` needs no other service.
//!
//! Like every broker, it acknowledges a publisher's QoS 1 message as soon as its router holds
//! it; fleetpipe's own subscriber then makes the message durable within its ack window. A crash
//! of the whole node can lose what the broker held but fleetpipe had not yet made durable: for
//! at-least-once across node crashes, use an external broker with persistence.
//!
//! It speaks MQTT 3.1.1 on its listen address (`mosquitto_pub` works as-is) and, optionally,
//! MQTT 5 on a second address.

use std::net::{SocketAddr, TcpListener};

use crate::mqtt::MqttConfig;
use crate::{Error, Result};

/// rumqttd keeps every topic's messages in an in-memory log of this many segments and drops the
/// oldest segment when a new one starts: see [`BrokerConfig::topic_buffer_bytes`].
const TOPIC_SEGMENTS: usize = 4;

/// Settings of the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 listener.
    pub listen: SocketAddr,
    /// Optional MQTT 5 listener.
    pub listen_v5: Option<SocketAddr>,
    pub max_payload_bytes: usize,
    /// Unacknowledged QoS 1 messages per connection.
    pub max_inflight: usize,
    /// Memory kept per topic. rumqttd keeps every topic's messages in memory, most recent
    /// last, up to this size: it bounds the broker's memory (topics × this) and is also how far
    /// fleetpipe's own subscriber may fall behind on one topic before the broker drops the
    /// oldest messages, as Mosquitto's queue limit would. Large fleets and long outages want an
    /// external broker with persistence.
    pub topic_buffer_bytes: usize,
}

impl BrokerConfig {
    /// The embedded broker that `[mqtt]` describes (its `listen` addresses and limits).
    pub fn from_mqtt(m: &MqttConfig) -> BrokerConfig {
        BrokerConfig {
            listen: m.listen,
            listen_v5: m.listen_v5,
            max_payload_bytes: m.max_packet_bytes,
            max_inflight: usize::from(m.receive_maximum),
            topic_buffer_bytes: m.embedded_topic_buffer_kib.saturating_mul(1024),
        }
    }
}

/// Starts the broker on its own threads. Returns once its listeners are bound.
pub fn start(cfg: &BrokerConfig) -> Result<()> {
    for addr in std::iter::once(cfg.listen).chain(cfg.listen_v5) {
        // rumqttd binds on its own threads and only logs a failure: check first, answer clearly.
        TcpListener::bind(addr).map_err(|source| Error::BrokerAddrInUse { addr, source })?;
    }
    let server = |name: &str, addr: SocketAddr| {
        format!(
            r#"
[{name}.1]
name = "{name}"
listen = "{addr}"
next_connection_delay_ms = 0
    [{name}.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {payload}
    max_inflight_count = {inflight}
    dynamic_filters = true
"#,
            payload = cfg.max_payload_bytes,
            inflight = cfg.max_inflight,
        )
    };
    let mut text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 4096
max_segment_size = {segment}
max_segment_count = {segments}
"#,
        segment = (cfg.topic_buffer_bytes / TOPIC_SEGMENTS).max(1024),
        segments = TOPIC_SEGMENTS,
    );
    text.push_str(&server("v4", cfg.listen));
    if let Some(v5) = cfg.listen_v5 {
        text.push_str(&server("v5", v5));
    }
    let config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| Error::Broker(format!("configuration: {e}")))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded mqtt broker stopped");
            }
        })
        .map_err(|e| Error::Broker(format!("failed to start: {e}")))?;
    wait_listening(cfg.listen)?;
    if let Some(v5) = cfg.listen_v5 {
        wait_listening(v5)?;
    }
    tracing::info!(listen = %cfg.listen, listen_v5 = ?cfg.listen_v5, "embedded mqtt broker started");
    Ok(())
}

fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(Error::Broker(format!("not listening on {addr} after 10 s")))
}
