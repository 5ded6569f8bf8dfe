//! AVX-512F variant: sixteen lanes, f16 widened with the 512-bit `vcvtph2ps`.
use crate::simd::avx512::Avx512;
super::kv_variant!(Avx512, "avx512f,avx2,fma,f16c");
