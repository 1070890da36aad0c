//! Fault injection with real processes against the simulated driver: clients killed with
//! SIGKILL at random points of allocation and launch storms, the controller killed and
//! restarted at random points, `fork()` while other threads are inside the shim, `exec` of a
//! program under the shim, and 64 threads allocating, freeing and launching under one limit.
//!
//! After each fault the ledger is checked twice: through `gpuslice ls --json`, and by mapping
//! the ledger file itself (`Books`): the live process slots are exactly the live processes,
//! every group's `used` is the sum of its live members', its member count is right, and no
//! reconciliation flag or accounting window is left open.
//!
//! Random choices come from one seed, printed by each test; `GPUSLICE_FAULT_SEED=N` replays
//! them (the scheduler's timing, not under the test's control, varies anyway).
//! docs/RELIABILITY.md has the figures these tests produced.

use gpuslice_common::ledger::{Ledger, LIVE};
use gpuslice_integration::*;
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

/// The simulated context reserve: what each process's primary context holds.
const R: u64 = 64 * MIB;

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_CTX_RESERVE", R)
}

fn path(sim: &Sim, name: &str) -> String {
    sim.path_str(name)
}

// ------------------------------------------------------------------------------ randomness

/// splitmix64: small, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    /// Seeded from `GPUSLICE_FAULT_SEED`, else from the clock; prints the seed.
    fn new(test: &str) -> Rng {
        let seed = std::env::var("GPUSLICE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
        eprintln!("{test}: seed {seed} (GPUSLICE_FAULT_SEED={seed} replays the random choices)");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }

    fn route(&mut self) -> Route {
        Route::ALL[(self.next() % 4) as usize]
    }
}

// ------------------------------------------------------------------------ the ledger itself

/// The controller's ledger, mapped by the test to check its books directly.
struct Books {
    ledger: Ledger,
}

impl Books {
    fn open(ctl: &Controller<'_>) -> Books {
        let path = ctl.ledger();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let ledger = Ledger::map_fd(file.as_fd(), &path.display().to_string()).unwrap_or_else(|e| panic!("map {}: {e}", path.display()));
        // Slots live in each group's memory (ledger::regions): found as a restarted controller finds them.
        ledger.reclaim();
        Books { ledger }
    }

    /// Pids of the live process slots, sorted.
    fn live_pids(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.ledger.processes().filter(|(_, p)| p.state.load(SeqCst) == LIVE).map(|(_, p)| p.pid.load(SeqCst)).collect();
        p.sort_unstable();
        p
    }

