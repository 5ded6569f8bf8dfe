//! AVX2 + FMA + F16C variant.
//!
//! Integer products use `vpmaddubsw` (u8 × i8 → pairs summed into i16) followed by
//! `vpmaddwd` (i16 pairs → i32): exact as long as no i16 pair sum saturates, which holds for
//! every operand range used here:
//! * Q8_0·Q8_0: `|w|` (0..=128, as u8) times `sign(a, w)` (|a| ≤ 127, the quantizer's range):
//!   pairs ≤ 2·128·127 < 2¹⁵.
//! * Q4_0·Q8_0 and Q4_K·Q8_K: the nibble codes (0..=15) times any i8: pairs ≤ 2·15·128. Q4_0's
//!   offset of 8 is subtracted as `8·Σa` (the block sums the quantizer provides).
//!
//! Tiles: `MR` weight rows × `NR` tokens of f32 accumulators (8 lanes each); every weight
//! block is loaded and unpacked once per tile, every activation block once per tile. Q4_K
//! tiles take up to 16 tokens: a row's block scales (6-bit packed, the costly part of a
//! Q4_K block to unpack) are unpacked once per 16 blocks and reused by every 4 tokens, which
//! keep their accumulators in registers. Edge
//! tiles point the missing rows / tokens at row / token 0 and discard those results, so no
//! read goes past the operands. One token (decode) takes a GEMV path instead: one weight row
//! at a time, four independent accumulators, and a software prefetch a few blocks ahead, so
//! the weights stream from memory in one linear pass.

// Register tiles are indexed by row and token: index loops read best there.
#![allow(clippy::needless_range_loop)]

use super::{BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, Kernels, QK, QK_K, Table, Tile};
use std::arch::x86_64::*;

pub(super) static TABLE: Table = Table {
    q8_0: Kernels {
        mr: Q8_MR,
        nr: Q8_NR,
        tile: tile_q8_0,
        gemv: None,
    },
    q4_0: Kernels {
        mr: Q4_MR,
        nr: Q4_NR,
        tile: tile_q4_0,
        gemv: None,
    },
    q4_k: Kernels {
        mr: QK_MR,
        nr: QK_NR,
        tile: tile_q4_k,
        gemv: None,
    },
    quantize_q8_0,
    quantize_q8_k,
};

const Q8_MR: usize = 3;
const Q8_NR: usize = 2;
const Q4_MR: usize = 3;
const Q4_NR: usize = 2;
const QK_MR: usize = 1;
/// Tokens of one Q4_K tile call: the rows' block scales are unpacked once per call (per
/// [`QK_KC`] blocks) and reused by every token, instead of once per pair of tokens.
const QK_NR: usize = 16;
/// Tokens whose accumulators a Q4_K tile keeps in registers at a time.
const QK_NT: usize = 4;
/// Blocks whose scales a Q4_K tile unpacks at a time (the rows' blocks stay in L1 while every
/// token pair walks them).
const QK_KC: usize = 16;

/// Blocks ahead of the current one that the GEMV prefetches (about 1 KiB).
const PREFETCH_BYTES: usize = 1024;

// ---------------------------------------------------------------------------------------
// Helpers.

/// Sum of the 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: register-only AVX operations (the caller's target features).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// Sum of the 8 i32 lanes.
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }
}

/// The f16 at `p` widened to f32 and broadcast to 8 lanes.
///
/// # Safety
/// `p` points to 2 readable bytes; F16C is available.
#[inline(always)]
unsafe fn bcast_f16(p: *const u16) -> __m256 {
    // SAFETY: a 2-byte unaligned read of the caller's f16; F16C conversion.
    unsafe {
        let bits = std::ptr::read_unaligned(p);
        _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// `Σ pairs` of `u·s` as 8 i32 lanes (`u` unsigned bytes, `s` signed bytes).
#[inline(always)]
unsafe fn dot_u8i8(u: __m256i, s: __m256i, ones: __m256i) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones) }
}

/// The Q4_0 nibbles of a block as 32 unsigned bytes, in weight order (low nibbles are weights
/// 0..16, high nibbles 16..32).
///
/// # Safety
/// `qs` points to 16 readable bytes.
#[inline(always)]
unsafe fn q4_0_codes(qs: *const u8) -> __m256i {
    // SAFETY: a 16-byte unaligned load inside the block; register-only operations.
    unsafe {
        let x = _mm_loadu_si128(qs.cast());
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(x, m);
        let hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
        _mm256_set_m128i(hi, lo)
    }
}

