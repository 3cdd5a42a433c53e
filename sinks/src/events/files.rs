//! The events sink's files: Parquet `events/` and `trips/`, hive-partitioned by date, and the
//! engine's state, committed together.
//!
//! Each commit writes the new files and a snapshot of the state aside, then a checkpoint naming
//! them and the log position they cover, then puts them in place. The checkpoint is the commit
//! point: after a crash the renames it names are redone and anything else written aside is
//! deleted.
//!
//! Layout: `{root}/events/date=YYYY-MM-DD/events-{g:010}.parquet` (by the event's `ts`),
//! `{root}/trips/date=YYYY-MM-DD/trips-{g:010}.parquet` (by the trip's start), control files
//! under `{root}/_fleetpipe/events/`.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::file::properties::WriterProperties;
use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use fleetpipe_pipeline::event_store::EventStore;
use fleetpipe_processors::events::{event_json, trip_json, Event, Trip, What};
use fleetpipe_processors::time::{date_string, day_of};
use fleetpipe_processors::{Lsn, Micros};
use serde::{Deserialize, Serialize};

use super::{record_event_json, record_trip_json, EventOutput, State};
use crate::files::rolling::{fsync_dir, remove_quietly};
use crate::{io_err, Error, Result};

const NAME: &str = "events";

/// The commit record: the position covered, the snapshot, and the renames that publish it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    lsn: Lsn,
    generation: u64,
    /// The engine's state, relative to the control directory.
    state: Option<String>,
    /// `(written aside, final)`, relative to the root.
    renames: Vec<(String, String)>,
}

/// Parquet files and the state under the data directory.
pub struct FilesOutput {
    root: PathBuf,
    control: PathBuf,
    checkpoint: Checkpoint,
    state: Option<Vec<u8>>,
    props: WriterProperties,
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Columns of `events/`.
pub fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("vehicle_id", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("ts", ts_type(), false),
        Field::new("detected_at", ts_type(), false),
        Field::new("trip_id", DataType::Utf8, true),
        Field::new("json", DataType::Utf8, false),
    ]))
}

/// Columns of `trips/`.
pub fn trips_schema() -> SchemaRef {
    let f64_field = |n: &str| Field::new(n, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        Field::new("trip_id", DataType::Utf8, false),
        Field::new("vehicle_id", DataType::Utf8, false),
        Field::new("start_ts", ts_type(), false),
        Field::new("end_ts", ts_type(), false),
        f64_field("start_lat"),
        f64_field("start_lon"),
        f64_field("end_lat"),
        f64_field("end_lon"),
        f64_field("distance_m"),
        f64_field("duration_s"),
        f64_field("moving_s"),
        f64_field("max_speed_kmh"),
        f64_field("avg_speed_kmh"),
        f64_field("odometer_start_m"),
        f64_field("odometer_end_m"),
        f64_field("fuel_used_pct"),
        f64_field("energy_used_pct"),
        Field::new("dtcs", DataType::Utf8, false),
        Field::new("json", DataType::Utf8, false),
    ]))
}

fn ts_array(values: impl Iterator<Item = Micros>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(values).with_timezone("UTC"))
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

fn floats(values: impl Iterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(values.collect::<Float64Array>())
}

fn trip_id_of(e: &Event) -> Option<&str> {
    match &e.what {
        What::TripStarted { trip_id, .. } => Some(trip_id),
        What::TripCompleted(t) => Some(&t.trip_id),
        What::DtcRaised { trip_id, .. } => trip_id.as_deref(),
        _ => None,
    }
}

fn events_batch(events: &[&Event]) -> Result<RecordBatch> {
    let json: Vec<String> = events.iter().map(|e| event_json(e).to_string()).collect();
    Ok(RecordBatch::try_new(
        events_schema(),
        vec![
            strings(events.iter().map(|e| Some(e.event_id.as_str()))),
            strings(events.iter().map(|e| Some(e.vehicle_id.as_str()))),
            strings(events.iter().map(|e| Some(e.what.type_name()))),
            ts_array(events.iter().map(|e| e.ts)),
            ts_array(events.iter().map(|e| e.detected_at)),
            strings(events.iter().map(|e| trip_id_of(e))),
            strings(json.iter().map(|j| Some(j.as_str()))),
        ],
    )?)
}

