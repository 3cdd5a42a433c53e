//! The MQTT source (rumqttc), MQTT 5 by default, MQTT 3.1.1 on request.
//!
//! Delivery semantics: QoS 1 messages are acknowledged only once durable. rumqttc's defaults
//! work against that, so each is set on purpose: manual acks (a PUBACK goes out when the
//! write-ahead log has fsync'd the entry that carried the message, or its rejection), a
//! persistent session (fixed client id, no clean start, a session expiry), a large Receive
//! Maximum (MQTT 5: throughput per connection is in-flight window ÷ time-to-ack) and a maximum
//! packet size that matches the payload limit, so an oversized message is refused by the broker
//! (MQTT 5) or decoded and dead-lettered as `oversized`, never looped on.
//!
//! PUBACKs go out in the order the PUBLISHes arrived (MQTT §4.6): one task batches incoming
//! messages in arrival order into entries, the log completes entries in submission order, and
//! one task sends their acks in that order.
//!
//! Three tasks: the poller drives rumqttc's event loop and never blocks on the pipeline for
//! long (it resubscribes on every ConnAck); the batcher decodes and submits; the acker acks.
//! Shutdown stops intake, waits for every submitted entry to become durable and be acked, then
//! disconnects: messages received but not yet submitted are left unacknowledged, and the broker
//! redelivers them to this client id's session.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetpipe_pipeline::{now_micros, Entry, Intake, Ready, Source, SourceContext, Submission};
use fleetpipe_processors::codec::{decode_message_into, Message};
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::{Decoded, Origin};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{Error, Result};

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    V5,
    V311,
}

/// `[mqtt]`: an external broker fleetpipe subscribes to (EMQX, Mosquitto, HiveMQ, ...).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The broker (`mqtt://host:port`). Unset: no broker; vehicles connect to the gateway.
    pub url: Option<String>,
    /// Protocol toward the broker.
    pub protocol: Protocol,
    /// Stable per instance (e.g. the pod name), so each instance resumes its own session.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS toward the broker (on with an `mqtts://` url): the CA that signs the broker's
    /// certificate (PEM; unset: the system's roots), and a client certificate and key (PEM)
    /// when the broker asks for one.
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Topic filters; the contract's default is `vehicles/+/+`.
    pub topics: Vec<String>,
    /// MQTT 5 shared-subscription group (`$share/{group}/…`) for several instances.
    pub shared_group: Option<String>,
    /// 0 or 1.
    pub qos: u8,
    pub keep_alive_secs: u64,
    /// MQTT 5 Receive Maximum: the broker's in-flight window toward us.
    pub receive_maximum: u16,
    /// MQTT 5 session expiry: how long the broker keeps our session (and queues for us).
    pub session_expiry_secs: u64,
    /// Largest packet accepted (and announced to an MQTT 5 broker).
    pub max_packet_bytes: usize,
    /// Most messages folded into one log entry.
    pub batch_messages: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: None,
            protocol: Protocol::V5,
            client_id: None,
            username: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            topics: vec!["vehicles/+/+".into()],
            shared_group: None,
            qos: 1,
            keep_alive_secs: 30,
            receive_maximum: 65_535,
            session_expiry_secs: 7 * 24 * 3600,
            max_packet_bytes: (16 << 20) + 65_536,
            batch_messages: 1024,
        }
    }
}

/// `mqtt://host:port` (or `tcp://`) → (host, port); the port defaults to 1883.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16)> {
    let bad = |why: &str| Error::Config(format!("MQTT url {url:?} {why}"));
    let (rest, default_port) = match url.strip_prefix("mqtts://").or_else(|| url.strip_prefix("ssl://")) {
        Some(rest) => (rest, 8883),
        None => (
            url.strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://"))
                .ok_or_else(|| bad("must start with mqtt:// or mqtts://"))?,
            1883,
        ),
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.parse().map_err(|_| bad("has a bad port"))?)),
        None if !rest.is_empty() => Ok((rest.to_string(), default_port)),
        None => Err(bad("has no host")),
    }
}

/// Whether `url` asks for TLS (`mqtts://`, `ssl://`).
pub fn mqtt_url_is_tls(url: &str) -> bool {
    url.starts_with("mqtts://") || url.starts_with("ssl://")
}

