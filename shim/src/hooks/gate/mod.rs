//! The thunks: for every driver API name of CUDA 13.0 that the shim does not hook, an exported
//! naked function of that name that passes the suspend gate (`sys::gate`) and calls the real
//! function with the program's arguments untouched.
//!
//! No signatures are needed: the thunk keeps rdi, rsi, rdx, rcx, r8, r9 and xmm0–7 as they came
//! and copies the caller's first 16 stack slots (128 bytes) into its own frame before calling,
//! which covers every driver function (the most stack arguments, 10, are
//! `cuTensorMapEncodeIm2colWide`'s 16 parameters; an `CUipcMemHandle` passed by value is 8
//! slots). Why copy rather than tail-jump: the gate must learn when the call returns (the
//! closer waits for threads inside the driver), and a tail jump would have to swap the return
//! address for one of ours and keep the original per thread — a stack of them for nested
//! calls, and broken unwinding/backtraces through the driver. Copying costs 8 16-byte moves
//! and reads up to 128 bytes above the caller's stack pointer: always mapped (the caller's own
//! frame and its callers', or at the very top of a stack the environment or glibc's thread
//! descriptor). A callee that writes into its stack arguments writes into our copy, which the
//! ABI allows (they belong to the callee). Every driver function returns `CUresult` in eax and
//! none is variadic, so rax, r10 and r11 are free before the call.
//!
//! The path, per call: `lea r11, [REAL + 8i]; jmp common` → `common`: load the real address
//! (0: not resolved yet → `resolve`), load the thread's depth from initial-exec TLS (not 0:
//! first call of the thread, nested, or thread teardown → `sys::gate::on_busy_record`), store
//! 1, load the gate word (closed → `sys::gate::on_closed`), copy the stack slots, call, store
//! the depth back (one plain `dec`: the thread's own word), return eax.
//!
//! `names.txt` lists the names (and where they came from); `thunks.rs` is generated from it by
//! `gen_names.py` (the names minus those `registry` hooks). A test checks that the two agree.
//!
//! A driver function the table lacks (the CUDA runtime resolves legacy names such as
//! `cuGLCtxCreate` through `cuGetProcAddress` in every program) gets one of `SPARES` spare
//! thunks: the same code, its real address filled in when it is handed out. Since a thunk needs
//! no signature, a spare passes the gate exactly as a named one does, and a name merely looked
//! up costs a slot, not the process's fast path. Only when the spares run out is a function
//! handed out bare (`sys::gate::note_unknown_name`: a real hole, the process is then not
//! fast-suspendable and the agent refuses to suspend it).

use crate::sys::ffi::{CUDA_ERROR_NOT_FOUND, CUDA_ERROR_NOT_INITIALIZED};
use crate::sys::{gate, guard};
use once_cell::sync::OnceCell;
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

macro_rules! thunks {
    ($( $index:literal $name:ident, )*) => {
        /// The thunked names, in table order.
        pub static NAMES: &[&CStr] = &[
            // SAFETY: literals with exactly one trailing NUL.
            $( unsafe { CStr::from_bytes_with_nul_unchecked(concat!(stringify!($name), "\0").as_bytes()) }, )*
        ];

        /// The thunks, in table order.
        pub static THUNKS: &[unsafe extern "C" fn()] = &[$( $name, )*];

        /// The real functions, in table order: 0 until `resolve` (then a real address or a stub
        /// that answers the missing function's error).
        static REAL: [AtomicUsize; [$( stringify!($name), )*].len()] = [const { AtomicUsize::new(0) }; [$( stringify!($name), )*].len()];

        $(
            /// A gate thunk (see the module's comment).
            ///
            /// # Safety
            /// The driver function's own contract.
            #[unsafe(naked)]
            #[no_mangle]
            pub unsafe extern "C" fn $name() {
                core::arch::naked_asm!(
                    "lea r11, [rip + {real} + {offset}]",
                    "jmp {common}",
                    real = sym REAL,
                    offset = const $index * 8,
                    common = sym common,
                )
            }
        )*
    };
}

include!("thunks.rs");

