//! Limits a process runs under, resolved from its environment and an optional TOML file.
//!
//! Each setting is per device. Precedence for device `n`, first found wins, shown for memory:
//! `GPUSLICE_MEMORY_LIMIT_n` > `CUDA_DEVICE_MEMORY_LIMIT_n` > `GPUSLICE_MEMORY_LIMIT` >
//! `CUDA_DEVICE_MEMORY_LIMIT` > the file's `[defaults.devices.n]` > the file's `[defaults]`.
//! The SM share reads `GPUSLICE_SM_SHARE` and HAMi's `CUDA_DEVICE_SM_LIMIT` the same way. The
//! `CUDA_DEVICE_*` spellings are HAMi-core's, accepted so that a HAMi user switches by changing one
//! library path. An empty variable counts as unset; anything else that does not parse is an
//! error, never a silent "no limit".

use crate::ledger::Priority;
use crate::size::{format_size, parse_size};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use toml::Spanned;

pub const ENV_MEMORY_LIMIT: &str = "GPUSLICE_MEMORY_LIMIT";
pub const HAMI_MEMORY_LIMIT: &str = "CUDA_DEVICE_MEMORY_LIMIT";
pub const ENV_SM_SHARE: &str = "GPUSLICE_SM_SHARE";
pub const HAMI_SM_LIMIT: &str = "CUDA_DEVICE_SM_LIMIT";
/// The cap over the guarantee `GPUSLICE_SM_SHARE` gives (issue 18): 1..=100 or `none`.
pub const ENV_SM_MAX: &str = "GPUSLICE_SM_MAX";
pub const ENV_CONFIG: &str = "GPUSLICE_CONFIG";
pub use crate::protocol::{ENV_GROUP, ENV_PRIORITY};
pub const ENV_PRIORITY_QUEUE: &str = "GPUSLICE_PRIORITY_QUEUE";
/// `auto` (default): under an MPS daemon, map the priority and the SM share onto MPS's client
/// priority and active-thread percentage; `off`: leave MPS's settings alone.
pub const ENV_MPS: &str = "GPUSLICE_MPS";
/// Experimental (issue 19): `on` (default), `spatial-off`: a lower-priority process whose SM
/// share MPS carries on a device (its active-thread percentage) does not wait for high-priority
/// work there, or `auto`: the same only while every high-priority process on the device says
/// its requests are host-bound.
pub const ENV_PRIORITY_GATE: &str = "GPUSLICE_PRIORITY_GATE";

/// The name of the group of a process alone (no `GPUSLICE_GROUP`): `pid-<pid>`. Names with this
/// prefix are kept for such groups (`check_group_name` refuses them): the controller and the
/// shim tell a solo group by it (`is_solo_group`).
pub fn solo_group_name(pid: u32) -> String {
    format!("{SOLO_PREFIX}{pid}")
}

/// The name a restarted controller gives group slot `slot` when it found neither the group's
/// settings page nor its own copy of it in the ledger file: the group's name was lost with
/// them (its members' writable copy is theirs to write, so not taken). With the solo prefix, no
/// process and no config can name it (`check_group_name` refuses it), so nobody joins it and
/// the config cannot claim it; like a solo group it goes with its last member.
pub fn lost_group_name(slot: usize) -> String {
    format!("{SOLO_PREFIX}lost-{slot}")
}

/// True for the name of a process alone's group (`solo_group_name`).
pub fn is_solo_group(name: &str) -> bool {
    name.starts_with(SOLO_PREFIX)
}

const SOLO_PREFIX: &str = "pid-";

/// A group name: what `GPUSLICE_GROUP` and `[groups.NAME]` may say.
pub fn check_group_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < crate::ledger::NAME_BYTES
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
        && !is_solo_group(name);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a group name is 1-{} characters of letters, digits and - _ . : / @, and does not start with \"pid-\" (kept for processes alone)",
            crate::ledger::NAME_BYTES - 1
        ))
    }
}

/// A setting that could not be used: where it came from, what it said, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    /// The variable name, or the file path and key.
    pub origin: String,
    /// The offending text as written.
    pub value: String,
    pub reason: String,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.origin, self.value, self.reason)
    }
}

impl std::error::Error for SettingsError {}

/// A value and where it was set, so logs can say "4.00 GiB (from GPUSLICE_MEMORY_LIMIT_0)".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub origin: String,
}

/// One setting for every device, with per-device overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerDevice<T> {
    all: Option<Sourced<T>>,
    device: BTreeMap<u32, Sourced<T>>,
}

impl<T> Default for PerDevice<T> {
    fn default() -> Self {
        PerDevice { all: None, device: BTreeMap::new() }
    }
}

impl<T> PerDevice<T> {
    /// The value for CUDA device ordinal `device`, if any.
    pub fn get(&self, device: u32) -> Option<&Sourced<T>> {
        self.device.get(&device).or(self.all.as_ref())
    }

    /// The value set for every device, if any (per-device overrides aside).
    pub fn all(&self) -> Option<&Sourced<T>> {
        self.all.as_ref()
    }

    fn map<U>(&self, f: impl Fn(&T) -> U) -> PerDevice<U> {
        let one = |s: &Sourced<T>| Sourced { value: f(&s.value), origin: s.origin.clone() };
        PerDevice { all: self.all.as_ref().map(one), device: self.device.iter().map(|(d, s)| (*d, one(s))).collect() }
    }

    pub fn is_unset(&self) -> bool {
        self.all.is_none() && self.device.is_empty()
    }

    fn describe(&self, what: &str, show: impl Fn(&T) -> String) -> Vec<String> {
        let mut parts = Vec::new();
        if let Some(all) = &self.all {
            parts.push(format!("{what} {} on every device (from {})", show(&all.value), all.origin));
        }
        for (dev, v) in &self.device {
            parts.push(format!("{what} {} on device {dev} (from {})", show(&v.value), v.origin));
        }
        parts
    }

