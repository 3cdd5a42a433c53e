#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    StructArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, TimeUnit};
use fleetpipe_processors::{Body, Diagnostic, Dtc, Frame, Location, Lsn, Micros};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fleetpipe_pipeline::driver::{spawn, DriverConfig, LogAccess};
use fleetpipe_pipeline::{NotDurable, Sink, SinkError};
use fleetpipe_processors::Batch;
use fleetpipe_sinks::parquet::{
    self as parquet_sink, diagnostic_schema, location_schema, ParquetConfig, ParquetSink,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::reader::{FileReader, SerializedFileReader};

/// 2026-11-25T00:00:00Z in microseconds.
const DAY_2026_11_25: Micros = 1_795_564_800_000_000;
const HOUR: Micros = 3_600_000_000;
const MINUTE: Micros = 60_000_000;

fn loc(vehicle: &str, ts: Micros, seq: u64, body: Location) -> Frame {
    Frame { vehicle_id: vehicle.to_string(), ts, seq, received_at: ts + 1_500, body: Body::Location(body) }
}

fn diag(vehicle: &str, ts: Micros, seq: u64, body: Diagnostic) -> Frame {
    Frame {
        vehicle_id: vehicle.to_string(),
        ts,
        seq,
        received_at: ts + 2_500,
        body: Body::Diagnostic(Box::new(body)),
    }
}

fn batch(lsn: Lsn, frames: Vec<Frame>) -> Batch {
    Batch { lsn, frames, ..Batch::default() }
}

fn config() -> ParquetConfig {
    ParquetConfig { roll_secs: 3600.0, ..ParquetConfig::default() }
}

fn open(cfg: ParquetConfig, root: &Path) -> ParquetSink {
    parquet_sink::open(&cfg, root).unwrap()
}

/// Every file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

fn data_files(root: &Path) -> Vec<String> {
    files(root).into_iter().filter(|f| !f.starts_with("_fleetpipe")).collect()
}

fn read(path: &Path) -> Vec<RecordBatch> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    builder.build().unwrap().map(|b| b.unwrap()).collect()
}

fn read_one(path: &Path) -> RecordBatch {
    let batches = read(path);
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn f64s(b: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    b.column_by_name(name).unwrap().as_any().downcast_ref::<Float64Array>().unwrap().iter().collect()
}

fn strs(b: &RecordBatch, name: &str) -> Vec<Option<String>> {
    b.column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap()
        .iter()
        .map(|s| s.map(str::to_string))
        .collect()
}

fn i64s(b: &RecordBatch, name: &str) -> Vec<Option<i64>> {
    b.column_by_name(name).unwrap().as_any().downcast_ref::<Int64Array>().unwrap().iter().collect()
}

fn bools(b: &RecordBatch, name: &str) -> Vec<Option<bool>> {
    b.column_by_name(name).unwrap().as_any().downcast_ref::<BooleanArray>().unwrap().iter().collect()
}

fn timestamps(b: &RecordBatch, name: &str) -> Vec<i64> {
    let col = b.column_by_name(name).unwrap().as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap();
    assert_eq!(col.timezone(), Some("UTC"));
    assert_eq!(col.null_count(), 0);
    col.values().to_vec()
}

fn checkpoint(root: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(root.join("_fleetpipe/parquet/checkpoint.json")).unwrap()).unwrap()
}

const LOC_22: &str = "locations/date=2026-11-25/hour=22/part-0000000001-0000.parquet";
const LOC_00: &str = "locations/date=2026-11-26/hour=00/part-0000000001-0000.parquet";
const DIAG_22: &str = "diagnostics/date=2026-11-25/hour=22/part-0000000001-0000.parquet";
const DIAG_23: &str = "diagnostics/date=2026-11-25/hour=23/part-0000000001-0000.parquet";
const DIAG_00: &str = "diagnostics/date=2026-11-26/hour=00/part-0000000001-0000.parquet";

fn full_location() -> Location {
    Location {
        lat: 56.102139,
        lon: 10.213695,
        speed_kmh: Some(33.8),
        heading_deg: Some(273.0),
        alt_m: Some(38.5),
        accuracy_m: Some(3.2),
        satellites: Some(9),
        odometer_m: Some(123_456.0),
        ignition: Some(true),
    }
}

