//! NEON variant (AArch64 Advanced SIMD) of the quantized kernels.
//!
//! # Register tile
//! Every format uses a tile of `MR = 4` weight rows × `NR = 4` tokens. For each block (Q8_0,
//! Q4_0) or 32-weight sub-block (Q4_K) the tile loads and unpacks the four rows' weights once
//! (two 16-byte vectors per row), then for each token loads the activation quants once and
//! takes the four 32-wide integer dot products ([`Dot::dot32`], four `i32` lanes each). One
//! pairwise-add tree (three `addp`) folds them into one `int32x4_t` holding the exact block
//! sums of rows 0..3 for that token, so that every block's integer sum is exact, as in
//! `scalar.rs`; it is then converted to f32 and accumulated with one FMA by the product of
//! the weight scales (lanes: rows) and the token's scale. At the end, accumulator `t` is
//! exactly row `t` of the `4 × NR` block of `C` (a contiguous 4-float store).
//!
//! Live registers (tokens = 4): 8 weight vectors, 2 activation vectors, 4 partial sums, 4 f32
//! accumulators (plus 4 `i32` accumulators for Q4_K), the scales and a few constants: about
//! 24 of the 32 vector registers. (In the generated code the `sdot` Q8_0/Q4_0 loops spill
//! one register at 4 tokens; see [`Dot::Q4_K_PAIRED_MAX_TOKENS`] for Q4_K.) The weight
//! scales of the four rows are gathered into one vector and widened from f16 with `fcvtl`;
//! the Q8_0 activation scales come as f32 from [`Tile::ascale`].
//!
//! * Q8_0 · Q8_0: the i8 weights and activations go straight into the dot products.
//! * Q4_0 · Q8_0: nibbles are unpacked with `and`/`ushr` and offset by −8 (`[-8, 7]`), so
//!   the dot product is `Σ(q−8)·a` directly (equal to scalar's `Σq·a − 8·Σa`).
//! * Q4_K · Q8_K: per super-block the 6-bit scales and mins of the four rows are unpacked
//!   together (a 4×4 transpose of their 32-bit words, byte shifts and inserts, then a shift
//!   and a mask pick sub-block `j`'s value of each row), the sub-block sums are multiplied
//!   by their scales in `i32` (`mla`), and the min term `Σ m_j·(bsums[2j] + bsums[2j+1])` is
//!   taken from the activation `bsums`, both exactly, then scaled by `d`/`dmin` in f32. The
//!   sub-blocks are walked by a loop (one or two sub-blocks per iteration), not unrolled:
//!   unrolled, LLVM hoists all the dot products of the super-block above their reductions
//!   and spills most of them.
//!
//! Edge tiles: rows beyond `rows` reuse the last valid row (computed, never stored); the
//! token count selects a monomorphized kernel for 1, 2, 3 or 4 tokens.
//!
//! # Dot product instruction
//! With the `dotprod` extension (Armv8.2 `FEAT_DotProd`, detected at run time) the 32-wide dot
//! product is two `sdot`. The `vdotq_s32` intrinsic is not stable Rust yet, so `sdot` is
//! emitted by `asm!` inside `#[target_feature(enable = "neon,dotprod")]` functions. Without
//! it, `smull`/`smlal` (+`2`) form products in `i16` (two products per lane: at most
//! `2·128·127 = 32512` in magnitude while one factor stays within ±127, which holds for every
//! format here, see [`Mull`]) and `saddlp`/`sadalp` widen them to `i32`. [`table`] picks the
//! table at run time.
//!
//! # Activation quantizers
//! They vectorize GGML's reference quantizers operation by operation, so their bytes are the
//! reference's on every input: the abs-max ignores NaN (lanes masked to 0) and Q8_K's signed
//! max takes the first one of largest magnitude (a scalar search only when both signs reach
//! it); Q8_0 rounds with `fcvtas` (half away from zero, saturating, NaN → 0, as Rust's
//! `round() as i8`) and saturating narrows; Q8_K replays `nearest_int`'s `1.5·2²³` bit trick,
//! `min(127)` and the truncating `as i8` with `and`/`sub`/`smin`/`xtn`. The scale's f16
//! conversion and reciprocal stay scalar.

use super::{BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, Kernels, QK, QK_K, Table, Tile};
use bytemuck::Zeroable;
use half::f16;
use std::arch::aarch64::*;
use std::mem::size_of;

/// Weight rows per tile.
const MR: usize = 4;
/// Tokens per tile.
const NR: usize = 4;

/// Kernels for CPUs with the `dotprod` extension (`sdot`).
static TABLE_DOTPROD: Table = Table {
    q8_0: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q8_0_sdot,
        gemv: None,
        panel: None,
    },
    q4_0: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q4_0_sdot,
        gemv: None,
        panel: None,
    },
    q4_k: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q4_k_sdot,
        gemv: None,
        panel: None,
    },
    quantize_q8_0,
    quantize_q8_k,
};

/// Kernels for baseline NEON (widening multiplies).
static TABLE_NEON: Table = Table {
    q8_0: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q8_0_mull,
        gemv: None,
        panel: None,
    },
    q4_0: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q4_0_mull,
        gemv: None,
        panel: None,
    },
    q4_k: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q4_k_mull,
        gemv: None,
        panel: None,
    },
    quantize_q8_0,
    quantize_q8_k,
};

/// Whether this CPU has `sdot` (the standard library caches the detection).
fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// The table for this CPU: `sdot` kernels where `dotprod` is available, else the baseline.
pub(super) fn table() -> &'static Table {
    if has_dotprod() {
        &TABLE_DOTPROD
    } else {
        &TABLE_NEON
    }
}

// ---------------------------------------------------------------------------------------
// The 32-wide i8 dot product.

/// A 32-wide dot product of i8 vectors into four `i32` lanes.
trait Dot {
    /// Four lanes whose sum is `Σ_{i<16} w0[i]·a0[i] + w1[i]·a1[i]`.
    ///
    /// # Safety
    /// The CPU has the implementation's features, and its range condition holds.
    unsafe fn dot32(w0: int8x16_t, w1: int8x16_t, a0: int8x16_t, a1: int8x16_t) -> int32x4_t;

    /// Up to this many tokens the Q4_K tile handles the two sub-blocks of a 32-byte quant
    /// group in one loop iteration (one load and one `and`/`ushr` per vector); above it, one
    /// sub-block per iteration (a `ushl` by a run-time count and an `and`), which needs fewer
    /// registers. Chosen from the generated code: with `sdot` the paired loop is the shorter
    /// one at every token count despite a few spills; with `smull` it spills heavily from 3.
    const Q4_K_PAIRED_MAX_TOKENS: usize;
}

