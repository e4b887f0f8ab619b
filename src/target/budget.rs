//! The in-flight budget of one group: how many frames, and how many bytes of
//! them, may be between the socket and the end of the apply thread at once.
//!
//! The session's reader task takes a [`Charge`] for every frame it has read
//! before it reads the next message, so an exhausted budget stops reading the
//! socket (TCP back-pressure to the relay). A charge travels with its frame
//! through the gate, the open pool and the apply thread and gives its share
//! back when dropped, wherever that happens (applied, duplicate, overflow,
//! refused, connection lost), so accounting cannot leak. The sealed bytes are
//! given back as soon as the frame is opened ([`Charge::release_sealed`]); the
//! plaintext when the frame has been written.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

/// Frames in flight per group, at most.
pub const BUDGET_FRAMES: u32 = 64;
/// Bytes in flight per group, at most (sealed bytes until opened, plus plaintext).
pub const BUDGET_BYTES: u32 = 64 << 20;
/// Largest charge one frame takes: a frame bigger than this (a 64 MiB frame
/// sealed raw is ~128 MiB charged) is charged this much, so it can always pass
/// on its own once the pipeline is empty and the gate holds its maximum.
pub const MAX_CHARGE: u32 = BUDGET_BYTES / 2;

/// Counting budget shared by the reader task (acquires) and the open and apply
/// threads (release, by dropping charges). Never closed.
#[derive(Debug)]
pub struct Budget {
    frames: Semaphore,
    bytes: Semaphore,
    /// Frames currently charged (for status).
    in_frames: AtomicU64,
    /// Bytes currently charged (for status).
    in_bytes: AtomicU64,
}

impl Budget {
    /// A budget of [`BUDGET_FRAMES`] frames and [`BUDGET_BYTES`] bytes.
    pub fn new() -> Arc<Budget> {
        Self::with_limits(BUDGET_FRAMES, BUDGET_BYTES)
    }

    /// A budget with explicit limits (tests).
    pub fn with_limits(frames: u32, bytes: u32) -> Arc<Budget> {
        Arc::new(Budget {
            frames: Semaphore::new(frames as usize),
            bytes: Semaphore::new(bytes as usize),
            in_frames: AtomicU64::new(0),
            in_bytes: AtomicU64::new(0),
        })
    }

    /// The bytes one frame is charged: its sealed length plus its plaintext
    /// length, capped at [`MAX_CHARGE`] in total (the sealed part first).
    pub fn cost(sealed: u64, plain: u64) -> (u32, u32) {
        let sealed = sealed.min(u64::from(MAX_CHARGE)) as u32;
        let plain = plain.min(u64::from(MAX_CHARGE - sealed)) as u32;
        (sealed, plain)
    }

    /// Wait until one frame of `sealed` + `plain` bytes fits, and take it.
    /// Cancel-safe: nothing is taken unless the whole charge is.
    pub async fn acquire(self: &Arc<Self>, sealed: u64, plain: u64) -> Charge {
        let (s, p) = Self::cost(sealed, plain);
        // The semaphores are never closed, so acquire cannot fail; if it ever
        // did, the frame proceeds uncharged rather than stopping the session.
        let f = self.frames.acquire().await.ok();
        let b = self.bytes.acquire_many(s + p).await.ok();
        if let (Some(f), Some(b)) = (f, b) {
            f.forget();
            b.forget();
            return self.charged(s, p);
        }
        Charge {
            budget: None,
            sealed: 0,
            plain: 0,
        }
    }

    /// Take one frame's charge if it fits now.
    pub fn try_acquire(self: &Arc<Self>, sealed: u64, plain: u64) -> Option<Charge> {
        let (s, p) = Self::cost(sealed, plain);
        let f = self.frames.try_acquire().ok()?;
        let b = self.bytes.try_acquire_many(s + p).ok()?;
        f.forget();
        b.forget();
        Some(self.charged(s, p))
    }

    fn charged(self: &Arc<Self>, sealed: u32, plain: u32) -> Charge {
        self.in_frames.fetch_add(1, Ordering::Relaxed);
        self.in_bytes
            .fetch_add(u64::from(sealed) + u64::from(plain), Ordering::Relaxed);
        Charge {
            budget: Some(Arc::clone(self)),
            sealed,
            plain,
        }
    }

