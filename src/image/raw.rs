//! The raw format: virtual offset = file offset, over a regular file or a block
//! device. Range checks, creation and growth live here; I/O is the engine's.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::{
    Engine, EngineError, Image, ImageError, ImageSpec, IoEngine, SyncEngine, URING_ENTRIES,
    UringEngine, WriteOp, ZeroMode,
};

/// A raw image: a regular file or a block device whose bytes are the virtual disk.
pub struct RawImage {
    path: PathBuf,
    file: File,
    size: u64,
    block_device: bool,
    zero_mode: ZeroMode,
    engine: Box<dyn IoEngine>,
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("block_device", &self.block_device)
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
        tracing::debug!(path = %path.display(), size, block_device, engine = %engine.kind(), "opened raw image");
        Ok(RawImage {
            path,
            file,
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

    /// How zero ops are currently applied.
    pub fn zero_mode(&self) -> ZeroMode {
        self.zero_mode
    }

    #[cfg(test)]
    pub(crate) fn set_zero_mode(&mut self, mode: ZeroMode) {
        self.zero_mode = mode;
    }

    fn check_ranges(&self, ops: &[WriteOp<'_>]) -> Result<(), ImageError> {
        for (index, op) in ops.iter().enumerate() {
            if op.end().is_none_or(|end| end > self.size) {
                return Err(ImageError::OutOfRange {
                    path: self.path.clone(),
                    index,
                    kind: op.kind(),
                    offset: op.offset(),
                    len: op.len(),
                    size: self.size,
                });
            }
        }
        Ok(())
    }
}

/// Create a sparse file of `size` bytes; make the file and its directory entry
/// durable. If another process created it meanwhile, open theirs as is.
fn create_sparse(path: &Path, size: u64) -> Result<File, ImageError> {
    let err = |source| ImageError::Create {
        path: path.to_path_buf(),
        size,
        source,
    };
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return OpenOptions::new()
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
    let sized = file
        .set_len(size)
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_parent_dir(path));
    if let Err(e) = sized {
        // Leave no half-made image behind for a later open to mistake for a real one.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    tracing::info!(path = %path.display(), size, "created sparse raw image");
    Ok(file)
}

fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl Image for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_batch(&mut self, ops: &[WriteOp<'_>]) -> Result<(), ImageError> {
        self.check_ranges(ops)?;
        let before = self.zero_mode;
        let res = self
            .engine
            .write_batch(&self.file, ops, &mut self.zero_mode)
            .map_err(|e: EngineError| ImageError::from_engine(&self.path, e));
        if before != self.zero_mode {
            tracing::info!(path = %self.path.display(), "file system cannot punch holes; zeroing by writing zeros");
        }
        res
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

    fn path(&self) -> &Path {
        &self.path
    }

    fn engine(&self) -> Engine {
        self.engine.kind()
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
