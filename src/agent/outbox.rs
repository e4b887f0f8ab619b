//! The agent's outbox: sealed frames not yet durably acknowledged by the relay.
//!
//! Sans-I/O: the session loop pushes sealed frames in chain order, asks what to
//! send, and feeds acknowledgements and reconnects; the outbox answers which
//! frames to (re)send and which seq the capture journal may trim through. It is
//! bounded in frames and bytes: a full outbox stops the seal pipeline, which
//! stops the batcher, which lets the capture budget fill.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::target::gate::ChainPos;

/// One sealed frame waiting for the relay's ack.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// Frame number.
    pub frame_no: u64,
    /// Predecessor in the chain.
    pub prev_frame_no: u64,
    /// Last seq carried (the journal is trimmed through it on ack).
    pub last_seq: u64,
    /// The wire bytes.
    pub bytes: Arc<Vec<u8>>,
}

/// The relay's head does not continue the agent's chain: frames were lost
/// between them (e.g. the relay's spool was wiped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "relay holds the group up to frame {head}, but this agent's chain continues from frame {first_prev} (oldest unacknowledged frame: {first}, 0 = none): the relay lost frames it had acknowledged. The agent starts a new stretch of the chain from the relay's head and compares every disk with the replica (a chain-gap resync)"
)]
pub struct ChainBreak {
    /// The relay's head frame.
    pub head: u64,
    /// Our oldest unacknowledged frame.
    pub first: u64,
    /// Its predecessor.
    pub first_prev: u64,
}

/// Bounded queue of unacknowledged frames with a send cursor.
#[derive(Debug)]
pub struct Outbox {
    frames: VecDeque<OutFrame>,
    bytes: usize,
    next_send: usize,
    max_frames: usize,
    max_bytes: usize,
    acked: ChainPos,
}

impl Outbox {
    /// An outbox holding at most `max_frames` frames and `max_bytes` bytes (at
    /// least one frame always fits), whose chain is acknowledged through `acked`.
    pub fn new(max_frames: usize, max_bytes: usize, acked: ChainPos) -> Self {
        Outbox {
            frames: VecDeque::new(),
            bytes: 0,
            next_send: 0,
            max_frames: max_frames.max(1),
            max_bytes,
            acked,
        }
    }

    /// True when another frame of `len` bytes may be pushed.
    pub fn has_room(&self, len: usize) -> bool {
        self.frames.is_empty()
            || (self.frames.len() < self.max_frames && self.bytes + len <= self.max_bytes)
    }

    /// Append a sealed frame (chain order is the caller's duty).
    pub fn push(&mut self, f: OutFrame) {
        self.bytes += f.bytes.len();
        self.frames.push_back(f);
    }

    /// The next frame to put on the wire, advancing the send cursor.
    pub fn next_to_send(&mut self) -> Option<OutFrame> {
        let f = self.frames.get(self.next_send)?.clone();
        self.next_send += 1;
        Some(f)
    }

    /// A cumulative ack through `frame_no`: drop those frames. Returns the seq the
    /// journal may be trimmed through, if it advanced.
    pub fn on_ack(&mut self, frame_no: u64, last_seq: u64) -> Option<u64> {
        if frame_no <= self.acked.frame_no {
            return None;
        }
        let mut trimmed = None;
        while let Some(f) = self.frames.front() {
            if f.frame_no > frame_no {
                break;
            }
            let f = self.frames.pop_front().expect("front exists");
            self.bytes -= f.bytes.len();
            self.next_send = self.next_send.saturating_sub(1);
            trimmed = Some(f.last_seq);
        }
        self.acked = ChainPos { frame_no, last_seq };
        trimmed.or(Some(last_seq))
    }

