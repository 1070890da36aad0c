//! Issue 19's managed spatial mode with one MPS control daemon per GPU: `gpuslice serve --mps`
//! runs a daemon for each GPU (here a fake `nvidia-cuda-mps-control`, a shell script keeping a
//! journal in its pipe directory and making the `control` file a real daemon makes), decides
//! per GPU between MPS and time-slicing, publishes the decision in the MPS table beside its
//! socket, and the shim sends a process on a spatial GPU to that GPU's daemon before `cuInit`.
//!
//! The simulated driver plays MPS with `SIMCUDA_MPS=pipe` (the device says MPS serves it when
//! `CUDA_MPS_PIPE_DIRECTORY` names a folder with `control`) and `SIMCUDA_MPS_INIT_ERROR` (cuInit
//! fails while a pipe directory is named); the simulated NVML lists the GPUs.

use gpuslice_integration::*;
use std::path::PathBuf;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// The fake control program, and `serve`'s arguments for it (pipe root `<dir>/mps`, the
/// default beside the socket; logs under `<dir>/mps-log`) followed by `more`.
fn mps_args(sim: &Sim, more: &[String]) -> Vec<String> {
    let control = sim.write_file("nvidia-cuda-mps-control", FAKE_MPS_CONTROL);
    std::fs::set_permissions(&control, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut args = vec!["--mps-control".to_string(), control.display().to_string(), "--mps-log-dir".into(), sim.path_str("mps-log")];
    args.extend(more.iter().cloned());
    args
}

fn start<'a>(sim: &'a Sim, args: &[String]) -> Controller<'a> {
    sim.controller_with_args(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn pipe(sim: &Sim, uuid: &str) -> PathBuf {
    sim.path("mps").join(uuid)
}

/// The controller's MPS table: (uuid, mode, pipe directory, uids) per line.
fn table(ctl: &Controller<'_>) -> Vec<(String, String, String, String)> {
    let path = PathBuf::from(format!("{}.mps", ctl.socket().display()));
    file_lines(&path)
        .iter()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let w: Vec<&str> = l.splitn(5, ' ').collect();
            (w[0].to_string(), w[1].to_string(), w[2].to_string(), w[3].to_string())
        })
        .collect()
}

fn mode_of(ctl: &Controller<'_>, uuid: &str) -> Option<String> {
    table(ctl).into_iter().find(|(u, ..)| u == uuid).map(|(_, m, ..)| m)
}

fn wait_mode(ctl: &Controller<'_>, uuid: &str, want: &str) {
    assert!(poll_until(WAIT, || mode_of(ctl, uuid).as_deref() == Some(want)), "{uuid} is not {want} in the table: {:?}\n{}", table(ctl), ctl.log());
}

/// The GPU's row of `gpuslice ls --json` (`mps`): its mode, reason and daemon.
fn row(ctl: &Controller<'_>, uuid: &str) -> serde_json::Value {
    let l = ctl.ls();
    l.json["mps"].as_array().into_iter().flatten().find(|r| r["uuid"] == uuid).cloned().unwrap_or_else(|| panic!("no mps row for {uuid} in:\n{l}"))
}

/// Waits until the GPU's row says `mode` for `reason`, and returns it.
fn wait_row(ctl: &Controller<'_>, uuid: &str, mode: &str, reason: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = poll_until(WAIT, || {
        last = row(ctl, uuid);
        last["mode"] == mode && last["reason"] == reason
    });
    assert!(ok, "{uuid} is not {mode} ({reason}) in ls --json: {last}\n{}", ctl.log());
    last
}

/// The line of `gpuslice ls` (its MPS table) that starts with the GPU's UUID.
fn ls_line(ctl: &Controller<'_>, uuid: &str) -> String {
    let out = ctl.cli("ls").run();
    assert!(out.success(), "{out}");
    out.lines.iter().find(|l| l.starts_with(uuid)).cloned().unwrap_or_else(|| panic!("no line for {uuid} in ls:\n{out}"))
}

/// The metric lines of a scrape that start with `name{uuid="<uuid>"`.
fn metric(port: u16, name: &str, uuid: &str) -> Vec<String> {
    let (_, _, body) = http_get(port, "/metrics");
    let prefix = format!("{name}{{uuid=\"{uuid}\"");
    body.lines().filter(|l| l.starts_with(&prefix)).map(str::to_string).collect()
}

/// What a shimmed process of `ctl` sees after `cuInit`: its CUDA_MPS_PIPE_DIRECTORY and
/// CUDA_MPS_CLIENT_PRIORITY, and the run.
fn pointed(sim: &Sim, ctl: &Controller<'_>, env: &[(&str, &str)]) -> (String, String, Output) {
    let mut client = sim.client(Route::Procaddr).shim().controller(ctl).env("GPUSLICE_LOG", "info");
    for (k, v) in env {
        client = client.env(k, v);
    }
    let out = client.args("init ctx 0 getenv CUDA_MPS_PIPE_DIRECTORY getenv CUDA_MPS_CLIENT_PRIORITY").run();
    out.assert_all_ok();
    let pipe = out.get("getenv", "value").unwrap().to_string();
    let priority = out.nth("getenv", 1).split("value=").nth(1).unwrap().to_string();
    (pipe, priority, out)
}

