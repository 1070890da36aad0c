//! The controller (`gpuslice serve`) with real processes against the simulated driver: group
//! limits raced by many processes, members killed mid-allocation, live edits of limits and
//! shares, the controller itself killed and restarted under load, bad configs, who may edit,
//! `gpuslice run`, and the shim without a controller.
//!
//! Every test has its own simulated machine, socket and ledger (in its temporary directory),
//! so they run in parallel; only the SM-share measurement runs alone (it measures wall time).

use gpuslice_integration::*;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// Context reserve of the simulated driver in these tests: what each process's primary context
/// holds, and what the shim counts as its overhead.
const R: u64 = 64 * MIB;

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_CTX_RESERVE", R)
}

/// The share measurement needs the machine to itself (see sm_share.rs); everything else shares.
static TIMING: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    TIMING.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    TIMING.write().unwrap_or_else(|p| p.into_inner())
}

fn path(sim: &Sim, name: &str) -> String {
    sim.path_str(name)
}

fn expect_oom(line: &str) {
    assert_eq!(line_code(line), Some(CUDA_ERROR_OUT_OF_MEMORY), "expected CUDA_ERROR_OUT_OF_MEMORY, got `{line}`");
}

// ---------------------------------------------------------------------------------- 1. races

/// `n` processes of group "race" start allocating `chunk`s at the same instant (a go-file) and
/// go on until refused. The group's limit holds exactly: used = what was granted plus the
/// contexts' reserves, never over the limit, and back to zero when they exit.
fn race(n: usize, limit: u64, chunk: u64, by_config: bool) {
    let _t = shared();
    let sim = sim();
    let ctl = if by_config {
        sim.controller_with_config(&format!("[groups.race]\nmemory_limit = \"{}MiB\"\n", limit / MIB))
    } else {
        let c = sim.controller();
        c.set_ok(&format!("--create --group race --memory {limit}"));
        c
    };
    // The group exists before any member (no device rows yet: no device has been seen).
    let l = ctl.ls();
    assert!(l.group("race").is_some_and(|g| g["members"].as_array().is_some_and(Vec::is_empty)), "{l}");
    let (go, done) = (path(&sim, "go"), path(&sim, "done"));
    let clients: Vec<Running> = (0..n)
        .map(|i| {
            sim.client(Route::ALL[i % 4]).shim().controller(&ctl).group("race").args(&format!("init ctx 0 waitfile {go} fill {chunk} waitfile {done}")).spawn()
        })
        .collect();
    for c in &clients {
        expect_ok(&c.wait_line("ctx", 0));
    }
    let mut pids: Vec<u32> = clients.iter().map(Running::pid).collect();
    pids.sort_unstable();
    let l = ctl.ls();
    assert_eq!(l.members("race"), pids, "every client registered in the group:\n{l}");
    assert_eq!(l.group_limit("race", 0), Some(limit), "{l}");
    assert_eq!(l.group_used("race", 0), n as u64 * R, "the contexts' reserves before the race:\n{l}");
    assert_eq!(l.group_device("race", 0)["uuid"], sim.device_uuid(0), "{l}");

    touch(&go);
    let granted: Vec<u64> = clients
        .iter()
        .map(|c| {
            let line = c.wait_line("fill", 0);
            assert!(line_ok(&line) && num(&line, "err") == CUDA_ERROR_OUT_OF_MEMORY as u64, "each client fills until refused: `{line}`");
            assert_eq!(num(&line, "bytes"), num(&line, "count") * chunk);
            num(&line, "bytes")
        })
        .collect();
    // Everyone holds what they got: the listing is exact.
    let l = ctl.ls();
    let used = l.group_used("race", 0);
    let total: u64 = granted.iter().sum::<u64>() + n as u64 * R;
    assert_eq!(used, total, "group used = chunks granted {granted:?} + {n} reserves of {R}:\n{l}");
    for (c, g) in clients.iter().zip(&granted) {
        assert_eq!(l.process_used(c.pid(), 0), g + R, "pid {}: its chunks plus its reserve:\n{l}", c.pid());
        assert_eq!(l.process_overhead(c.pid(), 0), R, "{l}");
    }
    assert!(used <= limit, "over the limit: {used} > {limit}");
    assert!(used > limit - chunk, "refused with room for another chunk: {used} of {limit}, chunk {chunk}");
    let peak = l.group_peak("race", 0);
    assert!(peak <= limit, "the group's peak {peak} went over its limit {limit}:\n{l}");
    assert!(peak >= used, "{l}");
    assert_eq!(l.group_refusals("race", 0), n as u64, "one refusal per client:\n{l}");

    touch(&done);
    for c in clients {
        c.wait().assert_all_ok();
    }
    let (l, _) = ctl.ls_until("the race's members gone", Duration::from_secs(2), |l| l.members("race").is_empty() && l.pids().is_empty());
    assert_eq!(l.group_used("race", 0), 0, "everything returned:\n{l}");
    assert!(l.group_peak("race", 0) <= limit, "{l}");
}

