//! AVX-512 VNNI variant: `vpdpbusd` on zmm registers, tiles of 16 weight rows × 16 tokens, a
//! dedicated one-token (GEMV) path, and activation quantizers that produce the reference
//! bytes.
//!
//! # Tile layout: one weight row per 32-bit lane
//! `vpdpbusd` multiplies 4 adjacent unsigned bytes by 4 signed bytes and adds the four
//! products to a 32-bit lane. The kernels put one *weight row* in each of the 16 lanes of a
//! zmm: for a 32-quant block, the 16 rows' blocks are loaded once and transposed (dword
//! granularity) into 8 vectors, vector `c` holding bytes `4c..4c+4` of every row. The
//! activation side is the matching 4 bytes of one token, broadcast to all lanes (an embedded
//! `{1to16}` memory operand), so 8 `vpdpbusd` give a token's 16 exact block sums in one
//! register, with no horizontal reduction at all. The transposition (8 loads, 8 inserts and
//! 24 in-lane / 128-bit shuffles per block of 16 rows) is paid once per tile and block and
//! reused by the tokens of the tile (up to 64), which cost 8 `vpdpbusd` each per block.
//!
//! This beats the usual "one dot product per register, then reduce" layout (one 256-bit
//! `vpdpbusd` per row, token and block, then about 1.3 shuffle-adds per product for the
//! per-block reduction that the error bound requires: every block sum must be exact before
//! it is scaled) on both targets: Intel (Ice Lake / Sapphire Rapids) runs zmm shuffles on
//! one port only, so the reduction would be the bottleneck; Zen 4 executes zmm operations as
//! two 256-bit halves at the same per-byte throughput as ymm, so the wider registers cost
//! nothing there and halve the instruction count elsewhere. 256-bit VNNI would need twice
//! the `vpdpbusd` and the same transposition work per row.
//!
//! On Zen 4 `vpdpbusd`, `vpmulld`, `vpmaddwd`, `vpdpwssd` and the FMA share one pipe pair
//! (about 0.9 zmm instruction per cycle together), so the token loop is written to keep that
//! pair busy: a token's 8 `vpdpbusd` (Q8_0 / Q4_0) are two chains of 4 (even / odd dwords,
//! one starting at the offset correction) and tokens go in pairs, so 4 independent chains are
//! in flight instead of one 8-deep chain per token (which left the pipes idle on latency);
//! each token then costs the 8 `vpdpbusd`, one add, one conversion, one multiply (`d_w·d_a`)
//! and one FMA per block. The token loop runs at that pipe pair's rate, so what is left to
//! amortize is the transposition: a tile takes up to `NR_32` = `NR_K` = 64 tokens (a
//! run-time count; the driver splits its L2-sized chunks of tokens evenly into such tiles),
//! with the weight vectors and the row scales in registers and each token's f32
//! accumulator (and Q4_K's per-token sums) in L1, loaded and stored once per block (or
//! group): cheaper than transposing the weights again for every few tokens. Q4_K keeps a
//! group's 8 low-nibble and 8 high-nibble vectors in registers: a token's 16 `vpdpbusd` per
//! group are 4 chains of 4, then 2 `vpmulld` by the sub-block scales; the min sums are two
//! `vpdpwssd` chains; one block costs a token `acc += d_a·(scaled·d − mins·dmin)` (a
//! multiply and two FMAs, each rounding relative to at most the block's magnitude).
//!
//! # One token (GEMV): one row at a time, 16 blocks per zmm
//! A decode step is bound by the weight stream, so the GEMV path (`gemv_*`, used by the
//! driver when `m == 1`) has no transposition and reads the weights in one sequential pass:
//! the rows one after another (walking 4 or 16 rows at once, a few KiB apart, keeps the
//! hardware prefetcher from following the streams and measured at a third to a half of the
//! bandwidth on Zen 4), with an explicit L2 prefetch `GEMV_PREFETCH` (8 KiB) ahead, issued
//! next to the loads of the bytes it runs ahead of. The token is first *prepared* once per
//! call (`prepare_*`, into the driver's scratch): its quants laid out to meet the weights as
//! they are loaded, and per group of 16 blocks the offset correction `−OFFSET·Σa` and the
//! scales `d_a` in the lane order of that group's sums (zero past the row, so a last partial
//! group needs no special case on the activation side).
//!
//! Per row and group of 16 blocks:
//! * Q8_0: block pair `j` is one zmm of quants (two 32-byte loads, biased with `xor 0x80`)
//!   against prepared vector `j`; Q4_0: blocks `4i..4i+4` are one zmm of nibble bytes (their
//!   quants lie at even offsets of a 128-byte window: two 64-byte loads and one `vpermt2w`,
//!   the last window ending with the group), whose low and high nibbles meet two prepared
//!   vectors in one `vpdpbusd` chain. A fixed tree of `unpck*`/`shufi64x2` + `vpaddd` (21 / 9 ops per group) then sums
//!   each block's lanes into one lane: 16 *exact block sums* in one zmm, plus the correction,
//!   converted to f32 and accumulated per lane as `acc += isum·(d_w·d_a)` with one FMA.
//!   Every block sum is exact before it is scaled, as in the tiles (the error bound of the
//!   tests is stated per block), and a group costs one conversion and one FMA instead of a
//!   horizontal reduction per block. The 16 `d_w` are picked out of 128-byte windows of the
//!   group's bytes with `vpermt2w` (4 windows of 4 Q8_0 blocks, 2 of 8 Q4_0 blocks, every
//!   window inside the group, checked at compile time); a last partial group reads its
//!   scales one by one.
//! * Q4_K: the 16 super-blocks' headers are transposed as in the tiles (lane `b` = block
//!   `b`), which gives `d`, `dmin`, the 6-bit scales and mins of 16 blocks at once; a block's
//!   two 64-byte halves of nibbles split into low / high nibbles are sub-blocks (0, 2),
//!   (1, 3), (4, 6), (5, 7) in the 256-bit halves of 4 vectors, against prepared quants; the
//!   4 `vpdpbusd` results (at most 4·15·128 per lane, so they fit i16) are paired as words and
//!   multiplied by their sub-blocks' scales with 2 `vpdpwssd` (the scale word pairs of lane
//!   `b` spread with one `vpermt2d` each). A 4-level tree puts block `b`'s exact scaled sum in
//!   lane `b`; the min sums come from the prepared `bsums` pairs (lane `b` = block `b`) with 8
//!   `vpdpwssd`, so one group ends in two FMAs.
//! * Each output is the fixed-order horizontal sum of its 16 lanes; a row's operations do not
//!   depend on its neighbours or on how the rows are split over threads.
//!
//! # Signs
//! `vpdpbusd` needs one unsigned operand; the activations (i8) are always the signed one.
//! * Q4_0 / Q4_K weights are nibbles 0..15 and are the unsigned operand as they are; Q4_0's
//!   offset of 8 is `− 8·Σa`, with `Σa` the block's quant sum (`sums`).
//! * Q8_0 weights (any i8, −128 included) are biased to `w + 128 ∈ [0, 255]` (an `xor`
//!   with `0x80`), and `128·Σa` is subtracted: exact for every activation byte, −128
//!   included (cheaper than `|w|` with `sign(a, w)`, which has no zmm form and needs the
//!   activations in ±127). The lane sums stay far inside i32 (at most 8·4·255·128).
//!
//! The correction `−k·Σa` is the initial value of each token's first `vpdpbusd` chain, so
//! a token's chains add up to the exact integer block sum, which is converted to f32 (exact
//! below 2²⁴) and accumulated as `acc += isum · (d_w·d_a)` with an FMA (`d_a` from the tile's
//! f32 activation scales).
//!
//! Q4_K: per super-block, the 16 rows' headers (`d`, `dmin`, 12 scale bytes) are transposed
//! the same way, so GGML's 6-bit unpacking runs on 16 rows at once; each 32-byte group of
//! nibbles is transposed like a Q8_0 block and split into its low (sub-block `2g`) and high
//! (`2g + 1`) nibbles; a sub-block's sum is scaled by its 6-bit scale with `vpmulld`, and the
//! min term `Σ m_j·(bsums[2j] + bsums[2j+1])` is 8 `vpdpwssd` per token. Both integer sums
//! are exact for any block bytes, as in the scalar kernel.
//!
//! Edge tiles: rows past `rows` repeat the last row (read inside the tile, results
//! discarded; the store writes `rows` values), and only the tile's `tokens` (1..=64) are
//! read and written, so a tile never reads or writes outside what [`Tile`] describes.
//!
//! # Quantizers
//! 256-bit AVX2 arithmetic with the reference's operations in the reference's order, so the
//! bytes are identical for every input: the abs-max uses `maxps` with the running maximum as
//! the second operand (a NaN is skipped, as `amax < |v|` does), the scales are computed in
//! scalar code from it, Q8_0 rounds half away from zero (trunc, exact fraction, ±1 on
//! `|frac| >= 0.5`) and saturates like `as i8` (NaN to 0), Q8_K takes the signed value of the
//! first largest `|v|` and reproduces `nearest_int` bit for bit (the 1.5·2²³ trick,
//! `.min(127)`, then the truncating `as i8`).
//!
//! # Testing without AVX-512
//! The tile kernels and the quantizers use only intrinsics that Miri implements (which is
//! why the f16 scales are widened 8 at a time and the quantizers avoid 512-bit rounding and
//! `vmaxps zmm`), so their tests below can also run, against the scalar reference, under
//! `cargo +nightly miri test -p tessera-cpu --lib quant::avx512` on any x86-64 host — with
//! the AVX-512 target features enabled for `tessera-cpu` only (e.g. nightly Cargo's
//! `profile-rustflags` in a scratch copy of the workspace: with them on every crate, `half`
//! converts f32 → f16 with `vcvtps2ph`, which Miri lacks) and
//! `MIRIFLAGS=-Zmiri-disable-isolation` (the driver reads the cache sizes from sysfs). The
//! GEMV path adds `vpermt2w`, `vpermt2d`, `vpdpwssd` and word blends, which have not been
//! run under Miri (the machine they were written on has no nightly `rust-src`); they run
//! natively wherever AVX-512 VNNI is present.

use super::{
    BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, Gemv, GemvKernels, Kernels, QK, QK_K, Table, Tile,
};
use bytemuck::Zeroable;
use std::arch::x86_64::*;
use std::mem::size_of;
use tessera_core::f16;
use tessera_core::quant::WeightBlock;

/// Weight rows per tile: one per 32-bit lane of a zmm.
const MR: usize = 16;
/// Tokens per tile: Q8_0 / Q4_0 (8 weight vectors, 16 accumulators) and Q4_K.
const NR_32: usize = 64;
const NR_K: usize = 64;

pub(super) static TABLE: Table = Table {
    q8_0: Kernels {
        mr: MR,
        nr: NR_32,
        tile: tile_q8_0,
        gemv: Some(GemvKernels {
            prep_bytes: prep_bytes_32,
            prepare: prepare_q8_0,
            run: gemv_q8_0,
        }),
        panel: None,
    },
    q4_0: Kernels {
        mr: MR,
        nr: NR_32,
        tile: tile_q4_0,
        gemv: Some(GemvKernels {
            prep_bytes: prep_bytes_32,
            prepare: prepare_q4_0,
            run: gemv_q4_0,
        }),
        panel: None,
    },
    q4_k: Kernels {
        mr: MR,
        nr: NR_K,
        tile: tile_q4_k,
        gemv: Some(GemvKernels {
            prep_bytes: prep_bytes_q4_k,
            prepare: prepare_q4_k,
            run: gemv_q4_k,
        }),
        panel: None,
    },
    quantize_q8_0,
    quantize_q8_k,
};

