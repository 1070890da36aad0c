//! Many throttled processes on one device (issue 14): every one gets its share, none starves,
//! whatever the mix of shares, and a neighbour that comes and goes does not upset the others.
//!
//! Each tenant floods the simulated device with 200 µs kernels from a common start until a
//! common stop (cuclient's `flood`, which says when each kernel ran on the simulated timeline),
//! and its share is its device time inside a common window that leaves out the start (the
//! tokens saved before the first turn) and the stop. Before the fix, 8 processes at 12% got
//! 0.5–12% here and 16 at 6% never finished: a cost estimate inflated once by another process's
//! queued work was never corrected, and turns were won by racing.
//!
//! They run on the simulated clock (`Sim::with_clock`): virtual time moves only when every
//! process waits, so the figures do not depend on the machine's load, and the bounds are the
//! issue's: every tenant within [0.9 × share, share + 0.5 point], the sum within 3 % of the
//! shares' sum, measured once; above the share, the window's own resolution where that is
//! coarser than 0.5 point (`resolution_points`).

use gpuslice_integration::*;
use std::time::Duration;

/// Device work per launch.
const KERNEL_NS: u64 = 200_000;
const BUCKET_MS: u64 = 100;

/// What one tenant got, from its `flood` line.
struct Flood {
    /// Virtual ns of its first launch.
    t0: u64,
    /// Device µs busy per bucket of `BUCKET_MS`.
    busy_us: Vec<u64>,
    /// Times a thread of the tenant blocked on the simulated clock during the flood (a sleep,
    /// a futex wait, a driver wait that did not return at once): its wake-ups.
    blocked: u64,
    /// Virtual ms the flood lasted.
    ms: f64,
}

impl Flood {
    fn parse(out: &Output) -> Flood {
        out.assert_all_ok();
        let line = out.last("flood");
        let t0 = kv(line, "t0").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no t0 in {line}"));
        let busy_us = kv(line, "busy").unwrap_or_else(|| panic!("no busy in {line}")).split(',').map(|v| v.parse().unwrap()).collect();
        let blocked = kv(line, "blocked").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no blocked in {line}"));
        let ms = kv(line, "ms").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no ms in {line}"));
        Flood { t0, busy_us, blocked, ms }
    }

    /// Percent of `[from, to)` (virtual ns, bucket-aligned to this flood's start) that
    /// the device ran this tenant's kernels.
    fn share(&self, from: u64, to: u64) -> f64 {
        let bucket_ns = BUCKET_MS * 1_000_000;
        let first = from.saturating_sub(self.t0).div_ceil(bucket_ns) as usize;
        let last = (to.saturating_sub(self.t0) / bucket_ns) as usize;
        let buckets = &self.busy_us[first.min(self.busy_us.len())..last.min(self.busy_us.len())];
        assert!(!buckets.is_empty(), "no bucket in the window");
        buckets.iter().sum::<u64>() as f64 / (buckets.len() as f64 * BUCKET_MS as f64 * 1000.0) * 100.0
    }
}

/// Starts one throttled tenant at `share`% (registered with `ctl` when given: its own group
/// `pid-N`, share from its environment; then the turn is in the ledger's device slot) that
/// floods for `flood_ms` of virtual time once `go` exists.
fn tenant_of(sim: &Sim, ctl: Option<&Controller<'_>>, share: u32, go: &str, flood_ms: u64) -> Running {
    let script = format!("init ctx 0 launch 1 {KERNEL_NS} sync waitfile {go} flood {KERNEL_NS} {BUCKET_MS} +{flood_ms}");
    let client = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", share).args(&script);
    match ctl {
        Some(ctl) => client.controller(ctl).spawn(),
        None => client.spawn(),
    }
}

