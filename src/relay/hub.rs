//! Per-group meeting point of the relay's sessions: who is connected, the
//! spool head that wakes the target's forwarder, and counters for status.
//!
//! At most one agent session and one target session serve a group at a time. A
//! new session for the same group and role supersedes the old one (typically a
//! half-open connection the peer already gave up on): the old one is told to stop
//! and the new one waits, bounded, for it to end before it welcomes its peer, so
//! two sessions never append or forward for one group concurrently.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::transport::conn::Outgoing;
use crate::transport::wire::{Message, PeerRole};

/// How long a superseding session waits for the one it replaces to end.
pub const SUPERSEDE_WAIT: Duration = Duration::from_secs(5);
/// Bytes of recently spooled frames kept in memory, relay-wide, so a target that
/// keeps up is forwarded frames without reading them back from the spool.
pub const HOT_CACHE_BYTES: usize = 32 << 20;

/// A durable frame kept in memory for forwarding.
#[derive(Debug, Clone)]
pub struct CachedFrame {
    /// Frame number.
    pub frame_no: u64,
    /// Its predecessor.
    pub prev_frame_no: u64,
    /// The sealed bytes (shared with the spool append that made them durable).
    pub bytes: Arc<Vec<u8>>,
}

/// The most recent durable frames of a group, in chain order.
#[derive(Debug, Default)]
struct HotCache {
    frames: VecDeque<CachedFrame>,
    bytes: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Slot = Option<(watch::Sender<bool>, oneshot::Receiver<()>)>;

/// The writer queue of a role's current session, with the session's number
/// (so a session that ended clears only its own route).
type Route = Option<(u64, mpsc::Sender<Outgoing>)>;

/// How long a resync message may wait for room in the peer's writer queue.
pub const ROUTE_WAIT: Duration = Duration::from_secs(5);

/// Resync requests of a group remembered while their target session has not
/// answered them; beyond this many, a request's agent waits for its own
/// timeout if the session ends. (An agent keeps one digest request in flight
/// per disk it verifies or drains, so only a misbehaving agent comes near it.)
pub const MAX_UNANSWERED: usize = 4096;

/// A resync request handed to a target session and not answered yet.
#[derive(Debug)]
struct Unanswered {
    /// The target session (route number) that has it.
    route: u64,
    /// The writer queue of the agent session that asked.
    agent: mpsc::Sender<Outgoing>,
}

/// Why a resync message could not be handed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No session of that role is open for the group.
    #[error("no {role} is connected to the relay for group {group}")]
    NotConnected {
        /// "agent" or "target".
        role: &'static str,
        /// The group.
        group: String,
    },
    /// The peer's connection did not take the message in time.
    #[error("the {role} of group {group} did not take the message within {secs} s")]
    Busy {
        /// "agent" or "target".
        role: &'static str,
        /// The group.
        group: String,
        /// The wait.
        secs: u64,
    },
}

/// Counters of one group, updated by its sessions.
#[derive(Debug, Default)]
pub struct GroupCounters {
    /// Frames the agent sent that were stored.
    pub frames_in: AtomicU64,
    /// Bytes of those frames.
    pub bytes_in: AtomicU64,
    /// Frames the agent sent again that the spool already held.
    pub duplicates_in: AtomicU64,
    /// Frames forwarded to the target (resends included).
    pub frames_out: AtomicU64,
    /// Bytes forwarded.
    pub bytes_out: AtomicU64,
    /// Highest frame the target acknowledged as durably applied.
    pub target_acked: AtomicU64,
    /// Throttle messages sent to the agent.
    pub throttles: AtomicU64,
    /// Frames forwarded from memory rather than read back from the spool.
    pub cache_hits: AtomicU64,
    /// An agent session is open.
    pub agent_connected: AtomicBool,
    /// A target session is open.
    pub target_connected: AtomicBool,
}

/// The shared state of one group.
#[derive(Debug)]
pub struct GroupHub {
    /// Group name.
    pub name: String,
    /// Last durable frame number at the relay (0 = none); forwarders wait on it.
    pub head: watch::Sender<u64>,
    /// Counters.
    pub counters: GroupCounters,
    /// The last refusal the target reported, for status.
    pub last_target_error: Mutex<Option<String>>,
    /// The last refusal sent to the agent, for status.
    pub last_agent_error: Mutex<Option<String>>,
    /// Time from reading a frame to its durable append (µs): what the agent
    /// waits for its ack, spool group commit included.
    pub append_latency: Mutex<crate::util::hist::Histogram>,
    agent: Mutex<Slot>,
    target: Mutex<Slot>,
    /// Where resync messages for each role's current session go.
    agent_route: Mutex<Route>,
    target_route: Mutex<Route>,
    /// Requests handed to a target session and not answered, by request id:
    /// when that session ends, their agent is told at once (rather than
    /// waiting out its timeout for an answer that cannot come).
    unanswered: Mutex<HashMap<u64, Unanswered>>,
    cache: Mutex<HotCache>,
    /// Bytes cached by all groups together.
    cache_used: Arc<AtomicUsize>,
    cache_max: usize,
}

