//! The one rolling-file mechanism, generic over the file format: the Parquet history and the
//! dead-letter store are each a [`Format`] under a [`RollingSink`].
//!
//! One file is open per partition (a [`Format::Key`]: kind and hour for Parquet, day for the
//! dead-letter store) that the current generation touched. Files are written aside under hidden
//! temporary names and published all at once by a roll ([`rolling`]): by age
//! (`roll_after`), by size (`max_file_rows`), when too many are open (a wide backfill), and at
//! a flush. With nothing open the sink still saves its position now and then, so that a restart
//! does not replay what it already holds.
//!
//! A batch is encoded before any file is touched, so that an encoding error leaves nothing
//! half-written. A failed append or `fsync` leaves files that cannot be trusted: the sink drops
//! its uncommitted generation and refuses further work ([`Error::Poisoned`]) until reopened,
//! when the log replays everything after its checkpoint. Dropping the sink without a flush
//! publishes nothing (like a crash).

pub mod rolling;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fleetpipe_pipeline::{Sink, SinkError};
use fleetpipe_processors::{Batch, Lsn};

use self::rolling::{PendingFile, RollingDir};
use crate::{Error, Result};

/// How a sink's files are laid out and written.
pub trait Format: Send {
    /// The sink's name (the `sink` label of metrics, and in logs).
    const SINK: &'static str;
    /// The extension of its files.
    const EXT: &'static str;
    /// A partition: one open file per key in a generation.
    type Key: Ord + Copy + Send;
    /// What a batch contributes to one partition, encoded.
    type Chunk;
    /// An open file.
    type Writer: Send;

    /// The batch's rows by partition; empty when the batch holds nothing for this sink.
    fn encode(&self, batch: &Batch) -> Result<BTreeMap<Self::Key, Self::Chunk>>;
    /// Rows in a chunk.
    fn rows(chunk: &Self::Chunk) -> usize;
    /// The directory of a partition.
    fn dir(&self, key: Self::Key) -> PathBuf;
    /// Starts a file for `key` on the created temporary `file`.
    fn create(&self, key: Self::Key, file: File) -> Result<Self::Writer>;
    /// Appends a chunk. An error leaves the writer unusable.
    fn append(&self, writer: &mut Self::Writer, chunk: &Self::Chunk) -> Result<()>;
    /// Finishes a file (a footer, a last flush) and gives it back to be `fsync`ed and published.
    fn finish(&self, writer: Self::Writer) -> Result<File>;
}

/// When a [`RollingSink`] publishes its files.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RollPolicy {
    /// Roll once the oldest open file is this old.
    pub roll_after: Duration,
    /// Roll once any open file holds this many rows.
    pub max_file_rows: usize,
    /// More partitions than this open at once rolls before the next batch (bounds memory and
    /// descriptors).
    pub max_open_files: usize,
}

struct OpenFile<W> {
    writer: W,
    pending: PendingFile,
    rows: usize,
}

#[derive(Debug, Clone, Copy)]
struct PendingCommit {
    lsn: Lsn,
    rows: u64,
    reason: &'static str,
}

/// A file sink: `F`'s files published in generations with a checkpoint.
pub struct RollingSink<F: Format> {
    format: F,
    policy: RollPolicy,
    dir: RollingDir,
    open: BTreeMap<F::Key, OpenFile<F::Writer>>,
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

impl<F: Format> std::fmt::Debug for RollingSink<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RollingSink")
            .field("sink", &F::SINK)
            .field("open_files", &self.open.len())
            .field("durable", &self.durable)
            .field("last_lsn", &self.last_lsn)
            .field("generation", &self.dir.generation())
            .finish_non_exhaustive()
    }
}

impl<F: Format> RollingSink<F> {
    /// Opens the sink over `dir` (already recovered: see [`RollingDir::open`]); its durable
    /// position is the checkpoint's.
    pub fn new(format: F, policy: RollPolicy, dir: RollingDir) -> RollingSink<F> {
        let lsn = dir.checkpoint().lsn;
        tracing::info!(sink = F::SINK, lsn, generation = dir.checkpoint().generation, "opened file sink");
        RollingSink {
            format,
            policy,
            dir,
            open: BTreeMap::new(),
            oldest_open: None,
            max_rows: 0,
            pending: None,
            poisoned: None,
            durable: lsn,
            last_lsn: lsn,
            last_checkpoint: Instant::now(),
        }
    }

    /// Number of files currently open (written aside, not yet published).
    pub fn open_files(&self) -> usize {
        self.open.len()
    }

    /// What opening cleaned up.
    pub fn recovery(&self) -> rolling::Recovery {
        self.dir.recovery()
    }

    /// Fails when poisoned; completes a roll whose commit failed before.
    fn ready(&mut self) -> Result<()> {
        if let Some(detail) = &self.poisoned {
            return Err(Error::Poisoned { sink: F::SINK, durable: self.durable, detail: detail.clone() });
        }
        self.finish_commit()
    }

    /// Closes every open file and publishes them with a checkpoint at the last batch's lsn.
    fn roll(&mut self, reason: &'static str) -> Result<()> {
        if self.pending.is_none() {
            let open = std::mem::take(&mut self.open);
            self.oldest_open = None;
            self.max_rows = 0;
            let mut rows = 0u64;
            let mut failure = None;
            for (_, f) in open {
                let OpenFile { writer, pending, rows: n } = f;
                if failure.is_some() || n == 0 {
                    drop(writer);
                    rolling::remove_quietly(&pending.tmp);
                    continue;
                }
                match self.format.finish(writer) {
                    Ok(file) => match self.dir.stage(pending, file) {
                        Ok(()) => rows += n as u64,
                        Err(e) => failure = Some(e),
                    },
                    Err(e) => {
                        rolling::remove_quietly(&pending.tmp);
                        failure = Some(e);
                    }
                }
            }
            if let Some(e) = failure {
                return Err(self.poison(e));
            }
            self.pending = Some(PendingCommit { lsn: self.last_lsn, rows, reason });
        }
        self.finish_commit()
    }

