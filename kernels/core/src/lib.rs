//! # tessera-core
//!
//! The foundation every Tessera kernel crate builds on:
//!
//! * [`Error`] / [`Result`]: the one error type of every public kernel;
//! * [`shape`]: validation of lengths, leading dimensions and products (checked arithmetic),
//!   so a kernel can refuse bad input with an `Err` before it touches memory;
//! * [`attention`]: attention operand layouts, masks, biases and their validation;
//! * [`kv_cache`]: the KV cache types every backend shares ([`kv_cache::KvCacheConfig`],
//!   [`kv_cache::SeqId`], …) and [`kv_cache::PageBook`], the host bookkeeping of a cache's
//!   sequences and pages;
//! * [`dtype`]: the element types a kernel may read ([`f32`], [`half::f16`], [`half::bf16`]);
//! * [`MatRef`] / [`MatMut`]: a slice plus an explicit row-major shape and leading dimension
//!   (no tensor type is imposed on the caller);
//! * [`quant`]: the GGML-compatible quantized block formats (Q8_0, Q4_0, Q4_K, Q8_K) with
//!   their reference quantizers and dequantizers;
//! * [`reference`](mod@reference): the oracle for every kernel, written as plainly as possible, with f64
//!   accumulation, never optimized and never shared with the fast paths.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod attention;
pub mod dtype;
mod error;
pub mod kv_cache;
mod mat;
pub mod quant;
pub mod reference;
pub mod shape;

pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use mat::{MatMut, MatRef, Transpose};

pub use half::{bf16, f16};
