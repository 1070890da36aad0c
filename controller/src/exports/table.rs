//! The exports table's data (see `exports` for the rules that fill it): kept in the state,
//! filled by `exports`' requests, emptied of a process slot when its process goes.

use gpuslice_common::protocol::ExportKey;
use std::collections::HashMap;

#[derive(Default)]
pub struct Exports {
    /// The key → (process slot, pid) of each process that exported it.
    pub(super) by_key: HashMap<ExportKey, Vec<(usize, u32)>>,
    /// Process slot → how many entries it holds.
    pub(super) per_slot: HashMap<usize, usize>,
    /// The key → (process slot, pid) of each registered process that imported it.
    pub(super) imported_by: HashMap<ExportKey, Vec<(usize, u32)>>,
    /// Process slot → how many imports it recorded.
    pub(super) imports_per_slot: HashMap<usize, usize>,
}

impl Exports {
    /// Drops every entry of a process slot (its process has gone).
    pub fn forget(&mut self, slot: usize) {
        if self.imports_per_slot.remove(&slot).is_some() {
            self.imported_by.retain(|_, importers| {
                importers.retain(|(s, _)| *s != slot);
                !importers.is_empty()
            });
        }
        if self.per_slot.remove(&slot).is_none() {
            return;
        }
        self.by_key.retain(|_, owners| {
            owners.retain(|(s, _)| *s != slot);
            !owners.is_empty()
        });
        // A key nobody exports any more takes its imports with it: a later export of the same
        // bytes (a reused handle, or a tenant replaying them) is not corroborated by them.
        let (by_key, counts) = (&self.by_key, &mut self.imports_per_slot);
        self.imported_by.retain(|key, importers| {
            let keep = by_key.contains_key(key);
            if !keep {
                for (s, _) in importers.iter() {
                    if let Some(n) = counts.get_mut(s) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
            keep
        });
        counts.retain(|_, n| *n > 0);
    }

    pub fn len(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }
}
