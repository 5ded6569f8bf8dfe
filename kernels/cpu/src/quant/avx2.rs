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
//! the weights stream from memory in one linear pass (Q4_0 through the table's GEMV kernel:
//! two blocks per vector against an activation row prepared once per call in the matching
//! pair layout, which halves the unpacking and scaling work per block). From [`PANEL_MIN_TOKENS`] tokens on,
//! the packed panels below replace the tiles (see the section's comment).

// Register tiles are indexed by row and token: index loops read best there.
#![allow(clippy::needless_range_loop)]

use super::{
    BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, Gemv, GemvKernels, Kernels, PANEL_ROWS, Panel,
    PanelKernels, QK, QK_K, Table, Tile,
};
use std::arch::x86_64::*;

pub(super) static TABLE: Table = Table {
    q8_0: Kernels {
        mr: Q8_MR,
        nr: Q8_NR,
        tile: tile_q8_0,
        gemv: None,
        panel: Some(PanelKernels {
            bytes: |kb| Q8_0_PANEL.bytes(kb),
            pack: pack_q8_0,
            run: panel_q8_0,
            min_tokens: PANEL_MIN_TOKENS,
        }),
    },
    q4_0: Kernels {
        mr: Q4_MR,
        nr: Q4_NR,
        tile: tile_q4_0,
        gemv: Some(GemvKernels {
            prep_bytes: |kb| kb.div_ceil(2) * Q4_0_PAIR_BYTES,
            prepare: prepare_q4_0,
            run: gemv_q4_0_pairs,
        }),
        panel: Some(PanelKernels {
            bytes: |kb| Q4_0_PANEL.bytes(kb),
            pack: pack_q4_0,
            run: panel_q4_0,
            min_tokens: PANEL_MIN_TOKENS,
        }),
    },
    q4_k: Kernels {
        mr: QK_MR,
        nr: QK_NR,
        tile: tile_q4_k,
        gemv: None,
        panel: Some(PanelKernels {
            bytes: |kb| Q4_K_PANEL.bytes(kb),
            pack: pack_q4_k,
            run: panel_q4_k,
            min_tokens: PANEL_MIN_TOKENS,
        }),
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

/// Bytes ahead of the current block that the GEMV prefetches (2 KiB measured better than 1 KiB
/// on the Zen 4 VM for cold Q8_0 weights: 71–80% of the read bandwidth against 59–66%).
const PREFETCH_BYTES: usize = 2048;

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
/// accumulators in turn; the weights are prefetched about 2 KiB ahead.
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
                // Four blocks per step, one accumulator each (a constant index, so the
                // accumulators stay in registers), then the remaining blocks into the first.
                // (A macro, not a closure: a closure here would not inherit the caller's
                // target features.)
                macro_rules! step {
                    ($i:expr, $u:expr) => {{
                        let (i, u) = ($i, $u);
                        let b = b0 + i;
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b + pf).cast());
                        let p = _mm256_cvtepi32_ps(block(row, b));
                        acc[u] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(&sc[0][i]), acc[u]);
                    }};
                }
                let full = n / 4 * 4;
                for i in (0..full).step_by(4) {
                    for u in 0..4 {
                        step!(i + u, u);
                    }
                }
                for i in full..n {
                    step!(i, 0);
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

/// Bytes of one pair of blocks in the prepared Q4_0 GEMV activation row: the quants that meet
/// the pair's low nibbles (`[a₀[0..16], a₁[0..16]]`), those that meet the high nibbles
/// (`[a₀[16..32], a₁[16..32]]`), the offsets `2·Σa` as i32 (4 lanes per block: the 4 lanes
/// of a block sum to its `8·Σa`) and the activation scales (4 lanes per block).
const Q4_0_PAIR_BYTES: usize = 128;

/// # Safety
/// See [`super::PrepareFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prepare_q4_0(
    a: *const BlockQ8_0,
    sums: *const i32,
    ascale: *const f32,
    kb: usize,
    out: *mut u8,
) {
    // SAFETY: blocks, sums and scales b < kb; the output's kb.div_ceil(2) pairs of
    // Q4_0_PAIR_BYTES, 64-byte aligned (so every 32-byte store is aligned). A missing second
    // block of the last pair is written as zeros.
    unsafe {
        for p in 0..kb.div_ceil(2) {
            let (b0, b1) = (2 * p, 2 * p + 1);
            let q = |b: usize, half: usize| {
                if b < kb {
                    _mm_loadu_si128(
                        (&raw const (*a.add(b)).qs)
                            .cast::<i8>()
                            .add(16 * half)
                            .cast(),
                    )
                } else {
                    _mm_setzero_si128()
                }
            };
            let (s1, d1) = if b1 < kb {
                (*sums.add(b1), *ascale.add(b1))
            } else {
                (0, 0.0)
            };
            let dst = out.add(p * Q4_0_PAIR_BYTES);
            _mm256_store_si256(dst.cast(), _mm256_set_m128i(q(b1, 0), q(b0, 0)));
            _mm256_store_si256(dst.add(32).cast(), _mm256_set_m128i(q(b1, 1), q(b0, 1)));
            let off = _mm256_set_m128i(
                _mm_set1_epi32(s1.wrapping_mul(2)),
                _mm_set1_epi32((*sums.add(b0)).wrapping_mul(2)),
            );
            _mm256_store_si256(dst.add(64).cast(), off);
            let da = _mm256_set_m128(_mm_set1_ps(d1), _mm_set1_ps(*ascale.add(b0)));
            _mm256_store_ps(dst.add(96).cast(), da);
        }
    }
}

