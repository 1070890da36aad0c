//! The simulated driver on its own (no shim): the test double must behave like the driver the
//! shim is written against, or the shim's tests prove nothing.

use std::time::Duration;

use gpuslice_integration::*;

const R: u64 = 300 * MIB; // SIMCUDA_CTX_RESERVE default
const TOTAL: u64 = 16 * GIB; // SIMCUDA_MEM default

#[test]
fn every_route_allocates_and_frees_with_accounting() {
    for route in Route::ALL {
        let sim = Sim::new();
        let out = sim.client(route).args("init version count ctx 0 info alloc 1G info nvml 0 free 1 info nvml 0 totalmem 0").run();
        out.assert_all_ok();
        assert_eq!(
            out.get("init", "route").as_deref(),
            Some(match route {
                Route::Link => "link",
                Route::Dlsym => "dlsym",
                Route::Procaddr => "procaddr",
                Route::ProcaddrPtsz => "procaddr-ptsz",
            })
        );
        assert_eq!(out.u64("version", "version"), 13000);
        assert_eq!(out.u64("count", "count"), 2);
        assert_eq!(out.nth_u64("info", 0, "total"), TOTAL);
        assert_eq!(out.nth_u64("info", 0, "free"), TOTAL - R, "context reserve is charged:\n{out}");
        assert_eq!(out.nth_u64("info", 1, "free"), TOTAL - R - GIB, "{out}");
        assert_eq!(out.nth_u64("info", 2, "free"), TOTAL - R, "{out}");
        assert_eq!(out.nth_u64("nvml", 0, "used"), R + GIB, "{out}");
        assert_eq!(out.nth_u64("nvml", 0, "total"), TOTAL);
        assert_eq!(out.nth_u64("nvml", 0, "free"), TOTAL - R - GIB);
        assert_eq!(out.nth_u64("nvml", 0, "v2used"), R + GIB);
        assert_eq!(out.nth_u64("nvml", 0, "v2free"), TOTAL - R - GIB);
        assert_eq!(out.nth_u64("nvml", 1, "used"), R);
        assert_eq!(out.u64("totalmem", "total"), TOTAL);
    }
}

#[test]
fn environment_configures_the_device() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 3).env("SIMCUDA_MEM", 4 * GIB).env("SIMCUDA_CTX_RESERVE", 0);
    let out = sim.client(Route::Dlsym).args("init count ctx 2 info ctx 3 totalmem 1").run();
    assert_eq!(out.u64("count", "count"), 3);
    out.expect_ok(2);
    assert_eq!(out.u64("info", "free"), 4 * GIB);
    assert_eq!(out.u64("info", "total"), 4 * GIB);
    out.expect_err(4, 101); // CUDA_ERROR_INVALID_DEVICE
    assert_eq!(out.u64("totalmem", "total"), 4 * GIB);
}

#[test]
fn error_codes_of_the_driver() {
    let sim = Sim::new().env("SIMCUDA_MEM", GIB).env("SIMCUDA_CTX_RESERVE", 0);
    let out = sim.client(Route::Link).args("ctx 0 init alloc 1M ctx 0 alloc 0 alloc 1G alloc 1 freeraw 0x1234 free 1 free 1 freeraw 0 alloc 2G info").run();
    out.assert_success();
    out.expect_err(0, 3); // CUDA_ERROR_NOT_INITIALIZED before cuInit
    out.expect_ok(1);
    out.expect_err(2, 201); // CUDA_ERROR_INVALID_CONTEXT without a context
    out.expect_ok(3);
    out.expect_err(4, 1); // size 0: CUDA_ERROR_INVALID_VALUE
    out.expect_ok(5); // the whole device
    out.expect_err(6, 2); // CUDA_ERROR_OUT_OF_MEMORY
    out.expect_err(7, 1); // unknown pointer
    out.expect_ok(8);
    out.expect_err(9, 1); // double free
    out.expect_ok(10); // cuMemFree(0)
    out.expect_err(11, 2);
    assert_eq!(out.u64("info", "free"), GIB);
}

