use crate::attention::{AttentionParams, AttentionShape, Bias, HeadLayout, Heads, check_attention};
use crate::{Element, Result};

/// The reference attention's output and the quantities a tolerance is derived from.
///
/// All vectors over outputs are dense `[batch, q_len, n_heads, head_dim]`; the per-row ones
/// are `[batch, q_len, n_heads]`. With `p_j = exp(s_j − m)` the softmax weights of a row (`s_j`
/// its scores, `m` their maximum) and `σ_j = scale·Σ_c |q_c·k_jc| + |bias_j| + |s_j − m|`
/// the size of what a float computation of `s_j − m` rounds:
#[derive(Debug, Clone)]
pub struct AttentionReference {
    /// The exact result (f64 throughout), 0 for rows with no attended key.
    pub out: Vec<f64>,
    /// `Σ_j p_j·|v_jc| / Σ_j p_j`: bounds `|out|` and scales every relative error.
    pub magnitude: Vec<f64>,
    /// `Σ_j p_j·|v_jc|·σ_j / Σ_j p_j`: how absolute score errors reach the numerator.
    pub sensitivity: Vec<f64>,
    /// `Σ_j p_j·σ_j / Σ_j p_j` per row: how they reach the denominator.
    pub row_sensitivity: Vec<f64>,
    /// Keys each row attends (after the causal mask and padding).
    pub attended: Vec<usize>,
}

/// Reference attention: materializes every score in f64, applies bias and masks, takes the
/// softmax and the weighted sum of V in f64. Validates exactly as the fast kernels do (with a
/// dense `[batch, q_len, n_heads, head_dim]` output). A row with no attended key yields zeros.
pub fn attention<K: Element>(
    shape: &AttentionShape,
    q: Heads<'_, f32>,
    k: Heads<'_, K>,
    v: Heads<'_, K>,
    params: &AttentionParams<'_>,
) -> Result<AttentionReference> {
    let &AttentionShape {
        batch,
        q_len,
        kv_len,
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = shape;
    let ol = HeadLayout::bshd(q_len, n_heads, d);
    let o_len = ol.extent(batch, q_len, n_heads, d)?;
    check_attention(
        shape,
        (q.data.len(), &q.layout),
        (k.data.len(), &k.layout),
        (v.data.len(), &v.layout),
        (o_len, &ol),
        params,
    )?;
    let group = n_heads / n_kv_heads;
    let rows = batch * q_len * n_heads;
    let mut r = AttentionReference {
        out: vec![0.0; rows * d],
        magnitude: vec![0.0; rows * d],
        sensitivity: vec![0.0; rows * d],
        row_sensitivity: vec![0.0; rows],
        attended: vec![0; rows],
    };
    let scale = f64::from(params.scale);
    let mut scores: Vec<(usize, f64, f64)> = Vec::with_capacity(kv_len);
    for b in 0..batch {
        for i in 0..q_len {
            let pos = params.q_offset + i;
            for h in 0..n_heads {
                let g = h / group;
                let qrow = &q.data[q.layout.offset(b, i, h)..][..d];
                scores.clear();
                for j in 0..kv_len {
                    if (params.causal && j > pos) || !params.key_allowed(kv_len, b, j) {
                        continue;
                    }
                    let krow = &k.data[k.layout.offset(b, j, g)..][..d];
                    let mut dot = 0.0f64;
                    let mut mag = 0.0f64;
                    for c in 0..d {
                        let x = f64::from(qrow[c]) * f64::from(krow[c].to_f32());
                        dot += x;
                        mag += x.abs();
                    }
                    let bias = match params.bias {
                        Bias::None => 0.0,
                        Bias::Dense {
                            data,
                            batch_stride,
                            head_stride,
                            q_stride,
                        } => f64::from(data[b * batch_stride + h * head_stride + i * q_stride + j]),
                        Bias::Relative(rb) => {
                            let bucket = rb.bucket(j as i64 - pos as i64);
                            f64::from(rb.table[bucket * n_heads + h])
                        }
                    };
                    scores.push((j, scale * dot + bias, scale.abs() * mag + bias.abs()));
                }
                let row = (b * q_len + i) * n_heads + h;
                r.attended[row] = scores.len();
                if scores.is_empty() {
                    continue;
                }
                let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let mut den = 0.0;
                let mut den_sens = 0.0;
                let out = &mut r.out[row * d..][..d];
                let magn = &mut r.magnitude[row * d..][..d];
                let sens = &mut r.sensitivity[row * d..][..d];
                for &(j, s, mag) in &scores {
                    let p = (s - m).exp();
                    let sigma = mag + (s - m).abs();
                    den += p;
                    den_sens += p * sigma;
                    let vrow = &v.data[v.layout.offset(b, j, g)..][..d];
                    for c in 0..d {
                        let x = f64::from(vrow[c].to_f32());
                        out[c] += p * x;
                        magn[c] += p * x.abs();
                        sens[c] += p * x.abs() * sigma;
                    }
                }
                for c in 0..d {
                    out[c] /= den;
                    magn[c] /= den;
                    sens[c] /= den;
                }
                r.row_sensitivity[row] = den_sens / den;
            }
        }
    }
    Ok(r)
}
