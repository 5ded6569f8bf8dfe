//! The `ops` family on the GPU (`cuda/ops.cu`): layer norm, RMS norm, softmax, activations
//! (ReLU, GELU with `erf` and with `tanh`, tanh), gated activations, embedding gather, residual
//! and bias adds, scaling, L2 normalization, narrowing f32 to f16 / bf16 ([`narrow`]) and mean
//! pooling over the rows of each sequence ([`mean_rows`]).
//!
//! The API mirrors `tessera_cpu::ops` with device buffers: every function takes the
//! [`Device`], a [`DevMat`] shape (rows, columns, leading dimension; row-major f32) for each
//! matrix operand next to its buffer (`&impl DevicePtr<f32>` to read, `&mut impl
//! DevicePtrMut<f32>` to write), and device buffers for the `cols`-long parameter vectors
//! (weight, bias). Semantics are those of [`tessera_core::reference::ops`] (PyTorch / Hugging
//! Face `transformers`), special values included. [`narrow`] writes f16 / bf16 (`T`) and
//! [`mean_rows`] takes host `lengths`, as [`embedding`] takes host ids.
//!
//! Every function validates everything on the host before anything is enqueued: each buffer
//! long enough for its shape and leading dimension (`ld >= cols`, no overflow), shapes that
//! must agree, vector lengths equal to `cols`, embedding ids below the table's rows, sequence
//! lengths in `1..=seq`, and every size within the kernels' 32-bit `int` and the grid limits;
//! a failure is [`Error::Invalid`](crate::Error::Invalid) and nothing is launched. The same
//! checks are available without a device as the `validate_*` functions. A matrix with 0 rows
//! or 0 columns is valid and nothing is launched. Kernels are enqueued on [`Device::stream`]
//! and not waited for: a fault shows up at the next synchronizing call
//! ([`Device::synchronize`], [`Device::download`]).
//!
//! # Kernels
//! `cuda/ops.cu`'s header states each kernel's mapping and launch geometry. In short: the row
//! operations (norms, softmax, L2) reduce each row with one warp (rows up to 1024 columns, four
//! rows per 128-thread block) or one block (128 or 512 threads, up to 16384 columns) holding
//! the row in registers, so the row is read once and written once; longer rows stream it two
//! or three times ([`row_variant`]). Elementwise kernels and the gather use a 2-D grid of
//! 256-thread blocks over (column chunks, rows). Accesses are float4 wide when every operand
//! starts 16-byte aligned (a [`narrow`] output 8-byte aligned: four 2-byte values per store)
//! and every leading dimension is a multiple of 4 (a partial chunk at the end of a row goes
//! element by element), scalar otherwise. [`mean_rows`] runs one thread per (sequence,
//! column), 256-thread blocks over the columns, one grid row per sequence (stepping past
//! 65535). Only columns `0..cols` of a row are ever touched, never the padding up to `ld`.
//! Results are deterministic: the same inputs, shapes and alignment give the same bits.
//!
//! # Accuracy
//! Arithmetic is IEEE f32 (NVRTC without fast math: correctly rounded division and square
//! root, denormals kept), with the CUDA math library's `expf`, `erfcf` and `tanhf`, whose
//! documented error bounds are [`EXP_REL_ERR`], [`ERFC_REL_ERR`] and [`TANH_REL_ERR`]. The
//! norms use the CPU kernels' algorithms (layer norm: the corrected two-pass mean and
//! variance), so the CPU crate's error bounds hold with those constants: [`add`],
//! [`add_bias`], [`scale`] are correctly rounded, [`embedding`] and ReLU exact; [`narrow`] is
//! exact rounding (round to nearest even, bit-identical to `half::f16::from_f32` /
//! `half::bf16::from_f32`, NaN bits included); [`mean_rows`] is within
//! `γ_len·Σ|x|/len + u·|result|` (`u = 2⁻²⁴`, `γ_k = ku/(1 − ku)`); see each function for
//! the rest.

use crate::compile::Family;
use crate::error::DriverContext;
use crate::launch::{dim_i32, grid};
use crate::{Device, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use tessera_core::shape::{check_dim, check_len, check_matrix};
use tessera_core::{DType, Element, f16};

pub use tessera_core::reference::ops::{Activation, L2_NORM_MIN};

/// Largest relative error of the CUDA math library's `expf` (2 ulp over its full range, CUDA
/// Math API documentation), for a normal result; softmax and GELU (tanh) use it.
pub const EXP_REL_ERR: f32 = 2.0 * f32::EPSILON;

/// Largest relative error of `erfcf` (4 ulp over its full range), for a normal result; GELU
/// (erf) uses it.
pub const ERFC_REL_ERR: f32 = 4.0 * f32::EPSILON;

/// Largest relative error of `tanhf` (2 ulp over its full range), for a normal result.
pub const TANH_REL_ERR: f32 = 2.0 * f32::EPSILON;

/// Rows up to this many columns are held in registers by the row kernels (read once); longer
/// rows are streamed from memory two or three times.
pub const ROW_CACHE_MAX_COLS: usize = 16384;

/// The shape of a row-major matrix operand in a device buffer: `rows x cols`, row `r` at
/// element `r·ld` of the buffer (`ld >= cols`; the elements between `cols` and `ld` are never
/// touched). The buffer must hold at least `(rows − 1)·ld + cols` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevMat {
    /// Rows.
    pub rows: usize,
    /// Columns (elements per row).
    pub cols: usize,
    /// Leading dimension: elements from the start of one row to the start of the next.
    pub ld: usize,
}

impl DevMat {
    /// A `rows x cols` matrix with leading dimension `ld`.
    pub const fn new(rows: usize, cols: usize, ld: usize) -> DevMat {
        DevMat { rows, cols, ld }
    }

    /// A contiguous `rows x cols` matrix (`ld == cols`).
    pub const fn dense(rows: usize, cols: usize) -> DevMat {
        DevMat {
            rows,
            cols,
            ld: cols,
        }
    }

    /// Whether the matrix has no element (0 rows or 0 columns).
    pub const fn is_empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }
}

// ---------------------------------------------------------------------------------------
// Host-side validation.

/// Checks a matrix operand against its buffer length.
fn check_mat(name: &'static str, m: DevMat, len: usize) -> Result<()> {
    check_matrix(name, m.rows, m.cols, m.ld, len)?;
    Ok(())
}

/// Checks that `m`'s dimensions fit the kernels' `int`.
fn check_fits(name: &str, m: DevMat) -> Result<()> {
    dim_i32(&format!("rows of {name}"), m.rows)?;
    dim_i32(&format!("columns of {name}"), m.cols)?;
    dim_i32(&format!("leading dimension of {name}"), m.ld)?;
    Ok(())
}

