//! Which MPS daemon serves this process (issue 19, managed spatial mode). Before the driver
//! starts, the controller's MPS table (beside its socket, `gpuslice_common::mps_table`) says
//! which GPUs run over MPS and where each one's daemon listens; a process that sees exactly one
//! GPU, and that GPU spatial with its daemon listening, is pointed at that daemon
//! (`CUDA_MPS_PIPE_DIRECTORY`), unless its environment names a pipe directory already.
//!
//! Everything else runs time-sliced, the driver's default: a process that may use several GPUs
//! (a GPU's daemon sees that GPU alone, so the process would lose the others), one that names
//! its GPU by index on a node of several (MPS renumbers devices; only UUIDs are safe, as MPS's
//! own documentation says), one on a GPU the table does not make spatial, one whose daemon
//! does not listen, and one of another uid than the processes using the GPU (an MPS server
//! serves one uid at a time: a client of another uid waits in `cuInit` for all of the server's
//! clients to exit). A daemon that listens but fails the client at `cuInit` costs one retry
//! without it (`retry_without_daemon`).

use crate::state::link;
use crate::sys::ffi::CuResult;
use crate::sys::real_nvml;
use gpuslice_common::mps_table::{self, Mode};
use std::sync::atomic::{AtomicBool, Ordering::*};

const PIPE_DIRECTORY: &str = "CUDA_MPS_PIPE_DIRECTORY";
const VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// A table is a line per GPU: more than this is not one.
const TABLE_MAX: u64 = 64 << 10;
/// `CUDA_ERROR_MPS_CONNECTION_FAILED` .. `CUDA_ERROR_MPS_CLIENT_TERMINATED` (cuda.h).
const MPS_ERRORS: std::ops::RangeInclusive<CuResult> = 805..=810;

/// True once this process was pointed at a daemon (and not yet taken back).
static POINTED: AtomicBool = AtomicBool::new(false);

/// Points the process at its GPU's daemon when the controller's table says so; called once,
/// before the real `cuInit`. Says why not, at `info`, when a table makes some GPU spatial.
pub fn point() {
    if std::env::var_os(PIPE_DIRECTORY).is_some() {
        return;
    }
    let socket = link::socket_path();
    // No socket, no controller: a table left behind by one that was killed is not followed.
    if std::fs::symlink_metadata(&socket).is_err() {
        return;
    }
    let Some(entries) = read_table(&mps_table::path_for(&socket)) else { return };
    if !entries.iter().any(|e| e.mode == Mode::Spatial) {
        return;
    }
    let pid = std::process::id();
    let name = match visible_gpu() {
        Ok(name) => name,
        Err(why) => {
            tracing::info!("pid {pid}: runs time-sliced, not over MPS: {why}");
            return;
        }
    };
    let Some(entry) = mps_table::find(&entries, &name) else {
        tracing::debug!("pid {pid}: GPU {name} is not in the MPS table: time-sliced");
        return;
    };
    let pipe = match (entry.mode, &entry.pipe) {
        (Mode::Spatial, Some(pipe)) => pipe,
        _ => {
            tracing::debug!("pid {pid}: GPU {} is time-sliced ({})", entry.uuid, entry.why);
            return;
        }
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !entry.users.is_empty() && !entry.users.contains(&uid) {
        let users: Vec<String> = entry.users.iter().map(u32::to_string).collect();
        tracing::info!(
            "pid {pid}: GPU {} is spatial, but processes of uid {} use it and an MPS server runs one uid's clients at a time (uid {uid} would wait for them all to exit): time-sliced",
            entry.uuid,
            users.join(",")
        );
        return;
    }
    if !std::path::Path::new(pipe).join("control").exists() {
        tracing::info!("pid {pid}: GPU {}'s MPS daemon does not listen in {pipe}: time-sliced", entry.uuid);
        return;
    }
    // Added before the real cuInit, while the driver has no threads (see `mps::write_env`).
    std::env::set_var(PIPE_DIRECTORY, pipe);
    POINTED.store(true, Relaxed);
    tracing::info!("pid {pid}: GPU {} is spatial ({}): over its MPS daemon, {PIPE_DIRECTORY}={pipe}", entry.uuid, entry.why);
}

/// After the real `cuInit` returned `code`: true, once, when this process was pointed at a
/// daemon and MPS failed it (the daemon answered but its server did not take the client).
/// The pipe directory is then taken back, so that the caller's second `cuInit` runs
/// time-sliced: a daemon in trouble must not stop the program.
pub fn retry_without_daemon(code: CuResult) -> bool {
    if !MPS_ERRORS.contains(&code) || !POINTED.swap(false, Relaxed) {
        return false;
    }
    tracing::warn!("pid {}: MPS refused this process at cuInit (CUDA error {code}); trying again time-sliced", std::process::id());
    std::env::remove_var(PIPE_DIRECTORY);
    true
}

fn read_table(path: &std::path::Path) -> Option<Vec<mps_table::Entry>> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path).ok()?.take(TABLE_MAX).read_to_string(&mut text).ok()?;
    Some(mps_table::parse(&text))
}

/// The one GPU this process may use, as `CUDA_VISIBLE_DEVICES` names it (a UUID or a prefix of
/// one), else as NVML lists it; why not, when it may use several or cannot be told.
fn visible_gpu() -> Result<String, String> {
    let nvml_gpus = || real_nvml::nvml().and_then(|n| n.gpu_uuids()).ok_or_else(|| "NVML cannot list the GPUs it may use".to_string());
    let Some(visible) = std::env::var_os(VISIBLE_DEVICES) else {
        let gpus = nvml_gpus()?;
        return match gpus.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err("NVML lists no GPU".into()),
            _ => Err(format!("it may use {} GPUs (no {VISIBLE_DEVICES}), and a GPU's MPS daemon serves that GPU alone", gpus.len())),
        };
    };
    let visible = visible.to_string_lossy();
    let entries: Vec<&str> = visible.split(',').map(str::trim).collect();
    let [one] = entries.as_slice() else {
        return Err(format!("it may use several GPUs ({VISIBLE_DEVICES}={visible}), and a GPU's MPS daemon serves that GPU alone"));
    };
    let lower = one.to_ascii_lowercase();
    if lower.starts_with("gpu-") || lower.starts_with("mig-") {
        return Ok(one.to_string());
    }
    match one.parse::<u32>() {
        Ok(index) => match nvml_gpus()?.as_slice() {
            [gpu] if index == 0 => Ok(gpu.clone()),
            gpus => Err(format!(
                "{VISIBLE_DEVICES}={visible} names a GPU by index on a node of {} GPUs: MPS renumbers devices, so name it by UUID ({VISIBLE_DEVICES}=GPU-...)",
                gpus.len()
            )),
        },
        Err(_) => Err(format!("{VISIBLE_DEVICES}={visible:?} names no GPU")),
    }
}
