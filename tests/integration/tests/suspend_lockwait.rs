//! The suspension policy (issue 22) when a candidate's members cannot be stopped in time: one
//! is inside a long kernel, so the driver's lock (or, on the shim's path, its agent's gate)
//! waits for its call under way. The policy bounds that wait by the request's remaining wait
//! (at most half of it while another candidate could make the room), so the request still has
//! time for the next candidate; the one that timed out is left running and passed over like
//! any refusal.
//!
//! `first` (low priority, so first in the policy's order whatever its activity) and `second`
//! (normal priority), both suspendable and holding 1 GiB of a 4 GiB card; the high-priority
//! request needs one of them suspended, and waits the default 5 s (`GPUSLICE_MAKE_ROOM_WAIT_MS`
//! unset). `first`'s member is inside a 60 s kernel (the simulated driver: its synchronize is a
//! call under way for that long). No figure of time is judged: the request's own wait is the
//! bound, checked by the controller; the bound the policy gave is read from its log line and
//! compared with the default wait, never with a clock.

use gpuslice_integration::*;
use std::time::Duration;

/// Each context's own memory (the simulated driver's `SIMCUDA_CTX_RESERVE`).
const R: u64 = 64 * MIB;
/// Long enough for the controller's watcher (every 200 ms) to have looked several times.
const SEVERAL_TICKS: Duration = Duration::from_millis(800);
/// The shim's default wait for room (shim/src/policy/make_room.rs).
const DEFAULT_WAIT_MS: u64 = 5000;

fn machine() -> Sim {
    Sim::new().env("SIMCUDA_DEVICES", 1).env("SIMCUDA_MEM", "4G").env("SIMCUDA_CTX_RESERVE", R)
}

/// `first` low (on suspend path `path`) and `second` normal (the driver's path: what is under
/// test is `first`'s), both suspendable; `urgent` high.
fn groups(ctl: &Controller<'_>, path: &str) {
    for (g, p, path) in [("first", "low", path), ("second", "normal", "driver")] {
        ctl.set_ok(&format!("--create --group {g} --memory 3GiB --priority {p}"));
        ctl.set_ok(&format!("--group {g} --suspendable true --suspend-path {path}"));
    }
    ctl.set_ok("--create --group urgent --memory 3GiB --priority high");
}

/// A member of `group` holding 1 GiB, then (after `go`) running `then`, until `done`.
fn holder(sim: &Sim, ctl: &Controller<'_>, group: &str, go: &str, then: &str, done: &str) -> Running {
    let t = sim
        .client(Route::Dlsym)
        .shim()
        .controller(ctl)
        .group(group)
        .env("GPUSLICE_LOG", "info")
        .args(&format!("init ctx 0 alloc 1G waitfile {go} {then} waitfile {done} freeall"))
        .spawn();
    expect_ok(&t.wait_line("alloc", 0));
    t
}

/// The high-priority request: 2 GiB when `first` and `second` hold theirs (one suspension
/// frees enough, either one), with the default wait.
fn urgent_request(sim: &Sim, ctl: &Controller<'_>, leave: &str) -> Running {
    sim.client(Route::Procaddr).shim().controller(ctl).group("urgent").args(&format!("init ctx 0 alloc 2G waitfile {leave} freeall")).spawn()
}

/// The bound the policy gave `first`'s locks, from its refusal's log line ("... waited for at
/// most N ms of the request's wait").
fn bound_ms(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("group \"first\" refused suspension"))?;
    let (_, rest) = line.split_once("waited for at most ")?;
    rest.split_once(" ms")?.0.parse().ok()
}

/// The scenario on suspend path `path`: the request is served by suspending `second`; `first`
/// is left running (the driver says so), refused once by its busy member, passed over.
/// Returns the controller's log and `first`'s refusal text.
fn first_busy_second_suspended(path: &str) -> (String, String) {
    let sim = machine();
    let ctl = sim.controller();
    groups(&ctl, path);
    let (go, done, leave) = (sim.path_str("go"), sim.path_str("done"), sim.path_str("leave"));
    let mut first = holder(&sim, &ctl, "first", &go, "launch 1 60000000000 sync", &done);
    let second = holder(&sim, &ctl, "second", &go, "", &done);
    touch(&go);
    // `first` is inside its kernel: its synchronize is the call under way.
    first.wait_for("first's launch", Duration::from_secs(30), |l| l.starts_with("ok launch"));
    std::thread::sleep(SEVERAL_TICKS);
    let free_before = sim.device_free();

    let urgent = urgent_request(&sim, &ctl, &leave);
    let alloc = urgent.wait_line("alloc", 0);
    assert!(alloc.starts_with("ok "), "the request is served within its default wait: {alloc}\ncontroller log:\n{}", ctl.log());
    let l = ctl.ls();
    assert_eq!(l.suspension("second")["state"], "suspended", "the next candidate is suspended:\n{l}\n{}", ctl.log());
    let f = l.suspension("first");
    assert_eq!(f["state"], "running", "{l}");
    assert_eq!(f["refusals"], 1, "its timed-out lock counts as a refusal: {l}");
    assert_eq!(f["refused_by"], first.pid(), "the member inside the kernel: {l}");
    assert!(f["passed_over_s"].as_f64().is_some_and(|s| s > 0.0), "passed over for a while: {l}");
    let why = f["error"].as_str().unwrap_or_default().to_string();
    let out = sim.client(Route::Dlsym).args(&format!("init ckpt state {} 0", first.pid())).run();
    out.assert_all_ok();
    assert!(out.lines[1].split_whitespace().any(|kv| kv == "value=0"), "first's member runs (CU_PROCESS_STATE_RUNNING): {out}\n{}", ctl.log());
    assert_eq!(sim.device_free(), free_before + (GIB + R) - (2 * GIB + R), "first's memory stayed on the device, second's left");
    assert!(!first.lines_now().iter().any(|l| l.starts_with("ok sync")), "first is still inside its kernel");

    let log = ctl.log();
    let bound = bound_ms(&log).unwrap_or_else(|| panic!("no refusal line with the bound:\n{log}"));
    assert!(bound <= DEFAULT_WAIT_MS / 2, "at most half of the request's wait while another candidate could serve it: {bound} ms");

    touch(&leave);
    urgent.wait().assert_all_ok();
    ctl.ls_until("second resumed", Duration::from_secs(10), |l| l.suspension("second")["state"] == "running");
    touch(&done);
    second.wait().assert_all_ok();
    first.kill();
    let _ = first.wait();
    (log, why)
}

/// The driver's path: `first`'s lock (`cuCheckpointProcessLock`) times out behind its member's
/// synchronize. Before the bound, the lock waited its 10 s, the request's 5 s ran out
/// meanwhile, and the allocation failed (`err alloc code=2`) although `second` could serve it.
#[test]
fn a_candidate_inside_a_long_kernel_costs_the_request_part_of_its_wait_and_the_next_is_suspended() {
    let (log, why) = first_busy_second_suspended("driver");
    assert!(why.contains("cuCheckpointProcessLock") && why.contains("909"), "the driver's lock timed out (CUDA_ERROR_TIMEOUT): {why}\n{log}");
}

/// The shim's path: `first`'s agent cannot close its gate behind the synchronize; the
/// controller passed it the bound, so it answers "busy" in time for `second`.
#[test]
fn on_the_shims_path_the_agents_gate_is_bounded_too() {
    let (log, why) = first_busy_second_suspended("shim");
    assert!(why.contains("did not finish in time"), "the agent's gate timed out: {why}\n{log}");
}
