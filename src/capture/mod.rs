//! Capture: the agent's record of every write not yet durable at the relay.
//!
//! Every write of a frontend (and of the bench's synthetic workload) goes through
//! [`protected::ProtectedDisk`]: write intent in the disk's [`dirtylog`], then the
//! [`backing`] disk, then the group's [`journal`], which keeps the change with
//! its bytes in memory or in [`spill`] files, or only its region in a
//! [`bitmap`], as the capture [`modes`] decide. The [`drain`] workers copy dirty
//! regions back into the journal; the agent's batcher turns the journal into
//! frames.

pub mod backing;
pub mod bitmap;
pub mod dirtylog;
pub mod drain;
pub mod journal;
pub mod modes;
pub mod protected;
pub mod readahead;
pub mod spill;
mod stripes;
