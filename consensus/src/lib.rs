//! mycel-consensus: the management quorum as a sans-IO core.
//!
//! - [`command`]: the versioned [`Command`](command::Command) enum and proposals.
//! - [`state`]: the cluster state machine.
//! - [`log`]: Raft log storage behind a trait, with a crashable in-memory backend.
//! - [`core`]: raft-rs's `RawNode` with the Ready loop written once, deterministic
//!   election timeouts (drawn from the core's seeded RNG, not raft-rs's `thread_rng`),
//!   snapshots whose data is the CID of a state object, and membership reconciliation.
//! - [`heal`]: self-healing and leader-preference decisions (replacing a lost voter with an
//!   eligible member, moving leadership to a manager with a clearly lower round-trip time).
//! - [`topology`]: topology files for routers: the rules for staging (signature, permission,
//!   schema, base), activation, canaries and rollback, what each router applies, and the
//!   leader's activation decisions.

pub mod command;
pub mod core;
pub mod heal;
pub mod log;
pub mod state;
pub mod topology;

#[cfg(test)]
mod harness;

pub use crate::core::{Config, Core, FatalError, Output, ProposeError, Timestamp};
