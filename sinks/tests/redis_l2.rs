//! The Redis L2 sink and reader against a real Redis at 127.0.0.1:6379. Every test uses its own
//! key prefix and deletes its keys at the end (also when it fails), so tests run side by side.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetpipe_pipeline::Sink;
use fleetpipe_processors::codec::{encode_json, frame_to_value};
use fleetpipe_processors::latest::haversine_m;
use fleetpipe_processors::Batch;
use fleetpipe_processors::{Body, Diagnostic, Dtc, Frame, Location, Lsn, Micros};
use fleetpipe_sinks::redis::{RedisConfig, RedisL2Reader, RedisL2Sink};

const URL: &str = "redis://127.0.0.1:6379";
/// 2026-11-25T21:00:00.250Z in microseconds.
const T: Micros = 1_795_640_400_250_000;
const SEC: Micros = 1_000_000;

/// A unique prefix; its keys are deleted when dropped.
struct Prefix(String);

impl Prefix {
    fn new() -> Prefix {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        Prefix(format!("fptest:{}:{nanos}:{}:", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
    }

    fn config(&self) -> RedisConfig {
        RedisConfig { prefix: self.0.clone(), ..RedisConfig::new(URL) }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.0)
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(mut c) = redis_conn() else { return };
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}*", self.0)).query(&mut c).unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<u64, _> = redis::cmd("DEL").arg(&keys).query(&mut c);
        }
    }
}

fn redis_conn() -> redis::RedisResult<redis::Connection> {
    redis::Client::open(URL)?.get_connection_with_timeout(Duration::from_secs(2))
}

fn hget(c: &mut redis::Connection, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET").arg(key).arg(field).query(c).unwrap()
}

fn geopos(c: &mut redis::Connection, key: &str, member: &str) -> Option<(f64, f64)> {
    let pos: Vec<Option<(f64, f64)>> = redis::cmd("GEOPOS").arg(key).arg(member).query(c).unwrap();
    pos.into_iter().next().flatten()
}

fn loc(id: &str, ts: Micros, seq: u64, lat: f64, lon: f64) -> Frame {
    Frame {
        vehicle_id: id.into(),
        ts,
        seq,
        received_at: ts + 250_000,
        body: Body::Location(Location {
            lat,
            lon,
            speed_kmh: Some(33.8),
            heading_deg: Some(273.0),
            accuracy_m: Some(3.2),
            satellites: Some(9),
            ignition: Some(true),
            ..Default::default()
        }),
    }
}

