//! The Postgres sink against a real server (`FLEETPIPE_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`). Each test works in its own schema, created by
//! the sink's migrations and dropped at the end, so tests run side by side and leave nothing.

#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use fleetpipe_pipeline::wal::WalConfig;
use fleetpipe_pipeline::{Entry, Pipeline, PipelineConfig, Sink, SinkError, Submission};
use fleetpipe_processors::codec::encode_json;
use fleetpipe_processors::Batch;
use fleetpipe_processors::{Body, Diagnostic, Dtc, Frame, Location, Lsn, Micros};
use fleetpipe_sinks::dead_letter::{self, read_dead_letters, DeadLetterConfig};
use fleetpipe_sinks::postgres::{self, PostgresConfig, PostgresSink};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio_postgres::{Client, NoTls, Row};

/// 2026-11-25T00:00:00Z in microseconds.
const DAY_2026_11_25: Micros = 1_795_564_800_000_000;
const HOUR: Micros = 3_600_000_000;
const DAY: Micros = 24 * HOUR;

fn base_url() -> String {
    std::env::var("FLEETPIPE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A schema of its own and a client to inspect it; the schema is dropped on drop.
struct Db {
    rt: Runtime,
    client: Client,
    schema: String,
    dir: tempfile::TempDir,
}

impl Db {
    fn new() -> Db {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let schema = format!("fp_test_{}_{nanos}", std::process::id());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (client, connection) = rt.block_on(tokio_postgres::connect(&base_url(), NoTls)).unwrap();
        rt.spawn(connection);
        Db { rt, client, schema, dir: tempfile::tempdir().unwrap() }
    }

    /// The sink's URL, tagged with the schema as `application_name` so that a test can find
    /// (and kill) the sink's backend.
    fn url(&self) -> String {
        let sep = if base_url().contains('?') { '&' } else { '?' };
        format!("{}{sep}application_name={}", base_url(), self.schema)
    }

    fn config(&self) -> PostgresConfig {
        PostgresConfig { schema: self.schema.clone(), ..PostgresConfig::new(self.url()) }
    }

    fn open(&self) -> PostgresSink {
        postgres::open(&self.config()).unwrap()
    }

    /// `sql` with `{s}` replaced by the schema.
    fn query(&self, sql: &str) -> Vec<Row> {
        self.rt.block_on(self.client.query(&sql.replace("{s}", &self.schema), &[])).unwrap()
    }

    fn count(&self, table: &str) -> i64 {
        self.query(&format!("SELECT count(*) FROM {{s}}.{table}"))[0].get(0)
    }

    fn checkpoint(&self) -> Option<i64> {
        self.query("SELECT lsn FROM {s}.fleetpipe_checkpoints WHERE sink = 'postgres'")
            .first()
            .map(|r| r.get(0))
    }

    /// `(vehicle_id, seq, partition)` of every row of `table`, by ts.
    fn partitions(&self, table: &str) -> Vec<(String, i64, String)> {
        self.query(&format!(
            "SELECT vehicle_id, seq, tableoid::regclass::text FROM {{s}}.{table} ORDER BY ts, seq"
        ))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get::<_, String>(2).rsplit('.').next().unwrap().to_string()))
        .collect()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        let _ = self.rt.block_on(self.client.batch_execute(&sql));
    }
}

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

fn point(lat: f64, lon: f64) -> Location {
    Location { lat, lon, ..Location::default() }
}

fn full_location() -> Location {
    Location {
        lat: 56.102139,
        lon: 10.213695,
        speed_kmh: Some(33.8),
        heading_deg: Some(273.0),
        alt_m: Some(-38.5),
        accuracy_m: Some(3.2),
        satellites: Some(9),
        odometer_m: Some(123_456.789),
        ignition: Some(false),
    }
}

fn full_diagnostic() -> Diagnostic {
    Diagnostic {
        engine_rpm: Some(2150.0),
        coolant_temp_c: Some(-12.25),
        engine_load_pct: Some(41.5),
        fuel_level_pct: Some(61.5),
        battery_soc_pct: Some(99.0),
        battery_v: Some(14.2),
        engine_hours: Some(1e308),
        odometer_m: Some(0.1 + 0.2),
        mil_on: Some(true),
        dtcs: Some(vec![
            Dtc::Obd("P0301".into()),
            Dtc::Obd("U0100-87".into()),
            Dtc::J1939 { spn: 524_287, fmi: 31, oc: 126, sa: 255 },
        ]),
        signals: Some(
            r#"{"Vehicle.Cabin.Door.Row1.IsOpen":false,"Vehicle.Name":"van \"7\"","Vehicle.Speed":12.5}"#
                .into(),
        ),
    }
}

