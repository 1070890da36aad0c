//! `gpuslice run`: start a program under the shim, with limits, replacing this process.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Device memory limit per device: e.g. 4GiB, 512MiB, 4096M (binary units: 4GB means
    /// 4 GiB); `unlimited` drops any limit the environment would pass on.
    #[arg(long, allow_hyphen_values = true)]
    memory: Option<String>,
    /// Share of the device's time in percent, 1-100.
    #[arg(long, allow_hyphen_values = true)]
    sm: Option<String>,
    /// GPUSLICE_SM_MAX: the most it may get when the device is otherwise idle, 1-100 or
    /// `none` (issue 18); without it the share is also the cap.
    #[arg(long)]
    sm_max: Option<String>,
    /// high, normal or low.
    #[arg(long)]
    priority: Option<String>,
    /// Join this group: its processes share one memory limit and one SM share (needs a
    /// controller at $GPUSLICE_SOCKET or /run/gpuslice/gpuslice.sock).
    #[arg(long)]
    group: Option<String>,
    /// Let the controller suspend the group for higher-priority work (issue 22); marked before
    /// the program starts, so the group may not exist yet.
    #[arg(long, requires = "group")]
    suspendable: bool,
    /// Run on the simulated GPU (16 GiB, no NVIDIA driver needed) that `make demo` and the
    /// tests use: its libcuda.so.1 from target/<profile>/sim, or $GPUSLICE_SIM_DIR.
    #[arg(long)]
    simulate: bool,
    /// The program and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// Where libgpuslice.so is: $GPUSLICE_LIB, else next to this binary, else ../lib from it.
