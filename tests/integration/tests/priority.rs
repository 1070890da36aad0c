//! Priority classes (`GPUSLICE_PRIORITY=high|normal|low`) on the simulated device timeline: a
//! high-priority latency probe next to a low-priority neighbour that floods the device, the
//! neighbour's throughput with and without a high-priority process, a high-priority process that
//! exits or is killed while busy, the priority set live through the controller, the gate
//! lifted over a spatial MPS share (`GPUSLICE_PRIORITY_GATE`: `spatial-off`, and `auto` by the
//! high-priority process's own requests), and bad values.
//!
//! The simulated device runs one kernel at a time, first come first served, for all processes,
//! and a stream may queue up to 200 ms of work. So without priorities a request of the probe waits
//! behind the neighbour's whole queue (≈ 200 ms); with them, the neighbour keeps at most
//! `GPUSLICE_PRIORITY_QUEUE` (default 1) kernels in flight and launches nothing while the probe's
//! work is on the device, so a request waits for at most that many neighbour kernels.
//!
//! The figures come from the clients' `probe` (launch-to-synchronized latency of one-kernel
//! requests) and `flood` (when each of the neighbour's kernels ran on the simulated timeline),
//! all on the simulated clock (`Sim::with_clock`): the test holds virtual time still whenever it
//! starts or stops something, so the figures do not depend on the machine's load.

use gpuslice_integration::*;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// One at a time: each starts several processes (the figures are on the simulated clock; this
/// keeps the CI machine's load down).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A machine on the simulated clock, and the test's part in it (parked: time runs).
fn machine() -> (Sim, Clock) {
    let sim = Sim::new().with_clock();
    let clock = sim.clock();
    clock.park();
    (sim, clock)
}

/// Lets `ms` of virtual time pass, then runs `f` with time held still.
fn after(clock: &Clock, ms: u64, f: impl FnOnce()) {
    clock.unpark();
    clock.sleep_ns(ms * 1_000_000);
    f();
    clock.park();
}

/// One request of the probe: a single kernel of this long, then a synchronize.
const PROBE_NS: u64 = 2_000_000;
/// The neighbour's kernels.
const NEIGHBOUR_NS: u64 = 1_000_000;
/// Requests per measured probe, and the mean pause between them.
const REQUESTS: u64 = 40;
const GAP_US: u64 = 10_000;
/// The neighbour keeps this many launches in flight while a high-priority process lives.
const DEFAULT_QUEUE: u64 = 1;
/// What a request may take beyond the probe alone and the neighbour's queue (the neighbour's
/// watcher noticing its kernel's end: polls of 20 µs).
const SLACK_US: u64 = 300;
/// The same on the device timeline, where only the mechanism counts: at most `queue` neighbour
/// kernels are unfinished when the probe launches, so its kernel ends within
/// `queue × NEIGHBOUR_NS + PROBE_NS` of the launch; this is for the few µs between the probe's
/// `before` event and its launch reaching the device.
const DEVICE_SLACK_US: u64 = 300;
/// The flood's buckets.
const BUCKET_MS: u64 = 10;

/// The device-latency bound of a request with the neighbour keeping `queue` kernels in flight.
fn device_bound(queue: u64) -> u64 {
    (PROBE_NS + queue * NEIGHBOUR_NS) / 1000 + DEVICE_SLACK_US
}

/// Both bounds of a request's latency next to the neighbour (`Err` says which one missed).
fn within(probe: &Probe, alone: &Probe, queue: u64) -> Result<(), String> {
    let wall = alone.p99_us + queue * NEIGHBOUR_NS / 1000 + SLACK_US;
    if probe.dev_p99_us > device_bound(queue) {
        Err(format!(
            "on the device, p99 {} µs over {} µs ({} + {queue} × {} + {DEVICE_SLACK_US})",
            probe.dev_p99_us,
            device_bound(queue),
            PROBE_NS / 1000,
            NEIGHBOUR_NS / 1000
        ))
    } else if probe.p99_us > wall {
        Err(format!("p99 {} µs over {wall} µs (alone p99 {} + {queue} × {} + {SLACK_US})", probe.p99_us, alone.p99_us, NEIGHBOUR_NS / 1000))
    } else {
        Ok(())
    }
}

/// A fresh file name in the machine's directory (go- and stop-files).
fn fresh(sim: &Sim, what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    sim.path(&format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed))).display().to_string()
}

/// A client under the shim, with `GPUSLICE_PRIORITY` if given.
fn client<'a>(sim: &'a Sim, priority: Option<&str>) -> Client<'a> {
    let c = sim.client(Route::Procaddr).shim();
    match priority {
        Some(p) => c.env("GPUSLICE_PRIORITY", p),
        None => c,
    }
}

/// The neighbour: `low`, flooding the device with `NEIGHBOUR_NS` kernels from when `go` exists
/// (None: at once) until `stop` exists.
fn neighbour(c: Client<'_>, go: Option<&str>, stop: &str) -> Running {
    let wait = go.map(|g| format!("waitfile {g}")).unwrap_or_default();
    let n = c.env("GPUSLICE_PRIORITY", "low").args(&format!("init ctx 0 launch 1 1000 sync {wait} flood {NEIGHBOUR_NS} {BUCKET_MS} {stop}")).spawn();
    assert!(line_ok(&n.wait_line("sync", 0)), "the neighbour did not start");
    n
}

fn flood_of(out: &Output) -> Flood {
    out.assert_success();
    Flood::parse(out.last("flood"))
}

