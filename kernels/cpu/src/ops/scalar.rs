//! Scalar variant: portable code, one lane.
use crate::simd::scalar::Scalar;
super::ops_variant!(Scalar);
