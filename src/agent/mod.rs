//! The agent: captures writes, batches, seals and pushes frames to the relay.

pub mod outbox;
pub mod pipeline;
pub mod state;
