//! A kernel's parameter layout: each `.param`'s size, alignment and offset in the parameter buffer,
//! which is what the shim needs to append the slice parameter to `kernelParams` or to an `extra`
//! (`CU_LAUNCH_PARAM_BUFFER_POINTER`) buffer.

use crate::lex::Token;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSlot {
    pub name: String,
    /// Byte offset in the packed parameter buffer (each parameter at its own alignment).
    pub offset: u32,
    pub size: u32,
    pub align: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamError {
    #[error("parameter `{0}` has no type the layout knows")]
    NoType(String),
    #[error("parameter `{0}` has a bad array length or alignment")]
    BadNumber(String),
    #[error("a parameter declaration is empty or has no name")]
    NoName,
}

/// Size in bytes of a PTX fundamental type (`.u32`, `.f64`, `.b8`, `.pred`...), `None` if unknown.
pub fn type_size(ty: &str) -> Option<u32> {
    Some(match ty {
        ".b8" | ".u8" | ".s8" | ".pred" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        ".b128" => 16,
        _ => return None,
    })
}

fn number(text: &str, name: &str) -> Result<u32, ParamError> {
    text.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| ParamError::BadNumber(name.to_string()))
}

/// One declaration: `.param [.align N] TYPE [.ptr [.space] [.align N]] NAME [ '[' N ']' ]`.
fn slot(decl: &[Token]) -> Result<(String, u32, u32), ParamError> {
    let name_at = decl.iter().rposition(|t| !t.text.starts_with('.') && !matches!(t.text.as_str(), "[" | "]") && t.text.parse::<u32>().is_err());
    let name = name_at.map(|i| decl[i].text.clone()).ok_or(ParamError::NoName)?;
    let name_at = name_at.unwrap_or_default();
    let ty = decl[..name_at].iter().find_map(|t| type_size(&t.text)).ok_or_else(|| ParamError::NoType(name.clone()))?;
    let mut align = None;
    for (i, t) in decl[..name_at].iter().enumerate() {
        // The `.align` after `.ptr` is the alignment of what the pointer points to, not the parameter's.
        if t.is(".ptr") {
            break;
        }
        if t.is(".align") {
            align = Some(number(decl.get(i + 1).map_or("", |t| &t.text), &name)?);
        }
    }
    let count = match (decl.get(name_at + 1), decl.get(name_at + 2)) {
        (Some(open), Some(n)) if open.is("[") => number(&n.text, &name)?,
        _ => 1,
    };
    let size = ty.checked_mul(count).ok_or_else(|| ParamError::BadNumber(name.clone()))?;
    Ok((name, size, align.unwrap_or(ty)))
}

/// The layout of the parameter list `tokens` (what lies between the parentheses).
pub fn layout(tokens: &[Token]) -> Result<Vec<ParamSlot>, ParamError> {
    let mut slots = Vec::new();
    let mut end = 0u32;
    for decl in tokens.split(|t| t.is(",")).filter(|d| !d.is_empty()) {
        let (name, size, align) = slot(decl)?;
        if !align.is_power_of_two() {
            return Err(ParamError::BadNumber(name));
        }
        let offset = end.next_multiple_of(align);
        end = offset + size;
        slots.push(ParamSlot { name, offset, size, align });
    }
    Ok(slots)
}

/// Bytes the parameters take, up to the end of the last one.
pub fn total_size(slots: &[ParamSlot]) -> u32 {
    slots.last().map_or(0, |s| s.offset + s.size)
}

/// A packed parameter buffer (what `cuLaunchKernel`'s `extra` passes with
/// `CU_LAUNCH_PARAM_BUFFER_POINTER`) with the slice parameter's bytes at `slot.offset`: the kernel's
/// own bytes up to there (zero padding if the caller's buffer stopped short of the aligned offset),
/// then `slice`. The new length is what `CU_LAUNCH_PARAM_BUFFER_SIZE` must say.
pub fn append_to_packed(buffer: &[u8], slot: &ParamSlot, slice: &[u8]) -> Vec<u8> {
    let at = slot.offset as usize;
    let mut out = buffer[..buffer.len().min(at)].to_vec();
    out.resize(at, 0);
    out.extend_from_slice(slice);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lex::lex;

    fn of(text: &str) -> Vec<ParamSlot> {
        layout(&lex(text).unwrap().0).unwrap()
    }

    #[test]
    fn scalars_pointers_and_structs_are_aligned() {
        let slots = of(".param .u32 a, .param .u64 .ptr .global .align 1 b, .param .u8 c, .param .align 16 .b8 d[40], .param .f32 e");
        let got: Vec<(u32, u32, u32)> = slots.iter().map(|s| (s.offset, s.size, s.align)).collect();
        assert_eq!(got, [(0, 4, 4), (8, 8, 8), (16, 1, 1), (32, 40, 16), (72, 4, 4)]);
        assert_eq!(slots[3].name, "d");
        assert_eq!(total_size(&slots), 76);
    }

    #[test]
    fn the_slice_parameter_lands_at_its_offset_in_a_packed_buffer() {
        let slot = ParamSlot { name: "s".into(), offset: 12, size: 4, align: 4 };
        assert_eq!(append_to_packed(&[1; 9], &slot, &[7; 4]), [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 7, 7, 7, 7]);
        // A caller that padded its buffer past the last parameter: the padding is not the kernel's.
        assert_eq!(append_to_packed(&[1; 16], &slot, &[7; 4]).len(), 16);
    }

    #[test]
    fn empty_and_malformed_lists() {
        assert!(of("").is_empty());
        assert_eq!(layout(&lex(".param .q32 a").unwrap().0), Err(ParamError::NoType("a".into())));
        assert_eq!(layout(&lex(".param .align 3 .b8 a[4]").unwrap().0), Err(ParamError::BadNumber("a".into())));
    }
}
