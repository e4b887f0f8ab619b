//! The spool's on-disk formats: segment header and record header (format v1).
//!
//! Both are fixed-size little-endian structures with their own CRC32C, so a reader
//! can check a header before it trusts any length in it. docs/SPOOL.md has the byte
//! tables; the golden tests below pin them.

use thiserror::Error;

/// Magic at offset 0 of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TDMKSPSG";
/// Magic at offset 0 of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"TMRC";
/// Size of the segment header in bytes.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Size of the record header in bytes.
pub const RECORD_HEADER_LEN: usize = 40;
/// Largest payload (sealed frame) a record may hold: 80 MiB. Checked before any
/// allocation, on append and on every read.
pub const MAX_PAYLOAD: usize = 80 << 20;
/// Longest group name in bytes (group names become directory names).
pub const MAX_GROUP_LEN: usize = 32;

/// Versions of the spool's on-disk format; each variant's doc is the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FormatVersion {
    /// First version: 64-byte segment header, 40-byte record header with a header
    /// CRC and a record CRC, 48-byte group state file. A segment may end with
    /// fewer than 4096 zero bytes after its last record, up to a 4096-aligned
    /// size (padding from direct-I/O writes; a later addition to v1 that needs
    /// no version: files without it read as before).
    V1 = 1,
}

impl FormatVersion {
    /// The version this build writes (and the newest it reads).
    pub const CURRENT: FormatVersion = FormatVersion::V1;

    /// The version with this number, if this build knows it.
    pub fn from_u16(v: u16) -> Option<FormatVersion> {
        match v {
            1 => Some(FormatVersion::V1),
            _ => None,
        }
    }
}

/// Why a header could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The buffer has the wrong size for this header.
    #[error("{what} is {got} bytes, expected {need}")]
    Length {
        /// Which structure.
        what: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// The magic bytes do not match.
    #[error("bad {what} magic {found:02x?}")]
    BadMagic {
        /// Which structure.
        what: &'static str,
        /// The bytes found where the magic belongs.
        found: Vec<u8>,
    },
    /// The header's own CRC does not match its bytes.
    #[error("{what} crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// Which structure.
        what: &'static str,
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the header bytes.
        computed: u32,
    },
    /// A format version this build does not know.
    #[error("unsupported format version {version} (this build reads up to {supported})")]
    UnsupportedVersion {
        /// Version found.
        version: u16,
        /// Newest version this build reads.
        supported: u16,
    },
    /// A field holds a value outside its allowed range.
    #[error("field {field}: {reason}")]
    Field {
        /// Field name as in docs/SPOOL.md.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Check a consistency-group name: 1..=32 bytes of `[a-z0-9-]`. Names become path
/// components, so nothing else (no `/`, no `.`) is allowed.
pub fn validate_group(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_GROUP_LEN {
        return Err("longer than 32 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only a-z, 0-9 and '-' are allowed");
    }
    Ok(())
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The 64-byte header at the start of every segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version of this segment and of every record in it.
    pub version: FormatVersion,
    /// The group this segment belongs to (must equal its directory name).
    pub group: String,
    /// Frame number of the first record (must equal the file name).
    pub first_frame_no: u64,
}

impl SegmentHeader {
    /// Encode to the v1 byte layout (docs/SPOOL.md, "Segment header").
    /// The group name must already be valid (see [`validate_group`]).
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&(self.version as u16).to_le_bytes());
        b[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
        let g = self.group.as_bytes();
        let glen = g.len().min(MAX_GROUP_LEN);
        b[12] = glen as u8;
        b[16..24].copy_from_slice(&self.first_frame_no.to_le_bytes());
        b[24..24 + glen].copy_from_slice(&g[..glen]);
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check a segment header: exact length, magic, CRC, version,
    /// header length, group name, zero reserved bytes.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, FormatError> {
        const WHAT: &str = "segment header";
        if b.len() != SEGMENT_HEADER_LEN {
            return Err(FormatError::Length {
                what: WHAT,
                need: SEGMENT_HEADER_LEN,
                got: b.len(),
            });
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic {
                what: WHAT,
                found: b[0..8].to_vec(),
            });
        }
        let stored = le_u32(b, 60);
        let computed = crc32c::crc32c(&b[0..60]);
        if stored != computed {
            return Err(FormatError::Crc {
                what: WHAT,
                stored,
                computed,
            });
        }
        let raw_version = le_u16(b, 8);
        let version =
            FormatVersion::from_u16(raw_version).ok_or(FormatError::UnsupportedVersion {
                version: raw_version,
                supported: FormatVersion::CURRENT as u16,
            })?;
        let hlen = le_u16(b, 10);
        if hlen as usize != SEGMENT_HEADER_LEN {
            return Err(FormatError::Field {
                field: "header_len",
                reason: format!("{hlen}, expected {SEGMENT_HEADER_LEN}"),
            });
        }
        let glen = b[12] as usize;
        if glen == 0 || glen > MAX_GROUP_LEN {
            return Err(FormatError::Field {
                field: "group_len",
                reason: format!("{glen}, expected 1..=32"),
            });
        }
        if b[13..16].iter().any(|&x| x != 0) || b[56..60].iter().any(|&x| x != 0) {
            return Err(FormatError::Field {
                field: "reserved",
                reason: "not zero".into(),
            });
        }
        if b[24 + glen..56].iter().any(|&x| x != 0) {
            return Err(FormatError::Field {
                field: "group",
                reason: "padding after the name is not zero".into(),
            });
        }
        let group = std::str::from_utf8(&b[24..24 + glen])
            .ok()
            .filter(|g| validate_group(g).is_ok())
            .ok_or_else(|| FormatError::Field {
                field: "group",
                reason: format!(
                    "invalid name {:?}",
                    String::from_utf8_lossy(&b[24..24 + glen])
                ),
            })?
            .to_string();
        Ok(SegmentHeader {
            version,
            group,
            first_frame_no: le_u64(b, 16),
        })
    }
}

