//! Shares that guarantee and lend (issue 18), on the simulated device timeline and clock: a
//! group's `GPUSLICE_SM_SHARE` is the least it gets while it has work, `GPUSLICE_SM_MAX` the
//! most (`none`: no cap), and the time an idle neighbour leaves goes to those that have work,
//! in proportion to their guarantees. Each scenario is the acceptance figure.
//!
//! Tenants flood the device with 200 µs kernels (cuclient's `flood`, which says how long each
//! 10 ms bucket of the clock its kernels ran on the simulated timeline) from a common virtual
//! instant; a share is device time over a window of the clock that leaves out the start. The
//! simulated device runs one kernel at a time, so the shares of tenants that saturate it add up
//! to what the hand-overs leave. Virtual time moves only when every process waits: the figures
//! do not depend on the machine's load and each is measured once.

use gpuslice_integration::*;

const KERNEL_NS: u64 = 200_000;
const BUCKET_MS: u64 = 10;
const MS: u64 = 1_000_000;

/// One test at a time: each loads the 2-core machine with up to three busy processes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A guarantee and a cap (`None`: the share is the cap, as `GPUSLICE_SM_SHARE` alone says).
#[derive(Clone, Copy)]
struct Slice {
    share: Option<u32>,
    max: Option<&'static str>,
}

fn lending(share: u32) -> Slice {
    Slice { share: Some(share), max: Some("none") }
}

fn capped(share: u32, max: &'static str) -> Slice {
    Slice { share: Some(share), max: Some(max) }
}

const UNTHROTTLED: Slice = Slice { share: None, max: None };

fn client<'a>(sim: &'a Sim, slice: Slice) -> Client<'a> {
    let mut c = sim.client(Route::Procaddr).shim();
    if let Some(s) = slice.share {
        c = c.env("GPUSLICE_SM_SHARE", s);
    }
    if let Some(m) = slice.max {
        c = c.env("GPUSLICE_SM_MAX", m);
    }
    c
}

/// A tenant that waits for `go`, sleeps `idle_ms`, then floods for `flood_ms` of the clock. A
/// short flood first teaches the shim what its kernel costs (an unknown kernel is charged 1 ms
/// until measured, which would cut the first turn after it came back short).
fn tenant(c: Client<'_>, go: &str, idle_ms: u64, flood_ms: u64) -> Running {
    let idle = if idle_ms > 0 { format!("sleep {idle_ms} ") } else { String::new() };
    c.args(&format!("init ctx 0 flood {KERNEL_NS} {BUCKET_MS} +5 sync waitfile {go} {idle}flood {KERNEL_NS} {BUCKET_MS} +{flood_ms}")).spawn()
}

/// Starts a tenant that waits for the go file it is given.
type Start<'a> = Box<dyn FnOnce(&str) -> Running + 'a>;

/// Starts `tenants` (made by `start(go)` each) at one virtual instant; returns it and their floods.
fn together<'a>(sim: &'a Sim, tenants: Vec<Start<'a>>) -> (u64, Vec<Flood>) {
    let clock = sim.clock();
    clock.park();
    let go = sim.path_str("go");
    let _ = std::fs::remove_file(&go);
    let running: Vec<Running> = tenants.into_iter().map(|t| t(&go)).collect();
    let start = clock.start_together(&go, &running, "sync");
    clock.park();
    let floods = running
        .into_iter()
        .map(|r| {
            let out = r.wait();
            out.assert_all_ok();
            Flood::parse(out.last("flood"))
        })
        .collect();
    (start, floods)
}

/// Tenants of `slices` flooding together for `flood_ms`; each one's percent over
/// `[start + from_ms, start + to_ms)`.
fn shares(sim: &Sim, slices: &[Slice], flood_ms: u64, from_ms: u64, to_ms: u64) -> Vec<f64> {
    let tenants = slices.iter().map(|&s| Box::new(move |go: &str| tenant(client(sim, s), go, 0, flood_ms)) as Start).collect();
    let (start, floods) = together(sim, tenants);
    floods.iter().map(|f| 100.0 * f.share_between(start + from_ms * MS, start + to_ms * MS)).collect()
}

fn assert_near(got: f64, want: f64, points: f64, what: &str) {
    assert!((got - want).abs() <= points, "{what}: got {got:.1}%, want {want} ± {points}");
}