/// Checks that `m` (named `name`) is of `of`'s shape (named `of_name`).
fn check_shape(name: &str, m: DevMat, of_name: &str, of: DevMat) -> Result<()> {
    check_dim(
        &format!("rows of {name} vs rows of {of_name}"),
        m.rows,
        of.rows,
    )?;
    check_dim(
        &format!("columns of {name} vs columns of {of_name}"),
        m.cols,
        of.cols,
    )?;
    Ok(())
}

/// The checks of [`layer_norm`], without a device: `x` and `out` hold their shapes
/// (`*_len` elements), `out` is `x`'s shape, `weight` and `bias` are `cols` long, every size
/// fits the kernels' `int`.
///
/// # Errors
/// [`Error::Invalid`](crate::Error::Invalid) with, in this order of checking:
/// `SliceTooShort` / `LeadingDimension` / `Overflow` (x, then out), `ShapeMismatch`,
/// `LengthMismatch` (weight, then bias), `Overflow` (a size beyond `i32::MAX`).
pub fn validate_layer_norm(
    x: DevMat,
    x_len: usize,
    weight_len: usize,
    bias_len: usize,
    out: DevMat,
    out_len: usize,
) -> Result<()> {
    check_mat("x", x, x_len)?;
    check_mat("out", out, out_len)?;
    check_shape("out", out, "x", x)?;
    check_len("weight", x.cols, weight_len)?;
    check_len("bias", x.cols, bias_len)?;
    check_fits("x", x)?;
    check_fits("out", out)
}

/// The checks of [`rms_norm`], without a device (as [`validate_layer_norm`], no bias).
///
/// # Errors
/// As [`validate_layer_norm`].
pub fn validate_rms_norm(
    x: DevMat,
    x_len: usize,
    weight_len: usize,
    out: DevMat,
    out_len: usize,
) -> Result<()> {
    check_mat("x", x, x_len)?;
    check_mat("out", out, out_len)?;
    check_shape("out", out, "x", x)?;
    check_len("weight", x.cols, weight_len)?;
    check_fits("x", x)?;
    check_fits("out", out)
}

/// The checks of the in-place operations ([`softmax`], [`activation`], [`scale`],
/// [`l2_normalize`]), without a device: `x` holds its shape, every size fits an `int`.
///
/// # Errors
/// [`Error::Invalid`](crate::Error::Invalid): `SliceTooShort`, `LeadingDimension` or
/// `Overflow`.
pub fn validate_in_place(x: DevMat, x_len: usize) -> Result<()> {
    check_mat("x", x, x_len)?;
    check_fits("x", x)
}

/// The checks of [`gated_activation`], without a device: every operand holds its shape,
/// `up` and `out` are `gate`'s shape, every size fits an `int`.
///
/// # Errors
/// [`Error::Invalid`](crate::Error::Invalid): `SliceTooShort` / `LeadingDimension` /
/// `Overflow` (gate, up, out), then `ShapeMismatch` (up, then out), then `Overflow`.
pub fn validate_gated(
    gate: DevMat,
    gate_len: usize,
    up: DevMat,
    up_len: usize,
    out: DevMat,
    out_len: usize,
) -> Result<()> {
    check_mat("gate", gate, gate_len)?;
    check_mat("up", up, up_len)?;
    check_mat("out", out, out_len)?;
    check_shape("up", up, "gate", gate)?;
    check_shape("out", out, "gate", gate)?;
    check_fits("gate", gate)?;
    check_fits("up", up)?;
    check_fits("out", out)
}

/// The checks of [`add`], without a device: `x` and `y` hold their shapes, `y` is `x`'s
/// shape, every size fits an `int`.
///
/// # Errors
/// [`Error::Invalid`](crate::Error::Invalid): `SliceTooShort` / `LeadingDimension` /
/// `Overflow` (x, then y), `ShapeMismatch`, `Overflow`.
pub fn validate_add(x: DevMat, x_len: usize, y: DevMat, y_len: usize) -> Result<()> {
    check_mat("x", x, x_len)?;
    check_mat("y", y, y_len)?;
    check_shape("y", y, "x", x)?;
    check_fits("x", x)?;
    check_fits("y", y)
}

/// The checks of [`add_bias`], without a device: `x` holds its shape, `bias` is `cols` long,
/// every size fits an `int`.
///
/// # Errors
/// [`Error::Invalid`](crate::Error::Invalid): `SliceTooShort` / `LeadingDimension` /
/// `Overflow`, `LengthMismatch`, `Overflow`.
pub fn validate_add_bias(x: DevMat, x_len: usize, bias_len: usize) -> Result<()> {
    check_mat("x", x, x_len)?;
    check_len("bias", x.cols, bias_len)?;
    check_fits("x", x)
}

/// The checks of [`embedding`], without a device: `table` and `out` hold their shapes, `out`
/// is `ids.len() x table.cols`, every id is below `table.rows`, every size fits an `int`.
///
/// # Errors
/// [`Error::Invalid`](crate::Error::Invalid): `SliceTooShort` / `LeadingDimension` /
/// `Overflow` (table, then out), `ShapeMismatch` (rows of out vs the number of ids, then
/// columns), `InvalidArgument` naming the first id out of range and its index (the CPU
/// kernel's message), `Overflow`.
pub fn validate_embedding(
    table: DevMat,
    table_len: usize,
    ids: &[u32],
    out: DevMat,
    out_len: usize,
) -> Result<()> {
    check_mat("table", table, table_len)?;
    check_mat("out", out, out_len)?;
    check_dim("rows of out vs the number of ids", out.rows, ids.len())?;
    check_dim("columns of out vs columns of table", out.cols, table.cols)?;
    if let Some(i) = ids.iter().position(|&id| id as usize >= table.rows) {
        return Err(tessera_core::Error::InvalidArgument(format!(
            "ids[{i}] = {} is out of range for an embedding table of {} rows",
            ids[i], table.rows
        ))
        .into());
    }
    check_fits("table", table)?;
    check_fits("out", out)
}

/// The checks of [`narrow`], without a device: `x` and `out` hold their shapes (`out` in
/// elements of its 2-byte type), `out` is `x`'s shape, every size fits an `int`. (The target
/// type is checked by [`narrow_kernel`].)
///
/// # Errors
/// [`Error::Invalid`](crate::Error::Invalid): `SliceTooShort` / `LeadingDimension` /
/// `Overflow` (x, then out), `ShapeMismatch`, `Overflow`.
pub fn validate_narrow(x: DevMat, x_len: usize, out: DevMat, out_len: usize) -> Result<()> {
    check_mat("x", x, x_len)?;
    check_mat("out", out, out_len)?;
    check_shape("out", out, "x", x)?;
    check_fits("x", x)?;
    check_fits("out", out)
}

