//! Limits a process runs under, resolved from its environment and an optional TOML file.
//!
//! Precedence for device `n`, first found wins:
//! `GPUSLICE_MEMORY_LIMIT_n` > `CUDA_DEVICE_MEMORY_LIMIT_n` > `GPUSLICE_MEMORY_LIMIT` >
//! `CUDA_DEVICE_MEMORY_LIMIT` > the file's `[defaults.devices.n]` > the file's `[defaults]`.
//! The `CUDA_DEVICE_*` spellings are HAMi-core's, accepted so that a HAMi user switches by
//! changing one library path. An empty variable counts as unset; anything else that does not
//! parse is an error, never a silent "no limit".

use crate::size::{format_size, parse_size};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

pub const ENV_MEMORY_LIMIT: &str = "GPUSLICE_MEMORY_LIMIT";
pub const HAMI_MEMORY_LIMIT: &str = "CUDA_DEVICE_MEMORY_LIMIT";
pub const ENV_CONFIG: &str = "GPUSLICE_CONFIG";

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

/// Everything the shim needs to know before the first CUDA call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    memory_all: Option<Sourced<u64>>,
    memory_device: BTreeMap<u32, Sourced<u64>>,
}

impl Settings {
    /// The memory limit for CUDA device ordinal `device`, if any.
    pub fn memory_limit(&self, device: u32) -> Option<&Sourced<u64>> {
        self.memory_device.get(&device).or(self.memory_all.as_ref())
    }

    /// True when no memory limit is set for any device.
    pub fn is_unlimited(&self) -> bool {
        self.memory_all.is_none() && self.memory_device.is_empty()
    }

    /// One line for the log: what applies and where it came from.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(all) = &self.memory_all {
            parts.push(format!("memory {} per device (from {})", format_size(all.value), all.origin));
        }
        for (dev, lim) in &self.memory_device {
            parts.push(format!("device {dev}: memory {} (from {})", format_size(lim.value), lim.origin));
        }
        if parts.is_empty() {
            "no limits".to_string()
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
    pub fn resolve(vars: &[(String, String)], file: Option<FileSettings>) -> Result<Settings, SettingsError> {
        let mut settings = Settings::default();
        if let Some(file) = file {
            settings.memory_all = file.memory_all;
            settings.memory_device = file.memory_device;
        }
        // Lower precedence first, so that later assignments win.
        for name in [HAMI_MEMORY_LIMIT, ENV_MEMORY_LIMIT] {
            if let Some(value) = lookup(vars, name) {
                settings.memory_all = Some(parse_env_size(name, value)?);
                // The environment wins over the file, including the file's per-device entries.
                settings.memory_device.clear();
            }
        }
        for (prefix, strict) in [(HAMI_MEMORY_LIMIT, false), (ENV_MEMORY_LIMIT, true)] {
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
                settings.memory_device.insert(device, parse_env_size(name, value)?);
            }
        }
        Ok(settings)
    }
}

fn lookup<'a>(vars: &'a [(String, String)], name: &str) -> Option<&'a str> {
    vars.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.trim().is_empty())
}

fn parse_env_size(name: &str, value: &str) -> Result<Sourced<u64>, SettingsError> {
    parse_size(value)
        .map(|bytes| Sourced { value: bytes, origin: name.to_string() })
        .map_err(|e| SettingsError { origin: name.to_string(), value: value.to_string(), reason: e.to_string() })
}

/// The part of a TOML config file that applies to one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    memory_all: Option<Sourced<u64>>,
    memory_device: BTreeMap<u32, Sourced<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    defaults: Option<DefaultsDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsDoc {
    memory_limit: Option<SizeDoc>,
    #[serde(default)]
    devices: BTreeMap<String, DeviceDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceDoc {
    memory_limit: Option<SizeDoc>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeDoc {
    Bytes(u64),
    Text(String),
}

impl FileSettings {
    /// Reads and checks a config file; errors name the file, and TOML errors carry line and column.
    pub fn read(path: &str) -> Result<FileSettings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError {
            origin: ENV_CONFIG.to_string(),
            value: path.to_string(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` is only used in messages.
    pub fn parse(path: &str, text: &str) -> Result<FileSettings, SettingsError> {
        let doc: FileDoc = toml::from_str(text).map_err(|e| SettingsError {
            origin: ENV_CONFIG.to_string(),
            value: path.to_string(),
            reason: format!("invalid config file: {}", e.to_string().trim_end()),
        })?;
        let mut out = FileSettings::default();
        let Some(defaults) = doc.defaults else { return Ok(out) };
        if let Some(size) = defaults.memory_limit {
            out.memory_all = Some(file_size(path, "defaults.memory_limit", size)?);
        }
        for (key, device) in defaults.devices {
            let origin = format!("defaults.devices.{key}");
            let number: u32 = key.parse().map_err(|_| SettingsError {
                origin: format!("{path}: {origin}"),
                value: key.clone(),
                reason: "device keys are CUDA device numbers: [defaults.devices.0]".to_string(),
            })?;
            if let Some(size) = device.memory_limit {
                out.memory_device.insert(number, file_size(path, &format!("{origin}.memory_limit"), size)?);
            }
        }
        Ok(out)
    }
}

fn file_size(path: &str, key: &str, size: SizeDoc) -> Result<Sourced<u64>, SettingsError> {
    let origin = format!("{path}: {key}");
    let text = match size {
        SizeDoc::Bytes(0) => "0".to_string(),
        SizeDoc::Bytes(b) => return Ok(Sourced { value: b, origin }),
        SizeDoc::Text(t) => t,
    };
    parse_size(&text)
        .map(|value| Sourced { value, origin: origin.clone() })
        .map_err(|e| SettingsError { origin, value: text, reason: e.to_string() })
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
}