/// Saves the argument registers (7 pushes with r10 keep the stack 16-byte aligned at the call,
/// since the thunk was entered with rsp ≡ 8 mod 16), calls `$f`, restores them.
macro_rules! preserving_arguments {
    ($($call:literal),*) => {
        concat!(
            "push rdi\n", "push rsi\n", "push rdx\n", "push rcx\n", "push r8\n", "push r9\n", "push r10\n",
            "sub rsp, 128\n",
            "movdqu [rsp], xmm0\n", "movdqu [rsp + 16], xmm1\n", "movdqu [rsp + 32], xmm2\n", "movdqu [rsp + 48], xmm3\n",
            "movdqu [rsp + 64], xmm4\n", "movdqu [rsp + 80], xmm5\n", "movdqu [rsp + 96], xmm6\n", "movdqu [rsp + 112], xmm7\n",
            $($call, "\n",)*
            "movdqu xmm0, [rsp]\n", "movdqu xmm1, [rsp + 16]\n", "movdqu xmm2, [rsp + 32]\n", "movdqu xmm3, [rsp + 48]\n",
            "movdqu xmm4, [rsp + 64]\n", "movdqu xmm5, [rsp + 80]\n", "movdqu xmm6, [rsp + 96]\n", "movdqu xmm7, [rsp + 112]\n",
            "add rsp, 128\n",
            "pop r10\n", "pop r9\n", "pop r8\n", "pop rcx\n", "pop rdx\n", "pop rsi\n", "pop rdi\n",
        )
    };
}

/// The body every thunk jumps to, with r11 = the address of its `REAL` entry.
#[unsafe(naked)]
unsafe extern "C" fn common() {
    core::arch::naked_asm!(
        "mov r10, qword ptr [r11]",
        "test r10, r10",
        "jz 5f",
        "1:",
        "mov r11, qword ptr [rip + gpuslice_gate_thread@GOTTPOFF]",
        "mov eax, dword ptr fs:[r11]",
        "test eax, eax",
        "jnz 6f",
        "mov dword ptr fs:[r11], 1",
        "mov eax, dword ptr [rip + {gate}]",
        "test eax, eax",
        "jnz 7f",
        "2:",
        "push rbp",
        "mov rbp, rsp",
        "sub rsp, 128",
        // The caller's stack arguments start above our return address: [rbp + 16].
        "movups xmm8, [rbp + 16]", "movups [rsp], xmm8",
        "movups xmm8, [rbp + 32]", "movups [rsp + 16], xmm8",
        "movups xmm8, [rbp + 48]", "movups [rsp + 32], xmm8",
        "movups xmm8, [rbp + 64]", "movups [rsp + 48], xmm8",
        "movups xmm8, [rbp + 80]", "movups [rsp + 64], xmm8",
        "movups xmm8, [rbp + 96]", "movups [rsp + 80], xmm8",
        "movups xmm8, [rbp + 112]", "movups [rsp + 96], xmm8",
        "movups xmm8, [rbp + 128]", "movups [rsp + 112], xmm8",
        "call r10",
        "leave",
        "mov r11, qword ptr [rip + gpuslice_gate_thread@GOTTPOFF]",
        "dec dword ptr fs:[r11]",
        "ret",
        // Not resolved yet: resolve every entry, r10 = ours.
        "5:",
        preserving_arguments!("mov rdi, r11", "call {resolve}", "mov [rsp + 128], rax"),
        "jmp 1b",
        // Depth not 0: register, nest, or teardown.
        "6:",
        preserving_arguments!("call {busy}"),
        "jmp 2b",
        // Closed: wait (unless this thread closed it).
        "7:",
        preserving_arguments!("call {closed}"),
        "jmp 2b",
        gate = sym gate::GATE,
        resolve = sym resolve_entry,
        busy = sym on_busy_record,
        closed = sym on_closed,
    )
}

extern "C" fn on_busy_record() {
    let _ = std::panic::catch_unwind(|| gate::on_busy_record(gate::record()));
}

extern "C" fn on_closed() {
    let _ = std::panic::catch_unwind(|| gate::on_closed(gate::record()));
}

/// Stands in for a function this driver lacks.
extern "C" fn missing() -> i32 {
    CUDA_ERROR_NOT_FOUND as i32
}

/// Stands in for every function when there is no driver at all.
extern "C" fn no_driver() -> i32 {
    CUDA_ERROR_NOT_INITIALIZED as i32
}

/// Fills `REAL` (once) and returns the entry at `slot`.
extern "C" fn resolve_entry(slot: *const AtomicUsize) -> usize {
    let _ = std::panic::catch_unwind(resolve_all);
    // SAFETY: `slot` is one of `REAL`'s entries (the thunk's own `lea`).
    let address = unsafe { &*slot }.load(Relaxed);
    if address == 0 {
        missing as *const () as usize
    } else {
        address
    }
}

