//! The filter layer end to end: real NBD clients and a real ext4 write through
//! the agent's NBD and FUSE frontends while relay and target run as separate
//! processes; the replica must equal the source afterwards.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::tools::{
    Bg, LoopDev, Mounted, fsck_clean, qemu_compare, require_root, require_tool, run_ok, write_tree,
};
use common::{Cluster, wait_until};
use tidemark::config::{FuseFrontend, NbdFrontend, NbdTls};

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(180);

fn nbd_frontend(listen: Vec<String>) -> NbdFrontend {
    NbdFrontend {
        listen,
        export: Some("disk0".into()),
        tls: NbdTls::Off,
        max_request_kib: 32 * 1024,
        max_connections: 16,
    }
}

/// Relay, target and an agent serving disk 0 over NBD on a TCP port and a Unix
/// socket. Returns the cluster and the TCP and Unix URIs.
fn nbd_cluster(size: u64) -> (Cluster, String, String) {
    let mut c = Cluster::new(size);
    c.start_relay();
    c.start_target();
    let sock = c.dir.path().join("disk0.sock");
    c.configure_agent(|a| {
        a.groups[0].disks[0].nbd = Some(nbd_frontend(vec![
            "127.0.0.1:0".into(),
            format!("unix:{}", sock.display()),
        ]));
    });
    c.start_agent(&[]);
    let uris = c.wait_frontend("nbd");
    let mut it = uris.split(' ');
    let tcp = it.next().unwrap().to_string();
    let unix = it.next().unwrap().to_string();
    assert!(
        tcp.starts_with("nbd://127.0.0.1:") && unix.starts_with("nbd+unix://"),
        "{uris}"
    );
    (c, tcp, unix)
}

fn seeded_file(path: &Path, size: u64, seed: u64) {
    let mut rng = tidemark::util::prng::Prng::new(seed);
    let mut buf = vec![0u8; size as usize];
    tidemark::util::datagen::fill(&mut buf, 40, &mut rng);
    std::fs::write(path, &buf).unwrap();
}

#[test]
fn e2e_nbd_real_clients_write_and_the_replica_matches() {
    for (t, p) in [
        ("nbdinfo", "libnbd-bin"),
        ("nbdcopy", "libnbd-bin"),
        ("qemu-io", "qemu-utils"),
        ("qemu-img", "qemu-utils"),
    ] {
        require_tool(t, p);
    }
    let size = 256 * MIB;
    let (mut c, tcp, unix) = nbd_cluster(size);
    let t = Duration::from_secs(120);

    // nbdinfo sees the size and the flags.
    let out = run_ok(Command::new("nbdinfo").args(["--json", &tcp]), t);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(size), "{info}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag].as_bool(), Some(true), "{flag}: {info}");
    }
    assert_eq!(e["is_read_only"].as_bool(), Some(false), "{info}");

    // nbdcopy of a seeded 128 MiB file over the Unix socket, then qemu-img
    // convert of a 64 MiB one over TCP, then qemu-io patterns: every write a
    // different client's.
    let b = c.dir.path().join("b.img");
    seeded_file(&b, 128 * MIB, 8);
    run_ok(Command::new("nbdcopy").arg(&b).arg(&unix), t);
    let a = c.dir.path().join("a.img");
    seeded_file(&a, 64 * MIB, 7);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&a)
            .arg(&tcp),
        t,
    );
    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 100M 4M",
            "-c",
            "read -P 0xab 100M 4M",
            "-c",
            "write -z 102M 64k",
            "-c",
            "discard 200M 1M",
            &tcp,
        ]),
        t,
    );
    let mut want = std::fs::read(&b).unwrap();
    want[..64 * MIB as usize].copy_from_slice(&std::fs::read(&a).unwrap());
    want[100 * MIB as usize..104 * MIB as usize].fill(0xab);
    want[102 * MIB as usize..(102 * MIB + 65536) as usize].fill(0);
    want.resize(size as usize, 0);
    let want_path = c.dir.path().join("want.img");
    std::fs::write(&want_path, &want).unwrap();
    drop(want);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&want_path)
            .arg(&tcp),
        t,
    );

    let seq = c.wait_caught_up(LONG);
    assert!(seq > 0);
    c.stop_all();
    qemu_compare(&c.source, &c.replica);
    c.assert_replica_equals_source();
    let a = c.agent_status().unwrap();
    let fe = &a.groups[0].disks[0].frontends[0];
    assert!(
        fe.counters["bytes_written"].as_u64().unwrap_or(0) >= 196 * MIB,
        "{:?}",
        fe.counters
    );
}

