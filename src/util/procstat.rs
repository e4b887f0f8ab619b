//! CPU time and memory of a process, read from `/proc`, for the bench's per-role
//! figures (the bench runs relay, target and agent as child processes).
//!
//! - **CPU seconds** are `utime + stime` from `/proc/<pid>/stat` (fields 14 and 15):
//!   user plus system time of every thread of the process, including threads that
//!   have already exited. The kernel reports them in clock ticks (`USER_HZ`). The
//!   tick rate is taken from the `AT_CLKTCK` entry of this process's auxiliary
//!   vector (`/proc/self/auxv`), which is where the C library's
//!   `sysconf(_SC_CLK_TCK)` gets it too; that keeps this module free of `unsafe`
//!   without assuming 100 Hz. Resolution is one tick (10 ms at the usual 100 Hz).
//!   `/proc/<pid>/schedstat` (nanoseconds) was not used: it covers one thread only,
//!   and the roles are multi-threaded.
//! - **RSS** and **peak RSS** are `VmRSS` and `VmHWM` from `/proc/<pid>/status`
//!   (kB). A process without an address space (a kernel thread, or a zombie that
//!   has exited but not been reaped) has neither; that is reported as
//!   [`ProcStatError::NoAddressSpace`] rather than as a misleading zero, so sample
//!   a child before waiting for it.
//!
//! Everything read from `/proc` is treated as untrusted text: malformed content is
//! an error, never a panic.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// CPU and memory usage of one process at one instant.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProcUsage {
    /// User plus system CPU time of all the process's threads so far, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size now (`VmRSS`), in bytes.
    pub rss_bytes: u64,
    /// Peak resident set size since the process started (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
}

/// Why the usage of a process could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcStatError {
    /// There is no process with that id (it never existed, or exited and was reaped).
    #[error("process {pid} does not exist (never started, or exited and was reaped)")]
    NoSuchProcess {
        /// The process id asked for.
        pid: u32,
    },
    /// A `/proc` file could not be read for another reason (permissions, I/O).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A `/proc` file did not have the expected layout.
    #[error("{} is malformed: {detail}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The process has no memory figures: a kernel thread, or a zombie (exited,
    /// not yet reaped).
    #[error(
        "{} has no VmRSS/VmHWM: the process has no address space (a zombie or a kernel \
         thread); sample a child before waiting for it",
        path.display()
    )]
    NoAddressSpace {
        /// The status file.
        path: PathBuf,
    },
    /// The clock tick rate could not be found in `/proc/self/auxv`.
    #[error("cannot find the clock tick rate (AT_CLKTCK) in /proc/self/auxv: {detail}")]
    ClockTicks {
        /// What went wrong.
        detail: String,
    },
}

/// Usage of process `pid` (typically a child of the caller).
pub fn read(pid: u32) -> Result<ProcUsage, ProcStatError> {
    read_at(&Path::new("/proc").join(pid.to_string()), Some(pid))
}

/// Usage of the calling process.
pub fn read_self() -> Result<ProcUsage, ProcStatError> {
    read_at(Path::new("/proc/self"), None)
}

/// Number of CPUs this process may use (affinity mask and cgroup quota taken into
/// account by [`std::thread::available_parallelism`]); 1 if that cannot be found.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn read_at(dir: &Path, pid: Option<u32>) -> Result<ProcUsage, ProcStatError> {
    let ticks = clock_ticks()?;
    let stat_path = dir.join("stat");
    let stat = read_file(&stat_path, pid)?;
    let times = parse_stat(&stat).map_err(|detail| ProcStatError::Malformed {
        path: stat_path.clone(),
        detail,
    })?;
    let status_path = dir.join("status");
    let status = read_file(&status_path, pid)?;
    let mem = match parse_status(&status) {
        Ok(Some(m)) => m,
        Ok(None) => return Err(ProcStatError::NoAddressSpace { path: status_path }),
        Err(detail) => {
            return Err(ProcStatError::Malformed {
                path: status_path,
                detail,
            });
        }
    };
    let total_ticks = times.utime.saturating_add(times.stime);
    Ok(ProcUsage {
        cpu_seconds: total_ticks as f64 / ticks as f64,
        rss_bytes: mem.rss_kb.saturating_mul(1024),
        peak_rss_bytes: mem.hwm_kb.saturating_mul(1024),
    })
}

