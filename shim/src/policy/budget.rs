//! Device memory budgets: bytes in use against the limits that apply to this process on one
//! device — its group's limit, and its own cap inside the group — reserved with
//! compare-and-swap on the group's counter in the ledger, with no lock and no syscall.
//!
//! A process's `used` counts everything it holds on the device as far as the shim knows: its
//! tracked allocations plus `overhead`, the memory the driver holds for it outside any
//! allocation call (the context's reserve, loaded modules, memory pools' retained blocks).
//! The overhead is measured at context creation and re-measured near the limit (see
//! `charge::true_up`). The protocol that keeps the group's counter exact across processes,
//! including killed ones, is in `gpuslice_common::ledger`.

use crate::state::link;
use crate::sys::ffi::CUdevice;
use gpuslice_common::ledger::{GroupSlot, MemberSettings, ProcessSlot, UNLIMITED};
pub use gpuslice_common::ledger::{Refusal, Scope};
use std::sync::atomic::Ordering::*;

/// The budget of one device for this process: a view into the ledger.
#[derive(Clone, Copy)]
pub struct Budget {
    group: &'static GroupSlot,
    /// The group's published settings (read-only; the same slot as `group` when alone).
    settings: &'static GroupSlot,
    /// The controller's per-member page (read-only): the group's penalty counts as used.
    members: &'static MemberSettings,
    process: &'static ProcessSlot,
    index: usize,
}

/// The budget of CUDA device `device`, if it is one the shim tracks. Attaches the process on
/// its first call (`link::get_or_attach`: registers with the controller, or sets up alone).
#[inline]
pub fn of(device: CUdevice) -> Option<Budget> {
    of_link(link::get_or_attach()?, device)
}

/// The budget of CUDA device `device` in a given link (NVML's hooks in a process that has not
/// attached through CUDA hold a link of their own).
#[inline]
pub fn of_link(link: &'static link::Link, device: CUdevice) -> Option<Budget> {
    Some(Budget { group: link.group, settings: link.settings, members: link.members, process: link.process, index: link.index(device)? })
}

impl Budget {
    /// The tighter of the group's limit and this process's cap, if either is set.
    #[inline]
    pub fn limit(&self) -> Option<u64> {
        let l = self.settings.devices[self.index].limit.load(Relaxed).min(self.process.devices[self.index].limit.load(Relaxed));
        (l != UNLIMITED).then_some(l)
    }

    pub fn overhead(&self) -> u64 {
        self.process.devices[self.index].overhead.load(Relaxed)
    }

    /// (used, room left) under whichever limit binds: the group's, or this process's own cap
    /// when that is the tighter.
    fn usage(&self) -> (u64, u64) {
        let g = &self.group.devices[self.index];
        let p = &self.process.devices[self.index];
        let group_limit = self.settings.devices[self.index].limit.load(Relaxed);
        let (group_used, own_used) = (g.used.load(Relaxed).saturating_add(self.members.penalty(self.index)), p.used.load(Relaxed));
        let group_room = group_limit.saturating_sub(group_used);
        let own_room = p.limit.load(Relaxed).saturating_sub(own_used);
        if p.limit.load(Relaxed) < group_limit {
            (own_used, own_room.min(group_room))
        } else {
            (group_used, group_room.min(own_room))
        }
    }

    /// What memory queries report inside the quota, given the device's real total and free:
    /// `(total, free, used)` with total = min(limit, real total), free = min(room under the
    /// limits, real free) and used what the binding limit counts. `None` without a limit (the
    /// real figures stand). The one definition behind `cuMemGetInfo_v2`,
    /// `cuDeviceTotalMem_v2` and NVML's memory queries.
    pub fn quota_view(&self, real_total: u64, real_free: u64) -> Option<(u64, u64, u64)> {
        let total = self.limit()?.min(real_total);
        let (used, room) = self.usage();
        Some((total, room.min(real_free).min(total), used))
    }

    /// Reserves `bytes` if that keeps use within the limits. Zero bytes always succeed, so that
    /// the driver, not the quota, answers a zero-size request.
    #[inline]
    pub fn try_charge(&self, bytes: u64) -> Result<(), Refusal> {
        self.process.try_charge_under(self.group, self.settings, self.members.penalty(self.index), self.index, bytes)
    }

    /// Returns bytes; never below zero.
    #[inline]
    pub fn uncharge(&self, bytes: u64) {
        self.process.uncharge(self.group, self.index, bytes)
    }

    /// True when a request of `bytes` would bring use within a margin of a limit, where the
    /// untracked overhead is worth measuring again before deciding.
    #[inline]
    pub fn near_limit(&self, bytes: u64) -> bool {
        let Some(limit) = self.limit() else { return false };
        let margin = (limit / 16).max(64 << 20);
        bytes.saturating_add(margin) > self.usage().1
    }

    /// Replaces the overhead estimate, moving `used` by the difference.
    pub fn set_overhead(&self, bytes: u64) {
        self.process.set_overhead(self.group, self.index, bytes)
    }

    /// Adds to the overhead (a new context's reserve).
    pub fn add_overhead(&self, bytes: u64) {
        self.process.add_overhead(self.group, self.index, bytes)
    }

    /// Removes from the overhead (a context destroyed).
    pub fn remove_overhead(&self, bytes: u64) {
        self.process.remove_overhead(self.group, self.index, bytes)
    }
}
