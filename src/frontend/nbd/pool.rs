//! The I/O threads: blocking [`BlockIo`](crate::frontend::BlockIo) calls off
//! the async executor.
//!
//! Each connection owns its threads ("lanes"): one makes its reads, writes,
//! trims and write-zeroes in arrival order; a second, started at the first
//! FLUSH or FUA request, makes those, so an `fdatasync` never holds up the
//! writes queued behind it (NBD lets a flush run alongside later writes: it
//! covers only writes already replied to). A lane's queue needs no bound of
//! its own: every job holds a slot of the connection's in-flight budget.
//!
//! Why not a pool shared by all connections: measured with fio (4 KiB random
//! writes, queue depth 32, one connection; docs/NBD.md), every extra thread
//! taking jobs of one connection cost CPU per request (about 9 µs with one
//! thread, 14–16 µs with two, 28 µs with four, on 2 cores), because each
//! job then wakes a sleeping thread and the threads contend for the file's
//! inode lock. One thread per stream of requests keeps that thread busy and
//! awake at high queue depth; separate threads per connection also keep a
//! disk that stalls from holding up other exports.
//!
//! A lane thread gathers the replies of consecutive jobs and hands them to
//! the connection's writer in one message when its queue runs dry, before a
//! slow job, or after [`REPLY_BATCH`] replies: one wake-up and one socket
//! write for many requests.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::conn::{ConnShared, Reply};
use super::proto::{self, nbd_error};
use super::stats::NbdStats;

/// Transfers larger than this count as slow for reply batching.
const SLOW_BYTES: u32 = 256 << 10;
/// Most replies a lane holds back before sending them.
const REPLY_BATCH: usize = 64;

/// One blocking operation.
pub(crate) enum JobOp {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        may_unmap: bool,
        fua: bool,
    },
}

impl JobOp {
    /// Jobs for the second lane: they wait for the disk to make data durable.
    fn is_durable(&self) -> bool {
        match self {
            JobOp::Flush => true,
            JobOp::Read { .. } => false,
            JobOp::Write { fua, .. } | JobOp::Trim { fua, .. } | JobOp::WriteZeroes { fua, .. } => {
                *fua
            }
        }
    }

