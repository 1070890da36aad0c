//! SM-share throttling on the simulated device timeline: kernels of every size, graphs, many
//! streams and threads, per-thread default streams, two processes at once, and that an
//! unthrottled process is left alone. The simulated device runs one kernel at a time (like
//! throughput-bound kernels that fill every SM), so "device time used / wall time" is exactly
//! the share a process got.

use gpuslice_integration::*;

/// These tests measure wall time on a 2-core CI machine: one at a time, so that they do not
/// starve each other's launching threads of CPU (a thread that wakes late past the bucket's
/// capacity loses device time for good, and the test would measure the machine, not the shim).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Device work per measured run: long enough that one burst (2 ms), and a few milliseconds of
/// a launcher waking late on a busy CI machine, are a small part of it.
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

/// Measures with `measure`, and once more if the first figure is off: on a loaded 2-core CI
/// machine a launcher can be descheduled for tens of milliseconds, which no throttle can make
/// up for (the bucket keeps at most 2 ms of device time). Two misses in a row fail the test,
/// and the message shows both figures.
fn assert_share(want: f64, points: f64, what: &str, mut measure: impl FnMut() -> f64) {
    let first = measure();
    if (first - want).abs() <= points {
        return;
    }
    let second = measure();
    assert_within(second, want, points, &format!("{what} (first try: {first:.1}%)"));
}

#[test]
fn shares_hold_for_short_medium_and_long_kernels() {
    let _serial = serial();
    let sim = Sim::new();
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
    let sim = Sim::new();
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
    let sim = Sim::new();
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
    let sim = Sim::new();
    // 4 threads × 250 kernels × 200 µs = 200 ms of device time, on four streams.
    for share in [10u32, 30, 60] {
        let script = "init ctx 0 launch 22 200000 sync mark plaunch 4 250 200000 elapsed";
        assert_share(share as f64, 2.0, "4 threads on 4 streams", || achieved(&sim, Route::Procaddr, Some(share), script, WORK_NS));
    }
}

#[test]
fn two_processes_get_their_own_shares() {
    let _serial = serial();
    let sim = Sim::new();
    let ns = 200_000u64;
    // Each runs about 1.2 s of wall time at its share, so they overlap for all of it.
    let run = |share: u32| {
        let n = (1_200_000_000 * share as u64 / 100) / ns;
        (n, sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", share).args(&kernels(n, ns)).spawn())
    };
    let pair = || {
        let (n30, a) = run(30);
        let (n60, b) = run(60);
        [(30.0, n30, a.wait()), (60.0, n60, b.wait())].map(|(share, n, out)| {
            out.assert_all_ok();
            let wall_ms: f64 = out.get("elapsed", "ms").unwrap().parse().unwrap();
            (share, (n * ns) as f64 / 1e6 / wall_ms * 100.0)
        })
    };
    let off = |got: &[(f64, f64); 2]| got.iter().any(|(share, a)| (a - share).abs() > 3.0);
    let mut got = pair();
    if off(&got) {
        // As `assert_share`: once more before believing a miss on a busy machine.
        eprintln!("two processes, first try: {got:?}");
        got = pair();
    }
    for (share, achieved) in got {
        assert_within(achieved, share, 3.0, "two processes at once");
    }
}

#[test]
fn captured_launches_are_not_charged_until_the_graph_runs() {
    let _serial = serial();
    let sim = Sim::new();
    // Capturing 200 kernels of 2 ms at 10% would take 4 s if capture were throttled; the graph
    // itself (400 ms of device work, launched once) finishes after about 0.4 s.
    let started = std::time::Instant::now();
    let out = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", 10).args("init ctx 0 graph 200 2000000 1").run();
    out.assert_all_ok();
    assert!(started.elapsed().as_secs_f64() < 2.5, "capture was throttled: {:?}", started.elapsed());
}

#[test]
fn unthrottled_processes_run_at_full_speed() {
    let _serial = serial();
    let sim = Sim::new();
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
    let sim = Sim::new();
    for bad in ["0", "101", "half"] {
        let out = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", bad).args("init").run();
        assert_eq!(out.code(0), 1, "GPUSLICE_SM_SHARE={bad} must make cuInit fail");
        assert_eq!(out.stderr_lines_with(&["gpuslice", "GPUSLICE_SM_SHARE"]).len(), 1, "{bad}: {}", out.stderr);
    }
}

#[test]
fn a_killed_process_does_not_hold_the_device() {
    let _serial = serial();
    let sim = Sim::new();
    // A throttled neighbour in the middle of its bursts, killed with SIGKILL: it can neither
    // finish its burst nor hand its turn over. The next process must not wait on it.
    let mut victim = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", 50).args("init ctx 0 launch 1000 2000000 sync").spawn();
    std::thread::sleep(std::time::Duration::from_millis(150));
    victim.kill();
    let _ = victim.wait();
    let ns = 200_000u64;
    assert_share(60.0, 2.0, "right after a throttled neighbour was killed", || achieved(&sim, Route::Procaddr, Some(60), &kernels(WORK_NS / ns, ns), WORK_NS));
}
