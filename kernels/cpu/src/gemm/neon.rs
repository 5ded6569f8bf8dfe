//! NEON variant: an 8x12 register tile (24 q-register accumulators), f16 widened with
//! `fcvtl`, bf16 by a 16-bit shift.
use crate::simd::neon::Neon;
super::gemm_variant!(Neon, 8, 3, "neon");
