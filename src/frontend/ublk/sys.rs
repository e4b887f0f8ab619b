//! Everything of the ublk frontend that the kernel shares memory with: the
//! control ring (128-byte SQEs carrying `ublksrv_ctrl_cmd`), each queue's ring
//! (FETCH_REQ / COMMIT_AND_FETCH_REQ carrying `ublksrv_io_cmd`), the queue's
//! read-only descriptor array mapped from `/dev/ublkcN`, and the tag buffers.
//! This is the only module of the crate's ublk code with `unsafe`.
//!
//! Buffer ownership, the argument every `SAFETY` comment below rests on:
//! - A control command's buffer is a `Vec` owned by [`CtrlRing::run`] from the
//!   push of its SQE until its CQE is reaped; only then is it returned. If the
//!   CQE never comes (a timeout the cancel did not end), the `Vec` is leaked.
//! - A queue's tag buffers live in one anonymous mapping owned by its
//!   [`QueueRing`], one slice of `buf_len` bytes per tag. Each tag is either
//!   with the driver (a FETCH or COMMIT_AND_FETCH in flight: the driver may
//!   copy a write's data into it or a read's data out of it, always from the
//!   queue thread's own context while it is in `io_uring_enter`) or with the
//!   server (its fetch completed, its commit not yet pushed), or ended (its
//!   command completed with an abort or an error). [`QueueRing::buffer`] hands
//!   out a tag's slice only while the server holds the tag, and the slice
//!   borrows the ring mutably, so it is gone before the next push or wait.
//!   The mapping is unmapped only when no tag is with the driver; otherwise
//!   dropping the ring leaks it (the thread is ending on an error, and the
//!   kernel cancels the commands when the ring closes or the thread exits).
//! - The descriptor array is written by the driver and only read here, one
//!   slot at a time, after the slot's fetch completed.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::proto::{
    CtrlCmd, IO_COMMIT_AND_FETCH_REQ, IO_DESC_LEN, IO_FETCH_REQ, IO_RES_OK, IoCmd, IoDesc,
    cmd_buf_len, cmd_buf_offset, cmd_name,
};
use super::queue::{Completion, QueueIo};

/// The system's page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// A memory mapping owned by this process: unmapped on drop unless leaked.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by its holder; nothing in it is
// tied to the thread that created it.
unsafe impl Send for Mapping {}

impl Mapping {
    /// `len` bytes of private anonymous memory, zeroed, reserved lazily.
    fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a new private anonymous mapping aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Self::checked(p, len)
    }

    /// `len` bytes of `fd` at `offset`, shared and read-only.
    fn shared_read_only(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        // SAFETY: a new read-only mapping of a file we hold open; the kernel
        // owns what it maps and we only read it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                off,
            )
        };
        Self::checked(p, len)
    }

    fn checked(p: *mut libc::c_void, len: usize) -> io::Result<Self> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null address"))?;
        Ok(Mapping { ptr, len })
    }

    /// Give the memory up without unmapping it.
    fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by mmap with this address and length
        // and is unmapped once, here; the owners only drop it when nothing
        // (the kernel included) uses it any more (see the module doc).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// user_data of the cancel of a timed-out control command.
const CANCEL_UD: u64 = u64::MAX;
/// How long a cancelled control command is given to complete.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// The ring of the control device: one command at a time, 128-byte SQEs (the
/// driver refuses control commands from a ring without them).
pub(crate) struct CtrlRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    next: u64,
}

