//! One request: a descriptor decoded, performed on the disk's [`BlockIo`], and
//! its result encoded as ublk wants it (bytes for reads and writes, 0 for the
//! others, a negative errno on failure).

use super::proto::{IoDesc, Limits, Request, decode};
use super::stats::{Counter, UblkStats};
use crate::frontend::{BlockIo, IoError};

/// Serve the request `d` describes with the tag's buffer `buf` (the data of a
/// write, the destination of a read) and return the result for
/// COMMIT_AND_FETCH_REQ. Never panics: a buffer shorter than the request (a
/// driver that sent more than the advertised limit) is answered `-EINVAL`.
pub(crate) fn serve(
    disk: &dyn BlockIo,
    d: &IoDesc,
    lim: &Limits,
    buf: &mut [u8],
    stats: &UblkStats,
) -> i32 {
    let req = match decode(d, lim) {
        Ok(r) => r,
        Err(e) => {
            stats.error();
            tracing::debug!(?d, "ublk request refused: {e}");
            return -e.errno();
        }
    };
    let done = match req {
        Request::Read { offset, len } => match buf.get_mut(..len as usize) {
            Some(b) => disk
                .read_at(offset, b)
                .map(|()| (Counter::Read, u64::from(len))),
            None => return short_buffer(stats, len, buf.len()),
        },
        Request::Write { offset, len, fua } => match buf.get(..len as usize) {
            Some(b) => disk
                .write_at(offset, b.to_vec(), fua)
                .map(|()| (Counter::Write, u64::from(len))),
            None => return short_buffer(stats, len, buf.len()),
        },
        Request::Flush => disk.flush().map(|()| (Counter::Flush, 0)),
        Request::Discard { offset, len, fua } => {
            disk.trim(offset, len, fua).map(|()| (Counter::Discard, 0))
        }
        Request::WriteZeroes {
            offset,
            len,
            may_unmap,
            fua,
        } => disk
            .write_zeroes(offset, len, may_unmap, fua)
            .map(|()| (Counter::WriteZeroes, 0)),
    };
    result(done, stats)
}

fn short_buffer(stats: &UblkStats, len: u32, have: usize) -> i32 {
    stats.error();
    tracing::error!(len, have, "ublk request longer than its tag's buffer");
    -libc::EINVAL
}

