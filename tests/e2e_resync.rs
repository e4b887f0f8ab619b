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

/// `tidemark <cmd> --config agent.toml <args>`: (success, stdout, stderr).
fn agent_cmd(c: &Cluster, cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = tools::run(
        Command::new(exe())
            .arg(cmd)
            .arg("--config")
            .arg(c.path("agent.toml"))
            .args(args),
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        eprintln!(
            "tidemark {cmd} {args:?}: {}\n{stdout}\n{stderr}",
            out.status
        );
    }
    (out.status.success(), stdout, stderr)
}

fn verify_report(c: &Cluster) -> (bool, tidemark::agent::verify::VerifyReport) {
    let (ok, out, _) = agent_cmd(c, "verify", &["--disk", "0", "--json"]);
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
    let (ok, out, _) = agent_cmd(&c, "resync", &["--disk", "0"]);
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

/// Overwrite `blocks` 64 KiB blocks of `path` with seeded junk.
fn damage(path: &std::path::Path, blocks: impl IntoIterator<Item = u64>, seed: u64) -> u64 {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    let mut rng = Prng::new(seed);
    let mut junk = vec![0u8; BLOCK as usize];
    let mut n = 0;
    for b in blocks {
        tidemark::util::datagen::fill(&mut junk, 0, &mut rng);
        f.write_all_at(&junk, b * BLOCK).unwrap();
        n += 1;
    }
    f.sync_all().unwrap();
    n
}

/// A replicated cluster of `size` bytes with `prefill`ed data, stopped.
fn replicated(size: u64) -> Cluster {
    let mut c = Cluster::new(size);
    c.prefill(3, 4 * MIB);
    c.start_relay();
    c.start_target();
    c.start_agent(&[]);
    c.wait_caught_up(Duration::from_secs(240));
    c.stop_all();
    c
}

#[test]
fn e2e_resync_under_a_concurrent_writer_ends_equal_with_the_range_in_the_catalog() {
    let size = 256 * MIB;
    let mut c = replicated(size);
    // Every 8th block of the replica damaged: 512 blocks, 32 MiB.
    let damaged = damage(&c.replica, (0..size / BLOCK).step_by(8), 5);
    c.start_relay();
    c.start_target();
    c.start_agent(&[
        "--workload-bytes",
        "96M",
        "--workload-seed",
        "21",
        "--workload-rate-mb-s",
        "24",
    ]);
    std::thread::sleep(Duration::from_millis(800));
    let (ok, out, _) = agent_cmd(&c, "resync", &["--disk", "0"]);
    assert!(ok, "{out}");
    let last = c.wait_workload_done(Duration::from_secs(240));
    c.wait_applied(last, Duration::from_secs(240));
    // Consistent: the W frame after the copy closed the resync range (the
    // agent's journal can be empty and the target at its last seq before
    // that frame is applied).
    c.wait_consistent(Duration::from_secs(240));
    let s = resync_status(&c);
    // A damaged block the writer rewrote before the compare reached it was
    // repaired by that write (applied at the target first): not sent again.
    assert!(
        s.differing_bytes >= damaged * BLOCK / 2 && s.differing_bytes <= size,
        "the damaged blocks were sent: {s:?}"
    );
    let json = c.target_cmd(&["points", "--json"]);
    c.stop_all();
    c.assert_replica_equals_source();

    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ranges = v["inconsistent"].as_array().unwrap();
    let resync: Vec<&serde_json::Value> = ranges
        .iter()
        .filter(|r| r["reason"].as_str().unwrap_or("").contains("resync"))
        .collect();
    assert!(!resync.is_empty(), "no resync range in the catalog: {json}");
    for r in &resync {
        let after = r["after_seq"].as_u64().unwrap();
        let end = r["end_seq"].as_u64().expect("the resync range is closed");
        for p in v["points"].as_array().unwrap() {
            let seq = p["seq"].as_u64().unwrap();
            assert!(
                !(after < seq && seq < end),
                "point {seq} lies inside the resync range {after}..{end}: {json}"
            );
        }
    }
}

#[test]
fn e2e_a_grown_disk_is_reported_then_at_restart_the_replica_grows_and_only_the_new_space_is_compared()
 {
    let old = 64 * MIB;
    let new = 160 * MIB;
    let mut c = Cluster::new(old);
    c.prefill(3, 4 * MIB);
    c.start_relay();
    c.start_target();
    // A few writes after the initial copy close its inconsistent range.
    c.start_agent(&["--workload-bytes", "1M", "--workload-seed", "5"]);
    let last = c.wait_workload_done(Duration::from_secs(240));
    c.wait_applied(last, Duration::from_secs(240));
    c.wait_caught_up(Duration::from_secs(240));
    // Grow the source while the agent runs, with data in the new space: the
    // agent says so in its status and goes on protecting the old size.
    let f = std::fs::File::options()
        .write(true)
        .open(&c.source)
        .unwrap();
    f.set_len(new).unwrap();
    let mut data = vec![0u8; MIB as usize];
    tidemark::util::datagen::fill(&mut data, 0, &mut Prng::new(77));
    f.write_all_at(&data, 100 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let d = common::wait_until(
        Duration::from_secs(30),
        "the agent to see the growth",
        || {
            c.agent_status()
                .map(|s| s.groups[0].disks[0].clone())
                .filter(|d| d.grown_to.is_some())
        },
    );
    assert_eq!((d.size, d.grown_to), (old, Some(new)));
    // It takes effect at the next start.
    c.stop_all();
    c.start_relay();
    c.start_target();
    c.start_agent(&[]);
    c.wait_caught_up(Duration::from_secs(240));
    let s = resync_status(&c);
    assert_eq!(
        s.compared_bytes,
        new - old,
        "only the new space is compared: {s:?}"
    );
    assert_eq!(s.differing_bytes, MIB, "{s:?}");
    let json = c.target_cmd(&["points", "--json"]);
    c.stop_all();
    c.assert_replica_equals_source();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["inconsistent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["reason"].as_str().unwrap_or("").contains("disk-grown")),
        "the catalog names the reason: {json}"
    );
}

#[test]
fn e2e_each_role_killed_mid_resync_it_resumes_and_ends_equal() {
    let size = 256 * MIB;
    let mut c = Cluster::new(size);
    // Data everywhere, so the initial copy is a long resync; capped so the
    // kills land in the middle of it, and the dirty log persisted often so
    // the agent resumes close to where it was.
    c.prefill(7, MIB);
    c.start_relay();
    c.configure_agent(|a| {
        a.agent.dirty_flush_ms = 200;
        a.groups[0].resync_max_mib_s = 48;
    });
    c.start_target();
    c.start_agent(&[]);
    let progress = |c: &Cluster| {
        c.agent_status()
            .map_or(0, |s| s.groups[0].resync.compared_bytes)
    };
    let wait_progress = |c: &Cluster, at_least: u64| {
        common::wait_until(Duration::from_secs(120), "resync progress", || {
            (progress(c) >= at_least).then_some(())
        })
    };
    wait_progress(&c, 32 * MIB);
    c.target.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_millis(500));
    c.start_target();
    let before = progress(&c);
    wait_progress(&c, before + 32 * MIB);
    c.relay.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_millis(500));
    c.start_relay();
    let before = progress(&c);
    wait_progress(&c, before + 32 * MIB);
    let done_before_kill = progress(&c);
    std::thread::sleep(Duration::from_millis(600));
    c.agent.as_mut().unwrap().kill9();
    c.start_agent(&[]);
    // While the resumed copy runs, a second resync of the disk is refused.
    common::wait_until(Duration::from_secs(30), "the restarted agent", || {
        c.agent_status()
            .filter(|s| Some(s.pid) == c.agent.as_ref().map(|a| a.pid()))
    });
    let (ok, _, err) = agent_cmd(&c, "resync", &["--disk", "0"]);
    assert!(!ok, "a second resync while one runs must be refused");
    assert!(err.contains("already being resynced"), "{err}");
    c.wait_caught_up(Duration::from_secs(240));
    let s = resync_status(&c);
    // The restarted agent compared only what was not done before the kill
    // (give or take what it did after the last dirty-log snapshot).
    assert!(
        s.compared_bytes <= size - done_before_kill + 64 * MIB,
        "the restarted agent compared {} bytes; {} were done before the kill",
        s.compared_bytes,
        done_before_kill
    );
    c.stop_all();
    c.assert_replica_equals_source();
}

