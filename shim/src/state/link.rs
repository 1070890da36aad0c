//! Where this process's accounting lives: the controller's ledger when a controller answers on
//! the socket, else a private ledger of one group and one process holding the environment's
//! limits. Both are the same layout, so every hook runs the same code either way.
//!
//! Attaching happens once, at the first CUDA call that needs it after the driver is initialised
//! (the `cuInit` hook tries first): the shim lists its devices by UUID, registers over the
//! socket, and maps the ledger descriptor the controller sends back. Afterwards the hot paths
//! only read the mapping: no syscall, no lock.
//!
//! No fail-open: a process told to use a controller (`GPUSLICE_GROUP`, `GPUSLICE_SOCKET` or
//! `GPUSLICE_ON_NO_CONTROLLER` in its environment, or a socket at the default path) that
//! cannot register keeps trying for `GPUSLICE_CONTROLLER_WAIT` seconds (a `warn` line every
//! few seconds), then follows `GPUSLICE_ON_NO_CONTROLLER`: `refuse` (the default: `cuInit`
//! fails, and so does every managed call after it, until a later `cuInit` tries again) or
//! `alone` (its own environment's limits, for the rest of its life).

use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use crate::sys::real_nvml::cuda_uuid_string;
use crate::sys::runtime;
use gpuslice_common::ledger::{self, DeviceSched, GroupSlot, Ledger, MemberSettings, Priority, ProcessSlot, LIVE};
use gpuslice_common::protocol::{self, DeviceClaim, Registration, Request, Response, ENV_SOCKET};
use gpuslice_common::settings::Settings;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::*};
use std::time::Duration;

/// CUDA ordinals beyond this are passed through untracked.
pub const MAX_ORDINALS: usize = 64;
const NO_DEVICE: u8 = u8::MAX;
/// How long one registration attempt may take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// What a process told to use a controller does when none takes it: `refuse` or `alone`.
pub const ENV_ON_NO_CONTROLLER: &str = "GPUSLICE_ON_NO_CONTROLLER";
/// How long (seconds) such a process keeps trying before it follows that policy.
pub const ENV_CONTROLLER_WAIT: &str = "GPUSLICE_CONTROLLER_WAIT";
const DEFAULT_CONTROLLER_WAIT: Duration = Duration::from_secs(30);
/// A `warn` line this often while waiting.
const WAIT_REPORT_EVERY: Duration = Duration::from_secs(5);
/// Between two registration attempts while waiting.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// What `cuInit` returns when the process was refused for want of a controller.
pub const CUDA_ERROR_NOT_PERMITTED: CuResult = 800;

