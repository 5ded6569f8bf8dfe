//! GGML-compatible quantized block formats and their reference quantize / dequantize.
//!
//! The four block types are byte-for-byte GGML's (`#[repr(C)]`, [`bytemuck::Pod`], sizes
//! asserted at compile time), so the bytes of a GGUF tensor of that type can be cast with
//! [`bytemuck::cast_slice`] and used as they are:
//!
//! | block | weights | bytes | value of weight `i` |
//! | --- | --- | --- | --- |
//! | [`BlockQ8_0`] | 32 | 34 | `d · qs[i]` |
//! | [`BlockQ4_0`] | 32 | 18 | `d · (q_i − 8)`, `q_i` = low nibble of `qs[i]` for `i < 16`, high nibble of `qs[i − 16]` otherwise |
//! | [`BlockQ4_K`] | 256 | 144 | `d · sc_j · q_i − dmin · m_j` for sub-block `j = i / 32` (6-bit `sc_j`, `m_j` packed in `scales`) |
//! | [`BlockQ8_K`] | 256 | 292 | `d · qs[i]` (f32 `d`; `bsums` = sums of 16 consecutive `qs`) |
//!
//! Q8_0, Q4_0 and Q4_K are weight formats; Q8_0 and Q8_K are also the formats activations are
//! quantized to before a quantized dot product ([`WeightBlock::Act`]).
//!
//! The quantizers here follow GGML's reference C code (`quantize_row_*_ref`) operation by
//! operation, including its rounding helpers, so they produce the same bytes; dequantization
//! follows the format definitions above. They are scalar and are the oracle for the SIMD
//! activation quantizers of `tessera-cpu`.

use crate::{Error, Result, f16};
use bytemuck::{Pod, Zeroable};

/// Weights per Q8_0 / Q4_0 block.
pub const QK: usize = 32;
/// Weights per K-quant super-block (Q4_K, Q8_K).
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales and mins in a Q4_K block.
pub const K_SCALE_SIZE: usize = 12;

/// Q8_0: 32 signed 8-bit quants with one f16 scale.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quants; weight `i` is `d · qs[i]`.
    pub qs: [i8; QK],
}

/// Q4_0: 32 unsigned 4-bit quants with offset 8 and one f16 scale.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Nibbles: weight `i < 16` is the low nibble of `qs[i]`, weight `i + 16` its high nibble.
    pub qs: [u8; QK / 2],
}

/// Q4_K: a 256-weight super-block of eight 32-weight sub-blocks, each with a 6-bit scale and
/// a 6-bit min, themselves scaled by the f16 `d` and `dmin`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_K {
    /// Scale of the sub-block scales.
    pub d: f16,
    /// Scale of the sub-block mins.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit mins, packed as GGML packs them (see
    /// [`BlockQ4_K::scale_min`]).
    pub scales: [u8; K_SCALE_SIZE],
    /// Nibbles, in four 32-byte groups: group `g` holds sub-block `2g` in its low nibbles and
    /// sub-block `2g + 1` in its high nibbles.
    pub qs: [u8; QK_K / 2],
}

/// Q8_K: 256 signed 8-bit quants with an f32 scale and the sums of each 16 quants (the
/// activation format paired with the K-quants).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_K {
    /// Scale.
    pub d: f32,
    /// Quants; value `i` is `d · qs[i]`.
    pub qs: [i8; QK_K],
    /// `bsums[j]` = sum of `qs[16j .. 16j + 16]`.
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ8_K>() == 292);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ4_0>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ4_K>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ8_K>() == 4);

/// The quantized formats, as a value (for names, sizes and error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// [`BlockQ8_0`].
    Q8_0,
    /// [`BlockQ4_0`].
    Q4_0,
    /// [`BlockQ4_K`].
    Q4K,
    /// [`BlockQ8_K`].
    Q8K,
}

