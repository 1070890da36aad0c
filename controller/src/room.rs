//! The suspension policy (issue 22): when a process's allocation finds the device full (not its
//! own quota), lower-priority suspendable groups are suspended, lowest priority and least
//! recently active first, until the request fits; they are resumed when room returns. The
//! request waits a bounded time meanwhile instead of failing at once.

use crate::state::{Peer, State};
use crate::suspend::{self, lock_state, Phase};
use gpuslice_common::protocol::RoomRequest;
use gpuslice_common::size::format_size;
use nvml_wrapper::Nvml;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest a request may ask to wait (its own `wait_ms` is capped here).
const MAX_WAIT: Duration = Duration::from_secs(120);
/// How often a waiting request and the watcher look at the device again.
const POLL: Duration = Duration::from_millis(50);
/// A group the policy suspended stays so for at least this long: the request it made room for
/// must have time to take the room before the watcher sees it free.
const RESUME_HOLDOFF: Duration = Duration::from_secs(1);
/// Free memory a resumption leaves on the device besides the group's own, so that it does not
/// take the last bytes from under the next allocation.
const RESUME_SLACK: u64 = 256 << 20;

fn nvml() -> &'static Mutex<Option<Nvml>> {
    static NVML: OnceLock<Mutex<Option<Nvml>>> = OnceLock::new();
    NVML.get_or_init(|| Mutex::new(Nvml::init().ok()))
}

