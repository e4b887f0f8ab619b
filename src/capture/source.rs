//! A protected source disk and the one internal write path every writer uses.
//!
//! A write reaches the backing disk first and is recorded in the capture journal
//! second, both under a shared lock; the initial copy reads a chunk and records it
//! under the exclusive lock. So a copy's read and its record are atomic with
//! respect to live writes, and seq order matches the order in which the disk's
//! content changed (a copy can never record stale data after a newer write).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AO};
use std::sync::{Arc, RwLock};

use thiserror::Error;

use super::journal::{CaptureError, CaptureJournal, Ordering};
use crate::error::{Classify, ErrorKind};

/// Size of the blocks the initial copy tests for all-zero content.
pub const COPY_BLOCK: usize = 64 * 1024;
/// Bytes read per exclusive-lock hold during the initial copy.
pub const COPY_CHUNK: usize = 4 * 1024 * 1024;
/// Largest range one zero record covers (the frame format's length is 32 bits).
pub const MAX_ZERO_RECORD: u64 = 1 << 30;

/// Errors of the source disk path.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The backing disk could not be opened or sized.
    #[error("source disk {path}: {source}")]
    Open {
        /// Path of the disk.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A read or write of the backing disk failed; the change was not recorded.
    #[error("source disk {path}: {op} of {len} bytes at offset {offset} failed: {source}")]
    Io {
        /// Path of the disk.
        path: PathBuf,
        /// "read" or "write".
        op: &'static str,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Cause.
        source: std::io::Error,
    },
    /// The write lies (partly) beyond the end of the disk.
    #[error("source disk {path}: {len} bytes at offset {offset} exceed the disk size {size}")]
    OutOfRange {
        /// Path of the disk.
        path: PathBuf,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Disk size.
        size: u64,
    },
    /// Capture refused the record.
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

impl Classify for SourceError {
    fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Open { .. } | SourceError::Io { .. } => ErrorKind::Io,
            SourceError::OutOfRange { .. } => ErrorKind::Corrupt,
            SourceError::Capture(e) => e.kind(),
        }
    }
}

/// What the initial copy did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopyStats {
    /// Bytes of the disk covered.
    pub covered: u64,
    /// Bytes sent as data.
    pub data_bytes: u64,
    /// Bytes recognised as zeros (sent as zero ranges, not data).
    pub zero_bytes: u64,
}

/// One protected disk: its backing file or block device and its capture journal.
pub struct SourceDisk {
    id: u16,
    path: PathBuf,
    file: File,
    size: u64,
    lock: RwLock<()>,
    journal: Arc<CaptureJournal>,
}

impl SourceDisk {
    /// Open the backing disk read-write.
    pub fn open(id: u16, path: &Path, journal: Arc<CaptureJournal>) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let size = device_size(&file).map_err(open_err)?;
        Ok(SourceDisk {
            id,
            path: path.to_path_buf(),
            file,
            size,
            lock: RwLock::new(()),
            journal,
        })
    }

    /// The disk id within its group.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path of the backing disk.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The write path: write `data` at `offset` to the backing disk, then record it
    /// (W). Returns the seq; on error nothing was recorded.
    pub fn write(&self, offset: u64, data: Vec<u8>) -> Result<u64, SourceError> {
        self.check_range(offset, data.len())?;
        let _g = self.lock.read().unwrap_or_else(|p| p.into_inner());
        self.file
            .write_all_at(&data, offset)
            .map_err(|source| self.io_err("write", offset, data.len(), source))?;
        Ok(self
            .journal
            .record_write(self.id, offset, data, Ordering::W)?)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), SourceError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(SourceError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    fn io_err(
        &self,
        op: &'static str,
        offset: u64,
        len: usize,
        source: std::io::Error,
    ) -> SourceError {
        SourceError::Io {
            path: self.path.clone(),
            op,
            offset,
            len,
            source,
        }
    }

    /// Initial replication: announce the size, then read the whole disk and record
    /// it as M changes, all-zero blocks as zero ranges (holes of a sparse file are
    /// skipped without reading). `progress` receives the bytes covered so far.
    pub fn initial_copy(&self, progress: &AtomicU64) -> Result<CopyStats, SourceError> {
        self.journal
            .record_disk_size(self.id, self.size, Ordering::M)?;
        let mut stats = CopyStats::default();
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut off = 0u64;
        while off < self.size {
            let _g = self.lock.write().unwrap_or_else(|p| p.into_inner());
            // A hole in a sparse file: one zero range up to the next data, no read.
            let next_data = seek_data(&self.file, off).unwrap_or(off).min(self.size);
            let hole_end = next_data - (next_data - off) % COPY_BLOCK as u64;
            let hole_end = if next_data == self.size {
                self.size
            } else {
                hole_end
            };
            if hole_end > off {
                // A zero record covers at most MAX_ZERO_RECORD bytes.
                let mut z = off;
                while z < hole_end {
                    let l = (hole_end - z).min(MAX_ZERO_RECORD);
                    self.journal.record_zero(self.id, z, l, Ordering::M)?;
                    z += l;
                }
                stats.zero_bytes += hole_end - off;
                off = hole_end;
                progress.store(off, AO::Relaxed);
                continue;
            }
            let len = (self.size - off).min(COPY_CHUNK as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..len], off)
                .map_err(|source| self.io_err("read", off, len, source))?;
            let mut zero_run: Option<(u64, u64)> = None;
            for (i, block) in buf[..len].chunks(COPY_BLOCK).enumerate() {
                let boff = off + (i * COPY_BLOCK) as u64;
                if is_zero(block) {
                    zero_run = match zero_run {
                        Some((s, l)) => Some((s, l + block.len() as u64)),
                        None => Some((boff, block.len() as u64)),
                    };
                    stats.zero_bytes += block.len() as u64;
                    continue;
                }
                if let Some((s, l)) = zero_run.take() {
                    self.journal.record_zero(self.id, s, l, Ordering::M)?;
                }
                self.journal
                    .record_write(self.id, boff, block.to_vec(), Ordering::M)?;
                stats.data_bytes += block.len() as u64;
            }
            if let Some((s, l)) = zero_run.take() {
                self.journal.record_zero(self.id, s, l, Ordering::M)?;
            }
            off += len as u64;
            progress.store(off, AO::Relaxed);
        }
        stats.covered = self.size;
        Ok(stats)
    }
}

