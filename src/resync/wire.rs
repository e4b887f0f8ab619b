//! The `DigestChunk` message: the digests of one chunk of blocks of one disk,
//! as the target sends them to the agent (sealed, through the relay). Byte
//! layout in docs/RESYNC.md, "DigestChunk v1".
//!
//! [`DigestChunk::decode`] treats its input as hostile: every length is
//! checked before anything is allocated, every field is validated, and each
//! error names the field and its byte offset.

use thiserror::Error;

use super::digest::{BlockDigest, BlockSize};
use crate::error::{Classify, ErrorKind};

/// The message's magic: `b"TMDC"` (tidemark digest chunk).
pub const MAGIC: [u8; 4] = *b"TMDC";
/// Bytes before the first entry.
pub const HEADER_LEN: usize = 40;
/// Bytes of the trailing CRC32C.
pub const CRC_LEN: usize = 4;
/// Most entries one chunk may carry: 16384 (1 GiB of disk at 64 KiB blocks;
/// at most 40 + 16384 × 33 + 4 = 540 716 bytes on the wire).
pub const MAX_CHUNK_BLOCKS: u32 = 16384;
/// Longest valid message, bytes.
pub const MAX_MESSAGE_LEN: usize = HEADER_LEN + MAX_CHUNK_BLOCKS as usize * 33 + CRC_LEN;

/// Entry kind byte: the block is not allocated.
pub const KIND_ABSENT: u8 = 0;
/// Entry kind byte: the block reads as zeros.
pub const KIND_ZERO: u8 = 1;
/// Entry kind byte: a 32-byte keyed hash follows.
pub const KIND_HASH: u8 = 2;

/// Versions of the message. Each variant's doc is its changelog entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum DigestChunkVersion {
    /// Version 1: the initial format (40-byte header, entries Absent / Zero /
    /// Hash of BLAKE3 keyed hashes, CRC32C over the whole).
    V1 = 1,
}

impl DigestChunkVersion {
    /// The version this build writes.
    pub const LATEST: DigestChunkVersion = DigestChunkVersion::V1;
}

/// Byte offsets of the header fields (named in errors).
pub mod off {
    /// `magic`, 4 bytes.
    pub const MAGIC: usize = 0;
    /// `version`, u16.
    pub const VERSION: usize = 4;
    /// `disk`, u16.
    pub const DISK: usize = 6;
    /// `disk_size`, u64.
    pub const DISK_SIZE: usize = 8;
    /// `block_size`, u32.
    pub const BLOCK_SIZE: usize = 16;
    /// `chunk_index`, u64.
    pub const CHUNK_INDEX: usize = 20;
    /// `first_block`, u64.
    pub const FIRST_BLOCK: usize = 28;
    /// `count`, u32.
    pub const COUNT: usize = 36;
    /// The first entry.
    pub const ENTRIES: usize = 40;
}

