//! Issue 13: a hostile tenant, as uid 65534 against a root controller and the simulated driver.
//! Each attack of the issue is run by a helper process (this test binary again, `attacker`,
//! started as uid 65534) that speaks the protocol itself and writes whatever it can reach; then
//! the same checks every time: the controller answers 100 `ls` in a row, the victim group's
//! limit is unchanged and enforced on a real process, and the controller restarts on its own
//! ledger. What is not fixed yet (the ledger is still one shared mapping: scribbling over it,
//! truncating it) is an ignored test that says so.
//!
//! The tests need root to switch to uid 65534; run as any other user they say so and pass
//! without checking anything else.

use gpuslice_common::ledger::{Ledger, UNLIMITED};
use gpuslice_common::protocol::{self, DeviceClaim, Registration, Request, Response};
use gpuslice_integration::*;
use std::os::fd::AsFd;
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
    sim.program(std::env::current_exe().expect("this test binary"))
        .uid(NOBODY)
        .args("--exact attacker --ignored --nocapture --test-threads=1")
        .env("ATTACK", attack)
        .env("ATTACK_SOCKET", show(&ctl.socket()))
        .env("ATTACK_HOLD", hold)
        .env("ATTACK_UUIDS", (0..2).map(|d| sim.device_uuid(d)).collect::<Vec<_>>().join(","))
        .spawn()
}