/// Real addresses of every thunked name (`missing`/`no_driver` where there is none).
fn resolve_all() {
    static DONE: OnceCell<()> = OnceCell::new();
    DONE.get_or_init(|| {
        let driver = crate::sys::driver::driver();
        for (entry, name) in REAL.iter().zip(NAMES) {
            let address = match driver {
                None => no_driver as *const () as usize,
                Some(d) => {
                    let real = d.symbol(name);
                    if real.is_null() {
                        missing as *const () as usize
                    } else {
                        real as usize
                    }
                }
            };
            entry.store(address, Relaxed);
        }
    });
}

/// The real function behind thunk `i`, if the driver has one.
fn real(i: usize) -> Option<usize> {
    resolve_all();
    let a = REAL[i].load(Relaxed);
    (a != missing as *const () as usize && a != no_driver as *const () as usize && a != 0).then_some(a)
}

/// The thunk exported under `name` and the driver's real function of that name (if the driver
/// has one), when the table covers the name.
pub fn thunk_for_name(name: &[u8]) -> Option<(*mut c_void, Option<usize>)> {
    static BY_NAME: OnceCell<HashMap<&'static [u8], usize>> = OnceCell::new();
    let map = BY_NAME.get_or_init(|| NAMES.iter().enumerate().map(|(i, n)| (n.to_bytes(), i)).collect());
    map.get(name).map(|&i| (THUNKS[i] as *mut c_void, real(i)))
}

/// How many driver functions outside the table can be passed through the gate.
pub const SPARES: usize = 256;

/// The spare thunks' real functions, by slot: 0 while free (`resolve_entry` then answers
/// `missing`, though a spare is never handed out before its slot is filled).
static SPARE_REAL: [AtomicUsize; SPARES] = [const { AtomicUsize::new(0) }; SPARES];

/// The spare thunks: `SPARES` entries of 16 bytes (`lea` + `jmp`, padded), entry `i` reading
/// `SPARE_REAL[i]`, then the named thunks' `common` body.
#[unsafe(naked)]
unsafe extern "C" fn spare_thunks() {
    core::arch::naked_asm!(
        ".balign 16",
        ".set gpuslice_spare_offset, 0",
        ".rept {n}",
        ".balign 16",
        "lea r11, [rip + {real} + gpuslice_spare_offset]",
        "jmp {common}",
        ".set gpuslice_spare_offset, gpuslice_spare_offset + 8",
        ".endr",
        n = const SPARES,
        real = sym SPARE_REAL,
        common = sym common,
    )
}

/// Spare thunk `i`'s address (the first entry sits at the function's first 16-byte boundary).
fn spare_entry(i: usize) -> *mut c_void {
    ((spare_thunks as *const () as usize).next_multiple_of(16) + 16 * i) as *mut c_void
}

/// Test knob (`GPUSLICE_TEST_GATE=1` only): `GPUSLICE_TEST_GATE_SPARES=N` leaves N spares
/// usable, so that a test can reach the hole that running out of them leaves.
fn spares_usable() -> usize {
    static USABLE: OnceCell<usize> = OnceCell::new();
    *USABLE.get_or_init(|| {
        let knob = std::env::var_os("GPUSLICE_TEST_GATE").is_some_and(|v| v == "1");
        let asked = std::env::var("GPUSLICE_TEST_GATE_SPARES").ok().and_then(|v| v.trim().parse().ok());
        asked.filter(|_| knob).map_or(SPARES, |n: usize| n.min(SPARES))
    })
}

/// A spare thunk for `real`, a driver function outside the table: the slot already holding
/// it, else a free one (claimed with a compare-and-swap: no lock, so a fork at any moment is
/// harmless; two threads racing for the same function may take two slots, both correct).
/// `None` when every usable slot is taken.
pub fn spare_for(real: *mut c_void) -> Option<*mut c_void> {
    let real = real as usize;
    if real == 0 {
        return None;
    }
    let usable = &SPARE_REAL[..spares_usable()];
    if let Some(i) = usable.iter().position(|s| s.load(Relaxed) == real) {
        return Some(spare_entry(i));
    }
    for (i, slot) in usable.iter().enumerate() {
        if slot.load(Relaxed) == 0 && slot.compare_exchange(0, real, Relaxed, Relaxed).is_ok() {
            gate::note_spare(i + 1);
            return Some(spare_entry(i));
        }
        if slot.load(Relaxed) == real {
            return Some(spare_entry(i));
        }
    }
    None
}