#[test]
fn serve_runs_a_daemon_per_gpu_restarts_it_and_quits_them_on_stop() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 2);
    let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
    let port = free_port();
    let mut ctl = start(&sim, &mps_args(&sim, &["--mps".into(), "on".into(), "--metrics".into(), format!("127.0.0.1:{port}")]));
    let (s0, s1) = (pipe(&sim, &u0).join("starts"), pipe(&sim, &u1).join("starts"));
    assert!(poll_until(WAIT, || file_lines(&s0).len() == 1 && file_lines(&s1).len() == 1), "no daemon per GPU:\n{}", ctl.log());
    // Each sees its own GPU, with its own pipe and log directories.
    for (starts, uuid) in [(&s0, &u0), (&s1, &u1)] {
        let w: Vec<String> = file_lines(starts)[0].split(' ').map(str::to_string).collect();
        assert_eq!(w[1], *uuid, "CUDA_VISIBLE_DEVICES of {uuid}'s daemon");
        assert_eq!(w[2], sim.path("mps-log").join(uuid).display().to_string());
    }
    wait_mode(&ctl, &u0, "spatial");
    wait_mode(&ctl, &u1, "spatial");
    assert_eq!(table(&ctl)[0].2, pipe(&sim, &u0).display().to_string(), "the table gives the pipe directory");
    // Readable by every tenant, writable by the controller's user alone.
    let meta = std::fs::metadata(format!("{}.mps", ctl.socket().display())).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o644);
    let first: i32 = file_lines(&s0)[0].split(' ').next().unwrap().parse().unwrap();

    // The operator sees the same in `ls` (and its JSON), and in the metrics.
    let r = wait_row(&ctl, &u0, "spatial", "on");
    assert_eq!((r["policy"].as_str(), r["why"].as_str(), r["pipe"].as_str()), (Some("on"), Some("mps on"), Some(table(&ctl)[0].2.as_str())), "{r}");
    assert_eq!(r["daemon"], serde_json::json!({"up": true, "pid": first, "restarts": 0, "adopted": false}), "{r}");
    let line = ls_line(&ctl, &u0);
    assert!(line.contains(" spatial ") && line.contains(&format!("up, pid {first}")) && line.ends_with("mps on"), "{line}");
    assert_eq!(metric(port, "gpuslice_gpu_mps_spatial", &u0), vec![format!("gpuslice_gpu_mps_spatial{{uuid=\"{u0}\"}} 1")]);
    assert_eq!(
        metric(port, "gpuslice_gpu_mps_mode", &u0),
        vec![format!("gpuslice_gpu_mps_mode{{uuid=\"{u0}\",mode=\"spatial\",policy=\"on\",reason=\"on\"}} 1")]
    );
    assert_eq!(metric(port, "gpuslice_gpu_mps_daemon_restarts_total", &u0), vec![format!("gpuslice_gpu_mps_daemon_restarts_total{{uuid=\"{u0}\"}} 0")]);

    // GPU 0's daemon fails and cannot start for a while: the table says time-sliced meanwhile,
    // GPU 1 is untouched; then it starts again.
    std::fs::write(format!("{}.fail", pipe(&sim, &u0).display()), b"").unwrap();
    // SAFETY: a process this test's controller started.
    unsafe { libc::kill(first, libc::SIGKILL) };
    wait_mode(&ctl, &u0, "time-sliced");
    assert!(table(&ctl).iter().any(|(u, m, p, _)| u == &u0 && m == "time-sliced" && p == "-"), "{:?}", table(&ctl));
    assert_eq!(mode_of(&ctl, &u1).as_deref(), Some("spatial"));
    assert!(poll_until(WAIT, || ctl.log().contains("its MPS control daemon is not up")), "{}", ctl.log());
    let r = wait_row(&ctl, &u0, "time-sliced", "daemon_down");
    assert_eq!(
        (r["why"].as_str(), &r["pipe"], &r["daemon"]["up"]),
        (Some("its MPS control daemon is not up"), &serde_json::Value::Null, &serde_json::json!(false)),
        "{r}"
    );
    let line = ls_line(&ctl, &u0);
    assert!(line.contains(" time-sliced ") && line.ends_with("its MPS control daemon is not up"), "{line}");
    assert_eq!(metric(port, "gpuslice_gpu_mps_spatial", &u0), vec![format!("gpuslice_gpu_mps_spatial{{uuid=\"{u0}\"}} 0")]);
    assert_eq!(
        metric(port, "gpuslice_gpu_mps_mode", &u0),
        vec![format!("gpuslice_gpu_mps_mode{{uuid=\"{u0}\",mode=\"time-sliced\",policy=\"on\",reason=\"daemon_down\"}} 1")]
    );
    assert_eq!(metric(port, "gpuslice_gpu_mps_daemon_up", &u0), vec![format!("gpuslice_gpu_mps_daemon_up{{uuid=\"{u0}\"}} 0")]);
    assert_eq!(wait_row(&ctl, &u1, "spatial", "on")["daemon"]["restarts"], 0, "GPU 1's daemon is untouched");
    std::fs::remove_file(format!("{}.fail", pipe(&sim, &u0).display())).unwrap();
    assert!(poll_until(WAIT, || file_lines(&s0).len() == 2), "GPU 0's daemon was not restarted:\n{}", ctl.log());
    wait_mode(&ctl, &u0, "spatial");
    assert!(ctl.log().contains("MPS control daemon restarted") && ctl.log().contains(&format!("for {u0}")), "{}", ctl.log());
    let second: i32 = file_lines(&s0)[1].split(' ').next().unwrap().parse().unwrap();
    let other: i32 = file_lines(&s1)[0].split(' ').next().unwrap().parse().unwrap();
    assert_ne!(first, second);
    // Counted: every start after an exit, those that failed at once while `.fail` existed too.
    let restarts = 1 + file_lines(&pipe(&sim, &u0).join("failed")).len();
    let r = wait_row(&ctl, &u0, "spatial", "on");
    assert_eq!(r["daemon"], serde_json::json!({"up": true, "pid": second, "restarts": restarts, "adopted": false}), "{r}");
    assert!(ls_line(&ctl, &u0).contains(&format!("up, pid {second}")), "{}", ls_line(&ctl, &u0));
    assert_eq!(
        metric(port, "gpuslice_gpu_mps_daemon_restarts_total", &u0),
        vec![format!("gpuslice_gpu_mps_daemon_restarts_total{{uuid=\"{u0}\"}} {restarts}")]
    );
    assert_eq!(metric(port, "gpuslice_gpu_mps_spatial", &u0), vec![format!("gpuslice_gpu_mps_spatial{{uuid=\"{u0}\"}} 1")]);

    // The controller stops: the table goes, each daemon is asked to quit and is gone.
    // SAFETY: the controller this test started.
    unsafe { libc::kill(ctl.pid() as i32, libc::SIGTERM) };
    assert!(poll_until(WAIT, || !ctl.running()), "the controller did not stop");
    assert!(table(&ctl).is_empty(), "the table outlived the controller");
    for (uuid, pid) in [(&u0, second), (&u1, other)] {
        assert_eq!(file_lines(&pipe(&sim, uuid).join("commands")), vec!["quit".to_string()], "{}", ctl.log());
        assert_eq!(file_lines(&pipe(&sim, uuid).join("quits")), vec![pid.to_string()], "{uuid}'s daemon did not quit by itself:\n{}", ctl.log());
        assert!(poll_until(Duration::from_secs(5), || !alive(pid)), "a daemon outlived the controller");
    }
    assert_eq!(file_lines(&s0).len(), 2, "no daemon started after the stop");
}

