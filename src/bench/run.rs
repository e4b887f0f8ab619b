//! `tidemark bench`: the whole pipeline on one machine, measured.
//!
//! The three roles run as child processes of this same binary (so each has its
//! own CPU time and peak RSS), on loopback with mutual TLS and certificates made
//! on the fly in a scratch directory. The agent drives the synthetic workload
//! through its capture journal; the bench waits until the target's durable
//! watermark reaches the workload's last seq, checks that the replica equals the
//! source byte for byte, and reports throughput, lag, CPU and memory per role,
//! and the efficiency against the per-stage bound measured in the same run on
//! the same kind of data (see docs/BENCH.md).

use std::fs::{self, File};
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cost::{self, CostOptions, StageCosts};
use crate::agent::AgentStatus;
use crate::agent::workload::Pattern;
use crate::config::{AgentConfig, RelayConfig, TargetConfig};
use crate::relay::RelayStatus;
use crate::target::TargetStatus;
use crate::util::procstat::{self, ProcUsage};
use crate::util::statusfile::STATUS_FILE;

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchOptions {
    /// Seconds of workload.
    pub seconds: f64,
    /// Size of the protected disk (sparse image).
    pub image_size: u64,
    /// Bytes per write.
    pub write_size: usize,
    /// Random or sequential.
    pub pattern: Pattern,
    /// Share of each block that compresses away, 0..=100.
    pub compressibility: u8,
    /// zstd level of the agent.
    pub zstd_level: i32,
    /// Throttle the workload to this many MB/s (0: unthrottled).
    pub rate_mb_s: f64,
    /// Seed of data and offsets.
    pub seed: u64,
    /// Scratch directory (created; removed afterwards unless `keep`). It should
    /// be on the file system whose speed the target's images would see.
    pub dir: PathBuf,
    /// Keep the scratch directory (configs, logs, images) afterwards.
    pub keep: bool,
    /// The `tidemark` binary to start the roles with.
    pub exe: PathBuf,
    /// Print a progress line on stderr.
    pub progress: bool,
    /// Skip measuring the per-stage bound (no efficiency figure).
    pub skip_bound: bool,
    /// Run the relay's spool with O_DIRECT (`spool_direct_io` in relay.toml).
    pub spool_direct_io: bool,
    /// Put the relay's spool here instead of in the scratch directory (e.g. on
    /// a second disk, as a relay on its own machine would have). Must not exist
    /// yet; removed afterwards unless `keep`.
    pub spool_dir: Option<PathBuf>,
    /// Where the source disk's image goes: `Auto` puts it in memory (tmpfs)
    /// when it fits with room to spare, else in the scratch directory
    /// ([`SourcePlace`]).
    #[serde(default)]
    pub source: SourcePlace,
}

/// Where the bench keeps the source disk (the protected machine's disk).
///
/// The source disk is not part of the pipeline: in a deployment it is the
/// protected machine's own disk, written by its applications whatever
/// tidemark does. On one machine its writeback would share the disk with the
/// relay's spool and the replica, so by default the bench keeps it in memory
/// when it fits (docs/BENCH.md, "The source disk").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourcePlace {
    /// In `/dev/shm` when it is tmpfs and holds the image twice over with
    /// the machine's available memory at least four times the image; in the
    /// scratch directory otherwise.
    #[default]
    Auto,
    /// In the scratch directory, on the replica's disk.
    Scratch,
    /// In this directory (created, and removed afterwards unless `keep`).
    Dir(PathBuf),
}

/// A figure per role.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PerRole {
    /// The agent.
    pub agent: f64,
    /// The relay.
    pub relay: f64,
    /// The target.
    pub target: f64,
}