    fn finish_commit(&mut self) -> Result<()> {
        let Some(p) = self.pending else {
            return Ok(());
        };
        let files = self.dir.commit(p.lsn)?;
        self.pending = None;
        self.durable = self.durable.max(p.lsn);
        self.last_checkpoint = Instant::now();
        metrics::counter!("fleetpipe_frames_written_total", "sink" => F::SINK).increment(p.rows);
        metrics::counter!("fleetpipe_files_total", "sink" => F::SINK).increment(files as u64);
        if files > 0 {
            tracing::info!(
                sink = F::SINK,
                files,
                rows = p.rows,
                lsn = p.lsn,
                generation = self.dir.checkpoint().generation,
                reason = p.reason,
                "rolled files"
            );
        } else {
            tracing::debug!(sink = F::SINK, lsn = p.lsn, reason = p.reason, "moved checkpoint");
        }
        Ok(())
    }

    /// Drops every uncommitted file and refuses further work: the data written since the last
    /// commit is gone from this sink, only a reopen (and the log's replay) restores it.
    fn poison(&mut self, cause: Error) -> Error {
        for (_, f) in std::mem::take(&mut self.open) {
            drop(f.writer);
            rolling::remove_quietly(&f.pending.tmp);
        }
        self.dir.abandon();
        self.pending = None;
        self.oldest_open = None;
        self.max_rows = 0;
        let detail = cause.to_string();
        tracing::error!(sink = F::SINK, error = %detail, durable = self.durable, "file sink poisoned");
        self.poisoned = Some(detail.clone());
        Error::Poisoned { sink: F::SINK, durable: self.durable, detail }
    }

    fn write_batch(&mut self, batch: &Batch) -> Result<()> {
        self.ready()?;
        let chunks = self.format.encode(batch)?;
        if chunks.is_empty() {
            self.last_lsn = batch.lsn;
            if self.open.is_empty() {
                self.durable = batch.lsn;
            }
            return Ok(());
        }
        let new_parts = chunks.keys().filter(|k| !self.open.contains_key(k)).count();
        if !self.open.is_empty() && self.open.len() + new_parts > self.policy.max_open_files {
            self.roll("open_files")?;
        }

        // Open the files this batch needs (a failure here has written nothing; a file opened
        // but left empty is dropped at the roll).
        let now = Instant::now();
        for key in chunks.keys() {
            if self.open.contains_key(key) {
                continue;
            }
            let (pending, file) = self.dir.create(&self.format.dir(*key))?;
            let writer = match self.format.create(*key, file) {
                Ok(w) => w,
                Err(e) => {
                    rolling::remove_quietly(&pending.tmp);
                    return Err(e);
                }
            };
            self.open.insert(*key, OpenFile { writer, pending, rows: 0 });
            self.oldest_open.get_or_insert(now);
        }

        // Append. A failure here leaves a writer in an unknown state: poison.
        let mut failure = None;
        for (key, chunk) in &chunks {
            let Some(f) = self.open.get_mut(key) else { continue };
            if let Err(e) = self.format.append(&mut f.writer, chunk) {
                failure = Some(e);
                break;
            }
            f.rows += F::rows(chunk);
            self.max_rows = self.max_rows.max(f.rows);
        }
        if let Some(e) = failure {
            return Err(self.poison(e));
        }
        self.last_lsn = batch.lsn;
        Ok(())
    }

    fn tick_at(&mut self, now: Instant) -> Result<()> {
        self.ready()?;
        let age = |since: Instant| now.saturating_duration_since(since) >= self.policy.roll_after;
        let due = match self.oldest_open {
            Some(oldest) if age(oldest) => Some("age"),
            Some(_) if self.max_rows >= self.policy.max_file_rows => Some("size"),
            Some(_) => None,
            // Nothing open: save a position that moved now and then.
            None if self.last_lsn > self.dir.checkpoint().lsn && age(self.last_checkpoint) => {
                Some("checkpoint")
            }
            None => None,
        };
        match due {
            Some(why) => self.roll(why),
            None => Ok(()),
        }
    }

    fn flush_all(&mut self) -> Result<()> {
        self.ready()?;
        if !self.open.is_empty() || self.last_lsn > self.dir.checkpoint().lsn {
            self.roll("flush")?;
        }
        Ok(())
    }
}

impl<F: Format> Sink for RollingSink<F> {
    fn name(&self) -> &'static str {
        F::SINK
    }

    fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        Ok(self.write_batch(batch)?)
    }

    fn tick(&mut self, now: Instant) -> Result<(), SinkError> {
        Ok(self.tick_at(now)?)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(self.flush_all()?)
    }

    /// A poisoned sink has already dropped its uncommitted generation; it starts over from its
    /// checkpoint (a full disk that has room again, a device that came back).
    fn recover(&mut self) -> Result<bool, SinkError> {
        let Some(detail) = self.poisoned.take() else { return Ok(false) };
        tracing::info!(sink = F::SINK, durable = self.durable, cause = %detail, "file sink starts over from its checkpoint");
        self.last_lsn = self.durable;
        Ok(true)
    }
}