#[test]
fn auto_makes_a_gpu_spatial_for_high_priority_work_without_shares_and_holds_a_used_gpu() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 2);
    let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
    // No high-priority group: auto keeps time-slicing; GPU 1 is off (no daemon, not in the table).
    let config =
        sim.write_file("c.toml", &format!("[controller]\nmps = \"auto\"\n[controller.mps_devices]\n\"{u1}\" = \"off\"\n[groups.batch]\npriority = \"low\"\n"));
    let port = free_port();
    let args = mps_args(&sim, &["--config".into(), config.display().to_string(), "--metrics".into(), format!("127.0.0.1:{port}")]);
    let ctl = start(&sim, &args);
    wait_mode(&ctl, &u0, "time-sliced");
    assert_eq!(table(&ctl).len(), 1, "GPU 1 is off: {:?}", table(&ctl));
    assert!(!pipe(&sim, &u1).exists(), "no daemon for GPU 1");
    assert!(ctl.log().contains("auto: no high-priority group"), "{}", ctl.log());
    let r = wait_row(&ctl, &u0, "time-sliced", "auto_no_high_priority");
    assert_eq!((r["policy"].as_str(), &r["daemon"]["up"]), (Some("auto"), &serde_json::json!(true)), "time-sliced by the rule, its daemon up: {r}");
    assert_eq!(ctl.ls().json["mps"].as_array().map(Vec::len), Some(1), "GPU 1 (off) has no row");
    assert!(ls_line(&ctl, &u0).ends_with("time-slicing keeps fault isolation"), "{}", ls_line(&ctl, &u0));

    // A process holds GPU 0 while it is time-sliced: a high-priority group set live does not
    // move the GPU until the process is gone.
    let go = sim.path("go");
    let holder = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("batch")
        .env("CUDA_VISIBLE_DEVICES", &u0)
        .args("init ctx 0 alloc 1M")
        .arg("waitfile")
        .arg(go.display())
        .spawn();
    holder.wait_line("alloc", 0);
    ctl.set_ok("--create --group web --priority high");
    assert!(poll_until(WAIT, || ctl.log().contains("held time-sliced")), "{}", ctl.log());
    assert_eq!(mode_of(&ctl, &u0).as_deref(), Some("time-sliced"));
    // The table names the uid of the processes on the GPU (MPS serves one uid at a time).
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() }.to_string();
    assert_eq!(table(&ctl).iter().find(|(u, ..)| u == &u0).map(|(.., users)| users.clone()), Some(uid.clone()), "{:?}", table(&ctl));
    let r = wait_row(&ctl, &u0, "time-sliced", "held_time_sliced");
    assert_eq!((r["users"].to_string(), r["device"].is_u64()), (format!("[{uid}]"), true), "the users and the ledger's index of the GPU: {r}");
    assert!(ls_line(&ctl, &u0).contains("held time-sliced while processes"), "{}", ls_line(&ctl, &u0));
    assert_eq!(
        metric(port, "gpuslice_gpu_mps_mode", &u0),
        vec![format!("gpuslice_gpu_mps_mode{{uuid=\"{u0}\",mode=\"time-sliced\",policy=\"auto\",reason=\"held_time_sliced\"}} 1")]
    );
    touch(&go);
    holder.wait().assert_all_ok();
    wait_mode(&ctl, &u0, "spatial");
    let r = wait_row(&ctl, &u0, "spatial", "auto_high_priority");
    assert_eq!(r["users"], serde_json::json!([]), "{r}");
    assert_eq!(metric(port, "gpuslice_gpu_mps_spatial", &u0), vec![format!("gpuslice_gpu_mps_spatial{{uuid=\"{u0}\"}} 1")]);

    // A share anywhere: auto goes back to time-slicing (the GPU is free).
    ctl.set_ok("--group batch --sm 30");
    wait_mode(&ctl, &u0, "time-sliced");
    assert!(ctl.log().contains("auto: SM shares are set"), "{}", ctl.log());
    wait_row(&ctl, &u0, "time-sliced", "auto_sm_shares");
    assert_eq!(
        metric(port, "gpuslice_gpu_mps_mode", &u0),
        vec![format!("gpuslice_gpu_mps_mode{{uuid=\"{u0}\",mode=\"time-sliced\",policy=\"auto\",reason=\"auto_sm_shares\"}} 1")]
    );
    assert_eq!(metric(port, "gpuslice_gpu_mps_spatial", &u0), vec![format!("gpuslice_gpu_mps_spatial{{uuid=\"{u0}\"}} 0")]);
}

