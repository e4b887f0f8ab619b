//! `tidemark bench`: the whole pipeline (agent → relay → target) on one machine,
//! reported as an efficiency against what the hardware allows for the same data.
//!
//! This module will hold the bench; the orchestrator that runs the roles, drives
//! the workload and reports lag, throughput, CPU and memory per role comes later.
//! For now it holds [`cost`], the per-stage cost measurement that defines the
//! bound (see `docs/BENCH.md`). Per-process CPU and memory figures come from
//! [`crate::util::procstat`].

pub mod cost;
