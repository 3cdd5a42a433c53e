//! The vehicle gateway: fleetpipe as the MQTT server vehicles connect to (CONTRACT.md §2, §8).
//!
//! Delivery semantics first: a vehicle's QoS 1 PUBLISH is acknowledged only once its frames are
//! durable — in the write-ahead log's fsync, or in every durable sink with `ack = "sinks"` — or
//! kept in the dead-letter store, and PUBACKs go out in arrival order per connection. Nothing is
//! acknowledged on receipt, so what a vehicle was told is stored survives `kill -9`; what it was
//! not told it resends (its persistent session is kept across restarts), and de-duplication
//! folds the resends that had been stored.
//!
//! Every stored frame is tied to an authenticated vehicle: a CONNECT carries a credential (or a
//! client certificate), a vehicle publishes only to its own topics and subscribes to nobody
//! else's, and a client id is taken over only by the identity that holds it ([`conn`],
//! [`sessions`]).
//!
//! The MQTT protocol (3.1.1 and 5, one listener) is ntex-mqtt's, whose publish handler's
//! completion is the PUBACK. ntex runs its own system: an accept thread and worker threads,
//! each a current-thread runtime, started on a thread of this source's and stopped with it.
//! The drain stops accepting, waits for the messages in flight to become durable and be
//! acknowledged, then tells every client to go (MQTT 5: DISCONNECT 0x8B) and stops.

mod conn;
mod sessions;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetpipe_pipeline::{Intake, Source, SourceContext};
use fleetpipe_processors::validate::Rules;
use serde::Deserialize;

use self::sessions::Sessions;
use crate::auth::{AuthMode, Credentials};
use crate::{Error, Result};

/// `[gateway]`: the MQTT server vehicles connect to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Plain MQTT (3.1.1 and 5). Unset: `127.0.0.1:1883` when no external broker is configured,
    /// off when one is.
    pub listen: Option<SocketAddr>,
    /// MQTT over TLS, e.g. `0.0.0.0:8883` (needs `cert` and `key`).
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain and key of the TLS listener.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PEM CA whose client certificates authenticate vehicles (CN or first DNS SAN = vehicle id).
    pub client_ca: Option<PathBuf>,
    /// Connections held at most; past it a CONNECT is refused as "server busy".
    pub max_connections: usize,
    /// MQTT 5 Receive Maximum: QoS 1 messages in flight per connection (announced and enforced).
    pub receive_maximum: u16,
    /// Bytes of messages in flight per connection at most: past it the connection's socket is
    /// not read until acknowledgements free room (TCP pushes back), whatever the count.
    pub inflight_bytes: usize,
    /// Largest MQTT packet taken (announced to MQTT 5 clients; a larger one closes the
    /// connection: MQTT 5 with DISCONNECT 0x95).
    pub max_packet_bytes: u32,
    /// A connection that has not completed its CONNECT this long after opening is closed.
    pub connect_timeout_secs: u16,
    /// A PUBLISH whose payload is still incomplete this long after its header arrived closes
    /// its connection (a client that stalls mid-packet, or a held stream); the client
    /// reconnects and resends what was not acknowledged.
    pub payload_timeout_secs: u16,
    /// Longest a persistent session is kept (MQTT 3.1.1 sessions, and the cap on MQTT 5's
    /// session expiry).
    pub session_expiry_max_secs: u64,
    /// Worker threads (0: one per core).
    pub workers: usize,
    /// Most messages folded into one log entry (per worker).
    pub batch_messages: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: None,
            tls_listen: None,
            cert: None,
            key: None,
            client_ca: None,
            max_connections: 18_000,
            receive_maximum: 65_535,
            inflight_bytes: 1 << 20,
            max_packet_bytes: (16 << 20) + 65_536,
            connect_timeout_secs: 10,
            payload_timeout_secs: 10,
            session_expiry_max_secs: 7 * 24 * 3600,
            workers: 0,
            batch_messages: 1024,
        }
    }
}

/// The gateway's failure to serve a message: the connection is closed (MQTT 3.1.1 has no
/// negative acknowledgement; MQTT 5 gets DISCONNECT 0x83).
#[derive(Debug, thiserror::Error)]
pub(crate) enum GwError {
    #[error("not authorized for this topic")]
    NotAuthorized,
    #[error("message not durable (draining, or the log failed)")]
    NotDurable,
    #[error("payload: {0}")]
    Payload(String),
    #[error("payload incomplete within gateway.payload_timeout_secs")]
    PayloadTimeout,
    #[error("service start")]
    Init,
}

