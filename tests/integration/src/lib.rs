//! Support code for the integration tests: runs the C client programs (tests/clients/cuclient.c)
//! against the simulated driver (tests/simcuda, tests/simnvml), with or without the shim preloaded.
//!
//! This crate never invokes cargo. `make test` (or `cargo build --workspace`) must have built the
//! cdylibs first; a missing artefact makes the tests panic with a message saying so.
//!
//! ```no_run
//! use gpuslice_integration::{Route, Sim};
//! let sim = Sim::new();
//! let out = sim.client(Route::Link).shim().env("GPUSLICE_MEMORY_LIMIT", "1GiB").args("init ctx 0 info").run();
//! assert_eq!(out.u64("info", "total"), 1 << 30);
//! ```

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// CUresult values the tests look for.
pub const CUDA_ERROR_INVALID_VALUE: i64 = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: i64 = 2;

/// How long one client run may take before the test fails (a hang is a failure).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The four ways the client reaches the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Linked with `-lcuda`, calls the versioned exports (`cuMemAlloc_v2`, ...).
    Link,
    /// `dlopen("libcuda.so.1")` + `dlsym` of versioned names (like PyTorch).
    Dlsym,
    /// `dlsym("cuGetProcAddress_v2")` only, everything else by base name through it (like cudart).
    Procaddr,
    /// As `Procaddr`, with `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
    ProcaddrPtsz,
}

impl Route {
    pub const ALL: [Route; 4] = [Route::Link, Route::Dlsym, Route::Procaddr, Route::ProcaddrPtsz];

    pub fn binary_name(self) -> &'static str {
        match self {
            Route::Link => "cuclient-link",
            Route::Dlsym => "cuclient-dlsym",
            Route::Procaddr => "cuclient-procaddr",
            Route::ProcaddrPtsz => "cuclient-procaddr-ptsz",
        }
    }

    fn cflags(self) -> &'static [&'static str] {
        match self {
            Route::Link => &["-DROUTE_LINK"],
            Route::Dlsym => &["-DROUTE_DLSYM"],
            Route::Procaddr => &["-DROUTE_PROCADDR"],
            Route::ProcaddrPtsz => &["-DROUTE_PROCADDR", "-DPTSZ"],
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.binary_name())
    }
}

// ---------------------------------------------------------------------------------------------
// Locations.

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// The cargo target directory (`CARGO_TARGET_DIR` if set, else `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The profile whose artefacts are tested: `debug`, or `GPUSLICE_TEST_PROFILE` (e.g. `release`).
pub fn profile() -> String {
    std::env::var("GPUSLICE_TEST_PROFILE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "debug".into())
}

/// `<target>/<profile>`.
pub fn profile_dir() -> PathBuf {
    target_dir().join(profile())
}

fn require(p: &Path, what: &str) -> PathBuf {
    if !p.exists() {
        panic!(
            "{what} not found at {}: run `cargo build --workspace`{} first (the integration tests \
             never run cargo themselves)",
            p.display(),
            if profile() == "release" { " --release" } else { "" }
        );
    }
    p.to_path_buf()
}

/// `<target>/<profile>/libgpuslice.so` (panics if it has not been built).
pub fn shim_path() -> PathBuf {
    require(&profile_dir().join("libgpuslice.so"), "the shim libgpuslice.so")
}

/// Whether the built shim exports (or at least names) `symbol`: a cheap check on the file bytes.
pub fn shim_mentions(symbol: &str) -> bool {
    let Ok(bytes) = std::fs::read(profile_dir().join("libgpuslice.so")) else { return false };
    let mut needle = symbol.as_bytes().to_vec();
    needle.push(0);
    bytes.windows(needle.len()).any(|w| w == needle.as_slice())
}

fn same_file_contents_stamp(src: &Path, dst: &Path) -> bool {
    let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) else { return false };
    a.len() == b.len() && a.modified().ok() == b.modified().ok()
}

