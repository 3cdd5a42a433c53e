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
//!    under savepoints and bisects: halves are retried until each refused row is alone. The
//!    transaction is then rolled back and the refused *poison rows* reported to the driver
//!    ([`SinkError::Poison`]), which keeps them in the dead-letter store (source `postgres`,
//!    Postgres' error as the detail) before writing the batch again without them: a refused
//!    row never fails its batch or stalls the pipeline.
//!
//! Connection failures (refused, closed, `08xxx`, `57Pxx`, `53xxx`, …) are retryable: the
//! driver retries the same batch with backoff and the next call reconnects, re-reading the
//! checkpoint (so a batch whose `COMMIT` did land is not redone). Errors a retry cannot fix
//! (`42xxx`, `28xxx`, …) are not ([`is_retryable`]).
//!
//! Partitions: at open and from `tick` at most once a minute, the sink creates the partitions
//! of yesterday, today and the next `partitions_ahead_days` days, and drops those past
//! `retention_days` when one is configured (detaching them concurrently first). A batch whose
//! frames belong to other days (a backfill, of any year) gets their partitions before its COPY;
//! a cache of the days present saves the catalog query. Creating a partition locks its parent,
//! which is why the coming days are made ahead, off the path of live traffic.
//!
//! The sink's methods block: it owns a current-thread tokio runtime and a single connection, and
//! runs on its own OS thread like every sink.

mod copy;
mod reader;
pub(crate) mod schema;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetpipe_pipeline::tls::TlsFiles;
use fleetpipe_pipeline::{Poison, Sink, SinkError};
use fleetpipe_processors::time::day_of;
use fleetpipe_processors::{Batch, Kind, Lsn};
use futures_util::SinkExt;
use serde::Deserialize;
use tokio::runtime::Runtime;
use tokio_postgres::{Client, NoTls, Statement};

use self::copy::{EncodedRows, HEADER, TRAILER};
pub use self::reader::PostgresReader;
pub(crate) use self::schema::describe;
pub use self::schema::validate_schema_name;
use self::schema::Failure;
use crate::{Error, Result};

const NAME: &str = "postgres";
/// The checkpoint row's key in `{schema}.fleetpipe_checkpoints`.
const CHECKPOINT_KEY: &str = "postgres";
/// How often `tick` creates coming partitions and drops expired ones.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
/// Give up connecting after this long (the driver retries with backoff).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// COPY data is sent in messages of at most this size.
const COPY_CHUNK: usize = 1 << 20;

const COPY_SQL: &str = include_str!("sql/copy.sql");
const SAVE_CHECKPOINT_SQL: &str = include_str!("sql/save_checkpoint.sql");
const READ_CHECKPOINT_SQL: &str = include_str!("sql/read_checkpoint.sql");
const STAGE_CREATE_SQL: &str = include_str!("sql/stage_create.sql");
const STAGE_MOVE_SQL: &str = include_str!("sql/stage_move.sql");

/// The table of a kind.
pub(crate) fn table_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Location => "locations",
        Kind::Diagnostic => "diagnostics",
    }
}

/// A statement of `sql/` for `kind`'s table in `schema` (a validated identifier): `{schema}`,
/// `{table}` and `{columns}` filled in.
pub(crate) fn sql(text: &str, schema: &str, kind: Kind) -> String {
    text.replace("{schema}", &schema::quote(schema))
        .replace("{table}", table_of(kind))
        .replace("{columns}", &copy::columns(kind).join(", "))
}

/// `[postgres]`: the history tables.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style URL or key/value string: `postgres://user@host:5432/db`. Unset: no Postgres.
    pub url: Option<String>,
    /// Schema of the tables (created if missing); `[a-z_][a-z0-9_]*`.
    pub schema: String,
    /// Partitions are kept ready for today and this many days ahead (and yesterday).
    pub partitions_ahead_days: u32,
    /// Drop day partitions older than this many days; `None` keeps everything.
    pub retention_days: Option<u32>,
    /// TLS (required once any is set, or with `sslmode=require` in the url): the CA that signs
    /// the server's certificate (else the system's roots), and a client certificate and key.
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            schema: "public".into(),
            partitions_ahead_days: 3,
            retention_days: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl PostgresConfig {
    /// The defaults, for `url`.
    pub fn new(url: impl Into<String>) -> PostgresConfig {
        PostgresConfig { url: Some(url.into()), ..PostgresConfig::default() }
    }

    fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            section: "[postgres]",
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }

    /// How to connect: the parsed url, and TLS when configured (a TLS file set, or
    /// `sslmode=require`; TLS is then required, never silently skipped).
    pub(crate) fn connector(&self) -> Result<Connector> {
        let url = self.url.as_deref().ok_or_else(|| Error::PostgresSchema("no url configured".into()))?;
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| Error::PostgresSchema(format!("url: {e}")))?;
        let files = self.tls_files();
        let tls = if files.any() || config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            let client = files.client_config().map_err(|e| Error::PostgresSchema(e.to_string()))?;
            Some(tokio_postgres_rustls::MakeRustlsConnect::new((*client).clone()))
        } else {
            // `prefer` (the default) with no TLS configured: plain, as libpq without a CA would
            // not verify the server either.
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            None
        };
        Ok(Connector { config, tls })
    }
}