impl QuantFormat {
    /// GGML's name of the format (`"q8_0"`, `"q4_0"`, `"q4_K"`, `"q8_K"`).
    pub const fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4K => "q4_K",
            QuantFormat::Q8K => "q8_K",
        }
    }

    /// Values per block.
    pub const fn block_len(self) -> usize {
        match self {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 => QK,
            QuantFormat::Q4K | QuantFormat::Q8K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            QuantFormat::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
            QuantFormat::Q4K => std::mem::size_of::<BlockQ4_K>(),
            QuantFormat::Q8K => std::mem::size_of::<BlockQ8_K>(),
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A quantized block type: its format, quantizer and dequantizer (reference code).
pub trait QuantBlock: Pod + Send + Sync + std::fmt::Debug + PartialEq + 'static {
    /// The format.
    const FORMAT: QuantFormat;
    /// Values per block.
    const LEN: usize = Self::FORMAT.block_len();

    /// Quantizes `x` (exactly [`Self::LEN`] values) as GGML's reference quantizer does.
    ///
    /// # Panics
    /// If `x.len() != Self::LEN` (internal helper; the public functions check lengths first).
    fn quantize_block(x: &[f32]) -> Self;

    /// Writes the [`Self::LEN`] values of the block to `out`.
    ///
    /// # Panics
    /// If `out.len() != Self::LEN` (internal helper; the public functions check lengths first).
    fn dequantize_block(&self, out: &mut [f32]);
}

/// A weight format usable in a quantized dot product, with the activation format it pairs
/// with (GGML's `vec_dot_type`).
pub trait WeightBlock: QuantBlock {
    /// The block type activations are quantized to for this weight format.
    type Act: QuantBlock;
}

impl WeightBlock for BlockQ8_0 {
    type Act = BlockQ8_0;
}
impl WeightBlock for BlockQ4_0 {
    type Act = BlockQ8_0;
}
impl WeightBlock for BlockQ4_K {
    type Act = BlockQ8_K;
}

/// Number of blocks of `format` in a row of `k` values: `k / block_len`, or an error when `k`
/// is not a multiple of the block length.
pub fn blocks_per_row(format: QuantFormat, k: usize) -> Result<usize> {
    let len = format.block_len();
    if !k.is_multiple_of(len) {
        return Err(Error::InvalidArgument(format!(
            "{format}: row length {k} is not a multiple of the block length {len}"
        )));
    }
    Ok(k / len)
}

/// Quantizes `x` into `out` block by block with GGML's reference quantizer for `B`.
///
/// Errors when `x.len()` is not a multiple of the block length or `out` does not hold exactly
/// `x.len() / B::LEN` blocks.
pub fn quantize<B: QuantBlock>(x: &[f32], out: &mut [B]) -> Result<()> {
    let nb = blocks_per_row(B::FORMAT, x.len())?;
    crate::shape::check_len("quantized blocks", nb, out.len())?;
    for (xb, y) in x.chunks_exact(B::LEN).zip(out.iter_mut()) {
        *y = B::quantize_block(xb);
    }
    Ok(())
}

/// Dequantizes `blocks` into `out` (which must hold exactly `blocks.len() · B::LEN` values).
pub fn dequantize<B: QuantBlock>(blocks: &[B], out: &mut [f32]) -> Result<()> {
    let n = crate::shape::checked_mul(blocks.len(), B::LEN, "dequantized length")?;
    crate::shape::check_len("dequantized output", n, out.len())?;
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(B::LEN)) {
        b.dequantize_block(y);
    }
    Ok(())
}

