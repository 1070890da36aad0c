//! Issue 13: a hostile tenant, as uid 65534 against a root controller and the simulated driver.
//! Each attack of the issue is run by a helper process (this test binary again, `attacker`,
//! started as uid 65534) that speaks the protocol itself and writes whatever it can reach; then
//! the same checks every time: the controller answers 100 `ls` in a row, the victim group's
//! limit is unchanged and enforced on a real process, and the controller restarts on its own
//! memory. A registered process holds only its own group's memory, the shared device memory and
//! its group's settings page read-only (`ledger::regions`): what it can and cannot do to each
//! is checked on the descriptors themselves (`assault`).
//!
//! The tests need root to switch to uid 65534; run as any other user they say so and pass
//! without checking anything else.

use gpuslice_common::ledger::{Ledger, Owner, Priority, SettingsPage, LIVE, MAX_DEVICES, UNLIMITED};
use gpuslice_common::protocol::{self, DeviceClaim, Registration, Request, Response};
use gpuslice_integration::*;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;
const CONFIG: &str = "[groups.victim]\nmemory_limit = \"1GiB\"\n";

fn show(p: &Path) -> String {
    p.display().to_string()
}

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED {test}: it acts as uid {NOBODY}, which needs root to switch to");
    true
}

/// A simulated machine whose directory and driver state uid 65534 may use too.
fn machine() -> Sim {
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", 64 * MIB);
    std::fs::set_permissions(sim.dir(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    sim
}

fn open_state_to_all(sim: &Sim) {
    sim.client(Route::Link).args("init").run().assert_success();
    std::fs::set_permissions(sim.state_path(), std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
}

/// Starts `attacker` as uid 65534 running `attack` for `hold` seconds against `ctl`.
fn attack(sim: &Sim, ctl: &Controller<'_>, attack: &str, hold: f64) -> Running {
    attacker_program(sim, ctl, attack).uid(NOBODY).env("ATTACK_HOLD", hold).spawn()
}

/// This test binary's `attacker` (run as the caller's uid until `.uid` says otherwise), told to
/// run `attack` against `ctl` on the simulated machine's two GPUs; the caller adds the attack's
/// own variables and spawns it.
fn attacker_program<'s>(sim: &'s Sim, ctl: &Controller<'_>, attack: &str) -> Client<'s> {
    sim.program(std::env::current_exe().expect("this test binary"))
        .args("--exact attacker --ignored --nocapture --test-threads=1")
        .env("ATTACK", attack)
        .env("ATTACK_SOCKET", show(&ctl.socket()))
        .env("ATTACK_UUIDS", (0..2).map(|d| sim.device_uuid(d)).collect::<Vec<_>>().join(","))
}

/// What must hold after every attack: 100 `ls` in a row answered, the victim group's limit
/// unchanged and enforced on a real process, and a controller restart on the same ledger.
fn still_sound(sim: &Sim, ctl: &mut Controller<'_>) {
    for i in 0..100 {
        let out = ctl.cli("ls --json").run();
        assert!(out.success(), "ls {i} of 100 failed:\n{out}\ncontroller log:\n{}", ctl.log());
    }
    let out = member_held_to_one_gib(sim, ctl, "victim");
    assert!(!out.stderr.contains("running alone"), "{out}");
    let l = ctl.ls();
    assert_eq!(l.group_limit("victim", 0), Some(GIB), "the victim's limit is unchanged:\n{l}");
    assert_eq!(l.group_limit("victim", 1), Some(GIB), "on every device:\n{l}");
    ctl.kill9();
    ctl.restart();
    let answered = poll_until(Duration::from_secs(5), || ctl.cli("status").run().success());
    assert!(answered, "the controller restarts on its own ledger:\n{}", ctl.log());
    assert!(ctl.log().contains("(adopted; start 2)"), "{}", ctl.log());
    assert_eq!(ctl.ls().group_limit("victim", 0), Some(GIB));
}

/// One write into its own slot (a group index out of range, another pid, a bad state) used to
/// panic every `ls` and, 128 scrapes later, leave the controller refusing every connection.
#[test]
fn a_corrupt_slot_is_reported_and_every_listing_still_answers() {
    if skip_unless_root("a_corrupt_slot_is_reported_and_every_listing_still_answers") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let a = attack(&sim, &ctl, "corrupt-own-slot", 3.0);
    a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    // 200 listings: more than the 128 connection slots that leaked a panic each before.
    for i in 0..200 {
        assert!(ctl.cli("ls").run().success(), "ls {i}: {}", ctl.log());
    }
    let l = ctl.ls();
    let row = l.process(a.pid()).unwrap_or_else(|| panic!("the attacker is listed under its real group:\n{l}"));
    assert_eq!(row["uid"], NOBODY);
    assert!(ctl.log().contains(&format!("pid {} in group", a.pid())) && ctl.log().contains("is misbehaving"), "reported:\n{}", ctl.log());
    assert!(!ctl.log().contains("panicked"), "{}", ctl.log());
    a.wait().assert_success();
    still_sound(&sim, &mut ctl);
}

/// Rewriting every group slot's limits it can map (another group's to 1 MiB, its own to
/// unlimited) over and over: other groups' slots are not in its memory (zeros it writes to
/// nobody), its own group's limit is read by shims from the read-only settings page, and the
/// controller puts its own values back in the writable copy every tick and says who did it.
#[test]
fn rewritten_limits_are_restored_and_reported() {
    if skip_unless_root("rewritten_limits_are_restored_and_reported") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let a = attack(&sim, &ctl, "rewrite-limits", 2.0);
    a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    // While the attacker writes: the victim's members get their 1 GiB, not 1 MiB.
    let during = sim.client(Route::Link).shim().controller(&ctl).group("victim").args("init ctx 0 alloc 700M").run();
    during.assert_success();
    during.expect_ok(2);
    let out = a.wait();
    out.assert_success();
    // Restored within a tick of the attacker's last write.
    let restored = poll_until(Duration::from_secs(2), || ctl.ls().group_limit("victim", 0) == Some(GIB));
    assert!(restored, "{}", ctl.ls());
    assert!(ctl.log().contains("shared memory was rewritten by a tenant"), "{}", ctl.log());
    still_sound(&sim, &mut ctl);
}

/// 128 connections that each send one byte every 0.5 s: every request has a whole-request
/// deadline, and one uid holds at most a share of the connection slots, so real processes
/// still register and `ls` still answers while it goes on.
#[test]
fn slow_connections_of_one_uid_keep_nobody_out() {
    if skip_unless_root("slow_connections_of_one_uid_keep_nobody_out") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let a = attack(&sim, &ctl, "slow-loris", 4.0);
    a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    let start = Instant::now();
    for i in 0..20 {
        assert!(ctl.cli("ls").run().success(), "ls {i} during the attack:\n{}", ctl.log());
    }
    let out = sim.client(Route::Link).shim().controller(&ctl).group("victim").env("GPUSLICE_ON_NO_CONTROLLER", "refuse").args("init ctx 0 alloc 1200M").run();
    out.expect_err(2, 2);
    assert!(!out.stderr.contains("running alone"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(4), "answered while the attack went on ({:?})", start.elapsed());
    a.wait().assert_success();
    still_sound(&sim, &mut ctl);
}

/// One registration naming 16 well-formed made-up UUIDs used to take the device slots of idle
/// real GPUs: now the controller tracks only what its NVML lists.
#[test]
fn made_up_devices_are_not_tracked() {
    if skip_unless_root("made_up_devices_are_not_tracked") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let a = attack(&sim, &ctl, "made-up-devices", 2.0);
    let said = a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    assert!(said.contains("tracked=0"), "no made-up device was tracked: {said}");
    let status = ctl.cli("status --json").run();
    assert!(status.success(), "{status}");
    assert!(!status.lines.iter().any(|l| l.contains("GPU-00000000")), "{status}");
    a.wait().assert_success();
    still_sound(&sim, &mut ctl);
}

/// One uid with sleeping processes used to fill the process and group tables: now it holds at
/// most its share, and another uid's process still registers.
#[test]
fn one_uid_cannot_fill_the_tables() {
    if skip_unless_root("one_uid_cannot_fill_the_tables") {
        return;
    }
    let sim = machine();
    let config = sim.write_file("config.toml", CONFIG);
    let mut ctl = sim.controller_with_args(&["--config", &show(&config), "--max-processes", "12", "--max-groups", "12"]);
    open_state_to_all(&sim);
    let a = attack(&sim, &ctl, "fill-tables", 3.0);
    let said = a.wait_for("attacked", Duration::from_secs(20), |l| l.contains("attacked"));
    assert!(said.contains("registered=6"), "half the table and no more: {said}");
    assert!(ctl.log().contains(&format!("uid {NOBODY} already has 6")), "{}", ctl.log());
    a.wait().assert_success();
    still_sound(&sim, &mut ctl);
}

/// A process of this test's uid, told to have a controller, asks to join `group`: refused with
/// `reason` once, and CUDA refused rather than run unlimited.
fn a_stranger_is_refused(sim: &Sim, ctl: &Controller<'_>, group: &str, reason: &str) {
    let out = sim
        .client(Route::Link)
        .shim()
        .controller(ctl)
        .group(group)
        .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
        .env("GPUSLICE_CONTROLLER_WAIT", "1")
        .args("init")
        .run();
    assert!(!out.ok(0), "refused, not run unlimited:\n{out}");
    assert_eq!(out.stderr_lines_with(&[reason, "CUDA is refused"]).len(), 1, "{out}\ncontroller log:\n{}", ctl.log());
}

/// Squatting a group name before its owner: a group made from one uid's environment is that
/// uid's; another uid's process is refused with the reason (and, told to have a controller,
/// refuses CUDA rather than run unlimited). An administrator opens the name by configuring it.
#[test]
fn a_group_made_from_the_environment_is_closed_to_other_uids() {
    if skip_unless_root("a_group_made_from_the_environment_is_closed_to_other_uids") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let a = attack(&sim, &ctl, "squat", 3.0);
    a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    a_stranger_is_refused(&sim, &ctl, "prod", "made from the environment of a process of uid 65534");
    ctl.set_ok("--group prod --memory 2GiB");
    let out =
        sim.client(Route::Link).shim().controller(&ctl).group("prod").env("GPUSLICE_ON_NO_CONTROLLER", "refuse").args("init ctx 0 alloc 2100M info").run();
    out.expect_err(2, 2);
    assert_eq!(out.u64("info", "total"), 2 * GIB, "{out}");
    a.wait().assert_success();
    still_sound(&sim, &mut ctl);
}

/// The same across a controller restart (SIGKILL, then a new controller on the same ledger):
/// group "prod", made from the environment of a process of uid 65534 that lives through the
/// restart, is still that uid's. A process of this test's uid is refused in the same words
/// after the restart as before it (it was let in before the owner was recorded on the settings
/// page: `adopt` opened every group), a second process of uid 65534 joins and is held to the
/// group's 1 GiB, and the group goes when the last of them exits, as before a restart.
#[test]
fn a_group_made_from_the_environment_stays_closed_to_other_uids_across_a_restart() {
    if skip_unless_root("a_group_made_from_the_environment_stays_closed_to_other_uids_across_a_restart") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let done = sim.path("done");
    let owner = sim
        .client(Route::Link)
        .shim()
        .uid(NOBODY)
        .controller(&ctl)
        .group("prod")
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
        .args(&format!("init ctx 0 waitfile {}", show(&done)))
        .spawn();
    expect_ok(&owner.wait_line("ctx", 0));
    let reason = format!("group \"prod\" was made from the environment of a process of uid {NOBODY}; only that uid's processes may join it");
    a_stranger_is_refused(&sim, &ctl, "prod", &reason);
    ctl.kill9();
    ctl.restart();
    a_stranger_is_refused(&sim, &ctl, "prod", &reason);
    let out = sim
        .client(Route::Link)
        .shim()
        .uid(NOBODY)
        .controller(&ctl)
        .group("prod")
        .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
        .args("init ctx 0 alloc 700M alloc 400M")
        .run();
    out.assert_success();
    out.expect_ok(2);
    out.expect_err(3, 2);
    assert!(!out.stderr.contains("running alone"), "{out}");
    let l = ctl.ls();
    assert_eq!(l.members("prod"), vec![owner.pid()], "{l}");
    touch(&done);
    owner.wait().assert_success();
    let (l, _) = ctl.ls_until("prod gone with its last member", Duration::from_secs(2), |l| l.group("prod").is_none());
    assert!(l.group("victim").is_some(), "{l}");
}

/// What a member of group "attackers" (uid 65534) keeps writing into its own process slot
/// while the controller is killed (SIGKILL) and restarted on the same ledger: `forge` is
/// another group's index ("group": config group `victim`'s), uid 0 ("uid"), another tenant's pid
/// with start time 0 ("pid": root's member of `victim`), or its cap lifted ("cap": `set --pid`
/// gave it 256 MiB); and 900 MiB used in each. A restarted controller takes a member's group,
/// pid, uid and cap from its own record (the ledger file) and the kernel, never from the slot
/// (branch adopttrust); `check` asserts what `forge` would have changed, on the listing just
/// after the restart. After it, the controller has put its own values back into the slot, which
/// the attacker reads and prints; it said once, before the restart, who rewrote it.
fn forged_across_a_restart(forge: &str, check: impl FnOnce(&Sim, &Controller<'_>, &Listing, u32, u32)) {
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let (go, stop, done) = (sim.path("go"), sim.path("stop"), sim.path("done"));
    let member = sim.client(Route::Link).shim().controller(&ctl).group("victim").args(&format!("init ctx 0 alloc 100M waitfile {}", show(&done))).spawn();
    expect_ok(&member.wait_line("alloc", 0));
    let victim = ctl.ls().group("victim").expect("configured")["slot"].as_u64().unwrap();
    let attacker = attacker_program(&sim, &ctl, "forge-slot")
        .uid(NOBODY)
        .env("ATTACK_FORGE", forge)
        .env("ATTACK_VICTIM", victim)
        .env("ATTACK_PID", member.pid())
        .env("ATTACK_GO", show(&go))
        .env("ATTACK_STOP", show(&stop))
        .spawn();
    attacker.wait_for("registered", Duration::from_secs(10), |l| l.contains("registered slot="));
    let (me, them) = (attacker.pid(), member.pid());
    ctl.set_ok(&format!("--pid {me} --memory 256MiB"));
    touch(&go);
    attacker.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    // A few of its writes land after the controller's last tick (100 ms): what it finds is forged.
    std::thread::sleep(Duration::from_millis(300));
    ctl.kill9();
    ctl.restart();
    assert!(poll_until(Duration::from_secs(5), || ctl.cli("status").run().success()), "{}", ctl.log());
    let l = ctl.ls();
    check(&sim, &ctl, &l, me, them);
    touch(&stop);
    let after = attacker.wait_for("after", Duration::from_secs(10), |l| l.contains("after group="));
    let attackers = l.group("attackers").unwrap_or_else(|| panic!("its group is kept for it:\n{l}"))["slot"].as_u64().unwrap();
    let want = format!("after group={attackers} pid={me} uid={NOBODY} limit={}", 256 * MIB);
    assert!(after.contains(&want), "the controller's values are back in its slot: {after:?}, not {want:?}\n{}", ctl.log());
    // Said when the controller first saw it, before the restart; not again after it, since the
    // controller kept that in its record too.
    let log = ctl.log();
    assert_eq!(log.matches(&format!("pid {me} in group \"attackers\" is misbehaving")).count(), 1, "{log}");
    touch(&done);
    attacker.wait().assert_success();
    member.wait().assert_success();
}

/// Another group's index: `victim` is not charged the attacker's 900 MiB (its members still
/// get their 1 GiB), and the attacker is still counted in its own group.
#[test]
fn a_slot_naming_another_group_charges_it_nothing_after_a_restart() {
    if skip_unless_root("a_slot_naming_another_group_charges_it_nothing_after_a_restart") {
        return;
    }
    forged_across_a_restart("group", |sim, ctl, l, me, them| {
        assert_eq!(l.group_used("victim", 0), 64 * MIB + 100 * MIB, "only its own member's bytes:\n{l}");
        assert_eq!(l.members("victim"), vec![them], "{l}");
        assert_eq!(l.members("attackers"), vec![me], "{l}");
        assert_eq!(l.group_used("attackers", 0), 900 * MIB, "its word charges its own group only:\n{l}");
        let out = sim.client(Route::Link).shim().controller(ctl).group("victim").args("init ctx 0 alloc 700M alloc 200M").run();
        out.expect_ok(2);
        out.expect_err(3, 2);
    });
}

/// Uid 0: the attacker is still uid 65534's (listed so, counted so).
#[test]
fn a_slot_claiming_uid_0_is_still_its_uids_after_a_restart() {
    if skip_unless_root("a_slot_claiming_uid_0_is_still_its_uids_after_a_restart") {
        return;
    }
    forged_across_a_restart("uid", |_, _, l, me, _| {
        let row = l.process(me).unwrap_or_else(|| panic!("adopted:\n{l}"));
        assert_eq!(row["uid"], NOBODY, "{l}");
        assert_eq!(row["group"], "attackers", "{l}");
    });
}

/// Another tenant's pid (root's member of `victim`) with start time 0: the controller watches
/// the attacker, not that process, and that process only once, in its own group.
#[test]
fn a_slot_naming_another_pid_does_not_make_the_controller_watch_it_after_a_restart() {
    if skip_unless_root("a_slot_naming_another_pid_does_not_make_the_controller_watch_it_after_a_restart") {
        return;
    }
    forged_across_a_restart("pid", |_, _, l, me, them| {
        assert_eq!(l.members("attackers"), vec![me], "{l}");
        assert_eq!(l.members("victim"), vec![them], "{l}");
        assert_eq!(l.processes().iter().filter(|p| p["pid"] == them).count(), 1, "{l}");
        assert_eq!(l.process(me).unwrap_or_else(|| panic!("{l}"))["uid"], NOBODY, "{l}");
    });
}

/// Its cap lifted before the restart: the controller's 256 MiB comes back.
#[test]
fn a_cap_lifted_in_the_slot_comes_back_after_a_restart() {
    if skip_unless_root("a_cap_lifted_in_the_slot_comes_back_after_a_restart") {
        return;
    }
    forged_across_a_restart("cap", |_, _, l, me, _| {
        assert_eq!(l.process_device(me, 0)["limit"].as_u64(), Some(256 * MIB), "{l}");
    });
}

/// What a member of "attackers" (uid 65534; its environment gave the group 256 MiB and a 30 %
/// share) that keeps neither a descriptor nor a mapping of its group's settings page leaves a
/// restarted controller: it keeps writing into its group's writable copy a lifted limit, no
/// share, no cap, high priority, a pin, "open to all" and the name `victim` (a `set --create`
/// group of 1 GiB made after it, so in a later slot, which a restart used to free as "not
/// distinct") while the controller is SIGKILLed and restarted; `forget_copy`: the ledger file's
/// copy of its settings is emptied while no controller runs (as a controller that kept only
/// pinned groups' copies left it). Whatever the restarted controller made of it, `victim`
/// keeps its name, slot and 1 GiB and holds a root process to it (asserted here, while the
/// attacker still writes). `during` asserts on the listing just after the restart, `after`
/// on one once the attacker stopped writing and the controller had a tick to put its values
/// back (`ls` shows the writable copy's limit and share), with what the attacker then reads
/// in its copy. Arguments: sim, controller, listing, the attackers' slot, the attacker's pid
/// (and its last line).
fn hidden_across_a_restart(
    forget_copy: bool,
    during: impl FnOnce(&Sim, &Controller<'_>, &Listing, u64, u32),
    after: impl FnOnce(&Controller<'_>, &Listing, u64, &str),
) {
    let sim = machine();
    let mut ctl = sim.controller();
    open_state_to_all(&sim);
    let (go, stop, done) = (sim.path("go"), sim.path("stop"), sim.path("done"));
    let attacker = attacker_program(&sim, &ctl, "hide-settings")
        .uid(NOBODY)
        .env("ATTACK_GO", show(&go))
        .env("ATTACK_STOP", show(&stop))
        .env("ATTACK_DONE", show(&done))
        .spawn();
    attacker.wait_for("registered", Duration::from_secs(10), |l| l.contains("registered slot="));
    ctl.set_ok("--create --group victim --memory 1GiB");
    let slot = |l: &Listing, name: &str| l.group(name).unwrap_or_else(|| panic!("no group {name:?}:\n{l}"))["slot"].as_u64().unwrap();
    let l = ctl.ls();
    let (attackers, victim) = (slot(&l, "attackers"), slot(&l, "victim"));
    assert!(attackers < victim, "{l}");
    assert_eq!((l.group_limit("attackers", 0), l.group_share("attackers", 0)), (Some(256 * MIB), Some(30)), "{l}");
    touch(&go);
    attacker.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    // A few of its writes land after the controller's last tick (100 ms): what it finds is forged.
    std::thread::sleep(Duration::from_millis(300));
    ctl.kill9();
    if forget_copy {
        let path = show(&ctl.ledger());
        let (ledger, adopted) = Ledger::open_or_create(&path, gpuslice_common::ledger::Geometry::default()).expect("the ledger file");
        assert!(adopted);
        ledger.clear_group_page(attackers as usize).expect("empty the copy");
    }
    ctl.restart();
    assert!(poll_until(Duration::from_secs(5), || ctl.cli("status").run().success()), "{}", ctl.log());
    let l = ctl.ls();
    assert_eq!(slot(&l, "victim"), victim, "the other group keeps its name:\n{l}");
    during(&sim, &ctl, &l, attackers, attacker.pid());
    // While the attacker still writes: what the shims read (the published page) holds.
    let out = sim.client(Route::Link).shim().controller(&ctl).group("victim").args("init ctx 0 alloc 700M alloc 400M").run();
    out.expect_ok(2);
    out.expect_err(3, 2);
    assert!(!out.stderr.contains("running alone"), "{out}");
    touch(&stop);
    let last = attacker.wait_for("after", Duration::from_secs(10), |l| l.contains("after name="));
    let l = ctl.ls();
    assert_eq!(l.group_limit("victim", 0), Some(GIB), "{l}");
    after(&ctl, &l, attackers, &last);
    touch(&done);
    attacker.wait().assert_success();
}

/// The restarted controller finds the group's memory but not its settings page and takes the
/// settings from the ledger file's copy (branch lostpage), not from the writable copy:
/// `attackers` keeps its name, 256 MiB, 30 % and uid.
#[test]
fn a_group_whose_settings_page_was_hidden_keeps_its_limits_and_name_across_a_restart() {
    if skip_unless_root("a_group_whose_settings_page_was_hidden_keeps_its_limits_and_name_across_a_restart") {
        return;
    }
    hidden_across_a_restart(
        false,
        |sim, ctl, l, attackers, pid| {
            assert_eq!(l.group("attackers").unwrap_or_else(|| panic!("its own name:\n{l}"))["slot"], attackers, "{l}");
            assert_eq!(l.members("attackers"), vec![pid], "its member is adopted:\n{l}");
            assert!(ctl.log().contains(&format!("group \"attackers\" (slot {attackers}): its settings are the copy the ledger file kept")), "{}", ctl.log());
            // Still uid 65534's, and held to its 256 MiB (64 MiB context + 100 MiB, then 200 MiB more).
            a_stranger_is_refused(
                sim,
                ctl,
                "attackers",
                &format!("group \"attackers\" was made from the environment of a process of uid {NOBODY}; only that uid's processes may join it"),
            );
            let out = sim
                .client(Route::Link)
                .shim()
                .uid(NOBODY)
                .controller(ctl)
                .group("attackers")
                .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
                .args("init ctx 0 alloc 100M alloc 200M")
                .run();
            out.expect_ok(2);
            out.expect_err(3, 2);
        },
        |ctl, l, _, last| {
            let want = format!("after name=attackers limit={}", 256 * MIB);
            assert!(last.contains(&want), "the controller's values are back in its copy: {last:?}, not {want:?}\n{}", ctl.log());
            assert_eq!(
                (l.group_limit("attackers", 0), l.group_share("attackers", 0)),
                (Some(256 * MIB), Some(30)),
                "the controller's, not the rewritten ones:\n{l}"
            );
            assert_eq!(l.group_limit("attackers", 1), Some(256 * MIB), "on every device:\n{l}");
        },
    );
}

/// The ledger file's copy is gone too: the group fails closed. Its member stays adopted (its
/// bytes counted), but the group takes nothing from the writable copy: it is renamed to a name
/// nobody can ask for, held to the memory it has (limit 0) with a 1 % share, and closed to
/// everyone; a new "attackers" is a new group; it goes with its member.
#[test]
fn a_group_whose_settings_page_and_copy_were_both_lost_fails_closed_across_a_restart() {
    if skip_unless_root("a_group_whose_settings_page_and_copy_were_both_lost_fails_closed_across_a_restart") {
        return;
    }
    hidden_across_a_restart(
        true,
        |sim, ctl, l, attackers, pid| {
            let lost = format!("pid-lost-{attackers}");
            assert_eq!(l.group(&lost).unwrap_or_else(|| panic!("renamed:\n{l}"))["slot"], attackers, "{l}");
            assert_eq!(l.members(&lost), vec![pid], "its member is adopted:\n{l}");
            assert!(l.group("attackers").is_none(), "{l}");
            let said = format!("group slot {attackers}: its settings page was not found and the ledger file holds no copy of them");
            assert_eq!(ctl.log().matches(&said).count(), 1, "{}", ctl.log());
            assert!(ctl.log().contains("(which names it \"victim\") is not taken"), "{}", ctl.log());
            let out = sim
                .client(Route::Link)
                .shim()
                .uid(NOBODY)
                .controller(ctl)
                .group("attackers")
                .env("GPUSLICE_MEMORY_LIMIT", "128MiB")
                .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
                .args("init ctx 0 alloc 100M")
                .run();
            out.expect_err(2, 2);
        },
        |ctl, l, attackers, last| {
            let lost = format!("pid-lost-{attackers}");
            assert!(last.contains(&format!("after name={lost} limit=0 ")), "{last:?}\n{}", ctl.log());
            assert_eq!((l.group_limit(&lost, 0), l.group_share(&lost, 0)), (Some(0), Some(1)), "{l}");
            assert_eq!(l.group_limit(&lost, 1), Some(0), "on every device:\n{l}");
        },
    );
}

/// Branch devuuid: a uid-65534 member of `attackers` on both GPUs keeps writing each GPU's UUID
/// at the other's slot of the shared device table (slot 0 is GPU 0, slot 1 GPU 1) while the
/// controller is SIGKILLed and restarted; `victim` has 1 GiB, and 256 MiB on slot 1 (GPU 1).
/// `break_chain`: between the kill and the restart a start that kept no record is counted on
/// the ledger (as a controller from before the record leaves it). `during` asserts on the
/// listing after the restart, while the attacker still writes; then the attacker stops and
/// says what the table holds (its last line, given to `after` with the controller).
fn swapped_across_a_restart(break_chain: bool, during: impl FnOnce(&Sim, &Controller<'_>, &Listing), after: impl FnOnce(&Sim, &Controller<'_>, &str)) {
    let sim = machine();
    let mut ctl = sim.controller();
    open_state_to_all(&sim);
    let (go, stop, done) = (sim.path("go"), sim.path("stop"), sim.path("done"));
    let attacker = attacker_program(&sim, &ctl, "swap-devices")
        .uid(NOBODY)
        .env("ATTACK_GO", show(&go))
        .env("ATTACK_STOP", show(&stop))
        .env("ATTACK_DONE", show(&done))
        .spawn();
    attacker.wait_for("registered", Duration::from_secs(10), |l| l.contains("registered slot="));
    ctl.set_ok("--create --group victim --memory 1GiB");
    ctl.set_ok("--group victim --device 1 --memory 256MiB");
    let l = ctl.ls();
    let uuid = |l: &Listing, d: u32| l.group_device("victim", d)["uuid"].as_str().unwrap_or_default().to_string();
    assert_eq!((uuid(&l, 0), uuid(&l, 1)), (sim.device_uuid(0), sim.device_uuid(1)), "{l}");
    assert_eq!((l.group_limit("victim", 0), l.group_limit("victim", 1)), (Some(GIB), Some(256 * MIB)), "{l}");
    touch(&go);
    attacker.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    // Some of its writes land after the controller's last tick (100 ms): what it finds is swapped.
    std::thread::sleep(Duration::from_millis(300));
    ctl.kill9();
    if break_chain {
        let (ledger, adopted) = Ledger::open_or_create(&show(&ctl.ledger()), gpuslice_common::ledger::Geometry::default()).expect("the ledger file");
        assert!(adopted);
        ledger.header().controller_starts.fetch_add(1, SeqCst);
    }
    ctl.restart();
    assert!(poll_until(Duration::from_secs(5), || ctl.cli("status").run().success()), "{}", ctl.log());
    during(&sim, &ctl, &ctl.ls());
    touch(&stop);
    let last = attacker.wait_for("after", Duration::from_secs(10), |l| l.contains("after d"));
    after(&sim, &ctl, &last);
    touch(&done);
    attacker.wait().assert_success();
}

/// A member of `victim` (root, `refuse` without a controller) that sees only GPU `gpu`
/// (`CUDA_VISIBLE_DEVICES`), running `script`.
fn victim_on_gpu(sim: &Sim, ctl: &Controller<'_>, gpu: u32, script: &str) -> Output {
    sim.client(Route::Link)
        .shim()
        .controller(ctl)
        .group("victim")
        .env("CUDA_VISIBLE_DEVICES", gpu)
        .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
        .args(script)
        .run()
}

/// The restarted controller takes which GPU each slot is from its own record (branch devuuid),
/// not from the swapped shared table: GPU 0 is slot 0 and GPU 1 slot 1 again, the log names
/// both UUIDs of each slot; a `victim` member on GPU 1 alone is counted on slot 1 and held to
/// its 256 MiB there (64 MiB context + 100 MiB, then 200 MiB refused), one on GPU 0 alone on
/// slot 0 with 1 GiB (700 MiB, then 400 MiB refused); the attacker reads the table put back.
#[test]
fn a_device_table_swapped_before_a_restart_is_taken_from_the_controllers_record() {
    if skip_unless_root("a_device_table_swapped_before_a_restart_is_taken_from_the_controllers_record") {
        return;
    }
    swapped_across_a_restart(
        false,
        |sim, ctl, l| {
            let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
            let uuid = |d: u32| l.group_device("victim", d)["uuid"].as_str().unwrap_or_default().to_string();
            assert_eq!((uuid(0), uuid(1)), (u0.clone(), u1.clone()), "the record's, not the swapped ones:\n{l}\n{}", ctl.log());
            for (d, shared, recorded) in [(0, &u1, &u0), (1, &u0, &u1)] {
                let said = format!("device slot {d}: the shared device table names \"{shared}\", the controller's record {recorded}: the record is taken");
                assert!(ctl.log().contains(&said), "{said}\n{}", ctl.log());
            }
            let on_1 = victim_on_gpu(sim, ctl, 1, "init ctx 0 alloc 100M alloc 200M");
            on_1.expect_ok(2);
            on_1.expect_err(3, 2);
            let on_0 = victim_on_gpu(sim, ctl, 0, "init ctx 0 alloc 700M alloc 400M");
            on_0.expect_ok(2);
            on_0.expect_err(3, 2);
            let l = ctl.ls();
            assert_eq!((l.group_refusals("victim", 0), l.group_refusals("victim", 1)), (1, 1), "each refusal on its own GPU's slot:\n{l}");
            assert_eq!((l.group_peak("victim", 0), l.group_peak("victim", 1)), (764 * MIB, 164 * MIB), "{l}");
        },
        |sim, ctl, last| {
            let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
            assert!(last.contains(&format!("d0={u0} d1={u1}")), "the controller's table is back: {last:?}\n{}", ctl.log());
        },
    );
}

/// With no record to take (a start that kept none came between), the slots fail closed: the
/// two the attacker uses are held for it under names no registration can claim (`lost-device-N`,
/// also what the shared table says), the log says so; a `victim` member on GPU 1 gets a slot
/// of its own (2) and is counted there; the held slots are freed when the attacker exits.
#[test]
fn a_device_table_swapped_before_a_restart_without_a_record_fails_closed() {
    if skip_unless_root("a_device_table_swapped_before_a_restart_without_a_record_fails_closed") {
        return;
    }
    swapped_across_a_restart(
        true,
        |sim, ctl, l| {
            let uuid = |l: &Listing, d: u32| l.group_device("victim", d)["uuid"].as_str().unwrap_or_default().to_string();
            assert_eq!((uuid(l, 0), uuid(l, 1)), ("lost-device-0".to_string(), "lost-device-1".to_string()), "{l}\n{}", ctl.log());
            assert!(ctl.log().contains("a controller that kept no record ran since"), "{}", ctl.log());
            assert!(ctl.log().contains("device slot 0: which GPU it is is not known to the controller"), "{}", ctl.log());
            // Held to the group's limit of that slot (1 GiB): a per-device limit set on a held
            // slot (256 MiB on slot 1) does not follow its GPU, which is not known (NOTES).
            let on_1 = victim_on_gpu(sim, ctl, 1, "init ctx 0 alloc 700M alloc 400M");
            on_1.expect_ok(2);
            on_1.expect_err(3, 2);
            let l = ctl.ls();
            assert_eq!(uuid(&l, 2), sim.device_uuid(1), "GPU 1 got a slot of its own:\n{l}");
            assert_eq!((l.group_refusals("victim", 2), l.group_refusals("victim", 0), l.group_refusals("victim", 1)), (1, 0, 0), "{l}");
        },
        |_, ctl, last| {
            assert!(last.contains("d0=lost-device-0 d1=lost-device-1"), "{last:?}\n{}", ctl.log());
        },
    );
}

/// A group made from its first member's environment gets that limit on every device, not only
/// on the devices that member saw (`CUDA_VISIBLE_DEVICES=0` used to leave device 1 unlimited).
#[test]
fn a_group_from_the_environment_is_limited_on_every_device() {
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", 64 * MIB);
    let ctl = sim.controller();
    let done = sim.path("done");
    let first = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("team")
        .env("CUDA_VISIBLE_DEVICES", "0")
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .args(&format!("init ctx 0 waitfile {}", show(&done)))
        .spawn();
    first.wait_line("ctx", 0);
    let out = sim.client(Route::Link).shim().controller(&ctl).group("team").args("init ctx 1 alloc 1200M info").run();
    out.expect_err(2, 2);
    assert_eq!(out.u64("info", "total"), GIB, "device 1 is limited too:\n{out}");
    touch(&done);
    first.wait().assert_success();
}

/// The CI acceptance test of the no-fail-open policy: the controller killed with SIGKILL, 25
/// processes of a group start while it is down for 1 s, then it restarts: every one of them
/// waited and registered, and none ran above the group's limit. Two members that hold 600 MiB
/// live through it: the restarted controller takes their group's memory back from them
/// (`ledger::regions`), so the 25 newcomers count against the same figure.
#[test]
fn processes_started_while_the_controller_is_down_wait_for_it() {
    // A small context reserve: a context's reserve is charged whatever the limit (it exists
    // once the context does), so 25 large reserves alone could pass the limit; that is not
    // what this test is about.
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", MIB);
    let mut ctl = sim.controller_with_config("[groups.g]\nmemory_limit = \"1GiB\"\n");
    let (go, done) = (sim.path("go"), sim.path("done"));
    let survivors: Vec<Running> = (0..2)
        .map(|_| sim.client(Route::Link).shim().controller(&ctl).group("g").args(&format!("init ctx 0 alloc 300M waitfile {}", show(&done))).spawn())
        .collect();
    for c in &survivors {
        expect_ok(&c.wait_line("alloc", 0));
    }
    ctl.kill9();
    let clients: Vec<Running> = (0..25)
        .map(|_| {
            sim.client(Route::Link)
                .shim()
                .controller(&ctl)
                .group("g")
                .env("GPUSLICE_LOG", "info")
                .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
                .env("GPUSLICE_CONTROLLER_WAIT", "20")
                .args(&format!("init ctx 0 waitfile {} alloc 100M info waitfile {}", show(&go), show(&done)))
                .spawn()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    ctl.restart();
    // Every context (and its reserve, charged whatever the limit) first, then the allocations.
    for c in &clients {
        expect_ok(&c.wait_line("ctx", 0));
    }
    touch(&go);
    let lines: Vec<String> = clients.iter().map(|c| c.wait_line("info", 0)).collect();
    let l = ctl.ls();
    assert_eq!(l.members("g").len(), 27, "all 25 registered after the restart, with the 2 survivors:\n{l}");
    let peak = l.group_peak("g", 0);
    assert!(peak <= GIB, "the group never held more than its limit: peak {peak}\n{l}");
    for line in &lines {
        assert_eq!(num(line, "total"), GIB, "each sees the group's limit: {line}");
    }
    touch(&done);
    let mut granted = 0;
    for c in clients {
        let out = c.wait();
        out.assert_success();
        assert!(!out.stderr_lines_with(&["waiting for the gpuslice controller"]).is_empty(), "it said it waited:\n{out}");
        assert!(out.stderr_lines_with(&["registered with the gpuslice controller"]).len() == 1, "{out}");
        assert!(!out.stderr.contains("running alone"), "{out}");
        granted += out.ok(3) as u64;
    }
    for c in survivors {
        c.wait().assert_success();
    }
    // 27 reserves of 1 MiB, the survivors' 600 MiB: exactly three 100 MiB allocations fit in 1 GiB.
    assert_eq!(granted, 3, "{granted} of 25 allocations granted");
}

/// Without the controller, and told to have one, a process refuses CUDA after its wait (the
/// default policy), saying why; with `alone` it runs on its own environment's limits.
#[test]
fn no_controller_means_refuse_by_default_and_alone_when_asked() {
    let sim = Sim::new();
    let gone = sim.path("gone.sock");
    let out = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_SOCKET", show(&gone))
        .env("GPUSLICE_ON_NO_CONTROLLER", "")
        .env("GPUSLICE_CONTROLLER_WAIT", "0.5")
        .group("g")
        .args("init ctx 0")
        .run();
    assert_eq!(out.code(0), 800, "cuInit refused with CUDA_ERROR_NOT_PERMITTED:\n{out}");
    let lines = out.stderr_lines_with(&["no gpuslice controller at", &show(&gone), "CUDA is refused", "GPUSLICE_ON_NO_CONTROLLER=refuse"]);
    assert_eq!(lines.len(), 1, "{out}");
    assert!(!out.stderr_lines_with(&["waiting for the gpuslice controller"]).is_empty(), "{out}");
    let out = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_SOCKET", show(&gone))
        .env("GPUSLICE_ON_NO_CONTROLLER", "alone")
        .env("GPUSLICE_CONTROLLER_WAIT", "0.5")
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .group("g")
        .args("init ctx 0 alloc 1200M info")
        .run();
    out.expect_ok(0);
    out.expect_err(2, 2);
    assert_eq!(out.stderr_lines_with(&["running alone", "GPUSLICE_ON_NO_CONTROLLER=alone"]).len(), 1, "{out}");
}

/// A program refused for want of a controller that calls `cuInit` again waits again, and
/// registers once the controller is back: the refusal is not for life.
#[test]
fn a_refused_process_calling_cuinit_again_registers_once_the_controller_is_back() {
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", 64 * MIB);
    let mut ctl = sim.controller_with_config("[groups.g]\nmemory_limit = \"1GiB\"\n");
    ctl.stop();
    let back = sim.path("back");
    let c = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("g")
        .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
        .env("GPUSLICE_CONTROLLER_WAIT", "0.3")
        .args(&format!("init ctx 0 waitfile {} init ctx 0 alloc 1200M info", show(&back)))
        .spawn();
    let first = c.wait_line("init", 0);
    assert_eq!(line_code(&first), Some(800), "refused while no controller runs: {first}");
    let ctx = c.wait_line("ctx", 0);
    assert!(!line_ok(&ctx), "no context either: {ctx}");
    ctl.restart();
    touch(&back);
    let out = c.wait();
    out.assert_success();
    out.expect_ok(3);
    out.expect_ok(4);
    out.expect_err(5, 2);
    assert_eq!(out.u64("info", "total"), GIB, "held to the group's limit:\n{out}");
}

/// Truncating (or growing, or sealing) every descriptor a registered process was handed: all
/// refused (sealed memfds; the settings page is read-only), so nothing is taken from under
/// anyone and the controller stays up without a restart.
#[test]
fn truncating_every_descriptor_is_refused_and_the_controller_stays_up() {
    if skip_unless_root("truncating_every_descriptor_is_refused_and_the_controller_stays_up") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let size = std::fs::metadata(ctl.ledger()).unwrap().len();
    let a = attack(&sim, &ctl, "truncate", 1.0);
    let line = a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    let _ = a.wait();
    for fd in 0..3 {
        for refused in ["truncate=refused", "grow=refused", "seal=refused", "reopen=refused"] {
            assert!(line.contains(&format!("fd{fd}:")) && fd_report(&line, fd).contains(refused), "fd{fd}: {refused}: {line}");
        }
    }
    assert_eq!(std::fs::metadata(ctl.ledger()).unwrap().len(), size, "the ledger file is out of reach");
    assert!(ctl.cli("status").run().success(), "the controller is still up:\n{}", ctl.log());
    still_sound(&sim, &mut ctl);
}

/// What `assault` said about descriptor `fd`.
fn fd_report(line: &str, fd: usize) -> String {
    let start = line.find(&format!("fd{fd}:")).unwrap_or(line.len());
    line[start..].split(" fd").next().unwrap_or("").to_string()
}

/// Random bytes, zeros and 0xFF over every shared mapping a registered process can make of
/// what it was handed, while a member of another group holds memory: the attacker writes its
/// own group's memory and the device table, cannot write its settings page, and cannot reach
/// the victim group's counters at all. Afterwards the victim's books are exact (its next member
/// gets exactly what is left of its 1 GiB), its peak never passed its limit, and the
/// controller answers, lists and restarts.
#[test]
fn scribbling_and_truncation_cannot_reach_other_groups() {
    if skip_unless_root("scribbling_and_truncation_cannot_reach_other_groups") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let go = sim.path("victim-go");
    let victim = |script: String| sim.client(Route::Link).shim().controller(&ctl).group("victim").args(&script).spawn();
    // 64 MiB context + 600 MiB.
    let holder = victim(format!("init ctx 0 alloc 600M waitfile {}", show(&go)));
    assert!(line_ok(&holder.wait_line("alloc", 0)), "the victim's first member allocates");
    for how in ["scribble-random", "scribble-zeros", "scribble-ff"] {
        let a = attack(&sim, &ctl, how, 0.5);
        let line = a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
        let _ = a.wait();
        assert!(fd_report(&line, 0).contains("write=ok") && fd_report(&line, 1).contains("write=ok"), "its own group's memory and the device memory: {line}");
        assert!(fd_report(&line, 2).contains("write=refused") && fd_report(&line, 2).contains("reopen=refused"), "the settings page stays read-only: {line}");
    }
    // 664 MiB held: a second member's context (64) and 200 MiB fit, 200 MiB more do not.
    let out = sim.client(Route::Link).shim().controller(&ctl).group("victim").args("init ctx 0 alloc 200M alloc 200M").run();
    out.assert_success();
    out.expect_ok(2);
    out.expect_err(3, 2);
    std::fs::write(&go, "").unwrap();
    holder.wait().assert_success();
    let l = ctl.ls();
    assert!(l.group_peak("victim", 0) <= GIB, "the victim never ran above its limit:\n{l}");
    assert!(!ctl.log().contains("panicked"), "{}", ctl.log());
    still_sound(&sim, &mut ctl);
}

/// A member's own priority and the cross-check's penalty on its group live on the group's
/// members page, read-only to members (layout 6); before, they sat in the writable process
/// slot and the controller put them back each tick, so a member could raise its priority or
/// clear its penalty between ticks. Here a member of group `liars` (uid 65534, priority low)
/// under-reports 512 MiB and is charged; then another member of the same tenant writes
/// priority high and a zero penalty into every live slot of the group, every millisecond,
/// while the first one launches and allocates. It launches as low (no high-priority slot),
/// its 300 MiB is still refused on the driver's figure, and the pages a shim reads never
/// showed anything else. A high member launched beside it shows the line it would have printed.
#[test]
fn a_member_cannot_raise_its_own_priority_or_clear_its_penalty() {
    if skip_unless_root("a_member_cannot_raise_its_own_priority_or_clear_its_penalty") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(&format!("{CONFIG}[groups.liars]\nmemory_limit = \"1GiB\"\n"));
    open_state_to_all(&sim);
    let (go, done) = (sim.path("liar-go"), sim.path("liar-done"));
    let member = |priority: &str, script: String| {
        sim.client(Route::Link).shim().controller(&ctl).group("liars").uid(NOBODY).env("GPUSLICE_PRIORITY", priority).env("GPUSLICE_LOG", "info").args(&script)
    };
    let liar =
        member("low", format!("init ctx 0 alloc 800M nvmlprocs 0 waitfile {} launch 20 100000 alloc 300M alloc 100M waitfile {}", show(&go), show(&done)))
            .env("GPUSLICE_TEST_UNDERREPORT_BYTES", "512MiB")
            .spawn();
    expect_ok(&liar.wait_line("nvmlprocs", 0));
    let flagged = |l: &Listing| l.json["underreporting"].as_array().is_some_and(|a| a.iter().any(|r| r["charged"].as_u64() == Some(512 * MIB)));
    ctl.ls_until("the cross-check charges the liar", Duration::from_secs(20), flagged);
    let a = attack(&sim, &ctl, "own-settings", 3.0);
    a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    std::fs::write(&go, "").unwrap();
    liar.wait_line("alloc", 2);
    // The liar stays registered (and charged) until the attacker is done.
    let report = a.wait();
    std::fs::write(&done, "").unwrap();
    let out = liar.wait();
    let i = out.lines.iter().position(|l| l.starts_with("ok waitfile")).expect("waitfile") + 1;
    out.expect_ok(i);
    out.expect_err(i + 1, 2);
    out.expect_ok(i + 2);
    assert!(out.stderr.contains("of which 512.0 MiB the controller charged"), "the penalty still counts:\n{out}");
    assert!(!out.stderr.contains("high priority on device"), "it launched as low:\n{out}");
    report.assert_success();
    let line = report.lines.iter().find(|l| l.starts_with("scribbled")).unwrap_or_else(|| panic!("{report}"));
    assert!(line.contains("seen_high=0 seen_no_penalty=0") && !line.contains("writes=0 "), "what a shim reads never changed: {line}");
    // The control: the same line from a member the controller made high.
    let high = member("high", "init ctx 0 launch 2 100000".into()).run();
    high.assert_success();
    assert!(high.stderr.contains("high priority on device"), "{high}");
    assert!(!ctl.log().contains("panicked"), "{}", ctl.log());
    still_sound(&sim, &mut ctl);
}

/// Branch turntoken: a root member of `victim` holds the turn on device 0, taken as a shim
/// takes it (under the token in its slot: the controller's pick); a member of another group
/// (uid 65534) reads the holder's token from the device table, writes it into its own process
/// slot and exits. The controller used to free the turn held under the released slot's token,
/// so it handed the victim's turn over; now it frees only the token it gave the process it
/// releases. The attacker could write the turn itself (it maps the device table): what this
/// checks is that the controller does not do it for it.
#[test]
fn a_member_naming_another_process_turn_in_its_slot_does_not_free_that_turn() {
    if skip_unless_root("a_member_naming_another_process_turn_in_its_slot_does_not_free_that_turn") {
        return;
    }
    let sim = machine();
    let ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let stop = sim.path("stop");
    let holder = attacker_program(&sim, &ctl, "hold-turn").env("ATTACK_STOP", show(&stop)).spawn();
    let holding = holder.wait_for("holding", Duration::from_secs(10), |l| l.contains("holding token="));
    let token = holding.split_whitespace().find_map(|w| w.strip_prefix("token=")).expect("its token").to_string();
    let a = attack(&sim, &ctl, "steal-turn", 0.0);
    let stole = a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    assert!(stole.contains(&format!("token={token}")), "it wrote the holder's token into its slot: {stole:?} ({holding:?})");
    let attacker = a.pid();
    a.wait().assert_success();
    let released = poll_until(Duration::from_secs(5), || ctl.log().contains(&format!("pid {attacker} exited")));
    assert!(released, "the controller released the attacker:\n{}", ctl.log());
    touch(&stop);
    let after = holder.wait_for("after", Duration::from_secs(10), |l| l.contains("after held="));
    assert!(after.contains("after held=true"), "the victim still holds its turn: {after:?}\n{}", ctl.log());
    let log = ctl.log();
    assert!(!log.contains(&format!("pid {attacker} exited: its turn")), "{log}");
    holder.wait().assert_success();
}

/// Branch turntoken: the cross-check judges the processes the controller watches, each by the
/// token it gave it, not the live slots by their generation. A member of `liars` (uid 65534)
/// writes FREE and a new generation into every slot of its group every millisecond while a
/// group-mate under-reports 512 MiB: the under-reporter is charged all the same. Before, the
/// check skipped a slot whose generation moved while the driver was asked, so it never saw the
/// shortfall twice in a row and never charged it.
#[test]
fn rewriting_slot_generations_does_not_dodge_the_cross_check() {
    if skip_unless_root("rewriting_slot_generations_does_not_dodge_the_cross_check") {
        return;
    }
    let sim = machine();
    let ctl = sim.controller_with_config(&format!("{CONFIG}[groups.liars]\nmemory_limit = \"1GiB\"\n"));
    open_state_to_all(&sim);
    let (stop, done) = (sim.path("stop"), sim.path("done"));
    let a = attacker_program(&sim, &ctl, "dodge-check").uid(NOBODY).env("ATTACK_STOP", show(&stop)).spawn();
    a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    let liar = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("liars")
        .uid(NOBODY)
        .env("GPUSLICE_TEST_UNDERREPORT_BYTES", "512MiB")
        .args(&format!("init ctx 0 alloc 800M waitfile {}", show(&done)))
        .spawn();
    expect_ok(&liar.wait_line("alloc", 0));
    let flagged = |l: &Listing| l.json["underreporting"].as_array().is_some_and(|a| a.iter().any(|r| r["charged"].as_u64() == Some(512 * MIB)));
    ctl.ls_until("the cross-check charges the liar", Duration::from_secs(20), flagged);
    touch(&stop);
    let report = a.wait();
    report.assert_success();
    let line = report.lines.iter().find(|l| l.starts_with("dodged")).unwrap_or_else(|| panic!("{report}"));
    assert!(!line.contains("writes=0 "), "it wrote: {line}");
    touch(&done);
    liar.wait().assert_success();
}

/// Branch lsview: a member of `liars` (configured: 256 MiB, SM 30 % up to 60 %, low) writes
/// unlimited, share 0, cap 100, high priority and the name `victim` into its group's writable
/// copy every millisecond, and bumps its group slot's and its own slot's generation. While it
/// runs, `ls` (JSON and text), the metrics endpoint, the register log line and the note a new
/// member is given show the configured values, the name `liars` and the operator's labels: the
/// controller's settings, not the copy (which it puts back only once a tick). Before, `ls` and
/// the metrics read the copy and showed the member's values between ticks. The attacker runs
/// as uid 65534 where the test may switch to it; what it writes is its own group's memory,
/// whatever its uid.
#[test]
fn a_member_lying_in_its_groups_copy_does_not_change_what_operators_read() {
    let sim = machine();
    let port = free_port();
    let config = sim.write_file("lsview.toml", "[groups.liars]\nmemory_limit = \"256MiB\"\nsm_share = 30\nsm_max = 60\npriority = \"low\"\n");
    let ctl = sim.controller_with_args(&["--config", &show(&config), "--metrics", &format!("127.0.0.1:{port}")]);
    let labels = [("claim_name".to_string(), "trainer".to_string())].into();
    let labelled = protocol::call(ctl.socket(), &Request::LabelGroup(protocol::GroupLabels { group: "liars".into(), labels }), Duration::from_secs(5));
    assert!(matches!(labelled, Ok((Response::Done { .. }, _))), "{labelled:?}");
    let stop = sim.path("stop");
    let liar = attacker_program(&sim, &ctl, "lie-in-copy").env("ATTACK_STOP", show(&stop));
    let liar = if is_root() {
        open_state_to_all(&sim);
        liar.uid(NOBODY)
    } else {
        liar
    };
    let a = liar.spawn();
    a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    let rewritten = poll_until(Duration::from_secs(5), || ctl.log().contains("shared memory was rewritten by a tenant"));
    assert!(rewritten, "the lies reach the copy (the controller puts them back):\n{}", ctl.log());

    // As an operator reads them, many times over: a tick puts the copy back every 100 ms, the
    // attacker rewrites it every millisecond.
    for i in 0..20 {
        let l = ctl.ls();
        assert!(l.group("victim").is_none(), "ls {i}: no group takes the name the member wrote:\n{l}");
        let g = l.group("liars").unwrap_or_else(|| panic!("ls {i}: liars is listed:\n{l}"));
        assert_eq!(g["priority"], "low", "ls {i}:\n{l}");
        assert_eq!(g["labels"]["claim_name"], "trainer", "ls {i}: the operator's labels:\n{l}");
        for d in 0..2 {
            let row = l.group_device("liars", d);
            assert_eq!((row["limit"].as_u64(), row["share"].as_u64(), row["cap"].as_u64()), (Some(256 * MIB), Some(30), Some(60)), "ls {i}, device {d}:\n{l}");
        }
    }
    for i in 0..5 {
        let out = ctl.cli("ls").run();
        out.assert_success();
        let text = out.lines.join("\n");
        let rows: Vec<&String> = out.lines.iter().filter(|l| l.starts_with("liars ")).collect();
        assert_eq!(rows.len(), 2, "ls {i}: liars on both devices:\n{text}");
        for row in rows {
            assert!(row.contains("/ 256.0 MiB 30-60%") && row.contains(" low "), "ls {i}:\n{text}");
        }
        assert!(!text.contains("victim"), "ls {i}:\n{text}");
    }
    for i in 0..20 {
        let (status, _, body) = http_get(port, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        for d in 0..2 {
            let series = |name: &str| {
                let labels =
                    ["group=\"liars\"".to_string(), format!("device=\"{d}\""), format!("uuid=\"{}\"", sim.device_uuid(d)), "claim_name=\"trainer\"".into()];
                metric(&body, name, &labels).unwrap_or_else(|| panic!("scrape {i}: no {name} for liars on device {d}:\n{body}"))
            };
            assert_eq!(series("gpuslice_group_memory_limit_bytes"), (256 * MIB) as f64, "scrape {i}:\n{body}");
            assert_eq!(series("gpuslice_group_sm_share_target_ratio"), 0.3, "scrape {i}:\n{body}");
            assert_eq!(series("gpuslice_group_sm_share_cap_ratio"), 0.6, "scrape {i}:\n{body}");
        }
        let priority = metric(&body, "gpuslice_group_priority", &["group=\"liars\"".into(), "claim_name=\"trainer\"".into()]);
        assert_eq!(priority, Some(1.0), "scrape {i}: low:\n{body}");
        assert!(!body.contains("group=\"victim\""), "scrape {i}:\n{body}");
    }
    // A member joining meanwhile: the log line and its note say the group's values.
    let joiner = sim.client(Route::Link).shim().controller(&ctl).group("liars").env("GPUSLICE_MEMORY_LIMIT", "512MiB").args("init ctx 0").spawn();
    let joiner_pid = joiner.pid();
    let joined = joiner.wait();
    joined.assert_success();
    assert!(joined.stderr.contains("group \"liars\" already has 256"), "its note:\n{joined}");
    let log = ctl.log();
    let line = log.lines().find(|l| l.contains(&format!("registered pid {joiner_pid} "))).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("in group \"liars\": device 0: memory 256") && line.contains("SM 30% (up to 60%)") && line.ends_with("priority low"), "{line}");
    assert!(alive(a.pid() as i32), "all of the above was read while the attacker still wrote");
    touch(&stop);
    let report = a.wait();
    report.assert_success();
    let line = report.lines.iter().find(|l| l.starts_with("lied")).unwrap_or_else(|| panic!("{report}"));
    assert!(!line.contains("writes=0 "), "it wrote: {line}");
}

/// The value of the sample of `name` whose labels include every one of `labels` (`key="value"`).
fn metric(body: &str, name: &str, labels: &[String]) -> Option<f64> {
    body.lines().filter_map(|l| l.strip_prefix(name)?.strip_prefix('{')).find_map(|rest| {
        let (series, value) = rest.rsplit_once("} ")?;
        let have: Vec<&str> = series.split(',').collect();
        labels.iter().all(|l| have.contains(&l.as_str())).then(|| value.parse().ok())?
    })
}

// ------------------------------------------------------------------------------- the attacker

/// Not a test of its own: the hostile process the tests above start as uid 65534.
#[test]
#[ignore = "a helper process of the adversarial tests"]
fn attacker() {
    let socket = PathBuf::from(std::env::var_os("ATTACK_SOCKET").expect("ATTACK_SOCKET: this runs as a helper of another test"));
    let hold = Duration::from_secs_f64(std::env::var("ATTACK_HOLD").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0));
    let uuids: Vec<String> = std::env::var("ATTACK_UUIDS").unwrap_or_default().split(',').map(String::from).collect();
    let real = |limit: Option<u64>| -> Vec<DeviceClaim> {
        uuids
            .iter()
            .enumerate()
            .map(|(i, u)| DeviceClaim { ordinal: i as u32, uuid: u.clone(), total_memory: 16 * GIB, memory_limit: limit, sm_share: None, sm_max: 0 })
            .collect()
    };
    let register = |group: Option<&str>, devices: Vec<DeviceClaim>| -> Result<(protocol::Assignment, Option<Ledger>), String> {
        let r = Registration {
            protocol: protocol::PROTOCOL_VERSION,
            group: group.map(String::from),
            priority: None,
            name: "attacker".into(),
            own_pid: std::process::id(),
            devices,
        };
        match protocol::call_with_fds(&socket, &Request::Register(r), Duration::from_secs(2)).map_err(|e| e.to_string())? {
            (Response::Registered(a), fds) => {
                // What a shim maps: its group's memory with the device memory over the device table.
                let ledger = (fds.len() >= 2).then(|| Ledger::map_group_view(fds[0].as_fd(), fds[1].as_fd()).expect("map the group's memory"));
                Ok((a, ledger))
            }
            (other, _) => Err(format!("{other:?}")),
        }
    };
    let until = Instant::now() + hold;
    match std::env::var("ATTACK").expect("ATTACK").as_str() {
        "corrupt-own-slot" => {
            let (a, l) = register(Some("attackers"), real(None)).expect("register");
            let l = l.expect("the ledger");
            let p = l.process(a.slot as usize);
            p.group.store(u32::MAX, SeqCst);
            p.pid.store(1, SeqCst);
            p.state.store(77, SeqCst);
            p.devices[0].used.store(u64::MAX - 5, SeqCst);
            println!("attacked slot={}", a.slot);
            std::thread::sleep(hold);
        }
        "rewrite-limits" => {
            let (a, l) = register(Some("attackers"), real(Some(256 * MIB))).expect("register");
            let l = l.expect("the ledger");
            println!("attacked slot={}", a.slot);
            while Instant::now() < until {
                for (i, g) in l.groups() {
                    for d in &g.devices {
                        d.limit.store(if i == a.group as usize { UNLIMITED } else { MIB }, SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        "slow-loris" => {
            use std::io::Write;
            let mut conns: Vec<std::os::unix::net::UnixStream> = (0..128).filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok()).collect();
            println!("attacked connections={}", conns.len());
            while Instant::now() < until {
                conns.retain_mut(|c| c.write_all(b"{").is_ok());
                // Reconnect what the controller closed, at once: the worst it can do.
                while conns.len() < 128 {
                    match std::os::unix::net::UnixStream::connect(&socket) {
                        Ok(c) => conns.push(c),
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        "made-up-devices" => {
            let devices = (0..16)
                .map(|i| DeviceClaim {
                    ordinal: i,
                    uuid: format!("GPU-00000000-0000-0000-0000-{i:012x}"),
                    total_memory: 16 * GIB,
                    memory_limit: None,
                    sm_share: None,
                    sm_max: 0,
                })
                .collect();
            let (a, _l) = register(None, devices).expect("register");
            println!("attacked tracked={} notes={}", a.devices.len(), a.notes.len());
            std::thread::sleep(hold);
        }
        "fill-tables" => {
            // Children of this uid, each registering and sleeping.
            let me = std::env::current_exe().unwrap();
            let mut children: Vec<std::process::Child> = (0..10)
                .map(|_| {
                    std::process::Command::new(&me)
                        .args(["--exact", "attacker", "--ignored", "--nocapture", "--test-threads=1"])
                        .env("ATTACK", "hold-one")
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .expect("spawn")
                })
                .collect();
            let mut registered = 0;
            for c in &mut children {
                use std::io::BufRead;
                let out = c.stdout.take().unwrap();
                let line = std::io::BufReader::new(out).lines().find_map(|l| l.ok().filter(|l| l.contains("held ")));
                registered += line.is_some_and(|l| l.contains("ok")) as u32;
            }
            println!("attacked registered={registered}");
            for mut c in children {
                let _ = c.wait();
            }
        }
        "hold-one" => {
            let r = register(None, real(None));
            println!("held {}", if r.is_ok() { "ok" } else { "refused" });
            std::thread::sleep(hold);
        }
        "squat" => {
            let (a, _l) = register(Some("prod"), real(None)).expect("register");
            println!("attacked group={}", a.group_name);
            std::thread::sleep(hold);
        }
        "scribble-random" | "scribble-zeros" | "scribble-ff" | "truncate" => {
            let how = std::env::var("ATTACK").unwrap();
            let r = Registration {
                protocol: protocol::PROTOCOL_VERSION,
                group: Some("attackers".into()),
                priority: None,
                name: "attacker".into(),
                own_pid: std::process::id(),
                devices: real(None),
            };
            let (_, fds) = protocol::call_with_fds(&socket, &Request::Register(r), Duration::from_secs(2)).expect("register");
            assert_eq!(fds.len(), 3, "a registration hands out three descriptors");
            let mut report = Vec::new();
            for (i, fd) in fds.iter().enumerate() {
                report.push(format!("fd{i}:{}", assault(fd.as_raw_fd(), &how)));
            }
            println!("attacked {how} {}", report.join(" "));
            std::thread::sleep(hold);
        }
        "own-settings" => {
            let r = Registration {
                protocol: protocol::PROTOCOL_VERSION,
                group: Some("liars".into()),
                priority: Some(Priority::Low),
                name: "attacker".into(),
                own_pid: std::process::id(),
                devices: real(None),
            };
            let (a, fds) = match protocol::call_with_fds(&socket, &Request::Register(r), Duration::from_secs(2)).expect("register") {
                (Response::Registered(a), fds) if fds.len() == 3 => (a, fds),
                (other, fds) => panic!("{other:?} with {} descriptors", fds.len()),
            };
            let l = Ledger::map_group_view(fds[0].as_fd(), fds[1].as_fd()).expect("map the group's memory");
            let page = SettingsPage::map(fds[2].as_fd(), false).expect("map the settings read-only");
            let (group, members) = (page.slot(), page.members());
            let (mut writes, mut seen_high, mut seen_no_penalty) = (0u64, 0u64, 0u64);
            println!("attacked slot={}", a.slot);
            while Instant::now() < until {
                for (i, p) in l.processes().filter(|(_, p)| p.state.load(SeqCst) == LIVE) {
                    // Where layout 5 kept them, and where a shim of layout 6 reads them.
                    p._was_priority.store(Priority::High as u32, SeqCst);
                    for d in 0..MAX_DEVICES {
                        p.devices[d]._was_penalty.store(0, SeqCst);
                    }
                    writes += 1;
                    seen_high += u64::from(members.priority_of(i, group) == Priority::High);
                }
                seen_no_penalty += u64::from(members.penalty(0) == 0);
                std::thread::sleep(Duration::from_millis(1));
            }
            println!("scribbled writes={writes} seen_high={seen_high} seen_no_penalty={seen_no_penalty}");
        }
        "forge-slot" => {
            // Registers in "attackers"; from the file ATTACK_GO on, until ATTACK_STOP, keeps
            // writing into its own slot 900 MiB used and what ATTACK_FORGE names (a controller
            // restarts meanwhile); then says what its slot holds once the controller had time
            // to put its own values back.
            let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k}"));
            let (go, stop) = (PathBuf::from(env("ATTACK_GO")), PathBuf::from(env("ATTACK_STOP")));
            let forge = env("ATTACK_FORGE");
            let (victim, foreign): (u32, u32) = (env("ATTACK_VICTIM").parse().unwrap(), env("ATTACK_PID").parse().unwrap());
            let (a, l) = register(Some("attackers"), real(None)).expect("register");
            let l = l.expect("the ledger");
            let p = l.process(a.slot as usize);
            println!("registered slot={} group={}", a.slot, a.group);
            while !go.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut writes = 0u64;
            while !stop.exists() {
                p.devices[0].used.store(900 * MIB, SeqCst);
                match forge.as_str() {
                    "group" => p.group.store(victim, SeqCst),
                    "uid" => p.uid.store(0, SeqCst),
                    "pid" => {
                        p.pid.store(foreign, SeqCst);
                        p.start_time.store(0, SeqCst);
                    }
                    "cap" => p.devices[0].limit.store(UNLIMITED, SeqCst),
                    other => panic!("no forgery {other:?}"),
                }
                writes += 1;
                if writes == 1 {
                    println!("attacked {forge}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(500));
            let limit = p.devices[0].limit.load(SeqCst);
            println!("after group={} pid={} uid={} limit={limit} writes={writes}", p.group.load(SeqCst), p.pid.load(SeqCst), p.uid.load(SeqCst));
        }
        "hide-settings" => {
            // Registers in "attackers" (256 MiB and 30 % from its claims) and lets go of its
            // settings page at once (neither kept open nor mapped: a restarted controller finds
            // it in no process); from ATTACK_GO on, until ATTACK_STOP, keeps writing into its
            // group's writable copy everything a restart used to take from there when the page
            // was not found; then says what its copy holds once the controller put its values
            // back, and stays a member until ATTACK_DONE.
            let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k}"));
            let (go, stop) = (PathBuf::from(env("ATTACK_GO")), PathBuf::from(env("ATTACK_STOP")));
            let devices = real(Some(256 * MIB)).into_iter().map(|c| DeviceClaim { sm_share: Some(30), ..c }).collect();
            let r = Registration {
                protocol: protocol::PROTOCOL_VERSION,
                group: Some("attackers".into()),
                priority: None,
                name: "attacker".into(),
                own_pid: std::process::id(),
                devices,
            };
            let (a, fds) = match protocol::call_with_fds(&socket, &Request::Register(r), Duration::from_secs(2)).expect("register") {
                (Response::Registered(a), fds) if fds.len() == 3 => (a, fds),
                (other, fds) => panic!("{other:?} with {} descriptors", fds.len()),
            };
            let l = Ledger::map_group_view(fds[0].as_fd(), fds[1].as_fd()).expect("map the group's memory");
            drop(fds);
            let g = l.group(a.group as usize);
            println!("registered slot={} group={}", a.slot, a.group);
            while !go.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut writes = 0u64;
            while !stop.exists() {
                for d in 0..MAX_DEVICES {
                    g.devices[d].limit.store(UNLIMITED, SeqCst);
                    g.set_share(d, 0);
                    g.set_cap(d, 100);
                }
                g.priority.store(Priority::High as u32, SeqCst);
                g.pinned.store(1, SeqCst);
                g.owner.store(Owner::Open.word(), SeqCst);
                g.set_name("victim");
                writes += 1;
                if writes == 1 {
                    println!("attacked");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(500));
            println!("after name={} limit={} writes={writes}", g.name(), g.devices[0].limit.load(SeqCst));
            let done = PathBuf::from(env("ATTACK_DONE"));
            while !done.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        "swap-devices" => {
            // Registers in "attackers" on both GPUs; from ATTACK_GO on, until ATTACK_STOP, keeps
            // writing into the shared device table each GPU's UUID at the other's slot (a
            // controller restarts meanwhile); then says what the table holds once the controller
            // had time to put its own back, and stays a member until ATTACK_DONE.
            let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k}"));
            let (go, stop, done) = (PathBuf::from(env("ATTACK_GO")), PathBuf::from(env("ATTACK_STOP")), PathBuf::from(env("ATTACK_DONE")));
            let (a, l) = register(Some("attackers"), real(None)).expect("register");
            let l = l.expect("the ledger");
            let slots: Vec<usize> = a.devices.iter().map(|&(_, index)| index as usize).collect();
            assert_eq!(slots.len(), 2, "{:?}", a.devices);
            println!("registered slot={} devices={slots:?}", a.slot);
            while !go.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut writes = 0u64;
            while !stop.exists() {
                for (ordinal, &slot) in slots.iter().enumerate() {
                    gpuslice_common::ledger::write_text(&l.device(slot).uuid, &uuids[1 - ordinal]);
                }
                writes += 1;
                if writes == 1 {
                    println!("attacked");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(500));
            println!("after {} writes={writes}", slots.iter().map(|&d| format!("d{d}={}", l.device(d).uuid())).collect::<Vec<_>>().join(" "));
            while !done.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        "hold-turn" => {
            // A member of `victim` (as root) that holds the turn on its device 0 as a shim does:
            // under the token the controller wrote into its slot (a controller from before
            // branch turntoken wrote none: then its own, written there, as a shim did), with a
            // 5 s lease, until ATTACK_STOP; then says whether it still holds it.
            let stop = PathBuf::from(std::env::var("ATTACK_STOP").expect("ATTACK_STOP"));
            let (a, l) = register(Some("victim"), real(None)).expect("register");
            let l = l.expect("the ledger");
            let p = l.process(a.slot as usize);
            let me = match p.token.load(SeqCst) {
                0 => {
                    let mine = u64::from(std::process::id()) << 32 | 0x5eed;
                    p.token.store(mine, SeqCst);
                    mine
                }
                given => given,
            };
            let turn = &l.device(a.devices[0].1 as usize).sched.turn;
            let lease = gpuslice_common::ledger::monotonic_ns() + 5_000_000_000;
            let ticket = turn.take(me, 0, lease, 0, &gpuslice_common::turns::Monotonic, |_| u64::MAX).ticket.expect("a free turn");
            println!("holding token={me:#x} ticket={ticket}");
            while !stop.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            println!("after held={} holder={:#x}", turn.held_by(me, ticket), turn.holder.load(SeqCst));
        }
        "steal-turn" => {
            // A member of "attackers": reads the token of whoever holds the turn on its device 0
            // from the device table (every member maps it), writes it into its own slot, exits.
            let (a, l) = register(Some("attackers"), real(None)).expect("register");
            let l = l.expect("the ledger");
            let turn = &l.device(a.devices[0].1 as usize).sched.turn;
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut holder = turn.holder.load(SeqCst);
            while holder == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                holder = turn.holder.load(SeqCst);
            }
            l.process(a.slot as usize).token.store(holder, SeqCst);
            println!("attacked token={holder:#x}");
        }
        "lie-in-copy" => {
            // A member of "liars": until ATTACK_STOP, writes into its group's writable copy the
            // settings it would like operators to read, and new generations into its group
            // slot and its own slot, every millisecond.
            let stop = PathBuf::from(std::env::var("ATTACK_STOP").expect("ATTACK_STOP"));
            let (a, l) = register(Some("liars"), real(None)).expect("register");
            let l = l.expect("the ledger");
            let (g, p) = (l.group(a.group as usize), l.process(a.slot as usize));
            let mut writes = 0u64;
            while !stop.exists() {
                for d in 0..MAX_DEVICES {
                    g.devices[d].limit.store(UNLIMITED, SeqCst);
                    g.set_share(d, 0);
                    g.set_cap(d, 100);
                }
                g.priority.store(Priority::High as u32, SeqCst);
                g.set_name("victim");
                g.generation.fetch_add(1, SeqCst);
                p.generation.fetch_add(1, SeqCst);
                writes += 1;
                if writes == 1 {
                    println!("attacked");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            println!("lied writes={writes} ");
        }
        "dodge-check" => {
            // A member of "liars": until ATTACK_STOP, writes FREE and a new generation into
            // every slot of its group's memory that names a pid, every millisecond.
            let stop = PathBuf::from(std::env::var("ATTACK_STOP").expect("ATTACK_STOP"));
            let (_a, l) = register(Some("liars"), real(None)).expect("register");
            let l = l.expect("the ledger");
            println!("attacked");
            let mut writes = 0u64;
            while !stop.exists() {
                for (_, p) in l.processes().filter(|(_, p)| p.pid.load(SeqCst) != 0) {
                    p.generation.fetch_add(1, SeqCst);
                    p.state.store(gpuslice_common::ledger::FREE, SeqCst);
                    writes += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            println!("dodged writes={writes} ");
        }
        other => panic!("no attack {other:?}"),
    }
}

/// Everything a tenant can try on one descriptor it was handed: reopen it read-write through
/// `/proc/self/fd`, truncate it, add a seal, map it shared and writable (else read-only, then
/// `mprotect` it writable), and overwrite what it could map. Returns what worked, as
/// `reopen=.. truncate=.. grow=.. seal=.. write=..` (`ok` or `refused`).
fn assault(fd: i32, how: &str) -> String {
    let said = |ok: bool| if ok { "ok" } else { "refused" };
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).unwrap();
    // SAFETY: the attack: plain system calls on this process's own descriptors and mappings.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st);
        let len = st.st_size as usize;
        let reopened = libc::open(path.as_ptr(), libc::O_RDWR);
        if reopened >= 0 {
            libc::close(reopened);
        }
        let grew = libc::ftruncate(fd, st.st_size * 2) == 0;
        let truncated = if how == "truncate" { libc::ftruncate(fd, 0) == 0 } else { false };
        let sealed = libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE) == 0;
        let mut p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        if p == libc::MAP_FAILED {
            p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0);
            if p == libc::MAP_FAILED || libc::mprotect(p, len, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return format!("reopen={} truncate={} grow={} seal={} write=refused", said(reopened >= 0), said(truncated), said(grew), said(sealed));
            }
        }
        if how != "truncate" {
            let bytes = std::slice::from_raw_parts_mut(p as *mut u8, len);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for b in bytes.iter_mut() {
                *b = match how {
                    "scribble-zeros" => 0,
                    "scribble-ff" => 0xff,
                    _ => {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    }
                };
            }
        }
        format!("reopen={} truncate={} grow={} seal={} write=ok", said(reopened >= 0), said(truncated), said(grew), said(sealed))
    }
}
