//! The apply thread of one group: takes opened frames (in any order) from the
//! open pool, puts them back in chain order, validates each whole frame, writes
//! it to the replicas (one `write_batch` per disk per frame), and makes batches
//! of frames durable (flush every touched image, then store the watermark)
//! before publishing the new durable position to the session, which acks it.
//!
//! Commits are pipelined: a batch is handed to the group's *flusher* thread,
//! which fdatasyncs the touched replicas (through second handles on their
//! files), stores the watermark and publishes it, while the apply thread
//! already writes the next batch. At most one batch is being flushed; the next
//! commit waits for it, so watermarks are stored in order and never claim a
//! write that is not durable (a flush may also catch some writes of the next
//! batch, which only makes them durable early).
//!
//! It owns the group's images and apply log, the flusher owns the watermark;
//! nothing else touches them. It never panics on bad input: a frame that fails to open or validate,
//! or an I/O error, *stalls* the group (nothing more is applied until restart)
//! and is reported to the session through the progress watch.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{oneshot, watch};

use super::TargetError;
use super::applylog::{self, ApplyLog};
use super::budget::Charge;
use super::gate::{ChainPos, Link};
use super::redo::{Redo, RedoFailed, no_space_errno, redo_kind, spool_no_space};
use super::status::{Paused, SharedStatus, WatermarkStatus};
use super::watermark::{Mark, Watermark, WatermarkError};
use crate::agent::pipeline::Reorder;
use crate::error::{Classify, ErrorKind};
use crate::frame::{FrameError, FrameKind, OpenedFrame, Opener, RecordKind};
use crate::image::{self, Engine, Image, ImageError, ImageFormat, ImageSpec, OpKind, WriteOp};
use crate::spool::SpoolError;
use crate::util::hist::Histogram;
use crate::util::time::now_us;

/// Least time between two trims of the redo journal.
const REDO_TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
/// Time between two attempts while applying is paused for want of disk space.
pub(crate) const PAUSE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);
/// Frames read from the redo journal at a time while replaying it.
const REPLAY_CHUNK: usize = 16;

/// Most lag samples kept for one batch before it is committed (bounds the
/// memory of a batch of many tiny records).
const LAG_SAMPLES_MAX: usize = 1 << 18;

/// A frame leaving the open pool.
#[derive(Debug)]
pub(crate) struct Opened {
    /// Position in the order frames were handed to the pipeline.
    pub index: u64,
    /// The frame's chain fields (from its header, parsed by the session).
    pub link: Link,
    /// The opened frame, or why it could not be opened.
    pub result: Result<OpenedFrame, FrameError>,
    /// `Ok` once the frame is durable in the redo journal; else why the append
    /// failed, with the sealed bytes to append it again.
    pub redo: Result<(), RedoFailed>,
    /// Its share of the in-flight budget (given back when dropped).
    pub charge: Charge,
}

/// Why a group stopped applying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stall {
    /// The frame that could not be applied.
    pub frame_no: u64,
    /// Its classification (sent to the relay).
    pub kind: ErrorKind,
    /// One line, naming group and frame.
    pub message: String,
}

/// What the apply thread publishes to the session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// The durable watermark: everything through it is flushed and recorded.
    pub durable: Mark,
    /// Set once when the group stalls.
    pub stall: Option<Stall>,
}

