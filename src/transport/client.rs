//! The client side of a session (agent → relay, target → relay): TCP connect,
//! mutual TLS, the relay's identity check, hello and welcome. What happens after
//! the welcome is the role's business; this module only opens the session and
//! classifies why opening failed, so the caller knows whether to retry.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls::{self, Role, TlsError};
use super::wire::{self, Message, PROTOCOL_VERSION, WireError, WireErrorKind};
use crate::error::{Classify, ErrorKind};
use crate::target::gate::ChainPos;

/// A TLS stream to the relay.
pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// Longest time a connect, handshake or welcome may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the relay is and how to authenticate to it.
#[derive(Clone)]
pub struct RelayEndpoint {
    /// `host:port`.
    pub addr: String,
    /// Name the relay's certificate must carry.
    pub server_name: String,
    /// Our client configuration (CA, certificate, key).
    pub tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for RelayEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayEndpoint")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed (relay down, unreachable).
    #[error("cannot connect to relay {addr}: {source}")]
    Connect {
        /// Relay address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The TLS handshake failed or the relay rejected our certificate.
    #[error("TLS with relay {addr} failed: {source}")]
    Handshake {
        /// Relay address.
        addr: String,
        /// Cause (a rustls error inside an io::Error).
        source: std::io::Error,
    },
    /// The relay's certificate is not a relay's, or our configuration is bad.
    #[error("relay {addr}: {source}")]
    Tls {
        /// Relay address.
        addr: String,
        /// Cause.
        source: TlsError,
    },
    /// The relay refused the session (hello).
    #[error("relay {addr} refused the session ({kind:?}): {message}")]
    Refused {
        /// Relay address.
        addr: String,
        /// Its classification.
        kind: WireErrorKind,
        /// Its reason.
        message: String,
    },
    /// The connection failed or the relay answered nonsense.
    #[error("relay {addr}: {source}")]
    Wire {
        /// Relay address.
        addr: String,
        /// Cause.
        source: WireError,
    },
    /// The relay answered the hello with something other than a welcome.
    #[error("relay {addr} answered the hello with {what}")]
    Unexpected {
        /// Relay address.
        addr: String,
        /// What came instead.
        what: String,
    },
    /// No answer in time.
    #[error("relay {addr}: no welcome within {CONNECT_TIMEOUT:?}")]
    Timeout {
        /// Relay address.
        addr: String,
    },
}

/// True when an I/O error carries a TLS alert or certificate error that means
/// the peer (or we) refused the other's identity: retrying will not help.
pub fn is_auth_failure(e: &std::io::Error) -> bool {
    use rustls::AlertDescription as A;
    let Some(inner) = e.get_ref() else {
        return false;
    };
    match inner.downcast_ref::<rustls::Error>() {
        Some(rustls::Error::InvalidCertificate(_))
        | Some(rustls::Error::NoCertificatesPresented) => true,
        Some(rustls::Error::AlertReceived(a)) => matches!(
            a,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
                // A certificate whose signature does not verify (e.g. issued by
                // another CA with the same name) is answered with decrypt_error.
                | A::DecryptError
        ),
        _ => false,
    }
}

impl Classify for ConnectError {
    fn kind(&self) -> ErrorKind {
        match self {
            ConnectError::Connect { .. } | ConnectError::Timeout { .. } => ErrorKind::Io,
            ConnectError::Handshake { source, .. } => {
                if is_auth_failure(source) {
                    ErrorKind::Auth
                } else {
                    ErrorKind::Peer
                }
            }
            ConnectError::Tls { source, .. } => source.kind(),
            ConnectError::Refused { kind, .. } => kind.kind(),
            ConnectError::Wire { source, .. } => match source {
                WireError::Io(io) if is_auth_failure(io) => ErrorKind::Auth,
                other => other.kind(),
            },
            ConnectError::Unexpected { .. } => ErrorKind::Peer,
        }
    }
}

/// What the relay said when it opened the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The relay's protocol version.
    pub version: u16,
    /// The group's last durable frame at the relay (agents resume after it).
    pub head: ChainPos,
}

/// The hello a client sends.
#[derive(Debug, Clone)]
pub struct Hello {
    /// Agent or target.
    pub role: wire::PeerRole,
    /// Our instance name.
    pub name: String,
    /// The group of this session.
    pub group: String,
    /// Target only: how far the group is durably applied.
    pub applied: ChainPos,
}