/// Whether the CPU has what this variant needs (AVX-512 F, BW, VL and VNNI, with the AVX2
/// baseline).
pub(super) fn available() -> bool {
    crate::Isa::Avx512.is_available()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// Sixteen f16 bit patterns → sixteen f32 (exact), lane `i` from element `i`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn cvtph16(h: __m256i) -> __m512 {
    let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    let hi = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h));
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
        _mm256_castps_pd(hi),
    ))
}

/// 4×4 transposes of 32-bit elements inside each 128-bit lane: lane `L` of output `k` is
/// `[z0.L[k], z1.L[k], z2.L[k], z3.L[k]]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn transpose4(z: [__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_unpacklo_epi32(z[0], z[1]); // z0[0] z1[0] z0[1] z1[1]
    let t1 = _mm512_unpackhi_epi32(z[0], z[1]); // z0[2] z1[2] z0[3] z1[3]
    let t2 = _mm512_unpacklo_epi32(z[2], z[3]); // z2[0] z3[0] z2[1] z3[1]
    let t3 = _mm512_unpackhi_epi32(z[2], z[3]); // z2[2] z3[2] z2[3] z3[3]
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// Transposes 16 rows of 8 dwords, given as `z[i] = [row i | row i+4]` for `i < 4` and
/// `z[4+i] = [row 8+i | row 12+i]` (a row is 256 bits), into 8 vectors: lane `r` of output
/// `c` is dword `c` of row `r`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn transpose16x8(z: [__m512i; 8]) -> [__m512i; 8] {
    // a[k] 128-bit lanes: rows 0-3 dword k, rows 0-3 dword 4+k, rows 4-7 dword k,
    // rows 4-7 dword 4+k; b[k] the same for rows 8-15.
    let a = transpose4([z[0], z[1], z[2], z[3]]);
    let b = transpose4([z[4], z[5], z[6], z[7]]);
    let mut out = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        // Lanes 0 and 2 of each (dword k), then lanes 1 and 3 (dword 4 + k).
        out[k] = _mm512_shuffle_i64x2::<0b10_00_10_00>(a[k], b[k]);
        out[k + 4] = _mm512_shuffle_i64x2::<0b11_01_11_01>(a[k], b[k]);
    }
    out
}

/// Loads 32 bytes at `base + roff[r] + off` for the 16 rows `r`, laid out for
/// [`transpose16x8`].
///
/// # Safety
/// The 16 ranges `base + roff[r] + off .. + 32` are readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn load_rows_32(base: *const u8, roff: &[usize; MR], off: usize) -> [__m512i; 8] {
    let mut z = [_mm512_setzero_si512(); 8];
    for (i, zi) in z.iter_mut().enumerate() {
        let (ra, rb) = if i < 4 { (i, i + 4) } else { (i + 4, i + 8) };
        // SAFETY: rows ra and rb are two of the 16 readable ranges.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(base.add(roff[ra] + off).cast()),
                _mm256_loadu_si256(base.add(roff[rb] + off).cast()),
            )
        };
        *zi = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
    }
    z
}

/// Loads 16 bytes at `base + roff[r] + off` for the 16 rows `r` and transposes them: lane
/// `r` of output `k` is dword `k` of row `r`'s 16 bytes.
///
/// # Safety
/// The 16 ranges `base + roff[r] + off .. + 16` are readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn load_rows_16(base: *const u8, roff: &[usize; MR], off: usize) -> [__m512i; 4] {
    let mut z = [_mm512_setzero_si512(); 4];
    for (i, zi) in z.iter_mut().enumerate() {
        // SAFETY: rows i, i+4, i+8 and i+12 are four of the 16 readable ranges.
        let r = unsafe {
            [
                _mm_loadu_si128(base.add(roff[i] + off).cast()),
                _mm_loadu_si128(base.add(roff[i + 4] + off).cast()),
                _mm_loadu_si128(base.add(roff[i + 8] + off).cast()),
                _mm_loadu_si128(base.add(roff[i + 12] + off).cast()),
            ]
        };
        // 128-bit lane L holds row i + 4L, so after the in-lane transposition element
        // 4L + i of output k is row 4L + i: the natural row order.
        let v = _mm512_inserti32x4::<1>(_mm512_castsi128_si512(r[0]), r[1]);
        let v = _mm512_inserti32x4::<2>(v, r[2]);
        *zi = _mm512_inserti32x4::<3>(v, r[3]);
    }
    transpose4(z)
}

/// The f16 at `base + roff[r] + off` for the 16 rows `r`, as f32 lanes.
///
/// # Safety
/// The 16 ranges `base + roff[r] + off .. + 2` are readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn load_rows_f16(base: *const u8, roff: &[usize; MR], off: usize) -> __m512 {
    let mut h = [0u16; MR];
    for (hr, &o) in h.iter_mut().zip(roff) {
        // SAFETY: one of the 16 readable 2-byte ranges.
        *hr = unsafe { base.add(o + off).cast::<u16>().read_unaligned() };
    }
    // SAFETY: h is 32 readable bytes.
    cvtph16(unsafe { _mm256_loadu_si256(h.as_ptr().cast()) })
}

/// `0x0f` in every byte.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn nibble_mask() -> __m512i {
    _mm512_set1_epi8(0x0f)
}

/// The 4 bytes at `p` as the signed operand of `vpdpbusd`, broadcast to every lane.
///
/// # Safety
/// `p .. p + 4` is readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn bcast4(p: *const u8) -> __m512i {
    // SAFETY: forwarded.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// Byte offsets from the tile's first weight row to the 16 rows it computes: rows at or past
/// `rows` repeat the last one, so every read stays inside the tile (their results are not
/// stored).
fn row_offsets(rows: usize, ldw_bytes: usize) -> [usize; MR] {
    let mut o = [0usize; MR];
    for (r, or) in o.iter_mut().enumerate() {
        *or = r.min(rows - 1) * ldw_bytes;
    }
    o
}

/// Writes the `rows` first lanes of each token's accumulator to `c + t·ldc`.
///
/// # Safety
/// `c + t·ldc .. + rows` is writable for `t < acc.len()`, and `rows <= 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn store_tile(acc: &[__m512], c: *mut f32, ldc: usize, rows: usize) {
    for (tk, &v) in acc.iter().enumerate() {
        // SAFETY: row tk < acc.len() of C, rows values (contract).
        unsafe {
            let dst = c.add(tk * ldc);
            if rows == MR {
                _mm512_storeu_ps(dst, v);
            } else {
                let mut tmp = [0f32; MR];
                _mm512_storeu_ps(tmp.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, rows);
            }
        }
    }
}

/// Checks a tile's shape (debug builds).
macro_rules! check_tile {
    ($t:expr, $nr:expr) => {
        debug_assert!(
            (1..=$nr).contains(&$t.tokens) && (1..=MR).contains(&$t.rows),
            "tile of {} rows x {} tokens",
            $t.rows,
            $t.tokens
        )
    };
}

// ---------------------------------------------------------------------------------------
// Q8_0 and Q4_0 weights with Q8_0 activations.

/// A weight format with 32-quant blocks: how a block of 16 rows becomes 8 vectors of
/// unsigned quants (vector `c` pairs with activation bytes `4c..4c+4`) and 16 scales.
trait Block32: WeightBlock<Act = BlockQ8_0> {
    /// The unsigned quants are the true ones plus this (128 for Q8_0, 8 for Q4_0).
    const OFFSET: i32;
    /// The unpacked quants and scales of block `base + roff[r]` of each row `r`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI are available and the 16 blocks are readable.
    unsafe fn unpack(base: *const u8, roff: &[usize; MR]) -> ([__m512i; 8], __m512);
}

impl Block32 for BlockQ8_0 {
    const OFFSET: i32 = 128;
    #[inline(always)]
    unsafe fn unpack(base: *const u8, roff: &[usize; MR]) -> ([__m512i; 8], __m512) {
        // SAFETY: forwarded contract; qs is bytes 2..34 and d bytes 0..2 of a block.
        unsafe { unpack_q8_0(base, roff) }
    }
}

impl Block32 for BlockQ4_0 {
    const OFFSET: i32 = 8;
    #[inline(always)]
    unsafe fn unpack(base: *const u8, roff: &[usize; MR]) -> ([__m512i; 8], __m512) {
        // SAFETY: forwarded contract; qs is bytes 2..18 and d bytes 0..2 of a block.
        unsafe { unpack_q4_0(base, roff) }
    }
}

/// Q8_0: the quants biased to `w + 128` (xor 0x80), transposed.
///
/// # Safety
/// See [`Block32::unpack`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn unpack_q8_0(base: *const u8, roff: &[usize; MR]) -> ([__m512i; 8], __m512) {
    // SAFETY: each row's block is readable: bytes 2..34 (qs) and 0..2 (d).
    let (q, d) = unsafe {
        (
            transpose16x8(load_rows_32(base, roff, 2)),
            load_rows_f16(base, roff, 0),
        )
    };
    let bias = _mm512_set1_epi8(-128);
    let mut w = q;
    for v in &mut w {
        *v = _mm512_xor_si512(*v, bias);
    }
    (w, d)
}

/// Q4_0: dword `k` of the 16 nibble bytes holds quants `4k..4k+4` (low nibbles) and
/// `16+4k..16+4k+4` (high nibbles): vector `k` and vector `4 + k`.
///
/// # Safety
/// See [`Block32::unpack`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn unpack_q4_0(base: *const u8, roff: &[usize; MR]) -> ([__m512i; 8], __m512) {
    // SAFETY: each row's block is readable: bytes 2..18 (qs) and 0..2 (d).
    let (q, d) = unsafe { (load_rows_16(base, roff, 2), load_rows_f16(base, roff, 0)) };
    let m = nibble_mask();
    let mut w = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        w[k] = _mm512_and_si512(q[k], m);
        w[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(q[k]), m);
    }
    (w, d)
}

/// A Q8_0 / Q4_0 tile.
///
/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_32<W: Block32>(t: &Tile<W>) {
    check_tile!(t, NR_32);
    let wsize = size_of::<W>();
    let roff = row_offsets(t.rows, t.ldw * wsize);
    let w0 = t.w.cast::<u8>();
    let nt = t.tokens;
    let mut acc = [_mm512_setzero_ps(); NR_32];
    for b in 0..t.kb {
        // SAFETY: block b < kb of rows min(r, rows - 1) < rows: inside the tile's weights.
        let (wq, dw) = unsafe { W::unpack(w0.add(b * wsize), &roff) };
        // Token tk's exact block sums: two vpdpbusd chains of 4 (even / odd dwords, the
        // first starting at −OFFSET·Σa), so a token's latency is 4 products deep; tokens go
        // in pairs so that 4 independent chains are in flight.
        let isums = |tk: usize| {
            let at = tk * t.lda + b;
            // SAFETY: token tk < tokens: its block b and sum b are inside the tile; the quants
            // are bytes 2..34 of the block.
            let (qs, sum) = unsafe { (t.a.add(at).cast::<u8>().add(2), *t.sums.add(at)) };
            (qs, _mm512_set1_epi32(sum.wrapping_mul(-W::OFFSET)))
        };
        let finish = |acc_t: &mut __m512, tk: usize, even: __m512i, odd: __m512i| {
            // SAFETY: token tk < tokens: scale b is inside the tile.
            let da = unsafe { *t.ascale.add(tk * t.lda + b) };
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(da));
            let isum = _mm512_add_epi32(even, odd);
            *acc_t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc_t);
        };
        let mut tk = 0;
        while tk + 2 <= nt {
            let ((q0, mut e0), (q1, mut e1)) = (isums(tk), isums(tk + 1));
            let (mut o0, mut o1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for c in (0..8).step_by(2) {
                // SAFETY: bytes 4c..4c+8 of the two tokens' 32 quants.
                unsafe {
                    e0 = _mm512_dpbusd_epi32(e0, wq[c], bcast4(q0.add(4 * c)));
                    o0 = _mm512_dpbusd_epi32(o0, wq[c + 1], bcast4(q0.add(4 * c + 4)));
                    e1 = _mm512_dpbusd_epi32(e1, wq[c], bcast4(q1.add(4 * c)));
                    o1 = _mm512_dpbusd_epi32(o1, wq[c + 1], bcast4(q1.add(4 * c + 4)));
                }
            }
            finish(&mut acc[tk], tk, e0, o0);
            finish(&mut acc[tk + 1], tk + 1, e1, o1);
            tk += 2;
        }
        if tk < nt {
            let (q0, mut e0) = isums(tk);
            let mut o0 = _mm512_setzero_si512();
            for c in (0..8).step_by(2) {
                // SAFETY: bytes 4c..4c+8 of the token's 32 quants.
                unsafe {
                    e0 = _mm512_dpbusd_epi32(e0, wq[c], bcast4(q0.add(4 * c)));
                    o0 = _mm512_dpbusd_epi32(o0, wq[c + 1], bcast4(q0.add(4 * c + 4)));
                }
            }
            finish(&mut acc[tk], tk, e0, o0);
        }
    }
    // SAFETY: C rows 0..tokens, columns 0..rows of the tile (contract).
    unsafe { store_tile(&acc[..nt], t.c, t.ldc, t.rows) }
}

