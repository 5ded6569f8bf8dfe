//! Tessera: hand-optimized transformer kernels. This crate holds the model layer (the
//! [`backend::Backend`] trait, checkpoint [`loader`], BERT / GPT-2 / T5 in [`models`]), the
//! benchmark harness and the `tessera` command-line tool; the kernels live in `tessera-core`
//! and `tessera-cpu`.
#![warn(clippy::undocumented_unsafe_blocks)]
pub use tessera_core as core;
pub use tessera_cpu as cpu;

pub mod backend;
#[cfg(feature = "cli")]
pub mod bench;
pub mod error;
pub mod loader;
pub mod models;
#[cfg(feature = "cli")]
pub mod run;

pub use error::{Error, Result};
