//! AVX2 + FMA + F16C variant: eight lanes, f16 rows widened with `vcvtph2ps`.
use crate::simd::avx2::Avx2;
super::ops_variant!(Avx2, "avx2,fma,f16c");
