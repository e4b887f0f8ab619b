//! The synthetic writer: a seeded workload that writes through the same disk
//! write path a frontend uses ([`ProtectedDisk::write`]: write intent, backing
//! disk, then capture). `tidemark bench` and the integration tests drive the pipeline
//! with it; it stands where the protected machine's applications stand.
//!
//! Every write is a pure function of the spec's seed and the write's ordinal
//! (its *index*, 0-based): [`write_target`] gives its disk, offset and length,
//! [`write_data`] its bytes. With the workload log (`--workload-log`), which
//! names the seq each acknowledged write got, a test can rebuild the source
//! disks as they were at any seq without reading them.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::capture::journal::Recorded;
use crate::capture::protected::ProtectedDisk;
use crate::frontend::{BlockIo, IoError};
use crate::util::datagen;
use crate::util::prng::Prng;

/// Where successive writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly random offsets aligned to the write size.
    Random,
    /// Write *i* goes to slot *i* modulo the disk's slots (one after the
    /// other, wrapping at the end of the disk).
    Sequential,
}

/// What to write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Stop after this long (0: no time limit).
    pub seconds: f64,
    /// Stop after this many bytes (0: no byte limit). With neither limit the
    /// workload runs until stopped.
    pub bytes: u64,
    /// Bytes per write (> 0, at most the smallest disk's size).
    pub write_size: usize,
    /// Random or sequential.
    pub pattern: Pattern,
    /// Share of each 4 KiB block that compresses away, 0..=100.
    pub compressibility: u8,
    /// Seed of the data and offsets: the same seed writes the same bytes.
    pub seed: u64,
    /// Bytes per second at most (0: as fast as the write path allows).
    pub rate_bytes_per_sec: u64,
    /// Record a tag named `auto-<n>` (n = 1, 2, …) every this many seconds
    /// (0: none).
    #[serde(default)]
    pub tag_every_secs: f64,
}

/// How far a workload got.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadReport {
    /// Writes acknowledged.
    pub writes: u64,
    /// Bytes acknowledged.
    pub bytes: u64,
    /// Seconds from the first write to the last acknowledgement.
    pub seconds: f64,
    /// When the workload started, µs since the Unix epoch (0 before).
    pub start_us: u64,
    /// Seq of the first write (0 before it).
    pub first_seq: u64,
    /// Seq of the last write acknowledged (0 before the first); once `done`,
    /// the last seq the replica must reach to equal the source (copies of
    /// regions the workload dirtied included).
    pub last_seq: u64,
    /// Writes kept as dirty regions instead of with their bytes (capture degraded).
    #[serde(default)]
    pub dirty_writes: u64,
    /// Tags recorded (`tag_every_secs`).
    #[serde(default)]
    pub tags: u64,
    /// Tags refused (capture not write-ordered at the time).
    #[serde(default)]
    pub tags_refused: u64,
    /// True once the workload has ended and capture holds all of it (its
    /// caller sets this, after the dirty regions are copied).
    pub done: bool,
    /// Why it ended early, if it did.
    pub error: Option<String>,
    /// CPU seconds of the thread that ran the workload: generating the data,
    /// writing it to the source disks and recording it in the capture journal
    /// (`tidemark bench` shows it beside the agent's total).
    #[serde(default)]
    pub cpu_seconds: f64,
}

impl WorkloadReport {
    /// MB/s (10^6 bytes per second) over the workload's duration.
    pub fn mb_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e6
        } else {
            0.0
        }
    }
}

/// Why a workload could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The spec does not fit the disks.
    #[error("workload: {0}")]
    Spec(String),
    /// A write failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The workload log could not be written.
    #[error("workload log {path}: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The seed of one write's generator: `stream` 0 for its target, 1 for its data.
