//! Finds the C library's own `dlsym` and `dlvsym` without calling either.
//!
//! The shim exports both names, so any `dlsym`/`dlvsym` the shim itself calls binds to its own
//! exports (a preloaded library comes first in the global scope, and an unversioned definition
//! satisfies a versioned reference). The real ones are read from the C library's dynamic symbol
//! table in memory instead: the loaded object whose name is `libc.so.6` (glibc ≥ 2.34) or
//! `libdl.so.2` (older glibc), its GNU hash table, and the default (non-hidden) version of the
//! name.

use std::ffi::{c_int, c_void, CStr};

const DT_NULL: i64 = 0;
const DT_STRTAB: i64 = 5;
const DT_SYMTAB: i64 = 6;
const DT_GNU_HASH: i64 = 0x6fff_fef5;
const DT_VERSYM: i64 = 0x6fff_fff0;
/// A hidden (non-default) version: `name@VER` rather than `name@@VER`.
const VERSYM_HIDDEN: u16 = 0x8000;

#[repr(C)]
struct Dyn {
    tag: i64,
    value: u64,
}

struct Query<'a> {
    name: &'a [u8],
    found: usize,
}

fn gnu_hash(name: &[u8]) -> u32 {
    name.iter().fold(5381u32, |h, &b| h.wrapping_mul(33).wrapping_add(u32::from(b)))
}

/// The address of the default version of `name` in the loaded C library (`libdl.so.2` first,
/// where older glibc keeps these, then `libc.so.6`), or `None`.
pub fn libc_symbol(name: &CStr) -> Option<usize> {
    for object in [&b"libdl.so.2"[..], b"libc.so.6"] {
        let mut query = (object, Query { name: name.to_bytes(), found: 0 });
        // SAFETY: the callback only reads the loader's structures for the duration of the call.
        unsafe { libc::dl_iterate_phdr(Some(visit), (&mut query as *mut (&[u8], Query)).cast()) };
        if query.1.found != 0 {
            return Some(query.1.found);
        }
    }
    None
}

unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
    // SAFETY: `data` is the (object, query) pair `libc_symbol` passed; `info` the loader's.
    let (object, query) = unsafe { &mut *data.cast::<(&[u8], Query)>() };
    // SAFETY: `info` is the non-null dl_phdr_info dl_iterate_phdr hands this callback; it stays valid until the callback returns.
    let info = unsafe { &*info };
    if info.dlpi_name.is_null() {
        return 0;
    }
    // SAFETY: `dlpi_name` was checked non-null above, and the loader keeps it a NUL-terminated path while the object is loaded.
    let path = unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes();
    let file = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    if file != *object {
        return 0;
    }
    // SAFETY: the program headers and dynamic section of a loaded object.
    if let Some(address) = unsafe { lookup(info, query.name) } {
        query.found = address;
        return 1;
    }
    0
}