#[test]
fn two_processes_race_for_a_group_limit_from_the_config() {
    race(2, GIB, 5 * MIB + 12345, true);
}

#[test]
fn eight_processes_race_for_a_group_limit_set_live() {
    race(8, 2 * GIB, 3 * MIB + 4321, false);
}

// ------------------------------------------------------------------------ 2. a member killed

/// Members killed with SIGKILL in the middle of an alloc/free loop: within a second the group
/// counts exactly what the survivors hold, and the dead process is gone from `ls`.
#[test]
fn a_member_killed_mid_allocation_is_taken_out_within_a_second() {
    let _t = shared();
    let sim = sim();
    let ctl = sim.controller();
    ctl.set_ok("--create --group kill --memory 8GiB");
    let done = path(&sim, "done");
    let never = path(&sim, "never");
    let survivors: Vec<Running> = [(Route::Link, 100 * MIB), (Route::Procaddr, 200 * MIB)]
        .into_iter()
        .map(|(route, bytes)| sim.client(route).shim().controller(&ctl).group("kill").args(&format!("init ctx 0 alloc {bytes} waitfile {done}")).spawn())
        .collect();
    for s in &survivors {
        expect_ok(&s.wait_line("alloc", 0));
    }
    let held = 2 * R + 300 * MIB;
    // One thread allocating and freeing in a loop, or four at once (more likely to be killed
    // with an accounting operation half done); they run until killed.
    let one = format!("churn 1M {never}");
    let four = "threads 4 1000000000 1M".to_string();
    let rounds = [(Route::Link, &one), (Route::Dlsym, &four), (Route::ProcaddrPtsz, &one), (Route::Procaddr, &four)];
    for (round, (route, churn)) in rounds.into_iter().enumerate() {
        let mut victim = sim.client(route).shim().controller(&ctl).group("kill").args(&format!("init ctx 0 alloc 300M {churn}")).spawn();
        expect_ok(&victim.wait_line("alloc", 0));
        let pid = victim.pid();
        // It has churned at least once: its peak is over what it holds between rounds.
        ctl.ls_until("the victim churning", Duration::from_secs(5), |l| l.process(pid).is_some_and(|_| l.process_peak(pid, 0) > R + 300 * MIB));
        victim.kill();
        let killed = std::time::Instant::now();
        let _ = victim.wait();
        let (l, took) = ctl.ls_until("the victim's bytes returned", Duration::from_secs(3), |l| l.process(pid).is_none() && l.group_used("kill", 0) == held);
        eprintln!("round {round} ({route}, {churn}): pid {pid} killed; group exact again after {took:?} ({:?} after the kill)", killed.elapsed());
        assert!(killed.elapsed() <= Duration::from_secs(1), "took {:?} (> 1 s) to return a killed member's bytes:\n{l}", killed.elapsed());
        let by_rows: u64 = survivors.iter().map(|s| l.process_used(s.pid(), 0)).sum();
        assert_eq!(by_rows, held, "{l}");
        let mut pids: Vec<u32> = survivors.iter().map(Running::pid).collect();
        pids.sort_unstable();
        assert_eq!(l.members("kill"), pids, "{l}");
        assert!(ctl.log().contains(&format!("pid {pid} exited")), "the controller logs the exit:\n{}", ctl.log());
    }
    touch(&done);
    for s in survivors {
        s.wait().assert_all_ok();
    }
}

// ------------------------------------------------------------------------- 3. live edits