/// The checks of [`mean_rows`], without a device: `x` and `out` hold their shapes, `x` has
/// `lengths.len()·seq` rows and `out` `lengths.len()` rows of `x`'s columns, every length is
/// in `1..=seq`, every size fits an `int`.
///
/// # Errors
/// [`Error::Invalid`](crate::Error::Invalid): `SliceTooShort` / `LeadingDimension` /
/// `Overflow` (x, then out), `Overflow` (`lengths.len()·seq` overflows), `ShapeMismatch`
/// (rows of x vs `lengths.len()·seq`, rows of out vs `lengths.len()`, then columns),
/// `InvalidArgument` naming the first length outside `1..=seq` and its index, `Overflow` (a
/// size beyond `i32::MAX`).
pub fn validate_mean_rows(
    x: DevMat,
    x_len: usize,
    seq: usize,
    lengths: &[usize],
    out: DevMat,
    out_len: usize,
) -> Result<()> {
    check_mat("x", x, x_len)?;
    check_mat("out", out, out_len)?;
    let rows = tessera_core::shape::checked_mul(lengths.len(), seq, "sequences x seq")?;
    check_dim("rows of x vs the number of lengths x seq", x.rows, rows)?;
    check_dim(
        "rows of out vs the number of lengths",
        out.rows,
        lengths.len(),
    )?;
    check_dim("columns of out vs columns of x", out.cols, x.cols)?;
    if let Some(i) = lengths.iter().position(|&l| l == 0 || l > seq) {
        return Err(tessera_core::Error::InvalidArgument(format!(
            "lengths[{i}] = {} is outside 1..={seq} (each sequence holds seq = {seq} rows)",
            lengths[i]
        ))
        .into());
    }
    check_fits("x", x)?;
    check_fits("out", out)
}

// ---------------------------------------------------------------------------------------
// Launch geometry (must match the header of cuda/ops.cu).

/// The row-kernel variant for rows of `cols` columns, the suffix of its kernel name in
/// `cuda/ops.cu`: `"w8"` (up to 256 columns: one warp per row, 8 floats per lane), `"w32"`
/// (up to 1024: one warp, 32 floats per lane), `"b128"` (up to 4096: a 128-thread block, 32
/// floats per thread), `"b512"` (up to [`ROW_CACHE_MAX_COLS`]: a 512-thread block), `"loop"`
/// (longer: a 512-thread block streaming the row).
pub fn row_variant(cols: usize) -> &'static str {
    match cols {
        0..=256 => "w8",
        257..=1024 => "w32",
        1025..=4096 => "b128",
        4097..=ROW_CACHE_MAX_COLS => "b512",
        _ => "loop",
    }
}

/// Kernel name and launch shape of row operation `op` over `rows x cols`.
fn row_launch(op: &str, rows: usize, cols: usize) -> Result<(String, LaunchConfig)> {
    let variant = row_variant(cols);
    let (threads, rows_per_block) = match variant {
        "w8" | "w32" => (128u32, 4usize),
        "b128" => (128, 1),
        _ => (512, 1),
    };
    let blocks = grid(&format!("rows of ops_{op}"), rows, rows_per_block, false)?;
    Ok((
        format!("ops_{op}_{variant}"),
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        },
    ))
}

/// Launch shape of an elementwise kernel (and the gather) over `rows x cols`: 256-thread
/// blocks `(bx, 256/bx)`, `bx` a power of two in 32..=256 covering a row's chunks, the grid
/// `(ceil(chunks/bx), min(ceil(rows/by), 65535))` (the kernels step over further rows).
fn elementwise_launch(rows: usize, cols: usize, vec: bool) -> Result<LaunchConfig> {
    let chunks = if vec { cols.div_ceil(4) } else { cols };
    let bx = chunks.next_power_of_two().clamp(32, 256);
    let by = 256 / bx;
    let gx = grid("column chunks of an elementwise op", chunks, bx, false)?;
    let gy = rows.div_ceil(by).clamp(1, 65_535) as u32;
    Ok(LaunchConfig {
        grid_dim: (gx, gy, 1),
        block_dim: (bx as u32, by as u32, 1),
        shared_mem_bytes: 0,
    })
}

/// A set of operands that are all contiguous (`ld == cols`) as one row of `rows·cols`
/// elements, when that fits an `int`: fewer idle threads for narrow matrices. Returns the
/// launched `(rows, cols, [ld; N])`.
fn flatten<const N: usize>(
    rows: usize,
    cols: usize,
    lds: [usize; N],
) -> (usize, usize, [usize; N]) {
    if rows > 1
        && lds.iter().all(|&ld| ld == cols)
        && let Some(n) = rows.checked_mul(cols)
        && n <= i32::MAX as usize
    {
        return (1, n, [n; N]);
    }
    (rows, cols, lds)
}

/// Whether float4 access is allowed: every pointer aligned to its `(pointer, bytes)`, and
/// every leading dimension a multiple of 4 (irrelevant for a single row).
fn vectorizable(rows: usize, ptrs: &[(u64, u64)], lds: &[usize]) -> bool {
    ptrs.iter().all(|&(p, a)| p % a == 0) && (rows <= 1 || lds.iter().all(|&ld| ld % 4 == 0))
}

/// `usize` already checked to fit an `int`, as the kernels' `int`.
fn int(what: &str, v: usize) -> Result<i32> {
    dim_i32(what, v)
}

// ---------------------------------------------------------------------------------------
// Row operations.

