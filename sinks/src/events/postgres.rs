//! The Postgres events output: rows of `vehicle_events` and `trips` (migration
//! `0002_events.sql`, day partitions created as for the history), and the engine's state with
//! its log position in `fleetpipe_event_state`, all in one transaction per commit, so the
//! tables hold exactly what the state has derived. Rows go in as one JSON array per table
//! (`jsonb_to_recordset`), idempotent on `(event_id, ts)` and `(trip_id, start_ts)`.

use std::collections::BTreeSet;
use std::time::Duration;

use fleetpipe_processors::events::{event_json, trip_json, Event, What};
use fleetpipe_processors::time::day_of;
use fleetpipe_processors::Lsn;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{EventOutput, State};
use crate::postgres::{schema, Connector, PostgresConfig};
use crate::{Error, Result};

const NAME: &str = "postgres_events";
const TIMEOUT: Duration = Duration::from_secs(30);

const INSERT_EVENTS: &str = "INSERT INTO {schema}.vehicle_events (event_id, vehicle_id, type, ts, detected_at, trip_id, body) \
     SELECT event_id, vehicle_id, type, ts, detected_at, trip_id, body FROM jsonb_to_recordset($1::jsonb) AS \
     r(event_id text, vehicle_id text, type text, ts timestamptz, detected_at timestamptz, trip_id text, body jsonb) \
     ON CONFLICT (event_id, ts) DO NOTHING";
const INSERT_TRIPS: &str = "INSERT INTO {schema}.trips (trip_id, vehicle_id, start_ts, end_ts, start_lat, start_lon, end_lat, \
     end_lon, distance_m, duration_s, moving_s, max_speed_kmh, avg_speed_kmh, odometer_start_m, odometer_end_m, \
     fuel_used_pct, energy_used_pct, dtcs, body) \
     SELECT trip_id, vehicle_id, start_ts, end_ts, start_lat, start_lon, end_lat, end_lon, distance_m, duration_s, \
     moving_s, max_speed_kmh, avg_speed_kmh, odometer_start_m, odometer_end_m, fuel_used_pct, energy_used_pct, dtcs, body \
     FROM jsonb_to_recordset($1::jsonb) AS r(trip_id text, vehicle_id text, start_ts timestamptz, end_ts timestamptz, \
     start_lat float8, start_lon float8, end_lat float8, end_lon float8, distance_m float8, duration_s float8, \
     moving_s float8, max_speed_kmh float8, avg_speed_kmh float8, odometer_start_m float8, odometer_end_m float8, \
     fuel_used_pct float8, energy_used_pct float8, dtcs jsonb, body jsonb) \
     ON CONFLICT (trip_id, start_ts) DO NOTHING";
const SAVE_STATE: &str = "INSERT INTO {schema}.fleetpipe_event_state (sink, lsn, state) VALUES ($1, $2, $3) \
     ON CONFLICT (sink) DO UPDATE SET lsn = EXCLUDED.lsn, state = EXCLUDED.state";
const READ_STATE: &str = "SELECT lsn, state FROM {schema}.fleetpipe_event_state WHERE sink = $1";

/// The Postgres events output.
pub struct PostgresOutput {
    connector: Connector,
    schema: String,
    rt: tokio::runtime::Runtime,
    conn: Option<(Client, tokio::task::JoinHandle<()>)>,
    committed: Option<(Lsn, Option<Vec<u8>>)>,
    /// Days whose partitions this output made sure of.
    days: BTreeSet<i64>,
}

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres { what, source }
}

fn q(text: &str, schema: &str) -> String {
    text.replace("{schema}", &schema::quote(schema))
}

/// Opens the output: connects, applies the migrations, and reads the saved state.
pub fn open(cfg: &PostgresConfig) -> Result<PostgresOutput> {
    schema::validate_schema_name(&cfg.schema).map_err(Error::PostgresSchema)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    let mut out = PostgresOutput {
        connector: cfg.connector()?,
        schema: cfg.schema.clone(),
        rt,
        conn: None,
        committed: None,
        days: BTreeSet::new(),
    };
    out.connect()?;
    let PostgresOutput { rt, conn, schema, .. } = &mut out;
    let Some((client, _)) = conn.as_ref() else { return Err(Error::PostgresNotConnected) };
    let row = rt.block_on(client.query_opt(&q(READ_STATE, schema), &[&NAME])).map_err(pg("read state"))?;
    out.committed = Some(match row {
        Some(r) => {
            let lsn: i64 = r.get(0);
            (u64::try_from(lsn).unwrap_or(0), Some(r.get::<_, Vec<u8>>(1)))
        }
        None => (0, None),
    });
    Ok(out)
}