/// ext4 made, filled and checked through `nbdfuse` + a loop device on the NBD
/// frontend.
#[test]
fn e2e_ext4_through_nbdfuse_and_a_loop_device() {
    require_root("loop devices and mounts");
    let nbdfuse = require_tool("nbdfuse", "libnbd-bin");
    require_tool("fusermount3", "fuse3");
    require_tool("mkfs.ext4", "e2fsprogs");
    let (mut c, tcp, _) = nbd_cluster(512 * MIB);
    let m = c.dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    let file = m.join("disk");
    let mut fuse = Bg::spawn(
        Command::new(nbdfuse).arg(&file).arg(&tcp),
        &c.dir.path().join("nbdfuse.log"),
    );
    wait_until(Duration::from_secs(30), "nbdfuse's file", || {
        std::fs::metadata(&file)
            .ok()
            .filter(|m| m.len() == 512 * MIB)
    });
    ext4_round(&c, &file, 11);
    run_ok(
        Command::new("fusermount3").arg("-u").arg(&m),
        Duration::from_secs(30),
    );
    fuse.wait(Duration::from_secs(30));
    c.wait_caught_up(LONG);
    c.stop_all();
    c.assert_replica_equals_source();
    fsck_clean(&c.replica);
}

/// ext4 made, filled and checked through the agent's FUSE frontend + a loop
/// device.
#[test]
fn e2e_ext4_through_the_fuse_frontend_and_a_loop_device() {
    require_root("FUSE, loop devices and mounts");
    assert!(
        Path::new("/dev/fuse").exists(),
        "prerequisite missing: /dev/fuse"
    );
    require_tool("mkfs.ext4", "e2fsprogs");
    let mut c = Cluster::new(512 * MIB);
    c.start_relay();
    c.start_target();
    let mnt = c.dir.path().join("fuse");
    std::fs::create_dir_all(&mnt).unwrap();
    c.configure_agent(|a| {
        a.groups[0].disks[0].fuse = Some(FuseFrontend {
            mountpoint: mnt.clone(),
            file: Some("disk0".into()),
            allow_other: false,
        });
    });
    c.start_agent(&[]);
    let file = c.wait_frontend("fuse");
    ext4_round(&c, Path::new(&file), 12);
    c.wait_caught_up(LONG);
    c.stop_all();
    c.assert_replica_equals_source();
    fsck_clean(&c.replica);
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "the agent unmounted its FUSE directory at stop"
    );
}

/// mkfs.ext4 on a loop device over `file`, mount, a seeded tree of files, and
/// unmount: every byte of it goes through the frontend.
fn ext4_round(c: &Cluster, file: &Path, seed: u64) {
    let dev = LoopDev::attach(file);
    run_ok(
        Command::new("mkfs.ext4").args(["-q", "-F", &dev.0]),
        Duration::from_secs(120),
    );
    let mnt = Mounted::mount(&dev.0, &c.dir.path().join("ext4"));
    let bytes = write_tree(&mnt.0, seed, 3000, 3, 24);
    assert!(bytes > 80 * MIB);
    mnt.unmount();
    drop(dev);
}

fn fio(c: &Cluster, uri: &str, args: &[&str], log: &str) -> Bg {
    let fio = require_tool("fio", "fio");
    Bg::spawn(
        Command::new(fio)
            .args([
                "--name=w",
                // Jobs as threads of the one fio process: a forked job process
                // can leave fio's process group and outlive the test.
                "--thread",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=16",
            ])
            .arg(format!("--uri={uri}"))
            .args(args),
        &c.dir.path().join(log),
    )
}