fn diag(id: &str, ts: Micros, seq: u64, rpm: f64) -> Frame {
    Frame {
        vehicle_id: id.into(),
        ts,
        seq,
        received_at: ts + 1_000,
        body: Body::Diagnostic(Box::new(Diagnostic {
            engine_rpm: Some(rpm),
            coolant_temp_c: Some(88.0),
            fuel_level_pct: Some(61.5),
            mil_on: Some(false),
            dtcs: Some(vec![Dtc::Obd("P0301".into()), Dtc::J1939 { spn: 110, fmi: 0, oc: 3, sa: 0 }]),
            signals: Some(r#"{"Vehicle.Cabin.Temp":21.5}"#.into()),
            ..Default::default()
        })),
    }
}

fn batch(lsn: Lsn, frames: Vec<Frame>) -> Batch {
    Batch { lsn, frames, ..Batch::default() }
}

fn json(frame: &Frame) -> String {
    let mut out = Vec::new();
    encode_json(frame, &mut out);
    String::from_utf8(out).unwrap()
}

/// The hash holds exactly `frame` as the latest of its kind.
fn assert_latest(c: &mut redis::Connection, p: &Prefix, frame: &Frame) {
    let key = p.key(&format!("vehicle:{}", frame.vehicle_id));
    let kind = frame.kind().as_str();
    assert_eq!(hget(c, &key, kind).as_deref(), Some(json(frame).as_str()), "{key} {kind}");
    assert_eq!(hget(c, &key, &format!("{kind}_ts")), Some(frame.ts.to_string()), "{key} {kind}_ts");
    assert_eq!(hget(c, &key, &format!("{kind}_seq")), Some(frame.seq.to_string()), "{key} {kind}_seq");
}

fn assert_geo(c: &mut redis::Connection, p: &Prefix, id: &str, lat: f64, lon: f64) {
    let (glon, glat) = geopos(c, &p.key("geo"), id).unwrap_or_else(|| panic!("{id} not in the geo set"));
    // A geo set stores a 52-bit geohash: well under a metre.
    assert!((glat - lat).abs() < 1e-5 && (glon - lon).abs() < 1e-5, "{id}: {glat},{glon} vs {lat},{lon}");
}

/// A port on which nobody listens.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

#[test]
fn a_batch_writes_the_latest_location_and_diagnostic_per_vehicle_and_the_geo_set() {
    let p = Prefix::new();
    let mut sink = RedisL2Sink::open(p.config()).unwrap();
    let a_old = loc("VAN-1", T, 1, 56.0, 10.0);
    let a_new = loc("VAN-1", T + SEC, 2, 56.102139, 10.213695);
    let a_diag = diag("VAN-1", T - SEC, 7, 2150.0);
    let b = loc("VAN-2", T, 0, -33.868820, 151.209295);
    // Newest first and last, so that neither order wins by accident.
    sink.write(&batch(5, vec![a_old.clone(), a_new.clone(), a_diag.clone(), b.clone(), a_old])).unwrap();
    assert_eq!(sink.durable_lsn(), 5);
    assert_eq!(sink.stats().vehicles_written, 2);
    assert_eq!(sink.stats().errors, 0);

    let mut c = redis_conn().unwrap();
    assert_latest(&mut c, &p, &a_new);
    assert_latest(&mut c, &p, &a_diag);
    assert_latest(&mut c, &p, &b);
    assert_eq!(hget(&mut c, &p.key("vehicle:VAN-2"), "diagnostic"), None);
    assert_geo(&mut c, &p, "VAN-1", 56.102139, 10.213695);
    assert_geo(&mut c, &p, "VAN-2", -33.868820, 151.209295);

    let reader = RedisL2Reader::open(&p.config()).unwrap();
    let got = reader.get("VAN-1").unwrap().unwrap();
    assert_eq!(got.vehicle_id, "VAN-1");
    assert_eq!(got.location, Some(frame_to_value(&a_new)));
    assert_eq!(got.diagnostic, Some(frame_to_value(&a_diag)));
    // Rebuilt frames equal the written ones, received_at included: L1 can be filled from L2.
    assert_eq!(got.state.location.as_deref(), Some(&a_new));
    assert_eq!(got.state.diagnostic.as_deref(), Some(&a_diag));
    let got_b = reader.clone().get("VAN-2").unwrap().unwrap();
    assert_eq!(got_b.state.location.as_deref(), Some(&b));
    assert_eq!(got_b.diagnostic, None);
    assert!(got_b.state.diagnostic.is_none());
    assert_eq!(reader.get("VAN-404").unwrap(), None);
    sink.flush().unwrap();
}

#[test]
fn an_older_frame_never_overwrites_a_newer_one_in_a_batch_across_batches_or_instances() {
    let p = Prefix::new();
    let mut c = redis_conn().unwrap();
    let mut one = RedisL2Sink::open(p.config()).unwrap();
    let mut two = RedisL2Sink::open(p.config()).unwrap();

    // Within a batch: the newer one wins whatever the order.
    let newest = loc("V", T + 10 * SEC, 3, 56.2, 10.2);
    one.write(&batch(1, vec![newest.clone(), loc("V", T, 9, 56.0, 10.0)])).unwrap();
    assert_latest(&mut c, &p, &newest);

    // Across batches, and from a second instance sharing the prefix.
    one.write(&batch(2, vec![loc("V", T + 5 * SEC, 99, 56.1, 10.1)])).unwrap();
    two.write(&batch(1, vec![loc("V", T + 9 * SEC, 0, 56.1, 10.1)])).unwrap();
    // Same ts: the higher seq wins, a lower or equal one does not.
    two.write(&batch(2, vec![loc("V", T + 10 * SEC, 2, 56.1, 10.1)])).unwrap();
    assert_latest(&mut c, &p, &newest);
    assert_geo(&mut c, &p, "V", 56.2, 10.2);
    let same_ts_higher_seq = loc("V", T + 10 * SEC, 4, 56.3, 10.3);
    two.write(&batch(3, vec![same_ts_higher_seq.clone()])).unwrap();
    assert_latest(&mut c, &p, &same_ts_higher_seq);
    assert_geo(&mut c, &p, "V", 56.3, 10.3);
    one.write(&batch(3, vec![newest.clone()])).unwrap();
    assert_latest(&mut c, &p, &same_ts_higher_seq);

    // Kinds are compared separately: an old diagnostic is still the first diagnostic.
    let d = diag("V", T - 3600 * SEC, 0, 800.0);
    two.write(&batch(4, vec![d.clone()])).unwrap();
    assert_latest(&mut c, &p, &d);
    assert_latest(&mut c, &p, &same_ts_higher_seq);
    one.write(&batch(4, vec![diag("V", T - 3601 * SEC, 50, 900.0)])).unwrap();
    assert_latest(&mut c, &p, &d);

    // Compared exactly, beyond 2^53 (where a double would call these equal and let seq decide)
    // and below the epoch.
    let big = loc("BIG", (1 << 53) + 1, 0, 1.0, 1.0);
    one.write(&batch(5, vec![big.clone()])).unwrap();
    two.write(&batch(5, vec![loc("BIG", 1 << 53, 5, 2.0, 2.0)])).unwrap();
    assert_latest(&mut c, &p, &big);
    let neg = loc("NEG", -5 * SEC, 0, 1.0, 1.0);
    one.write(&batch(6, vec![neg.clone()])).unwrap();
    two.write(&batch(6, vec![loc("NEG", -10 * SEC, 7, 2.0, 2.0)])).unwrap();
    assert_latest(&mut c, &p, &neg);
    let later = loc("NEG", 0, 0, 3.0, 3.0);
    two.write(&batch(7, vec![later.clone()])).unwrap();
    assert_latest(&mut c, &p, &later);
    assert_eq!(one.stats().errors + two.stats().errors, 0);
}

#[test]
fn near_returns_vehicles_within_the_radius_nearest_first() {
    let p = Prefix::new();
    let mut sink = RedisL2Sink::open(p.config()).unwrap();
    let (lat, lon) = (56.1, 10.2);
    // Due north: 0.001° of latitude is about 111 m.
    let at = [("N100", 0.0009), ("N3000", 0.027), ("N1000", 0.009), ("FAR", 0.45)];
    let frames = at.iter().map(|(id, dlat)| loc(id, T, 0, lat + dlat, lon)).collect();
    sink.write(&batch(1, frames)).unwrap();

    let reader = RedisL2Reader::open(&p.config()).unwrap();
    let hits = reader.near(lat, lon, 5_000.0, 10).unwrap();
    let ids: Vec<&str> = hits.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["N100", "N1000", "N3000"]);
    for (id, d) in &hits {
        let dlat = at.iter().find(|(i, _)| i == id).unwrap().1;
        let expected = haversine_m(lat, lon, lat + dlat, lon);
        assert!((d - expected).abs() < expected * 0.005 + 1.0, "{id}: {d} m vs {expected} m");
    }
    let two: Vec<String> = reader.near(lat, lon, 5_000.0, 2).unwrap().into_iter().map(|h| h.0).collect();
    assert_eq!(two, ["N100", "N1000"]);
    assert!(reader.near(lat, lon, 50.0, 10).unwrap().is_empty());
    assert!(reader.near(lat, lon, 5_000.0, 0).unwrap().is_empty());
}

