//! Fused, flash-style attention: `softmax(scale·Q·Kᵀ + bias + mask)·V` computed tile by
//! tile with an online softmax, so that no `q_len x kv_len` matrix is ever materialized.
//!
//! Semantics, operand layouts, masks and biases are those of [`tessera_core::attention`]:
//! bidirectional or causal (with a query offset, for a chunk of new tokens over a cached
//! past), cross-attention (`q_len != kv_len`), per-sequence key padding (lengths or a boolean
//! mask), an additive bias (dense, or T5's bucketed relative-position table evaluated on the
//! fly), any scale, grouped-query and multi-query heads, any `head_dim` up to
//! [`tessera_core::attention::MAX_HEAD_DIM`], K and V in f32, f16 or bf16 (Q and the output
//! in f32). A query row whose keys are all masked yields zeros, never NaN.
//!
//! # Algorithm
//! The work is split into tasks of up to ~64 query rows of one batch entry and one
//! key/value head; the rows are `(query, head)` pairs of the heads that share that key/value
//! head, so under grouped-query attention each K/V tile is loaded once for the whole group.
//! K and V of a head are converted to f32 and packed once (K transposed into strips of the
//! register tile's width, V padded to it): `O(kv_len × head_dim)` per head in flight. A task
//! scales and packs its query rows, then walks the keys in blocks of about 64: scores by a
//! register-tiled microkernel, bias and masks added, the row maxima and `exp` (a vectorized
//! polynomial) update the running max and sum, and a second microkernel rescales the output
//! tile and adds `P·V`. Blocks past a row's causal limit or padding length are skipped.
//!
//! Results do not depend on the thread count: each output row is computed by one task, by
//! the same sequence of operations, whichever thread runs it.

use crate::parallel::SendPtr;
use crate::{Isa, Parallelism, scratch};
use rayon::prelude::*;
use tessera_core::attention::{
    AttentionParams, AttentionShape, Bias, Heads, HeadsMut, KeyPadding, check_attention,
};
use tessera_core::{Element, Error, Result};

mod kernel;
mod scalar;

/// Largest relative error of the vectorized `exp` the softmax uses (every variant); tolerances
/// of attention results are derived from it.
pub use crate::simd::EXP_REL_ERR;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

/// How [`attention_with`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionOptions {
    /// Instruction set (`None`: the best this CPU has, [`Isa::detect`]).
    pub isa: Option<Isa>,
    /// Threads.
    pub parallelism: Parallelism,
}

/// Fused attention with the best instruction set of this CPU: writes
/// `out[b, i, h, :] = softmax_j(scale·q·kᵀ + bias + mask)·v` for every batch entry, query
/// row and head (see [`tessera_core::attention`] for the operands and
/// [`AttentionParams`] for the options).
///
/// # Errors
/// Any operand too short for its layout, an output layout that maps two elements to one
/// place, `n_kv_heads` not dividing `n_heads`, `head_dim` outside `1..=MAX_HEAD_DIM`, padding
/// or bias of the wrong size: see [`check_attention`].
pub fn attention<K: Element>(
    shape: &AttentionShape,
    q: Heads<'_, f32>,
    k: Heads<'_, K>,
    v: Heads<'_, K>,
    out: HeadsMut<'_, f32>,
    params: &AttentionParams<'_>,
    par: Parallelism,
) -> Result<()> {
    let opts = AttentionOptions {
        isa: None,
        parallelism: par,
    };
    attention_with(&opts, shape, q, k, v, out, params)
}

/// Arguments of a K/V packing (see `kernel::pack_kv`).
pub(crate) struct PackArgs<K> {
    pub kv_len: usize,
    pub kv_pad: usize,
    pub d: usize,
    pub d_pad: usize,
    pub k: *const K,
    pub v: *const K,
    pub k_stride: usize,
    pub v_stride: usize,
    pub kpack: *mut f32,
    pub vpack: *mut f32,
    pub row: *mut f32,
}
impl<K> Clone for PackArgs<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for PackArgs<K> {}

/// Arguments of one task (see `kernel::attend`). With `rows_pad = rows` rounded up to `MR`,
/// `bc = kernel::key_block(NR)`:
/// * `qpack`: `rows_pad * d` packed, scaled query rows;
/// * `kpack` / `vpack`: the packed head, covering `k_end` rounded up to `NR` keys;
/// * `limits[r]`: keys row `r` sees (`<= k_end`); `bias[r]`: null, or a pointer readable at
///   key indices below `limits[r]`; `mask`: null, or an additive row readable below `k_end`;
/// * `s`: `rows_pad * bc`; `o`: `rows_pad * d_pad`; `m`, `lsum`, `alpha`: `rows_pad` each.
#[derive(Clone, Copy)]
pub(crate) struct BlockArgs {
    pub rows: usize,
    pub d: usize,
    pub d_pad: usize,
    pub k_end: usize,
    pub qpack: *const f32,
    pub kpack: *const f32,
    pub vpack: *const f32,
    pub limits: *const usize,
    pub bias: *const *const f32,
    pub mask: *const f32,
    pub s: *mut f32,
    pub o: *mut f32,
    pub m: *mut f32,
    pub lsum: *mut f32,
    pub alpha: *mut f32,
}

