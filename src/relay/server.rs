//! The relay process: listener, TLS, hello checks, and the status snapshot.
//!
//! Every connection is mutual TLS; the first message must be a hello whose role,
//! name and group the peer's certificate vouches for. An agent session then
//! appends frames to the spool ([`super::session::run_agent`]); a target session is
//! forwarded frames from it ([`super::session::run_target`]). A refusal is one error
//! message to the peer and one log line here; the relay keeps serving everyone
//! else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::hub::{GroupCountersView, Hub};
use crate::config::RelayConfig;
use crate::error::{Classify, ErrorKind};
use crate::spool::{Spool, SpoolError, SpoolOptions};
use crate::target::gate::ChainPos;
use crate::transport::conn::{Outgoing, spawn_reader, spawn_writer};
use crate::transport::tls::{self, Role, TlsError};
use crate::transport::wire::{Message, PROTOCOL_VERSION, PeerRole, WireError, WireErrorKind};
use crate::util::shutdown::Shutdown;
use crate::util::statusfile::{self, STATUS_FILE, STATUS_INTERVAL};

/// Longest time a TLS handshake plus hello may take.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// Bytes of frames held in memory while their spool append is pending, across
/// all agent sessions (the relay's peak RSS bar is 256 MiB).
pub const APPEND_MEMORY: usize = 64 << 20;

/// Why the relay could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// TLS files unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A blocking task failed to run.
    #[error("relay internal task failed: {0}")]
    Task(String),
}

impl Classify for RelayError {
    fn kind(&self) -> ErrorKind {
        match self {
            RelayError::Tls(e) => e.kind(),
            RelayError::Spool(e) => e.kind(),
            RelayError::Bind { .. } => ErrorKind::Config,
            RelayError::Task(_) => ErrorKind::Io,
        }
    }
}

/// What every session of the relay shares.
pub(crate) struct Shared {
    pub spool: Spool,
    pub hub: Hub,
    pub spool_max_bytes: u64,
    pub append_memory: Arc<Semaphore>,
    pub shutdown: Shutdown,
    pub refused_sessions: AtomicU64,
}

/// The relay's status snapshot (`<spool_dir>/status.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Always "relay".
    pub role: String,
    /// Instance name.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// The address actually listened on (useful with port 0).
    pub listen: SocketAddr,
    /// Bytes of all spool segment files.
    pub spool_bytes: u64,
    /// Untrimmed frames in the spool.
    pub spool_frames: u64,
    /// Spool size above which agents are throttled.
    pub spool_max_bytes: u64,
    /// Bytes of recent frames held in memory for forwarding.
    pub hot_cache_bytes: u64,
    /// The spool writes and reads with O_DIRECT (else through the page cache).
    pub spool_direct_io: bool,
    /// Sessions refused (authentication, protocol) since start.
    pub refused_sessions: u64,
    /// Per group.
    pub groups: Vec<RelayGroupStatus>,
}

/// One group in [`RelayStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayGroupStatus {
    /// Group name.
    pub name: String,
    /// Last durable frame in the spool.
    pub head: Option<ChainPos>,
    /// Frames trimmed (acknowledged by the target) through this number.
    pub trimmed_through: u64,
    /// Untrimmed frames.
    pub frames: u64,
    /// Bytes of the group's segments.
    pub bytes: u64,
    /// Session counters.
    pub counters: GroupCountersView,
    /// The last refusal the target reported.
    pub last_target_error: Option<String>,
    /// The last refusal sent to the agent.
    pub last_agent_error: Option<String>,
    /// Frame read → durable in the spool, µs (what the agent's ack waits for).
    pub append_latency_us: crate::util::hist::Summary,
}