/// The probe alone on the device, at high priority.
fn alone(sim: &Sim) -> Probe {
    let out = client(sim, Some("high")).args(&format!("init ctx 0 launch 1 1000 sync probe {REQUESTS} {PROBE_NS} {GAP_US}")).run();
    out.assert_all_ok();
    Probe::parse(out.last("probe"))
}

/// The probe at `priority` making `requests` requests (after `settle_ms`) while a low neighbour
/// (keeping `queue` launches in flight, if given) floods the device for exactly as long.
fn contest(sim: &Sim, clock: &Clock, priority: Option<&str>, queue: Option<u64>, requests: u64, settle_ms: u64) -> (Probe, Flood) {
    let queue = queue.map(|q| q.to_string());
    let env: Vec<(&str, &str)> = queue.iter().map(|q| ("GPUSLICE_PRIORITY_QUEUE", q.as_str())).collect();
    let (probe, flood, _) = contest_with(sim, clock, priority, &env, &env, requests, settle_ms);
    (probe, flood)
}

/// `contest` with more environment for both processes (`both`) and for the neighbour alone
/// (`nb`); also returns the neighbour's output (its log on stderr).
fn contest_with(
    sim: &Sim,
    clock: &Clock,
    priority: Option<&str>,
    both: &[(&str, &str)],
    nb: &[(&str, &str)],
    requests: u64,
    settle_ms: u64,
) -> (Probe, Flood, Output) {
    let (go, stop) = (fresh(sim, "go"), fresh(sim, "stop"));
    let n = neighbour(with_env(with_env(client(sim, None), both), nb), Some(&go), &stop);
    let probe = with_env(client(sim, priority), both)
        .args(&format!("init ctx 0 launch 1 1000 sync waitfile {go} sleep {settle_ms} probe {requests} {PROBE_NS} {GAP_US} touch {stop}"))
        .spawn();
    let (out, nb_out) = run_pair(clock, &go, probe, n);
    (Probe::parse(out.last("probe")), flood_of(&nb_out), nb_out)
}

/// The neighbour's device time while the probe ran, over the time the probe left it: in the
/// buckets wholly inside the probe's run, their wall time less the probe's kernels (pro rata).
fn progress(flood: &Flood, probe: &Probe) -> f64 {
    let (busy_us, _) = flood.busy_between(probe.t0, probe.t1);
    busy_us as f64 / 1000.0 / left_ms(flood, probe)
}

/// The time the probe left the neighbour (ms), as `progress` counts it.
fn left_ms(flood: &Flood, probe: &Probe) -> f64 {
    let (_, wall_us) = flood.busy_between(probe.t0, probe.t1);
    let probe_us = (probe.n * PROBE_NS / 1000) as f64 * wall_us as f64 / ((probe.t1 - probe.t0) as f64 / 1000.0);
    (wall_us as f64 - probe_us) / 1000.0
}

// ------------------------------------------------------------------ 1. latency next to a flood

#[test]
fn a_high_priority_probe_waits_for_at_most_the_neighbours_queue() {
    let _serial = serial();
    let (sim, clock) = machine();
    let alone = alone(&sim);
    eprintln!("probe alone: {alone}");
    assert!(alone.p50_us >= PROBE_NS / 1000 && alone.dev_p99_us <= device_bound(0), "the probe alone: {alone}");

    // Without a high-priority process the neighbour's queue fills (200 ms on the simulated
    // device) and every request waits behind it: the shim leaves a `low` process alone then.
    let (baseline, flood) = contest(&sim, &clock, None, None, 8, 300);
    eprintln!("probe without priority next to the flood: {baseline}; neighbour {:.1}%", 100.0 * progress(&flood, &baseline));
    assert!(baseline.p50_us >= 20 * alone.p50_us, "without priorities the probe should wait behind the neighbour's queue: {baseline} (alone {alone})");
    assert!(baseline.dev_p50_us > 150_000, "without priorities a request waits behind the neighbour's queue on the device: {baseline}");

    // High priority: a request waits for at most the neighbour's queue of kernels, and the
    // neighbour keeps the device busy whenever the probe has nothing on it.
    let mut medians = Vec::new();
    for queue in [DEFAULT_QUEUE, 2] {
        let bound = alone.p99_us + queue * NEIGHBOUR_NS / 1000 + SLACK_US;
        let dev_bound = device_bound(queue);
        let min_progress = if queue == 1 { 0.6 } else { 0.8 };
        let env = (queue != DEFAULT_QUEUE).then_some(queue);
        let (probe, flood) = contest(&sim, &clock, Some("high"), env, REQUESTS, 100);
        if let Err(e) = within(&probe, &alone, queue) {
            panic!("GPUSLICE_PRIORITY_QUEUE={queue}: {e}: {probe}\nthe neighbour: {flood:?}");
        }
        let p = progress(&flood, &probe);
        assert!(
            p >= min_progress,
            "GPUSLICE_PRIORITY_QUEUE={queue}: the neighbour got {:.1}% of the {:.0} ms the probe left it (at least {:.0}% expected)",
            100.0 * p,
            left_ms(&flood, &probe),
            100.0 * min_progress
        );
        let (busy_us, wall_us) = flood.busy_between(probe.t0, probe.t1);
        eprintln!(
            "queue {queue}: probe at high {probe} (bounds {bound} µs, on the device {dev_bound} µs); while it ran, the neighbour ran {:.1} ms of kernels in {:.1} ms: {:.1}% of the {:.1} ms the probe left it",
            busy_us as f64 / 1000.0,
            wall_us as f64 / 1000.0,
            100.0 * progress(&flood, &probe),
            left_ms(&flood, &probe)
        );
        assert!(probe.p99_us * 10 < baseline.p50_us, "queue {queue}: {probe} is not many times better than without priority ({baseline})");
        medians.push(probe.dev_p50_us);
    }
    // One neighbour kernel in flight instead of two: a request typically waits less.
    assert!(medians[0] < medians[1], "on the device, the median request took {} µs with queue 1, {} µs with queue 2", medians[0], medians[1]);
}

