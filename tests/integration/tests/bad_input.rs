//! Bad input from outside, end to end, each answered with a clear error and no crash:
//!
//! - garbage on the controller's socket for a few seconds (a separate fuzzing process), after
//!   which the controller still answers and takes a real client into its group;
//! - a "controller" that answers a shim with bad ledgers or bad answers: the shim runs alone on
//!   its own limits and says why in one line;
//! - bad files at the ledger path when the controller starts: someone else's file is refused and
//!   left alone, a damaged gpuslice ledger replaced, a ledger another controller serves refused;
//! - a ledger whose process or group slots are all taken;
//! - a socket path that is a regular file or a directory;
//! - every GPUSLICE_*/CUDA_DEVICE_* variable with a bad value, including bytes that are not UTF-8.
//!
//! The figures (cases, frames, durations) are in docs/RELIABILITY.md.

use gpuslice_common::ledger::{Geometry, Ledger};
use gpuslice_common::protocol::{self, decode_response, encode, recv_frame, send_frame, Request, Response};
use gpuslice_integration::*;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Context reserve of the simulated driver here.
const R: u64 = 64 * MIB;
/// CUDA_ERROR_UNKNOWN, CUDA_ERROR_OUT_OF_MEMORY as the client prints them.
const OOM: i64 = CUDA_ERROR_OUT_OF_MEMORY;

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_CTX_RESERVE", R)
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

// ------------------------------------------------------------------------------ a controller

/// A `gpuslice serve` started here with any arguments; stopped with SIGTERM when dropped.
struct Serve<'a> {
    sim: &'a Sim,
    socket: PathBuf,
    run: Option<Running>,
}

impl<'a> Serve<'a> {
    /// Starts `gpuslice serve --socket <socket> --ledger <ledger> <extra>` and waits until it
    /// answers `status`; panics with its stderr if it exits first.
    fn start(sim: &'a Sim, socket: &Path, ledger: &Path, extra: &str) -> Serve<'a> {
        let run = sim
            .program(cli_path())
            .env("GPUSLICE_LOG", "debug")
            .arg("serve")
            .arg("--socket")
            .arg(show(socket))
            .arg("--ledger")
            .arg(show(ledger))
            .args(extra)
            .spawn();
        let serve = Serve { sim, socket: socket.to_path_buf(), run: Some(run) };
        let end = Instant::now() + CONTROLLER_START_TIMEOUT;
        while !serve.answers() {
            let run = serve.run.as_ref().unwrap();
            assert!(Instant::now() < end, "the controller did not answer within {CONTROLLER_START_TIMEOUT:?}:\n{}", run.stderr_now());
            // SAFETY: waitpid(WNOHANG) would reap it under Running's feet; kill(0) only asks.
            assert!(unsafe { libc::kill(run.pid() as i32, 0) } == 0, "the controller exited:\n{}", run.stderr_now());
            std::thread::sleep(Duration::from_millis(10));
        }
        serve
    }

    fn answers(&self) -> bool {
        self.cli("status").run().success()
    }

    fn pid(&self) -> u32 {
        self.run.as_ref().unwrap().pid()
    }

    fn log(&self) -> String {
        self.run.as_ref().unwrap().stderr_now()
    }

    fn cli(&self, subcommand: &str) -> Client<'a> {
        self.sim.program(cli_path()).args(subcommand).arg("--socket").arg(show(&self.socket))
    }

    fn ls(&self) -> Listing {
        let out = self.cli("ls --json").run();
        assert!(out.success(), "{out}");
        Listing::parse(&out.lines.join("\n")).expect("ls --json")
    }

    /// Stops it with SIGTERM; returns everything it logged.
    fn stop(mut self) -> Output {
        let run = self.run.take().unwrap();
        run.signal(libc::SIGTERM);
        run.wait()
    }
}

impl Drop for Serve<'_> {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            run.signal(libc::SIGTERM);
            let _ = run.wait();
        }
    }
}

/// `gpuslice serve` that is expected to refuse to start: its output.
fn serve_refused(sim: &Sim, socket: &Path, ledger: &Path) -> Output {
    let out = sim.program(cli_path()).arg("serve").arg("--socket").arg(show(socket)).arg("--ledger").arg(show(ledger)).run();
    assert!(!out.success(), "the controller should have refused to start:\n{out}");
    assert_eq!(out.stderr.lines().filter(|l| l.contains("gpuslice: error:")).count(), 1, "one error line:\n{out}");
    out
}

