//! Mutual TLS for every hop: agent → relay, target → relay.
//!
//! TLS 1.3 only, the *ring* provider, ALPN `tidemark/1`, and certificates from
//! the project CA that `tidemark init` creates ([`crate::pki`]). Both sides
//! present a certificate: the server requires a client certificate signed by
//! the CA, the client checks the server's certificate against the CA and the
//! relay's name.
//!
//! Identity and authorization live in the leaf certificates' DNS subject
//! alternative names (see [`role_san`], [`name_san`], [`group_san`]). Once rustls
//! has verified the chain, [`PeerCert`] asks webpki whether the certificate is
//! "valid for" such a name, which is exactly a SAN membership test; no X.509
//! parser is needed. Session resumption is disabled so every connection carries
//! the peer's full, freshly verified certificate.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig};

use crate::error::{Classify, ErrorKind};

/// The one application protocol spoken over these connections.
pub const ALPN: &[u8] = b"tidemark/1";

/// DNS suffix of every identity name in a certificate.
pub const SAN_SUFFIX: &str = "tidemark";

/// A TLS setup or peer authorization failure.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not the PEM expected.
    #[error("{path}: {msg}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// rustls refused to build a configuration from our files.
    #[error("cannot build TLS {what} config: {source}")]
    Build {
        /// `server` or `client`.
        what: &'static str,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("cannot build client certificate verifier from {path}: {msg}")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A configured TLS server name is not a DNS name or IP address.
    #[error("{name:?} is not a valid TLS server name")]
    ServerName {
        /// The name.
        name: String,
    },
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoPeerCert,
    /// The peer's certificate could not be parsed by webpki.
    #[error("peer certificate is malformed: {0}")]
    BadCert(webpki::Error),
    /// The peer's certificate does not carry the identity asked for.
    #[error("{0}")]
    NotAuthorized(String),
    /// The peer did not negotiate `tidemark/1`.
    #[error("peer did not negotiate ALPN tidemark/1 (got {got})")]
    Alpn {
        /// What was negotiated, if anything.
        got: String,
    },
}

impl Classify for TlsError {
    fn kind(&self) -> ErrorKind {
        match self {
            TlsError::Read { .. }
            | TlsError::Pem { .. }
            | TlsError::Build { .. }
            | TlsError::Verifier { .. }
            | TlsError::ServerName { .. } => ErrorKind::Config,
            TlsError::NoPeerCert | TlsError::BadCert(_) | TlsError::NotAuthorized(_) => {
                ErrorKind::Auth
            }
            TlsError::Alpn { .. } => ErrorKind::Peer,
        }
    }
}

/// The PEM files of one role, from its config's `[tls]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The project CA certificate.
    pub ca: PathBuf,
    /// This role's certificate (chain).
    pub cert: PathBuf,
    /// This role's private key.
    pub key: PathBuf,
}

/// The three roles; each leaf certificate is issued for exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs on the protected machine, sends frames.
    Agent,
    /// Spools and forwards frames.
    Relay,
    /// Applies frames to replicas.
    Target,
}

impl Role {
    /// All roles.
    pub const ALL: [Role; 3] = [Role::Agent, Role::Relay, Role::Target];

    /// Lower-case name, as used in certificate names and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Relay => "relay",
            Role::Target => "target",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `<role>.role.tidemark`: carried by every certificate of `role`.
pub fn role_san(role: Role) -> String {
    format!("{role}.role.{SAN_SUFFIX}")
}

/// `<name>.<role>.tidemark`: the instance identity.
pub fn name_san(role: Role, name: &str) -> String {
    format!("{name}.{role}.{SAN_SUFFIX}")
}

/// `<group>.group.tidemark`: authorizes an agent or target for a group.
pub fn group_san(group: &str) -> String {
    format!("{group}.group.{SAN_SUFFIX}")
}

/// Parses a configured TLS server name (the relay's `relay_name`).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName {
        name: name.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side (the relay): requires a client certificate signed by the CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = mutual_server(files, "server", &[&rustls::version::TLS13])?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// A server config that requires a client certificate signed by the CA of
/// `files`, presents its own, offers `versions`, and never resumes a session
/// (every connection presents and verifies a full certificate).
fn mutual_server(
    files: &TlsFiles,
    what: &'static str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<ServerConfig, TlsError> {
    let roots = Arc::new(load_roots(&files.ca)?);
    let chain = load_chain(&files.cert)?;
    let key = load_key(&files.key)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier {
            path: files.ca.clone(),
            msg: e.to_string(),
        })?;
    let build = |source| TlsError::Build { what, source };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(build)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(build)?;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// Client side (agent, target): trusts only the CA and presents our certificate.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let chain = load_chain(&files.cert)?;
    let key = load_key(&files.key)?;
    let build = |source| TlsError::Build {
        what: "client",
        source,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(build)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(build)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in load_certs(path)? {
        roots.add(der).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            msg: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    load_certs(path)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            msg: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            msg: "no CERTIFICATE found".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    warn_if_exposed(path);
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        msg: format!("no usable PRIVATE KEY: {e}"),
    })
}

