//! NEON variant: 8x12 register tiles (24 q-register accumulators) for `Q·Kᵀ` and `P·V`.
use crate::simd::neon::Neon;
super::attention_variant!(Neon, 8, 3, "neon");