    /// Applies the environment on top of what the file said: our spelling over HAMi's, a
    /// device's own variable over the global one, any environment value over the file's.
    fn resolve_env(
        &mut self,
        vars: &[(String, String)],
        ours: &str,
        hami: Option<&str>,
        parse: impl Fn(&str, &str) -> Result<Option<Sourced<T>>, SettingsError>,
    ) -> Result<(), SettingsError> {
        for name in hami.into_iter().chain([ours]) {
            if let Some(value) = lookup(vars, name) {
                if let Some(v) = parse(name, value)? {
                    self.all = Some(v);
                    // The environment wins over the file, including the file's per-device entries.
                    self.device.clear();
                }
            }
        }
        for (prefix, strict) in hami.map(|h| (h, false)).into_iter().chain([(ours, true)]) {
            for (name, value) in vars {
                let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else { continue };
                if value.trim().is_empty() {
                    continue;
                }
                let device = match rest.parse::<u32>() {
                    Ok(d) => d,
                    // HAMi may grow variables of its own under this prefix; ours are exact.
                    Err(_) if !strict => continue,
                    Err(_) => {
                        return Err(SettingsError {
                            origin: name.clone(),
                            value: value.clone(),
                            reason: format!("the suffix {rest:?} is not a device number; write {prefix}_0, {prefix}_1, ..."),
                        })
                    }
                };
                match parse(name, value)? {
                    Some(v) => {
                        self.device.insert(device, v);
                    }
                    None => {
                        self.device.remove(&device);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Everything the shim needs to know before the first CUDA call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub memory_limit: PerDevice<u64>,
    /// Percent of the device's time, 1..=100; unset and 100 both mean "not throttled".
    pub sm_share: PerDevice<u32>,
    /// Issue 18: `GPUSLICE_SM_MAX`, the cap over the share, 1..=100 (100: no cap, the group
    /// borrows idle time freely); unset: the share is also the cap.
    pub sm_max: PerDevice<u32>,
    /// `GPUSLICE_PRIORITY`, or the file's.
    pub priority: Option<Sourced<Priority>>,
    /// `GPUSLICE_GROUP`: the group the process joins when a controller runs.
    pub group: Option<String>,
    /// `GPUSLICE_PRIORITY_QUEUE`: launches a lower-priority process keeps in flight while a
    /// high-priority one lives on its device (1..=64).
    pub priority_queue: Option<u32>,
    /// `GPUSLICE_MPS`: whether the shim maps its settings onto MPS's when MPS serves it.
    pub mps: MpsMode,
    /// `GPUSLICE_PRIORITY_GATE`: whether a lower-priority launch waits for high-priority work.
    pub priority_gate: PriorityGate,
}

/// Whether a lower-priority process's launches wait for high-priority work (see
/// `GPUSLICE_PRIORITY_GATE`; experimental, for issue 19's measurement).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PriorityGate {
    /// Always: while a high-priority process has work on the device, lower ones wait, and while
    /// one lives they keep a bounded queue.
    #[default]
    On,
    /// Not on a device where MPS's active-thread percentage carries this process's share: the
    /// SMs it leaves free are the high-priority process's protection there, and its launches go
    /// out as if no high-priority process lived. Elsewhere (time-sliced, or MPS without a
    /// share) the gate stays on.
    SpatialOff,
    /// As `SpatialOff`, but only while every live high-priority process on the device says its
    /// requests leave the device idle most of the time (host-bound: the gate would cost the
    /// neighbour without shortening them), decided launch by launch; a high-priority process
    /// counts as device-bound until its own measurement says otherwise.
    Auto,
}

impl std::str::FromStr for PriorityGate {
    type Err = String;
    fn from_str(text: &str) -> Result<PriorityGate, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "on" => Ok(PriorityGate::On),
            "spatial-off" => Ok(PriorityGate::SpatialOff),
            "auto" => Ok(PriorityGate::Auto),
            _ => Err("expected on, spatial-off or auto".into()),
        }
    }
}

impl fmt::Display for PriorityGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PriorityGate::On => "on",
            PriorityGate::SpatialOff => "spatial-off",
            PriorityGate::Auto => "auto",
        })
    }
}

/// What the shim does when an MPS daemon serves the process (see `GPUSLICE_MPS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MpsMode {
    /// Map the priority onto MPS's client priority and the SM share onto its active-thread
    /// percentage (the spatial mode), unless the environment already sets them.
    #[default]
    Auto,
    /// Leave MPS's own settings alone; shares stay time-based.
    Off,
}

impl std::str::FromStr for MpsMode {
    type Err = String;
    fn from_str(text: &str) -> Result<MpsMode, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" | "on" | "1" => Ok(MpsMode::Auto),
            "off" | "0" => Ok(MpsMode::Off),
            _ => Err("expected auto or off".into()),
        }
    }
}

impl Settings {
    /// True when these settings ask for a slice of some kind (a group, a memory limit or an SM
    /// share): only then does the shim change what NVML tells the process.
    pub fn asks_for_slice(&self) -> bool {
        self.group.is_some() || !self.memory_limit.is_unset() || !self.sm_share.is_unset()
    }

    /// The memory limit for CUDA device ordinal `device`, if any.
    pub fn memory_limit(&self, device: u32) -> Option<&Sourced<u64>> {
        self.memory_limit.get(device)
    }

    /// The SM share for device `device`, in percent; `None` when not throttled.
    pub fn sm_share(&self, device: u32) -> Option<u32> {
        self.sm_share.get(device).map(|s| s.value).filter(|&p| p < 100)
    }

    /// The cap over the share on device `device` as the ledger stores it (`GroupDevice::cap`):
    /// 0 when none is given (the share is the cap), 100 for no cap.
    pub fn sm_max(&self, device: u32) -> u32 {
        self.sm_max.get(device).map_or(0, |s| s.value)
    }

    /// True when no memory limit is set for any device.
    pub fn is_unlimited(&self) -> bool {
        self.memory_limit.is_unset()
    }

    /// One line for the log: what applies and where it came from.
    pub fn describe(&self) -> String {
        let mut parts = self.memory_limit.describe("memory", |b| format_size(*b));
        parts.extend(self.sm_share.describe("SM share", |p| format!("{p}%")));
        parts.extend(self.sm_max.describe("SM cap", |p| describe_cap(*p)));
        if let Some(p) = &self.priority {
            parts.push(format!("priority {} (from {})", p.value, p.origin));
        }
        if let Some(g) = &self.group {
            parts.push(format!("group {g:?}"));
        }
        if self.priority_gate != PriorityGate::On {
            parts.push(format!("priority gate {} (from {ENV_PRIORITY_GATE})", self.priority_gate));
        }
        if parts.is_empty() {
            "no limits".to_string()
        } else {
            parts.join("; ")
        }
    }

    /// The values alone, without where each came from (one section of a file).
    pub fn describe_values(&self) -> String {
        let mut parts = Vec::new();
        let per_device = |what: &str, v: &PerDevice<String>, parts: &mut Vec<String>| {
            if let Some(all) = &v.all {
                parts.push(format!("{what} {}", all.value));
            }
            for (dev, x) in &v.device {
                parts.push(format!("{what} {} on device {dev}", x.value));
            }
        };
        per_device("memory", &self.memory_limit.map(|b| format_size(*b)), &mut parts);
        per_device("SM share", &self.sm_share.map(|p| format!("{p}%")), &mut parts);
        per_device("SM cap", &self.sm_max.map(|p| describe_cap(*p)), &mut parts);
        if let Some(p) = &self.priority {
            parts.push(format!("priority {}", p.value));
        }
        if parts.is_empty() {
            "no limits".into()
        } else {
            parts.join("; ")
        }
    }

