//! The portable "vector" of one lane: the scalar variant of every generic kernel.

use super::Simd;
use half::{bf16, f16};

/// Plain scalar code, available everywhere.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

// SAFETY: every operation is plain Rust on one f32; the pointer methods read or write exactly
// one element, which the trait contract makes the caller guarantee.
unsafe impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;

    #[inline(always)]
    unsafe fn zero() -> f32 {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: the caller guarantees one readable element.
        unsafe { p.read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        // SAFETY: the caller guarantees one writable element.
        unsafe { p.write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: f32, b: f32, c: f32) -> f32 {
        // Not fused: `f32::mul_add` without hardware FMA is a slow libm call, and the scalar
        // variant must stay portable. The error bound is the same to first order.
        a * b + c
    }
    #[inline(always)]
    unsafe fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    unsafe fn div(a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    unsafe fn max(a: f32, b: f32) -> f32 {
        a.max(b)
    }
    #[inline(always)]
    unsafe fn min(a: f32, b: f32) -> f32 {
        a.min(b)
    }
    #[inline(always)]
    unsafe fn round(v: f32) -> f32 {
        v.round_ties_even()
    }
    #[inline(always)]
    unsafe fn pow2i(n: f32) -> f32 {
        f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
    #[inline(always)]
    unsafe fn select_lt(a: f32, b: f32, x: f32, y: f32) -> f32 {
        if a < b { x } else { y }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> f32 {
        // SAFETY: the caller guarantees one readable element.
        unsafe { p.read_unaligned() }.to_f32()
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> f32 {
        // SAFETY: the caller guarantees one readable element.
        unsafe { p.read_unaligned() }.to_f32()
    }
}
