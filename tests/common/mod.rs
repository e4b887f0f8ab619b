//! Test harness: the three roles as separate processes of the built binary, on
//! loopback with mutual TLS, in a scratch directory. Every child is killed (by
//! its PID) when the harness is dropped; every wait is bounded.

#![allow(dead_code)]

pub mod faulty;
pub mod forgetful;
pub mod fusemount;
pub mod tools;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidemark::agent::AgentStatus;
use tidemark::config::{AgentConfig, RelayConfig, TargetConfig};
use tidemark::relay::RelayStatus;
use tidemark::target::TargetStatus;
use tidemark::util::prng::Prng;
use tidemark::util::statusfile::STATUS_FILE;

/// The binary under test.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_tidemark")
}

/// A role process.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded); SIGKILL if it does not exit.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(s) = self.exited() {
            return Some(s);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// Wait (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill9();
        }
    }
}

/// Three roles around one group with one disk.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub source: PathBuf,
    pub replica: PathBuf,
    pub relay_addr: Option<std::net::SocketAddr>,
    pub relay: Option<Proc>,
    pub target: Option<Proc>,
    pub agent: Option<Proc>,
    /// The network namespace the relay runs in (its own "host"), if any.
    pub relay_netns: Option<String>,
    starts: u32,
}

