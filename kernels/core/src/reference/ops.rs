//! Reference elementwise and row operations: layer norm, RMS norm, softmax, activations
//! (ReLU, GELU with `erf` and with `tanh`), gated activations, embedding gather, residual and
//! bias adds, L2 normalization.
//!
//! Every function validates its operands exactly as the fast kernels of `tessera_cpu::ops` do
//! (same errors, in the same order), reads `f32` (or `f16` / `bf16` for an embedding table),
//! computes in f64 and returns the exact-as-f64 result as a dense `rows x cols` vector, never
//! rounded to f32, so that a test can measure the fast kernels' error against it.
//!
//! Conventions shared with the fast kernels:
//! * a matrix with 0 rows or 0 columns is valid (nothing to compute);
//! * NaN and infinities propagate as the defining formula says in IEEE arithmetic (for
//!   example `GeluErf(−∞) = −∞·0 = NaN`), except where a function documents otherwise
//!   (softmax's all-`−∞` row).

use crate::shape::{check_dim, check_len, check_matrix};
use crate::{Element, Error, MatRef, Result};

/// An activation function, with the exact definitions of Hugging Face `transformers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)` (a NaN stays NaN).
    Relu,
    /// `0.5·x·(1 + erf(x/√2))`: the exact GELU, HF's `"gelu"` (BERT).
    GeluErf,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`: HF's `"gelu_new"` and
    /// `"gelu_pytorch_tanh"` (GPT-2, T5 v1.1).
    GeluTanh,
    /// `tanh(x)` (BERT's pooler; HF's `"tanh"`).
    Tanh,
}

impl Activation {
    /// The activation named by a Hugging Face config's `hidden_act` / `dense_act_fn`:
    /// `"relu"`, `"gelu"` ([`Activation::GeluErf`]), `"gelu_new"`, `"gelu_pytorch_tanh"` or
    /// `"gelu_fast"` ([`Activation::GeluTanh`], the same function up to rounding); `None` for
    /// any other name.
    pub fn from_hf_name(name: &str) -> Option<Activation> {
        match name {
            "relu" => Some(Activation::Relu),
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "tanh" => Some(Activation::Tanh),
            _ => None,
        }
    }

    /// The activation of one value, in f64.
    ///
    /// Evaluated in forms that keep full relative accuracy in both tails:
    /// `GeluErf(x) = 0.5·x·erfc(−x/√2)` and `GeluTanh(x) = x / (1 + exp(−2y))` with
    /// `y = √(2/π)·(x + 0.044715·x³)` (both equal to the definitions above, whose `1 + erf` and
    /// `1 + tanh` would cancel for negative `x`). Infinities give what the definitions give:
    /// `+∞` for `+∞`, and for `−∞` ReLU gives 0 and both GELUs `−∞·0 = NaN`.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Activation::Relu => {
                if x < 0.0 {
                    0.0
                } else {
                    x
                }
            }
            Activation::GeluErf => 0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2),
            Activation::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let y = k * (x + 0.044715 * x * x * x);
                x / (1.0 + (-2.0 * y).exp())
            }
            Activation::Tanh => x.tanh(),
        }
    }
}

/// `2/√π`.
const TWO_OVER_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;

/// `erf(x)` for `0 <= x < 2` by the everywhere-positive series
/// `erf(x) = (2/√π)·x·e^(−x²)·Σₙ (2x²)ⁿ / (1·3·5···(2n+1))` (Abramowitz & Stegun 7.1.6): no
/// cancellation, relative error about 1e-15.
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = 1.0f64;
    let mut sum = 1.0f64;
    let mut n = 0.0f64;
    while term > 1e-17 * sum {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    TWO_OVER_SQRT_PI * x * (-x2).exp() * sum
}

/// `erfc(x)` for `x >= 2` by the continued fraction (A&S 7.1.14)
/// `erfc(x) = e^(−x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …))))`, 60 terms evaluated
/// backwards, with `e^(−x²)` corrected for the rounding of `x²`: relative error about 5e-16
/// down to the underflow of the result (`x` ≈ 27).
fn erfc_cf(x: f64) -> f64 {
    if x == f64::INFINITY {
        return 0.0;
    }
    let mut f = x;
    for k in (1..=60).rev() {
        f = x + f64::from(k) * 0.5 / f;
    }
    let x2 = x * x;
    let lo = x.mul_add(x, -x2); // x² = x2 + lo exactly
    (-x2).exp() * (1.0 - lo) / (std::f64::consts::PI.sqrt() * f)
}

/// The error function, to about 1e-15 relative (a series below 2, `1 − erfc` from a
/// continued fraction above). `erf(±∞) = ±1`, `erf(NaN) = NaN`.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.0 {
        erf_series(a)
    } else if a.is_nan() {
        return x;
    } else {
        1.0 - erfc_cf(a)
    };
    if x < 0.0 { -r } else { r }
}

/// The complementary error function `1 − erf(x)`, with full relative accuracy for large `x`
/// (about 1e-15 relative for `x >= 2` and `x < 0`, 2e-13 on `[0, 2)` where it is `1 − erf`).
/// `erfc(+∞) = 0`, `erfc(−∞) = 2`, `erfc(NaN) = NaN`.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        x
    } else if x < 0.0 {
        1.0 + erf(-x)
    } else if x < 2.0 {
        1.0 - erf_series(x)
    } else {
        erfc_cf(x)
    }
}

/// Validates a `rows x cols` operand.
fn check_mat<T>(name: &'static str, m: &MatRef<'_, T>) -> Result<()> {
    check_matrix(name, m.rows, m.cols, m.ld, m.data.len()).map(|_| ())
}

/// Validates that `other` has the shape of `x`.
fn check_same(x: &MatRef<'_, f32>, other_name: &str, other: &MatRef<'_, f32>) -> Result<()> {
    check_dim(
        &format!("rows of {other_name} vs rows of x"),
        other.rows,
        x.rows,
    )?;
    check_dim(
        &format!("columns of {other_name} vs columns of x"),
        other.cols,
        x.cols,
    )
}

/// Row `r` of `m` as f64 (empty when `m` has no columns, whose slice may be empty).
fn row<'a, T: Element>(m: &MatRef<'a, T>, r: usize) -> impl Iterator<Item = f64> + 'a {
    let data: &'a [T] = if m.cols == 0 {
        &[]
    } else {
        &m.data[r * m.ld..][..m.cols]
    };
    data.iter().map(|v| f64::from(v.to_f32()))
}

/// Applies `f` to every row of `x` (each as f64), collecting the dense result.
fn map_rows(x: &MatRef<'_, f32>, mut f: impl FnMut(&[f64], &mut Vec<f64>)) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.rows * x.cols);
    let mut buf = Vec::with_capacity(x.cols);
    if x.cols == 0 {
        return out;
    }
    for r in 0..x.rows {
        buf.clear();
        buf.extend(row(x, r));
        f(&buf, &mut out);
    }
    out
}

/// Reference layer norm (`torch.nn.LayerNorm`): per row, with `μ` the mean and
/// `σ² = mean((x − μ)²)` the biased variance, `(x − μ)/√(σ² + eps)·weight + bias`.
///
/// # Errors
/// `x` or `out_shape` too short for its shape ([`Error::SliceTooShort`]) or with `ld < cols`
/// ([`Error::LeadingDimension`]); `weight` or `bias` not `cols` long
/// ([`Error::LengthMismatch`]). The output shape is that of `x` (a fast kernel also checks its
/// `out` against it; here there is none).
pub fn layer_norm(x: MatRef<'_, f32>, weight: &[f32], bias: &[f32], eps: f32) -> Result<Vec<f64>> {
    check_mat("x", &x)?;
    check_len("weight", x.cols, weight.len())?;
    check_len("bias", x.cols, bias.len())?;
    let n = x.cols as f64;
    Ok(map_rows(&x, |v, out| {
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / n;
        let rstd = 1.0 / (var + f64::from(eps)).sqrt();
        for (c, a) in v.iter().enumerate() {
            out.push((a - mean) * rstd * f64::from(weight[c]) + f64::from(bias[c]));
        }
    }))
}

/// Reference RMS norm (T5's `T5LayerNorm`): per row, `x / √(mean(x²) + eps)·weight` (no mean
/// subtraction, no bias).
///
/// # Errors
/// As [`layer_norm`], without `bias`.
pub fn rms_norm(x: MatRef<'_, f32>, weight: &[f32], eps: f32) -> Result<Vec<f64>> {
    check_mat("x", &x)?;
    check_len("weight", x.cols, weight.len())?;
    let n = x.cols as f64;
    Ok(map_rows(&x, |v, out| {
        let ms = v.iter().map(|a| a * a).sum::<f64>() / n;
        let r = 1.0 / (ms + f64::from(eps)).sqrt();
        for (c, a) in v.iter().enumerate() {
            out.push(a * r * f64::from(weight[c]));
        }
    }))
}

/// Reference row-wise softmax: `exp(x_j − m) / Σₖ exp(x_k − m)` with `m` the row maximum.
///
/// Special rows: a row holding a NaN, or a `+∞` (whose `x − m` is `∞ − ∞`), is all NaN; a row
/// whose entries are all `−∞` (nothing to attend to) is all zeros, never NaN; otherwise `−∞`
/// entries get exactly 0.
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`.
pub fn softmax(x: MatRef<'_, f32>) -> Result<Vec<f64>> {
    check_mat("x", &x)?;
    Ok(map_rows(&x, |v, out| {
        if v.iter().any(|a| a.is_nan()) {
            out.extend(v.iter().map(|_| f64::NAN));
            return;
        }
        let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            out.extend(v.iter().map(|_| 0.0));
            return;
        }
        let e: Vec<f64> = v.iter().map(|a| (a - m).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|a| a / s));
    }))
}

