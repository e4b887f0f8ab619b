//! Request counters of one FUSE mount, and their serializable snapshot for the
//! agent's status.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Counters of one mount, updated by the serving threads (relaxed atomics: each
/// counter is exact, a snapshot is not one instant across counters).
#[derive(Debug, Default)]
pub struct FuseStats {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    errors: AtomicU64,
    serving: AtomicBool,
}

/// A copy of [`FuseStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseStatsSnapshot {
    /// Every request the file system answered (lookups and getattrs included).
    pub requests: u64,
    /// Read requests that returned data (or end of file).
    pub reads: u64,
    /// Write requests that completed.
    pub writes: u64,
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Bytes accepted by writes.
    pub bytes_written: u64,
    /// Flushes of a disk (fsync, and close after writing).
    pub flushes: u64,
    /// Punched holes (trims).
    pub trims: u64,
    /// Zeroed ranges.
    pub zeroes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// True while the session is served (false once the kernel ended it).
    pub serving: bool,
}

/// Which counter an operation bumps.
#[derive(Debug, Clone, Copy)]
pub(super) enum Counter {
    Read,
    Write,
    Flush,
    Trim,
    Zeroes,
}

impl FuseStats {
    /// A copy of every counter.
    pub fn snapshot(&self) -> FuseStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FuseStatsSnapshot {
            requests: get(&self.requests),
            reads: get(&self.reads),
            writes: get(&self.writes),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            flushes: get(&self.flushes),
            trims: get(&self.trims),
            zeroes: get(&self.zeroes),
            errors: get(&self.errors),
            serving: self.serving.load(Ordering::Relaxed),
        }
    }

    pub(super) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// One completed operation of `bytes` bytes (data bytes only count for reads
    /// and writes).
    pub(super) fn done(&self, c: Counter, bytes: u64) {
        let (count, data) = match c {
            Counter::Read => (&self.reads, Some(&self.bytes_read)),
            Counter::Write => (&self.writes, Some(&self.bytes_written)),
            Counter::Flush => (&self.flushes, None),
            Counter::Trim => (&self.trims, None),
            Counter::Zeroes => (&self.zeroes, None),
        };
        count.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = data {
            d.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub(super) fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_counts_and_serializes() {
        let s = FuseStats::default();
        s.request();
        s.request();
        s.done(Counter::Write, 4096);
        s.done(Counter::Read, 10);
        s.done(Counter::Flush, 0);
        s.error();
        s.set_serving(true);
        let snap = s.snapshot();
        assert_eq!(snap.requests, 2);
        assert_eq!((snap.writes, snap.bytes_written), (1, 4096));
        assert_eq!((snap.reads, snap.bytes_read), (1, 10));
        assert_eq!((snap.flushes, snap.errors), (1, 1));
        assert!(snap.serving);
        let json = serde_json::to_string(&snap).unwrap();
        let back: FuseStatsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
    }
}
