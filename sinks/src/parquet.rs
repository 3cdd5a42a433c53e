//! Hive-partitioned Parquet history (CONTRACT.md §5).
//!
//! Layout: `{root}/locations/date=YYYY-MM-DD/hour=HH/part-{g:010}-{n:04}.parquet` and the same
//! under `diagnostics/`, partitioned by the frame's event time `ts` (UTC). One file is open per
//! (kind, date, hour) partition the current generation touched; files are written aside under
//! hidden `.part-….parquet.tmp` names and published all at once by a roll (see
//! [`crate::rolling`]). The sink's checkpoint is `{root}/_fleetpipe/parquet/checkpoint.json`.
//!
//! Columns carry the contract's JSON names; `ts` and `received_at` are
//! `TIMESTAMP(MICROS, UTC)`, `dtcs` a list of `{code, spn, fmi, oc, sa}` structs (members that do
//! not apply are null), `signals` JSON text. A value the frame did not carry is NULL.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::file::properties::WriterProperties;
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray, TimestampMicrosecondArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};
use fleetpipe_processors::{Body, Diagnostic, Dtc, Frame, Kind, Location, Lsn, Micros};

use crate::rolling::{self, PendingFile, RollingDir, MICROS_PER_HOUR};
use crate::{Sink, SinkBatch, SinkError};

const NAME: &str = "parquet";
const EXT: &str = "parquet";
/// More partitions than this open at once (a wide backfill) rolls before the next batch, to
/// bound the memory of the writers' buffered row groups and the number of open descriptors.
pub const MAX_OPEN_FILES: usize = 256;

/// Settings of the Parquet sink.
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetConfig {
    /// `{data_dir}`: files go under `locations/` and `diagnostics/`, control files under
    /// `_fleetpipe/parquet/`. Other sinks may share this directory.
    pub root: PathBuf,
    /// Roll (publish all open files) once the oldest open file is this old.
    pub roll_after: Duration,
    /// Roll once any open file holds this many rows.
    pub max_file_rows: usize,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// ZSTD level (1..=22).
    pub zstd_level: i32,
}

impl ParquetConfig {
    /// Defaults (30 s, 1,000,000 rows per file, 128 Ki rows per row group, ZSTD 3) under `root`.
    pub fn new(root: impl Into<PathBuf>) -> ParquetConfig {
        ParquetConfig {
            root: root.into(),
            roll_after: Duration::from_secs(30),
            max_file_rows: 1_000_000,
            row_group_rows: 128 * 1024,
            zstd_level: 3,
        }
    }
}

impl Default for ParquetConfig {
    /// [`ParquetConfig::new`] under `./data`.
    fn default() -> ParquetConfig {
        ParquetConfig::new("data")
    }
}

/// Directory of a kind under `{data_dir}`.
pub fn kind_dir(kind: Kind) -> &'static str {
    match kind {
        Kind::Location => "locations",
        Kind::Diagnostic => "diagnostics",
    }
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Schema of `locations` files.
pub fn location_schema() -> SchemaRef {
    let f64n = |name: &str| Field::new(name, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        Field::new("vehicle_id", DataType::Utf8, false),
        Field::new("ts", ts_type(), false),
        Field::new("seq", DataType::Int64, false),
        Field::new("received_at", ts_type(), false),
        Field::new("lat", DataType::Float64, false),
        Field::new("lon", DataType::Float64, false),
        f64n("speed_kmh"),
        f64n("heading_deg"),
        f64n("alt_m"),
        f64n("accuracy_m"),
        Field::new("satellites", DataType::Int64, true),
        f64n("odometer_m"),
        Field::new("ignition", DataType::Boolean, true),
    ]))
}

/// Members of a `dtcs` item: `code` for OBD-II/UDS codes, `spn`/`fmi`/`oc`/`sa` for J1939.
pub fn dtc_fields() -> Fields {
    Fields::from(vec![
        Field::new("code", DataType::Utf8, true),
        Field::new("spn", DataType::Int64, true),
        Field::new("fmi", DataType::Int32, true),
        Field::new("oc", DataType::Int32, true),
        Field::new("sa", DataType::Int32, true),
    ])
}