/// Read a whole `/proc` file as bytes (the comm field need not be UTF-8).
fn read_file(path: &Path, pid: Option<u32>) -> Result<Vec<u8>, ProcStatError> {
    std::fs::read(path).map_err(|source| {
        // ENOENT: no such directory; ESRCH: the process went away between open
        // and read.
        let gone =
            source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH);
        match pid {
            Some(pid) if gone => ProcStatError::NoSuchProcess { pid },
            _ => ProcStatError::Read {
                path: path.to_path_buf(),
                source,
            },
        }
    })
}

/// CPU time fields of `/proc/<pid>/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatTimes {
    utime: u64,
    stime: u64,
}

/// Parse `utime` and `stime` out of a `/proc/<pid>/stat` line. The second field,
/// `(comm)`, may contain spaces, parentheses and non-UTF-8 bytes, so fields are
/// counted from after the *last* `)`.
fn parse_stat(text: &[u8]) -> Result<StatTimes, String> {
    let open = text
        .iter()
        .position(|&b| b == b'(')
        .ok_or("no '(' opening the command name")?;
    let close = text
        .iter()
        .rposition(|&b| b == b')')
        .ok_or("no ')' closing the command name")?;
    if close < open {
        return Err("the last ')' comes before the first '('".to_string());
    }
    let rest = std::str::from_utf8(&text[close + 1..])
        .map_err(|_| "non-UTF-8 bytes after the command name".to_string())?;
    // After ")": state(3) ppid(4) pgrp(5) session(6) tty_nr(7) tpgid(8) flags(9)
    // minflt(10) cminflt(11) majflt(12) cmajflt(13) utime(14) stime(15) ...
    const UTIME: usize = 14 - 3;
    let mut fields = rest.split_ascii_whitespace().skip(UTIME);
    let mut next = |name: &str| -> Result<u64, String> {
        let f = fields
            .next()
            .ok_or_else(|| format!("too few fields: no {name}"))?;
        f.parse::<u64>()
            .map_err(|_| format!("{name} is not a number: {f:?}"))
    };
    let utime = next("utime")?;
    let stime = next("stime")?;
    Ok(StatTimes { utime, stime })
}

/// Memory figures of `/proc/<pid>/status`, in kB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatusMem {
    rss_kb: u64,
    hwm_kb: u64,
}

/// Parse `VmRSS` and `VmHWM` out of `/proc/<pid>/status`. `Ok(None)` when both are
/// absent (no address space); an error when only one is, or when one is malformed
/// or repeated.
fn parse_status(text: &[u8]) -> Result<Option<StatusMem>, String> {
    let mut rss = None;
    let mut hwm = None;
    for line in text.split(|&b| b == b'\n') {
        let (slot, name, value) = if let Some(v) = line.strip_prefix(b"VmRSS:") {
            (&mut rss, "VmRSS", v)
        } else if let Some(v) = line.strip_prefix(b"VmHWM:") {
            (&mut hwm, "VmHWM", v)
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(format!("{name} appears twice"));
        }
        *slot = Some(parse_kb(name, value)?);
    }
    match (rss, hwm) {
        (Some(rss_kb), Some(hwm_kb)) => Ok(Some(StatusMem { rss_kb, hwm_kb })),
        (None, None) => Ok(None),
        (None, Some(_)) => Err("VmHWM without VmRSS".to_string()),
        (Some(_), None) => Err("VmRSS without VmHWM".to_string()),
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes: the memory the kernel can give
/// to new work without swapping (None when it cannot be read).
pub fn mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read("/proc/meminfo").ok()?)
}