    /// Resolves settings from environment pairs, reading the `GPUSLICE_CONFIG` file if named.
    pub fn from_env<I>(vars: I) -> Result<Settings, SettingsError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let file = match lookup(&vars, ENV_CONFIG) {
            Some(path) => Some(FileSettings::read(path)?),
            None => None,
        };
        Self::resolve(&vars, file)
    }

    /// Resolves settings from environment pairs and an already-read file.
    ///
    /// With `GPUSLICE_GROUP` naming a group of the file, that group's settings stand over the
    /// file's defaults (what a controller reading the same file would apply to the group).
    pub fn resolve(vars: &[(String, String)], file: Option<FileSettings>) -> Result<Settings, SettingsError> {
        let group = lookup(vars, ENV_GROUP).map(|g| g.trim().to_string());
        if let Some(g) = &group {
            // The error shows the value as written (spaces included), not as trimmed.
            let written = || lookup(vars, ENV_GROUP).unwrap_or_default().to_string();
            check_group_name(g).map_err(|reason| SettingsError { origin: ENV_GROUP.into(), value: written(), reason })?;
        }
        let mut settings = match file {
            Some(mut f) => {
                let named = group.as_ref().and_then(|g| f.groups.remove(g));
                match named {
                    Some(g) => f.settings.overlaid_by(g),
                    None => f.settings,
                }
            }
            None => Settings::default(),
        };
        settings.memory_limit.resolve_env(vars, ENV_MEMORY_LIMIT, Some(HAMI_MEMORY_LIMIT), |name, value| parse_env_size(name, value).map(Some))?;
        settings.sm_share.resolve_env(vars, ENV_SM_SHARE, Some(HAMI_SM_LIMIT), parse_env_share)?;
        // HAMi has no cap of its own: its CUDA_DEVICE_SM_LIMIT is a share that is also the cap.
        settings.sm_max.resolve_env(vars, ENV_SM_MAX, None, |name, value| {
            parse_cap(value).map(|p| Some(Sourced { value: p, origin: name.to_string() })).map_err(|reason| SettingsError {
                origin: name.to_string(),
                value: value.to_string(),
                reason,
            })
        })?;
        if let Some(value) = lookup(vars, ENV_PRIORITY) {
            let p = value.parse::<Priority>().map_err(|reason| SettingsError { origin: ENV_PRIORITY.into(), value: value.into(), reason })?;
            settings.priority = Some(Sourced { value: p, origin: ENV_PRIORITY.into() });
        }
        if let Some(value) = lookup(vars, ENV_PRIORITY_QUEUE) {
            let n = value.trim().parse::<u32>().ok().filter(|n| (1..=64).contains(n)).ok_or_else(|| SettingsError {
                origin: ENV_PRIORITY_QUEUE.into(),
                value: value.into(),
                reason: "expected a number of launches from 1 to 64".into(),
            })?;
            settings.priority_queue = Some(n);
        }
        if let Some(value) = lookup(vars, ENV_MPS) {
            settings.mps = value.parse().map_err(|reason| SettingsError { origin: ENV_MPS.into(), value: value.into(), reason })?;
        }
        if let Some(value) = lookup(vars, ENV_PRIORITY_GATE) {
            settings.priority_gate = value.parse().map_err(|reason| SettingsError { origin: ENV_PRIORITY_GATE.into(), value: value.into(), reason })?;
        }
        settings.group = group;
        Ok(settings)
    }

    /// These settings with `over`'s wherever `over` sets something.
    pub fn overlaid_by(mut self, over: Settings) -> Settings {
        if over.memory_limit.all.is_some() {
            self.memory_limit.all = over.memory_limit.all;
            self.memory_limit.device.clear();
        }
        self.memory_limit.device.extend(over.memory_limit.device);
        if over.sm_share.all.is_some() {
            self.sm_share.all = over.sm_share.all;
            self.sm_share.device.clear();
        }
        self.sm_share.device.extend(over.sm_share.device);
        if over.sm_max.all.is_some() {
            self.sm_max.all = over.sm_max.all;
            self.sm_max.device.clear();
        }
        self.sm_max.device.extend(over.sm_max.device);
        if over.priority.is_some() {
            self.priority = over.priority;
        }
        self
    }
}

/// The environment as the settings read it, from `std::env::vars_os()`. A variable the
/// settings read (limits, shares, priority, group, config file) whose name or value is not
/// UTF-8 is an error naming it: skipping it would silently mean "no limit". Other variables
/// that are not UTF-8 are none of ours and are left out.
pub fn env_pairs<I>(vars: I) -> Result<Vec<(String, String)>, SettingsError>
where
    I: IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
{
    use std::os::unix::ffi::OsStrExt;
    let read_by_settings = |name: &[u8]| {
        [ENV_MEMORY_LIMIT, HAMI_MEMORY_LIMIT, ENV_SM_SHARE, HAMI_SM_LIMIT, ENV_SM_MAX].iter().any(|p| name.starts_with(p.as_bytes()))
            || [ENV_CONFIG, ENV_GROUP, ENV_PRIORITY, ENV_PRIORITY_QUEUE, ENV_PRIORITY_GATE].iter().any(|n| name == n.as_bytes())
    };
    let mut out = Vec::new();
    for (name, value) in vars {
        match (name.to_str(), value.to_str()) {
            (Some(n), Some(v)) => out.push((n.to_string(), v.to_string())),
            _ if read_by_settings(name.as_bytes()) => {
                return Err(SettingsError {
                    origin: name.to_string_lossy().into_owned(),
                    value: value.to_string_lossy().into_owned(),
                    reason: "not valid UTF-8 (the bytes that are not are shown as \u{FFFD})".into(),
                })
            }
            _ => {}
        }
    }
    Ok(out)
}

fn lookup<'a>(vars: &'a [(String, String)], name: &str) -> Option<&'a str> {
    vars.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.trim().is_empty())
}

fn parse_env_size(name: &str, value: &str) -> Result<Sourced<u64>, SettingsError> {
    parse_size(value).map(|bytes| Sourced { value: bytes, origin: name.to_string() }).map_err(|e| SettingsError {
        origin: name.to_string(),
        value: value.to_string(),
        reason: e.to_string(),
    })
}

/// Parses a share in percent: `30` or `30%`, 1..=100.
pub fn parse_share(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let digits = t.strip_suffix('%').unwrap_or(t).trim();
    match digits.parse::<u32>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        Ok(_) => Err("a share is a percentage of the device's time from 1 to 100".to_string()),
        Err(_) => Err("expected a whole percentage from 1 to 100, such as 30 or 30%".to_string()),
    }
}

/// Parses a cap over the share (issue 18): a share, or `none` (= 100: no cap).
pub fn parse_cap(text: &str) -> Result<u32, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "none" | "unlimited" => Ok(100),
        _ => parse_share(text).map_err(|e| format!("{e}; or `none` for no cap")),
    }
}

/// A cap as `ls` and the log show it.
pub fn describe_cap(cap: u32) -> String {
    if cap >= 100 {
        "none".into()
    } else {
        format!("{cap}%")
    }
}

fn parse_env_share(name: &str, value: &str) -> Result<Option<Sourced<u32>>, SettingsError> {
    // HAMi writes 0 for "no limit"; our own variable has no such meaning for 0.
    if name.starts_with(HAMI_SM_LIMIT) && value.trim() == "0" {
        return Ok(None);
    }
    parse_share(value).map(|p| Some(Sourced { value: p, origin: name.to_string() })).map_err(|reason| SettingsError {
        origin: name.to_string(),
        value: value.to_string(),
        reason,
    })
}

/// A TOML config file: defaults for every process, named groups, and the controller's paths.
///
/// ```toml
/// [controller]
/// socket = "/run/gpuslice/gpuslice.sock"
/// ledger = "/dev/shm/gpuslice/ledger"
/// metrics = "127.0.0.1:9400"   # serve --metrics; off when absent
///
/// [defaults]
/// memory_limit = "8GiB"
///
/// [groups.inference]
/// memory_limit = "6GiB"
/// sm_share = 50
/// priority = "high"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    pub settings: Settings,
    pub groups: BTreeMap<String, Settings>,
    pub controller: ControllerFile,
    /// `[groups.X] suspendable = true` (issue 22): the controller may suspend the group for a
    /// higher-priority one; `allow_exports = true` even while it exports memory.
    pub suspendable: BTreeMap<String, Suspendability>,
    /// The per-device keys of group sections (`[groups.X.devices.N]`), each worded as the
    /// controller refuses it (`for_controller`). A process alone reads them for its own CUDA
    /// devices; the controller cannot apply them, so it does not start with them.
    pub group_device_keys: Vec<SettingsError>,
}

/// A group's `suspendable`, `allow_exports` and `suspend_path` in the config file (issue 22).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Suspendability {
    pub suspendable: bool,
    pub allow_exports: bool,
    pub path: SuspendPath,
}

/// How a group's processes are suspended (`[groups.X] suspend_path`, `gpuslice set
/// --suspend-path`): by the driver's checkpoint, by their own shim's agent (their memory is then
/// VMM-backed from their first allocation), or each by the shim where it can and the driver
/// where not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SuspendPath {
    #[default]
    Driver,
    Shim,
    Auto,
}

impl SuspendPath {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspendPath::Driver => "driver",
            SuspendPath::Shim => "shim",
            SuspendPath::Auto => "auto",
        }
    }
}

impl std::str::FromStr for SuspendPath {
    type Err = String;
    fn from_str(s: &str) -> Result<SuspendPath, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "driver" => Ok(SuspendPath::Driver),
            "shim" => Ok(SuspendPath::Shim),
            "auto" => Ok(SuspendPath::Auto),
            _ => Err(format!("{s:?} is not a suspend path; use auto, shim or driver")),
        }
    }
}

