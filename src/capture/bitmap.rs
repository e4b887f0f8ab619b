//! Region bitmaps: one bit per fixed-size region of a disk, with pages allocated
//! on first use, so memory follows the dirty area rather than the disk size.
//!
//! The granularity rule ([`Granularity::for_disk`]): 4 KiB regions for disks up
//! to 512 GiB (at most 2^27 bits, 16 MiB of bitmap when every page is touched);
//! above that the smallest power-of-two region size that keeps the bitmap at
//! 2^27 bits.

/// Bits per page (one 4 KiB page of bitmap).
pub const PAGE_BITS: u64 = 4096 * 8;
const WORDS: usize = (PAGE_BITS / 64) as usize;
/// Largest bitmap in bits; the granularity grows to stay within it.
pub const MAX_BITS: u64 = 1 << 27;
/// Smallest region size (log2): 4 KiB.
pub const MIN_SHIFT: u32 = 12;

/// Region size of a bitmap, as a power of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granularity {
    /// log2 of the region size in bytes.
    pub shift: u32,
}

impl Granularity {
    /// The rule: 4 KiB up to 512 GiB, coarser above so that the bitmap has at
    /// most [`MAX_BITS`] bits.
    pub fn for_disk(size: u64) -> Self {
        let mut shift = MIN_SHIFT;
        while size.div_ceil(1u64 << shift) > MAX_BITS {
            shift += 1;
        }
        Granularity { shift }
    }

    /// Region size in bytes.
    pub fn bytes(self) -> u64 {
        1 << self.shift
    }

    /// Number of regions of a disk of `size` bytes.
    pub fn regions(self, size: u64) -> u64 {
        size.div_ceil(self.bytes())
    }

    /// The regions `first..end` that the byte range `offset..offset+len` touches
    /// (`len > 0`).
    pub fn span(self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset >> self.shift;
        let last = (offset + len.max(1) - 1) >> self.shift;
        (first, last + 1)
    }
}

type Page = Box<[u64; WORDS]>;

/// A bitmap of `len` bits with lazily allocated pages; a page whose last bit is
/// cleared is freed again.
#[derive(Debug, Clone, Default)]
pub struct RegionBitmap {
    len: u64,
    pages: Vec<Option<Page>>,
    /// Set bits per page.
    counts: Vec<u32>,
    ones: u64,
}

impl RegionBitmap {
    /// An empty bitmap of `len` bits.
    pub fn new(len: u64) -> Self {
        let n = len.div_ceil(PAGE_BITS) as usize;
        RegionBitmap {
            len,
            pages: vec![None; n],
            counts: vec![0; n],
            ones: 0,
        }
    }

    /// Lengthen to `len` bits (never shorter); the new bits are clear.
    pub fn grow(&mut self, len: u64) {
        if len <= self.len {
            return;
        }
        let n = len.div_ceil(PAGE_BITS) as usize;
        self.pages.resize(n, None);
        self.counts.resize(n, 0);
        self.len = len;
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.ones
    }

    /// True when no bit is set.
    pub fn is_empty(&self) -> bool {
        self.ones == 0
    }

    /// Bytes of heap the allocated pages take.
    pub fn memory_bytes(&self) -> usize {
        self.pages.iter().flatten().count() * WORDS * 8
            + self.pages.len() * (std::mem::size_of::<Option<Page>>() + 4)
    }

