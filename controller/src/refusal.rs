//! A group whose suspension was refused or failed, as the suspension policy sees it: the
//! process that blocked it and why, which kind of refusal it was (`Kind`: lasting, or a lock
//! that timed out), and for how long the policy passes the group over before it tries it again.
//!
//! Lasting refusals: 30 s (`PASS_OVER`). What makes them fail mostly lasts: a recorded export
//! lasts as long as its exporter, a member on the shim's path without an agent stays so, the
//! host memory bound holds until another group is resumed, a checkpoint the driver refused is
//! refused again. Trying such a group for every request makes each one pay the attempt first:
//! microseconds for a refusal before any driver call, but the lock's bound plus the undo's copy
//! back for a failure part way. A bound several default waits long (six) lets a burst of
//! requests pay once. What a bound too long costs: a group whose cause went away in place (an
//! export freed) is passed over meanwhile, so the next candidate goes in its place, or a request
//! that only it could serve fails; 30 s is a quarter of the longest wait a request may ask
//! (120 s).
//!
//! A lock that timed out (`Kind::Timeout`: the driver's `cuCheckpointProcessLock` answered
//! `CUDA_ERROR_NOT_READY` (cuda.h names `CUDA_ERROR_TIMEOUT`; both count), or an agent's gate
//! did not close within its bound) is no lasting refusal: a member was inside a call (a long
//! kernel) that may end a moment later. Such a group is passed over **for as long as its locks
//! were allowed to wait** (`Kind::pass_over`: the bound the attempt was given,
//! `room::lock_budget`, 2.5 s at the default 5 s wait; a manual suspension's 10 s), at least
//! `TIMEOUT_FLOOR`, never more than `PASS_OVER`. Why that bound:
//! - requests queued behind the one that timed out do not each pay the same long kernel: after
//!   an attempt that waited B, the group is skipped for B, so over a kernel of any length at
//!   most half of the time goes to waiting on that group's locks (one attempt per 2B), and a
//!   burst of requests arriving within B pays once;
//! - a group whose kernel ended is a candidate again within B, the same span its last attempt
//!   was willing to wait for it; a request that only this group could serve fails for at most B
//!   (it failed for 30 s before), and the next attempt, if the kernel still runs, waits longer
//!   only if its own request's wait allows;
//! - not "until the current request ends": that request moves on at once after the timeout, so
//!   every queued request would try the same busy group again and pay up to half its wait;
//! - not a fixed few hundred ms: a request arriving just after it would pay B again although
//!   the kernel just proved to run for B more; `TIMEOUT_FLOOR` only keeps a burst from paying
//!   once each when the bound was tiny (a request with its wait spent).
//!
//! Where the cause was a member, the group is a candidate again at once when that process
//! leaves it (what it did went with it), and an edit of the group's marks (`gpuslice set
//! --suspendable`) forgets the refusal.
//!
//! Time here is the policy's clock (`now_ns`): CLOCK_MONOTONIC, or, in the integration tests
//! that run on the simulated clock, its virtual time (`lease_clock`), so that how long a group
//! is passed over is judged on the time the simulated kernels run on.

use std::time::Duration;

/// How long the policy passes over a group whose suspension was refused or failed for a lasting
/// cause (and the most it passes over any group).
pub const PASS_OVER: Duration = Duration::from_secs(30);
/// The least a timed-out lock passes its group over (see the module's comment).
pub const TIMEOUT_FLOOR: Duration = Duration::from_millis(250);

/// The policy's clock, ns: CLOCK_MONOTONIC, or the simulated clock's virtual time under the
/// integration tests (`lease_clock`).
pub fn now_ns() -> u64 {
    crate::lease_clock::now_ns()
}

/// Which kind of refusal, by what the controller received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Any refusal or failure but a timed-out lock: an export, the host bound, no agent, a
    /// checkpoint refused, an agent that did not answer.
    Lasting,
    /// A member's calls under way did not end within the bound its locks (or its agent's gate)
    /// were given, `waited`: the driver's `CUDA_ERROR_NOT_READY` (or cuda.h's
    /// `CUDA_ERROR_TIMEOUT`) from the lock, or an agent's "busy" answer that came within that
    /// bound (`agents::ask`).
    Timeout { waited: Duration },
}

impl Kind {
    /// How long the policy passes the group over after a refusal of this kind.
    pub fn pass_over(self) -> Duration {
        match self {
            Kind::Lasting => PASS_OVER,
            Kind::Timeout { waited } => waited.clamp(TIMEOUT_FLOOR, PASS_OVER),
        }
    }