/// `ts` and `received_at` as Unix microseconds, exactly.
const TIMES: &str =
    "(extract(epoch FROM ts) * 1000000)::bigint, (extract(epoch FROM received_at) * 1000000)::bigint";

fn f64_bits(row: &Row, i: usize) -> Option<u64> {
    row.get::<_, Option<f64>>(i).map(f64::to_bits)
}

#[test]
fn every_location_and_diagnostic_value_round_trips_exactly_and_absent_values_stay_null() {
    let db = Db::new();
    let mut sink = db.open();
    assert_eq!(sink.name(), "postgres");
    let t = DAY_2026_11_25 + 21 * HOUR + 250_123;
    let locations =
        [loc("VAN-1", t, 1017, full_location()), loc("VAN-2", t + 1, 0, point(-89.999999, 179.5))];
    let diagnostics = [
        diag("VAN-1", t, 1018, full_diagnostic()),
        diag("VAN-2", t + 2, 3, Diagnostic::default()),
        diag(
            "VAN-3",
            t + 3,
            4,
            Diagnostic { dtcs: Some(vec![]), signals: Some("{}".into()), ..Diagnostic::default() },
        ),
    ];
    let frames: Vec<Frame> = locations.iter().chain(&diagnostics).cloned().collect();
    sink.write(&batch(3, frames)).unwrap();
    assert_eq!(sink.durable_lsn(), 3);

    let rows = db.query(&format!(
        "SELECT vehicle_id, {TIMES}, seq, lat, lon, speed_kmh, heading_deg, alt_m, accuracy_m, satellites,
                odometer_m, ignition
           FROM {{s}}.locations ORDER BY vehicle_id"
    ));
    assert_eq!(rows.len(), locations.len());
    for (row, frame) in rows.iter().zip(&locations) {
        let Body::Location(l) = &frame.body else { unreachable!() };
        assert_eq!(row.get::<_, String>(0), frame.vehicle_id);
        assert_eq!(row.get::<_, i64>(1), frame.ts);
        assert_eq!(row.get::<_, i64>(2), frame.received_at);
        assert_eq!(row.get::<_, i64>(3), frame.seq as i64);
        assert_eq!(row.get::<_, f64>(4).to_bits(), l.lat.to_bits());
        assert_eq!(row.get::<_, f64>(5).to_bits(), l.lon.to_bits());
        assert_eq!(f64_bits(row, 6), l.speed_kmh.map(f64::to_bits));
        assert_eq!(f64_bits(row, 7), l.heading_deg.map(f64::to_bits));
        assert_eq!(f64_bits(row, 8), l.alt_m.map(f64::to_bits));
        assert_eq!(f64_bits(row, 9), l.accuracy_m.map(f64::to_bits));
        assert_eq!(row.get::<_, Option<i32>>(10), l.satellites.map(|n| n as i32));
        assert_eq!(f64_bits(row, 11), l.odometer_m.map(f64::to_bits));
        assert_eq!(row.get::<_, Option<bool>>(12), l.ignition);
    }

    let rows = db.query(&format!(
        "SELECT vehicle_id, {TIMES}, seq, engine_rpm, coolant_temp_c, engine_load_pct, fuel_level_pct,
                battery_soc_pct, battery_v, engine_hours, odometer_m, mil_on, dtcs, signals
           FROM {{s}}.diagnostics ORDER BY vehicle_id"
    ));
    assert_eq!(rows.len(), diagnostics.len());
    for (row, frame) in rows.iter().zip(&diagnostics) {
        let Body::Diagnostic(d) = &frame.body else { unreachable!() };
        assert_eq!(row.get::<_, String>(0), frame.vehicle_id);
        assert_eq!(row.get::<_, i64>(1), frame.ts);
        assert_eq!(row.get::<_, i64>(2), frame.received_at);
        assert_eq!(row.get::<_, i64>(3), frame.seq as i64);
        let measures = [
            d.engine_rpm,
            d.coolant_temp_c,
            d.engine_load_pct,
            d.fuel_level_pct,
            d.battery_soc_pct,
            d.battery_v,
            d.engine_hours,
            d.odometer_m,
        ];
        for (i, m) in measures.iter().enumerate() {
            assert_eq!(f64_bits(row, 4 + i), m.map(f64::to_bits), "column {i} of {}", frame.vehicle_id);
        }
        assert_eq!(row.get::<_, Option<bool>>(12), d.mil_on);
        let dtcs = d.dtcs.as_ref().map(|list| {
            list.iter()
                .map(|dtc| match dtc {
                    Dtc::Obd(code) => json!(code),
                    Dtc::J1939 { spn, fmi, oc, sa } => json!({"spn": spn, "fmi": fmi, "oc": oc, "sa": sa}),
                })
                .collect::<serde_json::Value>()
        });
        assert_eq!(row.get::<_, Option<serde_json::Value>>(13), dtcs);
        let signals = d.signals.as_ref().map(|s| serde_json::from_str::<serde_json::Value>(s).unwrap());
        assert_eq!(row.get::<_, Option<serde_json::Value>>(14), signals);
    }
    // The full diagnostic's dtcs in the contract's JSON form, spelled out.
    let dtcs: serde_json::Value =
        db.query("SELECT dtcs FROM {s}.diagnostics WHERE vehicle_id = 'VAN-1'")[0].get(0);
    assert_eq!(dtcs, json!(["P0301", "U0100-87", {"spn": 524_287, "fmi": 31, "oc": 126, "sa": 255}]));
}

