//! One vehicle connection: CONNECT (identity, client id, session), PUBLISH (authorised, decoded,
//! made durable, then acknowledged), SUBSCRIBE (only to its own topics), for MQTT 3.1.1 and 5.
//!
//! ntex-mqtt runs these on its worker threads. A PUBLISH handler's future is the PUBACK: it
//! completes only once the message's frames (or its rejection) are durable. Handlers run
//! concurrently per connection, up to the announced Receive Maximum; ntex writes their PUBACKs
//! in arrival order and stops reading the socket while the window is full, which is how a full
//! intake pushes back to the vehicle over TCP. Messages go to the log through one batcher per
//! worker thread, which folds the messages that are waiting into one entry.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fleetpipe_pipeline::{now_micros, Entry, NotDurable, Submission};
use fleetpipe_processors::codec::{decode_message, parse_topic, Message};
use fleetpipe_processors::trace::TraceContext;
use fleetpipe_processors::{Decoded, Origin, Reason, Rejection};
use ntex_mqtt::{v3, v5, QoS};
use ntex_service::{fn_factory_with_config, fn_service};
use ntex_util::future::{select, Either};
use tokio::sync::{mpsc, oneshot};

use super::sessions::{Admit, Kick};
use super::{GwError, Shared};
use crate::auth::{AuthMode, Identity};

/// A message on its way to the log, and who waits for it.
pub(crate) struct Pending {
    decoded: Decoded,
    done: Option<oneshot::Sender<Result<(), NotDurable>>>,
    /// An MQTT 5 `traceparent` user property (read only while traces are on).
    trace: Option<TraceContext>,
}

/// The sending side of a worker's batcher.
pub(crate) type Batcher = mpsc::Sender<Pending>;

/// Starts the batcher of the current worker thread.
pub(crate) fn spawn_batcher(shared: &Arc<Shared>) -> Batcher {
    let (tx, rx) = mpsc::channel(shared.batch_messages.max(1) * 4);
    let intake = shared.intake.clone();
    let max = shared.batch_messages.max(1);
    ntex_rt::spawn(batch_loop(rx, intake, max));
    tx
}

/// Folds the waiting messages into one entry; completes each once the entry is durable.
async fn batch_loop(mut rx: mpsc::Receiver<Pending>, intake: fleetpipe_pipeline::Intake, max: usize) {
    let mut buf = Vec::with_capacity(max);
    loop {
        buf.clear();
        if rx.recv_many(&mut buf, max).await == 0 {
            return;
        }
        let received_at = now_micros();
        let mut entry = Entry { received_at, ..Entry::default() };
        let mut waiters = Vec::with_capacity(buf.len());
        let mut received = 0u64;
        let mut incoming = Vec::new();
        for p in buf.drain(..) {
            received += u64::from(p.decoded.received);
            entry.absorb(p.decoded);
            waiters.extend(p.done);
            incoming.extend(p.trace);
        }
        entry.trace = fleetpipe_pipeline::trace::intake("mqtt", &incoming, entry.frames.len());
        // One receive time per entry, as the log stores it.
        entry.frames.iter_mut().for_each(|f| f.received_at = received_at);
        entry.rejections.iter_mut().for_each(|r| r.received_at = received_at);
        fleetpipe_pipeline::count_received("mqtt", received);
        let submission = Submission {
            entry,
            done: Some(Box::new(move |result| {
                let result = result.map(drop);
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            })),
        };
        if intake.send(submission).await.is_err() {
            return; // the pipeline stopped: the waiters hear `ShuttingDown` as their senders drop
        }
    }
}

/// A connection's state: who it is, and its batcher.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    batcher: Batcher,
    identity: Identity,
    client_id: String,
    conn: u64,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.sessions.gone(&self.client_id, self.conn);
        let now = self.shared.connections.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        metrics::gauge!("fleetpipe_gateway_connections").set(now as f64);
    }
}

