//! A control daemon an earlier controller left running in a GPU's pipe directory (issue 19): a
//! controller killed with SIGKILL cannot ask its daemons to quit, and they go on serving their
//! clients as children of init. Found by the pid file `nvidia-cuda-mps-control` keeps in its
//! pipe directory, checked against `/proc` (the program, its pipe directory, the GPU it sees),
//! and held by a pidfd from then on, so that a pid reused by another process is never mistaken
//! for it, signalled or waited for. What to do with it is `mps_daemon`'s choice.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// The file in the pipe directory that holds the control daemon's pid (a number and a newline;
/// third-party scripts and listings of a running daemon's pipe directory show it beside
/// `control`, `control_lock`, `control_privileged` and `log`).
pub const PID_FILE: &str = "nvidia-cuda-mps-control.pid";

/// A running process that is not this controller's child, held by a pidfd.
pub struct Orphan {
    pub pid: u32,
    pidfd: OwnedFd,
}

/// What a pipe directory holds.
pub enum Found {
    /// No live control daemon: no pid file, or its process has gone (a daemon killed with
    /// SIGKILL leaves its pid file and `control` behind).
    Nothing,
    /// The pid file names a live process that is not a control daemon of this pipe directory
    /// (its pid was reused), or one whose environment cannot be read: never touched.
    Stranger { pid: u32, why: String },
    /// A control daemon of this pipe directory that sees this daemon's GPU.
    Ours(Orphan),
    /// A control daemon of this pipe directory that sees other GPUs than this daemon's.
    Foreign { orphan: Orphan, why: String },
}

/// Looks for a live control daemon in `pipe`: the process its pid file names, else (no pid
/// file, a stale one, or one naming another process) any process that is a control daemon of
/// `pipe`: whether `nvidia-cuda-mps-control -f` writes the pid file as the forked `-d` does is
/// not known here. `control`: the control program as the controller runs it (its file name must
/// be one of the process's first two words: `nvidia-cuda-mps-control -f`, or `/bin/sh <script>
/// -f` for a script); `visible`: the `CUDA_VISIBLE_DEVICES` this pipe directory's daemon is
/// started with (`None`: unset).
pub fn find(pipe: &Path, control: &str, visible: Option<&str>) -> Found {
    let named = std::fs::read_to_string(pipe.join(PID_FILE)).ok().and_then(|t| t.trim().parse::<u32>().ok()).filter(|&p| p > 1);
    let mut stranger = None;
    if let Some(pid) = named {
        match examine(pid, pipe, control, visible) {
            Exam::Daemon(found) => return found,
            Exam::Other(why) => stranger = Some(Found::Stranger { pid, why }),
            Exam::Gone => {}
        }
    }
    let pids = std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids.filter(|&p| Some(p) != named && p != std::process::id()) {
        if let Exam::Daemon(found) = examine(pid, pipe, control, visible) {
            return found;
        }
    }
    stranger.unwrap_or(Found::Nothing)
}

/// What one process is, for `find`.
enum Exam {
    Gone,
    /// Not a control daemon of the pipe directory, and why.
    Other(String),
    Daemon(Found),
}

