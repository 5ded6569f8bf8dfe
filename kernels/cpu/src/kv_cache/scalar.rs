//! Scalar variant: portable code, one lane.
use crate::simd::scalar::Scalar;
super::kv_variant!(Scalar);
