//! TLS: STARTTLS with mutual certificates from the project CA, with a rustls
//! client in the test and with qemu-io and nbdinfo (GnuTLS) as real clients.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::proto::*;
use super::testutil::*;
use super::{NbdConfig, TlsMode};
use crate::pki::{self, InitOptions, IssuedLeaf};
use crate::transport::tls::{self, Role, TlsFiles};

const MIB: u64 = 1 << 20;

/// A project CA in `dir`, a server certificate for 127.0.0.1/localhost and a
/// client certificate, written where both rustls and GnuTLS clients find
/// them (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
struct Pki {
    dir: PathBuf,
    server: TlsFiles,
    client: IssuedLeaf,
}

fn pki(dir: &Path) -> Pki {
    pki::init(&InitOptions::new(dir)).unwrap();
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    let server = pki::issue_leaf(dir, Role::Agent, "nbd-server", &[], &hosts).unwrap();
    pki::write_leaf(
        &server,
        &dir.join("nbd-server.pem"),
        &dir.join("nbd-server.key"),
        false,
    )
    .unwrap();
    let client = pki::issue_leaf(dir, Role::Agent, "nbd-client", &[], &[]).unwrap();
    // The file names qemu's tls-creds-x509 and libnbd's tls-certificates expect.
    std::fs::copy(dir.join("ca.pem"), dir.join("ca-cert.pem")).unwrap();
    pki::write_leaf(
        &client,
        &dir.join("client-cert.pem"),
        &dir.join("client-key.pem"),
        false,
    )
    .unwrap();
    Pki {
        dir: dir.to_path_buf(),
        server: TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("nbd-server.pem"),
            key: dir.join("nbd-server.key"),
        },
        client,
    }
}

fn tls_server(p: &Pki, mode: TlsMode, disk: &Path) -> TestServer {
    let mut c = NbdConfig::new(Vec::new());
    c.tls = mode;
    c.tls_config = Some(tls::nbd_server_config(&p.server).unwrap());
    TestServer::start(c, vec![export("d", disk)])
}