/// A process refused at the group's limit gets its allocation as soon as the limit is raised
/// (measured: within 100 ms); a limit lowered under the group's use refuses new allocations
/// and kills nothing, until frees bring use under it.
#[test]
fn memory_limits_edited_live() {
    let _t = shared();
    let sim = sim();
    let ctl = sim.controller();
    ctl.set_ok("--create --group edit --memory 1GiB");
    let (f1, f2) = (path(&sim, "f1"), path(&sim, "f2"));
    let c = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("edit")
        .args(&format!("init ctx 0 alloc 512M allocwait 512M 5 20000 waitfile {f1} alloc 1M free 1 alloc 128M alloc 128M waitfile {f2}"))
        .spawn();
    expect_ok(&c.wait_line("alloc", 0));
    let pid = c.pid();
    // `allocwait` has been refused at least once: R + 512M + 512M > 1 GiB.
    let (l, _) = ctl.ls_until("the client refused at the limit", Duration::from_secs(5), |l| l.group_refusals("edit", 0) >= 1);
    assert_eq!(l.group_used("edit", 0), R + 512 * MIB, "{l}");

    let before = monotonic_ns();
    ctl.set_ok("--create --group edit --memory 2GiB");
    let after = monotonic_ns();
    let line = c.wait_line("allocwait", 0);
    expect_ok(&line);
    let at = num(&line, "at");
    assert!(num(&line, "tries") >= 2, "it was refused before the edit: `{line}`");
    assert!(at >= before, "the allocation went through before the limit was raised: `{line}`");
    let lag = Duration::from_nanos(at - before);
    eprintln!("raised limit: effect {lag:?} after `gpuslice set` started (which took {:?})", Duration::from_nanos(after - before));
    assert!(lag <= Duration::from_millis(100), "a raised limit took {lag:?} (> 100 ms) to let the allocation through");
    let l = ctl.ls();
    assert_eq!(l.group_limit("edit", 0), Some(2 * GIB), "{l}");
    assert_eq!(l.group_used("edit", 0), R + GIB, "{l}");

    // Lower it under what the group holds: nothing is taken away, nothing is killed.
    ctl.set_ok("--create --group edit --memory 768MiB");
    let l = ctl.ls();
    assert_eq!(l.group_limit("edit", 0), Some(768 * MIB), "{l}");
    assert_eq!(l.group_used("edit", 0), R + GIB, "existing allocations stay:\n{l}");
    assert_eq!(l.members("edit"), vec![pid], "{l}");
    touch(&f1);
    // alloc 1M: refused (over the lowered limit); free 1 (512M): R + 512M = 576M;
    // alloc 128M: 704M fits; alloc 128M: 832M does not.
    expect_oom(&c.wait_line("alloc", 1));
    expect_ok(&c.wait_line("free", 0));
    expect_ok(&c.wait_line("alloc", 2));
    expect_oom(&c.wait_line("alloc", 3));
    let l = ctl.ls();
    assert_eq!(l.group_used("edit", 0), R + 640 * MIB, "{l}");
    assert_eq!(l.process_used(pid, 0), R + 640 * MIB, "{l}");
    assert!(l.group_peak("edit", 0) <= 2 * GIB, "{l}");
    touch(&f2);
    c.wait().assert_success();
}

/// Achieved share in percent of the `n`-th `elapsed` line, for `device_ns` of work.
fn achieved(out: &Output, n: usize, device_ns: u64) -> f64 {
    let ms: f64 = kv(out.nth("elapsed", n), "ms").and_then(|v| v.parse().ok()).expect("elapsed ms");
    device_ns as f64 / 1e6 / ms * 100.0
}

/// A process alone (group `pid-PID`) throttled with `gpuslice set --pid PID --sm 30`, then
/// moved to 70 while it runs: its device share follows (±2 points, as in sm_share.rs, with
/// one second measurement allowed), and `ls` shows the share.
#[test]
fn sm_share_edited_live() {
    let _t = exclusive();
    let sim = Sim::new();
    let ctl = sim.controller();
    let (f1, f2) = (path(&sim, "f1"), path(&sim, "f2"));
    // 1000 kernels of 200 µs: 200 ms of device time per measurement, after a warm-up that
    // teaches the shim the kernel and spends the bucket's saved-up burst; two measurements
    // per share.
    let (ns, n, warm) = (200_000u64, 1000u64, 22u64);
    let phase = format!("launch {warm} {ns} sync mark launch {n} {ns} sync elapsed mark launch {n} {ns} sync elapsed");
    let c = sim.client(Route::Procaddr).shim().controller(&ctl).args(&format!("init ctx 0 waitfile {f1} {phase} waitfile {f2} {phase}")).spawn();
    expect_ok(&c.wait_line("ctx", 0));
    let pid = c.pid();
    let group = format!("pid-{pid}");
    let l = ctl.ls();
    assert_eq!(l.process_group(pid), group, "{l}");
    assert_eq!(l.group_share(&group, 0), None, "{l}");

    ctl.set_ok(&format!("--pid {pid} --sm 30"));
    assert_eq!(ctl.ls().group_share(&group, 0), Some(30));
    touch(&f1);
    c.wait_line("elapsed", 1);
    ctl.set_ok(&format!("--pid {pid} --sm 70"));
    let l = ctl.ls();
    assert_eq!(l.group_share(&group, 0), Some(70), "{l}");
    touch(&f2);
    let out = c.wait();
    out.assert_all_ok();
    let work = n * ns;
    for (share, first) in [(30.0, 0), (70.0, 2)] {
        let (a, b) = (achieved(&out, first, work), achieved(&out, first + 1, work));
        eprintln!("share {share}%: achieved {a:.1}%, {b:.1}%");
        assert!((a - share).abs() <= 2.0 || (b - share).abs() <= 2.0, "share {share}% set live: achieved {a:.1}% then {b:.1}% (allowed ±2)");
    }
}

