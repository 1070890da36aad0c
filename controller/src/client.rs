//! The CLI commands that edit and read the controller: `gpuslice set`, `rm`, `ls` and `status`.

use crate::ask::{ask, SocketArg};
use gpuslice_common::ledger::Priority;
use gpuslice_common::protocol::*;
use gpuslice_common::size::{format_size, parse_size};
use std::time::Duration;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "group"])))]
pub struct SetArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// A registered process (its pid as the controller sees it; see `gpuslice ls`).
    #[arg(long, allow_hyphen_values = true)]
    pid: Option<u32>,
    /// A group (GPUSLICE_GROUP). It must exist (a member registered, the config names it, or
    /// an earlier `set --create`), unless --create is given.
    #[arg(long)]
    group: Option<String>,
    /// Create the group if it does not exist yet (without it, a misspelt name is refused).
    #[arg(long, requires = "group")]
    create: bool,
    /// Memory limit per device, e.g. 4GiB (binary units: 4GB means 4 GiB); `unlimited` removes it.
    #[arg(long, allow_hyphen_values = true)]
    memory: Option<String>,
    /// Guaranteed share of the device's time in percent, 1-100 (100 removes the throttle).
    /// Without --sm-max it is also the cap (nothing lent to it).
    #[arg(long, allow_hyphen_values = true)]
    sm: Option<String>,
    /// The most it may get when others leave the device idle, 1-100, or `none` (issue 18).
    #[arg(long, allow_hyphen_values = true)]
    sm_max: Option<String>,
    /// high, normal or low.
    #[arg(long)]
    priority: Option<String>,
    /// Only this device index of the ledger (see `gpuslice status`); all by default.
    #[arg(long, allow_hyphen_values = true)]
    device: Option<u32>,
    /// true: the controller may suspend the group to make room for a higher-priority one
    /// (issue 22); false: never.
    #[arg(long, requires = "group")]
    suspendable: Option<bool>,
    /// With --suspendable true: even while its processes export memory to others.
    #[arg(long, requires = "suspendable")]
    allow_exports: bool,
    /// With --suspendable true: how its processes are suspended: `driver` (the driver's
    /// checkpoint), `shim` (their own shim's agent; their memory VMM-backed from the first
    /// allocation of a process that starts after this), or `auto` (each by the shim where it
    /// can, by the driver where not).
    #[arg(long, requires = "suspendable", value_name = "auto|shim|driver")]
    suspend_path: Option<String>,
}

#[derive(clap::Args)]
pub struct RmArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The group to remove; refused while it has members.
    #[arg(long, required = true)]
    group: String,
}

/// `--memory`: a size, or `unlimited` (also `none`).
pub fn parse_memory(m: &str) -> Result<Limit, String> {
    if m.trim().eq_ignore_ascii_case("unlimited") || m.trim().eq_ignore_ascii_case("none") {
        return Ok(Limit::Unlimited);
    }
    parse_size(m).map(Limit::Bytes).map_err(|e| format!("--memory: {e}, or `unlimited`"))
}