/// The Q4_0 GEMV: two blocks per vector (block `2p` in the low 128 bits, `2p + 1` in the
/// high), against the prepared pairs; four pairs per step into independent accumulators.
///
/// # Safety
/// See [`super::GemvFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_q4_0_pairs(g: &Gemv<BlockQ4_0>) {
    let pf = PREFETCH_BYTES / std::mem::size_of::<BlockQ4_0>();
    // SAFETY: rows < g.rows of kb blocks each (the second block of the last pair is read only
    // when it exists); the prepared row's kb.div_ceil(2) pairs; weight_scales fills sc[i] for
    // i < n and leaves 0 above, so a missing block's scale is 0. Prefetch addresses are
    // computed with wrapping arithmetic and a prefetch never faults.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm256_set1_epi8(0x0f);
        let mut sc = [[0f32; KC]; 1];
        for r in 0..g.rows {
            let row = g.w.add(r * g.ldw);
            let mut acc = [_mm256_setzero_ps(); 4];
            for b0 in (0..g.kb).step_by(KC) {
                let n = KC.min(g.kb - b0);
                weight_scales(&[row], b0, n, &mut sc);
                macro_rules! pair {
                    ($i:expr, $u:expr) => {{
                        let (i, u) = ($i, $u);
                        let b = b0 + i;
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b + pf).cast());
                        let q0 = _mm_loadu_si128((&raw const (*row.add(b)).qs).cast());
                        let q1 = if i + 1 < n {
                            _mm_loadu_si128((&raw const (*row.add(b + 1)).qs).cast())
                        } else {
                            _mm_setzero_si128()
                        };
                        let x = _mm256_set_m128i(q1, q0);
                        let lo = _mm256_and_si256(x, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
                        let pa = g.prep.add((b / 2) * Q4_0_PAIR_BYTES);
                        // Pair sums of the low and high nibbles: each at most 2·15·128, so
                        // their sum stays in i16.
                        let s16 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, _mm256_load_si256(pa.cast())),
                            _mm256_maddubs_epi16(hi, _mm256_load_si256(pa.add(32).cast())),
                        );
                        let isum = _mm256_sub_epi32(
                            _mm256_madd_epi16(s16, ones),
                            _mm256_load_si256(pa.add(64).cast()),
                        );
                        let dw = _mm256_set_m128(_mm_set1_ps(sc[0][i + 1]), _mm_set1_ps(sc[0][i]));
                        let d = _mm256_mul_ps(dw, _mm256_load_ps(pa.add(96).cast()));
                        acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc[u]);
                    }};
                }
                // KC is even, so pairs never straddle two scale windows; an odd last window
                // ends with a pair of one block.
                let pairs = n.div_ceil(2);
                let full = pairs / 4 * 4;
                for p in (0..full).step_by(4) {
                    for u in 0..4 {
                        pair!(2 * (p + u), u);
                    }
                }
                for p in full..pairs {
                    pair!(2 * p, 0);
                }
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            *g.c.add(r) = hsum(s);
        }
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
// Packed panels (many tokens).
//
// A panel interleaves 8 weight rows so that 32-bit lane `r` of every vector belongs to row
// `r`: a vector holds 4 consecutive quants of each row, and the integer products of one
// token (its 4 matching activation quants broadcast to every lane) accumulate per row with
// no horizontal sum; each block's scales convert to one f32 vector for the 8 rows. The
// scales are kept as compact as in the GGUF blocks (f16, and Q4_K's 6-bit sub-block scales
// as bytes), so that a panel is about the size of its blocks (34, 18 and 148 bytes per block
// and row): a one-token pass over packed weights is bound by the bytes it reads. Layouts
// below ([`PanelLayout`]). Rows of the panel
// beyond `rows` repeat row 0: computed, never stored.