// ------------------------------------------------------------------ 2. work-conserving

/// Device time / wall time of `n` kernels of `ns` launched back to back, in percent.
fn achieved(c: Client<'_>, n: u64, ns: u64) -> f64 {
    let out = c.args(&format!("init ctx 0 launch 2 {ns} sync mark launch {n} {ns} sync elapsed")).run();
    out.assert_all_ok();
    let wall_ms: f64 = out.get("elapsed", "ms").unwrap().parse().unwrap();
    (n * ns) as f64 / 1e6 / wall_ms * 100.0
}

#[test]
fn without_a_high_priority_process_low_runs_as_fast_as_without_the_shim() {
    let _serial = serial();
    let (sim, clock) = machine();
    for ns in [1_000_000u64, 20_000] {
        let n = 200_000_000 / ns;
        let plain = achieved(sim.client(Route::Procaddr), n, ns);
        let low = achieved(client(&sim, Some("low")), n, ns);
        eprintln!("{} µs kernels: {plain:.1}% of the device without the shim, {low:.1}% at low under the shim", ns / 1000);
        assert!(plain > 99.0, "the simulated device should be saturated: {plain:.1}%");
        assert!(low >= plain * 0.99, "{low:.1}% at low under the shim, {plain:.1}% without the shim");
    }

    // Nothing bounds its queue either: it reaches the simulated driver's 200 ms.
    let stop = fresh(&sim, "stop");
    let n = neighbour(client(&sim, None), None, &stop);
    after(&clock, 400, || touch(&stop));
    let flood = flood_of(&n.wait());
    let queued_ms = (flood.n - flood.done) * NEIGHBOUR_NS / 1_000_000;
    eprintln!("alone at low: {} kernels launched, {} done at the stop: {queued_ms} ms queued", flood.n, flood.done);
    assert!(queued_ms >= 150, "a low process with no high-priority one around must queue freely: {flood:?}");
    let share = flood.share_between(flood.t0, flood.stop());
    assert!(share > 0.97, "alone at low: {:.1}% of the device", 100.0 * share);

    // A high-priority process that lives but has no work: the neighbour's queue is bounded, but
    // with kernels of 1 ms it still keeps the device busy.
    let (go, stop) = (fresh(&sim, "go"), fresh(&sim, "stop"));
    let high = client(&sim, Some("high")).args(&format!("init ctx 0 waitfile {stop}")).spawn();
    assert!(line_ok(&high.wait_line("ctx", 0)));
    let n = neighbour(client(&sim, None), Some(&go), &stop);
    clock.start_together(&go, std::slice::from_ref(&n), "sync");
    clock.sleep_ns(400_000_000);
    touch(&stop);
    clock.park();
    let flood = flood_of(&n.wait());
    high.wait().assert_all_ok();
    let queued = flood.n - flood.done;
    let share = flood.share_between(flood.t0, flood.stop());
    eprintln!("low next to an idle high-priority process: {:.1}% of the device, {queued} kernels in flight at the stop", 100.0 * share);
    assert!(queued <= DEFAULT_QUEUE, "next to a high-priority process the queue is bounded: {flood:?}");
    // With one launch in flight, each kernel's end is noticed (polled 0.5 ms, then a blocking
    // wait that the simulator oversleeps by ~50 µs) before the next goes: a few % of the device.
    assert!(share > 0.85, "next to an idle high-priority process, 1 ms kernels at low: {:.1}% of the device", 100.0 * share);
}

// ------------------------------------------------------------------ 3. the high one goes away

/// The low neighbour floods while a high-priority process runs 5 ms kernels back to back from
/// `go`; `end` makes that process go away (and returns when it went, virtual ns); the neighbour
/// floods on for `after_ms`. Returns the flood, when the high one's work began, and when it went.
fn high_goes_away(sim: &Sim, clock: &Clock, script: &str, end: impl FnOnce(&mut Running) -> u64, after_ms: u64) -> (Flood, u64, u64) {
    let (go, stop) = (fresh(sim, "go"), fresh(sim, "stop"));
    let mut high = client(sim, Some("high")).args(&format!("init ctx 0 launch 1 1000 sync waitfile {go} {script}")).spawn();
    assert!(line_ok(&high.wait_line("sync", 0)));
    let n = neighbour(client(sim, None), None, &stop);
    let mut began = 0;
    after(clock, 100, || {
        began = clock.now_ns();
        touch(&go);
        assert!(line_ok(&high.wait_line("waitfile", 0)));
    });
    let gone = end(&mut high);
    let _ = high.wait();
    after(clock, after_ms, || touch(&stop));
    (flood_of(&n.wait()), began, gone)
}

/// Checks the neighbour was held back while the high-priority process worked (`began + 50 ms`
/// to `until`), and is back at full speed after `gone`; returns how long that took (ms).
fn check_back(what: &str, flood: &Flood, began: u64, until: u64, gone: u64) -> f64 {
    let held = flood.share_between(began + 50_000_000, until);
    assert!(held < 0.1, "{what}: the neighbour should yield to the high-priority work, it had {:.1}% of the device", 100.0 * held);
    let back = flood.first_bucket_with(gone, 0.5).unwrap_or_else(|| panic!("{what}: the neighbour never came back: {flood:?}"));
    let after_ms = back.saturating_sub(gone) as f64 / 1e6;
    let rest = flood.share_between(back + 50_000_000, flood.stop());
    eprintln!(
        "{what}: neighbour held to {:.1}% while the high one worked; back {after_ms:.0} ms after it went, then {:.1}% of the device",
        100.0 * held,
        100.0 * rest
    );
    assert!(after_ms <= 1000.0, "{what}: the neighbour came back only {after_ms:.0} ms after the high-priority process went");
    assert!(rest > 0.95, "{what}: the neighbour is back but not at full speed: {:.1}%", 100.0 * rest);
    after_ms
}