fn full_diagnostic() -> Diagnostic {
    Diagnostic {
        engine_rpm: Some(2150.0),
        coolant_temp_c: Some(88.0),
        engine_load_pct: Some(41.5),
        fuel_level_pct: Some(61.5),
        battery_soc_pct: Some(99.0),
        battery_v: Some(14.2),
        engine_hours: Some(1234.5),
        odometer_m: Some(98_765.0),
        mil_on: Some(false),
        dtcs: Some(vec![
            Dtc::Obd("P0301".to_string()),
            Dtc::J1939 { spn: 110, fmi: 0, oc: 3, sa: 0 },
            Dtc::Obd("U0100-87".to_string()),
        ]),
        signals: Some(r#"{"Vehicle.Cabin.Door.Row1.IsOpen":true,"Vehicle.X":1.5}"#.to_string()),
    }
}

#[test]
fn frames_of_both_kinds_across_two_hours_and_a_date_boundary_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut sink = open(config(), root);
    assert_eq!(sink.durable_lsn(), 0);

    let t22 = DAY_2026_11_25 + 22 * HOUR + 10 * MINUTE;
    let t22_last = DAY_2026_11_25 + 23 * HOUR - 1; // 22:59:59.999999
    let t23 = DAY_2026_11_25 + 23 * HOUR;
    let t00 = DAY_2026_11_25 + 24 * HOUR + 1; // 2026-11-26T00:00:00.000001
    sink.write(&batch(
        3,
        vec![
            loc("WVWZZZ1JZXW000001", t22, 1017, full_location()),
            diag("WVWZZZ1JZXW000001", t22 + MINUTE, 1018, full_diagnostic()),
            diag("V2", t23, 0, Diagnostic::default()),
        ],
    ))
    .unwrap();
    sink.write(&batch(
        7,
        vec![
            loc("V2", t22_last, 0, Location { lat: -33.8688, lon: 151.2093, ..Location::default() }),
            loc(
                "V1",
                t00,
                u64::from(u32::MAX) + 7,
                Location {
                    lat: 0.1,
                    lon: -0.1,
                    satellites: Some(0),
                    speed_kmh: Some(0.0),
                    ignition: Some(false),
                    ..Location::default()
                },
            ),
            diag(
                "V3",
                t00 + 30 * MINUTE,
                5,
                Diagnostic { dtcs: Some(vec![]), signals: Some("{}".to_string()), ..Diagnostic::default() },
            ),
        ],
    ))
    .unwrap();
    // Nothing is visible before the roll.
    assert!(data_files(root).iter().all(|f| f.ends_with(".tmp")));
    assert_eq!(sink.open_files(), 5);
    sink.write(&batch(8, vec![])).unwrap();
    assert_eq!(sink.durable_lsn(), 0, "files are open: lsn 8 is not durable yet");
    sink.flush().unwrap();
    assert_eq!(sink.durable_lsn(), 8);

    let mut expected_files: Vec<String> =
        [DIAG_22, DIAG_23, DIAG_00, LOC_22, LOC_00].iter().map(|f| f.to_string()).collect();
    expected_files.sort();
    assert_eq!(data_files(root), expected_files);
    assert_eq!(checkpoint(root), serde_json::json!({"lsn": 8, "generation": 1}));

    // Locations, 22:00 partition: two batches appended to one file, in order.
    let b = read_one(&root.join(LOC_22));
    let fields: Vec<Field> = b.schema().fields().iter().map(|f| (**f).clone()).collect();
    let expected: Vec<Field> = location_schema().fields().iter().map(|f| (**f).clone()).collect();
    assert_eq!(fields, expected);
    assert_eq!(
        b.schema().field_with_name("ts").unwrap().data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    assert_eq!(b.num_rows(), 2);
    assert_eq!(strs(&b, "vehicle_id"), vec![Some("WVWZZZ1JZXW000001".into()), Some("V2".into())]);
    assert_eq!(timestamps(&b, "ts"), vec![t22, t22_last]);
    assert_eq!(timestamps(&b, "received_at"), vec![t22 + 1_500, t22_last + 1_500]);
    assert_eq!(i64s(&b, "seq"), vec![Some(1017), Some(0)]);
    assert_eq!(f64s(&b, "lat"), vec![Some(56.102139), Some(-33.8688)]);
    assert_eq!(f64s(&b, "lon"), vec![Some(10.213695), Some(151.2093)]);
    assert_eq!(f64s(&b, "speed_kmh"), vec![Some(33.8), None]);
    assert_eq!(f64s(&b, "heading_deg"), vec![Some(273.0), None]);
    assert_eq!(f64s(&b, "alt_m"), vec![Some(38.5), None]);
    assert_eq!(f64s(&b, "accuracy_m"), vec![Some(3.2), None]);
    assert_eq!(i64s(&b, "satellites"), vec![Some(9), None]);
    assert_eq!(f64s(&b, "odometer_m"), vec![Some(123_456.0), None]);
    assert_eq!(bools(&b, "ignition"), vec![Some(true), None]);

    // Locations, next day: zeros stay zeros (not NULL), absent stays NULL.
    let b = read_one(&root.join(LOC_00));
    assert_eq!(timestamps(&b, "ts"), vec![t00]);
    assert_eq!(i64s(&b, "seq"), vec![Some(i64::from(u32::MAX) + 7)]);
    assert_eq!(i64s(&b, "satellites"), vec![Some(0)]);
    assert_eq!(f64s(&b, "speed_kmh"), vec![Some(0.0)]);
    assert_eq!(f64s(&b, "heading_deg"), vec![None]);
    assert_eq!(bools(&b, "ignition"), vec![Some(false)]);

    // Diagnostics with every field.
    let b = read_one(&root.join(DIAG_22));
    let fields: Vec<Field> = b.schema().fields().iter().map(|f| (**f).clone()).collect();
    let expected: Vec<Field> = diagnostic_schema().fields().iter().map(|f| (**f).clone()).collect();
    assert_eq!(fields, expected);
    assert_eq!(b.num_rows(), 1);
    assert_eq!(timestamps(&b, "ts"), vec![t22 + MINUTE]);
    assert_eq!(timestamps(&b, "received_at"), vec![t22 + MINUTE + 2_500]);
    assert_eq!(i64s(&b, "seq"), vec![Some(1018)]);
    assert_eq!(f64s(&b, "engine_rpm"), vec![Some(2150.0)]);
    assert_eq!(f64s(&b, "coolant_temp_c"), vec![Some(88.0)]);
    assert_eq!(f64s(&b, "engine_load_pct"), vec![Some(41.5)]);
    assert_eq!(f64s(&b, "fuel_level_pct"), vec![Some(61.5)]);
    assert_eq!(f64s(&b, "battery_soc_pct"), vec![Some(99.0)]);
    assert_eq!(f64s(&b, "battery_v"), vec![Some(14.2)]);
    assert_eq!(f64s(&b, "engine_hours"), vec![Some(1234.5)]);
    assert_eq!(f64s(&b, "odometer_m"), vec![Some(98_765.0)]);
    assert_eq!(bools(&b, "mil_on"), vec![Some(false)]);
    assert_eq!(
        strs(&b, "signals"),
        vec![Some(r#"{"Vehicle.Cabin.Door.Row1.IsOpen":true,"Vehicle.X":1.5}"#.to_string())]
    );
    let dtcs = b.column_by_name("dtcs").unwrap().as_list::<i32>();
    assert!(dtcs.is_valid(0));
    let items = dtcs.value(0);
    let items = items.as_any().downcast_ref::<StructArray>().unwrap();
    assert_eq!(items.len(), 3);
    let code: Vec<Option<&str>> = items.column_by_name("code").unwrap().as_string::<i32>().iter().collect();
    assert_eq!(code, vec![Some("P0301"), None, Some("U0100-87")]);
    let spn: Vec<Option<i64>> =
        items.column_by_name("spn").unwrap().as_any().downcast_ref::<Int64Array>().unwrap().iter().collect();
    assert_eq!(spn, vec![None, Some(110), None]);
    for (member, want) in [("fmi", Some(0)), ("oc", Some(3)), ("sa", Some(0))] {
        let got: Vec<Option<i32>> = items
            .column_by_name(member)
            .unwrap()
            .as_any()
            .downcast_ref::<Int32Array>()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(got, vec![None, want, None], "{member}");
    }

    // Diagnostics with nothing: every optional column NULL, dtcs NULL (not empty).
    let b = read_one(&root.join(DIAG_23));
    assert_eq!(strs(&b, "vehicle_id"), vec![Some("V2".into())]);
    assert_eq!(i64s(&b, "seq"), vec![Some(0)]);
    for name in [
        "engine_rpm",
        "coolant_temp_c",
        "engine_load_pct",
        "fuel_level_pct",
        "battery_soc_pct",
        "battery_v",
        "engine_hours",
        "odometer_m",
    ] {
        assert_eq!(f64s(&b, name), vec![None], "{name}");
    }
    assert_eq!(bools(&b, "mil_on"), vec![None]);
    assert!(b.column_by_name("dtcs").unwrap().is_null(0));
    assert_eq!(strs(&b, "signals"), vec![None]);

    // An explicit empty dtcs list stays an empty list.
    let b = read_one(&root.join(DIAG_00));
    let dtcs = b.column_by_name("dtcs").unwrap().as_list::<i32>();
    assert!(dtcs.is_valid(0));
    assert_eq!(dtcs.value(0).len(), 0);
    assert_eq!(strs(&b, "signals"), vec![Some("{}".to_string())]);

    // ZSTD, and the footer says TIMESTAMP(MICROS, UTC) for Parquet-only readers.
    let reader = SerializedFileReader::new(File::open(root.join(LOC_22)).unwrap()).unwrap();
    let meta = reader.metadata();
    assert!(matches!(meta.row_group(0).column(0).compression(), Compression::ZSTD(_)));
    let ts = meta.file_metadata().schema_descr().column(1);
    assert_eq!(ts.name(), "ts");
    let logical = format!("{:?}", ts.logical_type_ref());
    assert!(logical.contains("is_adjusted_to_u_t_c: true"), "{logical}");
    assert!(logical.contains("MICROS"), "{logical}");

    // A dictionary only where values repeat (vehicle ids, satellites); positions and times plain.
    let rg = meta.row_group(0);
    let dictionary: Vec<(String, bool)> = (0..rg.num_columns())
        .map(|i| (rg.column(i).column_path().string(), rg.column(i).dictionary_page_offset().is_some()))
        .collect();
    let with: Vec<&str> = dictionary.iter().filter(|(_, d)| *d).map(|(c, _)| c.as_str()).collect();
    assert_eq!(with, ["vehicle_id", "satellites"], "{dictionary:?}");
}

#[test]
fn files_become_visible_only_at_a_roll_and_tmp_names_escape_parquet_globs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut sink = open(config(), root);
    let t = DAY_2026_11_25 + 22 * HOUR;
    sink.write(&batch(1, vec![loc("V1", t, 1, full_location())])).unwrap();
    let open = data_files(root);
    assert_eq!(open, vec!["locations/date=2026-11-25/hour=22/.part-0000000001-0000.parquet.tmp".to_string()]);
    assert!(open.iter().all(|f| !f.ends_with(".parquet")));
    sink.tick(Instant::now()).unwrap();
    assert_eq!(sink.durable_lsn(), 0, "not due yet");
    sink.tick(Instant::now() + Duration::from_secs(3600)).unwrap();
    assert_eq!(sink.durable_lsn(), 1);
    assert_eq!(data_files(root), vec![LOC_22.to_string()]);
}

#[test]
fn a_crash_after_a_roll_keeps_exactly_the_committed_files_and_the_wal_replays_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let t = DAY_2026_11_25 + 22 * HOUR;
    let later = Instant::now() + Duration::from_secs(7200);
    {
        let mut sink = open(config(), root);
        sink.write(&batch(1, vec![loc("V1", t, 1, full_location())])).unwrap();
        sink.write(&batch(2, vec![diag("V1", t, 2, full_diagnostic())])).unwrap();
        sink.tick(later).unwrap();
        assert_eq!(sink.durable_lsn(), 2);
        // More batches after the roll: into generation 2, never committed.
        sink.write(&batch(3, vec![loc("V1", t + 1, 3, full_location())])).unwrap();
        sink.write(&batch(4, vec![loc("V1", t + 2 * HOUR, 4, full_location())])).unwrap();
        assert_eq!(sink.durable_lsn(), 2);
        assert_eq!(data_files(root).iter().filter(|f| f.ends_with(".tmp")).count(), 2);
        // kill -9: the sink is dropped without close.
    }
    let committed = vec![DIAG_22.to_string(), LOC_22.to_string()];
    assert_eq!(
        data_files(root).into_iter().filter(|f| f.ends_with(".parquet")).collect::<Vec<_>>(),
        committed
    );

    let mut sink = open(config(), root);
    assert_eq!(sink.durable_lsn(), 2);
    assert_eq!(sink.recovery().removed_tmp, 2);
    assert_eq!(sink.recovery().removed_uncommitted, 0);
    assert_eq!(data_files(root), committed, "no tmp files left");

    // The log replays from the position after the checkpoint (the driver never hands a sink a
    // batch it already holds: see pipeline/tests/driver.rs).
    sink.write(&batch(3, vec![loc("V1", t + 1, 3, full_location())])).unwrap();
    sink.write(&batch(4, vec![loc("V1", t + 2 * HOUR, 4, full_location())])).unwrap();
    sink.flush().unwrap();
    assert_eq!(sink.durable_lsn(), 4);
    assert_eq!(checkpoint(root), serde_json::json!({"lsn": 4, "generation": 2}));
    assert_eq!(
        data_files(root),
        vec![
            DIAG_22.to_string(),
            LOC_22.to_string(),
            "locations/date=2026-11-25/hour=22/part-0000000002-0000.parquet".to_string(),
            "locations/date=2026-11-26/hour=00/part-0000000002-0000.parquet".to_string(),
        ]
    );
    let diag_rows: usize = read(&root.join(DIAG_22)).iter().map(|b| b.num_rows()).sum();
    assert_eq!(diag_rows, 1, "the replayed batch 2 was not written twice");
    let seqs: Vec<Option<i64>> = [
        LOC_22,
        "locations/date=2026-11-25/hour=22/part-0000000002-0000.parquet",
        "locations/date=2026-11-26/hour=00/part-0000000002-0000.parquet",
    ]
    .iter()
    .flat_map(|f| i64s(&read_one(&root.join(f)), "seq"))
    .collect();
    assert_eq!(seqs, vec![Some(1), Some(3), Some(4)]);
}

#[test]
fn a_file_renamed_without_its_checkpoint_is_deleted_on_open_and_foreign_files_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let t = DAY_2026_11_25 + 22 * HOUR;
    {
        let mut sink = open(config(), root);
        sink.write(&batch(5, vec![loc("V1", t, 1, full_location())])).unwrap();
        sink.flush().unwrap();
        assert_eq!(sink.durable_lsn(), 5);
    }
    // A crash between the renames of generation 2 and its checkpoint.
    let part = root.join("locations/date=2026-11-25/hour=22");
    fs::copy(part.join("part-0000000001-0000.parquet"), part.join("part-0000000002-0000.parquet")).unwrap();
    let other_hour = root.join("locations/date=2026-11-25/hour=23");
    fs::create_dir_all(&other_hour).unwrap();
    fs::write(other_hour.join("part-0000000002-0001.parquet"), b"x").unwrap();
    fs::write(other_hour.join(".part-0000000002-0002.parquet.tmp"), b"x").unwrap();
    // Files that are not this sink's: kept.
    fs::write(part.join("README.txt"), b"hands off").unwrap();
    let dl = root.join("dead-letter/date=2026-11-25");
    fs::create_dir_all(&dl).unwrap();
    fs::write(dl.join(".part-0000000009-0000.ndjson.tmp"), b"{}").unwrap();
    fs::write(dl.join("part-0000000009-0000.ndjson"), b"{}").unwrap();

    let mut sink = open(config(), root);
    assert_eq!(sink.durable_lsn(), 5);
    assert_eq!(sink.recovery().removed_uncommitted, 2);
    assert_eq!(sink.recovery().removed_tmp, 1);
    assert_eq!(
        data_files(root),
        vec![
            "dead-letter/date=2026-11-25/.part-0000000009-0000.ndjson.tmp".to_string(),
            "dead-letter/date=2026-11-25/part-0000000009-0000.ndjson".to_string(),
            "locations/date=2026-11-25/hour=22/README.txt".to_string(),
            LOC_22.to_string(),
        ]
    );
    // The next generation reuses number 2 for the replayed data.
    sink.write(&batch(6, vec![loc("V1", t + 1, 2, full_location())])).unwrap();
    sink.flush().unwrap();
    assert!(part.join("part-0000000002-0000.parquet").exists());
    assert_eq!(checkpoint(root), serde_json::json!({"lsn": 6, "generation": 2}));
}

