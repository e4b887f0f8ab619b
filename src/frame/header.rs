//! The 128-byte frame header: raw `Pod` form, validated native form, group names.

use std::fmt;
use std::str::FromStr;

use bytemuck::{Pod, Zeroable};

use super::{FrameError, HEADER_LEN, MAGIC, MAX_PLAIN_LEN, RECORD_HEADER_LEN, TAG_LEN};

/// Frame format versions this build knows. Each variant's doc is the changelog
/// entry for that version (see docs/FORMAT.md, "Version rules").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum FormatVersion {
    /// Version 1: the initial format (128-byte header, W/M/HEARTBEAT flags, raw or
    /// zstd codec, AES-256-GCM, record kinds Write/Zero/DiskSize).
    V1 = 1,
    /// Version 2: version 1 plus two marker record kinds that carry UTF-8 in
    /// the data area: Tag (kind 4; a named recovery point, only as the last
    /// record of a W frame) and Note (kind 5; why the M data that follows is
    /// not consistent, only in M frames). The header is unchanged. A sealer
    /// writes version 2 only for a frame that holds a Tag or a Note, so
    /// targets that read only version 1 keep working until tags are used.
    V2 = 2,
    /// Version 3: version 2 plus the REBASE flag (bit 3; an M frame that
    /// starts a new stretch of the chain after frames the relay lost, see
    /// docs/FORMAT.md "Frame v3") and Note reason 6 (`chain-gap`). A sealer
    /// writes version 3 only for a frame that needs it.
    V3 = 3,
    /// Version 4: version 3 plus Note reason 7 (`disk-grown`, docs/FORMAT.md
    /// "Frame v4"). A sealer writes version 4 only for a frame with that Note.
    V4 = 4,
}

impl FormatVersion {
    /// The newest version this build reads (and writes, for frames that need it).
    pub const LATEST: FormatVersion = FormatVersion::V4;

    /// The version for a wire value, if known.
    pub fn from_u16(v: u16) -> Option<FormatVersion> {
        match v {
            1 => Some(FormatVersion::V1),
            2 => Some(FormatVersion::V2),
            3 => Some(FormatVersion::V3),
            4 => Some(FormatVersion::V4),
            _ => None,
        }
    }
}

/// Whether a frame is write-ordered (W) or not (M).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// W: write-ordered. Replaying W frames in order reproduces every intermediate
    /// source state; every W frame boundary is a crash-consistent recovery point.
    Write,
    /// M: not write-ordered (initial copy, bitmap catch-up, resync: data read from
    /// the disk later). The replica is consistent only once the following W frames
    /// are applied.
    Merge,
}

/// How the stored payload is encoded before encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is: `stored_len == plain_len`.
    Raw = 0,
    /// One zstd frame: `stored_len < plain_len`.
    Zstd = 1,
}

/// Flag bits of the header's `flags` field.
pub(crate) mod flags {
    /// W: write-ordered.
    pub const WRITE: u16 = 1 << 0;
    /// M: not write-ordered.
    pub const MERGE: u16 = 1 << 1;
    /// An idle heartbeat: W, no records.
    pub const HEARTBEAT: u16 = 1 << 2;
    /// Version 3: the first M frame of a new stretch of the chain, after
    /// frames the relay lost (it may name a predecessor the target passed).
    pub const REBASE: u16 = 1 << 3;
    /// Every bit the newest version defines.
    pub const KNOWN: u16 = WRITE | MERGE | HEARTBEAT | REBASE;
}

/// Byte offsets of the header fields (for error messages and tests; the table is
/// kept complete even where no error names a field).
#[allow(dead_code)]
pub(crate) mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const HEADER_LEN: usize = 6;
    pub const FLAGS: usize = 8;
    pub const CODEC: usize = 10;
    pub const RESERVED0: usize = 11;
    pub const KEY_EPOCH: usize = 12;
    pub const GROUP: usize = 16;
    pub const FRAME_NO: usize = 48;
    pub const PREV_FRAME_NO: usize = 56;
    pub const FIRST_SEQ: usize = 64;
    pub const LAST_SEQ: usize = 72;
    pub const PREV_LAST_SEQ: usize = 80;
    pub const TIME_FIRST_US: usize = 88;
    pub const TIME_LAST_US: usize = 96;
    pub const RECORD_COUNT: usize = 104;
    pub const PLAIN_LEN: usize = 108;
    pub const STORED_LEN: usize = 112;
    pub const RESERVED1: usize = 116;
}

