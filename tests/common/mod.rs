//! Test support: real services on free ports, fleetpipe in-process, and independent readers of
//! what fleetpipe wrote (the parquet crate's reader, the dead-letter files).
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
use fleetpipe::config::Config;
use serde_json::{json, Value};

pub const DRIVE: &str = include_str!("../data/css-drive-aarhus-2021-07-26-am.ndjson");

pub fn drive_frames() -> Vec<Value> {
    DRIVE.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes `dir/fleetpipe.toml` for a spawned `fleetpipe run`: data under `dir/data`, the HTTP API
/// and the vehicle gateway on the given ports, then `extra` (more keys of `[gateway]`, or more
/// sections). Returns its path.
pub fn gateway_config_file(dir: &Path, http_port: u16, gateway_port: u16, extra: &str) -> PathBuf {
    let path = dir.join("fleetpipe.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http_port}\"\n[gateway]\nlisten = \"127.0.0.1:{gateway_port}\"\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn wait_listening(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Mosquitto of our own, with a known configuration, on a free port. Killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("mosquitto")
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port(), tempfile::tempdir().unwrap())
    }

    /// A broker whose only listener is TLS with the certificate of `pki` ("server"), asking
    /// every client for a certificate signed by its CA ("ca").
    pub fn start_tls(pki: &Pki) -> Mosquitto {
        let tls = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            pki.path("ca.pem"),
            pki.path("server.pem"),
            pki.path("server.key")
        );
        Self::start_with(free_port(), tempfile::tempdir().unwrap(), &tls)
    }

    fn start_on(port: u16, dir: tempfile::TempDir) -> Mosquitto {
        Self::start_with(port, dir, "")
    }

    fn start_with(port: u16, dir: tempfile::TempDir, listener_options: &str) -> Mosquitto {
        let conf = dir.path().join("mosquitto.conf");
        // Unlimited queues and in-flight windows: the stock 1,000-message queue would drop
        // QoS 1 messages for a subscriber that is away, which these tests must not confuse
        // with fleetpipe losing them.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{listener_options}user root\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 max_queued_bytes 0\npersistence true\npersistence_location {}/\nautosave_interval 1\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mosquitto must be installed (scripts/test.sh installs it)");
        wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(10));
        Mosquitto { port, child, dir }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM: it saves its persistence file) and starts it again on the
    /// same port with the same state.
    pub fn restart(mut self) -> Mosquitto {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        let _ = self.child.wait();
        let port = self.port;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        drop(self);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "port {port} still busy");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self::start_on(port, dir)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis server of the test's own, on a free port, keeping nothing on disk: a test can stop
/// it and start it again without touching the machine's Redis.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Extra `redis-server` arguments (TLS, a password).
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer { port: free_port(), child: None, args: Vec::new() };
        r.resume();
        r
    }

    /// TLS only (the certificate of `pki`; clients must present one signed by its CA) and
    /// `password` for the default user.
    pub fn start_tls(pki: &Pki, password: &str) -> RedisServer {
        let port = free_port();
        let args = [
            ("--port", "0".to_owned()),
            ("--tls-port", port.to_string()),
            ("--tls-cert-file", pki.path("server.pem")),
            ("--tls-key-file", pki.path("server.key")),
            ("--tls-ca-cert-file", pki.path("ca.pem")),
            ("--tls-auth-clients", "yes".to_owned()),
            ("--requirepass", password.to_owned()),
        ];
        let args = args.into_iter().flat_map(|(k, v)| [k.to_owned(), v]).collect();
        let mut r = RedisServer { port, child: None, args };
        r.resume();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is gone, as after a crash of a cache).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn resume(&mut self) {
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "port {port} still busy");
            std::thread::sleep(Duration::from_millis(20));
        }
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(10));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A PostgreSQL server of the test's own (initdb in a temporary directory, run as the
/// `postgres` user when the test runs as root): TLS only over TCP, with the certificate of a
/// [`Pki`], and a password (SCRAM) for user `postgres`.
pub struct PgServer {
    pub port: u16,
    child: Child,
    /// `pg_ctl stop`, run on drop.
    stop: Command,
    _dir: tempfile::TempDir,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin").join(name)).filter(|p| p.exists()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| PathBuf::from(name))
}