/// Blocks whose weight scales are converted to f32 at a time.
const KC: usize = 64;

/// The f16 scales (the first two bytes of each block) of blocks `b0 .. b0 + n` (`n ≤ KC`) of
/// each row, as f32: `out[r][i]` for block `b0 + i` of row `r`. Converted 8 at a time.
///
/// # Safety
/// Every row pointer has at least `b0 + n` blocks; F16C is available.
#[inline(always)]
unsafe fn weight_scales<W, const MR: usize>(
    rows: &[*const W; MR],
    b0: usize,
    n: usize,
    out: &mut [[f32; KC]; MR],
) {
    let mut bits = [0u16; KC];
    for (r, &row) in rows.iter().enumerate() {
        for (i, x) in bits.iter_mut().enumerate().take(n) {
            // SAFETY: block b0 + i of the row exists; its first two bytes are its f16 scale.
            *x = unsafe { std::ptr::read_unaligned(row.add(b0 + i).cast::<u16>()) };
        }
        for i in (0..n).step_by(8) {
            // SAFETY: bits and out[r] hold KC ≥ i + 8 entries (KC is a multiple of 8).
            unsafe {
                let h = _mm_loadu_si128(bits.as_ptr().add(i).cast());
                _mm256_storeu_ps(out[r].as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
    }
}

/// Pointers to rows `0..MR` (rows at or beyond `rows` alias row 0: computed, never stored).
#[inline(always)]
fn row_ptrs<T, const N: usize>(base: *const T, ld: usize, count: usize) -> [*const T; N] {
    std::array::from_fn(|i| {
        if i < count {
            base.wrapping_add(i * ld)
        } else {
            base
        }
    })
}

/// Stores the horizontal sums of the tile's accumulators (`C[t, r]`).
///
/// # Safety
/// The tile's output covers `rows × tokens`.
#[inline(always)]
unsafe fn store_tile<W: tessera_core::quant::WeightBlock, const MR: usize, const NR: usize>(
    t: &Tile<W>,
    acc: &[[__m256; NR]; MR],
) {
    for (r, row) in acc.iter().enumerate().take(t.rows) {
        for (j, v) in row.iter().enumerate().take(t.tokens) {
            // SAFETY: r < rows and j < tokens: C[j, r] is inside the output.
            unsafe { *t.c.add(j * t.ldc + r) = hsum(*v) };
        }
    }
}

// ---------------------------------------------------------------------------------------
// Q8_0 · Q8_0.

/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q8_0(t: &Tile<BlockQ8_0>) {
    // SAFETY: forwarded contract.
    unsafe {
        if t.tokens == 1 {
            gemv_q8_0(t)
        } else {
            tile_q8_0_mn::<Q8_MR, Q8_NR>(t)
        }
    }
}

#[inline(always)]
unsafe fn tile_q8_0_mn<const MR: usize, const NR: usize>(t: &Tile<BlockQ8_0>) {
    let wp: [*const BlockQ8_0; MR] = row_ptrs(t.w, t.ldw, t.rows);
    let ap: [*const BlockQ8_0; NR] = row_ptrs(t.a, t.lda, t.tokens);
    let dp: [*const f32; NR] = row_ptrs(t.ascale, t.lda, t.tokens);
    // SAFETY: every pointer is a row / token of the tile (or row / token 0), each with kb
    // blocks (and kb activation scales); the loads read whole blocks.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut wsc = [[0f32; KC]; MR];
        for b0 in (0..t.kb).step_by(KC) {
            let n = KC.min(t.kb - b0);
            weight_scales(&wp, b0, n, &mut wsc);
            for i in 0..n {
                let b = b0 + i;
                let mut av = [_mm256_setzero_si256(); NR];
                let mut ad = [_mm256_setzero_ps(); NR];
                for j in 0..NR {
                    av[j] = _mm256_loadu_si256((&raw const (*ap[j].add(b)).qs).cast());
                    ad[j] = _mm256_broadcast_ss(&*dp[j].add(b));
                }
                for r in 0..MR {
                    let w = _mm256_loadu_si256((&raw const (*wp[r].add(b)).qs).cast());
                    let aw = _mm256_sign_epi8(w, w);
                    let dw = _mm256_broadcast_ss(&wsc[r][i]);
                    for j in 0..NR {
                        let p = dot_u8i8(aw, _mm256_sign_epi8(av[j], w), ones);
                        acc[r][j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_mul_ps(dw, ad[j]),
                            acc[r][j],
                        );
                    }
                }
            }
        }
        store_tile(t, &acc);
    }
}

/// One token: rows one at a time, four blocks per step into independent accumulators.
#[inline(always)]
unsafe fn gemv_q8_0(t: &Tile<BlockQ8_0>) {
    // SAFETY: rows < t.rows of kb blocks each; token 0's kb blocks and scales.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        gemv_rows(t, |row, b| {
            let (blk, a) = (row.add(b), t.a.add(b));
            let w = _mm256_loadu_si256((&raw const (*blk).qs).cast());
            let av = _mm256_loadu_si256((&raw const (*a).qs).cast());
            dot_u8i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(av, w), ones)
        })
    }
}