#[test]
fn when_the_high_priority_process_goes_its_neighbour_is_back_within_the_lease() {
    let _serial = serial();
    let (sim, clock) = machine();

    // It finishes its work (60 kernels of 5 ms), synchronizes and exits: nothing to wait for.
    let (flood, began, synced) =
        high_goes_away(&sim, &clock, "launch 60 5000000 sync now", |high| kv(&high.wait_line("now", 0), "ns").unwrap().parse().unwrap(), 800);
    check_back("exited", &flood, began, synced, synced);

    // Killed with SIGKILL in the middle of 2 s of work: its busy mark stays behind, and its
    // lease (300 ms without renewal) is what ends it.
    let (flood, began, killed) = high_goes_away(
        &sim,
        &clock,
        "launch 400 5000000 sync",
        |high| {
            let mut at = 0;
            after(&clock, 300, || {
                at = clock.now_ns();
                high.kill();
            });
            at
        },
        1200,
    );
    let killed_ms = check_back("killed -9 while busy", &flood, began, killed, killed);
    // It had 200 ms queued on the simulated device (the driver's cap), which runs after its death.
    assert!(killed_ms >= 100.0, "the killed process's queue still had to run: back after {killed_ms:.0} ms means it was not busy when killed");
}

/// A high-priority process that exits with a kernel still on the device: once that kernel is
/// done nothing holds the neighbour back (the process is gone), yet its busy mark stays set until
/// its lease lapses, 300 ms after its watcher thread died with it. The same happens, at random,
/// to a process that exits right after synchronizing, before its watcher's next look (seen in
/// 2-4 of 10-12 exits on a loaded 2-core machine).
#[test]
fn a_high_priority_process_that_exits_leaves_no_busy_mark_behind() {
    let _serial = serial();
    let (sim, clock) = machine();
    let (flood, _, exited) = high_goes_away(&sim, &clock, "launch 1 30000000 now", |high| kv(&high.wait_line("now", 0), "ns").unwrap().parse().unwrap(), 500);
    let back = flood.first_bucket_with(exited, 0.5).unwrap_or_else(|| panic!("the neighbour never came back: {flood:?}"));
    let after_ms = back.saturating_sub(exited) as f64 / 1e6;
    eprintln!("exited with a 30 ms kernel on the device: the neighbour was back {after_ms:.0} ms later");
    assert!(after_ms <= 100.0, "the neighbour waited {after_ms:.0} ms for a process that exited with 30 ms of work left");
}

// ------------------------------------------------------------------ 4. through the controller

#[test]
fn priority_set_live_through_the_controller() {
    let _serial = serial();
    let (sim, _clock) = machine();
    let alone = alone(&sim);
    let ctl = sim.controller();
    let stop = fresh(&sim, "stop");
    let go = fresh(&sim, "go");
    let n = neighbour(client(&sim, None).controller(&ctl), None, &stop);
    let low_pid = n.pid();
    // Started normal (no GPUSLICE_PRIORITY): it waits behind the neighbour's queue.
    let probe = client(&sim, None)
        .controller(&ctl)
        .args(&format!("init ctx 0 pid sleep 300 probe 5 {PROBE_NS} {GAP_US} waitfile {go} launch 1 1000 sync sleep 100 probe {REQUESTS} {PROBE_NS} {GAP_US}"))
        .spawn();
    let pid = probe.pid();
    let before = Probe::parse(&probe.wait_line("probe", 0));
    let l = ctl.ls();
    assert_eq!(l.process(pid).unwrap()["priority"], "normal", "{l}");
    assert_eq!(l.process(low_pid).unwrap()["priority"], "low", "{l}");
    assert_eq!(l.process_device(low_pid, 0)["throttled_ns"], 0, "the neighbour waited for nobody yet:\n{l}");

    let said = ctl.set_ok(&format!("--pid {pid} --priority high"));
    assert!(said.contains("priority high"), "{said}");
    let (l, _) = ctl.ls_until("the probe at high", Duration::from_secs(5), |l| l.process(pid).is_some_and(|p| p["priority"] == "high"));
    assert_eq!(l.process(low_pid).unwrap()["priority"], "low", "{l}");
    touch(&go);
    let after = Probe::parse(&probe.wait_line("probe", 1));
    let l = ctl.ls();
    let throttled = l.process_device(low_pid, 0)["throttled_ns"].as_u64().unwrap();
    touch(&stop);
    probe.wait().assert_all_ok();
    let flood = flood_of(&n.wait());

    eprintln!("controller: alone {alone}; started normal: {before}; set to high: {after}; the neighbour waited {:.1} ms", throttled as f64 / 1e6);
    assert!(before.p50_us >= 20 * alone.p50_us, "started normal, the probe should wait behind the neighbour's queue: {before}");
    if let Err(e) = within(&after, &alone, DEFAULT_QUEUE) {
        panic!("set to high: {e}: {after}");
    }
    assert!(throttled > 0, "the neighbour's waits for the high-priority probe are counted:\n{l}");
    assert!(flood.share_between(flood.t0, flood.stop()) > 0.5, "the neighbour starved: {flood:?}");

    // `gpuslice run --priority high` starts a process at high from the beginning.
    let stop = fresh(&sim, "stop");
    let n = neighbour(client(&sim, None).controller(&ctl), None, &stop);
    let run = sim
        .program(cli_path())
        .controller(&ctl)
        .args("run --priority high --")
        .arg(client_path(Route::Procaddr).display())
        .args(&format!("init ctx 0 pid launch 1 1000 sync sleep 100 probe 20 {PROBE_NS} {GAP_US} touch {stop}"))
        .spawn();
    let pid = run.pid();
    let _ = run.wait_line("pid", 0);
    let l = ctl.ls();
    assert_eq!(l.process(pid).unwrap()["priority"], "high", "{l}");
    let out = run.wait();
    out.assert_all_ok();
    let run_probe = Probe::parse(out.last("probe"));
    let _ = n.wait();
    eprintln!("gpuslice run --priority high: {run_probe}");
    if let Err(e) = within(&run_probe, &alone, DEFAULT_QUEUE) {
        panic!("started by `gpuslice run --priority high`: {e}: {run_probe}");
    }
}