/// Fewest tokens for which the panel path replaces the register tiles.
const PANEL_MIN_TOKENS: usize = 4;
/// Tokens whose accumulators a panel kernel keeps in registers at a time.
const PANEL_NT: usize = 4;

/// Runs a panel kernel `$f::<NT>` on the panel's tokens: the largest multiple of
/// [`PANEL_NT`] of them in groups of `PANEL_NT`, the rest one at a time, so that no token
/// is computed twice (a token's operations do not depend on its group, so neither do the
/// results).
macro_rules! split_tokens {
    ($f:ident, $p:expr) => {{
        let p: &Panel<_> = $p;
        let full = p.tokens / PANEL_NT * PANEL_NT;
        if full > 0 {
            $f::<PANEL_NT>(&p.first(full));
        }
        if full < p.tokens {
            $f::<1>(&p.after(full));
        }
    }};
}
/// Where a panel keeps each block's quants and scales: in groups of `group` blocks, each
/// group first the scales of its blocks (`scales` bytes per block, `group` slots even in a
/// shorter last group), then their quants (`quants` bytes per block). A pass over the panel
/// then walks forward through one stream of lines. (Keeping all the scales in a run after
/// the quants, a second stream, or a group's scales after its quants, so that each group's
/// first block reads ahead and then back, was measured up to ~30% slower from memory.)
struct PanelLayout {
    quants: usize,
    scales: usize,
    group: usize,
}

impl PanelLayout {
    /// Bytes of a panel of `kb` blocks (whole 64-byte lines).
    const fn bytes(&self, kb: usize) -> usize {
        (kb.div_ceil(self.group) * self.group * self.scales + kb * self.quants).next_multiple_of(64)
    }

    /// Offsets of block `b`'s quants and scales in a panel (quants 32-byte aligned, scales
    /// 16-byte aligned, given the layouts below).
    #[inline(always)]
    const fn at(&self, b: usize) -> (usize, usize) {
        let i = b % self.group;
        let base = (b - i) * (self.quants + self.scales);
        (
            base + self.group * self.scales + i * self.quants,
            base + i * self.scales,
        )
    }
}

/// Calls `f(b, quants, scales)` with the addresses of block `b`'s quants and scales, for the
/// blocks `b = 0..kb` of the panel at `panel` in order (a group at a time, so that the
/// offsets are constants within a group).
///
/// # Safety
/// `panel` is a panel of `kb` blocks in layout `l`.
#[inline(always)]
unsafe fn panel_blocks(
    l: &PanelLayout,
    panel: *const u8,
    kb: usize,
    mut f: impl FnMut(usize, *const u8, *const u8),
) {
    // SAFETY: every offset is one of `l.at(b)` for b < kb, inside the panel.
    unsafe {
        for first in (0..kb).step_by(l.group) {
            let base = panel.add(first * (l.quants + l.scales));
            let quants = base.add(l.group * l.scales);
            for i in 0..l.group.min(kb - first) {
                f(first + i, quants.add(i * l.quants), base.add(i * l.scales));
            }
        }
    }
}

