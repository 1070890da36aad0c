//! A group's processes through the driver's checkpoint API, all or nothing: every one locked,
//! then each checkpointed; a failure part way puts back what was done (restore, unlock) and asks
//! the driver where each process stands afterwards, so that none is left half-suspended behind
//! a record that says "running". Resuming restores and unlocks each.

use crate::checkpoint::{Driver, DriverError, ProcessState, OUT_OF_MEMORY};
use std::time::{Duration, Instant};

/// How long a lock waits for the target's CUDA calls under way (a long kernel, a sync): a
/// manual `gpuslice suspend`'s, and the most the policy gives one (`LockWait::within`).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest wait a lock is given: the driver reads a timeout of 0 as "no timeout"
/// (cuda.h, `CUcheckpointLockArgs::timeoutMs`), so a bound that has run out must still be 1 ms.
const MIN_LOCK_WAIT: Duration = Duration::from_millis(1);

/// How long the locks of one suspension may wait for their targets' calls under way: each at
/// most `each`, and (the suspension policy's bound, `room`) none past `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockWait {
    pub each: Duration,
    pub until: Option<Instant>,
}

impl LockWait {
    /// Each lock waits at most `each` (a manual suspension: `LOCK_TIMEOUT`).
    pub fn each(each: Duration) -> LockWait {
        LockWait { each, until: None }
    }

    /// Every lock done by `until` (each still at most `LOCK_TIMEOUT`): the policy's bound on
    /// one candidate, taken from the request's wait.
    pub fn within(until: Instant) -> LockWait {
        LockWait { each: LOCK_TIMEOUT, until: Some(until) }
    }

    /// The timeout of a lock that starts at `now`: never 0 (the driver's "no timeout").
    pub fn at(&self, now: Instant) -> Duration {
        let left = self.until.map_or(self.each, |u| u.saturating_duration_since(now));
        self.each.min(left).max(MIN_LOCK_WAIT)
    }
}

/// The checkpoint calls used here: the loaded driver's (a fake one in the tests).
pub trait Api {
    fn state(&self, pid: u32) -> Result<ProcessState, DriverError>;
    fn lock(&self, pid: u32, timeout: Duration) -> Result<(), DriverError>;
    fn checkpoint(&self, pid: u32) -> Result<(), DriverError>;
    fn restore(&self, pid: u32) -> Result<(), DriverError>;
    fn unlock(&self, pid: u32) -> Result<(), DriverError>;
}

impl Api for Driver {
    fn state(&self, pid: u32) -> Result<ProcessState, DriverError> {
        Driver::state(self, pid)
    }
    fn lock(&self, pid: u32, timeout: Duration) -> Result<(), DriverError> {
        Driver::lock(self, pid, timeout)
    }
    fn checkpoint(&self, pid: u32) -> Result<(), DriverError> {
        Driver::checkpoint(self, pid)
    }
    fn restore(&self, pid: u32) -> Result<(), DriverError> {
        Driver::restore(self, pid)
    }
    fn unlock(&self, pid: u32) -> Result<(), DriverError> {
        Driver::unlock(self, pid)
    }
}

/// A suspension the driver refused part way.
#[derive(Debug, PartialEq, Eq)]
pub struct Failed {
    /// The member whose lock or checkpoint failed.
    pub pid: u32,
    /// The driver's words.
    pub why: String,
    /// The members the undo could not bring back to running (a restore without room, an
    /// unlock refused): still suspended by the driver, so their group must be recorded as
    /// suspended and resumed later, never as running.
    pub left: Vec<u32>,
    /// The failure was a lock that timed out (`CUDA_ERROR_NOT_READY`, or cuda.h's
    /// `CUDA_ERROR_TIMEOUT`, from `cuCheckpointProcessLock`: the member's calls under way
    /// outlasted its bound), not a refusal: the policy passes the group over only briefly
    /// (`refusal::Kind::Timeout`).
    pub timed_out: bool,
}

/// Locks every process (each lock waiting at most `timeout` for the calls under way), then
/// checkpoints each, in the order given; on any failure what was done is undone and checked
/// (`put_back`).
pub fn checkpoint_all(d: &(impl Api + ?Sized), pids: &[u32], timeout: Duration) -> Result<(), Failed> {
    checkpoint_within(d, pids, LockWait::each(timeout))
}

