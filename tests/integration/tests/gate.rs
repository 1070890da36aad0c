//! The suspend gate (issue 22, step 2; shim/src/sys/gate.rs and shim/src/hooks/gate): every
//! driver call of the program passes it, hooked or not. Driver functions the shim does not hook
//! reach the program as thunks through all three routes and pass their arguments untouched;
//! a closed gate holds calls until it opens, a thread inside a long call holds `close` until it
//! times out, and a fork child starts with the gate open. The gate is closed here through the
//! shim's test knob (`GPUSLICE_TEST_GATE=1`, refused without it). No test judges a duration:
//! each asserts what was observed while the gate was closed or open.

use gpuslice_integration::*;

/// The shim with the gate's test knob on, no controller needed for these.
fn gated(sim: &Sim, route: Route) -> Client<'_> {
    sim.client(route).shim().env("GPUSLICE_TEST_GATE", "1")
}

#[test]
fn unhooked_functions_are_thunks_that_pass_floats_and_stack_arguments_untouched() {
    for route in [Route::Link, Route::Dlsym, Route::Procaddr] {
        let sim = Sim::new();
        let out = gated(&sim, route).args("init ctx 0 gateargs gatestate").run();
        out.assert_all_ok();
        assert_eq!(out.u64("gateargs", "thunk"), 1, "{route:?}: the program got the shim's thunk:\n{out}");
        for key in ["floats", "stack", "thread_floats", "thread_stack"] {
            assert_eq!(out.u64("gateargs", key), 1, "{route:?}: {key} reached the driver untouched:\n{out}");
        }
        // The echo functions are in the table: nothing went around the gate.
        assert_eq!(out.u64("gatestate", "fast"), 1, "{route:?}:\n{out}");
        assert_eq!(out.u64("gatestate", "unknown"), 0, "{route:?}:\n{out}");

        // Without the shim the same calls reach the driver directly (the check itself holds).
        let bare = sim.client(route).args("init ctx 0 gateargs").run();
        assert_eq!(bare.u64("gateargs", "thunk"), 0, "{bare}");
        assert_eq!(bare.u64("gateargs", "stack"), 1, "{bare}");
    }
}

#[test]
fn a_closed_gate_holds_thunked_and_hooked_calls_until_it_opens_and_lets_the_closer_through() {
    for route in [Route::Link, Route::Procaddr] {
        let sim = Sim::new();
        let out = gated(&sim, route).args("init ctx 0 gateblock 300").run();
        out.assert_all_ok();
        let line = out.first("gateblock");
        assert_eq!(out.u64("gateblock", "close"), 0, "{route:?}: close succeeded: {line}");
        assert_eq!(out.u64("gateblock", "closed"), 1, "{line}");
        assert_eq!(out.u64("gateblock", "exempt"), 1, "the closer passes its own gate: {line}");
        assert_eq!(out.u64("gateblock", "held"), 1, "cuMemcpyHtoD (thunk) and cuMemAlloc (hook) waited while closed: {line}");
        assert_eq!(out.u64("gateblock", "copy"), 1, "the copy went through after open: {line}");
        assert_eq!(out.u64("gateblock", "alloc"), 1, "the allocation went through after open: {line}");
        assert_eq!(out.u64("gateblock", "open"), 1, "{line}");
    }
}

#[test]
fn a_thread_inside_a_long_call_keeps_close_waiting_until_it_gives_up_busy() {
    let sim = Sim::new();
    // A 1.5 s kernel, cuStreamSynchronize behind it on another thread; close(200 ms).
    let out = gated(&sim, Route::Link).args("init ctx 0 gatebusy 1500 200").run();
    out.assert_all_ok();
    let line = out.first("gatebusy");
    assert_eq!(out.get("gatebusy", "busy").as_deref(), Some("-1"), "GateBusy with one thread inside: {line}");
    assert_eq!(out.u64("gatebusy", "reopened"), 1, "a timed-out close reopens the gate: {line}");
    assert_eq!(out.u64("gatebusy", "sync"), 2, "the synchronize finished normally: {line}");
    assert_eq!(out.u64("gatebusy", "after"), 0, "once the thread left, close succeeds: {line}");
}