fn dtc_item_field() -> FieldRef {
    Arc::new(Field::new("item", DataType::Struct(dtc_fields()), true))
}

/// Schema of `diagnostics` files.
pub fn diagnostic_schema() -> SchemaRef {
    let f64n = |name: &str| Field::new(name, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        Field::new("vehicle_id", DataType::Utf8, false),
        Field::new("ts", ts_type(), false),
        Field::new("seq", DataType::Int64, false),
        Field::new("received_at", ts_type(), false),
        f64n("engine_rpm"),
        f64n("coolant_temp_c"),
        f64n("engine_load_pct"),
        f64n("fuel_level_pct"),
        f64n("battery_soc_pct"),
        f64n("battery_v"),
        f64n("engine_hours"),
        f64n("odometer_m"),
        Field::new("mil_on", DataType::Boolean, true),
        Field::new("dtcs", DataType::List(dtc_item_field()), true),
        Field::new("signals", DataType::Utf8, true),
    ]))
}

/// A partition: kind and hour since the epoch (which gives date and hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PartKey {
    kind: Kind,
    hour: i64,
}

impl PartKey {
    fn of(frame: &Frame) -> PartKey {
        PartKey { kind: frame.kind(), hour: frame.ts.div_euclid(MICROS_PER_HOUR) }
    }
}

struct OpenFile {
    writer: ArrowWriter<File>,
    pending: PendingFile,
    rows: usize,
}

#[derive(Debug, Clone, Copy)]
struct PendingCommit {
    lsn: Lsn,
    rows: u64,
    reason: &'static str,
}

/// The Parquet sink. Dropping it without [`Sink::close`] publishes nothing (like a crash): the
/// open files stay temporary and are deleted at the next open, and the WAL replays them.
pub struct ParquetSink {
    cfg: ParquetConfig,
    dir: RollingDir,
    props: WriterProperties,
    location_schema: SchemaRef,
    diagnostic_schema: SchemaRef,
    open: HashMap<PartKey, OpenFile>,
    /// When the oldest open file was opened.
    oldest_open: Option<Instant>,
    /// Rows of the fullest open file.
    max_rows: usize,
    /// A roll whose files are closed and staged but whose commit failed; retried first.
    pending: Option<PendingCommit>,
    poisoned: Option<String>,
    durable: Lsn,
    /// Lsn of the last batch taken.
    last_lsn: Lsn,
    last_checkpoint: Instant,
}

impl std::fmt::Debug for ParquetSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetSink")
            .field("root", &self.cfg.root)
            .field("open_files", &self.open.len())
            .field("durable", &self.durable)
            .field("last_lsn", &self.last_lsn)
            .field("generation", &self.dir.generation())
            .finish_non_exhaustive()
    }
}

