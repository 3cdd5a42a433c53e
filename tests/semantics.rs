//! Event-time semantics and exact round trips: latest by `ts`, duplicates stored once, missing
//! `seq` stored as 0, diagnostic frames (DTCs, signals) back from Parquet as sent, nulls kept.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_duplicate_frames_keep_latest_by_event_time_and_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let v = "WVWZZZ1JZXW000001";
    let loc = |ts: &str, seq: Option<u64>, lat: f64| {
        let mut f = json!({"vehicle_id": v, "ts": ts, "kind": "location", "lat": lat, "lon": 10.213695});
        if let Some(s) = seq {
            f["seq"] = json!(s);
        }
        f
    };
    let newest = loc("2026-11-25T21:00:03.000Z", Some(3), 56.3);
    let older1 = loc("2026-11-25T21:00:01.000Z", Some(1), 56.1);
    let older2 = loc("2026-11-25T21:00:02.000Z", Some(2), 56.2);
    let no_seq = loc("2026-11-25T20:59:59.500Z", None, 56.0);
    // The last frame received (older2, then a re-delivered older1) is not the newest.
    for batch in [
        vec![newest.clone(), older1.clone()],
        vec![older2.clone(), older1.clone(), newest.clone()],
        vec![no_seq.clone(), older1.clone()],
    ] {
        let (status, resp) =
            http_post(running.http_addr, serde_json::to_vec(&batch).unwrap(), "application/json").await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["accepted"], json!(batch.len()), "duplicates count as accepted");
    }
    let (status, doc) = http_get(running.http_addr, &format!("/v1/vehicles/{v}")).await;
    assert_eq!(status, 200);
    assert_eq!(doc["location"]["ts"], "2026-11-25T21:00:03.000Z");
    assert_eq!(doc["location"]["seq"], 3);
    assert_eq!(doc["location"]["lat"], 56.3);

    let rows = wait_for("4 distinct rows", Duration::from_secs(30), || {
        let rows = read_parquet(dir.path(), "locations");
        (rows.len() >= 4).then_some(rows)
    })
    .await;
    let mut sent = vec![newest, older1, older2, no_seq.clone()];
    sent[3]["seq"] = json!(0);
    assert_locations_equal(&rows, &sent);
    let stored_no_seq = rows.iter().find(|r| r["ts"] == json!(ts_micros(&no_seq["ts"]))).unwrap();
    assert_eq!(stored_no_seq["seq"], json!(0), "a frame without seq is stored with seq 0");
    running.stop().await.unwrap();
    // After the drain nothing more was written: still exactly four rows.
    assert_eq!(read_parquet(dir.path(), "locations").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostic_frames_with_obd_and_j1939_dtcs_and_signals_come_back_from_parquet_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), None)).await;
    let full = json!({
        "vehicle_id": "TRUCK-7", "ts": 1795640400250i64, "seq": 1018, "kind": "diagnostic",
        "engine_rpm": 2150, "coolant_temp_c": 88, "engine_load_pct": 41.5, "fuel_level_pct": 61.5,
        "battery_soc_pct": 80.25, "battery_v": 13.7, "engine_hours": 10234.5, "odometer_m": 123456789.0,
        "mil_on": true,
        "dtcs": ["P0301", "U0100-87", {"spn": 110, "fmi": 0, "oc": 3, "sa": 0}, {"spn": 524287, "fmi": 31, "oc": 126, "sa": 255}],
        "signals": {"Vehicle.Cabin.Door.Row1.Left.IsOpen": false, "Vehicle.Body.Trailer.Id": "TR-9", "Vehicle.Powertrain.TractionBattery.Temperature": -4.5}
    });
    let sparse = json!({"vehicle_id": "TRUCK-7", "ts": "2026-11-25T21:00:01Z", "kind": "diagnostic", "fuel_level_pct": 0, "dtcs": []});
    let (status, resp) =
        http_post(running.http_addr, serde_json::to_vec(&json!([full, sparse])).unwrap(), "application/json")
            .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["accepted"], 2);

    let rows = wait_for("2 diagnostic rows", Duration::from_secs(30), || {
        let rows = read_parquet(dir.path(), "diagnostics");
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 2);
    let row = rows.iter().find(|r| r["seq"] == json!(1018)).unwrap();
    assert_eq!(row["ts"], json!(1795640400250i64 * 1000));
    for k in [
        "engine_rpm",
        "coolant_temp_c",
        "engine_load_pct",
        "fuel_level_pct",
        "battery_soc_pct",
        "battery_v",
        "engine_hours",
        "odometer_m",
    ] {
        assert_eq!(row[k].as_f64(), full[k].as_f64(), "{k}");
    }
    assert_eq!(row["mil_on"], json!(true));
    let dtc = |code: Value, spn: Value, fmi: Value, oc: Value, sa: Value| json!({"code": code, "spn": spn, "fmi": fmi, "oc": oc, "sa": sa});
    assert_eq!(
        row["dtcs"],
        json!([
            dtc(json!("P0301"), Value::Null, Value::Null, Value::Null, Value::Null),
            dtc(json!("U0100-87"), Value::Null, Value::Null, Value::Null, Value::Null),
            dtc(Value::Null, json!(110), json!(0), json!(3), json!(0)),
            dtc(Value::Null, json!(524287), json!(31), json!(126), json!(255)),
        ])
    );
    let signals: Value = serde_json::from_str(row["signals"].as_str().unwrap()).unwrap();
    assert_eq!(signals, full["signals"]);

    let sparse_row = rows.iter().find(|r| r["seq"] == json!(0)).unwrap();
    assert_eq!(sparse_row["fuel_level_pct"], json!(0.0), "a sent zero stays zero");
    assert_eq!(sparse_row["dtcs"], json!([]), "an empty list stays an empty list");
    for k in [
        "engine_rpm",
        "coolant_temp_c",
        "engine_load_pct",
        "battery_soc_pct",
        "battery_v",
        "engine_hours",
        "odometer_m",
        "mil_on",
        "signals",
    ] {
        assert_eq!(sparse_row[k], Value::Null, "{k}: a value the frame did not carry is null, never 0");
    }

    // The API serves the newest diagnostic frame by ts with the frame's own field names.
    let (status, doc) = http_get(running.http_addr, "/v1/vehicles/TRUCK-7").await;
    assert_eq!(status, 200);
    assert_eq!(doc["diagnostic"]["ts"], "2026-11-25T21:00:01.000Z");
    assert_eq!(doc["diagnostic"]["fuel_level_pct"].as_f64(), Some(0.0));
    assert!(doc.get("location").is_none() || doc["location"].is_null());
    running.stop().await.unwrap();
}
