//! The ordering gate: decides, from frame headers alone, which frame may be
//! applied next in a group's chain.
//!
//! Sans-I/O: the gate is fed headers (and an opaque payload it holds for the
//! caller) and answers with a verdict; it never touches sockets, rings or clocks.
//! A frame is next when it names the current tip as predecessor (frame number
//! *and* last seq). Frames at or below the tip are duplicates (replays) and are
//! dropped; frames further ahead are held until the gap before them closes;
//! frames that contradict the chain already accepted are refused.

use std::collections::BTreeMap;

/// A position in the chain: the last frame accepted and its last seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ChainPos {
    /// Frame number (0 = before the first frame).
    pub frame_no: u64,
    /// Last seq of that frame.
    pub last_seq: u64,
}

/// The chain fields of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// This frame's number.
    pub frame_no: u64,
    /// Its predecessor's number.
    pub prev_frame_no: u64,
    /// Its predecessor's last seq.
    pub prev_last_seq: u64,
    /// This frame's last seq.
    pub last_seq: u64,
}

/// What the gate decided about an offered frame.
#[derive(Debug)]
pub enum Verdict<T> {
    /// These frames, in chain order, may be applied now (the offered one first,
    /// then held ones it unlocked). The tip has moved past them.
    Ready(Vec<(Link, T)>),
    /// Already at or below the tip: drop it.
    Duplicate,
    /// Ahead of the tip: held until its predecessor arrives.
    Held,
    /// Held set is full: the frame was not kept (it will be redelivered).
    Overflow,
    /// Contradicts the chain already accepted: refuse it.
    Refused(String),
}

/// Where the chain is stuck, for the "gap that does not close" report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The tip: the gate waits for a frame naming this as predecessor.
    pub tip: ChainPos,
    /// Lowest frame number held beyond the gap.
    pub first_held: u64,
    /// Number of frames held.
    pub held: usize,
}

/// The ordering gate of one group.
pub struct Gate<T> {
    tip: ChainPos,
    /// Held frames keyed by the predecessor they name.
    held: BTreeMap<u64, (Link, T, usize)>,
    held_bytes: usize,
    max_held: usize,
    max_held_bytes: usize,
}

impl<T> Gate<T> {
    /// A gate whose chain continues after `tip`, holding at most `max_held` frames
    /// and `max_held_bytes` bytes ahead of it.
    pub fn new(tip: ChainPos, max_held: usize, max_held_bytes: usize) -> Self {
        Gate {
            tip,
            held: BTreeMap::new(),
            held_bytes: 0,
            max_held,
            max_held_bytes,
        }
    }

    /// The last frame accepted.
    pub fn tip(&self) -> ChainPos {
        self.tip
    }

    /// Forget held frames and continue after `tip` (after the pipeline behind the
    /// gate failed and the session restarts from the durable watermark).
    pub fn reset(&mut self, tip: ChainPos) {
        self.tip = tip;
        self.held.clear();
        self.held_bytes = 0;
    }

    /// The gap the chain is waiting on, if frames are held.
    pub fn gap(&self) -> Option<Gap> {
        let first_held = self.held.values().map(|(l, _, _)| l.frame_no).min()?;
        Some(Gap {
            tip: self.tip,
            first_held,
            held: self.held.len(),
        })
    }