fn count_entries(dir: impl AsRef<Path>) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The controller's descriptors, less the two each group's memory takes (`ledger::regions`: its
/// counters and its settings page, held while the group exists; the fuzzer makes groups).
fn descriptors_besides_group_memory(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.flatten()
        .filter(|fd| {
            let target = std::fs::read_link(fd.path()).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
            !(target.starts_with("/memfd:gpuslice-group-") || target.starts_with("/memfd:gpuslice-settings-"))
        })
        .count()
}

// ------------------------------------------------------------------------------ 1. live socket fuzz

/// How many fuzzing processes run at once, and for how long: 5 s, or
/// `GPUSLICE_FUZZ_SECONDS` for a longer run.
const FUZZERS: usize = 2;

fn fuzz_seconds() -> f64 {
    std::env::var("GPUSLICE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5.0)
}

/// Two processes send garbage to a live controller for 5 s: random bytes, random and huge
/// lengths, frames cut short, invalid UTF-8 and JSON, wrongly typed fields, damaged real
/// requests, bizarre registrations, descriptors attached, frames split into pieces, bursts of
/// idle connections. Every answer must be a well-formed response (an error for what is not a
/// request), and afterwards the controller must still answer, hold no more descriptors or
/// threads than before, keep its group's limit, and take a real client into that group.
#[test]
fn garbage_on_the_socket_is_refused_and_the_controller_keeps_serving() {
    let sim = sim();
    let config = sim.write_file("fuzz.toml", "[groups.real]\nmemory_limit = \"1GiB\"\n");
    let ctl = Serve::start(&sim, &sim.path("sock"), &sim.path("shm/ledger"), &format!("--config {}", show(&config)));
    let fds_before = descriptors_besides_group_memory(ctl.pid());
    let threads_before = count_entries(format!("/proc/{}/task", ctl.pid()));

    let exe = std::env::current_exe().expect("this test's binary");
    let start = Instant::now();
    let fuzzers: Vec<(std::process::Child, PathBuf)> = (0..FUZZERS)
        .map(|i| {
            let stats = sim.path(&format!("fuzz-{i}.json"));
            let child = std::process::Command::new(&exe)
                .args(["--exact", "socket_fuzzer", "--ignored", "--nocapture", "--test-threads=1"])
                .env("FUZZ_SOCKET", &ctl.socket)
                .env("FUZZ_SECONDS", fuzz_seconds().to_string())
                .env("FUZZ_SEED", format!("{}", 0x5eed_0000 + i as u64 * 7919 + u64::from(std::process::id())))
                .env("FUZZ_STATS", &stats)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start a fuzzer");
            (child, stats)
        })
        .collect();
    let mut totals: std::collections::BTreeMap<String, [u64; 5]> = Default::default();
    for (child, stats) in fuzzers {
        let out = child.wait_with_output().expect("fuzzer");
        assert!(
            out.status.success(),
            "a fuzzer failed:\n{}{}\ncontroller log (tail):\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&ctl.log(), 30)
        );
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).expect("fuzz stats")).expect("stats JSON");
        for (case, counts) in json.as_object().unwrap() {
            let t = totals.entry(case.clone()).or_default();
            for (k, v) in counts.as_array().unwrap().iter().enumerate() {
                t[k] += v.as_u64().unwrap();
            }
        }
    }
    let elapsed = start.elapsed();
    let sent: u64 = totals.values().map(|t| t[0]).sum();
    eprintln!("fuzzed {elapsed:.1?}: {sent} connections; per case [sent, error answers, other answers, closed, busy]: {totals:?}");
    assert!(sent as f64 >= 100.0 * fuzz_seconds(), "too few attempts to mean anything: {totals:?}");
    assert!(totals.values().map(|t| t[1]).sum::<u64>() >= 200, "garbage is answered with errors: {totals:?}");
    let busy: u64 = totals.values().map(|t| t[4]).sum();
    assert!(busy * 4 <= sent, "most connections are served, not turned away as busy: {totals:?}");

    assert!(ctl.answers(), "the controller answers `status` after the fuzzing:\n{}", tail(&ctl.log(), 30));
    // Connection threads end and their descriptors close once the clients are gone.
    let settled = poll_until(Duration::from_secs(3), || {
        descriptors_besides_group_memory(ctl.pid()) <= fds_before + 2 && count_entries(format!("/proc/{}/task", ctl.pid())) <= threads_before + 2
    });
    assert!(
        settled,
        "descriptors besides group memory {} (before {fds_before}), threads {} (before {threads_before})",
        descriptors_besides_group_memory(ctl.pid()),
        count_entries(format!("/proc/{}/task", ctl.pid()))
    );
    let log = ctl.log();
    assert!(log.contains("refused a request"), "refusals are logged");
    assert!(!log.contains("panicked"), "{}", tail(&log, 30));

    // A real client joins the group and is held to its limit.
    let done = sim.path("done");
    let c = sim
        .client(Route::Link)
        .shim()
        .env("GPUSLICE_SOCKET", show(&ctl.socket))
        .group("real")
        .args(&format!("init ctx 0 alloc 600M alloc 600M waitfile {}", show(&done)))
        .spawn();
    c.wait_line("alloc", 1);
    let l = ctl.ls();
    assert_eq!(l.process_group(c.pid()), "real", "{l}");
    assert_eq!(l.group_limit("real", 0), Some(GIB), "the group's limit survived the fuzzing:\n{l}");
    touch(&done);
    let out = c.wait();
    out.assert_success();
    out.expect_ok(2);
    out.expect_err(3, OOM);
    assert!(out.stderr_lines_with(&["did not take this process"]).is_empty(), "{out}");
    drop(ctl.stop());
}

/// Not a test of its own: the fuzzing process started by the test above (with `--ignored`).
#[test]
#[ignore = "a helper process of garbage_on_the_socket_is_refused_and_the_controller_keeps_serving"]
fn socket_fuzzer() {
    let socket = PathBuf::from(std::env::var_os("FUZZ_SOCKET").expect("FUZZ_SOCKET: this runs as a helper of another test"));
    let seconds: f64 = std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let stats_path = std::env::var_os("FUZZ_STATS").map(PathBuf::from);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut fuzz = Fuzz { rng: Rng(seed.wrapping_mul(31).wrapping_add(t) | 1), stats: Default::default(), unexpected: Vec::new() };
                while Instant::now() < deadline {
                    fuzz.one(&socket);
                }
                fuzz
            })
        })
        .collect();
    let mut stats: std::collections::BTreeMap<&'static str, [u64; 5]> = Default::default();
    let mut unexpected = Vec::new();
    for w in workers {
        let f = w.join().expect("fuzz thread");
        for (k, v) in f.stats {
            let s = stats.entry(k).or_default();
            for i in 0..5 {
                s[i] += v[i];
            }
        }
        unexpected.extend(f.unexpected);
    }
    if let Some(p) = stats_path {
        std::fs::write(p, serde_json::to_string(&stats).unwrap()).expect("write stats");
    }
    assert!(unexpected.is_empty(), "{} unexpected answers, e.g.:\n{}", unexpected.len(), unexpected.iter().take(10).cloned().collect::<Vec<_>>().join("\n"));
}

/// xorshift64*: reproducible from the seed the parent prints on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn hex(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from_digit(self.below(16) as u32, 16).unwrap()).collect()
    }
}

/// What an answer must be.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// An `error` response, or the connection closed without one.
    Refusal,
    /// Any well-formed response.
    Anything,
    /// This kind of response.
    Kind(&'static str),
}

struct Fuzz {
    rng: Rng,
    /// Per case: [attempts, error answers, other answers, closed without an answer, busy].
    stats: std::collections::BTreeMap<&'static str, [u64; 5]>,
    unexpected: Vec<String>,
}

