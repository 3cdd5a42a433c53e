//! Exactly-once files through generations: the commit protocol under [`super::RollingSink`].
//!
//! A file sink writes every file it has open aside, under a hidden temporary name
//! (`.part-{g:010}-{n:04}.{ext}.tmp`, invisible to `**/*.{ext}` globs and to Spark, which skips
//! names starting with `.`). A roll ends generation `g` for all open files at once:
//!
//! 1. the sink finishes each file (Parquet footer, last NDJSON line) and hands it to
//!    [`RollingDir::stage`], which `fsync`s it;
//! 2. [`RollingDir::commit`] renames every staged file to its final name `part-{g:010}-{n:04}.{ext}`,
//!    `fsync`s each directory that received one, and then atomically replaces the checkpoint
//!    `{control}/checkpoint.json` with `{"lsn": lsn, "generation": g}` (written aside, `fsync`ed,
//!    renamed, directory `fsync`ed).
//!
//! [`RollingDir::open`] recovers: it reads the checkpoint (absent: lsn 0, generation 0), deletes
//! every temporary file, and deletes every final file whose generation is greater than the
//! checkpoint's (it was renamed, but the checkpoint that would have owned it was not written: the
//! WAL replays its batches). The next generation is the checkpoint's plus one. So after any crash
//! the committed files hold exactly the batches up to the checkpoint's lsn.
//!
//! A failed commit is resumable: calling [`RollingDir::commit`] again skips the renames that were
//! done. A failed `fsync` of a file is not (after a failed `fsync` the kernel may have dropped the
//! dirty pages): the caller discards the generation with [`RollingDir::abandon`] and must be
//! reopened, so that the WAL replays.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use fleetpipe_processors::Lsn;
use serde::{Deserialize, Serialize};

use crate::{io_err, Error, Result};

/// File name of a sink's checkpoint inside its control directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
const CHECKPOINT_TMP: &str = "checkpoint.json.tmp";
/// Directory names that recovery never descends into (control files live there).
const CONTROL_DIR_NAME: &str = "_fleetpipe";
const TMP_PREFIX: &str = ".part-";
const TMP_SUFFIX: &str = ".tmp";
const FINAL_PREFIX: &str = "part-";

/// What a sink's checkpoint records: every batch up to `lsn` is in the files of generations
/// `..= generation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub lsn: Lsn,
    pub generation: u64,
}

/// A file being written under its temporary name, and the name it gets at commit.
#[derive(Debug, Clone)]
pub struct PendingFile {
    pub tmp: PathBuf,
    pub final_path: PathBuf,
}

#[derive(Debug)]
struct StagedFile {
    tmp: PathBuf,
    final_path: PathBuf,
    renamed: bool,
}

/// What [`RollingDir::open`] cleaned up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Temporary files deleted (files of a generation that never closed).
    pub removed_tmp: usize,
    /// Final files deleted because their generation is newer than the checkpoint.
    pub removed_uncommitted: usize,
}

/// One sink's set of generation-named files and its checkpoint.
#[derive(Debug)]
pub struct RollingDir {
    control_dir: PathBuf,
    data_dirs: Vec<PathBuf>,
    ext: &'static str,
    committed: Checkpoint,
    recovery: Recovery,
    /// Next file index per directory in the current generation.
    next_index: HashMap<PathBuf, u32>,
    /// Directories known to exist with their entries fsync'd in their parents.
    known_dirs: HashSet<PathBuf>,
    staged: Vec<StagedFile>,
}

impl RollingDir {
    /// Opens and recovers a sink's files.
    ///
    /// `control_dir` holds the checkpoint and nothing else of other sinks. `data_dirs` are the
    /// trees this sink alone writes files into (searched recursively, skipping `_fleetpipe`
    /// directories); only names of this module's patterns with extension `ext` are touched.
    pub fn open(
        control_dir: impl Into<PathBuf>,
        data_dirs: Vec<PathBuf>,
        ext: &'static str,
    ) -> Result<RollingDir> {
        let control_dir = control_dir.into();
        let mut dir = RollingDir {
            control_dir,
            data_dirs,
            ext,
            committed: Checkpoint::default(),
            recovery: Recovery::default(),
            next_index: HashMap::new(),
            known_dirs: HashSet::new(),
            staged: Vec::new(),
        };
        let control = dir.control_dir.clone();
        dir.ensure_dir(&control)?;
        let leftover = control.join(CHECKPOINT_TMP);
        if remove_if_exists(&leftover)? {
            fsync_dir(&control)?;
        }
        dir.committed = read_checkpoint(&control)?;
        dir.recover()?;
        Ok(dir)
    }

