//! AVX-512 VNNI variant: `vpdpbusd` on zmm registers, a register tile of 16 weight rows × 8
//! tokens, and activation quantizers that produce the reference bytes.
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
//! reused by the 8 tokens of the tile, which cost 8 `vpdpbusd` each per block.
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
//! Registers: 8 weight vectors + 8 f32 accumulators + 8 i32 block sums + the row scales, out
//! of 32 zmm. With one token (decode) the same code streams the weights once; the kernel is
//! then bound by memory bandwidth, not by the transposition.
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
//! The correction `−k·Σa` is the initial value of each token's `vpdpbusd` chain, so a
//! chain ends with the exact integer block sum, which is converted to f32 (exact below 2²⁴)
//! and accumulated as `acc += isum · (d_w·d_a)` with an FMA (`d_a` from the tile's f32
//! activation scales).
//!
//! Q4_K: per super-block, the 16 rows' headers (`d`, `dmin`, 12 scale bytes) are transposed
//! the same way, so GGML's 6-bit unpacking runs on 16 rows at once; each 32-byte group of
//! nibbles is transposed like a Q8_0 block and split into its low (sub-block `2g`) and high
//! (`2g + 1`) nibbles; a sub-block's sum is scaled by its 6-bit scale with `vpmulld`, and the
//! min term `Σ m_j·(bsums[2j] + bsums[2j+1])` is 8 `vpmaddwd` per token. Both integer sums
//! are exact for any block bytes, as in the scalar kernel.
//!
//! Edge tiles: rows past `rows` repeat the last row (read inside the tile, results
//! discarded; the store writes `rows` values), tokens are a const parameter (1..=8), so a
//! tile never reads or writes outside what [`Tile`] describes.
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
//! Every intrinsic used here is also implemented by Miri (which is why the f16 scales are
//! widened 8 at a time and the quantizers avoid 512-bit rounding and `vmaxps zmm`: Miri has
//! no shim for those), so the tests below also run, against the scalar reference, under
//! `cargo +nightly miri test -p tessera-cpu --lib quant::avx512` on any x86-64 host — with
//! the AVX-512 target features enabled for `tessera-cpu` only (e.g. nightly Cargo's
//! `profile-rustflags` in a scratch copy of the workspace: with them on every crate, `half`
//! converts f32 → f16 with `vcvtps2ph`, which Miri lacks) and
//! `MIRIFLAGS=-Zmiri-disable-isolation` (the driver reads the cache sizes from sysfs).

use super::{BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, Kernels, QK, QK_K, Table, Tile};
use bytemuck::Zeroable;
use std::arch::x86_64::*;
use std::mem::size_of;
use tessera_core::f16;
use tessera_core::quant::WeightBlock;

/// Weight rows per tile: one per 32-bit lane of a zmm.
const MR: usize = 16;
/// Tokens per tile.
const NR: usize = 8;

pub(super) static TABLE: Table = Table {
    q8_0: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q8_0,
    },
    q4_0: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q4_0,
    },
    q4_k: Kernels {
        mr: MR,
        nr: NR,
        tile: tile_q4_k,
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
/// `c + t·ldc .. + rows` is writable for `t < NT`, and `rows <= 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn store_tile<const NT: usize>(acc: &[__m512; NT], c: *mut f32, ldc: usize, rows: usize) {
    for (tk, &v) in acc.iter().enumerate() {
        // SAFETY: row tk < NT of C, rows values (contract).
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

/// Calls `$f::<NT>($t)` with the tile's token count as the const `NT` (1..=8).
macro_rules! by_tokens {
    ($f:ident, $t:expr) => {{
        debug_assert!(
            (1..=NR).contains(&$t.tokens) && (1..=MR).contains(&$t.rows),
            "tile of {} rows x {} tokens",
            $t.rows,
            $t.tokens
        );
        match $t.tokens {
            1 => $f::<1>($t),
            2 => $f::<2>($t),
            3 => $f::<3>($t),
            4 => $f::<4>($t),
            5 => $f::<5>($t),
            6 => $f::<6>($t),
            7 => $f::<7>($t),
            _ => $f::<8>($t),
        }
    }};
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

/// A Q8_0 / Q4_0 tile with `NT` tokens.
///
/// # Safety
/// See [`super::TileFn`], with `tokens == NT`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_32<W: Block32, const NT: usize>(t: &Tile<W>) {
    let wsize = size_of::<W>();
    let roff = row_offsets(t.rows, t.ldw * wsize);
    let w0 = t.w.cast::<u8>();
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..t.kb {
        // SAFETY: block b < kb of rows min(r, rows - 1) < rows: inside the tile's weights.
        let (wq, dw) = unsafe { W::unpack(w0.add(b * wsize), &roff) };
        for (tk, acc_t) in acc.iter_mut().enumerate() {
            let at = tk * t.lda + b;
            // SAFETY: token tk < tokens: its block b, sum b and scale b are inside the tile;
            // the quants are bytes 2..34 of the block.
            let (qs, sum, da) = unsafe {
                (
                    t.a.add(at).cast::<u8>().add(2),
                    *t.sums.add(at),
                    *t.ascale.add(at),
                )
            };
            // Chain: −OFFSET·Σa + Σ (w + OFFSET)·a = Σ w·a, exactly.
            let mut isum = _mm512_set1_epi32(sum.wrapping_mul(-W::OFFSET));
            for (c, &wc) in wq.iter().enumerate() {
                // SAFETY: bytes 4c..4c+4 of the 32 quants.
                isum = _mm512_dpbusd_epi32(isum, wc, unsafe { bcast4(qs.add(4 * c)) });
            }
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(da));
            *acc_t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc_t);
        }
    }
    // SAFETY: C rows 0..NT, columns 0..rows of the tile (contract).
    unsafe { store_tile(&acc, t.c, t.ldc, t.rows) }
}