    /// `lasting` or `timeout` (`ls --json`'s `refusal_kind`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lasting => "lasting",
            Kind::Timeout { .. } => "timeout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// When, on the policy's clock (`now_ns`).
    pub at_ns: u64,
    /// The member that blocked it; `None` where the group as a whole was refused (the host
    /// memory bound).
    pub pid: Option<u32>,
    pub why: String,
    pub kind: Kind,
}

impl Refusal {
    /// How much longer, at `now_ns`, the policy passes the group over: until its kind's
    /// `pass_over` after the refusal, or not at all once the process that blocked it is not
    /// among the group's registered `members` any more. `None`: it is a candidate.
    pub fn passed_over(&self, now_ns: u64, members: &[u32]) -> Option<Duration> {
        if self.pid.is_some_and(|p| !members.contains(&p)) {
            return None;
        }
        let until = self.at_ns.saturating_add(u64::try_from(self.kind.pass_over().as_nanos()).unwrap_or(u64::MAX));
        (until > now_ns).then(|| Duration::from_nanos(until - now_ns))
    }

    /// `pid N: why` or `why`, for messages.
    pub fn describe(&self) -> String {
        match self.pid {
            Some(pid) => format!("pid {pid}: {}", self.why),
            None => self.why.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulated clock: a base and whole seconds.
    const T0: u64 = 1_000_000_000_000;
    fn at(secs: u64) -> u64 {
        T0 + secs * 1_000_000_000
    }
    fn ms(ms: u64) -> u64 {
        T0 + ms * 1_000_000
    }

    fn refusal(kind: Kind) -> Refusal {
        Refusal { at_ns: T0, pid: Some(42), why: "exports memory".into(), kind }
    }

    #[test]
    fn a_refusal_passes_the_group_over_for_the_bound_then_it_is_a_candidate_again() {
        let r = refusal(Kind::Lasting);
        assert_eq!(r.passed_over(T0, &[41, 42]), Some(PASS_OVER));
        assert_eq!(r.passed_over(at(10), &[41, 42]), Some(PASS_OVER - Duration::from_secs(10)));
        assert_eq!(r.passed_over(at(29), &[42]), Some(Duration::from_secs(1)));
        assert_eq!(r.passed_over(at(30), &[42]), None, "the bound is over");
        assert_eq!(r.passed_over(at(300), &[42]), None);
    }

    /// A lock that timed out after waiting 2.5 s (the default wait's first candidate) passes
    /// its group over for 2.5 s, not 30: a request 10 s later (the kernel may have ended) tries
    /// it again. A tiny bound still passes it over for `TIMEOUT_FLOOR`; a manual suspension's
    /// 10 s for 10 s; nothing for longer than a lasting refusal.
    #[test]
    fn a_timed_out_lock_passes_the_group_over_only_as_long_as_its_locks_waited() {
        let waited = |ms: u64| Kind::Timeout { waited: Duration::from_millis(ms) };
        let r = refusal(waited(2500));
        assert_eq!(r.kind.name(), "timeout");
        assert_eq!(r.passed_over(T0, &[42]), Some(Duration::from_millis(2500)));
        assert_eq!(r.passed_over(ms(2499), &[42]), Some(Duration::from_millis(1)));
        assert_eq!(r.passed_over(ms(2500), &[42]), None, "a candidate again once its bound is over");
        assert_eq!(r.passed_over(at(10), &[42]), None, "well within the 30 s of a lasting refusal");
        assert_eq!(refusal(Kind::Lasting).passed_over(at(10), &[42]), Some(Duration::from_secs(20)));
        assert_eq!(refusal(Kind::Lasting).kind.name(), "lasting");

        assert_eq!(waited(1).pass_over(), TIMEOUT_FLOOR, "a bound already spent: the floor");
        assert_eq!(waited(10_000).pass_over(), Duration::from_secs(10), "a manual suspension's lock");
        assert_eq!(waited(120_000).pass_over(), PASS_OVER, "never longer than a lasting refusal");
        // The member inside the kernel left the group: a candidate at once, as for any kind.
        assert_eq!(refusal(waited(2500)).passed_over(T0, &[41]), None);
    }

    #[test]
    fn the_group_is_a_candidate_again_once_the_process_that_blocked_it_left() {
        let r = refusal(Kind::Lasting);
        assert_eq!(r.passed_over(at(1), &[41]), None);
        assert_eq!(r.describe(), "pid 42: exports memory");
        // A refusal of the group as a whole holds whoever its members are.
        let r = Refusal { at_ns: T0, pid: None, why: "over the host memory bound".into(), kind: Kind::Lasting };
        assert_eq!(r.passed_over(at(1), &[]), Some(PASS_OVER - Duration::from_secs(1)));
        assert_eq!(r.describe(), "over the host memory bound");
    }
}