#[test]
fn the_vehicle_hash_expires_after_the_ttl_and_leaves_the_geo_set() {
    let p = Prefix::new();
    let cfg = RedisConfig { ttl_secs: 3600.0, ..p.config() };
    let mut sink = RedisL2Sink::open(cfg).unwrap();
    sink.write(&batch(1, vec![loc("V", T, 0, 56.1, 10.2)])).unwrap();
    let mut c = redis_conn().unwrap();
    let pttl: i64 = redis::cmd("PTTL").arg(p.key("vehicle:V")).query(&mut c).unwrap();
    assert!(pttl > 3_590_000 && pttl <= 3_600_000, "pttl {pttl}");

    // A short TTL really expires the vehicle.
    let short = RedisConfig { ttl_secs: 0.15, ..p.config() };
    let mut sink = RedisL2Sink::open(short).unwrap();
    sink.write(&batch(1, vec![loc("W", T, 0, 56.1, 10.2)])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let exists: u64 = redis::cmd("EXISTS").arg(p.key("vehicle:W")).query(&mut c).unwrap();
        if exists == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "vehicle:W did not expire");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(RedisL2Reader::open(&p.config()).unwrap().get("W").unwrap(), None);
    // The geo set has no expiry of its own: a tick drops the expired vehicle from it.
    assert!(geopos(&mut c, &p.key("geo"), "W").is_some());
    sink.tick(Instant::now()).unwrap();
    assert_eq!(geopos(&mut c, &p.key("geo"), "W"), None);
    assert!(geopos(&mut c, &p.key("geo"), "V").is_some(), "V has not expired");
    assert!(RedisL2Reader::open(&p.config()).unwrap().near(56.1, 10.2, 1000.0, 10).unwrap().len() == 1);
}

