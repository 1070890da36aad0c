//! The exported `dlsym` and `dlvsym`, as naked functions.
//!
//! `dlsym(RTLD_NEXT, name)` means "the next object after the one that called me", and glibc
//! finds the caller from its own return address. A wrapper that called the real `dlsym` normally
//! would make every caller look like libgpuslice.so and break other libraries' `RTLD_NEXT`
//! lookups (other preloaded shims, allocators, profilers). So for `RTLD_NEXT` this jumps to the
//! real `dlsym` with the caller's return address untouched; every other handle goes to the Rust
//! hook, which may hand back a gpuslice wrapper. A test checks `RTLD_NEXT` from another library.

use std::ffi::{c_char, c_void};

#[cfg(not(target_arch = "x86_64"))]
compile_error!("gpuslice's dlsym trampoline is written for x86-64 Linux; port src/trampoline.rs first");

extern "C" fn real_dlsym_address() -> usize {
    crate::sys::dl::real_dlsym() as usize
}

extern "C" fn hook(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: the caller's own dlsym arguments.
    unsafe { crate::hooks::registry::dlsym_hook(handle, name) }
}

/// # Safety
/// The C `dlsym` contract.
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    core::arch::naked_asm!(
        // RTLD_NEXT is ((void *) -1).
        "cmp rdi, -1",
        "je 2f",
        "jmp {hook}",
        "2:",
        // Keep the arguments across the call; three pushes keep the stack 16-byte aligned.
        "push rdi",
        "push rsi",
        "push rax",
        "call {real}",
        "mov r11, rax",
        "pop rax",
        "pop rsi",
        "pop rdi",
        // The caller's return address is on top of the stack again: the real dlsym sees it.
        "jmp r11",
        hook = sym hook,
        real = sym real_dlsym_address,
    )
}

extern "C" fn real_dlvsym_address() -> usize {
    crate::sys::dl::real_dlvsym() as usize
}

extern "C" fn vhook(handle: *mut c_void, name: *const c_char, version: *const c_char) -> *mut c_void {
    // SAFETY: the caller's own dlvsym arguments.
    unsafe { crate::hooks::registry::dlvsym_hook(handle, name, version) }
}

/// `dlvsym` the same way: `RTLD_NEXT` goes to the real one with the caller's return address,
/// everything else to the Rust hook.
///
/// # Safety
/// The C `dlvsym` contract.
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlvsym(handle: *mut c_void, name: *const c_char, version: *const c_char) -> *mut c_void {
    core::arch::naked_asm!(
        "cmp rdi, -1",
        "je 2f",
        "jmp {hook}",
        "2:",
        // Three pushes keep the stack 16-byte aligned for the call.
        "push rdi",
        "push rsi",
        "push rdx",
        "call {real}",
        "mov r11, rax",
        "pop rdx",
        "pop rsi",
        "pop rdi",
        "jmp r11",
        hook = sym vhook,
        real = sym real_dlvsym_address,
    )
}