/// A process set back from high to normal must stop holding its neighbours back: its lease
/// should lapse, and a normal probe next to a low flood waits behind the flood again.
#[test]
fn priority_set_back_to_normal_releases_the_neighbours() {
    let _serial = serial();
    let (sim, _clock) = machine();
    let ctl = sim.controller();
    let stop = fresh(&sim, "stop");
    let go = fresh(&sim, "go");
    let n = neighbour(client(&sim, None).controller(&ctl), None, &stop);
    let probe = client(&sim, Some("high"))
        .controller(&ctl)
        .args(&format!(
            "init ctx 0 pid launch 1 1000 sync sleep 100 probe 10 {PROBE_NS} {GAP_US} waitfile {go} sleep 600 probe 5 {PROBE_NS} {GAP_US} touch {stop}"
        ))
        .spawn();
    let pid = probe.pid();
    let high = Probe::parse(&probe.wait_line("probe", 0));
    ctl.set_ok(&format!("--pid {pid} --priority normal"));
    touch(&go);
    let normal = Probe::parse(&probe.wait_line("probe", 1));
    let _ = probe.wait();
    let _ = n.wait();
    eprintln!("at high: {high}; set back to normal (600 ms later, past the 300 ms lease): {normal}");
    assert!(normal.p50_us >= 20 * high.p50_us, "set back to normal, the probe is still served first: {normal} (at high: {high})");
}

// ------------------------------------------------------------------ 5. the gate over a spatial MPS share

/// `GPUSLICE_PRIORITY_GATE=spatial-off` (experimental, issue 19): a low neighbour whose share
/// MPS carries (`SIMCUDA_MPS=1` plays the device served by MPS, `GPUSLICE_SM_SHARE` becomes
/// the active-thread percentage) launches as if no high-priority process lived: no wait while
/// the probe's work is on the device, no bound on its queue. The simulated device is not
/// spatial (one kernel at a time, first come first served), so that shows as the probe's
/// request waiting behind the neighbour's whole queue, as with no priority at all. With the
/// default gate, or without a share MPS carries (time-sliced; MPS without a share), the probe
/// waits for at most the neighbour's one kernel in flight, as in test 1.
#[test]
fn spatial_off_lets_a_neighbour_with_an_mps_share_launch_past_a_busy_high_priority_process() {
    let _serial = serial();
    let (sim, clock) = machine();
    let pipes = sim.path("mps-pipes");
    std::fs::create_dir_all(&pipes).unwrap();
    std::fs::write(pipes.join("control"), b"").unwrap();
    let pipes = pipes.display().to_string();
    let mps: &[(&str, &str)] = &[("SIMCUDA_MPS", "1"), ("CUDA_MPS_PIPE_DIRECTORY", &pipes)];
    let alone = alone(&sim);
    let requests = 8;
    let run = |both: &[(&str, &str)], nb: &[(&str, &str)]| {
        let mut nb = nb.to_vec();
        nb.push(("GPUSLICE_LOG", "info"));
        let (probe, flood, out) = contest_with(&sim, &clock, Some("high"), both, &nb, requests, 300);
        let line = out.stderr_lines_with(&["device 0 is"]).join("\n");
        (probe, flood, line)
    };
    let off = ("GPUSLICE_PRIORITY_GATE", "spatial-off");
    let share = ("GPUSLICE_SM_SHARE", "80");

    // Spatial share, gate off: the neighbour's queue fills next to the busy probe.
    let (probe, flood, line) = run(mps, &[share, off]);
    let queued_ms = (flood.n - flood.done) * NEIGHBOUR_NS / 1_000_000;
    eprintln!(
        "spatial share, spatial-off: probe {probe}; the neighbour {:.1}% of what the probe left it, {queued_ms} ms queued at the stop; {line}",
        100.0 * progress(&flood, &probe)
    );
    assert!(line.contains("ACTIVE_THREAD_PERCENTAGE=80") && line.contains("spatial") && line.contains("priority gate off"), "the neighbour's MPS line: {line}");
    assert!(
        probe.p50_us >= 20 * alone.p50_us && probe.dev_p50_us > 150_000,
        "spatial-off: the neighbour should launch while the probe is busy and fill its queue, so a request waits behind it: {probe} (alone {alone})"
    );
    assert!(queued_ms >= 150, "spatial-off: the neighbour's queue is not bounded next to a live high-priority process: {flood:?}");
    assert!(progress(&flood, &probe) > 0.95, "spatial-off: the neighbour ran whenever the probe did not: {:.1}%", 100.0 * progress(&flood, &probe));

    // The same share with the default gate, and the setting where MPS carries no share: the
    // gate holds the neighbour back as in test 1.
    let time_sliced: &[(&str, &str)] = &[];
    for (what, both, nb) in [
        ("spatial share, default gate", mps, vec![share]),
        ("spatial share, GPUSLICE_PRIORITY_GATE=on", mps, vec![share, ("GPUSLICE_PRIORITY_GATE", "on")]),
        ("time-sliced with a share, spatial-off", time_sliced, vec![share, off]),
        ("MPS without a share, spatial-off", mps, vec![off]),
    ] {
        let (probe, flood, line) = run(both, &nb);
        eprintln!("{what}: probe {probe}; the neighbour {:.1}% of what the probe left it; {line}", 100.0 * progress(&flood, &probe));
        if let Err(e) = within(&probe, &alone, DEFAULT_QUEUE) {
            panic!("{what}: the gate should hold the neighbour back: {e}: {probe}\nthe neighbour: {flood:?}");
        }
        let said = if both.is_empty() { "is time-sliced" } else { "served by MPS" };
        assert!(line.contains(said), "{what}: {line}");
        if nb.contains(&off) {
            assert!(line.contains("changes nothing") && !line.contains("priority gate off"), "{what}: the line says the setting changes nothing: {line}");
        } else {
            assert!(!line.contains("GATE") && !line.contains("gate off"), "{what}: {line}");
        }
    }
}

