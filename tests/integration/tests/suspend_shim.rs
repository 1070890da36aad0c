//! Issue 22's own suspend path, on the simulated driver: a group with `suspend_path = "shim"`
//! (or `"auto"`) has its members' `cuMemAlloc` served VMM-backed, and is suspended by each
//! member's agent (copy to host, release, re-create at the same address) rather than by the
//! driver's checkpoint. The simulated driver keeps the bytes of mapped VMM memory and answers
//! CUDA_ERROR_ILLEGAL_ADDRESS for a range with nothing mapped, so the round trip is proven on
//! the data, and the release on the device's free memory (NVML) and on that error.
//!
//! No judgement here is of time: a call "waits" when its line has not appeared while the group
//! is suspended and appears after the resume.

use gpuslice_integration::*;
use std::time::Duration;

/// Each context's own memory (the simulated driver's `SIMCUDA_CTX_RESERVE`).
const R: u64 = 64 * MIB;
/// The simulated driver's VMM granularity.
const GRAN: u64 = 2 * MIB;

fn machine() -> Sim {
    Sim::new().env("SIMCUDA_DEVICES", 1).env("SIMCUDA_MEM", "4G").env("SIMCUDA_CTX_RESERVE", R)
}

fn shim_config(path: &str) -> String {
    format!("[groups.fast]\nsuspendable = true\nsuspend_path = \"{path}\"\n")
}

/// A member of `group` with a 5 MiB allocation (id 1) holding a pattern; after `go` it runs
/// `then`, then waits for `done`.
fn member(sim: &Sim, ctl: &Controller<'_>, group: &str, go: &str, then: &str, done: &str) -> Running {
    let t = sim
        .client(Route::Dlsym)
        .shim()
        .controller(ctl)
        .group(group)
        .env("GPUSLICE_LOG", "info")
        .args(&format!("init ctx 0 alloc 5M pokepat 1 7 peekpat 1 7 range 1 waitfile {go} {then} waitfile {done} freeall"))
        .spawn();
    let peek = t.wait_line("peekpat", 0);
    // bad=5222400 (every byte zero) is a plain cuMemAlloc: the simulator keeps no bytes of one
    // over 1 MiB, so this also says that the allocation was VMM-backed.
    assert!(peek.contains("bad=0"), "the pattern reads back before anything: {peek}");
    t
}

