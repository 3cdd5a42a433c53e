//! Postgres history (CONTRACT.md §5): `locations` and `diagnostics`, one partition per UTC day.
//!
//! Delivery semantics first. The sink is fed from fleetpipe's write-ahead log, in log order, and
//! its checkpoint (`{schema}.fleetpipe_checkpoints`, row `postgres`) is moved *in the transaction
//! that stores the batch*: Postgres holds a batch's rows exactly when it holds its checkpoint.
//! [`Sink::durable_lsn`] is that checkpoint, so after a crash or a lost connection the log
//! replays exactly what Postgres lacks. Should a batch be stored twice anyway (the connection
//! broke after `COMMIT` was sent, or a replay overlaps), the unique index on
//! `(vehicle_id, ts, seq)` keeps one copy of each row.
//!
//! Per batch, in one transaction:
//!
//! 1. `COPY … FROM STDIN (FORMAT binary)` straight into each parent table, with the bytes
//!    written by hand ([`copy`]); then the checkpoint upsert; then `COMMIT`. The common case.
//! 2. If that fails with `unique_violation` (a redelivery), roll back and redo it through a
//!    `TEMP` staging table: COPY into it, `INSERT INTO parent SELECT … ON CONFLICT DO NOTHING`.
//! 3. If it fails with a data error (a value or row Postgres refuses), the staging step runs
//!    under savepoints and bisects: halves are retried until each refused row is alone. Those
//!    *poison rows* are appended to `{dead_letter_dir}/postgres/poison-YYYY-MM-DD.ndjson` and
//!    fsync'd before the `COMMIT` that stores every other row; a refused row never fails its
//!    batch or stalls the pipeline.
//!
//! Connection failures (refused, closed, `08xxx`, `57Pxx`, `53xxx`, …) return a retryable
//! [`SinkError::Postgres`]; the driver retries the same batch with backoff and the next call
//! reconnects, re-reading the checkpoint (so a batch whose `COMMIT` did land is not redone).
//! Errors a retry cannot fix (`42xxx`, `28xxx`, …) are [`SinkError::PostgresFatal`].
//!
//! Partitions: at open and from `tick` at most once a minute, the sink creates the partitions
//! of yesterday, today and the next `partitions_ahead_days` days, and drops those past
//! `retention_days` when one is configured (detaching them concurrently first). A batch whose
//! frames belong to other days (a backfill, of any year) gets their partitions before its COPY;
//! a cache of the days present saves the catalog query. Creating a partition locks its parent,
//! which is why the coming days are made ahead, off the path of live traffic.
//!
//! The sink's methods block: it owns a current-thread tokio runtime and a single connection, and
//! runs on its own OS thread like every sink (see [`crate::driver`]).
//!
//! # Measuring throughput
//!
//! There is deliberately no benchmark in the test suite. Throughput is measured end to end,
//! like the other sinks (README "Benchmarks"): run `fleetpipe run` with the Postgres sink on,
//! drive it with `load-tests/mqtt_ratio.sh` (300,000 location frames, 1,000 vehicles), and
//! divide the rows committed (`fleetpipe_frames_written_total{sink="postgres"}`, or
//! `SELECT count(*)` on the table) by the time from the first frame to the metric reaching the
//! total. The limit to compare against, measured in the same run on the same machine, is
//! `psql \copy` of the same frames as CSV into a fresh schema with the same partitions and
//! unique index (NOTES.md: 286–304k rows/s on 2 cores). Also worth recording: the share of
//! batches taking the staging path (a replay) and its rate, and `fleetpipe_sink_write_seconds`.

mod copy;
mod reader;
mod schema;

