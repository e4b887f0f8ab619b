//! The loop of one hardware queue: every tag is fetched once, then each
//! completed fetch carries a request, which is served through the disk's
//! [`BlockIo`] and answered with COMMIT_AND_FETCH_REQ (which also fetches the
//! tag's next request), until the driver aborts every tag.
//!
//! The loop runs over [`QueueIo`], the queue's ring as seen from here; the
//! real one (an io_uring on `/dev/ublkcN`, its descriptor array and the tag
//! buffers) is `sys::QueueRing`, and the tests drive the loop with a fake
//! driver. The loop owns nothing the kernel uses; what a tag's buffer may be
//! used for, and when, is the ring's business (see `sys`).

use std::io;

use super::handle::serve;
use super::proto::{IO_RES_ABORT, IO_RES_OK, IoDesc, Limits};
use super::stats::UblkStats;
use crate::frontend::BlockIo;

/// One completed command of the queue's ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    /// The tag whose command completed.
    pub tag: u16,
    /// `UBLK_IO_RES_OK` (a request to serve), `UBLK_IO_RES_ABORT` (the tag is
    /// done for good) or a negative errno (the command itself failed).
    pub res: i32,
}

/// A queue's ring: fetch, wait, read a descriptor, use a buffer, commit.
pub(crate) trait QueueIo {
    /// Tags of the queue.
    fn depth(&self) -> u16;

    /// Submit FETCH_REQ for every tag (each with its buffer).
    fn fetch_all(&mut self) -> io::Result<()>;

    /// Submit the queued commits, wait for at least one completion, and append
    /// every available one to `out` (it may append none after an interrupt).
    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()>;

    /// The descriptor of `tag`, whose fetch has just completed.
    fn desc(&self, tag: u16) -> IoDesc;

    /// The buffer of `tag`, while the server owns the tag (its fetch completed
    /// and it has not been committed); `None` otherwise.
    fn buffer(&mut self, tag: u16) -> Option<&mut [u8]>;

    /// Queue COMMIT_AND_FETCH_REQ for `tag` with `result`; the tag and its
    /// buffer go back to the driver.
    fn commit(&mut self, tag: u16, result: i32) -> io::Result<()>;
}

/// Why a queue stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    /// The ring could not submit or wait.
    #[error("queue {q}: io_uring: {source}")]
    Ring {
        /// Queue.
        q: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The driver refused a command (a fetch or a commit).
    #[error("queue {q} tag {tag}: the driver refused the command: {}", io::Error::from_raw_os_error(-res))]
    Refused {
        /// Queue.
        q: u16,
        /// Tag.
        tag: u16,
        /// The negative errno.
        res: i32,
    },
    /// A completion for a tag the queue does not have, or an unexpected result.
    #[error("queue {q}: unexpected completion {c:?}")]
    Unexpected {
        /// Queue.
        q: u16,
        /// The completion.
        c: Completion,
    },
}

