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
//! These run on wall time (the simulated clock of the issue is not built yet): the bounds are
//! looser than the issue's [0.9 × share, share + 0.5] and 3 % on the sum (on a quiet machine the
//! figures are within the issue's), and a miss is measured once more before it fails, as
//! sm_share.rs does.

use gpuslice_integration::*;
use std::time::Duration;

/// Device work per launch.
const KERNEL_NS: u64 = 200_000;
const BUCKET_MS: u64 = 100;

/// What one tenant got, from its `flood` line.
struct Flood {
    /// CLOCK_MONOTONIC ns of its first launch.
    t0: u64,
    /// Device µs busy per bucket of `BUCKET_MS`.
    busy_us: Vec<u64>,
}

impl Flood {
    fn parse(out: &Output) -> Flood {
        out.assert_all_ok();
        let line = out.last("flood");
        let t0 = kv(line, "t0").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no t0 in {line}"));
        let busy_us = kv(line, "busy").unwrap_or_else(|| panic!("no busy in {line}")).split(',').map(|v| v.parse().unwrap()).collect();
        Flood { t0, busy_us }
    }

    /// Percent of `[from, to)` (CLOCK_MONOTONIC ns, bucket-aligned to this flood's start) that
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

/// Starts one throttled tenant at `share`% that floods from `go` until `stop`.
fn tenant(sim: &Sim, share: u32, go: &str, stop: &str) -> Running {
    tenant_of(sim, None, share, go, stop)
}

/// The same, registered with `ctl` when given (its own group `pid-N`, share from its
/// environment): then the turn is in the ledger's device slot.
fn tenant_of(sim: &Sim, ctl: Option<&Controller<'_>>, share: u32, go: &str, stop: &str) -> Running {
    let script = format!("init ctx 0 launch 1 {KERNEL_NS} sync waitfile {go} flood {KERNEL_NS} {BUCKET_MS} {stop}");
    let client = sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", share).args(&script);
    match ctl {
        Some(ctl) => client.controller(ctl).spawn(),
        None => client.spawn(),
    }
}

/// Runs tenants of `shares` (registered with `ctl` when given) together for `seconds` and
/// returns the share each got over the window from 1 s after the start to 0.3 s before the stop.
fn measure_with(sim: &Sim, ctl: Option<&Controller<'_>>, shares: &[u32], seconds: f64) -> Vec<f64> {
    let go = sim.path_str("go");
    let stop = sim.path_str("stop");
    let _ = std::fs::remove_file(&go);
    let _ = std::fs::remove_file(&stop);
    let tenants: Vec<Running> = shares.iter().map(|&s| tenant_of(sim, ctl, s, &go, &stop)).collect();
    for t in &tenants {
        assert!(line_ok(&t.wait_line("sync", 0)), "a tenant did not start: {}", t.stderr_now());
    }
    let start = monotonic_ns();
    touch(&go);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    touch(&stop);
    let end = monotonic_ns();
    let floods: Vec<Flood> = tenants.into_iter().map(|t| Flood::parse(&t.wait())).collect();
    let (from, to) = (start + 1_000_000_000, end - 300_000_000);
    floods.iter().map(|f| f.share(from, to)).collect()
}

/// Each tenant within [low × share, share + over] points, and the sum at least `sum_low` of
/// the shares' sum; measured once more before failing.
fn assert_shares(sim: &Sim, shares: &[u32], seconds: f64, low: f64, over: f64, sum_low: f64) {
    assert_shares_with(sim, None, shares, seconds, low, over, sum_low)
}

fn assert_shares_with(sim: &Sim, ctl: Option<&Controller<'_>>, shares: &[u32], seconds: f64, low: f64, over: f64, sum_low: f64) {
    let check = |got: &[f64]| -> Result<(), String> {
        let wanted: f64 = shares.iter().map(|&s| f64::from(s)).sum();
        let sum: f64 = got.iter().sum();
        for (&s, &g) in shares.iter().zip(got) {
            let s = f64::from(s);
            if g < low * s || g > s + over {
                return Err(format!("a tenant at {s}% got {g:.2}% (allowed {:.2}..{:.2})", low * s, s + over));
            }
        }
        if sum < sum_low * wanted {
            return Err(format!("the tenants got {sum:.1}% together of {wanted}% (at least {:.1})", sum_low * wanted));
        }
        Ok(())
    };
    let first = measure_with(sim, ctl, shares, seconds);
    eprintln!("{} tenants: {first:.2?}", shares.len());
    if let Err(why) = check(&first) {
        let second = measure_with(sim, ctl, shares, seconds);
        eprintln!("{} tenants, again: {second:.2?}", shares.len());
        if let Err(again) = check(&second) {
            panic!("{again}; first try: {why}\nfirst {first:.2?}\nsecond {second:.2?}");
        }
    }
}

/// One test at a time: they load the 2-core machine with up to 16 processes each.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn four_eight_and_sixteen_tenants_each_get_their_share() {
    let _serial = serial();
    let sim = Sim::new();
    for n in [4u32, 8, 16] {
        assert_shares(&sim, &vec![96 / n; n as usize], 3.0, 0.85, 1.0, 0.9);
    }
}