// ------------------------------------------------------------------ 5b. the gate decided by the high process's requests

/// The auto tests' device over MPS, a folder with a daemon's `control` pipe (as in test 5).
fn mps_pipes(sim: &Sim) -> String {
    let pipes = sim.path("mps-pipes");
    std::fs::create_dir_all(&pipes).unwrap();
    std::fs::write(pipes.join("control"), b"").unwrap();
    pipes.display().to_string()
}

/// A host-bound request: `HB_KERNELS` kernels of `HB_KERNEL_NS`, `HB_HOST_US` of host work
/// after each but the last: busy ~0.8 ms of ~6.4 ms (well under `request_load`'s 0.8).
const HB_KERNELS: u64 = 8;
const HB_KERNEL_NS: u64 = 100_000;
const HB_HOST_US: u64 = 800;
/// The auto tests' neighbour kernels: short, so that on the one-kernel-at-a-time device a
/// host-bound probe kept under the gate still measures host-bound (it waits ≤ 100 µs a kernel).
const AUTO_NB_NS: u64 = 100_000;

fn host_bound_requests(n: u64) -> String {
    format!("mprobe {n} {HB_KERNELS} {HB_KERNEL_NS} {HB_HOST_US} {GAP_US}")
}

/// What an auto contest left: the probe's `probe` lines, the neighbour's flood, the probe's
/// shim log lines about its requests, and the neighbour's start-up and MPS lines.
struct AutoRun {
    probes: Vec<Probe>,
    flood: Flood,
    verdicts: Vec<String>,
    nb_lines: String,
}

impl AutoRun {
    /// Neighbour kernels launched but not finished at the stop, in ms of device time.
    fn queued_ms(&self, nb_ns: u64) -> u64 {
        (self.flood.n - self.flood.done) * nb_ns / 1_000_000
    }

    /// The neighbour's device time over wall time in `[from, to)`.
    fn nb_share(&self, from: u64, to: u64) -> f64 {
        self.flood.share_between(from, to)
    }

    /// The request count of the first verdict line saying `what` ("host-bound", ...).
    fn verdict_after(&self, what: &str) -> Option<u64> {
        let line = self.verdicts.iter().find(|l| l.contains(&format!("requests {what} (")))?;
        line.split("after request ").nth(1)?.split(')').next()?.parse().ok()
    }
}

/// Starts `probe` and the neighbour `n` together at the go file (both past their "sync"), lets
/// the clock run until both end, and returns their outputs (the probe's checked all ok).
fn run_pair(clock: &Clock, go: &str, probe: Running, n: Running) -> (Output, Output) {
    clock.start_together_refs(go, &[&n, &probe], "sync");
    clock.park();
    let out = probe.wait();
    out.assert_all_ok();
    (out, n.wait())
}

/// `c` with each of `env` set.
fn with_env<'a>(mut c: Client<'a>, env: &[(&str, &str)]) -> Client<'a> {
    for (k, v) in env {
        c = c.env(k, v);
    }
    c
}

/// The high probe running `script` (after the go file and `settle_ms`) next to a low neighbour
/// flooding the device with `nb_ns` kernels, both with `both`, the neighbour with `nb` too.
fn auto_contest(sim: &Sim, clock: &Clock, both: &[(&str, &str)], nb: &[(&str, &str)], nb_ns: u64, script: &str) -> AutoRun {
    let (go, stop) = (fresh(sim, "go"), fresh(sim, "stop"));
    let n = with_env(with_env(client(sim, Some("low")), both), nb)
        .env("GPUSLICE_LOG", "info")
        .args(&format!("init ctx 0 launch 1 1000 sync waitfile {go} flood {nb_ns} {BUCKET_MS} {stop}"))
        .spawn();
    assert!(line_ok(&n.wait_line("sync", 0)), "the neighbour did not start");
    let probe = with_env(client(sim, Some("high")), both)
        .env("GPUSLICE_LOG", "info")
        .args(&format!("init ctx 0 launch 1 1000 sync waitfile {go} sleep 100 {script} touch {stop}"))
        .spawn();
    let (out, nb_out) = run_pair(clock, &go, probe, n);
    let flood = flood_of(&nb_out);
    AutoRun {
        probes: out.lines_of("probe").into_iter().map(Probe::parse).collect(),
        flood,
        verdicts: out.stderr_lines_with(&["requests "]).into_iter().map(str::to_string).collect(),
        nb_lines: nb_out.stderr.lines().filter(|l| l.contains("priority") || l.contains("device 0 is")).collect::<Vec<_>>().join("\n"),
    }
}

