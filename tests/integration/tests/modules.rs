//! Memory the driver takes outside the allocation calls: module and library loads (measured
//! around the load and charged to the quota), the 32-bit-era entry points (`cuMemAlloc` without
//! `_v2`, ...), `dlvsym` lookups, and the rate-limited refusal log.

use gpuslice_integration::*;

/// Context reserve of the simulated driver in these tests.
const R: u64 = 256 * MIB;
const L: u64 = GIB;

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_CTX_RESERVE", R).env("SIMCUDA_MEM", 4 * GIB)
}

/// What the shim counts for this process on device 0: the quota's total less its free.
fn counted(out: &Output, n: usize) -> u64 {
    out.nth_u64("info", n, "total") - out.nth_u64("info", n, "free")
}

#[test]
fn module_heavy_process_stays_within_its_quota_on_every_route() {
    for route in Route::ALL {
        let sim = sim();
        let out = sim
            .client(route)
            .shim()
            .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
            .args(
                "init ctx 0 modload data 256M info nvmlprocs 0 modload ex 256M modload fatbin 256M info nvmlprocs 0 \
                 modload data 256M alloc 1M modload data 1M info nvmlprocs 0 \
                 free 1 info nvmlprocs 0 alloc 256M info nvmlprocs 0",
            )
            .run();
        let ctx = format!("{route}: {out}");
        for (i, line) in out.lines.iter().enumerate() {
            let refused = line.starts_with("err modload") || line.starts_with("err alloc");
            if refused {
                assert_eq!(out.code(i), 2, "{ctx}");
            } else {
                out.expect_ok(i);
            }
        }
        // The reserve, then one 256 MiB module: the shim's count and the device's agree.
        assert_eq!(counted(&out, 0), R + 256 * MIB, "{ctx}");
        assert_eq!(out.nth_u64("nvmlprocs", 0, "self"), R + 256 * MIB, "{ctx}");
        // Three modules and the reserve fill the quota exactly.
        assert_eq!(counted(&out, 1), L, "{ctx}");
        assert_eq!(out.nth_u64("nvmlprocs", 1, "self"), L, "{ctx}");
        // A fourth module, an allocation and even a 1 MiB module are refused; nothing was left
        // on the device by the refused load.
        let refused: Vec<&String> = out.lines.iter().filter(|l| l.starts_with("err ")).collect();
        assert_eq!(refused.len(), 3, "{ctx}");
        assert_eq!(counted(&out, 2), L, "{ctx}");
        assert_eq!(out.nth_u64("nvmlprocs", 2, "self"), L, "{ctx}");
        // Unloading the first module returns its bytes, and they can be allocated again.
        assert_eq!(counted(&out, 3), L - 256 * MIB, "{ctx}");
        assert_eq!(out.nth_u64("nvmlprocs", 3, "self"), L - 256 * MIB, "{ctx}");
        assert_eq!(counted(&out, 4), L, "{ctx}");
        assert_eq!(out.nth_u64("nvmlprocs", 4, "self"), L, "{ctx}");
        // The first refusal is logged; the next two, within 5 s, are only counted.
        let logged = out.stderr_lines_with(&["refused", "CUDA_ERROR_OUT_OF_MEMORY"]);
        assert_eq!(logged.len(), 1, "{ctx}\n{}", out.stderr);
        assert!(logged[0].contains("cuModuleLoadData refused"), "{ctx}: {}", logged[0]);
    }
}

#[test]
fn loads_measured_while_other_threads_allocate_are_exact() {
    // Four threads load 2 MiB modules while four others allocate and free: each load must be
    // charged its own 2 MiB, never the neighbours' allocations.
    for round in 0..3 {
        let sim = sim();
        let out = sim
            .client(Route::Procaddr)
            .shim()
            .env("GPUSLICE_MEMORY_LIMIT", "2GiB")
            .args("init ctx 0 modthreads 8 25 2M info nvmlprocs 0 freeall info nvmlprocs 0")
            .run();
        out.assert_all_ok();
        assert_eq!(out.get("modthreads", "failures").as_deref(), Some("0"), "{out}");
        let held = out.nth_u64("nvmlprocs", 0, "self");
        assert_eq!(counted(&out, 0), held, "round {round}: the shim's count is the device's: {out}");
        assert_eq!(held - R, 4 * 25 * 2 * MIB + (2..=8).step_by(2).map(|i| i * 65536 + 24 * 4096).sum::<u64>(), "{out}");
        assert_eq!(counted(&out, 1), R, "round {round}: {out}");
        assert_eq!(out.nth_u64("nvmlprocs", 1, "self"), R, "{out}");
    }
}