/// The entry points of one instruction set's variant.
pub(crate) struct Kernels<K> {
    pub mr: usize,
    pub nr: usize,
    pub pack: unsafe fn(&PackArgs<K>),
    pub attend: unsafe fn(&BlockArgs),
}

/// Defines a variant's `#[target_feature]` entry points and its `kernels()` table.
macro_rules! attention_variant {
    ($simd:ty, $mr:literal, $nv:literal $(, $features:literal)?) => {
        use super::{kernel, BlockArgs, Kernels, PackArgs};
        use crate::simd::Simd;
        use tessera_core::Element;

        $(#[target_feature(enable = $features)])?
        unsafe fn pack<K: Element>(args: &PackArgs<K>) {
            // SAFETY: ISA checked by `kernels`; the driver upholds the contract.
            unsafe { kernel::pack_kv::<$simd, K, $nv>(args) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn attend(args: &BlockArgs) {
            // SAFETY: ISA checked by `kernels`; the driver upholds the contract.
            unsafe { kernel::attend::<$simd, $mr, $nv>(args) }
        }

        /// This variant's kernel table. Only hand it out after checking the ISA.
        pub(crate) fn kernels<K: Element>() -> Kernels<K> {
            Kernels {
                mr: $mr,
                nr: $nv * <$simd as Simd>::LANES,
                pack: pack::<K>,
                attend,
            }
        }
    };
}
use attention_variant;

/// The kernel table for `isa`, after checking that this CPU runs it.
fn kernels<K: Element>(isa: Isa) -> Result<Kernels<K>> {
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

/// Query rows per task, before rounding up to the tile height.
const TASK_ROWS: usize = 64;
/// Upper bound of rows per task for any tile height (`TASK_ROWS` rounded up to `MR <= 64`).
const MAX_TASK_ROWS: usize = 128;

fn overflow(what: &str) -> Error {
    Error::Overflow { what: what.into() }
}

/// [`attention`] with an explicit instruction set and thread count.
///
/// # Errors
/// As [`attention`], and [`Error::IsaUnavailable`] when `opts.isa` is not available.
pub fn attention_with<K: Element>(
    opts: &AttentionOptions,
    shape: &AttentionShape,
    q: Heads<'_, f32>,
    k: Heads<'_, K>,
    v: Heads<'_, K>,
    out: HeadsMut<'_, f32>,
    params: &AttentionParams<'_>,
) -> Result<()> {
    check_attention(
        shape,
        (q.data.len(), &q.layout),
        (k.data.len(), &k.layout),
        (v.data.len(), &v.layout),
        (out.data.len(), &out.layout),
        params,
    )?;
    let isa = opts.isa.unwrap_or_else(Isa::detect);
    let kern = kernels::<K>(isa)?;
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = *shape;
    if batch == 0 || q_len == 0 || n_heads == 0 {
        return Ok(());
    }
    if kv_len == 0 {
        // No key at all: every row is fully masked.
        for b in 0..batch {
            for i in 0..q_len {
                for h in 0..n_heads {
                    out.data[out.layout.offset(b, i, h)..][..d].fill(0.0);
                }
            }
        }
        return Ok(());
    }
    let (mr, nr) = (kern.mr, kern.nr);
    let group = n_heads / n_kv_heads;
    let d_pad = d.div_ceil(nr) * nr;
    let kv_pad = kv_len.div_ceil(nr) * nr;
    let k_elems = kv_pad.checked_mul(d).ok_or_else(|| overflow("packed K"))?;
    let v_elems = kv_pad
        .checked_mul(d_pad)
        .ok_or_else(|| overflow("packed V"))?;
    let pair_elems = k_elems
        .checked_add(v_elems)
        .ok_or_else(|| overflow("packed K/V"))?;
    let br = TASK_ROWS.div_ceil(mr) * mr;
    debug_assert!(br <= MAX_TASK_ROWS);
    let rows_per_pair = q_len * group;
    let blocks_per_pair = rows_per_pair.div_ceil(br);
    let threads = opts.parallelism.threads();
    let pairs = batch * n_kv_heads;
    let wave = threads.min(pairs).max(1);
    let wave_elems = wave
        .checked_mul(pair_elems)
        .ok_or_else(|| overflow("packed K/V wave"))?;

    let mut packbuf = scratch::take();
    let packed = packbuf.get(wave_elems);
    let out_layout = out.layout;
    let out_ptr = SendPtr(out.data.as_mut_ptr());
    let ctx = TaskCtx {
        kern: &kern,
        shape,
        params,
        q: &q,
        group,
        d_pad,
        br,
        rows_per_pair,
    };

    for w0 in (0..pairs).step_by(wave) {
        let wn = wave.min(pairs - w0);
        let pack_one = |(i, buf): (usize, &mut [f32])| {
            let pair = w0 + i;
            let (b, g) = (pair / n_kv_heads, pair % n_kv_heads);
            let (kp, vp) = buf.split_at_mut(k_elems);
            let mut rowbuf = scratch::take();
            let row = rowbuf.get(d_pad);
            // (b, 0, g) is inside K and V, whose extents were validated for kv_len >= 1.
            let (k0, v0) = (k.layout.offset(b, 0, g), v.layout.offset(b, 0, g));
            let args = PackArgs {
                kv_len,
                kv_pad,
                d,
                d_pad,
                k: k.data[k0..].as_ptr(),
                v: v.data[v0..].as_ptr(),
                k_stride: k.layout.seq_stride,
                v_stride: v.layout.seq_stride,
                kpack: kp.as_mut_ptr(),
                vpack: vp.as_mut_ptr(),
                row: row.as_mut_ptr(),
            };
            // SAFETY: ISA checked; rows j < kv_len at j * stride are inside the validated
            // operands; the buffers have the sizes `pack_kv` needs.
            unsafe { (kern.pack)(&args) };
            scratch::give(rowbuf);
        };
        let chunks = &mut packed[..wn * pair_elems];
        if threads > 1 && wn > 1 {
            chunks
                .par_chunks_mut(pair_elems)
                .enumerate()
                .for_each(pack_one);
        } else {
            chunks.chunks_mut(pair_elems).enumerate().for_each(pack_one);
        }
        let packed_ro: &[f32] = packed;
        let task = |t: usize| {
            let (i, blk) = (t / blocks_per_pair, t % blocks_per_pair);
            let pair = w0 + i;
            let kv = &packed_ro[i * pair_elems..(i + 1) * pair_elems];
            let (kp, vp) = kv.split_at(k_elems);
            run_task(&ctx, pair, blk, kp, vp, out_ptr, &out_layout);
        };
        let tasks = wn * blocks_per_pair;
        if threads > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
    scratch::give(packbuf);
    Ok(())
}

/// What every task of one call shares.
struct TaskCtx<'a, 'p, K> {
    kern: &'a Kernels<K>,
    shape: &'a AttentionShape,
    params: &'a AttentionParams<'p>,
    q: &'a Heads<'a, f32>,
    group: usize,
    d_pad: usize,
    br: usize,
    rows_per_pair: usize,
}

/// Runs task `blk` of key/value head pair `pair` (batch entry `pair / n_kv_heads`, head
/// `pair % n_kv_heads`) and writes its output rows.
fn run_task<K: Element>(
    ctx: &TaskCtx<'_, '_, K>,
    pair: usize,
    blk: usize,
    kpack: &[f32],
    vpack: &[f32],
    out: SendPtr<f32>,
    out_layout: &tessera_core::attention::HeadLayout,
) {
    let AttentionShape {
        kv_len,
        n_heads,
        n_kv_heads,
        head_dim: d,
        ..
    } = *ctx.shape;
    let p = ctx.params;
    let (mr, group, d_pad) = (ctx.kern.mr, ctx.group, ctx.d_pad);
    let bc = kernel::key_block(ctx.kern.nr);
    let (b, g) = (pair / n_kv_heads, pair % n_kv_heads);
    let r0 = blk * ctx.br;
    let rows = ctx.br.min(ctx.rows_per_pair - r0);
    let rows_pad = rows.div_ceil(mr) * mr;
    let row_of = |r: usize| ((r0 + r) / group, g * group + (r0 + r) % group);

    // Which keys each row sees.
    let base_limit = match p.padding {
        KeyPadding::Lengths(l) => l[b],
        _ => kv_len,
    };
    let mut limits = [0usize; MAX_TASK_ROWS];
    for (r, lim) in limits.iter_mut().enumerate().take(rows) {
        let (qi, _) = row_of(r);
        *lim = if p.causal {
            base_limit.min(p.q_offset + qi + 1)
        } else {
            base_limit
        };
    }
    let k_end = limits[..rows].iter().copied().max().unwrap_or(0);

    // Scratch: Q, scores, O, m, l, alpha, the padding mask row, relative-bias rows.
    let (qi_first, qi_last) = (row_of(0).0, row_of(rows - 1).0);
    let (pos_min, pos_max) = (p.q_offset + qi_first, p.q_offset + qi_last);
    let rel_len = kv_len + (pos_max - pos_min);
    let mask_len = if matches!(p.padding, KeyPadding::Mask(_)) {
        kv_len
    } else {
        0
    };
    let rel_total = if matches!(p.bias, Bias::Relative(_)) {
        group * rel_len
    } else {
        0
    };
    let sizes = [
        rows_pad * d,
        rows_pad * bc,
        rows_pad * d_pad,
        rows_pad,
        rows_pad,
        rows_pad,
        mask_len,
        rel_total,
    ];
    let mut buf = scratch::take();
    let all = buf.get(sizes.iter().sum());
    let (qpack, rest) = all.split_at_mut(sizes[0]);
    let (s, rest) = rest.split_at_mut(sizes[1]);
    let (o, rest) = rest.split_at_mut(sizes[2]);
    let (m, rest) = rest.split_at_mut(sizes[3]);
    let (lsum, rest) = rest.split_at_mut(sizes[4]);
    let (alpha, rest) = rest.split_at_mut(sizes[5]);
    let (maskrow, rel) = rest.split_at_mut(sizes[6]);

    // Pack the scaled query rows into MR-row strips.
    for r in 0..rows_pad {
        let dst = (r / mr) * mr * d + r % mr;
        if r < rows {
            let (qi, h) = row_of(r);
            let src = &ctx.q.data[ctx.q.layout.offset(b, qi, h)..][..d];
            for (c, &x) in src.iter().enumerate() {
                qpack[dst + c * mr] = x * p.scale;
            }
        } else {
            for c in 0..d {
                qpack[dst + c * mr] = 0.0;
            }
        }
    }

    // Bias rows and the mask row.
    let mut bias = [std::ptr::null::<f32>(); MAX_TASK_ROWS];
    match p.bias {
        Bias::None => {}
        Bias::Dense {
            data,
            batch_stride,
            head_stride,
            q_stride,
        } => {
            for (r, ptr) in bias.iter_mut().enumerate().take(rows) {
                let (qi, h) = row_of(r);
                let off = b * batch_stride + h * head_stride + qi * q_stride;
                *ptr = data[off..off + kv_len].as_ptr();
            }
        }
        Bias::Relative(rb) => {
            // rel[hg * rel_len + t] = bias of relative position t − pos_max for head hg.
            for t in 0..rel_len {
                let bucket = rb.bucket(t as i64 - pos_max as i64);
                for hg in 0..group {
                    rel[hg * rel_len + t] = rb.table[bucket * n_heads + g * group + hg];
                }
            }
            for (r, ptr) in bias.iter_mut().enumerate().take(rows) {
                let (qi, h) = row_of(r);
                let hg = h - g * group;
                // Key j of this row sits at relative position j − pos = (t − pos_max) for
                // t = j + pos_max − pos, inside rel_len for every j < kv_len.
                let start = hg * rel_len + (pos_max - (p.q_offset + qi));
                *ptr = rel[start..start + kv_len].as_ptr();
            }
        }
    }
    if let KeyPadding::Mask(mk) = p.padding {
        for (j, x) in maskrow.iter_mut().enumerate() {
            *x = if mk[b * kv_len + j] {
                0.0
            } else {
                f32::NEG_INFINITY
            };
        }
    }

    let args = BlockArgs {
        rows,
        d,
        d_pad,
        k_end,
        qpack: qpack.as_ptr(),
        kpack: kpack.as_ptr(),
        vpack: vpack.as_ptr(),
        limits: limits.as_ptr(),
        bias: bias.as_ptr(),
        mask: if mask_len > 0 {
            maskrow.as_ptr()
        } else {
            std::ptr::null()
        },
        s: s.as_mut_ptr(),
        o: o.as_mut_ptr(),
        m: m.as_mut_ptr(),
        lsum: lsum.as_mut_ptr(),
        alpha: alpha.as_mut_ptr(),
    };
    // SAFETY: ISA checked when the table was made; every buffer has the size `BlockArgs`
    // documents (kpack/vpack cover kv_pad >= k_end keys; bias rows are kv_len long, mask
    // kv_len long).
    unsafe { (ctx.kern.attend)(&args) };

    for r in 0..rows {
        let (qi, h) = row_of(r);
        let off = out_layout.offset(b, qi, h);
        // SAFETY: (b, qi, h) is inside the validated, disjoint output; this task is the only
        // writer of the row.
        unsafe {
            std::ptr::copy_nonoverlapping(o.as_ptr().add(r * d_pad), out.get().add(off), d);
        }
    }
    scratch::give(buf);
}
