//! The shim's memory quotas, in real processes against the simulated driver, through every route
//! by which programs reach the driver.

use gpuslice_integration::*;

/// Context reserve of the simulated driver in these tests.
const R: u64 = 256 * MIB;
/// The usual limit.
const L: u64 = GIB;

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_CTX_RESERVE", R)
}

/// Run `script` with the shim under the given environment.
fn run_with(route: Route, env: &[(&str, &str)], script: &str) -> Output {
    let sim = sim();
    let mut c = sim.client(route).shim();
    for (k, v) in env {
        c = c.env(k, v);
    }
    c.args(script).run()
}

/// (total reported by cuMemGetInfo, cuDeviceTotalMem) for devices 0 and 1 under `env`.
fn totals(route: Route, env: &[(&str, &str)]) -> [(u64, u64); 2] {
    let out = run_with(route, env, "init ctx 0 info totalmem 0 ctx 1 info totalmem 1");
    out.assert_all_ok();
    [(out.nth_u64("info", 0, "total"), out.nth_u64("totalmem", 0, "total")), (out.nth_u64("info", 1, "total"), out.nth_u64("totalmem", 1, "total"))]
}

fn limit0(env: &[(&str, &str)]) -> u64 {
    let t = totals(Route::Dlsym, env);
    assert_eq!(t[0].0, t[0].1, "cuMemGetInfo and cuDeviceTotalMem disagree under {env:?}");
    t[0].0
}

// ------------------------------------------------------------------------------------ settings

#[test]
fn limit_spellings() {
    let cases: &[(&str, u64)] = &[
        ("4GiB", 4 * GIB),
        ("512MiB", 512 * MIB),
        ("4096M", 4 * GIB),
        ("4g", 4 * GIB),
        ("4G", 4 * GIB),
        ("4gb", 4 * GIB),
        ("4GIB", 4 * GIB),
        ("4096MB", 4 * GIB),
        ("4194304K", 4 * GIB),
        ("4194304kib", 4 * GIB),
        ("1073741824", GIB),
        ("1.5GiB", 3 * GIB / 2),
        ("0.5g", 512 * MIB),
    ];
    for (v, want) in cases {
        assert_eq!(limit0(&[("GPUSLICE_MEMORY_LIMIT", v)]), *want, "GPUSLICE_MEMORY_LIMIT={v}");
    }
    assert_eq!(limit0(&[("CUDA_DEVICE_MEMORY_LIMIT", "4g")]), 4 * GIB, "HAMi spelling");
}

#[test]
fn per_device_limits_and_precedence() {
    let t = totals(Route::Link, &[("GPUSLICE_MEMORY_LIMIT", "1GiB"), ("GPUSLICE_MEMORY_LIMIT_1", "2GiB")]);
    assert_eq!(t, [(GIB, GIB), (2 * GIB, 2 * GIB)]);

    let t = totals(Route::Link, &[("CUDA_DEVICE_MEMORY_LIMIT", "3g"), ("CUDA_DEVICE_MEMORY_LIMIT_1", "2g")]);
    assert_eq!(t, [(3 * GIB, 3 * GIB), (2 * GIB, 2 * GIB)]);

    // GPUSLICE_* wins over CUDA_*
    let t = totals(Route::Link, &[("GPUSLICE_MEMORY_LIMIT", "1g"), ("CUDA_DEVICE_MEMORY_LIMIT", "3g")]);
    assert_eq!(t[0].0, GIB);
    assert_eq!(t[1].0, GIB);
    let t = totals(Route::Link, &[("GPUSLICE_MEMORY_LIMIT_1", "1g"), ("CUDA_DEVICE_MEMORY_LIMIT_1", "3g")]);
    assert_eq!(t[1].0, GIB);

    // A per-device limit beats a global one, whatever the spelling (the shim's documented order:
    // GPUSLICE_MEMORY_LIMIT_n > CUDA_DEVICE_MEMORY_LIMIT_n > GPUSLICE_MEMORY_LIMIT > CUDA_DEVICE_MEMORY_LIMIT).
    let t = totals(Route::Link, &[("GPUSLICE_MEMORY_LIMIT", "1g"), ("CUDA_DEVICE_MEMORY_LIMIT_1", "3g")]);
    assert_eq!(t[0].0, GIB);
    assert_eq!(t[1].0, 3 * GIB);

    // No limit on a device without one: the real total.
    let t = totals(Route::Link, &[("GPUSLICE_MEMORY_LIMIT_1", "1g")]);
    assert_eq!(t[0].0, 16 * GIB);
    assert_eq!(t[1].0, GIB);
}

