//! The raw format: virtual offset = file offset, over a regular file or a block
//! device. Range checks, creation and growth live here; I/O is the engine's.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use super::{
    DirectIo, DirectReads, Engine, EngineError, Image, ImageError, ImageSpec, IoEngine, SyncEngine,
    URING_ENTRIES, UringEngine, WriteOp, ZeroMode, check_read_batch, check_read_range,
    check_write_ranges, create_image_file,
};
use crate::util::aligned::{AlignedBuf, BLOCK};

/// A raw image: a regular file or a block device whose bytes are the virtual disk.
pub struct RawImage {
    path: PathBuf,
    file: File,
    /// A second descriptor with `O_DIRECT`, for block-aligned writes.
    direct: Option<File>,
    /// `direct` was taken by [`DirectIo::Auto`] for a file without holes: the
    /// first hole punched drops it (see [`RawImage::write_batch`]).
    direct_auto_file: bool,
    /// Aligned copies of the data of direct writes.
    bounce: AlignedBuf,
    /// A read-only `O_DIRECT` descriptor for aligned batch reads, once
    /// [`Image::direct_reads`] asked for it.
    direct_read: DirectReads,
    size: u64,
    block_device: bool,
    zero_mode: ZeroMode,
    engine: Box<dyn IoEngine>,
}

/// Whether to open the direct descriptor: [`DirectIo::Auto`] takes it for a
/// block device and for a file whose first hole is its end (`SEEK_HOLE`; ext4
/// reports unwritten extents as holes too), where every direct write is an
/// overwrite that ext4 runs concurrently.
fn direct_wanted(mode: DirectIo, file: &File, size: u64, block_device: bool) -> bool {
    match mode {
        DirectIo::Off => false,
        DirectIo::On => true,
        DirectIo::Auto if block_device => true,
        DirectIo::Auto => {
            size > 0
                && lseek(file, 0, Whence::SeekHole)
                    .ok()
                    .and_then(|h| u64::try_from(h).ok())
                    .is_some_and(|h| h >= size)
        }
    }
}

/// The bounce buffer is given back after a batch larger than this.
const BOUNCE_KEEP: usize = 16 << 20;

/// True for an op the direct descriptor can take: a write or a zero range
/// whose offset and length are whole blocks (a zero range may be written
/// with zeros, from the block-aligned [`super::ZEROS`]).
fn direct_ok(op: &WriteOp<'_>) -> bool {
    op.offset().is_multiple_of(BLOCK as u64) && op.len().is_multiple_of(BLOCK as u64)
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("block_device", &self.block_device)
            .field("direct_io", &self.direct.is_some())
            .field("zero_mode", &self.zero_mode)
            .field("engine", &self.engine.kind())
            .finish()
    }
}

impl RawImage {
    /// Open `spec.path` (creating a sparse file of `spec.create_size` bytes if it
    /// does not exist) on the engine `spec.engine`.
    pub fn open(spec: &ImageSpec) -> Result<Self, ImageError> {
        // The engine first: if io_uring is unavailable, nothing has been created.
        let engine: Box<dyn IoEngine> = match spec.engine {
            Engine::Uring => Box::new(UringEngine::new(URING_ENTRIES).map_err(|source| {
                ImageError::UringUnavailable {
                    path: spec.path.clone(),
                    source,
                }
            })?),
            Engine::Sync => Box::new(SyncEngine::new()),
        };
        Self::open_with(spec, engine)
    }

    /// Open with a given engine (tests use small rings).
    pub(crate) fn open_with(
        spec: &ImageSpec,
        engine: Box<dyn IoEngine>,
    ) -> Result<Self, ImageError> {
        let path = spec.path.clone();
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match spec.create_size {
                Some(size) => create_sparse(&path, size)?,
                None => return Err(ImageError::Open { path, source: e }),
            },
            Err(source) => return Err(ImageError::Open { path, source }),
        };
        let meta = file.metadata().map_err(|source| ImageError::Open {
            path: path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        let (size, block_device) = if ft.is_file() {
            (meta.len(), false)
        } else if ft.is_block_device() {
            // st_size is 0 for block devices; seeking to the end gives the size.
            let size = (&file)
                .seek(SeekFrom::End(0))
                .map_err(|source| ImageError::Open {
                    path: path.clone(),
                    source,
                })?;
            (size, true)
        } else {
            return Err(ImageError::NotFileOrBlockDevice { path });
        };
        let zero_mode = if block_device {
            ZeroMode::WriteZeros
        } else {
            ZeroMode::PunchHole
        };
        let wanted = direct_wanted(spec.direct_io, &file, size, block_device);
        let direct = if wanted {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
            {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::info!(path = %path.display(), "no direct I/O for this image ({e}); writing through the page cache");
                    None
                }
            }
        } else {
            None
        };
        if spec.direct_io == DirectIo::Auto {
            let why = match (wanted, direct.is_some()) {
                (true, true) if block_device => "on: a block device",
                (true, true) => "on: a file without holes",
                (true, false) => "off: the file system refused O_DIRECT",
                (false, _) => "off: a sparse file (direct writes that allocate run one at a time)",
            };
            tracing::info!(path = %path.display(), direct_io = direct.is_some(), "direct I/O auto: {why}");
        }
        tracing::debug!(path = %path.display(), size, block_device, direct_io = direct.is_some(), engine = %engine.kind(), "opened raw image");
        Ok(RawImage {
            path,
            file,
            direct_auto_file: spec.direct_io == DirectIo::Auto && !block_device && direct.is_some(),
            direct,
            bounce: AlignedBuf::new(BLOCK),
            direct_read: DirectReads::default(),
            size,
            block_device,
            zero_mode,
            engine,
        })
    }