#[test]
fn e2e_failover_then_failback_sends_only_the_delta_and_the_original_ends_equal() {
    let size = 256 * MIB;
    let mut c = Cluster::new(size);
    c.prefill(3, 4 * MIB);
    c.start_relay();
    c.start_target();
    c.start_agent(&["--workload-bytes", "8M", "--workload-seed", "4"]);
    let last = c.wait_workload_done(Duration::from_secs(120));
    c.wait_applied(last, Duration::from_secs(120));
    // `latest` names a point only once the W frame after the initial copy
    // is applied.
    c.wait_consistent(Duration::from_secs(120));
    // Disaster: the protected machine is gone. Fail over at the last point.
    c.agent.as_mut().unwrap().kill9();
    c.target_cmd(&["recover", "--point", "latest", "--promote"]);
    c.stop_all();
    // The recovered machine runs on the promoted replica and writes to it.
    let written = damage(&c.replica, (100..4000).step_by(97), 8);

    // A failback pointed at a disk in use is refused: the original agent
    // still protects the original disk.
    let mut fb = Cluster::new(MIB);
    fb.source = c.replica.clone();
    fb.replica = c.source.clone();
    c.start_agent(&[]);
    common::wait_until(Duration::from_secs(30), "the original agent", || {
        c.agent_status()
            .filter(|s| Some(s.pid) == c.agent.as_ref().map(|a| a.pid()))
    });
    fb.start_relay();
    fb.start_target();
    let mut t = fb.target.take().unwrap();
    let st = t
        .wait_exit(Duration::from_secs(60))
        .expect("a target whose replica is in use must stop");
    assert!(!st.success());
    assert!(
        t.log_text().contains("in use by another tidemark process"),
        "{}",
        common::tail(&t.log_text())
    );
    c.agent.as_mut().unwrap().kill9();

    // Fail back: reverse replication from the promoted replica to the
    // original disk, which still exists: only the differences travel.
    fb.start_target();
    fb.start_agent(&[]);
    fb.wait_caught_up(Duration::from_secs(240));
    let s = resync_status(&fb);
    let sent = relay_bytes_in(&fb);
    fb.stop_all();
    assert!(
        s.differing_bytes >= written * BLOCK && s.differing_bytes < size / 8,
        "delta only: {s:?}"
    );
    assert!(
        sent < size / 8,
        "{sent} bytes on the wire for a {size}-byte disk"
    );
    let same = tidemark::bench::run::compare_files(&c.source, &c.replica).unwrap();
    assert!(same, "the original disk does not equal the promoted one");
}

