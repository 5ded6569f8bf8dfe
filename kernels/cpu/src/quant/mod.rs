//! Quantized matmul on GGML-compatible blocks: activation quantizers (f32 → Q8_0 / Q8_K),
//! quantized dot products (Q8_0·Q8_0, Q4_0·Q8_0, Q4_K·Q8_K), and the matmul `C = A·Wᵀ` of f32
//! activations with a quantized weight matrix (GEMV for one token, GEMM for many).
//!
//! # Layout and semantics
//! * Weights `W` are `n` rows (output features) of `k` values each, stored as `n · (k / L)`
//!   blocks row after row (`L` the block length: 32 for Q8_0/Q4_0, 256 for Q4_K): the layout
//!   of a GGUF tensor and of a Hugging Face Linear weight `[out, in]`.
//! * [`matmul`] quantizes each row of `A` (`m x k`, f32) once to the activation format that
//!   pairs with the weights ([`WeightBlock::Act`]: Q8_0 for Q8_0/Q4_0, Q8_K for Q4_K), then
//!   computes every `C[i, j]` (overwritten, `C` is `m x n`) as the quantized dot product of
//!   activation row `i` with weight row `j`: an exact integer sum per block, scaled by the
//!   blocks' scales and summed over the blocks in f32.
//! * Results equal [`tessera_core::reference::quant_matmul`] up to the order of the f32 sum
//!   over blocks; the activation quantizers produce the same bytes as
//!   [`tessera_core::quant::quantize`] on every ISA.
//! * Non-finite values: a NaN or infinite weight scale makes the outputs that use it NaN or
//!   infinite (IEEE propagation). Activations follow GGML's quantizers: an infinite value
//!   makes its block's scale infinite (outputs NaN); a NaN value quantizes to 0.
//!
//! # Design
//! The activations are quantized into per-thread scratch once per call. The weight rows are
//! split into one contiguous range per thread; within a range the kernel walks tiles of
//! `MR` weight rows × `NR` tokens, each computing its `MR·NR` dot products over the whole row
//! in registers, so every weight block is loaded once per tile and every activation block
//! once per row group; tokens are taken in chunks whose quantized rows fit in half the L2.
//! One token (decode) takes the ISA's GEMV path where it has one (`GemvKernels`: the token
//! is prepared once in a kernel-specific layout, then a few contiguous row ranges per thread
//! stream the weights once); elsewhere it is the same walk with one token per tile.
//! Where the ISA has a panel path (`PanelKernels`, AVX2) and there are enough tokens, the
//! register tiles give way to packed panels: 8 weight rows interleaved so that each 32-bit
//! lane of a vector belongs to one row, packed once per chunk of tokens into per-thread
//! scratch; every token then accumulates the 8 rows' dot products lane-wise, with one scale
//! conversion per block for all 8 rows and no horizontal sums (a token group of the panel
//! kernel is 4 tokens, the remaining ones are taken one at a time).
//!
//! [`PackedWeights`] does the panel packing once (at model load), and [`matmul_packed`] then
//! runs the panel kernel for every token count, one token included: on AVX2 this GEMV is 1.6×
//! (Q8_0) to 2.6× (Q4_0) faster than the GEMV on the blocks when the weights are in cache,
//! and a few percent faster from memory (see the `pack` rows of `tessera bench quant`).

mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use crate::parallel::SendPtr;
use crate::{CacheInfo, Isa, Parallelism};
use rayon::prelude::*;
use tessera_core::shape::{check_len, check_matrix, checked_mul};
use tessera_core::{Error, MatMut, MatRef, Result};

pub use tessera_core::quant::{
    BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, QK, QK_K, QuantBlock, QuantFormat, WeightBlock,
};

/// Every knob of a quantized matmul.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantOptions {
    /// Instruction set; `None` picks [`preferred_isa`].
    pub isa: Option<Isa>,
    /// Threads to split the work for.
    pub parallelism: Parallelism,
}

/// The instruction set the quant kernels run on when none is named:
/// [`usable_isa`]`(`[`Isa::detect`]`())`.
pub fn preferred_isa() -> Isa {
    usable_isa(Isa::detect())
}

/// The quant kernels' instruction set for `isa`: `isa` itself where its quant kernels can run,
/// else the next best that can: an AVX-512 CPU without AVX-512 BW and VNNI (Skylake-SP) takes
/// the AVX2 kernels, anything else scalar.
pub fn usable_isa(isa: Isa) -> Isa {
    if is_available(isa) {
        isa
    } else if isa == Isa::Avx512 && is_available(Isa::Avx2) {
        Isa::Avx2
    } else {
        Isa::Scalar
    }
}

// ---------------------------------------------------------------------------------------
// Kernel tables (one per ISA).

/// One tile of dot products: `rows` weight rows × `tokens` activation rows, over `kb` blocks.
pub(crate) struct Tile<W: WeightBlock> {
    /// Blocks per row (the whole reduction).
    pub kb: usize,
    /// Weight row `r` (`r < rows`) starts at `w + r·ldw`.
    pub w: *const W,
    pub ldw: usize,
    pub rows: usize,
    /// Activation row `t` (`t < tokens`) starts at `a + t·lda`; `sums + t·lda` holds the sums
    /// of the quants of its blocks (one `i32` per block) and `ascale + t·lda` their scales
    /// as f32 (one per block).
    pub a: *const W::Act,
    pub sums: *const i32,
    pub ascale: *const f32,
    pub lda: usize,
    pub tokens: usize,
    /// `C[t, r]` is written to `c + t·ldc + r`.
    pub c: *mut f32,
    pub ldc: usize,
}

