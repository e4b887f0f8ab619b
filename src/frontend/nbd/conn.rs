//! One connection's transmission phase.
//!
//! The reader (this task) parses request headers from a buffered socket,
//! validates them ([`proto::validate`]), takes a slot of the connection's
//! budget (requests and bytes in flight; when none is free it stops reading
//! the socket until replies drain), reads a WRITE payload straight into the
//! buffer handed to [`BlockIo::write_at`](crate::frontend::BlockIo::write_at),
//! and queues a job for the I/O threads. The writer (its own task) sends
//! replies in completion order, as many as are ready per socket write, and
//! gives their budget back. A refused request is answered without touching
//! the disk; a refused WRITE's payload is read and discarded first so the
//! stream stays in sync.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use super::pool::{Job, JobOp, Lanes, Threads};
use super::proto::{self, Command, Limits, Payload, REQUEST_HEADER_LEN, RequestHeader};
use super::stats::NbdStats;
use crate::frontend::BlockIo;
use crate::util::shutdown::{self, Shutdown};
use crate::util::task::AbortOnDrop;

/// The read half of a connection (plain or TLS).
pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection (plain or TLS).
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Socket read buffer: holds many small requests per read system call.
const READ_BUF: usize = 256 << 10;
/// Write payload remainders at least this large are read straight into the
/// payload buffer instead of through the read buffer.
const DIRECT_READ_MIN: usize = 64 << 10;
/// Replies are gathered up to this many bytes per socket write.
const WRITE_BATCH: usize = 256 << 10;
/// Read payloads up to this size are copied into the batch; larger ones are
/// written from their own buffer.
const INLINE_DATA: usize = 64 << 10;
/// Refusals logged at warn level per connection; later ones at debug level.
const REFUSALS_LOGGED: u64 = 64;

/// A finished request on its way to the writer.
pub(crate) struct Reply {
    pub cookie: u64,
    pub error: u32,
    /// Read data, on success only (a simple error reply carries no payload).
    pub data: Option<Vec<u8>>,
    /// Budget bytes to give back once the reply is written.
    pub budget_bytes: u32,
}

/// What the I/O threads need to know about a connection.
pub(crate) struct ConnShared {
    pub disk: Arc<dyn BlockIo>,
    pub peer: String,
    pub export: String,
    pub stats: Arc<NbdStats>,
    /// Set when the connection ends: queued jobs are skipped, not started.
    pub cancelled: Arc<AtomicBool>,
    replies: mpsc::UnboundedSender<Vec<Reply>>,
}

impl ConnShared {
    /// Queue one reply (dropped if the writer is gone: the connection is dead).
    pub fn reply(&self, r: Reply) {
        let _ = self.replies.send(vec![r]);
    }

    /// Queue several replies with one wake-up of the writer.
    pub fn replies(&self, batch: Vec<Reply>) {
        let _ = self.replies.send(batch);
    }
}

/// Everything a transmission phase needs.
pub(crate) struct Transmission {
    pub peer: String,
    pub export: String,
    pub disk: Arc<dyn BlockIo>,
    pub limits: Limits,
    pub max_inflight_requests: usize,
    pub max_inflight_bytes: usize,
    pub stats: Arc<NbdStats>,
    pub threads: Arc<Threads>,
    pub shutdown: Shutdown,
}

/// How a transmission phase ended.
#[derive(Debug)]
pub(crate) enum End {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// The client broke the protocol; the connection was dropped.
    Protocol(String),
    /// The client closed the connection in the middle of a request.
    Truncated(String),
    /// Reading the socket failed.
    Io(io::Error),
    /// Writing replies failed (the client went away).
    WriterFailed(Option<io::Error>),
}

/// The in-flight budget of one connection.
struct Budget {
    count: Semaphore,
    bytes: Semaphore,
}

impl Budget {
    /// Wait for one request slot and `bytes` bytes; false once closed.
    async fn acquire(&self, bytes: u32) -> bool {
        let Ok(p) = self.count.acquire().await else {
            return false;
        };
        p.forget();
        if bytes > 0 {
            let Ok(p) = self.bytes.acquire_many(bytes).await else {
                return false;
            };
            p.forget();
        }
        true
    }

    fn release(&self, requests: usize, bytes: usize) {
        self.count.add_permits(requests);
        if bytes > 0 {
            self.bytes.add_permits(bytes);
        }
    }

