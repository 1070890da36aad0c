//! What NVML says of the devices' memory, for the suspension policy (`room`) and the
//! suspensions themselves (`suspend`): what each process holds, and whether a group's memory
//! fits again on its devices.

use crate::state::{lock_state, State};
use gpuslice_common::size::format_size;
use nvml_wrapper::Nvml;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Free memory a resumption leaves on the device besides the group's own, so that it does not
/// take the last bytes from under the next allocation.
const RESUME_SLACK: u64 = 256 << 20;

/// The process-wide NVML handle (`None`: NVML cannot be loaded here).
pub fn nvml() -> &'static Mutex<Option<Nvml>> {
    static NVML: OnceLock<Mutex<Option<Nvml>>> = OnceLock::new();
    NVML.get_or_init(|| Mutex::new(Nvml::init().ok()))
}

/// The device's free memory as the driver (NVML) says it.
pub fn free_on(uuid: &str) -> Option<u64> {
    let nvml = nvml().lock().unwrap_or_else(|p| p.into_inner());
    let device = nvml.as_ref()?.device_by_uuid(uuid).ok()?;
    device.memory_info().ok().map(|m| m.free)
}

/// What NVML says each pid holds now, summed over the ledger's devices (the cross-check's
/// reading, `nvmlDeviceGetComputeRunningProcesses`); `None` when NVML cannot be read.
pub fn held_by_pids(state: &std::sync::Mutex<State>) -> Option<HashMap<u32, u64>> {
    let uuids = device_uuids(&lock_state(state));
    let nvml = nvml().lock().unwrap_or_else(|p| p.into_inner());
    let nvml = nvml.as_ref()?;
    let mut held = HashMap::new();
    for uuid in uuids.values() {
        let device = nvml.device_by_uuid(uuid.as_str()).ok()?;
        for p in device.running_compute_processes().ok()? {
            if let nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                *held.entry(p.pid).or_insert(0) += bytes;
            }
        }
    }
    Some(held)
}

/// Ledger device → its UUID, for the devices the ledger lists.
pub fn device_uuids(state: &State) -> HashMap<u32, String> {
    state.listing().groups.iter().flat_map(|g| g.devices.iter()).map(|d| (d.device, d.uuid.clone())).collect()
}

/// Whether a group's memory (`device_bytes`, by ledger device) fits on its devices now, with
/// room to spare; the message says where it does not. A restore that runs out of memory can
/// leave the real driver unable to restore the process at all (NVIDIA/cuda-checkpoint#44), so
/// no restore starts without this.
pub fn room_for(uuids: &HashMap<u32, String>, device_bytes: &std::collections::BTreeMap<u32, u64>) -> Result<(), String> {
    for (d, &bytes) in device_bytes {
        let free = uuids.get(d).and_then(|u| free_on(u));
        match free {
            Some(free) if free >= bytes + RESUME_SLACK => {}
            Some(free) => {
                return Err(format!(
                    "device {d} has {} free, and its {} need {} more to spare",
                    format_size(free),
                    format_size(bytes),
                    format_size(RESUME_SLACK)
                ))
            }
            None => return Err(format!("the free memory of device {d} cannot be read (NVML)")),
        }
    }
    Ok(())
}

/// `room_for`, with the state's device table.
pub fn check_room(state: &std::sync::Mutex<State>, device_bytes: &std::collections::BTreeMap<u32, u64>) -> Result<(), String> {
    let uuids = device_uuids(&lock_state(state));
    room_for(&uuids, device_bytes)
}
