//! Suspending and resuming whole groups (issue 22) on the simulated driver's checkpoint API:
//! `gpuslice suspend/resume`, a process that dies while suspended, a controller restarted while
//! a group is suspended, the refusals, and the policy that suspends a low-priority suspendable
//! group for a high-priority request that finds the device full (and its bounded wait).
//!
//! The device's free memory is the simulated driver's (NVML, from a process without the shim);
//! a suspended process's next CUDA call blocks until it is resumed.

use gpuslice_integration::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Each context's own memory (the simulated driver's `SIMCUDA_CTX_RESERVE`).
const R: u64 = 64 * MIB;

fn machine() -> Sim {
    Sim::new().env("SIMCUDA_DEVICES", 1).env("SIMCUDA_MEM", "4G").env("SIMCUDA_CTX_RESERVE", R)
}

fn state_is(group: &'static str, state: &'static str) -> impl Fn(&Listing) -> bool {
    move |l| l.suspension(group)["state"] == state
}

/// A member of `group` holding `bytes`, that then waits for `go`, asks the driver its memory,
/// and waits for `done` before freeing all.
fn tenant(sim: &Sim, ctl: &Controller<'_>, group: &str, bytes: &str, go: &str, done: &str) -> Running {
    let t = sim
        .client(Route::Dlsym)
        .shim()
        .controller(ctl)
        .group(group)
        .args(&format!("init ctx 0 alloc {bytes} waitfile {go} mark info elapsed waitfile {done} freeall"))
        .spawn();
    expect_ok(&t.wait_line("alloc", 0));
    t
}

/// A tenant as above that also writes a 64 KiB allocation (id 2) and reads it back after `go`.
fn tenant_with_data(sim: &Sim, ctl: &Controller<'_>, group: &str, go: &str, done: &str) -> Running {
    let t = sim
        .client(Route::Dlsym)
        .shim()
        .controller(ctl)
        .group(group)
        .args(&format!("init ctx 0 alloc 1G alloc 64K poke 2 170 waitfile {go} mark info elapsed peek 2 waitfile {done} freeall"))
        .spawn();
    expect_ok(&t.wait_line("poke", 0));
    t
}

/// 1 GiB, 64 KiB and a context: what `tenant_with_data` holds.
const WITH_DATA: u64 = GIB + 64 * 1024 + R;

#[test]
fn suspend_moves_the_memory_off_the_device_blocks_the_process_and_resume_brings_it_back() {
    let sim = machine();
    let ctl = sim.controller();
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = tenant_with_data(&sim, &ctl, "batch", &go, &done);
    let before = sim.device_free();
    assert_eq!(before, 4 * GIB - WITH_DATA, "the tenant's allocations and context are on the device");

    let out = ctl.cli("suspend").args("--group batch").run();
    assert!(out.success(), "{out}\n{}", ctl.log());
    assert!(out.lines.join("\n").contains("suspended: 1 processes"), "{out}");
    assert_eq!(sim.device_free(), 4 * GIB, "its memory (context included) left the device");
    let l = ctl.ls();
    let r = l.suspension("batch");
    assert_eq!(r["state"], "suspended", "{l}");
    assert_eq!(r["bytes"].as_u64(), Some(WITH_DATA), "{l}");
    assert_eq!(r["host_bytes"].as_u64(), Some(WITH_DATA), "{l}");
    assert_eq!(r["pids"], serde_json::json!([t.pid()]), "{l}");
    assert!(r["suspend_ms"].as_f64().is_some(), "{l}");
    assert_eq!(l.group_used("batch", 0), WITH_DATA, "its quota still counts what it holds: {l}");
    let table = ctl.cli("ls").run();
    assert!(table.lines.iter().any(|line| line.starts_with("batch") && line.contains("suspended")), "{table}");

    // Its next CUDA call blocks while it is suspended.
    touch(&go);
    std::thread::sleep(Duration::from_millis(400));
    assert!(!t.lines_now().iter().any(|l| l.starts_with("ok info")), "a suspended process's CUDA call returned: {:?}", t.lines_now());

    let out = ctl.cli("resume").args("--group batch").run();
    assert!(out.success(), "{out}\n{}", ctl.log());
    let info = t.wait_line("info", 0);
    expect_ok(&info);
    let elapsed = t.wait_line("elapsed", 0);
    assert!(field_f64(&elapsed, "ms") >= 350.0, "the call waited for the resume: {elapsed}");
    let peek = t.wait_line("peek", 0);
    assert!(peek.contains("first=170 all_same=1"), "its bytes came back intact: {peek}");
    assert_eq!(sim.device_free(), before, "everything came back");
    let (l, _) = ctl.ls_until("the row says running", Duration::from_secs(5), state_is("batch", "running"));
    let r = l.suspension("batch");
    assert!(r["resume_ms"].as_f64().is_some(), "{l}");
    assert_eq!(r["host_bytes"].as_u64(), Some(0), "{l}");
    touch(&done);
    t.wait().assert_all_ok();
}

