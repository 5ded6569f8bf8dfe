//! Quantized matmul on GGML blocks: `y[m, n] = x[m, k] · Wᵀ` with the weights `W` (`n` rows of
//! `k / block_len` blocks, row-major, contiguous) stored as Q8_0, Q4_0 or Q4_K blocks exactly as
//! [`tessera_core::quant`] lays them out, uploaded as raw bytes (`CudaSlice<u8>` made from
//! `bytemuck::cast_slice(&blocks)`). Activations and results are f32 and are never quantized.
//!
//! Two kernel families (`cuda/quant.cu`, whose header describes each kernel's mapping):
//! - [`QuantKernel::Gemv`] (decode, memory-bound): weights dequantized in registers, exact
//!   integer-to-float conversion, f32 FMA; the result is within f32 summation error of the exact
//!   product of the dequantized weights and the activations.
//! - [`QuantKernel::Gemm`] (prefill): weights dequantized to f16 tiles in shared memory,
//!   activations rounded to f16, `mma.sync` tensor cores with f32 accumulation. Each product
//!   carries the f16 rounding of its two factors (≤ 2⁻¹⁰ relative for Q8_0 / Q4_0; Q4_K rounds
//!   `d·sc` and `dmin·m` to f16 as well), and values beyond the f16 range (65504) overflow to
//!   infinity; use the GEMV (or [`dequantize`] + an f32 GEMM) where that matters.
//!
//! Every function validates shapes, strides, lengths and alignment on the host (see
//! [`validate`] and [`plan`], both usable without a GPU) before anything is launched.

use crate::compile::Family;
use crate::error::DriverContext;
use crate::launch::{dim_i32, grid, grid_stride};
use crate::{Device, Error, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use tessera_core::shape::{check_len, check_matrix, checked_mul};

pub use tessera_core::quant::QuantFormat;

/// Which kernel [`matmul`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantKernel {
    /// [`QuantKernel::Gemv`] for up to [`AUTO_GEMV_MAX_M`] tokens, [`QuantKernel::Gemm`] above.
    #[default]
    Auto,
    /// The decode GEMV, one pass over the weights per token (any `m`; meant for `m == 1`).
    Gemv,
    /// The tensor-core GEMM (any `m >= 1`).
    Gemm,
}

/// [`QuantKernel::Auto`] picks the GEMV for `m` up to this many tokens: it reads the weights
/// once per token (the second time mostly from L2), where the GEMM's 16-token tile would
/// waste most of its tensor-core work and is latency-bound.
pub const AUTO_GEMV_MAX_M: usize = 2;

/// The shape of `y[m, n] = x[m, k] · Wᵀ`: `x` row `i` starts at `i·ldx`, `y` row `i` at `i·ldy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantArgs {
    /// The weight format (Q8_0, Q4_0 or Q4_K).
    pub format: QuantFormat,
    /// Tokens: rows of `x` and `y`.
    pub m: usize,
    /// Weight rows: columns of `y`.
    pub n: usize,
    /// The reduction length: columns of `x`, weights per row of `W` (a multiple of the block
    /// length, 32 or 256).
    pub k: usize,
    /// Elements between consecutive rows of `x` (`>= k`).
    pub ldx: usize,
    /// Elements between consecutive rows of `y` (`>= n`).
    pub ldy: usize,
}

impl QuantArgs {
    /// Contiguous `x` and `y` (`ldx = k`, `ldy = n`).
    pub fn dense(format: QuantFormat, m: usize, n: usize, k: usize) -> Self {
        QuantArgs {
            format,
            m,
            n,
            k,
            ldx: k,
            ldy: n,
        }
    }
}

/// The largest dimension or stride accepted: the kernels index with `int` and add up to a
/// tile (at most 256) to row and token indices.
pub const MAX_DIM: usize = i32::MAX as usize - 4096;

fn check_format(format: QuantFormat) -> Result<()> {
    match format {
        QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q4K => Ok(()),
        QuantFormat::Q8K => Err(Error::Unsupported(
            "q8_K is an activation format; the CUDA quantized matmul takes q8_0, q4_0 or q4_K weights"
                .into(),
        )),
    }
}

