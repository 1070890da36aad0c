//! The PTX inside a CUDA fat binary (what `nvcc` embeds in every program and what
//! `cuModuleLoadData`/`cuLibraryLoadData`/`cuModuleLoadFatBinary` receive from the runtime), so that a
//! load can be sliced when the image carries PTX for the device. Only uncompressed PTX is returned;
//! a compressed entry is listed as such and left alone (slicing it needs its codec: part 2).
//!
//! Layout (little-endian), as public reverse-engineering of `cuobjdump` describes it: a 16-byte
//! header (`u32` magic `0xBA55ED50`, `u16` version 1, `u16` header size, `u64` bytes of entries that
//! follow), then entries back to back, each a header of at least 64 bytes (`u16` kind: 1 PTX, 2 ELF;
//! `u32` header size at 4; `u64` payload size at 8; `u32` architecture at 28, e.g. 90; `u64` flags at
//! 40) followed by its payload. Several containers may follow each other.

const MAGIC: u32 = 0xBA55_ED50;
const HEADER: usize = 16;
const ENTRY_MIN: usize = 64;
const KIND_PTX: u16 = 1;
/// Flag bits that mark a compressed payload (the older codec, and zstd from CUDA 12.8 on).
const COMPRESSED: u64 = 0x2000 | 0x8000;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// 1 PTX, 2 ELF (a cubin), others exist.
    pub kind: u16,
    pub arch: u32,
    pub compressed: bool,
    /// Where the payload lies in the image.
    pub payload: std::ops::Range<usize>,
}

impl Entry {
    pub fn is_ptx(&self) -> bool {
        self.kind == KIND_PTX
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FatbinError {
    #[error("not a fat binary (no 0xBA55ED50 magic at byte {0})")]
    Magic(usize),
    #[error("fat binary truncated or inconsistent at byte {0}")]
    Truncated(usize),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Kind, header size, payload size, architecture and flags of the entry at `at`.
fn entry_header(b: &[u8], at: usize) -> Option<(u16, usize, usize, u32, u64)> {
    Some((u16_at(b, at)?, u32_at(b, at + 4)? as usize, usize::try_from(u64_at(b, at + 8)?).ok()?, u32_at(b, at + 28)?, u64_at(b, at + 40)?))
}

/// Whether `image` starts with a fat binary header.
pub fn is_fatbin(image: &[u8]) -> bool {
    u32_at(image, 0) == Some(MAGIC)
}

/// Every entry of every container in `image`, which must start with a container.
pub fn entries(image: &[u8]) -> Result<Vec<Entry>, FatbinError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < image.len() {
        if u32_at(image, at) != Some(MAGIC) {
            if out.is_empty() {
                return Err(FatbinError::Magic(at));
            }
            break; // trailing padding after the last container
        }
        let header_size = u16_at(image, at + 6).ok_or(FatbinError::Truncated(at))? as usize;
        let body = u64_at(image, at + 8).ok_or(FatbinError::Truncated(at))?;
        let start = at + header_size.max(HEADER);
        let end = usize::try_from(body).ok().and_then(|b| start.checked_add(b)).filter(|&e| e <= image.len()).ok_or(FatbinError::Truncated(at))?;
        let mut e = start;
        while e + ENTRY_MIN <= end {
            // Inside the container, so the 64 bytes of the entry header are there.
            let (kind, size, payload_size, arch, flags) = entry_header(image, e).ok_or(FatbinError::Truncated(e))?;
            let payload = e + size
                ..e.checked_add(size).and_then(|p| p.checked_add(payload_size)).filter(|&p| p <= end && size >= ENTRY_MIN).ok_or(FatbinError::Truncated(e))?;
            let compressed = flags & COMPRESSED != 0 || image.get(payload.start..payload.start + 4) == Some(&ZSTD_MAGIC[..]);
            e = payload.end;
            out.push(Entry { kind, arch, compressed, payload });
        }
        at = end;
    }
    Ok(out)
}

/// The uncompressed PTX of the highest architecture not above `arch` (the one the driver would JIT
/// for a device of that compute capability), as text up to its terminating NUL.
pub fn ptx_for(image: &[u8], arch: u32) -> Option<(Entry, &str)> {
    let list = entries(image).ok()?;
    let best = list.iter().filter(|e| e.is_ptx() && !e.compressed && e.arch <= arch).max_by_key(|e| e.arch)?.clone();
    let bytes = &image[best.payload.clone()];
    let text = std::str::from_utf8(&bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())]).ok()?;
    Some((best, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An entry header of 64 bytes and its payload padded to 8 bytes.
    fn entry(kind: u16, arch: u32, flags: u64, payload: &[u8]) -> Vec<u8> {
        let padded = payload.len().next_multiple_of(8);
        let mut e = vec![0u8; 64];
        e[0..2].copy_from_slice(&kind.to_le_bytes());
        e[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
        e[4..8].copy_from_slice(&64u32.to_le_bytes());
        e[8..16].copy_from_slice(&(padded as u64).to_le_bytes());
        e[28..32].copy_from_slice(&arch.to_le_bytes());
        e[40..48].copy_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(payload);
        e.resize(64 + padded, 0);
        e
    }

    fn container(entries: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = entries.concat();
        let mut c = Vec::new();
        c.extend_from_slice(&MAGIC.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&16u16.to_le_bytes());
        c.extend_from_slice(&(body.len() as u64).to_le_bytes());
        c.extend(body);
        c
    }

    #[test]
    fn finds_the_ptx_for_the_device_among_cubins_and_containers() {
        let ptx80 = b".version 8.0\n.target sm_80\n\0";
        let ptx90 = b".version 8.7\n.target sm_90\n\0";
        let mut image = container(&[entry(2, 90, 0x8000, &[0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3]), entry(1, 80, 0, ptx80)]);
        image.extend(container(&[entry(1, 90, 0, ptx90), entry(1, 100, 0, b".target sm_100\0")]));
        let list = entries(&image).unwrap();
        assert_eq!(list.iter().map(|e| (e.kind, e.arch, e.compressed)).collect::<Vec<_>>(), [(2, 90, true), (1, 80, false), (1, 90, false), (1, 100, false)]);
        let (e, text) = ptx_for(&image, 90).unwrap();
        assert_eq!((e.arch, text), (90, ".version 8.7\n.target sm_90\n"));
        assert_eq!(ptx_for(&image, 89).unwrap().1, ".version 8.0\n.target sm_80\n");
        assert!(ptx_for(&image, 75).is_none());
    }

    #[test]
    fn compressed_ptx_is_listed_not_returned() {
        let image = container(&[entry(1, 90, 0x2000, b"\x10compressed")]);
        assert!(entries(&image).unwrap()[0].compressed);
        assert!(ptx_for(&image, 90).is_none());
    }

    #[test]
    fn bad_images_are_errors() {
        assert_eq!(entries(b"not a fatbin at all"), Err(FatbinError::Magic(0)));
        let mut image = container(&[entry(1, 90, 0, b".version 8.7\0")]);
        image.truncate(image.len() - 3);
        assert!(matches!(entries(&image), Err(FatbinError::Truncated(0))));
    }

    proptest! {
        #[test]
        fn any_bytes_after_a_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400), claimed in 0u64..600) {
            let mut image = MAGIC.to_le_bytes().to_vec();
            image.extend_from_slice(&1u16.to_le_bytes());
            image.extend_from_slice(&16u16.to_le_bytes());
            image.extend_from_slice(&claimed.to_le_bytes());
            image.extend(body);
            let _ = entries(&image);
            let _ = ptx_for(&image, 90);
        }
    }
}
