//! AVX2 + FMA + F16C variant: a 6x16 register tile (12 ymm accumulators, 2 B vectors and one
//! broadcast A value per step), f16 widened with `vcvtph2ps`, bf16 by a 16-bit shift.
use crate::simd::avx2::Avx2;
super::gemm_variant!(Avx2, 6, 2, "avx2,fma,f16c");
