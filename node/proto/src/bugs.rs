//! Planted bugs (feature `sim-bugs`, simulator only): runtime switches that break the data
//! plane on purpose so the simulator's checkers can prove they fail. Switches are per
//! thread, so a sweep running seeds on several threads keeps them apart.

use std::cell::Cell;

/// [`crate::fetch::Fetch`] accepts blocks whose bytes do not match their CID.
pub const SKIP_CID_CHECK: u32 = 1 << 0;

thread_local! {
    static SWITCHES: Cell<u32> = const { Cell::new(0) };
}

/// Sets the switches of this thread (a bitwise or of the constants above).
pub fn set(switches: u32) {
    SWITCHES.with(|s| s.set(switches));
}

/// Whether `switch` is on in this thread.
pub fn on(switch: u32) -> bool {
    SWITCHES.with(|s| s.get() & switch != 0)
}