#[test]
fn alone_a_lender_runs_at_full_speed_and_a_cap_holds() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let plain = shares(&sim, &[UNTHROTTLED], 1000, 100, 900)[0];
    let lender = shares(&sim, &[lending(30)], 1000, 100, 900)[0];
    let capped50 = shares(&sim, &[capped(30, "50")], 1000, 100, 900)[0];
    let classic = shares(&sim, &[Slice { share: Some(30), max: None }], 1000, 100, 900)[0];
    eprintln!("alone: unthrottled {plain:.1}%, 30 no cap {lender:.1}%, 30 cap 50 {capped50:.1}%, 30 (share = cap) {classic:.1}%");
    assert!(lender >= 0.95 * plain, "guarantee 30, no cap, alone: {lender:.1}% of the device, {plain:.1}% unthrottled (want ≥ 95 % of it)");
    assert_near(capped50, 50.0, 3.0, "guarantee 30, cap 50, alone");
    assert_near(classic, 30.0, 3.0, "GPUSLICE_SM_SHARE=30 alone keeps its old meaning (a cap)");
}

#[test]
fn saturating_lenders_split_the_device_by_their_guarantees() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let alone = shares(&sim, &[UNTHROTTLED], 1000, 100, 900)[0];
    let even = shares(&sim, &[lending(30), lending(30)], 1500, 300, 1400);
    eprintln!("30 + 30: {even:.1?} (alone {alone:.1}%)");
    for &g in &even {
        assert_near(g, 50.0, 3.0, "30 + 30, each");
    }
    let sum: f64 = even.iter().sum();
    assert!(sum >= 0.95 * alone, "30 + 30 together got {sum:.1}%, one process alone {alone:.1}% (want ≥ 95 % of it)");
    let uneven = shares(&sim, &[lending(30), lending(70)], 1500, 300, 1400);
    eprintln!("30 + 70: {uneven:.1?}");
    assert_near(uneven[0], 30.0, 3.0, "30 + 70, the 30");
    assert_near(uneven[1], 70.0, 3.0, "30 + 70, the 70");
}

#[test]
fn three_tenants_and_then_two_when_one_leaves() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    // The 20 % tenant floods for 1.5 s, the others for 3.5 s.
    let tenants: Vec<Start> = vec![
        Box::new(|go: &str| tenant(client(&sim, lending(20)), go, 0, 1500)),
        Box::new(|go: &str| tenant(client(&sim, lending(30)), go, 0, 3500)),
        Box::new(|go: &str| tenant(client(&sim, lending(50)), go, 0, 3500)),
    ];
    let (start, floods) = together(&sim, tenants);
    let three: Vec<f64> = floods.iter().map(|f| 100.0 * f.share_between(start + 300 * MS, start + 1400 * MS)).collect();
    let two: Vec<f64> = floods[1..].iter().map(|f| 100.0 * f.share_between(start + 2000 * MS, start + 3400 * MS)).collect();
    eprintln!("20/30/50: {three:.1?}; after the 20 left: {two:.1?}");
    for (g, want) in three.iter().zip([20.0, 30.0, 50.0]) {
        assert_near(*g, want, 3.0, "20/30/50");
    }
    assert_near(two[0], 37.5, 3.0, "the 30 after the 20 left (30:50 of its time)");
    assert_near(two[1], 62.5, 3.0, "the 50 after the 20 left");
}

#[test]
fn an_idle_guarantee_is_reclaimed_within_20_ms() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let sim = &sim;
    for neighbour in [30u32, 70] {
        // The 30 % tenant sleeps 2 s while the neighbour borrows the whole device, then floods.
        let tenants: Vec<Start> = vec![
            Box::new(|go: &str| tenant(client(sim, lending(30)), go, 2000, 500)),
            Box::new(move |go: &str| tenant(client(sim, lending(neighbour)), go, 0, 2600)),
        ];
        let (start, floods) = together(sim, tenants);
        let (back, borrower) = (&floods[0], &floods[1]);
        let borrowed = 100.0 * borrower.share_between(start + 200 * MS, start + 1900 * MS);
        // Its first bucket is the first 10 ms of its flood, the first two the first 20 ms.
        let first_20ms: u64 = back.busy.iter().take(2).sum();
        let rate = first_20ms as f64 / 20_000.0 * 100.0;
        let settled = 100.0 * back.share_between(back.t0 + 100 * MS, back.t0 + 450 * MS);
        eprintln!(
            "neighbour at {neighbour}: it borrowed {borrowed:.1}% while the 30 idled; the 30 then got {rate:.1}% over its first 20 ms, {settled:.1}% after"
        );
        assert!(borrowed >= 95.0, "a neighbour at {neighbour} alone with work borrowed only {borrowed:.1}%");
        assert!(rate >= 0.9 * 30.0, "the 30 % tenant got {rate:.1}% over its first 20 ms next to a borrower at {neighbour} (want ≥ 27)");
        let want = 100.0 * 30.0 / f64::from(30 + neighbour);
        assert_near(settled, want, 3.0, "the 30 after reclaiming");
    }
}