/// The rule is per GPU: a process at high priority of its own (its group, made for it, is not
/// pinned: no replica of it can appear elsewhere) counts on its GPU only. It starts on GPU 1,
/// time-sliced then (nothing high existed), and holds GPU 1 that way while it lives; GPU 0, free,
/// says why it stays time-sliced: the high-priority work is on another GPU — in the table, `ls`,
/// its JSON, the log and the metrics.
#[test]
fn auto_judges_high_priority_work_on_the_gpu_it_runs_on() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 2).env("SIMCUDA_MPS", "pipe");
    let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
    let config = sim.write_file("c.toml", "[controller]\nmps = \"auto\"\n");
    let port = free_port();
    let ctl = start(&sim, &mps_args(&sim, &["--config".into(), config.display().to_string(), "--metrics".into(), format!("127.0.0.1:{port}")]));
    wait_row(&ctl, &u0, "time-sliced", "auto_no_high_priority");
    wait_row(&ctl, &u1, "time-sliced", "auto_no_high_priority");

    let go = sim.path("go");
    let web = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .env("CUDA_VISIBLE_DEVICES", &u1)
        .env("GPUSLICE_PRIORITY", "high")
        .args("init ctx 0 getenv CUDA_MPS_PIPE_DIRECTORY alloc 1M")
        .arg("waitfile")
        .arg(go.display())
        .spawn();
    let named = web.wait_line("getenv", 0);
    assert!(!named.contains(&pipe(&sim, &u1).display().to_string()), "GPU 1 was time-sliced when it started: {named}");
    web.wait_line("alloc", 0);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let r0 = wait_row(&ctl, &u0, "time-sliced", "auto_high_priority_elsewhere");
    let r1 = wait_row(&ctl, &u1, "time-sliced", "held_time_sliced");
    assert_eq!(r1["users"], serde_json::json!([uid]), "{r1}");
    assert_eq!((r0["users"].clone(), r0["pipe"].clone()), (serde_json::json!([]), serde_json::Value::Null), "{r0}");
    assert!(r0["why"].as_str().unwrap().starts_with("auto: the high-priority work is on other GPUs"), "{r0}");
    assert_eq!((mode_of(&ctl, &u0).as_deref(), mode_of(&ctl, &u1).as_deref()), (Some("time-sliced"), Some("time-sliced")), "{:?}", table(&ctl));
    assert!(ls_line(&ctl, &u0).ends_with("time-slicing keeps fault isolation"), "{}", ls_line(&ctl, &u0));
    assert!(ctl.log().contains(&format!("MPS: {u0} is time-sliced (auto: the high-priority work is on other GPUs")), "{}", ctl.log());
    assert_eq!(
        metric(port, "gpuslice_gpu_mps_mode", &u0),
        vec![format!("gpuslice_gpu_mps_mode{{uuid=\"{u0}\",mode=\"time-sliced\",policy=\"auto\",reason=\"auto_high_priority_elsewhere\"}} 1")]
    );

    // Gone: nothing high is left anywhere.
    touch(&go);
    web.wait().assert_all_ok();
    wait_row(&ctl, &u0, "time-sliced", "auto_no_high_priority");
    wait_row(&ctl, &u1, "time-sliced", "auto_no_high_priority");
}

