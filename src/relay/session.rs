//! The relay's two kinds of session, after the hello was checked.
//!
//! * Agent session ([`run_agent`]): each frame's header is checked without a key
//!   (structure, group), the frame is queued for a durable spool append, and an
//!   ack goes back once the append is durable (acks follow frame order because
//!   appends complete in queue order). Memory held by pending appends is bounded
//!   relay-wide; a spool above its size limit makes the relay throttle the agent
//!   instead of reading more.
//! * Target session ([`run_target`]): frames after what the target has applied
//!   are read from the spool and forwarded with a window of frames in flight; the
//!   target's cumulative acks trim the spool. New appends wake the forwarder.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::hub::{CachedFrame, GroupHub};
use super::server::Shared;
use crate::error::{Classify, ErrorKind};
use crate::frame::FrameHeader;
use crate::resync::{MsgHeader, MsgKind};
use crate::spool::{AppendOutcome, AppendRequest, SpoolError, SpooledFrame};
use crate::target::gate::ChainPos;
use crate::transport::client::message_name;
use crate::transport::conn::Outgoing;
use crate::transport::wire::{Message, PROTOCOL_VERSION, PeerRole, WireError, WireErrorKind};
use crate::util::task::AbortOnDrop;

/// Frames forwarded to a target and not yet acknowledged, at most.
pub const TARGET_WINDOW_FRAMES: usize = 64;
/// Bytes forwarded to a target and not yet acknowledged, at most.
pub const TARGET_WINDOW_BYTES: usize = 128 << 20;
/// Bytes read from the spool per forwarding batch.
pub const READ_BATCH_BYTES: usize = 8 << 20;
/// Frames read from the spool per forwarding batch.
pub const READ_BATCH_FRAMES: usize = 32;
/// Pause advised to a throttled agent.
pub const THROTTLE_MS: u32 = 500;
/// While the oldest append waits for the spool longer than this (a stalled
/// disk), the agent hears a throttle of 0 ms every such interval: the relay is
/// alive and busy, so the agent holds on instead of taking the silence for a
/// hung relay (`agent.relay_silence_ms`, at least 3 s).
pub const BUSY_NOTICE: Duration = Duration::from_secs(1);
/// The pause a busy notice advises: none (it is a sign of life, not a brake;
/// the agent's window already limits what waits for a slow spool).
pub const BUSY_THROTTLE_MS: u32 = 0;

/// A target hears a throttle of 0 ms this often from its relay, whatever else
/// is sent: a sign of life, so that the target can tell a hung relay (TCP
/// keepalive is answered by the kernel of a stopped process) from an idle one
/// (`target.relay_silence_ms`, at least 3 s). Targets ignore throttles, so
/// older ones take it too.
pub const TARGET_NOTICE: Duration = Duration::from_secs(1);

/// Send `tx`'s peer a throttle of 0 ms every `every` until the session's
/// writer is gone. A full queue skips a beat: the peer is not reading (or
/// frames are on their way, which say as much).
fn spawn_signs_of_life(tx: &Tx, every: Duration) -> tokio::task::JoinHandle<()> {
    let tx = tx.clone();
    tokio::spawn(async move {
        let mut beat = tokio::time::interval(every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            beat.tick().await;
            let notice = Outgoing::Msg(Message::Throttle {
                retry_after_ms: BUSY_THROTTLE_MS,
            });
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(notice) {
                return;
            }
        }
    })
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection failed.
    #[error("connection: {0}")]
    Wire(#[from] WireError),
    /// The peer sent a message its role may not send.
    #[error("peer sent a {0} message, which is not allowed in this session")]
    Unexpected(&'static str),
    /// A frame was refused; the peer was told why.
    #[error("refused frame {frame_no}: {reason}")]
    Refused {
        /// The frame.
        frame_no: u64,
        /// Why.
        reason: String,
    },
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A newer session for the same group and role took over.
    #[error("superseded by a newer session")]
    Superseded,
    /// The relay is shutting down.
    #[error("relay shutting down")]
    Shutdown,
    /// A helper task failed.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl Classify for SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Wire(e) => e.kind(),
            SessionError::Unexpected(_) => ErrorKind::Peer,
            SessionError::Refused { .. } => ErrorKind::Corrupt,
            SessionError::Spool(e) => e.kind(),
            SessionError::Superseded | SessionError::Shutdown => ErrorKind::Shutdown,
            SessionError::Task(_) => ErrorKind::Io,
        }
    }
}

