//! The capture workers of a group: the drainer, which copies dirty regions from
//! the backing disks into the journal as M entries while the group is in drain
//! mode; the keeper, which ticks the mode machine; and the roller, which rolls
//! the disks' dirty logs over. Plain threads (blocking disk I/O), stopped by a
//! flag. The keeper does no I/O, so a slow disk (a dirty-log fsync taking
//! seconds) never delays a mode decision such as pausing a drain when the
//! relay is gone.

use std::sync::atomic::{AtomicBool, Ordering as AO};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::dirtylog::ROLLOVER;
use super::journal::CaptureJournal;
use super::modes::Mode;
use super::protected::{COPY_CHUNK, ProtectedDisk};

/// Longest pending run the drainer takes at once (it copies it in steps).
pub const RUN_MAX: u64 = 256 << 20;
/// Pause after a failed copy before that region is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often the keeper ticks the mode machine.
pub const TICK: Duration = Duration::from_millis(100);

/// Where the workers report errors (besides their log lines).
pub type ErrorSink = Box<dyn Fn(String) + Send + Sync>;

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
    /// `on_error` hears every error a worker hits (for the status).
    pub fn start(
        journal: Arc<CaptureJournal>,
        disks: Vec<Arc<ProtectedDisk>>,
        rollover: Duration,
        nice: i32,
        on_error: ErrorSink,
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
                    drain_loop(&j, &d, &s, &e)
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
                .spawn(move || roller_loop(&journal, &disks, &s, &e, rollover))?
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
    stop: &AtomicBool,
    error: &ErrorSlot,
) {
    let mut cursors = vec![0u64; disks.len()];
    let mut retry_at: Vec<Option<Instant>> = vec![None; disks.len()];
    let mut buf = Vec::with_capacity(COPY_CHUNK);
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
            let Some((off, len)) = run else { continue };
            any_pending = true;
            if retry_at[i].is_some_and(|t| Instant::now() < t) {
                continue;
            }
            if !journal.wait_copy_room(COPY_CHUNK, Duration::from_millis(100)) {
                continue;
            }
            match disk.copy_step(off, off + len, &mut buf) {
                Ok(Some(next)) => {
                    cursors[i] = next;
                    retry_at[i] = None;
                    progressed = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(
                        group = journal.group(),
                        disk = disk.id(),
                        "copy failed, retrying in {RETRY_AFTER:?}: {e}"
                    );
                    set_error(error, e.to_string());
                    // Skip past this run for now; it stays pending.
                    cursors[i] = off + len;
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
) {
    let mut next_roll = Instant::now() + rollover;
    while !stop.load(AO::Relaxed) {
        std::thread::sleep(TICK);
        if Instant::now() < next_roll {
            continue;
        }
        next_roll = Instant::now() + rollover;
        for d in disks {
            if let Err(e) = d.rollover() {
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