/// Why a frame was not applied, or the group could not continue.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The frame failed to open (wrong key, tampered, corrupt payload).
    #[error("group {group} frame {frame_no}: cannot open: {source}")]
    Open {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Why.
        source: Box<FrameError>,
    },
    /// The frame does not continue the last applied frame (never expected:
    /// the gate orders frames; counted as a chain violation).
    #[error(
        "group {group} frame {frame_no}: chain violation: it names predecessor frame \
         {prev_frame_no} (last seq {prev_last_seq}) but the last frame applied is \
         {applied_frame_no} (last seq {applied_last_seq})"
    )]
    Chain {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Predecessor it names.
        prev_frame_no: u64,
        /// Predecessor's last seq it names.
        prev_last_seq: u64,
        /// Last frame applied.
        applied_frame_no: u64,
        /// Its last seq.
        applied_last_seq: u64,
    },
    /// A record names a disk id the group does not configure.
    #[error(
        "group {group} frame {frame_no}: record {index} names disk {disk}, which is not \
         configured for this group (configured disks: {configured:?})"
    )]
    UnknownDisk {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Record index.
        index: usize,
        /// Disk id.
        disk: u16,
        /// Configured ids.
        configured: Vec<u16>,
    },
    /// The replica is smaller than the source disk.
    #[error(
        "group {group} frame {frame_no}: replica {path} of disk {disk} is {size} bytes, \
         smaller than the source disk's {disk_size} bytes; refusing to apply \
         (give the replica at least the source disk's size)"
    )]
    TooSmall {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Disk id.
        disk: u16,
        /// Replica path.
        path: PathBuf,
        /// Replica size.
        size: u64,
        /// Source disk size (DiskSize record).
        disk_size: u64,
    },
    /// A Write or Zero record lies (partly) outside the replica.
    #[error(
        "group {group} frame {frame_no}: record {index} ({kind} at offset {offset}, len {len}) \
         lies outside replica {path} of disk {disk} ({size} bytes)"
    )]
    OutOfRange {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Record index.
        index: usize,
        /// Write or zero.
        kind: OpKind,
        /// Disk id.
        disk: u16,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Replica path.
        path: PathBuf,
        /// Replica size.
        size: u64,
    },
    /// A record writes a disk whose replica is not open, and no DiskSize
    /// record announced its size.
    #[error(
        "group {group} frame {frame_no}: record {index} writes disk {disk} but no replica is \
         open for it: {path} does not exist and no DiskSize record announced the disk's size"
    )]
    NoImage {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Record index.
        index: usize,
        /// Disk id.
        disk: u16,
        /// Replica path.
        path: PathBuf,
    },
    /// Opening, creating, writing or flushing a replica failed.
    #[error("group {group} frame {frame_no}: {source}")]
    Image {
        /// Group.
        group: String,
        /// Frame (for a flush: the last frame of the batch).
        frame_no: u64,
        /// Why.
        source: Box<ImageError>,
    },
    /// Writing the apply log failed.
    #[error("group {group} frame {frame_no}: apply log {path}: {source}")]
    Log {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Log path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The frame could not be made durable in the redo journal, so none of
    /// its bytes may reach a replica.
    #[error("group {group} frame {frame_no}: redo journal: {source}")]
    Redo {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Why.
        source: Box<SpoolError>,
    },
    /// Storing the watermark failed.
    #[error("group {group} frame {frame_no}: {source}")]
    Watermark {
        /// Group.
        group: String,
        /// Last frame of the batch.
        frame_no: u64,
        /// Why.
        source: Box<WatermarkError>,
    },
}

impl ApplyError {
    /// The frame concerned.
    pub fn frame_no(&self) -> u64 {
        use ApplyError::*;
        match self {
            Open { frame_no, .. }
            | Chain { frame_no, .. }
            | UnknownDisk { frame_no, .. }
            | TooSmall { frame_no, .. }
            | OutOfRange { frame_no, .. }
            | NoImage { frame_no, .. }
            | Image { frame_no, .. }
            | Log { frame_no, .. }
            | Redo { frame_no, .. }
            | Watermark { frame_no, .. } => *frame_no,
        }
    }
}

impl Classify for ApplyError {
    fn kind(&self) -> ErrorKind {
        match self {
            ApplyError::Open { source, .. } => source.kind(),
            ApplyError::Chain { .. }
            | ApplyError::UnknownDisk { .. }
            | ApplyError::OutOfRange { .. } => ErrorKind::Corrupt,
            ApplyError::TooSmall { .. } | ApplyError::NoImage { .. } => ErrorKind::Config,
            ApplyError::Image { source, .. } => match source.kind() {
                // A refusal by the image (e.g. not a file) is the operator's to fix;
                // everything else is I/O.
                ErrorKind::Config => ErrorKind::Config,
                _ => ErrorKind::Io,
            },
            ApplyError::Redo { source, .. } => redo_kind(source),
            ApplyError::Log { .. } | ApplyError::Watermark { .. } => ErrorKind::Io,
        }
    }
}

/// One configured disk of the group.
#[derive(Debug, Clone)]
pub(crate) struct DiskSpec {
    /// Disk id (as in records).
    pub id: u16,
    /// Replica path.
    pub path: PathBuf,
}

