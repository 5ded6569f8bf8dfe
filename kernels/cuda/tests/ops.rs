//! Tests of the CUDA `ops` family.
//!
//! * GPU property tests (skipped, one printed line, where `test_device()` finds no GPU): every
//!   operation against `tessera_core::reference::ops` (narrowing against `half`'s conversions,
//!   mean pooling against an f64 sum, random lengths) on random shapes: 0 to 9 rows; columns
//!   0, 1, primes, and one below / at / one above every edge of the kernels (float4 chunk,
//!   warp, the row variants' 256 / 1024 / 4096 / 16384 columns), leading dimensions above
//!   the columns, matrices that start 0 to 3 floats into their allocation (so both the float4
//!   and the scalar paths run). Every output buffer is poisoned with a NaN pattern before the
//!   launch; afterwards every logical element must have been written and every element outside
//!   the logical matrix (the padding between `cols` and `ld`, and the guard elements around the
//!   matrix) must hold what it held: the poison for outputs, the input for in-place operands.
//! * GPU tests of special rows and values (softmax's masked / all `−∞` / NaN / `+∞` rows,
//!   NaN propagation, infinities through every activation, layer norm of constant and offset
//!   rows) in every row-kernel variant, of narrowing's special values (NaN payloads, ±∞,
//!   f16 overflow, subnormals, ties) in both access paths, of mean pooling over more sequences
//!   than the grid's y limit, and of launcher refusals.
//! * Host-only tests (they run everywhere) of every validation error, and of the kernels'
//!   formulas emulated on the host against the tolerances.
//!
//! Tolerances are derived from the operations each kernel performs, as in the CPU crate's
//! tests (`kernels/cpu/tests/ops.rs`), with `u = 2⁻²⁴`, `γ_k = k·u/(1 − k·u)` and the CUDA math
//! library's documented bounds (`EXP_REL_ERR`, `ERFC_REL_ERR`, `TANH_REL_ERR` of
//! `tessera_cuda::ops`); each is stated next to its check and multiplied by 1.01 for the
//! second-order terms. add, add_bias, scale: correctly rounded; embedding, ReLU: exact;
//! narrow: bit-identical to `half::f16::from_f32` / `half::bf16::from_f32`; mean_rows:
//! `γ_len·Σ|x|/len + u·|ref|`.

use half::{bf16, f16};
use proptest::prelude::*;
use tessera_core::reference::ops as reference;
use tessera_core::{Element, MatRef};
use tessera_cuda::cudarc::driver::{CudaSlice, DeviceRepr};
use tessera_cuda::launch::fill_u32;
use tessera_cuda::ops::{
    self, Activation, DevMat, ERFC_REL_ERR, EXP_REL_ERR, ROW_CACHE_MAX_COLS, TANH_REL_ERR,
};
use tessera_cuda::{Device, Error, test_device};

type CoreError = tessera_core::Error;

const U: f64 = 1.0 / (1u64 << 24) as f64;

/// The smallest positive subnormal f32, as f64.
const SUB: f64 = 1.401298464324817e-45;

fn gamma(k: usize) -> f64 {
    let ku = k as f64 * U;
    ku / (1.0 - ku)
}

/// What an input allocation holds outside its logical matrix (and an in-place operand must
/// still hold there afterwards).
const GAP: f32 = -12345.5;

/// The bits every output allocation is filled with before a launch (a NaN no arithmetic
/// produces: the GPU's NaN results are 0x7fffffff).
const POISON: u32 = 0x7fc0_0001;

/// Guard elements after every matrix in its allocation.
const TAIL: usize = 3;

const ACTS: [Activation; 4] = [
    Activation::Relu,
    Activation::GeluErf,
    Activation::GeluTanh,
    Activation::Tanh,
];

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

/// A device error as a test failure.
fn gpu<T>(r: tessera_cuda::Result<T>) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{e}")))
}

/// A `rows x cols` matrix with leading dimension `cols + gap`, starting `off` elements into
/// its allocation, which ends `TAIL` elements after the matrix; everything outside the
/// logical elements holds [`GAP`].
#[derive(Debug, Clone)]
struct Mat {
    rows: usize,
    cols: usize,
    ld: usize,
    off: usize,
    data: Vec<f32>,
}

impl Mat {
    fn new(rows: usize, cols: usize, gap: usize, off: usize, vals: &[f32]) -> Mat {
        let ld = cols + gap;
        let extent = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * ld + cols
        };
        let mut data = vec![GAP; off + extent + TAIL];
        for r in 0..if cols == 0 { 0 } else { rows } {
            data[off + r * ld..][..cols].copy_from_slice(&vals[r * cols..][..cols]);
        }
        Mat {
            rows,
            cols,
            ld,
            off,
            data,
        }
    }

    fn extent(&self) -> usize {
        self.data.len() - self.off - TAIL
    }

    fn shape(&self) -> DevMat {
        DevMat::new(self.rows, self.cols, self.ld)
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.off..self.off + self.extent()
    }

    fn view(&self) -> MatRef<'_, f32> {
        MatRef::new(&self.data[self.range()], self.rows, self.cols, self.ld)
    }

    /// Whether allocation index `i` is a logical element.
    fn is_elem(&self, i: usize) -> bool {
        i >= self.off && i < self.off + self.extent() && (i - self.off) % self.ld < self.cols
    }

    /// The logical elements of a downloaded allocation, dense.
    fn dense(&self, all: &[f32]) -> Vec<f32> {
        (0..if self.cols == 0 { 0 } else { self.rows })
            .flat_map(|r| all[self.off + r * self.ld..][..self.cols].iter().copied())
            .collect()
    }

    /// Whether every non-logical element of `all` holds `bits`.
    fn outside_holds(&self, all: &[f32], bits: u32) -> bool {
        all.len() == self.data.len()
            && all
                .iter()
                .enumerate()
                .all(|(i, v)| self.is_elem(i) || v.to_bits() == bits)
    }

    fn upload(&self, dev: &Device) -> Result<CudaSlice<f32>, TestCaseError> {
        gpu(dev.upload(&self.data))
    }

    /// An allocation of this geometry filled with [`POISON`] (an output).
    fn poisoned(&self, dev: &Device) -> Result<CudaSlice<f32>, TestCaseError> {
        let mut buf = gpu(dev.alloc_zeros::<f32>(self.data.len()))?;
        gpu(fill_u32(dev, &mut buf, POISON))?;
        Ok(buf)
    }
}

/// A vector uploaded `off` elements into its allocation (the rest [`GAP`]).
fn upload_vec(dev: &Device, v: &[f32], off: usize) -> Result<CudaSlice<f32>, TestCaseError> {
    let mut data = vec![GAP; off + v.len() + TAIL];
    data[off..off + v.len()].copy_from_slice(v);
    gpu(dev.upload(&data))
}

/// Checks `got` against `want`: every element written (not [`POISON`]), NaN where `want` is
/// NaN, else within `tol(i)`.
fn check(
    what: &str,
    got: &[f32],
    want: &[f64],
    tol: impl Fn(usize) -> f64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            g.to_bits() != POISON,
            "{}: element {} never written",
            what,
            i
        );
        if w.is_nan() {
            prop_assert!(g.is_nan(), "{}: element {}: got {}, want NaN", what, i, g);
            continue;
        }
        let err = (f64::from(g) - w).abs();
        let t = tol(i);
        prop_assert!(
            err <= t,
            "{}: element {}: got {} want {} err {:e} > tol {:e}",
            what,
            i,
            g,
            w,
            err,
            t
        );
    }
    Ok(())
}

/// Exact f32 result: the f64 reference of one f32 operation rounded once (f64 has more than
/// 2·24 + 2 bits, so that is the correctly rounded f32 result).
fn exact(what: &str, got: &[f32], want: &[f64]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let w = w as f32;
        prop_assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan() && g.to_bits() != POISON),
            "{}: element {}: got {} want {}",
            what,
            i,
            g,
            w
        );
    }
    Ok(())
}

/// Column counts: 0, 1, primes, one below / at / one above every float4, warp and
/// row-variant edge, and anything small.
fn cols() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => prop::sample::select(vec![
            0usize, 1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 32, 33, 37, 63, 64, 65, 127, 128, 129, 255,
            256, 257, 383, 384, 511, 512, 513, 769, 1023, 1024, 1025,
        ]),
        1 => prop::sample::select(vec![
            2047usize, 4095, 4096, 4097, 8191, 16383, 16384, 16385, 20011,
        ]),
        2 => 0usize..300,
    ]
}

/// A shape, three leading-dimension gaps, three start offsets (x / y or vectors / out), a
/// seed and a scale.
#[derive(Debug, Clone)]
struct Case {
    rows: usize,
    cols: usize,
    gaps: [usize; 3],
    offs: [usize; 3],
    seed: u64,
    scale: f32,
}

prop_compose! {
    fn case()(
        rows in 0usize..=9,
        cols in cols(),
        gaps in prop::array::uniform3(prop_oneof![3 => Just(0usize), 1 => Just(4usize), 2 => 1usize..7]),
        offs in prop::array::uniform3(prop_oneof![3 => Just(0usize), 1 => 1usize..4]),
        seed in any::<u64>(),
        scale in prop::sample::select(vec![0.01f32, 1.0, 4.0, 30.0]),
    ) -> Case {
        // At most 2^17 elements: the widest rows get fewer of them.
        let rows = (1usize << 17).checked_div(cols).map_or(rows, |cap| rows.min(cap));
        Case { rows, cols, gaps, offs, seed, scale }
    }
}

impl Case {
    fn n(&self) -> usize {
        self.rows * self.cols
    }
    fn mat(&self, k: usize, vals: &[f32]) -> Mat {
        Mat::new(self.rows, self.cols, self.gaps[k], self.offs[k], vals)
    }
    fn x(&self) -> Mat {
        self.mat(0, &values(self.n(), self.seed, self.scale))
    }
    fn y(&self) -> Mat {
        self.mat(1, &values(self.n(), self.seed ^ 0x9e37, self.scale))
    }
    fn out(&self) -> Mat {
        self.mat(2, &vec![0.0; self.n()])
    }
    fn vector(&self, salt: u64, scale: f32) -> Vec<f32> {
        values(self.cols, self.seed ^ salt, scale)
    }
}

// ---------------------------------------------------------------------------------------
// Tolerances (derivations as in kernels/cpu/tests/ops.rs; the GPU kernels perform the same
// operations, with the CUDA math library's functions).

