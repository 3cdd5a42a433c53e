//! Teltonika trackers (FMB/FMC/FMM…): AVL data in Codec 8, 8 Extended and 16, over TCP and UDP.
//!
//! A tracker keeps each record in its flash until the server answers with the number of records
//! it accepted. fleetpipe answers only once the records are durable — in the write-ahead log's
//! fsync, or in every durable sink with `ack = "sinks"` — exactly as the gateway's PUBACK: what
//! a device was told is stored survives `kill -9`; what it was not told it sends again, and
//! de-duplication folds what had been stored.
//!
//! TCP: the IMEI handshake (2-byte length, IMEI; answered `01` to accept, `00` to refuse), then
//! one AVL packet at a time (preamble, length, codec, records, CRC-16/IBM), each answered with
//! the 4-byte count of records accepted. UDP: each datagram carries the IMEI and is answered with
//! its packet id, AVL packet id and count. Decoding is `nom-teltonika`'s; what a record becomes
//! is [`fleetpipe_processors::codec::teltonika`]'s.
//!
//! Identity: an IMEI bound to a vehicle by a credential (`fleetpipe credentials add VEHICLE_ID
//! --imei IMEI`) speaks for that vehicle; with auth on, any other IMEI is refused in the
//! handshake (UDP: not answered) and counted in `fleetpipe_auth_failures_total{door="teltonika"}`.
//! With auth off an unbound IMEI is its own vehicle id.
//!
//! Bad input: a packet that does not decode (wrong CRC, a record count that disagrees with the
//! records, an unknown codec, a length that lies, a packet cut short) is kept in the dead-letter
//! store as `malformed_teltonika` with its bytes and answered with zero accepted, so the device
//! sends it again; a header that cannot delimit a packet (not a Teltonika device, or out of
//! step) closes the connection after its bytes are kept.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fleetpipe_pipeline::{now_micros, Entry, Intake, Source, SourceContext, Submission};
use fleetpipe_processors::codec::teltonika::{self, refuse, TcpStep, UdpStep};
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::{Decoded, Origin};
use nom_teltonika::decoder::{take_imei, DecodeImeiError};
use nom_teltonika::encoder::{encode_avl_ack, encode_avl_nack, encode_imei_approval};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::auth::{AuthMode, Credentials};
use crate::{Error, Result};

/// `[teltonika]`: the listeners trackers connect to (both off unless set).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeltonikaConfig {
    /// TCP, e.g. `0.0.0.0:5027`.
    pub listen: Option<SocketAddr>,
    /// UDP, e.g. `0.0.0.0:5027`.
    pub udp_listen: Option<SocketAddr>,
    /// TCP connections held at most; past it a connection is closed at once.
    pub max_connections: usize,
    /// The IMEI must arrive this long after the connection opens.
    pub handshake_timeout_secs: f64,
    /// A connection silent this long between packets is closed (trackers reconnect).
    pub idle_timeout_secs: f64,
    /// A packet begun must be whole this long after its first bytes; else it is kept as
    /// truncated and answered with zero.
    pub packet_timeout_secs: f64,
    /// UDP datagrams waiting to become durable at most; past it the socket is not read.
    pub udp_inflight: usize,
}

impl Default for TeltonikaConfig {
    fn default() -> Self {
        TeltonikaConfig {
            listen: None,
            udp_listen: None,
            max_connections: 4096,
            handshake_timeout_secs: 10.0,
            idle_timeout_secs: 600.0,
            packet_timeout_secs: 30.0,
            udp_inflight: 4096,
        }
    }
}

/// Longest IMEI taken in a handshake (real ones have 15 digits).
const MAX_IMEI_LEN: usize = 64;

/// The Teltonika source, its sockets bound.
pub struct TeltonikaSource {
    cfg: TeltonikaConfig,
    tcp: Option<std::net::TcpListener>,
    udp: Option<std::net::UdpSocket>,
    mode: AuthMode,
    credentials: Credentials,
}

fn listen_error(addr: SocketAddr, source: std::io::Error) -> Error {
    Error::TeltonikaListen { addr, source }
}

