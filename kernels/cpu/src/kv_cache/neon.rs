//! NEON variant: four lanes, f16 widened with `fcvtl`.
use crate::simd::neon::Neon;
super::kv_variant!(Neon, "neon");