impl ParquetSink {
    /// Opens the sink: reads its checkpoint and deletes what an interrupted generation left
    /// (see [`crate::rolling`]). `durable_lsn()` is then the checkpoint's lsn.
    pub fn open(cfg: ParquetConfig) -> Result<ParquetSink, SinkError> {
        let level = ZstdLevel::try_new(cfg.zstd_level)?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(cfg.row_group_rows.max(1)))
            .set_created_by(format!("fleetpipe {}", env!("CARGO_PKG_VERSION")))
            .build();
        let dir = RollingDir::open(
            cfg.root.join("_fleetpipe").join(NAME),
            Kind::ALL.iter().map(|k| cfg.root.join(kind_dir(*k))).collect(),
            EXT,
        )?;
        let lsn = dir.checkpoint().lsn;
        tracing::info!(
            sink = NAME,
            root = %cfg.root.display(),
            lsn,
            generation = dir.checkpoint().generation,
            "opened parquet sink"
        );
        Ok(ParquetSink {
            cfg,
            dir,
            props,
            location_schema: location_schema(),
            diagnostic_schema: diagnostic_schema(),
            open: HashMap::new(),
            oldest_open: None,
            max_rows: 0,
            pending: None,
            poisoned: None,
            durable: lsn,
            last_lsn: lsn,
            last_checkpoint: Instant::now(),
        })
    }

    /// Number of files currently open (written aside, not yet published).
    pub fn open_files(&self) -> usize {
        self.open.len()
    }

    /// What opening cleaned up.
    pub fn recovery(&self) -> rolling::Recovery {
        self.dir.recovery()
    }

    fn partition_dir(&self, key: PartKey) -> PathBuf {
        let day = key.hour.div_euclid(24);
        let hour = key.hour.rem_euclid(24);
        self.cfg
            .root
            .join(kind_dir(key.kind))
            .join(format!("date={}", rolling::date_string(day)))
            .join(format!("hour={hour:02}"))
    }

    fn schema(&self, kind: Kind) -> &SchemaRef {
        match kind {
            Kind::Location => &self.location_schema,
            Kind::Diagnostic => &self.diagnostic_schema,
        }
    }

    /// Fails when poisoned; completes a roll whose commit failed before.
    fn ready(&mut self) -> Result<(), SinkError> {
        if let Some(detail) = &self.poisoned {
            return Err(SinkError::Poisoned { sink: NAME, durable: self.durable, detail: detail.clone() });
        }
        self.finish_commit()
    }

    /// Closes every open file and publishes them with a checkpoint at the last batch's lsn.
    fn roll(&mut self, reason: &'static str) -> Result<(), SinkError> {
        if self.pending.is_none() {
            let open = std::mem::take(&mut self.open);
            self.oldest_open = None;
            self.max_rows = 0;
            let mut rows = 0u64;
            let mut failure = None;
            let mut discard = Vec::new();
            for (_, f) in open {
                let OpenFile { writer, pending, rows: n } = f;
                if failure.is_some() || n == 0 {
                    drop(writer);
                    discard.push(pending.tmp);
                    continue;
                }
                // `into_inner` writes the last row group and the footer.
                match writer.into_inner() {
                    Ok(file) => match self.dir.stage(pending, file) {
                        Ok(()) => rows += n as u64,
                        Err(e) => failure = Some(e),
                    },
                    Err(e) => {
                        discard.push(pending.tmp);
                        failure = Some(e.into());
                    }
                }
            }
            for tmp in &discard {
                rolling::remove_quietly(tmp);
            }
            if let Some(e) = failure {
                return Err(self.poison(e));
            }
            self.pending = Some(PendingCommit { lsn: self.last_lsn, rows, reason });
        }
        self.finish_commit()
    }

    fn finish_commit(&mut self) -> Result<(), SinkError> {
        let Some(p) = self.pending else {
            return Ok(());
        };
        let files = self.dir.commit(p.lsn)?;
        self.pending = None;
        self.durable = self.durable.max(p.lsn);
        self.last_checkpoint = Instant::now();
        metrics::counter!("fleetpipe_frames_written_total", "sink" => NAME).increment(p.rows);
        metrics::counter!("fleetpipe_parquet_files_total").increment(files as u64);
        if files > 0 {
            tracing::info!(
                sink = NAME,
                files,
                rows = p.rows,
                lsn = p.lsn,
                generation = self.dir.checkpoint().generation,
                reason = p.reason,
                "rolled parquet files"
            );
        } else {
            tracing::debug!(sink = NAME, lsn = p.lsn, reason = p.reason, "moved checkpoint");
        }
        Ok(())
    }

    /// Drops every uncommitted file and refuses further work: the data written since the last
    /// commit is gone from this sink, only a reopen (and the WAL's replay) restores it.
    fn poison(&mut self, cause: SinkError) -> SinkError {
        for (_, f) in self.open.drain() {
            drop(f.writer);
            rolling::remove_quietly(&f.pending.tmp);
        }
        self.dir.abandon();
        self.pending = None;
        self.oldest_open = None;
        self.max_rows = 0;
        let detail = cause.to_string();
        tracing::error!(sink = NAME, error = %detail, durable = self.durable, "parquet sink poisoned");
        self.poisoned = Some(detail.clone());
        SinkError::Poisoned { sink: NAME, durable: self.durable, detail }
    }
}

