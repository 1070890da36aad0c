//! Below everything: the real driver, the dynamic linker, the C types, locks, the panic guard, the
//! settings read once, the clock.
//! A module here imports from this layer and the ones below it (docs/layers.toml).

pub mod atfork;
pub mod clock;
pub mod dl;
pub mod driver;
pub mod elf_symbols;
pub mod events;
pub mod ffi;
pub mod gate;
pub mod guard;
pub mod locks;
pub mod median;
pub mod on_off;
pub mod pids;
pub mod real_nvml;
pub mod runtime;