/// An SM share set for GPU 0 alone keeps GPU 0 time-sliced, and GPU 1 (high-priority work may
/// start there, no share) spatial; a share for every device then makes both time-sliced.
#[test]
fn auto_keeps_time_sliced_only_the_gpu_an_sm_share_is_set_for() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 2);
    let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
    let config = sim.write_file("c.toml", "[controller]\nmps = \"auto\"\n[groups.web]\npriority = \"high\"\n");
    let port = free_port();
    let ctl = start(&sim, &mps_args(&sim, &["--config".into(), config.display().to_string(), "--metrics".into(), format!("127.0.0.1:{port}")]));
    wait_row(&ctl, &u0, "spatial", "auto_high_priority");
    // A process that ran on GPU 0 gave it a ledger index, which `set --device` names.
    sim.client(Route::Link).shim().controller(&ctl).env("CUDA_VISIBLE_DEVICES", &u0).args("init ctx 0 alloc 1M").run().assert_all_ok();
    let mut slot = None;
    assert!(
        poll_until(WAIT, || {
            slot = row(&ctl, &u0)["device"].as_u64();
            slot.is_some()
        }),
        "{}",
        ctl.log()
    );
    let slot = slot.unwrap();
    assert!(row(&ctl, &u1)["device"].is_null(), "no process claimed GPU 1");
    ctl.set_ok(&format!("--create --group batch --device {slot} --sm 30"));
    wait_row(&ctl, &u0, "time-sliced", "auto_sm_shares");
    wait_row(&ctl, &u1, "spatial", "auto_high_priority");
    assert!(ls_line(&ctl, &u0).contains("auto: SM shares are set on this GPU"), "{}", ls_line(&ctl, &u0));
    assert_eq!(
        metric(port, "gpuslice_gpu_mps_mode", &u0),
        vec![format!("gpuslice_gpu_mps_mode{{uuid=\"{u0}\",mode=\"time-sliced\",policy=\"auto\",reason=\"auto_sm_shares\"}} 1")]
    );
    assert_eq!(
        metric(port, "gpuslice_gpu_mps_mode", &u1),
        vec![format!("gpuslice_gpu_mps_mode{{uuid=\"{u1}\",mode=\"spatial\",policy=\"auto\",reason=\"auto_high_priority\"}} 1")]
    );
    assert_eq!((mode_of(&ctl, &u0).as_deref(), mode_of(&ctl, &u1).as_deref()), (Some("time-sliced"), Some("spatial")), "{:?}", table(&ctl));

    // The share for every device: GPU 1 (in no ledger slot yet) would get it too.
    ctl.set_ok("--group batch --sm 30");
    wait_row(&ctl, &u1, "time-sliced", "auto_sm_shares");
    wait_row(&ctl, &u0, "time-sliced", "auto_sm_shares");
}

#[test]
fn the_shim_sends_a_process_on_a_spatial_gpu_to_its_daemon_and_no_other() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 2).env("SIMCUDA_MPS", "pipe");
    let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
    let args = mps_args(&sim, &["--mps-device".into(), format!("{u0}=on"), "--mps-device".into(), format!("{u1}=auto")]);
    let ctl = start(&sim, &args);
    wait_mode(&ctl, &u0, "spatial");
    wait_mode(&ctl, &u1, "time-sliced");
    let want = pipe(&sim, &u0).display().to_string();

    // On GPU 0 by UUID (or a unique prefix of it, "GPU-5e1cc0da-9a3b-4c11" here): its daemon, and
    // MPS's variables from the settings.
    let (dir, priority, out) = pointed(&sim, &ctl, &[("CUDA_VISIBLE_DEVICES", &u0), ("GPUSLICE_PRIORITY", "high")]);
    assert_eq!((dir.as_str(), priority.as_str()), (want.as_str(), "0"), "{out}");
    assert_eq!(out.stderr_lines_with(&["is spatial", "over its MPS daemon"]).len(), 1, "{out}");
    assert_eq!(out.stderr_lines_with(&["served by MPS"]).len(), 1, "the device says MPS serves it:\n{out}");
    let (dir, _, out) = pointed(&sim, &ctl, &[("CUDA_VISIBLE_DEVICES", &u0[..22])]);
    assert_eq!(dir, want, "{out}");

    // On GPU 1, time-sliced: nothing named, nothing written.
    let (dir, priority, out) = pointed(&sim, &ctl, &[("CUDA_VISIBLE_DEVICES", &u1), ("GPUSLICE_PRIORITY", "high")]);
    assert_eq!((dir.as_str(), priority.as_str()), ("(unset)", "(unset)"), "{out}");

    // Both GPUs, or one by index on a node of two: time-sliced, and the log says why.
    let (dir, _, out) = pointed(&sim, &ctl, &[]);
    assert_eq!(dir, "(unset)", "{out}");
    assert_eq!(out.stderr_lines_with(&["runs time-sliced", "may use 2 GPUs"]).len(), 1, "{out}");
    let (dir, _, out) = pointed(&sim, &ctl, &[("CUDA_VISIBLE_DEVICES", "0")]);
    assert_eq!(dir, "(unset)", "{out}");
    assert_eq!(out.stderr_lines_with(&["by index", "name it by UUID"]).len(), 1, "{out}");
    let both = format!("{u0},{u1}");
    let (dir, _, out) = pointed(&sim, &ctl, &[("CUDA_VISIBLE_DEVICES", &both)]);
    assert_eq!(dir, "(unset)", "{out}");

    // The user's own pipe directory, and GPUSLICE_MPS=off, are left alone.
    let (dir, _, out) = pointed(&sim, &ctl, &[("CUDA_VISIBLE_DEVICES", &u0), ("CUDA_MPS_PIPE_DIRECTORY", "/elsewhere")]);
    assert_eq!(dir, "/elsewhere", "{out}");
    let (dir, _, out) = pointed(&sim, &ctl, &[("CUDA_VISIBLE_DEVICES", &u0), ("GPUSLICE_MPS", "off")]);
    assert_eq!(dir, "(unset)", "{out}");
}