/// Layer norm (`torch.nn.LayerNorm` over the last dimension): for each row of `x`,
/// `out = (x − μ)/√(σ² + eps)·weight + bias`, `μ` the row mean and `σ²` its biased variance.
/// `weight` and `bias` hold `cols` floats each; `out` is a distinct buffer of `x`'s shape
/// (its own leading dimension).
///
/// Computed as the CPU kernel does (corrected two-pass: `μ₀ = Σx/n`, then `Σ(x − μ₀)` and
/// `Σ(x − μ₀)²`, reduced in f32), so its error bound holds: a row's offset from 0 enters only
/// at second order. A NaN or infinity in a row makes the row NaN. Squares are summed in f32:
/// a row whose spread exceeds ~1e19 overflows, as in PyTorch.
///
/// # Errors
/// As [`validate_layer_norm`], then a driver error if the launch fails.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    dev: &Device,
    x_mat: DevMat,
    x: &impl DevicePtr<f32>,
    weight: &impl DevicePtr<f32>,
    bias: &impl DevicePtr<f32>,
    eps: f32,
    out_mat: DevMat,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    validate_layer_norm(x_mat, x.len(), weight.len(), bias.len(), out_mat, out.len())?;
    if x_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols) = (x_mat.rows, x_mat.cols);
    let (name, cfg) = row_launch("layer_norm", rows, cols)?;
    let f = dev.function(Family::Ops, &name)?;
    let stream = dev.stream();
    let (xp, _rx) = x.device_ptr(stream);
    let (wp, _rw) = weight.device_ptr(stream);
    let (bp, _rb) = bias.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    let vec = vectorizable(
        rows,
        &[(xp, 16), (wp, 16), (bp, 16), (op, 16)],
        &[x_mat.ld, out_mat.ld],
    );
    let (ldx, ldo) = (int("ldx", x_mat.ld)?, int("ldo", out_mat.ld)?);
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&ldx).arg(&op).arg(&ldo).arg(&wp).arg(&bp);
    b.arg(&rows_i).arg(&cols_i).arg(&eps).arg(&vec_i);
    // SAFETY: ops_layer_norm_*(const float* x, int ldx, float* out, int ldo, const float* w,
    // const float* b, int rows, int cols, float eps, int vec) reads columns 0..cols of rows
    // 0..rows of x (leading dimension ldx) and cols floats of w and b, and writes the same
    // columns of out (ldo). Validated: x and out hold (rows − 1)·ld + cols floats, w and b
    // cols floats, every size fits an int; out is a distinct &mut borrow; vec is set only
    // when every pointer is 16-byte aligned and (rows > 1) both ld are multiples of 4; the
    // launch shape is row_launch's, the one the kernel variant expects.
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

/// RMS norm (T5's `T5LayerNorm`): for each row, `out = x/√(mean(x²) + eps)·weight` (no mean
/// subtraction, no bias); `out` a distinct buffer of `x`'s shape.
///
/// Error at most `|y|·(½γ_{n+2} + 4u)` (`u = 2⁻²⁴`, `γ_k = ku/(1 − ku)`, `n = cols`), as on
/// the CPU. Squares are summed in f32 (values above ~1e19 overflow, as in PyTorch).
///
/// # Errors
/// As [`validate_rms_norm`], then a driver error if the launch fails.
pub fn rms_norm(
    dev: &Device,
    x_mat: DevMat,
    x: &impl DevicePtr<f32>,
    weight: &impl DevicePtr<f32>,
    eps: f32,
    out_mat: DevMat,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    validate_rms_norm(x_mat, x.len(), weight.len(), out_mat, out.len())?;
    if x_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols) = (x_mat.rows, x_mat.cols);
    let (name, cfg) = row_launch("rms_norm", rows, cols)?;
    let f = dev.function(Family::Ops, &name)?;
    let stream = dev.stream();
    let (xp, _rx) = x.device_ptr(stream);
    let (wp, _rw) = weight.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    let vec = vectorizable(
        rows,
        &[(xp, 16), (wp, 16), (op, 16)],
        &[x_mat.ld, out_mat.ld],
    );
    let (ldx, ldo) = (int("ldx", x_mat.ld)?, int("ldo", out_mat.ld)?);
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&ldx).arg(&op).arg(&ldo).arg(&wp);
    b.arg(&rows_i).arg(&cols_i).arg(&eps).arg(&vec_i);
    // SAFETY: ops_rms_norm_*(const float* x, int ldx, float* out, int ldo, const float* w,
    // int rows, int cols, float eps, int vec) touches exactly what ops_layer_norm_* does
    // without a bias; validated as in `layer_norm`.
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

/// A row kernel over one in-place operand (`softmax`, `l2_normalize`).
fn in_place_rows(
    dev: &Device,
    op: &str,
    x_mat: DevMat,
    x: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    validate_in_place(x_mat, x.len())?;
    if x_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols) = (x_mat.rows, x_mat.cols);
    let (name, cfg) = row_launch(op, rows, cols)?;
    let f = dev.function(Family::Ops, &name)?;
    let stream = dev.stream();
    let (xp, _rx) = x.device_ptr_mut(stream);
    let vec = vectorizable(rows, &[(xp, 16)], &[x_mat.ld]);
    let ld = int("ld", x_mat.ld)?;
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&ld).arg(&rows_i).arg(&cols_i).arg(&vec_i);
    // SAFETY: ops_{softmax,l2_normalize}_*(float* x, int ld, int rows, int cols, int vec)
    // reads and writes columns 0..cols of rows 0..rows of x; validated: x holds
    // (rows − 1)·ld + cols floats, sizes fit an int, vec only with a 16-byte aligned x and
    // (rows > 1) ld a multiple of 4; launch shape from row_launch.
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

/// Row-wise softmax in place: `x_j ← exp(x_j − m)/Σₖ exp(x_k − m)`, `m` the row maximum.
///
/// Special rows, as [`tessera_core::reference::ops::softmax`] and the CPU kernel: `−∞`
/// entries (masked positions) get exactly 0; a row whose entries are all `−∞` becomes all
/// zeros (nothing to attend to), never NaN; a row holding a NaN or a `+∞` becomes all NaN
/// (IEEE arithmetic of the formula: `∞ − ∞`).
///
/// Error at most `p_j·(u|x_j − m| + 2·EXP_REL_ERR + Σₖ p_k·u|x_k − m| + γ_n + 2u)` plus
/// `2⁻¹²⁵` (subnormal terms), `p` the exact result.
///
/// # Errors
/// As [`validate_in_place`], then a driver error if the launch fails.
pub fn softmax(dev: &Device, x_mat: DevMat, x: &mut impl DevicePtrMut<f32>) -> Result<()> {
    in_place_rows(dev, "softmax", x_mat, x)
}

/// Each row divided by `max(‖row‖₂, 1e-12)` in place ([`L2_NORM_MIN`];
/// `torch.nn.functional.normalize` as sentence-transformers uses it). A zero row stays zero;
/// a NaN makes its row NaN. Error at most `|y|·(½γ_n + 2u)`. Squares are summed in f32.
///
/// # Errors
/// As [`validate_in_place`], then a driver error if the launch fails.
pub fn l2_normalize(dev: &Device, x_mat: DevMat, x: &mut impl DevicePtrMut<f32>) -> Result<()> {
    in_place_rows(dev, "l2_normalize", x_mat, x)
}

// ---------------------------------------------------------------------------------------
// Elementwise operations.

/// The kernel-name suffix of an activation.
fn act_name(act: Activation) -> &'static str {
    match act {
        Activation::Relu => "relu",
        Activation::GeluErf => "gelu_erf",
        Activation::GeluTanh => "gelu_tanh",
        Activation::Tanh => "tanh",
    }
}