/// Copy `src` to `dst` atomically (temp file + rename), keeping `src`'s mtime.
fn install(src: &Path, dst: &Path) {
    if same_file_contents_stamp(src, dst) {
        return;
    }
    let tmp = dst.with_extension(format!("tmp{}", std::process::id()));
    std::fs::copy(src, &tmp).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), tmp.display()));
    if let Ok(m) = std::fs::metadata(src).and_then(|m| m.modified()) {
        if let Ok(f) = std::fs::File::options().write(true).open(&tmp) {
            let _ = f.set_modified(m);
        }
    }
    std::fs::rename(&tmp, dst).unwrap_or_else(|e| panic!("rename to {}: {e}", dst.display()));
}

/// `<target>/sim/` with `libcuda.so.1`, `libcuda.so` (symlink) and `libnvidia-ml.so.1`, copied
/// from the cargo outputs of tests/simcuda and tests/simnvml.
pub fn sim_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let pd = profile_dir();
        let cuda = require(&pd.join("libsimcuda.so"), "the simulated driver libsimcuda.so");
        let nvml = require(&pd.join("libsimnvml.so"), "the simulated NVML libsimnvml.so");
        let dir = target_dir().join("sim");
        std::fs::create_dir_all(&dir).expect("create target/sim");
        install(&cuda, &dir.join("libcuda.so.1"));
        install(&nvml, &dir.join("libnvidia-ml.so.1"));
        let link = dir.join("libcuda.so");
        if std::fs::read_link(&link).map(|t| t != Path::new("libcuda.so.1")).unwrap_or(true) {
            let tmp = dir.join(format!("libcuda.so.tmp{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink("libcuda.so.1", &tmp).expect("symlink libcuda.so");
            std::fs::rename(&tmp, &link).expect("rename libcuda.so symlink");
        }
        dir
    })
    .clone()
}

fn newer(a: &Path, b: &Path) -> bool {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (m(a), m(b)) {
        (Some(x), Some(y)) => x > y,
        _ => true,
    }
}

/// `<target>/clients/` with the four client builds (rebuilt when tests/clients/cuclient.c is newer).
pub fn clients_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let sim = sim_dir();
        let src = workspace_root().join("tests/clients/cuclient.c");
        let dir = target_dir().join("clients");
        std::fs::create_dir_all(&dir).expect("create target/clients");
        let cc = std::env::var("CC").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "cc".into());
        for route in Route::ALL {
            let bin = dir.join(route.binary_name());
            if bin.exists() && !newer(&src, &bin) {
                continue;
            }
            let tmp = dir.join(format!("{}.tmp{}", route.binary_name(), std::process::id()));
            let mut cmd = Command::new(&cc);
            cmd.args(["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra"])
                .args(route.cflags())
                .arg("-o")
                .arg(&tmp)
                .arg(&src);
            if route == Route::Link {
                cmd.arg("-L").arg(&sim).arg("-lcuda");
            }
            cmd.args(["-ldl", "-lpthread"]);
            let out = cmd.output().unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
            if !out.status.success() {
                panic!(
                    "building {} failed:\n{}{}",
                    route.binary_name(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::fs::rename(&tmp, &bin).expect("install client");
        }
        dir
    })
    .clone()
}

pub fn client_path(route: Route) -> PathBuf {
    clients_dir().join(route.binary_name())
}

/// The C compiler: `$CC`, else `cc`.
pub fn c_compiler() -> String {
    std::env::var("CC").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "cc".into())
}

/// The C++ compiler: `$CXX`, else `c++`.
pub fn cxx_compiler() -> String {
    std::env::var("CXX").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "c++".into())
}

/// Build `<target>/clients/<output>` with `compiler` from `sources` (paths relative to the
/// workspace root) and `flags` (given after the sources, so `-l` options work), unless it exists
/// and is newer than every source and every file in `deps` (headers, libraries it links).
/// The result is installed atomically, so tests building the same artefact in parallel are fine.
/// `Err` carries the command and the compiler's output.
pub fn compile(compiler: &str, output: &str, sources: &[&str], flags: &[&str], deps: &[PathBuf]) -> Result<PathBuf, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let root = workspace_root();
    let dir = target_dir().join("clients");
    std::fs::create_dir_all(&dir).expect("create target/clients");
    let out = dir.join(output);
    let srcs: Vec<PathBuf> = sources.iter().map(|s| root.join(s)).collect();
    if out.exists() && !srcs.iter().chain(deps).any(|d| newer(d, &out)) {
        return Ok(out);
    }
    let tmp = dir.join(format!("{output}.tmp{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let mut cmd = Command::new(compiler);
    cmd.arg("-o").arg(&tmp).args(&srcs).args(flags);
    let shown = format!("{cmd:?}");
    let res = cmd.output().map_err(|e| format!("cannot run the compiler `{compiler}`: {e}"))?;
    if !res.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "{shown} failed:\n{}{}",
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        ));
    }
    std::fs::rename(&tmp, &out).map_err(|e| format!("install {}: {e}", out.display()))?;
    Ok(out)
}

