//! Byte sizes as people write them: `4GiB`, `512MiB`, `4096M`, `4g`, `1.5GiB`, `1048576`.
//!
//! Every suffix is binary (K = 1024), with or without `i` and `B`, in any case: device memory
//! comes in powers of two and HAMi-core's `4g` means 4 GiB, so a decimal reading would only ever
//! surprise: `4GB` is 4 GiB, and `--help` and the README say so. A plain number is bytes,
//! whole ones: `1.5` (a byte and a half) is refused, where `1.5GiB` is fine.

use std::fmt;

/// Why a size did not parse; the message says what a good one looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a size ({}); write e.g. 4GiB, 512MiB, 4096M, 4g or a plain number of bytes", self.input, self.reason)
    }
}

impl std::error::Error for SizeError {}

/// Parses a size; zero is rejected because "no memory at all" is never what a quota means
/// (leave the variable unset for "no limit").
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError { input: input.to_string(), reason };
    let text = input.trim();
    if text.is_empty() {
        return Err(err("it is empty"));
    }
    if text.starts_with('-') {
        return Err(err("a size cannot be negative; for no limit, leave it unset (or `unlimited` where offered)"));
    }
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() {
        return Err(err("it does not start with a number"));
    }
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err("unknown unit; use K, M, G or T (binary, e.g. GiB)")),
    };
    let bytes = if let Some((whole, frac)) = number.split_once('.') {
        if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
            return Err(err("malformed number"));
        }
        if shift == 0 && frac.bytes().any(|b| b != b'0') {
            return Err(err("a fraction of a byte; give a whole number of bytes, or a unit such as 1.5GiB"));
        }
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| err("number too large"))? };
        let frac_digits = frac.len().min(18) as u32;
        let frac_value: u128 = if frac.is_empty() { 0 } else { frac[..frac_digits as usize].parse().map_err(|_| err("malformed number"))? };
        let scale = 1u128 << shift;
        let total =
            whole.checked_mul(scale).and_then(|w| w.checked_add(frac_value * scale / 10u128.pow(frac_digits))).ok_or_else(|| err("number too large"))?;
        u64::try_from(total).map_err(|_| err("number too large"))?
    } else {
        let whole: u64 = number.parse().map_err(|_| err("number too large"))?;
        whole.checked_mul(1u64 << shift).ok_or_else(|| err("number too large"))?
    };
    if bytes == 0 {
        return Err(err("a limit of zero bytes would refuse everything; unset the variable for no limit"));
    }
    Ok(bytes)
}

/// Formats bytes for people: `4.00 GiB`, `256.0 MiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spellings_people_use() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4GB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096M").unwrap(), 4 << 30);
        assert_eq!(parse_size("4096m").unwrap(), 4 << 30);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 2 GiB ").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
    }

    #[test]
    fn bad_values_are_errors_not_no_limit() {
        for bad in ["", "4 GB x", "-1", "-1GiB", "1.5", "100.7", "0.5B", "lots", "0", "0GiB", "1.2.3G", "4XB", "99999999999999999999", "16777216T", "."] {
            assert!(parse_size(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(parse_size("1.5").unwrap_err().to_string().contains("fraction of a byte"));
        assert!(parse_size("-1").unwrap_err().to_string().contains("negative"));
        assert_eq!(parse_size("100.0").unwrap(), 100, "a whole number written with a point is still whole");
        let msg = parse_size("lots").unwrap_err().to_string();
        assert!(msg.contains("lots") && msg.contains("4GiB"), "{msg}");
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_size(4 << 30), "4.00 GiB");
        assert_eq!(format_size(256 << 20), "256.0 MiB");
        assert_eq!(format_size(12), "12 B");
    }

    proptest::proptest! {
        #[test]
        fn any_mib_count_round_trips(n in 1u64..(1 << 24)) {
            proptest::prop_assert_eq!(parse_size(&format!("{n}MiB")).unwrap(), n << 20);
            proptest::prop_assert_eq!(parse_size(&format!("{n}")).unwrap(), n);
        }

        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_size(&s);
        }
    }
}
