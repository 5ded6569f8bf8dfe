//! Elementwise and row operations of the BERT / GPT-2 / T5 forward passes: layer norm, RMS
//! norm, softmax, activations (ReLU, GELU with `erf` and with `tanh`), gated activations,
//! embedding gather, residual and bias adds, L2 normalization.
//!
//! Semantics are those of [`tessera_core::reference::ops`] (the f64 oracle), which follows
//! PyTorch / Hugging Face `transformers`. Operands are [`MatRef`] / [`MatMut`] views (row-major,
//! a leading dimension each, so a column slice of a wider matrix is a valid operand); every
//! function validates shapes, lengths and leading dimensions before touching memory and
//! returns an [`Error`], never panics, on bad input. A matrix with 0 rows or 0 columns is
//! valid and nothing is done. NaN and infinities propagate as the defining formula says in
//! IEEE arithmetic (softmax documents its special rows).
//!
//! # Algorithm
//! One generic kernel per operation, written against the crate's `Simd` vector abstraction
//! and instantiated for each instruction set inside `#[target_feature]` entry points. A row
//! is processed a vector at a time; its last `cols % LANES` elements go through the same
//! vector code on a padded copy, so every column of a row is computed by the same operations.
//! Reductions (sums, sums of squares, maxima) accumulate in f32 vector lanes:
//!
//! * layer norm is a corrected two-pass algorithm (Chan, Golub & LeVeque): the mean `μ₀`,
//!   then `Σ(x − μ₀)` and `Σ(x − μ₀)²` in one pass, the mean corrected by `Σ(x − μ₀)/n`
//!   and the variance `Σ(x − μ₀)²/n − (Σ(x − μ₀)/n)²`, then the output
//!   `((x − μ₀) − Σ(x − μ₀)/n)·rstd·weight + bias`: no cancellation for rows with a large
//!   common offset, unlike `E[x²] − E[x]²`;
//! * softmax takes the row maximum, `exp(x − max)` with the vectorized `exp` (relative error
//!   [`EXP_REL_ERR`]) and their sum, then multiplies by the sum's reciprocal;
//! * GELU (erf) uses a vectorized `erf` with absolute error at most [`ERF_ABS_ERR`]; GELU
//!   (tanh) is evaluated as `x·σ(2y)` = `x / (1 + exp(−2y))`, the same function as
//!   `0.5·x·(1 + tanh(y))`, with the vectorized `exp`.
//!
//! Large calls (at least [`PAR_MIN_ELEMS`] elements) split their rows between rayon tasks.
//! Each row is computed by the same sequence of operations whichever thread runs it, so
//! results are bit-identical for every thread count.
//!
//! # Accuracy
//! First-order error bounds against the exact result `y` (what the property tests check, with
//! their derivations; `u = 2⁻²⁴`, `γ_k = k·u/(1 − k·u)`, `n` the row length):
//!
//! * [`add`], [`add_bias`], [`scale`]: correctly rounded; [`embedding`], ReLU: exact;
//! * [`rms_norm`]: `|y|·(½γ_{n+2} + 4u)`; [`l2_normalize`]: `|y|·(½γ_n + 2u)`;
//! * [`layer_norm`]: `|w_j|/s·(E₁ + 2u·A + |x_j − μ|·(ε_v/(2s²) + 9u)) + u·|y_j|` with
//!   `s = √(σ² + eps)`, `A = γ_{n+1}·mean|x|` (the first pass's mean error),
//!   `E₁ = γ_{n+2}·(mean|x − μ| + 2A)` and `ε_v = γ_{n+4}·(σ² + A²) + 2A·E₁ + E₁² + γ₂·(A + E₁)²`:
//!   a row's offset enters only through `A`, at second order (`layer_norm_tol` in
//!   `tests/ops.rs` derives it);
//! * [`softmax`]: `y_j·(u·|x_j − m| + 2·EXP_REL_ERR + γ_n + 2u + Σₖ yₖ·u·|x_k − m|)`, `m` the
//!   row maximum, plus `2⁻¹²⁵` (terms below `e^−87.3` flush to 0);
//! * GELU (erf): `0.5·|x|·(ERF_ABS_ERR + 2u) + u·|y|`;
//! * GELU (tanh): `|y|·((1 − σ)·(EXP_REL_ERR + 6u·|2y'|) + 3u) + |x|·e⁻⁷⁹`, with
//!   `y' = √(2/π)·(x + 0.044715·x³)` and `σ = σ(2y')`;
//! * [`gated_activation`]: `|up|` times the activation's bound, plus `u·|y|`.

