//! The capture journal of one consistency group: every captured change in seq
//! order until the relay acknowledges it, within a memory budget and a spill
//! budget, plus the dirty regions of each disk.
//!
//! Every entry gets the group's next seq under one lock, so seq order is the order
//! in which changes were recorded. The batcher reads entries without removing them
//! ([`CaptureJournal::take_batch`]); the relay's durable ack removes them
//! ([`CaptureJournal::trim_through`]). Where a change goes is decided by
//! [`super::modes`]: memory, then spill files, then only its region in the dirty
//! bitmap, so a live write never waits (unless the group's policy is
//! [`Policy::Block`]).
//!
//! Per disk the journal keeps three region bitmaps: *pending* (regions whose
//! content must be copied again from the backing disk, as M data) and two
//! generations of *unacknowledged* regions (touched by entries the relay has not
//! acknowledged). Their union is what the persisted dirty log must cover; the
//! generations rotate on acks, so a region leaves the union once every entry that
//! touched it is acknowledged.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::bitmap::{Granularity, RegionBitmap};
use super::modes::{self, Budgets, LinkView, Mode, ModeState, Placement, Tick};
use super::spill::{self, Spill, SpillMeta, SpillPos};
use crate::error::{Classify, ErrorKind};
use crate::frame::NoteReason;
use crate::util::time::now_us;

/// Per-entry bookkeeping charged against the memory budget besides the data.
pub const ENTRY_OVERHEAD: usize = 96;

/// Whether replaying the entry in seq order reproduces every intermediate source
/// state (W: a live write in data or spill mode) or not (M: data read from the
/// disk later, and writes captured while dirty regions are being copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Write-ordered.
    W,
    /// Not write-ordered.
    M,
}

/// What a journal entry changes.
#[derive(Debug, Clone)]
pub enum Change {
    /// Bytes written at the offset.
    Write(Arc<Vec<u8>>),
    /// A range that reads as zeros afterwards.
    Zero(u64),
    /// The disk's size is announced (offset unused).
    DiskSize(u64),
    /// A tag: the end of the frame it closes is a named recovery point
    /// (disk 0, offset unused). Recorded only in a write-ordered mode.
    Tag {
        /// The tag's name (checked against the tag naming rules).
        name: Arc<str>,
        /// Tag flags ([`crate::frame::TAG_APP_CONSISTENT`]).
        flags: u64,
    },
    /// A note: why the M entries that follow are not consistent, for the
    /// entry's disk (offset unused). Recorded when dirty regions start being
    /// copied.
    Note {
        /// The reason code.
        reason: NoteReason,
        /// Free text, at most [`crate::frame::NOTE_TEXT_MAX`] bytes.
        text: Arc<str>,
    },
}

impl Change {
    /// Bytes this change carries in a frame's data area.
    pub fn payload_len(&self) -> usize {
        match self {
            Change::Write(d) => d.len(),
            Change::Tag { name, .. } => name.len(),
            Change::Note { text, .. } => text.len(),
            Change::Zero(_) | Change::DiskSize(_) => 0,
        }
    }
}

/// One captured change, as the batcher gets it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Sequence number in the group.
    pub seq: u64,
    /// Disk id within the group.
    pub disk: u16,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Capture time, µs since the Unix epoch.
    pub time_us: u64,
    /// W or M.
    pub ordering: Ordering,
    /// The change itself.
    pub change: Change,
}

impl Entry {
    /// Bytes of payload this entry adds to a frame.
    pub fn payload_len(&self) -> usize {
        self.change.payload_len()
    }
}

/// What happens to live writes when the memory budget is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Degrade: spill, then keep dirty regions only. The workload never waits.
    #[default]
    Degrade,
    /// Wait for the relay to acknowledge (the workload slows down to the link's
    /// pace). The bench uses it to measure the pipeline itself.
    Block,
}

/// How a group's journal is set up.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Group name (for logs).
    pub group: String,
    /// Memory budget in bytes (entries' metadata and in-memory data).
    pub memory_budget: usize,
    /// Directory for spill files (`None`: no spill).
    pub spill_dir: Option<PathBuf>,
    /// Spill budget in bytes (0: no spill).
    pub spill_budget: u64,
    /// After the relay has been unreachable this long, unsent writes are dropped
    /// to the dirty bitmap (zero: never).
    pub bitmap_after: Duration,
    /// Full-budget policy.
    pub policy: Policy,
}

/// Errors of the capture journal.
#[derive(Debug, Error)]
pub enum CaptureError {
    /// The journal was closed (agent shutting down): the change is not recorded.
    #[error("capture journal is closed")]
    Closed,
    /// Persisting the seq reservation failed: the change is not recorded.
    #[error("cannot persist the seq reservation: {0}")]
    Reserve(std::io::Error),
    /// A zero-length write or range.
    #[error("empty change at disk {disk} offset {offset}")]
    Empty {
        /// Disk id.
        disk: u16,
        /// Offset.
        offset: u64,
    },
    /// The disk id is not registered with this journal.
    #[error("disk {0} is not part of this group")]
    UnknownDisk(u16),
    /// The spill directory could not be set up.
    #[error("spill directory {path}: {source}")]
    Spill {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A tag was asked for while the group is not write-ordered (bitmap or
    /// drain mode): the replica at that seq would not equal the source.
    #[error(
        "group {group} is in {mode} mode since {since} (reason: {reason}): a tag now could not \
         be a consistent point",
        since = crate::util::time::format_us(*since_us)
    )]
    NotConsistent {
        /// The group.
        group: String,
        /// The capture mode.
        mode: &'static str,
        /// Since when, µs since the Unix epoch.
        since_us: u64,
        /// Why the group is in that mode.
        reason: String,
    },
    /// A tag name or flags break the tag rules.
    #[error("invalid tag {name:?}: {detail}")]
    InvalidTag {
        /// The name asked for.
        name: String,
        /// What is wrong.
        detail: String,
    },
}

