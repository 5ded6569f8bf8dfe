//! A minimal vector abstraction that the generic kernels are written against.
//!
//! Each instruction set implements [`Simd`] for a zero-sized marker type; the generic kernel
//! code (packing, microkernels, reductions) is monomorphized for it inside a
//! `#[target_feature]` entry point, so that every `#[inline(always)]` method below compiles to
//! the ISA's instructions. The ISA-specific files contain only these few operations, which
//! keeps the logic shared between a variant this machine can run (and test) and one it can
//! only compile.

use half::{bf16, f16};
use tessera_core::{DType, Element};

pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

/// Vector operations on `LANES` packed `f32`.
///
/// # Safety
/// Implementations may only be used after the CPU was checked to support their instruction
/// set (see [`crate::Isa`]); the methods read and write `LANES` elements through raw pointers,
/// which the caller guarantees to be valid.
pub(crate) unsafe trait Simd: Copy + Send + Sync + 'static {
    /// Number of `f32` lanes in [`Simd::V`].
    const LANES: usize;
    /// The vector register type.
    type V: Copy;

    /// All lanes zero.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Loads `LANES` f32 from `p` (no alignment needed).
    unsafe fn load(p: *const f32) -> Self::V;
    /// Stores `LANES` f32 to `p` (no alignment needed).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c` (fused where the ISA has it).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a * b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// `a / b` (IEEE division, correctly rounded).
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum (NaN handling unspecified).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise minimum (NaN handling unspecified).
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// Rounds to the nearest integer (ties to even), as f32.
    unsafe fn round(v: Self::V) -> Self::V;
    /// `2^n` for integer-valued `n` in `-126..=127`.
    unsafe fn pow2i(n: Self::V) -> Self::V;
    /// Lane-wise `if a < b { x } else { y }`.
    unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    /// Largest lane.
    unsafe fn reduce_max(v: Self::V) -> f32;
    /// Sum of all lanes.
    unsafe fn reduce_sum(v: Self::V) -> f32;
    /// Loads `LANES` f16 from `p` and widens them to f32 (exact).
    unsafe fn load_f16(p: *const f16) -> Self::V;
    /// Loads `LANES` bf16 from `p` and widens them to f32 (exact).
    unsafe fn load_bf16(p: *const bf16) -> Self::V;

    /// Loads `LANES` signed bytes from `p` as f32 (exact). The default goes through a
    /// buffer; the x86 variants sign-extend and convert in registers.
    ///
    /// # Safety
    /// `p` is valid for `LANES` reads.
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> Self::V {
        let mut buf = [0.0f32; 16];
        for (i, x) in buf.iter_mut().take(Self::LANES).enumerate() {
            // SAFETY: i < LANES (caller contract).
            *x = unsafe { *p.add(i) } as f32;
        }
        // SAFETY: `buf` holds at least LANES floats.
        unsafe { Self::load(buf.as_ptr()) }
    }

    /// `x` widened to f32 in every lane (exact), with the ISA's own f16 conversion.
    #[inline(always)]
    unsafe fn splat_f16(x: f16) -> Self::V {
        let buf = [x; 16];
        // SAFETY: `buf` holds at least LANES halves.
        unsafe { Self::load_f16(buf.as_ptr()) }
    }

    /// `out[i] = Σ lanes of v[i]` for every vector of `v`. The default adds each vector on
    /// its own ([`Simd::reduce_sum`]); the x86 variants override it with a transposing add
    /// tree when `v` holds exactly `LANES` vectors (about 3 operations per vector instead of
    /// 2·log₂(LANES)). Each lane sum is taken in a fixed order, so the result depends only
    /// on `v`.
    ///
    /// # Safety
    /// `out` is valid for `v.len()` writes.
    #[inline(always)]
    unsafe fn reduce_sums(v: &[Self::V], out: *mut f32) {
        for (i, &x) in v.iter().enumerate() {
            // SAFETY: i < v.len() (caller contract on `out`).
            unsafe { *out.add(i) = Self::reduce_sum(x) };
        }
    }

    /// Hints that the cache line holding `p` will be accessed soon. Never faults, whatever
    /// `p` is (prefetches of invalid addresses are dropped by the hardware).
    #[inline(always)]
    fn prefetch<T>(_p: *const T) {}

    /// Writes the `LANES x LANES` block held in `rows` transposed: lane `l` of `rows[r]` goes
    /// to `out[l * stride + r]`. `rows` holds exactly `LANES` vectors.
    #[inline(always)]
    unsafe fn transpose_store(rows: &[Self::V], out: *mut f32, stride: usize) {
        debug_assert!(Self::LANES <= 16 && rows.len() == Self::LANES);
        let mut buf = [0.0f32; 16];
        for (r, &v) in rows.iter().enumerate() {
            // SAFETY: LANES <= 16, so the store stays inside `buf`.
            unsafe { Self::store(buf.as_mut_ptr(), v) };
            for (l, &x) in buf.iter().take(Self::LANES).enumerate() {
                // SAFETY: l, r < LANES; the caller guarantees `out` covers
                // (LANES - 1) * stride + LANES elements.
                unsafe { *out.add(l * stride + r) = x };
            }
        }
    }
}

