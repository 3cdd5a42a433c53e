//! fleetpipe's write-ahead log: the durability point of every source that cannot replay itself.
//!
//! Delivery semantics: a record appended here is *durable* once the group commit that carried it
//! returned (the segment was written and `fdatasync`'d, and the directory fsync'd after a segment
//! was created). Only then are MQTT PUBACKs sent and HTTP 200s answered. Every sink is fed from
//! the log and records (in its own checkpoint) the position up to which it made records
//! durable; after a crash the log is read from the oldest position some sink still lacks.
//!
//! Layout: `{dir}/{first_lsn:020}.wal` segments. A record is
//! `[len: u32 LE][crc32 of lsn+payload: u32 LE][lsn: u64 LE][payload: len bytes]`.
//! Opening the log validates every record; a torn or corrupt tail (a crash mid-write) is cut
//! off, never trusted. A segment is deleted once every sink is past its last record.
//!
//! The log stores opaque payloads; what they mean is the pipeline's business.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fleetpipe_processors::Lsn;
use serde::Deserialize;

const HEADER: usize = 16;
/// A record larger than this is refused (and seen as corruption when read).
pub const MAX_RECORD: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wal record of {0} bytes exceeds the maximum of {MAX_RECORD}")]
    TooLarge(usize),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io { path: path.to_path_buf(), source }
}

/// `[wal]`: sizing of the log and of its group commits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// A segment is closed and a new one started past this size (MiB).
    pub segment_mib: u64,
    /// Bound on the log's disk use (MiB); past it, intake pushes back until sinks catch up.
    pub max_mib: u64,
    /// Most entries in one group commit (one fsync).
    pub group_entries: usize,
    /// How long a group commit waits at most for more entries after the first (milliseconds):
    /// fewer, larger fsyncs and batches, for up to that much more time-to-ack. It stops waiting
    /// as soon as an eighth of it passes with nothing new.
    pub group_linger_ms: f64,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig { segment_mib: 64, max_mib: 2048, group_entries: 512, group_linger_ms: 2.0 }
    }
}

impl WalConfig {
    /// Where and how large the log is, for [`Wal::open`].
    pub fn layout(&self, dir: PathBuf) -> Layout {
        Layout { dir, segment_bytes: self.segment_mib << 20, max_bytes: self.max_mib << 20 }
    }

    /// [`WalConfig::group_linger_ms`] as a duration.
    pub fn group_linger(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.group_linger_ms.max(0.0) / 1000.0)
    }
}

/// Where the log lives and how large it grows.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Bound on the log's total size: past it, appends wait until sinks catch up.
    pub max_bytes: u64,
}

struct Segment {
    first: Lsn,
    path: PathBuf,
    bytes: u64,
}

/// The open log. Single writer; reads for replay go through [`Wal::read_from`].
pub struct Wal {
    cfg: Layout,
    /// Closed segments, oldest first, then the active one last.
    segments: Vec<Segment>,
    active: File,
    next_lsn: Lsn,
    scratch: Vec<u8>,
    /// A failed append may have left bytes after the last good record.
    torn: bool,
}