/// What the bench measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// The replica equals the source byte for byte.
    pub verified: bool,
    /// Workload MB/s at the source (10^6 bytes/s).
    pub source_mb_s: f64,
    /// End to end: workload bytes ÷ (first write → watermark reached the last write).
    pub applied_mb_s: f64,
    /// The per-stage bound, MB/s (0 when skipped).
    pub bound_mb_s: f64,
    /// applied_mb_s ÷ bound_mb_s (0 when the bound was skipped).
    pub efficiency: f64,
    /// Frames applied at the target per second of the end-to-end interval.
    pub frames_per_s: f64,
    /// Plaintext bytes ÷ sealed bytes at the agent.
    pub compression_ratio: f64,
    /// Lag from write acknowledged at the source to durably applied at the target, median, ms.
    pub lag_p50_ms: f64,
    /// The same, 99th percentile, ms.
    pub lag_p99_ms: f64,
    /// CPU seconds per GB of workload, per role.
    pub cpu_s_per_gb: PerRole,
    /// Of the agent's CPU seconds per GB, those of the workload's writer
    /// thread (generating data, writing the source image, recording each write
    /// in the capture journal): what stands for the protected applications.
    pub workload_cpu_s_per_gb: f64,
    /// Peak RSS per role, MiB.
    pub peak_rss_mib: PerRole,
    /// Seconds of the end-to-end interval.
    pub seconds: f64,
    /// Usable CPU cores.
    pub cores: usize,
    /// Bytes the workload wrote.
    pub bytes: u64,
    /// Writes it made.
    pub writes: u64,
    /// Frames the target applied.
    pub frames: u64,
    /// The per-stage costs behind the bound.
    pub costs: Option<StageCosts>,
    /// The source disk's image, and whether it was on tmpfs (in memory).
    pub source_path: PathBuf,
    /// True when the source image was on tmpfs.
    pub source_in_memory: bool,
    /// The options of this run.
    pub options: BenchOptions,
}

/// Why a bench run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up the scratch directory, configs or images failed.
    #[error("bench setup: {0}")]
    Setup(String),
    /// A role process could not start or died.
    #[error("bench: {role} {what} (log: {log})")]
    Role {
        /// Which role.
        role: &'static str,
        /// What happened.
        what: String,
        /// Its log file.
        log: PathBuf,
    },
    /// The pipeline did not catch up in time.
    #[error("bench: {0}")]
    Stuck(String),
    /// Measuring the stage costs failed.
    #[error("bench: measuring stage costs: {0}")]
    Cost(String),
}

