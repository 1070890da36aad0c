//! Issue 19's managed spatial mode as `gpuslice ls` and `top` show it: each managed GPU's mode
//! (spatial over its MPS daemon, or time-sliced), why, and its daemon, from the listing's `mps`
//! rows (the controller's own table lines; the metrics render the same rows in `metrics.rs`).

use gpuslice_common::protocol::{Listing, MpsGpuRow};

/// The daemon in a few words: `up, pid 1234`, `up, pid 1234, adopted`, `down`.
pub fn daemon_text(g: &MpsGpuRow) -> String {
    let d = &g.daemon;
    match (d.up, d.pid) {
        (true, Some(pid)) => format!("up, pid {pid}{}", if d.adopted { ", adopted" } else { "" }),
        (false, Some(pid)) => format!("starting, pid {pid}"),
        (_, None) => "down".into(),
    }
}

fn uids(g: &MpsGpuRow) -> String {
    if g.users.is_empty() {
        "-".into()
    } else {
        g.users.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    }
}

/// The MPS table under `ls` (nothing without `serve --mps`).
pub fn render(l: &Listing) -> String {
    if l.mps.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nMPS (serve --mps: each GPU over its own MPS control daemon, spatial, or time-sliced)\n");
    let width = l.mps.iter().map(|g| g.uuid.len()).max().unwrap_or(0).max(4);
    out.push_str(&format!("{:<width$} {:>3} {:<11} {:<6} {:<28} {:>8} {:<8} WHY\n", "GPU", "DEV", "MODE", "POLICY", "DAEMON", "RESTARTS", "UIDS"));
    for g in &l.mps {
        out.push_str(&format!(
            "{:<width$} {:>3} {:<11} {:<6} {:<28} {:>8} {:<8} {}\n",
            g.uuid,
            g.device.map_or("-".into(), |d| d.to_string()),
            g.mode,
            g.policy,
            daemon_text(g),
            g.daemon.restarts,
            uids(g),
            g.why
        ));
    }
    out
}

/// One line per managed GPU for `top`: `GPU-… spatial (why) · daemon up, pid N · 0 restarts`.
pub fn lines(l: &Listing) -> Vec<String> {
    l.mps
        .iter()
        .map(|g| {
            let restarts = match g.daemon.restarts {
                1 => "1 restart".to_string(),
                n => format!("{n} restarts"),
            };
            format!("{} {} ({}) · daemon {} · {restarts}", g.uuid, g.mode, g.why, daemon_text(g))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuslice_common::protocol::MpsDaemonRow;

    fn listing() -> Listing {
        let spatial = MpsGpuRow {
            uuid: "GPU-aaaa".into(),
            device: Some(0),
            policy: "auto".into(),
            mode: "spatial".into(),
            reason: "auto_high_priority".into(),
            why: "auto: high-priority work shares the GPU".into(),
            pipe: Some("/run/gpuslice/mps/GPU-aaaa".into()),
            users: vec![0, 1000],
            daemon: MpsDaemonRow { up: true, pid: Some(4321), restarts: 0, adopted: true },
        };
        let sliced = MpsGpuRow {
            uuid: "GPU-bbbb".into(),
            device: None,
            policy: "on".into(),
            mode: "time-sliced".into(),
            reason: "daemon_down".into(),
            why: "its MPS control daemon is not up".into(),
            pipe: None,
            users: vec![],
            daemon: MpsDaemonRow { up: false, pid: None, restarts: 3, adopted: false },
        };
        Listing { mps: vec![spatial, sliced], ..Default::default() }
    }

    #[test]
    fn ls_top_and_metrics_show_each_gpus_mode_reason_and_daemon() {
        let l = listing();
        let table = render(&l);
        let line = |uuid: &str| table.lines().find(|x| x.starts_with(uuid)).unwrap_or_else(|| panic!("no {uuid} in\n{table}")).to_string();
        let a = line("GPU-aaaa");
        for want in ["spatial", "auto", "up, pid 4321, adopted", " 0 ", "0,1000", "high-priority work"] {
            assert!(a.contains(want), "{want:?} not in {a:?}");
        }
        let b = line("GPU-bbbb");
        for want in ["time-sliced", "down", " 3 ", "not up"] {
            assert!(b.contains(want), "{want:?} not in {b:?}");
        }
        assert_eq!(
            lines(&l),
            vec![
                "GPU-aaaa spatial (auto: high-priority work shares the GPU) · daemon up, pid 4321, adopted · 0 restarts".to_string(),
                "GPU-bbbb time-sliced (its MPS control daemon is not up) · daemon down · 3 restarts".to_string(),
            ]
        );
        let text = crate::metrics::render(crate::metrics::Snapshot { health: Default::default(), listing: Some(l) });
        for want in [
            "gpuslice_gpu_mps_spatial{uuid=\"GPU-aaaa\"} 1",
            "gpuslice_gpu_mps_spatial{uuid=\"GPU-bbbb\"} 0",
            "gpuslice_gpu_mps_mode{uuid=\"GPU-aaaa\",mode=\"spatial\",policy=\"auto\",reason=\"auto_high_priority\"} 1",
            "gpuslice_gpu_mps_mode{uuid=\"GPU-bbbb\",mode=\"time-sliced\",policy=\"on\",reason=\"daemon_down\"} 1",
            "gpuslice_gpu_mps_daemon_up{uuid=\"GPU-aaaa\"} 1",
            "gpuslice_gpu_mps_daemon_up{uuid=\"GPU-bbbb\"} 0",
            "gpuslice_gpu_mps_daemon_restarts_total{uuid=\"GPU-bbbb\"} 3",
        ] {
            assert!(text.contains(want), "no {want} in:\n{text}");
        }
    }

    #[test]
    fn nothing_is_shown_without_managed_gpus() {
        let l = Listing::default();
        assert_eq!(render(&l), "");
        assert!(lines(&l).is_empty());
        let text = crate::metrics::render(crate::metrics::Snapshot { health: Default::default(), listing: Some(l) });
        assert!(!text.contains("gpuslice_gpu_mps_spatial{"), "{text}");
    }
}
