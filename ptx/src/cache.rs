//! Sliced modules on disk, one file per PTX text, keyed by a SHA-256 of the transformer version and
//! the text, so a second load of the same code does no work. Entries are written to a temporary
//! file and renamed into place (readers never see half an entry), the directory is kept under a
//! size cap (oldest entries go first), and an entry is used only when the directory and the file
//! belong to this user, nobody else can write them, and its header names the key asked for and
//! the hash of its body.

use crate::rewrite::{slice_module, ModuleOutcome};
use crate::syntax::ParseError;
use crate::TRANSFORMER_VERSION;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

const MAGIC: &str = "gpuslice-ptx-cache 1";
const SUFFIX: &str = "slice";
/// Default cap on the directory's total size.
pub const DEFAULT_CAP_BYTES: u64 = 256 << 20;

pub struct Cache {
    dir: PathBuf,
    cap_bytes: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key of a PTX text.
pub fn key(ptx: &str) -> String {
    let mut h = Sha256::new();
    h.update(TRANSFORMER_VERSION.as_bytes());
    h.update([0]);
    h.update(ptx.as_bytes());
    hex(&h.finalize())
}

/// This process's effective uid, from `/proc/self/status` (the crate has no unsafe code to call
/// `geteuid` with).
fn euid() -> io::Result<u32> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| io::Error::other("no effective uid in /proc/self/status"))
}

/// `$XDG_CACHE_HOME/gpuslice/ptx`, else `$HOME/.cache/gpuslice/ptx`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = base.or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("gpuslice").join("ptx"))
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache directory {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("cache directory {0} is not this user's alone (owner {1}, mode {2:o}); not using it")]
    NotPrivate(PathBuf, u32, u32),
}

impl Cache {
    /// Opens (creating, mode 0700) the cache in `dir`. Refuses a directory another user owns or can
    /// write to: its entries could be anyone's code.
    pub fn open(dir: &Path, cap_bytes: u64) -> Result<Cache, CacheError> {
        let io_err = |e| CacheError::Io(dir.to_path_buf(), e);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err)?;
        let meta = fs::symlink_metadata(dir).map_err(io_err)?;
        let uid = euid().map_err(io_err)?;
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
            return Err(CacheError::NotPrivate(dir.to_path_buf(), meta.uid(), meta.mode() & 0o7777));
        }
        Ok(Cache { dir: dir.to_path_buf(), cap_bytes })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.{SUFFIX}"))
    }

    /// The cached outcome for `ptx`, if a valid entry exists; anything wrong with the entry (a link,
    /// another owner, a bad header or hash, a different transformer) counts as a miss.
    pub fn get(&self, ptx: &str) -> Option<ModuleOutcome> {
        let key = key(ptx);
        let mut file = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(self.path(&key)).ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.uid() != euid().ok()? || meta.mode() & 0o022 != 0 || meta.len() > self.cap_bytes {
            return None;
        }
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        let (header, body) = text.split_once('\n')?;
        let mut fields = header.strip_prefix(MAGIC)?.split_whitespace();
        if fields.next()? != key || fields.next()? != hex(&Sha256::digest(body.as_bytes())) || fields.next().is_some() {
            return None;
        }
        // The verdicts as one JSON line, then the sliced PTX as it is (no escaping to undo).
        let (verdicts, ptx) = body.split_once('\n')?;
        let mut outcome: ModuleOutcome = serde_json::from_str(verdicts).ok()?;
        outcome.ptx = ptx.to_string();
        if outcome.transformer != TRANSFORMER_VERSION {
            return None;
        }
        // Recently used entries survive the size cap longest.
        let _ = file.set_modified(SystemTime::now());
        Some(outcome)
    }

    /// Stores `outcome` for `ptx` (atomic rename), then trims the directory to the cap.
    pub fn put(&self, ptx: &str, outcome: &ModuleOutcome) -> io::Result<()> {
        let key = key(ptx);
        let verdicts = ModuleOutcome { ptx: String::new(), ..outcome.clone() };
        let body = format!("{}\n{}", serde_json::to_string(&verdicts).map_err(io::Error::other)?, outcome.ptx);
        let text = format!("{MAGIC} {key} {}\n{body}", hex(&Sha256::digest(body.as_bytes())));
        if text.len() as u64 > self.cap_bytes {
            return Ok(());
        }
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&self.dir)?;
        tmp.write_all(text.as_bytes())?;
        tmp.as_file().sync_data()?;
        tmp.persist(self.path(&key)).map_err(|e| e.error)?;
        self.trim(&key)
    }

    /// Removes the oldest entries until the directory fits the cap; `keep` goes last.
    fn trim(&self, keep: &str) -> io::Result<()> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if !meta.is_file() || entry.path().extension().and_then(|e| e.to_str()) != Some(SUFFIX) {
                continue;
            }
            total += meta.len();
            let newest = entry.path().file_stem().and_then(|s| s.to_str()) == Some(keep);
            entries.push((newest, meta.modified()?, meta.len(), entry.path()));
        }
        entries.sort();
        for (_, _, len, path) in entries {
            if total <= self.cap_bytes {
                break;
            }
            fs::remove_file(&path)?;
            total -= len;
        }
        Ok(())
    }

    /// The sliced module for `ptx`: from the cache when a valid entry exists, else sliced and stored.
    /// The flag says whether it was a hit. A failure to store is not an error (the result is good).
    pub fn get_or_slice(&self, ptx: &str) -> Result<(ModuleOutcome, bool), ParseError> {
        if let Some(hit) = self.get(ptx) {
            return Ok((hit, true));
        }
        let outcome = slice_module(ptx)?;
        let _ = self.put(ptx, &outcome);
        Ok((outcome, false))
    }
}