/// `sdot` (FEAT_DotProd): exact for all i8 inputs. Only inlined into
/// `#[target_feature(enable = "neon,dotprod")]` functions.
struct SDot;

impl Dot for SDot {
    const Q4_K_PAIRED_MAX_TOKENS: usize = NR;

    #[inline(always)]
    unsafe fn dot32(w0: int8x16_t, w1: int8x16_t, a0: int8x16_t, a1: int8x16_t) -> int32x4_t {
        // SAFETY: the caller guarantees NEON and dotprod; the asm only reads and writes
        // registers.
        unsafe {
            let mut acc = vdupq_n_s32(0);
            core::arch::asm!(
                "sdot {acc:v}.4s, {w0:v}.16b, {a0:v}.16b",
                "sdot {acc:v}.4s, {w1:v}.16b, {a1:v}.16b",
                acc = inout(vreg) acc,
                w0 = in(vreg) w0,
                w1 = in(vreg) w1,
                a0 = in(vreg) a0,
                a1 = in(vreg) a1,
                options(pure, nomem, nostack, preserves_flags)
            );
            acc
        }
    }
}

/// Baseline NEON: `smull`/`smlal` sum two products per `i16` lane, `saddlp`/`sadalp` widen.
///
/// Range condition: `|w0[i]·a0[i] + w1[i]·a1[i]| <= 32767` for every `i`, true whenever one
/// of the two factors lies in `[-127, 127]` (`2·128·127 = 32512`): Q8_0 activations (the
/// quantizers never produce −128 where it matters, see [`quantize_q8_0`], and [`super::dot`]
/// rejects it), Q4_0 weights (`[-8, 7]`) and Q4_K weights (`[0, 15]`).
struct Mull;

impl Dot for Mull {
    const Q4_K_PAIRED_MAX_TOKENS: usize = 2;