use std::collections::{BTreeSet, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleetpipe_processors::{Frame, Kind, Lsn, Micros, Origin, Reason, Rejection};
use futures_util::SinkExt;
use tokio::runtime::Runtime;
use tokio_postgres::{Client, NoTls, Statement};

use self::copy::{EncodedRows, DIAGNOSTIC_COLUMNS, HEADER, LOCATION_COLUMNS, TRAILER};
pub use self::reader::PostgresReader;
pub use self::schema::validate_schema_name;
use self::schema::{describe, Failure};
use crate::rolling::{self, io_err, MICROS_PER_DAY};
use crate::{dead_letter, Sink, SinkBatch, SinkError};

const NAME: &str = "postgres";
/// The checkpoint row's key in `{schema}.fleetpipe_checkpoints`.
const CHECKPOINT_KEY: &str = "postgres";
/// How often `tick` creates coming partitions and drops expired ones.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
/// Give up connecting after this long (the driver retries with backoff).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// COPY data is sent in messages of at most this size.
const COPY_CHUNK: usize = 1 << 20;
/// The label of poison rows in `fleetpipe_frames_rejected_total{reason}`.
pub const REFUSED_REASON: &str = "postgres_refused";

/// Settings of the Postgres sink.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// libpq-style URL or key/value string: `postgres://user@host:5432/db`.
    pub url: String,
    /// Schema of the tables (created if missing); `[a-z_][a-z0-9_]*`.
    pub schema: String,
    /// Partitions are kept ready for today and this many days ahead (and yesterday).
    pub partitions_ahead_days: u32,
    /// Drop day partitions older than this many days; `None` keeps everything.
    pub retention_days: Option<u32>,
    /// Root of the dead-letter store; rows Postgres refuses go to `{dead_letter_dir}/postgres/`.
    pub dead_letter_dir: PathBuf,
}

impl PostgresConfig {
    /// Defaults: schema `public`, 3 days of partitions ahead, no retention.
    pub fn new(url: impl Into<String>, dead_letter_dir: impl Into<PathBuf>) -> PostgresConfig {
        PostgresConfig {
            url: url.into(),
            schema: "public".to_string(),
            partitions_ahead_days: 3,
            retention_days: None,
            dead_letter_dir: dead_letter_dir.into(),
        }
    }
}

/// One open connection and the statements prepared on it.
struct Conn {
    client: Client,
    /// Drives the connection; aborted when the `Conn` is dropped.
    task: tokio::task::JoinHandle<()>,
    copy_locations: Statement,
    copy_diagnostics: Statement,
    save_checkpoint: Statement,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Conn {
    fn copy_statement(&self, kind: Kind) -> &Statement {
        match kind {
            Kind::Location => &self.copy_locations,
            Kind::Diagnostic => &self.copy_diagnostics,
        }
    }
}

/// A row Postgres (or the encoder, for a value the column type cannot hold) refused.
struct Poison<'a> {
    frame: &'a Frame,
    /// `SQLSTATE message (detail)`.
    error: String,
}

/// The rows of one table in a batch.
struct TableRows<'a> {
    kind: Kind,
    frames: Vec<&'a Frame>,
    rows: EncodedRows,
}

/// The Postgres sink. Every `write` commits; dropping it loses nothing.
pub struct PostgresSink {
    cfg: PostgresConfig,
    rt: Runtime,
    /// `None` after a connection error: the next call reconnects.
    conn: Option<Conn>,
    /// Whether this sink has run the migrations (once, at open).
    migrated: bool,
    /// The checkpoint committed in Postgres.
    durable: Lsn,
    /// Days whose partitions exist in both tables (loaded at connect, kept up to date).
    known_days: HashSet<i64>,
    last_maintenance: Instant,
    /// The batch whose poison rows are already in the poison file (a retried batch would
    /// otherwise append them twice).
    poison_written_for: Option<Lsn>,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink")
            .field("schema", &self.cfg.schema)
            .field("connected", &self.conn.is_some())
            .field("durable", &self.durable)
            .field("known_days", &self.known_days.len())
            .finish_non_exhaustive()
    }
}