/// Everything the apply thread owns.
pub(crate) struct ApplySetup {
    /// Group name.
    pub group: String,
    /// Configured disks.
    pub disks: Vec<DiskSpec>,
    /// Preferred engine (falls back to sync if io_uring is unavailable).
    pub engine: Engine,
    /// Bytes of frames (plaintext) per group commit, at most.
    pub batch_bytes: u64,
    /// Write block-aligned data to the replicas with O_DIRECT when possible.
    pub direct_io: bool,
    /// The group's watermark file.
    pub watermark: Watermark,
    /// The group's apply log path.
    pub log_path: PathBuf,
    /// Shared status.
    pub status: SharedStatus,
    /// Durable progress and stall, for the session.
    pub progress: watch::Sender<Progress>,
    /// The group's redo journal (frames after the watermark are replayed from
    /// it before the thread says it is ready).
    pub redo: Redo,
    /// Opens the frames replayed from the redo journal.
    pub opener: Opener,
    /// Set when the target stops: ends a pause (waiting for disk space).
    pub stop: Arc<AtomicBool>,
}

struct Slot {
    id: u16,
    path: PathBuf,
    image: Option<Box<dyn Image>>,
    /// A second handle on the image's file, for the flusher.
    sync: Option<std::sync::Arc<File>>,
    touched: bool,
}

/// One batch for the flusher to make durable.
struct FlushJob {
    /// Replicas written in the batch, with handles to fdatasync.
    files: Vec<(PathBuf, std::sync::Arc<File>)>,
    /// The watermark the batch ends at.
    mark: Mark,
    /// Whether the last frame of the batch leaves the replica consistent.
    consistent: bool,
    /// The batch's counters and lag samples.
    pending: Pending,
}

/// The flusher thread's side: fdatasync, store the watermark, publish.
struct Flusher {
    group: String,
    watermark: Watermark,
    status: SharedStatus,
    progress: watch::Sender<Progress>,
    lag: Histogram,
    redo: Redo,
    last_trim: Option<std::time::Instant>,
}