#[test]
fn config_file_and_environment_precedence() {
    let sim = sim();
    let cfg = sim.write_file("gpuslice.toml", "[defaults]\nmemory_limit = \"1GiB\"\n\n[defaults.devices.1]\nmemory_limit = \"2GiB\"\n");
    let cfg = cfg.to_str().unwrap();
    let t = totals(Route::Procaddr, &[("GPUSLICE_CONFIG", cfg)]);
    assert_eq!(t, [(GIB, GIB), (2 * GIB, 2 * GIB)]);

    // the environment wins over the file
    let t = totals(Route::Procaddr, &[("GPUSLICE_CONFIG", cfg), ("GPUSLICE_MEMORY_LIMIT_1", "3GiB")]);
    assert_eq!(t, [(GIB, GIB), (3 * GIB, 3 * GIB)]);
    let t = totals(Route::Procaddr, &[("GPUSLICE_CONFIG", cfg), ("GPUSLICE_MEMORY_LIMIT", "3GiB")]);
    assert_eq!(t[0].0, 3 * GIB);
    let t = totals(Route::Procaddr, &[("GPUSLICE_CONFIG", cfg), ("CUDA_DEVICE_MEMORY_LIMIT", "512m")]);
    assert_eq!(t[0].0, 512 * MIB);
}

/// A bad setting: `init` fails with CUDA_ERROR_INVALID_VALUE, one clear line on stderr, and no
/// allocation succeeds afterwards.
fn assert_refused(route: Route, env: &[(&str, &str)], var: &str, shown: &str) {
    let out = run_with(route, env, "init ctx 0 alloc 1M");
    out.assert_success();
    out.expect_err(0, CUDA_ERROR_INVALID_VALUE);
    assert!(!out.ok(2), "{route}: allocation after a bad setting must fail:\n{out}");
    let lines = out.stderr_lines_with(&["gpuslice", var, shown]);
    assert_eq!(lines.len(), 1, "{route}: one stderr line naming gpuslice, {var} and {shown:?}:\n{out}");
}

#[test]
fn bad_values_are_refused() {
    let bad = ["4 GB x", "-1", "lots", "0", "4XB", "1.5.2G"];
    for v in bad {
        for route in [Route::Link, Route::Procaddr] {
            assert_refused(route, &[("GPUSLICE_MEMORY_LIMIT", v)], "GPUSLICE_MEMORY_LIMIT", v);
        }
    }
    for route in Route::ALL {
        assert_refused(route, &[("GPUSLICE_MEMORY_LIMIT_1", "lots")], "GPUSLICE_MEMORY_LIMIT_1", "lots");
        assert_refused(route, &[("CUDA_DEVICE_MEMORY_LIMIT", "-1")], "CUDA_DEVICE_MEMORY_LIMIT", "-1");
    }
}

#[test]
fn bad_config_files_are_refused() {
    let sim = sim();
    let broken = sim.write_file("broken.toml", "[defaults\nmemory_limit = \"1GiB\"\n");
    let bad_size = sim.write_file("badsize.toml", "[defaults]\nmemory_limit = \"lots\"\n");
    let missing = sim.path("missing.toml");
    for path in [&broken, &bad_size, &missing] {
        let p = path.to_str().unwrap();
        for route in [Route::Dlsym, Route::ProcaddrPtsz] {
            let out = run_with(route, &[("GPUSLICE_CONFIG", p)], "init ctx 0 alloc 1M");
            out.expect_err(0, CUDA_ERROR_INVALID_VALUE);
            assert!(!out.ok(2), "{out}");
            let lines = out.stderr_lines_with(&["gpuslice", p]);
            assert_eq!(lines.len(), 1, "one stderr line naming gpuslice and the file:\n{out}");
        }
    }
    let out = run_with(Route::Link, &[("GPUSLICE_CONFIG", bad_size.to_str().unwrap())], "init");
    assert_eq!(out.stderr_lines_with(&["gpuslice", "lots"]).len(), 1, "the bad value is shown:\n{out}");
}

// ------------------------------------------------------------------------------------ enforcement

