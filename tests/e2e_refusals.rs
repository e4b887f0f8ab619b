//! Bad input through the real processes: each refusal is a one-line error that
//! names what is wrong, the other roles keep serving, and no byte of the replica
//! is written from the bad input.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Cluster, exe, tail, wait_until};
use tidemark::config::AgentConfig;
use tidemark::transport::tls::Role;

const MIB: u64 = 1 << 20;

/// The process's last stderr line, which must be its one-line reason.
fn last_line(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

fn agent_config_with(
    c: &Cluster,
    name: &str,
    edit: impl FnOnce(&mut AgentConfig),
) -> std::path::PathBuf {
    let mut cfg = AgentConfig::load(&c.path("agent.toml")).unwrap();
    cfg.agent.state_dir = c.dir.path().join(format!("{name}-state"));
    edit(&mut cfg);
    let p = c.path(&format!("{name}.toml"));
    fs::write(&p, cfg.to_toml_string().unwrap()).unwrap();
    p
}

fn file_hash(p: &Path) -> Option<Vec<u8>> {
    fs::read(p).ok()
}

#[test]
fn e2e_agent_certificate_from_another_ca_is_refused_and_relay_keeps_serving() {
    let mut c = Cluster::new(16 * MIB);
    c.start_relay();
    // A second, unrelated project: its agent certificate is not signed by our CA.
    let other = c.dir.path().join("other");
    let out = Command::new(exe())
        .args(["init", "--dir"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let cfg = agent_config_with(&c, "rogue", |cfg| {
        cfg.tls.cert = other.join("agent.pem");
        cfg.tls.key = other.join("agent.key");
    });
    let mut rogue = c.spawn_config("agent", &cfg, &[]);
    let st = rogue
        .wait_exit(Duration::from_secs(30))
        .expect("rogue agent must give up");
    assert!(!st.success());
    let line = last_line(&rogue.log_text());
    assert!(line.starts_with("tidemark: "), "{line}");
    assert!(
        line.contains("TLS") || line.contains("certificate"),
        "{line}"
    );
    let relay_log = c.relay.as_ref().unwrap().log_text();
    assert!(
        relay_log.contains("TLS handshake failed"),
        "{}",
        tail(&relay_log)
    );
    // The relay still serves the legitimate agent and target.
    c.start_target();
    c.start_agent(&["--workload-bytes", "4M"]);
    let last = c.wait_workload_done(Duration::from_secs(60));
    c.wait_applied(last, Duration::from_secs(60));
    c.stop_all();
    c.assert_replica_equals_source();
}

#[test]
fn e2e_agent_sending_for_a_group_it_does_not_own_is_refused() {
    let mut c = Cluster::new(16 * MIB);
    c.start_relay();
    // A certificate from our CA, for group "other" only.
    let leaf =
        tidemark::pki::issue_leaf(&c.conf, Role::Agent, "agent", &["other".into()], &[]).unwrap();
    let (cert, key) = (c.conf.join("narrow.pem"), c.conf.join("narrow.key"));
    tidemark::pki::write_leaf(&leaf, &cert, &key, false).unwrap();
    let cfg = agent_config_with(&c, "narrow", |cfg| {
        cfg.tls.cert = cert.clone();
        cfg.tls.key = key.clone();
    });
    let mut a = c.spawn_config("agent", &cfg, &[]);
    let st = a
        .wait_exit(Duration::from_secs(30))
        .expect("agent must give up");
    assert!(!st.success());
    let line = last_line(&a.log_text());
    assert!(line.starts_with("tidemark: "), "{line}");
    assert!(line.contains("not authorized for group g1"), "{line}");
    // The relay counted the refusal (its status is rewritten every 100 ms).
    wait_until(
        Duration::from_secs(10),
        "the relay to count the refusal",
        || c.relay_status().filter(|r| r.refused_sessions >= 1),
    );
    let relay_log = c.relay.as_ref().unwrap().log_text();
    assert!(
        relay_log.contains("not authorized for group g1"),
        "{}",
        tail(&relay_log)
    );
}

#[test]
fn e2e_bad_configs_are_one_line_errors_naming_file_and_field() {
    let c = Cluster::new(MIB);
    let cases = [
        (
            "relay",
            "relay.toml",
            "listen = ",
            "listen_typo = ",
            "relay.listen",
        ),
        (
            "target",
            "target.toml",
            "apply_batch_mib = 32",
            "apply_batch_mib = \"lots\"",
            "apply_batch_mib",
        ),
        (
            "agent",
            "agent.toml",
            "zstd_level = 1",
            "zstd_level = 99",
            "zstd_level",
        ),
    ];
    for (role, file, from, to, field) in cases {
        let text = fs::read_to_string(c.path(file)).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        let bad = c.path(&format!("bad-{file}"));
        fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        let out = Command::new(exe())
            .arg(role)
            .arg("--config")
            .arg(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{role} accepted a bad config");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = last_line(&err);
        assert!(line.starts_with("tidemark: "), "{err}");
        assert!(
            line.contains(&format!("bad-{file}")),
            "names the file: {line}"
        );
        assert!(line.contains(field), "names the field {field}: {line}");
    }
}

#[test]
fn e2e_replica_smaller_than_source_is_refused_and_untouched() {
    let mut c = Cluster::new(32 * MIB);
    c.prefill(9, 4 * MIB);
    // An existing replica, half the size of the source, with recognisable content.
    fs::write(&c.replica, vec![0x5a; (16 * MIB) as usize]).unwrap();
    let before = file_hash(&c.replica);
    c.start_relay();
    c.start_target();
    c.start_agent(&["--workload-bytes", "2M"]);
    let reason = wait_until(
        Duration::from_secs(60),
        "target to refuse the frame",
        || c.target_status()?.groups.first()?.stalled.clone(),
    );
    assert!(
        reason.contains(&c.replica.display().to_string()),
        "names the image: {reason}"
    );
    assert!(
        reason.contains(&(32 * MIB).to_string()),
        "names the source size: {reason}"
    );
    let relay = wait_until(
        Duration::from_secs(10),
        "relay to hear of the refusal",
        || c.relay_status()?.groups.first()?.last_target_error.clone(),
    );
    assert!(relay.contains("frame"), "{relay}");
    c.stop_all();
    assert!(
        file_hash(&c.replica) == before,
        "no byte of the replica may change"
    );
}

#[test]
fn e2e_frames_sealed_with_another_key_are_refused() {
    let mut c = Cluster::new(8 * MIB);
    c.start_relay();
    // The agent seals with a key the target does not have.
    let wrong = c.conf.join("keys").join("wrong.key");
    fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    let cfg = agent_config_with(&c, "agent", |cfg| cfg.groups[0].key_file = wrong.clone());
    assert_eq!(cfg, c.path("agent.toml"));
    c.start_target();
    c.start_agent(&["--workload-bytes", "1M"]);
    let reason = wait_until(
        Duration::from_secs(60),
        "target to refuse the frame",
        || c.target_status()?.groups.first()?.stalled.clone(),
    );
    assert!(reason.contains("authentication failed"), "{reason}");
    assert!(
        reason.contains("g1") && reason.contains("frame"),
        "names group and frame: {reason}"
    );
    let t = c.target_status().unwrap();
    assert_eq!(t.groups[0].frames_applied, 0);
    assert_eq!(t.groups[0].bytes_applied, 0);
    c.stop_all();
    // Nothing was applied: the replica was never even created.
    assert!(!c.replica.exists() || fs::read(&c.replica).unwrap().iter().all(|&b| b == 0));
}