impl PostgresOutput {
    fn connect(&mut self) -> Result<()> {
        if self.conn.as_ref().is_some_and(|(c, _)| !c.is_closed()) {
            return Ok(());
        }
        if let Some((_, task)) = self.conn.take() {
            task.abort();
        }
        self.days.clear();
        let (connector, schema) = (self.connector.clone(), self.schema.clone());
        let conn = self.rt.block_on(async move {
            let (mut client, task) =
                tokio::time::timeout(TIMEOUT, connector.connect(NAME)).await.map_err(|_| {
                    Error::PostgresConnectTimeout { target: connector.target(), after: TIMEOUT }
                })??;
            schema::migrate(&mut client, &schema).await.map_err(pg("migrate"))?;
            Ok::<_, Error>((client, task))
        })?;
        self.conn = Some(conn);
        Ok(())
    }
}

impl Drop for PostgresOutput {
    fn drop(&mut self) {
        if let Some((_, task)) = self.conn.take() {
            task.abort();
        }
    }
}

/// The row of `vehicle_events` for an event.
fn event_row(e: &Event) -> Value {
    let body = event_json(e);
    json!({
        "event_id": e.event_id,
        "vehicle_id": e.vehicle_id,
        "type": e.what.type_name(),
        "ts": body["ts"],
        "detected_at": body["detected_at"],
        "trip_id": body.get("trip_id").cloned().unwrap_or(Value::Null),
        "body": body,
    })
}

/// The row of `trips` for a completed trip.
fn trip_row(t: &fleetpipe_processors::events::Trip) -> Value {
    let body = trip_json(t);
    let mut row = json!({
        "trip_id": t.trip_id,
        "vehicle_id": t.vehicle_id,
        "start_ts": body["start"]["ts"],
        "end_ts": body["end"]["ts"],
        "start_lat": t.start.lat,
        "start_lon": t.start.lon,
        "end_lat": t.end.lat,
        "end_lon": t.end.lon,
        "dtcs": body["dtcs"],
    });
    for key in [
        "distance_m",
        "duration_s",
        "moving_s",
        "max_speed_kmh",
        "avg_speed_kmh",
        "odometer_start_m",
        "odometer_end_m",
        "fuel_used_pct",
        "energy_used_pct",
    ] {
        row[key] = body[key].clone();
    }
    row["body"] = body;
    row
}

impl EventOutput for PostgresOutput {
    fn name(&self) -> &'static str {
        NAME
    }

    fn committed(&mut self) -> (Lsn, Option<Vec<u8>>) {
        self.committed.take().unwrap_or((0, None))
    }

    fn commit(&mut self, lsn: Lsn, events: &[Event], state: &State<'_>) -> Result<()> {
        self.connect()?;
        let state = state.to_vec();
        let mut days = BTreeSet::new();
        let mut event_rows = Vec::with_capacity(events.len());
        let mut trip_rows = Vec::new();
        for e in events {
            days.insert(day_of(e.ts));
            event_rows.push(event_row(e));
            if let What::TripCompleted(t) = &e.what {
                days.insert(day_of(t.start.ts));
                trip_rows.push(trip_row(t));
            }
        }
        let new_days: Vec<i64> =
            days.difference(&self.days).copied().filter(|d| schema::partitionable(*d)).collect();
        let lsn_i64 = i64::try_from(lsn).map_err(|_| Error::PostgresLsn(lsn))?;
        let PostgresOutput { rt, conn, schema: name, .. } = self;
        let Some((client, _)) = conn.as_mut() else { return Err(Error::PostgresNotConnected) };
        let work = async {
            if !new_days.is_empty() {
                schema::create_partitions(client, name, &new_days).await.map_err(pg("create partitions"))?;
            }
            let tx = client.transaction().await.map_err(pg("begin"))?;
            if !event_rows.is_empty() {
                tx.execute(&q(INSERT_EVENTS, name), &[&Value::Array(event_rows)])
                    .await
                    .map_err(pg("insert events"))?;
            }
            if !trip_rows.is_empty() {
                tx.execute(&q(INSERT_TRIPS, name), &[&Value::Array(trip_rows)])
                    .await
                    .map_err(pg("insert trips"))?;
            }
            tx.execute(&q(SAVE_STATE, name), &[&NAME, &lsn_i64, &state]).await.map_err(pg("save state"))?;
            tx.commit().await.map_err(pg("commit"))
        };
        match rt.block_on(async { tokio::time::timeout(TIMEOUT, work).await }) {
            Ok(Ok(())) => {
                self.days.extend(new_days);
                Ok(())
            }
            Ok(Err(e)) => {
                // The connection may be unusable: reconnect on the next call.
                if let Some((_, task)) = self.conn.take() {
                    task.abort();
                }
                Err(e)
            }
            Err(_) => {
                if let Some((_, task)) = self.conn.take() {
                    task.abort();
                }
                Err(Error::PostgresTimeout { what: "commit events", after: TIMEOUT })
            }
        }
    }
}
