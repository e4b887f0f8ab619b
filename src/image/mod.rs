//! Image backends: how applied writes reach a replica.
//!
//! Shaped like cloud-hypervisor's `block` crate: an image *format* (where a
//! virtual disk offset lives in the backing file: [`RawImage`], the VMDK
//! layouts in [`vmdk`])
//! runs over an I/O *engine* (how file-level writes reach the kernel:
//! [`UringEngine`] or [`SyncEngine`]), and [`open_image`] is the one factory that
//! picks both from an [`ImageSpec`]. A format translates virtual ops into file ops
//! and hands them to the engine through [`IoEngine`]; the engine owns ordering,
//! retries and completion. See docs/IMAGE.md.

mod raw;
pub(crate) mod sync;
mod uring;
pub mod vmdk;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Classify, ErrorKind};

pub use raw::RawImage;
pub use sync::SyncEngine;
pub use uring::UringEngine;
pub use vmdk::{VmdkFlatImage, VmdkSparseImage};

/// Submission queue depth of the io_uring engine: at most this many file
/// operations are in flight at once (the completion queue is twice as deep, so
/// it can never overflow).
pub const URING_ENTRIES: u32 = 256;

/// Size of the shared zero buffer used when zeroing by writing: a zero op is
/// written in chunks of at most this many bytes, whatever its length.
pub const ZERO_CHUNK: usize = 1 << 20;

/// Largest single read or write handed to the kernel (below Linux's
/// 0x7ffff000-byte cap on one transfer; fits the u32 length of an SQE).
pub(crate) const MAX_IO_CHUNK: usize = 1 << 30;

/// One immutable, shared buffer of zeros (in .bss: costs no file size and no
/// allocation). `'static`, so the kernel may read it at any time; aligned to
/// a block, so zero writes may go through an `O_DIRECT` descriptor.
pub(crate) static ZEROS: &[u8; ZERO_CHUNK] = &ZERO_BLOCKS.0;

#[repr(C, align(4096))]
struct ZeroBlocks([u8; ZERO_CHUNK]);
static ZERO_BLOCKS: ZeroBlocks = ZeroBlocks([0u8; ZERO_CHUNK]);

/// One change to apply to an image, at a byte offset of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp<'a> {
    /// Write `data` at `offset`.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Bytes to write; borrowed until `write_batch` returns.
        data: &'a [u8],
    },
    /// Make `len` bytes at `offset` read back as zeros (punching a hole where the
    /// file system allows it).
    Zero {
        /// Byte offset in the image.
        offset: u64,
        /// Number of bytes to zero.
        len: u64,
    },
}

impl WriteOp<'_> {
    /// Byte offset the op starts at.
    pub fn offset(&self) -> u64 {
        match *self {
            WriteOp::Write { offset, .. } | WriteOp::Zero { offset, .. } => offset,
        }
    }

    /// Number of bytes the op covers.
    pub fn len(&self) -> u64 {
        match *self {
            WriteOp::Write { data, .. } => data.len() as u64,
            WriteOp::Zero { len, .. } => len,
        }
    }

    /// True for an op that covers no bytes (applied as a no-op).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// End offset (exclusive), or `None` if `offset + len` overflows a u64.
    pub fn end(&self) -> Option<u64> {
        self.offset().checked_add(self.len())
    }

    /// Which kind of op this is, for error messages.
    pub fn kind(&self) -> OpKind {
        match self {
            WriteOp::Write { .. } => OpKind::Write,
            WriteOp::Zero { .. } => OpKind::Zero,
        }
    }

    /// True when the byte ranges of `self` and `other` intersect.
    pub(crate) fn overlaps(&self, other: &WriteOp<'_>) -> bool {
        // Ranges were checked not to overflow before anything is submitted;
        // saturate anyway so a bad caller cannot panic here.
        let (a0, a1) = (self.offset(), self.offset().saturating_add(self.len()));
        let (b0, b1) = (other.offset(), other.offset().saturating_add(other.len()));
        a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1
    }
}

/// The kind of a [`WriteOp`], named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// [`WriteOp::Write`].
    Write,
    /// [`WriteOp::Zero`].
    Zero,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::Write => "write",
            OpKind::Zero => "zero",
        })
    }
}