/// GGML's `nearest_int`: round to nearest, ties to even, by the 1.5·2²³ trick. Exact for
/// `|x| <= 4194303`; outside that range (or for NaN) it returns some value without panicking.
#[inline]
pub fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Largest absolute value of `x` and the value that has it (the first one on ties), as
/// GGML's quantizers find them (`amax < |v|` comparisons, so NaN is skipped).
fn abs_max(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

impl QuantBlock for BlockQ8_0 {
    const FORMAT: QuantFormat = QuantFormat::Q8_0;

    fn quantize_block(x: &[f32]) -> Self {
        assert_eq!(x.len(), QK);
        let (amax, _) = abs_max(x);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        for (q, &v) in qs.iter_mut().zip(x) {
            // C's roundf (half away from zero), then the int8 conversion.
            *q = (v * id).round() as i8;
        }
        BlockQ8_0 {
            d: f16::from_f32(d),
            qs,
        }
    }

    fn dequantize_block(&self, out: &mut [f32]) {
        assert_eq!(out.len(), QK);
        let d = self.d.to_f32();
        for (y, &q) in out.iter_mut().zip(&self.qs) {
            *y = q as f32 * d;
        }
    }
}

impl QuantBlock for BlockQ4_0 {
    const FORMAT: QuantFormat = QuantFormat::Q4_0;

    fn quantize_block(x: &[f32]) -> Self {
        assert_eq!(x.len(), QK);
        let (_, max) = abs_max(x);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let code = |v: f32| -> u8 {
            // GGML: MIN(15, (int8_t)(v*id + 8.5f)); the sum lies in [0.5, 16.5] for finite
            // input, where truncation toward zero is what the C cast does.
            ((v * id + 8.5) as i8).min(15) as u8
        };
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            *q = code(x[j]) | (code(x[j + QK / 2]) << 4);
        }
        BlockQ4_0 {
            d: f16::from_f32(d),
            qs,
        }
    }

    fn dequantize_block(&self, out: &mut [f32]) {
        assert_eq!(out.len(), QK);
        let d = self.d.to_f32();
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            out[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

impl BlockQ4_K {
    /// The 6-bit scale and min of sub-block `j` (0..8), unpacked from `scales` as GGML packs
    /// them: for `j < 4` the low 6 bits of bytes `j` and `j + 4`; for `j >= 4` the nibbles of
    /// byte `j + 4` with the top two bits of bytes `j - 4` and `j` on top.
    #[inline]
    pub fn scale_min(&self, j: usize) -> (u8, u8) {
        scale_min_k4(j, &self.scales)
    }
}

/// See [`BlockQ4_K::scale_min`].
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// GGML's `make_qkx2_quants`: the scale and min (returned as `(scale, -min)`) of one
/// sub-block, searched over `nstep + 1` candidate scales for the smallest weighted squared
/// error, with the codes in `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut laux = [0u8; QK_K];
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_mad += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += weights[i] * (diff * diff);
            }
            if mad < best_mad {
                l[..n].copy_from_slice(&laux[..n]);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

impl QuantBlock for BlockQ4_K {
    const FORMAT: QuantFormat = QuantFormat::Q4K;

    fn quantize_block(x: &[f32]) -> Self {
        assert_eq!(x.len(), QK_K);
        let mut l = [0u8; QK_K];
        let mut weights = [0f32; 32];
        let mut mins = [0f32; QK_K / 32];
        let mut scales = [0f32; QK_K / 32];
        let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
        for j in 0..QK_K / 32 {
            let xs = &x[32 * j..32 * j + 32];
            let mut sum_x2 = 0.0f32;
            for &v in xs {
                sum_x2 += v * v;
            }
            let av_x = (sum_x2 / 32.0).sqrt();
            for (w, &v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
            let (s, m) =
                make_qkx2_quants(15, xs, &weights, &mut l[32 * j..32 * j + 32], -1.0, 0.1, 20);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut packed = [0u8; K_SCALE_SIZE];
        for j in 0..QK_K / 32 {
            let ls = nearest_int(inv_scale * scales[j]).min(63) as u8;
            let lm = nearest_int(inv_min * mins[j]).min(63) as u8;
            if j < 4 {
                packed[j] = ls;
                packed[j + 4] = lm;
            } else {
                packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
                packed[j - 4] |= (ls >> 4) << 6;
                packed[j] |= (lm >> 4) << 6;
            }
        }
        let d = f16::from_f32(max_scale / 63.0);
        let dmin = f16::from_f32(max_min / 63.0);
        for j in 0..QK_K / 32 {
            let (sc, m) = scale_min_k4(j, &packed);
            let dj = d.to_f32() * sc as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = dmin.to_f32() * m as f32;
            for ii in 0..32 {
                let li = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, 15);
                l[32 * j + ii] = li as u8;
            }
        }
        let mut qs = [0u8; QK_K / 2];
        for g in 0..QK_K / 64 {
            for i in 0..32 {
                qs[32 * g + i] = l[64 * g + i] | (l[64 * g + 32 + i] << 4);
            }
        }
        BlockQ4_K {
            d,
            dmin,
            scales: packed,
            qs,
        }
    }

    fn dequantize_block(&self, out: &mut [f32]) {
        assert_eq!(out.len(), QK_K);
        let d = self.d.to_f32();
        let dmin = self.dmin.to_f32();
        for g in 0..QK_K / 64 {
            let (sc0, m0) = self.scale_min(2 * g);
            let (sc1, m1) = self.scale_min(2 * g + 1);
            let (d0, n0) = (d * sc0 as f32, dmin * m0 as f32);
            let (d1, n1) = (d * sc1 as f32, dmin * m1 as f32);
            for i in 0..32 {
                let q = self.qs[32 * g + i];
                out[64 * g + i] = d0 * (q & 0x0f) as f32 - n0;
                out[64 * g + 32 + i] = d1 * (q >> 4) as f32 - n1;
            }
        }
    }
}

impl QuantBlock for BlockQ8_K {
    const FORMAT: QuantFormat = QuantFormat::Q8K;

    fn quantize_block(x: &[f32]) -> Self {
        assert_eq!(x.len(), QK_K);
        let (amax, max) = abs_max(x);
        let mut y = BlockQ8_K::zeroed();
        if amax == 0.0 {
            return y;
        }
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (j, s) in y.bsums.iter_mut().enumerate() {
            *s = y.qs[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
        }
        y.d = 1.0 / iscale;
        y
    }

    fn dequantize_block(&self, out: &mut [f32]) {
        assert_eq!(out.len(), QK_K);
        for (y, &q) in out.iter_mut().zip(&self.qs) {
            *y = q as f32 * self.d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-2.6), -3);
        assert_eq!(nearest_int(4194303.0), 4194303);
        assert_eq!(nearest_int(-4194303.0), -4194303);
        // Out of range and NaN: some value, no panic.
        let _ = nearest_int(f32::NAN);
        let _ = nearest_int(1e30);
    }

    #[test]
    fn q4_k_scale_packing_round_trips() {
        // Pack arbitrary 6-bit scales and mins as the quantizer does and unpack them.
        let mut next = lcg(7);
        for _ in 0..100 {
            let sc: Vec<u8> = (0..8).map(|_| ((next() + 1.0) * 31.9) as u8).collect();
            let mn: Vec<u8> = (0..8).map(|_| ((next() + 1.0) * 31.9) as u8).collect();
            let mut p = [0u8; K_SCALE_SIZE];
            for j in 0..8 {
                let (ls, lm) = (sc[j], mn[j]);
                if j < 4 {
                    p[j] = ls;
                    p[j + 4] = lm;
                } else {
                    p[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
                    p[j - 4] |= (ls >> 4) << 6;
                    p[j] |= (lm >> 4) << 6;
                }
            }
            for j in 0..8 {
                assert_eq!(scale_min_k4(j, &p), (sc[j], mn[j]), "sub-block {j}");
            }
        }
    }

    /// Largest |x − dequantize(quantize(x))| over a block, relative to the block's max |x|.
    fn roundtrip_error<B: QuantBlock>(x: &[f32]) -> f32 {
        let mut blocks = vec![B::zeroed(); x.len() / B::LEN];
        quantize(x, &mut blocks).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize(&blocks, &mut y).unwrap();
        let mut worst = 0f32;
        for (xc, yc) in x.chunks(B::LEN).zip(y.chunks(B::LEN)) {
            let amax = xc.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in xc.iter().zip(yc) {
                worst = worst.max((a - b).abs() / amax);
            }
        }
        worst
    }

    #[test]
    fn round_trip_errors_are_within_a_quantization_step() {
        let mut next = lcg(42);
        let x: Vec<f32> = (0..QK_K * 8).map(|_| next() * 3.0).collect();
        // Half a step of the grid (plus the f16 rounding of the scale).
        assert!(roundtrip_error::<BlockQ8_0>(&x) <= 0.5 / 127.0 + 1e-3);
        assert!(roundtrip_error::<BlockQ8_K>(&x) <= 0.5 / 127.0 + 1e-5);
        // Q4_0's grid (step amax/8) reaches the extreme of one sign exactly and stops one
        // step short of the other (codes 0..15 around 8), so the error is up to one step.
        let e = roundtrip_error::<BlockQ4_0>(&x);
        assert!(e <= 1.0 / 8.0 + 1e-3 && e > 0.5 / 8.0, "{e}");
        // Q4_K: 15 steps over a sub-block's range (<= 2 amax), with 6-bit scales.
        assert!(roundtrip_error::<BlockQ4_K>(&x) <= 2.0 / 15.0);
    }

    #[test]
    fn exact_grid_values_survive() {
        // Values on the Q8_0 grid of scale 1 come back exactly.
        let x: Vec<f32> = (0..QK as i32)
            .map(|i| (i * 8 - 127).clamp(-127, 127) as f32)
            .collect();
        let mut b = [BlockQ8_0::zeroed()];
        quantize(&x, &mut b).unwrap();
        assert_eq!(b[0].d.to_f32(), 1.0);
        let mut y = vec![0f32; QK];
        dequantize(&b, &mut y).unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn q8_k_sums_and_range() {
        let mut next = lcg(3);
        let x: Vec<f32> = (0..QK_K).map(|_| next()).collect();
        let mut b = [BlockQ8_K::zeroed()];
        quantize(&x, &mut b).unwrap();
        for j in 0..16 {
            let s: i32 = b[0].qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(s, b[0].bsums[j] as i32);
        }
        assert!(b[0].qs.iter().all(|&q| q != i8::MIN));
        // All zero: zero scale, zero quants.
        quantize(&[0f32; QK_K], &mut b).unwrap();
        assert_eq!(b[0], BlockQ8_K::zeroed());
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut b = [BlockQ8_0::zeroed(); 2];
        assert!(quantize(&[0f32; 33], &mut b[..1]).is_err());
        assert!(quantize(&[0f32; 64], &mut b[..1]).is_err());
        assert!(dequantize(&b, &mut [0f32; 63]).is_err());
        assert!(blocks_per_row(QuantFormat::Q4K, 255).is_err());
        assert_eq!(blocks_per_row(QuantFormat::Q4K, 512).unwrap(), 2);
    }

    #[test]
    fn non_finite_input_does_not_panic() {
        let mut x = [1.0f32; QK_K];
        x[3] = f32::NAN;
        x[7] = f32::INFINITY;
        let mut a = [BlockQ8_0::zeroed(); 8];
        let mut b = [BlockQ4_0::zeroed(); 8];
        let mut c = [BlockQ4_K::zeroed(); 1];
        let mut d = [BlockQ8_K::zeroed(); 1];
        quantize(&x, &mut a).unwrap();
        quantize(&x, &mut b).unwrap();
        quantize(&x, &mut c).unwrap();
        quantize(&x, &mut d).unwrap();
        let mut y = [0f32; QK_K];
        dequantize(&c, &mut y).unwrap();
    }
}
