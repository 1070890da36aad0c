//! `gpuslice serve`: the controller daemon. The main thread runs one `poll(2)` loop over the
//! listening socket, a signalfd for SIGTERM/SIGINT and one pidfd per registered process; a tick
//! every 100 ms writes the heartbeat and retries unfinished work. Each connection gets a thread
//! of its own, so a client that connects and says nothing delays nobody else; the state is
//! locked only while a request is applied, never while a socket is read or written. With
//! `--metrics ADDR` a thread serves the same figures to Prometheus (`metrics.rs`, `http.rs`).

pub mod devices;

use crate::http;
use crate::metrics;
use crate::state::{raw, Peer, State};
use gpuslice_common::ledger::{Geometry, Ledger, LedgerError};
use gpuslice_common::protocol::*;
use gpuslice_common::settings::FileSettings;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

/// What `ls` and the metrics read: the state's listing, with the cross-check's findings and the
/// suspensions (kept by their own modules, above the state).
fn listing(state: &State) -> Listing {
    let mut listing = state.listing();
    listing.underreporting = crate::crosscheck::findings(state);
    listing.suspensions = crate::suspend::rows(&|g| crate::suspend::member_pids(state, g));
    listing
}

pub const DEFAULT_CONFIG: &str = "/etc/gpuslice/config.toml";
const TICK: Duration = Duration::from_millis(100);
/// A client gets this long to send its whole request, and as long again to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Connections served at once; more are closed at once (and logged).
const MAX_CONNECTIONS: usize = 128;
/// Connections one uid may hold open once half the slots are taken: one uid cannot take every
/// slot, whatever it sends, while a burst from one uid on a quiet controller is still served.
const MAX_CONNECTIONS_PER_UID: usize = MAX_CONNECTIONS / 8;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML config: defaults, [groups.NAME], [controller] socket/ledger. Default
    /// /etc/gpuslice/config.toml when it exists.
    #[arg(long)]
    config: Option<String>,
    /// Unix socket to listen on (default /run/gpuslice/gpuslice.sock).
    #[arg(long)]
    socket: Option<String>,
    /// The shared-memory ledger file (default /dev/shm/gpuslice/ledger).
    #[arg(long)]
    ledger: Option<String>,
    /// Process slots of a new ledger.
    #[arg(long, default_value_t = Geometry::default().max_procs, hide = true)]
    max_processes: u32,
    /// Group slots of a new ledger.
    #[arg(long, default_value_t = Geometry::default().max_groups, hide = true)]
    max_groups: u32,
    /// Process slots one uid may hold (default: half the table), so that one uid cannot fill it.
    #[arg(long, value_name = "N")]
    max_processes_per_uid: Option<u32>,
    /// Groups one uid's processes may make from their environment (default: half the table).
    #[arg(long, value_name = "N")]
    max_groups_per_uid: Option<u32>,
    /// Who may join a group made from a process's environment (not configured): `uid`, only
    /// processes of the uid that made it (so nobody can squat a name and pin another tenant's
    /// limits); `open`, any uid (pods whose containers run as several uids).
    #[arg(long, value_name = "uid|open", default_value = "uid", value_parser = ["uid", "open"])]
    env_groups: String,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9400 (overrides the
    /// config's [controller] metrics; `off` disables it). They name processes and groups:
    /// bind where only your monitoring can reach.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Issue 22: suspending and resuming groups.
    #[command(flatten)]
    suspension: crate::suspend::ServeFlags,
    /// Issue 19: the managed MPS control daemon.
    #[command(flatten)]
    mps: crate::mps_daemon::MpsFlags,
}

