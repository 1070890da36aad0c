//! `ptx-slice` as the GPU script uses it: the report lines it parses, the plan lines `run.cu` reads,
//! a fat binary as input, and the exit statuses.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ptx-slice");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn report_lines_and_the_written_module() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.ptx");
    let json = dir.path().join("out.json");
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/suite.ptx");
    let (rc, stdout, _) = run(&[input, out.to_str().unwrap(), "--json", json.to_str().unwrap(), "--repeat", "2"]);
    assert_eq!(rc, 0);
    assert!(stdout.contains(
        "kernel grid_stride: sliced; params [grid_stride_param_0@0+8/8 grid_stride_param_1@8+8/8 grid_stride_param_2@16+4/4]; slice param at offset 20 (24 bytes, align 4)\n"
    ));
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with("transform: ") && last.ends_with(" ms per MB") && last.contains("10 kernels (10 sliced, 0 refused), best of 2"), "{last}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(written, gpuslice_ptx::slice_module(&std::fs::read_to_string(input).unwrap()).unwrap().ptx);
    let outcome: gpuslice_ptx::ModuleOutcome = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(outcome.ptx, written);

    let refuse = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/refuse.ptx");
    let (rc, stdout, _) = run(&[refuse, out.to_str().unwrap()]);
    assert_eq!(rc, 0);
    assert!(stdout.lines().any(|l| l.starts_with("kernel reads_gridid: refused: reads `%gridid`")), "{stdout}");
    assert!(stdout.contains("  note: reads `%smid`"));
}

#[test]
fn plan_lines() {
    let (rc, stdout, _) = run(&["plan", "5", "2", "1", "3"]);
    assert_eq!(rc, 0);
    assert_eq!(stdout, "0 0 0 3 1 1\n3 0 0 2 1 1\n0 1 0 3 1 1\n3 1 0 2 1 1\n");
    assert_eq!(run(&["plan", "5", "2", "x", "3"]).0, 2);
}

#[test]
fn a_fat_binary_and_the_exit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.ptx");
    // A container with a compressed cubin and the suite's PTX for sm_90 (64-byte entry headers).
    let ptx = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/suite.ptx")).unwrap();
    let entry = |kind: u16, flags: u64, payload: &[u8]| {
        let padded = (payload.len() + 1).next_multiple_of(8);
        let mut e = vec![0u8; 64];
        e[0..2].copy_from_slice(&kind.to_le_bytes());
        e[4..8].copy_from_slice(&64u32.to_le_bytes());
        e[8..16].copy_from_slice(&(padded as u64).to_le_bytes());
        e[28..32].copy_from_slice(&90u32.to_le_bytes());
        e[40..48].copy_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(payload);
        e.resize(64 + padded, 0);
        e
    };
    let body = [entry(2, 0x8000, b"\x28\xb5\x2f\xfdcubin"), entry(1, 0, &ptx)].concat();
    let mut image = 0xBA55_ED50u32.to_le_bytes().to_vec();
    image.extend_from_slice(&1u16.to_le_bytes());
    image.extend_from_slice(&16u16.to_le_bytes());
    image.extend_from_slice(&(body.len() as u64).to_le_bytes());
    image.extend(body);
    let fatbin = dir.path().join("suite.fatbin");
    std::fs::write(&fatbin, &image).unwrap();
    let (rc, stdout, _) = run(&[fatbin.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(rc, 0, "{stdout}");
    assert!(stdout.starts_with("fatbin entry: elf sm_90 "), "{stdout}");
    assert!(stdout.contains("fatbin: slicing the PTX for sm_90\n") && stdout.contains("(10 sliced, 0 refused)"));
    // Only PTX for a newer GPU than asked for: nothing to slice.
    let (rc, _, stderr) = run(&[fatbin.to_str().unwrap(), out.to_str().unwrap(), "--arch", "80"]);
    assert_eq!(rc, 3, "{stderr}");
    // Not PTX, not a fat binary; no such file; bad usage.
    std::fs::write(&fatbin, b"\xff\xfe binary").unwrap();
    assert_eq!(run(&[fatbin.to_str().unwrap(), out.to_str().unwrap()]).0, 1);
    assert_eq!(run(&["/nonexistent.ptx", out.to_str().unwrap()]).0, 2);
    assert_eq!(run(&["only-one-argument"]).0, 2);
}