/// Serve queue `q` until the driver has aborted every tag (the device was
/// stopped). `fetch_all` must have been called. Returns early, with every
/// other tag still with the driver, when a command fails: the caller then ends
/// the thread, which makes the driver fail the device's I/O rather than wait
/// for a server that no longer answers.
pub(crate) fn run(
    ring: &mut impl QueueIo,
    q: u16,
    disk: &dyn BlockIo,
    lim: &Limits,
    stats: &UblkStats,
) -> Result<(), QueueError> {
    let depth = ring.depth();
    let mut ended = vec![false; usize::from(depth)];
    let mut live = usize::from(depth);
    let mut done = Vec::with_capacity(usize::from(depth));
    while live > 0 {
        done.clear();
        ring.wait(&mut done)
            .map_err(|source| QueueError::Ring { q, source })?;
        for &c in &done {
            let known = ended.get(usize::from(c.tag)).is_some_and(|e| !e);
            if !known {
                return Err(QueueError::Unexpected { q, c });
            }
            match c.res {
                IO_RES_OK => {
                    let d = ring.desc(c.tag);
                    let res = match ring.buffer(c.tag) {
                        Some(buf) => serve(disk, &d, lim, buf, stats),
                        None => return Err(QueueError::Unexpected { q, c }),
                    };
                    ring.commit(c.tag, res)
                        .map_err(|source| QueueError::Ring { q, source })?;
                }
                IO_RES_ABORT => {
                    ended[usize::from(c.tag)] = true;
                    live -= 1;
                }
                res if res < 0 => {
                    return Err(QueueError::Refused { q, tag: c.tag, res });
                }
                // UBLK_IO_RES_NEED_GET_DATA (never asked for) or anything else.
                _ => return Err(QueueError::Unexpected { q, c }),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::fs::File;

    use super::super::proto::*;
    use super::*;
    use crate::capture::backing::BackingDisk;

    /// Who holds a tag in the fake driver.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Holder {
        Idle,
        Driver,
        Server,
        Ended,
    }

    /// A fake ublk driver: requests queued by the test are delivered to
    /// fetched tags; commits are recorded with the buffer contents.
    struct FakeRing {
        tags: Vec<Holder>,
        descs: Vec<IoDesc>,
        bufs: Vec<Vec<u8>>,
        /// Requests waiting for a fetched tag: descriptor and data to write.
        pending: VecDeque<(IoDesc, Vec<u8>)>,
        /// Completions to deliver.
        ready: VecDeque<Completion>,
        /// Committed results: tag, result, the first bytes of its buffer.
        commits: Vec<(u16, i32, Vec<u8>)>,
        /// Abort every tag once the pending requests are served.
        stop_when_idle: bool,
        /// Fail the commit of this many-th request with this errno.
        refuse: Option<(usize, i32)>,
        fetched: bool,
    }

    impl FakeRing {
        fn new(depth: u16, buf: usize) -> Self {
            FakeRing {
                tags: vec![Holder::Idle; usize::from(depth)],
                descs: vec![IoDesc::default(); usize::from(depth)],
                bufs: vec![vec![0; buf]; usize::from(depth)],
                pending: VecDeque::new(),
                ready: VecDeque::new(),
                commits: Vec::new(),
                stop_when_idle: true,
                refuse: None,
                fetched: false,
            }
        }

        fn submit(&mut self, d: IoDesc, data: Vec<u8>) {
            self.pending.push_back((d, data));
        }

        /// Deliver pending requests to tags the driver holds; abort when idle.
        fn dispatch(&mut self) {
            for t in 0..self.tags.len() {
                if self.tags[t] != Holder::Driver {
                    continue;
                }
                if let Some((d, data)) = self.pending.pop_front() {
                    self.descs[t] = d;
                    self.bufs[t][..data.len()].copy_from_slice(&data);
                    self.tags[t] = Holder::Server;
                    self.ready.push_back(Completion {
                        tag: t as u16,
                        res: IO_RES_OK,
                    });
                }
            }
            let busy = self.tags.contains(&Holder::Server);
            if self.pending.is_empty() && !busy && self.ready.is_empty() && self.stop_when_idle {
                for t in 0..self.tags.len() {
                    if self.tags[t] == Holder::Driver {
                        self.tags[t] = Holder::Ended;
                        self.ready.push_back(Completion {
                            tag: t as u16,
                            res: IO_RES_ABORT,
                        });
                    }
                }
            }
        }
    }

    impl QueueIo for FakeRing {
        fn depth(&self) -> u16 {
            self.tags.len() as u16
        }
        fn fetch_all(&mut self) -> io::Result<()> {
            assert!(!self.fetched, "fetched twice");
            self.fetched = true;
            self.tags.fill(Holder::Driver);
            Ok(())
        }
        fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
            self.dispatch();
            if self.ready.is_empty() {
                return Err(io::Error::other("the fake driver has nothing to deliver"));
            }
            // Deliver in small batches to interleave commits and completions.
            for _ in 0..2 {
                out.extend(self.ready.pop_front());
            }
            Ok(())
        }
        fn desc(&self, tag: u16) -> IoDesc {
            assert_eq!(self.tags[usize::from(tag)], Holder::Server);
            self.descs[usize::from(tag)]
        }
        fn buffer(&mut self, tag: u16) -> Option<&mut [u8]> {
            (self.tags[usize::from(tag)] == Holder::Server)
                .then(|| self.bufs[usize::from(tag)].as_mut_slice())
        }
        fn commit(&mut self, tag: u16, result: i32) -> io::Result<()> {
            let t = usize::from(tag);
            assert_eq!(self.tags[t], Holder::Server, "commit of a tag not owned");
            self.commits
                .push((tag, result, self.bufs[t][..16].to_vec()));
            self.tags[t] = Holder::Driver;
            if let Some((n, errno)) = self.refuse
                && self.commits.len() == n
            {
                self.tags[t] = Holder::Ended;
                self.ready.push_back(Completion { tag, res: -errno });
            }
            Ok(())
        }
    }

    fn desc(op: u8, sector: u64, sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op),
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    fn disk() -> (tempfile::TempDir, BackingDisk) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let d = BackingDisk::open(&p).unwrap();
        (dir, d)
    }

    const LIM: Limits = Limits {
        size: 1 << 20,
        logical_block: 4096,
        max_io_bytes: 64 * 1024,
    };

    #[test]
    fn requests_are_served_and_the_queue_ends_when_every_tag_is_aborted() {
        let (_dir, disk) = disk();
        let stats = UblkStats::default();
        let mut ring = FakeRing::new(4, 64 * 1024);
        for i in 0..10u64 {
            ring.submit(desc(OP_WRITE, i * 8, 8), vec![i as u8 + 1; 4096]);
        }
        ring.submit(desc(OP_FLUSH, 0, 0), Vec::new());
        for i in 0..10u64 {
            ring.submit(desc(OP_READ, i * 8, 8), Vec::new());
        }
        ring.submit(desc(9, 0, 8), Vec::new());
        ring.fetch_all().unwrap();
        run(&mut ring, 0, &disk, &LIM, &stats).unwrap();
        assert!(ring.tags.iter().all(|&t| t == Holder::Ended));
        assert_eq!(ring.commits.len(), 22);
        for (i, (_, res, _)) in ring.commits[..10].iter().enumerate() {
            assert_eq!(*res, 4096, "write {i}");
        }
        assert_eq!(ring.commits[10].1, 0, "flush");
        for (i, (_, res, head)) in ring.commits[11..21].iter().enumerate() {
            assert_eq!(*res, 4096, "read {i}");
            assert_eq!(
                head,
                &vec![i as u8 + 1; 16],
                "read {i} returned the written data"
            );
        }
        assert_eq!(ring.commits[21].1, -libc::EOPNOTSUPP);
        let s = stats.snapshot();
        assert_eq!((s.writes, s.reads, s.flushes, s.errors), (10, 10, 1, 1));
    }

    #[test]
    fn a_refused_commit_ends_the_queue_with_an_error() {
        let (_dir, disk) = disk();
        let stats = UblkStats::default();
        let mut ring = FakeRing::new(2, 64 * 1024);
        ring.refuse = Some((2, libc::EINVAL));
        for i in 0..4u64 {
            ring.submit(desc(OP_WRITE, i * 8, 8), vec![1; 4096]);
        }
        ring.fetch_all().unwrap();
        let e = run(&mut ring, 3, &disk, &LIM, &stats).unwrap_err();
        assert!(
            matches!(e, QueueError::Refused { q: 3, res, .. } if res == -libc::EINVAL),
            "{e}"
        );
        assert!(e.to_string().contains("queue 3 tag"), "{e}");
    }

    #[test]
    fn a_ring_failure_or_a_stray_completion_ends_the_queue() {
        let (_dir, disk) = disk();
        let stats = UblkStats::default();
        let mut ring = FakeRing::new(2, 64 * 1024);
        ring.stop_when_idle = false;
        ring.fetch_all().unwrap();
        let e = run(&mut ring, 0, &disk, &LIM, &stats).unwrap_err();
        assert!(matches!(e, QueueError::Ring { .. }), "{e}");

        let mut ring = FakeRing::new(2, 64 * 1024);
        ring.fetch_all().unwrap();
        ring.ready.push_back(Completion { tag: 7, res: 0 });
        let e = run(&mut ring, 0, &disk, &LIM, &stats).unwrap_err();
        assert!(matches!(e, QueueError::Unexpected { .. }), "{e}");

        let mut ring = FakeRing::new(2, 64 * 1024);
        ring.fetch_all().unwrap();
        ring.ready.push_back(Completion { tag: 0, res: 1 });
        let e = run(&mut ring, 0, &disk, &LIM, &stats).unwrap_err();
        assert!(matches!(e, QueueError::Unexpected { .. }), "{e}");
    }
}
