//! The vehicle gateway's measurements (`gateway_bench.sh`):
//!
//! - `fleet`: many vehicles, each its own MQTT 3.1.1 connection (spread over source addresses
//!   127.0.0.1…127.0.0.N, since one source address offers ~28k ports), publishing its own
//!   topic at QoS 0 or 1 — flat out with K messages in flight, or at a rate. Reports the
//!   connect rate, the acknowledged rate, and the publish → PUBACK latency.
//! - `idle`: N connections that connect, get their CONNACK and stay (PINGREQ every 20 s) until
//!   killed; prints the connect rate and a ready line.
//! - `null-mqtt`: an MQTT server (ntex-mqtt, like the gateway) that acknowledges at once and
//!   stores nothing: the clients' own limit.
//! - `probe`: GETs a URL every 10 ms for a while; its latency percentiles (`/health` under load).
//!
//! The client speaks raw MQTT 3.1.1 (CONNECT, PUBLISH, PUBACK, PINGREQ) over tokio sockets: a
//! load generator must cost as little as possible of the two cores it shares with the server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// MQTT "remaining length" bytes of `n`.
fn remaining(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn connect_packet(client_id: &str, keep_alive: u16, user: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(if user.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    let mut field = |s: &[u8]| {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s);
    };
    field(client_id.as_bytes());
    if let Some((u, p)) = user {
        field(u.as_bytes());
        field(p.as_bytes());
    }
    let mut pkt = vec![0x10];
    remaining(body.len(), &mut pkt);
    pkt.extend(body);
    pkt
}

fn publish_packet(topic: &str, pkid: Option<u16>, payload: &[u8], out: &mut Vec<u8>) {
    out.push(if pkid.is_some() { 0x32 } else { 0x30 });
    remaining(2 + topic.len() + pkid.map_or(0, |_| 2) + payload.len(), out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if let Some(id) = pkid {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Vehicle `i`'s id: the MQTT client id, and the username when authenticating.
pub(crate) fn vehicle_id(i: usize) -> String {
    format!("FLEET{i:06}")
}

/// Vehicle `i`'s token in the credentials file `gateway_bench.sh` writes: deterministic, so
/// client processes need no shared state (a benchmark's, never a real fleet's, tokens).
pub(crate) fn token(i: usize) -> String {
    format!("load-token-{i:021}")
}

/// Vehicle `i`'s connection from source address `127.0.0.{1 + i % ips}`, as itself (with its
/// token if `auth`), with its CONNACK read.
async fn open(server: SocketAddr, i: usize, ips: usize, auth: bool) -> anyhow::Result<tokio::net::TcpStream> {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % ips.clamp(1, 250)) as u8));
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    let mut s = socket.connect(server).await.with_context(|| format!("connect from {ip}"))?;
    s.set_nodelay(true)?;
    let (id, token) = (vehicle_id(i), token(i));
    s.write_all(&connect_packet(&id, 60, auth.then_some((id.as_str(), token.as_str())))).await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    anyhow::ensure!(ack == [0x20, 2, 0, 0], "CONNACK {ack:?}");
    Ok(s)
}

/// Holds idle connections of vehicles `first..first + count` until killed.
pub(crate) async fn idle(
    server: SocketAddr,
    first: usize,
    count: usize,
    ips: usize,
    auth: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    let opened = Arc::new(AtomicU64::new(0));
    // At most 256 handshakes in flight: a connect burst, not a SYN flood.
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    for i in first..first + count {
        let (opened, gate) = (Arc::clone(&opened), Arc::clone(&gate));
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let mut s = open(server, i, ips, auth).await?;
            drop(permit);
            opened.fetch_add(1, Ordering::Relaxed);
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(20)) => s.write_all(&[0xC0, 0]).await?,
                    n = s.read(&mut buf) => if n? == 0 { anyhow::bail!("closed by the server") },
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        }));
    }
    while opened.load(Ordering::Relaxed) < count as u64 {
        if let Some(t) = tasks.iter().find(|t| t.is_finished()) {
            let _ = t;
            anyhow::bail!("a connection failed before all were open");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("idle: {count} connections open in {secs:.3} s ({:.0}/s)", count as f64 / secs);
    std::future::pending::<()>().await;
    Ok(())
}

/// `count` vehicles publishing `frames` frames each.
pub(crate) struct Fleet {
    pub(crate) server: SocketAddr,
    pub(crate) vehicles: usize,
    /// The first vehicle's number: processes sharing a run take disjoint ranges.
    pub(crate) first: usize,
    pub(crate) frames: u64,
    /// Frames per second per vehicle; 0: flat out with `inflight` in flight.
    pub(crate) rate: f64,
    pub(crate) inflight: usize,
    pub(crate) qos: u8,
    pub(crate) ips: usize,
    pub(crate) auth: bool,
    /// Keep the connections open after the last frame until killed.
    pub(crate) hold: bool,
}

fn payload(vehicle: &str, seq: u64) -> Vec<u8> {
    let ts = 1_795_640_400_000i64 + seq as i64 * 1000;
    format!(
        r#"{{"vehicle_id":"{vehicle}","ts":{ts},"seq":{seq},"lat":56.1{:04},"lon":10.213695,"speed_kmh":33.8,"heading_deg":273.0,"alt_m":38.5,"accuracy_m":3.2,"satellites":9}}"#,
        seq % 10_000
    )
    .into_bytes()
}

/// One vehicle's connection: publishes and collects acks; returns its ack latencies (µs) and
/// the connection, still open.
async fn vehicle(
    f: Arc<Fleet>,
    i: usize,
    s: tokio::net::TcpStream,
    start: Instant,
) -> anyhow::Result<(Vec<u32>, tokio::net::TcpStream)> {
    let id = vehicle_id(i);
    let topic = format!("vehicles/{id}/location");
    let (mut rd, mut wr) = s.into_split();
    let sent_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; 65_536]));
    let window =
        Arc::new(tokio::sync::Semaphore::new(if f.qos == 0 { usize::MAX >> 4 } else { f.inflight.max(1) }));
    let expect = if f.qos == 0 { 0 } else { f.frames };
    let reader = {
        let (sent_at, window) = (Arc::clone(&sent_at), Arc::clone(&window));
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(expect as usize);
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = [0u8; 4096];
            // Every PUBACK, and the PINGRESP to the PINGREQ sent after the last PUBLISH (the
            // server has read every PUBLISH before it).
            let mut pong = false;
            while (lat.len() as u64) < expect || !pong {
                let n = rd.read(&mut chunk).await?;
                anyhow::ensure!(n > 0, "connection closed after {} acks", lat.len());
                buf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while buf.len() >= at + 2 {
                    let len = usize::from(buf[at + 1]) + 2;
                    if buf.len() < at + len {
                        break;
                    }
                    if buf[at] == 0x40 && len == 4 {
                        let pkid = u16::from_be_bytes([buf[at + 2], buf[at + 3]]);
                        let sent = sent_at.lock().map(|mut s| s[usize::from(pkid)].take()).unwrap_or(None);
                        if let Some(t) = sent {
                            lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        }
                        window.add_permits(1);
                    }
                    pong |= buf[at] == 0xD0;
                    at += len;
                }
                buf.drain(..at);
            }
            Ok::<_, anyhow::Error>((lat, rd))
        })
    };
    let mut out = Vec::with_capacity(512);
    let mut pkid: u16 = 0;
    let period = (f.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / f.rate));
    // Vehicles do not all start in the same instant.
    if let Some(p) = period {
        tokio::time::sleep(p.mul_f64((i % 1000) as f64 / 1000.0)).await;
    }
    for seq in 1..=f.frames {
        if let Some(p) = period {
            let due = start + p.mul_f64(seq as f64 - 1.0) + p.mul_f64((i % 1000) as f64 / 1000.0);
            tokio::time::sleep_until(due.into()).await;
        }
        out.clear();
        let id_for = if f.qos == 0 {
            None
        } else {
            window.acquire().await?.forget();
            pkid = pkid.checked_add(1).unwrap_or(1);
            if let Ok(mut s) = sent_at.lock() {
                s[usize::from(pkid)] = Some(Instant::now());
            }
            Some(pkid)
        };
        publish_packet(&topic, id_for, &payload(&id, seq), &mut out);
        wr.write_all(&out).await?;
    }
    wr.write_all(&[0xC0, 0]).await?;
    let (lat, rd) = reader.await??;
    Ok((lat, rd.reunite(wr)?))
}

