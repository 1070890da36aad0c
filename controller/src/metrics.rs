//! The Prometheus view of the controller: the very `Listing` that `gpuslice ls` prints, plus the
//! controller's health, encoded by prometheus-client (OpenMetrics text) at each scrape.
//!
//! Nothing is kept between scrapes: a process that exits simply stops being listed, so no label
//! set outlives its process. Every figure comes from one listing (`serve::listing`) taken under the
//! state lock, so a scrape, `gpuslice ls` and `gpuslice top` show the same numbers.

use gpuslice_common::protocol::{GroupRow, Listing, ProcessRow, GROUP_LABELS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// What `GET /metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The controller's own state at a scrape.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// The main loop wrote its heartbeat within the last second and the state answered.
    pub up: bool,
    pub uptime_s: f64,
    /// Since the main loop's last tick (it ticks every 100 ms).
    pub heartbeat_age_s: f64,
    /// Controllers started on this ledger, this one included.
    pub controller_starts: u64,
    pub processes: u32,
    pub groups: u32,
    pub max_processes: u32,
    pub max_groups: u32,
    /// Socket requests answered, by kind (register, set, list, status).
    pub requests: Vec<(&'static str, u64)>,
    /// Socket requests that failed, by reason.
    pub errors: Vec<(&'static str, u64)>,
    /// Unix time of the last achieved-share sample.
    pub last_sample_unix_s: Option<f64>,
}

/// Everything one scrape reports. `listing` is `None` when the state could not be read in time
/// (then only the health is reported, with `up` 0).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub health: Health,
    pub listing: Option<Listing>,
}

/// The OpenMetrics text of `snapshot`, every name prefixed `gpuslice_`.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("gpuslice");
    registry.register_collector(Box::new(Scrape(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding into a String cannot fail");
    out
}

#[derive(Debug)]
struct Scrape(Snapshot);

pub type Labels = Vec<(&'static str, String)>;

/// Writes one metric family after another.
pub struct Families<'a>(DescriptorEncoder<'a>);

impl Families<'_> {
    pub fn gauge<V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) -> std::fmt::Result {
        let mut family = self.0.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
        for (labels, value) in samples {
            // An empty label set would be written as `{}`.
            if labels.is_empty() {
                family.encode_gauge(&value)?;
            } else {
                family.encode_family(&labels)?.encode_gauge(&value)?;
            }
        }
        Ok(())
    }

    pub fn counter<V: EncodeCounterValue>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) -> std::fmt::Result {
        let mut family = self.0.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        for (labels, value) in samples {
            if labels.is_empty() {
                family.encode_counter::<NoLabelSet, V, f64>(&value, None)?;
            } else {
                family.encode_family(&labels)?.encode_counter::<NoLabelSet, V, f64>(&value, None)?;
            }
        }
        Ok(())
    }

    fn info(&mut self, name: &str, help: &str, labels: &impl EncodeLabelSet) -> std::fmt::Result {
        self.0.encode_descriptor(name, help, None, MetricType::Info)?.encode_info(labels)
    }
}

fn ratio() -> Option<Unit> {
    Some(Unit::Other("ratio".into()))
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut f = Families(encoder);
        health(&mut f, &self.0.health)?;
        let empty = Listing::default();
        let listing = self.0.listing.as_ref().unwrap_or(&empty);
        groups(&mut f, listing)?;
        processes(&mut f, listing)?;
        suspensions(&mut f, listing)?;
        mps(&mut f, listing)
    }
}