/// Layout of the image file, chosen by [`ImageSpec::format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Virtual offset = file offset: a regular file or a block device.
    Raw,
    /// VMDK monolithicSparse: one file with header, embedded descriptor, grain
    /// directories and tables, grains allocated on first write
    /// ([`VmdkSparseImage`]). `create_size` creates one of that capacity.
    VmdkSparse,
    /// VMDK monolithicFlat: `path` is the descriptor, the data is in one flat
    /// extent file beside it (`<stem>-flat.vmdk` when created)
    /// ([`VmdkFlatImage`]).
    VmdkFlat,
}

/// How file operations reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One io_uring per image, up to [`URING_ENTRIES`] ops in flight.
    Uring,
    /// Plain `pwrite`/`pread`/`fallocate`/`fdatasync`, one op at a time.
    Sync,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Uring => "io_uring",
            Engine::Sync => "sync",
        })
    }
}

/// Whether a raw image (or a flat VMDK's extent) takes its block-aligned
/// writes with `O_DIRECT`. See docs/IMAGE.md, "Direct I/O".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// Everything through the page cache.
    Off,
    /// `O_DIRECT` when the file system takes it.
    On,
    /// Decided at open: on for a block device and for a file without holes
    /// (every block written, so no direct write has to allocate), off for a
    /// sparse file, where ext4 would run allocating direct writes one at a
    /// time.
    #[default]
    Auto,
}

/// What to open: path, format, engine, and whether to create it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Regular file or block device.
    pub path: PathBuf,
    /// Layout of the file.
    pub format: ImageFormat,
    /// I/O engine.
    pub engine: Engine,
    /// If the path does not exist, create an image of this many bytes (raw: a
    /// sparse file; VMDK: a new image of that capacity, which must be a
    /// multiple of 512). An existing image is opened as is, whatever this says.
    pub create_size: Option<u64>,
    /// Write block-aligned data with `O_DIRECT` (in place from block-aligned
    /// memory, else through an aligned bounce buffer), when the file system
    /// takes it; everything else goes through the page cache. See
    /// docs/IMAGE.md, "Direct I/O".
    pub direct_io: DirectIo,
}

/// How an engine makes a range read back as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`; on EOPNOTSUPP the engine writes zeros
    /// instead and switches the mode to [`ZeroMode::WriteZeros`] for good.
    PunchHole,
    /// Write zeros in chunks of [`ZERO_CHUNK`] from one shared buffer (block
    /// devices, and file systems that cannot punch holes).
    WriteZeros,
}

/// A replica image opened for applying writes. Used from one thread at a time
/// (the target's apply thread); never from an async executor thread.
pub trait Image: Send + fmt::Debug {
    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;

