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
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::{oneshot, watch};

mod error;
mod flush;
mod frame;

pub use error::ApplyError;
use flush::{FlushJob, Flusher, Pending};

use super::TargetError;
use super::applylog::{self, ApplyLog};
use super::budget::Charge;
use super::gate::{ChainPos, Link};
use super::redo::{Redo, RedoFailed};
use super::retention::pins::POLL_INTERVAL;
use super::retention::policy::Policy;
use super::retention::{Position, Retention};
use super::status::{RetentionStatus, SharedStatus};
use super::watermark::{Mark, Watermark, WatermarkError};
use crate::agent::pipeline::Reorder;
use crate::error::{Classify, ErrorKind};
use crate::frame::{FrameError, FrameKind, OpenedFrame, Opener};
use crate::image::{self, Engine, Image, ImageError, ImageFormat, ImageSpec};
use crate::util::time::now_us;

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

/// One configured disk of the group.
#[derive(Debug, Clone)]
pub(crate) struct DiskSpec {
    /// Disk id (as in records).
    pub id: u16,
    /// Replica path.
    pub path: PathBuf,
    /// Replica layout.
    pub format: ImageFormat,
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
    pub direct_io: crate::image::DirectIo,
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
    /// Which recovery points to keep.
    pub policy: Policy,
    /// The target's state directory (the catalog lives there).
    pub state_dir: PathBuf,
}

/// File in a group's state directory that says the group was promoted
/// (`recover --promote`): its replica became a source, nothing is applied to
/// it any more.
pub const PROMOTED_FILE: &str = "PROMOTED";

/// What the promoted marker says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromotedMarker {
    /// The point the replica was rolled back to.
    pub frame_no: u64,
    /// Its seq.
    pub last_seq: u64,
    /// Its source time, µs.
    pub time_us: u64,
    /// When the group was promoted, µs.
    pub promoted_us: u64,
    /// The process that promoted it.
    pub pid: u32,
}

impl PromotedMarker {
    /// Read the marker of the group whose state directory is `group_dir`.
    pub fn read(group_dir: &Path) -> Option<PromotedMarker> {
        let bytes = std::fs::read(group_dir.join(PROMOTED_FILE)).ok()?;
        if bytes.len() > 64 * 1024 {
            return None;
        }
        serde_json::from_slice(&bytes).ok()
    }

