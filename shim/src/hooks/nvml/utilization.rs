//! NVML's utilization inside a slice whose group has an SM share: the group's own share of the
//! GPU's time as the shim measured it, that is the device time charged to the group's launches
//! (`charged_ns` in the ledger, the figure the throttle enforces) over the last sample period,
//! in percent of wall time. The period is the time since this process's previous query (at
//! least `MIN_PERIOD`; a query sooner repeats the last figure), or, at a process's first query
//! (`nvidia-smi`), a `FIRST_PERIOD` measured there and then. The memory controller's figure is
//! the device's, scaled by the same proportion. Unthrottled groups are not measured (launches
//! are charged only under a share), so without a share the device's own figures stand.
//!
//! Per-process samples (`nvmlDeviceGetProcessUtilization`) are NVML's own, kept for the
//! group's members only, under the caller's pids.

use super::{real_or_return, tenant};
use crate::sys::clock::host_ns;
use crate::sys::ffi::*;
use crate::{sys::guard, sys::locks};
use gpuslice_common::ledger::MAX_DEVICES;
use std::ffi::c_uint;
use std::sync::Mutex;
use std::time::Duration;

const MIN_PERIOD_NS: u64 = 100_000_000;
const FIRST_PERIOD: Duration = Duration::from_secs(1);
/// A reading older than this is not a period's start any more: measure afresh.
const STALE_NS: u64 = 10_000_000_000;

type UtilFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlUtilization) -> NvmlReturn;
type ProcessUtilFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlProcessUtilizationSample, *mut c_uint, u64) -> NvmlReturn;

/// Per ledger device: (when, charged_ns then, the percentage last reported).
static READINGS: Mutex<[(u64, u64, u32); MAX_DEVICES]> = Mutex::new([(0, 0, 0); MAX_DEVICES]);

/// Percent of `period_ns` that `charged_ns` of device time is, at most 100.
pub fn percent(charged_ns: u64, period_ns: u64) -> u32 {
    if period_ns == 0 {
        return 0;
    }
    ((charged_ns as f64 / period_ns as f64) * 100.0).round().min(100.0) as u32
}

/// The group's measured share of the device's time, percent.
fn group_share(slice: &tenant::Slice) -> u32 {
    let now = host_ns();
    let last = locks::lock(&READINGS)[slice.index];
    let (start, charged_then) = if last.0 != 0 && now.saturating_sub(last.0) < STALE_NS {
        if now - last.0 < MIN_PERIOD_NS {
            return last.2;
        }
        (last.0, last.1)
    } else {
        let begin = (host_ns(), slice.charged_ns());
        std::thread::sleep(FIRST_PERIOD);
        begin
    };
    let (end, charged_now) = (host_ns(), slice.charged_ns());
    let pct = percent(charged_now.saturating_sub(charged_then), end.saturating_sub(start));
    locks::lock(&READINGS)[slice.index] = (end, charged_now, pct);
    pct
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(device: NvmlDevice, utilization: *mut NvmlUtilization) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetUtilizationRates", NVML_ERROR_UNKNOWN, || {
        let real = real_or_return!(c"nvmlDeviceGetUtilizationRates", UtilFn);
        // SAFETY: `real` is libnvidia-ml's own nvmlDeviceGetUtilizationRates, given the caller's arguments unchanged.
        let code = unsafe { real(device, utilization) };
        if code != NVML_SUCCESS || utilization.is_null() {
            return code;
        }
        let Some(slice) = tenant::of(device).filter(|s| s.share() != 0) else { return code };
        // SAFETY: `utilization` is non-null (checked above) and NVML just filled it; nothing else references it during the call.
        let u = unsafe { &mut *utilization };
        let gpu = group_share(&slice);
        // The memory controller's busy time, in the proportion the group has of the SMs' time.
        u.memory = if u.gpu == 0 { 0 } else { (u64::from(u.memory) * u64::from(gpu.min(u.gpu)) / u64::from(u.gpu)) as u32 };
        u.gpu = gpu;
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: NvmlDevice,
    samples: *mut NvmlProcessUtilizationSample,
    count: *mut c_uint,
    last_seen: u64,
) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetProcessUtilization", NVML_ERROR_UNKNOWN, || {
        let real = real_or_return!(c"nvmlDeviceGetProcessUtilization", ProcessUtilFn);
        // SAFETY: `real` is libnvidia-ml's own nvmlDeviceGetProcessUtilization, given the caller's arguments unchanged.
        let code = unsafe { real(device, samples, count, last_seen) };
        if code != NVML_SUCCESS || samples.is_null() || count.is_null() {
            return code;
        }
        let Some(slice) = tenant::of(device) else { return code };
        let members = slice.members();
        // SAFETY: NVML just wrote `*count` samples into the caller's buffer.
        let got = unsafe { std::slice::from_raw_parts_mut(samples, *count as usize) };
        let mut kept = 0;
        for i in 0..got.len() {
            if let Some(m) = members.iter().find(|m| m.node_pid == got[i].pid) {
                got[kept] = NvmlProcessUtilizationSample { pid: m.pid, ..got[i] };
                kept += 1;
            }
        }
        // SAFETY: `count` is non-null (checked above) and the caller's in/out sample count, so writable.
        unsafe { *count = kept as c_uint };
        code
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_of_the_period() {
        assert_eq!(super::percent(30, 100), 30);
        assert_eq!(super::percent(0, 100), 0);
        assert_eq!(super::percent(250, 100), 100);
        assert_eq!(super::percent(5, 0), 0);
    }
}
