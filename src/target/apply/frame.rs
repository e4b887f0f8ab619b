//! How one frame is applied: chain check, validation, before-images, writes,
//! with pauses while the disk is full; and the replay of the redo journal at
//! start.

use super::super::TargetError;
use super::super::gate::ChainPos;
use super::super::redo::RedoFailed;
use super::super::retention::Position;
use super::super::status::Paused;
use super::{Applier, ApplyError, PAUSE_RETRY, REPLAY_CHUNK, open_replica};
use crate::frame::{FrameKind, NoteReason, OpenedFrame, Opener, RecordKind};
use crate::image::{ImageError, OpKind, WriteOp};
use crate::spool::SpoolError;
use crate::util::durable::{io_no_space, no_space_errno};
use crate::util::time::now_us;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

impl Applier {
    /// Apply again, in chain order, the frames of the redo journal after the
    /// durable watermark (a crash left them written partly, or not at all),
    /// and make them durable. Until this returns the session does not start,
    /// so the relay's redelivery of these frames is dropped by the gate as
    /// duplicates.
    pub(super) fn replay(&mut self, opener: Opener) -> Result<(), TargetError> {
        let mut replayed = 0u64;
        // Frames are read and opened (AES-GCM, zstd) on a helper thread a
        // few frames ahead, as a live session's open pool does, so this
        // thread's time goes to the writes.
        let (tx, rx) = crossbeam_channel::bounded(REPLAY_AHEAD);
        let reader = ReplayReader {
            redo: self.redo.clone(),
            after: self.applied.frame_no,
            opener,
            group: self.group.clone(),
            dir: self.redo_dir(),
            ahead: Arc::new(Ahead::default()),
        };
        std::thread::scope(|s| -> Result<(), TargetError> {
            std::thread::Builder::new()
                .name(format!("replay-{}", self.group))
                .spawn_scoped(s, move || reader.run(&tx))
                .map_err(|e| TargetError::Redo {
                    group: self.group.clone(),
                    source: Box::new(SpoolError::Io {
                        op: "start the replay's reader thread for",
                        path: self.redo_dir(),
                        source: e,
                    }),
                })?;
            // Returning early drops `rx`: the reader's next send fails and it ends.
            for item in rx {
                // The charge is given back when `frame` has been applied (or
                // dropped on an early return).
                let (frame, _charge) = item?;
                // No new point during a replay: until the journal's last
                // frame, blocks that later frames wrote before the crash
                // already hold their later content, so a before-image read
                // now for an epoch starting here would not be the point's.
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
            Ok(())
        })?;
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
            .map(|d| d.join(super::super::redo::REDO_DIR))
            .unwrap_or_default()
    }

    /// Apply `f` (see [`Applier::prepare_frame`] and [`Applier::write_frame`]);
    /// a replica write that fails for want of disk space pauses the group and
    /// is retried (the frame's writes, again in order, give the same bytes)
    /// until it succeeds or the target stops.
    pub(super) fn apply_or_pause(&mut self, f: &OpenedFrame) -> Result<(), ApplyError> {
        self.prepare_frame(f)?;
        if self.retention.preserving() {
            self.preserve_frame(f)?;
        }
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
        if !crate::target::gate::Link::of(h).follows(self.applied) {
            return Err(ApplyError::Chain {
                group: self.group.clone(),
                frame_no: h.frame_no,
                prev_frame_no: h.prev_frame_no,
                prev_last_seq: h.prev_last_seq,
                applied_frame_no: self.applied.frame_no,
                applied_last_seq: self.applied.last_seq,
            });
        }
        let Plan { create, grow } = self.plan(f)?;
        self.grow_replicas(f, &grow)?;
        loop {
            match self.log.apply(h) {
                Ok(()) => break,
                Err(source)
                    if io_no_space(&source)
                        && self.pause_wait(&format!(
                            "apply log {}: {source}",
                            self.log.path().display()
                        )) => {}
                Err(source) => {
                    return Err(ApplyError::Log {
                        group: self.group.clone(),
                        frame_no: h.frame_no,
                        path: self.log.path().to_path_buf(),
                        source,
                    });
                }
            }
        }
        let img_err = |group: &str, source| ApplyError::Image {
            group: group.to_string(),
            frame_no: h.frame_no,
            source: Box::new(source),
        };
        for (si, size) in create.iter().enumerate() {
            let Some(size) = *size else { continue };
            let slot = &mut self.slots[si];
            if let Some(dir) = slot.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::util::durable::create_dir_durable(dir).map_err(|source| {
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
                slot.format,
                Some(size),
            )
            .map_err(|e| img_err(&self.group, e))?;
            tracing::info!(group = %self.group, disk = slot.id, path = %slot.path.display(), size = img.size(), "replica opened for a DiskSize record");
            slot.sync = Some(std::sync::Arc::new(
                super::claimed_sync_handle(img.as_ref(), &slot.path)
                    .map_err(|e| img_err(&self.group, e))?,
            ));
            slot.image = Some(img);
        }
        Ok(())
    }

    /// Grow the replicas whose source disk grew (a DiskSize record above the
    /// replica's size), before anything of the frame is logged or written.
    /// Growing is idempotent (a frame applied again after a crash finds the
    /// replica grown) and adds only zeros past the old end. A replica that
    /// cannot grow refuses the frame with [`ApplyError::TooSmall`].
    fn grow_replicas(&mut self, f: &OpenedFrame, grow: &[Option<u64>]) -> Result<(), ApplyError> {
        for (si, size) in grow.iter().enumerate() {
            let Some(disk_size) = *size else { continue };
            let slot = &mut self.slots[si];
            let Some(img) = slot.image.as_mut() else {
                continue;
            };
            let from = img.size();
            match img.grow_to(disk_size) {
                Ok(()) => {
                    tracing::info!(group = %self.group, disk = slot.id, path = %slot.path.display(), from, to = disk_size, "replica grown: the source disk grew");
                }
                Err(ImageError::NotGrowable { .. } | ImageError::FixedCapacity { .. }) => {
                    return Err(ApplyError::TooSmall {
                        group: self.group.clone(),
                        frame_no: f.header.frame_no,
                        disk: slot.id,
                        path: slot.path.clone(),
                        size: from,
                        disk_size,
                    });
                }
                Err(source) => {
                    return Err(ApplyError::Image {
                        group: self.group.clone(),
                        frame_no: f.header.frame_no,
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(())
    }

    /// A recovery point at `pos` before the next frame (M or not)? Pauses
    /// while the retention journal's disk is full.
    pub(super) fn boundary_or_pause(
        &mut self,
        pos: &Position,
        next_is_m: bool,
    ) -> Result<(), ApplyError> {
        loop {
            match self.retention.boundary(pos, next_is_m) {
                Ok(()) => break,
                Err(e) if e.is_no_space() && self.pause_wait(&e.to_string()) => {}
                Err(e) => {
                    return Err(ApplyError::Retention {
                        group: self.group.clone(),
                        frame_no: pos.frame_no,
                        source: Box::new(e),
                    });
                }
            }
        }
        self.resume();
        Ok(())
    }

    /// Save the before-images of what a prepared frame overwrites (when
    /// retention keeps them) and make them durable, before any of its bytes is
    /// written. Pauses while the journal's disk is full.
    fn preserve_frame(&mut self, f: &OpenedFrame) -> Result<(), ApplyError> {
        let h = &f.header;
        let mut ranges: Vec<Vec<(u64, u64)>> = vec![Vec::new(); self.slots.len()];
        for r in &f.records {
            if matches!(r.kind, RecordKind::Write | RecordKind::Zero)
                && let Some(si) = self.slot_of(r.disk)
            {
                ranges[si].push((r.offset, u64::from(r.len)));
            }
        }
        for (si, rs) in ranges.iter().enumerate() {
            if rs.is_empty() {
                continue;
            }
            loop {
                let slot = &mut self.slots[si];
                let Some(img) = slot.image.as_mut() else {
                    break;
                };
                let r = self
                    .retention
                    .preserve(h.frame_no, slot.id, img.as_mut(), rs)
                    .and_then(|()| self.retention.sync());
                match r {
                    Ok(()) => break,
                    Err(e) if e.is_no_space() && self.pause_wait(&e.to_string()) => {}
                    Err(e) => {
                        return Err(ApplyError::Retention {
                            group: self.group.clone(),
                            frame_no: h.frame_no,
                            source: Box::new(e),
                        });
                    }
                }
            }
        }
        self.resume();
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
        if bytes + zero_bytes > 0 {
            self.retention.changed();
        }
        // A frame ending with a tag makes its end a tagged point.
        self.last_tag = f.tag().map(|t| (t.name.to_string(), t.app_consistent()));
    }

    /// Append again a frame whose redo-journal append failed. The first retry
    /// is immediate (the failure may only have been the chain check refusing
    /// a frame whose predecessor's append had failed and has since been
    /// appended again); while the disk is full the group pauses and retries.
    pub(super) fn append_again(
        &mut self,
        frame_no: u64,
        failed: RedoFailed,
    ) -> Result<(), ApplyError> {
        let RedoFailed { mut error, sealed } = failed;
        let mut retried = false;
        loop {
            if retried
                && !(error.is_no_space() && self.pause_wait(&format!("redo journal: {error}")))
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
    /// size to create a missing replica with, and the size to grow an existing
    /// one to (the source disk grew).
    fn plan(&mut self, f: &OpenedFrame) -> Result<Plan, ApplyError> {
        let frame_no = f.header.frame_no;
        let mut create: Vec<Option<u64>> = vec![None; self.slots.len()];
        let mut grow: Vec<Option<u64>> = vec![None; self.slots.len()];
        // Disks this frame says grew (a disk-grown Note, which the agent puts
        // in the frame of the new DiskSize): only their replicas may grow. A
        // DiskSize above the replica's size without it is a replica too small
        // from the start, an operator's mistake, refused.
        let grown: Vec<u16> = f
            .notes()
            .filter(|n| n.reason == NoteReason::DiskGrown)
            .map(|n| n.disk)
            .collect();
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
                                slot.format,
                                None,
                            )
                            .map_err(|source| ApplyError::Image {
                                group: self.group.clone(),
                                frame_no,
                                source: Box::new(source),
                            })?;
                            let sync = super::claimed_sync_handle(img.as_ref(), &slot.path)
                                .map_err(|source| ApplyError::Image {
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
                            if !grown.contains(&r.disk) {
                                return Err(ApplyError::TooSmall {
                                    group: self.group.clone(),
                                    frame_no,
                                    disk: r.disk,
                                    path: slot.path.clone(),
                                    size: img.size(),
                                    disk_size,
                                });
                            }
                            // Grown before any record of the frame is
                            // applied; a replica that cannot grow (a block
                            // device, a VMDK) refuses the frame then.
                            grow[si] = Some(grow[si].map_or(disk_size, |g| g.max(disk_size)));
                        }
                    } else if let Some(c) = create[si] {
                        create[si] = Some(c.max(disk_size));
                    }
                }
                RecordKind::Write | RecordKind::Zero => {
                    let slot = &self.slots[si];
                    let size = match (&slot.image, create[si]) {
                        (Some(img), _) => img.size().max(grow[si].unwrap_or(0)),
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
        Ok(Plan { create, grow })
    }
}

/// What `Applier::plan` found a frame needs before its records apply.
struct Plan {
    /// Per slot: create the missing replica with this size.
    create: Vec<Option<u64>>,
    /// Per slot: grow the open replica to this size.
    grow: Vec<Option<u64>>,
}

/// Frames opened ahead of the replay, at most.
const REPLAY_AHEAD: usize = 4;
/// Plaintext bytes opened ahead of the replay, at most (one frame, whatever
/// its size, may always go when nothing else is ahead).
const REPLAY_AHEAD_BYTES: u64 = 16 << 20;

/// The plaintext bytes opened and not yet applied, shared by the replay's
/// reader (which waits for room) and the apply thread (which frees it).
#[derive(Debug, Default)]
struct Ahead {
    bytes: Mutex<u64>,
    freed: Condvar,
}

impl Ahead {
    /// Wait until `n` more bytes fit (or nothing is ahead), and take them.
    fn take(self: &Arc<Self>, n: u64) -> AheadCharge {
        let mut used = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        while *used > 0 && used.saturating_add(n) > REPLAY_AHEAD_BYTES {
            // Bounded wait: a charge dropped anywhere notifies; the timeout
            // only re-checks.
            used = self
                .freed
                .wait_timeout(used, std::time::Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *used += n;
        AheadCharge {
            ahead: Arc::clone(self),
            n,
        }
    }
}

/// `n` bytes of [`Ahead`], given back when dropped.
#[derive(Debug)]
struct AheadCharge {
    ahead: Arc<Ahead>,
    n: u64,
}

impl Drop for AheadCharge {
    fn drop(&mut self) {
        let mut used = self
            .ahead
            .bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *used = used.saturating_sub(self.n);
        self.ahead.freed.notify_all();
    }
}

/// What the replay's reader sends: a frame opened with its charge, or the
/// error that ends the replay.
type ReplayItem = Result<(OpenedFrame, AheadCharge), TargetError>;

/// Reads the redo journal after the watermark and opens its frames, in chain
/// order, for [`Applier::replay`].
struct ReplayReader {
    redo: super::super::redo::Redo,
    after: u64,
    opener: Opener,
    group: String,
    dir: PathBuf,
    ahead: Arc<Ahead>,
}

impl ReplayReader {
    /// Send every frame after `after`, opened, then end (the channel closes);
    /// the first error is sent and ends it too.
    fn run(mut self, tx: &crossbeam_channel::Sender<ReplayItem>) {
        loop {
            let frames = match self.redo.read_after(self.after, REPLAY_CHUNK) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(TargetError::Redo {
                        group: self.group.clone(),
                        source: Box::new(e),
                    }));
                    return;
                }
            };
            if frames.is_empty() {
                return;
            }
            for f in frames {
                self.after = f.frame_no;
                // Room for its plaintext first, then open it.
                let plain = crate::frame::FrameHeader::parse(&f.bytes)
                    .map_or(0, |h| u64::from(h.plain_len));
                let charge = self.ahead.take(plain);
                let opened = self
                    .opener
                    .open_owned(f.bytes)
                    .map(|o| (o, charge))
                    .map_err(|e| TargetError::Redo {
                        group: self.group.clone(),
                        source: Box::new(SpoolError::Corrupt {
                            file: self.dir.clone(),
                            offset: 0,
                            what: format!("frame {} does not open: {e}", f.frame_no),
                        }),
                    });
                let failed = opened.is_err();
                if tx.send(opened).is_err() || failed {
                    return;
                }
            }
        }
    }
}
