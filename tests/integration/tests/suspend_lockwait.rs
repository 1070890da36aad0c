//! The suspension policy (issue 22) when a candidate's members cannot be stopped in time: one
//! is inside a long kernel, so the driver's lock (or, on the shim's path, its agent's gate)
//! waits for its call under way. The policy bounds that wait by the request's remaining wait
//! (at most half of it while another candidate could make the room), so the request still has
//! time for the next candidate; the one that timed out is left running and passed over, but
//! only for as long as its locks waited (a timeout is no lasting refusal: the kernel may end a
//! moment later), not the 30 s of a lasting refusal.
//!
//! `first` (low priority, so first in the policy's order whatever its activity) and `second`
//! (normal priority), both suspendable and holding 1 GiB of a 4 GiB card; the high-priority
//! request needs one of them suspended, and waits the default 5 s (`GPUSLICE_MAKE_ROOM_WAIT_MS`
//! unset). `first`'s member is inside a 60 s kernel (the simulated driver: its synchronize is a
//! call under way for that long). The first two tests judge no figure of time: the request's
//! own wait is the bound, checked by the controller; the bound the policy gave is read from its
//! log line and the controller's `ls`, and compared with the default wait, never with a clock.
//! The last one runs on the simulated clock (`Sim::with_clock`): the test holds virtual time
//! still, so the kernel cannot end before the test lets it, and how long the group is passed
//! over is judged on that virtual time (the controller's policy clock, `refusal::now_ns`).

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
/// An urgent request while `first` is inside its kernel: it is served within its wait, by
/// suspending `second`, and `first` (its member inside the kernel named as the refuser) runs on.
fn served_past_first(sim: &Sim, ctl: &Controller<'_>, leave: &str, first: &Running) -> (Running, Listing) {
    let urgent = urgent_request(sim, ctl, leave);
    let alloc = urgent.wait_line("alloc", 0);
    assert!(alloc.starts_with("ok "), "the request is served within its wait: {alloc}\ncontroller log:\n{}", ctl.log());
    let l = ctl.ls();
    assert_eq!(l.suspension("second")["state"], "suspended", "the next candidate is suspended:\n{l}\n{}", ctl.log());
    let f = l.suspension("first");
    assert_eq!(f["state"], "running", "{l}");
    assert_eq!(f["refused_by"], first.pid(), "the member inside the kernel: {l}");
    (urgent, l)
}

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

    let (urgent, l) = served_past_first(&sim, &ctl, &leave, &first);
    let f = l.suspension("first");
    assert_eq!(f["refusals"], 1, "its timed-out lock counts as a refusal: {l}");
    assert_eq!(f["refusal_kind"], "timeout", "a timeout, not a lasting refusal: {l}");
    assert_eq!(f["timeouts"], 1, "{l}");
    let passed_over = f["passed_over_s"].as_f64().unwrap_or_else(|| panic!("passed over for a while: {l}"));
    assert!(
        passed_over > 0.0 && passed_over <= DEFAULT_WAIT_MS as f64 / 2e3,
        "passed over no longer than its locks waited (at most half the default wait), not 30 s: {passed_over} s\n{l}"
    );
    let why = f["error"].as_str().unwrap_or_default().to_string();
    let out = sim.client(Route::Dlsym).args(&format!("init ckpt state {} 0", first.pid())).run();
    out.assert_all_ok();
    assert!(out.lines[1].split_whitespace().any(|kv| kv == "value=0"), "first's member runs (CU_PROCESS_STATE_RUNNING): {out}\n{}", ctl.log());
    assert_eq!(sim.device_free(), free_before + (GIB + R) - (2 * GIB + R), "first's memory stayed on the device, second's left");
    assert!(!first.lines_now().iter().any(|l| l.starts_with("ok sync")), "first is still inside its kernel");

    let log = ctl.log();
    let bound = bound_ms(&log).unwrap_or_else(|| panic!("no refusal line with the bound:\n{log}"));
    assert!(bound <= DEFAULT_WAIT_MS / 2, "at most half of the request's wait while another candidate could serve it: {bound} ms");
    assert!(log.lines().any(|l| l.contains("group \"first\" refused suspension, a timeout")), "the log line says which kind:\n{log}");

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
    assert!(
        why.contains("cuCheckpointProcessLock") && why.contains("600"),
        "the driver's lock timed out (CUDA_ERROR_NOT_READY, as the real one answers): {why}\n{log}"
    );
}

