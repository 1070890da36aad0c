//! What the program calls: the exported driver and NVML entry points, the tables that dispatch
//! them, and the fork handlers' order.
//! A module here imports from this layer and the ones below it (docs/layers.toml).

pub mod charge;
pub mod context;
pub mod entry;
pub mod fork;
pub mod gate;
pub mod info;
pub mod launch;
pub mod legacy;
pub mod memory;
pub mod modules;
pub mod nvml;
pub mod registry;
pub mod sharing;
pub mod suspend_agent;
pub mod trampoline;
pub mod vmm;
pub mod vmm_ring;
