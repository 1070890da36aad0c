//! PTX slicing wired into the shim (issue 19 part 2), on the simulated driver: what a
//! low-priority process loads is sliced (the driver is handed the rewritten PTX, cached on disk;
//! a kernel that cannot be sliced is named in the log and left byte for byte); a sliced kernel's
//! launches carry the slice parameter, whole when no high-priority process lives and in slices
//! that cover every block exactly once when one does; and on the simulated clock a high-priority
//! request next to a neighbour of 2 ms kernels waits for about one slice instead of one kernel,
//! and a neighbour of short blocks (on a device that runs them a wave at a time, with a launch
//! latency) keeps its rate: its slices grow to about 100 µs.
//!
//! The simulated driver (`SIMCUDA_RECORD`) writes every PTX image it is handed and one line per
//! launch (kernel, grid, slice parameter, place on the device timeline); a launch with the slice
//! parameter runs its share of the kernel's duration, and one whose slice lies outside its
//! original grid fails.

use gpuslice_integration::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Two kernels whose first parameter is the simulated duration: `busy` reads the grid (sliced),
/// `gridwide` reads `%gridid` (refused).
const BUSY_PTX: &str = include_str!("slicing/busy.ptx");
/// The refused kernel as it is in the input, which the loaded image must contain unchanged.
const GRIDWIDE: &str = ".visible .entry gridwide(";

/// One at a time: the latency test starts several processes on the simulated clock.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A machine on the simulated clock and the test's part in it (parked: time runs), for this
/// test alone (`serial`).
fn machine() -> (std::sync::MutexGuard<'static, ()>, Sim, Clock) {
    let serial = serial();
    let sim = Sim::new().with_clock();
    let clock = sim.clock();
    clock.park();
    (serial, sim, clock)
}

/// A fresh directory in the machine's.
fn fresh_dir(sim: &Sim, what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = sim.path(&format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A client under the shim at `priority`, recording into `record`, with its PTX cache in `cache`.
fn client<'a>(sim: &'a Sim, priority: &str, record: &Path, cache: &Path) -> Client<'a> {
    sim.client(Route::Procaddr)
        .shim()
        .env("GPUSLICE_PRIORITY", priority)
        .env("GPUSLICE_LOG", "info")
        .env("SIMCUDA_RECORD", record.display())
        .env("GPUSLICE_PTX_CACHE", cache.display())
}

/// The PTX images process `pid` handed the driver, in order.
fn images(record: &Path, pid: u64) -> Vec<String> {
    let mut found: Vec<(u64, String)> = std::fs::read_dir(record)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let n = name.strip_prefix(&format!("{pid}-module-"))?.strip_suffix(".ptx")?.parse().ok()?;
            Some((n, std::fs::read_to_string(record.join(&name)).ok()?))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, text)| text).collect()
}

/// One recorded launch.
#[derive(Debug, Clone)]
struct Launch {
    name: String,
    grid: [u32; 3],
    slice: Option<[u32; 6]>,
    start: u64,
    end: u64,
}

fn launches(record: &Path, pid: u64) -> Vec<Launch> {
    let text = std::fs::read_to_string(record.join(format!("{pid}-launches.log"))).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("launch "))
        .map(|l| {
            let words = |k: &str| {
                let value = l.split_whitespace().find_map(|t| t.strip_prefix(k).and_then(|r| r.strip_prefix('=')));
                value.unwrap_or_else(|| panic!("no {k}= in `{l}`")).to_string()
            };
            let nums = |s: String| s.split(',').map(|v| v.parse::<u32>().unwrap()).collect::<Vec<_>>();
            let g = nums(words("grid"));
            let slice = words("slice");
            Launch {
                name: words("fn"),
                grid: [g[0], g[1], g[2]],
                slice: (slice != "-").then(|| nums(slice).try_into().unwrap()),
                start: words("start").parse().unwrap(),
                end: words("end").parse().unwrap(),
            }
        })
        .collect()
}

/// Groups a kernel's recorded slices into the program's launches (each ends when its original
/// grid is covered) and checks that each covered every block exactly once, in order; returns
/// the number of slices of each launch.
fn covered_once(slices: &[Launch]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut count = 0;
    for s in slices {
        let p = s.slice.unwrap_or_else(|| panic!("a launch of a sliced kernel without its slice parameter: {s:?}"));
        let original = [p[3], p[4], p[5]];
        for z in 0..s.grid[2] {
            for y in 0..s.grid[1] {
                for x in 0..s.grid[0] {
                    let block = (p[0] + x, p[1] + y, p[2] + z);
                    assert!(block.0 < original[0] && block.1 < original[1] && block.2 < original[2], "block {block:?} outside {original:?}: {s:?}");
                    assert!(seen.insert(block), "block {block:?} ran twice: {s:?}");
                }
            }
        }
        count += 1;
        if seen.len() as u64 == original.iter().map(|&v| u64::from(v)).product::<u64>() {
            out.push(count);
            seen.clear();
            count = 0;
        }
    }
    assert!(seen.is_empty(), "the last launch did not cover its grid: {} blocks in {count} slices", seen.len());
    out
}

// ------------------------------------------------------------------ 1. loads

