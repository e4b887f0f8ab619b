//! The in-memory index: per group, its segments and, per untrimmed frame, where
//! the record is. 16 bytes per frame; payloads stay on disk.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::SpoolHead;

/// Where one frame's record is: 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Frame number.
    pub frame_no: u64,
    /// Offset of the record header in its segment (segments stay below 4 GiB).
    pub offset: u32,
    /// Payload length.
    pub len: u32,
}

/// One segment file of a group.
#[derive(Debug)]
pub struct SegIndex {
    /// First frame number, from the file name.
    pub first_frame_no: u64,
    /// Highest frame number ever indexed in this segment (`first_frame_no - 1`
    /// when it has none), so segments can be binary-searched even when trimmed.
    pub last_frame_no: u64,
    /// Logical length of the file: the end of its last record (or of the
    /// bytes recovery could not index). The file itself may be up to 4095 bytes
    /// longer: zero padding to a block boundary (docs/SPOOL.md, "Padding").
    pub file_len: u64,
    /// Untrimmed frames in chain order.
    pub entries: VecDeque<Entry>,
}

impl SegIndex {
    /// A segment with no frames yet.
    pub fn new(first_frame_no: u64, file_len: u64) -> Self {
        SegIndex {
            first_frame_no,
            last_frame_no: first_frame_no.saturating_sub(1),
            file_len,
            entries: VecDeque::new(),
        }
    }
}

/// One consistency group.
#[derive(Debug, Default)]
pub struct GroupIndex {
    /// Last durably appended frame (survives trims through the state file).
    pub head: Option<SpoolHead>,
    /// Frames up to this number are trimmed and never read.
    pub trimmed_through: u64,
    /// Segments in frame order; the last one is the writer's active segment.
    pub segments: VecDeque<SegIndex>,
    /// Number of untrimmed indexed frames.
    pub frames: u64,
    /// Sum of the segment files' logical lengths.
    pub disk_bytes: u64,
    /// Serializes trims of this group (state file updates and deletions).
    pub trim_lock: Arc<Mutex<()>>,
    /// Trimmed segment files waiting for reuse as new segments (`*.free`):
    /// trims add to it, the writer takes from it.
    pub free: Vec<PathBuf>,
}

impl GroupIndex {
    /// Append an entry to the segment starting at `seg_first`, which must be the
    /// last segment (an entry for any other segment would break the order).
    pub fn push_entry(&mut self, seg_first: u64, e: Entry) {
        debug_assert_eq!(
            self.segments.back().map(|s| s.first_frame_no),
            Some(seg_first)
        );
        if let Some(seg) = self.segments.back_mut()
            && seg.first_frame_no == seg_first
        {
            seg.last_frame_no = e.frame_no;
            seg.entries.push_back(e);
            self.frames += 1;
        }
    }

    /// Drop entries up to `frame_no` from memory and advance the trim point (it
    /// never goes back). Returns the first frame numbers of the segments that are
    /// now removable: not the last, and every frame number they can hold (up to
    /// the next segment's first minus one) is trimmed, so even bytes recovery
    /// could not index in them belong to frames the target has acknowledged.
    pub fn trim(&mut self, frame_no: u64) -> Vec<u64> {
        if frame_no > self.trimmed_through {
            self.trimmed_through = frame_no;
        }
        let t = self.trimmed_through;
        let mut removable = Vec::new();
        let n = self.segments.len();
        for i in 0..n {
            let next_first = self.segments.get(i + 1).map(|s| s.first_frame_no);
            let seg = &mut self.segments[i];
            while seg.entries.front().is_some_and(|e| e.frame_no <= t) {
                seg.entries.pop_front();
                self.frames -= 1;
            }
            if seg.entries.capacity() > 64 && seg.entries.len() < seg.entries.capacity() / 4 {
                seg.entries.shrink_to_fit();
            }
            if let Some(nf) = next_first
                && seg.entries.is_empty()
                && t >= nf.saturating_sub(1)
            {
                removable.push(seg.first_frame_no);
            }
            if seg.last_frame_no > t {
                break;
            }
        }
        removable
    }

