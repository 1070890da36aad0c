//! `gpuslice suspend` / `gpuslice resume` and the suspensions table of `ls` (issue 22).

use crate::ask::{ask_within, SocketArg};
use gpuslice_common::protocol::{GroupRef, Listing, Request, Response};
use gpuslice_common::size::format_size;
use std::time::Duration;

/// A suspension of a large tenant copies its memory at a few GB/s: the CLI waits long enough.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
pub struct GroupArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The group (every process of it, on every device).
    #[arg(long, required = true)]
    group: String,
}

pub fn print_done(response: Response) -> Result<(), String> {
    match response {
        Response::Done { message } => {
            println!("{message}");
            Ok(())
        }
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

pub fn suspend(args: GroupArgs) -> Result<(), String> {
    print_done(ask_within(&args.socket.path(), &Request::Suspend(GroupRef { group: args.group }), SUSPEND_TIMEOUT)?)
}

pub fn resume(args: GroupArgs) -> Result<(), String> {
    print_done(ask_within(&args.socket.path(), &Request::Resume(GroupRef { group: args.group }), SUSPEND_TIMEOUT)?)
}

/// A rate as `ls` and `top` show it.
fn gbps(v: Option<f64>) -> Option<String> {
    v.map(|v| format!("{v:.1} GB/s"))
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0} ms"))
}

/// One line for `top`: the groups not running now, with what they hold in host memory.
pub fn summary(l: &Listing) -> String {
    let parts: Vec<String> = l
        .suspensions
        .iter()
        .filter(|s| s.state != "running")
        .map(|s| match s.state.as_str() {
            "suspended" => format!(
                "{} suspended ({} in host memory{}{})",
                s.group,
                format_size(s.host_bytes),
                if s.automatic { ", by the policy" } else { "" },
                s.path.as_deref().map(|p| format!(", {p} path{}", gbps(s.suspend_gbps).map(|g| format!(" at {g}")).unwrap_or_default())).unwrap_or_default()
            ),
            other => format!("{} {other}", s.group),
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("groups off the GPU: {}", parts.join("; "))
    }
}

/// The SUSPENSIONS table under `ls` (nothing when no group was ever marked or suspended).
pub fn render(l: &Listing) -> String {
    if l.suspensions.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nSUSPENSIONS (suspended groups keep their quota; their memory waits in host memory)\n");
    out.push_str(&format!(
        "{:<20} {:<11} {:>11} {:<12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>5} PIDS\n",
        "GROUP", "STATE", "SUSPENDABLE", "PATH", "MOVED", "HOST NOW", "SUSPEND", "OUT", "RESUME", "IN", "AUTO"
    ));
    for s in &l.suspensions {
        let pids = s.pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        out.push_str(&format!(
            "{:<20} {:<11} {:>11} {:<12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>5} {}\n",
            s.group,
            s.state,
            if s.suspendable { "yes" } else { "no" },
            // The path the last suspension took, else the setting.
            s.path.clone().unwrap_or_else(|| if s.suspend_path.is_empty() { "-".into() } else { format!("({})", s.suspend_path) }),
            format_size(s.bytes),
            format_size(s.host_bytes),
            ms(s.suspend_ms),
            gbps(s.suspend_gbps).unwrap_or_else(|| "-".into()),
            ms(s.resume_ms),
            gbps(s.resume_gbps).unwrap_or_else(|| "-".into()),
            if s.automatic { "yes" } else { "no" },
            if pids.is_empty() { "-".into() } else { pids }
        ));
        if let Some(e) = &s.error {
            // A refusal the policy still acts on: it tries other groups first meanwhile; which
            // kind it is says why it is passed over for that long (a timeout only briefly).
            let kind = match s.refusal_kind.as_deref() {
                Some("timeout") => "a timeout, not a lasting refusal: ",
                Some(_) => "a lasting refusal: ",
                None => "",
            };
            let passed = s.passed_over_s.map(|t| format!(" ({kind}passed over by the policy for {:.0} s more)", t.ceil())).unwrap_or_default();
            out.push_str(&format!("{:<20} last error: {e}{passed}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuslice_common::protocol::SuspensionRow;

    fn listing() -> Listing {
        let row = SuspensionRow {
            group: "batch".into(),
            state: "suspended".into(),
            suspendable: true,
            pids: vec![42],
            bytes: 3 << 30,
            host_bytes: 3 << 30,
            suspend_ms: Some(1500.0),
            path: Some("shim".into()),
            suspend_gbps: Some(2.1),
            automatic: true,
            suspensions: 2,
            ..Default::default()
        };
        Listing { suspensions: vec![row], ..Default::default() }
    }

    #[test]
    fn ls_top_and_metrics_show_a_suspended_group() {
        let l = listing();
        let table = render(&l);
        assert!(
            table.lines().any(|line| line.starts_with("batch")
                && line.contains("suspended")
                && line.contains("3.00 GiB")
                && line.contains("1500 ms")
                && line.contains("shim")
                && line.contains("2.1 GB/s")),
            "{table}"
        );
        assert_eq!(summary(&l), "groups off the GPU: batch suspended (3.00 GiB in host memory, by the policy, shim path at 2.1 GB/s)");
        let text = crate::metrics::render(crate::metrics::Snapshot { health: Default::default(), listing: Some(l) });
        for want in [
            "gpuslice_group_suspended{group=\"batch\"} 1",
            "gpuslice_group_suspended_host_memory_bytes{group=\"batch\"} 3221225472",
            "gpuslice_group_suspend_duration_seconds{group=\"batch\"} 1.5",
            "gpuslice_group_suspensions_total{group=\"batch\"} 2",
            "gpuslice_group_suspend_path{group=\"batch\",path=\"shim\"} 1",
            "gpuslice_group_suspend_throughput_bytes_per_second{group=\"batch\",path=\"shim\"} 2100000000",
        ] {
            assert!(text.contains(want), "no {want} in:\n{text}");
        }
    }

    /// A group whose suspension was refused: its last error says so and how long the policy
    /// passes it over; the metrics count the refusals and flag it while it is passed over.
    #[test]
    fn ls_and_metrics_show_a_group_that_refused_suspension() {
        let row = SuspensionRow {
            group: "first".into(),
            state: "running".into(),
            suspendable: true,
            error: Some("group \"first\" exports memory to other processes (pid 42: 1 exports recorded)".into()),
            refusals: 2,
            refused_by: Some(42),
            refusal_kind: Some("lasting".into()),
            passed_over_s: Some(24.2),
            ..Default::default()
        };
        let l = Listing { suspensions: vec![row], ..Default::default() };
        let table = render(&l);
        assert!(table.lines().any(|line| line.starts_with("first") && line.contains("running")), "{table}");
        assert!(
            table.lines().any(|line| line.contains("last error: group \"first\" exports memory")
                && line.ends_with("(a lasting refusal: passed over by the policy for 25 s more)")),
            "{table}"
        );
        assert_eq!(summary(&l), "", "it runs: not in top's line");
        let text = crate::metrics::render(crate::metrics::Snapshot { health: Default::default(), listing: Some(l.clone()) });
        for want in ["gpuslice_group_suspension_refusals_total{group=\"first\"} 2", "gpuslice_group_suspension_passed_over{group=\"first\"} 1"] {
            assert!(text.contains(want), "no {want} in:\n{text}");
        }
        let mut l = l;
        l.suspensions[0].passed_over_s = None;
        assert!(!render(&l).contains("passed over"), "a candidate again");
        let text = crate::metrics::render(crate::metrics::Snapshot { health: Default::default(), listing: Some(l) });
        assert!(text.contains("gpuslice_group_suspension_passed_over{group=\"first\"} 0"), "{text}");
    }

    /// A lock that timed out (a member inside a long kernel): `ls` says it was a timeout and
    /// how briefly the group is passed over; the metrics count it among the refusals and apart.
    #[test]
    fn ls_and_metrics_tell_a_timed_out_lock_from_a_lasting_refusal() {
        let row = SuspensionRow {
            group: "first".into(),
            state: "running".into(),
            suspendable: true,
            error: Some("cuCheckpointProcessLock(pid 42) failed: CUDA_ERROR_TIMEOUT (909)".into()),
            refusals: 3,
            timeouts: 1,
            refused_by: Some(42),
            refusal_kind: Some("timeout".into()),
            passed_over_s: Some(2.2),
            ..Default::default()
        };
        let l = Listing { suspensions: vec![row], ..Default::default() };
        let table = render(&l);
        assert!(
            table.lines().any(|line| line.contains("last error: cuCheckpointProcessLock")
                && line.ends_with("(a timeout, not a lasting refusal: passed over by the policy for 3 s more)")),
            "{table}"
        );
        let text = crate::metrics::render(crate::metrics::Snapshot { health: Default::default(), listing: Some(l) });
        for want in [
            "gpuslice_group_suspension_refusals_total{group=\"first\"} 3",
            "gpuslice_group_suspension_timeouts_total{group=\"first\"} 1",
            "gpuslice_group_suspension_passed_over{group=\"first\"} 1",
        ] {
            assert!(text.contains(want), "no {want} in:\n{text}");
        }
    }

    #[test]
    fn nothing_is_shown_without_suspensions() {
        let l = Listing::default();
        assert_eq!(render(&l), "");
        assert_eq!(summary(&l), "");
    }
}