    fn close(&self) {
        self.count.close();
        self.bytes.close();
    }
}

/// Marks the connection cancelled when `serve` returns or is dropped (a
/// connection cut at the drain deadline): its lanes skip queued jobs.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Serve requests until the client disconnects, breaks the protocol, or the
/// server shuts down; in-flight requests are finished and replied to (while
/// the client reads) before this returns.
pub(crate) async fn serve(t: Transmission, rd: BoxRead, wr: BoxWrite, leftover: Vec<u8>) -> End {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Budget {
        count: Semaphore::new(t.max_inflight_requests.max(1)),
        bytes: Semaphore::new(t.max_inflight_bytes.max(t.limits.max_request as usize)),
    });
    let lanes = match Lanes::start(&t.threads) {
        Ok(l) => l,
        Err(e) => return End::Io(io::Error::other(format!("cannot start an I/O thread: {e}"))),
    };
    let (writer_alive, writer_gone) = shutdown::channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel = CancelOnDrop(Arc::clone(&cancelled));
    let shared = Arc::new(ConnShared {
        disk: Arc::clone(&t.disk),
        peer: t.peer.clone(),
        export: t.export.clone(),
        stats: Arc::clone(&t.stats),
        cancelled,
        replies: tx,
    });
    let mut writer = AbortOnDrop(tokio::spawn(write_replies(
        wr,
        rx,
        Arc::clone(&budget),
        writer_alive,
        Arc::clone(&t.stats),
    )));
    let mut reader = Reader {
        t: &t,
        rd,
        inb: InBuf::new(leftover),
        shared,
        lanes,
        budget: &budget,
        writer_gone,
        shutdown: t.shutdown.clone(),
        refusals: 0,
    };
    let end = reader.run().await;
    // Dropping the reader drops its handle on the reply channel: the writer
    // ends once the I/O threads have replied to every queued job.
    drop(reader);
    let wres = match (&mut writer.0).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("NBD reply writer failed: {e}"))),
    };
    match (end, wres) {
        (End::WriterFailed(_), Err(e)) => End::WriterFailed(Some(e)),
        (end @ (End::Disconnect | End::Shutdown | End::Closed), Err(e))
            if e.kind() != io::ErrorKind::BrokenPipe =>
        {
            tracing::debug!(peer = %t.peer, export = %t.export, "NBD replies after {end:?} not delivered: {e}");
            end
        }
        (end, _) => end,
    }
}

struct Reader<'a> {
    t: &'a Transmission,
    rd: BoxRead,
    inb: InBuf,
    shared: Arc<ConnShared>,
    lanes: Lanes,
    budget: &'a Budget,
    writer_gone: Shutdown,
    shutdown: Shutdown,
    refusals: u64,
}

/// What one attempt to read more bytes gave.
enum Fill {
    Data,
    Eof,
    Shutdown,
    WriterGone,
    Err(io::Error),
}