#[test]
fn data_survives_a_suspension_by_the_shim_bit_exact_and_calls_wait_for_the_resume() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let waiter = member(&sim, &ctl, "fast", &go, "launch 1 1000 sync peekpat 1 7", &done);
    let range = waiter.wait_line("range", 0);
    assert!(range.contains("base_ok=1 size=5242880"), "cuMemGetAddressRange answers the allocation as asked for, not the rounded mapping: {range}");
    // A second member reads its memory during the suspension through an entry point the shim
    // does not hook (a thunked `cuMemcpyDtoH`): it must wait at the gate, never touch the
    // released range (which would be CUDA_ERROR_ILLEGAL_ADDRESS, 700).
    let reader = member(&sim, &ctl, "fast", &go, "peekpat 1 7", &done);
    let rounded = (5 * MIB).div_ceil(GRAN) * GRAN; // 6 MiB
    assert_eq!(sim.device_free(), 4 * GIB - 2 * (R + rounded), "VMM-backed: the device holds the rounded size");
    let l = ctl.ls();
    assert_eq!(l.group_used("fast", 0), 2 * (R + 5 * MIB), "the ledger is charged what was asked for: {l}");

    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(out.success(), "{out}\n{}", ctl.log());
    assert!(out.lines.join("\n").contains("(shim path, "), "{out}");
    assert_eq!(sim.device_free(), 4 * GIB - 2 * R, "the allocations left the device; the contexts stay");
    let l = ctl.ls();
    let r = l.suspension("fast");
    assert_eq!(r["state"], "suspended", "{l}");
    assert_eq!(r["path"], "shim", "{l}");
    assert_eq!(r["suspend_path"], "shim", "{l}");
    assert!(r["suspend_gbps"].as_f64().is_some_and(|g| g > 0.0), "{l}");
    assert_eq!(l.group_used("fast", 0), 2 * (R + 5 * MIB), "its quota still counts what it holds: {l}");
    let table = ctl.cli("ls").run();
    assert!(table.lines.iter().any(|line| line.starts_with("fast") && line.contains("shim") && line.contains("GB/s")), "{table}");

    touch(&go);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.lines_now().iter().any(|l| l.starts_with("ok launch")), "a launch went through while suspended: {:?}", waiter.lines_now());
    assert!(
        reader.lines_now().iter().filter(|l| l.contains(" peekpat")).count() < 2,
        "an unhooked copy went through while suspended: {:?}",
        reader.lines_now()
    );

    let out = ctl.cli("resume").args("--group fast").run();
    assert!(out.success(), "{out}\n{}", ctl.log());
    expect_ok(&waiter.wait_line("launch", 0));
    let peek = waiter.wait_line("peekpat", 1);
    assert!(peek.contains("bad=0"), "every byte came back at the same address: {peek}");
    let peek = reader.wait_line("peekpat", 1);
    assert!(peek.contains("bad=0"), "the unhooked copy waited for the resume and read every byte: {peek}");
    assert_eq!(sim.device_free(), 4 * GIB - 2 * (R + rounded), "everything came back");
    let r = ctl.ls().suspension("fast");
    assert_eq!(r["state"], "running");
    assert!(r["resume_gbps"].as_f64().is_some(), "{r}");
    touch(&done);
    waiter.wait().assert_all_ok();
    reader.wait().assert_all_ok();
}

#[test]
fn legacy_ipc_of_vmm_backed_memory_is_refused_with_a_reason() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let out = sim.client(Route::Dlsym).shim().controller(&ctl).group("fast").args("init ctx 0 alloc 4M ipcget 1 freeall").run();
    let line = out.lines.iter().find(|l| l.contains(" ipcget")).cloned().unwrap_or_default();
    assert!(line.contains("code=801"), "{out}");
    assert!(out.stderr.contains("cuIpcGetMemHandle refused") && out.stderr.contains("suspend_path"), "{}", out.stderr);
}

#[test]
fn a_member_that_dies_while_suspended_by_its_agent_frees_everything() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let mut t = member(&sim, &ctl, "fast", &go, "info", &done);
    ctl.cli("suspend").args("--group fast").run().assert_success();
    assert_eq!(sim.device_free(), 4 * GIB - R);
    t.kill();
    let _ = t.wait();
    sim.client(Route::Link).args("init ctx 0").run().assert_all_ok();
    let (l, _) = ctl
        .ls_until("the dead member's suspension is gone", Duration::from_secs(10), |l| l.suspension("fast")["state"] == "running" && l.processes().is_empty());
    assert_eq!(l.suspension("fast")["host_bytes"].as_u64(), Some(0), "{l}");
    assert_eq!(sim.device_free(), 4 * GIB, "its context went with it, and nothing else was left");
}