pub struct Link {
    /// The mapped ledger (the controller's, or the private one), for readers of the group's
    /// other members (NVML's process list, `nvml::tenant`).
    pub ledger: &'static Ledger,
    /// The group's counters (read-write, shared with its members only).
    pub group: &'static GroupSlot,
    /// The group's settings as the controller publishes them: limits and shares, mapped
    /// read-only (the same slot as `group` for a process alone).
    pub settings: &'static GroupSlot,
    /// What the controller decides per member (own priorities, the group's penalty), mapped
    /// read-only with `settings`: a member cannot raise its priority or clear its penalty.
    pub members: &'static MemberSettings,
    pub process: &'static ProcessSlot,
    /// `process`'s slot index (its entry in `members`).
    pub slot: usize,
    /// CUDA ordinal → device index in the ledger.
    devices: [u8; MAX_ORDINALS],
    /// CUDA ordinal → the device's priority state (see `sched`).
    scheds: [Option<&'static DeviceSched>; MAX_ORDINALS],
    /// The same, once each, for the launch path's quick look.
    sched_list: Vec<&'static DeviceSched>,
    /// The group's name, for log lines.
    pub group_name: String,
    /// True when a controller holds the ledger (false: a private one).
    pub controlled: bool,
}

/// Where a process without a controller finds each device's priority state and turn: the
/// turn board's per-user page (`policy::board::sched`). The board stands above `link`, so it is
/// handed down at `cuInit` (`hooks::entry`), before any attach. Unset, a process alone takes no
/// turns, as when the board's page cannot be mapped.
static USER_SCHED: once_cell::sync::OnceCell<fn(CUdevice) -> Option<&'static DeviceSched>> = once_cell::sync::OnceCell::new();

/// Gives `link` the board's per-user priority state (the first call wins).
pub fn set_user_sched(sched: fn(CUdevice) -> Option<&'static DeviceSched>) {
    let _ = USER_SCHED.set(sched);
}

/// The process's link, once attached; never freed (hooks hold references to it). A forked
/// child starts with none and attaches on its own (see `in_forked_child`).
static LINK: AtomicPtr<Link> = AtomicPtr::new(std::ptr::null_mut());
/// True while one thread attaches; the others wait for it.
static ATTACHING: AtomicBool = AtomicBool::new(false);
/// A new `cuInit` after a refusal for want of a controller (the controller may be up by now;
/// `runtime::no_controller`): the process waits and registers afresh, or is refused again.
pub fn retry_after_refusal() {
    runtime::set_no_controller(false);
}

/// The socket of the controller this process registered with.
static SOCKET: once_cell::sync::OnceCell<std::path::PathBuf> = once_cell::sync::OnceCell::new();

/// The controller's socket, when a controller holds this process's accounting (for the rare
/// requests after registration: exports and imports, `sharing`).
pub fn controller_socket() -> Option<&'static std::path::Path> {
    get().filter(|l| l.controlled).and_then(|_| SOCKET.get()).map(|p| p.as_path())
}

/// How many times this process's line has forked since it attached (0 in the original).
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// The link, if this process has attached.
#[inline(always)]
pub fn get() -> Option<&'static Link> {
    let p = LINK.load(Acquire);
    // SAFETY: a non-null pointer came from Box::into_raw and is never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// The link, attaching now if the driver is ready. `None` before `cuInit` has succeeded or
/// when the settings were refused.
#[inline]
pub fn get_or_attach() -> Option<&'static Link> {
    match get() {
        Some(l) => Some(l),
        None => attach_slow(),
    }
}

/// This process's token: a number that names it in shared state (its high-priority slots, the
/// turn among throttled processes) where pids would not do, since they repeat across pid
/// namespaces and a controller may serve several. Under a controller, the controller's pick
/// (`take_token`); else drawn at random once. A forked child starts over. Lock-free: read on the
/// throttled launch path.
#[inline]
pub fn token() -> u64 {
    match TOKEN.load(Acquire) {
        0 => draw_token(),
        t => t,
    }
}

/// 0 until drawn or given; cleared in a forked child.
static TOKEN: AtomicU64 = AtomicU64::new(0);

/// At registration (the process's own link, not an NVML view's): takes as this process's token
/// the one the controller wrote into its slot, which the controller keeps a copy of to free a
/// turn this process still holds when it goes. A controller from before branch turntoken wrote
/// none (0): the process draws its own and writes it there, as it did then. Before the link is
/// published, so no turn was taken under another token.
fn take_token(process: &ProcessSlot) {
    match process.token.load(Acquire) {
        0 => process.token.store(token(), Release),
        given => TOKEN.store(given, Release),
    }
}

#[cold]
fn draw_token() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom into a local buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 8, libc::GRND_NONBLOCK) };
    let random = if got == 8 { u64::from_ne_bytes(bytes) } else { crate::sys::clock::now_ns() ^ (u64::from(std::process::id()) << 32) };
    // Two threads drawing at once agree on the first one stored.
    match TOKEN.compare_exchange(0, random.max(1), AcqRel, Acquire) {
        Ok(_) => random.max(1),
        Err(t) => t,
    }
}

/// Bumped in a forked child: state kept per process elsewhere (priority slots) compares it to
/// know that it was inherited, not its own.
pub fn fork_generation() -> u64 {
    FORK_GENERATION.load(Acquire)
}