impl PostgresSink {
    /// Connects, applies the migrations, reads the checkpoint and creates the partitions of the
    /// coming days (dropping expired ones when a retention is set).
    pub fn open(cfg: PostgresConfig) -> Result<PostgresSink, SinkError> {
        validate_schema_name(&cfg.schema).map_err(SinkError::PostgresFatal)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SinkError::Thread { sink: NAME, detail: format!("tokio runtime: {e}") })?;
        let mut sink = PostgresSink {
            cfg,
            rt,
            conn: None,
            migrated: false,
            durable: 0,
            known_days: HashSet::new(),
            last_maintenance: Instant::now(),
            poison_written_for: None,
        };
        sink.connect()?;
        sink.maintain()?;
        tracing::info!(
            sink = NAME,
            schema = %sink.cfg.schema,
            lsn = sink.durable,
            partitions = sink.known_days.len(),
            "opened postgres sink"
        );
        Ok(sink)
    }

    /// The poison file directory: `{dead_letter_dir}/postgres`.
    pub fn poison_dir(&self) -> PathBuf {
        self.cfg.dead_letter_dir.join(NAME)
    }

    /// Connects unless connected; on a new connection runs the migrations (first time only),
    /// re-reads the checkpoint and the partitions present.
    fn connect(&mut self) -> Result<(), SinkError> {
        if self.conn.as_ref().is_some_and(|c| !c.client.is_closed()) {
            return Ok(());
        }
        self.conn = None;
        let (url, schema) = (self.cfg.url.as_str(), self.cfg.schema.as_str());
        let migrate = !self.migrated;
        let (conn, applied, lsn, days) = self.rt.block_on(async {
            let (conn, applied) =
                match tokio::time::timeout(CONNECT_TIMEOUT, open_conn(url, schema, migrate)).await {
                    Ok(opened) => opened.map_err(|e| pg_error("connect", &e))?,
                    Err(_) => {
                        return Err(SinkError::Postgres(format!(
                            "connect: no connection after {CONNECT_TIMEOUT:?}"
                        )));
                    }
                };
            let lsn =
                read_checkpoint(&conn.client, schema).await.map_err(|e| pg_error("read checkpoint", &e))?;
            let tables = schema::day_tables(&conn.client, schema)
                .await
                .map_err(|e| pg_error("list partitions", &e))?;
            Ok((conn, applied, lsn, schema::complete_days(&tables)))
        })?;
        if !applied.is_empty() {
            tracing::info!(sink = NAME, schema, versions = ?applied, "applied migrations");
        }
        self.migrated = true;
        if lsn > self.durable {
            tracing::info!(sink = NAME, lsn, was = self.durable, "checkpoint moved on reconnect");
        }
        self.durable = self.durable.max(lsn);
        self.known_days = days;
        self.conn = Some(conn);
        Ok(())
    }

    /// Turns a failed statement into the sink's error, dropping the connection (it may be broken
    /// or inside a failed transaction; a fresh one is cheap).
    fn fail(&mut self, what: &str, e: &tokio_postgres::Error) -> SinkError {
        self.conn = None;
        let err = pg_error(what, e);
        tracing::warn!(sink = NAME, error = %err, "postgres call failed");
        err
    }

    /// Re-reads which day partitions exist.
    fn refresh_days(&mut self) -> Result<(), SinkError> {
        self.connect()?;
        let Some(conn) = self.conn.as_ref() else {
            return Err(SinkError::Postgres("not connected".into()));
        };
        match self.rt.block_on(schema::day_tables(&conn.client, &self.cfg.schema)) {
            Ok(tables) => {
                self.known_days = schema::complete_days(&tables);
                Ok(())
            }
            Err(e) => Err(self.fail("list partitions", &e)),
        }
    }

    /// Creates the partitions of `days` that are not known to exist.
    fn ensure_days(&mut self, days: impl IntoIterator<Item = i64>) -> Result<(), SinkError> {
        let missing: Vec<i64> = days
            .into_iter()
            .filter(|d| schema::partitionable(*d) && !self.known_days.contains(d))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.connect()?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(SinkError::Postgres("not connected".into()));
        };
        let result =
            self.rt.block_on(schema::create_partitions(&mut conn.client, &self.cfg.schema, &missing));
        if let Err(e) = result {
            return Err(self.fail("create partitions", &e));
        }
        tracing::debug!(sink = NAME, days = missing.len(), first = missing[0], "created partitions");
        self.known_days.extend(missing);
        Ok(())
    }

    /// Coming partitions and retention.
    fn maintain(&mut self) -> Result<(), SinkError> {
        let today = now_micros().div_euclid(MICROS_PER_DAY);
        self.ensure_days((today - 1)..=(today + i64::from(self.cfg.partitions_ahead_days)))?;
        if let Some(days) = self.cfg.retention_days {
            let cutoff = today - i64::from(days);
            self.connect()?;
            let Some(conn) = self.conn.as_ref() else {
                return Err(SinkError::Postgres("not connected".into()));
            };
            match self.rt.block_on(schema::drop_before(&conn.client, &self.cfg.schema, cutoff)) {
                Ok(dropped) => {
                    for day in dropped {
                        self.known_days.remove(&day);
                    }
                }
                Err(e) => return Err(self.fail("drop expired partitions", &e)),
            }
        }
        self.last_maintenance = Instant::now();
        Ok(())
    }

    /// Runs `BEGIN`, `steps`, the checkpoint upsert; then appends `poison` (fsync'd) and
    /// `COMMIT`s. Returns the rows `steps` stored. On failure the transaction is rolled back
    /// (or the connection dropped) and the statement's error returned.
    fn transaction<'a>(
        &mut self,
        lsn: Lsn,
        tables: &[TableRows<'a>],
        staged: bool,
    ) -> Result<Stored<'a>, TxError> {
        let Some(conn) = self.conn.as_ref() else {
            return Err(TxError::Sink(SinkError::Postgres("not connected".into())));
        };
        let lsn_param = i64::try_from(lsn).map_err(|_| {
            TxError::Sink(SinkError::PostgresFatal(format!("lsn {lsn} does not fit a bigint")))
        })?;
        let result = self.rt.block_on(async {
            conn.client.batch_execute("BEGIN").await?;
            let mut stored = Stored::default();
            for t in tables.iter().filter(|t| !t.rows.is_empty()) {
                if staged {
                    let (rows, refused) = bisect(conn, &self.cfg.schema, t).await?;
                    stored.rows += rows;
                    stored.refused.extend(refused.into_iter().map(|(frame, error)| (t.kind, frame, error)));
                } else {
                    stored.rows +=
                        copy_in(&conn.client, conn.copy_statement(t.kind), &t.rows, 0..t.rows.len()).await?;
                }
            }
            conn.client.execute(&conn.save_checkpoint, &[&CHECKPOINT_KEY, &lsn_param]).await?;
            Ok::<_, tokio_postgres::Error>(stored)
        });
        match result {
            Ok(stored) => Ok(stored),
            Err(e) => {
                let rolled_back = self.rt.block_on(conn.client.batch_execute("ROLLBACK")).is_ok();
                if !rolled_back {
                    self.conn = None;
                }
                Err(TxError::Pg(e))
            }
        }
    }

    fn commit(&mut self) -> Result<(), SinkError> {
        let Some(conn) = self.conn.as_ref() else {
            return Err(SinkError::Postgres("not connected".into()));
        };
        match self.rt.block_on(conn.client.batch_execute("COMMIT")) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail("commit", &e)),
        }
    }

    fn rollback(&mut self) {
        if let Some(conn) = self.conn.as_ref() {
            if self.rt.block_on(conn.client.batch_execute("ROLLBACK")).is_err() {
                self.conn = None;
            }
        }
    }

    /// Appends the poison rows as dead-letter lines to today's poison file and fsyncs it.
    fn append_poison(&mut self, lsn: Lsn, poison: &[Poison<'_>]) -> Result<(), SinkError> {
        if poison.is_empty() || self.poison_written_for == Some(lsn) {
            return Ok(());
        }
        let mut buf = Vec::new();
        for p in poison {
            poison_line(p, &mut buf)?;
        }
        let dir = self.poison_dir();
        let created_dir = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let path = dir
            .join(format!("poison-{}.ndjson", rolling::date_string(now_micros().div_euclid(MICROS_PER_DAY))));
        let created_file = !path.exists();
        let mut file =
            OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io_err(&path, e))?;
        file.write_all(&buf).map_err(|e| io_err(&path, e))?;
        file.sync_data().map_err(|e| io_err(&path, e))?;
        if created_file {
            rolling::fsync_dir(&dir)?;
        }
        if created_dir {
            if let Some(parent) = dir.parent() {
                rolling::fsync_dir(parent)?;
            }
        }
        self.poison_written_for = Some(lsn);
        Ok(())
    }
}

