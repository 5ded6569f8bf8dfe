//! AVX-512F variant: sixteen lanes, f16 rows widened with the 512-bit `vcvtph2ps`.
use crate::simd::avx512::Avx512;
super::ops_variant!(Avx512, "avx512f,avx2,fma,f16c");
