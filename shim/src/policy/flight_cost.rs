//! The duration budget (issue 19): while a high-priority process lives on the device, a
//! lower-priority one may keep up to `GPUSLICE_PRIORITY_BUDGET_US` of estimated device time in
//! flight instead of a fixed number of launches (`GPUSLICE_PRIORITY_QUEUE`): short kernels keep
//! the device busy, a kernel longer than the budget goes alone (nothing here splits it; see
//! `slicer` for what can be split). A launch's estimate is the upper median (`median`) of its
//! shape's measured times (`cost::kernel_key`): `sched` records timing events after each launch,
//! and a launch that was queued behind the previous one took the time between their events. A
//! shape not measured yet counts as the whole budget, so it goes alone.
//!
//! The budget counts what is *left* of the oldest launch (its estimate less the time since it
//! began), not its whole estimate: that is what a request arriving now would wait behind. So the
//! next launch goes out just before the oldest ends (`Room::At`) instead of after it, and the
//! program's own time between launches (PyTorch's, per operator) overlaps the device's work
//! instead of leaving the device idle after every kernel longer than the budget's slack.

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

/// `GPUSLICE_PRIORITY_ANTICIPATE`: `on` (the default) or `off`. On, under a budget, a launch
/// whose work would still run when a high-priority process's next request is due (`period`: its
/// requests keep time) waits for that request instead (`sched`).
pub const ENV_ANTICIPATE: &str = "GPUSLICE_PRIORITY_ANTICIPATE";

/// `GPUSLICE_PRIORITY_STRETCH`: `off` (the default) or `on` (experimental, issue 19). On,
/// under a budget and anticipation, while *every* live high-priority process on the device
/// publishes when its next request is due, the budget stretches to most of the time until
/// then (`stretched`): a neighbour keeps enough work queued to cover its own host pauses (a
/// framework's per-operator time, an optimizer step) between requests, and anticipation still
/// ends it before the request.
pub const ENV_STRETCH: &str = "GPUSLICE_PRIORITY_STRETCH";
/// Most a stretched budget reaches. Windows are words in shared memory that tenants can
/// write; whatever one says, a request that came early waits behind this much at most.
pub const STRETCH_CAP_NS: u64 = 4_000_000;

/// Whether the budget stretches to the next request's window (read once; off unless `on`).
pub fn stretches() -> bool {
    static ON: OnceCell<bool> = OnceCell::new();
    *ON.get_or_init(|| crate::sys::on_off::off_unless_on(ENV_STRETCH, "stretching the budget"))
}

/// The budget at `now` with the next request expected from `window_from`: seven eighths of the
/// time until then (estimates are upper medians, but a queue of them can still run long; the
/// eighth left is its guard, and anticipation's `ends_at` check stays on top), at most
/// `STRETCH_CAP_NS`, never less than `budget`.
pub fn stretched(budget: u64, now: u64, window_from: u64) -> u64 {
    let lead = window_from.saturating_sub(now);
    budget.max((lead / 8 * 7).min(STRETCH_CAP_NS))
}

/// Whether launches under a budget keep clear of a high-priority process's next request (read
/// once; anything but `on` or `off` is warned about and counts as `on`).
pub fn anticipates() -> bool {
    static ON: OnceCell<bool> = OnceCell::new();
    *ON.get_or_init(|| crate::sys::on_off::on_unless_off(ENV_ANTICIPATE, "anticipation"))
}

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

/// What a launch of shape `key` is expected to take; `None` when not measured yet (the caller
/// counts it as the whole budget).
pub fn estimate(key: u64) -> Option<u64> {
    locks::lock(&ESTIMATES).get(&key).and_then(Median::get)
}

/// A launch of shape `key` took `ns` on the device.
pub fn learn(key: u64, ns: u64) {
    let mut estimates = locks::lock(&ESTIMATES);
    if estimates.len() >= MAX_SHAPES && !estimates.contains_key(&key) {
        estimates.clear();
    }
    estimates.entry(key).or_default().push(ns);
}

/// When a launch estimated at `next` may go out beside the launches in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Now: nothing in flight, or what is left of it and `next` fit the budget.
    Now,
    /// At this time (ns), when what is left of the oldest launch, by its estimate, makes room.
    At(u64),
    /// Only once the oldest launch has ended (the others and `next` alone overflow the budget,
    /// or `MAX_IN_FLIGHT` launches are in flight).
    AfterOldest,
}

/// Where a launch estimated at `next` stands beside launches in flight estimated at
/// `estimates` (oldest first), at time `now`, under `budget`. `oldest_began`: when the oldest
/// began (ns; a time at or after the device's own start, so that what is left of it is not
/// understated), or `None` when its estimate is a guess (a shape not measured yet), which
/// counts whole until it ends: a guess that ran out must not let launches in.
pub fn room(estimates: impl ExactSizeIterator<Item = u64>, oldest_began: Option<u64>, now: u64, next: u64, budget: u64) -> Room {
    let in_flight = estimates.len();
    let mut estimates = estimates;
    let Some(oldest) = estimates.next() else { return Room::Now };
    if in_flight >= MAX_IN_FLIGHT {
        return Room::AfterOldest;
    }
    let others = estimates.fold(0u64, u64::saturating_add).saturating_add(next);
    let Some(slack) = budget.checked_sub(others) else { return Room::AfterOldest };
    let Some(began) = oldest_began else {
        return if oldest <= slack { Room::Now } else { Room::AfterOldest };
    };
    // The oldest leaves `slack` of it to run at this time.
    let when = began.saturating_add(oldest).saturating_sub(slack);
    if now >= when {
        Room::Now
    } else {
        Room::At(when)
    }
}

