//! Hive-partitioned Parquet history (CONTRACT.md §5), a [`Format`] under the rolling-file
//! mechanism ([`crate::files`]).
//!
//! Layout: `{root}/locations/date=YYYY-MM-DD/hour=HH/part-{g:010}-{n:04}.parquet` and the same
//! under `diagnostics/`, partitioned by the frame's event time `ts` (UTC). The sink's checkpoint
//! is `{root}/_fleetpipe/parquet/checkpoint.json`.
//!
//! Columns carry the contract's JSON names; `ts` and `received_at` are
//! `TIMESTAMP(MICROS, UTC)`, `dtcs` a list of `{code, spn, fmi, oc, sa}` structs (members that do
//! not apply are null), `signals` JSON text. A value the frame did not carry is NULL.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::file::properties::WriterProperties;
use ::parquet::schema::types::ColumnPath;
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray, TimestampMicrosecondArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};
use fleetpipe_processors::time::{date_string, hour_of};
use fleetpipe_processors::{Batch, Body, Diagnostic, Dtc, Frame, Kind, Location, Micros};
use serde::Deserialize;

use crate::files::rolling::RollingDir;
use crate::files::{Format, RollPolicy, RollingSink};
use crate::Result;

/// More partitions than this open at once (a wide backfill) rolls before the next batch, to
/// bound the memory of the writers' buffered row groups and the number of open descriptors.
pub const MAX_OPEN_FILES: usize = 256;

/// `[parquet]`: the Parquet history.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetConfig {
    pub enabled: bool,
    /// Open files are closed (and become visible) at least this often (seconds).
    pub roll_secs: f64,
    /// Roll once any open file holds this many rows.
    pub max_file_rows: usize,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// ZSTD level (1..=22).
    pub zstd_level: i32,
}

impl Default for ParquetConfig {
    fn default() -> ParquetConfig {
        ParquetConfig {
            enabled: true,
            roll_secs: 30.0,
            max_file_rows: 1_000_000,
            row_group_rows: 128 * 1024,
            zstd_level: 3,
        }
    }
}

/// The Parquet sink.
pub type ParquetSink = RollingSink<ParquetFormat>;

/// Opens the Parquet sink under `{root}`: files go under `locations/` and `diagnostics/`,
/// control files under `_fleetpipe/parquet/` (other sinks may share `root`). Reads its
/// checkpoint and deletes what an interrupted generation left; `durable_lsn()` is then the
/// checkpoint's lsn.
pub fn open(cfg: &ParquetConfig, root: &Path) -> Result<ParquetSink> {
    let level = ZstdLevel::try_new(cfg.zstd_level)?;
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(cfg.row_group_rows.max(1)))
        // Dictionary encoding only where values repeat: times, positions and counters are
        // nearly all distinct, so a dictionary there is built, overflows and is thrown away
        // (a hash insert per value; 15 % of the sink's CPU). ZSTD compresses them as well.
        .set_dictionary_enabled(false);
    for column in DICTIONARY_COLUMNS {
        let path = ColumnPath::new(column.split('.').map(String::from).collect());
        props = props.set_column_dictionary_enabled(path, true);
    }
    let props = props.set_created_by(format!("fleetpipe {}", env!("CARGO_PKG_VERSION"))).build();
    let dir = RollingDir::open(
        root.join("_fleetpipe").join(ParquetFormat::SINK),
        Kind::ALL.iter().map(|k| root.join(kind_dir(*k))).collect(),
        ParquetFormat::EXT,
    )?;
    let policy = RollPolicy {
        roll_after: Duration::from_secs_f64(cfg.roll_secs.max(0.0)),
        max_file_rows: cfg.max_file_rows,
        max_open_files: MAX_OPEN_FILES,
    };
    let format = ParquetFormat {
        root: root.to_path_buf(),
        props,
        location_schema: location_schema(),
        diagnostic_schema: diagnostic_schema(),
    };
    Ok(RollingSink::new(format, policy, dir))
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

/// The columns every row starts with.
fn head_fields() -> [Field; 4] {
    [
        Field::new("vehicle_id", DataType::Utf8, false),
        Field::new("ts", ts_type(), false),
        Field::new("seq", DataType::Int64, false),
        Field::new("received_at", ts_type(), false),
    ]
}

fn f64_field(name: &str) -> Field {
    Field::new(name, DataType::Float64, true)
}

/// The columns whose values repeat (dictionary-encoded; every other column is plain).
const DICTIONARY_COLUMNS: &[&str] = &["vehicle_id", "satellites", "dtcs.list.item.code"];