#[cold]
fn attach_slow() -> Option<&'static Link> {
    let settings = runtime::runtime().settings.as_ref().ok()?;
    loop {
        if let Some(l) = get() {
            return Some(l);
        }
        if runtime::no_controller() {
            return None;
        }
        if ATTACHING.compare_exchange(false, true, AcqRel, Acquire).is_ok() {
            if let Ok(link) = visible_devices().and_then(|devices| attach(settings, &devices, true)) {
                LINK.store(Box::into_raw(Box::new(link)), Release);
                crate::sys::atfork::install();
            }
            ATTACHING.store(false, Release);
            return get(); // None when the driver was not ready: a later call tries again.
        }
        // Another thread is registering (or waiting for the controller, bounded).
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: crate::sys::atfork::nothing_to_hold, in_child: forget_in_child };

/// In a child after `fork` (its `FORK` child handler, run by `sys::atfork`): the parent's slots are the
/// parent's. The child attaches afresh (its own slot, through the controller) at its next CUDA
/// call. Atomic stores only.
pub fn forget_in_child() {
    LINK.store(std::ptr::null_mut(), Release);
    ATTACHING.store(false, Release);
    runtime::set_no_controller(false);
    TOKEN.store(0, Release);
    FORK_GENERATION.fetch_add(1, AcqRel);
}

/// A link for NVML's hooks in a process that may never initialise CUDA (`nvidia-smi`): `devices`
/// are the (UUID, total memory) of the devices the process may use, in ordinal order, as NVML
/// names them. It registers (or sets up alone) exactly like the CUDA path, but it is not the
/// process's link: the CUDA hooks still attach their own at `cuInit`, so a process that does
/// both is registered twice (the second slot holds nothing). No turn state is mapped. `None`
/// when the settings were refused or no ledger could be had.
pub fn attach_view(devices: &[(String, u64)]) -> Option<&'static Link> {
    let settings = runtime::runtime().settings.as_ref().ok()?;
    let devices: Vec<Visible> =
        devices.iter().take(MAX_ORDINALS).enumerate().map(|(i, (uuid, total))| Visible { ordinal: i as u32, uuid: uuid.clone(), total: *total }).collect();
    attach(settings, &devices, false).ok().map(|link| &*Box::leak(Box::new(link)))
}

