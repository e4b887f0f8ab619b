//! Frame format (v1, v2): the sealed unit an agent sends.
//!
//! A frame is a 128-byte little-endian [`FrameHeader`] (readable by the relay
//! without any key), then the payload (record headers and write data, optionally
//! zstd-compressed) encrypted with AES-256-GCM using the header as associated data,
//! then the 16-byte tag. [`Sealer`] builds frames on the agent, [`Opener`] verifies
//! and opens them on the target, [`FrameHeader::parse`] is the relay's key-less
//! structural check. The byte layout, validation rules, the nonce-uniqueness
//! argument and the version rules are in `docs/FORMAT.md` ("Frame v1", and
//! "Frame v2" for the Tag and Note marker records of [`marker`]).

mod header;
mod key;
pub mod marker;
mod record;
mod seal;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use crate::error::{Classify, ErrorKind};

pub use header::{Codec, FormatVersion, FrameHeader, FrameKind, GroupName, RawFrameHeader};
pub use key::DataKey;
pub use marker::{
    NOTE_TEXT_MAX, NoteReason, NoteRecord, Record, TAG_APP_CONSISTENT, TAG_NAME_MAX, TagRecord,
    check_tag_name,
};
pub use record::{RawRecordHeader, RecordHeader, RecordKind, RecordRef, WireKind, WireRecord};
pub use seal::{
    AllRecords, FrameMeta, OpenedFrame, Opener, RecordIter, SealedFrame, Sealer, zstd_level_range,
};

/// Frame magic, the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TMFR";
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 128;
/// Size of the AES-GCM authentication tag that ends every frame.
pub const TAG_LEN: usize = 16;
/// Size of one record header in the payload.
pub const RECORD_HEADER_LEN: usize = 32;
/// Largest uncompressed payload a frame may carry (64 MiB). Bounds every
/// allocation a decoder makes from a header's lengths.
pub const MAX_PLAIN_LEN: u32 = 64 << 20;
/// Largest whole frame on the wire: header, raw payload of [`MAX_PLAIN_LEN`], tag.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PLAIN_LEN as usize + TAG_LEN;