/// The result word of a request: bytes moved (reads and writes) or 0, or the
/// negative errno of the failure.
fn result(done: Result<(Counter, u64), IoError>, stats: &UblkStats) -> i32 {
    match done {
        Ok((c, bytes)) => {
            stats.done(c, bytes);
            match c {
                // At most max_io_bytes (32 MiB), so it fits.
                Counter::Read | Counter::Write => bytes as i32,
                _ => 0,
            }
        }
        Err(e) => {
            stats.error();
            tracing::warn!("ublk request failed: {e}");
            -e.errno()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::time::Duration;

    use super::super::proto::*;
    use super::*;
    use crate::capture::backing::BackingDisk;
    use crate::capture::journal::{CaptureJournal, Change, Policy};
    use crate::capture::protected::ProtectedDisk;
    use crate::frontend::{IoErrorKind, Op};

    const MIB: u64 = 1 << 20;

    fn d(op: u8, flags: u32, sector: u64, sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    fn lim(size: u64) -> Limits {
        Limits {
            size,
            logical_block: 4096,
            max_io_bytes: 256 * 1024,
        }
    }

    /// Every operation through `disk`, checked by reading back through it.
    fn exercise(disk: &dyn BlockIo) -> UblkStats {
        let st = UblkStats::default();
        let lim = lim(disk.size());
        let mut buf = vec![0u8; lim.max_io_bytes as usize];
        buf[..8192].fill(7);
        assert_eq!(
            serve(disk, &d(OP_WRITE, 0, 8, 16), &lim, &mut buf, &st),
            8192
        );
        assert_eq!(
            serve(disk, &d(OP_WRITE, IO_F_FUA, 24, 8), &lim, &mut buf, &st),
            4096
        );
        buf.fill(0);
        assert_eq!(
            serve(disk, &d(OP_READ, 0, 0, 40), &lim, &mut buf, &st),
            20480
        );
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(buf[4096..16384].iter().all(|&x| x == 7));
        assert!(buf[16384..20480].iter().all(|&x| x == 0));
        assert_eq!(serve(disk, &d(OP_FLUSH, 0, 0, 0), &lim, &mut buf, &st), 0);
        assert_eq!(serve(disk, &d(OP_DISCARD, 0, 8, 8), &lim, &mut buf, &st), 0);
        let nounmap = IO_F_NOUNMAP | IO_F_FUA;
        assert_eq!(
            serve(
                disk,
                &d(OP_WRITE_ZEROES, nounmap, 16, 8),
                &lim,
                &mut buf,
                &st
            ),
            0
        );
        buf.fill(1);
        assert_eq!(
            serve(disk, &d(OP_READ, 0, 8, 24), &lim, &mut buf, &st),
            12288
        );
        assert!(buf[..8192].iter().all(|&x| x == 0), "discarded and zeroed");
        assert!(buf[8192..12288].iter().all(|&x| x == 7), "untouched");
        // Refused before reaching the disk, and failures from the disk.
        assert_eq!(
            serve(disk, &d(4, 0, 0, 8), &lim, &mut buf, &st),
            -libc::EOPNOTSUPP
        );
        let end = disk.size() / 512;
        assert_eq!(
            serve(disk, &d(OP_WRITE, 0, end, 8), &lim, &mut buf, &st),
            -libc::ENOSPC
        );
        assert_eq!(
            serve(disk, &d(OP_READ, 0, end, 8), &lim, &mut buf, &st),
            -libc::EINVAL
        );
        // A buffer shorter than the (valid) request: refused, no panic.
        let mut short = vec![0u8; 4096];
        assert_eq!(
            serve(disk, &d(OP_READ, 0, 0, 16), &lim, &mut short, &st),
            -libc::EINVAL
        );
        assert_eq!(
            serve(disk, &d(OP_WRITE, 0, 0, 16), &lim, &mut short, &st),
            -libc::EINVAL
        );
        st
    }

    #[test]
    fn requests_reach_a_backing_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(MIB).unwrap();
        let disk = BackingDisk::open(&p).unwrap();
        let s = exercise(&disk).snapshot();
        assert_eq!((s.reads, s.writes, s.flushes), (2, 2, 1));
        assert_eq!((s.discards, s.write_zeroes), (1, 1));
        assert_eq!((s.bytes_read, s.bytes_written), (20480 + 12288, 12288));
        assert_eq!(s.errors, 5);
    }

    #[test]
    fn writes_through_a_protected_disk_are_captured() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("src.img");
        File::create(&img).unwrap().set_len(MIB).unwrap();
        let j = CaptureJournal::for_tests("g1", 64 << 20, Policy::Degrade);
        let (disk, _) =
            ProtectedDisk::open(0, &img, j.clone(), &dir.path().join("state"), false).unwrap();
        exercise(&disk);
        let mut changes = Vec::new();
        loop {
            let b = j.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
            if b.is_empty() {
                break;
            }
            changes.extend(b.into_iter().map(|e| (e.offset, e.change)));
        }
        let summary: Vec<(u64, String)> = changes
            .iter()
            .map(|(o, c)| {
                let what = match c {
                    Change::Write(d) => format!("write {}", d.len()),
                    Change::Zero(l) => format!("zero {l}"),
                    Change::DiskSize(s) => format!("size {s}"),
                    Change::Tag { .. } | Change::Note { .. } => "size marker".into(),
                };
                (*o, what)
            })
            .filter(|(_, w)| !w.starts_with("size"))
            .collect();
        assert_eq!(
            summary,
            vec![
                (4096, "write 8192".to_string()),
                (12288, "write 4096".to_string()),
                (4096, "zero 4096".to_string()),
                (8192, "zero 4096".to_string()),
            ]
        );
    }

    /// A disk whose every call fails with `kind`.
    struct Failing(fn() -> IoErrorKind);

    impl BlockIo for Failing {
        fn size(&self) -> u64 {
            MIB
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> Result<(), IoError> {
            Err(IoError::new(Op::Read, o, b.len() as u64, (self.0)()))
        }
        fn write_at(&self, o: u64, d: Vec<u8>, _: bool) -> Result<(), IoError> {
            Err(IoError::new(Op::Write, o, d.len() as u64, (self.0)()))
        }
        fn flush(&self) -> Result<(), IoError> {
            Err(IoError::new(Op::Flush, 0, 0, (self.0)()))
        }
        fn trim(&self, o: u64, l: u64, _: bool) -> Result<(), IoError> {
            Err(IoError::new(Op::Trim, o, l, (self.0)()))
        }
        fn write_zeroes(&self, o: u64, l: u64, _: bool, _: bool) -> Result<(), IoError> {
            Err(IoError::new(Op::WriteZeroes, o, l, (self.0)()))
        }
    }

    #[test]
    fn disk_errors_become_negative_errnos() {
        let st = UblkStats::default();
        let lim = lim(MIB);
        let mut buf = vec![0u8; lim.max_io_bytes as usize];
        let cases: [(fn() -> IoErrorKind, i32); 4] = [
            (
                || IoErrorKind::Backing(std::io::Error::from_raw_os_error(libc::EIO)),
                libc::EIO,
            ),
            (
                || IoErrorKind::Backing(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                libc::ENOSPC,
            ),
            (|| IoErrorKind::ReadOnly, libc::EPERM),
            (|| IoErrorKind::Shutdown, libc::ESHUTDOWN),
        ];
        for (kind, errno) in cases {
            let disk = Failing(kind);
            for desc in [
                d(OP_READ, 0, 0, 8),
                d(OP_WRITE, 0, 0, 8),
                d(OP_FLUSH, 0, 0, 0),
                d(OP_DISCARD, 0, 0, 8),
                d(OP_WRITE_ZEROES, 0, 0, 8),
            ] {
                assert_eq!(serve(&disk, &desc, &lim, &mut buf, &st), -errno, "{desc:?}");
            }
        }
        let s = st.snapshot();
        assert_eq!(s.errors, 20);
        assert_eq!(s.reads + s.writes + s.flushes, 0);
    }
}