/// `checkpoint_all`, each lock waiting as `wait` allows when it starts. A lock that times out
/// leaves its target running (cuda.h: "left in the RUNNING state"); those locked before it are
/// unlocked, so the group runs as before.
pub fn checkpoint_within(d: &(impl Api + ?Sized), pids: &[u32], wait: LockWait) -> Result<(), Failed> {
    let mut locked = Vec::new();
    let mut failure = None;
    let mut timed_out = false;
    for &pid in pids {
        match d.lock(pid, wait.at(Instant::now())) {
            Ok(()) => locked.push(pid),
            Err(e) => {
                // The driver's own code, never its text: only the lock's timeout counts.
                timed_out = e.lock_timed_out();
                failure = Some((pid, e.to_string()));
                break;
            }
        }
    }
    let mut checkpointed = Vec::new();
    if failure.is_none() {
        for &pid in &locked {
            match d.checkpoint(pid) {
                Ok(()) => checkpointed.push(pid),
                Err(e) => {
                    failure = Some((pid, e.to_string()));
                    break;
                }
            }
        }
    }
    match failure {
        None => Ok(()),
        Some((pid, why)) => Err(Failed { pid, why, left: put_back(d, &locked, &checkpointed), timed_out }),
    }
}

/// Undoes a suspension that failed part way: restores the members that were checkpointed,
/// unlocks those locked, then asks the driver about each. Those not running afterwards are
/// returned (logged): the caller keeps them recorded as suspended.
fn put_back(d: &(impl Api + ?Sized), locked: &[u32], checkpointed: &[u32]) -> Vec<u32> {
    for &pid in checkpointed {
        if let Err(e) = d.restore(pid) {
            // Left checkpointed (the simulated and the real driver's restore is all or nothing);
            // its unlock would be refused: it waits for its group's resume instead.
            tracing::error!("pid {pid}: its memory could not be put back on the device after its group's suspension failed: {e}");
        }
    }
    let mut left = Vec::new();
    for &pid in locked {
        if d.state(pid) == Ok(ProcessState::Locked) {
            if let Err(e) = d.unlock(pid) {
                tracing::error!("pid {pid}: could not be unlocked after its group's suspension failed: {e}");
            }
        }
        match d.state(pid) {
            Ok(ProcessState::Running) if checkpointed.contains(&pid) => {
                tracing::info!("pid {pid}: put back (restored and unlocked) after its group's suspension failed part way: it runs as before")
            }
            Ok(ProcessState::Running) => {}
            // Gone meanwhile: nothing of it is left to resume.
            Err(e) if e.no_cuda_state() => {}
            other => {
                tracing::error!("pid {pid}: not running after its group's failed suspension was undone (the driver says {other:?}): it stays suspended until its group is resumed");
                left.push(pid);
            }
        }
    }
    left
}

