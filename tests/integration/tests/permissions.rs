//! Who may touch what: the ledger and the socket are created with restrictive modes; a process
//! of another uid cannot open the ledger file or change limits, and is held to a group's limit
//! like anyone when it joins one; a controller cannot be started on files its user may not
//! write, and refuses a ledger that belongs to another user. What this guarantees and what it
//! does not is LD_PRELOAD.md's threat model.
//!
//! The tests that act as another uid (65534) need root to switch to it; run as any other user
//! they say so and pass without checking anything else.

use gpuslice_common::ledger::{Geometry, Ledger};
use gpuslice_integration::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const NOBODY: u32 = 65534;
const R: u64 = 64 * MIB;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// `gpuslice serve` started as `uid` (None: this test's own) that must fail: its stderr.
fn serve_fails(sim: &Sim, uid: Option<u32>, socket: &Path, ledger: &Path) -> String {
    let mut c = sim.program(cli_path()).arg("serve").arg("--socket").arg(show(socket)).arg("--ledger").arg(show(ledger));
    if let Some(u) = uid {
        c = c.uid(u);
    }
    let out = c.run();
    assert!(!out.success(), "the controller must not start:\n{out}");
    assert!(!socket.exists(), "no socket left behind:\n{out}");
    out.stderr
}

#[test]
fn the_ledger_and_the_socket_are_created_with_restrictive_modes() {
    let sim = Sim::new();
    // Parents that do not exist yet: the controller makes them.
    let socket = sim.path("run/gpuslice/sock");
    let ledger = sim.path("shm/gpuslice/ledger");
    let ctl = sim.program(cli_path()).arg("serve").arg("--socket").arg(show(&socket)).arg("--ledger").arg(show(&ledger)).spawn();
    let answers = || sim.program(cli_path()).args("status --socket").arg(show(&socket)).run().success();
    assert!(poll_until(CONTROLLER_START_TIMEOUT, answers), "the controller did not start:\n{}", ctl.stderr_now());
    assert_eq!(mode(&ledger), 0o600, "the ledger: its owner only");
    assert_eq!(mode(ledger.parent().unwrap()), 0o700, "the ledger's directory: its owner only");
    assert_eq!(mode(&socket), 0o666, "the socket: anyone may connect (edits are checked per peer)");
    assert_eq!(mode(socket.parent().unwrap()), 0o755, "the socket's directory");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(std::fs::metadata(&ledger).unwrap().uid(), unsafe { libc::geteuid() });
    ctl.signal(libc::SIGTERM);
    let out = ctl.wait();
    assert!(out.success(), "{out}");
    assert!(!socket.exists(), "the socket goes with the controller");
    assert!(ledger.exists(), "the ledger stays for the next one");
}

/// The guaranteed parts of the threat model, as uid 65534 against a root controller: it cannot
/// open the ledger file (for reading or writing, even with its directory open to everyone: the
/// file's mode alone refuses), it cannot change limits through the socket, and when it joins a
/// group by name it is held to that group's limit like any member.
#[test]
#[cfg_attr(not(gpuslice_it_root), ignore = "needs root: it acts as uid 65534 (tests built as another user)")]
fn another_user_cannot_open_the_ledger_or_change_limits() {
    assert_root();
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", R);
    chmod(sim.dir(), 0o755); // The socket must be reachable by uid 65534.
    let ctl = sim.controller_with_config("[groups.g]\nmemory_limit = \"1GiB\"\n");
    let ledger = ctl.ledger();
    for dir_mode in [0o700, 0o755] {
        chmod(ledger.parent().unwrap(), dir_mode);
        for (how, redirect) in [("read", "3<"), ("write", "3>>"), ("read and write", "3<>")] {
            let out = sim.program("/bin/sh").uid(NOBODY).arg("-c").arg(format!("exec {redirect} \"$0\" && echo opened")).arg(show(&ledger)).run();
            assert!(!out.success() && out.lines.is_empty(), "uid {NOBODY} opened the ledger for {how} (directory {dir_mode:o}):\n{out}");
            assert!(out.stderr.contains("Permission denied"), "{how}: {out}");
        }
    }

    // A client of uid 65534 on the same simulated machine as the controller (the controller
    // tracks only the devices its NVML lists, so the UUIDs must be the same): the state file
    // is made writable for it.
    sim.client(Route::Link).args("init").run().assert_success();
    chmod(&sim.state_path(), 0o666);
    let done = sim.path("done");
    let c = sim
        .client(Route::Link)
        .shim()
        .uid(NOBODY)
        .controller(&ctl)
        .group("g")
        .args(&format!("init ctx 0 uuid 0 alloc 900M alloc 100M waitfile {}", show(&done)))
        .spawn();
    let refused = c.wait_line("alloc", 1);
    assert_eq!(line_code(&refused), Some(CUDA_ERROR_OUT_OF_MEMORY), "held to the group's 1 GiB: `{refused}`");
    let l = ctl.ls();
    let row = l.process(c.pid()).unwrap_or_else(|| panic!("uid {NOBODY}'s process is registered:\n{l}"));
    assert_eq!(row["uid"], NOBODY, "{l}");
    assert_eq!(row["group"], "g", "{l}");

    // It may not lift the limit, for the group or for itself.
    for args in ["--group g --memory 8GiB".to_string(), format!("--pid {} --memory 8GiB", c.pid()), "--group g --sm 100".into()] {
        let out = ctl.cli("set").args(&args).uid(NOBODY).run();
        assert!(!out.success() && out.stderr.contains("permission denied"), "{args}: {out}");
    }
    assert_eq!(ctl.ls().group_limit("g", 0), Some(GIB));
    touch(&done);
    let out = c.wait();
    out.assert_success();
    let uuid = out.get("uuid", "cu").expect("the device's UUID");
    let _ = std::fs::remove_file(format!("/dev/shm/gpuslice-board5-{NOBODY}-{uuid}"));
}