/// Bytes of an `n × k` weight matrix in `format`: `n · (k / block_len) · block_bytes`. Errors
/// for Q8_K, for `k` not a multiple of the block length, and on overflow.
pub fn weight_bytes(format: QuantFormat, n: usize, k: usize) -> Result<usize> {
    check_format(format)?;
    let nb = tessera_core::quant::blocks_per_row(format, k)?;
    let blocks = checked_mul(n, nb, "weight blocks")?;
    Ok(checked_mul(blocks, format.block_bytes(), "weight bytes")?)
}

fn check_dim(what: &str, v: usize) -> Result<()> {
    dim_i32(what, v)?;
    if v > MAX_DIM {
        return Err(Error::Invalid(tessera_core::Error::Overflow {
            what: format!("{what} = {v} exceeds the quant kernels' limit {MAX_DIM}"),
        }));
    }
    Ok(())
}

/// Checks a matmul before anything touches the device: a supported format, `k` a multiple of
/// the block length, exactly [`weight_bytes`] bytes of weights, `x` (`x_len` elements) holding
/// `m × k` with row stride `ldx >= k`, `y` (`y_len` elements) holding `m × n` with `ldy >= n`,
/// and every dimension and stride at most [`MAX_DIM`]. (The device pointers' alignment is
/// checked by [`matmul`] / [`plan`].)
pub fn validate(args: &QuantArgs, x_len: usize, w_bytes: usize, y_len: usize) -> Result<()> {
    let expected = weight_bytes(args.format, args.n, args.k)?;
    check_len("quantized weight bytes", expected, w_bytes)?;
    check_matrix("x", args.m, args.k, args.ldx, x_len)?;
    check_matrix("y", args.m, args.n, args.ldy, y_len)?;
    check_dim("m", args.m)?;
    check_dim("n", args.n)?;
    check_dim("k", args.k)?;
    check_dim("ldx", args.ldx)?;
    check_dim("ldy", args.ldy)?;
    Ok(())
}

fn check_weight_alignment(w_addr: u64) -> Result<()> {
    if !w_addr.is_multiple_of(2) {
        return Err(Error::Invalid(tessera_core::Error::InvalidArgument(
            format!(
                "quantized weights must be 2-byte aligned (the blocks' f16 fields); the buffer is at {w_addr:#x}"
            ),
        )));
    }
    Ok(())
}

/// The path [`matmul`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantPath {
    /// `quant_gemv_*`.
    Gemv {
        /// Lane groups (of 8 lanes) per row covering consecutive 256-weight units: a power
        /// of two, 1..=32.
        col_groups: u32,
        /// Weight rows per lane group (4..=8, see [`gemv_rows_per_group`]).
        rows_per_group: u32,
        /// Weight rows per thread block (`rows_per_group · 32 / col_groups`).
        rows_per_block: u32,
    },
    /// `quant_gemm_*_m{16,64}`.
    Gemm {
        /// Tokens per tile (16 or 64); the tile is 64 weight rows wide.
        tile_m: u32,
    },
}

/// A launch as [`matmul`] would make it (exposed so tests and benches can see which variant a
/// problem gets; host-only).
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// The kernel's name in `cuda/quant.cu`.
    pub kernel: &'static str,
    /// Its mapping.
    pub path: QuantPath,
    /// Grid, block and dynamic shared memory.
    pub config: LaunchConfig,
    /// The weights are read as 16-byte vectors (`cp.async` / `ld.v4`); otherwise 2-byte loads.
    pub vector_weights: bool,
    /// The activations are read as `float4`.
    pub vector_x: bool,
}

impl Plan {
    fn flags(&self) -> i32 {
        i32::from(self.vector_weights) | (i32::from(self.vector_x) << 1)
    }
}