/// What a transaction stored.
#[derive(Default)]
struct Stored<'a> {
    rows: u64,
    refused: Vec<(Kind, &'a Frame, String)>,
}

enum TxError {
    Pg(tokio_postgres::Error),
    Sink(SinkError),
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    fn write(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        if batch.lsn <= self.durable {
            tracing::debug!(sink = NAME, lsn = batch.lsn, durable = self.durable, "skipped replayed batch");
            return Ok(());
        }
        self.connect()?;
        if batch.lsn <= self.durable {
            // Committed before the connection was lost.
            return Ok(());
        }

        let mut poison: Vec<Poison<'_>> = Vec::new();
        let mut tables = Vec::with_capacity(2);
        for kind in Kind::ALL {
            let frames: Vec<&Frame> = batch.frames.iter().filter(|f| f.kind() == kind).collect();
            let (rows, unencodable) = EncodedRows::encode(frames.iter().copied());
            for (i, e) in unencodable {
                poison.push(Poison { frame: frames[i], error: format!("{} {}", e.sqlstate, e.message) });
            }
            tables.push(TableRows { kind, frames, rows });
        }
        self.ensure_days(batch.frames.iter().map(|f| f.ts.div_euclid(MICROS_PER_DAY)))?;

        // The common case: COPY straight into the tables.
        let mut staged = false;
        let stored = loop {
            match self.transaction(batch.lsn, &tables, staged) {
                Ok(stored) => break stored,
                Err(TxError::Sink(e)) => return Err(e),
                Err(TxError::Pg(e)) => {
                    let failure = schema::classify(e.code().map(|c| c.code()));
                    match failure {
                        Failure::Duplicate | Failure::Data if !staged => {
                            tracing::debug!(
                                sink = NAME,
                                lsn = batch.lsn,
                                error = %describe(&e),
                                "batch refused by COPY, redoing it through staging"
                            );
                            if failure == Failure::Data {
                                // A partition dropped behind our back (another instance's
                                // retention) looks like a data error: check the catalog again.
                                self.refresh_days()?;
                                self.ensure_days(
                                    batch.frames.iter().map(|f| f.ts.div_euclid(MICROS_PER_DAY)),
                                )?;
                            }
                            staged = true;
                        }
                        _ => return Err(self.fail("write batch", &e)),
                    }
                }
            }
        };
        for (kind, frame, error) in &stored.refused {
            tracing::warn!(sink = NAME, kind = %kind, vehicle_id = %frame.vehicle_id, ts = frame.ts, error = %error, "postgres refused a row");
            poison.push(Poison { frame, error: error.clone() });
        }
        if let Err(e) = self.append_poison(batch.lsn, &poison) {
            self.rollback();
            return Err(e);
        }
        self.commit()?;
        self.durable = batch.lsn;
        metrics::counter!("fleetpipe_frames_written_total", "sink" => NAME).increment(stored.rows);
        if !poison.is_empty() {
            metrics::counter!("fleetpipe_frames_rejected_total", "reason" => REFUSED_REASON)
                .increment(poison.len() as u64);
        }
        tracing::trace!(
            sink = NAME,
            lsn = batch.lsn,
            rows = stored.rows,
            refused = poison.len(),
            staged,
            "committed batch"
        );
        Ok(())
    }