#[test]
fn a_node_of_one_gpu_needs_no_uuid_and_a_down_daemon_gets_nobody() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 1);
    let u0 = sim.device_uuid(0);
    let ctl = start(&sim, &mps_args(&sim, &["--mps".into(), "on".into()]));
    wait_mode(&ctl, &u0, "spatial");
    let want = pipe(&sim, &u0).display().to_string();
    for env in [&[][..], &[("CUDA_VISIBLE_DEVICES", "0")][..]] {
        let (dir, _, out) = pointed(&sim, &ctl, env);
        assert_eq!(dir, want, "{out}");
    }

    // The daemon dies and cannot start again: the table says so, and nobody is sent to it,
    // though its stale control file is still there.
    std::fs::write(format!("{want}.fail"), b"").unwrap();
    let pid: i32 = file_lines(&pipe(&sim, &u0).join("starts"))[0].split(' ').next().unwrap().parse().unwrap();
    // SAFETY: a process this test's controller started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_mode(&ctl, &u0, "time-sliced");
    assert!(pipe(&sim, &u0).join("control").exists());
    let (dir, _, out) = pointed(&sim, &ctl, &[]);
    assert_eq!(dir, "(unset)", "{out}");
}

/// The shim's own guards, with a table written by hand beside a socket where no controller
/// answers (the process runs alone): a spatial line whose daemon does not listen sends nobody;
/// one that listens does, unless processes of another uid use the GPU; and a daemon that fails
/// the client at cuInit costs one retry without it.
#[test]
fn the_shim_checks_the_daemon_listens_and_survives_an_mps_error_at_cuinit() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 1).env("SIMCUDA_MPS", "pipe");
    let u0 = sim.device_uuid(0);
    let socket = sim.path("lone.sock");
    std::fs::write(&socket, b"").unwrap();
    let dir = sim.path("pipe0");
    std::fs::create_dir_all(&dir).unwrap();
    let write_table = |users: &str| {
        std::fs::write(format!("{}.mps", socket.display()), format!("# gpuslice mps table 1\n{u0} spatial {} {users} by hand\n", dir.display())).unwrap();
    };
    write_table("-");
    let run = |extra: &[(&str, &str)]| {
        let mut c = sim.client(Route::Procaddr).shim().env("GPUSLICE_SOCKET", socket.display()).env("GPUSLICE_LOG", "info");
        for (k, v) in extra {
            c = c.env(k, v);
        }
        c.args("init ctx 0 getenv CUDA_MPS_PIPE_DIRECTORY").run()
    };
    let out = run(&[]);
    out.assert_all_ok();
    assert_eq!(out.get("getenv", "value").as_deref(), Some("(unset)"), "no control file: not sent\n{out}");
    assert_eq!(out.stderr_lines_with(&["does not listen"]).len(), 1, "{out}");

    std::fs::write(dir.join("control"), b"").unwrap();
    let out = run(&[]);
    out.assert_all_ok();
    assert_eq!(out.get("getenv", "value"), Some(dir.display().to_string()), "{out}");

    // Processes of another uid use the GPU: MPS would make this one wait for them all to exit.
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    write_table(&format!("{}", uid + 4242));
    let out = run(&[]);
    out.assert_all_ok();
    assert_eq!(out.get("getenv", "value").as_deref(), Some("(unset)"), "{out}");
    assert_eq!(out.stderr_lines_with(&["one uid's clients at a time"]).len(), 1, "{out}");
    write_table(&format!("{},{uid}", uid + 4242));
    let out = run(&[]);
    assert_eq!(out.get("getenv", "value"), Some(dir.display().to_string()), "its own uid among them: sent\n{out}");
    write_table("-");

    // CUDA_ERROR_MPS_SERVER_NOT_READY at the first cuInit: the second, time-sliced, succeeds.
    let out = run(&[("SIMCUDA_MPS_INIT_ERROR", "807")]);
    out.assert_all_ok();
    assert_eq!(out.get("getenv", "value").as_deref(), Some("(unset)"), "{out}");
    assert_eq!(out.stderr_lines_with(&["MPS refused this process", "807", "time-sliced"]).len(), 1, "{out}");
    // A process that named its own daemon gets no retry: its error is its own.
    let out = run(&[("SIMCUDA_MPS_INIT_ERROR", "807"), ("CUDA_MPS_PIPE_DIRECTORY", &dir.display().to_string())]);
    assert_eq!(out.code(0), 807, "{out}");
}

