//! The NBD server: listeners, the connection cap, the handshake driver with
//! the STARTTLS upgrade, and orderly shutdown.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::conn::{self, BoxRead, BoxWrite, End, Transmission};
use super::handshake::{self, ExportInfo, Handshake, HandshakeError, Negotiated, Status};
use super::pool::Threads;
use super::proto::{self, Limits};
use super::stats::{NbdStats, OpenGuard};
use super::{NbdConfig, NbdError, NbdExport, NbdListen, TlsMode};
use crate::transport::tls;
use crate::util::shutdown::Shutdown;

/// Longest time from accept to the end of option haggling (TLS included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown, how long in-flight requests may take to be replied to
/// before the remaining connections are cut.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound NBD server, ready to [`run`](NbdServer::run).
pub struct NbdServer {
    ctx: Ctx,
    listeners: Vec<Listener>,
    local: Vec<NbdListen>,
}

/// What is fixed at bind time and shared by connections.
struct Ctx {
    exports: Vec<NbdExport>,
    infos: Arc<[ExportInfo]>,
    tls: TlsMode,
    acceptor: Option<TlsAcceptor>,
    max_request: u32,
    max_connections: usize,
    max_inflight_requests: usize,
    max_inflight_bytes: usize,
    stats: Arc<NbdStats>,
}

/// Per-connection view of [`Ctx`] once the server runs.
struct Shared {
    ctx: Ctx,
    threads: Arc<Threads>,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

/// A Unix socket file this server created; removed when dropped, unless
/// something else has replaced it meanwhile.
struct SocketFile {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.dev_ino
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), "cannot remove NBD socket: {e}");
        }
    }
}

enum Accepted {
    Tcp(TcpStream, String),
    Unix(UnixStream, String),
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("listen", &self.local)
            .field("exports", &self.ctx.exports)
            .field("tls", &self.ctx.tls)
            .finish()
    }
}

fn config_err(msg: impl Into<String>) -> NbdError {
    NbdError::Config(msg.into())
}

fn validate(cfg: &NbdConfig, exports: &[NbdExport]) -> Result<(), NbdError> {
    if cfg.listen.is_empty() {
        return Err(config_err("no listen address"));
    }
    if exports.is_empty() {
        return Err(config_err("no exports"));
    }
    let mut names = HashSet::new();
    for e in exports {
        if e.name.len() > handshake::MAX_STRING || e.name.contains('\0') {
            return Err(config_err(format!(
                "export name {:?} must be at most {} bytes without NUL",
                e.name,
                handshake::MAX_STRING
            )));
        }
        if e.description.len() > handshake::MAX_STRING || e.description.contains('\0') {
            return Err(config_err(format!(
                "description of export {:?} must be at most {} bytes without NUL",
                e.name,
                handshake::MAX_STRING
            )));
        }
        if !names.insert(e.name.as_str()) {
            return Err(config_err(format!("export name {:?} used twice", e.name)));
        }
    }
    let m = cfg.max_request_bytes;
    if !(4096..=proto::MAX_REQUEST_LIMIT).contains(&m) || !m.is_multiple_of(proto::MIN_BLOCK) {
        return Err(config_err(format!(
            "max_request_bytes {m} must be a multiple of {} between 4096 and {}",
            proto::MIN_BLOCK,
            proto::MAX_REQUEST_LIMIT
        )));
    }
    if cfg.max_connections == 0 || cfg.max_inflight_requests == 0 {
        return Err(config_err(
            "max_connections and max_inflight_requests must be at least 1",
        ));
    }
    if cfg.max_inflight_bytes < m as usize {
        return Err(config_err(format!(
            "max_inflight_bytes {} must be at least max_request_bytes {m}",
            cfg.max_inflight_bytes
        )));
    }
    if cfg.tls != TlsMode::Off && cfg.tls_config.is_none() {
        return Err(config_err(format!(
            "TLS mode {:?} needs a TLS server configuration",
            cfg.tls
        )));
    }
    Ok(())
}

fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), NbdError> {
    let bind_err = |source| NbdError::Bind {
        addr: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(NbdError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(NbdError::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing stale NBD socket");
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(bind_err(e)),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    let m = std::fs::symlink_metadata(path).map_err(bind_err)?;
    Ok((
        l,
        SocketFile {
            path: path.to_path_buf(),
            dev_ino: (m.dev(), m.ino()),
        },
    ))
}

impl NbdServer {
    /// Check the configuration and exports and bind every listen address.
    /// Nothing is served until [`run`](NbdServer::run).
    pub async fn bind(cfg: NbdConfig, exports: Vec<NbdExport>) -> Result<NbdServer, NbdError> {
        validate(&cfg, &exports)?;
        let mut listeners = Vec::new();
        let mut local = Vec::new();
        for l in &cfg.listen {
            match l {
                NbdListen::Tcp(addr) => {
                    let bind_err = |source| NbdError::Bind {
                        addr: addr.to_string(),
                        source,
                    };
                    let tl = TcpListener::bind(addr).await.map_err(bind_err)?;
                    local.push(NbdListen::Tcp(tl.local_addr().map_err(bind_err)?));
                    listeners.push(Listener::Tcp(tl));
                }
                NbdListen::Unix(path) => {
                    let (ul, file) = bind_unix(path)?;
                    local.push(NbdListen::Unix(path.clone()));
                    listeners.push(Listener::Unix(ul, file));
                }
            }
        }
        let infos: Arc<[ExportInfo]> = exports
            .iter()
            .map(|e| ExportInfo {
                name: e.name.clone(),
                description: e.description.clone(),
                size: e.disk.size(),
                read_only: e.disk.read_only(),
            })
            .collect();
        let acceptor = match cfg.tls {
            TlsMode::Off => None,
            _ => cfg.tls_config.clone().map(TlsAcceptor::from),
        };
        let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
        for l in &local {
            tracing::info!(listen = %l, exports = ?names, tls = ?cfg.tls, "NBD server bound");
        }
        Ok(NbdServer {
            ctx: Ctx {
                exports,
                infos,
                tls: cfg.tls,
                acceptor,
                max_request: cfg.max_request_bytes,
                max_connections: cfg.max_connections,
                max_inflight_requests: cfg.max_inflight_requests,
                max_inflight_bytes: cfg.max_inflight_bytes,
                stats: Arc::new(NbdStats::default()),
            },
            listeners,
            local,
        })
    }

    /// The addresses actually bound (TCP port 0 resolved), in configuration
    /// order.
    pub fn local_addrs(&self) -> Vec<NbdListen> {
        self.local.clone()
    }

    /// The server's counters (live; take a [`NbdStats::snapshot`]).
    pub fn stats(&self) -> Arc<NbdStats> {
        Arc::clone(&self.ctx.stats)
    }

    /// Serve until `shutdown` fires, then stop accepting, let every
    /// connection finish its in-flight requests (up to 10 s),
    /// close them, remove the Unix socket files, and wait for the I/O threads.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), NbdError> {
        let NbdServer {
            ctx,
            listeners,
            local,
        } = self;
        let threads = Arc::new(Threads::default());
        let shared = Arc::new(Shared {
            ctx,
            threads: Arc::clone(&threads),
        });
        let conns = Arc::new(Semaphore::new(shared.ctx.max_connections));

        let (acc_tx, mut acc_rx) = mpsc::channel::<Accepted>(16);
        let mut accept_tasks = JoinSet::new();
        let mut socket_files = Vec::new();
        for (l, addr) in listeners.into_iter().zip(local.iter().cloned()) {
            let tx = acc_tx.clone();
            let sd = shutdown.clone();
            match l {
                Listener::Tcp(tl) => {
                    accept_tasks.spawn(accept_tcp(tl, addr, tx, sd));
                }
                Listener::Unix(ul, file) => {
                    socket_files.push(file);
                    accept_tasks.spawn(accept_unix(ul, addr, tx, sd));
                }
            }
        }
        drop(acc_tx);

        let mut tasks = JoinSet::new();
        let mut sd = shutdown.clone();
        loop {
            tokio::select! {
                _ = sd.wait() => break,
                a = acc_rx.recv() => {
                    let Some(a) = a else { break };
                    NbdStats::add(&shared.ctx.stats.connections_total, 1);
                    match Arc::clone(&conns).try_acquire_owned() {
                        Ok(permit) => {
                            tasks.spawn(connection(Arc::clone(&shared), a, shutdown.clone(), permit));
                        }
                        Err(_) => {
                            NbdStats::add(&shared.ctx.stats.connections_refused, 1);
                            let peer = match &a { Accepted::Tcp(_, p) | Accepted::Unix(_, p) => p.clone() };
                            tracing::warn!(peer = %peer, max_connections = shared.ctx.max_connections,
                                "NBD connection refused: connection cap reached");
                        }
                    }
                }
                Some(r) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = r && e.is_panic() {
                        tracing::error!("an NBD connection task panicked: {e}");
                    }
                }
            }
        }
        tracing::info!(
            connections = tasks.len(),
            "NBD server shutting down: no new connections"
        );
        while accept_tasks.join_next().await.is_some() {}
        drop(acc_rx);
        drop(socket_files);
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::warn!(
                connections = tasks.len(),
                "NBD connections did not finish within {DRAIN_TIMEOUT:?}; closing them"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        // Every connection is gone. Wait for calls still running on the
        // disks (a connection cut at the deadline may have one), so that no
        // BlockIo call outlives `run`.
        drop(shared);
        let idle = tokio::task::spawn_blocking(move || threads.wait_idle(DRAIN_TIMEOUT)).await;
        if !matches!(idle, Ok(true)) {
            tracing::error!(
                "NBD I/O threads still busy {DRAIN_TIMEOUT:?} after the connections closed; \
                 a disk call is stuck"
            );
        }
        tracing::info!("NBD server stopped");
        Ok(())
    }
}

async fn accept_tcp(l: TcpListener, addr: NbdListen, tx: mpsc::Sender<Accepted>, mut sd: Shutdown) {
    loop {
        let r = tokio::select! {
            _ = sd.wait() => return,
            r = l.accept() => r,
        };
        match r {
            Ok((s, peer)) => {
                if tx.send(Accepted::Tcp(s, peer.to_string())).await.is_err() {
                    return;
                }
            }
            Err(e) => accept_backoff(&addr, e).await,
        }
    }
}

async fn accept_unix(
    l: UnixListener,
    addr: NbdListen,
    tx: mpsc::Sender<Accepted>,
    mut sd: Shutdown,
) {
    loop {
        let r = tokio::select! {
            _ = sd.wait() => return,
            r = l.accept() => r,
        };
        match r {
            Ok((s, _)) => {
                let peer = match s.peer_cred() {
                    Ok(c) => match c.pid() {
                        Some(pid) => format!("{addr} pid {pid} uid {}", c.uid()),
                        None => format!("{addr} uid {}", c.uid()),
                    },
                    Err(_) => addr.to_string(),
                };
                if tx.send(Accepted::Unix(s, peer)).await.is_err() {
                    return;
                }
            }
            Err(e) => accept_backoff(&addr, e).await,
        }
    }
}

/// EMFILE and friends: log and back off instead of spinning.
async fn accept_backoff(addr: &NbdListen, e: std::io::Error) {
    tracing::warn!(listen = %addr, "NBD accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn split_tcp(s: TcpStream) -> (BoxRead, BoxWrite) {
    let (r, w) = s.into_split();
    (Box::new(r), Box::new(w))
}

fn split_unix(s: UnixStream) -> (BoxRead, BoxWrite) {
    let (r, w) = s.into_split();
    (Box::new(r), Box::new(w))
}

async fn connection(
    shared: Arc<Shared>,
    a: Accepted,
    shutdown: Shutdown,
    _permit: OwnedSemaphorePermit,
) {
    let _open = OpenGuard::new(&shared.ctx.stats);
    match a {
        Accepted::Tcp(s, peer) => {
            // The spec: both sides SHOULD disable Nagle. Keepalive as on the
            // replication sessions: a client whose host vanished while idle
            // would otherwise hold its connection slot for ever.
            crate::transport::tcp::configure(&s);
            handle(&shared, s, peer, split_tcp, shutdown).await;
        }
        Accepted::Unix(s, peer) => handle(&shared, s, peer, split_unix, shutdown).await,
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeFailure {
    #[error("{0}")]
    Protocol(#[from] HandshakeError),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("socket error during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("STARTTLS requested but no TLS configuration")]
    NoTls,
}

/// Where a handshake ended, short of a failure.
enum Step {
    StartTls,
    Ready(Negotiated),
    Aborted,
}

/// Pump bytes between `s` and the handshake until it needs the server to act.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    hs: &mut Handshake,
    peer: &str,
) -> Result<Step, HandshakeFailure> {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            s.write_all(&out).await?;
            s.flush().await?;
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(HandshakeFailure::Closed);
        }
        let status = hs.feed(&buf[..n]);
        log_refusals(hs, peer);
        let out = hs.take_output();
        if !out.is_empty() {
            // On an error this is best effort: replies to earlier options.
            let w = async {
                s.write_all(&out).await?;
                s.flush().await
            };
            match (&status, w.await) {
                (Err(_), _) => {}
                (Ok(_), Err(e)) => return Err(e.into()),
                (Ok(_), Ok(())) => {}
            }
        }
        match status? {
            Status::NeedMore => {}
            Status::StartTls => return Ok(Step::StartTls),
            Status::Ready(n) => return Ok(Step::Ready(n)),
            Status::Aborted => return Ok(Step::Aborted),
        }
    }
}

/// Log the options the handshake refused: at debug level what every client
/// tries and falls back from (structured replies, metadata contexts, extended
/// headers, STARTTLS without TLS), at warn level the rest.
fn log_refusals(hs: &mut Handshake, peer: &str) {
    for r in hs.take_refusals() {
        let option = handshake::option_name(r.option);
        let routine = r.reply == proto::REP_ERR_UNSUP
            && matches!(
                r.option,
                proto::OPT_STRUCTURED_REPLY
                    | proto::OPT_LIST_META_CONTEXT
                    | proto::OPT_SET_META_CONTEXT
                    | proto::OPT_EXTENDED_HEADERS
                    | proto::OPT_STARTTLS
            );
        if routine {
            tracing::debug!(peer = %peer, option, "NBD option not supported: {}", r.message);
        } else {
            tracing::warn!(
                peer = %peer, option, option_number = r.option,
                reply = format_args!("{:#010x}", r.reply),
                "NBD option refused: {}", r.message
            );
        }
    }
}

/// The negotiated session: its halves, what was chosen, and the TLS peer.
type Session = (BoxRead, BoxWrite, Negotiated, Option<String>);

async fn negotiate<S>(
    shared: &Shared,
    mut s: S,
    hs: &mut Handshake,
    split: fn(S) -> (BoxRead, BoxWrite),
    peer: &str,
) -> Result<Option<Session>, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match drive(&mut s, hs, peer).await? {
        Step::Ready(n) => {
            let (r, w) = split(s);
            Ok(Some((r, w, n, None)))
        }
        Step::Aborted => {
            let _ = s.shutdown().await;
            Ok(None)
        }
        Step::StartTls => {
            let acceptor = shared
                .ctx
                .acceptor
                .as_ref()
                .ok_or(HandshakeFailure::NoTls)?;
            let mut t = acceptor.accept(s).await.map_err(HandshakeFailure::Tls)?;
            let who = tls::peer_cert(t.get_ref().1)
                .map_or_else(|| "no certificate".to_string(), |c| c.describe());
            hs.tls_started();
            match drive(&mut t, hs, peer).await? {
                Step::Ready(n) => {
                    let (r, w) = tokio::io::split(t);
                    Ok(Some((Box::new(r), Box::new(w), n, Some(who))))
                }
                Step::Aborted => {
                    let _ = t.shutdown().await;
                    Ok(None)
                }
                // The handshake answers a second STARTTLS with ERR_INVALID.
                Step::StartTls => Err(HandshakeError::Finished.into()),
            }
        }
    }
}

async fn handle<S>(
    shared: &Shared,
    s: S,
    peer: String,
    split: fn(S) -> (BoxRead, BoxWrite),
    mut shutdown: Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = &shared.ctx;
    let mut hs = Handshake::new(Arc::clone(&ctx.infos), ctx.tls, ctx.max_request);
    let r = tokio::select! {
        _ = shutdown.wait() => {
            tracing::debug!(peer = %peer, "NBD handshake cut short by shutdown");
            return;
        }
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(shared, s, &mut hs, split, &peer)) => r,
    };
    let (rd, wr, n, tls_peer) = match r {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => {
            tracing::debug!(peer = %peer, "NBD client aborted the handshake");
            return;
        }
        Ok(Err(HandshakeFailure::Closed)) => {
            // Probes (and clients giving up) close without a word.
            tracing::debug!(peer = %peer, "NBD client closed the connection during the handshake");
            return;
        }
        Ok(Err(e)) => {
            NbdStats::add(&ctx.stats.handshake_failures, 1);
            tracing::warn!(peer = %peer, "NBD handshake failed: {e}");
            return;
        }
        Err(_) => {
            NbdStats::add(&ctx.stats.handshake_failures, 1);
            tracing::warn!(peer = %peer, "NBD handshake timed out after {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let export = &ctx.exports[n.export];
    tracing::info!(
        peer = %peer,
        export = %export.name,
        flags = format_args!("{:#06x}", n.flags),
        tls = tls_peer.as_deref().unwrap_or("off"),
        via = if n.via == proto::OPT_GO { "NBD_OPT_GO" } else { "NBD_OPT_EXPORT_NAME" },
        "NBD client connected"
    );
    let t = Transmission {
        peer: peer.clone(),
        export: export.name.clone(),
        disk: Arc::clone(&export.disk),
        limits: Limits {
            size: ctx.infos[n.export].size,
            max_request: ctx.max_request,
            read_only: ctx.infos[n.export].read_only,
        },
        max_inflight_requests: ctx.max_inflight_requests,
        max_inflight_bytes: ctx.max_inflight_bytes,
        stats: Arc::clone(&ctx.stats),
        threads: Arc::clone(&shared.threads),
        shutdown,
    };
    let end = conn::serve(t, rd, wr, hs.take_leftover()).await;
    let name = &export.name;
    match end {
        End::Disconnect => {
            tracing::info!(peer = %peer, export = %name, "NBD client disconnected")
        }
        End::Closed => tracing::info!(
            peer = %peer, export = %name,
            "NBD client closed the connection without NBD_CMD_DISC"
        ),
        End::Shutdown => {
            tracing::info!(peer = %peer, export = %name, "NBD connection closed for shutdown")
        }
        End::Protocol(why) => {
            NbdStats::add(&ctx.stats.protocol_errors, 1);
            tracing::warn!(peer = %peer, export = %name, "NBD protocol violation: {why}");
        }
        End::Truncated(why) => {
            NbdStats::add(&ctx.stats.protocol_errors, 1);
            tracing::warn!(peer = %peer, export = %name, "NBD client went away mid-request: {why}");
        }
        End::Io(e) => {
            tracing::warn!(peer = %peer, export = %name, "NBD connection read failed: {e}")
        }
        End::WriterFailed(e) => tracing::info!(
            peer = %peer, export = %name,
            "NBD connection closed: replies could not be sent ({})",
            e.map_or_else(|| "writer stopped".to_string(), |e| e.to_string())
        ),
    }
}