#[test]
fn library_and_file_loads_are_counted_and_returned() {
    let sim = sim();
    let image = sim.path_str("big.cubin");
    let out = sim
        .client(Route::Procaddr)
        .shim()
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .args(&format!(
            "init ctx 0 image {image} 128M modfile {image} libload 64M libfile {image} info nvmlprocs 0 \
             libload 512M info nvmlprocs 0 free 1 free 2 free 3 info nvmlprocs 0"
        ))
        .run();
    out.expect_ok(0);
    assert_eq!(counted(&out, 0), R + 128 * MIB + 64 * MIB + 128 * MIB, "{out}");
    assert_eq!(out.nth_u64("nvmlprocs", 0, "self"), R + 320 * MIB, "{out}");
    // 576 + 512 MiB > 1 GiB: the library is refused and unloaded again.
    out.expect_err(out.lines.iter().position(|l| l.starts_with("err libload")).expect("refused"), 2);
    assert_eq!(counted(&out, 1), R + 320 * MIB, "{out}");
    assert_eq!(out.nth_u64("nvmlprocs", 1, "self"), R + 320 * MIB, "{out}");
    assert_eq!(counted(&out, 2), R, "{out}");
    assert_eq!(out.nth_u64("nvmlprocs", 2, "self"), R, "{out}");
}

#[test]
fn declared_device_data_is_charged_before_the_driver_places_it() {
    // PTX declaring a __device__ array: the simulated driver takes nothing at load time (as a
    // driver placing data lazily would); the shim charges the declared bytes from the load on,
    // and refuses a load whose declaration does not fit without loading it.
    let sim = sim();
    let out = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .args("init ctx 0 ptxload 256M info nvmlprocs 0 ptxload 700M info nvmlprocs 0 free 1 info")
        .run();
    out.expect_ok(2);
    assert_eq!(counted(&out, 0), R + 256 * MIB, "{out}");
    // Under a limit NVML's process list shows the slice (issue 15): the ledger's figure, which
    // holds the declared bytes although the simulated driver has placed none of them yet.
    assert_eq!(out.nth_u64("nvmlprocs", 0, "self"), R + 256 * MIB, "{out}");
    out.expect_err(5, 2);
    assert!(out.stderr.contains("cuModuleLoadData refused on device 0: request 700.0 MiB"), "{}", out.stderr);
    assert_eq!(counted(&out, 1), R + 256 * MIB, "{out}");
    assert_eq!(counted(&out, 2), R, "{out}");
}

#[test]
fn legacy_entry_points_are_counted_like_v2() {
    for route in Route::ALL {
        let sim = sim();
        let out = sim
            .client(route)
            .shim()
            .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
            .args(
                "init ctx 0 v1alloc 256M v1pitch 1000 1000 4 v1array 1024 1024 v1array3d 64 64 64 \
                 info v1info v1total 0 nvmlprocs 0 v1alloc 512M free 1 info v1info nvmlprocs 0 \
                 v1ctxcreate 0 info v1ctxdestroy ctx 0 info",
            )
            .run();
        let ctx = format!("{route}: {out}");
        let pitch = out.u64("v1pitch", "pitch");
        assert_eq!(pitch, 1024, "{ctx}");
        let held = R + 256 * MIB + pitch * 1000 + MIB + 64 * 64 * 64;
        assert_eq!(counted(&out, 0), held, "{ctx}");
        assert_eq!(out.nth_u64("v1info", 0, "total"), L, "{ctx}");
        assert_eq!(out.nth_u64("v1info", 0, "free"), L - held, "{ctx}");
        assert_eq!(out.u64("v1total", "total"), L, "{ctx}");
        assert_eq!(out.nth_u64("nvmlprocs", 0, "self"), held, "{ctx}");
        // 512 MiB more does not fit in what is left.
        out.expect_err(out.lines.iter().position(|l| l.starts_with("err v1alloc")).expect("refused"), 2);
        // The legacy cuMemFree gives the 256 MiB back.
        assert_eq!(counted(&out, 1), held - 256 * MIB, "{ctx}");
        assert_eq!(out.nth_u64("v1info", 1, "free"), L - held + 256 * MIB, "{ctx}");
        assert_eq!(out.nth_u64("nvmlprocs", 1, "self"), held - 256 * MIB, "{ctx}");
        // A context made with the legacy cuCtxCreate has its reserve counted.
        assert_eq!(counted(&out, 2), held, "{ctx}");
        assert_eq!(counted(&out, 3), held - 256 * MIB, "{ctx}");
    }
}