    fn tick(&mut self, now: Instant) -> Result<(), SinkError> {
        if now.duration_since(self.last_maintenance) < MAINTENANCE_EVERY {
            return Ok(());
        }
        // Best effort: a failure here must not hold up writes (which reconnect on their own, and
        // create any partition they need); it is logged, counted and tried again next minute.
        self.last_maintenance = now;
        if let Err(e) = self.maintain() {
            metrics::counter!("fleetpipe_sink_errors_total", "sink" => NAME).increment(1);
            tracing::warn!(sink = NAME, error = %e, "partition maintenance failed, retrying in a minute");
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), SinkError> {
        // Every write commits; there is nothing to flush.
        Ok(())
    }
}

/// Opens a connection, runs the migrations when `migrate`, and prepares the sink's statements
/// (after the migrations: COPY needs its table to exist). Returns the versions applied.
async fn open_conn(
    url: &str,
    schema: &str,
    migrate: bool,
) -> Result<(Conn, Vec<i32>), tokio_postgres::Error> {
    let (mut client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(sink = NAME, error = %e, "postgres connection ended");
        }
    });
    let applied = if migrate { schema::migrate(&mut client, schema).await } else { Ok(Vec::new()) };
    let applied = match applied {
        Ok(applied) => applied,
        Err(e) => {
            task.abort();
            return Err(e);
        }
    };
    let q = schema::quote(schema);
    let copy_sql = |table: &str, columns: &[&str]| {
        format!("COPY {q}.{table} ({}) FROM STDIN (FORMAT binary)", columns.join(", "))
    };
    let statements = async {
        Ok::<_, tokio_postgres::Error>((
            client.prepare(&copy_sql("locations", LOCATION_COLUMNS)).await?,
            client.prepare(&copy_sql("diagnostics", DIAGNOSTIC_COLUMNS)).await?,
            client
                .prepare(&format!(
                    "INSERT INTO {q}.fleetpipe_checkpoints AS c (sink, lsn) VALUES ($1, $2)
                     ON CONFLICT (sink) DO UPDATE SET lsn = greatest(c.lsn, excluded.lsn)"
                ))
                .await?,
        ))
    };
    match statements.await {
        Ok((copy_locations, copy_diagnostics, save_checkpoint)) => {
            Ok((Conn { client, task, copy_locations, copy_diagnostics, save_checkpoint }, applied))
        }
        Err(e) => {
            task.abort();
            Err(e)
        }
    }
}