/// The TLS client configuration toward the broker: roots from `tls_ca` (else the system's),
/// and the client certificate when one is configured.
fn tls_client_config(cfg: &MqttConfig) -> Result<Arc<rustls::ClientConfig>> {
    let files = fleetpipe_pipeline::tls::TlsFiles {
        section: "[mqtt]",
        ca: cfg.tls_ca.clone(),
        cert: cfg.tls_cert.clone(),
        key: cfg.tls_key.clone(),
    };
    files.client_config().map_err(|e| Error::Tls(e.to_string()))
}

/// The MQTT source: a subscriber of an external broker.
#[derive(Debug, Clone)]
pub struct MqttSource {
    cfg: MqttConfig,
    host: String,
    port: u16,
    /// TLS toward the broker, when the url asks for it.
    tls: Option<Arc<rustls::ClientConfig>>,
    protocol: Protocol,
    client_id: String,
}

impl MqttSource {
    /// Subscribes to the broker at `url` as `client_id`.
    pub fn new(cfg: &MqttConfig, url: &str, client_id: String) -> Result<MqttSource> {
        let (host, port) = parse_mqtt_url(url)?;
        let tls =
            if mqtt_url_is_tls(url) || cfg.tls_ca.is_some() { Some(tls_client_config(cfg)?) } else { None };
        Ok(MqttSource { cfg: cfg.clone(), host, port, tls, protocol: cfg.protocol, client_id })
    }

    /// Where the broker listens, `host:port`.
    pub fn broker(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    fn filters(&self) -> Vec<String> {
        self.cfg
            .topics
            .iter()
            .map(|t| match &self.cfg.shared_group {
                Some(g) => format!("$share/{g}/{t}"),
                None => t.clone(),
            })
            .collect()
    }
}

impl Source for MqttSource {
    type Error = Error;

    fn name(&self) -> &'static str {
        "mqtt"
    }

    /// On a runtime of its own, in one thread: the source's tasks (the poller of the broker
    /// connection, the batcher that decodes, the acker) hand every message to one another, and
    /// on the shared multi-threaded runtime each hand-off could wake another thread (20
    /// publishers at QoS 0: about 10 % more CPU per frame, `load-tests/RESULTS.md`).
    async fn run(self, ctx: SourceContext) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::MqttSource(format!("its runtime: {e}")))?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("mqtt-source".into())
            .spawn(move || {
                let _ = done_tx.send(rt.block_on(run(self, ctx)));
            })
            .map_err(|e| Error::MqttSource(format!("its thread: {e}")))?;
        done_rx.await.unwrap_or_else(|_| Err(Error::MqttSource("its thread ended without a result".into())))
    }
}

