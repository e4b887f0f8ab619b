//! The agent's frame pipeline: a batcher thread turns capture-journal entries
//! into frame jobs (size and time bounds, heartbeats when idle), a fixed pool of
//! seal threads compresses and encrypts them off the async runtime, and
//! [`Reorder`] hands the results back in chain order.
//!
//! The number of jobs between the batcher and the consumer is bounded by
//! permits: the batcher takes one per job, the consumer returns it when it takes
//! the sealed frame in order. So a slow relay stops the batcher, and the capture
//! budget is what fills up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AO};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::capture::journal::{CaptureJournal, Change, Entry, Ordering};
use crate::frame::{
    DataKey, FrameError, FrameKind, FrameMeta, GroupName, RecordRef, SealedFrame, Sealer,
};
use crate::target::gate::ChainPos;
use crate::util::time::now_us;

/// Reserves frame numbers durably: given the first number not yet covered,
/// returns the new exclusive bound.
pub type FrameReserver = Box<dyn FnMut(u64) -> std::io::Result<u64> + Send>;

/// Settings of one group's pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The group.
    pub group: GroupName,
    /// Key epoch of the data key.
    pub key_epoch: u32,
    /// zstd level.
    pub zstd_level: i32,
    /// Payload bytes per frame, at most.
    pub frame_max_bytes: usize,
    /// How long a pending write may wait for more to fill its frame.
    pub linger: Duration,
    /// Idle time after which an empty heartbeat frame is sent.
    pub heartbeat: Duration,
    /// Seal threads.
    pub workers: usize,
    /// Jobs between batcher and consumer, at most.
    pub max_jobs: usize,
    /// Nice value of the batch and seal threads (0: unchanged).
    pub nice: i32,
    /// The first frame starts a new stretch of the chain after frames the
    /// relay lost (REBASE): it is sealed as M whatever it holds.
    pub rebase: bool,
}

/// Why the pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The sealer refused the key or level.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A thread could not be spawned.
    #[error("cannot start pipeline thread: {0}")]
    Spawn(std::io::Error),
}

/// One job's result, tagged with its position in the chain.
pub struct SealOutput {
    /// Position of the job (0, 1, 2, …) in batcher order.
    pub index: u64,
    /// The sealed frame, or why sealing failed.
    pub result: Result<SealedFrame, FrameError>,
}

struct Job {
    index: u64,
    meta: FrameMeta,
    entries: Vec<Entry>,
}

/// Running pipeline threads; dropping it does not stop them, call [`Pipeline::stop`].
pub struct Pipeline {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    permits: Sender<()>,
}

