//! AArch64 Advanced SIMD (NEON): four f32 lanes in a `float32x4_t`.

use super::Simd;
use half::{bf16, f16};
use std::arch::aarch64::*;

/// AArch64 with NEON (always present on AArch64 Linux).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Neon;

// SAFETY: NEON is part of the AArch64 baseline; pointer methods touch exactly 4 elements, as
// the trait requires of the caller.
unsafe impl Simd for Neon {
    const LANES: usize = 4;
    type V = float32x4_t;

    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        // SAFETY: NEON is available.
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        // SAFETY: NEON is available.
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: the caller guarantees 4 readable floats.
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: the caller guarantees 4 writable floats.
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is available. vfmaq_f32(c, a, b) = c + a * b, fused.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is available.
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is available.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is available.
        unsafe { vsubq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (AArch64 FDIV) is available.
        unsafe { vdivq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is available.
        unsafe { vmaxq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is available.
        unsafe { vminq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn round(v: float32x4_t) -> float32x4_t {
        // SAFETY: NEON (ARMv8 FRINTN) is available.
        unsafe { vrndnq_f32(v) }
    }
    #[inline(always)]
    unsafe fn pow2i(n: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is available; n + 127 is in 1..=254, a valid biased exponent.
        unsafe {
            let e = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
            vreinterpretq_f32_s32(vshlq_n_s32::<23>(e))
        }
    }
    #[inline(always)]
    unsafe fn select_lt(
        a: float32x4_t,
        b: float32x4_t,
        x: float32x4_t,
        y: float32x4_t,
    ) -> float32x4_t {
        // SAFETY: NEON is available.
        unsafe { vbslq_f32(vcltq_f32(a, b), x, y) }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: float32x4_t) -> f32 {
        // SAFETY: NEON is available.
        unsafe { vmaxvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: float32x4_t) -> f32 {
        // SAFETY: NEON is available.
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    fn prefetch<T>(p: *const T) {
        // SAFETY: PRFM is a hint: it never faults, whatever the address, and has no other
        // architectural effect.
        unsafe {
            core::arch::asm!(
                "prfm pldl1keep, [{p}]",
                p = in(reg) p,
                options(nostack, preserves_flags, readonly)
            );
        }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> float32x4_t {
        // `float16x4_t` and `vcvt_f32_f16` are not stable Rust yet, so widen with FCVTL, which
        // is part of base ARMv8.0 Advanced SIMD (no FEAT_FP16 needed).
        // SAFETY: the caller guarantees 4 readable halves (8 bytes); the asm only converts
        // registers and touches no memory.
        unsafe {
            let h: uint16x4_t = vld1_u16(p.cast());
            let out: float32x4_t;
            core::arch::asm!(
                "fcvtl {out:v}.4s, {h:v}.4h",
                h = in(vreg) h,
                out = lateout(vreg) out,
                options(pure, nomem, nostack, preserves_flags)
            );
            out
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> float32x4_t {
        // SAFETY: 4 readable bf16 (8 bytes); widening u16 -> u32 and << 16 is exact.
        unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.cast()))) }
    }
    #[inline(always)]
    unsafe fn transpose_store(rows: &[float32x4_t], out: *mut f32, stride: usize) {
        debug_assert_eq!(rows.len(), 4);
        // SAFETY: `rows` has 4 vectors; the caller guarantees `out` covers 3 * stride + 4.
        unsafe {
            let a = vtrn1q_f32(rows[0], rows[1]);
            let b = vtrn2q_f32(rows[0], rows[1]);
            let c = vtrn1q_f32(rows[2], rows[3]);
            let d = vtrn2q_f32(rows[2], rows[3]);
            let r0 = vreinterpretq_f32_f64(vtrn1q_f64(
                vreinterpretq_f64_f32(a),
                vreinterpretq_f64_f32(c),
            ));
            let r1 = vreinterpretq_f32_f64(vtrn1q_f64(
                vreinterpretq_f64_f32(b),
                vreinterpretq_f64_f32(d),
            ));
            let r2 = vreinterpretq_f32_f64(vtrn2q_f64(
                vreinterpretq_f64_f32(a),
                vreinterpretq_f64_f32(c),
            ));
            let r3 = vreinterpretq_f32_f64(vtrn2q_f64(
                vreinterpretq_f64_f32(b),
                vreinterpretq_f64_f32(d),
            ));
            vst1q_f32(out, r0);
            vst1q_f32(out.add(stride), r1);
            vst1q_f32(out.add(2 * stride), r2);
            vst1q_f32(out.add(3 * stride), r3);
        }
    }
}