pub fn serve(args: ServeArgs) -> Result<(), String> {
    let config_path = args.config.clone().or_else(|| Path::new(DEFAULT_CONFIG).exists().then(|| DEFAULT_CONFIG.to_string()));
    let config = match &args.config {
        Some(path) => FileSettings::read_as("--config", path).map_err(|e| e.to_string())?,
        None if config_path.is_some() => FileSettings::read_as("config file", DEFAULT_CONFIG).map_err(|e| e.to_string())?,
        None => FileSettings::default(),
    };
    // A limit the controller cannot apply as written stops it here, before anything is bound.
    config.for_controller()?;
    // The same order as the CLI and the shims: the flag, $GPUSLICE_SOCKET, then the file.
    let env_socket = std::env::var(ENV_SOCKET).ok().filter(|s| !s.is_empty());
    let socket_path = args.socket.or(env_socket).or(config.controller.socket.clone()).unwrap_or_else(|| DEFAULT_SOCKET.to_string());
    let ledger_path = args.ledger.or(config.controller.ledger.clone()).unwrap_or_else(|| DEFAULT_LEDGER.to_string());
    let metrics_addr = args.metrics.or(config.controller.metrics.clone()).filter(|a| !a.is_empty() && a != "off");
    // Bound first: a taken port stops the controller before it touches the socket or ledger.
    let metrics_server = metrics_addr.as_deref().map(http::Server::bind).transpose()?;
    let metrics_bound = metrics_server.as_ref().map(|m| m.local_addr().to_string());

    let signals = block_signals()?;
    let listener = bind(&socket_path)?;
    // From here on the socket is ours: removed on every way out, a failed start included, so
    // that shims do not find a socket where nobody answers.
    let _socket = SocketFile(socket_path.clone());
    make_parent(&ledger_path, 0o700)?;
    let geometry = Geometry { max_groups: args.max_groups.max(1), max_procs: args.max_processes.max(1) };
    if geometry.max_procs as usize > gpuslice_common::ledger::MEMBER_PRIORITIES {
        // Each member's own priority is one byte of its group's read-only members page.
        return Err(format!("--max-processes {} is more than a ledger holds ({})", geometry.max_procs, gpuslice_common::ledger::MEMBER_PRIORITIES));
    }
    let (ledger, adopted) = Ledger::open_or_create(&ledger_path, geometry).map_err(|e| match e {
        LedgerError::Foreign { .. } => format!("{e}; it was left untouched (remove it, or choose another --ledger)"),
        e => e.to_string(),
    })?;
    if adopted {
        if let Some(pid) = ledger.live_controller(Duration::from_millis(300)) {
            return Err(format!("the ledger {ledger_path} is in use by another gpuslice controller (pid {pid}); one ledger takes one controller"));
        }
    }
    let header = ledger.header();
    header.controller_pid.store(std::process::id(), Relaxed);
    // Counted on the ledger, which carries the controller's device record over to this start.
    let starts = ledger.count_controller_start();

    crate::suspend::configure(&args.suspension)?;
    let mps_policies = crate::mps_devices::Policies::read(&args.mps, &config.controller)?;
    // Stopped when this returns, however it returns (the supervisor's drop).
    let _mps = crate::mps_daemon::start(&args.mps)?;
    let mut state = State::new(ledger, config);
    state.config_path = config_path;
    state.marks_of = crate::suspend::marks_to_publish;
    if let Some(n) = args.max_processes_per_uid {
        state.uid_limits.processes = n.max(1);
    }
    if let Some(n) = args.max_groups_per_uid {
        state.uid_limits.groups = n.max(1);
    }
    state.env_groups_open = args.env_groups == "open";
    state.node_devices = devices::node_devices();
    match &state.node_devices {
        Some(list) => tracing::info!("this node's devices by NVML: {}", if list.is_empty() { "none".to_string() } else { list.join(", ") }),
        None => tracing::warn!("NVML is not available: device UUIDs that processes claim are taken on their word (well-formed ones only)"),
    }
    // The memory shims map comes before anything reads or writes a slot: after a restart,
    // the slots are where the live processes' memory is.
    state.init_memory(adopted)?;
    if adopted {
        state.adopt();
    }
    state.install_config_groups()?;
    // Per-GPU daemons (issue 19), after the groups: the first table already knows them. Their
    // table is removed and the daemons stopped when this returns.
    let mut spatial = crate::mps_devices::start(&mps_policies, &args.mps, Path::new(&socket_path), state.node_devices.as_deref())?;
    if let Some(m) = spatial.as_mut() {
        m.refresh(&mut state);
    }
    tracing::info!(
        "gpuslice {} controller (pid {}) serving on {socket_path}, ledger {ledger_path} ({}; start {starts})",
        gpuslice_common::VERSION,
        std::process::id(),
        if adopted { "adopted" } else { "new" }
    );
    state.sample_shares();
    // An adopted ledger keeps its own geometry, whatever the flags asked for.
    let geometry = state.ledger.geometry();
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        socket: socket_path.clone(),
        ledger: ledger_path,
        started: Instant::now(),
        starts,
        geometry,
        connections: AtomicUsize::new(0),
        connections_by_uid: Mutex::new(std::collections::HashMap::new()),
        traffic: Traffic::default(),
        last_tick_ns: AtomicU64::new(gpuslice_common::ledger::monotonic_ns()),
        metrics: metrics_bound,
    });
    // Issue 22: the suspension marks (the config file's, and those `gpuslice set` left in the
    // ledger before a restart) are known before the first registration is answered. Each
    // registration publishes its group's page, and a member reads the marks at every
    // allocation: one answered earlier found no marks and served its memory from the driver
    // instead of VMM-backed, without an agent, until the next tick published them (a member
    // of a `suspend_path = "shim"` group that the shim's path cannot move). Both are quick
    // (no driver, no NVML); the policy thread used to run them, late under load.
    crate::suspend::from_config(&shared.state);
    crate::suspend::from_ledger(&shared.state);
    shared.lock().publish();
    {
        // Issue 22: groups an earlier controller suspended, and the policy's resumptions.
        let for_policy = shared.clone();
        std::thread::Builder::new()
            .name("suspend-policy".into())
            .spawn(move || crate::room::watch(&for_policy.state))
            .map_err(|e| format!("cannot start the suspension policy: {e}"))?;
    }
    if let Some(server) = metrics_server {
        let addr = server.local_addr();
        let for_scrapes = shared.clone();
        server.spawn(move || http::Page { content_type: metrics::CONTENT_TYPE, body: metrics::render(for_scrapes.snapshot()) })?;
        tracing::info!("metrics at http://{addr}/metrics");
    }
    let mut last_tick = Instant::now();
    let mut last_sample = Instant::now();
    let mut crosscheck = crate::crosscheck::CrossCheck::new();
    loop {
        let slots: Vec<(usize, RawFd)> = shared.lock().watched.iter().filter_map(|(&s, w)| Some((s, raw(&w.pidfd)?))).collect();
        let mut fds = vec![
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: signals.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        fds.extend(slots.iter().map(|&(_, fd)| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }));
        let wait = TICK.saturating_sub(last_tick.elapsed()).as_millis() as i32;
        // SAFETY: fds is a valid array of pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("poll failed: {}", std::io::Error::last_os_error()));
        }
        if fds[1].revents != 0 {
            let signal = read_signal(&signals);
            tracing::info!("signal {signal} received: stopping; the ledger stays for running processes and the next controller");
            break;
        }
        for (k, &(slot, fd)) in slots.iter().enumerate() {
            if fds[2 + k].revents != 0 {
                let mut state = shared.lock();
                // The slot may have been released and given to someone else meanwhile.
                if state.watched.get(&slot).and_then(|w| raw(&w.pidfd)) == Some(fd) {
                    state.release(slot, "exited");
                }
            }
        }
        if fds[0].revents != 0 {
            accept_all(&listener, &shared);
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            shared.last_tick_ns.store(gpuslice_common::ledger::monotonic_ns(), Relaxed);
            let mut state = shared.lock();
            state.ledger.header().controller_heartbeat_ns.store(gpuslice_common::ledger::monotonic_ns(), Relaxed);
            state.enforce();
            state.retry_pending();
            state.poll_without_pidfd();
            if let Some(m) = spatial.as_mut() {
                m.refresh(&mut state);
            }
            if last_sample.elapsed() >= Duration::from_secs(1) {
                last_sample = Instant::now();
                state.sample_shares();
            }
            let plan = crosscheck.begin(&state);
            drop(state);
            if let Some(plan) = plan {
                let held = crosscheck.measure(&plan);
                crosscheck.finish(&mut shared.lock(), plan, held);
            }
        }
    }
    shared.lock().ledger.header().controller_pid.store(0, Relaxed);
    Ok(())
}