pub fn find_library() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("GPUSLICE_LIB").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() { Ok(path) } else { Err(format!("GPUSLICE_LIB={} does not exist", path.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the gpuslice binary: {e}"))?;
    let dir = exe.parent().ok_or("the gpuslice binary has no parent directory")?;
    let candidates = [dir.join("libgpuslice.so"), dir.join("../lib/libgpuslice.so"), dir.join("../lib/gpuslice/libgpuslice.so")];
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| format!("libgpuslice.so not found next to {} or in ../lib; set GPUSLICE_LIB", exe.display()))
}

/// The simulated driver's directory (libcuda.so.1, libcuda.so, libnvidia-ml.so.1):
/// $GPUSLICE_SIM_DIR, else `sim/` next to this binary, made from the libsimcuda.so and
/// libsimnvml.so that the build puts there when it is missing.
pub fn find_simulator() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("GPUSLICE_SIM_DIR").filter(|p| !p.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.join("libcuda.so.1").is_file() { Ok(dir) } else { Err(format!("GPUSLICE_SIM_DIR={} has no libcuda.so.1", dir.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the gpuslice binary: {e}"))?;
    let here = exe.parent().ok_or("the gpuslice binary has no parent directory")?;
    let dir = here.join("sim");
    if dir.join("libcuda.so.1").is_file() && dir.join("libnvidia-ml.so.1").is_file() {
        return Ok(dir);
    }
    let (cuda, nvml) = (here.join("libsimcuda.so"), here.join("libsimnvml.so"));
    if !cuda.is_file() || !nvml.is_file() {
        return Err(format!(
            "the simulated GPU is not built: no {} (run `make demo`, or `cargo build --release -p gpuslice-simcuda -p gpuslice-simnvml`)",
            cuda.display()
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (target, name) in [("../libsimcuda.so", "libcuda.so.1"), ("libcuda.so.1", "libcuda.so"), ("../libsimnvml.so", "libnvidia-ml.so.1")] {
        let link = dir.join(name);
        if !link.exists() {
            // Two `run --simulate` started together race to make the links: one that another
            // made meanwhile is as good as our own.
            match std::os::unix::fs::symlink(target, &link) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && std::fs::read_link(&link).is_ok_and(|t| t == std::path::Path::new(target)) => {}
                r => r.map_err(|e| format!("cannot link {}: {e}", link.display()))?,
            }
        }
    }
    Ok(dir)
}

/// Every variable through which a memory limit reaches the shim, for `--memory unlimited`.
fn is_memory_limit_variable(name: &str) -> bool {
    use gpuslice_common::settings::{ENV_MEMORY_LIMIT, HAMI_MEMORY_LIMIT};
    [ENV_MEMORY_LIMIT, HAMI_MEMORY_LIMIT].iter().any(|v| name == *v || name.strip_prefix(v).is_some_and(|rest| rest.starts_with('_')))
}

pub fn run(args: RunArgs) -> Result<(), String> {
    let library = find_library()?;
    let mut command = std::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    if let Some(memory) = &args.memory {
        match crate::client::parse_memory(memory)? {
            gpuslice_common::protocol::Limit::Unlimited => {
                for (name, _) in std::env::vars_os() {
                    if name.to_str().is_some_and(is_memory_limit_variable) {
                        command.env_remove(name);
                    }
                }
            }
            gpuslice_common::protocol::Limit::Bytes(_) => {
                command.env("GPUSLICE_MEMORY_LIMIT", memory);
            }
        }
    }
    if let Some(sm) = &args.sm {
        gpuslice_common::settings::parse_share(sm).map_err(|e| format!("--sm {sm:?}: {e}"))?;
        command.env("GPUSLICE_SM_SHARE", sm);
    }
    if let Some(cap) = &args.sm_max {
        gpuslice_common::settings::parse_cap(cap).map_err(|e| format!("--sm-max {cap:?}: {e}"))?;
        command.env(gpuslice_common::settings::ENV_SM_MAX, cap);
    }
    if let Some(p) = &args.priority {
        p.parse::<gpuslice_common::ledger::Priority>().map_err(|e| format!("--priority: {e}"))?;
        command.env(gpuslice_common::protocol::ENV_PRIORITY, p);
    }
    if let Some(g) = &args.group {
        gpuslice_common::settings::check_group_name(g).map_err(|e| format!("--group {g:?}: {e}"))?;
        command.env(gpuslice_common::protocol::ENV_GROUP, g);
        let socket = crate::ask::SocketArg::default().path();
        // A status request, not a bare connect: the controller logs connections that say nothing.
        let asked = crate::ask::ask_within(&socket, &gpuslice_common::protocol::Request::Status, std::time::Duration::from_secs(2));
        if let Err(e) = asked {
            // The shim decides what a group without a controller means; the user hears it here first.
            eprintln!("gpuslice: warning: --group {g} cannot be joined: {e}");
        } else if args.suspendable {
            let mark = gpuslice_common::protocol::Suspendable { group: g.clone(), suspendable: true, allow_exports: false, ahead: true, path: None };
            match crate::ask::ask_within(&socket, &gpuslice_common::protocol::Request::SetSuspendable(mark), std::time::Duration::from_secs(2)) {
                Ok(_) => {}
                // Not suspendable is the safe side: the program runs, and is never suspended.
                Err(e) => eprintln!("gpuslice: warning: --suspendable: {e}; group {g} is not suspendable"),
            }
        }
    }
    if args.simulate {
        let sim = find_simulator()?;
        let path = match std::env::var("LD_LIBRARY_PATH") {
            Ok(existing) if !existing.is_empty() => format!("{}:{existing}", sim.display()),
            _ => sim.display().to_string(),
        };
        command.env("LD_LIBRARY_PATH", path);
    }
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", library.display()),
        _ => library.display().to_string(),
    };
    command.env("LD_PRELOAD", preload);
    let error = command.exec();
    Err(format!("cannot start {}: {error}", args.command[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_drops_every_memory_variable_and_nothing_else() {
        for name in ["GPUSLICE_MEMORY_LIMIT", "GPUSLICE_MEMORY_LIMIT_0", "CUDA_DEVICE_MEMORY_LIMIT", "CUDA_DEVICE_MEMORY_LIMIT_3"] {
            assert!(is_memory_limit_variable(name), "{name}");
        }
        for name in ["GPUSLICE_MEMORY_LIMITS", "GPUSLICE_SM_SHARE", "CUDA_DEVICE_SM_LIMIT", "PATH"] {
            assert!(!is_memory_limit_variable(name), "{name}");
        }
    }
}
