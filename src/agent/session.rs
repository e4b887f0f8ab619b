//! The agent's side of a session with the relay: pumps sealed frames from the
//! pipeline through the [`Outbox`] onto the connection and acknowledgements
//! back into the capture journal; reconnects with back-off and resumes from
//! the relay's durable head.
//!
//! The decisions (what to send, what an ack releases, whether a reconnect
//! continues the chain) are the outbox's; this loop only moves bytes and time.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::outbox::{ChainBreak, OutFrame, Outbox};
use super::status::{GroupInfo, lock};
use crate::error::{Classify, ErrorKind};
use crate::target::gate::ChainPos;
use crate::transport::client::{
    Backoff, ConnectError, Hello, RelayEndpoint, Stream, Welcome, open_session,
};
use crate::transport::conn::{Outgoing, Progress, spawn_reader, spawn_writer};
use crate::transport::wire::{Message, WireError, WireErrorKind};
use crate::util::shutdown::Shutdown;

/// A session error the agent cannot recover from by reconnecting.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Authentication or configuration refused by the relay (or by us).
    #[error("group {group}: {source}")]
    Connect {
        /// Group.
        group: String,
        /// Cause.
        source: ConnectError,
    },
    /// The relay's chain does not continue ours.
    #[error("group {group}: {source}")]
    ChainBreak {
        /// Group.
        group: String,
        /// Details.
        source: ChainBreak,
    },
    /// The relay refused a frame for a reason a resend cannot fix.
    #[error("group {group}: relay refused frame {frame_no} ({kind:?}): {message}")]
    Refused {
        /// Group.
        group: String,
        /// The frame.
        frame_no: u64,
        /// Classification.
        kind: WireErrorKind,
        /// The relay's reason.
        message: String,
    },
}

impl Classify for SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Connect { source, .. } => source.kind(),
            SessionError::ChainBreak { .. } => ErrorKind::Peer,
            SessionError::Refused { kind, .. } => kind.kind(),
        }
    }
}

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Draining was asked for and every frame is acknowledged.
    Drained,
    /// Draining was asked for but frames were still unacknowledged at the deadline.
    DrainTimeout,
    /// Shutdown before any session could be opened.
    NeverConnected,
}

enum ConnEnd {
    Drained,
    DrainTimeout,
    Lost(String),
}

/// Everything one group's session needs.
pub(crate) struct Session {
    pub info: Arc<GroupInfo>,
    pub endpoint: RelayEndpoint,
    pub hello: Hello,
    pub frames: mpsc::Receiver<OutFrame>,
    pub outbox: Outbox,
    pub max_frames: usize,
    pub max_bytes: usize,
    /// Fires when the journal is closed and the session should drain.
    pub drain: Shutdown,
    pub drain_timeout: Duration,
    /// Longest the relay may stay silent, and the connection take no byte,
    /// while sent frames wait for the relay's ack (`agent.relay_silence_ms`);
    /// then the connection counts as lost. The relay answers every frame once
    /// it is durable (or refuses it, or throttles, also as a sign of life
    /// while its disk is slow), idle heartbeats keep frames in flight, and a
    /// slow link keeps taking bytes, so such a silence means its host or
    /// process is gone or hung: TCP alone would retransmit for about 15
    /// minutes with the status saying "connected".
    pub silence_limit: Duration,
    /// Sealed digest requests to carry to the relay (checksum resync).
    pub resync_out: Option<mpsc::Receiver<Vec<u8>>>,
}

/// Open the first session, retrying with back-off until it works, a fatal error,
/// or `stop` fires (then `None`).
pub(crate) async fn connect_with_retry(
    endpoint: &RelayEndpoint,
    hello: &Hello,
    info: &GroupInfo,
    stop: &mut Shutdown,
) -> Result<Option<(Stream, Welcome)>, SessionError> {
    let mut backoff = Backoff::default();
    loop {
        match open_session(endpoint, hello).await {
            Ok(c) => {
                tracing::info!(group = %hello.group, relay = %endpoint.addr, head = c.1.head.frame_no, "session opened");
                return Ok(Some(c));
            }
            Err(e) if e.kind().is_retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(group = %hello.group, "{e}; retrying in {delay:?}");
                info.set_error(e.to_string());
                tokio::select! {
                    _ = stop.wait() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                info.set_error(e.to_string());
                return Err(SessionError::Connect {
                    group: hello.group.clone(),
                    source: e,
                });
            }
        }
    }
}

impl Session {
    /// Serve until drained (or a fatal error), starting with `first`. Gives
    /// back the resync channel, for a session that follows this one.
    pub async fn run(
        mut self,
        first: (Stream, Welcome),
    ) -> (
        Result<SessionEnd, SessionError>,
        Option<mpsc::Receiver<Vec<u8>>>,
    ) {
        let r = self.serve_all(first).await;
        (r, self.resync_out.take())
    }