/// Reference activation of every element of `x` (see [`Activation::apply`]).
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`.
pub fn activation(act: Activation, x: MatRef<'_, f32>) -> Result<Vec<f64>> {
    check_mat("x", &x)?;
    Ok(map_rows(&x, |v, out| {
        out.extend(v.iter().map(|&a| act.apply(a)))
    }))
}

/// Reference gated activation: `act(gate) ⊙ up` (T5 v1.1's gated GELU).
///
/// # Errors
/// `gate` or `up` too short for its shape or with `ld < cols`; `up` not of `gate`'s shape
/// ([`Error::ShapeMismatch`]).
pub fn gated_activation(
    act: Activation,
    gate: MatRef<'_, f32>,
    up: MatRef<'_, f32>,
) -> Result<Vec<f64>> {
    check_mat("gate", &gate)?;
    check_mat("up", &up)?;
    check_dim("rows of up vs rows of gate", up.rows, gate.rows)?;
    check_dim("columns of up vs columns of gate", up.cols, gate.cols)?;
    let mut out = Vec::with_capacity(gate.rows * gate.cols);
    for r in 0..gate.rows {
        for (g, u) in row(&gate, r).zip(row(&up, r)) {
            out.push(act.apply(g) * u);
        }
    }
    Ok(out)
}

/// Reference embedding gather: row `i` of the result is row `ids[i]` of `table`, widened to
/// f32 (exactly) — the result is `ids.len() x table.cols`.
///
/// # Errors
/// `table` too short for its shape or with `ld < cols`; an id not below `table.rows`
/// ([`Error::InvalidArgument`] naming the first such id and its index).
pub fn embedding<T: Element>(table: MatRef<'_, T>, ids: &[u32]) -> Result<Vec<f64>> {
    check_matrix("table", table.rows, table.cols, table.ld, table.data.len())?;
    check_ids(ids, table.rows)?;
    let mut out = Vec::with_capacity(ids.len() * table.cols);
    for &id in ids {
        out.extend(row(&table, id as usize));
    }
    Ok(out)
}

/// Checks that every id is below `rows`.
fn check_ids(ids: &[u32], rows: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= rows) {
        Some(i) => Err(Error::InvalidArgument(format!(
            "ids[{i}] = {} is out of range for an embedding table of {rows} rows",
            ids[i]
        ))),
        None => Ok(()),
    }
}

/// Reference elementwise sum `x + y` (a residual connection).
///
/// # Errors
/// `x` or `y` too short for its shape or with `ld < cols`; `y` not of `x`'s shape.
pub fn add(x: MatRef<'_, f32>, y: MatRef<'_, f32>) -> Result<Vec<f64>> {
    check_mat("x", &x)?;
    check_mat("y", &y)?;
    check_same(&x, "y", &y)?;
    let mut out = Vec::with_capacity(x.rows * x.cols);
    for r in 0..x.rows {
        out.extend(row(&x, r).zip(row(&y, r)).map(|(a, b)| a + b));
    }
    Ok(out)
}

/// Reference bias add: `x[r, c] + bias[c]` for every row.
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`; `bias` not `cols` long.
pub fn add_bias(x: MatRef<'_, f32>, bias: &[f32]) -> Result<Vec<f64>> {
    check_mat("x", &x)?;
    check_len("bias", x.cols, bias.len())?;
    Ok(map_rows(&x, |v, out| {
        out.extend(v.iter().zip(bias).map(|(a, &b)| a + f64::from(b)))
    }))
}

