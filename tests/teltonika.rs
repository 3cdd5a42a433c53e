//! Teltonika trackers over real sockets, against the fleetpipe binary: Teltonika's documented
//! packets (TCP after the IMEI handshake, and UDP) answered with their record counts only once
//! durable (a `kill -9` right after the answers loses nothing), exact values in Parquet and in
//! `GET /v1/vehicles/{id}`; `kill -9` between a packet and its answer, then the device's resend,
//! stores every record once; bad packets kept with their reason and answered with zero; an
//! unknown IMEI refused with auth on.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nom_teltonika::encoder::{encode_avl_frame, AvlRecordFields};
use nom_teltonika::protocol::{AvlCodec, AvlTimestamp, GpsElement, IoId, Priority};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// From Teltonika's protocol documentation (every CRC checks out).
const LOGIN: &str = "000F333536333037303432343431303133";
const IMEI: &str = "356307042441013";
const CODEC8_ONE: &str = "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF";
const CODEC8_TWO: &str = "000000000000004308020000016B40D57B480100000000000000000000000000000001010101000000000000016B40D5C198010000000000000000000000000000000101010101000000020000252C";
const CODEC8E: &str = "000000000000004A8E010000016B412CEE000100000000000000000000000000000000010005000100010100010011001D00010010015E2C880002000B000000003544C87A000E000000001DD7E06A00000100002994";
const UDP_CODEC8: &str = "003DCAFE0105000F33353230393330383634303336353508010000016B4F815B30010000000000000000000000000000000103021503010101425DBC000001";
const UDP_IMEI: &str = "352093086403655";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// A Codec 8 Extended packet of one record with a fix (ignition on, odometer, external voltage,
/// VIN, two OBD fault codes) at `ts_ms`.
fn fix_packet(ts_ms: u64) -> Vec<u8> {
    let gps = GpsElement {
        longitude_raw: 102_136_950,
        latitude_raw: 561_021_390,
        altitude_meters: 38,
        angle_degrees: 273,
        satellites: 9,
        speed_kph: 34,
    };
    let u8s = [(IoId::from(239), 1u8), (IoId::from(240), 1u8), (IoId::from(21), 4u8)];
    let u16s = [(IoId::from(66), 12_850u16)];
    let u32s = [(IoId::from(16), 123_456u32)];
    let bytes: [(IoId, &[u8]); 2] =
        [(IoId::from(256), b"WVWZZZ1JZXW000001"), (IoId::from(281), b"P0301,P0171")];
    let record = AvlRecordFields::new(AvlTimestamp::from(ts_ms), Priority::High, gps)
        .with_event_io_id(IoId::from(239))
        .with_io_u8(&u8s)
        .with_io_u16(&u16s)
        .with_io_u32(&u32s)
        .with_io_bytes(&bytes);
    encode_avl_frame(AvlCodec::Codec8Extended, &[record]).unwrap()
}

/// The AVL data of a TCP packet in a UDP datagram of `imei`, packet id `id`, AVL packet id 7.
fn as_datagram(packet: &[u8], imei: &str, id: u16) -> Vec<u8> {
    let avl = &packet[8..packet.len() - 4];
    let mut body = id.to_be_bytes().to_vec();
    body.extend_from_slice(&[0x01, 0x07]);
    body.extend_from_slice(&(imei.len() as u16).to_be_bytes());
    body.extend_from_slice(imei.as_bytes());
    body.extend_from_slice(avl);
    let mut out = (body.len() as u16).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// Sends `datagram` from `udp` to `port`; the answer.
async fn udp_answer(udp: &UdpSocket, port: u16, datagram: &[u8]) -> Vec<u8> {
    udp.send_to(datagram, ("127.0.0.1", port)).await.unwrap();
    let mut answer = [0u8; 64];
    let (n, _) =
        tokio::time::timeout(Duration::from_secs(30), udp.recv_from(&mut answer)).await.unwrap().unwrap();
    answer[..n].to_vec()
}

/// A free UDP port on 127.0.0.1.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Ports {
    http: u16,
    tcp: u16,
    udp: u16,
}

