//! The `attention` family: Tessera's fused attention (`tessera_cpu::attention::attention_with`)
//! on whole-sequence prefill, decode attention of one new token over a KV cache
//! (`tessera_cpu::kv_cache::decode_attention_with`), and the heap memory one call needs.
//!
//! # Prefill (kernel `causal` / `bidir`)
//! Self-attention of 512 and 2048 tokens (256 with `--quick`), 12 heads of 64 and 128
//! (BERT-base / GPT-2-small and a wider head), batch 1, Q, K, V and the output f32 in the
//! Hugging Face `[batch, seq, heads, head_dim]` layout; shape `QxKVxD` + `h` heads. GFLOP/s
//! count `4·head_dim·heads` per attended (query, key) pair: `q·kv` pairs bidirectional, only
//! the `q(q+1)/2` unmasked ones causal (the work a causal kernel must do), held to the
//! calibrated FMA peak. Every shape, mask and thread count gives one row per peer (column B):
//!
//! * `unf` — unfused attention as an engine without a fused kernel computes it, per head in
//!   turn: `S = scale·Q·Kᵀ` by Tessera's f32 GEMM into a materialized `q x kv` matrix, the
//!   causal mask and a row softmax in plain Rust (vectorizable loops, a polynomial `exp`;
//!   rows split across the threads), then `O = P·V` by the GEMM ([`unfused_attention`]);
//! * `candle` — the same with candle-core tensor ops on `[heads, seq, head_dim]` tensors:
//!   `matmul`, `* scale`, a broadcast `-inf` mask, `max`/`exp`/`sum`/`div` over the last
//!   dimension, `matmul` ([`CandleAttention`]). candle's f32 matmul splits its work on the
//!   current rayon pool, but its element-wise ops and reductions run on one thread, so on N
//!   threads the heads are split into N groups run as rayon tasks (peer `candle-split`).
//!
//! Before timing, each case checks the fused output against the unfused one (and candle's
//! against the fused) within `1e-3·max|V|`.
//!
//! # Decode (kernel `decode`)
//! One query token, 12 heads (as many K/V heads) of 64 and 128, over a cache of 512, 4096 or
//! 16384 tokens stored f16 or Q8_0 (and f32 at 16384), contiguous or paged (blocks of
//! [`BLOCK_SIZE`] tokens, and of [`BIG_BLOCK_SIZE`] at f16; column B, `cont` / `paged` /
//! `pg64`); shape `1xLENxD` + `h` heads. The rows
//! are memory-bound: GB/s of the cache bytes the call must read (K and V of every head at the
//! storage type: 4, 2 or 34/32 bytes per value) against the calibrated read bandwidth. The
//! cache holds several identical sequences (together at least 3x the L3, at most
//! [`MAX_COPIES`]) and each call attends the next one, so the keys come from memory as in a
//! real decode step; the sequences are appended to in turns of [`BLOCK_SIZE`] tokens, so a
//! paged cache interleaves their blocks. The peer (`unfused`, [`unfused_decode`]) reads the
//! whole sequence back as f32 ([`KvCache::read`], single-threaded), then per head a GEMV
//! `q·Kᵀ` by Tessera's GEMM, the softmax and a GEMV `p·V`.
//!
//! # Memory (B `mem`)
//! Causal prefill of 2048 and 8192 tokens (1024 with `--quick`), 12 heads of 64: the row times
//! both paths as above (fewer repetitions), and the line under it gives the most heap bytes
//! each held during one call beyond its operands (inputs and output allocated before), as
//! counted by the `tessera` binary's allocator ([`super::alloc`]). Each call runs on a fresh
//! rayon pool (new threads), so the thread-local scratch pools of the fused kernel and of the
//! GEMM start empty and their growth is counted; the unfused path's one-head score matrix is
//! allocated by the call.

use super::alloc;
use super::data::random_f32;
use super::report::{CaseId, PeerTime, Row, Work};
use super::timing::{TimingConfig, measure_pair};
use super::{BenchError, Case, Config, Ctx, Result, RunFn};
use candle_core::{D, Device, Tensor};
use rayon::prelude::*;
use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tessera_core::attention::{AttentionParams, AttentionShape, HeadLayout, Heads, HeadsMut};
use tessera_core::{MatMut, MatRef, Transpose};
use tessera_cpu::attention::{AttentionOptions, attention_with};
use tessera_cpu::gemm::{GemmOptions, gemm_with};
use tessera_cpu::kv_cache::{
    DecodeOptions, DecodeParams, KvCache, KvCacheConfig, KvDType, KvLayout, SeqId,
    decode_attention_with,
};
use tessera_cpu::{CacheInfo, Isa, Parallelism};

/// Heads of every case (BERT-base, GPT-2-small).
pub const HEADS: usize = 12;
/// Tokens per block of the paged caches.
pub const BLOCK_SIZE: usize = 16;
/// Tokens per block of the `pg64` decode rows: a head's rows of a block are then a long
/// enough run for the hardware prefetchers (with 16-token blocks, reading the same bytes in
/// the same order without any arithmetic measured ~60% of the contiguous read rate here).
pub const BIG_BLOCK_SIZE: usize = 64;
/// Most sequences a decode case rotates through.
pub const MAX_COPIES: usize = 64;

fn par(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Threads(threads)
    } else {
        Parallelism::Sequential
    }
}

// ---------------------------------------------------------------------------------------
// Prefill.

/// Self-attention of one sequence: `seq` queries over `seq` keys, `heads` heads of
/// `head_dim`, batch 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillShape {
    /// Tokens.
    pub seq: usize,
    /// Heads (as many K/V heads).
    pub heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl PrefillShape {
    /// `SEQxSEQxD` + `h` heads, e.g. `2048x2048x128h12` (16 characters: the table's width).
    pub fn name(&self) -> String {
        format!("{}x{}x{}h{}", self.seq, self.seq, self.head_dim, self.heads)
    }

    /// The kernel's shape.
    pub fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            batch: 1,
            q_len: self.seq,
            kv_len: self.seq,
            n_heads: self.heads,
            n_kv_heads: self.heads,
            head_dim: self.head_dim,
        }
    }

    /// Dense `[1, seq, heads, head_dim]`.
    pub fn layout(&self) -> HeadLayout {
        HeadLayout::bshd(self.seq, self.heads, self.head_dim)
    }

    /// Elements of each of Q, K, V and the output.
    pub fn elems(&self) -> usize {
        self.seq * self.heads * self.head_dim
    }
}