#[test]
fn writing_the_same_frames_twice_or_an_overlapping_batch_stores_each_row_once_and_moves_the_checkpoint() {
    let db = Db::new();
    let mut sink = db.open();
    let t = DAY_2026_11_25 + 10 * HOUR;
    let a = loc("V1", t, 1, point(1.0, 1.0));
    let b = diag("V1", t, 2, full_diagnostic());
    let c = loc("V1", t + 1_000_000, 3, point(1.0, 2.0));
    sink.write(&batch(5, vec![a.clone(), b.clone()])).unwrap();
    assert_eq!((db.count("locations"), db.count("diagnostics"), db.checkpoint()), (1, 1, Some(5)));

    // The same frames again under a later lsn (a redelivery the de-duplication window missed).
    sink.write(&batch(6, vec![a.clone(), b.clone()])).unwrap();
    assert_eq!((db.count("locations"), db.count("diagnostics"), db.checkpoint()), (1, 1, Some(6)));
    assert_eq!(sink.durable_lsn(), 6);

    // Overlapping: one old row, one new, and a duplicate inside the batch itself.
    sink.write(&batch(7, vec![b.clone(), c.clone(), c.clone()])).unwrap();
    assert_eq!((db.count("locations"), db.count("diagnostics"), db.checkpoint()), (2, 1, Some(7)));

    // A batch at or below the checkpoint (a replay) is skipped without touching Postgres.
    sink.write(&batch(7, vec![loc("V9", t, 1, point(3.0, 3.0))])).unwrap();
    assert_eq!((db.count("locations"), db.checkpoint()), (2, Some(7)));

    // A sink whose checkpoint is behind (a lost commit acknowledgement) replays without doubling.
    db.query("UPDATE {s}.fleetpipe_checkpoints SET lsn = 4");
    let mut reopened = db.open();
    assert_eq!(reopened.durable_lsn(), 4);
    reopened.write(&batch(5, vec![a, b])).unwrap();
    reopened.write(&batch(7, vec![c])).unwrap();
    assert_eq!((db.count("locations"), db.count("diagnostics"), db.checkpoint()), (2, 1, Some(7)));
}

