//! Per-device memory budgets of this process: bytes in use against the limit, reserved with
//! compare-and-swap so that concurrent allocations never overshoot, with no lock and no syscall.
//!
//! `used` counts everything the process holds on the device as far as the shim knows: its
//! tracked allocations plus `overhead`, the memory the driver holds for it outside any
//! allocation call (the context's reserve, loaded modules, memory pools' retained blocks).
//! The overhead is measured at context creation and re-measured near the limit (see
//! `context::true_up`).

use gpuslice_common::settings::Settings;
use std::sync::atomic::{AtomicU64, Ordering::*};

/// Devices beyond this ordinal are passed through untracked.
pub const MAX_DEVICES: usize = 64;
pub const UNLIMITED: u64 = u64::MAX;

pub struct DeviceBudget {
    used: AtomicU64,
    overhead: AtomicU64,
    limit: AtomicU64,
    refusals: AtomicU64,
}

/// Why an allocation was refused, with the figures the log line reports.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    pub used: u64,
    pub limit: u64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: DeviceBudget = DeviceBudget {
    used: AtomicU64::new(0),
    overhead: AtomicU64::new(0),
    limit: AtomicU64::new(UNLIMITED),
    refusals: AtomicU64::new(0),
};

static BUDGETS: [DeviceBudget; MAX_DEVICES] = [EMPTY; MAX_DEVICES];

/// The budget of device ordinal `device`, if it is one the shim tracks.
#[inline]
pub fn of(device: i32) -> Option<&'static DeviceBudget> {
    usize::try_from(device).ok().and_then(|d| BUDGETS.get(d))
}

pub fn apply_settings(settings: &Settings) {
    for (device, budget) in BUDGETS.iter().enumerate() {
        let limit = settings.memory_limit(device as u32).map_or(UNLIMITED, |l| l.value);
        budget.limit.store(limit, Relaxed);
    }
}

impl DeviceBudget {
    #[inline]
    pub fn limit(&self) -> Option<u64> {
        let l = self.limit.load(Relaxed);
        (l != UNLIMITED).then_some(l)
    }

    #[inline]
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    pub fn overhead(&self) -> u64 {
        self.overhead.load(Relaxed)
    }

    /// What memory queries report inside the quota, given the device's real total and free:
    /// `(total, free, used)` with total = min(limit, real total) and free = min(total − used,
    /// real free). `None` without a limit (the real figures stand). The one definition behind
    /// `cuMemGetInfo_v2`, `cuDeviceTotalMem_v2` and NVML's memory queries.
    pub fn quota_view(&self, real_total: u64, real_free: u64) -> Option<(u64, u64, u64)> {
        let limit = self.limit()?;
        let used = self.used();
        let total = limit.min(real_total);
        Some((total, total.saturating_sub(used).min(real_free), used))
    }

    /// Reserves `bytes` if that keeps use within the limit. Zero bytes always succeed, so that
    /// the driver, not the quota, answers a zero-size request.
    #[inline]
    pub fn try_charge(&self, bytes: u64) -> Result<(), Refusal> {
        let limit = self.limit.load(Relaxed);
        let mut used = self.used.load(Relaxed);
        loop {
            let next = used.saturating_add(bytes);
            if bytes != 0 && next > limit {
                self.refusals.fetch_add(1, Relaxed);
                return Err(Refusal { used, limit });
            }
            match self.used.compare_exchange_weak(used, next, AcqRel, Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    /// Adds bytes the process already holds, limit or not.
    #[inline]
    pub fn charge(&self, bytes: u64) {
        self.used.fetch_add(bytes, AcqRel);
    }

    /// Returns bytes; never wraps below zero.
    #[inline]
    pub fn uncharge(&self, bytes: u64) {
        let _ = self.used.fetch_update(AcqRel, Relaxed, |u| Some(u.saturating_sub(bytes)));
    }

    /// True when a request of `bytes` would bring use within a margin of the limit, where the
    /// untracked overhead is worth measuring again before deciding.
    #[inline]
    pub fn near_limit(&self, bytes: u64) -> bool {
        let limit = self.limit.load(Relaxed);
        if limit == UNLIMITED {
            return false;
        }
        let margin = (limit / 16).max(64 << 20);
        self.used().saturating_add(bytes).saturating_add(margin) > limit
    }

    /// Replaces the overhead estimate, moving `used` by the difference.
    pub fn set_overhead(&self, bytes: u64) {
        let old = self.overhead.swap(bytes, AcqRel);
        if bytes >= old {
            self.charge(bytes - old);
        } else {
            self.uncharge(old - bytes);
        }
    }

    /// Adds to the overhead (a new context's reserve).
    pub fn add_overhead(&self, bytes: u64) {
        self.overhead.fetch_add(bytes, AcqRel);
        self.charge(bytes);
    }

    /// Removes from the overhead (a context destroyed).
    pub fn remove_overhead(&self, bytes: u64) {
        let _ = self.overhead.fetch_update(AcqRel, Relaxed, |o| Some(o.saturating_sub(bytes)));
        self.uncharge(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: u64) -> DeviceBudget {
        let b = EMPTY;
        b.limit.store(limit, Relaxed);
        b
    }

    #[test]
    fn exact_at_the_limit_and_one_byte_over() {
        let b = budget(1000);
        b.try_charge(1000).unwrap();
        assert!(b.try_charge(1).is_err());
        b.try_charge(0).unwrap();
        b.uncharge(1000);
        assert!(b.try_charge(1001).is_err());
        assert_eq!(b.refusals.load(Relaxed), 2);
    }

    #[test]
    fn quota_view_is_bounded_by_limit_and_device() {
        assert_eq!(budget(UNLIMITED).quota_view(100, 50), None);
        let b = budget(1000);
        b.try_charge(300).unwrap();
        assert_eq!(b.quota_view(10_000, 5_000), Some((1000, 700, 300)));
        assert_eq!(b.quota_view(10_000, 200), Some((1000, 200, 300)), "the device's real free caps it");
        assert_eq!(b.quota_view(800, 5_000), Some((800, 500, 300)), "a limit above the card is the card");
        b.try_charge(700).unwrap();
        b.charge(50);
        assert_eq!(b.quota_view(10_000, 5_000), Some((1000, 0, 1050)), "over the limit: nothing free");
    }

    #[test]
    fn overhead_moves_used() {
        let b = budget(UNLIMITED);
        b.add_overhead(300);
        b.try_charge(100).unwrap();
        b.set_overhead(500);
        assert_eq!(b.used(), 600);
        b.set_overhead(0);
        assert_eq!(b.used(), 100);
        b.uncharge(1000);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn threads_never_overshoot() {
        let b = std::sync::Arc::new(budget(100_000));
        let granted: u64 = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| b.try_charge(7).is_ok()).count() as u64 * 7)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(granted, b.used());
        assert!(b.used() <= 100_000);
        assert!(b.used() > 100_000 - 7);
    }
}
