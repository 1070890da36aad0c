//! Whether another process is still alive: the one liveness check that the turns, the
//! priority marks and the export registry use to take back what a dead process held.

/// True unless `pid` is known to be gone. A zombie is gone: it exited and will never launch or
/// hand a turn over again, though its parent has not reaped it yet (and may not for long).
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence. EPERM means it exists under another user.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    (r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)) && !zombie(pid)
}

/// True when /proc says `pid` has exited (state Z or X); false when it cannot tell.
fn zombie(pid: u32) -> bool {
    let mut path = *b"/proc/0000000000/stat\0";
    let digits = pid.to_string();
    // "/proc/" is 6 bytes; the number replaces the zeros, then "/stat\0" follows it.
    let end = 6 + digits.len();
    path[6..end].copy_from_slice(digits.as_bytes());
    path[end..end + 6].copy_from_slice(b"/stat\0");
    let mut buf = [0u8; 256];
    // SAFETY: a NUL-terminated path on the stack; read into a stack buffer; the descriptor is
    // closed before returning.
    let n = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    let stat = &buf[..usize::try_from(n).unwrap_or(0)];
    // "pid (comm) S ...": the state follows the last ')' (comm may hold anything).
    stat.iter().rposition(|&b| b == b')').and_then(|i| stat.get(i + 2)).is_some_and(|&state| state == b'Z' || state == b'X')
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_zombie_is_not_alive() {
        assert!(super::alive(std::process::id()));
        // SAFETY: the child exits at once, without running anything of ours.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: leaving the child at once.
            unsafe { libc::_exit(0) };
        }
        // Not reaped yet: a zombie once it has exited.
        let start = std::time::Instant::now();
        while super::alive(child as u32) {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "the exited child still looks alive");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert!(!super::alive(child as u32));
    }
}
