//! Issue 16, a newcomer's first hour: each defect and rough edge found by trying the tool as a
//! new user would, checked on the real `gpuslice` binary against the simulated driver.

use gpuslice_integration::*;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_CTX_RESERVE", 64 * MIB)
}

/// A pipe whose reading end is already closed: the first write to it fails with EPIPE.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into a local array; both ends are ours.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors; the read end is closed at once.
    unsafe {
        drop(OwnedFd::from_raw_fd(fds[0]));
        OwnedFd::from_raw_fd(fds[1])
    }
}

/// Defect 1: `gpuslice ls | true` and friends end quietly instead of panicking (exit 101).
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let sim = sim();
    let ctl = sim.controller();
    let socket = ctl.socket().display().to_string();
    let config = sim.write_file("c.toml", "[defaults]\nmemory_limit = \"1GiB\"\n");
    let cases: Vec<Vec<String>> = vec![
        vec!["ls".into(), "--socket".into(), socket.clone()],
        vec!["ls".into(), "--json".into(), "--socket".into(), socket.clone()],
        vec!["status".into(), "--socket".into(), socket.clone()],
        vec!["status".into(), "--json".into(), "--socket".into(), socket.clone()],
        vec!["check-config".into(), config.display().to_string()],
        vec!["--help".into()],
    ];
    for args in cases {
        let out = Command::new(cli_path())
            .args(&args)
            .env("GPUSLICE_SOCKET", &socket)
            .stdin(Stdio::null())
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "gpuslice {args:?} into a closed pipe says nothing, got:\n{stderr}");
        let quiet = out.status.success() || out.status.signal() == Some(libc::SIGPIPE);
        assert!(quiet, "gpuslice {args:?} into a closed pipe ends as Unix tools do (SIGPIPE), not {:?}", out.status);
    }
}

/// Defect 2: an edit for a device the controller does not know is refused, and changes nothing.
#[test]
fn set_on_a_device_that_does_not_exist_is_refused() {
    let sim = sim();
    let ctl = sim.controller_with_config("[groups.g]\nmemory_limit = \"1GiB\"\n");
    let member = sim.client(Route::Link).shim().controller(&ctl).group("g").args("init ctx 0 alloc 1M sleep 5000").spawn();
    ctl.ls_until("the member", Duration::from_secs(10), |l| l.pids().contains(&member.pid()));
    let out = ctl.set("--group g --device 7 --memory 3GiB");
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr_lines_with(&["device 7 is not in the ledger", "device(s) 0"]).len(), 1, "{out}");
    let listing = ctl.ls();
    assert_eq!(listing.group_limit("g", 0), Some(GIB), "nothing changed: {listing}");
    let devices = listing.group("g").unwrap()["devices"].as_array().unwrap().clone();
    assert!(devices.iter().all(|d| d["limit"].as_u64() == Some(GIB)), "no device's limit changed: {listing}");
}

/// Defect 3: check-config refuses what serve refuses, names the file's line and column, and
/// shows every section of a good file.
#[test]
fn check_config_checks_every_section_with_its_place() {
    let sim = sim();
    let bad = sim.write_file("bad.toml", "[controller]\nmetrics = \"bad\"\n");
    let out = sim.program(cli_path()).arg("check-config").arg(bad.display()).run();
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr_lines_with(&["line 2, column 11", "controller.metrics", "host:port"]).len(), 1, "{out}");
    let (_socket, out) = serve_with_config(&sim, &bad);
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr_lines_with(&["line 2, column 11", "controller.metrics"]).len(), 1, "{out}");
    assert!(!out.stderr.contains("--metrics"), "the value came from the file, not --metrics:\n{out}");

    let typed = sim.write_file("typed.toml", "[groups.a]\nsm_share = \"half\"\n");
    let out = sim.program(cli_path()).arg("check-config").arg(typed.display()).run();
    assert_eq!(out.stderr_lines_with(&["line 2, column 12", "groups.a.sm_share", "from 1 to 100"]).len(), 1, "{out}");

    let good = sim.write_file("good.toml", "[controller]\nmetrics = \"127.0.0.1:9400\"\n[defaults]\nmemory_limit = \"16GiB\"\n[groups.inference]\nmemory_limit = \"6GiB\"\nsm_share = 50\npriority = \"high\"\n");
    let out = sim.program(cli_path()).arg("check-config").arg(good.display()).run();
    out.assert_success();
    let text = out.lines.join("\n");
    for want in [
        "[controller] socket /run/gpuslice/gpuslice.sock (default)",
        "metrics 127.0.0.1:9400",
        "[defaults] memory 16.00 GiB",
        "[groups.inference] memory 6.00 GiB; SM share 50%; priority high",
    ] {
        assert!(text.contains(want), "check-config shows {want:?}:\n{out}");
    }
}