/// Issue 19's managed spatial mode, per GPU: its mode and why (the controller's MPS table line),
/// and its MPS control daemon.
fn mps(f: &mut Families<'_>, l: &Listing) -> std::fmt::Result {
    let gpu = |g: &gpuslice_common::protocol::MpsGpuRow| -> Labels { vec![("uuid", g.uuid.clone())] };
    f.gauge(
        "gpu_mps_spatial",
        "1 while the GPU's processes are sent to its managed MPS daemon (spatial), 0 while they run time-sliced (serve --mps).",
        None,
        l.mps.iter().map(|g| (gpu(g), u32::from(g.mode == "spatial"))),
    )?;
    f.gauge(
        "gpu_mps_mode",
        "1, labelled with the GPU's mode (spatial or time-sliced), the operator's policy and why: off, on, auto_no_high_priority, auto_high_priority_elsewhere, auto_sm_shares, auto_high_priority, held_spatial, held_time_sliced or daemon_down.",
        None,
        l.mps.iter().map(|g| {
            let mut labels = gpu(g);
            labels.extend([("mode", g.mode.clone()), ("policy", g.policy.clone()), ("reason", g.reason.clone())]);
            (labels, 1u32)
        }),
    )?;
    f.gauge(
        "gpu_mps_daemon_up",
        "1 while the GPU's MPS control daemon runs and listens, else 0.",
        None,
        l.mps.iter().map(|g| (gpu(g), u32::from(g.daemon.up))),
    )?;
    f.counter(
        "gpu_mps_daemon_restarts",
        "Times the GPU's MPS control daemon was started again after it exited, since this controller started.",
        None,
        l.mps.iter().map(|g| (gpu(g), g.daemon.restarts)),
    )
}

/// The suspension series of the metrics: per group, its state, what moved and how long it took.
fn suspensions(f: &mut Families<'_>, l: &Listing) -> std::fmt::Result {
    let group = |s: &gpuslice_common::protocol::SuspensionRow| -> Labels { vec![("group", s.group.clone())] };
    let rows = &l.suspensions;
    f.gauge(
        "group_suspended",
        "1 while the group is suspended (or being suspended or resumed), its memory in host memory; 0 while it runs.",
        None,
        rows.iter().map(|s| (group(s), u32::from(s.state != "running" && s.state != "failed"))),
    )?;
    f.gauge(
        "group_suspended_host_memory",
        "Host memory the group's suspended copy holds now.",
        Some(prometheus_client::registry::Unit::Bytes),
        rows.iter().map(|s| (group(s), s.host_bytes)),
    )?;
    f.gauge(
        "group_suspension_bytes",
        "Device bytes moved at the group's last suspension.",
        Some(prometheus_client::registry::Unit::Bytes),
        rows.iter().map(|s| (group(s), s.bytes)),
    )?;
    f.gauge(
        "group_suspend_duration",
        "How long the group's last suspension took.",
        Some(prometheus_client::registry::Unit::Seconds),
        rows.iter().filter_map(|s| Some((group(s), s.suspend_ms? / 1e3))),
    )?;
    f.gauge(
        "group_resume_duration",
        "How long the group's last resumption took.",
        Some(prometheus_client::registry::Unit::Seconds),
        rows.iter().filter_map(|s| Some((group(s), s.resume_ms? / 1e3))),
    )?;
    // Which path the last suspension took (shim, driver or shim+driver) and how fast it went.
    let with_path = |s: &gpuslice_common::protocol::SuspensionRow| -> Option<Labels> { Some(vec![("group", s.group.clone()), ("path", s.path.clone()?)]) };
    f.gauge(
        "group_suspend_path",
        "1 for the path the group's last suspension took: shim (its own agents), driver (the checkpoint API) or shim+driver.",
        None,
        rows.iter().filter_map(|s| Some((with_path(s)?, 1u32))),
    )?;
    f.gauge(
        "group_suspend_throughput_bytes_per_second",
        "Device bytes per second of the group's last suspension.",
        None,
        rows.iter().filter_map(|s| Some((with_path(s)?, s.suspend_gbps? * 1e9))),
    )?;
    f.gauge(
        "group_resume_throughput_bytes_per_second",
        "Device bytes per second of the group's last resumption.",
        None,
        rows.iter().filter_map(|s| Some((with_path(s)?, s.resume_gbps? * 1e9))),
    )?;
    f.counter("group_suspensions", "Times the group was suspended.", None, rows.iter().map(|s| (group(s), s.suspensions)))?;
    // A group that refused suspension: the policy tried the next candidate in its place.
    f.counter(
        "group_suspension_refusals",
        "Times a suspension of the group was refused or failed (the policy's or by hand); its processes were put back as they were.",
        None,
        rows.iter().map(|s| (group(s), s.refusals)),
    )?;
    f.counter(
        "group_suspension_timeouts",
        "Of the group's refused or failed suspensions, those where a lock (or an agent's gate) timed out behind its processes' calls under way (a long kernel): the policy passes the group over only as long as the locks waited, not 30 s.",
        None,
        rows.iter().map(|s| (group(s), s.timeouts)),
    )?;
    f.gauge(
        "group_suspension_passed_over",
        "1 while the suspension policy passes the group over after a refused or failed suspension (it tries the next candidate instead), else 0: 30 s after a lasting refusal, as long as the locks waited after a timeout.",
        None,
        rows.iter().map(|s| (group(s), u32::from(s.passed_over_s.is_some()))),
    )
}

