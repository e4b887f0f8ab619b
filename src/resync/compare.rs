//! Comparing digests, and the persisted plan of a resync.
//!
//! [`diff`] turns two digest lists into the runs of blocks that differ.
//! [`ResyncPlan`] cuts the regions to resync into chunks (one
//! [`DigestChunk`](super::DigestChunk) each); [`ResyncProgress`] tracks which
//! chunks are done and persists that to a small file, so an interrupted resync
//! resumes instead of restarting. File layout in docs/RESYNC.md, "Progress file v1".

use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::digest::{BlockDigest, BlockSize};
use super::wire::MAX_CHUNK_BLOCKS;
use crate::error::{Classify, ErrorKind};

/// Why two digest lists cannot be compared.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiffError {
    /// The lists cover different numbers of blocks.
    #[error("cannot compare {source_len} source digests with {target_len} target digests")]
    LengthMismatch {
        /// Source digests.
        source_len: usize,
        /// Target digests.
        target_len: usize,
    },
    /// `first_block` + the length overflows a u64.
    #[error("blocks from {first_block} (+{len}) overflow a 64-bit block number")]
    Overflow {
        /// First block.
        first_block: u64,
        /// Digests.
        len: usize,
    },
}

impl Classify for DiffError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Corrupt
    }
}

/// The blocks whose digests differ (by [`BlockDigest::same_data`]: Absent =
/// Zero), as sorted, disjoint, merged runs of absolute block numbers; digest
/// `i` of both lists is block `first_block + i`.
pub fn diff(
    first_block: u64,
    source: &[BlockDigest],
    target: &[BlockDigest],
) -> Result<Vec<Range<u64>>, DiffError> {
    if source.len() != target.len() {
        return Err(DiffError::LengthMismatch {
            source_len: source.len(),
            target_len: target.len(),
        });
    }
    if first_block.checked_add(source.len() as u64).is_none() {
        return Err(DiffError::Overflow {
            first_block,
            len: source.len(),
        });
    }
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, (s, t)) in source.iter().zip(target).enumerate() {
        if s.same_data(t) {
            continue;
        }
        let b = first_block + i as u64;
        match out.last_mut() {
            Some(r) if r.end == b => r.end = b + 1,
            _ => out.push(b..b + 1),
        }
    }
    Ok(out)
}

/// One chunk of a [`ResyncPlan`]: `count` consecutive blocks inside one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    /// Index in the plan (0-based, in block order).
    pub index: u64,
    /// First block.
    pub first_block: u64,
    /// Number of blocks, 1 to the plan's `chunk_blocks`.
    pub count: u32,
}

impl Chunk {
    /// The chunk's blocks.
    pub fn blocks(&self) -> Range<u64> {
        self.first_block..self.first_block + u64::from(self.count)
    }
}

/// What to resync on one disk: regions of blocks, cut into chunks of at most
/// `chunk_blocks` blocks (a chunk never spans two regions). Regions are
/// normalized (sorted, overlapping or touching ones merged, empty ones
/// dropped), so the same set of blocks always gives the same plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncPlan {
    disk: u16,
    disk_size: u64,
    block_size: BlockSize,
    chunk_blocks: u32,
    regions: Vec<Range<u64>>,
    /// Index of the first chunk of each region.
    chunk_starts: Vec<u64>,
    chunk_count: u64,
}