impl Cluster {
    /// `tidemark target <args> --config <target.toml>`, bounded (2 min); its
    /// stdout, or a panic with its stderr and the roles' logs.
    pub fn target_cmd(&self, args: &[&str]) -> String {
        let out = tools::run(
            Command::new(exe())
                .arg("target")
                .args(args)
                .arg("--config")
                .arg(self.path("target.toml")),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "tidemark target {args:?} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tidemark agent tag --config <agent.toml> <args>`, bounded (1 min).
    pub fn agent_tag(&self, args: &[&str]) -> std::process::Output {
        tools::run(
            Command::new(exe())
                .args(["agent", "tag", "--config"])
                .arg(self.path("agent.toml"))
                .args(args)
                .env("RUST_LOG", "info"),
            Duration::from_secs(60),
        )
    }

    /// [`Cluster::agent_tag`] that must succeed: the tag's seq.
    pub fn agent_tag_ok(&self, args: &[&str]) -> u64 {
        let out = self.agent_tag(args);
        assert!(
            out.status.success(),
            "agent tag {args:?} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("agent tag prints the seq")
    }

    /// `tidemark init` into a scratch directory and a sparse source disk of `size` bytes.
    pub fn new(size: u64) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-e2e-")
            .tempdir()
            .unwrap();
        let conf = dir.path().join("conf");
        let out = Command::new(exe())
            .args(["init", "--dir"])
            .arg(&conf)
            .args(["--relay-listen", "127.0.0.1:7400"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let source = dir.path().join("source.img");
        let replica = dir.path().join("replica.img");
        File::create(&source).unwrap().set_len(size).unwrap();
        // The relay binds an ephemeral port; clients learn it from its status.
        let path = conf.join("relay.toml");
        let mut cfg = RelayConfig::load(&path).unwrap();
        cfg.relay.listen = ([127, 0, 0, 1], 0).into();
        cfg.relay.status_listen = None;
        fs::write(&path, cfg.to_toml_string().unwrap()).unwrap();
        Cluster {
            dir,
            conf,
            source,
            replica,
            relay_addr: None,
            relay: None,
            target: None,
            agent: None,
            relay_netns: None,
            starts: 0,
        }
    }

    /// Fill `bytes` bytes of the source with seeded data, in 1 MiB pieces every
    /// `stride` bytes (the rest stays a hole).
    pub fn prefill(&self, seed: u64, stride: u64) {
        let f = File::options().write(true).open(&self.source).unwrap();
        let size = f.metadata().unwrap().len();
        let mut rng = Prng::new(seed);
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off + buf.len() as u64 <= size {
            tidemark::util::datagen::fill(&mut buf, 30, &mut rng);
            f.write_all_at(&buf, off).unwrap();
            off += stride;
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.conf.join(name)
    }

    fn spawn(&mut self, role: &str, extra: &[&str]) -> Proc {
        let config = self.path(&format!("{role}.toml"));
        self.spawn_config(role, &config, extra)
    }

    /// Start `role` with a given config file (not tracked by the cluster).
    pub fn spawn_config(&mut self, role: &str, config: &Path, extra: &[&str]) -> Proc {
        self.starts += 1;
        let log = self.dir.path().join(format!("{role}.{}.log", self.starts));
        let f = File::create(&log).unwrap();
        let mut cmd = match (&self.relay_netns, role) {
            (Some(ns), "relay") => {
                // Only the network namespace is entered. `ip netns exec` would
                // also give the relay a mount namespace holding a copy of every
                // mount of that instant (`/` is private here, so later
                // unmounts do not reach the copy): an ext4 that another test
                // unmounts next would stay mounted in the copy, never shut
                // down cleanly, and its last writes would never reach that
                // test's frontend.
                let mut c = Command::new(tools::require_tool("nsenter", "util-linux"));
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(exe());
                c
            }
            _ => Command::new(exe()),
        };
        let child = cmd
            .arg(role)
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    /// Start the relay; the first start binds port 0, later starts reuse the port.
    pub fn start_relay(&mut self) {
        let p = self.spawn("relay", &[]);
        self.relay = Some(p);
        if let Some(addr) = self.relay_addr {
            // A restarted relay recovers its spool before it listens again.
            wait_until(Duration::from_secs(60), "relay listening again", || {
                std::net::TcpStream::connect(addr).ok()
            });
        } else {
            let status = self.relay_status_path();
            let addr = wait_until(Duration::from_secs(30), "relay listening", || {
                read_json::<RelayStatus>(&status).map(|s| s.listen)
            });
            self.relay_addr = Some(addr);
            // Pin the port for restarts, point the clients at it.
            let path = self.path("relay.toml");
            let mut cfg = RelayConfig::load(&path).unwrap();
            cfg.relay.listen = addr;
            cfg.relay.status_listen = None;
            fs::write(&path, cfg.to_toml_string().unwrap()).unwrap();
            self.configure_target(|cfg| {
                cfg.target.relay = addr.to_string();
                cfg.target.relay_name = "127.0.0.1".into();
                cfg.target.status_listen = None;
                cfg.groups[0].disks[0].path = self.replica.clone();
            });
            self.configure_agent(|cfg| {
                cfg.agent.relay = addr.to_string();
                cfg.agent.relay_name = "127.0.0.1".into();
                cfg.agent.status_listen = None;
                cfg.groups[0].disks[0].path = self.source.clone();
            });
        }
    }

    /// Run the relay inside `ns` (before its first start): it listens on the
    /// namespace's address, and agent and target reach it over the veth pair.
    pub fn relay_in_netns(&mut self, ns: &tools::Netns) {
        let path = self.path("relay.toml");
        let mut cfg = RelayConfig::load(&path).unwrap();
        cfg.relay.listen = (ns.ns_addr, 0).into();
        fs::write(&path, cfg.to_toml_string().unwrap()).unwrap();
        self.relay_netns = Some(ns.name.clone());
    }

    pub fn start_target(&mut self) {
        let p = self.spawn("target", &[]);
        self.target = Some(p);
    }

    pub fn start_agent(&mut self, extra: &[&str]) {
        let p = self.spawn("agent", extra);
        self.agent = Some(p);
    }

    pub fn relay_status_path(&self) -> PathBuf {
        let cfg = RelayConfig::load(&self.path("relay.toml")).unwrap();
        cfg.relay.spool_dir.join(STATUS_FILE)
    }

    pub fn agent_status(&self) -> Option<AgentStatus> {
        let cfg = AgentConfig::load(&self.path("agent.toml")).ok()?;
        read_json(&cfg.agent.state_dir.join(STATUS_FILE))
    }

    pub fn target_status(&self) -> Option<TargetStatus> {
        let cfg = TargetConfig::load(&self.path("target.toml")).ok()?;
        read_json(&cfg.target.state_dir.join(STATUS_FILE))
    }

    pub fn relay_status(&self) -> Option<RelayStatus> {
        read_json(&self.relay_status_path())
    }

    /// The target's apply log of group g1 shows every frame applied in chain
    /// order (fails with the reason otherwise); its summary.
    pub fn check_apply_log(&self) -> tidemark::target::ApplyLogSummary {
        let log = self.target_state_dir().join("g1").join("apply.log");
        match tidemark::target::check_apply_log(&log) {
            Ok(s) => s,
            Err(e) => panic!("apply log {}: {e}", log.display()),
        }
    }

    pub fn target_state_dir(&self) -> PathBuf {
        TargetConfig::load(&self.path("target.toml"))
            .unwrap()
            .target
            .state_dir
    }

    /// The workload's last seq once the agent reports it done.
    pub fn wait_workload_done(&mut self, limit: Duration) -> u64 {
        let w = wait_until(limit, "workload done", || {
            if let Some(a) = self.agent.as_mut()
                && let Some(st) = a.exited()
                && !st.success()
            {
                panic!("agent exited with {st}:\n{}", tail(&a.log_text()));
            }
            let s = self.agent_status()?;
            // Only the running agent's own status counts (not a previous run's).
            if Some(s.pid) != self.agent.as_ref().map(|a| a.pid()) {
                return None;
            }
            let w = s.groups.first()?.workload.clone()?;
            w.done.then_some(w)
        });
        assert!(w.error.is_none(), "workload failed: {:?}", w.error);
        w.last_seq
    }

    /// Wait until the target's durable watermark reaches `seq`.
    pub fn wait_applied(&self, seq: u64, limit: Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(t) = self.target_status()
                && let Some(g) = t.groups.first()
            {
                if g.watermark.last_seq >= seq {
                    return;
                }
                if let Some(why) = &g.stalled {
                    panic!("target stalled: {why}\n{}", self.logs());
                }
            }
            if t0.elapsed() > limit {
                panic!(
                    "target did not apply through seq {seq} within {limit:?}; target status: {:?}\n{}",
                    self.target_status().map(|t| t.groups),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Change the agent's config file (after `start_relay`, which points it at
    /// the relay and the source disk).
    pub fn configure_agent(&self, f: impl FnOnce(&mut AgentConfig)) {
        let path = self.path("agent.toml");
        let mut cfg = AgentConfig::load(&path).unwrap();
        f(&mut cfg);
        fs::write(&path, cfg.to_toml_string().unwrap()).unwrap();
    }

    /// Change the target's config file (before `start_target`).
    pub fn configure_target(&self, f: impl FnOnce(&mut TargetConfig)) {
        let path = self.path("target.toml");
        let mut cfg = TargetConfig::load(&path).unwrap();
        f(&mut cfg);
        fs::write(&path, cfg.to_toml_string().unwrap()).unwrap();
    }

    /// The address of the running agent's first frontend of `kind` on disk 0
    /// ("nbd": its URIs, space-separated; "fuse": the file's path).
    pub fn wait_frontend(&mut self, kind: &str) -> String {
        wait_until(Duration::from_secs(60), "the agent's frontend", || {
            if let Some(a) = self.agent.as_mut()
                && let Some(st) = a.exited()
            {
                panic!("agent exited with {st}:\n{}", tail(&a.log_text()));
            }
            let s = self.agent_status()?;
            if Some(s.pid) != self.agent.as_ref().map(|a| a.pid()) {
                return None;
            }
            s.groups[0].disks[0]
                .frontends
                .iter()
                .find(|f| f.kind == kind)
                .map(|f| f.address.clone())
        })
    }

    /// Wait until the running agent holds nothing unsent (data mode, no dirty
    /// region, empty journal) and the target applied its last seq. Returns that
    /// seq.
    pub fn wait_caught_up(&mut self, limit: Duration) -> u64 {
        // Only a snapshot taken after this call reflects every write the
        // caller has seen acknowledged.
        let since = tidemark::util::time::now_us();
        let seq = wait_until(limit, "the agent to hold nothing unsent", || {
            if let Some(a) = self.agent.as_mut()
                && let Some(st) = a.exited()
            {
                panic!("agent exited with {st}:\n{}", tail(&a.log_text()));
            }
            let s = self.agent_status()?;
            if Some(s.pid) != self.agent.as_ref().map(|a| a.pid()) || s.updated_us <= since {
                return None;
            }
            let j = &s.groups[0].journal;
            (j.mode.mode == tidemark::capture::modes::Mode::Data
                && j.pending_bytes == 0
                && j.entries == 0)
                .then(|| j.next_seq.saturating_sub(1))
        });
        self.wait_applied(seq, limit);
        seq
    }

    /// [`Cluster::wait_caught_up`], then until the target says the replica is
    /// consistent (the W frame after the last M data is applied), so `latest`
    /// names a point. The initial copy asks the target for digests, so it can
    /// end after a workload that started with it.
    pub fn wait_consistent(&mut self, limit: Duration) {
        self.wait_caught_up(limit);
        wait_until(limit, "the target to be consistent", || {
            self.target_status()?
                .groups
                .first()
                .filter(|g| g.consistent)
                .map(|_| ())
        });
    }

    /// Tails of every role's current log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, p) in [
            ("relay", &self.relay),
            ("target", &self.target),
            ("agent", &self.agent),
        ] {
            if let Some(p) = p {
                out.push_str(&format!(
                    "--- {name} ({})\n{}\n",
                    p.log.display(),
                    tail(&p.log_text())
                ));
            }
        }
        out
    }

    pub fn stop_all(&mut self) {
        for p in [
            self.agent.as_mut(),
            self.target.as_mut(),
            self.relay.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            p.stop(Duration::from_secs(40));
        }
    }

    /// The running agent's disk 0 started after an unclean stop (`what`: the
    /// kill or cut that made it one) with regions to resync.
    pub fn assert_unclean_start_resynced(&self, what: &str) {
        let a = self.agent_status().unwrap();
        let d = &a.groups[0].disks[0];
        assert!(
            d.start_reason.contains("did not stop in order") && d.start_pending_bytes > 0,
            "the {what} forced a resync: {} ({} bytes)",
            d.start_reason,
            d.start_pending_bytes
        );
    }

    pub fn assert_replica_equals_source(&self) {
        let same = tidemark::bench::run::compare_files(&self.source, &self.replica).unwrap();
        assert!(same, "replica differs from source\n{}", self.logs());
    }
}

/// A count a longer run can raise: the environment variable `name`, else
/// `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The last 40 lines of a log.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

pub fn read_json<T: for<'de> serde::Deserialize<'de>>(p: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(p).ok()?).ok()
}

/// Poll `f` every 20 ms until it returns `Some`; panic after `limit`.
pub fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Write `text` to `path`.
pub fn write(path: &Path, text: &str) {
    File::create(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}
