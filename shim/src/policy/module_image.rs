//! What a module image declares of `__device__` data, read before the driver loads it, so that a
//! load that cannot fit is refused without ever touching the device, and so that data the driver
//! places lazily is counted from the load on.
//!
//! Two formats are read: a cubin (ELF: the sizes of its `.nv.global*` sections, the
//! uninitialised and initialised `__device__` variables) and PTX text (`.global` array
//! declarations: element size × extents). Fatbins (often compressed) and anything else declare
//! nothing here; the measurement around the load (`modules`) still counts them.

use std::ffi::CStr;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Images larger than this are not parsed (a sanity bound on offsets read from the image).
const MAX_IMAGE: u64 = 1 << 32;

/// The declared bytes of an in-memory image (cuModuleLoadData and friends).
///
/// # Safety
/// `image` is what the program passes the driver: a complete cubin, or NUL-terminated PTX.
pub unsafe fn declared_in_memory(image: *const u8) -> u64 {
    if image.is_null() {
        return 0;
    }
    // SAFETY: every image the driver accepts is at least 4 bytes (ELF header, or PTX text
    // whose first bytes are read up to its NUL).
    let head = unsafe { std::slice::from_raw_parts(image, 4) };
    if head == ELF_MAGIC {
        // SAFETY: a cubin; its header says how far its section headers go.
        return unsafe { elf_in_memory(image) }.unwrap_or(0);
    }
    if head.iter().all(|b| b.is_ascii() && *b != 0) {
        // SAFETY: PTX is NUL-terminated.
        let text = unsafe { CStr::from_ptr(image.cast()) };
        return ptx_globals(&String::from_utf8_lossy(text.to_bytes()));
    }
    0
}

/// The declared bytes of an image file (cuModuleLoad, cuLibraryLoadFromFile).
pub fn declared_in_file(path: &CStr) -> u64 {
    let Ok(path) = path.to_str() else { return 0 };
    let Ok(bytes) = std::fs::read(path) else { return 0 };
    if bytes.starts_with(ELF_MAGIC) {
        return elf_globals(&bytes).unwrap_or(0);
    }
    if bytes.iter().take(4).all(u8::is_ascii) {
        return ptx_globals(&String::from_utf8_lossy(&bytes));
    }
    0
}

fn u16_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?)))
}
fn u32_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?)))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// (section headers' offset, entry size, count) from a 64-bit ELF header.
fn elf_layout(header: &[u8]) -> Option<(u64, u64, u64)> {
    if header.get(4) != Some(&2) {
        return None; // not ELF64 (every cubin of a 64-bit program is)
    }
    Some((u64_at(header, 0x28)?, u16_at(header, 0x3a)?, u16_at(header, 0x3c)?))
}

/// The image's length as its section headers bound it, read from memory.
unsafe fn elf_in_memory(image: *const u8) -> Option<u64> {
    // SAFETY: an ELF64 header is 64 bytes.
    let header = unsafe { std::slice::from_raw_parts(image, 64) };
    let (shoff, entsize, count) = elf_layout(header)?;
    let table_end = shoff.checked_add(entsize.checked_mul(count)?)?;
    if entsize < 64 || table_end > MAX_IMAGE {
        return None;
    }
    // SAFETY: the section header table lies inside the image (the driver reads it too).
    let table = unsafe { std::slice::from_raw_parts(image.add(shoff as usize), (entsize * count) as usize) };
    // The string table of section names is a section too: find how far the sections reach.
    let mut end = table_end;
    for i in 0..count {
        let at = (i * entsize) as usize;
        let (kind, offset, size) = (u32_at(table, at + 4)?, u64_at(table, at + 24)?, u64_at(table, at + 32)?);
        if kind != SHT_NOBITS {
            end = end.max(offset.checked_add(size)?);
        }
    }
    if end > MAX_IMAGE {
        return None;
    }
    // SAFETY: every section's bytes lie inside the image.
    elf_globals(unsafe { std::slice::from_raw_parts(image, end as usize) })
}

const SHT_NOBITS: u64 = 8;

/// The summed sizes of the `.nv.global*` sections of a complete ELF image.
pub fn elf_globals(image: &[u8]) -> Option<u64> {
    let (shoff, entsize, count) = elf_layout(image)?;
    let strndx = u16_at(image, 0x3e)?;
    if entsize < 64 || strndx >= count {
        return None;
    }
    let section = |i: u64| -> Option<(u64, u64, u64, u64)> {
        let at = usize::try_from(shoff.checked_add(i.checked_mul(entsize)?)?).ok()?;
        Some((u32_at(image, at)?, u32_at(image, at + 4)?, u64_at(image, at + 24)?, u64_at(image, at + 32)?))
    };
    let (_, _, names_at, names_size) = section(strndx)?;
    let names = image.get(usize::try_from(names_at).ok()?..usize::try_from(names_at.checked_add(names_size)?).ok()?)?;
    let mut total = 0u64;
    for i in 0..count {
        let (name, _, _, size) = section(i)?;
        let name = names.get(usize::try_from(name).ok()?..)?;
        let name = &name[..name.iter().position(|&b| b == 0)?];
        if name.starts_with(b".nv.global") {
            total = total.saturating_add(size);
        }
    }
    Some(total)
}

