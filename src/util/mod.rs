//! Small helpers shared by several roles: a fast seeded PRNG, synthetic data with a
//! chosen compressibility, and wall-clock time in microseconds that never goes back.

pub mod datagen;
pub mod prng;
pub mod time;