impl Pipeline {
    /// Start the batcher and seal threads. Frames chain from `prev` and are
    /// numbered from `frame_next`; results go to `out` (unordered: use
    /// [`Reorder`]). The consumer must call [`Pipeline::release`] once per
    /// frame it takes in order.
    pub fn start(
        journal: Arc<CaptureJournal>,
        key: &DataKey,
        cfg: PipelineConfig,
        prev: ChainPos,
        frame_next: u64,
        mut reserve: FrameReserver,
        out: Sender<SealOutput>,
    ) -> Result<Pipeline, PipelineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = cfg.workers.max(1);
        let (job_tx, job_rx) = bounded::<Job>(workers);
        let (permit_tx, permit_rx) = bounded::<()>(cfg.max_jobs.max(1));
        for _ in 0..cfg.max_jobs.max(1) {
            let _ = permit_tx.send(());
        }
        let mut threads = Vec::new();
        for i in 0..workers {
            let mut sealer = Sealer::new(key, cfg.key_epoch, cfg.zstd_level)?;
            let rx: Receiver<Job> = job_rx.clone();
            let out = out.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("seal-{}-{i}", cfg.group))
                    .spawn(move || {
                        crate::util::priority::lower_this_thread(cfg.nice);
                        for job in rx {
                            let records: Vec<RecordRef<'_>> =
                                job.entries.iter().map(to_record).collect();
                            let result = sealer.seal(&job.meta, &records);
                            if out
                                .send(SealOutput {
                                    index: job.index,
                                    result,
                                })
                                .is_err()
                            {
                                break;
                            }
                        }
                    })
                    .map_err(PipelineError::Spawn)?,
            );
        }
        let st = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("batch-{}", cfg.group))
                .spawn(move || {
                    crate::util::priority::lower_this_thread(cfg.nice);
                    let mut prev = prev;
                    let mut next_frame = frame_next;
                    let mut reserved = frame_next;
                    let mut index = 0u64;
                    let mut last_frame = Instant::now();
                    // The last frame sealed was M (or nothing was sealed yet):
                    // once capture is write-ordered again, a W heartbeat goes
                    // out at once, so the target learns without waiting for the
                    // next write that the replica is consistent again.
                    let mut after_m = true;
                    let mut rebase = cfg.rebase;
                    while !st.load(AO::Relaxed) {
                        // Read before taking the batch: when it says
                        // write-ordered, every M entry (a drain's copies are
                        // recorded before it ends) is already in the journal,
                        // so an empty batch means all of them are in frames.
                        let ordered = journal.mode().write_ordered();
                        let wait = if ordered && after_m && next_frame > frame_next {
                            // A drain just ended: the W frame that makes the
                            // replica consistent goes now (the journal wakes
                            // this thread when the drain ends).
                            Duration::ZERO
                        } else if ordered {
                            cfg.heartbeat.saturating_sub(last_frame.elapsed())
                        } else {
                            Duration::MAX
                        };
                        let entries = journal.take_batch(
                            cfg.frame_max_bytes,
                            cfg.linger,
                            wait.min(Duration::from_millis(200)),
                        );
                        if entries.is_empty() {
                            if journal.is_closed() {
                                break;
                            }
                            // A heartbeat is a W frame: none while capture is
                            // not write-ordered (bitmap or drain mode: the
                            // replica is not a prefix of the source's history,
                            // a drain may be half done, and a W frame would
                            // tell the target it is consistent again).
                            if !ordered || (!after_m && last_frame.elapsed() < cfg.heartbeat) {
                                continue;
                            }
                        }
                        // Take a permit (bounded jobs in flight), checking for stop.
                        loop {
                            if st.load(AO::Relaxed) {
                                return;
                            }
                            if permit_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                                break;
                            }
                        }
                        if next_frame >= reserved {
                            match reserve(next_frame) {
                                Ok(r) => reserved = r,
                                Err(e) => {
                                    tracing::error!(group = %cfg.group, "cannot reserve frame numbers: {e}");
                                    return;
                                }
                            }
                        }
                        let heartbeat = entries.is_empty();
                        let kind = match entries.first().map(|e| e.ordering) {
                            _ if rebase => FrameKind::Merge,
                            Some(Ordering::M) => FrameKind::Merge,
                            _ => FrameKind::Write,
                        };
                        after_m = kind == FrameKind::Merge;
                        let meta = FrameMeta {
                            group: cfg.group,
                            key_epoch: cfg.key_epoch,
                            frame_no: next_frame,
                            prev_frame_no: prev.frame_no,
                            prev_last_seq: prev.last_seq,
                            kind,
                            heartbeat: heartbeat && !rebase,
                            rebase,
                            time_us: now_us(),
                        };
                        rebase = false;
                        let last_seq = entries.last().map_or(prev.last_seq, |e| e.seq);
                        prev = ChainPos { frame_no: next_frame, last_seq };
                        next_frame += 1;
                        if job_tx.send(Job { index, meta, entries }).is_err() {
                            return;
                        }
                        index += 1;
                        last_frame = Instant::now();
                    }
                })
                .map_err(PipelineError::Spawn)?,
        );
        Ok(Pipeline {
            stop,
            threads,
            permits: permit_tx,
        })
    }

    /// Return one permit: the consumer took a frame in order.
    pub fn release(&self) {
        let _ = self.permits.try_send(());
    }

    /// A handle that returns permits, for the consumer task.
    pub fn permit_returner(&self) -> Sender<()> {
        self.permits.clone()
    }

    /// Stop the batcher (the journal should be closed first to flush) and join.
    pub fn stop(self) {
        self.stop.store(true, AO::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn to_record(e: &Entry) -> RecordRef<'_> {
    match &e.change {
        Change::Write(d) => RecordRef::write(e.seq, e.disk, e.offset, e.time_us, d),
        Change::Zero(len) => RecordRef::zero(
            e.seq,
            e.disk,
            e.offset,
            (*len).min(u32::MAX as u64) as u32,
            e.time_us,
        ),
        Change::DiskSize(size) => RecordRef::disk_size(e.seq, e.disk, *size, e.time_us),
        Change::Tag { name, flags } => RecordRef::tag(e.seq, e.time_us, *flags, name),
        Change::Note { reason, text } => RecordRef::note(e.seq, e.disk, e.time_us, *reason, text),
    }
}

/// Puts results that arrive in any order back into index order.
pub struct Reorder<T> {
    next: u64,
    pending: BTreeMap<u64, T>,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Reorder {
            next: 0,
            pending: BTreeMap::new(),
        }
    }
}

impl<T> Reorder<T> {
    /// Accept the item at `index`.
    pub fn push(&mut self, index: u64, item: T) {
        self.pending.insert(index, item);
    }

    /// The next item in order, if it has arrived.
    pub fn pop(&mut self) -> Option<T> {
        let item = self.pending.remove(&self.next)?;
        self.next += 1;
        Some(item)
    }

