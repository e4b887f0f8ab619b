//! monolithicFlat: a text descriptor file naming one flat extent file, whose
//! bytes from the extent's sector offset on are the virtual disk. The data path
//! is a [`RawImage`] over the extent file, shifted by that offset.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::descriptor::{self, Descriptor, ExtentKind, MAX_DESCRIPTOR_BYTES};
use super::header::MAGIC;
use super::sparse::check_descriptor;
use super::{SECTOR, VmdkError, vmdk_err};
use crate::image::sync_parent_dir;
use crate::image::{
    Engine, Image, ImageError, ImageFormat, ImageSpec, RawImage, WriteOp, check_read_batch,
    check_read_range, check_write_ranges,
};

/// A monolithicFlat VMDK: descriptor file plus one flat extent.
#[derive(Debug)]
pub struct VmdkFlatImage {
    path: PathBuf,
    extent_path: PathBuf,
    descriptor: Descriptor,
    inner: RawImage,
    /// Byte offset of the virtual disk in the extent file.
    base: u64,
    size: u64,
}

fn open_err(path: &Path, source: io::Error) -> ImageError {
    ImageError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// The extent file name a new image at `path` gets: `disk.vmdk` →
/// `disk-flat.vmdk` (qemu's naming).
fn flat_extent_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rfind('.') {
        Some(dot) if dot > 0 => format!("{}-flat{}", &name[..dot], &name[dot..]),
        _ => format!("{name}-flat"),
    }
}

/// Read a descriptor file, bounded before anything is allocated.
fn read_descriptor_file(path: &Path, file: &File) -> Result<Vec<u8>, ImageError> {
    let len = file.metadata().map_err(|e| open_err(path, e))?.len();
    if len > MAX_DESCRIPTOR_BYTES as u64 {
        return Err(vmdk_err(
            path,
            VmdkError::Descriptor {
                offset: 0,
                source: descriptor::DescriptorError::TooLarge {
                    len: usize::try_from(len).unwrap_or(usize::MAX),
                },
            },
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_DESCRIPTOR_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            offset: 0,
            len,
            source,
        })?;
    Ok(bytes)
}

impl VmdkFlatImage {
    /// Open the descriptor at `spec.path` and its flat extent, creating both
    /// (descriptor + sparse `<stem>-flat.vmdk` of `spec.create_size` bytes) if
    /// the descriptor does not exist. `spec.direct_io` applies to the extent.
    pub fn open(spec: &ImageSpec) -> Result<Self, ImageError> {
        let path = spec.path.clone();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match spec.create_size {
                Some(size) => create(&path, size)?,
                None => return Err(open_err(&path, e)),
            },
            Err(e) => return Err(open_err(&path, e)),
        };
        let bytes = read_descriptor_file(&path, &file)?;
        let bad = |e: VmdkError| vmdk_err(&path, e);
        if bytes.len() >= 4 && bytes[..4] == MAGIC.to_le_bytes() {
            return Err(bad(VmdkError::Unsupported {
                what:
                    "this is a sparse extent file (binary header), not a monolithicFlat descriptor"
                        .into(),
            }));
        }
        let descriptor = Descriptor::parse(&bytes)
            .map_err(|source| bad(VmdkError::Descriptor { offset: 0, source }))?;
        let sectors = match descriptor.extents.as_slice() {
            [e] => e.sectors,
            _ => 0,
        };
        check_descriptor(&descriptor, "monolithicFlat", ExtentKind::Flat, sectors).map_err(bad)?;
        let extent = &descriptor.extents[0];
        let content = |why: String| bad(VmdkError::DescriptorContent { why });
        let size = sectors
            .checked_mul(SECTOR)
            .filter(|&s| s > 0 && s <= i64::MAX as u64)
            .ok_or_else(|| content(format!("extent size of {sectors} sectors is out of range")))?;
        let offset = extent
            .offset
            .ok_or_else(|| content("the FLAT extent line has no offset".into()))?;
        let base = offset
            .checked_mul(SECTOR)
            .filter(|b| b.checked_add(size).is_some_and(|e| e <= i64::MAX as u64))
            .ok_or_else(|| content(format!("extent offset of {offset} sectors is out of range")))?;
        let name = extent.file.as_str();
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(bad(VmdkError::Unsupported {
                what: format!(
                    "extent file \"{name}\": tidemark opens only a plain file name beside the descriptor"
                ),
            }));
        }
        let extent_path = match path.parent() {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        };
        let inner = RawImage::open(&ImageSpec {
            path: extent_path.clone(),
            format: ImageFormat::Raw,
            engine: spec.engine,
            create_size: None,
            direct_io: spec.direct_io,
        })?;
        if inner.size() < base + size {
            return Err(vmdk_err(
                &extent_path,
                VmdkError::FlatExtentTooSmall {
                    file: extent_path.display().to_string(),
                    len: inner.size(),
                    needed: base + size,
                },
            ));
        }
        tracing::debug!(path = %path.display(), extent = %extent_path.display(), size, "opened monolithicFlat VMDK");
        Ok(VmdkFlatImage {
            path,
            extent_path,
            descriptor,
            inner,
            base,
            size,
        })
    }

    /// The descriptor as read at open.
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The flat extent file.
    pub fn extent_path(&self) -> &Path {
        &self.extent_path
    }

    /// The disk's `ddb.uuid`, if the descriptor has one.
    pub fn disk_uuid(&self) -> Option<&str> {
        self.descriptor.ddb("ddb.uuid")
    }
}