    /// Apply `ops` so that the result equals applying them one after another in
    /// slice order, even where they overlap. Every op is range-checked first: an
    /// op outside the image fails the whole batch with nothing written. Returns
    /// when every op has completed (written, not yet durable: see [`Image::flush`]).
    /// On an I/O error, every in-flight op has been reaped before this returns and
    /// the error names the op; which of the batch's other ops took effect is then
    /// unspecified (the caller redoes the batch).
    fn write_batch(&mut self, ops: &[WriteOp<'_>]) -> Result<(), ImageError>;

    /// Make everything written so far durable (fdatasync).
    fn flush(&mut self) -> Result<(), ImageError>;

    /// A second handle on the image's file for flushing from another thread:
    /// `sync_data` on it makes durable every write that completed before the
    /// call, while this image keeps taking writes (the target overlaps the
    /// flush of one batch with the writes of the next).
    fn sync_handle(&self) -> Result<std::fs::File, ImageError>;

    /// Read exactly `buf.len()` bytes at `offset` (must lie inside the image).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;

    /// Read every `(offset, buf)` of `reads` in full, as [`Image::read_at`]
    /// each would, but handed to the engine together (io_uring: up to its ring
    /// depth in flight at once). Every read is range-checked first: one outside
    /// the image fails the batch with [`ImageError::ReadOutOfRange`] and nothing
    /// read. On an I/O error no read is in flight any more when this returns,
    /// the error names a failed read, and what the buffers hold is unspecified.
    /// The default reads them one after another.
    fn read_batch(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<(), ImageError> {
        check_read_batch(self.path(), self.size(), reads)?;
        for (offset, buf) in reads.iter_mut() {
            self.read_at(*offset, buf)?;
        }
        Ok(())
    }

    /// Ask that [`Image::read_batch`] bypass the page cache (`O_DIRECT`) for
    /// reads whose offset, length and buffer address are multiples of
    /// [`crate::util::aligned::BLOCK`], other reads staying buffered. For a
    /// reader that streams through much of the image once (digests), where
    /// the page cache only costs a copy and memory. Returns whether it took
    /// effect; the default (formats without it) does nothing.
    fn direct_reads(&mut self) -> bool {
        false
    }

    /// Path the image was opened from.
    fn path(&self) -> &Path;

    /// The engine the image runs on.
    fn engine(&self) -> Engine;

    /// Grow a regular-file image to `size` bytes (sparse, durable before return).
    /// Never shrinks: a `size` at or below the current size is a no-op. Fails on
    /// a block device with [`ImageError::NotGrowable`], on a VMDK with
    /// [`ImageError::FixedCapacity`].
    fn grow_to(&mut self, size: u64) -> Result<(), ImageError>;

    /// The ranges of `[offset, offset + len)` that may hold data, as sorted,
    /// disjoint, non-empty `(offset, len)` pairs inside the query; everything
    /// else reads as zeros (so a reader may skip it). Conservative: a listed
    /// range may still read as zeros. The range must lie inside the image.
    /// The default lists the whole range.
    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, ImageError> {
        check_read_range(self.path(), self.size(), offset, len)?;
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![(offset, len)]
        })
    }

    /// `Ok` if the image holds at least `needed` bytes, else [`ImageError::TooSmall`].
    fn ensure_size(&self, needed: u64) -> Result<(), ImageError> {
        if self.size() < needed {
            return Err(ImageError::TooSmall {
                path: self.path().to_path_buf(),
                size: self.size(),
                needed,
            });
        }
        Ok(())
    }
}

/// Open (or create) the image described by `spec`.
///
/// With [`Engine::Uring`], a kernel without a usable io_uring (too old, disabled,
/// seccomp) gives [`ImageError::UringUnavailable`]; the caller may retry with
/// [`Engine::Sync`].
pub fn open_image(spec: &ImageSpec) -> Result<Box<dyn Image>, ImageError> {
    match spec.format {
        ImageFormat::Raw => Ok(Box::new(RawImage::open(spec)?)),
        ImageFormat::VmdkSparse => Ok(Box::new(VmdkSparseImage::open(spec)?)),
        ImageFormat::VmdkFlat => Ok(Box::new(VmdkFlatImage::open(spec)?)),
    }
}

/// `Ok` when `[offset, offset + len)` lies inside an image of `size` bytes,
/// else [`ImageError::ReadOutOfRange`].
pub(crate) fn check_read_range(
    path: &Path,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<(), ImageError> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(ImageError::ReadOutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        });
    }
    Ok(())
}

/// Create the image file `path` of `size` bytes exclusively, lay it out with
/// `fill`, and make the file and its directory entry durable. If another
/// process created it meanwhile, open theirs as it is. A failed layout removes
/// the file, so no half-made image is left for a later open to mistake for a
/// real one.
pub(crate) fn create_image_file(
    path: &Path,
    size: u64,
    fill: impl FnOnce(&File) -> io::Result<()>,
) -> Result<File, ImageError> {
    let err = |source| ImageError::Create {
        path: path.to_path_buf(),
        size,
        source,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|source| ImageError::Open {
                    path: path.to_path_buf(),
                    source,
                });
        }
        Err(e) => return Err(err(e)),
    };
    let made = fill(&file)
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_parent_dir(path));
    if let Err(e) = made {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(file)
}

pub(crate) use crate::util::durable::sync_parent_dir;