/// The mask of a prefill row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Query `i` sees keys `0..=i`.
    Causal,
    /// Every query sees every key.
    Bidirectional,
}

impl Mask {
    /// The kernel column: `causal` or `bidir`.
    pub fn tag(self) -> &'static str {
        match self {
            Mask::Causal => "causal",
            Mask::Bidirectional => "bidir",
        }
    }

    fn is_causal(self) -> bool {
        self == Mask::Causal
    }
}

/// The peer of a prefill row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// [`unfused_attention`].
    Unfused,
    /// [`CandleAttention`].
    Candle,
}

impl Peer {
    /// The `B` column and the case name.
    pub fn tag(self) -> &'static str {
        match self {
            Peer::Unfused => "unf",
            Peer::Candle => "candle",
        }
    }
}

/// (query, key) pairs a self-attention of `seq` tokens attends: `seq²`, or `seq(seq+1)/2`
/// under the causal mask.
pub fn attended_pairs(seq: usize, causal: bool) -> u64 {
    let s = seq as u64;
    if causal { s * (s + 1) / 2 } else { s * s }
}

/// Flops (`4·head_dim·heads` per attended pair: a multiply-add in `q·k` and one in `p·v`)
/// and bytes (Q, K, V and the output, f32).
pub fn prefill_work(shape: PrefillShape, causal: bool) -> Work {
    let per_pair = 4.0 * (shape.head_dim * shape.heads) as f64;
    Work {
        flops: per_pair * attended_pairs(shape.seq, causal) as f64,
        bytes: 16.0 * shape.elems() as f64,
    }
}

/// The prefill shapes (fewer and smaller with `quick`).
pub fn prefill_shapes(quick: bool) -> Vec<PrefillShape> {
    let s = |seq, head_dim| PrefillShape {
        seq,
        heads: HEADS,
        head_dim,
    };
    if quick {
        return vec![s(256, 64)];
    }
    vec![s(512, 64), s(512, 128), s(2048, 64), s(2048, 128)]
}

/// The shapes of the memory rows (causal, head_dim 64).
pub fn memory_shapes(quick: bool) -> Vec<PrefillShape> {
    let s = |seq| PrefillShape {
        seq,
        heads: HEADS,
        head_dim: 64,
    };
    if quick {
        vec![s(1024)]
    } else {
        vec![s(2048), s(8192)]
    }
}

/// Random Q, K, V (uniform in [-1, 1)), dense `[1, seq, heads, head_dim]`.
pub struct PrefillInputs {
    /// The problem.
    pub shape: PrefillShape,
    /// Queries.
    pub q: Vec<f32>,
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

impl PrefillInputs {
    /// Deterministic inputs for `shape`.
    pub fn new(shape: PrefillShape) -> PrefillInputs {
        let n = shape.elems();
        PrefillInputs {
            shape,
            q: random_f32(n, 0x5EED_A001),
            k: random_f32(n, 0x5EED_A002),
            v: random_f32(n, 0x5EED_A003),
        }
    }

    /// `max |V|`: the scale of every output (a convex combination of V rows).
    pub fn v_max(&self) -> f32 {
        self.v.iter().fold(0f32, |m, x| m.max(x.abs()))
    }
}

/// Tessera's fused attention of `x` into `out` (dense, `shape.elems()` floats), scale
/// `1/√head_dim`.
pub fn fused_attention(
    x: &PrefillInputs,
    causal: bool,
    out: &mut [f32],
    isa: Option<Isa>,
    threads: usize,
) -> tessera_core::Result<()> {
    let s = x.shape;
    let l = s.layout();
    let mut params = AttentionParams::new(s.head_dim);
    if causal {
        params = params.causal(0);
    }
    let opts = AttentionOptions {
        isa,
        parallelism: par(threads),
    };
    attention_with(
        &opts,
        &s.attention_shape(),
        Heads::new(&x.q, l),
        Heads::new(&x.k, l),
        Heads::new(&x.v, l),
        HeadsMut::new(out, l),
        &params,
    )
}

/// The `unf` peer: per head, `S = scale·Q_h·K_hᵀ` (Tessera's f32 GEMM, `S` a dense
/// `seq x seq` matrix in `s`, grown as needed), the causal mask and the row softmax
/// ([`softmax_row`]; rows split across the current rayon pool when `threads > 1`), then
/// `O_h = P·V_h` (the GEMM), written into `out` (dense `[1, seq, heads, head_dim]`).
pub fn unfused_attention(
    x: &PrefillInputs,
    causal: bool,
    out: &mut [f32],
    s: &mut Vec<f32>,
    isa: Option<Isa>,
    threads: usize,
) -> tessera_core::Result<()> {
    let PrefillShape {
        seq,
        heads,
        head_dim: d,
    } = x.shape;
    let n = x.shape.elems();
    tessera_core::shape::check_len("out", n, out.len())?;
    if n == 0 {
        return Ok(());
    }
    let ld = heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    if s.len() < seq * seq {
        s.resize(seq * seq, 0.0);
    }
    let s = &mut s[..seq * seq];
    let opts = GemmOptions {
        isa,
        parallelism: par(threads),
        blocking: None,
    };
    for h in 0..heads {
        let o = h * d;
        gemm_with(
            &opts,
            scale,
            MatRef::new(&x.q[o..], seq, d, ld),
            MatRef::new(&x.k[o..], seq, d, ld),
            Transpose::Yes,
            0.0,
            MatMut::dense(s, seq, seq),
        )?;
        let limit = |i: usize| if causal { i + 1 } else { seq };
        if threads > 1 {
            s.par_chunks_mut(seq)
                .enumerate()
                .with_min_len(8)
                .for_each(|(i, row)| softmax_row(row, limit(i)));
        } else {
            s.chunks_mut(seq)
                .enumerate()
                .for_each(|(i, row)| softmax_row(row, limit(i)));
        }
        gemm_with(
            &opts,
            1.0,
            MatRef::dense(s, seq, seq),
            MatRef::new(&x.v[o..], seq, d, ld),
            Transpose::No,
            0.0,
            MatMut::new(&mut out[o..], seq, d, ld),
        )?;
    }
    Ok(())
}

/// Lanes of the accumulators of the plain-Rust loops (wide enough for any SIMD width the
/// compiler targets).
const LANES: usize = 16;

/// `exp(x)` for `x` in `[-87, 88]` (clamped outside), relative error about 2e-7: a Cephes
/// polynomial on `x − n·ln 2` times `2ⁿ` built from the exponent bits. Branch-free plain Rust
/// (the round-to-integer by adding 1.5·2²³), so a loop over it vectorizes.
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: x + MAGIC rounds x to an integer.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // t and MAGIC share their exponent, so their bit patterns differ by n.
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    e * f32::from_bits((ni + 127).wrapping_shl(23) as u32)
}