/// Restores every process (all or none: one that does not fit sends the others back out), then
/// unlocks them. A process that is only locked (a failed suspension's undo left it so) has
/// nothing to restore and is unlocked.
pub fn restore_all(d: &(impl Api + ?Sized), pids: &[u32]) -> Result<(), String> {
    let mut restored = Vec::new();
    for &pid in pids {
        if d.state(pid) == Ok(ProcessState::Locked) {
            continue;
        }
        if let Err(e) = d.restore(pid) {
            for &back in &restored {
                let _ = d.checkpoint(back);
            }
            let why = if e.code == OUT_OF_MEMORY { format!("{e}: the device lacks room for its memory") } else { e.to_string() };
            return Err(why);
        }
        restored.push(pid);
    }
    for &pid in pids {
        d.unlock(pid).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{NOT_READY, TIMEOUT};
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};

    /// The driver's state machine (cuda.h), with calls made to fail on chosen pids.
    #[derive(Default)]
    struct Fake {
        states: RefCell<BTreeMap<u32, ProcessState>>,
        fail_lock: BTreeSet<u32>,
        /// The code a failing lock answers (0: the real driver's timeout, `NOT_READY`).
        lock_code: u32,
        fail_checkpoint: BTreeSet<u32>,
        fail_restore: RefCell<BTreeSet<u32>>,
        /// The timeout each lock was given, in order.
        timeouts: RefCell<Vec<Duration>>,
    }

    fn err(code: u32, what: &str, pid: u32) -> DriverError {
        DriverError { code, text: format!("{what}(pid {pid}) failed ({code})") }
    }

    impl Fake {
        fn with(pids: &[u32]) -> Fake {
            let f = Fake::default();
            f.states.borrow_mut().extend(pids.iter().map(|&p| (p, ProcessState::Running)));
            f
        }
        fn step(&self, pid: u32, what: &str, from: ProcessState, to: ProcessState, fails: bool, code: u32) -> Result<(), DriverError> {
            let mut s = self.states.borrow_mut();
            let now = s.get_mut(&pid).ok_or_else(|| err(1, what, pid))?;
            if fails {
                return Err(err(code, what, pid));
            }
            if *now != from {
                return Err(err(401, what, pid));
            }
            *now = to;
            Ok(())
        }
        fn states(&self) -> Vec<ProcessState> {
            self.states.borrow().values().copied().collect()
        }
    }

    impl Api for Fake {
        fn state(&self, pid: u32) -> Result<ProcessState, DriverError> {
            self.states.borrow().get(&pid).copied().ok_or_else(|| err(1, "state", pid))
        }
        fn lock(&self, pid: u32, timeout: Duration) -> Result<(), DriverError> {
            self.timeouts.borrow_mut().push(timeout);
            self.step(
                pid,
                "lock",
                ProcessState::Running,
                ProcessState::Locked,
                self.fail_lock.contains(&pid),
                if self.lock_code == 0 { NOT_READY } else { self.lock_code },
            )
        }
        fn checkpoint(&self, pid: u32) -> Result<(), DriverError> {
            self.step(pid, "checkpoint", ProcessState::Locked, ProcessState::Checkpointed, self.fail_checkpoint.contains(&pid), 801)
        }
        fn restore(&self, pid: u32) -> Result<(), DriverError> {
            self.step(pid, "restore", ProcessState::Checkpointed, ProcessState::Locked, self.fail_restore.borrow().contains(&pid), OUT_OF_MEMORY)
        }
        fn unlock(&self, pid: u32) -> Result<(), DriverError> {
            self.step(pid, "unlock", ProcessState::Locked, ProcessState::Running, false, 0)
        }
    }

    use ProcessState::{Checkpointed, Locked, Running};

    #[test]
    fn a_checkpoint_that_fails_part_way_puts_every_member_back_running() {
        let d = Fake { fail_checkpoint: [3].into(), ..Fake::with(&[1, 2, 3]) };
        let f = checkpoint_all(&d, &[1, 2, 3], LOCK_TIMEOUT).unwrap_err();
        assert_eq!((f.pid, f.left), (3, vec![]), "{}", f.why);
        assert!(f.why.contains("checkpoint(pid 3)"), "{}", f.why);
        assert!(!f.timed_out, "a refused checkpoint is no timeout");
        assert_eq!(d.states(), [Running, Running, Running], "1 and 2 were checkpointed, then restored and unlocked");
    }

    #[test]
    fn a_lock_that_fails_unlocks_those_locked_before_it() {
        let d = Fake { fail_lock: [2].into(), ..Fake::with(&[1, 2, 3]) };
        let f = checkpoint_all(&d, &[1, 2, 3], LOCK_TIMEOUT).unwrap_err();
        assert_eq!((f.pid, f.left), (2, vec![]));
        assert_eq!(d.states(), [Running, Running, Running]);
    }

    /// The undo's restore finds no room (another process took the memory the checkpoint freed):
    /// that member is reported left suspended, never "running", and the group's later resume
    /// brings it back.
    #[test]
    fn a_member_that_cannot_be_put_back_is_reported_left_and_is_resumed_later() {
        let d = Fake { fail_checkpoint: [3].into(), fail_restore: RefCell::new([1].into()), ..Fake::with(&[1, 2, 3]) };
        let f = checkpoint_all(&d, &[1, 2, 3], LOCK_TIMEOUT).unwrap_err();
        assert_eq!((f.pid, &f.left), (3, &vec![1]));
        assert_eq!(d.states(), [Checkpointed, Running, Running]);
        d.fail_restore.borrow_mut().clear();
        restore_all(&d, &f.left).unwrap();
        assert_eq!(d.states(), [Running, Running, Running]);
    }

    #[test]
    fn a_resume_unlocks_a_member_left_only_locked() {
        let d = Fake::with(&[1, 2]);
        d.lock(1, LOCK_TIMEOUT).unwrap();
        d.lock(2, LOCK_TIMEOUT).unwrap();
        d.checkpoint(2).unwrap();
        assert_eq!(d.states(), [Locked, Checkpointed]);
        restore_all(&d, &[1, 2]).unwrap();
        assert_eq!(d.states(), [Running, Running]);
    }

    /// A member that exited before the driver got to it: the lock fails (no CUDA state), the
    /// other is unlocked, and nothing is left.
    #[test]
    fn a_member_gone_meanwhile_is_not_left() {
        let d = Fake::with(&[1, 2]);
        d.states.borrow_mut().remove(&2);
        let f = checkpoint_all(&d, &[1, 2], LOCK_TIMEOUT).unwrap_err();
        assert_eq!((f.pid, f.left), (2, vec![]));
        assert!(!f.timed_out, "no CUDA state (INVALID_VALUE) is no timeout");
        assert_eq!(d.states(), [Running]);
    }

    /// The policy's bound (simulated clock: an `Instant` and offsets): each lock gets what is
    /// left of it, never more than `LOCK_TIMEOUT`, and never 0 (the driver's "no timeout")
    /// once it has run out; a manual suspension's locks get `LOCK_TIMEOUT` each.
    #[test]
    fn a_lock_waits_no_longer_than_the_bound_allows_and_never_without_a_timeout() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let within = LockWait::within(t0 + ms(2500));
        assert_eq!(within.at(t0), ms(2500));
        assert_eq!(within.at(t0 + ms(2000)), ms(500));
        assert_eq!(within.at(t0 + ms(2500)), MIN_LOCK_WAIT, "run out: 1 ms, not 0");
        assert_eq!(within.at(t0 + ms(9000)), MIN_LOCK_WAIT);
        assert_eq!(LockWait::within(t0 + ms(60_000)).at(t0), LOCK_TIMEOUT, "never longer than a manual suspension's");
        assert_eq!(LockWait::each(LOCK_TIMEOUT).at(t0 + ms(60_000)), LOCK_TIMEOUT, "a manual suspension: each lock its 10 s");

        // Through `checkpoint_within`: a bound already over still locks with a timeout.
        let d = Fake::with(&[1, 2]);
        checkpoint_within(&d, &[1, 2], LockWait::within(t0)).unwrap();
        assert_eq!(*d.timeouts.borrow(), [MIN_LOCK_WAIT, MIN_LOCK_WAIT]);
        let d = Fake::with(&[1]);
        checkpoint_all(&d, &[1], LOCK_TIMEOUT).unwrap();
        assert_eq!(*d.timeouts.borrow(), [LOCK_TIMEOUT]);
    }

    /// A lock that times out (the member inside a long kernel) leaves every member running:
    /// the one whose lock timed out stays so (cuda.h), those locked before it are unlocked.
    /// The real driver answers `NOT_READY` (600) there (stop 24, H100, driver 580.159); cuda.h
    /// names `TIMEOUT` (909): both count. Another code from the lock is a refusal.
    #[test]
    fn a_lock_that_times_out_leaves_the_group_running() {
        for (code, timed_out) in [(0, true), (TIMEOUT, true), (801, false), (401, false)] {
            let d = Fake { fail_lock: [2].into(), lock_code: code, ..Fake::with(&[1, 2]) };
            let f = checkpoint_within(&d, &[1, 2], LockWait::within(Instant::now() + Duration::from_millis(2500))).unwrap_err();
            assert_eq!((f.pid, f.left), (2, vec![]));
            let shown = if code == 0 { NOT_READY } else { code };
            assert!(f.why.contains(&format!("({shown})")), "{}", f.why);
            assert_eq!(f.timed_out, timed_out, "lock code {shown}");
            assert_eq!(d.states(), [Running, Running]);
            assert!(d.timeouts.borrow().iter().all(|t| *t <= Duration::from_millis(2500)), "{:?}", d.timeouts.borrow());
        }
    }
}