    /// Whether bit `i` is set (false beyond the end).
    pub fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let (p, w, b) = split(i);
        self.pages[p].as_ref().is_some_and(|pg| pg[w] >> b & 1 == 1)
    }

    /// Set bits `start..end` (clamped to the length); returns how many were newly
    /// set.
    pub fn set_range(&mut self, start: u64, end: u64) -> u64 {
        let end = end.min(self.len);
        let mut added = 0;
        let mut i = start;
        while i < end {
            let (p, w, b) = split(i);
            let n = (64 - b as u64).min(end - i);
            let mask = run_mask(b, n);
            let page = self.pages[p].get_or_insert_with(|| Box::new([0u64; WORDS]));
            let new = (mask & !page[w]).count_ones();
            page[w] |= mask;
            self.counts[p] += new;
            added += u64::from(new);
            i += n;
        }
        self.ones += added;
        added
    }

    /// Clear bits `start..end` (clamped); returns how many were cleared.
    pub fn clear_range(&mut self, start: u64, end: u64) -> u64 {
        let end = end.min(self.len);
        let mut removed = 0;
        let mut i = start;
        while i < end {
            let (p, w, b) = split(i);
            if self.pages[p].is_none() {
                // Skip to the next page.
                i = (p as u64 + 1) * PAGE_BITS;
                continue;
            }
            let n = (64 - b as u64).min(end - i);
            let mask = run_mask(b, n);
            let page = self.pages[p].as_mut().expect("checked above");
            let gone = (mask & page[w]).count_ones();
            page[w] &= !mask;
            self.counts[p] -= gone;
            removed += u64::from(gone);
            if self.counts[p] == 0 {
                self.pages[p] = None;
            }
            i += n;
        }
        self.ones -= removed;
        removed
    }

    /// Clear every bit.
    pub fn clear(&mut self) {
        self.pages.iter_mut().for_each(|p| *p = None);
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.ones = 0;
    }

    /// Set every bit that is set in `other` (same length).
    pub fn union_with(&mut self, other: &RegionBitmap) {
        debug_assert_eq!(self.len, other.len);
        for (p, op) in other.pages.iter().enumerate() {
            let Some(op) = op else { continue };
            if p >= self.pages.len() {
                break;
            }
            let page = self.pages[p].get_or_insert_with(|| Box::new([0u64; WORDS]));
            let mut c = 0;
            for (w, ow) in page.iter_mut().zip(op.iter()) {
                *w |= *ow;
                c += w.count_ones();
            }
            self.ones += u64::from(c - self.counts[p]);
            self.counts[p] = c;
        }
    }

    /// Number of bits set in `self` or in `other` (same length), without building
    /// the union.
    pub fn union_count(&self, other: &RegionBitmap) -> u64 {
        let mut n = 0u64;
        for (a, b) in self.pages.iter().zip(&other.pages) {
            n += match (a, b) {
                (None, None) => 0,
                (Some(p), None) | (None, Some(p)) => {
                    p.iter().map(|w| u64::from(w.count_ones())).sum()
                }
                (Some(p), Some(q)) => p
                    .iter()
                    .zip(q.iter())
                    .map(|(x, y)| u64::from((x | y).count_ones()))
                    .sum(),
            };
        }
        n
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let (p, w, b) = split(i);
            let Some(page) = &self.pages[p] else {
                i = (p as u64 + 1) * PAGE_BITS;
                continue;
            };
            let word = page[w] >> b;
            if word != 0 {
                let at = i + u64::from(word.trailing_zeros());
                return (at < self.len).then_some(at);
            }
            i += 64 - b as u64;
        }
        None
    }

    /// The first run of set bits at or after `from`, at most `max` bits long:
    /// `(start, end)`.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let start = self.next_set(from)?;
        let mut end = start + 1;
        let limit = start.saturating_add(max.max(1)).min(self.len);
        while end < limit && self.get(end) {
            end += 1;
        }
        Some((start, end))
    }

    /// Allocated pages as `(page index, words)`, in order (for persistence).
    pub fn pages(&self) -> impl Iterator<Item = (u32, &[u64; WORDS])> {
        self.pages
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i as u32, &**p)))
    }

    /// OR a persisted page into the bitmap; bits beyond the length are ignored.
    /// Returns false when `index` is out of range.
    pub fn or_page(&mut self, index: u32, words: &[u64; WORDS]) -> bool {
        let p = index as usize;
        if p >= self.pages.len() {
            return false;
        }
        let base = p as u64 * PAGE_BITS;
        for (w, &word) in words.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let b = u64::from(word.trailing_zeros());
                word &= word - 1;
                let bit = base + w as u64 * 64 + b;
                if bit < self.len {
                    self.set_range(bit, bit + 1);
                }
            }
        }
        true
    }
}