impl Classify for CaptureError {
    fn kind(&self) -> ErrorKind {
        match self {
            CaptureError::Closed => ErrorKind::Shutdown,
            CaptureError::Reserve(_) | CaptureError::Spill { .. } => ErrorKind::Io,
            CaptureError::Empty { .. }
            | CaptureError::UnknownDisk(_)
            | CaptureError::InvalidTag { .. } => ErrorKind::Corrupt,
            // Not now: once the group is write-ordered again a tag succeeds.
            CaptureError::NotConsistent { .. } => ErrorKind::Throttled,
        }
    }
}

/// Persists a seq reservation: called with the first seq that is not yet covered;
/// returns the new exclusive upper bound that is now durably reserved.
pub type Reserver = Box<dyn FnMut(u64) -> std::io::Result<u64> + Send>;

/// The outcome of recording a live change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded with its bytes under this seq.
    Seq(u64),
    /// Not kept with its bytes: its region is marked dirty (bitmap or budgets full).
    Dirty,
}

/// A part of a copied region (drain): data or zeros at a disk offset.
#[derive(Debug)]
pub enum CopyPart {
    /// Bytes read from the backing disk.
    Data(u64, Vec<u8>),
    /// A range found to be all zeros.
    Zero(u64, u64),
}

enum Held {
    Change(Change),
    Spilled(SpillPos, u32),
}

struct Slot {
    seq: u64,
    disk: u16,
    offset: u64,
    time_us: u64,
    ordering: Ordering,
    held: Held,
}

impl Slot {
    fn data_len(&self) -> usize {
        match &self.held {
            Held::Change(c) => c.payload_len(),
            Held::Spilled(_, l) => *l as usize,
        }
    }

    fn mem_charge(&self) -> usize {
        match &self.held {
            Held::Change(c) => c.payload_len() + ENTRY_OVERHEAD,
            Held::Spilled(..) => ENTRY_OVERHEAD,
        }
    }

    fn is_tag(&self) -> bool {
        matches!(self.held, Held::Change(Change::Tag { .. }))
    }

    /// The disk range the change covers (None for a size announcement).
    fn range(&self) -> Option<(u64, u64)> {
        match &self.held {
            Held::Change(Change::Write(d)) => Some((self.offset, d.len() as u64)),
            Held::Change(Change::Zero(l)) => Some((self.offset, *l)),
            Held::Change(Change::DiskSize(_) | Change::Tag { .. } | Change::Note { .. }) => None,
            Held::Spilled(_, l) => Some((self.offset, u64::from(*l))),
        }
    }
}

struct DiskDirty {
    id: u16,
    size: u64,
    gran: Granularity,
    pending: RegionBitmap,
    cur: RegionBitmap,
    prev: RegionBitmap,
    copied_bytes: u64,
    /// Why the pending regions became pending (the first cause since they
    /// were last empty): the reason of the Note recorded when they start
    /// being copied.
    cause: Option<(NoteReason, String)>,
    /// A growth the target has not been told of: its size before, and the
    /// seq of the DiskSize that announces it once recorded. Cleared when the
    /// relay acknowledges that seq.
    growth: Option<(u64, Option<u64>)>,
    /// The size before the growth found at start (this run), to announce it
    /// again after a chain gap (the announcement may be among the lost frames).
    grew_from: Option<u64>,
}

impl DiskDirty {
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        self.gran.span(offset, len)
    }

    fn bytes_of(&self, regions: u64) -> u64 {
        (regions << self.gran.shift).min(self.size)
    }
}

/// The threads waiting in `take_batch` (one batcher per group in practice).
#[derive(Debug, Default)]
struct BatchWaiters {
    /// Waiting for a first unbatched entry.
    first: u32,
    /// Lingering until `linger_bytes` are pending (or their linger ends).
    linger: u32,
    /// The smallest byte target among the lingering waiters.
    linger_bytes: usize,
}

struct Inner {
    slots: VecDeque<Slot>,
    /// Index in `slots` of the first entry not yet handed to the batcher.
    unbatched: usize,
    unbatched_bytes: usize,
    /// Tags among the entries not yet handed to the batcher.
    unbatched_tags: usize,
    /// Who waits in `take_batch` and for what (see [`CaptureJournal::pushed`]).
    waiters: BatchWaiters,
    mem: usize,
    spill: Option<Spill>,
    next_seq: u64,
    reserved_until: u64,
    closed: bool,
    recorded: u64,
    recorded_bytes: u64,
    dirty_marks: u64,
    dropped: u64,
    dropped_tags: u64,
    tags: u64,
    block_waits: u64,
    mode: ModeState,
    link_up: bool,
    link_changed: Instant,
    disks: Vec<DiskDirty>,
    rot_seq: u64,
}

impl Inner {
    fn disk(&mut self, id: u16) -> Result<&mut DiskDirty, CaptureError> {
        self.disks
            .iter_mut()
            .find(|d| d.id == id)
            .ok_or(CaptureError::UnknownDisk(id))
    }

    fn budgets(&self, cfg: &CaptureConfig) -> Budgets {
        Budgets {
            mem_used: self.mem,
            mem_budget: cfg.memory_budget,
            spill_used: self.spill.as_ref().map_or(0, Spill::bytes),
            spill_budget: if self.spill.is_some() {
                cfg.spill_budget
            } else {
                0
            },
            entries: self.slots.len(),
        }
    }

