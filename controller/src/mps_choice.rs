//! The rule that picks, per GPU, MPS (`spatial`) or time-slicing (issue 19), from what the
//! H200 measurements say MPS wins at (docs/NOTES.md, "Priorities"; LD_PRELOAD.md).
//!
//! What MPS buys: one hardware context for every process, so a high-priority request no longer
//! waits for the GPU's switch between contexts (~0.12–0.13 ms a request): p99 of a 2 ms request
//! beside a saturating neighbour ×1.03–1.10 of alone over MPS against ×1.09–1.16 time-sliced,
//! and the neighbour kept more of its rate (66.6–70.8 % against 63.7–64.8 %). What it costs: no
//! fault isolation (a fatal fault in one client ends the others' work), some programs run
//! slower under MPS even alone (ResNet-50 in a CUDA graph +12 %, which lost it the comparison),
//! and an SM share becomes a fixed partition of SMs (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`),
//! set at context creation, without the guarantee/cap lending of time shares.
//!
//! So `auto` picks MPS only where the gain was measured: latency-sensitive (high-priority) work
//! sharing the GPU, and no SM shares on it whose meaning MPS would change. Both are judged per
//! GPU (`Tenants`, gathered by `mps_devices::tenants`): high-priority work on GPU 1 says nothing
//! of GPU 0, and a share set for GPU 1 does not keep GPU 0 time-sliced. `on` and `off` are the
//! operator's word. Whatever the rule says, a GPU whose daemon is not up is time-sliced.

use gpuslice_common::mps_table::Mode;
use gpuslice_common::settings::MpsPolicy;

/// What the rule looks at for one GPU besides the operator's policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tenants {
    /// High-priority work uses this GPU or may start on it: a registered process whose priority
    /// (its own, else its group's) is `high` has the GPU among its devices; or a group of
    /// priority `high` may start a process here: a pinned one (configured or edited: its next
    /// process, a replica say, may start on any GPU) or one with no registered process on any
    /// GPU yet.
    pub high: bool,
    /// High-priority work exists on this node, here or on other GPUs (only the reason shown
    /// for a GPU without any of its own depends on it).
    pub high_anywhere: bool,
    /// Some group has an SM share strictly between 0 and 100 on this GPU.
    pub shares: bool,
}

/// Why a GPU has its mode: one definition for the MPS table and the log (`text`), and for
/// `gpuslice ls --json` and the metrics (`key`, short and stable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Why {
    Off,
    On,
    AutoNoHighPriority,
    AutoHighPriorityElsewhere,
    AutoSmShares,
    AutoHighPriority,
    HeldSpatial,
    HeldTimeSliced,
    DaemonDown,
}

impl Why {
    /// The words of the table's line and of the log.
    pub fn text(self) -> &'static str {
        match self {
            Why::Off => "mps off",
            Why::On => "mps on",
            Why::AutoNoHighPriority => "auto: no high-priority group or process, so nothing MPS was measured to help; time-slicing keeps fault isolation",
            Why::AutoHighPriorityElsewhere => {
                "auto: the high-priority work is on other GPUs, so nothing MPS was measured to help runs here; time-slicing keeps fault isolation"
            }
            Why::AutoSmShares => "auto: SM shares are set on this GPU, and under MPS a share would become a fixed SM partition without lending",
            Why::AutoHighPriority => "auto: high-priority work shares the GPU, where MPS's single context shortens its tail",
            Why::HeldSpatial => "held spatial while processes that started over MPS use the GPU",
            Why::HeldTimeSliced => "held time-sliced while processes that started time-sliced use the GPU",
            Why::DaemonDown => "its MPS control daemon is not up",
        }
    }

    /// A short stable name: the `reason` of `ls --json` and of the metrics.
    pub fn key(self) -> &'static str {
        match self {
            Why::Off => "off",
            Why::On => "on",
            Why::AutoNoHighPriority => "auto_no_high_priority",
            Why::AutoHighPriorityElsewhere => "auto_high_priority_elsewhere",
            Why::AutoSmShares => "auto_sm_shares",
            Why::AutoHighPriority => "auto_high_priority",
            Why::HeldSpatial => "held_spatial",
            Why::HeldTimeSliced => "held_time_sliced",
            Why::DaemonDown => "daemon_down",
        }
    }
}

/// The mode the rule wants for a GPU, from its own tenants, and why (for the log and the table).
pub fn wanted(policy: MpsPolicy, tenants: Tenants) -> (Mode, Why) {
    match policy {
        MpsPolicy::Off => (Mode::TimeSliced, Why::Off),
        MpsPolicy::On => (Mode::Spatial, Why::On),
        MpsPolicy::Auto if !tenants.high && tenants.high_anywhere => (Mode::TimeSliced, Why::AutoHighPriorityElsewhere),
        MpsPolicy::Auto if !tenants.high => (Mode::TimeSliced, Why::AutoNoHighPriority),
        MpsPolicy::Auto if tenants.shares => (Mode::TimeSliced, Why::AutoSmShares),
        MpsPolicy::Auto => (Mode::Spatial, Why::AutoHighPriority),
    }
}