/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q8_0(t: &Tile<BlockQ8_0>) {
    // SAFETY: forwarded contract.
    unsafe { tile_32(t) }
}

/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q4_0(t: &Tile<BlockQ4_0>) {
    // SAFETY: forwarded contract.
    unsafe { tile_32(t) }
}

// ---------------------------------------------------------------------------------------
// Q4_K weights with Q8_K activations.

/// Byte offsets inside a [`BlockQ4_K`] and a [`BlockQ8_K`].
const Q4K_QS: usize = 16;
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 4 + QK_K;
const _: () = assert!(size_of::<BlockQ4_K>() == Q4K_QS + QK_K / 2);
const _: () = assert!(size_of::<BlockQ8_K>() == Q8K_BSUMS + 2 * (QK_K / 16));

/// GGML's 6-bit scale unpacking for 16 rows at once: `u[i]` lane `r` is dword `i` of row
/// `r`'s 12 scale bytes. Returns the bytes `sc0..sc3`, `sc4..sc7`, `m0..m3`, `m4..m7` of
/// each row in its lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn unpack_scales_k4(u: [__m512i; 3]) -> [__m512i; 4] {
    let k1 = _mm512_set1_epi32(0x3f3f_3f3f);
    let k2 = _mm512_set1_epi32(0x0f0f_0f0f);
    let k3 = _mm512_set1_epi32(0x0303_0303);
    // Scale j < 4: q[j] & 63; min j < 4: q[j + 4] & 63.
    let sc_lo = _mm512_and_si512(u[0], k1);
    let m_lo = _mm512_and_si512(u[1], k1);
    // Scale 4 + i: (q[8 + i] & 0xf) | (q[i] >> 6) << 4.
    let sc_hi = _mm512_or_si512(
        _mm512_and_si512(u[2], k2),
        _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(u[0]), k3)),
    );
    // Min 4 + i: (q[8 + i] >> 4) | (q[4 + i] >> 6) << 4.
    let m_hi = _mm512_or_si512(
        _mm512_and_si512(_mm512_srli_epi32::<4>(u[2]), k2),
        _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(u[1]), k3)),
    );
    [sc_lo, sc_hi, m_lo, m_hi]
}

/// Byte `k` (0..4) of each dword of `v`, zero-extended to the dword.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn byte_of_dword(v: __m512i, k: i32) -> __m512i {
    // pshufb control per dword p of a 128-bit lane: [4p + k, 0x80, 0x80, 0x80].
    let base = _mm512_setr_epi32(
        0x8080_8000u32 as i32,
        0x8080_8004u32 as i32,
        0x8080_8008u32 as i32,
        0x8080_800cu32 as i32,
        0x8080_8000u32 as i32,
        0x8080_8004u32 as i32,
        0x8080_8008u32 as i32,
        0x8080_800cu32 as i32,
        0x8080_8000u32 as i32,
        0x8080_8004u32 as i32,
        0x8080_8008u32 as i32,
        0x8080_800cu32 as i32,
        0x8080_8000u32 as i32,
        0x8080_8004u32 as i32,
        0x8080_8008u32 as i32,
        0x8080_800cu32 as i32,
    );
    _mm512_shuffle_epi8(v, _mm512_or_si512(base, _mm512_set1_epi32(k)))
}

/// Byte `k` (0..4) of each dword of `v` as both 16-bit halves of the dword (for
/// `vpmaddwd` against a pair of i16 sums).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn byte_of_dword_x2(v: __m512i, k: i32) -> __m512i {
    // pshufb control per dword p of a 128-bit lane: [4p + k, 0x80, 4p + k, 0x80].
    let base = _mm512_setr_epi32(
        0x8000_8000u32 as i32,
        0x8004_8004u32 as i32,
        0x8008_8008u32 as i32,
        0x800c_800cu32 as i32,
        0x8000_8000u32 as i32,
        0x8004_8004u32 as i32,
        0x8008_8008u32 as i32,
        0x800c_800cu32 as i32,
        0x8000_8000u32 as i32,
        0x8004_8004u32 as i32,
        0x8008_8008u32 as i32,
        0x800c_800cu32 as i32,
        0x8000_8000u32 as i32,
        0x8004_8004u32 as i32,
        0x8008_8008u32 as i32,
        0x800c_800cu32 as i32,
    );
    _mm512_shuffle_epi8(v, _mm512_or_si512(base, _mm512_set1_epi32(k | (k << 16))))
}

/// A Q4_K tile.
///
/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q4_k(t: &Tile<BlockQ4_K>) {
    check_tile!(t, NR_K);
    let nt = t.tokens;
    let wsize = size_of::<BlockQ4_K>();
    let roff = row_offsets(t.rows, t.ldw * wsize);
    let w0 = t.w.cast::<u8>();
    let m4 = nibble_mask();
    let mut acc = [_mm512_setzero_ps(); NR_K];
    for b in 0..t.kb {
        // SAFETY: block b < kb of the first row, inside the tile's weights.
        let base = unsafe { w0.add(b * wsize) };
        // Header of each row: [d | dmin], then the 12 scale bytes as 3 dwords.
        // SAFETY: block b of rows min(r, rows - 1) < rows: bytes 0..16 of the block.
        let [hd, u0, u1, u2] = unsafe { load_rows_16(base, &roff, 0) };
        let dw = cvtph16(_mm512_cvtepi32_epi16(hd));
        let dmin = cvtph16(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(hd)));
        let [sc_lo, sc_hi, m_lo, m_hi] = unpack_scales_k4([u0, u1, u2]);

        let mut scaled = [_mm512_setzero_si512(); NR_K];
        for g in 0..QK_K / 64 {
            // Nibbles of group g: low = sub-block 2g, high = sub-block 2g + 1.
            // SAFETY: bytes 16 + 32g .. 48 + 32g of the same blocks.
            let q = unsafe { transpose16x8(load_rows_32(base, &roff, Q4K_QS + 32 * g)) };
            let mut lo = [_mm512_setzero_si512(); 8];
            let mut hi = [_mm512_setzero_si512(); 8];
            for c in 0..8 {
                lo[c] = _mm512_and_si512(q[c], m4);
                hi[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(q[c]), m4);
            }
            // Scales of sub-blocks 2g and 2g + 1: bytes 2(g%2), 2(g%2)+1 of sc_lo / sc_hi.
            let s = if g < 2 { sc_lo } else { sc_hi };
            let k = 2 * (g as i32 % 2);
            let (s0, s1) = (byte_of_dword(s, k), byte_of_dword(s, k + 1));
            for (tk, sc_t) in scaled[..nt].iter_mut().enumerate() {
                // SAFETY: token tk < tokens, block b: its quants 64g .. 64g + 64.
                let aq = unsafe { t.a.add(tk * t.lda + b).cast::<u8>().add(Q8K_QS + 64 * g) };
                // Four vpdpbusd chains of 4 (low / high nibbles, even / odd dwords): a
                // token's latency is 4 products deep.
                let mut d = [_mm512_setzero_si512(); 4];
                for c in (0..8).step_by(2) {
                    // SAFETY: bytes 4c..4c+8 and 32 + 4c..32 + 4c + 8 of those 64 quants.
                    unsafe {
                        d[0] = _mm512_dpbusd_epi32(d[0], lo[c], bcast4(aq.add(4 * c)));
                        d[1] = _mm512_dpbusd_epi32(d[1], lo[c + 1], bcast4(aq.add(4 * c + 4)));
                        d[2] = _mm512_dpbusd_epi32(d[2], hi[c], bcast4(aq.add(32 + 4 * c)));
                        d[3] = _mm512_dpbusd_epi32(d[3], hi[c + 1], bcast4(aq.add(36 + 4 * c)));
                    }
                }
                let dl = _mm512_add_epi32(d[0], d[1]);
                let dh = _mm512_add_epi32(d[2], d[3]);
                *sc_t = _mm512_add_epi32(
                    *sc_t,
                    _mm512_add_epi32(_mm512_mullo_epi32(dl, s0), _mm512_mullo_epi32(dh, s1)),
                );
            }
        }

        // Min term: Σ_j m_j·(bsums[2j] + bsums[2j + 1]), 16-bit pairs with vpmaddwd.
        let mut mj = [_mm512_setzero_si512(); 8];
        for (j, v) in mj.iter_mut().enumerate() {
            *v = byte_of_dword_x2(if j < 4 { m_lo } else { m_hi }, j as i32 % 4);
        }
        for (tk, acc_t) in acc[..nt].iter_mut().enumerate() {
            let at = tk * t.lda + b;
            // SAFETY: token tk < tokens: its block b (whose bsums are bytes 260..292) and
            // scale b are inside the tile.
            let (bs, da) = unsafe { (t.a.add(at).cast::<u8>().add(Q8K_BSUMS), *t.ascale.add(at)) };
            // Two vpdpwssd chains of 4.
            let mut mins = [_mm512_setzero_si512(); 2];
            for (j, &m) in mj.iter().enumerate() {
                // SAFETY: bsums 2j and 2j + 1 (bytes 4j .. 4j + 4 of the 32).
                let pair = unsafe { bcast4(bs.add(4 * j)) };
                mins[j % 2] = _mm512_dpwssd_epi32(mins[j % 2], m, pair);
            }
            let mins = _mm512_add_epi32(mins[0], mins[1]);
            // acc += d_a·(scaled·d − mins·dmin): each rounding is relative to at most
            // |scaled·d| + |mins·dmin|, the block's magnitude over d_a.
            let v = _mm512_mul_ps(_mm512_cvtepi32_ps(scaled[tk]), dw);
            let v = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins), dmin, v);
            *acc_t = _mm512_fmadd_ps(v, _mm512_set1_ps(da), *acc_t);
        }
    }
    // SAFETY: C rows 0..tokens, columns 0..rows of the tile (contract).
    unsafe { store_tile(&acc[..nt], t.c, t.ldc, t.rows) }
}

// ---------------------------------------------------------------------------------------
// One token (GEMV).

/// Blocks per GEMV group: the exact sums of 16 consecutive blocks of a row end in the 16
/// lanes of one zmm.
const G: usize = 16;
/// How far ahead of the bytes being computed the GEMV prefetches its (single) weight stream
/// into L2, in bytes: the hardware prefetcher alone leaves a Zen 4 core at about half of its
/// read bandwidth on this access pattern; 4-16 KiB measured alike, 1-2 KiB (or into L1)
/// clearly slower.
const GEMV_PREFETCH: usize = 8192;

/// Per-lane byte-sum of `v`'s pairs of 32-bit lanes within each 128-bit lane:
/// `[a0+a2, b0+b2, a1+a3, b1+b3]` per 128-bit lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn merge32(a: __m512i, b: __m512i) -> __m512i {
    _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
}

