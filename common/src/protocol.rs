//! The wire protocol between shims, the CLI and the controller, over a Unix stream socket.
//!
//! One request, one response, then the connection closes. A frame is a 4-byte little-endian
//! length followed by that many bytes of JSON; frames over `MAX_FRAME` are refused before any
//! allocation. The response to `Register` carries three descriptors (`SCM_RIGHTS`): the
//! process's group's memory, the device memory (both sealed memfds, read-write) and the group's
//! settings page (read-only); see `ledger::regions`. The ledger file itself stays mode 0600 and
//! reaches no process: the controller knows who is asking from `SO_PEERCRED`.

use crate::ledger::Priority;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bumped when a message changes meaning; a controller refuses other versions by name.
pub const PROTOCOL_VERSION: u32 = 1;
pub const MAX_FRAME: usize = 1 << 20;
pub const DEFAULT_SOCKET: &str = "/run/gpuslice/gpuslice.sock";
pub const DEFAULT_LEDGER: &str = "/dev/shm/gpuslice/ledger";
pub const ENV_SOCKET: &str = "GPUSLICE_SOCKET";
pub const ENV_GROUP: &str = "GPUSLICE_GROUP";
pub const ENV_PRIORITY: &str = "GPUSLICE_PRIORITY";
/// Ends a refusal that may pass (a full table, a busy controller): a shim that must have a
/// controller keeps trying after it, and gives up at once after any other refusal.
pub const RETRY_LATER: &str = " (try again later)";

/// True when a refusal's message says that trying again may help.
pub fn is_retry_later(message: &str) -> bool {
    message.ends_with(RETRY_LATER)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A shim at its first CUDA use.
    Register(Registration),
    /// Change limits of a process or a group (socket owner or root only).
    Set(Edit),
    /// Everything `gpuslice ls` shows.
    List,
    /// The controller's own state.
    Status,
    /// Remove an empty group (socket owner or root only); refused while it has members.
    /// On the wire `{"type":"remove_group","name":...}` (see `group_name`).
    #[serde(with = "group_name")]
    RemoveGroup(String),
    /// Labels for a group's metrics (socket owner or root only), e.g. the Kubernetes claim and
    /// pod the DRA plugin made it for; they replace the group's earlier labels.
    LabelGroup(GroupLabels),
    /// A registered process exported an allocation (`cuIpcGetMemHandle`,
    /// `cuMemExportToShareableHandle`): an import of it is charged to nobody else (issue 20).
    Export(Shared),
    /// A registered process imported an allocation: did a live registered process export it?
    /// Answered with `Response::Imported`.
    Import(Shared),
    /// Issue 22: move every process of a group off the GPU with the driver's checkpoint API
    /// (socket owner or root). `{"type":"suspend","group":...}`.
    Suspend(GroupRef),
    /// Issue 22: bring a suspended group back (socket owner or root).
    Resume(GroupRef),
    /// Issue 22: whether the policy may suspend a group (socket owner or root).
    SetSuspendable(Suspendable),
    /// Issue 22: a registered process's allocation found the device full (not its quota): the
    /// controller suspends lower-priority suspendable groups until it fits, within `wait_ms`.
    MakeRoom(RoomRequest),
}

/// A group by name (issue 22's requests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRef {
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suspendable {
    pub group: String,
    pub suspendable: bool,
    /// Suspend it even while its processes export memory (IPC, VMM handles): a process that
    /// imports it would find it gone. Off unless asked for.
    #[serde(default)]
    pub allow_exports: bool,
    /// The group may not exist yet: `gpuslice run --suspendable` marks it before its first
    /// member makes it. Without it an unknown (misspelt) name is refused.
    #[serde(default)]
    pub ahead: bool,
    /// `auto`, `shim` or `driver` (issue 22); `None` keeps the group's.
    #[serde(default)]
    pub path: Option<String>,
}

