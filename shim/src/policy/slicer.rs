//! PTX slicing at module load: a low-priority process's PTX (text, a fat binary's PTX entry, a
//! `.ptx` file) goes through the slicer (`gpuslice-ptx`, cached on disk by a hash of the text),
//! the driver loads the sliced text in its place, and every launch of a kernel of such a module
//! is found here (`kernel`) so that it carries the slice parameter the sliced kernel reads.
//!
//! Decided at load time, once per module: a module loaded sliced stays sliced, whatever the
//! process's priority becomes, since its kernels read the slice parameter on every launch. A
//! process that never loads a sliced module pays one relaxed load per launch (`ANY`).

use crate::policy::{sched, slice_cost};
use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::sys::locks;
use gpuslice_common::ledger::Priority;
use gpuslice_ptx::cache::{self, Cache};
use gpuslice_ptx::params::ParamSlot;
use gpuslice_ptx::{fatbin, slice_module, ModuleOutcome};
use once_cell::sync::{Lazy, OnceCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

/// `GPUSLICE_SLICE`: `low` (the default: slice what a low-priority process loads), `all` (every
/// process: best-effort work at normal priority too), `off`.
pub const ENV_SLICE: &str = "GPUSLICE_SLICE";
/// `GPUSLICE_PTX_CACHE`: the cache directory (default `$XDG_CACHE_HOME/gpuslice/ptx`).
pub const ENV_CACHE: &str = "GPUSLICE_PTX_CACHE";
/// The largest PTX text read from memory (a NUL-terminated image has no length of its own).
const MAX_PTX: usize = 256 << 20;
/// `__fatBinC_Wrapper_t`'s magic: what `__cudaRegisterFatBinary` hands on (the fat binary is at
/// offset 8).
const WRAPPER_MAGIC: u32 = 0x466243b1;
const FATBIN_MAGIC: u32 = 0xBA55ED50;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Off,
    Low,
    All,
}

fn mode() -> Mode {
    static MODE: OnceCell<Mode> = OnceCell::new();
    *MODE.get_or_init(|| match std::env::var(ENV_SLICE).as_deref() {
        Ok("off") | Ok("0") => Mode::Off,
        Ok("all") => Mode::All,
        Ok("low") | Ok("") | Err(_) => Mode::Low,
        Ok(other) => {
            tracing::warn!("{ENV_SLICE}={other:?} is not low, all or off; PTX is not sliced");
            Mode::Off
        }
    })
}

/// Whether a load now is sliced: by the mode, and the process's priority at this moment.
fn wanted() -> bool {
    match mode() {
        Mode::Off => false,
        Mode::All => true,
        Mode::Low => {
            // The priority lives in the ledger: attach now if this is the process's first call
            // that needs it (a load usually comes before any allocation).
            let _ = crate::state::link::get_or_attach();
            sched::priority() == Priority::Low
        }
    }
}

fn cache() -> Option<&'static Cache> {
    static CACHE: OnceCell<Option<Cache>> = OnceCell::new();
    CACHE
        .get_or_init(|| {
            let dir = std::env::var_os(ENV_CACHE).filter(|d| !d.is_empty()).map(std::path::PathBuf::from).or_else(cache::default_dir)?;
            Cache::open(&dir, cache::DEFAULT_CAP_BYTES).map_err(|e| tracing::warn!("PTX slicing without a cache: {e}")).ok()
        })
        .as_ref()
}

/// What the driver loads in place of the program's image.
pub struct Sliced {
    pub ptx: CString,
    outcome: Arc<ModuleOutcome>,
}

