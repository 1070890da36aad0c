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
use std::io::{BufRead, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
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
    let build = format!("cargo build --workspace{}", if profile() == "release" { " --release" } else { "" });
    if !p.exists() {
        panic!("{what} not found at {}: run `{build}` first (the integration tests never run cargo themselves)", p.display());
    }
    check_fresh(p, what, &build);
    p.to_path_buf()
}

/// Set to `1` to run the tests on artefacts older than their sources (an A/B that swaps in
/// another build with its old timestamp).
pub const ENV_STALE_OK: &str = "GPUSLICE_TEST_STALE_OK";

/// Panics when the artefact `p` is older than a source it is built from, or was built from
/// another tree: `cargo test` rebuilds none of what these tests load, and an old shim fails in
/// ways that look like flakes of the tree's code (docs/NOTES.md, branch coldflake). Checked once
/// per artefact and process.
fn check_fresh(p: &Path, what: &str, build: &str) {
    static CHECKED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    if std::env::var(ENV_STALE_OK).is_ok_and(|v| v == "1") {
        return;
    }
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.iter().any(|c| c == p) {
        return;
    }
    if let Some(why) = stale_reason(p, &workspace_root()) {
        panic!(
            "{what} at {} {why}: run `{build}` first (the integration tests never run cargo themselves; {ENV_STALE_OK}=1 runs them on it anyway)",
            p.display()
        );
    }
    checked.push(p.to_path_buf());
}

/// Why the cargo artefact `artefact` is stale against the sources under `root` that its dep-info
/// (`<artefact without extension>.d`, cargo's list of what it was built from) names: a source
/// newer than it, one gone, or none under `root` (built from another tree). `None`: fresh, or no
/// dep-info to judge by.
pub fn stale_reason(artefact: &Path, root: &Path) -> Option<String> {
    let built = std::fs::metadata(artefact).and_then(|m| m.modified()).ok()?;
    let deps = std::fs::read_to_string(artefact.with_extension("d")).ok()?;
    let mut named = 0usize;
    let mut ours = 0usize;
    for line in deps.lines() {
        let Some((_, list)) = line.split_once(": ") else { continue };
        for dep in dep_info_paths(list) {
            named += 1;
            let dep = PathBuf::from(dep);
            let Ok(relative) = dep.strip_prefix(root) else { continue };
            ours += 1;
            match std::fs::metadata(&dep).and_then(|m| m.modified()) {
                Err(_) => return Some(format!("was built from {}, which is gone", relative.display())),
                Ok(m) if m > built => {
                    let by = m.duration_since(built).unwrap_or_default();
                    return Some(format!("is older than {} ({:.1} s), which it is built from", relative.display(), by.as_secs_f64()));
                }
                Ok(_) => {}
            }
        }
    }
    (named > 0 && ours == 0).then(|| format!("was built from another tree (its sources are not under {})", root.display()))
}