/// The bytes of the `.global` arrays and scalars PTX text declares (definitions, not `.extern`).
pub fn ptx_globals(text: &str) -> u64 {
    let mut total = 0u64;
    for line in text.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        if !words.contains(&".global") || words.contains(&".extern") || !line.ends_with(';') {
            continue;
        }
        let Some(element) = words.iter().find_map(|w| ptx_type_bytes(w)) else { continue };
        // The declarator: the last word, with its extents (`name[4096][16]`), before any `=`.
        let declarator = line.split('=').next().unwrap_or("").trim().trim_end_matches(';');
        let Some(name) = declarator.split_whitespace().last() else { continue };
        let mut count = 1u64;
        for extent in name.split('[').skip(1) {
            let n = extent.trim_end_matches(']').trim().parse::<u64>().unwrap_or(1);
            count = count.saturating_mul(n);
        }
        total = total.saturating_add(count.saturating_mul(element));
    }
    total
}

fn ptx_type_bytes(word: &str) -> Option<u64> {
    Some(match word {
        ".b8" | ".u8" | ".s8" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with sections: null, .shstrtab, .nv.global (NOBITS, `big`), .text,
    /// .nv.global.init (`init`).
    fn cubin(big: u64, init: u64) -> Vec<u8> {
        let names = b"\0.shstrtab\0.nv.global\0.text\0.nv.global.init\0";
        let mut image = vec![0u8; 64];
        image[..4].copy_from_slice(ELF_MAGIC);
        image[4] = 2;
        image[5] = 1;
        let names_at = image.len() as u64;
        image.extend_from_slice(names);
        let init_at = image.len() as u64;
        image.extend(std::iter::repeat_n(7u8, init as usize));
        let shoff = image.len() as u64;
        let sections: [(u32, u32, u64, u64); 5] =
            [(0, 0, 0, 0), (1, 3, names_at, names.len() as u64), (11, SHT_NOBITS as u32, 0, big), (22, 1, 0, 0), (28, 1, init_at, init)];
        for (name, kind, offset, size) in sections {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[24..32].copy_from_slice(&offset.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            image.extend_from_slice(&h);
        }
        image[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        image[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        image[0x3c..0x3e].copy_from_slice(&5u16.to_le_bytes());
        image[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        image
    }

    #[test]
    fn a_cubin_declares_its_nv_global_sections() {
        let image = cubin(256 << 20, 100);
        assert_eq!(elf_globals(&image), Some((256 << 20) + 100));
        // SAFETY: `image` is a complete cubin built above and alive for the call.
        assert_eq!(unsafe { declared_in_memory(image.as_ptr()) }, (256 << 20) + 100);
        let dir = tempfile_dir();
        let path = dir.join("m.cubin");
        std::fs::write(&path, &image).unwrap();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        assert_eq!(declared_in_file(&c), (256 << 20) + 100);
        // Truncated or corrupt: nothing declared, no panic.
        assert_eq!(elf_globals(&image[..image.len() - 40]), None);
        assert_eq!(elf_globals(&image[..64]), None);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("gpuslice-module-image-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn ptx_declares_its_global_arrays() {
        let ptx = "//\n.version 8.5\n.target sm_90\n.address_size 64\n\
                   .global .align 1 .b8 big[268435456];\n\
                   .visible .global .align 4 .u32 table[16][1024];\n\
                   .global .align 8 .u64 counter = 5;\n\
                   .extern .global .align 1 .b8 elsewhere[4096];\n\
                   .visible .entry touch(.param .u64 n) { ret; }\n";
        assert_eq!(ptx_globals(ptx), (256 << 20) + 16 * 1024 * 4 + 8);
        let c = std::ffi::CString::new(ptx).unwrap();
        // SAFETY: `c` is NUL-terminated PTX, alive for the call.
        assert_eq!(unsafe { declared_in_memory(c.as_ptr().cast()) }, (256 << 20) + 16 * 1024 * 4 + 8);
        // SAFETY: a NUL-terminated literal longer than 4 bytes, alive for the call.
        assert_eq!(unsafe { declared_in_memory(c"SIMMODULE 5".as_ptr().cast()) }, 0);
    }
}
