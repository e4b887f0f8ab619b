//! The agent's side of the digest exchange: asks the target (through the
//! relay) for the digests of runs of blocks, and hands each answer to the
//! thread that waits for it.
//!
//! Blocking callers (the drainer, verify) call [`DigestClient::request`] and
//! later [`DigestClient::wait`], so the next run's digests can be computed at
//! the target while the agent reads and compares the current one. The session
//! task carries the sealed requests out (the receiver given by
//! [`DigestClient::new`]) and feeds replies back ([`DigestClient::on_message`],
//! [`DigestClient::on_unreachable`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use thiserror::Error;
use tokio::sync::mpsc;

use super::digest::{BlockDigest, BlockSize, DigestKey};
use super::msg::{DigestRequest, MsgBody, MsgCipher, Purpose};
use crate::error::{Classify, ErrorKind};
use crate::frame::DataKey;

/// Requests queued for the session task; more wait in `request` callers' hands
/// as failures (they ask again).
pub const OUT_QUEUE: usize = 16;

/// How often a waiting caller checks its stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Why digests did not come.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FetchError {
    /// The request could not be sent or delivered (no connection, no target).
    #[error("digests unavailable: {0}")]
    Unavailable(String),
    /// No answer in time.
    #[error("no digests from the target within {0:?}")]
    Timeout(Duration),
    /// The target refused the request.
    #[error("the target refused the digest request: {0}")]
    Refused(String),
    /// The answer does not match the request.
    #[error("the target's answer does not match the request: {0}")]
    Mismatch(String),
}

impl Classify for FetchError {
    fn kind(&self) -> ErrorKind {
        match self {
            FetchError::Unavailable(_) | FetchError::Timeout(_) => ErrorKind::Io,
            FetchError::Refused(_) => ErrorKind::Config,
            FetchError::Mismatch(_) => ErrorKind::Corrupt,
        }
    }
}

/// The target's digests of the blocks asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// The target's applied seq when it read them.
    pub applied_seq: u64,
    /// One per block asked for.
    pub digests: Vec<BlockDigest>,
}

type Answer = Result<Digests, FetchError>;

/// A request in flight.
#[derive(Debug)]
pub struct Ticket {
    id: u64,
    req: DigestRequest,
    rx: Receiver<Answer>,
}

impl Ticket {
    /// The request.
    pub fn request(&self) -> &DigestRequest {
        &self.req
    }
}

/// Digest requests asked for ahead of their use, oldest first, so the
/// target reads the next windows while the agent reads the current one (the
/// checksum resync's drainer and online verify both work this way). Two
/// ahead keep the target busy when a round trip through the relay is longer
/// than its time for one window (a WAN link); with one, the target then
/// waited at every window.
#[derive(Debug, Default)]
pub struct Prefetch(VecDeque<Ticket>);

/// Windows a [`Prefetch`] asks for ahead of the one in use.
pub const PREFETCH_DEPTH: usize = 2;

impl Prefetch {
    /// The ticket for blocks `first_block .. +count` of `disk`: the oldest
    /// one asked for ahead when it is that request, else a new request (all
    /// asked ahead are then cancelled: the windows changed).
    pub fn take(
        &mut self,
        dc: &DigestClient,
        (disk, disk_size): (u16, u64),
        first_block: u64,
        count: u32,
        purpose: Purpose,
    ) -> Ticket {
        let want = dc.request_for(disk, disk_size, first_block, count, purpose);
        if self.0.front().is_some_and(|t| t.req == want)
            && let Some(t) = self.0.pop_front()
        {
            return t;
        }
        self.cancel(dc);
        dc.send(want)
    }

    /// Ask ahead for blocks `first_block .. +count` of `disk`, unless that
    /// request is already asked for. At most [`PREFETCH_DEPTH`] are held: a
    /// request past that is not made.
    pub fn ask(
        &mut self,
        dc: &DigestClient,
        (disk, disk_size): (u16, u64),
        first_block: u64,
        count: u32,
        purpose: Purpose,
    ) {
        let want = dc.request_for(disk, disk_size, first_block, count, purpose);
        if self.0.len() >= PREFETCH_DEPTH || self.0.iter().any(|t| t.req == want) {
            return;
        }
        self.0.push_back(dc.send(want));
    }