impl Reader<'_> {
    async fn run(&mut self) -> End {
        loop {
            let h = match self.next_header().await {
                Ok(h) => h,
                Err(end) => return end,
            };
            NbdStats::add(&self.t.stats.requests, 1);
            match proto::validate(&h, &self.t.limits) {
                Ok(cmd) => {
                    if let Some(end) = self.execute(&h, cmd).await {
                        return end;
                    }
                }
                Err(refused) => {
                    self.log_refusal(&h, refused.reason, refused.error);
                    match proto::refused_payload(&h) {
                        Payload::None => {}
                        Payload::Discard(n) => {
                            if let Err(end) = self.discard(n as usize, &h).await {
                                return end;
                            }
                        }
                        Payload::Drop => {
                            return End::Protocol(format!(
                                "write payload of {} bytes (cookie {:#x}) is too large to discard \
                                 (limit {}); dropping the connection",
                                h.len,
                                h.cookie,
                                proto::WRITE_DISCARD_MAX
                            ));
                        }
                    }
                    if !self.budget.acquire(0).await {
                        return End::WriterFailed(None);
                    }
                    self.shared.reply(Reply {
                        cookie: h.cookie,
                        error: refused.error,
                        data: None,
                        budget_bytes: 0,
                    });
                }
            }
        }
    }

    /// Run a valid command; `Some(end)` ends the session.
    async fn execute(&mut self, h: &RequestHeader, cmd: Command) -> Option<End> {
        let (op, bytes) = match cmd {
            Command::Disconnect => return Some(End::Disconnect),
            Command::Cache => {
                if !self.budget.acquire(0).await {
                    return Some(End::WriterFailed(None));
                }
                self.shared.reply(Reply {
                    cookie: h.cookie,
                    error: 0,
                    data: None,
                    budget_bytes: 0,
                });
                return None;
            }
            Command::Read { offset, len } => (JobOp::Read { offset, len }, len),
            Command::Write { offset, len, fua } => {
                if !self.budget.acquire(len).await {
                    return Some(End::WriterFailed(None));
                }
                let data = match self.payload(len as usize, h).await {
                    Ok(d) => d,
                    Err(end) => return Some(end),
                };
                return self.submit(h, JobOp::Write { offset, data, fua }, len);
            }
            Command::Flush => (JobOp::Flush, 0),
            Command::Trim { offset, len, fua } => (JobOp::Trim { offset, len, fua }, 0),
            Command::WriteZeroes {
                offset,
                len,
                may_unmap,
                fua,
            } => (
                JobOp::WriteZeroes {
                    offset,
                    len,
                    may_unmap,
                    fua,
                },
                0,
            ),
        };
        if !self.budget.acquire(bytes).await {
            return Some(End::WriterFailed(None));
        }
        self.submit(h, op, bytes)
    }

    fn submit(&mut self, h: &RequestHeader, op: JobOp, budget_bytes: u32) -> Option<End> {
        let job = Job {
            conn: Arc::clone(&self.shared),
            cookie: h.cookie,
            op,
            budget_bytes,
        };
        match self.lanes.submit(job) {
            Ok(()) => None,
            Err(e) => Some(End::Io(io::Error::other(format!(
                "cannot queue an I/O request: {e}"
            )))),
        }
    }

    async fn next_header(&mut self) -> Result<RequestHeader, End> {
        loop {
            match proto::parse_request(self.inb.data()) {
                Err(bad) => {
                    return Err(End::Protocol(format!("{bad}; dropping the connection")));
                }
                Ok(Some(h)) => {
                    self.inb.consume(REQUEST_HEADER_LEN);
                    return Ok(h);
                }
                Ok(None) => {}
            }
            match self.fill().await {
                Fill::Data => {}
                Fill::Eof if self.inb.data().is_empty() => return Err(End::Closed),
                Fill::Eof => {
                    return Err(End::Truncated(format!(
                        "connection closed after {} bytes of a request header",
                        self.inb.data().len()
                    )));
                }
                Fill::Shutdown => return Err(End::Shutdown),
                Fill::WriterGone => return Err(End::WriterFailed(None)),
                Fill::Err(e) => return Err(End::Io(e)),
            }
        }
    }

    /// Read more bytes into the buffer, unless the server shuts down or the
    /// writer died first.
    async fn fill(&mut self) -> Fill {
        let spare = self.inb.spare();
        let r = tokio::select! {
            biased;
            _ = self.shutdown.wait() => return Fill::Shutdown,
            _ = self.writer_gone.wait() => return Fill::WriterGone,
            r = self.rd.read(spare) => r,
        };
        match r {
            Ok(0) => Fill::Eof,
            Ok(n) => {
                self.inb.filled(n);
                Fill::Data
            }
            Err(e) => Fill::Err(e),
        }
    }

    /// Read a WRITE payload of `len` bytes into its own buffer. Nothing of it
    /// reaches the disk unless all of it arrived.
    async fn payload(&mut self, len: usize, h: &RequestHeader) -> Result<Vec<u8>, End> {
        let mut data = Vec::with_capacity(len);
        let take = self.inb.data().len().min(len);
        data.extend_from_slice(&self.inb.data()[..take]);
        self.inb.consume(take);
        while data.len() < len {
            let need = len - data.len();
            let truncated = |got: usize| {
                End::Truncated(format!(
                    "connection closed after {got} of {len} payload bytes of a write \
                     (offset {}, cookie {:#x}); the partial write was not applied",
                    h.offset, h.cookie
                ))
            };
            if need >= DIRECT_READ_MIN {
                let mut limited = (&mut self.rd).take(need as u64);
                let r = tokio::select! {
                    biased;
                    _ = self.shutdown.wait() => return Err(End::Shutdown),
                    _ = self.writer_gone.wait() => return Err(End::WriterFailed(None)),
                    r = limited.read_buf(&mut data) => r,
                };
                match r {
                    Ok(0) => return Err(truncated(data.len())),
                    Ok(_) => {}
                    Err(e) => return Err(End::Io(e)),
                }
            } else {
                match self.fill().await {
                    Fill::Data => {
                        let take = self.inb.data().len().min(need);
                        data.extend_from_slice(&self.inb.data()[..take]);
                        self.inb.consume(take);
                    }
                    Fill::Eof => return Err(truncated(data.len())),
                    Fill::Shutdown => return Err(End::Shutdown),
                    Fill::WriterGone => return Err(End::WriterFailed(None)),
                    Fill::Err(e) => return Err(End::Io(e)),
                }
            }
        }
        Ok(data)
    }

    /// Read and drop `len` payload bytes of a refused WRITE.
    async fn discard(&mut self, mut len: usize, h: &RequestHeader) -> Result<(), End> {
        let total = len;
        loop {
            let take = self.inb.data().len().min(len);
            self.inb.consume(take);
            len -= take;
            if len == 0 {
                return Ok(());
            }
            match self.fill().await {
                Fill::Data => {}
                Fill::Eof => {
                    return Err(End::Truncated(format!(
                        "connection closed after {} of {total} payload bytes of a refused \
                         write (cookie {:#x})",
                        total - len,
                        h.cookie
                    )));
                }
                Fill::Shutdown => return Err(End::Shutdown),
                Fill::WriterGone => return Err(End::WriterFailed(None)),
                Fill::Err(e) => return Err(End::Io(e)),
            }
        }
    }

    fn log_refusal(&mut self, h: &RequestHeader, reason: proto::Refusal, error: u32) {
        self.refusals += 1;
        let (peer, export) = (&self.t.peer, &self.t.export);
        let command = proto::command_name(h.typ);
        let nbd_error = proto::error_name(error);
        if self.refusals <= REFUSALS_LOGGED {
            tracing::warn!(
                peer = %peer, export = %export, command, typ = h.typ, flags = h.flags,
                offset = h.offset, len = h.len, nbd_error,
                "NBD request refused: {reason}"
            );
            if self.refusals == REFUSALS_LOGGED {
                tracing::warn!(
                    peer = %peer, export = %export,
                    "{REFUSALS_LOGGED} requests refused on this connection; \
                     further refusals are logged at debug level"
                );
            }
        } else {
            tracing::debug!(
                peer = %peer, export = %export, command, typ = h.typ, flags = h.flags,
                offset = h.offset, len = h.len, nbd_error,
                "NBD request refused: {reason}"
            );
        }
    }
}