#[test]
fn every_allocation_kind_is_charged_and_returned() {
    // (command, bytes the driver charges)
    let cases: &[(&str, u64)] = &[
        ("alloc 64M", 64 * MIB),
        ("pitch 1000 1000 4", 1024 * 1000),
        ("managed 64M", 64 * MIB),
        ("async 64M", 64 * MIB),
        ("pool 64M", 64 * MIB),
        ("vmm 64M", 64 * MIB),
        ("vmmmap 64M", 64 * MIB),
        ("array 1000 1000", 1_000_000),
        ("array3d 100 100 100", 1_000_000),
        ("mipmap 1024 1024 3", (1 << 20) + (1 << 18) + (1 << 16)),
    ];
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", 0);
    for (cmd, bytes) in cases {
        let out = sim.client(Route::Dlsym).args(&format!("init ctx 0 info {cmd} info free 1 info free 1")).run();
        out.assert_success();
        out.expect_ok(3);
        let f = |n| out.nth_u64("info", n, "free");
        assert_eq!(f(0) - f(1), *bytes, "{cmd} charged:\n{out}");
        assert_eq!(f(2), f(0), "{cmd} returned:\n{out}");
        out.expect_ok(5);
        assert!(!out.ok(7), "second free of {cmd} must fail:\n{out}");
    }
    let out = sim.client(Route::Link).args("init ctx 0 pitch 100 10 3 vmm 3M").run();
    out.expect_err(2, 1); // element size must be 4, 8 or 16
    out.expect_err(3, 1); // not a multiple of the granularity
}

#[test]
fn contexts_own_their_memory() {
    let sim = Sim::new();
    let out = sim.client(Route::Procaddr).args("init ctxcreate 0 info alloc 1G info ctxdestroy ctx 0 info ctxrelease 0 ctx 0 info").run();
    out.assert_all_ok();
    assert_eq!(out.nth_u64("info", 0, "free"), TOTAL - R);
    assert_eq!(out.nth_u64("info", 1, "free"), TOTAL - R - GIB);
    // destroying the created context returned its reserve and its allocation; the primary one costs R
    assert_eq!(out.nth_u64("info", 2, "free"), TOTAL - R);
    assert_eq!(out.nth_u64("info", 3, "free"), TOTAL - R);
}

#[test]
fn process_exit_and_death_return_memory() {
    let sim = Sim::new();
    sim.client(Route::Link).args("init ctx 0 alloc 2G").run().assert_all_ok();
    let out = sim.client(Route::Link).args("init ctx 0 info").run();
    assert_eq!(out.u64("info", "free"), TOTAL - R, "exit returns memory:\n{out}");

    let mut hog = sim.client(Route::Dlsym).args("init ctx 0 alloc 2G sleep 20000").spawn();
    let seen = poll_until(Duration::from_secs(10), || {
        let o = sim.client(Route::Dlsym).args("nvml 0").run();
        o.get("nvml", "used").and_then(|u| u.parse::<u64>().ok()) == Some(R + 2 * GIB)
    });
    assert!(seen, "the other process's allocation shows in NVML");
    let out = sim.client(Route::Dlsym).args("nvmlprocs 0").run();
    assert_eq!(out.u64("nvmlprocs", "count"), 1, "{out}");
    hog.kill();
    hog.wait();
    let out = sim.client(Route::Dlsym).args("nvml 0 nvmlprocs 0").run();
    assert_eq!(out.u64("nvml", "used"), 0, "a killed process's memory is reclaimed:\n{out}");
    assert_eq!(out.u64("nvmlprocs", "count"), 0);
}

#[test]
fn nvml_lists_processes_and_matches_cuda_uuids() {
    let sim = Sim::new();
    let out = sim.client(Route::Procaddr).args("init ctx 0 alloc 100M nvmlprocs 0 nvmlprocs 1 uuid 0 uuid 1").run();
    out.assert_all_ok();
    assert_eq!(out.nth_u64("nvmlprocs", 0, "count"), 1);
    assert_eq!(out.nth_u64("nvmlprocs", 0, "self"), R + 100 * MIB);
    assert_eq!(out.nth_u64("nvmlprocs", 1, "count"), 0);
    for n in 0..2 {
        let l = out.nth("uuid", n);
        let cu = kv(l, "cu").unwrap();
        assert_eq!(Some(cu), kv(l, "nvml"), "{l}");
        assert_eq!(cu.len(), "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".len());
        assert_eq!(kv(l, "index"), Some(n.to_string().as_str()), "nvmlDeviceGetHandleByUUID finds device {n}");
    }
    assert_ne!(kv(out.nth("uuid", 0), "cu"), kv(out.nth("uuid", 1), "cu"));
}

