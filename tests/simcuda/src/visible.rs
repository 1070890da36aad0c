//! Which simulated devices a process sees, and under which CUDA ordinals: `CUDA_DEVICE_ORDER`
//! and `CUDA_VISIBLE_DEVICES`, read once at `cuInit` the way the real driver reads them.
//!
//! The state file's devices are the machine's GPUs in PCI bus order (NVML's numbering). CUDA's
//! own order is `FASTEST_FIRST` by default; on a machine of identical GPUs that is PCI order, but
//! a test can make it differ with `SIMCUDA_FASTEST_FIRST=1,0` (the physical devices, fastest
//! first), so that CUDA ordinals and NVML indices disagree as they do on mixed machines.
//! `CUDA_VISIBLE_DEVICES` then lists indices into that order, `GPU-` UUIDs (a unique prefix is
//! enough) or the whole `MIG-` UUID of a MIG instance (`SIMCUDA_MIG`, see `state::mig_mode`);
//! the list ends at the first entry that names no device or names one twice.

use std::sync::OnceLock;

static ORDINALS: OnceLock<Vec<u32>> = OnceLock::new();

/// CUDA ordinal → physical device (the state file's index), fixed at the first `cuInit`.
pub fn ordinals(ndev: u32) -> &'static [u32] {
    ORDINALS.get_or_init(|| {
        let order = std::env::var("CUDA_DEVICE_ORDER").unwrap_or_default();
        let fastest = std::env::var("SIMCUDA_FASTEST_FIRST").unwrap_or_default();
        let cuda_order = device_order(ndev, &order, &fastest);
        match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(list) => visible(
                &list,
                &cuda_order,
                |p| crate::state::uuid_string(&crate::state::device_uuid(p)),
                |p| crate::state::mig_mode(p).then(|| crate::state::mig_uuid_string(&crate::state::mig_uuid(p))),
            ),
            Err(_) => cuda_order,
        }
    })
}

/// The physical devices in CUDA's enumeration order.
pub fn device_order(ndev: u32, order: &str, fastest: &str) -> Vec<u32> {
    let pci: Vec<u32> = (0..ndev).collect();
    if order.trim() == "PCI_BUS_ID" {
        return pci;
    }
    let mut out: Vec<u32> = fastest.split(',').filter_map(|e| e.trim().parse().ok()).filter(|p| *p < ndev).collect();
    out.dedup();
    // Devices the permutation leaves out follow in PCI order.
    for p in pci {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The devices a `CUDA_VISIBLE_DEVICES` value keeps, in the order given.
/// `mig_of` gives a device's MIG instance UUID, for a device in MIG mode.
pub fn visible(list: &str, cuda_order: &[u32], uuid_of: impl Fn(u32) -> String, mig_of: impl Fn(u32) -> Option<String>) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim) {
        let lower = entry.to_ascii_lowercase();
        let found = if !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit()) {
            entry.parse::<usize>().ok().and_then(|i| cuda_order.get(i).copied())
        } else if lower.starts_with("gpu-") {
            let mut matching = cuda_order.iter().filter(|p| uuid_of(**p).to_ascii_lowercase().starts_with(&lower));
            match (matching.next(), matching.next()) {
                (Some(p), None) => Some(*p),
                _ => None,
            }
        } else if lower.starts_with("mig-") {
            cuda_order.iter().copied().find(|p| mig_of(*p).is_some_and(|m| m.eq_ignore_ascii_case(entry)))
        } else {
            None
        };
        match found {
            Some(p) if !out.contains(&p) => out.push(p),
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid(p: u32) -> String {
        ["GPU-aa11", "GPU-aa22", "GPU-bb00"][p as usize].to_string()
    }

    fn mig(p: u32) -> Option<String> {
        (p == 1).then(|| "MIG-cc11".to_string())
    }

    #[test]
    fn order_and_lists() {
        assert_eq!(device_order(3, "", ""), vec![0, 1, 2]);
        assert_eq!(device_order(3, "FASTEST_FIRST", "2,0"), vec![2, 0, 1]);
        assert_eq!(device_order(3, "PCI_BUS_ID", "2,0"), vec![0, 1, 2]);
        let order = device_order(3, "", "2,0");
        assert_eq!(visible("1,0", &order, uuid, mig), vec![0, 2], "indices count in CUDA's order");
        assert_eq!(visible("GPU-aa2,GPU-BB", &order, uuid, mig), vec![1, 2]);
        assert_eq!(visible("GPU-aa", &order, uuid, mig), Vec::<u32>::new(), "an ambiguous prefix");
        assert_eq!(visible("0,7,1", &order, uuid, mig), vec![2], "the list ends at an unknown entry");
        assert_eq!(visible("0,0,1", &order, uuid, mig), vec![2], "and at a repeated one");
        assert_eq!(visible("MIG-1234,0", &order, uuid, mig), Vec::<u32>::new());
        assert_eq!(visible("MIG-CC11,0", &order, uuid, mig), vec![1, 2], "a MIG instance by its whole UUID");
        assert_eq!(visible("MIG-cc1", &order, uuid, mig), Vec::<u32>::new(), "not by a prefix");
        assert_eq!(visible("", &order, uuid, mig), Vec::<u32>::new());
    }
}
