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
    let lines: Vec<String> = DRIVE.lines().map(str::to_owned).collect();
    send(running.http_addr, &lines).await;

    let trip = one_trip(running.http_addr).await;
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
