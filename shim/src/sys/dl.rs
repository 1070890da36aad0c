//! The dynamic loader underneath the shim: the real `dlsym`, and opening the real libraries.
//!
//! The shim exports its own `dlsym` and `dlvsym`, so every `dlsym`/`dlvsym` the shim itself (or
//! any crate it uses) makes lands in its own hooks first. The hooks forward to the real ones,
//! found here in the C library's symbol table (`elf_symbols`) rather than through either call,
//! so nothing recurses.

use once_cell::sync::OnceCell;
use std::ffi::{c_char, c_void, CStr};

pub type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;
pub type DlvsymFn = unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char) -> *mut c_void;

static REAL_DLSYM: OnceCell<DlsymFn> = OnceCell::new();
static REAL_DLVSYM: OnceCell<DlvsymFn> = OnceCell::new();

/// The C library's function `name`. Aborts with a message if it cannot be found, since without
/// it no symbol lookup in the process could work at all (gpuslice needs glibc).
fn libc_function(name: &CStr) -> usize {
    if let Some(address) = crate::sys::elf_symbols::libc_symbol(name) {
        return address;
    }
    let msg = b"gpuslice: fatal: cannot find glibc's dlsym/dlvsym in libc.so.6 or libdl.so.2; gpuslice needs glibc\n";
    // SAFETY: writing a constant buffer to fd 2.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort();
    }
}

/// glibc's `dlsym`.
pub fn real_dlsym() -> DlsymFn {
    // SAFETY: the symbol is glibc's dlsym, whose ABI is DlsymFn.
    *REAL_DLSYM.get_or_init(|| unsafe { std::mem::transmute::<usize, DlsymFn>(libc_function(c"dlsym")) })
}

/// glibc's `dlvsym`.
pub fn real_dlvsym() -> DlvsymFn {
    // SAFETY: the symbol is glibc's dlvsym, whose ABI is DlvsymFn.
    *REAL_DLVSYM.get_or_init(|| unsafe { std::mem::transmute::<usize, DlvsymFn>(libc_function(c"dlvsym")) })
}

/// An opened shared library whose symbols are looked up with the real `dlsym`.
pub struct Library {
    handle: *mut c_void,
}

// SAFETY: a dlopen handle is a process-wide token; dlsym on it is thread-safe.
unsafe impl Send for Library {}
// SAFETY: `Library` only holds the dlopen handle and never mutates it; glibc's dlsym on a handle is thread-safe, so `&Library` can be shared.
unsafe impl Sync for Library {}

impl Library {
    /// Opens (or finds the already-loaded) library by soname; `None` if it is not there.
    pub fn open(soname: &CStr) -> Option<Library> {
        // SAFETY: dlopen with a valid C string.
        let handle = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        (!handle.is_null()).then_some(Library { handle })
    }

    /// The address of `name` in this library (or its dependencies), or null.
    pub fn symbol(&self, name: &CStr) -> *mut c_void {
        // SAFETY: valid handle and C string.
        unsafe { real_dlsym()(self.handle, name.as_ptr()) }
    }
}
