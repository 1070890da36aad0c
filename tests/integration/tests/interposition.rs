//! How the shim sits in a process: `dlsym(RTLD_NEXT)` keeps its meaning, the public C header and
//! the exported version agree with the workspace, panics stay on the shim's side of the FFI
//! boundary, logging never touches stdout, a real Rust program (cudarc) is held to its quota, and
//! the `gpuslice` command-line tool starts programs under the shim.

use gpuslice_integration::*;
use std::path::PathBuf;
use std::sync::OnceLock;

/// CUDA_ERROR_UNKNOWN: what a hook that panicked returns.
const CUDA_ERROR_UNKNOWN: i64 = 999;

fn compile_or_panic(compiler: &str, output: &str, sources: &[&str], flags: &[&str], deps: &[PathBuf]) -> PathBuf {
    compile(compiler, output, sources, flags, deps).unwrap_or_else(|e| panic!("{e}"))
}

// ------------------------------------------------------------------------------ dlsym(RTLD_NEXT)

/// `<target>/clients/dlnext`, linked against `libnext_a.so` then `libnext_b.so` (same directory,
/// found through its rpath).
fn dlnext() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cc = c_compiler();
        let shared = ["-shared", "-fPIC", "-O1", "-g", "-Wall", "-Wextra", "-Werror"];
        let b = compile_or_panic(&cc, "libnext_b.so", &["tests/clients/dlnext_b.c"], &shared, &[]);
        let mut flags_a = shared.to_vec();
        flags_a.push("-ldl");
        let a = compile_or_panic(&cc, "libnext_a.so", &["tests/clients/dlnext_a.c"], &flags_a, &[]);
        let dir = a.parent().unwrap().to_str().expect("utf-8 target path").to_string();
        let (ldir, rpath) = (format!("-L{dir}"), format!("-Wl,-rpath,{dir}"));
        compile_or_panic(
            &cc,
            "dlnext",
            &["tests/clients/dlnext.c"],
            // --no-as-needed: the program calls nothing of libnext_b.so, but must still load it,
            // after libnext_a.so.
            &["-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fPIE", "-pie", &ldir, &rpath, "-Wl,--no-as-needed", "-lnext_a", "-lnext_b", "-ldl"],
            &[a, b],
        )
    })
    .clone()
}

#[test]
fn dlsym_rtld_next_keeps_its_meaning_under_the_shim() {
    let sim = Sim::new();
    let bare = sim.program(dlnext()).run();
    let shim = sim.program(dlnext()).shim().run();
    for out in [&bare, &shim] {
        out.assert_all_ok();
        assert_eq!(out.u64("which", "value"), 1, "the program binds to libnext_a's `which`:\n{out}");
        assert_eq!(out.u64("call_next", "value"), 2, "dlsym(RTLD_NEXT, \"which\") from libnext_a.so must find libnext_b.so's:\n{out}");
        assert_eq!(out.get("malloc", "direct").as_deref(), Some("1"), "RTLD_NEXT malloc is the malloc the program calls:\n{out}");
    }
    // dlsym(RTLD_NEXT, "malloc") from the main program: the same object, offset and symbol.
    assert_eq!(bare.first("malloc"), shim.first("malloc"), "\n{bare}\n{shim}");
    assert!(!bare.first("malloc").contains("gpuslice"), "{bare}");

    assert_eq!(bare.get("gpuslice_version", "found").as_deref(), Some("0"), "no gpuslice_version without the shim:\n{bare}");
    assert_eq!(shim.get("gpuslice_version", "found").as_deref(), Some("1"), "gpuslice_version with the shim:\n{shim}");
}

// ------------------------------------------------------------------------------ header, version

/// `version = "..."` of `[workspace.package]` in the workspace's Cargo.toml.
fn workspace_version() -> String {
    let text = std::fs::read_to_string(workspace_root().join("Cargo.toml")).expect("read Cargo.toml");
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if in_section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "version" {
                    return v.trim().trim_matches('"').to_string();
                }
            }
        }
    }
    panic!("no version in [workspace.package] of Cargo.toml");
}