/// What must hold after every attack: 100 `ls` in a row answered, the victim group's limit
/// unchanged and enforced on a real process, and a controller restart on the same ledger.
fn still_sound(sim: &Sim, ctl: &mut Controller<'_>) {
    for i in 0..100 {
        let out = ctl.cli("ls --json").run();
        assert!(out.success(), "ls {i} of 100 failed:\n{out}\ncontroller log:\n{}", ctl.log());
    }
    let out = sim
        .client(Route::Link)
        .shim()
        .controller(ctl)
        .group("victim")
        .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
        .env("GPUSLICE_CONTROLLER_WAIT", "5")
        .args("init ctx 0 alloc 700M alloc 400M info")
        .run();
    out.assert_success();
    out.expect_ok(2);
    out.expect_err(3, 2);
    assert_eq!(out.u64("info", "total"), GIB, "the victim sees its 1 GiB:\n{out}");
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

/// Rewriting every group's limits in the shared mapping (another group's to 1 MiB, its own to
/// unlimited) over and over: the controller puts its own values back every tick, says who did
/// it, and the victim group keeps its limit. (The window between two ticks, 100 ms, remains
/// until limits reach processes read-only: see LD_PRELOAD.md.)
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
    let out = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("prod")
        .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
        .env("GPUSLICE_CONTROLLER_WAIT", "1")
        .args("init")
        .run();
    assert!(!out.ok(0), "refused, not run unlimited:\n{out}");
    assert_eq!(out.stderr_lines_with(&["made from the environment of a process of uid 65534", "CUDA is refused"]).len(), 1, "{out}");
    ctl.set_ok("--group prod --memory 2GiB");
    let out =
        sim.client(Route::Link).shim().controller(&ctl).group("prod").env("GPUSLICE_ON_NO_CONTROLLER", "refuse").args("init ctx 0 alloc 2100M info").run();
    out.expect_err(2, 2);
    assert_eq!(out.u64("info", "total"), 2 * GIB, "{out}");
    a.wait().assert_success();
    still_sound(&sim, &mut ctl);
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
/// waited and registered, and none ran above the group's limit.
#[test]
fn processes_started_while_the_controller_is_down_wait_for_it() {
    // A small context reserve: a context's reserve is charged whatever the limit (it exists
    // once the context does), so 25 large reserves alone could pass the limit; that is not
    // what this test is about.
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", MIB);
    let mut ctl = sim.controller_with_config("[groups.g]\nmemory_limit = \"1GiB\"\n");
    ctl.kill9();
    let (go, done) = (sim.path("go"), sim.path("done"));
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
    assert_eq!(l.members("g").len(), 25, "all 25 registered after the restart:\n{l}");
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
    // 25 reserves of 1 MiB and the 100 MiB allocations that fit in 1 GiB.
    assert!(granted * 100 * MIB + 25 * MIB <= GIB, "{granted} allocations granted");
    assert!(granted < 25, "the limit refused some: {granted} of 25 granted");
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

/// Truncating the ledger through the descriptor it was handed still kills the controller
/// (SIGBUS; step 5 is not done), but the controller started again (systemd restarts it) no
/// longer refuses the empty file until an administrator removes it: it starts afresh, with the
/// configured groups and their limits.
#[test]
fn a_truncated_ledger_does_not_keep_the_controller_down() {
    if skip_unless_root("a_truncated_ledger_does_not_keep_the_controller_down") {
        return;
    }
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    let a = attack(&sim, &ctl, "truncate", 1.0);
    a.wait_for("attacked", Duration::from_secs(10), |l| l.contains("attacked"));
    let _ = a.wait();
    assert_eq!(std::fs::metadata(ctl.ledger()).unwrap().len(), 0, "the attack truncated the ledger");
    // Whether it died already or not, a restart must come up on its own.
    ctl.kill9();
    ctl.restart();
    assert!(ctl.log().contains("is empty (truncated?); replacing it with a new one"), "{}", ctl.log());
    still_sound(&sim, &mut ctl);
}

/// Not fixed yet: the ledger is one shared mapping, so a registered process can scribble over
/// every group's counters (and truncate the file under everyone, above). See LD_PRELOAD.md.
#[test]
#[ignore = "issue 13 step 5 (per-group sealed memfds) is not done: scribbling over the shared ledger and truncating it still break other groups"]
fn scribbling_and_truncation_cannot_reach_other_groups() {
    let sim = machine();
    let mut ctl = sim.controller_with_config(CONFIG);
    open_state_to_all(&sim);
    for how in ["scribble-random", "scribble-zeros", "scribble-ff"] {
        let a = attack(&sim, &ctl, how, 1.0);
        let _ = a.wait();
    }
    still_sound(&sim, &mut ctl);
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
            .map(|(i, u)| DeviceClaim { ordinal: i as u32, uuid: u.clone(), total_memory: 16 * GIB, memory_limit: limit, sm_share: None })
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
        match protocol::call(&socket, &Request::Register(r), Duration::from_secs(2)).map_err(|e| e.to_string())? {
            (Response::Registered(a), fd) => {
                let ledger = fd.map(|fd| Ledger::map_fd(fd.as_fd(), "attack").expect("map the ledger"));
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
            let (a, l) = register(Some("attackers"), real(None)).expect("register");
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
            let (_, fd) = protocol::call(&socket, &Request::Register(r), Duration::from_secs(2)).expect("register");
            let fd = fd.expect("a descriptor");
            use std::os::fd::AsRawFd;
            if how == "truncate" {
                // SAFETY: ftruncate on a descriptor this process holds: the attack.
                unsafe { libc::ftruncate(fd.as_raw_fd(), 0) };
            } else {
                // SAFETY: fstat and a shared mapping of the whole descriptor: the attack.
                unsafe {
                    let mut st: libc::stat = std::mem::zeroed();
                    libc::fstat(fd.as_raw_fd(), &mut st);
                    let len = st.st_size as usize;
                    let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0);
                    if p != libc::MAP_FAILED {
                        let bytes = std::slice::from_raw_parts_mut(p as *mut u8, len);
                        let mut x = 0x9e37_79b9_7f4a_7c15u64;
                        for b in bytes.iter_mut() {
                            *b = match how.as_str() {
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
                }
            }
            println!("attacked {how}");
            std::thread::sleep(hold);
        }
        other => panic!("no attack {other:?}"),
    }
}