/// The paths of a dep-info rule's prerequisites (whitespace-separated, `\ ` an escaped space).
fn dep_info_paths(list: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut cur = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|n| *n == ' ' || *n == '\\') => cur.push(chars.next().unwrap_or(' ')),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    paths.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        paths.push(cur);
    }
    paths
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
            cmd.args(["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra"]).args(route.cflags()).arg("-o").arg(&tmp).arg(&src);
            if route == Route::Link {
                cmd.arg("-L").arg(&sim).arg("-lcuda");
            }
            cmd.args(["-ldl", "-lpthread"]);
            let out = cmd.output().unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
            if !out.status.success() {
                panic!("building {} failed:\n{}{}", route.binary_name(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
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
        return Err(format!("{shown} failed:\n{}{}", String::from_utf8_lossy(&res.stdout), String::from_utf8_lossy(&res.stderr)));
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
    /// Variables for its controllers only (`controller_env`).
    controller_env: Vec<(String, String)>,
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
        let dir = if Path::new("/dev/shm").is_dir() { b.tempdir_in("/dev/shm") } else { b.tempdir() }.expect("temporary directory");
        Sim { dir, env: Vec::new(), controller_env: Vec::new() }
    }

    /// Set an environment variable for every client of this machine (e.g. `SIMCUDA_MEM`).
    pub fn env(mut self, k: &str, v: impl ToString) -> Sim {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Set an environment variable for every controller of this machine, and for nothing else
    /// (a controller's test knob, e.g. `GPUSLICE_TEST_POLICY_DELAY_MS`).
    pub fn controller_env(mut self, k: &str, v: impl ToString) -> Sim {
        self.controller_env.push((k.to_string(), v.to_string()));
        self
    }

    /// Puts every process of this machine on one simulated clock (`SIMCUDA_CLOCK`): virtual
    /// time that moves only when all of them wait, so shares and latencies judged on it do not
    /// depend on the machine's load. The test takes part through `clock()`.
    pub fn with_clock(self) -> Sim {
        let path = self.dir.path().join("simclock");
        self.env("SIMCUDA_CLOCK", path.display())
    }

    /// The calling thread's part in this machine's simulated clock (see `with_clock`): while it
    /// runs, virtual time stands still.
    pub fn clock(&self) -> Clock {
        let path = self.dir.path().join("simclock");
        let page = simclock::Page::open(&path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
        let slot = page.join().expect("a free slot on the simulated clock");
        Clock { page, slot }
    }

    /// The `SIMCUDA_STATE` file (created by the first client).
    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("simcuda-state")
    }

    /// This machine's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path in this machine's temporary directory (for config files and the like).
    /// `path(name)` as a string, for command lines.
    pub fn path_str(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write a file in the temporary directory and return its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write file");
        p
    }

    /// The `GPUSLICE_SOCKET` every client and program of this machine gets unless the test sets
    /// one: a path in the temporary directory where nothing listens, so that tests never join
    /// a controller of the host (`/run/gpuslice/gpuslice.sock`).
    pub fn no_controller_socket(&self) -> PathBuf {
        self.dir.path().join("no-controller.sock")
    }

    /// Starts `gpuslice serve` for this machine (see [`Controller`]).
    pub fn controller(&self) -> Controller<'_> {
        Controller::start(self, None)
    }

    /// Starts `gpuslice serve --config <file>` with `toml` written to `controller.toml`.
    pub fn controller_with_config(&self, toml: &str) -> Controller<'_> {
        let config = self.write_file("controller.toml", toml);
        Controller::start(self, Some(config))
    }

    /// Starts `gpuslice serve` with more arguments (e.g. `--metrics 127.0.0.1:PORT`), kept
    /// across [`Controller::restart`].
    pub fn controller_with_args(&self, args: &[&str]) -> Controller<'_> {
        let mut c = Controller { sim: self, config: None, extra: args.iter().map(|a| a.to_string()).collect(), child: None, starts: 0 };
        c.launch();
        c
    }

    pub fn client(&self, route: Route) -> Client<'_> {
        Client { sim: self, route, program: None, env: Vec::new(), shim: false, args: Vec::new(), uid: None }
    }

    /// Any other program, started like a client: the host's GPUSLICE_*/SIMCUDA_*/LD_* variables
    /// scrubbed, `LD_LIBRARY_PATH` at the simulated driver, this machine's `SIMCUDA_STATE` and
    /// environment. Its stdout lines are in [`Output::lines`] whatever their format.
    pub fn program(&self, path: impl AsRef<Path>) -> Client<'_> {
        Client { sim: self, route: Route::Link, program: Some(path.as_ref().to_path_buf()), env: Vec::new(), shim: false, args: Vec::new(), uid: None }
    }
}

impl Sim {
    /// Device 0's free memory as the driver reports it (NVML, no shim, no context of its own).
    pub fn device_free(&self) -> u64 {
        let out = self.client(Route::Link).args("nvml 0").run();
        out.assert_all_ok();
        out.u64("nvml", "free")
    }

    /// The UUID the simulated driver gives device `d` of this machine (as `nvmlDeviceGetUUID`
    /// prints it): tests/simcuda's `device_uuid`, derived from the state file's path.
    pub fn device_uuid(&self, d: u32) -> String {
        let path = self.state_path().display().to_string();
        let machine = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let mut u: [u8; 16] = [0x5e, 0x1c, 0xc0, 0xda, 0x9a, 0x3b, 0x4c, 0x11, 0x8e, 0x2f, 0x60, 0, 0, 0, 0, 0];
        u[8..14].copy_from_slice(&machine.to_le_bytes()[..6]);
        u[15] = d as u8;
        u[14] = (d >> 8) as u8;
        u[7] = 0x11u8.wrapping_add(d as u8);
        let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
        format!("GPU-{}-{}-{}-{}-{}", h[0..4].concat(), h[4..6].concat(), h[6..8].concat(), h[8..10].concat(), h[10..16].concat())
    }

    /// The UUID of device `d`'s MIG instance when `SIMCUDA_MIG` names it (as NVML prints it):
    /// tests/simcuda's `mig_uuid`, the GPU's with other first bytes.
    pub fn mig_uuid(&self, d: u32) -> String {
        format!("MIG-619e{}", &self.device_uuid(d)[8..])
    }
}

