//! Planted bugs of the node core (feature `sim-bugs`, simulator only): its switches in the
//! shared word of [`mycel_base::bugs`] (bits 8 and up; the data plane uses the low ones).

pub use mycel_base::bugs::{on, set};

/// The cluster client settles a forwarded proposal as applied when a manager answers that
/// it does not lead, before anything reached the log.
pub const ACK_BEFORE_APPLY: u32 = 1 << 8;

/// The follower skips the second entry of every answer (advancing its index as if applied).
pub const FOLLOW_SKIPS_ENTRY: u32 = 1 << 9;
