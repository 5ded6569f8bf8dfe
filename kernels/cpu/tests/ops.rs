//! Property tests of the `ops` family: every available ISA against
//! `tessera_core::reference::ops` on random shapes (0 to 9 rows; 0, 1, primes, and sizes just
//! around every vector width and unroll: 3..5, 7..9, 15..17, 31..33, 63..65, 383, 384, 769) with
//! leading dimensions larger than the rows, plus exact invariances (thread count), special
//! values and bad input.
//!
//! Tolerances are derived from the operations each kernel performs, with `u = 2⁻²⁴` and
//! `γ_k = k·u/(1 − k·u)` (a sum of `k` terms in any order is within `γ_{k}·Σ|terms|`), never
//! tuned. Each is stated next to its test; every one is multiplied by 1.01 to cover the
//! second-order terms a first-order analysis drops.
//!
//! * add, add_bias, embedding: exact (one correctly rounded f32 operation, or none).
//! * ReLU: exact.
//! * the others: see `layer_norm_tol`, `rms_norm_tol`, `softmax_tol`, `gelu_erf_tol`,
//!   `gelu_tanh_tol`, `l2_tol`.

use half::{bf16, f16};
use proptest::prelude::*;
use tessera_core::reference::ops as reference;
use tessera_core::{Element, Error, MatMut, MatRef};
use tessera_cpu::ops::{self, Activation, ERF_ABS_ERR, EXP_REL_ERR, OpsOptions};
use tessera_cpu::{Isa, Parallelism};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(k: usize) -> f64 {
    let ku = k as f64 * U;
    ku / (1.0 - ku)
}

/// What an element between rows (`ld > cols`) holds before a call; it must hold it after.
const GAP: f32 = -12345.5;

/// Deterministic pseudo-random floats in `[-scale, scale)`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A `rows x cols` matrix stored with leading dimension `cols + gap`, exactly as long as it
/// must be (`(rows − 1)·ld + cols`), gaps filled with [`GAP`].
#[derive(Debug, Clone)]
struct Mat {
    rows: usize,
    cols: usize,
    ld: usize,
    data: Vec<f32>,
}

impl Mat {
    fn new(rows: usize, cols: usize, gap: usize, vals: &[f32]) -> Mat {
        let ld = cols + gap;
        let len = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * ld + cols
        };
        let mut data = vec![GAP; len];
        for r in 0..if cols == 0 { 0 } else { rows } {
            data[r * ld..][..cols].copy_from_slice(&vals[r * cols..][..cols]);
        }
        Mat {
            rows,
            cols,
            ld,
            data,
        }
    }

    fn view(&self) -> MatRef<'_, f32> {
        MatRef::new(&self.data, self.rows, self.cols, self.ld)
    }

    fn view_mut(&mut self) -> MatMut<'_, f32> {
        MatMut::new(&mut self.data, self.rows, self.cols, self.ld)
    }

    /// The elements, dense.
    fn dense(&self) -> Vec<f32> {
        (0..if self.cols == 0 { 0 } else { self.rows })
            .flat_map(|r| self.data[r * self.ld..][..self.cols].iter().copied())
            .collect()
    }

    /// Whether every gap element still holds [`GAP`].
    fn gaps_intact(&self) -> bool {
        self.data
            .iter()
            .enumerate()
            .all(|(i, &v)| i % self.ld.max(1) < self.cols || v.to_bits() == GAP.to_bits())
    }
}

/// Checks `got` against `want` element by element: NaN where `want` is NaN, else within
/// `tol(i)`.
fn check(
    what: &str,
    isa: Isa,
    got: &[f32],
    want: &[f64],
    tol: impl Fn(usize) -> f64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            prop_assert!(
                g.is_nan(),
                "{} {}: element {}: got {}, want NaN",
                what,
                isa,
                i,
                g
            );
            continue;
        }
        let err = (f64::from(g) - w).abs();
        let t = tol(i);
        prop_assert!(
            err <= t,
            "{} {}: element {}: got {} want {} err {:e} > tol {:e}",
            what,
            isa,
            i,
            g,
            w,
            err,
            t
        );
    }
    Ok(())
}

fn opts(isa: Isa, threads: usize) -> OpsOptions {
    OpsOptions {
        isa: Some(isa),
        parallelism: Parallelism::Threads(threads),
    }
}

/// Column counts: 0, 1, primes, and every vector width (4, 8, 16 lanes) and unroll (×2, ×4)
/// ± 1, BERT/T5 widths, and anything small.
fn cols() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0usize, 1, 2, 3, 4, 5, 7, 8, 9, 11, 13, 15, 16, 17, 31, 32, 33, 37, 63, 64, 65,
            127, 383, 384, 769,
        ]),
        2 => 0usize..48,
    ]
}

/// A shape, three gaps (extra leading dimension of x / y / out), a seed and a scale.
#[derive(Debug, Clone)]
struct Case {
    rows: usize,
    cols: usize,
    gaps: [usize; 3],
    seed: u64,
    scale: f32,
}

prop_compose! {
    fn case()(
        rows in 0usize..=9,
        cols in cols(),
        gaps in prop::array::uniform3(prop_oneof![2 => Just(0usize), 1 => 1usize..6]),
        seed in any::<u64>(),
        scale in prop::sample::select(vec![0.01f32, 1.0, 4.0, 30.0]),
    ) -> Case {
        Case { rows, cols, gaps, seed, scale }
    }
}