/// True when every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = bytemuck::pod_align_to::<u8, u64>(b);
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Size of a regular file or block device (seeking to the end works for both).
pub fn device_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// Offset of the next data at or after `off` (SEEK_DATA); the file size when
/// only a hole follows; `None` when the filesystem cannot tell.
fn seek_data(file: &File, off: u64) -> Option<u64> {
    match nix::unistd::lseek(file, off as i64, nix::unistd::Whence::SeekData) {
        Ok(p) => Some(p as u64),
        Err(nix::errno::Errno::ENXIO) => Some(u64::MAX),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::journal::Change;
    use std::time::Duration;

    fn setup(size: u64) -> (tempfile::TempDir, Arc<CaptureJournal>, SourceDisk) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("src.img");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        let j = Arc::new(CaptureJournal::new(
            64 << 20,
            1,
            Box::new(|f| Ok(f + 1_000_000)),
        ));
        let d = SourceDisk::open(0, &p, j.clone()).unwrap();
        (dir, j, d)
    }

    #[test]
    fn write_reaches_disk_and_journal() {
        let (_d, j, disk) = setup(1 << 20);
        let seq = disk.write(4096, vec![7; 512]).unwrap();
        assert_eq!(seq, 1);
        let mut b = [0u8; 512];
        disk.file.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(b, [7; 512]);
        let e = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].offset, 4096);
    }

    #[test]
    fn out_of_range_write_is_refused_and_not_recorded() {
        let (_d, j, disk) = setup(8192);
        let e = disk.write(8000, vec![1; 512]).unwrap_err().to_string();
        assert!(e.contains("exceed the disk size 8192"), "{e}");
        assert!(disk.write(u64::MAX, vec![1; 1]).is_err());
        assert_eq!(j.stats().recorded, 0);
    }

    #[test]
    fn initial_copy_sends_data_and_skips_zeros() {
        let size = 3 * COPY_CHUNK as u64 + 8192;
        let (_d, j, disk) = setup(size);
        disk.file.write_all_at(&[5u8; 100], 70_000).unwrap();
        disk.file.write_all_at(&[6u8; 10], size - 5).unwrap();
        let p = AtomicU64::new(0);
        let st = disk.initial_copy(&p).unwrap();
        assert_eq!(p.load(AO::Relaxed), size);
        assert_eq!(st.data_bytes + st.zero_bytes, size);
        assert!(st.data_bytes <= 2 * COPY_BLOCK as u64 + 8192, "{st:?}");
        // Rebuild the disk from the journal and compare.
        let mut img = vec![0xEEu8; size as usize];
        let entries = j.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
        assert!(matches!(entries[0].change, Change::DiskSize(s) if s == size));
        for e in &entries {
            match &e.change {
                Change::Write(d) => img[e.offset as usize..][..d.len()].copy_from_slice(d),
                Change::Zero(l) => img[e.offset as usize..][..*l as usize].fill(0),
                Change::DiskSize(_) => {}
            }
        }
        let mut want = vec![0u8; size as usize];
        disk.file.read_exact_at(&mut want, 0).unwrap();
        assert!(img == want);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4097]));
        let mut b = vec![0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        b[4096] = 0;
        b[3] = 1;
        assert!(!is_zero(&b[1..]));
    }
}