/// Why a `DigestChunk` is refused (decoding) or cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The buffer ends inside a field.
    #[error("digest chunk truncated: {field} at byte {offset} needs {need} bytes, {have} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Its byte offset.
        offset: usize,
        /// Bytes it needs.
        need: usize,
        /// Bytes left in the buffer.
        have: usize,
    },
    /// Not a digest chunk.
    #[error("digest chunk: magic at byte 0 is {found:02x?}, expected \"TMDC\"")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A version this build does not know.
    #[error("digest chunk: version at byte 4 is {version}; this build reads version 1")]
    UnknownVersion {
        /// The version found.
        version: u16,
    },
    /// The block size is not one resync allows.
    #[error("digest chunk: block_size at byte 16: {source}")]
    BadBlockSize {
        /// What is wrong.
        source: super::digest::BlockSizeError,
    },
    /// `count` is 0 or above [`MAX_CHUNK_BLOCKS`].
    #[error("digest chunk: count at byte 36 is {count}; must be 1 to {max}", max = MAX_CHUNK_BLOCKS)]
    BadCount {
        /// The count found.
        count: u64,
    },
    /// The blocks do not lie inside the disk.
    #[error(
        "digest chunk: first_block at byte 28 ({first_block}) + count ({count}) exceeds the disk's {disk_blocks} blocks ({disk_size} bytes)"
    )]
    OutsideDisk {
        /// First block.
        first_block: u64,
        /// Number of blocks.
        count: u64,
        /// Blocks of the disk.
        disk_blocks: u64,
        /// Disk size in bytes.
        disk_size: u64,
    },
    /// An entry's kind byte is not 0, 1 or 2.
    #[error("digest chunk: entry {entry} kind at byte {offset} is {kind}; must be 0, 1 or 2")]
    UnknownEntryKind {
        /// Index of the entry.
        entry: u32,
        /// Byte offset of the kind byte.
        offset: usize,
        /// The kind found.
        kind: u8,
    },
    /// Bytes follow the CRC.
    #[error("digest chunk: {extra} trailing bytes from byte {offset}")]
    TrailingBytes {
        /// Offset of the first extra byte.
        offset: usize,
        /// How many.
        extra: usize,
    },
    /// The CRC32C does not match the bytes before it.
    #[error("digest chunk: crc32c at byte {offset} is {stored:08x}, computed {computed:08x}")]
    Checksum {
        /// Offset of the CRC field.
        offset: usize,
        /// CRC in the message.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
}

impl Classify for WireError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Corrupt
    }
}

/// The digests of `count` consecutive blocks of one disk: the answer to one
/// digest request of a resync or verify (`chunk_index` carries the request's
/// id).
/// Built only through [`DigestChunk::new`] or [`DigestChunk::decode`], so it
/// always encodes to a message that decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestChunk {
    disk: u16,
    disk_size: u64,
    block_size: BlockSize,
    chunk_index: u64,
    first_block: u64,
    digests: Vec<BlockDigest>,
}

/// Check the rules on count and block range shared by `new` and `decode`.
fn check_range(
    disk_size: u64,
    block_size: BlockSize,
    first_block: u64,
    count: u64,
) -> Result<(), WireError> {
    if count == 0 || count > u64::from(MAX_CHUNK_BLOCKS) {
        return Err(WireError::BadCount { count });
    }
    let disk_blocks = block_size.blocks_for(disk_size);
    if first_block
        .checked_add(count)
        .is_none_or(|e| e > disk_blocks)
    {
        return Err(WireError::OutsideDisk {
            first_block,
            count,
            disk_blocks,
            disk_size,
        });
    }
    Ok(())
}

impl DigestChunk {
    /// A chunk of `digests` for blocks from `first_block` of disk `disk`:
    /// 1 to [`MAX_CHUNK_BLOCKS`] digests, all inside the disk.
    pub fn new(
        disk: u16,
        disk_size: u64,
        block_size: BlockSize,
        chunk_index: u64,
        first_block: u64,
        digests: Vec<BlockDigest>,
    ) -> Result<DigestChunk, WireError> {
        check_range(disk_size, block_size, first_block, digests.len() as u64)?;
        Ok(DigestChunk {
            disk,
            disk_size,
            block_size,
            chunk_index,
            first_block,
            digests,
        })
    }

    /// Disk id within the group.
    pub fn disk(&self) -> u16 {
        self.disk
    }
    /// Size of the disk in bytes, as the sender sees it.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }
    /// Block size of the digests.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }
    /// Index of the chunk in the resync plan.
    pub fn chunk_index(&self) -> u64 {
        self.chunk_index
    }
    /// First block the digests cover.
    pub fn first_block(&self) -> u64 {
        self.first_block
    }
    /// The digests, one per block from [`DigestChunk::first_block`].
    pub fn digests(&self) -> &[BlockDigest] {
        &self.digests
    }
    /// The digests, owned.
    pub fn into_digests(self) -> Vec<BlockDigest> {
        self.digests
    }

