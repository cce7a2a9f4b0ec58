//! mycel-policy: pure decisions from committed configuration and observed state.
//!
//! - [`access`]: who may `read`, `publish` or administer a namespace, from grants.
//! - [`placement`]: a stable suitability ranking of nodes for a pin (weighted rendezvous
//!   hashing over capacity, load, latency), constraints, and spread across zones.
//! - [`plan`]: desired pins against observed holdings give per-node actions (fetch, keep,
//!   release), with hysteresis between a pin's minimum and maximum replicas, work that
//!   moves off lost or overloaded nodes, load balancing and pre-positioning deadlines.
//! - [`budget`]: storage watermarks and oldest-first eviction of unpinned cache.
//!
//! Nothing here reads a clock, a file or a socket: callers pass `now` and views, and the
//! same inputs always give the same decision, so the daemon and the simulator agree.

pub mod access;
pub mod budget;
pub mod placement;
pub mod plan;
pub mod topology;
