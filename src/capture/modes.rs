//! Capture modes and the decisions between them, as plain functions of the
//! journal's budgets and the link's state (no I/O, no locks: the journal calls
//! them under its own lock).
//!
//! ```text
//!   data ──memory full──▶ spill ──spill full──▶ bitmap ──link keeps up──▶ drain
//!    ▲  ◀──spill empty───┘                        ▲                         │
//!    │                                            └── budgets full (stays   │
//!    └────────────────────── drain complete ◀──────── in drain) ────────────┘
//! ```
//!
//! - **data**: every write's bytes in memory, write-ordered (W frames).
//! - **spill**: memory is full; writes' bytes go to append-only change-log
//!   files on local disk, still write-ordered (W frames).
//! - **bitmap**: the spill is full too (or the relay was unreachable for too
//!   long, or a backing write failed): only dirty regions are kept. No W frame
//!   is made until the regions are copied again.
//! - **drain**: the regions are read back from the backing disk and sent as M
//!   frames; writes meanwhile are captured with their bytes but as M (the
//!   replica is not a recovery point until the drain is done). When no dirty
//!   region is left, capture returns to data and the next W frame is the first
//!   new recovery point. With the link down for [`DRAIN_LINK_GRACE_US`], the
//!   drain pauses in bitmap mode.
//!
//! The workload never waits in any mode (invariant 6): when a write cannot be
//! kept with its bytes, its region is marked instead.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// The capture mode of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Write-ordered, bytes in memory.
    Data,
    /// Write-ordered, bytes overflowing to change-log files.
    Spill,
    /// Dirty regions only.
    Bitmap,
    /// Dirty regions being copied as M frames.
    Drain,
}

impl Mode {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Data => "data",
            Mode::Spill => "spill",
            Mode::Bitmap => "bitmap",
            Mode::Drain => "drain",
        }
    }

    /// True when writes recorded now are write-ordered (W).
    pub fn write_ordered(self) -> bool {
        matches!(self, Mode::Data | Mode::Spill)
    }
}

/// One mode change, for status and logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transition {
    /// Previous mode.
    pub from: Mode,
    /// New mode.
    pub to: Mode,
    /// When, µs since the Unix epoch.
    pub at_us: u64,
    /// Why.
    pub reason: String,
}

/// How many recent transitions the status keeps.
pub const HISTORY: usize = 16;

/// The current mode, since when and why, with counters of every transition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModeState {
    /// Current mode.
    pub mode: Mode,
    /// Since when, µs since the Unix epoch.
    pub since_us: u64,
    /// Why the last change happened.
    pub reason: String,
    /// Counts per transition, keyed "from->to".
    pub transitions: BTreeMap<String, u64>,
    /// The most recent transitions, oldest first.
    pub history: VecDeque<Transition>,
}

impl ModeState {
    /// Start in `mode` for `reason`.
    pub fn new(mode: Mode, reason: impl Into<String>, now_us: u64) -> Self {
        ModeState {
            mode,
            since_us: now_us,
            reason: reason.into(),
            transitions: BTreeMap::new(),
            history: VecDeque::new(),
        }
    }

    /// Move to `to` (no-op when already there); returns true on a change.
    pub fn change(&mut self, to: Mode, reason: impl Into<String>, now_us: u64) -> bool {
        if self.mode == to {
            return false;
        }
        let reason = reason.into();
        let from = self.mode;
        *self
            .transitions
            .entry(format!("{}->{}", from.as_str(), to.as_str()))
            .or_insert(0) += 1;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Transition {
            from,
            to,
            at_us: now_us,
            reason: reason.clone(),
        });
        self.mode = to;
        self.since_us = now_us;
        self.reason = reason;
        true
    }
}

/// Where a captured change goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In memory with its bytes.
    Memory,
    /// Bytes to the spill files, metadata in memory.
    Spill,
    /// Not kept: mark its region dirty.
    Dirty,
}

/// The budgets a placement decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// Memory charged now (entries' metadata and in-memory bytes).
    pub mem_used: usize,
    /// The memory budget.
    pub mem_budget: usize,
    /// Spill bytes used now.
    pub spill_used: u64,
    /// The spill budget (0: no spill).
    pub spill_budget: u64,
    /// Entries held now (an empty journal admits any one change).
    pub entries: usize,
}

/// Share of the memory budget that in-memory bytes may use; the rest is kept
/// for the metadata of spilled entries.
pub const MEMORY_DATA_SHARE: (usize, usize) = (7, 8);

/// Decide where a change of `data_len` bytes (0 for metadata-only changes)
/// charged `mem_charge` in memory goes, in `mode`.
pub fn place(
    mode: Mode,
    b: &Budgets,
    data_len: usize,
    mem_charge: usize,
    overhead: usize,
) -> Placement {
    if mode == Mode::Bitmap {
        return Placement::Dirty;
    }
    let data_limit = b.mem_budget / MEMORY_DATA_SHARE.1 * MEMORY_DATA_SHARE.0;
    if b.entries == 0 || b.mem_used + mem_charge <= data_limit {
        return Placement::Memory;
    }
    if data_len > 0
        && b.spill_budget > 0
        && b.spill_used + data_len as u64 <= b.spill_budget
        && b.mem_used + overhead <= b.mem_budget
    {
        return Placement::Spill;
    }
    Placement::Dirty
}

/// The link's state as the journal sees it.
#[derive(Debug, Clone, Copy)]
pub struct LinkView {
    /// A session with the relay is open.
    pub up: bool,
    /// µs the link has been down (0 when up).
    pub down_for_us: u64,
}

