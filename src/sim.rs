//! `fleetpipe simulate` and `fleetpipe replay`: publishers for demos, tests and load.
//!
//! Both send through a [`Target`]: MQTT (QoS 1 by default, one topic per vehicle and kind, all
//! PUBACKs awaited before the summary), HTTP (`POST /v1/frames`, JSON arrays, retried on 503
//! after `Retry-After`) or Kafka (`kafka://host:port[,host:port]/topic`, one record per frame
//! keyed by `vehicle_id`, idempotent producer, every delivery awaited).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::parse_mqtt_url;

/// Where frames go.
pub enum Target {
    Mqtt { client: rumqttc::AsyncClient, tally: Arc<Tally>, qos: rumqttc::QoS },
    Http { client: reqwest::Client, url: String, tally: Arc<Tally> },
    Kafka { producer: rdkafka::producer::FutureProducer, topic: String, tally: Arc<Tally> },
}

/// What a run sent and what its target said of it (read by the progress display).
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: AtomicU64,
    /// Acknowledged: PUBACKs (MQTT QoS 1), frames accepted (HTTP), records delivered (Kafka).
    pub acked: AtomicU64,
    /// Frames refused and kept in the dead-letter store, where the target says so (HTTP).
    pub rejected: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// `kafka://host:port[,host:port…][/topic]` → (brokers, topic); the topic defaults to the
/// contract's input topic.
pub fn parse_kafka_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("kafka://")
        .with_context(|| format!("Kafka url {url:?} must start with kafka://"))?;
    let (brokers, topic) = match rest.split_once('/') {
        Some((b, t)) if !t.is_empty() => (b, t),
        Some((b, _)) => (b, "vehicle-frames"),
        None => (rest, "vehicle-frames"),
    };
    if brokers.is_empty() {
        bail!("Kafka url {url:?} has no broker");
    }
    Ok((brokers.to_owned(), topic.to_owned()))
}