/// Send replies as they complete, batched, and give their budget back.
async fn write_replies(
    mut wr: BoxWrite,
    mut rx: mpsc::UnboundedReceiver<Vec<Reply>>,
    budget: Arc<Budget>,
    _alive: shutdown::Trigger,
    stats: Arc<NbdStats>,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(WRITE_BATCH + proto::SIMPLE_REPLY_LEN);
    let res = async {
        while let Some(first) = rx.recv().await {
            let (mut requests, mut bytes) = (0usize, 0usize);
            let mut next = Some(first);
            while let Some(batch) = next.take() {
                for r in batch {
                    requests += 1;
                    bytes += r.budget_bytes as usize;
                    if r.error != 0 {
                        NbdStats::add(&stats.errors, 1);
                    }
                    proto::encode_simple_reply(&mut out, r.error, r.cookie);
                    if let Some(d) = r.data {
                        if d.len() <= INLINE_DATA {
                            out.extend_from_slice(&d);
                        } else {
                            wr.write_all(&out).await?;
                            out.clear();
                            wr.write_all(&d).await?;
                        }
                    }
                }
                if out.len() < WRITE_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !out.is_empty() {
                wr.write_all(&out).await?;
                out.clear();
            }
            wr.flush().await?;
            budget.release(requests, bytes);
        }
        wr.shutdown().await
    }
    .await;
    if res.is_err() {
        // Wake a reader waiting for budget; `_alive` dropping wakes one
        // waiting for the socket.
        budget.close();
    }
    res
}

/// The socket read buffer.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new(leftover: Vec<u8>) -> Self {
        let n = leftover.len();
        let mut buf = leftover;
        buf.resize(READ_BUF.max(n), 0);
        InBuf {
            buf,
            start: 0,
            end: n,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space after the data (compacting first when the buffer is full).
    fn spare(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
    }
}