/// Q8_0 panel, per block: 8 vectors of quants (vector `v`: quants `4v..4v+4` of each row);
/// its scales: the 8 rows' f16 `d` ([`F16_ROWS`] bytes), four blocks' in one line.
const Q8_0_PANEL: PanelLayout = PanelLayout {
    quants: 8 * 32,
    scales: F16_ROWS,
    group: 4,
};
/// Q4_0 panel, per block: 4 vectors of nibble bytes (vector `v`: bytes `4v..4v+4` of each
/// row, whose low nibbles are weights `4v..4v+4` and high nibbles `16+4v..16+4v+4`); its
/// scales: the rows' f16 `d`, four blocks' in one line.
const Q4_0_PANEL: PanelLayout = PanelLayout {
    quants: 4 * 32,
    scales: F16_ROWS,
    group: 4,
};
/// Q4_K panel, per block: 32 vectors of nibble bytes (vector `8g + v`: bytes
/// `32g+4v..32g+4v+4` of each row: low nibbles of sub-block `2g`, high of `2g+1`); its
/// scales: the 6-bit sub-block scales as bytes (byte `8s + r`: row `r`'s scale of sub-block
/// `s`), the mins laid out the same way, then the rows' f16 `d` and f16 `dmin` (160 bytes,
/// a multiple of 32: blocks one by one keep the quants 32-byte aligned).
const Q4_K_PANEL: PanelLayout = PanelLayout {
    quants: 32 * 32,
    scales: 8 * 8 + 8 * 8 + 2 * F16_ROWS,
    group: 1,
};
/// One f16 per panel row.
const F16_ROWS: usize = 2 * PANEL_ROWS;

/// Transposes 8 rows of 8 dwords into the 8 vectors at `dst` (32 bytes apart): lane `r` of
/// vector `v` is dword `v` of row `r`. The f32 transpose of the gemm packing, on the bits
/// (its unpacks and shuffles move lanes without looking at them).
///
/// # Safety
/// `dst` is writable for 256 bytes; AVX2 is available.
#[inline(always)]
unsafe fn transpose_8x8_store(rows: [__m256i; 8], dst: *mut u8) {
    use crate::simd::{Simd, avx2::Avx2};
    let rows = rows.map(|r| {
        // SAFETY: a register-only reinterpretation.
        unsafe { _mm256_castsi256_ps(r) }
    });
    // SAFETY: 8 vectors, and dst covers 7 · 8 + 8 floats.
    unsafe { Avx2::transpose_store(&rows, dst.cast(), 8) }
}

/// Writes the 8 f16 at `p[r]` (one per row) to the [`F16_ROWS`] bytes at `dst`.
///
/// # Safety
/// Each pointer is 2 readable bytes; `dst` is writable for 16 bytes.
#[inline(always)]
unsafe fn store_f16x8(p: [*const tessera_core::f16; 8], dst: *mut u8) {
    // SAFETY: as documented (unaligned reads and write).
    unsafe {
        let h: [u16; PANEL_ROWS] = std::array::from_fn(|r| p[r].cast::<u16>().read_unaligned());
        dst.cast::<[u16; PANEL_ROWS]>().write_unaligned(h);
    }
}

/// The 8 rows' f16 stored by [`store_f16x8`] at `p` (16-byte aligned), widened to f32.
#[inline(always)]
unsafe fn load_f16x8(p: *const u8) -> __m256 {
    // SAFETY: 16 readable bytes at p, 16-byte aligned; F16C is available.
    unsafe { _mm256_cvtph_ps(_mm_load_si128(p.cast())) }
}

/// The 8 rows' bytes at `p` (byte `r` for row `r`) widened to i16 pairs: lanes `2r` and
/// `2r + 1` both hold byte `r` (the operand of a `vpmaddwd` that scales row `r`'s pair
/// sums). `ctrl` is [`pair_ctrl`].
#[inline(always)]
unsafe fn widen_pairs(p: *const u8, ctrl: __m256i) -> __m256i {
    // SAFETY: 8 readable bytes at p.
    unsafe { _mm256_shuffle_epi8(_mm256_set1_epi64x(p.cast::<i64>().read_unaligned()), ctrl) }
}

/// The `vpshufb` control of [`widen_pairs`]: in both 128-bit halves (each holding the 8 bytes),
/// dword `r` of the vector takes byte `r`, zero-extended, twice.
#[inline(always)]
unsafe fn pair_ctrl() -> __m256i {
    const Z: i8 = -128;
    // SAFETY: register-only AVX operation.
    unsafe {
        _mm256_setr_epi8(
            0, Z, 0, Z, 1, Z, 1, Z, 2, Z, 2, Z, 3, Z, 3, Z, //
            4, Z, 4, Z, 5, Z, 5, Z, 6, Z, 6, Z, 7, Z, 7, Z,
        )
    }
}

/// The 4 activation quants at `p` broadcast to every lane.
#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m256i {
    // SAFETY: 4 readable bytes at p.
    unsafe { _mm256_set1_epi32(p.cast::<i32>().read_unaligned()) }
}