    #[inline(always)]
    unsafe fn dot32(w0: int8x16_t, w1: int8x16_t, a0: int8x16_t, a1: int8x16_t) -> int32x4_t {
        // SAFETY: NEON is available; the range condition keeps the i16 sums exact.
        unsafe {
            let lo = vmull_s8(vget_low_s8(w0), vget_low_s8(a0));
            let lo = vmlal_s8(lo, vget_low_s8(w1), vget_low_s8(a1));
            let hi = vmull_high_s8(w0, a0);
            let hi = vmlal_high_s8(hi, w1, a1);
            vpadalq_s16(vpaddlq_s16(lo), hi)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// Widens four f16 (their bits) to f32 with FCVTL (base Armv8.0 Advanced SIMD; the f16
/// vector types and `vcvt_f32_f16` are not stable Rust yet).
#[inline(always)]
unsafe fn cvt_f16x4(h: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: NEON is available (caller); the asm only converts registers.
    unsafe {
        core::arch::asm!(
            "fcvtl {out:v}.4s, {h:v}.4h",
            h = in(vreg) h,
            out = lateout(vreg) out,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

/// The f16 at each of four addresses (2-byte aligned), widened to f32, in lanes 0..3.
///
/// # Safety
/// NEON; each pointer is 2-byte aligned and readable for 2 bytes.
#[inline(always)]
unsafe fn load_f16x4(p: [*const u8; 4]) -> float32x4_t {
    // SAFETY: as the caller guarantees.
    unsafe {
        let h = vld1_dup_u16(p[0].cast());
        let h = vld1_lane_u16::<1>(p[1].cast(), h);
        let h = vld1_lane_u16::<2>(p[2].cast(), h);
        let h = vld1_lane_u16::<3>(p[3].cast(), h);
        cvt_f16x4(h)
    }
}

/// `[Σ p[0], Σ p[1], Σ p[2], Σ p[3]]`: the four rows' sums (exact in i32 for every sum here).
#[inline(always)]
unsafe fn hsum4(p: &[int32x4_t; MR]) -> int32x4_t {
    // SAFETY: NEON is available (caller).
    unsafe { vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3])) }
}

/// Byte pointers to the `MR` weight rows of a tile; rows past `t.rows` repeat the last one
/// (their results are computed but never stored).
///
/// # Safety
/// `t` satisfies the [`super::TileFn`] contract (`rows >= 1`).
#[inline(always)]
unsafe fn row_ptrs<W: tessera_core::quant::WeightBlock>(t: &Tile<W>) -> [*const u8; MR] {
    let mut w = [t.w.cast::<u8>(); MR];
    for (r, p) in w.iter_mut().enumerate() {
        // SAFETY: row min(r, rows − 1) < rows starts at w + row·ldw inside the weights.
        *p = unsafe { t.w.add(r.min(t.rows - 1) * t.ldw) }.cast();
    }
    w
}

/// Byte pointers to the `NT` activation rows of a tile, padded to 4 by repeating the last.
///
/// # Safety
/// `t` satisfies the [`super::TileFn`] contract and `1 <= NT <= t.tokens`.
#[inline(always)]
unsafe fn token_ptrs<W: tessera_core::quant::WeightBlock, const NT: usize>(
    t: &Tile<W>,
) -> [*const u8; NR] {
    let mut a = [t.a.cast::<u8>(); NR];
    for (k, p) in a.iter_mut().enumerate() {
        // SAFETY: token min(k, NT − 1) < tokens starts at a + token·lda.
        *p = unsafe { t.a.add(k.min(NT - 1) * t.lda) }.cast();
    }
    a
}

/// Offsets every pointer by `off` bytes.
///
/// # Safety
/// Each result stays inside the allocation of its pointer.
#[inline(always)]
unsafe fn offset<const N: usize>(p: &[*const u8; N], off: usize) -> [*const u8; N] {
    let mut q = *p;
    for x in q.iter_mut() {
        // SAFETY: as the caller guarantees.
        *x = unsafe { x.add(off) };
    }
    q
}

/// Stores accumulator `k` (lanes: rows) to `C[k, 0..rows]`.
///
/// # Safety
/// NEON; `t` satisfies the [`super::TileFn`] contract and `NT <= t.tokens`.
#[inline(always)]
unsafe fn store<W: tessera_core::quant::WeightBlock, const NT: usize>(
    t: &Tile<W>,
    acc: &[float32x4_t; NT],
) {
    for (k, &v) in acc.iter().enumerate() {
        // SAFETY: token k < tokens, and exactly C[k, 0..rows] is written (rows <= 4), which
        // is in bounds.
        unsafe {
            let c = t.c.add(k * t.ldc);
            match t.rows {
                1 => vst1q_lane_f32::<0>(c, v),
                2 => vst1_f32(c, vget_low_f32(v)),
                3 => {
                    vst1_f32(c, vget_low_f32(v));
                    vst1q_lane_f32::<2>(c.add(2), v);
                }
                _ => vst1q_f32(c, v),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tile kernels.

/// Q8_0 weights · Q8_0 activations (byte offsets in a block: `d` 0, `qs` 2..34).
///
/// # Safety
/// [`super::TileFn`]'s contract, `NT == t.tokens`, and the CPU has `D`'s features.
#[inline(always)]
unsafe fn q8_0_tile<D: Dot, const NT: usize>(t: &Tile<BlockQ8_0>) {
    const BS: usize = size_of::<BlockQ8_0>();
    // SAFETY: every pointer below addresses block i < kb of a valid row or token: d (2-byte
    // aligned, as the blocks are) and the 32 quants at 2..34, or that token's block scale at
    // ascale + k·lda + i; the output stores are `store`'s.
    unsafe {
        let w = row_ptrs(t);
        let a = token_ptrs::<_, NT>(t);
        let mut acc = [vdupq_n_f32(0.0); NT];
        for i in 0..t.kb {
            let wb = offset(&w, i * BS);
            let ab = offset(&a, i * BS);
            let dw = load_f16x4(wb);
            let mut wq = [[vdupq_n_s8(0); 2]; MR];
            for r in 0..MR {
                wq[r] = [
                    vld1q_s8(wb[r].add(2).cast()),
                    vld1q_s8(wb[r].add(18).cast()),
                ];
            }
            for k in 0..NT {
                let a0 = vld1q_s8(ab[k].add(2).cast());
                let a1 = vld1q_s8(ab[k].add(18).cast());
                let mut p = [vdupq_n_s32(0); MR];
                for r in 0..MR {
                    p[r] = D::dot32(wq[r][0], wq[r][1], a0, a1);
                }
                let isum = vcvtq_f32_s32(hsum4(&p));
                let da = *t.ascale.add(k * t.lda + i);
                acc[k] = vfmaq_f32(acc[k], isum, vmulq_n_f32(dw, da));
            }
        }
        store(t, &acc);
    }
}

/// Q4_0 weights · Q8_0 activations (weight block: `d` 0, nibbles 2..18).
///
/// # Safety
/// As [`q8_0_tile`].
#[inline(always)]
unsafe fn q4_0_tile<D: Dot, const NT: usize>(t: &Tile<BlockQ4_0>) {
    const BS: usize = size_of::<BlockQ4_0>();
    const AS: usize = size_of::<BlockQ8_0>();
    // SAFETY: as in `q8_0_tile`; a weight block's 16 nibble bytes are at 2..18.
    unsafe {
        let w = row_ptrs(t);
        let a = token_ptrs::<_, NT>(t);
        let nib = vdupq_n_u8(0x0f);
        let eight = vdupq_n_s8(8);
        let mut acc = [vdupq_n_f32(0.0); NT];
        for i in 0..t.kb {
            let wb = offset(&w, i * BS);
            let ab = offset(&a, i * AS);
            let dw = load_f16x4(wb);
            let mut wq = [[vdupq_n_s8(0); 2]; MR];
            for r in 0..MR {
                let raw = vld1q_u8(wb[r].add(2));
                // Weights 0..16 (low nibbles) and 16..32 (high nibbles), as q − 8.
                let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, nib)), eight);
                let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw)), eight);
                wq[r] = [lo, hi];
            }
            for k in 0..NT {
                let a0 = vld1q_s8(ab[k].add(2).cast());
                let a1 = vld1q_s8(ab[k].add(18).cast());
                let mut p = [vdupq_n_s32(0); MR];
                for r in 0..MR {
                    p[r] = D::dot32(wq[r][0], wq[r][1], a0, a1);
                }
                let isum = vcvtq_f32_s32(hsum4(&p));
                let da = *t.ascale.add(k * t.lda + i);
                acc[k] = vfmaq_f32(acc[k], isum, vmulq_n_f32(dw, da));
            }
        }
        store(t, &acc);
    }
}

/// The 6-bit scales and mins of four Q4_K rows, one byte per (row, sub-block): byte
/// `4·row + j` of `sc[0]` is row `row`'s scale of sub-block `j`, of `sc[1]` of sub-block
/// `4 + j`; likewise `m` for the mins.
struct ScalesMins {
    sc: [uint8x16_t; 2],
    m: [uint8x16_t; 2],
}

/// Unpacks the scales and mins of the four rows' blocks `wb` (block: `d` 0, `dmin` 2,
/// `scales` 4..16, `qs` 16..144), as [`tessera_core::quant::scale_min_k4`] does.
///
/// # Safety
/// NEON; each pointer addresses a whole `BlockQ4_K`.
#[inline(always)]
unsafe fn q4_k_scales(wb: &[*const u8; MR]) -> ScalesMins {
    // SAFETY: bytes 4..20 of each block (the 12 scale bytes and 4 quant bytes) are in bounds.
    unsafe {
        let r0 = vreinterpretq_u32_u8(vld1q_u8(wb[0].add(4)));
        let r1 = vreinterpretq_u32_u8(vld1q_u8(wb[1].add(4)));
        let r2 = vreinterpretq_u32_u8(vld1q_u8(wb[2].add(4)));
        let r3 = vreinterpretq_u32_u8(vld1q_u8(wb[3].add(4)));
        // Transpose the 32-bit words: q_w = word w (bytes 4w..4w+4 of `scales`) of rows 0..3.
        let t01e = vreinterpretq_u64_u32(vtrn1q_u32(r0, r1));
        let t01o = vreinterpretq_u64_u32(vtrn2q_u32(r0, r1));
        let t23e = vreinterpretq_u64_u32(vtrn1q_u32(r2, r3));
        let t23o = vreinterpretq_u64_u32(vtrn2q_u32(r2, r3));
        let q0 = vreinterpretq_u8_u64(vtrn1q_u64(t01e, t23e));
        let q1 = vreinterpretq_u8_u64(vtrn1q_u64(t01o, t23o));
        let q2 = vreinterpretq_u8_u64(vtrn2q_u64(t01e, t23e));
        let six = vdupq_n_u8(0x3f);
        // j < 4: scale = q[j] & 63, min = q[j + 4] & 63.
        // j >= 4: scale = (q[j + 4] & 15) | (q[j − 4] >> 6) << 4,
        //         min   = (q[j + 4] >> 4) | (q[j] >> 6) << 4.
        ScalesMins {
            sc: [
                vandq_u8(q0, six),
                vsliq_n_u8::<4>(vandq_u8(q2, vdupq_n_u8(0x0f)), vshrq_n_u8::<6>(q0)),
            ],
            m: [
                vandq_u8(q1, six),
                vsliq_n_u8::<4>(vshrq_n_u8::<4>(q2), vshrq_n_u8::<6>(q1)),
            ],
        }
    }
}

/// Byte `J` (0..3) of each 32-bit lane of `v`, zero-extended: sub-block `J` (or `4 + J`) of
/// each row from a [`ScalesMins`] vector.
#[inline(always)]
unsafe fn pick<const J: usize>(v: uint8x16_t) -> int32x4_t {
    // SAFETY: NEON is available (caller).
    unsafe {
        let v = vreinterpretq_u32_u8(v);
        let ff = vdupq_n_u32(0xff);
        vreinterpretq_s32_u32(match J {
            0 => vandq_u32(v, ff),
            1 => vandq_u32(vshrq_n_u32::<8>(v), ff),
            2 => vandq_u32(vshrq_n_u32::<16>(v), ff),
            _ => vshrq_n_u32::<24>(v),
        })
    }
}

/// One Q4_K sub-block of the tile: `isum[k] += sc · (dot products of the four rows' 32
/// nibbles at `wb + q_off` (the low ones for `shift` 0, the high ones for 4) with token `k`'s
/// 32 quants at `ab[k] + a_off`)`.
///
/// With `FIXED` the caller passes `shift` as a constant and the nibbles are split with one
/// `and` or `ushr`; otherwise `shift` is a run-time value and they take a `ushl` by the
/// negated count and an `and`.
///
/// # Safety
/// NEON and `D`'s features; 32 bytes at each `wb[r] + q_off` and `ab[k] + a_off` (k < NT).
#[inline(always)]
unsafe fn q4_k_sub<D: Dot, const NT: usize, const FIXED: bool>(
    wb: &[*const u8; MR],
    q_off: usize,
    shift: usize,
    ab: &[*const u8; NR],
    a_off: usize,
    sc: int32x4_t,
    isum: &mut [int32x4_t; NT],
) {
    // SAFETY: as the caller guarantees.
    unsafe {
        let nib = vdupq_n_u8(0x0f);
        let right = vdupq_n_s8(-(shift as i8));
        let mut wq = [[vdupq_n_s8(0); 2]; MR];
        for r in 0..MR {
            let q = wb[r].add(q_off);
            let (raw0, raw1) = (vld1q_u8(q), vld1q_u8(q.add(16)));
            let (w0, w1) = if !FIXED {
                (
                    vandq_u8(vshlq_u8(raw0, right), nib),
                    vandq_u8(vshlq_u8(raw1, right), nib),
                )
            } else if shift == 0 {
                (vandq_u8(raw0, nib), vandq_u8(raw1, nib))
            } else {
                (vshrq_n_u8::<4>(raw0), vshrq_n_u8::<4>(raw1))
            };
            wq[r] = [vreinterpretq_s8_u8(w0), vreinterpretq_s8_u8(w1)];
        }
        for k in 0..NT {
            let qa = ab[k].add(a_off);
            let (a0, a1) = (vld1q_s8(qa.cast()), vld1q_s8(qa.add(16).cast()));
            let mut p = [vdupq_n_s32(0); MR];
            for r in 0..MR {
                p[r] = D::dot32(wq[r][0], wq[r][1], a0, a1);
            }
            isum[k] = vmlaq_s32(isum[k], hsum4(&p), sc);
        }
    }
}

/// Q4_K weights · Q8_K activations (activation block: `d` 0 (f32), `qs` 4..260, `bsums`
/// 260..292).
///
/// # Safety
/// As [`q8_0_tile`].
#[inline(always)]
unsafe fn q4_k_tile<D: Dot, const NT: usize>(t: &Tile<BlockQ4_K>) {
    const BS: usize = size_of::<BlockQ4_K>();
    const AS: usize = size_of::<BlockQ8_K>();
    // SAFETY: every pointer addresses super-block i < kb of a valid row or token, inside its
    // block (offsets above); Q8_K blocks are 4-byte aligned, so `d` and `bsums` are aligned.
    unsafe {
        let w = row_ptrs(t);
        let a = token_ptrs::<_, NT>(t);
        let mut acc = [vdupq_n_f32(0.0); NT];
        for i in 0..t.kb {
            let wb = offset(&w, i * BS);
            let ab = offset(&a, i * AS);
            let sm = q4_k_scales(&wb);
            // Σ_j sc_j · (sub-block j's dot product), exact: |.| <= 8·63·32·15·128 < 2³¹.
            // Sub-block j: the low (even j) or high (odd j) nibbles of quant bytes
            // 32·(j/2)..+32 (block bytes 16 + ...), with activation quants 32j..32j+32.
            let sc = [
                pick::<0>(sm.sc[0]),
                pick::<1>(sm.sc[0]),
                pick::<2>(sm.sc[0]),
                pick::<3>(sm.sc[0]),
                pick::<0>(sm.sc[1]),
                pick::<1>(sm.sc[1]),
                pick::<2>(sm.sc[1]),
                pick::<3>(sm.sc[1]),
            ];
            let mut isum = [vdupq_n_s32(0); NT];
            if NT <= D::Q4_K_PAIRED_MAX_TOKENS {
                // Both sub-blocks of a 32-byte group: the quant bytes are loaded once and
                // split with `and` / `ushr`.
                for g in 0..QK_K / 64 {
                    let (q_off, a_off) = (16 + 32 * g, 4 + 64 * g);
                    let (lo, hi) = (sc[2 * g], sc[2 * g + 1]);
                    q4_k_sub::<D, NT, true>(&wb, q_off, 0, &ab, a_off, lo, &mut isum);
                    q4_k_sub::<D, NT, true>(&wb, q_off, 4, &ab, a_off + 32, hi, &mut isum);
                }
            } else {
                // One sub-block per iteration, the nibble chosen by a shift count in a
                // register: with more tokens, two sub-blocks per iteration run out of
                // registers (LLVM schedules the second one's products ahead of the first
                // one's reductions and spills; see `Dot::Q4_K_PAIRED_MAX_TOKENS`).
                for (j, &sc) in sc.iter().enumerate() {
                    let q_off = 16 + 32 * (j / 2);
                    let (shift, a_off) = (4 * (j % 2), 4 + 32 * j);
                    q4_k_sub::<D, NT, false>(&wb, q_off, shift, &ab, a_off, sc, &mut isum);
                }
            }
            let d = load_f16x4(wb);
            let dmin = load_f16x4(offset(&wb, 2));
            let m = [
                pick::<0>(sm.m[0]),
                pick::<1>(sm.m[0]),
                pick::<2>(sm.m[0]),
                pick::<3>(sm.m[0]),
                pick::<0>(sm.m[1]),
                pick::<1>(sm.m[1]),
                pick::<2>(sm.m[1]),
                pick::<3>(sm.m[1]),
            ];
            for k in 0..NT {
                // bp_j = bsums[2j] + bsums[2j + 1] (widened: no i16 overflow whatever bsums).
                let bs = ab[k].add(260).cast::<i16>();
                let lo = vpaddlq_s16(vld1q_s16(bs));
                let hi = vpaddlq_s16(vld1q_s16(bs.add(8)));
                // Σ_j m_j · bp_j, exact: |.| <= 8·63·65534 < 2³¹.
                let mut mins = vmulq_laneq_s32::<0>(m[0], lo);
                mins = vmlaq_laneq_s32::<1>(mins, m[1], lo);
                mins = vmlaq_laneq_s32::<2>(mins, m[2], lo);
                mins = vmlaq_laneq_s32::<3>(mins, m[3], lo);
                mins = vmlaq_laneq_s32::<0>(mins, m[4], hi);
                mins = vmlaq_laneq_s32::<1>(mins, m[5], hi);
                mins = vmlaq_laneq_s32::<2>(mins, m[6], hi);
                mins = vmlaq_laneq_s32::<3>(mins, m[7], hi);
                let da = *ab[k].cast::<f32>();
                acc[k] = vfmaq_f32(acc[k], vcvtq_f32_s32(isum[k]), vmulq_n_f32(d, da));
                acc[k] = vfmsq_f32(acc[k], vcvtq_f32_s32(mins), vmulq_n_f32(dmin, da));
            }
        }
        store(t, &acc);
    }
}

/// Defines a tile entry point: `#[target_feature]`, dispatching on the token count.
macro_rules! tile_entry {
    ($name:ident, $W:ty, $imp:ident, $D:ty, $features:literal) => {
        /// # Safety
        /// See [`super::TileFn`]; the CPU has the features this function enables.
        #[target_feature(enable = $features)]
        unsafe fn $name(t: &Tile<$W>) {
            // SAFETY: forwarded contract; 1 <= tokens <= NR selects the kernel for exactly
            // that many tokens; the features `D` needs are enabled here.
            unsafe {
                match t.tokens {
                    1 => $imp::<$D, 1>(t),
                    2 => $imp::<$D, 2>(t),
                    3 => $imp::<$D, 3>(t),
                    _ => $imp::<$D, 4>(t),
                }
            }
        }
    };
}

tile_entry!(tile_q8_0_sdot, BlockQ8_0, q8_0_tile, SDot, "neon,dotprod");
tile_entry!(tile_q4_0_sdot, BlockQ4_0, q4_0_tile, SDot, "neon,dotprod");
tile_entry!(tile_q4_k_sdot, BlockQ4_K, q4_k_tile, SDot, "neon,dotprod");
tile_entry!(tile_q8_0_mull, BlockQ8_0, q8_0_tile, Mull, "neon");
tile_entry!(tile_q4_0_mull, BlockQ4_0, q4_0_tile, Mull, "neon");
tile_entry!(tile_q4_k_mull, BlockQ4_K, q4_k_tile, Mull, "neon");

// ---------------------------------------------------------------------------------------
// Activation quantizers.

/// `|v|` with NaN lanes replaced by +0 (GGML's `amax < |v|` skips NaN; amax starts at 0).
#[inline(always)]
unsafe fn abs_no_nan(v: float32x4_t) -> float32x4_t {
    // SAFETY: NEON is available (caller).
    unsafe {
        vreinterpretq_f32_u32(vandq_u32(
            vreinterpretq_u32_f32(vabsq_f32(v)),
            vceqq_f32(v, v),
        ))
    }
}

/// `v` with NaN lanes replaced by +0.
#[inline(always)]
unsafe fn no_nan(v: float32x4_t) -> float32x4_t {
    // SAFETY: NEON is available (caller).
    unsafe { vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), vceqq_f32(v, v))) }
}