#[test]
fn get_proc_address_agrees_with_dlsym() {
    // (base name, cudaVersion, flags, the export it must resolve to)
    let cases: &[(&str, u32, u32, &str)] = &[
        ("cuMemAlloc", 13000, 0, "cuMemAlloc_v2"),
        ("cuMemFree", 13000, 0, "cuMemFree_v2"),
        ("cuMemGetInfo", 12000, 0, "cuMemGetInfo_v2"),
        ("cuMemAllocPitch", 13000, 0, "cuMemAllocPitch_v2"),
        ("cuDeviceTotalMem", 13000, 0, "cuDeviceTotalMem_v2"),
        ("cuCtxDestroy", 13000, 0, "cuCtxDestroy_v2"),
        ("cuDevicePrimaryCtxRelease", 13000, 0, "cuDevicePrimaryCtxRelease_v2"),
        ("cuDeviceGetUuid", 13000, 0, "cuDeviceGetUuid_v2"),
        ("cuDeviceGetUuid", 11000, 0, "cuDeviceGetUuid"),
        ("cuCtxCreate", 13000, 0, "cuCtxCreate_v4"),
        ("cuCtxCreate", 12080, 0, "cuCtxCreate_v2"),
        ("cuGetProcAddress", 12000, 0, "cuGetProcAddress_v2"),
        ("cuGetProcAddress", 11030, 0, "cuGetProcAddress"),
        ("cuEventElapsedTime", 13000, 0, "cuEventElapsedTime_v2"),
        ("cuEventElapsedTime", 12000, 0, "cuEventElapsedTime"),
        ("cuGraphInstantiate", 13000, 0, "cuGraphInstantiateWithFlags"),
        ("cuLaunchKernel", 13000, 0, "cuLaunchKernel"),
        ("cuLaunchKernel", 13000, 2, "cuLaunchKernel_ptsz"),
        ("cuLaunchKernelEx", 13000, 2, "cuLaunchKernelEx_ptsz"),
        ("cuGraphLaunch", 13000, 2, "cuGraphLaunch_ptsz"),
        ("cuStreamBeginCapture", 13000, 2, "cuStreamBeginCapture_v2_ptsz"),
        ("cuEventRecord", 13000, 2, "cuEventRecord_ptsz"),
        ("cuMemAllocAsync", 13000, 0, "cuMemAllocAsync"),
        ("cuMemAllocAsync", 13000, 2, "cuMemAllocAsync_ptsz"),
        ("cuMemFreeAsync", 13000, 2, "cuMemFreeAsync_ptsz"),
        ("cuMemAllocFromPoolAsync", 13000, 2, "cuMemAllocFromPoolAsync_ptsz"),
        ("cuMemAlloc", 13000, 2, "cuMemAlloc_v2"),
    ];
    let mut script = String::new();
    for (name, v, f, exp) in cases {
        script += &format!(" procaddr {name} {v} {f} dlsym {exp}");
    }
    script += " procaddr cuNoSuchFunction 13000 0 procaddr cuMemAllocAsync 11000 0 dlsym cuNoSuchFunction dlsym cuMemAlloc_ptsa";
    for route in Route::ALL {
        let sim = Sim::new();
        let out = sim.client(route).args(&script).run();
        out.assert_success();
        for (i, (name, v, f, exp)) in cases.iter().enumerate() {
            let p = out.expect_ok(2 * i);
            let d = out.expect_ok(2 * i + 1);
            assert_eq!(kv(p, "status"), Some("0"));
            assert_eq!(kv(p, "ptr"), kv(d, "ptr"), "{route}: {name} {v} flags {f} must be {exp}:\n{out}");
        }
        let n = 2 * cases.len();
        assert_eq!(kv(out.expect_err(n, 500), "status"), Some("1"), "unknown symbol: SYMBOL_NOT_FOUND");
        assert_eq!(kv(out.expect_err(n + 1, 500), "status"), Some("2"), "too old: VERSION_NOT_SUFFICIENT");
        out.expect_err(n + 2, -1);
        out.expect_err(n + 3, -1);
    }
}

