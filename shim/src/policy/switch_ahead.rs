//! Switching ahead (issue 19): an empty kernel that a high-priority process launches into its
//! own context just before its next request is due, so that the time-sliced GPU's switch from a
//! neighbour's context happens before the request rather than inside it.
//!
//! Under time-slicing every process has its own context, and the GPU runs one at a time. A
//! request that finds the device idle still waits for the switch to its context when a
//! neighbour's kernel ran last: ~0.13 ms on the H100, 6 % of a 2 ms request, whatever the
//! neighbour's kernels are (`tests/gpu/preswitch.sh`, no shim: the request waited 0.163 ms at
//! p50 behind a neighbour that had stopped 0.8 ms before, 0.030 ms alone, 0.036 ms with an
//! empty kernel launched 0.15 ms ahead, 0.018 ms with one 0.3–0.6 ms ahead). Anticipation
//! (`sched`) already keeps budgeted neighbours off the device from a little before a request
//! that keeps time; the empty kernel then takes the switch in that idle gap, and the GPU stays
//! on this context (nothing else has work) until the request arrives.
//!
//! The kernel lives in a module of its own (PTX for any GPU from sm_50, JIT-compiled by the
//! driver once per context) on a non-blocking stream of its own, both made on first use in a
//! context and given back before the context ends (`forget`). Launched through the real
//! driver, it is not a request: no busy mark, no timing, no share. Over MPS there is one
//! hardware context and no switch; `sched` does not switch ahead there.
//!
//! Its own lock (`STATE`), not the priority watcher's: the first launch in a context compiles
//! the PTX (the driver's JIT, milliseconds the first time in a process), and the program's
//! high-priority launches take the watcher's lock. Against a context ended meanwhile: `sched`
//! reads `endings()` with the context it decides to launch in, and `launch` goes only if no
//! context has ended since (`forget` counts them under this lock, before the context ends).

use crate::state::link;
use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use crate::sys::locks;
use once_cell::sync::OnceCell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

/// `GPUSLICE_PRIORITY_SWITCH_AHEAD`: `on` (the default) or `off`, in a high-priority process.
pub const ENV_SWITCH_AHEAD: &str = "GPUSLICE_PRIORITY_SWITCH_AHEAD";

/// How long before a request that keeps time is due its window opens for the neighbours (and
/// the empty kernel goes) when switching ahead, on top of the window's own margin
/// (`period::GUARD_NS` and the spread of the intervals): the switch takes ~0.13 ms, and with
/// 0.15 ms the request waited 6 µs more than alone on the H100.
pub const LEAD_NS: u64 = 150_000;

/// The empty kernel, for any GPU from sm_50 (PTX ISA 7.0: every driver since CUDA 11).
const PTX: &[u8] = b".version 7.0\n.target sm_50\n.address_size 64\n\n.visible .entry gpuslice_switch_ahead()\n{\n\tret;\n}\n\0";
const NAME: &[u8] = b"gpuslice_switch_ahead\0";
/// `CU_STREAM_NON_BLOCKING`: not ordered behind the program's legacy default stream.
const NON_BLOCKING: std::ffi::c_uint = 1;

/// Whether this process switches ahead of its requests (read once; anything but `on` or `off`
/// is warned about and counts as `on`).
pub fn enabled() -> bool {
    static ON: OnceCell<bool> = OnceCell::new();
    *ON.get_or_init(|| crate::sys::on_off::on_unless_off(ENV_SWITCH_AHEAD, "switching ahead"))
}

/// The empty kernel's handles in one context.
struct Loaded {
    ctx: usize,
    device: CUdevice,
    module: usize,
    function: usize,
    stream: usize,
}

/// The empty kernel in each context this process switched ahead in (few: one per device in
/// practice), and the contexts where it could not be made (not tried again: logged once).
struct SwitchAhead {
    loaded: Vec<Loaded>,
    /// (context, device) where it could not be made.
    refused: Vec<(usize, CUdevice)>,
    /// `link::fork_generation()` of these handles: a forked child's are its parent's, in
    /// contexts it does not have (forgotten, not given back).
    generation: u64,
}

static STATE: Mutex<SwitchAhead> = Mutex::new(SwitchAhead { loaded: Vec::new(), refused: Vec::new(), generation: 0 });
/// Contexts ended (or about to be) so far: see the module's notes.
static ENDINGS: AtomicU64 = AtomicU64::new(0);

/// How many contexts the program has ended so far, to hand back to `launch`.
pub fn endings() -> u64 {
    ENDINGS.load(SeqCst)
}

/// Launches the empty kernel in `ctx` (of `device`), unless a context has ended since
/// `endings_seen` was read (it may be that one). The calling thread's current context becomes
/// `ctx` (the watcher's, which has none of its own). False when it did not launch.
pub fn launch(ctx: usize, device: CUdevice, endings_seen: u64) -> bool {
    let mut state = locks::lock(&STATE);
    if ENDINGS.load(SeqCst) != endings_seen {
        return false;
    }
    state.fresh().launch(ctx, device)
}

