//! The suspension policy (issue 22): when a process's allocation finds the device full (not its
//! own quota), lower-priority suspendable groups are suspended, lowest priority and least
//! recently active first (`activity`: on the driver's evidence, not the members' counters), one
//! at a time until the request fits; they are resumed when room returns. The request waits a
//! bounded time meanwhile instead of failing at once. A group whose suspension is refused or
//! fails is put back whole (`suspend`) and passed over for a while (`refusal`: 30 s for a
//! lasting refusal, only as long as its locks waited for a timed-out lock): the request goes on
//! with the next candidate. A candidate's locks wait for its members' calls under way
//! only as long as the request's wait allows (`lock_budget`), leaving time for the next one.

use crate::activity::{self, GroupNow, Tracker};
use crate::device_memory::{device_uuids, free_on, nvml, room_for};
use crate::refusal::{Kind, Refusal};
use crate::state::lock_state;
use crate::state::{Peer, State};
use crate::suspend::{self, Phase};
use crate::suspend_driver::{LockWait, LOCK_TIMEOUT};
use gpuslice_common::protocol::RoomRequest;
use gpuslice_common::size::format_size;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest a request may ask to wait (its own `wait_ms` is capped here).
const MAX_WAIT: Duration = Duration::from_secs(120);
/// How often a waiting request and the watcher look at the device again.
const POLL: Duration = Duration::from_millis(50);
/// A group the policy suspended stays so for at least this long: the request it made room for
/// must have time to take the room before the watcher sees it free.
const RESUME_HOLDOFF: Duration = Duration::from_secs(1);
/// The least a candidate's locks are given (`lock_budget`), however little of the request's
/// wait is left: enough for the calls under way in a process between ordinary kernels (a
/// lock that waits on them is not a refusal worth passing the group over for 30 s), and the
/// most a request can run past its wait for it.
const LOCK_FLOOR: Duration = Duration::from_millis(250);

/// How long one candidate's locks (the driver's, and its agents' gates) may wait for its
/// members' calls under way, `left` of the request's wait remaining. Half of it where the
/// candidates after this one could make the room without it (`others_suffice`): a candidate
/// inside a long kernel then costs at most half, and the next one still has as long as it
/// had, for its own locks and its copy to host memory (the copy is not bounded: a suspension
/// that got its locks is not undone for time). All of it where they could not: this one is
/// needed either way, and a refusal fails the request anyway. Never less than `LOCK_FLOOR`,
/// never more than a manual suspension's `LOCK_TIMEOUT`. With the default 5 s wait: 2.5 s for
/// the first of two candidates, then what is left for the second.
fn lock_budget(left: Duration, others_suffice: bool) -> Duration {
    let share = if others_suffice { left / 2 } else { left };
    share.clamp(LOCK_FLOOR, LOCK_TIMEOUT)
}

/// The groups' last evidence of activity (`activity`), kept by the watcher, read by the plan.
/// Taken after the state's lock where both are held, never before it.
fn tracker() -> std::sync::MutexGuard<'static, Tracker> {
    static TRACKER: OnceLock<Mutex<Tracker>> = OnceLock::new();
    TRACKER.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

/// What the tracker is told of each group: the controller's records only.
fn groups_now(state: &State) -> Vec<GroupNow> {
    state
        .groups
        .iter()
        .map(|(&slot, info)| GroupNow {
            slot,
            name: info.name.clone(),
            running: suspend::record(&info.name).is_none_or(|r| r.phase == Phase::Running),
            pids: state.watched.values().filter(|w| w.group == slot).map(|w| w.pid).collect(),
        })
        .collect()
}

/// A group that may be suspended for the request.
#[derive(Debug)]
struct Candidate {
    group: String,
    /// Its registered processes (the controller's records).
    pids: Vec<u32>,
    /// What its members' counter says it holds on the device: their word, used only where the
    /// driver's per-process figures cannot be read.
    reported: u64,
}

impl Candidate {
    /// The bytes a suspension of it would free on the device: what the driver shows its
    /// processes holding there (`held`), else (no per-process figures) its members' report.
    fn bytes(&self, held: Option<&HashMap<u32, u64>>) -> u64 {
        match held {
            Some(held) => self.pids.iter().filter_map(|p| held.get(p)).sum(),
            None => self.reported,
        }
    }
}

