//! Per-stage throughput, frames per second on one core, with in-bench baselines:
//! - `json/bare_serde`: serde_json into a plain struct (the ceiling for JSON decoding);
//! - `json/fleetpipe_decode_validate`: fleetpipe's decode + validation of the same frames;
//! - `protobuf/fleetpipe_decode_validate`: the same frames as a Protobuf `FrameBatch`;
//! - `dedup_latest`: de-duplication + L1 latest-state update (one shard's work);
//! - `parquet/encode`: the Parquet sink writing and closing the frames (ZSTD);
//! - `teltonika/crate_decode`: nom-teltonika alone decoding Codec 8 Extended packets of 10
//!   records and reading every value (the ceiling), `teltonika/fleetpipe_decode_validate`:
//!   fleetpipe's records → frames (location + diagnostic each) and validation; per record.
//!
//! The frames are the recorded drive (tests/data) plus a diagnostic frame per ten locations.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fleetpipe_pipeline::Sink;
use fleetpipe_processors::codec::{decode_message, encode_protobuf, Message};
use fleetpipe_processors::dedup::Dedup;
use fleetpipe_processors::latest::LatestCache;
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::Batch;
use fleetpipe_processors::{Frame, Origin};
use fleetpipe_sinks::parquet::{self as parquet_sink, ParquetConfig};
use serde::Deserialize;

const DRIVE: &str = include_str!("../../tests/data/css-drive-aarhus-2021-07-26-am.ndjson");

/// The plain struct of the baseline: the same fields, no validation.
#[allow(dead_code)]
#[derive(Deserialize)]
struct PlainFrame {
    vehicle_id: String,
    ts: serde_json::Value,
    seq: Option<u64>,
    kind: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    speed_kmh: Option<f64>,
    heading_deg: Option<f64>,
    alt_m: Option<f64>,
    accuracy_m: Option<f64>,
    satellites: Option<u32>,
    odometer_m: Option<f64>,
    ignition: Option<bool>,
    engine_rpm: Option<f64>,
    coolant_temp_c: Option<f64>,
    fuel_level_pct: Option<f64>,
    dtcs: Option<Vec<serde_json::Value>>,
}

/// The drive's frames, many vehicles (the drive repeated under 50 ids), as one JSON array.
fn payload() -> (Bytes, usize) {
    let mut frames: Vec<serde_json::Value> = Vec::new();
    for v in 0..50 {
        for (i, line) in DRIVE.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).take(400) {
            let mut f: serde_json::Value = serde_json::from_str(line).expect("drive frame");
            f["vehicle_id"] = format!("VEH{v:05}").into();
            frames.push(f.clone());
            if i % 10 == 0 {
                frames.push(serde_json::json!({
                    "vehicle_id": f["vehicle_id"], "ts": f["ts"], "seq": f["seq"], "kind": "diagnostic",
                    "engine_rpm": 2150, "coolant_temp_c": 88, "fuel_level_pct": 61.5, "dtcs": ["P0301", {"spn":110,"fmi":0,"oc":3,"sa":0}]
                }));
            }
        }
    }
    let n = frames.len();
    (Bytes::from(serde_json::to_vec(&frames).expect("json")), n)
}

/// The defaults, without the per-message frame limit (the bench decodes one large batch).
fn bench_rules() -> Rules {
    Rules { max_frames_per_message: usize::MAX, ..Rules::default() }
}

fn decoded(payload: &Bytes) -> Vec<Frame> {
    let origin = Origin::Http;
    let msg = Message { payload, content_type: None, origin: &origin, received_at: 1_800_000_000_000_000 };
    decode_message(&msg, &bench_rules()).frames
}