/// In place: `row[..valid]` becomes its softmax, `row[valid..]` (masked keys) zero; `valid`
/// must be at least 1.
pub fn softmax_row(row: &mut [f32], valid: usize) {
    let (live, masked) = row.split_at_mut(valid);
    masked.fill(0.0);
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = live.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    let mut sums = [0f32; LANES];
    let mut chunks = live.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c) {
            *v = exp_poly(*v - m);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_poly(*v - m);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in live.iter_mut() {
        *v *= inv;
    }
}

/// The `candle` peer: Q, K, V as `[heads, seq, head_dim]` candle tensors, split in groups of
/// heads (one group, or one per thread: `candle-split`), and the causal mask as a
/// `[seq, seq]` tensor of 0 and −∞ (made once, as an engine caches it).
pub struct CandleAttention {
    /// `(q, k, v)` of each group of heads.
    groups: Vec<(Tensor, Tensor, Tensor)>,
    mask: Option<Tensor>,
    scale: f64,
    shape: PrefillShape,
}

impl CandleAttention {
    /// Copies `x` into candle tensors (`[seq, heads, d]` transposed to contiguous
    /// `[heads, seq, d]`), in `parts` groups of heads.
    pub fn new(x: &PrefillInputs, causal: bool, parts: usize) -> candle_core::Result<Self> {
        let s = x.shape;
        let dev = Device::Cpu;
        let heads_major = |data: &[f32]| -> candle_core::Result<Tensor> {
            Tensor::from_slice(data, (s.seq, s.heads, s.head_dim), &dev)?
                .transpose(0, 1)?
                .contiguous()
        };
        let (q, k, v) = (heads_major(&x.q)?, heads_major(&x.k)?, heads_major(&x.v)?);
        let per = s.heads.div_ceil(parts.max(1)).max(1);
        let mut groups = Vec::new();
        for h0 in (0..s.heads).step_by(per) {
            let n = per.min(s.heads - h0);
            groups.push((
                q.narrow(0, h0, n)?,
                k.narrow(0, h0, n)?,
                v.narrow(0, h0, n)?,
            ));
        }
        let mask = if causal {
            let m: Vec<f32> = (0..s.seq * s.seq)
                .map(|t| {
                    if t % s.seq > t / s.seq {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            Some(Tensor::from_vec(m, (s.seq, s.seq), &dev)?)
        } else {
            None
        };
        Ok(CandleAttention {
            groups,
            mask,
            scale: 1.0 / (s.head_dim as f64).sqrt(),
            shape: s,
        })
    }

    /// The peer's name in a row.
    pub fn name(&self) -> &'static str {
        if self.groups.len() > 1 {
            "candle-split"
        } else {
            "candle"
        }
    }

    fn group(&self, (q, k, v): &(Tensor, Tensor, Tensor)) -> candle_core::Result<Tensor> {
        let mut s = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(m) = &self.mask {
            s = s.broadcast_add(m)?;
        }
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        e.broadcast_div(&sum)?.matmul(v)
    }

    /// One call: the `[heads_in_group, seq, head_dim]` output of each group (the groups as
    /// rayon tasks when split).
    pub fn call(&self) -> candle_core::Result<Vec<Tensor>> {
        if self.groups.len() == 1 {
            Ok(vec![self.group(&self.groups[0])?])
        } else {
            self.groups.par_iter().map(|g| self.group(g)).collect()
        }
    }

    /// One call, its output copied into `out` (dense `[1, seq, heads, head_dim]`).
    pub fn call_into(&self, out: &mut [f32]) -> candle_core::Result<()> {
        let PrefillShape {
            seq,
            heads,
            head_dim: d,
        } = self.shape;
        let mut h0 = 0;
        for t in self.call()? {
            let o = t.to_vec3::<f32>()?;
            for (hh, rows) in o.iter().enumerate() {
                for (i, row) in rows.iter().enumerate() {
                    out[(i * heads + h0 + hh) * d..][..d].copy_from_slice(row);
                }
            }
            h0 += o.len();
        }
        debug_assert_eq!(h0 * seq * d, out.len());
        Ok(())
    }
}

fn candle_err(e: candle_core::Error) -> BenchError {
    BenchError(format!("candle: {e}"))
}

/// `Ok` when `max |a − b| <= rel·scale` (NaN anywhere fails).
pub fn check_close(a: &[f32], b: &[f32], scale: f32, rel: f32) -> std::result::Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("lengths {} and {}", a.len(), b.len()));
    }
    let (mut worst, mut at) = (0f32, 0usize);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let diff = (x - y).abs();
        if diff.is_nan() {
            return Err(format!("element {i}: {x} vs {y}"));
        }
        if diff > worst {
            (worst, at) = (diff, i);
        }
    }
    if worst > rel * scale {
        return Err(format!(
            "element {at}: {} vs {} (|diff| {worst:e} > {rel:e}·{scale})",
            a[at], b[at]
        ));
    }
    Ok(())
}

