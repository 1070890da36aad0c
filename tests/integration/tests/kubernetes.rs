//! What a workload pod of examples/kubernetes sees, reproduced on the simulated driver: the
//! controller's socket directory and nothing else of gpuslice's state, a non-root user, its limit
//! in the environment (as the Downward API fills it in from the pod's annotations), one group per
//! pod (`GPUSLICE_GROUP=<namespace>/<pod>`) and a PID namespace of its own, while the controller
//! runs in the node's (`hostPID: true`).

use gpuslice_integration::*;
use std::os::unix::fs::PermissionsExt;

/// Context reserve of the simulated driver: what each process's primary context holds.
const R: u64 = 64 * MIB;
/// `runAsUser` of the example pods.
const POD_UID: u32 = 1000;

/// The examples mount only the socket's directory into workload pods, never the ledger: the shim
/// receives the ledger's descriptor in the controller's answer and never opens a path. Here the
/// ledger's directory is renamed away once the controller runs, and (when the test runs as root)
/// the pods' processes run as uid 1000, for whom the 0600 root-owned ledger file would be closed
/// anyway. Two processes of one pod still share the pod's quota exactly, and a second pod has a
/// quota of its own.
#[test]
fn pods_that_see_only_the_socket_share_their_pod_quota() {
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", R);
    let ctl = sim.controller();
    let ledger_dir = ctl.ledger().parent().expect("the ledger's directory").to_path_buf();
    std::fs::rename(&ledger_dir, sim.path("ledger-not-mounted")).expect("hide the ledger's directory");
    assert!(!ctl.ledger().exists());

    let uid = is_root().then_some(POD_UID);
    if uid.is_some() {
        // The socket's directory must be reachable for uid 1000, and the simulated device's
        // state file (made 0600 by its first user) writable, as /dev/nvidia* are for pods.
        std::fs::set_permissions(sim.dir(), PermissionsExt::from_mode(0o755)).expect("chmod the test directory");
        sim.client(Route::Link).args("init").run().assert_all_ok();
        std::fs::set_permissions(sim.state_path(), PermissionsExt::from_mode(0o666)).expect("chmod the simulated device");
    } else {
        eprintln!("note: not root, so the pods' processes run as this user rather than uid {POD_UID}");
    }
    let pod = "default/inference-5d8f7c9b6d-x2x7q";
    let other_pod = "default/inference-5d8f7c9b6d-q9w8e";
    let done = sim.path("done");

    let first = as_pod(sim.client(Route::Procaddr).shim().controller(&ctl).group(pod).env("GPUSLICE_MEMORY_LIMIT", "1GiB"), uid)
        .args(&format!("init ctx 0 alloc 512M waitfile {}", done.display()))
        .spawn();
    let line = first.wait_line("alloc", 0);
    assert!(line_ok(&line), "the pod's first process allocates within its quota: `{line}`");

    // A second process of the same pod: 1 GiB - 2 contexts - 512 MiB leaves 384 MiB.
    let second = as_pod(sim.client(Route::Procaddr).shim().controller(&ctl).group(pod).env("GPUSLICE_MEMORY_LIMIT", "1GiB"), uid)
        .args("init ctx 0 alloc 512M alloc 256M")
        .run();
    second.assert_success();
    assert_eq!(second.code(2), CUDA_ERROR_OUT_OF_MEMORY, "the pod's quota is shared:\n{second}");
    second.expect_ok(3);

    let third = as_pod(sim.client(Route::Procaddr).shim().controller(&ctl).group(other_pod).env("GPUSLICE_MEMORY_LIMIT", "1GiB"), uid)
        .args(&format!("init ctx 0 alloc 900M waitfile {}", done.display()))
        .spawn();
    let line = third.wait_line("alloc", 0);
    assert!(line_ok(&line), "another pod has a quota of its own: `{line}`");

    let listing = ctl.ls();
    assert_eq!(listing.group_limit(pod, 0), Some(GIB), "{listing}");
    assert_eq!(listing.members(pod), vec![first.pid()], "{listing}");
    assert_eq!(listing.group_used(pod, 0), R + 512 * MIB, "the second process's memory went back with it:\n{listing}");
    assert_eq!(listing.group_refusals(pod, 0), 1, "{listing}");
    assert_eq!(listing.group_limit(other_pod, 0), Some(GIB), "{listing}");
    assert_eq!(listing.members(other_pod), vec![third.pid()], "{listing}");
    if let Some(u) = uid {
        assert_eq!(listing.process(first.pid()).expect("listed")["uid"], u, "{listing}");
    }
    touch(&done);
    first.wait().assert_all_ok();
    third.wait().assert_all_ok();
}

/// The pod's processes run as `uid` when given (the test runs as root).
fn as_pod(client: Client<'_>, uid: Option<u32>) -> Client<'_> {
    match uid {
        Some(u) => client.uid(u),
        None => client,
    }
}

/// The controller runs in the node's PID namespace (`hostPID: true`), each pod in a namespace of
/// its own. The kernel translates the pod's pid for the controller (`SO_PEERCRED`), so the
/// controller lists and watches the process by its node pid, though it calls itself pid 1, and
/// takes its memory back when it is killed.
#[test]
#[cfg_attr(not(gpuslice_it_pidns), ignore = "needs pid namespaces: `unshare --pid --fork` (CAP_SYS_ADMIN) failed when the tests were built")]
fn a_process_in_its_own_pid_namespace_is_watched_by_its_node_pid() {
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", R);
    let ctl = sim.controller();
    let pod = "default/inference-5d8f7c9b6d-x2x7q";
    ctl.set_ok(&format!("--create --group {pod} --memory 1GiB"));
    let done = sim.path("done");
    let unshare = sim
        .program("unshare")
        .shim()
        .controller(&ctl)
        .group(pod)
        .args("--pid --fork")
        .arg(client_path(Route::Procaddr).display())
        .args(&format!("init ctx 0 alloc 512M waitfile {}", done.display()))
        .spawn();
    let line = unshare.wait_line("alloc", 0);
    assert!(line_ok(&line), "`{line}`");

    let listing = ctl.ls();
    let members = listing.members(pod);
    assert_eq!(members.len(), 1, "{listing}");
    let node_pid = members[0];
    let process = listing.process(node_pid).expect("listed");
    assert_eq!(process["own_pid"], 1, "the process calls itself pid 1 in its namespace:\n{listing}");
    assert_ne!(node_pid, unshare.pid(), "the member is unshare's child, not unshare:\n{listing}");
    assert_eq!(listing.group_used(pod, 0), R + 512 * MIB, "{listing}");

    // SAFETY: kill(2) of the test's own grandchild, by the pid the controller reported.
    assert_eq!(unsafe { libc::kill(node_pid as libc::pid_t, libc::SIGKILL) }, 0, "kill {node_pid}");
    let (_, took) =
        ctl.ls_until("the killed process's memory back", std::time::Duration::from_secs(2), |l| l.group_used(pod, 0) == 0 && l.members(pod).is_empty());
    assert!(took < std::time::Duration::from_secs(1), "taken back in {took:?}");
    let out = unshare.wait();
    assert!(!out.success(), "unshare reports its child's death:\n{out}");
}
