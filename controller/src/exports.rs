//! The table of exports made under this controller (issue 20): which registered process
//! exported which shared allocation, so that an import of it, by any user, is charged once, to
//! the exporter's group.
//!
//! Both requests come from the shim's export and import hooks, which are rare (never on the
//! allocation or launch path). What a hostile tenant could try, and why it fails:
//! - Claim an export it did not make, to make someone's import from outside gpuslice free: an
//!   entry is taken only from a live registered process (the peer's pid from `SO_PEERCRED`, not
//!   a field of the request), and a file descriptor export only when that process holds a
//!   descriptor of that very file at that moment (`/proc/<pid>/fd`), so it must be a party to
//!   the exchange. A handle's 64 bytes are kept whole (no hash whose collisions could be forged).
//! - Make another's import charged twice: an entry can be added only by its exporter and is
//!   removed only when that process goes (so no tenant can remove another's entries), and each
//!   process holds at most `MAX_PER_PROCESS` of them, each uid `MAX_PER_UID` (no tenant can fill
//!   the table or the controller's memory).
//! - Keep an entry after the exporter is gone (`kill -9`): entries belong to a process slot and
//!   die with it (`forget`), and a lookup checks the slot still watches the same pid.
//!
//! Imports are recorded too (issue 22): an export shields its group from suspension only while
//! another process has imported it (`importers_of`), because a tenant's word that it exported
//! something cannot be checked against the driver (any 64 bytes, any file it holds) and an
//! export nobody imported has no importer to pull memory from under. The importer's own shim
//! reports the import (`Request::Import`, sent after the driver's import succeeded); it is kept
//! only from a live registered process, only for a key a live process exported, at most
//! `MAX_PER_PROCESS` per importer, and it dies with the importer (or with the key's last
//! exporter). An importer of the exporter's own group counts (IPC between the workers of one
//! server is the main real case, and the driver's checkpoint of memory mapped across processes
//! is not measured); the exporter importing its own export does not. NOTES (branch fakeexp)
//! says which lie still works and what it costs.

pub(crate) mod table;

use crate::state::{Peer, State};
use gpuslice_common::protocol::{ExportKey, MAX_HANDLE_BYTES};

/// Exports one process may have recorded at once.
pub const MAX_PER_PROCESS: usize = 1024;
/// Exports the processes of one uid may have recorded at once.
pub const MAX_PER_UID: usize = 16384;

impl State {
    /// The process slot of a live registered peer.
    fn slot_of(&self, peer: Peer) -> Option<usize> {
        self.watched.iter().find(|(_, w)| w.pid == peer.pid && w.uid == peer.uid).map(|(slot, _)| *slot)
    }

    /// Records that `peer` exported `key`.
    pub fn export(&mut self, peer: Peer, key: ExportKey) -> Result<String, String> {
        let slot = self.slot_of(peer).ok_or_else(|| format!("pid {}: not a registered process; its export is not recorded", peer.pid))?;
        match &key {
            ExportKey::Handle(bytes) if bytes.is_empty() || bytes.len() > MAX_HANDLE_BYTES => {
                return Err(format!("pid {}: a handle of {} bytes (1 to {MAX_HANDLE_BYTES})", peer.pid, bytes.len()));
            }
            ExportKey::File { dev, ino } if !holds_file(peer.pid, *dev, *ino) => {
                return Err(format!("pid {}: exported a descriptor of file {dev}:{ino} it does not hold; not recorded", peer.pid));
            }
            _ => {}
        }
        let pid = peer.pid;
        let owners = self.exports.by_key.entry(key).or_default();
        if owners.contains(&(slot, pid)) {
            return Ok("already recorded".into());
        }
        let by_uid: usize = self.exports.per_slot.iter().filter(|(s, _)| self.watched.get(s).is_some_and(|w| w.uid == peer.uid)).map(|(_, n)| n).sum();
        let held = self.exports.per_slot.entry(slot).or_insert(0);
        if *held >= MAX_PER_PROCESS || by_uid >= MAX_PER_UID {
            if owners.is_empty() {
                // Leave no empty list behind.
                self.exports.by_key.retain(|_, o| !o.is_empty());
            }
            return Err(format!(
                "pid {pid}: holds {held} recorded exports (at most {MAX_PER_PROCESS}), uid {} {by_uid} (at most {MAX_PER_UID}); an import of this one will be charged to its importer too",
                peer.uid
            ));
        }
        *held += 1;
        owners.push((slot, pid));
        Ok("export recorded".into())
    }