impl From<()> for GwError {
    fn from(_: ()) -> Self {
        GwError::Init
    }
}

impl TryFrom<GwError> for ntex_mqtt::v5::PublishAck {
    type Error = GwError;
    fn try_from(e: GwError) -> std::result::Result<Self, GwError> {
        Err(e)
    }
}

/// Open connections the gateway holds at most (before and after CONNECT, over all workers):
/// `max_connections` sessions plus room for connections that have not sent CONNECT yet or are
/// being refused in CONNACK. Past it a new connection is closed at once, before any handshake.
pub fn open_limit(max_connections: usize) -> usize {
    max_connections + 256
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) intake: Intake,
    pub(crate) rules: Arc<Rules>,
    pub(crate) mode: AuthMode,
    pub(crate) credentials: Credentials,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) draining: AtomicBool,
    /// QoS 1 messages received and not yet answered.
    pub(crate) inflight: AtomicUsize,
    pub(crate) connections: AtomicUsize,
    /// Open TCP connections, before and after CONNECT (see `run::gated`).
    pub(crate) open: AtomicUsize,
    pub(crate) next_auto_id: AtomicU64,
    pub(crate) max_connections: usize,
    pub(crate) receive_maximum: u16,
    pub(crate) max_packet_bytes: u32,
    pub(crate) payload_timeout: std::time::Duration,
    pub(crate) session_expiry_max: u64,
    pub(crate) batch_messages: usize,
}

/// The gateway as a source.
pub struct GatewaySource {
    cfg: GatewayConfig,
    listen: Option<SocketAddr>,
    mode: AuthMode,
    credentials: Credentials,
    sessions_file: PathBuf,
    tls: Option<Arc<rustls::ServerConfig>>,
    plain: Option<std::net::TcpListener>,
    secure: Option<std::net::TcpListener>,
}

/// Pending connections the kernel queues per listener. std's 128 drops SYNs in a connect burst
/// (each dropped one costs its vehicle a 1 s retransmit).
const BACKLOG: i32 = 4096;

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let fail = |source| Error::GatewayAddrInUse { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(BACKLOG).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    Ok(socket.into())
}

impl GatewaySource {
    /// Binds the listeners now (so that a taken port fails the start, and port 0 is resolved);
    /// `listen` is the plain address in force. The session file lives under `data_dir`.
    pub fn bind(
        cfg: &GatewayConfig,
        listen: Option<SocketAddr>,
        mode: AuthMode,
        credentials: Credentials,
        data_dir: &Path,
    ) -> Result<GatewaySource> {
        let tls = match (&cfg.tls_listen, &cfg.cert, &cfg.key) {
            (None, _, _) => None,
            (Some(_), Some(cert), Some(key)) => {
                Some(tls::server_config(cert, key, cfg.client_ca.as_deref())?)
            }
            (Some(addr), _, _) => {
                return Err(Error::Tls(format!(
                    "gateway.tls_listen {addr} needs gateway.cert and gateway.key"
                )))
            }
        };
        let plain = listen.map(bind).transpose()?;
        let secure = cfg.tls_listen.map(bind).transpose()?;
        Ok(GatewaySource {
            cfg: cfg.clone(),
            listen,
            mode,
            credentials,
            sessions_file: data_dir.join("_fleetpipe").join("gateway-sessions"),
            tls,
            plain,
            secure,
        })
    }

    /// The plain listener's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.plain.as_ref().and_then(|l| l.local_addr().ok()).or(self.listen)
    }

    /// The TLS listener's address.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.secure.as_ref().and_then(|l| l.local_addr().ok())
    }
}

impl Source for GatewaySource {
    type Error = Error;

