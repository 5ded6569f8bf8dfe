//! AVX-512F variant: a 12x32 register tile (24 zmm accumulators), f16 widened with the
//! 512-bit `vcvtph2ps`.
use crate::simd::avx512::Avx512;
super::gemm_variant!(Avx512, 12, 2, "avx512f,avx2,fma,f16c");