    fn pending_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.bytes_of(d.pending.count()))
            .sum()
    }

    fn change_mode(&mut self, group: &str, to: Mode, reason: String) {
        let from = self.mode.mode;
        if self.mode.change(to, reason.clone(), now_us()) {
            if to == Mode::Data {
                tracing::info!(
                    group,
                    from = from.as_str(),
                    to = to.as_str(),
                    "capture mode: {reason}"
                );
            } else {
                tracing::warn!(
                    group,
                    from = from.as_str(),
                    to = to.as_str(),
                    "capture mode: {reason}"
                );
            }
        }
    }

    /// Mark a range pending; a write-ordered mode can no longer make recovery
    /// points, so it becomes bitmap.
    fn mark_pending(
        &mut self,
        group: &str,
        disk: u16,
        (offset, len): (u64, u64),
        cause: NoteReason,
        why: &str,
    ) {
        if let Ok(d) = self.disk(disk) {
            let (a, b) = d.span(offset, len);
            d.pending.set_range(a, b);
            d.cause.get_or_insert_with(|| (cause, why.to_string()));
        }
        if self.mode.mode.write_ordered() {
            self.change_mode(group, Mode::Bitmap, why.to_string());
        }
    }

    fn mark_unacked(&mut self, disk: u16, offset: u64, len: u64) {
        if let Ok(d) = self.disk(disk) {
            let (a, b) = d.span(offset, len);
            d.cur.set_range(a, b);
        }
    }

    fn assign_seq(&mut self, reserver: &Mutex<Reserver>) -> Result<u64, CaptureError> {
        if self.next_seq >= self.reserved_until {
            let from = self.next_seq;
            let mut r = reserver.lock().unwrap_or_else(|p| p.into_inner());
            self.reserved_until = (r)(from).map_err(CaptureError::Reserve)?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Whether an entry just pushed can end a `take_batch` wait: a waiter for
    /// a first entry, or a lingering one whose byte target is now met or that
    /// must send a tag at once.
    fn batcher_should_wake(&self) -> bool {
        let w = &self.waiters;
        w.first > 0
            || (w.linger > 0 && (self.unbatched_bytes >= w.linger_bytes || self.unbatched_tags > 0))
    }

    fn push(&mut self, slot: Slot) {
        self.mem += slot.mem_charge();
        self.unbatched_bytes += slot.data_len();
        self.unbatched_tags += usize::from(slot.is_tag());
        self.recorded += 1;
        self.recorded_bytes += slot.data_len() as u64;
        self.slots.push_back(slot);
    }

    fn release(&mut self, slot: &Slot) {
        self.mem -= slot.mem_charge();
        if let (Held::Spilled(pos, len), Some(sp)) = (&slot.held, self.spill.as_mut()) {
            sp.release(pos, *len);
        }
    }

    /// Remove every entry not yet handed to the batcher, marking its region
    /// pending (for `why`). Size announcements and notes stay, as M entries
    /// (the frames that follow cannot be recovery points); tags are dropped
    /// (the point they name can no longer be reproduced). Returns how many
    /// entries were dropped.
    fn drop_unbatched(&mut self, group: &str, why: &str) -> u64 {
        let tail: Vec<Slot> = self.slots.drain(self.unbatched..).collect();
        let mut dropped = 0;
        for mut s in tail {
            if let Held::Change(Change::Tag { name, .. }) = &s.held {
                tracing::warn!(
                    group,
                    seq = s.seq,
                    tag = %name,
                    "tag dropped before it was sent: capture left write-ordered mode ({why})"
                );
                self.release(&s);
                self.dropped_tags += 1;
                continue;
            }
            match s.range() {
                None => {
                    s.ordering = Ordering::M;
                    self.slots.push_back(s);
                }
                Some((o, l)) => {
                    if let Ok(d) = self.disk(s.disk) {
                        let (a, b) = d.span(o, l);
                        d.pending.set_range(a, b);
                        d.cause
                            .get_or_insert_with(|| (NoteReason::BitmapCatchUp, why.to_string()));
                    }
                    self.release(&s);
                    dropped += 1;
                }
            }
        }
        self.recount_unbatched();
        self.dropped += dropped;
        dropped
    }

    /// Recompute the unbatched bytes and tags from the slots.
    fn recount_unbatched(&mut self) {
        let tail = self.slots.iter().skip(self.unbatched);
        (self.unbatched_bytes, self.unbatched_tags) = tail.fold((0, 0), |(b, t), s| {
            (b + s.data_len(), t + usize::from(s.is_tag()))
        });
    }

    /// Entries from `seq` on that were handed to the batcher are taken back
    /// (they were not returned to it).
    fn untake_from(&mut self, seq: u64) {
        if let Some(i) = self.slots.iter().position(|s| s.seq >= seq)
            && i < self.unbatched
        {
            self.unbatched = i;
        }
        self.recount_unbatched();
    }
}

/// Capture counters of one disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskCaptureStats {
    /// Disk id.
    pub id: u16,
    /// Region size in bytes.
    pub granularity: u64,
    /// Bytes of dirty regions waiting to be copied (bitmap).
    pub pending_bytes: u64,
    /// Bytes of regions touched by entries not yet acknowledged (upper bound).
    pub unacked_bytes: u64,
    /// Bytes copied from the backing disk since start (initial copy, drains).
    pub copied_bytes: u64,
}