/// A tile kernel.
///
/// # Safety
/// The ISA of the kernel is available; `1 <= rows <= MR`, `1 <= tokens <= NR`, `kb >= 1`, and
/// every pointer covers what [`Tile`] says is read or written.
pub(crate) type TileFn<W> = unsafe fn(&Tile<W>);

/// An activation quantizer: `nb` blocks from `x` (`nb · A::LEN` floats) into `out`, and the
/// sum of each block's quants into `sums`.
///
/// # Safety
/// The ISA of the kernel is available; `x`, `out` and `sums` cover `nb` blocks.
pub(crate) type QuantizeFn<A> = unsafe fn(x: *const f32, nb: usize, out: *mut A, sums: *mut i32);

/// One token against a range of weight rows (a GEMV), given the token's activation row in a
/// kernel-specific prepared form (see [`GemvKernels`]). Only the AVX-512 table has such a
/// kernel, so off x86-64 the fields are written but never read.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Gemv<W: WeightBlock> {
    /// Blocks per row (the whole reduction).
    pub kb: usize,
    /// Weight row `r` (`r < rows`) starts at `w + r·ldw`.
    pub w: *const W,
    pub ldw: usize,
    pub rows: usize,
    /// The prepared activation row: [`GemvKernels::prep_bytes`]`(kb)` bytes, 64-byte aligned.
    pub prep: *const u8,
    /// `C[r]` is written to `c + r`.
    pub c: *mut f32,
}

/// A GEMV kernel.
///
/// # Safety
/// The ISA of the kernel is available; `rows >= 1`, `kb >= 1`, the weights cover `rows` rows
/// of `kb` blocks, `prep` was written by the same table's `prepare` for this `kb`, and
/// `c .. c + rows` is writable.
pub(crate) type GemvFn<W> = unsafe fn(&Gemv<W>);

/// Prepares one token for [`GemvFn`]: from its `kb` activation blocks `a`, their quant sums
/// and their f32 scales, writes [`GemvKernels::prep_bytes`]`(kb)` bytes to `out`.
///
/// # Safety
/// The ISA of the kernel is available; `a`, `sums` and `ascale` cover `kb` entries and `out`
/// is that many bytes, 64-byte aligned.
pub(crate) type PrepareFn<A> =
    unsafe fn(a: *const A, sums: *const i32, ascale: *const f32, kb: usize, out: *mut u8);

/// A dedicated one-token path: the activation row is prepared once per call, then every
/// weight row range streams against it.
pub(crate) struct GemvKernels<W: WeightBlock> {
    /// Bytes of the prepared activation row for `kb` blocks (a multiple of 64).
    pub prep_bytes: fn(kb: usize) -> usize,
    pub prepare: PrepareFn<W::Act>,
    pub run: GemvFn<W>,
}

/// Weight rows of one packed panel (one f32 / i32 lane per row).
pub(crate) const PANEL_ROWS: usize = 8;

/// A packed panel of up to [`PANEL_ROWS`] weight rows against a run of tokens (only the
/// x86-64 tables have panel kernels that read it).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Panel<W: WeightBlock> {
    /// Blocks per row (the whole reduction).
    pub kb: usize,
    /// The panel, as written by the table's [`PackFn`] for this `kb` (64-byte aligned).
    pub panel: *const u8,
    /// Rows the panel holds (`1..=PANEL_ROWS`); only these are stored.
    pub rows: usize,
    /// Activations, as in [`Tile`].
    pub a: *const W::Act,
    pub sums: *const i32,
    pub ascale: *const f32,
    pub lda: usize,
    /// Tokens (at least 1); any number, the kernel walks them in its own groups.
    pub tokens: usize,
    /// `C[t, r]` is written to `c + t·ldc + r`.
    pub c: *mut f32,
    pub ldc: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl<W: WeightBlock> Panel<W> {
    /// The panel against its first `tokens` tokens (`tokens <= self.tokens`).
    pub(crate) fn first(&self, tokens: usize) -> Panel<W> {
        Panel { tokens, ..*self }
    }

    /// The panel against its tokens from `t0 < self.tokens` on. The pointers are offset with
    /// wrapping arithmetic: they stay inside the operands because `t0` is one of the run's
    /// tokens.
    pub(crate) fn after(&self, t0: usize) -> Panel<W> {
        Panel {
            a: self.a.wrapping_add(t0 * self.lda),
            sums: self.sums.wrapping_add(t0 * self.lda),
            ascale: self.ascale.wrapping_add(t0 * self.lda),
            tokens: self.tokens - t0,
            c: self.c.wrapping_add(t0 * self.ldc),
            ..*self
        }
    }
}

/// Packs weight rows `0..rows` (row `r` at `w + r·ldw`, `kb` blocks each, `1 <= rows <=
/// PANEL_ROWS`) into a panel of [`PanelKernels::bytes`]`(kb)` bytes at `out`.
///
/// # Safety
/// The ISA of the kernel is available; the rows cover `kb` blocks each and `out` is writable
/// for `bytes(kb)` bytes, 64-byte aligned.
pub(crate) type PackFn<W> =
    unsafe fn(w: *const W, ldw: usize, rows: usize, kb: usize, out: *mut u8);

/// A panel kernel.
///
/// # Safety
/// The ISA of the kernel is available; the panel was packed by the same table for `kb` and
/// `rows`; `tokens >= 1`, `kb >= 1`, and the activation and output pointers cover what
/// [`Panel`] says is read or written.
pub(crate) type PanelFn<W> = unsafe fn(&Panel<W>);