#[test]
fn a_resume_without_room_fails_cleanly_and_a_retry_succeeds() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = sim
        .client(Route::Dlsym)
        .shim()
        .controller(&ctl)
        .group("fast")
        .args(&format!("init ctx 0 alloc 4M alloc 512M pokepat 1 9 waitfile {go} peekpat 1 9 waitfile {done} freeall"))
        .spawn();
    expect_ok(&t.wait_line("pokepat", 0));
    ctl.cli("suspend").args("--group fast").run().assert_success();
    // Someone else takes the room meanwhile.
    let (filled, release) = (sim.path_str("filled"), sim.path_str("release"));
    let filler = sim.client(Route::Link).args(&format!("init ctx 0 alloc 3600M touch {filled} waitfile {release} freeall")).spawn();
    expect_ok(&filler.wait_line("alloc", 0));
    let out = ctl.cli("resume").args("--group fast").run();
    assert!(!out.success() && out.stderr.contains("no room on the device"), "{out}\n{}", ctl.log());
    let l = ctl.ls();
    assert_eq!(l.suspension("fast")["state"], "suspended", "it stays suspended, its copy kept: {l}");
    assert_eq!(sim.device_free(), 4 * GIB - R - (R + 3600 * MIB), "the failed attempt left nothing on the device");
    touch(&release);
    filler.wait().assert_all_ok();
    ctl.cli("resume").args("--group fast").run().assert_success();
    touch(&go);
    let peek = t.wait_line("peekpat", 0);
    assert!(peek.contains("bad=0"), "the retry brought every byte back: {peek}");
    touch(&done);
    t.wait().assert_all_ok();
}

#[test]
fn a_restarted_controller_adopts_members_its_predecessor_suspended_by_the_shim() {
    let sim = machine();
    let mut ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = member(&sim, &ctl, "fast", &go, "peekpat 1 7", &done);
    ctl.cli("suspend").args("--group fast").run().assert_success();
    ctl.kill9();
    ctl.restart();
    let (l, _) = ctl.ls_until("the restarted controller finds the suspension", Duration::from_secs(10), |l| l.suspension("fast")["state"] == "suspended");
    assert_eq!(l.suspension("fast")["path"], "shim", "{l}");
    assert!(ctl.log().contains("found suspended by their own agents"), "{}", ctl.log());
    ctl.cli("resume").args("--group fast").run().assert_success();
    touch(&go);
    assert!(t.wait_line("peekpat", 1).contains("bad=0"));
    touch(&done);
    t.wait().assert_all_ok();
}

#[test]
fn auto_takes_the_shim_for_vmm_backed_members_and_the_driver_for_the_rest() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("auto"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let vmm = member(&sim, &ctl, "fast", &go, "peekpat 1 7", &done);
    // Managed memory is not VMM-backed by the shim: its agent cannot move it.
    let other = sim
        .client(Route::Dlsym)
        .shim()
        .controller(&ctl)
        .group("fast")
        .env("GPUSLICE_LOG", "info")
        .args(&format!("init ctx 0 alloc 4M managed 8M waitfile {go} info waitfile {done} freeall"))
        .spawn();
    expect_ok(&other.wait_line("managed", 0));
    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(out.success() && out.lines.join("\n").contains("(shim+driver path, "), "{out}\n{}", ctl.log());
    assert_eq!(sim.device_free(), 4 * GIB - R, "the driver took the other member's context too; the agent left its own");
    assert_eq!(ctl.ls().suspension("fast")["path"], "shim+driver");
    assert!(!other.stderr_now().contains("by its agent"), "the driver's member was not addressed: its agent did not move too:\n{}", other.stderr_now());
    let err = vmm.stderr_when(|e| e.contains("suspended by its agent"));
    assert!(err.contains("suspended by its agent"), "{err}");
    ctl.cli("resume").args("--group fast").run().assert_success();
    assert_eq!(ctl.ls().suspension("fast")["resume_path"], "shim+driver", "each member came back by its own path");
    touch(&go);
    assert!(vmm.wait_line("peekpat", 1).contains("bad=0"));
    expect_ok(&other.wait_line("info", 0));
    touch(&done);
    vmm.wait().assert_all_ok();
    other.wait().assert_all_ok();
}

