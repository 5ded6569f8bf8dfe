//! Reference kernels: the oracle every fast path is tested against.
//!
//! Plain loops, f64 accumulation, no blocking, no SIMD, no `unsafe`. They validate their
//! input exactly as the fast kernels do and follow the same documented conventions, so
//! that a property test can compare results element by element.

mod attention;
mod gemm;
pub mod ops;
mod quant;

pub use attention::{AttentionReference, attention};
pub use gemm::{gemm, gemm_magnitude};
pub use quant::{DotReference, quant_dot, quant_matmul};