type Tx = mpsc::Sender<Outgoing>;
type Rx = mpsc::Receiver<Result<Message, WireError>>;

async fn send(tx: &Tx, m: Message) -> Result<(), SessionError> {
    tx.send(Outgoing::Msg(m))
        .await
        .map_err(|_| SessionError::Wire(WireError::Closed))
}

fn set(m: &std::sync::Mutex<Option<String>>, v: String) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
}

/// One append whose durability the acker waits for.
struct Pending {
    queued_at: std::time::Instant,
    frame_no: u64,
    prev_frame_no: u64,
    last_seq: u64,
    bytes: Arc<Vec<u8>>,
    done: oneshot::Receiver<Result<AppendOutcome, SpoolError>>,
    _memory: tokio::sync::OwnedSemaphorePermit,
}

/// The outcome of an append, telling the agent `every` ([`BUSY_NOTICE`]) that the
/// relay is alive while the spool keeps it waiting (a throttle of 0 ms).
async fn wait_append(
    done: &mut oneshot::Receiver<Result<AppendOutcome, SpoolError>>,
    tx: &Tx,
    every: Duration,
) -> Result<Result<AppendOutcome, SpoolError>, SessionError> {
    loop {
        match tokio::time::timeout(every, &mut *done).await {
            Ok(r) => return Ok(r.unwrap_or(Err(SpoolError::Shutdown))),
            Err(_) => {
                let busy = Message::Throttle {
                    retry_after_ms: BUSY_THROTTLE_MS,
                };
                send(tx, busy).await?;
            }
        }
    }
}

