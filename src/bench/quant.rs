//! The `quant` family: quantized matmul `C = A·Wᵀ` (`tessera_cpu::quant::matmul_with`) with
//! f32 activations `A` (`m x k`) and GGML-block weights `W` (`n` rows of `k` values, the layout
//! of a GGUF tensor and of a Hugging Face `Linear` weight), for Q8_0, Q4_0 and Q4_K weights,
//! against two peers on the same blocks:
//!
//! * `deq` — dequantize the weights to f32 (`tessera_core::quant::dequantize`, row ranges
//!   split across the threads) and multiply with Tessera's own f32 GEMM
//!   (`tessera_cpu::gemm`, `B` stored `[n, k]`), both timed in every call: what an engine
//!   without quantized kernels does;
//! * `candle` — `candle-core`'s quantized matmul (`QMatMul::forward` on a `QTensor` built from
//!   the same block bytes), which quantizes the activations to Q8_0 / Q8_K as Tessera does.
//!
//! A third row per kernel, shape, format and thread count (`B` = `pack`) times Tessera on
//! weights packed once for the ISA's kernels (`tessera_cpu::quant::PackedWeights`, what an
//! engine does at load time; `matmul_packed_with`) against Tessera on the blocks as given
//! (peer `plain`): the gain of the repacking.
//!
//! The row format has one peer column, so every kernel, shape, format and thread count gives
//! one row per peer, Tessera timed again in each (alternating calls with that peer); the `B`
//! column (the weight layout in other families; always `[n,k]` here) names the peer.
//!
//! Shapes: the GEMV of one token through a 4096 → 4096 and a 4096 → 11008 projection
//! (LLaMA-7B attention and MLP) and the GEMM of 16, 128 and 512 tokens through 4096 → 4096.
//! GEMV rows are memory-bound: their bytes are the weight bytes, so their GB/s and `%peak`
//! are the weight stream against the calibrated read bandwidth; each call reads the next of
//! several copies of the weights (at least 3x the L3 in all), so the weights come from memory
//! as in a real decode step, not from a cache warmed by the previous call. GEMM rows report
//! GFLOP/s of `2·m·n·k` (bytes: weights, `A` and `C`) and, as `%peak`, their fraction of the
//! calibrated int8 dot-product peak (the kernels' work is u8 × s8 multiply-adds), not of the
//! f32 FMA peak; on a CPU without an int8 calibration loop they stay on the FMA peak.
//!
//! Threads: Tessera, the GEMM of `deq` and its dequantization run in the case's rayon pool.
//! candle has its own pool, sized once per process from `CANDLE_NUM_THREADS`. Unless that
//! variable is set, [`cases`] sets it to 1; candle then runs single-threaded on 1-thread rows
//! and, on N-thread rows, as N single-threaded calls on N row ranges of the weights (one
//! `QTensor` each) run as rayon tasks (peer name `candle-split`). With `CANDLE_NUM_THREADS=N`
//! set by the user, only the N-thread rows get a candle row, timed with candle's own threads
//! (whose workers spin for a while after each call, `CANDLE_BARRIER_POOL_SPIN_LIMIT`
//! iterations, 25 000 by default, which can slow the Tessera call that follows).
//!
//! Before timing, every case checks Tessera against the reference (`quant_dot` of the
//! reference-quantized activations, at 16 elements, within the derived rounding bound), and
//! Tessera and the peer against the f64 product of the dequantized weights with the f32
//! activations (16 elements, within the activation quantization bound), and Tessera against
//! the peer on every element.

use super::data::random_f32;
use super::gemm::{GemmShape, compare};
use super::report::{CaseId, PeerTime, Row, Work};
use super::timing::measure_pair;
use super::{BenchError, Case, Config, Ctx, Result, RunFn};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use tessera_core::quant::{BlockQ4_0, BlockQ4_K, BlockQ8_0, QuantBlock, QuantFormat};
use tessera_core::reference::{DotReference, quant_dot};
use tessera_core::{MatMut, MatRef, Transpose};
use tessera_cpu::gemm::{GemmOptions, gemm_with};
use tessera_cpu::quant::{PackedWeights, QuantOptions, matmul_packed_with, matmul_with};
use tessera_cpu::{CacheInfo, Isa, Parallelism};

/// A weight block type the family benchmarks: its reference dot product and candle's name
/// for it.
pub trait BenchBlock: DotReference {
    /// candle's type of the same bytes.
    const GGML: GgmlDType;