impl Case {
    fn n(&self) -> usize {
        self.rows * self.cols
    }
    fn x(&self) -> Mat {
        Mat::new(
            self.rows,
            self.cols,
            self.gaps[0],
            &values(self.n(), self.seed, self.scale),
        )
    }
    fn y(&self) -> Mat {
        Mat::new(
            self.rows,
            self.cols,
            self.gaps[1],
            &values(self.n(), self.seed ^ 0x9e37, self.scale),
        )
    }
    fn out(&self) -> Mat {
        Mat::new(
            self.rows,
            self.cols,
            self.gaps[2],
            &vec![f32::NAN; self.n()],
        )
    }
    fn vector(&self, salt: u64, scale: f32) -> Vec<f32> {
        values(self.cols, self.seed ^ salt, scale)
    }
}

// ---------------------------------------------------------------------------------------
// Layer norm.

/// Layer-norm rows: random, or (every other row, when `offset`) `1000 + noise` with noise in
/// `[-1, 1)`, where a one-pass `E[x²] − E[x]²` variance would lose every digit.
fn layer_norm_input(c: &Case, offset: bool) -> Mat {
    let mut v = values(c.n(), c.seed, c.scale);
    if offset {
        for r in (0..c.rows).step_by(2) {
            for x in &mut v[r * c.cols..][..c.cols] {
                *x = 1000.0 + *x / c.scale;
            }
        }
    }
    Mat::new(c.rows, c.cols, c.gaps[0], &v)
}

/// Error bound of layer norm for one row (n = cols). The kernel computes
/// `μ₀ = fl(Σx)/n`, `d = fl(x − μ₀)`, `δμ = fl(Σd)/n`, `var = fl(Σd²)/n − δμ²`,
/// `rstd = 1/√(var + eps)`, `y = fl(fl((d − δμ)·rstd)·w + b)`. With exact `μ`, `c = x − μ`,
/// `σ² = mean(c²)`, `s = √(σ² + eps)`, `M = mean|c|`:
///
/// * `|μ₀ − μ| <= A = γ_{n+1}·mean|x|` (a sum of n terms, then a division);
/// * `δμ = −(μ₀ − μ) + ε₁` with `|ε₁| <= E₁ = γ_{n+2}·(M + 2A)` (the deviations' rounding and
///   their sum, relative to `Σ|d| <= n(M + A)`): the correction cancels `μ₀`'s error;
/// * so the centered value `fl(d − δμ)` is within `Δc = 3u·|c_j| + E₁ + 2u·A` of `c_j`;
/// * `Σd² = nσ² + n(μ₀ − μ)²` exactly, so `var − σ²` is within
///   `ε_v = γ_{n+4}·(σ² + A²) + 2A·E₁ + E₁² + γ_2·(A + E₁)²`;
/// * `rstd` is within a relative `r = ε_v/(2(σ² + eps)) + 3u` of `1/s` (eps add, sqrt,
///   division);
/// * the product with `rstd`, with `w`, and the add of `b` round three times.
///
/// `|y_j − ref_j| <= 1.01·(|w_j|/s·(Δc + |c_j|·(r + 3u)) + u·|ref_j|)`.
fn layer_norm_tol(row: &[f32], w: &[f32], eps: f32, want: &[f64]) -> Vec<f64> {
    let n = row.len();
    let x: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
    let mu = x.iter().sum::<f64>() / n as f64;
    let mean_abs = x.iter().map(|v| v.abs()).sum::<f64>() / n as f64;
    let m = x.iter().map(|v| (v - mu).abs()).sum::<f64>() / n as f64;
    let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n as f64;
    let s = (var + f64::from(eps)).sqrt();
    let a = gamma(n + 1) * mean_abs;
    let e1 = gamma(n + 2) * (m + 2.0 * a);
    let ev = gamma(n + 4) * (var + a * a) + 2.0 * a * e1 + e1 * e1 + gamma(2) * (a + e1).powi(2);
    let r = ev / (2.0 * (var + f64::from(eps))) + 3.0 * U;
    (0..n)
        .map(|j| {
            let c = (x[j] - mu).abs();
            let dc = 3.0 * U * c + e1 + 2.0 * U * a;
            1.01 * (f64::from(w[j]).abs() / s * (dc + c * (r + 3.0 * U)) + U * want[j].abs())
        })
        .collect()
}

