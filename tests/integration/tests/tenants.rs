//! Many throttled processes on one device (issue 14).

use gpuslice_integration::*;

fn run_n(sim: &Sim, n_procs: u64, secs: f64) -> Vec<f64> {
    let ns = 200_000u64;
    let share = 96 / n_procs;
    let go = sim.path("go").display().to_string();
    let _ = std::fs::remove_file(&go);
    let warm = 2;
    let n = ((secs * 1e9) as u64 * share / 100) / ns;
    let clients: Vec<_> = (0..n_procs)
        .map(|_| {
            let script = format!("init ctx 0 launch {warm} {ns} sync waitfile {go} mark launch {n} {ns} sync elapsed");
            sim.client(Route::Procaddr).shim().env("GPUSLICE_SM_SHARE", share).args(&script).spawn()
        })
        .collect();
    for c in &clients {
        assert!(line_ok(&c.wait_line("ctx", 0)));
    }
    touch(&go);
    clients
        .into_iter()
        .map(|c| {
            let out = c.wait();
            out.assert_all_ok();
            let wall_ms: f64 = out.get("elapsed", "ms").unwrap().parse().unwrap();
            (n * ns) as f64 / 1e6 / wall_ms * 100.0
        })
        .collect()
}

#[test]
fn repro() {
    let sim = Sim::new();
    for n in [4u64, 8, 16] {
        let got = run_n(&sim, n, 2.0);
        eprintln!("{n} × {}%: {got:.2?}", 96 / n);
    }
}