#[test]
fn batches_without_frames_advance_the_durable_lsn_only_when_no_file_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let t = DAY_2026_11_25 + 22 * HOUR;
    let mut sink = open(config(), root);
    sink.write(&batch(3, vec![])).unwrap();
    assert_eq!(sink.durable_lsn(), 3, "nothing to write: durable at once");
    sink.write(&batch(4, vec![loc("V1", t, 1, full_location())])).unwrap();
    sink.write(&batch(5, vec![])).unwrap();
    assert_eq!(sink.durable_lsn(), 3);
    sink.tick(Instant::now() + Duration::from_secs(3600)).unwrap();
    assert_eq!(sink.durable_lsn(), 5);
    sink.write(&batch(9, vec![])).unwrap();
    assert_eq!(sink.durable_lsn(), 9);
    assert_eq!(checkpoint(root)["lsn"], 5);
    // The in-memory advance is persisted at the next due tick, without a new file.
    sink.tick(Instant::now() + Duration::from_secs(7200)).unwrap();
    assert_eq!(checkpoint(root)["lsn"], 9);
    assert_eq!(data_files(root), vec![LOC_22.to_string()]);
    drop(sink);
    let sink = open(config(), root);
    assert_eq!(sink.durable_lsn(), 9);
}

#[test]
fn a_file_reaching_max_file_rows_rolls_at_the_next_tick_with_the_configured_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let t = DAY_2026_11_25 + 22 * HOUR;
    let mut sink = open(ParquetConfig { max_file_rows: 5, row_group_rows: 2, ..config() }, root);
    let frames = |from: u64, n: u64| {
        (from..from + n).map(|i| loc("V1", t + i as i64, i, full_location())).collect::<Vec<_>>()
    };
    sink.write(&batch(1, frames(0, 3))).unwrap();
    sink.tick(Instant::now()).unwrap();
    assert_eq!(sink.durable_lsn(), 0);
    sink.write(&batch(2, frames(3, 2))).unwrap();
    sink.tick(Instant::now()).unwrap();
    assert_eq!(sink.durable_lsn(), 2);
    let reader = SerializedFileReader::new(File::open(root.join(LOC_22)).unwrap()).unwrap();
    assert_eq!(reader.metadata().num_row_groups(), 3);
    assert_eq!(reader.metadata().file_metadata().num_rows(), 5);
    assert_eq!(i64s(&read_one(&root.join(LOC_22)), "seq"), (0..5).map(Some).collect::<Vec<_>>());
}

