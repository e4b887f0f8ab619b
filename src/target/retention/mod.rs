//! Retention: before-images of overwritten blocks, kept per *epoch* between
//! recovery points, so that any retained point can be rebuilt exactly, while
//! replication goes on (docs/CONSISTENCY.md).
//!
//! The apply thread owns a group's [`Retention`]. Between frames it calls
//! [`Retention::boundary`], which decides whether the current position is a
//! new recovery point (tags, M ranges, the time granularity, pins) and, when
//! before-images are being kept, starts a new epoch there. Before a frame's
//! bytes are written, [`Retention::preserve`] saves the current content of
//! every 4 KiB block the frame is the first in its epoch to overwrite, and
//! [`Retention::sync`] makes those images durable. What the catalog should
//! learn is queued as [`CatalogOp`]s, handed to the flusher with the batch and
//! applied once the batch is durable.
//!
//! Before-images are kept when retention is enabled, while M data is applied
//! after a consistent point (so that point stays recoverable), and while a
//! reader pins a point.

pub mod journal;
pub mod pins;
pub mod policy;
pub mod reader;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::capture::bitmap::RegionBitmap;
use crate::error::{Classify, ErrorKind};
use crate::image::{Image, ImageError};
use journal::{BLOCK, JournalError, Loc, MAX_RECORD_DATA, PointKind, PointRec, RecordHead, Writer};
use pins::{AckFile, Granted, NewPin, PinTable, Want};
use policy::{PointInfo, Policy};

/// Name of a group's retention journal directory, inside its state directory.
pub const RETENTION_DIR: &str = "retention";

/// Errors of retention.
#[derive(Debug, Error)]
pub enum RetentionError {
    /// The journal failed.
    #[error("group {group}: {source}")]
    Journal {
        /// Group.
        group: String,
        /// Why.
        source: JournalError,
    },
    /// Reading a before-image from the replica failed.
    #[error("group {group}: reading a before-image: {source}")]
    Read {
        /// Group.
        group: String,
        /// Why.
        source: Box<ImageError>,
    },
}

impl RetentionError {
    /// True when the file system is full (the apply thread pauses and retries).
    pub fn is_no_space(&self) -> bool {
        match self {
            RetentionError::Journal { source, .. } => source.is_no_space(),
            RetentionError::Read { .. } => false,
        }
    }
}

impl Classify for RetentionError {
    fn kind(&self) -> ErrorKind {
        match self {
            RetentionError::Journal { source, .. } => source.kind(),
            RetentionError::Read { .. } => ErrorKind::Io,
        }
    }
}

/// Most bytes of before-images [`Retention::preserve`] reads and appends at
/// once: a frame that overwrites more is preserved in several batches.
pub const PRESERVE_BATCH_BYTES: usize = 64 << 20;

/// The preserve buffer is given back after a batch larger than this.
const PRESERVE_BUF_KEEP: usize = 16 << 20;

/// The runs of blocks of `ranges` (byte offset, length; rounded out to whole
/// blocks, clamped to the disk's `blocks`) not set in `preserved`: sorted,
/// disjoint, each at most one record ([`MAX_RECORD_DATA`]) long; a block
/// several ranges cover is in one run.
fn unpreserved_runs(
    preserved: &RegionBitmap,
    blocks: u64,
    ranges: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let max_blocks = u64::from(MAX_RECORD_DATA) / BLOCK;
    let mut spans: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|&&(_, len)| len > 0)
        .map(|&(off, len)| {
            (
                off / BLOCK,
                off.saturating_add(len).div_ceil(BLOCK).min(blocks),
            )
        })
        .filter(|&(b0, b1)| b0 < b1)
        .collect();
    spans.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    // Blocks below this are already looked at.
    let mut done = 0u64;
    for (b0, b1) in spans {
        for b in b0.max(done)..b1 {
            if preserved.get(b) {
                continue;
            }
            match runs.last_mut() {
                Some((s, e)) if *e == b && *e - *s < max_blocks => *e += 1,
                _ => runs.push((b, b + 1)),
            }
        }
        done = done.max(b1);
    }
    runs
}