/// Maximum length of a group name in bytes.
pub const GROUP_NAME_MAX: usize = 32;

/// A consistency group's name: 1..=32 bytes of `[a-z0-9-]`, not starting or ending
/// with `-`. Stored zero-padded in 32 bytes, so it is `Copy` and fits the header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName {
    bytes: [u8; GROUP_NAME_MAX],
    len: u8,
}

impl GroupName {
    /// Validate `name` against the group naming rules.
    pub fn new(name: &str) -> Result<GroupName, FrameError> {
        Self::from_name_bytes(name.as_bytes()).map_err(|detail| FrameError::InvalidGroupName {
            name: name.to_string(),
            detail,
        })
    }

    fn from_name_bytes(b: &[u8]) -> Result<GroupName, &'static str> {
        if b.is_empty() {
            return Err("empty");
        }
        if b.len() > GROUP_NAME_MAX {
            return Err("longer than 32 bytes");
        }
        if !b
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return Err("only a-z, 0-9 and '-' are allowed");
        }
        if b[0] == b'-' || b[b.len() - 1] == b'-' {
            return Err("must not start or end with '-'");
        }
        let mut bytes = [0u8; GROUP_NAME_MAX];
        bytes[..b.len()].copy_from_slice(b);
        Ok(GroupName {
            bytes,
            len: b.len() as u8,
        })
    }

    /// Decode the zero-padded 32-byte header form: the name, then only zero bytes.
    pub fn from_bytes32(raw: &[u8; GROUP_NAME_MAX]) -> Result<GroupName, &'static str> {
        let len = raw.iter().position(|&c| c == 0).unwrap_or(GROUP_NAME_MAX);
        if raw[len..].iter().any(|&c| c != 0) {
            return Err("bytes after the terminating zero must all be zero");
        }
        Self::from_name_bytes(&raw[..len])
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored, so this cannot fail.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }

    /// The zero-padded 32-byte header form.
    pub fn as_bytes32(&self) -> &[u8; GROUP_NAME_MAX] {
        &self.bytes
    }
}

impl FromStr for GroupName {
    type Err = FrameError;
    fn from_str(s: &str) -> Result<GroupName, FrameError> {
        GroupName::new(s)
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupName({:?})", self.as_str())
    }
}

impl TryFrom<String> for GroupName {
    type Error = FrameError;
    fn try_from(s: String) -> Result<GroupName, FrameError> {
        GroupName::new(&s)
    }
}

impl From<GroupName> for String {
    fn from(g: GroupName) -> String {
        g.as_str().to_string()
    }
}