/// A received message, whichever the protocol version.
enum Publish {
    V4(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

impl Publish {
    fn topic(&self) -> &[u8] {
        match self {
            Publish::V4(p) => p.topic.as_bytes(),
            Publish::V5(p) => &p.topic,
        }
    }
    fn payload(&self) -> &Bytes {
        match self {
            Publish::V4(p) => &p.payload,
            Publish::V5(p) => &p.payload,
        }
    }
    fn content_type(&self) -> Option<&str> {
        match self {
            Publish::V4(_) => None,
            Publish::V5(p) => p.properties.as_ref().and_then(|pr| pr.content_type.as_deref()),
        }
    }
    /// An MQTT 5 `traceparent` user property.
    fn trace(&self) -> Option<fleetpipe_processors::trace::TraceContext> {
        match self {
            Publish::V4(_) => None,
            Publish::V5(p) => p.properties.as_ref().and_then(|pr| {
                let pairs = pr.user_properties.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                fleetpipe_processors::trace::TraceContext::find(pairs)
            }),
        }
    }
    fn needs_ack(&self) -> bool {
        match self {
            Publish::V4(p) => p.qos != rumqttc::QoS::AtMostOnce,
            Publish::V5(p) => p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        }
    }

    /// What acknowledging it takes: its packet id and QoS, not its topic, payload and
    /// properties (an ack that waits holds 4 bytes, not the message and its read buffer).
    fn ack_id(&self) -> AckId {
        match self {
            Publish::V4(p) => AckId::V4(p.pkid, p.qos),
            Publish::V5(p) => AckId::V5(p.pkid, p.qos),
        }
    }
}

/// A message to acknowledge.
#[derive(Clone, Copy)]
enum AckId {
    V4(u16, rumqttc::QoS),
    V5(u16, rumqttc::v5::mqttbytes::QoS),
}

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    async fn ack(&self, id: AckId) -> Result<(), String> {
        match (self, id) {
            (Client::V4(c), AckId::V4(pkid, qos)) => {
                let mut p = rumqttc::Publish::new("", qos, Vec::new());
                p.pkid = pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            (Client::V5(c), AckId::V5(pkid, qos)) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", qos, Bytes::new(), None);
                p.pkid = pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            _ => Err("protocol mismatch".into()),
        }
    }
    async fn subscribe(&self, filter: &str, qos: u8) -> Result<(), String> {
        match self {
            Client::V4(c) => c.subscribe(filter, qos_v4(qos)).await.map_err(|e| e.to_string()),
            Client::V5(c) => c.subscribe(filter, qos_v5(qos)).await.map_err(|e| e.to_string()),
        }
    }
    async fn unsubscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V4(c) => c.unsubscribe(filter).await.map_err(|e| e.to_string()),
            Client::V5(c) => c.unsubscribe(filter).await.map_err(|e| e.to_string()),
        }
    }
    async fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        }
    }
}

fn qos_v4(q: u8) -> rumqttc::QoS {
    if q == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    if q == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

/// What the poller makes of one event-loop step.
enum Step {
    Message(Publish),
    Connected { session_present: bool },
    Subscribed { ok: bool },
    Unsubscribed,
    Disconnected,
    Other,
    Failed(String),
}

enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// One event-loop step as a [`Step`]. Both protocol versions have the same packets under other
/// paths: the caller brings them into scope, `$wrap` makes the [`Publish`].
macro_rules! step {
    ($el:expr, $wrap:path) => {
        match $el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => Step::Message($wrap(p)),
            Ok(Event::Incoming(Packet::ConnAck(c))) => Step::Connected { session_present: c.session_present },
            Ok(Event::Incoming(Packet::SubAck(s))) => Step::Subscribed {
                ok: s.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            },
            Ok(Event::Incoming(Packet::UnsubAck(_))) => Step::Unsubscribed,
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Step::Disconnected,
            Ok(_) => Step::Other,
            Err(e) => Step::Failed(e.to_string()),
        }
    };
}

impl EventLoop {
    async fn step(&mut self) -> Step {
        match self {
            EventLoop::V4(el) => {
                use rumqttc::{Event, Outgoing, Packet, SubscribeReasonCode};
                step!(el, Publish::V4)
            }
            EventLoop::V5(el) => {
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                use rumqttc::v5::Event;
                use rumqttc::Outgoing;
                step!(el, Publish::V5)
            }
        }
    }
}

fn connect(src: &MqttSource) -> (Client, EventLoop) {
    let cfg = &src.cfg;
    let keep_alive = Duration::from_secs(cfg.keep_alive_secs.max(5));
    // Requests queued toward the event loop: acks mostly. One per in-flight message at most.
    let cap = usize::from(cfg.receive_maximum).max(64) + 64;
    match src.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&src.client_id, &src.host, src.port);
            o.set_keep_alive(keep_alive)
                .set_clean_session(false)
                .set_manual_acks(true)
                // MQTT 3.1.1 cannot tell the broker our limit: read whatever it sends (up to
                // 256 MiB, the protocol's own maximum) and dead-letter what is over the payload
                // limit, instead of erroring, reconnecting and being sent the same message again.
                .set_max_packet_size(V311_MAX_INCOMING.max(cfg.max_packet_bytes), cfg.max_packet_bytes)
                .set_inflight(cfg.receive_maximum.max(1));
            if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
                o.set_credentials(u, p);
            }
            if let Some(tls) = &src.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                    tls.clone(),
                )));
            }
            let (c, el) = rumqttc::AsyncClient::new(o, cap);
            (Client::V4(c), EventLoop::V4(Box::new(el)))
        }
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&src.client_id, &src.host, src.port);
            let expiry = u32::try_from(cfg.session_expiry_secs).unwrap_or(u32::MAX);
            let max_packet = u32::try_from(cfg.max_packet_bytes).unwrap_or(u32::MAX);
            o.set_keep_alive(keep_alive)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(expiry))
                .set_manual_acks(true)
                .set_receive_maximum(Some(cfg.receive_maximum.max(1)))
                .set_max_packet_size(Some(max_packet));
            if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
                o.set_credentials(u, p);
            }
            if let Some(tls) = &src.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                    tls.clone(),
                )));
            }
            let (c, el) = rumqttc::v5::AsyncClient::new(o, cap);
            (Client::V5(c), EventLoop::V5(Box::new(el)))
        }
    }
}