    /// True when a live registered process exported `key`.
    pub fn imported(&self, key: &ExportKey) -> bool {
        self.exports.by_key.get(key).is_some_and(|owners| owners.iter().any(|(slot, pid)| self.live(*slot, *pid)))
    }

    /// `peer` imported `key` (its shim asks after the driver's import succeeded): true when a
    /// live registered process exported it (so the import is charged to that exporter), and
    /// then, when `peer` is a registered process, the import is recorded: it makes the export
    /// one that shields its group from suspension (`importers_of`).
    pub fn import(&mut self, peer: Peer, key: ExportKey) -> bool {
        if !self.imported(&key) {
            return false;
        }
        let Some(slot) = self.slot_of(peer) else { return true };
        let entry = (slot, peer.pid);
        // Its own export (corroborates nothing), or recorded already.
        if self.exports.by_key.get(&key).is_some_and(|o| o.contains(&entry)) || self.exports.imported_by.get(&key).is_some_and(|i| i.contains(&entry)) {
            return true;
        }
        let held = self.exports.imports_per_slot.entry(slot).or_insert(0);
        if *held >= MAX_PER_PROCESS {
            tracing::warn!(
                "pid {}: holds {held} recorded imports (at most {MAX_PER_PROCESS}); this one does not shield its exporter's group from suspension",
                peer.pid
            );
            return true;
        }
        *held += 1;
        self.exports.imported_by.entry(key).or_default().push(entry);
        true
    }

    /// The pids of the live registered processes, other than the exporter itself, that imported
    /// an export of the process in `slot`: while there is one, suspending that process would
    /// pull memory from under an importer (issue 22). An export nobody else imported shields
    /// nothing: a process's own word is all there is of it.
    pub fn importers_of(&self, slot: usize) -> std::collections::BTreeSet<u32> {
        let Some(exporter) = self.watched.get(&slot).map(|w| w.pid) else { return Default::default() };
        self.exports
            .by_key
            .iter()
            .filter(|(_, owners)| owners.contains(&(slot, exporter)))
            .filter_map(|(key, _)| self.exports.imported_by.get(key))
            .flatten()
            .filter(|(s, pid)| *pid != exporter && self.live(*s, *pid))
            .map(|(_, pid)| *pid)
            .collect()
    }

    /// True when process slot `slot` still watches `pid`.
    fn live(&self, slot: usize, pid: u32) -> bool {
        self.watched.get(&slot).is_some_and(|w| w.pid == pid)
    }
}