/// The same reclaim by a process whose kernels the shim has never measured (the GPU check G6
/// starts it cold): each of its first launches is charged `cost::UNKNOWN_NS` (1 ms) until a
/// sample arrives, and its slice must not end on those charges after a few 200 µs kernels.
#[test]
fn a_cold_process_reclaims_its_guarantee_within_20_ms() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let sim = &sim;
    let cold = |c: Client<'_>, go: &str| c.args(&format!("init ctx 0 sync waitfile {go} sleep 2000 flood {KERNEL_NS} {BUCKET_MS} +500")).spawn();
    let tenants: Vec<Start> =
        vec![Box::new(move |go: &str| cold(client(sim, lending(30)), go)), Box::new(|go: &str| tenant(client(sim, lending(70)), go, 0, 2600))];
    let (_, floods) = together(sim, tenants);
    let first_20ms: u64 = floods[0].busy.iter().take(2).sum();
    let rate = first_20ms as f64 / 20_000.0 * 100.0;
    eprintln!("a cold 30 back beside a borrower at 70: {rate:.1}% over its first 20 ms");
    assert!(rate >= 0.9 * 30.0, "the cold 30 % tenant got {rate:.1}% over its first 20 ms (want ≥ 27)");
}

/// A latency probe at guarantee 30 next to a neighbour that floods: `max` is the neighbour's
/// cap (`none`: it borrows what the probe leaves).
fn probe_next_to(sim: &Sim, max: &'static str) -> Probe {
    let clock = sim.clock();
    clock.park();
    let go = sim.path_str("go");
    let stop = sim.path_str("stop");
    let _ = std::fs::remove_file(&go);
    let _ = std::fs::remove_file(&stop);
    let n = client(sim, capped(70, max)).args(&format!("init ctx 0 launch 1 {KERNEL_NS} sync waitfile {go} flood {KERNEL_NS} {BUCKET_MS} {stop}")).spawn();
    let p = client(sim, lending(30)).args(&format!("init ctx 0 launch 1 1000 sync waitfile {go} sleep 300 probe 200 1000000 5000 touch {stop}")).spawn();
    clock.start_together_refs(&go, &[&n, &p], "sync");
    clock.park();
    let out = p.wait();
    out.assert_all_ok();
    let _ = n.wait();
    Probe::parse(out.last("probe"))
}

#[test]
fn lending_does_not_hurt_the_lenders_latency() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let next_to_capped = probe_next_to(&sim, "70");
    let next_to_borrower = probe_next_to(&sim, "none");
    eprintln!("probe at 30: next to a neighbour capped at 70: {next_to_capped}; next to a borrower: {next_to_borrower}");
    assert!(
        next_to_borrower.p99_us as f64 <= 1.15 * next_to_capped.p99_us as f64,
        "p99 next to a borrower {} µs, next to a neighbour capped at 70 {} µs (want ≤ 1.15×)",
        next_to_borrower.p99_us,
        next_to_capped.p99_us
    );
}

#[test]
fn config_file_and_live_set_through_the_controller() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let ctl = sim.controller_with_config("[groups.g]\nsm_share = 30\nsm_max = \"none\"\n");
    let clock = sim.clock();
    clock.park();
    let go = sim.path_str("go");
    let t = tenant(sim.client(Route::Procaddr).shim().controller(&ctl).group("g"), &go, 0, 2000);
    let start = clock.start_together(&go, std::slice::from_ref(&t), "sync");
    // 500 ms alone at guarantee 30 without a cap, then capped at 50 live.
    clock.sleep_ns(500 * MS);
    let l = ctl.ls();
    let row = &l.group("g").unwrap_or_else(|| panic!("no group g in:\n{l}"))["devices"][0];
    assert_eq!((row["share"].as_u64(), row["cap"].as_u64()), (Some(30), Some(100)), "the config's guarantee and cap:\n{l}");
    let said = ctl.set_ok("--group g --sm 30 --sm-max 50");
    let set_at = clock.now_ns();
    assert!(said.contains("g"), "{said}");
    clock.park();
    let out = t.wait();
    out.assert_all_ok();
    let f = Flood::parse(out.last("flood"));
    let before = 100.0 * f.share_between(start + 100 * MS, set_at);
    let first = 100.0 * f.share_between(set_at + 100 * MS, set_at + 200 * MS);
    let after = 100.0 * f.share_between(set_at + 100 * MS, start + 1900 * MS);
    eprintln!("group g: {before:.1}% at 30 without a cap; capped at 50 live: {first:.1}% from 100 to 200 ms after, {after:.1}% to the end");
    assert!(before >= 95.0, "alone at guarantee 30 without a cap: {before:.1}%");
    assert_near(first, 50.0, 5.0, "100–200 ms after `set --sm-max 50`");
    assert_near(after, 50.0, 3.0, "after `set --sm-max 50`");
    let l = ctl.ls();
    let row = &l.group("g").unwrap()["devices"][0];
    assert_eq!((row["share"].as_u64(), row["cap"].as_u64()), (Some(30), Some(50)), "the cap set live:\n{l}");
}