/// What a periodic check decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to do.
    Stay,
    /// The relay was unreachable too long: drop the unsent bytes to the bitmap.
    ToBitmap(String),
    /// Draining with the link down: pause in bitmap mode (entries already
    /// captured stay).
    PauseDrain(String),
    /// The link keeps up again: start copying the dirty regions.
    ToDrain(String),
}

/// How long the link may be down while draining before the drain pauses in
/// bitmap mode (copies cannot reach the relay; writes need only their regions).
pub const DRAIN_LINK_GRACE_US: u64 = 2_000_000;

/// The periodic decision: `backlog` is the unbatched bytes in memory and spill,
/// `pending` the bytes of dirty regions.
pub fn tick(
    mode: Mode,
    link: LinkView,
    backlog: u64,
    backlog_limit: u64,
    pending: u64,
    bitmap_after_us: u64,
) -> Tick {
    let too_long = !link.up && bitmap_after_us > 0 && link.down_for_us >= bitmap_after_us;
    match mode {
        Mode::Data | Mode::Spill if too_long => Tick::ToBitmap(format!(
            "relay unreachable for {} s: unsent writes kept as dirty regions",
            link.down_for_us / 1_000_000
        )),
        Mode::Drain if too_long && backlog > 0 => Tick::ToBitmap(format!(
            "relay unreachable for {} s: unsent writes kept as dirty regions",
            link.down_for_us / 1_000_000
        )),
        Mode::Drain if !link.up && link.down_for_us >= DRAIN_LINK_GRACE_US => {
            Tick::PauseDrain(format!(
                "relay unreachable for {} s while copying dirty regions: keeping dirty regions only until it is back",
                link.down_for_us / 1_000_000
            ))
        }
        Mode::Bitmap if link.up && backlog <= backlog_limit => Tick::ToDrain(format!(
            "relay keeps up again: copying {pending} bytes of dirty regions"
        )),
        _ => Tick::Stay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(mem_used: usize, spill_used: u64, entries: usize) -> Budgets {
        Budgets {
            mem_used,
            mem_budget: 800,
            spill_used,
            spill_budget: 1000,
            entries,
        }
    }

    #[test]
    fn placement_degrades_memory_then_spill_then_dirty() {
        assert_eq!(
            place(Mode::Data, &b(0, 0, 0), 5000, 5100, 100),
            Placement::Memory,
            "empty journal admits one"
        );
        assert_eq!(
            place(Mode::Data, &b(500, 0, 3), 100, 200, 100),
            Placement::Memory
        );
        assert_eq!(
            place(Mode::Data, &b(600, 0, 3), 100, 200, 100),
            Placement::Spill
        );
        assert_eq!(
            place(Mode::Spill, &b(600, 950, 3), 100, 200, 100),
            Placement::Dirty
        );
        assert_eq!(
            place(Mode::Data, &b(750, 0, 3), 100, 200, 100),
            Placement::Dirty,
            "no room for metadata"
        );
        assert_eq!(
            place(Mode::Data, &b(650, 0, 3), 0, 100, 100),
            Placement::Dirty,
            "zero ranges do not spill"
        );
        assert_eq!(
            place(Mode::Bitmap, &b(0, 0, 0), 1, 101, 100),
            Placement::Dirty
        );
        let no_spill = Budgets {
            spill_budget: 0,
            ..b(600, 0, 3)
        };
        assert_eq!(
            place(Mode::Drain, &no_spill, 100, 200, 100),
            Placement::Dirty
        );
    }

    #[test]
    fn ticks() {
        let down = LinkView {
            up: false,
            down_for_us: 61_000_000,
        };
        let up = LinkView {
            up: true,
            down_for_us: 0,
        };
        assert!(
            matches!(tick(Mode::Spill, down, 10, 5, 0, 60_000_000), Tick::ToBitmap(r) if r.contains("61 s"))
        );
        assert_eq!(
            tick(Mode::Spill, down, 10, 5, 0, 0),
            Tick::Stay,
            "0 disables the timer"
        );
        assert!(matches!(
            tick(Mode::Drain, down, 0, 5, 9, 60_000_000),
            Tick::PauseDrain(_)
        ));
        let blip = LinkView {
            up: false,
            down_for_us: 1_000_000,
        };
        assert_eq!(tick(Mode::Drain, blip, 0, 5, 9, 60_000_000), Tick::Stay);
        assert_eq!(tick(Mode::Bitmap, down, 0, 5, 9, 60_000_000), Tick::Stay);
        assert!(matches!(
            tick(Mode::Bitmap, up, 5, 5, 9, 60_000_000),
            Tick::ToDrain(_)
        ));
        assert_eq!(tick(Mode::Bitmap, up, 6, 5, 9, 60_000_000), Tick::Stay);
    }

    #[test]
    fn transitions_are_counted_and_kept() {
        let mut m = ModeState::new(Mode::Data, "start", 1);
        assert!(!m.change(Mode::Data, "again", 2));
        assert!(m.change(Mode::Spill, "memory budget full", 3));
        assert!(m.change(Mode::Bitmap, "spill budget full", 4));
        assert_eq!(m.transitions["data->spill"], 1);
        assert_eq!(m.history.len(), 2);
        assert_eq!(
            (m.mode, m.since_us, m.reason.as_str()),
            (Mode::Bitmap, 4, "spill budget full")
        );
        for i in 0..40 {
            m.change(
                if i % 2 == 0 {
                    Mode::Drain
                } else {
                    Mode::Bitmap
                },
                "x",
                10 + i,
            );
        }
        assert_eq!(m.history.len(), HISTORY);
    }
}
