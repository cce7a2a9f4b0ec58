//! mycel-proto: the data plane as a sans-IO core.
//!
//! - [`wire`]: the frames of `/mycel/exchange/1` and the gossip announcement, versioned and
//!   bounded.
//! - [`announce`]: periodic digests of what a node holds, and the directory of who holds
//!   what, built from announcements and who-has answers.
//! - [`fetch`]: one object fetched from every peer that holds it at once: want lists,
//!   per-peer windows sized by delivered rate, same-zone preference, timeouts, retries,
//!   penalties, failover and resume from what is stored.
//!
//! Nothing here touches sockets, files or the clock: the node daemon and the simulator
//! feed inputs with the current [`Timestamp`] and carry out the returned actions.

pub mod announce;
#[cfg(feature = "sim-bugs")]
pub mod bugs;
pub mod fetch;
pub mod wire;

pub use mycel_base::{PeerId, Timestamp};
