//! Online verify and operator resync of a protected disk (`tidemark verify`,
//! `tidemark resync`), run by the agent on behalf of its control socket.
//!
//! Verify compares the digests of the source's blocks with the replica's
//! (asked from the target through the relay) and sends no data. Replication
//! goes on meanwhile, so a block written during the verify can differ only
//! because the target has not applied that write yet: a block is reported
//! only when it still differs after [`RECHECK_ROUNDS`] more compares, each
//! after a pause that lets the pipeline catch up. A block rewritten
//! continuously for the whole verify can therefore be reported; running the
//! verify again (or with `--repair`) settles it.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::status::GroupInfo;
use crate::capture::drain::{DIGEST_TIMEOUT, WINDOW_BLOCKS};
use crate::capture::protected::{COPY_CHUNK, ProtectedDisk};
use crate::capture::readahead::{READ_DEPTH, StepReader};
use crate::error::{Classify, ErrorKind};
use crate::frame::NoteReason;
use crate::frontend::BlockIo;
use crate::resync::{DigestClient, FetchError, PREFETCH_DEPTH, Prefetch, Purpose, diff};

/// Extra compares of the blocks that differed, before they are reported.
pub const RECHECK_ROUNDS: usize = 2;
/// Pause before each extra compare.
pub const RECHECK_PAUSE: Duration = Duration::from_secs(1);
/// Most mismatching ranges listed in a report (the totals count them all).
pub const MAX_LISTED: usize = 64;

/// Why a verify or resync could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The group copies without digests.
    #[error(
        "group {group} has resync = \"copy\": verify needs digests from the target (set resync = \"checksum\")"
    )]
    NoDigests {
        /// The group.
        group: String,
    },
    /// No such disk in the group.
    #[error("group {group} has no disk {disk} (disks: {known:?})")]
    UnknownDisk {
        /// The group.
        group: String,
        /// The disk asked for.
        disk: u16,
        /// The group's disks.
        known: Vec<u16>,
    },
    /// The range is empty or outside the disk.
    #[error("range {start}..{end} is not inside disk {disk} ({size} bytes)")]
    BadRange {
        /// Disk.
        disk: u16,
        /// Start asked for.
        start: u64,
        /// End asked for.
        end: u64,
        /// Disk size.
        size: u64,
    },
    /// Digests did not come.
    #[error("disk {disk}, blocks {first_block}..+{count}: {source}")]
    Fetch {
        /// Disk.
        disk: u16,
        /// First block of the request.
        first_block: u64,
        /// Blocks asked for.
        count: u32,
        /// Cause.
        source: FetchError,
    },
    /// A resync of the disk is still copying.
    #[error(
        "disk {disk} of group {group} is already being resynced ({pending_bytes} bytes left); wait for it to finish (`tidemark status`)"
    )]
    Busy {
        /// The group.
        group: String,
        /// The disk.
        disk: u16,
        /// Bytes still pending.
        pending_bytes: u64,
    },
    /// Reading the source failed.
    #[error("reading disk {disk}: {why}")]
    Read {
        /// Disk.
        disk: u16,
        /// Cause.
        why: String,
    },
}

impl Classify for VerifyError {
    fn kind(&self) -> ErrorKind {
        match self {
            VerifyError::NoDigests { .. }
            | VerifyError::UnknownDisk { .. }
            | VerifyError::BadRange { .. } => ErrorKind::Config,
            VerifyError::Busy { .. } => ErrorKind::Throttled,
            VerifyError::Fetch { source, .. } => source.kind(),
            VerifyError::Read { .. } => ErrorKind::Io,
        }
    }
}

/// What a verify found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyReport {
    /// The disk.
    pub disk: u16,
    /// Block size of the compare, bytes.
    pub block_size: u32,
    /// Bytes compared (the range, aligned out to whole blocks).
    pub compared_bytes: u64,
    /// Mismatching byte ranges `[start, end)`, at most [`MAX_LISTED`].
    pub mismatches: Vec<(u64, u64)>,
    /// Number of mismatching ranges in all.
    pub mismatch_ranges: u64,
    /// Bytes of all mismatching ranges.
    pub mismatch_bytes: u64,
    /// The mismatching ranges were marked for resync.
    pub repaired: bool,
}

