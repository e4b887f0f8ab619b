//! Reader threads that read the next resync or verify steps of a protected
//! disk while the caller hashes the current one.
//!
//! Checksum resync and verify read a disk in steps of [`COPY_CHUNK`], each
//! read with direct I/O and then hashed; on one thread, the disk waits while
//! the CPU hashes and the CPU waits while the disk reads. With a
//! [`StepReader`], the caller [`take`](StepReader::take)s a [`StepBuf`] for
//! each step in its turn and [`ask`](StepReader::ask)s for the steps after
//! it, which [`READ_DEPTH`] threads read meanwhile. What was read ahead is
//! used only when it is the same step and no write touched its range since
//! (the range's write stamp, see `stripes`); otherwise the step reads again
//! under its range locks, as without read-ahead.
//!
//! Why two reads in flight and not one: measured on the development VM
//! (BENCHMARKS.md, "Resync"), one read ahead hid almost none of the hashing
//! (the disk sat idle between a read's completion and the reader's next
//! request while the other thread hashed); two reached the speed of reading
//! alone.
//!
//! [`COPY_CHUNK`]: super::protected::COPY_CHUNK

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::protected::{ProtectedDisk, StepBuf};

/// Steps read ahead at most (and reader threads).
pub const READ_DEPTH: usize = 2;

/// Which step: disk, offset, end, block size.
type StepKey = (u16, u64, u64, u64);

/// One read for a thread.
struct Job {
    disk: Arc<ProtectedDisk>,
    key: StepKey,
    buf: StepBuf,
}

/// Threads reading up to [`READ_DEPTH`] steps ahead. Dropping it ends them.
pub struct StepReader {
    jobs: Option<Sender<Job>>,
    done: Receiver<(StepKey, StepBuf)>,
    /// Steps asked for, oldest first, not yet taken.
    in_flight: VecDeque<StepKey>,
    /// Steps read that came back before the step the caller waited for.
    arrived: Vec<(StepKey, StepBuf)>,
    spare: Vec<StepBuf>,
    threads: Vec<JoinHandle<()>>,
    /// Steps asked for ahead, and how many of them a step used.
    asked: u64,
    used: u64,
}

impl StepReader {
    /// Start the threads (named `name`). Without threads (the OS refused
    /// them), every step simply reads in its turn.
    pub fn new(name: &str) -> StepReader {
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(READ_DEPTH);
        // Never more results than steps in flight: a thread never blocks on it.
        let (done_tx, done_rx) = crossbeam_channel::bounded(READ_DEPTH);
        let mut threads = Vec::new();
        for i in 0..READ_DEPTH {
            let (jobs, done) = (jobs_rx.clone(), done_tx.clone());
            let t = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    while let Ok(mut job) = jobs.recv() {
                        let (_, offset, end, block_size) = job.key;
                        job.disk.read_ahead(offset, end, block_size, &mut job.buf);
                        drop(job.disk);
                        if done.send((job.key, job.buf)).is_err() {
                            return;
                        }
                    }
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!("read-ahead thread {i} not started ({e})");
                    break;
                }
            }
        }
        StepReader {
            jobs: (!threads.is_empty()).then_some(jobs_tx),
            done: done_rx,
            in_flight: VecDeque::new(),
            arrived: Vec::new(),
            spare: Vec::new(),
            threads,
            asked: 0,
            used: 0,
        }
    }

    /// Start reading the step `offset..end` of `disk` (block size
    /// `block_size`), unless it is in flight already or [`READ_DEPTH`]
    /// steps are.
    pub fn ask(&mut self, disk: &Arc<ProtectedDisk>, offset: u64, end: u64, block_size: u64) {
        let key = (disk.id(), offset, end, block_size);
        if self.in_flight.contains(&key) || self.in_flight.len() >= self.threads.len() {
            return;
        }
        let Some(jobs) = &self.jobs else { return };
        let buf = self.spare.pop().unwrap_or_default();
        let job = Job {
            disk: Arc::clone(disk),
            key,
            buf,
        };
        if jobs.send(job).is_ok() {
            self.in_flight.push_back(key);
            self.asked += 1;
        }
    }

    /// The buffer for the step `offset..end` of disk `disk`: the one read
    /// ahead when that step was asked for, else a spare one (which the step
    /// fills in its turn). Steps asked for before it are dropped; when it was
    /// not asked for at all, every step in flight is (the caller went
    /// elsewhere). Give it back with [`give_back`](Self::give_back) after the
    /// step.
    pub fn take(&mut self, disk: u16, offset: u64, end: u64, block_size: u64) -> StepBuf {
        let key = (disk, offset, end, block_size);
        let drop_up_to = match self.in_flight.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => self.in_flight.len(),
        };
        let mut wanted = None;
        for k in self.in_flight.drain(..drop_up_to).collect::<Vec<_>>() {
            let b = self.collect(k);
            if k == key {
                wanted = Some(b);
            } else {
                self.give_back(b);
            }
        }
        wanted.unwrap_or_else(|| self.spare.pop().unwrap_or_default())
    }

    /// Return a step's buffer for reuse.
    pub fn give_back(&mut self, buf: StepBuf) {
        if buf.used_read_ahead() {
            self.used += 1;
        }
        if self.spare.len() <= READ_DEPTH {
            self.spare.push(buf);
        }
    }

    /// Steps read ahead, and how many of them were used (the others were
    /// read again: a write touched them, or the caller went elsewhere).
    pub fn counts(&self) -> (u64, u64) {
        (self.asked, self.used)
    }

    /// Wait for the read of step `key` (no longer in `in_flight`), keeping
    /// the others that arrive first.
    fn collect(&mut self, key: StepKey) -> StepBuf {
        if let Some(i) = self.arrived.iter().position(|(k, _)| *k == key) {
            return self.arrived.swap_remove(i).1;
        }
        // Every job sent is answered; the threads end only when the job
        // channel closes, in drop.
        while let Ok((k, b)) = self.done.recv() {
            if k == key {
                return b;
            }
            self.arrived.push((k, b));
        }
        StepBuf::default()
    }
}

impl Drop for StepReader {
    fn drop(&mut self) {
        // Threads finish the read in hand (their results fit the channel)
        // and see the closed job channel.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
