//! How a hooked call waits at a closed gate (`sys::gate`): kept apart from the gate itself,
//! which branch i22gate replaces whole at merge.

use std::time::Duration;

/// How often a waiting call looks again: the gate is closed for a suspension (seconds at
/// least), so a millisecond's delay after `open` costs nothing, and no futex word is needed
/// from the gate's API.
const POLL: Duration = Duration::from_millis(1);

/// Blocks the calling thread until the gate opens.
#[cold]
pub fn wait_while_closed() {
    while crate::sys::gate::is_closed() {
        std::thread::sleep(POLL);
    }
}