// ------------------------------------------------------------- 4. controller killed, restarted

/// The controller killed with SIGKILL while members allocate and free: they go on under the
/// limits they had (an allocation over the limit is still refused); a member killed meanwhile
/// has its bytes returned when a controller starts again on the same ledger, which lists the
/// same live processes with exact figures.
#[test]
fn controller_killed_and_restarted_under_load() {
    let _t = shared();
    let sim = sim();
    let mut ctl = sim.controller();
    ctl.set_ok("--create --group ha --memory 2GiB");
    let [stop, never, down, up, done] = ["stop", "never", "down", "up", "done"].map(|n| path(&sim, n));
    let join = |route: Route, script: String| sim.client(route).shim().controller(&ctl).group("ha").args(&script).spawn();
    let a = join(Route::Link, format!("init ctx 0 alloc 256M churn 4M {stop} waitfile {done}"));
    let b = join(Route::Procaddr, format!("init ctx 0 alloc 128M churn 4M {stop} waitfile {done}"));
    let mut v = join(Route::Dlsym, format!("init ctx 0 alloc 512M churn 4M {never}"));
    let f = join(Route::ProcaddrPtsz, format!("init ctx 0 waitfile {down} alloc 512M alloc 512M waitfile {up} alloc 512M waitfile {done}"));
    for c in [&a, &b, &v] {
        expect_ok(&c.wait_line("alloc", 0));
    }
    expect_ok(&f.wait_line("ctx", 0));
    let mut live: Vec<u32> = [&a, &b, &f].iter().map(|c| c.pid()).collect();
    live.sort_unstable();
    let mut all = live.clone();
    all.push(v.pid());
    all.sort_unstable();
    assert_eq!(ctl.ls().pids(), all);

    ctl.kill9();
    let no_answer = ctl.cli("ls").run();
    assert!(!no_answer.success(), "nothing should answer on the socket now:\n{no_answer}");
    // Without a controller: the limit still holds. Before F's allocations the group holds
    // 4 reserves + 896M (+ up to 3 × 4M being churned) = about 1.1 GiB of 2 GiB.
    touch(&down);
    expect_ok(&f.wait_line("alloc", 0));
    expect_oom(&f.wait_line("alloc", 1));
    // A member dies while no controller runs.
    let victim = v.pid();
    v.kill();
    let _ = v.wait();

    ctl.restart();
    let l = ctl.ls();
    assert_eq!(l.pids(), live, "the restarted controller lists the same live processes:\n{l}");
    assert_eq!(l.members("ha"), live, "{l}");
    assert!(
        ctl.log().contains("adopted the existing ledger: 3 processes still running, 1 gone since"),
        "the restarted controller adopts the ledger:\n{}",
        ctl.log()
    );
    assert!(ctl.log().contains(&format!("pid {victim} exited while no controller ran")), "{}", ctl.log());
    let status = ctl.cli("status --json").run();
    assert!(status.success(), "{status}");
    assert!(status.lines.iter().any(|l| l.trim() == "\"starts\": 2,"), "the ledger counts two controller starts:\n{status}");
    // The dead member's 576M are back: another 512M fits (it would not without them).
    touch(&up);
    expect_ok(&f.wait_line("alloc", 2));

    touch(&stop);
    for c in [&a, &b] {
        let line = c.wait_line("churn", 0);
        expect_ok(&line);
        assert!(num(&line, "count") > 0 && num(&line, "failures") == 0, "kept allocating and freeing through the restart: `{line}`");
    }
    let l = ctl.ls();
    let expect = [(a.pid(), R + 256 * MIB), (b.pid(), R + 128 * MIB), (f.pid(), R + GIB)];
    for (pid, bytes) in expect {
        assert_eq!(l.process_used(pid, 0), bytes, "pid {pid}:\n{l}");
    }
    let total: u64 = expect.iter().map(|(_, b)| b).sum();
    assert_eq!(l.group_used("ha", 0), total, "the group counts exactly what the survivors hold:\n{l}");
    assert!(l.group_peak("ha", 0) <= 2 * GIB, "{l}");

    touch(&done);
    for c in [a, b] {
        c.wait().assert_all_ok();
    }
    f.wait().assert_success();
    let (l, _) = ctl.ls_until("every member gone", Duration::from_secs(2), |l| l.pids().is_empty());
    assert_eq!(l.group_used("ha", 0), 0, "{l}");
}

