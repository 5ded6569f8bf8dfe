//! Scalar variant: portable code, a 4x4 register tile.
use crate::simd::scalar::Scalar;
super::attention_variant!(Scalar, 4, 4);
