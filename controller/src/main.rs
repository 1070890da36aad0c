//! `gpuslice`: the controller daemon (`serve`) and the command-line tool around it.

mod activity;
mod agents;
mod ask;
mod checkpoint;
mod client;
mod crosscheck;
mod device_memory;
mod exports;
mod http;
mod lease_clock;
mod metrics;
mod mps_choice;
mod mps_daemon;
mod mps_devices;
mod mps_orphan;
mod mps_view;
mod process;
mod refusal;
mod room;
mod run;
mod serve;
mod state;
mod suspend;
mod suspend_cli;
mod suspend_driver;
mod top;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "gpuslice",
    version,
    about = "Share one NVIDIA GPU between unmodified programs: memory quotas, SM shares and priorities per process or group."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: the shared ledger, the socket, group quotas, live edits.
    Serve(serve::ServeArgs),
    /// Change the limits of a running process or a group; they apply within 100 ms.
    Set(client::SetArgs),
    /// Remove an empty group (refused while it has members).
    Rm(client::RmArgs),
    /// List registered processes and groups: memory, shares, throttling, refusals.
    Ls(client::LsArgs),
    /// The controller's own state.
    Status(client::StatusArgs),
    /// A live view of processes and groups (memory, shares, throttling, priority); q quits.
    Top(top::TopArgs),
    /// Move every process of a group off the GPU (the driver's checkpoint API); `resume` brings
    /// it back. Its CPU threads run on and block at their next CUDA call.
    Suspend(suspend_cli::GroupArgs),
    /// Bring a suspended group back onto the GPU.
    Resume(suspend_cli::GroupArgs),
    /// Start a program with libgpuslice.so preloaded and the given limits.
    Run(run::RunArgs),
    /// List the GPUs NVML sees, with their memory.
    Devices,
    /// Check a config file the way `serve` and the shim read it: every section, then what a
    /// process in this environment (GPUSLICE_*/CUDA_DEVICE_*) would get.
    CheckConfig {
        /// The TOML file; defaults to $GPUSLICE_CONFIG.
        file: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_pipe();
    }
    let result = match cli.command {
        Command::Serve(args) => {
            init_logging();
            serve::serve(args)
        }
        Command::Set(args) => client::set(args),
        Command::Rm(args) => client::rm(args),
        Command::Ls(args) => client::ls(args),
        Command::Status(args) => client::status(args),
        Command::Top(args) => top::top(args),
        Command::Run(args) => run::run(args),
        Command::Suspend(args) => suspend_cli::suspend(args),
        Command::Resume(args) => suspend_cli::resume(args),
        Command::Devices => devices(),
        Command::CheckConfig { file } => check_config(file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("gpuslice: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// A command whose output goes to a pipe that closes early (`gpuslice ls | head -1`) ends
/// there, silently, as Unix tools do, rather than panicking in `println!`: SIGPIPE gets its
/// default action back (Rust ignores it). Not for `serve`, which must outlive a closed log pipe.
fn quiet_on_closed_pipe() {
    // SAFETY: restoring a signal's default disposition has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// The daemon logs with `tracing` to stderr; `GPUSLICE_LOG` is the filter (default info).
fn init_logging() {
    let filter = std::env::var("GPUSLICE_LOG").ok().filter(|f| !f.trim().is_empty()).unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("gpuslice: warning: GPUSLICE_LOG={filter:?} is not a log filter ({e}); using \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(std::io::stderr).init();
}

fn devices() -> Result<(), String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML is not available ({e}); is the NVIDIA driver installed?"))?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    for index in 0..count {
        let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        let name = device.name().unwrap_or_else(|_| "?".into());
        let uuid = device.uuid().unwrap_or_else(|_| "?".into());
        match device.memory_info() {
            Ok(m) => println!(
                "{index}  {name}  {uuid}  memory {} total, {} used",
                gpuslice_common::size::format_size(m.total),
                gpuslice_common::size::format_size(m.used)
            ),
            Err(e) => println!("{index}  {name}  {uuid}  memory unknown ({e})"),
        }
    }
    Ok(())
}

fn check_config(file: Option<String>) -> Result<(), String> {
    use gpuslice_common::settings::{FileSettings, Settings, ENV_CONFIG};
    let (origin, file) = match file {
        Some(f) => ("config file", Some(f)),
        None => (ENV_CONFIG, std::env::var(ENV_CONFIG).ok().filter(|f| !f.is_empty())),
    };
    let parsed = match &file {
        Some(path) => Some(FileSettings::read_as(origin, path).map_err(|e| e.to_string())?),
        None => None,
    };
    if let (Some(path), Some(parsed)) = (&file, &parsed) {
        // What `serve` refuses, in its words.
        parsed.for_controller()?;
        println!("{path}: OK");
        for line in parsed.describe() {
            println!("  {line}");
        }
    }
    let vars: Vec<(String, String)> =
        gpuslice_common::settings::env_pairs(std::env::vars_os()).map_err(|e| e.to_string())?.into_iter().filter(|(k, _)| k != ENV_CONFIG).collect();
    let settings = Settings::resolve(&vars, parsed).map_err(|e| e.to_string())?;
    println!("a process started here gets: {}", settings.describe());
    Ok(())
}