#[test]
fn a_low_priority_process_loads_the_sliced_ptx_once_transformed_then_from_the_cache() {
    let sim = Sim::new();
    let ptx = sim.write_file("busy.ptx", BUSY_PTX);
    let (record, cache) = (fresh_dir(&sim, "record"), fresh_dir(&sim, "cache"));
    let load = |priority: &str, how: &str, extra: &[(&str, &str)]| {
        let mut c = client(&sim, priority, &record, &cache);
        for (k, v) in extra {
            c = c.env(k, v);
        }
        let out = c.args(&format!("init ctx 0 usefunc {how} {} busy pid", ptx.display())).run();
        out.assert_all_ok();
        let pid = out.u64("pid", "pid");
        let images = images(&record, pid);
        assert_eq!(images.len(), 1, "one image per load: {out}");
        (out, images.into_iter().next().unwrap())
    };

    let (out, image) = load("low", "data", &[]);
    assert!(image.contains("__gpuslice_slice") && image != BUSY_PTX, "the driver got the original PTX from a low-priority process:\n{image}");
    let gridwide = &BUSY_PTX[BUSY_PTX.find(GRIDWIDE).unwrap()..];
    assert!(image.contains(gridwide), "the refused kernel was changed:\n{image}");
    assert_eq!(image.matches("__gpuslice_slice[24]").count(), 1, "exactly one kernel gets the slice parameter:\n{image}");
    assert_eq!(out.stderr_lines_with(&["1 of 2 kernels sliced", "transformed"]).len(), 1, "{out}");
    assert_eq!(out.stderr_lines_with(&["kernel gridwide runs as it is", "%gridid"]).len(), 1, "the log names the refused kernel and why: {out}");
    let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".slice")).collect();
    assert_eq!(entries.len(), 1, "one cache entry");

    // The second load of the same PTX comes from the cache, and the driver gets the same text.
    let (out, again) = load("low", "data", &[]);
    assert_eq!(out.stderr_lines_with(&["1 of 2 kernels sliced", "from the cache"]).len(), 1, "{out}");
    assert_eq!(again, image);
    // The file form too.
    let (_, from_file) = load("low", "file", &[]);
    assert_eq!(from_file, image, "cuModuleLoad of a .ptx file is sliced the same way");

    // Normal priority, or slicing off: the driver gets the program's bytes.
    let (out, normal) = load("normal", "data", &[]);
    assert_eq!(normal, BUSY_PTX, "a normal-priority process's PTX was changed");
    assert!(out.stderr_lines_with(&["kernels sliced"]).is_empty(), "{out}");
    let (_, off) = load("low", "data", &[("GPUSLICE_SLICE", "off")]);
    assert_eq!(off, BUSY_PTX, "GPUSLICE_SLICE=off still sliced");
    let (_, file_off) = load("normal", "file", &[]);
    assert_eq!(file_off, BUSY_PTX);
    // `all`: best-effort work at normal priority is sliced too.
    let (_, all) = load("normal", "data", &[("GPUSLICE_SLICE", "all")]);
    assert_eq!(all, image);
}