fn parse_mem_available(text: &[u8]) -> Option<u64> {
    text.split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"MemAvailable:"))
        .and_then(|v| parse_kb("MemAvailable", v).ok())
        .and_then(|kb| kb.checked_mul(1024))
}

/// Parse the value of a status line such as `"\t  1234 kB"`.
fn parse_kb(name: &str, value: &[u8]) -> Result<u64, String> {
    let value = std::str::from_utf8(value).map_err(|_| format!("{name} value is not UTF-8"))?;
    let mut parts = value.split_ascii_whitespace();
    let (Some(n), Some("kB"), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{name} is not \"<number> kB\": {:?}", value.trim()));
    };
    n.parse::<u64>()
        .map_err(|_| format!("{name} is not a number: {n:?}"))
}

/// `AT_CLKTCK`: the auxiliary vector entry holding the clock tick rate.
const AT_CLKTCK: usize = 17;
/// `AT_NULL`: ends the auxiliary vector.
const AT_NULL: usize = 0;

/// Clock ticks per second (`USER_HZ`), read once from `/proc/self/auxv`.
fn clock_ticks() -> Result<u64, ProcStatError> {
    static TICKS: OnceLock<Result<u64, String>> = OnceLock::new();
    TICKS
        .get_or_init(|| {
            let auxv = std::fs::read("/proc/self/auxv").map_err(|e| e.to_string())?;
            parse_auxv_clktck(&auxv)
        })
        .clone()
        .map_err(|detail| ProcStatError::ClockTicks { detail })
}

