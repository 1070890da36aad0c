//! Managed spatial mode (issue 19): the controller owns MPS control daemons, so that MPS needs
//! no manual setup. Each runs as `nvidia-cuda-mps-control -f` (foreground: the controller is
//! its parent and sees it exit) with its pipe and log directories, is started again when it
//! exits (after 1 s, doubling to 30 s while it keeps failing), and when the controller stops is
//! asked to quit (`echo quit | nvidia-cuda-mps-control` with the same pipe directory), killed if
//! it has not gone within 5 s.
//!
//! A per-GPU daemon that an earlier controller left running (it was killed with SIGKILL) is
//! adopted at start when it is that GPU's and answers, and supervised from then on as if
//! started here (`mps_orphan` finds it; docs/NOTES.md, branch i19view, says why adopt rather
//! than replace). One that sees other GPUs, or does not answer, is stopped and a new one started.
//!
//! Two forms. `--mps-daemon`: one daemon for every GPU of the node, in the pipe directory CUDA
//! programs look in by default (`/tmp/nvidia-mps`, or `--mps-pipe-dir`), so any program on the
//! node runs over MPS without being told. `--mps auto|on` (or `[controller] mps`): one daemon
//! per GPU (`mps_devices`), each seeing only its GPU, and a per-GPU choice between MPS and
//! time-slicing that the shims follow. This module runs and watches one daemon; `mps_devices`
//! decides which.

use crate::mps_orphan::{self, Found, Orphan};
use gpuslice_common::settings::MpsPolicy;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
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
/// How long a daemon found running at start has to answer before it is taken as hung.
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// A harmless command every control daemon answers (the MPS servers it runs).
const PROBE: &str = "get_server_list";
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
        // The default pipe directory is everyone's: a daemon found there may be an operator's.
        adopt: false,
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
    /// Adopt the control daemon an earlier controller left running in `pipe` (a pipe directory
    /// of the controller's own), rather than start one that cannot take the directory.
    pub adopt: bool,
}

/// A daemon under supervision; dropping it stops the daemon.
pub struct Supervised {
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    thread: Option<JoinHandle<()>>,
}

/// What the supervisor saw at its last look.
#[derive(Default)]
struct Seen {
    up: AtomicBool,
    /// The running daemon's pid; 0 while none runs.
    pid: AtomicU32,
    restarts: AtomicU64,
    adopted: AtomicBool,
}

/// A daemon as `gpuslice ls` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DaemonState {
    pub up: bool,
    pub pid: Option<u32>,
    /// Times the supervisor started it again after it exited.
    pub restarts: u64,
    /// An earlier controller started it; this one adopted it.
    pub adopted: bool,
}

impl Supervised {
    /// True while the daemon runs and its control pipe is in its pipe directory (as of the
    /// supervisor's last look, at most `POLL` ago): where a process may be sent.
    pub fn up(&self) -> bool {
        self.seen.up.load(SeqCst)
    }

    /// The daemon as of the supervisor's last look.
    pub fn state(&self) -> DaemonState {
        let s = &self.seen;
        DaemonState {
            up: s.up.load(SeqCst),
            pid: Some(s.pid.load(SeqCst)).filter(|&p| p != 0),
            restarts: s.restarts.load(SeqCst),
            adopted: s.adopted.load(SeqCst),
        }
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

/// The daemon a supervisor watches: its own child, or one an earlier controller started.
enum Running {
    Child(Child),
    Adopted(Orphan),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child(c) => c.id(),
            Running::Adopted(o) => o.pid,
        }
    }