/// What the gateway makes of a PUBLISH.
enum Outcome {
    /// Durable; `rejected` of its frames were refused (and kept).
    Stored { rejected: usize },
    /// Not the identity's topic: kept as `unauthorized_topic`, not stored as a frame.
    Unauthorized,
    /// Could not be made durable (draining, or the log failed): not acknowledged.
    NotDurable,
}

/// Why a CONNECT is refused.
enum Refuse {
    BadCredentials,
    NotAuthorized,
    Busy,
}

fn count_connect(result: &'static str) {
    metrics::counter!("fleetpipe_gateway_connects_total", "result" => result).increment(1);
}

fn auth_failure(reason: &'static str) {
    metrics::counter!("fleetpipe_auth_failures_total", "door" => "mqtt", "reason" => reason).increment(1);
}

/// What a CONNECT says, whichever the protocol version.
struct Connect {
    username: Option<String>,
    password: Option<Vec<u8>>,
    /// The vehicle a verified client certificate names.
    certificate: Option<String>,
    client_id: String,
    clean: bool,
    /// How long the session is to outlive the connection (0: not at all).
    expiry_secs: u64,
}

/// Authenticates a CONNECT and registers its client id; on success the connection is counted.
async fn admit(
    shared: &Arc<Shared>,
    batcher: &Batcher,
    c: Connect,
) -> Result<(Conn, oneshot::Receiver<Kick>, bool), Refuse> {
    let Connect { username, password, certificate, client_id, clean, expiry_secs } = c;
    let (username, password, client_id) = (username.as_deref(), password.as_deref(), client_id.as_str());
    if shared.draining.load(Ordering::Acquire) {
        count_connect("busy");
        return Err(Refuse::Busy);
    }
    let identity = match (shared.mode, certificate) {
        (AuthMode::None, _) => Identity::Anyone,
        (AuthMode::Token, Some(vehicle_id)) => Identity::Certificate { vehicle_id },
        (AuthMode::Token, None) => match shared.credentials.check(username, password) {
            Ok(identity) => identity,
            Err(refusal) => {
                auth_failure(refusal.code());
                count_connect("refused");
                return Err(Refuse::BadCredentials);
            }
        },
    };
    let before = shared.connections.fetch_add(1, Ordering::AcqRel);
    if before >= shared.max_connections {
        shared.connections.fetch_sub(1, Ordering::AcqRel);
        count_connect("busy");
        return Err(Refuse::Busy);
    }
    let admitted = shared
        .sessions
        .admit(identity.key(), client_id, clean, expiry_secs.min(shared.session_expiry_max))
        .await;
    match admitted {
        Ok(Admit::Yes { conn, kick, session_present }) => {
            metrics::gauge!("fleetpipe_gateway_connections").set((before + 1) as f64);
            count_connect("accepted");
            let conn = Conn {
                shared: Arc::clone(shared),
                batcher: batcher.clone(),
                identity,
                client_id: client_id.to_owned(),
                conn,
            };
            Ok((conn, kick, session_present))
        }
        Ok(Admit::TakenByOther) => {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            auth_failure("client_id_taken");
            count_connect("refused");
            Err(Refuse::NotAuthorized)
        }
        Err(e) => {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "gateway session not stored; connection refused");
            count_connect("busy");
            Err(Refuse::Busy)
        }
    }
}

/// A client id for a client that sent none (only with a clean session).
fn assigned_id(shared: &Shared) -> String {
    format!("fleetpipe-auto-{}", shared.next_auto_id.fetch_add(1, Ordering::Relaxed))
}

impl Conn {
    /// Whether this connection may publish to `topic`: a contract topic of one of its vehicles.
    /// With auth off any topic is taken, and a malformed one is rejected by the decoder.
    fn may_publish(&self, topic: &str) -> bool {
        match &self.identity {
            Identity::Anyone => true,
            identity => parse_topic(topic).is_some_and(|t| identity.allows(&t.vehicle_id)),
        }
    }