/// A session's hold on its group and role; dropping it tells a successor that
/// this session has ended.
#[derive(Debug)]
pub struct Claim {
    /// Becomes true when a newer session for the same group and role took over.
    pub superseded: watch::Receiver<bool>,
    _done: oneshot::Sender<()>,
}

impl GroupHub {
    fn route(&self, role: PeerRole) -> &Mutex<Route> {
        match role {
            PeerRole::Agent => &self.agent_route,
            PeerRole::Target => &self.target_route,
        }
    }

    /// Make `tx` (session number `id`) where resync messages for `role` go.
    pub fn set_route(&self, role: PeerRole, id: u64, tx: mpsc::Sender<Outgoing>) {
        *lock(self.route(role)) = Some((id, tx));
    }

    /// Forget the route of session `id` of `role` (a newer session's stays).
    /// When a target session ends, every agent whose request it had not
    /// answered gets a `ResyncUnreachable` for it now.
    pub fn clear_route(&self, role: PeerRole, id: u64) {
        {
            let mut r = lock(self.route(role));
            if r.as_ref().is_some_and(|(i, _)| *i == id) {
                *r = None;
            }
        }
        if role != PeerRole::Target {
            return;
        }
        let lost: Vec<(u64, Unanswered)> = {
            let mut u = lock(&self.unanswered);
            let ids: Vec<u64> = u
                .iter()
                .filter(|(_, v)| v.route == id)
                .map(|(k, _)| *k)
                .collect();
            ids.into_iter()
                .filter_map(|k| u.remove(&k).map(|v| (k, v)))
                .collect()
        };
        for (request_id, u) in lost {
            let msg = Outgoing::Msg(Message::ResyncUnreachable {
                request_id,
                message: format!(
                    "the target of group {} disconnected before it answered",
                    self.name
                ),
            });
            // Never blocks (this runs when a session ends): a full queue gets
            // the message from a task that waits up to ROUTE_WAIT for room; an
            // agent that is gone, or a queue still full then, falls back to
            // the agent's own timeout.
            if let Err(mpsc::error::TrySendError::Full(msg)) = u.agent.try_send(msg)
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                rt.spawn(async move {
                    let _ = tokio::time::timeout(ROUTE_WAIT, u.agent.send(msg)).await;
                });
            }
        }
    }

    /// Hand an agent's resync request (`request_id`, from its clear header) to
    /// the group's target session, and remember it until that session answers
    /// ([`GroupHub::answered`]) or ends ([`GroupHub::clear_route`]).
    pub async fn route_request(
        &self,
        request_id: u64,
        bytes: Vec<u8>,
        agent: mpsc::Sender<Outgoing>,
    ) -> Result<(), RouteError> {
        let r = self
            .send_resync(PeerRole::Target, bytes, Some((request_id, agent)))
            .await;
        if r.is_err() {
            self.answered(request_id);
        }
        r
    }

    /// The target answered request `request_id` (or it failed on the way).
    pub fn answered(&self, request_id: u64) {
        lock(&self.unanswered).remove(&request_id);
    }

    /// Hand a sealed resync message to the current session of `to`, waiting
    /// at most [`ROUTE_WAIT`] for room in its writer queue. The relay keeps no
    /// copy: a lost message is asked for again by the agent.
    pub async fn route_resync(&self, to: PeerRole, bytes: Vec<u8>) -> Result<(), RouteError> {
        self.send_resync(to, bytes, None).await
    }

    /// [`GroupHub::route_resync`], remembering `request` (request id, the
    /// asking agent's queue) against the session the message goes to.
    async fn send_resync(
        &self,
        to: PeerRole,
        bytes: Vec<u8>,
        request: Option<(u64, mpsc::Sender<Outgoing>)>,
    ) -> Result<(), RouteError> {
        let role = match to {
            PeerRole::Agent => "agent",
            PeerRole::Target => "target",
        };
        let tx = {
            let r = lock(self.route(to));
            if let (Some((route, _)), Some((request_id, agent))) = (r.as_ref(), request) {
                let mut u = lock(&self.unanswered);
                if u.len() < MAX_UNANSWERED {
                    u.insert(
                        request_id,
                        Unanswered {
                            route: *route,
                            agent,
                        },
                    );
                }
            }
            r.as_ref().map(|(_, tx)| tx.clone())
        };
        let Some(tx) = tx else {
            return Err(RouteError::NotConnected {
                role,
                group: self.name.clone(),
            });
        };
        match tokio::time::timeout(ROUTE_WAIT, tx.send(Outgoing::Msg(Message::Resync(bytes)))).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(RouteError::NotConnected {
                role,
                group: self.name.clone(),
            }),
            Err(_) => Err(RouteError::Busy {
                role,
                group: self.name.clone(),
                secs: ROUTE_WAIT.as_secs(),
            }),
        }
    }

    fn slot(&self, role: PeerRole) -> &Mutex<Slot> {
        match role {
            PeerRole::Agent => &self.agent,
            PeerRole::Target => &self.target,
        }
    }

    /// Become the group's session for `role`, superseding any current one and
    /// waiting (at most [`SUPERSEDE_WAIT`]) until it has ended.
    pub async fn claim(&self, role: PeerRole) -> Claim {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = oneshot::channel();
        let prev = lock(self.slot(role)).replace((stop_tx, done_rx));
        if let Some((stop, done)) = prev {
            tracing::info!(group = %self.name, role = ?role, "new session supersedes the current one");
            stop.send_replace(true);
            if tokio::time::timeout(SUPERSEDE_WAIT, done).await.is_err() {
                tracing::warn!(group = %self.name, role = ?role, "superseded session did not end in time");
            }
        }
        Claim {
            superseded: stop_rx,
            _done: done_tx,
        }
    }

    /// Keep a frame that just became durable (frames arrive in chain order),
    /// evicting this group's oldest frames while the relay-wide budget is
    /// exceeded; a frame that still does not fit is not cached.
    pub fn cache_put(&self, f: CachedFrame) {
        let len = f.bytes.len();
        let mut c = lock(&self.cache);
        if c.frames
            .back()
            .is_some_and(|b| b.frame_no != f.prev_frame_no)
        {
            // Not a continuation of what is cached: start over from this frame.
            self.cache_used.fetch_sub(c.bytes, Ordering::Relaxed);
            c.frames.clear();
            c.bytes = 0;
        }
        while self.cache_used.load(Ordering::Relaxed) + len > self.cache_max {
            let Some(old) = c.frames.pop_front() else {
                return;
            };
            c.bytes -= old.bytes.len();
            self.cache_used
                .fetch_sub(old.bytes.len(), Ordering::Relaxed);
        }
        c.bytes += len;
        self.cache_used.fetch_add(len, Ordering::Relaxed);
        c.frames.push_back(f);
    }

    /// The cached frames that follow `after` in the chain (at most `max_count`,
    /// stopping before `max_bytes` would be passed but at least one), or `None`
    /// when the cache does not hold the frame right after `after`.
    pub fn cache_after(
        &self,
        after: u64,
        max_bytes: usize,
        max_count: usize,
    ) -> Option<Vec<CachedFrame>> {
        let c = lock(&self.cache);
        let start = c.frames.partition_point(|f| f.frame_no <= after);
        let first = c.frames.get(start)?;
        if first.prev_frame_no != after {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for f in c.frames.range(start..) {
            if !out.is_empty() && (out.len() >= max_count || bytes + f.bytes.len() > max_bytes) {
                break;
            }
            bytes += f.bytes.len();
            out.push(f.clone());
        }
        Some(out)
    }

    /// Forget cached frames through `frame_no` (the target has them).
    pub fn cache_trim(&self, frame_no: u64) {
        let mut c = lock(&self.cache);
        while c.frames.front().is_some_and(|f| f.frame_no <= frame_no) {
            if let Some(f) = c.frames.pop_front() {
                c.bytes -= f.bytes.len();
                self.cache_used.fetch_sub(f.bytes.len(), Ordering::Relaxed);
            }
        }
    }

    /// Publish a new durable head (never moves backwards).
    pub fn advance_head(&self, frame_no: u64) {
        self.head.send_if_modified(|h| {
            if frame_no > *h {
                *h = frame_no;
                true
            } else {
                false
            }
        });
    }
}