/// The agent's state directory is lost (or restored from an older copy) while
/// the relay holds the group's chain: the agent finds frames and seqs it never
/// numbered at the relay's head. Its disks may hold anything relative to the
/// replica, so it compares every disk by checksum, continues the chain above
/// the relay's head with fresh seqs, and the replica ends equal to the source.
#[test]
fn e2e_an_agent_whose_state_was_lost_compares_every_disk_and_continues_above_the_relay() {
    let size = 64 * MIB;
    let mut c = Cluster::new(size);
    c.prefill(5, 4 * MIB);
    c.start_relay();
    c.start_target();
    c.start_agent(&["--workload-bytes", "8M", "--workload-seed", "51"]);
    let before = c.wait_workload_done(Duration::from_secs(120));
    c.wait_applied(before, Duration::from_secs(120));
    c.agent.as_mut().unwrap().stop(Duration::from_secs(40));
    // The state directory is gone; the disk changed meanwhile (restored from
    // a backup, say).
    let state = tidemark::config::AgentConfig::load(&c.path("agent.toml"))
        .unwrap()
        .agent
        .state_dir;
    std::fs::remove_dir_all(&state).unwrap();
    let changed = damage(&c.source, (10..1000).step_by(41), 52);
    c.start_agent(&["--workload-bytes", "4M", "--workload-seed", "53"]);
    let last = c.wait_workload_done(Duration::from_secs(120));
    assert!(
        last > before,
        "new seqs above the relay's: {last} <= {before}"
    );
    c.wait_caught_up(Duration::from_secs(240));
    let s = resync_status(&c);
    assert!(s.compared_bytes >= size, "every disk was compared: {s:?}");
    assert!(
        s.differing_bytes >= changed * BLOCK,
        "the changed blocks were found: {s:?}"
    );
    let logs = c.logs();
    assert!(
        logs.contains("beyond anything this agent numbered"),
        "{logs}"
    );
    c.stop_all();
    c.assert_replica_equals_source();
}