/// The sliced form of `text`, when slicing is wanted now and at least one kernel was sliced.
/// Logs one line per module and one per kernel that runs as it is.
pub fn transform(text: &str, what: &str) -> Option<Sliced> {
    if !wanted() {
        return None;
    }
    if driver().is_none_or(|d| d.cuFuncGetModule.is_none() || d.cuFuncGetName.is_none()) {
        // A launch could not tell a sliced kernel from another (CUDA 12.3's cuFuncGetName).
        tracing::info!("{what}: PTX not sliced: this driver cannot name a launched kernel (cuFuncGetName needs CUDA 12.3)");
        return None;
    }
    let started = std::time::Instant::now();
    let result = match cache() {
        Some(c) => c.get_or_slice(text),
        None => slice_module(text).map(|o| (o, false)),
    };
    let (outcome, hit) = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("{what}: PTX not sliced (the slicer cannot read it: {e}); it runs as it is");
            return None;
        }
    };
    let sliced = outcome.kernels.iter().filter(|k| k.sliced).count();
    tracing::info!(
        "{what}: {sliced} of {} kernels sliced ({} of PTX, {}, {:.1} ms)",
        outcome.kernels.len(),
        text.len(),
        if hit { "from the cache" } else { "transformed" },
        started.elapsed().as_secs_f64() * 1e3
    );
    for k in outcome.kernels.iter().filter(|k| !k.sliced) {
        tracing::info!("{what}: kernel {} runs as it is: {}", k.name, k.reasons.join("; "));
    }
    if sliced == 0 {
        return None;
    }
    let ptx = CString::new(outcome.ptx.as_bytes()).ok()?;
    Some(Sliced { ptx, outcome: Arc::new(outcome) })
}

/// The sliced form of an in-memory image, when slicing is wanted now and it carries PTX.
///
/// # Safety
/// As `ptx_of_image`.
pub unsafe fn for_image(image: *const c_void, what: &str) -> Option<Sliced> {
    if !wanted() {
        return None;
    }
    // SAFETY: the caller's image.
    let Some(text) = (unsafe { ptx_of_image(image) }) else {
        // SAFETY: as above.
        tracing::info!("{what}: not sliced: {}; it runs as it is", unsafe { describe(image, device_arch()) });
        return None;
    };
    transform(&text, what)
}

/// A library load in a process whose loads are sliced: libraries never are (a launch may name
/// one of their kernels by `CUkernel`, which the launch side cannot place), but the log says
/// what the image carries, so a run tells whether slicing libraries would reach PTX at all.
///
/// # Safety
/// As `ptx_of_image`.
pub unsafe fn note_library(image: *const c_void, what: &str) {
    if !wanted() {
        return;
    }
    // SAFETY: the caller's image.
    tracing::info!("{what}: a library, not sliced: {}", unsafe { describe(image, device_arch()) });
}

/// What an image holds, in a few words for the log: a cubin, a fat binary's entries (kind,
/// architecture, compressed or not, grouped) and whether one is PTX the slicer could use for a
/// device of compute capability `arch` (90 for sm_90; `None` when no device is current).
///
/// # Safety
/// As `ptx_of_image`.
unsafe fn describe(image: *const c_void, arch: Option<u32>) -> String {
    // SAFETY: the caller's image.
    unsafe { describe_in(image, arch, true) }
}