#[test]
fn a_location_beyond_the_geo_range_is_cached_and_removes_the_older_position() {
    let p = Prefix::new();
    let mut sink = RedisL2Sink::open(p.config()).unwrap();
    sink.write(&batch(1, vec![loc("POLAR", T, 0, 80.0, 10.0)])).unwrap();
    let mut c = redis_conn().unwrap();
    assert_geo(&mut c, &p, "POLAR", 80.0, 10.0);
    let north = loc("POLAR", T + SEC, 0, 89.5, 10.0);
    sink.write(&batch(2, vec![north.clone()])).unwrap();
    assert_latest(&mut c, &p, &north);
    assert_eq!(geopos(&mut c, &p.key("geo"), "POLAR"), None);
    assert_eq!(sink.stats().errors, 0);
}

#[test]
fn an_unreachable_redis_never_fails_a_write_and_is_counted_once_per_breaker_period() {
    let cfg = RedisConfig {
        prefix: "fptest:unreachable:".into(),
        breaker_open_for: Duration::from_secs(60),
        io_timeout: Duration::from_millis(500),
        max_pending_vehicles: 3,
        ..RedisConfig::new(format!("redis://127.0.0.1:{}", closed_port()))
    };
    let mut sink = RedisL2Sink::open(cfg.clone()).unwrap();
    assert_eq!(sink.stats().errors, 1);
    assert!(sink.stats().breaker_open);
    for i in 1..=200u64 {
        let id = format!("V{}", i % 5);
        sink.write(&batch(i, vec![loc(&id, T + i as i64, 0, 56.1, 10.2)])).unwrap();
        sink.tick(Instant::now()).unwrap();
        assert_eq!(sink.durable_lsn(), i);
    }
    let stats = sink.stats();
    assert_eq!(stats.errors, 1, "{stats:?}");
    assert_eq!(stats.vehicles_written, 0);
    // Five vehicles, room for three: the other two rely on their next frames.
    assert_eq!(stats.pending_vehicles, 3);
    assert!(stats.refill_dropped > 0);
    sink.flush().unwrap();

    // With a short breaker period, one error per period, not per batch.
    let short = RedisConfig { breaker_open_for: Duration::from_millis(100), ..cfg.clone() };
    let mut sink = RedisL2Sink::open(short).unwrap();
    let started = Instant::now();
    let mut writes = 0u64;
    while sink.stats().errors < 3 {
        writes += 1;
        sink.write(&batch(writes, vec![loc("V", T, writes, 56.1, 10.2)])).unwrap();
        assert!(started.elapsed() < Duration::from_secs(20), "breaker never re-probed");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(writes > 3, "{writes} writes for 3 errors");

    // The reader fails (it is a read path: the API falls through), and fast while tripped.
    let reader = RedisL2Reader::open(&cfg).unwrap();
    assert!(reader.get("V").is_err());
    for _ in 0..100 {
        assert!(reader.get("V").is_err());
        assert!(reader.near(56.1, 10.2, 1000.0, 10).is_err());
    }
    assert!(RedisL2Sink::open(RedisConfig::new("not a url")).is_err());
}

#[test]
fn a_tripped_breaker_skips_redis_and_the_next_write_after_it_refills_the_skipped_vehicles() {
    let p = Prefix::new();
    let cfg = RedisConfig { breaker_open_for: Duration::from_millis(200), ..p.config() };
    let mut sink = RedisL2Sink::open(cfg).unwrap();
    let mut c = redis_conn().unwrap();
    let first = loc("A", T, 0, 56.0, 10.0);
    sink.write(&batch(1, vec![first.clone()])).unwrap();
    assert_latest(&mut c, &p, &first);

    sink.trip_breaker();
    let a_new = loc("A", T + 10 * SEC, 0, 56.5, 10.5);
    let b_loc = loc("B", T + 5 * SEC, 0, 57.0, 11.0);
    let b_diag = diag("B", T + 6 * SEC, 0, 1200.0);
    sink.write(&batch(2, vec![a_new.clone(), b_loc.clone()])).unwrap();
    sink.write(&batch(3, vec![loc("A", T + 3 * SEC, 0, 50.0, 5.0), b_diag.clone()])).unwrap();
    assert_eq!(sink.durable_lsn(), 3);
    // Skipped: Redis still holds the state before the trip.
    assert_latest(&mut c, &p, &first);
    assert_eq!(hget(&mut c, &p.key("vehicle:B"), "location"), None);
    assert_eq!(sink.stats().pending_vehicles, 2);

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lsn = 3;
    while sink.stats().breaker_open || sink.stats().pending_vehicles > 0 {
        assert!(Instant::now() < deadline, "no refill: {:?}", sink.stats());
        std::thread::sleep(Duration::from_millis(20));
        lsn += 1;
        sink.write(&batch(lsn, Vec::new())).unwrap();
    }
    assert_latest(&mut c, &p, &a_new);
    assert_latest(&mut c, &p, &b_loc);
    assert_latest(&mut c, &p, &b_diag);
    assert_geo(&mut c, &p, "A", 56.5, 10.5);
    assert_geo(&mut c, &p, "B", 57.0, 11.0);
    let stats = sink.stats();
    assert_eq!(stats.errors, 0, "a trip by hand is not an error: {stats:?}");
    assert_eq!(stats.vehicles_written, 3);
}

#[test]
fn a_tick_refills_the_skipped_vehicles_without_a_new_batch() {
    let p = Prefix::new();
    let cfg = RedisConfig { breaker_open_for: Duration::from_millis(200), ..p.config() };
    let mut sink = RedisL2Sink::open(cfg).unwrap();
    sink.trip_breaker();
    let f = loc("T1", T, 0, 56.0, 10.0);
    sink.write(&batch(1, vec![f.clone()])).unwrap();
    sink.tick(Instant::now()).unwrap();
    let mut c = redis_conn().unwrap();
    assert_eq!(hget(&mut c, &p.key("vehicle:T1"), "location"), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.stats().pending_vehicles > 0 {
        assert!(Instant::now() < deadline, "no refill: {:?}", sink.stats());
        std::thread::sleep(Duration::from_millis(20));
        sink.tick(Instant::now()).unwrap();
    }
    assert_latest(&mut c, &p, &f);
}

/// Kills this prefix's connections of `role` (`sink` or `reader`), as an idle timeout or a
/// Redis restart would. Returns how many.
fn kill_connections(p: &Prefix, role: &str) -> usize {
    let mut c = redis_conn().unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut c).unwrap();
    let name = format!("name=fleetpipe-l2-{role}@{}", p.0);
    let ids: Vec<String> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == name))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_owned))
        .collect();
    for id in &ids {
        let _: u64 = redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id).query(&mut c).unwrap();
    }
    ids.len()
}

