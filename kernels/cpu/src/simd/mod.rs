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
    /// Sum of all lanes.
    unsafe fn reduce_sum(v: Self::V) -> f32;
    /// Loads `LANES` f16 from `p` and widens them to f32 (exact).
    unsafe fn load_f16(p: *const f16) -> Self::V;
    /// Loads `LANES` bf16 from `p` and widens them to f32 (exact).
    unsafe fn load_bf16(p: *const bf16) -> Self::V;

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