/// `fleetpipe check`: connects to the broker as the source would (its credentials and TLS, a
/// client id of its own and a clean session, so nothing is left behind) and waits for the
/// CONNACK. Answers `host:port: connected`.
pub async fn check(cfg: &MqttConfig, url: &str) -> Result<String> {
    let src = MqttSource::new(cfg, url, format!("fleetpipe-check-{}", std::process::id()))?;
    let at = format!("{}:{}", src.host, src.port);
    let mut o = rumqttc::MqttOptions::new(&src.client_id, &src.host, src.port);
    o.set_keep_alive(Duration::from_secs(5)).set_clean_session(true);
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        o.set_credentials(u, p);
    }
    if let Some(tls) = &src.tls {
        o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
    }
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    let connack = async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => return Ok(ack),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), connack).await;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
    match answer {
        Ok(Ok(ack)) if ack.code == rumqttc::ConnectReturnCode::Success => Ok(format!("{at}: connected")),
        Ok(Ok(ack)) => Err(Error::Config(format!("{at}: the broker refused the connection: {:?}", ack.code))),
        Ok(Err(e)) => Err(Error::Config(format!("{at}: {e}"))),
        Err(_) => Err(Error::Config(format!("{at}: no CONNACK within 5 s"))),
    }
}

/// The largest packet MQTT 3.1.1 can encode (remaining length < 2^28).
const V311_MAX_INCOMING: usize = 268_435_455;

/// Acknowledgements to send, in arrival order, with the connection epoch they belong to.
struct AckBatch {
    epoch: u64,
    publishes: Vec<AckId>,
}