#[test]
fn a_low_priority_process_borrows_only_what_nobody_else_wants() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let sim = &sim;
    // Both 30 without a cap, both saturating: the low one keeps its guarantee and no more.
    let tenants: Vec<Start> = vec![
        Box::new(|go: &str| tenant(client(sim, lending(30)).env("GPUSLICE_PRIORITY", "low"), go, 0, 1500)),
        Box::new(|go: &str| tenant(client(sim, lending(30)), go, 0, 1500)),
    ];
    let (start, floods) = together(sim, tenants);
    let got: Vec<f64> = floods.iter().map(|f| 100.0 * f.share_between(start + 300 * MS, start + 1400 * MS)).collect();
    eprintln!("low 30 + normal 30, both without a cap: {got:.1?}");
    assert_near(got[0], 30.0, 3.0, "the low one");
    assert_near(got[1], 70.0, 3.0, "the normal one");
    // Alone, the low one borrows the whole device.
    let alone = {
        let t: Vec<Start> = vec![Box::new(|go: &str| tenant(client(sim, lending(30)).env("GPUSLICE_PRIORITY", "low"), go, 0, 1000))];
        let (start, floods) = together(sim, t);
        100.0 * floods[0].share_between(start + 100 * MS, start + 900 * MS)
    };
    assert!(alone >= 95.0, "low priority alone, no cap: {alone:.1}%");
}

#[test]
fn with_a_controller_tenants_of_different_groups_lend_to_each_other() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    let ctl = sim.controller();
    let clock = sim.clock();
    clock.park();
    let go = sim.path_str("go");
    // Each its own group (pid-N) from its environment; the turn is in the ledger's device slot.
    let tenants: Vec<Running> = [30, 70].iter().map(|&g| tenant(client(&sim, lending(g)).controller(&ctl), &go, 0, 1500)).collect();
    let start = clock.start_together(&go, &tenants, "sync");
    clock.sleep_ns(1000 * MS);
    // Time stands still while `ls` asks: the achieved shares are those of the last second.
    let l = ctl.ls();
    clock.park();
    let floods: Vec<Flood> = tenants
        .into_iter()
        .map(|t| {
            let out = t.wait();
            out.assert_all_ok();
            Flood::parse(out.last("flood"))
        })
        .collect();
    let got: Vec<f64> = floods.iter().map(|f| 100.0 * f.share_between(start + 300 * MS, start + 1400 * MS)).collect();
    eprintln!("with a controller, 30 + 70: {got:.1?}\n{l}");
    assert_near(got[0], 30.0, 3.0, "the 30");
    assert_near(got[1], 70.0, 3.0, "the 70");
    let rows: Vec<&serde_json::Value> = l.json["groups"].as_array().unwrap().iter().map(|g| &g["devices"][0]).collect();
    assert_eq!(rows.len(), 2, "{l}");
    for row in rows {
        assert_eq!(row["cap"].as_u64(), Some(100), "every group's cap is none (100) in `ls --json`:\n{l}");
    }
}

#[test]
fn cuda_graphs_lend_and_are_capped_like_kernels() {
    let _serial = serial();
    let sim = Sim::new().with_clock();
    // 10 kernels of 200 µs per graph = 2 ms per launch; 100 launches = 200 ms of device time.
    let percent = |slice: Slice| {
        let out = client(&sim, slice).args("init ctx 0 graph 10 200000 100").run();
        out.assert_all_ok();
        let ms: f64 = out.get("graph", "ms").unwrap().parse().unwrap();
        200.0 / ms * 100.0
    };
    let lender = percent(lending(30));
    let capped50 = percent(capped(30, "50"));
    eprintln!("graph launches alone: 30 no cap {lender:.1}%, 30 cap 50 {capped50:.1}%");
    assert!(lender >= 95.0, "graph launches at 30 without a cap, alone: {lender:.1}%");
    // The first launch is measured before it is charged in full (as in sm_share.rs's graph test).
    assert_near(capped50, 50.0, 3.0, "graph launches at 30, cap 50, alone");
}