/// The GEMV walk shared by Q8_0 and Q4_0: for each weight row, `KC` blocks at a time, the
/// products of the weight and activation scales are formed 8 at a time, then `block(row, b)`
/// gives each block's integer partial sums (8 lanes), converted, scaled and added into four
/// accumulators in turn; the weights are prefetched about 1 KiB ahead.
///
/// # Safety
/// The tile has one token; `block` reads only block `b` of `row` and of the activation.
#[inline(always)]
unsafe fn gemv_rows<W>(t: &Tile<W>, block: impl Fn(*const W, usize) -> __m256i)
where
    W: tessera_core::quant::WeightBlock,
{
    let pf = PREFETCH_BYTES / std::mem::size_of::<W>();
    // SAFETY: rows < t.rows of kb blocks each; the activation's kb scales; the prefetch
    // address is computed with wrapping arithmetic and a prefetch never faults.
    unsafe {
        let mut sc = [[0f32; KC]; 1];
        for r in 0..t.rows {
            let row = t.w.add(r * t.ldw);
            let mut acc = [_mm256_setzero_ps(); 4];
            for b0 in (0..t.kb).step_by(KC) {
                let n = KC.min(t.kb - b0);
                weight_scales(&[row], b0, n, &mut sc);
                for i in (0..n).step_by(8) {
                    let p = sc[0].as_mut_ptr().add(i);
                    let d = _mm256_loadu_ps(p);
                    // Past n the products are junk, never used (the activation scales read
                    // there belong to this row's next blocks, or stay inside sc's KC).
                    let da = if b0 + i + 8 <= t.kb {
                        _mm256_loadu_ps(t.ascale.add(b0 + i))
                    } else {
                        let mut tail = [0f32; 8];
                        for (x, v) in tail.iter_mut().zip(b0 + i..t.kb) {
                            *x = *t.ascale.add(v);
                        }
                        _mm256_loadu_ps(tail.as_ptr())
                    };
                    _mm256_storeu_ps(p, _mm256_mul_ps(d, da));
                }
                for i in 0..n {
                    let b = b0 + i;
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b + pf).cast());
                    let p = _mm256_cvtepi32_ps(block(row, b));
                    acc[i % 4] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(&sc[0][i]), acc[i % 4]);
                }
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            *t.c.add(r) = hsum(s);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Q4_0 · Q8_0.

/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4_0(t: &Tile<BlockQ4_0>) {
    // SAFETY: forwarded contract.
    unsafe {
        if t.tokens == 1 {
            gemv_q4_0(t)
        } else {
            tile_q4_0_mn::<Q4_MR, Q4_NR>(t)
        }
    }
}

/// `[8·sum, 0, …, 0]`: subtracted from a block's i32 lanes it removes Q4_0's offset.
#[inline(always)]
unsafe fn q4_0_offset(sum: i32) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe { _mm256_zextsi128_si256(_mm_cvtsi32_si128(sum.wrapping_mul(8))) }
}