/// The smallest norm [`l2_normalize`] divides by (`torch.nn.functional.normalize`'s default
/// `eps`).
pub const L2_NORM_MIN: f32 = 1e-12;

/// Reference L2 normalization (`torch.nn.functional.normalize(x, p=2, dim=-1)`): each row
/// divided by `max(‖row‖₂, 1e-12)`.
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`.
pub fn l2_normalize(x: MatRef<'_, f32>) -> Result<Vec<f64>> {
    check_mat("x", &x)?;
    Ok(map_rows(&x, |v, out| {
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        let d = if norm < f64::from(L2_NORM_MIN) {
            f64::from(L2_NORM_MIN)
        } else {
            norm
        };
        out.extend(v.iter().map(|a| a / d));
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of `erf` and `erfc` computed independently (Python's `math.erf` / `math.erfc`,
    /// which call the C library's, checked against mpmath at 40 digits).
    #[test]
    fn erf_matches_known_values() {
        let cases = [
            (0.5, 0.5204998778130465, 0.4795001221869535),
            (1.0, 0.8427007929497149, 0.15729920705028513),
            (2.0, 0.9953222650189527, 0.004677734981047266),
            (-1.5, -0.9661051464753108, 1.9661051464753108),
            (1e-8, 1.1283791670955126e-8, 0.9999999887162083),
            (3.0, 0.9999779095030014, 2.209049699858544e-05),
            (5.0, 0.9999999999984626, 1.537459794428035e-12),
            (10.0, 1.0, 2.088487583762545e-45),
        ];
        for (x, e, ec) in cases {
            let (got, gotc) = (erf(x), erfc(x));
            assert!(
                (got - e).abs() <= 2e-15 * e.abs(),
                "erf({x}) = {got}, want {e}"
            );
            assert!(
                (gotc - ec).abs() <= 2e-13 * ec.abs(),
                "erfc({x}) = {gotc}, want {ec}"
            );
        }
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert_eq!(erfc(f64::INFINITY), 0.0);
        assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
        assert!(erf(f64::NAN).is_nan() && erfc(f64::NAN).is_nan());
        assert_eq!(erf(0.0), 0.0);
    }

    #[test]
    fn activations_by_hand() {
        let gelu = |x: f64| Activation::GeluErf.apply(x);
        let tanh = |x: f64| Activation::GeluTanh.apply(x);
        // torch.nn.functional.gelu(torch.tensor(1.0, dtype=torch.float64)) = 0.8413447460685429
        assert!((gelu(1.0) - 0.8413447460685429).abs() < 1e-15);
        assert!((gelu(-1.0) + 0.15865525393145707).abs() < 1e-15);
        // approximate="tanh": 0.8411919906082768
        assert!((tanh(1.0) - 0.8411919906082768).abs() < 1e-15);
        assert_eq!(Activation::Relu.apply(-2.0), 0.0);
        assert_eq!(Activation::Relu.apply(3.0), 3.0);
        assert!(Activation::Relu.apply(f64::NAN).is_nan());
        for act in [Activation::GeluErf, Activation::GeluTanh] {
            assert_eq!(act.apply(f64::INFINITY), f64::INFINITY);
            assert!(act.apply(f64::NEG_INFINITY).is_nan());
            assert!(act.apply(f64::NAN).is_nan());
            assert_eq!(act.apply(0.0), 0.0);
        }
        assert_eq!(
            Activation::from_hf_name("gelu_new"),
            Some(Activation::GeluTanh)
        );
        assert_eq!(Activation::from_hf_name("gelu"), Some(Activation::GeluErf));
        assert_eq!(Activation::from_hf_name("swish"), None);
    }

    #[test]
    fn softmax_special_rows() {
        let inf = f32::INFINITY;
        let x = [0.0, f32::NEG_INFINITY, -inf, -inf, 1.0, f32::NAN, inf, 2.0];
        let r = softmax(MatRef::dense(&x, 4, 2)).unwrap();
        assert_eq!(&r[..4], &[1.0, 0.0, 0.0, 0.0]);
        assert!(r[4..].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn norms_by_hand() {
        let x = [1.0f32, 3.0];
        let ln = layer_norm(MatRef::dense(&x, 1, 2), &[1.0, 2.0], &[0.5, 0.0], 0.0).unwrap();
        assert_eq!(ln, vec![-0.5, 2.0]);
        let rms = rms_norm(MatRef::dense(&x, 1, 2), &[1.0, 1.0], 0.0).unwrap();
        let s = 5.0f64.sqrt();
        assert!((rms[0] - 1.0 / s).abs() < 1e-15 && (rms[1] - 3.0 / s).abs() < 1e-15);
        let l2 = l2_normalize(MatRef::dense(&[3.0f32, 4.0, 0.0, 0.0], 2, 2)).unwrap();
        assert_eq!(l2, vec![0.6, 0.8, 0.0, 0.0]);
    }

    #[test]
    fn empty_matrices_give_empty_results() {
        // 3 rows of 0 columns at leading dimension 5 span no element: an empty slice.
        let e = MatRef::<f32>::new(&[], 3, 0, 5);
        assert!(layer_norm(e, &[], &[], 1e-5).unwrap().is_empty());
        assert!(rms_norm(e, &[], 1e-5).unwrap().is_empty());
        assert!(softmax(e).unwrap().is_empty());
        assert!(activation(Activation::GeluErf, e).unwrap().is_empty());
        assert!(gated_activation(Activation::Relu, e, e).unwrap().is_empty());
        assert!(add(e, e).unwrap().is_empty());
        assert!(add_bias(e, &[]).unwrap().is_empty());
        assert!(l2_normalize(e).unwrap().is_empty());
        assert!(embedding(e, &[0, 2]).unwrap().is_empty());
        let none = MatRef::<f32>::new(&[], 0, 4, 4);
        assert!(softmax(none).unwrap().is_empty());
        assert!(embedding(none, &[]).unwrap().is_empty());
    }

    #[test]
    fn bad_input_is_an_error() {
        let x = [0.0f32; 6];
        assert!(layer_norm(MatRef::dense(&x, 2, 3), &[0.0; 2], &[0.0; 3], 1e-5).is_err());
        assert!(softmax(MatRef::new(&x, 2, 3, 2)).is_err());
        assert!(add(MatRef::dense(&x, 2, 3), MatRef::dense(&x, 3, 2)).is_err());
        let e = embedding(MatRef::dense(&x, 3, 2), &[0, 3]).unwrap_err();
        assert!(e.to_string().contains("ids[1] = 3"), "{e}");
    }
}