/// `describe`, following a runtime wrapper only when `wrapper`.
///
/// # Safety
/// As `ptx_of_image`.
unsafe fn describe_in(image: *const c_void, arch: Option<u32>, wrapper: bool) -> String {
    if image.is_null() {
        return "no image".into();
    }
    let p = image as *const u8;
    // SAFETY: as in `ptx_in`: bytes before the first NUL, at most 16.
    let text_head = (0..16).take_while(|&i| unsafe { *p.add(i) } != 0).count();
    if text_head < 4 {
        return "neither PTX text, a cubin nor a fat binary".into();
    }
    // SAFETY: the first 4 bytes were just read.
    let first: [u8; 4] = unsafe { std::ptr::read_unaligned(p.cast()) };
    let magic = u32::from_le_bytes(first);
    if magic == WRAPPER_MAGIC {
        if !wrapper {
            return "a runtime wrapper inside a wrapper".into();
        }
        // SAFETY: a wrapper has a 16-byte header; its second word points to the fat binary.
        let inner = unsafe { std::ptr::read_unaligned(p.add(8).cast::<u64>()) } as *const c_void;
        // SAFETY: as above.
        return format!("the runtime's wrapper of {}", unsafe { describe_in(inner, arch, false) });
    }
    if &first == b"\x7fELF" {
        return "a cubin (ELF: machine code only, no PTX)".into();
    }
    if magic != FATBIN_MAGIC {
        return "neither PTX text, a cubin nor a fat binary".into();
    }
    // SAFETY: a fat binary has a 16-byte header and is as long as it says (as in `ptx_in`).
    let Some(bytes) = (unsafe { fatbin_bytes(p) }) else {
        return "a fat binary larger than the slicer reads".into();
    };
    let list = match fatbin::entries(bytes) {
        Ok(list) => list,
        Err(e) => return format!("a fat binary the reader refuses ({e})"),
    };
    // Entries grouped by (kind, architecture, compressed), in order of first appearance.
    let mut groups: Vec<((u16, u32, bool), usize)> = Vec::new();
    for e in &list {
        let key = (e.kind, e.arch, e.compressed);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => groups.push((key, 1)),
        }
    }
    let names: Vec<String> = groups
        .iter()
        .map(|&((kind, a, compressed), n)| {
            let what = match kind {
                1 => format!("PTX compute_{a}"),
                2 => format!("cubin sm_{a}"),
                k => format!("kind {k} arch {a}"),
            };
            format!("{}{what}{}", if n > 1 { format!("{n} x ") } else { String::new() }, if compressed { " (compressed)" } else { "" })
        })
        .collect();
    let usable = match arch {
        Some(a) if fatbin::ptx_for(bytes, a).is_some() => format!("uncompressed PTX for sm_{a}: yes"),
        Some(a) => format!("uncompressed PTX for sm_{a}: none"),
        None => "no current device to match".into(),
    };
    format!("a fat binary of {} entries: {}; {usable}", list.len(), names.join(", "))
}

/// The whole first container of a fat binary at `p` (header and entries).
///
/// # Safety
/// `p` must point to a fat binary (its 16-byte header read already showed the magic).
unsafe fn fatbin_bytes<'a>(p: *const u8) -> Option<&'a [u8]> {
    // SAFETY: the caller's fat binary has a 16-byte header.
    let head = unsafe { std::slice::from_raw_parts(p, 16) };
    // The header: magic, version (u16), header size (u16), size of what follows (u64).
    let header = u16::from_le_bytes([head[6], head[7]]) as usize;
    let size = u64::from_le_bytes(head[8..16].try_into().ok()?) as usize;
    let total = header.checked_add(size).filter(|&t| t <= MAX_PTX)?;
    // SAFETY: the fat binary is as long as its header says.
    Some(unsafe { std::slice::from_raw_parts(p, total) })
}

/// The sliced form of a module file (PTX text or a fat binary), when slicing is wanted now.
pub fn for_file(path: &CStr, what: &str) -> Option<Sliced> {
    if !wanted() {
        return None;
    }
    let path = std::path::Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path.to_bytes()));
    if std::fs::metadata(path).ok()?.len() > MAX_PTX as u64 {
        return None;
    }
    let mut bytes = std::fs::read(path).ok()?;
    // NUL-terminated and at least 16 bytes, as an in-memory image.
    bytes.resize(bytes.len().max(15) + 1, 0);
    // SAFETY: a complete copy of the file, NUL-terminated.
    transform(&unsafe { ptx_of_image(bytes.as_ptr().cast()) }?, what)
}

/// The PTX text of an in-memory image: PTX itself, or the PTX entry of a fat binary (or of the
/// wrapper the CUDA runtime registers) for the current device's architecture. Compressed PTX and
/// cubin-only fat binaries give `None`.
///
/// # Safety
/// `image` must be null or a valid module image as the driver's load functions take it.
pub unsafe fn ptx_of_image(image: *const c_void) -> Option<String> {
    // SAFETY: the caller's image.
    unsafe { ptx_in(image, true) }
}