async fn read_checkpoint(client: &Client, schema: &str) -> Result<Lsn, tokio_postgres::Error> {
    let q = schema::quote(schema);
    let row = client
        .query_opt(&format!("SELECT lsn FROM {q}.fleetpipe_checkpoints WHERE sink = $1"), &[&CHECKPOINT_KEY])
        .await?;
    Ok(row.map_or(0, |r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)))
}

/// COPYs rows `range` of `rows` with the prepared COPY statement `stmt`; returns the rows stored.
async fn copy_in(
    client: &Client,
    stmt: &Statement,
    rows: &EncodedRows,
    range: std::ops::Range<usize>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in::<_, Bytes>(stmt).await?;
    futures_util::pin_mut!(sink);
    sink.feed(Bytes::from_static(HEADER)).await?;
    let data = rows.rows(range);
    let mut at = 0;
    while at < data.len() {
        let end = (at + COPY_CHUNK).min(data.len());
        sink.feed(data.slice(at..end)).await?;
        at = end;
    }
    sink.feed(Bytes::from_static(TRAILER)).await?;
    sink.as_mut().finish().await
}

/// Stores the rows of `t` through a staging table, `ON CONFLICT DO NOTHING`, isolating the rows
/// Postgres refuses by bisection under savepoints. Returns the rows inserted and the refused
/// frames with Postgres' error. Must run inside a transaction.
async fn bisect<'a>(
    conn: &Conn,
    schema: &str,
    t: &TableRows<'a>,
) -> Result<(u64, Vec<(&'a Frame, String)>), tokio_postgres::Error> {
    let q = schema::quote(schema);
    let table = match t.kind {
        Kind::Location => "locations",
        Kind::Diagnostic => "diagnostics",
    };
    let columns = match t.kind {
        Kind::Location => LOCATION_COLUMNS,
        Kind::Diagnostic => DIAGNOSTIC_COLUMNS,
    }
    .join(", ");
    let stage = format!("pg_temp.fleetpipe_stage_{table}");
    conn.client
        .batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS fleetpipe_stage_{table} (LIKE {q}.{table}) ON COMMIT DROP"
        ))
        .await?;
    let copy = conn.client.prepare(&format!("COPY {stage} ({columns}) FROM STDIN (FORMAT binary)")).await?;
    let move_rows = conn
        .client
        .prepare(&format!(
            "WITH moved AS (DELETE FROM {stage} RETURNING *)
             INSERT INTO {q}.{table} ({columns}) SELECT {columns} FROM moved ON CONFLICT DO NOTHING"
        ))
        .await?;

    let mut inserted = 0;
    let mut refused = Vec::new();
    // Ranges still to store; the first is the whole table, halves are pushed on a refusal.
    let mut todo = Vec::new();
    todo.push(0..t.rows.len());
    while let Some(range) = todo.pop() {
        conn.client.batch_execute("SAVEPOINT fleetpipe_bisect").await?;
        let attempt = async {
            copy_in(&conn.client, &copy, &t.rows, range.clone()).await?;
            conn.client.execute(&move_rows, &[]).await
        };
        match attempt.await {
            Ok(n) => {
                conn.client.batch_execute("RELEASE SAVEPOINT fleetpipe_bisect").await?;
                inserted += n;
            }
            Err(e) if schema::classify(e.code().map(|c| c.code())) == Failure::Data => {
                conn.client
                    .batch_execute(
                        "ROLLBACK TO SAVEPOINT fleetpipe_bisect; RELEASE SAVEPOINT fleetpipe_bisect",
                    )
                    .await?;
                if range.len() == 1 {
                    refused.push((t.frames[t.rows.source(range.start)], describe(&e)));
                } else {
                    let mid = range.start + range.len() / 2;
                    // Later half first onto the stack, so rows are tried in order.
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok((inserted, refused))
}

/// One dead-letter line for a poison row.
///
/// The line is [`dead_letter::encode_line`]'s, with reason `out_of_range`, detail
/// `postgres: SQLSTATE message (detail)` and `raw` the frame as contract JSON. A frame no longer
/// knows which source it came from (the log keeps frames, not messages), so `source` says
/// `"postgres"`, the stage that refused it, `topic` is null and `index` null.
fn poison_line(p: &Poison<'_>, out: &mut Vec<u8>) -> Result<(), SinkError> {
    let mut raw = Vec::new();
    fleetpipe_processors::codec::encode_json(p.frame, &mut raw);
    let rejection = Rejection {
        reason: Reason::OutOfRange,
        detail: format!("postgres: {}", p.error),
        index: None,
        raw: Bytes::from(raw),
        // Placeholder, replaced below: `Origin` has no variant for "refused by a sink".
        origin: Origin::Http,
        received_at: p.frame.received_at,
    };
    let mut line = Vec::new();
    dead_letter::encode_line(&rejection, &mut line)?;
    let mut value: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&line)?;
    value.insert("source".into(), NAME.into());
    serde_json::to_writer(&mut *out, &value)?;
    out.push(b'\n');
    Ok(())
}

fn pg_error(what: &str, e: &tokio_postgres::Error) -> SinkError {
    let detail = format!("{what}: {}", describe(e));
    match schema::classify(e.code().map(|c| c.code())) {
        Failure::Fatal => SinkError::PostgresFatal(detail),
        _ => SinkError::Postgres(detail),
    }
}

fn now_micros() -> Micros {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as Micros)
}
