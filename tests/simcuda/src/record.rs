//! What a test checks after the fact: the PTX images the driver was handed (written out as they
//! came), each kernel's parameters as that PTX declares them, and each launch's grid, slice
//! parameter and place on the device timeline. On with `SIMCUDA_RECORD=DIR` (files
//! `DIR/<pid>-module-<n>.ptx` and `DIR/<pid>-launches.log`); the kernels' parameters are read
//! whether recording is on or not, since a sliced launch runs only its share of the blocks.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Name of the parameter the PTX slicer appends (gpuslice-ptx's `SLICE_PARAM_NAME`).
const SLICE_PARAM: &str = "__gpuslice_slice";
/// Largest PTX image read (the simulated device has no use for more).
const MAX_IMAGE: usize = 64 << 20;

/// One `.entry` of a PTX module: how many parameters, and which one is the slice parameter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub params: usize,
    pub slice_at: Option<usize>,
}

fn dir() -> Option<&'static str> {
    static DIR: OnceLock<Option<String>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var("SIMCUDA_RECORD").ok().filter(|d| !d.is_empty())).as_deref()
}

/// The text of an in-memory image if it is PTX (starts, after blanks, with `//` or `.`), read up
/// to its NUL.
///
/// # Safety
/// `image` must be readable up to its first NUL (the driver's own contract for PTX).
pub unsafe fn ptx_text(image: *const c_void) -> Option<String> {
    let p = image as *const u8;
    // SAFETY: the image is readable up to its NUL (this function's contract): each byte read
    // here comes before it, since none of them is a NUL.
    let at = |i: usize| unsafe { *p.add(i) };
    let mut i = 0;
    while i < 64 && matches!(at(i), b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    if !(at(i) == b'.' || (at(i) == b'/' && at(i + 1) == b'/')) {
        return None;
    }
    let mut n = 0;
    while n < MAX_IMAGE && at(n) != 0 {
        n += 1;
    }
    // SAFETY: the `n` bytes before the NUL were just read.
    Some(String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p, n) }).into_owned())
}

/// The kernels a PTX text declares. A text scan (this is a test double): each `.entry NAME`
/// followed by `( ... )` counts its `.param`s.
pub fn entries(ptx: &str) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut rest = ptx;
    while let Some(at) = rest.find(".entry") {
        rest = &rest[at + ".entry".len()..];
        let trimmed = rest.trim_start();
        let name: String = trimmed.chars().take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '$' | '.')).collect();
        if name.is_empty() {
            continue;
        }
        let after = trimmed[name.len()..].trim_start();
        let mut entry = Entry::default();
        if let (Some(body), true) = (after.strip_prefix('('), after.starts_with('(')) {
            let list = &body[..body.find(')').unwrap_or(body.len())];
            for (i, param) in list.split(".param").skip(1).enumerate() {
                entry.params = i + 1;
                if param.contains(SLICE_PARAM) {
                    entry.slice_at = Some(i);
                }
            }
        }
        out.insert(name, entry);
    }
    out
}

fn append(file: &str, line: &str) {
    let Some(dir) = dir() else { return };
    let path = format!("{dir}/{}-{file}", std::process::id());
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Writes a PTX image the driver was handed to `DIR/<pid>-module-<n>.ptx` and notes it.
pub fn image(handle: u64, ptx: &str) {
    static N: AtomicU64 = AtomicU64::new(0);
    let Some(dir) = dir() else { return };
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = format!("{dir}/{}-module-{n}.ptx", std::process::id());
    let _ = std::fs::write(&path, ptx);
    append("launches.log", &format!("load module={handle:#x} path={path}\n"));
}

/// One launch as the device ran it: `slice` is the slice parameter (offset x,y,z, original grid
/// x,y,z) when the kernel has one.
pub fn launch(name: &str, grid: [u32; 3], slice: Option<[u32; 6]>, start: u64, end: u64) {
    if dir().is_none() {
        return;
    }
    let slice = slice.map_or("-".to_string(), |s| s.map(|v| v.to_string()).join(","));
    append("launches.log", &format!("launch fn={name} grid={},{},{} slice={slice} start={start} end={end}\n", grid[0], grid[1], grid[2]));
}

/// The slice parameter's six words, from 24 bytes.
pub fn slice_words(bytes: &[u8]) -> Option<[u32; 6]> {
    let mut out = [0u32; 6];
    for (w, chunk) in out.iter_mut().zip(bytes.get(..24)?.chunks_exact(4)) {
        *w = u32::from_le_bytes(chunk.try_into().ok()?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_count_parameters_and_find_the_slice() {
        let ptx = ".version 8.0\n.visible .entry a(\n .param .u64 a_0,\n .param .align 4 .b8 __gpuslice_slice[24]\n)\n{ ret; }\n.visible .entry b()\n{ ret; }\n.entry c\n{ ret; }\n";
        let e = entries(ptx);
        assert_eq!(e["a"], Entry { params: 2, slice_at: Some(1) });
        assert_eq!(e["b"], Entry { params: 0, slice_at: None });
        assert_eq!(e["c"], Entry::default());
    }
}