/// Schema of `locations` files.
pub fn location_schema() -> SchemaRef {
    let mut fields = head_fields().to_vec();
    fields.extend([
        Field::new("lat", DataType::Float64, false),
        Field::new("lon", DataType::Float64, false),
        f64_field("speed_kmh"),
        f64_field("heading_deg"),
        f64_field("alt_m"),
        f64_field("accuracy_m"),
        Field::new("satellites", DataType::Int64, true),
        f64_field("odometer_m"),
        Field::new("ignition", DataType::Boolean, true),
    ]);
    Arc::new(Schema::new(fields))
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
    let mut fields = head_fields().to_vec();
    fields.extend(Diagnostic::MEASURES.iter().map(|m| f64_field(m.name)));
    fields.extend([
        Field::new("mil_on", DataType::Boolean, true),
        Field::new("dtcs", DataType::List(dtc_item_field()), true),
        Field::new("signals", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// A partition: kind and hour since the epoch (which gives date and hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartKey {
    kind: Kind,
    hour: i64,
}

/// Parquet files of locations and diagnostics, by kind, date and hour of `ts`.
pub struct ParquetFormat {
    root: PathBuf,
    props: WriterProperties,
    location_schema: SchemaRef,
    diagnostic_schema: SchemaRef,
}

impl ParquetFormat {
    fn schema(&self, kind: Kind) -> &SchemaRef {
        match kind {
            Kind::Location => &self.location_schema,
            Kind::Diagnostic => &self.diagnostic_schema,
        }
    }
}

impl Format for ParquetFormat {
    const SINK: &'static str = "parquet";
    const EXT: &'static str = "parquet";
    type Key = PartKey;
    type Chunk = RecordBatch;
    type Writer = ArrowWriter<File>;

    fn encode(&self, batch: &Batch) -> Result<BTreeMap<PartKey, RecordBatch>> {
        let mut groups: BTreeMap<PartKey, Vec<&Frame>> = BTreeMap::new();
        for frame in &batch.frames {
            groups.entry(PartKey { kind: frame.kind(), hour: hour_of(frame.ts) }).or_default().push(frame);
        }
        groups
            .into_iter()
            .map(|(key, frames)| {
                let rb = match key.kind {
                    Kind::Location => location_batch(self.schema(key.kind), &frames)?,
                    Kind::Diagnostic => diagnostic_batch(self.schema(key.kind), &frames)?,
                };
                Ok((key, rb))
            })
            .collect()
    }

    fn rows(chunk: &RecordBatch) -> usize {
        chunk.num_rows()
    }

    fn dir(&self, key: PartKey) -> PathBuf {
        self.root
            .join(kind_dir(key.kind))
            .join(format!("date={}", date_string(key.hour.div_euclid(24))))
            .join(format!("hour={:02}", key.hour.rem_euclid(24)))
    }

    fn create(&self, key: PartKey, file: File) -> Result<ArrowWriter<File>> {
        Ok(ArrowWriter::try_new(file, self.schema(key.kind).clone(), Some(self.props.clone()))?)
    }

    fn append(&self, writer: &mut ArrowWriter<File>, chunk: &RecordBatch) -> Result<()> {
        Ok(writer.write(chunk)?)
    }

    fn finish(&self, writer: ArrowWriter<File>) -> Result<File> {
        // `into_inner` writes the last row group and the footer.
        Ok(writer.into_inner()?)
    }
}

fn ts_array(values: impl Iterator<Item = Micros>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(values).with_timezone("UTC"))
}

/// `seq` is an unsigned device counter stored as Int64 (bit-preserving beyond `i64::MAX`).
fn seq_i64(seq: u64) -> i64 {
    seq as i64
}

/// The columns of [`head_fields`].
fn head_columns<B>(rows: &[(&Frame, &B)]) -> Vec<ArrayRef> {
    vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|(f, _)| f.vehicle_id.as_str()))),
        ts_array(rows.iter().map(|(f, _)| f.ts)),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|(f, _)| seq_i64(f.seq)))),
        ts_array(rows.iter().map(|(f, _)| f.received_at)),
    ]
}

fn location_batch(schema: &SchemaRef, frames: &[&Frame]) -> Result<RecordBatch> {
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
    let mut columns = head_columns(&rows);
    columns.extend([
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(_, l)| l.lat))) as ArrayRef,
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(_, l)| l.lon))),
        f64col(|l| l.speed_kmh),
        f64col(|l| l.heading_deg),
        f64col(|l| l.alt_m),
        f64col(|l| l.accuracy_m),
        Arc::new(rows.iter().map(|(_, l)| l.satellites.map(i64::from)).collect::<Int64Array>()),
        f64col(|l| l.odometer_m),
        Arc::new(rows.iter().map(|(_, l)| l.ignition).collect::<BooleanArray>()),
    ]);
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn diagnostic_batch(schema: &SchemaRef, frames: &[&Frame]) -> Result<RecordBatch> {
    let rows: Vec<(&Frame, &Diagnostic)> = frames
        .iter()
        .filter_map(|f| match &f.body {
            Body::Diagnostic(d) => Some((*f, &**d)),
            Body::Location(_) => None,
        })
        .collect();
    let mut columns = head_columns(&rows);
    for m in &Diagnostic::MEASURES {
        columns.push(Arc::new(rows.iter().map(|(_, d)| (m.get)(d)).collect::<Float64Array>()));
    }
    columns.extend([
        Arc::new(rows.iter().map(|(_, d)| d.mil_on).collect::<BooleanArray>()) as ArrayRef,
        Arc::new(dtcs_array(rows.iter().map(|(_, d)| d.dtcs.as_deref()))?),
        Arc::new(rows.iter().map(|(_, d)| d.signals.as_deref()).collect::<StringArray>()),
    ]);
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// `List<Struct{code, spn, fmi, oc, sa}>`: null for a frame without `dtcs`, empty for an empty
/// list; `code` for OBD-II/UDS codes, the J1939 members otherwise, the rest null.
fn dtcs_array<'a>(lists: impl ExactSizeIterator<Item = Option<&'a [Dtc]>>) -> Result<ListArray> {
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
