//! The session task of one group: connects to the relay (reconnecting with
//! back-off), reads frames, puts them through the ordering [`Gate`], hands
//! ready frames to the open pool, and sends cumulative acks for what the apply
//! thread has made durable.
//!
//! The gate and the pipeline behind it live as long as the group, across
//! reconnects: the gate's tip is the last frame handed to the pipeline, and the
//! pipeline never loses a frame it was handed (it applies it, or stalls the
//! group for good). So after a reconnect, the relay's redelivery of frames
//! still in the pipeline is recognised as duplicates and can never be applied
//! a second time out of order. See docs/TARGET.md ("Reconnects").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, watch};

use super::TargetError;
use super::apply::{Progress, Stall};
use super::budget::{Budget, Charge};
use super::gate::{ChainPos, Gap, Gate, Link, Verdict};
use super::open::OpenJob;
use super::redo::Redo;
use super::status::{GapStatus, SharedStatus};
use crate::error::{Classify, ErrorKind};
use crate::frame::{FrameError, FrameHeader, GroupName};
use crate::transport::client::{
    Backoff, Hello, RelayEndpoint, Stream, Welcome, message_name, open_session,
};
use crate::transport::conn::Progress as ByteClock;
use crate::transport::wire::{self, Message, PeerRole, WireError, WireErrorKind};
use crate::util::shutdown::Shutdown;

/// Frames the gate may hold ahead of a gap (half the in-flight budget, so held
/// frames can never use up the budget the missing frame needs).
pub const HELD_FRAMES: usize = super::budget::BUDGET_FRAMES as usize / 2;
/// Bytes (charged) the gate may hold ahead of a gap.
pub const HELD_BYTES: usize = super::budget::BUDGET_BYTES as usize / 2;
/// A gap with frames held and no progress for this long is logged as a warning.
pub const GAP_WARN_AFTER: Duration = Duration::from_secs(10);
/// Longest time one message write to the relay may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of the session's housekeeping (gap check, status).
const TICK: Duration = Duration::from_millis(250);
/// A connection that lived this long resets the reconnect back-off.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Messages read ahead by the reader task (each already charged to the budget).
const READ_AHEAD: usize = 4;

/// Tracks how long the chain has been stuck behind a gap.
#[derive(Debug)]
pub(crate) struct GapWatch {
    last_progress: Instant,
    held_since: Option<Instant>,
    warned: bool,
}

impl GapWatch {
    /// A watch that saw progress at `now`.
    pub fn new(now: Instant) -> Self {
        GapWatch {
            last_progress: now,
            held_since: None,
            warned: false,
        }
    }

    /// The chain advanced at `now`.
    pub fn progress(&mut self, now: Instant) {
        self.last_progress = now;
        self.warned = false;
    }

    /// The gap status at `now`, and whether to warn about it now (once per
    /// stuck gap: after [`GAP_WARN_AFTER`] without progress while frames were held).
    pub fn check(&mut self, now: Instant, gap: Option<Gap>) -> (Option<GapStatus>, bool) {
        let Some(gap) = gap else {
            self.held_since = None;
            self.warned = false;
            return (None, false);
        };
        let held_since = *self.held_since.get_or_insert(now);
        let since = held_since.max(self.last_progress);
        let stuck = now.saturating_duration_since(since);
        let is_stuck = stuck > GAP_WARN_AFTER;
        let warn = is_stuck && !self.warned;
        if warn {
            self.warned = true;
        }
        (
            Some(GapStatus {
                tip_frame_no: gap.tip.frame_no,
                tip_last_seq: gap.tip.last_seq,
                first_held: gap.first_held,
                held: gap.held as u64,
                stuck_ms: stuck.as_millis() as u64,
                stuck: is_stuck,
            }),
            warn,
        )
    }
}

/// What the reader task forwards.
enum Incoming {
    /// A frame, its structural header check, and its budget charge.
    Frame {
        bytes: Vec<u8>,
        header: Result<FrameHeader, FrameError>,
        charge: Charge,
    },
    /// Any other message.
    Message(Message),
    /// The connection ended.
    Closed(WireError),
}

/// A frame held by the gate.
struct HeldFrame {
    bytes: Vec<u8>,
    charge: Charge,
}

/// How a connection ended.
enum ConnEnd {
    /// Shutdown requested (pipeline drained).
    Shutdown,
    /// The group stalled (pipeline drained).
    Stalled,
    /// A fatal error (pipeline drained).
    Fatal(TargetError),
    /// The connection broke; reconnect.
    Lost { reason: String, healthy: bool },
}