/// Stores the tokens' accumulators (lane `r` = row `r`) into `C[j, 0..rows]`.
///
/// # Safety
/// `C` rows `0..tokens` (`tokens <= NT`) cover `rows <= 8` columns from `c`.
#[inline(always)]
unsafe fn store_panel<const NT: usize>(
    acc: &[__m256; NT],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    tokens: usize,
) {
    // SAFETY: as documented.
    unsafe {
        for j in 0..tokens {
            let dst = c.add(j * ldc);
            if rows == PANEL_ROWS {
                _mm256_storeu_ps(dst, acc[j]);
            } else {
                let mut tmp = [0f32; PANEL_ROWS];
                _mm256_storeu_ps(tmp.as_mut_ptr(), acc[j]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, rows);
            }
        }
    }
}

/// Walks the panel's tokens `NT` at a time (the last group's missing tokens alias its first,
/// computed and never stored), calling `group(pointers to the group's tokens' activation
/// rows, sums, scales)` for the accumulators of each group.
///
/// # Safety
/// The panel's contract ([`super::PanelFn`]); `group` reads only `kb` blocks, sums and
/// scales of each token it is given.
#[inline(always)]
unsafe fn panel_tokens<W: tessera_core::quant::WeightBlock, const NT: usize>(
    p: &Panel<W>,
    mut group: impl FnMut([*const W::Act; NT], [*const i32; NT], [*const f32; NT]) -> [__m256; NT],
) {
    // SAFETY: tokens j0 + j < p.tokens of the activations; C rows of those tokens.
    unsafe {
        for j0 in (0..p.tokens).step_by(NT) {
            let nt = (p.tokens - j0).min(NT);
            let off = j0 * p.lda;
            let acc = group(
                row_ptrs(p.a.add(off), p.lda, nt),
                row_ptrs(p.sums.add(off), p.lda, nt),
                row_ptrs(p.ascale.add(off), p.lda, nt),
            );
            store_panel(&acc, p.c.add(j0 * p.ldc), p.ldc, p.rows, nt);
        }
    }
}

/// # Safety
/// See [`super::PackFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_q8_0(w: *const BlockQ8_0, ldw: usize, rows: usize, kb: usize, out: *mut u8) {
    let wp: [*const BlockQ8_0; PANEL_ROWS] = row_ptrs(w, ldw, rows);
    // SAFETY: blocks b < kb of each row (rows beyond `rows` alias row 0); the panel's
    // Q8_0_PANEL.bytes(kb) bytes.
    unsafe {
        for b in 0..kb {
            let (qo, so) = Q8_0_PANEL.at(b);
            let rows =
                std::array::from_fn(|r| _mm256_loadu_si256((&raw const (*wp[r].add(b)).qs).cast()));
            transpose_8x8_store(rows, out.add(qo));
            let d = std::array::from_fn(|r| &raw const (*wp[r].add(b)).d);
            store_f16x8(d, out.add(so));
        }
    }
}

/// # Safety
/// See [`super::PanelFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q8_0(p: &Panel<BlockQ8_0>) {
    // SAFETY: forwarded contract (`split_tokens` hands out sub-runs of the panel's tokens).
    unsafe { split_tokens!(panel_q8_0_nt, p) }
}

/// [`panel_q8_0`] on its tokens `NT` at a time (the last group aliasing its first token).
///
/// # Safety
/// See [`super::PanelFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q8_0_nt<const NT: usize>(p: &Panel<BlockQ8_0>) {
    // SAFETY: the panel holds kb blocks; every token pointer has kb blocks and scales.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        panel_tokens::<_, NT>(p, |ap, _sp, dp| {
            let mut acc = [_mm256_setzero_ps(); NT];
            panel_blocks(&Q8_0_PANEL, p.panel, p.kb, |b, blk, sc| {
                let mut isum = [_mm256_setzero_si256(); NT];
                for v in 0..8 {
                    let w = _mm256_load_si256(blk.add(32 * v).cast());
                    let aw = _mm256_sign_epi8(w, w);
                    for j in 0..NT {
                        let a = bcast4((&raw const (*ap[j].add(b)).qs).cast::<i8>().add(4 * v));
                        let s = _mm256_sign_epi8(a, w);
                        isum[j] = _mm256_add_epi32(isum[j], dot_u8i8(aw, s, ones));
                    }
                }
                let dw = load_f16x8(sc);
                for j in 0..NT {
                    let d = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*dp[j].add(b)));
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j]), d, acc[j]);
                }
            });
            acc
        })
    }
}