fn write_config(dir: &Path, ports: &Ports, extra: &str) -> PathBuf {
    let path = dir.join("fleetpipe.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n{extra}\n[http]\naddr = \"127.0.0.1:{}\"\n[gateway]\nlisten = \"127.0.0.1:{}\"\n\
             [teltonika]\nlisten = \"127.0.0.1:{}\"\nudp_listen = \"127.0.0.1:{}\"\npacket_timeout_secs = 1.0\n\
             [parquet]\nroll_secs = 0.3\n[dead_letter]\nroll_secs = 0.3\n",
            dir.join("data").display(),
            ports.http,
            free_port(),
            ports.tcp,
            ports.udp,
        ),
    )
    .unwrap();
    path
}

fn ports() -> Ports {
    Ports { http: free_port(), tcp: free_port(), udp: free_udp_port() }
}

/// A tracker on TCP.
struct Device {
    stream: TcpStream,
}

impl Device {
    /// Connects and sends the IMEI handshake; the server's one-byte answer.
    async fn login(port: u16, login: &[u8]) -> (Device, u8) {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.write_all(login).await.unwrap();
        let mut answer = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut answer))
            .await
            .expect("a handshake answer")
            .unwrap();
        (Device { stream }, answer[0])
    }

    /// Sends `packet`; the number of records the server says it accepted.
    async fn send(&mut self, packet: &[u8]) -> u32 {
        self.stream.write_all(packet).await.unwrap();
        self.answer().await
    }

    async fn answer(&mut self) -> u32 {
        let mut answer = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(60), self.stream.read_exact(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        u32::from_be_bytes(answer)
    }

    /// Whether the server has closed the connection (within 10 s).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn by_vehicle(
    rows: Vec<std::collections::BTreeMap<String, Value>>,
    id: &str,
) -> Vec<std::collections::BTreeMap<String, Value>> {
    let mut rows: Vec<_> = rows.into_iter().filter(|r| r["vehicle_id"] == id).collect();
    rows.sort_by_key(|r| r["ts"].as_i64().unwrap());
    rows
}

