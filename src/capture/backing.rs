//! The backing disk of a protected disk: a raw image file or a block device,
//! reached with positional, blocking I/O through the page cache.
//!
//! [`BackingDisk`] is the I/O half of the write path; [`super::protected`] adds
//! capture on top. It also implements [`BlockIo`] on its own (no capture), which
//! is what the frontends' protocol tests run against.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as AO};

use crate::frontend::{BlockIo, IoError, IoErrorKind, Op, check_range};
use crate::image::ZeroMode;
use crate::image::sync::{pread_exact, pwrite_all, zero_range};

/// A raw image file or block device opened read-write.
#[derive(Debug)]
pub struct BackingDisk {
    path: PathBuf,
    file: File,
    /// A read-only `O_DIRECT` descriptor for [`BackingDisk::pread_direct`];
    /// `None` where the file system refuses `O_DIRECT`.
    direct: Option<File>,
    size: u64,
    /// Set once `fallocate(PUNCH_HOLE)` turned out unsupported: zeros are written.
    no_punch: AtomicBool,
    /// Set once a direct read failed with `EINVAL`: every read is buffered.
    no_direct: AtomicBool,
}

impl BackingDisk {
    /// Open `path` read-write and take its size (file length, or device size).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = device_size(&file)?;
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .inspect_err(|e| {
                tracing::debug!(path = %path.display(), "no direct reads of this disk ({e}); resync and verify read through the page cache");
            })
            .ok();
        Ok(BackingDisk {
            path: path.to_path_buf(),
            file,
            direct,
            size,
            no_punch: AtomicBool::new(false),
            no_direct: AtomicBool::new(false),
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for `SEEK_DATA` and similar queries).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size in bytes (when it was opened).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's or device's size now, which is more than [`size`](Self::size)
    /// when it was grown while open.
    pub fn current_size(&self) -> io::Result<u64> {
        device_size(&self.file)
    }

    /// `pread` exactly `buf.len()` bytes.
    pub fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        pread_exact(&self.file, buf, offset)
    }