    /// Whether this connection may subscribe to `filter`: only to one of its own vehicles'
    /// topics, by name (no wildcard across vehicles).
    fn may_subscribe(&self, filter: &str) -> bool {
        let mut levels = filter.split('/');
        match (levels.next(), levels.next()) {
            (Some("vehicles"), Some(id)) if !id.contains(['+', '#']) => self.identity.allows(id),
            _ => false,
        }
    }

    /// Authorises, decodes, makes durable.
    async fn publish(
        &self,
        topic: &str,
        payload: bytes::Bytes,
        content_type: Option<&str>,
        qos: QoS,
        trace: Option<TraceContext>,
    ) -> Outcome {
        let shared = &self.shared;
        if shared.draining.load(Ordering::Acquire) {
            return Outcome::NotDurable;
        }
        let received_at = now_micros();
        let origin = Origin::Mqtt { topic: topic.to_owned() };
        let authorized = self.may_publish(topic);
        let decoded = if authorized {
            decode_message(
                &Message { payload: &payload, content_type, origin: &origin, received_at },
                &shared.rules,
            )
        } else {
            Decoded {
                received: 1,
                frames: Vec::new(),
                rejections: vec![Rejection {
                    reason: Reason::UnauthorizedTopic,
                    detail: format!("{} may not publish to {topic}", self.identity.key()),
                    index: None,
                    raw: payload,
                    origin,
                    received_at,
                }],
            }
        };
        let rejected = decoded.rejections.len();
        if qos == QoS::AtMostOnce {
            // Best effort: nobody waits. Losses are counted by the log (not durable).
            let _ = self.batcher.send(Pending { decoded, done: None, trace }).await;
            return Outcome::Stored { rejected };
        }
        let (tx, rx) = oneshot::channel();
        shared.inflight.fetch_add(1, Ordering::AcqRel);
        let sent = self.batcher.send(Pending { decoded, done: Some(tx), trace }).await.is_ok();
        let durable = sent && matches!(rx.await, Ok(Ok(())));
        shared.inflight.fetch_sub(1, Ordering::AcqRel);
        match (durable, authorized) {
            (false, _) => Outcome::NotDurable,
            (true, false) => Outcome::Unauthorized,
            (true, true) => Outcome::Stored { rejected },
        }
    }
}

/// `bytes::Bytes` of an ntex payload (one copy, into the buffer the log record is made from).
fn to_bytes(b: &ntex_bytes::Bytes) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(b)
}

// ---------------------------------------------------------------------------------------------
// MQTT 3.1.1

pub(crate) async fn handshake_v3(
    h: v3::Handshake,
    shared: Arc<Shared>,
    batcher: Batcher,
) -> Result<v3::HandshakeAck<Conn>, GwError> {
    let p = h.packet();
    let clean = p.clean_session;
    let client_id = match p.client_id.as_str() {
        "" if !clean => return Ok(h.identifier_rejected()),
        "" => assigned_id(&shared),
        id => id.to_owned(),
    };
    let connect = Connect {
        username: p.username.as_ref().map(|u| u.to_string()),
        password: p.password.as_ref().map(|b| b.to_vec()),
        certificate: super::tls::peer_vehicle(h.io()),
        client_id,
        clean,
        expiry_secs: if clean { 0 } else { shared.session_expiry_max },
    };
    let admitted = admit(&shared, &batcher, connect).await;
    let (conn, kick, session_present) = match admitted {
        Ok(a) => a,
        Err(Refuse::BadCredentials) => return Ok(h.bad_username_or_pwd()),
        Err(Refuse::NotAuthorized) => return Ok(h.not_authorized()),
        Err(Refuse::Busy) => return Ok(h.service_unavailable()),
    };
    let sink = h.sink();
    let gone = h.io().on_disconnect();
    ntex_rt::spawn(async move {
        if let Either::Left(Ok(_)) = select(kick, gone).await {
            sink.close();
        }
    });
    let max_packet = NonZeroU32::new(shared.max_packet_bytes).unwrap_or(NonZeroU32::MIN);
    Ok(h.ack(conn, session_present).max_packet_size(max_packet))
}

