//! The capture journal: an in-memory, write-ordered log of captured changes with a
//! byte budget.
//!
//! Every entry gets the group's next seq under one lock, so seq order is the order
//! in which writes were recorded. Entries stay until the relay has durably
//! acknowledged the frame that carries them ([`CaptureJournal::trim_through`]);
//! the batcher reads them without removing them ([`CaptureJournal::take_batch`]).
//! When the budget is full, [`CaptureJournal::record`] waits for trimming (this
//! release's policy; spilling to disk and the dirty bitmap replace the wait later).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::error::{Classify, ErrorKind};
use crate::util::time::now_us;

/// Per-entry bookkeeping charged against the budget besides the data itself.
pub const ENTRY_OVERHEAD: usize = 96;

/// Whether replaying the entry in seq order reproduces every intermediate source
/// state (W: a live write) or not (M: data read from the disk later, e.g. the
/// initial copy).
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
}

/// One captured change.
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
        match &self.change {
            Change::Write(d) => d.len(),
            _ => 0,
        }
    }

    fn charge(&self) -> usize {
        self.payload_len() + ENTRY_OVERHEAD
    }
}

/// Errors of the capture journal.
#[derive(Debug, Error)]
pub enum CaptureError {
    /// The journal was closed (agent shutting down): the write is not recorded.
    #[error("capture journal is closed")]
    Closed,
    /// Persisting the seq reservation failed: the write is not recorded.
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
}

impl Classify for CaptureError {
    fn kind(&self) -> ErrorKind {
        match self {
            CaptureError::Closed => ErrorKind::Shutdown,
            CaptureError::Reserve(_) => ErrorKind::Io,
            CaptureError::Empty { .. } => ErrorKind::Corrupt,
        }
    }
}

/// Persists a seq reservation: called with the first seq that is not yet covered;
/// returns the new exclusive upper bound that is now durably reserved.
pub type Reserver = Box<dyn FnMut(u64) -> std::io::Result<u64> + Send>;

struct Inner {
    entries: VecDeque<Entry>,
    /// Index in `entries` of the first entry not yet handed to the batcher.
    unbatched: usize,
    unbatched_bytes: usize,
    bytes: usize,
    next_seq: u64,
    reserved_until: u64,
    closed: bool,
    recorded: u64,
    recorded_bytes: u64,
    waits: u64,
}

/// Counters and gauges of the journal, for status and the bench.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct JournalStats {
    /// Entries held (not yet acknowledged by the relay).
    pub entries: usize,
    /// Bytes charged against the budget.
    pub bytes: usize,
    /// The budget.
    pub budget: usize,
    /// Next seq to assign.
    pub next_seq: u64,
    /// Entries recorded since start.
    pub recorded: u64,
    /// Payload bytes recorded since start.
    pub recorded_bytes: u64,
    /// How many records had to wait for budget.
    pub budget_waits: u64,
}

/// The capture journal of one consistency group.
pub struct CaptureJournal {
    inner: Mutex<Inner>,
    /// Signalled when entries are trimmed (budget freed) or on close.
    space: Condvar,
    /// Signalled when entries are recorded or on close.
    avail: Condvar,
    budget: usize,
    reserver: Mutex<Reserver>,
}