    /// Values per block of the activations candle quantizes to for an `[n, k]` weight of
    /// this format: the format's own activation block ([`WeightRow::ACT_LEN`]) unless
    /// candle takes a path that quantizes them otherwise.
    fn candle_act_len(_n: usize, _k: usize) -> usize {
        <Self as WeightRow>::ACT_LEN
    }
}

impl BenchBlock for BlockQ8_0 {
    const GGML: GgmlDType = GgmlDType::Q8_0;

    /// candle-core 0.11 (`quantized/repack_x86.rs`, `select` and `level`): on a CPU with
    /// AVX-512 F + VNNI, unless `MISTRALRS_FORCE_AVX2` or `MISTRALRS_FORCE_AVXVNNI` is `1`,
    /// a Q8_0 weight with `n % 16 == 0` and `k % 256 == 0` is repacked for `vpdpbusd` and
    /// multiplied by activations quantized to **Q8_K** (one scale per 256 values) rather
    /// than Q8_0 (one per 32): a coarser activation grid than Tessera's, so its results
    /// differ from Tessera's by that rounding, not by f32 summation order alone.
    fn candle_act_len(n: usize, k: usize) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            let forced = ["MISTRALRS_FORCE_AVX2", "MISTRALRS_FORCE_AVXVNNI"]
                .iter()
                .any(|v| std::env::var(v).as_deref() == Ok("1"));
            if !forced
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && n.is_multiple_of(16)
                && k.is_multiple_of(256)
                && k > 0
            {
                return 256;
            }
        }
        let _ = (n, k);
        <Self as WeightRow>::ACT_LEN
    }
}
impl BenchBlock for BlockQ4_0 {
    const GGML: GgmlDType = GgmlDType::Q4_0;
}
impl BenchBlock for BlockQ4_K {
    const GGML: GgmlDType = GgmlDType::Q4K;
}

/// The weight formats, in run order.
pub const FORMATS: [QuantFormat; 3] = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4K];

/// The peer of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Dequantize to f32, then Tessera's f32 GEMM.
    DeqGemm,
    /// candle's `QMatMul`.
    Candle,
    /// Tessera on weights packed once ([`PackedWeights`]) against Tessera on the blocks as
    /// given (the peer, `plain`).
    Packed,
}

impl Peer {
    /// The name in the `B` column and in the case name.
    pub fn tag(self) -> &'static str {
        match self {
            Peer::DeqGemm => "deq",
            Peer::Candle => "candle",
            Peer::Packed => "pack",
        }
    }
}

/// The benchmarked shapes (fewer with `quick`).
pub fn shapes(quick: bool) -> Vec<GemmShape> {
    let s = |m, n, k| GemmShape { m, n, k };
    if quick {
        return vec![s(1, 4096, 4096), s(16, 4096, 4096)];
    }
    vec![
        s(1, 4096, 4096),
        s(1, 11008, 4096),
        s(16, 4096, 4096),
        s(128, 4096, 4096),
        s(512, 4096, 4096),
    ]
}

/// Bytes of the `n x k` weights in `format`.
pub fn weight_bytes(shape: GemmShape, format: QuantFormat) -> usize {
    shape.n * (shape.k / format.block_len()) * format.block_bytes()
}

/// Flops (2mnk) and bytes: the weights alone for a GEMV (what bounds it), the weights, `A`
/// and `C` for a GEMM.
pub fn work(shape: GemmShape, format: QuantFormat) -> Work {
    let (m, n, k) = (shape.m as f64, shape.n as f64, shape.k as f64);
    let w = weight_bytes(shape, format) as f64;
    Work {
        flops: 2.0 * m * n * k,
        bytes: if shape.m == 1 {
            w
        } else {
            w + 4.0 * (m * k + m * n)
        },
    }
}

/// How many copies of the weights a case cycles through: for a GEMV, enough that together
/// they fill 3x the L3 (so each call reads its weights from memory), at most 32; one for a
/// GEMM.
pub fn rotation_copies(shape: GemmShape, format: QuantFormat, l3: usize) -> usize {
    if shape.m > 1 {
        return 1;
    }
    let l3 = l3.max(8 << 20);
    (3 * l3)
        .div_ceil(weight_bytes(shape, format).max(1))
        .clamp(1, 32)
}

fn par(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Threads(threads)
    } else {
        Parallelism::Sequential
    }
}

