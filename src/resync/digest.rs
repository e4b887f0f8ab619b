//! Block digests: what the target computes over its replica and the agent over
//! its disk, so that only differing blocks are sent again.
//!
//! A disk is cut into blocks of one [`BlockSize`] (the last block may be
//! short). Each block gets a [`BlockDigest`]: [`BlockDigest::Absent`] when the
//! image says no data is allocated there (known without reading),
//! [`BlockDigest::Zero`] when it reads as all zeros, else a BLAKE3 *keyed* hash
//! of its bytes under a [`DigestKey`].
//!
//! Why keyed: digests travel through the relay, which must learn nothing about
//! the data. A plain hash would let anyone holding a digest confirm a guess of
//! the block's content (hash the guess and compare), e.g. a known file or a
//! low-entropy block. With a secret key derived from the group's data key (see
//! [`DigestKey::derive`]), only agent and target can compute or check a digest.

use std::fmt;

use thiserror::Error;

use crate::error::{Classify, ErrorKind};
use crate::frame::DataKey;
use crate::image::{Image, ImageError};
use crate::util::aligned::AlignedBuf;
use crate::util::zero::is_zero;

/// The default block size: 64 KiB (see docs/RESYNC.md, "Choosing the block size").
pub const DEFAULT_BLOCK_BYTES: u32 = 64 << 10;
/// The smallest block size allowed: 4 KiB, the capture granularity.
pub const MIN_BLOCK_BYTES: u32 = 4 << 10;
/// The largest block size allowed: 1 MiB.
pub const MAX_BLOCK_BYTES: u32 = 1 << 20;
/// At most this many bytes are read per [`Image::read_batch`] call in
/// [`digest_range`] (and held in its buffer).
pub const MAX_READ_BYTES: usize = 4 << 20;
/// Largest single read of a batch: a batch of 4 MiB is four reads, which an
/// io_uring image has in flight together (a deeper queue reads faster on the
/// virtual disks measured, BENCHMARKS.md "Resync").
pub const READ_PIECE_BYTES: usize = 1 << 20;

/// The BLAKE3 `derive_key` context for [`DigestKey::derive`]. Never change it:
/// agent and target of different versions must derive the same key.
pub const DIGEST_KEY_CONTEXT: &str = "tidemark 2025-01 resync block digest key v1";

/// A block size that resync accepts: a power of two from [`MIN_BLOCK_BYTES`]
/// to [`MAX_BLOCK_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockSize(u32);

/// A block size outside the allowed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("block size {bytes} bytes is not a power of two from 4096 to 1048576")]
pub struct BlockSizeError {
    /// The refused size.
    pub bytes: u32,
}

impl BlockSize {
    /// [`DEFAULT_BLOCK_BYTES`].
    pub const DEFAULT: BlockSize = BlockSize(DEFAULT_BLOCK_BYTES);

    /// Validate `bytes` as a block size.
    pub fn new(bytes: u32) -> Result<BlockSize, BlockSizeError> {
        if bytes.is_power_of_two() && (MIN_BLOCK_BYTES..=MAX_BLOCK_BYTES).contains(&bytes) {
            Ok(BlockSize(bytes))
        } else {
            Err(BlockSizeError { bytes })
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// Number of blocks covering a disk of `disk_size` bytes (the last one may
    /// be short).
    pub fn blocks_for(self, disk_size: u64) -> u64 {
        disk_size.div_ceil(u64::from(self.0))
    }

    /// Byte offset and length of block `index` of a disk of `disk_size` bytes:
    /// `None` if the block starts at or past the end of the disk.
    pub fn block_extent(self, index: u64, disk_size: u64) -> Option<(u64, u64)> {
        let offset = index.checked_mul(u64::from(self.0))?;
        if offset >= disk_size {
            return None;
        }
        Some((offset, (disk_size - offset).min(u64::from(self.0))))
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize::DEFAULT
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} KiB", self.0 >> 10)
    }
}

/// The secret key of the block digests (32 bytes), known to agent and target
/// only. Debug output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestKey([u8; 32]);

impl DigestKey {
    /// A key from raw bytes (tests, or a caller with its own derivation).
    pub fn from_bytes(bytes: [u8; 32]) -> DigestKey {
        DigestKey(bytes)
    }