impl PgServer {
    pub fn start_tls(pki: &Pki, password: &str) -> PgServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let as_root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        let run = |bin: &str| -> Command {
            if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(pg_bin(bin));
                c
            } else {
                Command::new(pg_bin(bin))
            }
        };
        std::fs::write(d.join("pw"), password).unwrap();
        for name in ["server.pem", "server.key"] {
            std::fs::copy(pki.path(name), d.join(name)).unwrap();
        }
        std::fs::set_permissions(d.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        if as_root {
            let out = Command::new("chown").args(["-R", "postgres"]).arg(d).output().unwrap();
            assert!(out.status.success(), "chown: {}", String::from_utf8_lossy(&out.stderr));
        }
        let data = d.join("data");
        let out = run("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-N", "-A", "scram-sha-256"])
            .arg(format!("--pwfile={}", d.join("pw").display()))
            .output()
            .expect("initdb (scripts/test.sh installs postgresql)");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(data.join("pg_hba.conf"), "hostssl all all 127.0.0.1/32 scram-sha-256\n").unwrap();
        let port = free_port();
        let child = run("postgres")
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "ssl=on",
                "-c",
                "fsync=off",
            ])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", d.display()))
            .arg("-c")
            .arg(format!("ssl_cert_file={}", d.join("server.pem").display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", d.join("server.key").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(30));
        let mut stop = run("pg_ctl");
        stop.arg("stop")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        PgServer { port, child, stop, _dir: dir }
    }

    /// A libpq conninfo for `psql` (verifying the server against the CA of `pki`).
    pub fn psql(&self, pki: &Pki, password: &str, sql: &str) -> String {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres password={password} sslmode=verify-full sslrootcert={}",
            self.port,
            pki.path("ca.pem")
        );
        let out = Command::new("psql").args([&conninfo, "-Atc", sql]).output().expect("psql");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.stop.status();
        let _ = self.child.wait();
    }
}

/// A Kafka-compatible broker of the test's own (tansu, in-memory storage) on a free port.
pub struct Tansu {
    /// Where clients connect (the TLS terminator's port for [`Tansu::start_tls`]).
    pub port: u16,
    child: Child,
    terminator: Option<Child>,
}

fn home_cache(rel: &str) -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/fleetpipe").join(rel)
}

impl Tansu {
    pub fn start() -> Tansu {
        let port = free_port();
        Tansu::start_advertising(port, port, None)
    }