/// candle's thread count for this process: `CANDLE_NUM_THREADS` if it holds a positive
/// count; otherwise sets the variable to 1 (before candle's first use, which reads it once)
/// and returns 1.
///
/// The harness calls this from [`cases`] on the main thread before it starts any other
/// thread; call it likewise, before other threads may read the environment.
pub fn candle_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        let set = std::env::var("CANDLE_NUM_THREADS")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0);
        set.unwrap_or_else(|| {
            // SAFETY: called before the harness starts its threads (see above), so nothing
            // reads the environment concurrently.
            unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
            1
        })
    })
}

/// The family's cases: every shape x format x thread count x peer; candle rows as
/// [`candle_threads`] allows (see the module documentation).
pub fn cases(cfg: &Config) -> Vec<Case> {
    case_list(cfg, candle_threads())
}

/// [`cases`] for a given candle thread count.
pub fn case_list(cfg: &Config, candle_threads: usize) -> Vec<Case> {
    let l3 = CacheInfo::detect().l3;
    let mut out = Vec::new();
    for shape in shapes(cfg.quick) {
        for format in FORMATS {
            let copies = rotation_copies(shape, format, l3);
            match format {
                QuantFormat::Q8_0 => {
                    push_cases::<BlockQ8_0>(&mut out, cfg, shape, copies, candle_threads)
                }
                QuantFormat::Q4_0 => {
                    push_cases::<BlockQ4_0>(&mut out, cfg, shape, copies, candle_threads)
                }
                QuantFormat::Q4K => {
                    push_cases::<BlockQ4_K>(&mut out, cfg, shape, copies, candle_threads)
                }
                QuantFormat::Q8K => unreachable!("not a weight format"),
            }
        }
    }
    out
}

/// The cases of one shape and format; they share its inputs, made by the first one that runs
/// (and dropped after the last).
fn push_cases<W: BenchBlock>(
    out: &mut Vec<Case>,
    cfg: &Config,
    shape: GemmShape,
    copies: usize,
    candle_threads: usize,
) {
    let data: Arc<OnceLock<Weights<W>>> = Arc::new(OnceLock::new());
    for &threads in &cfg.threads {
        for peer in [Peer::DeqGemm, Peer::Candle, Peer::Packed] {
            // candle: the split below needs a single-threaded candle; otherwise only its own
            // thread count is comparable.
            let candle_split = candle_threads == 1 && threads > 1;
            if peer == Peer::Candle && !(candle_threads == threads || candle_split) {
                continue;
            }
            let id = CaseId {
                family: "quant",
                kernel: shape.kernel().to_string(),
                shape: shape.name(),
                dtype: W::FORMAT.name().to_string(),
                layout: peer.tag().to_string(),
                threads,
            };
            let case_id = id.clone();
            let data = Arc::clone(&data);
            let run: RunFn = Box::new(move |ctx| {
                let w = data.get_or_init(|| Weights::new(shape, copies));
                let parts = if candle_split { threads } else { 1 };
                run_case(&case_id, w, peer, parts, ctx)
            });
            out.push(Case { id, run });
        }
    }
}

/// A case's inputs: random activations and random weights quantized with the reference
/// quantizer, in `copies` identical copies.
pub struct Weights<W> {
    /// The problem.
    pub shape: GemmShape,
    /// `A`, dense `m x k`, uniform in [-1, 1).
    pub a: Vec<f32>,
    /// The weight blocks (dense `n x k / W::LEN`), `copies` times.
    pub copies: Vec<Vec<W>>,
}

impl<W: QuantBlock> Weights<W> {
    /// Quantizes uniform [-1, 1) weights (on every core) and copies them.
    ///
    /// # Panics
    /// If `k` is not a multiple of the block length (the family's shapes all are).
    pub fn new(shape: GemmShape, copies: usize) -> Weights<W> {
        let GemmShape { m, n, k } = shape;
        assert!(
            k > 0 && k.is_multiple_of(W::LEN),
            "k must be a multiple of the block"
        );
        let a = random_f32(m * k, 0x5EED_0011);
        let x = random_f32(n * k, 0x5EED_0012);
        let mut w = vec![W::zeroed(); n * (k / W::LEN)];
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let rows = n.div_ceil(cores).max(1);
        std::thread::scope(|s| {
            for (xc, wc) in x.chunks(rows * k).zip(w.chunks_mut(rows * (k / W::LEN))) {
                s.spawn(move || {
                    tessera_core::quant::quantize(xc, wc).expect("whole blocks by construction")
                });
            }
        });
        drop(x);
        let mut v = Vec::with_capacity(copies.max(1));
        for _ in 1..copies.max(1) {
            v.push(w.clone());
        }
        v.push(w);
        Weights {
            shape,
            a,
            copies: v,
        }
    }
}