fn health(f: &mut Families, h: &Health) -> std::fmt::Result {
    let none = || Labels::new();
    f.info("build", "The controller's version.", &vec![("version", gpuslice_common::VERSION.to_string())])?;
    f.gauge("up", "1 while the controller's main loop ticks and its state answers, else 0.", None, [(none(), u32::from(h.up))])?;
    f.gauge("uptime", "Since this controller started.", Some(Unit::Seconds), [(none(), h.uptime_s)])?;
    f.gauge("heartbeat_age", "Since the main loop last wrote the ledger's heartbeat (every 100 ms).", Some(Unit::Seconds), [(none(), h.heartbeat_age_s)])?;
    f.counter("controller_starts", "Controllers started on this ledger, this one included.", None, [(none(), h.controller_starts)])?;
    f.gauge("processes", "Registered processes.", None, [(none(), h.processes)])?;
    f.gauge("groups", "Groups in the ledger (named, config, and pid-N of processes alone).", None, [(none(), h.groups)])?;
    let slots = |used: u32, max: u32| [(vec![("state", "used".to_string())], used), (vec![("state", "free".to_string())], max.saturating_sub(used))];
    f.gauge("ledger_process_slots", "The ledger's process slots, used and free.", None, slots(h.processes, h.max_processes))?;
    f.gauge("ledger_group_slots", "The ledger's group slots, used and free.", None, slots(h.groups, h.max_groups))?;
    f.counter(
        "socket_requests",
        "Requests answered on the controller's socket, by kind.",
        None,
        h.requests.iter().map(|&(k, n)| (vec![("request", k.to_string())], n)),
    )?;
    f.counter("socket_errors", "Socket requests that failed, by reason: bad_request (unreadable), refused (answered with an error), unanswered (the answer could not be sent), busy (connection limit).", None, h.errors.iter().map(|&(k, n)| (vec![("reason", k.to_string())], n)))?;
    f.gauge(
        "share_sample_timestamp",
        "Unix time of the last achieved-share sample (taken every second).",
        Some(Unit::Seconds),
        h.last_sample_unix_s.map(|t| (none(), t)),
    )
}