    /// Tansu behind a TLS terminator (socat, with the server certificate of `pki`): clients
    /// reach it at [`Tansu::brokers`] over TLS only.
    pub fn start_tls(pki: &Pki) -> Tansu {
        let (inner, outer) = (free_port(), free_port());
        let tls = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{outer},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                pki.path("server.pem"),
                pki.path("server.key")
            ))
            .arg(format!("TCP:127.0.0.1:{inner}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat must be installed (scripts/test.sh installs it)");
        Tansu::start_advertising(inner, outer, Some(tls))
    }

    fn start_advertising(listen: u16, advertised: u16, terminator: Option<Child>) -> Tansu {
        let bin = std::env::var_os("FLEETPIPE_TANSU").map(PathBuf::from).unwrap_or_else(|| {
            let cached = home_cache("tansu/bin/tansu");
            if cached.exists() {
                cached
            } else {
                PathBuf::from("tansu")
            }
        });
        let url = format!("tcp://127.0.0.1:{listen}");
        let child = Command::new(&bin)
            .args(["broker", "--storage-engine", "memory://tansu/", "--listener-url", &url])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{advertised}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{} must be installed (scripts/test.sh installs it): {e}", bin.display())
            });
        wait_listening(([127, 0, 0, 1], listen).into(), Duration::from_secs(30));
        wait_listening(([127, 0, 0, 1], advertised).into(), Duration::from_secs(30));
        Tansu { port: advertised, child, terminator }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.terminator.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `tests/kafka_client.py` (Python confluent-kafka: a Kafka client independent of
/// fleetpipe's) and returns its standard output.
pub fn kafka_client(args: &[&str]) -> String {
    kafka_client_with(&[], args)
}

/// [`kafka_client`] with extra environment (`KAFKA_TLS_CA`: connect over TLS).
pub fn kafka_client_with(env: &[(&str, &str)], args: &[&str]) -> String {
    let python = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kafka_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("python for kafka_client.py");
    assert!(out.status.success(), "kafka_client.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Records read back by [`kafka_client`] `consume`.
pub fn kafka_records(brokers: &str, topic: &str, count: usize, secs: u64) -> Vec<Value> {
    kafka_records_with(&[], brokers, topic, count, secs)
}

/// [`kafka_records`] with extra environment for the client.
pub fn kafka_records_with(
    env: &[(&str, &str)],
    brokers: &str,
    topic: &str,
    count: usize,
    secs: u64,
) -> Vec<Value> {
    kafka_client_with(env, &["consume", brokers, topic, &count.to_string(), &secs.to_string()])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fleetpipe binary, run as a child process with a config file (for kill -9 and SIGTERM).
pub struct Fleetpipe {
    child: Child,
    pub http_port: u16,
}

impl Fleetpipe {
    pub async fn start(config: &Path, http_port: u16) -> Fleetpipe {
        let level = std::env::var("FLEETPIPE_TEST_LOG").unwrap_or_else(|_| "warn".into());
        Fleetpipe::start_with(config, http_port, &level, Stdio::inherit()).await
    }

    /// [`Fleetpipe::start`] with `RUST_LOG=level` and its log (standard error) to `log`.
    pub async fn start_with(config: &Path, http_port: u16, level: &str, log: Stdio) -> Fleetpipe {
        let child = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Fleetpipe::adopt(child, http_port).await
    }

    /// A `fleetpipe run` started by the caller (its own environment, say), once it is ready.
    pub async fn adopt(child: Child, http_port: u16) -> Fleetpipe {
        let fp = Fleetpipe { child, http_port };
        let url = format!("http://127.0.0.1:{http_port}/ready");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return fp;
                }
            }
            assert!(std::time::Instant::now() < deadline, "fleetpipe not ready after 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.http_port);
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        metric(&text, name)
    }

    /// The process id of the running fleetpipe.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn sigterm(mut self) -> std::process::ExitStatus {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Fleetpipe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Postgres client on `conninfo` (`host=… dbname=…`), its connection driven in the background.
pub async fn pg_connect(conninfo: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// The machine's Postgres, database `postgres`.
pub async fn pg() -> tokio_postgres::Client {
    pg_connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres").await
}

/// Writes `n` location frames (NDJSON) of 100 vehicles `{prefix}-000`… with seq 0..n, 100 ms
/// apart from 2026-11-20T00:00:00Z.
pub fn write_location_lines(path: &Path, prefix: &str, n: usize) {
    let base = 1_795_132_800_000i64; // 2026-11-20T00:00:00Z
    let lines: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"vehicle_id":"{prefix}-{:03}","ts":{},"seq":{i},"kind":"location","lat":{},"lon":10.2}}"#,
                i % 100,
                base + i as i64 * 100,
                56.0 + (i % 1000) as f64 * 1e-4
            )
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// The end offset of every non-empty partition of `topic`, read from its `records` records
/// (tansu's in-memory ListOffsets does not report high watermarks).
pub fn kafka_ends(brokers: &str, topic: &str, records: usize) -> BTreeMap<String, i64> {
    let mut ends: BTreeMap<String, i64> = BTreeMap::new();
    for r in kafka_records(brokers, topic, records, 30) {
        let end = ends.entry(r["partition"].to_string()).or_default();
        *end = (*end).max(r["offset"].as_i64().unwrap() + 1);
    }
    ends
}

/// The offsets `group` committed on `topic` (partitions without a commit left out).
pub fn kafka_committed(brokers: &str, group: &str, topic: &str) -> BTreeMap<String, i64> {
    let mut c: BTreeMap<String, i64> =
        serde_json::from_str(&kafka_client(&["committed", brokers, group, topic])).unwrap();
    c.retain(|_, offset| *offset >= 0);
    c
}

/// A config for tests: everything on free ports under `dir`, files rolled quickly.
pub fn test_config(dir: &Path, mqtt_url: Option<String>) -> Config {
    let mut cfg = Config { data_dir: dir.to_path_buf(), ..Config::default() };
    cfg.http.addr = ([127, 0, 0, 1], 0).into();
    cfg.gateway.listen = mqtt_url.is_none().then(|| ([127, 0, 0, 1], free_port()).into());
    cfg.mqtt.url = mqtt_url;
    cfg.mqtt.client_id = Some(format!("fleetpipe-test-{}", unique()));
    cfg.parquet.roll_secs = 0.3;
    cfg.dead_letter.roll_secs = 0.3;
    cfg.pipeline.shards = 2;
    cfg
}

pub fn unique() -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{}-{}", std::process::id(), n % 1_000_000_000_000)
}

/// Runs `tests/mqtt_client.py` (Python Paho: an MQTT client independent of fleetpipe's) and
/// returns the JSON line it prints.
pub fn mqtt_client(args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(mqtt_client_script())
        .args(args)
        .output()
        .expect("python for mqtt_client.py");
    assert!(out.status.success(), "mqtt_client.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("mqtt_client.py {args:?} printed {text:?}: {e}"))
}

/// `tests/mqtt_client.py` started in the background (its stdout piped).
pub fn mqtt_client_spawn(args: &[&str]) -> Child {
    Command::new(python())
        .arg(mqtt_client_script())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python for mqtt_client.py")
}

fn mqtt_client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mqtt_client.py")
}

/// The Python of the tests' independent clients (`FLEETPIPE_PYTHON`, else the venv that
/// scripts/test.sh makes, else `python3`).
pub fn python() -> PathBuf {
    std::env::var_os("FLEETPIPE_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let venv = home_cache("py/bin/python");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        }
    })
}

/// Runs `fleetpipe credentials ARGS` for the data directory `data_dir`; its standard output.
pub fn credentials(data_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
        .arg("credentials")
        .args(args)
        .env("FLEETPIPE_DATA_DIR", data_dir)
        .env_remove("FLEETPIPE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "credentials {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A QoS 1 publisher (an MQTT 3.1.1 client, like most vehicle gateways).
pub struct Publisher {
    pub client: rumqttc::AsyncClient,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connection errors the event loop met (it reconnects), for a failing test's message.
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub sent: u64,
}

impl Publisher {
    /// A publisher with a client id of its own and a persistent session, so that what it had
    /// in flight when a connection ended is resent after it reconnects (see
    /// [`Publisher::connect_persistent`]).
    pub async fn connect(port: u16) -> Publisher {
        Self::connect_persistent(port, None, &format!("test-pub-{}", unique())).await
    }

    /// With a credential (`(username, token)`) and a client id of its own.
    pub async fn connect_as(port: u16, credential: Option<(&str, &str)>, client_id: &str) -> Publisher {
        Self::connect_with(port, credential, client_id, true).await
    }

    /// [`Publisher::connect_as`] with a persistent session (`clean: false`): after a reconnect
    /// the server says the session is present and rumqttc resends what was not acknowledged
    /// (with a clean session it drops it, and such a publisher never gets every ack).
    pub async fn connect_persistent(
        port: u16,
        credential: Option<(&str, &str)>,
        client_id: &str,
    ) -> Publisher {
        Self::connect_with(port, credential, client_id, false).await
    }

    async fn connect_with(
        port: u16,
        credential: Option<(&str, &str)>,
        client_id: &str,
        clean: bool,
    ) -> Publisher {
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 24, 1 << 24)
            .set_inflight(500)
            .set_clean_session(clean);
        if let Some((user, token)) = credential {
            o.set_credentials(user, token);
        }
        let (client, mut el) = rumqttc::AsyncClient::new(o, 1000);
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = acked.clone();
        let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = errors.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(e) => {
                        seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                }
            }
        });
        Publisher { client, acked, errors, sent: 0 }
    }

    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
        self.sent += 1;
    }

    pub async fn publish_frame(&mut self, frame: &Value) {
        let topic =
            format!("vehicles/{}/{}", frame["vehicle_id"].as_str().unwrap(), frame["kind"].as_str().unwrap());
        self.publish(&topic, serde_json::to_vec(frame).unwrap()).await;
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the broker acknowledged everything sent.
    pub async fn all_acked(&self) {
        let sent = self.sent;
        // Two minutes: a held connection (README, "Known limit") is closed after the gateway's
        // payload timeout and the publisher reconnects; a test should fail on a lost
        // acknowledgement only.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while self.acked() < sent {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {sent} publishes acknowledged after 120 s; connection errors: {:?}",
                self.acked(),
                self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Every committed row under `{data_dir}/{table}/**/*.parquet`, as JSON-like maps
/// (timestamps as epoch microseconds, lists of structs as arrays of objects).
pub fn read_parquet(data_dir: &Path, table: &str) -> Vec<BTreeMap<String, Value>> {
    let mut files = Vec::new();
    collect_files(&data_dir.join(table), &mut files);
    let mut rows = Vec::new();
    for f in files {
        if f.extension().and_then(|e| e.to_str()) != Some("parquet") {
            continue;
        }
        let file = std::fs::File::open(&f).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap_or_else(|e| panic!("{} unreadable: {e}", f.display()))
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let schema = batch.schema();
            for i in 0..batch.num_rows() {
                let mut row = BTreeMap::new();
                for (c, field) in schema.fields().iter().enumerate() {
                    row.insert(field.name().clone(), cell(batch.column(c).as_ref(), i));
                }
                rows.push(row);
            }
        }
    }
    rows
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn cell(col: &dyn Array, i: usize) -> Value {
    if col.is_null(i) {
        return Value::Null;
    }
    match col.data_type() {
        DataType::Utf8 => json!(col.as_string::<i32>().value(i)),
        DataType::Int64 => json!(col.as_primitive::<Int64Type>().value(i)),
        DataType::Int32 => json!(col.as_primitive::<Int32Type>().value(i)),
        DataType::Float64 => json!(col.as_primitive::<Float64Type>().value(i)),
        DataType::Boolean => json!(col.as_boolean().value(i)),
        DataType::Timestamp(_, _) => json!(col.as_primitive::<TimestampMicrosecondType>().value(i)),
        DataType::List(_) => {
            let list = col.as_list::<i32>();
            let values = list.value(i);
            (0..values.len()).map(|j| cell(values.as_ref(), j)).collect::<Vec<_>>().into()
        }
        DataType::Struct(fields) => {
            let s = col.as_struct();
            let mut m = serde_json::Map::new();
            for (k, f) in fields.iter().enumerate() {
                m.insert(f.name().clone(), cell(s.column(k).as_ref(), i));
            }
            Value::Object(m)
        }
        other => panic!("unexpected column type {other:?}"),
    }
}

/// RFC 3339 or epoch ms → epoch µs.
pub fn ts_micros(v: &Value) -> i64 {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros(),
        Value::Number(n) => n.as_i64().unwrap() * 1000,
        other => panic!("bad ts {other}"),
    }
}

pub const LOCATION_FIELDS: [&str; 9] =
    ["lat", "lon", "speed_kmh", "heading_deg", "alt_m", "accuracy_m", "satellites", "odometer_m", "ignition"];

/// Asserts that `rows` hold exactly the location `frames` (once each, every value equal).
pub fn assert_locations_equal(rows: &[BTreeMap<String, Value>], frames: &[Value]) {
    assert_eq!(rows.len(), frames.len(), "row count");
    let mut by_key: BTreeMap<(String, i64, i64), &BTreeMap<String, Value>> = BTreeMap::new();
    for r in rows {
        let key = (
            r["vehicle_id"].as_str().unwrap().to_string(),
            r["ts"].as_i64().unwrap(),
            r["seq"].as_i64().unwrap(),
        );
        assert!(by_key.insert(key.clone(), r).is_none(), "duplicate row {key:?}");
    }
    for f in frames {
        let key = (
            f["vehicle_id"].as_str().unwrap().to_string(),
            ts_micros(&f["ts"]),
            f["seq"].as_i64().unwrap_or(0),
        );
        let row = by_key.get(&key).unwrap_or_else(|| panic!("frame {key:?} missing from Parquet"));
        for field in LOCATION_FIELDS {
            let want = f.get(field).cloned().unwrap_or(Value::Null);
            let got = row.get(field).cloned().unwrap_or(Value::Null);
            let equal = match (&want, &got) {
                (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                _ => want == got,
            };
            assert!(equal, "{key:?} field {field}: sent {want}, stored {got}");
        }
    }
}

/// Starts fleetpipe in-process.
/// Should another test take the gateway's free port between `free_port` and the bind, another
/// port is tried (the gateway binds first, so nothing is left behind).
pub async fn start(mut cfg: Config) -> fleetpipe::app::Running {
    let mut attempts = 0;
    let running = loop {
        match fleetpipe::app::start(cfg.clone()).await {
            Ok(r) => break r,
            Err(e)
                if cfg.gateway.listen.is_some()
                    && attempts < 5
                    && format!("{e:#}").contains("for the vehicle gateway") =>
            {
                attempts += 1;
                cfg.gateway.listen = Some(([127, 0, 0, 1], free_port()).into());
            }
            Err(e) => panic!("fleetpipe did not start: {e:#}"),
        }
    };
    let http = running.http_addr;
    wait_for("fleetpipe ready", Duration::from_secs(30), || {
        let ok = std::net::TcpStream::connect(http).is_ok() && running.is_subscribed();
        ok.then_some(())
    })
    .await;
    running
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub async fn http_post(addr: SocketAddr, body: Vec<u8>, content_type: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/frames"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// One counter's value from the Prometheus exposition (0 when absent).
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// A test CA, a server certificate for 127.0.0.1, and client certificates, made with openssl.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sh = |script: &str| {
            let out = Command::new("sh").arg("-c").arg(script).current_dir(d).output().unwrap();
            assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        };
        for ca in ["ca", "rogue"] {
            sh(&format!(
                "openssl req -x509 -newkey rsa:2048 -nodes -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN={ca}-test-ca"
            ));
        }
        sh("printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext");
        sh("printf 'basicConstraints=CA:FALSE\\nextendedKeyUsage=clientAuth\\n' > client.ext");
        sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1");
        sh("openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext");
        for (name, ca, cn) in [("client", "ca", "VAN-TLS"), ("intruder", "rogue", "VAN-TLS")] {
            sh(&format!(
                "openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={cn}"
            ));
            sh(&format!(
                "openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -out {name}.pem -days 2 \
                 -extfile client.ext"
            ));
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

/// The bytes of an MQTT 3.1.1 CONNECT with client id `id`, clean session, keep-alive 30 s.
pub fn connect_packet(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend(body);
    pkt
}

/// Runs a future to completion from inside a synchronous check (`wait_for`'s closure) on the
/// multi-threaded test runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A test config with Postgres (schema `schema`) and Redis (key prefix `prefix`) as well.
pub fn storage_config(dir: &Path, schema: &str, prefix: &str) -> Config {
    let mut cfg = test_config(dir, None);
    cfg.postgres.url = Some(PG_URL.into());
    cfg.postgres.schema = schema.into();
    cfg.redis.url = Some(REDIS_URL.into());
    cfg.redis.prefix = prefix.into();
    cfg
}

/// `GET /metrics` of the instance on `http_port`, blocking (for `wait_for` conditions); empty
/// when it cannot be read.
pub fn scrape(http_port: u16) -> String {
    scrape_as(http_port, None)
}

/// [`scrape`] with a bearer token (auth on).
pub fn scrape_as(http_port: u16, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http_port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}
