//! Prefix consistency under fire: the target killed with SIGKILL at random
//! instants while it applies (at least 50 times; `TIDEMARK_CRASH_KILLS=N` for
//! a longer run), and after every restart `recover --point latest` equals the
//! source as it was after exactly the writes with seq ≤ the point (the test
//! rebuilds that state from the agent's workload log), and so do earlier
//! points still in retention: a random one every fifth restart, and at the end
//! 40 spread over the whole history (`TIDEMARK_CRASH_SWEEP=0`: every one). And
//! a consistency group of three disks: every recovery point gives all three at
//! the same seq.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::forgetful::Forgetful;
use common::{Cluster, exe, tail, wait_until};
use tidemark::agent::workload::{Pattern, WorkloadSpec, write_data};
use tidemark::config::{AgentConfig, TargetDisk};
use tidemark::util::prng::Prng;

const MIB: u64 = 1 << 20;

/// One logged write.
#[derive(Debug, Clone, Copy)]
struct Logged {
    seq: u64,
    disk: u16,
    offset: u64,
    len: usize,
    index: u64,
}

/// The agent's workload log, read as it grows.
struct WorkLog {
    path: PathBuf,
    writes: Vec<Logged>,
    read: usize,
}

impl WorkLog {
    fn new(path: PathBuf) -> WorkLog {
        WorkLog {
            path,
            writes: Vec::new(),
            read: 0,
        }
    }

