//! Reference quantized dot products and matmul: exact integer sums per block, scales and
//! the sum over blocks in f64.

use crate::quant::{BlockQ4_0, BlockQ4_K, BlockQ8_0, QK, QK_K, WeightBlock, quantize};
use crate::shape::{check_len, check_matrix, checked_mul};
use crate::{Error, MatMut, MatRef, Result};

/// A weight format with a reference dot product against its activation format.
pub trait DotReference: WeightBlock {
    /// The contributions of one weight block and one activation block to their dot product,
    /// each an exact integer sum times its scales in f64: their sum is the block's dot
    /// product. (Q8_0 and Q4_0 have one term; Q4_K has its scale term and its min term.)
    ///
    /// Also returns the block's magnitude: the same sums taken over the absolute values of
    /// the integer products, `|scales|·Σ|wᵢ·aᵢ|` — a bound on any partial sum of the block
    /// (e.g. one SIMD lane's), against which the f32 rounding of a fast kernel is stated.
    fn dot_terms(w: &Self, a: &Self::Act) -> ([f64; 2], f64);
}

impl DotReference for BlockQ8_0 {
    fn dot_terms(w: &Self, a: &BlockQ8_0) -> ([f64; 2], f64) {
        let (mut sum, mut abs) = (0i64, 0i64);
        for i in 0..QK {
            let p = i64::from(w.qs[i]) * i64::from(a.qs[i]);
            sum += p;
            abs += p.abs();
        }
        let d = f64::from(w.d.to_f32()) * f64::from(a.d.to_f32());
        ([d * sum as f64, 0.0], d.abs() * abs as f64)
    }
}

impl DotReference for BlockQ4_0 {
    /// The magnitude counts the codes and the offset separately (`Σ|qᵢaᵢ| + 8·Σ|aᵢ|`), as a
    /// kernel may subtract the offset after summing the codes.
    fn dot_terms(w: &Self, a: &BlockQ8_0) -> ([f64; 2], f64) {
        let (mut sum, mut abs) = (0i64, 0i64);
        for j in 0..QK / 2 {
            let (lo, hi) = (i64::from(w.qs[j] & 0x0f), i64::from(w.qs[j] >> 4));
            let (a0, a1) = (i64::from(a.qs[j]), i64::from(a.qs[j + QK / 2]));
            sum += (lo - 8) * a0 + (hi - 8) * a1;
            abs += (lo * a0).abs() + (hi * a1).abs() + 8 * (a0.abs() + a1.abs());
        }
        let d = f64::from(w.d.to_f32()) * f64::from(a.d.to_f32());
        ([d * sum as f64, 0.0], d.abs() * abs as f64)
    }
}

impl DotReference for BlockQ4_K {
    /// The min term uses the activation block's `bsums` (as GGML does), which
    /// [`quantize`](crate::quant::quantize) sets to the sums of its quants.
    fn dot_terms(w: &Self, a: &crate::quant::BlockQ8_K) -> ([f64; 2], f64) {
        let (mut scaled, mut scaled_abs) = (0i64, 0i64);
        let (mut mins, mut mins_abs) = (0i64, 0i64);
        for j in 0..QK_K / 32 {
            let (sc, m) = w.scale_min(j);
            let g = j / 2;
            let (mut dot, mut dot_abs) = (0i64, 0i64);
            for i in 0..32 {
                let byte = w.qs[32 * g + i];
                let q = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let p = i64::from(q) * i64::from(a.qs[32 * j + i]);
                dot += p;
                dot_abs += p.abs();
            }
            scaled += i64::from(sc) * dot;
            scaled_abs += i64::from(sc) * dot_abs;
            let (b0, b1) = (i64::from(a.bsums[2 * j]), i64::from(a.bsums[2 * j + 1]));
            mins += i64::from(m) * (b0 + b1);
            mins_abs += i64::from(m) * (b0.abs() + b1.abs());
        }
        let (ds, dm) = (
            f64::from(a.d) * f64::from(w.d.to_f32()),
            f64::from(a.d) * f64::from(w.dmin.to_f32()),
        );
        (
            [ds * scaled as f64, -(dm * mins as f64)],
            ds.abs() * scaled_abs as f64 + dm.abs() * mins_abs as f64,
        )
    }
}

/// The dot product of a row of weight blocks with a row of activation blocks, and its
/// magnitude (the sum of the blocks' magnitudes, see [`DotReference::dot_terms`]), in f64.
///
/// A fast kernel that computes each block's integer sum exactly and combines the blocks in
/// f32 is within `γ_(blocks + c)·magnitude` of the value (`c` a small constant for the
/// rounding of the scale products).
pub fn quant_dot<W: DotReference>(w: &[W], a: &[W::Act]) -> Result<(f64, f64)> {
    check_len("activation blocks", w.len(), a.len())?;
    let (mut value, mut magnitude) = (0.0f64, 0.0f64);
    for (wb, ab) in w.iter().zip(a) {
        let (terms, mag) = W::dot_terms(wb, ab);
        value += terms[0] + terms[1];
        magnitude += mag;
    }
    Ok((value, magnitude))
}

/// Reference quantized matmul `C = A·Wᵀ`: `A` is `m x k` f32 activations, quantized row by
/// row to `W::Act` with the reference quantizer; `W` is `n` rows of `k / W::LEN` blocks
/// (row `j` at `w[j·kb .. (j+1)·kb]`, the layout of a Hugging Face Linear weight); `C` is
/// `m x n`. Every element is a [`quant_dot`], rounded to f32 once. Returns the magnitudes
/// (dense `m x n`) for the error bound.
pub fn quant_matmul<W: DotReference>(
    a: MatRef<'_, f32>,
    w: &[W],
    n: usize,
    c: MatMut<'_, f32>,
) -> Result<Vec<f64>> {
    let (m, k) = (a.rows, a.cols);
    check_matrix("A", m, k, a.ld, a.data.len())?;
    let kb = crate::quant::blocks_per_row(W::FORMAT, k)?;
    check_len(
        "weight blocks",
        checked_mul(n, kb, "n x blocks per row")?,
        w.len(),
    )?;
    if c.rows != m || c.cols != n {
        return Err(Error::ShapeMismatch {
            what: format!("C is {}x{}, A·Wᵀ is {m}x{n}", c.rows, c.cols),
        });
    }
    check_matrix("C", m, n, c.ld, c.data.len())?;
    let mut act = vec![<W::Act as bytemuck::Zeroable>::zeroed(); kb];
    let mut mags = vec![0f64; m * n];
    for i in 0..m {
        if k > 0 {
            quantize(&a.data[i * a.ld..i * a.ld + k], &mut act)?;
        }
        for j in 0..n {
            let (v, mag) = quant_dot(&w[j * kb..(j + 1) * kb], &act)?;
            c.data[i * c.ld + j] = v as f32;
            mags[i * n + j] = mag;
        }
    }
    Ok(mags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_rows_give_zeros_without_reading_a() {
        // k = 0 with a leading dimension: A's extent is 0, so its slice may be empty.
        let mut c = [f32::NAN; 6];
        let w: [BlockQ8_0; 0] = [];
        let mags = quant_matmul(
            MatRef::new(&[], 2, 0, 5),
            &w,
            3,
            MatMut::dense(&mut c, 2, 3),
        );
        assert_eq!(mags.unwrap(), vec![0.0; 6]);
        assert_eq!(c, [0.0; 6]);
    }
}