/// A change the catalog must learn once the batch that made it is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogOp {
    /// A new recovery point; `loc` is where its epoch begins in the journal
    /// (`None`: no before-images are kept from it).
    AddPoint {
        /// The point.
        point: PointRec,
        /// Its point record, when it begins an epoch.
        loc: Option<Loc>,
    },
    /// A point no longer recoverable (thinned, trimmed, or superseded).
    DropPoint {
        /// Its frame.
        frame_no: u64,
    },
    /// The replica stops being consistent after `after` (M data follows).
    OpenRange {
        /// The last consistent point before it.
        after: PointRec,
        /// Why (from the agent's note, or what the target knows).
        reason: String,
    },
    /// The replica is consistent again at `at`.
    CloseRange {
        /// The first point after the range.
        at: PointRec,
    },
    /// Something the operator should know (size-cap trims).
    Event {
        /// What happened.
        what: String,
    },
}

/// The applied state at a frame boundary, as the apply thread knows it.
#[derive(Debug, Clone, Default)]
pub struct Position {
    /// Last frame applied (0: none yet).
    pub frame_no: u64,
    /// Its last seq.
    pub last_seq: u64,
    /// Source time of its last record, µs.
    pub time_us: u64,
    /// The last frame was W (or a heartbeat): a crash-consistent state.
    pub consistent: bool,
    /// The last frame ended with a tag: (name, application-consistent).
    pub tag: Option<(String, bool)>,
}

/// The epoch before-images go to now.
#[derive(Debug)]
struct Current {
    epoch: u64,
    start: PointRec,
    preserved: HashMap<u16, RegionBitmap>,
    /// Ranges found preserved at open, for disks whose size is not known yet.
    rebuilt: Vec<(u16, u64, u64)>,
}

/// A group's retention state (owned by its apply thread).
#[derive(Debug)]
pub struct Retention {
    group: String,
    dir: PathBuf,
    writer: Writer,
    policy: Policy,
    /// Points whose epochs are in the journal, oldest first.
    epochs: VecDeque<(Loc, PointRec)>,
    current: Option<Current>,
    next_epoch: u64,
    pins: PinTable,
    last_point: Option<PointRec>,
    changed_since_point: bool,
    in_m: bool,
    m_reason: Option<String>,
    ops: Vec<CatalogOp>,
    buf: Vec<u8>,
    promote: Option<PendingPromote>,
}

/// A promote pin granted but not yet answered: the apply thread stops the
/// group (durably) first, then answers it with [`Retention::finish_promote`].
#[derive(Debug, Clone)]
pub struct PendingPromote {
    /// The pin's id.
    pub id: String,
    /// The reader's process.
    pub pid: u32,
    /// The point granted.
    pub granted: Granted,
}

impl Retention {
    /// Open the group's retention journal (under `group_dir`) with `policy`.
    /// `in_m` says whether the replica is inside an M range (the last frame
    /// applied was M). The newest epoch in the journal stays the current one,
    /// its preserved blocks rebuilt from its records.
    pub fn open(
        group_dir: &Path,
        group: &str,
        policy: Policy,
        in_m: bool,
    ) -> Result<Retention, RetentionError> {
        let dir = group_dir.join(RETENTION_DIR);
        let jerr = |source| RetentionError::Journal {
            group: group.to_string(),
            source,
        };
        let (writer, opened) = Writer::open(&dir, group).map_err(jerr)?;
        for p in &opened.problems {
            tracing::error!(group, "retention journal: {p}");
        }
        if let Some((path, off, n)) = &opened.torn {
            tracing::warn!(group, file = %path.display(), offset = off, bytes = n, "retention journal: torn tail cut");
        }
        let epochs: VecDeque<(Loc, PointRec)> = opened.points.into_iter().collect();
        let next_epoch = epochs.back().map_or(1, |(_, p)| p.epoch + 1);
        let mut current = None;
        if let Some((loc, p)) = epochs.back() {
            let mut rebuilt = Vec::new();
            let mut sc = journal::Scanner::new(&dir, group, *loc);
            while let Some(r) = sc.next_record().map_err(jerr)? {
                if let RecordHead::Image {
                    epoch,
                    disk,
                    offset,
                    len,
                    ..
                } = r.head
                    && epoch == p.epoch
                {
                    rebuilt.push((disk, offset, u64::from(len)));
                }
            }
            current = Some(Current {
                epoch: p.epoch,
                start: p.clone(),
                preserved: HashMap::new(),
                rebuilt,
            });
        }
        let last_point = epochs.back().map(|(_, p)| p.clone());
        Ok(Retention {
            group: group.to_string(),
            dir,
            writer,
            policy,
            epochs,
            current,
            next_epoch,
            pins: PinTable::new(group_dir),
            last_point,
            changed_since_point: false,
            in_m,
            m_reason: None,
            ops: Vec::new(),
            buf: Vec::new(),
            promote: None,
        })
    }

