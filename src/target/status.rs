//! The target's status snapshot (`state_dir/status.json`), written every
//! [`STATUS_INTERVAL`](crate::util::statusfile::STATUS_INTERVAL) and at
//! shutdown. The bench and tests deserialize [`TargetStatus`] to
//! wait for the watermark and read lag and byte counts; the fields are
//! described in docs/TARGET.md ("Status file").

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::util::hist::Summary;

/// The whole `status.json` of a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Always `"target"`.
    pub role: String,
    /// Instance name (`target.name`).
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// When this snapshot was taken, µs since the Unix epoch.
    pub updated_us: u64,
    /// One entry per configured group, in config order.
    pub groups: Vec<GroupStatus>,
}

/// The durable watermark of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WatermarkStatus {
    /// Last frame durably applied (0: none).
    pub frame_no: u64,
    /// Its last seq: every write with a seq at or below it is on the replica.
    pub last_seq: u64,
    /// Source capture time of that frame's last record, µs since the Unix epoch.
    pub time_us: u64,
}

/// Frames held by the ordering gate, waiting for a missing predecessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapStatus {
    /// The gate's tip: the frame the missing one must name as predecessor.
    pub tip_frame_no: u64,
    /// The tip's last seq.
    pub tip_last_seq: u64,
    /// Lowest frame number held beyond the gap.
    pub first_held: u64,
    /// Number of frames held.
    pub held: u64,
    /// How long the chain has made no progress while frames were held, ms.
    pub stuck_ms: u64,
    /// True once `stuck_ms` passed the warning threshold (10 s).
    pub stuck: bool,
}

/// One group's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Group name.
    pub name: String,
    /// A session with the relay is open.
    pub connected: bool,
    /// The durable watermark.
    pub watermark: WatermarkStatus,
    /// Frames durably applied since start (heartbeats included).
    pub frames_applied: u64,
    /// Records durably applied since start.
    pub records_applied: u64,
    /// Data bytes written (Write records) since start.
    pub bytes_applied: u64,
    /// Bytes zeroed (Zero records) since start.
    pub zero_bytes: u64,
    /// Frames received at or below the gate's tip and dropped.
    pub duplicates: u64,
    /// Frames refused (unparsable, wrong group, chain contradiction, failed to
    /// open, failed validation).
    pub refused: u64,
    /// Frames that reached the apply thread out of chain order (must stay 0).
    pub chain_violations: u64,
    /// Frames currently held by the gate.
    pub held: u64,
    /// Frames held ahead of a gap, if any.
    pub gap: Option<GapStatus>,
    /// Why the group stopped applying (until restart), if it did.
    pub stalled: Option<String>,
    /// The last applied frame was W or a heartbeat (the replica is at a
    /// crash-consistent point), not M.
    pub consistent: bool,
    /// Lag per W record, µs: source capture time → durably applied here.
    pub lag_us: Summary,
    /// Group commits (flush + watermark store) since start.
    pub apply_batches: u64,
    /// Frames between the socket and the end of the apply thread now.
    pub in_flight_frames: u64,
    /// Bytes charged to those frames now.
    pub in_flight_bytes: u64,
    /// Applying is paused (the disk is full) and retried until it succeeds:
    /// what failed and since when (µs). Cleared when applying resumes.
    #[serde(default)]
    pub paused: Option<Paused>,
    /// Frames and bytes in the redo journal (not yet trimmed).
    #[serde(default)]
    pub redo_frames: u64,
    /// Bytes of the redo journal's segment files.
    #[serde(default)]
    pub redo_bytes: u64,
    /// Frames replayed from the redo journal at start.
    #[serde(default)]
    pub redo_replayed: u64,
    /// Retention: the journal of before-images.
    #[serde(default)]
    pub retention: Option<RetentionStatus>,
}

/// A group's retention journal, in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionStatus {
    /// Retention is configured on (else only the newest point is kept).
    pub enabled: bool,
    /// Bytes of the journal.
    pub bytes: u64,
    /// Points whose before-images are kept (older points recoverable).
    pub epochs: u64,
    /// Source time of the oldest of them, µs.
    pub oldest_time_us: Option<u64>,
    /// Before-images are being kept now.
    pub preserving: bool,
}

/// Why and since when applying is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    /// What failed (names the file and the error).
    pub reason: String,
    /// Since when, µs since the Unix epoch.
    pub since_us: u64,
    /// Retries so far.
    pub retries: u64,
}

impl GroupStatus {
    /// A fresh status for `name`, at `watermark`.
    pub fn new(name: &str, watermark: WatermarkStatus, consistent: bool) -> Self {
        GroupStatus {
            name: name.to_string(),
            connected: false,
            watermark,
            frames_applied: 0,
            records_applied: 0,
            bytes_applied: 0,
            zero_bytes: 0,
            duplicates: 0,
            refused: 0,
            chain_violations: 0,
            held: 0,
            gap: None,
            stalled: None,
            consistent,
            lag_us: Summary::default(),
            apply_batches: 0,
            in_flight_frames: 0,
            in_flight_bytes: 0,
            paused: None,
            redo_frames: 0,
            redo_bytes: 0,
            redo_replayed: 0,
            retention: None,
        }
    }
}

/// A group's status, shared by its session task, its apply thread and the
/// status writer. Critical sections are short and never span an await.
#[derive(Debug, Clone)]
pub struct SharedStatus(Arc<Mutex<GroupStatus>>);

impl SharedStatus {
    /// Share `s`.
    pub fn new(s: GroupStatus) -> Self {
        SharedStatus(Arc::new(Mutex::new(s)))
    }

    /// Lock it (a poisoned lock is still usable: the data is plain counters).
    pub fn lock(&self) -> MutexGuard<'_, GroupStatus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> GroupStatus {
        self.lock().clone()
    }

    /// Mark the group stalled with `reason`, keeping the first reason.
    pub fn stall(&self, reason: &str) {
        let mut s = self.lock();
        if s.stalled.is_none() {
            s.stalled = Some(reason.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let mut g = GroupStatus::new(
            "g1",
            WatermarkStatus {
                frame_no: 3,
                last_seq: 9,
                time_us: 100,
            },
            true,
        );
        g.gap = Some(GapStatus {
            tip_frame_no: 3,
            tip_last_seq: 9,
            first_held: 5,
            held: 2,
            stuck_ms: 11_000,
            stuck: true,
        });
        g.stalled = Some("group g1 frame 4: refused".into());
        let t = TargetStatus {
            role: "target".into(),
            name: "t".into(),
            pid: 1,
            updated_us: 5,
            groups: vec![g],
        };
        let j = serde_json::to_string(&t).unwrap();
        assert!(j.contains("\"watermark\":{\"frame_no\":3,\"last_seq\":9,\"time_us\":100}"));
        let back: TargetStatus = serde_json::from_str(&j).unwrap();
        assert_eq!(back, t);
        let s = SharedStatus::new(back.groups[0].clone());
        s.stall("second reason");
        assert_eq!(
            s.snapshot().stalled.as_deref(),
            Some("group g1 frame 4: refused")
        );
    }
}
