//! `gpuslice run`: start a program under the shim, with limits, replacing this process.

use gpuslice_common::size::parse_size;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Device memory limit per device, e.g. 4GiB, 512MiB, 4096M.
    #[arg(long)]
    memory: Option<String>,
    /// Share of the device's time in percent, 1-100.
    #[arg(long)]
    sm: Option<String>,
    /// high, normal or low.
    #[arg(long)]
    priority: Option<String>,
    /// Join this group: its processes share one memory limit and one SM share.
    #[arg(long)]
    group: Option<String>,
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
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| format!("libgpuslice.so not found next to {} or in ../lib; set GPUSLICE_LIB", exe.display()))
}

pub fn run(args: RunArgs) -> Result<(), String> {
    let library = find_library()?;
    let mut command = std::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    if let Some(memory) = &args.memory {
        parse_size(memory).map_err(|e| format!("--memory: {e}"))?;
        command.env("GPUSLICE_MEMORY_LIMIT", memory);
    }
    if let Some(sm) = &args.sm {
        gpuslice_common::settings::parse_share(sm).map_err(|e| format!("--sm {sm:?}: {e}"))?;
        command.env("GPUSLICE_SM_SHARE", sm);
    }
    if let Some(p) = &args.priority {
        p.parse::<gpuslice_common::ledger::Priority>().map_err(|e| format!("--priority: {e}"))?;
        command.env(gpuslice_common::protocol::ENV_PRIORITY, p);
    }
    if let Some(g) = &args.group {
        gpuslice_common::settings::check_group_name(g).map_err(|e| format!("--group {g:?}: {e}"))?;
        command.env(gpuslice_common::protocol::ENV_GROUP, g);
    }
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", library.display()),
        _ => library.display().to_string(),
    };
    command.env("LD_PRELOAD", preload);
    let error = command.exec();
    Err(format!("cannot start {}: {error}", args.command[0]))
}
