//! The target (master target): orders, opens and applies frames to replicas.

pub mod gate;
pub mod watermark;
