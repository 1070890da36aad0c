//! What the process holds: device pointer, VMM handle or array → (device, bytes), so that a free
//! returns exactly what its allocation charged.
//!
//! Sharded by key so that threads allocating at once rarely meet on a lock; an uncontended
//! mutex is one atomic operation, no syscall.

use crate::sys::{atfork, locks};
use std::collections::HashMap;
use std::sync::Mutex;

const SHARDS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub device: i32,
    pub bytes: u64,
}

pub struct AllocTable {
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
}

impl AllocTable {
    pub fn new() -> AllocTable {
        AllocTable { shards: std::array::from_fn(|_| Mutex::new(HashMap::new())) }
    }

    #[inline]
    fn shard(&self, key: u64) -> &Mutex<HashMap<u64, Entry>> {
        // Device pointers are aligned, so mix the bits before picking a shard.
        let mixed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.shards[mixed as usize % SHARDS]
    }

    pub fn insert(&self, key: u64, entry: Entry) {
        locks::lock(self.shard(key)).insert(key, entry);
    }

    pub fn remove(&self, key: u64) -> Option<Entry> {
        locks::lock(self.shard(key)).remove(&key)
    }

    /// Removes every entry of `device`, returning the bytes they held (a context reset).
    pub fn drain_device(&self, device: i32) -> u64 {
        let mut total = 0;
        for shard in &self.shards {
            locks::lock(shard).retain(|_, e| {
                if e.device == device {
                    total += e.bytes;
                    false
                } else {
                    true
                }
            });
        }
        total
    }

    /// Takes every shard for a fork; the child starts with the table empty (what its parent
    /// allocated is not the child's).
    pub fn hold_for_fork(&'static self, h: &mut atfork::Holder) {
        for shard in &self.shards {
            h.take(shard, HashMap::clear);
        }
    }

    /// Sum of tracked bytes on `device`.
    pub fn bytes_on(&self, device: i32) -> u64 {
        self.shards.iter().map(|s| locks::lock(s).values().filter(|e| e.device == device).map(|e| e.bytes).sum::<u64>()).sum()
    }
}

impl Default for AllocTable {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_drain() {
        let t = AllocTable::new();
        for i in 0..1000u64 {
            t.insert(0x7f00_0000_0000 + i * 512, Entry { device: (i % 2) as i32, bytes: 10 });
        }
        assert_eq!(t.bytes_on(0), 5000);
        assert_eq!(t.remove(0x7f00_0000_0000), Some(Entry { device: 0, bytes: 10 }));
        assert_eq!(t.remove(0x7f00_0000_0000), None);
        assert_eq!(t.drain_device(1), 5000);
        assert_eq!(t.bytes_on(1), 0);
        assert_eq!(t.bytes_on(0), 4990);
    }
}
