//! MPS as a spatial mode: when an MPS daemon serves this process, its priority class becomes
//! MPS's client priority and its SM share MPS's active-thread percentage.
//!
//! Under MPS every client's kernels run inside one hardware context, so a high-priority request
//! pays no context switch (about 0.13 ms on the H200 under time-slicing) and the block scheduler
//! prefers the higher client priority as soon as SMs free up. `sched`'s launch gating stays on
//! top: lower-priority processes still hold back while a high-priority one is busy, unless
//! `GPUSLICE_PRIORITY_GATE=spatial-off` (or `auto`, while the high-priority processes' requests
//! are host-bound) and the device is spatial here (see `sched::gate_off`).
//!
//! Which daemon, if any, a process goes to is `mps_pipe`'s business (the controller's per-GPU
//! daemons, issue 19); a daemon the environment names, or `/tmp/nvidia-mps`'s, serves it too.
//!
//! MPS reads its variables from the client's environment when the driver starts and when a
//! context is made, so the shim writes them just before each (`before_init`,
//! `context_created`), and only when the user has not set them. Once a context exists, MPS's
//! settings are fixed for it: a share edited later by the controller does not move the
//! active-thread percentage.

use crate::state::link::{self, MAX_ORDINALS};
use crate::sys::driver::driver;
use crate::sys::ffi::*;
use gpuslice_common::ledger::Priority;
use gpuslice_common::settings::{MpsMode, PriorityGate, Settings, ENV_PRIORITY_GATE};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::*};

const CLIENT_PRIORITY: &str = "CUDA_MPS_CLIENT_PRIORITY";
const ACTIVE_THREADS: &str = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE";
const PIPE_DIRECTORY: &str = "CUDA_MPS_PIPE_DIRECTORY";
const DEFAULT_PIPE_DIRECTORY: &str = "/tmp/nvidia-mps";
/// `CU_DEVICE_ATTRIBUTE_MPS_ENABLED`: contexts made on the device are shared through MPS.
const ATTRIBUTE_MPS_ENABLED: i32 = 133;

/// Per device: not looked at yet, time-sliced (no MPS), or under MPS; `SPATIAL` when the
/// active-thread percentage carries the share (the time throttle then stands aside).
const UNKNOWN: u8 = 0;
const TIME_SLICED: u8 = 1;
const UNDER_MPS: u8 = 2;
const SPATIAL: u8 = 3;
static DEVICE_MODE: [AtomicU8; MAX_ORDINALS] = [const { AtomicU8::new(UNKNOWN) }; MAX_ORDINALS];

/// Set at the first look: the user's own MPS variables, which the shim never overrides.
static USER_PRIORITY: AtomicBool = AtomicBool::new(false);
static USER_ACTIVE_THREADS: AtomicBool = AtomicBool::new(false);
static LOOKED: std::sync::Once = std::sync::Once::new();

/// True when `device`'s SM share is carried by MPS's active-thread percentage: the throttle
/// leaves its launches alone.
#[inline]
pub fn spatial(device: CUdevice) -> bool {
    usize::try_from(device).ok().and_then(|d| DEVICE_MODE.get(d)).is_some_and(|m| m.load(Relaxed) == SPATIAL)
}

/// True when MPS serves `device` for this process (one hardware context for all its clients:
/// no switch between processes' contexts there).
#[inline]
pub fn served_by_mps(device: CUdevice) -> bool {
    usize::try_from(device).ok().and_then(|d| DEVICE_MODE.get(d)).is_some_and(|m| matches!(m.load(Relaxed), UNDER_MPS | SPATIAL))
}

fn note_user_variables() {
    LOOKED.call_once(|| {
        USER_PRIORITY.store(std::env::var_os(CLIENT_PRIORITY).is_some(), Relaxed);
        USER_ACTIVE_THREADS.store(std::env::var_os(ACTIVE_THREADS).is_some(), Relaxed);
    });
}

/// Whether an MPS control daemon listens where this process's driver will look for one.
fn daemon_listening() -> bool {
    let dir = std::env::var_os(PIPE_DIRECTORY).filter(|d| !d.is_empty()).unwrap_or_else(|| DEFAULT_PIPE_DIRECTORY.into());
    let dir = std::path::Path::new(&dir);
    // The daemon's pipe, or the pid file it writes beside it.
    dir.join("control").exists() || dir.join("nvidia-cuda-mps-control.pid").exists()
}

/// MPS's client priority for a gpuslice class: MPS has two levels, 0 (normal) and 1 (below
/// normal); the high class gets the upper one, everyone else yields.
fn client_priority(p: Priority) -> &'static str {
    if p == Priority::High {
        "0"
    } else {
        "1"
    }
}

/// Writes the variables MPS reads, where the user has not set them; returns what it wrote.
fn write_variables(priority: Priority, share: Option<u32>) -> (Option<&'static str>, Option<u32>) {
    note_user_variables();
    let mut wrote = (None, None);
    if !USER_PRIORITY.load(Relaxed) {
        let value = client_priority(priority);
        write_env(CLIENT_PRIORITY, Some(value));
        wrote.0 = Some(value);
    }
    if !USER_ACTIVE_THREADS.load(Relaxed) {
        write_env(ACTIVE_THREADS, share.map(|p| p.to_string()).as_deref());
        wrote.1 = share;
    }
    wrote
}

