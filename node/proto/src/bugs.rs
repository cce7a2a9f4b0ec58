//! Planted bugs of the data plane (feature `sim-bugs`, simulator only): its switches in the
//! shared word of [`mycel_base::bugs`] (bits 0 to 3).

pub use mycel_base::bugs::{on, set};

/// [`crate::fetch::Fetch`] accepts blocks whose bytes do not match their CID.
pub const SKIP_CID_CHECK: u32 = 1 << 0;
