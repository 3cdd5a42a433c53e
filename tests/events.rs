//! Vehicle events end to end (CONTRACT.md §9): the recorded drive sent over HTTP is one trip,
//! the same from `GET …/trips`, `GET …/events` and Parquet (`trips/`, `events/`), and still
//! once after a restart; sent shuffled within the lateness bound with a tenth of it twice, it
//! gives the same trip, ids and all. (A trip of a vehicle that went silent completes once its
//! last frames have left the reorder buffer: `allowed_lateness_s` on the receive clock.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const VEHICLE: &str = "CSS-3BA199E2";

fn events_config(dir: &std::path::Path) -> fleetpipe::config::Config {
    let mut cfg = test_config(dir, None);
    // The drive's longest gap is 3 s: 5 s of silence on the receive clock ends its trip, once
    // its last frames have left the reorder buffer (30 s on the receive clock).
    cfg.events.gap_s = 5.0;
    cfg.events.allowed_lateness_s = 30.0;
    cfg.events.offline_after_s = 3600.0;
    cfg
}

async fn send(addr: std::net::SocketAddr, lines: &[String]) {
    for chunk in lines.chunks(400) {
        let body = chunk.iter().map(|l| format!("{l}\n")).collect::<String>().into_bytes();
        let (status, answer) = http_post(addr, body, "application/x-ndjson").await;
        assert_eq!(status, 200, "{answer}");
    }
}

async fn one_trip(addr: std::net::SocketAddr) -> Value {
    wait_for("the completed trip over HTTP", Duration::from_secs(120), || {
        let (status, body) = block_on(http_get(addr, &format!("/v1/vehicles/{VEHICLE}/trips")));
        assert_eq!(status, 200, "{body}");
        let trips = body["trips"].as_array().unwrap().clone();
        (!trips.is_empty()).then(|| {
            assert_eq!(trips.len(), 1, "{trips:?}");
            trips[0].clone()
        })
    })
    .await
}