fn groups(f: &mut Families, l: &Listing) -> std::fmt::Result {
    let rows = || {
        l.groups.iter().flat_map(|g| {
            g.devices.iter().map(move |d| {
                let mut k = vec![("group", g.name.clone()), ("device", d.device.to_string()), ("uuid", d.uuid.clone())];
                k.extend(group_labels(g));
                (k, d)
            })
        })
    };
    f.gauge("group_memory_used", "Device memory the group's members hold, their contexts included.", Some(Unit::Bytes), rows().map(|(k, d)| (k, d.used)))?;
    f.gauge(
        "group_memory_limit",
        "The group's memory limit on the device (absent: no limit).",
        Some(Unit::Bytes),
        rows().filter_map(|(k, d)| Some((k, d.limit?))),
    )?;
    f.gauge("group_memory_peak", "The most the group has held at once.", Some(Unit::Bytes), rows().map(|(k, d)| (k, d.peak)))?;
    f.counter(
        "group_device_time",
        "Device time of the group's throttled launches (unthrottled launches are not measured).",
        Some(Unit::Seconds),
        rows().map(|(k, d)| (k, seconds(d.charged_ns))),
    )?;
    f.gauge(
        "group_sm_share_target",
        "The group's share of the device's time (absent: not throttled).",
        ratio(),
        rows().filter_map(|(k, d)| Some((k, f64::from(d.share?) / 100.0))),
    )?;
    f.gauge(
        "group_sm_share_cap",
        "Issue 18: the most the group may get when neighbours leave the device idle (absent: the share is the cap; 1 = no cap).",
        ratio(),
        rows().filter_map(|(k, d)| Some((k, f64::from(d.cap?) / 100.0))),
    )?;
    f.gauge(
        "group_sm_share_borrowed",
        "Issue 18: the part of the achieved share over the guarantee, lent by idle neighbours over the last second.",
        ratio(),
        rows().filter_map(|(k, d)| Some((k, d.borrowed_share()? / 100.0))),
    )?;
    f.gauge(
        "group_sm_share_achieved",
        "Share of the device's time charged to the group over the last second (absent until throttled work was measured).",
        ratio(),
        rows().filter_map(|(k, d)| Some((k, d.achieved_share? / 100.0))),
    )?;
    f.counter(
        "group_throttle_wait",
        "Time the group's launchers waited: for their share, or behind a high-priority process.",
        Some(Unit::Seconds),
        rows().map(|(k, d)| (k, seconds(d.throttled_ns))),
    )?;
    f.counter("group_oom_refusals", "Allocations refused at the group's or a member's limit.", None, rows().map(|(k, d)| (k, d.refusals)))?;
    let named = |g: &GroupRow| [vec![("group", g.name.clone())], group_labels(g)].concat();
    f.gauge("group_members", "Registered processes in the group.", None, l.groups.iter().map(|g| (named(g), g.members.len() as u64)))?;
    f.gauge("group_priority", "The group's priority: 1 low, 2 normal, 3 high.", None, l.groups.iter().map(|g| (named(g), g.priority as u32)))
}

/// The Kubernetes claim and pod a group serves (set by gpuslice-dra), as labels of its series.
fn group_labels(g: &GroupRow) -> Labels {
    GROUP_LABELS.iter().filter_map(|&name| Some((name, g.labels.get(name)?.clone()))).collect()
}

fn process_labels(p: &ProcessRow) -> Labels {
    vec![("pid", p.pid.to_string()), ("name", p.name.clone()), ("group", p.group.clone())]
}