/// A PUBLISH's whole payload. One that straddles socket reads comes as a stream, which must
/// be whole within `payload_timeout`: else the connection is closed (the client resends what
/// was not acknowledged) rather than held with every PUBACK behind this one. The close is
/// counted by [`stopped`].
async fn whole_payload(shared: &Shared, payload: ntex_mqtt::Payload) -> Result<ntex_bytes::Bytes, GwError> {
    let read = if payload.is_fixed() {
        payload.read_all().await
    } else {
        ntex_util::time::timeout(shared.payload_timeout, payload.read_all()).await.map_err(|()| {
            tracing::warn!(
                timeout_secs = shared.payload_timeout.as_secs(),
                "gateway publish payload incomplete; connection closed"
            );
            GwError::PayloadTimeout
        })?
    };
    read.map_err(|e| GwError::Payload(e.to_string()))
}

async fn publish_v3(s: v3::Session<Conn>, mut p: v3::Publish) -> Result<(), GwError> {
    let payload = whole_payload(&s.shared, p.take_payload()).await?;
    match s.publish(p.publish_topic(), to_bytes(&payload), None, p.qos(), None).await {
        Outcome::Stored { .. } => Ok(()),
        // MQTT 3.1.1 has no negative acknowledgement: the connection is closed.
        Outcome::Unauthorized => Err(GwError::NotAuthorized),
        Outcome::NotDurable => Err(GwError::NotDurable),
    }
}

async fn protocol_v3(
    s: v3::Session<Conn>,
    msg: v3::ProtocolMessage,
) -> Result<v3::ProtocolMessageAck, GwError> {
    Ok(match msg {
        v3::ProtocolMessage::Subscribe(mut sub) => {
            for mut t in sub.iter_mut() {
                if s.may_subscribe(t.topic()) {
                    let q = if t.qos() == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                    t.confirm(q);
                } else {
                    auth_failure("subscribe");
                    t.fail();
                }
            }
            sub.ack()
        }
        v3::ProtocolMessage::Unsubscribe(u) => u.ack(),
        v3::ProtocolMessage::Ping(p) => p.ack(),
        v3::ProtocolMessage::Disconnect(d) => d.ack(),
        v3::ProtocolMessage::PublishRelease(r) => r.ack(),
    })
}

/// SUBSCRIBE, UNSUBSCRIBE, PING and DISCONNECT of an MQTT 3.1.1 connection.
pub(crate) fn protocol_v3_factory() -> impl ntex_service::ServiceFactory<
    v3::ProtocolMessage,
    v3::Session<Conn>,
    Response = v3::ProtocolMessageAck,
    Error = GwError,
    InitError = GwError,
> {
    fn_factory_with_config(|s: v3::Session<Conn>| async move {
        Ok::<_, GwError>(fn_service(move |msg| protocol_v3(s.clone(), msg)))
    })
}

/// The end of a connection, as ntex reports it: logged (a protocol error or a keep-alive
/// timeout is the client's business, at debug level) and counted.
fn stopped(msg: &ntex_mqtt::Control<GwError>) {
    if let ntex_mqtt::Control::Stop(reason) = msg {
        let kind = match reason {
            ntex_mqtt::Reason::Error(e) if matches!(e.get_ref(), GwError::PayloadTimeout) => {
                "payload_timeout"
            }
            ntex_mqtt::Reason::Error(e) => {
                tracing::debug!(error = %e.get_ref(), "gateway connection closed after an error");
                "error"
            }
            ntex_mqtt::Reason::Protocol(p) => {
                tracing::debug!(error = %p.get_ref(), "gateway connection closed: protocol");
                "protocol"
            }
            ntex_mqtt::Reason::PeerGone(_) => "peer_gone",
        };
        metrics::counter!("fleetpipe_gateway_disconnects_total", "reason" => kind).increment(1);
    }
}

