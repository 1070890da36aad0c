//! Kubernetes resource quantities ("8Gi", "30", "1500Mi", "2k") as whole numbers, which is all that
//! device capacities in bytes and percent need.

/// The whole number `q` stands for; a fraction, a negative number or an unknown suffix is refused.
pub fn parse(q: &str) -> Result<u64, String> {
    let s = q.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("quantity {q:?}: not a whole number"))?;
    let unit: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return Err(format!("quantity {q:?}: expected a whole number with an optional Ki/Mi/Gi/Ti/Pi/Ei or k/M/G/T/P/E suffix")),
    };
    n.checked_mul(unit).ok_or_else(|| format!("quantity {q:?} is too large"))
}

/// `bytes` the way Kubernetes writes it canonically: the largest binary suffix that divides it.
pub fn bytes(bytes: u64) -> String {
    for (suffix, shift) in [("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_quantities_parse_and_others_are_refused() {
        assert_eq!(parse("8Gi"), Ok(8 << 30));
        assert_eq!(parse("30"), Ok(30));
        assert_eq!(parse("1500Mi"), Ok(1500 << 20));
        assert_eq!(parse("2k"), Ok(2000));
        assert!(parse("0.5Gi").is_err());
        assert!(parse("-1").is_err());
        assert!(parse("3x").is_err());
        assert!(parse("99999999999Ei").is_err());
        assert_eq!(bytes(80 << 30), "80Gi");
        assert_eq!(bytes(1536 << 20), "1536Mi");
        assert_eq!(bytes(1000), "1000");
    }
}
