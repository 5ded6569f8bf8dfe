//! # tessera-cpu
//!
//! Tessera's CPU kernels. Each operation family is a module (`gemm`, `quant`, `attention`,
//! `kv_cache`, `ops`: layer and RMS norm, softmax, activations, embedding, adds) whose public
//! functions validate their arguments, then dispatch to the best instruction set this CPU has
//! ([`Isa::detect`]). Every variant is also reachable explicitly (the `*_with_isa`
//! functions), so tests and benches can exercise each one on a machine that has it; asking for
//! an instruction set the CPU lacks is an [`Error::IsaUnavailable`], never a crash.
//!
//! Variants: scalar (everywhere), AVX2+FMA+F16C (the x86-64 baseline), AVX-512F, and NEON
//! (AArch64).
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod attention;
mod cache;
pub mod gemm;
mod isa;
pub mod kv_cache;
pub mod ops;
mod parallel;
pub mod quant;
mod scratch;
mod simd;

pub use cache::CacheInfo;
pub use isa::Isa;
pub use parallel::Parallelism;
pub use tessera_core::{Error, Result};