/// A fat binary as nvcc lays it out (see gpuslice_ptx::fatbin): one uncompressed PTX entry for
/// sm_90 holding `ptx`, NUL-terminated.
fn fatbin_of(ptx: &str) -> Vec<u8> {
    let mut payload = ptx.as_bytes().to_vec();
    payload.push(0);
    let mut entry = vec![0u8; 64];
    entry[0..2].copy_from_slice(&1u16.to_le_bytes()); // PTX
    entry[4..8].copy_from_slice(&64u32.to_le_bytes()); // header size
    entry[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    entry[28..32].copy_from_slice(&90u32.to_le_bytes()); // sm_90
    entry.extend_from_slice(&payload);
    let mut image = Vec::new();
    image.extend_from_slice(&0xBA55_ED50u32.to_le_bytes());
    image.extend_from_slice(&1u16.to_le_bytes());
    image.extend_from_slice(&16u16.to_le_bytes());
    image.extend_from_slice(&(entry.len() as u64).to_le_bytes());
    image.extend_from_slice(&entry);
    image
}

#[test]
fn the_ptx_of_a_fat_binary_is_sliced_and_loaded_as_text() {
    let sim = Sim::new();
    let fatbin = sim.path("busy.fatbin");
    std::fs::write(&fatbin, fatbin_of(BUSY_PTX)).unwrap();
    let (record, cache) = (fresh_dir(&sim, "record"), fresh_dir(&sim, "cache"));
    for how in ["fatbin", "data"] {
        let out = client(&sim, "low", &record, &cache).args(&format!("init ctx 0 usefunc {how} {} busy launch 2 100000 sync pid", fatbin.display())).run();
        out.assert_all_ok();
        let pid = out.u64("pid", "pid");
        let images = images(&record, pid);
        assert_eq!(images.len(), 1, "{how}: the driver should get the sliced PTX as text: {out}");
        assert!(images[0].contains("__gpuslice_slice[24]"), "{how}: {}", images[0]);
        let ran = launches(&record, pid);
        assert_eq!(covered_once(&ran), vec![1, 1], "{how}: two whole launches with the slice parameter: {ran:?}");
    }
    // At normal priority the fat binary goes to the driver as it is (not PTX text: nothing recorded).
    let out = client(&sim, "normal", &record, &cache).args(&format!("init ctx 0 usefunc fatbin {} busy pid", fatbin.display())).run();
    out.assert_all_ok();
    assert!(images(&record, out.u64("pid", "pid")).is_empty());
}

// ------------------------------------------------------------------ 2. launches

#[test]
fn sliced_launches_cover_every_block_once_and_go_whole_without_a_high_priority_process() {
    let sim = Sim::new();
    let ptx = sim.write_file("busy.ptx", BUSY_PTX);
    let (record, cache) = (fresh_dir(&sim, "record"), fresh_dir(&sim, "cache"));
    let script = format!("init ctx 0 usefunc data {} busy grid 1000 3 2 launch 3 2000000 sync grid 7 1 1 launchpacked 2 100000 sync pid", ptx.display());

    // Alone: whole launches, each with the slice parameter (offset 0, the grid itself).
    let out = client(&sim, "low", &record, &cache).args(&script).run();
    out.assert_all_ok();
    let alone = launches(&record, out.u64("pid", "pid"));
    assert_eq!(alone.len(), 5, "{alone:?}");
    assert_eq!(covered_once(&alone), vec![1; 5], "alone, every launch goes whole: {alone:?}");
    assert_eq!(alone[0].slice, Some([0, 0, 0, 1000, 3, 2]));
    assert_eq!(alone[4].slice, Some([0, 0, 0, 7, 1, 1]), "the packed route carries the slice parameter too");
    assert!(alone.iter().all(|l| l.name == "busy"));

    // Beside an (idle) high-priority process: slices, every block exactly once.
    let stop = sim.path_str("stop-high");
    let high = client(&sim, "high", &record, &cache).args(&format!("init ctx 0 launch 1 1000 sync waitfile {stop}")).spawn();
    assert!(line_ok(&high.wait_line("sync", 0)));
    let out = client(&sim, "low", &record, &cache).args(&script).run();
    touch(&stop);
    high.wait().assert_all_ok();
    out.assert_all_ok();
    let sliced = launches(&record, out.u64("pid", "pid"));
    let per_launch = covered_once(&sliced);
    eprintln!("slices per launch beside a high-priority process: {per_launch:?}");
    assert_eq!(per_launch.len(), 5);
    assert!(per_launch[..3].iter().all(|&n| n > 1), "6000-block launches were not sliced: {per_launch:?}");
    assert_eq!(&per_launch[3..], &[1, 1], "a 7-block grid is less than one wave: one slice");
    // Each 6000-block launch of 2 ms ran as slices of at most the target (100 µs) on the device,
    // or one block per SM (132 blocks = 44 µs) before the first measurement.
    for s in &sliced[..sliced.len() - 2] {
        assert!(s.end - s.start <= 110_000, "a slice of {} µs: {s:?}", (s.end - s.start) / 1000);
    }
    // Together they took what the whole kernel takes.
    let total: u64 = sliced[..sliced.len() - 2].iter().map(|s| s.end - s.start).sum();
    assert!((5_990_000..=6_010_000).contains(&total), "3 × 2 ms of kernels ran {total} ns in slices");
}

/// `GPUSLICE_PRIORITY_GATE=spatial-off` (experimental, issue 19): beside a high-priority
/// process, a low one whose share MPS carries (`SIMCUDA_MPS=1`, `GPUSLICE_SM_SHARE`) launches
/// as if no high-priority process lived, so its kernels go whole, not in slices; with the
/// default gate the same process slices.
#[test]
fn spatial_off_over_an_mps_share_launches_whole_beside_a_high_priority_process() {
    let sim = Sim::new();
    let ptx = sim.write_file("busy.ptx", BUSY_PTX);
    let (record, cache) = (fresh_dir(&sim, "record"), fresh_dir(&sim, "cache"));
    let script = format!("init ctx 0 usefunc data {} busy grid 1000 3 2 launch 3 2000000 sync pid", ptx.display());
    let stop = sim.path_str("stop-high");
    let high = client(&sim, "high", &record, &cache).env("SIMCUDA_MPS", 1).args(&format!("init ctx 0 launch 1 1000 sync waitfile {stop}")).spawn();
    assert!(line_ok(&high.wait_line("sync", 0)));
    let mut per_gate = Vec::new();
    for gate in ["on", "spatial-off"] {
        let out =
            client(&sim, "low", &record, &cache).env("SIMCUDA_MPS", 1).env("GPUSLICE_SM_SHARE", 80).env("GPUSLICE_PRIORITY_GATE", gate).args(&script).run();
        out.assert_all_ok();
        assert_eq!(out.stderr_lines_with(&["served by MPS", "spatial"]).len(), 1, "{gate}: the device is spatial:\n{out}");
        per_gate.push(covered_once(&launches(&record, out.u64("pid", "pid"))));
    }
    touch(&stop);
    high.wait().assert_all_ok();
    eprintln!("slices per launch beside a high-priority process over a spatial MPS share: gate on {:?}, spatial-off {:?}", per_gate[0], per_gate[1]);
    assert!(per_gate[0].len() == 3 && per_gate[0].iter().all(|&n| n > 1), "with the gate on, the launches go in slices: {:?}", per_gate[0]);
    assert_eq!(per_gate[1], vec![1; 3], "spatial-off: every launch goes whole");
}

// ------------------------------------------------------------------ 3. latency, simulated clock

const PROBE_NS: u64 = 200_000;
const NEIGHBOUR_NS: u64 = 2_000_000;
/// 40 waves of the simulated device's 132 SMs: slices of 100 µs are about 264 blocks.
const NEIGHBOUR_GRID: u32 = 132 * 40;
const REQUESTS: u64 = 40;
/// The probe starts this long after the neighbour (ms): the neighbour's first launches measure
/// its kernel (one wave per slice until then).
const SETTLE_MS: u64 = 50;
const GAP_US: u64 = 20_000;

/// The neighbour of a contest: its environment, whether it launches the PTX kernel (else the
/// simulated driver's plain one), its kernels' length and grid (x), and the simulated device's
/// model for both processes (`SIMCUDA_BLOCKS_PER_SM`, `SIMCUDA_LAUNCH_NS`; none: every block
/// costs the same share of a kernel and a launch starts at once); `mix`: kernels of these
/// lengths in turn (ns, comma-separated) with this many µs of the program's own time before
/// each launch, instead of `kernel_ns` (cuclient's `floodmix`).
struct Neighbour<'e> {
    env: &'e [(&'e str, &'e str)],
    ptx: bool,
    kernel_ns: u64,
    grid: u32,
    device: &'e [(&'e str, &'e str)],
    mix: Option<(&'e str, u64)>,
}

/// The probe at high priority next to a low neighbour flooding its kernels; returns the probe,
/// the neighbour's device time while the probe ran over the time the probe left it, and the
/// neighbour's launches as the device ran them.
fn contest(sim: &Sim, clock: &Clock, neighbour: Neighbour<'_>) -> (Probe, f64, Vec<Launch>) {
    let c = contest_with(sim, clock, neighbour, &[], &format!("probe {REQUESTS} {PROBE_NS} {GAP_US}"));
    (c.probe, c.share, c.ran)
}

/// What `contest_with` saw.
struct Contest {
    probe: Probe,
    /// The neighbour's device time while the probe ran, over the time the probe left it.
    share: f64,
    /// The neighbour's launches, and the probe's, as the device ran them.
    ran: Vec<Launch>,
    probe_ran: Vec<Launch>,
    /// The probe's log.
    log: String,
    /// The neighbour's log.
    neighbour_log: String,
}

/// `contest` with the probe's environment (besides its priority) and requests given (cuclient
/// commands whose last prints the probe line).
fn contest_with(sim: &Sim, clock: &Clock, neighbour: Neighbour<'_>, probe_env: &[(&str, &str)], requests: &str) -> Contest {
    static N: AtomicU32 = AtomicU32::new(0);
    let ptx = sim.write_file("busy.ptx", BUSY_PTX);
    let (record, cache) = (fresh_dir(sim, "record"), fresh_dir(sim, "cache"));
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (go, stop) = (sim.path_str(&format!("go-{n}")), sim.path_str(&format!("stop-{n}")));
    let function = if neighbour.ptx { format!("usefunc data {} busy", ptx.display()) } else { String::new() };
    fn on<'a>(mut c: Client<'a>, env: &[(&str, &str)]) -> Client<'a> {
        for (k, v) in env {
            c = c.env(k, v);
        }
        c
    }
    let on_device = |c| on(c, neighbour.device);
    let c = on(on_device(client(sim, "low", &record, &cache)), neighbour.env);
    let (kernel_ns, grid) = (neighbour.kernel_ns, neighbour.grid);
    let flood = match neighbour.mix {
        None => format!("flood {kernel_ns} 10 {stop}"),
        Some((lengths, host_us)) => format!("floodmix {lengths} {host_us} 10 {stop}"),
    };
    let flooding = c.args(&format!("init ctx 0 pid {function} grid {grid} 1 1 launch 1 1000 sync waitfile {go} {flood}")).spawn();
    let probe = on(on_device(client(sim, "high", &record, &cache)), probe_env)
        .args(&format!("init ctx 0 pid launch 1 1000 sync waitfile {go} sleep {SETTLE_MS} {requests} touch {stop}"))
        .spawn();
    clock.start_together_refs(&go, &[&flooding, &probe], "sync");
    clock.park();
    let out = probe.wait();
    out.assert_all_ok();
    let n = flooding.wait();
    n.assert_all_ok();
    let p = Probe::parse(out.last("probe"));
    let ran = launches(&record, n.u64("pid", "pid"));
    let busy: u64 = ran.iter().map(|l| l.end.min(p.t1).saturating_sub(l.start.max(p.t0))).sum();
    let left = (p.t1 - p.t0) - p.n * PROBE_NS;
    let probe_ran = launches(&record, out.u64("pid", "pid"));
    Contest { probe: p, share: busy as f64 / left as f64, ran, probe_ran, log: out.stderr, neighbour_log: n.stderr }
}