    /// Length of the encoded message.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + self
                .digests
                .iter()
                .map(|d| match d {
                    BlockDigest::Hash(_) => 33,
                    _ => 1,
                })
                .sum::<usize>()
            + CRC_LEN
    }

    /// The message bytes (version 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&(DigestChunkVersion::LATEST as u16).to_le_bytes());
        b.extend_from_slice(&self.disk.to_le_bytes());
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        b.extend_from_slice(&self.block_size.bytes().to_le_bytes());
        b.extend_from_slice(&self.chunk_index.to_le_bytes());
        b.extend_from_slice(&self.first_block.to_le_bytes());
        // At most MAX_CHUNK_BLOCKS, checked by new/decode.
        b.extend_from_slice(&(self.digests.len() as u32).to_le_bytes());
        for d in &self.digests {
            match d {
                BlockDigest::Absent => b.push(KIND_ABSENT),
                BlockDigest::Zero => b.push(KIND_ZERO),
                BlockDigest::Hash(h) => {
                    b.push(KIND_HASH);
                    b.extend_from_slice(h);
                }
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and validate a message. Refuses (with the field and byte offset)
    /// a truncated buffer, a bad magic, an unknown version, an invalid block
    /// size, a count of 0 or above [`MAX_CHUNK_BLOCKS`], blocks outside the
    /// disk, an unknown entry kind, trailing bytes, and a CRC mismatch.
    pub fn decode(b: &[u8]) -> Result<DigestChunk, WireError> {
        let mut r = Reader { b, at: 0 };
        let magic: [u8; 4] = r.array("magic")?;
        if magic != MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes(r.array("version")?);
        if version != DigestChunkVersion::V1 as u16 {
            return Err(WireError::UnknownVersion { version });
        }
        let disk = u16::from_le_bytes(r.array("disk")?);
        let disk_size = u64::from_le_bytes(r.array("disk_size")?);
        let block_size = BlockSize::new(u32::from_le_bytes(r.array("block_size")?))
            .map_err(|source| WireError::BadBlockSize { source })?;
        let chunk_index = u64::from_le_bytes(r.array("chunk_index")?);
        let first_block = u64::from_le_bytes(r.array("first_block")?);
        let count = u32::from_le_bytes(r.array("count")?);
        check_range(disk_size, block_size, first_block, u64::from(count))?;
        // Every entry takes at least one byte: check that much is there before
        // allocating room for `count` entries.
        let min_rest = count as usize + CRC_LEN;
        if r.left() < min_rest {
            return Err(WireError::Truncated {
                field: "entries",
                offset: r.at,
                need: min_rest,
                have: r.left(),
            });
        }
        let mut digests = Vec::with_capacity(count as usize);
        for entry in 0..count {
            let offset = r.at;
            let [kind]: [u8; 1] = r.array("entry kind")?;
            digests.push(match kind {
                KIND_ABSENT => BlockDigest::Absent,
                KIND_ZERO => BlockDigest::Zero,
                KIND_HASH => BlockDigest::Hash(r.array("entry hash")?),
                _ => {
                    return Err(WireError::UnknownEntryKind {
                        entry,
                        offset,
                        kind,
                    });
                }
            });
        }
        let crc_at = r.at;
        let stored = u32::from_le_bytes(r.array("crc32c")?);
        if r.left() > 0 {
            return Err(WireError::TrailingBytes {
                offset: r.at,
                extra: r.left(),
            });
        }
        let computed = crc32c::crc32c(&b[..crc_at]);
        if stored != computed {
            return Err(WireError::Checksum {
                offset: crc_at,
                stored,
                computed,
            });
        }
        Ok(DigestChunk {
            disk,
            disk_size,
            block_size,
            chunk_index,
            first_block,
            digests,
        })
    }
}

/// A bounds-checked cursor over the input.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.b.len() - self.at
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let truncated = WireError::Truncated {
            field,
            offset: self.at,
            need: N,
            have: self.left(),
        };
        let v: [u8; N] = self
            .b
            .get(self.at..self.at + N)
            .and_then(|s| s.try_into().ok())
            .ok_or(truncated)?;
        self.at += N;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::resync::digest::{DigestKey, digest_block};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Disk 3 of 3 × 64 KiB + 100 bytes (4 blocks, the last one short), chunk
    /// 7 = blocks 1..4: Absent, Zero, and the keyed hash of "tidemark" under
    /// the key 00 01 … 1f.
    fn golden() -> DigestChunk {
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let h = digest_block(&DigestKey::from_bytes(key), b"tidemark");
        DigestChunk::new(
            3,
            3 * 65536 + 100,
            BlockSize::DEFAULT,
            7,
            1,
            vec![BlockDigest::Absent, BlockDigest::Zero, h],
        )
        .unwrap()
    }

    const GOLDEN_HEX: &str = concat!(
        "544d4443",         // magic "TMDC"
        "0100",             // version 1
        "0300",             // disk 3
        "6400030000000000", // disk_size 196708
        "00000100",         // block_size 65536
        "0700000000000000", // chunk_index 7
        "0100000000000000", // first_block 1
        "03000000",         // count 3
        "00",               // entry 0: absent
        "01",               // entry 1: zero
        "02",               // entry 2: hash, then the 32 bytes
        "b654c74789e0bb51a4f979e91935462ed9880a049213e4070f322ddd9b2afa0e",
        "dfa89eb2", // crc32c (checked with an independent bitwise CRC-32C)
    );

    #[test]
    fn golden_bytes() {
        let b = golden().encode();
        assert_eq!(b.len(), golden().encoded_len());
        assert_eq!(b.len(), 40 + 3 + 32 + 4);
        assert_eq!(hex(&b), GOLDEN_HEX);
    }

    #[test]
    fn round_trip() {
        let g = golden();
        assert_eq!(DigestChunk::decode(&g.encode()).unwrap(), g);
        // The largest chunk, all hashes, ending at the disk's last block.
        let bs = BlockSize::new(4096).unwrap();
        let n = MAX_CHUNK_BLOCKS as u64;
        let digests: Vec<_> = (0..n)
            .map(|i| BlockDigest::Hash([(i % 251) as u8; 32]))
            .collect();
        let c = DigestChunk::new(u16::MAX, (n + 5) * 4096 - 1, bs, u64::MAX, 5, digests).unwrap();
        let b = c.encode();
        assert_eq!(b.len(), MAX_MESSAGE_LEN);
        assert_eq!(DigestChunk::decode(&b).unwrap(), c);
    }

    #[test]
    fn new_refuses_what_decode_would() {
        let bs = BlockSize::DEFAULT;
        let d = |n| vec![BlockDigest::Zero; n];
        assert!(matches!(
            DigestChunk::new(0, 65536, bs, 0, 0, d(0)),
            Err(WireError::BadCount { count: 0 })
        ));
        assert!(matches!(
            DigestChunk::new(0, 1 << 40, bs, 0, 0, d(MAX_CHUNK_BLOCKS as usize + 1)),
            Err(WireError::BadCount { .. })
        ));
        assert!(matches!(
            DigestChunk::new(0, 65537, bs, 0, 1, d(2)),
            Err(WireError::OutsideDisk { disk_blocks: 2, .. })
        ));
        assert!(matches!(
            DigestChunk::new(0, u64::MAX, bs, 0, u64::MAX, d(1)),
            Err(WireError::OutsideDisk { .. })
        ));
    }

    /// Golden bytes with `f` applied, CRC recomputed.
    fn edited(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = golden().encode();
        b.truncate(b.len() - CRC_LEN);
        f(&mut b);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn every_rejection_names_field_and_offset() {
        let g = golden().encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "magic at byte 0 needs 4 bytes, 0 left"),
            (g[..5].to_vec(), "version at byte 4 needs 2"),
            (g[..39].to_vec(), "count at byte 36 needs 4"),
            (g[..44].to_vec(), "entries at byte 40 needs 7 bytes, 4 left"),
            (
                g[..60].to_vec(),
                "entry hash at byte 43 needs 32 bytes, 17 left",
            ),
            (
                g[..g.len() - 1].to_vec(),
                "crc32c at byte 75 needs 4 bytes, 3 left",
            ),
            (edited(|b| b[0] = b'X'), "magic at byte 0"),
            (edited(|b| b[4] = 2), "version at byte 4 is 2"),
            (
                edited(|b| b[16..20].copy_from_slice(&3000u32.to_le_bytes())),
                "block_size at byte 16",
            ),
            (
                edited(|b| b[36..40].copy_from_slice(&0u32.to_le_bytes())),
                "count at byte 36 is 0",
            ),
            (
                edited(|b| b[36..40].copy_from_slice(&(MAX_CHUNK_BLOCKS + 1).to_le_bytes())),
                "count at byte 36 is 16385",
            ),
            (
                edited(|b| b[28..36].copy_from_slice(&2u64.to_le_bytes())),
                "first_block at byte 28 (2) + count (3) exceeds the disk's 4 blocks",
            ),
            (
                edited(|b| b[8..16].copy_from_slice(&(3 * 65536u64).to_le_bytes())),
                "exceeds the disk's 3 blocks",
            ),
            (edited(|b| b[41] = 3), "entry 1 kind at byte 41 is 3"),
            (
                {
                    let mut b = g.clone();
                    b.push(0);
                    b
                },
                "1 trailing bytes from byte 79",
            ),
            (
                {
                    let mut b = g.clone();
                    b[50] ^= 1;
                    b
                },
                "crc32c at byte 75",
            ),
        ];
        for (bytes, want) in cases {
            let e = DigestChunk::decode(&bytes).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
            assert_eq!(e.kind(), ErrorKind::Corrupt);
        }
    }

    #[test]
    fn huge_count_is_refused_before_allocating() {
        // A count at the maximum in a buffer that cannot hold it.
        let b = edited(|b| {
            b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            b[36..40].copy_from_slice(&MAX_CHUNK_BLOCKS.to_le_bytes());
        });
        assert!(matches!(
            DigestChunk::decode(&b),
            Err(WireError::Truncated {
                field: "entries",
                ..
            })
        ));
    }

    fn digest_strategy() -> impl Strategy<Value = BlockDigest> {
        prop_oneof![
            Just(BlockDigest::Absent),
            Just(BlockDigest::Zero),
            any::<[u8; 32]>().prop_map(BlockDigest::Hash),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            fix_magic in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if fix_magic && bytes.len() >= 6 {
                bytes[..4].copy_from_slice(&MAGIC);
                bytes[4..6].copy_from_slice(&1u16.to_le_bytes());
            }
            let _ = DigestChunk::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_messages(
            digests in proptest::collection::vec(digest_strategy(), 1..40),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in 0usize..8,
            fix_crc in any::<bool>(),
        ) {
            let n = digests.len() as u64;
            let c = DigestChunk::new(1, n * 4096, BlockSize::new(4096).unwrap(), 2, 0, digests)
                .unwrap();
            let orig = c.encode();
            let mut b = orig.clone();
            for (at, v) in edits {
                let i = at % b.len();
                b[i] = v;
            }
            b.truncate(b.len().saturating_sub(cut));
            if fix_crc && b.len() > CRC_LEN {
                let end = b.len() - CRC_LEN;
                let crc = crc32c::crc32c(&b[..end]);
                b[end..].copy_from_slice(&crc.to_le_bytes());
            }
            match DigestChunk::decode(&b) {
                // Whatever decodes re-encodes to exactly the same bytes.
                Ok(d) => prop_assert_eq!(d.encode(), b),
                Err(_) => prop_assert!(b != orig),
            }
        }

        #[test]
        fn valid_chunks_round_trip(
            digests in proptest::collection::vec(digest_strategy(), 1..200),
            disk in any::<u16>(),
            chunk_index in any::<u64>(),
            shift in 12u32..=20,
            first_block in 0u64..1_000_000,
            short in 0u64..4096,
        ) {
            let bs = BlockSize::new(1 << shift).unwrap();
            let blocks = first_block + digests.len() as u64;
            let disk_size = blocks * u64::from(bs.bytes()) - short;
            let c = DigestChunk::new(disk, disk_size, bs, chunk_index, first_block, digests)
                .unwrap();
            let b = c.encode();
            prop_assert_eq!(b.len(), c.encoded_len());
            prop_assert_eq!(DigestChunk::decode(&b).unwrap(), c);
        }
    }
}