fn examine(pid: u32, pipe: &Path, control: &str, visible: Option<&str>) -> Exam {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let program = file_name(control);
    // The command line first (anyone may read it): most processes end here, before a pidfd.
    let Ok(words) = std::fs::read(proc_dir.join("cmdline")).map(|b| split_nul(&b)) else { return Exam::Gone };
    if !words.iter().take(2).any(|w| file_name(w) == program) {
        return Exam::Other(format!("it runs {:?}, not {program}", words.join(" ")));
    }
    let Some(pidfd) = crate::state::pidfd_open(pid) else { return Exam::Gone };
    let orphan = Orphan { pid, pidfd };
    let words: Vec<String> = std::fs::read(proc_dir.join("cmdline")).map(|b| split_nul(&b)).unwrap_or_default();
    let environ = std::fs::read(proc_dir.join("environ")).map(|b| split_nul(&b));
    // Read after the pidfd was opened: it holds one process, so if that has not exited the
    // words read were its own, not those of a later process given the same pid.
    if orphan.exited() {
        return Exam::Gone;
    }
    if !words.iter().take(2).any(|w| file_name(w) == program) {
        return Exam::Other(format!("it runs {:?}, not {program}", words.join(" ")));
    }
    let environ = match environ {
        Ok(e) => e,
        Err(e) => return Exam::Other(format!("its environment cannot be read ({e})")),
    };
    let var = |name: &str| environ.iter().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=').map(str::to_string));
    let its_pipe = var("CUDA_MPS_PIPE_DIRECTORY");
    if its_pipe.as_deref().map(Path::new) != Some(pipe) {
        return Exam::Other(format!("its pipe directory is {its_pipe:?}, not {}", pipe.display()));
    }
    let its_gpus = var("CUDA_VISIBLE_DEVICES");
    if its_gpus.as_deref() != visible {
        let why = format!("it sees CUDA_VISIBLE_DEVICES={}, not {}", its_gpus.as_deref().unwrap_or("(unset)"), visible.unwrap_or("(unset)"));
        return Exam::Daemon(Found::Foreign { orphan, why });
    }
    Exam::Daemon(Found::Ours(orphan))
}

impl Orphan {
    /// Whether it has exited (its pidfd is readable; a zombie that nobody reaped counts).
    pub fn exited(&self) -> bool {
        let mut fd = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd on the stack, no wait.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n > 0 && fd.revents != 0
    }

    /// Sends `signal` through the pidfd: reaches this process or nobody.
    pub fn signal(&self, signal: i32) {
        // SAFETY: pidfd_send_signal(2) on a descriptor we own, without siginfo, flags 0.
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0) };
    }
}

fn split_nul(bytes: &[u8]) -> Vec<String> {
    bytes.split(|&b| b == 0).filter(|w| !w.is_empty()).map(|w| String::from_utf8_lossy(w).into_owned()).collect()
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_pid_file_or_a_dead_pid_is_nothing_and_another_program_is_a_stranger() {
        let dir = std::env::temp_dir().join(format!("gpuslice-orphan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(find(&dir, "nvidia-cuda-mps-control", None), Found::Nothing));
        // A pid that exited and was reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        std::fs::write(dir.join(PID_FILE), format!("{gone}\n")).unwrap();
        assert!(matches!(find(&dir, "nvidia-cuda-mps-control", None), Found::Nothing));
        // This test process: alive, but not a control daemon.
        std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id())).unwrap();
        assert!(matches!(find(&dir, "nvidia-cuda-mps-control", None), Found::Stranger { .. }));
        std::fs::write(dir.join(PID_FILE), "garbage").unwrap();
        assert!(matches!(find(&dir, "nvidia-cuda-mps-control", None), Found::Nothing));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_daemon_without_a_pid_file_is_found_by_its_program_and_pipe_directory() {
        let dir = std::env::temp_dir().join(format!("gpuslice-orphan-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A process named as the control program, in this pipe directory, seeing GPU-a.
        let mut daemon = std::process::Command::new("bash")
            .args(["-c", "exec -a nvidia-cuda-mps-control sleep 30"])
            .env("CUDA_MPS_PIPE_DIRECTORY", &dir)
            .env("CUDA_VISIBLE_DEVICES", "GPU-a")
            .spawn()
            .unwrap();
        let pid = daemon.id();
        let found = |visible| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let f = find(&dir, "/usr/bin/nvidia-cuda-mps-control", Some(visible));
                if !matches!(f, Found::Nothing) || std::time::Instant::now() > deadline {
                    return f;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        assert!(matches!(found("GPU-a"), Found::Ours(o) if o.pid == pid));
        assert!(matches!(found("GPU-b"), Found::Foreign { orphan, .. } if orphan.pid == pid));
        // Another pipe directory: not this one's.
        assert!(matches!(find(&dir.join("other"), "nvidia-cuda-mps-control", Some("GPU-a")), Found::Nothing));
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        assert!(matches!(find(&dir, "nvidia-cuda-mps-control", Some("GPU-a")), Found::Nothing));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