/// The listening socket's path, removed when the controller stops (or fails to start).
struct SocketFile(String);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What connection threads share with the main loop.
struct Shared {
    state: Mutex<State>,
    socket: String,
    ledger: String,
    started: Instant,
    /// Controllers started on this ledger, this one included.
    starts: u64,
    geometry: Geometry,
    connections: AtomicUsize,
    /// Open connections per uid.
    connections_by_uid: Mutex<std::collections::HashMap<u32, usize>>,
    traffic: Traffic,
    /// CLOCK_MONOTONIC of the main loop's last tick.
    last_tick_ns: AtomicU64,
    /// The metrics endpoint's address, when served.
    metrics: Option<String>,
}

/// What the socket has answered, for the metrics.
#[derive(Default)]
struct Traffic {
    register: AtomicU64,
    set: AtomicU64,
    list: AtomicU64,
    status: AtomicU64,
    /// Exports recorded and imports looked up (issue 20).
    sharing: AtomicU64,
    /// Unreadable or malformed requests.
    bad_request: AtomicU64,
    /// Requests answered with an error (registration or edit refused).
    refused: AtomicU64,
    /// Answers that could not be sent.
    unanswered: AtomicU64,
    /// Connections closed at once: too many open.
    busy: AtomicU64,
}

/// A scrape waits this long for the state before it reports the controller down.
const SCRAPE_PATIENCE: Duration = Duration::from_secs(1);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while applying one request must not take the controller down with it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state, unless it stays locked past `patience` (a stuck controller must still answer
    /// its scrapes, with `up` 0).
    fn lock_within(&self, patience: Duration) -> Option<std::sync::MutexGuard<'_, State>> {
        let end = Instant::now() + patience;
        loop {
            match self.state.try_lock() {
                Ok(guard) => return Some(guard),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() < end => std::thread::sleep(Duration::from_millis(1)),
                Err(TryLockError::WouldBlock) => return None,
            }
        }
    }

    /// What a metrics scrape reports: the same listing as `gpuslice ls`, and the health.
    fn snapshot(&self) -> metrics::Snapshot {
        let t = &self.traffic;
        let heartbeat_age_s = gpuslice_common::ledger::monotonic_ns().saturating_sub(self.last_tick_ns.load(Relaxed)) as f64 / 1e9;
        let mut health = metrics::Health {
            up: false,
            uptime_s: self.started.elapsed().as_secs_f64(),
            heartbeat_age_s,
            controller_starts: self.starts,
            max_processes: self.geometry.max_procs,
            max_groups: self.geometry.max_groups,
            requests: vec![
                ("register", t.register.load(Relaxed)),
                ("set", t.set.load(Relaxed)),
                ("list", t.list.load(Relaxed)),
                ("status", t.status.load(Relaxed)),
                ("sharing", t.sharing.load(Relaxed)),
            ],
            errors: vec![
                ("bad_request", t.bad_request.load(Relaxed)),
                ("refused", t.refused.load(Relaxed)),
                ("unanswered", t.unanswered.load(Relaxed)),
                ("busy", t.busy.load(Relaxed)),
            ],
            ..metrics::Health::default()
        };
        let Some(state) = self.lock_within(SCRAPE_PATIENCE) else {
            tracing::warn!("metrics: the state stayed locked for {SCRAPE_PATIENCE:?}; reporting up 0");
            return metrics::Snapshot { health, listing: None };
        };
        let listing = listing(&state);
        (health.processes, health.groups) = state.counts();
        health.last_sample_unix_s = state.last_sample().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64());
        drop(state);
        health.up = heartbeat_age_s < 1.0;
        metrics::Snapshot { health, listing: Some(listing) }
    }
}