fn trips_batch(trips: &[&Trip]) -> Result<RecordBatch> {
    let json: Vec<serde_json::Value> = trips.iter().map(|t| trip_json(t)).collect();
    let num = |key: &str| floats(json.iter().map(|j| j[key].as_f64()));
    let dtcs: Vec<String> = json.iter().map(|j| j["dtcs"].to_string()).collect();
    let text: Vec<String> = json.iter().map(|j| j.to_string()).collect();
    Ok(RecordBatch::try_new(
        trips_schema(),
        vec![
            strings(trips.iter().map(|t| Some(t.trip_id.as_str()))),
            strings(trips.iter().map(|t| Some(t.vehicle_id.as_str()))),
            ts_array(trips.iter().map(|t| t.start.ts)),
            ts_array(trips.iter().map(|t| t.end.ts)),
            floats(trips.iter().map(|t| Some(t.start.lat))),
            floats(trips.iter().map(|t| Some(t.start.lon))),
            floats(trips.iter().map(|t| Some(t.end.lat))),
            floats(trips.iter().map(|t| Some(t.end.lon))),
            num("distance_m"),
            num("duration_s"),
            num("moving_s"),
            num("max_speed_kmh"),
            num("avg_speed_kmh"),
            num("odometer_start_m"),
            num("odometer_end_m"),
            num("fuel_used_pct"),
            num("energy_used_pct"),
            strings(dtcs.iter().map(|d| Some(d.as_str()))),
            strings(text.iter().map(|t| Some(t.as_str()))),
        ],
    )?)
}

/// Every committed file of `dir` (recursively) whose name starts with `prefix`.
fn committed(dir: &Path, prefix: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            committed(&path, prefix, out)?;
        } else if name.starts_with('.') && name.ends_with(".tmp") {
            // Written aside by a commit that did not happen.
            remove_quietly(&path);
        } else if name.starts_with(prefix) && name.ends_with(".parquet") {
            out.push(path);
        }
    }
    Ok(())
}

/// The `json` column of every row of a file.
fn read_json_column(path: &Path) -> Result<Vec<serde_json::Value>> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut out = Vec::new();
    for rb in reader {
        let rb = rb?;
        let Some(col) = rb.column_by_name("json").and_then(|c| c.as_any().downcast_ref::<StringArray>())
        else {
            return Err(Error::Corrupt { path: path.to_owned(), detail: "no json column".into() });
        };
        for i in 0..col.len() {
            out.push(serde_json::from_str(col.value(i))?);
        }
    }
    Ok(out)
}

fn write_json_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

/// Opens the files under `root` (the data directory): redoes an interrupted commit, deletes
/// what an unfinished one left, reads the state, and fills `store` from the committed files.
pub fn open(root: &Path, store: &EventStore) -> Result<FilesOutput> {
    let control = root.join("_fleetpipe").join(NAME);
    std::fs::create_dir_all(&control).map_err(|e| io_err(&control, e))?;
    let cp_path = control.join("checkpoint.json");
    let checkpoint: Checkpoint = match std::fs::read(&cp_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::Checkpoint { path: cp_path.clone(), detail: e.to_string() })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Checkpoint::default(),
        Err(e) => return Err(io_err(&cp_path, e)),
    };
    redo(root, &checkpoint)?;
    // Snapshots other than the checkpoint's are leftovers.
    for entry in std::fs::read_dir(&control).map_err(|e| io_err(&control, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "checkpoint.json" && checkpoint.state.as_deref() != Some(name.as_str()) {
            remove_quietly(&entry.path());
        }
    }
    let state = match &checkpoint.state {
        Some(state) => {
            let path = control.join(state);
            Some(std::fs::read(&path).map_err(|e| io_err(&path, e))?)
        }
        None => None,
    };
    let (mut events, mut trips) = (Vec::new(), Vec::new());
    committed(&root.join("events"), "events-", &mut events)?;
    committed(&root.join("trips"), "trips-", &mut trips)?;
    events.sort();
    trips.sort();
    for path in &events {
        for e in read_json_column(path)? {
            record_event_json(store, e, false);
        }
    }
    for path in &trips {
        for t in read_json_column(path)? {
            record_trip_json(store, t);
        }
    }
    let level = ZstdLevel::try_new(3)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_created_by(format!("fleetpipe {}", env!("CARGO_PKG_VERSION")))
        .build();
    tracing::debug!(
        lsn = checkpoint.lsn,
        event_files = events.len(),
        trip_files = trips.len(),
        "events files opened"
    );
    Ok(FilesOutput { root: root.to_path_buf(), control, checkpoint, state, props })
}

