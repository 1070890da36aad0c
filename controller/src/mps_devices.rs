//! Issue 19's managed spatial mode with one MPS control daemon per GPU: which GPUs get one (the
//! operator's policy: `--mps`, `--mps-device`, `[controller] mps`, `[controller.mps_devices]`),
//! each in `<pipe root>/<UUID>` and seeing only its GPU (`CUDA_VISIBLE_DEVICES=<UUID>`), and at
//! every tick each GPU's mode (`mps_choice`), published in the MPS table beside the socket
//! (`gpuslice_common::mps_table`) that the shims read before their driver starts.

use crate::mps_choice::{self, Tenants, Why};
use crate::mps_daemon::{self, Daemon, MpsFlags, Supervised};
use crate::serve::devices;
use crate::state::State;
use gpuslice_common::ledger::Priority;
use gpuslice_common::mps_table::{self, Entry, Mode};
use gpuslice_common::protocol::{MpsDaemonRow, MpsGpuRow};
use gpuslice_common::settings::{ControllerFile, MpsPolicy};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// MPS fails to start when its pipe directory's path is longer than this (its sockets' paths
/// must fit the 108 bytes of a Unix socket address; reported with 535 drivers from 88 characters).
const PIPE_PATH_MAX: usize = 87;
/// How long `start` waits for the daemons to listen, so that the first processes find them up.
const START_WAIT: Duration = Duration::from_secs(3);

/// The policy of every GPU, from the flags over the config file; a GPU's own entry over the
/// one for all.
pub struct Policies {
    all: MpsPolicy,
    /// By UUID, as written.
    named: Vec<(String, MpsPolicy)>,
}

impl Policies {
    /// Reads `--mps`, `--mps-device` and the config's table; refuses `--mps-daemon` beside a
    /// per-GPU policy (one daemon for the node and one per GPU cannot both serve a GPU).
    pub fn read(flags: &MpsFlags, config: &ControllerFile) -> Result<Policies, String> {
        let mut named: Vec<(String, MpsPolicy)> = Vec::new();
        for entry in &flags.mps_device {
            let (uuid, policy) = entry.split_once('=').ok_or_else(|| format!("--mps-device {entry:?}: expected UUID=off|auto|on"))?;
            let uuid = uuid.trim();
            if !(uuid.starts_with("GPU-") || uuid.starts_with("MIG-")) {
                return Err(format!("--mps-device {entry:?}: {uuid:?} is not a device UUID (GPU-... or MIG-..., as nvidia-smi -L prints them)"));
            }
            let policy = policy.parse::<MpsPolicy>().map_err(|e| format!("--mps-device {entry:?}: {e}"))?;
            named.push((uuid.to_string(), policy));
        }
        for (uuid, &policy) in &config.mps_devices {
            if !named.iter().any(|(u, _)| devices::same_device(u, uuid)) {
                named.push((uuid.clone(), policy));
            }
        }
        let all = flags.mps.or(config.mps).unwrap_or_default();
        let policies = Policies { all, named };
        if flags.mps_daemon && policies.any() {
            return Err("--mps-daemon runs one MPS daemon for the whole node; --mps, --mps-device and [controller] mps run one per GPU: choose one".into());
        }
        Ok(policies)
    }

    fn any(&self) -> bool {
        self.all != MpsPolicy::Off || self.named.iter().any(|(_, p)| *p != MpsPolicy::Off)
    }

    fn of(&self, uuid: &str) -> MpsPolicy {
        self.named.iter().find(|(u, _)| devices::same_device(u, uuid)).map_or(self.all, |(_, p)| *p)
    }
}

/// The per-GPU daemons and the table they are published in; dropping it removes the table, then
/// stops the daemons.
pub struct Managed {
    gpus: Vec<Gpu>,
    table: PathBuf,
    /// The table's text as last written.
    written: Option<String>,
    write_failed: bool,
    /// Each GPU's intended mode at the last tick (held while processes use the GPU).
    kept: HashMap<String, Mode>,
    /// What the log last said of each GPU.
    shown: HashMap<String, (Mode, Why)>,
}

