//! Managed spatial mode (issue 19): with `gpuslice serve --mps-daemon`, the controller owns an
//! MPS control daemon, so that MPS needs no manual setup. It runs `nvidia-cuda-mps-control -f`
//! (foreground: the controller is its parent and sees it exit) with its pipe and log
//! directories, restarts it when it exits (after 1 s, doubling to 30 s while it keeps failing),
//! and when the controller stops asks it to quit (`echo quit | nvidia-cuda-mps-control` with the
//! same pipe directory), killing it if it has not gone within 5 s.
//!
//! One daemon serves every GPU of the node, in the pipe directory CUDA programs look in by
//! default (`/tmp/nvidia-mps`, or `--mps-pipe-dir`), so any program on the node runs over MPS
//! without being told; the shims' `GPUSLICE_MPS=auto` then maps priorities and shares onto
//! MPS's controls (LD_PRELOAD.md). One daemon per GPU, and choosing MPS or time-slicing per
//! device, need the programs to be pointed at their GPU's pipe directory: not done.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The flags of `gpuslice serve` for this mode.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MpsFlags {
    /// Run an MPS control daemon for this node's GPUs, restart it if it fails, stop it with
    /// the controller.
    #[arg(long)]
    pub mps_daemon: bool,
    /// The MPS control program.
    #[arg(long, value_name = "PATH", default_value = "nvidia-cuda-mps-control")]
    pub mps_control: String,
    /// The daemon's pipe directory (CUDA_MPS_PIPE_DIRECTORY; CUDA programs look in /tmp/nvidia-mps
    /// unless told otherwise).
    #[arg(long, value_name = "DIR", default_value = "/tmp/nvidia-mps")]
    pub mps_pipe_dir: PathBuf,
    /// The daemon's log directory (CUDA_MPS_LOG_DIRECTORY).
    #[arg(long, value_name = "DIR", default_value = "/var/log/nvidia-mps")]
    pub mps_log_dir: PathBuf,
}

/// How often the supervisor looks at the daemon.
const POLL: Duration = Duration::from_millis(100);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A daemon that ran this long before exiting starts again after `FIRST_BACKOFF`.
const HEALTHY: Duration = Duration::from_secs(60);
/// How long a daemon asked to quit may take.
const QUIT_WAIT: Duration = Duration::from_secs(5);

/// The running supervisor; dropping it stops the daemon.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the daemon and its supervisor when `--mps-daemon` was given.
pub fn start(flags: &MpsFlags) -> Result<Option<Supervisor>, String> {
    if !flags.mps_daemon {
        return Ok(None);
    }
    for dir in [&flags.mps_pipe_dir, &flags.mps_log_dir] {
        std::fs::create_dir_all(dir).map_err(|e| format!("--mps-daemon: cannot create {}: {e}", dir.display()))?;
    }
    let daemon = Daemon { control: flags.mps_control.clone(), pipe: flags.mps_pipe_dir.clone(), log: flags.mps_log_dir.clone() };
    // The first start is checked here: a missing program stops the controller at once.
    let child = daemon.spawn()?;
    tracing::info!("MPS control daemon started (pid {}, pipe directory {})", child.id(), daemon.pipe.display());
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("mps-daemon".into())
        .spawn(move || supervise(daemon, child, &stopping))
        .map_err(|e| format!("cannot start the MPS daemon's supervisor: {e}"))?;
    Ok(Some(Supervisor { stop, thread: Some(thread) }))
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One control daemon: the program and its directories.
struct Daemon {
    control: String,
    pipe: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.control);
        c.env("CUDA_MPS_PIPE_DIRECTORY", &self.pipe).env("CUDA_MPS_LOG_DIRECTORY", &self.log);
        c
    }

    fn spawn(&self) -> Result<Child, String> {
        self.command().arg("-f").stdin(Stdio::null()).stdout(Stdio::null()).spawn().map_err(|e| format!("--mps-daemon: cannot run {} -f: {e}", self.control))
    }

    /// `echo quit | nvidia-cuda-mps-control` for this daemon's pipe directory.
    fn quit(&self) -> Result<(), String> {
        let mut c = self.command().stdin(Stdio::piped()).stdout(Stdio::null()).spawn().map_err(|e| e.to_string())?;
        if let Some(mut stdin) = c.stdin.take() {
            use std::io::Write;
            stdin.write_all(b"quit\n").map_err(|e| e.to_string())?;
        }
        let status = c.wait().map_err(|e| e.to_string())?;
        status.success().then_some(()).ok_or_else(|| format!("exited with {status}"))
    }
}

/// Restarts the daemon whenever it exits, until asked to stop; then stops it. The first restart
/// comes after `FIRST_BACKOFF`, each next one twice as late while the daemon keeps exiting
/// (at most `MAX_BACKOFF`); one that ran `HEALTHY` starts the count again.
fn supervise(daemon: Daemon, mut child: Child, stop: &AtomicBool) {
    let mut started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut down_since: Option<Instant> = None;
    while !stop.load(SeqCst) {
        std::thread::sleep(POLL);
        match down_since {
            Some(at) if at.elapsed() >= backoff => {
                down_since = None;
                let spawned = daemon.spawn();
                backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                match spawned {
                    Ok(c) => {
                        tracing::info!("MPS control daemon restarted (pid {})", c.id());
                        child = c;
                        started = Instant::now();
                    }
                    Err(e) => {
                        tracing::warn!("{e}; trying again in {backoff:?}");
                        down_since = Some(Instant::now());
                    }
                }
            }
            Some(_) => {}
            None => {
                if let Ok(Some(status)) = child.try_wait() {
                    if started.elapsed() >= HEALTHY {
                        backoff = FIRST_BACKOFF;
                    }
                    tracing::warn!("the MPS control daemon exited ({status}); starting it again in {backoff:?}");
                    down_since = Some(Instant::now());
                }
            }
        }
    }
    if down_since.is_none() {
        stop_daemon(&daemon, &mut child);
    }
}

/// Asks the daemon to quit and waits for it; kills it after `QUIT_WAIT`.
fn stop_daemon(daemon: &Daemon, child: &mut Child) {
    if let Err(e) = daemon.quit() {
        tracing::warn!("asking the MPS control daemon to quit failed ({e}); killing it");
    }
    let deadline = Instant::now() + QUIT_WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            tracing::info!("MPS control daemon stopped ({})", pipe_note(&daemon.pipe));
            return;
        }
        std::thread::sleep(POLL);
    }
    tracing::warn!("the MPS control daemon did not quit within {QUIT_WAIT:?}; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

fn pipe_note(pipe: &Path) -> String {
    format!("pipe directory {}", pipe.display())
}
