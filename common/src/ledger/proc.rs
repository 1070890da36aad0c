//! What `/proc` says about a pid.

/// The start time of `pid` (field 22 of /proc/PID/stat), to tell a process from a later one
/// that reused its pid. `None` when the process does not exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The effective uid of `pid` (the second figure of /proc/PID/status's `Uid:` line: what
/// `SO_PEERCRED` reports for a socket it connects). `None` when the process does not exist.
pub fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process() {
        assert!(process_start_time(std::process::id()).is_some());
        assert_eq!(process_start_time(u32::MAX - 1), None);
    }

    #[test]
    fn uid_of_this_process() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(process_uid(std::process::id()), Some(unsafe { libc::geteuid() }));
        assert_eq!(process_uid(u32::MAX - 1), None);
    }
}