fn accept_all(listener: &UnixListener, shared: &Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                return;
            }
        };
        let Ok(peer) = peer_of(&stream) else { continue };
        let Some(slot) = ConnectionSlot::take(shared, peer.uid) else {
            shared.traffic.busy.fetch_add(1, Relaxed);
            let message = format!(
                "the controller has too many connections open (at most {MAX_CONNECTIONS} in all, {MAX_CONNECTIONS_PER_UID} per uid once half are taken){RETRY_LATER}"
            );
            tracing::warn!("uid {}: {message}; closing a new one", peer.uid);
            // Say so rather than close in silence: a registering shim then waits and tries again.
            // A new connection's send buffer is empty, so this short answer cannot stall the loop.
            if stream.set_nonblocking(true).is_ok() {
                let _ = send_frame(stream.as_raw_fd(), &encode(&Response::Error { message }), None);
            }
            continue;
        };
        let spawned = std::thread::Builder::new().name("gpuslice-client".into()).spawn(move || {
            // Released when this thread ends, however it ends (a panic included).
            let slot = slot;
            if let Err(e) = serve_one(&stream, &slot.shared) {
                tracing::debug!("client dropped: {e}");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread for a connection: {e}");
        }
    }
}

/// One connection's share of the limits, given back when dropped: a connection thread that
/// panics or returns early cannot leak it.
struct ConnectionSlot {
    shared: Arc<Shared>,
    uid: u32,
}

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>, uid: u32) -> Option<ConnectionSlot> {
        let mut by_uid = shared.connections_by_uid.lock().unwrap_or_else(|p| p.into_inner());
        let mine = by_uid.entry(uid).or_insert(0);
        let open = shared.connections.load(Acquire);
        if open >= MAX_CONNECTIONS || (open >= MAX_CONNECTIONS / 2 && *mine >= MAX_CONNECTIONS_PER_UID) {
            return None;
        }
        *mine += 1;
        shared.connections.fetch_add(1, AcqRel);
        Some(ConnectionSlot { shared: shared.clone(), uid })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut by_uid = self.shared.connections_by_uid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_uid.remove(&self.uid);
            }
        }
        self.shared.connections.fetch_sub(1, AcqRel);
    }
}