/// Everything that can go wrong building, parsing or opening a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than a header.
    #[error("frame too short: {len} bytes, the frame header alone is {HEADER_LEN} bytes")]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// The first four bytes are not `TMFR`.
    #[error("not a tidemark frame: magic {found:02x?} at offset 0, expected \"TMFR\"")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A format version this build does not know.
    #[error(
        "frame {frame_no}: unsupported frame format version {version} at offset 4 \
         (this build reads versions 1..={max})",
        max = FormatVersion::LATEST as u16
    )]
    UnsupportedVersion {
        /// Frame number as read from the (otherwise unchecked) header.
        frame_no: u64,
        /// The version found.
        version: u16,
    },
    /// A header field breaks a rule of the format.
    #[error("frame {frame_no}: invalid header field `{field}` at offset {offset}: {detail}")]
    InvalidHeader {
        /// Frame number as read from the header (may itself be the invalid field).
        frame_no: u64,
        /// Field name as in docs/FORMAT.md.
        field: &'static str,
        /// Byte offset of the field in the header.
        offset: usize,
        /// What is wrong.
        detail: String,
    },
    /// Buffer length differs from `128 + stored_len + 16` (truncated or trailing bytes).
    #[error(
        "frame {frame_no}: length {actual} bytes does not match its header \
         ({HEADER_LEN} + stored_len {stored_len} + {TAG_LEN} = {expected})"
    )]
    LengthMismatch {
        /// Frame number from the header.
        frame_no: u64,
        /// stored_len from the header.
        stored_len: u32,
        /// The length the header implies.
        expected: usize,
        /// The length received.
        actual: usize,
    },
    /// The frame belongs to another group than the opener's.
    #[error("frame {frame_no} is for group `{found}`, but this opener is for group `{expected}`")]
    WrongGroup {
        /// Frame number from the header.
        frame_no: u64,
        /// The opener's group.
        expected: GroupName,
        /// The frame's group.
        found: GroupName,
    },
    /// No data key for the frame's key epoch.
    #[error(
        "group `{group}` frame {frame_no}: no data key for key epoch {epoch} (known epochs {known:?})"
    )]
    UnknownEpoch {
        /// Group of the frame.
        group: GroupName,
        /// Frame number.
        frame_no: u64,
        /// The frame's key epoch.
        epoch: u32,
        /// Epochs the opener has keys for.
        known: Vec<u32>,
    },
    /// The AES-GCM tag does not verify: wrong key or tampered frame.
    #[error(
        "group `{group}` frame {frame_no}: authentication failed with the key of epoch {epoch} \
         (wrong data key, or the frame was altered)"
    )]
    AuthFailed {
        /// Group of the frame.
        group: GroupName,
        /// Frame number.
        frame_no: u64,
        /// Key epoch used.
        epoch: u32,
    },
    /// Authenticated payload does not decompress to exactly `plain_len` bytes.
    #[error(
        "group `{group}` frame {frame_no}: payload does not decompress to plain_len {plain_len} bytes: {detail}"
    )]
    Decompress {
        /// Group of the frame.
        group: GroupName,
        /// Frame number.
        frame_no: u64,
        /// Expected uncompressed length.
        plain_len: u32,
        /// What zstd or the length check said.
        detail: String,
    },
    /// An opened payload holds an invalid record header.
    #[error(
        "group `{group}` frame {frame_no}: record {index} (payload offset {offset}): \
         invalid `{field}`: {detail}"
    )]
    InvalidRecord {
        /// Group of the frame.
        group: GroupName,
        /// Frame number.
        frame_no: u64,
        /// Index of the record in the frame.
        index: usize,
        /// Byte offset of the record header in the plaintext payload.
        offset: usize,
        /// Field name.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The sealer was asked to build a frame that would break the format's rules.
    #[error("group `{group}` frame {frame_no}: cannot seal: {detail}")]
    InvalidInput {
        /// Group of the frame.
        group: GroupName,
        /// Frame number requested.
        frame_no: u64,
        /// What is wrong.
        detail: String,
    },
    /// zstd level outside zstd's range.
    #[error("zstd level {level} is out of range {min}..={max}")]
    ZstdLevel {
        /// Level requested.
        level: i32,
        /// Lowest level zstd accepts (negative: fast modes).
        min: i32,
        /// Highest level zstd accepts.
        max: i32,
    },
    /// zstd context could not be created or configured.
    #[error("cannot set up zstd context: {0}")]
    Zstd(#[source] std::io::Error),
    /// Key epoch 0 was given; epochs start at 1.
    #[error("key epoch must be >= 1, got 0")]
    ZeroEpoch,
    /// The same key epoch was given twice to an opener.
    #[error("data key for epoch {epoch} given twice")]
    DuplicateEpoch {
        /// The repeated epoch.
        epoch: u32,
    },
    /// A group name breaks the naming rules.
    #[error("invalid group name {name:?}: {detail}")]
    InvalidGroupName {
        /// The name (lossy if not UTF-8).
        name: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// A data key in hex form is malformed.
    #[error("invalid data key: {detail}")]
    InvalidKey {
        /// What is wrong (never the key material).
        detail: String,
    },
    /// A data key file cannot be read.
    #[error("cannot read data key file {path}: {source}")]
    KeyFileRead {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A data key file does not hold 64 hex characters.
    #[error("data key file {path}: {detail}")]
    KeyFileInvalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong (never the key material).
        detail: String,
    },
    /// The OS random source failed.
    #[error("cannot generate a data key: OS random source failed: {detail}")]
    Random {
        /// getrandom's error.
        detail: String,
    },
}

impl Classify for FrameError {
    fn kind(&self) -> ErrorKind {
        use FrameError::*;
        match self {
            TooShort { .. }
            | BadMagic { .. }
            | UnsupportedVersion { .. }
            | InvalidHeader { .. }
            | LengthMismatch { .. }
            | Decompress { .. }
            | InvalidRecord { .. }
            | InvalidInput { .. } => ErrorKind::Corrupt,
            WrongGroup { .. } | UnknownEpoch { .. } | AuthFailed { .. } => ErrorKind::Auth,
            ZstdLevel { .. }
            | ZeroEpoch
            | DuplicateEpoch { .. }
            | InvalidGroupName { .. }
            | InvalidKey { .. }
            | KeyFileInvalid { .. } => ErrorKind::Config,
            Zstd(_) | KeyFileRead { .. } | Random { .. } => ErrorKind::Io,
        }
    }
}
