//! The controller's side of the members' suspend agents (issue 22, the shim's path): requests
//! addressed to chosen members (each member's own `ProcessSlot::suspend_request`, then the
//! group's word rung), their answers, the NVML check of a "suspended" answer, and bringing
//! agents back — so that no process is ever left behind its closed gate while the controller
//! believes it runs, and no process is suspended by its agent and the driver's checkpoint at
//! once.

use crate::process::alive;
use crate::state::lock_state;
use crate::state::State;
use gpuslice_common::ledger::{self as ledger, suspend_request, ProcessSlot, PHASES, PHASE_NAMES};
use gpuslice_common::protocol::AgentRow;
use gpuslice_common::size::format_size;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the controller waits for the agents' answers: the gate's 10 s for calls in
/// flight, then the copy (80 GB at 20 GB/s is 4 s; at the pinning-bound worst, 16 s).
const DEADLINE: Duration = Duration::from_secs(60);
/// How late after its gate's bound an agent's "busy" answer may come and still count as a
/// timeout (`Failure::timed_out`): the ring's wake-up and the answer's write, with room for a
/// loaded host. Later, it counts as a lasting refusal.
const BUSY_SLACK: Duration = Duration::from_secs(1);
/// How much more than what a suspended member says it keeps (plus what it held beyond its
/// report before) NVML may show before its answer is disbelieved: the cross-check's tolerance.
pub const TOLERANCE: u64 = crate::crosscheck::TOLERANCE;

/// One member's answer, as its agent wrote it in its slot.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// Device bytes moved (the mapped, rounded sizes) and in how many allocations.
    pub bytes: u64,
    pub ranges: u32,
    /// What it says it keeps on the device while suspended (meaningful after a suspension).
    pub keep: u64,
    /// How long the agent took, and where the time went (µs by `ledger::PHASE_*`).
    pub ms: u32,
    pub phase_us: [u32; PHASES],
}

/// A failed request: why, and the members that stay suspended by their agents all the same
/// (they could not be brought back: the controller must keep them recorded as suspended).
pub struct Failure {
    pub why: String,
    pub stuck: BTreeMap<u32, usize>,
    /// The first member whose agent did not answer as asked.
    pub pid: Option<u32>,
    /// A suspension's gates timed out: every agent that failed answered "busy"
    /// (`SUSPEND_ERR_BUSY`: calls in flight did not finish within the bound it was given), and
    /// within that bound plus `BUSY_SLACK`. The answer is the tenant's word (its slot is
    /// writable), so it is believed only as far as it costs no more than a true timeout: a
    /// "busy" that comes late is a lasting refusal (`refusal::Kind`).
    pub timed_out: bool,
}

/// One round: who answered as asked, and why the others did not.
struct Round {
    done: BTreeMap<u32, Answer>,
    errors: Vec<String>,
    /// The member of the first error.
    first: Option<u32>,
    /// How many of `errors` were "busy" answers (`SUSPEND_ERR_BUSY`).
    busy: usize,
}

/// Process slot `slot` of the controller's ledger, for the controller's life.
fn slot_of(state: &State, slot: usize) -> &'static ProcessSlot {
    let p: &ProcessSlot = state.ledger.process(slot);
    // SAFETY: the ledger's mapping is never unmapped while the controller runs.
    unsafe { &*(p as *const ProcessSlot) }
}

fn read_answer(p: &ProcessSlot) -> Answer {
    Answer {
        bytes: p.suspend_bytes.load(Relaxed),
        ranges: p.suspend_ranges.load(Relaxed),
        keep: p.suspend_keep.load(Relaxed),
        ms: p.suspend_ms.load(Relaxed),
        phase_us: std::array::from_fn(|i| p.suspend_phase_us[i].load(Relaxed)),
    }
}

/// The generation after the one in `word` (28 bits, never 0: 0 means "never asked").
fn next_generation(word: u32) -> u32 {
    let next = ((word >> 1) + 1) & 0x0fff_ffff;
    next.max(1)
}