impl Sink for ParquetSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    fn write(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        self.ready()?;
        if self.last_lsn > 0 && batch.lsn <= self.last_lsn {
            tracing::debug!(sink = NAME, lsn = batch.lsn, last = self.last_lsn, "skipped replayed batch");
            return Ok(());
        }
        if batch.frames.is_empty() {
            self.last_lsn = batch.lsn;
            if self.open.is_empty() {
                self.durable = batch.lsn;
            }
            return Ok(());
        }

        let mut groups: BTreeMap<PartKey, Vec<&Frame>> = BTreeMap::new();
        for frame in &batch.frames {
            groups.entry(PartKey::of(frame)).or_default().push(frame);
        }
        let new_parts = groups.keys().filter(|k| !self.open.contains_key(k)).count();
        if !self.open.is_empty() && self.open.len() + new_parts > MAX_OPEN_FILES {
            self.roll("open_files")?;
        }

        // Build every record batch before touching a file, so that an error leaves nothing
        // half-written.
        let mut built = HashMap::with_capacity(groups.len());
        for (key, frames) in &groups {
            let rb = match key.kind {
                Kind::Location => location_batch(self.schema(key.kind), frames)?,
                Kind::Diagnostic => diagnostic_batch(self.schema(key.kind), frames)?,
            };
            built.insert(*key, rb);
        }

        // Open the files this batch needs (a failure here has written nothing; a file opened
        // but left empty is dropped at the roll).
        let now = Instant::now();
        for key in groups.keys() {
            if self.open.contains_key(key) {
                continue;
            }
            let dir = self.partition_dir(*key);
            let (pending, file) = self.dir.create(&dir)?;
            let schema = self.schema(key.kind).clone();
            let writer = match ArrowWriter::try_new(file, schema, Some(self.props.clone())) {
                Ok(w) => w,
                Err(e) => {
                    rolling::remove_quietly(&pending.tmp);
                    return Err(e.into());
                }
            };
            self.open.insert(*key, OpenFile { writer, pending, rows: 0 });
            self.oldest_open.get_or_insert(now);
        }

        // Append. A failure here leaves a writer in an unknown state: poison.
        let mut failure = None;
        for (key, f) in self.open.iter_mut() {
            let Some(rb) = built.get(key) else { continue };
            if let Err(e) = f.writer.write(rb) {
                failure = Some(SinkError::from(e));
                break;
            }
            f.rows += rb.num_rows();
            self.max_rows = self.max_rows.max(f.rows);
        }
        if let Some(e) = failure {
            return Err(self.poison(e));
        }
        self.last_lsn = batch.lsn;
        Ok(())
    }

    fn tick(&mut self, now: Instant) -> Result<(), SinkError> {
        self.ready()?;
        let due = rolling::roll_due(rolling::RollState {
            oldest_open: self.oldest_open,
            fullest: self.max_rows,
            max_per_file: self.cfg.max_file_rows,
            roll_after: self.cfg.roll_after,
            unsaved: self.last_lsn > self.dir.checkpoint().lsn,
            last_checkpoint: self.last_checkpoint,
            now,
        });
        match due {
            Some(why) => self.roll(why),
            None => Ok(()),
        }
    }

    fn close(&mut self) -> Result<(), SinkError> {
        self.ready()?;
        if !self.open.is_empty() || self.last_lsn > self.dir.checkpoint().lsn {
            self.roll("close")?;
        }
        Ok(())
    }
}

fn ts_array(values: impl Iterator<Item = Micros>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(values).with_timezone("UTC"))
}

/// `seq` is an unsigned device counter stored as Int64 (bit-preserving beyond `i64::MAX`).
fn seq_i64(seq: u64) -> i64 {
    seq as i64
}