    fn give_back(&self, frames: u32, bytes: u32) {
        if bytes > 0 {
            self.in_bytes.fetch_sub(u64::from(bytes), Ordering::Relaxed);
            self.bytes.add_permits(bytes as usize);
        }
        if frames > 0 {
            self.in_frames
                .fetch_sub(u64::from(frames), Ordering::Relaxed);
            self.frames.add_permits(frames as usize);
        }
    }

    /// Frames and bytes currently charged.
    pub fn in_flight(&self) -> (u64, u64) {
        (
            self.in_frames.load(Ordering::Relaxed),
            self.in_bytes.load(Ordering::Relaxed),
        )
    }
}

/// One frame's share of a [`Budget`]; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Option<Arc<Budget>>,
    sealed: u32,
    plain: u32,
}

impl Charge {
    /// Bytes this charge holds.
    pub fn bytes(&self) -> usize {
        self.sealed as usize + self.plain as usize
    }

    /// Give back the sealed part (the frame has been opened and its sealed
    /// bytes freed); the plaintext part stays until the charge is dropped.
    pub fn release_sealed(&mut self) {
        if let Some(b) = &self.budget {
            b.give_back(0, self.sealed);
        }
        self.sealed = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(b) = self.budget.take() {
            b.give_back(1, self.sealed + self.plain);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cost_is_capped() {
        assert_eq!(Budget::cost(100, 200), (100, 200));
        assert_eq!(Budget::cost(u64::MAX, 5), (MAX_CHARGE, 0));
        assert_eq!(Budget::cost(10, u64::MAX), (10, MAX_CHARGE - 10));
    }

    #[test]
    fn counts_and_bytes_are_both_bounded_and_given_back() {
        let b = Budget::with_limits(2, 1000);
        let c1 = b.try_acquire(100, 300).unwrap();
        let mut c2 = b.try_acquire(100, 100).unwrap();
        assert_eq!(b.in_flight(), (2, 600));
        // Count exhausted.
        assert!(b.try_acquire(1, 1).is_none());
        drop(c1);
        // Bytes: 200 charged, 800 free.
        assert!(b.try_acquire(500, 400).is_none());
        c2.release_sealed();
        assert_eq!(b.in_flight(), (1, 100));
        let c3 = b.try_acquire(500, 400).unwrap();
        assert_eq!(c3.bytes(), 900);
        drop(c2);
        drop(c3);
        assert_eq!(b.in_flight(), (0, 0));
        // Everything is back.
        let _all = b.try_acquire(600, 400).unwrap();
    }

    #[tokio::test]
    async fn a_waiting_acquire_completes_when_a_charge_is_dropped() {
        let b = Budget::with_limits(1, 1000);
        let c = b.try_acquire(10, 10).unwrap();
        let b2 = Arc::clone(&b);
        let waiter = tokio::spawn(async move { b2.acquire(10, 10).await.bytes() });
        // The waiter cannot complete while `c` is held.
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(c);
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("acquire did not complete")
            .unwrap();
        assert_eq!(got, 20);
        assert_eq!(b.in_flight(), (0, 0));
    }

    #[tokio::test]
    async fn a_cancelled_acquire_takes_nothing() {
        let b = Budget::with_limits(4, 100);
        let held = b.try_acquire(60, 0).unwrap();
        let b2 = Arc::clone(&b);
        // Needs 50 bytes, only 40 free: waits holding nothing, then is aborted.
        let waiter = tokio::spawn(async move { b2.acquire(50, 0).await });
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(b.in_flight(), (1, 60));
        drop(held);
        assert_eq!(b.in_flight(), (0, 0));
        // All 100 bytes and 4 frames are free again.
        let _c = b.try_acquire(100, 0).unwrap();
        let _d: Vec<Charge> = (0..3).map(|_| b.try_acquire(0, 0).unwrap()).collect();
        assert!(b.try_acquire(0, 0).is_none());
    }
}