/// `GPUSLICE_PRIORITY_GATE=auto` next to a host-bound high-priority process over a spatial
/// share: the high process finds its requests host-bound and says so, and the neighbour then
/// launches as under `spatial-off` (no wait, no queue bound): its queue fills and it keeps its
/// lane of the device busy. `SIMCUDA_MPS_LANES=1` gives the neighbour (active-thread
/// percentage 80) a timeline of its own, as MPS's partition would: the probe's kernels never
/// wait behind its queue, so the probe stays host-bound. With `on` instead, the same pair keeps
/// the gate: one launch in flight. (The flood keeps at most 1024 launches in flight of its own
/// accord: 102 ms of these kernels.)
#[test]
fn auto_lifts_the_gate_beside_a_host_bound_high_priority_process() {
    let _serial = serial();
    let (sim, clock) = machine();
    let pipes = mps_pipes(&sim);
    let lanes: &[(&str, &str)] = &[("SIMCUDA_MPS", "1"), ("CUDA_MPS_PIPE_DIRECTORY", &pipes), ("SIMCUDA_MPS_LANES", "1")];
    let share = ("GPUSLICE_SM_SHARE", "80");
    let script = host_bound_requests(60);
    let auto = auto_contest(&sim, &clock, lanes, &[share, ("GPUSLICE_PRIORITY_GATE", "auto")], AUTO_NB_NS, &script);
    let on = auto_contest(&sim, &clock, lanes, &[share, ("GPUSLICE_PRIORITY_GATE", "on")], AUTO_NB_NS, &script);
    // After the first 25 requests (~0.2 s: the verdict comes after ~8), to the probe's end.
    let late = |r: &AutoRun| {
        let p = &r.probes[0];
        r.nb_share(p.t0 + 200_000_000, p.t1)
    };
    for (what, r) in [("auto", &auto), ("on", &on)] {
        eprintln!(
            "{what}: probe {}; neighbour {:.1}% of the device late in the run, {} ms queued at the stop; verdicts {:?}\n{}",
            r.probes[0],
            100.0 * late(r),
            r.queued_ms(AUTO_NB_NS),
            r.verdicts,
            r.nb_lines
        );
    }
    assert!(auto.nb_lines.contains("priority gate auto"), "the neighbour's lines: {}", auto.nb_lines);
    let after = auto.verdict_after("host-bound").unwrap_or_else(|| panic!("the probe should find its requests host-bound: {:?}", auto.verdicts));
    assert!(after <= 15, "host-bound after {after} requests: {:?}", auto.verdicts);
    assert!(auto.verdict_after("device-bound").is_none(), "the probe stays host-bound: {:?}", auto.verdicts);
    assert!(auto.queued_ms(AUTO_NB_NS) >= 90, "auto: the neighbour's queue is not bounded beside a host-bound probe: {:?}", auto.flood);
    assert!(late(&auto) > 0.99, "auto: the neighbour keeps its lane busy: {:.1}%", 100.0 * late(&auto));
    assert!(on.queued_ms(AUTO_NB_NS) <= 1, "on: one launch in flight: {:?}", on.flood);
}

/// `auto` next to a device-bound high-priority process (one 2 ms kernel per request) keeps the
/// gate: on the one-kernel-at-a-time device (no lanes) a request waits for at most the
/// neighbour's one kernel in flight, as with `on` (test 1's bounds), where a lifted gate would
/// put it behind the neighbour's 200 ms queue (test 5).
#[test]
fn auto_keeps_the_gate_beside_a_device_bound_high_priority_process() {
    let _serial = serial();
    let (sim, clock) = machine();
    let pipes = mps_pipes(&sim);
    let mps: &[(&str, &str)] = &[("SIMCUDA_MPS", "1"), ("CUDA_MPS_PIPE_DIRECTORY", &pipes)];
    let alone = alone(&sim);
    let r = auto_contest(
        &sim,
        &clock,
        mps,
        &[("GPUSLICE_SM_SHARE", "80"), ("GPUSLICE_PRIORITY_GATE", "auto")],
        NEIGHBOUR_NS,
        &format!("probe 24 {PROBE_NS} {GAP_US}"),
    );
    let probe = &r.probes[0];
    eprintln!("device-bound probe, auto: {probe} (alone {alone}); {} ms queued; verdicts {:?}\n{}", r.queued_ms(NEIGHBOUR_NS), r.verdicts, r.nb_lines);
    assert!(r.nb_lines.contains("priority gate auto"), "{}", r.nb_lines);
    if let Err(e) = within(probe, &alone, DEFAULT_QUEUE) {
        panic!("auto, device-bound probe: the gate should hold the neighbour back: {e}: {probe}\nthe neighbour: {:?}", r.flood);
    }
    assert!(r.queued_ms(NEIGHBOUR_NS) <= 1, "auto, device-bound probe: one launch in flight: {:?}", r.flood);
    assert!(
        r.verdicts.iter().any(|l| l.contains("requests device-bound (") && l.contains("over the first 16")),
        "the probe reports its measurement: {:?}",
        r.verdicts
    );
    assert!(r.verdict_after("host-bound").is_none(), "{:?}", r.verdicts);
}

