//! AVX-512F variant: 12x32 register tiles (24 zmm accumulators) for `Q·Kᵀ` and `P·V`.
use crate::simd::avx512::Avx512;
super::attention_variant!(Avx512, 12, 2, "avx512f,avx2,fma,f16c");