/// `gpuslice serve --config FILE` on a socket and ledger of `sim`'s own; returns the socket's
/// path and what the command did (a config it refuses ends it at once).
fn serve_with_config(sim: &Sim, file: &Path) -> (PathBuf, Output) {
    let socket = sim.path("s.sock");
    let out = sim
        .program(cli_path())
        .args("serve --config")
        .arg(file.display())
        .arg("--socket")
        .arg(socket.display())
        .arg("--ledger")
        .arg(sim.path("l/ledger").display())
        .run();
    (socket, out)
}

/// Per-device keys in a group's section (`[groups.X.devices.N]`) were silently not applied by the
/// controller (a group gets one value on every GPU): `check-config` and `serve` now refuse the
/// file with the same line, naming the key's place, the group, why and what to write instead.
#[test]
fn per_device_keys_in_a_group_section_are_refused_by_check_config_and_serve() {
    let sim = sim();
    let file = sim.write_file("train.toml", "[groups.train]\nmemory_limit = \"8GiB\"\n[groups.train.devices.1]\nmemory_limit = \"20GiB\"\n");
    let want = [
        "line 4, column 16: groups.train.devices.1.memory_limit=\"20GiB\"",
        "does not apply per-device keys in a group's section",
        "write memory_limit in [groups.train] itself for every GPU",
        "gpuslice set --group train --device INDEX --memory 20GiB",
    ];
    let out = sim.program(cli_path()).arg("check-config").arg(file.display()).run();
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr_lines_with(&want).len(), 1, "{out}");
    let (socket, out) = serve_with_config(&sim, &file);
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr_lines_with(&want).len(), 1, "{out}");
    assert!(!socket.exists(), "refused before it bound its socket");
}

/// Defect 5: a fraction of a byte is refused (by the shim, `set` and `run`), `1.5GiB` is not.
#[test]
fn a_fraction_of_a_byte_is_refused() {
    let sim = sim();
    for value in ["1.5", "100.7"] {
        let out = sim.client(Route::Link).shim().env("GPUSLICE_MEMORY_LIMIT", value).args("init").run();
        out.expect_err(0, CUDA_ERROR_INVALID_VALUE);
        assert_eq!(out.stderr_lines_with(&["GPUSLICE_MEMORY_LIMIT", "fraction of a byte"]).len(), 1, "{out}");
    }
    let out = sim.client(Route::Link).shim().env("GPUSLICE_MEMORY_LIMIT", "1.5GiB").args("init ctx 0 alloc 1G").run();
    out.assert_all_ok();
    let ctl = sim.controller_with_config("[groups.g]\n");
    let out = ctl.set("--group g --memory 1.5");
    assert!(!out.success() && out.stderr.contains("fraction of a byte"), "{out}");
    let out = sim.program(cli_path()).args("run --memory 1.5 -- true").run();
    assert!(!out.success() && out.stderr.contains("fraction of a byte"), "{out}");
}