/// `Ok` when every op of `ops` lies inside an image of `size` bytes, else
/// [`ImageError::OutOfRange`] naming the first one that does not (checked
/// before anything of the batch is written).
pub(crate) fn check_write_ranges(
    path: &Path,
    size: u64,
    ops: &[WriteOp<'_>],
) -> Result<(), ImageError> {
    for (index, op) in ops.iter().enumerate() {
        if op.end().is_none_or(|end| end > size) {
            return Err(ImageError::OutOfRange {
                path: path.to_path_buf(),
                index,
                kind: op.kind(),
                offset: op.offset(),
                len: op.len(),
                size,
            });
        }
    }
    Ok(())
}

/// `Ok` when every read of `reads` lies inside an image of `size` bytes, else
/// [`ImageError::ReadOutOfRange`] for the first one that does not.
pub(crate) fn check_read_batch(
    path: &Path,
    size: u64,
    reads: &[(u64, &mut [u8])],
) -> Result<(), ImageError> {
    for (offset, buf) in reads {
        check_read_range(path, size, *offset, buf.len() as u64)?;
    }
    Ok(())
}

/// Build the engine `engine` names (io_uring of [`URING_ENTRIES`], or sync).
pub(crate) fn new_engine(path: &Path, engine: Engine) -> Result<Box<dyn IoEngine>, ImageError> {
    Ok(match engine {
        Engine::Uring => Box::new(UringEngine::new(URING_ENTRIES).map_err(|source| {
            ImageError::UringUnavailable {
                path: path.to_path_buf(),
                source,
            }
        })?),
        Engine::Sync => Box::new(SyncEngine::new()),
    })
}

/// A file-level I/O engine: executes ops on one file descriptor. Formats use it
/// for both data and metadata writes; it knows nothing of image sizes or layouts.
pub trait IoEngine: Send {
    /// Which engine this is.
    fn kind(&self) -> Engine;

    /// Apply `ops` to `file` with the ordering and completion guarantees of
    /// [`Image::write_batch`] (without the range check, which is the format's
    /// job). `zero` says how to zero; the engine downgrades it to
    /// [`ZeroMode::WriteZeros`] if the file system refuses to punch holes.
    fn write_batch(
        &mut self,
        file: &File,
        ops: &[WriteOp<'_>],
        zero: &mut ZeroMode,
    ) -> Result<(), EngineError>;

    /// fdatasync `file`.
    fn sync_data(&mut self, file: &File) -> io::Result<()>;

    /// Read exactly `buf.len()` bytes at `offset`; reading past the end of the
    /// file is an `UnexpectedEof` error.
    fn read_at(&mut self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Read every `(offset, buf)` of `reads` in full (reads are independent:
    /// they may run in any order and at once; the buffers are disjoint by
    /// construction). Reading past the end of the file is an `UnexpectedEof`
    /// error. Short reads continue and EINTR/EAGAIN retry. On an error no read
    /// is in flight any more when this returns; the error names the
    /// lowest-indexed read that failed, and the buffers' content is
    /// unspecified. The default reads them one after another with
    /// [`IoEngine::read_at`].
    fn read_batch(
        &mut self,
        file: &File,
        reads: &mut [(u64, &mut [u8])],
    ) -> Result<(), ReadBatchError> {
        for (index, (offset, buf)) in reads.iter_mut().enumerate() {
            self.read_at(file, *offset, buf)
                .map_err(|source| ReadBatchError {
                    index,
                    offset: *offset,
                    len: buf.len() as u64,
                    source,
                })?;
        }
        Ok(())
    }
}

/// The `O_DIRECT` read handle of an image that was asked for
/// [`Image::direct_reads`], shared by the formats that support it.
#[derive(Debug, Default)]
pub(crate) struct DirectReads(Option<File>);

impl DirectReads {
    /// Open the direct handle of `path` (once); whether there is one.
    pub(crate) fn enable(&mut self, path: &Path) -> bool {
        if self.0.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(f) => self.0 = Some(f),
                Err(e) => {
                    tracing::debug!(path = %path.display(), "no direct reads for this image ({e})");
                }
            }
        }
        self.0.is_some()
    }

    /// Read `reads` (file offsets) through `engine`: with the direct handle
    /// when there is one and every read is aligned to
    /// [`crate::util::aligned::BLOCK`] (offset, length, buffer), else through
    /// `file`. A file system that refuses direct reads (EINVAL) is read
    /// buffered from then on.
    pub(crate) fn read_batch(
        &mut self,
        engine: &mut dyn IoEngine,
        file: &File,
        path: &Path,
        reads: &mut [(u64, &mut [u8])],
    ) -> Result<(), ReadBatchError> {
        if let Some(direct) = &self.0
            && reads
                .iter()
                .all(|(o, b)| crate::util::aligned::direct_ok(*o, b))
        {
            match engine.read_batch(direct, reads) {
                Err(e) if e.source.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %path.display(), "direct reads refused ({}); reading through the page cache", e.source);
                    self.0 = None;
                }
                other => return other,
            }
        }
        engine.read_batch(file, reads)
    }
}

