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
    /// A REBASE frame: the agent found that the relay lost frames it had
    /// acknowledged and starts a new stretch of the chain from what the relay
    /// holds, which may be behind this gate's tip (the frames between are
    /// resent as M data, so the stretch is M until every disk was compared).
    pub rebase: bool,
}

impl Link {
    /// The chain fields of a frame header.
    pub fn of(h: &crate::frame::FrameHeader) -> Link {
        Link {
            frame_no: h.frame_no,
            prev_frame_no: h.prev_frame_no,
            prev_last_seq: h.prev_last_seq,
            last_seq: h.last_seq,
            rebase: h.rebase,
        }
    }

    /// True when this frame may be applied right after `tip`: it names `tip`
    /// as its predecessor (number and last seq), or it is a REBASE frame that
    /// names a predecessor `tip` had passed and moves beyond `tip` (number
    /// and seq).
    pub fn follows(&self, tip: ChainPos) -> bool {
        if self.prev_frame_no == tip.frame_no {
            return self.prev_last_seq == tip.last_seq;
        }
        self.rebase
            && self.prev_frame_no < tip.frame_no
            && self.frame_no > tip.frame_no
            && self.last_seq > tip.last_seq
    }
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
        // The rule is `Link::follows` (shared with the apply thread and the
        // apply-log checker); the rest only explains a refusal.
        let follows = link.follows(self.tip);
        if !follows {
            if link.prev_frame_no == self.tip.frame_no {
                return Verdict::Refused(format!(
                    "frame {} says its predecessor {} ended at seq {}, but it ended at seq {}",
                    link.frame_no, link.prev_frame_no, link.prev_last_seq, self.tip.last_seq
                ));
            }
            if link.prev_frame_no < self.tip.frame_no {
                return Verdict::Refused(if link.rebase {
                    format!(
                        "REBASE frame {} ends at seq {}, not beyond the tip's seq {}",
                        link.frame_no, link.last_seq, self.tip.last_seq
                    )
                } else {
                    format!(
                        "frame {} names predecessor {} but the chain already continued with frame {}",
                        link.frame_no, link.prev_frame_no, self.tip.frame_no
                    )
                });
            }
        }
        if follows {
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
                rebase: false,
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
            rebase: false,
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
            rebase: false,
        };
        assert!(matches!(g.offer(selfref, 0, 1), Verdict::Refused(_)));
        // The good frame still applies afterwards.
        assert!(matches!(g.offer(c[2], 0, 1), Verdict::Ready(_)));
    }

    #[test]
    fn a_rebase_frame_may_name_a_predecessor_the_tip_passed() {
        // The target applied frames 1..=4; the relay lost 3 and 4 and holds
        // the chain only through frame 2.
        let c = chain(4);
        let mut g = Gate::new(ChainPos::default(), 64, 1 << 20);
        drive(&mut g, &c);
        let tip = g.tip();
        let after_relay = Link {
            frame_no: tip.frame_no + 100,
            prev_frame_no: c[1].frame_no,
            prev_last_seq: c[1].last_seq,
            last_seq: tip.last_seq + 50,
            rebase: false,
        };
        // Without REBASE it contradicts the chain...
        assert!(matches!(g.offer(after_relay, 0, 1), Verdict::Refused(_)));
        // ...with it, it is the next frame, and the stretch continues from it.
        let rebase = Link {
            rebase: true,
            ..after_relay
        };
        let next = Link {
            frame_no: rebase.frame_no + 1,
            prev_frame_no: rebase.frame_no,
            prev_last_seq: rebase.last_seq,
            last_seq: rebase.last_seq + 3,
            rebase: false,
        };
        // The next one arrives first and is held until the REBASE frame.
        assert!(matches!(g.offer(next, 9, 1), Verdict::Held));
        match g.offer(rebase, 8, 1) {
            Verdict::Ready(r) => assert_eq!(r.iter().map(|(_, p)| *p).collect::<Vec<_>>(), [8, 9]),
            other => panic!("{other:?}"),
        }
        assert_eq!(g.tip().frame_no, next.frame_no);
        assert!(g.gap().is_none());
        // Replayed, it is a duplicate.
        assert!(matches!(g.offer(rebase, 0, 1), Verdict::Duplicate));
    }

    #[test]
    fn a_rebase_frame_is_refused_when_it_would_move_seqs_back_and_held_when_ahead() {
        let c = chain(4);
        let mut g = Gate::new(ChainPos::default(), 64, 1 << 20);
        drive(&mut g, &c[..3]);
        let tip = g.tip();
        let back = Link {
            frame_no: tip.frame_no + 10,
            prev_frame_no: c[0].frame_no,
            prev_last_seq: c[0].last_seq,
            last_seq: tip.last_seq,
            rebase: true,
        };
        assert!(
            matches!(g.offer(back, 0, 1), Verdict::Refused(m) if m.contains("not beyond the tip"))
        );
        // A REBASE frame naming a predecessor the gate has not reached yet
        // waits for it like any frame (the relay still holds the frames
        // before it).
        let ahead = Link {
            frame_no: c[3].frame_no + 10,
            prev_frame_no: c[3].frame_no,
            prev_last_seq: c[3].last_seq,
            last_seq: c[3].last_seq + 1,
            rebase: true,
        };
        assert!(matches!(g.offer(ahead, 2, 1), Verdict::Held));
        match g.offer(c[3], 1, 1) {
            Verdict::Ready(r) => assert_eq!(r.len(), 2),
            other => panic!("{other:?}"),
        }
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
