//! `tidemark init`: the project CA, one certificate per role, the groups' data
//! keys and one config file per role.
//!
//! Certificates are ECDSA P-256 (rcgen over *ring*), valid for 10 years. A
//! leaf's identity is a set of DNS subject alternative names under `.tidemark`
//! (see [`crate::transport::tls`]): every leaf carries `<role>.role.tidemark`
//! and `<name>.<role>.tidemark`; agents and targets carry
//! `<group>.group.tidemark` for each group they serve; the relay also carries
//! its plain name and its host names/IPs so clients verify it as a TLS server.
//! Peers check these names with webpki, so tidemark needs no X.509 parser.
//!
//! Secrets (`*.key`) are created with mode 0600 from the start; nothing is
//! overwritten unless asked.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::config::{
    AgentConfig, AgentDisk, AgentGroup, AgentSection, ConfigError, Engine, RelayConfig,
    RelaySection, ResyncMode, TargetConfig, TargetDisk, TargetGroup, TargetSection, TlsSection,
    validate_name,
};
use crate::error::{Classify, ErrorKind};
use crate::transport::tls::{Role, SAN_SUFFIX, group_san, name_san, role_san, warn_if_exposed};

/// CA certificate file name inside the init directory.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file name inside the init directory.
pub const CA_KEY: &str = "ca.key";
/// Directory of the groups' data keys inside the init directory.
pub const KEYS_DIR: &str = "keys";
/// Length of a data key in bytes (AES-256).
pub const DATA_KEY_LEN: usize = 32;

/// Certificate lifetime.
const VALIDITY: Duration = Duration::from_secs(10 * 36525 * 864); // 10 × 365.25 days
/// Back-dating of `not_before`, for clocks slightly behind the issuer's.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Largest data key file accepted (64 hex chars, newline, some slack).
const DATA_KEY_FILE_MAX: u64 = 1024;

/// Certificate, key or file generation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// An option (name, group, host) is not acceptable.
    #[error("{what}: {msg}")]
    Invalid {
        /// Which option.
        what: String,
        /// What was wrong.
        msg: String,
    },
    /// Files exist and `force` was not given.
    #[error("refusing to overwrite existing files (use --force): {}", list(.paths))]
    Exists {
        /// The files that exist.
        paths: Vec<PathBuf>,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// rcgen failed to build or sign a certificate, or to read a key.
    #[error("{what}: {source}")]
    Cert {
        /// What was being done.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A PEM or key file is malformed, or `ca.pem` does not match `ca.key`.
    #[error("{path}: {msg}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// The system random source failed.
    #[error("random source failed: {0}")]
    Random(getrandom::Error),
    /// A generated config did not validate (a bug or a bad option).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Classify for PkiError {
    fn kind(&self) -> ErrorKind {
        match self {
            PkiError::Invalid { .. } | PkiError::Exists { .. } | PkiError::Cert { .. } => {
                ErrorKind::Config
            }
            PkiError::Config(e) => e.kind(),
            PkiError::Io { .. } | PkiError::Random(_) => ErrorKind::Io,
            PkiError::Corrupt { .. } => ErrorKind::Corrupt,
        }
    }
}

/// What `tidemark init` creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// Output directory (created if missing).
    pub dir: PathBuf,
    /// Relay instance name (also a DNS SAN of its certificate).
    pub relay_name: String,
    /// Target instance name.
    pub target_name: String,
    /// Agent instance name.
    pub agent_name: String,
    /// Consistency groups, each with a data key; served by the agent and target.
    pub groups: Vec<String>,
    /// Extra DNS names / IPs for the relay certificate.
    pub relay_hosts: Vec<String>,
    /// DNS names / IPs for the agent certificate: the names its NBD frontend is
    /// reached by when it serves TLS (clients verify the server's name).
    pub agent_hosts: Vec<String>,
    /// Address the relay listens on.
    pub relay_listen: String,
    /// Overwrite existing files.
    pub force: bool,
}