/// Counters and gauges of the journal, for status and the bench.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalStats {
    /// Entries held (not yet acknowledged by the relay).
    pub entries: usize,
    /// Bytes charged against the memory budget.
    pub bytes: usize,
    /// The memory budget.
    pub budget: usize,
    /// Bytes in spill files.
    pub spill_bytes: u64,
    /// Entries whose bytes are in spill files.
    pub spill_entries: u64,
    /// The spill budget.
    pub spill_budget: u64,
    /// Bytes of dirty regions waiting to be copied, all disks.
    pub pending_bytes: u64,
    /// Next seq to assign.
    pub next_seq: u64,
    /// Entries recorded since start.
    pub recorded: u64,
    /// Payload bytes recorded since start.
    pub recorded_bytes: u64,
    /// Live writes kept as dirty regions instead of entries.
    pub dirty_marks: u64,
    /// Unsent entries dropped to the dirty bitmap.
    pub dropped_entries: u64,
    /// Tags recorded since start.
    #[serde(default)]
    pub tags: u64,
    /// Tags dropped before they were sent (capture left write-ordered mode).
    #[serde(default)]
    pub dropped_tags: u64,
    /// Records that waited for budget (policy `block`).
    pub budget_waits: u64,
    /// The full-budget policy.
    pub policy: Policy,
    /// Capture mode, since when, why, and every transition counted.
    pub mode: ModeState,
    /// Per disk.
    pub disks: Vec<DiskCaptureStats>,
}

/// The capture journal of one consistency group.
pub struct CaptureJournal {
    cfg: CaptureConfig,
    inner: Mutex<Inner>,
    /// Signalled when entries are trimmed (budget freed) or on close.
    space: Condvar,
    /// Signalled when entries are recorded or on close.
    avail: Condvar,
    reserver: Mutex<Reserver>,
}

impl CaptureJournal {
    /// A journal assigning seqs from `next_seq`; `reserver` is asked to durably
    /// reserve more seqs whenever `next_seq` reaches the reserved bound. Spill
    /// files left by an earlier run are deleted.
    pub fn new(
        cfg: CaptureConfig,
        next_seq: u64,
        reserver: Reserver,
    ) -> Result<Self, CaptureError> {
        let spill = match (&cfg.spill_dir, cfg.spill_budget) {
            (Some(dir), b) if b > 0 => {
                Some(Spill::open(dir).map_err(|source| CaptureError::Spill {
                    path: dir.clone(),
                    source,
                })?)
            }
            _ => None,
        };
        Ok(CaptureJournal {
            inner: Mutex::new(Inner {
                slots: VecDeque::new(),
                unbatched: 0,
                unbatched_bytes: 0,
                unbatched_tags: 0,
                waiters: BatchWaiters::default(),
                mem: 0,
                spill,
                next_seq,
                reserved_until: next_seq,
                closed: false,
                recorded: 0,
                recorded_bytes: 0,
                dirty_marks: 0,
                dropped: 0,
                dropped_tags: 0,
                tags: 0,
                block_waits: 0,
                mode: ModeState::new(Mode::Data, "started", now_us()),
                link_up: false,
                link_changed: Instant::now(),
                disks: Vec::new(),
                rot_seq: 0,
            }),
            cfg,
            space: Condvar::new(),
            avail: Condvar::new(),
            reserver: Mutex::new(reserver),
        })
    }

    /// A journal in memory only (no spill), as the tests and simple callers use.
    pub fn in_memory(budget: usize, next_seq: u64, reserver: Reserver) -> Self {
        let cfg = CaptureConfig {
            group: "test".into(),
            memory_budget: budget,
            spill_dir: None,
            spill_budget: 0,
            bitmap_after: Duration::ZERO,
            policy: Policy::Block,
        };
        Self::new(cfg, next_seq, reserver).expect("no spill directory to open")
    }

    /// Tests: a journal of group `group` in memory only, reserving seqs a
    /// million at a time.
    #[cfg(test)]
    pub(crate) fn for_tests(group: &str, budget: usize, policy: Policy) -> Arc<Self> {
        let cfg = CaptureConfig {
            group: group.into(),
            memory_budget: budget,
            spill_dir: None,
            spill_budget: 0,
            bitmap_after: Duration::ZERO,
            policy,
        };
        Arc::new(Self::new(cfg, 1, Box::new(|f| Ok(f + 1_000_000))).expect("no spill directory"))
    }