    /// The last committed checkpoint.
    pub fn checkpoint(&self) -> Checkpoint {
        self.committed
    }

    /// The generation new files belong to (the committed one plus one).
    pub fn generation(&self) -> u64 {
        self.committed.generation + 1
    }

    /// What opening cleaned up.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Whether files are staged for a commit that has not completed.
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Names the next file of the current generation in `dir`, creates `dir` if needed (fsyncing
    /// the parents of the directories it creates) and creates the temporary file.
    pub fn create(&mut self, dir: &Path) -> Result<(PendingFile, File)> {
        self.ensure_dir(dir)?;
        let g = self.generation();
        let n = {
            let slot = self.next_index.entry(dir.to_path_buf()).or_insert(0);
            let n = *slot;
            *slot += 1;
            n
        };
        let pending = PendingFile {
            tmp: dir.join(tmp_name(g, n, self.ext)),
            final_path: dir.join(final_name(g, n, self.ext)),
        };
        let file = File::create(&pending.tmp).map_err(|e| io_err(&pending.tmp, e))?;
        Ok((pending, file))
    }

    /// `fsync`s a finished file and stages it for the next [`commit`](Self::commit). On failure
    /// the temporary file is deleted; the caller must treat its generation as lost (see the
    /// module documentation).
    pub fn stage(&mut self, pending: PendingFile, file: File) -> Result<()> {
        if let Err(e) = file.sync_all() {
            drop(file);
            remove_quietly(&pending.tmp);
            return Err(io_err(&pending.tmp, e));
        }
        drop(file);
        self.staged.push(StagedFile { tmp: pending.tmp, final_path: pending.final_path, renamed: false });
        Ok(())
    }

    /// Publishes the staged files and records `lsn` as durable; returns how many files were
    /// published. With nothing staged it only moves the checkpoint. Resumable after an error.
    pub fn commit(&mut self, lsn: Lsn) -> Result<usize> {
        let mut dirs = BTreeSet::new();
        for f in &mut self.staged {
            if !f.renamed {
                fs::rename(&f.tmp, &f.final_path).map_err(|e| io_err(&f.final_path, e))?;
                f.renamed = true;
            }
            if let Some(parent) = f.final_path.parent() {
                dirs.insert(parent.to_path_buf());
            }
        }
        for d in &dirs {
            fsync_dir(d)?;
        }
        let next = Checkpoint { lsn: lsn.max(self.committed.lsn), generation: self.generation() };
        write_checkpoint(&self.control_dir, &next)?;
        let files = self.staged.len();
        self.staged.clear();
        self.next_index.clear();
        self.committed = next;
        if self.known_dirs.len() > 4096 {
            self.known_dirs.clear();
        }
        Ok(files)
    }

    /// Gives up the current generation: deletes the staged files (renamed or not) and forgets
    /// them. Best effort: [`open`](Self::open) deletes whatever is left.
    pub fn abandon(&mut self) {
        for f in self.staged.drain(..) {
            remove_quietly(if f.renamed { &f.final_path } else { &f.tmp });
        }
    }

    /// Creates `dir` and any missing ancestors, fsyncing the parent of each directory created.
    fn ensure_dir(&mut self, dir: &Path) -> Result<()> {
        if self.known_dirs.contains(dir) {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut cur = Some(dir);
        while let Some(d) = cur {
            if d.as_os_str().is_empty() || d.is_dir() {
                break;
            }
            missing.push(d.to_path_buf());
            cur = d.parent();
        }
        if !missing.is_empty() {
            fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            // Outermost first: each new directory's entry lives in its parent.
            for d in missing.iter().rev() {
                if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fsync_dir(parent)?;
                }
            }
        }
        self.known_dirs.insert(dir.to_path_buf());
        Ok(())
    }

    fn recover(&mut self) -> Result<()> {
        let committed = self.committed.generation;
        let ext = self.ext;
        let mut recovery = Recovery::default();
        for root in &self.data_dirs {
            walk_files(root, &mut |path, name| {
                let remove = if is_tmp_name(name, ext) {
                    recovery.removed_tmp += 1;
                    true
                } else if parse_final_name(name, ext).is_some_and(|(g, _)| g > committed) {
                    recovery.removed_uncommitted += 1;
                    true
                } else {
                    false
                };
                if remove {
                    fs::remove_file(path).map_err(|e| io_err(path, e))?;
                }
                Ok(remove)
            })?;
        }
        if recovery != Recovery::default() {
            tracing::info!(
                control_dir = %self.control_dir.display(),
                removed_tmp = recovery.removed_tmp,
                removed_uncommitted = recovery.removed_uncommitted,
                generation = committed,
                lsn = self.committed.lsn,
                "recovered file sink"
            );
        }
        self.recovery = recovery;
        Ok(())
    }
}

/// `part-{g:010}-{n:04}.{ext}`
pub fn final_name(generation: u64, index: u32, ext: &str) -> String {
    format!("{FINAL_PREFIX}{generation:010}-{index:04}.{ext}")
}

/// `.part-{g:010}-{n:04}.{ext}.tmp`
pub fn tmp_name(generation: u64, index: u32, ext: &str) -> String {
    format!("{TMP_PREFIX}{generation:010}-{index:04}.{ext}{TMP_SUFFIX}")
}

fn is_tmp_name(name: &str, ext: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|rest| rest.strip_suffix(TMP_SUFFIX))
        .is_some_and(|inner| parse_final_name(inner, ext).is_some())
}