#[inline(always)]
unsafe fn tile_q4_0_mn<const MR: usize, const NR: usize>(t: &Tile<BlockQ4_0>) {
    let wp: [*const BlockQ4_0; MR] = row_ptrs(t.w, t.ldw, t.rows);
    let ap: [*const BlockQ8_0; NR] = row_ptrs(t.a, t.lda, t.tokens);
    let sp: [*const i32; NR] = row_ptrs(t.sums, t.lda, t.tokens);
    let dp: [*const f32; NR] = row_ptrs(t.ascale, t.lda, t.tokens);
    // SAFETY: as in `tile_q8_0_mn`; the sums have kb entries per token.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut wsc = [[0f32; KC]; MR];
        for b0 in (0..t.kb).step_by(KC) {
            let n = KC.min(t.kb - b0);
            weight_scales(&wp, b0, n, &mut wsc);
            for i in 0..n {
                let b = b0 + i;
                let mut av = [_mm256_setzero_si256(); NR];
                let mut ad = [_mm256_setzero_ps(); NR];
                let mut off = [_mm256_setzero_si256(); NR];
                for j in 0..NR {
                    av[j] = _mm256_loadu_si256((&raw const (*ap[j].add(b)).qs).cast());
                    ad[j] = _mm256_broadcast_ss(&*dp[j].add(b));
                    off[j] = q4_0_offset(*sp[j].add(b));
                }
                for r in 0..MR {
                    let q = q4_0_codes((&raw const (*wp[r].add(b)).qs).cast());
                    let dw = _mm256_broadcast_ss(&wsc[r][i]);
                    for j in 0..NR {
                        let p = _mm256_sub_epi32(dot_u8i8(q, av[j], ones), off[j]);
                        acc[r][j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_mul_ps(dw, ad[j]),
                            acc[r][j],
                        );
                    }
                }
            }
        }
        store_tile(t, &acc);
    }
}

#[inline(always)]
unsafe fn gemv_q4_0(t: &Tile<BlockQ4_0>) {
    // SAFETY: as in `gemv_q8_0`; the sums have kb entries.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        gemv_rows(t, |row, b| {
            let q = q4_0_codes((&raw const (*row.add(b)).qs).cast());
            let av = _mm256_loadu_si256((&raw const (*t.a.add(b)).qs).cast());
            _mm256_sub_epi32(dot_u8i8(q, av, ones), q4_0_offset(*t.sums.add(b)))
        })
    }
}

// ---------------------------------------------------------------------------------------
// Q4_K · Q8_K.

/// A Q4_K block's sub-block scales, each broadcast to 16 i16 lanes, and its mins laid out
/// against the activation's 16 `bsums` (`[m0, m0, m1, m1, …]`).
struct Q4kScales {
    sc: [__m256i; 8],
    mins: __m256i,
}

#[inline(always)]
unsafe fn q4_k_scales(blk: &BlockQ4_K) -> Q4kScales {
    let mut sc = [0i16; 8];
    let mut mins = [0i16; 16];
    for j in 0..8 {
        let (s, m) = blk.scale_min(j);
        sc[j] = s as i16;
        mins[2 * j] = m as i16;
        mins[2 * j + 1] = m as i16;
    }
    // SAFETY: register operations and an unaligned load of a local array.
    unsafe {
        Q4kScales {
            sc: std::array::from_fn(|j| _mm256_set1_epi16(sc[j])),
            mins: _mm256_loadu_si256(mins.as_ptr().cast()),
        }
    }
}

/// A Q4_K block's scales unpacked for the integer products: the 8 sub-block scales, the
/// mins laid out against the activation's 16 `bsums` (`[m0, m0, m1, m1, …]`), and `d`,
/// `dmin` widened to f32.
#[derive(Clone, Copy)]
struct Q4kUnpacked {
    sc: [i16; 8],
    mins: [i16; 16],
    d: f32,
    dmin: f32,
}

impl Q4kUnpacked {
    const ZERO: Q4kUnpacked = Q4kUnpacked {
        sc: [0; 8],
        mins: [0; 16],
        d: 0.0,
        dmin: 0.0,
    };

    #[inline(always)]
    fn of(blk: &BlockQ4_K) -> Q4kUnpacked {
        let mut u = Q4kUnpacked {
            d: blk.d.to_f32(),
            dmin: blk.dmin.to_f32(),
            ..Q4kUnpacked::ZERO
        };
        for j in 0..8 {
            let (s, m) = blk.scale_min(j);
            u.sc[j] = s as i16;
            u.mins[2 * j] = m as i16;
            u.mins[2 * j + 1] = m as i16;
        }
        u
    }
}