/// Runs tenants of `shares` (registered with `ctl` when given) together for `flood_ms` of
/// virtual time; the window shares are judged over (from 1 s after the start to 0.3 s before
/// the stop) and what each got.
fn flood_together(sim: &Sim, ctl: Option<&Controller<'_>>, shares: &[u32], flood_ms: u64) -> (u64, u64, Vec<Flood>) {
    let clock = sim.clock();
    clock.park();
    let go = sim.path_str("go");
    let _ = std::fs::remove_file(&go);
    let tenants: Vec<Running> = shares.iter().map(|&s| tenant_of(sim, ctl, s, &go, flood_ms)).collect();
    let start = clock.start_together(&go, &tenants, "sync");
    clock.park();
    let outs: Vec<Output> = tenants.into_iter().map(Running::wait).collect();
    let floods: Vec<Flood> = outs.iter().map(Flood::parse).collect();
    for (f, out) in floods.iter().zip(&outs) {
        // Failed once in ~570 runs (stop 21, the message then said no more): what to look at next.
        let clock_notes: Vec<&str> = out.stderr.lines().filter(|l| l.contains("simclock")).collect();
        assert_eq!(
            f.t0,
            start,
            "every tenant started at the common instant (this one {:+} ns off); its clock's notes: {clock_notes:?}",
            i128::from(f.t0) - i128::from(start)
        );
    }
    let (from, to) = (start + 1_000_000_000, start + flood_ms * 1_000_000 - 300_000_000);
    (from, to, floods)
}

/// The shim's bursts while a device is shared (`shim/src/policy/throttle.rs`, `Bucket::quantum`):
/// the quantum is share × W, W = 6 ms per process taking turns, 12 to 100 ms; the capacity (the
/// most a process saves) share × (1.5 W + 10 ms), at least the quantum + 1 ms; the quantum at
/// least 1 ms.
const PEER_WALL_NS: u64 = 6_000_000;
const WALL_NS: std::ops::RangeInclusive<u64> = 12_000_000..=100_000_000;
const CAPACITY_EXTRA_WALL_NS: u64 = 10_000_000;
const QUANTUM_NS: u64 = 1_000_000;

/// The most a tenant at `share`% among `tenants` can get over its share in a window of
/// `window_ns`, in points, when nothing is wrong: the resolution of a finite window.
///
/// Throttled processes sharing a device take turns in ticket order, one burst each per round,
/// and each starts its turn with what it saved since its previous one: share × the round, in
/// device time. Shares that sum to 100 % keep the device busy and the round settles at some R
/// that then holds to a kernel or two for the whole flood (the simulator, 1 ms buckets: R from
/// 60 to 125 ms in different runs of 40 + 15 × 4 %). So a tenant at s has a burst of B = s·R at
/// the start of every round, and in a window of T = k·R + r it runs k·B plus its part of the
/// last r: at most min(r, B), against s·r. That is most over at r = B, a window that opens as a
/// burst starts and closes as one ends: B − s·B = s·(1 − s)·R. (Equally under at the other
/// phase; a window of whole rounds is exact.) R is at most the capacity's wall time, 1.5 W +
/// 10 ms with W from `tenants` (the peers a process counts are among them; at least (quantum +
/// 1 ms) / s for a small share): a longer round clamps the tenant's bursts, and then it gets less
/// than s over any long window. A burst may also run one kernel over its tokens (its last launch
/// goes while any are left). Hence resolution = (s·(1 − s)·R_max + one kernel) / T.
///
/// 40 % among 16: W = 96 ms, R_max = 154 ms, 36.96 + 0.2 ms: 0.88 point of 4.2 s, the window
/// that test had (40.54 once in CI against share + 0.5; 40.57 and 40.65 in 216 runs here). In
/// runs recorded at 1 ms, every 4.2 s window of a run stayed within 40 ± s·(1 − s)·R / T of that
/// run's own R (R = 99 ms: 39.60..40.56; R = 60 ms, 70 rounds to the window: 40.00 in every
/// one). 24 % among 4 over 1.7 s: W = 24 ms, R_max = 46 ms, 0.51.
fn resolution_points(share: u32, tenants: usize, window_ns: u64) -> f64 {
    let s = f64::from(share) / 100.0;
    let w = (tenants as u64 * PEER_WALL_NS).clamp(*WALL_NS.start(), *WALL_NS.end()) as f64;
    let quantum = (s * w).max(QUANTUM_NS as f64);
    let round = (1.5 * w + CAPACITY_EXTRA_WALL_NS as f64).max((quantum + QUANTUM_NS as f64) / s);
    (s * (1.0 - s) * round + KERNEL_NS as f64) / window_ns as f64 * 100.0
}

