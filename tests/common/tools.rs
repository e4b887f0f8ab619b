//! External tools for the end-to-end tests: prerequisite checks that fail with
//! the missing piece named (never skip), bounded child processes, and guards
//! that undo loop devices, mounts and background clients even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fail unless running as root (loop devices, mounts, FUSE).
pub fn require_root(why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "prerequisite missing: root ({why}); running as uid {}",
        nix::unistd::geteuid()
    );
}

/// Path of `name`; fails naming the Debian package when it is missing.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("prerequisite missing: `{name}` not found (apt-get install {package}; scripts/test.sh installs it)")
        })
}

/// Run `cmd` within `timeout` (killed after it) and return its output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("waiting for a child").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output();
            panic!("{cmd:?} did not finish within {timeout:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
        .wait_with_output()
        .expect("collecting a child's output")
}

/// [`run`], and fail with its output unless it exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run(cmd, timeout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A loop device attached by the test; detached on drop.
pub struct LoopDev(pub String);

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        require_tool("losetup", "mount");
        let out = run_ok(
            Command::new("losetup").args(["--find", "--show"]).arg(file),
            Duration::from_secs(30),
        );
        LoopDev(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = run(
            Command::new("losetup").args(["-d", &self.0]),
            Duration::from_secs(30),
        );
    }
}

/// A filesystem mounted by the test; unmounted on drop.
pub struct Mounted(pub PathBuf);

impl Mounted {
    /// A tmpfs of `size` (e.g. "40m") at `dir`: a small file system that fills up.
    pub fn tmpfs(dir: &Path, size: &str) -> Mounted {
        require_root("mounting a tmpfs");
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size}"))
                .arg("tmpfs")
                .arg(dir),
            Duration::from_secs(30),
        );
        Mounted(dir.to_path_buf())
    }

    pub fn mount(dev: &str, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount").arg(dev).arg(dir),
            Duration::from_secs(30),
        );
        Mounted(dir.to_path_buf())
    }

    /// Unmount now (flushing the filesystem), failing the test if it fails.
    pub fn unmount(self) {
        run_ok(Command::new("umount").arg(&self.0), Duration::from_secs(60));
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run(
            Command::new("umount").arg("-l").arg(&self.0),
            Duration::from_secs(30),
        );
    }
}

/// A background child the test started (nbdfuse, fio), in a process group of
/// its own; the whole group (the child and anything it forked) is killed on drop.
pub struct Bg(pub Child);

impl Bg {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Bg {
        use std::os::unix::process::CommandExt;
        let f = std::fs::File::create(log).unwrap();
        let e = f.try_clone().unwrap();
        Bg(cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(e)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")))
    }

