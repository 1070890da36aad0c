//! No panic crosses the FFI boundary: with `GPUSLICE_TEST_PANIC_IN=<hook>` the shim panics
//! inside that hook (a test-only point, read once at the first CUDA call), and the program sees
//! an error code for that one call, goes on, and finds the accounting as it was: a panic after
//! an allocation's reservation gives the reservation back, in the shared ledger too. Each panic
//! is one log line naming the hook and the panic's message, never Rust's default panic output
//! on the host program's stderr.

use gpuslice_integration::*;

/// What a hook that panicked returns: CUDA_ERROR_UNKNOWN, NVML_ERROR_UNKNOWN.
const UNKNOWN: i64 = 999;
/// Context reserve of the simulated driver here.
const R: u64 = 64 * MIB;

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_CTX_RESERVE", R)
}

/// One panic line per panicked call, naming the hook and the forced panic; nothing else of it.
fn assert_panic_lines(out: &Output, hook: &str, panics: usize) {
    let lines = out.stderr_lines_with(&["internal error in gpuslice's", hook, "forced panic", "returned"]);
    assert_eq!(lines.len(), panics, "{hook}: one line per panic:\n{out}");
    assert!(out.stderr.lines().all(|l| !l.starts_with("thread '") && !l.contains("panicked at")), "{hook}: no default panic output:\n{out}");
    assert!(out.lines.iter().all(|l| !l.contains("panic")), "{hook}: nothing on stdout:\n{out}");
}

#[test]
fn each_panic_point_returns_an_error_and_the_program_goes_on() {
    let sim = sim();
    // (hook armed, script, lines that must be UNKNOWN, lines that must be ok)
    let cases: [(&str, &str, &[usize], &[usize]); 4] = [
        ("cuInit", "init version init count", &[0, 2], &[1]),
        ("cuMemGetInfo_v2", "init ctx 0 info alloc 1M info", &[2, 4], &[0, 1, 3]),
        ("nvmlDeviceGetMemoryInfo", "init ctx 0 nvml 0 alloc 1M", &[2], &[0, 1, 3]),
        ("cuMemFree_v2", "init ctx 0 alloc 100M free 1 alloc 100M", &[3], &[0, 1, 2, 4]),
    ];
    for (hook, script, panicked, fine) in cases {
        for route in [Route::Link, Route::Procaddr] {
            let out = sim.client(route).shim().env("GPUSLICE_TEST_PANIC_IN", hook).env("GPUSLICE_MEMORY_LIMIT", "1GiB").args(script).run();
            out.assert_success();
            assert_eq!(
                out.lines.len(),
                script.split_whitespace().filter(|w| w.chars().all(|c| c.is_ascii_lowercase())).count(),
                "{hook} {route}: every command printed:\n{out}"
            );
            for &i in panicked {
                out.expect_err(i, UNKNOWN);
            }
            for &i in fine {
                out.expect_ok(i);
            }
            assert_panic_lines(&out, hook, panicked.len());
        }
    }
    // A free that panicked left the allocation counted (the driver still holds it): 100 MiB
    // and the second 100 MiB, plus the context.
    let out = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_TEST_PANIC_IN", "cuMemFree_v2")
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .args("init ctx 0 alloc 100M free 1 info")
        .run();
    assert_eq!(out.u64("info", "free"), GIB - R - 100 * MIB, "{out}");
}

/// A panic after the quota was reserved and before the driver was called: the call fails, and
/// the reservation is given back, so the whole quota is still there for the next allocation.
#[test]
fn a_panic_after_the_reservation_gives_the_bytes_back() {
    let sim = sim();
    for route in [Route::Link, Route::Dlsym, Route::Procaddr] {
        let out = sim
            .client(route)
            .shim()
            .env("GPUSLICE_TEST_PANIC_IN", "cuMemAlloc:reserved")
            .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
            .args("init ctx 0 alloc 512M alloc 512M info managed 900M")
            .run();
        out.assert_success();
        out.expect_err(2, UNKNOWN);
        out.expect_err(3, UNKNOWN);
        assert_eq!(out.u64("info", "free"), GIB - R, "{route}: nothing kept by the panicked calls:\n{out}");
        out.expect_ok(5);
        assert_panic_lines(&out, "cuMemAlloc", 2);
    }
}

/// The same in a controller's group: the group's figure in the shared ledger is exact after the
/// panics, and another member can use the whole limit.
#[test]
fn a_panic_in_a_group_member_leaves_the_group_figure_exact() {
    let sim = sim();
    let ctl = sim.controller_with_config("[groups.g]\nmemory_limit = \"1GiB\"\n");
    let done = sim.path("done");
    let c = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("g")
        .env("GPUSLICE_TEST_PANIC_IN", "cuMemAlloc:reserved")
        .args(&format!("init ctx 0 alloc 300M alloc 300M waitfile {}", done.display()))
        .spawn();
    c.wait_line("alloc", 1);
    let l = ctl.ls();
    assert_eq!(l.group_used("g", 0), R, "only the context is held:\n{l}");
    let other = sim.client(Route::Link).shim().controller(&ctl).group("g").args(&format!("init ctx 0 alloc {}M", (GIB - 2 * R) / MIB)).run();
    other.assert_all_ok();
    touch(&done);
    let out = c.wait();
    out.assert_success();
    out.expect_err(2, UNKNOWN);
    out.expect_err(3, UNKNOWN);
    assert_panic_lines(&out, "cuMemAlloc", 2);
}

/// With `GPUSLICE_LOG_FILE` the panic's line goes there, and the host's stderr stays clean.
#[test]
fn the_panic_line_goes_to_the_log_file() {
    let sim = sim();
    let log = sim.path("shim.log");
    let out = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_TEST_PANIC_IN", "cuMemAlloc_v2")
        .env("GPUSLICE_LOG_FILE", log.display())
        .args("init ctx 0 alloc 1M info")
        .run();
    out.assert_success();
    out.expect_err(2, UNKNOWN);
    out.expect_ok(3);
    assert!(out.stderr.is_empty(), "nothing on the host's stderr:\n{out}");
    let text = std::fs::read_to_string(&log).expect("the log file");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("internal error in gpuslice's cuMemAlloc_v2 hook")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("GPUSLICE_TEST_PANIC_IN=cuMemAlloc_v2: forced panic at shim/src/sys/guard.rs"), "the message and where: {}", lines[0]);
    assert!(lines[0].contains("returned CUDA_ERROR_UNKNOWN"), "{}", lines[0]);
}