    async fn serve_all(&mut self, first: (Stream, Welcome)) -> Result<SessionEnd, SessionError> {
        let mut conn = Some(first);
        let mut backoff = Backoff::default();
        let mut draining: Option<Instant> = None;
        loop {
            let (stream, welcome) = match conn.take() {
                Some(c) => c,
                None => {
                    let delay = backoff.next_delay();
                    let mut drain = self.drain.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = drain.wait(), if draining.is_none() => {
                            draining = Some(Instant::now() + self.drain_timeout);
                        }
                        _ = sleep_until_opt(draining) => return Ok(SessionEnd::DrainTimeout),
                    }
                    match open_session(&self.endpoint, &self.hello).await {
                        Ok(c) => {
                            tracing::info!(group = %self.hello.group, head = c.1.head.frame_no, "session re-opened");
                            c
                        }
                        Err(e) if e.kind().is_retryable() => {
                            tracing::warn!(group = %self.hello.group, "{e}; retrying in {:?}", backoff.clone().next_delay());
                            self.info.set_error(e.to_string());
                            continue;
                        }
                        Err(e) => {
                            self.info.set_error(e.to_string());
                            return Err(SessionError::Connect {
                                group: self.hello.group.clone(),
                                source: e,
                            });
                        }
                    }
                }
            };
            match self.outbox.on_connect(welcome.head) {
                Ok(trimmed) => self.acknowledged(trimmed),
                Err(source) => {
                    self.info.set_error(source.to_string());
                    return Err(SessionError::ChainBreak {
                        group: self.hello.group.clone(),
                        source,
                    });
                }
            }
            self.info.connected.store(true, Ordering::Relaxed);
            self.info.journal.set_link(true);
            let opened = Instant::now();
            let end = self.serve(stream, &mut draining).await;
            self.info.connected.store(false, Ordering::Relaxed);
            self.info.journal.set_link(false);
            if let Some(dc) = self.info.drain.digests() {
                dc.fail_all("the connection to the relay was lost");
            }
            match end? {
                ConnEnd::Drained => return Ok(SessionEnd::Drained),
                ConnEnd::DrainTimeout => return Ok(SessionEnd::DrainTimeout),
                ConnEnd::Lost(why) => {
                    tracing::warn!(group = %self.hello.group, "connection to relay lost: {why}");
                    self.info
                        .set_error(format!("connection to relay lost: {why}"));
                    self.info.reconnects.fetch_add(1, Ordering::Relaxed);
                    if opened.elapsed() > Duration::from_secs(10) {
                        backoff.reset();
                    }
                }
            }
        }
    }

    /// The relay acknowledged through some frame: trim the journal.
    fn acknowledged(&mut self, trimmed: Option<u64>) {
        let acked = self.outbox.acked();
        *lock(&self.info.acked) = acked;
        *lock(&self.info.outbox) = (self.outbox.len(), self.outbox.bytes());
        if let Some(seq) = trimmed {
            self.info.journal.trim_through(seq);
            self.info
                .last_ack_us
                .store(crate::util::time::now_us(), Ordering::Relaxed);
        }
    }

    async fn serve(
        &mut self,
        stream: Stream,
        draining: &mut Option<Instant>,
    ) -> Result<ConnEnd, SessionError> {
        let (r, w) = tokio::io::split(stream);
        let (mut rx, reader) = spawn_reader(r, 256);
        // A slow link is not a silent relay: the deadline also moves while
        // the connection keeps taking bytes.
        let written = Progress::new();
        let (tx, mut writer) = spawn_writer(written.wrap(w), 2);
        let mut frames_closed = false;
        let mut paused: Option<Instant> = None;
        // When the relay last said anything, or when the first frame that is
        // still unanswered was sent, whichever is later.
        let mut heard = Instant::now();
        // A digest request taken from the resync channel, waiting for room in
        // the writer's queue (never awaited outside the `select!`, so a stuck
        // writer cannot stop the silence deadline).
        let mut resync_req: Option<Vec<u8>> = None;
        let mut drain = self.drain.clone();
        let end = loop {
            if draining.is_some() && frames_closed && self.outbox.is_empty() {
                break Ok(ConnEnd::Drained);
            }
            let can_send = paused.is_none() && self.outbox.has_unsent();
            let can_take = !frames_closed
                && self.outbox.len() < self.max_frames
                && self.outbox.bytes() < self.max_bytes;
            let answer_due = (self.outbox.in_flight() > 0)
                .then(|| heard.max(written.last().into()) + self.silence_limit);
            tokio::select! {
                biased;
                m = rx.recv() => { heard = Instant::now(); match m {
                    Some(Ok(Message::Ack { frame_no, last_seq })) => {
                        let before = self.outbox.len();
                        let trimmed = self.outbox.on_ack(frame_no, last_seq);
                        let n = before - self.outbox.len();
                        self.info.frames_acked.fetch_add(n as u64, Ordering::Relaxed);
                        self.acknowledged(trimmed);
                    }
                    Some(Ok(Message::Resync(bytes))) => {
                        if let Some(dc) = self.info.drain.digests() {
                            dc.on_message(&bytes);
                        }
                    }
                    Some(Ok(Message::ResyncUnreachable { request_id, message })) => {
                        if let Some(dc) = self.info.drain.digests() {
                            dc.on_unreachable(request_id, &message);
                        }
                    }
                    // Zero: the relay is alive, its spool slow (no pause).
                    Some(Ok(Message::Throttle { retry_after_ms: 0 })) => {}
                    Some(Ok(Message::Throttle { retry_after_ms })) => {
                        self.info.throttles.fetch_add(1, Ordering::Relaxed);
                        let ms = u64::from(retry_after_ms).clamp(10, 60_000);
                        let until = Instant::now() + Duration::from_millis(ms);
                        paused = Some(paused.map_or(until, |p| p.max(until)));
                    }
                    Some(Ok(Message::Error { kind: WireErrorKind::Io, message, .. })) => {
                        break Ok(ConnEnd::Lost(format!("relay: {message}")));
                    }
                    Some(Ok(Message::Error { kind, frame_no, message })) => {
                        self.info.set_error(message.clone());
                        break Err(SessionError::Refused { group: self.hello.group.clone(), frame_no, kind, message });
                    }
                    Some(Ok(other)) => break Ok(ConnEnd::Lost(format!(
                        "relay sent an unexpected {} message", crate::transport::client::message_name(&other)
                    ))),
                    Some(Err(WireError::Closed)) | None => break Ok(ConnEnd::Lost("closed by the relay".into())),
                    Some(Err(e)) => break Ok(ConnEnd::Lost(e.to_string())),
                }},
                _ = drain.wait(), if draining.is_none() => {
                    *draining = Some(Instant::now() + self.drain_timeout);
                }
                _ = sleep_until_opt(*draining) => break Ok(ConnEnd::DrainTimeout),
                _ = sleep_until_opt(paused) => paused = None,
                _ = sleep_until_opt(answer_due) => {
                    // Bytes may have got through since the deadline was set.
                    if heard.max(written.last().into()) + self.silence_limit <= Instant::now() {
                        break Ok(ConnEnd::Lost(format!(
                            "no answer from the relay for {} ms, and no byte taken by the connection, while {} frames waited for its ack",
                            self.silence_limit.as_millis(), self.outbox.in_flight()
                        )));
                    }
                }
                p = tx.reserve(), if can_send => {
                    let Ok(p) = p else { break Ok(ConnEnd::Lost("connection writer stopped".into())) };
                    if self.outbox.in_flight() == 0 {
                        heard = Instant::now();
                    }
                    if let Some(f) = self.outbox.next_to_send() {
                        p.send(Outgoing::Frame(f.bytes));
                    }
                }
                Some(req) = recv_opt(&mut self.resync_out), if resync_req.is_none() => {
                    resync_req = Some(req);
                }
                p = tx.reserve(), if resync_req.is_some() => {
                    let Ok(p) = p else { break Ok(ConnEnd::Lost("connection writer stopped".into())) };
                    if let Some(req) = resync_req.take() {
                        p.send(Outgoing::Msg(Message::Resync(req)));
                    }
                }
                f = self.frames.recv(), if can_take => match f {
                    Some(f) => {
                        self.outbox.push(f);
                        *lock(&self.info.outbox) = (self.outbox.len(), self.outbox.bytes());
                    }
                    None => frames_closed = true,
                },
            }
        };
        drop(tx);
        reader.abort();
        if tokio::time::timeout(Duration::from_secs(2), &mut writer)
            .await
            .is_err()
        {
            // Blocked on a peer that takes nothing: end it, and the socket
            // and the frames it holds with it.
            writer.abort();
            tracing::debug!(group = %self.hello.group, "connection writer did not finish in 2 s");
        }
        end
    }
}

/// The next item of an optional channel; pending forever without one (or
/// once it is closed).
async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => match r.recv().await {
            Some(v) => Some(v),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when `None` (a disabled select branch).
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The hello of an agent session.
pub(crate) fn agent_hello(name: &str, group: &str) -> Hello {
    Hello {
        role: crate::transport::wire::PeerRole::Agent,
        name: name.to_string(),
        group: group.to_string(),
        applied: ChainPos::default(),
    }
}