/// `(generation, index)` of a final file name with extension `ext`.
pub fn parse_final_name(name: &str, ext: &str) -> Option<(u64, u32)> {
    let stem = name.strip_prefix(FINAL_PREFIX)?.strip_suffix(ext)?.strip_suffix('.')?;
    let (g, n) = stem.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(g) || !digits(n) {
        return None;
    }
    Some((g.parse().ok()?, n.parse().ok()?))
}

/// Every committed final file (extension `ext`) under `root`, as `(generation, path)`, sorted.
/// Files of generations newer than the checkpoint in `control_dir` are left out.
pub fn committed_files(control_dir: &Path, root: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let committed = read_checkpoint(control_dir)?.generation;
    let mut out = Vec::new();
    walk_files(root, &mut |path, name| {
        if let Some((g, _)) = parse_final_name(name, ext) {
            if g <= committed {
                out.push((g, path.to_path_buf()));
            }
        }
        Ok(false)
    })?;
    out.sort();
    Ok(out)
}

/// Reads `{control_dir}/checkpoint.json`; absent means lsn 0, generation 0.
pub fn read_checkpoint(control_dir: &Path) -> Result<Checkpoint> {
    let path = control_dir.join(CHECKPOINT_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint { path, detail: e.to_string() })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Checkpoint::default()),
        Err(e) => Err(io_err(&path, e)),
    }
}

fn write_checkpoint(control_dir: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let tmp = control_dir.join(CHECKPOINT_TMP);
    let path = control_dir.join(CHECKPOINT_FILE);
    let mut body = serde_json::to_vec(checkpoint)?;
    body.push(b'\n');
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(&body).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    fsync_dir(control_dir)
}

/// Visits every regular file under `root` (not following symlinks, skipping `_fleetpipe`
/// directories). `visit(path, name)` returns whether it removed the file; directories that lost
/// a file are fsync'd. A missing `root` is empty.
fn walk_files(root: &Path, visit: &mut dyn FnMut(&Path, &str) -> Result<bool>) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir, e)),
        };
        let mut removed = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            let file_type = entry.file_type().map_err(|e| io_err(&entry.path(), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if file_type.is_dir() {
                if name != CONTROL_DIR_NAME {
                    stack.push(entry.path());
                }
            } else if file_type.is_file() {
                removed |= visit(&entry.path(), name)?;
            }
        }
        if removed {
            fsync_dir(&dir)?;
        }
    }
    Ok(())
}

/// `fsync` a directory, making renames, creations and deletions in it durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

fn remove_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Deletes a file, logging (not failing) when that is impossible: recovery at the next open
/// deletes what is left.
pub fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not delete temporary file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_ignored() {
        assert_eq!(final_name(7, 2, "parquet"), "part-0000000007-0002.parquet");
        assert_eq!(tmp_name(7, 2, "parquet"), ".part-0000000007-0002.parquet.tmp");
        assert_eq!(parse_final_name("part-0000000007-0002.parquet", "parquet"), Some((7, 2)));
        assert_eq!(parse_final_name("part-0000000007-0002.ndjson", "parquet"), None);
        assert_eq!(parse_final_name("part-x-0002.parquet", "parquet"), None);
        assert_eq!(parse_final_name("other.parquet", "parquet"), None);
        assert!(is_tmp_name(".part-0000000007-0002.parquet.tmp", "parquet"));
        assert!(!is_tmp_name("notes.tmp", "parquet"));
    }
}