/// Layer norm, for one row (`n = cols`): the kernel computes `μ₀ = fl(Σx)/n`,
/// `d = fl(x − μ₀)`, `δμ = fl(Σd)/n`, `var = fl(Σd²)/n − δμ²`, `rstd = 1/√(var + eps)`,
/// `y = fl(fl((d − δμ)·rstd)·w + b)` (any summation order). With exact `μ`, `c = x − μ`,
/// `σ² = mean(c²)`, `s = √(σ² + eps)`, `M = mean|c|`: `|μ₀ − μ| <= A = γ_{n+1}·mean|x|`;
/// `δμ = −(μ₀ − μ) + ε₁`, `|ε₁| <= E₁ = γ_{n+2}·(M + 2A)`; the centered value is within
/// `Δc = 3u·|c_j| + E₁ + 2u·A`; `var − σ²` within
/// `ε_v = γ_{n+4}·(σ² + A²) + 2A·E₁ + E₁² + γ_2·(A + E₁)²`; `rstd` within a relative
/// `r = ε_v/(2(σ² + eps)) + 3u`; three more roundings.
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

/// RMS norm: `Σx²` within `γ_{n+1}` relative; the division by n, the eps add, the square
/// root and the reciprocal: `rstd` within `½γ_{n+2} + 2u`; two more products.
/// `|y − ref| <= 1.01·|ref|·(½γ_{n+2} + 4u) + 2⁻¹²⁶`.
fn rms_norm_tol(n: usize, want: f64) -> f64 {
    1.01 * want.abs() * (0.5 * gamma(n + 2) + 4.0 * U) + f64::from(f32::MIN_POSITIVE)
}

/// L2: the norm within `½γ_n + u` relative, one division.
/// `|y − ref| <= 1.01·|ref|·(½γ_n + 2u) + 2⁻¹²⁶`.
fn l2_tol(n: usize, want: f64) -> f64 {
    1.01 * want.abs() * (0.5 * gamma(n) + 2.0 * U) + f64::from(f32::MIN_POSITIVE)
}

/// Softmax, `m` the row maximum (exact), `d_j = x_j − m`, `p_j` the exact result:
/// `fl(x_j − m)` within `u·|d_j|`, `expf` of it within a relative `u·|d_j| + EXP_REL_ERR`;
/// the sum within `Σ p_k(u|d_k| + EXP_REL_ERR) + γ_n` relative; the reciprocal and the
/// product round once each; subnormal terms carry an absolute error below `2⁻¹²⁶`.
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

/// GELU (erf) as `fl(fl(0.5x)·erfcf(t̂))`, `t̂ = fl(x·fl(−1/√2))`: `0.5x` is exact, `t̂` within
/// `2u·|t|` of `t = −x/√2` (the constant's rounding and the product's), which moves `erfc`
/// by a relative `S = (2/√π)·e^{−t²}·2u|t| / erfc(t)`; `erfcf` adds `ERFC_REL_ERR`, the
/// product `u`. Subnormal `erfcf` results: absolute `4·2⁻¹⁴⁹` times `0.5|x|`, and the product.
/// `|y − ref| <= 1.01·|ref|·(ERFC_REL_ERR + S + u) + 2|x|·2⁻¹⁴⁹ + 2⁻¹⁴⁹`.
fn gelu_erf_tol(x: f32, want: f64) -> f64 {
    let x = f64::from(x);
    let t = -x * std::f64::consts::FRAC_1_SQRT_2;
    let ec = reference::erfc(t);
    let s = if ec > 0.0 {
        std::f64::consts::FRAC_2_SQRT_PI * (-t * t).exp() * 2.0 * U * t.abs() / ec
    } else {
        0.0
    };
    1.01 * want.abs() * (f64::from(ERFC_REL_ERR) + s + U) + 2.0 * x.abs() * SUB + SUB
}

/// GELU (tanh) as `x·rcp(1 + expf(a))`, `a = x·(C1 + C3·x²) = −2y`: `a` within a relative
/// `6u` (the constants, `x²`, the fma, the product), which moves `expf` by `6u·|a|`; `expf`
/// adds `EXP_REL_ERR`; `σ = 1/(1 + e)` passes a relative error of `e` on as `(1 − σ)` times
/// it; the add, the (correctly rounded) reciprocal and the product round once each. Where
/// `1 + e` exceeds `2¹²⁶` the reciprocal is subnormal (absolute `2⁻¹⁵⁰`, times `|x|`), and
/// where `a > ln(f32::MAX) ≈ 88.72` `expf` overflows and the result is `x·0` while the exact
/// value is below `|x|·e⁻⁸⁸·⁷² = |x|·2⁻¹²⁸`: absolute `|x|·2⁻¹²⁷` is allowed.
/// `|y − ref| <= 1.01·|ref|·((1 − σ)(EXP_REL_ERR + 6u|a|) + 3u) + |x|·2⁻¹²⁷ + 2⁻¹⁴⁸`.
fn gelu_tanh_tol(x: f32, want: f64) -> f64 {
    let x = f64::from(x);
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let t = 2.0 * k * (x + 0.044715 * x * x * x);
    let sig = 1.0 / (1.0 + (-t).exp());
    let rel = (1.0 - sig) * (f64::from(EXP_REL_ERR) + 6.0 * U * t.abs()) + 3.0 * U;
    1.01 * want.abs() * rel + x.abs() * 2f64.powi(-127) + 2.0 * SUB
}

/// tanh: `tanhf`, `TANH_REL_ERR` relative (one subnormal ulp absolute below 2⁻¹²⁶).
fn tanh_tol(want: f64) -> f64 {
    1.01 * want.abs() * f64::from(TANH_REL_ERR) + SUB
}

/// The tolerance of `act(x)` against the reference value `want`.
fn act_tol(act: Activation, x: f32, want: f64) -> f64 {
    match act {
        Activation::Relu => 0.0,
        Activation::GeluErf => gelu_erf_tol(x, want),
        Activation::GeluTanh => gelu_tanh_tol(x, want),
        Activation::Tanh => tanh_tol(want),
    }
}

// ---------------------------------------------------------------------------------------
// One property each (the device is passed in; the proptest bodies skip without one).

/// Layer-norm rows: random, or (every other row, when `offset`) `1000 + noise`, where a
/// one-pass `E[x²] − E[x]²` variance would lose every digit.
fn layer_norm_input(c: &Case, offset: bool) -> Mat {
    let mut v = values(c.n(), c.seed, c.scale);
    if offset {
        for r in (0..c.rows).step_by(2) {
            for x in &mut v[r * c.cols..][..c.cols] {
                *x = 1000.0 + *x / c.scale;
            }
        }
    }
    c.mat(0, &v)
}

fn check_layer_norm(dev: &Device, c: &Case, offset: bool, eps: f32) -> Result<(), TestCaseError> {
    let x = layer_norm_input(c, offset);
    let w = c.vector(1, 2.0);
    let b = c.vector(2, 1.0);
    let want = reference::layer_norm(x.view(), &w, &b, eps).unwrap();
    let xd = x.dense(&x.data);
    let mut tol = Vec::with_capacity(want.len());
    for r in 0..c.rows {
        let row = &xd[r * c.cols..][..c.cols];
        tol.extend(layer_norm_tol(row, &w, eps, &want[r * c.cols..][..c.cols]));
    }
    let o = c.out();
    let xb = x.upload(dev)?;
    let (wo, bo) = (c.offs[1], c.offs[1] / 2);
    let wb = upload_vec(dev, &w, wo)?;
    let bb = upload_vec(dev, &b, bo)?;
    let mut ob = o.poisoned(dev)?;
    gpu(ops::layer_norm(
        dev,
        x.shape(),
        &xb.slice(x.range()),
        &wb.slice(wo..wo + c.cols),
        &bb.slice(bo..bo + c.cols),
        eps,
        o.shape(),
        &mut ob.slice_mut(o.range()),
    ))?;
    gpu(dev.synchronize())?;
    let got = gpu(dev.download(&ob))?;
    prop_assert!(
        o.outside_holds(&got, POISON),
        "layer_norm wrote outside out"
    );
    prop_assert_eq!(
        gpu(dev.download(&xb))?,
        x.data.clone(),
        "layer_norm changed x"
    );
    check("layer_norm", &o.dense(&got), &want, |i| tol[i])
}

fn check_rms_norm(dev: &Device, c: &Case, eps: f32) -> Result<(), TestCaseError> {
    let x = c.x();
    let w = c.vector(1, 2.0);
    let want = reference::rms_norm(x.view(), &w, eps).unwrap();
    let o = c.out();
    let xb = x.upload(dev)?;
    let wo = c.offs[1];
    let wb = upload_vec(dev, &w, wo)?;
    let mut ob = o.poisoned(dev)?;
    gpu(ops::rms_norm(
        dev,
        x.shape(),
        &xb.slice(x.range()),
        &wb.slice(wo..wo + c.cols),
        eps,
        o.shape(),
        &mut ob.slice_mut(o.range()),
    ))?;
    gpu(dev.synchronize())?;
    let got = gpu(dev.download(&ob))?;
    prop_assert!(o.outside_holds(&got, POISON), "rms_norm wrote outside out");
    check("rms_norm", &o.dense(&got), &want, |i| {
        rms_norm_tol(c.cols, want[i])
    })
}

/// Runs an in-place operation on a copy of `x` and returns the downloaded allocation, after
/// checking that nothing outside the logical matrix changed.
fn run_in_place(
    dev: &Device,
    what: &str,
    x: &Mat,
    f: impl FnOnce(&mut tessera_cuda::cudarc::driver::CudaViewMut<'_, f32>) -> tessera_cuda::Result<()>,
) -> Result<Vec<f32>, TestCaseError> {
    let mut xb = x.upload(dev)?;
    gpu(f(&mut xb.slice_mut(x.range())))?;
    gpu(dev.synchronize())?;
    let got = gpu(dev.download(&xb))?;
    prop_assert!(
        x.outside_holds(&got, GAP.to_bits()),
        "{} wrote outside the matrix",
        what
    );
    Ok(got)
}

fn check_l2(dev: &Device, c: &Case, zero_row: bool) -> Result<(), TestCaseError> {
    let mut x = c.x();
    if zero_row && c.rows > 0 {
        let (o, n) = (x.off, c.cols);
        x.data[o..o + n].fill(0.0);
    }
    let want = reference::l2_normalize(x.view()).unwrap();
    let got = run_in_place(dev, "l2_normalize", &x, |v| {
        ops::l2_normalize(dev, x.shape(), v)
    })?;
    check("l2_normalize", &x.dense(&got), &want, |i| {
        l2_tol(c.cols, want[i])
    })
}

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
    c.mat(0, &v)
}

fn check_softmax(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let x = softmax_input(c);
    let want = reference::softmax(x.view()).unwrap();
    let xd = x.dense(&x.data);
    let mut tol = Vec::with_capacity(want.len());
    for r in 0..c.rows {
        tol.extend(softmax_tol(
            &xd[r * c.cols..][..c.cols],
            &want[r * c.cols..][..c.cols],
        ));
    }
    let got = run_in_place(dev, "softmax", &x, |v| ops::softmax(dev, x.shape(), v))?;
    let got = x.dense(&got);
    check("softmax", &got, &want, |i| tol[i])?;
    for (i, &v) in xd.iter().enumerate() {
        if v == f32::NEG_INFINITY {
            prop_assert_eq!(got[i].to_bits(), 0.0f32.to_bits(), "masked element {}", i);
        }
    }
    Ok(())
}

