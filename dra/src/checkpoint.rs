//! The plugin's checkpoint: which claims it prepared (or began to), under which group and with
//! which devices, so that a restarted plugin answers the kubelet's repeated prepares and later
//! unprepares exactly as before (the kubelet expects both to be idempotent).

use crate::cdi::write_atomically;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The group may exist, the CDI spec may not: a prepare must run again to completion.
    Preparing,
    /// Group and CDI spec exist; a repeated prepare answers from here.
    Prepared,
}

/// One device of a prepared claim, as NodePrepareResources answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedDevice {
    pub requests: Vec<String>,
    pub pool: String,
    pub device: String,
    pub cdi_ids: Vec<String>,
    /// The slice of the device the claim holds (bytes, percent).
    #[serde(default)]
    pub memory: u64,
    #[serde(default)]
    pub sm: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimEntry {
    pub namespace: String,
    pub name: String,
    pub group: String,
    pub stage: Stage,
    #[serde(default)]
    pub devices: Vec<PreparedDevice>,
    /// The group's metric labels (claim and pod), sent again when the plugin starts.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// By claim UID.
    pub claims: BTreeMap<String, ClaimEntry>,
}

/// The checkpoint file and its contents.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    pub data: Checkpoint,
}

impl Store {
    /// Reads `path`; a missing file is an empty checkpoint, an unreadable one an error (never
    /// silently forgotten: the claims it lists hold groups on the node).
    pub fn open(path: &Path) -> Result<Store, String> {
        let data = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("checkpoint {}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Checkpoint { version: 1, claims: BTreeMap::new() },
            Err(e) => return Err(format!("checkpoint {}: {e}", path.display())),
        };
        Ok(Store { path: path.to_path_buf(), data })
    }

    /// Writes the checkpoint out whole (see `write_atomically`).
    pub fn save(&self) -> Result<(), String> {
        write_atomically(&self.path, &serde_json::to_value(&self.data).expect("the checkpoint serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_survives_a_restart_and_a_broken_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        let mut s = Store::open(&path).unwrap();
        assert!(s.data.claims.is_empty(), "no file: nothing prepared");
        let device = PreparedDevice {
            requests: vec!["gpu".into()],
            pool: "n".into(),
            device: "gpu-0".into(),
            cdi_ids: vec!["gpuslice.dev/claim=u-gpu-0".into()],
            memory: 8 << 30,
            sm: 30,
        };
        let entry = ClaimEntry {
            namespace: "ns".into(),
            name: "c".into(),
            group: "ns/c".into(),
            stage: Stage::Prepared,
            devices: vec![device],
            labels: BTreeMap::new(),
        };
        s.data.claims.insert("u".into(), entry.clone());
        s.save().unwrap();
        assert_eq!(Store::open(&path).unwrap().data.claims["u"], entry);
        std::fs::write(&path, b"{\"version\":1,\"claims\":{\"u\":").unwrap();
        assert!(Store::open(&path).unwrap_err().contains("checkpoint.json"), "a torn checkpoint is not silently forgotten");
    }
}