/// Defect 6: the example program says what is missing when there is no driver, under the shim
/// or not, and never panics. (Where a real driver is installed it simply runs.)
#[test]
fn quota_fill_without_a_driver_says_so() {
    let runs = [
        Command::new(workspace_binary("quota-fill")).arg("256").arg("1").env_remove("LD_LIBRARY_PATH").env_remove("LD_PRELOAD").output().unwrap(),
        Command::new(cli_path())
            .args(["run", "--memory", "1GiB", "--"])
            .arg(workspace_binary("quota-fill"))
            .args(["256", "1"])
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("LD_PRELOAD")
            .env("GPUSLICE_LIB", shim_path())
            .env("GPUSLICE_SOCKET", "/nonexistent/gpuslice.sock")
            .output()
            .unwrap(),
    ];
    for out in runs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("device 0 as this process sees it"), "a driver is installed here");
        } else {
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("no CUDA driver found") && stderr.contains("--simulate"), "{stderr}");
        }
    }
}

/// Rough edge: `serve` listens where $GPUSLICE_SOCKET says, as the CLI and the shim look.
#[test]
fn serve_honours_gpuslice_socket() {
    let sim = sim();
    let socket = sim.path("env.sock");
    let mut serve = Command::new(cli_path())
        .args(["serve", "--ledger"])
        .arg(sim.path("shm/ledger"))
        .env("GPUSLICE_SOCKET", &socket)
        .env("GPUSLICE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = sim.program(cli_path()).args("status --wait 20").env("GPUSLICE_SOCKET", socket.display()).run();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(serve.id() as libc::pid_t, libc::SIGTERM) };
    serve.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(status.lines.iter().any(|l| l == &format!("socket  {}", socket.display())), "{status}");
    assert!(status.lines.iter().any(|l| l.starts_with("metrics off")), "status says where metrics are (off here):\n{status}");
}

/// Rough edges: a misspelt group is refused with the close name, `--create` makes one, and
/// `rm --group` removes an empty group for good (not while it has members).
#[test]
fn groups_are_created_explicitly_and_removed() {
    let sim = sim();
    let mut ctl = sim.controller();
    ctl.set_ok("--create --group inference --memory 1GiB");
    let out = ctl.set("--group inferense --memory 2GiB");
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr_lines_with(&["no group \"inferense\"", "did you mean \"inference\"", "--create"]).len(), 1, "{out}");
    assert!(ctl.ls().group("inferense").is_none(), "a refused edit makes no group");

    let member = sim.client(Route::Link).shim().controller(&ctl).group("inference").args("init ctx 0 alloc 1M sleep 60000").spawn();
    ctl.ls_until("the member", Duration::from_secs(10), |l| l.pids().contains(&member.pid()));
    let out = ctl.cli("rm --group inference").run();
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr_lines_with(&["1 member", &member.pid().to_string()]).len(), 1, "{out}");
    drop(member);

    ctl.set_ok("--create --group typo --memory 1GiB");
    let out = ctl.cli("rm --group typo").run();
    out.assert_success();
    assert!(out.lines.iter().any(|l| l.contains("group \"typo\" removed")), "{out}");
    assert!(ctl.ls().group("typo").is_none());
    ctl.restart();
    assert!(ctl.ls().group("typo").is_none(), "a removed group does not come back with a restart");
}

/// Rough edge: negative values are parsed as values and refused for what they are.
#[test]
fn negative_values_get_a_value_error() {
    let sim = sim();
    let ctl = sim.controller_with_config("[groups.g]\nmemory_limit = \"1GiB\"\n");
    for (args, says) in [("--group g --memory -1", "negative"), ("--group g --sm -5", "percentage"), ("--pid -1 --sm 5", "--pid")] {
        let out = ctl.set(args);
        assert!(!out.success(), "{out}");
        assert!(!out.stderr.contains("unexpected argument"), "{args}: {out}");
        assert!(out.stderr.contains(says), "{args} says {says:?}: {out}");
    }
    let out = sim.program(cli_path()).args("run --memory -1 -- true").run();
    assert!(!out.success() && out.stderr.contains("negative"), "{out}");
}