    /// True when the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// True while block-aligned writes go through `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.direct.is_some()
    }

    /// Write `ops` (already range-checked) through the page cache.
    fn write_buffered(&mut self, ops: &[WriteOp<'_>], first: usize) -> Result<(), ImageError> {
        let before = self.zero_mode;
        let res = self
            .engine
            .write_batch(&self.file, ops, &mut self.zero_mode)
            .map_err(|mut e: EngineError| {
                e.index += first;
                ImageError::from_engine(&self.path, e)
            });
        if before != self.zero_mode {
            tracing::info!(path = %self.path.display(), "file system cannot punch holes; zeroing by writing zeros");
        }
        res
    }

    /// Write a run of direct-eligible `ops` (already range-checked) through the
    /// `O_DIRECT` descriptor: data at a block-aligned address as it is (an
    /// opened frame places its data so), other data copied into the aligned
    /// bounce buffer first.
    /// If the file system refuses direct writes after all (EINVAL), direct I/O is
    /// switched off for this image and the run is written through the page cache.
    fn write_direct(&mut self, ops: &[WriteOp<'_>], first: usize) -> Result<(), ImageError> {
        let Some(direct) = self.direct.as_ref() else {
            return self.write_buffered(ops, first);
        };
        // Data the kernel cannot take in place: not at a block-aligned address.
        fn staged_data<'a>(op: &WriteOp<'a>) -> Option<&'a [u8]> {
            match *op {
                WriteOp::Write { offset, data }
                    if !crate::util::aligned::direct_ok(offset, data) =>
                {
                    Some(data)
                }
                _ => None,
            }
        }
        let bytes: usize = ops.iter().filter_map(staged_data).map(<[u8]>::len).sum();
        self.bounce.reserve(bytes);
        let mut at = 0;
        for data in ops.iter().filter_map(staged_data) {
            self.bounce.bytes_mut()[at..at + data.len()].copy_from_slice(data);
            at += data.len();
        }
        let staged = self.bounce.bytes();
        let mut at = 0;
        let aligned: Vec<WriteOp<'_>> = ops
            .iter()
            .map(|op| match (*op, staged_data(op)) {
                (WriteOp::Write { offset, data }, Some(_)) => {
                    let d = &staged[at..at + data.len()];
                    at += data.len();
                    WriteOp::Write { offset, data: d }
                }
                (op, _) => op,
            })
            .collect();
        let before = self.zero_mode;
        let res = self
            .engine
            .write_batch(direct, &aligned, &mut self.zero_mode);
        if before != self.zero_mode {
            tracing::info!(path = %self.path.display(), "file system cannot punch holes; zeroing by writing zeros");
        }
        drop(aligned);
        if self.bounce.len() > BOUNCE_KEEP {
            self.bounce.shrink_to(BLOCK);
        }
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.source.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %self.path.display(), "the file system refused a direct write ({}); writing through the page cache from now on", e.source);
                self.direct = None;
                self.write_buffered(ops, first)
            }
            Err(mut e) => {
                e.index += first;
                Err(ImageError::from_engine(&self.path, e))
            }
        }
    }

    /// How zero ops are currently applied.
    pub fn zero_mode(&self) -> ZeroMode {
        self.zero_mode
    }

    #[cfg(test)]
    pub(crate) fn set_zero_mode(&mut self, mode: ZeroMode) {
        self.zero_mode = mode;
    }

    fn check_ranges(&self, ops: &[WriteOp<'_>]) -> Result<(), ImageError> {
        check_write_ranges(&self.path, self.size, ops)
    }
}