fn check_activation(dev: &Device, c: &Case, act: Activation) -> Result<(), TestCaseError> {
    let x = c.x();
    let xd = x.dense(&x.data);
    let want = reference::activation(act, x.view()).unwrap();
    let got = run_in_place(dev, "activation", &x, |v| {
        ops::activation(dev, act, x.shape(), v)
    })?;
    check(&format!("{act:?}"), &x.dense(&got), &want, |i| {
        act_tol(act, xd[i], want[i])
    })
}

/// `act(gate)·up` rounds once more than `act(gate)`:
/// `|y − ref| <= 1.01·(|up|·tol_act(gate) + u·|ref|)`. Gate and up are the column halves of
/// one `[rows, 2·cols + gap]` device matrix, as after a fused `[wi_0; wi_1]` GEMM.
fn check_gated(dev: &Device, c: &Case, act: Activation) -> Result<(), TestCaseError> {
    let n = c.cols;
    let g = values(c.n(), c.seed, c.scale);
    let u = values(c.n(), c.seed ^ 3, 2.0);
    let mut both = Vec::with_capacity(2 * c.n());
    for r in 0..c.rows {
        both.extend_from_slice(&g[r * n..][..n]);
        both.extend_from_slice(&u[r * n..][..n]);
    }
    // One matrix of 2n columns: gate is columns 0..n, up columns n..2n.
    let m = Mat::new(c.rows, 2 * n, c.gaps[0], c.offs[0], &both);
    let ld = m.ld;
    let ext = if c.rows == 0 || n == 0 {
        0
    } else {
        (c.rows - 1) * ld + n
    };
    // (Where the matrix is empty, both views are empty and start at the matrix.)
    let up0 = if ext == 0 { m.off } else { m.off + n };
    let gate = MatRef::new(&m.data[m.off..m.off + ext], c.rows, n, ld);
    let up = MatRef::new(&m.data[up0..up0 + ext], c.rows, n, ld);
    let want = reference::gated_activation(act, gate, up).unwrap();
    let o = c.out();
    let mb = m.upload(dev)?;
    let mut ob = o.poisoned(dev)?;
    let shape = DevMat::new(c.rows, n, ld);
    gpu(ops::gated_activation(
        dev,
        act,
        shape,
        &mb.slice(m.off..m.off + ext),
        shape,
        &mb.slice(up0..up0 + ext),
        o.shape(),
        &mut ob.slice_mut(o.range()),
    ))?;
    gpu(dev.synchronize())?;
    let got = gpu(dev.download(&ob))?;
    prop_assert!(o.outside_holds(&got, POISON), "gated wrote outside out");
    let a: Vec<f64> = g.iter().map(|&v| act.apply(f64::from(v))).collect();
    check(&format!("gated {act:?}"), &o.dense(&got), &want, |i| {
        1.01 * (f64::from(u[i]).abs() * act_tol(act, g[i], a[i]) + U * want[i].abs())
    })
}

fn check_add_bias_scale(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let x = c.x();
    let y = c.y();
    let bias = c.vector(5, c.scale);
    let want = reference::add(x.view(), y.view()).unwrap();
    let want_b = reference::add_bias(x.view(), &bias).unwrap();
    let yb = y.upload(dev)?;
    let got = run_in_place(dev, "add", &x, |v| {
        ops::add(dev, x.shape(), v, y.shape(), &yb.slice(y.range()))
    })?;
    exact("add", &x.dense(&got), &want)?;
    prop_assert_eq!(gpu(dev.download(&yb))?, y.data.clone(), "add changed y");
    let bo = c.offs[2];
    let bb = upload_vec(dev, &bias, bo)?;
    let got = run_in_place(dev, "add_bias", &x, |v| {
        ops::add_bias(dev, x.shape(), v, &bb.slice(bo..bo + c.cols))
    })?;
    exact("add_bias", &x.dense(&got), &want_b)?;
    let got = run_in_place(dev, "scale", &x, |v| ops::scale(dev, x.shape(), v, -0.37))?;
    let want_s: Vec<f64> = x
        .dense(&x.data)
        .iter()
        .map(|&v| f64::from(v * -0.37))
        .collect();
    exact("scale", &x.dense(&got), &want_s)
}

fn check_embedding<T: Element + tessera_cuda::cudarc::driver::DeviceRepr>(
    dev: &Device,
    c: &Case,
    table_rows: usize,
    n_ids: usize,
) -> Result<(), TestCaseError> {
    let (ld, off) = (c.cols + c.gaps[0], c.offs[0]);
    let len = (table_rows - 1) * ld + c.cols;
    let table: Vec<T> = values(off + len, c.seed, c.scale)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let ids: Vec<u32> = values(n_ids, c.seed ^ 9, 1.0)
        .iter()
        .map(|v| ((v + 1.0) * 0.5 * table_rows as f32) as u32 % table_rows as u32)
        .collect();
    let tref = MatRef::new(&table[off..], table_rows, c.cols, ld);
    let want = reference::embedding(tref, &ids).unwrap();
    let o = Mat::new(
        n_ids,
        c.cols,
        c.gaps[2],
        c.offs[2],
        &vec![0.0; n_ids * c.cols],
    );
    let tb = gpu(dev.upload(&table))?;
    let mut ob = o.poisoned(dev)?;
    gpu(ops::embedding(
        dev,
        DevMat::new(table_rows, c.cols, ld),
        &tb.slice(off..off + len),
        &ids,
        o.shape(),
        &mut ob.slice_mut(o.range()),
    ))?;
    gpu(dev.synchronize())?;
    let got = gpu(dev.download(&ob))?;
    prop_assert!(o.outside_holds(&got, POISON), "embedding wrote outside out");
    exact("embedding", &o.dense(&got), &want)
}

fn activation_strategy() -> impl Strategy<Value = Activation> {
    prop::sample::select(ACTS.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn layer_norm_matches_reference(
        c in case(),
        offset in any::<bool>(),
        eps in prop::sample::select(vec![1e-5f32, 1e-12, 0.0]),
    ) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_layer_norm(dev, &c, offset, eps)?;
    }

    #[test]
    fn rms_norm_matches_reference(c in case(), eps in prop::sample::select(vec![1e-6f32, 0.0])) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_rms_norm(dev, &c, eps)?;
    }

    #[test]
    fn l2_normalize_matches_reference(c in case(), zero_row in any::<bool>()) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_l2(dev, &c, zero_row)?;
    }

    #[test]
    fn softmax_matches_reference(c in case()) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_softmax(dev, &c)?;
    }

    #[test]
    fn activation_matches_reference(c in case(), act in activation_strategy()) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_activation(dev, &c, act)?;
    }

    #[test]
    fn gated_activation_matches_reference(c in case(), act in activation_strategy()) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_gated(dev, &c, act)?;
    }

    #[test]
    fn add_add_bias_and_scale_are_exact(c in case()) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_add_bias_scale(dev, &c)?;
    }

    #[test]
    fn embedding_gathers_exactly(
        c in case(),
        table_rows in 1usize..20,
        n_ids in 0usize..12,
        dtype in 0usize..3,
    ) {
        let Some(dev) = test_device() else { return Ok(()) };
        match dtype {
            0 => check_embedding::<f32>(dev, &c, table_rows, n_ids)?,
            1 => check_embedding::<f16>(dev, &c, table_rows, n_ids)?,
            _ => check_embedding::<bf16>(dev, &c, table_rows, n_ids)?,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Narrowing to f16 / bf16 and mean pooling.

/// Deterministic pseudo-random 32-bit patterns.
fn bit_patterns(n: usize, seed: u64) -> Vec<u32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u32
        })
        .collect()
}

/// Values narrowing must get right, each bit-identical to `half`: NaNs of both signs with
/// assorted payloads (quiet, signalling, payload only in the bits narrowing drops), ±∞, ±0,
/// the f32 extremes, f32 subnormals, f16's largest finite value and the edges around it where
/// round to nearest even goes to 65504 or to ∞, f16 subnormals and the ties below the
/// smallest one, bf16 ties and bf16's overflow at `f32::MAX`.
fn narrow_specials() -> Vec<f32> {
    let bits = [
        0x7fc0_0000u32,
        0xffc0_0000,
        0x7f80_0001,
        0xff80_0001,
        0x7fbf_ffff,
        0x7fff_ffff,
        0xffff_ffff,
        0x7f81_2345,
        0xff80_1fff,
        0x7fa0_0000,
        0x7f80_2000,
        0x7f80_0000,
        0xff80_0000,
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x8000_0001,
        0x007f_ffff,
        0x0040_0000,
        0x0080_0000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f7f_7fff,
        0x7f7f_8000,
        0x477f_e000, // 65504
        0x477f_efff, // just below 65520: 65504
        0x477f_f000, // 65520: the tie, to ∞
        0xc77f_f000,
        0x4780_0000, // 65536
        0x4900_0000,
        0x3380_0000, // 2⁻²⁴: the smallest f16 subnormal
        0x3300_0000, // 2⁻²⁵: a tie, to 0
        0xb300_0000,
        0x3300_0001, // just above: to 2⁻²⁴
        0x33c0_0000, // 1.5·2⁻²⁴: a tie, to 2⁻²³
        0x3880_0000, // 2⁻¹⁴: the smallest f16 normal
        0x387f_e000, // just below: the largest f16 subnormal's neighbourhood
        0x387f_f000,
        0x3f80_1000, // f16 ties at 1: to even
        0x3f80_3000,
        0x3f80_8000, // bf16 ties at 1
        0x3f81_8000,
        0x3f80_8001,
    ];
    bits.iter().map(|&b| f32::from_bits(b)).collect()
}

/// Inputs for [`narrow`](ops::narrow): per element, one of random bit patterns (every class:
/// NaN payloads, subnormals, huge and tiny values), the same with the bits f16 or bf16 drops
/// set to an exact tie, values around f16's overflow and its subnormal range (both signs),
/// [`narrow_specials`], and ordinary values of `scale`.
fn narrow_input(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let pick = bit_patterns(n, seed ^ 0x4e41);
    let raw = bit_patterns(n, seed);
    let ordinary = values(n, seed ^ 0x77, scale);
    let specials = narrow_specials();
    (0..n)
        .map(|i| {
            let (p, r) = (pick[i], raw[i]);
            let sign = r & 0x8000_0000;
            match p % 8 {
                0 => f32::from_bits(r),
                1 => f32::from_bits((r & !0x1fff) | 0x1000),
                2 => f32::from_bits((r & !0xffff) | 0x8000),
                3 => f32::from_bits(sign | (0x477f_e000 + (r >> 8) % 0x4000 - 0x1000)),
                4 => f32::from_bits(sign | (0x32f0_0000 + (r >> 4) % 0x05a0_0000)),
                5 => specials[(p >> 8) as usize % specials.len()],
                _ => ordinary[i],
            }
        })
        .collect()
}