/// `ptx_of_image`, following a runtime wrapper only when `wrapper` (one level: a wrapper of a
/// wrapper is not an image).
///
/// # Safety
/// As `ptx_of_image`.
unsafe fn ptx_in(image: *const c_void, wrapper: bool) -> Option<String> {
    if image.is_null() {
        return None;
    }
    let p = image as *const u8;
    // The first bytes, up to 16, stopping at a NUL: a short PTX text is not read past its end.
    // SAFETY: each byte read comes before the image's first NUL, or within a binary image's
    // 16-byte header (the magics below have no NUL byte).
    let text_head = (0..16).take_while(|&i| unsafe { *p.add(i) } != 0).count();
    let magic_len = text_head.min(4);
    // SAFETY: the first `magic_len` bytes were just read.
    let first = unsafe { std::slice::from_raw_parts(p, magic_len) };
    let magic = if magic_len == 4 { u32::from_le_bytes([first[0], first[1], first[2], first[3]]) } else { 0 };
    let binary = magic == WRAPPER_MAGIC || magic == FATBIN_MAGIC;
    // SAFETY: a fat binary or its wrapper has a 16-byte header; a text is read up to its NUL.
    let head = unsafe { std::slice::from_raw_parts(p, if binary { 16 } else { text_head }) };
    if magic == WRAPPER_MAGIC {
        let inner = u64::from_le_bytes(head[8..16].try_into().ok()?) as *const c_void;
        // SAFETY: the wrapper's second word points to the fat binary.
        return if wrapper { unsafe { ptx_in(inner, false) } } else { None };
    }
    if magic == FATBIN_MAGIC {
        // SAFETY: the magic was read from its 16-byte header.
        let bytes = unsafe { fatbin_bytes(p) }?;
        return fatbin::ptx_for(bytes, device_arch()?).map(|(_, text)| text.to_string());
    }
    let start = head.iter().position(|b| !b.is_ascii_whitespace())?;
    if !(head[start] == b'.' || head[start..].starts_with(b"//")) {
        return None;
    }
    // SAFETY: PTX text is NUL-terminated (the driver's contract); read no further than MAX_PTX.
    let len = (0..MAX_PTX).find(|&i| unsafe { *p.add(i) } == 0)?;
    // SAFETY: `len` bytes were just read.
    std::str::from_utf8(unsafe { std::slice::from_raw_parts(p, len) }).ok().map(str::to_string)
}

/// The current device's compute capability as the fat binary names it (90 for sm_90).
fn device_arch() -> Option<u32> {
    let device = driver()?.current_device()?;
    let attr = |a: i32| {
        let mut v = 0;
        (call_real!(cuDeviceGetAttribute(&mut v, a, device)) == CUDA_SUCCESS).then_some(v)
    };
    // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR.
    Some((attr(75)? * 10 + attr(76)?) as u32)
}

/// A kernel of a sliced module, as a launch needs it.
pub struct Kernel {
    module: usize,
    /// Its name, for the log.
    pub name: String,
    /// Its own parameters (the slice parameter comes after them).
    pub params: usize,
    /// Where the slice parameter goes in a packed parameter buffer.
    pub slot: ParamSlot,
    /// The measured device time of its blocks, which sizes its slices.
    pub cost: Mutex<slice_cost::Sampler>,
}

/// Set once a sliced module is loaded: until then no launch looks anything up.
static ANY: AtomicBool = AtomicBool::new(false);
/// Sliced modules, by `CUmodule`.
static MODULES: Lazy<Mutex<HashMap<usize, Arc<ModuleOutcome>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// The module table's lock, for a fork (`sys::atfork`): a leaf, held only around one lookup or
/// update. (`FUNCTIONS` is a read-write lock, which the fork holder does not take: a fork while
/// another thread writes it, at a kernel's first launch, would leave the child's copy locked.)
pub const FORK: crate::sys::atfork::Handlers =
    crate::sys::atfork::Handlers { prepare: |h| h.take(&MODULES, crate::sys::atfork::keep), in_child: crate::sys::atfork::nothing_to_forget };