/// A role process with its log.
struct Role {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Role {
    fn start(
        name: &'static str,
        exe: &Path,
        args: &[String],
        dir: &Path,
    ) -> Result<Role, BenchError> {
        let log = dir.join(format!("{name}.log"));
        let f =
            File::create(&log).map_err(|e| BenchError::Setup(format!("{}: {e}", log.display())))?;
        let child = Command::new(exe)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .map_err(|e| BenchError::Role {
                role: name,
                what: format!("cannot start {}: {e}", exe.display()),
                log: log.clone(),
            })?;
        Ok(Role { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(BenchError::Role {
                role: self.name,
                what: format!("exited early ({st}): {}", last_line(&self.log)),
                log: self.log.clone(),
            }),
            Err(e) => Err(BenchError::Role {
                role: self.name,
                what: format!("cannot be waited for: {e}"),
                log: self.log.clone(),
            }),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    fn stop(&mut self, grace: Duration) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = kill(pid, Signal::SIGTERM);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

fn last_line(log: &Path) -> String {
    fs::read_to_string(log)
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn read_status<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let b = fs::read(path).ok()?;
    serde_json::from_slice(&b).ok()
}

fn setup_err(what: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(what.to_string())
}

fn write_config(
    path: &Path,
    text: Result<String, crate::config::ConfigError>,
) -> Result<(), BenchError> {
    let text = text.map_err(setup_err)?;
    fs::write(path, text).map_err(|e| setup_err(format!("{}: {e}", path.display())))
}

/// Poll `f` every `every` until it returns `Some`, `deadline` passes, or a role dies.
fn wait_for<T>(
    roles: &mut [&mut Role],
    deadline: Instant,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, BenchError> {
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        for r in roles.iter_mut() {
            r.check_alive()?;
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Stuck(format!("timed out waiting for {what}")));
        }
        std::thread::sleep(every);
    }
}

/// Where `Auto` looks for memory to hold the source image.
const SHM_DIR: &str = "/dev/shm";

/// True when `dir` is on tmpfs (memory).
pub fn is_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Bytes an unprivileged writer may still put in `dir`'s file system (0 when
/// it cannot be read).
pub fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0)
}

/// The directory the source image goes to (`None`: the scratch directory),
/// and whether it is tmpfs.
fn source_dir(opts: &BenchOptions) -> Result<(Option<PathBuf>, bool), BenchError> {
    match &opts.source {
        SourcePlace::Scratch => Ok((None, false)),
        SourcePlace::Dir(d) => {
            if d.exists() {
                return Err(setup_err(format!(
                    "--source-dir {} exists; give a path the bench may create and remove",
                    d.display()
                )));
            }
            let parent = d
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            Ok((Some(d.clone()), is_tmpfs(parent)))
        }
        SourcePlace::Auto => {
            let shm = Path::new(SHM_DIR);
            let fits = is_tmpfs(shm)
                && free_bytes(shm) >= opts.image_size.saturating_mul(2)
                && procstat::mem_available().unwrap_or(0) >= opts.image_size.saturating_mul(4);
            let name = opts.dir.file_name().map_or_else(
                || "tidemark-bench".into(),
                |n| n.to_string_lossy().into_owned(),
            );
            Ok(if fits {
                (Some(shm.join(format!("{name}-source"))), true)
            } else {
                (None, false)
            })
        }
    }
}

/// Run the bench.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let dir = &opts.dir;
    let (source, source_in_memory) = source_dir(opts)?;
    fs::create_dir_all(dir).map_err(|e| setup_err(format!("{}: {e}", dir.display())))?;
    // Never remove a spool directory that was there before (run_in refuses it).
    let spool_was_there = opts.spool_dir.as_ref().is_some_and(|d| d.exists());
    let mut created_source = false;
    let result = match &source {
        Some(d) => match fs::create_dir(d) {
            Ok(()) => {
                created_source = true;
                run_in(opts, dir, d, source_in_memory)
            }
            Err(e) => Err(setup_err(format!("source directory {}: {e}", d.display()))),
        },
        None => run_in(opts, dir, dir, false),
    };
    if !opts.keep {
        let _ = fs::remove_dir_all(dir);
        if let Some(d) = &opts.spool_dir
            && !spool_was_there
        {
            let _ = fs::remove_dir_all(d);
        }
    }
    // The source directory is removed even with `keep` when it is in memory.
    if let Some(d) = &source
        && created_source
        && (!opts.keep || source_in_memory)
    {
        let _ = fs::remove_dir_all(d);
    }
    result
}

fn run_in(
    opts: &BenchOptions,
    dir: &Path,
    source_dir: &Path,
    source_in_memory: bool,
) -> Result<BenchReport, BenchError> {
    let conf = dir.join("conf");
    // The clients' relay address is patched in once the relay has bound its
    // ephemeral port; until then the configs carry init's placeholder.
    let mut init = crate::pki::InitOptions::new(&conf);
    init.relay_listen = "127.0.0.1:7400".into();
    crate::pki::init(&init).map_err(setup_err)?;

    let source = source_dir.join("source.img");
    let replica = dir.join("replica.img");
    File::create(&source)
        .and_then(|f| f.set_len(opts.image_size))
        .map_err(|e| setup_err(format!("{}: {e}", source.display())))?;

    // The bound, on the same file system and the same kind of data: measured
    // before the run and again after it, and averaged.
    let cost_opts = CostOptions {
        compressibility: opts.compressibility,
        zstd_level: opts.zstd_level,
        write_size: opts.write_size,
        frame_bytes: 4 << 20,
        sample_bytes: 64 << 20,
        dir: dir.to_path_buf(),
        seed: opts.seed ^ 0x5eed,
        rounds: 3,
    };
    let measure_costs = || -> Result<Option<StageCosts>, BenchError> {
        if opts.skip_bound {
            return Ok(None);
        }
        if opts.progress {
            eprintln!("measuring per-stage costs (zstd, AES-GCM, write+fdatasync) ...");
        }
        cost::measure(&cost_opts)
            .map(Some)
            .map_err(|e| BenchError::Cost(e.to_string()))
    };
    let costs_before = measure_costs()?;

    // Relay on an ephemeral port; learn the port from its status file.
    let relay_toml = conf.join("relay.toml");
    let mut relay_cfg = RelayConfig::load(&relay_toml).map_err(setup_err)?;
    relay_cfg.relay.listen = ([127, 0, 0, 1], 0).into();
    relay_cfg.relay.status_listen = None;
    relay_cfg.relay.spool_direct_io = opts.spool_direct_io;
    if let Some(d) = &opts.spool_dir {
        if d.exists() {
            return Err(setup_err(format!(
                "--spool-dir {} exists; give a path the bench may create and remove",
                d.display()
            )));
        }
        relay_cfg.relay.spool_dir = d.clone();
    }
    write_config(&relay_toml, relay_cfg.to_toml_string())?;
    let exe = &opts.exe;
    let arg = |s: &str, p: &Path| vec![s.to_string(), "--config".into(), p.display().to_string()];
    let mut relay = Role::start("relay", exe, &arg("relay", &relay_toml), dir)?;
    let relay_status = relay_cfg.relay.spool_dir.join(STATUS_FILE);
    let addr = wait_for(
        &mut [&mut relay],
        Instant::now() + Duration::from_secs(30),
        Duration::from_millis(20),
        "the relay to listen",
        || read_status::<RelayStatus>(&relay_status).map(|s| s.listen),
    )?;

    let target_toml = conf.join("target.toml");
    let mut target_cfg = TargetConfig::load(&target_toml).map_err(setup_err)?;
    target_cfg.target.relay = addr.to_string();
    target_cfg.target.relay_name = "127.0.0.1".into();
    target_cfg.target.status_listen = None;
    target_cfg.groups[0].disks[0].path = replica.clone();
    write_config(&target_toml, target_cfg.to_toml_string())?;

    let agent_toml = conf.join("agent.toml");
    let mut agent_cfg = AgentConfig::load(&agent_toml).map_err(setup_err)?;
    agent_cfg.agent.relay = addr.to_string();
    agent_cfg.agent.relay_name = "127.0.0.1".into();
    agent_cfg.agent.status_listen = None;
    // The bench measures the pipeline: writes wait for the relay instead of
    // degrading capture to the dirty bitmap.
    agent_cfg.agent.capture_policy = crate::capture::journal::Policy::Block;
    // ...and every stage at the same priority (there is no workload to yield to).
    agent_cfg.agent.pipeline_nice = 0;
    agent_cfg.groups[0].zstd_level = opts.zstd_level;
    agent_cfg.groups[0].disks[0].path = source.clone();
    write_config(&agent_toml, agent_cfg.to_toml_string())?;

    let mut target = Role::start("target", exe, &arg("target", &target_toml), dir)?;
    let mut agent_args = arg("agent", &agent_toml);
    agent_args.extend([
        "--workload-seconds".into(),
        opts.seconds.to_string(),
        "--workload-write-size".into(),
        opts.write_size.to_string(),
        "--workload-pattern".into(),
        match opts.pattern {
            Pattern::Random => "random".into(),
            Pattern::Sequential => "sequential".into(),
        },
        "--workload-compressibility".into(),
        opts.compressibility.to_string(),
        "--workload-seed".into(),
        opts.seed.to_string(),
        "--workload-rate-mb-s".into(),
        opts.rate_mb_s.to_string(),
    ]);
    let mut agent = Role::start("agent", exe, &agent_args, dir)?;
    let agent_status = agent_cfg.agent.state_dir.join(STATUS_FILE);
    let target_status = target_cfg.target.state_dir.join(STATUS_FILE);

    // Wait for the workload to finish, showing progress.
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_print = Instant::now();
    let deadline = Instant::now() + Duration::from_secs_f64(opts.seconds + 120.0);
    let work = wait_for(
        &mut [&mut relay, &mut target, &mut agent],
        deadline,
        Duration::from_millis(100),
        "the workload to finish",
        || {
            let a = read_status::<AgentStatus>(&agent_status)?;
            let w = a.groups.first()?.workload.clone()?;
            if opts.progress && (tty || last_print.elapsed() >= Duration::from_secs(5)) {
                last_print = Instant::now();
                let applied = read_status::<TargetStatus>(&target_status)
                    .and_then(|t| t.groups.first().map(|g| g.bytes_applied))
                    .unwrap_or(0);
                let line = format!(
                    "[{:5.1}s] written {:8.1} MB ({:7.1} MB/s)  applied {:8.1} MB",
                    started.elapsed().as_secs_f64(),
                    w.bytes as f64 / 1e6,
                    w.mb_per_sec(),
                    applied as f64 / 1e6
                );
                if tty {
                    eprint!("\r{line}");
                } else {
                    eprintln!("{line}");
                }
            }
            w.done.then_some(w)
        },
    )?;
    if let Some(e) = &work.error {
        return Err(BenchError::Role {
            role: "agent",
            what: format!("workload failed: {e}"),
            log: agent.log.clone(),
        });
    }
    // Then for the target's durable watermark to reach the workload's last write.
    let caught = wait_for(
        &mut [&mut relay, &mut target, &mut agent],
        Instant::now() + Duration::from_secs(300),
        Duration::from_millis(20),
        "the target to apply the last write",
        || {
            let t = read_status::<TargetStatus>(&target_status)?;
            let g = t.groups.first()?;
            (g.watermark.last_seq >= work.last_seq).then(|| (crate::util::time::now_us(), t))
        },
    )?;
    if opts.progress {
        eprintln!(
            "{}caught up; stopping the roles and comparing images",
            if tty { "\n" } else { "" }
        );
    }
    let (caught_us, tstat) = caught;
    let usage = |r: &Role| {
        procstat::read(r.pid()).map_err(|e| BenchError::Role {
            role: r.name,
            what: format!("cannot read its CPU and memory use: {e}"),
            log: r.log.clone(),
        })
    };
    let (ua, ur, ut) = (usage(&agent)?, usage(&relay)?, usage(&target)?);
    let astat = read_status::<AgentStatus>(&agent_status);
    agent.stop(Duration::from_secs(40));
    target.stop(Duration::from_secs(20));
    relay.stop(Duration::from_secs(20));

    let verified = compare_files(&source, &replica).map_err(setup_err)?;
    let costs = match (costs_before, measure_costs()?) {
        (Some(a), Some(b)) => Some(a.mean(&b)),
        _ => None,
    };
    let tg = tstat.groups.first().cloned();
    let seconds = caught_us.saturating_sub(work.start_us) as f64 / 1e6;
    let gb = work.bytes as f64 / 1e9;
    let per_gb = |u: &ProcUsage| if gb > 0.0 { u.cpu_seconds / gb } else { 0.0 };
    let mib = |u: &ProcUsage| u.peak_rss_bytes as f64 / (1 << 20) as f64;
    let applied_mb_s = if seconds > 0.0 {
        work.bytes as f64 / seconds / 1e6
    } else {
        0.0
    };
    let bound_mb_s = costs.as_ref().map_or(0.0, |c| c.bound_bytes_per_sec / 1e6);
    let (plain, stored) = astat
        .as_ref()
        .and_then(|a| a.groups.first())
        .map_or((0, 0), |g| (g.plain_bytes, g.stored_bytes));
    let frames = tg.as_ref().map_or(0, |g| g.frames_applied);
    let lag = tg.as_ref().map(|g| g.lag_us).unwrap_or_default();
    Ok(BenchReport {
        verified,
        source_mb_s: work.mb_per_sec(),
        applied_mb_s,
        bound_mb_s,
        efficiency: if bound_mb_s > 0.0 {
            applied_mb_s / bound_mb_s
        } else {
            0.0
        },
        frames_per_s: if seconds > 0.0 {
            frames as f64 / seconds
        } else {
            0.0
        },
        compression_ratio: if stored > 0 {
            plain as f64 / stored as f64
        } else {
            0.0
        },
        lag_p50_ms: lag.p50 as f64 / 1e3,
        lag_p99_ms: lag.p99 as f64 / 1e3,
        cpu_s_per_gb: PerRole {
            agent: per_gb(&ua),
            relay: per_gb(&ur),
            target: per_gb(&ut),
        },
        workload_cpu_s_per_gb: if gb > 0.0 { work.cpu_seconds / gb } else { 0.0 },
        peak_rss_mib: PerRole {
            agent: mib(&ua),
            relay: mib(&ur),
            target: mib(&ut),
        },
        seconds,
        cores: procstat::cores(),
        bytes: work.bytes,
        writes: work.writes,
        frames,
        costs,
        source_path: source,
        source_in_memory,
        options: opts.clone(),
    })
}

/// Compare two files byte for byte; holes present in both are skipped without
/// reading (a 64 GiB sparse image compares in the time its data takes).
pub fn compare_files(a: &Path, b: &Path) -> Result<bool, String> {
    let fa = File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let fb = File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let la = fa.metadata().map_err(|e| e.to_string())?.len();
    let lb = fb.metadata().map_err(|e| e.to_string())?.len();
    if la != lb {
        return Ok(false);
    }
    const CHUNK: u64 = 4 << 20;
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < la {
        // Next data in either file; everything before it is a hole in both.
        let next = next_data(&fa, off, la).min(next_data(&fb, off, la));
        if next >= la {
            break;
        }
        let start = next - next % CHUNK;
        let start = start.max(off);
        let n = (la - start).min(CHUNK) as usize;
        fa.read_exact_at(&mut ba[..n], start)
            .map_err(|e| format!("{}: {e}", a.display()))?;
        fb.read_exact_at(&mut bb[..n], start)
            .map_err(|e| format!("{}: {e}", b.display()))?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off = start + n as u64;
    }
    Ok(true)
}

fn next_data(f: &File, off: u64, len: u64) -> u64 {
    match nix::unistd::lseek(f, off as i64, nix::unistd::Whence::SeekData) {
        Ok(p) => p as u64,
        Err(nix::errno::Errno::ENXIO) => len,
        Err(_) => off,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, image_size: u64, source: SourcePlace) -> BenchOptions {
        BenchOptions {
            seconds: 1.0,
            image_size,
            write_size: 4096,
            pattern: Pattern::Random,
            compressibility: 50,
            zstd_level: 1,
            rate_mb_s: 0.0,
            seed: 1,
            dir: dir.join("scratch"),
            keep: false,
            exe: PathBuf::from("tidemark"),
            progress: false,
            skip_bound: true,
            spool_direct_io: false,
            spool_dir: None,
            source,
        }
    }

    #[test]
    fn the_source_goes_to_memory_only_when_it_fits() {
        let d = tempfile::tempdir().unwrap();
        // Far more than any machine's memory: the scratch directory.
        let huge = options(d.path(), 1 << 60, SourcePlace::Auto);
        assert_eq!(source_dir(&huge).unwrap(), (None, false));
        // Small, with /dev/shm as tmpfs (it is on Linux machines with systemd
        // or docker; skip the check where it is not).
        let small = options(d.path(), 1 << 20, SourcePlace::Auto);
        if is_tmpfs(Path::new(SHM_DIR)) {
            let (dir, tmpfs) = source_dir(&small).unwrap();
            assert!(tmpfs);
            let dir = dir.unwrap();
            assert!(dir.starts_with(SHM_DIR), "{}", dir.display());
            assert!(dir.to_string_lossy().ends_with("scratch-source"));
        }
        let scratch = options(d.path(), 1 << 20, SourcePlace::Scratch);
        assert_eq!(source_dir(&scratch).unwrap(), (None, false));
        // An explicit directory must not exist yet (it is removed afterwards).
        let there = options(d.path(), 1 << 20, SourcePlace::Dir(d.path().to_path_buf()));
        let err = source_dir(&there).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        let new = d.path().join("src");
        let fresh = options(d.path(), 1 << 20, SourcePlace::Dir(new.clone()));
        assert_eq!(source_dir(&fresh).unwrap().0, Some(new));
    }

    #[test]
    fn compare_detects_differences_and_skips_common_holes() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for p in [&a, &b] {
            let f = File::create(p).unwrap();
            f.set_len(64 << 20).unwrap();
            f.write_all_at(&[7u8; 100], 30 << 20).unwrap();
        }
        assert!(compare_files(&a, &b).unwrap());
        File::options()
            .write(true)
            .open(&b)
            .unwrap()
            .write_all_at(&[1], (50 << 20) + 3)
            .unwrap();
        assert!(!compare_files(&a, &b).unwrap());
        // Data written as zeros equals a hole.
        File::options()
            .write(true)
            .open(&b)
            .unwrap()
            .write_all_at(&[0], (50 << 20) + 3)
            .unwrap();
        assert!(compare_files(&a, &b).unwrap());
        File::create(&b).unwrap().set_len(1).unwrap();
        assert!(!compare_files(&a, &b).unwrap());
    }
}