impl Wal {
    /// Opens (or creates) the log, validating every record and cutting a torn tail.
    pub fn open(cfg: Layout) -> Result<Wal, WalError> {
        fs::create_dir_all(&cfg.dir).map_err(io_err(&cfg.dir))?;
        let mut firsts: Vec<Lsn> = Vec::new();
        for entry in fs::read_dir(&cfg.dir).map_err(io_err(&cfg.dir))? {
            let entry = entry.map_err(io_err(&cfg.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name.strip_suffix(".wal").and_then(|n| n.parse::<Lsn>().ok()) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments = Vec::new();
        let mut next_lsn: Lsn = 1;
        let mut torn = false;
        for first in firsts {
            let path = segment_path(&cfg.dir, first);
            if torn {
                // Everything after a torn segment is unreachable garbage from before the crash.
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let (valid_bytes, last) = scan_segment(&path, first)?;
            let len = fs::metadata(&path).map_err(io_err(&path))?.len();
            if valid_bytes < len {
                tracing::warn!(segment = %path.display(), valid_bytes, len, "wal tail torn, truncating");
                let f = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                f.set_len(valid_bytes).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
                torn = true;
            }
            if let Some(last) = last {
                next_lsn = last + 1;
            } else if first > next_lsn {
                next_lsn = first;
            }
            segments.push(Segment { first, path, bytes: valid_bytes });
        }
        let active = match segments.last() {
            Some(seg) => {
                let mut f = OpenOptions::new().append(true).open(&seg.path).map_err(io_err(&seg.path))?;
                f.seek(SeekFrom::End(0)).map_err(io_err(&seg.path))?;
                f
            }
            None => {
                let (f, seg) = create_segment(&cfg.dir, next_lsn)?;
                segments.push(seg);
                f
            }
        };
        Ok(Wal { cfg, segments, active, next_lsn, scratch: Vec::new(), torn: false })
    }

    /// The position the next appended record gets.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// The oldest position still held.
    pub fn first_lsn(&self) -> Lsn {
        self.segments.first().map_or(self.next_lsn, |s| s.first)
    }

    /// Total bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Whether the log is over its size bound (appends should wait for sinks to catch up).
    pub fn is_full(&self) -> bool {
        self.bytes() >= self.cfg.max_bytes
    }

    /// Appends records as one group commit: one write, one fdatasync. Returns the LSN of the
    /// first; the others follow consecutively. Durable on return.
    pub fn append_group<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> Result<Lsn, WalError> {
        let first = self.next_lsn;
        self.scratch.clear();
        for p in payloads {
            let p = p.as_ref();
            if p.len() > MAX_RECORD {
                return Err(WalError::TooLarge(p.len()));
            }
            let lsn = self.next_lsn;
            self.next_lsn += 1;
            let mut crc = crc32fast::Hasher::new();
            crc.update(&lsn.to_le_bytes());
            crc.update(p);
            self.scratch.extend_from_slice(&(p.len() as u32).to_le_bytes());
            self.scratch.extend_from_slice(&crc.finalize().to_le_bytes());
            self.scratch.extend_from_slice(&lsn.to_le_bytes());
            self.scratch.extend_from_slice(p);
        }
        let path = self.active_path().to_path_buf();
        let good = self.segments.last().map_or(0, |s| s.bytes);
        // A tail a failed append left behind is cut before anything follows it.
        let written = (if self.torn { self.active.set_len(good) } else { Ok(()) })
            .and_then(|_| {
                self.torn = false;
                self.active.write_all(&self.scratch)
            })
            .and_then(|_| self.active.sync_data());
        if let Err(source) = written {
            // Leave nothing half-counted, and nothing half-written: the log goes on from its
            // last good record (and if cutting fails too, the next append cuts first).
            self.next_lsn = first;
            self.torn = true;
            if self.active.set_len(good).and_then(|_| self.active.sync_data()).is_ok() {
                self.torn = false;
            }
            return Err(WalError::Io { path, source });
        }
        if let Some(seg) = self.segments.last_mut() {
            seg.bytes += self.scratch.len() as u64;
        }
        if self.segments.last().is_some_and(|s| s.bytes >= self.cfg.segment_bytes) {
            // The group is durable whatever happens here; a segment that cannot be created
            // now is tried again after the next append.
            match create_segment(&self.cfg.dir, self.next_lsn) {
                Ok((f, seg)) => {
                    self.active = f;
                    self.segments.push(seg);
                }
                Err(e) => {
                    let _ = fs::remove_file(segment_path(&self.cfg.dir, self.next_lsn));
                    tracing::warn!(error = %e, "could not start a new log segment; the current one grows");
                }
            }
        }
        Ok(first)
    }

    fn active_path(&self) -> &Path {
        self.segments.last().map_or(self.cfg.dir.as_path(), |s| s.path.as_path())
    }

    /// Deletes closed segments whose every record is at or below `durable` (the minimum over
    /// all sinks). Returns how many were deleted.
    pub fn release_through(&mut self, durable: Lsn) -> Result<usize, WalError> {
        let mut deleted = 0;
        while self.segments.len() > 1 {
            // A closed segment ends right before the next one starts.
            let last_in_first = self.segments[1].first.saturating_sub(1);
            if last_in_first > durable {
                break;
            }
            let seg = self.segments.remove(0);
            fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Reads every record with `lsn >= from`, in order, calling `f(lsn, payload)`.
    pub fn read_from(&self, from: Lsn, mut f: impl FnMut(Lsn, &[u8])) -> Result<(), WalError> {
        for (i, seg) in self.segments.iter().enumerate() {
            let next_first = self.segments.get(i + 1).map(|s| s.first);
            if next_first.is_some_and(|n| n <= from) {
                continue;
            }
            let file = File::open(&seg.path).map_err(io_err(&seg.path))?;
            let mut reader = BufReader::with_capacity(1 << 20, file.take(seg.bytes));
            let mut buf = Vec::new();
            while let Some(lsn) = read_record(&mut reader, &mut buf).map_err(io_err(&seg.path))? {
                if lsn >= from {
                    f(lsn, &buf);
                }
            }
        }
        Ok(())
    }
}

/// Reads the records with `after < lsn <= through` from the log in `dir`, in order, while the
/// log's writer goes on appending: what a sink that fell behind replays to catch up.
///
/// Every record up to `through` must have been committed before the call (the writer hands
/// nothing downstream before its commit), so nothing half-written is ever read; the segments
/// holding them stay, because the caller's checkpoint is at or below `after`. Stops at the first
/// error `f` returns.
pub fn read_range<E: From<WalError>>(
    dir: &Path,
    after: Lsn,
    through: Lsn,
    mut f: impl FnMut(Lsn, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut firsts: Vec<Lsn> = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        if let Some(first) = name.to_string_lossy().strip_suffix(".wal").and_then(|n| n.parse::<Lsn>().ok()) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    let mut buf = Vec::new();
    for (i, &first) in firsts.iter().enumerate() {
        if first > through {
            break;
        }
        if firsts.get(i + 1).is_some_and(|&next| next <= after + 1) {
            continue;
        }
        let path = segment_path(dir, first);
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        while let Some(lsn) = read_record(&mut reader, &mut buf).map_err(io_err(&path))? {
            if lsn > through {
                return Ok(());
            }
            if lsn > after {
                f(lsn, &buf)?;
            }
        }
    }
    Ok(())
}

fn segment_path(dir: &Path, first: Lsn) -> PathBuf {
    dir.join(format!("{first:020}.wal"))
}

fn create_segment(dir: &Path, first: Lsn) -> Result<(File, Segment), WalError> {
    let path = segment_path(dir, first);
    let f = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
    // The new name must survive a crash before any record in it is acknowledged.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    Ok((f, Segment { first, path, bytes: 0 }))
}

/// Reads one record into `buf`. `Ok(None)` at a clean end, a torn tail, or a bad checksum.
fn read_record(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<Lsn>> {
    let mut header = [0u8; HEADER];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let [l0, l1, l2, l3, c0, c1, c2, c3, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    let lsn = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    if len > MAX_RECORD {
        return Ok(None);
    }
    buf.resize(len, 0);
    match r.read_exact(buf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(buf);
    Ok((h.finalize() == crc).then_some(lsn))
}

/// Returns the length of the valid prefix of a segment and its last LSN.
fn scan_segment(path: &Path, first: Lsn) -> Result<(u64, Option<Lsn>), WalError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut valid = 0u64;
    let mut expected = first;
    let mut last = None;
    while let Some(lsn) = read_record(&mut reader, &mut buf).map_err(io_err(path))? {
        if lsn != expected {
            break;
        }
        valid += (HEADER + buf.len()) as u64;
        last = Some(lsn);
        expected += 1;
    }
    Ok((valid, last))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, segment_bytes: u64) -> Layout {
        Layout { dir: dir.to_path_buf(), segment_bytes, max_bytes: 1 << 30 }
    }

    fn read_all(wal: &Wal, from: Lsn) -> Vec<(Lsn, Vec<u8>)> {
        let mut out = Vec::new();
        wal.read_from(from, |lsn, p| out.push((lsn, p.to_vec()))).unwrap();
        out
    }

    #[test]
    fn appended_records_are_read_back_after_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(cfg(dir.path(), 64)).unwrap();
        assert_eq!(wal.append_group(&[b"one".as_slice(), b"two"]).unwrap(), 1);
        assert_eq!(wal.append_group(&[b"three".as_slice()]).unwrap(), 3);
        drop(wal);
        let wal = Wal::open(cfg(dir.path(), 64)).unwrap();
        assert_eq!(wal.next_lsn(), 4);
        let got = read_all(&wal, 2);
        assert_eq!(got, vec![(2, b"two".to_vec()), (3, b"three".to_vec())]);
    }

    #[test]
    fn a_torn_tail_is_cut_and_appending_continues_after_the_last_good_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(cfg(dir.path(), 1 << 20)).unwrap();
        wal.append_group(&[b"good".as_slice(), b"also good"]).unwrap();
        let path = segment_path(dir.path(), 1);
        drop(wal);
        // Simulate a crash mid-write: half a record at the end.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let mut wal = Wal::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(wal.next_lsn(), 3);
        wal.append_group(&[b"after".as_slice()]).unwrap();
        let got = read_all(&wal, 1);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], (3, b"after".to_vec()));
    }

    #[test]
    fn a_corrupt_record_ends_the_valid_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(cfg(dir.path(), 1 << 20)).unwrap();
        wal.append_group(&[b"first".as_slice(), b"second"]).unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let wal = Wal::open(cfg(dir.path(), 1 << 20)).unwrap();
        assert_eq!(read_all(&wal, 1), vec![(1, b"first".to_vec())]);
        assert_eq!(wal.next_lsn(), 2);
    }

    #[test]
    fn a_range_is_read_from_the_directory_while_the_log_stays_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(cfg(dir.path(), 64)).unwrap();
        for i in 0..20u8 {
            wal.append_group(&[vec![i; 10]]).unwrap();
        }
        let mut seen = Vec::new();
        read_range::<WalError>(dir.path(), 5, 12, |lsn, p| {
            seen.push((lsn, p[0]));
            Ok(())
        })
        .unwrap();
        let expected: Vec<(Lsn, u8)> = (6..=12).map(|l| (l, (l - 1) as u8)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn segments_roll_and_are_released_once_every_sink_is_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(cfg(dir.path(), 40)).unwrap();
        for i in 0..6u8 {
            wal.append_group(&[vec![i; 30]]).unwrap();
        }
        let segs = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(segs, 7, "one segment per record plus the empty active one");
        assert_eq!(wal.release_through(3).unwrap(), 3);
        assert_eq!(wal.first_lsn(), 4);
        assert_eq!(read_all(&wal, 1).iter().map(|r| r.0).collect::<Vec<_>>(), vec![4, 5, 6]);
        drop(wal);
        let wal = Wal::open(cfg(dir.path(), 40)).unwrap();
        assert_eq!(wal.next_lsn(), 7);
        assert_eq!(wal.first_lsn(), 4);
    }
}