impl serde::Serialize for GroupName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for GroupName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<GroupName, D::Error> {
        let s = String::deserialize(d)?;
        GroupName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// The header exactly as on the wire. Integer fields hold little-endian values
/// (convert with `from_le`/`to_le`); read it with `bytemuck::pod_read_unaligned`.
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct RawFrameHeader {
    /// `b"TMFR"`.
    pub magic: [u8; 4],
    /// Format version.
    pub version: u16,
    /// Header length, 128.
    pub header_len: u16,
    /// Flag bits W, M, HEARTBEAT.
    pub flags: u16,
    /// Payload codec.
    pub codec: u8,
    /// Zero.
    pub reserved0: u8,
    /// Data key epoch.
    pub key_epoch: u32,
    /// Zero-padded group name.
    pub group: [u8; 32],
    /// This frame's number.
    pub frame_no: u64,
    /// Predecessor's frame number (0: start of chain).
    pub prev_frame_no: u64,
    /// Seq of the first record.
    pub first_seq: u64,
    /// Seq of the last record.
    pub last_seq: u64,
    /// Last seq of the predecessor.
    pub prev_last_seq: u64,
    /// Capture time of the first record (µs since the Unix epoch).
    pub time_first_us: u64,
    /// Capture time of the last record.
    pub time_last_us: u64,
    /// Number of records.
    pub record_count: u32,
    /// Uncompressed payload length.
    pub plain_len: u32,
    /// Stored payload length.
    pub stored_len: u32,
    /// Zero.
    pub reserved1: [u8; 12],
}

const _: () = assert!(std::mem::size_of::<RawFrameHeader>() == HEADER_LEN);

/// A validated frame header. Every value of this type that came from
/// [`FrameHeader::parse`] or [`FrameHeader::decode`] satisfies all header rules
/// (the same for versions 1 and 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Format version.
    pub version: FormatVersion,
    /// W or M.
    pub kind: FrameKind,
    /// Idle heartbeat (always W with no records).
    pub heartbeat: bool,
    /// Starts a new stretch of the chain after lost frames (version 3, M only).
    pub rebase: bool,
    /// Payload codec.
    pub codec: Codec,
    /// Epoch of the data key that sealed the frame (>= 1).
    pub key_epoch: u32,
    /// Consistency group.
    pub group: GroupName,
    /// This frame's number (>= 1).
    pub frame_no: u64,
    /// Predecessor's number in the chain (0: start of chain; < `frame_no`).
    pub prev_frame_no: u64,
    /// Seq of the first record (`prev_last_seq` when empty).
    pub first_seq: u64,
    /// Seq of the last record (`prev_last_seq` when empty).
    pub last_seq: u64,
    /// Last seq of the predecessor frame.
    pub prev_last_seq: u64,
    /// Capture time of the first record, µs since the Unix epoch.
    pub time_first_us: u64,
    /// Capture time of the last record (>= `time_first_us`).
    pub time_last_us: u64,
    /// Number of records.
    pub record_count: u32,
    /// Uncompressed payload length (record headers + write data).
    pub plain_len: u32,
    /// Length of the stored (encrypted) payload after the header.
    pub stored_len: u32,
}

fn bad(frame_no: u64, field: &'static str, offset: usize, detail: impl Into<String>) -> FrameError {
    FrameError::InvalidHeader {
        frame_no,
        field,
        offset,
        detail: detail.into(),
    }
}

