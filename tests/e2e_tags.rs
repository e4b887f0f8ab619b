//! Tags end to end: `tidemark agent tag` against a running agent, with relay
//! and target as separate processes. Plain, and with `--freeze` on an ext4
//! made through the agent's FUSE frontend and a loop device (the freeze is
//! thawed: a write after the tag completes; the target applies through the
//! tag's seq). Refusals: in bitmap mode with the reason, a failing pre-hook
//! (post-hook still runs), and the file system thawed after each.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::tools::{LoopDev, Mounted, require_root, require_tool, run_ok};
use common::{Cluster, tail, wait_until};
use tidemark::capture::modes::Mode;
use tidemark::config::FuseFrontend;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(180);

/// Assert that `seq` is below the running agent's next seq (waiting for a
/// status written after the tag: it is refreshed every 100 ms).
fn assert_below_next_seq(c: &mut Cluster, seq: u64) {
    let next = wait_until(Duration::from_secs(10), "the agent's status", || {
        let s = c.agent_status()?;
        let next = s.groups[0].journal.next_seq;
        (Some(s.pid) == c.agent.as_ref().map(|a| a.pid()) && next > seq).then_some(next)
    });
    assert!(
        seq < next,
        "tag seq {seq} below the agent's next seq {next}"
    );
}

/// Write a file in `dir` and sync it, in a child bounded by 30 s: a file
/// system left frozen would block it and fail the test.
fn write_after(dir: &Path, name: &str) {
    run_ok(
        Command::new("sh").arg("-c").arg(format!(
            "echo thawed > '{}' && sync -f '{}'",
            dir.join(name).display(),
            dir.display()
        )),
        Duration::from_secs(30),
    );
}

/// Thaws a mount point on drop (a failing test must not leave it frozen).
struct ThawGuard(PathBuf);

impl Drop for ThawGuard {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).output();
    }
}

/// The text without ANSI colour sequences (the logs colour field names).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for ch in s.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (false, c) => out.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    out
}

fn script(path: &Path, body: &str) -> PathBuf {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut p = std::fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    std::fs::set_permissions(path, p).unwrap();
    path.to_path_buf()
}

#[test]
fn e2e_tag_plain_then_frozen_ext4_through_the_fuse_frontend() {
    require_root("FUSE, loop devices, mounts and FIFREEZE");
    assert!(
        Path::new("/dev/fuse").exists(),
        "prerequisite missing: /dev/fuse"
    );
    require_tool("mkfs.ext4", "e2fsprogs");
    let mut c = Cluster::new(256 * MIB);
    c.start_relay();
    c.start_target();
    let fuse = c.dir.path().join("fuse");
    std::fs::create_dir_all(&fuse).unwrap();
    c.configure_agent(|a| {
        a.groups[0].disks[0].fuse = Some(FuseFrontend {
            mountpoint: fuse.clone(),
            file: Some("disk0".into()),
            allow_other: false,
        });
    });
    c.start_agent(&[]);
    let file = c.wait_frontend("fuse");
    // The initial copy must be done: a tag needs a write-ordered mode.
    c.wait_caught_up(LONG);

    let plain = c.agent_tag_ok(&["plain-1"]);
    assert_below_next_seq(&mut c, plain);
    c.wait_applied(plain, LONG);

    let dev = LoopDev::attach(Path::new(&file));
    run_ok(
        Command::new("mkfs.ext4").args(["-q", "-F", &dev.0]),
        Duration::from_secs(120),
    );
    let mnt = Mounted::mount(&dev.0, &c.dir.path().join("ext4"));
    let _thaw = ThawGuard(mnt.0.clone());
    write_after(&mnt.0, "before");
    let m = mnt.0.to_str().unwrap().to_string();
    let frozen = c.agent_tag_ok(&["--freeze", &m, "--timeout", "20", "app@frozen-1"]);
    assert!(frozen > plain);
    // Thawed: a write after the tag completes.
    write_after(&mnt.0, "after");
    assert_below_next_seq(&mut c, frozen);
    c.wait_applied(frozen, LONG);
    let log = strip_ansi(&c.agent.as_ref().unwrap().log_text());
    let line = |name: &str| {
        log.lines()
            .find(|l| l.contains("tag recorded") && l.contains(name))
            .unwrap_or_else(|| panic!("no 'tag recorded' line for {name}:\n{}", tail(&log)))
            .to_string()
    };
    assert!(
        line("plain-1").contains("app_consistent=false"),
        "{}",
        line("plain-1")
    );
    assert!(
        line("app@frozen-1").contains("app_consistent=true"),
        "{}",
        line("app@frozen-1")
    );
    drop(_thaw);
    mnt.unmount();
    drop(dev);
    c.wait_caught_up(LONG);
    c.stop_all();
    c.assert_replica_equals_source();
}