impl Fuzz {
    fn one(&mut self, socket: &Path) {
        let Ok(s) = UnixStream::connect(socket) else {
            self.unexpected.push("cannot connect".into());
            std::thread::sleep(Duration::from_millis(10));
            return;
        };
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let (case, expect) = match self.rng.below(12) {
            0 => {
                let junk = self.rng.bytes(64);
                let _ = (&s).write_all(&junk);
                ("random bytes", Expect::Refusal)
            }
            1 => {
                let mut f = (self.rng.next() as u32).to_le_bytes().to_vec();
                f.extend(self.rng.bytes(64));
                let _ = (&s).write_all(&f);
                ("random length", Expect::Refusal)
            }
            2 => {
                let body = self.rng.bytes(300);
                let _ = send_frame(s.as_raw_fd(), &body, None);
                ("random body", Expect::Refusal)
            }
            3 => {
                let request = encode(&self.request());
                let body = self.damaged(request);
                let _ = send_frame(s.as_raw_fd(), &body, None);
                ("damaged request", Expect::Anything)
            }
            4 => {
                let body = self.wrongly_typed();
                let _ = send_frame(s.as_raw_fd(), &body, None);
                ("wrongly typed field", Expect::Anything)
            }
            5 => {
                let (req, kind) = if self.rng.below(2) == 0 { (Request::Status, "status") } else { (Request::List, "listing") };
                let body = encode(&req);
                let mut frame = (body.len() as u32).to_le_bytes().to_vec();
                frame.extend(body);
                let mut at = 0;
                while at < frame.len() {
                    let n = (1 + self.rng.below(5) as usize).min(frame.len() - at);
                    let _ = (&s).write_all(&frame[at..at + n]);
                    at += n;
                    if self.rng.below(4) == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                ("split request", Expect::Kind(kind))
            }
            6 => {
                let body = encode(&self.bizarre_registration());
                let _ = send_frame(s.as_raw_fd(), &body, None);
                ("bizarre registration", Expect::Anything)
            }
            7 => {
                let null = std::fs::File::open("/dev/null").unwrap();
                let _ = send_frame(s.as_raw_fd(), &encode(&Request::Status), Some(null.as_raw_fd()));
                ("descriptor attached", Expect::Kind("status"))
            }
            8 => {
                let body = encode(&self.request());
                let mut f = (body.len() as u32).to_le_bytes().to_vec();
                f.extend(&body[..body.len() / 2]);
                let _ = (&s).write_all(&f);
                ("cut short", Expect::Refusal)
            }
            9 => {
                let len = protocol::MAX_FRAME as u32 + 1 + self.rng.below(u64::from(u32::MAX) - protocol::MAX_FRAME as u64 - 1) as u32;
                let _ = (&s).write_all(&len.to_le_bytes());
                ("huge length", Expect::Refusal)
            }
            10 => {
                let edits = [
                    r#"{"type":"set","target":{"pid":0},"memory":{"bytes":0},"sm":null,"priority":null}"#,
                    r#"{"type":"set","target":{"group":"no such\ngroup"},"memory":null,"sm":1000,"priority":null}"#,
                    r#"{"type":"set","target":{"group":"pid-1"},"memory":null,"sm":null,"priority":null,"device":99}"#,
                    r#"{"type":"set","target":{"pid":4294967295},"memory":{"unlimited":null},"sm":null,"priority":"high"}"#,
                ];
                let _ = send_frame(s.as_raw_fd(), edits[self.rng.below(edits.len() as u64) as usize].as_bytes(), None);
                ("bad edit", Expect::Refusal)
            }
            _ => {
                // A burst of connections that say nothing, closed at once.
                let idle: Vec<UnixStream> = (0..20).filter_map(|_| UnixStream::connect(socket).ok()).collect();
                drop(idle);
                let _ = send_frame(s.as_raw_fd(), &encode(&Request::Status), None);
                ("idle burst", Expect::Kind("status"))
            }
        };
        let _ = s.shutdown(std::net::Shutdown::Write);
        self.answer(&s, case, expect);
    }

    fn answer(&mut self, s: &UnixStream, case: &'static str, expect: Expect) {
        let stat = self.stats.entry(case).or_default();
        stat[0] += 1;
        let got = match recv_frame(s.as_raw_fd()) {
            Ok((body, _fd)) => match decode_response(&body) {
                Ok(r) => Ok(r),
                Err(e) => Err(format!("{case}: an answer that is not a response ({e}): {:?}", String::from_utf8_lossy(&body))),
            },
            Err(protocol::FrameError::Closed) if expect == Expect::Refusal => {
                stat[3] += 1;
                return;
            }
            // The controller may close while our last bytes are still unread (a frame too large
            // refused at once): a reset is its way of closing then.
            Err(protocol::FrameError::Io(e)) if expect == Expect::Refusal && e.kind() == std::io::ErrorKind::ConnectionReset => {
                stat[3] += 1;
                return;
            }
            Err(e) => Err(format!("{case}: no answer: {e}")),
        };
        let kind = |r: &Response| match r {
            Response::Registered(_) => "registered",
            Response::Done { .. } => "done",
            Response::Listing(_) => "listing",
            Response::Status(_) => "status",
            Response::Error { .. } => "error",
            Response::Imported { .. } => "imported",
        };
        match got {
            // Under load the connection threads of earlier bursts may still hold their slots:
            // the controller then refuses new connections, saying so, whatever they ask.
            Ok(Response::Error { message }) if protocol::is_retry_later(&message) && message.contains("too many connections") => {
                stat[4] += 1;
            }
            Ok(r) => {
                let k = kind(&r);
                stat[if k == "error" { 1 } else { 2 }] += 1;
                let fine = match expect {
                    Expect::Refusal => k == "error",
                    Expect::Anything => true,
                    Expect::Kind(want) => k == want,
                };
                if !fine {
                    self.unexpected.push(format!("{case}: answered {r:?}"));
                }
            }
            Err(e) => self.unexpected.push(e),
        }
    }

    /// A well-formed request of any kind, with values a real client might send.
    fn request(&mut self) -> Request {
        match self.rng.below(4) {
            0 => Request::Register(protocol::Registration {
                protocol: protocol::PROTOCOL_VERSION,
                group: Some(format!("fz-{}", self.rng.below(50))),
                priority: None,
                name: "fuzzer".into(),
                own_pid: std::process::id(),
                devices: vec![protocol::DeviceClaim {
                    ordinal: 0,
                    uuid: format!("GPU-{}-{}-{}-{}-{}", self.rng.hex(8), self.rng.hex(4), self.rng.hex(4), self.rng.hex(4), self.rng.hex(12)),
                    total_memory: 1 << 34,
                    memory_limit: Some(1 << 30),
                    sm_share: Some(50),
                    sm_max: 0,
                }],
            }),
            1 => Request::Set(protocol::Edit {
                target: protocol::Target::Group(format!("zz-{}", self.rng.below(20))),
                memory: Some(protocol::Limit::Bytes(1 << 30)),
                sm: Some(40),
                sm_max: None,
                priority: None,
                device: Some(0),
                create: true,
            }),
            2 => Request::List,
            _ => Request::Status,
        }
    }

    fn damaged(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        for _ in 0..1 + self.rng.below(4) {
            let at = self.rng.below(bytes.len() as u64 + 1) as usize;
            match self.rng.below(4) {
                0 if at < bytes.len() => bytes[at] = self.rng.next() as u8,
                1 if at < bytes.len() => {
                    let end = (at + 1 + self.rng.below(6) as usize).min(bytes.len());
                    bytes.drain(at..end);
                }
                2 => {
                    let junk = [&b"\xff\xfe"[..], b"\"\\ud800\"", b"{", b"]", b"null", b"1e999", b"-1"][self.rng.below(7) as usize];
                    bytes.splice(at..at, junk.iter().copied());
                }
                _ => bytes.truncate(at),
            }
        }
        bytes
    }

    /// A real request with one value replaced by a value of another JSON type.
    fn wrongly_typed(&mut self) -> Vec<u8> {
        let mut doc: serde_json::Value = serde_json::from_slice(&encode(&self.request())).unwrap();
        let odd = [
            serde_json::json!(null),
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!(u64::MAX),
            serde_json::json!("x"),
            serde_json::json!([1, 2]),
            serde_json::json!({"a": 1}),
            serde_json::json!(true),
        ][self.rng.below(8) as usize]
            .clone();
        fn slots(v: &mut serde_json::Value, out: &mut Vec<*mut serde_json::Value>) {
            out.push(v as *mut _);
            match v {
                serde_json::Value::Object(m) => m.values_mut().for_each(|c| slots(c, out)),
                serde_json::Value::Array(a) => a.iter_mut().for_each(|c| slots(c, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        slots(&mut doc, &mut all);
        let pick = all[self.rng.below(all.len() as u64) as usize];
        // SAFETY: every pointer points into `doc`, which is alive and not otherwise borrowed.
        unsafe { *pick = odd };
        serde_json::to_vec(&doc).unwrap()
    }

    /// Well-typed but strange: control characters and huge names, hundreds of devices, UUIDs
    /// that are not, wrong protocol versions, group names that are not allowed.
    fn bizarre_registration(&mut self) -> Request {
        let devices = (0..self.rng.below(300))
            .map(|i| protocol::DeviceClaim {
                ordinal: if self.rng.below(4) == 0 { u32::MAX } else { i as u32 },
                uuid: match self.rng.below(3) {
                    0 => format!("GPU-{}-{}-{}-{}-{}", self.rng.hex(8), self.rng.hex(4), self.rng.hex(4), self.rng.hex(4), self.rng.hex(12)),
                    1 => String::from_utf8_lossy(&self.rng.bytes(60)).into_owned(),
                    _ => "x".repeat(self.rng.below(5000) as usize),
                },
                total_memory: self.rng.next(),
                memory_limit: Some(self.rng.next()),
                sm_share: Some(self.rng.next() as u32),
                sm_max: 0,
            })
            .collect();
        let group = match self.rng.below(4) {
            0 => None,
            1 => Some(format!("fz-{}", self.rng.below(50))),
            2 => Some("pid-1".into()),
            _ => Some("bad name\n\u{0}".repeat(1 + self.rng.below(100) as usize)),
        };
        Request::Register(protocol::Registration {
            protocol: if self.rng.below(5) == 0 { self.rng.next() as u32 } else { protocol::PROTOCOL_VERSION },
            group,
            priority: None,
            name: "\n\u{1b}[31mforged line\u{0}".repeat(1 + self.rng.below(2000) as usize),
            own_pid: self.rng.next() as u32,
            devices,
        })
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ------------------------------------------------------------------------------ 2. a bad controller

/// A fake controller on `socket` that answers every request with `answer`; stops when dropped.
struct FakeController {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeController {
    fn start(socket: &Path, answer: impl Fn(&UnixStream) + Send + 'static) -> FakeController {
        let listener = UnixListener::bind(socket).expect("bind the fake controller");
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut open = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let _ = recv_frame(s.as_raw_fd());
                        answer(&s);
                        open.push(s); // Kept open: "silence" must not look like a close.
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        FakeController { stop, thread: Some(thread) }
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A ledger file of `bytes` in `dir`, opened read-write (or read-only).
fn ledger_file(dir: &Path, name: &str, bytes: &[u8], writable: bool) -> std::fs::File {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::OpenOptions::new().read(true).write(writable).open(&path).unwrap()
}

fn valid_ledger_bytes(dir: &Path) -> Vec<u8> {
    let path = dir.join("valid-ledger");
    let _ = std::fs::remove_file(&path);
    Ledger::create(path.to_str().unwrap(), Geometry { max_groups: 4, max_procs: 8 }).unwrap();
    std::fs::read(&path).unwrap()
}

fn registered(slot: u32) -> Vec<u8> {
    encode(&Response::Registered(protocol::Assignment { group: 0, group_name: "g".into(), slot, devices: vec![(0, 0)], notes: vec![] }))
}

/// A shim whose "controller" hands it a bad ledger or a bad answer runs alone on its own
/// limits, says why in one warning line, and its program never notices anything else.
#[test]
fn a_shim_given_a_bad_ledger_or_a_bad_answer_runs_alone_on_its_own_limits() {
    let sim = sim();
    let dir = sim.path("fake");
    std::fs::create_dir_all(&dir).unwrap();
    let valid = valid_ledger_bytes(&dir);
    let mut wrong_version = valid.clone();
    wrong_version[8] = 99;
    type Answer = Box<dyn Fn(&UnixStream) + Send>;
    // As a controller answers (ledger::regions): the group's memory, the device memory (here the
    // same file) and a read-only settings page.
    let with_ledger = |file: std::fs::File, slot: u32| -> Answer {
        Box::new(move |s| {
            let (_page, page_fd) = gpuslice_common::ledger::SettingsPage::create(0).unwrap();
            let settings = gpuslice_common::ledger::read_only(std::os::fd::AsFd::as_fd(&page_fd)).unwrap();
            drop(protocol::send_frame_with(s.as_raw_fd(), &registered(slot), &[file.as_raw_fd(), file.as_raw_fd(), settings.as_raw_fd()]))
        })
    };
    let cases: Vec<(&str, Answer, &str)> = vec![
        ("zeroed ledger", with_ledger(ledger_file(&dir, "zeroed", &vec![0; 65536], true), 0), "not a gpuslice ledger"),
        ("truncated ledger", with_ledger(ledger_file(&dir, "short", &valid[..100], true), 0), "shorter than its 4096-byte header"),
        ("foreign file", with_ledger(ledger_file(&dir, "foreign", &b"#!/bin/sh\necho hello\n".repeat(400), true), 0), "not a gpuslice ledger"),
        ("other layout", with_ledger(ledger_file(&dir, "v99", &wrong_version, true), 0), "layout version 99"),
        ("read-only descriptor", with_ledger(ledger_file(&dir, "ro", &valid, false), 0), "cannot map"),
        ("slot outside", with_ledger(ledger_file(&dir, "ok", &valid, true), 4096), "outside the ledger"),
        ("no descriptor", Box::new(|s| drop(send_frame(s.as_raw_fd(), &registered(0), None))), "without the ledger"),
        ("garbage answer", Box::new(|s| drop(send_frame(s.as_raw_fd(), b"\xff\xfe{not json", None))), "malformed message"),
        ("huge answer", Box::new(|s| drop((&*s).write_all(&u32::MAX.to_le_bytes()))), "over the"),
        (
            "error answer",
            Box::new(|s| drop(send_frame(s.as_raw_fd(), &encode(&Response::Error { message: "no room at the inn".into() }), None))),
            "no room at the inn",
        ),
        ("status answer", Box::new(|s| drop(send_frame(s.as_raw_fd(), br#"{"type":"done","message":"?"}"#, None))), "unexpected answer"),
        ("hang-up", Box::new(|s| drop(s.shutdown(std::net::Shutdown::Both))), "connection closed"),
        ("silence", Box::new(|_| {}), "os error 11"),
    ];
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (i, (what, answer, reason)) in cases.into_iter().enumerate() {
            let socket = sim.path(&format!("fake-{i}.sock"));
            let sim = &sim;
            scope.spawn(move || {
                let _fake = FakeController::start(&socket, answer);
                let out = sim
                    .client(Route::Link)
                    .shim()
                    .env("GPUSLICE_SOCKET", show(&socket))
                    .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
                    .args("init ctx 0 alloc 600M alloc 600M info")
                    .run();
                out.assert_success();
                out.expect_ok(0);
                out.expect_ok(2);
                out.expect_err(3, OOM);
                assert_eq!(out.u64("info", "total"), GIB, "{what}: its own 1 GiB limit holds:\n{out}");
                let lines = out.stderr_lines_with(&["did not take this process", "running alone"]);
                assert_eq!(lines.len(), 1, "{what}: one warning line:\n{out}");
                assert!(lines[0].contains(reason), "{what}: the line says why ({reason:?}): {}", lines[0]);
                assert_eq!(
                    out.stderr.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count(),
                    2,
                    "{what}: that warning and the refusal, nothing else:\n{out}"
                );
            });
        }
    });
    eprintln!("13 bad controllers answered in {:.1?}", start.elapsed());
}

// ------------------------------------------------------------------------------ 3. the ledger file

/// At controller start, whatever is at the ledger path: another program's file (text, zeros,
/// empty, a FIFO, a directory, a symbolic link) is refused and left exactly as it was; a
/// damaged or older gpuslice ledger is replaced with a warning; a ledger with a loose mode is
/// tightened; a ledger another live controller serves is refused. No socket is left behind by
/// a refusal.
#[test]
fn the_controller_refuses_files_that_are_not_its_ledger_and_replaces_damaged_ones() {
    let sim = sim();
    let socket = sim.path("sock");
    let shm = sim.path("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let valid = valid_ledger_bytes(&shm);
    let target = shm.join("target.txt");
    std::fs::write(&target, "precious").unwrap();

    type Make = Box<dyn Fn(&Path)>;
    let refused: Vec<(&str, Make, &str)> = vec![
        ("a text file", Box::new(|p: &Path| std::fs::write(p, "some other program's data\n".repeat(300)).unwrap()), "it is not a gpuslice ledger"),
        ("a zeroed file", Box::new(|p: &Path| std::fs::write(p, vec![0u8; 1 << 20]).unwrap()), "it is not a gpuslice ledger"),
        ("a FIFO", Box::new(|p: &Path| assert!(std::process::Command::new("mkfifo").arg(p).status().unwrap().success())), "not a regular file"),
        ("a directory", Box::new(|p: &Path| std::fs::create_dir(p).unwrap()), "Is a directory"),
        ("a symbolic link", Box::new(|p: &Path| std::os::unix::fs::symlink("target.txt", p).unwrap()), "symbolic link"),
    ];
    for (i, (what, make, reason)) in refused.iter().enumerate() {
        let ledger = shm.join(format!("refused-{i}"));
        make(&ledger);
        let before = std::fs::symlink_metadata(&ledger).unwrap();
        // (Reading a FIFO would wait for a writer: only plain files are read.)
        let read = |p: &Path| std::fs::symlink_metadata(p).unwrap().is_file().then(|| std::fs::read(p).unwrap());
        let content = read(&ledger);
        let out = serve_refused(&sim, &socket, &ledger);
        assert!(out.stderr.contains(reason) && out.stderr.contains(&show(&ledger)), "{what}: the error names the file and says {reason:?}:\n{out}");
        let after = std::fs::symlink_metadata(&ledger).unwrap();
        assert_eq!((before.len(), before.file_type()), (after.len(), after.file_type()), "{what}: left as it was");
        assert_eq!(read(&ledger), content, "{what}: its content untouched");
        assert!(!socket.exists(), "{what}: no socket left behind");
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    assert!(std::fs::read_dir(&shm).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".new-")), "no temporary files left");

    // Damaged or older gpuslice ledgers: replaced, with a warning that says why.
    let mut wrong_version = valid.clone();
    wrong_version[8] = 99;
    let replaced = [
        ("a truncated ledger", valid[..100].to_vec(), "shorter than its"),
        ("a ledger cut short", valid[..valid.len() / 2].to_vec(), "file size is"),
        ("another layout", wrong_version, "layout version 99"),
        ("an empty file (a ledger truncated through a handed-out descriptor)", Vec::new(), "is empty (truncated?)"),
    ];
    for (what, bytes, reason) in replaced {
        let ledger = shm.join("ledger");
        std::fs::write(&ledger, &bytes).unwrap();
        let ctl = Serve::start(&sim, &socket, &ledger, "");
        let log = ctl.stop();
        let warned: Vec<&str> = log.stderr.lines().filter(|l| l.contains("replacing it with a new one")).collect();
        assert_eq!(warned.len(), 1, "{what}: one warning:\n{log}");
        assert!(warned[0].contains(reason), "{what}: {}", warned[0]);
        assert!(std::fs::read(&ledger).unwrap().len() > bytes.len().max(4096), "{what}: a full ledger now");
        std::fs::remove_file(&ledger).unwrap();
    }

    // A loose mode is put back to 0600.
    let ledger = shm.join("ledger");
    std::fs::write(&ledger, &valid).unwrap();
    std::fs::set_permissions(&ledger, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let ctl = Serve::start(&sim, &socket, &ledger, "");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ledger).unwrap().permissions()) & 0o777, 0o600);

    // One ledger, one controller: a second one on another socket is refused while the first runs.
    let out = serve_refused(&sim, &sim.path("second.sock"), &ledger);
    assert!(out.stderr.contains(&format!("in use by another gpuslice controller (pid {})", ctl.pid())), "{out}");
    assert!(!sim.path("second.sock").exists());
    assert!(ctl.answers(), "the first controller is undisturbed");
    let log = ctl.stop();
    assert!(log.stderr.contains("had mode 666; setting it back to 600"), "{log}");

    // Once it stopped (or was killed), the next one adopts the ledger.
    let mut ctl = Serve::start(&sim, &socket, &ledger, "");
    ctl.run.as_mut().unwrap().kill();
    drop(ctl.run.take().unwrap().wait());
    let ctl = Serve::start(&sim, &socket, &ledger, "");
    assert!(ctl.log().contains("adopted"), "{}", ctl.log());
}

// ------------------------------------------------------------------------------ 4. a full ledger

/// With every process slot taken, the next process is refused with a line that says so and
/// runs alone on its own environment's limits; the same with every group slot taken; a freed
/// slot is taken again.
#[test]
fn a_full_ledger_refuses_with_a_reason_and_the_process_runs_on_its_own_limits() {
    let sim = sim();
    let config = sim.write_file("full.toml", "[groups.g]\nmemory_limit = \"1GiB\"\n");
    let ctl = Serve::start(
        &sim,
        &sim.path("sock"),
        &sim.path("shm/ledger"),
        &format!("--config {} --max-processes 2 --max-groups 2 --max-processes-per-uid 2 --max-groups-per-uid 2", show(&config)),
    );
    let holder = |group: Option<&str>, done: &Path| {
        let mut c = sim.client(Route::Link).shim().env("GPUSLICE_SOCKET", show(&ctl.socket));
        if let Some(g) = group {
            c = c.group(g);
        }
        let c = c.args(&format!("init ctx 0 alloc 100M waitfile {}", show(done))).spawn();
        c.wait_line("alloc", 0);
        c
    };
    let (done_a, done_b) = (sim.path("done-a"), sim.path("done-b"));
    let a = holder(Some("g"), &done_a);
    let b = holder(None, &done_b); // a group of its own: both group slots are taken now
    assert_eq!(ctl.ls().pids().len(), 2);

    let alone = |group: &str| {
        let out = sim
            .client(Route::Link)
            .shim()
            .env("GPUSLICE_SOCKET", show(&ctl.socket))
            .group(group)
            .env("GPUSLICE_MEMORY_LIMIT", "512MiB")
            .args("init ctx 0 alloc 400M alloc 100M info")
            .run();
        out.assert_success();
        out.expect_ok(2);
        out.expect_err(3, OOM);
        assert_eq!(out.u64("info", "total"), 512 * MIB, "{out}");
        out
    };
    let out = alone("g");
    let lines = out.stderr_lines_with(&["did not take this process", "the ledger is full (2 processes)", "running alone", "512"]);
    assert_eq!(lines.len(), 1, "one line naming the full ledger and the limits it runs on:\n{out}");
    assert!(ctl.log().contains("registration refused: the ledger is full (2 processes)"), "{}", ctl.log());

    touch(&done_a);
    a.wait().assert_success();
    let (l, _) = ls_until(&ctl, |l| l.pids().len() == 1);
    assert!(l.group("g").is_some(), "the config group stays:\n{l}");
    let out = alone("h"); // a process slot is free now, but no group slot for a new group
    assert_eq!(out.stderr_lines_with(&["did not take this process", "the ledger is full (2 groups)", "running alone"]).len(), 1, "{out}");

    // Into an existing group it goes: the freed process slot is taken again.
    let out = sim.client(Route::Link).shim().env("GPUSLICE_SOCKET", show(&ctl.socket)).group("g").args("init ctx 0 alloc 900M alloc 100M").run();
    out.expect_ok(2);
    out.expect_err(3, OOM);
    assert!(out.stderr_lines_with(&["did not take"]).is_empty(), "{out}");
    touch(&done_b);
    b.wait().assert_success();
}

fn ls_until(ctl: &Serve<'_>, f: impl Fn(&Listing) -> bool) -> (Listing, Duration) {
    let start = Instant::now();
    loop {
        let l = ctl.ls();
        if f(&l) {
            return (l, start.elapsed());
        }
        assert!(start.elapsed() < Duration::from_secs(5), "not within 5 s:\n{l}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------------------------------ 5. the socket path

/// A regular file or a directory where the socket should be: `gpuslice serve` refuses and
/// leaves it alone (it never deletes what it did not create), and creates no ledger; a shim
/// pointed at it says so in one line and runs alone on its own limits.
#[test]
fn a_socket_path_that_is_not_a_socket() {
    let sim = sim();
    let file = sim.write_file("not-a-socket", "keep me\n");
    let dir = sim.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    for path in [&file, &dir] {
        let ledger = sim.path("shm/ledger");
        let out = serve_refused(&sim, path, &ledger);
        assert!(out.stderr.contains(&format!("{} exists and is not a socket; refusing to replace it", show(path))), "{out}");
        assert!(!ledger.exists(), "no ledger made by a refused start");
        let out = sim
            .client(Route::Dlsym)
            .shim()
            .env("GPUSLICE_SOCKET", show(path))
            .env("GPUSLICE_MEMORY_LIMIT", "1GiB")
            .args("init ctx 0 alloc 600M alloc 600M")
            .run();
        out.assert_success();
        out.expect_err(3, OOM);
        let lines = out.stderr_lines_with(&["did not take this process", &show(path), "running alone"]);
        assert_eq!(lines.len(), 1, "{out}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me\n");
    assert!(dir.is_dir());

    // A socket left by a controller that died is no one's: it is replaced.
    let stale = sim.path("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let ctl = Serve::start(&sim, &stale, &sim.path("shm/ledger"), "");
    assert!(ctl.answers());
}

// ------------------------------------------------------------------------------ 6. settings

/// What a client run under `env` printed, with the shim; `script` after it.
fn run_env(sim: &Sim, env: &[(&str, &str)], script: &str) -> Output {
    let mut c = sim.client(Route::Link).shim();
    for (k, v) in env {
        c = c.env(k, v);
    }
    c.args(script).run()
}

/// Every variable the shim reads, with values it cannot use. Settings (limits, shares,
/// priority, group, config file): one stderr line naming the variable and the value, and
/// CUDA refused (`cuInit` returns CUDA_ERROR_INVALID_VALUE) — a typo must never mean "no
/// limit". Log and socket variables: one warning and a safe default.
#[test]
fn every_variable_with_a_bad_value_is_named_in_one_line() {
    let sim = sim();
    let dir_config = sim.path("config-dir");
    std::fs::create_dir(&dir_config).unwrap();
    let binary_config = sim.write_file("binary.toml", "");
    std::fs::write(&binary_config, [0xff, 0xfe, 0x00, 0x5b, 0x5d]).unwrap();
    let missing = show(&sim.path("missing.toml"));
    let wrong_type = show(&sim.write_file("wrong.toml", "[defaults]\nmemory_limit = true\n"));
    let refused: Vec<(&str, String, &str)> = vec![
        ("GPUSLICE_MEMORY_LIMIT", "4 GB x".into(), "is not a size"),
        ("GPUSLICE_MEMORY_LIMIT", "0".into(), "zero bytes"),
        ("GPUSLICE_MEMORY_LIMIT", "99999999999T".into(), "too large"),
        ("GPUSLICE_MEMORY_LIMIT", "1e9".into(), "unknown unit"),
        ("GPUSLICE_MEMORY_LIMIT_0", "-1".into(), "cannot be negative"),
        ("GPUSLICE_MEMORY_LIMIT_gpu0", "1GiB".into(), "not a device number"),
        ("CUDA_DEVICE_MEMORY_LIMIT", "lots".into(), "is not a size"),
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "1.5.2G".into(), "malformed number"),
        ("GPUSLICE_SM_SHARE", "0".into(), "from 1 to 100"),
        ("GPUSLICE_SM_SHARE", "101".into(), "from 1 to 100"),
        ("GPUSLICE_SM_SHARE_0", "half".into(), "whole percentage"),
        ("CUDA_DEVICE_SM_LIMIT", "150".into(), "from 1 to 100"),
        ("CUDA_DEVICE_SM_LIMIT_1", "-5".into(), "whole percentage"),
        ("GPUSLICE_PRIORITY", "urgent".into(), "not a priority"),
        ("GPUSLICE_PRIORITY_QUEUE", "0".into(), "1 to 64"),
        ("GPUSLICE_PRIORITY_QUEUE", "many".into(), "1 to 64"),
        ("GPUSLICE_PRIORITY_GATE", "off".into(), "on, spatial-off or auto"),
        ("GPUSLICE_GROUP", "team a".into(), "a group name is"),
        ("GPUSLICE_GROUP", "pid-7".into(), "a group name is"),
        ("GPUSLICE_GROUP", "g".repeat(100), "a group name is"),
        ("GPUSLICE_CONFIG", missing.clone(), "No such file"),
        ("GPUSLICE_CONFIG", show(&dir_config), "Is a directory"),
        ("GPUSLICE_CONFIG", show(&binary_config), "valid UTF-8"),
        ("GPUSLICE_CONFIG", wrong_type.clone(), "expected a size"),
    ];
    std::thread::scope(|scope| {
        for chunk in refused.chunks(6) {
            let sim = &sim;
            scope.spawn(move || {
                for (var, value, reason) in chunk {
                    let out = run_env(sim, &[(var, value)], "init ctx 0 alloc 1M");
                    out.assert_success();
                    out.expect_err(0, CUDA_ERROR_INVALID_VALUE);
                    assert!(!out.ok(2), "{var}={value:?}: no allocation after a bad setting:\n{out}");
                    let shown = if value.len() > 60 { &value[..20] } else { value.as_str() };
                    let lines = out.stderr_lines_with(&["gpuslice: error:", var, shown]);
                    assert_eq!(lines.len(), 1, "{var}={value:?}: one line naming it:\n{out}");
                    assert!(lines[0].contains(reason), "{var}={value:?}: says {reason:?}: {}", lines[0]);
                    assert_eq!(out.stderr.lines().count(), 1, "{var}={value:?}: and nothing else:\n{out}");
                }
            });
        }
    });

    // Bytes that are not UTF-8 (set through the shell: Rust's environment API takes text).
    for var in ["GPUSLICE_MEMORY_LIMIT", "CUDA_DEVICE_MEMORY_LIMIT_0", "GPUSLICE_SM_SHARE", "GPUSLICE_GROUP", "GPUSLICE_PRIORITY", "GPUSLICE_CONFIG"] {
        let out = sim
            .program("/bin/sh")
            .shim()
            .arg("-c")
            .arg(format!("{var}=$(printf '4\\377G') exec \"$0\" init ctx 0 alloc 1M", var = var))
            .arg(show(&client_path(Route::Link)))
            .run();
        out.assert_success();
        out.expect_err(0, CUDA_ERROR_INVALID_VALUE);
        let lines = out.stderr_lines_with(&["gpuslice: error:", var, "not valid UTF-8"]);
        assert_eq!(lines.len(), 1, "{var}: one line naming it:\n{out}");
    }

    // Defaults, with one warning: a bad log filter means "warn"; a log file that cannot be
    // opened means stderr; a socket path where nothing is means running alone (quietly).
    let out = run_env(&sim, &[("GPUSLICE_LOG", "gpuslice=loud"), ("GPUSLICE_MEMORY_LIMIT", "1GiB")], "init ctx 0 alloc 2G");
    out.expect_err(2, OOM);
    assert_eq!(out.stderr_lines_with(&["GPUSLICE_LOG=", "loud", "using \"warn\""]).len(), 1, "{out}");
    assert_eq!(out.stderr_lines_with(&["refused"]).len(), 1, "warn level: the refusal is logged:\n{out}");
    let out = run_env(&sim, &[("GPUSLICE_LOG_FILE", "/proc/no/such/dir/log"), ("GPUSLICE_MEMORY_LIMIT", "1GiB")], "init ctx 0 alloc 2G");
    out.expect_err(2, OOM);
    assert_eq!(out.stderr_lines_with(&["cannot open GPUSLICE_LOG_FILE", "/proc/no/such/dir/log", "logging to stderr instead"]).len(), 1, "{out}");
    assert_eq!(out.stderr_lines_with(&["refused"]).len(), 1, "the refusal went to stderr:\n{out}");
    let out = run_env(&sim, &[("GPUSLICE_SOCKET", "\u{1}nowhere"), ("GPUSLICE_MEMORY_LIMIT", "1GiB")], "init ctx 0 alloc 2G");
    out.expect_err(2, OOM);
    // A socket in the environment means a controller is wanted: that none answers is a warning.
    assert_eq!(out.stderr.lines().count(), 2, "the refusal and that it runs alone, at the default level:\n{out}");
    assert_eq!(out.stderr_lines_with(&["no gpuslice controller at", "running alone"]).len(), 1, "{out}");
    // A socket path that is not UTF-8 is still a path: it must not send the process to the
    // default socket.
    let out = sim
        .program("/bin/sh")
        .shim()
        .env("GPUSLICE_LOG", "info")
        .arg("-c")
        .arg("GPUSLICE_SOCKET=$(printf '/nowhere/\\377.sock') exec \"$0\" init")
        .arg(show(&client_path(Route::Link)))
        .run();
    out.expect_ok(0);
    let lines = out.stderr_lines_with(&["no gpuslice controller at /nowhere/", "running alone"]);
    assert_eq!(lines.len(), 1, "{out}");
    // An unknown test panic point never fires.
    let out = run_env(&sim, &[("GPUSLICE_TEST_PANIC_IN", "no-such-hook")], "init ctx 0 alloc 1M info");
    out.assert_all_ok();
}

/// The same config errors stop the controller with the place of the error on one line; an
/// environment that is not UTF-8 does not trip `gpuslice check-config`.
#[test]
fn config_files_with_bad_values_stop_the_controller_on_one_line() {
    let sim = sim();
    let cases = [
        ("[defaults]\nmemory_limit = -5\n", "line 2, column 16", "expected a size"),
        ("[groups.a]\nmemory_limit = \"1GiB\"\nmemory_limit = \"2GiB\"\n", "line 3", "duplicate key"),
        ("[groups.\"bad name\"]\nsm_share = 50\n", "groups.bad name", "a group name is"),
        ("[defaults.devices.first]\nmemory_limit = \"1GiB\"\n", "defaults.devices.first", "device keys are CUDA device numbers"),
        ("[defaults]\nsm_share = 250\n", "defaults.sm_share", "from 1 to 100"),
        ("[controller]\nsocket = 5\n", "line 2", "invalid type"),
    ];
    for (i, (text, place, reason)) in cases.iter().enumerate() {
        let file = sim.write_file(&format!("c{i}.toml"), text);
        let socket = sim.path(&format!("c{i}.sock"));
        let out = sim
            .program(cli_path())
            .arg("serve")
            .arg("--config")
            .arg(show(&file))
            .arg("--socket")
            .arg(show(&socket))
            .arg("--ledger")
            .arg(show(&sim.path(&format!("c{i}/ledger"))))
            .run();
        assert!(!out.success(), "{text}");
        assert_eq!(out.stderr.lines().count(), 1, "{text}: one line:\n{out}");
        for needle in [show(&file).as_str(), place, reason] {
            assert!(out.stderr.contains(needle), "{text}: says {needle:?}:\n{out}");
        }
        assert!(!socket.exists());
    }
    let out = sim.program("/bin/sh").arg("-c").arg("STRANGE=$(printf '\\377') exec \"$0\" check-config").arg(show(&cli_path())).run();
    assert!(out.success() && !out.stderr.contains("panicked"), "{out}");
}