/// # Safety
/// See [`super::PackFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_q4_0(w: *const BlockQ4_0, ldw: usize, rows: usize, kb: usize, out: *mut u8) {
    let wp: [*const BlockQ4_0; PANEL_ROWS] = row_ptrs(w, ldw, rows);
    // SAFETY: as in `pack_q8_0`; each row's block holds 16 bytes of nibbles.
    unsafe {
        for b in 0..kb {
            let (qo, so) = Q4_0_PANEL.at(b);
            let dst = out.add(qo);
            let q = |r: usize| _mm_loadu_si128((&raw const (*wp[r].add(b)).qs).cast());
            // Rows r and r + 4 share a vector (one per 128-bit lane); a 4 × 4 dword
            // transpose within each lane then gives vector v = bytes 4v..4v+4 of rows 0..8.
            let y: [__m256i; 4] = std::array::from_fn(|r| _mm256_set_m128i(q(r + 4), q(r)));
            let t0 = _mm256_unpacklo_epi32(y[0], y[1]);
            let t1 = _mm256_unpackhi_epi32(y[0], y[1]);
            let t2 = _mm256_unpacklo_epi32(y[2], y[3]);
            let t3 = _mm256_unpackhi_epi32(y[2], y[3]);
            let lanes = [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ];
            // Lane order is rows 0..4 then 4..8 within each vector: r0 r1 r2 r3 | r4 .. r7.
            for (v, x) in lanes.iter().enumerate() {
                _mm256_store_si256(dst.add(32 * v).cast(), *x);
            }
            let d = std::array::from_fn(|r| &raw const (*wp[r].add(b)).d);
            store_f16x8(d, out.add(so));
        }
    }
}

/// # Safety
/// See [`super::PanelFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q4_0(p: &Panel<BlockQ4_0>) {
    // SAFETY: forwarded contract (`split_tokens` hands out sub-runs of the panel's tokens).
    unsafe { split_tokens!(panel_q4_0_nt, p) }
}

/// [`panel_q4_0`] on its tokens `NT` at a time (the last group aliasing its first token).
///
/// # Safety
/// See [`super::PanelFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q4_0_nt<const NT: usize>(p: &Panel<BlockQ4_0>) {
    // SAFETY: as in `panel_q8_0`; the sums have kb entries per token.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm256_set1_epi8(0x0f);
        panel_tokens::<_, NT>(p, |ap, sp, dp| {
            let mut acc = [_mm256_setzero_ps(); NT];
            panel_blocks(&Q4_0_PANEL, p.panel, p.kb, |b, blk, sc| {
                // The block's 8 pair sums per lane stay in i16: each is at most
                // 2·15·128, so 8 of them are below 2¹⁵.
                let mut s16 = [_mm256_setzero_si256(); NT];
                for v in 0..4 {
                    let x = _mm256_load_si256(blk.add(32 * v).cast());
                    let lo = _mm256_and_si256(x, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
                    for j in 0..NT {
                        let q = (&raw const (*ap[j].add(b)).qs).cast::<i8>();
                        let p_lo = _mm256_maddubs_epi16(lo, bcast4(q.add(4 * v)));
                        let p_hi = _mm256_maddubs_epi16(hi, bcast4(q.add(16 + 4 * v)));
                        s16[j] = _mm256_add_epi16(s16[j], _mm256_add_epi16(p_lo, p_hi));
                    }
                }
                let dw = load_f16x8(sc);
                for j in 0..NT {
                    let off = _mm256_set1_epi32((*sp[j].add(b)).wrapping_mul(8));
                    let isum = _mm256_sub_epi32(_mm256_madd_epi16(s16[j], ones), off);
                    let d = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*dp[j].add(b)));
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc[j]);
                }
            });
            acc
        })
    }
}