    /// Items waiting for an earlier one.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::journal::CopyPart;
    use crate::frame::Opener;

    /// An in-memory journal of group g1 with a 64 MiB budget.
    fn test_journal() -> Arc<CaptureJournal> {
        Arc::new(CaptureJournal::in_memory(
            64 << 20,
            1,
            Box::new(|f| Ok(f + 1000)),
        ))
    }

    /// The pipeline settings of these tests (group g1, zstd 1, 4 jobs).
    fn test_config(
        frame_max_bytes: usize,
        linger: Duration,
        heartbeat: Duration,
        workers: usize,
    ) -> PipelineConfig {
        PipelineConfig {
            rebase: false,
            group: "g1".parse().unwrap(),
            key_epoch: 1,
            zstd_level: 1,
            frame_max_bytes,
            linger,
            heartbeat,
            workers,
            max_jobs: 4,
            nice: 0,
        }
    }

    #[test]
    fn reorder_releases_in_index_order() {
        let mut r = Reorder::default();
        r.push(2, 'c');
        r.push(1, 'b');
        assert_eq!(r.pop(), None);
        r.push(0, 'a');
        assert_eq!(
            (r.pop(), r.pop(), r.pop(), r.pop()),
            (Some('a'), Some('b'), Some('c'), None)
        );
    }

    #[test]
    fn journal_to_sealed_frames_in_chain_order() {
        let journal = test_journal();
        journal.add_disk(
            0,
            1 << 30,
            crate::capture::bitmap::RegionBitmap::new((1 << 30) / 4096),
            crate::frame::NoteReason::InitialCopy,
            "",
        );
        let key = DataKey::from_bytes([7; 32]);
        let group: GroupName = "g1".parse().unwrap();
        let cfg = test_config(
            256 * 1024,
            Duration::from_millis(5),
            Duration::from_secs(60),
            2,
        );
        let (tx, rx) = bounded(16);
        let p = Pipeline::start(
            journal.clone(),
            &key,
            cfg,
            ChainPos::default(),
            1,
            Box::new(|f| Ok(f + 10)),
            tx,
        )
        .unwrap();
        let mut rng = crate::util::prng::Prng::new(5);
        let mut written = Vec::new();
        for i in 0..200u64 {
            let mut d = vec![0u8; 64 * 1024];
            crate::util::datagen::fill(&mut d, 50, &mut rng);
            journal.record_write(0, i * 65536, d.clone()).unwrap();
            written.push(d);
        }
        let mut opener = Opener::new(group, vec![(1, DataKey::from_bytes([7; 32]))]).unwrap();
        let mut reorder = Reorder::default();
        let mut tip = ChainPos::default();
        let mut got = 0usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < 200 && Instant::now() < deadline {
            let Ok(o) = rx.recv_timeout(Duration::from_secs(5)) else {
                break;
            };
            reorder.push(o.index, o.result.unwrap());
            while let Some(f) = reorder.pop() {
                p.release();
                let opened = opener.open(&f.bytes).unwrap();
                assert_eq!(opened.header.prev_frame_no, tip.frame_no);
                assert_eq!(opened.header.prev_last_seq, tip.last_seq);
                for (h, data) in opened.iter() {
                    assert_eq!(h.seq as usize, got + 1);
                    assert_eq!(data, &written[got][..]);
                    got += 1;
                }
                tip = ChainPos {
                    frame_no: opened.header.frame_no,
                    last_seq: opened.header.last_seq,
                };
                journal.trim_through(tip.last_seq);
            }
        }
        assert_eq!(got, 200);
        journal.close();
        p.stop();
    }

    #[test]
    fn the_batcher_cuts_a_frame_after_a_tag() {
        let journal = test_journal();
        journal.add_disk(
            0,
            1 << 20,
            crate::capture::bitmap::RegionBitmap::new(256),
            crate::frame::NoteReason::InitialCopy,
            "",
        );
        let group: GroupName = "g1".parse().unwrap();
        // A long linger: only the tag may end the first frame early.
        let cfg = test_config(
            1 << 20,
            Duration::from_millis(300),
            Duration::from_secs(60),
            2,
        );
        for i in 0..3u64 {
            journal
                .record_write(0, i * 4096, vec![i as u8; 4096])
                .unwrap();
        }
        let tag = journal.record_tag("cut-here", 1).unwrap();
        for i in 0..2u64 {
            journal.record_write(0, i * 4096, vec![9; 4096]).unwrap();
        }
        let (tx, rx) = bounded(16);
        let key = DataKey::from_bytes([3; 32]);
        let p = Pipeline::start(
            journal.clone(),
            &key,
            cfg,
            ChainPos::default(),
            1,
            Box::new(|f| Ok(f + 10)),
            tx,
        )
        .unwrap();
        let mut opener = Opener::new(group, vec![(1, key)]).unwrap();
        let mut reorder = Reorder::default();
        let mut frames = Vec::new();
        while frames.len() < 2 {
            let o = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            reorder.push(o.index, o.result.unwrap());
            while let Some(f) = reorder.pop() {
                p.release();
                frames.push(opener.open(&f.bytes).unwrap());
            }
        }
        journal.close();
        p.stop();
        let (a, b) = (&frames[0], &frames[1]);
        assert_eq!(a.header.kind, FrameKind::Write);
        assert_eq!(a.header.version, crate::frame::FormatVersion::V2);
        assert_eq!(a.header.last_seq, tag, "the tag ends its frame");
        assert_eq!(a.records.len(), 3);
        let t = a.tag().unwrap();
        assert_eq!((t.name, t.seq, t.app_consistent()), ("cut-here", tag, true));
        assert_eq!(b.header.version, crate::frame::FormatVersion::V1);
        assert_eq!(
            b.header.first_seq,
            tag + 1,
            "the next write starts a new frame"
        );
        assert_eq!(b.records.len(), 2);
    }