    /// Release the lock after entries were pushed, waking a batcher waiting in
    /// `take_batch` only when they can end its wait
    /// ([`Inner::batcher_should_wake`]): a wake-up per entry cost the recorder
    /// a futex call and the batcher a context switch, thousands a second.
    fn pushed(&self, g: MutexGuard<'_, Inner>) {
        let wake = g.batcher_should_wake();
        drop(g);
        if wake {
            self.avail.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.cfg.group
    }

    /// Register a disk of `size` bytes, with the regions that must be copied from
    /// its backing disk before the group can make recovery points again. With
    /// pending regions the group starts draining, for `reason` (`cause` is the
    /// reason code of the Note recorded for the disk).
    pub fn add_disk(
        &self,
        id: u16,
        size: u64,
        pending: RegionBitmap,
        cause: NoteReason,
        reason: &str,
    ) {
        self.add_grown_disk(id, size, pending, cause, reason, None);
    }

    /// [`add_disk`](Self::add_disk) for a disk that grew from `grown_from`
    /// bytes without the target having been told: its disk-grown Note and new
    /// DiskSize go with the Note that starts its copy.
    pub fn add_grown_disk(
        &self,
        id: u16,
        size: u64,
        pending: RegionBitmap,
        cause: NoteReason,
        reason: &str,
        grown_from: Option<u64>,
    ) {
        let gran = Granularity::for_disk(size);
        let regions = gran.regions(size);
        let mut g = self.lock();
        let has_pending = !pending.is_empty();
        g.disks.retain(|d| d.id != id);
        g.disks.push(DiskDirty {
            id,
            size,
            gran,
            pending,
            cur: RegionBitmap::new(regions),
            prev: RegionBitmap::new(regions),
            copied_bytes: 0,
            cause: has_pending.then(|| (cause, reason.to_string())),
            growth: grown_from.map(|f| (f, None)),
            grew_from: grown_from,
        });
        if has_pending {
            let why = format!("disk {id}: {reason}");
            if g.mode.mode != Mode::Drain {
                g.change_mode(&self.cfg.group, Mode::Drain, why.clone());
            }
            // The copy of this disk's regions starts now (with the group's
            // drain, or joining it): say why.
            self.push_notes(&mut g, &why, Some(id));
        }
        drop(g);
        self.avail.notify_one();
    }

    /// Record a live write of `data` at `offset` on `disk` (its bytes are already
    /// on the backing disk). Never waits under policy `degrade`.
    pub fn record_write(
        &self,
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Recorded, CaptureError> {
        if data.is_empty() {
            return Err(CaptureError::Empty { disk, offset });
        }
        self.record_live(disk, offset, Change::Write(Arc::new(data)))
    }

    /// Record that `len` bytes at `offset` now read as zeros.
    pub fn record_zero(&self, disk: u16, offset: u64, len: u64) -> Result<Recorded, CaptureError> {
        if len == 0 {
            return Err(CaptureError::Empty { disk, offset });
        }
        self.record_live(disk, offset, Change::Zero(len))
    }

    fn record_live(
        &self,
        disk: u16,
        offset: u64,
        change: Change,
    ) -> Result<Recorded, CaptureError> {
        let (data_len, range_len) = match &change {
            Change::Write(d) => (d.len(), d.len() as u64),
            Change::Zero(l) => (0, *l),
            Change::DiskSize(_) | Change::Tag { .. } | Change::Note { .. } => (0, 0),
        };
        let charge = data_len + ENTRY_OVERHEAD;
        let group = self.cfg.group.as_str();
        let mut g = self.lock();
        loop {
            if g.closed {
                return Err(CaptureError::Closed);
            }
            g.disk(disk)?;
            let mode = g.mode.mode;
            let mut placement = modes::place(
                mode,
                &g.budgets(&self.cfg),
                data_len,
                charge,
                ENTRY_OVERHEAD,
            );
            if self.cfg.policy == Policy::Block && mode != Mode::Bitmap {
                if placement != Placement::Memory {
                    // Wait for the relay's acks to free memory.
                    g.block_waits += 1;
                    g = self.space.wait(g).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                placement = Placement::Memory;
            }
            let held = match placement {
                Placement::Dirty => {
                    g.dirty_marks += 1;
                    let why = if g.spill.is_some() {
                        format!(
                            "memory ({} MiB) and spill ({} MiB) budgets full: keeping dirty regions only",
                            self.cfg.memory_budget >> 20,
                            self.cfg.spill_budget >> 20
                        )
                    } else {
                        format!(
                            "memory budget ({} MiB) full and no spill configured: keeping dirty regions only",
                            self.cfg.memory_budget >> 20
                        )
                    };
                    g.mark_pending(
                        group,
                        disk,
                        (offset, range_len),
                        NoteReason::BitmapCatchUp,
                        &why,
                    );
                    return Ok(Recorded::Dirty);
                }
                Placement::Memory => Held::Change(change),
                Placement::Spill => {
                    let Change::Write(data) = &change else {
                        unreachable!("only writes are spilled")
                    };
                    // A seq lost to a failed append leaves a gap, which the chain allows.
                    let seq = g.assign_seq(&self.reserver)?;
                    let meta = SpillMeta {
                        seq,
                        disk,
                        offset,
                        time_us: now_us(),
                        len: data.len() as u32,
                    };
                    let r = g
                        .spill
                        .as_mut()
                        .expect("placement checked")
                        .append(meta, data);
                    let pos = match r {
                        Ok(pos) => pos,
                        Err(e) => {
                            g.dirty_marks += 1;
                            let why =
                                format!("spill write failed ({e}): keeping dirty regions only");
                            g.mark_pending(
                                group,
                                disk,
                                (offset, range_len),
                                NoteReason::BitmapCatchUp,
                                &why,
                            );
                            return Ok(Recorded::Dirty);
                        }
                    };
                    if mode == Mode::Data {
                        let dir = self.cfg.spill_dir.as_ref().map(|p| p.display().to_string());
                        g.change_mode(
                            group,
                            Mode::Spill,
                            format!(
                                "memory budget ({} MiB) full: spilling to {}",
                                self.cfg.memory_budget >> 20,
                                dir.unwrap_or_default()
                            ),
                        );
                    }
                    g.mark_unacked(disk, offset, range_len);
                    g.push(Slot {
                        seq,
                        disk,
                        offset,
                        time_us: meta.time_us,
                        ordering: if mode.write_ordered() {
                            Ordering::W
                        } else {
                            Ordering::M
                        },
                        held: Held::Spilled(pos, meta.len),
                    });
                    self.pushed(g);
                    return Ok(Recorded::Seq(seq));
                }
            };
            let seq = g.assign_seq(&self.reserver)?;
            let slot = Slot {
                seq,
                disk,
                offset,
                time_us: now_us(),
                ordering: if mode.write_ordered() {
                    Ordering::W
                } else {
                    Ordering::M
                },
                held,
            };
            if range_len > 0 {
                g.mark_unacked(disk, offset, range_len);
            }
            g.push(slot);
            self.pushed(g);
            return Ok(Recorded::Seq(seq));
        }
    }

    /// Record the size of `disk` (sent before its data so the target can check
    /// or create the replica). Always kept in memory.
    pub fn record_disk_size(&self, disk: u16, size: u64) -> Result<u64, CaptureError> {
        let mut g = self.lock();
        if g.closed {
            return Err(CaptureError::Closed);
        }
        g.disk(disk)?;
        let seq = g.assign_seq(&self.reserver)?;
        let ordering = if g.mode.mode.write_ordered() {
            Ordering::W
        } else {
            Ordering::M
        };
        g.push(Slot {
            seq,
            disk,
            offset: 0,
            time_us: now_us(),
            ordering,
            held: Held::Change(Change::DiskSize(size)),
        });
        self.pushed(g);
        Ok(seq)
    }

    /// A change reached the backing disk (or may have, after an error) but could
    /// not be recorded: keep its region for resync, for `cause` (the reason
    /// code of the Note recorded when it is copied). Works after close too.
    pub fn mark_pending(&self, disk: u16, offset: u64, len: u64, cause: NoteReason, why: &str) {
        let mut g = self.lock();
        g.dirty_marks += 1;
        g.mark_pending(&self.cfg.group, disk, (offset, len.max(1)), cause, why);
    }

    /// The relay lost frames it had acknowledged, so the chain has a gap that
    /// redelivery cannot close: every disk becomes pending in full for
    /// `cause` (`why` is the text of the Note sent when the copy starts),
    /// every entry not yet acknowledged is dropped, whether or not it is in a
    /// frame already (the pending regions cover them; the caller stopped the
    /// pipeline that took them),
    /// and capture leaves write-ordered mode, so no W frame goes out before
    /// every disk was compared again. Returns the entries dropped.
    ///
    /// With a `seq_floor` (the relay holds seqs up to `seq_floor - 1` this
    /// journal may not reuse: the agent's state was lost or restored from an
    /// older copy), seqs continue from at least `seq_floor`, and when anything
    /// kept (notes and disk sizes, which carry no data) has a seq below it, all
    /// that is kept is numbered again above every seq handed out so far, in
    /// order. Fails only if those seqs cannot be reserved (the journal must
    /// not be used then: some kept slots may be numbered and some not).
    pub fn rebase(
        &self,
        cause: NoteReason,
        why: &str,
        seq_floor: u64,
    ) -> Result<u64, CaptureError> {
        let mut g = self.lock();
        for d in &mut g.disks {
            let regions = d.pending.len();
            d.pending.set_range(0, regions);
            d.cause = Some((cause, why.to_string()));
            // The announcement of a growth may be among the lost frames.
            if d.growth.is_none()
                && let Some(from) = d.grew_from
            {
                d.growth = Some((from, None));
            }
        }
        g.dirty_marks += 1;
        // Entries already in frames too: those frames belong to the chain
        // that broke and are never sent.
        g.unbatched = 0;
        g.recount_unbatched();
        let dropped = g.drop_unbatched(&self.cfg.group, why);
        g.next_seq = g.next_seq.max(seq_floor);
        let renumbered = if g.slots.iter().any(|s| s.seq < seq_floor) {
            // From the next seq, above every one handed out: numbering all
            // that is kept again, in order, keeps the order.
            (0..g.slots.len()).try_for_each(|i| {
                let old = g.slots[i].seq;
                let seq = g.assign_seq(&self.reserver)?;
                g.slots[i].seq = seq;
                for d in &mut g.disks {
                    if let Some((from, Some(s))) = d.growth
                        && s == old
                    {
                        d.growth = Some((from, Some(seq)));
                    }
                }
                Ok(())
            })
        } else {
            Ok(())
        };
        if g.mode.mode.write_ordered() {
            g.change_mode(&self.cfg.group, Mode::Bitmap, why.to_string());
        } else if g.mode.mode == Mode::Drain {
            // Already copying: no mode change will record the notes, so the
            // new stretch starts with them now (the chain gap, and a growth
            // whose announcement may have been lost).
            self.push_notes(&mut g, why, None);
        }
        drop(g);
        self.space.notify_all();
        self.avail.notify_all();
        renumbered.map(|()| dropped)
    }

    /// The next run of pending regions of `disk` at or after byte `from`, at most
    /// `max` bytes: `(offset, len)` in bytes, region-aligned (clamped to the disk).
    pub fn next_pending(&self, disk: u16, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut g = self.lock();
        let d = g.disk(disk).ok()?;
        let max_regions = (max >> d.gran.shift).max(1);
        let (a, b) = d.pending.next_run(from >> d.gran.shift, max_regions)?;
        let start = a << d.gran.shift;
        let end = (b << d.gran.shift).min(d.size);
        Some((start, end - start))
    }

    /// Wait up to `timeout` until `bytes` more fit in memory for a copy; false on
    /// timeout or close.
    pub fn wait_copy_room(&self, bytes: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let limit =
            self.cfg.memory_budget / modes::MEMORY_DATA_SHARE.1 * modes::MEMORY_DATA_SHARE.0;
        let mut g = self.lock();
        loop {
            if g.closed {
                return false;
            }
            if g.mem == 0 || g.mem + bytes <= limit {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .space
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Record the copy of `offset..offset+len` of `disk` (read under the disk's
    /// range lock, so no write to it is in flight) as M entries and clear its
    /// pending regions, atomically. Returns false (nothing recorded) when the
    /// group is not draining any more.
    pub fn record_copy(
        &self,
        disk: u16,
        offset: u64,
        len: u64,
        parts: Vec<CopyPart>,
    ) -> Result<bool, CaptureError> {
        let mut g = self.lock();
        if g.closed {
            return Err(CaptureError::Closed);
        }
        if g.mode.mode != Mode::Drain {
            return Ok(false);
        }
        g.disk(disk)?;
        for p in parts {
            let (off, change, range) = match p {
                CopyPart::Data(o, d) => {
                    let l = d.len() as u64;
                    (o, Change::Write(Arc::new(d)), l)
                }
                CopyPart::Zero(o, l) => (o, Change::Zero(l), l),
            };
            if range == 0 {
                continue;
            }
            let seq = g.assign_seq(&self.reserver)?;
            g.mark_unacked(disk, off, range);
            g.push(Slot {
                seq,
                disk,
                offset: off,
                time_us: now_us(),
                ordering: Ordering::M,
                held: Held::Change(change),
            });
        }
        let d = g.disk(disk)?;
        let (a, b) = d.span(offset, len);
        d.pending.clear_range(a, b);
        d.copied_bytes += len;
        if d.pending.is_empty() {
            d.cause = None;
        }
        self.pushed(g);
        Ok(true)
    }

    /// When draining and no region is pending any more, return to data mode:
    /// the next W frame is a recovery point again. True when that happened.
    pub fn finish_drain(&self) -> bool {
        let mut g = self.lock();
        if g.mode.mode != Mode::Drain || g.disks.iter().any(|d| !d.pending.is_empty()) {
            return false;
        }
        let copied: u64 = g.disks.iter().map(|d| d.copied_bytes).sum();
        g.change_mode(
            &self.cfg.group,
            Mode::Data,
            format!("every dirty region copied ({copied} bytes since start): write-ordered again"),
        );
        drop(g);
        // The batcher, waiting for entries, sends the W frame that makes the
        // replica consistent again now rather than at its next wake-up.
        self.avail.notify_all();
        true
    }

    /// The session's link to the relay went up or down.
    pub fn set_link(&self, up: bool) {
        let mut g = self.lock();
        if g.link_up != up {
            g.link_up = up;
            g.link_changed = Instant::now();
        }
    }

    /// Periodic check (a few times a second): the relay unreachable for too long
    /// (drop unsent entries to the bitmap), or the link keeping up again after
    /// bitmap mode (start draining).
    pub fn tick(&self) {
        let mut g = self.lock();
        if g.closed {
            return;
        }
        let link = LinkView {
            up: g.link_up,
            down_for_us: if g.link_up {
                0
            } else {
                g.link_changed.elapsed().as_micros() as u64
            },
        };
        let backlog = g.unbatched_bytes as u64;
        let limit = (self.cfg.memory_budget / 4) as u64;
        let pending = g.pending_bytes();
        let after = self.cfg.bitmap_after.as_micros() as u64;
        match modes::tick(g.mode.mode, link, backlog, limit, pending, after) {
            Tick::Stay => {}
            Tick::ToBitmap(why) => {
                let n = g.drop_unbatched(&self.cfg.group, &why);
                g.change_mode(
                    &self.cfg.group,
                    Mode::Bitmap,
                    format!("{why} ({n} entries)"),
                );
                drop(g);
                self.space.notify_all();
            }
            Tick::ToDrain(why) => {
                g.change_mode(&self.cfg.group, Mode::Drain, why.clone());
                self.push_notes(&mut g, &why, None);
                drop(g);
                self.avail.notify_one();
            }
            Tick::PauseDrain(why) => g.change_mode(&self.cfg.group, Mode::Bitmap, why),
        }
    }

    /// The current capture mode.
    pub fn mode(&self) -> Mode {
        self.lock().mode.mode
    }

    /// Hand the batcher the next run of entries not yet batched: all of one
    /// ordering, at most `max_bytes` of payload (at least one entry). Waits up to
    /// `wait` for a first entry (returns an empty vec on timeout or close), then,
    /// while fewer than `max_bytes` are pending, lingers until the oldest pending
    /// entry is `linger` old. Spilled bytes are read back outside the lock; a
    /// spill record that cannot be read turns it and every later unsent entry
    /// into dirty regions (bitmap mode).
    pub fn take_batch(&self, max_bytes: usize, linger: Duration, wait: Duration) -> Vec<Entry> {
        let deadline = Instant::now() + wait;
        let mut g = self.lock();
        while g.unbatched >= g.slots.len() && !g.closed {
            let now = Instant::now();
            if now >= deadline {
                return Vec::new();
            }
            g.waiters.first += 1;
            g = self
                .avail
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            g.waiters.first -= 1;
        }
        if g.unbatched >= g.slots.len() {
            return Vec::new();
        }
        let first_us = g.slots[g.unbatched].time_us;
        let linger_until = Instant::now()
            + linger.saturating_sub(Duration::from_micros(now_us().saturating_sub(first_us)));
        while g.unbatched_bytes < max_bytes && g.unbatched_tags == 0 && !g.closed {
            let now = Instant::now();
            if now >= linger_until {
                break;
            }
            let w = &mut g.waiters;
            w.linger_bytes = if w.linger == 0 {
                max_bytes
            } else {
                w.linger_bytes.min(max_bytes)
            };
            w.linger += 1;
            g = self
                .avail
                .wait_timeout(g, linger_until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            g.waiters.linger -= 1;
            if g.unbatched >= g.slots.len() {
                // Dropped to the bitmap meanwhile.
                return Vec::new();
            }
        }
        let start = g.unbatched;
        let ordering = g.slots[start].ordering;
        let mut bytes = 0usize;
        let mut tags = 0usize;
        let mut end = start;
        while end < g.slots.len() {
            let s = &g.slots[end];
            if s.ordering != ordering {
                break;
            }
            let l = s.data_len();
            // A slot without payload (a zero range, a disk size) never ends a
            // batch by bytes: a disk-grown Note's DiskSize stays in its frame.
            if end > start && l > 0 && bytes + l > max_bytes {
                break;
            }
            bytes += l;
            end += 1;
            if s.is_tag() {
                // A tag ends its frame: the frame's end is the tagged point.
                tags += 1;
                break;
            }
        }
        enum Out {
            Ready(Entry),
            Spilled(SpillPos, SpillMeta, Ordering),
        }
        let out: Vec<Out> = g
            .slots
            .range(start..end)
            .map(|s| match &s.held {
                Held::Change(c) => Out::Ready(Entry {
                    seq: s.seq,
                    disk: s.disk,
                    offset: s.offset,
                    time_us: s.time_us,
                    ordering: s.ordering,
                    change: c.clone(),
                }),
                Held::Spilled(pos, len) => Out::Spilled(
                    pos.clone(),
                    SpillMeta {
                        seq: s.seq,
                        disk: s.disk,
                        offset: s.offset,
                        time_us: s.time_us,
                        len: *len,
                    },
                    s.ordering,
                ),
            })
            .collect();
        g.unbatched = end;
        g.unbatched_bytes -= bytes;
        g.unbatched_tags -= tags;
        drop(g);
        let mut entries = Vec::with_capacity(out.len());
        for o in out {
            match o {
                Out::Ready(e) => entries.push(e),
                Out::Spilled(pos, meta, ordering) => match spill::read(&pos, meta) {
                    Ok(data) => entries.push(Entry {
                        seq: meta.seq,
                        disk: meta.disk,
                        offset: meta.offset,
                        time_us: meta.time_us,
                        ordering,
                        change: Change::Write(Arc::new(data)),
                    }),
                    Err(e) => {
                        let mut g = self.lock();
                        g.untake_from(meta.seq);
                        let why = format!("spill read failed ({e})");
                        let n = g.drop_unbatched(&self.cfg.group, &why);
                        let why = format!("{why}: {n} entries kept as dirty regions");
                        g.change_mode(&self.cfg.group, Mode::Bitmap, why);
                        drop(g);
                        self.space.notify_all();
                        break;
                    }
                },
            }
        }
        entries
    }

    /// Drop every entry with seq ≤ `seq` (its frame is durable at the relay),
    /// free its budget, and rotate the unacknowledged-region generations.
    pub fn trim_through(&self, seq: u64) {
        let mut guard = self.lock();
        let g = &mut *guard;
        let mut freed = false;
        while let Some(s) = g.slots.front() {
            if s.seq > seq {
                break;
            }
            let s = g.slots.pop_front().expect("front exists");
            g.release(&s);
            freed = true;
            if g.unbatched > 0 {
                g.unbatched -= 1;
            } else {
                g.unbatched_bytes = g.unbatched_bytes.saturating_sub(s.data_len());
                g.unbatched_tags = g.unbatched_tags.saturating_sub(usize::from(s.is_tag()));
            }
        }
        for d in &mut g.disks {
            if d.growth
                .is_some_and(|(_, at)| at.is_some_and(|at| at <= seq))
            {
                d.growth = None;
            }
        }
        if seq >= g.rot_seq {
            for d in &mut g.disks {
                std::mem::swap(&mut d.prev, &mut d.cur);
                d.cur.clear();
            }
            g.rot_seq = g.next_seq.saturating_sub(1);
        }
        if g.mode.mode == Mode::Spill && g.spill.as_ref().is_none_or(|s| s.records() == 0) {
            g.change_mode(
                &self.cfg.group,
                Mode::Data,
                "spill drained: all bytes in memory again".into(),
            );
        }
        drop(guard);
        if freed {
            self.space.notify_all();
        }
    }

    /// The regions of `disk` the persisted dirty log must cover now: pending and
    /// not yet acknowledged.
    pub fn dirty_regions(&self, disk: u16) -> Option<RegionBitmap> {
        let mut g = self.lock();
        let d = g.disk(disk).ok()?;
        let mut b = d.pending.clone();
        b.union_with(&d.cur);
        b.union_with(&d.prev);
        Some(b)
    }

    /// The size `disk` had before a growth the relay has not yet acknowledged
    /// the announcement of (what the dirty log persists as `grown_from`).
    pub fn unannounced_growth(&self, disk: u16) -> Option<u64> {
        let mut g = self.lock();
        g.disk(disk).ok()?.growth.map(|(from, _)| from)
    }

    /// At an orderly stop: what must still be resynced at the next start (the
    /// pending regions, and the unacknowledged ones unless every entry was
    /// acknowledged).
    pub fn final_dirty_regions(&self, disk: u16) -> Option<RegionBitmap> {
        let mut g = self.lock();
        let all_acked = g.slots.is_empty();
        let d = g.disk(disk).ok()?;
        let mut b = d.pending.clone();
        if !all_acked {
            b.union_with(&d.cur);
            b.union_with(&d.prev);
        }
        Some(b)
    }

    /// Stop accepting records; waiters return `Closed`, the batcher drains.
    pub fn close(&self) {
        self.lock().closed = true;
        self.space.notify_all();
        self.avail.notify_all();
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Current counters.
    pub fn stats(&self) -> JournalStats {
        let g = self.lock();
        JournalStats {
            entries: g.slots.len(),
            bytes: g.mem,
            budget: self.cfg.memory_budget,
            spill_bytes: g.spill.as_ref().map_or(0, Spill::bytes),
            spill_entries: g.spill.as_ref().map_or(0, Spill::records),
            spill_budget: if g.spill.is_some() {
                self.cfg.spill_budget
            } else {
                0
            },
            pending_bytes: g.pending_bytes(),
            next_seq: g.next_seq,
            recorded: g.recorded,
            recorded_bytes: g.recorded_bytes,
            dirty_marks: g.dirty_marks,
            dropped_entries: g.dropped,
            tags: g.tags,
            dropped_tags: g.dropped_tags,
            budget_waits: g.block_waits,
            policy: self.cfg.policy,
            mode: g.mode.clone(),
            disks: g
                .disks
                .iter()
                .map(|d| DiskCaptureStats {
                    id: d.id,
                    granularity: d.gran.bytes(),
                    pending_bytes: d.bytes_of(d.pending.count()),
                    unacked_bytes: d.bytes_of(d.cur.union_count(&d.prev)),
                    copied_bytes: d.copied_bytes,
                })
                .collect(),
        }
    }
}

#[path = "journal_markers.rs"]
mod markers;

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