impl FrameHeader {
    /// Parse and validate a whole frame's header without a key: the structure of the
    /// header, and that `bytes.len()` is exactly `128 + stored_len + 16`. This is
    /// the relay's admission check.
    pub fn parse(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
        let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::TooShort { len: bytes.len() });
        };
        let h = FrameHeader::decode(head)?;
        if bytes.len() != h.wire_len() {
            return Err(FrameError::LengthMismatch {
                frame_no: h.frame_no,
                stored_len: h.stored_len,
                expected: h.wire_len(),
                actual: bytes.len(),
            });
        }
        Ok(h)
    }

    /// Decode and validate the 128 header bytes alone (for a reader that then needs
    /// [`FrameHeader::wire_len`] to know how many more bytes belong to the frame).
    pub fn decode(head: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let raw: RawFrameHeader = bytemuck::pod_read_unaligned(head);
        let frame_no = u64::from_le(raw.frame_no);
        if raw.magic != MAGIC {
            return Err(FrameError::BadMagic { found: raw.magic });
        }
        let version_raw = u16::from_le(raw.version);
        let Some(version) = FormatVersion::from_u16(version_raw) else {
            return Err(FrameError::UnsupportedVersion {
                frame_no,
                version: version_raw,
            });
        };
        let header_len = u16::from_le(raw.header_len);
        if header_len as usize != HEADER_LEN {
            return Err(bad(
                frame_no,
                "header_len",
                off::HEADER_LEN,
                format!(
                    "{header_len}, version {} requires {HEADER_LEN}",
                    version as u16
                ),
            ));
        }
        let fl = u16::from_le(raw.flags);
        if fl & !flags::KNOWN != 0 {
            return Err(bad(
                frame_no,
                "flags",
                off::FLAGS,
                format!("unknown flag bits {:#06x}", fl & !flags::KNOWN),
            ));
        }
        let kind = match (fl & flags::WRITE != 0, fl & flags::MERGE != 0) {
            (true, false) => FrameKind::Write,
            (false, true) => FrameKind::Merge,
            _ => {
                return Err(bad(
                    frame_no,
                    "flags",
                    off::FLAGS,
                    format!("{fl:#06x}: exactly one of W (bit 0) and M (bit 1) must be set"),
                ));
            }
        };
        let codec = match raw.codec {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            c => {
                return Err(bad(
                    frame_no,
                    "codec",
                    off::CODEC,
                    format!("unknown codec {c}"),
                ));
            }
        };
        if raw.reserved0 != 0 {
            return Err(bad(frame_no, "reserved", off::RESERVED0, "must be zero"));
        }
        let group = GroupName::from_bytes32(&raw.group)
            .map_err(|d| bad(frame_no, "group", off::GROUP, d))?;
        if raw.reserved1 != [0u8; 12] {
            return Err(bad(frame_no, "reserved", off::RESERVED1, "must be zero"));
        }
        let h = FrameHeader {
            version,
            kind,
            heartbeat: fl & flags::HEARTBEAT != 0,
            rebase: fl & flags::REBASE != 0,
            codec,
            key_epoch: u32::from_le(raw.key_epoch),
            group,
            frame_no,
            prev_frame_no: u64::from_le(raw.prev_frame_no),
            first_seq: u64::from_le(raw.first_seq),
            last_seq: u64::from_le(raw.last_seq),
            prev_last_seq: u64::from_le(raw.prev_last_seq),
            time_first_us: u64::from_le(raw.time_first_us),
            time_last_us: u64::from_le(raw.time_last_us),
            record_count: u32::from_le(raw.record_count),
            plain_len: u32::from_le(raw.plain_len),
            stored_len: u32::from_le(raw.stored_len),
        };
        h.validate()?;
        Ok(h)
    }

    /// Check the header rules between fields (the ones the type system does not carry).
    pub fn validate(&self) -> Result<(), FrameError> {
        let n = self.frame_no;
        if self.key_epoch == 0 {
            return Err(bad(n, "key_epoch", off::KEY_EPOCH, "must be >= 1"));
        }
        if n == 0 {
            return Err(bad(n, "frame_no", off::FRAME_NO, "must be >= 1"));
        }
        if self.prev_frame_no >= n {
            return Err(bad(
                n,
                "prev_frame_no",
                off::PREV_FRAME_NO,
                format!("{} must be < frame_no {n}", self.prev_frame_no),
            ));
        }
        if self.time_last_us < self.time_first_us {
            return Err(bad(
                n,
                "time_last_us",
                off::TIME_LAST_US,
                format!(
                    "{} is before time_first_us {}",
                    self.time_last_us, self.time_first_us
                ),
            ));
        }
        if self.plain_len > MAX_PLAIN_LEN {
            return Err(bad(
                n,
                "plain_len",
                off::PLAIN_LEN,
                format!("{} exceeds the maximum {MAX_PLAIN_LEN}", self.plain_len),
            ));
        }
        let count = self.record_count;
        if count == 0 {
            if self.plain_len != 0 {
                return Err(bad(
                    n,
                    "plain_len",
                    off::PLAIN_LEN,
                    format!("{} but record_count is 0", self.plain_len),
                ));
            }
            if self.first_seq != self.prev_last_seq {
                return Err(bad(
                    n,
                    "first_seq",
                    off::FIRST_SEQ,
                    format!(
                        "{} must equal prev_last_seq {} in an empty frame",
                        self.first_seq, self.prev_last_seq
                    ),
                ));
            }
            if self.last_seq != self.prev_last_seq {
                return Err(bad(
                    n,
                    "last_seq",
                    off::LAST_SEQ,
                    format!(
                        "{} must equal prev_last_seq {} in an empty frame",
                        self.last_seq, self.prev_last_seq
                    ),
                ));
            }
        } else {
            if self.heartbeat {
                return Err(bad(
                    n,
                    "record_count",
                    off::RECORD_COUNT,
                    format!("{count} but a heartbeat frame carries no records"),
                ));
            }
            if self.first_seq <= self.prev_last_seq {
                return Err(bad(
                    n,
                    "first_seq",
                    off::FIRST_SEQ,
                    format!(
                        "{} must be > prev_last_seq {}",
                        self.first_seq, self.prev_last_seq
                    ),
                ));
            }
            if self.last_seq < self.first_seq {
                return Err(bad(
                    n,
                    "last_seq",
                    off::LAST_SEQ,
                    format!("{} is below first_seq {}", self.last_seq, self.first_seq),
                ));
            }
            if self.last_seq - self.first_seq < u64::from(count) - 1 {
                return Err(bad(
                    n,
                    "record_count",
                    off::RECORD_COUNT,
                    format!(
                        "{count} records cannot have distinct seqs in {}..={}",
                        self.first_seq, self.last_seq
                    ),
                ));
            }
            if u64::from(self.plain_len) < u64::from(count) * RECORD_HEADER_LEN as u64 {
                return Err(bad(
                    n,
                    "plain_len",
                    off::PLAIN_LEN,
                    format!(
                        "{} is less than {count} record headers of {RECORD_HEADER_LEN} bytes",
                        self.plain_len
                    ),
                ));
            }
        }
        if self.heartbeat && self.kind != FrameKind::Write {
            return Err(bad(n, "flags", off::FLAGS, "a heartbeat frame must be W"));
        }
        if self.rebase && self.kind != FrameKind::Merge {
            return Err(bad(n, "flags", off::FLAGS, "a REBASE frame must be M"));
        }
        if self.rebase && self.version < FormatVersion::V3 {
            return Err(bad(
                n,
                "flags",
                off::FLAGS,
                format!(
                    "REBASE (bit 3) requires version 3 (this frame is version {})",
                    self.version as u16
                ),
            ));
        }
        match self.codec {
            Codec::Raw if self.stored_len != self.plain_len => Err(bad(
                n,
                "stored_len",
                off::STORED_LEN,
                format!(
                    "{} must equal plain_len {} for the raw codec",
                    self.stored_len, self.plain_len
                ),
            )),
            Codec::Zstd if self.stored_len >= self.plain_len => Err(bad(
                n,
                "stored_len",
                off::STORED_LEN,
                format!(
                    "{} must be below plain_len {} for the zstd codec",
                    self.stored_len, self.plain_len
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The raw wire form of this header.
    pub fn to_raw(&self) -> RawFrameHeader {
        RawFrameHeader {
            magic: MAGIC,
            version: (self.version as u16).to_le(),
            header_len: (HEADER_LEN as u16).to_le(),
            flags: self.flags().to_le(),
            codec: self.codec as u8,
            reserved0: 0,
            key_epoch: self.key_epoch.to_le(),
            group: *self.group.as_bytes32(),
            frame_no: self.frame_no.to_le(),
            prev_frame_no: self.prev_frame_no.to_le(),
            first_seq: self.first_seq.to_le(),
            last_seq: self.last_seq.to_le(),
            prev_last_seq: self.prev_last_seq.to_le(),
            time_first_us: self.time_first_us.to_le(),
            time_last_us: self.time_last_us.to_le(),
            record_count: self.record_count.to_le(),
            plain_len: self.plain_len.to_le(),
            stored_len: self.stored_len.to_le(),
            reserved1: [0; 12],
        }
    }

    /// The 128 wire bytes of this header (not validated: encode what you built).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        bytemuck::cast(self.to_raw())
    }

    /// The `flags` field value.
    pub fn flags(&self) -> u16 {
        let kind = match self.kind {
            FrameKind::Write => flags::WRITE,
            FrameKind::Merge => flags::MERGE,
        };
        let heartbeat = if self.heartbeat { flags::HEARTBEAT } else { 0 };
        let rebase = if self.rebase { flags::REBASE } else { 0 };
        kind | heartbeat | rebase
    }

    /// Length of the whole frame on the wire: header, stored payload, tag.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.stored_len as usize + TAG_LEN
    }

    /// Bytes of write data in the payload (after the record headers).
    pub fn data_len(&self) -> u32 {
        self.plain_len
            .saturating_sub(self.record_count.saturating_mul(RECORD_HEADER_LEN as u32))
    }

    /// The AES-GCM nonce: key_epoch (u32 LE) followed by frame_no (u64 LE).
    pub fn nonce(&self) -> [u8; 12] {
        nonce(self.key_epoch, self.frame_no)
    }
}

/// The AES-GCM nonce for a frame: `key_epoch` u32 LE || `frame_no` u64 LE.
pub(crate) fn nonce(key_epoch: u32, frame_no: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&key_epoch.to_le_bytes());
    n[4..].copy_from_slice(&frame_no.to_le_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorKind};
    use proptest::prelude::*;

    fn sample() -> FrameHeader {
        FrameHeader {
            version: FormatVersion::V1,
            kind: FrameKind::Write,
            heartbeat: false,
            rebase: false,
            codec: Codec::Zstd,
            key_epoch: 3,
            group: "db-01".parse().unwrap(),
            frame_no: 10,
            prev_frame_no: 9,
            first_seq: 101,
            last_seq: 110,
            prev_last_seq: 100,
            time_first_us: 1_000,
            time_last_us: 2_000,
            record_count: 4,
            plain_len: 4096,
            stored_len: 1000,
        }
    }

    fn frame_of(h: &FrameHeader) -> Vec<u8> {
        let mut v = h.encode().to_vec();
        v.resize(h.wire_len(), 0);
        v
    }

    #[test]
    fn group_names() {
        for ok in ["a", "db-01", "0", "a--b", &"x".repeat(32)] {
            let g: GroupName = ok.parse().unwrap();
            assert_eq!(g.as_str(), ok);
            assert_eq!(g.to_string(), ok);
            assert_eq!(GroupName::from_bytes32(g.as_bytes32()).unwrap(), g);
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a b", "é", &"x".repeat(33)] {
            let e = bad.parse::<GroupName>().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let mut raw = [0u8; 32];
        assert!(GroupName::from_bytes32(&raw).is_err());
        raw[0] = b'a';
        raw[5] = b'b';
        assert!(GroupName::from_bytes32(&raw).is_err());
        let g: GroupName = serde_json::from_str("\"web\"").unwrap();
        assert_eq!(serde_json::to_string(&g).unwrap(), "\"web\"");
        assert!(serde_json::from_str::<GroupName>("\"Web\"").is_err());
    }

    #[test]
    fn golden_header_bytes() {
        let h = sample();
        let hex: String = h.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "544d4652",
                "0100",
                "8000",
                "0100",
                "01",
                "00",
                "03000000",
                "64622d3031000000000000000000000000000000000000000000000000000000",
                "0a00000000000000",
                "0900000000000000",
                "6500000000000000",
                "6e00000000000000",
                "6400000000000000",
                "e803000000000000",
                "d007000000000000",
                "04000000",
                "00100000",
                "e8030000",
                "000000000000000000000000"
            )
        );
        assert_eq!(FrameHeader::parse(&frame_of(&h)).unwrap(), h);
        assert_eq!(h.nonce(), [3, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn valid_variants_round_trip() {
        let mut m = sample();
        m.kind = FrameKind::Merge;
        let mut hb = sample();
        hb.heartbeat = true;
        hb.record_count = 0;
        hb.plain_len = 0;
        hb.stored_len = 0;
        hb.codec = Codec::Raw;
        hb.first_seq = 100;
        hb.last_seq = 100;
        hb.prev_frame_no = 0;
        let mut raw = sample();
        raw.codec = Codec::Raw;
        raw.stored_len = raw.plain_len;
        for h in [m, hb, raw] {
            assert_eq!(FrameHeader::parse(&frame_of(&h)).unwrap(), h);
        }
    }

    /// Each header rule, broken once, on an otherwise valid header.
    #[test]
    fn every_header_rule_is_enforced() {
        type Edit = fn(&mut FrameHeader);
        let cases: &[(&str, Edit)] = &[
            ("key_epoch", |h| h.key_epoch = 0),
            ("frame_no", |h| {
                h.frame_no = 0;
                h.prev_frame_no = 0
            }),
            ("prev_frame_no", |h| h.prev_frame_no = 10),
            ("prev_frame_no", |h| h.prev_frame_no = 11),
            ("time_last_us", |h| h.time_last_us = 999),
            ("plain_len", |h| {
                h.plain_len = MAX_PLAIN_LEN + 1;
            }),
            ("plain_len", |h| {
                h.record_count = 0;
                h.first_seq = 100;
                h.last_seq = 100;
            }),
            ("first_seq", |h| {
                h.record_count = 0;
                h.plain_len = 0;
                h.stored_len = 0;
                h.codec = Codec::Raw;
                h.first_seq = 101;
                h.last_seq = 100;
            }),
            ("last_seq", |h| {
                h.record_count = 0;
                h.plain_len = 0;
                h.stored_len = 0;
                h.codec = Codec::Raw;
                h.first_seq = 100;
                h.last_seq = 101;
            }),
            ("record_count", |h| h.heartbeat = true),
            ("first_seq", |h| h.first_seq = 100),
            ("last_seq", |h| h.last_seq = 100),
            ("record_count", |h| h.last_seq = 103),
            ("plain_len", |h| {
                h.plain_len = 127;
                h.stored_len = 100
            }),
            ("flags", |h| {
                h.heartbeat = true;
                h.kind = FrameKind::Merge;
                h.record_count = 0;
                h.plain_len = 0;
                h.stored_len = 0;
                h.codec = Codec::Raw;
                h.first_seq = 100;
                h.last_seq = 100;
            }),
            ("stored_len", |h| h.codec = Codec::Raw),
            ("stored_len", |h| h.stored_len = 4096),
            ("stored_len", |h| h.stored_len = 5000),
        ];
        for (field, edit) in cases {
            let mut h = sample();
            edit(&mut h);
            let e = FrameHeader::parse(&frame_of(&h)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            match &e {
                FrameError::InvalidHeader { field: f, .. } => assert_eq!(f, field, "{e}"),
                other => panic!("expected InvalidHeader for {field}, got {other}"),
            }
        }
    }

    /// Raw byte edits that no FrameHeader can express.
    #[test]
    fn raw_field_rejections() {
        let good = frame_of(&sample());
        let cases: &[(usize, &[u8], &str)] = &[
            (off::MAGIC, b"TMFX", "magic"),
            (off::VERSION, &[5, 0], "version 5"),
            (off::VERSION, &[0, 0], "version 0"),
            (off::HEADER_LEN, &[129, 0], "header_len"),
            (off::FLAGS, &[0x09, 0], "flags"),
            (off::FLAGS, &[0x00, 0], "flags"),
            (off::FLAGS, &[0x03, 0], "flags"),
            (off::FLAGS, &[0x01, 0x80], "flags"),
            (off::FLAGS, &[0x10, 0], "flags"),
            // REBASE on a W frame, and on an M frame of version 1.
            (off::FLAGS, &[0x09, 0], "flags"),
            (
                off::FLAGS,
                &[0x0a, 0],
                "flags REBASE (bit 3) requires version 3",
            ),
            (off::CODEC, &[2], "codec"),
            (off::RESERVED0, &[1], "reserved"),
            (off::GROUP, b"DB", "group"),
            (off::GROUP + 10, b"x", "group"),
            (off::GROUP, &[0], "group"),
            (off::RESERVED1 + 11, &[1], "reserved"),
        ];
        for (at, bytes, what) in cases {
            let mut f = good.clone();
            f[*at..*at + bytes.len()].copy_from_slice(bytes);
            let e = FrameHeader::parse(&f).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}");
            let msg = e.to_string();
            let key = what.split(' ').next().unwrap();
            assert!(msg.contains(key) || msg.contains("TMFR"), "{what}: {msg}");
        }
        let mut f = good.clone();
        f[off::VERSION] = 7;
        let msg = FrameHeader::parse(&f).unwrap_err().to_string();
        assert!(msg.contains("unsupported frame format version 7"), "{msg}");
        assert!(msg.contains("frame 10"), "{msg}");
    }

    #[test]
    fn length_must_match_exactly() {
        let good = frame_of(&sample());
        for len in 0..good.len() {
            let e = FrameHeader::parse(&good[..len]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            if len < HEADER_LEN {
                assert!(matches!(e, FrameError::TooShort { .. }));
            } else {
                assert!(matches!(e, FrameError::LengthMismatch { .. }), "{e}");
            }
        }
        let mut long = good.clone();
        long.push(0);
        let e = FrameHeader::parse(&long).unwrap_err();
        assert!(e.to_string().contains("1145"), "{e}");
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = FrameHeader::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_near_valid(
            edits in proptest::collection::vec((0usize..HEADER_LEN, any::<u8>()), 1..6),
            extra in 0usize..3,
        ) {
            let mut f = frame_of(&sample());
            for (at, v) in edits { f[at] = v; }
            f.truncate(f.len().saturating_sub(extra));
            if let Ok(h) = FrameHeader::parse(&f) {
                prop_assert!(h.validate().is_ok());
                prop_assert_eq!(&h.encode()[..], &f[..HEADER_LEN]);
            }
        }
    }
}