/// Create the flat extent (sparse, `size` bytes) and then the descriptor, both
/// durable with their directory entries. Refuses to reuse an existing extent
/// file; a failure removes what was created.
fn create(path: &Path, size: u64) -> Result<File, ImageError> {
    let err = |source| ImageError::Create {
        path: path.to_path_buf(),
        size,
        source,
    };
    if size == 0 || !size.is_multiple_of(SECTOR) || size > i64::MAX as u64 {
        return Err(vmdk_err(
            path,
            VmdkError::CreateSize {
                size,
                why: "a flat VMDK needs a nonzero multiple of 512 bytes",
            },
        ));
    }
    let name = flat_extent_name(path);
    let extent_path = path.with_file_name(&name);
    let desc = descriptor::new_descriptor(
        "monolithicFlat",
        size / SECTOR,
        ExtentKind::Flat,
        &name,
        Some(0),
    )
    .map_err(|e| vmdk_err(path, VmdkError::Random(e)))?;
    let extent = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&extent_path)
        .map_err(|source| ImageError::Create {
            path: extent_path.clone(),
            size,
            source,
        })?;
    let made = extent.set_len(size).and_then(|()| extent.sync_all());
    drop(extent);
    if let Err(e) = made {
        let _ = std::fs::remove_file(&extent_path);
        return Err(err(e));
    }
    let written = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|f| {
            f.write_all_at(desc.render().as_bytes(), 0)?;
            f.sync_all()?;
            sync_parent_dir(path)?;
            Ok(f)
        });
    match written {
        Ok(f) => {
            tracing::info!(path = %path.display(), extent = %extent_path.display(), size, "created monolithicFlat VMDK");
            Ok(f)
        }
        Err(e) => {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(&extent_path);
            Err(err(e))
        }
    }
}

impl Image for VmdkFlatImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_batch(&mut self, ops: &[WriteOp<'_>]) -> Result<(), ImageError> {
        check_write_ranges(&self.path, self.size, ops)?;
        let base = self.base;
        let shifted: Vec<WriteOp<'_>> = ops
            .iter()
            .map(|op| match *op {
                WriteOp::Write { offset, data } => WriteOp::Write {
                    offset: offset + base,
                    data,
                },
                WriteOp::Zero { offset, len } => WriteOp::Zero {
                    offset: offset + base,
                    len,
                },
            })
            .collect();
        self.inner.write_batch(&shifted).map_err(|e| match e {
            // Name the virtual op, as the caller sent it.
            ImageError::Op {
                path,
                index,
                kind,
                source,
                ..
            } => ImageError::Op {
                path,
                index,
                kind,
                offset: ops[index].offset(),
                len: ops[index].len(),
                source,
            },
            other => other,
        })
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        self.inner.flush()
    }

    fn sync_handle(&self) -> Result<File, ImageError> {
        self.inner.sync_handle()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        check_read_range(&self.path, self.size, offset, buf.len() as u64)?;
        self.inner.read_at(self.base + offset, buf)
    }

    fn read_batch(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<(), ImageError> {
        check_read_batch(&self.path, self.size, reads)?;
        let base = self.base;
        let mut shifted: Vec<(u64, &mut [u8])> = reads
            .iter_mut()
            .map(|(offset, buf)| (*offset + base, &mut **buf))
            .collect();
        // An error names the extent file and the offset in it, as `read_at`'s.
        self.inner.read_batch(&mut shifted)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn engine(&self) -> Engine {
        self.inner.engine()
    }

    fn grow_to(&mut self, size: u64) -> Result<(), ImageError> {
        if size <= self.size {
            return Ok(());
        }
        Err(ImageError::FixedCapacity {
            path: self.path.clone(),
            format: "monolithicFlat VMDK",
            size: self.size,
            requested: size,
        })
    }

    /// The flat extent's data ranges (`SEEK_DATA` / `SEEK_HOLE`), shifted back
    /// to virtual offsets.
    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, ImageError> {
        check_read_range(&self.path, self.size, offset, len)?;
        let base = self.base;
        Ok(self
            .inner
            .data_ranges(base + offset, len)?
            .into_iter()
            .map(|(o, l)| (o - base, l))
            .collect())
    }
}
