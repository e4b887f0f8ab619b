//! VMDK image backends: monolithicSparse ([`VmdkSparseImage`]), monolithicFlat
//! ([`VmdkFlatImage`]) and the streamOptimized export
//! ([`export_stream_optimized`]). The layouts, the choices where the spec or
//! qemu leave one, and what is validated are in docs/IMAGE.md, "VMDK".
//!
//! Every byte read from a VMDK file is treated as hostile: a corrupt file gives
//! an [`ImageError::Vmdk`] naming the path, the structure and the offset, never
//! a panic, an unbounded allocation or a write outside the file's own grains.

mod cache;
mod descriptor;
mod flat;
mod header;
mod sparse;
mod stream;

#[cfg(test)]
mod tests;

pub use descriptor::{Access, Descriptor, DescriptorError, Extent, ExtentKind};
pub use flat::VmdkFlatImage;
pub use header::{HeaderError, SparseHeader};
pub use sparse::{GT_CACHE_BYTES, VmdkSparseImage};
pub use stream::{SourceRead, StreamStats, export_image_stream_optimized, export_stream_optimized};

use crate::error::{Classify, ErrorKind};

/// Bytes per VMDK sector: every offset and size in the format counts these.
pub const SECTOR: u64 = 512;

/// Grain size tidemark creates: 128 sectors (64 KiB), as VMware and qemu do.
pub const NEW_GRAIN_SECTORS: u64 = 128;

/// Grain-table entries per table tidemark creates (the spec's fixed 512).
pub const NEW_GTES_PER_GT: u32 = 512;

/// Which grain directory a structure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directory {
    /// The grain directory (`gdOffset`).
    Primary,
    /// The redundant grain directory (`rgdOffset`).
    Redundant,
}

impl std::fmt::Display for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Directory::Primary => "grain directory",
            Directory::Redundant => "redundant grain directory",
        })
    }
}