fn status(shared: &Shared, name: &str, listen: SocketAddr) -> RelayStatus {
    let spool = &shared.spool;
    let mut names = spool.groups();
    for g in shared.hub.all() {
        if !names.contains(&g.name) {
            names.push(g.name.clone());
        }
    }
    names.sort();
    let groups = names
        .into_iter()
        .map(|n| {
            let st = spool.stats(&n);
            let hub = shared.hub.group(&n, 0);
            let lock_str = |m: &std::sync::Mutex<Option<String>>| {
                m.lock().unwrap_or_else(|e| e.into_inner()).clone()
            };
            RelayGroupStatus {
                head: st.as_ref().and_then(|s| s.head).map(|h| ChainPos {
                    frame_no: h.frame_no,
                    last_seq: h.last_seq,
                }),
                trimmed_through: st.as_ref().map_or(0, |s| s.trimmed_through),
                frames: st.as_ref().map_or(0, |s| s.frames),
                bytes: st.as_ref().map_or(0, |s| s.bytes),
                counters: hub.counters.view(),
                last_target_error: lock_str(&hub.last_target_error),
                last_agent_error: lock_str(&hub.last_agent_error),
                append_latency_us: hub
                    .append_latency
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .summary(),
                name: n,
            }
        })
        .collect();
    RelayStatus {
        role: "relay".into(),
        name: name.to_string(),
        pid: std::process::id(),
        listen,
        spool_bytes: spool.total_bytes(),
        spool_frames: spool.total_frames(),
        spool_max_bytes: shared.spool_max_bytes,
        hot_cache_bytes: shared.hub.cache_bytes() as u64,
        spool_direct_io: spool.direct_io(),
        refused_sessions: shared.refused_sessions.load(Ordering::Relaxed),
        groups,
    }
}

/// Run the relay until `shutdown` fires: recover the spool, listen, serve.
pub async fn run(cfg: RelayConfig, shutdown: Shutdown) -> Result<(), RelayError> {
    let acceptor = TlsAcceptor::from(tls::server_config(&cfg.tls.files())?);
    let mut opts = SpoolOptions::new(&cfg.relay.spool_dir);
    opts.segment_bytes = cfg.relay.spool_segment_bytes();
    opts.direct_io = cfg.relay.spool_direct_io;
    opts.recycle_segments = cfg.relay.spool_recycle_segments;
    // One group commit may take everything that can be waiting: an fdatasync
    // then covers all queued frames instead of leaving some for the next one.
    opts.max_batch_bytes = APPEND_MEMORY;
    let (spool, report) = tokio::task::spawn_blocking(move || Spool::open(opts))
        .await
        .map_err(|e| RelayError::Task(e.to_string()))??;
    for g in &report.groups {
        tracing::info!(
            group = %g.group,
            frames = g.frames,
            bytes = g.bytes,
            head = g.head.map_or(0, |h| h.frame_no),
            trimmed_through = g.trimmed_through,
            torn_tails = g.torn_tails.len(),
            problems = g.problems.len(),
            "spool group recovered"
        );
        for t in &g.torn_tails {
            tracing::warn!(group = %g.group, file = %t.file.display(), offset = t.offset, bytes_cut = t.bytes_cut, why = %t.why, "cut a torn tail");
        }
    }
    let listener = TcpListener::bind(cfg.relay.listen)
        .await
        .map_err(|source| RelayError::Bind {
            addr: cfg.relay.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| RelayError::Bind {
        addr: cfg.relay.listen,
        source,
    })?;
    tracing::info!(name = %cfg.relay.name, listen = %local, spool = %cfg.relay.spool_dir.display(), "relay listening");

    let hub = Hub::default();
    for g in spool.groups() {
        hub.group(&g, spool.head(&g).map_or(0, |h| h.frame_no));
    }
    let shared = Arc::new(Shared {
        spool,
        hub,
        spool_max_bytes: cfg.relay.spool_max_bytes(),
        append_memory: Arc::new(Semaphore::new(APPEND_MEMORY)),
        shutdown: shutdown.clone(),
        refused_sessions: AtomicU64::new(0),
    });
    let status_path: PathBuf = cfg.relay.spool_dir.join(STATUS_FILE);
    let write_status = {
        let shared = shared.clone();
        let name = cfg.relay.name.clone();
        let path = status_path.clone();
        move || {
            if let Err(e) = statusfile::write_json(&path, &status(&shared, &name, local)) {
                tracing::warn!(path = %path.display(), "cannot write status: {e}");
            }
        }
    };
    write_status();
    let status_task = {
        let write_status = write_status.clone();
        let mut sd = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATUS_INTERVAL);
            loop {
                tokio::select! {
                    _ = sd.wait() => break,
                    _ = tick.tick() => {
                        let w = write_status.clone();
                        let _ = tokio::task::spawn_blocking(w).await;
                    }
                }
            }
        })
    };

    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = tokio::task::JoinSet::new();
    let mut sd = shutdown.clone();
    loop {
        let permit = tokio::select! {
            _ = sd.wait() => break,
            p = conns.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = sd.wait() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tasks.spawn(async move {
            handle_connection(shared, acceptor, tcp, peer).await;
            drop(permit);
        });
        // Reap finished connection tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }
    tracing::info!("relay shutting down");
    shared.hub.stop_all();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("sessions did not end within 10 s; aborting them");
        tasks.abort_all();
    }
    let _ = status_task.await;
    let spool = shared.spool.clone();
    tokio::task::spawn_blocking(move || spool.shutdown())
        .await
        .map_err(|e| RelayError::Task(e.to_string()))?;
    write_status();
    tracing::info!("relay stopped");
    Ok(())
}