/// The `[controller]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerFile {
    pub socket: Option<String>,
    pub ledger: Option<String>,
    pub metrics: Option<String>,
    /// Issue 19: `mps = "off" | "auto" | "on"`, the managed spatial mode of every GPU.
    pub mps: Option<MpsPolicy>,
    /// `[controller.mps_devices]`: the same per GPU, by UUID (over `mps`).
    pub mps_devices: BTreeMap<String, MpsPolicy>,
}

/// Whether the operator lets a GPU run its processes over MPS (issue 19's managed spatial
/// mode, `serve --mps`, `[controller] mps`): MPS gives up fault isolation between processes,
/// so only where this allows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MpsPolicy {
    /// Time-slicing only; no daemon.
    #[default]
    Off,
    /// A daemon runs; the controller chooses MPS or time-slicing by its rule (LD_PRELOAD.md).
    Auto,
    /// A daemon runs and every process of the GPU is sent to it.
    On,
}

impl MpsPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            MpsPolicy::Off => "off",
            MpsPolicy::Auto => "auto",
            MpsPolicy::On => "on",
        }
    }
}

impl std::str::FromStr for MpsPolicy {
    type Err = String;
    fn from_str(text: &str) -> Result<MpsPolicy, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "off" => Ok(MpsPolicy::Off),
            "auto" => Ok(MpsPolicy::Auto),
            "on" => Ok(MpsPolicy::On),
            _ => Err(format!("{text:?} is not an MPS policy; use off, auto or on")),
        }
    }
}

/// The file as TOML gives it: values keep their place in the text (`Spanned`), so that a value
/// error names the line and column as a syntax error does.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    defaults: Option<LimitsDoc>,
    #[serde(default)]
    groups: BTreeMap<String, LimitsDoc>,
    #[serde(default)]
    controller: Option<ControllerDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControllerDoc {
    socket: Option<Spanned<TextDoc>>,
    ledger: Option<Spanned<TextDoc>>,
    metrics: Option<Spanned<TextDoc>>,
    mps: Option<Spanned<TextDoc>>,
    #[serde(default)]
    mps_devices: BTreeMap<String, Spanned<TextDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsDoc {
    memory_limit: Option<Spanned<SizeDoc>>,
    sm_share: Option<Spanned<ShareDoc>>,
    sm_max: Option<Spanned<ShareDoc>>,
    priority: Option<Spanned<TextDoc>>,
    #[serde(default)]
    devices: BTreeMap<String, DeviceDoc>,
    /// Groups only (issue 22).
    suspendable: Option<Spanned<bool>>,
    allow_exports: Option<Spanned<bool>>,
    suspend_path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceDoc {
    memory_limit: Option<Spanned<SizeDoc>>,
    sm_share: Option<Spanned<ShareDoc>>,
    sm_max: Option<Spanned<ShareDoc>>,
}

/// A size in the file: text such as "4GiB", or a whole number of bytes.
enum SizeDoc {
    Bytes(u64),
    Text(String),
}

impl SizeDoc {
    fn text(&self) -> String {
        match self {
            SizeDoc::Bytes(b) => b.to_string(),
            SizeDoc::Text(t) => t.clone(),
        }
    }
}

impl NumberOrText for SizeDoc {
    const EXPECTING: &'static str = "a size such as \"4GiB\" or a whole number of bytes";
    fn number(v: i128) -> Option<SizeDoc> {
        u64::try_from(v).ok().map(SizeDoc::Bytes)
    }
    fn text(v: &str) -> SizeDoc {
        SizeDoc::Text(v.to_string())
    }
}

impl<'de> Deserialize<'de> for SizeDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SizeDoc, D::Error> {
        d.deserialize_any(NumberOrTextVisitor(std::marker::PhantomData))
    }
}

/// An SM share in the file: `30` or `"30%"`; the range is checked afterwards, with the place.
enum ShareDoc {
    Number(i64),
    Text(String),
}

impl NumberOrText for ShareDoc {
    const EXPECTING: &'static str = "an SM share: a whole percentage from 1 to 100, such as 30";
    fn number(v: i128) -> Option<ShareDoc> {
        Some(ShareDoc::Number(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn text(v: &str) -> ShareDoc {
        ShareDoc::Text(v.to_string())
    }
}

impl<'de> Deserialize<'de> for ShareDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ShareDoc, D::Error> {
        d.deserialize_any(NumberOrTextVisitor(std::marker::PhantomData))
    }
}

/// A value in the file that is a whole number or text (a size, a share): what an error calls
/// it, and what each form becomes (`number` gives `None` for one out of its range).
trait NumberOrText: Sized {
    const EXPECTING: &'static str;
    fn number(v: i128) -> Option<Self>;
    fn text(v: &str) -> Self;
}

struct NumberOrTextVisitor<T>(std::marker::PhantomData<T>);

impl<T: NumberOrText> serde::de::Visitor<'_> for NumberOrTextVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        T::number(v.into()).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        T::number(v.into()).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        Ok(T::text(v))
    }
}

impl ShareDoc {
    fn text(&self) -> String {
        match self {
            ShareDoc::Number(n) => n.to_string(),
            ShareDoc::Text(t) => t.clone(),
        }
    }
}

/// A text value (priority, paths, the metrics address); a number or a table there says what
/// was expected in words.
struct TextDoc(String);

impl<'de> Deserialize<'de> for TextDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TextDoc, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = TextDoc;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text in quotes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TextDoc, E> {
                Ok(TextDoc(v.to_string()))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Where a value sits in the file: its path, line and column (1-based), and its key.
struct Place<'a> {
    path: &'a str,
    text: &'a str,
}

impl Place<'_> {
    /// `path: line L, column C: key`, worded as TOML's own errors are.
    fn of(&self, span: std::ops::Range<usize>, key: &str) -> String {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("{}: line {line}, column {column}: {key}", self.path)
    }
}

/// A metrics address as the file may give it: `host:port`, or `off`. Checked without a name
/// lookup (the controller resolves it when it binds).
pub fn check_metrics_address(addr: &str) -> Result<(), String> {
    if addr.is_empty() || addr == "off" {
        return Ok(());
    }
    let port_ok = |host: &str, port: &str| !host.is_empty() && port.parse::<u16>().is_ok();
    let ok = match addr.strip_prefix('[') {
        Some(rest) => rest.split_once("]:").is_some_and(|(host, port)| port_ok(host, port)),
        None => addr.rsplit_once(':').is_some_and(|(host, port)| port_ok(host, port) && !host.contains(':')),
    };
    if ok {
        Ok(())
    } else {
        Err("not a host:port address such as 127.0.0.1:9400 (or [::1]:9400), nor `off`".into())
    }
}

impl FileSettings {
    /// Reads and checks a config file named by `GPUSLICE_CONFIG`; errors name the file, and
    /// TOML errors carry line and column.
    pub fn read(path: &str) -> Result<FileSettings, SettingsError> {
        Self::read_as(ENV_CONFIG, path)
    }