    /// Offer a frame (its chain fields, a payload to hold, and its size in bytes).
    pub fn offer(&mut self, link: Link, payload: T, size: usize) -> Verdict<T> {
        if link.frame_no <= link.prev_frame_no {
            return Verdict::Refused(format!(
                "frame {} names a later or equal predecessor {}",
                link.frame_no, link.prev_frame_no
            ));
        }
        if link.frame_no <= self.tip.frame_no {
            return Verdict::Duplicate;
        }
        if link.prev_frame_no < self.tip.frame_no {
            return Verdict::Refused(format!(
                "frame {} names predecessor {} but the chain already continued with frame {}",
                link.frame_no, link.prev_frame_no, self.tip.frame_no
            ));
        }
        if link.prev_frame_no == self.tip.frame_no {
            if link.prev_last_seq != self.tip.last_seq {
                return Verdict::Refused(format!(
                    "frame {} says its predecessor {} ended at seq {}, but it ended at seq {}",
                    link.frame_no, link.prev_frame_no, link.prev_last_seq, self.tip.last_seq
                ));
            }
            let mut ready = vec![(link, payload)];
            self.tip = ChainPos {
                frame_no: link.frame_no,
                last_seq: link.last_seq,
            };
            while let Some((l, p, sz)) = self.held.remove(&self.tip.frame_no) {
                self.held_bytes -= sz;
                if l.prev_last_seq != self.tip.last_seq {
                    // Cannot continue the chain: drop it and everything held, the
                    // relay redelivers from the tip.
                    self.held.clear();
                    self.held_bytes = 0;
                    break;
                }
                self.tip = ChainPos {
                    frame_no: l.frame_no,
                    last_seq: l.last_seq,
                };
                ready.push((l, p));
            }
            // Held frames now at or below the tip are stale.
            let tip = self.tip.frame_no;
            let stale: Vec<u64> = self
                .held
                .iter()
                .filter(|(_, (l, _, _))| l.frame_no <= tip || l.prev_frame_no < tip)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some((_, _, sz)) = self.held.remove(&k) {
                    self.held_bytes -= sz;
                }
            }
            return Verdict::Ready(ready);
        }
        // Ahead of the tip.
        if let Some((held, _, _)) = self.held.get(&link.prev_frame_no) {
            return if held.frame_no == link.frame_no {
                Verdict::Duplicate
            } else {
                Verdict::Refused(format!(
                    "frames {} and {} both name predecessor {}",
                    held.frame_no, link.frame_no, link.prev_frame_no
                ))
            };
        }
        if self.held.len() >= self.max_held || self.held_bytes + size > self.max_held_bytes {
            return Verdict::Overflow;
        }
        self.held_bytes += size;
        self.held.insert(link.prev_frame_no, (link, payload, size));
        Verdict::Held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::prng::Prng;

    /// A chain of `n` frames with non-consecutive numbers and 3 seqs each.
    fn chain(n: u64) -> Vec<Link> {
        let mut out = Vec::new();
        let (mut prev, mut prev_seq) = (0u64, 0u64);
        for i in 0..n {
            let frame_no = prev + 1 + (i % 3) * 1000; // gaps in numbering are legal
            let last_seq = prev_seq + 3;
            out.push(Link {
                frame_no,
                prev_frame_no: prev,
                prev_last_seq: prev_seq,
                last_seq,
            });
            prev = frame_no;
            prev_seq = last_seq;
        }
        out
    }

    fn drive(gate: &mut Gate<u64>, frames: &[Link]) -> Vec<u64> {
        let mut applied = Vec::new();
        for l in frames {
            if let Verdict::Ready(r) = gate.offer(*l, l.frame_no, 10) {
                applied.extend(r.into_iter().map(|(_, p)| p));
            }
        }
        applied
    }

    #[test]
    fn in_order_chain_applies_all() {
        let c = chain(10);
        let mut g = Gate::new(ChainPos::default(), 64, 1 << 20);
        let applied = drive(&mut g, &c);
        assert_eq!(applied, c.iter().map(|l| l.frame_no).collect::<Vec<_>>());
        assert!(g.gap().is_none());
    }

    #[test]
    fn shuffled_and_duplicated_frames_apply_exactly_once_in_order() {
        let c = chain(50);
        let want: Vec<u64> = c.iter().map(|l| l.frame_no).collect();
        for seed in 0..200 {
            let mut rng = Prng::new(seed);
            // Each frame delivered 1..=3 times, in a random order.
            let mut deliveries: Vec<Link> = c
                .iter()
                .flat_map(|l| std::iter::repeat_n(*l, 1 + rng.below(3) as usize))
                .collect();
            for i in (1..deliveries.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                deliveries.swap(i, j);
            }
            let mut g = Gate::new(ChainPos::default(), 1000, 1 << 30);
            assert_eq!(drive(&mut g, &deliveries), want, "seed {seed}");
            assert!(g.gap().is_none());
        }
    }

