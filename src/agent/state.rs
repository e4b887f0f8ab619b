//! The agent's small persisted state per group: seq and frame-number
//! reservations and the clock floor. (What each disk still needs copied is in
//! its dirty log, `capture::dirtylog`.)
//!
//! Seqs and frame numbers are handed out from blocks that are durably reserved
//! *before* any number in them is used. After an orderly stop the exact next
//! values are stored; after a crash the agent starts above the whole reserved
//! block, so no seq and no frame number (hence no AES-GCM nonce) is ever reused,
//! even for frames that were sealed but never acknowledged.
//!
//! Stored as a small JSON document, replaced atomically (write temporary file,
//! fsync, rename, fsync directory).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// Seqs reserved per durable write (the jump after an unclean stop is at most this).
pub const SEQ_BLOCK: u64 = 1_000_000;
/// Frame numbers reserved per durable write.
pub const FRAME_BLOCK: u64 = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct StateFile {
    version: u32,
    /// Exclusive bound of seqs that may have been handed out.
    seq_reserved: u64,
    /// Exclusive bound of frame numbers that may have been used.
    frame_reserved: u64,
    /// Highest timestamp handed out (µs); time never goes below it.
    time_floor_us: u64,
    /// True only after an orderly stop.
    clean: bool,
    /// Exact next values, valid when `clean`.
    seq_next: u64,
    frame_next: u64,
    /// The highest seq the relay had acknowledged when the dirty logs were
    /// last persisted (0: unknown, as in state files from before it). A relay
    /// that comes back holding less lost acknowledged frames: a chain gap.
    #[serde(default)]
    acked_seq: u64,
}

/// Where numbering resumes after start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartPoint {
    /// First seq to hand out.
    pub seq_next: u64,
    /// First frame number to use.
    pub frame_next: u64,
    /// Whether the previous run stopped in order.
    pub was_clean: bool,
    /// The highest seq the relay had acknowledged by the last persisted dirty
    /// log (0: unknown).
    pub acked_seq: u64,
}

/// Persisted state of one group on the agent.
pub struct AgentState {
    path: PathBuf,
    inner: Mutex<StateFile>,
}

impl AgentState {
    /// Open (or create) `<dir>/<group>.state` and mark it as running.
    pub fn open(dir: &Path, group: &str) -> std::io::Result<(AgentState, StartPoint)> {
        crate::util::durable::create_dir_durable(dir)?;
        let path = dir.join(format!("{group}.state"));
        let file: StateFile = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::other(format!("agent state {}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile {
                version: 1,
                seq_reserved: 1,
                frame_reserved: 1,
                ..Default::default()
            },
            Err(e) => return Err(e),
        };
        let start = if file.clean {
            StartPoint {
                seq_next: file.seq_next.max(1),
                frame_next: file.frame_next.max(1),
                was_clean: true,
                acked_seq: file.acked_seq,
            }
        } else {
            StartPoint {
                seq_next: file.seq_reserved.max(1),
                frame_next: file.frame_reserved.max(1),
                was_clean: file.version == 0 || file.seq_reserved <= 1,
                acked_seq: file.acked_seq,
            }
        };
        crate::util::time::clamp_floor(file.time_floor_us);
        let st = AgentState {
            path,
            inner: Mutex::new(StateFile {
                clean: false,
                seq_reserved: start.seq_next,
                frame_reserved: start.frame_next,
                ..file
            }),
        };
        st.persist(&st.lock())?;
        Ok((st, start))
    }