/// What the policy may do for one request.
#[derive(Debug)]
struct Plan {
    /// The requester's group and priority.
    group: String,
    priority: u32,
    /// The groups that may be suspended for it, in order.
    candidates: Vec<Candidate>,
    /// Groups that would be candidates but for a recent refusal: name, how long it is passed
    /// over still, and who refused and why.
    passed_over: Vec<(String, Duration, String)>,
}

/// The requester's group and priority, and the suspendable groups below it that have processes
/// on the device, in the order they are to be suspended: lowest priority first, then least
/// recently active (`activity`: the driver's evidence), then the group the controller saw
/// first, then slot. Nothing in this order is a member's word. A group whose suspension was
/// refused or failed lately is passed over (`Refusal::passed_over`, at `now_ns` on the
/// policy's clock, `refusal::now_ns`).
fn plan(state: &State, seen: &Tracker, now: Instant, now_ns: u64, peer: Peer, device: u32, bytes: u64) -> Result<Plan, String> {
    use gpuslice_common::ledger::Priority;
    let w = state
        .watched
        .values()
        .find(|w| w.pid == peer.pid && w.uid == peer.uid)
        .ok_or_else(|| format!("pid {}: not a registered process; no room is made for it", peer.pid))?;
    let info = state.groups.get(&w.group).ok_or_else(|| format!("pid {}: its group is gone", peer.pid))?;
    let group = info.name.clone();
    // What the controller set, never what the process's slot says (a tenant can write that).
    let priority = Priority::from_u32(w.priority).or(Priority::from_u32(info.priority)).unwrap_or_default() as u32;
    // Room is made within the quota only: no tenant makes others move for more than it may hold.
    let limit = info.limits.get(device as usize).copied().unwrap_or(0).min(w.caps.get(device as usize).copied().unwrap_or(u64::MAX));
    if bytes > limit {
        return Err(format!("pid {} (group {group:?}): {} is over its limit on device {device}; no room is made", peer.pid, format_size(bytes)));
    }
    let mut candidates = Vec::new();
    let mut passed_over = Vec::new();
    for (&slot, info) in &state.groups {
        if info.name == group || (device as usize) >= state.ledger.group(slot).devices.len() {
            continue;
        }
        let reported = state.ledger.group(slot).devices[device as usize].used.load(Relaxed);
        let pids: Vec<u32> = state.watched.values().filter(|w| w.group == slot).map(|w| w.pid).collect();
        let group_priority = Priority::from_u32(info.priority).unwrap_or_default() as u32;
        let Some(rec) = suspend::record(&info.name).filter(|r| r.suspendable && r.phase == Phase::Running) else { continue };
        // Only processes hold memory: a group without any frees nothing. One whose members
        // report nothing is still asked about (the driver's figures decide, `Candidate::bytes`).
        if pids.is_empty() || group_priority >= priority {
            continue;
        }
        if let Some(left) = rec.passed_over(now_ns, &pids) {
            passed_over.push((info.name.clone(), left, rec.refusal.as_ref().map(Refusal::describe).unwrap_or_default()));
            continue;
        }
        let key = (group_priority, seen.rank(&info.name, now), slot);
        candidates.push((key, Candidate { group: info.name.clone(), pids, reported }));
    }
    candidates.sort_by_key(|c| c.0);
    passed_over.sort();
    Ok(Plan { group, priority, candidates: candidates.into_iter().map(|(_, c)| c).collect(), passed_over })
}

/// What the driver says each process holds on the device (`None`: its list cannot be read).
fn held_on(uuid: &str) -> Option<HashMap<u32, u64>> {
    let nvml = nvml().lock().unwrap_or_else(|p| p.into_inner());
    let list = nvml.as_ref()?.device_by_uuid(uuid).ok()?.running_compute_processes().ok()?;
    let mut held = HashMap::new();
    for p in list {
        if let nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
            *held.entry(p.pid).or_insert(0) += bytes;
        }
    }
    Some(held)
}