    /// Read what was appended since the last call (whole lines only).
    fn refresh(&mut self) {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return;
        };
        let Some(end) = text.rfind('\n') else { return };
        for line in text[self.read..=end].lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 5 {
                assert_ne!(f[0], "-", "capture kept only a region (degraded): {line}");
                self.writes.push(Logged {
                    seq: f[0].parse().unwrap(),
                    disk: f[1].parse().unwrap(),
                    offset: f[2].parse().unwrap(),
                    len: f[3].parse().unwrap(),
                    index: f[4].parse().unwrap(),
                });
            }
        }
        self.read = end + 1;
    }

    /// Wait until the log holds every write through `seq` (the log is
    /// flushed every 100 ms; the agent acknowledged them before the target
    /// could apply them).
    fn wait_through(&mut self, seq: u64) {
        let t0 = Instant::now();
        loop {
            self.refresh();
            if self.writes.last().is_some_and(|w| w.seq >= seq) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the workload log never reached seq {seq}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The source disks rebuilt from the log, write by write.
struct Model {
    spec: WorkloadSpec,
    disks: BTreeMap<u16, Vec<u8>>,
    applied: usize,
    buf: Vec<u8>,
}

impl Model {
    fn new(spec: WorkloadSpec, disks: &[(u16, u64)]) -> Model {
        Model {
            spec,
            disks: disks
                .iter()
                .map(|&(id, size)| (id, vec![0u8; size as usize]))
                .collect(),
            applied: 0,
            buf: Vec::new(),
        }
    }

    /// Apply the log's writes with seq ≤ `seq` not applied yet.
    fn advance(&mut self, log: &WorkLog, seq: u64) {
        while let Some(w) = log.writes.get(self.applied) {
            if w.seq > seq {
                break;
            }
            self.buf.resize(w.len, 0);
            write_data(&self.spec, w.index, &mut self.buf);
            let d = self.disks.get_mut(&w.disk).expect("a logged disk");
            d[w.offset as usize..w.offset as usize + w.len].copy_from_slice(&self.buf);
            self.applied += 1;
        }
    }

    fn at(spec: &WorkloadSpec, disks: &[(u16, u64)], log: &WorkLog, seq: u64) -> Model {
        let mut m = Model::new(spec.clone(), disks);
        m.advance(log, seq);
        m
    }
}

fn spec(seconds: f64, write_size: usize, seed: u64, rate_mb_s: f64) -> WorkloadSpec {
    WorkloadSpec {
        seconds,
        bytes: 0,
        write_size,
        pattern: Pattern::Random,
        compressibility: 50,
        seed,
        rate_bytes_per_sec: (rate_mb_s * 1e6) as u64,
        tag_every_secs: 0.0,
    }
}

/// `tidemark target recover --json ...`: the point's seq.
fn recover(c: &Cluster, point: &str, disk: Option<u16>, out: &Path) -> u64 {
    let mut cmd = Command::new(exe());
    cmd.args(["target", "recover", "--json", "--point", point, "--out"])
        .arg(out)
        .arg("--config")
        .arg(c.path("target.toml"));
    if let Some(d) = disk {
        cmd.args(["--disk", &d.to_string()]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "recover {point}: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        c.logs()
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["point"]["seq"].as_u64().unwrap()
}

fn points(c: &Cluster) -> Vec<serde_json::Value> {
    let o = Command::new(exe())
        .args(["target", "points", "--json", "--config"])
        .arg(c.path("target.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["points"].as_array().cloned().unwrap_or_default()
}

fn assert_same(got: &Path, want: &[u8], what: &str) {
    let g = std::fs::read(got).unwrap();
    assert_eq!(g.len(), want.len(), "{what}: size");
    if let Some(i) = g.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (block {})", i / 4096);
    }
}

fn kill_count() -> usize {
    common::env_count("TIDEMARK_CRASH_KILLS", 50)
}

/// Points the final sweep of the crash loop recovers at most (plus the newest):
/// `TIDEMARK_CRASH_SWEEP` (0: every point; each costs a `recover`), else
/// `default`.
fn sweep_points(default: usize) -> usize {
    match common::env_count("TIDEMARK_CRASH_SWEEP", default) {
        0 => usize::MAX,
        n => n,
    }
}

#[test]
fn e2e_target_killed_at_random_instants_every_point_stays_exact() {
    crash_loop(kill_count(), sweep_points(40), None);
}

/// Power cuts the power-loss loop makes: `TIDEMARK_POWER_CUTS`, default 12.
fn power_cut_count() -> usize {
    common::env_count("TIDEMARK_POWER_CUTS", 12)
}

/// The same loop with the target's replica, redo and retention journals,
/// watermark and catalog on a file system that forgets what was not synced
/// (tests/common/forgetful.rs): each "kill" cuts the power first, so what
/// survives is only what the target had made durable, and every point it then
/// offers must still be exact.
#[test]
fn e2e_target_power_cut_at_random_instants_every_point_stays_exact() {
    let power = Forgetful::mount(0xfeed, Duration::from_millis(5));
    // Each recover reads through FUSE here: a shorter final sweep by default.
    crash_loop(power_cut_count(), sweep_points(15), Some(&power));
}

/// Kill the target `kills` times at random instants while it applies (with
/// `power`, cut its file system's power first; its files live there), and
/// check every recovery point against the workload log after each restart,
/// and at the end at most `sweep` points spread over the history.
fn crash_loop(kills: usize, sweep: usize, power: Option<&Forgetful>) {
    let size = 16 * MIB;
    let mut c = Cluster::new(size);
    if let Some(p) = power {
        c.replica = p.path("replica.img");
    }
    c.start_relay();
    c.configure_target(|t| {
        t.groups[0].retention.enabled = true;
        t.groups[0].retention.granularity_ms = 50;
        if let Some(p) = power {
            t.target.state_dir = p.path("target-state");
        }
    });
    let log_path = c.dir.path().join("workload.log");
    let sp = spec(3600.0, 16 * 1024, 77, 6.0);
    c.start_target();
    c.start_agent(&[
        "--workload-seconds",
        "3600",
        "--workload-write-size",
        "16K",
        "--workload-seed",
        "77",
        "--workload-rate-mb-s",
        "6",
        "--workload-log",
        log_path.to_str().unwrap(),
    ]);
    let disks = [(0u16, size)];
    let mut log = WorkLog::new(log_path);
    let mut model = Model::new(sp.clone(), &disks);
    let mut rng = Prng::new(4242);
    let out = c.dir.path().join("recovered.img");
    let old = c.dir.path().join("older.img");
    let mut last_point = 0;
    let mut older_checked = 0;
    // Something to apply before the first kill, after the initial copy (an
    // M range: no consistent point before it ends).
    let copied = wait_until(Duration::from_secs(60), "the initial copy", || {
        let a = c.agent_status()?;
        let j = &a.groups.first()?.journal;
        (j.mode.mode == tidemark::capture::modes::Mode::Data).then_some(j.next_seq)
    });
    wait_until(Duration::from_secs(60), "writes applied", || {
        c.target_status()?
            .groups
            .first()
            .filter(|g| g.watermark.last_seq > copied + 100)
            .map(|_| ())
    });
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        match power {
            Some(p) => {
                p.power_off();
                c.target.as_mut().unwrap().kill9();
                p.power_on();
            }
            None => c.target.as_mut().unwrap().kill9(),
        }
        c.start_target();
        let seq = recover(&c, "latest", Some(0), &out);
        assert!(
            seq >= last_point,
            "kill {k}: latest went back from {last_point} to {seq}"
        );
        last_point = seq;
        log.wait_through(seq);
        model.advance(&log, seq);
        assert_same(
            &out,
            &model.disks[&0],
            &format!("kill {k}: latest point (seq {seq})"),
        );
        std::fs::remove_file(&out).unwrap();
        // Now and then an older point still in retention.
        if k % 5 == 4 {
            let pts: Vec<u64> = points(&c)
                .iter()
                .filter(|p| !p["epoch"].is_null())
                .filter_map(|p| p["seq"].as_u64())
                .filter(|&s| s < seq)
                .collect();
            if !pts.is_empty() {
                let s = pts[rng.below(pts.len() as u64) as usize];
                let got = recover(&c, &format!("seq:{s}"), Some(0), &old);
                assert_eq!(got, s, "seq:{s} names that point");
                let m = Model::at(&sp, &disks, &log, s);
                assert_same(
                    &old,
                    &m.disks[&0],
                    &format!("kill {k}: older point seq {s}"),
                );
                std::fs::remove_file(&old).unwrap();
                older_checked += 1;
            }
        }
    }
    assert!(
        older_checked >= kills / 10,
        "older points checked: {older_checked}"
    );
    // Finally, points spread evenly over the whole history still in retention
    // (every one when there are few), from the oldest on: each must be the
    // source after exactly the writes through it, whatever kills it lived through.
    let mut pts: Vec<u64> = points(&c)
        .iter()
        .filter(|p| !p["epoch"].is_null())
        .filter_map(|p| p["seq"].as_u64())
        .filter(|&s| s <= last_point)
        .collect();
    pts.sort_unstable();
    pts.dedup();
    assert!(!pts.is_empty(), "no point left in retention");
    let step = pts.len().div_ceil(sweep).max(1);
    let mut swept = Model::new(sp.clone(), &disks);
    let mut checked = 0;
    for &s in pts.iter().step_by(step).chain(pts.last()) {
        checked += 1;
        let got = recover(&c, &format!("seq:{s}"), Some(0), &old);
        assert_eq!(got, s, "seq:{s} names that point");
        swept.advance(&log, s);
        assert_same(&old, &swept.disks[&0], &format!("sweep: point seq {s}"));
        std::fs::remove_file(&old).unwrap();
    }
    eprintln!(
        "swept {checked} of the {} points in retention (seq {}..={})",
        pts.len(),
        pts[0],
        pts[pts.len() - 1]
    );
    if let Some(st) = c.target.as_mut().and_then(|t| t.exited()) {
        let log = c.target.as_ref().map(|t| t.log_text()).unwrap_or_default();
        panic!("the target exited ({st}):\n{}", tail(&log));
    }
    // The status file is replaced every ~100 ms; allow a moment for a read
    // that races a replacement, and say why if it never parses.
    let mut st = None;
    for _ in 0..250 {
        st = c.target_status();
        if st.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = st.unwrap_or_else(|| {
        let sp = c
            .target_state_dir()
            .join(tidemark::util::statusfile::STATUS_FILE);
        let why = match std::fs::read(&sp) {
            Err(e) => e.to_string(),
            Ok(b) => format!(
                "{} bytes: {:?}",
                b.len(),
                String::from_utf8_lossy(&b[..b.len().min(200)])
            ),
        };
        panic!(
            "the target's status {} is unreadable ({why}):\n{}",
            sp.display(),
            c.logs()
        )
    });
    assert_eq!(st.groups[0].chain_violations, 0);
    c.stop_all();
    if let Some(p) = power {
        // The apply log is a diagnostic that is never synced: a cut may have
        // taken its tail, so it cannot count the restarts here.
        eprintln!("power cuts: {:?}", p.stats());
        return;
    }
    let applylog = c.target_state_dir().join("g1").join("apply.log");
    let s = tidemark::target::check_apply_log(&applylog)
        .unwrap_or_else(|e| panic!("apply log: {e}\n{}", tail(&c.logs())));
    assert!(s.starts as usize > kills, "{s:?}");
}

#[test]
fn e2e_a_group_of_three_disks_recovers_at_one_seq() {
    let size = 8 * MIB;
    let mut c = Cluster::new(size);
    c.start_relay();
    // Three disks in group g1 on both sides.
    let srcs: Vec<PathBuf> = (0..3)
        .map(|i| c.dir.path().join(format!("src{i}.img")))
        .collect();
    for s in &srcs {
        std::fs::File::create(s).unwrap().set_len(size).unwrap();
    }
    let reps: Vec<PathBuf> = (0..3)
        .map(|i| c.dir.path().join(format!("rep{i}.img")))
        .collect();
    c.configure_agent(|a: &mut AgentConfig| {
        let d0 = a.groups[0].disks[0].clone();
        a.groups[0].disks = (0..3u32)
            .map(|i| {
                let mut d = d0.clone();
                d.id = i;
                d.path = srcs[i as usize].clone();
                d
            })
            .collect();
    });
    c.configure_target(|t| {
        t.groups[0].retention.enabled = true;
        t.groups[0].retention.granularity_ms = 20;
        t.groups[0].disks = (0..3u32)
            .map(|i| TargetDisk {
                id: i,
                path: reps[i as usize].clone(),
                format: Default::default(),
            })
            .collect();
    });
    let log_path = c.dir.path().join("workload.log");
    let sp = WorkloadSpec {
        bytes: 24 * MIB,
        ..spec(0.0, 8 * 1024, 31, 8.0)
    };
    c.start_target();
    c.start_agent(&[
        "--workload-bytes",
        "24M",
        "--workload-write-size",
        "8K",
        "--workload-seed",
        "31",
        "--workload-rate-mb-s",
        "8",
        "--workload-log",
        log_path.to_str().unwrap(),
    ]);
    let last = c.wait_workload_done(Duration::from_secs(120));
    c.wait_applied(last, Duration::from_secs(120));
    let disks: Vec<(u16, u64)> = (0..3).map(|i| (i, size)).collect();
    let mut log = WorkLog::new(log_path);
    log.wait_through(last);
    // Writes went to every disk, interleaved.
    let per_disk: Vec<usize> = (0..3u16)
        .map(|d| log.writes.iter().filter(|w| w.disk == d).count())
        .collect();
    assert!(per_disk.iter().all(|&n| n > 100), "{per_disk:?}");
    let pts: Vec<u64> = points(&c)
        .iter()
        .filter(|p| !p["epoch"].is_null())
        .filter_map(|p| p["seq"].as_u64())
        .collect();
    assert!(pts.len() >= 5, "points: {pts:?}");
    // The oldest, the newest, and a few between.
    let mut pick = vec![pts[0], pts[pts.len() - 1]];
    let mut rng = Prng::new(9);
    for _ in 0..4 {
        pick.push(pts[rng.below(pts.len() as u64) as usize]);
    }
    pick.sort_unstable();
    pick.dedup();
    for s in pick {
        let dir = c.dir.path().join(format!("at-{s}"));
        let got = recover(&c, &format!("seq:{s}"), None, &dir);
        assert_eq!(got, s);
        let m = Model::at(&sp, &disks, &log, s);
        for d in 0..3u16 {
            assert_same(
                &dir.join(format!("g1-disk{d}.img")),
                &m.disks[&d],
                &format!("point seq {s}, disk {d}"),
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    c.stop_all();
    for i in 0..3 {
        assert!(
            tidemark::bench::run::compare_files(&srcs[i], &reps[i]).unwrap(),
            "disk {i}: replica differs from source"
        );
    }
}
