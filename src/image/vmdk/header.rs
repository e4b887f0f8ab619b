//! The binary `SparseExtentHeader` of a hosted sparse VMDK extent (the first
//! 512-byte sector of a monolithicSparse or streamOptimized file) and the
//! stream markers. Parsing treats every byte as hostile: each field is checked
//! against the spec and against bounds that keep later allocations small.

use super::SECTOR;

/// `magicNumber`: the bytes "KDMV" read as a little-endian u32.
pub const MAGIC: u32 = 0x564d_444b;
/// `flags` bit 0: the newline-detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// `flags` bit 1: a redundant grain directory and redundant grain tables exist.
pub const FLAG_RGD: u32 = 1 << 1;
/// `flags` bit 2: a grain-table entry of 1 means "grain reads as zeros".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// `flags` bit 16: grains are compressed (streamOptimized).
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// `flags` bit 17: the stream has markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Every flag bit this parser knows; any other bit set is refused.
pub const KNOWN_FLAGS: u32 =
    FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS;
/// `gdOffset` of a stream whose grain directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm`: no compression.
pub const COMPRESS_NONE: u16 = 0;
/// `compressAlgorithm`: deflate in zlib framing (RFC 1950).
pub const COMPRESS_DEFLATE: u16 = 1;
/// Smallest grain accepted, in sectors (4 KiB: the spec's minimum).
pub const MIN_GRAIN_SECTORS: u64 = 8;
/// Largest grain accepted, in sectors (1 MiB: bounds every per-grain buffer).
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest `numGTEsPerGT` accepted (the spec's fixed value; qemu's bound too).
pub const MAX_GTES_PER_GT: u32 = 512;
/// Largest capacity accepted, in sectors: 2 TiB. Grain-table entries are u32
/// sector numbers, so a sparse extent file cannot address more than that.
pub const MAX_CAPACITY_SECTORS: u64 = 1 << 32;
/// Most grain-directory entries accepted (4 MiB per directory in memory;
/// 2 TiB of 64 KiB grains needs 32768, of 4 KiB grains 2^20).
pub const MAX_GD_ENTRIES: u64 = 1 << 20;
/// Largest embedded descriptor accepted, in sectors (1 MiB).
pub const MAX_DESCRIPTOR_SECTORS: u64 = 2048;
/// The newline-detection bytes: `\n`, ` `, `\r`, `\n` at bytes 73..77.
const NL_CHECK: [u8; 4] = [b'\n', b' ', b'\r', b'\n'];

/// The decoded `SparseExtentHeader` (all sector counts are 512-byte sectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    /// `version`: 1 (plain), 2 (zeroed-grain entries), 3 (stream / CBT).
    pub version: u32,
    /// `flags` (`FLAG_*`).
    pub flags: u32,
    /// `capacity`: size of the virtual disk in sectors.
    pub capacity: u64,
    /// `grainSize`: sectors per grain.
    pub grain_sectors: u64,
    /// `descriptorOffset`: sector of the embedded descriptor (0: none).
    pub descriptor_offset: u64,
    /// `descriptorSize`: sectors reserved for the embedded descriptor.
    pub descriptor_sectors: u64,
    /// `numGTEsPerGT`: entries per grain table.
    pub gtes_per_gt: u32,
    /// `rgdOffset`: sector of the redundant grain directory (0: none).
    pub rgd_offset: u64,
    /// `gdOffset`: sector of the grain directory ([`GD_AT_END`] in a stream header).
    pub gd_offset: u64,
    /// `overHead`: sectors of metadata before the first grain.
    pub overhead: u64,
    /// `uncleanShutdown`: kept as found, never set by tidemark.
    pub unclean_shutdown: bool,
    /// `compressAlgorithm` (`COMPRESS_*`).
    pub compress: u16,
}

