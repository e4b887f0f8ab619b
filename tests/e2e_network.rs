//! The network between the roles fails the way real ones do: the relay's host
//! vanishes (power loss, kernel panic) in the middle of replication, so no FIN
//! or reset reaches the agent or the target, and comes back with the same
//! address and no memory of their connections. The relay runs in its own
//! network namespace, which the test cuts off, empties and creates again.
//!
//! The target only ever answers frames: on an idle connection it sends nothing,
//! so without TCP keepalive (src/transport/tcp.rs) it would wait for ever on a
//! connection the new host does not know, while the new relay waits for it.

mod common;

use std::time::Duration;

use common::Cluster;
use common::tools::Netns;

const MIB: u64 = 1 << 20;

/// Relay, target, and an agent that gives a silent relay up after 3 s,
/// running a workload paced at 1 MB/s for 15 s; returns once the target has
/// applied something.
fn start_paced(c: &mut Cluster, seed: u64) {
    c.start_relay();
    c.configure_target(|cfg| cfg.target.relay_silence_ms = 3000);
    c.start_target();
    c.configure_agent(|cfg| cfg.agent.relay_silence_ms = 3000);
    let seed = seed.to_string();
    c.start_agent(&[
        "--workload-seconds",
        "15",
        "--workload-rate-mb-s",
        "1",
        "--workload-write-size",
        "16K",
        "--workload-seed",
        &seed,
    ]);
    c.wait_applied(1, Duration::from_secs(60));
}

#[test]
fn e2e_a_relay_host_that_vanishes_and_reboots_is_found_again_by_agent_and_target() {
    // Declared first, dropped last: after every process in it has ended.
    let ns = Netns::create();
    let mut c = Cluster::new(64 * MIB);
    c.prefill(41, 8 * MIB);
    c.relay_in_netns(&ns);
    c.start_relay();
    c.start_target();
    c.start_agent(&["--workload-bytes", "8M", "--workload-seed", "42"]);
    c.wait_workload_done(Duration::from_secs(120));
    c.wait_caught_up(Duration::from_secs(120));
    // Let the target's last acknowledgements leave: from here on it has
    // nothing to send until a frame arrives (heartbeats come every 2 s).
    std::thread::sleep(Duration::from_millis(500));

    // The host goes dark: the link drops every packet, the relay dies with it
    // (its FINs are lost), and the host boots again with empty TCP state.
    ns.partition();
    c.relay.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(2));
    ns.reboot();
    c.start_relay();

    // More writes, from an agent started afresh (it reconnects anyway; the
    // target is the one that must find the new relay by itself, through a
    // keepalive probe that the rebooted host answers with a reset).
    c.agent.as_mut().unwrap().stop(Duration::from_secs(40));
    c.start_agent(&["--workload-bytes", "8M", "--workload-seed", "43"]);
    c.wait_workload_done(Duration::from_secs(120));
    c.wait_caught_up(Duration::from_secs(120));
    c.assert_replica_equals_source();
    let target_log = c.target.as_ref().unwrap().log_text();
    assert!(
        target_log.matches("connected to the relay").count() >= 2,
        "the target never reconnected:\n{}",
        c.logs()
    );
    c.stop_all();
}

/// The relay's process hangs (SIGSTOP: its kernel still accepts and
/// acknowledges bytes, the process answers nothing). The agent must give the
/// connection up after `relay_silence_ms` and say so, instead of reporting a
/// healthy connection for the quarter of an hour TCP would wait, and continue
/// without loss once the relay resumes. The target too: it misses the relay's
/// sign of life of every second and gives its connection up after its own
/// `relay_silence_ms` (keepalive alone would keep it "connected" for ever).
#[test]
fn e2e_a_hung_relay_is_given_up_on_and_found_again_when_it_resumes() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let mut c = Cluster::new(64 * MIB);
    start_paced(&mut c, 44);

    let relay = Pid::from_raw(c.relay.as_ref().unwrap().pid() as i32);
    kill(relay, Signal::SIGSTOP).unwrap();
    // Each role's log says it gave the relay up, then its status.
    let wait_log = |what: &str, p: &common::Proc, text: &str| {
        common::wait_until(Duration::from_secs(60), what, || {
            p.log_text().contains(text).then_some(())
        })
    };
    let given_up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_log(
            "the agent to give up on the hung relay",
            c.agent.as_ref().unwrap(),
            "no answer from the relay for 3000 ms",
        );
        common::wait_until(
            Duration::from_secs(30),
            "the agent's status to say disconnected",
            || (!c.agent_status()?.groups[0].connected).then_some(()),
        );
        wait_log(
            "the target to give up on the hung relay",
            c.target.as_ref().unwrap(),
            "the relay sent nothing for",
        );
        common::wait_until(
            Duration::from_secs(30),
            "the target's status to say disconnected",
            || (!c.target_status()?.groups[0].connected).then_some(()),
        );
    }));
    kill(relay, Signal::SIGCONT).unwrap();
    if let Err(e) = given_up {
        eprintln!("{}", c.logs());
        std::panic::resume_unwind(e);
    }

    c.wait_workload_done(Duration::from_secs(120));
    c.wait_caught_up(Duration::from_secs(120));
    c.assert_replica_equals_source();
    c.check_apply_log();
    // The agent stops (no more heartbeat frames), and the relay idles for
    // longer than the target's limit: its signs of life keep the connection
    // (the hang was the only silence the target noticed).
    c.agent.as_mut().unwrap().stop(Duration::from_secs(40));
    std::thread::sleep(Duration::from_secs(5));
    let target_log = c.target.as_ref().unwrap().log_text();
    assert_eq!(
        target_log.matches("the relay sent nothing for").count(),
        1,
        "the target gave an idle relay up:\n{target_log}"
    );
    assert!(c.target_status().unwrap().groups[0].connected);
    c.stop_all();
}

/// The link to the relay's host drops every packet for a while, as the
/// workload writes, then comes back. The agent gives its connection up once
/// its frames are neither answered nor taken for `relay_silence_ms`, and
/// keeps trying; so does the target, which misses the relay's signs of life
/// (its `relay_silence_ms` is 3 s here; with the default 60 s its connection
/// lives through a short cut, as TCP resumes once packets flow, and the relay
/// takes a reconnecting target in place of the old session either way).
/// Everyone ends connected and the replica equal to the
/// source: nothing lost, nothing applied twice or out of order. (Keepalive's
/// own expiry, 30 s, is left to the kernel: the reboot test above shows the
/// option at work, a unit test that it is set.)
#[test]
fn e2e_a_partition_mid_workload_heals_without_loss() {
    let ns = Netns::create();
    let mut c = Cluster::new(64 * MIB);
    c.relay_in_netns(&ns);
    start_paced(&mut c, 45);
    std::thread::sleep(Duration::from_secs(2));

    ns.partition();
    // Long enough for the agent to fill its socket buffers and give up.
    std::thread::sleep(Duration::from_secs(12));
    ns.heal();

    c.wait_workload_done(Duration::from_secs(120));
    c.wait_caught_up(Duration::from_secs(120));
    c.assert_replica_equals_source();
    let agent_log = c.agent.as_ref().unwrap().log_text();
    assert!(
        agent_log.contains("no answer from the relay"),
        "the agent kept a connection to a relay it could not reach:\n{}",
        c.logs()
    );
    c.check_apply_log();
    c.stop_all();
}
