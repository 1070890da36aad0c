//! The duration budget (issue 19): while a high-priority process lives on the device, a
//! lower-priority one may keep up to `GPUSLICE_PRIORITY_BUDGET_US` of estimated device time in
//! flight instead of a fixed number of launches (`GPUSLICE_PRIORITY_QUEUE`): short kernels keep
//! the device busy, a kernel longer than the budget goes alone (nothing here splits it; see
//! `slicer` for what can be split). A launch's estimate is the upper median (`median`) of its
//! shape's measured times (`cost::kernel_key`): `sched` records timing events after each launch,
//! and a launch that was queued behind the previous one took the time between their events. A
//! shape not measured yet counts as the whole budget, so it goes alone.

use crate::sys::locks;
use crate::sys::median::Median;
use once_cell::sync::{Lazy, OnceCell};
use std::collections::HashMap;
use std::sync::Mutex;

/// `GPUSLICE_PRIORITY_BUDGET_US`: microseconds of estimated device time in flight; unset, the
/// launch count of `GPUSLICE_PRIORITY_QUEUE` bounds the queue instead.
pub const ENV_BUDGET: &str = "GPUSLICE_PRIORITY_BUDGET_US";
/// Most launches in flight under a budget, however short they are.
pub const MAX_IN_FLIGHT: usize = 64;
/// Shapes remembered; past this the table starts over (a program with endless shapes).
const MAX_SHAPES: usize = 4096;

/// The budget in ns, if one is set (read once).
pub fn budget_ns() -> Option<u64> {
    static BUDGET: OnceCell<Option<u64>> = OnceCell::new();
    *BUDGET.get_or_init(|| {
        let v = std::env::var(ENV_BUDGET).ok()?;
        match v.trim().parse::<u64>() {
            Ok(us) if us > 0 => Some(us * 1000),
            _ => {
                tracing::warn!("{ENV_BUDGET}={v:?} is not a positive number of microseconds; the launch count bounds the queue");
                None
            }
        }
    })
}

static ESTIMATES: Lazy<Mutex<HashMap<u64, Median>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Its lock, for a fork (`sys::atfork`): a leaf, held only around one estimate's update.
pub const FORK: crate::sys::atfork::Handlers =
    crate::sys::atfork::Handlers { prepare: |h| h.take(&ESTIMATES, crate::sys::atfork::keep), in_child: crate::sys::atfork::nothing_to_forget };

/// What a launch of shape `key` is expected to take; the whole `budget` when not measured yet.
pub fn estimate(key: u64, budget: u64) -> u64 {
    locks::lock(&ESTIMATES).get(&key).and_then(Median::get).unwrap_or(budget)
}

/// A launch of shape `key` took `ns` on the device.
pub fn learn(key: u64, ns: u64) {
    let mut estimates = locks::lock(&ESTIMATES);
    if estimates.len() >= MAX_SHAPES && !estimates.contains_key(&key) {
        estimates.clear();
    }
    estimates.entry(key).or_default().push(ns);
}

/// Whether a launch estimated at `next` fits beside `in_flight` launches estimated at `sum` in
/// all: the first always does; then as long as the budget and `MAX_IN_FLIGHT` allow.
pub fn fits(in_flight: usize, sum: u64, next: u64, budget: u64) -> bool {
    in_flight == 0 || (in_flight < MAX_IN_FLIGHT && sum.saturating_add(next) <= budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_kernels_share_the_budget_and_a_long_one_goes_alone() {
        assert!(fits(0, 0, 5_000_000, 100_000), "the first launch always goes");
        assert!(fits(4, 80_000, 20_000, 100_000));
        assert!(!fits(5, 100_000, 20_000, 100_000));
        assert!(!fits(1, 20_000, 2_000_000, 100_000), "a 2 ms kernel waits until it is alone");
        assert!(!fits(MAX_IN_FLIGHT, 0, 0, 100_000));
    }

    #[test]
    fn an_unmeasured_shape_counts_as_the_whole_budget() {
        assert_eq!(estimate(0xdead_0001, 100_000), 100_000);
        learn(0xdead_0001, 20_000);
        learn(0xdead_0001, 21_000);
        assert_eq!(estimate(0xdead_0001, 100_000), 21_000);
    }
}