unsafe fn lookup(info: &libc::dl_phdr_info, name: &[u8]) -> Option<usize> {
    let base = info.dlpi_addr as usize;
    // SAFETY: the loader's `dlpi_phdr` points at `dlpi_phnum` program headers of this loaded object, as `lookup`'s caller guarantees.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    let dynamic = phdrs.iter().find(|p| p.p_type == libc::PT_DYNAMIC)?;
    let mut entry = (base + dynamic.p_vaddr as usize) as *const Dyn;
    let (mut strtab, mut symtab, mut hash, mut versym) = (0usize, 0usize, 0usize, 0usize);
    loop {
        // SAFETY: `entry` walks the object's mapped PT_DYNAMIC array (base + p_vaddr), which ends with DT_NULL, where the loop stops.
        let d = unsafe { &*entry };
        // glibc relocates these in place on x86-64; an unrelocated one is an offset.
        let at = if (d.value as usize) < base { base + d.value as usize } else { d.value as usize };
        match d.tag {
            DT_NULL => break,
            DT_STRTAB => strtab = at,
            DT_SYMTAB => symtab = at,
            DT_GNU_HASH => hash = at,
            DT_VERSYM => versym = at,
            _ => {}
        }
        // SAFETY: `d` was not DT_NULL, so the array has a further entry and `entry + 1` is still inside it.
        entry = unsafe { entry.add(1) };
    }
    if strtab == 0 || symtab == 0 || hash == 0 {
        return None;
    }
    let header = hash as *const u32;
    // SAFETY: DT_GNU_HASH gives the mapped GNU hash table, whose header starts with nbuckets, symoffset and bloom_size words.
    let (nbuckets, symoffset, bloom_words) = unsafe { (*header, *header.add(1), *header.add(2)) };
    if nbuckets == 0 {
        return None;
    }
    // SAFETY: GNU hash layout: 4 header words, then `bloom_words` 64-bit bloom words, then the buckets, all inside the mapped table.
    let buckets = unsafe { header.add(4).cast::<u64>().add(bloom_words as usize).cast::<u32>() };
    // SAFETY: the chain array directly follows the `nbuckets` buckets in the same mapped table.
    let chains = unsafe { buckets.add(nbuckets as usize) };
    let h = gnu_hash(name);
    // SAFETY: `h % nbuckets` < nbuckets (nbuckets != 0 was checked), so this reads inside the bucket array.
    let mut index = unsafe { *buckets.add((h % nbuckets) as usize) };
    if index < symoffset {
        return None;
    }
    loop {
        // SAFETY: `index` >= symoffset (checked above) and a chain ends at an entry with its low bit set (the loop stops there), so this stays in the chain array.
        let chain = unsafe { *chains.add((index - symoffset) as usize) };
        if (chain | 1) == (h | 1) {
            // SAFETY: `index` comes from the GNU hash chains, so it is a valid index into the dynamic symbol table DT_SYMTAB points at.
            let sym = unsafe { &*(symtab as *const libc::Elf64_Sym).add(index as usize) };
            // SAFETY: `st_name` is an offset into DT_STRTAB, whose entries are NUL-terminated strings.
            let sym_name = unsafe { CStr::from_ptr((strtab + sym.st_name as usize) as *const std::ffi::c_char) };
            // SAFETY: DT_VERSYM holds one u16 per dynamic symbol, and `index` is a valid symbol index.
            let hidden = versym != 0 && unsafe { *(versym as *const u16).add(index as usize) } & VERSYM_HIDDEN != 0;
            if sym_name.to_bytes() == name && sym.st_shndx != 0 && sym.st_value != 0 && !hidden {
                return Some(base + sym.st_value as usize);
            }
        }
        if chain & 1 == 1 {
            return None;
        }
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (file, symbol) the loader says `address` belongs to.
    fn whose(address: usize) -> (String, String) {
        // SAFETY: `Dl_info` is plain C data (pointers and an address), for which all-zero is a valid value.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr only uses `address` as a number and writes into the local `info`.
        assert_ne!(unsafe { libc::dladdr(address as *const c_void, &mut info) }, 0);
        // SAFETY: called only on dli_fname/dli_sname after dladdr succeeded (asserted above); both are NUL-terminated strings (dli_sname non-null because the address is an exported symbol).
        let text = |p: *const std::ffi::c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        (text(info.dli_fname), text(info.dli_sname))
    }

    #[test]
    fn finds_the_c_librarys_dlsym_and_dlvsym() {
        // (This test binary exports the shim's own dlsym and dlvsym, as the preloaded shim does.)
        for name in [c"dlsym", c"dlvsym"] {
            let address = libc_symbol(name).expect("found");
            let (file, symbol) = whose(address);
            assert!(file.contains("libc.so") || file.contains("libdl.so"), "{file}");
            assert_eq!(symbol, name.to_str().unwrap());
        }
        assert_eq!(libc_symbol(c"gpuslice_no_such_symbol"), None);
    }
}