/// `[x0+x2, x1+x3, y0+y2, y1+y3]` per 128-bit lane (elements 32-bit).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn merge64(x: __m512i, y: __m512i) -> __m512i {
    _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y))
}

/// 128-bit lanes `[a0+a1, a2+a3, b0+b1, b2+b3]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn merge128(a: __m512i, b: __m512i) -> __m512i {
    _mm512_add_epi32(
        _mm512_shuffle_i64x2::<0b10_00_10_00>(a, b),
        _mm512_shuffle_i64x2::<0b11_01_11_01>(a, b),
    )
}

/// Sum of the 16 lanes, in a fixed order (halves, then quarters, ...).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn hsum16(v: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Prefetches the lines of `len` bytes (64 to 192) at `p` + the prefetch distance into L2,
/// one line in 64 bytes: issued next to the loads of those bytes, so that the prefetches of a
/// stream are spread over its work (a burst of them per group stalls the loads).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn spread_prefetch(p: *const u8, len: usize) {
    let q = p.wrapping_add(GEMV_PREFETCH);
    for off in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(off).cast());
    }
}

// --- Q8_0 and Q4_0 ---------------------------------------------------------------------

/// The prepared activation of one group of 16 blocks (Q8_0 and Q4_0 weights): 8 vectors of
/// quants laid out to meet the weights as [`Gemv32::group_sums`] loads them, then the
/// offset correction `−OFFSET·Σa` and the scale `d_a` of the block of each lane (in the lane
/// order of [`Gemv32::lane_block`]); zero for blocks past the row.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Prep32 {
    q: [[i8; 64]; 8],
    corr: [i32; G],
    da: [f32; G],
}

/// A 32-quant weight format's GEMV group: 16 blocks of one row to 16 exact block sums.
trait Gemv32: Block32 {
    /// Lane `l` of [`Gemv32::group_sums`] holds the sum of block `LANES[l]` (0..16 within
    /// the group).
    const LANES: [usize; G];
    /// How many 128-byte windows of a group's bytes hold its 16 scales (window `i` starts
    /// at block `i·16/WINDOWS` and holds the scales of its `16/WINDOWS` blocks).
    const WINDOWS: usize;
    /// The `vpermt2w` indices and blend masks that pick them (see [`group_scales`]).
    const SCALES: ScaleTables = scale_tables(size_of::<Self>(), Self::LANES, Self::WINDOWS);
    fn lane_block(l: usize) -> usize {
        Self::LANES[l]
    }
    /// Vector `v` of the prepared quants of a group whose activation blocks are `a`.
    fn prep_quants(a: &[BlockQ8_0], v: usize) -> [i8; 64];
    /// The exact sums `Σ (w + OFFSET)·a` of the first `n` blocks of the group at `w` (blocks
    /// `n..16` neither read nor counted), lane `l` holding block `lane_block(l)`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI are available, `n` blocks at `w` are readable, `n == 16` when
    /// `FULL`, and `p` is the group's prepared activation.
    unsafe fn group_sums<const FULL: bool>(w: *const u8, p: &Prep32, n: usize) -> __m512i;
}

impl Gemv32 for BlockQ8_0 {
    /// After [`tree8`]: 128-bit lane `q`, element `i` holds block `8·(q/2) + 2i + q%2`.
    const LANES: [usize; G] = {
        let mut o = [0; G];
        let mut l = 0;
        while l < G {
            let (q, i) = (l / 4, l % 4);
            o[l] = 8 * (q / 2) + 2 * i + q % 2;
            l += 1;
        }
        o
    };
    /// 4 blocks of 34 bytes per window: the last scale at bytes 102..104, the last window
    /// ends at byte 408 + 128 = 536 of the group's 544.
    const WINDOWS: usize = 4;
    /// Vector `j` is blocks `2j` and `2j + 1`, 32 quants each.
    fn prep_quants(a: &[BlockQ8_0], v: usize) -> [i8; 64] {
        let mut out = [0i8; 64];
        for (half, o) in out.chunks_exact_mut(QK).enumerate() {
            if let Some(b) = a.get(2 * v + half) {
                o.copy_from_slice(&b.qs);
            }
        }
        out
    }
    #[inline(always)]
    unsafe fn group_sums<const FULL: bool>(w: *const u8, p: &Prep32, n: usize) -> __m512i {
        // SAFETY: forwarded contract.
        unsafe { group_sums_q8_0::<FULL>(w, p, n) }
    }
}

impl Gemv32 for BlockQ4_0 {
    /// After [`tree4`]: 128-bit lane `c`, element `i` holds block `4i + c`.
    const LANES: [usize; G] = {
        let mut o = [0; G];
        let mut l = 0;
        while l < G {
            o[l] = 4 * (l % 4) + l / 4;
            l += 1;
        }
        o
    };
    /// 8 blocks of 18 bytes per window: the last scale at bytes 126..128, the last window
    /// ends at byte 144 + 128 = 272 of the group's 288.
    const WINDOWS: usize = 2;
    /// Vector `2i` holds the first 16 quants of blocks `4i..4i + 4` (they meet the low
    /// nibbles), vector `2i + 1` their last 16 (the high nibbles).
    fn prep_quants(a: &[BlockQ8_0], v: usize) -> [i8; 64] {
        let mut out = [0i8; 64];
        let (quad, half) = (v / 2, v % 2);
        for (c, o) in out.chunks_exact_mut(QK / 2).enumerate() {
            if let Some(b) = a.get(4 * quad + c) {
                o.copy_from_slice(&b.qs[16 * half..16 * half + 16]);
            }
        }
        out
    }
    #[inline(always)]
    unsafe fn group_sums<const FULL: bool>(w: *const u8, p: &Prep32, n: usize) -> __m512i {
        // SAFETY: forwarded contract.
        unsafe { group_sums_q4_0::<FULL>(w, p, n) }
    }
}

/// Eight vectors whose 128-bit lanes 0-1 hold partial sums of block `2j` and lanes 2-3 of
/// block `2j + 1` (vector `j`) → one vector of the 16 block sums, in the order of
/// `BlockQ8_0::lane_block`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn tree8(v: [__m512i; 8]) -> __m512i {
    // w0 / w1: 128-bit lane c, element i = total of lane c of vector i / 4 + i.
    let w0 = merge64(merge32(v[0], v[1]), merge32(v[2], v[3]));
    let w1 = merge64(merge32(v[4], v[5]), merge32(v[6], v[7]));
    merge128(w0, w1)
}

/// Four vectors whose 128-bit lane `c` holds the partial sums of block `4i + c` (vector
/// `i`) → the 16 block sums, in the order of `BlockQ4_0::lane_block`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn tree4(v: [__m512i; 4]) -> __m512i {
    merge64(merge32(v[0], v[1]), merge32(v[2], v[3]))
}

/// See [`Gemv32::group_sums`]: block pair `j` is one zmm of weights (two 32-byte loads)
/// against prepared vector `j`.
///
/// # Safety
/// See [`Gemv32::group_sums`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn group_sums_q8_0<const FULL: bool>(w: *const u8, p: &Prep32, n: usize) -> __m512i {
    const S: usize = size_of::<BlockQ8_0>();
    let bias = _mm512_set1_epi8(-128);
    let mut v = [_mm512_setzero_si512(); 8];
    for (j, vj) in v.iter_mut().enumerate() {
        if !FULL && 2 * j >= n {
            break;
        }
        if FULL {
            spread_prefetch(w.wrapping_add(2 * j * S), 2 * S);
        }
        // SAFETY: blocks 2j (and 2j + 1 when it is below n) are readable; qs is bytes 2..34.
        let z = unsafe {
            let a = _mm256_loadu_si256(w.add(2 * j * S + 2).cast());
            if FULL || 2 * j + 1 < n {
                let b = _mm256_loadu_si256(w.add((2 * j + 1) * S + 2).cast());
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
            } else {
                // The missing block meets zero activations.
                _mm512_zextsi256_si512(a)
            }
        };
        // SAFETY: p.q[j] is 64 readable bytes.
        let a = unsafe { _mm512_loadu_si512(p.q[j].as_ptr().cast()) };
        *vj = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(z, bias), a);
    }
    tree8(v)
}

/// See [`Gemv32::group_sums`]: blocks `4i..4i + 4` are one zmm of nibble bytes (four 16-byte
/// loads), whose low and high nibbles meet prepared vectors `2i` and `2i + 1`.
///
/// # Safety
/// See [`Gemv32::group_sums`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn group_sums_q4_0<const FULL: bool>(w: *const u8, p: &Prep32, n: usize) -> __m512i {
    const S: usize = size_of::<BlockQ4_0>();
    let m = nibble_mask();
    let mut v = [_mm512_setzero_si512(); 4];
    for (i, vi) in v.iter_mut().enumerate() {
        if !FULL && 4 * i >= n {
            break;
        }
        let z = if FULL {
            spread_prefetch(w.wrapping_add(4 * i * S), 4 * S);
            // SAFETY: the group's 16 blocks are readable (FULL).
            unsafe { quad_q4_0(w, i) }
        } else {
            // SAFETY: the first n blocks are readable.
            unsafe { quad_q4_0_tail(w, i, n) }
        };
        let lo = _mm512_and_si512(z, m);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(z), m);
        // SAFETY: p.q[2i] and p.q[2i + 1] are 64 readable bytes each.
        let (alo, ahi) = unsafe {
            (
                _mm512_loadu_si512(p.q[2 * i].as_ptr().cast()),
                _mm512_loadu_si512(p.q[2 * i + 1].as_ptr().cast()),
            )
        };
        *vi = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, alo),
            hi,
            ahi,
        );
    }
    tree4(v)
}

/// Start (in bytes from the group) of the 128-byte window that holds the quants of blocks
/// `4i..4i + 4` of a Q4_0 group: the quad's own start, except for the last quad, whose window
/// ends with the group (at byte 288) instead of past it. Windows 0 and 2 are also the scale
/// windows of [`group_scales`], so their loads are shared.
const fn q4_0_window(i: usize) -> usize {
    if i < 3 { 72 * i } else { 160 }
}

/// `vpermt2w` indices that gather the 4×16 quant bytes of a quad (block `c`'s at bytes
/// `18c + 2 .. 18c + 18` of the quad: even offsets) into 128-bit lane `c`, from a window
/// that starts `shift` bytes before the quad.
const fn q4_0_quad_idx(shift: usize) -> [u16; 32] {
    let mut o = [0u16; 32];
    let mut p = 0;
    while p < 32 {
        let byte = shift + 18 * (p / 8) + 2 + 2 * (p % 8);
        assert!(byte + 2 <= 128, "a quant outside its window");
        o[p] = (byte / 2) as u16;
        p += 1;
    }
    o
}
const Q4_0_QUAD_IDX: [u16; 32] = q4_0_quad_idx(0);
const Q4_0_LAST_QUAD_IDX: [u16; 32] = q4_0_quad_idx(72 * 3 - q4_0_window(3));
const _: () = assert!(q4_0_window(3) + 128 == G * size_of::<BlockQ4_0>());

/// The 64 nibble bytes of blocks `4i..4i + 4` of a whole Q4_0 group at `w` (block `c` in
/// 128-bit lane `c`): two 64-byte loads and one `vpermt2w`.
///
/// # Safety
/// The group's 16 blocks (288 bytes) at `w` are readable (every window lies inside them,
/// checked at compile time above).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn quad_q4_0(w: *const u8, i: usize) -> __m512i {
    let idx = if i < 3 {
        &Q4_0_QUAD_IDX
    } else {
        &Q4_0_LAST_QUAD_IDX
    };
    // SAFETY: bytes window(i) .. + 128 lie inside the group; idx is 64 readable bytes.
    unsafe {
        let p = w.add(q4_0_window(i));
        _mm512_permutex2var_epi16(
            _mm512_loadu_si512(p.cast()),
            _mm512_loadu_si512(idx.as_ptr().cast()),
            _mm512_loadu_si512(p.add(64).cast()),
        )
    }
}