impl InitOptions {
    /// Defaults: names relay/target/agent, group g1, relay and agent hosts
    /// localhost and 127.0.0.1, listen 0.0.0.0:7400.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        InitOptions {
            dir: dir.into(),
            relay_name: "relay".into(),
            target_name: "target".into(),
            agent_name: "agent".into(),
            groups: vec!["g1".into()],
            relay_hosts: vec!["localhost".into(), "127.0.0.1".into()],
            agent_hosts: vec!["localhost".into(), "127.0.0.1".into()],
            relay_listen: "0.0.0.0:7400".into(),
            force: false,
        }
    }
}

/// What `init` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The output directory.
    pub dir: PathBuf,
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
}

/// A freshly issued leaf certificate and its private key.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// PKCS#8 private key, PEM (a secret).
    pub key_pem: String,
}

/// Writes the CA, the three role certificates, a data key per group and the
/// three configs into `opts.dir`. Refuses if any of those files exists unless
/// `opts.force`; checks that before writing anything.
pub fn init(opts: &InitOptions) -> Result<InitReport, PkiError> {
    let dir = &opts.dir;
    for (what, n) in [
        ("relay name", &opts.relay_name),
        ("target name", &opts.target_name),
        ("agent name", &opts.agent_name),
    ] {
        validate_name(n).map_err(|msg| invalid(what, msg))?;
    }
    check_groups(&opts.groups)?;
    if opts.groups.is_empty() {
        return Err(invalid("groups", "at least one group is required"));
    }
    let listen: SocketAddr = opts.relay_listen.parse().map_err(|_| {
        invalid(
            "relay listen",
            format!("{:?} is not ip:port", opts.relay_listen),
        )
    })?;
    check_hosts(&opts.relay_hosts)?;
    check_hosts(&opts.agent_hosts)?;

    let leaf_files = |r: Role| (format!("{r}.pem"), format!("{r}.key"));
    let mut planned: Vec<PathBuf> = vec![dir.join(CA_CERT), dir.join(CA_KEY)];
    for r in [Role::Relay, Role::Target, Role::Agent] {
        let (c, k) = leaf_files(r);
        planned.push(dir.join(c));
        planned.push(dir.join(k));
    }
    for g in &opts.groups {
        planned.push(dir.join(KEYS_DIR).join(format!("{g}.key")));
    }
    for f in ["relay.toml", "target.toml", "agent.toml"] {
        planned.push(dir.join(f));
    }
    if !opts.force {
        let existing: Vec<PathBuf> = planned
            .iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .cloned()
            .collect();
        if !existing.is_empty() {
            return Err(PkiError::Exists { paths: existing });
        }
    }

    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let keys_dir = dir.join(KEYS_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&keys_dir)
        .map_err(|e| io_err(&keys_dir, e))?;

    let mut files = Vec::new();
    let mut put = |name: PathBuf, bytes: &[u8], secret: bool| -> Result<(), PkiError> {
        write_file(&name, bytes, secret, opts.force)?;
        files.push(name);
        Ok(())
    };

    // CA.
    let ca_key = new_key()?;
    let ca_cert = ca_params()?
        .self_signed(&ca_key)
        .map_err(|e| cert_err("self-signing the CA certificate", e))?;
    put(dir.join(CA_CERT), ca_cert.pem().as_bytes(), false)?;
    put(dir.join(CA_KEY), ca_key.serialize_pem().as_bytes(), true)?;

    // Leaves, issued through the same path as a later `issue_leaf`.
    let leaves: [(Role, &str, &[String], &[String]); 3] = [
        (Role::Relay, &opts.relay_name, &[], &opts.relay_hosts),
        (Role::Target, &opts.target_name, &opts.groups, &[]),
        (
            Role::Agent,
            &opts.agent_name,
            &opts.groups,
            &opts.agent_hosts,
        ),
    ];
    for (role, name, groups, hosts) in leaves {
        let leaf = issue_leaf(dir, role, name, groups, hosts)?;
        let (c, k) = leaf_files(role);
        put(dir.join(c), leaf.cert_pem.as_bytes(), false)?;
        put(dir.join(k), leaf.key_pem.as_bytes(), true)?;
    }

    // Data keys.
    for g in &opts.groups {
        let mut key = [0u8; DATA_KEY_LEN];
        getrandom::fill(&mut key).map_err(PkiError::Random)?;
        let mut text = hex(&key);
        text.push('\n');
        put(keys_dir.join(format!("{g}.key")), text.as_bytes(), true)?;
    }

    // Configs, with paths relative to `dir`.
    let (relay, target, agent) = role_configs(opts, listen);
    relay.validate_at(&dir.join("relay.toml"))?;
    target.validate_at(&dir.join("target.toml"))?;
    agent.validate_at(&dir.join("agent.toml"))?;
    let header = |role: &str| {
        format!(
            "# tidemark {role} configuration, written by `tidemark init`.\n\
             # Relative paths are relative to this file's directory.\n\n"
        )
    };
    put(
        dir.join("relay.toml"),
        (header("relay") + &relay.to_toml_string()?).as_bytes(),
        false,
    )?;
    put(
        dir.join("target.toml"),
        (header("target") + &target.to_toml_string()?).as_bytes(),
        false,
    )?;
    put(
        dir.join("agent.toml"),
        (header("agent") + &agent.to_toml_string()?).as_bytes(),
        false,
    )?;

    Ok(InitReport {
        dir: dir.clone(),
        files,
    })
}