/// `#define GPUSLICE_VERSION_STRING "..."` in include/gpuslice.h.
fn header_version() -> String {
    let text = std::fs::read_to_string(workspace_root().join("include/gpuslice.h")).expect("read include/gpuslice.h");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("#define GPUSLICE_VERSION_STRING"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("GPUSLICE_VERSION_STRING in include/gpuslice.h")
}

#[test]
fn the_header_and_the_exported_version_agree_with_the_workspace() {
    assert_eq!(header_version(), workspace_version(), "GPUSLICE_VERSION_STRING in include/gpuslice.h vs Cargo.toml");

    let header = workspace_root().join("include/gpuslice.h");
    let include = format!("-I{}", workspace_root().join("include").display());
    let builds = [
        (c_compiler(), "header-version-c", vec!["-std=c11", "-Wall", "-Wextra", "-Werror", "-x", "c"]),
        (cxx_compiler(), "header-version-cxx", vec!["-std=c++17", "-Wall", "-Wextra", "-Werror", "-x", "c++"]),
    ];
    let sim = Sim::new();
    for (compiler, name, mut flags) in builds {
        // `-x LANG` applies to the files after it, so the source goes last here.
        let src = workspace_root().join("tests/clients/header_version.c");
        flags.insert(0, &include);
        flags.push(src.to_str().unwrap());
        flags.extend(["-x", "none", "-ldl"]);
        let bin = compile(&compiler, name, &[], &flags, &[header.clone(), src.clone()])
            .unwrap_or_else(|e| panic!("include/gpuslice.h does not build cleanly as {name}:\n{e}"));

        let out = sim.program(&bin).shim().run();
        out.assert_all_ok();
        assert_eq!(out.get("version", "loaded"), Some(workspace_version()), "{name}: gpuslice_version():\n{out}");
        assert_eq!(out.get("version", "match").as_deref(), Some("1"), "{name}:\n{out}");

        let out = sim.program(&bin).run();
        out.assert_all_ok();
        assert_eq!(out.get("version", "loaded").as_deref(), Some("-"), "{name}: no gpuslice without the shim:\n{out}");
    }
}

// ------------------------------------------------------------------------------ panics

#[test]
fn a_panicking_hook_returns_an_error_and_the_program_goes_on() {
    let reserve = 300 * MIB;
    for route in [Route::Link, Route::Dlsym, Route::Procaddr] {
        let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", reserve);
        let out =
            sim.client(route).shim().env("GPUSLICE_TEST_PANIC_IN", "cuMemAlloc_v2").env("RUST_BACKTRACE", "0").args("init ctx 0 alloc 1M alloc 1M info").run();
        out.assert_success();
        assert_eq!(out.lines.len(), 5, "{route}: every command printed:\n{out}");
        out.expect_ok(0);
        out.expect_ok(1);
        out.expect_err(2, CUDA_ERROR_UNKNOWN);
        out.expect_err(3, CUDA_ERROR_UNKNOWN);
        out.expect_ok(4);
        // the hook panicked before reaching the driver: nothing is held but the context
        assert_eq!(out.u64("info", "free"), out.u64("info", "total") - reserve, "{route}: nothing allocated:\n{out}");
        assert!(!out.stderr_lines_with(&["gpuslice", "cuMemAlloc_v2"]).is_empty(), "{route}: stderr names gpuslice and the hook:\n{out}");
        assert!(out.lines.iter().all(|l| !l.contains("panic")), "{route}: nothing on stdout:\n{out}");
    }
}

// ------------------------------------------------------------------------------ logging

#[test]
fn the_log_file_takes_the_shims_lines_and_stderr_stays_clean() {
    let sim = Sim::new();
    let log = sim.path("log");
    let out = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_LOG", "info")
        .env("GPUSLICE_LOG_FILE", log.display())
        .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
        .args("init ctx 0 alloc 2G info")
        .run();
    out.assert_success();
    out.expect_err(2, CUDA_ERROR_OUT_OF_MEMORY);
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}\n{out}", log.display()));
    assert!(text.contains("active in pid"), "the start line is in the log file:\n{text}");
    assert_eq!(text.lines().filter(|l| l.contains("refused") && l.contains("limit")).count(), 1, "one refusal line in the log file:\n{text}");
    let shim_lines: Vec<&str> = out.stderr.lines().filter(|l| l.contains("gpuslice") || l.contains("active in pid") || l.contains("limit")).collect();
    assert!(shim_lines.is_empty(), "nothing of the shim on stderr with GPUSLICE_LOG_FILE:\n{out}");
}

