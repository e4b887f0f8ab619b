//! Per-group meeting point of the relay's sessions: who is connected, the
//! spool head that wakes the target's forwarder, and counters for status.
//!
//! At most one agent session and one target session serve a group at a time. A
//! new session for the same group and role supersedes the old one (typically a
//! half-open connection the peer already gave up on): the old one is told to stop
//! and the new one waits, bounded, for it to end before it welcomes its peer, so
//! two sessions never append or forward for one group concurrently.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::transport::wire::PeerRole;

/// How long a superseding session waits for the one it replaces to end.
pub const SUPERSEDE_WAIT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Slot = Option<(watch::Sender<bool>, oneshot::Receiver<()>)>;

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
    agent: Mutex<Slot>,
    target: Mutex<Slot>,
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
#[derive(Debug, Default)]
pub struct Hub {
    groups: Mutex<HashMap<String, Arc<GroupHub>>>,
}

impl Hub {
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
                    agent: Mutex::new(None),
                    target: Mutex::new(None),
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