/// The 2-byte bits of an f16 / bf16.
fn bits16<T: Element>(v: T) -> u16 {
    bytemuck::cast(v)
}

/// What a narrowed output allocation is filled with before the launch: a signalling NaN of
/// the type (no quiet bit), which neither the kernel nor `half` ever produces.
fn poison16<T: Element>() -> u16 {
    if T::DTYPE == tessera_core::DType::BF16 {
        0x7f81
    } else {
        0x7c01
    }
}

/// Narrows a `Case`'s matrix (x with `gaps[0]` and `offs[0]`, in floats; out with `gaps[2]`
/// and `offs[2]`, in elements of `T`: offsets 1 to 3 put out off its 8-byte boundary) and checks
/// every element of the output allocation: the logical ones bit-identical to `T::from_f32`,
/// the others still the poison; x unchanged.
fn check_narrow<T: Element + DeviceRepr>(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let xv = narrow_input(c.n(), c.seed, c.scale);
    let x = c.mat(0, &xv);
    // The output geometry, as a Mat of zeros (only its indexing is used).
    let o = c.out();
    let poison = poison16::<T>();
    let xb = x.upload(dev)?;
    let mut ob = gpu(dev.upload(&vec![bytemuck::cast::<u16, T>(poison); o.data.len()]))?;
    gpu(ops::narrow::<T>(
        dev,
        x.shape(),
        &xb.slice(x.range()),
        o.shape(),
        &mut ob.slice_mut(o.range()),
    ))?;
    gpu(dev.synchronize())?;
    let got: Vec<u16> = gpu(dev.download(&ob))?.into_iter().map(bits16).collect();
    prop_assert_eq!(got.len(), o.data.len());
    for (i, &g) in got.iter().enumerate() {
        if !o.is_elem(i) {
            prop_assert_eq!(g, poison, "narrow wrote outside out at {}", i);
        }
    }
    for r in 0..if c.cols == 0 { 0 } else { c.rows } {
        for col in 0..c.cols {
            let v = xv[r * c.cols + col];
            let want = bits16(T::from_f32(v));
            prop_assert!(want != poison);
            let g = got[o.off + r * o.ld + col];
            prop_assert!(
                g == want,
                "narrow to {:?}: [{}, {}] = {:e} ({:#010x}): got {:#06x} want {:#06x}",
                T::DTYPE,
                r,
                col,
                v,
                v.to_bits(),
                g,
                want
            );
        }
    }
    prop_assert_eq!(
        gpu(dev.download(&xb))?
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        x.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "narrow changed x"
    );
    Ok(())
}

/// [`ops::split_f16`] of a `Case`'s matrix (geometry as in [`check_narrow`], `hi` and `lo`
/// sharing out's): every logical `hi` bit-identical to `f16::from_f32`, every `lo` to
/// [`ops::split_f16_value`]'s (NaN: any NaN), everything else still the poison, x unchanged.
fn check_split(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let xv = narrow_input(c.n(), c.seed, c.scale);
    let x = c.mat(0, &xv);
    let o = c.out();
    let poison = poison16::<f16>();
    let xb = x.upload(dev)?;
    let fill = vec![bytemuck::cast::<u16, f16>(poison); o.data.len()];
    let mut hb = gpu(dev.upload(&fill))?;
    let mut lb = gpu(dev.upload(&fill))?;
    gpu(ops::split_f16(
        dev,
        x.shape(),
        &xb.slice(x.range()),
        o.shape(),
        &mut hb.slice_mut(o.range()),
        &mut lb.slice_mut(o.range()),
    ))?;
    gpu(dev.synchronize())?;
    let hi: Vec<u16> = gpu(dev.download(&hb))?.into_iter().map(bits16).collect();
    let lo: Vec<u16> = gpu(dev.download(&lb))?.into_iter().map(bits16).collect();
    for i in 0..o.data.len() {
        if !o.is_elem(i) {
            prop_assert_eq!(hi[i], poison, "split wrote outside hi at {}", i);
            prop_assert_eq!(lo[i], poison, "split wrote outside lo at {}", i);
        }
    }
    for r in 0..if c.cols == 0 { 0 } else { c.rows } {
        for col in 0..c.cols {
            let v = xv[r * c.cols + col];
            let (want_hi, want_lo) = ops::split_f16_value(v);
            let at = o.off + r * o.ld + col;
            prop_assert!(
                hi[at] == bits16(want_hi),
                "split hi [{}, {}] = {:e}: got {:#06x} want {:#06x}",
                r,
                col,
                v,
                hi[at],
                bits16(want_hi)
            );
            let got_lo = bytemuck::cast::<u16, f16>(lo[at]);
            if want_lo.is_nan() {
                prop_assert!(
                    got_lo.is_nan() && lo[at] != poison,
                    "split lo of {:e}: {:#06x}",
                    v,
                    lo[at]
                );
            } else {
                prop_assert!(
                    lo[at] == bits16(want_lo),
                    "split lo [{}, {}] = {:e}: got {:#06x} want {:#06x}",
                    r,
                    col,
                    v,
                    lo[at],
                    bits16(want_lo)
                );
            }
        }
    }
    prop_assert_eq!(
        gpu(dev.download(&xb))?
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        x.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "split changed x"
    );
    Ok(())
}

/// A mean-pooling case: `batch` sequences of `seq` rows of `cols` columns, random lengths in
/// `1..=seq`.
#[derive(Debug, Clone)]
struct PoolCase {
    batch: usize,
    seq: usize,
    cols: usize,
    lengths: Vec<usize>,
    gaps: [usize; 2],
    offs: [usize; 2],
    seed: u64,
    scale: f32,
}

prop_compose! {
    fn pool_case()(
        batch in prop_oneof![1 => Just(0usize), 6 => 1usize..=6],
        seq in prop_oneof![2 => Just(1usize), 3 => 2usize..=40, 1 => Just(128usize)],
        cols in cols(),
        gaps in prop::array::uniform2(prop_oneof![3 => Just(0usize), 1 => Just(4usize), 2 => 1usize..7]),
        offs in prop::array::uniform2(prop_oneof![3 => Just(0usize), 1 => 1usize..4]),
        seed in any::<u64>(),
        scale in prop::sample::select(vec![0.01f32, 1.0, 4.0, 30.0]),
    ) -> PoolCase {
        // At most 2^18 elements of x: fewer sequences of wide rows.
        let per_seq = (seq * cols).max(1);
        let batch = batch.min(((1usize << 18) / per_seq).max(1));
        let seq = seq.min(((1usize << 18) / (batch.max(1) * cols.max(1))).max(1));
        let lengths = bit_patterns(batch, seed ^ 0x1e)
            .iter()
            .enumerate()
            // Every other case has a full-length sequence first.
            .map(|(b, &r)| if b == 0 && seed % 2 == 0 { seq } else { 1 + r as usize % seq })
            .collect();
        PoolCase { batch, seq, cols, lengths, gaps, offs, seed, scale }
    }
}

/// The bound of [`mean_rows`](ops::mean_rows) for one output: `len` terms summed in f32 in
/// order (within `γ_{len−1}·Σ|x|`), one division (a relative `u`, applied to the rounded sum:
/// `γ_{len−1}(1 + u) <= γ_len`), so `|y − ref| <= γ_len·Σ|x|/len + u·|ref|`; times 1.01 for
/// the f64 reference's own rounding, plus `2⁻¹⁴⁹` for a subnormal quotient.
fn mean_rows_tol(len: usize, sum_abs: f64, want: f64) -> f64 {
    1.01 * (gamma(len) * sum_abs / len as f64 + U * want.abs()) + SUB
}

/// x for a pooling case: random values in the counted rows, NaN in the rows past each
/// sequence's length (never read: a NaN there would reach the output).
fn pool_input(p: &PoolCase) -> (Mat, Vec<f64>, Vec<f64>) {
    let (seq, cols) = (p.seq, p.cols);
    let mut v = values(p.batch * seq * cols, p.seed, p.scale);
    let mut want = vec![0.0f64; p.batch * cols];
    let mut sum_abs = vec![0.0f64; p.batch * cols];
    for (b, &len) in p.lengths.iter().enumerate() {
        for r in 0..seq {
            for c in 0..cols {
                let i = (b * seq + r) * cols + c;
                if r < len {
                    want[b * cols + c] += f64::from(v[i]);
                    sum_abs[b * cols + c] += f64::from(v[i]).abs();
                } else {
                    v[i] = f32::NAN;
                }
            }
        }
        for c in 0..cols {
            want[b * cols + c] /= len as f64;
        }
    }
    let x = Mat::new(p.batch * seq, cols, p.gaps[0], p.offs[0], &v);
    (x, want, sum_abs)
}