/// `<target>/<profile>/gpuslice`, the command-line tool (panics if it has not been built).
pub fn cli_path() -> PathBuf {
    require(&profile_dir().join("gpuslice"), "the gpuslice command-line tool")
}

/// `<target>/<profile>/<name>`: a binary of the workspace, e.g. the `quota-fill` example.
pub fn workspace_binary(name: &str) -> PathBuf {
    require(&profile_dir().join(name), name)
}

// ---------------------------------------------------------------------------------------------
// A simulated machine.

/// One simulated machine: a fresh `SIMCUDA_STATE` file (in a temporary directory, removed on
/// drop) plus environment applied to every client started from it.
pub struct Sim {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Default for Sim {
    fn default() -> Self {
        Self::new()
    }
}

impl Sim {
    pub fn new() -> Sim {
        let mut b = tempfile::Builder::new();
        b.prefix("gpuslice-test-");
        let dir = if Path::new("/dev/shm").is_dir() { b.tempdir_in("/dev/shm") } else { b.tempdir() }
            .expect("temporary directory");
        Sim { dir, env: Vec::new() }
    }

    /// Set an environment variable for every client of this machine (e.g. `SIMCUDA_MEM`).
    pub fn env(mut self, k: &str, v: impl ToString) -> Sim {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// The `SIMCUDA_STATE` file (created by the first client).
    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("simcuda-state")
    }

    /// A path in this machine's temporary directory (for config files and the like).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write a file in the temporary directory and return its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write file");
        p
    }

    pub fn client(&self, route: Route) -> Client<'_> {
        Client { sim: self, route, program: None, env: Vec::new(), shim: false, args: Vec::new() }
    }

    /// Any other program, started like a client: the host's GPUSLICE_*/SIMCUDA_*/LD_* variables
    /// scrubbed, `LD_LIBRARY_PATH` at the simulated driver, this machine's `SIMCUDA_STATE` and
    /// environment. Its stdout lines are in [`Output::lines`] whatever their format.
    pub fn program(&self, path: impl AsRef<Path>) -> Client<'_> {
        Client {
            sim: self,
            route: Route::Link,
            program: Some(path.as_ref().to_path_buf()),
            env: Vec::new(),
            shim: false,
            args: Vec::new(),
        }
    }
}

/// A client invocation being prepared.
pub struct Client<'a> {
    sim: &'a Sim,
    route: Route,
    /// Set by [`Sim::program`]: run this instead of the route's client.
    program: Option<PathBuf>,
    env: Vec<(String, String)>,
    shim: bool,
    args: Vec<String>,
}

/// Variables of the host environment that must not leak into a client.
fn scrubbed(name: &OsStr) -> bool {
    let n = name.to_string_lossy();
    n.starts_with("GPUSLICE_")
        || n.starts_with("SIMCUDA_")
        || n.starts_with("CUDA_DEVICE_MEMORY")
        || n.starts_with("CUDA_DEVICE_SM")
        || n == "LD_PRELOAD"
        || n == "CUDA_VISIBLE_DEVICES"
        || n == "LD_LIBRARY_PATH"
}

impl<'a> Client<'a> {
    pub fn env(mut self, k: &str, v: impl ToString) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Preload the shim (`LD_PRELOAD=<target>/<profile>/libgpuslice.so`).
    pub fn shim(mut self) -> Self {
        self.shim = true;
        self
    }

    /// Preload the shim or not.
    pub fn with_shim(mut self, on: bool) -> Self {
        self.shim = on;
        self
    }

    /// Append commands, split on whitespace (`"init ctx 0 alloc 1M"`).
    pub fn args(mut self, script: &str) -> Self {
        self.args.extend(script.split_whitespace().map(str::to_string));
        self
    }