    /// The digest key of a group's data key: BLAKE3 `derive_key` with
    /// [`DIGEST_KEY_CONTEXT`]. A separate key, so the AES data key is never
    /// used for anything but sealing, and digests reveal nothing about it.
    pub fn derive(data_key: &DataKey) -> DigestKey {
        DigestKey(blake3::derive_key(DIGEST_KEY_CONTEXT, data_key.as_bytes()))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DigestKey(<redacted>)")
    }
}

/// What one side knows about one block.
///
/// `==` compares the digests as sent (Absent ≠ Zero), as a wire round trip
/// must; [`BlockDigest::same_data`] compares what the blocks read as
/// (Absent = Zero), which is what resync and verify use.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockDigest {
    /// Not allocated on that side (a sparse hole, an unallocated VMDK grain):
    /// reads as zeros, known without reading.
    Absent,
    /// Read, and every byte is zero.
    Zero,
    /// BLAKE3 keyed hash of the block's bytes (only the bytes that exist, for
    /// a short last block).
    Hash([u8; 32]),
}

impl BlockDigest {
    /// True when both blocks read back as the same bytes (as far as the
    /// digests can tell): Absent and Zero are the same data.
    pub fn same_data(&self, other: &BlockDigest) -> bool {
        match (self, other) {
            (BlockDigest::Hash(a), BlockDigest::Hash(b)) => a == b,
            (BlockDigest::Hash(_), _) | (_, BlockDigest::Hash(_)) => false,
            _ => true,
        }
    }

    /// True for Absent and Zero: the block reads as zeros.
    pub fn reads_as_zero(&self) -> bool {
        !matches!(self, BlockDigest::Hash(_))
    }
}

impl fmt::Debug for BlockDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockDigest::Absent => f.write_str("Absent"),
            BlockDigest::Zero => f.write_str("Zero"),
            BlockDigest::Hash(h) => {
                f.write_str("Hash(")?;
                for b in &h[..8] {
                    write!(f, "{b:02x}")?;
                }
                f.write_str("…)")
            }
        }
    }
}

/// The digest of one block's bytes: [`BlockDigest::Zero`] when all zero, else
/// the keyed hash. Never [`BlockDigest::Absent`] (the agent reads its disk).
pub fn digest_block(key: &DigestKey, bytes: &[u8]) -> BlockDigest {
    if is_zero(bytes) {
        BlockDigest::Zero
    } else {
        BlockDigest::Hash(*blake3::keyed_hash(&key.0, bytes).as_bytes())
    }
}

/// Errors of [`digest_range`].
#[derive(Debug, Error)]
pub enum DigestError {
    /// The block range does not lie inside the image.
    #[error(
        "blocks {first_block}..+{count} of {block_size} lie outside the image ({blocks} blocks, {size} bytes)"
    )]
    OutOfRange {
        /// First block asked for.
        first_block: u64,
        /// Number of blocks asked for.
        count: u64,
        /// The block size.
        block_size: BlockSize,
        /// Blocks the image has.
        blocks: u64,
        /// Image size in bytes.
        size: u64,
    },
    /// Listing the image's data ranges failed.
    #[error("listing data ranges of blocks {first_block}..+{count}: {source}")]
    DataRanges {
        /// First block asked for.
        first_block: u64,
        /// Number of blocks asked for.
        count: u64,
        /// Cause (names the image); boxed, as ImageError is large.
        source: Box<ImageError>,
    },
    /// Reading blocks failed.
    #[error("reading {len} bytes at offset {offset} (blocks from {block}): {source}")]
    Read {
        /// Byte offset of the first read of the failed batch.
        offset: u64,
        /// Bytes of the failed batch.
        len: u64,
        /// Block at `offset`.
        block: u64,
        /// Cause (names the image and the read); boxed, as ImageError is large.
        source: Box<ImageError>,
    },
    /// The thread that reads ahead could not be started.
    #[error("cannot start the digest reader thread: {0}")]
    Thread(std::io::Error),
}