/// [`quad_q4_0`] for the first `n` blocks of a last, partial group: 16-byte loads of the
/// quad's blocks below `n`, zero for the others.
///
/// # Safety
/// The first `n` blocks at `w` are readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn quad_q4_0_tail(w: *const u8, i: usize, n: usize) -> __m512i {
    const S: usize = size_of::<BlockQ4_0>();
    let load = |c: usize| {
        if 4 * i + c < n {
            // SAFETY: block 4i + c < n is readable; qs is bytes 2..18.
            unsafe { _mm_loadu_si128(w.add((4 * i + c) * S + 2).cast()) }
        } else {
            _mm_setzero_si128()
        }
    };
    let z = _mm512_inserti32x4::<1>(_mm512_castsi128_si512(load(0)), load(1));
    let z = _mm512_inserti32x4::<2>(z, load(2));
    _mm512_inserti32x4::<3>(z, load(3))
}

/// Bytes of the prepared activation for `kb` blocks of a 32-quant format.
fn prep_bytes_32(kb: usize) -> usize {
    kb.div_ceil(G) * size_of::<Prep32>()
}

/// # Safety
/// See [`super::PrepareFn`].
unsafe fn prepare_32<W: Gemv32>(
    a: *const BlockQ8_0,
    sums: *const i32,
    ascale: *const f32,
    kb: usize,
    out: *mut u8,
) {
    // SAFETY: a, sums and ascale cover kb entries; out is prep_bytes_32(kb) bytes, 64-byte
    // aligned (Prep32's alignment), not aliased by the inputs.
    let (a, sums, ascale, out) = unsafe {
        (
            std::slice::from_raw_parts(a, kb),
            std::slice::from_raw_parts(sums, kb),
            std::slice::from_raw_parts(ascale, kb),
            std::slice::from_raw_parts_mut(out.cast::<Prep32>(), kb.div_ceil(G)),
        )
    };
    for (g, p) in out.iter_mut().enumerate() {
        let b0 = g * G;
        let ab = &a[b0..(b0 + G).min(kb)];
        for (v, q) in p.q.iter_mut().enumerate() {
            *q = W::prep_quants(ab, v);
        }
        for l in 0..G {
            let b = b0 + W::lane_block(l);
            (p.corr[l], p.da[l]) = if b < kb {
                (sums[b].wrapping_mul(-W::OFFSET), ascale[b])
            } else {
                (0, 0.0)
            };
        }
    }
}

/// The most scale windows of a format (see [`Gemv32::WINDOWS`]).
const MAX_WINDOWS: usize = 4;

/// See [`Gemv32::SCALES`]: for window `i`, the word index into its two 64-byte halves of the
/// scale of each lane's block (lanes of other windows: 0) and the lanes it provides.
struct ScaleTables {
    idx: [[u16; 32]; MAX_WINDOWS],
    mask: [u32; MAX_WINDOWS],
}

/// The tables for blocks of `size` bytes, `windows` windows and the lane order `lanes`;
/// fails to compile (const evaluation) if a scale or a window falls outside the group.
const fn scale_tables(size: usize, lanes: [usize; G], windows: usize) -> ScaleTables {
    assert!(windows <= MAX_WINDOWS && G.is_multiple_of(windows));
    let per = G / windows;
    assert!(
        (windows - 1) * per * size + 128 <= G * size,
        "a window past the group"
    );
    let mut t = ScaleTables {
        idx: [[0; 32]; MAX_WINDOWS],
        mask: [0; MAX_WINDOWS],
    };
    let mut l = 0;
    while l < G {
        let (i, j) = (lanes[l] / per, lanes[l] % per);
        assert!(j * size + 2 <= 128, "a scale outside its window");
        t.idx[i][l] = (j * size / 2) as u16;
        t.mask[i] |= 1 << l;
        l += 1;
    }
    t
}

/// The f16 scales of the 16 blocks of a whole group at `w`, lane `l` holding block
/// `LANES[l]`'s, as f32: each window is two 64-byte loads, whose words the lanes pick with
/// `vpermt2w`; three blends join the windows.
///
/// # Safety
/// The group's 16 blocks at `w` are readable (every window ends inside them, which
/// [`scale_tables`] checks at compile time).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn group_scales<W: Gemv32>(w: *const u8) -> __m512 {
    let s = size_of::<W>();
    let per = G / W::WINDOWS;
    let t = &W::SCALES;
    let mut d = _mm512_setzero_si512();
    for i in 0..W::WINDOWS {
        // SAFETY: bytes i·per·s .. + 128 lie inside the group (see above), and idx is 64
        // readable bytes.
        let (lo, hi, idx) = unsafe {
            let p = w.add(i * per * s);
            (
                _mm512_loadu_si512(p.cast()),
                _mm512_loadu_si512(p.add(64).cast()),
                _mm512_loadu_si512(t.idx[i].as_ptr().cast()),
            )
        };
        let v = _mm512_permutex2var_epi16(lo, idx, hi);
        d = _mm512_mask_blend_epi16(t.mask[i], d, v);
    }
    cvtph16(_mm512_castsi512_si256(d))
}

/// The f16 scales of the first `n` blocks of a group at `w` (lane `l` holding block
/// `LANES[l]`'s, 0 for blocks `n..16`), read one by one: the last group of a row.
///
/// # Safety
/// The group's first `n` blocks at `w` are readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn tail_scales<W: Gemv32>(w: *const u8, n: usize) -> __m512 {
    let mut h = [0u16; G];
    for (l, hl) in h.iter_mut().enumerate() {
        let b = W::LANES[l];
        if b < n {
            // SAFETY: block b < n; its scale is its first 2 bytes.
            *hl = unsafe { w.add(b * size_of::<W>()).cast::<u16>().read_unaligned() };
        }
    }
    // SAFETY: h is 32 readable bytes.
    cvtph16(unsafe { _mm256_loadu_si256(h.as_ptr().cast()) })
}

/// A Q8_0 / Q4_0 GEMV: the rows one after another, so the weights are read as one
/// sequential stream (walking several rows at once, a few KiB apart, defeats the hardware
/// prefetcher and halves the bandwidth on Zen 4).
///
/// # Safety
/// See [`super::GemvFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn gemv_32<W: Gemv32>(t: &Gemv<W>) {
    let s = size_of::<W>();
    let prep = t.prep.cast::<Prep32>();
    // acc += (isum − OFFSET·Σa)·(d_w·d_a), per lane (block).
    let step = |acc: &mut __m512, p: &Prep32, isum: __m512i, dw: __m512| {
        // SAFETY: 64 readable bytes each.
        let (corr, da) = unsafe {
            (
                _mm512_loadu_si512(p.corr.as_ptr().cast()),
                _mm512_loadu_ps(p.da.as_ptr()),
            )
        };
        let isum = _mm512_add_epi32(isum, corr);
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, da), *acc);
    };
    for r in 0..t.rows {
        let w = t.w.cast::<u8>().wrapping_add(r * t.ldw * s);
        let mut acc = _mm512_setzero_ps();
        for g in 0..t.kb / G {
            // SAFETY: group g < kb.div_ceil(G) of the prepared activation.
            let p = unsafe { &*prep.add(g) };
            let base = w.wrapping_add(g * G * s);
            // SAFETY: blocks gG .. gG + 16 <= kb of row r < rows.
            let (isum, dw) =
                unsafe { (W::group_sums::<true>(base, p, G), group_scales::<W>(base)) };
            step(&mut acc, p, isum, dw);
        }
        let n = t.kb % G;
        if n > 0 {
            let g = t.kb / G;
            // SAFETY: the last group (g < kb.div_ceil(G)).
            let p = unsafe { &*prep.add(g) };
            let base = w.wrapping_add(g * G * s);
            // SAFETY: blocks gG .. gG + n = kb of row r < rows.
            let (isum, dw) = unsafe {
                (
                    W::group_sums::<false>(base, p, n),
                    tail_scales::<W>(base, n),
                )
            };
            step(&mut acc, p, isum, dw);
        }
        // SAFETY: output r < rows (contract).
        unsafe { *t.c.add(r) = hsum16(acc) };
    }
}

/// # Safety
/// See [`super::GemvFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemv_q8_0(t: &Gemv<BlockQ8_0>) {
    // SAFETY: forwarded contract.
    unsafe { gemv_32(t) }
}

/// # Safety
/// See [`super::GemvFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemv_q4_0(t: &Gemv<BlockQ4_0>) {
    // SAFETY: forwarded contract.
    unsafe { gemv_32(t) }
}

/// # Safety
/// See [`super::PrepareFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn prepare_q8_0(a: *const BlockQ8_0, s: *const i32, d: *const f32, kb: usize, o: *mut u8) {
    // SAFETY: forwarded contract.
    unsafe { prepare_32::<BlockQ8_0>(a, s, d, kb, o) }
}

/// # Safety
/// See [`super::PrepareFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn prepare_q4_0(a: *const BlockQ8_0, s: *const i32, d: *const f32, kb: usize, o: *mut u8) {
    // SAFETY: forwarded contract.
    unsafe { prepare_32::<BlockQ4_0>(a, s, d, kb, o) }
}

// --- Q4_K ----------------------------------------------------------------------------

/// The prepared activation of one group of 16 Q8_K super-blocks: per super-block, its quants
/// as the 4 vectors that meet the low / high nibbles of the two 64-byte halves of a Q4_K
/// block (see [`superblock_sum`]); the `bsums` pairs `(bsums[2j], bsums[2j + 1])` of every
/// super-block `b` as lane `b` of vector `j` (for `vpmaddwd`); and the scales `d_a`. Zero
/// past the row.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PrepK {
    q: [[[i8; 64]; 4]; G],
    bs: [[i32; G]; 8],
    da: [f32; G],
}

/// Bytes of the prepared activation for `kb` Q8_K blocks.
fn prep_bytes_q4_k(kb: usize) -> usize {
    kb.div_ceil(G) * size_of::<PrepK>()
}

/// # Safety
/// See [`super::PrepareFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn prepare_q4_k(
    a: *const BlockQ8_K,
    _sums: *const i32,
    ascale: *const f32,
    kb: usize,
    out: *mut u8,
) {
    // SAFETY: a and ascale cover kb entries; out is prep_bytes_q4_k(kb) bytes, 64-byte
    // aligned (PrepK's alignment), not aliased by the inputs.
    let (a, ascale, out) = unsafe {
        (
            std::slice::from_raw_parts(a, kb),
            std::slice::from_raw_parts(ascale, kb),
            std::slice::from_raw_parts_mut(out.cast::<PrepK>(), kb.div_ceil(G)),
        )
    };
    for (g, p) in out.iter_mut().enumerate() {
        *p = PrepK {
            q: [[[0; 64]; 4]; G],
            bs: [[0; G]; 8],
            da: [0.0; G],
        };
        for (b, blk) in a[g * G..].iter().take(G).enumerate() {
            // Vector v: sub-blocks 2(v/2)·2 + v%2 (low half of the zmm) and that + 2.
            for (v, q) in p.q[b].iter_mut().enumerate() {
                let s0 = 4 * (v / 2) + v % 2;
                for (half, s) in [s0, s0 + 2].into_iter().enumerate() {
                    let src = &blk.qs[32 * s..32 * s + 32];
                    for (d, &x) in q[32 * half..32 * half + 32].iter_mut().zip(src) {
                        *d = x;
                    }
                }
            }
            for (j, bs) in p.bs.iter_mut().enumerate() {
                let (lo, hi) = (blk.bsums[2 * j] as u16 as u32, blk.bsums[2 * j + 1] as u16);
                bs[b] = (lo | (hi as u32) << 16) as i32;
            }
            p.da[b] = ascale[g * G + b];
        }
    }
}

