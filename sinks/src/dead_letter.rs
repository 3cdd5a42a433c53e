//! The dead-letter store: every rejected frame or payload, with its reason, raw bytes and source.
//!
//! Layout: `{root}/date=YYYY-MM-DD/part-{g:010}-{n:04}.ndjson` (date of `received_at`, UTC), root
//! usually `{data_dir}/dead-letter`; checkpoint `{root}/_fleetpipe/checkpoint.json`. Files are
//! written aside and published by generations like the Parquet files (see [`crate::rolling`]).
//!
//! One JSON object per line:
//!
//! ```json
//! {"reason":"out_of_range","detail":"lat 91 outside -90..90","index":0,"source":"mqtt",
//!  "topic":"vehicles/V1/location","received_at":"2026-11-25T21:00:00.250Z","raw":"{\"lat\":91}"}
//! ```
//!
//! `index` is null when the whole payload was refused; `topic` is null for HTTP; Kafka adds
//! `partition` and `offset`. The raw bytes are `raw` (text) when they are valid UTF-8 and
//! `raw_base64` (standard alphabet, padded) otherwise.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetpipe_processors::{Lsn, Origin, Rejection};
use serde::Serialize;

use crate::rolling::{self, io_err, PendingFile, RollingDir, MICROS_PER_DAY};
use crate::{Sink, SinkBatch, SinkError};

const NAME: &str = "dead_letter";
const EXT: &str = "ndjson";
const CONTROL_DIR: &str = "_fleetpipe";

/// Settings of the dead-letter sink.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterConfig {
    /// The sink's own directory, usually `{data_dir}/dead-letter`.
    pub root: PathBuf,
    /// Roll (publish all open files) once the oldest open file is this old.
    pub roll_after: Duration,
    /// Roll once any open file holds this many lines.
    pub max_file_lines: usize,
}

impl DeadLetterConfig {
    /// Defaults (30 s, 1,000,000 lines per file) with `root` as the sink's directory.
    pub fn new(root: impl Into<PathBuf>) -> DeadLetterConfig {
        DeadLetterConfig { root: root.into(), roll_after: Duration::from_secs(30), max_file_lines: 1_000_000 }
    }

    /// Defaults under `{data_dir}/dead-letter`.
    pub fn under(data_dir: &Path) -> DeadLetterConfig {
        DeadLetterConfig::new(data_dir.join("dead-letter"))
    }
}

struct OpenFile {
    file: File,
    pending: PendingFile,
    lines: usize,
    len: u64,
}

#[derive(Debug, Clone, Copy)]
struct PendingCommit {
    lsn: Lsn,
    lines: u64,
    reason: &'static str,
}

/// The dead-letter sink. Dropping it without [`Sink::close`] publishes nothing (like a crash).
pub struct DeadLetterSink {
    cfg: DeadLetterConfig,
    dir: RollingDir,
    /// Open files by day (since the epoch) of `received_at`.
    open: BTreeMap<i64, OpenFile>,
    oldest_open: Option<Instant>,
    max_lines: usize,
    pending: Option<PendingCommit>,
    poisoned: Option<String>,
    durable: Lsn,
    last_lsn: Lsn,
    last_checkpoint: Instant,
}

impl std::fmt::Debug for DeadLetterSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterSink")
            .field("root", &self.cfg.root)
            .field("open_files", &self.open.len())
            .field("durable", &self.durable)
            .field("last_lsn", &self.last_lsn)
            .field("generation", &self.dir.generation())
            .finish_non_exhaustive()
    }
}