fn check_mean_rows(dev: &Device, p: &PoolCase) -> Result<(), TestCaseError> {
    let (x, want, sum_abs) = pool_input(p);
    let o = Mat::new(
        p.batch,
        p.cols,
        p.gaps[1],
        p.offs[1],
        &vec![0.0; p.batch * p.cols],
    );
    let xb = x.upload(dev)?;
    let mut ob = o.poisoned(dev)?;
    gpu(ops::mean_rows(
        dev,
        x.shape(),
        &xb.slice(x.range()),
        p.seq,
        &p.lengths,
        o.shape(),
        &mut ob.slice_mut(o.range()),
    ))?;
    gpu(dev.synchronize())?;
    let got = gpu(dev.download(&ob))?;
    prop_assert!(o.outside_holds(&got, POISON), "mean_rows wrote outside out");
    let cols = p.cols.max(1);
    check("mean_rows", &o.dense(&got), &want, |i| {
        mean_rows_tol(p.lengths[i / cols], sum_abs[i], want[i])
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn narrow_is_bit_identical_to_half(c in case(), bf in any::<bool>()) {
        let Some(dev) = test_device() else { return Ok(()) };
        if bf {
            check_narrow::<bf16>(dev, &c)?;
        } else {
            check_narrow::<f16>(dev, &c)?;
        }
    }

    #[test]
    fn split_f16_matches_the_host_split(c in case()) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_split(dev, &c)?;
    }

    #[test]
    fn mean_rows_matches_reference(p in pool_case()) {
        let Some(dev) = test_device() else { return Ok(()) };
        check_mean_rows(dev, &p)?;
    }
}

// ---------------------------------------------------------------------------------------
// Special rows and values, in every row-kernel variant.

/// One width per row-kernel variant (w8, w32, b128, b512, loop), each with a partial float4
/// chunk.
const VARIANT_COLS: [usize; 5] = [19, 301, 2001, 5003, ROW_CACHE_MAX_COLS + 7];

fn must<T>(r: Result<T, TestCaseError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn variant_widths_are_what_they_claim() {
    let names: Vec<&str> = VARIANT_COLS.iter().map(|&c| ops::row_variant(c)).collect();
    assert_eq!(names, ["w8", "w32", "b128", "b512", "loop"]);
}

#[test]
fn softmax_special_rows() {
    let Some(dev) = test_device() else { return };
    let inf = f32::INFINITY;
    let ninf = f32::NEG_INFINITY;
    for cols in VARIANT_COLS {
        for (gap, off) in [(0usize, 0usize), (1, 1)] {
            // Masked entries; all masked; a NaN; a +∞.
            let mut v = values(4 * cols, 3, 5.0);
            for c in (0..cols).step_by(3) {
                v[c] = ninf;
            }
            v[cols..2 * cols].fill(ninf);
            v[2 * cols + cols - 2] = f32::NAN;
            v[3 * cols + 4] = inf;
            let x = Mat::new(4, cols, gap, off, &v);
            let got = must(run_in_place(dev, "softmax", &x, |b| {
                ops::softmax(dev, x.shape(), b)
            }));
            let y = x.dense(&got);
            let row0 = &y[..cols];
            assert!(
                row0.iter().all(|v| v.is_finite() && *v >= 0.0),
                "{cols}: {row0:?}"
            );
            let sum: f64 = row0.iter().map(|&v| f64::from(v)).sum();
            assert!((sum - 1.0).abs() < 1e-5 + gamma(cols), "{cols}: sum {sum}");
            for c in (0..cols).step_by(3) {
                assert_eq!(row0[c].to_bits(), 0, "{cols}: masked entry {c}");
            }
            assert!(
                y[cols..2 * cols].iter().all(|&v| v.to_bits() == 0),
                "{cols}: all −∞ row"
            );
            assert!(
                y[2 * cols..].iter().all(|v| v.is_nan()),
                "{cols}: NaN / +∞ rows"
            );
        }
    }
}

#[test]
fn nan_and_infinity_propagate() {
    let Some(dev) = test_device() else { return };
    for cols in VARIANT_COLS {
        let mut v = values(2 * cols, 4, 3.0);
        v[5] = f32::NAN;
        v[cols + cols - 1] = f32::NAN;
        let x = Mat::new(2, cols, 0, 0, &v);
        let xb = must(x.upload(dev));
        let w = must(upload_vec(dev, &vec![1.0; cols], 0));
        let b = must(upload_vec(dev, &vec![0.5; cols], 0));
        let o = Mat::new(2, cols, 0, 0, &vec![0.0; 2 * cols]);
        let mut ob = must(o.poisoned(dev));
        // A NaN anywhere in a row poisons the whole row of the norms.
        ops::layer_norm(
            dev,
            x.shape(),
            &xb.slice(x.range()),
            &w.slice(..cols),
            &b.slice(..cols),
            1e-5,
            o.shape(),
            &mut ob.slice_mut(o.range()),
        )
        .unwrap();
        let got = dev.download(&ob).unwrap();
        assert!(
            o.dense(&got)
                .iter()
                .all(|v| v.is_nan() && v.to_bits() != POISON),
            "{cols}: layer_norm"
        );
        fill_u32(dev, &mut ob, POISON).unwrap();
        ops::rms_norm(
            dev,
            x.shape(),
            &xb.slice(x.range()),
            &w.slice(..cols),
            1e-5,
            o.shape(),
            &mut ob.slice_mut(o.range()),
        )
        .unwrap();
        let got = dev.download(&ob).unwrap();
        assert!(
            o.dense(&got)
                .iter()
                .all(|v| v.is_nan() && v.to_bits() != POISON),
            "{cols}: rms_norm"
        );
        let got = must(run_in_place(dev, "l2", &x, |b| {
            ops::l2_normalize(dev, x.shape(), b)
        }));
        assert!(
            x.dense(&got).iter().all(|v| v.is_nan()),
            "{cols}: l2_normalize"
        );
        // Elementwise: exactly the NaN elements.
        for act in ACTS {
            let got = must(run_in_place(dev, "act", &x, |b| {
                ops::activation(dev, act, x.shape(), b)
            }));
            for (i, (a, b)) in x.dense(&got).iter().zip(&v).enumerate() {
                assert_eq!(a.is_nan(), b.is_nan(), "{act:?}: element {i}");
            }
        }
    }
    // Infinities and signed zeros: what the formulas give.
    let special = [f32::INFINITY, f32::NEG_INFINITY, -30.0, 30.0, 0.0, -0.0];
    let want: [[f32; 6]; 4] = [
        [f32::INFINITY, 0.0, 0.0, 30.0, 0.0, 0.0],
        [f32::INFINITY, f32::NAN, 0.0, 30.0, 0.0, 0.0],
        [f32::INFINITY, f32::NAN, 0.0, 30.0, 0.0, 0.0],
        [1.0, -1.0, -1.0, 1.0, 0.0, 0.0],
    ];
    for (act, want) in ACTS.into_iter().zip(want) {
        let x = Mat::new(1, 6, 0, 0, &special);
        let got = must(run_in_place(dev, "act", &x, |b| {
            ops::activation(dev, act, x.shape(), b)
        }));
        for (g, w) in x.dense(&got).iter().zip(want) {
            assert!(g == &w || (g.is_nan() && w.is_nan()), "{act:?}: {got:?}");
        }
    }
}

#[test]
fn layer_norm_of_constant_and_offset_rows() {
    let Some(dev) = test_device() else { return };
    for cols in VARIANT_COLS.map(|c| c | 1) {
        // A constant row normalizes to the bias; a row 1000 ± 1 (mean exactly 1000) to
        // ∓weight + bias. (For the wider rows the f32 sum of the constant row is inexact, so
        // μ₀ is off by ~1e-7 relative; the corrected mean cancels that to well below half an
        // ulp of 0.5 after scaling by rstd ≈ 316: allowed one ulp.)
        let mut v = vec![1000.25f32; 2 * cols];
        for c in 0..cols {
            v[cols + c] = if c % 2 == 0 { 999.0 } else { 1001.0 };
        }
        v[2 * cols - 1] = 1000.0;
        let x = Mat::new(2, cols, 0, 0, &v);
        let w = vec![2.0f32; cols];
        let bias = vec![0.5f32; cols];
        let want = reference::layer_norm(x.view(), &w, &bias, 0.0).unwrap();
        let xb = must(x.upload(dev));
        let wb = must(upload_vec(dev, &w, 0));
        let bb = must(upload_vec(dev, &bias, 0));
        let o = Mat::new(2, cols, 0, 0, &vec![0.0; 2 * cols]);
        let mut ob = must(o.poisoned(dev));
        ops::layer_norm(
            dev,
            x.shape(),
            &xb.slice(x.range()),
            &wb.slice(..cols),
            &bb.slice(..cols),
            1e-5,
            o.shape(),
            &mut ob.slice_mut(o.range()),
        )
        .unwrap();
        let got = o.dense(&dev.download(&ob).unwrap());
        assert!(
            got[..cols]
                .iter()
                .all(|&v| (v - 0.5).abs() <= f32::EPSILON / 2.0),
            "{cols}: {:?}",
            &got[..8]
        );
        for (g, w) in got[cols..].iter().zip(&want[cols..]) {
            // eps = 1e-5 against the reference's 0: |Δ| <= 2·(1 − 1/√(1 + 1e-5/σ²)) ≈ 1e-5.
            assert!((f64::from(*g) - w).abs() < 2e-5, "{cols}: {g} vs {w}");
        }
    }
}

/// Bad arguments are refused before anything is launched: nothing is written.
#[test]
fn launchers_refuse_bad_input_on_the_device() {
    let Some(dev) = test_device() else { return };
    let table: Vec<f16> = (0..12).map(|i| f16::from_f32(i as f32)).collect();
    let tb = dev.upload(&table).unwrap();
    let mut out = dev.upload(&[-1.0f32; 12]).unwrap();
    let r = ops::embedding(
        dev,
        DevMat::dense(3, 4),
        &tb,
        &[0, 2, 3],
        DevMat::dense(3, 4),
        &mut out,
    );
    match r {
        Err(Error::Invalid(CoreError::InvalidArgument(msg))) => {
            assert!(msg.contains("ids[2] = 3"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    let x = dev.upload(&[1.0f32; 12]).unwrap();
    let w = dev.upload(&[1.0f32; 3]).unwrap();
    let r = ops::layer_norm(
        dev,
        DevMat::dense(3, 4),
        &x,
        &w,
        &w,
        1e-5,
        DevMat::dense(3, 4),
        &mut out,
    );
    assert!(
        matches!(
            r,
            Err(Error::Invalid(CoreError::LengthMismatch {
                name: "weight",
                ..
            }))
        ),
        "{r:?}"
    );
    let r = ops::softmax(dev, DevMat::new(2, 4, 9), &mut out);
    assert!(
        matches!(r, Err(Error::Invalid(CoreError::SliceTooShort { .. }))),
        "{r:?}"
    );
    dev.synchronize().unwrap();
    assert!(
        dev.download(&out).unwrap().iter().all(|&v| v == -1.0),
        "nothing may be written"
    );
    // Empty matrices launch nothing and succeed.
    ops::softmax(dev, DevMat::new(3, 0, 5), &mut out).unwrap();
    ops::add(
        dev,
        DevMat::new(0, 4, 4),
        &mut out,
        DevMat::new(0, 4, 4),
        &x,
    )
    .unwrap();
    ops::embedding(
        dev,
        DevMat::dense(3, 4),
        &tb,
        &[],
        DevMat::dense(0, 4),
        &mut out,
    )
    .unwrap();
}

/// Rows the row kernels see as many warps' worth: more rows than a block holds, in the
/// warp variants (4 rows per block) and beyond, all reduced independently.
#[test]
fn many_rows_in_every_variant() {
    let Some(dev) = test_device() else { return };
    for cols in VARIANT_COLS {
        let rows = (200_000 / cols).clamp(5, 1030);
        let x = Mat::new(rows, cols, 4, 0, &values(rows * cols, 77, 3.0));
        let want = reference::rms_norm(x.view(), &vec![1.0; cols], 1e-6).unwrap();
        let xb = must(x.upload(dev));
        let wb = must(upload_vec(dev, &vec![1.0; cols], 0));
        let o = Mat::new(rows, cols, 1, 0, &vec![0.0; rows * cols]);
        let mut ob = must(o.poisoned(dev));
        ops::rms_norm(
            dev,
            x.shape(),
            &xb.slice(x.range()),
            &wb.slice(..cols),
            1e-6,
            o.shape(),
            &mut ob.slice_mut(o.range()),
        )
        .unwrap();
        let got = dev.download(&ob).unwrap();
        assert!(o.outside_holds(&got, POISON), "{cols}");
        must(check("rms_norm", &o.dense(&got), &want, |i| {
            rms_norm_tol(cols, want[i])
        }));
    }
}

/// Every special value in rows that take the float4 path (contiguous and with padding) and
/// the scalar path (out off its 8-byte boundary, x off its 16-byte one, leading dimensions
/// not multiples of 4), for both types.
#[test]
fn narrow_special_values_in_both_paths() {
    let Some(dev) = test_device() else { return };
    let sp = narrow_specials();
    // 4 rows of 4·k + 3 columns, row r the specials rotated by r: each special lands in the
    // four lanes of a float4 chunk (in different rows), and rows end in a partial chunk.
    let (rows, cols) = (4, 4 * sp.len().div_ceil(4) + 3);
    let mut v = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        v.extend((0..cols).map(|c| sp[(c + r) % sp.len()]));
    }
    for (gaps, offs) in [
        ([0, 0, 0], [0, 0, 0]),
        ([1, 0, 1], [0, 0, 0]),
        ([5, 0, 9], [0, 0, 0]),
        ([1, 0, 1], [0, 0, 1]),
        ([1, 0, 1], [1, 0, 0]),
        ([2, 0, 3], [2, 0, 0]),
        ([0, 0, 0], [3, 0, 2]),
    ] {
        let c = Case {
            rows,
            cols,
            gaps,
            offs,
            seed: 0,
            scale: 1.0,
        };
        let x = c.mat(0, &v);
        let o = c.out();
        let xb = must(x.upload(dev));
        let mut oh = must(gpu(dev.upload(&vec![f16::from_bits(0x7c01); o.data.len()])));
        let mut ob = must(gpu(dev.upload(&vec![bf16::from_bits(0x7f81); o.data.len()])));
        ops::narrow(
            dev,
            x.shape(),
            &xb.slice(x.range()),
            o.shape(),
            &mut oh.slice_mut(o.range()),
        )
        .unwrap();
        ops::narrow(
            dev,
            x.shape(),
            &xb.slice(x.range()),
            o.shape(),
            &mut ob.slice_mut(o.range()),
        )
        .unwrap();
        let gh = dev.download(&oh).unwrap();
        let gb = dev.download(&ob).unwrap();
        for i in 0..o.data.len() {
            if !o.is_elem(i) {
                assert_eq!(gh[i].to_bits(), 0x7c01, "{gaps:?} {offs:?}: f16 guard {i}");
                assert_eq!(gb[i].to_bits(), 0x7f81, "{gaps:?} {offs:?}: bf16 guard {i}");
            }
        }
        for r in 0..rows {
            for col in 0..cols {
                let (val, i) = (v[r * cols + col], o.off + r * o.ld + col);
                assert_eq!(
                    gh[i].to_bits(),
                    f16::from_f32(val).to_bits(),
                    "{gaps:?} {offs:?}: f16 of {val:e} ({:#010x})",
                    val.to_bits()
                );
                assert_eq!(
                    gb[i].to_bits(),
                    bf16::from_f32(val).to_bits(),
                    "{gaps:?} {offs:?}: bf16 of {val:e} ({:#010x})",
                    val.to_bits()
                );
            }
        }
    }
}

/// More sequences than the grid's y limit (the kernel steps over them), a NaN and infinities
/// in counted rows (they propagate), and the refusals of both launchers (nothing written).
#[test]
fn mean_rows_many_sequences_and_refusals() {
    let Some(dev) = test_device() else { return };
    let (batch, seq, cols) = (70_001usize, 2usize, 3usize);
    let v = values(batch * seq * cols, 11, 2.0);
    let lengths: Vec<usize> = (0..batch).map(|b| 1 + b % 2).collect();
    let x = Mat::new(batch * seq, cols, 1, 1, &v);
    let o = Mat::new(batch, cols, 0, 0, &vec![0.0; batch * cols]);
    let xb = must(x.upload(dev));
    let mut ob = must(o.poisoned(dev));
    ops::mean_rows(
        dev,
        x.shape(),
        &xb.slice(x.range()),
        seq,
        &lengths,
        o.shape(),
        &mut ob.slice_mut(o.range()),
    )
    .unwrap();
    let got = o.dense(&dev.download(&ob).unwrap());
    for b in 0..batch {
        for c in 0..cols {
            let (a, z) = (v[2 * b * cols + c], v[(2 * b + 1) * cols + c]);
            let want = if lengths[b] == 1 { a } else { (a + z) / 2.0 };
            assert_eq!(got[b * cols + c].to_bits(), want.to_bits(), "[{b}, {c}]");
        }
    }
    // Special values in counted rows.
    let x = Mat::new(
        4,
        2,
        0,
        0,
        &[
            f32::NAN,
            1.0,
            2.0,
            f32::INFINITY,
            f32::INFINITY,
            1.0,
            f32::NEG_INFINITY,
            3.0,
        ],
    );
    let xb = must(x.upload(dev));
    let o = Mat::new(2, 2, 0, 0, &[0.0; 4]);
    let mut ob = must(o.poisoned(dev));
    ops::mean_rows(
        dev,
        x.shape(),
        &xb.slice(x.range()),
        2,
        &[2, 2],
        o.shape(),
        &mut ob.slice_mut(o.range()),
    )
    .unwrap();
    let got = o.dense(&dev.download(&ob).unwrap());
    assert!(got[0].is_nan() && got[0].to_bits() != POISON, "{got:?}");
    assert_eq!(got[1], f32::INFINITY, "{got:?}");
    assert!(got[2].is_nan() && got[2].to_bits() != POISON, "{got:?}");
    assert_eq!(got[3], 2.0, "{got:?}");
    // Refusals: nothing is launched or written.
    let mut out = dev.upload(&[-1.0f32; 8]).unwrap();
    let r = ops::mean_rows(
        dev,
        DevMat::dense(4, 2),
        &xb,
        2,
        &[2, 0],
        DevMat::dense(2, 2),
        &mut out,
    );
    match r {
        Err(Error::Invalid(CoreError::InvalidArgument(msg))) => {
            assert!(msg.contains("lengths[1] = 0"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    let r = ops::mean_rows(
        dev,
        DevMat::dense(4, 2),
        &xb,
        4,
        &[2, 2],
        DevMat::dense(2, 2),
        &mut out,
    );
    assert!(
        matches!(r, Err(Error::Invalid(CoreError::ShapeMismatch { .. }))),
        "{r:?}"
    );
    let mut same = dev.upload(&[0.0f32; 8]).unwrap();
    let r = ops::narrow::<f32>(
        dev,
        DevMat::dense(2, 4),
        &xb,
        DevMat::dense(2, 4),
        &mut same,
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let mut half_out = dev.upload(&[f16::from_bits(0x7c01); 8]).unwrap();
    let r = ops::narrow(
        dev,
        DevMat::dense(2, 4),
        &xb,
        DevMat::new(2, 3, 4),
        &mut half_out,
    );
    assert!(
        matches!(r, Err(Error::Invalid(CoreError::ShapeMismatch { .. }))),
        "{r:?}"
    );
    dev.synchronize().unwrap();
    assert!(dev.download(&out).unwrap().iter().all(|&v| v == -1.0));
    assert!(dev.download(&same).unwrap().iter().all(|&v| v == 0.0));
    assert!(
        dev.download(&half_out)
            .unwrap()
            .iter()
            .all(|v| v.to_bits() == 0x7c01)
    );
    // Empty: no sequences, or no columns, launch nothing and succeed.
    ops::mean_rows(
        dev,
        DevMat::dense(0, 2),
        &xb,
        2,
        &[],
        DevMat::dense(0, 2),
        &mut out,
    )
    .unwrap();
    ops::mean_rows(
        dev,
        DevMat::new(4, 0, 2),
        &xb,
        2,
        &[1, 2],
        DevMat::new(2, 0, 2),
        &mut out,
    )
    .unwrap();
    ops::narrow(
        dev,
        DevMat::new(3, 0, 4),
        &xb,
        DevMat::new(3, 0, 1),
        &mut half_out,
    )
    .unwrap();
    dev.synchronize().unwrap();
    assert!(dev.download(&out).unwrap().iter().all(|&v| v == -1.0));
}

// ---------------------------------------------------------------------------------------
// Host-only: every validation error (no device needed).

macro_rules! err {
    ($e:expr, $pat:pat) => {{
        let r = $e;
        assert!(
            matches!(r, Err(Error::Invalid($pat))),
            "{}: {r:?}",
            stringify!($e)
        );
    }};
}

#[test]
fn validation_accepts_good_and_empty_input() {
    let m = DevMat::new(3, 4, 6);
    let len = 2 * 6 + 4;
    ops::validate_layer_norm(m, len, 4, 4, DevMat::dense(3, 4), 12).unwrap();
    ops::validate_rms_norm(m, len, 4, m, len).unwrap();
    ops::validate_in_place(m, len).unwrap();
    ops::validate_gated(m, len, m, len + 100, DevMat::dense(3, 4), 12).unwrap();
    ops::validate_add(m, len, DevMat::dense(3, 4), 12).unwrap();
    ops::validate_add_bias(m, len, 4).unwrap();
    ops::validate_embedding(m, len, &[2, 0, 1, 1], DevMat::dense(4, 4), 16).unwrap();
    // Empty: no elements needed.
    let e = DevMat::new(3, 0, 5);
    assert!(e.is_empty() && DevMat::dense(0, 7).is_empty() && !m.is_empty());
    ops::validate_layer_norm(e, 0, 0, 0, DevMat::new(3, 0, 2), 0).unwrap();
    ops::validate_in_place(DevMat::new(0, 4, 4), 0).unwrap();
    ops::validate_embedding(DevMat::dense(2, 3), 6, &[], DevMat::dense(0, 3), 0).unwrap();
    ops::validate_embedding(e, 0, &[2, 0], DevMat::new(2, 0, 3), 0).unwrap();
    assert_eq!(DevMat::dense(2, 5), DevMat::new(2, 5, 5));
}

#[test]
fn validation_refuses_bad_input() {
    let good = DevMat::dense(3, 4);
    // Short buffers.
    err!(
        ops::validate_layer_norm(good, 11, 4, 4, good, 12),
        CoreError::SliceTooShort {
            name: "x",
            needed: 12,
            actual: 11,
            ..
        }
    );
    err!(
        ops::validate_layer_norm(good, 12, 4, 4, good, 11),
        CoreError::SliceTooShort { name: "out", .. }
    );
    err!(
        ops::validate_in_place(DevMat::new(2, 4, 9), 12),
        CoreError::SliceTooShort { .. }
    );
    err!(
        ops::validate_add(good, 12, good, 11),
        CoreError::SliceTooShort { name: "y", .. }
    );
    err!(
        ops::validate_gated(good, 12, good, 12, good, 11),
        CoreError::SliceTooShort { name: "out", .. }
    );
    err!(
        ops::validate_gated(good, 12, good, 10, good, 12),
        CoreError::SliceTooShort { name: "up", .. }
    );
    // Leading dimension below the row.
    err!(
        ops::validate_in_place(DevMat::new(3, 4, 3), 12),
        CoreError::LeadingDimension { ld: 3, cols: 4, .. }
    );
    err!(
        ops::validate_rms_norm(DevMat::new(3, 4, 3), 12, 4, good, 12),
        CoreError::LeadingDimension { .. }
    );
    err!(
        ops::validate_in_place(DevMat::new(0, 4, 2), 0),
        CoreError::LeadingDimension { .. }
    );
    // Shapes that disagree.
    err!(
        ops::validate_layer_norm(good, 12, 4, 4, DevMat::dense(4, 3), 12),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_add(DevMat::dense(2, 4), 8, good, 12),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_gated(good, 12, DevMat::dense(4, 3), 12, good, 12),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_gated(good, 12, good, 12, DevMat::dense(2, 4), 12),
        CoreError::ShapeMismatch { .. }
    );
    // Vectors of the wrong length.
    err!(
        ops::validate_layer_norm(good, 12, 3, 4, good, 12),
        CoreError::LengthMismatch {
            name: "weight",
            expected: 4,
            actual: 3
        }
    );
    err!(
        ops::validate_layer_norm(good, 12, 4, 5, good, 12),
        CoreError::LengthMismatch { name: "bias", .. }
    );
    err!(
        ops::validate_rms_norm(good, 12, 3, good, 12),
        CoreError::LengthMismatch { name: "weight", .. }
    );
    err!(
        ops::validate_add_bias(good, 12, 3),
        CoreError::LengthMismatch { name: "bias", .. }
    );
    // Overflowing extents.
    err!(
        ops::validate_in_place(DevMat::new(usize::MAX, 4, usize::MAX / 2), usize::MAX),
        CoreError::Overflow { .. }
    );
    // Sizes beyond the kernels' int (the buffer lengths are only numbers here).
    let wide = DevMat::dense(1, 1 << 31);
    err!(
        ops::validate_in_place(wide, 1 << 31),
        CoreError::Overflow { .. }
    );
    err!(
        ops::validate_in_place(DevMat::new(2, 4, 1 << 31), (1 << 31) + 4),
        CoreError::Overflow { .. }
    );
    err!(
        ops::validate_add_bias(DevMat::dense(1 << 31, 1), 1 << 31, 1),
        CoreError::Overflow { .. }
    );
    err!(
        ops::validate_rms_norm(wide, 1 << 31, 1 << 31, wide, 1 << 31),
        CoreError::Overflow { .. }
    );
    ops::validate_in_place(DevMat::dense(1, i32::MAX as usize), i32::MAX as usize).unwrap();
    // Embedding: an id out of range (named, with its index), wrong output shapes, a short
    // table.
    let t = DevMat::dense(3, 4);
    match ops::validate_embedding(t, 12, &[0, 2, 3], DevMat::dense(3, 4), 12) {
        Err(Error::Invalid(CoreError::InvalidArgument(msg))) => {
            assert!(msg.contains("ids[2] = 3"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    err!(
        ops::validate_embedding(t, 12, &[u32::MAX], DevMat::dense(1, 4), 4),
        CoreError::InvalidArgument(_)
    );
    err!(
        ops::validate_embedding(t, 12, &[0, 1], DevMat::dense(3, 4), 12),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_embedding(t, 12, &[0, 1, 2], DevMat::dense(3, 3), 12),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_embedding(DevMat::new(3, 4, 5), 12, &[0], DevMat::dense(1, 4), 4),
        CoreError::SliceTooShort { name: "table", .. }
    );
    err!(
        ops::validate_embedding(t, 12, &[0], DevMat::dense(1, 4), 3),
        CoreError::SliceTooShort { name: "out", .. }
    );
    // The reference refuses the same inputs.
    let x = [0.0f32; 12];
    assert!(reference::layer_norm(MatRef::dense(&x, 3, 4), &[0.0; 3], &[0.0; 4], 1e-5).is_err());
}

#[test]
fn narrow_and_mean_rows_validation_accepts_good_and_empty_input() {
    let m = DevMat::new(3, 4, 6);
    ops::validate_narrow(m, 16, DevMat::dense(3, 4), 12).unwrap();
    ops::validate_narrow(DevMat::dense(3, 4), 12, m, 16).unwrap();
    ops::validate_narrow(DevMat::new(0, 4, 4), 0, DevMat::new(0, 4, 8), 0).unwrap();
    ops::validate_narrow(DevMat::new(3, 0, 1), 0, DevMat::new(3, 0, 0), 0).unwrap();
    assert_eq!(
        ops::narrow_kernel(tessera_core::DType::F16).unwrap(),
        "ops_narrow_f16"
    );
    assert_eq!(
        ops::narrow_kernel(tessera_core::DType::BF16).unwrap(),
        "ops_narrow_bf16"
    );
    // 2 sequences of 3 rows, out with its own leading dimension.
    let x = DevMat::new(6, 4, 5);
    ops::validate_mean_rows(x, 29, 3, &[3, 1], DevMat::new(2, 4, 7), 11).unwrap();
    ops::validate_mean_rows(x, 29, 3, &[1, 2], DevMat::dense(2, 4), 8).unwrap();
    // Empty: no sequences (any seq), no columns.
    ops::validate_mean_rows(DevMat::dense(0, 4), 0, 7, &[], DevMat::dense(0, 4), 0).unwrap();
    ops::validate_mean_rows(DevMat::dense(0, 4), 0, 0, &[], DevMat::dense(0, 4), 0).unwrap();
    ops::validate_mean_rows(DevMat::new(6, 0, 0), 0, 3, &[3, 3], DevMat::dense(2, 0), 0).unwrap();
}

#[test]
fn narrow_and_mean_rows_validation_refuses_bad_input() {
    let good = DevMat::dense(3, 4);
    // narrow: an f32 target, short buffers, ld below the row, shapes that disagree, sizes
    // beyond the kernels' int.
    match ops::narrow_kernel(tessera_core::DType::F32) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("f16 or bf16"), "{msg}"),
        other => panic!("{other:?}"),
    }
    err!(
        ops::validate_narrow(good, 11, good, 12),
        CoreError::SliceTooShort {
            name: "x",
            needed: 12,
            actual: 11,
            ..
        }
    );
    err!(
        ops::validate_narrow(good, 12, DevMat::new(3, 4, 8), 19),
        CoreError::SliceTooShort {
            name: "out",
            needed: 20,
            ..
        }
    );
    err!(
        ops::validate_narrow(DevMat::new(3, 4, 3), 12, good, 12),
        CoreError::LeadingDimension {
            name: "x",
            ld: 3,
            cols: 4
        }
    );
    err!(
        ops::validate_narrow(good, 12, DevMat::new(3, 4, 2), 12),
        CoreError::LeadingDimension { name: "out", .. }
    );
    err!(
        ops::validate_narrow(good, 12, DevMat::dense(4, 3), 12),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_narrow(good, 12, DevMat::dense(2, 4), 12),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_narrow(
            DevMat::new(usize::MAX, 4, usize::MAX / 2),
            usize::MAX,
            good,
            12
        ),
        CoreError::Overflow { .. }
    );
    let wide = DevMat::dense(1, 1 << 31);
    err!(
        ops::validate_narrow(wide, 1 << 31, wide, 1 << 31),
        CoreError::Overflow { .. }
    );
    err!(
        ops::validate_narrow(
            DevMat::dense(2, 4),
            8,
            DevMat::new(2, 4, 1 << 31),
            (1 << 31) + 4
        ),
        CoreError::Overflow { .. }
    );
    // mean_rows: short buffers, ld below the row, rows of x != seq·batch, rows of out !=
    // batch, columns that disagree, a length of 0 or above seq, overflowing and int-sized
    // dimensions.
    let x = DevMat::dense(6, 4);
    let out = DevMat::dense(2, 4);
    err!(
        ops::validate_mean_rows(x, 23, 3, &[3, 3], out, 8),
        CoreError::SliceTooShort {
            name: "x",
            needed: 24,
            actual: 23,
            ..
        }
    );
    err!(
        ops::validate_mean_rows(x, 24, 3, &[3, 3], out, 7),
        CoreError::SliceTooShort { name: "out", .. }
    );
    err!(
        ops::validate_mean_rows(DevMat::new(6, 4, 3), 24, 3, &[3, 3], out, 8),
        CoreError::LeadingDimension { name: "x", .. }
    );
    err!(
        ops::validate_mean_rows(x, 24, 3, &[3, 3], DevMat::new(2, 4, 1), 8),
        CoreError::LeadingDimension { name: "out", .. }
    );
    err!(
        ops::validate_mean_rows(x, 24, 2, &[2, 2], out, 8),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_mean_rows(x, 24, 3, &[3, 3, 3], DevMat::dense(3, 4), 12),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_mean_rows(x, 24, 6, &[3], out, 8),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_mean_rows(x, 24, 3, &[3, 3], DevMat::dense(2, 3), 6),
        CoreError::ShapeMismatch { .. }
    );
    err!(
        ops::validate_mean_rows(x, 24, 3, &[3, 3], DevMat::dense(3, 4), 12),
        CoreError::ShapeMismatch { .. }
    );
    match ops::validate_mean_rows(x, 24, 3, &[3, 0], out, 8) {
        Err(Error::Invalid(CoreError::InvalidArgument(msg))) => {
            assert!(msg.contains("lengths[1] = 0"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    match ops::validate_mean_rows(x, 24, 3, &[4, 3], out, 8) {
        Err(Error::Invalid(CoreError::InvalidArgument(msg))) => {
            assert!(
                msg.contains("lengths[0] = 4") && msg.contains("1..=3"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    err!(
        ops::validate_mean_rows(
            DevMat::dense(0, 4),
            0,
            usize::MAX,
            &[1, 1],
            DevMat::dense(2, 4),
            8
        ),
        CoreError::Overflow { .. }
    );
    let big = 1usize << 31;
    err!(
        ops::validate_mean_rows(
            DevMat::dense(big, 1),
            big,
            big / 2,
            &[1, 1],
            DevMat::dense(2, 1),
            2
        ),
        CoreError::Overflow { .. }
    );
    err!(
        ops::validate_mean_rows(
            DevMat::dense(2, big),
            2 * big,
            1,
            &[1, 1],
            DevMat::dense(2, big),
            2 * big
        ),
        CoreError::Overflow { .. }
    );
}

// ---------------------------------------------------------------------------------------
// Host-only: the test harness itself. The kernels' formulas evaluated in f32 on the host
// (with the host's `exp` / `tanh` and a correctly rounded `erfc` standing in for the CUDA
// math library, which is allowed more) must meet the tolerances above; the matrix geometry
// helpers must find exactly the logical elements; `check` must catch an unwritten element
// and an error above tolerance.

/// The GPU activation formulas, in f32 on the host.
fn host_act(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Relu => {
            if x < 0.0 {
                0.0
            } else {
                x
            }
        }
        Activation::GeluErf => {
            let t = x * -std::f32::consts::FRAC_1_SQRT_2;
            (0.5 * x) * reference::erfc(f64::from(t)) as f32
        }
        Activation::GeluTanh => {
            let k = -2.0 * (2.0 / std::f64::consts::PI).sqrt();
            let (c1, c3) = (k as f32, (k * 0.044715) as f32);
            let arg = x * (x * x).mul_add(c3, c1);
            x * (1.0 / (1.0 + arg.exp()))
        }
        Activation::Tanh => x.tanh(),
    }
}

#[test]
fn host_emulation_meets_the_tolerances() {
    // Activations over a sweep including both tails and the overflow of exp.
    let mut xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.01).collect();
    xs.extend([
        -87.0, -60.0, -45.0, -13.5, -9.0, 1e-6, -1e-6, 3e-39, 50.0, 88.0,
    ]);
    for act in ACTS {
        for &x in &xs {
            let want = act.apply(f64::from(x));
            let got = host_act(act, x);
            let err = (f64::from(got) - want).abs();
            let tol = act_tol(act, x, want);
            assert!(
                err <= tol,
                "{act:?}({x}): got {got}, want {want}, err {err:e} > {tol:e}"
            );
        }
    }
    // Row operations on random rows, the kernels' algorithms with sequential f32 sums.
    for (seed, cols, scale) in [
        (1u64, 1usize, 1.0f32),
        (2, 7, 30.0),
        (3, 129, 4.0),
        (4, 1025, 0.01),
    ] {
        let mut x = values(cols, seed, scale);
        if seed % 2 == 0 {
            x.iter_mut().for_each(|v| *v = 1000.0 + *v / scale);
        }
        let w = values(cols, seed ^ 1, 2.0);
        let b = values(cols, seed ^ 2, 1.0);
        let n = cols as f32;
        let xr = MatRef::dense(&x, 1, cols);
        // Layer norm.
        let mean0 = x.iter().sum::<f32>() / n;
        let (mut s1, mut s2) = (0.0f32, 0.0f32);
        for &v in &x {
            let d = v - mean0;
            s1 += d;
            s2 = d.mul_add(d, s2);
        }
        let dm = s1 / n;
        let var = (s2 / n - dm * dm).max(0.0);
        let rstd = 1.0 / (var + 1e-5).sqrt();
        let got: Vec<f32> = (0..cols)
            .map(|j| (((x[j] - mean0) - dm) * rstd).mul_add(w[j], b[j]))
            .collect();
        let want = reference::layer_norm(xr, &w, &b, 1e-5).unwrap();
        let tol = layer_norm_tol(&x, &w, 1e-5, &want);
        must(check("host layer_norm", &got, &want, |i| tol[i]));
        // RMS norm and L2.
        let ss = x.iter().fold(0.0f32, |s, &v| v.mul_add(v, s));
        let rs = 1.0 / (ss / n + 1e-6).sqrt();
        let got: Vec<f32> = (0..cols).map(|j| (x[j] * rs) * w[j]).collect();
        let want = reference::rms_norm(xr, &w, 1e-6).unwrap();
        must(check("host rms_norm", &got, &want, |i| {
            rms_norm_tol(cols, want[i])
        }));
        let d = ss.sqrt().max(ops::L2_NORM_MIN);
        let got: Vec<f32> = x.iter().map(|&v| v / d).collect();
        let want = reference::l2_normalize(xr).unwrap();
        must(check("host l2", &got, &want, |i| l2_tol(cols, want[i])));
        // Softmax.
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = x.iter().map(|&v| (v - m).exp()).collect();
        let inv = 1.0 / e.iter().sum::<f32>();
        let got: Vec<f32> = e.iter().map(|&v| v * inv).collect();
        let want = reference::softmax(xr).unwrap();
        let tol = softmax_tol(&x, &want);
        must(check("host softmax", &got, &want, |i| tol[i]));
    }
}

#[test]
fn harness_finds_the_logical_elements() {
    let vals: Vec<f32> = (0..6).map(|v| v as f32).collect();
    let m = Mat::new(2, 3, 2, 1, &vals);
    // [GAP] 0 1 2 GAP GAP 3 4 5 [GAP x 3]
    assert_eq!(m.ld, 5);
    assert_eq!(m.extent(), 8);
    assert_eq!(m.data.len(), 1 + 8 + TAIL);
    assert_eq!(m.dense(&m.data), vals);
    let logical: Vec<usize> = (0..m.data.len()).filter(|&i| m.is_elem(i)).collect();
    assert_eq!(logical, [1, 2, 3, 6, 7, 8]);
    assert!(m.outside_holds(&m.data, GAP.to_bits()));
    let mut bad = m.data.clone();
    bad[4] = 0.0; // a padding element
    assert!(!m.outside_holds(&bad, GAP.to_bits()));
    let mut bad = m.data.clone();
    bad[9] = 0.0; // the guard after the matrix
    assert!(!m.outside_holds(&bad, GAP.to_bits()));
    assert_eq!(m.view().data.len(), 8);
    // Empty matrices span nothing.
    let e = Mat::new(3, 0, 0, 2, &[]);
    assert_eq!((e.extent(), e.dense(&e.data).len()), (0, 0));
    assert!(e.outside_holds(&e.data, GAP.to_bits()));
    // `check` catches an unwritten (poisoned) element, a wrong NaN and an error above
    // tolerance; `exact` wants the correctly rounded value.
    let poison = f32::from_bits(POISON);
    assert!(check("t", &[1.0, poison], &[1.0, f64::NAN], |_| 0.0).is_err());
    assert!(check("t", &[1.0, f32::NAN], &[1.0, 2.0], |_| 1.0).is_err());
    assert!(check("t", &[1.0, 2.5], &[1.0, 2.0], |_| 0.4).is_err());
    assert!(check("t", &[1.0, 2.25, f32::NAN], &[1.0, 2.0, f64::NAN], |_| 0.25).is_ok());
    assert!(exact("t", &[0.1], &[0.1]).is_ok());
    assert!(exact("t", &[0.1f32.next_up()], &[0.1]).is_err());
}

/// The kernel's NaN rule (cvt.rn would give the canonical 0x7fff) in f32 bits on the host,
/// for both types: it must give `half`'s bits for every NaN (both signs, every payload bit
/// pattern of a sample that includes each single bit and the extremes).
#[test]
fn host_emulation_of_the_narrow_nan_rule() {
    let f16_nan = |x: u32| (((x >> 16) & 0x8000) | 0x7e00 | ((x >> 13) & 0x3ff)) as u16;
    let bf16_nan = |x: u32| ((x >> 16) | 0x40) as u16;
    let mut payloads: Vec<u32> = (0..23).map(|b| 1u32 << b).collect();
    payloads.extend([0x7f_ffff, 0x40_0000 | 1, 0x1fff, 0x2000, 0xffff, 0x1_0000]);
    payloads.extend((1..0x80_0000).step_by(997));
    for sign in [0u32, 0x8000_0000] {
        for &m in &payloads {
            let x = sign | 0x7f80_0000 | m;
            let v = f32::from_bits(x);
            assert!(v.is_nan());
            assert_eq!(f16_nan(x), f16::from_f32(v).to_bits(), "{x:#010x}");
            assert_eq!(bf16_nan(x), bf16::from_f32(v).to_bits(), "{x:#010x}");
            assert!(f16::from_bits(f16_nan(x)).is_nan() && bf16::from_bits(bf16_nan(x)).is_nan());
        }
    }
    // The poison patterns are never a conversion's result.
    for v in narrow_input(100_000, 5, 3.0) {
        assert_ne!(f16::from_f32(v).to_bits(), poison16::<f16>());
        assert_ne!(bf16::from_f32(v).to_bits(), poison16::<bf16>());
    }
}

/// mean_rows' algorithm (sequential f32 sum, one division) on the host meets its tolerance,
/// including sums with heavy cancellation and long sequences.
#[test]
fn host_emulation_of_mean_rows_meets_the_tolerance() {
    for (seed, len, scale, offset) in [
        (1u64, 1usize, 1.0f32, 0.0f32),
        (2, 7, 30.0, 0.0),
        (3, 128, 4.0, 1000.0),
        (4, 512, 0.01, 0.0),
        (5, 4096, 1.0, -3.0),
    ] {
        let v: Vec<f32> = values(len, seed, scale)
            .iter()
            .map(|x| x + offset)
            .collect();
        let s = v.iter().fold(0.0f32, |s, &x| s + x);
        let got = s / len as f32;
        let want = v.iter().map(|&x| f64::from(x)).sum::<f64>() / len as f64;
        let sum_abs: f64 = v.iter().map(|&x| f64::from(x).abs()).sum();
        must(check("host mean_rows", &[got], &[want], |_| {
            mean_rows_tol(len, sum_abs, want)
        }));
    }
}

/// The split representation holds f32 to the documented precision: `|hi + lo/2048 − x| ≤
/// 2⁻²²·|x| + 2⁻³⁶` (the rounding of `lo`, half an f16 ulp of `|x − hi| ≤ 2⁻¹¹·|x|`, or of an
/// f16 subnormal), over magnitudes from f32 subnormals to just below f16's overflow; beyond
/// it `hi` is infinite.
#[test]
fn split_f16_value_holds_f32_to_22_bits() {
    let raw = values(200_000, 91, 1.0);
    let mags = values(200_000, 92, 1.0);
    let mut worst = 0.0f64;
    for (&r, &m) in raw.iter().zip(&mags) {
        // |x| from about 2^-40 to 2^15.9.
        let x = (r * (2.0f32).powf(m.abs() * 56.0 - 40.0)).clamp(-65500.0, 65500.0);
        let (hi, lo) = ops::split_f16_value(x);
        assert!(hi.is_finite() && lo.is_finite(), "{x:e}");
        let back = f64::from(hi.to_f32()) + f64::from(lo.to_f32()) / f64::from(ops::SPLIT_SCALE);
        let err = (back - f64::from(x)).abs();
        let bound = 2f64.powi(-22) * f64::from(x.abs()) + 2f64.powi(-36);
        assert!(
            err <= bound,
            "{x:e}: hi {hi} lo {lo}: error {err:e} > {bound:e}"
        );
        worst = worst.max(err / f64::from(x.abs()).max(1e-30));
    }
    // The split does drop something: the check above is not vacuous.
    assert!(worst > 2f64.powi(-24), "worst relative error {worst:e}");
    let (hi, _) = ops::split_f16_value(70000.0);
    assert!(hi.is_infinite());
}