#[test]
fn a_legacy_pointer_freed_with_the_v2_call_is_returned() {
    // The simulated driver hands out legacy pointers from 0x10000000 up, per process.
    let sim = sim();
    let out =
        sim.client(Route::Link).shim().env("GPUSLICE_MEMORY_LIMIT", "1GiB").args("init ctx 0 v1alloc 100M info freeraw 0x10000000 info nvmlprocs 0").run();
    out.assert_all_ok();
    assert_eq!(out.get("v1alloc", "ptr").as_deref(), Some("0x10000000"), "{out}");
    assert_eq!(counted(&out, 0), R + 100 * MIB, "{out}");
    assert_eq!(counted(&out, 1), R, "{out}");
    assert_eq!(out.u64("nvmlprocs", "self"), R, "{out}");
}

#[test]
fn dlvsym_lookups_get_the_wrappers() {
    let lib = compile(
        &c_compiler(),
        "libversioned.so",
        &["tests/clients/versioned.c"],
        &["-shared", "-fPIC", &format!("-Wl,--version-script={}", workspace_root().join("tests/clients/versioned.map").display())],
        &[workspace_root().join("tests/clients/versioned.map")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sim = sim();
    let lookup = |name: &str, version: &str, shim: bool| {
        sim.client(Route::Dlsym).with_shim(shim).env("CUCLIENT_DLVSYM_LIBRARY", lib.display()).args(&format!("init dlvsym {name} {version}")).run()
    };
    for name in ["cuMemAlloc_v2", "cuModuleLoadData"] {
        let out = lookup(name, "VERSIONED_1", true);
        out.assert_all_ok();
        assert_eq!(out.get("dlvsym", "lib").as_deref(), Some("libgpuslice.so"), "{name}: {out}");
        assert_eq!(out.get("dlvsym", "same").as_deref(), Some("1"), "dlsym and dlvsym agree on {name}: {out}");
        let bare = lookup(name, "VERSIONED_1", false);
        assert_eq!(bare.get("dlvsym", "lib").as_deref(), Some("libversioned.so"), "{name}: {bare}");
        // A version the library does not define finds nothing, with or without the shim.
        let missing = lookup(name, "NO_SUCH_VERSION", true);
        assert_eq!(missing.code(1), -1, "{name}: {missing}");
    }
    // A function the shim does not interpose comes back as the library's own.
    let out = lookup("cuCtxSynchronize", "VERSIONED_1", true);
    assert_eq!(out.get("dlvsym", "lib").as_deref(), Some("libversioned.so"), "{out}");
}

#[test]
fn a_retrying_program_logs_one_refusal_then_summaries() {
    let sim = sim();
    let out = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_MEMORY_LIMIT", "512MiB")
        .env("GPUSLICE_REFUSAL_LOG_INTERVAL_MS", 250)
        .args("init ctx 0 allocwait 300M 1 1000")
        .run();
    let tries = out.u64("allocwait", "tries");
    assert!(tries > 50, "{out}");
    let lines = out.stderr_lines_with(&["cuMemAlloc refused", "CUDA_ERROR_OUT_OF_MEMORY"]);
    assert!(!lines[0].contains("not logged"), "the first refusal is logged as it is: {}", lines[0]);
    let summaries: Vec<u64> = lines[1..]
        .iter()
        .map(|l| {
            let before = l.split(" more refusals in the last").next().expect("a summary");
            before.rsplit('(').next().unwrap().trim().parse::<u64>().unwrap_or_else(|_| panic!("count in {l}"))
        })
        .collect();
    // About a second at one line per 250 ms: the first, then 3 or 4 summaries (scheduling may
    // stretch the run, never shrink the interval).
    assert!((2..=6).contains(&lines.len()), "{} lines for {tries} refusals:\n{}", lines.len(), out.stderr);
    // Every refusal is either logged or counted in a later line, but the ones after the last line.
    let accounted = lines.len() as u64 + summaries.iter().sum::<u64>();
    assert!(accounted <= tries && accounted > tries / 2, "{accounted} of {tries}\n{}", out.stderr);
    // The debug level still has every one.
    let all = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_MEMORY_LIMIT", "512MiB")
        .env("GPUSLICE_LOG", "debug")
        .args("init ctx 0 alloc 300M alloc 300M alloc 300M alloc 300M") // 256 MiB reserve + 300 > 512: all four refused
        .run();
    assert_eq!(all.stderr_lines_with(&["WARN", "cuMemAlloc refused"]).len(), 1, "{}", all.stderr);
    assert_eq!(all.stderr_lines_with(&["DEBUG", "cuMemAlloc refused"]).len(), 3, "{}", all.stderr);
}