    /// Jobs that may take long: the replies gathered before one go first.
    fn is_slow(&self) -> bool {
        match self {
            JobOp::Flush => true,
            JobOp::Read { len, .. } => *len > SLOW_BYTES,
            JobOp::Write { data, fua, .. } => *fua || data.len() > SLOW_BYTES as usize,
            JobOp::Trim { fua, len, .. } | JobOp::WriteZeroes { fua, len, .. } => {
                *fua || *len > SLOW_BYTES
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            JobOp::Read { .. } => "read",
            JobOp::Write { .. } => "write",
            JobOp::Flush => "flush",
            JobOp::Trim { .. } => "trim",
            JobOp::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

/// A job: the operation, its connection, its cookie and the budget bytes it
/// holds (released by the writer once the reply is out).
pub(crate) struct Job {
    pub conn: Arc<ConnShared>,
    pub cookie: u64,
    pub op: JobOp,
    pub budget_bytes: u32,
}

/// Counts the lane threads of a server, so that shutdown can wait until no
/// [`BlockIo`](crate::frontend::BlockIo) call is running any more.
#[derive(Default)]
pub(crate) struct Threads {
    live: Mutex<usize>,
    idle: Condvar,
}

impl Threads {
    /// Block until every lane thread has exited, or `limit` passed; false on
    /// timeout.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        while *live > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            live = match self.idle.wait_timeout(live, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// Decrements the live count when a lane thread ends, however it ends.
struct Live(Arc<Threads>);

impl Live {
    fn new(t: Arc<Threads>) -> Live {
        *t.live.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Live(t)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        *self.0.live.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.idle.notify_all();
    }
}

/// The lanes of one connection; dropping it closes their channels, and the
/// threads exit once they have run what was queued.
///
/// The channels are crossbeam's: a thread that finds its channel empty spins
/// and yields briefly before it parks, which catches the next request of a
/// busy connection without a wake-up. Measured against a plain mutex and
/// condition variable queue that parks at once (fio as above, interleaved
/// runs): about 43k against 30k IOPS, and fewer context switches per request.
pub(crate) struct Lanes {
    threads: Arc<Threads>,
    ordered: Sender<Job>,
    durable: Option<Sender<Job>>,
}

fn spawn_lane(threads: &Arc<Threads>, name: &str) -> std::io::Result<Sender<Job>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let live = Live::new(Arc::clone(threads));
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _live = live;
            worker(rx);
        })?;
    Ok(tx)
}

impl Lanes {
    /// Start the ordered lane of a new connection.
    pub fn start(threads: &Arc<Threads>) -> std::io::Result<Lanes> {
        Ok(Lanes {
            threads: Arc::clone(threads),
            ordered: spawn_lane(threads, "nbd-io")?,
            durable: None,
        })
    }

    /// Queue a job on its lane (starting the durable lane at its first job).
    pub fn submit(&mut self, job: Job) -> std::io::Result<()> {
        let lane = if job.op.is_durable() {
            match &self.durable {
                Some(tx) => tx,
                None => self.durable.insert(spawn_lane(&self.threads, "nbd-flush")?),
            }
        } else {
            &self.ordered
        };
        lane.send(job)
            .map_err(|_| std::io::Error::other("the NBD I/O thread is gone"))
    }
}

/// Replies gathered by a lane for its connection.
struct Pending {
    conn: Option<Arc<ConnShared>>,
    replies: Vec<Reply>,
}

impl Pending {
    fn flush(&mut self) {
        if let Some(c) = self.conn.take()
            && !self.replies.is_empty()
        {
            c.replies(std::mem::take(&mut self.replies));
        }
        self.replies.clear();
    }
}

fn worker(rx: Receiver<Job>) {
    let mut pending = Pending {
        conn: None,
        replies: Vec::new(),
    };
    loop {
        let job = match rx.try_recv() {
            Ok(j) => j,
            Err(_) => {
                // Nothing queued: deliver what is done before waiting.
                pending.flush();
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            }
        };
        if job.conn.cancelled.load(Ordering::Relaxed) {
            // The connection is gone: nothing queued after that point is
            // started (none of it was acknowledged).
            continue;
        }
        if pending.replies.len() >= REPLY_BATCH || job.op.is_slow() {
            pending.flush();
        }
        let conn = Arc::clone(&job.conn);
        pending.replies.push(run(job));
        pending.conn = Some(conn);
    }
}

fn run(job: Job) -> Reply {
    let Job {
        conn,
        cookie,
        op,
        budget_bytes,
    } = job;
    let disk = &conn.disk;
    let name = op.name();
    let (offset, len) = match &op {
        JobOp::Read { offset, len }
        | JobOp::Trim { offset, len, .. }
        | JobOp::WriteZeroes { offset, len, .. } => (*offset, u64::from(*len)),
        JobOp::Write { offset, data, .. } => (*offset, data.len() as u64),
        JobOp::Flush => (0, 0),
    };
    let mut data = None;
    let res = match op {
        JobOp::Read { offset, len } => {
            let mut buf = vec![0u8; len as usize];
            let r = disk.read_at(offset, &mut buf);
            if r.is_ok() {
                NbdStats::add(&conn.stats.bytes_read, u64::from(len));
                data = Some(buf);
            }
            r
        }
        JobOp::Write { offset, data, fua } => {
            let n = data.len() as u64;
            let r = disk.write_at(offset, data, fua);
            if r.is_ok() {
                NbdStats::add(&conn.stats.bytes_written, n);
            }
            r
        }
        JobOp::Flush => disk.flush(),
        JobOp::Trim { offset, len, fua } => disk.trim(offset, u64::from(len), fua),
        JobOp::WriteZeroes {
            offset,
            len,
            may_unmap,
            fua,
        } => disk.write_zeroes(offset, u64::from(len), may_unmap, fua),
    };
    let error = match res {
        Ok(()) => 0,
        Err(e) => {
            let error = nbd_error(e.errno());
            tracing::warn!(
                peer = %conn.peer,
                export = %conn.export,
                command = name,
                offset,
                len,
                errno = e.errno(),
                nbd_error = proto::error_name(error),
                "NBD request failed on the disk: {e}"
            );
            error
        }
    };
    Reply {
        cookie,
        error,
        data,
        budget_bytes,
    }
}