/// A session's peer, for logs.
pub(crate) fn describe(peer: SocketAddr, ident: &str) -> String {
    format!("{ident} from {peer}")
}

async fn handle_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    crate::transport::tcp::configure(&tcp);
    let tls = match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.refused_sessions.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let cert = {
        let conn = tls.get_ref().1;
        if let Err(e) = tls::check_alpn(conn) {
            tracing::warn!(%peer, "{e}");
            return;
        }
        match tls::peer_cert_server(conn) {
            Some(c) => c,
            None => {
                tracing::warn!(%peer, "peer presented no certificate");
                return;
            }
        }
    };
    let ident = cert.describe();
    let (r, w) = tokio::io::split(tls);
    // Shallow queues: frames are large, and the spool and the window bound the rest.
    let (mut rx, reader) = spawn_reader(r, 2);
    let (tx, writer) = spawn_writer(w, 16);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, rx.recv()).await {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => {
            tracing::warn!(%peer, %ident, "no hello: {e}");
            reader.abort();
            return;
        }
        Ok(None) => return,
        Err(_) => {
            tracing::warn!(%peer, %ident, "no hello within {HELLO_TIMEOUT:?}");
            reader.abort();
            return;
        }
    };
    let refuse = |kind: WireErrorKind, message: String| {
        let tx = tx.clone();
        let shared = shared.clone();
        async move {
            shared.refused_sessions.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "session refused: {message}");
            let _ = tx
                .send(Outgoing::Msg(Message::Error {
                    kind,
                    frame_no: 0,
                    message,
                }))
                .await;
        }
    };
    let Message::Hello {
        version,
        role,
        name,
        group,
        applied_frame_no,
        applied_last_seq,
    } = hello
    else {
        refuse(
            WireErrorKind::Peer,
            format!(
                "{ident}: expected a hello, got a {} message",
                crate::transport::client::message_name(&hello)
            ),
        )
        .await;
        finish(tx, writer, reader).await;
        return;
    };
    if version != PROTOCOL_VERSION {
        refuse(
            WireErrorKind::Peer,
            format!("{ident}: protocol version {version} is not supported (this relay speaks {PROTOCOL_VERSION})"),
        )
        .await;
        finish(tx, writer, reader).await;
        return;
    }
    let tls_role = match role {
        PeerRole::Agent => Role::Agent,
        PeerRole::Target => Role::Target,
    };
    let authz = crate::spool::record::validate_group(&group)
        .map_err(|why| format!("invalid group name {group:?}: {why}"))
        .and_then(|()| cert.check_name(tls_role, &name).map_err(|e| e.to_string()))
        .and_then(|()| cert.check_group(&group).map_err(|e| e.to_string()));
    if let Err(why) = authz {
        let hub = shared.hub.group(&group, 0);
        if role == PeerRole::Agent && crate::spool::record::validate_group(&group).is_ok() {
            *hub.last_agent_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
        }
        refuse(
            WireErrorKind::Auth,
            format!("{ident} may not open a {tls_role} session for group {group}: {why}"),
        )
        .await;
        finish(tx, writer, reader).await;
        return;
    }
    let who = describe(peer, &ident);
    let head = shared.spool.head(&group).map_or(0, |h| h.frame_no);
    let hub = shared.hub.group(&group, head);
    tracing::info!(group = %group, peer = %who, role = %tls_role, "session opened");
    let result = match role {
        PeerRole::Agent => super::session::run_agent(&shared, &hub, &who, &mut rx, &tx).await,
        PeerRole::Target => {
            let applied = ChainPos {
                frame_no: applied_frame_no,
                last_seq: applied_last_seq,
            };
            super::session::run_target(&shared, &hub, &who, applied, &mut rx, &tx).await
        }
    };
    match result {
        Ok(()) => tracing::info!(group = %group, peer = %who, "session ended"),
        Err(e) => tracing::warn!(group = %group, peer = %who, "session ended: {e}"),
    }
    finish(tx, writer, reader).await;
}

/// Let the writer send what is queued (a refusal, last acks), then close.
async fn finish(
    tx: tokio::sync::mpsc::Sender<Outgoing>,
    writer: tokio::task::JoinHandle<Result<(), WireError>>,
    reader: tokio::task::JoinHandle<()>,
) {
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    reader.abort();
}