#[test]
fn a_high_priority_request_waits_for_one_slice_not_one_kernel() {
    let (_serial, sim, clock) = machine();

    let (whole, whole_share, _) = contest(
        &sim,
        &clock,
        Neighbour { env: &[("GPUSLICE_SLICE", "off")], ptx: true, kernel_ns: NEIGHBOUR_NS, grid: NEIGHBOUR_GRID, device: &[], mix: None },
    );
    eprintln!("neighbour unsliced: probe {whole}; neighbour {:.1}% of the time left", 100.0 * whole_share);
    let (sliced, sliced_share, ran) =
        contest(&sim, &clock, Neighbour { env: &[], ptx: true, kernel_ns: NEIGHBOUR_NS, grid: NEIGHBOUR_GRID, device: &[], mix: None });
    eprintln!("neighbour sliced: probe {sliced}; neighbour {:.1}% of the time left", 100.0 * sliced_share);
    let longest = ran.iter().filter(|l| l.slice.is_some_and(|s| s[3] != l.grid[0])).map(|l| l.end - l.start).max().unwrap_or(0);
    eprintln!("longest slice {} µs, {} launches recorded", longest / 1000, ran.len());

    // Unsliced, a request waits for up to one 2 ms neighbour kernel.
    assert!(whole.dev_p99_us >= (PROBE_NS + NEIGHBOUR_NS / 2) / 1000, "unsliced, the probe should wait behind a 2 ms kernel: {whole}");
    // Sliced, for at most one slice (≤ 100 µs, 110 with rounding to whole rows of blocks) and
    // the neighbour's watcher noticing the end (polls of 20 µs).
    assert!(longest > 0 && longest <= 110_000, "the longest slice took {} µs", longest / 1000);
    let bound = (PROBE_NS + 110_000 + 40_000) / 1000;
    assert!(sliced.dev_p99_us <= bound, "sliced, p99 on the device {} µs over {bound} µs: {sliced}", sliced.dev_p99_us);
    assert!(sliced.dev_p99_us * 4 < whole.dev_p99_us, "slicing did not shorten the wait: {sliced} against {whole}");
    // And the neighbour keeps the device busy while the probe leaves it idle.
    assert!(sliced_share >= 0.8, "the sliced neighbour got {:.1}% of the time the probe left", 100.0 * sliced_share);
}

/// A kernel of short blocks, as tests/gpu/ptxslice_probe.sh's neighbour: 16 blocks of 128
/// threads per SM (a wave of 2112 blocks on the 132 SMs) running 4 µs each, 250 waves: 1 ms.
const WAVE_BLOCKS: u32 = 132 * 16;
const WAVE_NS: u64 = 4_000;
const SHORT_BLOCKS_WAVES: u32 = 250;
/// From a launch to its kernel's start on an idle device: a real launch's latency, which a
/// slice's two timing events take in with the slice.
const LAUNCH_NS: u64 = 5_000;