fn signals(row: &std::collections::BTreeMap<String, Value>) -> Value {
    serde_json::from_str(row["signals"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_packets_over_tcp_and_udp_are_answered_with_their_counts_once_durable_and_stored_exactly(
) {
    let dir = tempfile::tempdir().unwrap();
    let p = ports();
    let config = write_config(dir.path(), &p, "");
    let fp = Fleetpipe::start(&config, p.http).await;

    let (mut device, answer) = Device::login(p.tcp, &hex(LOGIN)).await;
    assert_eq!(answer, 1, "the IMEI is accepted (auth off: the IMEI is the vehicle id)");
    assert_eq!(device.send(&hex(CODEC8_ONE)).await, 1);
    assert_eq!(device.send(&hex(CODEC8_TWO)).await, 2);
    assert_eq!(device.send(&hex(CODEC8E)).await, 1);
    let fix_ts = 1_795_640_400_250u64;
    assert_eq!(device.send(&fix_packet(fix_ts)).await, 1);

    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answer = udp_answer(&udp, p.udp, &hex(UDP_CODEC8)).await;
    assert_eq!(answer, hex("0005CAFE010501"), "the UDP acknowledgement of the documented datagram");
    // The TCP packets' records again, over UDP: answered with their counts, and folded by
    // de-duplication (the same tracker, the same records).
    for (i, (packet, count)) in
        [(hex(CODEC8_ONE), 1u8), (hex(CODEC8_TWO), 2), (hex(CODEC8E), 1), (fix_packet(fix_ts), 1)]
            .iter()
            .enumerate()
    {
        let id = 0x1000 + i as u16;
        let answer = udp_answer(&udp, p.udp, &as_datagram(packet, IMEI, id)).await;
        let mut expected = vec![0x00, 0x05];
        expected.extend_from_slice(&id.to_be_bytes());
        expected.extend_from_slice(&[0x01, 0x07, *count]);
        assert_eq!(answer, expected, "datagram {i}");
    }

    // Every answer came after the records were durable: killed now, nothing is lost.
    fp.kill9();
    let fp = Fleetpipe::start(&config, p.http).await;
    let data = dir.path().join("data");
    let diags = wait_for("6 diagnostic rows in Parquet", Duration::from_secs(30), || {
        let rows = read_parquet(&data, "diagnostics");
        (rows.len() >= 6).then_some(rows)
    })
    .await;
    assert_eq!(diags.len(), 6, "one per record, each once");
    let tcp = by_vehicle(diags.clone(), IMEI);
    assert_eq!(tcp.len(), 5);
    let ts: Vec<i64> = tcp.iter().map(|r| r["ts"].as_i64().unwrap()).collect();
    let expected = [
        1_560_160_861_000_000, // 2019-06-10T10:01:01Z
        1_560_160_879_000_000, // 10:01:19
        1_560_161_086_000_000, // 10:04:46
        1_560_166_592_000_000, // 11:36:32
        fix_ts as i64 * 1000,
    ];
    assert_eq!(ts, expected);
    let one = &tcp[2];
    assert_eq!(one["battery_v"], json!(24.079));
    assert_eq!(
        signals(one),
        json!({"Teltonika.Priority": 1, "Teltonika.EventIO": 1, "Teltonika.IO.21": 3, "Teltonika.IO.1": 1,
               "Teltonika.IO.241": 24602, "Teltonika.IO.78": 0})
    );
    assert_eq!(signals(&tcp[0])["Teltonika.IO.1"], 0);
    assert_eq!(signals(&tcp[1])["Teltonika.IO.1"], 1);
    let ext = &tcp[3];
    assert_eq!(ext["odometer_m"], json!(22_949_000.0));
    assert_eq!(
        signals(ext),
        json!({"Teltonika.Priority": 1, "Teltonika.EventIO": 1, "Teltonika.IO.1": 1, "Teltonika.IO.17": 29,
               "Teltonika.IO.11": 893_700_218u64, "Teltonika.IO.14": 500_686_954u64})
    );
    let fix = &tcp[4];
    assert_eq!(fix["battery_v"], json!(12.85));
    assert_eq!(fix["odometer_m"], json!(123_456.0));
    assert_eq!(signals(fix)["Vehicle.VehicleIdentification.VIN"], "WVWZZZ1JZXW000001");
    assert_eq!(signals(fix)["Vehicle.IsMoving"], true);
    let codes: Vec<String> = fix["dtcs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(codes, ["P0301", "P0171"], "{}", fix["dtcs"]);

    let udp_rows = by_vehicle(diags, UDP_IMEI);
    assert_eq!(udp_rows.len(), 1);
    assert_eq!(udp_rows[0]["ts"], json!(1_560_407_006_000_000i64));
    assert_eq!(udp_rows[0]["battery_v"], json!(23.996));

    let locations = read_parquet(&data, "locations");
    assert_eq!(
        locations.len(),
        1,
        "only the record with a fix has a location: the others are not no_fix rejections"
    );
    let l = &locations[0];
    assert_eq!((l["lat"].clone(), l["lon"].clone()), (json!(56.102139), json!(10.213695)));
    assert_eq!((l["speed_kmh"].clone(), l["heading_deg"].clone()), (json!(34.0), json!(273.0)));
    assert_eq!((l["alt_m"].clone(), l["satellites"].clone()), (json!(38.0), json!(9)));
    assert_eq!((l["ignition"].clone(), l["odometer_m"].clone()), (json!(true), json!(123_456.0)));
    assert!(
        fleetpipe_sinks::dead_letter::read_dead_letters(&data.join("dead-letter")).unwrap().is_empty(),
        "nothing rejected"
    );

    let http = format!("127.0.0.1:{}", p.http).parse().unwrap();
    let (status, latest) = http_get(http, &format!("/v1/vehicles/{IMEI}")).await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(latest["location"]["lat"], json!(56.102139));
    assert_eq!(latest["location"]["ts"], "2026-11-25T21:00:00.250Z");
    assert_eq!(latest["diagnostic"]["battery_v"], json!(12.85));
    assert_eq!(latest["diagnostic"]["signals"]["Vehicle.VehicleIdentification.VIN"], "WVWZZZ1JZXW000001");
    assert!(fp.sigterm().success());
}

/// `packet` (a TCP AVL packet) with its data field changed by `f` and the CRC made right again.
fn recrc(packet: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut data = packet[8..packet.len() - 4].to_vec();
    f(&mut data);
    let mut out = vec![0, 0, 0, 0];
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&u32::from(nom_teltonika::crc16(&data)).to_be_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_packets_are_kept_with_their_reason_and_answered_with_zero_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = ports();
    let config = write_config(dir.path(), &p, "");
    let fp = Fleetpipe::start(&config, p.http).await;
    let good = hex(CODEC8_ONE);
    let (mut device, answer) = Device::login(p.tcp, &hex(LOGIN)).await;
    assert_eq!(answer, 1);

    let mut wrong_crc = good.clone();
    *wrong_crc.last_mut().unwrap() ^= 0x01;
    assert_eq!(device.send(&wrong_crc).await, 0, "a wrong CRC");
    // Record count 1 at the start, 2 at the end.
    let counts_disagree = recrc(&good, |d| *d.last_mut().unwrap() = 2);
    assert_eq!(device.send(&counts_disagree).await, 0, "record counts that disagree");
    let unknown_codec = recrc(&good, |d| d[0] = 0x0D);
    assert_eq!(device.send(&unknown_codec).await, 0, "an unknown codec");
    // A length one short: the CRC is read a byte early (refused), and the last byte is a packet
    // cut short (refused after packet_timeout_secs).
    let mut short = good.clone();
    short[7] -= 1;
    assert_eq!(device.send(&short).await, 0, "a length that lies");
    assert_eq!(device.answer().await, 0, "the byte left over");
    // Cut short: half a packet, then silence.
    assert_eq!(device.send(&good[..good.len() / 2]).await, 0, "a truncated packet");
    // The connection survived every one of them.
    assert_eq!(device.send(&good).await, 1, "a good packet after the bad ones");
    // Bytes that are no Teltonika packet at all: kept, and the connection closed.
    device.stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(device.closed().await, "a header that cannot delimit a packet closes the connection");

    // UDP: a datagram whose length field lies is kept and answered with zero (ids echoed).
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut lying = hex(UDP_CODEC8);
    lying[1] += 1;
    assert_eq!(udp_answer(&udp, p.udp, &lying).await, hex("0005CAFE010500"));

    let data = dir.path().join("data");
    let dead = wait_for("8 dead letters", Duration::from_secs(30), || {
        let d = fleetpipe_sinks::dead_letter::read_dead_letters(&data.join("dead-letter")).unwrap();
        (d.len() >= 8).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 8, "{dead:#?}");
    let (dead, udp_dead): (Vec<Value>, Vec<Value>) = dead.into_iter().partition(|d| d["imei"] == IMEI);
    assert_eq!(udp_dead.len(), 1, "{udp_dead:#?}");
    assert_eq!(udp_dead[0]["reason"], "malformed_teltonika");
    assert!(udp_dead[0]["detail"].as_str().unwrap().contains("length"), "{}", udp_dead[0]);
    let details: Vec<&str> = dead.iter().map(|d| d["detail"].as_str().unwrap()).collect();
    for d in &dead {
        assert_eq!(d["reason"], "malformed_teltonika", "{d}");
        assert_eq!(d["source"], "teltonika", "{d}");
        assert_eq!(d["imei"], IMEI, "{d}");
        assert!(
            d["raw_base64"].as_str().is_some_and(|r| !r.is_empty()) || d["raw"].is_string(),
            "bytes kept: {d}"
        );
    }
    for needle in
        ["CRC mismatch", "invalid AVL data", "unsupported codec 0x0d", "truncated packet", "preamble"]
    {
        assert!(details.iter().any(|d| d.contains(needle)), "{needle:?} in {details:#?}");
    }
    assert_eq!(
        dead.iter().filter(|d| d["detail"].as_str().unwrap().contains("truncated")).count(),
        2,
        "the leftover byte and the half packet: {details:#?}"
    );
    let raw = |d: &Value| d["raw_base64"].as_str().map(str::to_owned);
    let kept_crc = dead.iter().find(|d| d["detail"].as_str().unwrap().contains("CRC mismatch")).unwrap();
    assert_eq!(
        raw(kept_crc).unwrap(),
        fleetpipe_sinks::dead_letter::base64(&wrong_crc),
        "the packet's own bytes"
    );
    let diags = wait_for("the good packet in Parquet", Duration::from_secs(30), || {
        let rows = read_parquet(&data, "diagnostics");
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(diags.len(), 1, "only the good packet's record");
    assert_eq!(fp.metric("fleetpipe_frames_rejected_total{reason=\"malformed_teltonika\"}").await, 8.0);
    let (status, _) = http_get(format!("127.0.0.1:{}", p.http).parse().unwrap(), "/health").await;
    assert_eq!(status, 200);
    assert!(fp.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_an_imei_speaks_for_its_bound_vehicle_and_an_unknown_imei_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = ports();
    let config = write_config(dir.path(), &p, "[auth]\nmode = \"token\"");
    let data = dir.path().join("data");
    let token = credentials(&data, &["add", "truck-7", "--imei", IMEI]);
    assert!(token.len() >= 22, "a token is printed too: {token}");
    let ops = credentials(&data, &["add", "--name", "ops", "--scope", "*"]);
    let fp = Fleetpipe::start(&config, p.http).await;

    let login_other = {
        let mut l = vec![0, 15];
        l.extend_from_slice(UDP_IMEI.as_bytes());
        l
    };
    let (mut stranger, answer) = Device::login(p.tcp, &login_other).await;
    assert_eq!(answer, 0, "an IMEI no credential binds is refused in the handshake");
    assert!(stranger.closed().await);
    let (mut device, answer) = Device::login(p.tcp, &hex(LOGIN)).await;
    assert_eq!(answer, 1);
    assert_eq!(device.send(&hex(CODEC8_TWO)).await, 2);
    // UDP from the stranger: not answered, not stored.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&hex(UDP_CODEC8), ("127.0.0.1", p.udp)).await.unwrap();
    wait_for("two auth failures counted", Duration::from_secs(30), || {
        let text = scrape_as(p.http, Some(&ops));
        (metric(&text, "fleetpipe_auth_failures_total{door=\"teltonika\",reason=\"unknown_imei\"}") >= 2.0)
            .then_some(())
    })
    .await;
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), udp.recv_from(&mut buf)).await.is_err(),
        "a refused tracker's datagram is not answered"
    );
    let diags = wait_for("the bound tracker's records", Duration::from_secs(30), || {
        let rows = read_parquet(&data, "diagnostics");
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    assert_eq!(diags.len(), 2);
    assert!(diags.iter().all(|r| r["vehicle_id"] == "truck-7"), "stored under the bound vehicle: {diags:?}");
    assert!(fp.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_a_packet_and_its_answer_then_the_resend_stores_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = ports();
    // Answers wait for every durable sink, and sinks flush once a minute: the kill lands after
    // the packet is in the log and before it is answered.
    let config = write_config(dir.path(), &p, "[pipeline]\nack = \"sinks\"\nack_flush_ms = 60000.0");
    let fp = Fleetpipe::start(&config, p.http).await;
    let (mut device, answer) = Device::login(p.tcp, &hex(LOGIN)).await;
    assert_eq!(answer, 1);
    let packet = hex(CODEC8_TWO);
    device.stream.write_all(&packet).await.unwrap();
    wait_for("the packet received", Duration::from_secs(30), || {
        let text = scrape(p.http);
        (metric(&text, "fleetpipe_frames_received_total{source=\"teltonika\"}") >= 2.0).then_some(())
    })
    .await;
    fp.kill9();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), device.stream.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "no answer before the kill: {rest:?}");

    // The device reconnects and sends what was not acknowledged again.
    let config = write_config(dir.path(), &p, "[pipeline]\nack = \"sinks\"\nack_flush_ms = 100.0");
    let fp = Fleetpipe::start(&config, p.http).await;
    let (mut device, answer) = Device::login(p.tcp, &hex(LOGIN)).await;
    assert_eq!(answer, 1);
    assert_eq!(device.send(&packet).await, 2);
    let data = dir.path().join("data");
    let diags = read_parquet(&data, "diagnostics");
    let ts: Vec<i64> = by_vehicle(diags, IMEI).iter().map(|r| r["ts"].as_i64().unwrap()).collect();
    assert_eq!(
        ts,
        [1_560_160_861_000_000, 1_560_160_879_000_000],
        "each record once: the replay and the resend folded"
    );
    assert!(fp.sigterm().success());
    assert_eq!(read_parquet(&data, "diagnostics").len(), 2);
}
