//! Reads back from the Postgres history for the API: a vehicle's newest row of each kind (the
//! last tier of the latest-state read path) and its track. Async, on the API's runtime, over one
//! shared connection that is re-opened after a failure.

use std::sync::Arc;

use fleetpipe_processors::latest::VehicleState;
use fleetpipe_processors::{Body, Diagnostic, Dtc, Frame, Location, Micros};
use tokio::sync::RwLock;
use tokio_postgres::{Client, NoTls, Row};

use super::schema::quote;
use super::validate_schema_name;
use crate::SinkError;

/// `ts` and `received_at` as epoch microseconds, then the kind's own columns.
const LOCATION_SELECT: &str = "vehicle_id, (extract(epoch FROM ts) * 1000000)::int8, seq, \
     (extract(epoch FROM received_at) * 1000000)::int8, lat, lon, speed_kmh, heading_deg, alt_m, accuracy_m, \
     satellites, odometer_m, ignition";
const DIAGNOSTIC_SELECT: &str = "vehicle_id, (extract(epoch FROM ts) * 1000000)::int8, seq, \
     (extract(epoch FROM received_at) * 1000000)::int8, engine_rpm, coolant_temp_c, engine_load_pct, \
     fuel_level_pct, battery_soc_pct, battery_v, engine_hours, odometer_m, mil_on, dtcs, signals";

/// Read access to the history tables.
#[derive(Clone)]
pub struct PostgresReader {
    url: Arc<str>,
    schema: Arc<str>,
    client: Arc<RwLock<Option<Arc<Client>>>>,
}

fn err(e: tokio_postgres::Error) -> SinkError {
    SinkError::Postgres(e.to_string())
}

impl PostgresReader {
    pub fn new(url: &str, schema: &str) -> Result<PostgresReader, SinkError> {
        validate_schema_name(schema).map_err(SinkError::PostgresFatal)?;
        Ok(PostgresReader {
            url: url.into(),
            schema: quote(schema).into(),
            client: Arc::new(RwLock::new(None)),
        })
    }

    async fn client(&self) -> Result<Arc<Client>, SinkError> {
        if let Some(c) = self.client.read().await.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let mut slot = self.client.write().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await.map_err(err)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres reader connection closed");
            }
        });
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The newest location and diagnostic row of a vehicle (by `ts`, then `seq`), if any.
    pub async fn latest(&self, vehicle_id: &str) -> Result<Option<VehicleState>, SinkError> {
        let c = self.client().await?;
        let s = &self.schema;
        let loc = c
            .query_opt(
                &format!(
                    "SELECT {LOCATION_SELECT} FROM {s}.locations WHERE vehicle_id = $1 ORDER BY ts DESC, seq DESC LIMIT 1"
                ),
                &[&vehicle_id],
            )
            .await
            .map_err(err)?;
        let diag = c
            .query_opt(
                &format!(
                    "SELECT {DIAGNOSTIC_SELECT} FROM {s}.diagnostics WHERE vehicle_id = $1 ORDER BY ts DESC, seq DESC LIMIT 1"
                ),
                &[&vehicle_id],
            )
            .await
            .map_err(err)?;
        if loc.is_none() && diag.is_none() {
            return Ok(None);
        }
        Ok(Some(VehicleState {
            location: loc.map(|r| location(&r)).transpose()?.map(Arc::new),
            diagnostic: diag.map(|r| diagnostic(&r)).transpose()?.map(Arc::new),
        }))
    }

    /// Location history in time order, `from <= ts < to`, at most `limit` frames.
    pub async fn track(
        &self,
        vehicle_id: &str,
        from: Micros,
        to: Micros,
        limit: i64,
    ) -> Result<Vec<Frame>, SinkError> {
        let c = self.client().await?;
        let s = &self.schema;
        let rows = c
            .query(
                &format!(
                    "SELECT {LOCATION_SELECT} FROM {s}.locations WHERE vehicle_id = $1 \
                     AND ts >= to_timestamp($2::float8 / 1e6) AND ts < to_timestamp($3::float8 / 1e6) \
                     ORDER BY ts, seq LIMIT $4"
                ),
                &[&vehicle_id, &(from as f64), &(to as f64), &limit],
            )
            .await
            .map_err(err)?;
        rows.iter().map(location).collect()
    }
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T, SinkError> {
    r.try_get(i).map_err(err)
}

fn location(r: &Row) -> Result<Frame, SinkError> {
    Ok(Frame {
        vehicle_id: get(r, 0)?,
        ts: get(r, 1)?,
        seq: get::<i64>(r, 2)? as u64,
        received_at: get(r, 3)?,
        body: Body::Location(Location {
            lat: get(r, 4)?,
            lon: get(r, 5)?,
            speed_kmh: get(r, 6)?,
            heading_deg: get(r, 7)?,
            alt_m: get(r, 8)?,
            accuracy_m: get(r, 9)?,
            satellites: get::<Option<i32>>(r, 10)?.map(|v| v as u32),
            odometer_m: get(r, 11)?,
            ignition: get(r, 12)?,
        }),
    })
}

fn diagnostic(r: &Row) -> Result<Frame, SinkError> {
    let dtcs: Option<serde_json::Value> = get(r, 13)?;
    let signals: Option<serde_json::Value> = get(r, 14)?;
    let dtcs = dtcs.map(|v| {
        v.as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|d| match d {
                        serde_json::Value::String(code) => Some(Dtc::Obd(code.clone())),
                        serde_json::Value::Object(o) => {
                            let n = |k: &str| o.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
                            Some(Dtc::J1939 {
                                spn: n("spn") as u32,
                                fmi: n("fmi") as u8,
                                oc: n("oc") as u8,
                                sa: n("sa") as u8,
                            })
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    });
    Ok(Frame {
        vehicle_id: get(r, 0)?,
        ts: get(r, 1)?,
        seq: get::<i64>(r, 2)? as u64,
        received_at: get(r, 3)?,
        body: Body::Diagnostic(Box::new(Diagnostic {
            engine_rpm: get(r, 4)?,
            coolant_temp_c: get(r, 5)?,
            engine_load_pct: get(r, 6)?,
            fuel_level_pct: get(r, 7)?,
            battery_soc_pct: get(r, 8)?,
            battery_v: get(r, 9)?,
            engine_hours: get(r, 10)?,
            odometer_m: get(r, 11)?,
            mil_on: get(r, 12)?,
            dtcs,
            signals: signals.map(|v| v.to_string()),
        })),
    })
}