impl CtrlRing {
    /// A small ring with 128-byte SQEs.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(CtrlRing { ring, next: 1 })
    }

    /// Run control command `op` on `fd` (`/dev/ublk-control`) with payload
    /// `cmd`, whose `addr`/`len` are set to `buf` when it is not empty, and
    /// wait up to `timeout` for its result. Returns the CQE's result and the
    /// buffer (as the driver left it). On a timeout the command is cancelled;
    /// if it still does not complete, `buf` is leaked and `TimedOut` returned.
    pub fn run(
        &mut self,
        fd: BorrowedFd<'_>,
        op: u32,
        mut cmd: CtrlCmd,
        mut buf: Vec<u8>,
        timeout: Duration,
    ) -> io::Result<(i32, Vec<u8>)> {
        if !buf.is_empty() {
            cmd.len = u16::try_from(buf.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer too long"))?;
            cmd.addr = buf.as_mut_ptr() as u64;
        }
        let mut payload = [0u8; 80];
        let head = cmd.encode();
        payload[..head.len()].copy_from_slice(&head);
        let ud = self.next;
        self.next += 1;
        let sqe = opcode::UringCmd80::new(types::Fd(fd.as_raw_fd()), op)
            .cmd(payload)
            .build()
            .user_data(ud);
        // SAFETY: the command refers to `buf` only (through cmd.addr/len), which
        // this function owns and neither drops nor returns before the CQE is
        // reaped; when it is never reaped, `buf` is leaked below.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return Err(io::Error::other("control ring full"));
        }
        match self.reap(ud, timeout) {
            Ok(Some(res)) => return Ok((res, buf)),
            Ok(None) => {}
            Err(e) => {
                // The command's fate is unknown: the kernel may still use buf.
                std::mem::forget(buf);
                return Err(e);
            }
        }
        let cancel =
            squeue::Entry128::from(opcode::AsyncCancel::new(ud).build().user_data(CANCEL_UD));
        // SAFETY: a cancel refers to no memory.
        let pushed = unsafe { self.ring.submission().push(&cancel) }.is_ok();
        let reaped = pushed && matches!(self.reap(ud, CANCEL_GRACE), Ok(Some(_)));
        if !reaped {
            std::mem::forget(buf);
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{} did not complete within {timeout:?}", cmd_name(op)),
        ))
    }

    /// Submit and wait until the CQE of `ud` is reaped (`Some(result)`) or
    /// `timeout` passes (`None`). Other CQEs (cancels, late completions of
    /// earlier timed-out commands) are dropped.
    fn reap(&mut self, ud: u64, timeout: Duration) -> io::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut found = None;
            for cqe in self.ring.completion() {
                if cqe.user_data() == ud {
                    found = Some(cqe.result());
                }
            }
            if found.is_some() {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ts = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Who holds a tag (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// Not fetched yet.
    Idle,
    /// A command is in flight (or queued): the driver may use the buffer.
    Driver,
    /// The fetch completed with a request: the server may use the buffer.
    Server,
    /// Aborted, or failed: nobody uses the buffer.
    Ended,
}

/// The ring of one hardware queue, with its descriptor array and its tag
/// buffers. Owned by the queue's thread (the driver accepts a queue's
/// commands only from the thread that fetched first).
pub(crate) struct QueueRing {
    // Dropped first: closing the ring cancels whatever is still in flight.
    ring: IoUring,
    cdev: Arc<File>,
    q_id: u16,
    tags: Vec<Holder>,
    descs: Mapping,
    bufs: Option<Mapping>,
    buf_len: usize,
}

impl QueueRing {
    /// Set up queue `q_id` of the device open as `cdev`: a ring of `depth`
    /// entries, the queue's descriptor array mapped read-only, and `depth`
    /// zeroed buffers of `buf_len` bytes (a multiple of the page size).
    pub fn new(cdev: Arc<File>, q_id: u16, depth: u16, buf_len: usize) -> io::Result<Self> {
        let descs = cdev.clone();
        Self::with_descs(cdev, &descs, q_id, depth, buf_len)
    }

    /// [`QueueRing::new`] with the commands sent to `cdev` and the descriptor
    /// array mapped from `descs` (the same file, except in tests).
    fn with_descs(
        cdev: Arc<File>,
        descs: &File,
        q_id: u16,
        depth: u16,
        buf_len: usize,
    ) -> io::Result<Self> {
        let ring = IoUring::new(u32::from(depth).max(2))?;
        let page = page_size();
        let descs = Mapping::shared_read_only(
            descs.as_fd(),
            cmd_buf_len(depth, page),
            cmd_buf_offset(q_id, page),
        )?;
        let total = usize::from(depth)
            .checked_mul(buf_len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffers too large"))?;
        let bufs = Mapping::anonymous(total)?;
        Ok(QueueRing {
            ring,
            cdev,
            q_id,
            tags: vec![Holder::Idle; usize::from(depth)],
            descs,
            bufs: Some(bufs),
            buf_len,
        })
    }

    /// Address of `tag`'s buffer.
    fn buf_addr(&self, tag: u16) -> u64 {
        let base = self.bufs.as_ref().map_or(0, |m| m.ptr.as_ptr() as u64);
        base + u64::from(tag) * self.buf_len as u64
    }

    /// Queue `op` for `tag` with `result`; the tag goes to the driver.
    fn push(&mut self, op: u32, tag: u16, result: i32) -> io::Result<()> {
        let cmd = IoCmd {
            q_id: self.q_id,
            tag,
            result,
            addr: self.buf_addr(tag),
        };
        let sqe = opcode::UringCmd16::new(types::Fd(self.cdev.as_raw_fd()), op)
            .cmd(cmd.encode())
            .build()
            .user_data(u64::from(tag));
        self.tags[usize::from(tag)] = Holder::Driver;
        loop {
            // SAFETY: the command refers to the tag's buffer only, inside
            // `bufs`, which is unmapped only when no tag is with the driver
            // (marked just above) and is leaked otherwise.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            // Cannot happen (the ring has a slot per tag); submit to make room.
            self.ring.submit()?;
        }
    }
}

impl QueueIo for QueueRing {
    fn depth(&self) -> u16 {
        self.tags.len() as u16
    }

    fn fetch_all(&mut self) -> io::Result<()> {
        for tag in 0..self.depth() {
            self.push(IO_FETCH_REQ, tag, 0)?;
        }
        self.ring.submit()?;
        // A fetch completes at once only when the driver refuses it.
        let mut refused = None;
        for cqe in self.ring.completion() {
            let tag = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
            if let Some(h) = self.tags.get_mut(tag) {
                *h = if cqe.result() == IO_RES_OK {
                    Holder::Server
                } else {
                    Holder::Ended
                };
            }
            if cqe.result() < 0 {
                refused.get_or_insert(cqe.result());
            }
        }
        match refused {
            Some(res) => Err(io::Error::from_raw_os_error(-res)),
            None if self.tags.contains(&Holder::Server) => Err(io::Error::other(
                "a fetch completed before the device started",
            )),
            None => Ok(()),
        }
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        for cqe in self.ring.completion() {
            let tag = u16::try_from(cqe.user_data()).unwrap_or(u16::MAX);
            if let Some(h) = self.tags.get_mut(usize::from(tag)) {
                *h = if cqe.result() == IO_RES_OK {
                    Holder::Server
                } else {
                    Holder::Ended
                };
            }
            out.push(Completion {
                tag,
                res: cqe.result(),
            });
        }
        Ok(())
    }

    fn desc(&self, tag: u16) -> IoDesc {
        let at = usize::from(tag) * IO_DESC_LEN;
        if at + IO_DESC_LEN > self.descs.len {
            return IoDesc::default();
        }
        // SAFETY: `at + 24` lies inside the mapping (checked above), which
        // lives as long as `self`; the driver wrote this slot before completing
        // the tag's fetch and does not write it again before the tag is
        // committed. Volatile: the memory is shared with the kernel. [u8; 24]
        // has alignment 1.
        let raw = unsafe {
            std::ptr::read_volatile(self.descs.ptr.as_ptr().add(at).cast::<[u8; IO_DESC_LEN]>())
        };
        IoDesc::decode(&raw)
    }

    fn buffer(&mut self, tag: u16) -> Option<&mut [u8]> {
        if self.tags.get(usize::from(tag)) != Some(&Holder::Server) {
            return None;
        }
        let m = self.bufs.as_ref()?;
        let at = usize::from(tag) * self.buf_len;
        // SAFETY: tag < depth, so `at + buf_len` is inside the mapping of
        // depth × buf_len bytes, which lives as long as `self`. The server
        // holds the tag: the driver does not touch its buffer until the tag is
        // committed, which needs `&mut self` again, so this slice is the only
        // reference to these bytes while it lives.
        Some(unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr().add(at), self.buf_len) })
    }

    fn commit(&mut self, tag: u16, result: i32) -> io::Result<()> {
        if self.tags.get(usize::from(tag)) != Some(&Holder::Server) {
            return Err(io::Error::other(format!(
                "commit of tag {tag}, which the server does not hold"
            )));
        }
        self.push(IO_COMMIT_AND_FETCH_REQ, tag, result)
    }
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        if self.tags.contains(&Holder::Driver)
            && let Some(m) = self.bufs.take()
        {
            tracing::warn!(
                queue = self.q_id,
                bytes = m.len,
                "ublk queue ends with commands in flight: its buffers are leaked, not freed"
            );
            m.leak();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::ublk::proto::{CMD_GET_DEV_INFO, DEV_INFO_LEN, MAX_QUEUE_DEPTH};

    /// The control ring on files that are no ublk device: a regular file
    /// takes no uring commands (EOPNOTSUPP); /dev/null takes every one and
    /// answers 0 (Linux ≥ 6.1). Either way the result is reaped and the buffer
    /// comes back untouched.
    #[test]
    fn control_commands_complete_and_return_their_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let plain = File::create(dir.path().join("f")).unwrap();
        let null = File::open("/dev/null").unwrap();
        let mut r = CtrlRing::new().unwrap();
        let cmd = CtrlCmd::new(0);
        for (f, ok) in [
            (&plain, [-libc::EOPNOTSUPP; 2]),
            (&null, [0, -libc::EOPNOTSUPP]),
        ] {
            for _ in 0..3 {
                let (res, buf) = r
                    .run(
                        f.as_fd(),
                        CMD_GET_DEV_INFO,
                        cmd,
                        vec![0xaa; DEV_INFO_LEN],
                        Duration::from_secs(10),
                    )
                    .unwrap();
                assert!(ok.contains(&res), "{res}");
                assert_eq!(buf, vec![0xaa; DEV_INFO_LEN]);
            }
        }
        let (res, buf) = r
            .run(
                plain.as_fd(),
                CMD_GET_DEV_INFO,
                cmd,
                Vec::new(),
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!((res, buf.len()), (-libc::EOPNOTSUPP, 0));
    }

    /// A queue ring over a regular file standing in for `/dev/ublkcN`: the
    /// mappings work, every fetch is refused (EOPNOTSUPP), no tag stays with
    /// the "driver", and the buffers are unmapped normally.
    #[test]
    fn queue_ring_setup_and_refused_fetches() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ublkc");
        let page = page_size();
        let f = File::create(&p).unwrap();
        f.set_len(cmd_buf_offset(2, page) + cmd_buf_len(MAX_QUEUE_DEPTH, page) as u64)
            .unwrap();
        let cdev = Arc::new(File::open(&p).unwrap());
        let mut q = QueueRing::new(cdev, 1, 8, 64 * 1024).unwrap();
        assert_eq!(q.depth(), 8);
        assert_eq!(q.desc(3), IoDesc::default());
        assert_eq!(q.desc(u16::MAX), IoDesc::default());
        assert!(q.buffer(0).is_none(), "no buffer before a fetch completes");
        let e = q.fetch_all().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
        // Some refusals may complete only now.
        let mut out = Vec::new();
        while q.tags.contains(&Holder::Driver) {
            q.wait(&mut out).unwrap();
        }
        assert!(out.iter().all(|c| c.res == -libc::EOPNOTSUPP));
        assert!(q.tags.iter().all(|&h| h == Holder::Ended));
        assert!(q.buffer(0).is_none());
        assert!(q.commit(0, 0).is_err());
        let addr = q.buf_addr(1) - q.buf_addr(0);
        assert_eq!(addr, 64 * 1024);
        drop(q);
    }

    /// The real ring, mappings and buffers through the request path, with
    /// /dev/null standing in for the driver (it completes every uring
    /// command with 0, which reads as "a request is ready") and a regular
    /// file holding the descriptors the driver would have written.
    #[test]
    fn requests_through_the_real_ring_and_buffers() {
        use crate::capture::backing::BackingDisk;
        use crate::frontend::BlockIo;
        use crate::frontend::ublk::handle::serve;
        use crate::frontend::ublk::proto::{Limits, OP_FLUSH, OP_READ, OP_WRITE};
        use crate::frontend::ublk::stats::UblkStats;
        use std::os::unix::fs::FileExt;

        let null = Arc::new(
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let page = page_size();
        let descs = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("descs"))
            .unwrap();
        descs
            .set_len(cmd_buf_offset(1, page) + cmd_buf_len(4, page) as u64)
            .unwrap();
        let img = dir.path().join("d.img");
        File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let disk = BackingDisk::open(&img).unwrap();
        let lim = Limits {
            size: 1 << 20,
            logical_block: 4096,
            max_io_bytes: 64 * 1024,
        };
        let stats = UblkStats::default();
        let mut q = QueueRing::with_descs(null, &descs, 1, 4, 64 * 1024).unwrap();
        let set = |tag: u64, op: u8, sector: u64, sectors: u32| {
            let d = IoDesc {
                op_flags: u32::from(op),
                nr_sectors: sectors,
                start_sector: sector,
                addr: 0,
            };
            let at = cmd_buf_offset(1, page) + tag * IO_DESC_LEN as u64;
            descs.write_all_at(&d.encode(), at).unwrap();
        };
        // Round 1: tags 0-2 write 4 KiB each at 0, 4, 8 KiB; tag 3 flushes.
        for t in 0..3 {
            set(t, OP_WRITE, t * 8, 8);
        }
        set(3, OP_FLUSH, 0, 0);
        // Every fetch "completes" at once: a driver would never do that.
        let e = q.fetch_all().unwrap_err();
        assert!(e.to_string().contains("before the device started"), "{e}");
        let mut results = Vec::new();
        for round in 0..2u8 {
            for tag in 0..4u16 {
                let d = q.desc(tag);
                let buf = q.buffer(tag).expect("the server holds every tag");
                buf[..4096].fill(round * 16 + tag as u8 + 1);
                results.push(serve(&disk, &d, &lim, buf, &stats));
                q.commit(tag, *results.last().unwrap()).unwrap();
                assert!(q.buffer(tag).is_none(), "committed: the driver holds it");
            }
            // Round 2: read back what tags 0-2 wrote, through other tags.
            for t in 0..3 {
                set(t, OP_READ, (2 - t) * 8, 8);
            }
            let mut out = Vec::new();
            while q.tags.contains(&Holder::Driver) {
                q.wait(&mut out).unwrap();
            }
            assert_eq!(out.len(), 4);
            assert!(out.iter().all(|c| c.res == 0));
        }
        assert_eq!(results, vec![4096, 4096, 4096, 0, 4096, 4096, 4096, 0]);
        // The reads filled the buffers of tags 0-2 with what was written.
        for (tag, written_by) in [(0u16, 2u8), (1, 1), (2, 0)] {
            let b = q.buffer(tag).unwrap();
            assert!(b[..4096].iter().all(|&x| x == written_by + 1), "tag {tag}");
        }
        let mut back = vec![0u8; 12288];
        disk.read_at(0, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 1));
        assert!(back[8192..].iter().all(|&x| x == 3));
        let s = stats.snapshot();
        assert_eq!((s.writes, s.reads, s.flushes, s.errors), (3, 3, 2, 0));
    }
}
