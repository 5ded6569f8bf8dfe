use crate::shape::check_gemm;
use crate::{Element, MatMut, MatRef, Result, Transpose};

/// `op(B)[p, j]` for either storage layout.
fn op_b<B: Element>(b: &MatRef<'_, B>, trans_b: Transpose, p: usize, j: usize) -> f64 {
    let x = match trans_b {
        Transpose::No => b.data[p * b.ld + j],
        Transpose::Yes => b.data[j * b.ld + p],
    };
    f64::from(x.to_f32())
}

/// Reference GEMM: `C = α·A·op(B) + β·C` with every product and sum in f64, rounded to f32
/// once at the end.
///
/// Conventions (shared with every fast GEMM, as in BLAS):
/// * `β == 0`: `C` is not read, so NaN or garbage in `C` does not reach the result;
/// * `α == 0` or `k == 0`: `A` and `B` are not read, `C = β·C`;
/// * otherwise NaN and infinities in `A`, `B` or `C` propagate as IEEE arithmetic says.
pub fn gemm<B: Element>(
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, B>,
    trans_b: Transpose,
    beta: f32,
    c: MatMut<'_, f32>,
) -> Result<()> {
    let dims = check_gemm(&a, &b, trans_b, &c.as_ref())?;
    for i in 0..dims.m {
        for j in 0..dims.n {
            let mut acc = 0.0f64;
            if alpha != 0.0 {
                for p in 0..dims.k {
                    acc += f64::from(a.data[i * a.ld + p]) * op_b(&b, trans_b, p, j);
                }
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                f64::from(beta) * f64::from(c.data[i * c.ld + j])
            };
            let ab = if alpha == 0.0 || dims.k == 0 {
                0.0
            } else {
                f64::from(alpha) * acc
            };
            c.data[i * c.ld + j] = (ab + old) as f32;
        }
    }
    Ok(())
}

/// The magnitude `|α|·Σₚ|A[i,p]·op(B)[p,j]| + |β·C[i,j]|` of every output, in f64, dense
/// `m x n`: the scale against which a floating-point error bound for GEMM is stated
/// (an f32 dot product of length k is within `γ_k·Σ|aᵢbᵢ|` of the exact value).
pub fn gemm_magnitude<B: Element>(
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, B>,
    trans_b: Transpose,
    beta: f32,
    c: MatRef<'_, f32>,
) -> Result<Vec<f64>> {
    let dims = check_gemm(&a, &b, trans_b, &c)?;
    let mut out = vec![0.0f64; dims.m * dims.n];
    for i in 0..dims.m {
        for j in 0..dims.n {
            let mut s = 0.0f64;
            if alpha != 0.0 {
                for p in 0..dims.k {
                    s += (f64::from(a.data[i * a.ld + p]) * op_b(&b, trans_b, p, j)).abs();
                }
            }
            let cpart = if beta == 0.0 {
                0.0
            } else {
                (f64::from(beta) * f64::from(c.data[i * c.ld + j])).abs()
            };
            out[i * dims.n + j] = f64::from(alpha).abs() * s + cpart;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn small_product_by_hand() {
        // A = [[1, 2], [3, 4]], B (k x n) = [[5, 6], [7, 8]] -> AB = [[19, 22], [43, 50]].
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [5.0f32, 6.0, 7.0, 8.0];
        let mut c = [1.0f32; 4];
        gemm(
            2.0,
            MatRef::dense(&a, 2, 2),
            MatRef::dense(&b, 2, 2),
            Transpose::No,
            -1.0,
            MatMut::dense(&mut c, 2, 2),
        )
        .unwrap();
        assert_eq!(c, [37.0, 43.0, 85.0, 99.0]);
        // Same with B stored transposed ([n, k]) and as f16.
        let bt = [5.0f32, 7.0, 6.0, 8.0].map(f16::from_f32);
        let mut c = [f32::NAN; 4];
        gemm(
            1.0,
            MatRef::dense(&a, 2, 2),
            MatRef::dense(&bt, 2, 2),
            Transpose::Yes,
            0.0,
            MatMut::dense(&mut c, 2, 2),
        )
        .unwrap();
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
    }

    #[test]
    fn empty_reduction_is_beta_c_even_for_infinite_alpha() {
        let mut c = [2.0f32, -1.0];
        gemm(
            f32::INFINITY,
            MatRef::<f32>::dense(&[], 2, 0),
            MatRef::<f32>::dense(&[], 0, 1),
            Transpose::No,
            -1.0,
            MatMut::dense(&mut c, 2, 1),
        )
        .unwrap();
        assert_eq!(c, [-2.0, 1.0]);
    }

    #[test]
    fn alpha_zero_does_not_read_a_or_b() {
        let a = [f32::NAN; 2];
        let b = [f32::INFINITY; 2];
        let mut c = [3.0f32];
        gemm(
            0.0,
            MatRef::dense(&a, 1, 2),
            MatRef::dense(&b, 2, 1),
            Transpose::No,
            0.5,
            MatMut::dense(&mut c, 1, 1),
        )
        .unwrap();
        assert_eq!(c, [1.5]);
    }
}