/// A controller run by a user who may not write where it is pointed stops with the reason,
/// and leaves nothing behind; a ledger that belongs to another user is refused, untouched.
#[test]
#[cfg_attr(not(gpuslice_it_root), ignore = "needs root: it acts as uid 65534 (tests built as another user)")]
fn a_controller_refuses_paths_its_user_may_not_use() {
    assert_root();
    let sim = Sim::new();
    chmod(sim.dir(), 0o755);
    let open_dir = sim.path("open");
    std::fs::create_dir(&open_dir).unwrap();
    // Writable by all but sticky, like /tmp: nobody may rename another's files there.
    chmod(&open_dir, 0o1777);
    let closed_dir = sim.path("closed"); // root's, 0755
    std::fs::create_dir(&closed_dir).unwrap();
    chmod(&closed_dir, 0o755);

    // The socket's directory is not writable.
    let err = serve_fails(&sim, Some(NOBODY), &closed_dir.join("sock"), &open_dir.join("ledger"));
    assert!(err.contains(&format!("cannot listen on {}", show(&closed_dir.join("sock")))) && err.contains("Permission denied"), "{err}");
    assert!(!open_dir.join("ledger").exists());

    // The ledger's directory is not writable: the socket it had bound is removed again.
    let err = serve_fails(&sim, Some(NOBODY), &open_dir.join("sock"), &closed_dir.join("ledger"));
    assert!(err.contains(&format!("cannot create the ledger {}", show(&closed_dir.join("ledger")))) && err.contains("Permission denied"), "{err}");

    // root's ledger, mode 0600: not readable by uid 65534.
    let roots = closed_dir.join("roots-ledger");
    Ledger::create(roots.to_str().unwrap(), Geometry { max_groups: 2, max_procs: 2 }).unwrap();
    let err = serve_fails(&sim, Some(NOBODY), &open_dir.join("sock"), &roots);
    assert!(err.contains(&format!("cannot open the ledger {}", show(&roots))) && err.contains("Permission denied"), "{err}");

    // A valid ledger owned by uid 65534: root's controller will not adopt it (its owner could
    // rewrite or truncate it under every process), nor replace it.
    let theirs: PathBuf = open_dir.join("their-ledger");
    Ledger::create(theirs.to_str().unwrap(), Geometry { max_groups: 2, max_procs: 2 }).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let before = std::fs::read(&theirs).unwrap();
    let err = serve_fails(&sim, None, &open_dir.join("sock"), &theirs);
    assert!(err.contains(&format!("refusing the ledger {}: it belongs to uid {NOBODY}", show(&theirs))), "{err}");
    assert_eq!(std::fs::read(&theirs).unwrap(), before, "left untouched");

    // Issue 13: a ledger or socket directory made beforehand by another user, or one that
    // others may write (and so rename what is in it), is refused with a message, never used.
    let squatted = sim.path("squatted");
    std::fs::create_dir(&squatted).unwrap();
    chmod(&squatted, 0o700);
    std::os::unix::fs::chown(&squatted, Some(NOBODY), Some(NOBODY)).unwrap();
    let err = serve_fails(&sim, None, &open_dir.join("sock"), &squatted.join("ledger"));
    assert!(err.contains(&format!("{} belongs to uid {NOBODY}", show(&squatted))) && err.contains("refusing it"), "{err}");
    let err = serve_fails(&sim, None, &squatted.join("sock"), &open_dir.join("ledger"));
    assert!(err.contains(&format!("{} belongs to uid {NOBODY}", show(&squatted))), "{err}");
    let loose = sim.path("loose");
    std::fs::create_dir(&loose).unwrap();
    chmod(&loose, 0o777);
    let err = serve_fails(&sim, None, &open_dir.join("sock"), &loose.join("ledger"));
    assert!(err.contains(&format!("{} has mode 777", show(&loose))) && err.contains("refusing it"), "{err}");
    assert!(std::fs::read_dir(&loose).unwrap().next().is_none(), "nothing made in it");
    let link = sim.path("link");
    std::os::unix::fs::symlink(&squatted, &link).unwrap();
    let err = serve_fails(&sim, None, &open_dir.join("sock"), &link.join("ledger"));
    assert!(err.contains("is a symbolic link") || err.contains("belongs to uid"), "{err}");
}