/// What each `CUfunction` launched so far is: a sliced kernel, or `None`.
static FUNCTIONS: Lazy<RwLock<HashMap<usize, Option<Arc<Kernel>>>>> = Lazy::new(|| RwLock::new(HashMap::new()));

/// Notes a module loaded sliced. Functions remembered as not sliced are forgotten: the driver may
/// reuse an unloaded function's handle for one of this module.
pub fn remember(module: *mut c_void, sliced: Sliced) {
    locks::lock(&MODULES).insert(module as usize, sliced.outcome);
    FUNCTIONS.write().unwrap_or_else(|e| e.into_inner()).retain(|_, k| k.is_some());
    ANY.store(true, Relaxed);
}

/// A module is unloaded: its kernels are forgotten (their handles may come back for others).
pub fn forget(module: *mut c_void) {
    if !ANY.load(Relaxed) {
        return;
    }
    let m = module as usize;
    if locks::lock(&MODULES).remove(&m).is_some() {
        FUNCTIONS.write().unwrap_or_else(|e| e.into_inner()).retain(|_, k| k.as_ref().is_none_or(|k| k.module != m));
    }
}

/// The sliced kernel `f` is, if it is one. One relaxed load in a process that never loaded a
/// sliced module; after that, a read lock and a lookup (the driver is asked once per function).
#[inline(always)]
pub fn kernel(f: *mut c_void) -> Option<Arc<Kernel>> {
    if !ANY.load(Relaxed) {
        return None;
    }
    lookup(f as usize)
}

#[inline(never)]
fn lookup(f: usize) -> Option<Arc<Kernel>> {
    if let Some(known) = FUNCTIONS.read().unwrap_or_else(|e| e.into_inner()).get(&f) {
        return known.clone();
    }
    let found = resolve(f);
    FUNCTIONS.write().unwrap_or_else(|e| e.into_inner()).insert(f, found.clone());
    found
}

/// Asks the driver which module and name `f` has. A function the driver cannot place (a library
/// kernel: libraries are never sliced) is not a sliced kernel.
fn resolve(f: usize) -> Option<Arc<Kernel>> {
    let mut module: *mut c_void = std::ptr::null_mut();
    if call_real!(cuFuncGetModule(&mut module, f as *mut c_void)) != CUDA_SUCCESS {
        return None;
    }
    let outcome = locks::lock(&MODULES).get(&(module as usize))?.clone();
    let mut name: *const c_char = std::ptr::null();
    if call_real!(cuFuncGetName(&mut name, f as *mut c_void)) != CUDA_SUCCESS || name.is_null() {
        tracing::warn!("a kernel of a sliced module has no name the driver will tell (cuFuncGetName); its launches may fail");
        return None;
    }
    // SAFETY: the driver's NUL-terminated name, valid while the module is loaded.
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
    let k = outcome.kernel(&name).filter(|k| k.sliced)?;
    Some(Arc::new(Kernel {
        module: module as usize,
        name: name.into_owned(),
        params: k.params.len(),
        slot: k.slice_param.clone()?,
        cost: Mutex::new(slice_cost::Sampler::default()),
    }))
}

#[cfg(test)]
mod tests {
    use super::{describe, ptx_of_image, FATBIN_MAGIC, WRAPPER_MAGIC};

    fn of(bytes: &[u8]) -> Option<String> {
        // SAFETY: NUL-terminated test images.
        unsafe { ptx_of_image(bytes.as_ptr().cast()) }
    }