/// The three configs `init` writes, with paths relative to the init directory.
fn role_configs(
    opts: &InitOptions,
    listen: SocketAddr,
) -> (RelayConfig, TargetConfig, AgentConfig) {
    let tls = |r: Role| TlsSection {
        ca: CA_CERT.into(),
        cert: format!("{r}.pem").into(),
        key: format!("{r}.key").into(),
    };
    // Clients on the same machine reach a wildcard listener through loopback.
    let mut connect = listen;
    if connect.ip().is_unspecified() {
        connect.set_ip(match listen.ip() {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        });
    }
    let port = listen.port();
    let status = |offset: u16| -> Option<SocketAddr> {
        port.checked_add(offset)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
    };
    let relay = RelayConfig {
        relay: RelaySection {
            name: opts.relay_name.clone(),
            listen,
            spool_dir: "spool".into(),
            status_listen: status(1),
            spool_segment_mib: 64,
            spool_max_gib: 64,
            spool_direct_io: false,
            spool_recycle_segments: crate::spool::DEFAULT_RECYCLE_SEGMENTS,
        },
        tls: tls(Role::Relay),
    };
    let key_file = |g: &str| PathBuf::from(KEYS_DIR).join(format!("{g}.key"));
    let target = TargetConfig {
        target: TargetSection {
            name: opts.target_name.clone(),
            relay: connect.to_string(),
            relay_name: opts.relay_name.clone(),
            state_dir: "target-state".into(),
            status_listen: status(2),
            engine: Engine::Uring,
            apply_batch_mib: 32,
            direct_io: crate::config::DirectIo::Auto,
            relay_silence_ms: 60_000,
        },
        tls: tls(Role::Target),
        groups: opts
            .groups
            .iter()
            .map(|g| TargetGroup {
                name: g.clone(),
                key_file: key_file(g),
                key_epoch: 1,
                disks: vec![TargetDisk {
                    id: 0,
                    path: format!("replicas/{g}-disk0.img").into(),
                    format: Default::default(),
                }],
                retention: Default::default(),
            })
            .collect(),
    };
    let agent = AgentConfig {
        agent: AgentSection {
            name: opts.agent_name.clone(),
            relay: connect.to_string(),
            relay_name: opts.relay_name.clone(),
            state_dir: "agent-state".into(),
            status_listen: status(3),
            capture_budget_mib: 64,
            spill_budget_mib: 1024,
            spill_dir: None,
            bitmap_after_ms: 300_000,
            relay_silence_ms: 60_000,
            capture_policy: Default::default(),
            dirty_flush_ms: 2000,
            pipeline_nice: 10,
            tag_pre_hook: None,
            tag_post_hook: None,
        },
        tls: tls(Role::Agent),
        groups: opts
            .groups
            .iter()
            .map(|g| AgentGroup {
                name: g.clone(),
                key_file: key_file(g),
                key_epoch: 1,
                zstd_level: 1,
                frame_max_kib: 4096,
                frame_linger_ms: 20,
                heartbeat_ms: 2000,
                window_frames: 32,
                window_mib: 32,
                resync: ResyncMode::Checksum,
                resync_block_kib: 64,
                resync_max_mib_s: 0,
                verify_every_minutes: 0,
                verify_repair: false,
                disks: vec![AgentDisk {
                    id: 0,
                    path: format!("disks/{g}-disk0.img").into(),
                    initial_copy: true,
                    nbd: None,
                    fuse: None,
                    ublk: None,
                }],
            })
            .collect(),
    };
    (relay, target, agent)
}

