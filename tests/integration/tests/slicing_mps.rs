//! Issue 19's managed spatial mode, next to the slicing tests: `gpuslice serve --mps-daemon` runs
//! the MPS control daemon (here a fake `nvidia-cuda-mps-control`, a shell script that keeps a
//! journal in its pipe directory), starts it again when it dies, and asks it to quit when the
//! controller stops.

use gpuslice_integration::*;
use std::time::Duration;

#[test]
fn serve_runs_the_mps_daemon_restarts_it_and_quits_it_on_stop() {
    let sim = Sim::new();
    let control = sim.write_file("nvidia-cuda-mps-control", FAKE_MPS_CONTROL);
    std::fs::set_permissions(&control, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (pipe, log) = (sim.path("mps-pipe"), sim.path("mps-log"));
    let args = [
        "--mps-daemon".to_string(),
        "--mps-control".to_string(),
        control.display().to_string(),
        "--mps-pipe-dir".to_string(),
        pipe.display().to_string(),
        "--mps-log-dir".to_string(),
        log.display().to_string(),
    ];
    let mut ctl = sim.controller_with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let starts = pipe.join("starts");
    assert!(poll_until(Duration::from_secs(10), || file_lines(&starts).len() == 1), "the daemon did not start:\n{}", ctl.log());
    assert_eq!(file_lines(&pipe.join("env")), vec![format!("log={}", log.display())], "the daemon's log directory");
    let first: i32 = file_lines(&starts)[0].split(' ').next().unwrap().parse().unwrap();

    // Killed: the controller starts another after a second.
    // SAFETY: a process this test's controller started.
    unsafe { libc::kill(first, libc::SIGKILL) };
    assert!(poll_until(Duration::from_secs(10), || file_lines(&starts).len() == 2), "the daemon was not restarted:\n{}", ctl.log());
    let second: i32 = file_lines(&starts)[1].split(' ').next().unwrap().parse().unwrap();
    assert_ne!(first, second);
    assert!(ctl.log().contains("MPS control daemon restarted"), "{}", ctl.log());

    // The controller stops: the daemon is asked to quit (not killed) and is gone.
    // SAFETY: the controller this test started.
    unsafe { libc::kill(ctl.pid() as i32, libc::SIGTERM) };
    assert!(poll_until(Duration::from_secs(10), || !ctl.running()), "the controller did not stop");
    assert_eq!(file_lines(&pipe.join("commands")), vec!["quit".to_string()], "{}", ctl.log());
    assert_eq!(file_lines(&pipe.join("quits")), vec![second.to_string()], "the daemon did not quit by itself:\n{}", ctl.log());
    assert!(poll_until(Duration::from_secs(5), || !alive(second)), "the daemon outlived the controller");
    assert_eq!(file_lines(&starts).len(), 2, "no daemon started after the stop");
}

#[test]
fn serve_refuses_to_start_without_the_mps_control_program() {
    let sim = Sim::new();
    let out = sim
        .program(cli_path())
        .args(&format!(
            "serve --socket {} --ledger {} --mps-daemon --mps-control {} --mps-pipe-dir {} --mps-log-dir {}",
            sim.path_str("s.sock"),
            sim.path_str("ledger"),
            sim.path_str("no-such-control"),
            sim.path_str("pipe"),
            sim.path_str("log")
        ))
        .run();
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("cannot run") && out.stderr.contains("no-such-control"), "{out}");
}
