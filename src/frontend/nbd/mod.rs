//! The NBD frontend: a fixed-newstyle NBD server over TCP or a Unix socket,
//! optionally with TLS, serving protected disks as exports.
//!
//! Layers, from the wire inwards:
//!
//! - [`proto`]: constants, the request parser, the simple-reply encoder and
//!   request validation; pure functions of bytes.
//! - [`handshake`]: option haggling as a state machine fed with bytes.
//! - `server`: listeners (TCP and Unix), the connection cap, the handshake
//!   driver with the optional STARTTLS upgrade, shutdown.
//! - `conn`: one connection's transmission phase: a reader that parses and
//!   checks requests and reads write payloads straight into the buffer handed
//!   to [`BlockIo`], the connection's I/O threads (`pool`) that make the
//!   blocking calls, and a writer that sends replies in completion order,
//!   batched.
//!
//! Every request is mapped onto the export's [`BlockIo`], the one I/O path of
//! a protected disk. See `docs/NBD.md` for what is supported and refused.
//!
//! ## Why `NBD_FLAG_CAN_MULTI_CONN` is advertised
//!
//! The flag promises that a FLUSH (or FUA) on one connection makes every write
//! that was *replied to* on any connection durable. It holds here because: a
//! write is replied to only after [`BlockIo::write_at`] returned, i.e. after it
//! reached the backing disk's page cache (and capture), which is one cache
//! shared by all connections and exports of the disk; the server keeps no
//! per-connection write cache; and FLUSH is [`BlockIo::flush`], an `fdatasync`
//! of the backing disk, which covers everything in that cache. Keep it true:
//! never acknowledge a write before `write_at` returns, and never buffer writes
//! per connection.

pub mod handshake;
pub mod proto;

mod conn;
mod pool;
mod server;
mod stats;

#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
#[cfg(test)]
mod tls_tests;
#[cfg(test)]
mod tool_tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Classify, ErrorKind};
use crate::frontend::BlockIo;

pub use server::NbdServer;
pub use stats::{NbdStats, NbdStatsSnapshot};

/// One export: a name clients ask for and the disk behind it.
#[derive(Clone)]
pub struct NbdExport {
    /// Export name (at most 4096 bytes, no NUL). The empty name `""` asked by
    /// a client means the first export.
    pub name: String,
    /// Description shown by `nbdinfo` and `NBD_OPT_LIST` (may be empty).
    pub description: String,
    /// The disk; writes go through it, and its `read_only` sets the flag.
    pub disk: Arc<dyn BlockIo>,
}

impl fmt::Debug for NbdExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdExport")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.disk.size())
            .field("read_only", &self.disk.read_only())
            .finish()
    }
}

/// An address to listen on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdListen {
    /// A TCP address (port 0 picks a free port; see [`NbdServer::local_addrs`]).
    Tcp(SocketAddr),
    /// A Unix socket path. A stale socket file there is removed at bind (a
    /// live one is an error); the file is removed again at shutdown.
    Unix(PathBuf),
}

impl NbdListen {
    /// The NBD URI of `export` at this address (`nbd://127.0.0.1:10809/name`,
    /// `nbd+unix:///name?socket=/run/x.sock`), as nbdinfo, qemu and fio take it.
    /// With TLS, use the `nbds` / `nbds+unix` schemes instead.
    pub fn uri(&self, export: &str) -> String {
        match self {
            NbdListen::Tcp(a) => format!("nbd://{a}/{export}"),
            NbdListen::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
        }
    }
}

impl fmt::Display for NbdListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdListen::Tcp(a) => write!(f, "{a}"),
            NbdListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Whether and how TLS is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP`.
    #[default]
    Off,
    /// `NBD_OPT_STARTTLS` is accepted; plaintext sessions are served too.
    Optional,
    /// Before `NBD_OPT_STARTTLS`, every option but `STARTTLS` and `ABORT` gets
    /// `NBD_REP_ERR_TLS_REQD` (and `NBD_OPT_EXPORT_NAME` disconnects).
    Required,
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Addresses to listen on (at least one).
    pub listen: Vec<NbdListen>,
    /// TLS mode; `Optional` and `Required` need `tls_config`.
    pub tls: TlsMode,
    /// The TLS server configuration, e.g. from
    /// [`crate::transport::tls::nbd_server_config`] (mutual TLS with the
    /// project CA).
    pub tls_config: Option<Arc<rustls::ServerConfig>>,
    /// Largest READ/WRITE length, advertised as the maximum block size: a
    /// multiple of 512 between 4096 and [`proto::MAX_REQUEST_LIMIT`]. Default
    /// 32 MiB.
    pub max_request_bytes: u32,
    /// Connections served at once; one more is accepted and closed at once,
    /// with a log line. Default 64.
    pub max_connections: usize,
    /// Requests in flight per connection; when reached the server stops
    /// reading from that socket until replies drain. Default 128.
    pub max_inflight_requests: usize,
    /// Bytes of READ/WRITE data in flight per connection (at least
    /// `max_request_bytes`). Default 64 MiB.
    pub max_inflight_bytes: usize,
}

impl NbdConfig {
    /// Defaults (no TLS, 32 MiB requests, 64 connections, 128 requests and
    /// 64 MiB in flight per connection) on `listen`.
    pub fn new(listen: Vec<NbdListen>) -> Self {
        NbdConfig {
            listen,
            tls: TlsMode::Off,
            tls_config: None,
            max_request_bytes: proto::DEFAULT_MAX_REQUEST,
            max_connections: 64,
            max_inflight_requests: 128,
            max_inflight_bytes: 64 << 20,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The configuration or the exports are not acceptable.
    #[error("invalid NBD server configuration: {0}")]
    Config(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Another server answers on this Unix socket.
    #[error("{}: another server is listening on this socket", .path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The Unix socket path exists and is not a socket; it is left alone.
    #[error("{}: exists and is not a socket; refusing to replace it", .path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
}

impl Classify for NbdError {
    fn kind(&self) -> ErrorKind {
        match self {
            NbdError::Config(_)
            | NbdError::Bind { .. }
            | NbdError::SocketInUse { .. }
            | NbdError::NotASocket { .. } => ErrorKind::Config,
        }
    }
}

impl Classify for handshake::HandshakeError {
    fn kind(&self) -> ErrorKind {
        match self {
            handshake::HandshakeError::TlsRequired => ErrorKind::Auth,
            _ => ErrorKind::Peer,
        }
    }
}

impl Classify for proto::BadMagic {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Peer
    }
}