    /// Give up on everything asked ahead.
    pub fn cancel(&mut self, dc: &DigestClient) {
        for t in self.0.drain(..) {
            dc.cancel(t);
        }
    }
}

/// Counters of one group's digest exchange (status).
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Blocks whose digests came back.
    pub blocks: AtomicU64,
    /// Requests that failed (unavailable, timeout, refused).
    pub failures: AtomicU64,
    /// Bytes of sealed digest replies received.
    pub reply_bytes: AtomicU64,
}

/// One group's digest client.
#[derive(Debug)]
pub struct DigestClient {
    group: String,
    cipher: MsgCipher,
    key: DigestKey,
    block_size: BlockSize,
    out: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, (DigestRequest, Sender<Answer>)>>,
    /// Counters.
    pub stats: ClientStats,
}

impl DigestClient {
    /// A client for `group` with its data key, cutting disks at `block_size`;
    /// the receiver yields the sealed requests for the session to send.
    pub fn new(
        group: &str,
        key: &DataKey,
        block_size: BlockSize,
    ) -> (DigestClient, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        // Request ids start at a random point, so a late answer to a request
        // of an earlier run of the agent cannot be taken for a new one.
        let mut seed = [0u8; 8];
        let start = match getrandom::fill(&mut seed) {
            Ok(()) => u64::from_le_bytes(seed) >> 1,
            Err(_) => crate::util::time::now_us(),
        };
        (
            DigestClient {
                group: group.to_string(),
                cipher: MsgCipher::new(key),
                key: DigestKey::derive(key),
                block_size,
                out: tx,
                next_id: AtomicU64::new(start.max(1)),
                waiting: Mutex::new(HashMap::new()),
                stats: ClientStats::default(),
            },
            rx,
        )
    }

    /// The key of the block digests.
    pub fn digest_key(&self) -> &DigestKey {
        &self.key
    }

    /// The block size of this group's resyncs.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (DigestRequest, Sender<Answer>)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request [`request`](Self::request) sends for these blocks.
    fn request_for(
        &self,
        disk: u16,
        disk_size: u64,
        first_block: u64,
        count: u32,
        purpose: Purpose,
    ) -> DigestRequest {
        DigestRequest {
            disk,
            disk_size,
            block_size: self.block_size,
            first_block,
            count,
            purpose,
        }
    }

    /// Ask for the digests of blocks `first_block .. +count` of `disk` (its
    /// size `disk_size` here). Never blocks; a request that cannot be queued
    /// fails its ticket at once.
    pub fn request(
        &self,
        disk: u16,
        disk_size: u64,
        first_block: u64,
        count: u32,
        purpose: Purpose,
    ) -> Ticket {
        self.send(self.request_for(disk, disk_size, first_block, count, purpose))
    }

