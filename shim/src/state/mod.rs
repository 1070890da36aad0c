//! Where this process's accounting lives: the ledger it is linked to, its allocation tables.
//! A module here imports from this layer and the ones below it (docs/layers.toml).

pub mod alloc_table;
pub mod link;
pub mod vmm_ranges;