pub(crate) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

/// Connects every vehicle (256 handshakes at a time), then prints `start <epoch seconds>` and
/// publishes.
pub(crate) async fn fleet(f: Fleet) -> anyhow::Result<()> {
    let f = Arc::new(f);
    let connecting = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut opening = Vec::with_capacity(f.vehicles);
    for i in f.first..f.first + f.vehicles {
        let (f, gate) = (Arc::clone(&f), Arc::clone(&gate));
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            open(f.server, i, f.ips, f.auth).await
        }));
    }
    let mut streams = Vec::with_capacity(f.vehicles);
    for t in opening {
        streams.push(t.await??);
    }
    let secs = connecting.elapsed().as_secs_f64();
    println!("connected {} in {secs:.3} s ({:.0}/s)", f.vehicles, f.vehicles as f64 / secs);
    println!("start {:.6}", crate::now());
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(f.vehicles);
    for (i, s) in (f.first..).zip(streams) {
        tasks.push(tokio::spawn(vehicle(Arc::clone(&f), i, s, start)));
    }
    let mut lat = Vec::new();
    let mut open = Vec::with_capacity(f.vehicles);
    for t in tasks {
        let (l, s) = t.await??;
        lat.extend(l);
        open.push(s);
    }
    let secs = start.elapsed().as_secs_f64();
    // The last PUBACK and PINGRESP: the server has read every PUBLISH (at QoS 1: made it durable).
    println!("end {:.6}", crate::now());
    lat.sort_unstable();
    let total = f.frames * f.vehicles as u64;
    println!(
        "fleet: {} vehicles x {} frames = {total} at QoS {} in {secs:.3} s: {:.0} frames/s acknowledged; PUBACK p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        f.vehicles,
        f.frames,
        f.qos,
        total as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    if f.hold {
        // Until killed: a QoS 0 sender that closed at once could lose what the server had not
        // yet handled.
        std::future::pending::<()>().await;
    }
    drop(open);
    Ok(())
}

