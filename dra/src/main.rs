//! `gpuslice-dra`: the DRA kubelet plugin's command line (see serve.rs).

use clap::Parser;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("GPUSLICE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = gpuslice_dra::serve::Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpuslice-dra: cannot start its runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(gpuslice_dra::serve::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpuslice-dra: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