/// Each tenant within [0.9 × share, share + 0.5] points (or + the window's resolution where that
/// is more), and the sum within 3 % of the shares'.
fn assert_shares(sim: &Sim, shares: &[u32], flood_ms: u64) {
    assert_shares_with(sim, None, shares, flood_ms)
}

fn assert_shares_with(sim: &Sim, ctl: Option<&Controller<'_>>, shares: &[u32], flood_ms: u64) {
    let real = std::time::Instant::now();
    let (from, to, floods) = flood_together(sim, ctl, shares, flood_ms);
    let got: Vec<f64> = floods.iter().map(|f| f.share(from, to)).collect();
    eprintln!("{} tenants ({:.1} s of real time): {got:.2?}", shares.len(), real.elapsed().as_secs_f64());
    let wanted: f64 = shares.iter().map(|&s| f64::from(s)).sum();
    let sum: f64 = got.iter().sum();
    for (&s, &g) in shares.iter().zip(&got) {
        let over = resolution_points(s, shares.len(), to - from).max(0.5);
        let s = f64::from(s);
        assert!(g >= 0.9 * s && g <= s + over, "a tenant at {s}% got {g:.2}% (allowed {:.2}..{:.2}); all: {got:.2?}", 0.9 * s, s + over);
    }
    assert!((sum - wanted).abs() <= 0.03 * wanted, "the tenants got {sum:.2}% together of {wanted}% (allowed ±3 %); all: {got:.2?}");
}

/// One test at a time: they load the 2-core machine with up to 16 processes each.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn four_eight_and_sixteen_tenants_each_get_their_share() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    for n in [4u32, 8, 16] {
        assert_shares(&sim, &vec![96 / n; n as usize], 3000);
    }
}

#[test]
fn one_large_share_among_fifteen_small_ones() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let mut shares = vec![40];
    shares.extend([4; 15]);
    // A longer window than the others, so that the share + 0.5 point holds for the 40 %
    // tenant too: its resolution (`resolution_points`) is 37.2 ms, 0.45 point of the 8.2 s
    // window of a 9.5 s flood (0.88 of the 4.2 s of the 5.5 s flood it had: 40.54 % once in
    // CI, 2 runs of 216 here). Virtual time: about 1 s of real time either way.
    assert!(resolution_points(40, shares.len(), 8_200_000_000) <= 0.5);
    assert_shares(&sim, &shares, 9500);
}

