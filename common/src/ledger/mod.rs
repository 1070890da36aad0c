//! The ledger: one fixed-layout, versioned memory region shared by the controller and every
//! shim, where limits are read and bytes and device time are counted with atomics.
//!
//! The layout is `#[repr(C)]` and mirrored field for field in `include/gpuslice.h`
//! (`gpuslice_ledger_header`, `gpuslice_group_slot`, `gpuslice_process_slot`, ...); a test
//! compiles the header and compares every offset. Geometry (how many devices, groups and
//! processes) is written in the header, and every map checks magic, layout version and size
//! before anything else is read.
//!
//! ```text
//! offset 0       Header           (4 KiB)
//! devices_offset DeviceSlot  × max_devices   (64 B each: which GPU a device index means)
//! groups_offset  GroupSlot   × max_groups    (limits, share, priority; the group's counters)
//! procs_offset   ProcessSlot × max_procs     (one per registered process; its own counters)
//! ```
//!
//! # Exact accounting across processes
//! A group's `used` is what the limit is checked against: an allocation reserves bytes with one
//! compare-and-swap on it, so processes allocating at the same instant can never overshoot. Each
//! process also counts what it holds in its own slot, so that the controller can take a dead
//! process's bytes back. The two counters are updated inside an *operation window* (the
//! process's `ops` word is odd while one is open). To return a dead process's bytes the
//!
//! The code is split by job: `layout` (the `#[repr(C)]` structs, constants and plain slot
//! helpers), `sched` (the cross-group device state: priority slots and turns), `file` (creating,
//! adopting and mapping a ledger), `regions` (which memfd each page comes from: what a tenant
//! can reach), `accounting` (operation windows, charges and reconciliation), `proc` (what
//! `/proc` says about a pid).

mod accounting;
mod file;
mod layout;
mod proc;
mod regions;
mod sched;

pub use accounting::{Refusal, Scope};
pub use file::{Ledger, LedgerError};
pub use layout::*;
pub use proc::{process_start_time, process_uid};
pub use regions::{holds_memory, inode, read_only, sealed_memfd, KnownDevice, Reclaimed, SettingsPage, SETTINGS_SIZE};
pub use sched::{DeviceSched, HighSlot, Turn, MAX_HIGH};

/// CLOCK_MONOTONIC in nanoseconds (vDSO: no system call). Shared by all processes of a host.
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