/// Issues a leaf certificate for instance `name` of `role`, signed by the CA in
/// `ca_dir` (`ca.pem`, `ca.key`). `groups` become group SANs (agent and target
/// only); `hosts` (DNS names or IPs) become server-name SANs. The result is
/// verified against `ca.pem` before it is returned, which also catches a
/// `ca.pem` that does not belong to `ca.key`.
pub fn issue_leaf(
    ca_dir: &Path,
    role: Role,
    name: &str,
    groups: &[String],
    hosts: &[String],
) -> Result<IssuedLeaf, PkiError> {
    validate_name(name).map_err(|msg| invalid(format!("{role} name"), msg))?;
    check_groups(groups)?;
    check_hosts(hosts)?;
    if role == Role::Relay && !groups.is_empty() {
        return Err(invalid("groups", "a relay certificate carries no groups"));
    }

    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_cert_path = ca_dir.join(CA_CERT);
    warn_if_exposed(&ca_key_path);
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(|e| io_err(&ca_key_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Corrupt {
        path: ca_key_path.clone(),
        msg: format!("not a usable private key: {e}"),
    })?;
    let ca_pem = fs::read(&ca_cert_path).map_err(|e| io_err(&ca_cert_path, e))?;
    let ca_der = CertificateDer::from_pem_slice(&ca_pem).map_err(|e| PkiError::Corrupt {
        path: ca_cert_path.clone(),
        msg: format!("no CERTIFICATE: {e}"),
    })?;
    // The CA's parameters are fixed, so the issuer is rebuilt from them and the key.
    let issuer = Issuer::new(ca_params()?, ca_key);

    let mut sans = vec![role_san(role), name_san(role, name)];
    if role == Role::Relay {
        sans.push(name.to_string());
    }
    sans.extend(groups.iter().map(|g| group_san(g)));
    sans.extend(hosts.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    sans.retain(|s| seen.insert(s.to_ascii_lowercase()));

    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .into_iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => s
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| cert_err(format!("SAN {s:?}"), e)),
        })
        .collect::<Result<_, _>>()?;
    params.distinguished_name = dn(&format!("tidemark {role} {name}"));
    params.is_ca = IsCa::ExplicitNoCa;
    // keyEncipherment is meaningless for ECDSA, but GnuTLS-based clients (qemu's
    // NBD client) refuse a certificate whose key usage lacks it.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity_and_serial(&mut params)?;
    let key = new_key()?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| cert_err(format!("signing the {role} certificate"), e))?;

    verify_leaf(cert.der(), &ca_der).map_err(|msg| PkiError::Corrupt {
        path: ca_cert_path.clone(),
        msg: format!("issued certificate does not verify against this CA ({msg}); does ca.pem belong to ca.key?"),
    })?;
    Ok(IssuedLeaf {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes an issued leaf to `cert_path` (0644) and `key_path` (0600).
pub fn write_leaf(
    leaf: &IssuedLeaf,
    cert_path: &Path,
    key_path: &Path,
    force: bool,
) -> Result<(), PkiError> {
    if !force {
        let existing: Vec<PathBuf> = [cert_path, key_path]
            .into_iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .map(Path::to_path_buf)
            .collect();
        if !existing.is_empty() {
            return Err(PkiError::Exists { paths: existing });
        }
    }
    write_file(cert_path, leaf.cert_pem.as_bytes(), false, force)?;
    write_file(key_path, leaf.key_pem.as_bytes(), true, force)
}

/// Reads a group's data key: 64 hex characters, optionally followed by
/// whitespace. Warns when the file is readable by group or others.
pub fn read_data_key(path: &Path) -> Result<[u8; DATA_KEY_LEN], PkiError> {
    warn_if_exposed(path);
    let meta = fs::metadata(path).map_err(|e| io_err(path, e))?;
    if meta.len() > DATA_KEY_FILE_MAX {
        return Err(corrupt(
            path,
            format!("{} bytes is too long for a data key file", meta.len()),
        ));
    }
    let text = fs::read(path).map_err(|e| io_err(path, e))?;
    parse_data_key(&text).map_err(|msg| corrupt(path, msg))
}

fn parse_data_key(text: &[u8]) -> Result<[u8; DATA_KEY_LEN], String> {
    let hexdigits = text.trim_ascii();
    if hexdigits.len() != DATA_KEY_LEN * 2 {
        return Err(format!(
            "data key must be {} hex characters, found {}",
            DATA_KEY_LEN * 2,
            hexdigits.len()
        ));
    }
    let mut key = [0u8; DATA_KEY_LEN];
    for (i, pair) in hexdigits.chunks_exact(2).enumerate() {
        let nib = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("byte {} of the data key is not a hex digit", 2 * i)),
        };
        key[i] = (nib(pair[0])? << 4)
            | nib(pair[1])
                .map_err(|_| format!("byte {} of the data key is not a hex digit", 2 * i + 1))?;
    }
    Ok(key)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CA's fixed parameters (subject, usages, constraints). Only validity and
/// serial vary, and those are not part of the issuer identity.
fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("tidemark CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity_and_serial(&mut p)?;
    Ok(p)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "tidemark");
    d.push(DnType::CommonName, cn);
    d
}