fn location_batch(schema: &SchemaRef, frames: &[&Frame]) -> Result<RecordBatch, SinkError> {
    let rows: Vec<(&Frame, &Location)> = frames
        .iter()
        .filter_map(|f| match &f.body {
            Body::Location(l) => Some((*f, l)),
            Body::Diagnostic(_) => None,
        })
        .collect();
    let f64col = |get: fn(&Location) -> Option<f64>| -> ArrayRef {
        Arc::new(rows.iter().map(|(_, l)| get(l)).collect::<Float64Array>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|(f, _)| f.vehicle_id.as_str()))),
        ts_array(rows.iter().map(|(f, _)| f.ts)),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|(f, _)| seq_i64(f.seq)))),
        ts_array(rows.iter().map(|(f, _)| f.received_at)),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(_, l)| l.lat))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(_, l)| l.lon))),
        f64col(|l| l.speed_kmh),
        f64col(|l| l.heading_deg),
        f64col(|l| l.alt_m),
        f64col(|l| l.accuracy_m),
        Arc::new(rows.iter().map(|(_, l)| l.satellites.map(i64::from)).collect::<Int64Array>()),
        f64col(|l| l.odometer_m),
        Arc::new(rows.iter().map(|(_, l)| l.ignition).collect::<BooleanArray>()),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn diagnostic_batch(schema: &SchemaRef, frames: &[&Frame]) -> Result<RecordBatch, SinkError> {
    let rows: Vec<(&Frame, &Diagnostic)> = frames
        .iter()
        .filter_map(|f| match &f.body {
            Body::Diagnostic(d) => Some((*f, &**d)),
            Body::Location(_) => None,
        })
        .collect();
    let f64col = |get: fn(&Diagnostic) -> Option<f64>| -> ArrayRef {
        Arc::new(rows.iter().map(|(_, d)| get(d)).collect::<Float64Array>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|(f, _)| f.vehicle_id.as_str()))),
        ts_array(rows.iter().map(|(f, _)| f.ts)),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|(f, _)| seq_i64(f.seq)))),
        ts_array(rows.iter().map(|(f, _)| f.received_at)),
        f64col(|d| d.engine_rpm),
        f64col(|d| d.coolant_temp_c),
        f64col(|d| d.engine_load_pct),
        f64col(|d| d.fuel_level_pct),
        f64col(|d| d.battery_soc_pct),
        f64col(|d| d.battery_v),
        f64col(|d| d.engine_hours),
        f64col(|d| d.odometer_m),
        Arc::new(rows.iter().map(|(_, d)| d.mil_on).collect::<BooleanArray>()),
        Arc::new(dtcs_array(rows.iter().map(|(_, d)| d.dtcs.as_deref()))?),
        Arc::new(rows.iter().map(|(_, d)| d.signals.as_deref()).collect::<StringArray>()),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// `List<Struct{code, spn, fmi, oc, sa}>`: null for a frame without `dtcs`, empty for an empty
/// list; `code` for OBD-II/UDS codes, the J1939 members otherwise, the rest null.
fn dtcs_array<'a>(lists: impl ExactSizeIterator<Item = Option<&'a [Dtc]>>) -> Result<ListArray, SinkError> {
    let n = lists.len();
    let mut lengths = Vec::with_capacity(n);
    let mut valid = Vec::with_capacity(n);
    let mut code: Vec<Option<&str>> = Vec::new();
    let mut spn: Vec<Option<i64>> = Vec::new();
    let mut fmi: Vec<Option<i32>> = Vec::new();
    let mut oc: Vec<Option<i32>> = Vec::new();
    let mut sa: Vec<Option<i32>> = Vec::new();
    for list in lists {
        let Some(list) = list else {
            lengths.push(0);
            valid.push(false);
            continue;
        };
        lengths.push(list.len());
        valid.push(true);
        for dtc in list {
            match dtc {
                Dtc::Obd(c) => {
                    code.push(Some(c.as_str()));
                    spn.push(None);
                    fmi.push(None);
                    oc.push(None);
                    sa.push(None);
                }
                Dtc::J1939 { spn: s, fmi: f, oc: o, sa: a } => {
                    code.push(None);
                    spn.push(Some(i64::from(*s)));
                    fmi.push(Some(i32::from(*f)));
                    oc.push(Some(i32::from(*o)));
                    sa.push(Some(i32::from(*a)));
                }
            }
        }
    }
    let items = StructArray::try_new(
        dtc_fields(),
        vec![
            Arc::new(StringArray::from(code)) as ArrayRef,
            Arc::new(Int64Array::from(spn)),
            Arc::new(Int32Array::from(fmi)),
            Arc::new(Int32Array::from(oc)),
            Arc::new(Int32Array::from(sa)),
        ],
        None,
    )?;
    let nulls = if valid.iter().all(|v| *v) { None } else { Some(NullBuffer::from(valid)) };
    Ok(ListArray::try_new(dtc_item_field(), OffsetBuffer::from_lengths(lengths), Arc::new(items), nulls)?)
}