/// The `deq` peer: `C = A·deq(W)ᵀ`, dequantizing `w` into `wf` (`n·k` floats; split in row
/// ranges across `threads` rayon tasks) and calling Tessera's f32 GEMM with `isa`.
#[allow(clippy::too_many_arguments)]
pub fn deq_gemm<W: QuantBlock>(
    shape: GemmShape,
    a: &[f32],
    w: &[W],
    wf: &mut [f32],
    c: &mut [f32],
    isa: Isa,
    threads: usize,
) -> tessera_core::Result<()> {
    let GemmShape { m, n, k } = shape;
    let kb = k / W::LEN;
    if threads > 1 && n > 1 {
        let rows = n.div_ceil(threads);
        wf.par_chunks_mut(rows * k)
            .zip(w.par_chunks(rows * kb))
            .try_for_each(|(o, b)| tessera_core::quant::dequantize(b, o))?;
    } else {
        tessera_core::quant::dequantize(w, wf)?;
    }
    let opts = GemmOptions {
        isa: Some(isa),
        parallelism: par(threads),
        blocking: None,
    };
    gemm_with(
        &opts,
        1.0,
        MatRef::dense(a, m, k),
        MatRef::dense(wf, n, k),
        Transpose::Yes,
        0.0,
        MatMut::dense(c, m, n),
    )
}

/// The `candle` peer: one `QMatMul` per row range (`parts` ranges) per weight copy, and `A` as
/// a candle tensor.
pub struct CandlePeer {
    shape: GemmShape,
    /// `copies[i]` = `(first row, rows, matmul)` of each range of copy `i`.
    copies: Vec<Vec<(usize, usize, QMatMul)>>,
    xs: Tensor,
}

impl CandlePeer {
    /// Builds the candle tensors from the same bytes as `w` (candle copies them).
    pub fn new<W: BenchBlock>(w: &Weights<W>, parts: usize) -> candle_core::Result<CandlePeer> {
        let GemmShape { m, n, k } = w.shape;
        let kb = k / W::LEN;
        let rows = n.div_ceil(parts.max(1)).max(1);
        let mut copies = Vec::with_capacity(w.copies.len());
        for blocks in &w.copies {
            let mut ranges = Vec::new();
            for r0 in (0..n).step_by(rows) {
                let r = rows.min(n - r0);
                let bytes: &[u8] = bytemuck::cast_slice(&blocks[r0 * kb..(r0 + r) * kb]);
                let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, W::GGML)?;
                let qt = QTensor::new(storage, (r, k))?;
                ranges.push((r0, r, QMatMul::from_qtensor(qt)?));
            }
            copies.push(ranges);
        }
        let xs = Tensor::from_slice(&w.a, (m, k), &Device::Cpu)?;
        Ok(CandlePeer {
            shape: w.shape,
            copies,
            xs,
        })
    }

    /// Whether a call is several single-threaded calls (`candle-split`).
    pub fn is_split(&self) -> bool {
        self.copies.first().is_some_and(|c| c.len() > 1)
    }

    /// The peer's name in a row.
    pub fn name(&self) -> &'static str {
        if self.is_split() {
            "candle-split"
        } else {
            "candle"
        }
    }

    /// One call on copy `i`: `A·Wᵀ` of each row range (as rayon tasks when split); the
    /// outputs, one `m x rows` tensor per range.
    pub fn call(&self, i: usize) -> candle_core::Result<Vec<Tensor>> {
        let ranges = &self.copies[i % self.copies.len()];
        if ranges.len() == 1 {
            Ok(vec![ranges[0].2.forward(&self.xs)?])
        } else {
            ranges
                .par_iter()
                .map(|(_, _, q)| q.forward(&self.xs))
                .collect()
        }
    }

    /// One call on copy `i`, gathered into `c` (dense `m x n`).
    pub fn call_into(&self, i: usize, c: &mut [f32]) -> candle_core::Result<()> {
        let GemmShape { m, n, .. } = self.shape;
        let outs = self.call(i)?;
        let ranges = &self.copies[i % self.copies.len()];
        for (out, &(r0, r, _)) in outs.iter().zip(ranges) {
            let v = out.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(v.len(), m * r, "candle's output shape");
            for row in 0..m {
                c[row * n + r0..row * n + r0 + r].copy_from_slice(&v[row * r..(row + 1) * r]);
            }
        }
        Ok(())
    }

    /// Calls every copy once (candle repacks a tensor's weights on its first call).
    pub fn warm_up(&self) -> candle_core::Result<()> {
        for i in 0..self.copies.len() {
            black_box(self.call(i)?);
        }
        Ok(())
    }
}