/// Rows of the GEMV's shared staging slot, in 32-bit words (see `QtFmt::SLOT_WORDS`).
fn gemv_slot_words(format: QuantFormat) -> u32 {
    match format {
        QuantFormat::Q8_0 => 280,
        QuantFormat::Q4_0 => 160,
        _ => 144,
    }
}

/// GEMV thread blocks resident per SM (the kernels' `__launch_bounds__(256, 2)`).
pub const GEMV_BLOCKS_PER_SM: usize = 2;

/// Rows per lane group for a GEMV of `n` rows with `phases` row phases per block on a device
/// running `slots` blocks at once: every block does the same work, so the last wave of blocks
/// is only partly full; among 8 down to 4 rows (x is reused over them) this picks the one whose
/// waves are fullest (`tiles / slots` against its ceiling), preferring more rows on ties.
pub fn gemv_rows_per_group(n: usize, phases: usize, slots: usize) -> u32 {
    let slots = slots.max(1) as f64;
    let mut best = (0.0f64, 8u32);
    for rpg in (4..=8u32).rev() {
        let tiles = n.div_ceil(rpg as usize * phases.max(1)) as f64;
        let waves = tiles / slots;
        let fill = waves / waves.ceil();
        if fill > best.0 + 1e-9 {
            best = (fill, rpg);
        }
    }
    best.1
}