    fn lock(&self) -> MutexGuard<'_, StateFile> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, f: &StateFile) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(f).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("state.tmp");
        crate::util::durable::replace_file(&self.path, &tmp, &bytes)
    }

    /// Durably reserve seqs from `from`; returns the new exclusive bound.
    pub fn reserve_seqs(&self, from: u64) -> std::io::Result<u64> {
        let mut g = self.lock();
        let until = from.max(g.seq_reserved) + SEQ_BLOCK;
        let mut next = g.clone();
        next.seq_reserved = until;
        next.time_floor_us = crate::util::time::now_us();
        self.persist(&next)?;
        *g = next;
        Ok(until)
    }

    /// Durably reserve frame numbers from `from`; returns the new exclusive bound.
    pub fn reserve_frames(&self, from: u64) -> std::io::Result<u64> {
        let mut g = self.lock();
        let until = from.max(g.frame_reserved) + FRAME_BLOCK;
        let mut next = g.clone();
        next.frame_reserved = until;
        self.persist(&next)?;
        *g = next;
        Ok(until)
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably record that the relay acknowledged through `seq`, before a
    /// dirty log that relies on it is persisted (no write when it did not
    /// grow). After a relay comes back with less, [`StartPoint::acked_seq`]
    /// tells the next start that acknowledged frames were lost.
    pub fn note_acked(&self, seq: u64) -> std::io::Result<()> {
        let mut g = self.lock();
        if seq <= g.acked_seq {
            return Ok(());
        }
        let mut next = g.clone();
        next.acked_seq = seq;
        self.persist(&next)?;
        *g = next;
        Ok(())
    }

    /// Orderly stop: store the exact next values and mark the state clean.
    pub fn close_clean(&self, seq_next: u64, frame_next: u64) -> std::io::Result<()> {
        let mut g = self.lock();
        let mut next = g.clone();
        next.clean = true;
        next.seq_next = seq_next;
        next.frame_next = frame_next;
        next.time_floor_us = crate::util::time::now_us();
        self.persist(&next)?;
        *g = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unclean_restart_jumps_past_reservations_clean_restart_does_not() {
        let d = tempfile::tempdir().unwrap();
        let (s, start) = AgentState::open(d.path(), "g1").unwrap();
        assert_eq!(start.seq_next, 1);
        assert_eq!(s.reserve_seqs(1).unwrap(), 1 + SEQ_BLOCK);
        assert_eq!(s.reserve_frames(1).unwrap(), 1 + FRAME_BLOCK);
        drop(s); // crash: no close_clean
        let (s, start) = AgentState::open(d.path(), "g1").unwrap();
        assert_eq!(start.seq_next, 1 + SEQ_BLOCK);
        assert_eq!(start.frame_next, 1 + FRAME_BLOCK);
        assert!(!start.was_clean);
        s.close_clean(1 + SEQ_BLOCK + 5, 1 + FRAME_BLOCK + 2)
            .unwrap();
        drop(s);
        let (_s, start) = AgentState::open(d.path(), "g1").unwrap();
        assert_eq!(start.seq_next, 1 + SEQ_BLOCK + 5);
        assert_eq!(start.frame_next, 1 + FRAME_BLOCK + 2);
        assert!(start.was_clean);
    }

    #[test]
    fn the_acknowledged_seq_survives_restarts_and_only_grows() {
        let d = tempfile::tempdir().unwrap();
        let (s, start) = AgentState::open(d.path(), "g1").unwrap();
        assert_eq!(start.acked_seq, 0);
        s.note_acked(40).unwrap();
        s.note_acked(30).unwrap(); // never backwards
        drop(s); // crash
        let (s, start) = AgentState::open(d.path(), "g1").unwrap();
        assert_eq!(start.acked_seq, 40);
        s.note_acked(41).unwrap();
        s.close_clean(100, 10).unwrap();
        drop(s);
        let (_s, start) = AgentState::open(d.path(), "g1").unwrap();
        assert_eq!(start.acked_seq, 41);
        // A state file from before the field reads as unknown.
        fs::write(
            d.path().join("g2.state"),
            br#"{"version":1,"seq_reserved":5,"frame_reserved":3,"time_floor_us":0,"clean":true,"seq_next":5,"frame_next":3}"#,
        )
        .unwrap();
        let (_s, start) = AgentState::open(d.path(), "g2").unwrap();
        assert_eq!((start.seq_next, start.acked_seq), (5, 0));
    }

    #[test]
    fn corrupt_state_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("g1.state"), b"{not json").unwrap();
        let e = AgentState::open(d.path(), "g1").err().unwrap().to_string();
        assert!(e.contains("g1.state"), "{e}");
    }
}