    fn jerr(&self, source: JournalError) -> RetentionError {
        RetentionError::Journal {
            group: self.group.clone(),
            source,
        }
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Points whose before-images are kept, oldest first.
    pub fn epochs(&self) -> impl Iterator<Item = &(Loc, PointRec)> {
        self.epochs.iter()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Journal size in bytes.
    pub fn bytes(&self) -> u64 {
        self.writer.bytes()
    }

    /// True while before-images are being kept.
    pub fn preserving(&self) -> bool {
        self.current.is_some()
    }

    /// A reader asked to promote this group (stop applying for good): the
    /// apply thread must stop, then call [`Retention::finish_promote`].
    pub fn take_promote(&mut self) -> Option<PendingPromote> {
        self.promote.take()
    }

    /// Tell the promoting reader that the group has stopped applying.
    pub fn finish_promote(&mut self, p: &PendingPromote) {
        self.pins.answer(
            &p.id,
            &AckFile {
                granted: Some(p.granted.clone()),
                error: None,
                stopped: true,
            },
        );
    }

    /// Remember why the M range that follows exists (an agent's note).
    pub fn set_m_reason(&mut self, reason: &str) {
        if self.m_reason.is_none() {
            self.m_reason = Some(reason.to_string());
        }
    }

    /// The replica is (not) inside an M range, as found after the replay at
    /// start (the last frame applied was M).
    pub fn set_in_m(&mut self, in_m: bool) {
        self.in_m = in_m;
    }

    /// Records were applied (the replica changed since the last point).
    pub fn changed(&mut self) {
        self.changed_since_point = true;
    }

    /// Queued catalog changes, to be applied once the batch is durable.
    pub fn take_ops(&mut self) -> Vec<CatalogOp> {
        std::mem::take(&mut self.ops)
    }

    /// Decide, between frames, whether `at` is a new recovery point, given
    /// that the next frame is M (`next_is_m`) or not. Also answers pins.
    pub fn boundary(&mut self, at: &Position, next_is_m: bool) -> Result<(), RetentionError> {
        if at.frame_no > 0 && at.consistent {
            if next_is_m && !self.in_m {
                // An M range starts: its last consistent point must stay
                // recoverable, so before-images are kept from here.
                self.make_point(at, PointKind::Crash, None, true)?;
                self.in_m = true;
                let reason = self
                    .m_reason
                    .take()
                    .unwrap_or_else(|| "M frames (data not in write order)".into());
                if let Some(p) = self.last_point.clone() {
                    self.ops.push(CatalogOp::OpenRange { after: p, reason });
                }
            } else if self.in_m {
                // The first W frame after M: consistent again.
                self.in_m = false;
                let keep = self.policy.enabled || self.pins.any();
                self.make_point(at, PointKind::Crash, None, keep)?;
                if let Some(p) = self.last_point.clone() {
                    self.ops.push(CatalogOp::CloseRange { at: p });
                }
            } else if let Some((name, app)) = &at.tag {
                let kind = if *app { PointKind::App } else { PointKind::Tag };
                let name = name.clone();
                let keep = self.policy.enabled || self.pins.any();
                self.make_point(at, kind, Some(name), keep)?;
            } else if self.changed_since_point
                && self.last_point.as_ref().is_none_or(|p| {
                    at.time_us.saturating_sub(p.time_us) >= self.policy.granularity_us
                })
            {
                let keep = self.policy.enabled || self.pins.any();
                self.make_point(at, PointKind::Crash, None, keep)?;
            }
        } else if at.frame_no == 0 && next_is_m && !self.in_m {
            // The initial copy onto an empty replica: nothing before it to
            // keep, but the range is listed.
            self.in_m = true;
            let reason = self
                .m_reason
                .take()
                .unwrap_or_else(|| "initial copy (nothing applied before it)".into());
            self.ops.push(CatalogOp::OpenRange {
                after: PointRec {
                    epoch: 0,
                    frame_no: 0,
                    last_seq: 0,
                    time_us: 0,
                    kind: PointKind::Crash,
                    tag: None,
                },
                reason,
            });
        }
        if self.pins.due() {
            self.answer_pins(at)?;
        }
        Ok(())
    }

    /// Look at the pins now (the apply thread is idle).
    pub fn idle(&mut self, at: &Position) -> Result<(), RetentionError> {
        if self.in_m && at.frame_no > 0 && at.consistent {
            // The W frame after M data (often the agent's heartbeat when a
            // drain ends with no write after it) is applied and nothing
            // follows yet: the replica is consistent again now, not only
            // when the next frame comes.
            return self.boundary(at, false);
        }
        if self.pins.due() {
            self.answer_pins(at)?;
        }
        Ok(())
    }

    fn answer_pins(&mut self, at: &Position) -> Result<(), RetentionError> {
        let new: Vec<NewPin> = self.pins.poll();
        for p in new {
            let ack = self.grant(&p, at)?;
            match (&ack.granted, p.file.promote) {
                (Some(g), true) => {
                    // Answered once the group has stopped applying.
                    self.promote = Some(PendingPromote {
                        id: p.id.clone(),
                        pid: p.file.pid,
                        granted: g.clone(),
                    });
                }
                _ => self.pins.answer(&p.id, &ack),
            }
        }
        Ok(())
    }

    fn grant(&mut self, p: &NewPin, at: &Position) -> Result<AckFile, RetentionError> {
        let refuse = |why: String| AckFile {
            granted: None,
            error: Some(why),
            stopped: false,
        };
        let granted = |loc: Loc, pt: &PointRec| Granted {
            epoch: pt.epoch,
            seg: loc.seg,
            pos: loc.pos,
            frame_no: pt.frame_no,
            last_seq: pt.last_seq,
            time_us: pt.time_us,
        };
        match &p.file.want {
            Want::Epoch { epoch } => {
                Ok(match self.epochs.iter().find(|(_, e)| e.epoch == *epoch) {
                    Some((loc, pt)) => AckFile {
                        granted: Some(granted(*loc, pt)),
                        error: None,
                        stopped: false,
                    },
                    None => refuse(format!(
                        "the point of epoch {epoch} is no longer retained by group {}",
                        self.group
                    )),
                })
            }
            Want::Latest | Want::At { .. } => {
                if let Want::At { frame_no, .. } = p.file.want
                    && frame_no != at.frame_no
                {
                    return Ok(refuse(format!(
                        "the replica of group {} is at frame {}, not frame {frame_no}",
                        self.group, at.frame_no
                    )));
                }
                if at.frame_no == 0 {
                    return Ok(refuse(format!(
                        "group {} has applied nothing yet: no recovery point",
                        self.group
                    )));
                }
                if !at.consistent || self.in_m {
                    // Inside an M range: the newest consistent point is the one
                    // before it, whose epoch is current.
                    return Ok(match self.epochs.back() {
                        Some((loc, pt)) if self.current.is_some() => AckFile {
                            granted: Some(granted(*loc, pt)),
                            error: None,
                            stopped: false,
                        },
                        _ => refuse(format!(
                            "group {} is applying M data (initial copy or resync) and has no consistent point before it",
                            self.group
                        )),
                    });
                }
                let up_to_date = self
                    .epochs
                    .back()
                    .is_some_and(|(_, pt)| pt.frame_no == at.frame_no)
                    && self.current.is_some();
                if !up_to_date {
                    let kind = self
                        .last_point
                        .as_ref()
                        .filter(|lp| lp.frame_no == at.frame_no)
                        .map_or(PointKind::Crash, |lp| lp.kind);
                    let tag = self
                        .last_point
                        .as_ref()
                        .filter(|lp| lp.frame_no == at.frame_no)
                        .and_then(|lp| lp.tag.clone());
                    self.make_point(at, kind, tag, true)?;
                }
                Ok(match self.epochs.back() {
                    Some((loc, pt)) => AckFile {
                        granted: Some(granted(*loc, pt)),
                        error: None,
                        stopped: false,
                    },
                    None => refuse(format!("group {}: no point could be made", self.group)),
                })
            }
        }
    }

    /// Make `at` a recovery point; with `epoch`, before-images are kept from
    /// it on (a new epoch begins), else the current epoch ends.
    fn make_point(
        &mut self,
        at: &Position,
        kind: PointKind,
        tag: Option<String>,
        epoch: bool,
    ) -> Result<(), RetentionError> {
        let mut p = PointRec {
            epoch: 0,
            frame_no: at.frame_no,
            last_seq: at.last_seq,
            time_us: at.time_us,
            kind,
            tag,
        };
        // The same position again (a pin right after a point): no new point,
        // but the epoch may start.
        let same = self
            .last_point
            .as_ref()
            .is_some_and(|lp| lp.frame_no == at.frame_no);
        let mut loc = None;
        if epoch {
            let already = self
                .epochs
                .back()
                .is_some_and(|(_, e)| e.frame_no == at.frame_no)
                && self.current.is_some();
            if !already {
                p.epoch = self.next_epoch;
                let l = self.writer.append_point(&p).map_err(|e| self.jerr(e))?;
                self.next_epoch += 1;
                self.epochs.push_back((l, p.clone()));
                self.current = Some(Current {
                    epoch: p.epoch,
                    start: p.clone(),
                    preserved: HashMap::new(),
                    rebuilt: Vec::new(),
                });
                loc = Some(l);
            } else if let Some((_, e)) = self.epochs.back() {
                p = e.clone();
            }
        } else {
            self.current = None;
        }
        self.changed_since_point = false;
        if !same || loc.is_some() {
            self.ops.push(CatalogOp::AddPoint {
                point: p.clone(),
                loc,
            });
        }
        self.last_point = Some(p);
        self.apply_policy()
    }

    /// Drop the points the policy and the size cap no longer keep, and the
    /// journal segments nothing needs any more.
    fn apply_policy(&mut self) -> Result<(), RetentionError> {
        let pinned = self.pins.oldest_needed();
        let keep_all_epochs = self.in_m || self.pins.any();
        if !self.policy.enabled && !keep_all_epochs && self.current.is_none() {
            // Nothing needs before-images: empty the journal.
            if !self.epochs.is_empty() {
                for (_, p) in self.epochs.drain(..) {
                    if Some(p.frame_no) != self.last_point.as_ref().map(|l| l.frame_no) {
                        self.ops.push(CatalogOp::DropPoint {
                            frame_no: p.frame_no,
                        });
                    }
                }
                self.writer.reset().map_err(|e| self.jerr(e))?;
            }
            return Ok(());
        }
        let infos: Vec<PointInfo> = self
            .epochs
            .iter()
            .map(|(_, p)| PointInfo {
                frame_no: p.frame_no,
                time_us: p.time_us,
                kind: p.kind,
            })
            .collect();
        let mut drop = if self.in_m {
            // The point before an M range, and everything after it, stays.
            Vec::new()
        } else {
            policy::to_drop(&infos, &self.policy)
        };
        // Pinned epochs stay.
        if let Some(e) = pinned {
            drop.retain(|f| {
                self.epochs
                    .iter()
                    .find(|(_, p)| p.frame_no == *f)
                    .is_none_or(|(_, p)| p.epoch < e)
            });
        }
        for f in &drop {
            self.epochs.retain(|(_, p)| p.frame_no != *f);
            self.ops.push(CatalogOp::DropPoint { frame_no: *f });
        }
        // The size cap: the oldest points go first (never the newest, never a
        // pinned one, never the one before an open M range).
        if self.policy.max_bytes > 0 && self.writer.bytes() > self.policy.max_bytes {
            let mut dropped = 0;
            let mut through = 0;
            while self.epochs.len() > 1
                && !self.in_m
                && self.writer.bytes() > self.policy.max_bytes
                && pinned.is_none_or(|e| self.epochs[0].1.epoch < e)
            {
                let Some((_, p)) = self.epochs.pop_front() else {
                    break;
                };
                through = p.time_us;
                dropped += 1;
                self.ops.push(CatalogOp::DropPoint {
                    frame_no: p.frame_no,
                });
                let first_seg = self.epochs[0].0.seg;
                self.writer
                    .trim_before(first_seg)
                    .map_err(|e| self.jerr(e))?;
            }
            if dropped > 0 {
                let what = format!(
                    "retention size cap {} bytes: dropped the {dropped} oldest recovery point(s), through source time {through} µs; journal now {} bytes",
                    self.policy.max_bytes,
                    self.writer.bytes()
                );
                tracing::warn!(group = %self.group, "{what}");
                self.ops.push(CatalogOp::Event { what });
            }
        }
        // Segments before the oldest retained point (and before any pinned
        // epoch's point) are no longer needed.
        let mut keep_from = self.epochs.front().map(|(l, _)| l.seg);
        if let Some(e) = pinned
            && let Some((l, _)) = self.epochs.iter().find(|(_, p)| p.epoch >= e)
        {
            keep_from = Some(keep_from.map_or(l.seg, |k| k.min(l.seg)));
        }
        if let Some(seg) = keep_from {
            self.writer.trim_before(seg).map_err(|e| self.jerr(e))?;
        }
        Ok(())
    }

    /// Save, before frame `frame_no` overwrites them, the current content of
    /// the blocks of `ranges` (offset, length) on `disk` that are not yet
    /// preserved in the current epoch. Frames at or before the epoch's start
    /// (replayed after a crash) are part of the point and are not preserved.
    ///
    /// Two passes: first every unpreserved run of blocks the frame overwrites
    /// (sorted, each at most one record long), then their content is read with
    /// one [`Image::read_batch`] and appended with one vectored write per
    /// [`PRESERVE_BATCH_BYTES`] (and per journal segment). Blocks are marked
    /// preserved only once their record is appended.
    pub fn preserve(
        &mut self,
        frame_no: u64,
        disk: u16,
        img: &mut dyn Image,
        ranges: &[(u64, u64)],
    ) -> Result<(), RetentionError> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(());
        };
        if frame_no <= cur.start.frame_no {
            return Ok(());
        }
        let size = img.size();
        let blocks = size.div_ceil(BLOCK);
        let epoch = cur.epoch;
        if !cur.preserved.contains_key(&disk) {
            let mut bm = RegionBitmap::new(blocks);
            for (_, off, len) in cur.rebuilt.iter().filter(|(d, ..)| *d == disk) {
                bm.set_range(off / BLOCK, (off + len).div_ceil(BLOCK));
            }
            cur.rebuilt.retain(|(d, ..)| *d != disk);
            cur.preserved.insert(disk, bm);
        }
        let Some(bm) = cur.preserved.get_mut(&disk) else {
            return Ok(());
        };
        if bm.len() < blocks {
            // The replica grew during the epoch (its source disk grew).
            bm.grow(blocks);
        }
        let bm = &*bm;
        let runs = unpreserved_runs(bm, blocks, ranges);
        if runs.is_empty() {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.buf);
        let res = self.preserve_runs(epoch, disk, img, size, &runs, &mut buf);
        if buf.len() > PRESERVE_BUF_KEEP {
            buf = Vec::new();
        }
        self.buf = buf;
        res
    }

