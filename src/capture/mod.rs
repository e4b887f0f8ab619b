//! Capture: the agent's record of every write not yet durable at the relay.
//!
//! Frontends (and, in this release, the synthetic bench workload and the initial
//! copy) call [`journal::CaptureJournal`] after the write reached the backing disk
//! and before acknowledging it; the batcher drains it into frames.

pub mod journal;
pub mod source;