/// A GEMM path on repacked weights: a panel of [`PANEL_ROWS`] rows is interleaved so that
/// lane `r` of every vector belongs to row `r` (no horizontal sums, and one scale conversion
/// per block serves all the panel's rows); it is packed once per chunk of tokens (or once for
/// good by [`PackedWeights`]) and then read by every token of the chunk.
pub(crate) struct PanelKernels<W: WeightBlock> {
    /// Bytes of one packed panel of `kb` blocks (a multiple of 64).
    pub bytes: fn(kb: usize) -> usize,
    pub pack: PackFn<W>,
    pub run: PanelFn<W>,
    /// Fewest tokens for which the panel path is taken (below, the register tiles).
    pub min_tokens: usize,
}

/// A weight format's tile kernel and its register tile.
pub(crate) struct Kernels<W: WeightBlock> {
    /// Weight rows per tile (at most).
    pub mr: usize,
    /// Tokens per tile (at most).
    pub nr: usize,
    pub tile: TileFn<W>,
    /// The one-token path, where the ISA has one (otherwise one token runs as 1-token tiles).
    pub gemv: Option<GemvKernels<W>>,
    /// The packed-panel path for many tokens, where the ISA has one.
    pub panel: Option<PanelKernels<W>>,
}

/// Everything one ISA provides.
pub(crate) struct Table {
    pub q8_0: Kernels<BlockQ8_0>,
    pub q4_0: Kernels<BlockQ4_0>,
    pub q4_k: Kernels<BlockQ4_K>,
    pub quantize_q8_0: QuantizeFn<BlockQ8_0>,
    pub quantize_q8_k: QuantizeFn<BlockQ8_K>,
}

/// The kernel table of `isa`, or [`Error::IsaUnavailable`].
fn table(isa: Isa) -> Result<&'static Table> {
    isa.check()?;
    match isa {
        Isa::Scalar => Ok(&scalar::TABLE),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Ok(&avx2::TABLE),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            if avx512::available() {
                Ok(&avx512::TABLE)
            } else {
                Err(Error::IsaUnavailable {
                    isa: "avx512 with avx512bw and avx512vnni (quant kernels)",
                })
            }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Ok(neon::table()),
        #[allow(unreachable_patterns)]
        _ => Err(Error::IsaUnavailable { isa: isa.name() }),
    }
}

/// Whether the quant kernels of `isa` can run here (for `Avx512` this also needs AVX-512 BW
/// and VNNI, which the `gemm` kernels do not).
pub fn is_available(isa: Isa) -> bool {
    table(isa).is_ok()
}

