//! The agent: captures writes, batches, seals and pushes frames to the relay.
//!
//! [`run`] is the process; [`pipeline`] turns the capture journal into sealed
//! frames; [`outbox`] decides what to (re)send and what an ack releases;
//! [`state`] persists seq and frame-number reservations; [`workload`] is the
//! synthetic writer the bench and tests drive it with; [`control`] is the
//! running agent's control socket and [`tagcmd`] the `tidemark agent tag`
//! command that uses it; [`verify`] runs `tidemark verify` and `tidemark
//! resync` for it.

pub mod control;
mod frontends;
pub mod outbox;
pub mod pipeline;
mod run;
mod session;
pub mod state;
pub mod status;
pub mod tagcmd;
pub mod verify;
pub mod workload;

pub use frontends::FrontendError;
pub use run::{AgentError, AgentOptions, DRAIN_TIMEOUT, run};
pub use session::{SessionEnd, SessionError};
pub use status::{AgentGroupStatus, AgentStatus, DiskStatus, FrontendStatus};