#[test]
fn a_wide_backfill_is_split_into_several_generations_instead_of_holding_every_partition_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut sink = open(config(), root);
    let max = fleetpipe_sinks::parquet::MAX_OPEN_FILES as i64;
    let t0 = DAY_2026_11_25 - 1000 * 24 * HOUR; // a backfill years ago
    for i in 0..max + 10 {
        let lsn = (i + 1) as u64;
        sink.write(&batch(lsn, vec![loc("V1", t0 + i * HOUR, 1, full_location())])).unwrap();
        assert!(sink.open_files() <= max as usize);
    }
    assert_eq!(sink.durable_lsn(), max as u64);
    sink.flush().unwrap();
    let parquet: Vec<PathBuf> =
        data_files(root).into_iter().filter(|f| f.ends_with(".parquet")).map(PathBuf::from).collect();
    assert_eq!(parquet.len(), (max + 10) as usize);
    assert!(parquet[0].starts_with("locations/date=2024-02-29/hour=00"));
}

#[test]
fn an_invalid_zstd_level_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let err = parquet_sink::open(&ParquetConfig { zstd_level: 99, ..config() }, dir.path()).unwrap_err();
    assert!(err.to_string().contains("parquet"), "{err}");
}

/// A log with nothing to replay or keep, for a sink under the driver.
struct NoLog;