#[test]
fn nothing_from_the_shim_reaches_stdout() {
    // A 1 GiB device: without the shim the driver refuses the 2 GiB allocation, with it the quota
    // does (and logs it), so the two runs must print the same lines.
    let script = "init ctx 0 alloc 100M alloc 2G info free 1 info";
    for route in Route::ALL {
        let sim = Sim::new().env("SIMCUDA_MEM", GIB);
        let bare = sim.client(route).args(script).run();
        let shim = sim.client(route).shim().env("GPUSLICE_LOG", "trace").env("GPUSLICE_MEMORY_LIMIT", "1GiB").args(script).run();
        bare.assert_success();
        shim.assert_success();
        bare.expect_err(3, CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(bare.normalized(), shim.normalized(), "{route}: stdout with and without the shim:\n{bare}\n{shim}");
        assert_eq!(shim.stderr_lines_with(&["refused", "limit"]).len(), 1, "{route}: the refusal went to stderr:\n{shim}");
    }
}

#[test]
fn a_bad_log_filter_warns_once_and_means_warn() {
    let sim = Sim::new();
    let out = sim.client(Route::Dlsym).shim().env("GPUSLICE_LOG", "?!").env("GPUSLICE_MEMORY_LIMIT", "1GiB").args("init ctx 0 alloc 2G info").run();
    out.assert_success();
    out.expect_err(2, CUDA_ERROR_OUT_OF_MEMORY);
    assert_eq!(out.stderr_lines_with(&["gpuslice", "GPUSLICE_LOG", "?!"]).len(), 1, "one warning naming the filter:\n{out}");
    assert!(out.stderr_lines_with(&["active in pid"]).is_empty(), "info lines are off:\n{out}");
    assert_eq!(out.stderr_lines_with(&["refused", "limit"]).len(), 1, "warnings are on:\n{out}");
}

// ------------------------------------------------------------------------------ quota-fill (cudarc)

fn quota_fill(sim: &Sim, shim: bool, args: &str) -> Output {
    let mut c = sim.program(workspace_binary("quota-fill"));
    if shim {
        c = c.shim().env("GPUSLICE_MEMORY_LIMIT", "4GiB");
    }
    let out = c.args(args).run();
    out.assert_success();
    out
}

/// The number in `held N chunks` of quota-fill's output.
fn held_chunks(out: &Output) -> u64 {
    out.lines.iter().find_map(|l| l.strip_prefix("held ")?.split_whitespace().next()?.parse().ok()).unwrap_or_else(|| panic!("no `held N chunks` line:\n{out}"))
}

#[test]
fn quota_fill_is_held_to_its_quota() {
    let reserve = 300 * MIB;
    let sim = Sim::new().env("SIMCUDA_CTX_RESERVE", reserve);
    let out = quota_fill(&sim, true, "256");
    assert!(out.lines.iter().any(|l| l.contains("total 4096 MiB")), "the quota is the total:\n{out}");
    let fits = (4 * GIB - reserve) / (256 * MIB);
    assert_eq!(fits, 14);
    assert_eq!(held_chunks(&out), fits, "14 × 256 MiB + 300 MiB ≤ 4 GiB < 15 × 256 MiB + 300 MiB:\n{out}");
    assert!(out.lines.iter().any(|l| l.starts_with("chunk 15 ") && l.contains("OUT_OF_MEMORY")), "{out}");
    assert!(out.lines.iter().any(|l| l.ends_with("a new chunk: allocated")), "allocates again after freeing:\n{out}");

    // the same machine without the shim: 20 chunks (5 GiB) is no problem
    let out = quota_fill(&sim, false, "256 20");
    assert!(out.lines.iter().any(|l| l.contains("total 16384 MiB")), "{out}");
    assert_eq!(held_chunks(&out), 20, "{out}");
    assert!(out.lines.iter().any(|l| l.ends_with("a new chunk: allocated")), "{out}");
}

// ------------------------------------------------------------------------------ the CLI

#[test]
fn gpuslice_run_starts_the_program_under_the_shim() {
    let sim = Sim::new();
    let out = sim.program(cli_path()).args("run --memory 1GiB --").arg(client_path(Route::Link).display()).args("init ctx 0 info").run();
    out.assert_all_ok();
    assert_eq!(out.u64("info", "total"), GIB, "{out}");

    let out = sim.program(cli_path()).args("run --memory lots -- true").run();
    assert!(!out.success(), "a bad --memory fails:\n{out}");
    assert_eq!(out.stderr_lines_with(&["--memory", "lots"]).len(), 1, "the message names --memory:\n{out}");
}

#[test]
fn check_config_shows_the_line_of_a_toml_error() {
    let sim = Sim::new();
    let bad = sim.write_file("bad.toml", "# a comment\n[defaults]\nmemory_limit = \"1GiB\"\n\n[defaults.devices.1\n");
    let out = sim.program(cli_path()).arg("check-config").arg(bad.display()).run();
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("line 5"), "the error names line 5:\n{out}");

    let good = sim.write_file("good.toml", "[defaults]\nmemory_limit = \"1GiB\"\n");
    let out = sim.program(cli_path()).arg("check-config").arg(good.display()).run();
    out.assert_success();
}