/// What is wrong with a VMDK, or why tidemark cannot use it. Each variant
/// names the structure and where it is; [`ImageError::Vmdk`] adds the path.
#[derive(Debug, thiserror::Error)]
pub enum VmdkError {
    /// The file is shorter than one header sector.
    #[error("file is {len} bytes, too short for a VMDK header")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// The header sector is invalid.
    #[error("sparse extent header: {0}")]
    Header(#[from] HeaderError),
    /// The descriptor is invalid.
    #[error("descriptor at byte {offset}: {source}")]
    Descriptor {
        /// Byte offset of the descriptor in its file.
        offset: u64,
        /// What is wrong.
        source: DescriptorError,
    },
    /// The descriptor is well-formed but does not describe what was expected.
    #[error("descriptor: {why}")]
    DescriptorContent {
        /// What is wrong.
        why: String,
    },
    /// The file ends before the metadata the header announces.
    #[error(
        "file truncated: {what} needs sectors up to {needed} but the file has {file_sectors} sectors"
    )]
    Truncated {
        /// Which structure.
        what: String,
        /// Sector the structure ends at.
        needed: u64,
        /// Sectors in the file (rounded up).
        file_sectors: u64,
    },
    /// A grain-directory entry points outside the file or into the header.
    #[error(
        "{dir} entry {index} points at sector {sector}: grain table of {gt_sectors} sectors is outside the file ({file_sectors} sectors)"
    )]
    GrainTableOutOfFile {
        /// Which directory.
        dir: Directory,
        /// Entry index (= grain table number).
        index: u64,
        /// Sector found.
        sector: u64,
        /// Sectors of one grain table.
        gt_sectors: u64,
        /// Sectors in the file.
        file_sectors: u64,
    },
    /// The two grain directories disagree on whether a grain table exists.
    #[error(
        "grain directory entry {index} is {primary} but redundant grain directory entry {index} is {redundant}: one of them is corrupt"
    )]
    DirectoryMismatch {
        /// Entry index.
        index: u64,
        /// Primary entry.
        primary: u32,
        /// Redundant entry.
        redundant: u32,
    },
    /// Two metadata structures overlap.
    #[error("{a} (sectors {a_start}..{a_end}) overlaps {b} (sectors {b_start}..{b_end})")]
    MetadataOverlap {
        /// First structure.
        a: String,
        /// Its first sector.
        a_start: u64,
        /// Its end sector (exclusive).
        a_end: u64,
        /// Second structure.
        b: String,
        /// Its first sector.
        b_start: u64,
        /// Its end sector (exclusive).
        b_end: u64,
    },
    /// A grain-table entry points outside the file.
    #[error(
        "grain table {gt} entry {entry} points at sector {sector} beyond the end of the file ({file_sectors} sectors; a grain is {grain_sectors} sectors)"
    )]
    GrainOutOfFile {
        /// Grain table number.
        gt: u64,
        /// Entry in the table.
        entry: u64,
        /// Sector found.
        sector: u64,
        /// Sectors in the file.
        file_sectors: u64,
        /// Sectors per grain.
        grain_sectors: u64,
    },
    /// A grain-table entry points into the header, descriptor, a directory or a table.
    #[error(
        "grain table {gt} entry {entry} points at sector {sector}, inside the image's metadata (sectors {meta_start}..{meta_end})"
    )]
    GrainInMetadata {
        /// Grain table number.
        gt: u64,
        /// Entry in the table.
        entry: u64,
        /// Sector found.
        sector: u64,
        /// Start of the metadata it hits.
        meta_start: u64,
        /// End of the metadata it hits.
        meta_end: u64,
    },
    /// The layout is valid VMDK but not one tidemark opens (or writes).
    #[error("unsupported: {what}")]
    Unsupported {
        /// What and why.
        what: String,
    },
    /// A write needs a grain in a grain table the image never allocated.
    #[error(
        "grain directory entry {gt} is empty: the image has no grain table for virtual bytes {start}..{end} (tidemark writes only images whose grain tables are preallocated, as VMware and qemu create them)"
    )]
    GrainTableMissing {
        /// Grain table number.
        gt: u64,
        /// First virtual byte it would cover.
        start: u64,
        /// End virtual byte.
        end: u64,
    },
    /// The extent file cannot grow further: grain-table entries are u32 sectors.
    #[error(
        "extent file is full: a new grain at sector {sector} would pass the 2^32-sector limit of grain-table entries"
    )]
    Full {
        /// Sector the grain would start at.
        sector: u64,
    },
    /// A size that cannot be created as a VMDK.
    #[error("cannot create a VMDK of {size} bytes: {why}")]
    CreateSize {
        /// Requested size.
        size: u64,
        /// Why.
        why: &'static str,
    },
    /// The extent file of a flat image is smaller than its descriptor says.
    #[error("flat extent {file} is {len} bytes but the descriptor needs {needed}")]
    FlatExtentTooSmall {
        /// Extent file.
        file: String,
        /// Its length.
        len: u64,
        /// Bytes needed (offset + size).
        needed: u64,
    },
    /// A compressed grain of a stream could not be produced.
    #[error("compressing grain {grain}: {why}")]
    Compress {
        /// Grain number.
        grain: u64,
        /// Why.
        why: String,
    },
    /// The system random source failed (creating a CID or disk UUID).
    #[error("random source: {0}")]
    Random(getrandom::Error),
}

impl Classify for VmdkError {
    fn kind(&self) -> ErrorKind {
        match self {
            VmdkError::Unsupported { .. }
            | VmdkError::GrainTableMissing { .. }
            | VmdkError::CreateSize { .. }
            | VmdkError::Full { .. } => ErrorKind::Config,
            VmdkError::Compress { .. } | VmdkError::Random(_) => ErrorKind::Io,
            _ => ErrorKind::Corrupt,
        }
    }
}

use super::ImageError;
use std::path::Path;

pub(crate) fn vmdk_err(path: &Path, source: VmdkError) -> ImageError {
    ImageError::Vmdk {
        path: path.to_path_buf(),
        source,
    }
}