/// The thunk for a real driver address that `cuGetProcAddress` handed out, if the table has it.
pub fn thunk_for_real(address: *mut c_void) -> Option<*mut c_void> {
    static BY_REAL: OnceCell<HashMap<usize, usize>> = OnceCell::new();
    let map = BY_REAL.get_or_init(|| {
        resolve_all();
        (0..NAMES.len()).filter_map(|i| Some((real(i)?, THUNKS[i] as usize))).collect()
    });
    map.get(&(address as usize)).map(|&t| t as *mut c_void)
}

/// Test knob (`GPUSLICE_TEST_GATE=1` only, read once; refused otherwise so that no program can
/// close its own gate in production): `action` 1 closes with `timeout_ms` and returns 0 or
/// minus the threads inside, 2 opens, 3 answers `is_closed`, 4 `fast_suspendable`, 5 the
/// unknown names, 6 the export tables counted, 7 the spare thunks taken.
#[no_mangle]
pub extern "C" fn gpuslice_test_gate(action: libc::c_int, timeout_ms: u64) -> i64 {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("GPUSLICE_TEST_GATE").is_some_and(|v| v == "1")) {
        return i64::MIN;
    }
    guard::with_fallback("gpuslice_test_gate", i64::MIN, || match action {
        1 => match gate::close(std::time::Duration::from_millis(timeout_ms)) {
            Ok(()) => 0,
            Err(b) => -(b.threads_inside as i64),
        },
        2 => {
            gate::open();
            0
        }
        3 => i64::from(gate::is_closed()),
        4 => i64::from(gate::fast_suspendable()),
        5 => gate::holes().0 as i64,
        6 => gate::holes().1 as i64,
        7 => gate::spares_used() as i64,
        _ => i64::MIN,
    })
}

#[cfg(test)]
mod tests {
    extern "C" fn seven_args(a: i64, b: i64, c: i64, d: i64, e: i64, f: i64, g: i64, x: f64) -> i64 {
        a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + (x * 100.0) as i64
    }

    extern "C" fn one_arg(a: i64) -> i64 {
        a * 3 + 1
    }

    /// A spare thunk calls the function it was handed out for with every argument (registers,
    /// a float, a stack slot) and its 64-bit result intact; one function keeps its slot.
    #[test]
    fn spare_thunks_pass_arguments_and_results_untouched() {
        type Seven = extern "C" fn(i64, i64, i64, i64, i64, i64, i64, f64) -> i64;
        type One = extern "C" fn(i64) -> i64;
        let a = super::spare_for(seven_args as *mut std::ffi::c_void).expect("a spare");
        let b = super::spare_for(one_arg as *mut std::ffi::c_void).expect("a spare");
        assert_ne!(a, b);
        assert_eq!(super::spare_for(seven_args as *mut std::ffi::c_void), Some(a), "the same function keeps its slot");
        // SAFETY: the spares call exactly these functions, whose signatures these are.
        let (seven, one): (Seven, One) =
            unsafe { (std::mem::transmute::<*mut std::ffi::c_void, Seven>(a), std::mem::transmute::<*mut std::ffi::c_void, One>(b)) };
        assert_eq!(seven(1, 2, 3, 4, 5, 6, 7, 0.25), seven_args(1, 2, 3, 4, 5, 6, 7, 0.25));
        assert_eq!(one(1 << 40), (1 << 40) * 3 + 1, "a 64-bit result comes back whole");
    }

    /// `thunks.rs` is `names.txt` minus the hooked names, in order (regenerate with
    /// gen_names.py after changing either).
    #[test]
    fn the_thunk_list_is_the_name_table_minus_the_hooks() {
        let names: Vec<&str> = include_str!("names.txt").lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
        let hooked: Vec<&str> = crate::hooks::registry::HOOKS.iter().map(|h| h.name.to_str().unwrap()).collect();
        let expected: Vec<&str> = names.iter().copied().filter(|n| !hooked.contains(n)).collect();
        let thunked: Vec<&str> = super::NAMES.iter().map(|n| n.to_str().unwrap()).collect();
        assert_eq!(thunked, expected);
        assert!(names.len() > 600, "CUDA 13.0 with its variants has over 600 names: {}", names.len());
        for hooked_name in ["cuMemAlloc_v2", "cuLaunchKernel", "cuGetExportTable"] {
            assert!(names.contains(&hooked_name) && !thunked.contains(&hooked_name), "{hooked_name}");
        }
    }
}