/// Everything a group's session task needs.
pub(crate) struct GroupSession {
    /// The group.
    pub group: GroupName,
    /// Our instance name.
    pub name: String,
    /// Where the relay is.
    pub endpoint: RelayEndpoint,
    /// Shared status.
    pub status: SharedStatus,
    /// In-flight budget.
    pub budget: Arc<Budget>,
    /// Jobs for the open pool (`None` once closed).
    pub jobs: Option<Sender<OpenJob>>,
    /// The group's redo journal: every frame is appended before it is opened.
    pub redo: Redo,
    /// Durable progress from the apply thread.
    pub progress: watch::Receiver<Progress>,
    /// Stop signal.
    pub shutdown: Shutdown,
    /// The digest service (resync and verify requests from the agent).
    pub digests: super::digests::DigestService,
    /// Longest the relay may send nothing while we wait for it
    /// (`target.relay_silence_ms`).
    pub relay_silence: Duration,
}

/// What the reader task tells the session about the relay's silence: when
/// bytes last arrived, and whether the reader is waiting for the relay right
/// now (not for room in the apply budget, nor for the session to take what it
/// read: time the target itself is not reading does not count).
#[derive(Clone)]
struct Hearing {
    bytes: ByteClock,
    waiting: Arc<AtomicBool>,
}

