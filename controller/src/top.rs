//! `gpuslice top`: a live terminal view (ratatui + crossterm) of the controller's processes and
//! groups: memory bars, share target vs achieved, time held back (WAIT%), refusals and priority.
//! Columns take the width their content needs; on a narrow terminal the bars go first, then
//! long names are cut in the middle, then the least needed columns: the figures always stay.
//!
//! It reads the same `Listing` as `gpuslice ls` over the socket every refresh. If the
//! controller goes away it says so on screen, keeps the last figures it had and keeps asking.

use crate::ask::{ask_within, SocketArg};
use gpuslice_common::ledger::Priority;
use gpuslice_common::protocol::{Listing, Request, Response, Status};
use gpuslice_common::size::format_size;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};
use ratatui::Frame;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Milliseconds between refreshes.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    interval_ms: u64,
}

/// Set by SIGTERM/SIGHUP/SIGINT, so that the loop ends and the terminal is restored.
static STOP: AtomicBool = AtomicBool::new(false);

/// Width of a memory bar in cells.
const BAR: usize = 12;

pub fn top(args: TopArgs) -> Result<(), String> {
    if !std::io::stdout().is_terminal() {
        return Err("gpuslice top draws on a terminal and stdout is not one; use `gpuslice ls` (or `ls --json`) instead".into());
    }
    let socket = args.socket.path();
    let interval = Duration::from_millis(args.interval_ms);
    on_stop_signals();
    let mut terminal = ratatui::try_init().map_err(|e| format!("cannot set up the terminal: {e}"))?;
    let result = run(&mut terminal, &socket, interval);
    drop(terminal);
    ratatui::restore();
    result
}

fn run(terminal: &mut ratatui::DefaultTerminal, socket: &str, interval: Duration) -> Result<(), String> {
    let mut view = View::new(socket, interval);
    let mut next = Instant::now();
    while !STOP.load(Relaxed) {
        if Instant::now() >= next {
            view.refresh(Instant::now());
            next = Instant::now() + interval;
        }
        terminal.draw(|f| draw(f, &view)).map_err(|e| format!("drawing failed: {e}"))?;
        // Short polls, so that a stop signal is noticed even without keys or refreshes.
        let wait = next.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
        if event::poll(wait).map_err(|e| format!("reading the terminal failed: {e}"))? {
            if let Event::Key(k) = event::read().map_err(|e| format!("reading the terminal failed: {e}"))? {
                let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.kind == KeyEventKind::Press && (matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) || ctrl_c) {
                    break;
                }
            }
        }
    }
    Ok(())
}

extern "C" fn note_stop(_: libc::c_int) {
    STOP.store(true, Relaxed);
}

/// SIGTERM, SIGHUP and SIGINT (from `kill`: raw mode turns Ctrl-C into a key) end the loop
/// like `q`.
fn on_stop_signals() {
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, note_stop as *const () as libc::sighandler_t) };
    }
}

/// A row of either table, for the throttled-time rates.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum RowKey {
    Group(String, u32),
    Process(u32, u32),
}

/// What is on screen: the last listing and status seen, and whether the last refresh worked.
struct View {
    socket: String,
    interval: Duration,
    status: Option<Status>,
    listing: Option<Listing>,
    /// Why the last refresh failed; `None` when it worked.
    error: Option<String>,
    last_ok: Option<Instant>,
    /// Throttled time per row at the previous refresh, to turn totals into a percentage.
    previous: Option<(Instant, HashMap<RowKey, u64>)>,
    throttled_pct: HashMap<RowKey, f64>,
}

impl View {
    fn new(socket: &str, interval: Duration) -> View {
        View { socket: socket.to_string(), interval, status: None, listing: None, error: None, last_ok: None, previous: None, throttled_pct: HashMap::new() }
    }

    fn refresh(&mut self, now: Instant) {
        // Shorter than the CLI's timeout: the screen must keep answering keys.
        let timeout = Duration::from_secs(1);
        let got = ask_within(&self.socket, &Request::Status, timeout).and_then(|status| Ok((status, ask_within(&self.socket, &Request::List, timeout)?)));
        match got {
            Ok((Response::Status(status), Response::Listing(listing))) => {
                self.status = Some(status);
                self.take(listing, now);
                self.error = None;
                self.last_ok = Some(now);
            }
            Ok((a, b)) => self.error = Some(format!("unexpected answers from the controller: {a:?} / {b:?}")),
            Err(e) => self.error = Some(e),
        }
    }

