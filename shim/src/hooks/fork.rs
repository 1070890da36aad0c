//! The order of the fork handlers (`sys::atfork` runs them): each module that owns state
//! across `fork()` declares its `FORK` handlers next to that state; this list only orders them.
//!
//! Prepare takes locks in this order, which agrees with every nesting in the code (sched →
//! throttle → cost → context → allocation tables and modules → imports → NVML), so no two
//! threads can deadlock on them. The child's forgetting (atomics only) runs in the same order;
//! `link` comes last: it bumps the fork generation that `sched` compares, after everything else
//! of the parent's is gone.

use crate::hooks::{context, memory, sharing};
use crate::policy::{board, cost, sched, throttle};
use crate::state::link;
use crate::sys::atfork::{self, Handlers};
use crate::sys::real_nvml;

static ORDER: [Handlers; 9] = [sched::FORK, throttle::FORK, cost::FORK, context::FORK, memory::FORK, sharing::FORK, real_nvml::FORK, board::FORK, link::FORK];

/// Gives `sys::atfork` the order (at `cuInit`, before the link attaches and installs the
/// handlers; idempotent).
pub fn register() {
    atfork::register(&ORDER);
}