/// What VMM backing costs an allocation on the simulated driver (a figure for docs/NOTES.md,
/// not a judgement): `cargo test -p gpuslice-integration --test suspend_shim
/// alloc_and_free_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn alloc_and_free_cost() {
    let sim = machine();
    let ctl = sim.controller_with_config(&format!("{}[groups.plain]\nsuspendable = true\n", shim_config("shim")));
    for size in ["4096", "64M"] {
        for group in ["plain", "fast", "plain", "fast"] {
            let out = sim.client(Route::Link).shim().controller(&ctl).group(group).args(&format!("init ctx 0 allocbench 20000 {size}")).run();
            out.assert_all_ok();
            println!(
                "group {group} ({}) size {size}: {} ns per cuMemAlloc + cuMemFree",
                if group == "fast" { "VMM-backed" } else { "driver allocator" },
                out.u64("allocbench", "ns")
            );
        }
    }
}

/// `gpuslice set --suspend-path` puts a running group on the shim's path: a process that starts
/// after it is VMM-backed (its 5 MiB take 6 MiB of the device); the setting outlives a restart.
#[test]
fn set_puts_a_group_on_the_shim_path_and_a_restart_keeps_it() {
    let sim = machine();
    let mut ctl = sim.controller();
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let first = sim.client(Route::Link).shim().controller(&ctl).group("web").args(&format!("init ctx 0 alloc 5M waitfile {done}")).spawn();
    expect_ok(&first.wait_line("alloc", 0));
    assert_eq!(sim.device_free(), 4 * GIB - R - 5 * MIB, "the driver's allocator, before the mark");
    let out = ctl.set("--group web --suspendable true --suspend-path fast");
    assert!(!out.success() && out.stderr.contains("not a suspend path"), "{out}");
    let out = ctl.set_ok("--group web --suspendable true --suspend-path shim");
    assert!(out.contains("suspend path shim"), "{out}");
    let later = member(&sim, &ctl, "web", &go, "peekpat 1 7", &done);
    assert_eq!(sim.device_free(), 4 * GIB - 2 * R - 5 * MIB - 6 * MIB, "the newcomer is VMM-backed");
    // The first member runs no agent: the shim path refuses the group, `auto` takes the driver for it.
    let out = ctl.cli("suspend").args("--group web").run();
    assert!(!out.success() && out.stderr.contains("runs no suspend agent"), "{out}");
    ctl.kill9();
    ctl.restart();
    let (l, _) = ctl.ls_until("the restarted controller keeps the path", Duration::from_secs(10), |l| l.suspension("web")["suspend_path"] == "shim");
    assert_eq!(l.suspension("web")["suspendable"], true, "{l}");
    ctl.set_ok("--group web --suspendable true --suspend-path auto");
    let out = ctl.cli("suspend").args("--group web").run();
    assert!(out.success() && out.lines.join("\n").contains("(shim+driver path, "), "{out}\n{}", ctl.log());
    ctl.cli("resume").args("--group web").run().assert_success();
    touch(&go);
    assert!(later.wait_line("peekpat", 1).contains("bad=0"));
    touch(&done);
    first.wait().assert_all_ok();
    later.wait().assert_all_ok();
}

/// A member of group "fast" with 5 MiB the agent moves and 100 MiB of managed memory it cannot
/// (with `env` besides), its pattern written; after `go` it launches and reads the pattern back.
fn member_with_managed_memory(sim: &Sim, ctl: &Controller<'_>, env: &[(&str, &str)], go: &str, done: &str) -> Running {
    let mut c = sim.client(Route::Dlsym).shim().controller(ctl).group("fast");
    for (k, v) in env {
        c = c.env(k, v);
    }
    let t = c.args(&format!("init ctx 0 alloc 5M managed 100M pokepat 1 7 waitfile {go} launch 1 1000 sync peekpat 1 7 waitfile {done} freeall")).spawn();
    expect_ok(&t.wait_line("pokepat", 0));
    t
}

/// After the resume: `member_with_managed_memory`'s program launches again and reads every byte
/// back (`also` checks more before it ends), and ends well.
fn runs_on_intact(t: Running, go: &str, done: &str, also: impl FnOnce(&Running)) {
    touch(go);
    let launched = t.wait_for("the launch after the resume", Duration::from_secs(20), |l| line_cmd(l) == "launch");
    expect_ok(&launched);
    assert!(t.wait_line("peekpat", 0).contains("bad=0"), "every byte came back");
    also(&t);
    touch(done);
    t.wait().assert_all_ok();
}