/// Find `AT_CLKTCK` in a native-endian auxiliary vector (pairs of machine words).
fn parse_auxv_clktck(auxv: &[u8]) -> Result<u64, String> {
    const W: usize = size_of::<usize>();
    let word = |b: &[u8]| -> usize {
        let mut a = [0u8; W];
        a.copy_from_slice(b);
        usize::from_ne_bytes(a)
    };
    for pair in auxv.chunks(2 * W) {
        if pair.len() != 2 * W {
            return Err(format!("truncated entry ({} bytes)", pair.len()));
        }
        let (key, value) = (word(&pair[..W]), word(&pair[W..]));
        match key {
            AT_NULL => break,
            AT_CLKTCK if value == 0 => return Err("AT_CLKTCK is 0".to_string()),
            AT_CLKTCK => return Ok(value as u64),
            _ => {}
        }
    }
    Err("no AT_CLKTCK entry".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stat line as Linux prints it, with `comm` and the two times filled in.
    fn stat_line(comm: &str, utime: u64, stime: u64) -> String {
        format!(
            "4242 ({comm}) S 1 4242 4242 0 -1 4194560 1234 0 5 0 {utime} {stime} 0 0 20 0 3 0 \
             123456 10000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
        )
    }

    #[test]
    fn mem_available_is_read_in_bytes_and_refuses_garbage() {
        let text = b"MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available(b"MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available(b"MemAvailable: lots\n"), None);
        assert_eq!(
            parse_mem_available(b"MemAvailable: 99999999999999999999 kB\n"),
            None
        );
        assert_eq!(
            parse_mem_available(b"MemAvailable: 18014398509481984 kB\n"),
            None
        );
        assert!(mem_available().is_some_and(|b| b > 0));
    }

    #[test]
    fn stat_parser_reads_utime_and_stime() {
        let t = parse_stat(stat_line("tidemark", 250, 30).as_bytes()).unwrap();
        assert_eq!(
            t,
            StatTimes {
                utime: 250,
                stime: 30
            }
        );
    }

    #[test]
    fn stat_parser_splits_after_the_last_parenthesis() {
        for comm in [
            "a) b (c",
            ") 1 2 3 4 5 6 7 8 9 10 11 12 13 (",
            "x y",
            "((",
            "))",
        ] {
            let t = parse_stat(stat_line(comm, 7, 9).as_bytes()).unwrap();
            assert_eq!(t, StatTimes { utime: 7, stime: 9 }, "comm {comm:?}");
        }
    }

    #[test]
    fn stat_parser_accepts_a_non_utf8_command_name() {
        let mut line = b"17 (\xff\xfe) ".to_vec();
        line.extend_from_slice(b"R 1 1 1 0 -1 0 0 0 0 0 11 12 0 0\n");
        assert_eq!(
            parse_stat(&line).unwrap(),
            StatTimes {
                utime: 11,
                stime: 12
            }
        );
    }

    #[test]
    fn stat_parser_refuses_malformed_lines() {
        let cases: [&[u8]; 7] = [
            b"",
            b"4242 tidemark S 1 2 3",
            b"4242 (tidemark S 1 2 3 4 5 6 7 8 9 10 11 12",
            b"4242 )tidemark( S 1 1 1 0 -1 0 0 0 0 0 11 12",
            b"4242 (t) S 1 1 1 0 -1 0 0 0 0 0 11",
            b"4242 (t) S 1 1 1 0 -1 0 0 0 0 0 11 -12",
            b"4242 (t) S 1 1 1 0 -1 0 0 0 0 0 1.5 12",
        ];
        for c in cases {
            assert!(parse_stat(c).is_err(), "{:?}", String::from_utf8_lossy(c));
        }
    }

    const STATUS: &str = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        VmPeak:\t    8000 kB\nVmSize:\t    7000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1536 kB\n\
        RssAnon:\t     100 kB\nThreads:\t1\n";

    #[test]
    fn status_parser_reads_rss_and_peak() {
        assert_eq!(
            parse_status(STATUS.as_bytes()).unwrap(),
            Some(StatusMem {
                rss_kb: 1536,
                hwm_kb: 2048
            })
        );
    }

    #[test]
    fn status_without_memory_lines_means_no_address_space() {
        let zombie = "Name:\tsh\nState:\tZ (zombie)\nTgid:\t99\nThreads:\t1\n";
        assert_eq!(parse_status(zombie.as_bytes()).unwrap(), None);
    }

    #[test]
    fn status_parser_refuses_malformed_memory_lines() {
        let cases = [
            "VmRSS:\t1536 kB\n",
            "VmHWM:\t1536 kB\n",
            "VmRSS:\t1536 MB\nVmHWM:\t2048 kB\n",
            "VmRSS:\t\nVmHWM:\t2048 kB\n",
            "VmRSS:\tlots kB\nVmHWM:\t2048 kB\n",
            "VmRSS:\t1 kB extra\nVmHWM:\t2048 kB\n",
            "VmRSS:\t1 kB\nVmRSS:\t1 kB\nVmHWM:\t2048 kB\n",
            "VmRSS:\t99999999999999999999999 kB\nVmHWM:\t2048 kB\n",
        ];
        for c in cases {
            assert!(parse_status(c.as_bytes()).is_err(), "{c:?}");
        }
    }

    fn auxv(pairs: &[(usize, usize)]) -> Vec<u8> {
        pairs
            .iter()
            .flat_map(|(k, v)| [k.to_ne_bytes(), v.to_ne_bytes()])
            .flatten()
            .collect()
    }

    #[test]
    fn auxv_parser_finds_the_tick_rate() {
        let v = auxv(&[(6, 4096), (AT_CLKTCK, 100), (AT_NULL, 0)]);
        assert_eq!(parse_auxv_clktck(&v).unwrap(), 100);
        let v = auxv(&[(AT_CLKTCK, 250)]);
        assert_eq!(parse_auxv_clktck(&v).unwrap(), 250);
    }

    #[test]
    fn auxv_parser_refuses_missing_zero_or_truncated_entries() {
        assert!(parse_auxv_clktck(&auxv(&[(6, 4096), (AT_NULL, 0)])).is_err());
        // An AT_CLKTCK after AT_NULL does not count.
        assert!(parse_auxv_clktck(&auxv(&[(AT_NULL, 0), (AT_CLKTCK, 100)])).is_err());
        assert!(parse_auxv_clktck(&auxv(&[(AT_CLKTCK, 0)])).is_err());
        let mut v = auxv(&[(6, 4096), (AT_CLKTCK, 100)]);
        v.truncate(v.len() - 1);
        assert!(parse_auxv_clktck(&v).is_err());
        assert!(parse_auxv_clktck(&[]).is_err());
    }

    #[test]
    fn this_system_reports_a_tick_rate() {
        let t = clock_ticks().unwrap();
        assert!(t > 0);
    }

    #[test]
    fn self_usage_is_sane_and_cpu_grows_with_work() {
        let before = read_self().unwrap();
        assert!(before.rss_bytes > 0);
        assert!(before.peak_rss_bytes >= before.rss_bytes);
        assert!(before.cpu_seconds >= 0.0 && before.cpu_seconds.is_finite());
        // Spin until the kernel has charged at least one more tick. The bound on
        // iterations only keeps a broken clock from hanging the test.
        let mut x = 0u64;
        let mut after = before;
        for _ in 0..100_000 {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
            }
            after = read_self().unwrap();
            if after.cpu_seconds > before.cpu_seconds {
                break;
            }
        }
        std::hint::black_box(x);
        assert!(
            after.cpu_seconds > before.cpu_seconds,
            "{before:?} {after:?}"
        );
    }

    #[test]
    fn peak_rss_covers_a_large_touched_allocation() {
        let before = read_self().unwrap();
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        let during = read_self().unwrap();
        assert!(
            during.rss_bytes >= before.rss_bytes + (32 << 20),
            "{during:?}"
        );
        drop(big);
        let after = read_self().unwrap();
        // The kernel's RSS counters are approximate (per-CPU batches), so compare
        // with a margin rather than with `during` exactly.
        assert!(
            after.peak_rss_bytes >= before.rss_bytes + (32 << 20),
            "{before:?} {during:?} {after:?}"
        );
    }

    #[test]
    fn a_child_process_can_be_read() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let usage = read(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        let usage = usage.unwrap();
        assert!(usage.rss_bytes > 0);
        assert!(usage.peak_rss_bytes >= usage.rss_bytes);
        assert!(usage.cpu_seconds >= 0.0 && usage.cpu_seconds.is_finite());
        // Reaped: gone.
        assert!(matches!(
            read(child.id()),
            Err(ProcStatError::NoSuchProcess { .. })
        ));
    }

    #[test]
    fn a_nonexistent_pid_is_an_error() {
        // Above any possible pid_max (at most 2^22).
        let err = read(u32::MAX).unwrap_err();
        assert!(
            matches!(err, ProcStatError::NoSuchProcess { pid } if pid == u32::MAX),
            "{err}"
        );
        assert!(err.to_string().contains(&u32::MAX.to_string()));
    }

    #[test]
    fn cores_is_at_least_one() {
        assert!(cores() >= 1);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_stat(&bytes);
            let _ = parse_status(&bytes);
            let _ = parse_auxv_clktck(&bytes);
        }

        #[test]
        fn stat_parser_never_panics_on_stat_like_text(
            comm in "[ -~]{0,20}",
            tail in "[ 0-9a-zA-Z()-]{0,120}",
        ) {
            let line = format!("1 ({comm}) {tail}");
            let _ = parse_stat(line.as_bytes());
        }

        #[test]
        fn status_parser_never_panics_on_status_like_text(
            lines in proptest::collection::vec(
                ("(VmRSS|VmHWM|Name|VmPeak):", "[ \t0-9kBM]{0,16}"),
                0..8,
            ),
        ) {
            let text: String = lines.iter().map(|(k, v)| format!("{k}{v}\n")).collect();
            let _ = parse_status(text.as_bytes());
        }

        #[test]
        fn stat_parser_reads_any_comm(comm in "[ -~]{0,16}", u in any::<u64>(), s in any::<u64>()) {
            let t = parse_stat(stat_line(&comm, u, s).as_bytes()).unwrap();
            prop_assert_eq!(t, StatTimes { utime: u, stime: s });
        }
    }
}