impl ResyncPlan {
    /// The plan for `regions` (block ranges) of disk `disk` of `disk_size`
    /// bytes; `chunk_blocks` from 1 to [`MAX_CHUNK_BLOCKS`]. Every region must
    /// lie inside the disk.
    pub fn new(
        disk: u16,
        disk_size: u64,
        block_size: BlockSize,
        regions: &[Range<u64>],
        chunk_blocks: u32,
    ) -> Result<ResyncPlan, ProgressError> {
        if chunk_blocks == 0 || chunk_blocks > MAX_CHUNK_BLOCKS {
            return Err(ProgressError::BadChunkBlocks { chunk_blocks });
        }
        let disk_blocks = block_size.blocks_for(disk_size);
        let mut sorted: Vec<Range<u64>> = Vec::with_capacity(regions.len());
        for r in regions {
            if r.end > disk_blocks {
                return Err(ProgressError::RegionOutsideDisk {
                    start: r.start,
                    end: r.end,
                    disk_blocks,
                });
            }
            if r.start < r.end {
                sorted.push(r.clone());
            }
        }
        sorted.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let mut chunk_starts = Vec::with_capacity(merged.len());
        let mut chunk_count = 0u64;
        for r in &merged {
            chunk_starts.push(chunk_count);
            chunk_count += (r.end - r.start).div_ceil(u64::from(chunk_blocks));
        }
        // Bound the memory and the file: the done bitmap and the regions
        // must fit a progress file that `load` accepts.
        let file_len = (PROGRESS_HEADER_LEN as u64 + 4)
            .saturating_add((merged.len() as u64).saturating_mul(16))
            .saturating_add(chunk_count.div_ceil(64).saturating_mul(8));
        if file_len > MAX_PROGRESS_FILE {
            return Err(ProgressError::PlanTooLarge {
                regions: merged.len() as u64,
                chunks: chunk_count,
            });
        }
        Ok(ResyncPlan {
            disk,
            disk_size,
            block_size,
            chunk_blocks,
            regions: merged,
            chunk_starts,
            chunk_count,
        })
    }

    /// Disk id within the group.
    pub fn disk(&self) -> u16 {
        self.disk
    }
    /// Disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }
    /// Block size.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }
    /// Most blocks per chunk.
    pub fn chunk_blocks(&self) -> u32 {
        self.chunk_blocks
    }
    /// The normalized regions.
    pub fn regions(&self) -> &[Range<u64>] {
        &self.regions
    }
    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.chunk_count
    }
    /// Number of blocks in all regions.
    pub fn block_count(&self) -> u64 {
        self.regions.iter().map(|r| r.end - r.start).sum()
    }

    /// Chunk `index`, or `None` past the last chunk.
    pub fn chunk(&self, index: u64) -> Option<Chunk> {
        if index >= self.chunk_count {
            return None;
        }
        let r = self.chunk_starts.partition_point(|&s| s <= index) - 1;
        let region = &self.regions[r];
        let first_block =
            region.start + (index - self.chunk_starts[r]) * u64::from(self.chunk_blocks);
        // At most chunk_blocks, a u32.
        let count = (region.end - first_block).min(u64::from(self.chunk_blocks)) as u32;
        Some(Chunk {
            index,
            first_block,
            count,
        })
    }
}

/// Errors of [`ResyncPlan`] and [`ResyncProgress`].
#[derive(Debug, Error)]
pub enum ProgressError {
    /// `chunk_blocks` outside 1 to [`MAX_CHUNK_BLOCKS`].
    #[error("chunk_blocks {chunk_blocks} must be 1 to {max}", max = MAX_CHUNK_BLOCKS)]
    BadChunkBlocks {
        /// The refused value.
        chunk_blocks: u32,
    },
    /// A region ends past the disk.
    #[error("region of blocks {start}..{end} ends past the disk's {disk_blocks} blocks")]
    RegionOutsideDisk {
        /// Region start.
        start: u64,
        /// Region end.
        end: u64,
        /// Blocks of the disk.
        disk_blocks: u64,
    },
    /// The plan has too many regions or chunks for a progress file of at most
    /// [`MAX_PROGRESS_FILE`] bytes (use larger chunks, or merge regions).
    #[error("a plan of {regions} regions and {chunks} chunks is too large for a progress file")]
    PlanTooLarge {
        /// Regions after merging.
        regions: u64,
        /// Chunks.
        chunks: u64,
    },
    /// `mark_done` of a chunk the plan does not have.
    #[error("chunk {index} does not exist (the plan has {chunks} chunks)")]
    NoSuchChunk {
        /// The index given.
        index: u64,
        /// Chunks of the plan.
        chunks: u64,
    },
    /// Reading or writing the progress file failed.
    #[error("resync progress {path}: {what}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// The file is not an intact progress file: nothing of it is used.
    #[error("resync progress {path}: corrupt: {field} at byte {offset}: {why}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// The field at fault.
        field: &'static str,
        /// Its byte offset.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The file is intact but belongs to another plan: nothing of it is used.
    #[error(
        "resync progress {path}: for another plan: {field} is {found} in the file, {expected} now"
    )]
    Mismatch {
        /// File.
        path: PathBuf,
        /// The field that differs.
        field: &'static str,
        /// Its value in the file.
        found: String,
        /// Its value in the plan.
        expected: String,
    },
}