impl Link {
    fn new(
        ledger: &'static Ledger,
        (group, settings, members): (&'static GroupSlot, &'static GroupSlot, &'static MemberSettings),
        (process, slot): (&'static ProcessSlot, usize),
        devices: [u8; MAX_ORDINALS],
        group_name: String,
        controlled: bool,
        scheds: [Option<&'static DeviceSched>; MAX_ORDINALS],
    ) -> Link {
        let mut sched_list: Vec<&'static DeviceSched> = Vec::new();
        for s in scheds.iter().flatten() {
            if !sched_list.iter().any(|x| std::ptr::eq(*x, *s)) {
                sched_list.push(s);
            }
        }
        Link { ledger, group, settings, members, process, slot, devices, scheds, sched_list, group_name, controlled }
    }

    /// The priority this process runs at: its own as the controller set it, else its group's
    /// (both read-only to the process).
    #[inline]
    pub fn priority(&self) -> Priority {
        self.members.priority_of(self.slot, self.settings)
    }

    /// The controller's extra charge on the group on ledger device `index` (the cross-check).
    #[inline]
    pub fn penalty(&self, index: usize) -> u64 {
        self.members.penalty(index)
    }

    /// The priority state of CUDA device `device`.
    #[inline]
    pub fn sched(&self, device: CUdevice) -> Option<&'static DeviceSched> {
        *self.scheds.get(usize::try_from(device).ok()?)?
    }

    /// Every device's priority state, once each.
    #[inline(always)]
    pub fn scheds(&self) -> &[&'static DeviceSched] {
        &self.sched_list
    }

    /// The ledger's device index for CUDA device `device`.
    #[inline(always)]
    pub fn index(&self, device: CUdevice) -> Option<usize> {
        let i = *self.devices.get(usize::try_from(device).ok()?)?;
        (i != NO_DEVICE).then_some(i as usize)
    }
}

/// One visible device as the driver describes it.
struct Visible {
    ordinal: u32,
    uuid: String,
    total: u64,
}

fn visible_devices() -> Result<Vec<Visible>, ()> {
    let mut count: c_int = 0;
    if call_real!(cuDeviceGetCount(&mut count)) != CUDA_SUCCESS {
        return Err(()); // Not initialised yet: try again at a later call.
    }
    let mut out = Vec::new();
    for ordinal in 0..count.clamp(0, MAX_ORDINALS as c_int) {
        let mut device: CUdevice = 0;
        if call_real!(cuDeviceGet(&mut device, ordinal)) != CUDA_SUCCESS {
            continue;
        }
        let mut total: usize = 0;
        let _ = call_real!(cuDeviceTotalMem_v2(&mut total, device));
        let uuid = cuda_uuid_string(device).unwrap_or_else(|| format!("ordinal-{ordinal}"));
        out.push(Visible { ordinal: ordinal as u32, uuid, total: total as u64 });
    }
    Ok(out)
}

/// What to do when a process that must have a controller gets none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnNoController {
    Refuse,
    Alone,
}

/// The policy and the wait from the environment. A value that does not parse means `refuse`
/// (and says so): a typo must not open what it meant to close.
fn no_controller_policy() -> (OnNoController, Duration) {
    let pid = std::process::id();
    let policy = match std::env::var(ENV_ON_NO_CONTROLLER).ok().map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("refuse") => OnNoController::Refuse,
        Some("alone") => OnNoController::Alone,
        Some(other) => {
            tracing::error!("pid {pid}: {ENV_ON_NO_CONTROLLER}={other:?} is neither refuse nor alone; using refuse");
            OnNoController::Refuse
        }
    };
    let wait = match std::env::var(ENV_CONTROLLER_WAIT).ok().filter(|v| !v.trim().is_empty()) {
        None => DEFAULT_CONTROLLER_WAIT,
        Some(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => Duration::from_secs_f64(s),
            _ => {
                tracing::error!(
                    "pid {pid}: {ENV_CONTROLLER_WAIT}={v:?} is not a number of seconds from 0 to 86400; waiting {}s",
                    DEFAULT_CONTROLLER_WAIT.as_secs()
                );
                DEFAULT_CONTROLLER_WAIT
            }
        },
    };
    (policy, wait)
}

/// True when the environment says this process belongs under a controller.
fn told_to_use_controller(settings: &Settings) -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    settings.group.is_some() || set(ENV_SOCKET) || set(ENV_ON_NO_CONTROLLER)
}

/// The controller's socket as this process names it: `GPUSLICE_SOCKET`, else the default.
pub fn socket_path() -> std::path::PathBuf {
    // A path, any bytes: one that is not UTF-8 must not send the process to the default socket.
    std::path::PathBuf::from(std::env::var_os(ENV_SOCKET).filter(|s| !s.is_empty()).unwrap_or_else(|| protocol::DEFAULT_SOCKET.into()))
}