/// The trap of stop 16: a controller killed with SIGKILL leaves its daemons running (children of
/// init). The next controller of the same socket adopts each one, so the GPU is spatial in its
/// first table with one daemon per GPU, and stopping it quits them.
#[test]
fn a_controller_adopts_the_daemons_a_killed_one_left_and_quits_them_on_stop() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 2);
    let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
    let mut ctl = start(&sim, &mps_args(&sim, &["--mps".into(), "on".into()]));
    wait_mode(&ctl, &u0, "spatial");
    wait_mode(&ctl, &u1, "spatial");
    let daemon_of = |uuid: &str| -> i32 { file_lines(&pipe(&sim, uuid).join("starts"))[0].split(' ').next().unwrap().parse().unwrap() };
    let (d0, d1) = (daemon_of(&u0), daemon_of(&u1));

    ctl.kill9();
    assert!(alive(d0) && alive(d1), "the daemons outlive a controller killed with SIGKILL");
    ctl.restart();
    // The first table already says spatial: no daemon exited, no back-off.
    for (uuid, pid) in [(&u0, d0), (&u1, d1)] {
        assert_eq!(mode_of(&ctl, uuid).as_deref(), Some("spatial"), "{:?}\n{}", table(&ctl), ctl.log());
        let r = row(&ctl, uuid);
        assert_eq!(r["daemon"], serde_json::json!({"up": true, "pid": pid, "restarts": 0, "adopted": true}), "{r}");
        assert!(ls_line(&ctl, uuid).contains(&format!("up, pid {pid}, adopted")), "{}", ls_line(&ctl, uuid));
        assert!(ctl.log().contains(&format!("MPS control daemon for {uuid} adopted (pid {pid}")), "{}", ctl.log());
    }
    // Exactly one daemon per GPU: none started beside the adopted one, none refused.
    std::thread::sleep(Duration::from_millis(300));
    for uuid in [&u0, &u1] {
        assert_eq!(file_lines(&pipe(&sim, uuid).join("starts")).len(), 1, "{}", ctl.log());
        assert!(file_lines(&pipe(&sim, uuid).join("refused")).is_empty(), "a second daemon was tried:\n{}", ctl.log());
        assert_eq!(file_lines(&pipe(&sim, uuid).join("commands")), vec!["get_server_list".to_string()], "asked once whether it answers");
    }
    assert!(!ctl.log().contains("starting it again"), "no daemon exited:\n{}", ctl.log());

    // Stopped: each adopted daemon is asked to quit, and none is left.
    ctl.stop();
    assert!(table(&ctl).is_empty(), "the table outlived the controller");
    for (uuid, pid) in [(&u0, d0), (&u1, d1)] {
        assert_eq!(file_lines(&pipe(&sim, uuid).join("commands")), vec!["get_server_list".to_string(), "quit".to_string()]);
        assert_eq!(file_lines(&pipe(&sim, uuid).join("quits")), vec![pid.to_string()], "{}", ctl.log());
        assert!(poll_until(Duration::from_secs(5), || !alive(pid)), "an adopted daemon outlived the controller");
        assert_eq!(file_lines(&pipe(&sim, uuid).join("starts")).len(), 1);
    }
}

/// The table a killed controller left says which mode the processes it had started under: the
/// next controller holds that mode while they use the GPU, whatever its rule says now.
#[test]
fn a_controller_holds_the_mode_a_killed_ones_processes_started_under() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 1);
    let u0 = sim.device_uuid(0);
    let mut first = start(&sim, &mps_args(&sim, &["--mps".into(), "on".into()]));
    wait_row(&first, &u0, "spatial", "on");
    let go = sim.path("go");
    let holder = sim.client(Route::Link).shim().controller(&first).args("init ctx 0 alloc 1M").arg("waitfile").arg(go.display()).spawn();
    holder.wait_line("alloc", 0);
    assert!(poll_until(WAIT, || !row(&first, &u0)["users"].as_array().unwrap().is_empty()), "{}", first.log());

    // Killed; the next one runs `auto` with no high-priority group, whose rule says time-sliced.
    first.kill9();
    let ctl = start(&sim, &mps_args(&sim, &["--mps".into(), "auto".into()]));
    let r = row(&ctl, &u0);
    assert_eq!(
        (r["mode"].as_str(), r["reason"].as_str(), r["daemon"]["adopted"].as_bool()),
        (Some("spatial"), Some("held_spatial"), Some(true)),
        "{r}\n{}",
        ctl.log()
    );
    assert!(ctl.log().contains(&format!("the table an earlier controller left says {u0} was spatial")), "{}", ctl.log());
    touch(&go);
    holder.wait().assert_all_ok();
    wait_row(&ctl, &u0, "time-sliced", "auto_no_high_priority");
}

