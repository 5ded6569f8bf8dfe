//! AVX2 + FMA + F16C variant: 6x16 register tiles (12 ymm accumulators) for `Q·Kᵀ` and `P·V`.
use crate::simd::avx2::Avx2;
super::attention_variant!(Avx2, 6, 2, "avx2,fma,f16c");