/// Create a sparse file of `size` bytes; make the file and its directory entry
/// durable. If another process created it meanwhile, open theirs as is.
fn create_sparse(path: &Path, size: u64) -> Result<File, ImageError> {
    let file = create_image_file(path, size, |f| f.set_len(size))?;
    tracing::info!(path = %path.display(), size, "created sparse raw image");
    Ok(file)
}

impl Image for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_batch(&mut self, ops: &[WriteOp<'_>]) -> Result<(), ImageError> {
        self.check_ranges(ops)?;
        if self.direct_auto_file
            && self.zero_mode == ZeroMode::PunchHole
            && ops
                .iter()
                .any(|op| matches!(op, WriteOp::Zero { len, .. } if *len > 0))
        {
            // Auto chose direct I/O because the file had no hole; a zero op
            // punches one, and direct writes into holes run one at a time.
            tracing::info!(path = %self.path.display(), "direct I/O auto: off from now on: a zero range punches a hole");
            self.direct = None;
            self.direct_auto_file = false;
        }
        if self.direct.is_none() {
            return self.write_buffered(ops, 0);
        }
        // Runs of direct-eligible and other ops, written one run after the
        // other: each run completes before the next starts, so overlapping ops
        // keep their order across the two descriptors (the kernel flushes and
        // drops cached pages a direct write overlaps).
        let mut start = 0;
        while start < ops.len() {
            let direct = direct_ok(&ops[start]);
            let end = ops[start..]
                .iter()
                .position(|op| direct_ok(op) != direct)
                .map_or(ops.len(), |n| start + n);
            if direct {
                self.write_direct(&ops[start..end], start)?;
            } else {
                self.write_buffered(&ops[start..end], start)?;
            }
            start = end;
        }
        Ok(())
    }

    fn sync_handle(&self) -> Result<File, ImageError> {
        self.file.try_clone().map_err(|source| ImageError::Flush {
            path: self.path.clone(),
            source,
        })
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        self.engine
            .sync_data(&self.file)
            .map_err(|source| ImageError::Flush {
                path: self.path.clone(),
                source,
            })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(ImageError::ReadOutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        self.engine
            .read_at(&self.file, offset, buf)
            .map_err(|source| ImageError::Read {
                path: self.path.clone(),
                offset,
                len,
                source,
            })
    }

    fn read_batch(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<(), ImageError> {
        check_read_batch(&self.path, self.size, reads)?;
        self.direct_read
            .read_batch(self.engine.as_mut(), &self.file, &self.path, reads)
            .map_err(|e| ImageError::Read {
                path: self.path.clone(),
                offset: e.offset,
                len: e.len,
                source: e.source,
            })
    }

    fn direct_reads(&mut self) -> bool {
        self.direct_read.enable(&self.path)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn engine(&self) -> Engine {
        self.engine.kind()
    }

    /// Regular files: the data extents `SEEK_DATA` / `SEEK_HOLE` report
    /// (file-system blocks, so a range may include some zeros); a block device,
    /// or a file system without the seeks, lists the whole range.
    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, ImageError> {
        check_read_range(&self.path, self.size, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let whole = vec![(offset, len)];
        if self.block_device {
            return Ok(whole);
        }
        let end = offset + len;
        let err = |offset: u64, e: Errno| ImageError::DataRanges {
            path: self.path.clone(),
            offset,
            source: e.into(),
        };
        // Offsets fit in off_t: they lie inside a regular file.
        let seek = |pos: u64, whence: Whence| lseek(&self.file, pos as i64, whence);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(pos, Whence::SeekData) {
                Ok(d) => d as u64,
                // No data at or after pos.
                Err(Errno::ENXIO) => break,
                // The file system cannot tell: everything may hold data.
                Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(whole),
                Err(e) => return Err(err(pos, e)),
            };
            if data >= end {
                break;
            }
            let hole = match seek(data, Whence::SeekHole) {
                Ok(h) => (h as u64).min(end),
                Err(Errno::ENXIO) => end,
                Err(e) => return Err(err(data, e)),
            };
            if hole <= data {
                // A racing truncate; never loop without progress.
                break;
            }
            out.push((data, hole - data));
            pos = hole;
        }
        Ok(out)
    }

    fn grow_to(&mut self, size: u64) -> Result<(), ImageError> {
        if self.block_device {
            return Err(ImageError::NotGrowable {
                path: self.path.clone(),
                size: self.size,
                requested: size,
            });
        }
        if size <= self.size {
            return Ok(());
        }
        // No op is in flight here: write_batch reaps everything before returning.
        self.file
            .set_len(size)
            .and_then(|()| self.file.sync_all())
            .map_err(|source| ImageError::Grow {
                path: self.path.clone(),
                size: self.size,
                requested: size,
                source,
            })?;
        tracing::info!(path = %self.path.display(), from = self.size, to = size, "grew raw image");
        self.size = size;
        Ok(())
    }
}