/// Serve an agent: welcome it with the group's durable head, then spool its frames.
pub(crate) async fn run_agent(
    shared: &Arc<Shared>,
    hub: &Arc<GroupHub>,
    who: &str,
    rx: &mut Rx,
    tx: &Tx,
) -> Result<(), SessionError> {
    let mut claim = hub.claim(PeerRole::Agent).await;
    let head = shared.spool.head(&hub.name);
    send(
        tx,
        Message::Welcome {
            version: PROTOCOL_VERSION,
            head_frame_no: head.map_or(0, |h| h.frame_no),
            head_last_seq: head.map_or(0, |h| h.last_seq),
        },
    )
    .await?;
    hub.counters.agent_connected.store(true, Ordering::Relaxed);
    let _connected = ResetOnDrop(&hub.counters.agent_connected);
    let _route = Route::open(hub, PeerRole::Agent, tx);
    let resync_slots = Arc::new(tokio::sync::Semaphore::new(RESYNC_IN_FLIGHT));

    // The acker: completes appends in order and acknowledges each durable frame.
    let (pend_tx, mut pend_rx) = mpsc::channel::<Pending>(1024);
    let acker = {
        let hub = hub.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(mut p) = pend_rx.recv().await {
                let outcome = wait_append(&mut p.done, &tx, BUSY_NOTICE).await?;
                hub.append_latency
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(p.queued_at.elapsed().as_micros() as u64);
                match outcome {
                    Ok(o) => {
                        if o == AppendOutcome::Stored {
                            hub.counters.frames_in.fetch_add(1, Ordering::Relaxed);
                            hub.counters
                                .bytes_in
                                .fetch_add(p.bytes.len() as u64, Ordering::Relaxed);
                            hub.cache_put(CachedFrame {
                                frame_no: p.frame_no,
                                prev_frame_no: p.prev_frame_no,
                                bytes: p.bytes,
                            });
                            hub.advance_head(p.frame_no);
                        } else {
                            hub.counters.duplicates_in.fetch_add(1, Ordering::Relaxed);
                        }
                        send(
                            &tx,
                            Message::Ack {
                                frame_no: p.frame_no,
                                last_seq: p.last_seq,
                            },
                        )
                        .await?;
                    }
                    Err(e) => {
                        let kind = match e.kind() {
                            ErrorKind::Peer | ErrorKind::Corrupt => WireErrorKind::Peer,
                            _ => WireErrorKind::Io,
                        };
                        let message = format!("group {} frame {}: {e}", hub.name, p.frame_no);
                        tracing::warn!(group = %hub.name, frame_no = p.frame_no, "append refused: {e}");
                        set(&hub.last_agent_error, message.clone());
                        let _ = send(
                            &tx,
                            Message::Error {
                                kind,
                                frame_no: p.frame_no,
                                message,
                            },
                        )
                        .await;
                        return Err(SessionError::Spool(e));
                    }
                }
            }
            Ok::<(), SessionError>(())
        })
    };

    let mut sd = shared.shutdown.clone();
    let result = loop {
        let m = tokio::select! {
            _ = claim.superseded.changed() => break Err(SessionError::Superseded),
            _ = sd.wait() => break Err(SessionError::Shutdown),
            m = rx.recv() => m,
        };
        let bytes = match m {
            Some(Ok(Message::Frame(b))) => b,
            Some(Ok(Message::Resync(b))) => {
                forward_request(hub, tx, &resync_slots, b);
                continue;
            }
            Some(Ok(other)) => {
                let what = message_name(&other);
                let _ = send(
                    tx,
                    Message::Error {
                        kind: WireErrorKind::Peer,
                        frame_no: 0,
                        message: format!("an agent may not send a {what} message after the hello"),
                    },
                )
                .await;
                break Err(SessionError::Unexpected(what));
            }
            Some(Err(WireError::Closed)) | None => break Ok(()),
            Some(Err(e)) => break Err(e.into()),
        };
        let queued_at = std::time::Instant::now();
        let header = match FrameHeader::parse(&bytes) {
            Ok(h) if h.group.as_str() == hub.name => h,
            Ok(h) => {
                let reason = format!(
                    "frame {} is for group {}, but this session is for group {}",
                    h.frame_no, h.group, hub.name
                );
                break Err(refuse(hub, tx, WireErrorKind::Auth, h.frame_no, reason).await);
            }
            Err(e) => {
                break Err(refuse(
                    hub,
                    tx,
                    WireErrorKind::Corrupt,
                    0,
                    format!("group {}: {e}", hub.name),
                )
                .await);
            }
        };
        // Above the spool's size limit: ask the agent to pause, read nothing more.
        while shared.spool.total_bytes() > shared.spool_max_bytes {
            hub.counters.throttles.fetch_add(1, Ordering::Relaxed);
            let _ = send(
                tx,
                Message::Throttle {
                    retry_after_ms: THROTTLE_MS,
                },
            )
            .await;
            tokio::select! {
                _ = sd.wait() => break,
                _ = tokio::time::sleep(Duration::from_millis(u64::from(THROTTLE_MS))) => {}
            }
        }
        let bytes = Arc::new(bytes);
        let want = bytes.len().min(super::server::APPEND_MEMORY) as u32;
        let permit = tokio::select! {
            _ = sd.wait() => break Err(SessionError::Shutdown),
            p = shared.append_memory.clone().acquire_many_owned(want) => match p {
                Ok(p) => p,
                Err(_) => break Err(SessionError::Shutdown),
            },
        };
        let done = shared.spool.append(AppendRequest {
            group: hub.name.clone(),
            frame_no: header.frame_no,
            prev_frame_no: header.prev_frame_no,
            last_seq: header.last_seq,
            bytes: bytes.clone(),
        });
        let p = Pending {
            queued_at,
            frame_no: header.frame_no,
            prev_frame_no: header.prev_frame_no,
            last_seq: header.last_seq,
            bytes,
            done,
            _memory: permit,
        };
        if pend_tx.send(p).await.is_err() {
            // The acker stopped after a refused append; its error is the reason.
            break Ok(());
        }
    };
    drop(pend_tx);
    let acked = match tokio::time::timeout(Duration::from_secs(30), acker).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(SessionError::Task(e.to_string())),
        Err(_) => Err(SessionError::Task("acker did not finish in 30 s".into())),
    };
    tracing::debug!(session = who, "agent session loop ended");
    match (result, acked) {
        (Err(e), _) => Err(e),
        (Ok(()), r) => r,
    }
}

async fn refuse(
    hub: &GroupHub,
    tx: &Tx,
    kind: WireErrorKind,
    frame_no: u64,
    reason: String,
) -> SessionError {
    tracing::warn!(group = %hub.name, frame_no, "frame refused: {reason}");
    set(&hub.last_agent_error, reason.clone());
    let _ = send(
        tx,
        Message::Error {
            kind,
            frame_no,
            message: reason.clone(),
        },
    )
    .await;
    SessionError::Refused { frame_no, reason }
}

struct ResetOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// How the relay's status says that its spool cannot continue the target.
const NO_CONTINUATION: &str = "relay spool has no frames continuing the target's";