fn candle_err(e: candle_core::Error) -> BenchError {
    BenchError(format!("candle: {e}"))
}

fn run_case<W: BenchBlock>(
    id: &CaseId,
    w: &Weights<W>,
    peer: Peer,
    candle_parts: usize,
    ctx: &Ctx<'_>,
) -> Result<Row> {
    let shape = w.shape;
    let GemmShape { m, n, k } = shape;
    let threads = id.threads;
    let isa = ctx.config.isa.map_or_else(
        tessera_cpu::quant::preferred_isa,
        tessera_cpu::quant::usable_isa,
    );
    let opts = QuantOptions {
        isa: Some(isa),
        parallelism: par(threads),
    };
    let copies = w.copies.len();
    let ours = |i: usize, c: &mut [f32]| {
        matmul_with(
            &opts,
            MatRef::dense(&w.a, m, k),
            &w.copies[i % copies],
            n,
            MatMut::dense(c, m, n),
        )
    };
    let fail = |what: &str, e: String| BenchError(format!("{}: {what}: {e}", id.name()));

    // NaN-filled outputs: every element must be written.
    let mut c = vec![f32::NAN; m * n];
    ours(0, &mut c)?;
    spot_check_reference(&w.a, &w.copies[0], shape, &c)
        .map_err(|e| fail("tessera disagrees with the reference", e))?;
    spot_check_dequantized(&w.a, &w.copies[0], shape, &c, Some(W::ACT_LEN))
        .map_err(|e| fail("tessera disagrees with the dequantized f64 product", e))?;

    let mut c_peer = vec![f32::NAN; m * n];
    let (t, p, peer_name) = match peer {
        Peer::DeqGemm => {
            let mut wf = vec![0f32; n * k];
            let gemm_isa = ctx
                .config
                .isa
                .unwrap_or_else(tessera_cpu::gemm::preferred_isa);
            deq_gemm(
                shape,
                &w.a,
                &w.copies[0],
                &mut wf,
                &mut c_peer,
                gemm_isa,
                threads,
            )?;
            spot_check_dequantized(&w.a, &w.copies[0], shape, &c_peer, None)
                .map_err(|e| fail("deq+gemm disagrees with the dequantized f64 product", e))?;
            // The only difference is Tessera's quantization of the activations (Q8_0/Q8_K,
            // relative error about 1/254 per value, averaging out over k).
            compare(&c, &c_peer, n, 1e-2).map_err(|e| fail("tessera and deq+gemm disagree", e))?;
            let (mut i, mut j) = (0usize, 0usize);
            let (t, p) = measure_pair(
                &ctx.config.timing,
                || {
                    i += 1;
                    ours(i, &mut c).expect("the same call succeeded above")
                },
                || {
                    j += 1;
                    deq_gemm(
                        shape,
                        &w.a,
                        &w.copies[j % copies],
                        &mut wf,
                        &mut c_peer,
                        gemm_isa,
                        threads,
                    )
                    .expect("the same call succeeded above")
                },
            );
            (t, p, "deq+gemm")
        }
        Peer::Packed => {
            // One packed copy per copy of the blocks, so the rotation is the same.
            let packed = w
                .copies
                .iter()
                .map(|b| PackedWeights::with_options(&opts, b, n, k))
                .collect::<tessera_core::Result<Vec<_>>>()?;
            let packed_call = |i: usize, c: &mut [f32]| {
                matmul_packed_with(
                    &opts,
                    MatRef::dense(&w.a, m, k),
                    &packed[i % copies],
                    MatMut::dense(c, m, n),
                )
            };
            let mut c_packed = vec![f32::NAN; m * n];
            packed_call(0, &mut c_packed)?;
            spot_check_reference(&w.a, &w.copies[0], shape, &c_packed)
                .map_err(|e| fail("packed weights disagree with the reference", e))?;
            // The same algorithm: only the order of the f32 sum over blocks can differ.
            compare(&c, &c_packed, n, 1e-3)
                .map_err(|e| fail("packed and plain weights disagree", e))?;
            let (mut i, mut j) = (0usize, 0usize);
            let (t, p) = measure_pair(
                &ctx.config.timing,
                || {
                    i += 1;
                    packed_call(i, &mut c_packed).expect("the same call succeeded above")
                },
                || {
                    j += 1;
                    ours(j, &mut c).expect("the same call succeeded above")
                },
            );
            (t, p, "plain")
        }
        Peer::Candle => {
            let cp = CandlePeer::new(w, candle_parts).map_err(candle_err)?;
            cp.call_into(0, &mut c_peer).map_err(candle_err)?;
            let candle_act = W::candle_act_len(n, shape.k);
            spot_check_dequantized(&w.a, &w.copies[0], shape, &c_peer, Some(candle_act))
                .map_err(|e| fail("candle disagrees with the dequantized f64 product", e))?;
            if candle_act == W::ACT_LEN {
                // Same algorithm (activations quantized to Q8_0/Q8_K, exact integer block
                // sums): only the f32 rounding of the scales and of the sum over blocks
                // differs.
                compare(&c, &c_peer, n, 1e-3)
                    .map_err(|e| fail("tessera and candle disagree", e))?;
            }
            cp.warm_up().map_err(candle_err)?;
            let (mut i, mut j) = (0usize, 0usize);
            let (t, p) = measure_pair(
                &ctx.config.timing,
                || {
                    i += 1;
                    ours(i, &mut c).expect("the same call succeeded above")
                },
                || {
                    j += 1;
                    black_box(cp.call(j).expect("the same call succeeded above"));
                },
            );
            (t, p, cp.name())
        }
    };
    let work = work(shape, W::FORMAT);
    Ok(Row::new(
        id,
        isa.name(),
        work,
        t.median,
        t.reps,
        ctx.calibration,
        Some(PeerTime {
            name: peer_name.into(),
            seconds: p.median,
        }),
    )
    .on_int8_peak(work, ctx.calibration))
}