/// fio random writes for 30 s with the relay killed and restarted in the
/// middle: with small budgets capture degrades data → spill → bitmap instead of
/// blocking fio, drains when the relay is back, and the replica converges.
#[test]
fn e2e_fio_with_the_relay_down_degrades_capture_and_catches_up() {
    let (mut c, tcp, _) = {
        let mut c = Cluster::new(256 * MIB);
        c.start_relay();
        c.start_target();
        c.configure_agent(|a| {
            a.agent.capture_budget_mib = 4;
            a.agent.spill_budget_mib = 16;
            a.groups[0].disks[0].nbd = Some(nbd_frontend(vec!["127.0.0.1:0".into()]));
        });
        c.start_agent(&[]);
        let uri = c.wait_frontend("nbd");
        (c, uri, ())
    };
    // The initial copy first, so every later transition is fio's.
    c.wait_caught_up(LONG);
    use tidemark::capture::modes::Mode::{Bitmap, Data, Spill};
    // 20 MB/s: the pipeline keeps up while the relay is there. With a 4 MiB
    // capture budget a stall of a fraction of a second on a loaded machine
    // (other tests beside this one) may still send capture to spill, or to
    // bitmap and drain, for a moment: wait until it is back in data mode.
    // fio runs 30 s: data mode within 12 s, bitmap within 15 s of the kill.
    let mut job = fio(
        &c,
        &tcp,
        &["--size=256M", "--runtime=30", "--time_based", "--rate=20m"],
        "fio.log",
    );
    std::thread::sleep(Duration::from_secs(3));
    // The capture mode once it is `want`, or when `limit` has passed.
    let wait_mode = |c: &Cluster, want: tidemark::capture::modes::Mode, limit: Duration| {
        let until = Instant::now() + limit;
        loop {
            let m = c.agent_status().unwrap().groups[0].journal.mode.clone();
            if m.mode == want || Instant::now() >= until {
                return m;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let before = wait_mode(&c, Data, Duration::from_secs(9));
    assert_eq!(before.mode, Data, "fio at 20 MB/s for 3-12 s: {before:?}");
    let killed_us = tidemark::util::time::now_us();
    c.relay.as_mut().unwrap().kill9();
    let m = wait_mode(&c, Bitmap, Duration::from_secs(15));
    assert_eq!(m.mode, Bitmap, "relay down 15 s under fio: {m:?}");
    let seen: Vec<(_, _)> = m
        .history
        .iter()
        .filter(|t| t.at_us >= killed_us)
        .map(|t| (t.from, t.to))
        .collect();
    // The mode at the kill: a stall between reading `before` and the kill may
    // already have sent capture to spill.
    let at_kill = m
        .history
        .iter()
        .rfind(|t| t.at_us < killed_us)
        .map_or(before.mode, |t| t.to);
    let expect = match at_kill {
        Data => vec![(Data, Spill), (Spill, Bitmap)],
        Spill => vec![(Spill, Bitmap)],
        other => panic!("capture left data mode for {other:?} just before the kill: {m:?}"),
    };
    assert_eq!(seen, expect, "{m:?}");
    c.start_relay();
    let st = job.wait(Duration::from_secs(60));
    assert!(
        st.success(),
        "fio failed: {}",
        std::fs::read_to_string(c.dir.path().join("fio.log")).unwrap()
    );
    c.wait_caught_up(LONG);
    let j = c.agent_status().unwrap().groups[0].journal.clone();
    for t in [
        "data->spill",
        "spill->bitmap",
        "bitmap->drain",
        "drain->data",
    ] {
        assert!(
            j.mode.transitions.get(t).copied().unwrap_or(0) >= 1,
            "no {t} transition: {:?}",
            j.mode.transitions
        );
    }
    assert!(j.dirty_marks > 0);
    c.stop_all();
    c.assert_replica_equals_source();
}

/// The agent killed (SIGKILL) while fio writes to a 64 MiB part of a 1 GiB
/// disk: at the restart the dirty log marks that part (and little more) for a
/// resync, only that is copied, seqs continue above every seq used before, and
/// the replica converges.
#[test]
fn e2e_agent_killed_mid_write_resyncs_only_its_dirty_regions() {
    let size = 1024 * MIB;
    let (mut c, tcp, _) = nbd_cluster(size);
    // The initial copy of the (sparse) disk first.
    c.wait_caught_up(LONG);
    let job = fio(
        &c,
        &tcp,
        &[
            "--offset=128M",
            "--size=64M",
            "--runtime=20",
            "--time_based",
            "--rate=40m",
        ],
        "fio.log",
    );
    std::thread::sleep(Duration::from_secs(4));
    let before = c.agent_status().unwrap().groups[0].journal.next_seq;
    c.agent.as_mut().unwrap().kill9();
    drop(job); // fio does not notice the dropped connection by itself
    c.start_agent(&[]);
    let uri = c
        .wait_frontend("nbd")
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let a = c.agent_status().unwrap();
    let d = &a.groups[0].disks[0];
    assert!(
        d.start_reason.contains("did not stop in order"),
        "{}",
        d.start_reason
    );
    assert!(
        d.start_pending_bytes >= 64 * MIB && d.start_pending_bytes <= 96 * MIB,
        "resync of {} bytes for writes to 64 MiB of a 1 GiB disk: {}",
        d.start_pending_bytes,
        d.start_reason
    );
    // More writes after the restart, then everything must converge.
    run_ok(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 900M 8M", &uri]),
        Duration::from_secs(60),
    );
    let last = c.wait_caught_up(LONG);
    let a = c.agent_status().unwrap();
    assert!(
        a.groups[0].disks[0].capture.copied_bytes <= 96 * MIB,
        "copied {} bytes",
        a.groups[0].disks[0].capture.copied_bytes
    );
    assert!(
        last > before,
        "seq {last} after the restart is not above {before}"
    );
    let first_after = tidemark::agent::state::SEQ_BLOCK;
    assert!(
        last >= before + first_after / 2,
        "seqs jumped forward after the crash"
    );
    c.stop_all();
    c.assert_replica_equals_source();
}