/// Serve a target: trim what it has applied, welcome it, forward the rest.
pub(crate) async fn run_target(
    shared: &Arc<Shared>,
    hub: &Arc<GroupHub>,
    who: &str,
    applied: ChainPos,
    rx: &mut Rx,
    tx: &Tx,
) -> Result<(), SessionError> {
    let mut claim = hub.claim(PeerRole::Target).await;
    let head = shared.spool.head(&hub.name);
    let head_no = head.map_or(0, |h| h.frame_no);
    if applied.frame_no > head_no {
        tracing::warn!(
            group = %hub.name, applied = applied.frame_no, head = head_no,
            "target has applied frames beyond the spool's head (the spool lost frames, or the agent has not resent them yet)"
        );
    }
    // Frames the target has durably applied are no longer needed.
    let trim_to = applied.frame_no.min(head_no);
    if trim_to > 0 {
        trim(shared, &hub.name, trim_to).await;
    }
    send(
        tx,
        Message::Welcome {
            version: PROTOCOL_VERSION,
            head_frame_no: head_no,
            head_last_seq: head.map_or(0, |h| h.last_seq),
        },
    )
    .await?;
    hub.counters.target_connected.store(true, Ordering::Relaxed);
    let _connected = ResetOnDrop(&hub.counters.target_connected);
    let signs_of_life = AbortOnDrop(spawn_signs_of_life(tx, TARGET_NOTICE));
    let _route = Route::open(hub, PeerRole::Target, tx);
    let resync_slots = Arc::new(tokio::sync::Semaphore::new(RESYNC_IN_FLIGHT));
    hub.counters
        .target_acked
        .fetch_max(applied.frame_no, Ordering::Relaxed);

    // Trims run one at a time in the background; a burst of acks becomes one trim.
    let (trim_tx, mut trim_rx) = watch::channel(trim_to);
    let trimmer = {
        let shared = shared.clone();
        let group = hub.name.clone();
        tokio::spawn(async move {
            while trim_rx.changed().await.is_ok() {
                let f = *trim_rx.borrow_and_update();
                trim(&shared, &group, f).await;
            }
        })
    };

    let mut head_rx = hub.head.subscribe();
    let mut cursor = applied.frame_no;
    let mut batch: VecDeque<CachedFrame> = VecDeque::new();
    let mut in_flight: VecDeque<(u64, usize)> = VecDeque::new();
    let mut in_flight_bytes = 0usize;
    let mut acked = applied.frame_no;
    let mut sd = shared.shutdown.clone();
    let mut read_backoff = Duration::from_millis(100);
    // The head at which a read found nothing after the cursor (frames the spool
    // reported lost): read again only once the head moves.
    let mut empty_at: Option<u64> = None;
    // This session put the re-seed advice in the status (cleared on progress).
    let mut advised = false;
    let result = loop {
        let head_now = *head_rx.borrow_and_update();
        if batch.is_empty()
            && head_now > cursor
            && let Some(frames) = hub.cache_after(cursor, READ_BATCH_BYTES, READ_BATCH_FRAMES)
        {
            hub.counters
                .cache_hits
                .fetch_add(frames.len() as u64, Ordering::Relaxed);
            batch.extend(frames);
        }
        if batch.is_empty() && head_now > cursor && empty_at != Some(head_now) {
            let spool = shared.spool.clone();
            let group = hub.name.clone();
            let after = cursor;
            let r = tokio::task::spawn_blocking(move || {
                spool.read_after(&group, after, READ_BATCH_BYTES, READ_BATCH_FRAMES)
            })
            .await
            .map_err(|e| SessionError::Task(e.to_string()))?;
            match r {
                Ok(frames) => {
                    // The frame after the target's tip is gone: trimmed when an
                    // earlier state of this target acknowledged it (the target
                    // lost its state, or was restored from an older copy), or
                    // lost with the spool. (A REBASE frame names a predecessor
                    // *below* the cursor; that one continues the target.)
                    let missing = match frames.first() {
                        None => Some(head_now),
                        Some(f) if f.prev_frame_no > after => Some(f.prev_frame_no),
                        Some(_) => None,
                    };
                    if let Some(upto) = missing {
                        advised = true;
                        tracing::error!(
                            group = %hub.name, after, head = head_now,
                            "the spool holds no frame continuing the target's tip (frame {after}; frames up to {upto} are gone): the target cannot continue; if the target lost its state, re-seed it: stop the relay, run `tidemark relay reset-group --group {}`, start it again (docs/RESYNC.md)",
                            hub.name
                        );
                        set(
                            &hub.last_target_error,
                            format!(
                                "{NO_CONTINUATION} frame {after} (gone up to {upto}, head {head_now}); re-seed with `tidemark relay reset-group --group {}`",
                                hub.name
                            ),
                        );
                    }
                    if frames.is_empty() {
                        empty_at = Some(head_now);
                    }
                    batch.extend(frames.into_iter().map(|f: SpooledFrame| CachedFrame {
                        frame_no: f.frame_no,
                        prev_frame_no: f.prev_frame_no,
                        bytes: Arc::new(f.bytes),
                    }));
                    read_backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    // A damaged record cannot be forwarded; the chain is stuck
                    // here until an operator acts. Say so, retry slowly.
                    tracing::error!(group = %hub.name, after, "cannot read the spool: {e}");
                    set(
                        &hub.last_target_error,
                        format!("relay cannot read its spool after frame {after}: {e}"),
                    );
                    tokio::select! {
                        _ = sd.wait() => break Err(SessionError::Shutdown),
                        _ = claim.superseded.changed() => break Err(SessionError::Superseded),
                        _ = tokio::time::sleep(read_backoff) => {}
                    }
                    read_backoff = (read_backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let can_send = !batch.is_empty()
            && in_flight.len() < TARGET_WINDOW_FRAMES
            && in_flight_bytes < TARGET_WINDOW_BYTES;
        tokio::select! {
            biased;
            _ = claim.superseded.changed() => break Err(SessionError::Superseded),
            _ = sd.wait() => break Err(SessionError::Shutdown),
            m = rx.recv() => match m {
                Some(Ok(Message::Ack { frame_no, last_seq: _ })) => {
                    while let Some(&(f, len)) = in_flight.front() {
                        if f > frame_no {
                            break;
                        }
                        in_flight.pop_front();
                        in_flight_bytes -= len;
                    }
                    if frame_no > acked {
                        acked = frame_no;
                        // The target moves again: a re-seed advice is stale.
                        if std::mem::take(&mut advised) {
                            let mut e = hub
                                .last_target_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner());
                            if e.as_deref().is_some_and(|m| m.starts_with(NO_CONTINUATION)) {
                                *e = None;
                            }
                        }
                        hub.counters.target_acked.fetch_max(frame_no, Ordering::Relaxed);
                        let head_no = *hub.head.borrow();
                        trim_tx.send_replace(frame_no.min(head_no));
                        hub.cache_trim(frame_no);
                    }
                }
                Some(Ok(Message::Resync(b))) => forward_reply(hub, &resync_slots, b),
                Some(Ok(Message::Error { kind, frame_no, message })) => {
                    tracing::error!(group = %hub.name, frame_no, ?kind, "target refused a frame: {message}");
                    set(&hub.last_target_error, format!("frame {frame_no}: {message}"));
                }
                Some(Ok(other)) => break Err(SessionError::Unexpected(message_name(&other))),
                Some(Err(WireError::Closed)) | None => break Ok(()),
                Some(Err(e)) => break Err(e.into()),
            },
            permit = tx.reserve(), if can_send => {
                let Ok(permit) = permit else { break Ok(()) };
                let f = batch.pop_front().expect("can_send implies a frame");
                cursor = f.frame_no;
                let len = f.bytes.len();
                in_flight.push_back((f.frame_no, len));
                in_flight_bytes += len;
                hub.counters.frames_out.fetch_add(1, Ordering::Relaxed);
                hub.counters.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
                permit.send(Outgoing::Frame(f.bytes));
            }
            r = head_rx.changed(), if batch.is_empty() => {
                if r.is_err() {
                    break Ok(());
                }
            }
        }
    };
    drop(signs_of_life);
    drop(trim_tx);
    let _ = trimmer.await;
    tracing::debug!(session = who, cursor, acked, "target session loop ended");
    result
}

/// Resync messages of one session being handed on at once; more are refused
/// (the agent asks again later).
pub const RESYNC_IN_FLIGHT: usize = 16;

/// Session numbers, so a route is cleared only by the session that set it.
static ROUTE_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A session's resync route in its group's hub, cleared when the session ends
/// (before its writer is closed: the route holds a sender of that writer).
struct Route<'a> {
    hub: &'a GroupHub,
    role: PeerRole,
    id: u64,
}

impl<'a> Route<'a> {
    fn open(hub: &'a GroupHub, role: PeerRole, tx: &Tx) -> Route<'a> {
        let id = ROUTE_IDS.fetch_add(1, Ordering::Relaxed);
        hub.set_route(role, id, tx.clone());
        Route { hub, role, id }
    }
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        self.hub.clear_route(self.role, self.id);
    }
}

/// An agent's resync request: hand it to the group's target, or tell the agent
/// (by request id, from the clear header) that it cannot be delivered. Only
/// requests go this way; the relay reads nothing sealed.
fn forward_request(
    hub: &Arc<GroupHub>,
    tx: &Tx,
    slots: &Arc<tokio::sync::Semaphore>,
    bytes: Vec<u8>,
) {
    let header = match MsgHeader::parse(&bytes) {
        Ok(h) if h.kind == MsgKind::Request => h,
        Ok(h) => {
            tracing::warn!(group = %hub.name, request_id = h.request_id, kind = ?h.kind, "agent sent a resync message that is not a request; dropped");
            return;
        }
        Err(e) => {
            tracing::warn!(group = %hub.name, "agent sent a malformed resync message, dropped: {e}");
            return;
        }
    };
    let (hub, tx) = (hub.clone(), tx.clone());
    let permit = slots.clone().try_acquire_owned();
    tokio::spawn(async move {
        let result = match permit {
            Ok(_permit) => hub
                .route_request(header.request_id, bytes, tx.clone())
                .await
                .map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "more than {RESYNC_IN_FLIGHT} resync messages of group {} in flight at the relay",
                hub.name
            )),
        };
        if let Err(message) = result {
            let _ = tx
                .send(Outgoing::Msg(Message::ResyncUnreachable {
                    request_id: header.request_id,
                    message,
                }))
                .await;
        }
    });
}

