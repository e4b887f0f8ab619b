//! The capture workers of a group: the drainer, which copies dirty regions from
//! the backing disks into the journal as M entries while the group is in drain
//! mode; the keeper, which ticks the mode machine; and the roller, which rolls
//! the disks' dirty logs over. Plain threads (blocking disk I/O), stopped by a
//! flag. The keeper does no I/O, so a slow disk (a dirty-log fsync taking
//! seconds) never delays a mode decision such as pausing a drain when the
//! relay is gone.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AO};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::dirtylog::{DirtyLogError, ROLLOVER};
use super::journal::CaptureJournal;
use super::modes::Mode;
use super::protected::{COPY_CHUNK, ProtectedDisk, ProtectedError};
use super::readahead::{READ_DEPTH, StepReader};
use crate::frontend::BlockIo;
use crate::resync::{DigestClient, PREFETCH_DEPTH, Prefetch, Purpose};
use crate::util::rate::TokenBucket;

/// Most blocks asked for in one digest request (64 MiB at 64 KiB blocks):
/// large enough that the round trip through the relay is small next to the
/// reading, small enough that the next window's digests are computed at the
/// target while this one is compared.
pub const WINDOW_BLOCKS: u64 = 1024;
/// How long the drainer waits for the target's digests before it tries again.
pub const DIGEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How the drainer copies dirty regions: by checksum, through the target's
/// digests (only differing blocks are sent), unless there is no digest client
/// (`resync = "copy"`) or an operator asked for a full copy of a disk.
#[derive(Debug, Default)]
pub struct DrainControl {
    digests: Option<Arc<DigestClient>>,
    full: Mutex<HashSet<u16>>,
    cap: Option<Mutex<TokenBucket>>,
    /// Time spent waiting for the bandwidth cap, µs.
    pub capped_us: AtomicU64,
    /// Bytes compared by checksum.
    pub compared_bytes: AtomicU64,
    /// Bytes of differing blocks sent after a compare.
    pub differing_bytes: AtomicU64,
    /// Bytes copied without a compare.
    pub copied_bytes: AtomicU64,
}

impl DrainControl {
    /// Copy by checksum through `digests` when given; send copied data at
    /// most at `max_bytes_per_s` (0: no cap).
    pub fn new(digests: Option<Arc<DigestClient>>, max_bytes_per_s: u64) -> DrainControl {
        DrainControl {
            digests,
            cap: (max_bytes_per_s > 0).then(|| {
                Mutex::new(TokenBucket::new(
                    max_bytes_per_s,
                    COPY_CHUNK as u64,
                    Instant::now(),
                ))
            }),
            ..DrainControl::default()
        }
    }

    /// Charge `bytes` of copied data to the bandwidth cap and wait as long
    /// as it says (giving up early when `stop` is set). New writes are never
    /// held up by the cap: it paces only the drainer.
    fn pace(&self, bytes: u64, stop: &AtomicBool) {
        let Some(cap) = &self.cap else { return };
        let wait = cap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .charge(bytes, Instant::now());
        if wait.is_zero() {
            return;
        }
        self.capped_us
            .fetch_add(wait.as_micros() as u64, AO::Relaxed);
        let until = Instant::now() + wait;
        while !stop.load(AO::Relaxed) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(100)));
        }
    }

    /// The digest client, if resync is by checksum.
    pub fn digests(&self) -> Option<&Arc<DigestClient>> {
        self.digests.as_ref()
    }

    /// Copy `disk`'s pending regions without comparing, until none is left.
    pub fn copy_in_full(&self, disk: u16) {
        self.full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(disk);
    }

    fn is_full(&self, disk: u16) -> bool {
        self.full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&disk)
    }

    fn full_done(&self, disk: u16) {
        self.full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&disk);
    }
}

/// Longest pending run the drainer takes at once (it copies it in steps).
pub const RUN_MAX: u64 = 256 << 20;
/// Pause after a failed copy before that region is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often the keeper ticks the mode machine.
pub const TICK: Duration = Duration::from_millis(100);