#[test]
fn frames_either_side_of_midnight_utc_land_in_their_own_day_partitions() {
    let db = Db::new();
    let mut sink = db.open();
    let midnight = DAY_2026_11_25 + DAY;
    sink.write(&batch(
        1,
        vec![
            loc("V1", midnight - 1, 1, point(1.0, 1.0)),
            loc("V1", midnight, 2, point(1.0, 1.0)),
            diag("V1", midnight - 1, 3, Diagnostic::default()),
            diag("V1", midnight + DAY - 1, 4, Diagnostic::default()),
        ],
    ))
    .unwrap();
    assert_eq!(
        db.partitions("locations"),
        [("V1".into(), 1, "locations_20261125".into()), ("V1".into(), 2, "locations_20261126".into())]
    );
    assert_eq!(
        db.partitions("diagnostics"),
        [("V1".into(), 3, "diagnostics_20261125".into()), ("V1".into(), 4, "diagnostics_20261126".into())]
    );
    // The bounds are UTC midnights whatever the session's time zone.
    let bound: String = db.query(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = '{s}' AND c.relname = 'locations_20261126'",
    )[0]
    .get(0);
    assert!(bound.contains("2026-11-26") && bound.contains("2026-11-27"), "{bound}");
    let utc: bool = db.query(
        "SELECT count(*) = 1 FROM {s}.locations_20261126 WHERE ts = '2026-11-26 00:00:00+00'::timestamptz",
    )[0]
    .get(0);
    assert!(utc);
}

#[test]
fn a_frame_from_2019_gets_its_partition_created_and_stored() {
    let db = Db::new();
    let mut sink = db.open();
    // 2019-03-10T12:00:00Z.
    let ts = 1_552_219_200_000_000;
    sink.write(&batch(
        1,
        vec![loc("OLD", ts, 7, point(50.0, 8.0)), diag("OLD", ts, 8, Diagnostic::default())],
    ))
    .unwrap();
    assert_eq!(db.partitions("locations"), [("OLD".into(), 7, "locations_20190310".into())]);
    assert_eq!(db.partitions("diagnostics"), [("OLD".into(), 8, "diagnostics_20190310".into())]);
    // Year 1 and year 9999, the ends of what validation lets through, work too.
    let first = -62_135_596_800_000_000;
    let last = 253_402_300_799_999_999;
    sink.write(&batch(
        2,
        vec![loc("EDGE", first, 1, point(1.0, 1.0)), loc("EDGE", last, 2, point(1.0, 1.0))],
    ))
    .unwrap();
    let edges: Vec<String> = db.partitions("locations").into_iter().map(|p| p.2).collect();
    assert_eq!(edges, ["locations_00010101", "locations_20190310", "locations_99991231"]);
}

#[test]
fn partitions_exist_from_yesterday_to_the_days_ahead_and_retention_drops_older_days_only() {
    let db = Db::new();
    let mut sink = db.open();
    let today = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as Micros / DAY * DAY;
    let names = |db: &Db| -> Vec<String> {
        db.query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace
              WHERE n.nspname = '{s}' AND p.relname = 'locations' ORDER BY 1",
        )
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    // Yesterday, today and 3 days ahead.
    assert_eq!(names(&db).len(), 5);
    // Old data (a backfill) and the new day's data.
    sink.write(&batch(
        1,
        vec![loc("V", today - 40 * DAY, 1, point(1.0, 1.0)), loc("V", today, 2, point(1.0, 1.0))],
    ))
    .unwrap();
    assert_eq!(names(&db).len(), 6);
    drop(sink);

    let sink = postgres::open(&PostgresConfig { retention_days: Some(30), ..db.config() }).unwrap();
    assert_eq!(names(&db).len(), 5, "{:?}", names(&db));
    assert_eq!(db.count("locations"), 1);
    let leftover: i64 = db.query(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = '{s}' AND c.relkind = 'r' AND c.relname ~ '_[0-9]{8}$'",
    )[0]
    .get(0);
    assert_eq!(leftover, 20, "5 days of 4 tables, nothing detached left behind");
    drop(sink);
}