use crate::{Isa, Parallelism};
use rayon::prelude::*;
use tessera_core::shape::{check_dim, check_len, check_matrix};
use tessera_core::{Element, Error, MatMut, MatRef, Result};

mod kernel;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

pub use kernel::ERF_ABS_ERR;
pub use tessera_core::reference::ops::{Activation, L2_NORM_MIN};

/// Largest relative error of the vectorized `exp` that softmax and GELU (tanh) use (every
/// variant); their tolerances are derived from it.
pub use crate::simd::EXP_REL_ERR;

/// Calls with at least this many elements (`rows × cols`) split their rows between threads;
/// smaller ones run on the calling thread.
pub const PAR_MIN_ELEMS: usize = 32 * 1024;

/// Elements per parallel task at least (rows are never split).
const TASK_MIN_ELEMS: usize = 8 * 1024;

/// How the `*_with` functions run.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpsOptions {
    /// Instruction set (`None`: the best this CPU has, [`Isa::detect`]).
    pub isa: Option<Isa>,
    /// Threads.
    pub parallelism: Parallelism,
}

/// A block of rows for one kernel call: up to three `rows x cols` operands and two
/// `cols`-long vectors. Unused pointers are null.
///
/// * `x` (leading dimension `ldx`): the input (`gate` of a gated activation), readable;
/// * `y` (`ldy`): the second input (`up`, or the addend of `add`), readable;
/// * `out` (`ldo`): the output, writable; it may be `x` itself (in-place operations), but
///   never overlaps `x` or `y` otherwise;
/// * `weight`, `bias`: `cols` floats each, readable;
/// * `eps`: the norms' epsilon.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
    pub rows: usize,
    pub cols: usize,
    pub x: *const f32,
    pub ldx: usize,
    pub y: *const f32,
    pub ldy: usize,
    pub out: *mut f32,
    pub ldo: usize,
    pub weight: *const f32,
    pub bias: *const f32,
    pub eps: f32,
}

// SAFETY: a `Rows` only describes memory borrowed by the public call that made it, which
// outlives the parallel section; tasks get disjoint row ranges of `out` and only read the
// other operands.
unsafe impl Send for Rows {}
// SAFETY: as above.
unsafe impl Sync for Rows {}

impl Rows {
    /// `n` rows starting at row `r0` (`r0 + n <= rows`). Wrapping pointer arithmetic: the
    /// result is only dereferenced inside the validated operands.
    fn block(&self, r0: usize, n: usize) -> Rows {
        Rows {
            rows: n,
            x: self.x.wrapping_add(r0 * self.ldx),
            y: self.y.wrapping_add(r0 * self.ldy),
            out: self.out.wrapping_add(r0 * self.ldo),
            ..*self
        }
    }
}

/// An embedding gather: `rows` output rows of `cols` floats (`out`, leading dimension
/// `ldo`), row `i` copied from table row `ids[i]` (`table`, leading dimension `ldt`), every id
/// already checked to be in range.
pub(crate) struct Gather<T> {
    pub rows: usize,
    pub cols: usize,
    pub table: *const T,
    pub ldt: usize,
    pub ids: *const u32,
    pub out: *mut f32,
    pub ldo: usize,
}