#[test]
fn e2e_tag_refusals_bitmap_mode_and_failing_hook_still_thaw() {
    require_root("loop devices, mounts and FIFREEZE");
    require_tool("mkfs.ext4", "e2fsprogs");
    let mut c = Cluster::new(64 * MIB);
    // A scratch ext4 to freeze (any mounted file system will do for the
    // freeze/thaw guarantees).
    let img = c.dir.path().join("scratch.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run_ok(
        Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img),
        Duration::from_secs(60),
    );
    let dev = LoopDev::attach(&img);
    let mnt = Mounted::mount(&dev.0, &c.dir.path().join("scratch"));
    let _thaw = ThawGuard(mnt.0.clone());
    let m = mnt.0.to_str().unwrap().to_string();
    let hooks = c.dir.path().join("hooks.log");
    let refuse = c.dir.path().join("refuse");
    let pre = script(
        &c.dir.path().join("pre.sh"),
        &format!(
            "echo \"pre $1 $2\" >> '{0}'; if [ -e '{1}' ]; then echo 'not quiesced' >&2; exit 7; fi",
            hooks.display(),
            refuse.display()
        ),
    );
    let post = script(
        &c.dir.path().join("post.sh"),
        &format!(
            "echo \"post $TIDEMARK_TAG_RESULT\" >> '{}'",
            hooks.display()
        ),
    );
    c.start_relay();
    c.start_target();
    c.configure_agent(|a| {
        a.groups[0].disks[0].initial_copy = false;
        a.agent.bitmap_after_ms = 1000;
        a.agent.tag_pre_hook = Some(pre.clone());
        a.agent.tag_post_hook = Some(post.clone());
    });
    c.start_agent(&[]);
    c.wait_caught_up(LONG);

    // With the hooks and the freeze: app-consistent, and thawed.
    let ok = c.agent_tag_ok(&["--freeze", &m, "hooked-1"]);
    write_after(&mnt.0, "after-ok");
    c.wait_applied(ok, LONG);

    // A failing pre-hook refuses the tag; nothing stays frozen; the
    // post-hook still runs.
    std::fs::write(&refuse, b"").unwrap();
    let out = c.agent_tag(&["--freeze", &m, "hooked-2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pre-hook") && err.contains("exit status: 7"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    write_after(&mnt.0, "after-hook-failure");
    std::fs::remove_file(&refuse).unwrap();

    // Bitmap mode (the relay gone for longer than bitmap_after_ms): refused
    // with the mode and its reason; thawed after the refusal.
    c.relay.as_mut().unwrap().stop(Duration::from_secs(30));
    wait_until(LONG, "the agent in bitmap mode", || {
        let s = c.agent_status()?;
        (s.groups[0].journal.mode.mode == Mode::Bitmap).then_some(())
    });
    let out = c.agent_tag(&["--freeze", &m, "in-bitmap"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is in bitmap mode since")
            && err.contains("relay unreachable")
            && err.contains("could not be a consistent point"),
        "{err}"
    );
    assert_eq!(
        err.trim()
            .lines()
            .filter(|l| l.starts_with("tidemark:"))
            .count(),
        1,
        "one line of reason: {err}"
    );
    write_after(&mnt.0, "after-bitmap-refusal");
    assert_eq!(
        std::fs::read_to_string(&hooks).unwrap(),
        format!(
            "pre hooked-1 {m}\npost ok\npre hooked-2 {m}\npost failed\npre in-bitmap {m}\npost failed\n"
        )
    );
    drop(_thaw);
    mnt.unmount();
    drop(dev);
    // The relay is gone: no orderly drain to wait for.
    c.agent.as_mut().unwrap().kill9();
    c.stop_all();
}
