//! What the agent shows about itself: live counters shared by its threads and
//! tasks, and the snapshot written to `<state_dir>/status.json`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::workload::WorkloadReport;
use crate::capture::journal::{CaptureJournal, DiskCaptureStats, JournalStats};
use crate::capture::protected::ProtectedDisk;
use crate::target::gate::ChainPos;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One frontend serving a disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrontendStatus {
    /// "nbd", "fuse" or "ublk".
    pub kind: String,
    /// Where clients reach it (listen addresses, export name, file path, or
    /// block device).
    pub address: String,
    /// The frontend's own counters.
    #[serde(default)]
    pub counters: serde_json::Value,
}

/// One disk in the status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Disk id in the group.
    pub id: u16,
    /// Backing file or device.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// How workloads reach the disk (empty: only tidemark's own writers).
    pub frontends: Vec<FrontendStatus>,
    /// Why the disk started with regions to copy, and how many bytes.
    pub start_reason: String,
    /// Bytes marked for copying at start.
    pub start_pending_bytes: u64,
    /// Capture counters of this disk (pending, unacknowledged, copied bytes).
    pub capture: DiskCaptureStats,
    /// Extents in the activity log (write intent), and log writes since start.
    pub activity_log: (u64, u64),
    /// The backing disk's size now, when it grew while the agent runs: the
    /// new space is exported and protected from the agent's next start on.
    #[serde(default)]
    pub grown_to: Option<u64>,
}

/// Live state of one group, shared by its session, bridge and writer.
pub(crate) struct GroupInfo {
    pub name: String,
    pub journal: Arc<CaptureJournal>,
    pub connected: AtomicBool,
    pub frames_sealed: AtomicU64,
    pub heartbeats: AtomicU64,
    pub plain_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub frames_acked: AtomicU64,
    pub last_ack_us: AtomicU64,
    pub reconnects: AtomicU64,
    pub throttles: AtomicU64,
    pub acked: Mutex<ChainPos>,
    pub outbox: Mutex<(usize, usize)>,
    /// The last error and when it was set (µs since the Unix epoch).
    pub last_error: Mutex<Option<(String, u64)>>,
    pub disks: Mutex<Vec<DiskStatus>>,
    pub disk_io: Vec<Arc<ProtectedDisk>>,
    /// Counters of each disk's frontends, in the order of its `frontends`.
    pub probes: Mutex<Vec<(u16, super::frontends::Probe)>>,
    pub workload: Mutex<Option<WorkloadReport>>,
    /// The workload's live progress (the writer thread updates it).
    pub workload_progress: Arc<Mutex<WorkloadReport>>,
    /// How dirty regions are copied (checksum or full), with counters.
    pub drain: Arc<crate::capture::drain::DrainControl>,
    /// The last scheduled verify of each disk.
    pub verifies: Mutex<Vec<super::verify::ScheduledVerify>>,
    /// Disks whose growth while running was already logged.
    grown_logged: Mutex<Vec<u16>>,
}

impl GroupInfo {
    pub fn new(
        name: String,
        journal: Arc<CaptureJournal>,
        disks: Vec<DiskStatus>,
        disk_io: Vec<Arc<ProtectedDisk>>,
        drain: Arc<crate::capture::drain::DrainControl>,
    ) -> Self {
        GroupInfo {
            name,
            journal,
            connected: AtomicBool::new(false),
            frames_sealed: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            plain_bytes: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
            frames_acked: AtomicU64::new(0),
            last_ack_us: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            throttles: AtomicU64::new(0),
            acked: Mutex::new(ChainPos::default()),
            outbox: Mutex::new((0, 0)),
            last_error: Mutex::new(None),
            disks: Mutex::new(disks),
            disk_io,
            probes: Mutex::new(Vec::new()),
            workload: Mutex::new(None),
            workload_progress: Arc::new(Mutex::new(WorkloadReport::default())),
            drain,
            verifies: Mutex::new(Vec::new()),
            grown_logged: Mutex::new(Vec::new()),
        }
    }

    pub fn set_error(&self, e: String) {
        *lock(&self.last_error) = Some((e, crate::util::time::now_us()));
    }

    pub fn snapshot(&self) -> AgentGroupStatus {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (last_error, last_error_us) = match &*lock(&self.last_error) {
            Some((e, at)) => (Some(e.clone()), *at),
            None => (None, 0),
        };
        let (outbox_frames, outbox_bytes) = *lock(&self.outbox);
        let workload = lock(&self.workload)
            .is_some()
            .then(|| lock(&self.workload_progress).clone());
        let journal = self.journal.stats();
        let mut disks = lock(&self.disks).clone();
        for d in &mut disks {
            if let Some(c) = journal.disks.iter().find(|c| c.id == d.id) {
                d.capture = c.clone();
            }
            if let Some(io) = self.disk_io.iter().find(|io| io.id() == d.id) {
                d.activity_log = io.activity_log_stats();
                d.grown_to = io.backing_size_now().filter(|&now| now > d.size);
                if let Some(now) = d.grown_to {
                    let mut logged = lock(&self.grown_logged);
                    if !logged.contains(&d.id) {
                        logged.push(d.id);
                        tracing::warn!(group = %self.name, disk = d.id, path = %d.path.display(), from = d.size, to = now, "the disk grew while the agent runs: restart the agent to export and protect the new space (it then compares only the new space)");
                    }
                }
            }
            let probes = lock(&self.probes);
            let mine = probes.iter().filter(|(id, _)| *id == d.id);
            for (f, (_, p)) in d.frontends.iter_mut().zip(mine) {
                f.counters = p.counters();
            }
        }
        AgentGroupStatus {
            name: self.name.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            acked: *lock(&self.acked),
            journal,
            outbox_frames,
            outbox_bytes,
            frames_sealed: r(&self.frames_sealed),
            heartbeats: r(&self.heartbeats),
            plain_bytes: r(&self.plain_bytes),
            stored_bytes: r(&self.stored_bytes),
            frames_acked: r(&self.frames_acked),
            last_ack_us: r(&self.last_ack_us),
            reconnects: r(&self.reconnects),
            throttles: r(&self.throttles),
            last_error,
            last_error_us,
            disks,
            workload,
            resync: ResyncStatus::of(&self.drain),
            verifies: lock(&self.verifies).clone(),
        }
    }
}