    fn take(&mut self, listing: Listing, now: Instant) {
        let mut totals = HashMap::new();
        for g in &listing.groups {
            for d in &g.devices {
                totals.insert(RowKey::Group(g.name.clone(), d.device), d.throttled_ns);
            }
        }
        for p in &listing.processes {
            for d in &p.devices {
                totals.insert(RowKey::Process(p.pid, d.device), d.throttled_ns);
            }
        }
        self.throttled_pct.clear();
        if let Some((then, before)) = &self.previous {
            let wall = now.duration_since(*then).as_nanos() as f64;
            if wall > 0.0 {
                for (key, &ns) in &totals {
                    if let Some(&was) = before.get(key) {
                        self.throttled_pct.insert(key.clone(), ns.saturating_sub(was) as f64 / wall * 100.0);
                    }
                }
            }
        }
        self.previous = Some((now, totals));
        self.listing = Some(listing);
    }
}

fn draw(f: &mut Frame, v: &View) {
    let groups = v.listing.as_ref().map_or(0, |l| l.groups.iter().map(|g| g.devices.len().max(1)).sum::<usize>());
    // Issue 19: one line per GPU of the managed spatial mode (none without `serve --mps`).
    let gpus: Vec<Line<'static>> = v.listing.as_ref().map(mps_lines).unwrap_or_default();
    let [title, notice, gpu_area, group_area, process_area] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(gpus.len() as u16),
        Constraint::Length(groups as u16 + 3),
        Constraint::Min(4),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(title_line(v)), title);
    f.render_widget(Paragraph::new(notice_line(v)), notice);
    f.render_widget(Paragraph::new(gpus), gpu_area);
    let Some(listing) = &v.listing else { return };
    // Inside the borders.
    let inner = f.area().width.saturating_sub(2);
    f.render_widget(group_table(listing, v, inner), group_area);
    f.render_widget(process_table(listing, v, inner), process_area);
}

fn title_line(v: &View) -> Line<'static> {
    let mut spans = vec!["gpuslice top".bold(), Span::raw(format!("  socket {}", v.socket))];
    if let Some(s) = &v.status {
        spans.push(Span::raw(format!(
            "  controller pid {}  up {}  processes {}/{}  groups {}/{}",
            s.pid,
            duration(s.uptime_s),
            s.processes,
            s.max_processes,
            s.groups,
            s.max_groups
        )));
    }
    spans.push(Span::raw(format!("  every {} ms  q quits", v.interval.as_millis())).dim());
    Line::from(spans)
}

fn notice_line(v: &View) -> Line<'static> {
    match (&v.error, v.last_ok) {
        (None, _) => Line::from(v.listing.as_ref().map(crate::suspend_cli::summary).unwrap_or_default()).style(Style::new().fg(Color::Yellow)),
        (Some(e), last) => {
            let seen = last.map_or("figures below: none yet".to_string(), |t| format!("figures below are {} old", duration(t.elapsed().as_secs_f64())));
            Line::from(format!("controller not reachable: {e}; retrying every {} ms ({seen})", v.interval.as_millis()))
                .style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD))
        }
    }
}

/// Each managed GPU's mode and daemon: spatial in green, time-sliced plain, a daemon that is
/// down in red.
fn mps_lines(l: &Listing) -> Vec<Line<'static>> {
    crate::mps_view::lines(l)
        .into_iter()
        .zip(&l.mps)
        .map(|(text, g)| {
            let style = match (g.mode.as_str(), g.daemon.up) {
                (_, false) => Style::new().fg(Color::Red),
                ("spatial", true) => Style::new().fg(Color::Green),
                _ => Style::new(),
            };
            Line::from(text).style(style)
        })
        .collect()
}

