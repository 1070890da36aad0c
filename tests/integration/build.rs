//! Decides, when the integration tests are built, which of them this machine can run, so that a
//! test it cannot run is `#[ignore]`d with its reason (`cfg_attr(not(..), ignore = "..")`) and
//! says so in the test list, instead of printing SKIPPED and passing:
//!   `gpuslice_it_root`   the tests run as root (some switch to uid 65534);
//!   `gpuslice_it_pidns`  `unshare --pid --fork true` works (CAP_SYS_ADMIN);
//!   `gpuslice_it_pidns_proc`  and with `--mount-proc` too (a fresh /proc for the namespace);
//!   `gpuslice_it_tmux`   tmux is installed (`gpuslice top` is driven in a tmux pane).
//! Built once and cached: after installing tmux or changing user, `touch tests/integration/build.rs`.
use std::process::Command;

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
}

/// The effective uid of this build, from /proc (the build has no libc dependency).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PATH");
    let found = [
        ("gpuslice_it_root", effective_uid() == Some(0)),
        ("gpuslice_it_pidns", succeeds("unshare", &["--pid", "--fork", "true"])),
        ("gpuslice_it_pidns_proc", succeeds("unshare", &["-p", "-f", "--mount-proc", "true"])),
        ("gpuslice_it_tmux", succeeds("tmux", &["-V"])),
    ];
    for (cfg, present) in found {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if present {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