/// Four steady tenants at 20% and a visitor at 15% that joins for half of every second, four
/// times (and exits normally); the shares the steady ones got, and each visitor's.
fn steady_next_to_a_visitor(sim: &Sim) -> (Vec<f64>, Vec<f64>) {
    let clock = sim.clock();
    clock.park();
    let go = sim.path_str("go");
    let _ = std::fs::remove_file(&go);
    let steady: Vec<Running> = (0..4).map(|_| tenant_of(sim, None, 20, &go, 4500)).collect();
    let start = clock.start_together(&go, &steady, "sync");
    let mut visitors = Vec::new();
    for round in 0..4u64 {
        // Joins at 0.5 s + 1 s × round of virtual time, stays 0.5 s: the test holds time from
        // the visitor's start until it floods.
        clock.sleep_ns(500_000_000);
        let come = sim.path_str(&format!("come{round}"));
        let visitor = sim
            .client(Route::Procaddr)
            .shim()
            .env("GPUSLICE_SM_SHARE", 15)
            .args(&format!("init ctx 0 waitfile {come} flood {KERNEL_NS} {BUCKET_MS} +500"))
            .spawn();
        touch(&come);
        assert!(line_ok(&visitor.wait_line("waitfile", 0)), "visitor {round} started: {}", visitor.stderr_now());
        visitors.push(visitor);
        clock.sleep_ns(500_000_000);
    }
    clock.park();
    let visited: Vec<f64> = visitors
        .into_iter()
        .map(|v| {
            let f = Flood::parse(&v.wait());
            f.share(f.t0, f.t0 + 500_000_000)
        })
        .collect();
    let floods: Vec<Flood> = steady.into_iter().map(|t| Flood::parse(&t.wait())).collect();
    (floods.iter().map(|f| f.share(start + 500_000_000, start + 4_200_000_000)).collect(), visited)
}

#[test]
fn a_tenant_joining_and_leaving_every_second_upsets_nobody() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let (got, visitors) = steady_next_to_a_visitor(&sim);
    eprintln!("steady tenants next to a visitor: {got:.2?}; visitors: {visitors:.2?}");
    assert!(got.iter().all(|g| (18.0..=20.5).contains(g)), "steady tenants at 20% next to a visitor coming and going got {got:.2?} (allowed 18..20.5)");
    // A visit is short: the tokens a process starts with (its bucket's capacity, share × (1.5 W
    // + 10 ms) with W = 6 ms × 5 processes: 8.25 ms at 15%) are 1.65 points of 0.5 s.
    assert!(visitors.iter().all(|v| (13.5..=16.7).contains(v)), "each visit of a tenant at 15% got {visitors:.2?} (allowed 13.5..16.7)");
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let page = format!("/dev/shm/gpuslice-board7-{uid}-{}", sim.device_uuid(0));
    assert!(!std::path::Path::new(&page).exists(), "the last tenant out removed the turn page {page}");
}

#[test]
fn thirty_two_and_sixty_four_tenants_each_get_their_share() {
    let _serial = serial();
    // 64 contexts of the simulator's 300 MiB reserve need more than its default 16 GiB.
    let sim = Sim::new().with_clock().env("SIMCUDA_MEM", "64G");
    // Shares are whole percents: 64 tenants at 1% (96/64 = 1.5 cannot be asked for).
    for n in [32u32, 64] {
        assert_shares(&sim, &vec![96 / n; n as usize], 3000);
    }
}

#[test]
fn sixteen_threads_on_sixteen_streams_share_one_turn() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    // 16 threads × 50 kernels of 200 µs = 160 ms of device time at 30%: about 0.53 s.
    let run = |share: Option<u32>| {
        let mut c = sim.client(Route::Procaddr).shim();
        if let Some(s) = share {
            c = c.env("GPUSLICE_SM_SHARE", s);
        }
        let out = c.args("init ctx 0 launch 22 200000 sync mark plaunch 16 50 200000 elapsed").run();
        out.assert_all_ok();
        let ms: f64 = out.get("elapsed", "ms").unwrap().parse().unwrap();
        let cpu: f64 = out.get("plaunch", "cpu_ns_per_launch").unwrap().parse().unwrap();
        (160.0 / ms * 100.0, cpu)
    };
    let (got, cpu_held) = run(Some(30));
    let (_, cpu_free) = run(None);
    eprintln!("16 threads on 16 streams at 30%: {got:.2}% of virtual time; CPU per launch {cpu_held:.0} ns (unthrottled {cpu_free:.0} ns)");
    assert!((got - 30.0).abs() <= 1.0, "16 threads on 16 streams at 30%: {got:.2}% (allowed 29..31)");
    // Host time per launch is judged on the GPU only (tests/gpu/tenants.sh, T16x16): here a
    // simulated launch costs ~1 µs of CPU in a debug build and every wait on the simulated clock
    // is a real futex sleep, so the ratio (printed above, 10-25× here) measures the simulator.
    assert!(cpu_held > 0.0 && cpu_free > 0.0, "the launching threads' CPU time was measured");
}