fn client_config(ca: &Path, leaf: Option<&IssuedLeaf>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match leaf {
        Some(l) => b
            .with_client_auth_cert(
                vec![l.cert_der.clone()],
                PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// Greet, STARTTLS, then GO over TLS; errors (a refused certificate shows up
/// on the first read after the TLS handshake) come back as `Err`.
fn tls_connect(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<Client> {
    let mut plain = Client::tcp(addr);
    plain.greet();
    plain.send_option(OPT_STARTTLS, &[]);
    assert_eq!(plain.option_reply()?.0, REP_ACK);
    let tcp: TcpStream = plain.tcp_clone();
    drop(plain);
    let conn =
        rustls::ClientConnection::new(cfg, ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    let mut c = Client::over(Box::new(rustls::StreamOwned::new(conn, tcp)));
    let mut d = 1u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"d");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.try_send_option(OPT_GO, &d)?;
    loop {
        let (typ, _) = c.option_reply()?;
        if typ == REP_ACK {
            return Ok(c);
        }
        if typ != REP_INFO {
            return Err(std::io::Error::other(format!("GO failed: {typ:#x}")));
        }
    }
}

#[test]
fn starttls_with_project_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let disk = disk_file(dir.path(), "d.img", MIB, 0);
    let srv = tls_server(&p, TlsMode::Required, &disk);

    // Before TLS: options are refused, EXPORT_NAME disconnects.
    let mut c = Client::tcp(srv.tcp());
    c.greet();
    c.send_option(OPT_LIST, &[]);
    assert_eq!(c.option_replies()[0].0, REP_ERR_TLS_REQD);
    assert_eq!(c.go("d").0, REP_ERR_TLS_REQD);
    c.send_option(OPT_EXPORT_NAME, b"d");
    assert!(c.at_eof());

    // A CA-signed client certificate: served over TLS.
    let mut c = tls_connect(srv.tcp(), client_config(&p.server.ca, Some(&p.client))).unwrap();
    assert_eq!(c.write(4096, &[0x7e; 8192]), 0);
    assert_eq!(c.read(4096, 8192), (0, vec![0x7e; 8192]));
    c.disconnect();

    // No client certificate: refused.
    assert!(tls_connect(srv.tcp(), client_config(&p.server.ca, None)).is_err());
    // A certificate from another CA: refused.
    let other = tempfile::tempdir().unwrap();
    pki::init(&InitOptions::new(other.path())).unwrap();
    let foreign = pki::issue_leaf(other.path(), Role::Agent, "intruder", &[], &[]).unwrap();
    assert!(tls_connect(srv.tcp(), client_config(&p.server.ca, Some(&foreign))).is_err());
    // A client that does not trust the server's CA gives up by itself.
    assert!(
        tls_connect(
            srv.tcp(),
            client_config(&other.path().join("ca.pem"), Some(&p.client))
        )
        .is_err()
    );

    let s = srv.stop();
    assert!(s.handshake_failures >= 3, "{s:?}");
    let f = std::fs::read(&disk).unwrap();
    assert!(f[4096..12288].iter().all(|&b| b == 0x7e));
    assert!(f[..4096].iter().all(|&b| b == 0));
}

#[test]
fn optional_tls_serves_both() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let disk = disk_file(dir.path(), "d.img", MIB, 5);
    let srv = tls_server(&p, TlsMode::Optional, &disk);
    let mut plain = Client::tcp(srv.tcp());
    plain.connect_export("d");
    assert_eq!(plain.read(0, 512), (0, vec![5; 512]));
    plain.disconnect();
    let mut t = tls_connect(srv.tcp(), client_config(&p.server.ca, Some(&p.client))).unwrap();
    assert_eq!(t.read(0, 512), (0, vec![5; 512]));
    t.disconnect();
    srv.stop();
}

/// A client certificate signed by the project CA in `ca_dir` whose key usage
/// also allows key encipherment, written as qemu's `client-cert.pem` and
/// `client-key.pem` into `out`. qemu refuses a client certificate whose
/// (critical) key usage lacks keyEncipherment, which the project's leaves
/// (ECDSA: digitalSignature only) do not carry; see docs/NBD.md.
fn qemu_client_cert(ca_dir: &Path, out: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let dn = |cn: &str| {
        let mut d = DistinguishedName::new();
        d.push(DnType::OrganizationName, "tidemark");
        d.push(DnType::CommonName, cn);
        d
    };
    // The CA's fixed parameters, as crate::pki builds them.
    let mut ca = CertificateParams::default();
    ca.distinguished_name = dn("tidemark CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("qemu nbd client");
    p.subject_alt_names = vec![rcgen::SanType::DnsName(
        tls::name_san(Role::Agent, "qemu").try_into().unwrap(),
    )];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(ca_dir.join("ca.pem"), out.join("ca-cert.pem")).unwrap();
    std::fs::write(out.join("client-cert.pem"), cert.pem()).unwrap();
    std::fs::write(out.join("client-key.pem"), key.serialize_pem()).unwrap();
}

/// nbdinfo and qemu-io (both GnuTLS) against the STARTTLS server.
#[test]
fn real_clients_over_tls() {
    let (qemu_io, nbdinfo) = (tool("qemu-io"), tool("nbdinfo"));
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let disk = disk_file(dir.path(), "d.img", 8 * MIB, 0);
    let srv = tls_server(&p, TlsMode::Required, &disk);
    let port = srv.tcp().port();
    let qemu_dir = dir.path().join("qemu");
    qemu_client_cert(&p.dir, &qemu_dir);
    run_ok(
        Command::new(&qemu_io)
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                qemu_dir.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},\
                 export=d,tls-creds=tls0"
            ))
            .args(["-c", "write -P 0x6b 1M 2M", "-c", "read -P 0x6b 1M 2M"]),
        Duration::from_secs(60),
    );
    let f = std::fs::read(&disk).unwrap();
    assert!(f[MIB as usize..3 * MIB as usize].iter().all(|&b| b == 0x6b));

    let o = run_ok(
        Command::new(&nbdinfo).arg("--json").arg(format!(
            "nbds://127.0.0.1:{port}/d?tls-certificates={}",
            p.dir.display()
        )),
        Duration::from_secs(60),
    );
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["TLS"], true, "{}", o.stdout);
    assert_eq!(v["exports"][0]["export-size"], 8 * MIB);
    // Without certificates nbdinfo cannot get in.
    let o = run(
        Command::new(&nbdinfo).arg(format!("nbd://127.0.0.1:{port}/d")),
        Duration::from_secs(60),
    );
    assert!(
        !o.status.success(),
        "plaintext nbdinfo got in: {}",
        o.stdout
    );
    srv.stop();
}