    #[test]
    fn ptx_text_is_found_and_nothing_else() {
        assert_eq!(of(b"  \n.version 8.0\n.target sm_90\n\0").as_deref(), Some("  \n.version 8.0\n.target sm_90\n"));
        assert_eq!(of(b"//\0").as_deref(), Some("//"), "a short text is read up to its NUL only");
        assert_eq!(of(b"/\0"), None);
        assert_eq!(of(b"\0"), None);
        assert_eq!(of(b"SIMMODULE 4096\0"), None);
        assert_eq!(of(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"), None, "a cubin");
    }

    /// A fat binary of one container: (kind, arch, flags, payload) entries with 64-byte headers.
    fn fatbin(entries: &[(u16, u32, u64, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(kind, arch, flags, payload) in entries {
            let padded = payload.len().next_multiple_of(8);
            let mut e = vec![0u8; 64];
            e[0..2].copy_from_slice(&kind.to_le_bytes());
            e[4..8].copy_from_slice(&64u32.to_le_bytes());
            e[8..16].copy_from_slice(&(padded as u64).to_le_bytes());
            e[28..32].copy_from_slice(&arch.to_le_bytes());
            e[40..48].copy_from_slice(&flags.to_le_bytes());
            e.extend_from_slice(payload);
            e.resize(64 + padded, 0);
            body.extend_from_slice(&e);
        }
        let mut c = FATBIN_MAGIC.to_le_bytes().to_vec();
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&16u16.to_le_bytes());
        c.extend_from_slice(&(body.len() as u64).to_le_bytes());
        c.extend_from_slice(&body);
        c
    }

    fn said(bytes: &[u8], arch: Option<u32>) -> String {
        // SAFETY: complete test images.
        unsafe { describe(bytes.as_ptr().cast(), arch) }
    }

    #[test]
    fn the_log_tells_what_an_unsliced_image_carries() {
        assert!(said(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0", Some(90)).starts_with("a cubin"));
        let ptx: &[u8] = b".version 8.0\n.target sm_90\n\0";
        // PyTorch's wheels: cubins for each arch, PTX for the last one, compressed.
        let torch_like = fatbin(&[(2, 80, 0, b"elf"), (2, 90, 0, b"elf"), (2, 90, 0, b"elf"), (1, 90, 0x2000, b"lz")]);
        assert_eq!(
            said(&torch_like, Some(90)),
            "a fat binary of 4 entries: cubin sm_80, 2 x cubin sm_90, PTX compute_90 (compressed); uncompressed PTX for sm_90: none"
        );
        let plain = fatbin(&[(2, 90, 0, b"elf"), (1, 90, 0, ptx)]);
        assert!(said(&plain, Some(90)).ends_with("uncompressed PTX for sm_90: yes"), "{}", said(&plain, Some(90)));
        assert!(said(&plain, Some(80)).ends_with("uncompressed PTX for sm_80: none"), "PTX for a later arch is no use");
        assert!(said(&plain, None).ends_with("no current device to match"));
        // The runtime's wrapper: magic, version, then the fat binary's address.
        let mut wrapper = WRAPPER_MAGIC.to_le_bytes().to_vec();
        wrapper.extend_from_slice(&1u32.to_le_bytes());
        wrapper.extend_from_slice(&(plain.as_ptr() as u64).to_le_bytes());
        wrapper.extend_from_slice(&[0u8; 8]);
        assert!(said(&wrapper, Some(90)).starts_with("the runtime's wrapper of a fat binary of 2 entries"));
        assert_eq!(said(b"SIMMODULE 4096\0", Some(90)), "neither PTX text, a cubin nor a fat binary");
        assert_eq!(said(b"ab\0", Some(90)), "neither PTX text, a cubin nor a fat binary");
        let mut truncated = fatbin(&[(2, 90, 0, b"elf")]);
        truncated[8..16].copy_from_slice(&1000u64.to_le_bytes());
        truncated.resize(1100, 0);
        assert!(said(&truncated, Some(90)).starts_with("a fat binary the reader refuses"), "{}", said(&truncated, Some(90)));
    }
}
