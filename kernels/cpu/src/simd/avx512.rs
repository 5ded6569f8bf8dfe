//! AVX-512 (F): sixteen f32 lanes in a `__m512`.

use super::Simd;
use half::{bf16, f16};
use std::arch::x86_64::*;

/// x86-64 with AVX-512 F (and the AVX2/FMA/F16C baseline).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512;

// SAFETY: only used inside `#[target_feature(enable = "avx512f,avx2,fma,f16c")]` functions
// reached after `Isa::Avx512` was detected; pointer methods touch exactly 16 elements.
unsafe impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: AVX-512F is available (trait contract).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable floats.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: the caller guarantees 16 writable floats.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn round(v: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v) }
    }
    #[inline(always)]
    unsafe fn pow2i(n: __m512) -> __m512 {
        // SAFETY: AVX-512F is available; n + 127 is in 1..=254, a valid biased exponent.
        unsafe {
            let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
        }
    }
    #[inline(always)]
    unsafe fn select_lt(a: __m512, b: __m512, x: __m512, y: __m512) -> __m512 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b), y, x) }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: __m512) -> f32 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: __m512) -> f32 {
        // SAFETY: AVX-512F is available.
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    unsafe fn reduce_sums(v: &[__m512], out: *mut f32) {
        if v.len() != 16 {
            for (i, &x) in v.iter().enumerate() {
                // SAFETY: i < v.len() (caller contract on `out`); AVX-512F is available.
                unsafe { *out.add(i) = _mm512_reduce_add_ps(x) };
            }
            return;
        }
        // SAFETY: AVX-512F is available; `out` holds 16 floats (caller contract).
        unsafe {
            // 16 -> 8: vector i holds v[2i] in its 128-bit chunks 0, 1 and v[2i+1] in 2, 3.
            let mut s = [_mm512_setzero_ps(); 8];
            for (i, si) in s.iter_mut().enumerate() {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                *si = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                    _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
                );
            }
            // 8 -> 4: chunk c of vector j holds 4 partial sums of v[4j + c].
            let mut u = [_mm512_setzero_ps(); 4];
            for (j, uj) in u.iter_mut().enumerate() {
                let (a, b) = (s[2 * j], s[2 * j + 1]);
                *uj = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
                );
            }
            // Within each chunk: lane 4c + j ends up with the sum of v[4j + c].
            let x = _mm512_add_ps(
                _mm512_unpacklo_ps(u[0], u[1]),
                _mm512_unpackhi_ps(u[0], u[1]),
            );
            let y = _mm512_add_ps(
                _mm512_unpacklo_ps(u[2], u[3]),
                _mm512_unpackhi_ps(u[2], u[3]),
            );
            let (xd, yd) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
            let z = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(xd, yd)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(xd, yd)),
            );
            // Lane i = 4j + c of the result is lane 4c + j of z.
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_storeu_ps(out, _mm512_permutexvar_ps(idx, z));
        }
    }
    #[inline(always)]
    fn prefetch<T>(p: *const T) {
        // SAFETY: a prefetch is a hint; it never faults, even on an invalid address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> __m512 {
        // SAFETY: 16 readable bytes; AVX-512F is available.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
    }
    #[inline(always)]
    unsafe fn splat_f16(x: f16) -> __m512 {
        // SAFETY: AVX-512F has the 512-bit vcvtph2ps.
        unsafe { _mm512_cvtph_ps(_mm256_set1_epi16(x.to_bits() as i16)) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m512 {
        // SAFETY: 16 readable halves (32 bytes); AVX-512F has the 512-bit vcvtph2ps.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> __m512 {
        // SAFETY: 16 readable bf16 (32 bytes); u16 -> u32 widening then << 16 is exact.
        unsafe {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
        }
    }
}
