//! Reads back from the Postgres history for the API: a vehicle's newest row of each kind (the
//! last tier of the latest-state read path) and its track. Async, on the API's runtime, over one
//! shared connection that is re-opened after a failure.

use std::sync::Arc;

use fleetpipe_processors::latest::VehicleState;
use fleetpipe_processors::{Body, Diagnostic, Dtc, Frame, Kind, Location, Micros};
use tokio::sync::RwLock;
use tokio_postgres::{Client, Row};

use super::{copy, sql, validate_schema_name, Connector, PostgresConfig};
use crate::{Error, Result};

const LATEST_SQL: &str = include_str!("sql/latest.sql");
const TRACK_SQL: &str = include_str!("sql/track.sql");

/// A statement of `sql/` with `{select}` the kind's columns as the reader takes them: `ts` and
/// `received_at` as epoch microseconds.
fn query(text: &str, schema: &str, kind: Kind) -> String {
    let select: Vec<String> = copy::columns(kind)
        .into_iter()
        .map(|c| match c {
            "ts" | "received_at" => format!("(extract(epoch FROM {c}) * 1000000)::int8"),
            _ => c.to_owned(),
        })
        .collect();
    sql(text, schema, kind).replace("{select}", &select.join(", "))
}

/// Read access to the history tables.
#[derive(Clone)]
pub struct PostgresReader {
    connector: Connector,
    queries: Arc<Queries>,
    client: Arc<RwLock<Option<Arc<Client>>>>,
    /// `validate.max_ahead_s`: a row further ahead of its `received_at` is never latest.
    max_ahead_secs: f64,
}

/// The reader's statements, made once for its schema.
struct Queries {
    latest_location: String,
    latest_diagnostic: String,
    track: String,
}

fn err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres { what, source }
}

impl PostgresReader {
    /// `max_ahead_us`: `validate.max_ahead_s` (a row further ahead of its `received_at` is
    /// never served as latest state).
    pub fn new(cfg: &PostgresConfig, max_ahead_us: Micros) -> Result<PostgresReader> {
        let schema = cfg.schema.as_str();
        validate_schema_name(schema).map_err(Error::PostgresSchema)?;
        let connector = cfg.connector()?;
        let queries = Queries {
            latest_location: query(LATEST_SQL, schema, Kind::Location),
            latest_diagnostic: query(LATEST_SQL, schema, Kind::Diagnostic),
            track: query(TRACK_SQL, schema, Kind::Location),
        };
        Ok(PostgresReader {
            connector,
            queries: Arc::new(queries),
            client: Arc::new(RwLock::new(None)),
            max_ahead_secs: max_ahead_us as f64 / 1e6,
        })
    }

    async fn client(&self) -> Result<Arc<Client>> {
        if let Some(c) = self.client.read().await.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let mut slot = self.client.write().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (client, _task) = self.connector.connect("postgres reader").await?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The newest location and diagnostic row of a vehicle (by `ts`, then `seq`), if any.
    pub async fn latest(&self, vehicle_id: &str) -> Result<Option<VehicleState>> {
        let c = self.client().await?;
        let q = &self.queries;
        let ahead = &self.max_ahead_secs;
        let loc = c
            .query_opt(&q.latest_location, &[&vehicle_id, ahead])
            .await
            .map_err(err("read latest location"))?;
        let diag = c
            .query_opt(&q.latest_diagnostic, &[&vehicle_id, ahead])
            .await
            .map_err(err("read latest diagnostic"))?;
        if loc.is_none() && diag.is_none() {
            return Ok(None);
        }
        Ok(Some(VehicleState {
            location: loc.map(|r| location(&r)).transpose()?.map(Arc::new),
            diagnostic: diag.map(|r| diagnostic(&r)).transpose()?.map(Arc::new),
        }))
    }

    /// Location history in time order, `from <= ts < to`, at most `limit` frames.
    pub async fn track(&self, vehicle_id: &str, from: Micros, to: Micros, limit: i64) -> Result<Vec<Frame>> {
        let c = self.client().await?;
        let rows = c
            .query(&self.queries.track, &[&vehicle_id, &(from as f64), &(to as f64), &limit])
            .await
            .map_err(err("read track"))?;
        rows.iter().map(location).collect()
    }
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T> {
    r.try_get(i).map_err(err("read a row"))
}

fn location(r: &Row) -> Result<Frame> {
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

fn diagnostic(r: &Row) -> Result<Frame> {
    // vehicle_id, ts, seq, received_at, the measures, then these.
    let after = 4 + Diagnostic::MEASURES.len();
    let dtcs: Option<serde_json::Value> = get(r, after + 1)?;
    let signals: Option<serde_json::Value> = get(r, after + 2)?;
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
    let mut d = Diagnostic {
        mil_on: get(r, after)?,
        dtcs,
        signals: signals.map(|v| v.to_string()),
        ..Diagnostic::default()
    };
    for (i, m) in Diagnostic::MEASURES.iter().enumerate() {
        (m.set)(&mut d, get(r, 4 + i)?);
    }
    Ok(Frame {
        vehicle_id: get(r, 0)?,
        ts: get(r, 1)?,
        seq: get::<i64>(r, 2)? as u64,
        received_at: get(r, 3)?,
        body: Body::Diagnostic(Box::new(d)),
    })
}