struct Gpu {
    uuid: String,
    policy: MpsPolicy,
    pipe: PathBuf,
    daemon: Supervised,
}

/// Starts a daemon for each GPU whose policy is not `off`: the GPUs NVML lists whole (a GPU in
/// MIG mode runs work only in its instances, which must be named), and any named on their own.
/// `node`: every device NVML lists (MIG instances included), to check named ones against.
pub fn start(policies: &Policies, flags: &MpsFlags, socket: &Path, node: Option<&[String]>) -> Result<Option<Managed>, String> {
    if !policies.any() {
        return Ok(None);
    }
    let mut chosen: Vec<(String, MpsPolicy)> = Vec::new();
    for uuid in devices::whole_gpus().unwrap_or_default() {
        let policy = policies.of(&uuid);
        if policy != MpsPolicy::Off {
            chosen.push((uuid, policy));
        }
    }
    for (uuid, policy) in &policies.named {
        if *policy == MpsPolicy::Off || chosen.iter().any(|(u, _)| devices::same_device(u, uuid)) {
            continue;
        }
        match node {
            Some(list) if !devices::on_node(list, uuid) => tracing::warn!("MPS: {uuid} is not a device of this node (NVML); no daemon for it"),
            _ => chosen.push((uuid.clone(), *policy)),
        }
    }
    if chosen.is_empty() {
        tracing::warn!("MPS: no GPU to give a daemon (NVML lists none, or it is not available: name GPUs with --mps-device UUID=on)");
        return Ok(None);
    }
    let root = pipe_root(flags, socket)?;
    let mut gpus = Vec::new();
    for (uuid, policy) in chosen {
        let pipe = root.join(&uuid);
        let length = pipe.as_os_str().len();
        if length > PIPE_PATH_MAX {
            tracing::warn!(
                "MPS: the pipe directory {} is {length} bytes long; MPS is reported to fail past {PIPE_PATH_MAX}: choose a shorter --mps-pipe-dir",
                pipe.display()
            );
        }
        let daemon = Daemon {
            what: uuid.clone(),
            control: flags.mps_control.clone(),
            pipe: pipe.clone(),
            log: flags.mps_log_dir.join(&uuid),
            visible: Some(uuid.clone()),
            // The controller's own pipe directory: a daemon running there was left by an
            // earlier controller of this socket (killed without stopping it).
            adopt: true,
        };
        gpus.push(Gpu { uuid, policy, pipe, daemon: mps_daemon::supervise(daemon)? });
    }
    let deadline = Instant::now() + START_WAIT;
    while Instant::now() < deadline && !gpus.iter().all(|g| g.daemon.up()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let table = mps_table::path_for(socket);
    tracing::info!("MPS: {} GPU(s) with a daemon each under {}; their modes in {}", gpus.len(), root.display(), table.display());
    let kept = left_behind(&table, &gpus);
    Ok(Some(Managed { gpus, table, written: None, write_failed: false, kept, shown: HashMap::new() }))
}

/// The modes in the table an earlier controller left (a controller that stops removes its
/// table: one is left only by a controller that was killed), for the GPUs managed now: the modes
/// its processes, adopted with the ledger, started under, held while they use the GPU as if
/// this controller had published them.
fn left_behind(table: &Path, gpus: &[Gpu]) -> HashMap<String, Mode> {
    let entries = std::fs::read_to_string(table).map(|t| mps_table::parse(&t)).unwrap_or_default();
    let mut kept = HashMap::new();
    for gpu in gpus {
        if let Some(e) = entries.iter().find(|e| devices::same_device(&e.uuid, &gpu.uuid)) {
            tracing::info!("MPS: the table an earlier controller left says {} was {}; kept while processes use it", gpu.uuid, e.mode.as_str());
            kept.insert(gpu.uuid.clone(), e.mode);
        }
    }
    kept
}

/// `--mps-pipe-dir`, or `mps` beside the socket (a container given the socket's directory sees
/// the pipes too); absolute, without whitespace (the table separates words by spaces).
fn pipe_root(flags: &MpsFlags, socket: &Path) -> Result<PathBuf, String> {
    let root = match &flags.mps_pipe_dir {
        Some(dir) => dir.clone(),
        None => socket.parent().unwrap_or(Path::new("/")).join("mps"),
    };
    let root = if root.is_absolute() { root } else { std::env::current_dir().map_err(|e| format!("MPS: the current directory: {e}"))?.join(root) };
    if root.to_str().is_none_or(|r| r.chars().any(char::is_whitespace)) {
        return Err(format!("MPS: the pipe directory {} must be UTF-8 without spaces", root.display()));
    }
    std::fs::create_dir_all(&root).map_err(|e| format!("MPS: cannot create {}: {e}", root.display()))?;
    Ok(root)
}

impl Managed {
    /// Decides each GPU's mode from the state now, publishes the table when it changed (or was
    /// removed), and leaves each GPU's line with its daemon in `state.mps` for `gpuslice ls`,
    /// `top` and the metrics: what they show is the table's own decision. Called at start and
    /// at every tick, with the state locked.
    pub fn refresh(&mut self, state: &mut State) {
        let high = Priority::High as u32;
        let tenants = Tenants {
            high: state.groups.values().any(|g| g.priority == high) || state.watched.values().any(|w| w.priority == high),
            shares: state.groups.values().any(|g| g.shares.iter().any(|&s| s > 0 && s < 100)),
        };
        let in_use = state.device_users();
        let mut entries = Vec::with_capacity(self.gpus.len());
        let mut rows = Vec::with_capacity(self.gpus.len());
        for gpu in &self.gpus {
            let users: Vec<u32> = in_use.iter().filter(|(u, _)| devices::same_device(u, &gpu.uuid)).flat_map(|(_, uids)| uids.iter().copied()).collect();
            let used = !users.is_empty();
            let intended = mps_choice::intended(mps_choice::wanted(gpu.policy, tenants), self.kept.get(&gpu.uuid).copied(), used);
            self.kept.insert(gpu.uuid.clone(), intended.0);
            let daemon = gpu.daemon.state();
            let (mode, why) = mps_choice::published(intended, daemon.up);
            if self.shown.insert(gpu.uuid.clone(), (mode, why)) != Some((mode, why)) {
                tracing::info!("MPS: {} is {} ({})", gpu.uuid, mode.as_str(), why.text());
            }
            let pipe = (mode == Mode::Spatial).then(|| gpu.pipe.display().to_string());
            let entry = Entry { uuid: gpu.uuid.clone(), mode, pipe, users, why: why.text().to_string() };
            rows.push(MpsGpuRow {
                uuid: entry.uuid.clone(),
                device: state.device_index(&gpu.uuid),
                policy: gpu.policy.as_str().to_string(),
                mode: mode.as_str().to_string(),
                reason: why.key().to_string(),
                why: entry.why.clone(),
                pipe: entry.pipe.clone(),
                users: entry.users.clone(),
                daemon: MpsDaemonRow { up: daemon.up, pid: daemon.pid, restarts: daemon.restarts, adopted: daemon.adopted },
            });
            entries.push(entry);
        }
        state.mps = rows;
        let text = mps_table::render(&entries);
        if self.written.as_deref() == Some(text.as_str()) && self.table.exists() {
            return;
        }
        match write_table(&self.table, &text) {
            Ok(()) => {
                self.written = Some(text);
                self.write_failed = false;
            }
            Err(e) if !self.write_failed => {
                self.write_failed = true;
                tracing::warn!("MPS: cannot write the table {}: {e}; processes run time-sliced", self.table.display());
            }
            Err(_) => {}
        }
    }
}

/// Writes the table whole (a new file renamed over the old), readable by everyone.
fn write_table(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

impl Drop for Managed {
    /// The table goes first, so that no process is sent to a daemon that is stopping; then every
    /// daemon is asked to stop at once (the fields' drops wait for each).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.table);
        for gpu in &self.gpus {
            gpu.daemon.request_stop();
        }
    }
}