impl<T> Clone for Gather<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Gather<T> {}
// SAFETY: as for `Rows`: borrowed memory that outlives the parallel section, disjoint output
// rows per task, shared read-only inputs (`T: Element` is plain data).
unsafe impl<T: Element> Send for Gather<T> {}
// SAFETY: as above.
unsafe impl<T: Element> Sync for Gather<T> {}

impl<T> Gather<T> {
    /// `n` output rows starting at row `r0`.
    fn block(&self, r0: usize, n: usize) -> Gather<T> {
        Gather {
            rows: n,
            ids: self.ids.wrapping_add(r0),
            out: self.out.wrapping_add(r0 * self.ldo),
            ..*self
        }
    }
}

/// The entry points of one instruction set's variant. Each takes a block of rows whose
/// pointers satisfy the contract of [`Rows`] (or [`Gather`]).
pub(crate) struct Kernels<T> {
    pub layer_norm: unsafe fn(&Rows),
    pub rms_norm: unsafe fn(&Rows),
    pub softmax: unsafe fn(&Rows),
    pub activation: unsafe fn(Activation, &Rows),
    pub gated: unsafe fn(Activation, &Rows),
    pub add: unsafe fn(&Rows),
    pub add_bias: unsafe fn(&Rows),
    pub scale: unsafe fn(&Rows),
    pub l2_normalize: unsafe fn(&Rows),
    pub gather: unsafe fn(&Gather<T>),
}