#[test]
fn kernels_run_on_a_timeline() {
    for route in [Route::Link, Route::ProcaddrPtsz] {
        let sim = Sim::new();
        let out = sim.client(route).args("init ctx 0 mark launch 10 2000000 elapsed sync elapsed events 5 1000000 graph 3 1000000 4").run();
        out.assert_all_ok();
        let queued = out.nth("elapsed", 0);
        let done = out.nth("elapsed", 1);
        let ms = |l: &str| kv(l, "ms").unwrap().parse::<f64>().unwrap();
        assert!(ms(queued) < 15.0, "launches are asynchronous:\n{out}");
        assert!((19.9..40.0).contains(&ms(done)), "10 x 2 ms after sync:\n{out}");
        let ev: f64 = out.get("events", "ms").unwrap().parse().unwrap();
        assert!((4.99..8.0).contains(&ev), "events time 5 x 1 ms:\n{out}");
        let g: f64 = out.get("graph", "ms").unwrap().parse().unwrap();
        assert!((11.9..30.0).contains(&g), "a graph of 3 x 1 ms launched 4 times:\n{out}");
    }
}

#[test]
fn a_full_stream_blocks_the_launching_thread() {
    let sim = Sim::new();
    // 20 x 20 ms = 400 ms of work; a launch waits while more than 200 ms are queued on its stream.
    let out = sim.client(Route::Dlsym).args("init ctx 0 mark launch 20 20000000 elapsed sync elapsed").run();
    out.assert_all_ok();
    let queued = out.line_f64(4, "ms");
    let done = out.line_f64(6, "ms");
    assert!((150.0..300.0).contains(&queued), "{out}");
    assert!((399.0..500.0).contains(&done), "{out}");
}

#[test]
fn kernels_of_two_processes_serialize_on_the_device() {
    let sim = Sim::new();
    let script = "init ctx 0 mark launch 10 20000000 sync elapsed";
    let a = sim.client(Route::Link).args(script).spawn();
    let b = sim.client(Route::Procaddr).args(script).spawn();
    let (a, b) = (a.wait(), b.wait());
    a.assert_all_ok();
    b.assert_all_ok();
    let (ta, tb) = (a.line_f64(5, "ms"), b.line_f64(5, "ms"));
    // Alone each takes 200 ms; sharing the device, the later one ends after both ran: ~400 ms
    // after the first started (less the skew of the two starts).
    assert!(ta.max(tb) > 300.0, "kernels of two processes overlapped: {ta} ms, {tb} ms\n{a}\n{b}");
    assert!(ta.min(tb) >= 199.0, "{a}\n{b}");
}

#[test]
fn threads_allocate_concurrently() {
    let sim = Sim::new();
    let out = sim.client(Route::ProcaddrPtsz).args("init ctx 0 threads 8 500 1M info nvml 0").run();
    out.assert_all_ok();
    assert_eq!(out.u64("threads", "failures"), 0);
    assert_eq!(out.u64("info", "free"), TOTAL - R - 8 * MIB);
    assert_eq!(out.u64("nvml", "used"), R + 8 * MIB);
}

#[test]
fn fill_stops_at_the_device_size() {
    let sim = Sim::new().env("SIMCUDA_MEM", 4 * GIB).env("SIMCUDA_CTX_RESERVE", 256 * MIB);
    let out = sim.client(Route::Link).args("init ctx 0 fill 256M info freeall info").run();
    out.assert_all_ok();
    assert_eq!(out.u64("fill", "count"), 15);
    assert_eq!(out.u64("fill", "err"), 2);
    assert_eq!(out.nth_u64("info", 0, "free"), 0);
    assert_eq!(out.nth_u64("info", 1, "free"), 4 * GIB - 256 * MIB);
}

#[test]
fn module_bytes_are_charged() {
    let sim = Sim::new().env("SIMCUDA_MODULE_BYTES", 8 * MIB).env("SIMCUDA_CTX_RESERVE", 0);
    let out = sim.client(Route::Dlsym).args("init ctx 0 info launch 1 0 info").run();
    out.assert_all_ok();
    assert_eq!(out.nth_u64("info", 0, "free") - out.nth_u64("info", 1, "free"), 8 * MIB);
}

#[test]
fn bad_command_lines_exit_2() {
    let sim = Sim::new();
    for script in ["", "nosuchcommand", "alloc", "alloc 12Q", "ctx x"] {
        let out = sim.client(Route::Link).args(script).run();
        assert_eq!(out.status.code(), Some(2), "`{script}`:\n{out}");
        assert!(out.lines.is_empty());
    }
}

#[test]
fn the_state_file_is_where_simcuda_state_says() {
    let sim = Sim::new();
    assert!(!sim.state_path().exists());
    sim.client(Route::Link).args("init").run().assert_all_ok();
    assert!(sim.state_path().exists());
}