    /// A pipeline over a one-disk journal that starts draining (a region of
    /// disk 0 pending), with heartbeats every `heartbeat`.
    fn draining(heartbeat: Duration) -> (Arc<CaptureJournal>, Pipeline, Receiver<SealOutput>) {
        let journal = test_journal();
        let mut pending = crate::capture::bitmap::RegionBitmap::new(256);
        pending.set_range(0, 1);
        journal.add_disk(
            0,
            1 << 20,
            pending,
            crate::frame::NoteReason::InitialCopy,
            "test",
        );
        assert_eq!(journal.mode(), crate::capture::modes::Mode::Drain);
        let cfg = test_config(1 << 20, Duration::from_millis(5), heartbeat, 1);
        let (tx, rx) = bounded(64);
        let p = Pipeline::start(
            journal.clone(),
            &DataKey::from_bytes([7; 32]),
            cfg,
            ChainPos::default(),
            1,
            Box::new(|f| Ok(f + 10)),
            tx,
        )
        .unwrap();
        (journal, p, rx)
    }

    /// Frames received within `wait` (in chain order), as (kind, heartbeat).
    fn frames_within(
        p: &Pipeline,
        rx: &Receiver<SealOutput>,
        reorder: &mut Reorder<SealedFrame>,
        wait: Duration,
        until: impl Fn(&[(FrameKind, bool)]) -> bool,
    ) -> Vec<(FrameKind, bool)> {
        let mut opener = Opener::new(
            "g1".parse().unwrap(),
            vec![(1, DataKey::from_bytes([7; 32]))],
        )
        .unwrap();
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while Instant::now() < deadline && !until(&got) {
            let Ok(o) = rx.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            reorder.push(o.index, o.result.unwrap());
            while let Some(f) = reorder.pop() {
                p.release();
                let h = opener.open(&f.bytes).unwrap().header;
                got.push((h.kind, h.heartbeat));
            }
        }
        got
    }

    /// No heartbeat while draining (a W frame would tell the target that the
    /// replica is consistent again with the drain half done), however long the
    /// journal stays empty; once every region is copied, a W heartbeat goes out
    /// at once, without waiting for the heartbeat interval or the next write.
    #[test]
    fn no_heartbeat_while_draining_and_one_as_soon_as_the_drain_ends() {
        // Heartbeats due every 20 ms: none may come while draining.
        let (journal, p, rx) = draining(Duration::from_millis(20));
        let mut reorder = Reorder::default();
        let got = frames_within(&p, &rx, &mut reorder, Duration::from_millis(600), |_| false);
        assert!(
            got.iter().all(|&(k, hb)| k == FrameKind::Merge && !hb),
            "only the drain's M note while draining: {got:?}"
        );
        journal.close();
        p.stop();

        // A heartbeat interval far longer than the test: the W heartbeat after
        // the drain must not wait for it.
        let (journal, p, rx) = draining(Duration::from_secs(3600));
        let mut reorder = Reorder::default();
        let copied = journal
            .record_copy(0, 0, 4096, vec![CopyPart::Data(0, vec![1; 4096])])
            .unwrap();
        assert!(copied && journal.finish_drain());
        let got = frames_within(&p, &rx, &mut reorder, Duration::from_secs(20), |g| {
            g.iter().any(|&(_, hb)| hb)
        });
        let first_w = got.iter().position(|&(k, _)| k == FrameKind::Write);
        assert!(
            first_w
                .is_some_and(|i| got[i].1 && got[..i].iter().all(|&(k, _)| k == FrameKind::Merge)),
            "M frames, then a W heartbeat: {got:?}"
        );
        journal.close();
        p.stop();
    }
}