/// Logs a warning when a secret file is readable by group or others; it still works.
pub(crate) fn warn_if_exposed(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "secret file is accessible by group or others; chmod 600 it"
            );
        }
    }
}

/// Checks that `tidemark/1` was negotiated on this connection.
pub fn check_alpn(state: &CommonState) -> Result<(), TlsError> {
    match state.alpn_protocol() {
        Some(p) if p == ALPN => Ok(()),
        Some(p) => Err(TlsError::Alpn {
            got: String::from_utf8_lossy(p).into_owned(),
        }),
        None => Err(TlsError::Alpn { got: "none".into() }),
    }
}

/// The verified leaf certificate of the peer of a connection (any side; works
/// with `tokio_rustls` streams through `get_ref().1`).
pub fn peer_cert(state: &CommonState) -> Option<PeerCert> {
    state
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| PeerCert(c.clone().into_owned()))
}

/// The client's certificate, on the server side.
pub fn peer_cert_server(conn: &rustls::ServerConnection) -> Option<PeerCert> {
    peer_cert(conn)
}

/// The server's certificate, on the client side.
pub fn peer_cert_client(conn: &rustls::ClientConnection) -> Option<PeerCert> {
    peer_cert(conn)
}

/// A peer's leaf certificate, already chain-verified by rustls, with the
/// identity checks of tidemark's SAN scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert(CertificateDer<'static>);

impl PeerCert {
    /// Wraps a DER certificate. The checks below are only meaningful for a
    /// certificate whose chain was verified (as rustls does for a peer).
    pub fn from_der(der: CertificateDer<'static>) -> Self {
        PeerCert(der)
    }

    /// The DER bytes.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.0
    }

    /// True when the certificate is valid for the DNS name `name`.
    fn valid_for(&self, name: &str) -> Result<bool, TlsError> {
        let ee = webpki::EndEntityCert::try_from(&self.0).map_err(TlsError::BadCert)?;
        let sn = ServerName::try_from(name).map_err(|_| TlsError::ServerName {
            name: name.to_string(),
        })?;
        Ok(ee.verify_is_valid_for_subject_name(&sn).is_ok())
    }

    fn require(&self, name: &str, what: impl FnOnce() -> String) -> Result<(), TlsError> {
        if self.valid_for(name)? {
            Ok(())
        } else {
            Err(TlsError::NotAuthorized(format!(
                "peer certificate is not authorized {} ({})",
                what(),
                self.describe()
            )))
        }
    }

    /// The peer holds a certificate of `role`.
    pub fn check_role(&self, role: Role) -> Result<(), TlsError> {
        self.require(&role_san(role), || format!("as {role}"))
    }

    /// The peer is instance `name` of `role`.
    pub fn check_name(&self, role: Role, name: &str) -> Result<(), TlsError> {
        self.check_role(role)?;
        self.require(&name_san(role, name), || format!("as {role} {name}"))
    }

    /// The peer may send or receive frames of `group`.
    pub fn check_group(&self, group: &str) -> Result<(), TlsError> {
        self.require(&group_san(group), || format!("for group {group}"))
    }

    /// The peer's role and instance name, read from the SANs for messages and
    /// logs only; authorization goes through the `check_*` methods.
    pub fn identity(&self) -> Option<(Role, String)> {
        let ee = webpki::EndEntityCert::try_from(&self.0).ok()?;
        for dns in ee.valid_dns_names() {
            let mut parts = dns.rsplitn(3, '.');
            let (Some(SAN_SUFFIX), Some(role), Some(name)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(role) = Role::ALL.into_iter().find(|r| r.as_str() == role) else {
                continue;
            };
            if crate::config::validate_name(name).is_ok() && self.valid_for(&role_san(role)).ok()? {
                return Some((role, name.to_string()));
            }
        }
        None
    }

    /// Groups named in the SANs, for messages and logs only.
    pub fn groups(&self) -> Vec<String> {
        let Ok(ee) = webpki::EndEntityCert::try_from(&self.0) else {
            return Vec::new();
        };
        let suffix = format!(".group.{SAN_SUFFIX}");
        ee.valid_dns_names()
            .filter_map(|d| d.strip_suffix(suffix.as_str()))
            .filter(|g| crate::config::validate_name(g).is_ok())
            .map(str::to_string)
            .collect()
    }

    /// "agent agent-1", or "unidentified peer".
    pub fn describe(&self) -> String {
        match self.identity() {
            Some((role, name)) => format!("{role} {name}"),
            None => "unidentified peer".to_string(),
        }
    }
}