#[test]
fn a_fork_child_starts_with_the_gate_open() {
    let sim = Sim::new();
    let out = gated(&sim, Route::Link).args("init ctx 0 gatefork").run();
    out.assert_all_ok();
    let child = out.lines_of("gatefork").into_iter().find(|l| l.contains("child")).unwrap_or_else(|| panic!("no child line:\n{out}")).to_string();
    let parent = out.lines_of("gatefork").into_iter().find(|l| l.contains("parent")).unwrap_or_else(|| panic!("no parent line:\n{out}")).to_string();
    assert!(child.contains("closed=0"), "the child's gate is open: {child}");
    assert!(child.contains("query=0"), "the child's driver call went through: {child}");
    assert!(parent.contains("close=0") && parent.contains("closed=1"), "the parent's stayed closed: {parent}");
    assert!(parent.contains("child_exit=0"), "{parent}");
}

/// A driver function the table lacks (PyTorch's runtime looks up legacy names such as
/// `cuGLCtxCreate`) gets a spare thunk: it passes the gate like any other, its argument and
/// result intact, and the process stays fast-suspendable.
#[test]
fn a_driver_function_outside_the_table_gets_a_spare_thunk_that_passes_the_gate() {
    let sim = Sim::new();
    let out = gated(&sim, Route::Dlsym).args("init ctx 0 gatestate gatecall cuSimcudaUnlisted 5 200 gatestate").run();
    out.assert_all_ok();
    let line = out.first("gatecall");
    assert_eq!(out.u64("gatecall", "thunk"), 1, "the program got a gpuslice thunk: {line}");
    assert_eq!(out.u64("gatecall", "result"), 16, "3 × 5 + 1 came back through it: {line}");
    assert_eq!(out.u64("gatecall", "close"), 0, "{line}");
    assert_eq!(out.u64("gatecall", "held"), 1, "a call through the spare waited at the closed gate: {line}");
    assert_eq!(out.u64("gatecall", "after"), 16, "and went through after open: {line}");
    assert_eq!(out.nth_u64("gatestate", 1, "fast"), 1, "a spare keeps the process fast-suspendable:\n{out}");
    assert_eq!(out.nth_u64("gatestate", 1, "unknown"), 0, "{out}");
    assert_eq!(out.nth_u64("gatestate", 1, "spares"), 1, "{out}");
}

/// With every spare taken (none left here, `GPUSLICE_TEST_GATE_SPARES=0`), such a function is
/// handed out bare: its calls bypass the gate, so the process is not fast-suspendable.
#[test]
fn with_no_spare_left_a_driver_function_outside_the_table_makes_the_process_not_fast_suspendable() {
    let sim = Sim::new();
    let out = gated(&sim, Route::Dlsym).env("GPUSLICE_TEST_GATE_SPARES", 0).args("init ctx 0 gatestate dlsym cuSimcudaUnlisted gatestate").run();
    out.assert_all_ok();
    assert_eq!(out.nth_u64("gatestate", 0, "fast"), 1, "{out}");
    assert_eq!(out.nth_u64("gatestate", 1, "fast"), 0, "an unknown name was handed out bare:\n{out}");
    assert_eq!(out.nth_u64("gatestate", 1, "unknown"), 1, "{out}");
    assert!(out.stderr.contains("bypass the gate"), "{}", out.stderr);
}

#[test]
fn the_test_knob_is_refused_without_its_variable() {
    let sim = Sim::new();
    let out = sim.client(Route::Link).shim().args("init ctx 0 gatestate").run();
    out.assert_all_ok();
    assert_eq!(out.get("gatestate", "fast").as_deref(), Some(&*i64::MIN.to_string()), "{out}");
}