    /// Append one argument verbatim.
    pub fn arg(mut self, a: impl ToString) -> Self {
        self.args.push(a.to_string());
        self
    }

    fn command(&self) -> (Command, String) {
        let bin = match &self.program {
            Some(p) => p.clone(),
            None => client_path(self.route),
        };
        let mut cmd = Command::new(&bin);
        for (k, _) in std::env::vars_os() {
            if scrubbed(&k) {
                cmd.env_remove(&k);
            }
        }
        cmd.env("LD_LIBRARY_PATH", sim_dir());
        cmd.env("SIMCUDA_STATE", self.sim.state_path());
        let mut shown = Vec::new();
        if self.shim {
            let s = shim_path();
            shown.push(format!("LD_PRELOAD={}", s.display()));
            cmd.env("LD_PRELOAD", s);
        }
        for (k, v) in self.sim.env.iter().chain(self.env.iter()) {
            cmd.env(k, v);
            shown.push(format!("{k}={v}"));
        }
        cmd.args(&self.args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        shown.push(bin.file_name().unwrap().to_string_lossy().into_owned());
        shown.extend(self.args.iter().cloned());
        (cmd, shown.join(" "))
    }

    /// Start the client without waiting (for multi-process tests).
    pub fn spawn(self) -> Running {
        let (mut cmd, cmdline) = self.command();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
        let mut so = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = se.read_to_string(&mut s);
            s
        });
        Running { child, cmdline, out_t, err_t, started: Instant::now() }
    }

    /// Run the client to completion.
    pub fn run(self) -> Output {
        self.spawn().wait()
    }
}

