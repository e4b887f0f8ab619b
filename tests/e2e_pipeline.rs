//! The pipeline end to end: relay, target and agent as separate processes of the
//! built binary on loopback with mutual TLS; a seeded workload; the replica must
//! equal the source byte for byte, also when the relay or the target is killed
//! with SIGKILL and restarted mid-run; the target's apply log must show that no
//! frame was ever applied out of chain order.

mod common;

use std::time::Duration;

use common::Cluster;

const MIB: u64 = 1 << 20;

#[test]
fn e2e_three_processes_replicate_256_mib_byte_for_byte() {
    let mut c = Cluster::new(512 * MIB);
    // Existing data for the initial copy: 1 MiB every 8 MiB, holes between.
    c.prefill(3, 8 * MIB);
    c.start_relay();
    c.start_target();
    c.start_agent(&["--workload-bytes", "256M", "--workload-seed", "7"]);
    let last = c.wait_workload_done(Duration::from_secs(240));
    c.wait_applied(last, Duration::from_secs(240));
    let relay = c.relay_status().expect("relay status");
    c.stop_all();
    c.assert_replica_equals_source();
    let s = c.check_apply_log();
    assert_eq!(s.starts, 1, "the target ran once");
    assert!(s.applies > 10, "{s:?}");
    // The relay forwarded what it stored, and the target acknowledged it all.
    let g = &relay.groups[0];
    assert!(
        g.counters.frames_in > 0 && g.counters.frames_out >= g.counters.frames_in,
        "{g:?}"
    );
    let a = c.agent_status().unwrap();
    assert_eq!(
        a.groups[0].journal.entries, 0,
        "everything acknowledged at the agent"
    );
}

/// Kill one role with SIGKILL twice while the workload runs, restart it each time.
fn kill_twice_mid_run(victim: &str) -> Cluster {
    let mut c = Cluster::new(256 * MIB);
    c.prefill(5, 16 * MIB);
    c.start_relay();
    c.start_target();
    // ~6 s of writes, so the kills land mid-run.
    c.start_agent(&[
        "--workload-bytes",
        "256M",
        "--workload-seed",
        "11",
        "--workload-rate-mb-s",
        "45",
    ]);
    for pause in [1500u64, 2000] {
        std::thread::sleep(Duration::from_millis(pause));
        match victim {
            "relay" => {
                c.relay.as_mut().unwrap().kill9();
                std::thread::sleep(Duration::from_millis(300));
                c.start_relay();
            }
            "target" => {
                c.target.as_mut().unwrap().kill9();
                std::thread::sleep(Duration::from_millis(300));
                c.start_target();
            }
            _ => unreachable!(),
        }
    }
    let last = c.wait_workload_done(Duration::from_secs(240));
    c.wait_applied(last, Duration::from_secs(240));
    c.stop_all();
    c.assert_replica_equals_source();
    c
}

#[test]
fn e2e_relay_killed_twice_mid_run() {
    let c = kill_twice_mid_run("relay");
    let s = c.check_apply_log();
    assert_eq!(s.starts, 1);
    let a = c.agent_status().unwrap();
    assert!(
        a.groups[0].reconnects >= 2,
        "the agent reconnected after each kill: {:?}",
        a.groups[0]
    );
}

#[test]
fn e2e_target_killed_twice_mid_run() {
    let c = kill_twice_mid_run("target");
    let s = c.check_apply_log();
    assert_eq!(s.starts, 3, "one start and two restarts: {s:?}");
}

#[test]
fn e2e_agent_restarts_clean_continues_and_after_a_crash_resyncs_dirty_regions() {
    let mut c = Cluster::new(128 * MIB);
    c.prefill(13, 8 * MIB);
    c.start_relay();
    c.start_target();
    // A first run, stopped in order once its writes are durable at the relay.
    c.start_agent(&[
        "--workload-bytes",
        "32M",
        "--workload-seed",
        "21",
        "--exit-after-workload",
    ]);
    let st = c
        .agent
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(120))
        .expect("agent stops by itself after its workload");
    assert!(st.success(), "{}", c.logs());
    let first = c.agent_status().unwrap().groups[0].acked;
    // An orderly restart continues the chain without copying the disk again.
    c.start_agent(&["--workload-bytes", "16M", "--workload-seed", "22"]);
    let last = c.wait_workload_done(Duration::from_secs(120));
    let a = c.agent_status().unwrap();
    let d = &a.groups[0].disks[0];
    assert_eq!(
        d.start_pending_bytes, 0,
        "no second copy: {}",
        d.start_reason
    );
    assert_eq!(d.capture.copied_bytes, 0);
    assert!(last > first.last_seq);
    c.wait_applied(last, Duration::from_secs(120));
    // A crash (SIGKILL) in the middle of writes: the next start cannot vouch for
    // what was only in memory, so it copies what the dirty log marks (here the
    // random writes touched most of the small disk) and the replica converges.
    c.agent.as_mut().unwrap().kill9();
    c.start_agent(&[
        "--workload-bytes",
        "64M",
        "--workload-seed",
        "23",
        "--workload-rate-mb-s",
        "30",
    ]);
    std::thread::sleep(Duration::from_millis(1200));
    let seq_before = c.agent_status().unwrap().groups[0].journal.next_seq;
    c.agent.as_mut().unwrap().kill9();
    c.start_agent(&["--workload-bytes", "8M", "--workload-seed", "24"]);
    let last = c.wait_workload_done(Duration::from_secs(120));
    // Seqs never repeat across a crash (invariant 7): the new run starts above
    // everything the killed one may have handed out.
    let w = c.agent_status().unwrap().groups[0]
        .workload
        .clone()
        .unwrap();
    assert!(w.first_seq > seq_before, "{} <= {seq_before}", w.first_seq);
    c.wait_applied(last, Duration::from_secs(120));
    c.assert_unclean_start_resynced("crash");
    c.stop_all();
    c.assert_replica_equals_source();
    c.check_apply_log();
}