/// Loads `S::LANES` elements of type `B` at `p` as f32. The match is on a constant and folds.
///
/// # Safety
/// `p` must be valid for `S::LANES` reads and `S`'s ISA must be available.
#[inline(always)]
pub(crate) unsafe fn load_as_f32<S: Simd, B: Element>(p: *const B) -> S::V {
    // SAFETY: B's DTYPE tag names its actual type, so the casts are to the same type; the
    // caller guarantees LANES valid elements.
    unsafe {
        match B::DTYPE {
            DType::F32 => S::load(p.cast()),
            DType::F16 => S::load_f16(p.cast()),
            DType::BF16 => S::load_bf16(p.cast()),
        }
    }
}

/// Largest relative error of `exp` on its whole domain (measured by the unit test below
/// over `[-87.3, 88]` with a stride, checked against f64 `exp`).
pub const EXP_REL_ERR: f32 = 4.0 * f32::EPSILON;

/// `e^x` lane-wise, to [`EXP_REL_ERR`]: range reduction `x = n·ln2 + r` (two-part ln 2,
/// |r| <= ln2/2), a degree-6 polynomial for `e^r` (Cephes `expf`), scaled by `2^n`.
/// Arguments below ln(2^-126) give 0 (so `exp(-inf) == 0`); above 88 they saturate to
/// `e^88` (the kernels only take `exp` of non-positive arguments).
#[inline(always)]
pub(crate) unsafe fn exp<S: Simd>(x: S::V) -> S::V {
    // SAFETY: only lane arithmetic; the ISA is available (caller contract).
    unsafe {
        const LO: f32 = -87.336_55; // ln(2^-126)
        const HI: f32 = 88.0;
        let xc = S::min(S::max(x, S::splat(LO)), S::splat(HI));
        let n = S::round(S::mul(xc, S::splat(std::f32::consts::LOG2_E)));
        let r = S::fma(n, S::splat(-0.693_359_4), xc);
        let r = S::fma(n, S::splat(2.121_944_4e-4), r);
        let mut p = S::splat(1.987_569_1e-4);
        p = S::fma(p, r, S::splat(1.398_199_9e-3));
        p = S::fma(p, r, S::splat(8.333_452e-3));
        p = S::fma(p, r, S::splat(4.166_579_6e-2));
        p = S::fma(p, r, S::splat(1.666_666_5e-1));
        p = S::fma(p, r, S::splat(0.5));
        let r2 = S::mul(r, r);
        p = S::fma(p, r2, S::add(r, S::splat(1.0)));
        let y = S::mul(p, S::pow2i(n));
        S::select_lt(x, S::splat(LO), S::zero(), y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error of `exp::<S>` against f64 over a dense sweep of its domain.
    fn max_exp_error<S: Simd>() -> f64 {
        let mut worst = 0.0f64;
        let mut x = -87.3f32;
        let mut buf = [0.0f32; 16];
        while x < 87.9 {
            let xs: [f32; 16] = std::array::from_fn(|l| x + l as f32 * 1.37e-4);
            for chunk in xs.chunks(S::LANES) {
                // SAFETY: `chunk` and `buf` hold at least LANES floats; `S` is available
                // (checked by the caller).
                unsafe { S::store(buf.as_mut_ptr(), exp::<S>(S::load(chunk.as_ptr()))) };
                for (l, &xi) in chunk.iter().enumerate() {
                    let want = f64::from(xi).exp();
                    worst = worst.max((f64::from(buf[l]) - want).abs() / want);
                }
            }
            x += 16.0 * 1.37e-4 + 3.1e-3;
        }
        worst
    }

    fn check<S: Simd>() {
        let e = max_exp_error::<S>();
        assert!(e <= f64::from(EXP_REL_ERR), "exp relative error {e:e}");
        let mut buf = [1.0f32; 16];
        // SAFETY: as above.
        unsafe {
            S::store(buf.as_mut_ptr(), exp::<S>(S::splat(f32::NEG_INFINITY)));
        }
        assert_eq!(buf[0], 0.0);
        // SAFETY: as above.
        unsafe {
            S::store(buf.as_mut_ptr(), exp::<S>(S::splat(-100.0)));
        }
        assert_eq!(buf[0], 0.0);
        // SAFETY: as above.
        unsafe {
            S::store(buf.as_mut_ptr(), exp::<S>(S::zero()));
        }
        assert_eq!(buf[0], 1.0);
        check_reduce_sums::<S>();
        check_widening::<S>();
    }

    /// `load_i8` and `splat_f16` widen exactly, every lane (including -128 and 127, and an
    /// f16 that is not a small integer).
    fn check_widening<S: Simd>() {
        let bytes: [i8; 16] = [
            -128, 127, -1, 0, 1, 5, -77, 64, 3, -3, 100, -100, 9, -9, 42, -42,
        ];
        let mut buf = [0.0f32; 16];
        // SAFETY: 16 readable bytes, 16 writable floats; the ISA is available (caller).
        unsafe { S::store(buf.as_mut_ptr(), S::load_i8(bytes.as_ptr())) };
        for i in 0..S::LANES {
            assert_eq!(buf[i], f32::from(bytes[i]), "lane {i}");
        }
        let h = f16::from_f32(-0.3337);
        // SAFETY: as above.
        unsafe { S::store(buf.as_mut_ptr(), S::splat_f16(h)) };
        assert!(buf[..S::LANES].iter().all(|&x| x == h.to_f32()));
    }

    /// `reduce_sums` of `LANES` vectors (the tree) and of fewer (the loop): every lane of
    /// every vector distinct, integers so that every order of summation is exact.
    fn check_reduce_sums<S: Simd>() {
        for count in [S::LANES, 3.min(S::LANES), 1] {
            let vals: Vec<f32> = (0..S::LANES * S::LANES)
                .map(|i| ((i * 37) % 101) as f32 - 50.0 + (i / S::LANES) as f32 * 1000.0)
                .collect();
            let mut out = [f32::NAN; 16];
            // SAFETY: `vals` holds LANES vectors of LANES floats; `out` holds 16 >= count.
            unsafe {
                let v: Vec<S::V> = (0..count)
                    .map(|r| S::load(vals[r * S::LANES..].as_ptr()))
                    .collect();
                S::reduce_sums(&v, out.as_mut_ptr());
            }
            for (r, &got) in out.iter().enumerate().take(count) {
                let want: f32 = vals[r * S::LANES..(r + 1) * S::LANES].iter().sum();
                assert_eq!(got, want, "reduce_sums of {count} vectors, vector {r}");
            }
            assert!(
                out[count..].iter().all(|x| x.is_nan()),
                "wrote past {count}"
            );
        }
    }

    #[test]
    fn exp_is_accurate_scalar() {
        check::<scalar::Scalar>();
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_is_accurate_avx2() {
        if crate::Isa::Avx2.is_available() {
            #[target_feature(enable = "avx2,fma,f16c")]
            fn run() {
                check::<avx2::Avx2>();
            }
            // SAFETY: AVX2, FMA and F16C were detected.
            unsafe { run() };
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_is_accurate_avx512() {
        if crate::Isa::Avx512.is_available() {
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            fn run() {
                check::<avx512::Avx512>();
            }
            // SAFETY: AVX-512F was detected.
            unsafe { run() };
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn exp_is_accurate_neon() {
        check::<neon::Neon>();
    }
}