/// The shim's path: `first`'s agent cannot close its gate behind the synchronize; the
/// controller passed it the bound, so it answers "busy" in time for `second`.
#[test]
fn on_the_shims_path_the_agents_gate_is_bounded_too() {
    let (log, why) = first_busy_second_suspended("shim");
    assert!(why.contains("did not finish in time"), "the agent's gate timed out: {why}\n{log}");
}

/// The kernel `first`'s member runs in the last test, on virtual time: longer than the pass-over
/// after a timed-out lock (at most half the default wait), shorter than a lasting refusal's 30 s.
const KERNEL_NS: u64 = 10_000_000_000;

/// Issue 22's follow-up: a timed-out lock is no lasting refusal. `first`'s lock times out behind
/// its member's kernel at the first request (served by suspending `second`); the kernel then
/// ends (10 s of virtual time later), and a later request, well within 30 s of the timeout, is
/// served by suspending `first`, first in the order. Before: `first` was passed over for 30 s
/// like any refusal, and `second` was suspended again in its place (had it been the only
/// candidate, the request would have failed).
#[test]
fn a_group_whose_lock_timed_out_is_suspended_by_a_later_request_once_its_kernel_ended() {
    let sim = machine().with_clock();
    // The test holds virtual time still from here on, but where it lets it move.
    let clock = sim.clock();
    let ctl = sim.controller();
    groups(&ctl, "driver");
    let (go, done, leave, again) = (sim.path_str("go"), sim.path_str("done"), sim.path_str("leave"), sim.path_str("again"));
    clock.park();
    let first = holder(&sim, &ctl, "first", &go, &format!("launch 1 {KERNEL_NS} sync"), &done);
    let second = holder(&sim, &ctl, "second", &go, "", &done);
    clock.unpark();
    touch(&go);
    first.wait_for("first's launch", Duration::from_secs(30), |l| l.starts_with("ok launch"));
    std::thread::sleep(SEVERAL_TICKS);
    let started = clock.now_ns();

    // The first request: `first`'s lock times out (its kernel cannot end: time stands still).
    let (urgent, l) = served_past_first(&sim, &ctl, &leave, &first);
    let f = l.suspension("first");
    assert_eq!(f["refusal_kind"], "timeout", "its lock timed out: {l}\n{}", ctl.log());
    let passed_over = f["passed_over_s"].as_f64().unwrap_or_else(|| panic!("passed over for a while: {l}"));
    assert!(passed_over <= DEFAULT_WAIT_MS as f64 / 2e3, "passed over only as long as its locks waited, not 30 s: {passed_over} s");
    assert!(!first.lines_now().iter().any(|l| l.starts_with("ok sync")), "first is still inside its kernel");
    touch(&leave);
    urgent.wait().assert_all_ok();
    ctl.ls_until("second resumed", Duration::from_secs(10), |l| l.suspension("second")["state"] == "running");

    // The kernel ends: virtual time moves to its end (10 s after the timeout, within 30 s).
    clock.sleep_ns(KERNEL_NS);
    first.wait_for("first's kernel to end", Duration::from_secs(30), |l| l.starts_with("ok sync"));
    let waited_ns = clock.now_ns() - started;
    assert!(waited_ns < 30_000_000_000, "the later request comes within a lasting refusal's 30 s: {waited_ns} ns");
    let l = ctl.ls();
    assert_eq!(l.suspension("first")["passed_over_s"], serde_json::Value::Null, "a candidate again after its kernel ended:\n{l}\n{}", ctl.log());

    // The later request: `first`, first in the order, is suspended for it.
    let later = urgent_request(&sim, &ctl, &again);
    let alloc = later.wait_line("alloc", 0);
    assert!(alloc.starts_with("ok "), "the later request is served: {alloc}\ncontroller log:\n{}", ctl.log());
    let l = ctl.ls();
    assert_eq!(l.suspension("first")["state"], "suspended", "the group whose lock timed out is suspended now:\n{l}\n{}", ctl.log());
    assert_eq!(l.suspension("second")["state"], "running", "second is left alone this time:\n{l}");

    touch(&again);
    later.wait().assert_all_ok();
    ctl.ls_until("first resumed", Duration::from_secs(10), |l| l.suspension("first")["state"] == "running");
    touch(&done);
    first.wait().assert_all_ok();
    second.wait().assert_all_ok();
}