/// The device's free memory as the driver (NVML) says it.
fn free_on(uuid: &str) -> Option<u64> {
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

/// Last time each group's figures (bytes, device time) changed: "least recently active".
fn activity() -> std::sync::MutexGuard<'static, HashMap<String, (u64, Instant)>> {
    static ACTIVITY: OnceLock<Mutex<HashMap<String, (u64, Instant)>>> = OnceLock::new();
    ACTIVITY.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

fn note_activity(state: &State) {
    let mut seen = activity();
    for (&slot, info) in &state.groups {
        let g = state.ledger.group(slot);
        let signature =
            g.devices.iter().fold(0u64, |h, d| h.wrapping_mul(31).wrapping_add(d.used.load(Relaxed)).wrapping_mul(31).wrapping_add(d.charged_ns.load(Relaxed)));
        let e = seen.entry(info.name.clone()).or_insert((signature, Instant::now()));
        if e.0 != signature {
            *e = (signature, Instant::now());
        }
    }
}

/// A group that may be suspended for the request, with its bytes on the device.
struct Candidate {
    group: String,
    priority: u32,
    bytes: u64,
    last_active: Instant,
}

/// The requester's group and priority, and the suspendable groups below it on the device.
fn plan(state: &State, peer: Peer, device: u32, bytes: u64) -> Result<(String, u32, Vec<Candidate>), String> {
    use gpuslice_common::ledger::Priority;
    let w = state
        .watched
        .values()
        .find(|w| w.pid == peer.pid && w.uid == peer.uid)
        .ok_or_else(|| format!("pid {}: not a registered process; no room is made for it", peer.pid))?;
    let info = state.groups.get(&w.group).ok_or_else(|| format!("pid {}: its group is gone", peer.pid))?;
    let group = info.name.clone();
    // What the controller set, never what the process's slot says (a tenant can write that).
    let priority = Priority::from_u32(w.priority).or(Priority::from_u32(info.priority)).unwrap_or_default() as u32;
    // Room is made within the quota only: no tenant makes others move for more than it may hold.
    let limit = info.limits.get(device as usize).copied().unwrap_or(0).min(w.caps.get(device as usize).copied().unwrap_or(u64::MAX));
    if bytes > limit {
        return Err(format!("pid {} (group {group:?}): {} is over its limit on device {device}; no room is made", peer.pid, format_size(bytes)));
    }
    let seen = activity();
    let mut candidates = Vec::new();
    for (&slot, info) in &state.groups {
        if info.name == group || (device as usize) >= state.ledger.group(slot).devices.len() {
            continue;
        }
        let bytes = state.ledger.group(slot).devices[device as usize].used.load(Relaxed);
        let group_priority = Priority::from_u32(info.priority).unwrap_or_default() as u32;
        let suspendable = suspend::record(&info.name).is_some_and(|r| r.suspendable && r.phase == Phase::Running);
        if bytes == 0 || group_priority >= priority || !suspendable {
            continue;
        }
        let last_active = seen.get(&info.name).map_or_else(Instant::now, |e| e.1);
        candidates.push(Candidate { group: info.name.clone(), priority: group_priority, bytes, last_active });
    }
    candidates.sort_by(|a, b| a.priority.cmp(&b.priority).then(a.last_active.cmp(&b.last_active)));
    Ok((group, priority, candidates))
}

/// `MakeRoom`: suspends what must go for `room.bytes` to fit on the device, waiting at most
/// `room.wait_ms`; the answer says what was done, or why there is no room.
pub fn make_room(state: &std::sync::Mutex<State>, peer: Peer, room: RoomRequest) -> Result<String, String> {
    let started = Instant::now();
    let wait = Duration::from_millis(room.wait_ms).min(MAX_WAIT);
    let mut suspended = Vec::new();
    loop {
        let (group, priority, candidates, uuid) = {
            let state = lock_state(state);
            let (group, priority, candidates) = plan(&state, peer, room.device, room.bytes)?;
            if candidates.is_empty() && suspended.is_empty() {
                // Nothing to suspend: no at once (no NVML query, no wait on every OOM of a
                // controller's processes).
                return Err(format!(
                    "pid {} (group {group:?}): the device is full for {} on device {}, and no suspendable group of lower priority holds memory there",
                    peer.pid,
                    format_size(room.bytes),
                    room.device
                ));
            }
            let uuid = device_uuids(&state).remove(&room.device).ok_or_else(|| format!("pid {}: device {} is not in the ledger", peer.pid, room.device))?;
            (group, priority, candidates, uuid)
        };
        let free = free_on(&uuid).ok_or_else(|| format!("pid {}: the device's free memory cannot be read (NVML); no room is made", peer.pid))?;
        if free >= room.bytes {
            return Ok(format!("room for {} on device {}: {} free{}", format_size(room.bytes), room.device, format_size(free), describe(&suspended)));
        }
        let needed = room.bytes - free;
        let mut chosen = Vec::new();
        let mut freed = 0u64;
        for c in candidates {
            if freed < needed {
                freed += c.bytes;
                chosen.push(c.group);
            }
        }
        let before = suspended.len();
        if freed >= needed {
            for victim in chosen {
                match suspend::suspend(state, None, &victim, true) {
                    Ok(_) => suspended.push(victim),
                    Err(e) => tracing::warn!("pid {} (group {group:?}, priority {priority}): could not suspend {victim:?}: {e}", peer.pid),
                }
            }
        }
        if suspended.len() > before {
            continue; // look at the device again
        }
        // Too little suspendable memory yet (or a suspension failed): others may free some
        // meanwhile, within the bounded wait.
        if started.elapsed() >= wait {
            return Err(format!(
                "pid {} (group {group:?}): no room for {} on device {} after waiting {} ms: {} free, and suspendable groups of lower priority hold {} there{}",
                peer.pid,
                format_size(room.bytes),
                room.device,
                started.elapsed().as_millis(),
                format_size(free),
                format_size(freed),
                describe(&suspended)
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn describe(suspended: &[String]) -> String {
    if suspended.is_empty() {
        String::new()
    } else {
        format!(" (suspended {})", suspended.join(", "))
    }
}

/// Ledger device → its UUID, for the devices the ledger lists.
fn device_uuids(state: &State) -> HashMap<u32, String> {
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

/// Test knob `GPUSLICE_TEST_POLICY_DELAY_MS=N`: the policy thread starts N ms late (at most
/// 10 s), as it may on a loaded machine, so that a test can show that nothing a registration
/// needs is left to it.
fn policy_delay_for_tests() {
    let ms = std::env::var("GPUSLICE_TEST_POLICY_DELAY_MS").ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(10_000)));
    }
}

/// The policy's background work, for the controller's lifetime: finds groups an earlier
/// controller suspended, notes activity, and resumes the groups it suspended once their memory
/// fits again on every device it was on. The suspension marks were read before it starts
/// (`serve`: before any registration is answered).
pub fn watch(state: &std::sync::Mutex<State>) {
    policy_delay_for_tests();
    suspend::adopt(state);
    loop {
        std::thread::sleep(POLL * 4);
        let uuids = {
            let state = lock_state(state);
            note_activity(&state);
            device_uuids(&state)
        };
        for row in suspend::rows() {
            let Some(rec) = suspend::record(&row.group) else { continue };
            if rec.phase != Phase::Suspended || !rec.automatic || rec.suspended_at.is_some_and(|t| t.elapsed() < RESUME_HOLDOFF) {
                continue;
            }
            if room_for(&uuids, &rec.device_bytes).is_ok() {
                let _ = suspend::resume(state, None, &row.group);
            }
        }
    }
}
