//! SM-share throttling on the simulated device timeline: kernels of every size, graphs, many
//! streams and threads, per-thread default streams, two processes at once, and that an
//! unthrottled process is left alone. The simulated device runs one kernel at a time (like
//! throughput-bound kernels that fill every SM), so "device time used / elapsed time" is exactly
//! the share a process got. Elapsed time is the simulated clock's (`Sim::with_clock`), which
//! moves only when every process waits: the figures do not depend on the machine's load, and
//! each is measured once.

use gpuslice_integration::*;

/// One at a time: the two-process test loads the machine (the figures are on the simulated
/// clock and would hold anyway; this keeps the CI machine's load down).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Device work per measured run: long enough that one burst (2 ms) is a small part of it.
const WORK_NS: u64 = 200_000_000;

/// Achieved share in percent for `script` (which must end with `... elapsed`), given the device
/// time it ran after its `mark`.
fn achieved(sim: &Sim, route: Route, share: Option<u32>, script: &str, device_ns: u64) -> f64 {
    let mut client = sim.client(route).shim();
    if let Some(s) = share {
        client = client.env("GPUSLICE_SM_SHARE", s);
    }
    let out = client.args(script).run();
    out.assert_all_ok();
    let wall_ms: f64 = out.get("elapsed", "ms").expect("elapsed line").parse().unwrap();
    device_ns as f64 / 1e6 / wall_ms * 100.0
}

/// A measured run of `n` kernels of `ns` each, after a warm-up that teaches the shim the kernel
/// and spends the bucket's saved-up burst.
fn kernels(n: u64, ns: u64) -> String {
    let warm = 4_000_000 / ns + 2;
    format!("init ctx 0 launch {warm} {ns} sync mark launch {n} {ns} sync elapsed")
}

fn assert_within(got: f64, want: f64, points: f64, what: &str) {
    assert!((got - want).abs() <= points, "{what}: achieved {got:.1}% for a {want}% share (allowed ±{points})");
}

fn assert_share(want: f64, points: f64, what: &str, measure: impl FnOnce() -> f64) {
    assert_within(measure(), want, points, what);
}

#[test]
fn shares_hold_for_short_medium_and_long_kernels() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    for ns in [20_000u64, 200_000, 2_000_000] {
        for share in [10u32, 30, 60, 100] {
            assert_share(share as f64, 2.0, &format!("{} µs kernels", ns / 1000), || {
                achieved(&sim, Route::Procaddr, Some(share), &kernels(WORK_NS / ns, ns), WORK_NS)
            });
        }
    }
}

#[test]
fn every_route_and_launch_entry_point_is_throttled() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let ns = 200_000;
    let n = WORK_NS / ns;
    for route in [Route::Link, Route::Dlsym, Route::Procaddr, Route::ProcaddrPtsz] {
        assert_share(30.0, 2.0, &format!("cuLaunchKernel via {route:?}"), || achieved(&sim, route, Some(30), &kernels(n, ns), WORK_NS));
    }
    let script = format!("init ctx 0 launchex 22 {ns} sync mark launchex {n} {ns} sync elapsed");
    assert_share(30.0, 2.0, "cuLaunchKernelEx", || achieved(&sim, Route::Procaddr, Some(30), &script, WORK_NS));
}

#[test]
fn graphs_are_charged_their_whole_duration() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    // 10 kernels of 200 µs per graph = 2 ms per launch; 100 launches = 200 ms of device time.
    for share in [10u32, 30, 60] {
        // The first launch is measured before it is charged in full, and the bucket starts
        // with its burst: allow a little more here than for plain kernels.
        assert_share(share as f64, 3.0, "graph launches", || {
            let out = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", share).args("init ctx 0 graph 10 200000 100").run();
            out.assert_all_ok();
            let wall_ms: f64 = out.get("graph", "ms").unwrap().parse().unwrap();
            200.0 / wall_ms * 100.0
        });
    }
}

#[test]
fn many_streams_and_threads_share_one_bucket() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    // 4 threads × 250 kernels × 200 µs = 200 ms of device time, on four streams.
    for share in [10u32, 30, 60] {
        let script = "init ctx 0 launch 22 200000 sync mark plaunch 4 250 200000 elapsed";
        assert_share(share as f64, 2.0, "4 threads on 4 streams", || achieved(&sim, Route::Procaddr, Some(share), script, WORK_NS));
    }
}