/// `MakeRoom`: suspends what must go for `room.bytes` to fit on the device, waiting at most
/// `room.wait_ms`; the answer says what was done, or why there is no room. A candidate whose
/// suspension is refused or fails is not tried again for this request, and (its refusal
/// recorded) not for others for a while: the next one is tried at once.
pub fn make_room(state: &std::sync::Mutex<State>, peer: Peer, room: RoomRequest) -> Result<String, String> {
    let started = Instant::now();
    let wait = Duration::from_millis(room.wait_ms).min(MAX_WAIT);
    let mut suspended = Vec::new();
    // Groups whose suspension failed during this request, whatever their records say (a group
    // that changed state meanwhile records no refusal): each is tried at most once.
    let mut failed: Vec<String> = Vec::new();
    loop {
        let (plan, uuid) = {
            let state = lock_state(state);
            let mut plan = plan(&state, &tracker(), Instant::now(), crate::refusal::now_ns(), peer, room.device, room.bytes)?;
            plan.candidates.retain(|c| !failed.contains(&c.group));
            if plan.candidates.is_empty() && suspended.is_empty() {
                // Nothing to suspend: no at once (no NVML query, no wait on every OOM of a
                // controller's processes).
                return Err(nothing_to_suspend(peer, &plan, &room));
            }
            let uuid = device_uuids(&state).remove(&room.device).ok_or_else(|| format!("pid {}: device {} is not in the ledger", peer.pid, room.device))?;
            (plan, uuid)
        };
        let (group, priority) = (&plan.group, plan.priority);
        let free = free_on(&uuid).ok_or_else(|| format!("pid {}: the device's free memory cannot be read (NVML); no room is made", peer.pid))?;
        if free >= room.bytes {
            return Ok(format!("room for {} on device {}: {} free{}", format_size(room.bytes), room.device, format_size(free), describe(&suspended)));
        }
        let held = held_on(&uuid);
        let sized: Vec<(String, u64)> = plan.candidates.iter().map(|c| (c.group.clone(), c.bytes(held.as_ref()))).filter(|&(_, b)| b > 0).collect();
        if sized.is_empty() && suspended.is_empty() {
            return Err(nothing_to_suspend(peer, &plan, &room));
        }
        let needed = room.bytes - free;
        let freed: u64 = sized.iter().map(|&(_, b)| b).sum();
        // One at a time, first in the plan's order, then the device is looked at again: a
        // group's figure (its members' word where the driver's cannot be read) decides whether
        // the next one goes too only after the suspension showed what it really freed.
        let mut next_now = false;
        if freed >= needed {
            let victim = sized[0].0.clone();
            let (attempt, attempt_ns) = (Instant::now(), crate::refusal::now_ns());
            let others_suffice = freed - sized[0].1 >= needed;
            let budget = lock_budget(wait.saturating_sub(started.elapsed()), others_suffice);
            match suspend::suspend(state, None, &victim, true, LockWait::within(attempt + budget)) {
                Ok(_) => {
                    suspended.push(victim);
                    continue; // look at the device again
                }
                Err(e) => {
                    // Whatever failed was undone (`suspend`): the group runs as before.
                    match suspend::record(&victim).and_then(|r| r.refusal).filter(|r| r.at_ns >= attempt_ns) {
                        Some(r) => tracing::warn!(
                            "group {victim:?} refused suspension, {} ({}; its members' calls under way were waited for at most {} ms of the request's wait): passed over by the policy for {:.1} s; pid {} (group {group:?}, priority {priority}) goes on with the next candidate",
                            match r.kind {
                                Kind::Lasting => "a lasting refusal",
                                Kind::Timeout { .. } => "a timeout, not a lasting refusal",
                            },
                            r.describe(),
                            budget.as_millis(),
                            r.kind.pass_over().as_secs_f64(),
                            peer.pid
                        ),
                        None => tracing::warn!(
                            "pid {} (group {group:?}, priority {priority}): could not suspend {victim:?}: {e}; not tried again for this request",
                            peer.pid
                        ),
                    }
                    failed.push(victim);
                    next_now = true;
                }
            }
        }
        // Too little suspendable memory yet (or a suspension failed): others may free some
        // meanwhile, within the bounded wait.
        if started.elapsed() >= wait {
            return Err(format!(
                "pid {} (group {group:?}): no room for {} on device {} after waiting {} ms: {} free, and suspendable groups of lower priority hold {} there{}{}{}",
                peer.pid,
                format_size(room.bytes),
                room.device,
                started.elapsed().as_millis(),
                format_size(free),
                format_size(freed),
                describe(&suspended),
                if failed.is_empty() { String::new() } else { format!(" (could not suspend {})", failed.join(", ")) },
                describe_passed_over(&plan.passed_over)
            ));
        }
        if !next_now {
            std::thread::sleep(POLL);
        }
    }
}

