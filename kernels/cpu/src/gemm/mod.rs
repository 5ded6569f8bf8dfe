//! General matrix multiply: `C = α·A·op(B) + β·C`.
//!
//! * `A` (`m x k`) and `C` (`m x n`) are row-major f32 with leading dimensions;
//! * `B` is f32, f16 or bf16 (converted on the fly, exactly, with f32 accumulation), stored
//!   either `[k, n]` ([`Transpose::No`]) or `[n, k]` ([`Transpose::Yes`], the layout of a
//!   Hugging Face `Linear` weight).
//!
//! Design (Goto/BLIS): `B` is packed per `kc x nc` panel (converted to f32 once), `A` per
//! `mc x kc` block, and a register-blocked `MR x NR` microkernel per ISA (AVX2 6x16,
//! AVX-512 12x32, NEON 8x12, scalar 4x4) accumulates in registers. `kc`, `mc` and `nc` are
//! sized from the cache hierarchy ([`CacheInfo`]). Threads split the `mc` blocks (and, for
//! short `m`, the `nc` panel) with rayon. A one-row product (`m == 1`, decode) takes a GEMV
//! path that streams `B` once without packing.
//!
//! Conventions (as in BLAS, and as [`tessera_core::reference::gemm`]): with `β == 0`, `C` is
//! not read (NaN in `C` does not propagate); with `α == 0` or `k == 0`, `A` and `B` are not
//! read. Otherwise NaN and infinities propagate by IEEE arithmetic.
//!
//! Results do not depend on the thread count: tile boundaries and each element's operation
//! order are the same whichever thread computes it.

use crate::parallel::SendPtr;
use crate::{CacheInfo, Isa, Parallelism, scratch};
use rayon::prelude::*;
use tessera_core::shape::{GemmDims, check_gemm};
use tessera_core::{Element, Error, MatMut, MatRef, Result, Transpose};

mod kernel;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

/// `C = α·A·op(B) + β·C` on the fastest instruction set of this CPU ([`preferred_isa`]).
///
/// `A` is `m x k`; `B` is `k x n` for `trans_b == Transpose::No` or `n x k` for
/// `Transpose::Yes`; `C` is `m x n`. Errors (before anything is read or written) when a slice
/// is too short for its shape, a leading dimension is smaller than its row, the dimensions
/// disagree, or `m·n·k` overflows.
///
/// ```
/// use tessera_core::{MatMut, MatRef, Transpose};
/// use tessera_cpu::{gemm::gemm, Parallelism};
/// // [1 2; 3 4] · [5 6; 7 8]ᵀ (B given as a [n, k] weight)
/// let a = [1.0f32, 2.0, 3.0, 4.0];
/// let w = [5.0f32, 6.0, 7.0, 8.0];
/// let mut c = [0.0f32; 4];
/// gemm(1.0, MatRef::dense(&a, 2, 2), MatRef::dense(&w, 2, 2), Transpose::Yes,
///      0.0, MatMut::dense(&mut c, 2, 2), Parallelism::Sequential).unwrap();
/// assert_eq!(c, [17.0, 23.0, 39.0, 53.0]);
/// ```
pub fn gemm<B: Element>(
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, B>,
    trans_b: Transpose,
    beta: f32,
    c: MatMut<'_, f32>,
    par: Parallelism,
) -> Result<()> {
    gemm_with_isa(preferred_isa(), alpha, a, b, trans_b, beta, c, par)
}

/// The instruction set [`gemm`] runs on when none is named: [`Isa::detect`], except where
/// AVX-512 FMAs are double-pumped ([`Isa::avx512_is_double_pumped`], AMD Zen 4). There the
/// 512-bit FMA throughput is that of AVX2, and the AVX2 kernel (6×16 tile) measured faster
/// than the AVX-512 one (12×32) on a Zen 4: f32 2048³ on 1 thread at 94–96% of the FMA peak
/// against 85–87%, the BERT shapes `128×3072×768` and `128×768×3072` 1.1–1.3× (so the
/// choice is AVX2). The AVX-512 kernel stays reachable by naming it.
pub fn preferred_isa() -> Isa {
    let best = Isa::detect();
    if best == Isa::Avx512 && Isa::avx512_is_double_pumped() {
        Isa::Avx2
    } else {
        best
    }
}