fn write_seed(seed: u64, index: u64, stream: u64) -> u64 {
    seed ^ index.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (stream + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Where write number `index` (0-based) of `spec` goes, over the group's
/// disks given as `(disk id, size in bytes)` in the group's order: `(disk id,
/// byte offset, length)`. The disk is drawn from the write's own seeded
/// generator when there are several; the offset is a multiple of the write
/// size; the length is the write size, except for the last write under a
/// byte limit. `None` when the spec has no such write (past the byte limit)
/// or does not fit the disks.
pub fn write_target(
    spec: &WorkloadSpec,
    disks: &[(u16, u64)],
    index: u64,
) -> Option<(u16, u64, usize)> {
    let ws = spec.write_size as u64;
    if ws == 0 || disks.is_empty() || disks.iter().any(|&(_, size)| size < ws) {
        return None;
    }
    let len = if spec.bytes > 0 {
        let done = index.checked_mul(ws)?;
        if done >= spec.bytes {
            return None;
        }
        ws.min(spec.bytes - done)
    } else {
        ws
    };
    let mut rng = Prng::new(write_seed(spec.seed, index, 0));
    let (id, size) = if disks.len() > 1 {
        disks[rng.below(disks.len() as u64) as usize]
    } else {
        disks[0]
    };
    let slots = size / ws;
    let slot = match spec.pattern {
        Pattern::Random => rng.below(slots),
        Pattern::Sequential => index % slots,
    };
    Some((id, slot * ws, len as usize))
}

/// The bytes of write number `index` of `spec` (fill `buf`, of the length
/// [`write_target`] gives): `datagen::fill` at the spec's compressibility from
/// the write's own seeded generator.
pub fn write_data(spec: &WorkloadSpec, index: u64, buf: &mut [u8]) {
    let mut rng = Prng::new(write_seed(spec.seed, index, 1));
    datagen::fill(buf, spec.compressibility, &mut rng);
}

/// The same bytes as [`write_data`], in a new buffer of `len` bytes built by
/// appending (`datagen::generate`): the writer loop uses it, so no pass zeroes
/// memory that is overwritten at once.
pub fn write_bytes(spec: &WorkloadSpec, index: u64, len: usize) -> Vec<u8> {
    let mut rng = Prng::new(write_seed(spec.seed, index, 1));
    datagen::generate(len, spec.compressibility, &mut rng)
}

/// The workload log: one line per acknowledged write, `seq disk offset len
/// index` (seq `-` when capture kept only the write's region), and one per
/// recorded tag, `seq tag name`. Flushed at least every 100 ms, after each
/// tag and at the end.
struct Log {
    path: PathBuf,
    out: BufWriter<File>,
    flushed: Instant,
}

impl Log {
    fn open(path: &Path) -> Result<Log, WorkloadError> {
        let f = File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| WorkloadError::Log {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Log {
            path: path.to_path_buf(),
            out: BufWriter::new(f),
            flushed: Instant::now(),
        })
    }

    fn line(&mut self, args: std::fmt::Arguments<'_>, flush: bool) -> Result<(), WorkloadError> {
        let r = self.out.write_fmt(args).and_then(|()| {
            if flush || self.flushed.elapsed() >= Duration::from_millis(100) {
                self.flushed = Instant::now();
                self.out.flush()
            } else {
                Ok(())
            }
        });
        r.map_err(|source| WorkloadError::Log {
            path: self.path.clone(),
            source,
        })
    }
}

/// CPU time of the calling thread, seconds (0 when the clock cannot be read).
fn thread_cpu_seconds() -> f64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// Run `spec` against the group's `disks` until a limit is reached or `stop`
/// is set, appending to the workload log at `log` when given. `progress` is
/// updated after every write; the final report is returned (not yet `done`:
/// the caller decides when capture holds all of it).
pub fn run(
    disks: &[Arc<ProtectedDisk>],
    spec: &WorkloadSpec,
    log: Option<&Path>,
    stop: &AtomicBool,
    progress: &Mutex<WorkloadReport>,
) -> Result<WorkloadReport, WorkloadError> {
    let geometry: Vec<(u16, u64)> = disks.iter().map(|d| (d.id(), d.size())).collect();
    let ws = spec.write_size as u64;
    let smallest = geometry.iter().map(|g| g.1).min().unwrap_or(0);
    if ws == 0 || ws > smallest {
        return Err(WorkloadError::Spec(format!(
            "write size {ws} must be between 1 and the smallest disk's size {smallest}"
        )));
    }
    let mut log = log.map(Log::open).transpose()?;
    let mut report = WorkloadReport {
        start_us: crate::util::time::now_us(),
        ..WorkloadReport::default()
    };
    let start = Instant::now();
    let cpu_start = thread_cpu_seconds();
    let deadline = (spec.seconds > 0.0).then(|| start + Duration::from_secs_f64(spec.seconds));
    let tag_every =
        (spec.tag_every_secs > 0.0).then(|| Duration::from_secs_f64(spec.tag_every_secs));
    let mut next_tag = tag_every.map(|e| start + e);
    let mut index = 0u64;
    let result = loop {
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break Ok(());
        }
        if let (Some(at), Some(every)) = (next_tag, tag_every)
            && Instant::now() >= at
        {
            next_tag = Some(at + every);
            if let Err(e) = auto_tag(disks, &mut report, log.as_mut()) {
                break Err(e);
            }
        }
        let Some((id, offset, len)) = write_target(spec, &geometry, index) else {
            break Ok(()); // the byte limit is reached
        };
        if spec.rate_bytes_per_sec > 0 {
            // Pace to the rate: the write of byte N happens no earlier than N / rate.
            let due = Duration::from_secs_f64(report.bytes as f64 / spec.rate_bytes_per_sec as f64);
            let elapsed = start.elapsed();
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(50)));
                continue;
            }
        }
        let Some(disk) = disks.iter().find(|d| d.id() == id) else {
            break Err(WorkloadError::Spec(format!("no disk {id}")));
        };
        let data = write_bytes(spec, index, len);
        match disk.write(offset, data, false) {
            Ok(r) => {
                let seq = match r {
                    Recorded::Seq(seq) => {
                        if report.first_seq == 0 {
                            report.first_seq = seq;
                        }
                        report.last_seq = seq;
                        Some(seq)
                    }
                    Recorded::Dirty => {
                        report.dirty_writes += 1;
                        None
                    }
                };
                if let Some(l) = log.as_mut() {
                    let r = match seq {
                        Some(s) => l.line(format_args!("{s} {id} {offset} {len} {index}\n"), false),
                        None => l.line(format_args!("- {id} {offset} {len} {index}\n"), false),
                    };
                    if let Err(e) = r {
                        break Err(e);
                    }
                }
                index += 1;
                report.writes += 1;
                report.bytes += len as u64;
                report.seconds = start.elapsed().as_secs_f64();
                *progress.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
            }
            Err(e) => break Err(e.into()),
        }
    };
    let flushed = log
        .as_mut()
        .map_or(Ok(()), |l| l.line(format_args!(""), true));
    let result = result.and(flushed);
    report.seconds = start.elapsed().as_secs_f64();
    report.cpu_seconds = (thread_cpu_seconds() - cpu_start).max(0.0);
    if let Err(e) = &result {
        report.error = Some(e.to_string());
    }
    *progress.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
    result.map(|()| report)
}

