//! The controller's two live views against the simulated driver: the Prometheus endpoint
//! (`gpuslice serve --metrics`), scraped over plain HTTP and checked figure by figure against
//! `gpuslice ls --json`, and `gpuslice top`, driven in a tmux pane.

use gpuslice_integration::*;
use std::collections::HashMap;
use std::net::TcpStream;
use std::time::Duration;

/// Context reserve of the simulated driver: what each process's context holds.
const R: u64 = 64 * MIB;

fn sim() -> Sim {
    Sim::new().env("SIMCUDA_CTX_RESERVE", R)
}

// ------------------------------------------------------------------------------- metrics

/// A scrape, parsed: every sample as (name, labels) → value.
struct Scrape {
    text: String,
    samples: HashMap<(String, Vec<(String, String)>), f64>,
}

impl Scrape {
    fn get(port: u16) -> Scrape {
        let (status, headers, body) = http_get(port, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        let ct = headers.get("content-type").cloned().unwrap_or_default();
        assert!(ct.starts_with("application/openmetrics-text"), "content type {ct:?}");
        assert_eq!(headers.get("content-length").map(String::as_str), Some(body.len().to_string().as_str()));
        assert!(body.ends_with("# EOF\n"), "an OpenMetrics exposition ends with # EOF:\n{body}");
        Scrape::parse(&body)
    }

    fn parse(text: &str) -> Scrape {
        let mut samples = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: `{line}`"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in `{line}`"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n.to_string(), parse_labels(rest.strip_suffix('}').unwrap_or_else(|| panic!("no closing brace: `{line}`")))),
                None => (series.to_string(), Vec::new()),
            };
            assert!(name.starts_with("gpuslice_"), "unprefixed metric `{line}`");
            let old = samples.insert((name, labels), value);
            assert!(old.is_none(), "sample twice: `{line}`");
        }
        Scrape { text: text.to_string(), samples }
    }

    /// The value of `name` with exactly these labels (panics, showing the scrape, if absent).
    fn value(&self, name: &str, labels: &[(&str, String)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    fn find(&self, name: &str, labels: &[(&str, String)]) -> Option<f64> {
        let key = (name.to_string(), labels.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<Vec<_>>());
        self.samples.get(&key).copied()
    }

    /// Samples of `name`, whatever their labels.
    fn count(&self, name: &str) -> usize {
        self.samples.keys().filter(|(n, _)| n == name).count()
    }

    fn bytes(&self, name: &str, labels: &[(&str, String)]) -> u64 {
        let v = self.value(name, labels);
        assert_eq!(v.fract(), 0.0, "{name}{labels:?} = {v}: bytes are whole");
        v as u64
    }
}

/// `a="x",b="y\"z"` → [(a, x), (b, y"z)].
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad labels `{text}`"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("bad escape in `{text}`"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in `{text}`"),
            }
        };
        out.push((key.to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    out
}

fn close(a: f64, b: f64, tolerance: f64, what: &str) {
    assert!((a - b).abs() <= tolerance, "{what}: {a} vs {b} (tolerance {tolerance})");
}

fn json_u64(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// Every group and process row of `l` against the scrape: bytes and refusals exactly, times to
/// the microsecond, shares to the float. Also: no sample for a row `ls` does not show.
fn compare(l: &Listing, m: &Scrape) {
    let mut group_rows = 0;
    for g in l.groups() {
        let name = g["name"].as_str().unwrap().to_string();
        for d in g["devices"].as_array().unwrap() {
            group_rows += 1;
            let k = [("group", name.clone()), ("device", d["device"].to_string()), ("uuid", d["uuid"].as_str().unwrap().to_string())];
            assert_eq!(m.bytes("gpuslice_group_memory_used_bytes", &k), json_u64(d, "used"), "{name}");
            assert_eq!(m.bytes("gpuslice_group_memory_peak_bytes", &k), json_u64(d, "peak"), "{name}");
            assert_eq!(m.find("gpuslice_group_memory_limit_bytes", &k).map(|v| v as u64), d["limit"].as_u64(), "{name}");
            assert_eq!(m.value("gpuslice_group_oom_refusals_total", &k) as u64, json_u64(d, "refusals"), "{name}");
            close(m.value("gpuslice_group_device_time_seconds_total", &k), json_u64(d, "charged_ns") as f64 / 1e9, 1e-6, "group device time");
            close(m.value("gpuslice_group_throttle_wait_seconds_total", &k), json_u64(d, "throttled_ns") as f64 / 1e9, 1e-6, "group throttle wait");
            assert_eq!(m.find("gpuslice_group_sm_share_target_ratio", &k), d["share"].as_u64().map(|s| s as f64 / 100.0), "{name}");
            match d["achieved_share"].as_f64() {
                Some(a) => close(m.value("gpuslice_group_sm_share_achieved_ratio", &k), a / 100.0, 1e-9, "group achieved share"),
                None => assert_eq!(m.find("gpuslice_group_sm_share_achieved_ratio", &k), None),
            }
        }
        let k = [("group", name.clone())];
        assert_eq!(m.value("gpuslice_group_members", &k) as usize, g["members"].as_array().unwrap().len());
        let priority = match g["priority"].as_str().unwrap() {
            "low" => 1.0,
            "normal" => 2.0,
            _ => 3.0,
        };
        assert_eq!(m.value("gpuslice_group_priority", &k), priority, "{name}");
    }
    assert_eq!(m.count("gpuslice_group_memory_used_bytes"), group_rows, "one sample per group row of ls:\n{}", m.text);
    let mut process_rows = 0;
    for p in l.processes() {
        let who = [("pid", p["pid"].to_string()), ("name", p["name"].as_str().unwrap().to_string()), ("group", p["group"].as_str().unwrap().to_string())];
        for d in p["devices"].as_array().unwrap() {
            process_rows += 1;
            let mut k = who.to_vec();
            k.extend([("device", d["device"].to_string()), ("uuid", d["uuid"].as_str().unwrap().to_string())]);
            assert_eq!(m.bytes("gpuslice_process_memory_used_bytes", &k), json_u64(d, "used"));
            assert_eq!(m.bytes("gpuslice_process_memory_overhead_bytes", &k), json_u64(d, "overhead"));
            assert_eq!(m.bytes("gpuslice_process_memory_peak_bytes", &k), json_u64(d, "peak"));
            assert_eq!(m.find("gpuslice_process_memory_limit_bytes", &k).map(|v| v as u64), d["limit"].as_u64());
            assert_eq!(m.value("gpuslice_process_oom_refusals_total", &k) as u64, json_u64(d, "refusals"));
            close(m.value("gpuslice_process_device_time_seconds_total", &k), json_u64(d, "charged_ns") as f64 / 1e9, 1e-6, "process device time");
            close(m.value("gpuslice_process_throttle_wait_seconds_total", &k), json_u64(d, "throttled_ns") as f64 / 1e9, 1e-6, "process throttle wait");
            let group_share = l.group_share(p["group"].as_str().unwrap(), d["device"].as_u64().unwrap() as u32);
            assert_eq!(m.find("gpuslice_process_sm_share_target_ratio", &k), group_share.map(|s| s as f64 / 100.0));
            match d["achieved_share"].as_f64() {
                Some(a) => close(m.value("gpuslice_process_sm_share_achieved_ratio", &k), a / 100.0, 1e-9, "process achieved share"),
                None => assert_eq!(m.find("gpuslice_process_sm_share_achieved_ratio", &k), None),
            }
        }
        let priority = match p["priority"].as_str().unwrap() {
            "low" => 1.0,
            "normal" => 2.0,
            _ => 3.0,
        };
        assert_eq!(m.value("gpuslice_process_priority", &who), priority);
    }
    assert_eq!(m.count("gpuslice_process_memory_used_bytes"), process_rows, "one sample per process row of ls:\n{}", m.text);
}

/// `ls`, a scrape, `ls` again, until `stable` gives the same for both listings (achieved
/// shares are resampled every second; a sample between the two requests would make them
/// differ).
fn consistent_scrape<T: PartialEq>(ctl: &Controller<'_>, port: u16, stable: impl Fn(&Listing) -> T) -> (Listing, Scrape) {
    for _ in 0..5 {
        let before = ctl.ls();
        let m = Scrape::get(port);
        let after = ctl.ls();
        if stable(&before) == stable(&after) {
            return (before, m);
        }
    }
    panic!("`gpuslice ls` changed around every one of 5 scrapes");
}

/// Every achieved share in a listing.
fn achieved_shares(l: &Listing) -> Vec<Option<f64>> {
    let rows = l.groups().iter().chain(l.processes()).flat_map(|r| r["devices"].as_array().unwrap());
    rows.map(|d| d["achieved_share"].as_f64()).collect()
}

/// Three processes (two in a throttled, high-priority group with a limit, one alone with its
/// own limit) allocate, launch and get refused; the scrape agrees with `ls --json` on every
/// figure and with what the clients saw; the health counts the socket's traffic; processes that
/// exit leave the scrape.
#[test]
fn metrics_agree_with_the_ledger() {
    let sim = sim();
    let port = free_port();
    let ctl = sim.controller_with_args(&["--metrics", &format!("127.0.0.1:{port}")]);
    assert!(ctl.log().contains(&format!("metrics at http://127.0.0.1:{port}/metrics")), "{}", ctl.log());
    ctl.set_ok("--create --group scraped --memory 512MiB --sm 50 --priority high");
    let done = sim.path("done").display().to_string();
    // 1200 kernels of 500 µs: 600 ms of device time, about 1.2 s at a 50% share.
    let worker = sim
        .client(Route::Link)
        .shim()
        .controller(&ctl)
        .group("scraped")
        .args(&format!("init ctx 0 alloc 200M launch 1200 500000 sync waitfile {done}"))
        .spawn();
    expect_ok(&worker.wait_line("alloc", 0));
    // 2R + 200M + 100M fits in 512M; another 300M does not.
    let refused = sim.client(Route::Dlsym).shim().controller(&ctl).group("scraped").args(&format!("init ctx 0 alloc 100M alloc 300M waitfile {done}")).spawn();
    expect_ok(&refused.wait_line("alloc", 0));
    assert_eq!(line_code(&refused.wait_line("alloc", 1)), Some(CUDA_ERROR_OUT_OF_MEMORY));
    let alone = sim
        .client(Route::Procaddr)
        .shim()
        .controller(&ctl)
        .env("GPUSLICE_MEMORY_LIMIT", "256MiB")
        .args(&format!("init ctx 0 alloc 100M waitfile {done}"))
        .spawn();
    expect_ok(&alone.wait_line("alloc", 0));
    // A second of the worker's throttled launches has been sampled (the next sample is a
    // second away: the scrape below sees this one).
    ctl.ls_until("the worker's achieved share", Duration::from_secs(5), |l| {
        l.process_device(worker.pid(), 0)["achieved_share"].as_f64().is_some_and(|a| a > 20.0)
    });
    let (l, m) = consistent_scrape(&ctl, port, achieved_shares);
    let k = [("group", "scraped".to_string()), ("device", "0".into()), ("uuid", sim.device_uuid(0))];
    close(
        m.value("gpuslice_group_sm_share_achieved_ratio", &k),
        l.group_device("scraped", 0)["achieved_share"].as_f64().unwrap() / 100.0,
        1e-9,
        "achieved share",
    );
    let achieved = m.value("gpuslice_group_sm_share_achieved_ratio", &[("group", "scraped".into()), ("device", "0".into()), ("uuid", sim.device_uuid(0))]);
    assert!(achieved > 0.2 && achieved <= 0.6, "achieved {achieved} while the worker ran at a 50% share");
    expect_ok(&worker.wait_line("sync", 0));

    // Now everything is still: every figure against ls, and against what the clients did.
    let (l, m) = consistent_scrape(&ctl, port, |l| l.json.clone());
    compare(&l, &m);
    compare(&l, &m);
    // And against what the clients did, not only against ls.
    let dev = |more: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        let mut k = more.to_vec();
        k.extend([("device", "0".to_string()), ("uuid", sim.device_uuid(0))]);
        k
    };
    let group = dev(&[("group", "scraped".into())]);
    assert_eq!(m.bytes("gpuslice_group_memory_used_bytes", &group), 2 * R + 300 * MIB);
    assert_eq!(m.bytes("gpuslice_group_memory_limit_bytes", &group), 512 * MIB);
    assert_eq!(m.value("gpuslice_group_oom_refusals_total", &group), 1.0);
    assert_eq!(m.value("gpuslice_group_sm_share_target_ratio", &group), 0.5);
    assert_eq!(m.value("gpuslice_group_priority", &[("group", "scraped".into())]), 3.0);
    let process = |c: &Running, name: &str, group: &str| dev(&[("pid", c.pid().to_string()), ("name", name.into()), ("group", group.into())]);
    let w = process(&worker, "cuclient-link", "scraped");
    let device_time = m.value("gpuslice_process_device_time_seconds_total", &w);
    assert!((0.5..=0.7).contains(&device_time), "the worker ran 600 ms of kernels; charged {device_time} s");
    let waited = m.value("gpuslice_process_throttle_wait_seconds_total", &w);
    assert!(waited > 0.2, "at a 50% share the worker waited about 600 ms; the scrape says {waited} s");
    assert_eq!(m.value("gpuslice_process_oom_refusals_total", &process(&refused, "cuclient-dlsym", "scraped")), 1.0);
    let solo = format!("pid-{}", alone.pid());
    assert_eq!(m.bytes("gpuslice_process_memory_used_bytes", &process(&alone, "cuclient-procaddr", &solo)), R + 100 * MIB);
    assert_eq!(m.bytes("gpuslice_group_memory_limit_bytes", &dev(&[("group", solo.clone())])), 256 * MIB);

    // The controller's health.
    let none: [(&str, String); 0] = [];
    assert_eq!(m.value("gpuslice_up", &none), 1.0);
    assert_eq!(m.value("gpuslice_processes", &none), 3.0);
    assert_eq!(m.value("gpuslice_groups", &none), l.groups().len() as f64);
    let slots = |state: &str| m.value("gpuslice_ledger_process_slots", &[("state", state.into())]);
    assert_eq!(slots("used"), 3.0);
    let status = ctl.cli("status --json").run();
    let status: serde_json::Value = serde_json::from_str(&status.lines.join("\n")).unwrap();
    assert_eq!(slots("used") + slots("free"), status["max_processes"].as_f64().unwrap());
    let requests = |kind: &str| m.value("gpuslice_socket_requests_total", &[("request", kind.into())]);
    assert_eq!(requests("register"), 3.0);
    assert_eq!(requests("set"), 1.0);
    assert!(requests("list") >= 2.0 && requests("status") >= 1.0, "{}", m.text);
    assert_eq!(m.value("gpuslice_socket_errors_total", &[("reason", "bad_request".into())]), 0.0);
    assert!(m.value("gpuslice_heartbeat_age_seconds", &none) < 1.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let sampled = m.value("gpuslice_share_sample_timestamp_seconds", &none);
    assert!(now - sampled < 3.0 && sampled <= now + 0.01, "last share sample at {sampled}, now {now}");

    // Only GET /metrics is served.
    let (status, _, _) = http_get(port, "/");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");

    touch(&done);
    for c in [worker, refused, alone] {
        c.wait().assert_success();
    }
    ctl.ls_until("every client gone", Duration::from_secs(3), |l| l.pids().is_empty());
    let m = Scrape::get(port);
    assert_eq!(m.count("gpuslice_process_memory_used_bytes"), 0, "exited processes leave the scrape:\n{}", m.text);
    assert_eq!(m.value("gpuslice_processes", &none), 0.0);
    assert_eq!(m.bytes("gpuslice_group_memory_used_bytes", &group), 0);
    assert_eq!(m.bytes("gpuslice_group_memory_peak_bytes", &group), 2 * R + 300 * MIB);
}

/// `[controller] metrics` in the config serves the metrics; `--metrics` overrides it; a port
/// already taken stops the controller at once with the address in the message.
#[test]
fn metrics_address_from_the_config_the_flag_and_a_taken_port() {
    let sim = sim();
    let (from_file, from_flag) = (free_port(), free_port());
    let config = sim.write_file("metrics.toml", &format!("[controller]\nmetrics = \"127.0.0.1:{from_file}\"\n"));
    let config = config.display().to_string();
    {
        let _ctl = sim.controller_with_args(&["--config", &config]);
        assert_eq!(Scrape::get(from_file).value("gpuslice_up", &[]), 1.0);
    }
    let ctl = sim.controller_with_args(&["--config", &config, "--metrics", &format!("127.0.0.1:{from_flag}")]);
    assert_eq!(Scrape::get(from_flag).value("gpuslice_up", &[]), 1.0);
    assert!(TcpStream::connect(("127.0.0.1", from_file)).is_err(), "the flag replaces the file's address");

    // Another controller on another socket, on the same (taken) port.
    let out = sim
        .program(cli_path())
        .args("serve --socket")
        .arg(sim.path("other.sock").display())
        .args("--ledger")
        .arg(sim.path("other-ledger").display())
        .args("--metrics")
        .arg(format!("127.0.0.1:{from_flag}"))
        .run();
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains(&format!("cannot listen for metrics on 127.0.0.1:{from_flag}")), "{out}");
    assert!(!sim.path("other.sock").exists(), "it stopped before taking its socket");
    drop(ctl);
}

// ----------------------------------------------------------------------------------- top

/// `gpuslice top` in a 200 × 40 tmux pane: it shows a member of a config group (pid, name,
/// group, memory bar figure, share and priority) and a process alone; when the controller
/// stops it says so and keeps the figures, and recovers when one starts again; `q` (and, a
/// second time, Ctrl-C) ends it with status 0 and gives the shell its screen back.
#[test]
#[cfg_attr(not(gpuslice_it_tmux), ignore = "needs tmux, which was not installed when the tests were built (apt-get install tmux; .ci/run does)")]
fn top_shows_processes_and_groups_and_quits_on_q() {
    let sim = sim();
    let mut ctl = sim.controller_with_config("[groups.viewers]\nmemory_limit = \"1GiB\"\nsm_share = 40\npriority = \"high\"\n");
    let done = sim.path("done").display().to_string();
    let member = sim.client(Route::Link).shim().controller(&ctl).group("viewers").args(&format!("init ctx 0 alloc 100M waitfile {done}")).spawn();
    expect_ok(&member.wait_line("alloc", 0));
    let alone = sim.client(Route::Dlsym).shim().controller(&ctl).args(&format!("init ctx 0 alloc 20M waitfile {done}")).spawn();
    expect_ok(&alone.wait_line("alloc", 0));

    let tmux = Tmux::start(sim.dir(), 200, 40);
    tmux.type_line("echo shell-ready");
    tmux.wait_for("the shell", Duration::from_secs(5), |s| s.lines().any(|l| l.ends_with("shell-ready") && !l.contains("echo")));
    let command = format!("{} top --socket {} --interval-ms 200", cli_path().display(), ctl.socket().display());
    tmux.type_line(&command);
    let pid = member.pid().to_string();
    let screen = tmux.wait_for("the member's row", Duration::from_secs(10), |s| s.contains("controller pid") && s.contains(&pid));
    let row =
        screen.lines().find(|l| l.contains(&pid) && l.contains("cuclient-link")).unwrap_or_else(|| panic!("no row with pid {pid} and its name:\n{screen}"));
    for want in ["viewers", "164.0 MiB / 1.00 GiB", "40%", "high"] {
        assert!(row.contains(want), "the member's row lacks {want:?}: `{row}`\n{screen}");
    }
    let group_row =
        screen.lines().find(|l| l.contains("viewers") && l.contains(&pid) && !l.contains("cuclient-link")).unwrap_or_else(|| panic!("no group row:\n{screen}"));
    // 164 MiB of 1 GiB: 2 of 12 cells.
    assert!(group_row.contains("██░░░░░░░░░░ 164.0 MiB / 1.00 GiB"), "the group's bar: `{group_row}`");
    let solo = format!("pid-{}", alone.pid());
    assert!(
        screen.lines().any(|l| l.contains(&alone.pid().to_string()) && l.contains("cuclient-dlsym") && l.contains(&solo) && l.contains("84.0 MiB / -")),
        "{screen}"
    );

    // The controller goes away, and comes back (on the same ledger: same processes).
    ctl.stop();
    let screen = tmux.wait_for("that the controller is gone", Duration::from_secs(5), |s| s.contains("controller not reachable"));
    assert!(screen.contains(&pid) && screen.contains("164.0 MiB"), "the last figures stay on screen:\n{screen}");
    ctl.restart();
    tmux.wait_for("the view back", Duration::from_secs(5), |s| !s.contains("controller not reachable") && s.contains(&pid));

    tmux.run(&["send-keys", "-t", "top", "q"]);
    tmux.wait_for("the shell's screen back", Duration::from_secs(5), |s| !s.contains("controller pid"));
    tmux.type_line("echo top-exited-$?");
    tmux.wait_for("top's exit status 0", Duration::from_secs(5), |s| s.contains("top-exited-0"));
    assert_eq!(tmux.run(&["display-message", "-p", "-t", "top", "#{pane_current_command}"]).trim(), "sh");

    // Ctrl-C ends it the same way (raw mode makes it a key).
    tmux.type_line(&command);
    tmux.wait_for("top again", Duration::from_secs(10), |s| s.contains("controller pid"));
    tmux.run(&["send-keys", "-t", "top", "C-c"]);
    tmux.wait_for("the shell's screen back", Duration::from_secs(5), |s| !s.contains("controller pid"));
    tmux.type_line("echo again-exited-$?");
    tmux.wait_for("top's exit status 0", Duration::from_secs(5), |s| s.contains("again-exited-0"));

    touch(&done);
    member.wait().assert_success();
    alone.wait().assert_success();
}