    fn name(&self) -> &'static str {
        "gateway"
    }

    /// Vehicles' MQTT, whichever server they publish to.
    fn counted_as(&self) -> &'static str {
        "mqtt"
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        let shared = Arc::new(Shared {
            intake: ctx.intake,
            rules: ctx.rules,
            mode: self.mode,
            credentials: self.credentials,
            sessions: Sessions::open(&self.sessions_file)?,
            draining: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            next_auto_id: AtomicU64::new(0),
            max_connections: self.cfg.max_connections,
            receive_maximum: self.cfg.receive_maximum.max(1),
            max_packet_bytes: self.cfg.max_packet_bytes.max(1024),
            payload_timeout: Duration::from_secs(u64::from(self.cfg.payload_timeout_secs.max(1))),
            session_expiry_max: self.cfg.session_expiry_max_secs,
            batch_messages: self.cfg.batch_messages,
        });
        metrics::gauge!("fleetpipe_gateway_connections").set(0.0);
        let mut server = run::start(&self.cfg, Arc::clone(&shared), self.plain, self.secure, self.tls)?;
        tracing::info!(listen = ?self.listen, tls = ?self.cfg.tls_listen, mode = ?self.mode, "vehicle gateway listening");
        ctx.ready.set(true);
        ctx.shutdown.wait().await;

        ctx.ready.set(false);
        tracing::info!("vehicle gateway draining");
        shared.draining.store(true, Ordering::Release);
        server.pause().await;
        wait_until(Duration::from_secs(30), || shared.inflight.load(Ordering::Acquire) == 0).await;
        shared.sessions.kick_all();
        wait_until(Duration::from_secs(5), || shared.sessions.connected() == 0).await;
        server.stop().await;
        tracing::info!("vehicle gateway stopped");
        Ok(())
    }
}