/// A high-priority process whose requests turn from host-bound to device-bound brings the gate
/// back within a few requests: it says so after at most 3 device-bound requests, and by the
/// end the neighbour (whose queue filled while the gate was lifted) keeps one launch in flight
/// again. Lanes as in the first auto test.
#[test]
fn auto_brings_the_gate_back_when_requests_turn_device_bound() {
    let _serial = serial();
    let (sim, clock) = machine();
    let pipes = mps_pipes(&sim);
    let lanes: &[(&str, &str)] = &[("SIMCUDA_MPS", "1"), ("CUDA_MPS_PIPE_DIRECTORY", &pipes), ("SIMCUDA_MPS_LANES", "1")];
    let host_phase = 40;
    let r = auto_contest(
        &sim,
        &clock,
        lanes,
        &[("GPUSLICE_SM_SHARE", "80"), ("GPUSLICE_PRIORITY_GATE", "auto")],
        AUTO_NB_NS,
        &format!("{} probe 60 {PROBE_NS} {GAP_US}", host_bound_requests(host_phase)),
    );
    let (host, device) = (&r.probes[0], &r.probes[1]);
    // The requests before: the start-up launch's, then the host-bound phase.
    let before = 1 + host_phase;
    let back = r.verdict_after("device-bound");
    let late = r.nb_share(device.t0 + 300_000_000, device.t1);
    eprintln!(
        "host-bound phase {host}; device-bound phase {device}; verdicts {:?}; neighbour {:.1}% late, {} ms queued at the stop",
        r.verdicts,
        100.0 * late,
        r.queued_ms(AUTO_NB_NS)
    );
    assert!(r.verdict_after("host-bound").is_some_and(|n| n < before), "host-bound during the first phase: {:?}", r.verdicts);
    let back = back.unwrap_or_else(|| panic!("the probe should find its requests device-bound again: {:?}", r.verdicts));
    assert!(back > before && back <= before + 3, "device-bound after request {back}; the first device-bound request was {}: {:?}", before + 1, r.verdicts);
    assert!(r.queued_ms(AUTO_NB_NS) <= 1, "the gate is back: one launch in flight at the stop: {:?}", r.flood);
    assert!(late < 0.9, "the gate is back: the neighbour idles while the probe's kernels run: {:.1}%", 100.0 * late);
}

/// Time-sliced, `auto` changes nothing: the gate stays whatever the high process's requests
/// are (a full neighbour queue would make each of the probe's kernels wait for it). The probe
/// here is host-bound and says so, and still each of its requests waits for at most one short
/// neighbour kernel per kernel of its own.
#[test]
fn auto_keeps_the_gate_on_a_time_sliced_device() {
    let _serial = serial();
    let (sim, clock) = machine();
    let script = host_bound_requests(40);
    let out = client(&sim, Some("high")).args(&format!("init ctx 0 launch 1 1000 sync {script}")).run();
    out.assert_all_ok();
    let alone = Probe::parse(out.last("probe"));
    // No share: one would bring the time throttle, which bounds the queue by itself.
    let r = auto_contest(&sim, &clock, &[], &[("GPUSLICE_PRIORITY_GATE", "auto")], AUTO_NB_NS, &script);
    let probe = &r.probes[0];
    let bound = alone.p99_us + HB_KERNELS * AUTO_NB_NS / 1000 + SLACK_US;
    eprintln!("time-sliced, auto: {probe} (alone {alone}, bound {bound} µs); {} ms queued; verdicts {:?}\n{}", r.queued_ms(AUTO_NB_NS), r.verdicts, r.nb_lines);
    assert!(r.nb_lines.contains("is time-sliced: GPUSLICE_PRIORITY_GATE=auto changes nothing there"), "{}", r.nb_lines);
    assert!(r.verdict_after("host-bound").is_some(), "the probe finds its requests host-bound: {:?}", r.verdicts);
    assert!(probe.p99_us <= bound, "time-sliced, auto: the gate should hold the neighbour back: {probe} (bound {bound} µs)\nthe neighbour: {:?}", r.flood);
    assert!(r.queued_ms(AUTO_NB_NS) <= 1, "time-sliced, auto: one launch in flight: {:?}", r.flood);
}

// ------------------------------------------------------------------ 6. a bad value

#[test]
fn a_bad_priority_refuses_cuda_work() {
    let sim = Sim::new();
    for bad in ["urgent", "HIGHEST", "3"] {
        let out = client(&sim, Some(bad)).args("init ctx 0 alloc 1M launch 1 1000").run();
        assert!(out.success(), "{out}");
        assert_eq!(out.code(0), CUDA_ERROR_INVALID_VALUE, "GPUSLICE_PRIORITY={bad:?} must make cuInit fail:\n{out}");
        for i in 1..4 {
            assert_ne!(out.code(i), 0, "GPUSLICE_PRIORITY={bad:?}: CUDA work must be refused:\n{out}");
        }
        let said = out.stderr_lines_with(&["gpuslice", "GPUSLICE_PRIORITY"]);
        assert_eq!(said.len(), 1, "GPUSLICE_PRIORITY={bad:?}: one line naming the variable:\n{out}");
        assert!(said[0].contains("high, normal or low"), "the line says what is accepted: {}", said[0]);
    }
    // Any case is accepted, as the controller's `--priority`.
    let out = client(&sim, Some("High")).args("init ctx 0 launch 1 1000 sync").run();
    out.assert_all_ok();
    // `gpuslice run` checks the value before starting anything.
    let out = sim.program(cli_path()).args("run --priority urgent --").arg(client_path(Route::Procaddr).display()).args("init").run();
    assert!(!out.success() && out.lines.is_empty() && out.stderr.contains("--priority"), "{out}");
}