/// What the shim asks for when the driver refused an allocation for want of device memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomRequest {
    /// The ledger's device index.
    pub device: u32,
    pub bytes: u64,
    /// How long the process is prepared to wait, at most.
    pub wait_ms: u64,
}

/// An exported allocation, as both ends can name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shared {
    pub key: ExportKey,
}

/// What names an export to its exporter and its importers alike. Whole, never a hash: a tenant
/// who could forge a key that hashes like another's export could make that import free.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ExportKey {
    /// A legacy IPC handle's or a fabric handle's 64 bytes.
    Handle(Vec<u8>),
    /// A POSIX file descriptor handle: the file it is (device and inode), the same at both ends.
    File { dev: u64, ino: u64 },
}

/// The most bytes an `ExportKey::Handle` may have (the handles are 64).
pub const MAX_HANDLE_BYTES: usize = 64;

/// Metric labels of one group: names from `GROUP_LABELS`, values of at most `MAX_LABEL_VALUE`
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupLabels {
    pub group: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The label names a group may carry: the Kubernetes claim and pod it serves (a fixed set, so
/// that the metrics' label names stay known and few).
pub const GROUP_LABELS: [&str; 4] = ["claim_namespace", "claim_name", "claim_uid", "pod"];
pub const MAX_LABEL_VALUE: usize = 256;

impl GroupLabels {
    /// Why these labels cannot be used, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        for (k, v) in &self.labels {
            if !GROUP_LABELS.contains(&k.as_str()) {
                return Err(format!("label {k:?}: a group's labels are {GROUP_LABELS:?}"));
            }
            if v.len() > MAX_LABEL_VALUE {
                return Err(format!("label {k:?}: its value is over {MAX_LABEL_VALUE} bytes"));
            }
        }
        Ok(())
    }
}

/// `RemoveGroup`'s name as `{"name": ...}`: an internally tagged enum cannot carry a bare string
/// (serde refuses to serialise it), so the variant keeps its agreed shape in Rust and is a
/// one-field object on the wire.
mod group_name {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Named {
        name: String,
    }

