//! mycel-core: one node's behaviour between the four cores, as sans-IO state machines and
//! pure decisions that both drivers call, so the simulator runs the rules the daemon runs.
//!
//! - [`access`]: every serving decision: who may read a root, under which namespace, and
//!   whether a manifest block asked for under a root belongs to its tree.
//! - [`cluster`]: the frames of `/mycel/cluster/1` and the cluster client: proposals
//!   proposed locally or forwarded to the leader, redirected, retried, deduplicated by the
//!   state machine, and answered once applied; a manager's checks on proposals it receives.
//! - [`replicate`]: the replication worker's inputs (pins in the plan's shape).
//! - [`addrs`]: the address book: which addresses a node knows for each member, learned
//!   from every source (configuration, identify, connections, the committed member list),
//!   kept across restarts, and when to dial each one again (backoff per peer).
//!
//! Nothing here touches sockets, files, the clock or OS randomness: drivers pass the time
//! in ([`Timestamp`]) and carry out what comes back. The rest of a node's logic (following
//! the configuration, who-has and want routing, the replication worker,
//! router applies) moves here next; `docs/architecture.md` says what is where today.

pub mod access;
pub mod addrs;
#[cfg(feature = "sim-bugs")]
pub mod bugs;
pub mod cluster;
pub mod replicate;

pub use mycel_base::{PeerId, Timestamp};
