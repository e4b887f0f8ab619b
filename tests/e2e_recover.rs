//! Recovery points end to end: relay, target and agent as processes, retention
//! on; a recover of an older point while replication runs and after the target
//! stopped equals the source as it was then; `latest` equals the source; a
//! promote rolls the replica itself back and the target stops applying it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Cluster, exe, tail, wait_until};
use tidemark::target::catalog::Catalog;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(180);

fn same(a: &Path, b: &Path) -> bool {
    tidemark::bench::run::compare_files(a, b).unwrap()
}

/// `tidemark target expose` of `point`: the NBD export equals `want`
/// (qemu-img compare), and a write to it is refused.
fn expose_and_compare(c: &Cluster, point: &str, want: &Path) {
    use common::tools::{Bg, require_tool, run, run_ok};
    let qi = require_tool("qemu-img", "qemu-utils");
    let qio = require_tool("qemu-io", "qemu-utils");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let log = c.dir.path().join("expose.log");
    let _bg = Bg::spawn(
        Command::new(exe())
            .args(["target", "expose", "--point", point, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--export", "pt"])
            .arg("--config")
            .arg(c.path("target.toml")),
        &log,
    );
    let uri = format!("nbd://127.0.0.1:{port}/pt");
    wait_until(Duration::from_secs(60), "the expose server", || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("nbd://")
            .then_some(())
    });
    run_ok(
        Command::new(&qi)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(want)
            .arg(&uri),
        Duration::from_secs(60),
    );
    let w = run(
        Command::new(&qio).args(["-f", "raw", "-c", "write 0 4k", &uri]),
        Duration::from_secs(30),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        !w.status.success()
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("Read-only"),
        "a write to the exposed point must fail: {text}"
    );
}

/// Wait until the catalog lists a point at exactly `seq`.
fn wait_point(c: &Cluster, seq: u64) {
    let dir = c.target_state_dir();
    wait_until(
        Duration::from_secs(60),
        "a recovery point at the seq",
        || {
            let cat = Catalog::open_read_only(&dir).ok()?;
            cat.points("g1")
                .ok()?
                .iter()
                .any(|p| p.seq == seq && p.epoch.is_some())
                .then_some(())
        },
    );
}

#[test]
fn e2e_older_points_recover_while_replicating_offline_and_by_promote() {
    let mut c = Cluster::new(64 * MIB);
    c.start_relay();
    c.configure_target(|t| {
        t.groups[0].retention.enabled = true;
        t.groups[0].retention.granularity_ms = 100;
    });
    c.start_target();
    c.start_agent(&["--workload-bytes", "24M", "--workload-seed", "11"]);
    let s1 = c.wait_workload_done(LONG);
    c.wait_applied(s1, LONG);
    // Heartbeats make the end of the workload a point of its own.
    wait_point(&c, s1);
    let snap1 = c.dir.path().join("snap1.img");
    std::fs::copy(&c.source, &snap1).unwrap();

    // More writes over the same disk, from another agent run.
    c.agent.as_mut().unwrap().stop(Duration::from_secs(40));
    c.start_agent(&["--workload-bytes", "24M", "--workload-seed", "12"]);
    let s2 = c.wait_workload_done(LONG);
    c.wait_applied(s2, LONG);
    assert!(
        !same(&c.source, &snap1),
        "the second workload changed the disk"
    );

    // The older point, read while the target runs.
    let r1 = c.dir.path().join("r1.img");
    let seq1 = s1.to_string();
    let r1s = r1.to_str().unwrap();
    c.target_cmd(&["recover", "--point", &seq1, "--disk", "0", "--out", r1s]);
    assert!(
        same(&r1, &snap1),
        "recover of seq {s1} differs from the source then"
    );
    // The newest point is the source now.
    let r2 = c.dir.path().join("r2.img");
    c.target_cmd(&[
        "recover",
        "--point",
        "latest",
        "--disk",
        "0",
        "--out",
        r2.to_str().unwrap(),
    ]);
    assert!(
        same(&r2, &c.source),
        "recover of latest differs from the source"
    );

    // The same point served read-only over NBD, without a copy.
    expose_and_compare(&c, &seq1, &snap1);
    // Points that do not exist are refused with the reason.
    for (p, why) in [
        ("seq:1", "no recovery point matches"),
        ("no-such-tag", "no recovery point matches"),
        ("1999-01-01T00:00:00Z", "no recovery point matches"),
    ] {
        let out = Command::new(exe())
            .args(["target", "recover", "--point", p, "--disk", "0", "--out"])
            .arg(c.dir.path().join("never.img"))
            .arg("--config")
            .arg(c.path("target.toml"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "recover {p} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "recover {p}: {err}");
        assert!(!c.dir.path().join("never.img").exists());
    }

    let json = c.target_cmd(&["points", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let pts = v["points"].as_array().unwrap();
    assert!(pts.len() >= 2, "{json}");
    assert!(pts.iter().any(|p| p["seq"].as_u64() == Some(s1)), "{json}");
    assert!(
        !v["inconsistent"].as_array().unwrap().is_empty(),
        "the initial copy is an M range: {json}"
    );

    // With the target stopped, recover runs the group's start-up itself.
    c.agent.as_mut().unwrap().stop(Duration::from_secs(40));
    c.target.as_mut().unwrap().stop(Duration::from_secs(40));
    std::fs::remove_file(&r1).unwrap();
    c.target_cmd(&["recover", "--point", &seq1, "--disk", "0", "--out", r1s]);
    assert!(same(&r1, &snap1), "offline recover of seq {s1} differs");

    // Promote: the replica itself goes back to seq s1, and stays there.
    c.target_cmd(&["recover", "--point", &seq1, "--promote"]);
    assert!(
        same(&c.replica, &snap1),
        "the promoted replica is not at seq {s1}"
    );
    c.start_target();
    let why = wait_until(
        Duration::from_secs(30),
        "the target to report the group promoted",
        || c.target_status()?.groups.first()?.stalled.clone(),
    );
    assert!(why.contains("promoted"), "{why}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        same(&c.replica, &snap1),
        "a promoted replica must not change\n{}",
        tail(&c.logs())
    );
    c.stop_all();
}

/// The target's disk fills up mid-apply: the group pauses (it says so), and
/// once space returns it resumes; the replica ends equal to the source, and the
/// apply log shows every frame applied once, in chain order.
#[test]
fn e2e_a_full_target_disk_pauses_the_group_until_space_returns() {
    use common::tools::Mounted;
    let mut c = Cluster::new(32 * MIB);
    c.start_relay();
    let small = c.dir.path().join("small");
    let _fs = Mounted::tmpfs(&small, "40m");
    let state = small.join("target-state");
    let replica = small.join("replica.img");
    c.configure_target(|t| {
        t.target.state_dir = state.clone();
        t.groups[0].disks[0].path = replica.clone();
    });
    // Leave about 6 MiB free.
    let filler = small.join("filler");
    std::fs::write(&filler, vec![0x11u8; 34 * MIB as usize]).unwrap();
    c.start_target();
    c.start_agent(&["--workload-bytes", "24M", "--workload-seed", "21"]);
    let last = c.wait_workload_done(LONG);
    let log = || c.target.as_ref().unwrap().log_text();
    let t0 = std::time::Instant::now();
    while !log().contains("applying paused") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the target did not pause for space\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(log().contains("No space left"), "{}", tail(&log()));
    std::thread::sleep(Duration::from_secs(3));
    std::fs::remove_file(&filler).unwrap();
    c.wait_applied(last, LONG);
    assert!(log().contains("applying resumed"), "{}", tail(&log()));
    let st = c.target_status().unwrap();
    assert!(st.groups[0].paused.is_none(), "{:?}", st.groups[0].paused);
    c.stop_all();
    assert!(same(&c.source, &replica), "replica differs\n{}", c.logs());
    let s = tidemark::target::check_apply_log(&state.join("g1").join("apply.log")).unwrap();
    assert!(s.applies > 0);
}
