//! Checksum resync and online verify end to end: relay, target and agent as
//! processes on loopback. The initial replication of a disk with data sends
//! only its data; after the replica was damaged, `tidemark verify` finds
//! exactly the damaged blocks and `tidemark resync` sends exactly those.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::{Cluster, exe, tools};
use tidemark::util::prng::Prng;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;

fn resync_status(c: &Cluster) -> tidemark::agent::status::ResyncStatus {
    c.agent_status().expect("agent status").groups[0]
        .resync
        .clone()
}

fn relay_bytes_in(c: &Cluster) -> u64 {
    c.relay_status().expect("relay status").groups[0]
        .counters
        .bytes_in
}

/// `tidemark <cmd> --config agent.toml <args>`: (success, stdout).
fn agent_cmd(c: &Cluster, cmd: &str, args: &[&str]) -> (bool, String) {
    let out = tools::run(
        Command::new(exe())
            .arg(cmd)
            .arg("--config")
            .arg(c.path("agent.toml"))
            .args(args),
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        eprintln!(
            "tidemark {cmd} {args:?}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.success(), stdout)
}

fn verify_report(c: &Cluster) -> (bool, tidemark::agent::verify::VerifyReport) {
    let (ok, out) = agent_cmd(c, "verify", &["--disk", "0", "--json"]);
    let r = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("verify --json printed {out:?}: {e}\n{}", c.logs()));
    (ok, r)
}

#[test]
fn e2e_initial_replication_sends_only_data_and_resync_only_what_differs() {
    let size = 256 * MIB;
    let mut c = Cluster::new(size);
    // 32 MiB of data: 1 MiB every 8 MiB, holes between.
    c.prefill(3, 8 * MIB);
    c.start_relay();
    c.start_target();
    c.start_agent(&[]);
    c.wait_caught_up(Duration::from_secs(240));
    let s = resync_status(&c);
    assert_eq!(s.mode, "checksum");
    assert_eq!(s.compared_bytes, size, "{s:?}");
    assert_eq!(
        s.differing_bytes,
        32 * MIB,
        "only the data differs from an empty replica: {s:?}"
    );
    // On the wire: the data compressed, never more than the data plus 10 %.
    let sent = relay_bytes_in(&c);
    assert!(
        sent < 32 * MIB + 32 * MIB / 10,
        "{sent} bytes for 32 MiB of data"
    );
    // The empty replica answered without hashing: 4096 blocks cost 1 byte each.
    assert!(
        s.digest_reply_bytes < 64 << 10,
        "digest replies of an empty replica: {s:?}"
    );
    let (ok, r) = verify_report(&c);
    assert!(ok && r.mismatch_ranges == 0, "{r:?}");
    c.stop_all();
    c.assert_replica_equals_source();

    // Damage scattered blocks of the replica (in data and in holes).
    let planted: [u64; 12] = [3, 17, 64, 100, 101, 130, 200, 255, 300, 511, 1000, 4095];
    let f = std::fs::File::options()
        .write(true)
        .open(&c.replica)
        .unwrap();
    let mut rng = Prng::new(99);
    let mut junk = vec![0u8; BLOCK as usize];
    for b in planted {
        tidemark::util::datagen::fill(&mut junk, 0, &mut rng);
        f.write_all_at(&junk, b * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let mut expect: Vec<(u64, u64)> = Vec::new();
    for b in planted {
        match expect.last_mut() {
            Some(last) if last.1 == b * BLOCK => last.1 += BLOCK,
            _ => expect.push((b * BLOCK, (b + 1) * BLOCK)),
        }
    }

    c.start_relay();
    c.start_target();
    c.start_agent(&[]);
    c.wait_caught_up(Duration::from_secs(120));
    let (ok, r) = verify_report(&c);
    assert!(!ok, "verify exits non-zero when the replica differs");
    assert_eq!(r.mismatches, expect, "{r:?}");
    assert_eq!(r.mismatch_bytes, planted.len() as u64 * BLOCK);

    let before = relay_bytes_in(&c);
    let (ok, out) = agent_cmd(&c, "resync", &["--disk", "0"]);
    assert!(ok, "{out}");
    c.wait_caught_up(Duration::from_secs(120));
    let s = resync_status(&c);
    assert_eq!(s.compared_bytes, size, "{s:?}");
    assert_eq!(
        s.differing_bytes,
        planted.len() as u64 * BLOCK,
        "only the damaged blocks are sent: {s:?}"
    );
    let sent = relay_bytes_in(&c) - before;
    assert!(
        sent < planted.len() as u64 * BLOCK + 256 * 1024,
        "{sent} bytes on the wire for {} damaged blocks",
        planted.len()
    );
    let (ok, r) = verify_report(&c);
    assert!(ok && r.mismatch_ranges == 0, "{r:?}");
    c.stop_all();
    c.assert_replica_equals_source();
}