/// An in-place elementwise kernel `name(float* x, int ld, int rows, int cols, [extra], int
/// vec)`: `extra` is the optional f32 scalar (`scale`'s factor).
fn in_place_elementwise(
    dev: &Device,
    name: &str,
    x_mat: DevMat,
    x: &mut impl DevicePtrMut<f32>,
    extra: Option<f32>,
) -> Result<()> {
    validate_in_place(x_mat, x.len())?;
    if x_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols, [ld]) = flatten(x_mat.rows, x_mat.cols, [x_mat.ld]);
    let f = dev.function(Family::Ops, name)?;
    let stream = dev.stream();
    let (xp, _rx) = x.device_ptr_mut(stream);
    let vec = vectorizable(rows, &[(xp, 16)], &[ld]);
    let cfg = elementwise_launch(rows, cols, vec)?;
    let ld = int("ld", ld)?;
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&ld).arg(&rows_i).arg(&cols_i);
    if let Some(v) = extra.as_ref() {
        b.arg(v);
    }
    b.arg(&vec_i);
    // SAFETY: the kernel reads and writes columns 0..cols of rows 0..rows of x (leading
    // dimension ld), where (rows, cols, ld) is x's validated shape or, for a contiguous x,
    // the same elements as one row; x holds (rows − 1)·ld + cols floats; vec only with a
    // 16-byte aligned x and (rows > 1) ld a multiple of 4; the argument list is the kernel's
    // (the scalar only for ops_scale, whose caller passes it).
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

/// An activation function applied in place to every element of `x`:
///
/// * [`Activation::Relu`]: `max(x, 0)`, exact (NaN stays NaN);
/// * [`Activation::GeluErf`]: `0.5·x·(1 + erf(x/√2))` (HF `"gelu"`), evaluated as
///   `(0.5x)·erfcf(−x·fl(1/√2))`, accurate relative to the result in both tails: error at
///   most `|y|·(ERFC_REL_ERR + S + u)` with `S` the relative change of `erfc` when its
///   argument `t` moves by `2u·|t|`, i.e. `(2/√π)·e^{−t²}·2u·t²/erfc(t)`;
/// * [`Activation::GeluTanh`]: `0.5·x·(1 + tanh(y))`, `y = √(2/π)·(x + 0.044715·x³)` (HF
///   `"gelu_new"` / `"gelu_pytorch_tanh"`), as `x·(1/(1 + expf(−2y)))` (a correctly rounded
///   reciprocal): error at most `|y|·((1 − σ(2y))·(EXP_REL_ERR + 6u·|2y|) + 3u)`, and where
///   `−2y > 88.7` (`expf` overflows; `x` below about −10.4) the result is `x·0`, an absolute
///   error below `|x|·2⁻¹²⁸`;
/// * [`Activation::Tanh`]: `tanhf`, error at most `|y|·TANH_REL_ERR`.
///
/// `+∞` maps to `+∞` (tanh: 1); `−∞` to 0 (ReLU), −1 (tanh) or NaN (both GELUs: `−∞·0`, as
/// the formulas give). Subnormal results carry an extra absolute error of a few `2⁻¹⁴⁹·|x|`.
///
/// # Errors
/// As [`validate_in_place`], then a driver error if the launch fails.
pub fn activation(
    dev: &Device,
    act: Activation,
    x_mat: DevMat,
    x: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let name = format!("ops_act_{}", act_name(act));
    in_place_elementwise(dev, &name, x_mat, x, None)
}

/// `x *= factor` elementwise (e.g. T5's `d_model^-0.5` rescale), correctly rounded.
///
/// # Errors
/// As [`validate_in_place`], then a driver error if the launch fails.
pub fn scale(
    dev: &Device,
    x_mat: DevMat,
    x: &mut impl DevicePtrMut<f32>,
    factor: f32,
) -> Result<()> {
    in_place_elementwise(dev, "ops_scale", x_mat, x, Some(factor))
}

/// Gated activation `out = act(gate) ⊙ up` (T5 v1.1's gated GELU: `act(wi_0·x) * wi_1·x`).
/// `gate` and `up` may be views of one buffer (e.g. the column halves of one fused
/// `[wi_0; wi_1]` GEMM output, with `ld` twice the width); `out` is a distinct buffer. Each
/// element is `act(gate)` as [`activation`] computes it, times `up` (one more rounding).
///
/// # Errors
/// As [`validate_gated`], then a driver error if the launch fails.
#[allow(clippy::too_many_arguments)]
pub fn gated_activation(
    dev: &Device,
    act: Activation,
    gate_mat: DevMat,
    gate: &impl DevicePtr<f32>,
    up_mat: DevMat,
    up: &impl DevicePtr<f32>,
    out_mat: DevMat,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    validate_gated(gate_mat, gate.len(), up_mat, up.len(), out_mat, out.len())?;
    if gate_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols, [ldg, ldu, ldo]) = flatten(
        gate_mat.rows,
        gate_mat.cols,
        [gate_mat.ld, up_mat.ld, out_mat.ld],
    );
    let name = format!("ops_gated_{}", act_name(act));
    let f = dev.function(Family::Ops, &name)?;
    let stream = dev.stream();
    let (gp, _rg) = gate.device_ptr(stream);
    let (upp, _ru) = up.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    let vec = vectorizable(rows, &[(gp, 16), (upp, 16), (op, 16)], &[ldg, ldu, ldo]);
    let cfg = elementwise_launch(rows, cols, vec)?;
    let (ldg, ldu, ldo) = (int("ldg", ldg)?, int("ldu", ldu)?, int("ldo", ldo)?);
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&gp).arg(&ldg).arg(&upp).arg(&ldu).arg(&op).arg(&ldo);
    b.arg(&rows_i).arg(&cols_i).arg(&vec_i);
    // SAFETY: ops_gated_*(const float* gate, int ldg, const float* up, int ldu, float* out,
    // int ldo, int rows, int cols, int vec) reads columns 0..cols of rows 0..rows of gate
    // and up and writes those of out; all three were validated for that shape at their
    // leading dimensions (or, all contiguous, as one row of the same elements); out is a
    // distinct &mut borrow; vec only with 16-byte aligned pointers and (rows > 1) leading
    // dimensions that are multiples of 4.
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