/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4_k(t: &Tile<BlockQ4_K>) {
    // SAFETY: forwarded contract.
    unsafe {
        if t.tokens == 1 {
            tile_q4_k_mn::<1, 1>(t)
        } else {
            tile_q4_k_tokens(t)
        }
    }
}

/// The Q4_K tile of up to [`QK_NR`] tokens: per [`QK_KC`] blocks, the rows' scales are
/// unpacked once, then every pair of tokens walks those blocks with its accumulators in
/// registers (parked in `acc` between block chunks). Per block and (row, token) the
/// arithmetic is `tile_q4_k_mn`'s, in the same order, so the results are the same bits.
#[inline(always)]
unsafe fn tile_q4_k_tokens(t: &Tile<BlockQ4_K>) {
    const MR: usize = QK_MR;
    const NT: usize = QK_NT;
    const PAIRS: usize = QK_NR.div_ceil(QK_NT);
    // SAFETY: as in `tile_q8_0_mn`: rows beyond `t.rows` and tokens beyond `t.tokens` alias
    // row / token 0 (read, never stored); blocks b < kb of every row and token exist; the
    // unpacked scales are indexed below `nb <= QK_KC`, the parked accumulators below the
    // number of token pairs (`tokens <= QK_NR`).
    unsafe {
        let m4 = _mm256_set1_epi8(0x0f);
        let wp: [*const BlockQ4_K; MR] = row_ptrs(t.w, t.ldw, t.rows);
        let mut acc = [[[_mm256_setzero_ps(); NT]; MR]; PAIRS];
        let mut un = [[Q4kUnpacked::ZERO; QK_KC]; MR];
        for b0 in (0..t.kb).step_by(QK_KC) {
            let nb = QK_KC.min(t.kb - b0);
            for r in 0..MR {
                for i in 0..nb {
                    un[r][i] = Q4kUnpacked::of(&*wp[r].add(b0 + i));
                }
            }
            for (p, j0) in (0..t.tokens).step_by(NT).enumerate() {
                let ap: [*const BlockQ8_K; NT] =
                    row_ptrs(t.a.add(j0 * t.lda), t.lda, (t.tokens - j0).min(NT));
                let mut a = acc[p];
                for i in 0..nb {
                    let b = b0 + i;
                    let mut ad = [_mm256_setzero_ps(); NT];
                    for j in 0..NT {
                        ad[j] = _mm256_broadcast_ss(&(*ap[j].add(b)).d);
                    }
                    for r in 0..MR {
                        let blk = &*wp[r].add(b);
                        let u = &un[r][i];
                        let mut isum = [_mm256_setzero_si256(); NT];
                        for g in 0..QK_K / 64 {
                            let x = _mm256_loadu_si256(blk.qs.as_ptr().add(32 * g).cast());
                            let lo = _mm256_and_si256(x, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
                            let s_lo = _mm256_set1_epi16(u.sc[2 * g]);
                            let s_hi = _mm256_set1_epi16(u.sc[2 * g + 1]);
                            for j in 0..NT {
                                let q = (*ap[j].add(b)).qs.as_ptr();
                                let a_lo = _mm256_loadu_si256(q.add(64 * g).cast());
                                let a_hi = _mm256_loadu_si256(q.add(64 * g + 32).cast());
                                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), s_lo);
                                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), s_hi);
                                isum[j] = _mm256_add_epi32(isum[j], _mm256_add_epi32(p_lo, p_hi));
                            }
                        }
                        let dw = _mm256_set1_ps(u.d);
                        let dmin = _mm256_set1_ps(u.dmin);
                        let mins_w = _mm256_loadu_si256(u.mins.as_ptr().cast());
                        for j in 0..NT {
                            let bsums = _mm256_loadu_si256((*ap[j].add(b)).bsums.as_ptr().cast());
                            let mins = _mm256_madd_epi16(bsums, mins_w);
                            let v = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(isum[j]),
                                _mm256_mul_ps(dw, ad[j]),
                                a[r][j],
                            );
                            a[r][j] = _mm256_fnmadd_ps(
                                _mm256_cvtepi32_ps(mins),
                                _mm256_mul_ps(dmin, ad[j]),
                                v,
                            );
                        }
                    }
                }
                acc[p] = a;
            }
        }
        for (p, j0) in (0..t.tokens).step_by(NT).enumerate() {
            for r in 0..t.rows {
                for j in 0..NT.min(t.tokens - j0) {
                    *t.c.add((j0 + j) * t.ldc + r) = hsum(acc[p][r][j]);
                }
            }
        }
    }
}