/// Chooses the kernel and its launch geometry for `args` (already [`validate`]d, `m, n, k >
/// 0`), the weights at device address `w_addr` and the activations at `x_addr` (only their
/// alignment matters), on a device with `sm_count` SMs (only the GEMV's row split uses it).
/// Errors when the weights are not 2-byte aligned or the grid is too large.
pub fn plan(
    args: &QuantArgs,
    kernel: QuantKernel,
    w_addr: u64,
    x_addr: u64,
    sm_count: u32,
) -> Result<Plan> {
    check_format(args.format)?;
    check_weight_alignment(w_addr)?;
    if args.m == 0 || args.n == 0 || args.k == 0 {
        return Err(Error::Invalid(tessera_core::Error::InvalidArgument(
            format!(
                "plan: empty problem {}x{}x{} launches nothing",
                args.m, args.n, args.k
            ),
        )));
    }
    let nb = tessera_core::quant::blocks_per_row(args.format, args.k)?;
    let gemv = match kernel {
        QuantKernel::Auto => args.m <= AUTO_GEMV_MAX_M,
        QuantKernel::Gemv => true,
        QuantKernel::Gemm => false,
    };
    let vector_x = x_addr.is_multiple_of(16) && (args.m == 1 || args.ldx.is_multiple_of(4));
    let tokens = args.m.min(65_535) as u32;
    if gemv {
        let (name, unit_blocks) = match args.format {
            QuantFormat::Q8_0 => ("quant_gemv_q8_0", 8),
            QuantFormat::Q4_0 => ("quant_gemv_q4_0", 8),
            _ => ("quant_gemv_q4_k", 1),
        };
        let units = nb.div_ceil(unit_blocks);
        let col_groups = units.next_power_of_two().min(32) as u32;
        let phases = 32 / col_groups;
        let rows_per_group = gemv_rows_per_group(
            args.n,
            phases as usize,
            sm_count as usize * GEMV_BLOCKS_PER_SM,
        );
        let rows_per_block = rows_per_group * phases;
        let blocks = grid("quant GEMV rows", args.n, rows_per_block as usize, false)?;
        Ok(Plan {
            kernel: name,
            path: QuantPath::Gemv {
                col_groups,
                rows_per_group,
                rows_per_block,
            },
            config: LaunchConfig {
                grid_dim: (blocks, tokens, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 8 * 8 * gemv_slot_words(args.format) * 4,
            },
            vector_weights: w_addr.is_multiple_of(16) && nb.is_multiple_of(unit_blocks),
            vector_x,
        })
    } else {
        let small = args.m <= 16;
        let name = match (args.format, small) {
            (QuantFormat::Q8_0, true) => "quant_gemm_q8_0_m16",
            (QuantFormat::Q8_0, false) => "quant_gemm_q8_0_m64",
            (QuantFormat::Q4_0, true) => "quant_gemm_q4_0_m16",
            (QuantFormat::Q4_0, false) => "quant_gemm_q4_0_m64",
            (_, true) => "quant_gemm_q4_k_m16",
            (_, false) => "quant_gemm_q4_k_m64",
        };
        let tile_m = if small { 16 } else { 64 };
        let blocks = grid("quant GEMM weight rows", args.n, 64, false)?;
        let tiles = args.m.div_ceil(tile_m as usize).min(65_535) as u32;
        Ok(Plan {
            kernel: name,
            path: QuantPath::Gemm { tile_m },
            config: LaunchConfig {
                grid_dim: (blocks, tiles, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            },
            // Only the Q4_K GEMM has 16-byte loads (header and qs of a 64-weight group).
            vector_weights: args.format == QuantFormat::Q4K && w_addr.is_multiple_of(16),
            vector_x,
        })
    }
}

/// `y[m, n] = x[m, k] · Wᵀ` on the device's stream: `x` (f32, `m × k`, row stride `ldx`), `w`
/// the raw bytes of the `n × k / block_len` weight blocks, `y` (f32, `m × n`, row stride
/// `ldy`; elements between rows are left as they are). `m == 0` or `n == 0` launches nothing;
/// `k == 0` sets the `m × n` outputs to zero.
///
/// Errors (before anything is enqueued) as [`validate`] and [`plan`] do, or when the device
/// lacks the shared memory (the Q8_0 GEMV needs 70 KiB per block).
pub fn matmul<X: DevicePtr<f32>, W: DevicePtr<u8>, Y: DevicePtrMut<f32>>(
    dev: &Device,
    kernel: QuantKernel,
    args: &QuantArgs,
    x: &X,
    w: &W,
    y: &mut Y,
) -> Result<()> {
    validate(args, x.len(), w.len(), y.len())?;
    if args.m == 0 || args.n == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (m, n, k) = (args.m as i32, args.n as i32, args.k as i32);
    let (ldx, ldy) = (args.ldx as i32, args.ldy as i32);
    if args.k == 0 {
        let f = dev.function(Family::Quant, "quant_zero_rows")?;
        let cfg = grid_stride(dev, args.m * args.n);
        let (y_ptr, _ry) = y.device_ptr_mut(stream);
        let mut b = stream.launch_builder(&f);
        b.arg(&y_ptr).arg(&m).arg(&n).arg(&ldy);
        // SAFETY: quant_zero_rows(float*, int m, int n, int ldy) writes y[r·ldy + c] for r < m,
        // c < n; validate() checked that y holds (m − 1)·ldy + n elements.
        unsafe { b.launch(cfg) }.ctx(|| "launching quant_zero_rows".into())?;
        return Ok(());
    }
    let (w_ptr, _rw) = w.device_ptr(stream);
    let (x_ptr, _rx) = x.device_ptr(stream);
    let plan = plan(args, kernel, w_ptr, x_ptr, dev.info().sm_count)?;
    let f = if plan.config.shared_mem_bytes > 0 {
        dev.function_with_smem(
            Family::Quant,
            plan.kernel,
            plan.config.shared_mem_bytes as usize,
        )?
    } else {
        dev.function(Family::Quant, plan.kernel)?
    };
    let (y_ptr, _ry) = y.device_ptr_mut(stream);
    let flags = plan.flags();
    let mut b = stream.launch_builder(&f);
    b.arg(&w_ptr).arg(&x_ptr).arg(&y_ptr);
    b.arg(&m).arg(&n).arg(&k).arg(&ldx).arg(&ldy);
    let (col_groups, rows_per_group) = match plan.path {
        QuantPath::Gemv {
            col_groups,
            rows_per_group,
            ..
        } => (col_groups as i32, rows_per_group as i32),
        QuantPath::Gemm { .. } => (0, 0),
    };
    if matches!(plan.path, QuantPath::Gemv { .. }) {
        b.arg(&col_groups).arg(&rows_per_group);
    }
    b.arg(&flags);
    // SAFETY: the kernel's signature is (const uint8_t* w, const float* x, float* y, int m,
    // int n, int k, int ldx, int ldy, [int col_groups, int rows_per_group,] int flags), matched
    // argument by argument above (rows_per_group in 4..=8, col_groups a power of two <= 32). validate() checked that w holds exactly n·(k / block_len) blocks, that x
    // holds (m − 1)·ldx + k and y (m − 1)·ldy + n elements, and that every dimension fits the
    // kernels' int arithmetic; plan() checked w's 2-byte alignment and sets the 16-byte paths
    // (flags) only for 16-byte aligned weights / activations, computed the grid and block the
    // kernel expects (its header) and the dynamic shared memory it addresses, which
    // function_with_smem allowed. The kernels read and write nothing else.
    unsafe { b.launch(plan.config) }.ctx(|| format!("launching {}", plan.kernel))?;
    Ok(())
}

/// Dequantizes the whole `n × k` weight matrix `w` (raw block bytes) into `out` (f32, exactly
/// `n·k` elements, row-major): bit-identical to [`tessera_core::quant::dequantize`].
pub fn dequantize<W: DevicePtr<u8>, O: DevicePtrMut<f32>>(
    dev: &Device,
    format: QuantFormat,
    n: usize,
    k: usize,
    w: &W,
    out: &mut O,
) -> Result<()> {
    let expected = weight_bytes(format, n, k)?;
    check_len("quantized weight bytes", expected, w.len())?;
    let total = checked_mul(n, k, "dequantized elements")?;
    check_len("dequantized output", total, out.len())?;
    if total == 0 {
        return Ok(());
    }
    let nb = k / format.block_len();
    let (name, per_block) = match format {
        QuantFormat::Q8_0 => ("quant_dequantize_q8_0", 1),
        QuantFormat::Q4_0 => ("quant_dequantize_q4_0", 1),
        _ => ("quant_dequantize_q4_k", 8),
    };
    let units = checked_mul(
        checked_mul(n, nb, "weight blocks")?,
        per_block,
        "dequantize units",
    )?;
    let stream = dev.stream();
    let (w_ptr, _rw) = w.device_ptr(stream);
    check_weight_alignment(w_ptr)?;
    let f = dev.function(Family::Quant, name)?;
    let cfg = grid_stride(dev, units);
    let (o_ptr, _ro) = out.device_ptr_mut(stream);
    let units = units as u64;
    let mut b = stream.launch_builder(&f);
    b.arg(&w_ptr).arg(&o_ptr).arg(&units);
    // SAFETY: the kernel is (const uint8_t* w, float* out, uint64_t nunits); it reads units
    // 32-weight groups of w (exactly n·nb blocks, checked above, 2-byte aligned) and writes
    // 32 floats per unit, n·k in all, which out holds exactly.
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_encode_both_paths() {
        let args = QuantArgs::dense(QuantFormat::Q4_0, 1, 64, 256);
        let p = plan(&args, QuantKernel::Auto, 0x1000, 0x2000, 132).unwrap();
        assert_eq!(p.flags(), 3);
        let p = plan(&args, QuantKernel::Auto, 0x1002, 0x2004, 132).unwrap();
        assert_eq!(p.flags(), 0);
    }

    #[test]
    fn slot_words_match_the_kernel_layout() {
        // Four lane-group regions per row slot, at the offsets QtFmt::group_offset gives.
        let unit_words = |f: QuantFormat| (8 * f.block_bytes() / 4) as u32;
        assert!(68 * 3 + 8 + unit_words(QuantFormat::Q8_0) <= gemv_slot_words(QuantFormat::Q8_0));
        assert!(40 * 3 + unit_words(QuantFormat::Q4_0) <= gemv_slot_words(QuantFormat::Q4_0));
        assert_eq!(
            4 * QuantFormat::Q4K.block_bytes() as u32 / 4,
            gemv_slot_words(QuantFormat::Q4K)
        );
    }
}