fn duration(s: f64) -> String {
    let s = s as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `1.25 GiB / 4.00 GiB`: the figures, which stay when the bar does not fit.
fn memory_text(used: u64, limit: Option<u64>) -> String {
    format!("{} / {}", format_size(used), limit.map_or("-".into(), format_size))
}

/// `████░░░░ 1.25 GiB / 4.00 GiB`, coloured by how full it is (blank without a limit); only
/// the figures when `bar` is false.
fn memory(used: u64, limit: Option<u64>, bar: bool) -> Line<'static> {
    let text = memory_text(used, limit);
    if !bar {
        return Line::from(text);
    }
    let Some(limit) = limit else {
        return Line::from(vec![Span::raw(" ".repeat(BAR + 1)), Span::raw(text)]);
    };
    let fraction = if limit == 0 { 1.0 } else { used as f64 / limit as f64 };
    let filled = ((fraction * BAR as f64).round() as usize).min(BAR);
    let colour = match fraction {
        x if x >= 0.95 => Color::Red,
        x if x >= 0.75 => Color::Yellow,
        _ => Color::Green,
    };
    Line::from(vec![
        Span::styled("█".repeat(filled), Style::new().fg(colour)),
        Span::styled("░".repeat(BAR - filled), Style::new().fg(Color::DarkGray)),
        Span::raw(format!(" {text}")),
    ])
}

/// A name cut to `width` characters in the middle, so that names sharing a long prefix
/// (`default/inference-5d8f7c9b6d-x2x7q`, `...-k9m2p`) stay told apart by their ends.
fn fit_name(name: &str, width: u16) -> String {
    let chars: Vec<char> = name.chars().collect();
    let width = usize::from(width);
    if chars.len() <= width || width < 3 {
        return name.to_string();
    }
    let head = (width - 1) / 2;
    let tail = width - 1 - head;
    chars[..head].iter().chain(std::iter::once(&'…')).chain(&chars[chars.len() - tail..]).collect()
}

/// One column of a table: the width its content wants and the least it can be squeezed to.
/// `squeeze` and `drop` place its two ways of giving room in one order (lower first, 0 never):
/// squeezed to `min`, or left out altogether.
#[derive(Clone, Copy)]
struct Column {
    header: &'static str,
    want: u16,
    min: u16,
    squeeze: u8,
    drop: u8,
}

impl Column {
    fn fixed(header: &'static str, want: usize) -> Column {
        let want = want.max(header.chars().count()) as u16;
        Column { header, want, min: want, squeeze: 0, drop: 0 }
    }
}

/// Widths for `columns` in `available` cells (one cell between columns), giving way in the
/// columns' order until they fit. `None` for a column left out.
fn fit(columns: &[Column], available: u16) -> Vec<Option<u16>> {
    let mut widths: Vec<Option<u16>> = columns.iter().map(|c| Some(c.want)).collect();
    let total = |w: &[Option<u16>]| -> u16 {
        let kept: Vec<u16> = w.iter().flatten().copied().collect();
        kept.iter().sum::<u16>() + kept.len().saturating_sub(1) as u16
    };
    let mut steps: Vec<(u8, usize, bool)> = Vec::new();
    for (i, c) in columns.iter().enumerate() {
        if c.squeeze > 0 {
            steps.push((c.squeeze, i, false));
        }
        if c.drop > 0 {
            steps.push((c.drop, i, true));
        }
    }
    steps.sort();
    for (_, i, drop) in steps {
        let over = total(&widths).saturating_sub(available);
        if over == 0 {
            break;
        }
        widths[i] = match (drop, widths[i]) {
            (true, _) | (false, None) => None,
            (false, Some(w)) => Some(w.saturating_sub(over).max(columns[i].min)),
        };
    }
    widths
}

/// Keeps the cells (and headers) of the columns `fit` kept.
fn kept<T>(items: Vec<T>, widths: &[Option<u16>]) -> Vec<T> {
    items.into_iter().zip(widths).filter(|(_, w)| w.is_some()).map(|(item, _)| item).collect()
}

fn longest<'a>(texts: impl Iterator<Item = &'a str>) -> usize {
    texts.map(|t| t.chars().count()).max().unwrap_or(0)
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}%"))
}

fn priority(p: Priority) -> Cell<'static> {
    let style = match p {
        Priority::High => Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD),
        Priority::Normal => Style::new(),
        Priority::Low => Style::new().fg(Color::DarkGray),
    };
    Cell::from(p.as_str()).style(style)
}