/// Connect, handshake, check that the peer is a relay, send the hello and wait
/// for the welcome.
pub async fn open_session(
    ep: &RelayEndpoint,
    hello: &Hello,
) -> Result<(Stream, Welcome), ConnectError> {
    let addr = ep.addr.clone();
    match tokio::time::timeout(CONNECT_TIMEOUT, open_inner(ep, hello)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout { addr }),
    }
}

async fn open_inner(ep: &RelayEndpoint, hello: &Hello) -> Result<(Stream, Welcome), ConnectError> {
    let addr = ep.addr.clone();
    let tcp = TcpStream::connect(&ep.addr)
        .await
        .map_err(|source| ConnectError::Connect {
            addr: addr.clone(),
            source,
        })?;
    super::tcp::configure(&tcp);
    let sn = tls::server_name(&ep.server_name).map_err(|source| ConnectError::Tls {
        addr: addr.clone(),
        source,
    })?;
    let mut s = TlsConnector::from(ep.tls.clone())
        .connect(sn, tcp)
        .await
        .map_err(|source| ConnectError::Handshake {
            addr: addr.clone(),
            source,
        })?;
    let tls_err = |source| ConnectError::Tls {
        addr: addr.clone(),
        source,
    };
    {
        let conn = s.get_ref().1;
        tls::check_alpn(conn).map_err(tls_err)?;
        let peer = tls::peer_cert_client(conn)
            .ok_or(TlsError::NoPeerCert)
            .map_err(tls_err)?;
        peer.check_role(Role::Relay).map_err(tls_err)?;
    }
    // With TLS 1.3 a client learns that the relay rejected its certificate only
    // when it next reads or writes: report that as the TLS failure it is.
    let wire_err = |source| match source {
        WireError::Io(io) if is_auth_failure(&io) => ConnectError::Handshake {
            addr: addr.clone(),
            source: io,
        },
        source => ConnectError::Wire {
            addr: addr.clone(),
            source,
        },
    };
    let msg = Message::Hello {
        version: PROTOCOL_VERSION,
        role: hello.role,
        name: hello.name.clone(),
        group: hello.group.clone(),
        applied_frame_no: hello.applied.frame_no,
        applied_last_seq: hello.applied.last_seq,
    };
    wire::write_message(&mut s, &msg).await.map_err(wire_err)?;
    match wire::read_message(&mut s).await.map_err(wire_err)? {
        Message::Welcome {
            version,
            head_frame_no,
            head_last_seq,
        } => Ok((
            s,
            Welcome {
                version,
                head: ChainPos {
                    frame_no: head_frame_no,
                    last_seq: head_last_seq,
                },
            },
        )),
        Message::Error { kind, message, .. } => Err(ConnectError::Refused {
            addr,
            kind,
            message,
        }),
        other => Err(ConnectError::Unexpected {
            addr,
            what: message_name(&other).to_string(),
        }),
    }
}

/// A message's type name, for errors and logs.
pub fn message_name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "hello",
        Message::Welcome { .. } => "welcome",
        Message::Frame(_) => "frame",
        Message::Ack { .. } => "ack",
        Message::Error { .. } => "error",
        Message::Throttle { .. } => "throttle",
        Message::Resync(_) => "resync",
        Message::ResyncUnreachable { .. } => "resync-unreachable",
    }
}

/// Exponential back-off for reconnects: 1, 2, 4, 8 … s up to a cap; reset after
/// a session that worked.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    cap: Duration,
}

impl Backoff {
    /// Starting at `first`, doubling up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            next: first,
            first,
            cap,
        }
    }

    /// The delay before the next attempt (and double it for the one after).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }

    /// Start over at the first delay.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

impl Default for Backoff {
    /// 1 s doubling up to 30 s.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let d: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay().as_secs(), 1);
    }

    #[test]
    fn auth_failures_are_recognised() {
        let alert = std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA,
        ));
        assert!(is_auth_failure(&alert));
        assert!(!is_auth_failure(&std::io::Error::other("reset")));
        let e = ConnectError::Handshake {
            addr: "x".into(),
            source: alert,
        };
        assert_eq!(e.kind(), ErrorKind::Auth);
    }
}