/// The GPU's case (docs/NOTES.md, "Issue 22: never stack the two paths"): the process holds
/// device memory its shim does not know of (on the H100, driver-internal allocations; here 100
/// MiB of managed memory left out of its report), so that after its agent moved everything it
/// could, NVML still shows more than the context. The controller must accept the agent's work
/// (what stays was on the device beyond the report before the suspension too) — before the
/// fix it checkpointed the process by the driver on top of the agent's suspension, restored it
/// by the driver only, and the program hung at the closed gate for good.
#[test]
fn memory_the_shim_does_not_know_of_does_not_make_the_controller_stack_the_driver_on_the_agent() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = member_with_managed_memory(&sim, &ctl, &[("GPUSLICE_TEST_UNDERREPORT_BYTES", "100M")], &go, &done);
    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(out.success(), "{out}\n{}", ctl.log());
    let log = ctl.log();
    assert!(!log.contains("the driver's checkpoint suspends it"), "the agent's work is accepted, not stacked on:\n{log}");
    assert_eq!(ctl.ls().suspension("fast")["path"], "shim", "{}", ctl.ls());
    ctl.cli("resume").args("--group fast").run().assert_success();
    runs_on_intact(t, &go, &done, |_| {});
}

/// A member whose "suspended" NVML does not bear out (here its agent says it keeps nothing on
/// the device, `GPUSLICE_TEST_SUSPEND_KEEP_BYTES=0`, while 100 MiB of managed memory stay) is
/// first brought back by its agent, and only then checkpointed by the driver; the resume
/// takes the driver's path back, and the program runs on with every byte.
#[test]
fn a_disbelieved_agent_is_brought_back_before_the_driver_checkpoints_it() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = member_with_managed_memory(&sim, &ctl, &[("GPUSLICE_TEST_SUSPEND_KEEP_BYTES", "0"), ("GPUSLICE_LOG", "info")], &go, &done);
    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(out.success() && out.lines.join("\n").contains("(driver path, "), "{out}\n{}", ctl.log());
    let log = ctl.log();
    assert!(log.contains("its agent is asked back, then the driver's checkpoint suspends it"), "{log}");
    let stderr = t.stderr_when(|e| e.contains("suspended by its agent") && e.contains("resumed by its agent"));
    let (out_at, back_at) = (stderr.find("suspended by its agent"), stderr.find("resumed by its agent"));
    assert!(out_at.is_some() && back_at > out_at, "the agent moved out, then back, before the driver's checkpoint:\n{stderr}");
    assert_eq!(sim.device_free(), 4 * GIB, "the driver's checkpoint took everything, context included");
    let l = ctl.ls();
    assert_eq!(l.suspension("fast")["path"], "driver", "{l}");
    ctl.cli("resume").args("--group fast").run().assert_success();
    assert_eq!(ctl.ls().suspension("fast")["resume_path"], "driver", "resumed by the path that suspended it");
    runs_on_intact(t, &go, &done, |t| {
        assert_eq!(t.stderr_now().matches("suspended by its agent").count(), 1, "one move out by the agent, no second one");
    });
}