/// All groups the relay has seen.
#[derive(Debug)]
pub struct Hub {
    groups: Mutex<HashMap<String, Arc<GroupHub>>>,
    cache_used: Arc<AtomicUsize>,
    cache_max: usize,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(HOT_CACHE_BYTES)
    }
}

impl Hub {
    /// A hub whose groups cache at most `cache_max` bytes of frames together.
    pub fn new(cache_max: usize) -> Self {
        Hub {
            groups: Mutex::new(HashMap::new()),
            cache_used: Arc::new(AtomicUsize::new(0)),
            cache_max,
        }
    }

    /// Bytes of frames cached by all groups.
    pub fn cache_bytes(&self) -> usize {
        self.cache_used.load(Ordering::Relaxed)
    }

    /// The group's hub, created on first use with `head` as its durable head.
    pub fn group(&self, name: &str, head: u64) -> Arc<GroupHub> {
        let mut g = lock(&self.groups);
        g.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(GroupHub {
                    name: name.to_string(),
                    head: watch::channel(head).0,
                    counters: GroupCounters::default(),
                    last_target_error: Mutex::new(None),
                    last_agent_error: Mutex::new(None),
                    append_latency: Mutex::new(crate::util::hist::Histogram::new()),
                    agent: Mutex::new(None),
                    target: Mutex::new(None),
                    agent_route: Mutex::new(None),
                    target_route: Mutex::new(None),
                    unanswered: Mutex::new(HashMap::new()),
                    cache: Mutex::new(HotCache::default()),
                    cache_used: self.cache_used.clone(),
                    cache_max: self.cache_max,
                })
            })
            .clone()
    }

    /// Every group, sorted by name.
    pub fn all(&self) -> Vec<Arc<GroupHub>> {
        let mut v: Vec<_> = lock(&self.groups).values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Tell every session to stop (shutdown).
    pub fn stop_all(&self) {
        for g in self.all() {
            for role in [PeerRole::Agent, PeerRole::Target] {
                if let Some((stop, _)) = lock(g.slot(role)).as_ref() {
                    stop.send_replace(true);
                }
            }
        }
    }
}