    /// Forget a segment whose file was deleted.
    pub fn remove_segment(&mut self, first_frame_no: u64) -> Option<SegIndex> {
        let pos = self
            .segments
            .iter()
            .position(|s| s.first_frame_no == first_frame_no)?;
        let seg = self.segments.remove(pos)?;
        self.frames -= seg.entries.len() as u64;
        self.disk_bytes -= seg.file_len;
        Some(seg)
    }

    /// Up to `max_count` frames after `after` (and after the trim point), in order,
    /// stopping before `max_bytes` of payload is exceeded, but always at least one
    /// frame when one exists. Returns `(segment first frame, entry)` pairs.
    pub fn plan_read(&self, after: u64, max_bytes: usize, max_count: usize) -> Vec<(u64, Entry)> {
        let start = after.max(self.trimmed_through);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let si = self.segments.partition_point(|s| s.last_frame_no <= start);
        for seg in self.segments.iter().skip(si) {
            let ei = seg.entries.partition_point(|e| e.frame_no <= start);
            for e in seg.entries.iter().skip(ei) {
                if out.len() >= max_count
                    || (!out.is_empty() && bytes.saturating_add(e.len as usize) > max_bytes)
                {
                    return out;
                }
                bytes = bytes.saturating_add(e.len as usize);
                out.push((seg.first_frame_no, *e));
            }
        }
        out
    }

    /// First untrimmed frame number, if any.
    pub fn first_frame_no(&self) -> Option<u64> {
        self.segments
            .iter()
            .find_map(|s| s.entries.front().map(|e| e.frame_no))
    }
}

/// All groups, behind one mutex held only for short, in-memory work.
#[derive(Debug, Default)]
pub struct SpoolIndex {
    /// Groups by name.
    pub groups: BTreeMap<String, GroupIndex>,
}

impl SpoolIndex {
    /// Sum of all segment files' logical lengths.
    pub fn total_bytes(&self) -> u64 {
        self.groups.values().map(|g| g.disk_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> GroupIndex {
        let mut g = GroupIndex::default();
        for (first, frames) in [(1u64, 1..=3u64), (4, 4..=6), (7, 7..=8)] {
            g.segments.push_back(SegIndex::new(first, 64));
            g.disk_bytes += 64;
            for f in frames {
                g.push_entry(
                    first,
                    Entry {
                        frame_no: f,
                        offset: 64 + (f as u32) * 100,
                        len: 10,
                    },
                );
            }
        }
        g
    }

    fn frames(p: &[(u64, Entry)]) -> Vec<u64> {
        p.iter().map(|(_, e)| e.frame_no).collect()
    }

    #[test]
    fn plan_and_trim() {
        let mut g = group();
        assert_eq!(g.frames, 8);
        assert_eq!(
            frames(&g.plan_read(0, usize::MAX, 100)),
            (1..=8).collect::<Vec<_>>()
        );
        assert_eq!(frames(&g.plan_read(2, usize::MAX, 3)), [3, 4, 5]);
        assert_eq!(frames(&g.plan_read(2, 25, 100)), [3, 4]);
        assert_eq!(frames(&g.plan_read(2, 1, 100)), [3], "at least one frame");
        assert!(g.plan_read(8, usize::MAX, 100).is_empty());
        assert!(g.plan_read(2, usize::MAX, 0).is_empty());

        assert_eq!(g.trim(5), vec![1]);
        assert_eq!(g.frames, 3);
        assert_eq!(frames(&g.plan_read(0, usize::MAX, 100)), [6, 7, 8]);
        assert_eq!(g.first_frame_no(), Some(6));
        assert!(g.remove_segment(1).is_some());
        assert_eq!(g.trim(8), vec![4], "the last segment is never removable");
        assert_eq!(g.frames, 0);
        assert!(g.plan_read(0, usize::MAX, 100).is_empty());
        assert_eq!(g.trim(3), vec![4], "trim point never goes back");
        assert_eq!(g.trimmed_through, 8);
    }
}