impl Classify for DigestError {
    fn kind(&self) -> ErrorKind {
        match self {
            DigestError::OutOfRange { .. } => ErrorKind::Corrupt,
            DigestError::DataRanges { source, .. } | DigestError::Read { source, .. } => {
                source.kind()
            }
            DigestError::Thread(_) => ErrorKind::Io,
        }
    }
}

/// Digests of blocks `first_block .. first_block + count` of `img`.
///
/// Blocks wholly outside the image's [`Image::data_ranges`] are
/// [`BlockDigest::Absent`] without being read or hashed (an empty sparse
/// replica costs no hashing). The others are read in batches of up to
/// [`MAX_READ_BYTES`] (one [`Image::read_batch`] each, so io_uring keeps
/// several reads in flight) and digested with [`digest_block`]. The last block
/// of the disk may be short: only its existing bytes are hashed. The range must
/// lie inside the image.
pub fn digest_range(
    img: &mut dyn Image,
    key: &DigestKey,
    block_size: BlockSize,
    first_block: u64,
    count: u64,
) -> Result<Vec<BlockDigest>, DigestError> {
    let size = img.size();
    let blocks = block_size.blocks_for(size);
    let bs = u64::from(block_size.bytes());
    let out_of_range = || DigestError::OutOfRange {
        first_block,
        count,
        block_size,
        blocks,
        size,
    };
    let end_block = first_block
        .checked_add(count)
        .filter(|&e| e <= blocks)
        .ok_or_else(out_of_range)?;
    let n = usize::try_from(count).map_err(|_| out_of_range())?;
    let mut out = vec![BlockDigest::Absent; n];
    if count == 0 {
        return Ok(out);
    }
    // Inside the image, so no overflow: first_block < blocks = ceil(size / bs).
    let start = first_block * bs;
    let end = end_block.saturating_mul(bs).min(size);
    let ranges = img
        .data_ranges(start, end - start)
        .map_err(|source| DigestError::DataRanges {
            first_block,
            count,
            source: Box::new(source),
        })?;

    // The runs of blocks touched by a data range, relative to first_block,
    // sorted and merged. Defensive reading of the image's answer: clamped to
    // the query, order not relied on.
    let mut touched: Vec<(u64, u64)> = ranges
        .into_iter()
        .filter_map(|(off, len)| {
            let (lo, hi) = (off.max(start), off.saturating_add(len).min(end));
            (lo < hi).then(|| (lo / bs - first_block, (hi - 1) / bs + 1 - first_block))
        })
        .collect();
    touched.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::with_capacity(touched.len());
    for (b0, b1) in touched {
        match runs.last_mut() {
            Some(last) if b0 <= last.1 => last.1 = last.1.max(b1),
            _ => runs.push((b0, b1)),
        }
    }

    // Cut the runs into batches of whole blocks, up to MAX_READ_BYTES each,
    // of reads up to READ_PIECE_BYTES each (so an io_uring image keeps
    // several in flight), then read and digest batch by batch.
    let per_batch = (MAX_READ_BYTES as u64 / bs).max(1);
    let per_piece = (READ_PIECE_BYTES as u64 / bs).max(1);
    let mut batches: Vec<Vec<(u64, u64)>> = Vec::new(); // (relative block, blocks)
    let mut pending_blocks = per_batch;
    for (mut b0, b1) in runs {
        while b0 < b1 {
            if pending_blocks == per_batch {
                batches.push(Vec::new());
                pending_blocks = 0;
            }
            let take = (b1 - b0).min(per_batch - pending_blocks).min(per_piece);
            if let Some(batch) = batches.last_mut() {
                batch.push((b0, take));
            }
            pending_blocks += take;
            b0 += take;
        }
    }
    let ctx = BatchCtx {
        key,
        block_size,
        first_block,
        size,
    };
    if batches.len() <= 1 {
        // Aligned, so an image asked for direct reads can read into it.
        let mut buf = AlignedBuf::new(0);
        for batch in &batches {
            read_batch(img, &ctx, batch, &mut buf)?;
            digest_batch(&ctx, batch, &buf, &mut out);
        }
        return Ok(out);
    }
    read_ahead_and_digest(img, &ctx, &batches, &mut out)?;
    Ok(out)
}