/// Achieved share, red when it falls more than 5 points short of the target.
fn achieved(target: Option<u32>, achieved: Option<f64>) -> Cell<'static> {
    let short = matches!((target, achieved), (Some(t), Some(a)) if a + 5.0 < f64::from(t));
    Cell::from(pct(achieved)).style(if short { Style::new().fg(Color::Red) } else { Style::new() })
}

fn header(names: &[&'static str]) -> Row<'static> {
    Row::new(names.iter().map(|&n| Cell::from(n))).style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED))
}

/// The memory column: the figures it must show, and the bar when there is room.
fn memory_column(texts: impl Iterator<Item = String>) -> Column {
    let text = texts.map(|t| t.chars().count()).max().unwrap_or(0).max("USED / LIMIT".len()) as u16;
    Column { header: "USED / LIMIT", want: text + BAR as u16 + 1, min: text, squeeze: 1, drop: 0 }
}

fn group_table(l: &Listing, v: &View, available: u16) -> Table<'static> {
    let mut groups: Vec<_> = l.groups.iter().collect();
    groups.sort_by(|a, b| a.name.cmp(&b.name));
    let members_of = |g: &gpuslice_common::protocol::GroupRow| g.members.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let name_want = longest(groups.iter().map(|g| g.name.as_str())).max(5) as u16;
    let columns = [
        Column { header: "GROUP", want: name_want, min: name_want.min(16), squeeze: 3, drop: 0 },
        Column::fixed("DEV", 3),
        memory_column(groups.iter().flat_map(|g| g.devices.iter().map(|d| memory_text(d.used, d.limit)))),
        Column::fixed("SHARE", 5),
        Column::fixed("ACHIEVED", 8),
        Column::fixed("WAIT%", 6),
        Column::fixed(
            "OOM",
            longest(groups.iter().flat_map(|g| g.devices.iter().map(|d| d.refusals.to_string())).collect::<Vec<_>>().iter().map(String::as_str)),
        ),
        Column { drop: 4, ..Column::fixed("PRIORITY", 8) },
        Column {
            header: "MEMBERS",
            want: longest(groups.iter().map(|g| members_of(g)).collect::<Vec<_>>().iter().map(String::as_str)).max(7) as u16,
            min: 7,
            squeeze: 0,
            drop: 2,
        },
    ];
    let widths = fit(&columns, available);
    let name_width = widths[0].unwrap_or(name_want);
    let bar = widths[2].is_some_and(|w| w > columns[2].min);
    let mut rows = Vec::new();
    for g in groups {
        let members = members_of(g);
        let name = fit_name(&g.name, name_width);
        for d in &g.devices {
            let cells = vec![
                Cell::from(name.clone()),
                Cell::from(d.device.to_string()),
                Cell::from(memory(d.used, d.limit, bar)),
                Cell::from(d.share_text()),
                achieved(d.share, d.achieved_share),
                Cell::from(pct(v.throttled_pct.get(&RowKey::Group(g.name.clone(), d.device)).copied())),
                Cell::from(d.refusals.to_string()),
                priority(g.priority),
                Cell::from(members.clone()),
            ];
            rows.push(Row::new(kept(cells, &widths)));
        }
        if g.devices.is_empty() {
            let dash = || Cell::from("-");
            let cells = vec![Cell::from(name.clone()), dash(), dash(), dash(), dash(), dash(), dash(), priority(g.priority), Cell::from(members)];
            rows.push(Row::new(kept(cells, &widths)));
        }
    }
    Table::new(rows, widths.iter().flatten().map(|&w| Constraint::Length(w)))
        .header(header(&kept(columns.iter().map(|c| c.header).collect(), &widths)))
        .block(Block::bordered().title(" Groups (WAIT%: share of the last interval spent held back by the SM share) "))
}