#[inline(always)]
unsafe fn tile_q4_k_mn<const MR: usize, const NR: usize>(t: &Tile<BlockQ4_K>) {
    const PF: usize = PREFETCH_BYTES / std::mem::size_of::<BlockQ4_K>();
    // SAFETY: as in `tile_q8_0_mn`. With MR = 1 the tile is walked one row at a time.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0f);
        for r0 in (0..t.rows).step_by(MR) {
            let wp: [*const BlockQ4_K; MR] =
                row_ptrs(t.w.add(r0 * t.ldw), t.ldw, (t.rows - r0).min(MR));
            let ap: [*const BlockQ8_K; NR] = row_ptrs(t.a, t.lda, t.tokens);
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            for b in 0..t.kb {
                let mut ad = [_mm256_setzero_ps(); NR];
                for j in 0..NR {
                    ad[j] = _mm256_broadcast_ss(&(*ap[j].add(b)).d);
                }
                for r in 0..MR {
                    let blk = &*wp[r].add(b);
                    _mm_prefetch::<_MM_HINT_T0>(wp[r].wrapping_add(b + PF).cast());
                    let s = q4_k_scales(blk);
                    let mut isum = [_mm256_setzero_si256(); NR];
                    for g in 0..QK_K / 64 {
                        let x = _mm256_loadu_si256(blk.qs.as_ptr().add(32 * g).cast());
                        let lo = _mm256_and_si256(x, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
                        for j in 0..NR {
                            let a = &*ap[j].add(b);
                            let a_lo = _mm256_loadu_si256(a.qs.as_ptr().add(64 * g).cast());
                            let a_hi = _mm256_loadu_si256(a.qs.as_ptr().add(64 * g + 32).cast());
                            let p_lo =
                                _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), s.sc[2 * g]);
                            let p_hi =
                                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), s.sc[2 * g + 1]);
                            isum[j] = _mm256_add_epi32(isum[j], _mm256_add_epi32(p_lo, p_hi));
                        }
                    }
                    let dw = bcast_f16((&raw const blk.d).cast());
                    let dmin = bcast_f16((&raw const blk.dmin).cast());
                    for j in 0..NR {
                        let a = &*ap[j].add(b);
                        let bsums = _mm256_loadu_si256(a.bsums.as_ptr().cast());
                        let mins = _mm256_madd_epi16(bsums, s.mins);
                        let v = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(isum[j]),
                            _mm256_mul_ps(dw, ad[j]),
                            acc[r][j],
                        );
                        acc[r][j] = _mm256_fnmadd_ps(
                            _mm256_cvtepi32_ps(mins),
                            _mm256_mul_ps(dmin, ad[j]),
                            v,
                        );
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take((t.rows - r0).min(MR)) {
                for (j, v) in row.iter().enumerate().take(t.tokens) {
                    *t.c.add(j * t.ldc + r0 + r) = hsum(*v);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Activation quantizers (byte-exact with the reference).

/// `|x|`.
#[inline(always)]
unsafe fn abs_ps(x: __m256) -> __m256 {
    // SAFETY: register-only AVX operations.
    unsafe { _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff))) }
}

/// Largest of the lanes of `acc` (no NaN in it).
#[inline(always)]
unsafe fn hmax(acc: __m256) -> f32 {
    // SAFETY: register-only AVX operations.
    unsafe {
        let m = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        _mm_cvtss_f32(m)
    }
}

/// Largest |x| of `n` floats at `x` (a multiple of 8), skipping NaN as the reference's
/// `amax < |v|` comparisons do: `max_ps(v, acc)` returns `acc` when `v` is NaN.
#[inline(always)]
unsafe fn abs_max(x: *const f32, n: usize) -> f32 {
    // SAFETY: n floats readable at x.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            acc = _mm256_max_ps(abs_ps(_mm256_loadu_ps(x.add(i))), acc);
        }
        hmax(acc)
    }
}

/// Packs four vectors of 8 i32 (each within i8 range) into 32 i8 in order.
#[inline(always)]
unsafe fn pack_i32x32(q: [__m256i; 4]) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let p01 = _mm256_packs_epi32(q[0], q[1]);
        let p23 = _mm256_packs_epi32(q[2], q[3]);
        let p = _mm256_packs_epi16(p01, p23);
        // The packs work per 128-bit lane: restore the order of the 32-bit groups.
        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }
}