fn serve_one(stream: &UnixStream, shared: &Shared) -> Result<(), FrameError> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let peer = peer_of(stream)?;
    let fd = stream.as_raw_fd();
    // The whole request by this deadline, not a timeout per read.
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let request = match recv_frame_by(fd, deadline).and_then(|(body, _)| decode_request(&body)) {
        Ok(r) => r,
        Err(e) => {
            shared.traffic.bad_request.fetch_add(1, Relaxed);
            tracing::warn!("pid {} uid {}: refused a request: {}", peer.pid, peer.uid, for_log(&e.to_string()));
            let _ = send_frame(fd, &encode(&Response::Error { message: format!("bad request: {e}") }), None);
            return Err(e);
        }
    };
    // Issue 22's requests run outside the state's lock (a suspension takes seconds).
    let request = match answer_suspension(request, peer, &shared.state) {
        Ok(response) => {
            shared.traffic.set.fetch_add(1, Relaxed);
            if matches!(response, Response::Error { .. }) {
                shared.traffic.refused.fetch_add(1, Relaxed);
            }
            return send_frame(fd, &encode(&response), None).map_err(Into::into);
        }
        Err(other) => other,
    };
    let t = &shared.traffic;
    match &request {
        Request::Register(_) => &t.register,
        Request::Set(_) | Request::RemoveGroup(_) => &t.set,
        Request::List => &t.list,
        Request::Status => &t.status,
        Request::LabelGroup(_) => &t.set,
        Request::Export(_) | Request::Import(_) => &t.sharing,
        Request::Suspend(_) | Request::Resume(_) | Request::SetSuspendable(_) | Request::MakeRoom(_) => &t.set,
    }
    .fetch_add(1, Relaxed);
    let mut registered = None;
    let mutates = matches!(request, Request::Register(_) | Request::Set(_) | Request::RemoveGroup(_));
    let (response, attach) = {
        let mut state = shared.lock();
        let answer = match request {
            Request::Register(r) => match state.register(peer, r).and_then(|a| Ok((state.descriptors_for(a.group as usize)?, a))) {
                Ok((fds, a)) => {
                    registered = Some(a.slot as usize);
                    (Response::Registered(a), fds)
                }
                Err(message) => {
                    tracing::warn!("pid {}: registration refused: {}", peer.pid, for_log(&message));
                    (Response::Error { message }, Vec::new())
                }
            },
            Request::Set(e) => match state.edit(peer, e) {
                Ok(message) => (Response::Done { message }, Vec::new()),
                Err(message) => {
                    tracing::warn!("pid {} uid {}: edit refused: {}", peer.pid, peer.uid, for_log(&message));
                    (Response::Error { message }, Vec::new())
                }
            },
            Request::RemoveGroup(name) => match state.remove_group(peer, &name) {
                Ok(message) => (Response::Done { message }, Vec::new()),
                Err(message) => {
                    tracing::warn!("pid {} uid {}: group removal refused: {}", peer.pid, peer.uid, for_log(&message));
                    (Response::Error { message }, Vec::new())
                }
            },
            Request::LabelGroup(l) => match state.label_group(peer, l) {
                Ok(message) => (Response::Done { message }, Vec::new()),
                Err(message) => {
                    tracing::warn!("pid {} uid {}: labels refused: {}", peer.pid, peer.uid, for_log(&message));
                    (Response::Error { message }, Vec::new())
                }
            },
            Request::Export(e) => match state.export(peer, e.key) {
                Ok(message) => (Response::Done { message }, Vec::new()),
                Err(message) => {
                    tracing::warn!("pid {} uid {}: {}", peer.pid, peer.uid, for_log(&message));
                    (Response::Error { message }, Vec::new())
                }
            },
            Request::Import(i) => (Response::Imported { by_gpuslice: state.import(peer, i.key) }, Vec::new()),
            Request::Suspend(_) | Request::Resume(_) | Request::SetSuspendable(_) | Request::MakeRoom(_) => {
                (Response::Error { message: "answered by the suspension module".into() }, Vec::new())
            }
            Request::List => (Response::Listing(listing(&state)), Vec::new()),
            Request::Status => {
                let (processes, groups) = state.counts();
                let g = state.ledger.geometry();
                let status = Status {
                    version: gpuslice_common::VERSION.to_string(),
                    pid: std::process::id(),
                    socket: shared.socket.clone(),
                    ledger: shared.ledger.clone(),
                    uptime_s: shared.started.elapsed().as_secs_f64(),
                    starts: state.ledger.header().controller_starts.load(Relaxed),
                    processes,
                    groups,
                    max_processes: g.max_procs,
                    max_groups: g.max_groups,
                    devices: state.devices(),
                    metrics: shared.metrics.clone(),
                    exports: state.exports.len() as u64,
                };
                (Response::Status(status), Vec::new())
            }
        };
        // What changed is in the pages shims read before the answer (edits publish their group
        // themselves; a registration may have claimed a device).
        if mutates {
            state.publish();
        }
        answer
    };
    let (response, attach) = match (registered, response) {
        (Some(slot), Response::Registered(a)) => match crate::suspend::join_if_suspended(&a.group_name, peer.pid) {
            Ok(()) => (Response::Registered(a), attach),
            Err(why) => {
                shared.lock().release(slot, "joined a suspended group it could not be suspended with");
                registered = None;
                tracing::warn!("pid {}: registration refused: {}", peer.pid, for_log(&why));
                (Response::Error { message: format!("{why}{}", gpuslice_common::protocol::RETRY_LATER) }, Vec::new())
            }
        },
        (_, response) => (response, attach),
    };
    if matches!(response, Response::Error { .. }) {
        t.refused.fetch_add(1, Relaxed);
    }
    let raw: Vec<RawFd> = attach.iter().map(|f| f.as_raw_fd()).collect();
    if let Err(e) = send_frame_with(fd, &encode(&response), &raw) {
        t.unanswered.fetch_add(1, Relaxed);
        if let Some(slot) = registered {
            // It gave up waiting and runs alone: it must not stay listed as a member.
            shared.lock().release(slot, "gave up registering");
        }
        return Err(e.into());
    }
    Ok(())
}