impl Drop for Sim {
    /// The shim's per-device turn pages (`/dev/shm/gpuslice-board7-<uid>-<uuid>`) outlive its
    /// processes, and every simulated machine has devices of its own UUIDs: remove this
    /// machine's, so that test runs do not fill /dev/shm.
    fn drop(&mut self) {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        for d in 0..16 {
            let _ = std::fs::remove_file(format!("/dev/shm/gpuslice-board7-{uid}-{}", self.device_uuid(d)));
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
    /// Run as this uid (and the same gid); only root can.
    uid: Option<u32>,
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

    /// Join `controller`: `GPUSLICE_SOCKET` at its socket.
    pub fn controller(self, controller: &Controller<'_>) -> Self {
        let socket = controller.socket().display().to_string();
        self.env("GPUSLICE_SOCKET", socket)
    }

    /// `GPUSLICE_GROUP=name`.
    pub fn group(self, name: &str) -> Self {
        self.env("GPUSLICE_GROUP", name)
    }

    /// Run as `uid` (gid the same, no supplementary groups). Only root may.
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
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
        // Hermetic: no controller unless the test names one (set below, after this default).
        cmd.env("GPUSLICE_SOCKET", self.sim.no_controller_socket());
        // With a socket in its environment a process must have a controller (issue 13: no
        // fail-open); tests that mean it run alone when none answers, at once, unless they say
        // otherwise (the no-fail-open tests do).
        cmd.env("GPUSLICE_ON_NO_CONTROLLER", "alone");
        cmd.env("GPUSLICE_CONTROLLER_WAIT", "0");
        let mut shown = Vec::new();
        if let Some(uid) = self.uid {
            cmd.uid(uid).gid(uid);
            shown.push(format!("(uid {uid})"));
        }
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

    /// Start the client without waiting (for multi-process tests). Its output lines can be
    /// waited for while it runs ([`Running::wait_line`]); it is killed if dropped unwaited.
    pub fn spawn(self) -> Running {
        let (mut cmd, cmdline) = self.command();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
        let so = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let stdout = Arc::new(Stream::default());
        let stderr = Arc::new(Mutex::new(String::new()));
        let out_t = {
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(so);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                            stdout.lines.lock().unwrap().push(line);
                            stdout.changed.notify_all();
                        }
                    }
                }
                *stdout.closed.lock().unwrap() = true;
                stdout.changed.notify_all();
            })
        };
        let err_t = {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                loop {
                    match se.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => stderr.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n])),
                    }
                }
            })
        };
        Running { child, cmdline, stdout, stderr, threads: Some((out_t, err_t)), started: Instant::now(), reaped: false }
    }

    /// Run the client to completion.
    pub fn run(self) -> Output {
        self.spawn().wait()
    }
}

/// A client's stdout lines as they come.
#[derive(Default)]
struct Stream {
    lines: Mutex<Vec<String>>,
    /// True once stdout reached its end.
    closed: Mutex<bool>,
    changed: Condvar,
}

/// A client process started with [`Client::spawn`].
pub struct Running {
    child: Child,
    cmdline: String,
    stdout: Arc<Stream>,
    stderr: Arc<Mutex<String>>,
    threads: Option<(std::thread::JoinHandle<()>, std::thread::JoinHandle<()>)>,
    started: Instant,
    reaped: bool,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill the client with SIGKILL (it is reaped by the following [`Running::wait`]).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Send `signal` to the client.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// The lines printed so far.
    pub fn lines_now(&self) -> Vec<String> {
        self.stdout.lines.lock().unwrap().clone()
    }

    /// What it wrote on stderr so far.
    pub fn stderr_now(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// What it wrote on stderr, once `pred` holds of it, or after 10 s whatever it is then (the
    /// caller's assertion says what is missing). A thread of the test reads the client's stderr
    /// and may lag behind it under load: a line the client wrote before it answered something
    /// (an agent's "suspended" line before the controller's `suspend` returns) need not be in
    /// `stderr_now` yet.
    pub fn stderr_when(&self, pred: impl Fn(&str) -> bool) -> String {
        let mut now = self.stderr_now();
        poll_until(Duration::from_secs(10), || {
            now = self.stderr_now();
            pred(&now)
        });
        now
    }

    /// Waits until the client has printed a line for which `pred` holds, and returns it.
    /// Panics (showing everything printed) after `timeout`, or when its stdout closes first.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.wait_pick(what, timeout, |lines| lines.iter().find(|l| pred(l)).cloned())
    }

    /// Waits for the `n`-th (0-based) line of command `cmd` (ok or err) and returns it.
    pub fn wait_line(&self, cmd: &str, n: usize) -> String {
        self.wait_pick(&format!("line #{n} of `{cmd}`"), CLIENT_TIMEOUT, |lines| lines.iter().filter(|l| line_cmd(l) == cmd).nth(n).cloned())
    }

    fn wait_pick(&self, what: &str, timeout: Duration, pick: impl Fn(&[String]) -> Option<String>) -> String {
        let end = Instant::now() + timeout;
        let mut lines = self.stdout.lines.lock().unwrap();
        loop {
            if let Some(l) = pick(&lines) {
                return l;
            }
            let closed = *self.stdout.closed.lock().unwrap();
            let now = Instant::now();
            if closed || now >= end {
                let so = lines.join("\n  ");
                drop(lines);
                panic!(
                    "{} waiting for {what}: {}\nstdout so far:\n  {so}\nstderr so far:\n{}",
                    if closed { "the client's output ended" } else { "timed out" },
                    self.cmdline,
                    self.stderr_now()
                );
            }
            lines = self.stdout.changed.wait_timeout(lines, (end - now).min(Duration::from_millis(50))).unwrap().0;
        }
    }

    pub fn wait(mut self) -> Output {
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for client") {
                break s;
            }
            if self.started.elapsed() > CLIENT_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.reaped = true;
                self.join_readers();
                panic!("client timed out after {CLIENT_TIMEOUT:?}: {}\nstdout:\n{}\nstderr:\n{}", self.cmdline, self.lines_now().join("\n"), self.stderr_now());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        self.reaped = true;
        self.join_readers();
        Output { lines: self.lines_now(), stderr: self.stderr_now(), status, cmdline: self.cmdline.clone(), elapsed: self.started.elapsed() }
    }

    fn join_readers(&mut self) {
        if let Some((o, e)) = self.threads.take() {
            let _ = o.join();
            let _ = e.join();
        }
    }
}