/// The elements the spot checks look at: the corners, then pseudo-random ones.
fn spot_elements(m: usize, n: usize) -> Vec<(usize, usize)> {
    let mut state = 12345u64;
    (0..16)
        .map(|t| match t {
            0 => (0, 0),
            1 => (m - 1, n - 1),
            2 => (0, n - 1),
            3 => (m - 1, 0),
            _ => {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as usize % m, (state >> 13) as usize % n)
            }
        })
        .collect()
}

/// Unit roundoff of f32.
const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(j: usize) -> f64 {
    let ju = j as f64 * U;
    ju / (1.0 - ju)
}

/// Checks 16 elements of `c` against `reference::quant_dot` of the reference-quantized
/// activation row with the weight row, within `γ_(kb+4)·magnitude + u·|ref| + f32::MIN_POSITIVE`
/// (the bound of the property tests: exact integer block sums, f32 scales and sum over
/// blocks).
pub fn spot_check_reference<W: DotReference>(
    a: &[f32],
    w: &[W],
    shape: GemmShape,
    c: &[f32],
) -> std::result::Result<(), String> {
    let GemmShape { m, n, k } = shape;
    let kb = k / W::LEN;
    let mut act = vec![<W::Act as bytemuck::Zeroable>::zeroed(); k / <W::Act as QuantBlock>::LEN];
    let mut quantized_row = usize::MAX;
    for (i, j) in spot_elements(m, n) {
        if quantized_row != i {
            tessera_core::quant::quantize(&a[i * k..(i + 1) * k], &mut act)
                .map_err(|e| e.to_string())?;
            quantized_row = i;
        }
        let (want, mag) = quant_dot(&w[j * kb..(j + 1) * kb], &act).map_err(|e| e.to_string())?;
        let got = f64::from(c[i * n + j]);
        let tol = gamma(kb + 4) * mag + U * want.abs() + f64::from(f32::MIN_POSITIVE);
        if got.is_nan() || (got - want).abs() > tol {
            return Err(format!(
                "C[{i}, {j}] = {got}, reference {want} (tolerance {tol:e})"
            ));
        }
    }
    Ok(())
}

