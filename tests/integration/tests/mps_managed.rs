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

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

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
    let mut ctl = start(&sim, &mps_args(&sim, &["--mps".into(), "on".into()]));
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

    // GPU 0's daemon fails and cannot start for a while: the table says time-sliced meanwhile,
    // GPU 1 is untouched; then it starts again.
    std::fs::write(format!("{}.fail", pipe(&sim, &u0).display()), b"").unwrap();
    // SAFETY: a process this test's controller started.
    unsafe { libc::kill(first, libc::SIGKILL) };
    wait_mode(&ctl, &u0, "time-sliced");
    assert!(table(&ctl).iter().any(|(u, m, p, _)| u == &u0 && m == "time-sliced" && p == "-"), "{:?}", table(&ctl));
    assert_eq!(mode_of(&ctl, &u1).as_deref(), Some("spatial"));
    assert!(poll_until(WAIT, || ctl.log().contains("its MPS control daemon is not up")), "{}", ctl.log());
    std::fs::remove_file(format!("{}.fail", pipe(&sim, &u0).display())).unwrap();
    assert!(poll_until(WAIT, || file_lines(&s0).len() == 2), "GPU 0's daemon was not restarted:\n{}", ctl.log());
    wait_mode(&ctl, &u0, "spatial");
    assert!(ctl.log().contains("MPS control daemon restarted") && ctl.log().contains(&format!("for {u0}")), "{}", ctl.log());
    let second: i32 = file_lines(&s0)[1].split(' ').next().unwrap().parse().unwrap();
    let other: i32 = file_lines(&s1)[0].split(' ').next().unwrap().parse().unwrap();
    assert_ne!(first, second);

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
    let args = mps_args(&sim, &["--config".into(), config.display().to_string()]);
    let ctl = start(&sim, &args);
    wait_mode(&ctl, &u0, "time-sliced");
    assert_eq!(table(&ctl).len(), 1, "GPU 1 is off: {:?}", table(&ctl));
    assert!(!pipe(&sim, &u1).exists(), "no daemon for GPU 1");
    assert!(ctl.log().contains("auto: no high-priority group"), "{}", ctl.log());

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
    assert_eq!(table(&ctl).iter().find(|(u, ..)| u == &u0).map(|(.., users)| users.clone()), Some(uid), "{:?}", table(&ctl));
    touch(&go);
    holder.wait().assert_all_ok();
    wait_mode(&ctl, &u0, "spatial");

    // A share anywhere: auto goes back to time-slicing (the GPU is free).
    ctl.set_ok("--group batch --sm 30");
    wait_mode(&ctl, &u0, "time-sliced");
    assert!(ctl.log().contains("auto: SM shares are set"), "{}", ctl.log());
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