/// `pshufb` control that widens bytes `k`, `k + 1` of each dword to its two 16-bit halves.
const fn pair_ctl(k: u32) -> [u32; G] {
    let mut c = [0u32; G];
    let mut i = 0;
    while i < G {
        let b = 4 * (i as u32 % 4) + k;
        c[i] = 0x8000_8000 | b | (b + 1) << 16;
        i += 1;
    }
    c
}
const SC_PAIR01: [u32; G] = pair_ctl(0);
const SC_PAIR23: [u32; G] = pair_ctl(2);

/// The sub-block scales of 16 super-blocks as (scale, scale) word pairs for `vpdpwssd`:
/// lane `b` of vector `i` holds scales `2i`, `2i + 1` of super-block `b` (`sc_lo` / `sc_hi`
/// lane `b`: its scales 0-3 / 4-7 as bytes).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn scale_pairs(sc_lo: __m512i, sc_hi: __m512i) -> [__m512i; 4] {
    // SAFETY: 64 readable bytes each.
    let (c01, c23) = unsafe {
        (
            _mm512_loadu_si512(SC_PAIR01.as_ptr().cast()),
            _mm512_loadu_si512(SC_PAIR23.as_ptr().cast()),
        )
    };
    [
        _mm512_shuffle_epi8(sc_lo, c01),
        _mm512_shuffle_epi8(sc_lo, c23),
        _mm512_shuffle_epi8(sc_hi, c01),
        _mm512_shuffle_epi8(sc_hi, c23),
    ]
}

/// The sub-block-scaled partial sums of one Q4_K super-block of a row: its two 64-byte
/// halves of nibbles split into low and high nibbles are sub-blocks (0, 2), (1, 3), (4, 6),
/// (5, 7) in the 256-bit halves of 4 vectors, each multiplied (`vpdpbusd`) by the matching
/// prepared quants and then by its 6-bit scale (lane `b` of `sc_lo` / `sc_hi` holds the
/// super-block's scales 0-3 / 4-7). The 16 lanes sum to `Σ_j sc_j·Σ q·a`, exactly.
///
/// # Safety
/// The block at `w` (144 bytes) is readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn superblock_sum(w: *const u8, q: &[[i8; 64]; 4], sp: &[__m512i; 4], b: usize) -> __m512i {
    let m4 = nibble_mask();
    // SAFETY: bytes 16..80 and 80..144 of the block.
    let (z0, z1) = unsafe {
        (
            _mm512_loadu_si512(w.add(Q4K_QS).cast()),
            _mm512_loadu_si512(w.add(Q4K_QS + 64).cast()),
        )
    };
    let nib = [
        _mm512_and_si512(z0, m4),
        _mm512_and_si512(_mm512_srli_epi16::<4>(z0), m4),
        _mm512_and_si512(z1, m4),
        _mm512_and_si512(_mm512_srli_epi16::<4>(z1), m4),
    ];
    let mut d = [_mm512_setzero_si512(); 4];
    for (v, dv) in d.iter_mut().enumerate() {
        // SAFETY: q[v] is 64 readable bytes.
        let a = unsafe { _mm512_loadu_si512(q[v].as_ptr().cast()) };
        *dv = _mm512_dpbusd_epi32(_mm512_setzero_si512(), nib[v], a);
    }
    // Each lane of d is 4 products of a nibble and an i8, |·| <= 4·15·128 < 2¹⁵: pair
    // them as i16 (d0, d1) and (d2, d3) and multiply by the word pairs of their sub-blocks'
    // scales with vpdpwssd.
    let pair = |lo: __m512i, hi: __m512i| {
        _mm512_mask_blend_epi16(0xaaaa_aaaa, lo, _mm512_slli_epi32::<16>(hi))
    };
    // Lanes 0-7 from lane b of the first vector, lanes 8-15 from lane b of the second:
    // (sc0, sc1) | (sc2, sc3), then (sc4, sc5) | (sc6, sc7).
    let b = b as i32;
    let idx = _mm512_setr_epi32(
        b,
        b,
        b,
        b,
        b,
        b,
        b,
        b,
        16 + b,
        16 + b,
        16 + b,
        16 + b,
        16 + b,
        16 + b,
        16 + b,
        16 + b,
    );
    let s01 = _mm512_permutex2var_epi32(sp[0], idx, sp[1]);
    let s23 = _mm512_permutex2var_epi32(sp[2], idx, sp[3]);
    let s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), pair(d[0], d[1]), s01);
    _mm512_dpwssd_epi32(s, pair(d[2], d[3]), s23)
}

/// One group of the first `n` super-blocks (`n == 16` when `FULL`) of a Q4_K row at `w`:
/// lane `b` of the results is super-block `b`'s exact scaled sum `Σ_j sc_j·Σ q·a`, its
/// exact min sum `Σ_j m_j·(bsums[2j] + bsums[2j + 1])`, `d` and `dmin` (all 0 for `b >= n`).
///
/// # Safety
/// The `n` blocks at `w` are readable; `p` is the group's prepared activation.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn group_q4_k<const FULL: bool>(
    w: *const u8,
    p: &PrepK,
    n: usize,
) -> (__m512i, __m512i, __m512, __m512) {
    const S: usize = size_of::<BlockQ4_K>();
    // Headers [d | dmin, scales 0..12] of the 16 super-blocks, transposed: lane b of
    // vector k is dword k of block b (load_rows_16's layout, zero past n).
    let mut z = [_mm512_setzero_si512(); 4];
    for (i, zi) in z.iter_mut().enumerate() {
        let load = |b: usize| {
            if FULL || b < n {
                // SAFETY: block b < n: bytes 0..16.
                unsafe { _mm_loadu_si128(w.add(b * S).cast()) }
            } else {
                _mm_setzero_si128()
            }
        };
        let v = _mm512_inserti32x4::<1>(_mm512_castsi128_si512(load(i)), load(i + 4));
        let v = _mm512_inserti32x4::<2>(v, load(i + 8));
        *zi = _mm512_inserti32x4::<3>(v, load(i + 12));
    }
    let [hd, u0, u1, u2] = transpose4(z);
    let dw = cvtph16(_mm512_cvtepi32_epi16(hd));
    let dmin = cvtph16(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(hd)));
    let [sc_lo, sc_hi, m_lo, m_hi] = unpack_scales_k4([u0, u1, u2]);
    let sp = scale_pairs(sc_lo, sc_hi);

    let mut mins = _mm512_setzero_si512();
    for (j, bs) in p.bs.iter().enumerate() {
        let m = byte_of_dword_x2(if j < 4 { m_lo } else { m_hi }, j as i32 % 4);
        // SAFETY: 64 readable bytes.
        let pair = unsafe { _mm512_loadu_si512(bs.as_ptr().cast()) };
        mins = _mm512_dpwssd_epi32(mins, m, pair);
    }

    // Super-blocks 4k..4k + 4 → wq[k] (128-bit lane c, element i: lane c of block 4k + i);
    // then two merge128 levels put block b in lane b.
    let mut wq = [_mm512_setzero_si512(); 4];
    for (k, wk) in wq.iter_mut().enumerate() {
        if !FULL && 4 * k >= n {
            break;
        }
        let mut v = [_mm512_setzero_si512(); 4];
        for (i, vi) in v.iter_mut().enumerate() {
            let b = 4 * k + i;
            if FULL || b < n {
                spread_prefetch(w.wrapping_add(b * S), S);
                // SAFETY: block b < n is readable.
                *vi = unsafe { superblock_sum(w.add(b * S), &p.q[b], &sp, b) };
            }
        }
        *wk = merge64(merge32(v[0], v[1]), merge32(v[2], v[3]));
    }
    let scaled = merge128(merge128(wq[0], wq[1]), merge128(wq[2], wq[3]));
    (scaled, mins, dw, dmin)
}

/// A Q4_K GEMV, the rows one after another (see [`gemv_32`]).
///
/// # Safety
/// See [`super::GemvFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemv_q4_k(t: &Gemv<BlockQ4_K>) {
    const S: usize = size_of::<BlockQ4_K>();
    let prep = t.prep.cast::<PrepK>();
    for r in 0..t.rows {
        let w = t.w.cast::<u8>().wrapping_add(r * t.ldw * S);
        let mut acc = _mm512_setzero_ps();
        for g in 0..t.kb.div_ceil(G) {
            let n = G.min(t.kb - g * G);
            // SAFETY: group g < kb.div_ceil(G) of the prepared activation.
            let p = unsafe { &*prep.add(g) };
            // SAFETY: 64 readable bytes.
            let da = unsafe { _mm512_loadu_ps(p.da.as_ptr()) };
            let base = w.wrapping_add(g * G * S);
            // SAFETY: blocks gG .. gG + n <= kb of row r < rows.
            let (scaled, mins, dw, dmin) = unsafe {
                if n == G {
                    group_q4_k::<true>(base, p, G)
                } else {
                    group_q4_k::<false>(base, p, n)
                }
            };
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled), _mm512_mul_ps(dw, da), acc);
            acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins), _mm512_mul_ps(dmin, da), acc);
        }
        // SAFETY: output r < rows (contract).
        unsafe { *t.c.add(r) = hsum16(acc) };
    }
}

// ---------------------------------------------------------------------------------------
// Activation quantizers.

/// `|v|` (clears the sign bit).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn abs_ps(v: __m256) -> __m256 {
    _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)))
}

/// `max(|v|, acc)` skipping NaN: `maxps` returns its second operand unless the first is
/// greater, so a NaN `|v|` leaves `acc` (GGML's `amax < |v|`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn max_abs(acc: __m256, v: __m256) -> __m256 {
    _mm256_max_ps(abs_ps(v), acc)
}

/// Largest lane of `v` (no NaN lanes).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
    _mm_cvtss_f32(m)
}

/// Sum of the 8 lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// `x.round() as i8` (half away from zero, then Rust's saturating cast: NaN → 0), as i32
/// lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn round_away_i8(x: __m256) -> __m256i {
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
    // Exact: 0 when t = 0, else t and x share their sign and |t| <= |x| < 2|t| (Sterbenz);
    // NaN for ±inf (then no adjustment, t = ±inf).
    let frac = _mm256_sub_ps(x, t);
    let tie_or_more = _mm256_cmp_ps::<_CMP_GE_OQ>(abs_ps(frac), _mm256_set1_ps(0.5));
    let sign = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)), x);
    let one = _mm256_or_ps(sign, _mm256_set1_ps(1.0));
    let r = _mm256_add_ps(t, _mm256_and_ps(tie_or_more, one));
    // `as i8`: NaN → 0, then saturate (r is integral, so the truncation is exact).
    let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
    let r = _mm256_min_ps(
        _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
        _mm256_set1_ps(127.0),
    );
    _mm256_cvttps_epi32(r)
}

/// `nearest_int(x).min(127) as i8` (tessera_core's bit trick, then the truncating cast), as
/// sign-extended i32 lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn nearest_int_i8(x: __m256) -> __m256i {
    let v = _mm256_add_ps(x, _mm256_set1_ps(12_582_912.0));
    let n = _mm256_sub_epi32(
        _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x007f_ffff)),
        _mm256_set1_epi32(0x0040_0000),
    );
    let n = _mm256_min_epi32(n, _mm256_set1_epi32(127));
    _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(n))
}

/// 32 i32 lanes in [-128, 127] → 32 i8 in order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn pack_i8(q: [__m256i; 4]) -> __m256i {
    // Per 128-bit lane: q0[0..4] q1[0..4] | q0[4..8] q1[4..8] (i16), then the four quarter
    // rows per lane (i8): dwords q0a q1a q2a q3a | q0b q1b q2b q3b.
    let p01 = _mm256_packs_epi32(q[0], q[1]);
    let p23 = _mm256_packs_epi32(q[2], q[3]);
    let p = _mm256_packs_epi16(p01, p23);
    _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// # Safety