/// Checks 16 elements of `c` against the f64 dot product of the f32 activations with the
/// dequantized weights. With `act_len = Some(len)` (a kernel that quantizes the activations
/// to 8-bit blocks of `len` values with scale `d = max|a|/127`, possibly f16-rounded) each
/// value may be off by `0.6·d·Σ|w|` per activation block (half a step, plus the f16 rounding
/// of the scale on up to 127 steps); every kernel may be off by `1e-3·Σ|a·w|` for its f32
/// arithmetic. `None`: f32 activations.
pub fn spot_check_dequantized<W: WeightRow>(
    a: &[f32],
    w: &[W],
    shape: GemmShape,
    c: &[f32],
    act_len: Option<usize>,
) -> std::result::Result<(), String> {
    let GemmShape { m, n, k } = shape;
    let kb = k / W::LEN;
    let act_quantized = act_len.is_some();
    let act_len = act_len.unwrap_or(W::ACT_LEN).max(1);
    let mut row = vec![0f32; k];
    for (i, j) in spot_elements(m, n) {
        tessera_core::quant::dequantize(&w[j * kb..(j + 1) * kb], &mut row)
            .map_err(|e| e.to_string())?;
        let x = &a[i * k..(i + 1) * k];
        let (mut exact, mut mag, mut act_err) = (0f64, 0f64, 0f64);
        for (xb, wb) in x.chunks(act_len).zip(row.chunks(act_len)) {
            let d = xb.iter().fold(0f64, |acc, v| acc.max(f64::from(v.abs()))) / 127.0;
            let mut wsum = 0f64;
            for (&xv, &wv) in xb.iter().zip(wb) {
                let p = f64::from(xv) * f64::from(wv);
                exact += p;
                mag += p.abs();
                wsum += f64::from(wv.abs());
            }
            act_err += 0.6 * d * wsum;
        }
        let tol = 1e-3 * mag + if act_quantized { act_err } else { 0.0 } + 1e-30;
        let got = f64::from(c[i * n + j]);
        if got.is_nan() || (got - exact).abs() > tol {
            return Err(format!(
                "C[{i}, {j}] = {got}, expected {exact} (tolerance {tol:e}, Σ|a·w| = {mag:e})"
            ));
        }
    }
    Ok(())
}

/// A weight block type with its activation block length (32 for Q8_0, 256 for Q8_K).
pub trait WeightRow: QuantBlock {
    /// Values per activation block.
    const ACT_LEN: usize;
}

impl<W: DotReference> WeightRow for W {
    const ACT_LEN: usize = <W::Act as QuantBlock>::LEN;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::TimingConfig;

    fn cfg(threads: Vec<usize>, quick: bool) -> Config {
        Config {
            threads,
            quick,
            filters: vec![],
            isa: None,
            timing: TimingConfig::QUICK,
        }
    }

    #[test]
    fn work_counts_weight_bytes() {
        let gemv = GemmShape {
            m: 1,
            n: 11008,
            k: 4096,
        };
        assert_eq!(weight_bytes(gemv, QuantFormat::Q4_0), 11008 * 128 * 18);
        assert_eq!(weight_bytes(gemv, QuantFormat::Q8_0), 11008 * 128 * 34);
        assert_eq!(weight_bytes(gemv, QuantFormat::Q4K), 11008 * 16 * 144);
        let w = work(gemv, QuantFormat::Q4_0);
        assert_eq!(w.bytes, (11008 * 128 * 18) as f64);
        assert_eq!(w.flops, 2.0 * 11008.0 * 4096.0);
        let gemm = GemmShape {
            m: 128,
            n: 4096,
            k: 4096,
        };
        let w = work(gemm, QuantFormat::Q8_0);
        assert_eq!(
            w.bytes,
            (4096 * 128 * 34) as f64 + 4.0 * (128.0 * 4096.0 * 2.0)
        );
        // A GEMV is memory-bound and a 128-token GEMM compute-bound on any sane machine.
        assert_eq!(work(gemv, QuantFormat::Q4K).bound(100.0, 20.0), "memory");
        assert_eq!(w.bound(100.0, 20.0), "compute");
    }

    #[test]
    fn gemv_weights_rotate_through_three_l3s() {
        let gemv = GemmShape {
            m: 1,
            n: 4096,
            k: 4096,
        };
        let l3 = 32 << 20;
        let c = rotation_copies(gemv, QuantFormat::Q4_0, l3);
        assert!(c * weight_bytes(gemv, QuantFormat::Q4_0) >= 3 * l3);
        assert!((c - 1) * weight_bytes(gemv, QuantFormat::Q4_0) < 3 * l3);
        let gemm = GemmShape { m: 16, ..gemv };
        assert_eq!(rotation_copies(gemm, QuantFormat::Q4_0, l3), 1);
    }