impl CaptureJournal {
    /// A journal with `budget` bytes, assigning seqs from `next_seq`; `reserver`
    /// is asked to durably reserve more seqs whenever `next_seq` reaches the
    /// reserved bound (initially `next_seq`, so the first record reserves).
    pub fn new(budget: usize, next_seq: u64, reserver: Reserver) -> Self {
        CaptureJournal {
            inner: Mutex::new(Inner {
                entries: VecDeque::new(),
                unbatched: 0,
                unbatched_bytes: 0,
                bytes: 0,
                next_seq,
                reserved_until: next_seq,
                closed: false,
                recorded: 0,
                recorded_bytes: 0,
                waits: 0,
            }),
            space: Condvar::new(),
            avail: Condvar::new(),
            budget,
            reserver: Mutex::new(reserver),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a write of `data` at `offset` on `disk`; returns its seq once it is
    /// in the journal. Waits while the budget is full.
    pub fn record_write(
        &self,
        disk: u16,
        offset: u64,
        data: Vec<u8>,
        ordering: Ordering,
    ) -> Result<u64, CaptureError> {
        if data.is_empty() {
            return Err(CaptureError::Empty { disk, offset });
        }
        self.record(disk, offset, ordering, Change::Write(Arc::new(data)))
    }

    /// Record that `len` bytes at `offset` now read as zeros.
    pub fn record_zero(
        &self,
        disk: u16,
        offset: u64,
        len: u64,
        ordering: Ordering,
    ) -> Result<u64, CaptureError> {
        if len == 0 {
            return Err(CaptureError::Empty { disk, offset });
        }
        self.record(disk, offset, ordering, Change::Zero(len))
    }

    /// Record the size of `disk` (sent before its data so the target can check
    /// or create the replica).
    pub fn record_disk_size(
        &self,
        disk: u16,
        size: u64,
        ordering: Ordering,
    ) -> Result<u64, CaptureError> {
        self.record(disk, 0, ordering, Change::DiskSize(size))
    }

    fn record(
        &self,
        disk: u16,
        offset: u64,
        ordering: Ordering,
        change: Change,
    ) -> Result<u64, CaptureError> {
        let charge = match &change {
            Change::Write(d) => d.len(),
            _ => 0,
        } + ENTRY_OVERHEAD;
        let mut g = self.lock();
        let mut waited = false;
        // A single entry larger than the whole budget is admitted when the journal
        // is empty, so it can never wait forever.
        while !g.closed && g.bytes > 0 && g.bytes + charge > self.budget {
            waited = true;
            g = self.space.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.closed {
            return Err(CaptureError::Closed);
        }
        if waited {
            g.waits += 1;
        }
        if g.next_seq >= g.reserved_until {
            let from = g.next_seq;
            let mut r = self.reserver.lock().unwrap_or_else(|p| p.into_inner());
            g.reserved_until = (r)(from).map_err(CaptureError::Reserve)?;
        }
        let seq = g.next_seq;
        g.next_seq += 1;
        let entry = Entry {
            seq,
            disk,
            offset,
            time_us: now_us(),
            ordering,
            change,
        };
        g.bytes += charge;
        g.unbatched_bytes += entry.payload_len();
        g.recorded += 1;
        g.recorded_bytes += entry.payload_len() as u64;
        g.entries.push_back(entry);
        drop(g);
        self.avail.notify_one();
        Ok(seq)
    }

    /// Hand the batcher the next run of entries not yet batched: all of one
    /// ordering, at most `max_bytes` of payload (at least one entry). Waits up to
    /// `wait` for a first entry (returns an empty vec on timeout or close), then,
    /// while fewer than `max_bytes` are pending, lingers until the oldest pending
    /// entry is `linger` old.
    pub fn take_batch(&self, max_bytes: usize, linger: Duration, wait: Duration) -> Vec<Entry> {
        let deadline = Instant::now() + wait;
        let mut g = self.lock();
        while g.unbatched >= g.entries.len() && !g.closed {
            let now = Instant::now();
            if now >= deadline {
                return Vec::new();
            }
            g = self
                .avail
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if g.unbatched >= g.entries.len() {
            return Vec::new();
        }
        // Linger for more data, measured from the first pending entry's capture.
        let first_us = g.entries[g.unbatched].time_us;
        let linger_until = Instant::now()
            + linger.saturating_sub(Duration::from_micros(now_us().saturating_sub(first_us)));
        while g.unbatched_bytes < max_bytes && !g.closed {
            let now = Instant::now();
            if now >= linger_until {
                break;
            }
            g = self
                .avail
                .wait_timeout(g, linger_until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let start = g.unbatched;
        let ordering = g.entries[start].ordering;
        let mut bytes = 0usize;
        let mut end = start;
        while end < g.entries.len() {
            let e = &g.entries[end];
            if e.ordering != ordering {
                break;
            }
            let l = e.payload_len();
            if end > start && bytes + l > max_bytes {
                break;
            }
            bytes += l;
            end += 1;
        }
        let out: Vec<Entry> = g.entries.range(start..end).cloned().collect();
        g.unbatched = end;
        g.unbatched_bytes -= bytes;
        out
    }

    /// Drop every entry with seq ≤ `seq` (its frame is durable at the relay) and
    /// wake writers waiting for budget.
    pub fn trim_through(&self, seq: u64) {
        let mut g = self.lock();
        let mut freed = 0;
        while let Some(e) = g.entries.front() {
            if e.seq > seq {
                break;
            }
            freed += e.charge();
            let e = g.entries.pop_front().expect("front exists");
            if g.unbatched > 0 {
                g.unbatched -= 1;
            } else {
                // Acknowledged before being batched cannot happen; keep the
                // cursor consistent anyway.
                g.unbatched_bytes = g.unbatched_bytes.saturating_sub(e.payload_len());
            }
        }
        g.bytes -= freed;
        drop(g);
        if freed > 0 {
            self.space.notify_all();
        }
    }

    /// Make every entry not yet acknowledged pending again (used when frames in
    /// flight were lost and must be rebuilt). Not used while frames are kept
    /// sealed in the outbox; kept for the frontends' spill path.
    pub fn rewind(&self) {
        let mut g = self.lock();
        g.unbatched = 0;
        g.unbatched_bytes = g.entries.iter().map(Entry::payload_len).sum();
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
            entries: g.entries.len(),
            bytes: g.bytes,
            budget: self.budget,
            next_seq: g.next_seq,
            recorded: g.recorded,
            recorded_bytes: g.recorded_bytes,
            budget_waits: g.waits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering as AO};

    fn journal(budget: usize) -> CaptureJournal {
        CaptureJournal::new(budget, 1, Box::new(|from| Ok(from + 10)))
    }

    #[test]
    fn seqs_are_consecutive_and_batches_keep_order() {
        let j = journal(1 << 20);
        for i in 0..5u64 {
            let s = j
                .record_write(0, i * 4096, vec![i as u8; 4096], Ordering::W)
                .unwrap();
            assert_eq!(s, i + 1);
        }
        let b = j.take_batch(8192, Duration::ZERO, Duration::ZERO);
        assert_eq!(b.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        let b = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
        assert_eq!(b.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(j.take_batch(1, Duration::ZERO, Duration::ZERO).is_empty());
        assert_eq!(j.stats().entries, 5);
        j.trim_through(3);
        assert_eq!(j.stats().entries, 2);
        j.trim_through(5);
        assert_eq!(j.stats().bytes, 0);
    }

    #[test]
    fn batches_never_mix_orderings() {
        let j = journal(1 << 20);
        j.record_disk_size(0, 1 << 20, Ordering::M).unwrap();
        j.record_zero(0, 0, 4096, Ordering::M).unwrap();
        j.record_write(0, 0, vec![1; 10], Ordering::W).unwrap();
        let b = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
        assert_eq!(b.len(), 2);
        assert!(b.iter().all(|e| e.ordering == Ordering::M));
        let b = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].ordering, Ordering::W);
    }

    #[test]
    fn empty_changes_are_refused() {
        let j = journal(1 << 20);
        assert!(j.record_write(0, 0, vec![], Ordering::W).is_err());
        assert!(j.record_zero(0, 0, 0, Ordering::W).is_err());
        assert_eq!(j.next_seq(), 1);
    }

    #[test]
    fn budget_blocks_until_trimmed() {
        let j = Arc::new(journal(3 * (4096 + ENTRY_OVERHEAD)));
        for _ in 0..3 {
            j.record_write(0, 0, vec![0; 4096], Ordering::W).unwrap();
        }
        let done = Arc::new(AtomicU64::new(0));
        let (j2, d2) = (j.clone(), done.clone());
        let t = std::thread::spawn(move || {
            let s = j2.record_write(0, 0, vec![0; 4096], Ordering::W).unwrap();
            d2.store(s, AO::SeqCst);
        });
        // Bounded wait: the writer must still be blocked.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(done.load(AO::SeqCst), 0);
        let _ = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
        j.trim_through(1);
        t.join().unwrap();
        assert_eq!(done.load(AO::SeqCst), 4);
        assert_eq!(j.stats().budget_waits, 1);
    }

    #[test]
    fn close_releases_waiters() {
        let j = Arc::new(journal(4096 + ENTRY_OVERHEAD));
        j.record_write(0, 0, vec![0; 4096], Ordering::W).unwrap();
        let j2 = j.clone();
        let t = std::thread::spawn(move || j2.record_write(0, 0, vec![0; 4096], Ordering::W));
        std::thread::sleep(Duration::from_millis(20));
        j.close();
        assert!(matches!(t.join().unwrap(), Err(CaptureError::Closed)));
    }

    #[test]
    fn reservation_is_called_before_seqs_are_used() {
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let j = CaptureJournal::new(
            1 << 20,
            100,
            Box::new(move |from| {
                c2.fetch_add(1, AO::SeqCst);
                Ok(from + 2)
            }),
        );
        for _ in 0..5 {
            j.record_zero(0, 0, 1, Ordering::W).unwrap();
        }
        assert_eq!(calls.load(AO::SeqCst), 3);
        let failing = CaptureJournal::new(
            1 << 20,
            1,
            Box::new(|_| Err(std::io::Error::other("disk full"))),
        );
        assert!(matches!(
            failing.record_zero(0, 0, 1, Ordering::W),
            Err(CaptureError::Reserve(_))
        ));
    }
}