impl DeadLetterSink {
    /// Opens the sink: reads its checkpoint and deletes what an interrupted generation left.
    pub fn open(cfg: DeadLetterConfig) -> Result<DeadLetterSink, SinkError> {
        let dir = RollingDir::open(cfg.root.join(CONTROL_DIR), vec![cfg.root.clone()], EXT)?;
        let lsn = dir.checkpoint().lsn;
        tracing::info!(
            sink = NAME,
            root = %cfg.root.display(),
            lsn,
            generation = dir.checkpoint().generation,
            "opened dead-letter sink"
        );
        Ok(DeadLetterSink {
            cfg,
            dir,
            open: BTreeMap::new(),
            oldest_open: None,
            max_lines: 0,
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

    fn day_dir(&self, day: i64) -> PathBuf {
        self.cfg.root.join(format!("date={}", rolling::date_string(day)))
    }

    fn ready(&mut self) -> Result<(), SinkError> {
        if let Some(detail) = &self.poisoned {
            return Err(SinkError::Poisoned { sink: NAME, durable: self.durable, detail: detail.clone() });
        }
        self.finish_commit()
    }

    fn roll(&mut self, reason: &'static str) -> Result<(), SinkError> {
        if self.pending.is_none() {
            let open = std::mem::take(&mut self.open);
            self.oldest_open = None;
            self.max_lines = 0;
            let mut lines = 0u64;
            let mut failure = None;
            for (_, f) in open {
                if failure.is_some() || f.lines == 0 {
                    drop(f.file);
                    rolling::remove_quietly(&f.pending.tmp);
                    continue;
                }
                match self.dir.stage(f.pending, f.file) {
                    Ok(()) => lines += f.lines as u64,
                    Err(e) => failure = Some(e),
                }
            }
            if let Some(e) = failure {
                return Err(self.poison(e));
            }
            self.pending = Some(PendingCommit { lsn: self.last_lsn, lines, reason });
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
        metrics::counter!("fleetpipe_frames_written_total", "sink" => NAME).increment(p.lines);
        if files > 0 {
            tracing::info!(
                sink = NAME,
                files,
                rows = p.lines,
                lsn = p.lsn,
                generation = self.dir.checkpoint().generation,
                reason = p.reason,
                "rolled dead-letter files"
            );
        } else {
            tracing::debug!(sink = NAME, lsn = p.lsn, reason = p.reason, "moved checkpoint");
        }
        Ok(())
    }

    fn poison(&mut self, cause: SinkError) -> SinkError {
        for (_, f) in std::mem::take(&mut self.open) {
            drop(f.file);
            rolling::remove_quietly(&f.pending.tmp);
        }
        self.dir.abandon();
        self.pending = None;
        self.oldest_open = None;
        self.max_lines = 0;
        let detail = cause.to_string();
        tracing::error!(sink = NAME, error = %detail, durable = self.durable, "dead-letter sink poisoned");
        self.poisoned = Some(detail.clone());
        SinkError::Poisoned { sink: NAME, durable: self.durable, detail }
    }

    /// Undoes a batch's appends after a write error: truncates the files it appended to, and
    /// drops the files it created. Poisons the sink when even that fails.
    fn rollback(&mut self, appended: &[(i64, u64, usize)], created: &[i64], cause: SinkError) -> SinkError {
        for day in created {
            if let Some(f) = self.open.remove(day) {
                drop(f.file);
                rolling::remove_quietly(&f.pending.tmp);
            }
        }
        for (day, len, lines) in appended {
            let Some(f) = self.open.get_mut(day) else {
                continue;
            };
            let undo = f.file.set_len(*len).and_then(|()| f.file.seek(SeekFrom::Start(*len)).map(|_| ()));
            if let Err(e) = undo {
                let path = f.pending.tmp.clone();
                return self.poison(io_err(&path, e));
            }
            f.len = *len;
            f.lines = *lines;
        }
        if self.open.is_empty() {
            self.oldest_open = None;
        }
        self.max_lines = self.open.values().map(|f| f.lines).max().unwrap_or(0);
        cause
    }
}

impl Sink for DeadLetterSink {
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
        if batch.rejections.is_empty() {
            self.last_lsn = batch.lsn;
            if self.open.is_empty() {
                self.durable = batch.lsn;
            }
            return Ok(());
        }

        // Encode first: one buffer per file, one write per file per batch.
        let mut bufs: BTreeMap<i64, (Vec<u8>, usize)> = BTreeMap::new();
        for r in &batch.rejections {
            let (buf, n) = bufs.entry(r.received_at.div_euclid(MICROS_PER_DAY)).or_default();
            encode_line(r, buf)?;
            *n += 1;
        }

        let now = Instant::now();
        let mut created = Vec::new();
        for day in bufs.keys() {
            if self.open.contains_key(day) {
                continue;
            }
            let dir = self.day_dir(*day);
            match self.dir.create(&dir) {
                Ok((pending, file)) => {
                    self.open.insert(*day, OpenFile { file, pending, lines: 0, len: 0 });
                    created.push(*day);
                }
                Err(e) => return Err(self.rollback(&[], &created, e)),
            }
        }
        if !created.is_empty() {
            self.oldest_open.get_or_insert(now);
        }

        let mut appended = Vec::with_capacity(bufs.len());
        let mut failure = None;
        for (day, f) in self.open.iter_mut() {
            let Some((buf, n)) = bufs.get(day) else {
                continue;
            };
            appended.push((*day, f.len, f.lines));
            if let Err(e) = f.file.write_all(buf) {
                failure = Some(io_err(&f.pending.tmp, e));
                break;
            }
            f.len += buf.len() as u64;
            f.lines += n;
            self.max_lines = self.max_lines.max(f.lines);
        }
        if let Some(e) = failure {
            return Err(self.rollback(&appended, &created, e));
        }
        self.last_lsn = batch.lsn;
        Ok(())
    }

    fn tick(&mut self, now: Instant) -> Result<(), SinkError> {
        self.ready()?;
        let due = rolling::roll_due(rolling::RollState {
            oldest_open: self.oldest_open,
            fullest: self.max_lines,
            max_per_file: self.cfg.max_file_lines,
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

#[derive(Serialize)]
struct Line<'a> {
    reason: &'static str,
    detail: &'a str,
    index: Option<u32>,
    source: &'static str,
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_base64: Option<String>,
}

/// Appends one NDJSON line for `r` to `out`.
pub fn encode_line(r: &Rejection, out: &mut Vec<u8>) -> Result<(), SinkError> {
    let (topic, partition, offset) = match &r.origin {
        Origin::Mqtt { topic } => (Some(topic.as_str()), None, None),
        Origin::Http => (None, None, None),
        Origin::Kafka { topic, partition, offset } => (Some(topic.as_str()), Some(*partition), Some(*offset)),
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
        received_at: rolling::rfc3339_millis(r.received_at),
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
pub fn read_dead_letters(root: &Path) -> Result<Vec<serde_json::Value>, SinkError> {
    let files = rolling::committed_files(&root.join(CONTROL_DIR), root, EXT)?;
    let mut out = Vec::new();
    for (_, path) in files {
        let text = fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let value = serde_json::from_str(line).map_err(|e| SinkError::Corrupt {
                path: path.clone(),
                detail: format!("line {}: {e}", i + 1),
            })?;
            out.push(value);
        }
    }
    Ok(out)
}