/// Gives back what was made in `ctx`, or in every context of `device`, before the program ends
/// it (`cuCtxDestroy`, a release or reset of the primary context). The calling thread's current
/// context is restored.
pub fn forget(ending: Ending) {
    let mut state = locks::lock(&STATE);
    ENDINGS.fetch_add(1, SeqCst);
    state.fresh().forget(ending);
}

/// This module's lock, for a fork (`sys::atfork`): the child finds its handles by generation.
pub fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    h.take(&STATE, crate::sys::atfork::keep);
}

impl SwitchAhead {
    /// This process's own handles (a forked child drops its parent's).
    fn fresh(&mut self) -> &mut SwitchAhead {
        let generation = link::fork_generation();
        if self.generation != generation {
            *self = SwitchAhead { loaded: Vec::new(), refused: Vec::new(), generation };
        }
        self
    }

    fn launch(&mut self, ctx: usize, device: CUdevice) -> bool {
        if self.refused.iter().any(|&(c, _)| c == ctx) || call_real!(cuCtxSetCurrent(ctx as CUcontext)) != CUDA_SUCCESS {
            return false;
        }
        let i = match self.loaded.iter().position(|l| l.ctx == ctx) {
            Some(i) => i,
            None => match load(ctx, device) {
                Ok(l) => {
                    self.loaded.push(l);
                    self.loaded.len() - 1
                }
                Err(what) => {
                    tracing::warn!(
                        "pid {}: device {device}: cannot switch ahead of requests ({what}); they pay the GPU's switch between contexts",
                        std::process::id()
                    );
                    self.refused.push((ctx, device));
                    return false;
                }
            },
        };
        let l = &self.loaded[i];
        let code = call_real!(cuLaunchKernel(l.function as *mut c_void, 1, 1, 1, 1, 1, 1, 0, l.stream as CUstream, std::ptr::null_mut(), std::ptr::null_mut()));
        if code != CUDA_SUCCESS {
            // Made again at the next request (a context reset under it, say); its handles are
            // not given back: the driver may no longer know them.
            self.loaded.swap_remove(i);
            tracing::debug!("device {device}: the switch-ahead launch failed (CUDA error {code}); made again next time");
            return false;
        }
        true
    }

    fn forget(&mut self, ending: Ending) {
        let ends = |ctx: usize, device: CUdevice| match ending {
            Ending::Context(c) => ctx == c,
            Ending::Device(d) => device == d,
        };
        // A context made again may get the same handle: it deserves a new try.
        self.refused.retain(|&(c, d)| !ends(c, d));
        if !self.loaded.iter().any(|l| ends(l.ctx, l.device)) {
            return;
        }
        let mut current: CUcontext = std::ptr::null_mut();
        let had = call_real!(cuCtxGetCurrent(&mut current)) == CUDA_SUCCESS;
        self.loaded.retain(|l| {
            let gone = ends(l.ctx, l.device);
            if gone {
                unload(l);
            }
            !gone
        });
        if had {
            let _ = call_real!(cuCtxSetCurrent(current));
        }
    }
}

/// What ends: one context, or (a primary context's release or reset) those of a device.
#[derive(Clone, Copy)]
pub enum Ending {
    Context(usize),
    Device(CUdevice),
}

/// Makes the empty kernel in `ctx`, the calling thread's current context.
fn load(ctx: usize, device: CUdevice) -> Result<Loaded, String> {
    let mut module: *mut c_void = std::ptr::null_mut();
    let code = call_real!(cuModuleLoadData(&mut module, PTX.as_ptr().cast()));
    if code != CUDA_SUCCESS {
        return Err(format!("loading its empty kernel: CUDA error {code}"));
    }
    let mut function: *mut c_void = std::ptr::null_mut();
    let code = call_real!(cuModuleGetFunction(&mut function, module, NAME.as_ptr().cast()));
    if code != CUDA_SUCCESS {
        let _ = call_real!(cuModuleUnload(module));
        return Err(format!("finding its empty kernel: CUDA error {code}"));
    }
    let mut stream: CUstream = std::ptr::null_mut();
    let code = call_real!(cuStreamCreate(&mut stream, NON_BLOCKING));
    if code != CUDA_SUCCESS {
        let _ = call_real!(cuModuleUnload(module));
        return Err(format!("making its stream: CUDA error {code}"));
    }
    Ok(Loaded { ctx, device, module: module as usize, function: function as usize, stream: stream as usize })
}

/// Gives back a context's empty kernel and stream, in that context (still alive).
fn unload(l: &Loaded) {
    if call_real!(cuCtxSetCurrent(l.ctx as CUcontext)) == CUDA_SUCCESS {
        // The last empty kernel has long ended (µs): the wait is for form's sake, before its
        // module goes.
        let _ = call_real!(cuStreamSynchronize(l.stream as CUstream));
        let _ = call_real!(cuStreamDestroy_v2(l.stream as CUstream));
        let _ = call_real!(cuModuleUnload(l.module as *mut c_void));
    }
}