/// `fleetpipe check`: connects as the sink would and asks the server's version; checks the
/// schema name. Answers `host:port/db as user: PostgreSQL 15.19`.
pub async fn check(cfg: &PostgresConfig) -> Result<String> {
    schema::validate_schema_name(&cfg.schema).map_err(Error::PostgresSchema)?;
    let connector = cfg.connector()?;
    let (client, task) =
        tokio::time::timeout(CONNECT_TIMEOUT, connector.connect("check")).await.map_err(|_| {
            Error::PostgresConnectTimeout { target: connector.target(), after: CONNECT_TIMEOUT }
        })??;
    let version = client.query_one("SHOW server_version", &[]).await;
    task.abort();
    let version: String =
        version.map_err(|source| Error::Postgres { what: "SHOW server_version", source })?.get(0);
    Ok(format!("{}: PostgreSQL {version}", connector.target()))
}

/// A parsed url and its TLS connector, made once and used for every (re)connection.
#[derive(Clone)]
pub(crate) struct Connector {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    /// Connects and spawns the connection's task (on the current runtime), which logs how the
    /// connection ended as `who`.
    pub(crate) async fn connect(&self, who: &'static str) -> Result<(Client, tokio::task::JoinHandle<()>)> {
        fn drive<F>(who: &'static str, connection: F) -> tokio::task::JoinHandle<()>
        where
            F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(who, error = %e, "postgres connection ended");
                }
            })
        }
        let failed = |source| Error::PostgresConnect { target: self.target(), source };
        match &self.tls {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await.map_err(failed)?;
                Ok((client, drive(who, connection)))
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(failed)?;
                Ok((client, drive(who, connection)))
            }
        }
    }

    /// Where connections go, for errors: `host:port/database as user` (never the password).
    pub(crate) fn target(&self) -> String {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let port = c.get_ports().first().copied().unwrap_or(5432);
        let host = if hosts.is_empty() { "localhost".to_owned() } else { hosts.join(",") };
        let db = c.get_dbname().or(c.get_user()).unwrap_or("postgres");
        format!("{host}:{port}/{db} as {}", c.get_user().unwrap_or("(no user)"))
    }
}