/// # Safety
/// See [`super::QuantizeFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_0(x: *const f32, nb: usize, out: *mut BlockQ8_0, sums: *mut i32) {
    // SAFETY: block b < nb of x (32 floats), out and sums.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        for b in 0..nb {
            let xb = x.add(b * QK);
            let amax = abs_max(xb, QK);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let vid = _mm256_set1_ps(id);
            let mut q = [_mm256_setzero_si256(); 4];
            let mut total = _mm256_setzero_si256();
            for (i, qi) in q.iter_mut().enumerate() {
                let v = _mm256_mul_ps(_mm256_loadu_ps(xb.add(8 * i)), vid);
                // roundf: truncate, then step away from zero when the dropped part is ≥ ½
                // (v − trunc(v) is exact).
                let tr = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
                let frac = abs_ps(_mm256_sub_ps(v, tr));
                let away = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), one);
                let r = _mm256_add_ps(tr, _mm256_or_ps(away, _mm256_and_ps(v, sign)));
                // NaN → 0 and saturation to the i8 range, as the reference's `as i8` does
                // (|v| ≤ 127 unless 1/d overflowed to infinity).
                let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
                let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
                *qi = _mm256_cvttps_epi32(r);
                total = _mm256_add_epi32(total, *qi);
            }
            let blk = out.add(b);
            (&raw mut (*blk).d).write(tessera_core::f16::from_f32(d));
            _mm256_storeu_si256((&raw mut (*blk).qs).cast(), pack_i32x32(q));
            *sums.add(b) = hsum_i32(total);
        }
    }
}

/// # Safety
/// See [`super::QuantizeFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_k(x: *const f32, nb: usize, out: *mut BlockQ8_K, sums: *mut i32) {
    // SAFETY: block b < nb of x (256 floats), out and sums.
    unsafe {
        for b in 0..nb {
            let xb = x.add(b * QK_K);
            let blk = out.add(b);
            let amax = abs_max(xb, QK_K);
            if amax == 0.0 {
                blk.write(bytemuck::Zeroable::zeroed());
                *sums.add(b) = 0;
                continue;
            }
            // The signed value of the first element with the largest |x| (amax is one of them).
            let mut max = amax;
            for i in 0..QK_K {
                let v = *xb.add(i);
                if v.abs() == amax {
                    max = v;
                    break;
                }
            }
            let iscale = -127.0 / max;
            let vis = _mm256_set1_ps(iscale);
            let magic = _mm256_set1_ps(12_582_912.0);
            let mant = _mm256_set1_epi32(0x007f_ffff);
            let bias = _mm256_set1_epi32(0x0040_0000);
            let cap = _mm256_set1_epi32(127);
            let mut total = 0i32;
            for g in 0..QK_K / 32 {
                let mut q = [_mm256_setzero_si256(); 4];
                for (i, qi) in q.iter_mut().enumerate() {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(xb.add(32 * g + 8 * i)), vis);
                    // GGML's nearest_int, bit for bit: (v + 1.5·2²³) bits & mantissa − 2²².
                    let bits = _mm256_castps_si256(_mm256_add_ps(v, magic));
                    let n = _mm256_sub_epi32(_mm256_and_si256(bits, mant), bias);
                    // `.min(127) as i8`: the cast keeps the low byte (only reachable when
                    // iscale overflowed to infinity), sign-extended so the packs are exact.
                    let n = _mm256_min_epi32(n, cap);
                    *qi = _mm256_srai_epi32(_mm256_slli_epi32(n, 24), 24);
                }
                // bsums: two groups of 16 in this run of 32.
                for h in 0..2 {
                    let s = hsum_i32(_mm256_add_epi32(q[2 * h], q[2 * h + 1]));
                    (&raw mut (*blk).bsums[2 * g + h]).write(s as i16);
                    total += s;
                }
                let dst = (&raw mut (*blk).qs).cast::<i8>().add(32 * g);
                _mm256_storeu_si256(dst.cast(), pack_i32x32(q));
            }
            (&raw mut (*blk).d).write(1.0 / iscale);
            *sums.add(b) = total;
        }
    }
}