/// Issue 16, defect 8: the per-user turn pages (made for every device of a process without a
/// controller, throttled or not) are gone once the processes that used them exit normally, and
/// a killed process's page is removed by the next normal exit.
#[test]
fn processes_that_exit_normally_leave_no_turn_page() {
    let sim = Sim::new();
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let pages: Vec<String> = (0..2).map(|d| format!("/dev/shm/gpuslice-board7-{uid}-{}", sim.device_uuid(d))).collect();
    let exists = |p: &String| std::path::Path::new(p).exists();
    let out = sim.client(Route::Procaddr).shim().args("init ctx 0 launch 1 1000 sync").run();
    out.assert_all_ok();
    assert!(!pages.iter().any(exists), "an unthrottled process left {pages:?}");
    // A killed throttled process leaves its page; the next one to exit normally removes it.
    let mut killed = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", 30).args("init ctx 0 launch 1000 200000 sync").spawn();
    assert!(poll_until(Duration::from_secs(10), || exists(&pages[0])), "the throttled process made its page");
    killed.kill();
    let _ = killed.wait();
    assert!(exists(&pages[0]), "a killed process cannot remove its page");
    let out = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", 30).args("init ctx 0 launch 5 200000 sync").run();
    out.assert_all_ok();
    assert!(!pages.iter().any(exists), "the next process out removed {pages:?}");
}

/// With a controller the turn lives in the ledger's device slot and its tenants are each in a
/// group of their own: the same shares hold.
#[test]
fn sixteen_tenants_of_a_controller_each_get_their_share() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let ctl = sim.controller();
    assert_shares_with(&sim, Some(&ctl), &[6; 16], 3000);
}

/// Issue 14: the CPU a throttled process spends waiting must not grow with the processes that
/// share the device (on the H100, 32 processes at 3 % each spent 1.3-1.6 s of CPU in 6 s).
/// Counted, not timed: each tenant's wake-ups (its threads' blocks on the simulated clock during
/// the flood: token naps, turn waits, drain waits) per second of virtual time. With 32 tenants
/// each takes the turn a third as often as with 4, so it must wake no more often than with 4,
/// and at most 250 times a second (about 170 here; each hand-over wakes O(1) waiters, a waiter
/// far back in the queue sleeps until woken or 100 ms). Before the simulated futex matched
/// words (it woke every process's turn waiters at each of the shim's process-local wakes) a
/// tenant of 32 blocked 11 times per turn, against 6 with 4.
#[test]
fn wake_ups_per_process_do_not_grow_with_the_tenants() {
    let _serial = serial();
    let sim = Sim::new().with_clock().env("SIMCUDA_MEM", "64G");
    let rate = |n: u32| {
        let (_, _, floods) = flood_together(&sim, None, &vec![96 / n; n as usize], 3000);
        floods.iter().map(|f| f.blocked as f64 / (f.ms / 1000.0)).collect::<Vec<f64>>()
    };
    let (four, thirty_two) = (rate(4), rate(32));
    let most = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    eprintln!("wake-ups per tenant per second: 4 tenants {four:.0?}; 32 tenants: {thirty_two:.0?}");
    assert!(most(&thirty_two) <= most(&four), "a tenant of 32 woke up to {:.0}/s, more than one of 4 ({:.0}/s)", most(&thirty_two), most(&four));
    assert!(most(&thirty_two) <= 250.0, "a tenant of 32 woke up to {:.0}/s (allowed 250)", most(&thirty_two));
}