impl ProgressError {
    /// True when loading failed because there is no progress file (a fresh
    /// start, not a problem to report).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ProgressError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

impl Classify for ProgressError {
    fn kind(&self) -> ErrorKind {
        match self {
            ProgressError::Io { .. } => ErrorKind::Io,
            ProgressError::Corrupt { .. } | ProgressError::Mismatch { .. } => ErrorKind::Corrupt,
            ProgressError::BadChunkBlocks { .. }
            | ProgressError::RegionOutsideDisk { .. }
            | ProgressError::PlanTooLarge { .. }
            | ProgressError::NoSuchChunk { .. } => ErrorKind::Config,
        }
    }
}

/// Progress file magic, `b"TMRP"`.
pub const PROGRESS_MAGIC: [u8; 4] = *b"TMRP";
/// Progress file version this build reads and writes.
pub const PROGRESS_VERSION: u16 = 1;
/// Bytes of the progress file header (before the regions).
pub const PROGRESS_HEADER_LEN: usize = 48;
/// Largest progress file [`ResyncProgress::load`] reads (64 MiB: a plan of
/// millions of regions or chunks still fits).
pub const MAX_PROGRESS_FILE: u64 = 64 << 20;

/// A [`ResyncPlan`] and which of its chunks are done.
///
/// [`ResyncProgress::next_chunk`] hands out the chunks not yet done, in
/// order, each once per session (so several can be in flight);
/// [`ResyncProgress::rewind`] hands the unfinished ones out again (e.g. after
/// a reconnect). [`ResyncProgress::save`] persists what is done; after a
/// restart, [`ResyncProgress::load`] resumes from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncProgress {
    plan: ResyncPlan,
    /// Bit `i % 64` of word `i / 64`: chunk `i` is done.
    done: Vec<u64>,
    done_count: u64,
    /// The next chunk `next_chunk` looks at.
    cursor: u64,
}

impl ResyncProgress {
    /// A fresh start: no chunk done.
    pub fn new(plan: ResyncPlan) -> ResyncProgress {
        let words = plan.chunk_count.div_ceil(64) as usize;
        ResyncProgress {
            plan,
            done: vec![0; words],
            done_count: 0,
            cursor: 0,
        }
    }

    /// The plan.
    pub fn plan(&self) -> &ResyncPlan {
        &self.plan
    }