/// See [`super::QuantizeFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn quantize_q8_0(x: *const f32, nb: usize, out: *mut BlockQ8_0, sums: *mut i32) {
    for b in 0..nb {
        let mut v = [_mm256_setzero_ps(); 4];
        for (i, vi) in v.iter_mut().enumerate() {
            // SAFETY: floats 32b + 8i .. + 8 of block b < nb.
            *vi = unsafe { _mm256_loadu_ps(x.add(b * QK + 8 * i)) };
        }
        let mut m = _mm256_setzero_ps();
        for &vi in &v {
            m = max_abs(m, vi);
        }
        let amax = hmax(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, &vi) in q.iter_mut().zip(&v) {
            *qi = round_away_i8(_mm256_mul_ps(vi, idv));
        }
        let sum = hsum_epi32(_mm256_add_epi32(
            _mm256_add_epi32(q[0], q[1]),
            _mm256_add_epi32(q[2], q[3]),
        ));
        let mut y = BlockQ8_0 {
            d: f16::from_f32(d),
            qs: [0; QK],
        };
        // SAFETY: y.qs is 32 writable bytes.
        unsafe { _mm256_storeu_si256(y.qs.as_mut_ptr().cast(), pack_i8(q)) };
        // SAFETY: block b < nb of out and sums.
        unsafe {
            out.add(b).write(y);
            sums.add(b).write(sum);
        }
    }
}