fn parquet_trips(dir: &std::path::Path) -> Vec<std::collections::BTreeMap<String, Value>> {
    read_parquet(dir, "trips")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorded_drive_is_one_trip_over_http_and_in_parquet_and_stays_one_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(events_config(dir.path())).await;
    // A Server-Sent Events reader of this vehicle, from before the drive.
    let mut sse = std::net::TcpStream::connect(running.http_addr).unwrap();
    std::io::Write::write_all(
        &mut sse,
        format!("GET /v1/events/stream?vehicle={VEHICLE} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let lines: Vec<String> = DRIVE.lines().map(str::to_owned).collect();
    send(running.http_addr, &lines).await;

    // While the drive's last frames wait out the lateness bound, its trip is under way.
    let open = wait_for("the trip under way over HTTP", Duration::from_secs(30), || {
        let (status, body) =
            block_on(http_get(running.http_addr, &format!("/v1/vehicles/{VEHICLE}/trips?include=open")));
        assert_eq!(status, 200, "{body}");
        body["trips"].as_array().unwrap().first().cloned()
    })
    .await;
    assert_eq!(open["open"], true, "{open}");

    let trip = one_trip(running.http_addr).await;
    let streamed = tokio::task::spawn_blocking(move || {
        sse.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.contains("event: trip_completed") {
            let n = std::io::Read::read(&mut sse, &mut buf).unwrap();
            assert!(n > 0, "the stream ended: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        text
    })
    .await
    .unwrap();
    assert!(streamed.contains("text/event-stream"), "{streamed}");
    let started = streamed.find("event: trip_started").unwrap();
    assert!(started < streamed.find("event: trip_completed").unwrap());
    assert!(streamed.contains(trip["trip_id"].as_str().unwrap()));
    let frames = drive_frames();
    let moving = |f: &&Value| f["speed_kmh"].as_f64().is_some_and(|s| s >= 5.0);
    let first = frames.iter().find(moving).unwrap();
    let last = frames.iter().rev().find(moving).unwrap();
    assert_eq!(trip["start"]["ts"], first["ts"]);
    assert_eq!(trip["end"]["ts"], last["ts"]);
    assert_eq!(
        (trip["start"]["lat"].clone(), trip["end"]["lon"].clone()),
        (first["lat"].clone(), last["lon"].clone())
    );
    let odometer = trip["odometer_end_m"].as_f64().unwrap() - trip["odometer_start_m"].as_f64().unwrap();
    assert_eq!(odometer, 41_000.0);
    let distance = trip["distance_m"].as_f64().unwrap();
    assert!(
        (distance - odometer).abs() / odometer < 0.02,
        "{distance} m along the fixes, {odometer} m on the odometer"
    );
    assert_eq!(trip["by"], "motion");
    assert_eq!((&open["trip_id"], &open["start"]), (&trip["trip_id"], &trip["start"]));
    assert!(open["end"]["ts"].as_str().unwrap() <= trip["end"]["ts"].as_str().unwrap());

    let (_, events) = http_get(running.http_addr, &format!("/v1/vehicles/{VEHICLE}/events")).await;
    let types: Vec<&str> =
        events["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["trip_started", "trip_completed"]);
    assert_eq!(events["events"][1]["trip"], trip);
    let (_, started) =
        http_get(running.http_addr, &format!("/v1/vehicles/{VEHICLE}/events?type=trip_started")).await;
    assert_eq!(started["events"].as_array().unwrap().len(), 1);
    let (status, _) =
        http_get(running.http_addr, &format!("/v1/vehicles/{VEHICLE}/events?type=nonsense")).await;
    assert_eq!(status, 400);

    // Parquet: the same trip, once.
    let rows = wait_for("the trip in Parquet", Duration::from_secs(30), || {
        let rows = parquet_trips(dir.path());
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["trip_id"], trip["trip_id"]);
    assert_eq!(rows[0]["distance_m"], trip["distance_m"]);
    assert_eq!(rows[0]["start_ts"].as_i64().unwrap(), ts_micros(&trip["start"]["ts"]));
    assert_eq!(read_parquet(dir.path(), "events").len(), 2);
    running.stop().await.unwrap();

    // After a restart: served from the committed files, nothing derived twice.
    let running = start(events_config(dir.path())).await;
    assert_eq!(one_trip(running.http_addr).await, trip);
    running.stop().await.unwrap();
    assert_eq!(parquet_trips(dir.path()).len(), 1);
    assert_eq!(read_parquet(dir.path(), "events").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drive_shuffled_within_the_bound_and_partly_sent_twice_gives_the_same_trip() {
    let lines: Vec<String> = DRIVE.lines().map(str::to_owned).collect();
    // Each line moves up to 15 positions (at most 20 s of the drive, within the 30 s bound);
    // every tenth is sent again further on.
    let mut keyed: Vec<(usize, String)> = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (i, l) in lines.iter().enumerate() {
        keyed.push((i * 100 + (next() % 1500) as usize, l.clone()));
        if i % 10 == 0 {
            keyed.push((i * 100 + (next() % 1500) as usize, l.clone()));
        }
    }
    keyed.sort();
    let shuffled: Vec<String> = keyed.into_iter().map(|(_, l)| l).collect();
    assert_ne!(shuffled[..lines.len()], lines[..]);

    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ordered = start(events_config(a.path())).await;
    send(ordered.http_addr, &lines).await;
    let expected = one_trip(ordered.http_addr).await;
    let reordered = start(events_config(b.path())).await;
    send(reordered.http_addr, &shuffled).await;
    let got = one_trip(reordered.http_addr).await;
    assert_eq!(got, expected);
    let events = |addr| async move {
        let (_, e) = http_get(addr, &format!("/v1/vehicles/{VEHICLE}/events")).await;
        e["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("detected_at");
                e
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(events(reordered.http_addr).await, events(ordered.http_addr).await);
    ordered.stop().await.unwrap();
    reordered.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trip_and_its_events_are_in_postgres_once_the_same_as_over_http_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let schema = format!("events_{}", unique().replace('-', "_"));
    let config = || {
        let mut cfg = storage_config(dir.path(), &schema, &format!("{schema}:"));
        cfg.redis.url = None;
        cfg.events.gap_s = 5.0;
        cfg.events.allowed_lateness_s = 30.0;
        cfg.events.offline_after_s = 3600.0;
        cfg
    };
    let running = start(config()).await;
    let lines: Vec<String> = DRIVE.lines().map(str::to_owned).collect();
    send(running.http_addr, &lines).await;
    let trip = one_trip(running.http_addr).await;

    let client = pg().await;
    let trips_sql = format!(
        "SELECT trip_id, distance_m, (extract(epoch FROM start_ts) * 1000000)::int8, body FROM {schema}.trips"
    );
    let rows = wait_for("the trip in Postgres", Duration::from_secs(30), || {
        let rows = block_on(client.query(&trips_sql, &[])).unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), trip["trip_id"].as_str().unwrap());
    assert_eq!(rows[0].get::<_, f64>(1), trip["distance_m"].as_f64().unwrap());
    assert_eq!(rows[0].get::<_, i64>(2), ts_micros(&trip["start"]["ts"]));
    assert_eq!(rows[0].get::<_, Value>(3), trip);
    let events_sql = format!("SELECT type, event_id FROM {schema}.vehicle_events ORDER BY ts");
    let events = |c: &tokio_postgres::Client| {
        let rows = block_on(c.query(&events_sql, &[])).unwrap();
        rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))).collect::<Vec<_>>()
    };
    let before = events(&client);
    assert_eq!(
        before.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["trip_started", "trip_completed"]
    );
    running.stop().await.unwrap();

    // A restart replays nothing twice, and the same drive sent again changes nothing.
    let running = start(config()).await;
    send(running.http_addr, &lines).await;
    assert_eq!(one_trip(running.http_addr).await, trip);
    running.stop().await.unwrap();
    assert_eq!(block_on(client.query(&trips_sql, &[])).unwrap().len(), 1);
    assert_eq!(events(&client), before);
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_are_on_the_vehicle_events_topic_keyed_by_vehicle_with_the_ids_served_over_http() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    for topic in ["vehicle-events", "vehicle-frames-clean", "vehicle-frames-dlq"] {
        kafka_client(&["create", &brokers, topic, "1"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = events_config(dir.path());
    cfg.kafka.brokers = Some(brokers.clone());
    cfg.kafka.consume = false;
    let running = start(cfg).await;
    let lines: Vec<String> = DRIVE.lines().map(str::to_owned).collect();
    send(running.http_addr, &lines).await;
    one_trip(running.http_addr).await;
    let (_, served) = http_get(running.http_addr, &format!("/v1/vehicles/{VEHICLE}/events")).await;
    running.stop().await.unwrap();

    // One more asked for than expected, to see that there is none.
    let records = kafka_records(&brokers, "vehicle-events", 3, 10);
    assert_eq!(records.len(), 2, "{records:?}");
    for (record, event) in records.iter().zip(served["events"].as_array().unwrap()) {
        assert_eq!(record["key"], VEHICLE);
        // Each output runs its own engine: everything but the detection time is the same.
        let mut value: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
        let mut event = event.clone();
        value.as_object_mut().unwrap().remove("detected_at");
        event.as_object_mut().unwrap().remove("detected_at");
        assert_eq!(value, event);
    }
}

/// Sends `lines` to a fleetpipe child process on `port`, in chunks, each acknowledged.
async fn send_to(port: u16, lines: &[String]) {
    send(([127, 0, 0, 1], port).into(), lines).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_commits_derives_exactly_the_events_of_an_uninterrupted_run() {
    let lines: Vec<String> = DRIVE.lines().map(str::to_owned).collect();
    // The uninterrupted run, in-process.
    let whole = tempfile::tempdir().unwrap();
    let reference = start(events_config(whole.path())).await;
    send(reference.http_addr, &lines).await;
    let expected = one_trip(reference.http_addr).await;
    reference.stop().await.unwrap();
    let expected_events: Vec<String> = {
        let mut ids: Vec<String> = read_parquet(whole.path(), "events")
            .iter()
            .map(|r| r["event_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };

    // The same drive into a child process killed with -9 after the trip has started and its
    // first commit is on disk, then restarted.
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let config = dir.path().join("fleetpipe.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http_port}\"\n[gateway]\nlisten = \"127.0.0.1:{}\"\n\
             [events]\ngap_s = 5.0\nallowed_lateness_s = 30.0\noffline_after_s = 3600.0\ncommit_secs = 0.2\n",
            dir.path().join("data").display(),
            free_port()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let fp = Fleetpipe::start(&config, http_port).await;
    send_to(http_port, &lines[..1200]).await;
    wait_for("the trip's start committed", Duration::from_secs(30), || {
        (read_parquet(&data, "events").len() == 1).then_some(())
    })
    .await;
    fp.kill9();
    let fp = Fleetpipe::start(&config, http_port).await;
    send_to(http_port, &lines[1200..]).await;
    let got = one_trip(([127, 0, 0, 1], http_port).into()).await;
    assert!(fp.sigterm().success());
    assert_eq!(got, expected);
    let trips = read_parquet(&data, "trips");
    assert_eq!(trips.len(), 1);
    assert_eq!(trips[0]["trip_id"], expected["trip_id"]);
    let mut ids: Vec<String> =
        read_parquet(&data, "events").iter().map(|r| r["event_id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, expected_events, "each event once, the same as without the crash");
}