pub fn set(args: SetArgs) -> Result<(), String> {
    let memory = args.memory.as_deref().map(parse_memory).transpose()?;
    let sm = match args.sm.as_deref() {
        None => None,
        Some(s) => Some(gpuslice_common::settings::parse_share(s).map_err(|e| format!("--sm {s:?}: {e}"))?),
    };
    let sm_max = match args.sm_max.as_deref() {
        None => None,
        Some(s) => Some(gpuslice_common::settings::parse_cap(s).map_err(|e| format!("--sm-max {s:?}: {e}"))?),
    };
    let priority = match args.priority.as_deref() {
        None => None,
        Some(p) => Some(p.parse::<Priority>().map_err(|e| format!("--priority: {e}"))?),
    };
    if memory.is_none() && sm.is_none() && sm_max.is_none() && priority.is_none() && args.suspendable.is_none() {
        return Err("nothing to change: give --memory, --sm, --sm-max, --priority or --suspendable".into());
    }
    let socket = args.socket.path();
    if let (Some(suspendable), Some(group)) = (args.suspendable, &args.group) {
        let request = Request::SetSuspendable(Suspendable {
            group: group.clone(),
            suspendable,
            allow_exports: args.allow_exports,
            ahead: false,
            path: args.suspend_path.clone(),
        });
        crate::suspend_cli::print_done(ask(&socket, &request)?)?;
        if memory.is_none() && sm.is_none() && sm_max.is_none() && priority.is_none() {
            return Ok(());
        }
    }
    let target = match (args.pid, args.group) {
        (Some(pid), _) => Target::Pid(pid),
        (None, Some(group)) => Target::Group(group),
        (None, None) => unreachable!("clap requires one"),
    };
    match ask(&socket, &Request::Set(Edit { target, memory, sm, sm_max, priority, device: args.device, create: args.create }))? {
        Response::Done { message } => {
            println!("{message}");
            Ok(())
        }
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

pub fn rm(args: RmArgs) -> Result<(), String> {
    match ask(&args.socket.path(), &Request::RemoveGroup(args.group))? {
        Response::Done { message } => {
            println!("{message}");
            Ok(())
        }
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

#[derive(clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Machine-readable output: the listing as JSON.
    #[arg(long)]
    json: bool,
}

/// The note under `ls`'s tables: what the columns count.
const LS_LEGEND: &str = "WAITED: time held back by the SM share since the process or group started (top shows it as WAIT%, a share of the last interval); TURN WAIT: the part of WAITED spent queued for the device behind other throttled processes; OOM: allocations refused";

pub fn ls(args: LsArgs) -> Result<(), String> {
    let listing = match ask(&args.socket.path(), &Request::List)? {
        Response::Listing(l) => l,
        other => return Err(format!("unexpected answer: {other:?}")),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing).map_err(|e| e.to_string())?);
        return Ok(());
    }
    print!("{}", render(&listing));
    println!("\n{LS_LEGEND}");
    Ok(())
}

fn used_of(used: u64, limit: Option<u64>) -> String {
    match limit {
        Some(l) => format!("{} / {}", format_size(used), format_size(l)),
        None => format!("{} / -", format_size(used)),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}%"))
}

/// The human table of `gpuslice ls`.
pub fn render(l: &Listing) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<20} {:>3} {:>25} {:>6} {:>9} {:>10} {:>5} {:<8} MEMBERS\n",
        "GROUP", "DEV", "USED / LIMIT", "SHARE", "ACHIEVED", "WAITED", "OOM", "PRIORITY"
    ));
    for g in &l.groups {
        let members = g.members.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        for d in &g.devices {
            out.push_str(&format!(
                "{:<20} {:>3} {:>25} {:>6} {:>9} {:>9.1}s {:>5} {:<8} {}\n",
                g.name,
                d.device,
                used_of(d.used, d.limit),
                d.share_text(),
                pct(d.achieved_share),
                d.throttled_ns as f64 / 1e9,
                d.refusals,
                g.priority,
                members
            ));
        }
        if g.devices.is_empty() {
            out.push_str(&format!("{:<20} {:>3} {:>25} {:>6} {:>9} {:>10} {:>5} {:<8} {}\n", g.name, "-", "-", "-", "-", "-", "-", g.priority, members));
        }
    }
    out.push('\n');
    out.push_str(&format!(
        "{:>8} {:<20} {:<16} {:>3} {:>25} {:>9} {:>10} {:>10} {:>5} PRIORITY\n",
        "PID", "GROUP", "NAME", "DEV", "USED / OWN CAP", "ACHIEVED", "WAITED", "TURN WAIT", "OOM"
    ));
    for p in &l.processes {
        for d in &p.devices {
            out.push_str(&format!(
                "{:>8} {:<20} {:<16} {:>3} {:>25} {:>9} {:>9.1}s {:>9.1}s {:>5} {}\n",
                p.pid,
                p.group,
                p.name,
                d.device,
                used_of(d.used, d.limit),
                pct(d.achieved_share),
                d.throttled_ns as f64 / 1e9,
                d.turn_wait_ns as f64 / 1e9,
                d.refusals,
                p.priority
            ));
        }
    }
    if !l.underreporting.is_empty() {
        out.push_str("\nUNDER-REPORTING (the driver shows more than the process reports; its group is charged the driver's figure)\n");
        out.push_str(&format!("{:>8} {:<20} {:>3} {:>12} {:>12} {:>12}\n", "PID", "GROUP", "DEV", "REPORTED", "NVML", "CHARGED"));
        for u in &l.underreporting {
            out.push_str(&format!(
                "{:>8} {:<20} {:>3} {:>12} {:>12} {:>12}\n",
                u.pid,
                u.group,
                u.device,
                format_size(u.reported),
                format_size(u.measured),
                format!("+{}", format_size(u.charged))
            ));
        }
    }
    out.push_str(&crate::suspend_cli::render(l));
    out.push_str(&crate::mps_view::render(l));
    out
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Machine-readable output: the controller's state as JSON.
    #[arg(long)]
    json: bool,
    /// Wait up to this many seconds for a controller that is starting to answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    wait: f64,
}

pub fn status(args: StatusArgs) -> Result<(), String> {
    let socket = args.socket.path();
    let deadline =
        std::time::Instant::now() + Duration::try_from_secs_f64(args.wait).map_err(|_| format!("--wait {}: expected a number of seconds", args.wait))?;
    let answer = loop {
        match ask(&socket, &Request::Status) {
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            answer => break answer?,
        }
    };
    let s = match answer {
        Response::Status(s) => s,
        other => return Err(format!("unexpected answer: {other:?}")),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!("gpuslice controller {} (pid {}), up {:.0} s, start {} on this ledger", s.version, s.pid, s.uptime_s, s.starts);
    println!("socket  {}", s.socket);
    println!("ledger  {}", s.ledger);
    match &s.metrics {
        Some(addr) => println!("metrics http://{addr}/metrics"),
        None => println!("metrics off (serve --metrics ADDR, or metrics under [controller])"),
    }
    println!("processes {} of {}, groups {} of {}", s.processes, s.max_processes, s.groups, s.max_groups);
    for (i, d) in s.devices.iter().enumerate() {
        println!("device {i}: {d}");
    }
    Ok(())
}