/// Residual add `x += y` elementwise, correctly rounded; `y` a distinct buffer of `x`'s
/// shape.
///
/// # Errors
/// As [`validate_add`], then a driver error if the launch fails.
pub fn add(
    dev: &Device,
    x_mat: DevMat,
    x: &mut impl DevicePtrMut<f32>,
    y_mat: DevMat,
    y: &impl DevicePtr<f32>,
) -> Result<()> {
    validate_add(x_mat, x.len(), y_mat, y.len())?;
    if x_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols, [ldx, ldy]) = flatten(x_mat.rows, x_mat.cols, [x_mat.ld, y_mat.ld]);
    let f = dev.function(Family::Ops, "ops_add")?;
    let stream = dev.stream();
    let (yp, _ry) = y.device_ptr(stream);
    let (xp, _rx) = x.device_ptr_mut(stream);
    let vec = vectorizable(rows, &[(xp, 16), (yp, 16)], &[ldx, ldy]);
    let cfg = elementwise_launch(rows, cols, vec)?;
    let (ldx, ldy) = (int("ldx", ldx)?, int("ldy", ldy)?);
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&ldx).arg(&yp).arg(&ldy);
    b.arg(&rows_i).arg(&cols_i).arg(&vec_i);
    // SAFETY: ops_add(float* x, int ldx, const float* y, int ldy, int rows, int cols, int
    // vec) reads and writes columns 0..cols of rows 0..rows of x and reads those of y; both
    // validated for that shape at their leading dimensions (or as one row when both are
    // contiguous); x is a &mut borrow, so y does not overlap it; vec as in `gated_activation`.
    unsafe { b.launch(cfg) }.ctx(|| "launching ops_add".into())?;
    Ok(())
}

/// Bias add `x[r, c] += bias[c]` for every row (a `Linear` layer's bias after its GEMM),
/// correctly rounded; `bias` holds `cols` floats.
///
/// # Errors
/// As [`validate_add_bias`], then a driver error if the launch fails.
pub fn add_bias(
    dev: &Device,
    x_mat: DevMat,
    x: &mut impl DevicePtrMut<f32>,
    bias: &impl DevicePtr<f32>,
) -> Result<()> {
    validate_add_bias(x_mat, x.len(), bias.len())?;
    if x_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols) = (x_mat.rows, x_mat.cols);
    let f = dev.function(Family::Ops, "ops_add_bias")?;
    let stream = dev.stream();
    let (bp, _rb) = bias.device_ptr(stream);
    let (xp, _rx) = x.device_ptr_mut(stream);
    let vec = vectorizable(rows, &[(xp, 16), (bp, 16)], &[x_mat.ld]);
    let cfg = elementwise_launch(rows, cols, vec)?;
    let ld = int("ld", x_mat.ld)?;
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&xp)
        .arg(&ld)
        .arg(&bp)
        .arg(&rows_i)
        .arg(&cols_i)
        .arg(&vec_i);
    // SAFETY: ops_add_bias(float* x, int ld, const float* bias, int rows, int cols, int vec)
    // reads and writes columns 0..cols of rows 0..rows of x and reads cols floats of bias;
    // validated: x holds (rows − 1)·ld + cols floats, bias cols; bias is a shared borrow
    // distinct from the &mut x; vec only with both pointers 16-byte aligned and (rows > 1)
    // ld a multiple of 4.
    unsafe { b.launch(cfg) }.ctx(|| "launching ops_add_bias".into())?;
    Ok(())
}

/// The kernel that narrows f32 to `dtype`: `"ops_narrow_f16"` or `"ops_narrow_bf16"`. Needs
/// no GPU.
///
/// # Errors
/// [`Error::Unsupported`](crate::Error::Unsupported) for [`DType::F32`]: there is no f32 to
/// f32 narrowing kernel (the input already is the result; copy it if a second buffer is
/// wanted).
pub fn narrow_kernel(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F16 => Ok("ops_narrow_f16"),
        DType::BF16 => Ok("ops_narrow_bf16"),
        DType::F32 => Err(crate::Error::Unsupported(
            "ops::narrow converts f32 to f16 or bf16; an f32 target is not a narrowing (the \
             input already is the result)"
                .into(),
        )),
    }
}

/// `out = x` rounded to `T` (f16 or bf16), round to nearest even (`__float2half_rn`,
/// `__float2bfloat16_rn`), exact rounding: every result is bit-identical to
/// `half::f16::from_f32` / `half::bf16::from_f32`. Values beyond f16's range (`|x| >= 65520`)
/// become `±∞`, ±∞ stay ±∞, subnormal results are kept (f16 and bf16 subnormals; f32
/// subnormals narrow to bf16 subnormals and to f16 ±0), the sign of zero is kept. A NaN stays
/// NaN with `half`'s bits (its sign and leading payload bits, the quiet bit set), not the
/// hardware's canonical NaN. `out` is a distinct buffer of `x`'s shape with its own leading
/// dimension (in elements of `T`); the model layer uses it to turn f32 activations into
/// f16/bf16 GEMM and attention inputs.
///
/// # Errors
/// [`narrow_kernel`]'s `Unsupported` for an f32 `T`, then as [`validate_narrow`], then a
/// driver error if the launch fails.
pub fn narrow<T: Element>(
    dev: &Device,
    x_mat: DevMat,
    x: &impl DevicePtr<f32>,
    out_mat: DevMat,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    let name = narrow_kernel(T::DTYPE)?;
    validate_narrow(x_mat, x.len(), out_mat, out.len())?;
    if x_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols, [ldx, ldo]) = flatten(x_mat.rows, x_mat.cols, [x_mat.ld, out_mat.ld]);
    let f = dev.function(Family::Ops, name)?;
    let stream = dev.stream();
    let (xp, _rx) = x.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    // A chunk: one float4 load of x, one 8-byte store of four 2-byte values.
    let vec = vectorizable(rows, &[(xp, 16), (op, 8)], &[ldx, ldo]);
    let cfg = elementwise_launch(rows, cols, vec)?;
    let (ldx, ldo) = (int("ldx", ldx)?, int("ldo", ldo)?);
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&ldx).arg(&op).arg(&ldo);
    b.arg(&rows_i).arg(&cols_i).arg(&vec_i);
    // SAFETY: ops_narrow_{f16,bf16}(const float* x, int ldx, T* out, int ldo, int rows, int
    // cols, int vec) reads columns 0..cols of rows 0..rows of x and writes those of out (2-byte
    // elements: the kernel is the one for T::DTYPE, F16 or BF16, both 2 bytes). Validated: x
    // holds (rows − 1)·ldx + cols floats and out (rows − 1)·ldo + cols elements of T at their
    // leading dimensions (or, both contiguous, the same elements as one row); sizes fit an
    // int; out is a distinct &mut borrow; vec only with x 16-byte and out 8-byte aligned and
    // (rows > 1) both leading dimensions multiples of 4.
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

/// The factor of the low term of [`split_f16`]: `x ≈ hi + lo / SPLIT_SCALE` (2¹¹, so the low
/// term, at most half an f16 ulp of `x`, is again of `x`'s magnitude and stays a normal f16).
pub const SPLIT_SCALE: f32 = 2048.0;