#[test]
fn a_sliced_neighbour_of_short_blocks_keeps_its_rate() {
    // On the H100 (stop 17) a low-priority neighbour whose 3.3 ms kernels are made of 4 µs blocks
    // kept 6.9 % of its rate beside a probe busy 10 % of the time, sliced, against 86.6 %
    // unsliced: its slices were one block per SM (132 blocks, a sixteenth of a wave, 4 µs),
    // each measured at under 10 µs with the launch latency and so never counted, so they
    // never grew; each went out after the one before had finished.
    let (_serial, sim, clock) = machine();
    let (per_sm, latency) = ((WAVE_BLOCKS / 132).to_string(), LAUNCH_NS.to_string());
    let device = [("SIMCUDA_BLOCKS_PER_SM", per_sm.as_str()), ("SIMCUDA_LAUNCH_NS", latency.as_str())];
    let kernel_ns = WAVE_NS * u64::from(SHORT_BLOCKS_WAVES);
    let grid = WAVE_BLOCKS * SHORT_BLOCKS_WAVES;
    let (probe, busy, ran) = contest(&sim, &clock, Neighbour { env: &[], ptx: true, kernel_ns, grid, device: &device, mix: None });
    let blocks = |l: &Launch| l.grid.iter().map(|&g| u64::from(g)).product::<u64>();
    // The device is busy for a whole wave whatever part of it a slice fills: what counts is the
    // work done, each block at the pace of the whole kernel, in the time the probe left.
    let work: f64 = ran
        .iter()
        .map(|l| {
            let inside = l.end.min(probe.t1).saturating_sub(l.start.max(probe.t0)) as f64 / (l.end - l.start).max(1) as f64;
            inside * blocks(l) as f64 * kernel_ns as f64 / f64::from(grid)
        })
        .sum();
    let share = work / ((probe.t1 - probe.t0) - probe.n * PROBE_NS) as f64;
    let sizes: Vec<u64> = ran.iter().filter(|l| l.start >= probe.t0 && l.end <= probe.t1).map(blocks).collect();
    let mut sorted = sizes.clone();
    sorted.sort_unstable();
    let median_blocks = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let longest = ran.iter().filter(|l| l.slice.is_some_and(|s| s[3] != l.grid[0])).map(|l| l.end - l.start).max().unwrap_or(0);
    eprintln!(
        "1 ms neighbour of 4 µs blocks, sliced: probe {probe}; neighbour's work {:.1}% of the time left (device busy {:.1}%); {} slices while the probe ran, median {median_blocks} blocks ({:.1} waves), longest {} µs",
        100.0 * share,
        100.0 * busy,
        sizes.len(),
        median_blocks as f64 / f64::from(WAVE_BLOCKS),
        longest / 1000
    );
    // The neighbour keeps the device busy while the probe leaves it idle: slices of about the
    // target, each costing one launch latency, not slices of one wave or less.
    assert!(
        share >= 0.8,
        "the sliced neighbour's work filled {:.1}% of the time the probe left (slices of {median_blocks} blocks at the median)",
        100.0 * share
    );
    assert!(median_blocks >= 10 * u64::from(WAVE_BLOCKS), "slices of {median_blocks} blocks at the median: far below 100 µs");
    // And the probe keeps its protection: it waits for at most one slice (≤ 100 µs and the
    // rounding), the neighbour's watcher noticing the end (polls of 20 µs) and a launch latency.
    assert!(longest > 0 && longest <= 110_000, "the longest slice took {} µs", longest / 1000);
    let bound = (PROBE_NS + 110_000 + 40_000 + LAUNCH_NS) / 1000;
    assert!(probe.dev_p99_us <= bound, "p99 on the device {} µs over {bound} µs: {probe}", probe.dev_p99_us);
}

// ------------------------------------------------------------------ 4. the duration budget

/// Short kernels of a neighbour that cannot be sliced.
const SHORT_NS: u64 = 20_000;
const BUDGET_US: u64 = 100;

#[test]
fn a_duration_budget_keeps_short_kernels_flowing_and_a_long_one_alone() {
    let (_serial, sim, clock) = machine();
    let budget = BUDGET_US.to_string();
    let with_budget = [("GPUSLICE_PRIORITY_BUDGET_US", budget.as_str())];

    // 20 µs kernels: one in flight (the default queue) against 100 µs of them.
    let (queue1, queue1_share, _) =
        contest(&sim, &clock, Neighbour { env: &[], ptx: false, kernel_ns: SHORT_NS, grid: NEIGHBOUR_GRID, device: &[], mix: None });
    eprintln!("20 µs neighbour, queue 1: probe {queue1}; neighbour {:.1}% of the time left", 100.0 * queue1_share);
    let (budgeted, budgeted_share, _) =
        contest(&sim, &clock, Neighbour { env: &with_budget, ptx: false, kernel_ns: SHORT_NS, grid: NEIGHBOUR_GRID, device: &[], mix: None });
    eprintln!("20 µs neighbour, budget {BUDGET_US} µs: probe {budgeted}; neighbour {:.1}% of the time left", 100.0 * budgeted_share);
    // 2 ms kernels under the same budget: longer than it, each goes alone.
    let (long, long_share, _) =
        contest(&sim, &clock, Neighbour { env: &with_budget, ptx: false, kernel_ns: NEIGHBOUR_NS, grid: NEIGHBOUR_GRID, device: &[], mix: None });
    eprintln!("2 ms neighbour, budget {BUDGET_US} µs: probe {long}; neighbour {:.1}% of the time left", 100.0 * long_share);

    // A request waits for at most the budget's worth of short kernels and one more (whose
    // launch the budget let through just before it), and the watcher's polls.
    let bound = (PROBE_NS + BUDGET_US * 1000 + SHORT_NS + 40_000) / 1000;
    assert!(budgeted.dev_p99_us <= bound, "with a budget, p99 on the device {} µs over {bound} µs: {budgeted}", budgeted.dev_p99_us);
    // The budget lets several short kernels be in flight once their time is measured (an
    // unmeasured shape goes alone): a request's median wait is several of them, not one. (On
    // the simulated device the next kernel starts the instant it is launched, so one in flight
    // already keeps it busy; on a GPU the budget buys back the gap between kernels that one in
    // flight leaves: the next session measures it.)
    assert!(
        budgeted.dev_p50_us >= queue1.dev_p50_us + 3 * SHORT_NS / 1000,
        "with a budget of {BUDGET_US} µs more than one 20 µs kernel should be in flight: median {} µs against {} µs with one",
        budgeted.dev_p50_us,
        queue1.dev_p50_us
    );
    assert!(budgeted_share >= 0.95 && queue1_share >= 0.95, "the neighbour should keep the device busy: {budgeted_share:.3} / {queue1_share:.3}");
    // A kernel longer than the budget is never queued behind another: one kernel at most.
    let one_kernel = (PROBE_NS + NEIGHBOUR_NS + 40_000) / 1000;
    assert!(long.dev_p99_us <= one_kernel, "a 2 ms neighbour under a budget: p99 on the device {} µs over {one_kernel} µs: {long}", long.dev_p99_us);
}

/// A training step's shape: a long kernel (a GEMM) and short ones (norms, pointwise work) in
/// turn, with the framework's own time before each launch and a launch latency on the device.
const MIX_LONG_NS: u64 = 500_000;
const MIX_SHORT_NS: u64 = 20_000;
const MIX_HOST_US: u64 = 15;
const MIX_BUDGET_US: u64 = 200;

