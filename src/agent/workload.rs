//! The synthetic writer: a seeded workload that writes through the same disk
//! write path a frontend uses ([`ProtectedDisk::write`]: write intent, backing
//! disk, then capture). `tidemark bench` and the integration tests drive the pipeline
//! with it; it stands where the protected machine's applications stand.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// One write after the other, wrapping at the end of the disk.
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
    /// Bytes per write (> 0, at most the disk size).
    pub write_size: usize,
    /// Random or sequential.
    pub pattern: Pattern,
    /// Share of each 4 KiB block that compresses away, 0..=100.
    pub compressibility: u8,
    /// Seed of the data and offsets: the same seed writes the same bytes.
    pub seed: u64,
    /// Bytes per second at most (0: as fast as the write path allows).
    pub rate_bytes_per_sec: u64,
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
    /// True once the workload has ended and capture holds all of it (its
    /// caller sets this, after the dirty regions are copied).
    pub done: bool,
    /// Why it ended early, if it did.
    pub error: Option<String>,
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
    /// The spec does not fit the disk.
    #[error("workload: {0}")]
    Spec(String),
    /// A write failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Run `spec` against `disk` until a limit is reached or `stop` is set.
/// `progress` is updated after every write; the final report is returned (not
/// yet `done`: the caller decides when capture holds all of it).
pub fn run(
    disk: &ProtectedDisk,
    spec: &WorkloadSpec,
    stop: &AtomicBool,
    progress: &Mutex<WorkloadReport>,
) -> Result<WorkloadReport, WorkloadError> {
    let ws = spec.write_size as u64;
    if ws == 0 || ws > disk.size() {
        return Err(WorkloadError::Spec(format!(
            "write size {ws} must be between 1 and the disk size {}",
            disk.size()
        )));
    }
    let slots = disk.size() / ws;
    let mut rng = Prng::new(spec.seed);
    let mut report = WorkloadReport {
        start_us: crate::util::time::now_us(),
        ..WorkloadReport::default()
    };
    let start = Instant::now();
    let deadline = (spec.seconds > 0.0).then(|| start + Duration::from_secs_f64(spec.seconds));
    let mut next_slot = 0u64;
    let result = loop {
        if stop.load(Ordering::Relaxed)
            || deadline.is_some_and(|d| Instant::now() >= d)
            || (spec.bytes > 0 && report.bytes >= spec.bytes)
        {
            break Ok(());
        }
        if spec.rate_bytes_per_sec > 0 {
            // Pace to the rate: the write of byte N happens no earlier than N / rate.
            let due = Duration::from_secs_f64(report.bytes as f64 / spec.rate_bytes_per_sec as f64);
            let elapsed = start.elapsed();
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(50)));
                continue;
            }
        }
        let len = if spec.bytes > 0 {
            ws.min(spec.bytes - report.bytes) as usize
        } else {
            ws as usize
        };
        let slot = match spec.pattern {
            Pattern::Random => rng.below(slots),
            Pattern::Sequential => {
                let s = next_slot;
                next_slot = (next_slot + 1) % slots;
                s
            }
        };
        let data = datagen::generate(len, spec.compressibility, &mut rng);
        match disk.write(slot * ws, data, false) {
            Ok(r) => {
                match r {
                    Recorded::Seq(seq) => {
                        if report.first_seq == 0 {
                            report.first_seq = seq;
                        }
                        report.last_seq = seq;
                    }
                    Recorded::Dirty => report.dirty_writes += 1,
                }
                report.writes += 1;
                report.bytes += len as u64;
                report.seconds = start.elapsed().as_secs_f64();
                *progress.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
            }
            Err(e) => break Err(e),
        }
    };
    report.seconds = start.elapsed().as_secs_f64();
    if let Err(e) = &result {
        report.error = Some(e.to_string());
    }
    *progress.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
    result.map(|()| report).map_err(WorkloadError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::journal::{CaptureJournal, Change};
    use std::sync::Arc;

    fn disk(size: u64) -> (tempfile::TempDir, Arc<CaptureJournal>, ProtectedDisk) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src.img");
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        let j = Arc::new(CaptureJournal::in_memory(
            64 << 20,
            1,
            Box::new(|f| Ok(f + 1000)),
        ));
        let (disk, _) =
            ProtectedDisk::open(0, &p, j.clone(), &d.path().join("state"), false).unwrap();
        (d, j, disk)
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
        }
    }

    #[test]
    fn byte_limit_and_seq_range_and_journal_agree() {
        let (_d, j, disk) = disk(1 << 20);
        let p = Mutex::new(WorkloadReport::default());
        let r = run(
            &disk,
            &spec(Pattern::Random, 10_000),
            &AtomicBool::new(false),
            &p,
        )
        .unwrap();
        assert_eq!(r.bytes, 10_000);
        assert_eq!(r.writes, 3);
        assert_eq!((r.first_seq, r.last_seq), (1, 3));
        assert!(!r.done, "the caller marks it done");
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
        let (_d1, j1, d1) = disk(16384);
        let (_d2, j2, d2) = disk(16384);
        let p = Mutex::new(WorkloadReport::default());
        let stop = AtomicBool::new(false);
        run(&d1, &spec(Pattern::Sequential, 6 * 4096), &stop, &p).unwrap();
        run(&d2, &spec(Pattern::Sequential, 6 * 4096), &stop, &p).unwrap();
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
        let (_d, _j, disk) = disk(1 << 20);
        let p = Mutex::new(WorkloadReport::default());
        let r = run(&disk, &spec(Pattern::Random, 0), &AtomicBool::new(true), &p).unwrap();
        assert_eq!(r.writes, 0);
        let mut s = spec(Pattern::Random, 1);
        s.write_size = 2 << 20;
        let e = run(&disk, &s, &AtomicBool::new(false), &p).unwrap_err();
        assert!(e.to_string().contains("write size"), "{e}");
    }
}