/// The mode a GPU keeps: the wanted one, except while processes that started under the earlier
/// one (`kept`) still use the GPU: a GPU does not mix MPS clients with time-sliced contexts,
/// where neither mode's gain holds.
pub fn intended(wanted: (Mode, Why), kept: Option<Mode>, in_use: bool) -> (Mode, Why) {
    match kept {
        Some(Mode::Spatial) if in_use && wanted.0 != Mode::Spatial => (Mode::Spatial, Why::HeldSpatial),
        Some(Mode::TimeSliced) if in_use && wanted.0 != Mode::TimeSliced => (Mode::TimeSliced, Why::HeldTimeSliced),
        _ => wanted,
    }
}

/// What the table says: the intended mode, but time-sliced while the GPU's daemon is not up
/// (a process must never be sent to a daemon that is not there).
pub fn published(intended: (Mode, Why), daemon_up: bool) -> (Mode, Why) {
    if intended.0 == Mode::Spatial && !daemon_up {
        return (Mode::TimeSliced, Why::DaemonDown);
    }
    intended
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIGH: Tenants = Tenants { high: true, high_anywhere: true, shares: false };

    #[test]
    fn auto_picks_mps_only_for_high_priority_work_without_shares() {
        assert_eq!(wanted(MpsPolicy::Auto, HIGH), (Mode::Spatial, Why::AutoHighPriority));
        assert_eq!(wanted(MpsPolicy::Auto, Tenants::default()), (Mode::TimeSliced, Why::AutoNoHighPriority));
        assert_eq!(wanted(MpsPolicy::Auto, Tenants { shares: true, ..HIGH }), (Mode::TimeSliced, Why::AutoSmShares));
        assert_eq!(wanted(MpsPolicy::On, Tenants { high: false, high_anywhere: false, shares: true }).0, Mode::Spatial);
        assert_eq!(wanted(MpsPolicy::Off, HIGH).0, Mode::TimeSliced);
    }

    /// Per GPU: high-priority work elsewhere leaves this GPU time-sliced (with its own reason),
    /// and a share elsewhere does not keep it from MPS (the caller gives each GPU its own
    /// `Tenants`; nothing of another GPU's reaches the rule but `high_anywhere`'s words).
    #[test]
    fn auto_judges_each_gpu_by_its_own_tenants() {
        let elsewhere = Tenants { high: false, high_anywhere: true, shares: false };
        assert_eq!(wanted(MpsPolicy::Auto, elsewhere), (Mode::TimeSliced, Why::AutoHighPriorityElsewhere));
        assert_eq!(
            wanted(MpsPolicy::Auto, Tenants { shares: true, ..elsewhere }),
            (Mode::TimeSliced, Why::AutoHighPriorityElsewhere),
            "no high work here comes first"
        );
        assert_eq!(wanted(MpsPolicy::On, elsewhere), (Mode::Spatial, Why::On));
        assert_eq!(wanted(MpsPolicy::Off, elsewhere), (Mode::TimeSliced, Why::Off));
        // A GPU the rule wants time-sliced because the work is elsewhere is still held while used.
        let held = intended(wanted(MpsPolicy::Auto, elsewhere), Some(Mode::Spatial), true);
        assert_eq!(held, (Mode::Spatial, Why::HeldSpatial));
        assert_eq!(intended(wanted(MpsPolicy::Auto, elsewhere), Some(Mode::Spatial), false), (Mode::TimeSliced, Why::AutoHighPriorityElsewhere));
    }

    #[test]
    fn a_used_gpu_keeps_its_mode_and_a_down_daemon_means_time_slicing() {
        let spatial = wanted(MpsPolicy::Auto, HIGH);
        let sliced = wanted(MpsPolicy::Auto, Tenants::default());
        assert_eq!(intended(spatial, Some(Mode::TimeSliced), true).0, Mode::TimeSliced, "in use: held");
        assert_eq!(intended(spatial, Some(Mode::TimeSliced), false).0, Mode::Spatial, "free: changes");
        assert_eq!(intended(sliced, Some(Mode::Spatial), true).0, Mode::Spatial);
        assert_eq!(intended(spatial, None, true), spatial, "nothing kept yet: the rule");
        assert_eq!(published(intended(sliced, Some(Mode::Spatial), true), false), (Mode::TimeSliced, Why::DaemonDown));
        assert_eq!(published(spatial, true), spatial);
        assert_eq!(published(sliced, false), sliced);
    }

    #[test]
    fn each_reason_has_its_own_key_and_text() {
        let all = [
            Why::Off,
            Why::On,
            Why::AutoNoHighPriority,
            Why::AutoHighPriorityElsewhere,
            Why::AutoSmShares,
            Why::AutoHighPriority,
            Why::HeldSpatial,
            Why::HeldTimeSliced,
            Why::DaemonDown,
        ];
        let keys: std::collections::HashSet<&str> = all.iter().map(|w| w.key()).collect();
        let texts: std::collections::HashSet<&str> = all.iter().map(|w| w.text()).collect();
        assert_eq!((keys.len(), texts.len()), (all.len(), all.len()));
        assert!(all.iter().all(|w| !w.key().contains(' ') && !w.text().contains('\n')));
    }
}