/// The `key=value` field of a client's line.
fn field_f64(line: &str, key: &str) -> f64 {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn a_process_that_dies_while_suspended_frees_its_host_copy() {
    let sim = machine();
    let ctl = sim.controller();
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let mut t = tenant_with_data(&sim, &ctl, "batch", &go, &done);
    ctl.cli("suspend").args("--group batch").run().assert_success();
    assert_eq!(sim.device_free(), 4 * GIB);
    // The simulated driver's host copy of the bytes it keeps.
    let host_copy = std::path::PathBuf::from(format!("{}.host-{}", sim.state_path().display(), t.pid()));
    assert!(host_copy.exists(), "{}", host_copy.display());
    t.kill();
    let _ = t.wait();
    // The next process to use the driver finds the dead entry and frees its host copy.
    sim.client(Route::Link).args("init ctx 0").run().assert_all_ok();
    assert!(!host_copy.exists(), "the dead process's host copy is freed");
    let (l, _) = ctl.ls_until("the dead process's suspension is gone", Duration::from_secs(10), |l| {
        l.suspension("batch")["state"] == "running" && l.processes().is_empty()
    });
    let r = l.suspension("batch");
    assert_eq!(r["host_bytes"].as_u64(), Some(0), "{l}");
    assert!(r["error"].as_str().is_some_and(|e| e.contains("exited while suspended")), "{l}");
    assert_eq!(sim.device_free(), 4 * GIB, "nothing of it came back onto the device");
    let out = ctl.cli("resume").args("--group batch").run();
    assert!(!out.success() && out.stderr.contains("is not suspended"), "{out}");
}

#[test]
fn a_restarted_controller_finds_the_suspended_group_and_resumes_it() {
    let sim = machine();
    let mut ctl = sim.controller();
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = tenant(&sim, &ctl, "batch", "1G", &go, &done);
    ctl.cli("suspend").args("--group batch").run().assert_success();
    ctl.kill9();
    ctl.restart();
    let (l, _) = ctl.ls_until("the new controller knows the group is suspended", Duration::from_secs(10), state_is("batch", "suspended"));
    assert_eq!(l.suspension("batch")["pids"], serde_json::json!([t.pid()]), "{l}");
    assert_eq!(sim.device_free(), 4 * GIB);
    touch(&go);
    ctl.cli("resume").args("--group batch").run().assert_success();
    expect_ok(&t.wait_line("info", 0));
    assert_eq!(sim.device_free(), 4 * GIB - GIB - R);
    touch(&done);
    t.wait().assert_all_ok();
}

#[test]
fn refusals_name_the_reason_and_change_nothing() {
    let sim = machine();
    let ctl = sim.controller_with_args(&["--suspend-host-limit", "1GiB"]);
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));

    let out = ctl.cli("suspend").args("--group nosuch").run();
    assert!(!out.success() && out.stderr.contains("no group named \"nosuch\""), "{out}");

    // Marking a group whose memory limit is over the host bound says so then, not when a
    // request waits; one under it hears nothing.
    ctl.set_ok("--create --group roomy --memory 2GiB");
    let said = ctl.set_ok("--group roomy --suspendable true");
    assert!(said.contains("suspendable") && said.contains("its memory limit (2.00 GiB) is over the 1.00 GiB"), "{said}");
    ctl.set_ok("--create --group snug --memory 512MiB");
    let said = ctl.set_ok("--group snug --suspendable true");
    assert!(said.contains("suspendable") && !said.contains("note:"), "{said}");

    // Over the host-memory bound: 1.5 GiB + a context would pass 1 GiB.
    let big = tenant(&sim, &ctl, "big", "1536M", &go, &done);
    let out = ctl.cli("suspend").args("--group big").run();
    assert!(!out.success() && out.stderr.contains("allows 1.00 GiB"), "{out}");
    assert_eq!(sim.device_free(), 4 * GIB - 1536 * MIB - R, "nothing moved");

    // Already suspended.
    let small = tenant(&sim, &ctl, "small", "256M", &go, &done);
    ctl.cli("suspend").args("--group small").run().assert_success();
    let out = ctl.cli("suspend").args("--group small").run();
    assert!(!out.success() && out.stderr.contains("is suspended already"), "{out}");
    // No resume without room for it (and room to spare): it stays suspended, nothing lost.
    let filler = sim.client(Route::Link).args(&format!("init ctx 0 alloc 2200M waitfile {done} freeall")).spawn();
    expect_ok(&filler.wait_line("alloc", 0));
    let out = ctl.cli("resume").args("--group small").run();
    assert!(!out.success() && out.stderr.contains("stays suspended: device 0 has"), "{out}");
    assert_eq!(ctl.ls().suspension("small")["state"], "suspended");
    let mut filler = filler;
    filler.kill();
    let _ = filler.wait();
    // The bound counts what is suspended: 1.5 GiB more would not fit beside it either way.
    ctl.cli("resume").args("--group small").run().assert_success();
    let out = ctl.cli("resume").args("--group small").run();
    assert!(!out.success() && out.stderr.contains("is not suspended"), "{out}");

    // A group that exports memory (legacy IPC) to another group's process, which imported it,
    // is refused unless allowed.
    let handle = sim.path_str("handle");
    let exporter =
        sim.program(mgpu()).shim().controller(&ctl).group("exporter").args(&format!("init ctx 0 alloc 64M ipcexport {handle} waitfile {done} free")).spawn();
    expect_ok(&exporter.wait_line("ipcexport", 0));
    let importer = sim.program(mgpu()).shim().controller(&ctl).group("importer").args(&format!("init ctx 0 ipcopen {handle} waitfile {done} ipcclose")).spawn();
    expect_ok(&importer.wait_line("ipcopen", 0));
    let out = ctl.cli("suspend").args("--group exporter").run();
    assert!(!out.success() && out.stderr.contains("exports memory"), "{out}");
    ctl.set_ok("--group exporter --suspendable true --allow-exports");
    let l = ctl.ls();
    assert_eq!(l.suspension("exporter")["allow_exports"], true, "{l}");

    touch(&go);
    touch(&done);
    big.wait().assert_all_ok();
    small.wait().assert_all_ok();
    exporter.wait().assert_all_ok();
    importer.wait().assert_all_ok();
}