    /// Read and append the before-images of `runs` (block ranges, sorted and
    /// disjoint, none preserved yet) of `disk` in batches of at most
    /// [`PRESERVE_BATCH_BYTES`], marking each run once its record is appended.
    fn preserve_runs(
        &mut self,
        epoch: u64,
        disk: u16,
        img: &mut dyn Image,
        size: u64,
        runs: &[(u64, u64)],
        buf: &mut Vec<u8>,
    ) -> Result<(), RetentionError> {
        // A run's bytes (the last block of a disk may be short).
        let span = |&(b, e): &(u64, u64)| (b * BLOCK, (e * BLOCK).min(size));
        let mut i = 0;
        while i < runs.len() {
            // Runs i..j: at most PRESERVE_BATCH_BYTES, at least one run.
            let mut j = i;
            let mut bytes = 0usize;
            while let Some(r) = runs.get(j) {
                let (s, e) = span(r);
                let n = (e - s) as usize;
                if j > i && bytes + n > PRESERVE_BATCH_BYTES {
                    break;
                }
                bytes += n;
                j += 1;
            }
            if buf.len() < bytes {
                buf.resize(bytes, 0);
            }
            let mut reads: Vec<(u64, &mut [u8])> = Vec::with_capacity(j - i);
            let mut rest: &mut [u8] = &mut buf[..bytes];
            for r in &runs[i..j] {
                let (s, e) = span(r);
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut((e - s) as usize);
                rest = tail;
                reads.push((s, piece));
            }
            img.read_batch(&mut reads)
                .map_err(|source| RetentionError::Read {
                    group: self.group.clone(),
                    source: Box::new(source),
                })?;
            let images: Vec<(u64, &[u8])> = reads.into_iter().map(|(s, d)| (s, &*d)).collect();
            let mut k = 0;
            while k < images.len() {
                let n = match self.writer.append_images(epoch, disk, &images[k..]) {
                    Ok(n) => n,
                    Err(source) => {
                        return Err(RetentionError::Journal {
                            group: self.group.clone(),
                            source,
                        });
                    }
                };
                if let Some(cur) = self.current.as_mut()
                    && let Some(bm) = cur.preserved.get_mut(&disk)
                {
                    for &(b, e) in &runs[i + k..i + k + n] {
                        bm.set_range(b, e);
                    }
                }
                k += n;
            }
            i = j;
        }
        Ok(())
    }

    /// Make the before-images appended so far durable (before the frames they
    /// protect are written).
    pub fn sync(&mut self) -> Result<(), RetentionError> {
        self.writer.sync().map_err(|e| self.jerr(e))
    }
}

#[cfg(test)]
mod tests;