    /// `pread` exactly `buf.len()` bytes, bypassing the page cache (`O_DIRECT`)
    /// when `offset`, the length and the buffer's address are multiples of
    /// [`BLOCK`](crate::util::aligned::BLOCK) and the file system allows it; else as [`BackingDisk::pread`].
    /// For a reader that streams through the disk once (resync, verify):
    /// no copy out of the page cache, no cached data evicted. Coherent with
    /// the buffered writes: the kernel writes back dirty cached pages of the
    /// range before a direct read of it.
    pub fn pread_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let aligned = crate::util::aligned::direct_ok(offset, buf);
        if let Some(direct) = &self.direct
            && aligned
            && !self.no_direct.load(AO::Relaxed)
        {
            match pread_exact(direct, buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %self.path.display(), "direct reads refused ({e}); reading through the page cache");
                    self.no_direct.store(true, AO::Relaxed);
                }
                other => return other,
            }
        }
        self.pread(offset, buf)
    }

    /// `pwrite` all of `data`.
    pub fn pwrite(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        pwrite_all(&self.file, data, offset)
    }

    /// `fdatasync`.
    pub fn sync(&self) -> io::Result<()> {
        loop {
            match self.file.sync_data() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Make `offset..offset+len` read as zeros: punch a hole when allowed and
    /// supported (files, and block devices, where Linux zeroes the range), else
    /// write zeros.
    pub fn zero(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let mut mode = if may_unmap && !self.no_punch.load(AO::Relaxed) {
            ZeroMode::PunchHole
        } else {
            ZeroMode::WriteZeros
        };
        let asked = mode;
        zero_range(&self.file, offset, len, &mut mode)?;
        if asked == ZeroMode::PunchHole && mode == ZeroMode::WriteZeros {
            self.no_punch.store(true, AO::Relaxed);
        }
        Ok(())
    }

    /// Offset of the next data at or after `off` (`SEEK_DATA`); `Some(size)` when
    /// only a hole follows; `None` when the filesystem or device cannot tell.
    pub fn next_data(&self, off: u64) -> Option<u64> {
        match nix::unistd::lseek(&self.file, off as i64, nix::unistd::Whence::SeekData) {
            Ok(p) => Some((p as u64).min(self.size)),
            Err(nix::errno::Errno::ENXIO) => Some(self.size),
            Err(_) => None,
        }
    }

    /// Offset of the next hole at or after `off` (`SEEK_HOLE`; the end of the
    /// disk counts as a hole); `None` when the filesystem or device cannot tell.
    pub fn next_hole(&self, off: u64) -> Option<u64> {
        match nix::unistd::lseek(&self.file, off as i64, nix::unistd::Whence::SeekHole) {
            Ok(p) => Some((p as u64).min(self.size)),
            Err(nix::errno::Errno::ENXIO) => Some(self.size),
            Err(_) => None,
        }
    }

    /// The data extents of `start..end` (clamped to the disk), sorted and
    /// disjoint, from `SEEK_DATA`/`SEEK_HOLE`. Everything that is not listed
    /// is a hole and reads as zeros. When the filesystem cannot tell, the
    /// rest of the range is listed as data; a block device is all data.
    pub fn data_ranges(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let end = end.min(self.size);
        let mut out = Vec::new();
        let mut at = start;
        // Every turn moves `at` forward by at least one byte, and file systems
        // track holes in blocks of 512 bytes or more; past this many turns the
        // rest is read as data (correct, only slower).
        let max_turns = (end.saturating_sub(start) / 512).saturating_add(2);
        for _ in 0..max_turns {
            if at >= end {
                return out;
            }
            let Some(data) = self.next_data(at) else {
                break;
            };
            if data >= end {
                return out;
            }
            let hole = match self.next_hole(data.max(at)) {
                Some(h) if h > data => h.min(end),
                _ => end,
            };
            out.push((data.max(at), hole));
            at = hole;
        }
        if at < end {
            out.push((at, end));
        }
        out
    }
}

fn backing(op: Op, offset: u64, len: u64) -> impl FnOnce(io::Error) -> IoError {
    move |e| IoError::new(op, offset, len, IoErrorKind::Backing(e))
}

impl BlockIo for BackingDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let len = buf.len() as u64;
        check_range(Op::Read, offset, len, self.size)?;
        self.pread(offset, buf)
            .map_err(backing(Op::Read, offset, len))
    }

    fn write_at(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        check_range(Op::Write, offset, len, self.size)?;
        self.pwrite(offset, &data)
            .map_err(backing(Op::Write, offset, len))?;
        if fua {
            self.sync().map_err(backing(Op::Write, offset, len))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), IoError> {
        self.sync().map_err(backing(Op::Flush, 0, 0))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        check_range(Op::Trim, offset, len, self.size)?;
        self.zero(offset, len, true)
            .map_err(backing(Op::Trim, offset, len))?;
        if fua {
            self.sync().map_err(backing(Op::Trim, offset, len))?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        check_range(Op::WriteZeroes, offset, len, self.size)?;
        self.zero(offset, len, may_unmap)
            .map_err(backing(Op::WriteZeroes, offset, len))?;
        if fua {
            self.sync().map_err(backing(Op::WriteZeroes, offset, len))?;
        }
        Ok(())
    }
}

/// Size of a regular file or block device (seeking to the end works for both).
pub fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::aligned::BLOCK;

    #[test]
    fn block_io_round_trip_and_zeroing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let d = BackingDisk::open(&p).unwrap();
        assert_eq!(BlockIo::size(&d), 1 << 20);
        d.write_at(8192, vec![7; 8192], true).unwrap();
        let mut b = vec![0u8; 8192];
        d.read_at(8192, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        d.trim(8192, 4096, false).unwrap();
        d.write_zeroes(12288, 4096, false, true).unwrap();
        d.read_at(8192, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let e = d.write_at((1 << 20) - 1, vec![1; 2], false).unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(d.read_at(0, &mut []).is_err());
        d.flush().unwrap();
        assert!(d.next_data(0).is_some_and(|o| o <= 1 << 20));
    }

    #[test]
    fn direct_reads_see_buffered_writes_and_unaligned_reads_work() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let d = BackingDisk::open(&p).unwrap();
        // Written through the page cache, not synced: a direct read sees it.
        d.pwrite(8192, &[5; 8192]).unwrap();
        let mut v = vec![0u8; 3 * BLOCK];
        let pad = v.as_ptr().align_offset(BLOCK);
        let aligned = &mut v[pad..pad + 2 * BLOCK];
        d.pread_direct(8192, aligned).unwrap();
        assert!(aligned.iter().all(|&x| x == 5));
        // Unaligned offset, length or address: read through the page cache.
        let mut b = vec![0u8; 100];
        d.pread_direct(8190, &mut b).unwrap();
        assert_eq!(&b[..2], &[0, 0]);
        assert!(b[2..].iter().all(|&x| x == 5));
        d.pread_direct(8192, &mut v[pad + 1..pad + 1 + BLOCK])
            .unwrap();
        assert!(v[pad + 1..pad + 1 + BLOCK].iter().all(|&x| x == 5));
    }

    #[test]
    fn data_ranges_list_the_allocated_extents_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let size = 8u64 << 20;
        File::create(&p).unwrap().set_len(size).unwrap();
        let d = BackingDisk::open(&p).unwrap();
        assert_eq!(d.data_ranges(0, size), vec![]);
        d.pwrite(1 << 20, &vec![1; 1 << 20]).unwrap();
        d.pwrite(5 << 20, &vec![2; 4096]).unwrap();
        d.sync().unwrap();
        let r = d.data_ranges(0, size);
        if r == vec![(0, size)] {
            // A file system without SEEK_HOLE support: all data, still correct.
            return;
        }
        // File systems may round extents out to their block size: every byte
        // written is inside a listed range, and what is listed is near it.
        let covered = |o: u64| r.iter().any(|&(a, b)| a <= o && o < b);
        for o in [(1u64 << 20), (2 << 20) - 1, 5 << 20, (5 << 20) + 4095] {
            assert!(covered(o), "{o} not in {r:?}");
        }
        for o in [0u64, 3 << 20, 7 << 20] {
            assert!(!covered(o), "{o} in {r:?}");
        }
        assert!(r.windows(2).all(|w| w[0].1 <= w[1].0), "{r:?}");
        // A query starting inside data, clamped at the disk's end.
        let r = d.data_ranges((1 << 20) + 100, size + 4096);
        assert_eq!(r.first().map(|x| x.0), Some((1 << 20) + 100), "{r:?}");
        assert!(r.iter().all(|&(a, b)| a < b && b <= size), "{r:?}");
    }
}
