//! The dead-letter store: every rejected frame or payload, with its reason, raw bytes and source
//! — a [`Format`] under the rolling-file mechanism ([`crate::files`]).
//!
//! Layout: `{root}/date=YYYY-MM-DD/part-{g:010}-{n:04}.ndjson` (date of `received_at`, UTC), root
//! usually `{data_dir}/dead-letter`; checkpoint `{root}/_fleetpipe/checkpoint.json`.
//!
//! One JSON object per line:
//!
//! ```json
//! {"reason":"out_of_range","detail":"lat 91 outside -90..90","index":0,"source":"mqtt",
//!  "topic":"vehicles/V1/location","received_at":"2026-11-25T21:00:00.250Z","raw":"{\"lat\":91}"}
//! ```
//!
//! `index` is null when the whole payload was refused; `topic` is null for HTTP; Kafka adds
//! `partition` and `offset`. A frame a sink refused after accepting it (a row Postgres cannot
//! hold) has that sink as its `source` (`"postgres"`) and the frame's contract JSON as `raw`.
//! The raw bytes are `raw` (text) when they are valid UTF-8 and `raw_base64` (standard
//! alphabet, padded) otherwise.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetpipe_processors::time::{date_string, day_of, format_millis};
use fleetpipe_processors::{Batch, Origin, Rejection};
use serde::{Deserialize, Serialize};

use crate::files::rolling::{self, RollingDir};
use crate::files::{Format, RollPolicy, RollingSink};
use crate::{io_err, Error, Result};

const CONTROL_DIR: &str = "_fleetpipe";

/// `[dead_letter]`: the dead-letter store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Open files are published at least this often (seconds).
    pub roll_secs: f64,
    /// Roll once any open file holds this many lines.
    pub max_file_lines: usize,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig { roll_secs: 30.0, max_file_lines: 1_000_000 }
    }
}

/// The dead-letter sink.
pub type DeadLetterSink = RollingSink<DeadLetterFormat>;

/// The store's directory under a data directory.
pub fn root_under(data_dir: &Path) -> PathBuf {
    data_dir.join("dead-letter")
}

/// Opens the dead-letter sink in `root` (its own directory, usually [`root_under`] the data
/// directory): reads its checkpoint and deletes what an interrupted generation left.
pub fn open(cfg: &DeadLetterConfig, root: &Path) -> Result<DeadLetterSink> {
    let dir = RollingDir::open(root.join(CONTROL_DIR), vec![root.to_path_buf()], DeadLetterFormat::EXT)?;
    let policy = RollPolicy {
        roll_after: Duration::from_secs_f64(cfg.roll_secs.max(0.0)),
        max_file_rows: cfg.max_file_lines,
        max_open_files: usize::MAX,
    };
    Ok(RollingSink::new(DeadLetterFormat { root: root.to_path_buf() }, policy, dir))
}

/// NDJSON files of rejections, by day of `received_at`.
pub struct DeadLetterFormat {
    root: PathBuf,
}

/// A file's share of a batch: encoded lines and how many.
pub struct Lines {
    bytes: Vec<u8>,
    lines: usize,
}

impl Format for DeadLetterFormat {
    const SINK: &'static str = "dead_letter";
    const EXT: &'static str = "ndjson";
    /// Days since the epoch of `received_at`.
    type Key = i64;
    type Chunk = Lines;
    type Writer = File;

    fn encode(&self, batch: &Batch) -> Result<BTreeMap<i64, Lines>> {
        // One buffer per file, one write per file per batch.
        let mut out: BTreeMap<i64, Lines> = BTreeMap::new();
        for r in &batch.rejections {
            let chunk =
                out.entry(day_of(r.received_at)).or_insert_with(|| Lines { bytes: Vec::new(), lines: 0 });
            encode_line(r, &mut chunk.bytes)?;
            chunk.lines += 1;
        }
        Ok(out)
    }

    fn rows(chunk: &Lines) -> usize {
        chunk.lines
    }

    fn dir(&self, day: i64) -> PathBuf {
        self.root.join(format!("date={}", date_string(day)))
    }

    fn create(&self, _day: i64, file: File) -> Result<File> {
        Ok(file)
    }

    fn append(&self, file: &mut File, chunk: &Lines) -> Result<()> {
        file.write_all(&chunk.bytes).map_err(|e| Error::Io { path: self.root.clone(), source: e })
    }

    fn finish(&self, file: File) -> Result<File> {
        Ok(file)
    }
}

#[derive(Serialize)]
struct Line<'a> {
    reason: &'static str,
    detail: &'a str,
    index: Option<u32>,
    source: &'a str,
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    imei: Option<&'a str>,
    received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_base64: Option<String>,
}

/// Appends one NDJSON line for `r` to `out`.
pub fn encode_line(r: &Rejection, out: &mut Vec<u8>) -> Result<()> {
    let (topic, partition, offset) = match &r.origin {
        Origin::Mqtt { topic } => (Some(topic.as_str()), None, None),
        Origin::Http | Origin::Sink { .. } | Origin::Teltonika { .. } => (None, None, None),
        Origin::Kafka { topic, partition, offset } => (Some(topic.as_str()), Some(*partition), Some(*offset)),
    };
    let imei = match &r.origin {
        Origin::Teltonika { imei } if !imei.is_empty() => Some(imei.as_str()),
        _ => None,
    };
    let (raw, raw_base64) = match std::str::from_utf8(&r.raw) {
        Ok(text) => (Some(text), None),
        Err(_) => (None, Some(base64(&r.raw))),
    };
    let line = Line {
        reason: r.reason.code(),
        detail: &r.detail,
        index: r.index,
        source: r.origin.source(),
        topic,
        partition,
        offset,
        imei,
        received_at: format_millis(r.received_at),
        raw,
        raw_base64,
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.push(b'\n');
    Ok(())
}

/// Standard base64 (RFC 4648 §4) with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// Every line of every committed dead-letter file under `root` (the sink's directory), oldest
/// generation first. Files of a generation the checkpoint does not cover are left out.
pub fn read_dead_letters(root: &Path) -> Result<Vec<serde_json::Value>> {
    let files = rolling::committed_files(&root.join(CONTROL_DIR), root, DeadLetterFormat::EXT)?;
    let mut out = Vec::new();
    for (_, path) in files {
        let text = fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let value = serde_json::from_str(line)
                .map_err(|e| Error::Corrupt { path: path.clone(), detail: format!("line {}: {e}", i + 1) })?;
            out.push(value);
        }
    }
    Ok(out)
}