#[test]
fn under_a_budget_the_next_kernel_is_queued_before_a_long_one_ends() {
    let (_serial, sim, clock) = machine();
    let budget = MIX_BUDGET_US.to_string();
    let with_budget = [("GPUSLICE_PRIORITY_BUDGET_US", budget.as_str())];
    let launch_ns = LAUNCH_NS.to_string();
    let latency = [("SIMCUDA_LAUNCH_NS", launch_ns.as_str())];
    let lengths = format!("{MIX_LONG_NS},{MIX_SHORT_NS},{MIX_SHORT_NS},{MIX_SHORT_NS}");
    let mix = Some((lengths.as_str(), MIX_HOST_US));

    let (queue1, queue1_share, queue1_ran) =
        contest(&sim, &clock, Neighbour { env: &[], ptx: false, kernel_ns: 0, grid: NEIGHBOUR_GRID, device: &latency, mix });
    let (budgeted, budgeted_share, budgeted_ran) =
        contest(&sim, &clock, Neighbour { env: &with_budget, ptx: false, kernel_ns: 0, grid: NEIGHBOUR_GRID, device: &latency, mix });
    // The short kernels that follow a long one: how many started the instant it ended (queued
    // before its end), of all.
    let joined = |ran: &[Launch]| {
        let after_long: Vec<_> = ran.windows(2).filter(|w| w[0].end - w[0].start >= MIX_LONG_NS && w[1].end - w[1].start < MIX_LONG_NS).collect();
        (after_long.iter().filter(|w| w[1].start == w[0].end).count(), after_long.len())
    };
    let (q_joined, q_all) = joined(&queue1_ran);
    let (b_joined, b_all) = joined(&budgeted_ran);
    eprintln!(
        "mixed neighbour, queue 1: probe {queue1}; neighbour {:.1}% of the time left; short after long queued in time {q_joined}/{q_all}",
        100.0 * queue1_share
    );
    eprintln!(
        "mixed neighbour, budget {budget} µs: probe {budgeted}; neighbour {:.1}% of the time left; short after long queued in time {b_joined}/{b_all}",
        100.0 * budgeted_share
    );

    assert!(q_all > 20 && b_all > 20, "too few long kernels ran to judge: {q_all} / {b_all}");
    // One launch in flight: each kernel after a long one waits for its end, then for the launch.
    assert_eq!(q_joined, 0, "with one launch in flight no kernel can be queued behind a running one");
    // Under the budget the short kernel goes out once 180 µs of the long one are left (by its
    // estimate), so it is queued when the long one ends: all but those a request held back.
    assert!(b_joined * 10 >= b_all * 8, "under a {budget} µs budget a short kernel should be queued before the long one ends: {b_joined}/{b_all}");
    assert!(budgeted_share > queue1_share, "queued in time, the neighbour should keep more of the device: {budgeted_share:.3} against {queue1_share:.3}");
    // And a request still waits for at most the budget's worth of work, or one long kernel.
    let bound = (PROBE_NS + MIX_LONG_NS + MIX_BUDGET_US * 1000 + 40_000) / 1000;
    assert!(budgeted.dev_p99_us <= bound, "under a budget, p99 on the device {} µs over {bound} µs: {budgeted}", budgeted.dev_p99_us);
}

/// Requests on a schedule (a camera's frames): one every `PERIOD_US`, after `KEEP_TIME_WARMUP`
/// unmeasured ones from which the probe's shim learns the period.
const PERIOD_US: u64 = 20_000;
const KEEP_TIME_WARMUP: u64 = 12;
const KEEP_TIME_BUDGET_US: u64 = 400;

/// The probe's commands for `measured` requests of `PROBE_NS` on the schedule (after the
/// unmeasured warm-up, one schedule throughout).
fn on_schedule(measured: u64) -> String {
    format!("pprobe {KEEP_TIME_WARMUP} {PROBE_NS} {PERIOD_US} pprobe {measured} {PROBE_NS} {PERIOD_US}")
}

/// The same number of requests with random pauses of about a period between them: no schedule.
fn at_random() -> String {
    format!("probe {} {PROBE_NS} {PERIOD_US}", KEEP_TIME_WARMUP + REQUESTS)
}

#[test]
fn a_request_that_keeps_time_finds_the_neighbours_long_kernels_ended() {
    let (_serial, sim, clock) = machine();
    let budget = KEEP_TIME_BUDGET_US.to_string();
    let anticipating = [("GPUSLICE_PRIORITY_BUDGET_US", budget.as_str())];
    let not_anticipating = [("GPUSLICE_PRIORITY_BUDGET_US", budget.as_str()), ("GPUSLICE_PRIORITY_ANTICIPATE", "off")];
    let launch_ns = LAUNCH_NS.to_string();
    let latency = [("SIMCUDA_LAUNCH_NS", launch_ns.as_str())];
    // 2 ms kernels nothing can slice (not PTX), longer than the budget: each goes alone.
    let neighbour = |env| Neighbour { env, ptx: false, kernel_ns: NEIGHBOUR_NS, grid: NEIGHBOUR_GRID, device: &latency, mix: None };
    let on_schedule = on_schedule(REQUESTS);
    let at_random = at_random();

    let Contest { probe: off, share: off_share, log: off_log, .. } = contest_with(&sim, &clock, neighbour(&not_anticipating), &[], &on_schedule);
    eprintln!("on a schedule, anticipation off: probe {off}; neighbour {:.1}% of the time left", 100.0 * off_share);
    let Contest { probe: on, share: on_share, log: on_log, .. } = contest_with(&sim, &clock, neighbour(&anticipating), &[], &on_schedule);
    eprintln!("on a schedule, anticipation on: probe {on}; neighbour {:.1}% of the time left", 100.0 * on_share);
    let Contest { probe: random, share: random_share, log: random_log, .. } = contest_with(&sim, &clock, neighbour(&anticipating), &[], &at_random);
    eprintln!("at random, anticipation on: probe {random}; neighbour {:.1}% of the time left", 100.0 * random_share);
    let keeping = |log: &str| log.lines().filter(|l| l.contains("requests keep time")).map(str::to_string).collect::<Vec<_>>();
    eprintln!("the probe's shim said: {:?}", keeping(&on_log));

    // The probe's shim finds the schedule (whatever the neighbour's setting: it only publishes)
    // and not in random pauses.
    assert!(keeping(&on_log).iter().any(|l| l.contains("every 20.")), "the probe's shim should find its period: {on_log}");
    assert!(!keeping(&off_log).is_empty(), "{off_log}");
    assert!(keeping(&random_log).is_empty(), "random pauses keep no time: {random_log}");
    // Not anticipated, a request waits for what is left of a 2 ms kernel (p99: most of one).
    assert!(off.dev_p99_us >= (PROBE_NS + NEIGHBOUR_NS / 2) / 1000, "without anticipation the probe should wait behind a 2 ms kernel: {off}");
    assert!(random.dev_p99_us >= (PROBE_NS + NEIGHBOUR_NS / 2) / 1000, "at random nothing is anticipated: {random}");
    // Anticipated, it finds the device idle: its own kernel, the launch and the watcher's look.
    let bound = (PROBE_NS + LAUNCH_NS + 40_000) / 1000;
    assert!(on.dev_p99_us <= bound, "anticipated, p99 on the device {} µs over {bound} µs: {on}", on.dev_p99_us);
    // The neighbour gives up at most about one kernel and the window's guard a period.
    assert!(on_share >= 0.85, "anticipating, the neighbour got {:.1}% of the time the probe left", 100.0 * on_share);
    assert!(off_share >= 0.95 && random_share >= 0.9, "{off_share:.3} / {random_share:.3}");
}