/// A driver function handed out bare (no spare thunk left) would let calls bypass the gate:
/// the agent refuses to suspend (cleanly: the program runs on), the shim's path then refuses
/// the member up front, and `auto` takes the driver's checkpoint for it.
#[test]
fn a_member_with_a_hole_in_its_gate_is_refused_by_the_shim_path_and_taken_by_the_driver_under_auto() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = sim
        .client(Route::Dlsym)
        .shim()
        .controller(&ctl)
        .group("fast")
        .env("GPUSLICE_TEST_GATE", "1")
        .env("GPUSLICE_TEST_GATE_SPARES", 0)
        .args(&format!("init ctx 0 alloc 5M pokepat 1 7 dlsym cuSimcudaUnlisted waitfile {go} peekpat 1 7 waitfile {done} freeall"))
        .spawn();
    expect_ok(&t.wait_line("dlsym", 0));
    // The agent announced itself before the function was handed out: it refuses at the request.
    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(!out.success() && out.stderr.contains("bypasses the suspend gate") && out.stderr.contains("run on"), "{out}\n{}", ctl.log());
    assert_eq!(ctl.ls().suspension("fast")["state"], "running");
    // Now its caps say so: the shim's path refuses it before asking.
    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(!out.success() && out.stderr.contains("bypasses the suspend gate") && out.stderr.contains("suspend-path auto"), "{out}");
    ctl.set_ok("--group fast --suspendable true --suspend-path auto");
    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(out.success() && out.lines.join("\n").contains("(driver path, "), "{out}\n{}", ctl.log());
    ctl.cli("resume").args("--group fast").run().assert_success();
    touch(&go);
    assert!(t.wait_line("peekpat", 0).contains("bad=0"));
    touch(&done);
    t.wait().assert_all_ok();
}

/// `ls --json` carries each agent's figures: what it moved, what it keeps, NVML's reading and
/// where the time went, out and back.
#[test]
fn the_suspension_row_carries_each_agents_time_split() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = member(&sim, &ctl, "fast", &go, "peekpat 1 7", &done);
    ctl.cli("suspend").args("--group fast").run().assert_success();
    let r = ctl.ls().suspension("fast");
    let agents = r["agents"].as_array().cloned().unwrap_or_default();
    assert_eq!(agents.len(), 1, "{r}");
    let a = &agents[0];
    assert_eq!(a["pid"].as_u64(), Some(u64::from(t.pid())), "{a}");
    assert_eq!(a["bytes"].as_u64(), Some(6 * MIB), "the rounded mapping moved: {a}");
    assert_eq!(a["ranges"].as_u64(), Some(1), "{a}");
    assert_eq!(a["keep"].as_u64(), Some(R), "it keeps its context: {a}");
    assert_eq!(a["nvml_after"].as_u64(), Some(R), "{a}");
    for phase in ["gate", "sync", "pin", "copy_out", "release"] {
        assert!(a["phases_ms"][phase].as_f64().is_some(), "{phase}: {a}");
    }
    assert!(a["phases_ms"].get("copy_in").is_none(), "no resume yet: {a}");
    ctl.cli("resume").args("--group fast").run().assert_success();
    let r = ctl.ls().suspension("fast");
    let a = &r["agents"][0];
    for phase in ["map", "copy_in", "host_free"] {
        assert!(a["phases_ms"][phase].as_f64().is_some(), "{phase}: {a}");
    }
    assert!(a["resume_ms"].as_f64().is_some(), "{a}");
    assert_eq!(r["resume_path"], "shim", "{r}");
    let log = ctl.log();
    assert!(log.contains("suspended by its agent") && log.contains("copy_out") && log.contains("GB/s"), "{log}");
    touch(&go);
    touch(&done);
    t.wait().assert_all_ok();
}