fn nothing_to_suspend(peer: Peer, plan: &Plan, room: &RoomRequest) -> String {
    format!(
        "pid {} (group {:?}): the device is full for {} on device {}, and no suspendable group of lower priority holds memory there{}",
        peer.pid,
        plan.group,
        format_size(room.bytes),
        room.device,
        describe_passed_over(&plan.passed_over)
    )
}

/// `; passed over after refusing suspension: a (pid 1: why) for 25 s more, ...`, or nothing.
fn describe_passed_over(passed: &[(String, Duration, String)]) -> String {
    if passed.is_empty() {
        return String::new();
    }
    let each: Vec<String> = passed.iter().map(|(g, left, why)| format!("{g:?} ({why}) for {} s more", left.as_secs().max(1))).collect();
    format!("; passed over after refusing suspension: {}", each.join(", "))
}

fn describe(suspended: &[String]) -> String {
    if suspended.is_empty() {
        String::new()
    } else {
        format!(" (suspended {})", suspended.join(", "))
    }
}

/// Test knob `GPUSLICE_TEST_POLICY_DELAY_MS=N`: the policy thread starts N ms late (at most
/// 10 s), as it may on a loaded machine, so that a test can show that nothing a registration
/// needs is left to it.
fn policy_delay_for_tests() {
    let ms = std::env::var("GPUSLICE_TEST_POLICY_DELAY_MS").ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(10_000)));
    }
}