impl TeltonikaSource {
    /// Binds the configured listeners (a taken port fails here, before anything has started).
    pub fn bind(cfg: &TeltonikaConfig, mode: AuthMode, credentials: Credentials) -> Result<TeltonikaSource> {
        let tcp = match cfg.listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr).map_err(|e| listen_error(addr, e))?;
                l.set_nonblocking(true).map_err(|e| listen_error(addr, e))?;
                Some(l)
            }
            None => None,
        };
        let udp = match cfg.udp_listen {
            Some(addr) => {
                let s = std::net::UdpSocket::bind(addr).map_err(|e| listen_error(addr, e))?;
                s.set_nonblocking(true).map_err(|e| listen_error(addr, e))?;
                Some(s)
            }
            None => None,
        };
        Ok(TeltonikaSource { cfg: cfg.clone(), tcp, udp, mode, credentials })
    }

    /// Where TCP trackers connect.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where UDP trackers send.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|s| s.local_addr().ok())
    }
}

/// What every connection and datagram shares.
struct Shared {
    intake: Intake,
    rules: Arc<Rules>,
    mode: AuthMode,
    credentials: Credentials,
    cfg: TeltonikaConfig,
    connections: AtomicUsize,
}

impl Shared {
    /// The vehicle `imei` speaks for, or why it is refused (an auth failure reason).
    fn vehicle_of(&self, imei: &str) -> std::result::Result<String, &'static str> {
        if let Some(vehicle) = self.credentials.vehicle_of_imei(imei) {
            return Ok(vehicle);
        }
        match self.mode {
            AuthMode::Token => Err("unknown_imei"),
            AuthMode::None => fleetpipe_processors::validate::vehicle_id(imei)
                .map(|()| imei.to_owned())
                .map_err(|_| "invalid_imei"),
        }
    }

    /// Hands `decoded` to the log; true once it is durable.
    async fn store(&self, decoded: Decoded, received_at: i64) -> bool {
        fleetpipe_pipeline::count_received("teltonika", u64::from(decoded.received));
        let (tx, rx) = oneshot::channel();
        let entry =
            Entry { received_at, frames: decoded.frames, rejections: decoded.rejections, ..Entry::default() };
        let done = Box::new(move |r: std::result::Result<u64, _>| {
            let _ = tx.send(r.is_ok());
        });
        if self.intake.send(Submission { entry, done: Some(done) }).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

fn auth_failure(reason: &'static str) {
    metrics::counter!("fleetpipe_auth_failures_total", "door" => "teltonika", "reason" => reason)
        .increment(1);
}

fn count_packet(transport: &'static str, result: &'static str, records: usize) {
    metrics::counter!("fleetpipe_teltonika_packets_total", "transport" => transport, "result" => result)
        .increment(1);
    if records > 0 {
        metrics::counter!("fleetpipe_teltonika_records_acked_total", "transport" => transport)
            .increment(records as u64);
    }
}

impl Source for TeltonikaSource {
    type Error = Error;

    fn name(&self) -> &'static str {
        "teltonika"
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        let TeltonikaSource { cfg, tcp, udp, mode, credentials } = self;
        let shared = Arc::new(Shared {
            intake: ctx.intake,
            rules: ctx.rules,
            mode,
            credentials,
            cfg,
            connections: AtomicUsize::new(0),
        });
        let (stop_tx, stop) = watch::channel(false);
        let tracker = TaskTracker::new();
        if let Some(l) = tcp {
            let addr = l.local_addr().ok();
            let listener = tokio::net::TcpListener::from_std(l)
                .map_err(|e| Error::Teltonika(format!("tcp listener {addr:?}: {e}")))?;
            tracker.spawn(accept_loop(listener, Arc::clone(&shared), stop.clone(), tracker.clone()));
        }
        if let Some(s) = udp {
            let addr = s.local_addr().ok();
            let socket =
                UdpSocket::from_std(s).map_err(|e| Error::Teltonika(format!("udp socket {addr:?}: {e}")))?;
            tracker.spawn(udp_loop(Arc::new(socket), Arc::clone(&shared), stop.clone(), tracker.clone()));
        }
        ctx.ready.set(true);
        ctx.shutdown.wait().await;
        let _ = stop_tx.send(true);
        tracker.close();
        // Connections finish the packet they hold (durable, then answered), then close.
        tracker.wait().await;
        Ok(())
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(shared.cfg.max_connections.max(1)));
    let mut last_error: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, usually: say so at most once a second, and breathe.
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(error = %e, "teltonika: cannot accept a connection");
                    last_error = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("fleetpipe_teltonika_connects_total", "result" => "busy").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (shared, stop) = (Arc::clone(&shared), stop.clone());
        tracker.spawn(async move {
            let now = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
            metrics::gauge!("fleetpipe_teltonika_connections").set(now as f64);
            serve(&shared, stream, peer, stop).await;
            let now = shared.connections.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
            metrics::gauge!("fleetpipe_teltonika_connections").set(now as f64);
            drop(slot);
        });
    }
}

