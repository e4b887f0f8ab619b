//! Counters of an NBD server, shared with the agent's status.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters of one [`super::NbdServer`], updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct NbdStats {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// A point-in-time copy of [`NbdStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdStatsSnapshot {
    /// Connections currently open (handshake or transmission).
    pub connections_open: u64,
    /// Connections accepted since start (including refused ones).
    pub connections_total: u64,
    /// Connections closed at once because the connection cap was reached.
    pub connections_refused: u64,
    /// Handshakes that failed (protocol violation, TLS failure, timeout).
    pub handshake_failures: u64,
    /// Connections dropped in transmission for a protocol violation (bad
    /// magic, oversized payload, disconnect mid-request).
    pub protocol_errors: u64,
    /// Requests received in transmission (including refused ones).
    pub requests: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// Replies with a nonzero error (refusals and backing disk failures).
    pub errors: u64,
}

impl NbdStats {
    /// Copy every counter.
    pub fn snapshot(&self) -> NbdStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NbdStatsSnapshot {
            connections_open: g(&self.connections_open),
            connections_total: g(&self.connections_total),
            connections_refused: g(&self.connections_refused),
            handshake_failures: g(&self.handshake_failures),
            protocol_errors: g(&self.protocol_errors),
            requests: g(&self.requests),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            errors: g(&self.errors),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Decrements `connections_open` when a connection task ends, however it ends.
pub(crate) struct OpenGuard<'a>(pub &'a NbdStats);

impl<'a> OpenGuard<'a> {
    pub(crate) fn new(stats: &'a NbdStats) -> Self {
        NbdStats::add(&stats.connections_open, 1);
        OpenGuard(stats)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}