#[test]
fn two_processes_get_their_own_shares() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let ns = 200_000u64;
    // Each runs 1.2 s at its share, both from one virtual instant, so they overlap for all of it.
    let clock = sim.clock();
    let go = sim.path_str("go");
    let run = |share: u32| {
        let n = (1_200_000_000 * share as u64 / 100) / ns;
        let script = format!("init ctx 0 launch {} {ns} sync waitfile {go} mark launch {n} {ns} sync elapsed", 4_000_000 / ns + 2);
        ((share, n), sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", share).args(&script).spawn())
    };
    let (runs, procs): (Vec<(u32, u64)>, Vec<Running>) = [run(30), run(60)].into_iter().unzip();
    clock.start_together(&go, &procs, "sync");
    clock.park();
    for ((share, n), p) in runs.into_iter().zip(procs) {
        let out = p.wait();
        out.assert_all_ok();
        let ms: f64 = out.get("elapsed", "ms").unwrap().parse().unwrap();
        assert_within((n * ns) as f64 / 1e6 / ms * 100.0, f64::from(share), 3.0, "two processes at once");
    }
}

#[test]
fn captured_launches_are_not_charged_until_the_graph_runs() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    // Capturing 200 kernels of 2 ms at 10% would take 4 s if capture were throttled; the graph
    // itself (400 ms of device work, launched once) finishes after about 0.4 s.
    let out = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", 10).args("init ctx 0 mark graph 200 2000000 1 elapsed").run();
    out.assert_all_ok();
    let ms: f64 = out.get("elapsed", "ms").unwrap().parse().unwrap();
    assert!((400.0..1000.0).contains(&ms), "capture and one launch of a 400 ms graph at 10% took {ms:.1} ms (capture throttled?)");
}

#[test]
fn unthrottled_processes_run_at_full_speed() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let ns = 20_000u64;
    let script = kernels(WORK_NS / ns, ns);
    let plain = achieved(&sim, Route::Procaddr, None, &script, WORK_NS);
    let hundred = achieved(&sim, Route::Procaddr, Some(100), &script, WORK_NS);
    assert!(plain > 97.0 && hundred > 97.0, "unset {plain:.1}%, 100: {hundred:.1}%");
    assert_share(30.0, 2.0, "HAMi's CUDA_DEVICE_SM_LIMIT", || {
        let hami = sim.client(Route::Procaddr).shim().env("CUDA_DEVICE_SM_LIMIT", 30).args(&kernels(WORK_NS / ns, ns)).run();
        let wall_ms: f64 = hami.get("elapsed", "ms").unwrap().parse().unwrap();
        WORK_NS as f64 / 1e6 / wall_ms * 100.0
    });
}

#[test]
fn a_bad_share_refuses_cuda_work() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    for bad in ["0", "101", "half"] {
        let out = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", bad).args("init").run();
        assert_eq!(out.code(0), 1, "GPUSLICE_SM_SHARE={bad} must make cuInit fail");
        assert_eq!(out.stderr_lines_with(&["gpuslice", "GPUSLICE_SM_SHARE"]).len(), 1, "{bad}: {}", out.stderr);
    }
}

#[test]
fn a_killed_process_does_not_hold_the_device() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    // A throttled neighbour in the middle of its bursts, killed with SIGKILL: it can neither
    // finish its burst nor hand its turn over. The next process must not wait on it.
    let mut victim = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", 50).args("init ctx 0 launch 100000 2000000 sync").spawn();
    // Its own virtual time runs fast while it is alone: enough kernels that it is still busy
    // when killed after 150 ms of real time (then its clock slot is dead too, and found so).
    std::thread::sleep(std::time::Duration::from_millis(150));
    victim.kill();
    let _ = victim.wait();
    let ns = 200_000u64;
    assert_share(60.0, 2.0, "right after a throttled neighbour was killed", || achieved(&sim, Route::Procaddr, Some(60), &kernels(WORK_NS / ns, ns), WORK_NS));
}