impl Flusher {
    fn run(mut self, jobs: Receiver<FlushJob>, done: Sender<Result<(), ApplyError>>) {
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
struct Pending {
    frames: u64,
    records: u64,
    bytes: u64,
    zero_bytes: u64,
    plain: u64,
    lag_from: Vec<u64>,
}

struct Applier {
    group: String,
    slots: Vec<Slot>,
    engine: Engine,
    direct_io: bool,
    batch_bytes: u64,
    log: ApplyLog,
    status: SharedStatus,
    progress: watch::Sender<Progress>,
    /// Last frame applied (written, maybe not yet durable).
    applied: ChainPos,
    applied_time_us: u64,
    applied_consistent: bool,
    pending: Pending,
    stalled: bool,
    /// To the flusher (None once it has been shut down).
    flush_tx: Option<Sender<FlushJob>>,
    flush_done: Receiver<Result<(), ApplyError>>,
    flusher: Option<JoinHandle<()>>,
    /// A batch is being flushed.
    flushing: bool,
    /// The redo journal (failed appends are retried through it).
    redo: Redo,
    /// Set when the target stops.
    stop: Arc<AtomicBool>,
}

/// Says whether the apply thread started (after replaying the redo journal);
/// carries the journal the session appends to.
pub(crate) type Ready = oneshot::Receiver<Result<Redo, TargetError>>;

/// Start the apply thread. The returned receiver says whether it started
/// (apply log open, existing replicas open); the thread then runs until `rx`
/// is disconnected and drained.
pub(crate) fn spawn(
    setup: ApplySetup,
    rx: Receiver<Opened>,
) -> Result<(JoinHandle<()>, Ready), TargetError> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let name = format!("apply-{}", setup.group);
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || match Applier::start(setup) {
            Ok(a) => {
                let _ = ready_tx.send(Ok(a.redo.clone()));
                a.run(rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|source| TargetError::Spawn {
            what: "apply thread",
            source,
        })?;
    Ok((handle, ready_rx))
}

/// Open (or create, with `create`) a replica, falling back to the sync engine
/// for good if io_uring is unavailable.
fn open_replica(
    engine: &mut Engine,
    direct_io: bool,
    group: &str,
    path: &Path,
    create: Option<u64>,
) -> Result<Box<dyn Image>, ImageError> {
    let spec = |engine| ImageSpec {
        path: path.to_path_buf(),
        format: ImageFormat::Raw,
        engine,
        create_size: create,
        direct_io,
    };
    match image::open_image(&spec(*engine)) {
        Err(ImageError::UringUnavailable { source, .. }) => {
            tracing::warn!(group, path = %path.display(), "io_uring unavailable ({source}); applying with the sync engine");
            *engine = Engine::Sync;
            image::open_image(&spec(Engine::Sync))
        }
        other => other,
    }
}

impl Applier {
    fn start(s: ApplySetup) -> Result<Applier, TargetError> {
        let mark = s.watermark.get();
        let consistent = mark.pos.frame_no == 0
            || applylog::last_kind_of(&s.log_path, mark.pos.frame_no).is_some_and(|k| k != 'M');
        let state_io = |path: &Path, source| TargetError::StateIo {
            path: path.to_path_buf(),
            source,
        };
        let mut log = ApplyLog::open(&s.log_path).map_err(|e| state_io(&s.log_path, e))?;
        log.start(mark.pos).map_err(|e| state_io(&s.log_path, e))?;
        let mut engine = s.engine;
        let mut slots = Vec::with_capacity(s.disks.len());
        for d in &s.disks {
            let image = if d.path.symlink_metadata().is_ok() {
                Some(
                    open_replica(&mut engine, s.direct_io, &s.group, &d.path, None).map_err(
                        |source| TargetError::Replica {
                            group: s.group.clone(),
                            source: Box::new(source),
                        },
                    )?,
                )
            } else {
                None
            };
            let sync = match &image {
                Some(img) => Some(std::sync::Arc::new(img.sync_handle().map_err(
                    |source| TargetError::Replica {
                        group: s.group.clone(),
                        source: Box::new(source),
                    },
                )?)),
                None => None,
            };
            slots.push(Slot {
                id: d.id,
                path: d.path.clone(),
                image,
                sync,
                touched: false,
            });
        }
        s.status.lock().consistent = consistent;
        tracing::info!(
            group = %s.group,
            frame_no = mark.pos.frame_no,
            last_seq = mark.pos.last_seq,
            engine = %engine,
            "apply thread starting from the durable watermark"
        );
        let (flush_tx, jobs) = crossbeam_channel::bounded::<FlushJob>(1);
        let (done_tx, flush_done) = crossbeam_channel::bounded(1);
        let flusher = Flusher {
            group: s.group.clone(),
            watermark: s.watermark,
            status: s.status.clone(),
            progress: s.progress.clone(),
            lag: Histogram::new(),
            redo: s.redo.clone(),
            last_trim: None,
        };
        let flusher = std::thread::Builder::new()
            .name(format!("flush-{}", s.group))
            .spawn(move || flusher.run(jobs, done_tx))
            .map_err(|source| TargetError::Spawn {
                what: "flusher thread",
                source,
            })?;
        let mut a = Applier {
            group: s.group,
            slots,
            engine,
            direct_io: s.direct_io,
            batch_bytes: s.batch_bytes.max(1),
            log,
            status: s.status,
            progress: s.progress,
            applied: mark.pos,
            applied_time_us: mark.time_us,
            applied_consistent: consistent,
            pending: Pending::default(),
            stalled: false,
            flush_tx: Some(flush_tx),
            flush_done,
            flusher: Some(flusher),
            flushing: false,
            redo: s.redo,
            stop: s.stop,
        };
        a.replay(s.opener)?;
        Ok(a)
    }

    /// Apply again, in chain order, the frames of the redo journal after the
    /// durable watermark (a crash left them written partly, or not at all),
    /// and make them durable. Until this returns the session does not start,
    /// so the relay's redelivery of these frames is dropped by the gate as
    /// duplicates.
    fn replay(&mut self, mut opener: Opener) -> Result<(), TargetError> {
        let mut replayed = 0u64;
        loop {
            let frames = self
                .redo
                .read_after(self.applied.frame_no, REPLAY_CHUNK)
                .map_err(|e| TargetError::Redo {
                    group: self.group.clone(),
                    source: Box::new(e),
                })?;
            if frames.is_empty() {
                break;
            }
            for f in frames {
                let frame = opener.open_owned(f.bytes).map_err(|e| TargetError::Redo {
                    group: self.group.clone(),
                    source: Box::new(SpoolError::Corrupt {
                        file: self.redo_dir(),
                        offset: 0,
                        what: format!("frame {} does not open: {e}", f.frame_no),
                    }),
                })?;
                self.apply_or_pause(&frame)
                    .map_err(|e| TargetError::Replay {
                        group: self.group.clone(),
                        source: Box::new(e),
                    })?;
                replayed += 1;
                if self.pending.plain >= self.batch_bytes {
                    self.commit().map_err(|e| TargetError::Replay {
                        group: self.group.clone(),
                        source: Box::new(e),
                    })?;
                }
            }
        }
        if replayed > 0 {
            self.commit()
                .and_then(|()| self.wait_flush())
                .map_err(|e| TargetError::Replay {
                    group: self.group.clone(),
                    source: Box::new(e),
                })?;
            tracing::info!(
                group = %self.group,
                frames = replayed,
                frame_no = self.applied.frame_no,
                last_seq = self.applied.last_seq,
                "replayed the redo journal after the watermark"
            );
        }
        self.status.lock().redo_replayed = replayed;
        Ok(())
    }

    fn redo_dir(&self) -> PathBuf {
        self.log
            .path()
            .parent()
            .map(|d| d.join(super::redo::REDO_DIR))
            .unwrap_or_default()
    }

    fn run(mut self, rx: Receiver<Opened>) {
        let mut reorder: Reorder<Opened> = Reorder::default();
        while let Ok(first) = rx.recv() {
            reorder.push(first.index, first);
            while let Ok(m) = rx.try_recv() {
                reorder.push(m.index, m);
            }
            while let Some(m) = reorder.pop() {
                if self.stalled {
                    // Dropping it gives its budget back; nothing more is applied.
                    continue;
                }
                self.handle(m);
                if self.pending.plain >= self.batch_bytes
                    || self.pending.lag_from.len() >= LAG_SAMPLES_MAX
                {
                    self.commit_or_stall();
                }
            }
            // Group commit: whatever was applied is made durable once nothing
            // more is waiting.
            if rx.is_empty() {
                self.commit_or_stall();
            }
        }
        self.commit_or_stall();
        self.wait_flush_or_stall();
        // Stop the flusher (it ends when its queue is closed) and wait for it.
        self.flush_tx = None;
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
        tracing::info!(
            group = %self.group,
            frame_no = self.progress.borrow().durable.pos.frame_no,
            "apply thread stopped"
        );
    }

    fn handle(&mut self, m: Opened) {
        #[cfg(test)]
        hold::wait_while_held(self.log.path());
        let Opened {
            link,
            result,
            redo,
            charge,
            ..
        } = m;
        if let Err(failed) = redo
            && let Err(e) = self.append_again(link.frame_no, failed)
        {
            return self.refuse(e);
        }
        let frame = match result {
            Ok(f) => f,
            Err(source) => {
                return self.refuse(ApplyError::Open {
                    group: self.group.clone(),
                    frame_no: link.frame_no,
                    source: Box::new(source),
                });
            }
        };
        if let Err(e) = self.apply_or_pause(&frame) {
            if matches!(e, ApplyError::Chain { .. }) {
                self.status.lock().chain_violations += 1;
            }
            match e {
                // Some bytes of this frame may be written: nothing since the last
                // commit may be made durable under the watermark.
                ApplyError::Image { .. } => self.stall(e),
                _ => self.refuse(e),
            }
        }
        drop(frame);
        drop(charge);
    }

    /// Apply `f` (see [`Applier::prepare_frame`] and [`Applier::write_frame`]);
    /// a replica write that fails for want of disk space pauses the group and
    /// is retried (the frame's writes, again in order, give the same bytes)
    /// until it succeeds or the target stops.
    fn apply_or_pause(&mut self, f: &OpenedFrame) -> Result<(), ApplyError> {
        self.prepare_frame(f)?;
        loop {
            match self.write_frame(f) {
                Ok(()) => break,
                Err(ApplyError::Image { source, .. })
                    if source.errno().is_some_and(no_space_errno)
                        && self.pause_wait(&format!("replica: {source}")) => {}
                Err(e) => return Err(e),
            }
        }
        self.resume();
        self.finish_frame(f);
        Ok(())
    }

    /// Check that `f` continues the chain, validate every record, log it, and
    /// create the replicas it announces. Nothing is written (and no replica
    /// created) unless the whole frame is valid.
    fn prepare_frame(&mut self, f: &OpenedFrame) -> Result<(), ApplyError> {
        let h = &f.header;
        if h.prev_frame_no != self.applied.frame_no || h.prev_last_seq != self.applied.last_seq {
            return Err(ApplyError::Chain {
                group: self.group.clone(),
                frame_no: h.frame_no,
                prev_frame_no: h.prev_frame_no,
                prev_last_seq: h.prev_last_seq,
                applied_frame_no: self.applied.frame_no,
                applied_last_seq: self.applied.last_seq,
            });
        }
        let create = self.plan(f)?;
        self.log.apply(h).map_err(|source| ApplyError::Log {
            group: self.group.clone(),
            frame_no: h.frame_no,
            path: self.log.path().to_path_buf(),
            source,
        })?;
        let img_err = |group: &str, source| ApplyError::Image {
            group: group.to_string(),
            frame_no: h.frame_no,
            source: Box::new(source),
        };
        for (si, size) in create.iter().enumerate() {
            let Some(size) = *size else { continue };
            let slot = &mut self.slots[si];
            if let Some(dir) = slot.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| {
                    img_err(
                        &self.group,
                        ImageError::Create {
                            path: slot.path.clone(),
                            size,
                            source,
                        },
                    )
                })?;
            }
            let img = open_replica(
                &mut self.engine,
                self.direct_io,
                &self.group,
                &slot.path,
                Some(size),
            )
            .map_err(|e| img_err(&self.group, e))?;
            tracing::info!(group = %self.group, disk = slot.id, path = %slot.path.display(), size = img.size(), "replica opened for a DiskSize record");
            slot.sync = Some(std::sync::Arc::new(
                img.sync_handle().map_err(|e| img_err(&self.group, e))?,
            ));
            slot.image = Some(img);
        }
        Ok(())
    }

    /// Write the records of a prepared frame: one `write_batch` per disk.
    fn write_frame(&mut self, f: &OpenedFrame) -> Result<(), ApplyError> {
        let h = &f.header;
        let mut ops: Vec<Vec<WriteOp<'_>>> = (0..self.slots.len()).map(|_| Vec::new()).collect();
        for (r, data) in f.iter() {
            // plan() resolved every disk; a miss here cannot happen.
            let Some(si) = self.slot_of(r.disk) else {
                continue;
            };
            match r.kind {
                RecordKind::Write => ops[si].push(WriteOp::Write {
                    offset: r.offset,
                    data,
                }),
                RecordKind::Zero => ops[si].push(WriteOp::Zero {
                    offset: r.offset,
                    len: u64::from(r.len),
                }),
                RecordKind::DiskSize => {}
            }
        }
        for (si, ops) in ops.iter().enumerate() {
            if ops.is_empty() {
                continue;
            }
            let slot = &mut self.slots[si];
            if let Some(img) = slot.image.as_mut() {
                slot.touched = true;
                img.write_batch(ops).map_err(|source| ApplyError::Image {
                    group: self.group.clone(),
                    frame_no: h.frame_no,
                    source: Box::new(source),
                })?;
            }
        }
        Ok(())
    }

    /// Account a written frame: it is the last applied one now.
    fn finish_frame(&mut self, f: &OpenedFrame) {
        let h = &f.header;
        let (mut bytes, mut zero_bytes) = (0u64, 0u64);
        for r in &f.records {
            match r.kind {
                RecordKind::Write => bytes += u64::from(r.len),
                RecordKind::Zero => zero_bytes += u64::from(r.len),
                RecordKind::DiskSize => {}
            }
        }
        self.applied = ChainPos {
            frame_no: h.frame_no,
            last_seq: h.last_seq,
        };
        self.applied_time_us = h.time_last_us;
        self.applied_consistent = h.kind == FrameKind::Write;
        let p = &mut self.pending;
        p.frames += 1;
        p.records += f.records.len() as u64;
        p.bytes += bytes;
        p.zero_bytes += zero_bytes;
        p.plain += u64::from(h.plain_len);
        if h.kind == FrameKind::Write && !h.heartbeat {
            p.lag_from.extend(f.records.iter().map(|r| r.time_us));
        }
    }

    /// Append again a frame whose redo-journal append failed. The first retry
    /// is immediate (the failure may only have been the chain check refusing
    /// a frame whose predecessor's append had failed and has since been
    /// appended again); while the disk is full the group pauses and retries.
    fn append_again(&mut self, frame_no: u64, failed: RedoFailed) -> Result<(), ApplyError> {
        let RedoFailed { mut error, sealed } = failed;
        let mut retried = false;
        loop {
            if retried
                && !(spool_no_space(&error) && self.pause_wait(&format!("redo journal: {error}")))
            {
                return Err(ApplyError::Redo {
                    group: self.group.clone(),
                    frame_no,
                    source: Box::new(error),
                });
            }
            retried = true;
            match self.redo.append_blocking(&sealed) {
                Ok(_) => {
                    self.resume();
                    return Ok(());
                }
                Err(e) => error = e,
            }
        }
    }

    /// Pause (or stay paused) because `reason` (the disk is full): say so in
    /// the status and the log (once per pause), wait [`PAUSE_RETRY`], and
    /// return true to retry, or false when the target is stopping.
    fn pause_wait(&mut self, reason: &str) -> bool {
        {
            let mut s = self.status.lock();
            match &mut s.paused {
                Some(p) => p.retries += 1,
                None => {
                    tracing::warn!(group = %self.group, "applying paused: {reason}; retrying every {:?} until there is room", PAUSE_RETRY);
                    s.paused = Some(Paused {
                        reason: reason.to_string(),
                        since_us: now_us(),
                        retries: 0,
                    });
                }
            }
        }
        let until = std::time::Instant::now() + PAUSE_RETRY;
        while std::time::Instant::now() < until {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        !self.stop.load(Ordering::Relaxed)
    }

    /// Leave a pause, if paused.
    fn resume(&mut self) {
        let mut s = self.status.lock();
        if let Some(p) = s.paused.take() {
            tracing::info!(group = %self.group, retries = p.retries, "applying resumed");
        }
    }

    fn slot_of(&self, disk: u16) -> Option<usize> {
        self.slots.iter().position(|s| s.id == disk)
    }

    /// Check every record against the configured disks and replica sizes;
    /// open existing replicas a DiskSize record names. Returns, per slot, the
    /// size to create a missing replica with.
    fn plan(&mut self, f: &OpenedFrame) -> Result<Vec<Option<u64>>, ApplyError> {
        let frame_no = f.header.frame_no;
        let mut create: Vec<Option<u64>> = vec![None; self.slots.len()];
        for (index, (r, _)) in f.iter().enumerate() {
            let Some(si) = self.slot_of(r.disk) else {
                return Err(ApplyError::UnknownDisk {
                    group: self.group.clone(),
                    frame_no,
                    index,
                    disk: r.disk,
                    configured: self.slots.iter().map(|s| s.id).collect(),
                });
            };
            match r.kind {
                RecordKind::DiskSize => {
                    let disk_size = r.offset;
                    let slot = &mut self.slots[si];
                    if slot.image.is_none() && create[si].is_none() {
                        if slot.path.symlink_metadata().is_ok() {
                            let img = open_replica(
                                &mut self.engine,
                                self.direct_io,
                                &self.group,
                                &slot.path,
                                None,
                            )
                            .map_err(|source| ApplyError::Image {
                                group: self.group.clone(),
                                frame_no,
                                source: Box::new(source),
                            })?;
                            let sync = img.sync_handle().map_err(|source| ApplyError::Image {
                                group: self.group.clone(),
                                frame_no,
                                source: Box::new(source),
                            })?;
                            slot.sync = Some(std::sync::Arc::new(sync));
                            slot.image = Some(img);
                        } else {
                            create[si] = Some(disk_size);
                            continue;
                        }
                    }
                    if let Some(img) = &slot.image {
                        if img.size() < disk_size {
                            return Err(ApplyError::TooSmall {
                                group: self.group.clone(),
                                frame_no,
                                disk: r.disk,
                                path: slot.path.clone(),
                                size: img.size(),
                                disk_size,
                            });
                        }
                    } else if let Some(c) = create[si] {
                        create[si] = Some(c.max(disk_size));
                    }
                }
                RecordKind::Write | RecordKind::Zero => {
                    let slot = &self.slots[si];
                    let size = match (&slot.image, create[si]) {
                        (Some(img), _) => img.size(),
                        (None, Some(c)) => c,
                        (None, None) => {
                            return Err(ApplyError::NoImage {
                                group: self.group.clone(),
                                frame_no,
                                index,
                                disk: r.disk,
                                path: slot.path.clone(),
                            });
                        }
                    };
                    let len = u64::from(r.len);
                    if r.offset.checked_add(len).is_none_or(|end| end > size) {
                        return Err(ApplyError::OutOfRange {
                            group: self.group.clone(),
                            frame_no,
                            index,
                            kind: if r.kind == RecordKind::Write {
                                OpKind::Write
                            } else {
                                OpKind::Zero
                            },
                            disk: r.disk,
                            offset: r.offset,
                            len,
                            path: slot.path.clone(),
                            size,
                        });
                    }
                }
            }
        }
        Ok(create)
    }

    /// Hand the batch to the flusher, which makes it durable (flush every
    /// touched replica, store the watermark) and then publishes it; nothing is
    /// acknowledged before that. Waits for the previous batch's flush first.
    fn commit(&mut self) -> Result<(), ApplyError> {
        self.wait_flush()?;
        if self.pending.frames == 0 {
            return Ok(());
        }
        let mut files = Vec::new();
        for slot in &mut self.slots {
            if !slot.touched {
                continue;
            }
            if let Some(f) = &slot.sync {
                files.push((slot.path.clone(), f.clone()));
            }
            slot.touched = false;
        }
        let job = FlushJob {
            files,
            mark: Mark {
                pos: self.applied,
                time_us: self.applied_time_us,
            },
            consistent: self.applied_consistent,
            pending: std::mem::take(&mut self.pending),
        };
        let frame_no = job.mark.pos.frame_no;
        let gone = || ApplyError::Watermark {
            group: self.group.clone(),
            frame_no,
            source: Box::new(WatermarkError::Io {
                path: self.log.path().to_path_buf(),
                source: std::io::Error::other("the flusher thread has stopped"),
            }),
        };
        match &self.flush_tx {
            Some(tx) => tx.send(job).map_err(|_| gone())?,
            None => return Err(gone()),
        }
        self.flushing = true;
        Ok(())
    }

    /// Wait until the batch being flushed (if any) is durable.
    fn wait_flush(&mut self) -> Result<(), ApplyError> {
        if !self.flushing {
            return Ok(());
        }
        self.flushing = false;
        match self.flush_done.recv() {
            Ok(r) => r,
            Err(_) => Err(ApplyError::Watermark {
                group: self.group.clone(),
                frame_no: self.applied.frame_no,
                source: Box::new(WatermarkError::Io {
                    path: self.log.path().to_path_buf(),
                    source: std::io::Error::other("the flusher thread has stopped"),
                }),
            }),
        }
    }

    fn wait_flush_or_stall(&mut self) {
        if let Err(e) = self.wait_flush() {
            self.stall(e);
        }
    }

    fn commit_or_stall(&mut self) {
        if self.stalled {
            return;
        }
        if let Err(e) = self.commit() {
            self.stall(e);
        }
    }

    /// A frame is refused: make what was applied before it durable, then stall.
    fn refuse(&mut self, e: ApplyError) {
        self.status.lock().refused += 1;
        self.commit_or_stall();
        self.wait_flush_or_stall();
        self.stall(e);
    }

    /// Stop applying until restart, and say why. The first reason wins.
    fn stall(&mut self, e: ApplyError) {
        if self.stalled {
            return;
        }
        self.stalled = true;
        let message = e.to_string();
        tracing::error!(group = %self.group, frame_no = e.frame_no(), kind = %e.kind(), "{message}; the group is stalled until restart");
        self.status.stall(&message);
        let stall = Stall {
            frame_no: e.frame_no(),
            kind: e.kind(),
            message,
        };
        self.progress.send_modify(|p| {
            if p.stall.is_none() {
                p.stall = Some(stall);
            }
        });
    }
}

/// Test-only: pause a group's apply thread before each frame (a slow disk),
/// so tests can have frames sitting in the pipeline deterministically.
#[cfg(test)]
pub(crate) mod hold {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::time::Duration;

    static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn held() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
        HELD.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the apply thread writing `log` until dropped.
    pub struct Hold(PathBuf);

    /// Hold the apply thread whose apply log is `log`.
    pub fn hold(log: &Path) -> Hold {
        held().push(log.to_path_buf());
        Hold(log.to_path_buf())
    }

    impl Drop for Hold {
        fn drop(&mut self) {
            held().retain(|p| p != &self.0);
        }
    }

    pub(super) fn wait_while_held(log: &Path) {
        while held().iter().any(|p| p == log) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