/// A member that registers as soon as the controller answers is VMM-backed by the config
/// file's marks, however late the suspension policy's thread starts (here 5 s late, as a
/// loaded machine may start it). The marks used to be that thread's to read: a member answered
/// before it ran found none on its page, served its memory from the driver and ran no agent
/// (on the simulator, a plain allocation over 1 MiB keeps no bytes, so `member`'s first
/// reading failed with `bad=5222400`; `suspend` then refused "runs no suspend agent").
#[test]
fn a_member_registered_before_the_policy_thread_runs_is_vmm_backed_by_the_config_marks() {
    let sim = machine().controller_env("GPUSLICE_TEST_POLICY_DELAY_MS", 5000);
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let t = member(&sim, &ctl, "fast", &go, "peekpat 1 7", &done);
    assert_eq!(sim.device_free(), 4 * GIB - R - 6 * MIB, "VMM-backed: the device holds the rounded size, not the 5 MiB a plain cuMemAlloc takes");
    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(out.success() && out.lines.join("\n").contains("(shim path, "), "{out}\n{}", ctl.log());
    assert_eq!(sim.device_free(), 4 * GIB - R, "its agent moved the allocation out");
    ctl.cli("resume").args("--group fast").run().assert_success();
    touch(&go);
    let peek = t.wait_line("peekpat", 1);
    assert!(peek.contains("bad=0"), "every byte came back: {peek}");
    touch(&done);
    t.wait().assert_all_ok();
}

/// A member on a tiny staging ring (3 slots of 768 KiB, 2 workers: every range is larger than
/// the ring or no multiple of a slot) with `ids` allocations of `sizes`, each holding pattern
/// `id`; a second context holds the last two. After each file of `gos` it reads every pattern
/// back.
fn ring_member(sim: &Sim, ctl: &Controller<'_>, extra_env: &[(&str, &str)], gos: &[&str], done: &str) -> (Running, usize) {
    let sizes = ["5M", "3M", "1M", "700K", "9M", "6M", "2M"];
    let mut script = String::from("init ctx 0");
    for (i, s) in sizes.iter().enumerate() {
        if i == 5 {
            script += " ctxcreate 0";
        }
        script += &format!(" alloc {s} pokepat {id} {id}", id = i + 1);
    }
    let peeks: String = (1..=sizes.len()).map(|id| format!(" peekpat {id} {id}")).collect();
    for go in gos {
        script += &format!(" waitfile {go}{peeks}");
    }
    script += &format!(" waitfile {done} freeall");
    let mut c = sim
        .client(Route::Dlsym)
        .shim()
        .controller(ctl)
        .group("fast")
        .env("GPUSLICE_LOG", "info")
        .env("GPUSLICE_SUSPEND_RING", "3x768K")
        .env("GPUSLICE_SUSPEND_WORKERS", 2);
    for (k, v) in extra_env {
        c = c.env(k, v);
    }
    let t = c.args(&script).spawn();
    expect_ok(&t.wait_line("pokepat", sizes.len() - 1));
    (t, sizes.len())
}

/// Every pattern of `ring_member` reads back intact in the `round`-th reading (from 1).
fn all_intact(t: &Running, n: usize, round: usize) {
    for i in 0..n {
        let peek = t.wait_line("peekpat", (round - 1) * n + i);
        assert!(peek.contains("bad=0"), "id {}: every byte came back: {peek}", i + 1);
    }
}

#[test]
fn the_staging_ring_moves_ranges_larger_than_itself_bit_exact_in_two_contexts() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, go2, done) = (sim.path_str("go"), sim.path_str("go2"), sim.path_str("done"));
    let (t, n) = ring_member(&sim, &ctl, &[], &[&go, &go2], &done);
    for round in 0..2 {
        let out = ctl.cli("suspend").args("--group fast").run();
        assert!(out.success(), "{out}\n{}", ctl.log());
        // 6 + 4 + 2 + 2 + 10 + 6 + 2 MiB, the rounded mappings.
        assert_eq!(sim.device_free(), 4 * GIB - 2 * R, "every allocation left the device; the two contexts stay");
        let r = ctl.ls().suspension("fast");
        assert_eq!(r["agents"][0]["bytes"].as_u64(), Some(32 * MIB), "{r}");
        for phase in ["ring", "host_alloc", "memcpy_out"] {
            assert!(r["agents"][0]["phases_ms"][phase].as_f64().is_some(), "{phase}: {r}");
        }
        ctl.cli("resume").args("--group fast").run().assert_success();
        assert!(ctl.ls().suspension("fast")["agents"][0]["phases_ms"]["memcpy_in"].as_f64().is_some());
        touch(if round == 0 { &go } else { &go2 });
        all_intact(&t, n, round + 1);
    }
    let err = t.stderr_when(|e| e.matches("by its agent").count() >= 4);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("by its agent")).collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(lines.iter().all(|l| l.contains("path: staging ring 3 × ") && l.contains("2 workers")), "the ring ran every time: {lines:?}");
    assert_eq!(err.matches("staging ring of 3").count(), 1, "the ring is pinned once and kept: {err}");
    touch(&done);
    t.wait().assert_all_ok();
}