fn processes(f: &mut Families, l: &Listing) -> std::fmt::Result {
    let rows = || {
        l.processes.iter().flat_map(|p| {
            p.devices.iter().map(move |d| {
                let mut k = process_labels(p);
                k.extend([("device", d.device.to_string()), ("uuid", d.uuid.clone())]);
                (k, p, d)
            })
        })
    };
    // Shares are the group's (its members draw on one bucket): the target shown for a process
    // is its group's on that device.
    let group_share = |p: &ProcessRow, device: u32| l.groups.iter().find(|g| g.name == p.group)?.devices.iter().find(|d| d.device == device)?.share;
    f.gauge("process_memory_used", "Device memory the process holds, its context included.", Some(Unit::Bytes), rows().map(|(k, _, d)| (k, d.used)))?;
    f.gauge(
        "process_memory_overhead",
        "The part of process_memory_used that the driver holds for the process's context.",
        Some(Unit::Bytes),
        rows().map(|(k, _, d)| (k, d.overhead)),
    )?;
    f.gauge(
        "process_memory_limit",
        "The process's own cap inside its group (absent: none; the group's limit still applies).",
        Some(Unit::Bytes),
        rows().filter_map(|(k, _, d)| Some((k, d.limit?))),
    )?;
    f.gauge("process_memory_peak", "The most the process has held at once.", Some(Unit::Bytes), rows().map(|(k, _, d)| (k, d.peak)))?;
    f.counter(
        "process_device_time",
        "Device time of the process's throttled launches.",
        Some(Unit::Seconds),
        rows().map(|(k, _, d)| (k, seconds(d.charged_ns))),
    )?;
    f.gauge(
        "process_sm_share_target",
        "The share of the process's group on the device (absent: not throttled).",
        ratio(),
        rows().filter_map(|(k, p, d)| Some((k, f64::from(group_share(p, d.device)?) / 100.0))),
    )?;
    f.gauge(
        "process_sm_share_achieved",
        "Share of the device's time charged to the process over the last second.",
        ratio(),
        rows().filter_map(|(k, _, d)| Some((k, d.achieved_share? / 100.0))),
    )?;
    f.counter(
        "process_throttle_wait",
        "Time the process's launchers waited: for their group's share, or behind a high-priority process.",
        Some(Unit::Seconds),
        rows().map(|(k, _, d)| (k, seconds(d.throttled_ns))),
    )?;
    f.counter(
        "process_turn_wait",
        "The part of process_throttle_wait spent waiting for the turn on the device among throttled processes.",
        Some(Unit::Seconds),
        rows().map(|(k, _, d)| (k, seconds(d.turn_wait_ns))),
    )?;
    f.counter("process_oom_refusals", "The process's allocations refused at a limit.", None, rows().map(|(k, _, d)| (k, d.refusals)))?;
    f.gauge(
        "process_priority",
        "The process's priority (its own, else its group's): 1 low, 2 normal, 3 high.",
        None,
        l.processes.iter().map(|p| (process_labels(p), p.priority as u32)),
    )?;
    let underreporting = || {
        l.underreporting.iter().map(|u| {
            let name = l.processes.iter().find(|p| p.pid == u.pid).map(|p| p.name.clone()).unwrap_or_default();
            let k = vec![("pid", u.pid.to_string()), ("name", name), ("group", u.group.clone()), ("device", u.device.to_string()), ("uuid", u.uuid.clone())];
            (k, u)
        })
    };
    f.gauge(
        "process_memory_underreported",
        "Bytes the driver (NVML) shows the process holding beyond its own report, charged to its group by the cross-check (absent: none).",
        Some(Unit::Bytes),
        underreporting().map(|(k, u)| (k, u.charged)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuslice_common::ledger::Priority;
    use gpuslice_common::protocol::{GroupDeviceRow, GroupRow, ProcessDeviceRow, UnderReportRow};

    fn listing() -> Listing {
        Listing {
            groups: vec![GroupRow {
                name: "team \"a\"".into(),
                labels: Default::default(),
                slot: 0,
                members: vec![42],
                priority: Priority::High,
                devices: vec![GroupDeviceRow {
                    device: 0,
                    uuid: "GPU-x".into(),
                    used: 3 << 30,
                    limit: Some(4 << 30),
                    peak: 7 << 29,
                    share: Some(30),
                    cap: None,
                    achieved_share: Some(29.5),
                    charged_ns: 1_500_000_000,
                    throttled_ns: 250_000_000,
                    refusals: 2,
                }],
            }],
            processes: vec![ProcessRow {
                pid: 42,
                own_pid: 1,
                uid: 0,
                group: "team \"a\"".into(),
                name: "python3".into(),
                priority: Priority::Low,
                devices: vec![ProcessDeviceRow {
                    device: 0,
                    uuid: "GPU-x".into(),
                    used: 3 << 30,
                    overhead: 1 << 29,
                    limit: None,
                    peak: 7 << 29,
                    achieved_share: None,
                    charged_ns: 1_500_000_000,
                    throttled_ns: 250_000_000,
                    refusals: 2,
                    turn_wait_ns: 125_000_000,
                }],
            }],
            underreporting: vec![UnderReportRow {
                pid: 42,
                group: "team \"a\"".into(),
                device: 0,
                uuid: "GPU-x".into(),
                reported: 3 << 30,
                measured: (3 << 30) + (1 << 28),
                charged: 1 << 28,
            }],
            suspensions: vec![],
            mps: vec![],
        }
    }

    #[test]
    fn an_underreporting_process_is_a_sample() {
        let text = render(Snapshot { health: Health::default(), listing: Some(listing()) });
        let want = r#"gpuslice_process_memory_underreported_bytes{pid="42",name="python3",group="team \"a\"",device="0",uuid="GPU-x"} 268435456"#;
        assert!(text.lines().any(|l| l == want), "{want}\nnot in\n{text}");
    }

    #[test]
    fn a_listing_becomes_labelled_samples() {
        let health = Health {
            up: true,
            processes: 1,
            groups: 1,
            max_processes: 8,
            max_groups: 4,
            requests: vec![("list", 3)],
            errors: vec![("refused", 1)],
            ..Health::default()
        };
        let text = render(Snapshot { health, listing: Some(listing()) });
        let g = r#"{group="team \"a\"",device="0",uuid="GPU-x"}"#;
        let p = r#"{pid="42",name="python3",group="team \"a\"",device="0",uuid="GPU-x"}"#;
        for line in [
            "gpuslice_up 1".to_string(),
            format!("gpuslice_group_memory_used_bytes{g} 3221225472"),
            format!("gpuslice_group_memory_limit_bytes{g} 4294967296"),
            format!("gpuslice_group_sm_share_target_ratio{g} 0.3"),
            format!("gpuslice_group_sm_share_achieved_ratio{g} 0.295"),
            format!("gpuslice_group_device_time_seconds_total{g} 1.5"),
            format!("gpuslice_group_throttle_wait_seconds_total{g} 0.25"),
            format!("gpuslice_group_oom_refusals_total{g} 2"),
            r#"gpuslice_group_priority{group="team \"a\""} 3"#.to_string(),
            format!("gpuslice_process_memory_overhead_bytes{p} 536870912"),
            format!("gpuslice_process_sm_share_target_ratio{p} 0.3"),
            format!("gpuslice_process_turn_wait_seconds_total{p} 0.125"),
            r#"gpuslice_process_priority{pid="42",name="python3",group="team \"a\""} 1"#.to_string(),
            r#"gpuslice_ledger_process_slots{state="free"} 7"#.to_string(),
            r#"gpuslice_socket_requests_total{request="list"} 3"#.to_string(),
            r#"gpuslice_socket_errors_total{reason="refused"} 1"#.to_string(),
            "# TYPE gpuslice_group_oom_refusals counter".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no line `{line}` in:\n{text}");
        }
        assert!(!text.contains("gpuslice_process_memory_limit_bytes{"), "no own cap, no sample:\n{text}");
        assert!(!text.contains("gpuslice_process_sm_share_achieved_ratio{"), "not sampled yet, no sample:\n{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_group_of_a_kubernetes_claim_carries_the_claim_and_pod() {
        let mut l = listing();
        l.groups[0].name = "default/trainer".into();
        l.groups[0].labels = [("claim_namespace", "default"), ("claim_name", "trainer"), ("claim_uid", "0b3a"), ("pod", "trainer-0")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let text = render(Snapshot { health: Health::default(), listing: Some(l) });
        let k = r#"claim_namespace="default",claim_name="trainer",claim_uid="0b3a",pod="trainer-0""#;
        for line in [
            format!(r#"gpuslice_group_memory_used_bytes{{group="default/trainer",device="0",uuid="GPU-x",{k}}} 3221225472"#),
            format!(r#"gpuslice_group_priority{{group="default/trainer",{k}}} 3"#),
        ] {
            assert!(text.lines().any(|l| l == line), "no line `{line}` in:\n{text}");
        }
    }

    #[test]
    fn a_lending_group_shows_its_cap_and_what_it_borrowed() {
        let mut l = listing();
        let d = &mut l.groups[0].devices[0];
        (d.cap, d.achieved_share) = (Some(100), Some(45.0));
        let text = render(Snapshot { health: Health::default(), listing: Some(l) });
        let g = r#"{group="team \"a\"",device="0",uuid="GPU-x"}"#;
        for want in [format!("gpuslice_group_sm_share_cap_ratio{g} 1.0"), format!("gpuslice_group_sm_share_borrowed_ratio{g} 0.15")] {
            assert!(text.lines().any(|l| l == want), "{want}\nnot in\n{text}");
        }
        assert_eq!(listing().groups[0].devices[0].share_text(), "30%", "the share is the cap");
        let mut row = listing().groups[0].devices[0].clone();
        row.cap = Some(60);
        assert_eq!(row.share_text(), "30-60%");
        row.cap = Some(100);
        assert_eq!(row.share_text(), "30%+");
    }

    #[test]
    fn without_the_state_only_the_health_is_reported() {
        let text = render(Snapshot { health: Health::default(), listing: None });
        assert!(text.lines().any(|l| l == "gpuslice_up 0"), "{text}");
        assert!(!text.contains("gpuslice_group_memory_used_bytes{"), "{text}");
    }
}
