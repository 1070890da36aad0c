//! A group whose suspension was refused or failed, as the suspension policy sees it: the
//! process that blocked it and why, and for how long the policy passes the group over before it
//! tries it again (`PASS_OVER`).
//!
//! Why a bound, and why 30 s. What makes a suspension fail mostly lasts: a recorded export lasts
//! as long as its exporter, a member on the shim's path without an agent stays so, the host
//! memory bound holds until another group is resumed. Trying such a group for every request
//! makes each one pay the attempt first: microseconds for a refusal before any driver call, but
//! up to the lock's bound (a member inside a long kernel: half of the request's remaining wait,
//! `room::lock_budget`; a manual suspension's 10 s) plus the undo's copy back for a failure part
//! way, a large share of a request's default 5 s wait or more. A bound several default waits
//! long (six) lets a burst of requests pay once. What a bound too long costs: a group whose cause
//! went away in place (an export freed, a kernel ended) is passed over meanwhile, so the next
//! candidate goes in its place, or a request that only it could serve fails; 30 s is a quarter
//! of the longest wait a request may ask (120 s). Where the cause was a member, the group is a
//! candidate again at once when that process leaves it (what it did went with it), and an edit
//! of the group's marks (`gpuslice set --suspendable`) forgets the refusal.

use std::time::{Duration, Instant};

/// How long the policy passes over a group whose suspension was refused or failed.
pub const PASS_OVER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub at: Instant,
    /// The member that blocked it; `None` where the group as a whole was refused (the host
    /// memory bound).
    pub pid: Option<u32>,
    pub why: String,
}

impl Refusal {
    /// How much longer, at `now`, the policy passes the group over: until `PASS_OVER` after the
    /// refusal, or not at all once the process that blocked it is not among the group's
    /// registered `members` any more. `None`: it is a candidate.
    pub fn passed_over(&self, now: Instant, members: &[u32]) -> Option<Duration> {
        if self.pid.is_some_and(|p| !members.contains(&p)) {
            return None;
        }
        (self.at + PASS_OVER).checked_duration_since(now).filter(|left| !left.is_zero())
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

    /// On a simulated clock: `Instant` plus whole seconds.
    #[test]
    fn a_refusal_passes_the_group_over_for_the_bound_then_it_is_a_candidate_again() {
        let t0 = Instant::now();
        let r = Refusal { at: t0, pid: Some(42), why: "exports memory".into() };
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(r.passed_over(t0, &[41, 42]), Some(PASS_OVER));
        assert_eq!(r.passed_over(at(10), &[41, 42]), Some(PASS_OVER - Duration::from_secs(10)));
        assert_eq!(r.passed_over(at(29), &[42]), Some(Duration::from_secs(1)));
        assert_eq!(r.passed_over(at(30), &[42]), None, "the bound is over");
        assert_eq!(r.passed_over(at(300), &[42]), None);
    }

    #[test]
    fn the_group_is_a_candidate_again_once_the_process_that_blocked_it_left() {
        let t0 = Instant::now();
        let r = Refusal { at: t0, pid: Some(42), why: "exports memory".into() };
        assert_eq!(r.passed_over(t0 + Duration::from_secs(1), &[41]), None);
        assert_eq!(r.describe(), "pid 42: exports memory");
        // A refusal of the group as a whole holds whoever its members are.
        let r = Refusal { at: t0, pid: None, why: "over the host memory bound".into() };
        assert_eq!(r.passed_over(t0 + Duration::from_secs(1), &[]), Some(PASS_OVER - Duration::from_secs(1)));
        assert_eq!(r.describe(), "over the host memory bound");
    }
}
