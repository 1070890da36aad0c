//! What the shim decides once, at the first CUDA call: logging, and the settings it runs under.
//!
//! A setting that does not parse is reported on stderr (whatever the log settings say) and
//! leaves the process unable to start CUDA work: `cuInit` and every managed call return
//! `CUDA_ERROR_INVALID_VALUE`, because a typo in a quota must never silently mean "no limit".

use gpuslice_common::settings::{Settings, SettingsError};
use once_cell::sync::OnceCell;
use std::io::Write;
use std::sync::atomic::{
    AtomicBool,
    Ordering::{Relaxed, Release},
};

pub const ENV_LOG: &str = "GPUSLICE_LOG";
pub const ENV_LOG_FILE: &str = "GPUSLICE_LOG_FILE";
pub const ENV_TEST_PANIC: &str = "GPUSLICE_TEST_PANIC_IN";

pub struct Runtime {
    pub settings: Result<Settings, SettingsError>,
}

static RUNTIME: OnceCell<Runtime> = OnceCell::new();

/// The process's runtime state, set up on first use.
#[inline]
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(init)
}

impl Runtime {
    /// The settings, when they parsed and ask for a slice (`Settings::asks_for_slice`).
    pub fn slicing_settings(&self) -> Option<&Settings> {
        self.settings.as_ref().ok().filter(|s| s.asks_for_slice())
    }
}

/// True when the settings were bad, or the process needed a controller and none took it
/// (`link`): CUDA work must not start.
#[inline]
pub fn refused() -> bool {
    runtime().settings.is_err() || no_controller()
}

/// Set by `link` when no controller took a process that had to have one and its policy is
/// `refuse`: CUDA work is refused for the rest of its life, or until a new `cuInit` tries again.
/// Kept here, below `link`, so that `refused` reads it without reaching up.
static NO_CONTROLLER: AtomicBool = AtomicBool::new(false);

/// True when this process must not run CUDA work: it needed a controller and none took it.
#[inline]
pub fn no_controller() -> bool {
    NO_CONTROLLER.load(Relaxed)
}

/// Sets (`link`, when no controller came) or clears (a new `cuInit`, a forked child) the flag.
pub fn set_no_controller(refused: bool) {
    NO_CONTROLLER.store(refused, Release);
}

fn init() -> Runtime {
    init_logging();
    crate::sys::guard::install_panic_hook();
    let settings = gpuslice_common::settings::env_pairs(std::env::vars_os()).and_then(Settings::from_env);
    let pid = std::process::id();
    match &settings {
        Ok(s) => {
            tracing::info!("gpuslice {} active in pid {pid}: {}", gpuslice_common::VERSION, s.describe());
            // Limits take effect when the process attaches to a ledger (`link`), at cuInit.
        }
        Err(e) => {
            let line = format!(
                "gpuslice: error: pid {pid}: {e}; CUDA work is refused in this process (cuInit returns CUDA_ERROR_INVALID_VALUE) until the setting is fixed or unset\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            // The same line in the log file too, when there is one; on stderr once is enough.
            if std::env::var_os(ENV_LOG_FILE).is_some_and(|p| !p.is_empty()) {
                tracing::error!("pid {pid}: {e}; CUDA work refused");
            }
        }
    }
    if let Some(hook) = std::env::var(ENV_TEST_PANIC).ok().filter(|v| !v.is_empty()) {
        crate::sys::guard::arm_test_panics(hook);
    }
    Runtime { settings }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let directives = std::env::var_os(ENV_LOG).unwrap_or_default().to_string_lossy().into_owned();
    let filter = if directives.trim().is_empty() {
        EnvFilter::new("warn")
    } else {
        EnvFilter::try_new(&directives).unwrap_or_else(|e| {
            let _ = writeln!(std::io::stderr(), "gpuslice: warning: {ENV_LOG}={directives:?} is not a log filter ({e}); using \"warn\"");
            EnvFilter::new("warn")
        })
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_target(true);
    // Never stdout: it belongs to the host program.
    // A path, any bytes: read as one (a path that is not UTF-8 must not mean "no log file").
    let fd = match std::env::var_os(ENV_LOG_FILE).filter(|p| !p.is_empty()) {
        Some(path) => match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            Ok(file) => std::os::fd::IntoRawFd::into_raw_fd(file), // Kept open for the process's life.
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "gpuslice: warning: cannot open {ENV_LOG_FILE}={path:?} ({e}); logging to stderr instead");
                libc::STDERR_FILENO
            }
        },
        None => libc::STDERR_FILENO,
    };
    // Already initialised (a second init after fork, say) is fine.
    drop(builder.with_writer(move || LineWriter(fd)).try_init());
}

/// Writes each log line with write(2) straight to a descriptor, taking no lock: a child forked
/// while another thread was logging must not find a writer's lock (std's stderr lock, a mutex
/// around the file) held for ever. The formatter hands over a whole line at once, so lines do
/// not interleave (one write of a line to a pipe or an O_APPEND file is atomic).
struct LineWriter(std::os::fd::RawFd);

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            // SAFETY: writing from a valid buffer to a descriptor this process owns.
            let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