/// tests/clients/mgpu.c, linked with -lcuda (see its header for the commands).
fn mgpu() -> std::path::PathBuf {
    let sim = sim_dir().display().to_string();
    compile(&c_compiler(), "mgpu", &["tests/clients/mgpu.c"], &["-std=gnu11", "-Wall", "-pthread", "-L", &sim, "-lcuda"], &[]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_high_priority_request_suspends_a_low_priority_group_and_it_resumes_when_room_returns() {
    let sim = machine();
    let ctl = sim.controller();
    // Quotas that sum past the 4 GiB card.
    ctl.set_ok("--create --group batch --memory 3GiB --priority low");
    ctl.set_ok("--group batch --suspendable true");
    ctl.set_ok("--create --group urgent --memory 3GiB --priority high");
    let (go, done, leave) = (sim.path_str("go"), sim.path_str("done"), sim.path_str("leave"));
    let batch = tenant(&sim, &ctl, "batch", "2560M", &go, &done);
    let urgent =
        sim.client(Route::Procaddr).shim().controller(&ctl).group("urgent").args(&format!("init ctx 0 mark alloc 2G elapsed waitfile {leave} freeall")).spawn();
    let alloc = urgent.wait_line("alloc", 0);
    expect_ok(&alloc);
    let l = ctl.ls();
    let r = l.suspension("batch");
    assert_eq!(r["state"], "suspended", "{l}\n{}", ctl.log());
    assert_eq!(r["automatic"], true, "{l}");
    assert_eq!(sim.device_free(), 4 * GIB - 2 * GIB - R, "only the urgent group is on the device");
    assert_eq!(l.group_used("batch", 0), 2560 * MIB + R, "the suspended group keeps its quota's count: {l}");

    // The urgent one leaves: the policy brings the batch group back by itself.
    touch(&leave);
    urgent.wait().assert_all_ok();
    let (l, _) = ctl.ls_until("the batch group is resumed", Duration::from_secs(10), state_is("batch", "running"));
    assert!(l.suspension("batch")["resume_ms"].as_f64().is_some(), "{l}");
    assert_eq!(sim.device_free(), 4 * GIB - 2560 * MIB - R);
    touch(&go);
    expect_ok(&batch.wait_line("info", 0));
    touch(&done);
    batch.wait().assert_all_ok();
}

#[test]
fn a_request_no_suspension_can_serve_fails_after_the_bounded_wait() {
    let sim = machine();
    let ctl = sim.controller();
    ctl.set_ok("--create --group steady --memory 3GiB --priority low"); // not suspendable
    ctl.set_ok("--create --group batch --memory 3GiB --priority low");
    ctl.set_ok("--group batch --suspendable true");
    ctl.set_ok("--create --group urgent --memory 3GiB --priority high");
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let steady = tenant(&sim, &ctl, "steady", "2560M", &go, &done);

    // Nothing suspendable holds memory there: refused at once, no wait.
    let out = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("urgent")
        .env("GPUSLICE_MAKE_ROOM_WAIT_MS", "3000")
        .args("init ctx 0 mark alloc 2G elapsed")
        .run();
    out.expect_err(3, 2);
    assert!(field_f64(&out.lines[4], "ms") < 2000.0, "no suspendable memory, no wait: {out}");

    // Suspendable memory, but too little (512 MiB + its context for 2 GiB on 896 MiB free): the
    // request waits its bounded time for more, then fails; nothing was suspended for nothing.
    let batch = tenant(&sim, &ctl, "batch", "512M", &go, &done);
    let started = Instant::now();
    let out = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("urgent")
        .env("GPUSLICE_MAKE_ROOM_WAIT_MS", "600")
        .args("init ctx 0 mark alloc 2G elapsed pid")
        .run();
    out.expect_err(3, 2);
    let waited = field_f64(&out.lines[4], "ms");
    assert!((600.0..5000.0).contains(&waited), "it waited the bounded time, {waited} ms");
    assert!(started.elapsed() < Duration::from_secs(20));
    let pid = out.u64("pid", "pid");
    assert!(
        out.stderr.lines().any(|l| l.contains(&format!("pid {pid}: cuMemAlloc of 2.00 GiB")) && l.contains("no room was made within 600 ms")),
        "the log line names the process, the request and the wait:\n{}",
        out.stderr
    );
    assert_eq!(ctl.ls().suspension("batch")["state"], "running", "the batch group was never suspended");
    touch(&go);
    touch(&done);
    batch.wait().assert_all_ok();
    steady.wait().assert_all_ok();
}

/// The simulated driver's checkpoint API on its own, as another process calls it: the state
/// machine and its error codes (cuda.h's), the memory that leaves and comes back, a restore
/// that does not fit, and a lock that times out behind a call under way.
#[test]
fn the_simulated_checkpoint_api_follows_the_drivers_state_machine() {
    let sim = machine();
    let (go, done, filled, release) = (sim.path_str("go"), sim.path_str("done"), sim.path_str("filled"), sim.path_str("release"));
    let target = sim.client(Route::Link).args(&format!("init ctx 0 alloc 1G waitfile {go} launch 1 1500000000 sync waitfile {done} freeall")).spawn();
    expect_ok(&target.wait_line("alloc", 0));
    let p = target.pid();
    let caller = |cmds: &str| sim.client(Route::Dlsym).args(&format!("init {cmds}")).run();

    let out = caller(&format!(
        "ckpt state {p} 0 ckpt checkpoint {p} 0 ckpt restore {p} 0 ckpt unlock {p} 0 ckpt lock {p} 0 ckpt lock {p} 0 ckpt state {p} 0 \
         ckpt checkpoint {p} 0 ckpt state {p} 0 ckpt unlock {p} 0 nvml 0 ckpt state 999999 0"
    ));
    assert_eq!(field_f64(&out.lines[1], "value"), 0.0, "{out}");
    for i in [2, 3, 4] {
        out.expect_err(i, 401); // CUDA_ERROR_ILLEGAL_STATE: not locked / not checkpointed
    }
    out.expect_ok(5);
    out.expect_err(6, 401);
    assert_eq!(field_f64(&out.lines[7], "value"), 1.0, "locked: {out}");
    out.expect_ok(8);
    assert_eq!(field_f64(&out.lines[9], "value"), 2.0, "checkpointed: {out}");
    out.expect_err(10, 401);
    assert_eq!(out.u64("nvml", "free"), 4 * GIB, "its memory left the device: {out}");
    out.expect_err(12, 1); // not a CUDA process

    // Another process takes the room: the restore fails cleanly and can be tried again.
    let filler = sim.client(Route::Link).args(&format!("init ctx 0 alloc 3G touch {filled} waitfile {release} freeall")).spawn();
    expect_ok(&filler.wait_line("touch", 0));
    let out = caller(&format!("ckpt restore {p} 0 ckpt state {p} 0"));
    out.expect_err(1, 2); // CUDA_ERROR_OUT_OF_MEMORY
    assert_eq!(field_f64(&out.lines[2], "value"), 2.0, "still checkpointed: {out}");
    touch(&release);
    filler.wait().assert_all_ok();
    let out = caller(&format!("ckpt restore {p} 0 ckpt state {p} 0 ckpt unlock {p} 0 ckpt state {p} 0 ckpt tid {p} 0 nvml 0"));
    out.assert_all_ok();
    assert_eq!(field_f64(&out.lines[2], "value"), 1.0, "a restore leaves it locked: {out}");
    assert_eq!(field_f64(&out.lines[4], "value"), 0.0, "{out}");
    assert_eq!(out.u64("nvml", "free"), 4 * GIB - GIB - R, "its memory is back: {out}");

    // A lock waits for the call under way (a 1.5 s synchronize) and gives up at its timeout.
    touch(&go);
    expect_ok(&target.wait_line("launch", 0));
    let out = caller(&format!("ckpt lock {p} 100 ckpt state {p} 0"));
    out.expect_err(1, 600); // CUDA_ERROR_NOT_READY, as the real driver answers (cuda.h says TIMEOUT)
    assert_eq!(field_f64(&out.lines[2], "value"), 0.0, "left running: {out}");
    touch(&done);
    target.wait().assert_all_ok();
}

#[test]
fn groups_are_made_suspendable_by_the_config_file_by_set_and_by_run() {
    let sim = machine();
    let ctl = sim.controller_with_config("[groups.nightly]\nsuspendable = true\nallow_exports = true\n[groups.web]\nmemory_limit = \"1GiB\"\n");
    let l = ctl.ls_until("the config's group is suspendable", Duration::from_secs(5), |l| l.suspension("nightly")["suspendable"] == true).0;
    assert_eq!(l.suspension("nightly")["allow_exports"], true, "{l}");
    assert_eq!(l.suspension("web"), Value::Null, "{l}");

    let out = ctl.set("--group nosuch --suspendable true");
    assert!(!out.success() && out.stderr.contains("no group named \"nosuch\""), "a misspelt name is refused: {out}");
    ctl.set_ok("--group web --suspendable true");
    ctl.set_ok("--group nightly --suspendable false");
    let l = ctl.ls();
    assert_eq!(l.suspension("web")["suspendable"], true, "{l}");
    assert_eq!(l.suspension("nightly")["suspendable"], false, "{l}");

    // `gpuslice run --suspendable` marks a group its program is about to make.
    let client = client_path(Route::Link).display().to_string();
    let out = sim.program(cli_path()).controller(&ctl).args(&format!("run --group later --suspendable -- {client} init ctx 0 alloc 64M")).run();
    out.assert_all_ok();
    assert_eq!(ctl.ls().suspension("later")["suspendable"], true);
}

/// Marks made with `gpuslice set --suspendable` live in the group's members page (the ledger),
/// so a restarted controller keeps them, and over the config file's (as other live edits).
/// A group needs a member alive through the restart for its memory to be found again.
#[test]
fn marks_made_with_set_survive_a_controller_restart() {
    let sim = machine();
    let mut ctl = sim.controller_with_config("[groups.nightly]\nsuspendable = true\n");
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let batch = tenant(&sim, &ctl, "batch", "64M", &go, &done);
    let nightly = tenant(&sim, &ctl, "nightly", "64M", &go, &done);
    ctl.set_ok("--group batch --suspendable true --allow-exports");
    ctl.set_ok("--group nightly --suspendable false");
    ctl.kill9();
    ctl.restart();
    let (l, _) = ctl.ls_until("the restarted controller knows the marks", Duration::from_secs(10), |l| l.suspension("batch")["suspendable"] == true);
    assert_eq!(l.suspension("batch")["allow_exports"], true, "{l}");
    assert_eq!(l.suspension("nightly")["suspendable"], false, "the edit wins over the config file: {l}");
    assert!(ctl.log().contains("as `gpuslice set` left it before the restart"), "{}", ctl.log());
    // And the policy acts on them: the restarted controller suspends `batch` on request.
    let out = ctl.cli("suspend").args("--group batch").run();
    assert!(out.success(), "{out}");
    ctl.cli("resume").args("--group batch").run().assert_success();
    touch(&go);
    touch(&done);
    batch.wait().assert_all_ok();
    nightly.wait().assert_all_ok();
}

/// A process that joins a group while it is suspended is suspended with it before it gets its
/// registration answer: its first CUDA call after registering blocks, it holds nothing on the
/// device, and the group's resume brings it back with the others.
#[test]
fn a_process_joining_a_suspended_group_waits_for_its_resume() {
    let sim = machine();
    let ctl = sim.controller();
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let first = tenant(&sim, &ctl, "batch", "1G", &go, &done);
    ctl.cli("suspend").args("--group batch").run().assert_success();
    assert_eq!(sim.device_free(), 4 * GIB);
    let late = sim.client(Route::Dlsym).shim().controller(&ctl).group("batch").args(&format!("init mark ctx 0 alloc 256M elapsed waitfile {done}")).spawn();
    let (l, _) = ctl.ls_until("the newcomer is recorded as suspended", Duration::from_secs(10), |l| {
        l.suspension("batch")["pids"].as_array().is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(late.pid()))))
    });
    assert_eq!(l.suspension("batch")["state"], "suspended", "{l}");
    assert!(ctl.log().contains(&format!("pid {} joined group \"batch\" while it is suspended", late.pid())), "{}", ctl.log());
    std::thread::sleep(Duration::from_millis(500));
    assert!(!late.lines_now().iter().any(|l| l.starts_with("ok ctx")), "it ran on the GPU beside its suspended group: {:?}", late.lines_now());
    assert_eq!(sim.device_free(), 4 * GIB, "nothing of the group is on the device");
    ctl.cli("resume").args("--group batch").run().assert_success();
    let elapsed = late.wait_line("elapsed", 0);
    assert!(field_f64(&elapsed, "ms") >= 450.0, "its context waited for the resume: {elapsed}");
    assert_eq!(sim.device_free(), 4 * GIB - GIB - 256 * MIB - 2 * R, "both are back on the device");
    touch(&go);
    touch(&done);
    first.wait().assert_all_ok();
    late.wait().assert_all_ok();
}