/// What is wrong with a header sector. Each names the field and its byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The input is shorter or longer than one sector.
    #[error("header is {len} bytes, expected exactly {SECTOR}")]
    Length {
        /// Bytes given.
        len: usize,
    },
    /// `magicNumber` (byte 0) is not "KDMV".
    #[error(
        "magic number (byte 0) is {found:#010x}, not {MAGIC:#010x} (\"KDMV\"): not a sparse VMDK extent"
    )]
    Magic {
        /// The value found.
        found: u32,
    },
    /// A field holds a value outside what the spec (or a safety bound) allows.
    #[error("header field {field} (byte {offset}) is {value}: {why}")]
    Field {
        /// Field name as in the spec.
        field: &'static str,
        /// Byte offset of the field in the header.
        offset: usize,
        /// The value found.
        value: u64,
        /// What was expected.
        why: &'static str,
    },
    /// The newline-detection bytes were altered (a text-mode transfer).
    #[error(
        "newline-detection bytes (73..77) are {found:02x?}, expected 0a 20 0d 0a: the file was corrupted by a text-mode transfer"
    )]
    NewlineCheck {
        /// The four bytes found.
        found: [u8; 4],
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn field(field: &'static str, offset: usize, value: u64, why: &'static str) -> HeaderError {
    HeaderError::Field {
        field,
        offset,
        value,
        why,
    }
}

impl SparseHeader {
    /// Decode and validate one header sector. Checks what the header alone can
    /// tell; the layout against the file (offsets inside it, no overlaps) is
    /// checked by the image that opens it.
    pub fn parse(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() != SECTOR as usize {
            return Err(HeaderError::Length { len: b.len() });
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(HeaderError::Magic { found: magic });
        }
        let h = SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_sectors: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_sectors: u64_at(b, 36),
            gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            unclean_shutdown: b[72] != 0,
            compress: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(field(
                "version",
                4,
                h.version.into(),
                "only versions 1 to 3 exist",
            ));
        }
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(field(
                "flags",
                8,
                h.flags.into(),
                "unknown flag bits are set",
            ));
        }
        if h.flags & FLAG_NL_DETECT != 0 {
            let found = [b[73], b[74], b[75], b[76]];
            if found != NL_CHECK {
                return Err(HeaderError::NewlineCheck { found });
            }
        }
        if h.capacity == 0 || h.capacity > MAX_CAPACITY_SECTORS {
            return Err(field(
                "capacity",
                12,
                h.capacity,
                "must be 1 to 2^32 sectors (a sparse extent addresses at most 2 TiB)",
            ));
        }
        if !h.grain_sectors.is_power_of_two()
            || !(MIN_GRAIN_SECTORS..=MAX_GRAIN_SECTORS).contains(&h.grain_sectors)
        {
            return Err(field(
                "grainSize",
                20,
                h.grain_sectors,
                "must be a power of two from 8 to 2048 sectors",
            ));
        }
        if h.descriptor_sectors > MAX_DESCRIPTOR_SECTORS
            || (h.descriptor_offset == 0) != (h.descriptor_sectors == 0)
        {
            return Err(field(
                "descriptorSize",
                36,
                h.descriptor_sectors,
                "must be 1 to 2048 sectors with a descriptor offset, 0 without",
            ));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(field(
                "numGTEsPerGT",
                44,
                h.gtes_per_gt.into(),
                "must be 1 to 512",
            ));
        }
        if h.gt_count() > MAX_GD_ENTRIES {
            return Err(field(
                "numGTEsPerGT",
                44,
                h.gtes_per_gt.into(),
                "too few entries per grain table for the capacity: the grain directory would pass 2^20 entries",
            ));
        }
        if h.gd_offset == 0 {
            return Err(field(
                "gdOffset",
                56,
                0,
                "a sparse extent needs a grain directory",
            ));
        }
        if h.flags & FLAG_RGD != 0 && h.rgd_offset == 0 {
            return Err(field(
                "rgdOffset",
                48,
                0,
                "the redundant-grain-directory flag is set but the offset is 0",
            ));
        }
        if h.compress != COMPRESS_NONE && h.compress != COMPRESS_DEFLATE {
            return Err(field(
                "compressAlgorithm",
                77,
                h.compress.into(),
                "only 0 (none) and 1 (deflate) exist",
            ));
        }
        Ok(h)
    }

    /// Encode as one 512-byte sector (padding zero).
    pub fn encode(&self) -> [u8; SECTOR as usize] {
        let mut b = [0u8; SECTOR as usize];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(&NL_CHECK);
        b[77..79].copy_from_slice(&self.compress.to_le_bytes());
        b
    }

    /// True when grains are deflate-compressed (a streamOptimized extent).
    pub fn compressed(&self) -> bool {
        self.compress == COMPRESS_DEFLATE || self.flags & FLAG_COMPRESSED != 0
    }

    /// True when a redundant grain directory is kept.
    pub fn has_rgd(&self) -> bool {
        self.flags & FLAG_RGD != 0
    }

    /// True when a grain-table entry of 1 means "zeros".
    pub fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// Number of grains covering the capacity (the last may be partial).
    pub fn grains(&self) -> u64 {
        self.capacity.div_ceil(self.grain_sectors)
    }

    /// Number of grain tables (= grain-directory entries).
    pub fn gt_count(&self) -> u64 {
        self.grains().div_ceil(u64::from(self.gtes_per_gt))
    }

    /// Sectors one grain table occupies.
    pub fn gt_sectors(&self) -> u64 {
        (u64::from(self.gtes_per_gt) * 4).div_ceil(SECTOR)
    }

    /// Sectors the grain directory occupies.
    pub fn gd_sectors(&self) -> u64 {
        (self.gt_count() * 4).div_ceil(SECTOR)
    }
}

