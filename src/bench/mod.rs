//! `tidemark bench`: the whole pipeline (agent → relay → target) on one machine,
//! reported as an efficiency against what the hardware allows for the same data.
//!
//! [`run`] starts the three roles as child processes on loopback, drives the
//! synthetic workload and reports throughput, lag, CPU and memory per role;
//! [`cost`] measures the per-stage costs that define the bound (see
//! `docs/BENCH.md`). Per-process CPU and memory figures come from
//! [`crate::util::procstat`].

pub mod cost;
pub mod run;
