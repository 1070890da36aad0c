//! `gpuslice`: the command-line tool (and, later, the controller daemon).

mod run;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "gpuslice", version, about = "Share one NVIDIA GPU between unmodified programs: memory quotas and SM shares per process.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a program with libgpuslice.so preloaded and the given limits.
    Run(run::RunArgs),
    /// List the GPUs NVML sees, with their memory.
    Devices,
    /// Check a config file (and the GPUSLICE_*/CUDA_DEVICE_* environment) the way the shim reads it.
    CheckConfig {
        /// The TOML file; defaults to $GPUSLICE_CONFIG.
        file: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
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
    let vars: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k != ENV_CONFIG).collect();
    let settings = Settings::resolve(&vars, parsed).map_err(|e| e.to_string())?;
    println!("{}", settings.describe());
    Ok(())
}