/// A target's resync reply: hand it to the group's agent, if one is there (if
/// not, the agent asks again when it is back).
fn forward_reply(hub: &Arc<GroupHub>, slots: &Arc<tokio::sync::Semaphore>, bytes: Vec<u8>) {
    let header = match MsgHeader::parse(&bytes) {
        Ok(h) if h.kind != MsgKind::Request => h,
        Ok(h) => {
            tracing::warn!(group = %hub.name, request_id = h.request_id, "target sent a resync request; dropped");
            return;
        }
        Err(e) => {
            tracing::warn!(group = %hub.name, "target sent a malformed resync message, dropped: {e}");
            return;
        }
    };
    hub.answered(header.request_id);
    let Ok(permit) = slots.clone().try_acquire_owned() else {
        tracing::warn!(group = %hub.name, request_id = header.request_id, "too many resync replies in flight; dropped");
        return;
    };
    let hub = hub.clone();
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = hub.route_resync(PeerRole::Agent, bytes).await {
            tracing::debug!(group = %hub.name, request_id = header.request_id, "resync reply not delivered: {e}");
        }
    });
}

async fn trim(shared: &Arc<Shared>, group: &str, frame_no: u64) {
    let spool = shared.spool.clone();
    let g = group.to_string();
    match tokio::task::spawn_blocking(move || spool.trim_through(&g, frame_no)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(group, frame_no, "spool trim failed: {e}"),
        Err(e) => tracing::warn!(group, frame_no, "spool trim task failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slow_append_sends_signs_of_life_until_it_completes() {
        let (tx, mut rx) = mpsc::channel(64);
        let (done_tx, mut done) = oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = done_tx.send(Ok(AppendOutcome::Stored));
        });
        let every = Duration::from_millis(50);
        let r = wait_append(&mut done, &tx, every).await.unwrap();
        assert_eq!(r.unwrap(), AppendOutcome::Stored);
        let mut n = 0;
        while let Ok(m) = rx.try_recv() {
            match m {
                Outgoing::Msg(Message::Throttle { retry_after_ms: 0 }) => n += 1,
                other => panic!("expected a throttle of 0 ms, got {other:?}"),
            }
        }
        assert!(n >= 1, "a late append is announced");
    }

    #[tokio::test]
    async fn a_prompt_append_sends_nothing_and_a_lost_one_is_a_shutdown() {
        let (tx, mut rx) = mpsc::channel(16);
        let (done_tx, mut done) = oneshot::channel();
        done_tx.send(Ok(AppendOutcome::Duplicate)).unwrap();
        let r = wait_append(&mut done, &tx, BUSY_NOTICE).await.unwrap();
        assert_eq!(r.unwrap(), AppendOutcome::Duplicate);
        let (done_tx, mut done) = oneshot::channel::<Result<AppendOutcome, SpoolError>>();
        drop(done_tx);
        let r = wait_append(&mut done, &tx, BUSY_NOTICE).await.unwrap();
        assert!(matches!(r, Err(SpoolError::Shutdown)));
        assert!(rx.try_recv().is_err());
    }
}