/// A client process started with [`Client::spawn`].
pub struct Running {
    child: Child,
    cmdline: String,
    out_t: std::thread::JoinHandle<String>,
    err_t: std::thread::JoinHandle<String>,
    started: Instant,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill the client with SIGKILL (it is reaped by the following [`Running::wait`]).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    pub fn wait(mut self) -> Output {
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for client") {
                break s;
            }
            if self.started.elapsed() > CLIENT_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let so = self.out_t.join().unwrap_or_default();
                let se = self.err_t.join().unwrap_or_default();
                panic!("client timed out after {CLIENT_TIMEOUT:?}: {}\nstdout:\n{so}\nstderr:\n{se}", self.cmdline);
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let stdout = self.out_t.join().unwrap_or_default();
        let stderr = self.err_t.join().unwrap_or_default();
        Output {
            lines: stdout.lines().map(str::to_string).collect(),
            stderr,
            status,
            cmdline: self.cmdline,
            elapsed: self.started.elapsed(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

/// What a client printed: one stdout line per command.
pub struct Output {
    pub lines: Vec<String>,
    pub stderr: String,
    pub status: ExitStatus,
    pub cmdline: String,
    pub elapsed: Duration,
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.cmdline)?;
        writeln!(f, "status: {}", self.status)?;
        writeln!(f, "stdout:")?;
        for l in &self.lines {
            writeln!(f, "  {l}")?;
        }
        writeln!(f, "stderr:")?;
        for l in self.stderr.lines() {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The value of `key=` in an output line.
pub fn kv<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    line.split_whitespace().skip(2).find_map(|t| t.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The command name of an output line (`ok alloc ...` -> `alloc`).
pub fn line_cmd(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or("")
}

pub fn line_ok(line: &str) -> bool {
    line.starts_with("ok ")
}

/// The CUresult of an `err` line (`None` for `ok` lines).
pub fn line_code(line: &str) -> Option<i64> {
    if line_ok(line) {
        return None;
    }
    kv(line, "code").and_then(|c| c.parse().ok())
}

/// A line with values that legitimately differ between runs (pointers, handles, timings) masked.
pub fn normalize(line: &str) -> String {
    line.split_whitespace()
        .map(|t| match t.split_once('=') {
            Some((k, v)) if v.starts_with("0x") || v == "(nil)" => format!("{k}=<ptr>"),
            Some((k, _)) if k == "ms" || k == "pid" => format!("{k}=<var>"),
            _ => t.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panic (showing everything) unless the client exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "client failed:\n{self}");
        self
    }

    /// Line `i` (0-based; command `i` of the script).
    pub fn line(&self, i: usize) -> &str {
        self.lines.get(i).unwrap_or_else(|| panic!("no output line {i}:\n{self}"))
    }

    /// All lines of command `cmd`, in order.
    pub fn lines_of(&self, cmd: &str) -> Vec<&str> {
        self.lines.iter().filter(|l| line_cmd(l) == cmd).map(String::as_str).collect()
    }

    /// The `n`-th (0-based) line of command `cmd`.
    pub fn nth(&self, cmd: &str, n: usize) -> &str {
        self.lines_of(cmd).get(n).copied().unwrap_or_else(|| panic!("no line #{n} of `{cmd}`:\n{self}"))
    }

    /// The first line of command `cmd`.
    pub fn first(&self, cmd: &str) -> &str {
        self.nth(cmd, 0)
    }

    /// The last line of command `cmd`.
    pub fn last(&self, cmd: &str) -> &str {
        self.lines_of(cmd).last().copied().unwrap_or_else(|| panic!("no line of `{cmd}`:\n{self}"))
    }

    /// `key` of the first line of `cmd`, as a string.
    pub fn get(&self, cmd: &str, key: &str) -> Option<String> {
        self.lines_of(cmd).first().and_then(|l| kv(l, key)).map(str::to_string)
    }

    /// `key` of the first line of `cmd`, as a number (panics with the whole output if absent).
    pub fn u64(&self, cmd: &str, key: &str) -> u64 {
        self.nth_u64(cmd, 0, key)
    }

    /// `key` of the `n`-th line of `cmd`, as a number.
    pub fn nth_u64(&self, cmd: &str, n: usize, key: &str) -> u64 {
        let l = self.nth(cmd, n);
        kv(l, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric {key}= in line `{l}`:\n{self}"))
    }

    /// `key` of line `i`, as a number.
    pub fn line_u64(&self, i: usize, key: &str) -> u64 {
        let l = self.line(i);
        kv(l, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {key}= in line `{l}`:\n{self}"))
    }

    /// `key` of line `i`, as a float.
    pub fn line_f64(&self, i: usize, key: &str) -> f64 {
        let l = self.line(i);
        kv(l, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {key}= in line `{l}`:\n{self}"))
    }

    /// Whether line `i` is an `ok` line.
    pub fn ok(&self, i: usize) -> bool {
        line_ok(self.line(i))
    }

    /// The CUresult of line `i` (0 for `ok`).
    pub fn code(&self, i: usize) -> i64 {
        let l = self.line(i);
        if line_ok(l) {
            0
        } else {
            line_code(l).unwrap_or_else(|| panic!("line {i} is neither ok nor err with a code: `{l}`:\n{self}"))
        }
    }

    /// Panic unless line `i` is `ok`.
    pub fn expect_ok(&self, i: usize) -> &str {
        let l = self.line(i);
        assert!(line_ok(l), "line {i} should be ok: `{l}`\n{self}");
        l
    }

    /// Panic unless line `i` is `err` with `code`.
    pub fn expect_err(&self, i: usize, code: i64) -> &str {
        let l = self.line(i);
        assert_eq!(line_code(l), Some(code), "line {i} should be err code={code}: `{l}`\n{self}");
        l
    }

    /// Panic unless every line is `ok`.
    pub fn assert_all_ok(&self) -> &Self {
        self.assert_success();
        for (i, l) in self.lines.iter().enumerate() {
            assert!(line_ok(l), "line {i} should be ok: `{l}`\n{self}");
        }
        self
    }

    /// Lines with pointers, handles and timings masked (see [`normalize`]).
    pub fn normalized(&self) -> Vec<String> {
        self.lines.iter().map(|l| normalize(l)).collect()
    }

    /// Lines of stderr containing every one of `needles`.
    pub fn stderr_lines_with(&self, needles: &[&str]) -> Vec<&str> {
        self.stderr.lines().filter(|l| needles.iter().all(|n| l.contains(n))).collect()
    }
}

/// Parse the size notation of the client (`4M`, `1G`, plain bytes).
pub fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (n, m) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let n: u64 = n.parse().expect("number");
    n * match m.to_ascii_uppercase().trim_end_matches('B').trim_end_matches('I') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        other => panic!("bad size suffix {other}"),
    }
}

/// Call `f` every 10 ms until it returns true or `timeout` passes; returns the last answer.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