fn prefill_id(shape: PrefillShape, mask: Mask, layout: &str, threads: usize) -> CaseId {
    CaseId {
        family: "attention",
        kernel: mask.tag().to_string(),
        shape: shape.name(),
        dtype: "f32".to_string(),
        layout: layout.to_string(),
        threads,
    }
}

fn run_prefill(
    id: &CaseId,
    x: &PrefillInputs,
    mask: Mask,
    peer: Peer,
    ctx: &Ctx<'_>,
) -> Result<Row> {
    let threads = id.threads;
    let isa = ctx.config.isa;
    let causal = mask.is_causal();
    let fail = |what: &str, e: String| BenchError(format!("{}: {what}: {e}", id.name()));
    let n = x.shape.elems();
    let v_max = x.v_max();
    let mut out = vec![f32::NAN; n];
    let mut want = vec![f32::NAN; n];
    let mut s = Vec::new();
    fused_attention(x, causal, &mut out, isa, threads)?;
    unfused_attention(x, causal, &mut want, &mut s, isa, threads)?;
    check_close(&out, &want, v_max, 1e-3)
        .map_err(|e| fail("fused and unfused attention disagree", e))?;
    let (t, p, name) = match peer {
        Peer::Unfused => {
            let (t, p) = measure_pair(
                &ctx.config.timing,
                || fused_attention(x, causal, &mut out, isa, threads).expect("succeeded above"),
                || {
                    unfused_attention(x, causal, &mut want, &mut s, isa, threads)
                        .expect("succeeded above")
                },
            );
            (t, p, "unfused")
        }
        Peer::Candle => {
            drop(s);
            let c = CandleAttention::new(x, causal, threads).map_err(candle_err)?;
            want.fill(f32::NAN);
            c.call_into(&mut want).map_err(candle_err)?;
            check_close(&out, &want, v_max, 1e-3)
                .map_err(|e| fail("fused attention and candle disagree", e))?;
            let (t, p) = measure_pair(
                &ctx.config.timing,
                || fused_attention(x, causal, &mut out, isa, threads).expect("succeeded above"),
                || {
                    black_box(c.call().expect("succeeded above"));
                },
            );
            (t, p, c.name())
        }
    };
    Ok(Row::new(
        id,
        isa.unwrap_or_else(Isa::detect).name(),
        prefill_work(x.shape, causal),
        t.median,
        t.reps,
        ctx.calibration,
        Some(PeerTime {
            name: name.into(),
            seconds: p.median,
        }),
    ))
}

/// Runs `f` in a rayon pool of `threads` new threads, and returns `f`'s result with the most
/// heap bytes held during `f` beyond those held when it started ([`alloc::measure_peak`]).
/// The threads are scoped: they are joined (their thread-local buffers freed) before this
/// returns, so one measurement cannot release memory during the next.
pub fn peak_on_fresh_threads<R: Send>(
    threads: usize,
    f: impl FnOnce() -> R + Send,
) -> Result<(R, Option<usize>)> {
    std::thread::scope(|scope| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .spawn_handler(|t| {
                std::thread::Builder::new()
                    .name(format!("tessera-fresh-{}", t.index()))
                    .spawn_scoped(scope, || t.run())
                    .map(|_| ())
            })
            .build()
            .map_err(|e| BenchError(format!("cannot start a thread pool: {e}")))?;
        // Let the workers start (and allocate their own bookkeeping) before counting.
        pool.broadcast(|_| ());
        let r = alloc::measure_peak(|| pool.install(f));
        drop(pool);
        Ok(r)
    })
}

/// Peak heap bytes beyond the operands of one fused and one unfused call, each on new
/// threads ([`peak_on_fresh_threads`]; `None` without the counting allocator); leaves their
/// outputs in `out` and `want`.
pub fn peak_memory(
    x: &PrefillInputs,
    causal: bool,
    out: &mut [f32],
    want: &mut [f32],
    isa: Option<Isa>,
    threads: usize,
) -> Result<(Option<usize>, Option<usize>)> {
    let (r, fused) =
        peak_on_fresh_threads(threads, || fused_attention(x, causal, out, isa, threads))?;
    r?;
    let (r, unfused) = peak_on_fresh_threads(threads, || {
        let mut s = Vec::new();
        unfused_attention(x, causal, want, &mut s, isa, threads)
    })?;
    r?;
    Ok((fused, unfused))
}

fn run_memory(id: &CaseId, shape: PrefillShape, ctx: &Ctx<'_>) -> Result<Row> {
    let threads = id.threads;
    let isa = ctx.config.isa;
    let x = PrefillInputs::new(shape);
    let n = shape.elems();
    let mut out = vec![f32::NAN; n];
    let mut want = vec![f32::NAN; n];
    let (fused_bytes, unfused_bytes) = peak_memory(&x, true, &mut out, &mut want, isa, threads)?;
    check_close(&out, &want, x.v_max(), 1e-3).map_err(|e| {
        BenchError(format!(
            "{}: fused and unfused attention disagree: {e}",
            id.name()
        ))
    })?;
    // Long calls: a few repetitions are enough for the time column.
    let timing = TimingConfig {
        warmup: 0,
        min_time: Duration::ZERO,
        min_reps: ctx.config.timing.min_reps.min(2),
        max_reps: 2,
        ..ctx.config.timing
    };
    let mut s = Vec::new();
    let (t, p) = measure_pair(
        &timing,
        || fused_attention(&x, true, &mut out, isa, threads).expect("succeeded above"),
        || unfused_attention(&x, true, &mut want, &mut s, isa, threads).expect("succeeded above"),
    );
    let mut row = Row::new(
        id,
        isa.unwrap_or_else(Isa::detect).name(),
        prefill_work(shape, true),
        t.median,
        t.reps,
        ctx.calibration,
        Some(PeerTime {
            name: "unfused".into(),
            seconds: p.median,
        }),
    );
    row.peak_bytes = fused_bytes.map(|b| b as u64);
    row.peer_peak_bytes = unfused_bytes.map(|b| b as u64);
    Ok(row)
}