fn split(i: u64) -> (usize, usize, u32) {
    let p = (i / PAGE_BITS) as usize;
    let r = i % PAGE_BITS;
    (p, (r / 64) as usize, (r % 64) as u32)
}

fn run_mask(b: u32, n: u64) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        ((1u64 << n) - 1) << b
    }
}

/// Words in one page (for persistence code).
pub const PAGE_WORDS: usize = WORDS;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn granularity_rule() {
        assert_eq!(Granularity::for_disk(1 << 30).shift, 12);
        assert_eq!(Granularity::for_disk(512 << 30).shift, 12);
        assert_eq!(Granularity::for_disk((512 << 30) + 1).shift, 13);
        assert_eq!(Granularity::for_disk(4 << 40).shift, 15);
        let g = Granularity { shift: 12 };
        assert_eq!(g.span(0, 4096), (0, 1));
        assert_eq!(g.span(4095, 2), (0, 2));
        assert_eq!(g.span(8192, 1), (2, 3));
        assert_eq!(g.regions(4097), 2);
    }

    #[test]
    fn set_clear_runs_and_page_freeing() {
        let mut b = RegionBitmap::new(100_000);
        assert_eq!(b.set_range(10, 200), 190);
        assert_eq!(b.set_range(150, 250), 50);
        assert_eq!(b.count(), 240);
        assert_eq!(b.next_run(0, 1000), Some((10, 250)));
        assert_eq!(b.next_run(0, 16), Some((10, 26)));
        assert_eq!(b.next_set(250), None);
        b.set_range(99_990, 200_000);
        assert_eq!(b.count(), 250);
        assert_eq!(b.next_set(251), Some(99_990));
        assert_eq!(b.clear_range(0, 100_000), 250);
        assert!(b.is_empty());
        assert_eq!(b.pages().count(), 0, "empty pages are freed");
    }

    #[test]
    fn growing_keeps_the_bits_and_adds_clear_ones() {
        let mut b = RegionBitmap::new(100);
        b.set_range(90, 100);
        b.grow(50);
        assert_eq!(b.len(), 100, "never shorter");
        b.grow(100_000);
        assert_eq!((b.len(), b.count()), (100_000, 10));
        assert!(b.get(99) && !b.get(100) && !b.get(99_999));
        assert_eq!(b.set_range(99_000, 100_000), 1000);
        assert_eq!(b.next_run(0, u64::MAX), Some((90, 100)));
    }

    #[test]
    fn union_and_page_round_trip() {
        let mut a = RegionBitmap::new(70_000);
        let mut b = RegionBitmap::new(70_000);
        a.set_range(0, 10);
        b.set_range(5, 40_000);
        assert_eq!(a.union_count(&b), 40_000);
        a.union_with(&b);
        assert_eq!(a.count(), 40_000);
        let mut c = RegionBitmap::new(70_000);
        for (i, p) in a.pages() {
            assert!(c.or_page(i, p));
        }
        assert_eq!(c.count(), a.count());
        assert!(!c.or_page(99, &[0; WORDS]));
    }

    proptest! {
        #[test]
        fn matches_a_plain_bool_vector(ops in proptest::collection::vec((any::<bool>(), 0u64..3000, 0u64..400), 1..60)) {
            let len = 2500u64;
            let mut b = RegionBitmap::new(len);
            let mut v = vec![false; len as usize];
            for (set, start, n) in ops {
                let end = (start + n).min(len);
                let start = start.min(len);
                let changed = if set { b.set_range(start, end) } else { b.clear_range(start, end) };
                let mut want = 0;
                for x in &mut v[start as usize..end as usize] {
                    if *x != set { want += 1; }
                    *x = set;
                }
                prop_assert_eq!(changed, want);
            }
            prop_assert_eq!(b.count(), v.iter().filter(|&&x| x).count() as u64);
            for (i, &x) in v.iter().enumerate() {
                prop_assert_eq!(b.get(i as u64), x);
            }
            let first = v.iter().position(|&x| x).map(|i| i as u64);
            prop_assert_eq!(b.next_set(0), first);
        }
    }
}