impl Hearing {
    fn new() -> Self {
        Hearing {
            bytes: ByteClock::new(),
            waiting: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The reader starts (`true`) or stops waiting for the relay.
    fn set_waiting(&self, waiting: bool) {
        if waiting {
            // Silence is counted from here, not from the last message.
            self.bytes.note();
        }
        self.waiting.store(waiting, Ordering::Release);
    }

    /// How long the relay has sent nothing while the reader waited for it
    /// (`None`: the reader is not waiting).
    fn silent_for(&self) -> Option<Duration> {
        self.waiting
            .load(Ordering::Acquire)
            .then(|| self.bytes.last().elapsed())
    }
}

struct Session {
    s: GroupSession,
    gate: Gate<HeldFrame>,
    next_index: u64,
    gap: GapWatch,
}

/// Run the group's session until shutdown, a stall or a fatal error, then
/// drain the pipeline (everything handed to it is applied and made durable)
/// before returning.
pub(crate) async fn run_group(s: GroupSession) -> Result<(), TargetError> {
    let tip = s.progress.borrow().durable.pos;
    let mut me = Session {
        s,
        gate: Gate::new(tip, HELD_FRAMES, HELD_BYTES),
        next_index: 0,
        gap: GapWatch::new(Instant::now()),
    };
    let result = me.run().await;
    me.drain(None, ChainPos::default(), true).await;
    if result.is_ok() && !me.s.shutdown.is_fired() {
        // Stalled: nothing more is applied until restart, but the process
        // keeps running (other groups, status) until it is told to stop.
        me.s.shutdown.wait().await;
    }
    result
}

impl Session {
    fn g(&self) -> &str {
        self.s.group.as_str()
    }

    async fn run(&mut self) -> Result<(), TargetError> {
        let mut backoff = Backoff::default();
        loop {
            if self.s.shutdown.is_fired() || self.s.progress.borrow().stall.is_some() {
                return Ok(());
            }
            let applied = self.s.progress.borrow().durable.pos;
            let hello = Hello {
                role: PeerRole::Target,
                name: self.s.name.clone(),
                group: self.g().to_string(),
                applied,
            };
            let opened = tokio::select! {
                r = open_session(&self.s.endpoint, &hello) => r,
                _ = self.s.shutdown.wait() => return Ok(()),
            };
            let delay = match opened {
                Err(e) => {
                    if matches!(e.kind(), ErrorKind::Auth | ErrorKind::Config) {
                        tracing::error!(group = %self.g(), "cannot open a session with the relay, not retrying: {e}");
                        return Err(TargetError::Session {
                            group: self.g().to_string(),
                            source: Box::new(e),
                        });
                    }
                    let d = backoff.next_delay();
                    tracing::warn!(group = %self.g(), "cannot open a session with the relay: {e}; retrying in {d:?}");
                    d
                }
                Ok((stream, welcome)) => match self.connection(stream, welcome, applied).await {
                    ConnEnd::Shutdown | ConnEnd::Stalled => return Ok(()),
                    ConnEnd::Fatal(e) => return Err(e),
                    ConnEnd::Lost { reason, healthy } => {
                        if healthy {
                            backoff.reset();
                        }
                        let d = backoff.next_delay();
                        tracing::warn!(group = %self.g(), "disconnected from the relay: {reason}; reconnecting in {d:?}");
                        d
                    }
                },
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.s.shutdown.wait() => return Ok(()),
            }
        }
    }

    /// Serve one connection.
    async fn connection(&mut self, stream: Stream, welcome: Welcome, applied: ChainPos) -> ConnEnd {
        let started = Instant::now();
        tracing::info!(
            group = %self.g(),
            relay = %self.s.endpoint.addr,
            applied_frame_no = applied.frame_no,
            applied_last_seq = applied.last_seq,
            relay_head = welcome.head.frame_no,
            "connected to the relay; resuming after the durable watermark"
        );
        self.s.status.lock().connected = true;
        let (r, w) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel(READ_AHEAD);
        let hearing = Hearing::new();
        let reader = tokio::spawn(reader_task(
            hearing.bytes.wrap_reader(r),
            tx,
            Arc::clone(&self.s.budget),
            hearing.clone(),
        ));
        let mut conn = Conn {
            w: Some(w),
            acked: applied,
            error_sent: false,
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A stall that happened while we were disconnected is reported at once.
        let early_stall = self.s.progress.borrow().stall.clone();
        let end = match early_stall {
            Some(st) => {
                conn.send_error(&st).await;
                ConnEnd::Stalled
            }
            None => loop {
                let step = tokio::select! {
                    _ = self.s.shutdown.wait() => Err(ConnEnd::Shutdown),
                    ch = self.s.progress.changed() => self.on_progress(ch.is_ok(), &mut conn).await,
                    m = rx.recv() => self.on_incoming(m, &mut conn).await,
                    Some(reply) = self.s.digests.replies.recv() => {
                        conn.send(&Message::Resync(reply)).await.map_err(|reason| ConnEnd::Lost { reason, healthy: false })
                    }
                    _ = tick.tick() => {
                        self.check_gap();
                        self.check_silence(&hearing)
                    }
                };
                if let Err(end) = step {
                    break end;
                }
            },
        };
        reader.abort();
        drop(rx);
        self.s.status.lock().connected = false;
        match end {
            ConnEnd::Lost { reason, .. } => ConnEnd::Lost {
                reason,
                healthy: conn.acked.frame_no > applied.frame_no
                    || started.elapsed() >= HEALTHY_AFTER,
            },
            other => {
                let w = conn.w.take();
                self.drain(w, conn.acked, conn.error_sent).await;
                tracing::info!(group = %self.g(), frame_no = self.s.progress.borrow().durable.pos.frame_no, "session with the relay closed");
                other
            }
        }
    }

    /// The connection is lost when the relay has sent nothing, not even its
    /// sign of life of every second, for `relay_silence` while we waited: its
    /// process is hung (the kernel of a stopped process still answers TCP
    /// keepalive) or its host unreachable with our acks unanswered.
    fn check_silence(&self, hearing: &Hearing) -> Result<(), ConnEnd> {
        match hearing.silent_for() {
            Some(quiet) if quiet >= self.s.relay_silence => Err(ConnEnd::Lost {
                reason: format!(
                    "the relay sent nothing for {} ms (no frame, no sign of life; \
                     target.relay_silence_ms = {}): its process is hung or its host unreachable",
                    quiet.as_millis(),
                    self.s.relay_silence.as_millis()
                ),
                healthy: false,
            }),
            _ => Ok(()),
        }
    }

    async fn on_progress(&mut self, open: bool, conn: &mut Conn) -> Result<(), ConnEnd> {
        if !open {
            // The apply thread ended while the pipeline was open: it cannot
            // apply anything more.
            let msg = format!("group {}: the apply thread stopped", self.g());
            self.s.status.stall(&msg);
            return Err(ConnEnd::Stalled);
        }
        let p = self.s.progress.borrow_and_update().clone();
        if p.durable.pos.frame_no > conn.acked.frame_no {
            conn.ack(p.durable.pos).await?;
        }
        if let Some(st) = p.stall {
            conn.send_error(&st).await;
            return Err(ConnEnd::Stalled);
        }
        Ok(())
    }

    async fn on_incoming(&mut self, m: Option<Incoming>, conn: &mut Conn) -> Result<(), ConnEnd> {
        let lost = |reason: String| ConnEnd::Lost {
            reason,
            healthy: false,
        };
        match m {
            None => Err(lost("reader stopped".into())),
            Some(Incoming::Closed(e)) => Err(lost(e.to_string())),
            Some(Incoming::Frame {
                bytes,
                header,
                charge,
            }) => match self.on_frame(bytes, header, charge) {
                Ok(true) => {
                    // Duplicate: ack what is durable, so the relay can trim.
                    let durable = self.s.progress.borrow().durable.pos;
                    if durable.frame_no == 0 {
                        return Ok(());
                    }
                    conn.ack(durable).await
                }
                Ok(false) => Ok(()),
                Err(st) => {
                    tracing::error!(group = %self.g(), frame_no = st.frame_no, kind = %st.kind, "{}; the group is stalled until restart", st.message);
                    {
                        let mut s = self.s.status.lock();
                        s.refused += 1;
                    }
                    self.s.status.stall(&st.message);
                    conn.send_error(&st).await;
                    Err(ConnEnd::Stalled)
                }
            },
            Some(Incoming::Message(Message::Error {
                kind,
                frame_no,
                message,
            })) => {
                tracing::error!(group = %self.g(), frame_no, ?kind, "the relay reported an error: {message}");
                if kind.kind() == ErrorKind::Auth {
                    Err(ConnEnd::Fatal(TargetError::RelayRefused {
                        group: self.g().to_string(),
                        kind: kind.kind(),
                        message,
                    }))
                } else {
                    Err(lost(format!("relay error ({kind:?}): {message}")))
                }
            }
            Some(Incoming::Message(Message::Throttle { .. })) => Ok(()),
            Some(Incoming::Message(Message::Resync(bytes))) => {
                if self.s.digests.requests.try_send(bytes).is_err() {
                    tracing::warn!(group = %self.g(), "digest requests are queued to the limit; one dropped (the agent asks again)");
                }
                Ok(())
            }
            Some(Incoming::Message(other)) => Err(lost(format!(
                "protocol violation: unexpected {} message from the relay",
                message_name(&other)
            ))),
        }
    }

    /// Put one frame through the gate. `Ok(true)`: a duplicate (ack);
    /// `Err`: refused, the group stalls.
    fn on_frame(
        &mut self,
        bytes: Vec<u8>,
        header: Result<FrameHeader, FrameError>,
        charge: Charge,
    ) -> Result<bool, Stall> {
        let g = self.g().to_string();
        let h = header.map_err(|e| Stall {
            frame_no: frame_no_of(&e),
            kind: e.kind(),
            message: format!(
                "group {g} frame {}: refused, not a valid frame: {e}",
                frame_no_of(&e)
            ),
        })?;
        if h.group != self.s.group {
            return Err(Stall {
                frame_no: h.frame_no,
                kind: ErrorKind::Auth,
                message: format!(
                    "group {g} frame {}: refused, it belongs to group {}",
                    h.frame_no, h.group
                ),
            });
        }
        let link = Link::of(&h);
        let size = charge.bytes();
        let tip = self.gate.tip();
        let verdict = self.gate.offer(link, HeldFrame { bytes, charge }, size);
        let dup = match verdict {
            Verdict::Ready(ready) => {
                // The frame each one follows in apply order: its predecessor,
                // except for a REBASE frame naming one the tip had passed.
                let mut applied_prev = tip.frame_no;
                for (link, f) in ready {
                    if link.rebase && link.prev_frame_no != applied_prev {
                        tracing::warn!(group = %g, frame_no = link.frame_no, prev_frame_no = link.prev_frame_no, tip = applied_prev, "REBASE frame: the agent found frames lost at the relay; the chain continues from it and the replica is inconsistent until every disk was compared again");
                    }
                    self.submit(link, applied_prev, f)?;
                    applied_prev = link.frame_no;
                }
                self.gap.progress(Instant::now());
                false
            }
            Verdict::Duplicate => {
                self.s.status.lock().duplicates += 1;
                true
            }
            Verdict::Held => false,
            Verdict::Overflow => {
                tracing::debug!(group = %g, frame_no = h.frame_no, "gate full, frame dropped (the relay redelivers it)");
                false
            }
            Verdict::Refused(why) => {
                return Err(Stall {
                    frame_no: h.frame_no,
                    kind: ErrorKind::Corrupt,
                    message: format!(
                        "group {g} frame {}: refused by the ordering gate: {why}",
                        h.frame_no
                    ),
                });
            }
        };
        self.s.status.lock().held = self.gate.gap().map_or(0, |g| g.held as u64);
        Ok(dup)
    }

    /// Hand a frame the gate released to the open threads; `applied_prev` is
    /// the frame it follows in apply order (the redo journal's chain).
    fn submit(&mut self, link: Link, applied_prev: u64, f: HeldFrame) -> Result<(), Stall> {
        // Into the redo journal first (never blocks); the open thread waits for
        // the append to be durable before it opens the frame.
        let bytes = Arc::new(f.bytes);
        let redo = self.s.redo.append(
            link.frame_no,
            applied_prev,
            link.last_seq,
            Arc::clone(&bytes),
        );
        let job = OpenJob {
            index: self.next_index,
            link,
            bytes,
            redo,
            charge: f.charge,
        };
        let err = |why: &str| Stall {
            frame_no: link.frame_no,
            kind: ErrorKind::Io,
            message: format!(
                "group {} frame {}: internal: {why}",
                self.g(),
                link.frame_no
            ),
        };
        let Some(jobs) = &self.s.jobs else {
            return Err(err("the pipeline is closed"));
        };
        // Every job holds a budget charge and the channel is as deep as the
        // budget has frames, so it cannot be full.
        match jobs.try_send(job) {
            Ok(()) => {
                self.next_index += 1;
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(err("the open queue is full")),
            Err(TrySendError::Disconnected(_)) => Err(err("the open threads stopped")),
        }
    }

    fn check_gap(&mut self) {
        let (gap, warn) = self.gap.check(Instant::now(), self.gate.gap());
        if warn && let Some(g) = &gap {
            tracing::warn!(
                group = %self.g(),
                tip_frame_no = g.tip_frame_no,
                tip_last_seq = g.tip_last_seq,
                first_held = g.first_held,
                held = g.held,
                "gap not closing: waiting for the frame after {} (frames from {} held) for {} s",
                g.tip_frame_no,
                g.first_held,
                g.stuck_ms / 1000
            );
        }
        let mut s = self.s.status.lock();
        s.held = gap.map_or(0, |g| g.held);
        s.gap = gap;
    }

    /// Close the pipeline and wait until the apply thread has applied and made
    /// durable everything it was handed, acking (and reporting a stall) over
    /// `w` while it is usable; then close the connection.
    async fn drain(&mut self, w: Option<WriteHalf<Stream>>, acked: ChainPos, error_sent: bool) {
        self.s.jobs = None;
        // Held frames will not be applied: give their budget back.
        self.gate.reset(self.gate.tip());
        let mut conn = Conn {
            w,
            acked,
            error_sent,
        };
        loop {
            let p = self.s.progress.borrow_and_update().clone();
            if conn.w.is_some() && p.durable.pos.frame_no > conn.acked.frame_no {
                let _ = conn.ack(p.durable.pos).await;
            }
            if let Some(st) = &p.stall {
                conn.send_error(st).await;
            }
            if self.s.progress.changed().await.is_err() {
                break;
            }
        }
        {
            let mut s = self.s.status.lock();
            s.held = 0;
            s.gap = None;
        }
        if let Some(mut w) = conn.w.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), w.shutdown()).await;
        }
    }
}

/// The write side of a connection and what it has sent.
struct Conn {
    w: Option<WriteHalf<Stream>>,
    acked: ChainPos,
    error_sent: bool,
}

impl Conn {
    async fn send(&mut self, msg: &Message) -> Result<(), String> {
        let Some(w) = self.w.as_mut() else {
            return Err("not connected".into());
        };
        let r = match tokio::time::timeout(WRITE_TIMEOUT, wire::write_message(w, msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("write timed out after {WRITE_TIMEOUT:?}")),
        };
        if r.is_err() {
            self.w = None;
        }
        r
    }

