//! Issue 19's managed spatial mode with one MPS control daemon per GPU: which GPUs get one (the
//! operator's policy: `--mps`, `--mps-device`, `[controller] mps`, `[controller.mps_devices]`),
//! each in `<pipe root>/<UUID>` and seeing only its GPU (`CUDA_VISIBLE_DEVICES=<UUID>`), and at
//! every tick each GPU's mode (`mps_choice`), published in the MPS table beside the socket
//! (`gpuslice_common::mps_table`) that the shims read before their driver starts.

use crate::mps_choice::{self, Tenants, Why};
use crate::mps_daemon::{self, Daemon, MpsFlags, Supervised};
use crate::serve::devices;
use crate::state::{State, Watched};
use gpuslice_common::ledger::{Priority, MAX_DEVICES};
use gpuslice_common::mps_table::{self, Entry, Mode};
use gpuslice_common::protocol::{MpsDaemonRow, MpsGpuRow};
use gpuslice_common::settings::{ControllerFile, MpsPolicy};
use std::collections::{HashMap, HashSet};
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
        let uuids: Vec<&str> = self.gpus.iter().map(|g| g.uuid.as_str()).collect();
        let tenants = tenants(state, &uuids);
        let in_use = state.device_users();
        let mut entries = Vec::with_capacity(self.gpus.len());
        let mut rows = Vec::with_capacity(self.gpus.len());
        for (gpu, tenants) in self.gpus.iter().zip(tenants) {
            // A slot held for processes whose GPU a restart could not tell may be this one.
            let users: Vec<u32> = in_use
                .iter()
                .filter(|(u, _)| devices::same_device(u, &gpu.uuid) || crate::state::is_lost_device(u))
                .flat_map(|(_, uids)| uids.iter().copied())
                .collect();
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

/// What `auto` looks at for each GPU of `uuids` (`mps_choice::Tenants`), from the state now:
/// - **high**: a registered process whose priority (its own, else its group's) is `high` has
///   the GPU among its devices (those it registered with: its driver's, after its
///   `CUDA_VISIBLE_DEVICES`); or a group of priority `high` is pinned (configured or edited:
///   it outlives its members, and its next one, a replica say, may start on any GPU) or has no
///   registered process on any GPU yet. Such a group counts for every GPU: nothing the
///   controller knows confines a group to some GPUs (a group's settings are for every device
///   or for a device slot a process already claimed; the DRA plugin gives a claim's group its
///   limits for all devices and keeps the claim's UUIDs in the container's
///   `CUDA_VISIBLE_DEVICES`, which the controller first sees when a process registers). So
///   only a group made for its processes (from their environment, or one process's own) counts
///   where its processes are, once they are on a GPU.
/// - **shares**: some group's SM share on the GPU's ledger slot is strictly between 0 and 100.
///   A GPU no process has claimed yet has no slot: it counts the shares of the free slots,
///   one of which it will take (a group's share set for every device is in each of them;
///   `gpuslice set --device` names claimed slots only).
pub fn tenants(state: &State, uuids: &[&str]) -> Vec<Tenants> {
    let high = Priority::High as u32;
    let priority_of = |w: &Watched| match Priority::from_u32(w.priority) {
        Some(own) => own as u32,
        None => state.groups.get(&w.group).map_or(0, |g| g.priority),
    };
    let high_processes: Vec<&Watched> = state.watched.values().filter(|w| priority_of(w) == high).collect();
    let high_slots: HashSet<usize> = high_processes.iter().flat_map(|w| w.devices.iter().copied()).collect();
    let placed: HashSet<usize> = state.watched.values().filter(|w| !w.devices.is_empty()).map(|w| w.group).collect();
    // A pinned group (in the config, or edited) outlives its members: its next one, a replica
    // say, may start on any GPU, so it counts on every GPU wherever its processes run now.
    let high_everywhere = state.groups.iter().any(|(slot, g)| g.priority == high && (g.pinned || !placed.contains(slot)));
    let high_anywhere = !high_processes.is_empty() || high_everywhere;
    let share_on = |d: usize| state.groups.values().any(|g| g.shares[d] > 0 && g.shares[d] < 100);
    let claimed: HashSet<usize> = state.devices().iter().filter_map(|u| state.device_index(u)).map(|d| d as usize).collect();
    let free: Vec<usize> = (0..MAX_DEVICES).filter(|d| !claimed.contains(d)).collect();
    // A high-priority process on a slot whose GPU a restart could not tell may be on any GPU.
    let high_on_lost = high_slots.iter().any(|&d| state.is_lost_slot(d));
    uuids
        .iter()
        .map(|uuid| {
            let slot = state.device_index(uuid).map(|d| d as usize);
            let shares = match slot {
                Some(d) => share_on(d),
                // The device table is full: a new GPU takes a slot no process uses; any, to be safe.
                None if free.is_empty() => (0..MAX_DEVICES).any(share_on),
                None => free.iter().any(|&d| share_on(d)),
            };
            Tenants { high: high_everywhere || high_on_lost || slot.is_some_and(|d| high_slots.contains(&d)), high_anywhere, shares }
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Peer;
    use gpuslice_common::ledger::{Geometry, Ledger};
    use gpuslice_common::protocol::{DeviceClaim, Edit, Registration, Target, PROTOCOL_VERSION};
    use gpuslice_common::settings::FileSettings;

    const A: &str = "GPU-00000000-0000-0000-0000-00000000000a";
    const B: &str = "GPU-00000000-0000-0000-0000-00000000000b";
    const C: &str = "GPU-00000000-0000-0000-0000-00000000000c";

    fn state(dir: &tempfile::TempDir, config: &str) -> State {
        let path = dir.path().join("ledger").to_str().unwrap().to_string();
        let (ledger, adopted) = Ledger::open_or_create(&path, Geometry { max_groups: 16, max_procs: 16 }).unwrap();
        let mut s = State::new(ledger, FileSettings::parse("test.toml", config).unwrap());
        s.init_memory(adopted).unwrap();
        s.install_config_groups().unwrap();
        s
    }

    fn me() -> Peer {
        // SAFETY: geteuid has no preconditions and cannot fail.
        Peer { pid: std::process::id(), uid: unsafe { libc::geteuid() } }
    }

    /// Registers process `n` (a pid above Linux's largest, so no live process is ever it) in
    /// `group` (alone without one) with its own `priority`, on the GPUs `on`.
    fn join(s: &mut State, n: u32, group: Option<&str>, priority: Option<Priority>, on: &[&str]) {
        let devices = on
            .iter()
            .enumerate()
            .map(|(i, u)| DeviceClaim { ordinal: i as u32, uuid: u.to_string(), total_memory: 1 << 34, memory_limit: None, sm_share: None, sm_max: 0 })
            .collect();
        let r = Registration { protocol: PROTOCOL_VERSION, group: group.map(String::from), priority, name: format!("p{n}"), own_pid: n, devices };
        s.register(Peer { pid: 5_000_000 + n, uid: me().uid }, r).unwrap();
    }

    fn high(s: &State) -> Vec<(bool, bool)> {
        tenants(s, &[A, B]).iter().map(|t| (t.high, t.high_anywhere)).collect()
    }

    #[test]
    fn a_configured_high_group_counts_for_every_gpu_wherever_its_processes_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.web]\npriority = \"high\"\n[groups.batch]\npriority = \"normal\"\n");
        assert_eq!(high(&s), [(true, true), (true, true)], "nobody knows where web will start");
        join(&mut s, 1, Some("web"), None, &[B]);
        assert_eq!(high(&s), [(true, true), (true, true)], "web runs on B, and its next replica may start on A");
    }

    #[test]
    fn a_high_group_made_for_its_processes_counts_where_they_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.batch]\npriority = \"normal\"\n");
        join(&mut s, 1, Some("batch"), None, &[A]);
        assert_eq!(high(&s), [(false, false), (false, false)], "batch is not high work");
        join(&mut s, 2, Some("batch"), Some(Priority::High), &[B]);
        assert_eq!(high(&s), [(false, true), (true, true)], "a batch member at high of its own counts on its GPU only");
    }

    #[test]
    fn a_process_alone_at_high_counts_on_its_gpus_and_nothing_high_counts_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "");
        assert_eq!(high(&s), [(false, false), (false, false)]);
        join(&mut s, 1, None, Some(Priority::Normal), &[A, B]);
        assert_eq!(high(&s), [(false, false), (false, false)]);
        join(&mut s, 2, None, Some(Priority::High), &[A]);
        assert_eq!(high(&s), [(true, true), (false, true)]);
        // A high process that claimed no GPU the controller tracks: its group is not on any GPU
        // yet, so it may be on every one.
        join(&mut s, 3, None, Some(Priority::High), &[]);
        assert_eq!(high(&s), [(true, true), (true, true)]);
    }

    #[test]
    fn a_share_counts_on_the_gpu_it_is_set_for_and_one_for_every_device_on_new_gpus_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.batch]\n");
        join(&mut s, 1, Some("batch"), None, &[A]);
        let slot = s.device_index(A).unwrap();
        let shares = |s: &State| tenants(s, &[A, B, C]).iter().map(|t| t.shares).collect::<Vec<_>>();
        assert_eq!(shares(&s), [false, false, false]);
        let edit = |sm: u32, device: Option<u32>| Edit {
            target: Target::Group("batch".into()),
            memory: None,
            sm: Some(sm),
            sm_max: None,
            priority: None,
            device,
            create: false,
        };
        s.edit(me(), edit(30, Some(slot))).unwrap();
        assert_eq!(shares(&s), [true, false, false], "on A's slot only");
        join(&mut s, 2, Some("batch"), None, &[B]);
        assert_eq!(shares(&s), [true, false, false], "B's slot, claimed now, has none");
        s.edit(me(), edit(100, Some(slot))).unwrap();
        assert_eq!(shares(&s), [false, false, false], "100 % is no share");
        s.edit(me(), edit(40, None)).unwrap();
        assert_eq!(shares(&s), [true, true, true], "every device: C, in no slot yet, gets it when it comes");

        let dir = tempfile::tempdir().unwrap();
        let s = state(&dir, "[groups.batch]\nsm_share = 30\n");
        assert_eq!(shares(&s), [true, true, true], "the config's share for every device, before any GPU is claimed");
    }

    /// A high-priority process on a device slot a restart could not tell the GPU of (branch
    /// devuuid: no record of the device table, so the slot is held for it as `lost-device-N`)
    /// may be on any GPU: it counts as high on every one, not on none.
    #[test]
    fn a_high_process_on_a_slot_whose_gpu_is_not_known_counts_on_every_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let _held = {
            let mut s = state(&dir, "");
            let devices = vec![DeviceClaim { ordinal: 0, uuid: A.into(), total_memory: 1 << 34, memory_limit: None, sm_share: None, sm_max: 0 }];
            let r = Registration { protocol: PROTOCOL_VERSION, group: None, priority: Some(Priority::High), name: "me".into(), own_pid: 1, devices };
            let a = s.register(me(), r).unwrap();
            s.publish();
            assert_eq!(high(&s), [(true, true), (false, true)], "on A, known");
            // A start that kept no record of the device table comes between.
            s.ledger.header().controller_starts.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            s.descriptors_for(a.group as usize).unwrap()
        };
        let path = dir.path().join("ledger").to_str().unwrap().to_string();
        let (ledger, adopted) = Ledger::open_or_create(&path, Geometry { max_groups: 16, max_procs: 16 }).unwrap();
        ledger.count_controller_start();
        let mut s = State::new(ledger, FileSettings::parse("test.toml", "").unwrap());
        s.init_memory(adopted).unwrap();
        s.adopt();
        assert!(s.is_lost_slot(0), "{:?}", s.devices());
        assert_eq!(high(&s), [(true, true), (true, true)], "it may be on either");
    }
}