/// A training step with a pause of the program's own: ten 200 µs kernels, 15 µs of host time
/// before each and 1.5 ms more before the first (an optimizer step, Python between
/// iterations). Alone it keeps the device busy only with more than 1.5 ms queued.
const STEP_KERNELS: &str = "200000+1500,200000,200000,200000,200000,200000,200000,200000,200000,200000";

#[test]
fn a_stretched_budget_covers_the_neighbours_own_pauses_between_requests() {
    let (_serial, sim, clock) = machine();
    let budget = KEEP_TIME_BUDGET_US.to_string();
    let plain = [("GPUSLICE_PRIORITY_BUDGET_US", budget.as_str())];
    let stretching = [("GPUSLICE_PRIORITY_BUDGET_US", budget.as_str()), ("GPUSLICE_PRIORITY_STRETCH", "on")];
    let launch_ns = LAUNCH_NS.to_string();
    let latency = [("SIMCUDA_LAUNCH_NS", launch_ns.as_str())];
    let neighbour = |env| Neighbour { env, ptx: false, kernel_ns: 0, grid: NEIGHBOUR_GRID, device: &latency, mix: Some((STEP_KERNELS, MIX_HOST_US)) };
    let on_schedule = on_schedule(REQUESTS);
    let at_random = at_random();

    let base = contest_with(&sim, &clock, neighbour(&plain), &[], &on_schedule);
    eprintln!("budget {budget} µs: probe {}; neighbour {:.1}% of the time left", base.probe, 100.0 * base.share);
    let stretched = contest_with(&sim, &clock, neighbour(&stretching), &[], &on_schedule);
    eprintln!("stretched: probe {}; neighbour {:.1}% of the time left", stretched.probe, 100.0 * stretched.share);
    let random = contest_with(&sim, &clock, neighbour(&stretching), &[], &at_random);
    eprintln!("stretch on, requests at random: probe {}; neighbour {:.1}% of the time left", random.probe, 100.0 * random.share);

    // Under the plain budget the queue runs dry in each 1.5 ms pause: about a third of each
    // 3.6 ms step is idle. Stretched towards the next request, the queue covers the pauses.
    assert!(base.share <= 0.8, "under a {budget} µs budget the pauses should idle the device: {:.3}", base.share);
    assert!(
        stretched.share >= base.share + 0.15,
        "stretched, the neighbour should keep the device busy through its pauses: {:.3} against {:.3}",
        stretched.share,
        base.share
    );
    // And the requests still find the device idle: the queue ends before each is due.
    let anticipated = (PROBE_NS + LAUNCH_NS + 40_000) / 1000;
    assert!(
        stretched.probe.dev_p99_us <= anticipated,
        "stretched, p99 on the device {} µs over {anticipated} µs: {}",
        stretched.probe.dev_p99_us,
        stretched.probe
    );
    assert!(base.probe.dev_p99_us <= anticipated, "{}", base.probe);
    // Requests at random publish no window: nothing stretches, a request waits for the budget's
    // worth of work and one kernel at most, as without the switch.
    let plain_bound = (PROBE_NS + KEEP_TIME_BUDGET_US * 1000 + 200_000 + LAUNCH_NS + 40_000) / 1000;
    assert!(random.probe.dev_p99_us <= plain_bound, "at random, p99 on the device {} µs over {plain_bound} µs: {}", random.probe.dev_p99_us, random.probe);
}

#[test]
fn a_neighbour_says_what_held_its_launches() {
    // What issue 19's PyTorch runs need from the neighbour's side: of the time it lost, how
    // much went to the requests themselves, to its own budget, and to anticipation.
    let (_serial, sim, clock) = machine();
    let budget = KEEP_TIME_BUDGET_US.to_string();
    let env = [("GPUSLICE_PRIORITY_BUDGET_US", budget.as_str()), ("GPUSLICE_LOG", "info,gpuslice::policy::hold_summary=debug")];
    let launch_ns = LAUNCH_NS.to_string();
    let latency = [("SIMCUDA_LAUNCH_NS", launch_ns.as_str())];
    let neighbour = Neighbour { env: &env, ptx: false, kernel_ns: NEIGHBOUR_NS, grid: NEIGHBOUR_GRID, device: &latency, mix: None };
    // 5 s of requests on a schedule: a line comes every 2 s of the neighbour's launches, and
    // the first may begin before the flood (its first launch is before the start), so at least
    // one whole line within it.
    let on_schedule = on_schedule(250);
    let c = contest_with(&sim, &clock, neighbour, &[], &on_schedule);
    eprintln!("probe {}; neighbour {:.1}% of the time left", c.probe, 100.0 * c.share);
    // The line with the most launches: a whole one within the flood.
    let launches = |l: &str| l.split(" launches in ").next()?.rsplit(' ').next()?.parse::<u64>().ok();
    let line = c
        .neighbour_log
        .lines()
        .filter(|l| l.contains("of them held"))
        .max_by_key(|l| launches(l).unwrap_or(0))
        .unwrap_or_else(|| panic!("no hold line: {}", c.neighbour_log));
    eprintln!("{line}");
    // "... held: B ms while high-priority work ran (b ms/s), R ms for room in flight (r ms/s),
    // D ms before requests due (d ms/s)"
    let per_s: Vec<f64> = line.split(" ms/s)").filter_map(|part| part.rsplit('(').next()?.trim().parse().ok()).collect();
    let [busy, room, due] = per_s[..] else { panic!("three figures in {line}") };
    // Each request holds the neighbour for about its own length (200 µs of every 20 ms: 10 ms/s)
    // and the watcher's notice of its end.
    assert!((8.0..=15.0).contains(&busy), "held {busy} ms/s behind requests: {line}");
    // Anticipation holds a 2 ms kernel that would run into the next request: some of each period.
    assert!(due > 1.0, "held {due} ms/s before requests due: {line}");
    // One launching thread cannot wait more than the time that passed.
    assert!(busy + room + due <= 1010.0, "{line}");
    assert!(c.share >= 0.85, "the neighbour got {:.1}% of the time the probe left", 100.0 * c.share);
}