/// The frames of the poison test: twenty diagnostics of V1 with a row jsonb refuses at index
/// 6, a location whose `satellites` no integer column holds, and a good location.
fn poison_frames() -> (Vec<Frame>, Frame, Frame) {
    // jsonb refuses \u0000 in a string, which JSON (and so validation) allows.
    let nul_signals = fleetpipe_processors::validate::signals(r#"{"Vehicle.Name":"a\u0000b"}"#).unwrap();
    let t = DAY_2026_11_25 + 8 * HOUR;
    let mut frames: Vec<Frame> =
        (0..20).map(|i| diag("V1", t + i * 1_000_000, i as u64, full_diagnostic())).collect();
    let poison =
        diag("V1", t + 5_500_000, 99, Diagnostic { signals: Some(nul_signals), ..Diagnostic::default() });
    frames.insert(6, poison.clone());
    // An integer column cannot hold this (the encoder refuses it before sending).
    let too_many = loc("V2", t, 1, Location { satellites: Some(u32::MAX), ..point(1.0, 1.0) });
    frames.push(too_many.clone());
    frames.push(loc("V2", t, 2, point(1.0, 1.0)));
    (frames, poison, too_many)
}

#[test]
fn a_batch_with_rows_postgres_refuses_stores_nothing_and_names_them_for_the_driver() {
    let db = Db::new();
    let mut sink = db.open();
    let (frames, _, _) = poison_frames();
    sink.write(&batch(1, vec![frames[0].clone()])).unwrap();
    let at = |f: &[Frame], seq: u64, kind: fleetpipe_processors::Kind| {
        f.iter().position(|x| x.seq == seq && x.kind() == kind).unwrap()
    };
    // The encoder's refusal comes first, before anything is sent.
    let Err(SinkError::Poison(p)) = sink.write(&batch(2, frames.clone())) else { panic!("expected poison") };
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].index, at(&frames, 1, fleetpipe_processors::Kind::Location));
    assert!(p[0].detail.starts_with("22003"), "{p:?}");
    // Without it, Postgres' own refusal (found by bisection).
    let rest: Vec<Frame> =
        frames.iter().enumerate().filter(|(i, _)| *i != p[0].index).map(|(_, f)| f.clone()).collect();
    let Err(SinkError::Poison(p)) = sink.write(&batch(2, rest.clone())) else { panic!("expected poison") };
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].index, at(&rest, 99, fleetpipe_processors::Kind::Diagnostic));
    assert!(p[0].detail.starts_with("22P05 unsupported Unicode escape sequence"), "{p:?}");
    // Nothing of the batch was stored meanwhile.
    assert_eq!((db.count("diagnostics"), db.count("locations"), db.checkpoint()), (1, 0, Some(1)));
    assert_eq!(sink.durable_lsn(), 1);
}

#[test]
fn a_row_postgres_refuses_goes_to_the_dead_letter_store_with_its_error_while_the_rest_of_its_batch_commits() {
    let db = Db::new();
    let data = db.dir.path();
    let dl_root = dead_letter::root_under(data);
    let sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(db.open()),
        Box::new(dead_letter::open(&DeadLetterConfig::default(), &dl_root).unwrap()),
    ];
    let pcfg = PipelineConfig { shards: 1, ..PipelineConfig::default() };
    let pipeline = Pipeline::start(&pcfg, &WalConfig::default(), data, Vec::new(), sinks).unwrap();
    let submit = |frames: Vec<Frame>| {
        let (tx, rx) = std::sync::mpsc::channel();
        let done: fleetpipe_pipeline::Completion = Box::new(move |r| {
            let _ = tx.send(r);
        });
        let entry = Entry { received_at: frames[0].received_at, frames, ..Entry::default() };
        pipeline.intake.blocking_send(Submission { entry, done: Some(done) }).unwrap();
        rx.recv().unwrap().unwrap()
    };
    let (frames, poison, too_many) = poison_frames();
    // One row stored earlier: the bisection also goes through ON CONFLICT DO NOTHING.
    submit(vec![frames[0].clone()]);
    submit(frames);
    // The pipeline goes on.
    let last = submit(vec![loc("V2", DAY_2026_11_25 + 8 * HOUR, 3, point(1.0, 1.0))]);
    pipeline.join().unwrap();

    assert_eq!((db.count("diagnostics"), db.count("locations")), (20, 2));
    assert!(db.checkpoint().unwrap() >= last as i64, "every entry stored: {:?} < {last}", db.checkpoint());
    let lines = read_dead_letters(&dl_root).unwrap();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let by_seq = |seq: u64| {
        lines.iter().find(|l| {
            serde_json::from_str::<serde_json::Value>(l["raw"].as_str().unwrap()).unwrap()["seq"]
                == json!(seq)
        })
    };
    let jsonb = by_seq(99).unwrap();
    assert_eq!(jsonb["reason"], "out_of_range");
    assert_eq!(jsonb["source"], "postgres");
    let detail = jsonb["detail"].as_str().unwrap();
    assert!(detail.starts_with("postgres: 22P05 unsupported Unicode escape sequence"), "{detail}");
    let mut raw = Vec::new();
    encode_json(&poison, &mut raw);
    assert_eq!(jsonb["raw"].as_str().unwrap().as_bytes(), raw);
    let sats = by_seq(1).unwrap();
    assert!(sats["detail"].as_str().unwrap().starts_with("postgres: 22003 integer out of range"), "{sats}");
    let mut raw = Vec::new();
    encode_json(&too_many, &mut raw);
    assert_eq!(sats["raw"].as_str().unwrap().as_bytes(), raw);
}