// --------------------------------------------------- 4b. config groups at a controller restart

/// A controller restarted with a config that no longer names group "batch", which nobody has
/// joined: the group is gone (it used to come back from the ledger file's copy, pinned, for
/// good). A group a live `set --create` made, and a config group the new config still names,
/// stay: each holds a member to its 1 GiB and is still listed once that member has exited.
#[test]
fn a_config_group_the_new_config_drops_is_gone_after_a_restart_and_the_others_stay() {
    let _t = shared();
    let sim = sim();
    let mut ctl = sim.controller_with_config("[groups.batch]\nmemory_limit = \"1GiB\"\n[groups.kept]\nmemory_limit = \"1GiB\"\n");
    ctl.set_ok("--create --group live --memory 1GiB");
    let l = ctl.ls();
    for name in ["batch", "kept", "live"] {
        assert!(l.group(name).is_some(), "{name} before the restart:\n{l}");
    }
    let config = sim.write_file("controller.toml", "[groups.kept]\nmemory_limit = \"1GiB\"\n");
    ctl.restart();
    let l = ctl.ls();
    assert!(l.group("batch").is_none(), "batch is no longer in the config and had no members:\n{l}\n{}", ctl.log());
    let line = format!("group \"batch\" is no longer in {}: unpinned; no process runs in it, so it goes now", config.display());
    assert_eq!(ctl.log().matches(&line).count(), 1, "one line says why:\n{}", ctl.log());
    for name in ["kept", "live"] {
        member_held_to_one_gib(&sim, &ctl, name);
    }
    // The controller learns of a member's exit from its pidfd, a moment after the exit: wait
    // for it (fresh-clone CI once listed "live" with its member still in it).
    let (l, _) = ctl.ls_until("both groups listed without members", Duration::from_secs(10), |l| {
        ["kept", "live"].iter().all(|name| l.group(name).is_some() && l.members(name).is_empty())
    });
    for name in ["kept", "live"] {
        assert!(l.group(name).is_some() && l.members(name).is_empty(), "{name} stays pinned, empty:\n{l}");
        assert_eq!(l.group_limit(name, 0), Some(GIB), "{l}");
    }
}

/// The operator's workflow: edit the config file, restart the controller. A live edit survives a
/// restart on the same file (`set` is how limits change without one); an edited section wins at
/// the next restart, with one line that says so; a live edit after that survives again.
#[test]
fn an_edited_config_section_applies_at_a_restart_and_a_live_edit_survives_an_unchanged_file() {
    let _t = shared();
    let sim = sim();
    let mut ctl = sim.controller_with_config("[groups.inference]\nmemory_limit = \"3GiB\"\n");
    ctl.set_ok("--group inference --memory 1GiB");
    ctl.restart();
    // A member sees the live edit's 1 GiB, not the file's 3 (and makes device 0 known to `ls`).
    member_held_to_one_gib(&sim, &ctl, "inference");
    let config = sim.write_file("controller.toml", "[groups.inference]\nmemory_limit = \"2GiB\"\n");
    ctl.restart();
    let line = format!("group \"inference\": its section of {} changed since the controller last applied it: the file's values apply", config.display());
    assert_eq!(ctl.log().matches(&line).count(), 1, "one line says why:\n{}", ctl.log());
    assert_eq!(ctl.ls().group_limit("inference", 0), Some(2 * GIB), "the edited file's limit:\n{}", ctl.log());
    ctl.set_ok("--group inference --memory 1GiB");
    ctl.restart();
    assert_eq!(ctl.log().matches(&line).count(), 1, "an unchanged file applies nothing again:\n{}", ctl.log());
    member_held_to_one_gib(&sim, &ctl, "inference");
}