/// `turns`: map this user's turn pages when alone (not for `attach_view`).
fn attach(settings: &Settings, devices: &[Visible], turns: bool) -> Result<Link, ()> {
    let socket_path = socket_path();
    let pid = std::process::id();
    let socket = socket_path.display();
    let present = std::fs::symlink_metadata(&socket_path).is_ok();
    if !present && !told_to_use_controller(settings) {
        tracing::info!("pid {pid}: no gpuslice controller at {socket}; running alone on this process's own limits ({})", settings.describe());
        return alone(settings, devices, turns);
    }
    let (policy, wait) = no_controller_policy();
    let start = std::time::Instant::now();
    let mut last_report = start;
    let why = loop {
        let why = if std::fs::symlink_metadata(&socket_path).is_err() {
            Retry::Later("nothing listens there".to_string())
        } else {
            match register(&socket_path, settings, devices, turns) {
                Ok(link) => {
                    tracing::info!("pid {pid}: registered with the gpuslice controller at {socket}: group {:?}", link.group_name);
                    return Ok(link);
                }
                Err(r) => r,
            }
        };
        let why = match why {
            Retry::Never(why) => break why,
            Retry::Later(why) => why,
        };
        if start.elapsed() >= wait {
            break why;
        }
        if last_report.elapsed() >= WAIT_REPORT_EVERY || last_report == start {
            last_report = std::time::Instant::now();
            tracing::warn!(
                "pid {pid}: waiting for the gpuslice controller at {socket} ({why}): {:.0}s of {:.0}s, then {}",
                start.elapsed().as_secs_f64(),
                wait.as_secs_f64(),
                match policy {
                    OnNoController::Refuse => format!("CUDA is refused ({ENV_ON_NO_CONTROLLER}=refuse)"),
                    OnNoController::Alone => format!("it runs alone on its own limits ({ENV_ON_NO_CONTROLLER}=alone)"),
                }
            );
        }
        std::thread::sleep(RETRY_EVERY);
    };
    let whom = if present { format!("the gpuslice controller at {socket} did not take this process") } else { format!("no gpuslice controller at {socket}") };
    match policy {
        OnNoController::Alone => {
            tracing::warn!("pid {pid}: {whom} ({why}); running alone on its own limits ({}) as {ENV_ON_NO_CONTROLLER}=alone says", settings.describe());
            alone(settings, devices, turns)
        }
        OnNoController::Refuse => {
            tracing::error!(
                "pid {pid}: {whom} ({why}) within {:.0}s; CUDA is refused in this process (cuInit returns CUDA_ERROR_NOT_PERMITTED): it was told to run under a controller ({ENV_ON_NO_CONTROLLER}=refuse; set it to alone to run on its own limits instead)",
                wait.as_secs_f64()
            );
            runtime::set_no_controller(true);
            Err(())
        }
    }
}

/// Why a registration failed, and whether trying again may help.
enum Retry {
    /// The controller may take it later (not running yet, restarting, busy, full).
    Later(String),
    /// It never will (another protocol, a pid it cannot see, a group closed to this uid).
    Never(String),
}

