//! NEON variant: four lanes, f16 rows widened with `fcvtl`.
use crate::simd::neon::Neon;
super::ops_variant!(Neon, "neon");