/// # Safety
/// See [`super::QuantizeFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn quantize_q8_k(x: *const f32, nb: usize, out: *mut BlockQ8_K, sums: *mut i32) {
    const V: usize = QK_K / 8;
    for b in 0..nb {
        // SAFETY: block b < nb: 256 floats.
        let xb = unsafe { x.add(b * QK_K) };
        let load = |i: usize| -> __m256 {
            // SAFETY: i < 32: floats 8i .. 8i + 8 of the block.
            unsafe { _mm256_loadu_ps(xb.add(8 * i)) }
        };
        let mut m = _mm256_setzero_ps();
        for i in 0..V {
            m = max_abs(m, load(i));
        }
        let amax = hmax(m);
        let mut y = BlockQ8_K::zeroed();
        if amax == 0.0 {
            // SAFETY: block b < nb of out and sums.
            unsafe {
                out.add(b).write(y);
                sums.add(b).write(0);
            }
            continue;
        }
        // The signed value of the first element with the largest |v| (it exists: amax is
        // one of the |v|, NaN aside).
        let amaxv = _mm256_set1_ps(amax);
        let mut max = amax;
        for i in 0..V {
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(abs_ps(load(i)), amaxv));
            if hit != 0 {
                // SAFETY: element 8i + (lane < 8) of the block.
                max = unsafe { *xb.add(8 * i + hit.trailing_zeros() as usize) };
                break;
            }
        }
        let iscale = -127.0 / max;
        let isv = _mm256_set1_ps(iscale);
        for k in 0..QK_K / 32 {
            let mut q = [_mm256_setzero_si256(); 4];
            for (j, qj) in q.iter_mut().enumerate() {
                *qj = nearest_int_i8(_mm256_mul_ps(isv, load(4 * k + j)));
            }
            // SAFETY: quants 32k .. 32k + 32 of y.
            unsafe { _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * k).cast(), pack_i8(q)) };
        }
        for (j, s) in y.bsums.iter_mut().enumerate() {
            *s = y.qs[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
        }
        y.d = 1.0 / iscale;
        let sum: i32 = y.bsums.iter().map(|&s| s as i32).sum();
        // SAFETY: block b < nb of out and sums.
        unsafe {
            out.add(b).write(y);
            sums.add(b).write(sum);
        }
    }
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    //! These run only where [`available`] (and under Miri, see the module documentation);
    //! elsewhere each prints a skip line.
    use super::*;
    use crate::quant::scalar;
    use tessera_core::quant::{QuantBlock, WeightBlock};

    fn skip(name: &str) -> bool {
        if available() {
            return false;
        }
        eprintln!("skipping {name}: this CPU lacks AVX-512 F/BW/VL/VNNI");
        true
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
        fn unit(&mut self) -> f32 {
            (self.next() >> 29) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn byte(&mut self) -> u8 {
            (self.next() >> 20) as u8
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Floats with the quantizers' hard cases: ties, repeated maxima of both signs,
    /// signed zeros, NaN, ±inf, subnormals, huge values.
    fn nasty(rng: &mut Rng, len: usize, case: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..len).map(|_| rng.unit()).collect();
        match case % 12 {
            0 => {}
            // Ties of the Q8 grids: amax 127 makes d = 1 (Q8_0) and iscale = ±1 (Q8_K).
            1 => {
                for (i, v) in x.iter_mut().enumerate() {
                    *v = ((i % 255) as f32 - 127.0) * 0.5;
                }
                x[len / 2] = 127.0;
            }
            2 => {
                for (i, v) in x.iter_mut().enumerate() {
                    *v = -(((i * 7) % 255) as f32 - 127.0) * 0.5;
                }
                x[3] = -127.0;
                x[len - 1] = 127.0;
            }
            // Repeated maxima of either sign, first one negative or positive.
            3 => {
                let s = if rng.next().is_multiple_of(2) {
                    1.0
                } else {
                    -1.0
                };
                for i in (5..len).step_by(9) {
                    x[i] = if i % 2 == 0 { 3.0 * s } else { -3.0 * s };
                }
            }
            4 => {
                x[rng.below(len)] = f32::NAN;
                x[rng.below(len)] = f32::NAN;
                x[rng.below(len)] = -0.0;
            }
            5 => x[rng.below(len)] = f32::INFINITY,
            6 => {
                x[rng.below(len)] = f32::NEG_INFINITY;
                x[rng.below(len)] = f32::NAN;
            }
            7 => x.iter_mut().for_each(|v| *v = 0.0),
            8 => x.iter_mut().for_each(|v| *v = f32::NAN),
            // Tiny: 1/d or -127/max overflows to infinity.
            9 => {
                let t = f32::from_bits(1 + rng.below(64) as u32);
                x.iter_mut().for_each(|v| *v *= t);
                x[rng.below(len)] = t;
                x[rng.below(len)] = 0.0;
            }
            10 => x.iter_mut().for_each(|v| *v *= 3e38),
            _ => {
                x.iter_mut().for_each(|v| *v = -0.0);
                x[rng.below(len)] = f32::MIN_POSITIVE;
            }
        }
        x
    }

    fn check_quantizer<A: QuantBlock>(
        f: super::super::QuantizeFn<A>,
        block_sum: impl Fn(&A) -> i32,
    ) {
        let mut rng = Rng(1234);
        let cases = if cfg!(miri) { 24 } else { 600 };
        for case in 0..cases {
            let nb = 1 + case % 3;
            let x = nasty(&mut rng, nb * A::LEN, case);
            let mut want = vec![A::zeroed(); nb];
            tessera_core::quant::quantize(&x, &mut want).unwrap();
            let mut got = vec![A::zeroed(); nb];
            let mut sums = vec![i32::MIN; nb];
            // SAFETY: the ISA is available (checked by the caller); nb blocks each.
            unsafe { f(x.as_ptr(), nb, got.as_mut_ptr(), sums.as_mut_ptr()) };
            let (gb, wb): (&[u8], &[u8]) =
                (bytemuck::cast_slice(&got), bytemuck::cast_slice(&want));
            assert_eq!(gb, wb, "{:?} case {case}: x = {x:?}", A::FORMAT);
            for (s, w) in sums.iter().zip(&want) {
                assert_eq!(*s, block_sum(w), "{:?} case {case}", A::FORMAT);
            }
        }
    }

    #[test]
    fn quantize_q8_0_matches_the_reference_bytes() {
        if skip("quantize_q8_0_matches_the_reference_bytes") {
            return;
        }
        check_quantizer::<BlockQ8_0>(TABLE.quantize_q8_0, |b| {
            b.qs.iter().map(|&q| q as i32).sum()
        });
    }

    #[test]
    fn quantize_q8_k_matches_the_reference_bytes() {
        if skip("quantize_q8_k_matches_the_reference_bytes") {
            return;
        }
        check_quantizer::<BlockQ8_K>(TABLE.quantize_q8_k, |b| {
            b.qs.iter().map(|&q| q as i32).sum()
        });
    }

    /// The exact value (f64, from exact integer block sums) and magnitude of one output.
    trait Exact: WeightBlock + Copy {
        fn random(rng: &mut Rng) -> Self;
        /// (value, Σ|terms|, number of terms).
        fn exact(w: &[Self], a: &[Self::Act]) -> (f64, f64, usize);
    }

    fn scale(rng: &mut Rng) -> f16 {
        f16::from_f32((rng.unit() * 0.05).abs() + 1e-3)
    }

    impl Exact for BlockQ8_0 {
        fn random(rng: &mut Rng) -> Self {
            let mut b = Self::zeroed();
            b.d = scale(rng);
            b.qs.iter_mut().for_each(|q| *q = rng.byte() as i8);
            // Every extreme code somewhere.
            b.qs[rng.below(QK)] = i8::MIN;
            b.qs[rng.below(QK)] = i8::MAX;
            b
        }
        fn exact(w: &[Self], a: &[BlockQ8_0]) -> (f64, f64, usize) {
            let (mut v, mut m) = (0f64, 0f64);
            for (wb, ab) in w.iter().zip(a) {
                let t = wb.d.to_f64() * ab.d.to_f64() * scalar::isum_q8_0(wb, ab) as f64;
                v += t;
                m += t.abs();
            }
            (v, m, w.len())
        }
    }

    impl Exact for BlockQ4_0 {
        fn random(rng: &mut Rng) -> Self {
            let mut b = Self::zeroed();
            b.d = scale(rng);
            b.qs.iter_mut().for_each(|q| *q = rng.byte());
            b.qs[rng.below(QK / 2)] = 0xff;
            b.qs[rng.below(QK / 2)] = 0x00;
            b
        }
        fn exact(w: &[Self], a: &[BlockQ8_0]) -> (f64, f64, usize) {
            let (mut v, mut m) = (0f64, 0f64);
            for (wb, ab) in w.iter().zip(a) {
                let s: i32 = ab.qs.iter().map(|&q| q as i32).sum();
                let t = wb.d.to_f64() * ab.d.to_f64() * scalar::isum_q4_0(wb, ab, s) as f64;
                v += t;
                m += t.abs();
            }
            (v, m, w.len())
        }
    }

    impl Exact for BlockQ4_K {
        fn random(rng: &mut Rng) -> Self {
            let mut b = Self::zeroed();
            b.d = scale(rng);
            b.dmin = scale(rng);
            b.scales.iter_mut().for_each(|q| *q = rng.byte());
            b.qs.iter_mut().for_each(|q| *q = rng.byte());
            if rng.next().is_multiple_of(4) {
                b.scales = [0xff; 12];
            }
            b
        }
        fn exact(w: &[Self], a: &[BlockQ8_K]) -> (f64, f64, usize) {
            let (mut v, mut m) = (0f64, 0f64);
            for (wb, ab) in w.iter().zip(a) {
                let (scaled, mins) = scalar::isums_q4_k(wb, ab);
                let t0 = ab.d as f64 * wb.d.to_f64() * scaled as f64;
                let t1 = -(ab.d as f64 * wb.dmin.to_f64() * mins as f64);
                v += t0 + t1;
                m += t0.abs() + t1.abs();
            }
            (v, m, 2 * w.len())
        }
    }

    fn gamma(j: usize) -> f64 {
        let u = 1.0 / (1u64 << 24) as f64;
        j as f64 * u / (1.0 - j as f64 * u)
    }

    /// Runs one tile of `rows` × `tokens` over `kb` blocks, with padded leading dimensions,
    /// and checks every output against the exact value and the padding against writes.
    fn check_tile<W: Exact>(
        kernels: &Kernels<W>,
        rng: &mut Rng,
        rows: usize,
        tokens: usize,
        kb: usize,
    ) {
        let (ldw, lda, ldc) = (kb + rng.below(3), kb + rng.below(3), rows + rng.below(3));
        // Only what the tile may read: `rows` weight rows, `tokens` activation rows.
        let w: Vec<W> = (0..(rows - 1) * ldw + kb).map(|_| W::random(rng)).collect();
        let alen = (tokens - 1) * lda + kb;
        let x: Vec<f32> = (0..alen * W::Act::LEN)
            .map(|i| {
                let v = rng.unit();
                if i % 29 == 0 { v * 8.0 } else { v }
            })
            .collect();
        let mut a = vec![W::Act::zeroed(); alen];
        tessera_core::quant::quantize(&x, &mut a).unwrap();
        let sums: Vec<i32> = bytemuck::cast_slice::<_, u8>(&a)
            .chunks_exact(size_of::<W::Act>())
            .map(|b| {
                let (off, len) = if W::Act::LEN == QK {
                    (2, QK)
                } else {
                    (4, QK_K)
                };
                b[off..off + len].iter().map(|&q| q as i8 as i32).sum()
            })
            .collect();
        let ascale: Vec<f32> = bytemuck::cast_slice::<_, u8>(&a)
            .chunks_exact(size_of::<W::Act>())
            .map(|b| {
                if W::Act::LEN == QK {
                    f16::from_le_bytes([b[0], b[1]]).to_f32()
                } else {
                    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                }
            })
            .collect();
        let clen = (tokens - 1) * ldc + rows;
        let mut c = vec![f32::NAN; clen];
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
        // SAFETY: the ISA is available (checked by the caller); the vectors hold exactly
        // what the tile describes.
        unsafe { (kernels.tile)(&tile) };
        for tk in 0..tokens {
            for r in 0..rows {
                let (want, mag, terms) =
                    W::exact(&w[r * ldw..r * ldw + kb], &a[tk * lda..tk * lda + kb]);
                let got = c[tk * ldc + r] as f64;
                let tol = gamma(terms + 4) * mag + f32::MIN_POSITIVE as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{:?} rows {rows} tokens {tokens} kb {kb}: C[{tk},{r}] = {got}, \
                     exact {want}, tol {tol}",
                    W::FORMAT
                );
            }
            for r in rows..ldc.min(clen - tk * ldc) {
                assert!(c[tk * ldc + r].is_nan(), "padding C[{tk},{r}] written");
            }
        }
    }

    /// The quant sums and f32 scales of activation blocks (as the driver prepares them).
    fn act_meta<A: QuantBlock>(a: &[A]) -> (Vec<i32>, Vec<f32>) {
        let (off, len) = if A::LEN == QK { (2, QK) } else { (4, QK_K) };
        bytemuck::cast_slice::<_, u8>(a)
            .chunks_exact(size_of::<A>())
            .map(|b| {
                let sum: i32 = b[off..off + len].iter().map(|&q| q as i8 as i32).sum();
                let d = if A::LEN == QK {
                    f16::from_le_bytes([b[0], b[1]]).to_f32()
                } else {
                    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                };
                (sum, d)
            })
            .unzip()
    }

    /// Runs the GEMV path on `rows` weight rows of `kb` blocks (padded leading dimension,
    /// the weights exactly as long as the rows need), checks every output against the exact
    /// value, that nothing past the outputs is written, and that each row gives the same bits
    /// computed alone.
    fn check_gemv<W: Exact>(kernels: &Kernels<W>, rng: &mut Rng, rows: usize, kb: usize) {
        let g = kernels.gemv.as_ref().expect("a GEMV path");
        let ldw = kb + rng.below(3);
        let w: Vec<W> = (0..(rows - 1) * ldw + kb).map(|_| W::random(rng)).collect();
        let x: Vec<f32> = (0..kb * W::Act::LEN)
            .map(|i| {
                let v = rng.unit();
                if i % 29 == 0 { v * 8.0 } else { v }
            })
            .collect();
        let mut a = vec![W::Act::zeroed(); kb];
        tessera_core::quant::quantize(&x, &mut a).unwrap();
        let (sums, ascale) = act_meta(&a);
        let bytes = (g.prep_bytes)(kb);
        assert_eq!(bytes % 64, 0);
        let mut buf = crate::scratch::AlignedBuf::default();
        let prep = buf.get(bytes / 4).as_mut_ptr().cast::<u8>();
        // SAFETY: the ISA is available (checked by the caller); kb blocks, sums and scales;
        // prep_bytes(kb) bytes of 64-byte aligned scratch.
        unsafe { (g.prepare)(a.as_ptr(), sums.as_ptr(), ascale.as_ptr(), kb, prep) };
        let run = |w: &[W], rows: usize, c: &mut [f32]| {
            assert!(w.len() >= (rows - 1) * ldw + kb && c.len() >= rows);
            let t = Gemv {
                kb,
                w: w.as_ptr(),
                ldw,
                rows,
                prep,
                c: c.as_mut_ptr(),
            };
            // SAFETY: as above; the rows lie inside w and the outputs inside c (asserted).
            unsafe { (g.run)(&t) };
        };
        let mut c = vec![f32::NAN; rows + 3];
        run(&w, rows, &mut c);
        for r in 0..rows {
            let (want, mag, terms) = W::exact(&w[r * ldw..r * ldw + kb], &a);
            let got = c[r] as f64;
            let tol = gamma(terms + 4) * mag + f32::MIN_POSITIVE as f64;
            assert!(
                (got - want).abs() <= tol,
                "{:?} GEMV rows {rows} kb {kb}: C[{r}] = {got}, exact {want}, tol {tol}",
                W::FORMAT
            );
            let mut alone = [f32::NAN; 2];
            run(&w[r * ldw..r * ldw + kb], 1, &mut alone);
            assert_eq!(alone[0].to_bits(), c[r].to_bits(), "row {r} alone differs");
            assert!(alone[1].is_nan(), "a 1-row GEMV wrote past its output");
        }
        assert!(c[rows..].iter().all(|v| v.is_nan()), "GEMV wrote past C");
    }

    fn check_gemvs<W: Exact>(kernels: &Kernels<W>, kbs: &[usize]) {
        let mut rng = Rng(7);
        for &kb in kbs {
            for rows in [1, 2, 3, 5, 16, 17] {
                check_gemv(kernels, &mut rng, rows, kb);
            }
        }
    }

    #[test]
    fn gemv_q8_0_matches_the_exact_products() {
        if skip("gemv_q8_0_matches_the_exact_products") {
            return;
        }
        check_gemvs(&TABLE.q8_0, &[1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 48]);
    }

    #[test]
    fn gemv_q4_0_matches_the_exact_products() {
        if skip("gemv_q4_0_matches_the_exact_products") {
            return;
        }
        check_gemvs(&TABLE.q4_0, &[1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 48]);
    }

    #[test]
    fn gemv_q4_k_matches_the_exact_products() {
        if skip("gemv_q4_k_matches_the_exact_products") {
            return;
        }
        check_gemvs(&TABLE.q4_k, &[1, 2, 3, 15, 16, 17, 33]);
    }

    /// The scale windows of the GEMV pick every block's scale (the tables are consistent
    /// with the lane orders).
    #[test]
    fn gemv_scale_tables_cover_every_lane() {
        fn check<W: Gemv32>() {
            let t = &W::SCALES;
            let all = t.mask[..W::WINDOWS].iter().fold(0u32, |m, &k| {
                assert_eq!(m & k, 0, "two windows give one lane");
                m | k
            });
            assert_eq!(all, 0xffff);
            let mut lanes: Vec<usize> = W::LANES.to_vec();
            lanes.sort();
            assert_eq!(lanes, (0..G).collect::<Vec<_>>());
        }
        check::<BlockQ8_0>();
        check::<BlockQ4_0>();
    }

    fn check_tiles<W: Exact>(kernels: &Kernels<W>, kbs: &[usize]) {
        assert_eq!(kernels.mr, MR);
        let mut rng = Rng(99);
        let rows_set: &[usize] = if cfg!(miri) {
            &[1, 7, 15, 16]
        } else {
            &[1, 2, 3, 5, 8, 9, 13, 15, 16]
        };
        for &kb in kbs {
            for tokens in 1..=kernels.nr {
                for &rows in rows_set {
                    check_tile(kernels, &mut rng, rows, tokens, kb);
                }
            }
        }
    }

    #[test]
    fn tile_q8_0_matches_the_exact_products() {
        if skip("tile_q8_0_matches_the_exact_products") {
            return;
        }
        check_tiles(
            &TABLE.q8_0,
            if cfg!(miri) { &[1, 2] } else { &[1, 2, 3, 7] },
        );
    }

    #[test]
    fn tile_q4_0_matches_the_exact_products() {
        if skip("tile_q4_0_matches_the_exact_products") {
            return;
        }
        check_tiles(
            &TABLE.q4_0,
            if cfg!(miri) { &[1, 2] } else { &[1, 2, 3, 7] },
        );
    }

    #[test]
    fn tile_q4_k_matches_the_exact_products() {
        if skip("tile_q4_k_matches_the_exact_products") {
            return;
        }
        check_tiles(&TABLE.q4_k, if cfg!(miri) { &[1] } else { &[1, 2, 3] });
    }

    /// The scalar table and this one on the same tiles agree to the error bound, through the
    /// public API (threads, chunking and edge tiles of the driver).
    #[test]
    fn matmul_matches_the_scalar_variant() {
        if skip("matmul_matches_the_scalar_variant") {
            return;
        }
        use crate::quant::{QuantOptions, matmul_with};
        use crate::{Isa, Parallelism};
        use tessera_core::{MatMut, MatRef};
        fn run<W: Exact>(m: usize, n: usize, kb: usize, threads: usize) {
            let mut rng = Rng((m * 1000 + n * 10 + kb) as u64);
            let k = kb * W::LEN;
            let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let w: Vec<W> = (0..n * kb).map(|_| W::random(&mut rng)).collect();
            let mut got = vec![0f32; m * n];
            let mut want = vec![0f32; m * n];
            for (isa, c) in [(Isa::Avx512, &mut got), (Isa::Scalar, &mut want)] {
                let opts = QuantOptions {
                    isa: Some(isa),
                    parallelism: Parallelism::Threads(threads),
                };
                matmul_with(
                    &opts,
                    MatRef::dense(&x, m, k),
                    &w,
                    n,
                    MatMut::dense(c, m, n),
                )
                .unwrap();
            }
            let mut act = vec![W::Act::zeroed(); kb];
            for i in 0..m {
                tessera_core::quant::quantize(&x[i * k..(i + 1) * k], &mut act).unwrap();
                for j in 0..n {
                    let (_, mag, terms) = W::exact(&w[j * kb..(j + 1) * kb], &act);
                    let tol = 2.0 * gamma(terms + 4) * mag + f32::MIN_POSITIVE as f64;
                    let (g, s) = (got[i * n + j] as f64, want[i * n + j] as f64);
                    assert!(
                        (g - s).abs() <= tol,
                        "{:?} C[{i},{j}] {g} vs {s}",
                        W::FORMAT
                    );
                }
            }
        }
        let shapes: &[(usize, usize, usize, usize)] = if cfg!(miri) {
            &[(3, 17, 1, 1)]
        } else {
            &[
                (1, 40, 5, 1),
                (9, 33, 3, 3),
                (17, 16, 2, 2),
                (2, 1, 4, 1),
                (1, 37, 17, 3),
                (1, 100, 33, 2),
                (70, 19, 2, 2),
                (130, 33, 1, 3),
            ]
        };
        for &(m, n, kb, threads) in shapes {
            run::<BlockQ8_0>(m, n, kb, threads);
            run::<BlockQ4_0>(m, n, kb, threads);
            run::<BlockQ4_K>(m, n, kb.min(2), threads);
        }
    }
}