/// Defines a variant's `#[target_feature]` entry points and its `kernels()` table.
macro_rules! ops_variant {
    ($simd:ty $(, $features:literal)?) => {
        use super::{kernel, Activation, Gather, Kernels, Rows};
        use tessera_core::Element;

        $(#[target_feature(enable = $features)])?
        unsafe fn layer_norm(a: &Rows) {
            // SAFETY: ISA checked by `kernels`; the driver upholds the contract of `Rows`.
            unsafe { kernel::layer_norm::<$simd>(a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn rms_norm(a: &Rows) {
            // SAFETY: as above.
            unsafe { kernel::rms_norm::<$simd>(a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn softmax(a: &Rows) {
            // SAFETY: as above.
            unsafe { kernel::softmax::<$simd>(a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn activation(act: Activation, a: &Rows) {
            // SAFETY: as above.
            unsafe { kernel::activation::<$simd>(act, a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn gated(act: Activation, a: &Rows) {
            // SAFETY: as above.
            unsafe { kernel::gated::<$simd>(act, a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn add(a: &Rows) {
            // SAFETY: as above.
            unsafe { kernel::add::<$simd>(a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn add_bias(a: &Rows) {
            // SAFETY: as above.
            unsafe { kernel::add_bias::<$simd>(a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn scale(a: &Rows) {
            // SAFETY: as above.
            unsafe { kernel::scale::<$simd>(a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn l2_normalize(a: &Rows) {
            // SAFETY: as above.
            unsafe { kernel::l2_normalize::<$simd>(a) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn gather<T: Element>(g: &Gather<T>) {
            // SAFETY: ISA checked by `kernels`; the driver upholds the contract of `Gather`.
            unsafe { kernel::gather::<$simd, T>(g) }
        }

        /// This variant's kernel table. Only hand it out after checking the ISA.
        pub(crate) fn kernels<T: Element>() -> Kernels<T> {
            Kernels {
                layer_norm,
                rms_norm,
                softmax,
                activation,
                gated,
                add,
                add_bias,
                scale,
                l2_normalize,
                gather: gather::<T>,
            }
        }
    };
}
use ops_variant;

/// The kernel table for `isa` (or the best one), after checking that this CPU runs it.
fn kernels<T: Element>(opts: &OpsOptions) -> Result<Kernels<T>> {
    let isa = opts.isa.unwrap_or_else(Isa::detect);
    isa.check()?;
    match isa {
        Isa::Scalar => Ok(scalar::kernels()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Ok(avx2::kernels()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Ok(avx512::kernels()),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Ok(neon::kernels()),
        #[allow(unreachable_patterns)]
        _ => Err(Error::IsaUnavailable { isa: isa.name() }),
    }
}

/// Calls `f(r0, n)` for blocks of rows covering `0..rows`: one block on the calling thread
/// for small calls, otherwise blocks of whole rows run as rayon tasks.
fn for_row_blocks(rows: usize, cols: usize, par: Parallelism, f: impl Fn(usize, usize) + Sync) {
    let threads = par.threads();
    let elems = rows.saturating_mul(cols);
    if threads <= 1 || rows < 2 || elems < PAR_MIN_ELEMS {
        f(0, rows);
        return;
    }
    let tasks = threads.min(rows).min(elems / TASK_MIN_ELEMS).max(1);
    let per = rows.div_ceil(tasks);
    let tasks = rows.div_ceil(per);
    (0..tasks).into_par_iter().for_each(|t| {
        let r0 = t * per;
        f(r0, per.min(rows - r0));
    });
}

/// Validates a matrix operand against its slice.
fn check_mat(name: &'static str, rows: usize, cols: usize, ld: usize, len: usize) -> Result<()> {
    check_matrix(name, rows, cols, ld, len).map(|_| ())
}

/// Checks that operand `name` is `rows x cols` like `x` (named `of`).
fn check_shape(
    name: &str,
    of: &str,
    (r, c): (usize, usize),
    (rows, cols): (usize, usize),
) -> Result<()> {
    check_dim(&format!("rows of {name} vs rows of {of}"), r, rows)?;
    check_dim(&format!("columns of {name} vs columns of {of}"), c, cols)
}

/// A `Rows` with only `out` (in place: `x == out`).
fn in_place(x: &mut MatMut<'_, f32>) -> Rows {
    let p = x.data.as_mut_ptr();
    Rows {
        rows: x.rows,
        cols: x.cols,
        x: p,
        ldx: x.ld,
        y: std::ptr::null(),
        ldy: 0,
        out: p,
        ldo: x.ld,
        weight: std::ptr::null(),
        bias: std::ptr::null(),
        eps: 0.0,
    }
}

/// Runs `k` over every row block of `a` (nothing for an empty matrix).
fn run(a: Rows, par: Parallelism, k: impl Fn(&Rows) + Sync) {
    if a.rows == 0 || a.cols == 0 {
        return;
    }
    for_row_blocks(a.rows, a.cols, par, |r0, n| k(&a.block(r0, n)));
}

/// Layer norm (`torch.nn.LayerNorm` over the last dimension) with the best instruction set
/// and all threads: for each row, `out = (x − μ)/√(σ² + eps)·weight + bias`, `μ` the row
/// mean and `σ²` its biased variance. See [`layer_norm_with`].
///
/// # Errors
/// As [`layer_norm_with`].
pub fn layer_norm(
    x: MatRef<'_, f32>,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: MatMut<'_, f32>,
) -> Result<()> {
    layer_norm_with(&OpsOptions::default(), x, weight, bias, eps, out)
}

/// [`layer_norm`] with an explicit instruction set and thread count.
///
/// Squares of the centered values are summed in f32: a row whose spread exceeds ~1e19
/// overflows (its output is NaN or 0), as in PyTorch's f32 kernel.
///
/// # Errors
/// `x` or `out` too short for its shape ([`Error::SliceTooShort`]) or with `ld < cols`
/// ([`Error::LeadingDimension`]); `out` not of `x`'s shape ([`Error::ShapeMismatch`]);
/// `weight` or `bias` not `cols` long ([`Error::LengthMismatch`]); `opts.isa` not available
/// ([`Error::IsaUnavailable`]).
pub fn layer_norm_with(
    opts: &OpsOptions,
    x: MatRef<'_, f32>,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    mut out: MatMut<'_, f32>,
) -> Result<()> {
    check_mat("x", x.rows, x.cols, x.ld, x.data.len())?;
    check_mat("out", out.rows, out.cols, out.ld, out.data.len())?;
    check_shape("out", "x", (out.rows, out.cols), (x.rows, x.cols))?;
    check_len("weight", x.cols, weight.len())?;
    check_len("bias", x.cols, bias.len())?;
    let k = kernels::<f32>(opts)?;
    let a = Rows {
        x: x.data.as_ptr(),
        ldx: x.ld,
        weight: weight.as_ptr(),
        bias: bias.as_ptr(),
        eps,
        ..in_place(&mut out)
    };
    // SAFETY: ISA checked; x and out were validated for rows x cols at their leading
    // dimensions, weight and bias hold cols floats; out is a distinct &mut borrow.
    run(a, opts.parallelism, |b| unsafe { (k.layer_norm)(b) });
    Ok(())
}

/// RMS norm (T5's `T5LayerNorm`) with the best instruction set and all threads: for each
/// row, `out = x/√(mean(x²) + eps)·weight` (no mean subtraction, no bias). See
/// [`rms_norm_with`].
///
/// # Errors
/// As [`rms_norm_with`].
pub fn rms_norm(x: MatRef<'_, f32>, weight: &[f32], eps: f32, out: MatMut<'_, f32>) -> Result<()> {
    rms_norm_with(&OpsOptions::default(), x, weight, eps, out)
}

/// [`rms_norm`] with an explicit instruction set and thread count.
///
/// Squares are summed in f32: a row with values above ~1e19 overflows (as in PyTorch).
///
/// # Errors
/// As [`layer_norm_with`], without `bias`.
pub fn rms_norm_with(
    opts: &OpsOptions,
    x: MatRef<'_, f32>,
    weight: &[f32],
    eps: f32,
    mut out: MatMut<'_, f32>,
) -> Result<()> {
    check_mat("x", x.rows, x.cols, x.ld, x.data.len())?;
    check_mat("out", out.rows, out.cols, out.ld, out.data.len())?;
    check_shape("out", "x", (out.rows, out.cols), (x.rows, x.cols))?;
    check_len("weight", x.cols, weight.len())?;
    let k = kernels::<f32>(opts)?;
    let a = Rows {
        x: x.data.as_ptr(),
        ldx: x.ld,
        weight: weight.as_ptr(),
        eps,
        ..in_place(&mut out)
    };
    // SAFETY: as in `layer_norm_with`.
    run(a, opts.parallelism, |b| unsafe { (k.rms_norm)(b) });
    Ok(())
}

/// Row-wise softmax in place, with the best instruction set and all threads. See
/// [`softmax_with`].
///
/// # Errors
/// As [`softmax_with`].
pub fn softmax(x: MatMut<'_, f32>) -> Result<()> {
    softmax_with(&OpsOptions::default(), x)
}

/// Row-wise softmax in place: `x_j ← exp(x_j − m)/Σₖ exp(x_k − m)`, `m` the row maximum.
///
/// `−∞` entries (masked positions) get exactly 0. A row whose entries are all `−∞` becomes
/// all zeros (nothing to attend to), never NaN. A row holding a NaN or a `+∞` becomes all NaN
/// (IEEE arithmetic of the formula: `∞ − ∞`).
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`; `opts.isa` not available.
pub fn softmax_with(opts: &OpsOptions, mut x: MatMut<'_, f32>) -> Result<()> {
    check_mat("x", x.rows, x.cols, x.ld, x.data.len())?;
    let k = kernels::<f32>(opts)?;
    let a = in_place(&mut x);
    // SAFETY: ISA checked; x validated for rows x cols at its leading dimension.
    run(a, opts.parallelism, |b| unsafe { (k.softmax)(b) });
    Ok(())
}

/// An activation function applied in place to every element, with the best instruction set
/// and all threads. See [`activation_with`].
///
/// # Errors
/// As [`activation_with`].
pub fn activation(act: Activation, x: MatMut<'_, f32>) -> Result<()> {
    activation_with(&OpsOptions::default(), act, x)
}

/// An activation function applied in place to every element:
///
/// * [`Activation::Relu`]: `max(x, 0)`, exact (NaN stays NaN);
/// * [`Activation::GeluErf`]: `0.5·x·(1 + erf(x/√2))` (HF `"gelu"`), with an `erf` of
///   absolute error at most [`ERF_ABS_ERR`]: `|error| <= 0.5·|x|·(ERF_ABS_ERR + 2u) + u·|out|`
///   with `u = 2⁻²⁴`;
/// * [`Activation::GeluTanh`]: `0.5·x·(1 + tanh(y))`, `y = √(2/π)·(x + 0.044715·x³)`
///   (HF `"gelu_new"` / `"gelu_pytorch_tanh"`), computed as `x·σ(2y) = x/(1 + exp(−2y))`:
///   relative error at most `(1 − σ)·(EXP_REL_ERR + 6u·|2y|) + 3u`, and exactly `0·x` where
///   `2y < −80` (an absolute error below `|x|·e⁻⁸⁰`);
/// * [`Activation::Tanh`]: `tanh(x)`, as `±(1 − e)/(1 + e)` with `e = exp(−2|x|)`: relative
///   error at most `(2e/(1 − e²))·(EXP_REL_ERR + 2u·|2x|) + 3u`; below `|x| = 0.0625`, an odd
///   polynomial to `x⁷`, relative error at most `4u`.
///
/// `+∞` maps to `+∞` (tanh: 1); `−∞` to 0 (ReLU), −1 (tanh) or NaN (both GELUs: `−∞·0`, as
/// the formulas give).
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`; `opts.isa` not available.
pub fn activation_with(opts: &OpsOptions, act: Activation, mut x: MatMut<'_, f32>) -> Result<()> {
    check_mat("x", x.rows, x.cols, x.ld, x.data.len())?;
    let k = kernels::<f32>(opts)?;
    let a = in_place(&mut x);
    // SAFETY: ISA checked; x validated for rows x cols at its leading dimension.
    run(a, opts.parallelism, |b| unsafe { (k.activation)(act, b) });
    Ok(())
}

/// Gated activation `out = act(gate) ⊙ up` (T5 v1.1's gated GELU: `act(wi_0·x) * wi_1·x`),
/// with the best instruction set and all threads. See [`gated_activation_with`].
///
/// # Errors
/// As [`gated_activation_with`].
pub fn gated_activation(
    act: Activation,
    gate: MatRef<'_, f32>,
    up: MatRef<'_, f32>,
    out: MatMut<'_, f32>,
) -> Result<()> {
    gated_activation_with(&OpsOptions::default(), act, gate, up, out)
}

/// [`gated_activation`] with an explicit instruction set and thread count. `gate` and `up`
/// may be column slices of one matrix (e.g. the output of one fused `[wi_0; wi_1]` GEMM, with
/// `ld` twice the width). Each element is `act(gate)` as [`activation_with`] computes it,
/// times `up` (one more rounding).
///
/// # Errors
/// `gate`, `up` or `out` too short for its shape or with `ld < cols`; `up` or `out` not of
/// `gate`'s shape; `opts.isa` not available.
pub fn gated_activation_with(
    opts: &OpsOptions,
    act: Activation,
    gate: MatRef<'_, f32>,
    up: MatRef<'_, f32>,
    mut out: MatMut<'_, f32>,
) -> Result<()> {
    check_mat("gate", gate.rows, gate.cols, gate.ld, gate.data.len())?;
    check_mat("up", up.rows, up.cols, up.ld, up.data.len())?;
    check_mat("out", out.rows, out.cols, out.ld, out.data.len())?;
    check_shape("up", "gate", (up.rows, up.cols), (gate.rows, gate.cols))?;
    check_shape("out", "gate", (out.rows, out.cols), (gate.rows, gate.cols))?;
    let k = kernels::<f32>(opts)?;
    let a = Rows {
        x: gate.data.as_ptr(),
        ldx: gate.ld,
        y: up.data.as_ptr(),
        ldy: up.ld,
        ..in_place(&mut out)
    };
    // SAFETY: ISA checked; gate, up and out validated for rows x cols at their leading
    // dimensions; out is a distinct &mut borrow.
    run(a, opts.parallelism, |b| unsafe { (k.gated)(act, b) });
    Ok(())
}

/// Embedding gather with the best instruction set and all threads: row `i` of `out` is row
/// `ids[i]` of `table`, widened to f32. See [`embedding_with`].
///
/// # Errors
/// As [`embedding_with`].
pub fn embedding<T: Element>(
    table: MatRef<'_, T>,
    ids: &[u32],
    out: MatMut<'_, f32>,
) -> Result<()> {
    embedding_with(&OpsOptions::default(), table, ids, out)
}

/// [`embedding`] with an explicit instruction set and thread count. The table may hold
/// f32, f16 or bf16 (widening is exact); `out` must be `ids.len() x table.cols`.
///
/// # Errors
/// `table` or `out` too short for its shape or with `ld < cols`; `out` not
/// `ids.len() x table.cols` ([`Error::ShapeMismatch`]); an id not below `table.rows`
/// ([`Error::InvalidArgument`] naming the first such id and its index; nothing is written);
/// `opts.isa` not available.
pub fn embedding_with<T: Element>(
    opts: &OpsOptions,
    table: MatRef<'_, T>,
    ids: &[u32],
    out: MatMut<'_, f32>,
) -> Result<()> {
    check_mat("table", table.rows, table.cols, table.ld, table.data.len())?;
    check_mat("out", out.rows, out.cols, out.ld, out.data.len())?;
    check_dim("rows of out vs the number of ids", out.rows, ids.len())?;
    check_dim("columns of out vs columns of table", out.cols, table.cols)?;
    if let Some(i) = ids.iter().position(|&id| id as usize >= table.rows) {
        return Err(Error::InvalidArgument(format!(
            "ids[{i}] = {} is out of range for an embedding table of {} rows",
            ids[i], table.rows
        )));
    }
    let k = kernels::<T>(opts)?;
    if ids.is_empty() || table.cols == 0 {
        return Ok(());
    }
    let g = Gather {
        rows: ids.len(),
        cols: table.cols,
        table: table.data.as_ptr(),
        ldt: table.ld,
        ids: ids.as_ptr(),
        out: out.data.as_mut_ptr(),
        ldo: out.ld,
    };
    for_row_blocks(g.rows, g.cols, opts.parallelism, |r0, n| {
        // SAFETY: ISA checked; every id is below table.rows, so each source row is inside the
        // validated table; out validated for ids.len() x cols.
        unsafe { (k.gather)(&g.block(r0, n)) }
    });
    Ok(())
}

/// Residual add `x += y` with the best instruction set and all threads. See [`add_with`].
///
/// # Errors
/// As [`add_with`].
pub fn add(x: MatMut<'_, f32>, y: MatRef<'_, f32>) -> Result<()> {
    add_with(&OpsOptions::default(), x, y)
}

/// Elementwise `x += y` (a residual connection), exactly rounded.
///
/// # Errors
/// `x` or `y` too short for its shape or with `ld < cols`; `y` not of `x`'s shape;
/// `opts.isa` not available.
pub fn add_with(opts: &OpsOptions, mut x: MatMut<'_, f32>, y: MatRef<'_, f32>) -> Result<()> {
    check_mat("x", x.rows, x.cols, x.ld, x.data.len())?;
    check_mat("y", y.rows, y.cols, y.ld, y.data.len())?;
    check_shape("y", "x", (y.rows, y.cols), (x.rows, x.cols))?;
    let k = kernels::<f32>(opts)?;
    let a = Rows {
        y: y.data.as_ptr(),
        ldy: y.ld,
        ..in_place(&mut x)
    };
    // SAFETY: ISA checked; x and y validated for rows x cols at their leading dimensions;
    // x is a &mut borrow, so y does not overlap it.
    run(a, opts.parallelism, |b| unsafe { (k.add)(b) });
    Ok(())
}

/// Bias add `x[r, c] += bias[c]` with the best instruction set and all threads. See
/// [`add_bias_with`].
///
/// # Errors
/// As [`add_bias_with`].
pub fn add_bias(x: MatMut<'_, f32>, bias: &[f32]) -> Result<()> {
    add_bias_with(&OpsOptions::default(), x, bias)
}

/// `x[r, c] += bias[c]` for every row (a `Linear` layer's bias after its GEMM), exactly
/// rounded.
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`; `bias` not `cols` long; `opts.isa` not
/// available.
pub fn add_bias_with(opts: &OpsOptions, mut x: MatMut<'_, f32>, bias: &[f32]) -> Result<()> {
    check_mat("x", x.rows, x.cols, x.ld, x.data.len())?;
    check_len("bias", x.cols, bias.len())?;
    let k = kernels::<f32>(opts)?;
    let a = Rows {
        bias: bias.as_ptr(),
        ..in_place(&mut x)
    };
    // SAFETY: ISA checked; x validated for rows x cols, bias holds cols floats.
    run(a, opts.parallelism, |b| unsafe { (k.add_bias)(b) });
    Ok(())
}

/// `x *= factor` with the best instruction set and all threads. See [`scale_with`].
///
/// # Errors
/// As [`scale_with`].
pub fn scale(x: MatMut<'_, f32>, factor: f32) -> Result<()> {
    scale_with(&OpsOptions::default(), x, factor)
}

/// Elementwise `x *= factor` (e.g. T5's `d_model^-0.5` rescale before a quantized head),
/// exactly rounded.
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`; `opts.isa` not available.
pub fn scale_with(opts: &OpsOptions, mut x: MatMut<'_, f32>, factor: f32) -> Result<()> {
    check_mat("x", x.rows, x.cols, x.ld, x.data.len())?;
    let k = kernels::<f32>(opts)?;
    let a = Rows {
        eps: factor,
        ..in_place(&mut x)
    };
    // SAFETY: ISA checked; x validated for rows x cols at its leading dimension.
    run(a, opts.parallelism, |b| unsafe { (k.scale)(b) });
    Ok(())
}

/// L2 normalization of every row in place with the best instruction set and all threads.
/// See [`l2_normalize_with`].
///
/// # Errors
/// As [`l2_normalize_with`].
pub fn l2_normalize(x: MatMut<'_, f32>) -> Result<()> {
    l2_normalize_with(&OpsOptions::default(), x)
}

/// Each row divided by `max(‖row‖₂, 1e-12)` in place ([`L2_NORM_MIN`];
/// `torch.nn.functional.normalize` as sentence-transformers uses it). A zero row stays zero.
/// Squares are summed in f32 (values above ~1e19 overflow, as in PyTorch).
///
/// # Errors
/// `x` too short for its shape or with `ld < cols`; `opts.isa` not available.
pub fn l2_normalize_with(opts: &OpsOptions, mut x: MatMut<'_, f32>) -> Result<()> {
    check_mat("x", x.rows, x.cols, x.ld, x.data.len())?;
    let k = kernels::<f32>(opts)?;
    let a = in_place(&mut x);
    // SAFETY: ISA checked; x validated for rows x cols at its leading dimension.
    run(a, opts.parallelism, |b| unsafe { (k.l2_normalize)(b) });
    Ok(())
}
