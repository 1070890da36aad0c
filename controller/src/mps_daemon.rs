//! Managed spatial mode (issue 19): the controller owns MPS control daemons, so that MPS needs
//! no manual setup. Each runs as `nvidia-cuda-mps-control -f` (foreground: the controller is
//! its parent and sees it exit) with its pipe and log directories, is started again when it
//! exits (after 1 s, doubling to 30 s while it keeps failing), and when the controller stops is
//! asked to quit (`echo quit | nvidia-cuda-mps-control` with the same pipe directory), killed if
//! it has not gone within 5 s.
//!
//! Two forms. `--mps-daemon`: one daemon for every GPU of the node, in the pipe directory CUDA
//! programs look in by default (`/tmp/nvidia-mps`, or `--mps-pipe-dir`), so any program on the
//! node runs over MPS without being told. `--mps auto|on` (or `[controller] mps`): one daemon
//! per GPU (`mps_devices`), each seeing only its GPU, and a per-GPU choice between MPS and
//! time-slicing that the shims follow. This module runs and watches one daemon; `mps_devices`
//! decides which.

use gpuslice_common::settings::MpsPolicy;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The flags of `gpuslice serve` for this mode.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MpsFlags {
    /// Run one MPS control daemon for all of this node's GPUs (every CUDA program on the node
    /// then runs over MPS), restart it if it fails, stop it with the controller.
    #[arg(long)]
    pub mps_daemon: bool,
    /// One MPS control daemon per GPU, and per GPU MPS or time-slicing: `off` (default),
    /// `auto` (the controller's rule, LD_PRELOAD.md) or `on`. MPS gives up fault isolation
    /// between processes. Over the config's `[controller] mps`.
    #[arg(long, value_name = "off|auto|on")]
    pub mps: Option<MpsPolicy>,
    /// The same for one GPU, by UUID (`GPU-...=on`); may be repeated. Over `--mps`.
    #[arg(long, value_name = "UUID=off|auto|on")]
    pub mps_device: Vec<String>,
    /// The MPS control program.
    #[arg(long, value_name = "PATH", default_value = "nvidia-cuda-mps-control")]
    pub mps_control: String,
    /// The pipe directory (CUDA_MPS_PIPE_DIRECTORY). `--mps-daemon`: the daemon's (default
    /// /tmp/nvidia-mps, where CUDA programs look unless told otherwise); `--mps`: the folder
    /// of each GPU's, `<DIR>/<UUID>` (default: `mps` beside the socket).
    #[arg(long, value_name = "DIR")]
    pub mps_pipe_dir: Option<PathBuf>,
    /// The log directory (CUDA_MPS_LOG_DIRECTORY); with `--mps`, each GPU's is `<DIR>/<UUID>`.
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
/// The pipe directory a CUDA program looks in unless told otherwise.
pub const DEFAULT_PIPE_DIR: &str = "/tmp/nvidia-mps";

/// Starts the node's single daemon and its supervisor when `--mps-daemon` was given.
pub fn start(flags: &MpsFlags) -> Result<Option<Supervised>, String> {
    if !flags.mps_daemon {
        return Ok(None);
    }
    let daemon = Daemon {
        what: "the node".into(),
        control: flags.mps_control.clone(),
        pipe: flags.mps_pipe_dir.clone().unwrap_or_else(|| DEFAULT_PIPE_DIR.into()),
        log: flags.mps_log_dir.clone(),
        visible: None,
    };
    supervise(daemon).map(Some)
}

/// One control daemon: the program, its directories and the GPU it may see.
pub struct Daemon {
    /// What it serves, for the log ("the node", a GPU's UUID).
    pub what: String,
    pub control: String,
    pub pipe: PathBuf,
    pub log: PathBuf,
    /// Its `CUDA_VISIBLE_DEVICES` (a GPU's UUID); `None`: every GPU.
    pub visible: Option<String>,
}

/// A daemon under supervision; dropping it stops the daemon.
pub struct Supervised {
    stop: Arc<AtomicBool>,
    up: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Supervised {
    /// True while the daemon runs and its control pipe is in its pipe directory (as of the
    /// supervisor's last look, at most `POLL` ago): where a process may be sent.
    pub fn up(&self) -> bool {
        self.up.load(SeqCst)
    }

    /// Tells the supervisor to stop the daemon, without waiting (the drop waits), so that
    /// several daemons quit at once.
    pub fn request_stop(&self) {
        self.stop.store(true, SeqCst);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes the daemon's directories, starts it (a program that cannot be run is an error here,
/// so that the controller does not start without it) and its supervisor thread.
pub fn supervise(daemon: Daemon) -> Result<Supervised, String> {
    for dir in [&daemon.pipe, &daemon.log] {
        std::fs::create_dir_all(dir).map_err(|e| format!("MPS: cannot create {}: {e}", dir.display()))?;
    }
    let child = daemon.spawn()?;
    tracing::info!("MPS control daemon for {} started (pid {}, pipe directory {})", daemon.what, child.id(), daemon.pipe.display());
    let stop = Arc::new(AtomicBool::new(false));
    let up = Arc::new(AtomicBool::new(false));
    let (stopping, publishing) = (stop.clone(), up.clone());
    let thread = std::thread::Builder::new()
        .name("mps-daemon".into())
        .spawn(move || run(daemon, child, &stopping, &publishing))
        .map_err(|e| format!("cannot start the MPS daemon's supervisor: {e}"))?;
    Ok(Supervised { stop, up, thread: Some(thread) })
}

impl Daemon {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.control);
        c.env("CUDA_MPS_PIPE_DIRECTORY", &self.pipe).env("CUDA_MPS_LOG_DIRECTORY", &self.log);
        match &self.visible {
            Some(uuid) => c.env("CUDA_VISIBLE_DEVICES", uuid),
            None => c.env_remove("CUDA_VISIBLE_DEVICES"),
        };
        c
    }

    fn spawn(&self) -> Result<Child, String> {
        self.command().arg("-f").stdin(Stdio::null()).stdout(Stdio::null()).spawn().map_err(|e| format!("MPS: cannot run {} -f: {e}", self.control))
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

    /// Whether the daemon's control pipe is there (the daemon makes it once it listens).
    fn listening(&self) -> bool {
        self.pipe.join("control").exists()
    }
}

/// Restarts the daemon whenever it exits, until asked to stop; then stops it. The first restart
/// comes after `FIRST_BACKOFF`, each next one twice as late while the daemon keeps exiting
/// (at most `MAX_BACKOFF`); one that ran `HEALTHY` starts the count again. `up` says, at each
/// look, whether the daemon runs and listens.
fn run(daemon: Daemon, mut child: Child, stop: &AtomicBool, up: &AtomicBool) {
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
                        tracing::info!("MPS control daemon restarted (pid {}) for {}", c.id(), daemon.what);
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
                    up.store(false, SeqCst);
                    if started.elapsed() >= HEALTHY {
                        backoff = FIRST_BACKOFF;
                    }
                    tracing::warn!("the MPS control daemon for {} exited ({status}); starting it again in {backoff:?}", daemon.what);
                    down_since = Some(Instant::now());
                } else {
                    up.store(daemon.listening(), SeqCst);
                }
            }
        }
    }
    up.store(false, SeqCst);
    if down_since.is_none() {
        stop_daemon(&daemon, &mut child);
    }
}

/// Asks the daemon to quit and waits for it; kills it after `QUIT_WAIT`.
fn stop_daemon(daemon: &Daemon, child: &mut Child) {
    if let Err(e) = daemon.quit() {
        tracing::warn!("asking the MPS control daemon for {} to quit failed ({e}); killing it", daemon.what);
    }
    let deadline = Instant::now() + QUIT_WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            tracing::info!("MPS control daemon for {} stopped (pipe directory {})", daemon.what, daemon.pipe.display());
            return;
        }
        std::thread::sleep(POLL);
    }
    tracing::warn!("the MPS control daemon for {} did not quit within {QUIT_WAIT:?}; killing it", daemon.what);
    let _ = child.kill();
    let _ = child.wait();
}