/// The relay lost frames it had acknowledged (its spool went with its disk)
/// while the target had not applied them: a gap redelivery cannot close. The
/// agent finds the relay behind the seq it acknowledged, compares every disk
/// by checksum (only the lost writes travel), and its first frame is marked
/// REBASE, so the target continues from it; the catalog shows the range.
#[test]
fn e2e_a_relay_that_lost_acknowledged_frames_is_a_chain_gap_resynced_by_checksum() {
    let size = 64 * MIB;
    let mut c = Cluster::new(size);
    c.prefill(3, 4 * MIB);
    c.start_relay();
    c.start_target();
    c.start_agent(&[]);
    c.wait_consistent(Duration::from_secs(240));
    c.stop_all();
    // 8 MiB in 64 KiB writes from the start of the disk, acknowledged by the
    // relay while the target is away; the agent then stops in order.
    c.start_relay();
    c.start_agent(&[
        "--workload-bytes",
        "8M",
        "--workload-pattern",
        "sequential",
        "--workload-seed",
        "33",
        "--exit-after-workload",
    ]);
    let agent = c.agent.as_mut().unwrap();
    let st = agent.wait_exit(Duration::from_secs(240));
    assert!(
        st.is_some_and(|s| s.success()),
        "agent: {st:?}\n{}",
        c.logs()
    );
    c.stop_all();
    // The relay's disk is lost.
    let spool = tidemark::config::RelayConfig::load(&c.path("relay.toml"))
        .unwrap()
        .relay
        .spool_dir;
    std::fs::remove_dir_all(&spool).unwrap();

    c.start_relay();
    c.start_target();
    c.start_agent(&[]);
    c.wait_consistent(Duration::from_secs(240));
    let s = resync_status(&c);
    assert_eq!(
        s.differing_bytes,
        8 * MIB,
        "exactly the lost writes differ: {s:?}"
    );
    assert!(s.compared_bytes >= size, "every disk was compared: {s:?}");
    let sent = relay_bytes_in(&c);
    assert!(sent < 16 * MIB, "only the lost writes travel: {sent} bytes");
    let logs = c.logs();
    assert!(logs.contains("chain gap"), "{logs}");
    assert!(logs.contains("REBASE frame"), "{logs}");
    // The catalog closes the range at the boundary after the first W frame
    // (the next frame or heartbeat).
    let json = common::wait_until(
        Duration::from_secs(60),
        "the chain-gap range closed",
        || {
            let json = c.target_cmd(&["points", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&json).ok()?;
            v["inconsistent"]
                .as_array()?
                .iter()
                .any(|r| {
                    r["reason"].as_str().unwrap_or("").contains("chain-gap")
                        && r["end_seq"].is_u64()
                })
                .then_some(json)
        },
    );
    c.stop_all();
    c.assert_replica_equals_source();
    let applylog = c.target_state_dir().join("g1").join("apply.log");
    let sum = tidemark::target::check_apply_log(&applylog)
        .unwrap_or_else(|e| panic!("apply log {}: {e}", applylog.display()));
    assert!(sum.merges > 0, "{sum:?}");

    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ranges = v["inconsistent"].as_array().unwrap();
    let gap: Vec<&serde_json::Value> = ranges
        .iter()
        .filter(|r| r["reason"].as_str().unwrap_or("").contains("chain-gap"))
        .collect();
    assert_eq!(gap.len(), 1, "one chain-gap range: {json}");
    let after = gap[0]["after_seq"].as_u64().unwrap();
    let end = gap[0]["end_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("the range is closed: {json}"));
    for p in v["points"].as_array().unwrap() {
        let seq = p["seq"].as_u64().unwrap();
        assert!(
            !(after < seq && seq < end),
            "point {seq} lies inside the chain-gap range {after}..{end}: {json}"
        );
    }

    // Again while the agent runs: the relay loses its spool and comes back.
    // The agent's session finds the chain broken; the agent keeps capturing,
    // stops its pipeline, marks every disk pending and starts a new stretch
    // of the chain without a restart.
    c.start_relay();
    c.start_agent(&[
        "--workload-bytes",
        "4M",
        "--workload-pattern",
        "sequential",
        "--workload-seed",
        "34",
    ]);
    let last = c.wait_workload_done(Duration::from_secs(240));
    common::wait_until(
        Duration::from_secs(60),
        "the relay to hold the workload",
        || (c.agent_status()?.groups[0].acked.last_seq >= last).then_some(()),
    );
    let agent_pid = c.agent.as_ref().unwrap().pid();
    c.relay.as_mut().unwrap().kill9();
    std::fs::remove_dir_all(&spool).unwrap();
    c.start_relay();
    common::wait_until(
        Duration::from_secs(60),
        "the agent to find the chain broken",
        || {
            c.agent
                .as_ref()
                .unwrap()
                .log_text()
                .contains("lost frames it had acknowledged")
                .then_some(())
        },
    );
    c.start_target();
    c.wait_consistent(Duration::from_secs(240));
    let agent = c.agent.as_mut().unwrap();
    assert_eq!(agent.pid(), agent_pid);
    assert!(
        agent.exited().is_none(),
        "the agent kept running\n{}",
        c.logs()
    );
    let s = resync_status(&c);
    assert_eq!(s.differing_bytes, 4 * MIB, "exactly the lost writes: {s:?}");
    c.stop_all();
    c.assert_replica_equals_source();
    tidemark::target::check_apply_log(&applylog)
        .unwrap_or_else(|e| panic!("apply log {}: {e}", applylog.display()));
}

/// A target that lost its own state (watermark, redo, catalog) after the
/// relay trimmed the frames it had acknowledged: no relay can supply them.
/// The relay says so and names the re-seed; `tidemark relay reset-group`
/// (refused while the relay runs) drops the group's spool, and the agent's
/// chain-gap path compares every disk by checksum. The replica, which still
/// holds everything, ends equal with nothing but digests on the wire.
#[test]
fn e2e_a_target_that_lost_its_state_is_reseeded_by_resetting_the_group_at_the_relay() {
    let size = 64 * MIB;
    let mut c = Cluster::new(size);
    c.prefill(3, 4 * MIB);
    c.start_relay();
    c.start_target();
    c.start_agent(&["--workload-bytes", "4M", "--workload-seed", "8"]);
    let last = c.wait_workload_done(Duration::from_secs(240));
    c.wait_applied(last, Duration::from_secs(240));
    c.wait_caught_up(Duration::from_secs(240));
    c.stop_all();
    // The target's state is lost; its replica survives.
    std::fs::remove_dir_all(c.target_state_dir()).unwrap();
    c.start_relay();
    c.start_target();
    c.start_agent(&[]);
    let err = common::wait_until(
        Duration::from_secs(60),
        "the relay to name the re-seed",
        || {
            c.relay_status()?
                .groups
                .first()?
                .last_target_error
                .clone()
                .filter(|e| e.contains("reset-group"))
        },
    );
    assert!(err.contains("continuing the target's frame 0"), "{err}");
    let reset = |c: &Cluster| {
        tools::run(
            Command::new(exe())
                .args(["relay", "reset-group", "--config"])
                .arg(c.path("relay.toml"))
                .args(["--group", "g1"]),
            Duration::from_secs(60),
        )
    };
    let out = reset(&c);
    assert!(!out.status.success(), "refused while the relay runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("locked"), "{stderr}");
    c.relay.as_mut().unwrap().stop(Duration::from_secs(40));
    let out = reset(&c);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.start_relay();
    c.wait_consistent(Duration::from_secs(240));
    let s = resync_status(&c);
    assert!(s.compared_bytes >= size, "every disk compared: {s:?}");
    assert_eq!(s.differing_bytes, 0, "the replica held everything: {s:?}");
    let logs = c.logs();
    assert!(logs.contains("chain gap"), "{logs}");
    c.stop_all();
    c.assert_replica_equals_source();
}

/// Blocks (64 KiB) of `a` and `b` that differ, as byte offsets (a short or
/// missing file reads as zeros past its end).
fn differing_blocks(a: &std::path::Path, b: &std::path::Path, size: u64) -> Vec<u64> {
    let open = |p: &std::path::Path| {
        std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let (fa, fb) = (open(a), open(b));
    let read = |f: &std::fs::File, off: u64, buf: &mut [u8]| {
        buf.fill(0);
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => panic!("reading at {}: {e}", off + done as u64),
            }
        }
    };
    let (mut x, mut y) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    let mut out = Vec::new();
    for off in (0..size).step_by(BLOCK as usize) {
        read(&fa, off, &mut x);
        read(&fb, off, &mut y);
        if x != y {
            out.push(off);
        }
    }
    out
}

/// `reading <len> bytes at offset <offset>` in a copy error: the range.
fn failed_copy_range(error: &str) -> Option<std::ops::Range<u64>> {
    let rest = &error[error.find("reading ")? + "reading ".len()..];
    let mut words = rest.split(' ');
    let len: u64 = words.next()?.parse().ok()?;
    let rest = &rest[rest.find("at offset ")? + "at offset ".len()..];
    let off: u64 = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(off..off + len)
}

/// Poll the running agent's own status until `f` accepts it; on timeout fail
/// with the last status seen and the roles' logs.
fn wait_agent<T>(
    c: &mut Cluster,
    limit: Duration,
    what: &str,
    mut f: impl FnMut(&tidemark::agent::AgentStatus) -> Option<T>,
) -> T {
    let t0 = std::time::Instant::now();
    let mut last = None;
    while t0.elapsed() < limit {
        if let Some(a) = c.agent.as_mut()
            && let Some(st) = a.exited()
        {
            panic!("agent exited with {st}:\n{}", common::tail(&a.log_text()));
        }
        if let Some(s) = c.agent_status()
            && Some(s.pid) == c.agent.as_ref().map(|a| a.pid())
        {
            if let Some(v) = f(&s) {
                return v;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = last.map(|s| {
        let g = &s.groups[0];
        format!(
            "mode {:?}, pending {} bytes, entries {}, last error {:?}, resync {:?}",
            g.journal.mode.mode, g.journal.pending_bytes, g.journal.entries, g.last_error, g.resync
        )
    });
    panic!(
        "timed out after {limit:?} waiting for {what}; last agent status: {last:?}\n{}",
        c.logs()
    );
}

/// A source disk that returns read errors in the middle of the initial copy
/// (a FUSE file failing reads of one range with EIO): the unreadable region
/// stays pending, across an agent restart too; the error is in the status and
/// the log with the disk's path and the offset; everything else is copied and
/// new writes keep reaching the replica. Once the disk reads again, the region
/// is copied and the replica ends equal to the source.
#[test]
fn e2e_a_source_read_error_mid_resync_keeps_its_region_pending_and_the_rest_goes_on() {
    use tidemark::capture::modes::Mode;
    let size = 128 * MIB;
    let chunk = tidemark::capture::protected::COPY_CHUNK as u64;
    // The source: data everywhere (so every block differs from the empty
    // replica), served over FUSE with a 200 KiB unreadable range in the middle
    // of the disk's one pending run.
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("source.raw");
    {
        let f = std::fs::File::create(&img).unwrap();
        let mut rng = Prng::new(11);
        let mut buf = vec![0u8; MIB as usize];
        for off in (0..size).step_by(MIB as usize) {
            tidemark::util::datagen::fill(&mut buf, 30, &mut rng);
            f.write_all_at(&buf, off).unwrap();
        }
        f.sync_all().unwrap();
    }
    let bad = 50 * MIB + 100 * 1024..50 * MIB + 300 * 1024;
    // Declared before the cluster: unmounted after the agent is gone.
    let disk = common::faulty::FaultyDisk::mount(&img, bad.clone());
    let mut c = Cluster::new(size);
    c.source = disk.file.clone();
    c.start_relay();
    let sock = c.dir.path().join("disk0.sock");
    c.configure_agent(|a| {
        a.groups[0].disks[0].nbd = Some(tidemark::config::NbdFrontend {
            listen: vec![format!("unix:{}", sock.display())],
            export: Some("disk0".into()),
            tls: tidemark::config::NbdTls::Off,
            max_request_kib: 4 * 1024,
            max_connections: 4,
        });
    });
    c.start_target();
    c.start_agent(&[]);
    let uri = c.wait_frontend("nbd");
    let path = disk.file.display().to_string();

    // The read error is reported, naming the disk's path and an offset whose
    // range covers the unreadable bytes.
    let error = wait_agent(&mut c, Duration::from_secs(120), "the read error", |s| {
        s.groups[0]
            .last_error
            .clone()
            .filter(|e| e.contains("for a copy"))
    });
    assert!(error.contains(&path), "the error names the disk: {error}");
    let failed = failed_copy_range(&error)
        .unwrap_or_else(|| panic!("the error names the range it could not read: {error}"));
    assert!(
        failed.start < bad.end && bad.start < failed.end && failed.end - failed.start <= chunk,
        "the failed read {failed:?} is one copy step over the bad range {bad:?}: {error}"
    );
    assert!(disk.failed_reads() > 0);

    // A write elsewhere while the region fails reaches the replica.
    common::tools::require_tool("qemu-io", "qemu-utils");
    common::tools::run_ok(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xcd 100M 1M", &uri]),
        Duration::from_secs(60),
    );
    let replica = c.replica.clone();
    common::wait_until(
        Duration::from_secs(60),
        "the new write on the replica",
        || {
            let f = std::fs::File::open(&replica).ok()?;
            let mut b = vec![0u8; MIB as usize];
            f.read_exact_at(&mut b, 100 * MIB).ok()?;
            b.iter().all(|&x| x == 0xcd).then_some(())
        },
    );

    // Everything but the step(s) holding the unreadable range is copied; the
    // group stays draining, the replica is not consistent.
    let at_most = 2 * chunk;
    let seq = wait_agent(
        &mut c,
        Duration::from_secs(180),
        "all but the unreadable region copied and acknowledged",
        |s| {
            let j = &s.groups[0].journal;
            (j.disks[0].pending_bytes <= at_most && j.entries == 0)
                .then(|| j.next_seq.saturating_sub(1))
        },
    );
    c.wait_applied(seq, Duration::from_secs(120));
    let s = c.agent_status().unwrap();
    let j = &s.groups[0].journal;
    assert_eq!(j.mode.mode, Mode::Drain, "{:?}", j.mode);
    let pending = j.disks[0].pending_bytes;
    assert!(pending > 0, "the unreadable region stays pending");
    assert!(
        !c.target_status().unwrap().groups[0].consistent,
        "the replica is not consistent while a region is pending"
    );
    let differ = differing_blocks(&disk.image, &c.replica, size);
    let near = bad.start.saturating_sub(chunk)..bad.end + chunk;
    assert!(
        differ.iter().all(|b| near.contains(b)),
        "only blocks near the unreadable range {bad:?} may be missing; these differ: {differ:?}"
    );
    let bad_blocks = (bad.start / BLOCK * BLOCK..bad.end).step_by(BLOCK as usize);
    for b in bad_blocks {
        assert!(differ.contains(&b), "unreadable block {b} was copied?");
    }
    let log = c.agent.as_ref().unwrap().log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("copy failed") && l.contains(&path) && l.contains("offset")),
        "the agent's log names the failed copy, the path and the offset:\n{}",
        common::tail(&log)
    );

    // An agent restart keeps the region pending (the dirty log), and only it:
    // the restarted agent fails on it again and copies nothing else.
    c.agent.as_mut().unwrap().stop(Duration::from_secs(40));
    c.start_agent(&[]);
    wait_agent(
        &mut c,
        Duration::from_secs(120),
        "the restarted agent failing the same region",
        |s| {
            let g = &s.groups[0];
            let p = g.journal.disks[0].pending_bytes;
            let e = g.last_error.as_deref().unwrap_or("");
            (e.contains("for a copy") && p == pending).then_some(())
        },
    );
    let s = c.agent_status().unwrap();
    assert!(
        s.groups[0].resync.compared_bytes <= at_most,
        "the restarted agent compared only the pending region: {:?}",
        s.groups[0].resync
    );

    // The disk reads again: the region is copied, the replica ends equal.
    disk.heal();
    c.wait_consistent(Duration::from_secs(180));
    c.stop_all();
    let differ = differing_blocks(&disk.image, &c.replica, size);
    assert!(differ.is_empty(), "the replica differs at {differ:?}");
}
