//! The dynamic loader underneath the shim: the real `dlsym`, and opening the real libraries.
//!
//! The shim exports its own `dlsym`, so every `dlsym` the shim itself (or any crate it uses)
//! makes lands in its own hook first. The hook forwards to the real one found here through
//! `dlvsym`, which the shim does not interpose, so nothing recurses.

use once_cell::sync::OnceCell;
use std::ffi::{c_char, c_void, CStr};

pub type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

static REAL_DLSYM: OnceCell<DlsymFn> = OnceCell::new();

/// glibc's `dlsym`. Aborts with a message if it cannot be found, since without it no symbol
/// lookup in the process could work at all (gpuslice needs glibc).
pub fn real_dlsym() -> DlsymFn {
    *REAL_DLSYM.get_or_init(|| {
        for version in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"] {
            // SAFETY: dlvsym with constant C strings; RTLD_NEXT from this object finds libc's.
            let p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
            if !p.is_null() {
                // SAFETY: the symbol is glibc's dlsym, whose ABI is DlsymFn.
                return unsafe { std::mem::transmute::<*mut c_void, DlsymFn>(p) };
            }
        }
        let msg = b"gpuslice: fatal: cannot find glibc's dlsym through dlvsym; gpuslice needs glibc\n";
        // SAFETY: writing a constant buffer to fd 2.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::abort();
        }
    })
}

/// An opened shared library whose symbols are looked up with the real `dlsym`.
pub struct Library {
    handle: *mut c_void,
}

// SAFETY: a dlopen handle is a process-wide token; dlsym on it is thread-safe.
unsafe impl Send for Library {}
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
