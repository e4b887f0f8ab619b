//! Range locks of a protected disk, with a write generation per stripe.
//!
//! A fixed set of mutexes, one per 1 MiB stripe of the disk (modulo the set):
//! a write holds the stripes of its range from the moment it touches the disk
//! until capture recorded it, and a copy or digest read holds them while it
//! reads (and, for a copy, records). Every write also bumps the generation of
//! its stripes before it touches the disk. A read done *outside* the locks,
//! ahead of its turn, takes the range's [`RangeLock::stamp`] under the locks
//! first; when its turn comes, under the locks again, an unchanged stamp
//! proves that no write touched the range in between, so the bytes read ahead
//! are the bytes a read now would return.

use std::sync::atomic::{AtomicU64, Ordering as AO};
use std::sync::{Mutex, MutexGuard};

/// Number of stripe locks.
const STRIPES: usize = 1024;
/// log2 of the stripe size (1 MiB).
const STRIPE_SHIFT: u32 = 20;

/// The range locks of one disk.
pub(crate) struct Stripes {
    locks: Box<[Mutex<()>]>,
    /// Per stripe, how many writes have locked it. Changed and read only under
    /// the stripe's lock, so relaxed atomics suffice (the mutex orders them).
    gens: Box<[AtomicU64]>,
}

/// The stripes of one range, locked; released on drop.
pub(crate) struct RangeLock<'a> {
    stripes: &'a Stripes,
    idx: Vec<usize>,
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl Stripes {
    pub(crate) fn new() -> Self {
        Stripes {
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            gens: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Lock every stripe `offset..offset+len` touches, in index order (so two
    /// ranges locked by two threads cannot deadlock).
    pub(crate) fn lock(&self, offset: u64, len: u64) -> RangeLock<'_> {
        let first = offset >> STRIPE_SHIFT;
        let last = (offset + len.max(1) - 1) >> STRIPE_SHIFT;
        let idx: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            let mut idx: Vec<usize> = (first..=last)
                .map(|s| (s % STRIPES as u64) as usize)
                .collect();
            idx.sort_unstable();
            idx.dedup();
            idx
        };
        let guards = idx
            .iter()
            .map(|&i| self.locks[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        RangeLock {
            stripes: self,
            idx,
            _guards: guards,
        }
    }
}

impl RangeLock<'_> {
    /// Record that the range's content is about to change. Writers call it
    /// before they touch the disk, while they hold the locks.
    pub(crate) fn bump(&self) {
        for &i in &self.idx {
            self.stripes.gens[i].fetch_add(1, AO::Relaxed);
        }
    }

    /// A value that changes whenever a writer [`bump`](Self::bump)s any of
    /// the range's stripes: the sum of their generations, each of which only
    /// grows.
    pub(crate) fn stamp(&self) -> u64 {
        self.idx.iter().fold(0u64, |s, &i| {
            s.wrapping_add(self.stripes.gens[i].load(AO::Relaxed))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_write_anywhere_in_the_range_changes_its_stamp_and_others_do_not() {
        let s = Stripes::new();
        let before = s.lock(4 * MIB, 4 * MIB).stamp();
        s.lock(100 * MIB, 4096).bump();
        assert_eq!(s.lock(4 * MIB, 4 * MIB).stamp(), before, "elsewhere");
        s.lock(7 * MIB + 4096, 4096).bump();
        assert_ne!(s.lock(4 * MIB, 4 * MIB).stamp(), before, "inside");
        // A write straddling the range's start.
        let before = s.lock(4 * MIB, 4 * MIB).stamp();
        s.lock(4 * MIB - 4096, 8192).bump();
        assert_ne!(s.lock(4 * MIB, 4 * MIB).stamp(), before, "straddling");
    }

    #[test]
    fn a_range_wider_than_the_set_locks_every_stripe_once() {
        let s = Stripes::new();
        let l = s.lock(0, (STRIPES as u64 + 5) * MIB);
        assert_eq!(l.idx.len(), STRIPES);
        drop(l);
        // Wraps modulo the set: stripes 1023 and 1024 (= 0) are distinct locks.
        let l = s.lock((STRIPES as u64 - 1) * MIB, 2 * MIB);
        assert_eq!(l.idx, vec![0, STRIPES - 1]);
    }
}