    /// Wait (bounded) for it to exit; its status.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < until,
                "background child did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        // The group's id is the child's PID (process_group(0) at spawn).
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A seeded tree of files under `root`: `small` files of 1–16 KiB in 50
/// directories and `large` files of `large_mib` MiB, each fsync'd. Returns the
/// bytes written.
pub fn write_tree(root: &Path, seed: u64, small: usize, large: usize, large_mib: usize) -> u64 {
    use std::io::Write;
    let mut rng = tidemark::util::prng::Prng::new(seed);
    let mut total = 0u64;
    for i in 0..small {
        let dir = root.join(format!("d{:02}", i % 50));
        std::fs::create_dir_all(&dir).unwrap();
        let len = 1024 + rng.below(15 * 1024) as usize;
        let mut buf = vec![0u8; len];
        tidemark::util::datagen::fill(&mut buf, 50, &mut rng);
        let mut f = std::fs::File::create(dir.join(format!("f{i:05}"))).unwrap();
        f.write_all(&buf).unwrap();
        if i % 10 == 0 {
            f.sync_all().unwrap();
        }
        total += len as u64;
    }
    for i in 0..large {
        let mut f = std::fs::File::create(root.join(format!("large{i}"))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..large_mib {
            tidemark::util::datagen::fill(&mut buf, 30, &mut rng);
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
        total += (large_mib as u64) << 20;
    }
    total
}

/// `e2fsck -fn` on `image`: fails the test unless it exits 0.
pub fn fsck_clean(image: &Path) {
    require_tool("e2fsck", "e2fsprogs");
    run_ok(
        Command::new("e2fsck").arg("-fn").arg(image),
        Duration::from_secs(120),
    );
}

/// `qemu-img compare` of two raw images: fails unless identical.
pub fn qemu_compare(a: &Path, b: &Path) {
    require_tool("qemu-img", "qemu-utils");
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
        Duration::from_secs(120),
    );
}

/// A network namespace joined to this one by a veth pair: a second "host" for a
/// role (entered with `nsenter --net`), with its own kernel TCP state. Deleted
/// on drop.
pub struct Netns {
    /// Namespace name.
    pub name: String,
    /// The veth end in this (the test's) namespace.
    host_if: String,
    /// The veth end inside the namespace.
    ns_if: String,
    /// This namespace's address on the pair.
    pub host_addr: std::net::Ipv4Addr,
    /// The namespace's address on the pair.
    pub ns_addr: std::net::Ipv4Addr,
}

impl Netns {
    /// A namespace named after this test process and a per-process counter
    /// (tests of one process may run as threads), with a /30 of 10.231.0.0/16
    /// derived from both. A namespace of the same name left by a killed run
    /// is removed first.
    pub fn create() -> Netns {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        require_root("network namespaces");
        require_tool("ip", "iproute2");
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let slot = pid.wrapping_mul(7).wrapping_add(n) % (1 << 14);
        let (a, b) = ((slot >> 6) as u8, ((slot & 0x3f) * 4) as u8);
        let ns = Netns {
            name: format!("tmk{pid}x{n}"),
            host_if: format!("tmk{pid}x{n}h"),
            ns_if: format!("tmk{pid}x{n}n"),
            host_addr: [10, 231, a, b + 1].into(),
            ns_addr: [10, 231, a, b + 2].into(),
        };
        assert!(
            ns.host_if.len() <= 15,
            "interface name too long: {}",
            ns.host_if
        );
        ns.remove();
        ns.up();
        ns
    }

    fn ip(args: &[&str]) {
        run_ok(Command::new("ip").args(args), Duration::from_secs(30));
    }

    fn up(&self) {
        let (n, h, i) = (&self.name, &self.host_if, &self.ns_if);
        Self::ip(&["netns", "add", n]);
        Self::ip(&[
            "link", "add", h, "type", "veth", "peer", "name", i, "netns", n,
        ]);
        Self::ip(&["addr", "add", &format!("{}/30", self.host_addr), "dev", h]);
        Self::ip(&["link", "set", h, "up"]);
        Self::ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{}/30", self.ns_addr),
            "dev",
            i,
        ]);
        Self::ip(&["-n", n, "link", "set", i, "up"]);
        Self::ip(&["-n", n, "link", "set", "lo", "up"]);
    }

    /// Cut the link: from now on packets between the namespaces are dropped
    /// silently (no reset, no FIN reaches the other side).
    pub fn partition(&self) {
        Self::ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"]);
    }

    /// Undo [`Netns::partition`]: packets flow again.
    pub fn heal(&self) {
        Self::ip(&["-n", &self.name, "link", "set", &self.ns_if, "up"]);
    }

    /// The host "reboots": its kernel state (every socket of it, including
    /// the FINs of processes killed during the partition) is gone, and it comes
    /// back with the same address. End its processes first.
    pub fn reboot(&self) {
        self.remove();
        // The host end of the pair goes with the namespace, asynchronously.
        let until = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/sys/class/net/{}", self.host_if)).exists() {
            assert!(
                Instant::now() < until,
                "veth {} still exists after 10 s",
                self.host_if
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.up();
    }

    fn remove(&self) {
        let _ = run(
            Command::new("ip").args(["netns", "del", &self.name]),
            Duration::from_secs(30),
        );
        let _ = run(
            Command::new("ip").args(["link", "del", &self.host_if]),
            Duration::from_secs(30),
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}
