//! The log as the sink drivers see it ([`LogAccess`]): read back for a sink that fell behind,
//! and the lane through which a sink's refused frames reach the dead-letter store.

use std::path::PathBuf;

use fleetpipe_processors::dedup::Dedup;
use fleetpipe_processors::{Batch, Lsn, Rejection};

use crate::driver::LogAccess;
use crate::entry::NotDurable;
use crate::sink::SinkError;
use crate::writer::DivertLane;
use crate::{record, wal};

/// Frames remembered while a sink catches up from the log, to drop redeliveries as the shards
/// would have (at most; the pipeline's own window is used when smaller). De-duplication is the
/// one stage that drops frames, so it is the one a catch-up repeats.
pub(crate) const CATCH_UP_DEDUP_FRAMES: usize = 262_144;
/// Frames (and rejections) per batch handed to a sink while it catches up.
const CATCH_UP_BATCH: usize = 8_192;

pub(crate) struct PipelineLog {
    pub(crate) dir: PathBuf,
    pub(crate) dedup_frames: usize,
    pub(crate) divert: DivertLane,
}

impl LogAccess for PipelineLog {
    fn replay(
        &self,
        after: Lsn,
        through: Lsn,
        f: &mut dyn FnMut(Batch) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        let mut dedup = Dedup::new(self.dedup_frames);
        let mut batch = Batch::default();
        let read = wal::read_range(&self.dir, after, through, |lsn, payload| -> Result<(), SinkError> {
            match record::decode(payload) {
                Ok(entry) => {
                    let mut frames = entry.frames;
                    dedup.retain_new(&mut frames);
                    batch.frames.extend(frames);
                    batch.rejections.extend(entry.rejections);
                }
                Err(e) => tracing::error!(lsn, error = %e, "undecodable log record skipped"),
            }
            batch.lsn = lsn;
            if batch.frames.len() + batch.rejections.len() >= CATCH_UP_BATCH {
                f(std::mem::take(&mut batch))?;
            }
            Ok(())
        });
        read?;
        if batch.lsn > after {
            f(batch)?;
        }
        Ok(())
    }

    fn keep(&self, rejections: Vec<Rejection>) -> Result<(), NotDurable> {
        self.divert.keep(rejections).map(drop)
    }
}