fn describe_failure(error: u32) -> String {
    let code = error >> 16;
    match error & 0xffff {
        ledger::SUSPEND_ERR_NO_ROOM => format!("no room on the device for its memory (CUDA error {code}); it stays suspended and is tried again later"),
        ledger::SUSPEND_ERR_BUSY => "CUDA calls in flight did not finish in time".to_string(),
        ledger::SUSPEND_ERR_DRIVER => format!("a driver call failed (CUDA error {code})"),
        ledger::SUSPEND_ERR_HOLE => "it was given a driver function that bypasses the suspend gate, so its agent refuses (`suspend_path = \"auto\"` lets the driver's checkpoint suspend it)".to_string(),
        other => format!("failed (reason {other})"),
    }
}

/// Writes each of `members`' own request (suspended or running) under a new generation, with
/// how long its gate may wait for its calls in flight (`gate`, a suspension's; `None`: the
/// agent's own 10 s), rings the group's word and waits for every answer, with one deadline for
/// all.
fn round(state: &Mutex<State>, group_slot: usize, members: &BTreeMap<u32, usize>, suspended: bool, gate: Option<Duration>) -> Round {
    let (generation, slots) = {
        let state = lock_state(state);
        // Checked before any member's word is written: an agent rechecks its own word every
        // second, ring or not, and must never act on a request nobody waits for.
        if !state.has_settings(group_slot) {
            return Round { done: BTreeMap::new(), errors: vec!["the group has no settings page to ask its members through".into()], first: None, busy: 0 };
        }
        let generation = next_generation(state.suspend_request(group_slot));
        let word = suspend_request(generation, suspended);
        let slots: Vec<(u32, &'static ProcessSlot)> = members.iter().map(|(&pid, &slot)| (pid, slot_of(&state, slot))).collect();
        // The gate's bound before the request (the agent reads it after the request, Acquire).
        let gate_ms = gate.map_or(0, |g| g.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        for (_, p) in &slots {
            p.suspend_gate_ms.store(gate_ms, Relaxed);
            p.suspend_request.store(word, Release);
        }
        // The ring after the requests: an agent that sees the new ring sees its request.
        state.set_suspend_request(group_slot, word);
        (generation, slots)
    };
    let target = if suspended { ledger::SUSPEND_SUSPENDED } else { ledger::SUSPEND_RUNNING };
    let deadline = Instant::now() + DEADLINE;
    let mut r = Round { done: BTreeMap::new(), errors: Vec::new(), first: None, busy: 0 };
    for (pid, p) in slots {
        loop {
            let word = p.suspend_ack.load(Acquire);
            let error = if word >> 4 == generation && (word & 0xf == target || word & 0xf == ledger::SUSPEND_FAILED) {
                if word & 0xf == target {
                    r.done.insert(pid, read_answer(p));
                    break;
                }
                let error = p.suspend_error.load(Relaxed);
                if error & 0xffff == ledger::SUSPEND_ERR_BUSY {
                    r.busy += 1;
                }
                format!("pid {pid}: {}", describe_failure(error))
            } else if !alive(pid) {
                format!("pid {pid} exited")
            } else if Instant::now() >= deadline {
                format!("pid {pid}: its agent did not answer within {} s", DEADLINE.as_secs())
            } else {
                gpuslice_common::turns::futex_wait(&p.suspend_ack, word, u32::MAX, 50_000_000);
                continue;
            };
            r.errors.push(error);
            r.first.get_or_insert(pid);
            break;
        }
    }
    r
}

/// The members whose agents hold them suspended now (`suspend_held`), alive.
pub fn holding(state: &State, members: impl IntoIterator<Item = (u32, usize)>) -> BTreeMap<u32, usize> {
    members.into_iter().filter(|&(pid, slot)| slot_of(state, slot).suspend_held.load(Acquire) == 1 && alive(pid)).collect()
}

/// Asks `members`' agents back (running) and waits; returns those still held suspended by
/// their agents afterwards (a failed resume: no room, a driver error, no answer).
pub fn bring_back(state: &Mutex<State>, group_slot: usize, members: &BTreeMap<u32, usize>) -> BTreeMap<u32, usize> {
    if members.is_empty() {
        return BTreeMap::new();
    }
    let r = round(state, group_slot, members, false, None);
    if !r.errors.is_empty() {
        tracing::warn!("asking suspend agents back: {}", r.errors.join("; "));
    }
    holding(&lock_state(state), members.iter().map(|(&p, &s)| (p, s)))
}

/// Asks `members`' agents to suspend (or resume) their processes, a suspension's gates waiting
/// at most `gate` for the calls in flight (an agent of an older shim waits its own 10 s); all
/// or nothing. A failed
/// suspension brings every addressed agent back (an agent that answered late, or not at all,
/// may have suspended all the same: its held word says so); those that cannot come back are
/// the failure's `stuck`. A failed resume asks the members that did resume to suspend again,
/// so that the group stays suspended as a whole (retried later).
pub fn ask(state: &Mutex<State>, group_slot: usize, members: &BTreeMap<u32, usize>, suspended: bool, gate: Duration) -> Result<BTreeMap<u32, Answer>, Failure> {
    let started = Instant::now();
    let r = round(state, group_slot, members, suspended, Some(gate));
    if r.errors.is_empty() {
        return Ok(r.done);
    }
    let why = r.errors.join("; ");
    if suspended {
        let timed_out = timed_out(r.busy, r.errors.len(), started.elapsed(), gate);
        return Err(Failure { why, stuck: bring_back(state, group_slot, members), pid: r.first, timed_out });
    }
    let again: BTreeMap<u32, usize> = members.iter().filter(|(pid, _)| r.done.contains_key(pid)).map(|(&p, &s)| (p, s)).collect();
    if !again.is_empty() {
        let back = round(state, group_slot, &again, true, Some(gate));
        if !back.errors.is_empty() {
            tracing::warn!("suspending again the members that did resume: {}", back.errors.join("; "));
        }
    }
    Err(Failure { why, stuck: BTreeMap::new(), pid: r.first, timed_out: false })
}

/// Whether a suspension round that failed with `errors` answers, `busy` of them "busy", after
/// `took`, was a timeout of the gates given `gate`: every failure a "busy", in time.
fn timed_out(busy: usize, errors: usize, took: Duration, gate: Duration) -> bool {
    errors > 0 && busy == errors && took <= gate.saturating_add(BUSY_SLACK)
}

/// The check of one "suspended" answer against NVML: what the process holds now must be at
/// most what its agent says it keeps (capped at what it reported before: it cannot keep more
/// than it had), plus what NVML showed it hold beyond its report before the suspension (memory
/// the shim does not see: driver-internal allocations, which cannot move either), plus the
/// cross-check's tolerance; and the bytes it says it moved must have left the device (within
/// the tolerance), so that "I keep everything" does not pass for a suspension that moved
/// something.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub nvml_after: Option<u64>,
    pub allowed: Option<u64>,
    pub believed: bool,
}

pub fn judge(answer: &Answer, reported_before: u64, nvml_before: Option<&HashMap<u32, u64>>, nvml_after: Option<&HashMap<u32, u64>>, pid: u32) -> Verdict {
    let (Some(before), Some(after)) = (nvml_before, nvml_after) else {
        // No NVML: nothing to judge by (the cross-check cannot run either).
        return Verdict { nvml_after: None, allowed: None, believed: true };
    };
    let now = after.get(&pid).copied().unwrap_or(0);
    let was = before.get(&pid).copied().unwrap_or(0);
    let unseen = was.saturating_sub(reported_before);
    let allowed = answer.keep.min(reported_before).saturating_add(unseen).saturating_add(TOLERANCE);
    let left = was.saturating_sub(now);
    Verdict { nvml_after: Some(now), allowed: Some(allowed), believed: now <= allowed && left.saturating_add(TOLERANCE) >= answer.bytes }
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1e3
}

/// The phases of one direction, for logs: "gate 1.0 ms, sync 0.2 ms, ...".
pub fn describe_phases(answer: &Answer, suspension: bool) -> String {
    phases(suspension).map(|p| format!("{} {:.1} ms", PHASE_NAMES[p], ms(answer.phase_us[p]))).collect::<Vec<_>>().join(", ")
}

fn phases(suspension: bool) -> impl Iterator<Item = usize> {
    let list: &'static [usize] = if suspension { &ledger::PHASES_OUT } else { &ledger::PHASES_IN };
    list.iter().copied()
}

/// The `ls --json` row of one member suspended by its agent.
pub fn row(pid: u32, answer: &Answer, verdict: &Verdict) -> AgentRow {
    AgentRow {
        pid,
        bytes: answer.bytes,
        ranges: answer.ranges,
        keep: answer.keep,
        nvml_after: verdict.nvml_after,
        allowed: verdict.allowed,
        suspend_ms: Some(f64::from(answer.ms)),
        resume_ms: None,
        phases_ms: phases(true).map(|p| (PHASE_NAMES[p].to_string(), ms(answer.phase_us[p]))).collect(),
    }
}

/// Adds a resume's figures to a member's row.
pub fn add_resume(row: &mut AgentRow, answer: &Answer) {
    row.resume_ms = Some(f64::from(answer.ms));
    for p in phases(false) {
        row.phases_ms.insert(PHASE_NAMES[p].to_string(), ms(answer.phase_us[p]));
    }
}

/// "16.03 GiB in 1234 allocations in 6117 ms (2.80 GB/s; gate ..., ...)" for a log line.
pub fn summary(answer: &Answer, suspension: bool) -> String {
    let gbps = if answer.ms > 0 { answer.bytes as f64 / (f64::from(answer.ms) / 1e3) / 1e9 } else { 0.0 };
    format!("{} in {} allocations in {} ms ({gbps:.2} GB/s; {})", format_size(answer.bytes), answer.ranges, answer.ms, describe_phases(answer, suspension))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn answer(keep: u64) -> Answer {
        Answer { bytes: 0, ranges: 1, keep, ms: 1, phase_us: [0; PHASES] }
    }

    /// The H100 run's figures: 16.53 GiB reported (518 MiB of it the context), NVML 96 MiB
    /// more before; after the agent moved 16.03 GiB, NVML showed 614 MiB.
    #[test]
    fn what_cannot_move_is_allowed_and_a_liar_is_not() {
        let reported = 16_926 * MIB; // 16.53 GiB
        let before = HashMap::from([(7, reported + 96 * MIB)]);
        let after = HashMap::from([(7, 614 * MIB)]);
        let moved_out = Answer { bytes: 17_207_132_160, ..answer(518 * MIB) };
        let v = judge(&moved_out, reported, Some(&before), Some(&after), 7);
        assert!(v.believed, "{v:?}");
        assert_eq!(v.allowed, Some((518 + 96) * MIB + TOLERANCE));
        // Claiming to keep nothing while 614 MiB stay: disbelieved.
        assert!(!judge(&answer(0), reported, Some(&before), Some(&after), 7).believed);
        // A claim beyond what it reported counts only up to the report.
        let everything = HashMap::from([(7, reported + 96 * MIB)]);
        assert!(
            judge(&answer(u64::MAX), reported, Some(&before), Some(&everything), 7).believed,
            "holding all it had is what it reported plus the unseen part"
        );
        let more = HashMap::from([(7, reported + 96 * MIB + TOLERANCE + MIB)]);
        assert!(!judge(&answer(u64::MAX), reported, Some(&before), Some(&more), 7).believed, "but never more than that");
        // Claiming to have moved bytes that did not leave the device: disbelieved.
        let moved = Answer { bytes: 8 << 30, ..answer(u64::MAX) };
        assert!(!judge(&moved, reported, Some(&before), Some(&everything), 7).believed);
        let gone = HashMap::from([(7, reported + 96 * MIB - (8 << 30))]);
        assert!(judge(&moved, reported, Some(&before), Some(&gone), 7).believed);
        // Without NVML there is nothing to judge by.
        assert!(judge(&answer(0), reported, None, Some(&after), 7).believed);
    }

    /// Only a round whose every failure is a "busy" answer that came in time is a timeout: a
    /// member that refused for another reason (no gate for a bypassing function, a driver
    /// error, no answer) makes it a lasting refusal, and so does a "busy" that came late (a
    /// tenant's word that would otherwise make each attempt cost more than a true timeout).
    #[test]
    fn a_round_is_a_timeout_only_when_every_failure_is_busy_and_in_time() {
        let ms = Duration::from_millis;
        assert!(timed_out(1, 1, ms(2510), ms(2500)));
        assert!(timed_out(2, 2, ms(3400), ms(2500)), "within the slack");
        assert!(!timed_out(1, 2, ms(2510), ms(2500)), "another member refused for another reason");
        assert!(!timed_out(1, 1, ms(2500) + BUSY_SLACK + ms(1), ms(2500)), "too late to be the gate's timeout");
        assert!(!timed_out(0, 0, ms(1), ms(2500)), "nothing failed");
    }

    #[test]
    fn generations_skip_zero() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(suspend_request(0x0fff_ffff, true)), 1);
        assert_eq!(next_generation(suspend_request(5, false)), 6);
    }
}
