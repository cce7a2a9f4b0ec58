//! mycel-sim: a deterministic simulator of the real node logic, for chaos testing.
//!
//! One thread, one event loop on a simulated clock, one seed: the cores of many nodes
//! (mycel-consensus on a crashable in-memory log, mycel-proto's announcer, directory and
//! fetches, mycel-policy's access rules and replication plans, content cut by
//! mycel-chunker) exchange real encoded messages over a simulated network with latency,
//! bandwidth, loss, duplication, reordering and partitions, on nodes that crash, pause,
//! drift and lose disk writes. Safety is checked as events happen, liveness after the
//! heal, and every event feeds a trace hash, so a seed replays a run bit for bit.
//!
//! - [`scenario`]: scenario files (TOML) and the swarm's per-seed fault mix.
//! - [`world`]: the simulated world and its event loop ([`world::run`]).
//! - [`check`]: the safety checkers.
//! - [`content`]: generated content through the real chunker.
//! - [`report`]: what a run reports, and how to reproduce it.
//! - [`sweep`]: many seeds, on a few threads.
//! - [`bugs`]: planted bugs (feature `sim-bugs`).
//!
//! This crate is a driver: it may spawn threads (sweeps) and use std maps where order does
//! not matter; it never reads the clock inside a run.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a driver: sweeps spawn threads"
)]

pub mod bugs;
pub mod check;
pub mod content;
pub mod report;
pub mod scenario;
pub mod sweep;
pub mod world;

pub use report::Report;
pub use scenario::Scenario;
pub use world::{Options, run};
