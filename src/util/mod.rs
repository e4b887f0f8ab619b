//! Small helpers shared by several roles: a fast seeded PRNG, synthetic data with a
//! chosen compressibility, wall-clock time in microseconds that never goes back,
//! a latency histogram, the shutdown signal and atomic status files.

pub mod aligned;
pub mod datagen;
pub mod durable;
pub mod exclusive;
pub mod fsfreeze;
pub mod hist;
pub mod lockfile;
pub mod malloc;
pub mod priority;
pub mod prng;
pub mod procstat;
pub mod rate;
pub mod shutdown;
pub mod statusfile;
pub mod task;
pub mod time;
pub mod zero;
