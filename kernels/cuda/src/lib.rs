//! # tessera-cuda
//!
//! Tessera's CUDA kernels. The CUDA C++ sources live in the repository's `cuda/` folder, one
//! file per operation family; this crate embeds them, compiles them at run time with NVRTC for
//! the device's architecture ([`compile`]), and launches them through `cudarc`. Building it
//! needs no CUDA toolkit and no GPU: the driver and NVRTC are opened when first used, and
//! their absence is an [`Error::Unavailable`] / [`Error::NvrtcUnavailable`], never a panic.
//!
//! Families: [`gemm`] (f16/bf16 tensor-core GEMM, `mma.sync` on sm_80+, `wgmma` on sm_90a),
//! [`quant`] (GEMV and GEMM on GGML Q8_0/Q4_0/Q4_K blocks), [`ops`] (norms, softmax,
//! activations, embedding gather, residual add), [`attention`] (flash-style prefill and
//! encoder attention with causal/padding masks, position bias and grouped-query heads) and
//! [`kv_cache`] (append into contiguous or paged f16/int8 caches, decode attention over them).
//! Every launcher validates lengths, strides and
//! shapes on the host with `tessera-core`'s checks before anything is enqueued.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod attention;
pub mod compile;
mod device;
mod error;
pub mod gemm;
pub mod kv_cache;
pub mod launch;
pub mod ops;
pub mod quant;

pub use compile::Family;
pub use cudarc;
pub use device::{Device, DeviceInfo, driver_available, test_device};
pub use error::{Error, Result};
