//! Which group the suspension policy (issue 22) suspends first among suspendable groups of one
//! priority: the least recently active, judged on what the driver shows (NVML: per-process
//! utilization samples, and the memory each member process holds), never on the counters a
//! group's members write into the ledger (`charged_ns`, `used`), which any member may set to
//! anything.
//!
//! Real time passes here between steps only so that the controller's watcher (every 200 ms)
//! sees them apart; no figure of time is judged.

use gpuslice_common::ledger::Ledger;
use gpuslice_common::protocol::{self, DeviceClaim, Registration, Request, Response};
use gpuslice_integration::*;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

/// Each context's own memory (the simulated driver's `SIMCUDA_CTX_RESERVE`).
const R: u64 = 64 * MIB;
/// Long enough for the controller's watcher (every 200 ms) to have looked several times.
const SEVERAL_TICKS: Duration = Duration::from_millis(800);

/// One 4 GiB device; `liars`, `honest`, `busy` and `idle` low-priority suspendable groups of
/// 3 GiB quotas (which sum past the card), `urgent` a high-priority one.
fn machine() -> Sim {
    Sim::new().env("SIMCUDA_DEVICES", 1).env("SIMCUDA_MEM", "4G").env("SIMCUDA_CTX_RESERVE", R)
}

fn groups(ctl: &Controller<'_>, low: &[&str]) {
    for g in low {
        ctl.set_ok(&format!("--create --group {g} --memory 3GiB --priority low"));
        ctl.set_ok(&format!("--group {g} --suspendable true"));
    }
    ctl.set_ok("--create --group urgent --memory 3GiB --priority high");
}

/// A member of `group` holding 1 GiB, then `then` (more commands), then waiting for `done`.
fn holder(sim: &Sim, ctl: &Controller<'_>, group: &str, then: &str, done: &str) -> Running {
    let t = sim.client(Route::Dlsym).shim().controller(ctl).group(group).args(&format!("init ctx 0 alloc 1G {then} waitfile {done} freeall")).spawn();
    expect_ok(&t.wait_line("alloc", 0));
    t
}

/// The high-priority request that needs exactly one suspension: 2 GiB when two groups hold
/// 1 GiB and a context each (1856 MiB free, less its own context); either group's 1088 MiB is
/// enough.
fn urgent_request(sim: &Sim, ctl: &Controller<'_>, leave: &str) -> Running {
    let urgent = sim.client(Route::Procaddr).shim().controller(ctl).group("urgent").args(&format!("init ctx 0 alloc 2G waitfile {leave} freeall")).spawn();
    expect_ok(&urgent.wait_line("alloc", 0));
    urgent
}

/// The bug: a member of `liars` that never used the GPU after its allocation writes device time
/// into its group's counters every millisecond (what the controller took for activity), so that
/// the watcher saw `liars` active after `honest`, which truly was active later (its allocation).
/// The policy then suspended `honest` for the urgent request. Now the driver's evidence decides:
/// both allocated and did nothing more, `liars` first, so `liars` is suspended.
///
/// The faking member leaves before the request, so that only the order is tested here (a member
/// without CUDA state is left out of its group's suspension: suspend_refusal.rs). Its lies stay
/// in the counters.
#[test]
fn a_member_faking_activity_in_its_groups_counters_does_not_get_an_idle_neighbour_suspended_in_its_place() {
    let sim = machine();
    let ctl = sim.controller();
    groups(&ctl, &["liars", "honest"]);
    let (done, stop, leave) = (sim.path_str("done"), sim.path_str("stop"), sim.path_str("leave"));
    let liar = holder(&sim, &ctl, "liars", "", &done);
    std::thread::sleep(SEVERAL_TICKS);
    let honest = holder(&sim, &ctl, "honest", "", &done);
    std::thread::sleep(SEVERAL_TICKS);

    let faker = sim
        .program(std::env::current_exe().expect("this test binary"))
        .args("--exact faker --ignored --nocapture --test-threads=1")
        .env("FAKER_SOCKET", ctl.socket().display())
        .env("FAKER_UUID", sim.device_uuid(0))
        .env("FAKER_STOP", &stop)
        .spawn();
    faker.wait_for("the faker's first write", Duration::from_secs(10), |l| l.ends_with("faking"));
    std::thread::sleep(SEVERAL_TICKS);
    touch(&stop);
    let out = faker.wait();
    assert!(out.status.success(), "{out}");
    let writes: u64 = out.lines.iter().find_map(|l| l.strip_prefix("faked writes=")).and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    assert!(writes > 100, "the faker wrote its counters many times: {out}");
    let (l, _) = ctl.ls_until("the faker is gone", Duration::from_secs(10), |l| l.processes().len() == 2);
    assert!(l.group_device("liars", 0)["charged_ns"].as_u64() > Some(0), "its lies are in the counters: {l}");

    let urgent = urgent_request(&sim, &ctl, &leave);
    let l = ctl.ls();
    assert_eq!(l.suspension("liars")["state"], "suspended", "the least recently active group, by the driver's word, is suspended:\n{l}\n{}", ctl.log());
    assert_eq!(l.suspension("honest")["state"], "running", "{l}");
    assert_eq!(sim.device_free(), 4 * GIB - 2 * GIB - GIB - 2 * R, "one suspension was enough");

    touch(&leave);
    urgent.wait().assert_all_ok();
    ctl.ls_until("liars resumed", Duration::from_secs(10), |l| l.suspension("liars")["state"] == "running");
    touch(&done);
    liar.wait().assert_all_ok();
    honest.wait().assert_all_ok();
}