/// The same with a member running in "batch" through the restart: the group stays, and the
/// member is still held to its 1 GiB (nothing fails open), until it exits; then the group goes
/// as one its members made would.
#[test]
fn a_config_group_the_new_config_drops_stays_for_its_member_then_goes() {
    let _t = shared();
    let sim = sim();
    let mut ctl = sim.controller_with_config("[groups.batch]\nmemory_limit = \"1GiB\"\n");
    let [more, done] = ["more", "done"].map(|n| path(&sim, n));
    let m = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("batch")
        .args(&format!("init ctx 0 alloc 700M waitfile {more} alloc 400M alloc 200M waitfile {done}"))
        .spawn();
    expect_ok(&m.wait_line("alloc", 0));
    let config = sim.write_file("controller.toml", "");
    ctl.restart();
    let line = format!("group \"batch\" is no longer in {}: unpinned; it goes when its 1 running process exits", config.display());
    assert_eq!(ctl.log().matches(&line).count(), 1, "one line says why:\n{}", ctl.log());
    let l = ctl.ls();
    assert_eq!(l.members("batch"), vec![m.pid()], "kept for its member:\n{l}");
    assert_eq!(l.group_limit("batch", 0), Some(GIB), "with its limit:\n{l}");
    touch(&more);
    expect_oom(&m.wait_line("alloc", 1));
    expect_ok(&m.wait_line("alloc", 2));
    assert_eq!(ctl.ls().group_used("batch", 0), R + 900 * MIB, "{}", ctl.ls());
    touch(&done);
    m.wait().assert_success();
    let (l, _) = ctl.ls_until("batch gone with its member", Duration::from_secs(2), |l| l.group("batch").is_none());
    assert!(l.groups().is_empty(), "{l}");
}

// ------------------------------------------------------------------------ 5. a bad config

#[test]
fn a_bad_config_stops_the_controller_with_the_place_of_the_error() {
    let _t = shared();
    let sim = Sim::new();
    let cases = [
        ("syntax.toml", "[groups.race]\nmemory_limit = \"1GiB\"\nsm_share = [oops\n", vec!["line 3", "column 13"]),
        ("value.toml", "[groups.race]\nmemory_limit = \"lots\"\n", vec!["groups.race.memory_limit", "lots"]),
        ("key.toml", "[groups.race]\nmemory = \"1GiB\"\n", vec!["line 2", "column 1", "memory"]),
    ];
    for (name, text, needles) in cases {
        let file = sim.write_file(name, text);
        let socket = sim.path(&format!("{name}.sock"));
        let ledger = sim.path(&format!("{name}.shm")).join("ledger");
        let out = sim
            .program(cli_path())
            .env("GPUSLICE_LOG", "debug")
            .arg("serve")
            .arg("--config")
            .arg(file.display())
            .arg("--socket")
            .arg(socket.display())
            .arg("--ledger")
            .arg(ledger.display())
            .run();
        assert!(!out.success(), "{name}: the controller must refuse the config:\n{out}");
        assert!(out.stderr.contains(&file.display().to_string()), "{name}: stderr names the file:\n{out}");
        for n in needles {
            assert!(out.stderr.contains(n), "{name}: stderr should say {n:?}:\n{out}");
        }
        assert!(!socket.exists(), "{name}: a socket was left behind");
        assert!(!ledger.exists(), "{name}: a ledger was left behind");
    }
    let missing = sim.path("missing.toml");
    let out = sim.program(cli_path()).arg("serve").arg("--config").arg(missing.display()).arg("--socket").arg(sim.path("m.sock").display()).run();
    assert!(!out.success() && out.stderr.contains(&missing.display().to_string()), "{out}");
    assert!(!sim.path("m.sock").exists());
}

// ---------------------------------------------------------------- 6. who may change limits

