//! The flusher thread of a group: makes a batch durable (fdatasync of the
//! replicas it touched, then the watermark), publishes it to the session,
//! trims the redo journal and tells the catalog what the batch changed.

use std::fs::File;
use std::path::{Path, PathBuf};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::watch;

use super::super::catalog::Catalog;
use super::super::redo::Redo;
use super::super::retention::CatalogOp;
use super::super::retention::journal::{Loc, PointRec};
use super::super::status::{SharedStatus, WatermarkStatus};
use super::super::watermark::{Mark, Watermark};
use super::{ApplyError, Progress};
use crate::image::ImageError;
use crate::util::hist::Histogram;
use crate::util::time::now_us;

/// Catalog changes kept for a retry while the catalog is unavailable (locked,
/// failing); beyond this the oldest are dropped with an error (the catalog is
/// reconciled with the journal at the next start).
const MAX_PENDING_OPS: usize = 100_000;

/// Least time between two trims of the redo journal.
const REDO_TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// One batch for the flusher to make durable.
pub(super) struct FlushJob {
    /// Replicas written in the batch, with handles to fdatasync.
    pub(super) files: Vec<(PathBuf, std::sync::Arc<File>)>,
    /// The watermark the batch ends at.
    pub(super) mark: Mark,
    /// Whether the last frame of the batch leaves the replica consistent.
    pub(super) consistent: bool,
    /// The batch's counters and lag samples.
    pub(super) pending: Pending,
    /// What the catalog must learn once the batch is durable.
    pub(super) ops: Vec<CatalogOp>,
}

/// The flusher thread's side: fdatasync, store the watermark, publish.
pub(super) struct Flusher {
    pub(super) group: String,
    pub(super) watermark: Watermark,
    pub(super) status: SharedStatus,
    pub(super) progress: watch::Sender<Progress>,
    pub(super) lag: Histogram,
    pub(super) redo: Redo,
    pub(super) last_trim: Option<std::time::Instant>,
    state_dir: PathBuf,
    catalog: Option<Catalog>,
    /// Changes not yet in the catalog (it was unavailable).
    unsaved: Vec<CatalogOp>,
}

impl Flusher {
    /// A flusher for `group`; opens the catalog in `state_dir` and makes it
    /// agree with the retention journal's points (`journal`). A catalog that
    /// cannot be opened is retried at every batch.
    pub(super) fn new(
        group: String,
        watermark: Watermark,
        status: SharedStatus,
        progress: watch::Sender<Progress>,
        redo: Redo,
        state_dir: &Path,
        journal: &[(Loc, PointRec)],
    ) -> Flusher {
        let mut f = Flusher {
            group,
            watermark,
            status,
            progress,
            lag: Histogram::new(),
            redo,
            last_trim: None,
            state_dir: state_dir.to_path_buf(),
            catalog: None,
            unsaved: Vec::new(),
        };
        f.open_catalog();
        if let Some(c) = f.catalog.as_mut()
            && let Err(e) = c.reconcile(&f.group, journal)
        {
            tracing::warn!(group = %f.group, "catalog: cannot reconcile with the retention journal: {e}");
        }
        f
    }

    fn open_catalog(&mut self) {
        match Catalog::open(&self.state_dir) {
            Ok((c, why)) => {
                if let Some(why) = why {
                    tracing::error!(group = %self.group, "catalog was unusable and was replaced: {why}");
                }
                self.catalog = Some(c);
            }
            Err(e) => {
                tracing::warn!(group = %self.group, "catalog unavailable (retrying at the next batch): {e}");
            }
        }
    }

    /// Apply `ops` (after the batch that made them is durable); on failure
    /// keep them for the next batch.
    fn save_ops(&mut self, ops: Vec<CatalogOp>) {
        self.unsaved.extend(ops);
        if self.unsaved.is_empty() {
            return;
        }
        if self.catalog.is_none() {
            self.open_catalog();
        }
        let Some(c) = self.catalog.as_mut() else {
            self.cap_unsaved();
            return;
        };
        match c.apply(&self.group, &self.unsaved) {
            Ok(()) => self.unsaved.clear(),
            Err(e) => {
                use crate::error::{Classify, ErrorKind};
                tracing::warn!(group = %self.group, pending = self.unsaved.len(), "catalog update failed (kept for a retry): {e}");
                if e.kind() == ErrorKind::Corrupt {
                    // Reopened (and replaced) at the next batch.
                    self.catalog = None;
                }
                self.cap_unsaved();
            }
        }
    }

    fn cap_unsaved(&mut self) {
        if self.unsaved.len() > MAX_PENDING_OPS {
            let n = self.unsaved.len() - MAX_PENDING_OPS;
            tracing::error!(group = %self.group, dropped = n, "catalog unavailable for too long: dropping the oldest changes (the catalog is reconciled with the journal at the next start)");
            self.unsaved.drain(..n);
        }
    }

    pub(super) fn run(mut self, jobs: Receiver<FlushJob>, done: Sender<Result<(), ApplyError>>) {
        for job in jobs {
            let r = self.flush(job);
            if done.send(r).is_err() {
                break;
            }
        }
    }

    fn flush(&mut self, job: FlushJob) -> Result<(), ApplyError> {
        let frame_no = job.mark.pos.frame_no;
        for (path, f) in &job.files {
            f.sync_data().map_err(|source| ApplyError::Image {
                group: self.group.clone(),
                frame_no,
                source: Box::new(ImageError::Flush {
                    path: path.clone(),
                    source,
                }),
            })?;
        }
        self.watermark
            .store(job.mark)
            .map_err(|source| ApplyError::Watermark {
                group: self.group.clone(),
                frame_no,
                source: Box::new(source),
            })?;
        let p = job.pending;
        let now = now_us();
        for t in &p.lag_from {
            self.lag.record(now.saturating_sub(*t));
        }
        {
            let mut s = self.status.lock();
            s.watermark = WatermarkStatus {
                frame_no: job.mark.pos.frame_no,
                last_seq: job.mark.pos.last_seq,
                time_us: job.mark.time_us,
            };
            s.frames_applied += p.frames;
            s.records_applied += p.records;
            s.bytes_applied += p.bytes;
            s.zero_bytes += p.zero_bytes;
            s.consistent = job.consistent;
            s.lag_us = self.lag.summary();
            s.apply_batches += 1;
        }
        self.progress.send_modify(|pr| pr.durable = job.mark);
        self.trim_redo(frame_no);
        self.save_ops(job.ops);
        Ok(())
    }

    /// Forget the redo journal's frames through the durable watermark, at most
    /// a few times a second (each trim stores the spool's state file).
    fn trim_redo(&mut self, frame_no: u64) {
        let due = self
            .last_trim
            .is_none_or(|t| t.elapsed() >= REDO_TRIM_INTERVAL);
        if !due {
            return;
        }
        self.last_trim = Some(std::time::Instant::now());
        if let Err(e) = self.redo.trim_through(frame_no) {
            // Not fatal: the journal keeps frames a little longer.
            tracing::warn!(group = %self.group, frame_no, "redo journal trim failed: {e}");
        }
        let (frames, bytes) = self.redo.usage();
        let mut s = self.status.lock();
        s.redo_frames = frames;
        s.redo_bytes = bytes;
    }
}

/// What one batch (frames applied since the last commit) accumulated.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) frames: u64,
    pub(super) records: u64,
    pub(super) bytes: u64,
    pub(super) zero_bytes: u64,
    pub(super) plain: u64,
    pub(super) lag_from: Vec<u64>,
}