    #[test]
    fn case_list_names_and_candle_rows() {
        let ids = |threads: Vec<usize>, ct: usize| -> Vec<String> {
            case_list(&cfg(threads, false), ct)
                .iter()
                .map(|c| c.id.name())
                .collect()
        };
        // Single-threaded candle: a candle row at every thread count (split above 1).
        let all = ids(vec![1, 2], 1);
        assert_eq!(all.len(), 5 * 3 * 2 * 3);
        assert!(all.contains(&"quant/gemv/1x11008x4096/q4_0/pack/t2".to_string()));
        assert!(all.contains(&"quant/gemv/1x11008x4096/q4_0/candle/t2".to_string()));
        assert!(all.contains(&"quant/gemm/512x4096x4096/q4_K/deq/t1".to_string()));
        // CANDLE_NUM_THREADS=2: candle rows only at 2 threads.
        let two = ids(vec![1, 2], 2);
        assert_eq!(two.len(), 5 * 3 * (2 * 2 + 1));
        assert!(!two.iter().any(|s| s.contains("/candle/t1")));
        assert_eq!(ids(vec![1, 2], 1).len(), all.len());
        let quick = case_list(&cfg(vec![1], true), 1);
        assert_eq!(quick.len(), 2 * 3 * 3);
    }

    #[test]
    fn quant_isa_falls_back() {
        use tessera_cpu::quant::{is_available, usable_isa};
        assert!(is_available(usable_isa(Isa::detect())));
        assert_eq!(usable_isa(Isa::Scalar), Isa::Scalar);
    }

    fn run_small<W: BenchBlock>(peer: Peer, threads: usize, parts: usize) -> Row {
        let cfg = Config {
            threads: vec![threads],
            quick: true,
            filters: vec![],
            isa: None,
            timing: TimingConfig {
                warmup: 0,
                min_time: std::time::Duration::ZERO,
                min_reps: 2,
                max_reps: 2,
                max_time: std::time::Duration::from_secs(5),
            },
        };
        let cal = crate::bench::calibrate::tests_support::fixed();
        let ctx = Ctx {
            config: &cfg,
            calibration: &cal,
        };
        let shape = GemmShape {
            m: 3,
            n: 37,
            k: 512,
        };
        let w = Weights::<W>::new(shape, 2);
        let id = CaseId {
            family: "quant",
            kernel: shape.kernel().into(),
            shape: shape.name(),
            dtype: W::FORMAT.name().into(),
            layout: peer.tag().into(),
            threads,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| run_case(&id, &w, peer, parts, &ctx))
            .unwrap()
    }

    fn small_cases_run<W: BenchBlock>() {
        for (peer, threads, parts) in [
            (Peer::DeqGemm, 1, 1),
            (Peer::DeqGemm, 2, 1),
            (Peer::Candle, 1, 1),
            (Peer::Candle, 2, 2),
            (Peer::Packed, 1, 1),
            (Peer::Packed, 2, 1),
        ] {
            let row = run_small::<W>(peer, threads, parts);
            assert_eq!(row.reps, 2);
            assert!(row.seconds > 0.0 && row.peer_ratio.unwrap() > 0.0);
            let name = row.peer.unwrap();
            match (peer, parts) {
                (Peer::DeqGemm, _) => assert_eq!(name, "deq+gemm"),
                (Peer::Candle, 1) => assert_eq!(name, "candle"),
                (Peer::Candle, _) => assert_eq!(name, "candle-split"),
                (Peer::Packed, _) => assert_eq!(name, "plain"),
            }
        }
    }

    #[test]
    fn small_q8_0_cases_run_end_to_end() {
        small_cases_run::<BlockQ8_0>();
    }

    #[test]
    fn small_q4_0_cases_run_end_to_end() {
        small_cases_run::<BlockQ4_0>();
    }

    #[test]
    fn small_q4_k_cases_run_end_to_end() {
        small_cases_run::<BlockQ4_K>();
    }

    #[test]
    fn spot_checks_catch_a_wrong_result() {
        let shape = GemmShape { m: 2, n: 5, k: 256 };
        let w = Weights::<BlockQ4_K>::new(shape, 1);
        let mut c = vec![0f32; 10];
        tessera_cpu::quant::matmul(
            MatRef::dense(&w.a, 2, 256),
            &w.copies[0],
            5,
            MatMut::dense(&mut c, 2, 5),
        )
        .unwrap();
        spot_check_reference(&w.a, &w.copies[0], shape, &c).unwrap();
        spot_check_dequantized(&w.a, &w.copies[0], shape, &c, Some(32)).unwrap();
        // The transposed result (a row of W against the wrong row of A) is caught.
        let mut bad = c.clone();
        bad.swap(0, 1);
        assert!(spot_check_reference(&w.a, &w.copies[0], shape, &bad).is_err());
        bad = c.clone();
        bad[9] += 0.5 + bad[9].abs() * 0.5;
        assert!(spot_check_dequantized(&w.a, &w.copies[0], shape, &bad, Some(32)).is_err());
    }
}