#[test]
fn migrations_run_twice_and_from_two_threads_at_once_without_error() {
    let db = Db::new();
    let cfg = db.config();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let cfg = cfg.clone();
            std::thread::spawn(move || postgres::open(&cfg).map(|s| s.durable_lsn()))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), 0);
    }
    let mut again = db.open();
    again.write(&batch(1, vec![loc("V", DAY_2026_11_25, 1, point(1.0, 1.0))])).unwrap();
    let versions: Vec<i32> = db
        .query("SELECT version FROM {s}.fleetpipe_migrations ORDER BY 1")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2]);
}

#[test]
fn reopening_the_sink_returns_the_committed_checkpoint_as_durable_lsn() {
    let db = Db::new();
    let mut sink = db.open();
    assert_eq!(sink.durable_lsn(), 0);
    sink.write(&batch(41, vec![loc("V", DAY_2026_11_25, 1, point(1.0, 1.0))])).unwrap();
    // A batch without frames moves the checkpoint too.
    sink.write(&batch(42, Vec::new())).unwrap();
    sink.flush().unwrap();
    drop(sink);
    assert_eq!(db.open().durable_lsn(), 42);
}

#[test]
fn a_lost_connection_is_a_retryable_error_and_the_retried_batch_is_stored_once() {
    let db = Db::new();
    let mut sink = db.open();
    let terminated: i64 = db.query(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{}'",
        db.schema
    ))[0]
        .get(0);
    assert_eq!(terminated, 1);
    let b = batch(
        1,
        vec![loc("V", DAY_2026_11_25, 1, point(1.0, 1.0)), diag("V", DAY_2026_11_25, 1, full_diagnostic())],
    );
    let mut errors = Vec::new();
    for _ in 0..3 {
        match sink.write(&b) {
            Ok(()) => break,
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                errors.push(e.to_string());
            }
        }
    }
    assert!(errors.len() <= 1, "{errors:?}");
    assert_eq!((db.count("locations"), db.count("diagnostics"), db.checkpoint()), (1, 1, Some(1)));
    // The driver would hold and retry the same batch: it is not stored twice.
    sink.write(&b).unwrap();
    assert_eq!(db.count("locations"), 1);
}

#[test]
fn a_schema_name_that_is_not_a_plain_identifier_is_refused_as_not_retryable() {
    let db = Db::new();
    let err = postgres::open(&PostgresConfig { schema: "Robert'); DROP".into(), ..db.config() }).unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    let unreachable =
        PostgresConfig { url: Some("postgres://postgres@127.0.0.1:1/postgres".into()), ..db.config() };
    assert!(postgres::open(&unreachable).unwrap_err().is_retryable());
}

#[test]
fn the_unique_index_serves_the_latest_position_query_by_a_backward_scan() {
    let db = Db::new();
    let mut sink = db.open();
    let frames = (0..50).map(|i| loc("V", DAY_2026_11_25 + i * HOUR, i as u64, point(1.0, 1.0))).collect();
    sink.write(&batch(1, frames)).unwrap();
    db.query("SET enable_seqscan = off");
    let plan: Vec<String> = db
        .query("EXPLAIN SELECT * FROM {s}.locations WHERE vehicle_id = 'V' ORDER BY ts DESC LIMIT 1")
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.query("RESET enable_seqscan");
    assert!(plan.iter().any(|l| l.contains("Index Scan Backward using")), "{plan:#?}");
    assert!(!plan.iter().any(|l| l.contains("Sort")), "{plan:#?}");
}