/// Record the next `auto-<n>` tag in the disks' journal (between two writes
/// of this single writer).
fn auto_tag(
    disks: &[Arc<ProtectedDisk>],
    report: &mut WorkloadReport,
    log: Option<&mut Log>,
) -> Result<(), WorkloadError> {
    let Some(journal) = disks.first().map(|d| d.journal()) else {
        return Ok(());
    };
    let name = format!("auto-{}", report.tags + report.tags_refused + 1);
    match journal.record_tag(&name, 0) {
        Ok(seq) => {
            report.tags += 1;
            if let Some(l) = log {
                l.line(format_args!("{seq} tag {name}\n"), true)?;
            }
        }
        Err(e) => {
            report.tags_refused += 1;
            tracing::info!(tag = %name, "workload tag refused: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::journal::{CaptureJournal, Change};
    use std::collections::HashMap;

    /// A group of disks of `sizes` bytes on one journal.
    fn group(
        sizes: &[u64],
    ) -> (
        tempfile::TempDir,
        Arc<CaptureJournal>,
        Vec<Arc<ProtectedDisk>>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let j = Arc::new(CaptureJournal::in_memory(
            64 << 20,
            1,
            Box::new(|f| Ok(f + 1000)),
        ));
        let disks = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let p = d.path().join(format!("src{i}.img"));
                std::fs::File::create(&p).unwrap().set_len(size).unwrap();
                let (disk, _) =
                    ProtectedDisk::open(i as u16, &p, j.clone(), &d.path().join("state"), false)
                        .unwrap();
                Arc::new(disk)
            })
            .collect();
        (d, j, disks)
    }

    fn spec(pattern: Pattern, bytes: u64) -> WorkloadSpec {
        WorkloadSpec {
            seconds: 0.0,
            bytes,
            write_size: 4096,
            pattern,
            compressibility: 50,
            seed: 9,
            rate_bytes_per_sec: 0,
            tag_every_secs: 0.0,
        }
    }

    fn go(disks: &[Arc<ProtectedDisk>], s: &WorkloadSpec, log: Option<&Path>) -> WorkloadReport {
        let p = Mutex::new(WorkloadReport::default());
        run(disks, s, log, &AtomicBool::new(false), &p).unwrap()
    }

    #[test]
    fn byte_limit_and_seq_range_and_journal_agree() {
        let (_d, j, disks) = group(&[1 << 20]);
        let p = Mutex::new(WorkloadReport::default());
        let r = run(
            &disks,
            &spec(Pattern::Random, 10_000),
            None,
            &AtomicBool::new(false),
            &p,
        )
        .unwrap();
        assert_eq!(r.bytes, 10_000);
        assert_eq!(r.writes, 3);
        assert_eq!((r.first_seq, r.last_seq), (1, 3));
        assert!(!r.done, "the caller marks it done");
        // The writer thread's own CPU time: generating and writing 10,000 bytes
        // takes some, and far less than a second.
        assert!(
            r.cpu_seconds > 0.0 && r.cpu_seconds < 1.0,
            "{}",
            r.cpu_seconds
        );
        assert_eq!(*p.lock().unwrap(), r);
        let entries = j.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
        let lens: Vec<usize> = entries.iter().map(|e| e.payload_len()).collect();
        assert_eq!(lens, vec![4096, 4096, 1808]);
        for e in &entries {
            assert_eq!(e.offset % 4096, 0);
            assert!(matches!(e.change, Change::Write(_)));
        }
    }

    #[test]
    fn sequential_wraps_and_same_seed_writes_same_bytes() {
        let (_d1, j1, d1) = group(&[16384]);
        let (_d2, j2, d2) = group(&[16384]);
        go(&d1, &spec(Pattern::Sequential, 6 * 4096), None);
        go(&d2, &spec(Pattern::Sequential, 6 * 4096), None);
        let a = j1.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
        let b = j2.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
        let offs: Vec<u64> = a.iter().map(|e| e.offset).collect();
        assert_eq!(offs, vec![0, 4096, 8192, 12288, 0, 4096]);
        for (x, y) in a.iter().zip(&b) {
            match (&x.change, &y.change) {
                (Change::Write(p), Change::Write(q)) => assert_eq!(p, q),
                _ => panic!("writes expected"),
            }
        }
    }

    #[test]
    fn stop_flag_and_bad_spec() {
        let (_d, _j, disks) = group(&[1 << 20]);
        let p = Mutex::new(WorkloadReport::default());
        let r = run(
            &disks,
            &spec(Pattern::Random, 0),
            None,
            &AtomicBool::new(true),
            &p,
        )
        .unwrap();
        assert_eq!(r.writes, 0);
        let mut s = spec(Pattern::Random, 1);
        s.write_size = 2 << 20;
        let e = run(&disks, &s, None, &AtomicBool::new(false), &p).unwrap_err();
        assert!(e.to_string().contains("write size"), "{e}");
        assert_eq!(write_target(&s, &[(0, 1 << 20)], 0), None);
        assert_eq!(
            write_target(&spec(Pattern::Random, 8192), &[(0, 1 << 20)], 2),
            None
        );
    }

    /// Writes spread over every disk of the group, and the log plus
    /// write_target/write_data rebuild each disk exactly, at any seq.
    #[test]
    fn several_disks_and_the_log_rebuilds_the_source() {
        let sizes = [256 << 10, 128 << 10, 64 << 10];
        let (d, j, disks) = group(&sizes);
        let s = spec(Pattern::Random, 300 * 4096 + 100);
        let log = d.path().join("workload.log");
        let r = go(&disks, &s, Some(&log));
        assert_eq!(r.writes, 301);
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<Vec<u64>> = text
            .lines()
            .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
            .collect();
        assert_eq!(lines.len(), 301);
        let geometry: Vec<(u16, u64)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| (i as u16, s))
            .collect();
        let mut per_disk = HashMap::new();
        let mut images: Vec<Vec<u8>> = sizes.iter().map(|&s| vec![0u8; s as usize]).collect();
        let mut at_seq_100 = None;
        for (i, l) in lines.iter().enumerate() {
            let [seq, disk, offset, len, index] = l[..] else {
                panic!("{l:?}")
            };
            assert_eq!(index, i as u64);
            let (d2, o2, l2) = write_target(&s, &geometry, index).unwrap();
            assert_eq!((u64::from(d2), o2, l2 as u64), (disk, offset, len));
            let mut buf = vec![0u8; len as usize];
            write_data(&s, index, &mut buf);
            images[disk as usize][offset as usize..][..len as usize].copy_from_slice(&buf);
            *per_disk.entry(disk).or_insert(0) += 1;
            if seq == 100 {
                at_seq_100 = Some(images.clone());
            }
        }
        assert_eq!(per_disk.len(), 3, "every disk gets writes: {per_disk:?}");
        for (i, img) in images.iter().enumerate() {
            let got = std::fs::read(d.path().join(format!("src{i}.img"))).unwrap();
            assert!(got == *img, "disk {i} rebuilt from the log");
        }
        // The state at seq 100 is what the journal's first 100 entries make.
        let mut replay: Vec<Vec<u8>> = sizes.iter().map(|&s| vec![0u8; s as usize]).collect();
        for e in j.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO) {
            if e.seq > 100 {
                break;
            }
            if let Change::Write(data) = &e.change {
                replay[e.disk as usize][e.offset as usize..][..data.len()].copy_from_slice(data);
            }
        }
        assert!(at_seq_100.unwrap() == replay);
    }

    #[test]
    fn tags_every_interval_are_logged() {
        let (d, j, disks) = group(&[1 << 20]);
        let mut s = spec(Pattern::Random, 0);
        s.seconds = 0.35;
        s.rate_bytes_per_sec = 400_000;
        s.tag_every_secs = 0.1;
        let log = d.path().join("workload.log");
        let r = go(&disks, &s, Some(&log));
        assert!((2..=4).contains(&r.tags), "{r:?}");
        assert_eq!(r.tags_refused, 0);
        let text = std::fs::read_to_string(&log).unwrap();
        let tags: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let v: Vec<&str> = l.split(' ').collect();
                (v.len() == 3 && v[1] == "tag").then(|| (v[0].parse().unwrap(), v[2].to_string()))
            })
            .collect();
        assert_eq!(tags.len() as u64, r.tags);
        assert_eq!(tags[0].1, "auto-1");
        let journal_tags: Vec<(u64, String)> = j
            .take_batch(usize::MAX, Duration::ZERO, Duration::ZERO)
            .into_iter()
            .chain(
                std::iter::from_fn(|| {
                    let b = j.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
                    (!b.is_empty()).then_some(b)
                })
                .flatten(),
            )
            .filter_map(|e| match &e.change {
                Change::Tag { name, .. } => Some((e.seq, name.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(tags, journal_tags);
        // In bitmap mode the workload's tags are refused, not fatal.
        j.mark_pending(0, 0, 4096, crate::frame::NoteReason::BitmapCatchUp, "test");
        let r = go(&disks, &s, None);
        assert!(r.tags_refused >= 2 && r.tags == 0, "{r:?}");
    }
}