/// Whether a retry can fix a failed Postgres call: the connection, the server or a conflict,
/// yes; a bad schema, a missing table, permissions, authentication, no.
pub fn is_retryable(e: &tokio_postgres::Error) -> bool {
    schema::classify(e.code().map(|c| c.code())) != Failure::Fatal
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

/// The rows of one table in a batch.
struct TableRows {
    kind: Kind,
    /// Positions in the batch of the frames encoded into `rows`' inputs.
    indices: Vec<usize>,
    rows: EncodedRows,
}

/// The Postgres sink. Every `write` commits; dropping it loses nothing.
pub struct PostgresSink {
    cfg: PostgresConfig,
    connector: Connector,
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

/// Opens the Postgres sink: connects, applies the migrations, reads the checkpoint and creates
/// the partitions of the coming days (dropping expired ones when a retention is set).
pub fn open(cfg: &PostgresConfig) -> Result<PostgresSink> {
    let connector = cfg.connector()?;
    validate_schema_name(&cfg.schema).map_err(Error::PostgresSchema)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    let mut sink = PostgresSink {
        cfg: cfg.clone(),
        connector,
        rt,
        conn: None,
        migrated: false,
        durable: 0,
        known_days: HashSet::new(),
        last_maintenance: Instant::now(),
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

impl PostgresSink {
    /// Connects unless connected; on a new connection runs the migrations (first time only),
    /// re-reads the checkpoint and the partitions present.
    fn connect(&mut self) -> Result<()> {
        if self.conn.as_ref().is_some_and(|c| !c.client.is_closed()) {
            return Ok(());
        }
        self.conn = None;
        let (connector, schema) = (&self.connector, self.cfg.schema.as_str());
        let migrate = !self.migrated;
        let (conn, applied, lsn, days) = self.rt.block_on(async {
            let (conn, applied) =
                match tokio::time::timeout(CONNECT_TIMEOUT, open_conn(connector, schema, migrate)).await {
                    Ok(opened) => opened?,
                    Err(_) => {
                        return Err(Error::PostgresConnectTimeout {
                            target: connector.target(),
                            after: CONNECT_TIMEOUT,
                        })
                    }
                };
            let lsn = read_checkpoint(&conn.client, schema)
                .await
                .map_err(|source| Error::Postgres { what: "read checkpoint", source })?;
            let tables = schema::day_tables(&conn.client, schema)
                .await
                .map_err(|source| Error::Postgres { what: "list partitions", source })?;
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
    fn fail(&mut self, what: &'static str, source: tokio_postgres::Error) -> Error {
        self.conn = None;
        let err = Error::Postgres { what, source };
        tracing::warn!(sink = NAME, error = %err, "postgres call failed");
        err
    }

    fn conn(&self) -> Result<&Conn> {
        self.conn.as_ref().ok_or(Error::PostgresNotConnected)
    }

    /// Re-reads which day partitions exist.
    fn refresh_days(&mut self) -> Result<()> {
        self.connect()?;
        match self.rt.block_on(schema::day_tables(&self.conn()?.client, &self.cfg.schema)) {
            Ok(tables) => {
                self.known_days = schema::complete_days(&tables);
                Ok(())
            }
            Err(e) => Err(self.fail("list partitions", e)),
        }
    }

    /// Creates the partitions of `days` that are not known to exist.
    fn ensure_days(&mut self, days: impl IntoIterator<Item = i64>) -> Result<()> {
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
            return Err(Error::PostgresNotConnected);
        };
        let result =
            self.rt.block_on(schema::create_partitions(&mut conn.client, &self.cfg.schema, &missing));
        if let Err(e) = result {
            return Err(self.fail("create partitions", e));
        }
        tracing::debug!(sink = NAME, days = missing.len(), first = missing[0], "created partitions");
        self.known_days.extend(missing);
        Ok(())
    }

    /// Coming partitions and retention.
    fn maintain(&mut self) -> Result<()> {
        let today = day_of(fleetpipe_pipeline::now_micros());
        self.ensure_days((today - 1)..=(today + i64::from(self.cfg.partitions_ahead_days)))?;
        if let Some(days) = self.cfg.retention_days {
            let cutoff = today - i64::from(days);
            self.connect()?;
            match self.rt.block_on(schema::drop_before(&self.conn()?.client, &self.cfg.schema, cutoff)) {
                Ok(dropped) => {
                    for day in dropped {
                        self.known_days.remove(&day);
                    }
                }
                Err(e) => return Err(self.fail("drop expired partitions", e)),
            }
        }
        self.last_maintenance = Instant::now();
        Ok(())
    }

    /// Runs `BEGIN`, the COPYs (or the staged, bisecting path), the checkpoint upsert. Returns
    /// what was stored and refused; the transaction is left open for [`Self::commit`] or
    /// [`Self::rollback`]. On failure it is rolled back (or the connection dropped) and the
    /// statement's error returned.
    fn transaction(&mut self, lsn: Lsn, tables: &[TableRows], staged: bool) -> Result<Stored, TxError> {
        let conn = self.conn().map_err(TxError::Sink)?;
        let lsn_param = i64::try_from(lsn).map_err(|_| TxError::Sink(Error::PostgresLsn(lsn)))?;
        let result = self.rt.block_on(async {
            conn.client.batch_execute("BEGIN").await?;
            let mut stored = Stored::default();
            for t in tables.iter().filter(|t| !t.rows.is_empty()) {
                if staged {
                    let (rows, refused) = bisect(conn, &self.cfg.schema, t).await?;
                    stored.rows += rows;
                    stored.refused.extend(refused);
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

    fn commit(&mut self) -> Result<()> {
        match self.rt.block_on(self.conn()?.client.batch_execute("COMMIT")) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail("commit", e)),
        }
    }

    fn rollback(&mut self) {
        if let Some(conn) = self.conn.as_ref() {
            if self.rt.block_on(conn.client.batch_execute("ROLLBACK")).is_err() {
                self.conn = None;
            }
        }
    }

    fn write_batch(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.connect()?;
        if batch.lsn <= self.durable {
            // Committed before the connection was lost.
            return Ok(());
        }

        let mut poison: Vec<Poison> = Vec::new();
        let mut tables = Vec::with_capacity(2);
        for kind in Kind::ALL {
            let indices: Vec<usize> =
                batch.frames.iter().enumerate().filter(|(_, f)| f.kind() == kind).map(|(i, _)| i).collect();
            let (rows, unencodable) = EncodedRows::encode(indices.iter().map(|&i| &batch.frames[i]));
            for (i, e) in unencodable {
                poison.push(Poison { index: indices[i], detail: format!("{} {}", e.sqlstate, e.message) });
            }
            tables.push(TableRows { kind, indices, rows });
        }
        if !poison.is_empty() {
            return Err(SinkError::Poison(poison));
        }
        self.ensure_days(batch.frames.iter().map(|f| day_of(f.ts)))?;

        // The common case: COPY straight into the tables.
        let mut staged = false;
        let stored = loop {
            match self.transaction(batch.lsn, &tables, staged) {
                Ok(stored) => break stored,
                Err(TxError::Sink(e)) => return Err(e.into()),
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
                                self.ensure_days(batch.frames.iter().map(|f| day_of(f.ts)))?;
                            }
                            staged = true;
                        }
                        _ => return Err(self.fail("write batch", e).into()),
                    }
                }
            }
        };
        if !stored.refused.is_empty() {
            // Nothing of the batch is stored until its poison rows are kept elsewhere.
            self.rollback();
            let poison = stored.refused.into_iter().map(|(index, detail)| Poison { index, detail }).collect();
            return Err(SinkError::Poison(poison));
        }
        self.commit()?;
        self.durable = batch.lsn;
        metrics::counter!("fleetpipe_frames_written_total", "sink" => NAME).increment(stored.rows);
        tracing::trace!(sink = NAME, lsn = batch.lsn, rows = stored.rows, staged, "committed batch");
        Ok(())
    }
}

/// What a transaction stored, and the rows (positions in the batch) Postgres refused.
#[derive(Default)]
struct Stored {
    rows: u64,
    refused: Vec<(usize, String)>,
}

enum TxError {
    Pg(tokio_postgres::Error),
    Sink(Error),
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.write_batch(batch)
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

    fn flush(&mut self) -> Result<(), SinkError> {
        // Every write commits; there is nothing to flush.
        Ok(())
    }
}

/// Opens a connection, runs the migrations when `migrate`, and prepares the sink's statements
/// (after the migrations: COPY needs its table to exist). Returns the versions applied.
async fn open_conn(connector: &Connector, schema: &str, migrate: bool) -> Result<(Conn, Vec<i32>)> {
    let (mut client, task) = connector.connect("postgres sink").await?;
    let applied = if migrate { schema::migrate(&mut client, schema).await } else { Ok(Vec::new()) };
    let applied = match applied {
        Ok(applied) => applied,
        Err(source) => {
            task.abort();
            return Err(Error::Postgres { what: "migrate", source });
        }
    };
    let statements = async {
        Ok::<_, tokio_postgres::Error>((
            client.prepare(&sql(COPY_SQL, schema, Kind::Location)).await?,
            client.prepare(&sql(COPY_SQL, schema, Kind::Diagnostic)).await?,
            client.prepare(&sql(SAVE_CHECKPOINT_SQL, schema, Kind::Location)).await?,
        ))
    };
    match statements.await {
        Ok((copy_locations, copy_diagnostics, save_checkpoint)) => {
            Ok((Conn { client, task, copy_locations, copy_diagnostics, save_checkpoint }, applied))
        }
        Err(source) => {
            task.abort();
            Err(Error::Postgres { what: "prepare", source })
        }
    }
}

async fn read_checkpoint(client: &Client, schema: &str) -> Result<Lsn, tokio_postgres::Error> {
    let row = client.query_opt(&sql(READ_CHECKPOINT_SQL, schema, Kind::Location), &[&CHECKPOINT_KEY]).await?;
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
/// frames (their positions in the batch) with Postgres' error. Must run inside a transaction.
async fn bisect(
    conn: &Conn,
    schema: &str,
    t: &TableRows,
) -> Result<(u64, Vec<(usize, String)>), tokio_postgres::Error> {
    let create = sql(STAGE_CREATE_SQL, schema, t.kind);
    conn.client.batch_execute(&create).await?;
    let stage = format!("pg_temp.fleetpipe_stage_{}", table_of(t.kind));
    let copy = conn
        .client
        .prepare(&format!("COPY {stage} ({}) FROM STDIN (FORMAT binary)", copy::columns(t.kind).join(", ")))
        .await?;
    let move_rows = conn.client.prepare(&sql(STAGE_MOVE_SQL, schema, t.kind)).await?;

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
                    refused.push((t.indices[t.rows.source(range.start)], describe(&e)));
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
