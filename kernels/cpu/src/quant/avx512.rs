//! AVX-512 VNNI variant (placeholder: the scalar kernels until the SIMD ones land).
pub(super) use super::scalar::TABLE;

/// Whether the CPU has what this variant needs (AVX-512 F, BW, VL and VNNI, with the AVX2
/// baseline).
pub(super) fn available() -> bool {
    crate::Isa::Avx512.is_available()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}