/// Connection events of an MQTT 3.1.1 connection.
pub(crate) fn control_v3_factory() -> impl ntex_service::ServiceFactory<
    ntex_mqtt::Control<GwError>,
    v3::Session<Conn>,
    Response = Option<v3::codec::Encoded>,
    Error = GwError,
    InitError = GwError,
> {
    fn_factory_with_config(|_: v3::Session<Conn>| async move {
        Ok::<_, GwError>(fn_service(|msg: ntex_mqtt::Control<GwError>| async move {
            stopped(&msg);
            Ok::<_, GwError>(None)
        }))
    })
}

/// PUBLISH of an MQTT 3.1.1 connection.
pub(crate) fn publish_v3_factory() -> impl ntex_service::ServiceFactory<
    v3::Publish,
    v3::Session<Conn>,
    Response = (),
    Error = GwError,
    InitError = GwError,
> {
    fn_factory_with_config(|s: v3::Session<Conn>| async move {
        Ok::<_, GwError>(fn_service(move |p| publish_v3(s.clone(), p)))
    })
}

// ---------------------------------------------------------------------------------------------
// MQTT 5

pub(crate) async fn handshake_v5(
    h: v5::Handshake,
    shared: Arc<Shared>,
    batcher: Batcher,
) -> Result<v5::HandshakeAck<Conn>, GwError> {
    use v5::codec::ConnectAckReason;
    let p = h.packet();
    let clean = p.clean_start;
    let expiry = u64::from(p.session_expiry_interval_secs);
    let (client_id, assigned) = match p.client_id.as_str() {
        "" => (assigned_id(&shared), true),
        id => (id.to_owned(), false),
    };
    let connect = Connect {
        username: p.username.as_ref().map(|u| u.to_string()),
        password: p.password.as_ref().map(|b| b.to_vec()),
        certificate: super::tls::peer_vehicle(h.io()),
        client_id: client_id.clone(),
        clean,
        expiry_secs: expiry,
    };
    let admitted = admit(&shared, &batcher, connect).await;
    let (conn, kick, session_present) = match admitted {
        Ok(a) => a,
        Err(Refuse::BadCredentials) => return Ok(h.failed(ConnectAckReason::BadUserNameOrPassword)),
        Err(Refuse::NotAuthorized) => return Ok(h.failed(ConnectAckReason::NotAuthorized)),
        Err(Refuse::Busy) => return Ok(h.failed(ConnectAckReason::ServerBusy)),
    };
    let sink = h.sink();
    let gone = h.io().on_disconnect();
    ntex_rt::spawn(async move {
        if let Either::Left(Ok(kick)) = select(kick, gone).await {
            let code = match kick {
                Kick::TakenOver => v5::codec::DisconnectReasonCode::SessionTakenOver,
                Kick::Shutdown => v5::codec::DisconnectReasonCode::ServerShuttingDown,
            };
            sink.close_with_reason(v5::codec::Disconnect::new(code));
        }
    });
    let receive_max = NonZeroU16::new(shared.receive_maximum).unwrap_or(NonZeroU16::MIN);
    let max_packet = shared.max_packet_bytes;
    let granted_expiry = expiry.min(shared.session_expiry_max);
    Ok(h.ack(conn).with(move |a| {
        a.session_present = session_present;
        a.receive_max = receive_max;
        a.max_packet_size = Some(max_packet);
        a.retain_available = false;
        if granted_expiry != expiry {
            a.session_expiry_interval_secs = Some(u32::try_from(granted_expiry).unwrap_or(u32::MAX));
        }
        if assigned {
            a.assigned_client_id = Some(client_id.as_str().into());
        }
    }))
}

