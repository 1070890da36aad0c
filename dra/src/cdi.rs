//! The CDI spec (Container Device Interface 1.1) of a prepared claim: what the container runtime
//! adds to each container that uses it. One JSON file per claim in the CDI directory; its device
//! ids (`gpuslice.dev/claim=<claim uid>-<device>`) are what the kubelet passes to the runtime.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub const CDI_VERSION: &str = "1.1.0";
/// The CDI `kind` (vendor/class) of every gpuslice device.
pub const KIND: &str = "gpuslice.dev/claim";

/// Where the node keeps what the containers need, and where the containers see it.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The CDI spec directory (the runtime's, /var/run/cdi by default).
    pub spec_dir: PathBuf,
    /// libgpuslice.so on the node.
    pub host_library: PathBuf,
    /// Where containers see it (LD_PRELOAD names this).
    pub container_library: PathBuf,
    /// The controller's socket directory on the node.
    pub host_socket_dir: PathBuf,
    /// Where containers see it.
    pub container_socket_dir: PathBuf,
    /// The socket's file name in that directory.
    pub socket_name: String,
}

/// One device of a claim as the container gets it.
#[derive(Debug, Clone)]
pub struct ClaimDevice {
    /// The CDI device name (unique in the spec directory).
    pub name: String,
    /// The GPU's UUID.
    pub uuid: String,
}

/// The CDI device id the kubelet hands to the runtime.
pub fn device_id(name: &str) -> String {
    format!("{KIND}={name}")
}

/// The claim's spec file name; one per claim, so that unprepare removes exactly it.
pub fn spec_path(dir: &Path, claim_uid: &str) -> PathBuf {
    dir.join(format!("gpuslice.dev-claim_{claim_uid}.json"))
}

/// The spec: every device of the claim gets the shim preloaded, the controller's socket, the
/// claim's group and the GPUs the claim was given (and only those) visible.
pub fn spec(paths: &Paths, group: &str, devices: &[ClaimDevice]) -> Value {
    let uuids: Vec<&str> = devices.iter().map(|d| d.uuid.as_str()).collect();
    let visible = uuids.join(",");
    let socket = paths.container_socket_dir.join(&paths.socket_name);
    let edits = json!({
        "env": [
            format!("LD_PRELOAD={}", paths.container_library.display()),
            format!("{}={}", gpuslice_common::protocol::ENV_SOCKET, socket.display()),
            format!("{}={group}", gpuslice_common::protocol::ENV_GROUP),
            format!("NVIDIA_VISIBLE_DEVICES={visible}"),
            format!("CUDA_VISIBLE_DEVICES={visible}"),
        ],
        "mounts": [
            {
                "hostPath": paths.host_library.display().to_string(),
                "containerPath": paths.container_library.display().to_string(),
                "options": ["ro", "nosuid", "nodev", "bind"],
            },
            {
                "hostPath": paths.host_socket_dir.display().to_string(),
                "containerPath": paths.container_socket_dir.display().to_string(),
                // Read-only, as in the annotation example: connecting needs no write access,
                // and a tenant must not replace the socket under its neighbours.
                "options": ["ro", "nosuid", "nodev", "bind"],
            },
        ],
    });
    json!({
        "cdiVersion": CDI_VERSION,
        "kind": KIND,
        "devices": devices.iter().map(|d| json!({ "name": d.name, "containerEdits": edits })).collect::<Vec<_>>(),
    })
}

/// Writes `value` to `path` whole or not at all (a temporary file renamed over it, synced), so
/// that a plugin killed mid-write leaves the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, value: &Value) -> Result<(), String> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| format!("{}: no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let body = serde_json::to_vec_pretty(value).expect("a JSON value serialises");
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&body)?;
        f.sync_all()
    });
    written.and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

/// Removes the claim's spec; one that is already gone is fine.
pub fn remove(dir: &Path, claim_uid: &str) -> Result<(), String> {
    let path = spec_path(dir, claim_uid);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}