/// The honest case stays as it was meant: a group that keeps the GPU busy (no SM share, so its
/// launches are not even charged in the ledger) is kept, although it allocated first, and the
/// idle group that allocated later is suspended.
#[test]
fn a_busy_group_is_kept_and_an_idle_one_suspended_whatever_their_ages() {
    let sim = machine();
    let ctl = sim.controller();
    groups(&ctl, &["busy", "idle"]);
    let (done, stop, leave) = (sim.path_str("done"), sim.path_str("stop"), sim.path_str("leave"));
    let busy = holder(&sim, &ctl, "busy", &format!("flood 2000000 100 {stop}"), &done);
    std::thread::sleep(SEVERAL_TICKS);
    let idle = holder(&sim, &ctl, "idle", "", &done);
    std::thread::sleep(SEVERAL_TICKS);

    let urgent = urgent_request(&sim, &ctl, &leave);
    let l = ctl.ls();
    assert_eq!(l.suspension("idle")["state"], "suspended", "the idle group is suspended:\n{l}\n{}", ctl.log());
    assert_eq!(l.suspension("busy")["state"], "running", "{l}");
    touch(&stop);
    expect_ok(&busy.wait_line("flood", 0));

    touch(&leave);
    urgent.wait().assert_all_ok();
    ctl.ls_until("idle resumed", Duration::from_secs(10), |l| l.suspension("idle")["state"] == "running");
    touch(&done);
    busy.wait().assert_all_ok();
    idle.wait().assert_all_ok();
}

/// Not a test of its own: the lying member the first test starts. It registers into `liars`
/// through the socket, as any tenant's process may, maps its group's memory as a shim does, and
/// adds device time nobody used to its group's counters on device 0 every millisecond until
/// `FAKER_STOP` exists.
#[test]
#[ignore = "a helper process of the suspension-order tests"]
fn faker() {
    let socket = PathBuf::from(std::env::var_os("FAKER_SOCKET").expect("FAKER_SOCKET: this runs as a helper of another test"));
    let stop = PathBuf::from(std::env::var_os("FAKER_STOP").expect("FAKER_STOP"));
    let uuid = std::env::var("FAKER_UUID").expect("FAKER_UUID");
    let claim = DeviceClaim { ordinal: 0, uuid, total_memory: 4 * GIB, memory_limit: None, sm_share: None, sm_max: 0 };
    let r = Registration {
        protocol: protocol::PROTOCOL_VERSION,
        group: Some("liars".into()),
        priority: None,
        name: "faker".into(),
        own_pid: std::process::id(),
        devices: vec![claim],
    };
    let (a, fds) = match protocol::call_with_fds(&socket, &Request::Register(r), Duration::from_secs(2)).expect("register") {
        (Response::Registered(a), fds) => (a, fds),
        (other, _) => panic!("not registered: {other:?}"),
    };
    let ledger = Ledger::map_group_view(fds[0].as_fd(), fds[1].as_fd()).expect("map the group's memory");
    let device = a.devices[0].1 as usize;
    let g = ledger.group(a.group as usize);
    let until = Instant::now() + Duration::from_secs(30);
    let mut writes = 0u64;
    while !stop.exists() && Instant::now() < until {
        g.devices[device].charged_ns.fetch_add(1_000_000, SeqCst);
        writes += 1;
        if writes == 1 {
            println!("faking");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("faked writes={writes}");
}