fn benches(c: &mut Criterion) {
    let (json, n) = payload();
    let frames = decoded(&json);
    assert_eq!(frames.len(), n, "every bench frame is valid");
    let proto = Bytes::from(encode_protobuf(&frames));
    let origin = Origin::Http;
    let rules = bench_rules();

    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("bare_serde", |b| {
        b.iter(|| serde_json::from_slice::<Vec<PlainFrame>>(&json).expect("plain"));
    });
    g.bench_function("fleetpipe_decode_validate", |b| {
        let msg = Message {
            payload: &json,
            content_type: None,
            origin: &origin,
            received_at: 1_800_000_000_000_000,
        };
        b.iter(|| decode_message(&msg, &rules));
    });
    g.finish();

    let mut g = c.benchmark_group("protobuf");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("fleetpipe_decode_validate", |b| {
        let msg = Message {
            payload: &proto,
            content_type: None,
            origin: &origin,
            received_at: 1_800_000_000_000_000,
        };
        b.iter(|| decode_message(&msg, &rules));
    });
    g.finish();

    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("dedup_latest", |b| {
        let latest = LatestCache::new(1_000_000, Duration::from_secs(3600));
        b.iter_batched(
            || (frames.clone(), Dedup::new(1 << 20)),
            |(mut batch, mut dedup)| {
                dedup.retain_new(&mut batch);
                latest.apply(&batch);
                batch.len()
            },
            BatchSize::LargeInput,
        );
    });
    g.bench_function("parquet_encode", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                let mut sink = parquet_sink::open(&ParquetConfig::default(), dir.path()).expect("open");
                let batch = Batch { lsn: 1, frames: frames.clone(), ..Batch::default() };
                sink.write(&batch).expect("write");
                sink.flush().expect("flush");
                dir
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();

    let packets = teltonika_packets(100, 10);
    let records = 1000u64;
    let mut g = c.benchmark_group("teltonika");
    g.throughput(Throughput::Elements(records));
    g.bench_function("crate_decode", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for p in &packets {
                let mut input = &p[..];
                let Ok(nom_teltonika::protocol::FrameView::Avl(packet)) =
                    nom_teltonika::decoder::take_frame(&mut input)
                else {
                    panic!("a bench packet decodes");
                };
                for r in packet.records() {
                    let gps = r.gps();
                    sum += u64::from(r.timestamp()) + gps.latitude_raw as u64 + u64::from(gps.speed_kph);
                    for e in r.io_elements() {
                        sum += u64::from(u16::from(e.id()));
                        if let nom_teltonika::protocol::IoValueView::U32(v) = e.value() {
                            sum += u64::from(v);
                        }
                    }
                }
            }
            sum
        });
    });
    g.bench_function("fleetpipe_decode_validate", |b| {
        let origin = Origin::Teltonika { imei: "356307042441013".into() };
        b.iter(|| {
            let mut frames = 0usize;
            for p in &packets {
                let step = fleetpipe_processors::codec::teltonika::next_tcp(
                    p,
                    "356307042441013",
                    &origin,
                    1_800_000_000_000_000,
                    &rules,
                );
                let fleetpipe_processors::codec::teltonika::TcpStep::Records { decoded, .. } = step else {
                    panic!("a bench packet decodes");
                };
                assert!(decoded.rejections.is_empty());
                frames += decoded.frames.len();
            }
            frames
        });
    });
    g.finish();
}

/// `n` Codec 8 Extended packets of `k` records each: a fix and the IO elements of a typical
/// FMB configuration.
fn teltonika_packets(n: usize, k: usize) -> Vec<Vec<u8>> {
    use nom_teltonika::encoder::{encode_avl_frame, AvlRecordFields};
    use nom_teltonika::protocol::{AvlCodec, AvlTimestamp, GpsElement, IoId, Priority};
    let io_u8 =
        [(IoId::from(239), 1u8), (IoId::from(240), 1u8), (IoId::from(21), 4u8), (IoId::from(69), 1u8)];
    let io_u16 = [(IoId::from(66), 13_800u16), (IoId::from(67), 4_100u16), (IoId::from(24), 50u16)];
    let io_u32 = [(IoId::from(16), 1_234_567u32), (IoId::from(199), 1_200u32)];
    (0..n)
        .map(|i| {
            let records: Vec<AvlRecordFields<'_>> = (0..k)
                .map(|j| {
                    let step = (i * k + j) as i32;
                    let gps = GpsElement {
                        longitude_raw: 102_000_000 + step * 10,
                        latitude_raw: 561_000_000,
                        altitude_meters: 40,
                        angle_degrees: 90,
                        satellites: 10,
                        speed_kph: 50,
                    };
                    let ts = 1_795_640_400_000 + (i * k + j) as u64 * 1000;
                    AvlRecordFields::new(AvlTimestamp::from(ts), Priority::Low, gps)
                        .with_io_u8(&io_u8)
                        .with_io_u16(&io_u16)
                        .with_io_u32(&io_u32)
                })
                .collect();
            encode_avl_frame(AvlCodec::Codec8Extended, &records).expect("a bench packet encodes")
        })
        .collect()
}

criterion_group! {
    name = stages;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(stages);