    /// Everything that must hold when no member is in the middle of an operation: the live
    /// slots are `live` exactly; per live group, `members` counts its live slots, `used` on
    /// every device is the sum of its members', and no reconciliation is under way; no live
    /// slot has an accounting window open. `Err` describes every difference.
    fn check(&self, live: &[u32]) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut want = live.to_vec();
        want.sort_unstable();
        let got = self.live_pids();
        if got != want {
            problems.push(format!("live process slots {got:?}, live processes {want:?}"));
        }
        for (gi, g) in self.ledger.groups() {
            if g.state.load(SeqCst) != LIVE {
                continue;
            }
            let members: Vec<_> =
                self.ledger.processes().filter(|(_, p)| p.state.load(SeqCst) == LIVE && p.group.load(SeqCst) as usize == gi).map(|(_, p)| p).collect();
            let counted = g.members.load(SeqCst) as usize;
            if counted != members.len() {
                problems.push(format!("group {:?}: members counter {counted}, live member slots {}", g.name(), members.len()));
            }
            if g.reconciling.load(SeqCst) != 0 {
                problems.push(format!("group {:?}: reconciliation flag left up", g.name()));
            }
            for (d, gd) in g.devices.iter().enumerate() {
                let sum: u64 = members.iter().map(|p| p.devices[d].used.load(SeqCst)).sum();
                let used = gd.used.load(SeqCst);
                if used != sum {
                    problems.push(format!("group {:?} device {d}: used {used}, its live members hold {sum}", g.name()));
                }
            }
        }
        for (_, p) in self.ledger.processes().filter(|(_, p)| p.state.load(SeqCst) == LIVE) {
            if p.ops.load(SeqCst) % 2 == 1 {
                problems.push(format!("pid {}: accounting window left open", p.pid.load(SeqCst)));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Polls `Books::check(live)` (the controller releases dead processes asynchronously) until it
/// holds; panics with the differences and the controller's log after `timeout`.
fn books_settle(ctl: &Controller<'_>, live: &[u32], timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let books = Books::open(ctl);
        match books.check(live) {
            Ok(()) => return start.elapsed(),
            Err(e) if start.elapsed() > timeout => panic!("the ledger is not consistent after {timeout:?}: {e}\ncontroller log:\n{}", tail(&ctl.log(), 60)),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ----------------------------------------------------------------- 1. clients killed, 200×

/// When a victim is killed: a fixed time after it starts (startup, registration, the first
/// allocations), or a fixed time after its storm began.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    AfterSpawn(Duration),
    IntoStorm(Duration),
}

/// 25 batches of 8 clients, each killed with SIGKILL at a random point: a quarter 0–40 ms after
/// they start (startup, registration, context creation), the rest 0–20 ms into a storm of 4
/// threads allocating (cuMemAlloc, cuMemCreate, arrays), freeing and launching. Batches
/// alternate between a group with a memory limit and one that is also throttled (so that
/// kills land in the throttle's and the turn-taking's code too). After each batch the group
/// figures are exactly what the two survivors hold, in `ls` and in the ledger itself, and no
/// slot is left.
#[test]
fn clients_killed_at_random_points_of_storms_leave_exact_books() {
    const BATCHES: usize = 25;
    const PER_BATCH: usize = 8;
    let mut rng = Rng::new("kill -9 storm");
    let sim = sim();
    let ctl = sim.controller();
    ctl.set_ok("--create --group plain --memory 3GiB");
    ctl.set_ok("--create --group paced --memory 3GiB --sm 80");
    let done = path(&sim, "done");
    let never = path(&sim, "never");
    let survivors: Vec<(Running, &str, u64)> = [("plain", 100 * MIB), ("paced", 200 * MIB)]
        .into_iter()
        .map(|(group, bytes)| {
            (sim.client(Route::Link).shim().controller(&ctl).group(group).args(&format!("init ctx 0 alloc {bytes} waitfile {done}")).spawn(), group, bytes)
        })
        .collect();
    for (s, _, _) in &survivors {
        expect_ok(&s.wait_line("alloc", 0));
    }
    let survivor_pids: Vec<u32> = survivors.iter().map(|(s, _, _)| s.pid()).collect();

    let start = Instant::now();
    let (mut early, mut in_storm, mut storm_lines) = (0, 0, 0);
    let mut settle_max = Duration::ZERO;
    for batch in 0..BATCHES {
        let group = if batch % 2 == 0 { "plain" } else { "paced" };
        let victims: Vec<(Running, KillAt)> = (0..PER_BATCH)
            .map(|_| {
                let at = if rng.chance(4) {
                    early += 1;
                    KillAt::AfterSpawn(Duration::from_micros(rng.range(0, 40_000)))
                } else {
                    in_storm += 1;
                    KillAt::IntoStorm(Duration::from_micros(rng.range(0, 20_000)))
                };
                let seed = rng.next() % 1_000_000;
                let c =
                    sim.client(rng.route()).shim().controller(&ctl).group(group).args(&format!("init ctx 0 alloc 32M now storm 4 2000 {seed} {never}")).spawn();
                (c, at)
            })
            .collect();
        let spawned = Instant::now();
        let mut victims: Vec<(Running, KillAt, Option<Instant>, bool)> = victims.into_iter().map(|(c, at)| (c, at, None, false)).collect();
        // Kill each at its moment; the storm's start is its `now` line.
        while victims.iter().any(|v| !v.3) {
            for (c, at, deadline, killed) in victims.iter_mut().filter(|v| !v.3) {
                if deadline.is_none() {
                    *deadline = match *at {
                        KillAt::AfterSpawn(d) => Some(spawned + d),
                        KillAt::IntoStorm(d) => c.lines_now().iter().any(|l| line_cmd(l) == "now").then(|| Instant::now() + d),
                    };
                }
                if deadline.is_some_and(|t| Instant::now() >= t) {
                    c.kill();
                    *killed = true;
                }
            }
            assert!(
                spawned.elapsed() < Duration::from_secs(20),
                "batch {batch}: victims never reached their storm:\n{}",
                victims.iter().map(|v| v.0.stderr_now()).collect::<String>()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        for (c, _, _, _) in victims {
            let out = c.wait();
            storm_lines += out.lines.iter().filter(|l| line_cmd(l) == "storm").count();
        }
        let settled = books_settle(&ctl, &survivor_pids, Duration::from_secs(2));
        settle_max = settle_max.max(settled);
        let l = ctl.ls();
        assert_eq!(l.pids(), survivor_pids, "batch {batch}: only the survivors are listed:\n{l}");
        for (s, g, bytes) in &survivors {
            assert_eq!(l.group_used(g, 0), R + bytes, "batch {batch}: group {g} holds exactly its survivor's bytes:\n{l}");
            assert_eq!(l.process_used(s.pid(), 0), R + bytes, "{l}");
            assert!(l.group_peak(g, 0) <= 3 * GIB, "{l}");
        }
    }
    let rounds = BATCHES * PER_BATCH;
    assert_eq!(storm_lines, 0, "a storm finished: a victim outlived its kill");
    eprintln!(
        "kill -9 storm: {rounds} clients killed ({early} 0-40 ms after start, {in_storm} 0-20 ms into their storm) in {:?}; books exact again at most {settle_max:?} after a batch's last kill",
        start.elapsed()
    );
    let log = ctl.log();
    let registered = log.matches("registered pid").count() - survivors.len();
    eprintln!("kill -9 storm: {registered} of the {rounds} victims had registered before they died");
    touch(&done);
    for (s, _, _) in survivors {
        s.wait().assert_all_ok();
    }
    books_settle(&ctl, &[], Duration::from_secs(2));
}

// -------------------------------------------------------- 2. the controller killed, restarted

/// A client of the restart test: what it allocated besides its storm, and how it ends.
struct Member {
    run: Running,
    bytes: u64,
    stop: String,
    /// Exits when its storm is stopped (instead of waiting for the end of the test).
    leaves: bool,
    killed: bool,
}

/// Whether the shim registered with a controller or runs alone: its info line says which.
fn registered(stderr: &str) -> Option<bool> {
    if stderr.contains("registered with the gpuslice controller") {
        Some(true)
    } else if stderr.contains("did not take this process") || stderr.contains("no gpuslice controller at") {
        Some(false)
    } else {
        None
    }
}

/// The controller killed with SIGKILL 16 times at random moments while its clients storm
/// (allocate, free, launch), new clients register, others exit or are killed; each time a new
/// controller starts on the same ledger 0–40 ms later and adopts it. At the end the books are
/// exact: each client that registered holds what it says in the ledger, the group holds their
/// sum, and those killed or gone meanwhile hold nothing.
#[test]
fn controller_killed_at_random_points_adopts_exact_books() {
    const CYCLES: usize = 16;
    let mut rng = Rng::new("controller kill -9");
    let sim = sim();
    let mut ctl = sim.controller();
    ctl.set_ok("--create --group ha --memory 4GiB");
    let done = path(&sim, "done");
    let mut members: Vec<Member> = Vec::new();
    let mut joined = 0;
    let spawn = |rng: &mut Rng, ctl: &Controller<'_>, n: usize| -> Member {
        let bytes = rng.range(4, 32) * 4 * MIB;
        let stop = path(&sim, &format!("stop{n}"));
        let leaves = rng.chance(3);
        let end = if leaves { String::new() } else { format!("waitfile {done}") };
        let seed = rng.next() % 1_000_000;
        let run = sim
            .client(rng.route())
            .shim()
            .controller(ctl)
            .group("ha")
            .env("GPUSLICE_LOG", "info")
            .args(&format!("init ctx 0 alloc {bytes} storm 3 2000 {seed} {stop} {end}"))
            .spawn();
        Member { run, bytes, stop, leaves, killed: false }
    };
    for _ in 0..4 {
        members.push(spawn(&mut rng, &ctl, joined));
        joined += 1;
    }
    // One of them registers before the first kill: the device it claims is what the group's
    // row in `ls` is about at the end. On a loaded machine clients take seconds to start, and
    // every registration could otherwise meet a dead or dying controller (once in 100 runs at a
    // load of ~19 on 2 cores): no device known, no row, and the checks below had nothing to read.
    let first = Instant::now();
    while !members.iter().any(|m| registered(&m.run.stderr_now()) == Some(true)) {
        assert!(
            first.elapsed() < Duration::from_secs(60),
            "no member registered with a controller that ran throughout:\n{}",
            members.iter().map(|m| m.run.stderr_now()).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let start = Instant::now();
    let (mut left, mut killed) = (0, 0);
    for _ in 0..CYCLES {
        // While the controller runs: newcomers, and one member leaving now and then.
        for _ in 0..rng.range(0, 2) {
            members.push(spawn(&mut rng, &ctl, joined));
            joined += 1;
        }
        if rng.chance(3) {
            if let Some(m) = members.iter().find(|m| m.leaves && !m.killed && !Path::new(&m.stop).exists()) {
                touch(&m.stop);
                left += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.range(0, 80_000)));
        ctl.kill9();
        // While none runs: a member killed, sometimes.
        if rng.chance(3) {
            let alive: Vec<usize> = (0..members.len()).filter(|&i| !members[i].killed && !Path::new(&members[i].stop).exists()).collect();
            if !alive.is_empty() {
                let i = alive[(rng.next() % alive.len() as u64) as usize];
                members[i].run.kill();
                members[i].killed = true;
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.range(0, 40_000)));
        ctl.restart();
    }
    // Everyone still storming stops; then each holds its context and its allocation.
    for m in members.iter().filter(|m| !m.killed) {
        touch(&m.stop);
    }
    let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
    let mut alone = Vec::new();
    for m in members.iter().filter(|m| !m.killed) {
        let line = m.run.wait_line("storm", 0);
        expect_ok(&line);
        assert_eq!(num(&line, "failures"), 0, "pid {}: `{line}`", m.run.pid());
        if m.leaves {
            continue; // It exits now.
        }
        match registered(&m.run.stderr_now()) {
            Some(true) => {
                expected.insert(m.run.pid(), R + m.bytes);
            }
            Some(false) => alone.push(m.run.pid()),
            None => panic!("pid {}: the shim said neither that it registered nor that it runs alone:\n{}", m.run.pid(), m.run.stderr_now()),
        }
    }
    // Those that left have exited (or are about to): wait for them, then for the books.
    let mut still = Vec::new();
    for m in members.drain(..) {
        if m.killed || m.leaves {
            m.run.wait();
        } else {
            still.push(m);
        }
    }
    // A member whose registration the kill cut short runs alone; the controller may have
    // given it a slot before dying, which then holds nothing.
    let listed_alone: Vec<u32> = {
        let l = ctl.ls();
        alone.iter().copied().filter(|p| l.process(*p).is_some()).collect()
    };
    let mut live: Vec<u32> = expected.keys().copied().chain(listed_alone.iter().copied()).collect();
    live.sort_unstable();
    let settled = books_settle(&ctl, &live, Duration::from_secs(2));
    let l = ctl.ls();
    for (&pid, &bytes) in &expected {
        assert_eq!(l.process_used(pid, 0), bytes, "pid {pid}: its context and allocation, as it holds them:\n{l}");
    }
    for &pid in &listed_alone {
        assert_eq!(l.process_used(pid, 0), 0, "pid {pid} runs alone: its slot holds nothing:\n{l}");
    }
    let total: u64 = expected.values().sum();
    assert_eq!(l.group_used("ha", 0), total, "the group holds exactly what its registered members hold:\n{l}");
    assert!(l.group_peak("ha", 0) <= 4 * GIB, "{l}");
    // Also when a kill came before any member held the group's memory (a loaded machine).
    assert_eq!(l.group_limit("ha", 0), Some(4 * GIB), "the group keeps its limit through every restart:\n{l}");
    let log = ctl.log();
    assert_eq!(log.matches("adopted the existing ledger").count(), CYCLES, "every restart adopted the ledger:\n{}", tail(&log, 40));
    eprintln!(
        "controller kill -9: {CYCLES} kills and restarts in {:?} with {joined} clients: {left} left and {killed} were killed on the way; at the end {} registered and alive, {} running alone (their registration met a dead or dying controller); books exact {settled:?} after the last restart",
        start.elapsed(),
        expected.len(),
        alone.len(),
    );
    touch(&done);
    for m in still {
        m.run.wait().assert_success();
    }
    books_settle(&ctl, &[], Duration::from_secs(2));
    assert_eq!(ctl.ls().group_used("ha", 0), 0);
}

/// The case the test above met on a loaded machine, every time: a controller killed after
/// `set --create` and before anyone joined. Nothing but the controller held the group's memory;
/// the restarted one used to drop the group, and a member that came then made a new group of
/// that name without its limit.
#[test]
fn a_group_nobody_joined_yet_keeps_its_limit_through_a_controller_kill() {
    let sim = sim();
    let mut ctl = sim.controller();
    ctl.set_ok("--create --group ha --memory 1GiB");
    ctl.kill9();
    ctl.restart();
    member_held_to_one_gib(&sim, &ctl, "ha");
    assert_eq!(ctl.ls().group_limit("ha", 0), Some(GIB), "{}", ctl.log());
}

// ------------------------------------------------------------------------------- 3. exec

/// A program under the shim that `exec`s another (LD_PRELOAD inherited): the new image
/// registers afresh under the same pid, and the controller drops the old image's slot, whose
/// memory died with it. Without that the group's 1 GiB could not hold the second 700 MiB.
#[test]
fn an_exec_under_the_shim_registers_afresh_and_frees_the_old_image() {
    let sim = sim();
    let ctl = sim.controller();
    ctl.set_ok("--create --group ex --memory 1GiB");
    let done = path(&sim, "done");
    let next = client_path(Route::Procaddr).display().to_string();
    let c = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("ex")
        .args(&format!("init ctx 0 alloc 700M exec {next} init ctx 0 alloc 700M nvmlprocs 0 waitfile {done}"))
        .spawn();
    let pid = c.pid();
    expect_ok(&c.wait_line("alloc", 0));
    let first = ctl.ls();
    assert_eq!(first.pids(), vec![pid], "{first}");
    let line = c.wait_line("alloc", 1);
    expect_ok(&line);
    let procs = c.wait_line("nvmlprocs", 0);
    assert_eq!(num(&procs, "self"), R + 700 * MIB, "the driver holds the new image's memory only: `{procs}`");
    let l = ctl.ls();
    assert_eq!(l.pids(), vec![pid], "one process, the same pid:\n{l}");
    assert_eq!(l.process(pid).unwrap()["name"], "cuclient-procaddr", "the new image's slot:\n{l}");
    assert_eq!(l.process_used(pid, 0), R + 700 * MIB, "{l}");
    assert_eq!(l.group_used("ex", 0), R + 700 * MIB, "the old image's 700 MiB and context are gone:\n{l}");
    books_settle(&ctl, &[pid], Duration::from_secs(1));
    let log = ctl.log();
    assert!(log.contains(&format!("pid {pid} registered again (exec)")), "{}", tail(&log, 20));
    assert_eq!(log.matches(&format!("registered pid {pid} ")).count(), 2, "{}", tail(&log, 20));
    touch(&done);
    let out = c.wait();
    out.assert_success();
    assert_eq!(out.lines.iter().filter(|l| line_cmd(l) == "init").count(), 2, "two images ran:\n{}", out.lines.join("\n"));
    books_settle(&ctl, &[], Duration::from_secs(2));
    assert_eq!(ctl.ls().group_used("ex", 0), 0);
}

// ------------------------------------------------------------------------------- 4. fork

/// `fork()` while 8 threads storm the shim (allocate, free, launch): 40 children in each of two
/// processes, each child allocating, launching, freeing and synchronizing in a slot of its own,
/// must all finish (a child that inherited a lock held by a thread that did not follow it into
/// the child would hang: 5 s each at most). One process is high priority and throttled (the
/// allocation tables, the throttle's and the cost model's locks, the priority watcher's); the
/// other is normal priority beside it (its queue of launches in flight), not throttled: next to
/// a high-priority process flooding the device its spans would time the neighbour's kernels too,
/// and its bucket would keep its children waiting for seconds. The parents' books stay exact.
#[test]
fn fork_while_threads_storm_the_shim() {
    const FORKS: u64 = 40;
    let sim = sim();
    let ctl = sim.controller();
    ctl.set_ok("--create --group high --memory 2GiB --sm 80");
    ctl.set_ok("--create --group normal --memory 2GiB");
    let done = path(&sim, "done");
    let parents: Vec<(Running, &str)> = [("high", "high"), ("normal", "normal")]
        .into_iter()
        .map(|(group, priority)| {
            let c = sim
                .client(Route::Link)
                .shim()
                .controller(&ctl)
                .group(group)
                .env("GPUSLICE_PRIORITY", priority)
                .args(&format!("init ctx 0 alloc 100M forkstorm 8 {FORKS} 5000 2000 waitfile {done}"))
                .spawn();
            (c, group)
        })
        .collect();
    let start = Instant::now();
    let mut pids = Vec::new();
    for (c, group) in &parents {
        let line = c.wait_line("forkstorm", 0);
        expect_ok(&line);
        eprintln!("fork storm ({group}): `{line}`");
        assert_eq!(
            num(&line, "fine"),
            FORKS,
            "every child finished cleanly (hung= children were stuck 5 s; codes= 10 + the failed step): `{line}`\nstderr:\n{}",
            c.stderr_now()
        );
        assert_eq!(num(&line, "failures"), 0, "the parent's storm went on without errors: `{line}`");
        assert!(num(&line, "rounds") > 0, "{line}");
        pids.push(c.pid());
    }
    eprintln!("fork storm: {} children in {:?}", 2 * FORKS, start.elapsed());
    pids.sort_unstable();
    books_settle(&ctl, &pids, Duration::from_secs(2));
    let l = ctl.ls();
    for (c, group) in &parents {
        assert_eq!(l.members(group), vec![c.pid()], "the children left with their slots:\n{l}");
        assert_eq!(l.group_used(group, 0), R + 100 * MIB, "the parent's storm freed all it made; its context and 100 MiB stay:\n{l}");
    }
    let log = ctl.log();
    assert_eq!(log.matches("registered pid").count() as u64, 2 + 2 * FORKS, "each child registered on its own:\n{}", tail(&log, 20));
    touch(&done);
    for (c, _) in parents {
        c.wait().assert_all_ok();
    }
}

// ------------------------------------------------------------------- 5. 64 threads, one limit

/// 64 threads of one process under a 1 GiB group limit, 8 rounds of: everyone filling with
/// 3 MiB chunks (a launch after each) until refused, then churning (free one, or allocate
/// 4 KiB–3 MiB, and launch). The process is high priority, so every launch goes through the
/// shim's priority bookkeeping (a lock and an event per launch) as well. Each fill grants
/// exactly as many chunks as fit: no refusal below the limit, no allocation over it. Every
/// refusal the program saw is counted once in the ledger, and at the end the ledger holds
/// exactly what the program counted.
///
/// (Not throttled: with an SM share, 64 threads each launching between allocations made the
/// cost model time the threads' host work inside its spans, and this took 3–28 s instead of
/// 0.1 s; see docs/RELIABILITY.md.)
#[test]
fn sixty_four_threads_allocate_free_and_launch_under_one_limit() {
    const THREADS: u64 = 64;
    const ROUNDS: usize = 8;
    let limit = GIB;
    let chunk = 3 * MIB + 4096;
    let sim = sim();
    let ctl = sim.controller();
    ctl.set_ok(&format!("--create --group many --memory {limit}"));
    let (held, done) = (path(&sim, "held"), path(&sim, "done"));
    let c = sim
        .client(Route::Procaddr)
        .shim()
        .controller(&ctl)
        .group("many")
        .env("GPUSLICE_PRIORITY", "high")
        .args(&format!("init ctx 0 hammer {THREADS} {ROUNDS} {chunk} 40 1000 waitfile {held} freeall waitfile {done}"))
        .spawn();
    let start = Instant::now();
    let line = c.wait_line("hammer", 0);
    let took = start.elapsed();
    expect_ok(&line);
    assert_eq!(num(&line, "failures"), 0, "`{line}`");
    let fits = (limit - R) / chunk;
    let granted: Vec<u64> = kv(&line, "granted").unwrap_or_default().split(',').map(|g| g.parse().expect("granted")).collect();
    assert_eq!(granted, vec![fits; ROUNDS], "each fill got exactly the {fits} chunks of {chunk} B that fit in {limit} B beside the {R} B context: `{line}`");
    let pid = c.pid();
    let bytes = num(&line, "held");
    let l = ctl.ls();
    assert_eq!(l.process_used(pid, 0), R + bytes, "the ledger holds what the program counted:\n{l}");
    assert_eq!(l.group_used("many", 0), R + bytes, "{l}");
    assert_eq!(l.group_refusals("many", 0), num(&line, "refusals"), "every refusal the program saw, counted once: `{line}`\n{l}");
    assert!(l.group_peak("many", 0) <= limit, "never over the limit:\n{l}");
    assert!(num(&line, "refusals") >= THREADS * ROUNDS as u64, "each thread was refused once per fill: `{line}`");
    books_settle(&ctl, &[pid], Duration::from_secs(1));
    eprintln!("64 threads: {ROUNDS} rounds in {took:?}: `{line}`");
    touch(&held);
    expect_ok(&c.wait_line("freeall", 0));
    let l = ctl.ls();
    assert_eq!(l.group_used("many", 0), R, "all freed but the context:\n{l}");
    touch(&done);
    c.wait().assert_all_ok();
}