#[test]
#[cfg_attr(not(gpuslice_it_root), ignore = "needs root: it runs `gpuslice set` as uid 65534 (tests built as another user)")]
fn other_users_may_read_but_not_edit() {
    let _t = shared();
    assert_root();
    let sim = sim();
    // The socket's directory must be reachable for uid 65534 (a temporary directory is 0700).
    std::fs::set_permissions(sim.dir(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let ctl = sim.controller();
    ctl.set_ok("--create --group team --memory 1GiB");
    let done = path(&sim, "done");
    let c = sim.client(Route::Link).shim().controller(&ctl).group("team").args(&format!("init ctx 0 waitfile {done}")).spawn();
    expect_ok(&c.wait_line("ctx", 0));

    for args in ["--group team --memory 4GiB".to_string(), format!("--pid {} --memory 4GiB", c.pid()), "--group other --sm 50".into()] {
        let out = ctl.cli("set").args(&args).uid(65534).run();
        assert!(!out.success(), "uid 65534 must not edit ({args}):\n{out}");
        assert!(out.stderr.contains("permission denied"), "{args}: {out}");
    }
    let out = ctl.cli("ls --json").uid(65534).run();
    assert!(out.success(), "uid 65534 may read:\n{out}");
    let l = Listing::parse(&out.lines.join("\n")).expect("JSON");
    assert_eq!(l.group_limit("team", 0), Some(GIB), "unchanged:\n{l}");
    assert!(l.group("other").is_none(), "no group made by a refused edit:\n{l}");
    assert_eq!(l.pids(), vec![c.pid()]);
    assert!(ctl.log().contains("edit refused"), "{}", ctl.log());
    touch(&done);
    c.wait().assert_all_ok();
}

// ------------------------------------------------------------------------- 7. gpuslice run

#[test]
fn gpuslice_run_joins_a_group_with_its_limit() {
    let _t = shared();
    let sim = sim();
    let ctl = sim.controller();
    let done = path(&sim, "done");
    // The binary finds libgpuslice.so next to itself (both in target/<profile>).
    let c = sim
        .program(cli_path())
        .controller(&ctl)
        .args("run --memory 1GiB --group runners --")
        .arg(client_path(Route::Link).display())
        .args(&format!("init ctx 0 alloc 512M alloc 600M info waitfile {done}"))
        .spawn();
    expect_ok(&c.wait_line("alloc", 0));
    expect_oom(&c.wait_line("alloc", 1));
    let info = c.wait_line("info", 0);
    assert_eq!(num(&info, "total"), GIB, "`{info}`");
    assert_eq!(num(&info, "free"), GIB - R - 512 * MIB, "`{info}`");
    let pid = c.pid(); // run execs the program: same pid
    let l = ctl.ls();
    assert_eq!(l.process_group(pid), "runners", "{l}");
    assert_eq!(l.process(pid).unwrap()["name"], "cuclient-link", "{l}");
    assert_eq!(l.members("runners"), vec![pid], "{l}");
    assert_eq!(l.group_limit("runners", 0), Some(GIB), "the group takes its first member's --memory:\n{l}");
    assert_eq!(l.group_used("runners", 0), R + 512 * MIB, "{l}");
    assert_eq!(l.group_refusals("runners", 0), 1, "{l}");
    touch(&done);
    let out = c.wait();
    out.assert_success();
    assert_eq!(out.stderr_lines_with(&["cuMemAlloc refused", "group \"runners\""]).len(), 1, "{out}");

    // GPUSLICE_LIB names the library when set: a wrong one is an error, not a silent fallback.
    let wrong = sim.path("nowhere/libgpuslice.so");
    let out = sim
        .program(cli_path())
        .controller(&ctl)
        .env("GPUSLICE_LIB", wrong.display())
        .args("run --group runners --")
        .arg(client_path(Route::Link).display())
        .args("init")
        .run();
    assert!(!out.success() && out.stderr.contains("GPUSLICE_LIB") && out.lines.is_empty(), "{out}");
    let out = sim
        .program(cli_path())
        .controller(&ctl)
        .env("GPUSLICE_LIB", shim_path().display())
        .args("run --memory 1GiB --group runners --")
        .arg(client_path(Route::Link).display())
        .args("init ctx 0 alloc 900M alloc 100M")
        .run();
    out.assert_success();
    expect_ok(out.line(2));
    expect_oom(out.line(3));
}

// ------------------------------------------------------------------- 8. without a controller

#[test]
fn without_a_controller_the_shim_runs_alone_and_says_so_once() {
    let _t = shared();
    let sim = sim();
    let script = "init ctx 0 alloc 512M alloc 600M ctx 1 alloc 100M info";
    let out = sim.client(Route::Dlsym).shim().env("GPUSLICE_LOG", "info").env("GPUSLICE_MEMORY_LIMIT", "1GiB").args(script).run();
    out.assert_success();
    expect_ok(out.line(2));
    expect_oom(out.line(3));
    expect_ok(out.line(5));
    let socket = sim.no_controller_socket().display().to_string();
    let lines = out.stderr_lines_with(&["no gpuslice controller at", &socket, "running alone"]);
    // A socket in its environment says it belongs under a controller: running alone is a
    // warning then (issue 16), and only because GPUSLICE_ON_NO_CONTROLLER=alone says so.
    assert_eq!(lines.len(), 1, "one line that the shim runs alone:\n{out}");
    assert!(lines[0].contains("WARN") && lines[0].contains("GPUSLICE_ON_NO_CONTROLLER=alone"), "{}", lines[0]);
    assert!(lines[0].contains("1.00 GiB"), "it names the limits it runs on: {}", lines[0]);

    // Told nothing (no socket, group or policy in its environment, none at the default path),
    // at the default log level (warn) it says nothing about it.
    if !std::path::Path::new(gpuslice_common::protocol::DEFAULT_SOCKET).exists() {
        let quiet = sim
            .client(Route::Dlsym)
            .shim()
            .env("GPUSLICE_SOCKET", "")
            .env("GPUSLICE_ON_NO_CONTROLLER", "")
            .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
            .args("init ctx 0 alloc 1M")
            .run();
        quiet.assert_all_ok();
        assert!(quiet.stderr_lines_with(&["controller"]).is_empty(), "{quiet}");
    }

    // A stale socket (a controller that died): a warning, once, and the env limits hold.
    let stale = sim.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let out = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_SOCKET", stale.display())
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .args("init ctx 0 alloc 512M alloc 600M ctx 1 alloc 100M")
        .run();
    out.assert_success();
    expect_ok(out.line(2));
    expect_oom(out.line(3));
    let warned = out.stderr_lines_with(&["did not take this process", &stale.display().to_string(), "running alone"]);
    assert_eq!(warned.len(), 1, "{out}");
}

// ---------------------------------------------------------------------- stalled clients

/// Connections that send nothing (any local user can open them: the socket is 0666) must not
/// delay a registering shim: if they did, it would give up after its 2 s timeout and run alone,
/// here without any limit, escaping its group's 1 GiB. The controller serves each connection
/// on a thread of its own.
#[test]
fn idle_connections_do_not_keep_processes_out_of_their_group() {
    let _t = shared();
    let sim = sim();
    let ctl = sim.controller();
    ctl.set_ok("--create --group g --memory 1GiB");
    let idle: Vec<std::os::unix::net::UnixStream> = (0..3).map(|_| std::os::unix::net::UnixStream::connect(ctl.socket()).expect("connect")).collect();
    let out = sim.client(Route::Link).shim().controller(&ctl).group("g").args("init ctx 0 alloc 600M alloc 600M").run();
    drop(idle);
    out.assert_success();
    expect_ok(out.line(2));
    expect_oom(out.line(3));
}

// ---------------------------------------------------------------------- fork

/// A child forked after its parent registered gets a slot of its own at its first CUDA call:
/// what it allocates is counted to it and returned when it exits, and the parent's figures
/// stay the parent's.
#[test]
fn a_forked_child_counts_in_its_own_slot() {
    let _t = shared();
    let sim = sim();
    let ctl = sim.controller();
    ctl.set_ok("--create --group fam --memory 1GiB");
    let done = path(&sim, "done");
    let c = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("fam")
        .args(&format!("init ctx 0 alloc 100M fork init ctx 0 alloc 200M pid endchild waitfile {done}"))
        .spawn();
    let forked = c.wait_line("fork", 0);
    assert!(forked.contains("status=0"), "the child exits cleanly: `{forked}`");
    expect_ok(&c.wait_line("alloc", 0));
    expect_ok(&c.wait_line("alloc", 1));
    let parent = c.pid();
    // The child has exited (its parent reaped it), but the controller learns so from its
    // connection's hang-up, which it may not have read yet on a loaded machine.
    let (l, _) = ctl.ls_until("the child leave with its slot", Duration::from_secs(10), |l| l.members("fam") == vec![parent]);
    assert_eq!(l.group_used("fam", 0), R + 100 * MIB, "the child's 200 MiB went with it, the parent's stay:\n{l}");
    touch(&done);
    c.wait().assert_success();
    let log = ctl.log();
    assert_eq!(log.matches("registered pid").count(), 2, "parent and child each registered:\n{log}");
}