/// Puts in place what the checkpoint names (a no-op for what is in place already).
fn redo(root: &Path, cp: &Checkpoint) -> Result<()> {
    let mut dirs = HashSet::new();
    for (from, to) in &cp.renames {
        let (from, to) = (root.join(from), root.join(to));
        if from.exists() {
            std::fs::rename(&from, &to).map_err(|e| io_err(&from, e))?;
            if let Some(d) = to.parent() {
                dirs.insert(d.to_path_buf());
            }
        }
    }
    for d in dirs {
        fsync_dir(&d)?;
    }
    Ok(())
}

impl FilesOutput {
    /// Writes one Parquet file aside under `dir`; returns its `(aside, final)` names.
    fn write_file(&self, dir: PathBuf, prefix: &str, gen: u64, rb: &RecordBatch) -> Result<(String, String)> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let aside = dir.join(format!(".{prefix}{gen:010}.parquet.tmp"));
        let file = File::create(&aside).map_err(|e| io_err(&aside, e))?;
        let mut w = ArrowWriter::try_new(file, rb.schema(), Some(self.props.clone()))?;
        w.write(rb)?;
        let file = w.into_inner()?;
        file.sync_all().map_err(|e| io_err(&aside, e))?;
        let fin = dir.join(format!("{prefix}{gen:010}.parquet"));
        let rel = |p: &Path| p.strip_prefix(&self.root).unwrap_or(p).to_string_lossy().into_owned();
        Ok((rel(&aside), rel(&fin)))
    }
}

impl EventOutput for FilesOutput {
    fn name(&self) -> &'static str {
        "events"
    }

    fn committed(&mut self) -> (Lsn, Option<Vec<u8>>) {
        (self.checkpoint.lsn, self.state.take())
    }

    fn commit(&mut self, lsn: Lsn, events: &[Event], state: &State<'_>) -> Result<()> {
        let gen = self.checkpoint.generation + 1;
        let mut renames = Vec::new();
        let mut by_day: BTreeMap<i64, Vec<&Event>> = BTreeMap::new();
        let mut trips_by_day: BTreeMap<i64, Vec<&Trip>> = BTreeMap::new();
        for e in events {
            by_day.entry(day_of(e.ts)).or_default().push(e);
            if let What::TripCompleted(t) = &e.what {
                trips_by_day.entry(day_of(t.start.ts)).or_default().push(t);
            }
        }
        for (day, events) in &by_day {
            let dir = self.root.join("events").join(format!("date={}", date_string(*day)));
            renames.push(self.write_file(dir, "events-", gen, &events_batch(events)?)?);
        }
        for (day, trips) in &trips_by_day {
            let dir = self.root.join("trips").join(format!("date={}", date_string(*day)));
            renames.push(self.write_file(dir, "trips-", gen, &trips_batch(trips)?)?);
        }
        let state_name = format!("state-{gen:010}.json");
        let state_path = self.control.join(&state_name);
        state.write_file(&state_path, b"").map_err(|e| io_err(&state_path, e))?;
        let old_state = self.checkpoint.state.clone();
        let next = Checkpoint { lsn, generation: gen, state: Some(state_name), renames };
        let tmp = self.control.join("checkpoint.tmp");
        write_json_file(&tmp, &serde_json::to_vec(&next)?)?;
        let cp = self.control.join("checkpoint.json");
        std::fs::rename(&tmp, &cp).map_err(|e| io_err(&cp, e))?;
        fsync_dir(&self.control)?;
        redo(&self.root, &next)?;
        if let Some(old) = old_state {
            remove_quietly(&self.control.join(old));
        }
        self.checkpoint = next;
        Ok(())
    }
}