/// Where the workers report errors (besides their log lines).
pub type ErrorSink = Box<dyn Fn(String) + Send + Sync>;

/// Runs before each dirty-log snapshot is written (see
/// [`ProtectedDisk::rollover`]).
pub type Checkpoint = Box<dyn Fn() -> Result<(), DirtyLogError> + Send + Sync>;

/// The last error, and who else hears of it.
struct ErrorSlot {
    last: Mutex<Option<String>>,
    sink: ErrorSink,
}

/// Running capture workers; stopping joins them.
pub struct CaptureWorkers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    last_error: Arc<ErrorSlot>,
}

impl CaptureWorkers {
    /// Start the drainer and the keeper for `disks` (all of `journal`'s group),
    /// rolling the dirty logs over every `rollover` (zero: [`ROLLOVER`]), the
    /// drainer at `nice`;
    /// `on_error` hears every error a worker hits (for the status);
    /// `checkpoint` runs before every snapshot a rollover writes.
    pub fn start(
        journal: Arc<CaptureJournal>,
        disks: Vec<Arc<ProtectedDisk>>,
        control: Arc<DrainControl>,
        rollover: Duration,
        nice: i32,
        on_error: ErrorSink,
        checkpoint: Checkpoint,
    ) -> std::io::Result<CaptureWorkers> {
        let stop = Arc::new(AtomicBool::new(false));
        let last_error = Arc::new(ErrorSlot {
            last: Mutex::new(None),
            sink: on_error,
        });
        let rollover = if rollover.is_zero() {
            ROLLOVER
        } else {
            rollover
        };
        let group = journal.group().to_string();
        let drainer = {
            let (j, d, s, e) = (
                journal.clone(),
                disks.clone(),
                stop.clone(),
                last_error.clone(),
            );
            std::thread::Builder::new()
                .name(format!("drain-{group}"))
                .spawn(move || {
                    crate::util::priority::lower_this_thread(nice);
                    drain_loop(&j, &d, &control, &s, &e)
                })?
        };
        let keeper = {
            let (j, s) = (journal.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("keeper-{group}"))
                .spawn(move || keeper_loop(&j, &s))?
        };
        let roller = {
            let (s, e) = (stop.clone(), last_error.clone());
            std::thread::Builder::new()
                .name(format!("roller-{group}"))
                .spawn(move || roller_loop(&journal, &disks, &s, &e, rollover, &checkpoint))?
        };
        Ok(CaptureWorkers {
            stop,
            threads: vec![drainer, keeper, roller],
            last_error,
        })
    }

