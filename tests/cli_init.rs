//! `tidemark init` through the built binary: files, modes, refusal to overwrite.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn tidemark() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tidemark"))
}

#[test]
fn init_writes_configs_and_private_keys() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("conf");
    let out = tidemark()
        .args(["init", "--dir"])
        .arg(&dir)
        .args(["--group", "g1", "--group", "db"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "relay.toml",
        "target.toml",
        "agent.toml",
        "ca.pem",
        "keys/g1.key",
        "keys/db.key",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    for f in [
        "ca.key",
        "relay.key",
        "agent.key",
        "target.key",
        "keys/g1.key",
    ] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let relay = std::fs::read_to_string(dir.join("relay.toml")).unwrap();
    assert!(
        !relay.contains("key_file"),
        "relay config must hold no data key"
    );
    tidemark::config::RelayConfig::load(&dir.join("relay.toml")).unwrap();
    tidemark::config::TargetConfig::load(&dir.join("target.toml")).unwrap();
    tidemark::config::AgentConfig::load(&dir.join("agent.toml")).unwrap();

    // A second init into the same directory refuses, with a one-line reason.
    let out = tidemark()
        .args(["init", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("tidemark: "), "{err}");
}

#[test]
fn bad_group_name_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = tidemark()
        .args(["init", "--dir"])
        .arg(d.path())
        .args(["--group", "Bad_Name"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bad_Name"));
}