    pub fn serialize<S: Serializer>(name: &str, s: S) -> Result<S::Ok, S::Error> {
        Named { name: name.to_string() }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Named::deserialize(d).map(|n| n.name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub protocol: u32,
    /// `GPUSLICE_GROUP`, if set.
    pub group: Option<String>,
    /// `GPUSLICE_PRIORITY`, if set.
    pub priority: Option<Priority>,
    /// The program's name (argv[0]'s file name), for listings.
    pub name: String,
    /// Its pid as it sees itself (it may live in another pid namespace).
    pub own_pid: u32,
    /// The devices it can see, with the limits its environment gives each.
    pub devices: Vec<DeviceClaim>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceClaim {
    /// The CUDA ordinal in the registering process.
    pub ordinal: u32,
    pub uuid: String,
    pub total_memory: u64,
    pub memory_limit: Option<u64>,
    pub sm_share: Option<u32>,
    /// Issue 18: the cap over the share its environment gives (`GroupDevice::cap`: 0 = none
    /// given, 100 = no cap).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sm_max: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    Pid(u32),
    Group(String),
}

/// A memory limit in an edit: bytes, or none at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Limit {
    Bytes(u64),
    Unlimited,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    pub target: Target,
    pub memory: Option<Limit>,
    /// Percent; 100 removes the throttle. The guarantee (issue 18); without `sm_max` it is the
    /// cap too.
    pub sm: Option<u32>,
    /// Issue 18: the cap over the guarantee, percent; 100 = no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_max: Option<u32>,
    pub priority: Option<Priority>,
    /// One device index of the ledger; every device when absent.
    #[serde(default)]
    pub device: Option<u32>,
    /// A group that does not exist is created only when this is true (`set --create`);
    /// otherwise the edit is refused, naming existing groups with close names.
    #[serde(default)]
    pub create: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Registration accepted; the group's memory, the device memory and the group's read-only
    /// settings come with this frame, in that order.
    Registered(Assignment),
    /// An edit applied; says what changed.
    Done {
        message: String,
    },
    Listing(Listing),
    Status(Status),
    Error {
        message: String,
    },
    /// The answer to `Import`: true when a live registered process exported it (so it is
    /// charged to that process's group already).
    Imported {
        by_gpuslice: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub group: u32,
    pub group_name: String,
    pub slot: u32,
    /// (CUDA ordinal in the process, device index in the ledger), for each claimed device.
    pub devices: Vec<(u32, u32)>,
    /// What the controller wants the process to know (e.g. "your env limit was ignored").
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    pub groups: Vec<GroupRow>,
    pub processes: Vec<ProcessRow>,
    /// Processes the controller caught holding more than they report (the NVML cross-check).
    #[serde(default)]
    pub underreporting: Vec<UnderReportRow>,
    /// Groups that are suspendable, suspended, or were (issue 22).
    #[serde(default)]
    pub suspensions: Vec<SuspensionRow>,
    /// Issue 19, managed spatial mode (`serve --mps`): each managed GPU's mode as the MPS table
    /// says it, and its daemon; empty without `--mps`.
    #[serde(default)]
    pub mps: Vec<MpsGpuRow>,
}

/// One GPU of the managed spatial mode: the line of the MPS table beside the socket that the
/// controller wrote at its last tick, with the policy behind it and the GPU's MPS control daemon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MpsGpuRow {
    pub uuid: String,
    /// The GPU's index in the ledger, once a registered process has claimed it.
    pub device: Option<u32>,
    /// The operator's policy for the GPU: auto or on (`off` GPUs have no daemon and no row).
    pub policy: String,
    /// `spatial` (processes are sent to its MPS daemon) or `time-sliced`.
    pub mode: String,
    /// Why, as a short stable key (for metrics and scripts): off, on, auto_no_high_priority,
    /// auto_high_priority_elsewhere, auto_sm_shares, auto_high_priority, held_spatial,
    /// held_time_sliced, daemon_down.
    pub reason: String,
    /// Why, in words: the table's own text.
    pub why: String,
    /// The pipe directory processes are sent to (spatial only).
    pub pipe: Option<String>,
    /// The uids of the registered processes using the GPU.
    pub users: Vec<u32>,
    pub daemon: MpsDaemonRow,
}

/// A GPU's MPS control daemon as its supervisor saw it last.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MpsDaemonRow {
    /// It runs and its `control` pipe is in its pipe directory.
    pub up: bool,
    /// The daemon's pid while one runs (this controller's child, or the adopted one).
    pub pid: Option<u32>,
    /// Times the supervisor started it again after it exited.
    pub restarts: u64,
    /// It was started by an earlier controller and adopted at this one's start.
    pub adopted: bool,
}

/// A group's suspension (issue 22): where it stands, what moved and how long it took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SuspensionRow {
    pub group: String,
    /// running, suspending, suspended, resuming or failed.
    pub state: String,
    pub suspendable: bool,
    pub allow_exports: bool,
    /// The processes suspended (pids as the controller sees them).
    pub pids: Vec<u32>,
    /// Device bytes moved to the host at the last suspension, all devices together.
    pub bytes: u64,
    /// Host memory the suspended copy holds now (0 once resumed or its processes died).
    pub host_bytes: u64,
    pub suspend_ms: Option<f64>,
    pub resume_ms: Option<f64>,
    /// Suspended by the policy (resumed by it when room returns) rather than by an operator.
    pub automatic: bool,
    pub suspensions: u64,
    /// Why the last operation failed, if it did.
    pub error: Option<String>,
    /// The group's `suspend_path` setting: auto, shim or driver.
    #[serde(default)]
    pub suspend_path: String,
    /// The path the last suspension took: shim, driver, or shim+driver (by member).
    #[serde(default)]
    pub path: Option<String>,
    /// Device bytes per second of the last suspension and resume (GB/s, 1e9).
    #[serde(default)]
    pub suspend_gbps: Option<f64>,
    #[serde(default)]
    pub resume_gbps: Option<f64>,
    /// The path the last resume took (the same as the suspension's, by member).
    #[serde(default)]
    pub resume_path: Option<String>,
    /// The members its agents suspended at the last suspension (the shim's path), each with
    /// what it moved, what NVML showed it keep, and where the time went.
    #[serde(default)]
    pub agents: Vec<AgentRow>,
    /// Times a suspension of the group was refused or failed (by the policy or by hand).
    #[serde(default)]
    pub refusals: u64,
    /// The process the last refusal named as the cause, where one did.
    #[serde(default)]
    pub refused_by: Option<u32>,
    /// Of `refusals`, those where a member's calls under way outlasted the lock's bound (a long
    /// kernel): the policy passes the group over only briefly after such a timeout.
    #[serde(default)]
    pub timeouts: u64,
    /// The last refusal's kind: `timeout` (a lock or an agent's gate timed out: passed over for
    /// as long as the locks waited) or `lasting` (anything else: passed over for 30 s).
    #[serde(default)]
    pub refusal_kind: Option<String>,
    /// Seconds for which the suspension policy still passes the group over after its last
    /// refusal (trying the next candidate instead); absent when it is a candidate.
    #[serde(default)]
    pub passed_over_s: Option<f64>,
    /// Members left running at the group's suspension because the driver showed no CUDA state
    /// for them (nothing to suspend); each is suspended with the group once it has some.
    #[serde(default)]
    pub skipped: Vec<u32>,
}