/// Why a connection's read ended.
enum Read {
    /// More bytes are buffered.
    More,
    /// The peer closed, or the read failed.
    Closed,
    /// Nothing arrived in time.
    TimedOut,
    /// The drain began while waiting.
    Stopping,
}

async fn read_more(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    wait: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Read {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(2048);
    }
    tokio::select! {
        r = tokio::time::timeout(wait, stream.read_buf(buf)) => match r {
            Ok(Ok(0)) | Ok(Err(_)) => Read::Closed,
            Ok(Ok(_)) => Read::More,
            Err(_) => Read::TimedOut,
        },
        _ = stop.wait_for(|s| *s) => Read::Stopping,
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.001, 1e9))
}

/// One tracker's connection: the handshake, then packet after packet.
async fn serve(shared: &Shared, mut stream: TcpStream, peer: SocketAddr, mut stop: watch::Receiver<bool>) {
    let cfg = &shared.cfg;
    let mut buf = BytesMut::with_capacity(2048);
    let handshake_by = tokio::time::Instant::now() + secs(cfg.handshake_timeout_secs);
    let imei = loop {
        if let Some(prefix) = buf.first_chunk::<2>() {
            let declared = usize::from(u16::from_be_bytes(*prefix));
            if declared == 0 || declared > MAX_IMEI_LEN {
                refuse_handshake(&mut stream, "invalid_imei", peer).await;
                return;
            }
        }
        let mut input: &[u8] = &buf;
        match take_imei(&mut input) {
            Ok(view) => {
                let imei = view.as_str().to_owned();
                let used = buf.len() - input.len();
                buf.advance(used);
                break imei;
            }
            Err(DecodeImeiError::NotAscii(_)) => {
                refuse_handshake(&mut stream, "invalid_imei", peer).await;
                return;
            }
            Err(_) => {}
        }
        let left = handshake_by.saturating_duration_since(tokio::time::Instant::now());
        match read_more(&mut stream, &mut buf, left, &mut stop).await {
            Read::More => {}
            Read::TimedOut => {
                metrics::counter!("fleetpipe_teltonika_connects_total", "result" => "timeout").increment(1);
                return;
            }
            Read::Closed | Read::Stopping => return,
        }
    };
    let vehicle_id = match shared.vehicle_of(&imei) {
        Ok(v) => v,
        Err(reason) => {
            tracing::debug!(%peer, imei = %imei, reason, "teltonika: tracker refused");
            refuse_handshake(&mut stream, reason, peer).await;
            return;
        }
    };
    if stream.write_all(&encode_imei_approval(true)).await.is_err() {
        return;
    }
    metrics::counter!("fleetpipe_teltonika_connects_total", "result" => "accepted").increment(1);
    tracing::debug!(%peer, imei = %imei, vehicle_id = %vehicle_id, "teltonika: tracker connected");
    let origin = Origin::Teltonika { imei };
    loop {
        let step = teltonika::next_tcp(&buf, &vehicle_id, &origin, now_micros(), &shared.rules);
        let (decoded, answer, close) = match step {
            TcpStep::Need => {
                let wait = if buf.is_empty() { cfg.idle_timeout_secs } else { cfg.packet_timeout_secs };
                match read_more(&mut stream, &mut buf, secs(wait), &mut stop).await {
                    Read::More => continue,
                    Read::TimedOut if !buf.is_empty() => {
                        let got = buf.len();
                        let raw = buf.split().freeze();
                        let detail = format!(
                            "truncated packet: {got} bytes arrived, then none for {} s",
                            cfg.packet_timeout_secs
                        );
                        (refuse(raw, detail, origin.clone(), now_micros()), Some(encode_avl_nack()), false)
                    }
                    Read::Closed if !buf.is_empty() => {
                        let raw = buf.split().freeze();
                        let detail =
                            format!("truncated packet: the connection closed after {} bytes", raw.len());
                        (refuse(raw, detail, origin.clone(), now_micros()), None, true)
                    }
                    Read::TimedOut | Read::Closed | Read::Stopping => return,
                }
            }
            TcpStep::Skip { len } => {
                tracing::debug!(bytes = len, "teltonika: a packet of no AVL data ignored");
                buf.advance(len);
                continue;
            }
            TcpStep::Records { decoded, count, len } => {
                buf.advance(len);
                (decoded, Some(encode_avl_ack(count)), false)
            }
            TcpStep::Malformed { decoded, len } => {
                buf.advance(len);
                (decoded, Some(encode_avl_nack()), false)
            }
            TcpStep::Lost { decoded } => {
                buf.clear();
                (decoded, None, true)
            }
        };
        let records = answer.map_or(0, |a| u32::from_be_bytes(a) as usize);
        let received_at = decoded.frames.first().map_or_else(now_micros, |f| f.received_at);
        let malformed = decoded.frames.is_empty() && decoded.rejections.iter().any(|r| r.index.is_none());
        if !shared.store(decoded, received_at).await {
            // Not durable (draining, or the log failed): no answer, the device sends it again.
            return;
        }
        count_packet("tcp", if malformed { "malformed" } else { "stored" }, records);
        if let Some(a) = answer {
            if stream.write_all(&a).await.is_err() {
                return;
            }
        }
        if close {
            return;
        }
    }
}