    /// A new connection told us the relay's durable head: frames through it are
    /// acknowledged, everything else is re-sent from the start of the outbox.
    pub fn on_connect(&mut self, head: ChainPos) -> Result<Option<u64>, ChainBreak> {
        // The relay cannot hold a frame this agent never sealed.
        let last = self
            .frames
            .back()
            .map_or(self.acked.frame_no, |f| f.frame_no);
        if head.frame_no > last {
            return Err(ChainBreak {
                head: head.frame_no,
                first: self.frames.front().map_or(0, |f| f.frame_no),
                first_prev: last,
            });
        }
        let trimmed = if head.frame_no > self.acked.frame_no {
            self.on_ack(head.frame_no, head.last_seq)
        } else {
            None
        };
        self.next_send = 0;
        match self.frames.front() {
            Some(first) if first.prev_frame_no != head.frame_no => Err(ChainBreak {
                head: head.frame_no,
                first: first.frame_no,
                first_prev: first.prev_frame_no,
            }),
            // Nothing unacknowledged: the next frame continues our acknowledged
            // position, so the relay's head must be exactly that.
            None if head.frame_no != self.acked.frame_no => Err(ChainBreak {
                head: head.frame_no,
                first: 0,
                first_prev: self.acked.frame_no,
            }),
            _ => Ok(trimmed),
        }
    }

    /// True when a frame waits to be put on the wire.
    pub fn has_unsent(&self) -> bool {
        self.next_send < self.frames.len()
    }

    /// Frames put on the wire (on this connection) and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.next_send
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True when nothing waits for an ack.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The last position the relay acknowledged.
    pub fn acked(&self) -> ChainPos {
        self.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(n: u64) -> OutFrame {
        OutFrame {
            frame_no: n,
            prev_frame_no: n - 1,
            last_seq: n * 10,
            bytes: Arc::new(vec![0; 100]),
        }
    }

    #[test]
    fn send_ack_and_bounds() {
        let mut o = Outbox::new(3, 1000, ChainPos::default());
        for n in 1..=3 {
            assert!(o.has_room(100));
            o.push(f(n));
        }
        assert!(!o.has_room(100));
        assert_eq!(o.in_flight(), 0);
        assert_eq!(o.next_to_send().unwrap().frame_no, 1);
        assert_eq!(o.next_to_send().unwrap().frame_no, 2);
        assert_eq!(o.in_flight(), 2);
        assert_eq!(o.on_ack(1, 10), Some(10));
        assert_eq!(o.in_flight(), 1, "frame 2 is still unanswered");
        assert_eq!(o.next_to_send().unwrap().frame_no, 3);
        assert!(o.next_to_send().is_none());
        assert_eq!(o.on_ack(1, 10), None, "stale ack ignored");
        assert_eq!(o.on_ack(3, 30), Some(30));
        assert!(o.is_empty());
        assert_eq!(o.bytes(), 0);
    }

    #[test]
    fn reconnect_resends_unacked_after_the_relay_head() {
        let mut o = Outbox::new(10, 10_000, ChainPos::default());
        for n in 1..=5 {
            o.push(f(n));
        }
        while o.next_to_send().is_some() {}
        // The relay had durably stored frames 1..=2 before the connection dropped.
        let trimmed = o
            .on_connect(ChainPos {
                frame_no: 2,
                last_seq: 20,
            })
            .unwrap();
        assert_eq!(trimmed, Some(20));
        assert_eq!(o.in_flight(), 0, "nothing is on the new connection yet");
        let resent: Vec<u64> = std::iter::from_fn(|| o.next_to_send())
            .map(|f| f.frame_no)
            .collect();
        assert_eq!(resent, vec![3, 4, 5]);
    }

    #[test]
    fn a_relay_that_lost_frames_is_a_chain_break() {
        let mut o = Outbox::new(10, 10_000, ChainPos::default());
        o.push(f(5));
        let e = o.on_connect(ChainPos::default()).unwrap_err();
        assert_eq!(e.first, 5);
        assert!(e.to_string().contains("resync"));
    }

    #[test]
    fn an_empty_outbox_needs_the_relay_at_our_acknowledged_position() {
        let pos = ChainPos {
            frame_no: 4,
            last_seq: 40,
        };
        let mut o = Outbox::new(10, 10_000, pos);
        assert_eq!(o.on_connect(pos).unwrap(), None);
        // The relay lost frames it had acknowledged.
        assert!(o.on_connect(ChainPos::default()).is_err());
        // The relay holds frames this agent never sent.
        let mut o = Outbox::new(10, 10_000, pos);
        let e = o.on_connect(ChainPos {
            frame_no: 9,
            last_seq: 90,
        });
        assert!(e.is_err());
    }

    #[test]
    fn an_oversized_frame_still_fits_an_empty_outbox() {
        let mut o = Outbox::new(2, 10, ChainPos::default());
        assert!(o.has_room(1000));
        o.push(f(1));
        assert!(!o.has_room(1));
    }
}
