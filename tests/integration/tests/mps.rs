//! MPS as a spatial mode: under an MPS daemon the shim writes MPS's client priority and
//! active-thread percentage from its own settings, leaves the user's own values alone, and lets
//! the time throttle stand aside where the percentage carries the share.
//!
//! The simulated driver plays "served by MPS" with `SIMCUDA_MPS=1` (the device attribute
//! `CU_DEVICE_ATTRIBUTE_MPS_ENABLED`); a folder holding a file named `control` plays the
//! daemon's pipe directory. What MPS then does with the values is the GPU's business
//! (`make gpu-bench` measures it); here the test sees what the driver would read.

use gpuslice_integration::*;

/// The device work of a measured run, and the share that would stretch it under the throttle.
const KERNELS: u64 = 60;
const KERNEL_NS: u64 = 2_000_000;
const SHARE: u32 = 25;

/// A machine whose device says MPS serves it, with a daemon's pipe directory.
fn mps_machine() -> (Sim, String) {
    let sim = Sim::new().env("SIMCUDA_MPS", 1);
    let pipes = sim.path("mps-pipes");
    std::fs::create_dir_all(&pipes).unwrap();
    std::fs::write(pipes.join("control"), b"").unwrap();
    let dir = pipes.display().to_string();
    (sim, dir)
}

/// The values the driver sees after `cuInit` and after the context is made, and the wall time
/// of `KERNELS` kernels of `KERNEL_NS`.
fn observe(client: Client<'_>) -> (String, String, f64, Output) {
    let script = format!(
        "init ctx 0 getenv CUDA_MPS_CLIENT_PRIORITY getenv CUDA_MPS_ACTIVE_THREAD_PERCENTAGE launch 3 {KERNEL_NS} sync mark launch {KERNELS} {KERNEL_NS} sync elapsed"
    );
    let out = client.env("GPUSLICE_LOG", "info").args(&script).run();
    out.assert_all_ok();
    let priority = out.get("getenv", "value").unwrap().to_string();
    let threads = out.nth("getenv", 1).split("value=").nth(1).unwrap().to_string();
    let ms: f64 = out.get("elapsed", "ms").unwrap().parse().unwrap();
    (priority, threads, ms, out)
}

fn device_ms() -> f64 {
    (KERNELS * KERNEL_NS) as f64 / 1e6
}

#[test]
fn under_mps_priority_and_share_become_mps_settings_and_the_throttle_stands_aside() {
    let (sim, pipes) = mps_machine();
    let client = sim.client(Route::Procaddr).shim().env("CUDA_MPS_PIPE_DIRECTORY", &pipes).env("GPUSLICE_PRIORITY", "high").env("GPUSLICE_SM_SHARE", SHARE);
    let (priority, threads, ms, out) = observe(client);
    assert_eq!(priority, "0", "high maps onto MPS's normal (upper) client priority:\n{out}");
    assert_eq!(threads, SHARE.to_string(), "the share becomes the active-thread percentage:\n{out}");
    // Spatial: the percentage carries the share, so launches are not also held to 25% of the time.
    assert!(ms < device_ms() * 2.0, "{ms:.1} ms for {:.1} ms of device work: the throttle must stand aside under MPS\n{out}", device_ms());
    let said = out.stderr_lines_with(&["served by MPS"]);
    assert_eq!(said.len(), 1, "one line says what was mapped:\n{out}");
    assert!(
        said[0].contains("CUDA_MPS_CLIENT_PRIORITY=0") && said[0].contains("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25") && said[0].contains("spatial"),
        "{}",
        said[0]
    );

    // Low (and normal) yield: MPS's below-normal level; no share, no percentage.
    let client = sim.client(Route::Procaddr).shim().env("CUDA_MPS_PIPE_DIRECTORY", &pipes).env("GPUSLICE_PRIORITY", "low");
    let (priority, threads, _, out) = observe(client);
    assert_eq!((priority.as_str(), threads.as_str()), ("1", "(unset)"), "{out}");
}

#[test]
fn the_users_own_mps_settings_win_and_gpuslice_mps_off_leaves_mps_alone() {
    let (sim, pipes) = mps_machine();
    let client = sim
        .client(Route::Procaddr)
        .shim()
        .env("CUDA_MPS_PIPE_DIRECTORY", &pipes)
        .env("GPUSLICE_PRIORITY", "high")
        .env("GPUSLICE_SM_SHARE", SHARE)
        .env("CUDA_MPS_CLIENT_PRIORITY", "1")
        .env("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "60");
    let (priority, threads, ms, out) = observe(client);
    assert_eq!((priority.as_str(), threads.as_str()), ("1", "60"), "the user's values stay:\n{out}");
    // The user's percentage carries the share as well: still spatial.
    assert!(ms < device_ms() * 2.0, "{ms:.1} ms: {out}");

    let client = sim
        .client(Route::Procaddr)
        .shim()
        .env("CUDA_MPS_PIPE_DIRECTORY", &pipes)
        .env("GPUSLICE_PRIORITY", "high")
        .env("GPUSLICE_SM_SHARE", SHARE)
        .env("GPUSLICE_MPS", "off");
    let (priority, threads, ms, out) = observe(client);
    assert_eq!((priority.as_str(), threads.as_str()), ("(unset)", "(unset)"), "GPUSLICE_MPS=off writes nothing:\n{out}");
    let want = device_ms() * 100.0 / f64::from(SHARE);
    assert!(ms > want * 0.8, "{ms:.1} ms for {:.1} ms of device work at {SHARE}%: time-based shares apply when MPS mode is off\n{out}", device_ms());
    assert!(out.stderr_lines_with(&["served by MPS"]).is_empty(), "{out}");
}

#[test]
fn without_an_mps_daemon_nothing_is_written_and_shares_stay_time_based() {
    // The device does not say MPS, and no daemon listens: plain time-slicing.
    let sim = Sim::new();
    let empty = sim.path("no-daemon");
    std::fs::create_dir_all(&empty).unwrap();
    let client =
        sim.client(Route::Procaddr).shim().env("CUDA_MPS_PIPE_DIRECTORY", empty.display()).env("GPUSLICE_PRIORITY", "high").env("GPUSLICE_SM_SHARE", SHARE);
    let (priority, threads, ms, out) = observe(client);
    assert_eq!((priority.as_str(), threads.as_str()), ("(unset)", "(unset)"), "{out}");
    let want = device_ms() * 100.0 / f64::from(SHARE);
    assert!(ms > want * 0.8, "{ms:.1} ms: the share is throttled in time ({want:.0} ms expected)\n{out}");

    // A bad GPUSLICE_MPS refuses CUDA work with one line, like every other setting.
    let out = sim.client(Route::Procaddr).shim().env("GPUSLICE_MPS", "sometimes").args("init").run();
    assert_eq!(out.code(0), CUDA_ERROR_INVALID_VALUE, "{out}");
    assert_eq!(out.stderr_lines_with(&["GPUSLICE_MPS"]).len(), 1, "{out}");
}
