//! The ledger's C view in include/gpuslice.h matches the Rust layout field for field: a C
//! program built against the header prints every offset and size, compared here with Rust's.

use gpuslice_common::ledger::*;
use std::mem::{offset_of, size_of};
use std::process::Command;

/// (C struct, field, Rust offset) for every field of every ledger struct.
macro_rules! fields {
    ($($c:literal $rust:ty { $($f:ident),* $(,)? })*) => {
        vec![$($((concat!("struct ", $c), stringify!($f), offset_of!($rust, $f)),)*)*]
    };
}

type Fields = Vec<(&'static str, &'static str, usize)>;
type Sizes = Vec<(&'static str, usize)>;

fn rust_layout() -> (Fields, Sizes) {
    let fields = fields! {
        "gpuslice_ledger_header" Header { magic, layout_version, header_size, file_size, max_devices, max_groups, max_procs,
            device_slot_size, group_slot_size, proc_slot_size, devices_offset, groups_offset, procs_offset, controller_pid,
            controller_heartbeat_ns, controller_starts, created_ns, registrations, devices_inode, index_offset }
        "gpuslice_device_slot" DeviceSlot { state, total_memory, uuid, sched }
        "gpuslice_device_sched" DeviceSched { high_alive_until, wake, host_bound, highs, turn }
        "gpuslice_turn" Turn { holder, last_holder, lease_until, last_handover, holder_pid, last_holder_pid, head, next_ticket, returning }
        "gpuslice_high_slot" HighSlot { owner, pid, busy, alive_until, next_from, next_until }
        "gpuslice_group_device" GroupDevice { limit, used, share, debt_until, charged_ns, throttled_ns, refusals, peak_used }
        "gpuslice_group_slot" GroupSlot { state, priority, members, reconciling, throttled, pinned, generation, name, origin, owner, config_hash, devices }
        "gpuslice_process_device" ProcessDevice { used, overhead, limit, charged_ns, throttled_ns, refusals, peak_used, _was_penalty, turn_wait_ns }
        "gpuslice_member_settings" MemberSettings { penalty, marks, suspend, priority }
        "gpuslice_process_slot" ProcessSlot { state, pid, group, _was_priority, ops, start_time, heartbeat_ns, uid, own_pid, generation, name, token, suspend_ack, suspend_error, suspend_bytes, suspend_ms, suspend_caps, suspend_keep, devices, suspend_request, suspend_held, suspend_ranges, suspend_phase_us }
    };
    let sizes = vec![
        ("struct gpuslice_ledger_header", size_of::<Header>()),
        ("struct gpuslice_device_slot", size_of::<DeviceSlot>()),
        ("struct gpuslice_device_sched", size_of::<DeviceSched>()),
        ("struct gpuslice_high_slot", size_of::<HighSlot>()),
        ("struct gpuslice_turn", size_of::<Turn>()),
        ("struct gpuslice_group_device", size_of::<GroupDevice>()),
        ("struct gpuslice_group_slot", size_of::<GroupSlot>()),
        ("struct gpuslice_process_device", size_of::<ProcessDevice>()),
        ("struct gpuslice_process_slot", size_of::<ProcessSlot>()),
        ("struct gpuslice_member_settings", size_of::<MemberSettings>()),
    ];
    (fields, sizes)
}

#[test]
fn c_header_matches_the_rust_ledger() {
    let (fields, sizes) = rust_layout();
    let mut c = String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"gpuslice.h\"\nint main(void) {\n");
    for (s, f, _) in &fields {
        c.push_str(&format!("  printf(\"{s}.{f} %zu\\n\", offsetof({s}, {f}));\n"));
    }
    for (s, _) in &sizes {
        c.push_str(&format!("  printf(\"sizeof {s} %zu\\n\", sizeof({s}));\n"));
    }
    c.push_str(
        "  printf(\"magic %llu\\n\", (unsigned long long)GPUSLICE_LEDGER_MAGIC);\n  printf(\"version %d\\n\", GPUSLICE_LEDGER_LAYOUT_VERSION);\n  printf(\"devices %d\\n\", GPUSLICE_LEDGER_MAX_DEVICES);\n  printf(\"header %d\\n\", GPUSLICE_LEDGER_HEADER_SIZE);\n  printf(\"phases %d\\n\", GPUSLICE_SUSPEND_PHASES);\n  printf(\"hole %d\\n\", GPUSLICE_SUSPEND_ERR_HOLE);\n  printf(\"origins %d %d %d\\n\", GPUSLICE_ORIGIN_UNRECORDED, GPUSLICE_ORIGIN_CONFIG, GPUSLICE_ORIGIN_LIVE);\n  printf(\"owners %llu %llu %llu\\n\", GPUSLICE_OWNER_UNRECORDED, GPUSLICE_OWNER_OPEN, GPUSLICE_OWNER_UID | 1000u);\n  return 0;\n}\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let exe = dir.path().join("layout");
    std::fs::write(&src, c).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../include");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc).args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"]).arg(&exe).arg(&src).output().expect("a C compiler (cc)");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let value = |key: &str| -> usize {
        let line = text.lines().find(|l| l.rsplit_once(' ').map(|(k, _)| k) == Some(key)).unwrap_or_else(|| panic!("{key} missing:\n{text}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    for (s, f, rust) in &fields {
        assert_eq!(value(&format!("{s}.{f}")), *rust, "{s}.{f}");
    }
    for (s, rust) in &sizes {
        assert_eq!(value(&format!("sizeof {s}")), *rust, "sizeof {s}");
    }
    assert_eq!(value("magic") as u64, MAGIC);
    assert_eq!(value("version") as u32, LAYOUT_VERSION);
    assert_eq!(value("devices"), MAX_DEVICES);
    assert_eq!(value("header"), HEADER_SIZE);
    assert_eq!(value("phases"), PHASES);
    assert_eq!(value("hole") as u32, SUSPEND_ERR_HOLE);
    let origins = text.lines().find_map(|l| l.strip_prefix("origins ")).unwrap_or_else(|| panic!("origins missing:\n{text}"));
    assert_eq!(origins, format!("{} {} {}", Origin::Unrecorded as u32, Origin::Config as u32, Origin::Live as u32));
    let owners = text.lines().find_map(|l| l.strip_prefix("owners ")).unwrap_or_else(|| panic!("owners missing:\n{text}"));
    assert_eq!(owners, format!("{} {} {}", Owner::Unrecorded.word(), Owner::Open.word(), Owner::Uid(1000).word()));
}