#[test]
fn one_large_share_among_fifteen_small_ones() {
    let _serial = serial();
    let sim = Sim::new();
    let mut shares = vec![40];
    shares.extend([4; 15]);
    assert_shares(&sim, &shares, 3.5, 0.85, 1.5, 0.9);
}

/// Four steady tenants at 20% and a visitor at 15% that joins for half of every second, four
/// times (and exits normally); the shares the steady ones got.
fn steady_next_to_a_visitor(sim: &Sim) -> Vec<f64> {
    let go = sim.path_str("go");
    let stop = sim.path_str("stop");
    let _ = std::fs::remove_file(&go);
    let _ = std::fs::remove_file(&stop);
    let steady: Vec<Running> = (0..4).map(|_| tenant(sim, 20, &go, &stop)).collect();
    for t in &steady {
        assert!(line_ok(&t.wait_line("sync", 0)));
    }
    let start = monotonic_ns();
    touch(&go);
    for round in 0..4 {
        let leave = sim.path_str(&format!("leave{round}"));
        let _ = std::fs::remove_file(&leave);
        let visitor = tenant(sim, 15, &go, &leave);
        std::thread::sleep(Duration::from_millis(500));
        touch(&leave);
        let got = Flood::parse(&visitor.wait());
        assert!(got.busy_us.iter().sum::<u64>() > 0, "the visitor of round {round} ran");
        std::thread::sleep(Duration::from_millis(500));
    }
    touch(&stop);
    let end = monotonic_ns();
    let floods: Vec<Flood> = steady.into_iter().map(|t| Flood::parse(&t.wait())).collect();
    floods.iter().map(|f| f.share(start + 500_000_000, end - 300_000_000)).collect()
}

#[test]
fn a_tenant_joining_and_leaving_every_second_upsets_nobody() {
    let _serial = serial();
    let sim = Sim::new();
    let off = |got: &[f64]| got.iter().any(|g| !(18.0..=21.0).contains(g));
    let mut got = steady_next_to_a_visitor(&sim);
    eprintln!("steady tenants next to a visitor: {got:.2?}");
    if off(&got) {
        // As sm_share.rs: once more before believing a miss on a busy machine.
        got = steady_next_to_a_visitor(&sim);
        eprintln!("steady tenants next to a visitor, again: {got:.2?}");
    }
    assert!(!off(&got), "steady tenants at 20% next to a visitor coming and going got {got:.2?} (allowed 18..21)");
    let uid = unsafe { libc::getuid() };
    let page = format!("/dev/shm/gpuslice-board6-{uid}-{}", sim.device_uuid(0));
    assert!(!std::path::Path::new(&page).exists(), "the last tenant out removed the turn page {page}");
}

#[test]
fn thirty_two_and_sixty_four_tenants_each_get_their_share() {
    let _serial = serial();
    // 64 contexts of the simulator's 300 MiB reserve need more than its default 16 GiB.
    let sim = Sim::new().env("SIMCUDA_MEM", "64G");
    // Shares are whole percents: 64 tenants at 1% (96/64 = 1.5 cannot be asked for).
    for n in [32u32, 64] {
        assert_shares(&sim, &vec![96 / n; n as usize], 3.0, 0.85, 1.0, 0.9);
    }
}

#[test]
fn sixteen_threads_on_sixteen_streams_share_one_turn() {
    let _serial = serial();
    let sim = Sim::new();
    // 16 threads × 50 kernels of 200 µs = 160 ms of device time at 30%: about 0.53 s.
    let measure = || {
        let out =
            sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", 30).args("init ctx 0 launch 22 200000 sync mark plaunch 16 50 200000 elapsed").run();
        out.assert_all_ok();
        let wall_ms: f64 = out.get("elapsed", "ms").unwrap().parse().unwrap();
        160.0 / wall_ms * 100.0
    };
    let first = measure();
    if (first - 30.0).abs() > 2.0 {
        // As sm_share.rs: once more before believing a miss on a busy machine.
        let second = measure();
        assert!((second - 30.0).abs() <= 2.0, "16 threads on 16 streams at 30%: {second:.1}% (first try {first:.1}%)");
    }
}

/// Issue 16, defect 8: the per-user turn pages (made for every device of a process without a
/// controller, throttled or not) are gone once the processes that used them exit normally, and
/// a killed process's page is removed by the next normal exit.
#[test]
fn processes_that_exit_normally_leave_no_turn_page() {
    let sim = Sim::new();
    let uid = unsafe { libc::getuid() };
    let pages: Vec<String> = (0..2).map(|d| format!("/dev/shm/gpuslice-board6-{uid}-{}", sim.device_uuid(d))).collect();
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
    let sim = Sim::new();
    let ctl = sim.controller();
    assert_shares_with(&sim, Some(&ctl), &[6; 16], 3.0, 0.85, 1.0, 0.9);
}
