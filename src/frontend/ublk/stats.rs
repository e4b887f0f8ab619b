//! Request counters of one ublk device, and their serializable snapshot for
//! the agent's status.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Counters of one device, updated by its queue threads (relaxed atomics: each
/// counter is exact, a snapshot is not one instant across counters).
#[derive(Debug, Default)]
pub struct UblkStats {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
    queues_serving: AtomicU64,
}

/// A copy of [`UblkStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UblkStatsSnapshot {
    /// Reads that completed.
    pub reads: u64,
    /// Writes that completed.
    pub writes: u64,
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Bytes accepted by writes.
    pub bytes_written: u64,
    /// Flushes that completed.
    pub flushes: u64,
    /// Discards that completed.
    pub discards: u64,
    /// Write-zeroes that completed.
    pub write_zeroes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Queue threads serving requests right now.
    pub queues_serving: u64,
}

/// Which counter a completed request bumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl UblkStats {
    /// A copy of every counter.
    pub fn snapshot(&self) -> UblkStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UblkStatsSnapshot {
            reads: get(&self.reads),
            writes: get(&self.writes),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            write_zeroes: get(&self.write_zeroes),
            errors: get(&self.errors),
            queues_serving: get(&self.queues_serving),
        }
    }

    /// A request of kind `c` completed, moving `bytes` of data.
    pub(crate) fn done(&self, c: Counter, bytes: u64) {
        let add = |x: &AtomicU64, n: u64| x.fetch_add(n, Ordering::Relaxed);
        match c {
            Counter::Read => {
                add(&self.reads, 1);
                add(&self.bytes_read, bytes);
            }
            Counter::Write => {
                add(&self.writes, 1);
                add(&self.bytes_written, bytes);
            }
            Counter::Flush => {
                add(&self.flushes, 1);
            }
            Counter::Discard => {
                add(&self.discards, 1);
            }
            Counter::WriteZeroes => {
                add(&self.write_zeroes, 1);
            }
        }
    }

    /// A request was answered with an error.
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A queue thread started (`true`) or stopped serving.
    pub(crate) fn serving(&self, on: bool) {
        if on {
            self.queues_serving.fetch_add(1, Ordering::Relaxed);
        } else {
            self.queues_serving.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