// ---------------------------------------------------------------------------------------
// Decode.

/// One query token over a cache of `len` tokens, `heads` heads (as many K/V heads) of
/// `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    /// Cached tokens.
    pub len: usize,
    /// Heads.
    pub heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl DecodeShape {
    /// `1xLENxD` + `h` heads, e.g. `1x16384x128h12`.
    pub fn name(&self) -> String {
        format!("1x{}x{}h{}", self.len, self.head_dim, self.heads)
    }

    /// Dense `[1, 1, heads, head_dim]` (the query and the output).
    pub fn q_layout(&self) -> HeadLayout {
        HeadLayout::bshd(1, self.heads, self.head_dim)
    }
}

/// The table's name of a cache type.
pub fn dtype_name(dtype: KvDType) -> &'static str {
    match dtype {
        KvDType::F32 => "f32",
        KvDType::F16 => "f16",
        KvDType::Q8_0 => "q8_0",
    }
}

/// Bytes of one stored row of `head_dim` values.
pub fn row_bytes(head_dim: usize, dtype: KvDType) -> usize {
    match dtype {
        KvDType::F32 => 4 * head_dim,
        KvDType::F16 => 2 * head_dim,
        KvDType::Q8_0 => 34 * head_dim.div_ceil(32),
    }
}

/// Bytes of one sequence's K and V, every head, at the storage type: what a decode call reads.
pub fn cache_bytes(shape: DecodeShape, dtype: KvDType) -> usize {
    2 * shape.len * shape.heads * row_bytes(shape.head_dim, dtype)
}

/// Flops (`4·len·head_dim·heads`) and bytes (the cache, [`cache_bytes`]).
pub fn decode_work(shape: DecodeShape, dtype: KvDType) -> Work {
    Work {
        flops: 4.0 * (shape.len * shape.head_dim * shape.heads) as f64,
        bytes: cache_bytes(shape, dtype) as f64,
    }
}

/// How many sequences a decode case cycles through: together at least 3x the L3 (8 MiB at
/// least), at most [`MAX_COPIES`].
pub fn decode_copies(shape: DecodeShape, dtype: KvDType, l3: usize) -> usize {
    let l3 = l3.max(8 << 20);
    (3 * l3)
        .div_ceil(cache_bytes(shape, dtype).max(1))
        .clamp(1, MAX_COPIES)
}

/// The storage layout of a decode row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// [`KvLayout::Contiguous`].
    Contiguous,
    /// [`KvLayout::Paged`] with blocks of [`BLOCK_SIZE`] tokens.
    Paged,
    /// [`KvLayout::Paged`] with blocks of [`BIG_BLOCK_SIZE`] tokens.
    PagedBig,
}

impl CacheKind {
    /// The `B` column: `cont`, `paged` or `pg64`.
    pub fn tag(self) -> &'static str {
        match self {
            CacheKind::Contiguous => "cont",
            CacheKind::Paged => "paged",
            CacheKind::PagedBig => "pg64",
        }
    }

    /// Tokens per block (paged kinds).
    pub fn block_size(self) -> usize {
        match self {
            CacheKind::PagedBig => BIG_BLOCK_SIZE,
            _ => BLOCK_SIZE,
        }
    }
}

/// The decode cases' shapes and cache types (fewer with `quick`).
pub fn decode_configs(quick: bool) -> Vec<(DecodeShape, KvDType)> {
    let s = |len, head_dim| DecodeShape {
        len,
        heads: HEADS,
        head_dim,
    };
    let mut v = Vec::new();
    if quick {
        for len in [512, 4096] {
            for dtype in [KvDType::F16, KvDType::Q8_0] {
                v.push((s(len, 64), dtype));
            }
        }
        return v;
    }
    for head_dim in [64, 128] {
        for len in [512, 4096, 16384] {
            for dtype in [KvDType::F16, KvDType::Q8_0] {
                v.push((s(len, head_dim), dtype));
            }
        }
        v.push((s(16384, head_dim), KvDType::F32));
    }
    v
}

/// A cache holding `seqs.len()` identical sequences of random K and V (uniform in [-1, 1)),
/// and a random query.
pub struct DecodeInputs {
    /// The problem.
    pub shape: DecodeShape,
    /// The cache.
    pub cache: KvCache,
    /// Its sequences, each `shape.len` tokens.
    pub seqs: Vec<SeqId>,
    /// `[1, 1, heads, head_dim]`.
    pub q: Vec<f32>,
}

impl DecodeInputs {
    /// Builds the cache: `copies` sequences, appended to in turns of [`BLOCK_SIZE`] tokens.
    pub fn new(
        shape: DecodeShape,
        dtype: KvDType,
        kind: CacheKind,
        copies: usize,
    ) -> tessera_core::Result<DecodeInputs> {
        let DecodeShape {
            len,
            heads,
            head_dim: d,
        } = shape;
        let copies = copies.max(1);
        let layout = match kind {
            CacheKind::Contiguous => KvLayout::Contiguous {
                max_seqs: copies,
                max_len: len.max(1),
            },
            CacheKind::Paged | CacheKind::PagedBig => KvLayout::Paged {
                block_size: kind.block_size(),
                num_blocks: (copies * len.div_ceil(kind.block_size())).max(1),
            },
        };
        let mut cache = KvCache::new(KvCacheConfig {
            n_kv_heads: heads,
            head_dim: d,
            dtype,
            layout,
        })?;
        let k = random_f32(len * heads * d, 0x5EED_D001);
        let v = random_f32(len * heads * d, 0x5EED_D002);
        let l = HeadLayout::bshd(len, heads, d);
        let seqs = (0..copies)
            .map(|_| cache.add_sequence())
            .collect::<tessera_core::Result<Vec<_>>>()?;
        for t0 in (0..len).step_by(BLOCK_SIZE) {
            let n = BLOCK_SIZE.min(len - t0);
            let o = t0 * heads * d;
            for &seq in &seqs {
                cache.append(seq, Heads::new(&k[o..], l), Heads::new(&v[o..], l), n)?;
            }
        }
        Ok(DecodeInputs {
            shape,
            cache,
            seqs,
            q: random_f32(heads * d, 0x5EED_D003),
        })
    }