/// The 40-byte header before every record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Payload length in bytes (at most [`MAX_PAYLOAD`]).
    pub payload_len: u32,
    /// Frame number of the frame in the payload.
    pub frame_no: u64,
    /// Frame number of its predecessor in the group's chain.
    pub prev_frame_no: u64,
    /// Last seq covered by the frame.
    pub last_seq: u64,
    /// CRC32C of header bytes 0..32.
    pub header_crc: u32,
    /// CRC32C of header bytes 0..32 followed by the payload.
    pub crc: u32,
}

impl RecordHeader {
    /// Build the header for a payload, computing both CRCs.
    /// The caller checks `payload.len() <= MAX_PAYLOAD` first.
    pub fn new(frame_no: u64, prev_frame_no: u64, last_seq: u64, payload: &[u8]) -> RecordHeader {
        let mut h = RecordHeader {
            payload_len: payload.len().min(u32::MAX as usize) as u32,
            frame_no,
            prev_frame_no,
            last_seq,
            header_crc: 0,
            crc: 0,
        };
        let fields = h.fields();
        h.header_crc = crc32c::crc32c(&fields);
        h.crc = crc32c::crc32c_append(h.header_crc, payload);
        h
    }

    /// Bytes 0..32: magic, length and the three numbers, the part both CRCs cover.
    fn fields(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.frame_no.to_le_bytes());
        b[16..24].copy_from_slice(&self.prev_frame_no.to_le_bytes());
        b[24..32].copy_from_slice(&self.last_seq.to_le_bytes());
        b
    }

    /// Encode to the v1 byte layout (docs/SPOOL.md, "Record header").
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..32].copy_from_slice(&self.fields());
        b[32..36].copy_from_slice(&self.header_crc.to_le_bytes());
        b[36..40].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decode and check a record header: exact length, magic, header CRC, and the
    /// payload length bound. The payload CRC is checked by [`RecordHeader::payload_ok`]
    /// (or incrementally from [`RecordHeader::header_crc`]).
    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        const WHAT: &str = "record header";
        if b.len() != RECORD_HEADER_LEN {
            return Err(FormatError::Length {
                what: WHAT,
                need: RECORD_HEADER_LEN,
                got: b.len(),
            });
        }
        if b[0..4] != RECORD_MAGIC {
            return Err(FormatError::BadMagic {
                what: WHAT,
                found: b[0..4].to_vec(),
            });
        }
        let stored = le_u32(b, 32);
        let computed = crc32c::crc32c(&b[0..32]);
        if stored != computed {
            return Err(FormatError::Crc {
                what: WHAT,
                stored,
                computed,
            });
        }
        let payload_len = le_u32(b, 4);
        if payload_len as usize > MAX_PAYLOAD {
            return Err(FormatError::Field {
                field: "payload_len",
                reason: format!("{payload_len} above the {MAX_PAYLOAD}-byte cap"),
            });
        }
        Ok(RecordHeader {
            payload_len,
            frame_no: le_u64(b, 8),
            prev_frame_no: le_u64(b, 16),
            last_seq: le_u64(b, 24),
            header_crc: stored,
            crc: le_u32(b, 36),
        })
    }

    /// Total bytes of the record on disk: header plus payload.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.payload_len as u64
    }

    /// True when `payload` has the stored length and matches the record CRC.
    pub fn payload_ok(&self, payload: &[u8]) -> bool {
        payload.len() == self.payload_len as usize
            && crc32c::crc32c_append(self.header_crc, payload) == self.crc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn group_names() {
        assert!(validate_group("g1").is_ok());
        assert!(validate_group("abc-123").is_ok());
        assert!(validate_group(&"a".repeat(32)).is_ok());
        assert!(validate_group("").is_err());
        assert!(validate_group(&"a".repeat(33)).is_err());
        for bad in ["A", "a/b", "..", ".", "a_b", "a b", "é"] {
            assert!(validate_group(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn record_header_golden() {
        let payload = b"sealed";
        let h = RecordHeader::new(
            0x0102_0304_0506_0708,
            0x0102_0304_0506_0707,
            0x1122,
            payload,
        );
        let b = h.encode();
        #[rustfmt::skip]
        let expected_fields: [u8; 32] = [
            b'T', b'M', b'R', b'C',                          // magic
            6, 0, 0, 0,                                      // payload_len
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,  // frame_no
            0x07, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,  // prev_frame_no
            0x22, 0x11, 0, 0, 0, 0, 0, 0,                    // last_seq
        ];
        assert_eq!(&b[0..32], &expected_fields);
        // Pinned CRCs: a change here is a format change (bump the version).
        assert_eq!(&b[32..36], &GOLDEN_RECORD_HEADER_CRC.to_le_bytes());
        assert_eq!(&b[36..40], &GOLDEN_RECORD_CRC.to_le_bytes());
        assert_eq!(h.header_crc, crc32c::crc32c(&expected_fields));
        let mut whole = expected_fields.to_vec();
        whole.extend_from_slice(payload);
        assert_eq!(h.crc, crc32c::crc32c(&whole));
    }

    const GOLDEN_RECORD_HEADER_CRC: u32 = 0xaec7_1ae2;
    const GOLDEN_RECORD_CRC: u32 = 0x93d1_9905;
    const GOLDEN_SEGMENT_CRC: u32 = 0xd807_d8d0;

    #[test]
    fn segment_header_golden() {
        let h = SegmentHeader {
            version: FormatVersion::V1,
            group: "db-1".into(),
            first_frame_no: 0x2a,
        };
        let b = h.encode();
        let mut expected = [0u8; 64];
        expected[0..8].copy_from_slice(b"TDMKSPSG"); // magic
        expected[8] = 1; // version
        expected[10] = 64; // header_len
        expected[12] = 4; // group_len
        expected[16] = 0x2a; // first_frame_no
        expected[24..28].copy_from_slice(b"db-1"); // group, zero padded
        expected[60..64].copy_from_slice(&GOLDEN_SEGMENT_CRC.to_le_bytes());
        assert_eq!(b, expected);
        assert_eq!(GOLDEN_SEGMENT_CRC, crc32c::crc32c(&expected[0..60]));
    }

    #[test]
    fn headers_round_trip() {
        let h = SegmentHeader {
            version: FormatVersion::V1,
            group: "x".repeat(32),
            first_frame_no: u64::MAX,
        };
        assert_eq!(SegmentHeader::decode(&h.encode()).unwrap(), h);
        let payload = vec![7u8; 1000];
        let r = RecordHeader::new(9, 8, 77, &payload);
        let d = RecordHeader::decode(&r.encode()).unwrap();
        assert_eq!(d, r);
        assert!(d.payload_ok(&payload));
        assert!(!d.payload_ok(&payload[1..]));
        assert_eq!(d.record_len(), 1040);
    }

    #[test]
    fn decode_refuses_bad_headers() {
        let r = RecordHeader::new(2, 1, 3, b"abc").encode();
        assert!(matches!(
            RecordHeader::decode(&r[..39]),
            Err(FormatError::Length { .. })
        ));
        let mut bad = r;
        bad[0] = b'X';
        assert!(matches!(
            RecordHeader::decode(&bad),
            Err(FormatError::BadMagic { .. })
        ));
        let mut bad = r;
        bad[9] ^= 1;
        assert!(matches!(
            RecordHeader::decode(&bad),
            Err(FormatError::Crc { .. })
        ));
        // A length above the cap is refused even with a correct header CRC.
        let mut big = r;
        big[4..8].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        let crc = crc32c::crc32c(&big[0..32]);
        big[32..36].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            RecordHeader::decode(&big),
            Err(FormatError::Field { .. })
        ));

        let s = SegmentHeader {
            version: FormatVersion::V1,
            group: "g".into(),
            first_frame_no: 1,
        }
        .encode();
        let mut v2 = s;
        v2[8] = 2;
        let crc = crc32c::crc32c(&v2[0..60]);
        v2[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SegmentHeader::decode(&v2),
            Err(FormatError::UnsupportedVersion { version: 2, .. })
        ));
        let mut badg = s;
        badg[24] = b'/';
        let crc = crc32c::crc32c(&badg[0..60]);
        badg[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SegmentHeader::decode(&badg),
            Err(FormatError::Field { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = RecordHeader::decode(&bytes);
            let _ = SegmentHeader::decode(&bytes);
            if bytes.len() >= 64 {
                let _ = SegmentHeader::decode(&bytes[..64]);
                let _ = RecordHeader::decode(&bytes[..40]);
            }
        }

        #[test]
        fn record_round_trip(frame in any::<u64>(), prev in any::<u64>(), seq in any::<u64>(),
                             payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = RecordHeader::new(frame, prev, seq, &payload);
            let d = RecordHeader::decode(&h.encode()).unwrap();
            prop_assert_eq!(d, h);
            prop_assert!(d.payload_ok(&payload));
        }
    }
}