#[test]
fn the_context_reserve_counts() {
    for route in Route::ALL {
        let at = L - R;
        let out = run_with(route, &[("GPUSLICE_MEMORY_LIMIT", "1GiB")], &format!("init ctx 0 info alloc {at} alloc 1 info free 1 alloc 1M info"));
        out.assert_success();
        assert_eq!(out.nth_u64("info", 0, "total"), L, "{out}");
        assert_eq!(out.nth_u64("info", 0, "free"), L - R, "{route}: the context reserve is used:\n{out}");
        out.expect_ok(3);
        out.expect_err(4, CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(out.nth_u64("info", 1, "free"), 0, "{out}");
        out.expect_ok(6);
        out.expect_ok(7);
        assert_eq!(out.nth_u64("info", 2, "free"), L - R - MIB, "{out}");
        let warn = out.stderr_lines_with(&["pid", "used", "limit"]);
        assert_eq!(warn.len(), 1, "{route}: one warning per refusal:\n{out}");

        let out = run_with(route, &[("GPUSLICE_MEMORY_LIMIT", "1GiB")], &format!("init ctx 0 alloc {} alloc {at}", at + 1));
        out.expect_err(2, CUDA_ERROR_OUT_OF_MEMORY);
        out.expect_ok(3);
        assert_eq!(out.stderr_lines_with(&["pid", "used", "limit"]).len(), 1, "{out}");
    }
}

#[test]
fn every_allocation_path_counts() {
    // (allocating command, bytes it costs, an allocation of the same kind beyond the limit)
    let cases: &[(&str, u64, &str)] = &[
        ("alloc 64M", 64 * MIB, "alloc 1G"),
        ("pitch 1000 1000 4", 1024 * 1000, "pitch 65536 16384 4"),
        ("managed 64M", 64 * MIB, "managed 1G"),
        ("async 64M", 64 * MIB, "async 1G"),
        ("pool 64M", 64 * MIB, "pool 1G"),
        ("vmm 64M", 64 * MIB, "vmm 1G"),
        ("vmmmap 64M", 64 * MIB, "vmmmap 1G"),
        ("array 1000 1000", 1_000_000, "array 32768 32768"),
        ("array3d 100 100 100", 1_000_000, "array3d 1024 1024 1024"),
        ("mipmap 1024 1024 3", (1 << 20) + (1 << 18) + (1 << 16), "mipmap 32768 32768 2"),
    ];
    for route in Route::ALL {
        for (cmd, bytes, big) in cases {
            let out = run_with(route, &[("GPUSLICE_MEMORY_LIMIT", "1GiB")], &format!("init ctx 0 info {cmd} info {big} info free 1 info"));
            out.assert_success();
            out.expect_ok(3);
            let f = |n| out.nth_u64("info", n, "free");
            assert_eq!(f(0), L - R, "{route} {cmd}:\n{out}");
            assert_eq!(f(0) - f(1), *bytes, "{route}: `{cmd}` is counted:\n{out}");
            out.expect_err(5, CUDA_ERROR_OUT_OF_MEMORY);
            assert_eq!(f(2), f(1), "{route}: a refused `{big}` costs nothing:\n{out}");
            out.expect_ok(7);
            assert_eq!(f(3), L - R, "{route}: freeing `{cmd}` gives it back:\n{out}");
        }
    }
}

#[test]
fn driver_errors_pass_through_and_count_nothing() {
    for route in Route::ALL {
        let out = run_with(
            route,
            &[("GPUSLICE_MEMORY_LIMIT", "1GiB")],
            &format!("init ctx 0 info alloc 0 info freeraw 0x7777000 info alloc 1M free 1 free 1 info alloc {} alloc 1", L - R),
        );
        out.assert_success();
        out.expect_err(3, CUDA_ERROR_INVALID_VALUE); // the driver's own answer to size 0
        out.expect_err(5, CUDA_ERROR_INVALID_VALUE); // unknown pointer
        out.expect_ok(8);
        out.expect_err(9, CUDA_ERROR_INVALID_VALUE); // double free
        for n in 0..4 {
            assert_eq!(out.nth_u64("info", n, "free"), L - R, "{route}: info #{n}:\n{out}");
        }
        out.expect_ok(11); // counted once: exactly the limit is still available
        out.expect_err(12, CUDA_ERROR_OUT_OF_MEMORY);
    }
}

#[test]
fn totalmem_and_nvml_report_the_quota() {
    for route in Route::ALL {
        let out = run_with(route, &[("GPUSLICE_MEMORY_LIMIT", "1GiB")], "init ctx 0 alloc 100M totalmem 0 nvml 0 info");
        out.assert_all_ok();
        let used = R + 100 * MIB;
        assert_eq!(out.u64("totalmem", "total"), L);
        assert_eq!(out.u64("nvml", "total"), L, "{out}");
        assert_eq!(out.u64("nvml", "used"), used, "{out}");
        assert_eq!(out.u64("nvml", "free"), L - used, "{out}");
        assert_eq!(out.u64("nvml", "v2total"), L, "{out}");
        assert_eq!(out.u64("nvml", "v2used"), used, "{out}");
        assert_eq!(out.u64("nvml", "v2free"), L - used, "{out}");
        assert_eq!(out.u64("info", "free"), L - used);
    }
}

#[test]
fn nvml_free_is_bounded_by_the_real_device() {
    // A 2 GiB device; a neighbour without a quota holds 1.5 GiB of it.
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", R).env("SIMCUDA_MEM", 2 * GIB);
    let hog = sim.client(Route::Link).args("init ctx 0 alloc 1280M sleep 20000").spawn();
    let ready = poll_until(std::time::Duration::from_secs(10), || {
        let o = sim.client(Route::Link).args("nvml 0").run();
        o.get("nvml", "used").and_then(|v| v.parse::<u64>().ok()) == Some(R + 1280 * MIB)
    });
    let mut hog = hog;
    assert!(ready, "the neighbour allocated");
    let out = sim.client(Route::Dlsym).shim().env("GPUSLICE_MEMORY_LIMIT", "1GiB").args("init ctx 0 nvml 0").run();
    hog.kill();
    hog.wait();
    out.assert_all_ok();
    assert_eq!(out.u64("nvml", "total"), L, "{out}");
    assert_eq!(out.u64("nvml", "used"), R, "{out}");
    // real free: 2048 - 1536 (neighbour) - 256 (our context) = 256 MiB < limit - used = 768 MiB
    assert_eq!(out.u64("nvml", "free"), 256 * MIB, "{out}");
}

#[test]
fn threads_race_for_the_quota_without_losing_bytes() {
    for route in Route::ALL {
        let out = run_with(route, &[("GPUSLICE_MEMORY_LIMIT", "1GiB")], "init ctx 0 threads 8 500 1M info");
        out.assert_all_ok();
        assert_eq!(out.u64("threads", "failures"), 0, "{out}");
        assert_eq!(out.u64("info", "free"), L - R - 8 * MIB, "{route}: exactly 8 MiB + reserve used:\n{out}");
    }
}

#[test]
fn two_processes_have_separate_quotas() {
    let sim = sim();
    let script = format!("init ctx 0 alloc {} alloc 1 info", L - R);
    let a = sim.client(Route::Link).shim().env("GPUSLICE_MEMORY_LIMIT", "1GiB").args(&script).spawn();
    let b = sim.client(Route::Procaddr).shim().env("GPUSLICE_MEMORY_LIMIT", "1GiB").args(&script).spawn();
    for out in [a.wait(), b.wait()] {
        out.expect_ok(2);
        out.expect_err(3, CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(out.u64("info", "free"), 0, "{out}");
    }
}

// ------------------------------------------------------------------------------------ transparency

/// A script touching every command whose output does not depend on timing.
const EVERYTHING: &str = "init version count ctx 0 info alloc 1M pitch 1000 10 4 managed 1M async 1M pool 1M \
    vmm 4M vmmmap 4M array 100 100 array3d 10 10 10 mipmap 64 64 3 info nvml 0 nvmlprocs 0 totalmem 0 \
    totalmem 1 uuid 0 free 1 free 1 freeraw 0x10 alloc 0 pitch 100 10 3 vmm 3M freeall info \
    launch 3 1000 launchex 2 1000 sync events 2 1000 graph 2 1000 2 procaddr cuMemAlloc 13000 0 \
    procaddr cuNoSuchFunction 13000 0 ctxcreate 1 info threads 4 50 1M info fill 1G info ctxdestroy \
    ctx 1 info ctxrelease 1 ctx 0 info";

#[test]
fn without_a_limit_the_shim_changes_nothing() {
    for route in Route::ALL {
        // One simulated machine for both runs, so that device identities (UUIDs) match; each
        // process's memory goes back to the device when it exits.
        let sim = Sim::new();
        let bare = sim.client(route).args(EVERYTHING).run();
        let shim = sim.client(route).shim().args(EVERYTHING).run();
        bare.assert_success();
        shim.assert_success();
        assert_eq!(bare.normalized(), shim.normalized(), "{route}: with and without the shim:\n{bare}\n{shim}");
    }
}

#[test]
fn all_routes_behave_the_same_under_a_limit() {
    let script = format!(
        "init ctx 0 info alloc 100M fill 64M info free 1 info alloc 1G totalmem 0 nvml 0 freeall info \
         pitch 1000 1000 4 managed 64M async 64M pool 64M vmm 64M array 1000 1000 array3d 100 100 100 \
         mipmap 1024 1024 3 info fill 1M info freeall info alloc {} alloc 1",
        L - R
    );
    let outs: Vec<Output> = Route::ALL.iter().map(|r| run_with(*r, &[("GPUSLICE_MEMORY_LIMIT", "1GiB")], &script)).collect();
    // everything but the first line (`ok init route=...`) must be identical
    let first = outs[0].normalized()[1..].to_vec();
    for o in &outs {
        o.assert_success();
        assert_eq!(o.normalized()[1..], first[..], "routes differ:\n{}\n{o}", outs[0]);
    }
    // and the numbers are the quota's
    let o = &outs[0];
    assert_eq!(o.nth_u64("info", 0, "free"), L - R);
    assert_eq!(o.u64("fill", "count"), (L - R - 100 * MIB) / (64 * MIB));
    assert_eq!(o.u64("totalmem", "total"), L);
    assert_eq!(o.last("alloc").split_whitespace().next(), Some("err"));
}