/// Counters of one group as the status file shows them.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct GroupCountersView {
    /// See [`GroupCounters`].
    pub frames_in: u64,
    /// See [`GroupCounters`].
    pub bytes_in: u64,
    /// See [`GroupCounters`].
    pub duplicates_in: u64,
    /// See [`GroupCounters`].
    pub frames_out: u64,
    /// See [`GroupCounters`].
    pub bytes_out: u64,
    /// See [`GroupCounters`].
    pub target_acked: u64,
    /// See [`GroupCounters`].
    pub throttles: u64,
    /// See [`GroupCounters`].
    pub cache_hits: u64,
    /// See [`GroupCounters`].
    pub agent_connected: bool,
    /// See [`GroupCounters`].
    pub target_connected: bool,
}

impl GroupCounters {
    /// A snapshot.
    pub fn view(&self) -> GroupCountersView {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GroupCountersView {
            frames_in: r(&self.frames_in),
            bytes_in: r(&self.bytes_in),
            duplicates_in: r(&self.duplicates_in),
            frames_out: r(&self.frames_out),
            bytes_out: r(&self.bytes_out),
            target_acked: r(&self.target_acked),
            throttles: r(&self.throttles),
            cache_hits: r(&self.cache_hits),
            agent_connected: self.agent_connected.load(Ordering::Relaxed),
            target_connected: self.target_connected.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_claim_supersedes_and_waits_for_the_old() {
        let hub = Hub::default();
        let g = hub.group("g1", 0);
        let mut first = g.claim(PeerRole::Agent).await;
        assert!(!*first.superseded.borrow());
        let g2 = g.clone();
        let second = tokio::spawn(async move { g2.claim(PeerRole::Agent).await });
        first.superseded.changed().await.unwrap();
        assert!(*first.superseded.borrow());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .unwrap()
            .unwrap();
        assert!(!*second.superseded.borrow());
        // Roles are independent.
        let t = g.claim(PeerRole::Target).await;
        assert!(!*t.superseded.borrow());
    }

    fn cf(frame_no: u64, prev: u64, len: usize) -> CachedFrame {
        CachedFrame {
            frame_no,
            prev_frame_no: prev,
            bytes: Arc::new(vec![0; len]),
        }
    }

    #[test]
    fn hot_cache_serves_continuations_within_budget() {
        let hub = Hub::new(300);
        let g = hub.group("g1", 0);
        for n in 1..=3 {
            g.cache_put(cf(n, n - 1, 100));
        }
        let got: Vec<u64> = g
            .cache_after(0, 1000, 10)
            .unwrap()
            .iter()
            .map(|f| f.frame_no)
            .collect();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(
            g.cache_after(1, 150, 10).unwrap().len(),
            1,
            "byte limit, at least one"
        );
        assert_eq!(g.cache_after(1, 1000, 1).unwrap()[0].frame_no, 2);
        assert!(
            g.cache_after(3, 1000, 10).is_none(),
            "nothing after the newest"
        );
        // Over budget: the oldest goes; a reader before it must use the spool.
        g.cache_put(cf(4, 3, 100));
        assert!(g.cache_after(0, 1000, 10).is_none());
        assert_eq!(g.cache_after(1, 1000, 10).unwrap().len(), 3);
        assert_eq!(hub.cache_bytes(), 300);
        // A budget shared by groups: another group's frame evicts only its own.
        let h = hub.group("g2", 0);
        h.cache_put(cf(1, 0, 100));
        assert!(h.cache_after(0, 1000, 10).is_none(), "no room: not cached");
        g.cache_trim(2);
        assert_eq!(hub.cache_bytes(), 200);
        h.cache_put(cf(1, 0, 100));
        assert_eq!(h.cache_after(0, 1000, 10).unwrap().len(), 1);
        // A frame that does not continue the cached chain restarts it.
        g.cache_put(cf(9, 7, 50));
        assert!(g.cache_after(4, 1000, 10).is_none());
        assert_eq!(g.cache_after(7, 1000, 10).unwrap()[0].frame_no, 9);
    }

    #[tokio::test]
    async fn a_target_that_leaves_fails_its_unanswered_requests_at_once() {
        let hub = Hub::default();
        let g = hub.group("g1", 0);
        let (agent_tx, mut agent_rx) = mpsc::channel(8);
        // No target: refused at once, nothing remembered.
        assert!(matches!(
            g.route_request(1, vec![1], agent_tx.clone()).await,
            Err(RouteError::NotConnected { .. })
        ));
        assert!(lock(&g.unanswered).is_empty());
        let (t1, mut t1_rx) = mpsc::channel(8);
        g.set_route(PeerRole::Target, 7, t1);
        g.route_request(2, vec![2], agent_tx.clone()).await.unwrap();
        g.route_request(3, vec![3], agent_tx.clone()).await.unwrap();
        for want in [2u8, 3] {
            match t1_rx.recv().await {
                Some(Outgoing::Msg(Message::Resync(b))) => assert_eq!(b, vec![want]),
                other => panic!("{other:?}"),
            }
        }
        // Request 3 is answered; then the session ends with 2 unanswered.
        g.answered(3);
        // A session that is not the current one ending changes nothing.
        g.clear_route(PeerRole::Target, 6);
        assert!(agent_rx.try_recv().is_err());
        g.clear_route(PeerRole::Target, 7);
        match agent_rx.try_recv() {
            Ok(Outgoing::Msg(Message::ResyncUnreachable {
                request_id,
                message,
            })) => {
                assert_eq!(request_id, 2);
                assert!(
                    message.contains("g1") && message.contains("disconnected"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(agent_rx.try_recv().is_err(), "only the unanswered one");
        assert!(lock(&g.unanswered).is_empty());
    }

    #[tokio::test]
    async fn an_agent_whose_queue_is_full_still_gets_told() {
        let hub = Hub::default();
        let g = hub.group("g1", 0);
        let (agent_tx, mut agent_rx) = mpsc::channel(1);
        let (t1, _t1_rx) = mpsc::channel(8);
        g.set_route(PeerRole::Target, 7, t1);
        g.route_request(5, vec![5], agent_tx.clone()).await.unwrap();
        // The agent's writer queue is full when the target's session ends.
        agent_tx
            .try_send(Outgoing::Msg(Message::Resync(vec![0])))
            .unwrap();
        g.clear_route(PeerRole::Target, 7);
        assert!(matches!(
            agent_rx.recv().await,
            Some(Outgoing::Msg(Message::Resync(_)))
        ));
        let got = tokio::time::timeout(Duration::from_secs(5), agent_rx.recv()).await;
        assert!(
            matches!(
                got,
                Ok(Some(Outgoing::Msg(Message::ResyncUnreachable {
                    request_id: 5,
                    ..
                })))
            ),
            "{got:?}"
        );
    }

    #[test]
    fn head_never_moves_back() {
        let hub = Hub::default();
        let g = hub.group("g1", 5);
        g.advance_head(3);
        assert_eq!(*g.head.borrow(), 5);
        g.advance_head(9);
        assert_eq!(*g.head.borrow(), 9);
        assert!(Arc::ptr_eq(&g, &hub.group("g1", 0)));
    }
}