/// A control daemon in a GPU's pipe directory that sees another GPU is not adopted: it is asked
/// to quit and the GPU gets its own; a pid file naming a process that is not a control daemon
/// (a reused pid) leaves that process alone.
#[test]
fn a_daemon_of_another_gpu_is_replaced_and_a_reused_pid_left_alone() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 2);
    let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
    let args = mps_args(&sim, &["--mps-device".into(), format!("{u0}=on"), "--mps-device".into(), format!("{u1}=on")]);
    let control = sim.path("nvidia-cuda-mps-control");
    let (p0, p1) = (pipe(&sim, &u0), pipe(&sim, &u1));
    std::fs::create_dir_all(&p0).unwrap();
    std::fs::create_dir_all(&p1).unwrap();
    // GPU 0's directory: a daemon that sees GPU 1.
    let mut wrong = std::process::Command::new(&control)
        .arg("-f")
        .env("CUDA_MPS_PIPE_DIRECTORY", &p0)
        .env("CUDA_VISIBLE_DEVICES", &u1)
        .env("CUDA_MPS_LOG_DIRECTORY", sim.path("mps-log"))
        .spawn()
        .unwrap();
    assert!(poll_until(WAIT, || p0.join("control").exists()), "the stray daemon did not start");
    // GPU 1's directory: a stale pid file naming this test process.
    std::fs::write(p1.join("nvidia-cuda-mps-control.pid"), format!("{}\n", std::process::id())).unwrap();

    let ctl = start(&sim, &args);
    wait_mode(&ctl, &u0, "spatial");
    wait_mode(&ctl, &u1, "spatial");
    assert_eq!(file_lines(&p0.join("quits")), vec![wrong.id().to_string()], "the stray daemon was asked to quit:\n{}", ctl.log());
    assert!(wrong.wait().unwrap().success());
    assert!(ctl.log().contains(&format!("sees CUDA_VISIBLE_DEVICES={u1}, not {u0}")), "{}", ctl.log());
    let r = row(&ctl, &u0);
    assert_eq!(r["daemon"]["adopted"], false, "{r}");
    assert_ne!(r["daemon"]["pid"].as_u64(), Some(u64::from(wrong.id())), "a daemon of its own: {r}");
    assert_eq!(file_lines(&p0.join("starts")).len(), 2, "the stray one, then GPU 0's own");
    assert!(ctl.log().contains("which is not its control daemon"), "{}", ctl.log());
    assert_eq!(row(&ctl, &u1)["daemon"]["adopted"], false);
}

/// `gpuslice top` shows a line per managed GPU above its tables: the mode, why, and the daemon;
/// the line follows a change of mode.
#[test]
#[cfg_attr(not(gpuslice_it_tmux), ignore = "needs tmux, which was not installed when the tests were built (apt-get install tmux; .ci/run does)")]
fn top_shows_each_gpus_mode_and_daemon() {
    let sim = Sim::new().env("SIMCUDA_DEVICES", 2);
    let (u0, u1) = (sim.device_uuid(0), sim.device_uuid(1));
    let ctl = start(&sim, &mps_args(&sim, &["--mps-device".into(), format!("{u0}=on"), "--mps-device".into(), format!("{u1}=auto")]));
    wait_mode(&ctl, &u0, "spatial");
    let daemon: i32 = file_lines(&pipe(&sim, &u0).join("starts"))[0].split(' ').next().unwrap().parse().unwrap();
    let tmux = Tmux::start(sim.dir(), 220, 30);
    tmux.type_line(&format!("{} top --socket {} --interval-ms 100", cli_path().display(), ctl.socket().display()));
    let line = |screen: &str, uuid: &str| screen.lines().find(|l| l.starts_with(uuid)).unwrap_or_default().to_string();
    let screen = tmux.wait_for("both GPUs' lines", WAIT, |s| s.contains("controller pid") && s.lines().any(|l| l.starts_with(&u1)));
    let first = line(&screen, &u0);
    assert!(first.starts_with(&format!("{u0} spatial (mps on) · daemon up, pid {daemon} · 0 restarts")), "{screen}");
    assert!(line(&screen, &u1).starts_with(&format!("{u1} time-sliced (auto: no high-priority group")), "{screen}");
    ctl.set_ok("--create --group web --priority high");
    let screen = tmux.wait_for("GPU 1 spatial", WAIT, |s| s.lines().any(|l| l.starts_with(&format!("{u1} spatial (auto: high-priority work"))));
    assert!(line(&screen, &u0).starts_with(&format!("{u0} spatial")), "{screen}");
    tmux.run(&["send-keys", "-t", "top", "q"]);
}

#[test]
fn serve_refuses_both_forms_at_once_and_a_malformed_device_policy() {
    let sim = Sim::new();
    let serve = |more: &str| {
        sim.program(cli_path())
            .args(&format!("serve --socket {} --ledger {} --mps-control /bin/true {more}", sim.path_str("s.sock"), sim.path_str("ledger")))
            .run()
    };
    let out = serve("--mps-daemon --mps on");
    assert!(!out.success() && out.stderr.contains("--mps-daemon runs one MPS daemon for the whole node"), "{out}");
    let out = serve("--mps-device 0=on");
    assert!(!out.success() && out.stderr.contains("is not a device UUID"), "{out}");
    let out = serve("--mps-device GPU-1234=sometimes");
    assert!(!out.success() && out.stderr.contains("not an MPS policy"), "{out}");
    let out = serve("--mps sometimes");
    assert!(!out.success() && out.stderr.contains("not an MPS policy"), "{out}");
}
