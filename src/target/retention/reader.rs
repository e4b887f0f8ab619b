//! Reading a disk as it was at a retained recovery point, while the target
//! may keep applying: the replica's current bytes, overlaid with the
//! before-images of every block overwritten since the point.
//!
//! For a point beginning epoch *e*, the content of block *b* at the point is
//! the before-image of *b* in the earliest epoch ≥ *e* that preserved it, or,
//! if no epoch since has preserved it, the replica's current content. The
//! target makes a before-image durable (and visible: it is written to the
//! journal file) before it overwrites the block, so a reader that reads the
//! replica *first* and then catches up with the journal ([`Overlay::refresh`])
//! always sees the before-image of a block overwritten under it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::journal::{self, BLOCK, JournalError, Loc, PointRec, RecordHead, Scanner};
use super::pins::Granted;

/// Where one block's before-image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    seg: u64,
    data_pos: u64,
    /// Disk offset and length of the whole record the block is in.
    rec_offset: u64,
    rec_len: u32,
    crc: u32,
    zero: bool,
}

/// The before-images since a point, indexed by (disk, block).
#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    start_epoch: u64,
    point: PointRec,
    scanner: Scanner,
    index: HashMap<(u16, u64), Slot>,
    cache: Option<((u64, u64), Vec<u8>)>,
}

impl Overlay {
    /// The overlay for the point `g` granted by the target, of the journal in
    /// `dir` (group `group`). Checks that the point record is where the grant
    /// says, then indexes every record after it.
    pub fn new(dir: &Path, group: &str, g: &Granted) -> Result<Overlay, JournalError> {
        let mut scanner = Scanner::new(dir, group, g.loc());
        let first = scanner.next_record()?;
        let point = match first.map(|s| s.head) {
            Some(RecordHead::Point(p)) if p.epoch == g.epoch && p.frame_no == g.frame_no => p,
            other => {
                return Err(JournalError::Corrupt {
                    path: dir.join(journal::segment_name(g.seg)),
                    offset: g.pos,
                    what: format!(
                        "expected the point record of epoch {} (frame {}), found {other:?}",
                        g.epoch, g.frame_no
                    ),
                });
            }
        };
        let mut o = Overlay {
            dir: dir.to_path_buf(),
            start_epoch: g.epoch,
            point,
            scanner,
            index: HashMap::new(),
            cache: None,
        };
        o.refresh()?;
        Ok(o)
    }

    /// The point this overlay rebuilds.
    pub fn point(&self) -> &PointRec {
        &self.point
    }

    /// Where the overlay has read the journal up to.
    pub fn position(&self) -> Loc {
        self.scanner.position()
    }

    /// Blocks with a before-image (for every disk).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no block has changed since the point.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Index the records appended since the last call (first image of a
    /// block wins: it is the one from the earliest epoch).
    pub fn refresh(&mut self) -> Result<(), JournalError> {
        while let Some(r) = self.scanner.next_record()? {
            if let RecordHead::Image {
                epoch,
                disk,
                offset,
                len,
                zero,
                data_crc,
            } = r.head
            {
                if epoch < self.start_epoch {
                    continue;
                }
                let slot = Slot {
                    seg: r.loc.seg,
                    data_pos: r.data_pos,
                    rec_offset: offset,
                    rec_len: len,
                    crc: data_crc,
                    zero,
                };
                let b0 = offset / BLOCK;
                let b1 = (offset + u64::from(len)).div_ceil(BLOCK);
                for b in b0..b1 {
                    self.index.entry((disk, b)).or_insert(slot);
                }
            }
        }
        Ok(())
    }

    /// Replace, in `buf` (the replica's bytes of `disk` at `offset`, read
    /// *before* this call), every block that changed since the point with
    /// its before-image. Catches up with the journal first.
    pub fn apply(&mut self, disk: u16, offset: u64, buf: &mut [u8]) -> Result<(), JournalError> {
        self.refresh()?;
        if self.index.is_empty() || buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut b = offset / BLOCK;
        while b * BLOCK < end {
            if let Some(slot) = self.index.get(&(disk, b)).copied() {
                let bstart = b * BLOCK;
                // The part of the block inside the record and inside buf.
                let lo = bstart.max(offset).max(slot.rec_offset);
                let hi = (bstart + BLOCK)
                    .min(end)
                    .min(slot.rec_offset + u64::from(slot.rec_len));
                if lo < hi {
                    let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
                    if slot.zero {
                        dst.fill(0);
                    } else {
                        let data = self.record(&slot)?;
                        let s = (lo - slot.rec_offset) as usize;
                        dst.copy_from_slice(&data[s..s + dst.len()]);
                    }
                }
            }
            b += 1;
        }
        Ok(())
    }

    fn record(&mut self, slot: &Slot) -> Result<&[u8], JournalError> {
        let key = (slot.seg, slot.data_pos);
        if self.cache.as_ref().is_none_or(|(k, _)| *k != key) {
            let mut data = vec![0u8; slot.rec_len as usize];
            journal::read_image(&self.dir, slot.seg, slot.data_pos, slot.crc, &mut data)?;
            self.cache = Some((key, data));
        }
        Ok(self.cache.as_ref().map_or(&[][..], |(_, d)| d.as_slice()))
    }

    /// True when some block of `disk` in `offset..offset+len` changed since
    /// the point (as far as the journal has been read).
    pub fn changed_in(&self, disk: u16, offset: u64, len: u64) -> bool {
        if self.index.is_empty() || len == 0 {
            return false;
        }
        let b0 = offset / BLOCK;
        let b1 = (offset + len).div_ceil(BLOCK);
        if b1 - b0 > self.index.len() as u64 {
            return self
                .index
                .keys()
                .any(|(d, b)| *d == disk && (b0..b1).contains(b));
        }
        (b0..b1).any(|b| self.index.contains_key(&(disk, b)))
    }

    /// Every (offset, length) of `disk` that has a before-image, in block
    /// runs, ascending (what `promote` writes back).
    pub fn changed_ranges(&self, disk: u16) -> Vec<(u64, u64)> {
        let mut blocks: Vec<u64> = self
            .index
            .keys()
            .filter(|(d, _)| *d == disk)
            .map(|(_, b)| *b)
            .collect();
        blocks.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in blocks {
            match out.last_mut() {
                Some((o, l)) if *o + *l == b * BLOCK => *l += BLOCK,
                _ => out.push((b * BLOCK, BLOCK)),
            }
        }
        out
    }
}