fn set_validity_and_serial(p: &mut CertificateParams) -> Result<(), PkiError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let start = now.saturating_sub(BACKDATE);
    p.not_before = rcgen::date_time_ymd(1970, 1, 1) + start;
    p.not_after = rcgen::date_time_ymd(1970, 1, 1) + start + VALIDITY + BACKDATE;
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(PkiError::Random)?;
    serial[0] = (serial[0] & 0x7f) | 0x40; // positive, no leading zero byte
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(())
}

fn new_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| cert_err("generating a P-256 key", e))
}

/// Checks that `leaf` chains to `ca` for client and server use, now.
fn verify_leaf(leaf: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| e.to_string())?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            algs,
            std::slice::from_ref(&anchor),
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn check_groups(groups: &[String]) -> Result<(), PkiError> {
    let mut seen = std::collections::HashSet::new();
    for g in groups {
        validate_name(g).map_err(|msg| invalid("group", msg))?;
        if !seen.insert(g) {
            return Err(invalid("group", format!("duplicate group {g:?}")));
        }
    }
    Ok(())
}

/// Relay host names must be plain server names: an IP, or a DNS name that is
/// not a wildcard and not under `.tidemark` (which would forge identity SANs).
fn check_hosts(hosts: &[String]) -> Result<(), PkiError> {
    for h in hosts {
        if h.parse::<IpAddr>().is_ok() {
            continue;
        }
        let lower = h.to_ascii_lowercase();
        let reserved = lower == SAN_SUFFIX
            || lower
                .trim_end_matches('.')
                .ends_with(&format!(".{SAN_SUFFIX}"));
        if h.contains('*') || reserved || rustls::pki_types::DnsName::try_from(h.as_str()).is_err()
        {
            return Err(invalid(
                "relay host",
                format!(
                    "{h:?} must be an IP address or a DNS name outside .{SAN_SUFFIX}, without wildcards"
                ),
            ));
        }
    }
    Ok(())
}