    /// The sequence call `i` attends.
    pub fn seq(&self, i: usize) -> SeqId {
        self.seqs[i % self.seqs.len()]
    }
}

/// Tessera's decode attention of the query over sequence `seq`, into `out`
/// (`heads·head_dim` floats).
pub fn fused_decode(
    x: &DecodeInputs,
    seq: SeqId,
    out: &mut [f32],
    isa: Option<Isa>,
    threads: usize,
) -> tessera_core::Result<()> {
    let opts = DecodeOptions {
        isa,
        parallelism: par(threads),
    };
    let l = x.shape.q_layout();
    decode_attention_with(
        &opts,
        &x.cache,
        &[seq],
        x.shape.heads,
        Heads::new(&x.q, l),
        HeadsMut::new(out, l),
        &DecodeParams::new(x.shape.head_dim),
    )
}

/// Buffers of [`unfused_decode`].
#[derive(Default)]
pub struct DecodeScratch {
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

/// The decode peer: reads `seq` back as dense f32 `[len, heads, head_dim]`
/// ([`KvCache::read`]), then per head the scores `scale·q·Kᵀ` (a GEMV by Tessera's GEMM), the
/// softmax ([`softmax_row`]) and `p·V` (a GEMV), into `out`.
pub fn unfused_decode(
    x: &DecodeInputs,
    seq: SeqId,
    out: &mut [f32],
    scratch: &mut DecodeScratch,
    isa: Option<Isa>,
    threads: usize,
) -> tessera_core::Result<()> {
    let DecodeShape {
        heads, head_dim: d, ..
    } = x.shape;
    tessera_core::shape::check_len("out", heads * d, out.len())?;
    let len = x.cache.seq_len(seq)?;
    let n = len * heads * d;
    scratch.k.resize(n, 0.0);
    scratch.v.resize(n, 0.0);
    scratch.p.resize(len, 0.0);
    x.cache.read(seq, &mut scratch.k, &mut scratch.v)?;
    if len == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let opts = GemmOptions {
        isa,
        parallelism: par(threads),
        blocking: None,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let ld = heads * d;
    for h in 0..heads {
        let o = h * d;
        gemm_with(
            &opts,
            scale,
            MatRef::dense(&x.q[o..o + d], 1, d),
            MatRef::new(&scratch.k[o..], len, d, ld),
            Transpose::Yes,
            0.0,
            MatMut::dense(&mut scratch.p, 1, len),
        )?;
        softmax_row(&mut scratch.p, len);
        gemm_with(
            &opts,
            1.0,
            MatRef::dense(&scratch.p, 1, len),
            MatRef::new(&scratch.v[o..], len, d, ld),
            Transpose::No,
            0.0,
            MatMut::dense(&mut out[o..o + d], 1, d),
        )?;
    }
    Ok(())
}

fn run_decode(id: &CaseId, x: &DecodeInputs, dtype: KvDType, ctx: &Ctx<'_>) -> Result<Row> {
    let threads = id.threads;
    let isa = ctx.config.isa;
    let n = x.shape.heads * x.shape.head_dim;
    let mut out = vec![f32::NAN; n];
    let mut want = vec![f32::NAN; n];
    let mut scratch = DecodeScratch::default();
    fused_decode(x, x.seq(0), &mut out, isa, threads)?;
    unfused_decode(x, x.seq(0), &mut want, &mut scratch, isa, threads)?;
    // Both compute with the stored values; V is uniform in [-1, 1).
    check_close(&out, &want, 1.0, 1e-3).map_err(|e| {
        BenchError(format!(
            "{}: decode attention and the unfused path disagree: {e}",
            id.name()
        ))
    })?;
    let (mut i, mut j) = (0usize, 0usize);
    let (t, p) = measure_pair(
        &ctx.config.timing,
        || {
            i += 1;
            fused_decode(x, x.seq(i), &mut out, isa, threads).expect("succeeded above")
        },
        || {
            j += 1;
            unfused_decode(x, x.seq(j), &mut want, &mut scratch, isa, threads)
                .expect("succeeded above")
        },
    );
    let mut row = Row::new(
        id,
        isa.unwrap_or_else(Isa::detect).name(),
        decode_work(x.shape, dtype),
        t.median,
        t.reps,
        ctx.calibration,
        Some(PeerTime {
            name: "unfused".into(),
            seconds: p.median,
        }),
    );
    // A decode step streams the cache: held to the bandwidth whatever the machine balance.
    row.bound = "memory".into();
    row.peak_fraction = row.gbs / ctx.calibration.bandwidth_gbs(threads);
    Ok(row)
}

// ---------------------------------------------------------------------------------------
// Cases.

/// The family's cases: prefill (shape x mask x threads x peer), decode (shape x cache type x
/// layout x threads), memory (shape x threads).
pub fn cases(cfg: &Config) -> Vec<Case> {
    let mut out = Vec::new();
    for shape in prefill_shapes(cfg.quick) {
        let data: Arc<OnceLock<PrefillInputs>> = Arc::new(OnceLock::new());
        for mask in [Mask::Causal, Mask::Bidirectional] {
            for &threads in &cfg.threads {
                for peer in [Peer::Unfused, Peer::Candle] {
                    let id = prefill_id(shape, mask, peer.tag(), threads);
                    let case_id = id.clone();
                    let data = Arc::clone(&data);
                    let run: RunFn = Box::new(move |ctx| {
                        let x = data.get_or_init(|| PrefillInputs::new(shape));
                        run_prefill(&case_id, x, mask, peer, ctx)
                    });
                    out.push(Case { id, run });
                }
            }
        }
    }
    type SharedCache = Arc<OnceLock<std::result::Result<DecodeInputs, BenchError>>>;
    let l3 = CacheInfo::detect().l3;
    for (shape, dtype) in decode_configs(cfg.quick) {
        let copies = decode_copies(shape, dtype, l3);
        let kinds: &[CacheKind] = if dtype == KvDType::F16 {
            &[CacheKind::Contiguous, CacheKind::Paged, CacheKind::PagedBig]
        } else {
            &[CacheKind::Contiguous, CacheKind::Paged]
        };
        for &kind in kinds {
            let data: SharedCache = Arc::new(OnceLock::new());
            for &threads in &cfg.threads {
                let id = CaseId {
                    family: "attention",
                    kernel: "decode".to_string(),
                    shape: shape.name(),
                    dtype: dtype_name(dtype).to_string(),
                    layout: kind.tag().to_string(),
                    threads,
                };
                let case_id = id.clone();
                let data = Arc::clone(&data);
                let run: RunFn = Box::new(move |ctx| {
                    let x = data
                        .get_or_init(|| {
                            DecodeInputs::new(shape, dtype, kind, copies).map_err(BenchError::from)
                        })
                        .as_ref()
                        .map_err(Clone::clone)?;
                    run_decode(&case_id, x, dtype, ctx)
                });
                out.push(Case { id, run });
            }
        }
    }
    for shape in memory_shapes(cfg.quick) {
        for &threads in &cfg.threads {
            let id = prefill_id(shape, Mask::Causal, "mem", threads);
            let case_id = id.clone();
            let run: RunFn = Box::new(move |ctx| run_memory(&case_id, shape, ctx));
            out.push(Case { id, run });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::calibrate::tests_support::fixed;

    fn fresh_pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    fn cfg(threads: Vec<usize>, quick: bool) -> Config {
        Config {
            threads,
            quick,
            filters: vec![],
            isa: None,
            timing: TimingConfig {
                warmup: 0,
                min_time: Duration::ZERO,
                min_reps: 2,
                max_reps: 2,
                max_time: Duration::from_secs(5),
            },
        }
    }

    #[test]
    fn case_names_and_counts() {
        let names: Vec<String> = cases(&cfg(vec![1, 2], false))
            .iter()
            .map(|c| c.id.name())
            .collect();
        // Prefill: 4 shapes x 2 masks x 2 threads x 2 peers; decode: (2 x 3 x 2 + 2) configs
        // x 2 layouts x 2 threads, plus the 6 f16 configs x pg64 x 2 threads; memory: 2
        // shapes x 2 threads.
        assert_eq!(names.len(), 32 + 56 + 12 + 4);
        for want in [
            "attention/causal/2048x2048x128h12/f32/unf/t1",
            "attention/bidir/512x512x64h12/f32/candle/t2",
            "attention/decode/1x16384x128h12/q8_0/paged/t2",
            "attention/decode/1x16384x64h12/f32/cont/t1",
            "attention/decode/1x512x64h12/f16/cont/t1",
            "attention/decode/1x16384x64h12/f16/pg64/t2",
            "attention/causal/8192x8192x64h12/f32/mem/t2",
        ] {
            assert!(names.iter().any(|n| n == want), "missing {want}");
        }
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "case names are unique");
        // Every prefill shape fits the table's 16-character shape column.
        assert!(prefill_shapes(false).iter().all(|s| s.name().len() <= 16));
        let quick = cases(&cfg(vec![1], true));
        // Quick: 2 f16 and 2 Q8_0 decode configs x 2 layouts, the f16 ones also pg64.
        assert_eq!(quick.len(), 2 * 2 + 2 * 2 * 2 + 2 + 1);
    }

    #[test]
    fn filters_select_attention_rows() {
        let mut c = cfg(vec![1, 2], false);
        c.filters = vec!["/paged/".into()];
        let fam = crate::bench::family("attention").unwrap();
        let sel = crate::bench::select_cases(&c, &[fam]);
        assert_eq!(sel.len(), 14 * 2);
        assert!(sel.iter().all(|(_, c)| c.id.kernel == "decode"));
        c.filters = vec!["causal/".into()];
        let sel = crate::bench::select_cases(&c, &[fam]);
        assert_eq!(sel.len(), 16 + 4);
    }

    #[test]
    fn flops_count_only_unmasked_pairs() {
        let s = PrefillShape {
            seq: 4,
            heads: 2,
            head_dim: 8,
        };
        assert_eq!(attended_pairs(4, false), 16);
        assert_eq!(attended_pairs(4, true), 1 + 2 + 3 + 4);
        assert_eq!(prefill_work(s, false).flops, 4.0 * 8.0 * 2.0 * 16.0);
        assert_eq!(prefill_work(s, true).flops, 4.0 * 8.0 * 2.0 * 10.0);
        let big = PrefillShape {
            seq: 2048,
            heads: 12,
            head_dim: 128,
        };
        assert_eq!(big.name(), "2048x2048x128h12");
        let (c, b) = (prefill_work(big, true), prefill_work(big, false));
        assert!((c.flops / b.flops - 0.5).abs() < 1e-3);
        assert_eq!(b.bytes, 16.0 * 2048.0 * 12.0 * 128.0);
    }

    #[test]
    fn decode_bytes_and_rotation() {
        let s = DecodeShape {
            len: 4096,
            heads: 12,
            head_dim: 64,
        };
        assert_eq!(cache_bytes(s, KvDType::F16), 2 * 4096 * 12 * 64 * 2);
        assert_eq!(cache_bytes(s, KvDType::Q8_0), 2 * 4096 * 12 * 2 * 34);
        assert_eq!(cache_bytes(s, KvDType::F32), 2 * 4096 * 12 * 64 * 4);
        assert_eq!(
            decode_work(s, KvDType::F16).flops,
            4.0 * 4096.0 * 64.0 * 12.0
        );
        let l3 = 32 << 20;
        let c = decode_copies(s, KvDType::F16, l3);
        assert!(c * cache_bytes(s, KvDType::F16) >= 3 * l3);
        assert!((c - 1) * cache_bytes(s, KvDType::F16) < 3 * l3);
        let huge = DecodeShape { len: 16384, ..s };
        assert_eq!(decode_copies(huge, KvDType::F32, 8 << 20), 1);
        let tiny = DecodeShape { len: 16, ..s };
        assert_eq!(decode_copies(tiny, KvDType::Q8_0, l3), MAX_COPIES);
    }

    #[test]
    fn exp_poly_is_accurate() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp_poly(x), f64::from(x).exp());
            assert!(
                ((f64::from(got) - want) / want).abs() < 5e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp_poly(0.0), 1.0);
        assert!(exp_poly(-1e4) < 1e-37);
    }

    #[test]
    fn softmax_row_masks_and_normalizes() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let orig = row.clone();
        softmax_row(&mut row, 23);
        assert!(row[23..].iter().all(|&x| x == 0.0));
        let m = orig[..23].iter().fold(f32::MIN, |a, &b| a.max(b));
        let z: f64 = orig[..23].iter().map(|&s| f64::from(s - m).exp()).sum();
        for (got, &s) in row.iter().zip(&orig[..23]) {
            let want = f64::from(s - m).exp() / z;
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    /// The unfused peer (and the fused kernel, and candle) against the f64 reference.
    #[test]
    fn peers_agree_with_the_reference() {
        let shape = PrefillShape {
            seq: 37,
            heads: 3,
            head_dim: 24,
        };
        let x = PrefillInputs::new(shape);
        let l = shape.layout();
        let n = shape.elems();
        for causal in [false, true] {
            let mut params = AttentionParams::new(shape.head_dim);
            if causal {
                params = params.causal(0);
            }
            let r = tessera_core::reference::attention(
                &shape.attention_shape(),
                Heads::new(&x.q, l),
                Heads::new(&x.k, l),
                Heads::new(&x.v, l),
                &params,
            )
            .unwrap();
            let want: Vec<f32> = r.out.iter().map(|&v| v as f32).collect();
            for threads in [1, 2] {
                let pool = fresh_pool(threads);
                pool.install(|| {
                    let mut out = vec![f32::NAN; n];
                    let mut s = Vec::new();
                    unfused_attention(&x, causal, &mut out, &mut s, None, threads).unwrap();
                    check_close(&out, &want, 1.0, 1e-5).unwrap();
                    out.fill(f32::NAN);
                    fused_attention(&x, causal, &mut out, None, threads).unwrap();
                    check_close(&out, &want, 1.0, 1e-5).unwrap();
                    let c = CandleAttention::new(&x, causal, threads).unwrap();
                    out.fill(f32::NAN);
                    c.call_into(&mut out).unwrap();
                    check_close(&out, &want, 1.0, 1e-5).unwrap();
                });
            }
        }
        // A wrong result is caught.
        let mut bad = vec![0f32; n];
        bad[5] = 0.5;
        assert!(check_close(&bad, &vec![0f32; n], 1.0, 1e-3).is_err());
        assert!(check_close(&[f32::NAN], &[0.0], 1.0, 1e-3).is_err());
    }

    #[test]
    fn unfused_decode_agrees_with_the_kernel() {
        let shape = DecodeShape {
            len: 45,
            heads: 4,
            head_dim: 40,
        };
        for dtype in [KvDType::F32, KvDType::F16, KvDType::Q8_0] {
            for kind in [CacheKind::Contiguous, CacheKind::Paged] {
                let x = DecodeInputs::new(shape, dtype, kind, 3).unwrap();
                assert_eq!(x.seqs.len(), 3);
                let mut a = vec![f32::NAN; 160];
                let mut b = vec![f32::NAN; 160];
                fused_decode(&x, x.seq(2), &mut a, None, 1).unwrap();
                let mut sc = DecodeScratch::default();
                unfused_decode(&x, x.seq(2), &mut b, &mut sc, None, 1).unwrap();
                check_close(&a, &b, 1.0, 1e-5).unwrap();
            }
        }
    }

    fn run_one(name: &str, threads: usize) -> Row {
        let c = cfg(vec![threads], true);
        let cal = fixed();
        let ctx = Ctx {
            config: &c,
            calibration: &cal,
        };
        let case = cases(&c)
            .into_iter()
            .find(|k| k.id.name() == name)
            .unwrap_or_else(|| panic!("no case {name}"));
        let pool = fresh_pool(threads);
        let run = case.run;
        pool.install(|| run(&ctx)).unwrap()
    }

    #[test]
    fn quick_cases_run_end_to_end() {
        let r = run_one("attention/causal/256x256x64h12/f32/candle/t2", 2);
        assert_eq!(r.peer.as_deref(), Some("candle-split"));
        assert!(r.seconds > 0.0 && r.peer_ratio.unwrap() > 0.0);
        assert_eq!(r.bound, "compute");
        let r = run_one("attention/bidir/256x256x64h12/f32/unf/t1", 1);
        assert_eq!(r.peer.as_deref(), Some("unfused"));
        let r = run_one("attention/decode/1x512x64h12/q8_0/paged/t1", 1);
        assert_eq!(r.bound, "memory");
        let bytes = r.gbs * r.seconds * 1e9;
        assert!(
            (bytes / (2 * 512 * 12 * 2 * 34) as f64 - 1.0).abs() < 1e-9,
            "{bytes}"
        );
    }

    #[test]
    fn memory_row_reports_peak_bytes() {
        let shape = PrefillShape {
            seq: 512,
            heads: 2,
            head_dim: 64,
        };
        let x = PrefillInputs::new(shape);
        let mut out = vec![0f32; shape.elems()];
        let mut want = vec![0f32; shape.elems()];
        let (fused, unfused) = peak_memory(&x, true, &mut out, &mut want, None, 1).unwrap();
        // The unfused path holds at least one head's 512 x 512 scores (other tests may
        // allocate meanwhile, so only lower bounds hold).
        assert!(unfused.unwrap() >= 512 * 512 * 4, "{unfused:?}");
        // The fused path packs one head's K and V on its fresh thread.
        assert!(fused.unwrap() >= 2 * 512 * 64 * 4, "{fused:?}");
        check_close(&out, &want, 1.0, 1e-3).unwrap();
    }
}