async fn refuse_handshake(stream: &mut TcpStream, reason: &'static str, peer: SocketAddr) {
    auth_failure(reason);
    metrics::counter!("fleetpipe_teltonika_connects_total", "result" => "refused").increment(1);
    tracing::debug!(%peer, reason, "teltonika: handshake refused");
    let _ = stream.write_all(&encode_imei_approval(false)).await;
    let _ = stream.shutdown().await;
}

/// One socket serves every UDP tracker: each datagram is decoded, made durable and answered on
/// its own task (at most `udp_inflight` at once; past it the socket is not read).
async fn udp_loop(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(shared.cfg.udp_inflight.max(1)));
    let mut buf = vec![0u8; 65_536];
    loop {
        let slot = tokio::select! {
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "teltonika: udp receive failed");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let datagram = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
        let (shared, socket) = (Arc::clone(&shared), Arc::clone(&socket));
        tracker.spawn(async move {
            serve_datagram(&shared, &socket, datagram, peer).await;
            drop(slot);
        });
    }
}

async fn serve_datagram(shared: &Shared, socket: &UdpSocket, datagram: Bytes, peer: SocketAddr) {
    let received_at = now_micros();
    match teltonika::datagram(&datagram, received_at, &shared.rules, |imei| shared.vehicle_of(imei)) {
        UdpStep::Refused { imei, reason } => {
            // UDP has no refusal: the datagram is not answered.
            auth_failure(reason);
            tracing::debug!(%peer, imei = %imei, reason, "teltonika: udp datagram of a refused tracker");
        }
        UdpStep::Store { decoded, answer, records } => {
            if !shared.store(decoded, received_at).await {
                return;
            }
            count_packet("udp", if records == 0 { "malformed" } else { "stored" }, records);
            if let Some(answer) = answer {
                let _ = socket.send_to(&answer, peer).await;
            }
        }
    }
}