async fn wait_until(limit: Duration, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

mod run {
    //! The ntex system the gateway runs in: a thread of its own, its accept thread and workers.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use ntex_service::chain_factory;
    use ntex_util::time::Seconds;

    use super::conn;
    use super::{GatewayConfig, GwError, Shared};
    use crate::{Error, Result};

    /// A running ntex server and the thread of its system.
    pub(super) struct Running {
        server: ntex_server::net::Server,
        thread: std::thread::JoinHandle<std::io::Result<()>>,
    }

    impl Running {
        pub(super) async fn pause(&mut self) {
            self.server.pause().await;
        }

        pub(super) async fn stop(self) {
            self.server.stop(true).await;
            let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
        }
    }

    fn mqtt_config(shared: &Shared, cfg: &GatewayConfig) -> ntex_service::cfg::SharedCfg {
        ntex_service::cfg::SharedCfg::new("gateway")
            .add(
                ntex_mqtt::MqttServiceConfig::new()
                    .set_max_size(shared.max_packet_bytes)
                    .set_max_receive(shared.receive_maximum)
                    .set_max_receive_size(cfg.inflight_bytes.max(64 * 1024))
                    .set_max_qos(ntex_mqtt::QoS::AtLeastOnce)
                    // What a client sent before it closed is still handled: a QoS 0 frame read
                    // from the socket is stored, and a QoS 1 frame is stored (its PUBACK has
                    // nowhere to go; the client resends it and de-duplication folds it).
                    .set_handle_qos_after_disconnect(Some(ntex_mqtt::QoS::ExactlyOnce))
                    .set_connect_timeout(Seconds(cfg.connect_timeout_secs.max(1)))
                    .protocol_version_timeout(Seconds(cfg.connect_timeout_secs.max(1))),
            )
            .add(ntex_tls::TlsConfig::new().set_handshake_timeout(Seconds(cfg.connect_timeout_secs.max(1))))
            .into()
    }

    /// Counts each connection from accept to close (over every worker), and closes one at
    /// once, before any handshake, when [`super::open_limit`] are open: what bounds the gateway's
    /// descriptors, whatever clients do before CONNECT.
    fn gated<F, T>(
        shared: Arc<Shared>,
        inner: T,
    ) -> impl ntex_service::ServiceFactory<
        ntex_io::Io<F>,
        ntex_service::cfg::SharedCfg,
        Response = (),
        Error = T::Error,
        InitError = T::InitError,
    >
    where
        F: ntex_io::Filter,
        T: ntex_service::ServiceFactory<ntex_io::Io<F>, ntex_service::cfg::SharedCfg, Response = ()>,
    {
        struct Open<'a>(&'a AtomicUsize);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
                metrics::gauge!("fleetpipe_gateway_sockets").decrement(1.0);
            }
        }
        let limit = super::open_limit(shared.max_connections);
        ntex_service::apply_fn_factory(
            inner,
            async move |io: ntex_io::Io<F>, svc: &ntex_service::dev::ApplyCtx<'_, T::Service>| {
                let before = shared.open.fetch_add(1, Ordering::AcqRel);
                let _open = Open(&shared.open);
                metrics::gauge!("fleetpipe_gateway_sockets").increment(1.0);
                if before >= limit {
                    metrics::counter!("fleetpipe_gateway_connects_total", "result" => "busy").increment(1);
                    io.terminate();
                    return Ok(());
                }
                svc.call(io).await
            },
        )
    }

    /// The MQTT 3.1.1 and 5 server of one worker thread (made once per worker).
    fn mqtt_factory<F: ntex_io::Filter>(
        shared: Arc<Shared>,
    ) -> impl ntex_service::ServiceFactory<
        ntex_io::Io<F>,
        ntex_service::cfg::SharedCfg,
        Response = (),
        Error = ntex_mqtt::MqttError<GwError>,
        InitError = (),
    > {
        let batcher = conn::spawn_batcher(&shared);
        let (s3, b3) = (Arc::clone(&shared), batcher.clone());
        let (s5, b5) = (shared, batcher);
        ntex_mqtt::MqttServer::new()
            .v3(ntex_mqtt::v3::MqttServer::new(ntex_service::fn_service(move |h| {
                conn::handshake_v3(h, Arc::clone(&s3), b3.clone())
            }))
            .control(conn::control_v3_factory())
            .protocol(conn::protocol_v3_factory())
            .publish(conn::publish_v3_factory()))
            .v5(ntex_mqtt::v5::MqttServer::new(ntex_service::fn_service(move |h| {
                conn::handshake_v5(h, Arc::clone(&s5), b5.clone())
            }))
            .control(conn::control_v5_factory())
            .protocol(conn::protocol_v5_factory())
            .publish(conn::publish_v5_factory()))
    }

    pub(super) fn start(
        cfg: &GatewayConfig,
        shared: Arc<Shared>,
        plain: Option<std::net::TcpListener>,
        secure: Option<std::net::TcpListener>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Running> {
        let workers = if cfg.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            cfg.workers
        };
        // ntex's own limit is per worker and pauses accepting when every worker is full; it is
        // set out of reach (each worker could hold every connection), and the limit that holds
        // is `gated`'s count over all workers, which closes a connection past it at once.
        let maxconn = super::open_limit(cfg.max_connections);
        let shared_cfg = mqtt_config(&shared, cfg);
        let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<ntex_server::net::Server>>();
        let thread = std::thread::Builder::new()
            .name("gateway".into())
            .spawn(move || {
                ntex_rt::System::new("gateway", ntex_net::DefaultRuntime).block_on(async move {
                    let built = (|| -> std::io::Result<ntex_server::net::ServerBuilder> {
                        let mut b = ntex_server::net::build()
                            .name("gateway")
                            .workers(workers)
                            .maxconn(maxconn + 64)
                            .disable_signals()
                            .shutdown_timeout(Seconds(5));
                        if let Some(l) = plain {
                            let s = Arc::clone(&shared);
                            b = b
                                .listen("mqtt", l, async move |_| {
                                    gated(Arc::clone(&s), mqtt_factory::<ntex_io::Base>(Arc::clone(&s)))
                                })?
                                .config("mqtt", shared_cfg.clone());
                        }
                        if let (Some(l), Some(tls)) = (secure, tls) {
                            let s = Arc::clone(&shared);
                            b = b
                                .listen("mqtts", l, async move |_| {
                                    let gate = Arc::clone(&s);
                                    let tls =
                                        chain_factory(ntex_tls::rustls::TlsAcceptor::new(Arc::clone(&tls)))
                                            .map_err(|e: std::io::Error| {
                                                ntex_mqtt::MqttError::Handshake(
                                                    ntex_mqtt::HandshakeError::Disconnected(Some(e)),
                                                )
                                            })
                                            .and_then(mqtt_factory::<
                                                ntex_io::Layer<ntex_tls::rustls::TlsServerFilter>,
                                            >(
                                                Arc::clone(&s)
                                            ));
                                    gated(gate, tls)
                                })?
                                .config("mqtts", shared_cfg);
                        }
                        Ok(b)
                    })();
                    match built {
                        Ok(b) => {
                            let server = b.run();
                            let _ = tx.send(Ok(server.clone()));
                            server.await
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            Ok(())
                        }
                    }
                })
            })
            .map_err(|e| Error::Gateway(format!("could not start its thread: {e}")))?;
        let server = rx
            .recv()
            .map_err(|_| Error::Gateway("its thread ended before listening".into()))?
            .map_err(|e| Error::Gateway(format!("could not listen: {e}")))?;
        Ok(Running { server, thread })
    }
}