/// Which read of an engine's [`IoEngine::read_batch`] failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("read at offset {offset}, len {len} (read {index} of the batch) failed: {source}")]
pub struct ReadBatchError {
    /// Index of the read in the batch.
    pub index: usize,
    /// File offset of the read.
    pub offset: u64,
    /// Length of the read.
    pub len: u64,
    /// The OS error (errno in `raw_os_error()`), or `UnexpectedEof`.
    pub source: io::Error,
}

/// Which op of an engine's batch failed, and why (the lowest-indexed failing op).
#[derive(Debug, thiserror::Error)]
#[error("{kind} at offset {offset}, len {len} (op {index} of the batch) failed: {source}")]
pub struct EngineError {
    /// Index of the op in the batch.
    pub index: usize,
    /// Write or zero.
    pub kind: OpKind,
    /// Offset of the op.
    pub offset: u64,
    /// Length of the op.
    pub len: u64,
    /// The OS error (errno in `raw_os_error()`).
    pub source: io::Error,
}

impl EngineError {
    pub(crate) fn op(index: usize, op: &WriteOp<'_>, source: io::Error) -> Self {
        EngineError {
            index,
            kind: op.kind(),
            offset: op.offset(),
            len: op.len(),
            source,
        }
    }
}

/// Errors of the image backends. Each names the image path and what failed where.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Opening an existing image (or finding it absent with no create size).
    #[error("{path}: opening image: {source}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Creating a new sparse image failed (the partial file is removed).
    #[error("{path}: creating sparse image of {size} bytes: {source}")]
    Create {
        /// Image path.
        path: PathBuf,
        /// Requested size.
        size: u64,
        /// Cause.
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{path}: not a regular file or block device")]
    NotFileOrBlockDevice {
        /// Image path.
        path: PathBuf,
    },
    /// The image is smaller than the caller needs (e.g. the source disk).
    #[error("{path}: image is {size} bytes but {needed} bytes are needed")]
    TooSmall {
        /// Image path.
        path: PathBuf,
        /// Actual size.
        size: u64,
        /// Needed size.
        needed: u64,
    },
    /// An op of a batch lies (partly) outside the image; nothing of the batch was written.
    #[error(
        "{path}: {kind} op {index} of the batch at offset {offset}, len {len} is outside the image of {size} bytes; nothing of the batch was written"
    )]
    OutOfRange {
        /// Image path.
        path: PathBuf,
        /// Index of the op in the batch.
        index: usize,
        /// Write or zero.
        kind: OpKind,
        /// Offset of the op.
        offset: u64,
        /// Length of the op.
        len: u64,
        /// Image size.
        size: u64,
    },
    /// A read lies (partly) outside the image.
    #[error("{path}: read at offset {offset}, len {len} is outside the image of {size} bytes")]
    ReadOutOfRange {
        /// Image path.
        path: PathBuf,
        /// Offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// Image size.
        size: u64,
    },
    /// An op of a batch failed in the kernel; every in-flight op was reaped first.
    #[error(
        "{path}: {kind} at offset {offset}, len {len} (op {index} of the batch) failed: {source}"
    )]
    Op {
        /// Image path.
        path: PathBuf,
        /// Index of the op in the batch.
        index: usize,
        /// Write or zero.
        kind: OpKind,
        /// Offset of the op.
        offset: u64,
        /// Length of the op.
        len: u64,
        /// The OS error (errno in `raw_os_error()`).
        source: io::Error,
    },
    /// fdatasync failed: data written since the last successful flush may be lost.
    #[error("{path}: flush (fdatasync) failed: {source}")]
    Flush {
        /// Image path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A read failed.
    #[error("{path}: read at offset {offset}, len {len} failed: {source}")]
    Read {
        /// Image path.
        path: PathBuf,
        /// Offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// Cause.
        source: io::Error,
    },
    /// grow_to on a block device.
    #[error("{path}: cannot grow a block device from {size} to {requested} bytes")]
    NotGrowable {
        /// Image path.
        path: PathBuf,
        /// Current size.
        size: u64,
        /// Requested size.
        requested: u64,
    },
    /// Growing a regular file failed.
    #[error("{path}: growing image from {size} to {requested} bytes: {source}")]
    Grow {
        /// Image path.
        path: PathBuf,
        /// Current size.
        size: u64,
        /// Requested size.
        requested: u64,
        /// Cause.
        source: io::Error,
    },
    /// grow_to on an image whose format fixes its capacity (VMDK: the capacity
    /// is in the header, the descriptor and the grain directory's size).
    #[error(
        "{path}: a {format} image has a fixed capacity of {size} bytes; it cannot grow to {requested} bytes"
    )]
    FixedCapacity {
        /// Image path.
        path: PathBuf,
        /// Format name.
        format: &'static str,
        /// Capacity.
        size: u64,
        /// Requested size.
        requested: u64,
    },
    /// A VMDK is corrupt or unusable: the error names the structure and where.
    #[error("{path}: {source}")]
    Vmdk {
        /// Path of the file at fault (descriptor or extent).
        path: PathBuf,
        /// What is wrong.
        source: vmdk::VmdkError,
    },
    /// Writing a streamOptimized export failed (the partial file is removed).
    #[error("{path}: writing the streamOptimized export at byte {offset}: {source}")]
    Export {
        /// Export path.
        path: PathBuf,
        /// Byte offset in the export file.
        offset: u64,
        /// Cause.
        source: io::Error,
    },
    /// Listing the data ranges of a raw file (SEEK_DATA / SEEK_HOLE) failed.
    #[error("{path}: listing data ranges at offset {offset}: {source}")]
    DataRanges {
        /// Image path.
        path: PathBuf,
        /// Offset the seek started at.
        offset: u64,
        /// Cause.
        source: io::Error,
    },
    /// io_uring could not be set up or lacks a needed opcode; use [`Engine::Sync`].
    #[error("{path}: io_uring unavailable ({source}); the sync engine can be used instead")]
    UringUnavailable {
        /// Image path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

impl ImageError {
    pub(crate) fn from_engine(path: &Path, e: EngineError) -> Self {
        ImageError::Op {
            path: path.to_path_buf(),
            index: e.index,
            kind: e.kind,
            offset: e.offset,
            len: e.len,
            source: e.source,
        }
    }

    /// The OS errno behind this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ImageError::Open { source, .. }
            | ImageError::Create { source, .. }
            | ImageError::Op { source, .. }
            | ImageError::Flush { source, .. }
            | ImageError::Read { source, .. }
            | ImageError::Grow { source, .. }
            | ImageError::DataRanges { source, .. }
            | ImageError::Export { source, .. }
            | ImageError::UringUnavailable { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl Classify for ImageError {
    fn kind(&self) -> ErrorKind {
        match self {
            ImageError::Open { .. }
            | ImageError::Create { .. }
            | ImageError::Op { .. }
            | ImageError::Flush { .. }
            | ImageError::Read { .. }
            | ImageError::Grow { .. }
            | ImageError::DataRanges { .. }
            | ImageError::Export { .. } => ErrorKind::Io,
            ImageError::Vmdk { source, .. } => source.kind(),
            // An op outside the image comes from the stream: refuse it, never retry it.
            ImageError::OutOfRange { .. } | ImageError::ReadOutOfRange { .. } => ErrorKind::Corrupt,
            ImageError::NotFileOrBlockDevice { .. }
            | ImageError::TooSmall { .. }
            | ImageError::NotGrowable { .. }
            | ImageError::FixedCapacity { .. }
            | ImageError::UringUnavailable { .. } => ErrorKind::Config,
        }
    }
}