    /// The next chunk that is not done and was not handed out since the start
    /// (or the last [`ResyncProgress::rewind`]), in block order.
    pub fn next_chunk(&mut self) -> Option<Chunk> {
        let n = self.plan.chunk_count;
        let mut i = self.cursor;
        while i < n {
            let word = self.done[(i / 64) as usize] | ((1u64 << (i % 64)) - 1);
            if word == u64::MAX {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i = (i / 64) * 64 + u64::from(word.trailing_ones());
            break;
        }
        if i >= n {
            self.cursor = n;
            return None;
        }
        self.cursor = i + 1;
        self.plan.chunk(i)
    }

    /// Hand out every chunk not done again, from the first.
    pub fn rewind(&mut self) {
        self.cursor = 0;
    }

    /// Record chunk `index` as done; true if it was not already.
    pub fn mark_done(&mut self, index: u64) -> Result<bool, ProgressError> {
        if index >= self.plan.chunk_count {
            return Err(ProgressError::NoSuchChunk {
                index,
                chunks: self.plan.chunk_count,
            });
        }
        let (w, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        let fresh = self.done[w] & bit == 0;
        self.done[w] |= bit;
        self.done_count += u64::from(fresh);
        Ok(fresh)
    }

    /// True when chunk `index` is done.
    pub fn is_chunk_done(&self, index: u64) -> bool {
        index < self.plan.chunk_count && self.done[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// True when every chunk is done.
    pub fn is_done(&self) -> bool {
        self.done_count == self.plan.chunk_count
    }

    /// Number of chunks done.
    pub fn done_chunks(&self) -> u64 {
        self.done_count
    }

    /// The file bytes (version 1, see docs/RESYNC.md).
    pub fn encode(&self) -> Vec<u8> {
        let p = &self.plan;
        let mut b = Vec::with_capacity(
            PROGRESS_HEADER_LEN + 16 * p.regions.len() + 8 * self.done.len() + 4,
        );
        b.extend_from_slice(&PROGRESS_MAGIC);
        b.extend_from_slice(&PROGRESS_VERSION.to_le_bytes());
        b.extend_from_slice(&p.disk.to_le_bytes());
        b.extend_from_slice(&p.disk_size.to_le_bytes());
        b.extend_from_slice(&p.block_size.bytes().to_le_bytes());
        b.extend_from_slice(&p.chunk_blocks.to_le_bytes());
        b.extend_from_slice(&(p.regions.len() as u64).to_le_bytes());
        b.extend_from_slice(&p.chunk_count.to_le_bytes());
        b.extend_from_slice(&self.done_count.to_le_bytes());
        for r in &p.regions {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.end.to_le_bytes());
        }
        for w in &self.done {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Persist to `path`: write `<path>.tmp`, fsync it, rename it over `path`,
    /// fsync the directory. A crash leaves the old file or the new one, whole.
    pub fn save(&self, path: &Path) -> Result<(), ProgressError> {
        let io = |what, source| ProgressError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let mut f = File::create(&tmp).map_err(|e| io("creating the temporary file", e))?;
        f.write_all(&self.encode())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("writing the temporary file", e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| io("renaming the temporary file", e))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the directory", e))
    }

    /// Load the progress of `plan` from `path`. The file must be intact (a
    /// [`ProgressError::Corrupt`] otherwise) and be for exactly this plan:
    /// disk, disk size, block size, chunk size and regions
    /// ([`ProgressError::Mismatch`] otherwise). On any error nothing of the
    /// file is used; the caller starts afresh with [`ResyncProgress::new`]. A
    /// missing file is an `Io` error with [`ProgressError::is_not_found`].
    pub fn load(path: &Path, plan: ResyncPlan) -> Result<ResyncProgress, ProgressError> {
        let io = |what, source| ProgressError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        let len = fs::metadata(path).map_err(|e| io("reading", e))?.len();
        let corrupt = |field, offset: usize, why: String| ProgressError::Corrupt {
            path: path.to_path_buf(),
            field,
            offset: offset as u64,
            why,
        };
        if len > MAX_PROGRESS_FILE {
            return Err(corrupt(
                "file",
                0,
                format!("{len} bytes, more than any plan needs"),
            ));
        }
        let b = fs::read(path).map_err(|e| io("reading", e))?;
        Self::decode(&b, plan)
            .map_err(|(field, offset, why)| corrupt(field, offset, why))?
            .map_err(|(field, found, expected)| ProgressError::Mismatch {
                path: path.to_path_buf(),
                field,
                found,
                expected,
            })
    }

    /// Decode file bytes for `plan`: Err = corrupt (field, offset, why);
    /// Ok(Err) = intact but another plan (field, found, expected).
    #[allow(clippy::type_complexity)]
    fn decode(
        b: &[u8],
        plan: ResyncPlan,
    ) -> Result<Result<ResyncProgress, (&'static str, String, String)>, (&'static str, usize, String)>
    {
        let u64_at = |o: usize| -> u64 {
            b.get(o..o + 8)
                .and_then(|s| s.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let u32_at = |o: usize| -> u32 {
            b.get(o..o + 4)
                .and_then(|s| s.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        let min = PROGRESS_HEADER_LEN + 4;
        if b.len() < min {
            return Err((
                "file",
                0,
                format!("{} bytes, a header needs {min}", b.len()),
            ));
        }
        if b[0..4] != PROGRESS_MAGIC {
            return Err(("magic", 0, format!("{:02x?}, expected \"TMRP\"", &b[0..4])));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROGRESS_VERSION {
            return Err(("version", 4, format!("{version}; this build reads 1")));
        }
        let region_count = u64_at(24);
        let chunk_count = u64_at(32);
        let want = region_count
            .checked_mul(16)
            .and_then(|r| r.checked_add(chunk_count.div_ceil(64).checked_mul(8)?))
            .and_then(|x| x.checked_add(min as u64));
        if want != Some(b.len() as u64) {
            return Err((
                "region_count",
                24,
                format!(
                    "{region_count} regions and {chunk_count} chunks do not fit a file of {} bytes",
                    b.len()
                ),
            ));
        }
        let crc_at = b.len() - 4;
        let (stored, computed) = (u32_at(crc_at), crc32c::crc32c(&b[..crc_at]));
        if stored != computed {
            return Err((
                "crc32c",
                crc_at,
                format!("{stored:08x}, computed {computed:08x}"),
            ));
        }
        let chunk_blocks = u32_at(20);
        let block_size = u32_at(16);
        let regions_at = PROGRESS_HEADER_LEN;
        let file_regions: Vec<Range<u64>> = (0..region_count as usize)
            .map(|i| u64_at(regions_at + 16 * i)..u64_at(regions_at + 16 * i + 8))
            .collect();
        // Intact: what differs from the plan is a mismatch.
        let checks: [(&'static str, String, String); 6] = [
            (
                "disk",
                u16::from_le_bytes([b[6], b[7]]).to_string(),
                plan.disk.to_string(),
            ),
            (
                "disk_size",
                u64_at(8).to_string(),
                plan.disk_size.to_string(),
            ),
            (
                "block_size",
                block_size.to_string(),
                plan.block_size.bytes().to_string(),
            ),
            (
                "chunk_blocks",
                chunk_blocks.to_string(),
                plan.chunk_blocks.to_string(),
            ),
            (
                "region_count",
                region_count.to_string(),
                plan.regions.len().to_string(),
            ),
            (
                "chunk_count",
                chunk_count.to_string(),
                plan.chunk_count.to_string(),
            ),
        ];
        for (field, found, expected) in checks {
            if found != expected {
                return Ok(Err((field, found, expected)));
            }
        }
        if let Some(i) = (0..file_regions.len()).find(|&i| file_regions[i] != plan.regions[i]) {
            return Ok(Err((
                "regions",
                format!("{:?} (region {i})", file_regions[i]),
                format!("{:?}", plan.regions[i]),
            )));
        }
        let bitmap_at = regions_at + 16 * file_regions.len();
        let done: Vec<u64> = (0..chunk_count.div_ceil(64) as usize)
            .map(|w| u64_at(bitmap_at + 8 * w))
            .collect();
        if chunk_count % 64 != 0 {
            let last = done.last().copied().unwrap_or(0);
            if last >> (chunk_count % 64) != 0 {
                return Err((
                    "done bitmap",
                    bitmap_at + 8 * (done.len() - 1),
                    format!("bits set past chunk {chunk_count}"),
                ));
            }
        }
        let done_count = u64_at(40);
        let counted: u64 = done.iter().map(|w| u64::from(w.count_ones())).sum();
        if counted != done_count {
            return Err((
                "done_count",
                40,
                format!("{done_count}, but the bitmap holds {counted} done chunks"),
            ));
        }
        Ok(Ok(ResyncProgress {
            plan,
            done,
            done_count,
            cursor: 0,
        }))
    }
}

#[cfg(test)]
#[path = "compare_tests.rs"]
mod tests;
