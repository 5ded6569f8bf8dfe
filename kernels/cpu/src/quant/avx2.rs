//! AVX2 variant (placeholder: the scalar kernels until the SIMD ones land).
pub(super) use super::scalar::TABLE;