/// Creates `path` with `bytes`. Secrets get mode 0600 at creation. Without
/// `force` the file must not exist (checked atomically by `create_new`); with
/// it, a temporary file is renamed over the old one.
fn write_file(path: &Path, bytes: &[u8], secret: bool, force: bool) -> Result<(), PkiError> {
    let mode = if secret { 0o600 } else { 0o644 };
    let create = |p: &Path| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if !force {
        return create(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    paths: vec![path.to_path_buf()],
                }
            } else {
                io_err(path, e)
            }
        });
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    create(&tmp).map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path, e)
    })?;
    Ok(())
}

fn invalid(what: impl Into<String>, msg: impl Into<String>) -> PkiError {
    PkiError::Invalid {
        what: what.into(),
        msg: msg.into(),
    }
}

fn corrupt(path: &Path, msg: impl Into<String>) -> PkiError {
    PkiError::Corrupt {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cert_err(what: impl Into<String>, source: rcgen::Error) -> PkiError {
    PkiError::Cert {
        what: what.into(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::PeerCert;
    use rustls::pki_types::ServerName;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_everything_with_private_keys_0600() {
        let d = tempfile::tempdir().unwrap();
        let mut o = InitOptions::new(d.path().join("site"));
        o.groups = vec!["g1".into(), "db-2".into()];
        let r = init(&o).unwrap();
        let dir = &o.dir;
        let expect = [
            "ca.pem",
            "ca.key",
            "relay.pem",
            "relay.key",
            "target.pem",
            "target.key",
            "agent.pem",
            "agent.key",
            "keys/g1.key",
            "keys/db-2.key",
            "relay.toml",
            "target.toml",
            "agent.toml",
        ];
        assert_eq!(
            r.files,
            expect.iter().map(|f| dir.join(f)).collect::<Vec<_>>()
        );
        for f in expect {
            let p = dir.join(f);
            if f.ends_with(".key") {
                assert_eq!(mode(&p), 0o600, "{f}");
            } else {
                assert_eq!(mode(&p) & 0o022, 0, "{f}");
            }
        }
        assert_eq!(mode(&dir.join("keys")), 0o700);
        // Data keys: 64 lowercase hex + newline, distinct.
        let k1 = fs::read_to_string(dir.join("keys/g1.key")).unwrap();
        assert_eq!(k1.len(), 65);
        assert!(k1.ends_with('\n'));
        assert!(
            k1[..64]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        let a = read_data_key(&dir.join("keys/g1.key")).unwrap();
        let b = read_data_key(&dir.join("keys/db-2.key")).unwrap();
        assert_ne!(a, b);
        assert_eq!(hex(&a), k1.trim_end());
    }

    #[test]
    fn init_refuses_to_overwrite_unless_forced() {
        let d = tempfile::tempdir().unwrap();
        let o = InitOptions::new(d.path());
        init(&o).unwrap();
        let before = fs::read(d.path().join("ca.key")).unwrap();
        let e = init(&o).unwrap_err();
        assert!(matches!(e, PkiError::Exists { .. }));
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("ca.pem"), "{e}");
        assert_eq!(fs::read(d.path().join("ca.key")).unwrap(), before);

        // One stray file is enough to refuse, and nothing else is written.
        let d2 = tempfile::tempdir().unwrap();
        fs::write(d2.path().join("agent.toml"), "x").unwrap();
        let e = init(&InitOptions::new(d2.path())).unwrap_err();
        assert!(e.to_string().contains("agent.toml"), "{e}");
        assert!(!d2.path().join("ca.pem").exists());

        // Forced: replaced, and the key keeps 0600 even if the old one was 0644.
        fs::set_permissions(
            d.path().join("agent.key"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let mut o = o;
        o.force = true;
        init(&o).unwrap();
        assert_ne!(fs::read(d.path().join("ca.key")).unwrap(), before);
        assert_eq!(mode(&d.path().join("agent.key")), 0o600);
        assert!(
            fs::read_dir(d.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-"))
        );
    }

    #[test]
    fn configs_load_back_and_relay_has_no_key() {
        let d = tempfile::tempdir().unwrap();
        let mut o = InitOptions::new(d.path());
        o.groups = vec!["g1".into(), "g2".into()];
        o.relay_listen = "0.0.0.0:9400".into();
        init(&o).unwrap();
        let base = std::path::absolute(d.path()).unwrap();

        let relay_text = fs::read_to_string(d.path().join("relay.toml")).unwrap();
        assert!(
            !relay_text.contains("key_file") && !relay_text.contains("keys/"),
            "{relay_text}"
        );
        let relay = RelayConfig::load(&d.path().join("relay.toml")).unwrap();
        assert_eq!(relay.relay.listen, "0.0.0.0:9400".parse().unwrap());
        assert_eq!(relay.tls.key, base.join("relay.key"));
        assert_eq!(
            relay.relay.status_listen,
            Some("127.0.0.1:9401".parse().unwrap())
        );

        let target = TargetConfig::load(&d.path().join("target.toml")).unwrap();
        assert_eq!(target.target.relay, "127.0.0.1:9400");
        assert_eq!(target.target.relay_name, "relay");
        assert_eq!(target.groups.len(), 2);
        assert_eq!(target.groups[1].key_file, base.join("keys/g2.key"));
        assert_eq!(
            target.groups[0].disks[0].path,
            base.join("replicas/g1-disk0.img")
        );

        let agent = AgentConfig::load(&d.path().join("agent.toml")).unwrap();
        assert_eq!(
            agent.groups[0].disks[0].path,
            base.join("disks/g1-disk0.img")
        );
        assert_eq!(agent.tls.cert, base.join("agent.pem"));
        read_data_key(&agent.groups[1].key_file).unwrap();

        // Round trip: the in-memory configs equal what was loaded (modulo resolution).
        let (mut r, mut t, mut a) = role_configs(&o, "0.0.0.0:9400".parse().unwrap());
        r.resolve_paths(&base);
        t.resolve_paths(&base);
        a.resolve_paths(&base);
        assert_eq!((r, t, a), (relay, target, agent));
    }

    #[test]
    fn certificates_carry_the_identity_sans() {
        let d = tempfile::tempdir().unwrap();
        let mut o = InitOptions::new(d.path());
        o.relay_name = "ps-1".into();
        o.relay_hosts = vec!["relay.example.com".into(), "10.1.2.3".into()];
        o.groups = vec!["g1".into(), "g2".into()];
        init(&o).unwrap();
        let load =
            |f: &str| PeerCert::from_der(CertificateDer::from_pem_file(d.path().join(f)).unwrap());
        let relay = load("relay.pem");
        relay.check_name(Role::Relay, "ps-1").unwrap();
        let ee_der = relay.der().clone();
        let ee = webpki::EndEntityCert::try_from(&ee_der).unwrap();
        let names: Vec<&str> = ee.valid_dns_names().collect();
        assert_eq!(
            names,
            [
                "relay.role.tidemark",
                "ps-1.relay.tidemark",
                "ps-1",
                "relay.example.com"
            ]
        );
        let ip = ServerName::try_from("10.1.2.3").unwrap();
        ee.verify_is_valid_for_subject_name(&ip).unwrap();

        let agent = load("agent.pem");
        let der = agent.der().clone();
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        let names: Vec<&str> = ee.valid_dns_names().collect();
        assert_eq!(
            names,
            [
                "agent.role.tidemark",
                "agent.agent.tidemark",
                "g1.group.tidemark",
                "g2.group.tidemark",
                "localhost"
            ]
        );
        // The agent's NBD frontend is reached by the default agent hosts.
        ee.verify_is_valid_for_subject_name(&ServerName::try_from("127.0.0.1").unwrap())
            .unwrap();
        // The CA verifies every leaf.
        let ca = CertificateDer::from_pem_file(d.path().join("ca.pem")).unwrap();
        for f in ["relay.pem", "target.pem", "agent.pem"] {
            verify_leaf(
                &CertificateDer::from_pem_file(d.path().join(f)).unwrap(),
                &ca,
            )
            .unwrap();
        }
    }

    #[test]
    fn issue_leaf_adds_an_agent_and_checks_its_inputs() {
        let d = tempfile::tempdir().unwrap();
        init(&InitOptions::new(d.path())).unwrap();
        let leaf = issue_leaf(d.path(), Role::Agent, "agent-7", &["g1".into()], &[]).unwrap();
        let (c, k) = (d.path().join("agent-7.pem"), d.path().join("agent-7.key"));
        write_leaf(&leaf, &c, &k, false).unwrap();
        assert_eq!(mode(&k), 0o600);
        assert!(matches!(
            write_leaf(&leaf, &c, &k, false),
            Err(PkiError::Exists { .. })
        ));
        let p = PeerCert::from_der(leaf.cert_der);
        p.check_name(Role::Agent, "agent-7").unwrap();

        let bad = [
            (Role::Agent, "Agent", vec![], vec![]),
            (Role::Agent, "a", vec!["g 1".to_string()], vec![]),
            (
                Role::Agent,
                "a",
                vec!["g1".to_string(), "g1".to_string()],
                vec![],
            ),
            (Role::Relay, "r", vec!["g1".to_string()], vec![]),
            (
                Role::Relay,
                "r",
                vec![],
                vec!["g1.group.tidemark".to_string()],
            ),
            (Role::Relay, "r", vec![], vec!["*.example.com".to_string()]),
            (Role::Relay, "r", vec![], vec!["TIDEMARK".to_string()]),
        ];
        for (role, name, groups, hosts) in bad {
            let e = issue_leaf(d.path(), role, name, &groups, &hosts).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        }
    }

    #[test]
    fn issue_leaf_detects_a_foreign_ca_cert() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(&InitOptions::new(a.path())).unwrap();
        init(&InitOptions::new(b.path())).unwrap();
        fs::copy(b.path().join("ca.pem"), a.path().join("ca.pem")).unwrap();
        let e = issue_leaf(a.path(), Role::Agent, "x", &[], &[]).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        let e = issue_leaf(&a.path().join("missing"), Role::Agent, "x", &[], &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn init_rejects_bad_options() {
        let d = tempfile::tempdir().unwrap();
        let variants: [fn(&mut InitOptions); 5] = [
            |o| o.groups.clear(),
            |o| o.agent_name = "bad_name".into(),
            |o| o.relay_listen = "nowhere".into(),
            |o| o.relay_hosts = vec!["x.agent.tidemark".into()],
            |o| o.groups = vec!["g1".into(), "g1".into()],
        ];
        for f in variants {
            let mut o = InitOptions::new(d.path());
            f(&mut o);
            assert_eq!(init(&o).unwrap_err().kind(), ErrorKind::Config);
        }
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn data_key_parsing() {
        let k = "00ff".repeat(16);
        assert_eq!(
            parse_data_key(format!("{k}\n").as_bytes()).unwrap()[1],
            0xff
        );
        assert!(parse_data_key(&k.as_bytes()[..62]).is_err());
        assert!(parse_data_key(format!("{}zz", &k[..62]).as_bytes()).is_err());
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.key");
        fs::write(&p, vec![b'a'; 5000]).unwrap();
        assert_eq!(read_data_key(&p).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    proptest::proptest! {
        #[test]
        fn data_key_parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_data_key(&bytes);
        }
    }
}