impl Drop for Running {
    /// A client left running by a failed test is killed, not left blocked in `waitfile`.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
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

/// The value of `key=` in `line`, as a number (panics naming the line when there is none).
pub fn num(line: &str, key: &str) -> u64 {
    kv(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {key}= in `{line}`"))
}

/// `line`, after checking that it is an `ok` line.
pub fn expect_ok(line: &str) -> &str {
    assert!(line_ok(line), "expected an ok line, got `{line}`");
    line
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
        kv(l, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {key}= in line `{l}`:\n{self}"))
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

/// A stand-in for `nvidia-cuda-mps-control`, journalling in its pipe directory
/// (`CUDA_MPS_PIPE_DIRECTORY`). `-f` (the daemon): fail at once (noting its pid in `failed`)
/// when `<pipe dir>.fail` exists, or (noting its pid in `refused`) when the pid file names a control daemon that still runs,
/// as a second daemon for one pipe directory cannot take it; else note `pid
/// CUDA_VISIBLE_DEVICES log-dir` in `starts` and `log=<log dir>` in `env`, write its pid to
/// `nvidia-cuda-mps-control.pid` and make `control` (what clients look for), as the real daemon
/// does, and run until a `quit` arrives, noting its pid in `quits` and removing both files.
/// Otherwise read one command from stdin (as `echo quit | nvidia-cuda-mps-control` does), note
/// it in `commands`, and fail unless a daemon runs for the pipe directory ("Cannot find MPS
/// control daemon process", as the real client says). Killed with SIGKILL, the daemon leaves
/// its pid file and `control` behind, as the real one does. A daemon whose pipe directory is
/// removed exits too, so that one left by a failed test ends with the test's directory.
pub const FAKE_MPS_CONTROL: &str = r#"#!/bin/sh
dir=$CUDA_MPS_PIPE_DIRECTORY
pidfile=$dir/nvidia-cuda-mps-control.pid
# The pid file names a running control daemon (a zombie's cmdline is empty).
running() { pid=$(cat "$pidfile" 2>/dev/null) && [ -n "$pid" ] && grep -q mps-control "/proc/$pid/cmdline" 2>/dev/null; }
if [ "$1" = -f ]; then
  [ -f "$dir.fail" ] && { echo "$$" >>"$dir/failed"; exit 1; }
  if running; then echo "$$" >>"$dir/refused"; exit 1; fi
  echo "$$ $CUDA_VISIBLE_DEVICES $CUDA_MPS_LOG_DIRECTORY" >>"$dir/starts"
  echo "log=$CUDA_MPS_LOG_DIRECTORY" >>"$dir/env"
  echo "$$" >"$pidfile"
  : >"$dir/control"
  while [ ! -f "$dir/quit" ] && [ -d "$dir" ]; do sleep 0.02; done
  rm -f "$dir/quit" "$dir/control" "$pidfile"
  echo "$$" >>"$dir/quits"
  exit 0
fi
read -r cmd
echo "$cmd" >>"$dir/commands"
running || { echo "Cannot find MPS control daemon process" >&2; exit 1; }
[ "$cmd" = quit ] && touch "$dir/quit"
exit 0
"#;

/// Whether process `pid` runs: it exists and is not a zombie (an orphan whose parent, init
/// here, never reaps it still exists as one).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name's closing parenthesis.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start()).and_then(|r| r.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// A port nobody listens on now (the kernel's pick; freed again for the controller to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 GET to 127.0.0.1:`port`; returns the status line, the headers (lower-cased
/// names) and the body.
pub fn http_get(port: u16, path: &str) -> (String, std::collections::HashMap<String, String>, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to the metrics port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of headers in:\n{raw}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    (status, headers, body.to_string())
}

/// The lines of the file at `path` (none if it does not exist yet).
pub fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// A tmux server of our own (its socket in the test's directory), killed when dropped.
pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// A detached session running `sh`, `width` × `height`.
    pub fn start(dir: &Path, width: u16, height: u16) -> Tmux {
        let t = Tmux { socket: dir.join("tmux.sock") };
        let out = t.command(&["new-session", "-d", "-s", "top", "-x", &width.to_string(), "-y", &height.to_string(), "sh"]).output().expect("run tmux");
        assert!(out.status.success(), "tmux new-session failed: {}", String::from_utf8_lossy(&out.stderr));
        t
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket).args(args);
        // No TMUX of an enclosing session; no shell start-up file.
        c.env_remove("TMUX").env("TERM", "xterm-256color").env("ENV", "/dev/null");
        c
    }

    pub fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("run tmux");
        assert!(out.status.success(), "tmux {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` and presses Enter.
    pub fn type_line(&self, text: &str) {
        self.run(&["send-keys", "-t", "top", "-l", text]);
        self.run(&["send-keys", "-t", "top", "Enter"]);
    }

    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// Waits until the pane shows what `f` wants; panics with the pane after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            if Instant::now() > end {
                panic!("the pane did not show {what} within {timeout:?}; it shows:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command(&["kill-server"]).output();
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

/// CLOCK_MONOTONIC in nanoseconds: the clock the clients' `now` and `allocwait ... at=` read.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Creates `path` (empty), e.g. the go-file that clients wait for with `waitfile`.
pub fn touch(path: impl AsRef<Path>) {
    std::fs::write(path.as_ref(), b"").unwrap_or_else(|e| panic!("create {}: {e}", path.as_ref().display()));
}

/// Whether this test process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// First line of a test that is `#[cfg_attr(not(gpuslice_it_root), ignore = "..")]` (build.rs
/// found the tests built as root): fails, never skips, when the binary runs as another user.
pub fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test switches to uid 65534, which needs root; the tests were built as root but run as uid {uid}: rebuild them (touch tests/integration/build.rs)"
    );
}

// ---------------------------------------------------------------------------------------------
// Latency and throughput figures (the client's `probe` and `flood`).

fn field(line: &str, key: &str) -> u64 {
    kv(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {key}= in `{line}`"))
}

/// What `probe N NS GAP_US` printed: launch-to-synchronized latencies of N one-kernel requests.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub n: u64,
    pub min_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    /// Nearest rank: with fewer than 100 requests, the largest.
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
    /// Device latency: from just before the launch to the kernel's end on the simulated
    /// timeline (the wait behind other work plus the kernel), whatever the CPU did meanwhile.
    pub dev_p50_us: u64,
    pub dev_p99_us: u64,
    pub dev_max_us: u64,
    /// CLOCK_MONOTONIC ns of the first launch and of the last synchronize's return.
    pub t0: u64,
    pub t1: u64,
}

impl Probe {
    /// Parses an `ok probe ...` line (panics on anything else).
    pub fn parse(line: &str) -> Probe {
        assert!(line_ok(line) && line_cmd(line) == "probe", "not an ok probe line: `{line}`");
        Probe {
            n: field(line, "n"),
            min_us: field(line, "min_us"),
            p50_us: field(line, "p50_us"),
            p90_us: field(line, "p90_us"),
            p99_us: field(line, "p99_us"),
            max_us: field(line, "max_us"),
            mean_us: field(line, "mean_us"),
            dev_p50_us: field(line, "dev_p50_us"),
            dev_p99_us: field(line, "dev_p99_us"),
            dev_max_us: field(line, "dev_max_us"),
            t0: field(line, "t0"),
            t1: field(line, "t1"),
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs (on the device: p50 {} µs, p99 {} µs)",
            self.n, self.p50_us, self.p90_us, self.p99_us, self.max_us, self.dev_p50_us, self.dev_p99_us
        )
    }
}

/// What `flood NS BUCKET_MS STOPFILE` printed: how much device time this process's kernels got
/// in each bucket of wall time, from the simulated timeline.
#[derive(Clone, Debug)]
pub struct Flood {
    /// Kernels launched, and those that had ended when the stop file was seen.
    pub n: u64,
    pub done: u64,
    /// CLOCK_MONOTONIC ns at the start.
    pub t0: u64,
    /// Wall time from the start to the stop.
    pub ms: f64,
    pub bucket_ms: u64,
    /// µs of this process's kernels on the device in each bucket (the last may be partial).
    pub busy: Vec<u64>,
}

impl Flood {
    /// Parses an `ok flood ...` line (panics on anything else).
    pub fn parse(line: &str) -> Flood {
        assert!(line_ok(line) && line_cmd(line) == "flood", "not an ok flood line: `{line}`");
        let busy = kv(line, "busy").unwrap_or_else(|| panic!("no busy= in `{line}`"));
        Flood {
            n: field(line, "n"),
            done: field(line, "done"),
            t0: field(line, "t0"),
            ms: kv(line, "ms").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no ms= in `{line}`")),
            bucket_ms: field(line, "bucket_ms"),
            busy: busy.split(',').filter(|b| !b.is_empty()).map(|b| b.parse().expect("busy bucket")).collect(),
        }
    }

    /// CLOCK_MONOTONIC ns when the stop file was seen.
    pub fn stop(&self) -> u64 {
        self.t0 + (self.ms * 1e6) as u64
    }

    /// Device time (µs) of this process in the buckets wholly inside `[from, to)` (CLOCK_MONOTONIC
    /// ns), and the wall time (µs) those buckets cover.
    pub fn busy_between(&self, from: u64, to: u64) -> (u64, u64) {
        let width = self.bucket_ms * 1_000_000;
        let (mut busy, mut wall) = (0, 0);
        for (i, b) in self.busy.iter().enumerate() {
            let start = self.t0 + i as u64 * width;
            let end = (start + width).min(self.stop());
            if start >= from && end <= to && end > start {
                busy += b;
                wall += (end - start) / 1000;
            }
        }
        (busy, wall)
    }

    /// Fraction of the device this process had in the buckets wholly inside `[from, to)`.
    pub fn share_between(&self, from: u64, to: u64) -> f64 {
        let (busy, wall) = self.busy_between(from, to);
        if wall == 0 {
            return 0.0;
        }
        busy as f64 / wall as f64
    }

    /// The start (CLOCK_MONOTONIC ns) of the first bucket at or after `from` in which this process
    /// had at least `fraction` of the device, if any.
    pub fn first_bucket_with(&self, from: u64, fraction: f64) -> Option<u64> {
        let width = self.bucket_ms * 1_000_000;
        self.busy.iter().enumerate().find_map(|(i, &b)| {
            let start = self.t0 + i as u64 * width;
            let end = (start + width).min(self.stop());
            (start >= from && end > start && b as f64 >= fraction * ((end - start) / 1000) as f64).then_some(start)
        })
    }

    /// Device time of all buckets (µs).
    pub fn total_busy_us(&self) -> u64 {
        self.busy.iter().sum()
    }
}

// ---------------------------------------------------------------------------------------------
// The controller.

/// How long a controller may take to answer `gpuslice status` after it starts.
pub const CONTROLLER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A member of `group`, which the controller holds to 1 GiB: it must reach the controller
/// (`refuse` without one), get 700 MiB, be refused 400 MiB more, and see 1 GiB in all.
/// Returns its output for the caller's own checks.
pub fn member_held_to_one_gib(sim: &Sim, ctl: &Controller<'_>, group: &str) -> Output {
    let out = sim
        .client(Route::Link)
        .shim()
        .controller(ctl)
        .group(group)
        .env("GPUSLICE_ON_NO_CONTROLLER", "refuse")
        .env("GPUSLICE_CONTROLLER_WAIT", "5")
        .args("init ctx 0 alloc 700M alloc 400M info")
        .run();
    out.assert_success();
    out.expect_ok(2);
    out.expect_err(3, 2);
    assert_eq!(out.u64("info", "total"), GIB, "a member of {group} sees its 1 GiB:\n{out}\n{}", ctl.log());
    out
}

/// A `gpuslice serve` of one simulated machine: socket `<dir>/sock`, ledger `<dir>/shm/ledger`,
/// `GPUSLICE_LOG=debug`, its stderr (and stdout) appended to `<dir>/controller.log`. Started
/// and waited for until `gpuslice status` answers; stopped with SIGTERM when dropped.
///
/// Clients join it with [`Client::controller`] (and [`Client::group`]).
pub struct Controller<'a> {
    sim: &'a Sim,
    config: Option<PathBuf>,
    /// More `serve` arguments.
    extra: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl<'a> Controller<'a> {
    fn start(sim: &'a Sim, config: Option<PathBuf>) -> Controller<'a> {
        let mut c = Controller { sim, config, extra: Vec::new(), child: None, starts: 0 };
        c.launch();
        c
    }

    pub fn socket(&self) -> PathBuf {
        self.sim.path("sock")
    }

    pub fn ledger(&self) -> PathBuf {
        self.sim.path("shm").join("ledger")
    }

    pub fn log_path(&self) -> PathBuf {
        self.sim.path("controller.log")
    }

    /// Everything the controller(s) of this machine logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The running controller's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the controller is not running").id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open the controller log");
        let mut cmd = Command::new(cli_path());
        for (k, _) in std::env::vars_os() {
            if scrubbed(&k) {
                cmd.env_remove(&k);
            }
        }
        cmd.env("GPUSLICE_LOG", "debug").env("LD_LIBRARY_PATH", sim_dir()).env("SIMCUDA_STATE", self.sim.state_path());
        // The controller lists the node's devices through (simulated) NVML, and may be the first
        // to create the simulated machine: it must see the same machine the clients do.
        for (k, v) in self.sim.env.iter().filter(|(k, _)| k.starts_with("SIMCUDA_")).chain(&self.sim.controller_env) {
            cmd.env(k, v);
        }
        cmd.arg("serve").arg("--socket").arg(self.socket()).arg("--ledger").arg(self.ledger());
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&self.extra);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd));
        self.child = Some(child);
        self.starts += 1;
        let end = Instant::now() + CONTROLLER_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("wait for the controller") {
                self.child = None;
                panic!("the controller exited ({status}) before answering; its log:\n{}", self.log());
            }
            let out = self.cli("status").run();
            if out.success() {
                return;
            }
            if Instant::now() > end {
                panic!("the controller did not answer `gpuslice status` within {CONTROLLER_START_TIMEOUT:?}:\n{out}\nits log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `gpuslice <subcommand> --socket <socket>`, ready for more arguments.
    pub fn cli(&self, subcommand: &str) -> Client<'a> {
        self.sim.program(cli_path()).args(subcommand).arg("--socket").arg(self.socket().display())
    }

    /// `gpuslice ls --json`, parsed (panics unless it succeeds).
    pub fn ls(&self) -> Listing {
        let out = self.cli("ls --json").run();
        assert!(out.success(), "gpuslice ls --json failed:\n{out}\ncontroller log:\n{}", self.log());
        Listing::parse(&out.lines.join("\n")).unwrap_or_else(|e| panic!("gpuslice ls --json printed something else than JSON ({e}):\n{out}"))
    }

    /// `gpuslice set <args>` (e.g. `--group g --memory 1GiB`), whatever its outcome.
    pub fn set(&self, args: &str) -> Output {
        self.cli("set").args(args).run()
    }

    /// `gpuslice set <args>`, which must succeed; returns what it printed.
    pub fn set_ok(&self, args: &str) -> String {
        let out = self.set(args);
        assert!(out.success(), "gpuslice set {args} failed:\n{out}\ncontroller log:\n{}", self.log());
        out.lines.join("\n")
    }

    /// Polls `ls` every 10 ms until `f` holds for a listing, and returns that listing and how
    /// long it took; panics with the last listing after `timeout`.
    pub fn ls_until(&self, what: &str, timeout: Duration, f: impl Fn(&Listing) -> bool) -> (Listing, Duration) {
        let start = Instant::now();
        loop {
            let l = self.ls();
            if f(&l) {
                return (l, start.elapsed());
            }
            if start.elapsed() > timeout {
                panic!("`gpuslice ls` did not show {what} within {timeout:?}; last listing:\n{l}\ncontroller log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the controller with SIGKILL (and reaps it): no clean-up, the socket stays.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the controller with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("the controller is not running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().expect("wait for the controller") {
                return s;
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the controller did not stop within 10 s of SIGTERM; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the controller again on the same socket, ledger and config (stopping it with
    /// SIGTERM first if it still runs).
    pub fn restart(&mut self) {
        if self.running() {
            self.stop();
        }
        self.child = None;
        self.launch();
    }

    /// How many times this helper started a controller.
    pub fn starts(&self) -> u32 {
        self.starts
    }
}

impl Drop for Controller<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What `gpuslice ls --json` printed (the controller's `Listing`: `groups` and `processes`,
/// each with per-device rows keyed by the ledger's device index).
pub struct Listing {
    pub json: serde_json::Value,
}

impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serde_json::to_string_pretty(&self.json).unwrap_or_default())
    }
}

impl fmt::Debug for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn as_u64(v: &serde_json::Value, what: &str, listing: &Listing) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{what} is not a number ({v}) in:\n{listing}"))
}

impl Listing {
    /// The suspension row of `group` (`ls --json`'s `suspensions`; Null when it has none).
    pub fn suspension(&self, group: &str) -> serde_json::Value {
        self.json["suspensions"].as_array().and_then(|rows| rows.iter().find(|r| r["group"] == group).cloned()).unwrap_or(serde_json::Value::Null)
    }

    pub fn parse(text: &str) -> Result<Listing, String> {
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if !json["groups"].is_array() || !json["processes"].is_array() {
            return Err("no `groups` and `processes` arrays".into());
        }
        Ok(Listing { json })
    }

    pub fn groups(&self) -> &[serde_json::Value] {
        self.json["groups"].as_array().map(Vec::as_slice).unwrap_or_default()
    }

    pub fn processes(&self) -> &[serde_json::Value] {
        self.json["processes"].as_array().map(Vec::as_slice).unwrap_or_default()
    }

    pub fn group(&self, name: &str) -> Option<&serde_json::Value> {
        self.groups().iter().find(|g| g["name"] == name)
    }

    /// Group `name`'s row for ledger device `device` (panics if absent).
    pub fn group_device(&self, name: &str, device: u32) -> &serde_json::Value {
        let g = self.group(name).unwrap_or_else(|| panic!("no group {name:?} in:\n{self}"));
        g["devices"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["device"] == device))
            .unwrap_or_else(|| panic!("group {name:?} has no device {device} in:\n{self}"))
    }

    pub fn group_used(&self, name: &str, device: u32) -> u64 {
        as_u64(&self.group_device(name, device)["used"], "used", self)
    }

    pub fn group_peak(&self, name: &str, device: u32) -> u64 {
        as_u64(&self.group_device(name, device)["peak"], "peak", self)
    }

    pub fn group_refusals(&self, name: &str, device: u32) -> u64 {
        as_u64(&self.group_device(name, device)["refusals"], "refusals", self)
    }

    /// `None`: no limit (`null`).
    pub fn group_limit(&self, name: &str, device: u32) -> Option<u64> {
        self.group_device(name, device)["limit"].as_u64()
    }

    /// `None`: not throttled (`null`).
    pub fn group_share(&self, name: &str, device: u32) -> Option<u64> {
        self.group_device(name, device)["share"].as_u64()
    }

    /// The group's member pids, sorted.
    pub fn members(&self, name: &str) -> Vec<u32> {
        let g = self.group(name).unwrap_or_else(|| panic!("no group {name:?} in:\n{self}"));
        let mut m: Vec<u32> = g["members"].as_array().into_iter().flatten().filter_map(|p| p.as_u64()).map(|p| p as u32).collect();
        m.sort_unstable();
        m
    }

    /// The registered pids, sorted.
    pub fn pids(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.processes().iter().filter_map(|p| p["pid"].as_u64()).map(|p| p as u32).collect();
        p.sort_unstable();
        p
    }

    pub fn process(&self, pid: u32) -> Option<&serde_json::Value> {
        self.processes().iter().find(|p| p["pid"] == pid)
    }

    /// Process `pid`'s row for ledger device `device` (panics if absent).
    pub fn process_device(&self, pid: u32, device: u32) -> &serde_json::Value {
        let p = self.process(pid).unwrap_or_else(|| panic!("no process {pid} in:\n{self}"));
        p["devices"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["device"] == device))
            .unwrap_or_else(|| panic!("process {pid} has no device {device} in:\n{self}"))
    }

    pub fn process_used(&self, pid: u32, device: u32) -> u64 {
        as_u64(&self.process_device(pid, device)["used"], "used", self)
    }

    pub fn process_overhead(&self, pid: u32, device: u32) -> u64 {
        as_u64(&self.process_device(pid, device)["overhead"], "overhead", self)
    }

    pub fn process_peak(&self, pid: u32, device: u32) -> u64 {
        as_u64(&self.process_device(pid, device)["peak"], "peak", self)
    }

    /// The group process `pid` is in.
    pub fn process_group(&self, pid: u32) -> String {
        let p = self.process(pid).unwrap_or_else(|| panic!("no process {pid} in:\n{self}"));
        p["group"].as_str().unwrap_or_default().to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated clock, from the test's side.

#[path = "../../simcuda/src/clock.rs"]
mod simclock;

/// The test thread as a participant of a machine's simulated clock (`Sim::clock`): running (time
/// stands still) except while it sleeps on the clock or is parked.
pub struct Clock {
    page: &'static simclock::Page,
    slot: usize,
}

impl Clock {
    /// Virtual time now, ns.
    pub fn now_ns(&self) -> u64 {
        self.page.now()
    }

    /// Waits until `ns` of virtual time have passed (the processes run meanwhile).
    pub fn sleep_ns(&self, ns: u64) {
        self.page.block(self.slot, self.page.now() + ns, 0, None);
    }

    /// Lets time move without the test (while it waits for processes in real time).
    pub fn park(&self) {
        self.page.park(self.slot);
    }

    /// Holds time still again.
    pub fn unpark(&self) {
        self.page.unpark(self.slot);
    }

    /// Starts `procs` at one virtual instant and returns it: each prints a `ready` line, then
    /// waits for the file `go` with cuclient's `waitfile`. Time moves (the test parked) while
    /// they get ready, and stands still (the test holds it) from the moment `go` exists until
    /// every one of them has seen it; the test holds it on return (`park` to let it run).
    pub fn start_together(&self, go: &str, procs: &[Running], ready: &str) -> u64 {
        self.start_together_refs(go, &procs.iter().collect::<Vec<_>>(), ready)
    }

    /// `start_together` for processes held elsewhere.
    pub fn start_together_refs(&self, go: &str, procs: &[&Running], ready: &str) -> u64 {
        self.park();
        for p in procs {
            assert!(line_ok(&p.wait_line(ready, 0)), "a process did not get ready: {}", p.stderr_now());
        }
        self.unpark();
        touch(go);
        for p in procs {
            assert!(line_ok(&p.wait_line("waitfile", 0)), "a process did not see {go}: {}", p.stderr_now());
        }
        self.now_ns()
    }

    /// How many times virtual time has moved so far.
    pub fn advances(&self) -> u64 {
        self.page.advances.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Clock {
    fn drop(&mut self) {
        self.page.leave(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn file_at(p: &Path, text: &str, modified: SystemTime) {
        std::fs::write(p, text).unwrap();
        std::fs::File::options().write(true).open(p).unwrap().set_modified(modified).unwrap();
    }

    #[test]
    fn an_artefact_older_than_a_source_of_its_dep_info_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("src dir")).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let (a, b) = (root.join("src dir/a.rs"), root.join("b.rs"));
        file_at(&a, "", t0);
        file_at(&b, "", t0);
        let outside = dir.path().join("registry.rs");
        file_at(&outside, "", t0 + Duration::from_secs(100));
        let lib = dir.path().join("libx.so");
        let rule = format!("{}: {} {} {}\n", lib.display(), a.display().to_string().replace(' ', "\\ "), b.display(), outside.display());
        file_at(&dir.path().join("libx.d"), &rule, t0);
        file_at(&lib, "", t0 + Duration::from_secs(10));
        assert_eq!(stale_reason(&lib, &root), None, "built after its sources (a newer file outside the tree does not count)");
        file_at(&a, "changed", t0 + Duration::from_secs(20));
        let why = stale_reason(&lib, &root).expect("a source newer than the artefact");
        assert!(why.contains("src dir/a.rs") && why.contains("10.0 s"), "{why}");
        std::fs::remove_file(&a).unwrap();
        assert!(stale_reason(&lib, &root).expect("a source gone").contains("gone"));
        // Built from another tree (a target directory copied from elsewhere, not rebuilt here).
        assert!(stale_reason(&lib, &dir.path().join("elsewhere")).expect("another tree").contains("another tree"));
        // No dep-info: nothing to judge by.
        std::fs::remove_file(dir.path().join("libx.d")).unwrap();
        assert_eq!(stale_reason(&lib, &root), None);
    }
}