/// True when process `pid` has a descriptor open on the file `dev`:`ino`.
fn holds_file(pid: u32, dev: u64, ino: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    dir.flatten().any(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
}

#[cfg(test)]
mod tests {
    use super::table::Exports;
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_file_export_is_believed_only_from_a_holder_of_that_file() {
        let dir = tempfile::tempdir().unwrap();
        let (held, other) = (dir.path().join("held"), dir.path().join("other"));
        let file = std::fs::File::create(&held).unwrap();
        std::fs::write(&other, b"").unwrap();
        let (h, o) = (file.metadata().unwrap(), std::fs::metadata(&other).unwrap());
        let me = std::process::id();
        assert!(holds_file(me, h.dev(), h.ino()));
        assert!(!holds_file(me, o.dev(), o.ino()), "a file it does not hold open");
        drop(file);
        assert!(!holds_file(me, h.dev(), h.ino()), "closed since");
    }

    /// A state watching this test process as slot 0.
    fn state(dir: &tempfile::TempDir) -> (State, Peer) {
        use gpuslice_common::ledger::{self, Ledger};
        let path = dir.path().join("ledger").to_str().unwrap().to_string();
        let (ledger, _) = Ledger::open_or_create(&path, ledger::Geometry { max_groups: 8, max_procs: 8 }).unwrap();
        let mut s = State::new(ledger, gpuslice_common::settings::FileSettings::parse("test.toml", "").unwrap());
        // SAFETY: getuid has no preconditions.
        let me = Peer { pid: std::process::id(), uid: unsafe { libc::getuid() } };
        s.watched.insert(0, watched(me));
        (s, me)
    }

    /// A registered process in group 0.
    fn watched(me: Peer) -> crate::state::Watched {
        use gpuslice_common::ledger::{MAX_DEVICES, UNLIMITED};
        crate::state::Watched {
            pid: me.pid,
            pidfd: None,
            start_time: None,
            devices: vec![],
            group: 0,
            uid: me.uid,
            caps: [UNLIMITED; MAX_DEVICES],
            priority: 0,
            penalty: [0; MAX_DEVICES],
            misbehaving: None,
            token: 0,
        }
    }

    #[test]
    fn exports_are_taken_from_their_registered_exporter_only_and_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, me) = state(&dir);
        let handle = ExportKey::Handle(vec![9; 64]);
        assert!(s.export(Peer { pid: me.pid + 1, ..me }, handle.clone()).is_err(), "an unregistered pid");
        assert!(s.export(Peer { uid: me.uid + 1, ..me }, handle.clone()).is_err(), "another uid with a registered pid");
        assert!(!s.imported(&handle));
        assert!(s.export(me, ExportKey::Handle(vec![])).is_err(), "an empty handle");
        s.export(me, handle.clone()).unwrap();
        assert!(s.imported(&handle));
        // A descriptor export: only of a file the exporter holds.
        let file = tempfile::tempfile().unwrap();
        let m = file.metadata().unwrap();
        let held = ExportKey::File { dev: m.dev(), ino: m.ino() };
        assert!(s.export(me, ExportKey::File { dev: m.dev(), ino: m.ino() + 1_000_000 }).is_err());
        s.export(me, held.clone()).unwrap();
        // At most MAX_PER_PROCESS entries.
        for i in 0..MAX_PER_PROCESS {
            let _ = s.export(me, ExportKey::Handle((i as u32).to_le_bytes().repeat(16)));
        }
        assert_eq!(s.exports.len(), MAX_PER_PROCESS);
        assert!(s.export(me, ExportKey::Handle(vec![7; 64])).is_err(), "over the cap");
        // The process goes (kill -9 ends in `release`): its entries with it.
        s.release(0, "test");
        assert!(!s.imported(&handle) && !s.imported(&held));
        assert_eq!(s.exports.len(), 0);
    }

    #[test]
    fn an_export_shields_only_while_another_process_imported_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, me) = state(&dir);
        // A second registered process (slot 1): a child that lives until the test ends.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let other = Peer { pid: child.id(), uid: me.uid };
        s.watched.insert(1, watched(other));
        let key = ExportKey::Handle(vec![5; 64]);
        assert!(!s.import(other, key.clone()), "not exported: charged to its importer");
        s.export(me, key.clone()).unwrap();
        assert!(s.importers_of(0).is_empty(), "an export nobody imported shields nothing");
        assert!(s.import(me, key.clone()), "its own import is charged to it once");
        assert!(s.importers_of(0).is_empty(), "the exporter's own import corroborates nothing");
        assert!(s.import(Peer { pid: other.pid + 1_000_000, ..other }, key.clone()), "an unregistered importer is answered");
        assert!(s.importers_of(0).is_empty(), "but not recorded");
        assert!(s.import(other, key.clone()));
        assert_eq!(s.importers_of(0).into_iter().collect::<Vec<_>>(), vec![other.pid], "another process imported it");
        assert!(s.importers_of(1).is_empty(), "the importer exported nothing");
        // The importer goes: the export shields nothing again.
        s.release(1, "test");
        assert!(s.importers_of(0).is_empty());
        assert!(s.exports.imported_by.is_empty() && s.exports.imports_per_slot.is_empty());
        // The exporter goes: its key's imports with it, so a replay of the bytes starts bare.
        s.watched.insert(1, watched(other));
        assert!(s.import(other, key.clone()));
        assert_eq!(s.exports.imported_by.len(), 1);
        s.exports.forget(0);
        assert!(s.exports.imported_by.is_empty() && s.exports.imports_per_slot.is_empty());
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_process_entries_go_with_it() {
        let mut e = Exports::default();
        e.by_key.entry(ExportKey::Handle(vec![1; 64])).or_default().push((3, 100));
        e.by_key.entry(ExportKey::Handle(vec![1; 64])).or_default().push((4, 101));
        e.per_slot.insert(3, 1);
        e.per_slot.insert(4, 1);
        e.forget(3);
        assert_eq!(e.len(), 1);
        e.forget(4);
        assert_eq!((e.len(), e.by_key.len()), (0, 0));
    }
}