async fn publish_v5(s: v5::Session<Conn>, mut p: v5::Publish) -> Result<v5::PublishAck, GwError> {
    use v5::codec::PublishAckReason;
    let content_type = p.packet().properties.content_type.as_ref().map(|c| c.to_string());
    let trace = if fleetpipe_pipeline::trace::is_on() {
        TraceContext::find(p.packet().properties.user_properties.iter().map(|(k, v)| (&**k, &**v)))
    } else {
        None
    };
    let topic = p.publish_topic().to_owned();
    let qos = p.qos();
    let payload = whole_payload(&s.shared, p.take_payload()).await?;
    match s.publish(&topic, to_bytes(&payload), content_type.as_deref(), qos, trace).await {
        Outcome::Stored { rejected: 0 } => Ok(p.ack()),
        Outcome::Stored { rejected } => Ok(p
            .ack()
            .reason_code(PublishAckReason::PayloadFormatInvalid)
            .reason(format!("{rejected} frame(s) rejected and kept in the dead-letter store").into())),
        Outcome::Unauthorized => Ok(p.ack().reason_code(PublishAckReason::NotAuthorized)),
        Outcome::NotDurable => Err(GwError::NotDurable),
    }
}

async fn protocol_v5(
    s: v5::Session<Conn>,
    msg: v5::ProtocolMessage,
) -> Result<v5::ProtocolMessageAck, GwError> {
    Ok(match msg {
        v5::ProtocolMessage::Subscribe(mut sub) => {
            for mut t in sub.iter_mut() {
                if s.may_subscribe(t.topic()) {
                    let q =
                        if t.options().qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                    t.confirm(q);
                } else {
                    auth_failure("subscribe");
                    t.fail(v5::codec::SubscribeAckReason::NotAuthorized);
                }
            }
            sub.ack()
        }
        v5::ProtocolMessage::Unsubscribe(u) => u.ack(),
        v5::ProtocolMessage::Ping(p) => p.ack(),
        v5::ProtocolMessage::Disconnect(d) => d.ack(),
        v5::ProtocolMessage::PublishRelease(r) => r.ack(),
        other => other.ack(),
    })
}

/// SUBSCRIBE, UNSUBSCRIBE, PING and DISCONNECT of an MQTT 5 connection.
pub(crate) fn protocol_v5_factory() -> impl ntex_service::ServiceFactory<
    v5::ProtocolMessage,
    v5::Session<Conn>,
    Response = v5::ProtocolMessageAck,
    Error = GwError,
    InitError = GwError,
> {
    fn_factory_with_config(|s: v5::Session<Conn>| async move {
        Ok::<_, GwError>(fn_service(move |msg| protocol_v5(s.clone(), msg)))
    })
}

/// Connection events of an MQTT 5 connection (`None`: ntex's own DISCONNECT where one is due).
pub(crate) fn control_v5_factory() -> impl ntex_service::ServiceFactory<
    ntex_mqtt::Control<GwError>,
    v5::Session<Conn>,
    Response = Option<v5::codec::Encoded>,
    Error = GwError,
    InitError = GwError,
> {
    fn_factory_with_config(|_: v5::Session<Conn>| async move {
        Ok::<_, GwError>(fn_service(|msg: ntex_mqtt::Control<GwError>| async move {
            stopped(&msg);
            Ok::<_, GwError>(None)
        }))
    })
}

/// PUBLISH of an MQTT 5 connection.
pub(crate) fn publish_v5_factory() -> impl ntex_service::ServiceFactory<
    v5::Publish,
    v5::Session<Conn>,
    Response = v5::PublishAck,
    Error = GwError,
    InitError = GwError,
> {
    fn_factory_with_config(|s: v5::Session<Conn>| async move {
        Ok::<_, GwError>(fn_service(move |p| publish_v5(s.clone(), p)))
    })
}