/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q8_0(t: &Tile<BlockQ8_0>) {
    // SAFETY: forwarded contract; NT is the tile's token count (1..=NR).
    unsafe { by_tokens!(tile_q8_0_n, t) }
}

/// # Safety
/// See [`super::TileFn`], with `tokens == NT`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q8_0_n<const NT: usize>(t: &Tile<BlockQ8_0>) {
    // SAFETY: forwarded contract.
    unsafe { tile_32::<BlockQ8_0, NT>(t) }
}

/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q4_0(t: &Tile<BlockQ4_0>) {
    // SAFETY: forwarded contract; NT is the tile's token count (1..=NR).
    unsafe { by_tokens!(tile_q4_0_n, t) }
}

/// # Safety
/// See [`super::TileFn`], with `tokens == NT`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q4_0_n<const NT: usize>(t: &Tile<BlockQ4_0>) {
    // SAFETY: forwarded contract.
    unsafe { tile_32::<BlockQ4_0, NT>(t) }
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

/// A Q4_K tile with `NT` tokens.
///
/// # Safety
/// See [`super::TileFn`], with `tokens == NT`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q4_k_n<const NT: usize>(t: &Tile<BlockQ4_K>) {
    let wsize = size_of::<BlockQ4_K>();
    let roff = row_offsets(t.rows, t.ldw * wsize);
    let w0 = t.w.cast::<u8>();
    let m4 = nibble_mask();
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..t.kb {
        // SAFETY: block b < kb of the first row, inside the tile's weights.
        let base = unsafe { w0.add(b * wsize) };
        // Header of each row: [d | dmin], then the 12 scale bytes as 3 dwords.
        // SAFETY: block b of rows min(r, rows - 1) < rows: bytes 0..16 of the block.
        let [hd, u0, u1, u2] = unsafe { load_rows_16(base, &roff, 0) };
        let dw = cvtph16(_mm512_cvtepi32_epi16(hd));
        let dmin = cvtph16(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(hd)));
        let [sc_lo, sc_hi, m_lo, m_hi] = unpack_scales_k4([u0, u1, u2]);

        let mut scaled = [_mm512_setzero_si512(); NT];
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
            for (tk, sc_t) in scaled.iter_mut().enumerate() {
                // SAFETY: token tk < tokens, block b: its quants 64g .. 64g + 64.
                let aq = unsafe { t.a.add(tk * t.lda + b).cast::<u8>().add(Q8K_QS + 64 * g) };
                let mut dl = _mm512_setzero_si512();
                let mut dh = _mm512_setzero_si512();
                for c in 0..8 {
                    // SAFETY: bytes 4c.. and 32 + 4c.. of those 64 quants.
                    unsafe {
                        dl = _mm512_dpbusd_epi32(dl, lo[c], bcast4(aq.add(4 * c)));
                        dh = _mm512_dpbusd_epi32(dh, hi[c], bcast4(aq.add(32 + 4 * c)));
                    }
                }
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
        for (tk, acc_t) in acc.iter_mut().enumerate() {
            let at = tk * t.lda + b;
            // SAFETY: token tk < tokens: its block b (whose bsums are bytes 260..292) and
            // scale b are inside the tile.
            let (bs, da) = unsafe { (t.a.add(at).cast::<u8>().add(Q8K_BSUMS), *t.ascale.add(at)) };
            let mut mins = _mm512_setzero_si512();
            for (j, &m) in mj.iter().enumerate() {
                // SAFETY: bsums 2j and 2j + 1 (bytes 4j .. 4j + 4 of the 32).
                let pair = unsafe { bcast4(bs.add(4 * j)) };
                mins = _mm512_add_epi32(mins, _mm512_madd_epi16(m, pair));
            }
            let dav = _mm512_set1_ps(da);
            *acc_t = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(scaled[tk]),
                _mm512_mul_ps(dw, dav),
                *acc_t,
            );
            *acc_t = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins), _mm512_mul_ps(dmin, dav), *acc_t);
        }
    }
    // SAFETY: C rows 0..NT, columns 0..rows of the tile (contract).
    unsafe { store_tile(&acc, t.c, t.ldc, t.rows) }
}

/// # Safety
/// See [`super::TileFn`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q4_k(t: &Tile<BlockQ4_K>) {
    // SAFETY: forwarded contract; NT is the tile's token count (1..=NR).
    unsafe { by_tokens!(tile_q4_k_n, t) }
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

    fn check_tiles<W: Exact>(kernels: &Kernels<W>, kbs: &[usize]) {
        assert_eq!((kernels.mr, kernels.nr), (MR, NR));
        let mut rng = Rng(99);
        let rows_set: &[usize] = if cfg!(miri) {
            &[1, 7, 15, 16]
        } else {
            &[1, 2, 3, 5, 8, 9, 13, 15, 16]
        };
        for &kb in kbs {
            for tokens in 1..=NR {
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
            &[(1, 40, 5, 1), (9, 33, 3, 3), (17, 16, 2, 2), (2, 1, 4, 1)]
        };
        for &(m, n, kb, threads) in shapes {
            run::<BlockQ8_0>(m, n, kb, threads);
            run::<BlockQ4_0>(m, n, kb, threads);
            run::<BlockQ4_K>(m, n, kb.min(2), threads);
        }
    }
}