/// [`gemm`] on an explicit instruction set; [`Error::IsaUnavailable`] if this CPU lacks it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with_isa<B: Element>(
    isa: Isa,
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, B>,
    trans_b: Transpose,
    beta: f32,
    c: MatMut<'_, f32>,
    par: Parallelism,
) -> Result<()> {
    let opts = GemmOptions {
        isa: Some(isa),
        parallelism: par,
        blocking: None,
    };
    gemm_with(&opts, alpha, a, b, trans_b, beta, c)
}

/// Every knob of a GEMM call.
#[derive(Debug, Clone, Copy, Default)]
pub struct GemmOptions {
    /// Instruction set; `None` picks [`preferred_isa`].
    pub isa: Option<Isa>,
    /// Threads to split the work for.
    pub parallelism: Parallelism,
    /// Cache blocking; `None` derives it from [`CacheInfo::detect`]. Values are rounded up
    /// to the tile shape and balanced over the actual problem.
    pub blocking: Option<Blocking>,
}

/// [`gemm`] with every knob explicit (instruction set, threads, cache blocking).
pub fn gemm_with<B: Element>(
    opts: &GemmOptions,
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, B>,
    trans_b: Transpose,
    beta: f32,
    mut c: MatMut<'_, f32>,
) -> Result<()> {
    let isa = opts.isa.unwrap_or_else(preferred_isa);
    let kern = kernels::<B>(isa)?;
    let dims = check_gemm(&a, &b, trans_b, &c.as_ref())?;
    if let Some(blk) = opts.blocking
        && (blk.mc == 0 || blk.kc == 0 || blk.nc == 0)
    {
        return Err(Error::InvalidArgument(format!(
            "GEMM blocking must be positive, got {blk:?}"
        )));
    }
    let GemmDims { m, n, k } = dims;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 || alpha == 0.0 {
        scale_c(&mut c, m, n, beta);
        return Ok(());
    }
    let threads = opts.parallelism.threads();
    if m == 1 {
        gemv(&kern, dims, alpha, &a, &b, trans_b, beta, &mut c, threads);
    } else {
        let base = opts
            .blocking
            .unwrap_or_else(|| Blocking::from_cache(kern.mr, kern.nr, &CacheInfo::detect()));
        let plan = base.plan(kern.mr, kern.nr, dims, threads);
        blocked(
            &kern, dims, plan, alpha, &a, &b, trans_b, beta, &mut c, threads,
        );
    }
    Ok(())
}

/// The tile shape `(MR, NR)` of an instruction set's microkernel.
pub fn tile_shape(isa: Isa) -> Result<(usize, usize)> {
    let k = kernels::<f32>(isa)?;
    Ok((k.mr, k.nr))
}

/// The cache blocking the driver starts from on this machine for an
/// instruction set (before balancing it over the actual shape and thread count).
pub fn blocking(isa: Isa) -> Result<Blocking> {
    let k = kernels::<f32>(isa)?;
    Ok(Blocking::from_cache(k.mr, k.nr, &CacheInfo::detect()))
}

// ---------------------------------------------------------------------------------------
// Per-ISA kernel table.

/// Arguments of a packing of A (see `kernel::pack_a`).
#[derive(Clone, Copy)]
pub(crate) struct PackAArgs {
    pub mb: usize,
    pub kb: usize,
    pub a: *const f32,
    pub lda: usize,
    pub out: *mut f32,
}

/// Arguments of a packing of B (see `kernel::pack_b`).
pub(crate) struct PackBArgs<B> {
    pub kb: usize,
    pub nb: usize,
    pub b: *const B,
    pub ldb: usize,
    pub trans: Transpose,
    pub out: *mut f32,
}
impl<B> Clone for PackBArgs<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for PackBArgs<B> {}