fn process_table(l: &Listing, v: &View, available: u16) -> Table<'static> {
    let mut processes: Vec<_> = l.processes.iter().collect();
    processes.sort_by_key(|p| p.pid);
    let group_row = |group: &str, device: u32| l.groups.iter().find(|g| g.name == group)?.devices.iter().find(|d| d.device == device);
    // The limit that binds the process: its own cap inside the group if lower.
    let binding = |p: &gpuslice_common::protocol::ProcessRow, d: &gpuslice_common::protocol::ProcessDeviceRow| {
        [d.limit, group_row(&p.group, d.device).and_then(|g| g.limit)].into_iter().flatten().min()
    };
    let name_want = longest(processes.iter().map(|p| p.name.as_str())).max(4) as u16;
    let group_want = longest(processes.iter().map(|p| p.group.as_str())).max(5) as u16;
    let columns = [
        Column::fixed("PID", longest(processes.iter().map(|p| p.pid.to_string()).collect::<Vec<_>>().iter().map(String::as_str))),
        Column { header: "NAME", want: name_want, min: name_want.min(8), squeeze: 2, drop: 4 },
        Column { header: "GROUP", want: group_want, min: group_want.min(16), squeeze: 5, drop: 0 },
        Column::fixed("DEV", 3),
        memory_column(processes.iter().flat_map(|p| p.devices.iter().map(|d| memory_text(d.used, binding(p, d))))),
        Column::fixed("SHARE", 5),
        Column::fixed("ACHIEVED", 8),
        Column::fixed("WAIT%", 6),
        Column::fixed(
            "OOM",
            longest(processes.iter().flat_map(|p| p.devices.iter().map(|d| d.refusals.to_string())).collect::<Vec<_>>().iter().map(String::as_str)),
        ),
        Column { drop: 3, ..Column::fixed("PRIORITY", 8) },
    ];
    let widths = fit(&columns, available);
    let bar = widths[4].is_some_and(|w| w > columns[4].min);
    let mut rows = Vec::new();
    for p in processes {
        for d in &p.devices {
            let share = group_row(&p.group, d.device).and_then(|g| g.share);
            let cells = vec![
                Cell::from(p.pid.to_string()),
                Cell::from(fit_name(&p.name, widths[1].unwrap_or(name_want))),
                Cell::from(fit_name(&p.group, widths[2].unwrap_or(group_want))),
                Cell::from(d.device.to_string()),
                Cell::from(memory(d.used, binding(p, d), bar)),
                Cell::from(share.map_or("-".into(), |s| format!("{s}%"))),
                achieved(share, d.achieved_share),
                Cell::from(pct(v.throttled_pct.get(&RowKey::Process(p.pid, d.device)).copied())),
                Cell::from(d.refusals.to_string()),
                priority(p.priority),
            ];
            rows.push(Row::new(kept(cells, &widths)));
        }
    }
    Table::new(rows, widths.iter().flatten().map(|&w| Constraint::Length(w)))
        .header(header(&kept(columns.iter().map(|c| c.header).collect(), &widths)))
        .block(Block::bordered().title(" Processes (limit: the group's, or the process's own cap if lower; share: the group's) "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuslice_common::protocol::{GroupDeviceRow, GroupRow, ProcessDeviceRow, ProcessRow};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn listing(throttled_ns: u64) -> Listing {
        let gd = GroupDeviceRow {
            device: 0,
            uuid: "GPU-x".into(),
            used: 3 << 30,
            limit: Some(4 << 30),
            peak: 3 << 30,
            share: Some(30),
            cap: None,
            achieved_share: Some(29.5),
            charged_ns: 0,
            throttled_ns,
            refusals: 2,
        };
        let pd = ProcessDeviceRow {
            device: 0,
            uuid: "GPU-x".into(),
            used: 3 << 30,
            overhead: 0,
            limit: None,
            peak: 0,
            achieved_share: Some(29.5),
            charged_ns: 0,
            throttled_ns,
            refusals: 2,
            turn_wait_ns: 0,
        };
        Listing {
            groups: vec![GroupRow {
                name: "trainers".into(),
                labels: Default::default(),
                slot: 0,
                members: vec![4242],
                priority: Priority::High,
                devices: vec![gd],
            }],
            processes: vec![ProcessRow {
                pid: 4242,
                own_pid: 1,
                uid: 0,
                group: "trainers".into(),
                name: "python3".into(),
                priority: Priority::High,
                devices: vec![pd],
            }],
            underreporting: vec![],
            suspensions: vec![],
            mps: vec![],
        }
    }

    fn screen(v: &View) -> String {
        screen_of(v, 140)
    }

    fn screen_of(v: &View, width: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(width, 16)).unwrap();
        t.draw(|f| draw(f, v)).unwrap();
        let buffer = t.backend().buffer();
        let mut text = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    #[test]
    fn rows_show_bars_shares_throttling_and_priority() {
        let mut v = View::new("/tmp/s", Duration::from_millis(500));
        let t0 = Instant::now();
        v.take(listing(0), t0);
        v.take(listing(250_000_000), t0 + Duration::from_secs(1));
        let s = screen(&v);
        let bar = format!("{}{}", "█".repeat(9), "░".repeat(3));
        let process_row = s.lines().find(|l| l.contains("python3")).unwrap();
        assert!(process_row.contains(&format!("{bar} 3.00 GiB / 4.00 GiB")), "a process without its own cap is held to its group's limit: {process_row}");
        for want in [&format!("{bar} 3.00 GiB / 4.00 GiB"), "trainers", "4242", "python3", "30%", "29.5%", "25.0%", "high"] {
            assert!(s.contains(want), "no {want:?} on screen:\n{s}");
        }
    }

    #[test]
    fn a_lost_controller_is_said_and_the_last_figures_stay() {
        let mut v = View::new("/nonexistent/gpuslice.sock", Duration::from_millis(500));
        v.take(listing(0), Instant::now());
        v.last_ok = Some(Instant::now());
        v.refresh(Instant::now());
        let s = screen(&v);
        assert!(s.contains("controller not reachable: no gpuslice controller at /nonexistent/gpuslice.sock"), "{s}");
        assert!(s.contains("python3"), "{s}");
    }

    /// Two pods whose names differ only at the end, as Kubernetes names them.
    fn pods() -> Listing {
        let mut l = listing(0);
        let mut other = l.groups[0].clone();
        l.groups[0].name = "default/inference-5d8f7c9b6d-x2x7q".into();
        other.name = "default/inference-5d8f7c9b6d-k9m2p".into();
        other.members = vec![4343];
        l.groups.push(other);
        let mut p = l.processes[0].clone();
        l.processes[0].group = "default/inference-5d8f7c9b6d-x2x7q".into();
        p.pid = 4343;
        p.group = "default/inference-5d8f7c9b6d-k9m2p".into();
        l.processes.push(p);
        l
    }

    #[test]
    fn long_group_names_stay_whole_when_they_fit_and_distinct_when_they_do_not() {
        let mut v = View::new("/tmp/s", Duration::from_millis(500));
        v.take(pods(), Instant::now());
        let wide = screen_of(&v, 200);
        for name in ["default/inference-5d8f7c9b6d-x2x7q", "default/inference-5d8f7c9b6d-k9m2p"] {
            assert_eq!(wide.matches(name).count(), 2, "{name} whole in both tables at 200 columns:\n{wide}");
        }
        let narrow = screen_of(&v, 80);
        for tail in ["x2x7q", "k9m2p"] {
            assert_eq!(narrow.matches(tail).count(), 2, "the end of each name stays at 80 columns:\n{narrow}");
        }
        let rows: Vec<&str> = narrow.lines().filter(|l| l.contains("x2x7q") || l.contains("k9m2p")).collect();
        assert_eq!(rows.len(), 4, "{narrow}");
        for row in rows {
            assert!(row.contains("3.00 GiB / 4.00 GiB"), "the memory figures stay at 80 columns: {row}\n{narrow}");
            assert!(row.chars().count() <= 80, "{row}");
        }
    }

    #[test]
    fn each_managed_gpu_has_a_line_with_its_mode_and_daemon_above_the_tables() {
        use gpuslice_common::protocol::{MpsDaemonRow, MpsGpuRow};
        let mut l = listing(0);
        l.mps = vec![MpsGpuRow {
            uuid: "GPU-aaaa".into(),
            policy: "on".into(),
            mode: "spatial".into(),
            reason: "on".into(),
            why: "mps on".into(),
            daemon: MpsDaemonRow { up: true, pid: Some(77), restarts: 1, adopted: false },
            ..Default::default()
        }];
        let mut v = View::new("/tmp/s", Duration::from_millis(500));
        v.take(l, Instant::now());
        let screen = screen_of(&v, 120);
        let lines: Vec<&str> = screen.lines().collect();
        assert!(lines[2].starts_with("GPU-aaaa spatial (mps on) · daemon up, pid 77 · 1 restart"), "{screen}");
        assert!(screen.contains("python3"), "the tables follow:\n{screen}");
    }
}
