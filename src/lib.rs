//! Tessera: hand-optimized transformer kernels. This crate holds the benchmark harness and the
//! `tessera` command-line tool; the kernels live in `tessera-core` and `tessera-cpu`.
#![warn(clippy::undocumented_unsafe_blocks)]
pub use tessera_core as core;
pub use tessera_cpu as cpu;

pub mod bench;
