//! The arguments of one launch of a sliced kernel: the program's parameters plus the slice
//! parameter (block offset and original grid), either as one more `kernelParams` pointer or as
//! 24 more bytes of the packed `extra` buffer.

use gpuslice_ptx::params::{append_to_packed, ParamSlot};
use std::ffi::c_void;

/// `CU_LAUNCH_PARAM_END`, `CU_LAUNCH_PARAM_BUFFER_POINTER`, `CU_LAUNCH_PARAM_BUFFER_SIZE`.
const PARAM_END: usize = 0;
const BUFFER_POINTER: usize = 1;
const BUFFER_SIZE: usize = 2;
/// Most entries read from an `extra` array (it has three pairs and an end in practice).
const MAX_EXTRA: usize = 16;

/// What a slice's launch passes; holds the memory its pointers point to.
pub struct SliceArgs {
    slice: Box<[u8; 24]>,
    params: Vec<*mut c_void>,
    buffer: Vec<u8>,
    size: Box<usize>,
    extra: Vec<*mut c_void>,
}

impl SliceArgs {
    /// The arguments for one slice (`slice`: its parameter's bytes) of a kernel of `params`
    /// parameters whose slice parameter sits at `slot` of a packed buffer. `None` when the
    /// program's arguments cannot be extended (an `extra` array this does not know).
    ///
    /// # Safety
    /// `params` and `extra` are the program's launch arguments, valid for this launch: `params`
    /// null or `params` pointers; `extra` null or a `CU_LAUNCH_PARAM_END`-terminated array.
    pub unsafe fn new(params: *mut *mut c_void, extra: *mut *mut c_void, count: usize, slot: &ParamSlot, slice: [u8; 24]) -> Option<SliceArgs> {
        let mut args = SliceArgs { slice: Box::new(slice), params: Vec::new(), buffer: Vec::new(), size: Box::new(0), extra: Vec::new() };
        if params.is_null() && !extra.is_null() {
            // SAFETY: the caller's `extra` array.
            let (buffer, size) = unsafe { packed(extra)? };
            args.buffer = append_to_packed(buffer.get(..size)?, slot, &args.slice[..]);
            *args.size = args.buffer.len();
            let size_ptr: *const usize = &*args.size;
            args.extra = vec![
                BUFFER_POINTER as *mut c_void,
                args.buffer.as_mut_ptr().cast(),
                BUFFER_SIZE as *mut c_void,
                size_ptr as *mut c_void,
                PARAM_END as *mut c_void,
            ];
            return Some(args);
        }
        if count > 0 && params.is_null() {
            return None;
        }
        // SAFETY: the program passes one pointer per parameter of the kernel.
        args.params = (0..count).map(|i| unsafe { *params.add(i) }).collect();
        args.params.push(args.slice.as_mut_ptr().cast());
        Some(args)
    }

    /// The `kernelParams` to pass (null on the packed route).
    pub fn params(&mut self) -> *mut *mut c_void {
        if self.params.is_empty() {
            std::ptr::null_mut()
        } else {
            self.params.as_mut_ptr()
        }
    }

    /// The `extra` to pass (null unless on the packed route).
    pub fn extra(&mut self) -> *mut *mut c_void {
        if self.extra.is_empty() {
            std::ptr::null_mut()
        } else {
            self.extra.as_mut_ptr()
        }
    }
}

/// The packed buffer and its size from an `extra` array; `None` for any other key.
unsafe fn packed(extra: *mut *mut c_void) -> Option<(&'static [u8], usize)> {
    let (mut buffer, mut size) = (std::ptr::null::<u8>(), None);
    for i in 0..MAX_EXTRA {
        // SAFETY: the array goes on until CU_LAUNCH_PARAM_END, in pairs before it.
        let (key, value) = unsafe { (*extra.add(2 * i) as usize, *extra.add(2 * i + 1)) };
        match key {
            PARAM_END => break,
            BUFFER_POINTER => buffer = value as *const u8,
            // SAFETY: CU_LAUNCH_PARAM_BUFFER_SIZE's value points to a size_t.
            BUFFER_SIZE if !value.is_null() => size = Some(unsafe { *(value as *const usize) }),
            _ => return None,
        }
    }
    let size = size?;
    // SAFETY: the program's buffer is `size` bytes long.
    (!buffer.is_null()).then(|| (unsafe { std::slice::from_raw_parts(buffer, size) }, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(offset: u32) -> ParamSlot {
        ParamSlot { name: "__gpuslice_slice".into(), offset, size: 24, align: 4 }
    }

    #[test]
    fn the_slice_is_one_more_pointer() {
        let (mut a, mut b) = (7u64, 9u32);
        let mut params: [*mut c_void; 2] = [(&mut a as *mut u64).cast(), (&mut b as *mut u32).cast()];
        // SAFETY: two valid parameter pointers.
        let mut args = unsafe { SliceArgs::new(params.as_mut_ptr(), std::ptr::null_mut(), 2, &slot(12), [3; 24]) }.unwrap();
        let p = args.params();
        // SAFETY: three pointers, as built.
        unsafe {
            assert_eq!(*(*p as *const u64), 7);
            assert_eq!(*(*p.add(1) as *const u32), 9);
            assert_eq!(*(*p.add(2) as *const [u8; 24]), [3; 24]);
        }
        assert!(args.extra().is_null());
    }

    /// An `extra` key or end marker as the array holds it.
    fn key(k: usize) -> *mut c_void {
        std::ptr::without_provenance_mut(k)
    }

    #[test]
    fn the_packed_buffer_grows_by_the_slice() {
        let mut buffer = [1u8; 12];
        let mut size = 12usize;
        let mut extra: [*mut c_void; 5] = [key(1), buffer.as_mut_ptr().cast(), key(2), (&mut size as *mut usize).cast(), key(0)];
        // SAFETY: a well-formed extra array.
        let mut args = unsafe { SliceArgs::new(std::ptr::null_mut(), extra.as_mut_ptr(), 1, &slot(12), [5; 24]) }.unwrap();
        let e = args.extra();
        // SAFETY: the array built above.
        unsafe {
            let n = *(*e.add(3) as *const usize);
            assert_eq!(n, 36);
            let b = std::slice::from_raw_parts(*e.add(1) as *const u8, n);
            assert_eq!(&b[..12], &[1; 12]);
            assert_eq!(&b[12..], &[5; 24]);
        }
        extra[0] = key(0x99);
        // SAFETY: as above, with a key this does not know.
        assert!(unsafe { SliceArgs::new(std::ptr::null_mut(), extra.as_mut_ptr(), 1, &slot(12), [5; 24]) }.is_none());
    }
}