/// Sets (or, with `None`, removes) one of MPS's variables; nothing when it already says so.
///
/// Why this holds in a host that runs threads: `setenv`/`unsetenv` take glibc's environment
/// lock, so writers never race one another, and Rust's readers (`std::env`) take the lock that
/// `set_var` takes too. No lock covers a C `getenv` in another thread, but glibc replaces an
/// existing variable's string pointer in place and never frees strings, so such a reader sees
/// the old value or the new one, both valid; only adding a variable may move the array a reader
/// walks. So the variables are added in `before_init`, before the real `cuInit` (the driver has
/// no threads of its own yet), and a context's write replaces in place, removes (in place too),
/// or, unchanged, is skipped. What is left: a share that only the controller gives adds
/// `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` at the first context, while the program's threads may be
/// running; a library constructor (before any thread) cannot know the controller's share, and
/// writing a placeholder would itself change what MPS does.
fn write_env(name: &str, value: Option<&str>) {
    if std::env::var(name).ok().as_deref() == value {
        return;
    }
    match value {
        Some(v) => std::env::set_var(name, v),
        None => std::env::remove_var(name),
    }
}

/// The share that applies to every device, the one MPS can carry (its percentage is per
/// process, not per device).
fn share_for_all(settings: &Settings) -> Option<u32> {
    settings.sm_share.all().map(|s| s.value).filter(|&p| p < 100)
}

/// In the `cuInit` hook, before the real one: point the process at its GPU's daemon when the
/// controller's MPS table makes that GPU spatial (`mps_pipe`); then, when an MPS daemon
/// listens, write MPS's variables from this process's settings (the controller may refine
/// them before a context is made).
pub fn before_init(settings: &Settings) {
    // Once: programs and libraries call cuInit again and again, and the values do not change.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if settings.mps == MpsMode::Off {
            return;
        }
        super::mps_pipe::point();
        if !daemon_listening() {
            return;
        }
        let priority = settings.priority.as_ref().map_or(Priority::Normal, |p| p.value);
        write_variables(priority, share_for_all(settings));
    });
}

/// Before a context is made on `device`: learn whether MPS serves it and, if so, write MPS's
/// variables from the priority and share in force now (a controller's included).
pub fn context_created(device: CUdevice) {
    let Some(slot) = usize::try_from(device).ok().and_then(|d| DEVICE_MODE.get(d)) else { return };
    let Some(settings) = crate::sys::runtime::runtime().settings.as_ref().ok() else { return };
    if settings.mps == MpsMode::Off {
        return;
    }
    // Once per device: a primary context is retained again and again, and MPS fixes its
    // settings at the first context anyway.
    if slot.load(Relaxed) != UNKNOWN {
        return;
    }
    let gate = settings.priority_gate;
    if !mps_enabled(device) {
        slot.store(TIME_SLICED, Relaxed);
        if gate != PriorityGate::On {
            tracing::info!("pid {}: device {device} is time-sliced: {ENV_PRIORITY_GATE}={gate} changes nothing there", std::process::id());
        }
        return;
    }
    let Some(link) = link::get() else { return };
    let priority = link.priority();
    let share = link.index(device).map(|i| link.settings.devices[i].share.load(Relaxed)).filter(|&p| p > 0 && p < 100);
    let (wrote_priority, wrote_share) = write_variables(priority, share);
    let spatial = wrote_share.is_some() || (USER_ACTIVE_THREADS.load(Relaxed) && share.is_some());
    let new = if spatial { SPATIAL } else { UNDER_MPS };
    if slot.swap(new, Relaxed) == UNKNOWN {
        let pid = std::process::id();
        let shown = |v: Option<String>, user: bool, name: &str| match (v, user) {
            (Some(v), _) => format!("{name}={v}"),
            (None, true) => format!("{name} as the environment sets it"),
            (None, false) => format!("{name} unset"),
        };
        let gate = match (gate, spatial) {
            (PriorityGate::On, _) => "",
            (PriorityGate::SpatialOff, true) => {
                "; priority gate off (GPUSLICE_PRIORITY_GATE=spatial-off): launches at normal or low priority do not wait for high-priority work here"
            }
            (PriorityGate::Auto, true) => {
                "; priority gate auto (GPUSLICE_PRIORITY_GATE=auto): launches at normal or low priority wait for high-priority work here only while a high-priority process's requests are device-bound (by its own measurement)"
            }
            (PriorityGate::SpatialOff, false) => "; GPUSLICE_PRIORITY_GATE=spatial-off changes nothing here (no share carried by MPS): the priority gate stays on",
            (PriorityGate::Auto, false) => "; GPUSLICE_PRIORITY_GATE=auto changes nothing here (no share carried by MPS): the priority gate stays on",
        };
        tracing::info!(
            "pid {pid}: device {device} is served by MPS: priority {priority} as {}, SM share {} as {}{}{gate}",
            shown(wrote_priority.map(str::to_string), USER_PRIORITY.load(Relaxed), CLIENT_PRIORITY),
            share.map_or("none".to_string(), |p| format!("{p}%")),
            shown(wrote_share.map(|p| p.to_string()), USER_ACTIVE_THREADS.load(Relaxed), ACTIVE_THREADS),
            if spatial { " (spatial: the time throttle stands aside on this device; a later share edit does not move MPS's percentage)" } else { "" }
        );
    }
}

/// `CU_DEVICE_ATTRIBUTE_MPS_ENABLED` for `device`; false when the driver cannot say.
fn mps_enabled(device: CUdevice) -> bool {
    let Some(get) = driver().and_then(|d| d.cuDeviceGetAttribute) else { return false };
    let mut value: std::ffi::c_int = 0;
    // SAFETY: out-pointer to a local; an unknown attribute returns an error, read as "no".
    let code = unsafe { get(&mut value, ATTRIBUTE_MPS_ENABLED, device) };
    code == CUDA_SUCCESS && value != 0
}