/// Runs the source until shutdown, then drains (see the module header). `ready` is set once
/// every filter is subscribed.
async fn run(src: MqttSource, ctx: SourceContext) -> Result<()> {
    let SourceContext { intake, rules, ready, shutdown, .. } = ctx;
    let cfg = &src.cfg;
    let (client, mut eventloop) = connect(&src);
    let (raw_tx, raw_rx) = mpsc::channel::<(u64, Publish)>(usize::from(cfg.receive_maximum).max(1024));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<AckBatch>();
    // A session the broker lost (session_present = false) invalidates older packet ids: acks
    // of an older epoch are dropped rather than sent on the new session.
    let epoch = Arc::new(AtomicU64::new(0));
    let stop_intake = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::new(AtomicBool::new(false));
    // Leaving a shared subscription: no resubscribe on reconnect; unsubacks and the time of the
    // last message tell when the broker has nothing more for us.
    let leaving = Arc::new(AtomicBool::new(false));
    let unsubacks = Arc::new(AtomicU64::new(0));
    let started = std::time::Instant::now();
    let last_message_ms = Arc::new(AtomicU64::new(0));

    let batcher = tokio::spawn(batch_loop(
        raw_rx,
        intake,
        rules,
        ack_tx,
        cfg.batch_messages.max(1),
        stop_intake.clone(),
    ));
    let acker = tokio::spawn(ack_loop(ack_rx, client.clone(), epoch.clone()));

    let filters = src.filters();
    let qos = cfg.qos;
    let poll_ready: Ready = ready.clone();
    let poll_stopping = stopping.clone();
    let poll_client = client.clone();
    let (poll_leaving, poll_unsubacks, poll_last) =
        (leaving.clone(), unsubacks.clone(), last_message_ms.clone());
    let poller = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match eventloop.step().await {
                Step::Message(p) => {
                    poll_last.store(started.elapsed().as_millis() as u64, Ordering::Release);
                    let e = epoch.load(Ordering::Acquire);
                    // After shutdown began the batcher is gone: the message stays unacked and
                    // the broker redelivers it to our session.
                    let _ = raw_tx.send((e, p)).await;
                }
                Step::Connected { session_present } => {
                    backoff = Duration::from_millis(100);
                    if !session_present {
                        epoch.fetch_add(1, Ordering::AcqRel);
                    }
                    tracing::info!(session_present, "mqtt connected");
                    if poll_stopping.load(Ordering::Acquire) || poll_leaving.load(Ordering::Acquire) {
                        continue;
                    }
                    // Resubscribe on every connect: a lost subscription is silent.
                    for f in &filters {
                        let c = poll_client.clone();
                        let f = f.clone();
                        // The request queue is drained by this very loop: never await it here.
                        tokio::spawn(async move {
                            if let Err(e) = c.subscribe(&f, qos).await {
                                tracing::warn!(filter = %f, error = %e, "mqtt subscribe request failed");
                            }
                        });
                    }
                }
                Step::Subscribed { ok } => {
                    if ok {
                        poll_ready.set(true);
                        tracing::info!("mqtt subscribed");
                    } else {
                        tracing::error!("mqtt broker refused a subscription");
                    }
                }
                Step::Unsubscribed => {
                    poll_unsubacks.fetch_add(1, Ordering::AcqRel);
                }
                Step::Disconnected => {
                    if poll_stopping.load(Ordering::Acquire) {
                        return;
                    }
                }
                Step::Other => {}
                Step::Failed(e) => {
                    poll_ready.set(false);
                    if poll_stopping.load(Ordering::Acquire) {
                        tracing::info!(error = %e, "mqtt connection closed while stopping");
                        return;
                    }
                    metrics::counter!("fleetpipe_mqtt_connection_errors_total").increment(1);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "mqtt connection error");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });

    shutdown.wait().await;
    tracing::info!("mqtt source draining");
    ready.set(false);
    if cfg.shared_group.is_some() {
        leave_shared_subscription(&client, &src.filters(), &leaving, &unsubacks, started, &last_message_ms)
            .await;
    }
    stopping.store(true, Ordering::Release);
    stop_intake.notify_one();
    // The batcher returns after submitting what it holds; the acker after the last of those
    // is durable and acked.
    let _ = batcher.await;
    let _ = acker.await;
    if let Err(e) = client.disconnect().await {
        tracing::warn!(error = %e, "mqtt disconnect request failed");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
    tracing::info!("mqtt source stopped");
    Ok(())
}