/// One member's suspend agent at the last suspension and resume (issue 22, the shim's path).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentRow {
    pub pid: u32,
    /// Device bytes its agent moved to host memory (the mapped, rounded sizes), in how many
    /// allocations.
    pub bytes: u64,
    pub ranges: u32,
    /// What the agent said its process keeps on the device while suspended (contexts,
    /// modules, memory not VMM-backed).
    pub keep: u64,
    /// What NVML showed the process hold once its agent answered, and the most the controller
    /// allowed (`keep` + what NVML showed beyond its report before + the tolerance); `None`
    /// without NVML.
    pub nvml_after: Option<u64>,
    pub allowed: Option<u64>,
    /// How long the agent took, as it measured (ms).
    pub suspend_ms: Option<f64>,
    pub resume_ms: Option<f64>,
    /// Where the time went, in ms, by phase: gate, sync, pin, copy_out, release (suspension);
    /// map, copy_in, host_free (resume).
    pub phases_ms: std::collections::BTreeMap<String, f64>,
}

/// A process whose own report is below what the driver (NVML) says it holds, by more than the
/// cross-check's tolerance: its group is charged the difference (`charged`), so that the
/// group's `used` counts NVML's figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnderReportRow {
    pub pid: u32,
    pub group: String,
    pub device: u32,
    pub uuid: String,
    /// What the process reports (its slot's `used`).
    pub reported: u64,
    /// What NVML showed at the last check: `reported + charged`.
    pub measured: u64,
    /// Bytes charged to the group on top of the report.
    pub charged: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRow {
    pub name: String,
    /// Metric labels given with `LabelGroup` (none for most groups).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    pub slot: u32,
    pub members: Vec<u32>,
    pub priority: Priority,
    pub devices: Vec<GroupDeviceRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupDeviceRow {
    pub device: u32,
    pub uuid: String,
    pub used: u64,
    pub limit: Option<u64>,
    pub peak: u64,
    pub share: Option<u32>,
    /// Issue 18: the cap over the share (percent; 100 = none); `None` when the share is the cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u32>,
    /// Percent of the device's time charged over the last second.
    pub achieved_share: Option<f64>,
    /// Device time charged to the group's throttled launches since it was made (unthrottled
    /// launches are not measured).
    #[serde(default)]
    pub charged_ns: u64,
    pub throttled_ns: u64,
    pub refusals: u64,
}

impl GroupDeviceRow {
    /// Issue 18: the points of device time the group got over its guarantee in the last
    /// second (borrowed from idle neighbours); `None` without a share or a sample.
    pub fn borrowed_share(&self) -> Option<f64> {
        Some((self.achieved_share? - f64::from(self.share?)).max(0.0))
    }

    /// The share as `ls` and `top` show it: `30%`, `30-60%` with a cap, `30%+` without one.
    pub fn share_text(&self) -> String {
        match (self.share, self.cap) {
            (None, _) => "-".into(),
            (Some(s), Some(c)) if c >= 100 => format!("{s}%+"),
            (Some(s), Some(c)) if c > s => format!("{s}-{c}%"),
            (Some(s), _) => format!("{s}%"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub own_pid: u32,
    pub uid: u32,
    pub group: String,
    pub name: String,
    pub priority: Priority,
    pub devices: Vec<ProcessDeviceRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessDeviceRow {
    pub device: u32,
    pub uuid: String,
    pub used: u64,
    pub overhead: u64,
    pub limit: Option<u64>,
    pub peak: u64,
    pub achieved_share: Option<f64>,
    /// Device time charged to the process's throttled launches.
    #[serde(default)]
    pub charged_ns: u64,
    pub throttled_ns: u64,
    pub refusals: u64,
    /// The part of `throttled_ns` spent waiting for the turn on the device among throttled
    /// processes (issue 14: a starving process shows here at once).
    #[serde(default)]
    pub turn_wait_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub socket: String,
    pub ledger: String,
    pub uptime_s: f64,
    /// How many times a controller has started on this ledger.
    pub starts: u64,
    pub processes: u32,
    pub groups: u32,
    pub max_processes: u32,
    pub max_groups: u32,
    pub devices: Vec<String>,
    /// Where the metrics are served (`host:port`), if they are.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Exports of live processes in the controller's table (issue 20).
    #[serde(default)]
    pub exports: u64,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Decodes a request's JSON. The one decoder the controller runs on untrusted bytes.
pub fn decode_request(bytes: &[u8]) -> Result<Request, FrameError> {
    serde_json::from_slice(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}

pub fn decode_response(bytes: &[u8]) -> Result<Response, FrameError> {
    serde_json::from_slice(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    serde_json::to_vec(message).expect("protocol messages always serialise")
}

/// Writes one frame, with `fd` attached when given.
pub fn send_frame(socket: RawFd, body: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    send_frame_with(socket, body, fd.as_slice())
}

/// Writes one frame with `fds` attached (at most `MAX_FDS`; a registration's answer carries
/// its group's memory, the device memory and the group's read-only settings).
pub fn send_frame_with(socket: RawFd, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    let mut sent = 0;
    let mut attach = fds;
    while sent < frame.len() {
        let n = sendmsg(socket, &frame[sent..], attach)?;
        attach = &[];
        sent += n;
    }
    Ok(())
}

/// The most descriptors one frame carries.
pub const MAX_FDS: usize = 4;

fn sendmsg(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let fds = &fds[..fds.len().min(MAX_FDS)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; pointers below point at locals that outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(these fds) bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>().add(i), *fd);
            }
        }
    }
    loop {
        // SAFETY: msg is fully initialised above.
        let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads one frame; returns its body and any descriptor that came with it.
pub fn recv_frame(socket: RawFd) -> Result<(Vec<u8>, Option<OwnedFd>), FrameError> {
    recv_frame_inner(socket, None).map(|(body, fds)| (body, fds.into_iter().next()))
}

/// Reads one frame; returns its body and every descriptor that came with it (at most `MAX_FDS`).
pub fn recv_frame_all(socket: RawFd) -> Result<(Vec<u8>, Vec<OwnedFd>), FrameError> {
    recv_frame_inner(socket, None)
}

/// Reads one frame, all of it by `deadline`: a peer that trickles bytes cannot hold the
/// connection longer than that, however it spaces them (the socket's receive timeout is set
/// to what is left before each read).
pub fn recv_frame_by(socket: RawFd, deadline: std::time::Instant) -> Result<(Vec<u8>, Option<OwnedFd>), FrameError> {
    recv_frame_inner(socket, Some(deadline)).map(|(body, fds)| (body, fds.into_iter().next()))
}

fn recv_frame_inner(socket: RawFd, deadline: Option<std::time::Instant>) -> Result<(Vec<u8>, Vec<OwnedFd>), FrameError> {
    let mut fd = Vec::new();
    let mut len = [0u8; 4];
    recv_exact(socket, &mut len, &mut fd, deadline)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    recv_exact(socket, &mut body, &mut fd, deadline)?;
    Ok((body, fd))
}

/// Sets the socket's receive timeout to what is left before `deadline`; an error once it passed.
fn time_left(socket: RawFd, deadline: std::time::Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "the request did not arrive whole in time"));
    }
    let tv = libc::timeval { tv_sec: left.as_secs() as libc::time_t, tv_usec: left.subsec_micros().max(1) as libc::suseconds_t };
    // SAFETY: setsockopt with a timeval of the right size.
    let r = unsafe {
        libc::setsockopt(socket, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), size_of::<libc::timeval>() as libc::socklen_t)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv_exact(socket: RawFd, buf: &mut [u8], fd: &mut Vec<OwnedFd>, deadline: Option<std::time::Instant>) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        if let Some(deadline) = deadline {
            time_left(socket, deadline)?;
        }
        let mut iov = libc::iovec { iov_base: buf[got..].as_mut_ptr().cast(), iov_len: buf.len() - got };
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
        let mut control = vec![0u8; space];
        // SAFETY: zeroed msghdr, then pointed at locals.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg is initialised; MSG_CMSG_CLOEXEC keeps received descriptors out of exec'd children.
        let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        // SAFETY: walking the control messages the kernel wrote into our buffer.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..bytes / size_of::<RawFd>() {
                        let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>().add(i));
                        let owned = OwnedFd::from_raw_fd(raw);
                        // Keep the first few; any other is closed when `owned` drops.
                        if fd.len() < MAX_FDS {
                            fd.push(owned);
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if n == 0 {
            return Err(FrameError::Closed);
        }
        got += n as usize;
    }
    Ok(())
}

/// Connects to the controller's socket, with send and receive timeouts.
pub fn connect(path: impl AsRef<std::path::Path>, timeout: std::time::Duration) -> io::Result<std::os::unix::net::UnixStream> {
    let stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// One request and its response (and the descriptor that came with it, if any).
pub fn call(path: impl AsRef<std::path::Path>, request: &Request, timeout: std::time::Duration) -> Result<(Response, Option<OwnedFd>), FrameError> {
    call_with_fds(path, request, timeout).map(|(r, fds)| (r, fds.into_iter().next()))
}

/// One request and its response, with every descriptor that came with it (a registration's:
/// its group's memory, the device memory, the group's read-only settings, in that order).
pub fn call_with_fds(path: impl AsRef<std::path::Path>, request: &Request, timeout: std::time::Duration) -> Result<(Response, Vec<OwnedFd>), FrameError> {
    let stream = connect(path, timeout)?;
    send_frame(stream.as_raw_fd(), &encode(request), None)?;
    let (body, fds) = recv_frame_all(stream.as_raw_fd())?;
    Ok((decode_response(&body)?, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip() {
        let r = Request::Register(Registration {
            protocol: PROTOCOL_VERSION,
            group: Some("team-a".into()),
            priority: Some(Priority::High),
            name: "python3".into(),
            own_pid: 7,
            devices: vec![DeviceClaim { ordinal: 0, uuid: "GPU-1".into(), total_memory: 1 << 30, memory_limit: Some(1 << 20), sm_share: None, sm_max: 0 }],
        });
        assert_eq!(decode_request(&encode(&r)).unwrap(), r);
        let s = Request::Set(Edit {
            target: Target::Group("g".into()),
            memory: Some(Limit::Unlimited),
            sm: Some(30),
            sm_max: None,
            priority: None,
            device: None,
            create: true,
        });
        assert_eq!(decode_request(&encode(&s)).unwrap(), s);
        let rm = Request::RemoveGroup("team-a".into());
        assert_eq!(encode(&rm), br#"{"type":"remove_group","name":"team-a"}"#);
        assert_eq!(decode_request(&encode(&rm)).unwrap(), rm);
        // An edit from an older CLI, without `create`, still decodes (as false).
        let old = br#"{"type":"set","target":{"group":"g"},"memory":null,"sm":30,"priority":null}"#;
        assert!(matches!(decode_request(old).unwrap(), Request::Set(Edit { create: false, .. })));
        assert_eq!(decode_request(br#"{"type":"list"}"#).unwrap(), Request::List);
        let g = Request::RemoveGroup("default/trainer".into());
        assert_eq!(encode(&g), br#"{"type":"remove_group","name":"default/trainer"}"#);
        assert_eq!(decode_request(&encode(&g)).unwrap(), g);
        assert!(decode_request(br#"{"type":"remove_group","name":"g","pid":1}"#).is_err(), "unknown fields are refused");
        for key in [ExportKey::Handle(vec![7; 64]), ExportKey::File { dev: 3, ino: 99 }] {
            for r in [Request::Export(Shared { key: key.clone() }), Request::Import(Shared { key })] {
                assert_eq!(decode_request(&encode(&r)).unwrap(), r);
            }
        }
        let a = Response::Imported { by_gpuslice: true };
        assert_eq!(decode_response(&encode(&a)).unwrap(), a);
        let l = Request::LabelGroup(GroupLabels { group: "default/trainer".into(), labels: [("claim_name".to_string(), "trainer".to_string())].into() });
        assert_eq!(decode_request(&encode(&l)).unwrap(), l);
        let no_create = decode_request(br#"{"type":"set","target":{"group":"g"},"memory":null,"sm":30,"priority":null}"#).unwrap();
        assert!(matches!(no_create, Request::Set(Edit { create: false, .. })), "`create` defaults to false");
    }

    #[test]
    fn group_labels_are_checked() {
        let labels = |pairs: &[(&str, &str)]| GroupLabels { group: "g".into(), labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        assert!(labels(&[("claim_uid", "0b3a"), ("pod", "trainer-0")]).check().is_ok());
        assert!(labels(&[("group", "x")]).check().is_err(), "not a group label");
        assert!(labels(&[("pod", &"x".repeat(MAX_LABEL_VALUE + 1))]).check().is_err());
    }

    #[test]
    fn frames_carry_a_descriptor() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        send_frame(a.as_raw_fd(), b"{\"type\":\"status\"}", Some(file.as_raw_fd())).unwrap();
        let (body, fd) = recv_frame(b.as_raw_fd()).unwrap();
        assert_eq!(body, b"{\"type\":\"status\"}");
        assert!(fd.is_some());
        drop(a);
        assert!(matches!(recv_frame(b.as_raw_fd()), Err(FrameError::Closed)));
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_them() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::io::Write;
        (&a).write_all(&(u32::MAX).to_le_bytes()).unwrap();
        assert!(matches!(recv_frame(b.as_raw_fd()), Err(FrameError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_a_request_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
        }

        #[test]
        fn any_json_shaped_text_decodes_or_errs(text in r#"\{"type":"(register|set|list|status|remove_group)"(,"[a-z_]{1,10}":[0-9a-z"\[\]{}:,]{0,30})?\}"#) {
            let _ = decode_request(text.as_bytes());
        }
    }
}