/// One group in the agent's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentGroupStatus {
    /// Group name.
    pub name: String,
    /// A session with the relay is open.
    pub connected: bool,
    /// The last frame the relay acknowledged as durable.
    pub acked: ChainPos,
    /// The capture journal.
    pub journal: JournalStats,
    /// Sealed frames waiting for the relay's ack.
    pub outbox_frames: usize,
    /// Their bytes.
    pub outbox_bytes: usize,
    /// Frames sealed since start (heartbeats included).
    pub frames_sealed: u64,
    /// Of which idle heartbeats.
    pub heartbeats: u64,
    /// Plaintext payload bytes sealed.
    pub plain_bytes: u64,
    /// Bytes of sealed frames (what goes on the wire).
    pub stored_bytes: u64,
    /// Frames the relay acknowledged since start.
    pub frames_acked: u64,
    /// When the relay last acknowledged a frame, µs since the Unix epoch (0: never).
    #[serde(default)]
    pub last_ack_us: u64,
    /// Connections lost and re-established.
    pub reconnects: u64,
    /// Throttle requests from the relay.
    pub throttles: u64,
    /// The last error, if any. It stays after the cause went away: see
    /// `last_error_us` for when it happened.
    pub last_error: Option<String>,
    /// When the last error happened, µs since the Unix epoch (0: never).
    #[serde(default)]
    pub last_error_us: u64,
    /// Disks.
    pub disks: Vec<DiskStatus>,
    /// The synthetic workload, when one runs.
    pub workload: Option<WorkloadReport>,
    /// How dirty regions reached the replica since start.
    #[serde(default)]
    pub resync: ResyncStatus,
    /// The last scheduled verify of each disk (`verify_every_hours`).
    #[serde(default)]
    pub verifies: Vec<super::verify::ScheduledVerify>,
}

/// Counters of copying dirty regions (initial copy, catch-up, resync) since
/// the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncStatus {
    /// `checksum` or `copy` (the group's `resync` setting).
    pub mode: String,
    /// Bytes read and compared with the replica's digests.
    pub compared_bytes: u64,
    /// Bytes of the blocks that differed, sent as M data.
    pub differing_bytes: u64,
    /// Bytes copied without a compare (`copy` mode, or a full resync).
    pub copied_bytes: u64,
    /// Digest requests sent to the target.
    pub digest_requests: u64,
    /// Requests that failed (target away, refused, timed out).
    pub digest_failures: u64,
    /// Bytes of sealed digest replies received.
    pub digest_reply_bytes: u64,
    /// Blocks whose digests came back.
    #[serde(default)]
    pub digest_blocks: u64,
    /// Time the copy waited for the bandwidth cap, µs.
    #[serde(default)]
    pub capped_us: u64,
}

impl ResyncStatus {
    fn of(d: &crate::capture::drain::DrainControl) -> ResyncStatus {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = ResyncStatus {
            mode: if d.digests().is_some() {
                "checksum"
            } else {
                "copy"
            }
            .into(),
            compared_bytes: r(&d.compared_bytes),
            differing_bytes: r(&d.differing_bytes),
            copied_bytes: r(&d.copied_bytes),
            capped_us: r(&d.capped_us),
            ..ResyncStatus::default()
        };
        if let Some(c) = d.digests() {
            s.digest_requests = r(&c.stats.requests);
            s.digest_failures = r(&c.stats.failures);
            s.digest_reply_bytes = r(&c.stats.reply_bytes);
            s.digest_blocks = r(&c.stats.blocks);
        }
        s
    }
}

/// The agent's status snapshot (`<state_dir>/status.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Always "agent".
    pub role: String,
    /// Instance name.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// When the snapshot was taken, µs since the Unix epoch: it reflects
    /// every write acknowledged before then.
    #[serde(default)]
    pub updated_us: u64,
    /// Per group.
    pub groups: Vec<AgentGroupStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::journal::Policy;

    #[test]
    fn the_last_error_is_shown_with_when_it_happened() {
        let j = CaptureJournal::for_tests("g1", 1 << 20, Policy::Degrade);
        let info = GroupInfo::new("g1".into(), j, Vec::new(), Vec::new(), Default::default());
        let s = info.snapshot();
        assert_eq!((s.last_error, s.last_error_us), (None, 0));
        let before = crate::util::time::now_us();
        info.set_error("relay unreachable".into());
        let s = info.snapshot();
        assert_eq!(s.last_error.as_deref(), Some("relay unreachable"));
        assert!(s.last_error_us >= before);
        // A status file written before the field existed still reads.
        let mut v = serde_json::to_value(&s).unwrap();
        v.as_object_mut().unwrap().remove("last_error_us");
        let old: AgentGroupStatus = serde_json::from_value(v).unwrap();
        assert_eq!(old.last_error_us, 0);
    }
}