/// What every batch of one [`digest_range`] shares.
struct BatchCtx<'a> {
    key: &'a DigestKey,
    block_size: BlockSize,
    first_block: u64,
    size: u64,
}

impl BatchCtx<'_> {
    /// Byte extent of each block run of `segs` (relative to `first_block`);
    /// the disk's last block may be short.
    fn extents(&self, segs: &[(u64, u64)]) -> Vec<(u64, usize)> {
        let bs = u64::from(self.block_size.bytes());
        segs.iter()
            .map(|&(b, n)| {
                let off = (self.first_block + b) * bs;
                let len = (self.first_block + b + n).saturating_mul(bs).min(self.size) - off;
                // At most MAX_READ_BYTES in all, so it fits a usize.
                (off, len as usize)
            })
            .collect()
    }
}

/// Read the batches on a second thread, up to two ahead, while this thread
/// digests: the disk and the hash work at the same time, and the reader
/// starts its next read as soon as one completes (a reader that waited for
/// the hasher left the disk idle: see `capture::readahead`). Three buffers
/// circulate between the threads. A read error ends the reading; it is
/// returned once the batches before it are digested.
/// Batch buffers of [`read_ahead_and_digest`]: one being digested, up to
/// two read ahead.
const BUFFERS: usize = 3;