/// Server side of the NBD frontend: like [`server_config`] (the project CA
/// must have signed the client's certificate, the server presents its own),
/// but without tidemark's ALPN, since NBD clients (qemu, libnbd over GnuTLS)
/// send none, and with every protocol version this build of rustls offers
/// (TLS 1.3; TLS 1.2 too if rustls's `tls12` feature is ever enabled).
/// Session resumption stays disabled, so every connection presents and
/// verifies a full certificate.
pub fn nbd_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let cfg = mutual_server(files, "NBD server", rustls::DEFAULT_VERSIONS)?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentConfig, RelayConfig, TargetConfig};
    use crate::pki::{self, InitOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn init(dir: &Path, groups: &[&str]) {
        let mut o = InitOptions::new(dir);
        o.groups = groups.iter().map(|s| s.to_string()).collect();
        o.agent_name = "agent-1".into();
        pki::init(&o).unwrap();
    }

    fn relay_files(dir: &Path) -> TlsFiles {
        RelayConfig::load(&dir.join("relay.toml"))
            .unwrap()
            .tls
            .files()
    }
    fn agent_files(dir: &Path) -> TlsFiles {
        AgentConfig::load(&dir.join("agent.toml"))
            .unwrap()
            .tls
            .files()
    }
    fn target_files(dir: &Path) -> TlsFiles {
        TargetConfig::load(&dir.join("target.toml"))
            .unwrap()
            .tls
            .files()
    }

    fn leaf(path: &Path) -> PeerCert {
        PeerCert::from_der(load_certs(path).unwrap().remove(0))
    }

    /// Runs one handshake over loopback; returns what each side saw. On
    /// success the server's view is the client's certificate and vice versa.
    async fn handshake(
        server: &TlsFiles,
        client: &TlsFiles,
        name: &str,
    ) -> (Result<PeerCert, String>, Result<PeerCert, String>) {
        let acceptor = TlsAcceptor::from(server_config(server).unwrap());
        let connector = TlsConnector::from(client_config(client).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            check_alpn(s.get_ref().1).map_err(|e| e.to_string())?;
            let peer = peer_cert_server(s.get_ref().1).ok_or("no peer cert")?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            s.write_all(b"pong").await.map_err(|e| e.to_string())?;
            s.shutdown().await.ok();
            Ok::<_, String>(peer)
        });
        let sn = server_name(name).unwrap();
        let cli = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut s = connector
                .connect(sn, tcp)
                .await
                .map_err(|e| e.to_string())?;
            check_alpn(s.get_ref().1).map_err(|e| e.to_string())?;
            let peer = peer_cert_client(s.get_ref().1).ok_or("no peer cert")?;
            s.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 4];
            // With TLS 1.3 the client learns of a rejected certificate only here.
            s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            if &b != b"pong" {
                return Err("bad echo".to_string());
            }
            Ok::<_, String>(peer)
        }
        .await;
        (srv.await.unwrap(), cli)
    }

    #[tokio::test]
    async fn mutual_tls_between_relay_and_agent_and_target() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &["g1", "g2"]);
        let relay = relay_files(d.path());

        let (srv, cli) = handshake(&relay, &agent_files(d.path()), "relay").await;
        let (agent, relay_seen) = (srv.unwrap(), cli.unwrap());
        agent.check_role(Role::Agent).unwrap();
        agent.check_name(Role::Agent, "agent-1").unwrap();
        agent.check_group("g1").unwrap();
        agent.check_group("g2").unwrap();
        assert_eq!(agent.describe(), "agent agent-1");
        relay_seen.check_name(Role::Relay, "relay").unwrap();

        let (srv, cli) = handshake(&relay, &target_files(d.path()), "127.0.0.1").await;
        let target = srv.unwrap();
        cli.unwrap();
        target.check_name(Role::Target, "target").unwrap();
        target.check_group("g2").unwrap();
        let e = target.check_role(Role::Agent).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth);

        // "localhost" is one of the default relay hosts.
        let (srv, cli) = handshake(&relay, &agent_files(d.path()), "localhost").await;
        srv.unwrap();
        cli.unwrap();
    }

    #[tokio::test]
    async fn wrong_server_name_is_refused_by_client() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &["g1"]);
        // The relay certificate does not carry "other-host".
        let (_, cli) =
            handshake(&relay_files(d.path()), &agent_files(d.path()), "other-host").await;
        assert!(cli.is_err());
    }

    #[tokio::test]
    async fn client_cert_from_another_ca_is_rejected_by_server() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(a.path(), &["g1"]);
        init(b.path(), &["g1"]);
        // Client trusts A's relay (uses A's CA) but presents B's agent cert.
        let mut client = agent_files(b.path());
        client.ca = a.path().join("ca.pem");
        let (srv, cli) = handshake(&relay_files(a.path()), &client, "relay").await;
        let e = srv.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        assert!(cli.is_err());
    }

    #[tokio::test]
    async fn server_cert_from_another_ca_is_rejected_by_client() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(a.path(), &["g1"]);
        init(b.path(), &["g1"]);
        // Server trusts A's agents but presents B's relay cert.
        let mut server = relay_files(b.path());
        server.ca = a.path().join("ca.pem");
        let (srv, cli) = handshake(&server, &agent_files(a.path()), "relay").await;
        let e = cli.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        assert!(srv.is_err());
    }

    #[test]
    fn role_name_and_group_checks() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &["g1", "g2"]);
        let agent = leaf(&d.path().join("agent.pem"));
        let target = leaf(&d.path().join("target.pem"));
        let relay = leaf(&d.path().join("relay.pem"));

        // A second agent, serving only g1.
        let other = pki::issue_leaf(d.path(), Role::Agent, "agent-2", &["g1".into()], &[]).unwrap();
        let other = PeerCert::from_der(other.cert_der);
        other.check_role(Role::Agent).unwrap();
        other.check_name(Role::Agent, "agent-2").unwrap();
        other.check_group("g1").unwrap();
        let e = other.check_group("g2").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert_eq!(
            e.to_string(),
            "peer certificate is not authorized for group g2 (agent agent-2)"
        );
        assert!(other.check_name(Role::Agent, "agent-1").is_err());
        assert_eq!(other.groups(), vec!["g1".to_string()]);

        agent.check_name(Role::Agent, "agent-1").unwrap();
        let e = target.check_role(Role::Agent).unwrap_err();
        assert_eq!(
            e.to_string(),
            "peer certificate is not authorized as agent (target target)"
        );
        assert!(target.check_name(Role::Agent, "target").is_err());
        assert!(agent.check_role(Role::Target).is_err());
        assert!(agent.check_role(Role::Relay).is_err());
        relay.check_role(Role::Relay).unwrap();
        assert!(relay.check_group("g1").is_err());
        assert!(relay.check_role(Role::Agent).is_err());
        assert_eq!(relay.identity(), Some((Role::Relay, "relay".into())));
        // Malformed names asked for are errors, not panics.
        assert!(agent.check_group("bad name").is_err());
    }

    #[test]
    fn garbage_certificate_is_an_auth_error() {
        let p = PeerCert::from_der(CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]));
        assert_eq!(
            p.check_role(Role::Agent).unwrap_err().kind(),
            ErrorKind::Auth
        );
        assert_eq!(p.identity(), None);
        assert!(p.groups().is_empty());
    }

    #[test]
    fn missing_or_bad_files_are_config_errors() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &["g1"]);
        let mut f = relay_files(d.path());
        f.key = d.path().join("nope.key");
        let e = server_config(&f).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("nope.key"));
        let mut f = agent_files(d.path());
        f.ca = d.path().join("agent.key"); // a key, not a certificate
        let e = client_config(&f).unwrap_err();
        assert!(e.to_string().contains("agent.key"), "{e}");
        // A world-readable key only warns.
        let f = agent_files(d.path());
        std::fs::set_permissions(&f.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        client_config(&f).unwrap();
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_der_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let p = PeerCert::from_der(CertificateDer::from(bytes));
            let _ = p.check_name(Role::Agent, "a");
            let _ = p.check_group("g1");
            let _ = p.identity();
            let _ = p.groups();
        }
    }
}