fn check_layer_norm(c: &Case, offset: bool, eps: f32) -> Result<(), TestCaseError> {
    let x = layer_norm_input(c, offset);
    let w = c.vector(1, 2.0);
    let b = c.vector(2, 1.0);
    let want = reference::layer_norm(x.view(), &w, &b, eps).unwrap();
    let xd = x.dense();
    let mut tol = Vec::with_capacity(want.len());
    for r in 0..c.rows {
        let row = &xd[r * c.cols..][..c.cols];
        tol.extend(layer_norm_tol(row, &w, eps, &want[r * c.cols..][..c.cols]));
    }
    for isa in Isa::available() {
        let mut out = c.out();
        ops::layer_norm_with(&opts(isa, 1), x.view(), &w, &b, eps, out.view_mut()).unwrap();
        prop_assert!(out.gaps_intact(), "{}: layer_norm wrote between rows", isa);
        check("layer_norm", isa, &out.dense(), &want, |i| tol[i])?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// RMS norm and L2 normalization.

/// RMS norm: `Σx²` (positive terms, fused or not) is within `γ_{n+1}` relative, the division
/// by n, the eps add, the square root and the reciprocal add `u`, `u`, `u/2 + …`: `rstd` is
/// within `½γ_{n+2} + 2u` relative; `x·rstd` and `·w` round twice.
/// `|y − ref| <= 1.01·|ref|·(½γ_{n+2} + 4u) + 2⁻¹²⁶` (the floor: subnormal products).
fn rms_norm_tol(n: usize, want: f64) -> f64 {
    1.01 * want.abs() * (0.5 * gamma(n + 2) + 4.0 * U) + f64::from(f32::MIN_POSITIVE)
}

/// L2: the norm is within `½γ_n + u` relative (sum of squares, square root), the division
/// rounds once. `|y − ref| <= 1.01·|ref|·(½γ_n + 2u) + 2⁻¹²⁶`.
fn l2_tol(n: usize, want: f64) -> f64 {
    1.01 * want.abs() * (0.5 * gamma(n) + 2.0 * U) + f64::from(f32::MIN_POSITIVE)
}

// ---------------------------------------------------------------------------------------
// Softmax.

/// Softmax inputs: random values with about a fifth of the entries `−∞` (masked), and the
/// third row (if any) entirely `−∞`.
fn softmax_input(c: &Case) -> Mat {
    let mut v = values(c.n(), c.seed, c.scale);
    let mask = values(c.n(), c.seed ^ 0x55, 1.0);
    for (x, m) in v.iter_mut().zip(&mask) {
        if *m < -0.6 {
            *x = f32::NEG_INFINITY;
        }
    }
    if c.rows > 2 {
        v[2 * c.cols..3 * c.cols].fill(f32::NEG_INFINITY);
    }
    Mat::new(c.rows, c.cols, c.gaps[0], &v)
}

/// Softmax error bound. With `m` the row maximum (an element, exactly), `d_j = x_j − m` and
/// `p_j` the exact result: `fl(x_j − m)` is within `u·|d_j|` of `d_j`, so `exp` of it is
/// within a relative `u·|d_j| + EXP_REL_ERR` of `e^{d_j}`; the sum adds `γ_n` relative and is
/// off by at most `Σ p_k(u|d_k| + EXP_REL_ERR) + γ_n` relative; the reciprocal and the product
/// round once each. Terms below `e^{−87.3}` are flushed to 0 (absolute `2⁻¹²⁶`):
/// `|y_j − p_j| <= 1.01·p_j·(u|d_j| + 2·EXP_REL_ERR + Σ_k p_k·u|d_k| + γ_n + 2u) + 2⁻¹²⁵`.
fn softmax_tol(row: &[f32], want: &[f64]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d: Vec<f64> = row
        .iter()
        .map(|&x| {
            if x == f32::NEG_INFINITY {
                0.0
            } else {
                f64::from(x) - f64::from(m)
            }
        })
        .collect();
    let spread: f64 = want.iter().zip(&d).map(|(p, d)| p * U * d.abs()).sum();
    let n = row.len();
    want.iter()
        .zip(&d)
        .map(|(&p, &dj)| {
            let rel = U * dj.abs() + 2.0 * f64::from(EXP_REL_ERR) + spread + gamma(n) + 2.0 * U;
            1.01 * p * rel + 2.0 * f64::from(f32::MIN_POSITIVE)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Activations.

/// GELU (erf): the kernel computes `h = 0.5x` (exact), `z = fl(x·fl(1/√2))` (relative error
/// at most 2u: the constant's rounding and the product's, which moves `erf` by at most
/// `(2/√π)·max(z·e^{−z²})·2u < 0.97u`), `erf(z)` to `ERF_ABS_ERR`, then `h + h·erf` (one
/// rounding, `u·|y|`, fused; unfused, one more of `h·erf`, at most `u·|h|`).
/// `|y − ref| <= 1.01·(0.5|x|·(ERF_ABS_ERR + 2u) + u·|ref|) + 2⁻¹⁴⁹`.
fn gelu_erf_tol(x: f32, want: f64) -> f64 {
    let x = f64::from(x);
    1.01 * (0.5 * x.abs() * (f64::from(ERF_ABS_ERR) + 2.0 * U) + U * want.abs()) + 1.5e-45
}

/// GELU (tanh) as `x·σ(t)`, `t = 2√(2/π)(x + 0.044715x³)`: the kernel's `−t` is within a
/// relative `5u` of the exact value (the two constants rounded to f32 and `x²`: the larger
/// term, of the same sign as the other, is off by `2u`; the fma (and the unfused product)
/// and the product with `x` round once each; `6u` is allowed), which moves `exp(−t)` by that
/// times `|t|`; `exp` adds `EXP_REL_ERR`; `σ = 1/(1 + e)` passes a relative error of `e` on
/// as `(1 − σ)` times it, and the add, the division and the product with `x` round once each:
/// `|y − ref| <= 1.01·|ref|·((1 − σ)(EXP_REL_ERR + 6u|t|) + 3u) + |x|·e⁻⁷⁹ + 2⁻¹⁴⁹`
/// (the `e⁻⁷⁹`: `σ` is taken as 0 where `t < −80`).
fn gelu_tanh_tol(x: f32, want: f64) -> f64 {
    let x = f64::from(x);
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let t = 2.0 * k * (x + 0.044715 * x * x * x);
    let sig = 1.0 / (1.0 + (-t).exp());
    let rel = (1.0 - sig) * (f64::from(EXP_REL_ERR) + 6.0 * U * t.abs()) + 3.0 * U;
    1.01 * want.abs() * rel + x.abs() * (-79.0f64).exp() + 1.5e-45
}

/// tanh: for `|x| >= 0.0625`, `e = exp(−2|x|)` is off by a relative `EXP_REL_ERR` plus the
/// rounding of its argument `−2|x|` (exact) — none — and of `exp`'s own input, at most
/// `2u·|2x|` allowed; `(1 − e)/(1 + e)` passes a relative error `δ` of `e` on as
/// `2e/(1 − e²)·δ`, and the subtraction, addition and division round once each (`3u`). Below
/// 0.0625 the polynomial's truncation is under `2⁻⁵⁰` relative and its four roundings under
/// `4u` (each term is at most `|x|³/3 < |x|/768` of the result).
fn tanh_tol(x: f32, want: f64) -> f64 {
    let x = f64::from(x).abs();
    let rel = if x < 0.0625 {
        4.0 * U
    } else {
        let e = (-2.0 * x).exp();
        2.0 * e / (1.0 - e * e) * (f64::from(EXP_REL_ERR) + 2.0 * U * 2.0 * x) + 3.0 * U
    };
    1.01 * want.abs() * rel + 1.5e-45
}

/// The tolerance of `act(x)` against the reference value `want`.
fn act_tol(act: Activation, x: f32, want: f64) -> f64 {
    match act {
        Activation::Relu => 0.0,
        Activation::GeluErf => gelu_erf_tol(x, want),
        Activation::GeluTanh => gelu_tanh_tol(x, want),
        Activation::Tanh => tanh_tol(x, want),
    }
}

fn activation_strategy() -> impl Strategy<Value = Activation> {
    prop::sample::select(vec![
        Activation::Relu,
        Activation::GeluErf,
        Activation::GeluTanh,
        Activation::Tanh,
    ])
}

// ---------------------------------------------------------------------------------------
// Property tests.

/// Exact f32 result: the f64 reference of one f32 operation, rounded once (f64 has more than
/// 2·24 + 2 bits, so rounding it to f32 is the correctly rounded f32 result).
fn exact(what: &str, isa: Isa, got: &[f32], want: &[f64]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let w = w as f32;
        prop_assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{} {}: element {}: got {} want {}",
            what,
            isa,
            i,
            g,
            w
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn layer_norm_matches_reference(
        c in case(),
        offset in any::<bool>(),
        eps in prop::sample::select(vec![1e-5f32, 1e-12, 0.0]),
    ) {
        check_layer_norm(&c, offset, eps)?;
    }

    #[test]
    fn rms_norm_matches_reference(c in case(), eps in prop::sample::select(vec![1e-6f32, 0.0])) {
        let x = c.x();
        let w = c.vector(1, 2.0);
        let want = reference::rms_norm(x.view(), &w, eps).unwrap();
        for isa in Isa::available() {
            let mut out = c.out();
            ops::rms_norm_with(&opts(isa, 1), x.view(), &w, eps, out.view_mut()).unwrap();
            prop_assert!(out.gaps_intact(), "{}: rms_norm wrote between rows", isa);
            check("rms_norm", isa, &out.dense(), &want, |i| rms_norm_tol(c.cols, want[i]))?;
        }
    }

    #[test]
    fn l2_normalize_matches_reference(c in case(), zero_row in any::<bool>()) {
        let mut x = c.x();
        if zero_row && c.rows > 0 {
            x.data[..c.cols].fill(0.0);
        }
        let want = reference::l2_normalize(x.view()).unwrap();
        for isa in Isa::available() {
            let mut y = x.clone();
            ops::l2_normalize_with(&opts(isa, 1), y.view_mut()).unwrap();
            prop_assert!(y.gaps_intact(), "{}: l2_normalize wrote between rows", isa);
            check("l2_normalize", isa, &y.dense(), &want, |i| l2_tol(c.cols, want[i]))?;
        }
    }

    #[test]
    fn softmax_matches_reference(c in case()) {
        let x = softmax_input(&c);
        let want = reference::softmax(x.view()).unwrap();
        let xd = x.dense();
        let mut tol = Vec::with_capacity(want.len());
        for r in 0..c.rows {
            tol.extend(softmax_tol(&xd[r * c.cols..][..c.cols], &want[r * c.cols..][..c.cols]));
        }
        for isa in Isa::available() {
            let mut y = x.clone();
            ops::softmax_with(&opts(isa, 1), y.view_mut()).unwrap();
            prop_assert!(y.gaps_intact(), "{}: softmax wrote between rows", isa);
            let got = y.dense();
            check("softmax", isa, &got, &want, |i| tol[i])?;
            // Masked entries are exactly 0 (and so is every entry of an all −∞ row).
            for (i, &v) in xd.iter().enumerate() {
                if v == f32::NEG_INFINITY {
                    prop_assert_eq!(got[i].to_bits(), 0.0f32.to_bits(), "{}: masked {}", isa, i);
                }
            }
        }
    }

    #[test]
    fn activation_matches_reference(c in case(), act in activation_strategy()) {
        let x = c.x();
        let xd = x.dense();
        let want = reference::activation(act, x.view()).unwrap();
        for isa in Isa::available() {
            let mut y = x.clone();
            ops::activation_with(&opts(isa, 1), act, y.view_mut()).unwrap();
            prop_assert!(y.gaps_intact(), "{}: activation wrote between rows", isa);
            check(&format!("{act:?}"), isa, &y.dense(), &want, |i| act_tol(act, xd[i], want[i]))?;
        }
    }

    /// `act(gate)·up` rounds once more than `act(gate)`:
    /// `|y − ref| <= 1.01·(|up|·tol_act(gate) + u·|ref|)`. Gate and up are column slices of
    /// one `[rows, 2·cols + gap]` matrix, as after a fused `[wi_0; wi_1]` GEMM.
    #[test]
    fn gated_activation_matches_reference(c in case(), act in activation_strategy()) {
        let (n, ld) = (c.cols, 2 * c.cols + c.gaps[0]);
        let g = values(c.n(), c.seed, c.scale);
        let u = values(c.n(), c.seed ^ 3, 2.0);
        let mut both = Vec::new();
        for r in 0..c.rows {
            both.extend_from_slice(&g[r * n..][..n]);
            both.extend_from_slice(&u[r * n..][..n]);
            both.extend(std::iter::repeat_n(GAP, c.gaps[0]));
        }
        let gate = MatRef::new(&both, c.rows, n, ld);
        let up = MatRef::new(both.get(n..).unwrap_or(&[]), c.rows, n, ld);
        let want = reference::gated_activation(act, gate, up).unwrap();
        for isa in Isa::available() {
            let mut out = c.out();
            ops::gated_activation_with(&opts(isa, 1), act, gate, up, out.view_mut()).unwrap();
            prop_assert!(out.gaps_intact(), "{}: gated activation wrote between rows", isa);
            let a: Vec<f64> = g.iter().map(|&v| act.apply(f64::from(v))).collect();
            check(&format!("gated {act:?}"), isa, &out.dense(), &want, |i| {
                1.01 * (f64::from(u[i]).abs() * act_tol(act, g[i], a[i]) + U * want[i].abs())
            })?;
        }
    }

    #[test]
    fn add_and_add_bias_are_exact(c in case()) {
        let x = c.x();
        let y = c.y();
        let bias = c.vector(5, c.scale);
        let want = reference::add(x.view(), y.view()).unwrap();
        let want_b = reference::add_bias(x.view(), &bias).unwrap();
        for isa in Isa::available() {
            let mut s = x.clone();
            ops::add_with(&opts(isa, 1), s.view_mut(), y.view()).unwrap();
            prop_assert!(s.gaps_intact(), "{}: add wrote between rows", isa);
            exact("add", isa, &s.dense(), &want)?;
            let mut s = x.clone();
            ops::add_bias_with(&opts(isa, 1), s.view_mut(), &bias).unwrap();
            prop_assert!(s.gaps_intact(), "{}: add_bias wrote between rows", isa);
            exact("add_bias", isa, &s.dense(), &want_b)?;
            // A product by a constant is one correctly rounded multiplication.
            let mut s = x.clone();
            ops::scale_with(&opts(isa, 1), s.view_mut(), -0.37).unwrap();
            prop_assert!(s.gaps_intact(), "{}: scale wrote between rows", isa);
            let want_s: Vec<f64> = x.dense().iter().map(|&v| f64::from(v * -0.37)).collect();
            exact("scale", isa, &s.dense(), &want_s)?;
        }
    }

    #[test]
    fn embedding_gathers_exactly(
        c in case(),
        table_rows in 1usize..20,
        n_ids in 0usize..12,
        dtype in 0usize..3,
    ) {
        match dtype {
            0 => check_embedding::<f32>(&c, table_rows, n_ids)?,
            1 => check_embedding::<f16>(&c, table_rows, n_ids)?,
            _ => check_embedding::<bf16>(&c, table_rows, n_ids)?,
        }
    }
}

fn check_embedding<T: Element>(
    c: &Case,
    table_rows: usize,
    n_ids: usize,
) -> Result<(), TestCaseError> {
    let ld = c.cols + c.gaps[0];
    let len = (table_rows - 1) * ld + c.cols;
    let table: Vec<T> = values(len, c.seed, c.scale)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let ids: Vec<u32> = values(n_ids, c.seed ^ 9, 1.0)
        .iter()
        .map(|v| ((v + 1.0) * 0.5 * table_rows as f32) as u32 % table_rows as u32)
        .collect();
    let tref = MatRef::new(&table, table_rows, c.cols, ld);
    let want = reference::embedding(tref, &ids).unwrap();
    for isa in Isa::available() {
        let mut out = Mat::new(n_ids, c.cols, c.gaps[2], &vec![f32::NAN; n_ids * c.cols]);
        ops::embedding_with(&opts(isa, 1), tref, &ids, out.view_mut()).unwrap();
        prop_assert!(out.gaps_intact(), "{}: embedding wrote between rows", isa);
        exact("embedding", isa, &out.dense(), &want)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Thread count, special values, bad input.

/// Every op on a 96 x 1000 input (above the parallel threshold) gives the same bits with 1, 2
/// and 3 threads.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (rows, cols) = (96, 1000);
    assert!(rows * cols >= ops::PAR_MIN_ELEMS);
    let x = values(rows * cols, 17, 6.0);
    let y = values(rows * cols, 18, 6.0);
    let w = values(cols, 19, 2.0);
    let b = values(cols, 20, 1.0);
    let table: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 37) % rows as u32).collect();
    let xm = MatRef::dense(&x, rows, cols);
    let ym = MatRef::dense(&y, rows, cols);
    for isa in Isa::available() {
        let run = |threads: usize| -> Vec<Vec<f32>> {
            let o = opts(isa, threads);
            let mut results = Vec::new();
            let mut out = vec![0.0f32; rows * cols];
            ops::layer_norm_with(&o, xm, &w, &b, 1e-5, MatMut::dense(&mut out, rows, cols))
                .unwrap();
            results.push(out.clone());
            ops::rms_norm_with(&o, xm, &w, 1e-6, MatMut::dense(&mut out, rows, cols)).unwrap();
            results.push(out.clone());
            for act in [
                Activation::Relu,
                Activation::GeluErf,
                Activation::GeluTanh,
                Activation::Tanh,
            ] {
                let mut v = x.clone();
                ops::activation_with(&o, act, MatMut::dense(&mut v, rows, cols)).unwrap();
                results.push(v);
                ops::gated_activation_with(&o, act, xm, ym, MatMut::dense(&mut out, rows, cols))
                    .unwrap();
                results.push(out.clone());
            }
            let mut v = x.clone();
            ops::softmax_with(&o, MatMut::dense(&mut v, rows, cols)).unwrap();
            results.push(v);
            let mut v = x.clone();
            ops::l2_normalize_with(&o, MatMut::dense(&mut v, rows, cols)).unwrap();
            results.push(v);
            let mut v = x.clone();
            ops::add_with(&o, MatMut::dense(&mut v, rows, cols), ym).unwrap();
            ops::add_bias_with(&o, MatMut::dense(&mut v, rows, cols), &b).unwrap();
            results.push(v);
            ops::embedding_with(
                &o,
                MatRef::dense(&table, rows, cols),
                &ids,
                MatMut::dense(&mut out, rows, cols),
            )
            .unwrap();
            results.push(out.clone());
            results
        };
        let one = run(1);
        for threads in [2, 3] {
            let many = run(threads);
            for (k, (a, b)) in one.iter().zip(&many).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{isa}: result {k} differs between 1 and {threads} threads"
                );
            }
        }
    }
}

#[test]
fn softmax_special_rows() {
    let inf = f32::INFINITY;
    let ninf = f32::NEG_INFINITY;
    // Rows of 19 (vector body + tail on every ISA): masked entries, all masked, a NaN, a +∞.
    let cols = 19;
    let mut x = values(4 * cols, 3, 5.0);
    for c in (0..cols).step_by(3) {
        x[c] = ninf;
    }
    x[cols..2 * cols].fill(ninf);
    x[2 * cols + 17] = f32::NAN;
    x[3 * cols + 4] = inf;
    for isa in Isa::available() {
        let mut y = x.clone();
        ops::softmax_with(&opts(isa, 1), MatMut::dense(&mut y, 4, cols)).unwrap();
        let row0 = &y[..cols];
        assert!(
            row0.iter().all(|v| v.is_finite() && *v >= 0.0),
            "{isa}: {row0:?}"
        );
        assert!((row0.iter().map(|&v| f64::from(v)).sum::<f64>() - 1.0).abs() < 1e-5);
        for c in (0..cols).step_by(3) {
            assert_eq!(row0[c], 0.0, "{isa}: masked entry {c}");
        }
        assert!(
            y[cols..2 * cols].iter().all(|&v| v == 0.0),
            "{isa}: all −∞ row"
        );
        assert!(
            y[2 * cols..].iter().all(|v| v.is_nan()),
            "{isa}: NaN / +∞ rows"
        );
    }
}

#[test]
fn nan_and_infinity_propagate() {
    let cols = 21;
    let mut x = values(2 * cols, 4, 3.0);
    x[5] = f32::NAN;
    x[cols + 20] = f32::NAN;
    let w = vec![1.0f32; cols];
    let b = vec![0.5f32; cols];
    for isa in Isa::available() {
        let o = opts(isa, 1);
        let xm = MatRef::dense(&x, 2, cols);
        let mut out = vec![0.0f32; 2 * cols];
        // A NaN anywhere in a row poisons the whole row of the norms.
        ops::layer_norm_with(&o, xm, &w, &b, 1e-5, MatMut::dense(&mut out, 2, cols)).unwrap();
        assert!(out.iter().all(|v| v.is_nan()), "{isa}: layer_norm");
        ops::rms_norm_with(&o, xm, &w, 1e-5, MatMut::dense(&mut out, 2, cols)).unwrap();
        assert!(out.iter().all(|v| v.is_nan()), "{isa}: rms_norm");
        let mut v = x.clone();
        ops::l2_normalize_with(&o, MatMut::dense(&mut v, 2, cols)).unwrap();
        assert!(v.iter().all(|v| v.is_nan()), "{isa}: l2_normalize");
        // Elementwise ops: exactly the NaN elements.
        for act in [
            Activation::Relu,
            Activation::GeluErf,
            Activation::GeluTanh,
            Activation::Tanh,
        ] {
            let mut v = x.clone();
            ops::activation_with(&o, act, MatMut::dense(&mut v, 2, cols)).unwrap();
            for (i, (a, b)) in v.iter().zip(&x).enumerate() {
                assert_eq!(a.is_nan(), b.is_nan(), "{isa} {act:?}: element {i}");
            }
        }
        let mut v = vec![1.0f32; 2 * cols];
        ops::add_with(&o, MatMut::dense(&mut v, 2, cols), xm).unwrap();
        assert!(
            v.iter().zip(&x).all(|(a, b)| a.is_nan() == b.is_nan()),
            "{isa}: add"
        );
        // Infinities: what the formulas give.
        let special = [f32::INFINITY, f32::NEG_INFINITY, -30.0, 30.0, 0.0, -0.0];
        let want: [[f32; 6]; 4] = [
            [f32::INFINITY, 0.0, 0.0, 30.0, 0.0, 0.0],
            [f32::INFINITY, f32::NAN, 0.0, 30.0, 0.0, 0.0],
            [f32::INFINITY, f32::NAN, 0.0, 30.0, 0.0, 0.0],
            [1.0, -1.0, -1.0, 1.0, 0.0, 0.0],
        ];
        for (act, want) in [
            Activation::Relu,
            Activation::GeluErf,
            Activation::GeluTanh,
            Activation::Tanh,
        ]
        .into_iter()
        .zip(want)
        {
            let mut v = special;
            ops::activation_with(&o, act, MatMut::dense(&mut v, 1, 6)).unwrap();
            for (g, w) in v.iter().zip(want) {
                assert!(
                    g == &w || (g.is_nan() && w.is_nan()),
                    "{isa} {act:?}: {v:?}"
                );
            }
        }
    }
}

#[test]
fn layer_norm_of_constant_and_offset_rows() {
    // A constant row normalizes to the bias; a row 1000 + {−1, +1} to ∓1·weight + bias.
    let cols = 37;
    let mut x = vec![1000.25f32; 2 * cols];
    for c in 0..cols {
        x[cols + c] = if c % 2 == 0 { 999.0 } else { 1001.0 };
    }
    x[cols + cols - 1] = 1000.0; // odd count: make the mean exactly 1000
    let w = vec![2.0f32; cols];
    let b = vec![0.5f32; cols];
    let want = reference::layer_norm(MatRef::dense(&x, 2, cols), &w, &b, 0.0).unwrap();
    for isa in Isa::available() {
        let mut out = vec![0.0f32; 2 * cols];
        ops::layer_norm_with(
            &opts(isa, 1),
            MatRef::dense(&x, 2, cols),
            &w,
            &b,
            1e-5,
            MatMut::dense(&mut out, 2, cols),
        )
        .unwrap();
        assert!(
            out[..cols].iter().all(|&v| v == 0.5),
            "{isa}: {:?}",
            &out[..cols]
        );
        for (g, w) in out[cols..].iter().zip(&want[cols..]) {
            // eps = 1e-5 against the reference's 0: |Δ| <= 2·(1 − 1/√(1 + 1e-5/σ²)) ≈ 1e-5.
            assert!((f64::from(*g) - w).abs() < 2e-5, "{isa}: {g} vs {w}");
        }
    }
}

#[test]
fn empty_matrices_are_fine() {
    for isa in Isa::available() {
        let o = opts(isa, 4);
        for (rows, cols) in [(0usize, 5usize), (3, 0), (0, 0)] {
            let x: Vec<f32> = vec![];
            let w = vec![0.0f32; cols];
            let xm = MatRef::dense(&x, rows, cols);
            let mut out: Vec<f32> = vec![];
            ops::layer_norm_with(&o, xm, &w, &w, 1e-5, MatMut::dense(&mut out, rows, cols))
                .unwrap();
            ops::rms_norm_with(&o, xm, &w, 1e-5, MatMut::dense(&mut out, rows, cols)).unwrap();
            ops::softmax_with(&o, MatMut::dense(&mut out, rows, cols)).unwrap();
            ops::activation_with(&o, Activation::GeluErf, MatMut::dense(&mut out, rows, cols))
                .unwrap();
            ops::gated_activation_with(
                &o,
                Activation::GeluTanh,
                xm,
                xm,
                MatMut::dense(&mut out, rows, cols),
            )
            .unwrap();
            ops::add_with(&o, MatMut::dense(&mut out, rows, cols), xm).unwrap();
            ops::add_bias_with(&o, MatMut::dense(&mut out, rows, cols), &w).unwrap();
            ops::l2_normalize_with(&o, MatMut::dense(&mut out, rows, cols)).unwrap();
        }
        // Rows of no columns at a leading dimension: an empty slice suffices.
        let e = MatRef::<f32>::new(&[], 3, 0, 5);
        let mut none: Vec<f32> = vec![];
        ops::layer_norm_with(&o, e, &[], &[], 1e-5, MatMut::new(&mut none, 3, 0, 2)).unwrap();
        ops::gated_activation_with(&o, Activation::Relu, e, e, MatMut::new(&mut none, 3, 0, 7))
            .unwrap();
        ops::softmax_with(&o, MatMut::new(&mut none, 3, 0, 5)).unwrap();
        ops::add_with(&o, MatMut::new(&mut none, 3, 0, 1), e).unwrap();
        ops::embedding_with(&o, e, &[2, 0], MatMut::new(&mut none, 2, 0, 3)).unwrap();
        let t: Vec<f32> = vec![0.0; 6];
        let mut out: Vec<f32> = vec![];
        ops::embedding_with(
            &o,
            MatRef::dense(&t, 2, 3),
            &[],
            MatMut::dense(&mut out, 0, 3),
        )
        .unwrap();
    }
}

#[test]
fn bad_input_is_an_error() {
    let x = vec![1.0f32; 12];
    let mut buf = vec![0.0f32; 12];
    let w3 = [1.0f32; 3];
    let short = MatRef::new(&x[..11], 3, 4, 4);
    let good = MatRef::dense(&x, 3, 4);
    let w4 = [1.0f32; 4];
    macro_rules! err {
        ($e:expr, $pat:pat) => {{
            let r = $e;
            assert!(matches!(r, Err($pat)), "{}: {r:?}", stringify!($e));
        }};
    }
    // Short slices.
    err!(
        ops::layer_norm(short, &w4, &w4, 1e-5, MatMut::dense(&mut buf, 3, 4)),
        Error::SliceTooShort { name: "x", .. }
    );
    err!(
        ops::layer_norm(good, &w4, &w4, 1e-5, MatMut::new(&mut buf[..11], 3, 4, 4)),
        Error::SliceTooShort { name: "out", .. }
    );
    err!(
        ops::softmax(MatMut::new(&mut buf, 2, 4, 9)),
        Error::SliceTooShort { .. }
    );
    err!(
        ops::add(MatMut::dense(&mut buf, 3, 4), short),
        Error::SliceTooShort { name: "y", .. }
    );
    // Leading dimension below the row.
    err!(
        ops::activation(Activation::Relu, MatMut::new(&mut buf, 3, 4, 3)),
        Error::LeadingDimension { .. }
    );
    err!(
        ops::l2_normalize(MatMut::new(&mut buf, 2, 4, 2)),
        Error::LeadingDimension { .. }
    );
    err!(
        ops::rms_norm(
            MatRef::new(&x, 3, 4, 3),
            &w4,
            1e-6,
            MatMut::dense(&mut buf, 3, 4)
        ),
        Error::LeadingDimension { .. }
    );
    // Shapes that disagree.
    err!(
        ops::layer_norm(good, &w4, &w4, 1e-5, MatMut::dense(&mut buf, 4, 3)),
        Error::ShapeMismatch { .. }
    );
    err!(
        ops::add(MatMut::dense(&mut buf, 2, 4), good),
        Error::ShapeMismatch { .. }
    );
    err!(
        ops::gated_activation(
            Activation::GeluTanh,
            good,
            MatRef::dense(&x, 4, 3),
            MatMut::dense(&mut buf, 3, 4)
        ),
        Error::ShapeMismatch { .. }
    );
    err!(
        ops::gated_activation(
            Activation::GeluTanh,
            good,
            good,
            MatMut::dense(&mut buf, 2, 4)
        ),
        Error::ShapeMismatch { .. }
    );
    // Vectors of the wrong length.
    err!(
        ops::layer_norm(good, &w3, &w4, 1e-5, MatMut::dense(&mut buf, 3, 4)),
        Error::LengthMismatch { name: "weight", .. }
    );
    err!(
        ops::layer_norm(good, &w4, &w3, 1e-5, MatMut::dense(&mut buf, 3, 4)),
        Error::LengthMismatch { name: "bias", .. }
    );
    err!(
        ops::rms_norm(good, &w3, 1e-6, MatMut::dense(&mut buf, 3, 4)),
        Error::LengthMismatch { name: "weight", .. }
    );
    err!(
        ops::add_bias(MatMut::dense(&mut buf, 3, 4), &w3),
        Error::LengthMismatch { name: "bias", .. }
    );
    // Overflowing extents.
    err!(
        ops::softmax(MatMut::new(&mut buf, usize::MAX, 4, usize::MAX / 2)),
        Error::Overflow { .. }
    );
    // Embedding: an id out of range (named, with its index; nothing written), wrong output.
    let table = vec![f16::from_f32(1.0); 12];
    let t = MatRef::dense(&table, 3, 4);
    let mut out = vec![-1.0f32; 12];
    let r = ops::embedding(t, &[0, 2, 3], MatMut::dense(&mut out, 3, 4));
    match r {
        Err(Error::InvalidArgument(msg)) => {
            assert!(msg.contains("ids[2] = 3"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    assert!(out.iter().all(|&v| v == -1.0), "nothing may be written");
    err!(
        ops::embedding(t, &[0, 1], MatMut::dense(&mut out, 3, 4)),
        Error::ShapeMismatch { .. }
    );
    err!(
        ops::embedding(t, &[0, 1, 2], MatMut::dense(&mut out[..12], 3, 3)),
        Error::ShapeMismatch { .. }
    );
    err!(
        ops::embedding(
            MatRef::new(&table, 3, 4, 5),
            &[0],
            MatMut::dense(&mut out, 1, 4)
        ),
        Error::SliceTooShort { name: "table", .. }
    );
    // The reference refuses the same inputs.
    assert!(reference::layer_norm(good, &w3, &w4, 1e-5).is_err());
    assert!(reference::embedding(t, &[3]).is_err());
}

#[test]
fn unavailable_isa_is_an_error() {
    for isa in Isa::ALL {
        if isa.is_available() {
            continue;
        }
        let o = opts(isa, 1);
        let x = vec![0.5f32; 8];
        let mut y = x.clone();
        let w = [1.0f32; 4];
        let xm = MatRef::dense(&x, 2, 4);
        let unavailable = |r: tessera_core::Result<()>| {
            assert!(
                matches!(r, Err(Error::IsaUnavailable { .. })),
                "{isa}: {r:?}"
            )
        };
        unavailable(ops::layer_norm_with(
            &o,
            xm,
            &w,
            &w,
            1e-5,
            MatMut::dense(&mut y, 2, 4),
        ));
        unavailable(ops::rms_norm_with(
            &o,
            xm,
            &w,
            1e-5,
            MatMut::dense(&mut y, 2, 4),
        ));
        unavailable(ops::softmax_with(&o, MatMut::dense(&mut y, 2, 4)));
        unavailable(ops::activation_with(
            &o,
            Activation::Relu,
            MatMut::dense(&mut y, 2, 4),
        ));
        unavailable(ops::gated_activation_with(
            &o,
            Activation::Relu,
            xm,
            xm,
            MatMut::dense(&mut y, 2, 4),
        ));
        unavailable(ops::add_with(&o, MatMut::dense(&mut y, 2, 4), xm));
        unavailable(ops::add_bias_with(&o, MatMut::dense(&mut y, 2, 4), &w));
        unavailable(ops::l2_normalize_with(&o, MatMut::dense(&mut y, 2, 4)));
        unavailable(ops::embedding_with(
            &o,
            xm,
            &[1],
            MatMut::dense(&mut y[..4], 1, 4),
        ));
        assert_eq!(y, x, "{isa}: nothing may be written");
    }
}
