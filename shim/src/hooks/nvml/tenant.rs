//! Which slice an NVML device handle shows the calling process: its group's figures on that
//! device in the ledger, whether the process has a CUDA context (the link `cuInit` made) or
//! never will (`nvidia-smi`: a link of its own, made from NVML's UUIDs, see `link::attach_view`).
//! Also who the group's members are and under which pid the caller can see each.

use super::devices;
use crate::policy::budget::{self, Budget};
use crate::state::link::{self, Link};
use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use crate::sys::real_nvml::{self, nvml, same_uuid, uuid_of};
use crate::sys::runtime;
use gpuslice_common::ledger::{self, ProcessSlot, LIVE};
use once_cell::sync::OnceCell;
use std::sync::atomic::Ordering::*;

/// The slice one device handle shows.
pub struct Slice {
    pub link: &'static Link,
    /// The device's index in the ledger.
    pub index: usize,
    pub budget: Budget,
}

/// The slice NVML handle `device` shows, if the process is sliced on it: a memory limit or an SM
/// share applies to it there, however set (environment, controller, live edit). A process whose
/// settings ask for nothing attaches only through CUDA; one without a limit or share on the
/// device (a group without limits included) sees NVML's own answers.
pub fn of(device: NvmlDevice) -> Option<Slice> {
    let asks = runtime::runtime().slicing_settings().is_some();
    let cuda_link = link::get();
    // Asking for nothing, a process can only be limited through a controller it registered
    // with at cuInit (`gpuslice set --pid`); an NVML-only one never attaches.
    if !asks && !cuda_link.is_some_and(|l| l.controlled) {
        return None;
    }
    // A `MIG-` entry of CUDA_VISIBLE_DEVICES is shown as its GPU (see `devices`): that GPU's
    // handle stands for the instance, whose UUID the CUDA ordinal carries.
    let uuid = devices::visible().and_then(|shown| shown.iter().find(|v| v.handle == device as usize)).map(|v| v.uuid.clone()).or_else(|| uuid_of(device))?;
    let (link, ordinal) = match cuda_link {
        // CUDA is initialised (the link is made at cuInit): the ordinal is CUDA's own.
        Some(link) => (link, cuda_ordinal(&uuid)?),
        None => {
            let ordinal = devices::visible()?.iter().position(|v| same_uuid(&v.uuid, &uuid))?;
            (view_link()?, ordinal as CUdevice)
        }
    };
    let index = link.index(ordinal)?;
    let slice = Slice { link, index, budget: budget::of_link(link, ordinal)? };
    (slice.budget.limit().is_some() || slice.share() != 0).then_some(slice)
}

/// The link of a process that has not initialised CUDA, made once from NVML's devices.
fn view_link() -> Option<&'static Link> {
    static VIEW: OnceCell<Option<&'static Link>> = OnceCell::new();
    *VIEW.get_or_init(|| {
        let nv = nvml()?;
        let claims: Vec<(String, u64)> = devices::visible()?
            .iter()
            .map(|v| {
                let mut m = NvmlMemory { total: 0, free: 0, used: 0 };
                // A MIG instance's memory is its own, not its GPU's (`v.handle`).
                let handle = mig_handle(nv, &v.uuid).unwrap_or(v.handle as NvmlDevice);
                let total = match nv.memory {
                    // SAFETY: `get` is NVML's nvmlDeviceGetMemoryInfo, `handle` a device handle NVML gave, and `m` a local.
                    Some(get) if unsafe { get(handle, &mut m) } == NVML_SUCCESS => m.total,
                    _ => 0,
                };
                (v.uuid.clone(), total)
            })
            .collect();
        link::attach_view(&claims)
    })
}

/// The NVML handle of the MIG instance whose UUID is `uuid` ("MIG-..."), if it is one.
fn mig_handle(nv: &real_nvml::Nvml, uuid: &str) -> Option<NvmlDevice> {
    uuid.get(..4).filter(|p| p.eq_ignore_ascii_case("MIG-"))?;
    let c = std::ffi::CString::new(uuid).ok()?;
    let mut h: NvmlDevice = std::ptr::null_mut();
    // SAFETY: a C string and an out-pointer to a local.
    (unsafe { (nv.handle_by_uuid?)(c.as_ptr(), &mut h) } == NVML_SUCCESS).then_some(h)
}

/// The CUDA ordinal whose UUID is `uuid`, once the driver is initialised (no `cuInit` here).
fn cuda_ordinal(uuid: &str) -> Option<CUdevice> {
    let mut count = 0;
    if call_real!(cuDeviceGetCount(&mut count)) != CUDA_SUCCESS {
        return None;
    }
    (0..count).find_map(|ordinal| {
        let mut dev = 0;
        let ok = call_real!(cuDeviceGet(&mut dev, ordinal)) == CUDA_SUCCESS;
        (ok && real_nvml::cuda_uuid_string(dev).is_some_and(|u| same_uuid(&u, uuid))).then_some(dev)
    })
}

/// One member of the caller's group on a device, as the caller may be shown it.
pub struct Member {
    /// The pid as the caller sees it.
    pub pid: u32,
    /// The pid the controller registered (the node's, when the controller runs there): the one
    /// NVML's own lists carry.
    pub node_pid: u32,
    /// Bytes the member holds on the device (its allocations and its contexts' reserves).
    pub used: u64,
}

impl Slice {
    /// The group's live members that the caller can see, with their use of this device.
    /// (The ledger's process table is read slot by slot; every index is checked.)
    pub fn members(&self) -> Vec<Member> {
        let ledger = self.link.ledger;
        let max_groups = ledger.geometry().max_groups as usize;
        ledger
            .processes()
            .filter(|(_, p)| p.state.load(Acquire) == LIVE)
            .filter(|(_, p)| {
                let g = p.group.load(Relaxed) as usize;
                g < max_groups && std::ptr::eq(ledger.group(g), self.link.group)
            })
            .filter_map(|(_, p)| {
                let pid = self.pid_seen(p)?;
                Some(Member { pid, node_pid: p.pid.load(Relaxed), used: p.devices[self.index].used.load(Relaxed) })
            })
            .collect()
    }

    /// The pid under which the caller sees the process of slot `p`; `None` when it cannot see
    /// it (another pid namespace). A candidate counts only when its start time is the one the
    /// controller recorded, so a pid reused, or a number that means another process in this
    /// namespace, is never shown.
    fn pid_seen(&self, p: &ProcessSlot) -> Option<u32> {
        if std::ptr::eq(p, self.link.process) {
            return Some(std::process::id());
        }
        let start = p.start_time.load(Relaxed);
        if start == 0 {
            return None;
        }
        [p.own_pid.load(Relaxed), p.pid.load(Relaxed)].into_iter().filter(|&c| c != 0).find(|&c| ledger::process_start_time(c) == Some(start))
    }

    /// The group's SM share on this device, percent; 0 when not throttled.
    pub fn share(&self) -> u32 {
        self.link.settings.devices[self.index].share.load(Relaxed)
    }

    /// Device time charged to the group's launches on this device so far, ns.
    pub fn charged_ns(&self) -> u64 {
        self.link.group.devices[self.index].charged_ns.load(Relaxed)
    }
}