impl Target {
    pub async fn connect(url: &str, qos: u8) -> anyhow::Result<Target> {
        if url.starts_with("mqtt://") || url.starts_with("tcp://") {
            let (host, port) = parse_mqtt_url(url)?;
            let id = format!("fleetpipe-sim-{}-{}", std::process::id(), crate::app_nanos());
            let addr = format!("{host}:{port}");
            let mut o = rumqttc::MqttOptions::new(id, host, port);
            o.set_keep_alive(Duration::from_secs(30))
                .set_max_packet_size(32 << 20, 32 << 20)
                .set_inflight(1000);
            let (client, mut el) = rumqttc::AsyncClient::new(o, 10_000);
            let tally = Arc::new(Tally::default());
            let counter = Arc::clone(&tally);
            // The first CONNACK, or why there is none: a target that cannot be reached fails
            // here, before anything is said to be sent.
            let (up_tx, up_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
            tokio::spawn(async move {
                let mut up = Some(up_tx);
                let mut last_warning: Option<Instant> = None;
                let mut failures = 0u64;
                loop {
                    match el.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            if let Some(tx) = up.take() {
                                let _ = tx.send(Ok(()));
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                            Tally::add(&counter.acked, 1);
                        }
                        // `finish` disconnected: the end, not a lost connection.
                        Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::RequestsDone) => return,
                        Err(e) => {
                            if let Some(tx) = up.take() {
                                let _ = tx.send(Err(e.to_string()));
                                return;
                            }
                            // Once connected, a lost connection is retried; said once every 5 s.
                            failures += 1;
                            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                                tracing::warn!(error = %e, failures, "simulator lost its mqtt connection, reconnecting");
                                last_warning = Some(Instant::now());
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            });
            match tokio::time::timeout(Duration::from_secs(10), up_rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => bail!(
                    "cannot reach the MQTT server at {addr}: {e}. Is fleetpipe running? Its gateway \
                     listens on 127.0.0.1:1883 unless FLEETPIPE_GATEWAY_LISTEN (or [gateway] listen) \
                     says otherwise; pass that address as --target mqtt://HOST:PORT"
                ),
                Ok(Err(_)) | Err(_) => bail!("no answer from the MQTT server at {addr} within 10 s"),
            }
            let qos = if qos == 0 { rumqttc::QoS::AtMostOnce } else { rumqttc::QoS::AtLeastOnce };
            Ok(Target::Mqtt { client, tally, qos })
        } else if url.starts_with("http://") {
            let base = url.trim_end_matches('/');
            let url =
                if base.ends_with("/v1/frames") { base.to_string() } else { format!("{base}/v1/frames") };
            let health = format!("{}/health", url.trim_end_matches("/v1/frames"));
            let client = reqwest::Client::new();
            if let Err(e) = client.get(&health).timeout(Duration::from_secs(10)).send().await {
                bail!(
                    "cannot reach fleetpipe's HTTP API at {health}: {:#}. Is fleetpipe running? It \
                     listens on 127.0.0.1:8080 unless FLEETPIPE_HTTP_ADDR says otherwise",
                    anyhow::Error::new(e)
                );
            }
            Ok(Target::Http { client, url, tally: Arc::default() })
        } else if url.starts_with("kafka://") {
            let (brokers, topic) = parse_kafka_url(url)?;
            let producer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .create()
                .with_context(|| format!("Kafka producer for {brokers}"))?;
            Ok(Target::Kafka { producer, topic, tally: Arc::default() })
        } else {
            bail!("target {url:?}: use mqtt://host:port, http://host:port or kafka://host:port/topic")
        }
    }

    /// Sends frames of one vehicle (MQTT: one message per frame, on its kind's topic).
    pub async fn send(&mut self, frames: &[Value]) -> anyhow::Result<()> {
        match self {
            Target::Mqtt { client, tally, qos } => {
                for f in frames {
                    let id = f["vehicle_id"].as_str().unwrap_or("unknown");
                    let kind = f["kind"].as_str().unwrap_or("frames");
                    let topic = format!("vehicles/{id}/{kind}");
                    client.publish(topic, *qos, false, serde_json::to_vec(f)?).await?;
                    Tally::add(&tally.sent, 1);
                }
                Ok(())
            }
            Target::Kafka { producer, topic, tally } => {
                let mut deliveries = Vec::with_capacity(frames.len());
                for f in frames {
                    let key = f["vehicle_id"].as_str().unwrap_or("unknown").to_owned();
                    let payload = serde_json::to_vec(f)?;
                    let mut record = rdkafka::producer::FutureRecord::to(topic).key(&key).payload(&payload);
                    loop {
                        match producer.send_result(record) {
                            Ok(delivery) => break deliveries.push(delivery),
                            Err((
                                rdkafka::error::KafkaError::MessageProduction(
                                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                                ),
                                r,
                            )) => {
                                // librdkafka's queue is full: let deliveries drain it.
                                record = r;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err((e, _)) => bail!("kafka send to {topic}: {e}"),
                        }
                    }
                }
                Tally::add(&tally.sent, frames.len() as u64);
                for d in deliveries {
                    match d.await {
                        Ok(Ok(_)) => Tally::add(&tally.acked, 1),
                        Ok(Err((e, _))) => bail!("kafka delivery to {topic}: {e}"),
                        Err(_) => bail!("kafka producer dropped a delivery to {topic}"),
                    }
                }
                Ok(())
            }
            Target::Http { client, url, tally } => {
                let body = serde_json::to_vec(frames)?;
                Tally::add(&tally.sent, frames.len() as u64);
                loop {
                    let resp = client
                        .post(url.as_str())
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .with_context(|| format!("POST {url}"))?;
                    let status = resp.status();
                    if status.as_u16() == 503 || status.as_u16() == 429 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    if !status.is_success() {
                        bail!("POST {url}: {status}: {}", resp.text().await.unwrap_or_default());
                    }
                    let answer: Value =
                        serde_json::from_slice(&resp.bytes().await.unwrap_or_default()).unwrap_or_default();
                    Tally::add(&tally.acked, answer["accepted"].as_u64().unwrap_or(0));
                    Tally::add(&tally.rejected, answer["rejected_total"].as_u64().unwrap_or(0));
                    return Ok(());
                }
            }
        }
    }

    /// What was sent and acknowledged so far.
    pub fn tally(&self) -> Arc<Tally> {
        match self {
            Target::Mqtt { tally, .. } | Target::Http { tally, .. } | Target::Kafka { tally, .. } => {
                Arc::clone(tally)
            }
        }
    }

    /// Whether the target acknowledges what it is sent (MQTT QoS 0 does not).
    fn acknowledges(&self) -> bool {
        !matches!(self, Target::Mqtt { qos: rumqttc::QoS::AtMostOnce, .. })
    }

    /// Whether the target reports rejected frames (HTTP does; an MQTT 3.1.1 PUBACK and a
    /// Kafka delivery cannot: see `fleetpipe_frames_rejected_total`).
    fn reports_rejections(&self) -> bool {
        matches!(self, Target::Http { .. })
    }

    /// Waits until every QoS 1 message was acknowledged by the broker.
    pub async fn finish(&self) -> anyhow::Result<()> {
        if let Target::Mqtt { client, tally, qos } = self {
            let sent = Tally::get(&tally.sent);
            let deadline = Instant::now() + Duration::from_secs(120);
            while *qos != rumqttc::QoS::AtMostOnce && Tally::get(&tally.acked) < sent {
                if Instant::now() > deadline {
                    bail!(
                        "the MQTT server acknowledged {} of {sent} messages within 120 s",
                        Tally::get(&tally.acked)
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = client.disconnect().await;
        }
        Ok(())
    }
}

/// Progress while a run sends: a bar with rate and ETA on a terminal (indicatif), a plain line
/// every 5 s otherwise (logs, CI); a summary at the end.
struct Progress {
    what: &'static str,
    started: Instant,
    tally: Arc<Tally>,
    bar: Option<indicatif::ProgressBar>,
    lines: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// `total`: frames the run will send (an estimate for `simulate`).
    fn start(what: &'static str, target: &Target, total: u64) -> Self {
        let tally = target.tally();
        let (bar, lines) = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{wide_bar}] {human_pos}/{human_len} frames {per_sec} eta {eta} {msg}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            (Some(bar), None)
        } else {
            let t = Arc::clone(&tally);
            let lines = tokio::spawn(async move {
                let started = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let (sent, acked) = (Tally::get(&t.sent), Tally::get(&t.acked));
                    let rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    let pct = if total > 0 { 100.0 * sent as f64 / total as f64 } else { 0.0 };
                    eprintln!("{what}: sent {sent}/{total} frames ({pct:.0}%), {rate:.0} frames/s, acknowledged {acked}");
                }
            });
            (None, Some(lines))
        };
        Progress { what, started: Instant::now(), tally, bar, lines }
    }

    /// After each send: moves the bar (the plain lines read the tally on their own clock).
    fn update(&self) {
        if let Some(bar) = &self.bar {
            bar.set_position(Tally::get(&self.tally.sent));
            bar.set_message(format!("acknowledged {}", Tally::get(&self.tally.acked)));
        }
    }

    /// Ends the display and prints what was sent, acknowledged and rejected.
    fn summary(self, target: &Target) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Some(lines) = &self.lines {
            lines.abort();
        }
        let secs = self.started.elapsed().as_secs_f64();
        let sent = Tally::get(&self.tally.sent);
        let acked = if target.acknowledges() {
            Tally::get(&self.tally.acked).to_string()
        } else {
            "- (QoS 0)".to_owned()
        };
        let rejected = if target.reports_rejections() {
            Tally::get(&self.tally.rejected).to_string()
        } else {
            "- (see fleetpipe_frames_rejected_total)".to_owned()
        };
        println!(
            "{}: sent {sent} frames in {secs:.2} s ({:.0} frames/s); acknowledged {acked}; rejected {rejected}",
            self.what,
            sent as f64 / secs.max(1e-9)
        );
    }
}

/// A vehicle on a loop around a centre point.
struct Vehicle {
    id: String,
    seq: u64,
    angle: f64,
    radius_deg: f64,
    center: (f64, f64),
    speed_kmh: f64,
    odometer_m: f64,
}

fn rng(state: &mut u64) -> f64 {
    // xorshift64*: deterministic per run, no dependency.
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

/// `fleetpipe simulate`: `vehicles` vehicles publish at `hz` for `duration`.
pub async fn simulate(
    target_url: &str,
    vehicles: usize,
    hz: f64,
    duration: Duration,
    qos: u8,
) -> anyhow::Result<()> {
    let mut target = Target::connect(target_url, qos).await?;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut fleet: Vec<Vehicle> = (0..vehicles)
        .map(|i| Vehicle {
            id: format!("SIM{:014}", i),
            seq: 0,
            angle: rng(&mut seed) * std::f64::consts::TAU,
            radius_deg: 0.01 + rng(&mut seed) * 0.05,
            center: (56.15 + rng(&mut seed) * 0.2 - 0.1, 10.2 + rng(&mut seed) * 0.3 - 0.15),
            speed_kmh: 20.0 + rng(&mut seed) * 80.0,
            odometer_m: (rng(&mut seed) * 200_000.0).round() * 1000.0,
        })
        .collect();
    let tick = Duration::from_secs_f64(1.0 / hz.max(0.001));
    let rounds = (duration.as_secs_f64() * hz.max(0.001)).ceil() as u64;
    let expected = vehicles as u64 * (rounds + rounds.div_ceil(10));
    let progress = Progress::start("simulate", &target, expected);
    let end = Instant::now() + duration;
    let mut next = Instant::now();
    let mut round = 0u64;
    while Instant::now() < end {
        let ts = crate::now_millis();
        let mut batch = Vec::with_capacity(fleet.len());
        for v in &mut fleet {
            v.seq += 1;
            let step = v.speed_kmh / 3.6 / hz.max(0.001);
            v.angle += step / (v.radius_deg * 111_000.0);
            v.odometer_m += step;
            let lat = v.center.0 + v.radius_deg * v.angle.sin();
            let lon = v.center.1 + v.radius_deg * v.angle.cos();
            let heading = heading_deg(v.angle);
            batch.push(json!({
                "vehicle_id": v.id, "ts": ts, "seq": v.seq, "kind": "location",
                "lat": (lat * 1e6).round() / 1e6, "lon": (lon * 1e6).round() / 1e6,
                "speed_kmh": (v.speed_kmh * 10.0).round() / 10.0, "heading_deg": heading,
                "accuracy_m": 3.0, "odometer_m": v.odometer_m.round(),
            }));
            if round.is_multiple_of(10) {
                v.seq += 1;
                let mut d = json!({
                    "vehicle_id": v.id, "ts": ts, "seq": v.seq, "kind": "diagnostic",
                    "engine_rpm": (800.0 + v.speed_kmh * 30.0).round(), "coolant_temp_c": 88.0,
                    "fuel_level_pct": 50.0, "battery_v": 13.8,
                });
                if rng(&mut seed) < 0.05 {
                    d["dtcs"] = json!(["P0301", {"spn": 110, "fmi": 0, "oc": 3, "sa": 0}]);
                    d["mil_on"] = json!(true);
                }
                batch.push(d);
            }
        }
        match &mut target {
            Target::Http { .. } | Target::Kafka { .. } => {
                for chunk in batch.chunks(1000) {
                    target.send(chunk).await?;
                }
            }
            Target::Mqtt { .. } => target.send(&batch).await?,
        }
        progress.update();
        round += 1;
        next += tick;
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        } else {
            next = now;
        }
    }
    target.finish().await?;
    progress.summary(&target);
    Ok(())
}

/// `fleetpipe replay`: sends an NDJSON file, pacing by the frames' own `ts` divided by `speed`
/// (`speed` 0: as fast as possible).
pub async fn replay(path: &std::path::Path, target_url: &str, speed: f64, qos: u8) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut frames: Vec<Value> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        frames.push(
            serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?,
        );
    }
    let mut target = Target::connect(target_url, qos).await?;
    let progress = Progress::start("replay", &target, frames.len() as u64);
    let started = Instant::now();
    let first_ts = frames.first().and_then(ts_millis);
    let batch_size = if matches!(target, Target::Mqtt { .. }) { 1 } else { 500 };
    for chunk in frames.chunks(batch_size) {
        if speed > 0.0 {
            if let (Some(t0), Some(t)) = (first_ts, chunk.first().and_then(ts_millis)) {
                let due = started + Duration::from_secs_f64(((t - t0).max(0) as f64 / 1000.0) / speed);
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep(due - now).await;
                }
            }
        }
        target.send(chunk).await?;
        progress.update();
    }
    target.finish().await?;
    progress.summary(&target);
    Ok(())
}

fn ts_millis(v: &Value) -> Option<i64> {
    match &v["ts"] {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s).ok().map(|d| d.timestamp_millis()),
        _ => None,
    }
}

/// The heading of a vehicle going round a circle at `angle` (radians), in tenths of a degree in
/// `[0, 360)`: rounded before it is wrapped, so that 359.96° becomes 0.0°, not 360.0°.
fn heading_deg(angle: f64) -> f64 {
    ((angle.to_degrees() + 90.0) * 10.0).round().rem_euclid(3600.0) / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_stay_in_the_contracts_range_also_when_they_round_up_to_360() {
        // 269.96° + 90° rounds to 360.0°, which the contract refuses.
        assert_eq!(heading_deg(269.96f64.to_radians()), 0.0);
        for i in 0..100_000 {
            let h = heading_deg(i as f64 * 0.000_731);
            assert!((0.0..360.0).contains(&h), "{h} at step {i}");
        }
    }
}