    /// Cumulative ack of `pos` (durable).
    async fn ack(&mut self, pos: ChainPos) -> Result<(), ConnEnd> {
        self.send(&Message::Ack {
            frame_no: pos.frame_no,
            last_seq: pos.last_seq,
        })
        .await
        .map_err(|reason| ConnEnd::Lost {
            reason,
            healthy: false,
        })?;
        // The durable watermark only moves forward.
        if pos.frame_no >= self.acked.frame_no {
            self.acked = pos;
        }
        Ok(())
    }

    /// Tell the relay why the group stalled (once; best effort).
    async fn send_error(&mut self, st: &Stall) {
        if self.error_sent || self.w.is_none() {
            return;
        }
        self.error_sent = true;
        let _ = self
            .send(&Message::Error {
                kind: WireErrorKind::from_kind(st.kind),
                frame_no: st.frame_no,
                message: st.message.clone(),
            })
            .await;
    }
}

/// Reads messages and forwards them; a frame is charged to the budget before
/// the next message is read, so an exhausted budget stops reading the socket.
async fn reader_task<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    tx: mpsc::Sender<Incoming>,
    budget: Arc<Budget>,
    hearing: Hearing,
) {
    loop {
        hearing.set_waiting(true);
        let read = wire::read_message(&mut r).await;
        hearing.set_waiting(false);
        let item = match read {
            Ok(Message::Frame(bytes)) => {
                let header = FrameHeader::parse(&bytes);
                let plain = header.as_ref().map_or(0, |h| u64::from(h.plain_len));
                let charge = budget.acquire(bytes.len() as u64, plain).await;
                Incoming::Frame {
                    bytes,
                    header,
                    charge,
                }
            }
            Ok(m) => Incoming::Message(m),
            Err(e) => {
                let _ = tx.send(Incoming::Closed(e)).await;
                return;
            }
        };
        if tx.send(item).await.is_err() {
            return;
        }
    }
}