    /// Write it durably (file and directory).
    pub fn write(&self, group_dir: &Path) -> std::io::Result<()> {
        let path = group_dir.join(PROMOTED_FILE);
        let tmp = group_dir.join(format!("{PROMOTED_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::util::durable::replace_file(&path, &tmp, &bytes)
    }

    /// One line for logs and status.
    pub fn describe(&self) -> String {
        format!(
            "promoted (recover --promote by process {}) at seq {} (frame {}): the replica is a source now; nothing more is applied to this group",
            self.pid, self.last_seq, self.frame_no
        )
    }
}

struct Slot {
    id: u16,
    path: PathBuf,
    format: ImageFormat,
    image: Option<Box<dyn Image>>,
    /// A second handle on the image's file, for the flusher.
    sync: Option<std::sync::Arc<File>>,
    touched: bool,
}

struct Applier {
    group: String,
    slots: Vec<Slot>,
    engine: Engine,
    direct_io: crate::image::DirectIo,
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
    /// Before-images and recovery points.
    retention: Retention,
    /// The last frame applied ended with this tag (name, app-consistent).
    last_tag: Option<(String, bool)>,
    /// The group's state directory.
    group_dir: PathBuf,
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

/// An applier dropped without running to its end (a start that failed in the
/// replay) stops its flusher too.
impl Drop for Applier {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

/// Open (or create, with `create`) a replica, falling back to the sync engine
/// for good if io_uring is unavailable.
fn open_replica(
    engine: &mut Engine,
    direct_io: crate::image::DirectIo,
    group: &str,
    path: &Path,
    format: ImageFormat,
    create: Option<u64>,
) -> Result<Box<dyn Image>, ImageError> {
    let spec = |engine| ImageSpec {
        path: path.to_path_buf(),
        format,
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

/// The flusher's second handle on a replica, once the replica is claimed for
/// this process (refused while an agent protects it or another target applies
/// to it, or while it is a mounted block device).
pub(super) fn claimed_sync_handle(img: &dyn Image, path: &Path) -> Result<File, ImageError> {
    let sync = img.sync_handle()?;
    crate::util::exclusive::claim(&sync, path).map_err(|source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(sync)
}

impl Applier {
    fn start(s: ApplySetup) -> Result<Applier, TargetError> {
        let mark = s.watermark.get();
        // The watermark says whether its position is consistent; a slot
        // written before it carried that (version 1) leaves it to the apply
        // log, which a power cut may have cut short.
        let consistent = mark.pos.frame_no == 0
            || mark.consistent.unwrap_or_else(|| {
                applylog::last_kind_of(&s.log_path, mark.pos.frame_no)
                    .is_some_and(|k| !matches!(k, 'M' | 'R'))
            });
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
                    open_replica(&mut engine, s.direct_io, &s.group, &d.path, d.format, None)
                        .map_err(|source| TargetError::Replica {
                            group: s.group.clone(),
                            source: Box::new(source),
                        })?,
                )
            } else {
                None
            };
            let sync = match &image {
                Some(img) => Some(std::sync::Arc::new(
                    claimed_sync_handle(img.as_ref(), &d.path).map_err(|source| {
                        TargetError::Replica {
                            group: s.group.clone(),
                            source: Box::new(source),
                        }
                    })?,
                )),
                None => None,
            };
            slots.push(Slot {
                id: d.id,
                path: d.path.clone(),
                format: d.format,
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
        let group_dir = s
            .log_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let promoted = PromotedMarker::read(&group_dir);
        let retention =
            Retention::open(&group_dir, &s.group, s.policy, !consistent).map_err(|source| {
                TargetError::Retention {
                    group: s.group.clone(),
                    source: Box::new(source),
                }
            })?;
        let journal_points: Vec<_> = retention.epochs().cloned().collect();
        let (flush_tx, jobs) = crossbeam_channel::bounded::<FlushJob>(1);
        let (done_tx, flush_done) = crossbeam_channel::bounded(1);
        let flusher = Flusher::new(
            s.group.clone(),
            s.watermark,
            s.status.clone(),
            s.progress.clone(),
            s.redo.clone(),
            &s.state_dir,
            &journal_points,
        );
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
            retention,
            last_tag: None,
            group_dir,
        };
        if let Some(m) = promoted {
            // Never replay into a promoted replica: it is a source now.
            let why = m.describe();
            tracing::warn!(group = %a.group, "{why}");
            a.stalled = true;
            a.status.stall(&why);
            a.progress.send_modify(|p| {
                p.stall = Some(Stall {
                    frame_no: a.applied.frame_no,
                    kind: ErrorKind::Config,
                    message: format!("group {}: {why}", a.group),
                });
            });
            return Ok(a);
        }
        a.replay(s.opener)?;
        let in_m = a.applied.frame_no > 0 && !a.applied_consistent;
        a.retention.set_in_m(in_m);
        a.retention_status();
        Ok(a)
    }

    /// Stop the flusher (it ends when its queue is closed) and wait for it,
    /// so that nothing of the group (its redo journal's lock, its watermark)
    /// is held once the applier is gone.
    fn stop_flusher(&mut self) {
        self.flush_tx = None;
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
    }

    /// The applied position, as retention sees it.
    fn position(&self) -> Position {
        Position {
            frame_no: self.applied.frame_no,
            last_seq: self.applied.last_seq,
            time_us: self.applied_time_us,
            consistent: self.applied_consistent,
            tag: self.last_tag.clone(),
        }
    }

    /// Idle (nothing to apply): answer pins, and stop if one promotes.
    fn on_idle(&mut self) {
        if self.stalled {
            return;
        }
        let pos = self.position();
        if let Err(e) = self.retention.idle(&pos) {
            return self.stall(ApplyError::Retention {
                group: self.group.clone(),
                frame_no: pos.frame_no,
                source: Box::new(e),
            });
        }
        self.promote_if_asked();
    }

    /// A reader asked to promote the group: make what was applied durable,
    /// write the promoted marker, stop applying for good, then answer it.
    fn promote_if_asked(&mut self) {
        let Some(req) = self.retention.take_promote() else {
            return;
        };
        self.commit_or_stall();
        self.wait_flush_or_stall();
        let marker = PromotedMarker {
            frame_no: req.granted.frame_no,
            last_seq: req.granted.last_seq,
            time_us: req.granted.time_us,
            promoted_us: now_us(),
            pid: req.pid,
        };
        if let Err(e) = marker.write(&self.group_dir) {
            tracing::error!(group = %self.group, "cannot write the promoted marker: {e}; the promote is refused");
            return;
        }
        let why = marker.describe();
        tracing::warn!(group = %self.group, "{why}");
        self.stall(ApplyError::Promoted {
            group: self.group.clone(),
            frame_no: self.applied.frame_no,
            why,
        });
        self.retention.finish_promote(&req);
    }

    /// Publish retention's figures in the status.
    fn retention_status(&mut self) {
        let (points, oldest) = {
            let mut it = self.retention.epochs();
            let first = it.next().map(|(_, p)| p.time_us);
            (self.retention.epochs().count() as u64, first)
        };
        let mut st = self.status.lock();
        st.retention = Some(RetentionStatus {
            enabled: self.retention.policy().enabled,
            bytes: self.retention.bytes(),
            epochs: points,
            oldest_time_us: oldest,
            preserving: self.retention.preserving(),
        });
    }

    fn run(mut self, rx: Receiver<Opened>) {
        let mut reorder: Reorder<Opened> = Reorder::default();
        loop {
            let first = match rx.recv_timeout(POLL_INTERVAL) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.on_idle();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Pins waiting for this thread are answered before it ends
                    // (a run without a relay exists for that).
                    self.on_idle();
                    break;
                }
            };
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
        self.stop_flusher();
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
        // A frame boundary: a recovery point here? (And pins, promotes.)
        if let Ok(f) = &result {
            // A REBASE frame: frames were lost at the relay (for the catalog).
            if f.header.rebase {
                self.retention.set_m_reason(
                    "chain-gap: the relay lost frames it had acknowledged; every disk is compared with the source again",
                );
            }
            // An agent's note says why M data follows (for the catalog).
            if let Some(n) = f.notes().next() {
                self.retention
                    .set_m_reason(&format!("{}: {}", n.reason.as_str(), n.text));
            }
            let pos = self.position();
            let next_is_m = f.header.kind == FrameKind::Merge;
            if let Err(e) = self.boundary_or_pause(&pos, next_is_m) {
                return self.stall(e);
            }
            self.promote_if_asked();
            if self.stalled {
                return;
            }
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

    /// Hand the batch to the flusher, which makes it durable (flush every
    /// touched replica, store the watermark) and then publishes it; nothing is
    /// acknowledged before that. Waits for the previous batch's flush first.
    fn commit(&mut self) -> Result<(), ApplyError> {
        self.wait_flush()?;
        // Point records the catalog will name must be durable first.
        self.retention
            .sync()
            .map_err(|source| ApplyError::Retention {
                group: self.group.clone(),
                frame_no: self.applied.frame_no,
                source: Box::new(source),
            })?;
        let ops = self.retention.take_ops();
        if self.pending.frames == 0 && ops.is_empty() {
            return Ok(());
        }
        if !ops.is_empty() {
            self.retention_status();
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
                consistent: Some(self.applied_consistent),
            },
            consistent: self.applied_consistent,
            pending: std::mem::take(&mut self.pending),
            ops,
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
