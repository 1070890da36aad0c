//! The order of the fork handlers (`sys::atfork` runs them): each module that owns state
//! across `fork()` declares its `FORK` handlers next to that state; this list only orders them.
//!
//! Prepare takes locks in this order, which agrees with every nesting in the code (sched →
//! throttle → cost → context → allocation tables and modules → imports → NVML → the event
//! pool and the gate's thread records, leaves), so no two threads can deadlock on them. The child's forgetting (atomics only)
//! runs in the same order; `link` comes last: it bumps the fork generation that `sched`
//! compares, after everything else of the parent's is gone.

use crate::hooks::{charge, context, modules, sharing, suspend_agent};
use crate::policy::{board, cost, flight_cost, sched, slicer, throttle};
use crate::state::{link, vmm_ranges};
use crate::sys::atfork::{self, Handlers};
use crate::sys::{events, gate, real_nvml};

static ORDER: [Handlers; 16] = [
    slicer::FORK,
    sched::FORK,
    flight_cost::FORK,
    throttle::FORK,
    cost::FORK,
    context::FORK,
    modules::FORK,
    charge::FORK,
    vmm_ranges::FORK,
    suspend_agent::FORK,
    sharing::FORK,
    real_nvml::FORK,
    events::FORK,
    gate::FORK,
    board::FORK,
    link::FORK,
];

/// Gives `sys::atfork` the order (at `cuInit`, before the link attaches and installs the
/// handlers; idempotent).
pub fn register() {
    atfork::register(&ORDER);
}

#[cfg(test)]
mod tests {
    /// Every module that declares its fork handlers is in `ORDER` (a `FORK` left out would be
    /// the silent bug that registration is meant to rule out).
    #[test]
    fn every_declared_fork_handler_is_ordered() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let order = std::fs::read_to_string(src.join("hooks/fork.rs")).unwrap();
        let order = &order[order.find("static ORDER").unwrap()..];
        let order = &order[..order.find("];").unwrap()];
        let mut declared = Vec::new();
        for layer in ["hooks", "policy", "state", "sys"] {
            for entry in std::fs::read_dir(src.join(layer)).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if text.lines().any(|l| l.starts_with("pub const FORK: ")) {
                    declared.push(path.file_stem().unwrap().to_string_lossy().into_owned());
                }
            }
        }
        declared.sort();
        assert!(declared.len() >= 10, "the ten modules of today at least: {declared:?}");
        for module in &declared {
            assert!(order.contains(&format!("{module}::FORK")), "{module} declares FORK but hooks/fork.rs does not order it");
        }
    }
}