    #[test]
    fn missing_frame_is_a_gap_until_redelivered() {
        let c = chain(6);
        let mut g = Gate::new(ChainPos::default(), 64, 1 << 20);
        let mut without: Vec<Link> = c.clone();
        let missing = without.remove(2);
        let applied = drive(&mut g, &without);
        assert_eq!(applied, vec![c[0].frame_no, c[1].frame_no]);
        let gap = g.gap().unwrap();
        assert_eq!(gap.tip.frame_no, c[1].frame_no);
        assert_eq!(gap.held, 3);
        assert_eq!(gap.first_held, c[3].frame_no);
        let applied = drive(&mut g, &[missing]);
        assert_eq!(
            applied,
            c[2..].iter().map(|l| l.frame_no).collect::<Vec<_>>()
        );
        assert!(g.gap().is_none());
    }

    #[test]
    fn replayed_old_frames_are_duplicates() {
        let c = chain(5);
        let mut g = Gate::new(ChainPos::default(), 64, 1 << 20);
        drive(&mut g, &c);
        for l in &c {
            assert!(matches!(g.offer(*l, 0, 10), Verdict::Duplicate));
        }
    }

    #[test]
    fn contradictions_are_refused() {
        let c = chain(3);
        let mut g = Gate::new(ChainPos::default(), 64, 1 << 20);
        drive(&mut g, &c[..2]);
        // Names an old predecessor (a fork).
        let fork = Link {
            frame_no: c[1].frame_no + 5000,
            prev_frame_no: c[0].frame_no,
            prev_last_seq: c[0].last_seq,
            last_seq: 99,
        };
        assert!(matches!(g.offer(fork, 0, 1), Verdict::Refused(_)));
        // Right predecessor number, wrong seq.
        let mut bad = c[2];
        bad.prev_last_seq += 1;
        assert!(matches!(g.offer(bad, 0, 1), Verdict::Refused(m) if m.contains("ended at seq")));
        // Self-referencing.
        let selfref = Link {
            frame_no: 7,
            prev_frame_no: 7,
            prev_last_seq: 0,
            last_seq: 0,
        };
        assert!(matches!(g.offer(selfref, 0, 1), Verdict::Refused(_)));
        // The good frame still applies afterwards.
        assert!(matches!(g.offer(c[2], 0, 1), Verdict::Ready(_)));
    }

    #[test]
    fn held_set_is_bounded() {
        let c = chain(10);
        let mut g = Gate::new(ChainPos::default(), 3, 1 << 20);
        for l in &c[1..4] {
            assert!(matches!(g.offer(*l, 0, 1), Verdict::Held));
        }
        assert!(matches!(g.offer(c[5], 0, 1), Verdict::Overflow));
        let mut g2: Gate<u64> = Gate::new(ChainPos::default(), 100, 15);
        assert!(matches!(g2.offer(c[1], 0, 10), Verdict::Held));
        assert!(matches!(g2.offer(c[2], 0, 10), Verdict::Overflow));
    }

    #[test]
    fn reset_forgets_held_frames() {
        let c = chain(4);
        let mut g = Gate::new(ChainPos::default(), 64, 1 << 20);
        drive(&mut g, &c[..2]);
        g.offer(c[3], 0, 1);
        g.reset(ChainPos {
            frame_no: c[0].frame_no,
            last_seq: c[0].last_seq,
        });
        assert!(g.gap().is_none());
        assert_eq!(
            drive(&mut g, &c[1..]),
            vec![c[1].frame_no, c[2].frame_no, c[3].frame_no]
        );
    }
}