    /// The same for a file named some other way (`origin`: "config file", a flag), so that the
    /// message names what the user actually wrote.
    pub fn read_as(origin: &str, path: &str) -> Result<FileSettings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError {
            origin: origin.to_string(),
            value: path.to_string(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        Self::parse_as(origin, path, &text)
    }

    /// Parses config text; `path` is only used in messages.
    pub fn parse(path: &str, text: &str) -> Result<FileSettings, SettingsError> {
        Self::parse_as(ENV_CONFIG, path, text)
    }

    fn parse_as(origin: &str, path: &str, text: &str) -> Result<FileSettings, SettingsError> {
        let doc: FileDoc = toml::from_str(text).map_err(|e| SettingsError {
            origin: origin.to_string(),
            value: path.to_string(),
            reason: format!("invalid config file: {}", one_line(&e.to_string())),
        })?;
        let place = Place { path, text };
        let settings = match doc.defaults {
            Some(d) => {
                if let Some(flag) = d.suspendable.as_ref().or(d.allow_exports.as_ref()) {
                    let reason = "suspendable and allow_exports are settings of a group ([groups.NAME]), not of [defaults]".to_string();
                    return Err(SettingsError { origin: place.of(flag.span(), "defaults"), value: flag.get_ref().to_string(), reason });
                }
                if let Some(path) = &d.suspend_path {
                    let reason = "suspend_path is a setting of a group ([groups.NAME]), not of [defaults]".to_string();
                    return Err(SettingsError { origin: place.of(path.span(), "defaults"), value: path.get_ref().clone(), reason });
                }
                limits(&place, "defaults", d)?
            }
            None => Settings::default(),
        };
        let mut groups = BTreeMap::new();
        let mut suspendable = BTreeMap::new();
        let mut group_device_keys = Vec::new();
        for (name, doc) in doc.groups {
            let key = format!("groups.{name}");
            check_group_name(&name).map_err(|reason| SettingsError { origin: format!("{path}: [{key}]"), value: name.clone(), reason })?;
            let path = match &doc.suspend_path {
                None => SuspendPath::default(),
                Some(p) => p.get_ref().parse().map_err(|reason| SettingsError { origin: place.of(p.span(), &key), value: p.get_ref().clone(), reason })?,
            };
            let flags = Suspendability {
                suspendable: doc.suspendable.as_ref().is_some_and(|b| *b.get_ref()),
                allow_exports: doc.allow_exports.as_ref().is_some_and(|b| *b.get_ref()),
                path,
            };
            if flags != Suspendability::default() {
                suspendable.insert(name.clone(), flags);
            }
            group_device_keys.extend(device_keys_of_group(&place, &name, &doc.devices));
            groups.insert(name, limits(&place, &key, doc)?);
        }
        let controller = match doc.controller {
            Some(c) => controller(&place, c)?,
            None => ControllerFile::default(),
        };
        Ok(FileSettings { settings, groups, controller, suspendable, group_device_keys })
    }

    /// Whether the controller can apply this file as written: not with per-device keys in a
    /// group's section. Those name CUDA device numbers as one process counts them, and the
    /// processes of a group may count the GPUs differently (`CUDA_VISIBLE_DEVICES`), so the
    /// controller gives a group one value on every GPU; applying only that, as it once did
    /// silently, would leave the group without the limit its section gives the one device.
    /// `serve` and `check-config` both refuse the file with this text (one line a key).
    pub fn for_controller(&self) -> Result<(), String> {
        if self.group_device_keys.is_empty() {
            return Ok(());
        }
        Err(self.group_device_keys.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
    }

    /// Every section, one line each, for `gpuslice check-config`: what the controller and the
    /// processes would take from this file.
    pub fn describe(&self) -> Vec<String> {
        let c = &self.controller;
        let or_default = |v: &Option<String>, default: &str| v.clone().unwrap_or_else(|| format!("{default} (default)"));
        let mut mps = c.mps.unwrap_or_default().as_str().to_string();
        for (uuid, p) in &c.mps_devices {
            mps.push_str(&format!(", {} on {uuid}", p.as_str()));
        }
        let mut lines = vec![
            format!(
                "[controller] socket {}; ledger {}; metrics {}; mps {mps}",
                or_default(&c.socket, crate::protocol::DEFAULT_SOCKET),
                or_default(&c.ledger, crate::protocol::DEFAULT_LEDGER),
                c.metrics.clone().filter(|m| !m.is_empty() && m != "off").unwrap_or_else(|| "off".into())
            ),
            format!("[defaults] {}", self.settings.describe_values()),
        ];
        if self.groups.is_empty() {
            lines.push("[groups] none".into());
        }
        for (name, g) in &self.groups {
            lines.push(format!("[groups.{name}] {}", g.describe_values()));
        }
        lines
    }
}

/// A TOML error on one line: its "at line L, column C" heading and its message, without the
/// quoted source between them (a shim's error goes to the host program's stderr: one line).
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
    match (lines.first(), lines.last()) {
        (Some(first), Some(last)) if lines.len() > 1 => format!("{first}: {last}"),
        _ => message.trim().to_string(),
    }
}

/// The settings one `[defaults]` or `[groups.NAME]` table gives.
fn limits(place: &Place<'_>, table: &str, doc: LimitsDoc) -> Result<Settings, SettingsError> {
    let mut out = Settings::default();
    if let Some(size) = doc.memory_limit {
        out.memory_limit.all = Some(file_size(place, &format!("{table}.memory_limit"), size)?);
    }
    if let Some(share) = doc.sm_share {
        out.sm_share.all = Some(file_share(place, &format!("{table}.sm_share"), share)?);
    }
    if let Some(cap) = doc.sm_max {
        out.sm_max.all = Some(file_cap(place, &format!("{table}.sm_max"), cap)?);
    }
    if let Some(p) = doc.priority {
        let key = format!("{table}.priority");
        let span = p.span();
        let text = p.into_inner().0;
        let value = text.parse::<Priority>().map_err(|reason| SettingsError { origin: place.of(span, &key), value: text.clone(), reason })?;
        out.priority = Some(Sourced { value, origin: format!("{}: {key}", place.path) });
    }
    for (key, device) in doc.devices {
        let origin = format!("{table}.devices.{key}");
        let number: u32 = key.parse().map_err(|_| SettingsError {
            origin: format!("{}: [{origin}]", place.path),
            value: key.clone(),
            reason: format!("device keys are CUDA device numbers: [{table}.devices.0]"),
        })?;
        if let Some(size) = device.memory_limit {
            out.memory_limit.device.insert(number, file_size(place, &format!("{origin}.memory_limit"), size)?);
        }
        if let Some(share) = device.sm_share {
            out.sm_share.device.insert(number, file_share(place, &format!("{origin}.sm_share"), share)?);
        }
        if let Some(cap) = device.sm_max {
            out.sm_max.device.insert(number, file_cap(place, &format!("{origin}.sm_max"), cap)?);
        }
    }
    Ok(out)
}

/// The per-device keys of group `group`'s section, each as the controller's refusal: where it
/// is, what it says, and what to write instead (`FileSettings::for_controller`).
fn device_keys_of_group(place: &Place<'_>, group: &str, devices: &BTreeMap<String, DeviceDoc>) -> Vec<SettingsError> {
    let mut out = Vec::new();
    for (device, doc) in devices {
        let keys = [
            ("memory_limit", "--memory", doc.memory_limit.as_ref().map(|v| (v.span(), v.get_ref().text()))),
            ("sm_share", "--sm", doc.sm_share.as_ref().map(|v| (v.span(), v.get_ref().text()))),
            ("sm_max", "--sm-max", doc.sm_max.as_ref().map(|v| (v.span(), v.get_ref().text()))),
        ];
        for (key, flag, found) in keys {
            let Some((span, value)) = found else { continue };
            let reason = group_device_key_reason(group, device, key, flag, &value);
            out.push(SettingsError { origin: place.of(span, &format!("groups.{group}.devices.{device}.{key}")), value, reason });
        }
    }
    out
}

/// Why the controller does not take `[groups.GROUP.devices.DEVICE] KEY`, and what to write.
fn group_device_key_reason(group: &str, device: &str, key: &str, flag: &str, value: &str) -> String {
    format!(
        "the controller gives a group one {key} on every GPU and does not apply per-device keys in a group's section \
         (devices.{device} is a CUDA device number as one process counts them, and the processes of group {group:?} may \
         count the GPUs differently, e.g. under CUDA_VISIBLE_DEVICES): write {key} in [groups.{group}] itself for every \
         GPU, or give one GPU its own live with `gpuslice set --group {group} --device INDEX {flag} {value}` (INDEX: the \
         GPU's device index in `gpuslice status`); per-device keys belong in [defaults.devices.N]"
    )
}

/// The `[controller]` table, its metrics address checked here so that `check-config` refuses
/// what `serve` would.
fn controller(place: &Place<'_>, doc: ControllerDoc) -> Result<ControllerFile, SettingsError> {
    let text = |v: Option<Spanned<TextDoc>>| v.map(|v| v.into_inner().0);
    if let Some(m) = &doc.metrics {
        check_metrics_address(&m.get_ref().0).map_err(|reason| SettingsError {
            origin: place.of(m.span(), "controller.metrics"),
            value: m.get_ref().0.clone(),
            reason,
        })?;
    }
    let policy = |key: &str, v: Spanned<TextDoc>| {
        let span = v.span();
        let written = v.into_inner().0;
        written.parse::<MpsPolicy>().map_err(|reason| SettingsError { origin: place.of(span, key), value: written.clone(), reason })
    };
    let mps = doc.mps.map(|v| policy("controller.mps", v)).transpose()?;
    let mut mps_devices = BTreeMap::new();
    for (uuid, v) in doc.mps_devices {
        let key = format!("controller.mps_devices.{uuid}");
        if !(uuid.starts_with("GPU-") || uuid.starts_with("MIG-")) {
            let reason = "the keys of [controller.mps_devices] are device UUIDs (GPU-... or MIG-..., as nvidia-smi -L prints them)".to_string();
            return Err(SettingsError { origin: place.of(v.span(), &key), value: uuid, reason });
        }
        mps_devices.insert(uuid, policy(&key, v)?);
    }
    Ok(ControllerFile { socket: text(doc.socket), ledger: text(doc.ledger), metrics: text(doc.metrics), mps, mps_devices })
}

fn file_size(place: &Place<'_>, key: &str, size: Spanned<SizeDoc>) -> Result<Sourced<u64>, SettingsError> {
    let origin = format!("{}: {key}", place.path);
    let span = size.span();
    let text = match size.into_inner() {
        SizeDoc::Bytes(0) => "0".to_string(),
        SizeDoc::Bytes(b) => return Ok(Sourced { value: b, origin }),
        SizeDoc::Text(t) => t,
    };
    parse_size(&text).map(|value| Sourced { value, origin }).map_err(|e| SettingsError { origin: place.of(span, key), value: text, reason: e.to_string() })
}

fn file_cap(place: &Place<'_>, key: &str, cap: Spanned<ShareDoc>) -> Result<Sourced<u32>, SettingsError> {
    let origin = format!("{}: {key}", place.path);
    let text = cap.get_ref().text();
    parse_cap(&text).map(|value| Sourced { value, origin }).map_err(|reason| SettingsError { origin: place.of(cap.span(), key), value: text, reason })
}

fn file_share(place: &Place<'_>, key: &str, share: Spanned<ShareDoc>) -> Result<Sourced<u32>, SettingsError> {
    let origin = format!("{}: {key}", place.path);
    let text = share.get_ref().text();
    parse_share(&text).map(|value| Sourced { value, origin }).map_err(|reason| SettingsError { origin: place.of(share.span(), key), value: text, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn limit(s: &Settings, dev: u32) -> Option<u64> {
        s.memory_limit(dev).map(|l| l.value)
    }

    #[test]
    fn nothing_set_means_no_limit() {
        let s = Settings::resolve(&env(&[("PATH", "/bin")]), None).unwrap();
        assert!(s.is_unlimited());
        assert_eq!(limit(&s, 0), None);
    }

    #[test]
    fn precedence_per_device_then_global_then_hami() {
        let s = Settings::resolve(
            &env(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
                ("GPUSLICE_MEMORY_LIMIT", "2GiB"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "3g"),
                ("GPUSLICE_MEMORY_LIMIT_2", "4GiB"),
                ("CUDA_DEVICE_MEMORY_LIMIT_2", "5g"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(limit(&s, 0), Some(2 << 30));
        assert_eq!(limit(&s, 1), Some(3 << 30));
        assert_eq!(limit(&s, 2), Some(4 << 30));
        assert_eq!(s.memory_limit(2).unwrap().origin, "GPUSLICE_MEMORY_LIMIT_2");
    }

    #[test]
    fn hami_spelling_alone_works() {
        let s = Settings::resolve(&env(&[("CUDA_DEVICE_MEMORY_LIMIT", "4g")]), None).unwrap();
        assert_eq!(limit(&s, 7), Some(4 << 30));
        // HAMi's other variables under the same prefix are not ours to judge.
        Settings::resolve(&env(&[("CUDA_DEVICE_MEMORY_LIMIT_X", "?")]), None).unwrap();
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Settings::resolve(&env(&[("GPUSLICE_MEMORY_LIMIT", "4 GB x")]), None).unwrap_err();
        assert_eq!(e.origin, "GPUSLICE_MEMORY_LIMIT");
        assert!(e.to_string().contains("4 GB x"));
        let e = Settings::resolve(&env(&[("GPUSLICE_MEMORY_LIMIT_zero", "1g")]), None).unwrap_err();
        assert!(e.reason.contains("device number"), "{e}");
        assert!(Settings::resolve(&env(&[("CUDA_DEVICE_MEMORY_LIMIT_0", "-1")]), None).is_err());
    }

    #[test]
    fn empty_is_unset() {
        let s = Settings::resolve(&env(&[("GPUSLICE_MEMORY_LIMIT", "")]), None).unwrap();
        assert!(s.is_unlimited());
    }

    #[test]
    fn file_values_and_environment_wins() {
        let text = "[defaults]\nmemory_limit = \"1GiB\"\n[defaults.devices.1]\nmemory_limit = 2147483648\n";
        let file = FileSettings::parse("/etc/gpuslice/config.toml", text).unwrap();
        let s = Settings::resolve(&[], Some(file.clone())).unwrap();
        assert_eq!(limit(&s, 0), Some(1 << 30));
        assert_eq!(limit(&s, 1), Some(2 << 30));
        let s = Settings::resolve(&env(&[("GPUSLICE_MEMORY_LIMIT", "3g")]), Some(file.clone())).unwrap();
        assert_eq!(limit(&s, 1), Some(3 << 30));
        let s = Settings::resolve(&env(&[("GPUSLICE_MEMORY_LIMIT_0", "3g")]), Some(file)).unwrap();
        assert_eq!(limit(&s, 0), Some(3 << 30));
        assert_eq!(limit(&s, 1), Some(2 << 30));
    }

    #[test]
    fn shares_from_env_hami_and_file() {
        let s = Settings::resolve(&env(&[("GPUSLICE_SM_SHARE", "30")]), None).unwrap();
        assert_eq!(s.sm_share(0), Some(30));
        let s = Settings::resolve(&env(&[("CUDA_DEVICE_SM_LIMIT", "45%")]), None).unwrap();
        assert_eq!(s.sm_share(3), Some(45));
        let s = Settings::resolve(&env(&[("CUDA_DEVICE_SM_LIMIT", "0")]), None).unwrap();
        assert_eq!(s.sm_share(0), None, "HAMi's 0 means no limit");
        let s = Settings::resolve(&env(&[("GPUSLICE_SM_SHARE", "100")]), None).unwrap();
        assert_eq!(s.sm_share(0), None, "100 means not throttled");
        let s = Settings::resolve(&env(&[("GPUSLICE_SM_SHARE", "30"), ("GPUSLICE_SM_MAX", "none"), ("GPUSLICE_SM_MAX_1", "60%")]), None).unwrap();
        assert_eq!((s.sm_share(0), s.sm_max(0), s.sm_max(1), s.sm_max(2)), (Some(30), 100, 60, 100), "issue 18: a cap per device");
        assert_eq!(Settings::resolve(&env(&[("GPUSLICE_SM_SHARE", "30")]), None).unwrap().sm_max(0), 0, "no cap given: the share is the cap");
        assert!(Settings::resolve(&env(&[("GPUSLICE_SM_MAX", "0")]), None).is_err());
        let s = Settings::resolve(&env(&[("GPUSLICE_SM_SHARE", "50"), ("GPUSLICE_SM_SHARE_1", "20")]), None).unwrap();
        assert_eq!((s.sm_share(0), s.sm_share(1)), (Some(50), Some(20)));
        for bad in ["0", "101", "-5", "half", "30.5"] {
            let e = Settings::resolve(&env(&[("GPUSLICE_SM_SHARE", bad)]), None).unwrap_err();
            assert_eq!(e.origin, "GPUSLICE_SM_SHARE", "{bad}");
        }
        let file = FileSettings::parse("f.toml", "[defaults]\nsm_share = 40\n[defaults.devices.2]\nsm_share = 10\n").unwrap();
        let s = Settings::resolve(&[], Some(file)).unwrap();
        assert_eq!((s.sm_share(0), s.sm_share(2)), (Some(40), Some(10)));
        assert!(FileSettings::parse("f.toml", "[defaults]\nsm_share = 0\n").is_err());
        assert!(s.describe().contains("SM share 40%"), "{}", s.describe());
    }

    #[test]
    fn groups_priority_and_controller_sections() {
        let text = "[controller]\nsocket = \"/tmp/s\"\n[defaults]\nmemory_limit = \"1GiB\"\npriority = \"low\"\n[groups.infer]\nmemory_limit = \"6GiB\"\nsm_share = 30\npriority = \"high\"\n";
        let file = FileSettings::parse("c.toml", text).unwrap();
        assert_eq!(file.controller.socket.as_deref(), Some("/tmp/s"));
        assert_eq!(limit(&file.groups["infer"], 0), Some(6 << 30));
        let s = Settings::resolve(&env(&[("GPUSLICE_GROUP", "infer")]), Some(file.clone())).unwrap();
        assert_eq!((limit(&s, 0), s.sm_share(0), s.priority.as_ref().map(|p| p.value)), (Some(6 << 30), Some(30), Some(Priority::High)));
        assert_eq!(s.group.as_deref(), Some("infer"));
        let s = Settings::resolve(&env(&[("GPUSLICE_GROUP", "other"), ("GPUSLICE_PRIORITY", "normal")]), Some(file.clone())).unwrap();
        assert_eq!((limit(&s, 0), s.priority.map(|p| p.value)), (Some(1 << 30), Some(Priority::Normal)));
        let e = Settings::resolve(&env(&[("GPUSLICE_PRIORITY", "urgent")]), None).unwrap_err();
        assert_eq!(e.origin, "GPUSLICE_PRIORITY");
        for bad in ["0", "65", "abc"] {
            let e = Settings::resolve(&env(&[("GPUSLICE_PRIORITY_QUEUE", bad)]), None).unwrap_err();
            assert_eq!(e.origin, "GPUSLICE_PRIORITY_QUEUE");
        }
        assert_eq!(Settings::resolve(&env(&[("GPUSLICE_PRIORITY_QUEUE", "4")]), None).unwrap().priority_queue, Some(4));
        assert_eq!(Settings::resolve(&env(&[("GPUSLICE_MPS", "off")]), None).unwrap().mps, MpsMode::Off);
        assert_eq!(Settings::resolve(&env(&[]), None).unwrap().mps, MpsMode::Auto);
        let e = Settings::resolve(&env(&[("GPUSLICE_MPS", "sometimes")]), None).unwrap_err();
        assert_eq!(e.origin, "GPUSLICE_MPS");
        assert_eq!(Settings::resolve(&env(&[]), None).unwrap().priority_gate, PriorityGate::On);
        for (text, want) in [
            ("on", PriorityGate::On),
            ("spatial-off", PriorityGate::SpatialOff),
            (" Spatial-Off ", PriorityGate::SpatialOff),
            ("auto", PriorityGate::Auto),
            (" AUTO", PriorityGate::Auto),
        ] {
            assert_eq!(Settings::resolve(&env(&[("GPUSLICE_PRIORITY_GATE", text)]), None).unwrap().priority_gate, want, "{text:?}");
        }
        for bad in ["off", "spatial", "1", "spatial_off", "automatic"] {
            let e = Settings::resolve(&env(&[("GPUSLICE_PRIORITY_GATE", bad)]), None).unwrap_err();
            assert_eq!((e.origin.as_str(), e.reason.as_str()), ("GPUSLICE_PRIORITY_GATE", "expected on, spatial-off or auto"), "{bad:?}");
        }
        let auto = Settings::resolve(&env(&[("GPUSLICE_PRIORITY_GATE", "auto")]), None).unwrap();
        assert!(auto.describe().contains("priority gate auto (from GPUSLICE_PRIORITY_GATE)"), "{}", auto.describe());
        // A process alone's group name is the one name a user may not give a group.
        assert_eq!(solo_group_name(12), "pid-12");
        assert!(is_solo_group(&solo_group_name(12)) && !is_solo_group("train-pid-12"));
        assert!(is_solo_group(&lost_group_name(3)) && check_group_name(&lost_group_name(3)).is_err() && lost_group_name(3) != solo_group_name(3));
        assert!(check_group_name(&solo_group_name(12)).is_err() && check_group_name("train").is_ok());
        for bad in ["pid-12", "a b", ""] {
            if !bad.is_empty() {
                assert!(Settings::resolve(&env(&[("GPUSLICE_GROUP", bad)]), None).is_err(), "{bad}");
            }
        }
        let e = FileSettings::parse("c.toml", "[groups.x]\nmemory = 3\n").unwrap_err();
        assert!(e.reason.contains("line 2") && e.reason.contains("column"), "{e}");
        let e = FileSettings::parse("c.toml", "[groups.x]\npriority = \"urgent\"\n").unwrap_err();
        assert!(e.origin.contains("groups.x.priority"), "{e}");
    }

    #[test]
    fn bad_files_say_where() {
        let e = FileSettings::parse("c.toml", "[defaults]\nmemory_limit = \"1GiB\"\nmemroy = 3\n").unwrap_err();
        assert!(e.reason.contains("line 3"), "{e}");
        let e = FileSettings::parse("c.toml", "[defaults]\nmemory_limit = \"lots\"\n").unwrap_err();
        assert!(e.origin.contains("defaults.memory_limit"), "{e}");
        let e = FileSettings::parse("c.toml", "[defaults.devices.gpu0]\nmemory_limit = \"1g\"\n").unwrap_err();
        assert!(e.reason.contains("device"), "{e}");
        assert!(FileSettings::parse("c.toml", "[defaults]\nmemory_limit = 0\n").is_err());
        assert!(FileSettings::read("/nonexistent/gpuslice.toml").is_err());
    }

    #[test]
    fn value_errors_name_line_and_column_and_say_what_is_expected() {
        let e = FileSettings::parse("c.toml", "[defaults]\nmemory_limit = \"lots\"\n").unwrap_err();
        assert_eq!(e.origin, "c.toml: line 2, column 16: defaults.memory_limit", "{e}");
        let e = FileSettings::parse("c.toml", "# groups\n[groups.g]\nsm_share = 130\n").unwrap_err();
        assert_eq!(e.origin, "c.toml: line 3, column 12: groups.g.sm_share", "{e}");
        assert!(e.reason.contains("from 1 to 100"), "{e}");
        let e = FileSettings::parse("c.toml", "[groups.g]\npriority = \"urgent\"\n").unwrap_err();
        assert!(e.origin.starts_with("c.toml: line 2, column 12: "), "{e}");
        // A value of the wrong type says what an SM share is, not "expected u32".
        let e = FileSettings::parse("c.toml", "[defaults]\nsm_share = true\n").unwrap_err();
        assert!(e.reason.contains("line 2") && e.reason.contains("an SM share: a whole percentage from 1 to 100"), "{e}");
        assert!(!e.reason.contains("u32"), "{e}");
        let e = FileSettings::parse("c.toml", "[defaults]\nmemory_limit = 1.5\n").unwrap_err();
        assert!(e.reason.contains("a size such as"), "{e}");
        let e = FileSettings::parse("c.toml", "[defaults]\nmemory_limit = -1\n").unwrap_err();
        assert!(e.reason.contains("line 2, column 16") && e.reason.contains("expected a size"), "{e}");
        assert_eq!(FileSettings::parse("c.toml", "[defaults]\nsm_share = \"30%\"\n").unwrap().settings.sm_share(0), Some(30));
    }

    #[test]
    fn the_metrics_address_is_checked_in_the_file() {
        let e = FileSettings::parse("c.toml", "[controller]\nmetrics = \"bad\"\n").unwrap_err();
        assert_eq!(e.origin, "c.toml: line 2, column 11: controller.metrics", "{e}");
        assert!(e.reason.contains("host:port"), "{e}");
        for good in ["127.0.0.1:9400", "localhost:0", "[::1]:9400", "off", ""] {
            let f = FileSettings::parse("c.toml", &format!("[controller]\nmetrics = {good:?}\n")).unwrap();
            assert_eq!(f.controller.metrics.as_deref(), Some(good));
        }
        for bad in ["9400", ":9400", "host:port", "::1:9400", "[::1]", "h:70000"] {
            assert!(check_metrics_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_file_is_described_section_by_section() {
        let text = "[controller]\nmetrics = \"127.0.0.1:9400\"\n[defaults]\nmemory_limit = \"16GiB\"\n[groups.inference]\nmemory_limit = \"6GiB\"\nsm_share = 50\npriority = \"high\"\n";
        let lines = FileSettings::parse("c.toml", text).unwrap().describe();
        assert_eq!(
            lines,
            [
                "[controller] socket /run/gpuslice/gpuslice.sock (default); ledger /dev/shm/gpuslice/ledger (default); metrics 127.0.0.1:9400; mps off",
                "[defaults] memory 16.00 GiB",
                "[groups.inference] memory 6.00 GiB; SM share 50%; priority high",
            ]
        );
    }

    #[test]
    fn the_controller_table_takes_an_mps_policy_for_every_gpu_and_per_uuid() {
        let u = "GPU-5e1cc0da-9a3b-4c11-8e2f-600000000000";
        let f = FileSettings::parse("c.toml", &format!("[controller]\nmps = \"auto\"\n[controller.mps_devices]\n\"{u}\" = \"off\"\n")).unwrap();
        assert_eq!(f.controller.mps, Some(MpsPolicy::Auto));
        assert_eq!(f.controller.mps_devices.get(u), Some(&MpsPolicy::Off));
        assert!(f.describe()[0].ends_with(&format!("mps auto, off on {u}")), "{:?}", f.describe());
        let e = FileSettings::parse("c.toml", "[controller]\nmps = \"sometimes\"\n").unwrap_err();
        assert_eq!(e.origin, "c.toml: line 2, column 7: controller.mps", "{e}");
        let e = FileSettings::parse("c.toml", "[controller.mps_devices]\n0 = \"on\"\n").unwrap_err();
        assert!(e.reason.contains("device UUIDs"), "{e}");
    }

    /// Per-device keys in a group's section: a process alone applies them to its own CUDA
    /// device, and the controller refuses the file with a line per key that says where it is,
    /// why it cannot apply it and what to write instead.
    #[test]
    fn per_device_keys_of_a_group_are_refused_for_the_controller() {
        let text = "[defaults.devices.1]\nmemory_limit = \"4GiB\"\n[groups.train]\nmemory_limit = \"8GiB\"\n[groups.train.devices.1]\nmemory_limit = \"20GiB\"\nsm_share = 30\n";
        let file = FileSettings::parse("c.toml", text).unwrap();
        let alone = Settings::resolve(&env(&[("GPUSLICE_GROUP", "train")]), Some(file.clone())).unwrap();
        assert_eq!((limit(&alone, 0), limit(&alone, 1), alone.sm_share(1)), (Some(8 << 30), Some(20 << 30), Some(30)));
        let refusal = file.for_controller().unwrap_err();
        let lines: Vec<&str> = refusal.lines().collect();
        assert_eq!(lines.len(), 2, "one line a key: {refusal}");
        assert!(lines[0].starts_with("c.toml: line 6, column 16: groups.train.devices.1.memory_limit=\"20GiB\": "), "{refusal}");
        assert!(lines[1].starts_with("c.toml: line 7, column 12: groups.train.devices.1.sm_share=\"30\": "), "{refusal}");
        for want in [
            "does not apply per-device keys in a group's section",
            "processes of group \"train\" may count the GPUs differently",
            "write memory_limit in [groups.train] itself for every GPU",
            "`gpuslice set --group train --device INDEX --memory 20GiB`",
            "per-device keys belong in [defaults.devices.N]",
        ] {
            assert!(lines[0].contains(want), "{want:?} in {}", lines[0]);
        }
        assert!(lines[1].contains("--sm 30`"), "{}", lines[1]);
        let bytes = FileSettings::parse("c.toml", "[groups.g.devices.0]\nmemory_limit = 1048576\nsm_max = \"none\"\n").unwrap();
        let refusal = bytes.for_controller().unwrap_err();
        assert!(refusal.contains("--memory 1048576`") && refusal.contains("sm_max=\"none\"") && refusal.contains("--sm-max none`"), "{refusal}");
        // [defaults.devices.N] and all-device group values are what the controller takes.
        let fine = FileSettings::parse("c.toml", "[defaults.devices.1]\nmemory_limit = \"4GiB\"\n[groups.train]\nmemory_limit = \"8GiB\"\n").unwrap();
        assert_eq!(fine.for_controller(), Ok(()));
    }

    #[test]
    fn groups_may_be_suspendable_but_defaults_may_not() {
        let f = FileSettings::parse(
            "c.toml",
            "[groups.batch]\nsuspendable = true\n[groups.nccl]\nsuspendable = true\nallow_exports = true\n[groups.web]\nmemory_limit = \"1GiB\"\n",
        )
        .unwrap();
        assert_eq!(f.suspendable.get("batch"), Some(&Suspendability { suspendable: true, allow_exports: false, path: SuspendPath::Driver }));
        assert_eq!(f.suspendable.get("nccl"), Some(&Suspendability { suspendable: true, allow_exports: true, path: SuspendPath::Driver }));
        let f = FileSettings::parse("c.toml", "[groups.fast]\nsuspendable = true\nsuspend_path = \"auto\"\n").unwrap();
        assert_eq!(f.suspendable.get("fast").map(|s| s.path), Some(SuspendPath::Auto));
        let e = FileSettings::parse("c.toml", "[groups.fast]\nsuspend_path = \"fast\"\n").unwrap_err();
        assert!(e.to_string().contains("not a suspend path"), "{e}");
        assert_eq!(f.suspendable.get("web"), None);
        let e = FileSettings::parse("c.toml", "[defaults]\nsuspendable = true\n").unwrap_err();
        assert!(e.to_string().contains("line 2") && e.to_string().contains("settings of a group"), "{e}");
        let e = FileSettings::parse("c.toml", "[groups.batch]\nsuspendable = \"yes\"\n").unwrap_err();
        assert!(e.to_string().contains("invalid config file"), "{e}");
    }
}