impl LogAccess for NoLog {
    fn replay(
        &self,
        _: Lsn,
        _: Lsn,
        _: &mut dyn FnMut(Batch) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        Ok(())
    }
    fn keep(&self, _: Vec<fleetpipe_processors::Rejection>) -> Result<(), NotDurable> {
        Err(NotDurable::ShuttingDown)
    }
}

#[test]
fn the_parquet_sink_runs_under_the_driver_and_commits_on_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let sink = open(ParquetConfig::default(), dir.path());
    let log = Arc::new(NoLog);
    let cfg = DriverConfig { queue: 8, tick: Duration::from_millis(10), flush_every: None };
    let (handle, tx) = spawn(Box::new(sink), cfg, log);
    let ts = 1_795_640_400_250_000;
    for lsn in 1..=5u64 {
        assert!(tx.offer(&Arc::new(Batch {
            lsn,
            frames: vec![Frame {
                vehicle_id: "V1".into(),
                ts: ts + lsn as i64,
                seq: lsn,
                received_at: ts,
                body: Body::Location(Location { lat: 1.0, lon: 2.0, ..Location::default() }),
            }],
            ..Batch::default()
        })));
    }
    drop(tx);
    let durable = Arc::clone(&handle.durable);
    handle.join().unwrap();
    assert_eq!(durable.load(Ordering::Acquire), 5);
    let file = dir.path().join("locations/date=2026-11-25/hour=21/part-0000000001-0000.parquet");
    assert!(file.exists());
    let reopened = open(ParquetConfig::default(), dir.path());
    assert_eq!(reopened.durable_lsn(), 5);
}
