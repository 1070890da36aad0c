//! Turns between throttled processes attached to a controller are taken in the ledger's device
//! slot (`DeviceSched::turn`), not on a per-user /dev/shm page: processes in different pods
//! (their own /dev/shm, maybe their own uid) still take turns. Checked by mapping the ledger and
//! watching the turn pass between the two processes while they keep their shares (on the
//! simulated clock: the watcher samples every 100 µs of virtual time, and the shares are of it).

use gpuslice_common::ledger::{Ledger, ProcessRecord, LIVE, RECORD_OFFSET};
use gpuslice_integration::*;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::Duration;

/// What a watcher of the turn saw.
#[derive(Debug, Default)]
struct Watched {
    /// Distinct non-zero holder tokens.
    tokens: Vec<u64>,
    /// Times the holder changed from one process's token to another's (through a free turn or not).
    handovers: u32,
    samples: u32,
    held: u32,
}

#[test]
fn throttled_processes_of_a_controller_take_turns_in_the_ledger() {
    let sim = Sim::new().with_clock();
    let ctl = sim.controller();
    let clock = sim.clock();
    clock.park();
    let uuid = sim.device_uuid(0);
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let page = format!("/dev/shm/gpuslice-board7-{uid}-{uuid}");
    let _ = std::fs::remove_file(&page);
    let go = sim.path("go").display().to_string();

    // Kernels of 200 µs; each process runs 1.2 s at its share from one virtual instant, so that
    // they overlap for all of it (as sm_share.rs's two processes).
    let ns = 200_000u64;
    let warm = 4_000_000 / ns + 2;
    let spawn = |share: u64| {
        let n = (1_200_000_000 * share / 100) / ns;
        let script = format!("init ctx 0 launch {warm} {ns} sync waitfile {go} mark launch {n} {ns} sync elapsed");
        (share, n, sim.client(Route::Procaddr).shim().controller(&ctl).env("GPUSLICE_SM_SHARE", share).args(&script).spawn())
    };
    let clients = [spawn(30), spawn(60)];
    for (_, _, c) in &clients {
        assert!(line_ok(&c.wait_line("sync", 0)), "context made and warmed up");
    }

    let path = ctl.ledger();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let ledger = Ledger::map_fd(file.as_fd(), &path.display().to_string()).unwrap_or_else(|e| panic!("map {}: {e}", path.display()));
    // Slots live in each group's memory (ledger::regions): found as a restarted controller finds them.
    ledger.reclaim();
    let slot = (0..gpuslice_common::ledger::MAX_DEVICES)
        .map(|i| ledger.device(i))
        .find(|d| d.state.load(SeqCst) == LIVE && d.uuid() == uuid)
        .unwrap_or_else(|| panic!("no device slot for {uuid} in the ledger"));
    let turn = &slot.sched.turn;
    // Each registered process wrote the token it takes turns under into its slot.
    let mut registered: Vec<u64> = ledger.processes().filter(|(_, p)| p.state.load(SeqCst) == LIVE).map(|(_, p)| p.token.load(SeqCst)).collect();
    registered.sort_unstable();
    assert!(registered.len() == 2 && registered.iter().all(|&t| t != 0), "two registered processes with their tokens: {registered:?}");
    // Branch turntoken: the token in each slot is the one the controller gave it and recorded
    // in the ledger file (the one it frees a gone process's turn by), not one the shim drew.
    for (i, p) in ledger.processes().filter(|(_, p)| p.state.load(SeqCst) == LIVE) {
        // The record lies in the file's own page under the slot, which the slot's memory hides.
        let slot_at = p as *const _ as usize - ledger.header() as *const _ as usize;
        let at = slot_at + RECORD_OFFSET + std::mem::offset_of!(ProcessRecord, token);
        let mut word = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut word, at as u64).expect("read the controller's record");
        assert_eq!(u64::from_ne_bytes(word), p.token.load(SeqCst), "slot {i} takes turns under the controller's token");
    }

    // Watch the turn while both run (sampling every 100 µs of virtual time), then collect
    // their figures. The watcher takes part in the clock before the clients start.
    let done = AtomicBool::new(false);
    let (watching, watching_rx) = std::sync::mpsc::channel();
    let (watched, outs) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let watch_clock = sim.clock();
            watching.send(()).unwrap();
            let mut w = Watched::default();
            let mut last = 0u64;
            while !done.load(SeqCst) {
                let holder = turn.holder.load(SeqCst);
                w.samples += 1;
                if holder != 0 {
                    w.held += 1;
                    if !w.tokens.contains(&holder) {
                        w.tokens.push(holder);
                    }
                    if last != 0 && last != holder {
                        w.handovers += 1;
                    }
                    last = holder;
                }
                watch_clock.sleep_ns(100_000);
            }
            w
        });
        watching_rx.recv().unwrap();
        let procs: Vec<&Running> = clients.iter().map(|(_, _, c)| c).collect();
        clock.start_together_refs(&go, &procs, "sync");
        clock.park();
        let outs = clients.map(|(share, n, c)| (share, n, c.wait()));
        done.store(true, SeqCst);
        (watcher.join().unwrap(), outs)
    });

    eprintln!("turn watched: {watched:?}");
    let mut seen = watched.tokens.clone();
    seen.sort_unstable();
    assert_eq!(seen, registered, "the turn was held by both processes, each under its registered token: {watched:?}");
    assert!(watched.handovers >= 20, "the turn passed between the two processes many times: {watched:?}");
    assert!(!std::path::Path::new(&page).exists(), "with a controller no board page is made ({page})");
    assert_eq!(turn.holder_pid.load(SeqCst), 0, "with a controller no pid is kept for the turn");
    // Whoever held the turn last has exited: it let go, or the controller freed its turn.
    let start = std::time::Instant::now();
    while turn.holder.load(SeqCst) != 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "the turn of an exited process is freed: {:#x}", turn.holder.load(SeqCst));
        std::thread::sleep(Duration::from_millis(10));
    }

    for (share, n, out) in outs {
        out.assert_all_ok();
        let wall_ms: f64 = out.get("elapsed", "ms").expect("elapsed line").parse().unwrap();
        let achieved = (n * ns) as f64 / 1e6 / wall_ms * 100.0;
        eprintln!("share {share}%: achieved {achieved:.1}%");
        assert!((achieved - share as f64).abs() <= 3.0, "share {share}% taking turns through the ledger: achieved {achieved:.1}% (allowed ±3)");
    }
}