/// The policy's background work, for the controller's lifetime: finds groups an earlier
/// controller suspended, notes activity, and resumes the groups it suspended once their memory
/// fits again on every device it was on. The suspension marks were read before it starts
/// (`serve`: before any registration is answered).
pub fn watch(state: &std::sync::Mutex<State>) {
    policy_delay_for_tests();
    suspend::adopt(state);
    let mut stamps = HashMap::new();
    loop {
        std::thread::sleep(POLL * 4);
        let (uuids, devices, groups) = {
            let state = lock_state(state);
            let devices: Vec<(u32, String)> = state.claimed_devices().map(|(d, u)| (d as u32, u.to_string())).collect();
            (device_uuids(&state), devices, groups_now(&state))
        };
        // NVML outside the state's lock (it can take milliseconds).
        let look = {
            let nvml = nvml().lock().unwrap_or_else(|p| p.into_inner());
            nvml.as_ref().map(|n| activity::look(n, &devices, &mut stamps)).unwrap_or_default()
        };
        tracker().observe(Instant::now(), &groups, &look);
        suspend::join_skipped(state);
        for row in suspend::rows(&|_| Vec::new()) {
            let Some(rec) = suspend::record(&row.group) else { continue };
            if rec.phase != Phase::Suspended || !rec.automatic || rec.suspended_at.is_some_and(|t| t.elapsed() < RESUME_HOLDOFF) {
                continue;
            }
            if room_for(&uuids, &rec.device_bytes).is_ok() {
                let _ = suspend::resume(state, None, &row.group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuslice_common::ledger::{self, Ledger};
    use gpuslice_common::protocol::{DeviceClaim, Registration, PROTOCOL_VERSION};
    use gpuslice_common::settings::FileSettings;
    use std::process::{Child, Command};

    const GIB: u64 = 1 << 30;

    /// A live process of our own to register (the controller watches its pid).
    struct Sleeper(Child);

    impl Sleeper {
        fn new() -> Sleeper {
            Sleeper(Command::new("sleep").arg("60").spawn().expect("start sleep"))
        }
        fn peer(&self) -> Peer {
            // SAFETY: geteuid has no preconditions and cannot fail.
            Peer { pid: self.0.id(), uid: unsafe { libc::geteuid() } }
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn register(s: &mut State, who: &Sleeper, group: &str) -> (usize, u32) {
        let claim = DeviceClaim {
            ordinal: 0,
            uuid: "GPU-00000000-0000-0000-0000-0000000000aa".into(),
            total_memory: 4 * GIB,
            memory_limit: None,
            sm_share: None,
            sm_max: 0,
        };
        let r = Registration {
            protocol: PROTOCOL_VERSION,
            group: Some(group.into()),
            priority: None,
            name: "t".into(),
            own_pid: who.peer().pid,
            devices: vec![claim],
        };
        let a = s.register(who.peer(), r).expect("register");
        (a.group as usize, a.devices[0].1)
    }

    /// A controller's state over a fresh ledger (kept in the returned directory) whose config
    /// makes two suspendable low-priority groups and one high-priority group, suspension marks
    /// published as `serve` publishes them.
    fn two_suspendable_and_one_high(low_a: &str, low_b: &str, high: &str) -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger").to_str().unwrap().to_string();
        let (ledger, adopted) = Ledger::open_or_create(&path, ledger::Geometry { max_groups: 8, max_procs: 8 }).unwrap();
        let config = format!(
            "[groups.{low_a}]\npriority = \"low\"\nsuspendable = true\n[groups.{low_b}]\npriority = \"low\"\nsuspendable = true\n[groups.{high}]\npriority = \"high\"\n"
        );
        let mut s = State::new(ledger, FileSettings::parse("test.toml", &config).unwrap());
        s.init_memory(adopted).unwrap();
        s.install_config_groups().unwrap();
        let s = Mutex::new(s);
        suspend::from_config(&s);
        (dir, s.into_inner().unwrap())
    }

    /// Two idle suspendable groups of one priority: `plan-liars` allocated first, `plan-honest`
    /// later (the driver's evidence, as the watcher records it), and a member of `plan-liars`
    /// wrote device time and a zero `used` into its group's counters. The plan puts `plan-liars`
    /// first all the same, and sizes it by what the driver shows its process holding; only
    /// where the driver's per-process figures cannot be read does the members' report stand.
    #[test]
    fn the_plan_goes_by_the_drivers_evidence_not_the_members_counters() {
        let (_dir, mut s) = two_suspendable_and_one_high("plan-liars", "plan-honest", "plan-urgent");
        let (liar, honest, urgent) = (Sleeper::new(), Sleeper::new(), Sleeper::new());
        let (liars, d) = register(&mut s, &liar, "plan-liars");
        let (honests, _) = register(&mut s, &honest, "plan-honest");
        register(&mut s, &urgent, "plan-urgent");
        for g in [liars, honests] {
            s.ledger.group(g).devices[d as usize].used.store(GIB, Relaxed);
        }

        // The watcher's looks, on a simulated clock: the liars' process took its memory at 1 s,
        // the honest one's at 2 s; neither ran anything.
        let t0 = Instant::now();
        let mut seen = Tracker::default();
        let holding = |pairs: &[(u32, u64)]| activity::Look { held: [(d, pairs.iter().copied().collect())].into(), busy: Default::default() };
        let both = [(liar.peer().pid, GIB), (honest.peer().pid, GIB)];
        seen.observe(t0, &groups_now(&s), &holding(&[]));
        seen.observe(t0 + Duration::from_secs(1), &groups_now(&s), &holding(&both[..1]));
        for t in 2..10 {
            // Its member's lies, written between every two looks.
            let lies = &s.ledger.group(liars).devices[d as usize];
            lies.charged_ns.fetch_add(1_000_000_000, Relaxed);
            lies.used.store(0, Relaxed);
            seen.observe(t0 + Duration::from_secs(t), &groups_now(&s), &holding(&both));
        }

        let candidates = plan(&s, &seen, t0 + Duration::from_secs(10), 0, urgent.peer(), d, 2 * GIB).unwrap().candidates;
        let names: Vec<&str> = candidates.iter().map(|c| c.group.as_str()).collect();
        assert_eq!(names, ["plan-liars", "plan-honest"], "{candidates:?}");
        let driver: HashMap<u32, u64> = both.into_iter().collect();
        assert_eq!(candidates[0].bytes(Some(&driver)), GIB, "what the driver shows it holding, not its members' 0");
        assert_eq!(candidates[0].bytes(None), 0, "no per-process figures: the members' report (docs/NOTES.md, branch suspord)");
        assert_eq!(candidates[1].bytes(Some(&driver)), GIB);
    }

    /// The bound a candidate's locks get from the request's wait: half of what is left while
    /// the candidates after it could make the room without it, all of it where they could not;
    /// at least `LOCK_FLOOR`, at most `LOCK_TIMEOUT`.
    #[test]
    fn a_candidates_locks_get_half_the_remaining_wait_while_another_could_serve() {
        let ms = Duration::from_millis;
        // The default 5 s wait: the first of two candidates 2.5 s, the second what is left.
        assert_eq!(lock_budget(ms(5000), true), ms(2500));
        assert_eq!(lock_budget(ms(2400), false), ms(2400));
        assert_eq!(lock_budget(ms(2400), true), ms(1200));
        assert_eq!(lock_budget(ms(100), true), LOCK_FLOOR);
        assert_eq!(lock_budget(Duration::ZERO, false), LOCK_FLOOR);
        assert_eq!(lock_budget(ms(120_000), true), LOCK_TIMEOUT, "a long wait: no more than a manual suspension's");
        assert_eq!(lock_budget(ms(15_000), false), LOCK_TIMEOUT);
    }

    /// A group whose suspension was refused is passed over for `PASS_OVER` (on a simulated
    /// clock), the next one taking its place in the plan; then it is first again. After a lock
    /// that timed out, only for as long as the locks waited. Where the refusal named a process
    /// that is no longer a member, it is a candidate at once.
    #[test]
    fn a_group_that_refused_suspension_is_passed_over_for_a_bounded_time() {
        let (_dir, mut s) = two_suspendable_and_one_high("pass-first", "pass-second", "pass-urgent");
        let (first, second, urgent) = (Sleeper::new(), Sleeper::new(), Sleeper::new());
        let (_, d) = register(&mut s, &first, "pass-first");
        register(&mut s, &second, "pass-second");
        register(&mut s, &urgent, "pass-urgent");
        // The driver's looks: `pass-first` took its memory at 1 s, `pass-second` at 2 s.
        // The simulated clock: the tracker's `Instant`s and the policy's ns, both from t0.
        let (t0, t0_ns) = (Instant::now(), 1_000_000_000_000u64);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ns = |ms: u64| t0_ns + ms * 1_000_000;
        let mut seen = Tracker::default();
        let holding = |pairs: &[(u32, u64)]| activity::Look { held: [(d, pairs.iter().copied().collect())].into(), busy: Default::default() };
        let both = [(first.peer().pid, GIB), (second.peer().pid, GIB)];
        seen.observe(t0, &groups_now(&s), &holding(&[]));
        seen.observe(at(1000), &groups_now(&s), &holding(&both[..1]));
        seen.observe(at(2000), &groups_now(&s), &holding(&both));
        let order = |ms: u64| {
            let p = plan(&s, &seen, at(ms), ns(ms), urgent.peer(), d, 2 * GIB).unwrap();
            (
                p.candidates.iter().map(|c| c.group.clone()).collect::<Vec<_>>(),
                p.passed_over.iter().map(|(g, left, _)| (g.clone(), left.as_millis() as u64)).collect::<Vec<_>>(),
            )
        };
        let both_candidates = (vec!["pass-first".to_string(), "pass-second".into()], vec![]);
        let first_passed_over = |ms: u64| (vec!["pass-second".to_string()], vec![("pass-first".to_string(), ms)]);
        assert_eq!(order(10_000), both_candidates);

        let refused = Refusal { at_ns: ns(10_000), pid: Some(first.peer().pid), why: "exports memory".into(), kind: Kind::Lasting };
        suspend::set_refusal_for_tests("pass-first", Some(refused.clone()));
        assert_eq!(order(10_000), first_passed_over(30_000));
        assert_eq!(order(39_000), first_passed_over(1000));
        assert_eq!(order(40_000), both_candidates, "the bound is over");

        // A lock that timed out after 2.5 s: passed over for 2.5 s, then first again.
        let timeout = Refusal { kind: Kind::Timeout { waited: Duration::from_millis(2500) }, ..refused.clone() };
        suspend::set_refusal_for_tests("pass-first", Some(timeout));
        assert_eq!(order(10_000), first_passed_over(2500));
        assert_eq!(order(12_000), first_passed_over(500));
        assert_eq!(order(12_500), both_candidates, "a candidate again 2.5 s after the timeout, not 30 s");

        // The process that blocked it is not a member (it left): a candidate at once.
        suspend::set_refusal_for_tests("pass-first", Some(Refusal { pid: Some(urgent.peer().pid), ..refused }));
        assert_eq!(order(11_000).0, ["pass-first", "pass-second"]);
        suspend::set_refusal_for_tests("pass-first", None);
    }
}