/// # Safety
/// See [`super::PackFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_q4_k(w: *const BlockQ4_K, ldw: usize, rows: usize, kb: usize, out: *mut u8) {
    let wp: [*const BlockQ4_K; PANEL_ROWS] = row_ptrs(w, ldw, rows);
    // SAFETY: as in `pack_q8_0`; each row's block holds 128 bytes of nibbles.
    unsafe {
        for b in 0..kb {
            let (qo, so) = Q4_K_PANEL.at(b);
            let dst = out.add(qo);
            for g in 0..QK_K / 64 {
                let rows = std::array::from_fn(|r| {
                    let qs = (&raw const (*wp[r].add(b)).qs).cast::<u8>();
                    _mm256_loadu_si256(qs.add(32 * g).cast())
                });
                transpose_8x8_store(rows, dst.add(32 * 8 * g));
            }
            // Scales then mins, byte 8s + r for row r and sub-block s.
            let mut sm = [[0u8; PANEL_ROWS]; 16];
            for r in 0..PANEL_ROWS {
                let blk = &*wp[r].add(b);
                for s in 0..8 {
                    (sm[s][r], sm[8 + s][r]) = blk.scale_min(s);
                }
            }
            let sdst = out.add(so);
            sdst.cast::<[[u8; PANEL_ROWS]; 16]>().write_unaligned(sm);
            let d = std::array::from_fn(|r| &raw const (*wp[r].add(b)).d);
            store_f16x8(d, sdst.add(128));
            let dmin = std::array::from_fn(|r| &raw const (*wp[r].add(b)).dmin);
            store_f16x8(dmin, sdst.add(128 + F16_ROWS));
        }
    }
}

/// # Safety
/// See [`super::PanelFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q4_k(p: &Panel<BlockQ4_K>) {
    // SAFETY: forwarded contract (`split_tokens` hands out sub-runs of the panel's tokens).
    unsafe { split_tokens!(panel_q4_k_nt, p) }
}

/// [`panel_q4_k`] on its tokens `NT` at a time (the last group aliasing its first token).
///
/// # Safety
/// See [`super::PanelFn`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q4_k_nt<const NT: usize>(p: &Panel<BlockQ4_K>) {
    // SAFETY: as in `panel_q8_0`.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0f);
        let ctrl = pair_ctrl();
        panel_tokens::<_, NT>(p, |ap, _sp, _dp| {
            let mut acc = [_mm256_setzero_ps(); NT];
            panel_blocks(&Q4_K_PANEL, p.panel, p.kb, |b, blk, sm| {
                let mut isum = [_mm256_setzero_si256(); NT];
                for g in 0..QK_K / 64 {
                    // Sub-block 2g (low nibbles), then 2g + 1 (high): the 8 vectors' pair
                    // sums stay in i16 (each at most 2·15·128, 8 of them below 2¹⁵), then
                    // one madd applies the rows' scales.
                    for h in 0..2 {
                        let mut s16 = [_mm256_setzero_si256(); NT];
                        for v in 0..8 {
                            let x = _mm256_load_si256(blk.add(32 * (8 * g + v)).cast());
                            let q = if h == 0 { x } else { _mm256_srli_epi16(x, 4) };
                            let q = _mm256_and_si256(q, m4);
                            for j in 0..NT {
                                let a = (&raw const (*ap[j].add(b)).qs).cast::<i8>();
                                let a = bcast4(a.add(64 * g + 32 * h + 4 * v));
                                s16[j] = _mm256_add_epi16(s16[j], _mm256_maddubs_epi16(q, a));
                            }
                        }
                        let sc = widen_pairs(sm.add(8 * (2 * g + h)), ctrl);
                        for j in 0..NT {
                            isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(s16[j], sc));
                        }
                    }
                }
                // Σ_s min_s · (bsums[2s] + bsums[2s+1]), per row and token.
                let mut msum = [_mm256_setzero_si256(); NT];
                for s in 0..8 {
                    let mins = widen_pairs(sm.add(64 + 8 * s), ctrl);
                    for j in 0..NT {
                        let bs = (*ap[j].add(b)).bsums.as_ptr().add(2 * s);
                        let bs = _mm256_set1_epi32(bs.cast::<i32>().read_unaligned());
                        msum[j] = _mm256_add_epi32(msum[j], _mm256_madd_epi16(bs, mins));
                    }
                }
                let (dw, dmin) = (load_f16x8(sm.add(128)), load_f16x8(sm.add(128 + F16_ROWS)));
                for j in 0..NT {
                    let ad = _mm256_set1_ps((*ap[j].add(b)).d);
                    let v =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j]), _mm256_mul_ps(dw, ad), acc[j]);
                    acc[j] =
                        _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum[j]), _mm256_mul_ps(dmin, ad), v);
                }
            });
            acc
        })
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