fn find_disk(info: &GroupInfo, disk: u16) -> Result<&Arc<ProtectedDisk>, VerifyError> {
    info.disk_io
        .iter()
        .find(|d| d.id() == disk)
        .ok_or_else(|| VerifyError::UnknownDisk {
            group: info.name.clone(),
            disk,
            known: info.disk_io.iter().map(|d| d.id()).collect(),
        })
}

/// `tidemark resync`: mark all of `disk` for resync; with `full`, copy every
/// block without comparing. Returns the bytes marked.
pub(crate) fn start_resync(info: &GroupInfo, disk: u16, full: bool) -> Result<u64, VerifyError> {
    let d = find_disk(info, disk)?;
    let size = d.size();
    let pending_bytes = info
        .journal
        .stats()
        .disks
        .iter()
        .find(|s| s.id == disk)
        .map_or(0, |s| s.pending_bytes);
    if pending_bytes > 0 {
        return Err(VerifyError::Busy {
            group: info.name.clone(),
            disk,
            pending_bytes,
        });
    }
    if full {
        info.drain.copy_in_full(disk);
    }
    let why = if full {
        format!("operator asked for a full resync of disk {disk}: every block is sent")
    } else {
        format!(
            "operator asked for a resync of disk {disk}: blocks are compared, differing ones sent"
        )
    };
    tracing::info!(group = %info.name, disk, full, "{why}");
    info.journal
        .mark_pending(disk, 0, size, NoteReason::OperatorResync, &why);
    Ok(size)
}

/// `tidemark verify`: compare `range` (bytes; the whole disk when `None`) of
/// `disk` with the replica; with `repair`, mark what differs for resync.
pub(crate) fn verify(
    info: &GroupInfo,
    disk: u16,
    range: Option<(u64, u64)>,
    repair: bool,
) -> Result<VerifyReport, VerifyError> {
    let dc = info.drain.digests().ok_or_else(|| VerifyError::NoDigests {
        group: info.name.clone(),
    })?;
    let d = find_disk(info, disk)?;
    let size = d.size();
    let (start, end) = range.unwrap_or((0, size));
    if start >= end || end > size {
        return Err(VerifyError::BadRange {
            disk,
            start,
            end,
            size,
        });
    }
    let bs = u64::from(dc.block_size().bytes());
    let blocks = (start / bs)..end.div_ceil(bs);
    let compared_bytes = (blocks.end * bs).min(size) - blocks.start * bs;
    let mut differ = compare_runs(dc, d, std::slice::from_ref(&blocks))?;
    for _ in 0..RECHECK_ROUNDS {
        if differ.is_empty() {
            break;
        }
        std::thread::sleep(RECHECK_PAUSE);
        differ = compare_runs(dc, d, &differ)?;
    }
    let ranges: Vec<(u64, u64)> = differ
        .iter()
        .map(|r| (r.start * bs, (r.end * bs).min(size)))
        .collect();
    let mismatch_bytes = ranges.iter().map(|(a, b)| b - a).sum();
    if repair {
        for &(a, b) in &ranges {
            info.journal.mark_pending(
                disk,
                a,
                b - a,
                NoteReason::OperatorResync,
                &format!("verify found bytes {a}..{b} of disk {disk} differing from the replica"),
            );
        }
    }
    if !ranges.is_empty() {
        tracing::warn!(group = %info.name, disk, ranges = ranges.len(), bytes = mismatch_bytes, repair, "verify: the replica differs from the source");
    } else {
        tracing::info!(group = %info.name, disk, compared_bytes, "verify: the replica equals the source");
    }
    Ok(VerifyReport {
        disk,
        block_size: dc.block_size().bytes(),
        compared_bytes,
        mismatch_ranges: ranges.len() as u64,
        mismatch_bytes,
        mismatches: ranges.into_iter().take(MAX_LISTED).collect(),
        repaired: repair,
    })
}