#[test]
fn a_dropped_connection_is_replaced_without_an_error_or_a_skipped_batch() {
    let p = Prefix::new();
    let mut sink = RedisL2Sink::open(p.config()).unwrap();
    let reader = RedisL2Reader::open(&p.config()).unwrap();
    sink.write(&batch(1, vec![loc("K", T, 0, 56.0, 10.0)])).unwrap();
    assert!(reader.get("K").unwrap().is_some());
    assert_eq!(kill_connections(&p, "sink"), 1);
    assert_eq!(kill_connections(&p, "reader"), 1);

    let newer = loc("K", T + SEC, 0, 56.1, 10.1);
    sink.write(&batch(2, vec![newer.clone()])).unwrap();
    let stats = sink.stats();
    assert_eq!((stats.errors, stats.breaker_open, stats.pending_vehicles), (0, false, 0), "{stats:?}");
    let mut c = redis_conn().unwrap();
    assert_latest(&mut c, &p, &newer);

    // The reader replaces its pooled connection too, without failing the call.
    let got = reader.get("K").unwrap();
    assert_eq!(got.unwrap().state.location.as_deref(), Some(&newer));
}

#[test]
fn a_key_redis_refuses_costs_only_its_own_vehicle() {
    let p = Prefix::new();
    let mut c = redis_conn().unwrap();
    // Someone else's value where a vehicle's hash belongs: WRONGTYPE for that vehicle only.
    let _: () = redis::cmd("SET").arg(p.key("vehicle:BAD")).arg("not a hash").query(&mut c).unwrap();
    let mut sink = RedisL2Sink::open(p.config()).unwrap();
    let good = loc("GOOD", T, 0, 56.0, 10.0);
    sink.write(&batch(1, vec![loc("BAD", T, 0, 56.0, 10.0), good.clone()])).unwrap();
    assert_latest(&mut c, &p, &good);
    let stats = sink.stats();
    assert_eq!((stats.errors, stats.vehicles_written), (1, 1), "{stats:?}");
    assert!(!stats.breaker_open && stats.pending_vehicles == 0, "{stats:?}");
    // Alone in its batch it still does not open the breaker.
    sink.write(&batch(2, vec![loc("BAD", T + SEC, 0, 56.0, 10.0)])).unwrap();
    let next = loc("GOOD", T + SEC, 0, 56.5, 10.5);
    sink.write(&batch(3, vec![next.clone()])).unwrap();
    assert_latest(&mut c, &p, &next);
    assert_eq!(sink.stats().errors, 2);
    assert!(!sink.stats().breaker_open);
    let reader = RedisL2Reader::open(&p.config()).unwrap();
    assert!(reader.get("BAD").is_err());
    assert!(reader.get("GOOD").unwrap().is_some(), "a refused read does not trip the reader");
}