/// Arguments of a macro-kernel call (see `kernel::macro_kernel`).
#[derive(Clone, Copy)]
pub(crate) struct MacroArgs {
    pub mb: usize,
    pub nb: usize,
    pub kb: usize,
    pub apack: *const f32,
    pub bpack: *const f32,
    pub c: *mut f32,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

/// Arguments of a one-row GEMM over output columns `j0..j1` (see `kernel::gemv`).
pub(crate) struct GemvArgs<B> {
    pub k: usize,
    pub j0: usize,
    pub j1: usize,
    pub a: *const f32,
    pub b: *const B,
    pub ldb: usize,
    pub trans: Transpose,
    pub c: *mut f32,
    pub alpha: f32,
    pub beta: f32,
}

/// The entry points of one instruction set's variant, all `#[target_feature]` functions.
pub(crate) struct Kernels<B> {
    pub mr: usize,
    pub nr: usize,
    pub pack_a: unsafe fn(&PackAArgs),
    pub pack_b: unsafe fn(&PackBArgs<B>),
    pub macro_kernel: unsafe fn(&MacroArgs),
    pub gemv: unsafe fn(&GemvArgs<B>),
}

/// Defines a variant's `#[target_feature]` entry points and its `kernels()` table.
macro_rules! gemm_variant {
    ($simd:ty, $mr:literal, $nv:literal $(, $features:literal)?) => {
        use super::{kernel, GemvArgs, Kernels, MacroArgs, PackAArgs, PackBArgs};
        use crate::simd::Simd;
        use tessera_core::Element;

        $(#[target_feature(enable = $features)])?
        unsafe fn pack_a(args: &PackAArgs) {
            // SAFETY: the driver upholds `kernel::pack_a`'s contract.
            unsafe { kernel::pack_a::<$mr>(args) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn pack_b<B: Element>(args: &PackBArgs<B>) {
            // SAFETY: ISA checked by `kernels_for`; the driver upholds the contract.
            unsafe { kernel::pack_b::<$simd, B, $nv>(args) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn macro_kernel(args: &MacroArgs) {
            // SAFETY: ISA checked by `kernels_for`; the driver upholds the contract.
            unsafe { kernel::macro_kernel::<$simd, $mr, $nv>(args) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn gemv<B: Element>(args: &GemvArgs<B>) {
            // SAFETY: ISA checked by `kernels_for`; the driver upholds the contract.
            unsafe { kernel::gemv::<$simd, B>(args) }
        }

        /// This variant's kernel table. Only hand it out after checking the ISA.
        pub(crate) fn kernels<B: Element>() -> Kernels<B> {
            const { assert!($mr * $nv * <$simd as Simd>::LANES <= kernel::MAX_TILE) };
            Kernels {
                mr: $mr,
                nr: $nv * <$simd as Simd>::LANES,
                pack_a,
                pack_b: pack_b::<B>,
                macro_kernel,
                gemv: gemv::<B>,
            }
        }
    };
}
use gemm_variant;

/// The kernel table for `isa`, after checking that this CPU runs it.
fn kernels<B: Element>(isa: Isa) -> Result<Kernels<B>> {
    isa.check()?;
    match isa {
        Isa::Scalar => Ok(scalar::kernels()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Ok(avx2::kernels()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let mut k = avx512::kernels();
            // The one-row GEMV of 16-bit B runs the AVX2 instantiation (AVX-512 implies
            // AVX2 here: `Isa::Avx512` requires it). Measured on Zen 4, which executes zmm
            // operations as two halves: 768→50257 with f16 B took 6.5 ms with zmm against
            // 3.9 ms with ymm on 1 thread (bf16 7.4 against 3.9), in the same run; f32 B is
            // faster with zmm (8.1 against 10.1 ms) and keeps it.
            if B::DTYPE != tessera_core::DType::F32 {
                k.gemv = avx2::kernels::<B>().gemv;
            }
            Ok(k)
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Ok(neon::kernels()),
        #[allow(unreachable_patterns)]
        _ => Err(Error::IsaUnavailable { isa: isa.name() }),
    }
}

// ---------------------------------------------------------------------------------------
// Driver.

/// `C = β·C` (`β == 0` writes zeros without reading C).
fn scale_c(c: &mut MatMut<'_, f32>, m: usize, n: usize, beta: f32) {
    for i in 0..m {
        let row = &mut c.data[i * c.ld..i * c.ld + n];
        if beta == 0.0 {
            row.fill(0.0);
        } else if beta != 1.0 {
            row.iter_mut().for_each(|x| *x *= beta);
        }
    }
}

/// Cache blocking (Goto/BLIS). `kc`: a `kc x NR` B micro-panel fills L1 (it is reused by
/// every A strip of the block, and a long `kc` amortizes each C-tile update over more
/// FMAs); `mc`: an `mc x kc` A block takes an eighth of L2, leaving room for the streaming B
/// panel and C; `nc`: a `kc x nc` B panel takes an eighth of the shared L3. The fractions
/// were chosen by measuring 2048³ on Zen 4 (AVX2, 6x16 tile): kc 512 / mc 72 / nc 1024
/// reached 93% of the FMA peak where kc 256 / mc 510 / nc 16384 reached 78%.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// Rows of A packed per block (L2).
    pub mc: usize,
    /// Reduction length per block (L1).
    pub kc: usize,
    /// Columns of B packed per panel (L3).
    pub nc: usize,
}

impl Blocking {
    fn from_cache(mr: usize, nr: usize, cache: &CacheInfo) -> Blocking {
        let f = std::mem::size_of::<f32>();
        let kc = (cache.l1d / (nr * f)).clamp(64, 1024) / 8 * 8;
        let mc = ((cache.l2 / 8 / (kc * f)).clamp(mr, 4096) / mr * mr).max(mr);
        let nc = ((cache.l3 / 8 / (kc * f)).clamp(nr, 1 << 16) / nr * nr).max(nr);
        Blocking { mc, kc, nc }
    }

    /// Balances the blocks over the actual shape: equal `kc` blocks and `nc` panels rather
    /// than full ones and a sliver, and a number of A blocks that the thread count divides,
    /// made of `MR`-row strips shared out as evenly as possible.
    fn plan(self, mr: usize, nr: usize, dims: GemmDims, threads: usize) -> Plan {
        let even = |len: usize, max: usize, unit: usize| {
            let blocks = len.div_ceil(max).max(1);
            len.div_ceil(blocks).div_ceil(unit) * unit
        };
        // Clamp to the problem first so that huge (user-given) blocks cannot overflow.
        let kc = even(dims.k, self.kc.min(dims.k.max(1)), 1);
        let nc = even(dims.n, self.nc.min(dims.n.max(1)).div_ceil(nr) * nr, nr);
        let m_strips = dims.m.div_ceil(mr);
        let mc_strips = self.mc.min(dims.m.max(1)).div_ceil(mr).max(1);
        let mut m_blocks = m_strips.div_ceil(mc_strips).max(1);
        if threads > 1 {
            m_blocks = m_blocks.div_ceil(threads) * threads;
        }
        let m_blocks = m_blocks.min(m_strips.max(1));
        Plan {
            kc,
            nc,
            m_strips,
            m_blocks,
            mr,
        }
    }
}

/// The blocking of one call, after balancing over its shape and thread count.
#[derive(Debug, Clone, Copy)]
struct Plan {
    kc: usize,
    nc: usize,
    m_strips: usize,
    m_blocks: usize,
    mr: usize,
}

impl Plan {
    /// Rows `[start, end)` of A block `ib` (a whole number of `MR` strips, except at `m`).
    fn m_range(&self, ib: usize, m: usize) -> (usize, usize) {
        let s0 = ib * self.m_strips / self.m_blocks;
        let s1 = (ib + 1) * self.m_strips / self.m_blocks;
        ((s0 * self.mr).min(m), (s1 * self.mr).min(m))
    }

    /// Rows of the largest A block.
    fn mc_max(&self) -> usize {
        self.m_strips.div_ceil(self.m_blocks) * self.mr
    }
}

#[allow(clippy::too_many_arguments)]
fn blocked<B: Element>(
    kern: &Kernels<B>,
    dims: GemmDims,
    plan: Plan,
    alpha: f32,
    a: &MatRef<'_, f32>,
    b: &MatRef<'_, B>,
    trans_b: Transpose,
    beta: f32,
    c: &mut MatMut<'_, f32>,
    threads: usize,
) {
    let GemmDims { m, n, k } = dims;
    let nr = kern.nr;
    let m_blocks = plan.m_blocks;
    let mut bbuf = scratch::take();
    let bpack = bbuf.get(plan.kc * plan.nc);
    let cptr = SendPtr(c.data.as_mut_ptr());
    let ldc = c.ld;

    for jc in (0..n).step_by(plan.nc) {
        let nb = plan.nc.min(n - jc);
        let strips = nb.div_ceil(nr);
        // With fewer A blocks than threads, also split the panel's strips between threads.
        let n_parts = if m_blocks >= threads {
            1
        } else {
            threads.min(strips)
        };
        let strips_per_part = strips.div_ceil(n_parts);
        for pc in (0..k).step_by(plan.kc) {
            let kb = plan.kc.min(k - pc);
            let beta_eff = if pc == 0 { beta } else { 1.0 };

            // Pack op(B)[pc..pc+kb, jc..jc+nb], in parallel over groups of strips.
            let b_off = match trans_b {
                Transpose::No => pc * b.ld + jc,
                Transpose::Yes => jc * b.ld + pc,
            };
            let b_base = SendPtr(b.data[b_off..].as_ptr().cast_mut());
            let packed = &mut bpack[..strips * nr * kb];
            let pack_parts = if threads > 1 { threads.min(strips) } else { 1 };
            let per = strips.div_ceil(pack_parts);
            let pack = |(i, dst): (usize, &mut [f32])| {
                let cols = i * per * nr;
                let ncols = (nb - cols).min(per * nr);
                let src_off = match trans_b {
                    Transpose::No => cols,
                    Transpose::Yes => cols * b.ld,
                };
                let args = PackBArgs {
                    kb,
                    nb: ncols,
                    // SAFETY: `cols < nb`, so the offset stays inside the validated panel.
                    b: unsafe { b_base.get().add(src_off) },
                    ldb: b.ld,
                    trans: trans_b,
                    out: dst.as_mut_ptr(),
                };
                // SAFETY: ISA checked; `b` covers the sub-panel (validated by `check_gemm`);
                // `dst` holds the `ncols.div_ceil(nr)` strips of kb x nr floats it packs.
                unsafe { (kern.pack_b)(&args) };
            };
            if pack_parts > 1 {
                packed
                    .par_chunks_mut(per * nr * kb)
                    .enumerate()
                    .for_each(pack);
            } else {
                pack((0, &mut *packed));
            }
            let bpack_ptr = SendPtr(packed.as_mut_ptr());

            // One task per (A block, strip group): pack the A block, run the macro-kernel.
            let a_base = SendPtr(a.data.as_ptr().cast_mut());
            let lda = a.ld;
            let task = |t: usize| {
                let (ib, part) = (t / n_parts, t % n_parts);
                let (ic, ic_end) = plan.m_range(ib, m);
                let mb = ic_end - ic;
                let j0 = (part * strips_per_part * nr).min(nb);
                let jn = (nb - j0).min(strips_per_part * nr);
                if mb == 0 || jn == 0 {
                    return;
                }
                let mut abuf = scratch::take();
                let apack = abuf.get(plan.mc_max() * kb);
                let pa = PackAArgs {
                    mb,
                    kb,
                    // SAFETY: row ic < m and column pc < k: inside the validated A.
                    a: unsafe { a_base.get().add(ic * lda + pc) },
                    lda,
                    out: apack.as_mut_ptr(),
                };
                // SAFETY: ISA checked; A block and buffer sizes as required.
                unsafe { (kern.pack_a)(&pa) };
                let ma = MacroArgs {
                    mb,
                    nb: jn,
                    kb,
                    apack: apack.as_ptr(),
                    // SAFETY: strip offset j0/nr < strips: inside the packed panel.
                    bpack: unsafe { bpack_ptr.get().add(j0 * kb) },
                    // SAFETY: (ic, jc + j0) is inside C; tasks cover disjoint blocks of C.
                    c: unsafe { cptr.get().add(ic * ldc + jc + j0) },
                    ldc,
                    alpha,
                    beta: beta_eff,
                };
                // SAFETY: ISA checked; packed operands and the C block as required; no other
                // task writes this block.
                unsafe { (kern.macro_kernel)(&ma) };
                scratch::give(abuf);
            };
            let tasks = m_blocks * n_parts;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        }
    }
    scratch::give(bbuf);
}

/// Alignment of the column ranges that GEMV threads get (a multiple of every LANES, so that
/// no column changes code path with the thread count).
const GEMV_SPLIT: usize = 64;

#[allow(clippy::too_many_arguments)]
fn gemv<B: Element>(
    kern: &Kernels<B>,
    dims: GemmDims,
    alpha: f32,
    a: &MatRef<'_, f32>,
    b: &MatRef<'_, B>,
    trans_b: Transpose,
    beta: f32,
    c: &mut MatMut<'_, f32>,
    threads: usize,
) {
    let n = dims.n;
    let cptr = SendPtr(c.data.as_mut_ptr());
    let bptr = SendPtr(b.data.as_ptr().cast_mut());
    let aptr = SendPtr(a.data.as_ptr().cast_mut());
    let run = |j0: usize, j1: usize| {
        let args = GemvArgs {
            k: dims.k,
            j0,
            j1,
            a: aptr.get(),
            b: bptr.get(),
            ldb: b.ld,
            trans: trans_b,
            c: cptr.get(),
            alpha,
            beta,
        };
        // SAFETY: ISA checked; operands validated by `check_gemm` for m == 1; ranges of
        // different tasks are disjoint, so each element of C has one writer.
        unsafe { (kern.gemv)(&args) };
    };
    // Tasks of at least ~256 KiB of B each, aligned to GEMV_SPLIT columns.
    let bytes_per_col = dims.k * std::mem::size_of::<B>();
    let min_cols = ((256 << 10) / bytes_per_col.max(1)).max(GEMV_SPLIT);
    let tasks = if threads > 1 {
        (n / min_cols).clamp(1, threads * 4) / threads * threads
    } else {
        1
    }
    .max(1);
    let per = n.div_ceil(tasks).div_ceil(GEMV_SPLIT) * GEMV_SPLIT;
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(|t| {
            let j0 = (t * per).min(n);
            let j1 = (j0 + per).min(n);
            if j0 < j1 {
                run(j0, j1);
            }
        });
    } else {
        run(0, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN4: CacheInfo = CacheInfo {
        l1d: 32 << 10,
        l2: 1 << 20,
        l3: 32 << 20,
    };

    #[test]
    fn cache_blocking_fits_the_caches() {
        for (mr, nr) in [(4, 4), (6, 16), (8, 12), (12, 32)] {
            for cache in [ZEN4, CacheInfo::FALLBACK] {
                let b = Blocking::from_cache(mr, nr, &cache);
                assert_eq!(b.mc % mr, 0, "{b:?}");
                assert_eq!(b.nc % nr, 0, "{b:?}");
                assert!(
                    b.kc * nr * 4 <= cache.l1d,
                    "{b:?}: B micro-panel exceeds L1"
                );
                assert!(
                    b.mc * b.kc * 4 <= cache.l2 / 4,
                    "{b:?}: A block too large for L2"
                );
                assert!(
                    b.kc * b.nc * 4 <= cache.l3 / 4,
                    "{b:?}: B panel too large for L3"
                );
            }
        }
        // The 6x16 AVX2 tile on Zen 4: the values measured best.
        assert_eq!(
            Blocking::from_cache(6, 16, &ZEN4),
            Blocking {
                mc: 60,
                kc: 512,
                nc: 2048
            }
        );
    }

    #[test]
    fn plans_split_evenly_for_the_threads() {
        let base = Blocking::from_cache(6, 16, &ZEN4);
        for (m, n, k) in [
            (2048, 2048, 2048),
            (128, 3072, 768),
            (7, 5, 3),
            (1000, 17, 1025),
            (61, 3, 3),
        ] {
            for threads in [1, 2, 3, 4] {
                let p = base.plan(6, 16, GemmDims { m, n, k }, threads);
                assert_eq!(p.nc % 16, 0);
                assert!(p.kc <= base.kc && p.kc >= 1);
                // Equal k blocks: none shorter than another by a whole block count.
                let kb = k.div_ceil(p.kc);
                assert_eq!(k.div_ceil(kb), p.kc, "{m}x{n}x{k}: {p:?}");
                // The A blocks tile 0..m exactly, on strip boundaries, evenly.
                let mut next = 0;
                let (mut lo, mut hi) = (usize::MAX, 0);
                for ib in 0..p.m_blocks {
                    let (s, e) = p.m_range(ib, m);
                    assert_eq!(s, next);
                    assert!(s % 6 == 0 && e > s && e - s <= p.mc_max());
                    lo = lo.min((e - s).div_ceil(6));
                    hi = hi.max((e - s).div_ceil(6));
                    next = e;
                }
                assert_eq!(next, m);
                assert!(
                    hi - lo <= 1,
                    "{m}x{n}x{k} t{threads}: strips per block {lo}..{hi}"
                );
                if m.div_ceil(6) >= threads {
                    assert_eq!(p.m_blocks % threads, 0, "{m}x{n}x{k} t{threads}: {p:?}");
                }
            }
        }
        // Huge user blocks are clamped to the problem, not overflowed.
        let huge = Blocking {
            mc: usize::MAX,
            kc: usize::MAX,
            nc: usize::MAX,
        };
        let p = huge.plan(
            6,
            16,
            GemmDims {
                m: 10,
                n: 20,
                k: 30,
            },
            2,
        );
        assert!(p.m_blocks == 2 && p.kc == 30 && p.nc == 32, "{p:?}");
    }
}