/// The time-sliced GPU's switch from the neighbour's context to the probe's, as measured on the
/// H100 (`tests/gpu/preswitch.sh`): a kernel waits this long when another process's ran last.
const SWITCH_NS: u64 = 130_000;

#[test]
fn a_request_that_keeps_time_finds_the_gpu_switched_to_its_context() {
    let (_serial, sim, clock) = machine();
    let budget = KEEP_TIME_BUDGET_US.to_string();
    let anticipating = [("GPUSLICE_PRIORITY_BUDGET_US", budget.as_str())];
    let (launch_ns, switch_ns) = (LAUNCH_NS.to_string(), SWITCH_NS.to_string());
    let device = [("SIMCUDA_LAUNCH_NS", launch_ns.as_str()), ("SIMCUDA_SWITCH_NS", switch_ns.as_str())];
    let neighbour = Neighbour { env: &anticipating, ptx: false, kernel_ns: NEIGHBOUR_NS, grid: NEIGHBOUR_GRID, device: &device, mix: None };
    let on_schedule = on_schedule(REQUESTS);

    let staying = contest_with(&sim, &clock, neighbour, &[("GPUSLICE_PRIORITY_SWITCH_AHEAD", "off")], &on_schedule);
    eprintln!("anticipated, not switching ahead: probe {}; neighbour {:.1}% of the time left", staying.probe, 100.0 * staying.share);
    let neighbour = Neighbour { env: &anticipating, ptx: false, kernel_ns: NEIGHBOUR_NS, grid: NEIGHBOUR_GRID, device: &device, mix: None };
    let ahead = contest_with(&sim, &clock, neighbour, &[], &on_schedule);
    eprintln!("anticipated, switching ahead: probe {}; neighbour {:.1}% of the time left", ahead.probe, 100.0 * ahead.share);
    let empty = |c: &Contest| c.probe_ran.iter().filter(|l| l.name == "gpuslice_switch_ahead").map(|l| l.start).collect::<Vec<_>>();
    let (staying_empty, ahead_empty) = (empty(&staying), empty(&ahead));
    eprintln!("empty kernels launched: {} not switching ahead, {} switching ahead", staying_empty.len(), ahead_empty.len());

    // Anticipation alone finds the device idle, but the probe's kernels wait for the switch to
    // its context, since the neighbour's ran last.
    assert!(staying_empty.is_empty(), "switched ahead though told not to");
    assert!(staying.probe.dev_p50_us >= (PROBE_NS + SWITCH_NS) / 1000, "not switching ahead, a request should pay the switch: {}", staying.probe);
    // Switching ahead, the empty kernel pays it before the request: the probe's own kernel, the
    // launch and the watcher's look, as on a GPU without switches.
    let bound = (PROBE_NS + LAUNCH_NS + 40_000) / 1000;
    assert!(ahead.probe.dev_p99_us <= bound, "switching ahead, p99 on the device {} µs over {bound} µs: {}", ahead.probe.dev_p99_us, ahead.probe);
    // One empty kernel per request once the period is known, each before its request.
    let requests = KEEP_TIME_WARMUP + REQUESTS;
    let known = ahead_empty.len() as u64;
    assert!(known + 12 >= requests && known <= requests, "{known} empty kernels for {requests} requests");
    assert!(ahead.log.contains("an empty kernel takes the GPU's switch"), "the probe's shim should say it switches ahead: {}", ahead.log);
    // The neighbour gives up the lead (0.15 ms of each 20 ms period) and about one kernel.
    assert!(ahead.share >= 0.85, "switching ahead, the neighbour got {:.1}% of the time the probe left", 100.0 * ahead.share);
}

#[test]
fn switching_ahead_follows_the_program_into_a_new_context() {
    let (_serial, sim, _clock) = machine();
    let (record, cache) = (fresh_dir(&sim, "record"), fresh_dir(&sim, "cache"));
    let requests = format!("pprobe 16 {PROBE_NS} {PERIOD_US}");
    // Requests that keep time in a created context, which the program then destroys and makes
    // again (the same handle may come back), and its primary context after that.
    let out = client(&sim, "high", &record, &cache)
        .args(&format!("init ctxcreate 0 pid launch 1 1000 sync {requests} ctxdestroy ctxcreate 0 {requests} ctxdestroy ctx 0 {requests} ctxrelease 0"))
        .run();
    out.assert_all_ok();
    let pid = out.u64("pid", "pid");
    let made = images(&record, pid).iter().filter(|text| text.contains("gpuslice_switch_ahead")).count();
    let launched = launches(&record, pid).iter().filter(|l| l.name == "gpuslice_switch_ahead").count();
    eprintln!("empty kernels: made {made} times, launched {launched} times for 48 requests");
    // Once per context it ran in, each made again after its context ended: never launched
    // into a context that was gone (the simulated driver refuses, and the count would fall).
    assert_eq!(made, 3, "one empty kernel per context: {}", out.stderr);
    // The first context learns the period (9 requests); the next ones go on with it.
    assert!(launched >= 48 - 16, "{launched} empty kernels for 48 requests: {}", out.stderr);
    assert!(!out.stderr.contains("cannot switch ahead") && !out.stderr.contains("switch-ahead launch failed"), "{}", out.stderr);
}