/// Q8_0: the same bytes as [`BlockQ8_0::quantize_block`] (see the module doc).
///
/// The quants lie in `[-127, 127]` except when `1/d` overflows to infinity (`amax` below
/// about `127·2⁻¹²⁸`): then an extreme value may saturate to −128, but the block's f16 scale
/// is 0, so the products the Q8_0 kernels form with it are multiplied by 0 (the range
/// condition of [`Mull`] may fail only there, and the wrapped sum is finite).
///
/// # Safety
/// See [`super::QuantizeFn`]; NEON is available.
#[target_feature(enable = "neon")]
unsafe fn quantize_q8_0(x: *const f32, nb: usize, out: *mut BlockQ8_0, sums: *mut i32) {
    for b in 0..nb {
        // SAFETY: block b < nb: 32 floats at x + 32b, one block at out + b (aligned, from a
        // slice; `d` at byte 0, `qs` at 2..34) and one i32 at sums + b.
        unsafe {
            let xb = x.add(b * QK);
            let mut v = [vdupq_n_f32(0.0); QK / 4];
            for (i, vi) in v.iter_mut().enumerate() {
                *vi = vld1q_f32(xb.add(4 * i));
            }
            let m0 = vmaxq_f32(abs_no_nan(v[0]), abs_no_nan(v[1]));
            let m1 = vmaxq_f32(abs_no_nan(v[2]), abs_no_nan(v[3]));
            let m2 = vmaxq_f32(abs_no_nan(v[4]), abs_no_nan(v[5]));
            let m3 = vmaxq_f32(abs_no_nan(v[6]), abs_no_nan(v[7]));
            let amax = vmaxvq_f32(vmaxq_f32(vmaxq_f32(m0, m1), vmaxq_f32(m2, m3)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let vid = vdupq_n_f32(id);
            // round(v·id) half away from zero, saturated to i32 (NaN → 0), then saturating
            // narrows to i8: the saturating `as i8` of the rounded value.
            let mut q = [vdupq_n_s32(0); QK / 4];
            for i in 0..QK / 4 {
                q[i] = vcvtaq_s32_f32(vmulq_f32(v[i], vid));
            }
            let h0 = vqmovn_high_s32(vqmovn_s32(q[0]), q[1]);
            let h1 = vqmovn_high_s32(vqmovn_s32(q[2]), q[3]);
            let h2 = vqmovn_high_s32(vqmovn_s32(q[4]), q[5]);
            let h3 = vqmovn_high_s32(vqmovn_s32(q[6]), q[7]);
            let q0 = vqmovn_high_s16(vqmovn_s16(h0), h1);
            let q1 = vqmovn_high_s16(vqmovn_s16(h2), h3);
            let o = out.add(b);
            std::ptr::addr_of_mut!((*o).d).write(f16::from_f32(d));
            let qs = std::ptr::addr_of_mut!((*o).qs).cast::<i8>();
            vst1q_s8(qs, q0);
            vst1q_s8(qs.add(16), q1);
            *sums.add(b) = i32::from(vaddlvq_s8(q0)) + i32::from(vaddlvq_s8(q1));
        }
    }
}

/// Q8_K: the same bytes as [`BlockQ8_K::quantize_block`] (see the module doc).
///
/// # Safety
/// See [`super::QuantizeFn`]; NEON is available.
#[target_feature(enable = "neon")]
unsafe fn quantize_q8_k(x: *const f32, nb: usize, out: *mut BlockQ8_K, sums: *mut i32) {
    for b in 0..nb {
        // SAFETY: block b < nb: 256 floats at x + 256b, one block at out + b (aligned, from a
        // slice) and one i32 at sums + b.
        unsafe {
            let xb = x.add(b * QK_K);
            let o = out.add(b);
            // Largest and smallest non-NaN values (NaN lanes read as 0, which changes neither
            // the abs-max, as amax starts at 0, nor which sign reaches it when amax > 0).
            let mut hi = [vdupq_n_f32(0.0); 4];
            let mut lo = [vdupq_n_f32(0.0); 4];
            for i in (0..QK_K).step_by(16) {
                for u in 0..4 {
                    let v = no_nan(vld1q_f32(xb.add(i + 4 * u)));
                    hi[u] = vmaxq_f32(hi[u], v);
                    lo[u] = vminq_f32(lo[u], v);
                }
            }
            let hi = vmaxvq_f32(vmaxq_f32(vmaxq_f32(hi[0], hi[1]), vmaxq_f32(hi[2], hi[3])));
            let lo = vminvq_f32(vminq_f32(vminq_f32(lo[0], lo[1]), vminq_f32(lo[2], lo[3])));
            let amax = if hi >= -lo { hi } else { -lo };
            if amax == 0.0 {
                o.write(BlockQ8_K::zeroed());
                *sums.add(b) = 0;
                continue;
            }
            // The value with the largest magnitude, the first one if both signs reach it.
            let max = if hi != -lo {
                if hi == amax { hi } else { lo }
            } else {
                let xs = std::slice::from_raw_parts(xb, QK_K);
                *xs.iter().find(|v| v.abs() == amax).unwrap_or(&amax)
            };
            let iscale = -127.0 / max;
            let vis = vdupq_n_f32(iscale);
            let magic = vdupq_n_f32(12_582_912.0);
            let mant = vdupq_n_u32(0x007f_ffff);
            let half = vdupq_n_s32(0x0040_0000);
            let cap = vdupq_n_s32(127);
            let qs = std::ptr::addr_of_mut!((*o).qs).cast::<i8>();
            let bsums = std::ptr::addr_of_mut!((*o).bsums).cast::<i16>();
            let mut total = 0i32;
            for g in 0..QK_K / 16 {
                let mut q = [vdupq_n_s32(0); 4];
                for (u, qu) in q.iter_mut().enumerate() {
                    // nearest_int(iscale·v).min(127): (bits(iscale·v + 1.5·2²³) & 0x7fffff)
                    // − 0x400000.
                    let f = vaddq_f32(vmulq_f32(vis, vld1q_f32(xb.add(16 * g + 4 * u))), magic);
                    let n = vreinterpretq_s32_u32(vandq_u32(vreinterpretq_u32_f32(f), mant));
                    *qu = vminq_s32(vsubq_s32(n, half), cap);
                }
                // Truncating narrows: the `as i8` of the i32.
                let h0 = vmovn_high_s32(vmovn_s32(q[0]), q[1]);
                let h1 = vmovn_high_s32(vmovn_s32(q[2]), q[3]);
                let q8 = vmovn_high_s16(vmovn_s16(h0), h1);
                vst1q_s8(qs.add(16 * g), q8);
                let s = vaddlvq_s8(q8);
                bsums.add(g).write(s);
                total += i32::from(s);
            }
            std::ptr::addr_of_mut!((*o).d).write(1.0 / iscale);
            *sums.add(b) = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::scalar;
    use super::*;
    use tessera_core::quant::QuantBlock;
    use tessera_core::reference::DotReference;

    const U: f64 = 1.0 / (1u64 << 24) as f64;

    fn gamma(j: usize) -> f64 {
        let ju = j as f64 * U;
        ju / (1.0 - ju)
    }

    /// The NEON tables this CPU runs: always the baseline one, the `sdot` one where detected.
    fn tables() -> Vec<(&'static str, &'static Table)> {
        let mut v = vec![("neon", &TABLE_NEON)];
        if has_dotprod() {
            v.push(("neon+dotprod", &TABLE_DOTPROD));
        }
        v
    }

    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next_u64() % n) as usize
        }
        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next_u64() >> 29) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn byte(&mut self) -> u8 {
            (self.next_u64() >> 20) as u8
        }
    }

    /// Values with zeros, outliers, repeated maxima of both signs, ties of the quantizers'
    /// grids and, with `specials`, NaN, ±inf, −0.0, subnormals and extremes.
    fn values(rng: &mut Rng, len: usize, scale: f32, specials: bool) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let v = rng.unit() * scale;
                match rng.below(if specials { 24 } else { 16 }) {
                    0 => 0.0,
                    1 => v * 8.0,
                    2 => -scale * 2.0,
                    3 => scale * 2.0,
                    4 => (i % 255) as f32 / 127.0 * scale,
                    5 => ((i % 64) as f32 - 32.0 + 0.5) * scale / 64.0,
                    16 => f32::NAN,
                    17 => f32::INFINITY,
                    18 => f32::NEG_INFINITY,
                    19 => -0.0,
                    20 => f32::from_bits(1 + rng.below(1 << 23) as u32) * v.signum(),
                    21 => f32::MAX * v,
                    22 => f32::from_bits(0xffc0_0001 + rng.below(1000) as u32),
                    23 => f32::MIN_POSITIVE * v,
                    _ => v,
                }
            })
            .collect()
    }

    fn check_quantizers(name: &str, t: &Table, x: &[f32]) {
        let nb = x.len() / QK_K;
        let mut want0 = vec![BlockQ8_0::zeroed(); nb * 8];
        let mut wantk = vec![BlockQ8_K::zeroed(); nb];
        let (mut ws0, mut wsk) = (vec![0i32; nb * 8], vec![0i32; nb]);
        let mut got0 = vec![BlockQ8_0::zeroed(); nb * 8];
        let mut gotk = vec![BlockQ8_K::zeroed(); nb];
        let (mut gs0, mut gsk) = (vec![-1i32; nb * 8], vec![-1i32; nb]);
        // SAFETY: NEON is available; x holds nb·256 floats, the outputs nb·8 / nb blocks.
        unsafe {
            (scalar::TABLE.quantize_q8_0)(x.as_ptr(), nb * 8, want0.as_mut_ptr(), ws0.as_mut_ptr());
            (scalar::TABLE.quantize_q8_k)(x.as_ptr(), nb, wantk.as_mut_ptr(), wsk.as_mut_ptr());
            (t.quantize_q8_0)(x.as_ptr(), nb * 8, got0.as_mut_ptr(), gs0.as_mut_ptr());
            (t.quantize_q8_k)(x.as_ptr(), nb, gotk.as_mut_ptr(), gsk.as_mut_ptr());
        }
        for b in 0..nb * 8 {
            assert_eq!(
                bytemuck::bytes_of(&got0[b]),
                bytemuck::bytes_of(&BlockQ8_0::quantize_block(&x[32 * b..32 * b + 32])),
                "{name} q8_0 block {b}: {:?}",
                &x[32 * b..32 * b + 32]
            );
        }
        assert_eq!(gs0, ws0, "{name} q8_0 sums");
        for b in 0..nb {
            assert_eq!(
                bytemuck::bytes_of(&gotk[b]),
                bytemuck::bytes_of(&wantk[b]),
                "{name} q8_K block {b}"
            );
        }
        assert_eq!(gsk, wsk, "{name} q8_K sums");
    }

    #[test]
    fn quantizers_match_the_reference_bytes() {
        let mut rng = Rng(1);
        for case in 0..300 {
            let nb = 1 + rng.below(3);
            let scale = 2f32.powi(rng.below(60) as i32 - 30);
            let x = values(&mut rng, nb * QK_K, scale, case % 2 == 1);
            for (name, t) in tables() {
                check_quantizers(name, t, &x);
            }
        }
    }

    #[test]
    fn quantizer_edge_cases() {
        let mut cases: Vec<Vec<f32>> = vec![
            vec![0.0; QK_K],
            vec![-0.0; QK_K],
            vec![f32::NAN; QK_K],
            vec![f32::INFINITY; QK_K],
            vec![1e-38; QK_K],
            vec![-1e-45; QK_K],
            vec![f32::MAX; QK_K],
        ];
        // Both signs of the max, in either order; ties of both roundings.
        let mut x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 128.0) * 0.25).collect();
        x[7] = 40.0;
        x[200] = -40.0;
        cases.push(x.clone());
        x[7] = -40.0;
        x[200] = 40.0;
        cases.push(x.clone());
        // Block max 127: Q8_0's 1/d and Q8_K's −127/max are exactly ±1, so the halves are
        // exact ties (away from zero for Q8_0, to even for Q8_K).
        let ties: Vec<f32> = (0..QK_K)
            .map(|i| {
                if i % 32 == 0 {
                    127.0
                } else {
                    (i % 254) as f32 - 126.5
                }
            })
            .collect();
        cases.push(ties.iter().map(|v| -v).collect());
        cases.push(ties);
        // Tiny block maxima: 1/d overflows, quants saturate.
        cases.push((0..QK_K).map(|i| (i as f32 - 100.0) * 1e-40).collect());
        let mut nan_inf: Vec<f32> = (0..QK_K).map(|i| i as f32).collect();
        nan_inf[3] = f32::NAN;
        nan_inf[100] = f32::NEG_INFINITY;
        cases.push(nan_inf);
        for x in &cases {
            for (name, t) in tables() {
                check_quantizers(name, t, x);
            }
        }
    }

    /// Random weight blocks: quantized from floats, or random bytes with a moderate scale.
    trait TestWeight: DotReference + Copy {
        fn random(rng: &mut Rng) -> Self;
    }
    fn scale(rng: &mut Rng) -> f16 {
        f16::from_f32(rng.unit().abs() * 0.05 + 1e-3)
    }
    impl TestWeight for BlockQ8_0 {
        fn random(rng: &mut Rng) -> Self {
            let mut b = Self::zeroed();
            b.d = scale(rng);
            match rng.below(4) {
                0 => return Self::quantize_block(&values(rng, QK, 1.0, false)),
                1 => b.qs.fill(i8::MIN),
                _ => b.qs.iter_mut().for_each(|q| *q = rng.byte() as i8),
            }
            b
        }
    }
    impl TestWeight for BlockQ4_0 {
        fn random(rng: &mut Rng) -> Self {
            if rng.below(2) == 0 {
                return Self::quantize_block(&values(rng, QK, 1.0, false));
            }
            let mut b = Self::zeroed();
            b.d = scale(rng);
            b.qs.iter_mut().for_each(|q| *q = rng.byte());
            b
        }
    }
    impl TestWeight for BlockQ4_K {
        fn random(rng: &mut Rng) -> Self {
            if rng.below(2) == 0 {
                return Self::quantize_block(&values(rng, QK_K, 1.0, false));
            }
            let mut b = Self::zeroed();
            b.d = scale(rng);
            b.dmin = scale(rng);
            b.scales.iter_mut().for_each(|q| *q = rng.byte());
            b.qs.iter_mut().for_each(|q| *q = rng.byte());
            b
        }
    }

    /// Activation blocks: quantized from floats, or (for Q8_0) extreme quants ±127.
    fn random_acts<A: QuantBlock>(rng: &mut Rng, n: usize) -> Vec<A> {
        let x = values(rng, n * A::LEN, 1.0, false);
        let mut a = vec![A::zeroed(); n];
        tessera_core::quant::quantize(&x, &mut a).unwrap();
        if A::LEN == QK && rng.below(4) == 0 {
            let bytes: &mut [BlockQ8_0] = bytemuck::cast_slice_mut(&mut a);
            let v = if rng.below(2) == 0 { 127 } else { -127 };
            bytes[rng.below(n as u64)].qs.fill(v);
        }
        a
    }

    /// The sums of the quants of each activation block (what the driver passes as `sums`).
    fn block_sums<A: QuantBlock>(a: &[A]) -> Vec<i32> {
        let bytes: &[u8] = bytemuck::cast_slice(a);
        let (off, len) = if A::LEN == QK { (2, QK) } else { (4, QK_K) };
        bytes
            .chunks_exact(size_of::<A>())
            .map(|b| b[off..off + len].iter().map(|&q| q as i8 as i32).sum())
            .collect()
    }

    /// The scale of each activation block as f32 (what the driver passes as `ascale`).
    fn block_scales<A: QuantBlock>(a: &[A]) -> Vec<f32> {
        let bytes: &[u8] = bytemuck::cast_slice(a);
        bytes
            .chunks_exact(size_of::<A>())
            .map(|b| {
                if A::LEN == QK {
                    f16::from_le_bytes([b[0], b[1]]).to_f32()
                } else {
                    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                }
            })
            .collect()
    }

    /// Every tile shape (rows, tokens 1..=4), a few block counts and strides: each table's
    /// tile kernel against the exact value, with the scalar kernel under the same bound.
    fn check_tiles<W: TestWeight>(kernels: fn(&'static Table) -> &'static Kernels<W>) {
        let mut rng = Rng(W::LEN as u64 * 7 + std::mem::size_of::<W>() as u64);
        for case in 0..120 {
            let kb = 1 + rng.below(if W::LEN == QK { 9 } else { 3 });
            let rows = 1 + case % MR;
            let tokens = 1 + (case / MR) % NR;
            let (ldw, lda, ldc) = (kb + rng.below(2), kb + rng.below(2), rows + rng.below(3));
            let w: Vec<W> = (0..rows * ldw).map(|_| W::random(&mut rng)).collect();
            let a: Vec<W::Act> = random_acts(&mut rng, tokens * lda);
            let sums = block_sums(&a);
            let ascale = block_scales(&a);
            let c_len = (tokens - 1) * ldc + rows;
            let run = |t: &'static Table| {
                let k = kernels(t);
                // (The scalar kernel loops over any tile; the NEON ones take MR x NR.)
                assert!(std::ptr::eq(t, &scalar::TABLE) || (rows <= k.mr && tokens <= k.nr));
                let mut c = vec![f32::NAN; c_len];
                let tile = Tile {
                    kb,
                    w: w.as_ptr(),
                    ldw,
                    rows,
                    a: a.as_ptr(),
                    sums: sums.as_ptr(),
                    ascale: ascale.as_ptr(),
                    lda,
                    tokens,
                    c: c.as_mut_ptr(),
                    ldc,
                };
                // SAFETY: the table runs here; rows <= MR, tokens <= NR, kb >= 1, and the
                // vectors cover every row, token and output of the tile.
                unsafe { (k.tile)(&tile) };
                c
            };
            let want = run(&scalar::TABLE);
            let terms = if W::LEN == QK_K { 2 * kb } else { kb };
            for (name, t) in tables() {
                let got = run(t);
                for tk in 0..tokens {
                    for r in 0..rows {
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for i in 0..kb {
                            let (v, m) = W::dot_terms(&w[r * ldw + i], &a[tk * lda + i]);
                            exact += v[0] + v[1];
                            mag += m;
                        }
                        let tol = gamma(terms + 4) * mag + f32::MIN_POSITIVE as f64;
                        for (who, c) in [(name, &got), ("scalar", &want)] {
                            let v = c[tk * ldc + r] as f64;
                            assert!(
                                (v - exact).abs() <= tol,
                                "{who} {:?} case {case} (kb {kb}, {rows}x{tokens}): C[{tk},{r}] \
                                 = {v}, exact {exact}, tol {tol}",
                                W::FORMAT
                            );
                        }
                    }
                    for r in rows..if tk + 1 < tokens { ldc } else { rows } {
                        assert!(got[tk * ldc + r].is_nan(), "{name}: padding written");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_0_tiles_match_scalar() {
        check_tiles::<BlockQ8_0>(|t| &t.q8_0);
    }

    #[test]
    fn q4_0_tiles_match_scalar() {
        check_tiles::<BlockQ4_0>(|t| &t.q4_0);
    }

    #[test]
    fn q4_k_tiles_match_scalar() {
        check_tiles::<BlockQ4_K>(|t| &t.q4_k);
    }

    #[test]
    fn q4_k_scale_unpacking_matches_scale_min() {
        let mut rng = Rng(99);
        for _ in 0..50 {
            let w: Vec<BlockQ4_K> = (0..MR).map(|_| BlockQ4_K::random(&mut rng)).collect();
            let p: [*const u8; MR] = std::array::from_fn(|r| (&w[r] as *const BlockQ4_K).cast());
            let mut sc = [[0u8; 16]; 2];
            let mut m = [[0u8; 16]; 2];
            // SAFETY: NEON; each pointer addresses a whole block; the stores fill 16 bytes.
            unsafe {
                let sm = q4_k_scales(&p);
                for h in 0..2 {
                    vst1q_u8(sc[h].as_mut_ptr(), sm.sc[h]);
                    vst1q_u8(m[h].as_mut_ptr(), sm.m[h]);
                }
            }
            for (r, b) in w.iter().enumerate() {
                for j in 0..8 {
                    let want = b.scale_min(j);
                    assert_eq!((sc[j / 4][4 * r + j % 4], m[j / 4][4 * r + j % 4]), want);
                }
            }
        }
    }

    #[test]
    fn table_picks_sdot_where_available() {
        let t = table();
        let dot = std::ptr::eq(t, &TABLE_DOTPROD);
        assert_eq!(dot, has_dotprod());
        println!("dotprod detected: {dot}");
    }
}
