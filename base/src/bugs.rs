//! Planted bugs (feature `sim-bugs`, simulator only): one word of runtime switches that the
//! cores read to break themselves on purpose, so the simulator's checkers can prove they
//! fail. Each core defines its switches' bits (the data plane 0 to 3, the consensus core 4 to
//! 7, the node core 8 and up); the simulator sets the word. Switches are per
//! thread, so a sweep running seeds on several threads keeps them apart.

use std::cell::Cell;

thread_local! {
    static SWITCHES: Cell<u32> = const { Cell::new(0) };
}

/// Sets the switches of this thread (a bitwise or of the cores' constants).
pub fn set(switches: u32) {
    SWITCHES.with(|s| s.set(switches));
}

/// Whether `switch` is on in this thread.
pub fn on(switch: u32) -> bool {
    SWITCHES.with(|s| s.get() & switch != 0)
}