    /// The last error a worker hit (a copy read, a dirty-log write), if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stop the workers and wait for them.
    pub fn stop(self) {
        self.stop.store(true, AO::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn set_error(slot: &ErrorSlot, e: String) {
    (slot.sink)(e.clone());
    *slot.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
}

fn drain_loop(
    journal: &CaptureJournal,
    disks: &[Arc<ProtectedDisk>],
    control: &DrainControl,
    stop: &AtomicBool,
    error: &ErrorSlot,
) {
    let mut cursors = vec![0u64; disks.len()];
    let mut retry_at: Vec<Option<Instant>> = vec![None; disks.len()];
    let mut prefetch: Vec<Prefetch> = (0..disks.len()).map(|_| Prefetch::default()).collect();
    let mut buf = Vec::with_capacity(COPY_CHUNK);
    // Started at the first checksum resync step.
    let mut reader: Option<StepReader> = None;
    while !stop.load(AO::Relaxed) {
        if journal.mode() != Mode::Drain || journal.is_closed() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let mut progressed = false;
        let mut any_pending = false;
        for (i, disk) in disks.iter().enumerate() {
            if stop.load(AO::Relaxed) {
                return;
            }
            let run = journal
                .next_pending(disk.id(), cursors[i], RUN_MAX)
                .or_else(|| {
                    cursors[i] = 0;
                    journal.next_pending(disk.id(), 0, RUN_MAX)
                });
            let Some((off, len)) = run else {
                control.full_done(disk.id());
                continue;
            };
            any_pending = true;
            if retry_at[i].is_some_and(|t| Instant::now() < t) {
                continue;
            }
            if !journal.wait_copy_room(COPY_CHUNK, Duration::from_millis(100)) {
                continue;
            }
            let by_checksum = control.digests().filter(|_| !control.is_full(disk.id()));
            let step = match by_checksum {
                Some(dc) => resync_window(
                    journal,
                    disk,
                    dc,
                    control,
                    (off, len),
                    &mut prefetch[i],
                    reader.get_or_insert_with(|| {
                        StepReader::new(&format!("readahead-{}", journal.group()))
                    }),
                    stop,
                ),
                None => disk
                    .copy_step(off, off + len, &mut buf)
                    .inspect(|r| {
                        if let Some(next) = r {
                            let n = next.saturating_sub(off);
                            control.copied_bytes.fetch_add(n, AO::Relaxed);
                            control.pace(n, stop);
                        }
                    })
                    .map_err(CopyFailure::from),
            };
            match step {
                Ok(Some(next)) => {
                    cursors[i] = next;
                    retry_at[i] = None;
                    progressed = true;
                }
                Ok(None) => {}
                Err(f) => {
                    tracing::error!(
                        group = journal.group(),
                        disk = disk.id(),
                        "copy failed, retrying in {RETRY_AFTER:?}: {}",
                        f.error
                    );
                    set_error(error, f.error);
                    // Skip past the step that failed (a read of the source)
                    // or else the whole run, for now; it stays pending and is
                    // tried again on a later pass.
                    cursors[i] = f.resume_at.unwrap_or(off + len);
                    retry_at[i] = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
        if !any_pending {
            journal.finish_drain();
        } else if !progressed {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Why a copy step failed, and where the run can go on.
#[derive(Debug)]
struct CopyFailure {
    error: String,
    /// After a read error of the source: the end of the step that could not
    /// be read. Only that step stays pending; the rest of the run is copied
    /// now. `None`: skip the whole run (the target's digests did not come).
    resume_at: Option<u64>,
}

impl From<ProtectedError> for CopyFailure {
    fn from(e: ProtectedError) -> CopyFailure {
        let resume_at = match &e {
            ProtectedError::CopyRead { offset, len, .. } => Some(offset + *len as u64),
            _ => None,
        };
        CopyFailure {
            error: e.to_string(),
            resume_at,
        }
    }
}

/// The block window of a pending run starting at `off` (`len` bytes): whole
/// blocks, at most [`WINDOW_BLOCKS`], inside the disk.
fn window(off: u64, len: u64, bs: u64, size: u64) -> (u64, u64) {
    let blocks = size.div_ceil(bs);
    let b0 = off / bs;
    let b1 = (off + len).div_ceil(bs).min(blocks).min(b0 + WINDOW_BLOCKS);
    (b0, b1.max(b0))
}

/// Checksum resync of one window of the pending run at `off`: get the
/// target's digests (asked for ahead, while the previous window was
/// compared), ask for the next window's, then compare and copy the differing
/// blocks step by step, the next steps read by `reader` while one is
/// hashed. `Ok(Some(next))`: where the copy got to; `Ok(None)`: the group
/// stopped draining. A step that fails ends the window (the steps before it
/// are recorded); the failure says where to go on.
#[allow(clippy::too_many_arguments)]
fn resync_window(
    journal: &CaptureJournal,
    disk: &Arc<ProtectedDisk>,
    dc: &DigestClient,
    control: &DrainControl,
    (off, len): (u64, u64),
    prefetch: &mut Prefetch,
    reader: &mut StepReader,
    stop: &AtomicBool,
) -> Result<Option<u64>, CopyFailure> {
    let bs = u64::from(dc.block_size().bytes());
    let size = disk.size();
    let id = disk.id();
    let (b0, b1) = window(off, len, bs, size);
    if b1 == b0 {
        return Ok(Some(off + len));
    }
    let count = (b1 - b0) as u32;
    let ticket = prefetch.take(dc, (id, size), b0, count, Purpose::Resync);
    // The next windows' digests, asked for ahead; the first step of the next
    // window, read ahead while this window's last step is compared.
    let mut next_window_step = None;
    let mut from = b1;
    for k in 0..PREFETCH_DEPTH {
        let Some((noff, nlen)) = journal.next_pending(id, from * bs, WINDOW_BLOCKS * bs) else {
            break;
        };
        let (n0, n1) = window(noff, nlen, bs, size);
        if n0 < from || n1 <= n0 {
            break;
        }
        prefetch.ask(dc, (id, size), n0, (n1 - n0) as u32, Purpose::Resync);
        if k == 0 {
            let (s0, s1) = (n0 * bs, (n1 * bs).min(size));
            next_window_step = Some((s0, (s0 + COPY_CHUNK as u64).min(s1)));
        }
        from = n1;
    }
    let target = dc
        .wait_or_stop(ticket, DIGEST_TIMEOUT, stop)
        .map_err(|e| CopyFailure {
            error: format!("resync of disk {id}: {e}"),
            resume_at: None,
        })?;
    let end = (b1 * bs).min(size);
    let step_end = |at: u64| (at + COPY_CHUNK as u64).min(end);
    // The steps from `at` on, for the reader: this window's, then the first
    // of the next window.
    let upcoming = |mut at: u64| {
        let mut v = Vec::with_capacity(READ_DEPTH);
        while v.len() < READ_DEPTH && at < end {
            v.push((at, step_end(at)));
            at = step_end(at);
        }
        if v.len() < READ_DEPTH {
            v.extend(next_window_step);
        }
        v
    };
    let mut at = b0 * bs;
    for (a, e) in upcoming(at) {
        reader.ask(disk, a, e, bs);
    }
    while at < end {
        let this_end = step_end(at);
        if !journal.wait_copy_room(COPY_CHUNK, Duration::from_secs(5)) {
            // Still going: the caller comes back to the rest of the run.
            return Ok(Some(at));
        }
        let i0 = (at / bs - b0) as usize;
        let mut buf = reader.take(id, at, this_end, bs);
        for (a, e) in upcoming(this_end) {
            reader.ask(disk, a, e, bs);
        }
        let step = disk.compare_step(
            at,
            this_end,
            bs,
            &target.digests[i0..],
            dc.digest_key(),
            &mut buf,
        );
        reader.give_back(buf);
        let Some(step) = step.map_err(CopyFailure::from)? else {
            return Ok(None);
        };
        control.compared_bytes.fetch_add(step.compared, AO::Relaxed);
        control
            .differing_bytes
            .fetch_add(step.differing, AO::Relaxed);
        control.pace(step.differing, stop);
        at = step.next;
    }
    Ok(Some(end))
}

fn keeper_loop(journal: &CaptureJournal, stop: &AtomicBool) {
    while !stop.load(AO::Relaxed) {
        std::thread::sleep(TICK);
        journal.tick();
    }
}

fn roller_loop(
    journal: &CaptureJournal,
    disks: &[Arc<ProtectedDisk>],
    stop: &AtomicBool,
    error: &ErrorSlot,
    rollover: Duration,
    checkpoint: &Checkpoint,
) {
    let mut next_roll = Instant::now() + rollover;
    while !stop.load(AO::Relaxed) {
        std::thread::sleep(TICK);
        if Instant::now() < next_roll {
            continue;
        }
        next_roll = Instant::now() + rollover;
        for d in disks {
            if let Err(e) = d.rollover(checkpoint.as_ref()) {
                tracing::error!(
                    group = journal.group(),
                    disk = d.id(),
                    "dirty log rollover failed (the activity log keeps every extent meanwhile): {e}"
                );
                set_error(error, e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_blocks_inside_the_disk_and_at_most_the_window() {
        let bs = 64 << 10;
        // A pending run starting mid-block covers its first block.
        assert_eq!(window(100_000, 4096, bs, 1 << 30), (1, 2));
        // At most WINDOW_BLOCKS.
        assert_eq!(window(0, 1 << 30, bs, 1 << 30), (0, WINDOW_BLOCKS));
        // The short last block of a disk counts; nothing past the end.
        let size = 10 * bs + 512;
        assert_eq!(window(9 * bs, 10 * bs, bs, size), (9, 11));
        assert_eq!(window(20 * bs, bs, bs, size), (20, 20));
    }

    #[test]
    fn the_cap_paces_copies_and_no_cap_never_waits() {
        let stop = AtomicBool::new(false);
        let free = DrainControl::new(None, 0);
        free.pace(1 << 30, &stop);
        assert_eq!(free.capped_us.load(AO::Relaxed), 0);
        let capped = DrainControl::new(None, 64 << 20);
        capped.pace(COPY_CHUNK as u64, &stop); // the burst
        assert_eq!(capped.capped_us.load(AO::Relaxed), 0);
        // A stopping drainer does not sit out the wait.
        stop.store(true, AO::Relaxed);
        capped.pace(1 << 30, &stop);
        assert!(capped.capped_us.load(AO::Relaxed) > 10_000_000);
    }

    /// A source disk failing reads in the middle of a pending run (a FUSE
    /// file over a test double that fails one range with EIO), copied without
    /// a compare: only the copy step holding the range stays pending, the rest
    /// of the run is copied, the error names the disk's path and the offset.
    #[test]
    fn a_read_error_leaves_only_its_step_pending_and_the_rest_of_the_run_is_copied() {
        use crate::capture::journal::Policy;
        use crate::frontend::fuse::FuseOptions;
        use crate::frontend::fuse::testutil::{Fixture, TestDisk};
        let chunk = COPY_CHUNK as u64;
        let bad = 3 * chunk + 4096;
        let (fx, _double) = Fixture::new("disk", 8 * chunk, &FuseOptions::default(), |b| {
            let mut t = TestDisk::new(b);
            t.eio = Some(bad..bad + 4096);
            t
        });
        let j = CaptureJournal::for_tests("g1", 64 << 20, Policy::Degrade);
        let state = fx.dir.path().join("state");
        let (disk, _) = ProtectedDisk::open(0, &fx.file, j.clone(), &state, true).unwrap();
        j.set_link(true);
        assert_eq!(j.mode(), Mode::Drain);
        assert_eq!(j.stats().pending_bytes, 8 * chunk);
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink: ErrorSink = {
            let heard = heard.clone();
            Box::new(move |e| heard.lock().unwrap().push(e))
        };
        let control = Arc::new(DrainControl::new(None, 0));
        let w = CaptureWorkers::start(
            j.clone(),
            vec![Arc::new(disk)],
            control.clone(),
            Duration::ZERO,
            0,
            sink,
            Box::new(|| Ok(())),
        )
        .unwrap();
        let t0 = Instant::now();
        while j.stats().pending_bytes > chunk && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let last = w.last_error();
        w.stop();
        assert_eq!(
            j.next_pending(0, 0, u64::MAX),
            Some((3 * chunk, chunk)),
            "only the step holding the unreadable range stays pending"
        );
        assert_eq!(j.mode(), Mode::Drain);
        assert_eq!(control.copied_bytes.load(AO::Relaxed), 7 * chunk);
        let last = last.expect("the read error is reported");
        let path = fx.file.display().to_string();
        assert!(
            last.contains(&path) && last.contains(&format!("at offset {}", 3 * chunk)),
            "{last}"
        );
        assert!(heard.lock().unwrap().iter().all(|e| e == &last));
    }

    #[test]
    fn only_a_read_error_of_the_source_resumes_after_its_step() {
        let read = ProtectedError::CopyRead {
            path: "/dev/x".into(),
            offset: 8 << 20,
            len: COPY_CHUNK,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        let f = CopyFailure::from(read);
        assert_eq!(f.resume_at, Some((8 << 20) + COPY_CHUNK as u64));
        assert!(f.error.contains("/dev/x") && f.error.contains("at offset 8388608"));
        let other = CopyFailure::from(ProtectedError::Capture(
            crate::capture::journal::CaptureError::Closed,
        ));
        assert_eq!(other.resume_at, None);
    }
}