fn program_name() -> String {
    std::env::args_os().next().and_then(|a| std::path::Path::new(&a).file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default()
}

fn register(socket: &std::path::Path, settings: &Settings, devices: &[Visible], turns: bool) -> Result<Link, Retry> {
    let request = Request::Register(Registration {
        protocol: protocol::PROTOCOL_VERSION,
        group: settings.group.clone(),
        priority: settings.priority.as_ref().map(|p| p.value),
        name: program_name(),
        own_pid: std::process::id(),
        devices: devices
            .iter()
            .map(|d| DeviceClaim {
                ordinal: d.ordinal,
                uuid: d.uuid.clone(),
                total_memory: d.total,
                memory_limit: settings.memory_limit(d.ordinal).map(|l| l.value),
                sm_share: settings.sm_share(d.ordinal),
                sm_max: settings.sm_max(d.ordinal),
            })
            .collect(),
    });
    let (response, fds) = protocol::call_with_fds(socket, &request, REGISTER_TIMEOUT).map_err(|e| Retry::Later(e.to_string()))?;
    let _ = SOCKET.set(socket.to_path_buf());
    let assignment = match response {
        Response::Registered(a) => a,
        Response::Error { message } if protocol::is_retry_later(&message) => return Err(Retry::Later(message)),
        Response::Error { message } => return Err(Retry::Never(message)),
        other => return Err(Retry::Later(format!("unexpected answer {other:?}"))),
    };
    // The group's memory, the device memory, the group's settings (see `ledger::regions`).
    let [counters, device_memory, settings_page] = <[std::os::fd::OwnedFd; 3]>::try_from(fds)
        .map_err(|fds| Retry::Later(format!("the answer came without the ledger (its three descriptors; {} came)", fds.len())))?;
    use std::os::fd::AsFd;
    let ledger = Ledger::map_group_view(counters.as_fd(), device_memory.as_fd()).map_err(|e| Retry::Later(e.to_string()))?;
    let settings = ledger::SettingsPage::map(settings_page.as_fd(), false).map_err(|e| Retry::Later(format!("the group's settings page: {e}")))?;
    let geometry = ledger.geometry();
    if assignment.group >= geometry.max_groups || assignment.slot >= geometry.max_procs {
        return Err(Retry::Later(format!("slot {}/{} outside the ledger", assignment.group, assignment.slot)));
    }
    let ledger: &'static Ledger = Box::leak(Box::new(ledger));
    let mut map = [NO_DEVICE; MAX_ORDINALS];
    for (ordinal, index) in assignment.devices {
        if (ordinal as usize) < MAX_ORDINALS && (index as usize) < ledger::MAX_DEVICES {
            map[ordinal as usize] = index as u8;
        }
    }
    for note in &assignment.notes {
        tracing::warn!("pid {}: {note}", std::process::id());
    }
    let mut scheds = [None; MAX_ORDINALS];
    for (ordinal, index) in map.iter().enumerate() {
        if *index != NO_DEVICE {
            scheds[ordinal] = Some(&ledger.device(*index as usize).sched);
        }
    }
    let process = ledger.process(assignment.slot as usize);
    if turns {
        take_token(process);
    }
    let group = ledger.group(assignment.group as usize);
    // Kept open for the process's life: a restarted controller takes its group's memory back
    // from the descriptors of the processes still holding it.
    for fd in [counters, device_memory, settings_page] {
        let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
    }
    let (settings, members) = settings.leak();
    Ok(Link::new(ledger, (group, settings, members), (process, assignment.slot as usize), map, assignment.group_name, true, scheds))
}

/// A private ledger holding this process's own settings.
fn alone(settings: &Settings, devices: &[Visible], turns: bool) -> Result<Link, ()> {
    let ledger: &'static Ledger = match Ledger::anonymous() {
        Ok(l) => Box::leak(Box::new(l)),
        Err(e) => {
            // The host program goes on untracked rather than stop over 20 KiB.
            tracing::error!("gpuslice cannot allocate its private ledger ({e}); this process runs untracked");
            return Err(());
        }
    };
    let (group, process) = (ledger.group(0), ledger.process(0));
    group.reset();
    process.reset();
    let mut map = [NO_DEVICE; MAX_ORDINALS];
    for d in devices {
        let Some(index) = ledger.claim_device(&d.uuid, d.total) else { continue };
        map[d.ordinal as usize] = index as u8;
        group.set_limits(index, settings.memory_limit(d.ordinal).map(|l| l.value), settings.sm_share(d.ordinal));
        group.set_cap(index, settings.sm_max(d.ordinal));
    }
    if let Some(p) = &settings.priority {
        group.priority.store(p.value as u32, Relaxed);
    }
    let pid = std::process::id();
    let name = gpuslice_common::settings::solo_group_name(pid);
    group.set_name(&name);
    group.members.store(1, Relaxed);
    group.state.store(LIVE, Release);
    process.pid.store(pid, Relaxed);
    process.own_pid.store(pid, Relaxed);
    process.state.store(LIVE, Release);
    // Without a controller, this user's processes share priority state through the board.
    let mut scheds = [None; MAX_ORDINALS];
    for d in devices.iter().filter(|_| turns) {
        scheds[d.ordinal as usize] = USER_SCHED.get().and_then(|sched| sched(d.ordinal as CUdevice));
    }
    // No controller to charge a penalty or set an own priority: all zeros (the group's priority).
    // SAFETY: MemberSettings is atomics only, for which all zeros is a valid value.
    let members: &'static MemberSettings = Box::leak(unsafe { Box::<MemberSettings>::new_zeroed().assume_init() });
    Ok(Link::new(ledger, (group, group, members), (process, 0), map, name, false, scheds))
}