/// Compare the blocks of `runs` (sorted) and return the runs that differ.
/// The target digests window N+1 while this thread hashes window N, and
/// reader threads read the steps after step N while this thread hashes it.
fn compare_runs(
    dc: &DigestClient,
    d: &Arc<ProtectedDisk>,
    runs: &[Range<u64>],
) -> Result<Vec<Range<u64>>, VerifyError> {
    let size = d.size();
    let bs = u64::from(dc.block_size().bytes());
    let windows: Vec<Range<u64>> = runs
        .iter()
        .flat_map(|r| {
            (r.start..r.end)
                .step_by(WINDOW_BLOCKS as usize)
                .map(move |b| b..(b + WINDOW_BLOCKS).min(r.end))
        })
        .collect();
    // Every step of every window, in order (blocks), for the reader.
    let step_blocks = (COPY_CHUNK as u64 / bs).max(1);
    let steps: Vec<Range<u64>> = windows
        .iter()
        .flat_map(|w| {
            (w.start..w.end)
                .step_by(step_blocks as usize)
                .map(move |b| b..(b + step_blocks).min(w.end))
        })
        .collect();
    let mut reader = StepReader::new(&format!("verify-read-{}", d.id()));
    for s in steps.iter().take(READ_DEPTH) {
        reader.ask(d, s.start * bs, s.end * bs, bs);
    }
    let mut next_step = 0usize;
    // Where the time goes, for the debug log.
    let (mut waited_digests, mut waited_reads, mut stepping) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let disk = (d.id(), size);
    let mut ahead = Prefetch::default();
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        let count = (w.end - w.start) as u32;
        let ticket = ahead.take(dc, disk, w.start, count, Purpose::Verify);
        for n in windows.iter().skip(i + 1).take(PREFETCH_DEPTH) {
            ahead.ask(dc, disk, n.start, (n.end - n.start) as u32, Purpose::Verify);
        }
        let t0 = Instant::now();
        let target = dc.wait(ticket, DIGEST_TIMEOUT);
        waited_digests += t0.elapsed();
        let target = match target {
            Ok(t) => t,
            Err(source) => {
                ahead.cancel(dc);
                return Err(VerifyError::Fetch {
                    disk: d.id(),
                    first_block: w.start,
                    count,
                    source,
                });
            }
        };
        let mut source = Vec::with_capacity(count as usize);
        while let Some(s) = steps.get(next_step).filter(|s| s.start < w.end) {
            let (a, e) = (s.start * bs, s.end * bs);
            let t0 = Instant::now();
            let mut buf = reader.take(d.id(), a, e, bs);
            waited_reads += t0.elapsed();
            for n in steps.iter().skip(next_step + 1).take(READ_DEPTH) {
                reader.ask(d, n.start * bs, n.end * bs, bs);
            }
            let t0 = Instant::now();
            let digests = d.digest_step(a, e, bs, dc.digest_key(), &mut buf);
            stepping += t0.elapsed();
            reader.give_back(buf);
            source.extend(digests.map_err(|e| VerifyError::Read {
                disk: d.id(),
                why: e.to_string(),
            })?);
            next_step += 1;
        }
        let runs = diff(w.start, &source, &target.digests).map_err(|e| VerifyError::Read {
            disk: d.id(),
            why: e.to_string(),
        })?;
        for r in runs {
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
    }
    let (asked, used) = reader.counts();
    tracing::debug!(
        disk = d.id(),
        asked,
        used,
        ?waited_digests,
        ?waited_reads,
        ?stepping,
        "verify: steps read ahead and used; time waiting for the target's digests, for reads, in steps"
    );
    Ok(out)
}

/// The last scheduled verify of a disk, for `tidemark status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledVerify {
    /// The disk.
    pub disk: u16,
    /// When it ended, µs since the Unix epoch.
    pub at_us: u64,
    /// What it found, or why it could not run.
    pub result: Result<VerifyReport, String>,
}

/// Run a verify of every disk of `info`'s group every `every`, until `stop`;
/// results go to `info.verifies` (and the log). The first one runs after one
/// interval.
pub(crate) fn schedule(
    info: Arc<GroupInfo>,
    every: Duration,
    repair: bool,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name(format!("verify-{}", info.name))
        .spawn(move || {
            let mut next = std::time::Instant::now() + every;
            while !stop.load(Ordering::Relaxed) {
                if std::time::Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                for d in &info.disk_io {
                    let id = d.id();
                    let result = verify(&info, id, None, repair).map_err(|e| {
                        tracing::warn!(group = %info.name, disk = id, "scheduled verify could not run: {e}");
                        e.to_string()
                    });
                    let v = ScheduledVerify {
                        disk: id,
                        at_us: crate::util::time::now_us(),
                        result,
                    };
                    let mut all = info.verifies.lock().unwrap_or_else(|p| p.into_inner());
                    all.retain(|x| x.disk != id);
                    all.push(v);
                }
                next = std::time::Instant::now() + every;
            }
        })
}