/// Per-format access to a table, with the slices cast to the concrete block types.
trait Dispatch: WeightBlock {
    fn kernels(t: &'static Table) -> &'static Kernels<Self>;
    fn quantizer(t: &'static Table) -> QuantizeFn<Self::Act>;
}
impl Dispatch for BlockQ8_0 {
    fn kernels(t: &'static Table) -> &'static Kernels<Self> {
        &t.q8_0
    }
    fn quantizer(t: &'static Table) -> QuantizeFn<BlockQ8_0> {
        t.quantize_q8_0
    }
}
impl Dispatch for BlockQ4_0 {
    fn kernels(t: &'static Table) -> &'static Kernels<Self> {
        &t.q4_0
    }
    fn quantizer(t: &'static Table) -> QuantizeFn<BlockQ8_0> {
        t.quantize_q8_0
    }
}
impl Dispatch for BlockQ4_K {
    fn kernels(t: &'static Table) -> &'static Kernels<Self> {
        &t.q4_k
    }
    fn quantizer(t: &'static Table) -> QuantizeFn<BlockQ8_K> {
        t.quantize_q8_k
    }
}

/// Runs `f` with the concrete block type behind the generic `W` (the slices are cast, which
/// is free: same type, same bytes).
macro_rules! with_format {
    ($W:ty, $w:expr, $a:expr, |$wv:ident, $av:ident| $body:expr) => {{
        match <$W as QuantBlock>::FORMAT {
            QuantFormat::Q8_0 => {
                let $wv: &[BlockQ8_0] = bytemuck::cast_slice($w);
                let $av: &[BlockQ8_0] = bytemuck::cast_slice($a);
                $body
            }
            QuantFormat::Q4_0 => {
                let $wv: &[BlockQ4_0] = bytemuck::cast_slice($w);
                let $av: &[BlockQ8_0] = bytemuck::cast_slice($a);
                $body
            }
            QuantFormat::Q4K => {
                let $wv: &[BlockQ4_K] = bytemuck::cast_slice($w);
                let $av: &[BlockQ8_K] = bytemuck::cast_slice($a);
                $body
            }
            QuantFormat::Q8K => Err(Error::InvalidArgument(
                "q8_K is an activation format, not a weight format".into(),
            )),
        }
    }};
}

// ---------------------------------------------------------------------------------------
// Activation quantization.

/// Quantizes `x` into activation blocks (`A` = [`BlockQ8_0`] or [`BlockQ8_K`]) with the best
/// ISA ([`preferred_isa`]); the bytes are exactly those of [`tessera_core::quant::quantize`].
pub fn quantize_act<A: QuantBlock>(x: &[f32], out: &mut [A]) -> Result<()> {
    quantize_act_with_isa(preferred_isa(), x, out)
}

/// [`quantize_act`] with an explicit instruction set.
pub fn quantize_act_with_isa<A: QuantBlock>(isa: Isa, x: &[f32], out: &mut [A]) -> Result<()> {
    let t = table(isa)?;
    let nb = tessera_core::quant::blocks_per_row(A::FORMAT, x.len())?;
    check_len("activation blocks", nb, out.len())?;
    let mut sums = vec![0i32; nb];
    match A::FORMAT {
        QuantFormat::Q8_0 => {
            let out: &mut [BlockQ8_0] = bytemuck::cast_slice_mut(out);
            // SAFETY: the table's ISA is available; x holds nb·32 floats, out and sums nb.
            unsafe { (t.quantize_q8_0)(x.as_ptr(), nb, out.as_mut_ptr(), sums.as_mut_ptr()) }
        }
        QuantFormat::Q8K => {
            let out: &mut [BlockQ8_K] = bytemuck::cast_slice_mut(out);
            // SAFETY: as above, with nb·256 floats.
            unsafe { (t.quantize_q8_k)(x.as_ptr(), nb, out.as_mut_ptr(), sums.as_mut_ptr()) }
        }
        f => {
            return Err(Error::InvalidArgument(format!(
                "{f} is a weight format; activations are quantized to q8_0 or q8_K"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Dot product.

/// The dot product of a row of weight blocks with a row of activation blocks (as produced by
/// [`quantize_act`]), with the best ISA ([`preferred_isa`]).
///
/// Errors when the lengths differ, or for Q8_0 weights when an activation quant is −128
/// (outside the ±127 range the quantizers produce, which the Q8_0 kernels rely on).
pub fn dot<W: WeightBlock>(w: &[W], a: &[W::Act]) -> Result<f32> {
    dot_with_isa(preferred_isa(), w, a)
}

/// [`dot`] with an explicit instruction set.
pub fn dot_with_isa<W: WeightBlock>(isa: Isa, w: &[W], a: &[W::Act]) -> Result<f32> {
    let t = table(isa)?;
    check_len("activation blocks", w.len(), a.len())?;
    with_format!(W, w, a, |wv, av| dot_impl(t, wv, av))
}

fn dot_impl<W: Dispatch>(t: &'static Table, w: &[W], a: &[W::Act]) -> Result<f32> {
    let kb = w.len();
    if kb == 0 {
        return Ok(0.0);
    }
    if W::FORMAT == QuantFormat::Q8_0 {
        let qs: &[BlockQ8_0] = bytemuck::cast_slice(a);
        if qs.iter().any(|b| b.qs.contains(&i8::MIN)) {
            return Err(Error::InvalidArgument(
                "q8_0 activations must lie in [-127, 127] (as the quantizers produce)".into(),
            ));
        }
    }
    let sums = block_sums(a);
    let ascale = block_scales(a);
    let mut out = 0f32;
    let tile = Tile {
        kb,
        w: w.as_ptr(),
        ldw: kb,
        rows: 1,
        a: a.as_ptr(),
        sums: sums.as_ptr(),
        ascale: ascale.as_ptr(),
        lda: kb,
        tokens: 1,
        c: &mut out,
        ldc: 1,
    };
    // SAFETY: the ISA is available; one row and one token of kb blocks, sums of kb entries,
    // one output.
    unsafe { (W::kernels(t).tile)(&tile) };
    Ok(out)
}

/// The scale of each activation block as f32.
fn block_scales<A: QuantBlock>(a: &[A]) -> Vec<f32> {
    let bytes: &[u8] = bytemuck::cast_slice(a);
    bytes
        .chunks_exact(std::mem::size_of::<A>())
        .map(|b| act_scale::<A>(b))
        .collect()
}

/// The scale of one activation block given as bytes: the leading f16 (Q8_0) or f32 (Q8_K).
#[inline]
fn act_scale<A: QuantBlock>(b: &[u8]) -> f32 {
    match A::FORMAT {
        QuantFormat::Q8_0 => tessera_core::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    }
}

/// The sum of the quants of each activation block.
fn block_sums<A: QuantBlock>(a: &[A]) -> Vec<i32> {
    let bytes: &[u8] = bytemuck::cast_slice(a);
    let size = std::mem::size_of::<A>();
    // The quants are the i8 run after the scale: bytes 2..34 (Q8_0), 4..260 (Q8_K).
    let (off, len) = match A::FORMAT {
        QuantFormat::Q8_0 => (2, QK),
        _ => (4, QK_K),
    };
    bytes
        .chunks_exact(size)
        .map(|b| b[off..off + len].iter().map(|&q| q as i8 as i32).sum())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Matmul.

/// `C = A·Wᵀ` with the best ISA and every thread of the current rayon pool: `A` is `m x k`
/// f32 activations, `w` holds `n` rows of `k / W::LEN` blocks, `C` (`m x n`) is overwritten.
///
/// Errors when `k` is not a multiple of the block length, `w` does not hold exactly
/// `n · k / W::LEN` blocks, or `A`/`C` do not match their shapes and leading dimensions.
pub fn matmul<W: WeightBlock>(
    a: MatRef<'_, f32>,
    w: &[W],
    n: usize,
    c: MatMut<'_, f32>,
) -> Result<()> {
    matmul_with(&QuantOptions::default(), a, w, n, c)
}

/// [`matmul`] with every knob explicit.
pub fn matmul_with<W: WeightBlock>(
    opts: &QuantOptions,
    a: MatRef<'_, f32>,
    w: &[W],
    n: usize,
    c: MatMut<'_, f32>,
) -> Result<()> {
    let t = table(opts.isa.unwrap_or_else(preferred_isa))?;
    let (m, k) = (a.rows, a.cols);
    check_matrix("A", m, k, a.ld, a.data.len())?;
    let kb = tessera_core::quant::blocks_per_row(W::FORMAT, k)?;
    check_len(
        "weight blocks",
        checked_mul(n, kb, "weight rows x blocks per row")?,
        w.len(),
    )?;
    if c.rows != m || c.cols != n {
        return Err(Error::ShapeMismatch {
            what: format!("C is {}x{} but A·Wᵀ is {m}x{n}", c.rows, c.cols),
        });
    }
    check_matrix("C", m, n, c.ld, c.data.len())?;
    let threads = opts.parallelism.threads();
    let empty: &[W::Act] = &[];
    with_format!(W, w, empty, |wv, _av| {
        matmul_impl(t, threads, a, Weights::Blocks(wv), n, kb, c);
        Ok(())
    })
}

/// The validated matmul: shapes checked by the caller.
fn matmul_impl<W: Dispatch>(
    t: &'static Table,
    threads: usize,
    a: MatRef<'_, f32>,
    weights: Weights<'_, W>,
    n: usize,
    kb: usize,
    c: MatMut<'_, f32>,
) {
    let (w, packed): (&[W], Option<&[u8]>) = match weights {
        Weights::Blocks(w) => (w, None),
        Weights::Panels(p) => (&[], Some(p)),
    };
    let m = a.rows;
    if m == 0 || n == 0 {
        return;
    }
    if kb == 0 {
        for i in 0..m {
            c.data[i * c.ld..i * c.ld + n].fill(0.0);
        }
        return;
    }
    let kern = W::kernels(t);
    let quantize = W::quantizer(t);
    let act_size = std::mem::size_of::<W::Act>();
    // Scratch: the block sums (i32), the block scales (f32), then the activation blocks, each
    // 64-byte aligned.
    // With one token and a GEMV kernel, the prepared activation row comes first (its length
    // is a multiple of 64 bytes, so the rest stays aligned).
    let gemv = kern.gemv.as_ref().filter(|_| m == 1 && packed.is_none());
    let prep_slots = gemv.map_or(0, |g| (g.prep_bytes)(kb).div_ceil(64) * 16);
    let blocks = m * kb;
    let sums_slots = blocks.div_ceil(16) * 16;
    let act_slots = (blocks * act_size).div_ceil(4);
    let mut buf = crate::scratch::take();
    {
        let flat = buf.get(prep_slots + 2 * sums_slots + act_slots);
        let (prep, flat) = flat.split_at_mut(prep_slots);
        let (sums_f, rest) = flat.split_at_mut(sums_slots);
        let (ascale, act_f) = rest.split_at_mut(sums_slots);
        let ascale = &mut ascale[..blocks];
        let sums: &mut [i32] = &mut bytemuck::cast_slice_mut::<f32, i32>(sums_f)[..blocks];
        let act_bytes: &mut [u8] = bytemuck::cast_slice_mut(act_f);
        let act: &mut [W::Act] = bytemuck::cast_slice_mut(&mut act_bytes[..blocks * act_size]);
        let k = a.cols;

        // Quantize the activations, a row per task.
        let quantize_row =
            |i: usize, act_row: &mut [W::Act], sums_row: &mut [i32], scale_row: &mut [f32]| {
                let x = &a.data[i * a.ld..i * a.ld + k];
                // SAFETY: the table's ISA is available; x holds kb blocks' worth of floats and
                // act_row / sums_row kb entries each.
                unsafe { quantize(x.as_ptr(), kb, act_row.as_mut_ptr(), sums_row.as_mut_ptr()) };
                let bytes: &[u8] = bytemuck::cast_slice(act_row);
                for (s, blk) in scale_row.iter_mut().zip(bytes.chunks_exact(act_size)) {
                    *s = act_scale::<W::Act>(blk);
                }
            };
        if threads > 1 && m > 1 {
            act.par_chunks_mut(kb)
                .zip(sums.par_chunks_mut(kb))
                .zip(ascale.par_chunks_mut(kb))
                .enumerate()
                .with_min_len(m.div_ceil(threads))
                .for_each(|(i, ((ar, sr), dr))| quantize_row(i, ar, sr, dr));
        } else {
            let rows = act.chunks_mut(kb).zip(sums.chunks_mut(kb));
            for (i, ((ar, sr), dr)) in rows.zip(ascale.chunks_mut(kb)).enumerate() {
                quantize_row(i, ar, sr, dr);
            }
        }

        if let Some(g) = gemv {
            let prep: &mut [u8] = bytemuck::cast_slice_mut(prep);
            // SAFETY: the table's ISA is available; the token's kb blocks, sums and scales,
            // and prep_bytes(kb) bytes of 64-byte aligned scratch (the buffer is aligned and
            // prep is its start).
            unsafe {
                (g.prepare)(
                    act.as_ptr(),
                    sums.as_ptr(),
                    ascale.as_ptr(),
                    kb,
                    prep.as_mut_ptr(),
                )
            };
            gemv_rows(g, threads, w, n, kb, prep, c.data);
            crate::scratch::give(buf);
            return;
        }

        // Tokens per chunk: their quantized rows fill at most half of the L2 (a multiple of
        // the tile's tokens, or of 16 for tiles of more than 16 tokens, which then split the
        // chunk evenly).
        let l2 = CacheInfo::detect().l2;
        let chunk_of = |unit: usize| ((l2 / 2) / (kb * act_size)).max(unit) / unit * unit;
        let panel = kern.panel.as_ref();
        if let Some(pk) = panel.filter(|p| m >= p.min_tokens || packed.is_some()) {
            let acts = Acts { act, sums, ascale };
            let src = packed.map_or(Weights::Blocks(w), Weights::Panels);
            panel_matmul(pk, threads, src, n, kb, &acts, chunk_of(16), c);
            crate::scratch::give(buf);
            return;
        }
        let (mr, nr) = (kern.mr, kern.nr);
        let chunk = chunk_of(nr.min(16));
        // Weight rows per thread: contiguous ranges, multiples of MR.
        let per = n.div_ceil(mr).div_ceil(threads).max(1) * mr;
        let ranges = n.div_ceil(per);
        let cptr = SendPtr(c.data.as_mut_ptr());
        let (ldc, tile) = (c.ld, kern.tile);
        let act: &[W::Act] = act;
        let sums: &[i32] = sums;
        let ascale: &[f32] = ascale;
        let run = |ri: usize| {
            let (r_start, r_end) = (ri * per, ((ri + 1) * per).min(n));
            for t0 in (0..m).step_by(chunk) {
                let t_end = (t0 + chunk).min(m);
                let step = (t_end - t0).div_ceil((t_end - t0).div_ceil(nr));
                for r0 in (r_start..r_end).step_by(mr) {
                    for t1 in (t0..t_end).step_by(step) {
                        let tile_args = Tile {
                            kb,
                            w: w[r0 * kb..].as_ptr(),
                            ldw: kb,
                            rows: mr.min(r_end - r0),
                            a: act[t1 * kb..].as_ptr(),
                            sums: sums[t1 * kb..].as_ptr(),
                            ascale: ascale[t1 * kb..].as_ptr(),
                            lda: kb,
                            tokens: step.min(t_end - t1),
                            // SAFETY: t1 < m and r0 < n, so the offset lies inside C.
                            c: unsafe { cptr.get().add(t1 * ldc + r0) },
                            ldc,
                        };
                        // SAFETY: the ISA is available; the tile's rows and tokens lie inside
                        // W, the activations and C (validated shapes); each range of weight
                        // rows is one task's, so the tasks write disjoint columns of C.
                        unsafe { tile(&tile_args) };
                    }
                }
            }
        };
        if ranges > 1 {
            (0..ranges).into_par_iter().for_each(run);
        } else {
            run(0);
        }
    }
    crate::scratch::give(buf);
}

/// The quantized activations of a call: `kb` blocks, block sums and scales per token.
struct Acts<'a, A> {
    act: &'a [A],
    sums: &'a [i32],
    ascale: &'a [f32],
}

/// The weights of a matmul: GGUF blocks as given, or panels packed once by
/// [`PackedWeights`] (`n.div_ceil(PANEL_ROWS)` panels of the table's `bytes(kb)` each).
#[derive(Clone, Copy)]
enum Weights<'a, W> {
    Blocks(&'a [W]),
    Panels(&'a [u8]),
}

/// Packed panels, typed like the (empty) block slice `_w` (for `with_format!`).
fn panels_like<'a, W>(_w: &[W], bytes: &'a [u8]) -> Weights<'a, W> {
    Weights::Panels(bytes)
}

/// One 64-byte aligned cache line of packed panels.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Quantized weights repacked once for one instruction set's packed-panel kernels, for
/// [`matmul_packed`].
///
/// [`matmul`] reads the GGUF blocks as they are; where the ISA has a packed-panel path
/// (AVX2), many-token calls interleave each group of 8 weight rows into a panel first, once
/// per chunk of tokens. `PackedWeights` does that interleaving once, when a model is loaded,
/// so that every later call, and a one-token decode step in particular, runs the panel
/// kernel straight from the packed panels: per block, one scale conversion and one FMA serve
/// 8 rows, and there are no horizontal sums. The packed form takes about the memory of the
/// blocks (AVX2: the same 34 bytes per Q8_0 block and row and 18 for Q4_0, 148 instead of
/// 144 for Q4_K, whose 6-bit scales and mins are stored as bytes; each panel rounded up to a
/// 64-byte line), so a decode step over packed weights reads no more than over the blocks.
///
/// On an ISA without a panel path (scalar, NEON, AVX-512) it keeps a copy of the blocks and
/// [`matmul_packed`] runs [`matmul`]'s kernels on them ([`PackedWeights::is_repacked`] says
/// which). Results equal [`tessera_core::reference::quant_matmul`] up to the order of the f32
/// sum over blocks, as for [`matmul`]; from the panel path's token count on (4 tokens with
/// AVX2), they are bit-identical to [`matmul`]'s.
#[derive(Clone)]
pub struct PackedWeights<W: WeightBlock> {
    isa: Isa,
    n: usize,
    k: usize,
    /// The packed panels (repacked), else empty.
    lines: Vec<Line>,
    /// The blocks as given (not repacked), else empty.
    blocks: Vec<W>,
}

impl<W: WeightBlock> std::fmt::Debug for PackedWeights<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeights")
            .field("format", &W::FORMAT)
            .field("isa", &self.isa)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("repacked", &self.is_repacked())
            .finish()
    }
}

impl<W: WeightBlock> PackedWeights<W> {
    /// Packs `n` rows of `k` weights (`n · k / W::LEN` blocks, the layout [`matmul`] takes)
    /// for the best ISA of this CPU, on every thread of the current rayon pool.
    ///
    /// Errors as [`matmul`] does for the weights (`k` not a multiple of the block length, a
    /// block count that does not match), or when the packed size overflows or cannot be
    /// allocated.
    pub fn new(w: &[W], n: usize, k: usize) -> Result<Self> {
        Self::with_options(&QuantOptions::default(), w, n, k)
    }

    /// [`PackedWeights::new`] for an explicit ISA and thread count
    /// ([`Error::IsaUnavailable`] if this CPU lacks the ISA).
    pub fn with_options(opts: &QuantOptions, w: &[W], n: usize, k: usize) -> Result<Self> {
        let isa = opts.isa.unwrap_or_else(preferred_isa);
        let t = table(isa)?;
        let kb = tessera_core::quant::blocks_per_row(W::FORMAT, k)?;
        check_len(
            "weight blocks",
            checked_mul(n, kb, "weight rows x blocks per row")?,
            w.len(),
        )?;
        let threads = opts.parallelism.threads();
        let empty: &[W::Act] = &[];
        let lines = with_format!(W, w, empty, |wv, _av| pack_all(t, threads, wv, n, kb))?;
        let blocks = if lines.is_some() {
            Vec::new()
        } else {
            let mut v = Vec::new();
            v.try_reserve_exact(w.len()).map_err(|e| {
                Error::InvalidArgument(format!("cannot allocate {} blocks ({e})", w.len()))
            })?;
            v.extend_from_slice(w);
            v
        };
        Ok(PackedWeights {
            isa,
            n,
            k,
            lines: lines.unwrap_or_default(),
            blocks,
        })
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Weights per row (input features).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The instruction set the weights were packed for (the one [`matmul_packed`] runs).
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether the weights were repacked into panels (false: the ISA has no panel path, and
    /// the blocks are kept as given).
    pub fn is_repacked(&self) -> bool {
        !self.lines.is_empty()
    }

    /// Bytes the packed weights take.
    pub fn size_bytes(&self) -> usize {
        self.lines.len() * 64 + std::mem::size_of_val(self.blocks.as_slice())
    }
}

/// The panels of `n` rows of `kb` blocks, packed by `t`'s panel kernels on `threads`
/// threads; `None` when the table has no panel path (or there is nothing to pack).
fn pack_all<W: Dispatch>(
    t: &'static Table,
    threads: usize,
    w: &[W],
    n: usize,
    kb: usize,
) -> Result<Option<Vec<Line>>> {
    let Some(pk) = W::kernels(t).panel.as_ref() else {
        return Ok(None);
    };
    if n == 0 || kb == 0 {
        return Ok(None);
    }
    let bytes = (pk.bytes)(kb);
    let panels = n.div_ceil(PANEL_ROWS);
    let total = checked_mul(panels, bytes / 64, "packed weight lines")?;
    let mut lines = Vec::new();
    lines.try_reserve_exact(total).map_err(|e| {
        Error::InvalidArgument(format!("cannot allocate {total} packed lines ({e})"))
    })?;
    lines.resize(total, Line([0; 64]));
    let pack = |(i, dst): (usize, &mut [Line])| {
        let r0 = i * PANEL_ROWS;
        // SAFETY: the ISA is available (the table was checked); rows r0..r0+rows < n of kb
        // blocks lie inside w (its length was checked); dst is bytes(kb) bytes, 64-byte
        // aligned.
        unsafe {
            (pk.pack)(
                w[r0 * kb..].as_ptr(),
                kb,
                PANEL_ROWS.min(n - r0),
                kb,
                dst.as_mut_ptr().cast::<u8>(),
            )
        };
    };
    if threads > 1 {
        lines
            .par_chunks_mut(bytes / 64)
            .enumerate()
            .with_min_len(panels.div_ceil(threads))
            .for_each(pack);
    } else {
        lines.chunks_mut(bytes / 64).enumerate().for_each(pack);
    }
    Ok(Some(lines))
}

/// `C = A·Wᵀ` on weights packed by [`PackedWeights`], with their ISA and every thread of
/// the current rayon pool (see [`matmul`] for the shapes and the semantics).
pub fn matmul_packed<W: WeightBlock>(
    a: MatRef<'_, f32>,
    w: &PackedWeights<W>,
    c: MatMut<'_, f32>,
) -> Result<()> {
    matmul_packed_with(&QuantOptions::default(), a, w, c)
}

/// [`matmul_packed`] with every knob explicit. `opts.isa`, when given, must be the ISA the
/// weights were packed for ([`Error::InvalidArgument`] otherwise).
pub fn matmul_packed_with<W: WeightBlock>(
    opts: &QuantOptions,
    a: MatRef<'_, f32>,
    w: &PackedWeights<W>,
    c: MatMut<'_, f32>,
) -> Result<()> {
    if let Some(isa) = opts.isa.filter(|&i| i != w.isa) {
        return Err(Error::InvalidArgument(format!(
            "weights packed for {} cannot run on {}",
            w.isa.name(),
            isa.name()
        )));
    }
    let (m, k, n) = (a.rows, a.cols, w.n);
    if k != w.k {
        return Err(Error::ShapeMismatch {
            what: format!("A has {k} columns but the packed weights have {}", w.k),
        });
    }
    if !w.is_repacked() {
        let o = QuantOptions {
            isa: Some(w.isa),
            ..*opts
        };
        return matmul_with(&o, a, &w.blocks, w.n, c);
    }
    let t = table(w.isa)?;
    check_matrix("A", m, k, a.ld, a.data.len())?;
    let kb = tessera_core::quant::blocks_per_row(W::FORMAT, k)?;
    if c.rows != m || c.cols != n {
        return Err(Error::ShapeMismatch {
            what: format!("C is {}x{} but A·Wᵀ is {m}x{n}", c.rows, c.cols),
        });
    }
    check_matrix("C", m, n, c.ld, c.data.len())?;
    let threads = opts.parallelism.threads();
    let bytes: &[u8] = bytemuck::cast_slice(w.lines.as_slice());
    let empty: &[W] = &[];
    let no_act: &[W::Act] = &[];
    with_format!(W, empty, no_act, |wv, _av| {
        matmul_impl(t, threads, a, panels_like(wv, bytes), n, kb, c);
        Ok(())
    })
}

/// The packed-panel walk: one contiguous range of rows (a multiple of [`PANEL_ROWS`]) per
/// thread; per chunk of `chunk` tokens, each panel of the range is packed into the thread's
/// scratch and then every token of the chunk runs against it.
#[allow(clippy::too_many_arguments)]
fn panel_matmul<W: WeightBlock>(
    pk: &PanelKernels<W>,
    threads: usize,
    w: Weights<'_, W>,
    n: usize,
    kb: usize,
    acts: &Acts<'_, W::Act>,
    chunk: usize,
    c: MatMut<'_, f32>,
) {
    let m = c.rows;
    let per = n.div_ceil(PANEL_ROWS).div_ceil(threads).max(1) * PANEL_ROWS;
    let ranges = n.div_ceil(per);
    let cptr = SendPtr(c.data.as_mut_ptr());
    let ldc = c.ld;
    let bytes = (pk.bytes)(kb);
    let run = |ri: usize| {
        let (r_start, r_end) = (ri * per, ((ri + 1) * per).min(n));
        let mut pbuf = crate::scratch::take();
        let scratch = pbuf.get(bytes.div_ceil(4)).as_mut_ptr().cast::<u8>();
        for t0 in (0..m).step_by(chunk) {
            let t_end = (t0 + chunk).min(m);
            for r0 in (r_start..r_end).step_by(PANEL_ROWS) {
                let rows = PANEL_ROWS.min(r_end - r0);
                let panel = match w {
                    Weights::Blocks(w) => {
                        // SAFETY: the ISA is available (the table was checked); rows
                        // r0..r0+rows < n of kb blocks lie inside W; the scratch holds
                        // bytes(kb) bytes, 64-byte aligned.
                        unsafe { (pk.pack)(w[r0 * kb..].as_ptr(), kb, rows, kb, scratch) };
                        scratch.cast_const()
                    }
                    // Panel r0 / PANEL_ROWS of the packed weights (r0 is a multiple of
                    // PANEL_ROWS: so are the ranges' starts).
                    Weights::Panels(p) => p[r0 / PANEL_ROWS * bytes..][..bytes].as_ptr(),
                };
                let args = Panel {
                    kb,
                    panel,
                    rows,
                    a: acts.act[t0 * kb..].as_ptr(),
                    sums: acts.sums[t0 * kb..].as_ptr(),
                    ascale: acts.ascale[t0 * kb..].as_ptr(),
                    lda: kb,
                    tokens: t_end - t0,
                    // SAFETY: t0 < m and r0 < n, so the offset lies inside C.
                    c: unsafe { cptr.get().add(t0 * ldc + r0) },
                    ldc,
                };
                // SAFETY: the panel was just packed for kb and rows; tokens t0..t_end < m of
                // kb activation blocks, sums and scales; C's rows t0..t_end, columns
                // r0..r0+rows, which belong to this task's range alone.
                unsafe { (pk.run)(&args) };
            }
        }
        crate::scratch::give(pbuf);
    };
    if ranges > 1 {
        (0..ranges).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

/// The GEMV of one prepared token against the `n` weight rows: contiguous ranges of rows, a
/// few per thread so that a busy core leaves its share to the others (every output is
/// computed by the same operations whichever range holds its row).
fn gemv_rows<W: WeightBlock>(
    g: &GemvKernels<W>,
    threads: usize,
    w: &[W],
    n: usize,
    kb: usize,
    prep: &[u8],
    c: &mut [f32],
) {
    let tasks = if threads > 1 { 4 * threads } else { 1 };
    let per = n.div_ceil(tasks).div_ceil(16).max(1) * 16;
    let ranges = n.div_ceil(per);
    let cptr = SendPtr(c.as_mut_ptr());
    let run = |ri: usize| {
        let (r0, r1) = (ri * per, ((ri + 1) * per).min(n));
        let args = Gemv {
            kb,
            w: w[r0 * kb..].as_ptr(),
            ldw: kb,
            rows: r1 - r0,
            prep: prep.as_ptr(),
            // SAFETY: r0 < n, inside C's first row.
            c: unsafe { cptr.get().add(r0) },
        };
        // SAFETY: the ISA is available (the table was checked); rows r0..r1 < n of kb blocks
        // lie inside W, prep was prepared for kb, and C[0, r0..r1] is this task's alone.
        unsafe { (g.run)(&args) };
    };
    if ranges > 1 {
        (0..ranges).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;

    #[test]
    fn block_sums_read_the_quants() {
        let mut b = BlockQ8_0::zeroed();
        b.d = tessera_core::f16::from_f32(3.0);
        b.qs[0] = -5;
        b.qs[31] = 7;
        assert_eq!(block_sums(&[b]), vec![2]);
        let mut k = BlockQ8_K::zeroed();
        k.d = 1e9;
        k.qs[255] = -128;
        k.qs[0] = 1;
        assert_eq!(block_sums(&[k]), vec![-127]);
    }
}