/// When a launch estimated at `next` would end if it went out at `now` behind launches in flight
/// estimated at `estimates` (oldest first; `oldest_began` as for `room`: `None` counts the
/// oldest whole).
pub fn ends_at(estimates: impl Iterator<Item = u64>, oldest_began: Option<u64>, now: u64, next: u64) -> u64 {
    let mut estimates = estimates;
    let Some(oldest) = estimates.next() else { return now.saturating_add(next) };
    let left = oldest_began.map_or(oldest, |began| oldest.saturating_sub(now.saturating_sub(began)));
    estimates.fold(now.saturating_add(left), u64::saturating_add).saturating_add(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_ends_after_what_is_left_in_flight_and_itself() {
        assert_eq!(ends_at([].into_iter(), None, 1_000, 20), 1_020);
        // A 500 µs kernel began at 1 ms; at 1.3 ms 200 µs of it are left, then 20 + 30.
        assert_eq!(ends_at([500_000, 20_000].into_iter(), Some(1_000_000), 1_300_000, 30_000), 1_550_000);
        // Past its estimate it counts as ending now; a guess counts whole.
        assert_eq!(ends_at([500_000].into_iter(), Some(0), 9_000_000, 10), 9_000_010);
        assert_eq!(ends_at([500_000].into_iter(), None, 9_000_000, 10), 9_500_010);
        assert_eq!(ends_at([u64::MAX].into_iter(), None, 9, 10), u64::MAX);
    }

    fn at(estimates: &[u64], began: u64, now: u64, next: u64) -> Room {
        room(estimates.iter().copied(), Some(began), now, next, 100_000)
    }

    #[test]
    fn short_kernels_share_the_budget_and_a_long_one_goes_alone() {
        assert_eq!(at(&[], 0, 0, 5_000_000), Room::Now, "the first launch always goes");
        assert_eq!(at(&[20_000; 4], 0, 0, 20_000), Room::Now, "five 20 µs kernels fill 100 µs");
        assert_eq!(at(&[20_000; 5], 0, 0, 20_000), Room::At(20_000), "a sixth when the oldest ends");
        assert_eq!(at(&[20_000], 0, 0, 2_000_000), Room::AfterOldest, "a 2 ms kernel waits until it is alone");
        assert_eq!(at(&[0; MAX_IN_FLIGHT], 0, 0, 0), Room::AfterOldest);
    }

    #[test]
    fn the_next_launch_goes_out_as_the_oldest_nears_its_end() {
        // A 500 µs kernel began at 1 ms; a 20 µs one may join it when 80 µs of it are left.
        assert_eq!(at(&[500_000], 1_000_000, 1_000_000, 20_000), Room::At(1_420_000));
        assert_eq!(at(&[500_000], 1_000_000, 1_419_999, 20_000), Room::At(1_420_000));
        assert_eq!(at(&[500_000], 1_000_000, 1_420_000, 20_000), Room::Now);
        // Behind it, a queued 20 µs kernel takes its part of the budget first.
        assert_eq!(at(&[500_000, 20_000], 1_000_000, 1_000_000, 20_000), Room::At(1_440_000));
        // Past its estimate the oldest counts as ending now, never as less than nothing.
        assert_eq!(at(&[500_000, 60_000], 1_000_000, 9_000_000, 40_000), Room::Now);
        assert_eq!(at(&[500_000, 60_000], 1_000_000, 9_000_000, 40_001), Room::AfterOldest);
    }

    #[test]
    fn a_guessed_estimate_counts_whole_until_its_launch_ends() {
        // A shape not measured yet counts as the budget; it may be a 2 ms kernel: however long
        // it has run, nothing joins it (measured 1 µs kernels would otherwise stream in).
        assert_eq!(room([100_000].into_iter(), None, 9_000_000, 1_000, 100_000), Room::AfterOldest);
        assert_eq!(room([40_000, 20_000].into_iter(), None, 0, 20_000, 100_000), Room::Now, "whole, it fits");
    }

    #[test]
    fn a_stretched_budget_is_most_of_the_lead_within_its_bounds() {
        // 3.2 ms to the window: 2.8 ms may be queued.
        assert_eq!(stretched(400_000, 1_000_000, 4_200_000), 2_800_000);
        // Never under the budget: a window near or passed leaves the budget as it is.
        assert_eq!(stretched(400_000, 1_000_000, 1_200_000), 400_000);
        assert_eq!(stretched(400_000, 9_000_000, 1_000_000), 400_000);
        // A window far ahead (a tenant may write any) stretches it to the cap only.
        assert_eq!(stretched(400_000, 0, u64::MAX), STRETCH_CAP_NS);
        assert_eq!(stretched(5_000_000, 0, 100_000_000), 5_000_000);
    }

    #[test]
    fn an_unmeasured_shape_counts_as_the_whole_budget() {
        assert_eq!(estimate(0xdead_0001), None);
        learn(0xdead_0001, 20_000);
        learn(0xdead_0001, 21_000);
        assert_eq!(estimate(0xdead_0001), Some(21_000));
    }
}