/// The suspension module's requests (suspend, resume, marks, room); any other is handed back.
fn answer_suspension(request: gpuslice_common::protocol::Request, peer: Peer, state: &Mutex<State>) -> Result<Response, gpuslice_common::protocol::Request> {
    use gpuslice_common::protocol::Request;
    let outcome = match request {
        Request::Suspend(g) => {
            crate::suspend::suspend(state, Some(peer), &g.group, false, crate::suspend_driver::LockWait::each(crate::suspend_driver::LOCK_TIMEOUT))
        }
        Request::Resume(g) => crate::suspend::resume(state, Some(peer), &g.group),
        Request::SetSuspendable(s) => crate::suspend::set_suspendable(state, peer, &s),
        Request::MakeRoom(room) => crate::room::make_room(state, peer, room),
        other => return Err(other),
    };
    Ok(match outcome {
        Ok(message) => Response::Done { message },
        Err(message) => {
            tracing::warn!("pid {} uid {}: {}", peer.pid, peer.uid, for_log(&message));
            Response::Error { message }
        }
    })
}

/// Text that came from a client, made fit for one log line: control characters escaped (no
/// forged lines), at most 300 characters.
pub fn for_log(text: &str) -> String {
    let mut out: String = text.chars().flat_map(char::escape_debug).take(301).collect();
    if out.chars().count() > 300 {
        out = out.chars().take(300).chain("...".chars()).collect();
    }
    out
}

fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a local of the right size.
    let r = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Peer { pid: cred.pid as u32, uid: cred.uid })
}

/// Creates the socket's directory (0755) and binds, refusing to replace anything that is not a
/// stale socket.
fn bind(path: &str) -> Result<UnixListener, String> {
    make_parent(path, 0o755)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!("{path} exists and is not a socket; refusing to replace it (remove it, or choose another --socket)"));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("another gpuslice controller is already serving on {path}"));
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {path}: {e}"))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| format!("cannot listen on {path}: {e}"))?;
    // Anyone may register and read; edits are checked per peer (SO_PEERCRED).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(|e| format!("cannot set the mode of {path}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(listener)
}

/// Creates the directory that holds `path` with `mode`, or checks the one that is there: it
/// must be a real directory (not a symbolic link), owned by this controller's user or root, and
/// writable by nobody else unless sticky. Anyone who can write a directory can rename or
/// replace what is in it: a directory another user made beforehand (`/dev/shm/gpuslice`
/// pre-created by a tenant) is refused with a message, never used.
pub fn make_parent(path: &str, mode: u32) -> Result<(), String> {
    let Some(parent) = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) else { return Ok(()) };
    match std::fs::symlink_metadata(parent) {
        Ok(meta) => check_directory(parent, &meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(mode).create(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            // The umask may have taken bits away, never added any; check what was made anyway.
            let meta = std::fs::symlink_metadata(parent).map_err(|e| format!("cannot inspect {}: {e}", parent.display()))?;
            check_directory(parent, &meta)
        }
        Err(e) => Err(format!("cannot inspect {}: {e}", parent.display())),
    }
}

fn check_directory(dir: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let shown = dir.display();
    if meta.file_type().is_symlink() {
        return Err(format!("{shown} is a symbolic link; refusing to follow it (remove it, or make it a directory of this controller's user)"));
    }
    if !meta.is_dir() {
        return Err(format!("{shown} exists and is not a directory; refusing to use it"));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!("{shown} belongs to uid {}, not to this controller's uid {me} or root: whoever owns it could rename or replace the controller's files; refusing it (remove it and let the controller create it)", meta.uid()));
    }
    let sticky = meta.mode() & libc::S_ISVTX != 0;
    if meta.mode() & 0o022 != 0 && !sticky {
        return Err(format!("{shown} has mode {:o}: users other than its owner may write it, so rename or replace the controller's files; refusing it (chmod go-w it, or remove it and let the controller create it)", meta.mode() & 0o7777));
    }
    Ok(())
}

/// Blocks SIGTERM and SIGINT and returns a signalfd that reports them.
fn block_signals() -> Result<OwnedFd, String> {
    // SAFETY: sigset manipulation on a local, then signalfd(2).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err("cannot block SIGTERM".into());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(format!("signalfd failed: {}", std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signal(fd: &OwnedFd) -> u32 {
    // SAFETY: reading one signalfd_siginfo into a local.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let n = libc::read(fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size_of::<libc::signalfd_siginfo>());
        if n > 0 {
            info.ssi_signo
        } else {
            0
        }
    }
}