/// [`split_f16`] of one value on the host (the kernel's results bit for bit, NaN payloads
/// aside: a NaN `lo` may carry other payload bits): `(hi, lo)` with `x ≈ hi + lo / SPLIT_SCALE`.
/// For weights split once on the host.
pub fn split_f16_value(x: f32) -> (f16, f16) {
    let hi = f16::from_f32(x);
    // Exact: hi is x rounded to 11 significant bits, and the scale is a power of two.
    let lo = f16::from_f32((x - hi.to_f32()) * SPLIT_SCALE);
    (hi, lo)
}

/// `x` as two f16 terms, `x ≈ hi + lo / SPLIT_SCALE`: `hi` is `x` narrowed as [`narrow`] does,
/// `lo` is `(x − hi)·SPLIT_SCALE` narrowed the same way (the difference and the scaling are
/// exact in f32). Together they hold `x` to about 2⁻²² relative (the dropped part is the
/// rounding of `lo`, `2⁻¹¹·|x − hi|`; plus `2⁻²⁵` absolute where `x − hi` is an f16
/// subnormal), so three f16 tensor-core products `hi·hi' + (hi·lo' + lo·hi')/SPLIT_SCALE`
/// come within about 2⁻²¹ of an f32 product. `|x| ≥ 65520` gives `hi = ±∞` (and a NaN or
/// infinite `lo`); NaN stays NaN. `hi` and `lo` are distinct buffers of `x`'s shape with the
/// same leading dimension (`out_mat`).
///
/// # Errors
/// As [`validate_narrow`] (for each of `hi` and `lo`), then a driver error if the launch
/// fails.
pub fn split_f16(
    dev: &Device,
    x_mat: DevMat,
    x: &impl DevicePtr<f32>,
    out_mat: DevMat,
    hi: &mut impl DevicePtrMut<f16>,
    lo: &mut impl DevicePtrMut<f16>,
) -> Result<()> {
    validate_narrow(x_mat, x.len(), out_mat, hi.len())?;
    validate_narrow(x_mat, x.len(), out_mat, lo.len())?;
    if x_mat.is_empty() {
        return Ok(());
    }
    let (rows, cols, [ldx, ldo]) = flatten(x_mat.rows, x_mat.cols, [x_mat.ld, out_mat.ld]);
    let name = "ops_split_f16";
    let f = dev.function(Family::Ops, name)?;
    let stream = dev.stream();
    let (xp, _rx) = x.device_ptr(stream);
    let (hp, _rh) = hi.device_ptr_mut(stream);
    let (lp, _rl) = lo.device_ptr_mut(stream);
    let vec = vectorizable(rows, &[(xp, 16), (hp, 8), (lp, 8)], &[ldx, ldo]);
    let cfg = elementwise_launch(rows, cols, vec)?;
    let (ldx, ldo) = (int("ldx", ldx)?, int("ldo", ldo)?);
    let (rows_i, cols_i, vec_i) = (int("rows", rows)?, int("cols", cols)?, i32::from(vec));
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&ldx).arg(&hp).arg(&lp).arg(&ldo);
    b.arg(&rows_i).arg(&cols_i).arg(&vec_i);
    // SAFETY: ops_split_f16(const float* x, int ldx, __half* hi, __half* lo, int ldo, int rows,
    // int cols, int vec) reads columns 0..cols of rows 0..rows of x and writes those of hi and
    // lo (2-byte elements, leading dimension ldo). Validated: x holds (rows − 1)·ldx + cols
    // floats, hi and lo each (rows − 1)·ldo + cols f16 (or, all contiguous, the same elements
    // as one row); sizes fit an int; hi and lo are distinct &mut borrows; vec only with x
    // 16-byte and hi, lo 8-byte aligned and (rows > 1) both leading dimensions multiples of 4.
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Embedding gather.

