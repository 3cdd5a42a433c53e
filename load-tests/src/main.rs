//! `fleetpipe-load`: the pieces of the end-to-end measurement (see `mqtt_ratio.sh`).
//!
//! - `publish`: one MQTT 3.1.1 connection publishing N pre-built frames flat out over V
//!   vehicles (QoS 0 or 1; at QoS 1 it waits for every PUBACK). Prints the start time.
//! - `subscribe`: the bare ceiling, an MQTT 5 subscriber with automatic acks and a 65,535
//!   receive window that only counts messages. Prints the time the N-th arrived.
//! - `wait-metric`: polls a Prometheus endpoint until a counter reaches N. Prints that time.
//! - `l1-bytes`: fills the L1 latest-state cache with N vehicles (a location and a diagnostic
//!   frame each) and prints the resident memory it added per vehicle.
//!
//! - `pg-sink`, `redis-l2`, `ingest`, `read-latency`: the storage measurements of
//!   `storage_bench.sh` (see [`storage`]).
//!
//! Times are Unix epoch seconds with nanoseconds, so a script can subtract them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

mod gateway;
mod storage;
mod teltonika;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Publish {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 100_000)]
        frames: u64,
        #[arg(long, default_value_t = 1000)]
        vehicles: u64,
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
    Subscribe {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// File created once the subscription is acknowledged.
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
    },
    L1Bytes {
        #[arg(long, default_value_t = 1_000_000)]
        vehicles: u64,
        /// Measure moka alone instead: one entry per vehicle, an 8-byte key and no value (what
        /// a cache of one moka entry per vehicle would cost before any state).
        #[arg(long)]
        bare_moka: bool,
    },
    /// The Postgres sink against `psql \copy` of the same rows into the same table.
    PgSink {
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        url: String,
        #[arg(long)]
        schema: String,
        #[arg(long, default_value_t = 200_000)]
        rows: u64,
        #[arg(long, default_value_t = 1000)]
        vehicles: u64,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The Parquet sink against the parquet crate alone writing the same rows.
    ParquetBench {
        #[arg(long, default_value_t = 500_000)]
        rows: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Time per Redis L2 batch of one frame per vehicle.
    RedisL2 {
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        url: String,
        #[arg(long)]
        prefix: String,
        #[arg(long, default_value_t = 1000)]
        vehicles: u64,
        #[arg(long, default_value_t = 300)]
        batches: u64,
    },
    /// Produces N frames (JSON, key = vehicle_id) to a Kafka topic, flat out.
    KafkaProduce {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "vehicle-frames")]
        topic: String,
        #[arg(long, default_value_t = 300_000)]
        frames: u64,
        #[arg(long, default_value_t = 1000)]
        vehicles: u64,
    },
    /// The bare Kafka ceiling: a consumer (new group, from the earliest offset) that only counts
    /// records. Prints the time the N-th arrived.
    KafkaConsume {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "vehicle-frames")]
        topic: String,
        #[arg(long)]
        count: u64,
    },
    /// The HTTP limit: answers `POST /v1/frames` with `{"accepted":n}` (n = the NDJSON lines, or
    /// 1) without decoding, validating or storing anything.
    HttpNull {
        #[arg(long)]
        port: u16,
    },
    /// Frame→queryable latency: background load at `rate` frames/s over MQTT (QoS 1) while a
    /// probe publishes a new frame for one of its own vehicles every 20 ms and polls
    /// `GET /v1/vehicles/{id}` until that frame is the one served. Prints p50/p99/max.
    Latency {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        http: String,
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        #[arg(long, default_value_t = 1000)]
        vehicles: u64,
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
        /// Publisher connections sharing the load (each vehicle on one of them), on as many
        /// threads: one connection tops out near 80 k frames/s on this machine.
        #[arg(long, default_value_t = 1)]
        publishers: u64,
    },
    /// Posts one location per vehicle to a running fleetpipe.
    Ingest {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value_t = 5000)]
        vehicles: u64,
    },
    /// GETs every vehicle once; latency by `served_from`.
    ReadLatency {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value_t = 5000)]
        vehicles: u64,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Many vehicles, one MQTT connection each, publishing their own topics (see [`gateway`]).
    Fleet {
        #[arg(long, default_value = "127.0.0.1:1883")]
        server: std::net::SocketAddr,
        #[arg(long, default_value_t = 100)]
        vehicles: usize,
        /// Frames per vehicle.
        #[arg(long, default_value_t = 1000)]
        frames: u64,
        /// Frames per second per vehicle; 0: flat out.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// QoS 1 messages in flight per connection (flat out).
        #[arg(long, default_value_t = 100)]
        inflight: usize,
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// Source addresses 127.0.0.1..=127.0.0.N.
        #[arg(long, default_value_t = 1)]
        ips: usize,
        /// First vehicle number (several processes take disjoint ranges).
        #[arg(long, default_value_t = 0)]
        first: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Authenticate as the vehicle (username = id, password = its load-test token).
        #[arg(long)]
        auth: bool,
        /// After the last frame, keep the connections open until killed.
        #[arg(long)]
        hold: bool,
    },
    /// Simulated Teltonika trackers over TCP: handshake, then Codec 8 Extended packets, each
    /// sent once the previous one is answered.
    Teltonika {
        #[arg(long, default_value = "127.0.0.1:5027")]
        server: std::net::SocketAddr,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Records per device.
        #[arg(long, default_value_t = 1000)]
        records: u64,
        /// Records per packet.
        #[arg(long, default_value_t = 10)]
        per_packet: usize,
        /// Prints the IMEIs of the first N devices (one per line) and exits.
        #[arg(long)]
        imeis: bool,
    },
    /// N idle MQTT connections held until killed.
    Idle {
        #[arg(long, default_value = "127.0.0.1:1883")]
        server: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        ips: usize,
        /// First vehicle number (several processes take disjoint ranges).
        #[arg(long, default_value_t = 0)]
        first: usize,
        #[arg(long)]
        auth: bool,
    },
    /// Writes a credentials file for vehicles `0..vehicles` with their load-test tokens.
    Credentials {
        #[arg(long)]
        vehicles: usize,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// GETs a URL every 10 ms for a while; latency percentiles.
    Probe {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// An MQTT server that acknowledges at once and stores nothing.
    NullMqtt {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Print `end <time>` at every multiple of this many PUBLISHes (0: never).
        #[arg(long, default_value_t = 0)]
        every: u64,
    },
    /// Prints one vehicle's frames, one JSON payload per line, for `mosquitto_pub -l`: the
    /// same frames `publish` sends for vehicle `vehicle` of `vehicles`.
    Lines {
        #[arg(long)]
        vehicle: u64,
        #[arg(long, default_value_t = 1000)]
        vehicles: u64,
        #[arg(long, default_value_t = 15_000)]
        frames: u64,
    },
    WaitMetric {
        #[arg(long)]
        url: String,
        /// Metric name with labels, as in the exposition.
        #[arg(long)]
        name: String,
        #[arg(long)]
        value: f64,
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        /// Poll interval (each poll renders fleetpipe's whole exposition: it costs CPU, about
        /// 4 % of fleetpipe's at 10 ms during an MQTT run; the time it reports is at most one
        /// interval late).
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
    },
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn frame(i: u64, vehicles: u64) -> (String, Vec<u8>) {
    let v = i % vehicles.max(1);
    let seq = i / vehicles.max(1) + 1;
    let ts = 1_795_640_400_000i64 + (seq as i64) * 1000;
    // Within the valid range for any number of vehicles (300,000 distinct latitudes).
    let lat = 56.0 + ((v % 300_000) as f64) * 1e-4 + ((seq % 1_000_000) as f64) * 1e-6;
    let body = format!(
        r#"{{"vehicle_id":"LOAD{v:08}","ts":{ts},"seq":{seq},"lat":{lat:.6},"lon":10.213695,"speed_kmh":33.8,"heading_deg":273.0,"alt_m":38.5,"accuracy_m":3.2,"satellites":9,"odometer_m":2077000}}"#
    );
    (format!("vehicles/LOAD{v:08}/location"), body.into_bytes())
}

fn lines(vehicle: u64, vehicles: u64, frames: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for seq in 0..frames {
        let (_, body) = frame(seq * vehicles.max(1) + vehicle, vehicles);
        out.write_all(&body)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn qos(q: u8) -> rumqttc::QoS {
    if q == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

async fn publish(host: String, port: u16, frames: u64, vehicles: u64, q: u8) -> anyhow::Result<()> {
    let msgs: Vec<(String, Vec<u8>)> = (0..frames).map(|i| frame(i, vehicles)).collect();
    let mut o = rumqttc::MqttOptions::new(format!("fleetpipe-load-pub-{}", std::process::id()), host, port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(1000).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10_000);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let expect = if q == 0 { 0 } else { frames };
    let event_loop = tokio::spawn(async move {
        let mut acked = 0u64;
        let mut done_tx = Some(done_tx);
        if expect == 0 {
            if let Some(tx) = done_tx.take() {
                let _ = tx.send(());
            }
        }
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == expect {
                        if let Some(tx) = done_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                // Written and flushed behind every frame before it: the run is on the wire.
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(rumqttc::ConnectionError::RequestsDone) => return,
                // After the last ack the connection's end is expected, not worth a line.
                Err(_) if done_tx.is_none() => return,
                Err(e) => {
                    eprintln!("publisher connection error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let start = now();
    println!("start {start:.6}");
    for (topic, body) in msgs {
        client.publish(topic, qos(q), false, body).await?;
    }
    done_rx.await.context("publisher loop ended")?;
    let end = now();
    println!("published {frames} in {:.3} s ({:.0}/s)", end - start, frames as f64 / (end - start));
    // The DISCONNECT queues behind every PUBLISH still in the client's request channel (up to
    // 10,000 at QoS 0, where nothing is acknowledged): the frames are on the wire only once the
    // event loop has written it and ended. Exiting earlier lost the tail of a QoS 0 run.
    client.disconnect().await?;
    if tokio::time::timeout(Duration::from_secs(60), event_loop).await.is_err() {
        bail!("publisher: the connection did not close within 60 s of the last frame");
    }
    Ok(())
}

async fn subscribe(
    host: String,
    port: u16,
    count: u64,
    q: u8,
    ready: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let mut o =
        rumqttc::v5::MqttOptions::new(format!("fleetpipe-load-sub-{}", std::process::id()), host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_receive_maximum(Some(65_535))
        .set_max_packet_size(Some(1 << 20));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 70_000);
    let sub_qos = if q == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    };
    client.subscribe("vehicles/+/+", sub_qos).await?;
    let mut n = 0u64;
    // A frame that never comes (a publisher or broker that lost it) ends the run with an error
    // once nothing has arrived for this long, instead of a wait without end.
    let idle = Duration::from_secs(60);
    let mut last = tokio::time::Instant::now();
    loop {
        let Ok(event) = tokio::time::timeout(idle.saturating_sub(last.elapsed()), el.poll()).await else {
            bail!("subscriber: {n} of {count} messages, then none for {} s", idle.as_secs());
        };
        match event {
            Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::SubAck(_))) => {
                if let Some(p) = &ready {
                    std::fs::write(p, b"ready")?;
                }
            }
            Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(_))) => {
                n += 1;
                last = tokio::time::Instant::now();
                if n == count {
                    println!("end {:.6}", now());
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) => bail!("subscriber connection error after {n} messages: {e}"),
        }
    }
}

async fn wait_metric(
    url: String,
    name: String,
    value: f64,
    timeout: f64,
    interval_ms: u64,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = now() + timeout;
    loop {
        if let Ok(r) = client.get(&url).send().await {
            let text = r.text().await.unwrap_or_default();
            let v = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix(name.as_str())
                        .and_then(|r| r.strip_prefix(' '))
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
                .unwrap_or(0.0);
            if v >= value {
                println!("end {:.6}", now());
                return Ok(());
            }
        }
        if now() > deadline {
            bail!("{name} did not reach {value} within {timeout} s");
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
}

async fn kafka_produce(brokers: &str, topic: &str, frames: u64, vehicles: u64) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()?;
    let start = now();
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..frames {
        // On Kafka the frame names its kind (on MQTT the topic does).
        let (_, mqtt_body) = frame(i, vehicles);
        let mut body = b"{\"kind\":\"location\",".to_vec();
        body.extend_from_slice(mqtt_body.get(1..).unwrap_or_default());
        let key = format!("LOAD{:08}", i % vehicles.max(1));
        let mut record = FutureRecord::to(topic).key(&key).payload(&body);
        loop {
            match producer.send_result(record) {
                Ok(d) => break pending.push(d),
                Err((_, r)) => {
                    record = r;
                    for d in pending.drain(..) {
                        d.await.context("delivery")?.map_err(|(e, _)| e)?;
                    }
                }
            }
        }
        if pending.len() >= 10_000 {
            for d in pending.drain(..) {
                d.await.context("delivery")?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending.drain(..) {
        d.await.context("delivery")?.map_err(|(e, _)| e)?;
    }
    let secs = now() - start;
    println!("produced {frames} in {secs:.3} s ({:.0}/s)", frames as f64 / secs);
    Ok(())
}

async fn kafka_consume(brokers: &str, topic: &str, count: u64) -> anyhow::Result<()> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bare-{}-{}", std::process::id(), now()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut n = 0u64;
    while n < count {
        match consumer.recv().await {
            Ok(_) => n += 1,
            Err(e) => bail!("consumer error after {n} records: {e}"),
        }
    }
    println!("end {:.6}", now());
    Ok(())
}

/// An MQTT 3.1.1 QoS 1 publisher whose event loop runs in the background.
fn mqtt_publisher(host: &str, port: u16, name: &str) -> rumqttc::AsyncClient {
    let mut o =
        rumqttc::MqttOptions::new(format!("fleetpipe-load-{name}-{}", std::process::id()), host, port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(1000).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10_000);
    tokio::spawn(async move {
        loop {
            if let Err(e) = el.poll().await {
                if matches!(e, rumqttc::ConnectionError::RequestsDone) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    client
}

async fn latency(
    host: String,
    port: u16,
    http: String,
    rate: u64,
    vehicles: u64,
    duration: f64,
    publishers: u64,
) -> anyhow::Result<()> {
    let probe = mqtt_publisher(&host, port, "probe");
    let end = now() + duration;
    // Background load: batches every 10 ms from each publisher; publisher k sends frames
    // k, k + P, k + 2P, ... so that a vehicle's frames (i mod vehicles) stay on one connection
    // when P divides the vehicle count.
    let loaders: Vec<_> = (0..publishers)
        .map(|k| {
            let load = mqtt_publisher(&host, port, &format!("load{k}"));
            tokio::spawn(async move {
                let per_tick = (rate / publishers / 100).max(1);
                let (mut i, mut sent) = (k, 0u64);
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while now() < end {
                    tick.tick().await;
                    for _ in 0..per_tick {
                        let (topic, body) = frame(i, vehicles);
                        if load.publish(topic, rumqttc::QoS::AtLeastOnce, false, body).await.is_err() {
                            return sent;
                        }
                        i += publishers;
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    let client = reqwest::Client::new();
    let mut samples = Vec::new();
    let mut seq = 0u64;
    let mut timeouts = 0u64;
    // Give the load a second to settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while now() < end {
        seq += 1;
        let id = format!("PROBE{:03}", seq % 16);
        let ts = 1_795_640_400_000i64 + seq as i64 * 1000;
        let body = format!(r#"{{"vehicle_id":"{id}","ts":{ts},"seq":{seq},"lat":56.1,"lon":10.2}}"#);
        let started = now();
        probe.publish(format!("vehicles/{id}/location"), rumqttc::QoS::AtLeastOnce, false, body).await?;
        let url = format!("{http}/v1/vehicles/{id}");
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if let Ok(v) = r.bytes().await.map(|b| serde_json::from_slice::<serde_json::Value>(&b)) {
                    let Ok(v) = v else { continue };
                    if v["location"]["seq"].as_u64() == Some(seq) {
                        samples.push((now() - started) * 1e3);
                        break;
                    }
                }
            }
            if now() - started > 10.0 {
                timeouts += 1;
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sent = 0;
    for l in loaders {
        sent += l.await.unwrap_or(0);
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples.get(((samples.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0.0);
    println!(
        "latency: load {sent} frames at {rate}/s target ({:.0}/s sent), {} probes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {timeouts} over 10 s",
        sent as f64 / duration,
        samples.len(),
        pct(0.5),
        pct(0.99),
        samples.last().copied().unwrap_or(0.0)
    );
    Ok(())
}

async fn http_null(port: u16) -> anyhow::Result<()> {
    async fn accept(headers: axum::http::HeaderMap, body: axum::body::Bytes) -> String {
        let ndjson = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-ndjson"));
        let n = if ndjson { body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() } else { 1 };
        format!(r#"{{"accepted":{n},"rejected":[]}}"#)
    }
    let app = axum::Router::new().route("/v1/frames", axum::routing::post(accept));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().to_string())
            })
        })
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn moka_bytes(vehicles: u64) {
    let cache: moka::sync::Cache<u64, ()> = moka::sync::Cache::builder()
        .max_capacity(vehicles + 1)
        .time_to_idle(Duration::from_secs(3600))
        .build();
    let before = rss_bytes();
    for v in 0..vehicles {
        cache.insert(v, ());
    }
    cache.run_pending_tasks();
    let held = cache.entry_count();
    let after = rss_bytes();
    let per = after.saturating_sub(before) as f64 / held.max(1) as f64;
    println!(
        "moka alone: {held} entries, {:.0} MiB resident added, {per:.0} bytes per entry (u64 key, no value)",
        after.saturating_sub(before) as f64 / 1048576.0
    );
}

fn l1_bytes(vehicles: u64) {
    use fleetpipe_processors::{latest::LatestCache, Body, Diagnostic, Frame, Location};
    let cache = LatestCache::new(vehicles + 1, Duration::from_secs(3600));
    let before = rss_bytes();
    let mut batch = Vec::with_capacity(10_000);
    for v in 0..vehicles {
        let id = format!("WVWZZZ1JZ{v:08}");
        let loc = Location {
            lat: 56.1,
            lon: 10.2,
            speed_kmh: Some(33.8),
            heading_deg: Some(273.0),
            accuracy_m: Some(3.2),
            ..Default::default()
        };
        batch.push(Frame {
            vehicle_id: id.clone(),
            ts: 1,
            seq: 1,
            received_at: 1,
            body: Body::Location(loc),
        });
        let diag = Diagnostic {
            engine_rpm: Some(2150.0),
            coolant_temp_c: Some(88.0),
            fuel_level_pct: Some(61.5),
            ..Default::default()
        };
        batch.push(Frame {
            vehicle_id: id,
            ts: 1,
            seq: 2,
            received_at: 1,
            body: Body::Diagnostic(Box::new(diag)),
        });
        if batch.len() >= 10_000 {
            cache.apply(&batch);
            batch.clear();
        }
    }
    cache.apply(&batch);
    let held = cache.len();
    let after = rss_bytes();
    let per = after.saturating_sub(before) as f64 / held.max(1) as f64;
    println!(
        "l1: {held} vehicles, {:.0} MiB resident added, {per:.0} bytes per vehicle (location + diagnostic)",
        (after - before) as f64 / 1048576.0
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The sinks run their own runtimes: call them outside this one.
    match &cli.cmd {
        Cmd::PgSink { url, schema, rows, vehicles, batch, rounds } => {
            return storage::pg_sink(url, schema, *rows, *vehicles, *batch, *rounds);
        }
        Cmd::RedisL2 { url, prefix, vehicles, batches } => {
            return storage::redis_l2(url, prefix, *vehicles, *batches);
        }
        Cmd::ParquetBench { rows, rounds } => return storage::parquet_bench(*rows, *rounds),
        Cmd::Latency { host, port, http, rate, vehicles, duration, publishers } => {
            let publishers = (*publishers).max(1);
            return tokio::runtime::Builder::new_multi_thread()
                .worker_threads(usize::try_from(publishers).unwrap_or(1).max(2))
                .enable_all()
                .build()?
                .block_on(latency(
                    host.clone(),
                    *port,
                    http.clone(),
                    *rate,
                    *vehicles,
                    *duration,
                    publishers,
                ));
        }
        Cmd::NullMqtt { port, workers, every } => return gateway::null_mqtt(*port, *workers, *every),
        Cmd::Teltonika { server, devices, records, per_packet, imeis } => {
            if *imeis {
                for i in 0..*devices {
                    println!("{}", teltonika::imei(i));
                }
                return Ok(());
            }
            let t = teltonika::Trackers {
                server: *server,
                devices: *devices,
                records: *records,
                per_packet: *per_packet,
            };
            return tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(teltonika::run(t));
        }
        Cmd::Fleet { server, vehicles, frames, rate, inflight, qos, ips, first, threads, auth, hold } => {
            let fleet = gateway::Fleet {
                server: *server,
                vehicles: *vehicles,
                first: *first,
                frames: *frames,
                rate: *rate,
                inflight: *inflight,
                qos: *qos,
                ips: *ips,
                auth: *auth,
                hold: *hold,
            };
            return tokio::runtime::Builder::new_multi_thread()
                .worker_threads((*threads).max(1))
                .enable_all()
                .build()?
                .block_on(gateway::fleet(fleet));
        }
        // On all cores, as fleetpipe's API.
        Cmd::HttpNull { port } => {
            return tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(http_null(*port));
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Publish { host, port, frames, vehicles, qos } => {
                publish(host, port, frames, vehicles, qos).await
            }
            Cmd::Lines { vehicle, vehicles, frames } => lines(vehicle, vehicles, frames),
            Cmd::Subscribe { host, port, count, qos, ready_file } => {
                subscribe(host, port, count, qos, ready_file).await
            }
            Cmd::WaitMetric { url, name, value, timeout, interval_ms } => {
                wait_metric(url, name, value, timeout, interval_ms).await
            }
            Cmd::L1Bytes { vehicles, bare_moka: true } => {
                moka_bytes(vehicles);
                Ok(())
            }
            Cmd::L1Bytes { vehicles, bare_moka: false } => {
                l1_bytes(vehicles);
                Ok(())
            }
            Cmd::Ingest { url, vehicles } => storage::ingest(&url, vehicles).await,
            Cmd::KafkaProduce { brokers, topic, frames, vehicles } => {
                kafka_produce(&brokers, &topic, frames, vehicles).await
            }
            Cmd::KafkaConsume { brokers, topic, count } => kafka_consume(&brokers, &topic, count).await,
            Cmd::Idle { server, count, ips, first, auth } => {
                gateway::idle(server, first, count, ips, auth).await
            }
            Cmd::Credentials { vehicles, out } => gateway::credentials(vehicles, &out),
            Cmd::Probe { url, secs } => gateway::probe(&url, secs).await,
            Cmd::HttpNull { .. } | Cmd::NullMqtt { .. } | Cmd::Fleet { .. } | Cmd::Teltonika { .. } => Ok(()),
            Cmd::Latency { .. } => unreachable!("run on its own runtime above"),
            Cmd::ReadLatency { url, vehicles, label } => storage::read_latency(&url, vehicles, &label).await,
            Cmd::PgSink { .. } | Cmd::RedisL2 { .. } | Cmd::ParquetBench { .. } => Ok(()),
        }
    })
}