/// A device-to-host copy failing in the middle of the ring's move leaves everything mapped and
/// the program running with its data; a host-to-device copy failing in the middle of the
/// resume keeps the host copies and the process suspended, and the retry brings every byte.
#[test]
fn a_copy_failing_mid_ring_keeps_all_or_nothing() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, go2, done) = (sim.path_str("go"), sim.path_str("go2"), sim.path_str("done"));
    // 45 pieces of at most 768 KiB out and back: the 5th and the 7th fail.
    let (t, n) = ring_member(&sim, &ctl, &[("SIMCUDA_FAIL_DTOH_ASYNC", "5"), ("SIMCUDA_FAIL_HTOD_ASYNC", "7")], &[&go, &go2], &done);
    let before = sim.device_free();
    let out = ctl.cli("suspend").args("--group fast").run();
    assert!(!out.success(), "the injected failure fails the suspension: {out}");
    assert_eq!(sim.device_free(), before, "nothing was released");
    assert_eq!(ctl.ls().suspension("fast")["state"], "running", "{}", ctl.log());
    touch(&go);
    all_intact(&t, n, 1);

    ctl.cli("suspend").args("--group fast").run().assert_success();
    let out = ctl.cli("resume").args("--group fast").run();
    assert!(!out.success(), "the injected failure fails the resume: {out}");
    assert_eq!(ctl.ls().suspension("fast")["state"], "suspended", "it stays suspended, its copies kept");
    assert_eq!(sim.device_free(), 4 * GIB - 2 * R, "the failed attempt left nothing on the device");
    ctl.cli("resume").args("--group fast").run().assert_success();
    touch(&go2);
    all_intact(&t, n, 2);
    let err = t.stderr_when(|e| e.contains("suspension failed (driver code 999)") && e.contains("resume failed (driver code 999)"));
    assert!(err.contains("suspension failed (driver code 999)") && err.contains("resume failed (driver code 999)"), "{err}");
    touch(&done);
    t.wait().assert_all_ok();
}

/// With the ring off the agent pins each range whole (the fallback it also takes when the ring
/// cannot be pinned), and says so.
#[test]
fn with_the_ring_off_the_agent_pins_whole_ranges_and_says_so() {
    let sim = machine();
    let ctl = sim.controller_with_config(&shim_config("shim"));
    let (go, done) = (sim.path_str("go"), sim.path_str("done"));
    let (t, n) = ring_member(&sim, &ctl, &[("GPUSLICE_SUSPEND_RING", "off")], &[&go], &done);
    ctl.cli("suspend").args("--group fast").run().assert_success();
    assert_eq!(sim.device_free(), 4 * GIB - 2 * R);
    ctl.cli("resume").args("--group fast").run().assert_success();
    touch(&go);
    all_intact(&t, n, 1);
    let err = t.stderr_when(|e| e.contains("path: whole ranges pinned (GPUSLICE_SUSPEND_RING=off)") && e.contains("path: whole ranges pinned)"));
    assert!(err.contains("path: whole ranges pinned (GPUSLICE_SUSPEND_RING=off)") && err.contains("path: whole ranges pinned)"), "{err}");
    assert!(!err.contains("staging ring"), "{err}");
    touch(&done);
    t.wait().assert_all_ok();
}