/// The frame number a frame error names (0 when the bytes are not a frame).
pub(crate) fn frame_no_of(e: &FrameError) -> u64 {
    use FrameError::*;
    match e {
        UnsupportedVersion { frame_no, .. }
        | InvalidHeader { frame_no, .. }
        | LengthMismatch { frame_no, .. }
        | WrongGroup { frame_no, .. }
        | UnknownEpoch { frame_no, .. }
        | AuthFailed { frame_no, .. }
        | Decompress { frame_no, .. }
        | InvalidRecord { frame_no, .. }
        | InvalidInput { frame_no, .. } => *frame_no,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(tip: u64, first: u64, held: usize) -> Gap {
        Gap {
            tip: ChainPos {
                frame_no: tip,
                last_seq: tip,
            },
            first_held: first,
            held,
        }
    }

    #[test]
    fn silence_counts_only_while_the_reader_waits_for_the_relay() {
        let h = Hearing::new();
        assert_eq!(h.silent_for(), None, "not reading yet");
        std::thread::sleep(Duration::from_millis(30));
        let wait_began = Instant::now();
        h.set_waiting(true);
        let quiet = h.silent_for().expect("waiting");
        // The clock keeps whole milliseconds.
        assert!(
            quiet <= wait_began.elapsed() + Duration::from_millis(1),
            "counted from the start of the wait, not from creation: {quiet:?}"
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.silent_for().unwrap() >= Duration::from_millis(30));
        // Waiting for room in the budget (or for the session) is not silence.
        h.set_waiting(false);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(h.silent_for(), None);
    }

    #[test]
    fn gap_watch_warns_once_after_ten_seconds_without_progress() {
        let t0 = Instant::now();
        let mut w = GapWatch::new(t0);
        assert_eq!(w.check(t0, None), (None, false));
        // A gap appears long after the last progress: the clock starts now.
        let t1 = t0 + Duration::from_secs(100);
        let (s, warn) = w.check(t1, Some(gap(4, 6, 2)));
        assert!(!warn);
        let s = s.unwrap();
        assert_eq!(
            (s.tip_frame_no, s.first_held, s.held, s.stuck),
            (4, 6, 2, false)
        );
        let (s, warn) = w.check(t1 + Duration::from_secs(5), Some(gap(4, 6, 3)));
        assert!(!warn && !s.unwrap().stuck);
        let (s, warn) = w.check(t1 + Duration::from_secs(11), Some(gap(4, 6, 3)));
        assert!(warn);
        assert!(s.unwrap().stuck_ms >= 11_000);
        // Only once.
        let (s, warn) = w.check(t1 + Duration::from_secs(12), Some(gap(4, 6, 3)));
        assert!(!warn && s.unwrap().stuck);
        // Progress resets it; a new stuck gap warns again.
        let t2 = t1 + Duration::from_secs(13);
        w.progress(t2);
        let (s, warn) = w.check(t2 + Duration::from_secs(1), Some(gap(7, 9, 1)));
        assert!(!warn && !s.unwrap().stuck);
        let (_, warn) = w.check(t2 + Duration::from_secs(11), Some(gap(7, 9, 1)));
        assert!(warn);
        // Gap closed.
        assert_eq!(w.check(t2 + Duration::from_secs(12), None), (None, false));
    }
}