    /// How it ended, once it has (a child is reaped here; an adopted daemon is not ours to reap).
    fn exited(&mut self) -> Option<String> {
        match self {
            Running::Child(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            Running::Adopted(o) => o.exited().then(|| "exited".to_string()),
        }
    }

    fn kill(&mut self) {
        match self {
            Running::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Running::Adopted(o) => o.signal(libc::SIGKILL),
        }
    }
}

/// Makes the daemon's directories, adopts the daemon an earlier controller left in its pipe
/// directory or starts one (a program that cannot be run is an error here, so that the
/// controller does not start without it), and starts its supervisor thread.
pub fn supervise(daemon: Daemon) -> Result<Supervised, String> {
    for dir in [&daemon.pipe, &daemon.log] {
        std::fs::create_dir_all(dir).map_err(|e| format!("MPS: cannot create {}: {e}", dir.display()))?;
    }
    let seen = Arc::new(Seen::default());
    let running = match daemon.adopt.then(|| take_over(&daemon)).flatten() {
        Some(orphan) => {
            tracing::info!(
                "MPS control daemon for {} adopted (pid {}, pipe directory {}): an earlier controller left it running",
                daemon.what,
                orphan.pid,
                daemon.pipe.display()
            );
            seen.adopted.store(true, SeqCst);
            // It answered just now: the first table may send processes to it.
            seen.up.store(daemon.listening(), SeqCst);
            Running::Adopted(orphan)
        }
        None => {
            let child = daemon.spawn()?;
            tracing::info!("MPS control daemon for {} started (pid {}, pipe directory {})", daemon.what, child.id(), daemon.pipe.display());
            Running::Child(child)
        }
    };
    seen.pid.store(running.pid(), SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let (stopping, watched) = (stop.clone(), seen.clone());
    let thread = std::thread::Builder::new()
        .name("mps-daemon".into())
        .spawn(move || run(daemon, running, &stopping, &watched))
        .map_err(|e| format!("cannot start the MPS daemon's supervisor: {e}"))?;
    Ok(Supervised { stop, seen, thread: Some(thread) })
}

/// The control daemon an earlier controller left running in this daemon's pipe directory, to
/// adopt: one that sees this daemon's GPU and answers. One that sees other GPUs, or does not
/// answer, is stopped here so that a new one can take the directory. A process the pid file
/// names that is not a control daemon of this directory is left alone.
fn take_over(daemon: &Daemon) -> Option<Orphan> {
    let (what, pipe) = (&daemon.what, daemon.pipe.display());
    let orphan = match mps_orphan::find(&daemon.pipe, &daemon.control, daemon.visible.as_deref()) {
        Found::Nothing => return None,
        Found::Stranger { pid, why } => {
            tracing::info!("MPS: the pid file in {pipe} names pid {pid}, which is not its control daemon ({why}); left alone");
            return None;
        }
        Found::Foreign { orphan, why } => {
            tracing::warn!("MPS: a control daemon (pid {}) runs in {pipe} but {why}; stopping it to start {what}'s own", orphan.pid);
            orphan
        }
        Found::Ours(orphan) => match daemon.ask(PROBE, PROBE_WAIT) {
            Ok(()) => return Some(orphan),
            Err(e) => {
                tracing::warn!("MPS: the control daemon left running for {what} (pid {}) does not answer ({e}); stopping it to start a new one", orphan.pid);
                orphan
            }
        },
    };
    stop_daemon(daemon, &mut Running::Adopted(orphan));
    None
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

    /// `echo <command> | nvidia-cuda-mps-control` for this daemon's pipe directory: an error
    /// when the client fails, or has not finished within `wait` (it is killed then: a hung
    /// daemon must not hang the controller's start or stop).
    fn ask(&self, command: &str, wait: Duration) -> Result<(), String> {
        let mut c = self.command().stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| e.to_string())?;
        if let Some(mut stdin) = c.stdin.take() {
            use std::io::Write;
            // A client that exits without reading it says so by its status below.
            let _ = stdin.write_all(format!("{command}\n").as_bytes());
        }
        let deadline = Instant::now() + wait;
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return status.success().then_some(()).ok_or_else(|| format!("`{command}` exited with {status}")),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(format!("`{command}` had no answer within {wait:?}"));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Whether the daemon's control pipe is there (the daemon makes it once it listens).
    fn listening(&self) -> bool {
        self.pipe.join("control").exists()
    }
}

/// Restarts the daemon whenever it exits, until asked to stop; then stops it. The first restart
/// comes after `FIRST_BACKOFF`, each next one twice as late while the daemon keeps exiting
/// (at most `MAX_BACKOFF`); one that ran `HEALTHY` starts the count again. `seen` says, at
/// each look, whether the daemon runs and listens, its pid and how often it was restarted.
fn run(daemon: Daemon, mut running: Running, stop: &AtomicBool, seen: &Seen) {
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
                        seen.pid.store(c.id(), SeqCst);
                        seen.restarts.fetch_add(1, SeqCst);
                        running = Running::Child(c);
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
                if let Some(status) = running.exited() {
                    seen.up.store(false, SeqCst);
                    seen.pid.store(0, SeqCst);
                    seen.adopted.store(false, SeqCst);
                    if started.elapsed() >= HEALTHY {
                        backoff = FIRST_BACKOFF;
                    }
                    tracing::warn!("the MPS control daemon for {} exited ({status}); starting it again in {backoff:?}", daemon.what);
                    down_since = Some(Instant::now());
                } else {
                    seen.up.store(daemon.listening(), SeqCst);
                }
            }
        }
    }
    seen.up.store(false, SeqCst);
    if down_since.is_none() {
        stop_daemon(&daemon, &mut running);
    }
    seen.pid.store(0, SeqCst);
}

/// Asks the daemon to quit and waits for it; kills it once `QUIT_WAIT` has passed.
fn stop_daemon(daemon: &Daemon, running: &mut Running) {
    let deadline = Instant::now() + QUIT_WAIT;
    if let Err(e) = daemon.ask("quit", QUIT_WAIT) {
        tracing::warn!("asking the MPS control daemon for {} to quit failed ({e})", daemon.what);
    }
    while Instant::now() < deadline {
        if running.exited().is_some() {
            tracing::info!("MPS control daemon for {} stopped (pipe directory {})", daemon.what, daemon.pipe.display());
            return;
        }
        std::thread::sleep(POLL);
    }
    tracing::warn!("the MPS control daemon for {} did not quit within {QUIT_WAIT:?}; killing it", daemon.what);
    running.kill();
}