/// Scale-in of a shared-subscription member: unsubscribe first, so that the broker routes new
/// messages to the other members, then keep taking (and acknowledging) what the broker had
/// already sent or queued for this session until it has been quiet for [`LEAVE_QUIET`]. Only
/// then does the normal drain stop intake; nothing is left in this session for the broker to
/// hold until it expires (mosquitto #2662).
async fn leave_shared_subscription(
    client: &Client,
    filters: &[String],
    leaving: &AtomicBool,
    unsubacks: &AtomicU64,
    started: std::time::Instant,
    last_message_ms: &AtomicU64,
) {
    leaving.store(true, Ordering::Release);
    let before = unsubacks.load(Ordering::Acquire);
    for f in filters {
        if let Err(e) = client.unsubscribe(f).await {
            tracing::warn!(filter = %f, error = %e, "mqtt unsubscribe request failed");
        }
    }
    let deadline = tokio::time::Instant::now() + LEAVE_TIMEOUT;
    while unsubacks.load(Ordering::Acquire) < before + filters.len() as u64 {
        if tokio::time::Instant::now() > deadline {
            tracing::warn!("mqtt unsubscribe not acknowledged; draining anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    loop {
        let now_ms = started.elapsed().as_millis() as u64;
        let quiet_for = Duration::from_millis(now_ms.saturating_sub(last_message_ms.load(Ordering::Acquire)));
        if quiet_for >= LEAVE_QUIET || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(LEAVE_QUIET - quiet_for).await;
    }
    tracing::info!("mqtt shared subscription left");
}

/// How long a leaving shared-subscription member waits for the broker to stop sending.
const LEAVE_QUIET: Duration = Duration::from_millis(500);
const LEAVE_TIMEOUT: Duration = Duration::from_secs(30);

async fn batch_loop(
    mut raw_rx: mpsc::Receiver<(u64, Publish)>,
    intake: Intake,
    rules: Arc<Rules>,
    ack_tx: mpsc::UnboundedSender<AckBatch>,
    batch_messages: usize,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut buf: Vec<(u64, Publish)> = Vec::with_capacity(batch_messages);
    loop {
        buf.clear();
        tokio::select! {
            biased;
            _ = stop.notified() => break,
            n = raw_rx.recv_many(&mut buf, batch_messages) => if n == 0 { break },
        }
        // One entry per epoch run, so an ack batch never mixes sessions.
        while let Some(&(epoch, _)) = buf.first() {
            let end = buf.iter().position(|(e, _)| *e != epoch).unwrap_or(buf.len());
            let run: Vec<Publish> = buf.drain(..end).map(|(_, p)| p).collect();
            let submission = build_submission(run, epoch, &rules, &ack_tx);
            if intake.send(submission).await.is_err() {
                tracing::warn!("mqtt intake closed");
                return;
            }
        }
    }
    // Dropping `raw_rx` here makes the poller leave later messages unacknowledged.
}

fn build_submission(
    publishes: Vec<Publish>,
    epoch: u64,
    rules: &Rules,
    ack_tx: &mpsc::UnboundedSender<AckBatch>,
) -> Submission {
    let received_at = now_micros();
    let mut entry = Entry { received_at, ..Entry::default() };
    // Every message of the entry decodes into one `Decoded`, which becomes the entry's.
    let mut decoded = Decoded { frames: Vec::with_capacity(publishes.len()), ..Decoded::default() };
    for p in &publishes {
        let topic = match std::str::from_utf8(p.topic()) {
            Ok(t) => t.to_owned(),
            Err(_) => String::from_utf8_lossy(p.topic()).into_owned(),
        };
        let origin = Origin::Mqtt { topic };
        let msg =
            Message { payload: p.payload(), content_type: p.content_type(), origin: &origin, received_at };
        decode_message_into(&msg, rules, &mut decoded);
    }
    fleetpipe_pipeline::count_received("mqtt", u64::from(decoded.received));
    entry.absorb(decoded);
    if fleetpipe_pipeline::trace::is_on() {
        let incoming: Vec<_> = publishes.iter().filter_map(Publish::trace).collect();
        entry.trace = fleetpipe_pipeline::trace::intake("mqtt", &incoming, entry.frames.len());
    }
    let to_ack: Vec<AckId> = publishes.iter().filter(|p| p.needs_ack()).map(Publish::ack_id).collect();
    drop(publishes);
    let ack_tx = ack_tx.clone();
    Submission {
        entry,
        done: Some(Box::new(move |result| match result {
            Ok(_) => {
                let _ = ack_tx.send(AckBatch { epoch, publishes: to_ack });
            }
            Err(e) => {
                // Not durable: withhold the acks; the broker redelivers after a reconnect.
                tracing::error!(error = %e, messages = to_ack.len(), "mqtt entry not durable, acks withheld");
            }
        })),
    }
}

async fn ack_loop(mut rx: mpsc::UnboundedReceiver<AckBatch>, client: Client, epoch: Arc<AtomicU64>) {
    while let Some(batch) = rx.recv().await {
        if batch.epoch != epoch.load(Ordering::Acquire) {
            metrics::counter!("fleetpipe_mqtt_stale_acks_total").increment(batch.publishes.len() as u64);
            continue;
        }
        for &id in &batch.publishes {
            if let Err(e) = client.ack(id).await {
                tracing::warn!(error = %e, "mqtt ack failed");
            }
        }
        metrics::counter!("fleetpipe_mqtt_acks_total").increment(batch.publishes.len() as u64);
    }
}