fn read_ahead_and_digest(
    img: &mut dyn Image,
    ctx: &BatchCtx<'_>,
    batches: &[Vec<(u64, u64)>],
    out: &mut [BlockDigest],
) -> Result<(), DigestError> {
    std::thread::scope(|s| {
        // Made inside the scope, so that this thread's ends are dropped (and
        // a reader blocked on them wakes up) before the scope joins it, also
        // when this thread leaves early.
        let (full_tx, full_rx) =
            crossbeam_channel::bounded::<Result<AlignedBuf, DigestError>>(BUFFERS - 1);
        let (empty_tx, empty_rx) = crossbeam_channel::bounded::<AlignedBuf>(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = empty_tx.send(AlignedBuf::new(0));
        }
        let reader = std::thread::Builder::new()
            .name("digest-read".into())
            .spawn_scoped(s, move || {
                for batch in batches {
                    let Ok(mut buf) = empty_rx.recv() else { return };
                    let r = read_batch(img, ctx, batch, &mut buf).map(|()| buf);
                    let failed = r.is_err();
                    if full_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
        if let Err(e) = reader {
            return Err(DigestError::Thread(e));
        }
        for batch in batches {
            let Ok(got) = full_rx.recv() else {
                // The reader ended without a result: it can only have
                // panicked; the scope re-raises that.
                break;
            };
            let buf = got?;
            digest_batch(ctx, batch, &buf, out);
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })
}

/// Read the block runs `segs` (relative to `first_block`) into `buf` with one
/// batch.
fn read_batch(
    img: &mut dyn Image,
    ctx: &BatchCtx<'_>,
    segs: &[(u64, u64)],
    buf: &mut AlignedBuf,
) -> Result<(), DigestError> {
    let extents = ctx.extents(segs);
    let total: usize = extents.iter().map(|e| e.1).sum();
    buf.reserve(total);
    let mut reads: Vec<(u64, &mut [u8])> = Vec::with_capacity(extents.len());
    let mut rest: &mut [u8] = &mut buf.bytes_mut()[..total];
    for &(off, len) in &extents {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
        reads.push((off, head));
        rest = tail;
    }
    img.read_batch(&mut reads)
        .map_err(|source| DigestError::Read {
            offset: extents.first().map_or(0, |e| e.0),
            len: total as u64,
            block: ctx.first_block + segs.first().map_or(0, |s| s.0),
            source: Box::new(source),
        })
}

/// Store in `out` the digests of the block runs `segs`, read into `buf` by
/// [`read_batch`].
fn digest_batch(
    ctx: &BatchCtx<'_>,
    segs: &[(u64, u64)],
    buf: &AlignedBuf,
    out: &mut [BlockDigest],
) {
    let bs = ctx.block_size.bytes() as usize;
    let mut at = 0usize;
    for (&(b, _), &(_, len)) in segs.iter().zip(&ctx.extents(segs)) {
        let data = &buf.bytes()[at..at + len];
        for (i, block) in data.chunks(bs).enumerate() {
            out[b as usize + i] = digest_block(ctx.key, block);
        }
        at += len;
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::image::{Engine, ImageFormat, ImageSpec, WriteOp, open_image};
    use crate::util::prng::Prng;

    fn key() -> DigestKey {
        DigestKey::from_bytes([7; 32])
    }

    /// An in-memory image whose data ranges are given, counting what is read.
    #[derive(Debug)]
    struct MemImage {
        data: Vec<u8>,
        ranges: Vec<(u64, u64)>,
        bytes_read: u64,
        batches: u64,
        path: PathBuf,
        /// Reads of this batch (counted from 1) fail with EIO.
        fail_batch: Option<u64>,
    }

    impl MemImage {
        fn new(data: Vec<u8>, ranges: Vec<(u64, u64)>) -> Self {
            MemImage {
                data,
                ranges,
                bytes_read: 0,
                batches: 0,
                path: PathBuf::from("mem"),
                fail_batch: None,
            }
        }
    }

    impl Image for MemImage {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn write_batch(&mut self, _: &[WriteOp<'_>]) -> Result<(), ImageError> {
            unimplemented!()
        }
        fn flush(&mut self) -> Result<(), ImageError> {
            Ok(())
        }
        fn sync_handle(&self) -> Result<std::fs::File, ImageError> {
            unimplemented!()
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
            crate::image::check_read_range(&self.path, self.size(), offset, buf.len() as u64)?;
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            self.bytes_read += buf.len() as u64;
            Ok(())
        }
        fn read_batch(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<(), ImageError> {
            self.batches += 1;
            assert!(reads.iter().map(|r| r.1.len()).sum::<usize>() <= MAX_READ_BYTES);
            if self.fail_batch == Some(self.batches) {
                return Err(ImageError::Read {
                    path: self.path.clone(),
                    offset: reads[0].0,
                    len: reads[0].1.len() as u64,
                    source: std::io::Error::from_raw_os_error(5),
                });
            }
            for (o, b) in reads.iter_mut() {
                self.read_at(*o, b)?;
            }
            Ok(())
        }
        fn path(&self) -> &Path {
            &self.path
        }
        fn engine(&self) -> Engine {
            Engine::Sync
        }
        fn grow_to(&mut self, _: u64) -> Result<(), ImageError> {
            unimplemented!()
        }
        fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, ImageError> {
            let end = offset + len;
            Ok(self
                .ranges
                .iter()
                .filter_map(|&(o, l)| {
                    let (a, b) = (o.max(offset), (o + l).min(end));
                    (a < b).then(|| (a, b - a))
                })
                .collect())
        }
    }

    /// Every block's digest computed from the bytes, blocks in `absent` Absent.
    fn expected(data: &[u8], bs: usize, absent: impl Fn(usize) -> bool) -> Vec<BlockDigest> {
        data.chunks(bs)
            .enumerate()
            .map(|(i, b)| {
                if absent(i) {
                    BlockDigest::Absent
                } else {
                    digest_block(&key(), b)
                }
            })
            .collect()
    }

    #[test]
    fn block_sizes() {
        for ok in [4096u32, 8192, 65536, 1 << 20] {
            assert_eq!(BlockSize::new(ok).unwrap().bytes(), ok);
        }
        for bad in [0u32, 1, 2048, 4095, 65535, 3 << 12, 2 << 20, u32::MAX] {
            assert_eq!(BlockSize::new(bad), Err(BlockSizeError { bytes: bad }));
        }
        let bs = BlockSize::DEFAULT;
        assert_eq!(bs.bytes(), DEFAULT_BLOCK_BYTES);
        assert_eq!(bs.blocks_for(0), 0);
        assert_eq!(bs.blocks_for(1), 1);
        assert_eq!(bs.blocks_for(65536), 1);
        assert_eq!(bs.blocks_for(65537), 2);
        assert_eq!(bs.block_extent(1, 65537), Some((65536, 1)));
        assert_eq!(bs.block_extent(2, 65537), None);
        assert_eq!(bs.block_extent(u64::MAX, u64::MAX), None);
        assert_eq!(bs.to_string(), "64 KiB");
    }

    #[test]
    fn digest_block_is_the_keyed_hash() {
        assert_eq!(digest_block(&key(), &[0; 100]), BlockDigest::Zero);
        assert_eq!(digest_block(&key(), &[]), BlockDigest::Zero);
        let d = digest_block(&key(), b"tidemark");
        assert_eq!(
            d,
            BlockDigest::Hash(*blake3::keyed_hash(&[7; 32], b"tidemark").as_bytes())
        );
        // Not the plain hash, and another key gives another digest.
        assert_ne!(d, BlockDigest::Hash(*blake3::hash(b"tidemark").as_bytes()));
        assert_ne!(
            d,
            digest_block(&DigestKey::from_bytes([8; 32]), b"tidemark")
        );
        assert!(format!("{d:?}").starts_with("Hash("));
    }

    #[test]
    fn digest_key_derivation_is_pinned_and_redacted() {
        let dk = DataKey::from_bytes([1; 32]);
        let k = DigestKey::derive(&dk);
        assert_eq!(
            k.as_bytes(),
            &blake3::derive_key(DIGEST_KEY_CONTEXT, &[1; 32])
        );
        assert_ne!(k.as_bytes(), dk.as_bytes());
        assert_eq!(format!("{k:?}"), "DigestKey(<redacted>)");
    }

    #[test]
    fn absent_equals_zero_only_by_data() {
        use BlockDigest::*;
        assert_ne!(Absent, Zero);
        assert!(Absent.same_data(&Zero) && Zero.same_data(&Absent));
        assert!(Hash([1; 32]).same_data(&Hash([1; 32])));
        assert!(!Hash([1; 32]).same_data(&Hash([2; 32])));
        assert!(!Hash([0; 32]).same_data(&Zero));
        assert!(!Absent.same_data(&Hash([0; 32])));
        assert!(Absent.reads_as_zero() && Zero.reads_as_zero() && !Hash([0; 32]).reads_as_zero());
    }

    #[test]
    fn empty_sparse_image_reads_nothing() {
        let mut img = MemImage::new(vec![0; 10 << 20], vec![]);
        let bs = BlockSize::DEFAULT;
        let d = digest_range(&mut img, &key(), bs, 0, 160).unwrap();
        assert_eq!(d, vec![BlockDigest::Absent; 160]);
        assert_eq!((img.bytes_read, img.batches), (0, 0));
    }

    #[test]
    fn only_blocks_with_data_are_read() {
        let bs = BlockSize::new(4096).unwrap();
        let mut data = vec![0u8; 64 * 4096];
        Prng::new(1).fill(&mut data[5 * 4096 + 10..5 * 4096 + 20]);
        Prng::new(2).fill(&mut data[40 * 4096..42 * 4096]);
        // Block 5 listed by a range that starts inside it; blocks 30..33 listed
        // but zero; blocks 40..42 listed.
        let ranges = vec![
            (5 * 4096 + 8, 100),
            (30 * 4096, 3 * 4096),
            (40 * 4096, 8192),
        ];
        let mut img = MemImage::new(data.clone(), ranges);
        let d = digest_range(&mut img, &key(), bs, 0, 64).unwrap();
        let listed = |i: usize| i == 5 || (30..33).contains(&i) || (40..42).contains(&i);
        assert_eq!(d, expected(&data, 4096, |i| !listed(i)));
        assert_eq!(d[31], BlockDigest::Zero);
        assert_eq!(img.bytes_read, 6 * 4096);
        assert_eq!(img.batches, 1);
        // A sub-range, starting mid-way.
        let d = digest_range(&mut img, &key(), bs, 31, 11).unwrap();
        assert_eq!(d[..], expected(&data, 4096, |i| !listed(i))[31..42]);
    }

    #[test]
    fn large_ranges_are_read_in_batches_and_short_last_block_hashed() {
        for bs_bytes in [4096u32, 65536, 1 << 20] {
            let bs = BlockSize::new(bs_bytes).unwrap();
            let size = 9 * (1 << 20) + 1000;
            let mut data = vec![0u8; size];
            Prng::new(3).fill(&mut data);
            data[..bs_bytes as usize].fill(0);
            let mut img = MemImage::new(data.clone(), vec![(0, size as u64)]);
            let blocks = bs.blocks_for(size as u64);
            let d = digest_range(&mut img, &key(), bs, 0, blocks).unwrap();
            assert_eq!(d, expected(&data, bs_bytes as usize, |_| false), "bs {bs}");
            assert_eq!(d[0], BlockDigest::Zero);
            assert_eq!(img.bytes_read, size as u64);
            assert_eq!(img.batches, (size as u64).div_ceil(MAX_READ_BYTES as u64));
            // The short last block alone hashes only the bytes that exist.
            let last = digest_range(&mut img, &key(), bs, blocks - 1, 1).unwrap();
            assert_eq!(
                last,
                vec![digest_block(
                    &key(),
                    &data[(blocks as usize - 1) * bs_bytes as usize..]
                )]
            );
        }
    }

    /// Batches are read on a second thread while the one before is digested:
    /// a read that fails mid-range is the error of the whole range, naming
    /// its batch, after the batches before it were read.
    #[test]
    fn a_read_error_in_a_later_batch_fails_the_range_and_names_the_batch() {
        let size = 5 * MAX_READ_BYTES;
        let mut data = vec![0u8; size];
        Prng::new(4).fill(&mut data);
        let mut img = MemImage::new(data, vec![(0, size as u64)]);
        img.fail_batch = Some(3);
        let bs = BlockSize::DEFAULT;
        let blocks = bs.blocks_for(size as u64);
        match digest_range(&mut img, &key(), bs, 0, blocks) {
            Err(DigestError::Read { offset, block, .. }) => {
                assert_eq!(offset, 2 * MAX_READ_BYTES as u64);
                assert_eq!(block, 2 * MAX_READ_BYTES as u64 / u64::from(bs.bytes()));
            }
            other => panic!("expected a read error, got {other:?}"),
        }
        assert_eq!(img.batches, 3, "no batch is read after the failed one");
    }

    #[test]
    fn ranges_outside_the_image_are_refused() {
        let mut img = MemImage::new(vec![0; 65536 * 3 + 1], vec![]);
        let bs = BlockSize::DEFAULT;
        assert_eq!(digest_range(&mut img, &key(), bs, 0, 4).unwrap().len(), 4);
        assert!(digest_range(&mut img, &key(), bs, 4, 0).unwrap().is_empty());
        for (first, count) in [(0u64, 5u64), (4, 1), (5, 0), (u64::MAX, 2), (1, u64::MAX)] {
            let e = digest_range(&mut img, &key(), bs, first, count).unwrap_err();
            assert!(matches!(e, DigestError::OutOfRange { .. }), "{e}");
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            assert!(e.to_string().contains("outside the image (4 blocks"), "{e}");
        }
    }

    #[test]
    fn sparse_raw_file() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8u64 << 20;
        let spec = ImageSpec {
            path: dir.path().join("r.img"),
            format: ImageFormat::Raw,
            engine: Engine::Sync,
            create_size: Some(size),
            direct_io: crate::image::DirectIo::Off,
        };
        let mut img = open_image(&spec).unwrap();
        let bs = BlockSize::DEFAULT;
        let blocks = bs.blocks_for(size);
        let d = digest_range(img.as_mut(), &key(), bs, 0, blocks).unwrap();
        assert!(d.iter().all(|d| d.reads_as_zero()));
        let mut data = vec![0u8; 5000];
        Prng::new(9).fill(&mut data);
        img.write_batch(&[WriteOp::Write {
            offset: 3 * 65536 + 100,
            data: &data,
        }])
        .unwrap();
        let d = digest_range(img.as_mut(), &key(), bs, 0, blocks).unwrap();
        let mut block = vec![0u8; 65536];
        block[100..5100].copy_from_slice(&data);
        assert_eq!(d[3], digest_block(&key(), &block));
        for (i, x) in d.iter().enumerate() {
            assert_eq!(x.reads_as_zero(), i != 3, "block {i}");
        }
    }
}