/// Marker `type` of a stream's end-of-stream marker.
pub const MARKER_EOS: u32 = 0;
/// Marker `type` before a grain table.
pub const MARKER_GT: u32 = 1;
/// Marker `type` before the grain directory.
pub const MARKER_GD: u32 = 2;
/// Marker `type` before the footer.
pub const MARKER_FOOTER: u32 = 3;

/// A metadata marker sector of a streamOptimized extent: `val` (sectors of
/// metadata that follow), `size` 0, `type`, zero padding to 512 bytes.
pub fn metadata_marker(sectors: u64, kind: u32) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    b[0..8].copy_from_slice(&sectors.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

/// Size of a grain marker's fixed part: `lba` u64 + `size` u32.
pub const GRAIN_MARKER_LEN: usize = 12;

/// The fixed part of a grain marker: the grain's first virtual sector and the
/// length of the compressed data that follows.
pub fn grain_marker(lba: u64, size: u32) -> [u8; GRAIN_MARKER_LEN] {
    let mut b = [0u8; GRAIN_MARKER_LEN];
    b[0..8].copy_from_slice(&lba.to_le_bytes());
    b[8..12].copy_from_slice(&size.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::image::vmdk::sparse::new_sparse_header;

    /// The header tidemark writes for a new 1 GiB monolithicSparse image, byte
    /// for byte (qemu-img writes the same header for that size).
    #[test]
    fn golden_header_of_a_new_1_gib_image() {
        let h = new_sparse_header(2_097_152);
        let mut want = [0u8; 512];
        let fields: &[(usize, &[u8])] = &[
            (0, b"KDMV"),
            (4, &[1, 0, 0, 0]),                 // version 1
            (8, &[3, 0, 0, 0]),                 // NL detect | redundant GD
            (12, &[0, 0, 0x20, 0, 0, 0, 0, 0]), // capacity 2^21 sectors
            (20, &[128, 0, 0, 0, 0, 0, 0, 0]),  // grainSize 128
            (28, &[1, 0, 0, 0, 0, 0, 0, 0]),    // descriptorOffset 1
            (36, &[20, 0, 0, 0, 0, 0, 0, 0]),   // descriptorSize 20
            (44, &[0, 2, 0, 0]),                // numGTEsPerGT 512
            (48, &[21, 0, 0, 0, 0, 0, 0, 0]),   // rgdOffset 21
            (56, &[150, 0, 0, 0, 0, 0, 0, 0]),  // gdOffset 21 + 1 + 32 * 4
            (64, &[0x80, 1, 0, 0, 0, 0, 0, 0]), // overHead 384
            (72, &[0, b'\n', b' ', b'\r', b'\n', 0, 0]),
        ];
        for (at, bytes) in fields {
            want[*at..at + bytes.len()].copy_from_slice(bytes);
        }
        assert_eq!(h.encode(), want);
        assert_eq!(SparseHeader::parse(&want), Ok(h));
    }

    fn valid_header() -> impl Strategy<Value = SparseHeader> {
        (
            1u32..=3,
            any::<bool>(),
            any::<bool>(),
            1u64..=MAX_CAPACITY_SECTORS,
            3u32..=11,
            (1u64..=4096, 1u64..=MAX_DESCRIPTOR_SECTORS),
            64u32..=512,
            (1u64..u64::MAX, 1u64..=u64::MAX, any::<u64>(), any::<bool>()),
        )
            .prop_map(
                |(
                    version,
                    rgd,
                    zero,
                    capacity,
                    grain_log,
                    (desc, desc_sectors),
                    gtes,
                    (r, gd, over, unclean),
                )| {
                    SparseHeader {
                        version,
                        flags: FLAG_NL_DETECT
                            | if rgd { FLAG_RGD } else { 0 }
                            | if zero { FLAG_ZERO_GRAIN } else { 0 },
                        capacity,
                        grain_sectors: 1 << grain_log,
                        descriptor_offset: desc,
                        descriptor_sectors: desc_sectors,
                        gtes_per_gt: gtes,
                        rgd_offset: r,
                        gd_offset: gd,
                        overhead: over,
                        unclean_shutdown: unclean,
                        compress: COMPRESS_NONE,
                    }
                },
            )
            .prop_filter("directory within bounds", |h| {
                h.gt_count() <= MAX_GD_ENTRIES
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// encode then parse gives the same header back.
        #[test]
        fn header_round_trips(h in valid_header()) {
            prop_assert_eq!(SparseHeader::parse(&h.encode()), Ok(h));
        }

        /// Arbitrary bytes of any length never panic the parser.
        #[test]
        fn header_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = SparseHeader::parse(&bytes);
        }

        /// A valid header with arbitrary bytes overwritten parses or fails cleanly.
        #[test]
        fn mutated_header_never_panics(
            h in valid_header(),
            edits in prop::collection::vec((0usize..512, any::<u8>()), 1..16),
        ) {
            let mut b = h.encode();
            for (at, v) in edits {
                b[at] = v;
            }
            if let Ok(p) = SparseHeader::parse(&b) {
                prop_assert!(p.grain_sectors.is_power_of_two());
                prop_assert!(p.gt_count() <= MAX_GD_ENTRIES);
            }
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let good = new_sparse_header(2_097_152).encode();
        let cases: &[(usize, &[u8], &str)] = &[
            (0, b"COWD", "magic number (byte 0)"),
            (4, &[4], "version (byte 4)"),
            (8, &[3, 0, 0, 0x80], "flags (byte 8)"),
            (12, &[0, 0, 0, 0, 0, 0, 0, 0], "capacity (byte 12)"),
            (12, &[0, 0, 0, 0, 2, 0, 0, 0], "capacity (byte 12)"),
            (20, &[100], "grainSize (byte 20)"),
            (20, &[0, 0x10], "grainSize (byte 20)"),
            (36, &[0, 0x10], "descriptorSize (byte 36)"),
            (44, &[0, 4], "numGTEsPerGT (byte 44)"),
            (44, &[0, 0], "numGTEsPerGT (byte 44)"),
            (48, &[0], "rgdOffset (byte 48)"),
            (56, &[0], "gdOffset (byte 56)"),
            (75, b"\n", "newline-detection"),
            (77, &[2], "compressAlgorithm (byte 77)"),
        ];
        for (at, bytes, what) in cases {
            let mut b = good;
            b[*at..at + bytes.len()].copy_from_slice(bytes);
            let err = SparseHeader::parse(&b).unwrap_err().to_string();
            assert!(err.contains(what), "{what}: {err}");
        }
        assert_eq!(
            SparseHeader::parse(&good[..511]),
            Err(HeaderError::Length { len: 511 })
        );
    }

    #[test]
    fn markers_have_the_spec_layout() {
        let m = metadata_marker(4, MARKER_GT);
        assert_eq!(&m[..16], &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(m[16..].iter().all(|&b| b == 0));
        assert_eq!(
            grain_marker(256, 1000),
            [0, 1, 0, 0, 0, 0, 0, 0, 0xe8, 3, 0, 0]
        );
    }
}