    /// Send `req` (built by [`request_for`](Self::request_for)), as
    /// [`request`](Self::request) does.
    fn send(&self, req: DigestRequest) -> Ticket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let ticket = Ticket { id, req, rx };
        let sealed = match self.cipher.seal(id, &MsgBody::Request(req)) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Err(FetchError::Unavailable(e.to_string())));
                return ticket;
            }
        };
        self.waiting().insert(id, (req, tx.clone()));
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.out.try_send(sealed) {
            self.waiting().remove(&id);
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "too many digest requests queued",
                mpsc::error::TrySendError::Closed(_) => "the session has ended",
            };
            let _ = tx.send(Err(FetchError::Unavailable(why.into())));
        }
        ticket
    }

    /// Wait up to `timeout` for the answer to `t`.
    pub fn wait(&self, t: Ticket, timeout: Duration) -> Result<Digests, FetchError> {
        self.wait_or_stop(t, timeout, &AtomicBool::new(false))
    }

    /// Wait up to `timeout` for the answer to `t`, giving up early (as
    /// unavailable) once `stop` is set: a stopping agent never waits for a
    /// target that is not there.
    pub fn wait_or_stop(
        &self,
        t: Ticket,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> Result<Digests, FetchError> {
        let deadline = std::time::Instant::now() + timeout;
        let r = loop {
            let now = std::time::Instant::now();
            if now >= deadline {
                break Err(FetchError::Timeout(timeout));
            }
            if stop.load(Ordering::Relaxed) {
                break Err(FetchError::Unavailable("the agent is stopping".into()));
            }
            let slice = (deadline - now).min(STOP_POLL);
            match t.rx.recv_timeout(slice) {
                Ok(a) => break a,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    break Err(FetchError::Unavailable("the request was dropped".into()));
                }
            }
        };
        self.waiting().remove(&t.id);
        match &r {
            Ok(d) => {
                self.stats
                    .blocks
                    .fetch_add(d.digests.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// Give up on `t` (its answer, if it comes, is dropped).
    pub fn cancel(&self, t: Ticket) {
        self.waiting().remove(&t.id);
    }

    /// A sealed message from the target: complete the request it answers.
    pub fn on_message(&self, bytes: &[u8]) {
        self.stats
            .reply_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let (id, body) = match self.cipher.open(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(group = %self.group, "resync reply refused: {e}");
                // A reply whose clear header names a request fails that
                // request now instead of at its timeout.
                if let Ok(h) = super::msg::MsgHeader::parse(bytes)
                    && let Some((_, tx)) = self.waiting().remove(&h.request_id)
                {
                    let _ = tx.send(Err(FetchError::Mismatch(e.to_string())));
                }
                return;
            }
        };
        let Some((req, tx)) = self.waiting().remove(&id) else {
            tracing::debug!(group = %self.group, request_id = id, "resync reply for a request no one waits for (late)");
            return;
        };
        let answer = match body {
            MsgBody::Digests { applied_seq, chunk } => {
                if chunk.disk() != req.disk
                    || chunk.disk_size() != req.disk_size
                    || chunk.block_size() != req.block_size
                    || chunk.first_block() != req.first_block
                    || chunk.digests().len() != req.count as usize
                {
                    Err(FetchError::Mismatch(format!(
                        "asked for disk {} ({} bytes, blocks of {}) blocks {}..+{}, got disk {} ({} bytes, blocks of {}) blocks {}..+{}",
                        req.disk,
                        req.disk_size,
                        req.block_size,
                        req.first_block,
                        req.count,
                        chunk.disk(),
                        chunk.disk_size(),
                        chunk.block_size(),
                        chunk.first_block(),
                        chunk.digests().len()
                    )))
                } else {
                    Ok(Digests {
                        applied_seq,
                        digests: chunk.into_digests(),
                    })
                }
            }
            MsgBody::Refused(why) => Err(FetchError::Refused(why)),
            MsgBody::Request(_) => Err(FetchError::Mismatch("a request came back".into())),
        };
        let _ = tx.send(answer);
    }

    /// The relay could not deliver request `id`.
    pub fn on_unreachable(&self, id: u64, message: &str) {
        if let Some((_, tx)) = self.waiting().remove(&id) {
            let _ = tx.send(Err(FetchError::Unavailable(message.to_string())));
        }
    }

    /// The connection to the relay went down: every request in flight fails
    /// (its answer, if any, would come on a connection that no longer exists).
    pub fn fail_all(&self, why: &str) {
        for (_, (_, tx)) in self.waiting().drain() {
            let _ = tx.send(Err(FetchError::Unavailable(why.to_string())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resync::DigestChunk;

    fn client() -> (DigestClient, mpsc::Receiver<Vec<u8>>, MsgCipher) {
        let key = DataKey::from_bytes([9; 32]);
        let (c, rx) = DigestClient::new("g", &key, BlockSize::new(65536).unwrap());
        (c, rx, MsgCipher::new(&key))
    }

    #[test]
    fn a_prefetched_request_is_reused_only_for_the_same_window() {
        let (c, mut rx, _target) = client();
        let mut ahead = Prefetch::default();
        ahead.ask(&c, (0, 1 << 20), 4, 2, Purpose::Resync);
        assert_eq!(c.stats.requests.load(Ordering::Relaxed), 1);
        // The same window: the ticket asked ahead, no new request.
        let t = ahead.take(&c, (0, 1 << 20), 4, 2, Purpose::Resync);
        assert_eq!(t.request().first_block, 4);
        assert_eq!(c.stats.requests.load(Ordering::Relaxed), 1);
        // Another window (or purpose): the one asked ahead is cancelled.
        ahead.ask(&c, (0, 1 << 20), 6, 2, Purpose::Resync);
        let t2 = ahead.take(&c, (0, 1 << 20), 6, 2, Purpose::Verify);
        assert_eq!(t2.request().purpose, Purpose::Verify);
        assert_eq!(c.stats.requests.load(Ordering::Relaxed), 3);
        assert_eq!(c.waiting().len(), 2, "t and t2 wait, the cancelled one not");
        ahead.ask(&c, (0, 1 << 20), 8, 2, Purpose::Resync);
        ahead.cancel(&c);
        assert_eq!(c.waiting().len(), 2);
        while rx.try_recv().is_ok() {}
    }

    #[test]
    fn two_windows_are_asked_ahead_and_taken_in_order() {
        let (c, mut rx, _target) = client();
        let disk = (0, 1 << 30);
        let mut ahead = Prefetch::default();
        ahead.ask(&c, disk, 0, 4, Purpose::Resync);
        ahead.ask(&c, disk, 4, 4, Purpose::Resync);
        // Asked again: no new request. Past the depth: not made.
        ahead.ask(&c, disk, 4, 4, Purpose::Resync);
        ahead.ask(&c, disk, 8, 4, Purpose::Resync);
        assert_eq!(
            c.stats.requests.load(Ordering::Relaxed),
            PREFETCH_DEPTH as u64
        );
        let t0 = ahead.take(&c, disk, 0, 4, Purpose::Resync);
        ahead.ask(&c, disk, 8, 4, Purpose::Resync);
        let t1 = ahead.take(&c, disk, 4, 4, Purpose::Resync);
        let t2 = ahead.take(&c, disk, 8, 4, Purpose::Resync);
        assert_eq!(
            [
                t0.request().first_block,
                t1.request().first_block,
                t2.request().first_block
            ],
            [0, 4, 8]
        );
        assert_eq!(
            c.stats.requests.load(Ordering::Relaxed),
            3,
            "each window asked once"
        );
        // A window that is not the oldest asked ahead: everything asked ahead
        // is cancelled and the window asked for afresh.
        ahead.ask(&c, disk, 12, 4, Purpose::Resync);
        ahead.ask(&c, disk, 16, 4, Purpose::Resync);
        let t4 = ahead.take(&c, disk, 16, 4, Purpose::Resync);
        assert_eq!(c.stats.requests.load(Ordering::Relaxed), 6);
        let waiting: Vec<u64> = c.waiting().values().map(|(r, _)| r.first_block).collect();
        assert_eq!(
            waiting.len(),
            4,
            "t0, t1, t2, t4 wait; 12 and the first 16 are cancelled: {waiting:?}"
        );
        assert!(!waiting.contains(&12));
        drop(t4);
        while rx.try_recv().is_ok() {}
    }

    #[test]
    fn an_answer_completes_its_ticket_and_a_mismatched_one_is_refused() {
        let (c, mut rx, target) = client();
        let t1 = c.request(0, 1 << 20, 2, 3, Purpose::Resync);
        let t2 = c.request(0, 1 << 20, 8, 2, Purpose::Resync);
        let (id1, b1) = target.open(&rx.try_recv().unwrap()).unwrap();
        let (id2, _) = target.open(&rx.try_recv().unwrap()).unwrap();
        let MsgBody::Request(r1) = b1 else { panic!() };
        assert_eq!((r1.first_block, r1.count), (2, 3));
        let bs = BlockSize::new(65536).unwrap();
        let bad = DigestChunk::new(0, 1 << 20, bs, id2, 9, vec![BlockDigest::Zero; 2]).unwrap();
        c.on_message(
            &target
                .seal(
                    id2,
                    &MsgBody::Digests {
                        applied_seq: 5,
                        chunk: bad,
                    },
                )
                .unwrap(),
        );
        // Answers may come in any order: each completes its own request.
        let good = DigestChunk::new(0, 1 << 20, bs, id1, 2, vec![BlockDigest::Zero; 3]).unwrap();
        c.on_message(
            &target
                .seal(
                    id1,
                    &MsgBody::Digests {
                        applied_seq: 5,
                        chunk: good,
                    },
                )
                .unwrap(),
        );
        let d = c.wait(t1, Duration::from_secs(1)).unwrap();
        assert_eq!(d.applied_seq, 5);
        assert_eq!(d.digests.len(), 3);
        assert!(matches!(
            c.wait(t2, Duration::from_secs(1)),
            Err(FetchError::Mismatch(_))
        ));
    }

    #[test]
    fn refusals_unreachable_timeouts_and_lost_connections_fail_tickets() {
        let (c, mut rx, target) = client();
        let t = c.request(1, 1 << 20, 0, 1, Purpose::Verify);
        let (id, _) = target.open(&rx.try_recv().unwrap()).unwrap();
        c.on_message(
            &target
                .seal(id, &MsgBody::Refused("no disk 1".into()))
                .unwrap(),
        );
        assert_eq!(
            c.wait(t, Duration::from_secs(1)),
            Err(FetchError::Refused("no disk 1".into()))
        );

        let t = c.request(0, 1 << 20, 0, 1, Purpose::Resync);
        let (id, _) = target.open(&rx.try_recv().unwrap()).unwrap();
        c.on_unreachable(id, "no target connected");
        assert!(matches!(
            c.wait(t, Duration::from_secs(1)),
            Err(FetchError::Unavailable(m)) if m.contains("no target")
        ));

        let t = c.request(0, 1 << 20, 0, 1, Purpose::Resync);
        assert_eq!(
            c.wait(t, Duration::from_millis(10)),
            Err(FetchError::Timeout(Duration::from_millis(10)))
        );

        let t = c.request(0, 1 << 20, 0, 1, Purpose::Resync);
        c.fail_all("connection lost");
        assert!(matches!(
            c.wait(t, Duration::from_secs(1)),
            Err(FetchError::Unavailable(_))
        ));
        assert_eq!(c.stats.failures.load(Ordering::Relaxed), 4);
    }

    /// The target's sealed answer to `id`: two Zero digests from block 0 of
    /// a disk of `disk_size` bytes.
    fn zero_reply(target: &MsgCipher, id: u64, disk_size: u64) -> Vec<u8> {
        let bs = BlockSize::new(65536).unwrap();
        let chunk = DigestChunk::new(0, disk_size, bs, id, 0, vec![BlockDigest::Zero; 2]).unwrap();
        target
            .seal(
                id,
                &MsgBody::Digests {
                    applied_seq: 1,
                    chunk,
                },
            )
            .unwrap()
    }

    #[test]
    fn a_reply_for_another_disk_size_or_damaged_fails_its_request_at_once() {
        let (c, mut rx, target) = client();
        // Another disk size.
        let t = c.request(0, 1 << 20, 0, 2, Purpose::Resync);
        let (id, _) = target.open(&rx.try_recv().unwrap()).unwrap();
        c.on_message(&zero_reply(&target, id, 2 << 20));
        assert!(matches!(
            c.wait(t, Duration::from_secs(1)),
            Err(FetchError::Mismatch(m)) if m.contains("2097152 bytes")
        ));
        // Damaged in transit (a flipped bit in the sealed body).
        let t = c.request(0, 1 << 20, 0, 2, Purpose::Resync);
        let (id, _) = target.open(&rx.try_recv().unwrap()).unwrap();
        let mut reply = zero_reply(&target, id, 1 << 20);
        let n = reply.len();
        reply[n - 20] ^= 1;
        c.on_message(&reply);
        assert!(matches!(
            c.wait(t, Duration::from_secs(1)),
            Err(FetchError::Mismatch(m)) if m.contains("authentication failed")
        ));
        // Truncated: no request can be named; it is dropped.
        c.on_message(&reply[..10]);
    }

    #[test]
    fn a_full_queue_fails_the_ticket_at_once() {
        let (c, _rx, _) = client();
        let tickets: Vec<Ticket> = (0..OUT_QUEUE + 1)
            .map(|i| c.request(0, 1 << 20, i as u64, 1, Purpose::Resync))
            .collect();
        let last = tickets.into_iter().last().unwrap();
        assert!(matches!(
            c.wait(last, Duration::from_millis(1)),
            Err(FetchError::Unavailable(m)) if m.contains("too many")
        ));
    }
}