/// Rough edges: `run --memory unlimited` works as `set --memory unlimited` does; `run --group`
/// without a controller says so at warning level; units and columns are named for what they are.
#[test]
fn units_and_words_agree_across_commands() {
    let sim = sim();
    let out = sim
        .program(cli_path())
        .args("run --memory unlimited -- sh -c")
        .arg("echo limit=${GPUSLICE_MEMORY_LIMIT-unset},${CUDA_DEVICE_MEMORY_LIMIT_0-unset}")
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .env("CUDA_DEVICE_MEMORY_LIMIT_0", "1g")
        .run();
    out.assert_success();
    assert_eq!(out.lines, ["limit=unset,unset"], "{out}");

    let out = sim.program(cli_path()).args("run --group batch -- true").run();
    out.assert_success();
    assert_eq!(out.stderr_lines_with(&["warning", "no gpuslice controller", "--group batch"]).len(), 1, "{out}");

    for sub in ["set", "run"] {
        let out = sim.program(cli_path()).arg(sub).arg("--help").run();
        assert!(out.lines.join(" ").contains("4GB means 4 GiB"), "{sub} --help says units are binary:\n{out}");
    }
    let out = sim.program(cli_path()).args("status --help").run();
    assert!(out.lines.iter().any(|l| l.contains("--json") && l.contains("JSON")), "status --json has help:\n{out}");

    let ctl = sim.controller();
    let out = ctl.cli("ls").run();
    out.assert_success();
    let text = out.lines.join("\n");
    assert!(text.contains("WAITED") && !text.contains("THROTTLED"), "ls names the cumulative wait WAITED (top: WAIT%):\n{out}");
}

/// Acceptance: README.md's "Try it without a GPU" walk-through runs as written, on this build
/// (examples/try-it.sh runs its shell blocks and checks what they print).
#[test]
fn the_readme_walk_through_works_as_written() {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("examples/try-it.sh")).arg(profile_dir());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("GPUSLICE_") || k.starts_with("SIMCUDA_") || k.starts_with("LD_") || k.starts_with("CUDA_") {
            cmd.env_remove(k);
        }
    }
    // A simulated machine of the test's own: its state file, and its per-device files removed
    // when `sim` drops.
    let sim = Sim::new();
    let out = cmd.env("SIMCUDA_STATE", sim.state_path()).stdin(Stdio::null()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "examples/try-it.sh failed:\n{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

/// Defect 9: the documentation stands alone: nothing it points at lies outside the repository,
/// and the sections it cites exist.
#[test]
fn the_docs_cite_only_what_the_repository_has() {
    let root = workspace_root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let readme = read("README.md");
    assert!(!readme.contains("../"), "README.md points outside the repository");
    for doc in ["docs/DESIGN.md", "docs/NOTES.md", "docs/RELIABILITY.md", "LD_PRELOAD.md", "tests/README.md", "tests/gpu/README.md"] {
        assert!(root.join(doc).is_file(), "{doc} is cited and must exist");
    }
    for (file, cites) in [("README.md", "docs/DESIGN.md"), ("docs/NOTES.md", "tests/gpu/README.md \"Soak\"")] {
        assert!(read(file).contains(cites), "{file} cites {cites}");
    }
    assert!(read("tests/gpu/README.md").contains("## Soak"), "the Soak section NOTES.md cites");
    assert!(!read("docs/NOTES.md").contains("README \"Soak\""), "NOTES.md cites a README section that does not exist");
    let design = read("docs/DESIGN.md");
    for topic in ["## How programs reach the driver", "## Threat model", "## The ledger", "HAMi-core"] {
        assert!(design.contains(topic), "docs/DESIGN.md covers {topic}");
    }
}
