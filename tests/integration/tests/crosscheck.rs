//! The controller's cross-check ("trust the measurement, not the tenant"): a process whose own
//! report is below what the driver's NVML shows it holding is charged NVML's figure, flagged in
//! `ls`, `ls --json` and the metrics, and its group is refused beyond its limit. The lie is the
//! shim's test knob `GPUSLICE_TEST_UNDERREPORT_BYTES` (the first N bytes it allocates are left
//! out of its report, as a tenant writing its slot could do).

use gpuslice_integration::*;
use std::time::Duration;

const R: u64 = 64 * MIB;

#[test]
fn an_underreporting_process_is_charged_nvmls_figure_and_refused_beyond_its_limit() {
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", R);
    let ctl = sim.controller();
    ctl.set_ok(&format!("--create --group liars --memory {}", GIB));
    ctl.set_ok(&format!("--create --group honest --memory {}", GIB));
    let (go, agreed) = (sim.path_str("go"), sim.path_str("agreed"));
    let liar = sim
        .client(Route::Dlsym)
        .shim()
        .controller(&ctl)
        .group("liars")
        .env("GPUSLICE_TEST_UNDERREPORT_BYTES", "512MiB")
        .args(&format!("init ctx 0 alloc 800M nvmlprocs 0 waitfile {go} alloc 300M alloc 100M freeall waitfile {agreed}"))
        .spawn();
    let honest = sim.client(Route::Procaddr).shim().controller(&ctl).group("honest").args(&format!("init ctx 0 alloc 600M waitfile {go} alloc 300M")).spawn();
    expect_ok(&liar.wait_line("nvmlprocs", 0));
    expect_ok(&honest.wait_line("alloc", 0));
    let pid = liar.pid();

    let flagged = |l: &Listing| l.json["underreporting"].as_array().is_some_and(|a| !a.is_empty());
    let (l, _) = ctl.ls_until("the cross-check flags the liar", Duration::from_secs(20), flagged);
    let rows = l.json["underreporting"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "only the liar: {l}");
    let row = &rows[0];
    assert_eq!(row["pid"], pid, "{l}");
    assert_eq!(row["group"], "liars", "{l}");
    // It reports its context and 288 of its 800 MiB; the device says 800 MiB and the context.
    assert_eq!(row["reported"].as_u64(), Some(R + 288 * MIB), "{l}");
    assert_eq!(row["measured"].as_u64(), Some(R + 800 * MIB), "{l}");
    assert_eq!(row["charged"].as_u64(), Some(512 * MIB), "{l}");
    assert_eq!(l.process_used(pid, 0), R + 288 * MIB, "the process's own report stays as it is: {l}");
    assert_eq!(l.group_used("liars", 0), R + 800 * MIB, "the group is charged the driver's figure: {l}");
    assert_eq!(l.group_used("honest", 0), R + 600 * MIB, "{l}");

    let table = ctl.cli("ls").run();
    assert!(table.success(), "{table}");
    let text = table.lines.join("\n");
    assert!(text.contains("UNDER-REPORTING"), "{text}");
    assert!(table.lines.iter().any(|line| line.trim_start().starts_with(&pid.to_string()) && line.contains("+512.0 MiB")), "{text}");
    assert!(ctl.log().contains(&format!("pid {pid} (group \"liars\") reports")), "{}", ctl.log());

    touch(&go);
    expect_ok(&liar.wait_line("freeall", 0));
    // It freed everything: its report (clamped at zero) and the driver (its context) agree
    // again within the tolerance, and the extra charge is lifted while it runs.
    let (l, _) = ctl.ls_until("the charge is lifted", Duration::from_secs(20), |l| !flagged(l));
    assert_eq!(l.group_used("liars", 0), l.process_used(pid, 0), "{l}");
    assert!(ctl.log().contains(&format!("pid {pid}: its report on device 0 agrees with the driver again")), "{}", ctl.log());
    touch(&agreed);
    let out = liar.wait();
    // 300 MiB more would pass on the report (352 + 300 MiB); on the driver's figure it is
    // 864 + 300 MiB > 1 GiB: refused, while 100 MiB still fits.
    let i = out.lines.iter().position(|l| l.starts_with("ok waitfile")).expect("waitfile") + 1;
    out.expect_err(i, 2);
    out.expect_ok(i + 1);
    assert!(out.stderr.contains("of which 512.0 MiB the controller charged"), "the refusal says why:\n{}", out.stderr);
    let honest = honest.wait();
    honest.assert_all_ok();
    // Both gone: the extra charge goes with the process.
    let (l, _) = ctl.ls_until("the processes are released", Duration::from_secs(10), |l| l.processes().is_empty());
    assert!(!flagged(&l), "{l}");
    assert_eq!(l.group_used("liars", 0), 0, "{l}");
}