/// GETs `url` every 10 ms for `secs`; prints the latency percentiles.
pub(crate) async fn probe(url: &str, secs: f64) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    let mut failed = 0u64;
    while Instant::now() < end {
        let t = Instant::now();
        match client.get(url).timeout(Duration::from_secs(5)).send().await {
            Ok(r) if r.status().is_success() => {
                lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX))
            }
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lat.sort_unstable();
    println!(
        "probe {url}: {} answers, {failed} failed; p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    Ok(())
}

/// PUBLISHes the null server has received.
static RECEIVED: AtomicU64 = AtomicU64::new(0);
/// `null-mqtt --every`.
static EVERY: AtomicU64 = AtomicU64::new(0);

/// Counts one PUBLISH; prints `end <epoch seconds>` at every multiple of `--every`.
fn received() {
    let n = RECEIVED.fetch_add(1, Ordering::Relaxed) + 1;
    let every = EVERY.load(Ordering::Relaxed);
    if every > 0 && n.is_multiple_of(every) {
        println!("end {:.6}", crate::now());
    }
}

/// An MQTT server that acknowledges every PUBLISH at once and keeps nothing; prints
/// `end <epoch seconds>` each time another `every` PUBLISHes have arrived.
pub(crate) fn null_mqtt(port: u16, workers: usize, every: u64) -> anyhow::Result<()> {
    use ntex_mqtt::{v3, v5, MqttServer};
    use ntex_service::{fn_factory_with_config, fn_service};

    #[derive(Debug)]
    struct NullError;
    impl From<()> for NullError {
        fn from(_: ()) -> Self {
            NullError
        }
    }
    impl TryFrom<NullError> for v5::PublishAck {
        type Error = NullError;
        fn try_from(e: NullError) -> Result<Self, NullError> {
            Err(e)
        }
    }
    EVERY.store(every, Ordering::Relaxed);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    ntex_rt::System::new("null-mqtt", ntex_net::DefaultRuntime).block_on(async move {
        ntex_server::net::build()
            .workers(workers.max(1))
            .maxconn(25_000)
            .disable_signals()
            .bind("mqtt", addr, async |_| {
                MqttServer::new()
                    .v3(v3::MqttServer::new(fn_service(|h: v3::Handshake| async move {
                        Ok::<_, NullError>(h.ack((), false))
                    }))
                    .publish(fn_factory_with_config(|_: v3::Session<()>| async {
                        Ok::<_, NullError>(fn_service(|_p: v3::Publish| async {
                            received();
                            Ok::<_, NullError>(())
                        }))
                    })))
                    .v5(v5::MqttServer::new(fn_service(|h: v5::Handshake| async move {
                        Ok::<_, NullError>(h.ack(()))
                    }))
                    .publish(fn_factory_with_config(|_: v5::Session<()>| async {
                        Ok::<_, NullError>(fn_service(|p: v5::Publish| async move {
                            received();
                            Ok::<_, NullError>(p.ack())
                        }))
                    })))
            })?
            .run()
            .await
    })?;
    Ok(())
}

/// Writes the credentials file of vehicles `0..vehicles` (one JSON line each, as
/// `fleetpipe credentials add` writes them) with their load-test tokens.
pub(crate) fn credentials(vehicles: usize, out: &std::path::Path) -> anyhow::Result<()> {
    use fleetpipe_ingest::auth::{token_hash, Credential, Scope};
    let mut text = String::with_capacity(vehicles * 160);
    for i in 0..vehicles {
        let c = Credential {
            name: vehicle_id(i),
            scope: Scope::Vehicle { vehicle_id: vehicle_id(i) },
            token_sha256: token_hash(token(i).as_bytes()),
            imei: None,
            created: "2026-12-01T00:00:00Z".into(),
        };
        text.push_str(&serde_json::to_string(&c)?);
        text.push('\n');
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