/// Embedding gather: row `i` of `out` is row `ids[i]` of `table`, widened to f32 (exact).
/// The table holds f32, f16 or bf16 (`T`); `out` must be `ids.len() x table.cols`.
///
/// `ids` are host data, as in the CPU API: every id is checked against `table.rows` on the
/// host (nothing is launched or written when one is out of range), then the ids are copied to
/// a small device buffer of their own, allocated for the call (stream-ordered) and freed
/// after the kernel has read it.
///
/// # Errors
/// As [`validate_embedding`], then a driver error if the upload or the launch fails.
pub fn embedding<T: Element>(
    dev: &Device,
    table_mat: DevMat,
    table: &impl DevicePtr<T>,
    ids: &[u32],
    out_mat: DevMat,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    validate_embedding(table_mat, table.len(), ids, out_mat, out.len())?;
    if ids.is_empty() || table_mat.cols == 0 {
        return Ok(());
    }
    let (name, elem) = match T::DTYPE {
        DType::F32 => ("ops_embedding_f32", 4u64),
        DType::F16 => ("ops_embedding_f16", 2),
        DType::BF16 => ("ops_embedding_bf16", 2),
    };
    let (n, cols) = (ids.len(), table_mat.cols);
    let f = dev.function(Family::Ops, name)?;
    let ids_dev = dev.upload(ids)?;
    let stream = dev.stream();
    let (tp, _rt) = table.device_ptr(stream);
    let (ip, _ri) = ids_dev.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    // The table's rows move as 4-element chunks (16 or 8 bytes), the output's as float4.
    let vec = vectorizable(2, &[(tp, 4 * elem), (op, 16)], &[table_mat.ld, out_mat.ld]);
    let cfg = elementwise_launch(n, cols, vec)?;
    let (ldt, vocab) = (int("ldt", table_mat.ld)?, int("vocab", table_mat.rows)?);
    let (n_i, cols_i, ldo) = (int("ids", n)?, int("cols", cols)?, int("ldo", out_mat.ld)?);
    let vec_i = i32::from(vec);
    let mut b = stream.launch_builder(&f);
    b.arg(&tp).arg(&ldt).arg(&vocab).arg(&ip).arg(&n_i);
    b.arg(&cols_i).arg(&op).arg(&ldo).arg(&vec_i);
    // SAFETY: ops_embedding_<T>(const T* table, int ldt, int vocab, const uint32_t* ids, int
    // n, int cols, float* out, int ldo, int vec) reads the n ids, columns 0..cols of table
    // rows ids[i] (< vocab: checked on the host, and skipped by the kernel otherwise) and
    // writes columns 0..cols of out rows 0..n. Validated: the table holds
    // (vocab − 1)·ldt + cols elements of T (the kernel is the one for T::DTYPE), out holds
    // (n − 1)·ldo + cols floats, ids_dev holds n ids; vec only with the table aligned to 4
    // elements, out to 16 bytes and both leading dimensions multiples of 4.
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Mean pooling.

/// Launch shape of [`mean_rows`]: 256-thread blocks over the columns, one grid row per
/// sequence up to 65535 (the kernel steps over further sequences).
fn mean_rows_launch(batch: usize, cols: usize) -> Result<LaunchConfig> {
    let gx = grid("columns of ops_mean_rows", cols, 256, false)?;
    let gy = batch.clamp(1, 65_535) as u32;
    Ok(LaunchConfig {
        grid_dim: (gx, gy, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Mean pooling (sentence-transformers' BERT pooling): `out[b, c] = (Σ_{r < lengths[b]}
/// x[b·seq + r, c]) / lengths[b]`, the first `lengths[b]` rows of each `seq`-row sequence
/// summed in row order in f32, then one correctly rounded division by `lengths[b]` (exact as
/// an f32 up to 2²⁴). `x` is `[lengths.len()·seq, cols]`, `out` `[lengths.len(), cols]` (a
/// distinct buffer), every length in `1..=seq`; rows past a sequence's length are never read
/// (their contents, NaN included, do not matter).
///
/// Error at most `γ_len·Σ|x|/len + u·|result|` per output (`len = lengths[b]`, `Σ|x|` over
/// the counted rows of the column, `result` the exact mean; `u = 2⁻²⁴`,
/// `γ_k = ku/(1 − ku)`), for a normal result (a subnormal one carries up to `2⁻¹⁴⁹` more).
/// NaN and infinities in the counted rows propagate as in the sum.
///
/// `lengths` are host data: checked on the host (nothing is launched or written when one is
/// out of range), then copied as u32 to a small device buffer of their own, allocated for the
/// call (stream-ordered) and freed after the kernel has read it. `lengths.len() == 0` or
/// `cols == 0` launches nothing.
///
/// # Errors
/// As [`validate_mean_rows`], then a driver error if the upload or the launch fails.
pub fn mean_rows(
    dev: &Device,
    x_mat: DevMat,
    x: &impl DevicePtr<f32>,
    seq: usize,
    lengths: &[usize],
    out_mat: DevMat,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    validate_mean_rows(x_mat, x.len(), seq, lengths, out_mat, out.len())?;
    let (batch, cols) = (lengths.len(), x_mat.cols);
    if batch == 0 || cols == 0 {
        return Ok(());
    }
    let cfg = mean_rows_launch(batch, cols)?;
    let f = dev.function(Family::Ops, "ops_mean_rows")?;
    // Every length is in 1..=seq, and seq <= rows of x fits an int.
    let lens: Vec<u32> = lengths.iter().map(|&l| l as u32).collect();
    let lens_dev = dev.upload(&lens)?;
    let stream = dev.stream();
    let (xp, _rx) = x.device_ptr(stream);
    let (lp, _rl) = lens_dev.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    let (ldx, ldo, seq_i) = (
        int("ldx", x_mat.ld)?,
        int("ldo", out_mat.ld)?,
        int("seq", seq)?,
    );
    let (batch_i, cols_i) = (int("batch", batch)?, int("cols", cols)?);
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&ldx).arg(&seq_i).arg(&lp).arg(&batch_i);
    b.arg(&cols_i).arg(&op).arg(&ldo);
    // SAFETY: ops_mean_rows(const float* x, int ldx, int seq, const uint32_t* lengths, int
    // batch, int cols, float* out, int ldo) reads the batch lengths, columns 0..cols of rows
    // b·seq .. b·seq + lengths[b] of x (lengths[b] in 1..=seq: checked on the host, and a
    // sequence is skipped by the kernel otherwise) and writes columns 0..cols of out rows
    // 0..batch. Validated: x holds (batch·seq − 1)·ldx + cols floats, out
    // (batch − 1)·ldo + cols, lens_dev batch u32; sizes fit an int; out is a distinct &mut
    // borrow; the launch shape is mean_rows_launch's, which the kernel's loops expect.
    unsafe { b.launch(cfg) }.ctx(|| "launching ops_mean_rows".into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_variants_cover_their_ranges() {
        assert_eq!(row_variant(0), "w8");
        assert_eq!(row_variant(256), "w8");
        assert_eq!(row_variant(257), "w32");
        assert_eq!(row_variant(1024), "w32");
        assert_eq!(row_variant(1025), "b128");
        assert_eq!(row_variant(4096), "b128");
        assert_eq!(row_variant(4097), "b512");
        assert_eq!(row_variant(16384), "b512");
        assert_eq!(row_variant(16385), "loop");
        // Warp variants put 4 rows in a block.
        let (name, cfg) = row_launch("softmax", 9, 100).unwrap();
        assert_eq!(name, "ops_softmax_w8");
        assert_eq!((cfg.grid_dim, cfg.block_dim), ((3, 1, 1), (128, 1, 1)));
        let (name, cfg) = row_launch("layer_norm", 7, 5000).unwrap();
        assert_eq!(name, "ops_layer_norm_b512");
        assert_eq!((cfg.grid_dim, cfg.block_dim), ((7, 1, 1), (512, 1, 1)));
    }

    #[test]
    fn elementwise_geometry() {
        // 1 column: 32 x 8 blocks.
        let c = elementwise_launch(1000, 1, false).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((1, 125, 1), (32, 8, 1)));
        // 768 columns as float4: 192 chunks, 256 x 1 blocks.
        let c = elementwise_launch(3, 768, true).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((1, 3, 1), (256, 1, 1)));
        // Rows beyond the grid's y limit are stepped over by the kernel.
        let c = elementwise_launch(10_000_000, 300, false).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((2, 65_535, 1), (256, 1, 1)));
    }

    #[test]
    fn mean_rows_geometry() {
        let c = mean_rows_launch(32, 768).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((3, 32, 1), (256, 1, 1)));
        let c = mean_rows_launch(100_000, 1).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((1, 65_535, 1), (256, 1, 1)));
    }

    #[test]
    fn flatten_only_contiguous_sets() {
        assert_eq!(flatten(4, 5, [5, 5]), (1, 20, [20, 20]));
        assert_eq!(flatten(4, 5, [5, 6]), (4, 5, [5, 6]));
        assert_eq!(flatten(1, 5, [7]), (1, 5, [7]));
        let big = 1usize << 20;
        assert_eq!(flatten(big, big, [big]), (big, big, [big]));
    }

    #[test]
    fn vectorization_needs_alignment_and_ld() {
        assert!(vectorizable(3, &[(256, 16), (512, 16)], &[8, 4]));
        assert!(!vectorizable(3, &[(260, 16)], &[8]));
        assert!(!vectorizable(3, &[(256, 16)], &[6]));
        assert!(vectorizable(1, &[(256, 16)], &[6]));
        assert!(vectorizable(2, &[(264, 8)], &[4]));
    }
}
