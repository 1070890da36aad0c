//! The gate every hooked entry point passes: closed by the suspend agent while the process's
//! device memory is on the host (issue 22). MINIMAL VERSION, replaced by branch i22gate at
//! merge (thunks for every driver name, the drain, `membarrier`); keep other code out of here.

use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::Duration;

static CLOSED: AtomicBool = AtomicBool::new(false);

/// The gate could not be closed in time (calls still inside the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateBusy;

/// Closes the gate: calls arriving from now on wait until `open`. This minimal version does
/// not wait for calls already inside the driver (i22gate's drain does), so it never fails.
pub fn close(_timeout: Duration) -> Result<(), GateBusy> {
    CLOSED.store(true, SeqCst);
    Ok(())
}

/// Opens the gate: waiting calls go on.
pub fn open() {
    CLOSED.store(false, SeqCst);
}

/// True while the gate is closed (one load: the hot path's cost).
#[inline(always)]
pub fn is_closed() -> bool {
    CLOSED.load(Acquire)
}

/// True when every entry point the process can reach passes the gate. This version gates the
/// hooked entry points only, and says yes (i22gate counts names it has no thunk for).
pub fn fast_suspendable() -> bool {
    true
}
