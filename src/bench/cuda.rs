//! `tessera bench --backend cuda`: the CUDA kernels on GPU 0, each against its peer in the same
//! run, placed on ceilings measured on the device itself.
//!
//! Calibration: the device-to-device copy bandwidth (`cuMemcpyDtoD` of a buffer many times the
//! L2, counting bytes read plus bytes written) and the tensor-core rate cuBLAS reaches on an
//! f16 GEMM (8192³; 4096³ with `--quick`) on random data. Timing: CUDA events around a batch
//! of calls after warm-up, the median over batches; inputs are rotated among enough copies that
//! together they exceed the L2 several times, so the L2 is not what is measured.
//!
//! Families:
//! * `gemm`: f16/bf16 tensor-core GEMM, `mma.sync` and the sm_90a `wgmma` path, against cuBLAS
//!   `cublasGemmEx` with f32 output.
//! * `quant`: Q8_0/Q4_0/Q4_K GEMV, GB/s of weight bytes against the copy bandwidth; GEMM at
//!   M = 16/128/512 against cuBLAS on the same weights dequantized to f16.
//! * `attention`: [`tessera_cuda::attention::attention`] forward, f16 Q/K/V in `[batch, seq,
//!   heads, head_dim]` (B = `bshd`), **f32 output**, self-attention (as many queries as keys),
//!   bidirectional and causal (kernel `bidir` / `causal`), 32 heads of 64 and 16 of 128
//!   (hidden 2048), 1k/4k/16k tokens per sequence (`--quick`: 1k/4k) with the batch making
//!   16k tokens in all (shape `BATCHxSEQxDhHEADS`, e.g. `16x1024x64h32`); on sm_90a every
//!   shape also runs on the opt-in `wgmma` kernel (B = `bshd-wgmma`, the same peer). FLOPs are
//!   `4·pairs·head_dim·heads·batch` over the attended (query, key) pairs (`seq²`, causal
//!   `seq·(seq+1)/2`), held to the calibrated tensor rate. The peer is PyTorch's
//!   `scaled_dot_product_attention` with the flash backend forced, on contiguous f16
//!   `[batch, heads, seq, head_dim]` tensors with **f16 output** (Tessera writes f32: twice the
//!   output bytes), run by `benches/peers/torch_sdpa.py` once for every selected shape before
//!   the cases (the python of `TESSERA_PEER_PYTHON`, else `python3`; `none` turns it off). A
//!   missing python or torch, or a failing shape, leaves the rows without a peer and a note
//!   says why; the run goes on.
//! * `kv_cache`: [`tessera_cuda::kv_cache::DeviceKvCache::decode_attention`], one query token
//!   of one sequence over 4k/32k/128k cached tokens (`--quick`: 4k/32k), Llama-like heads (32
//!   query heads, 8 key/value heads of 128), f16 pages of 16 and 64 tokens (B = `pg16`,
//!   `pg64`), and at 32k also a Q8_0 paged cache and an f16 contiguous one (`cont`). The cache
//!   is filled with `append` before timing; only the decode call is timed (its per-call upload
//!   of the sequence slot and both launches included). GB/s counts the stored K and V bytes
//!   read (Q8_0 scales included) plus the f32 query and output, held to the copy bandwidth.
//!   No peer.
//! * `model`: GPT-2 small and BERT-base on the CUDA backend ([`crate::backend::Cuda`])
//!   against `transformers` on the same GPU ([`super::cuda_model`]).

use super::report::{self, CaseId, Row};
use super::{BenchError, Result};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tessera_core::attention::{AttentionShape, HeadLayout};
use tessera_core::quant::{BlockQ4_0, BlockQ4_K, BlockQ8_0, QuantBlock};
use tessera_core::{Transpose, bf16, f16};
use tessera_cuda::attention::{AttnPath, DeviceAttentionParams, WGMMA_HEAD_DIMS};
use tessera_cuda::cudarc;
use tessera_cuda::cudarc::driver::CudaSlice;
use tessera_cuda::cudarc::driver::sys::CUevent_flags;
use tessera_cuda::gemm::{GemmArgs, GemmElement, GemmPath};
use tessera_cuda::kv_cache::{
    DeviceDecodeParams, DeviceKvCache, KvCacheConfig, KvDType, KvLayout, SeqId,
};
use tessera_cuda::quant::{QuantArgs, QuantFormat, QuantKernel};
use tessera_cuda::{Device, DeviceInfo};

impl From<tessera_cuda::Error> for BenchError {
    fn from(e: tessera_cuda::Error) -> Self {
        BenchError(e.to_string())
    }
}

/// The families this backend benches.
pub const FAMILIES: [&str; 5] = ["gemm", "quant", "attention", "kv_cache", "model"];

/// What the GPU rows are held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuCalibration {
    /// Device-to-device copy, GB/s of bytes read plus bytes written.
    pub copy_gbs: f64,
    /// cuBLAS f16 GEMM (f32 accumulation and output), GFLOP/s.
    pub tensor_gflops: f64,
    /// The GEMM size the tensor rate was measured at.
    pub tensor_size: usize,
}

/// Run options (the subset of `tessera bench`'s that applies to the GPU).
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// Families to run ([`FAMILIES`]; all when empty).
    pub families: Vec<String>,
    /// Fewer shapes, shorter timing.
    pub quick: bool,
    /// Substrings of case names; a case runs when any matches (all when empty).
    pub filters: Vec<String>,
}

/// Everything measured.
#[derive(Debug)]
pub struct GpuOutcome {
    /// The ceilings.
    pub calibration: GpuCalibration,
    /// Measured rows.
    pub rows: Vec<Row>,
    /// Cases that failed, with why.
    pub failures: Vec<(String, BenchError)>,
}

/// Times `f` (called with a rotating index) with CUDA events: a few warm-up calls, then
/// batches sized to about 20 ms (2 ms with `quick`); returns the median seconds per call
/// and the number of calls timed.
pub fn time_gpu(
    dev: &Device,
    quick: bool,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<(f64, usize)> {
    let stream = dev.stream();
    let event = || {
        stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| BenchError(format!("recording a CUDA event: {e}")))
    };
    let elapsed = |a: &cudarc::driver::CudaEvent, b: &cudarc::driver::CudaEvent| {
        b.synchronize()
            .and_then(|_| a.elapsed_ms(b))
            .map(|ms| f64::from(ms) * 1e-3)
            .map_err(|e| BenchError(format!("reading CUDA events: {e}")))
    };
    let mut i = 0usize;
    let mut call = |f: &mut dyn FnMut(usize) -> Result<()>| {
        i += 1;
        f(i)
    };
    // Warm-up: module load, first-touch, clocks up; also the first estimate of one call.
    for _ in 0..3 {
        call(&mut f)?;
    }
    let t0 = event()?;
    call(&mut f)?;
    let t1 = event()?;
    let one = elapsed(&t0, &t1)?.max(1e-7);
    let target = if quick { 2e-3 } else { 20e-3 };
    let per_batch = ((target / one).ceil() as usize).clamp(1, 10_000);
    let batches = if quick { 3 } else { 7 };
    let mut samples = Vec::with_capacity(batches);
    for _ in 0..batches {
        let a = event()?;
        for _ in 0..per_batch {
            call(&mut f)?;
        }
        let b = event()?;
        samples.push(elapsed(&a, &b)? / per_batch as f64);
    }
    dev.synchronize()?;
    samples.sort_by(f64::total_cmp);
    Ok((samples[samples.len() / 2], batches * per_batch))
}

/// The duration of `iters` calls of `run` (called with the call's index), timed with CUDA
/// events on the device's stream: what the criterion benches (`benches/cuda_*.rs`) hand to
/// `iter_custom`. Panics, naming the step, when an event fails or a kernel faulted (a bench
/// has no way to report an error through criterion).
pub fn time_events(dev: &Device, iters: u64, mut run: impl FnMut(usize)) -> std::time::Duration {
    let stream = dev.stream();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream
        .record_event(flags)
        .expect("recording the start event");
    for i in 0..iters {
        run(i as usize);
    }
    let end = stream.record_event(flags).expect("recording the end event");
    end.synchronize().expect("a kernel faulted");
    let ms = start.elapsed_ms(&end).expect("reading the event times");
    std::time::Duration::from_secs_f64(f64::from(ms) / 1e3)
}

/// Random values in [-1, 1) from a fixed seed.
pub(super) fn random_f32(len: usize, seed: u64) -> Vec<f32> {
    super::data::random_f32(len, seed)
}

/// How many copies of a `bytes`-sized input rotate so that together they exceed 4 L2s.
pub(super) fn rotation(info: &DeviceInfo, bytes: usize) -> usize {
    (4 * info.l2_bytes).div_ceil(bytes.max(1)).clamp(1, 64)
}

/// Measures the copy bandwidth and cuBLAS's f16 tensor-core rate.
pub fn calibrate(dev: &Device, quick: bool) -> Result<GpuCalibration> {
    let stream = dev.stream();
    let len = if quick { 256 << 20 } else { 1 << 30 };
    let src = dev.upload(&vec![0x5au8; len])?;
    let mut dst: CudaSlice<u8> = dev.alloc_zeros(len)?;
    let (copy_s, _) = time_gpu(dev, quick, |_| {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| BenchError(format!("device-to-device copy: {e}")))
    })?;
    drop((src, dst));
    let size = if quick { 4096 } else { 8192 };
    let blas = tessera_cuda::gemm::cublas_handle(dev)?;
    let args = GemmArgs::dense(size, size, size, Transpose::Yes);
    let a = dev.upload(&to_16::<f16>(&random_f32(size * size, 1)))?;
    let b = dev.upload(&to_16::<f16>(&random_f32(size * size, 2)))?;
    let mut c: CudaSlice<f32> = dev.alloc_zeros(size * size)?;
    let (gemm_s, _) = time_gpu(dev, quick, |_| {
        tessera_cuda::gemm::cublas_gemm_f32out(&blas, &args, &a, &b, &mut c).map_err(Into::into)
    })?;
    Ok(GpuCalibration {
        copy_gbs: 2.0 * len as f64 / copy_s / 1e9,
        tensor_gflops: 2.0 * (size as f64).powi(3) / gemm_s / 1e9,
        tensor_size: size,
    })
}

fn to_16<T: GemmElement + FromF32>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// f32 → the 16-bit type (round to nearest even).
pub trait FromF32 {
    /// Converts.
    fn from_f32(v: f32) -> Self;
}
impl FromF32 for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}
impl FromF32 for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// One GPU row: GFLOP/s and GB/s of `flops` / `bytes`, placed on the calibrated ceilings
/// (tensor rate when compute-bound, copy bandwidth when memory-bound).
#[allow(clippy::too_many_arguments)]
pub(super) fn row(
    id: &CaseId,
    arch: &str,
    flops: f64,
    bytes: f64,
    (seconds, reps): (f64, usize),
    cal: &GpuCalibration,
    peer: Option<(&str, f64)>,
) -> Row {
    let work = report::Work { flops, bytes };
    let bound = work.bound(cal.tensor_gflops, cal.copy_gbs);
    let (gflops, gbs) = (flops / seconds / 1e9, bytes / seconds / 1e9);
    let mut r = Row {
        family: id.family.to_string(),
        kernel: id.kernel.clone(),
        shape: id.shape.clone(),
        dtype: id.dtype.clone(),
        layout: id.layout.clone(),
        isa: arch.to_string(),
        threads: id.threads,
        seconds,
        reps,
        gflops,
        gbs,
        bound: String::new(),
        peak_fraction: 0.0,
        peer: peer.map(|p| p.0.to_string()),
        peer_seconds: peer.map(|p| p.1),
        peer_ratio: peer.map(|p| p.1 / seconds),
        peak_bytes: None,
        peer_peak_bytes: None,
        tokens_per_s: None,
        peer_tokens_per_s: None,
        note: None,
    };
    hold_to(&mut r, bound, cal);
    r
}

/// Holds row `r` to `bound` whatever its intensity says: `"memory"` against the copy
/// bandwidth, anything else against the tensor rate.
pub(super) fn hold_to(r: &mut Row, bound: &str, cal: &GpuCalibration) {
    r.bound = bound.to_string();
    r.peak_fraction = if bound == "memory" {
        r.gbs / cal.copy_gbs
    } else {
        r.gflops / cal.tensor_gflops
    };
}

pub(super) fn id(
    family: &'static str,
    kernel: &str,
    shape: String,
    dtype: &str,
    layout: &str,
) -> CaseId {
    CaseId {
        family,
        kernel: kernel.to_string(),
        shape,
        dtype: dtype.to_string(),
        layout: layout.to_string(),
        threads: 1,
    }
}

/// A case's measurement: the device, the ceilings, `quick`.
pub(super) type GpuRun = Box<dyn FnOnce(&Device, &GpuCalibration, bool) -> Result<Row>>;

/// One GPU benchmark case.
pub(super) struct GpuCase {
    /// What it measures.
    pub(super) id: CaseId,
    /// How.
    pub(super) run: GpuRun,
}

fn gemm_cases(info: &DeviceInfo, quick: bool) -> Vec<GpuCase> {
    let mut shapes: Vec<(usize, usize, usize)> = if quick {
        vec![(2048, 2048, 2048), (128, 3072, 768)]
    } else {
        vec![
            (4096, 4096, 4096),
            (8192, 8192, 8192),
            // GPT-2 small / BERT base layers at 128 tokens, and a 16 × 128-token batch.
            (128, 3072, 768),
            (128, 768, 3072),
            (128, 2304, 768),
            (2048, 3072, 768),
            (2048, 768, 3072),
        ]
    };
    shapes.dedup();
    let mut paths = vec![("mma", GemmPath::Mma)];
    if info.has_sm90a() {
        paths.push(("wgmma", GemmPath::Wgmma));
    }
    let mut cases = Vec::new();
    for &(m, n, k) in &shapes {
        for dtype in ["f16", "bf16"] {
            for &(name, path) in &paths {
                let layouts: &[Transpose] = if (m, n, k) == (4096, 4096, 4096) {
                    &[Transpose::Yes, Transpose::No]
                } else {
                    &[Transpose::Yes]
                };
                for &trans in layouts {
                    let layout = if trans == Transpose::Yes {
                        "[n,k]"
                    } else {
                        "[k,n]"
                    };
                    let args = GemmArgs::dense(m, n, k, trans);
                    let case_id = id("gemm", name, format!("{m}x{n}x{k}"), dtype, layout);
                    let c2 = case_id.clone();
                    let run: GpuRun = if dtype == "f16" {
                        Box::new(move |d, c, q| gemm_case::<f16>(d, c, q, path, args, c2))
                    } else {
                        Box::new(move |d, c, q| gemm_case::<bf16>(d, c, q, path, args, c2))
                    };
                    cases.push(GpuCase { id: case_id, run });
                }
            }
        }
    }
    cases
}

fn gemm_case<T: GemmElement + FromF32>(
    dev: &Device,
    cal: &GpuCalibration,
    quick: bool,
    path: GemmPath,
    args: GemmArgs,
    case: CaseId,
) -> Result<Row> {
    let GemmArgs { m, n, k, .. } = args;
    let in_bytes = 2 * (m * k + k * n);
    let copies = rotation(dev.info(), in_bytes);
    let mut inputs = Vec::with_capacity(copies);
    for s in 0..copies as u64 {
        inputs.push((
            dev.upload(&to_16::<T>(&random_f32(m * k, 10 + 2 * s)))?,
            dev.upload(&to_16::<T>(&random_f32(k * n, 11 + 2 * s)))?,
        ));
    }
    let mut c: CudaSlice<f32> = dev.alloc_zeros(m * n)?;
    let ours = time_gpu(dev, quick, |i| {
        let (a, b) = &inputs[i % copies];
        tessera_cuda::gemm::gemm(dev, path, &args, a, b, &mut c).map_err(Into::into)
    })?;
    let blas = tessera_cuda::gemm::cublas_handle(dev)?;
    let (peer_s, _) = time_gpu(dev, quick, |i| {
        let (a, b) = &inputs[i % copies];
        tessera_cuda::gemm::cublas_gemm_f32out(&blas, &args, a, b, &mut c).map_err(Into::into)
    })?;
    let flops = 2.0 * (m * n * k) as f64;
    let bytes = (in_bytes + 4 * m * n) as f64;
    Ok(row(
        &case,
        &dev.info().arch,
        flops,
        bytes,
        ours,
        cal,
        Some(("cublas", peer_s)),
    ))
}

fn quant_formats() -> [(QuantFormat, &'static str); 3] {
    [
        (QuantFormat::Q8_0, "q8_0"),
        (QuantFormat::Q4_0, "q4_0"),
        (QuantFormat::Q4K, "q4_K"),
    ]
}

fn quant_cases(quick: bool) -> Vec<GpuCase> {
    let mut cases = Vec::new();
    let (gn, gk) = if quick { (4096, 4096) } else { (14336, 4096) };
    for (format, name) in quant_formats() {
        let case_id = id("quant", "gemv", format!("1x{gn}x{gk}"), name, "[n,k]");
        let c2 = case_id.clone();
        cases.push(GpuCase {
            id: case_id,
            run: Box::new(move |d, c, q| quant_case(d, c, q, format, 1, gn, gk, c2)),
        });
    }
    let ms: &[usize] = if quick { &[16, 128] } else { &[16, 128, 512] };
    for &m in ms {
        for (format, name) in quant_formats() {
            let case_id = id("quant", "gemm", format!("{m}x4096x4096"), name, "[n,k]");
            let c2 = case_id.clone();
            cases.push(GpuCase {
                id: case_id,
                run: Box::new(move |d, c, q| quant_case(d, c, q, format, m, 4096, 4096, c2)),
            });
        }
    }
    cases
}

fn quantized_bytes(format: QuantFormat, w: &[f32]) -> Result<Vec<u8>> {
    fn q<B: QuantBlock>(w: &[f32]) -> Result<Vec<u8>> {
        let mut blocks = vec![B::zeroed(); w.len() / B::LEN];
        tessera_core::quant::quantize(w, &mut blocks)?;
        Ok(bytemuck::cast_slice(&blocks).to_vec())
    }
    match format {
        QuantFormat::Q8_0 => q::<BlockQ8_0>(w),
        QuantFormat::Q4_0 => q::<BlockQ4_0>(w),
        QuantFormat::Q4K => q::<BlockQ4_K>(w),
        _ => Err(BenchError(format!(
            "{} is not a weight format",
            format.name()
        ))),
    }
}

fn dequantized(format: QuantFormat, bytes: &[u8]) -> Result<Vec<f32>> {
    fn d<B: QuantBlock>(bytes: &[u8]) -> Result<Vec<f32>> {
        let mut blocks = vec![B::zeroed(); bytes.len() / std::mem::size_of::<B>()];
        bytemuck::cast_slice_mut::<B, u8>(&mut blocks).copy_from_slice(bytes);
        let mut out = vec![0.0f32; blocks.len() * B::LEN];
        tessera_core::quant::dequantize(&blocks, &mut out)?;
        Ok(out)
    }
    match format {
        QuantFormat::Q8_0 => d::<BlockQ8_0>(bytes),
        QuantFormat::Q4_0 => d::<BlockQ4_0>(bytes),
        QuantFormat::Q4K => d::<BlockQ4_K>(bytes),
        _ => Err(BenchError(format!(
            "{} is not a weight format",
            format.name()
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn quant_case(
    dev: &Device,
    cal: &GpuCalibration,
    quick: bool,
    format: QuantFormat,
    m: usize,
    n: usize,
    k: usize,
    case: CaseId,
) -> Result<Row> {
    let args = QuantArgs::dense(format, m, n, k);
    let wbytes = tessera_cuda::quant::weight_bytes(format, n, k)?;
    // Quantize one random matrix on the host; the rotated copies share its bytes (the timing
    // only needs distinct addresses, so the L2 cannot serve them).
    let host = quantized_bytes(format, &random_f32(n * k, 77))?;
    if host.len() != wbytes {
        return Err(BenchError(format!(
            "{}: {} weight bytes quantized, the kernel expects {wbytes}",
            format.name(),
            host.len()
        )));
    }
    let copies = rotation(dev.info(), wbytes);
    let weights = (0..copies)
        .map(|_| dev.upload(&host))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let x = dev.upload(&random_f32(m * k, 78))?;
    let mut y: CudaSlice<f32> = dev.alloc_zeros(m * n)?;
    let ours = time_gpu(dev, quick, |i| {
        tessera_cuda::quant::matmul(
            dev,
            QuantKernel::Auto,
            &args,
            &x,
            &weights[i % copies],
            &mut y,
        )
        .map_err(Into::into)
    })?;
    let flops = 2.0 * (m * n * k) as f64;
    let bytes = (wbytes + 4 * (m * k + m * n)) as f64;
    let mut r = if m == 1 {
        let mut r = row(&case, &dev.info().arch, flops, bytes, ours, cal, None);
        // GEMV is held to the copy bandwidth whatever its intensity says.
        hold_to(&mut r, "memory", cal);
        r.note = Some(format!(
            "{:.1}% of the {:.0} GB/s device copy; weights rotated over {copies} copies ({:.0} MiB)",
            r.peak_fraction * 100.0,
            cal.copy_gbs,
            (copies * wbytes) as f64 / (1 << 20) as f64
        ));
        r
    } else {
        // Peer: cuBLAS on the same weights dequantized to f16, activations in f16.
        let wf16: Vec<f16> = to_16(&dequantized(format, &host)?);
        let w16 = dev.upload(&wf16)?;
        let x16 = dev.upload(&to_16::<f16>(&random_f32(m * k, 78)))?;
        let blas = tessera_cuda::gemm::cublas_handle(dev)?;
        let gargs = GemmArgs::dense(m, n, k, Transpose::Yes);
        let (peer_s, _) = time_gpu(dev, quick, |_| {
            tessera_cuda::gemm::cublas_gemm_f32out(&blas, &gargs, &x16, &w16, &mut y)
                .map_err(Into::into)
        })?;
        row(
            &case,
            &dev.info().arch,
            flops,
            bytes,
            ours,
            cal,
            Some(("cublas-f16", peer_s)),
        )
    };
    r.threads = 1;
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// attention: the fused forward against torch SDPA (flash).

/// Tokens in all of an attention row: the batch is `ATTN_TOKENS / seq`.
pub const ATTN_TOKENS: usize = 16384;

/// One shape of the `attention` family: self-attention of `batch` sequences of `seq` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnBench {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence (queries and keys).
    pub seq: usize,
    /// Heads (as many key/value heads).
    pub heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// The causal mask.
    pub causal: bool,
}

impl AttnBench {
    /// The row's identity: `attention/{bidir,causal}/BATCHxSEQxDhHEADS/f16/bshd`.
    pub fn case_id(&self) -> CaseId {
        id(
            "attention",
            if self.causal { "causal" } else { "bidir" },
            format!(
                "{}x{}x{}h{}",
                self.batch, self.seq, self.head_dim, self.heads
            ),
            "f16",
            "bshd",
        )
    }

    /// The kernel's shape.
    pub fn shape(&self) -> AttentionShape {
        AttentionShape {
            batch: self.batch,
            q_len: self.seq,
            kv_len: self.seq,
            n_heads: self.heads,
            n_kv_heads: self.heads,
            head_dim: self.head_dim,
        }
    }

    /// Elements of one operand (Q, K, V or the output).
    pub fn elems(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }

    /// (query, key) pairs attended per (sequence, head): `seq²`, causal `seq·(seq+1)/2`.
    pub fn pairs(&self) -> u64 {
        let s = self.seq as u64;
        if self.causal { s * (s + 1) / 2 } else { s * s }
    }

    /// `4·pairs·head_dim·heads·batch`: Q·Kᵀ and P·V, a multiply-add counting 2.
    pub fn flops(&self) -> f64 {
        4.0 * self.pairs() as f64 * (self.head_dim * self.heads * self.batch) as f64
    }

    /// Bytes of the f16 inputs Q, K and V.
    pub fn input_bytes(&self) -> usize {
        3 * 2 * self.elems()
    }

    /// Bytes a call must move: the f16 inputs and the f32 output.
    pub fn bytes(&self) -> f64 {
        (self.input_bytes() + 4 * self.elems()) as f64
    }
}

/// The `attention` shapes: 1k/4k/16k tokens (`quick`: 1k/4k), 32×64 and 16×128 heads,
/// bidirectional and causal.
pub fn attention_shapes(quick: bool) -> Vec<AttnBench> {
    let seqs: &[usize] = if quick {
        &[1024, 4096]
    } else {
        &[1024, 4096, 16384]
    };
    let mut out = Vec::new();
    for &seq in seqs {
        for (heads, head_dim) in [(32, 64), (16, 128)] {
            for causal in [false, true] {
                out.push(AttnBench {
                    batch: (ATTN_TOKENS / seq).max(1),
                    seq,
                    heads,
                    head_dim,
                    causal,
                });
            }
        }
    }
    out
}

/// How many copies of an attention shape's inputs rotate (Tessera's side and the peer's).
fn attention_copies(info: &DeviceInfo, s: &AttnBench) -> usize {
    rotation(info, s.input_bytes())
}

/// The layout column of the rows that run the opt-in sm_90a `wgmma` kernel
/// ([`AttnPath::Wgmma`]); the plain `bshd` rows run the default (`mma.sync`) one.
pub const WGMMA_LAYOUT: &str = "bshd-wgmma";

/// The row of shape `s` on the `wgmma` kernel.
pub fn wgmma_case_id(s: &AttnBench) -> CaseId {
    CaseId {
        layout: WGMMA_LAYOUT.to_string(),
        ..s.case_id()
    }
}

/// The name under which the peer measured the shape of row `name` (both kernels' rows of a
/// shape share one peer measurement).
pub fn sdpa_name(name: &str) -> String {
    name.replace(&format!("/{WGMMA_LAYOUT}/"), "/bshd/")
}

/// Every shape on the default kernel, and on sm_90a also on the `wgmma` one (head dims 64 and
/// 128 both qualify).
fn attention_cases(quick: bool, sm90a: bool) -> Vec<GpuCase> {
    let mut cases = Vec::new();
    for s in attention_shapes(quick) {
        let mut paths = vec![(s.case_id(), AttnPath::Mma)];
        if sm90a && WGMMA_HEAD_DIMS.contains(&s.head_dim) {
            paths.push((wgmma_case_id(&s), AttnPath::Wgmma));
        }
        for (case_id, path) in paths {
            let c2 = case_id.clone();
            cases.push(GpuCase {
                id: case_id,
                run: Box::new(move |d, c, q| attention_case(d, c, q, s, path, c2)),
            });
        }
    }
    cases
}

fn attention_case(
    dev: &Device,
    cal: &GpuCalibration,
    quick: bool,
    s: AttnBench,
    path: AttnPath,
    case: CaseId,
) -> Result<Row> {
    let shape = s.shape();
    let layout = HeadLayout::bshd(s.seq, s.heads, s.head_dim);
    let n = s.elems();
    let copies = attention_copies(dev.info(), &s);
    // One random set on the host; the rotated copies share its values (distinct addresses are
    // what keeps the L2 from serving them).
    let hq = to_16::<f16>(&random_f32(n, 30));
    let hk = to_16::<f16>(&random_f32(n, 31));
    let hv = to_16::<f16>(&random_f32(n, 32));
    let mut inputs = Vec::with_capacity(copies);
    for _ in 0..copies {
        inputs.push((dev.upload(&hq)?, dev.upload(&hk)?, dev.upload(&hv)?));
    }
    drop((hq, hk, hv));
    let mut out: CudaSlice<f32> = dev.alloc_zeros(n)?;
    let params = if s.causal {
        DeviceAttentionParams::new(s.head_dim).causal(0)
    } else {
        DeviceAttentionParams::new(s.head_dim)
    };
    let ours = time_gpu(dev, quick, |i| {
        let (q, k, v) = &inputs[i % copies];
        tessera_cuda::attention::attention_with_path::<f16>(
            dev, path, &shape, q, layout, k, layout, v, layout, &params, &mut out, layout,
        )
        .map_err(Into::into)
    })?;
    let mut r = row(
        &case,
        &dev.info().arch,
        s.flops(),
        s.bytes(),
        ours,
        cal,
        None,
    );
    // Held to the tensor rate whatever its intensity says (short causal rows come close to the
    // machine balance).
    hold_to(&mut r, "compute", cal);
    r.note = Some(format!(
        "{:.1} TFLOP/s, {:.1}% of the {:.0} TFLOP/s cuBLAS f16 GEMM; f32 output; inputs rotated over {copies} copies",
        r.gflops / 1e3,
        r.peak_fraction * 100.0,
        cal.tensor_gflops / 1e3
    ));
    Ok(r)
}

/// The name of the attention peer in the rows.
pub const SDPA_PEER: &str = "torch-sdpa";

/// How long the peer script may run for all shapes together.
const SDPA_TIMEOUT: Duration = Duration::from_secs(600);

/// The peer script's request: `{"quick": …, "cases": [{"name", "batch", "seq", "heads",
/// "head_dim", "causal", "copies"}, …]}` (see `benches/peers/torch_sdpa.py`).
pub fn sdpa_request(cases: &[(AttnBench, usize)], quick: bool) -> String {
    let cases: Vec<serde_json::Value> = cases
        .iter()
        .map(|(s, copies)| {
            serde_json::json!({
                "name": s.case_id().name(),
                "batch": s.batch,
                "seq": s.seq,
                "heads": s.heads,
                "head_dim": s.head_dim,
                "causal": s.causal,
                "copies": copies,
            })
        })
        .collect();
    serde_json::json!({ "quick": quick, "cases": cases }).to_string()
}

/// What the attention peer answered, for all shapes of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SdpaPeer {
    /// `torch VERSION on DEVICE`, once the script got that far.
    pub about: Option<String>,
    /// Per case name: median seconds per call, or why there is none.
    pub results: HashMap<String, std::result::Result<f64, String>>,
    /// Why nothing ran (no python, no torch, no CUDA, a crash, a timeout), if so.
    pub failed: Option<String>,
}

impl SdpaPeer {
    /// A peer that did not run, and why.
    pub fn unavailable(why: impl Into<String>) -> SdpaPeer {
        SdpaPeer {
            failed: Some(why.into()),
            ..SdpaPeer::default()
        }
    }

    /// Reads the script's JSON lines (lines that are not JSON objects are ignored).
    pub fn parse(stdout: &str) -> SdpaPeer {
        let mut peer = SdpaPeer::default();
        for line in stdout.lines() {
            let Ok(serde_json::Value::Object(m)) =
                serde_json::from_str::<serde_json::Value>(line.trim())
            else {
                continue;
            };
            let text = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_string);
            if let Some(name) = text("name") {
                let r = match (m.get("seconds").and_then(|v| v.as_f64()), text("error")) {
                    (Some(s), _) if s.is_finite() && s > 0.0 => Ok(s),
                    (_, Some(e)) => Err(clip(&e)),
                    _ => Err(format!("malformed answer {}", clip(line))),
                };
                peer.results.insert(name, r);
            } else if let Some(e) = text("error") {
                peer.failed = Some(clip(&e));
            } else if let Some(v) = text("torch") {
                let device = text("device").unwrap_or_else(|| "?".into());
                peer.about = Some(format!("torch {v} on {device}"));
            }
        }
        peer
    }

    /// The peer's seconds for case `name`, or the note the row prints instead.
    pub fn lookup(&self, name: &str) -> std::result::Result<f64, String> {
        match (self.results.get(name), &self.failed) {
            (Some(Ok(s)), _) => Ok(*s),
            (Some(Err(e)), _) => Err(format!("{SDPA_PEER} failed on this shape: {e}")),
            (None, Some(why)) => Err(format!("{SDPA_PEER} did not run: {why}")),
            (None, None) => Err(format!("{SDPA_PEER} gave no answer for this shape")),
        }
    }

    /// Puts the peer's time (or why there is none) on an attention row.
    pub fn attach(&self, r: &mut Row, name: &str) {
        let note = r.note.take().unwrap_or_default();
        let sep = if note.is_empty() { "" } else { "; " };
        match self.lookup(name) {
            Ok(s) => {
                r.peer = Some(SDPA_PEER.to_string());
                r.peer_seconds = Some(s);
                r.peer_ratio = Some(s / r.seconds);
                let about = self.about.as_deref().unwrap_or("torch");
                r.note = Some(format!(
                    "{note}{sep}peer {:.1} TFLOP/s: {about}, SDPA flash backend, [b,h,s,d] f16 with f16 output",
                    r.gflops * r.seconds / s / 1e3
                ));
            }
            Err(why) => r.note = Some(format!("{note}{sep}no peer: {why}")),
        }
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s.to_string()
    }
}

/// The python that runs the peer: `TESSERA_PEER_PYTHON`, else `python3`; `None` when that
/// variable is `none` or empty.
fn peer_python() -> Option<PathBuf> {
    match std::env::var_os("TESSERA_PEER_PYTHON") {
        Some(p) if p.is_empty() || p == "none" => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(PathBuf::from("python3")),
    }
}

/// `benches/peers/torch_sdpa.py`: in the source tree this binary was built from, else under
/// the current directory, else two levels above the binary's folder (`target/release/..`).
fn sdpa_script() -> std::result::Result<PathBuf, String> {
    let rel = "benches/peers/torch_sdpa.py";
    let mut tried = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)];
    if let Ok(cwd) = std::env::current_dir() {
        tried.push(cwd.join(rel));
    }
    if let Some(root) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(PathBuf::from))
    {
        tried.push(root.join(rel));
    }
    match tried.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(format!(
            "{rel} not found (looked in {})",
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Runs the peer script once for `cases` (shape, input copies) and reads its answers; never
/// fails: what went wrong is in [`SdpaPeer::failed`].
pub fn run_sdpa_peer(cases: &[(AttnBench, usize)], quick: bool) -> SdpaPeer {
    match peer_python() {
        Some(python) => run_sdpa_script(&python, cases, quick, SDPA_TIMEOUT),
        None => SdpaPeer::unavailable("off (TESSERA_PEER_PYTHON=none)"),
    }
}

/// [`run_sdpa_peer`] with this python and time limit.
fn run_sdpa_script(
    python: &std::path::Path,
    cases: &[(AttnBench, usize)],
    quick: bool,
    timeout: Duration,
) -> SdpaPeer {
    let script = match sdpa_script() {
        Ok(p) => p,
        Err(e) => return SdpaPeer::unavailable(e),
    };
    let spawned = Command::new(python)
        .arg("-u")
        .arg(&script)
        .arg("--request")
        .arg(sdpa_request(cases, quick))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return SdpaPeer::unavailable(format!(
                "cannot run {}: {e} (set TESSERA_PEER_PYTHON to a python with torch)",
                python.display()
            ));
        }
    };
    // Both pipes are drained on threads so that a chatty peer cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                // The readers are left behind: a grandchild could still hold the pipes.
                return SdpaPeer::unavailable(format!(
                    "{} timed out after {:.0} s",
                    script.display(),
                    timeout.as_secs_f64()
                ));
            }
            Err(e) => {
                let _ = child.kill();
                return SdpaPeer::unavailable(format!("waiting for the peer: {e}"));
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let mut peer = SdpaPeer::parse(&stdout);
    if !status.success() && peer.failed.is_none() {
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(no output)");
        peer.failed = Some(format!("the peer exited with {status}: {}", clip(last)));
    }
    peer
}

// ---------------------------------------------------------------------------------------
// kv_cache: decode attention over a device cache.

/// Tokens appended per `append` call while a cache is filled.
const KV_FILL_CHUNK: usize = 4096;

/// One shape of the `kv_cache` family: one query token of one sequence over `tokens` cached
/// tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBench {
    /// Cached tokens.
    pub tokens: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Storage type.
    pub dtype: KvDType,
    /// Tokens per page (paged layout), or `None` for the contiguous layout.
    pub block: Option<usize>,
}

impl KvBench {
    /// The row's identity: `kv_cache/decode/1xTOKENSxDhHEADSkvKVHEADS/DTYPE/{pgN,cont}`.
    pub fn case_id(&self) -> CaseId {
        let dtype = match self.dtype {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
            KvDType::Q8_0 => "q8_0",
        };
        let layout = match self.block {
            Some(b) => format!("pg{b}"),
            None => "cont".to_string(),
        };
        id(
            "kv_cache",
            "decode",
            format!(
                "1x{}x{}h{}kv{}",
                self.tokens, self.head_dim, self.n_heads, self.n_kv_heads
            ),
            dtype,
            &layout,
        )
    }

    /// The cache's layout, sized for exactly one sequence of `tokens`.
    pub fn layout(&self) -> KvLayout {
        match self.block {
            Some(block_size) => KvLayout::Paged {
                block_size,
                num_blocks: self.tokens.div_ceil(block_size),
            },
            None => KvLayout::Contiguous {
                max_seqs: 1,
                max_len: self.tokens,
            },
        }
    }

    /// The cache's configuration.
    pub fn config(&self) -> KvCacheConfig {
        KvCacheConfig {
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            layout: self.layout(),
        }
    }

    /// Stored bytes of one row of `head_dim` values, as the device cache stores it: f32/f16
    /// rows padded to whole 16-byte vectors (`round_up(head_dim, 8)` elements), Q8_0 rows
    /// `32·⌈head_dim/32⌉` quants and `⌈head_dim/32⌉` f16 scales.
    pub fn row_bytes(&self) -> usize {
        let d = self.head_dim;
        match self.dtype {
            KvDType::F32 => 4 * d.div_ceil(8) * 8,
            KvDType::F16 => 2 * d.div_ceil(8) * 8,
            KvDType::Q8_0 => d.div_ceil(32) * (32 + 2),
        }
    }

    /// Stored bytes of the sequence's K and V: what one decode call reads.
    pub fn cache_bytes(&self) -> usize {
        2 * self.tokens * self.n_kv_heads * self.row_bytes()
    }

    /// Bytes a call moves: the cache, the f32 query and the f32 output.
    pub fn bytes(&self) -> f64 {
        (self.cache_bytes() + 2 * 4 * self.n_heads * self.head_dim) as f64
    }

    /// `4·tokens·head_dim·n_heads` (q·k and p·v for every query head).
    pub fn flops(&self) -> f64 {
        4.0 * (self.tokens * self.head_dim * self.n_heads) as f64
    }
}

/// The `kv_cache` shapes: Llama-like heads (32 query, 8 key/value, 128 wide), f16 pages of 16
/// and 64 tokens at 4k/32k/128k tokens (`quick`: 4k/32k), and at 32k a Q8_0 paged cache and an
/// f16 contiguous one.
pub fn kv_shapes(quick: bool) -> Vec<KvBench> {
    let lens: &[usize] = if quick {
        &[4096, 32768]
    } else {
        &[4096, 32768, 131072]
    };
    let base = KvBench {
        tokens: 0,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        dtype: KvDType::F16,
        block: Some(16),
    };
    let mut out = Vec::new();
    for &tokens in lens {
        let s = KvBench { tokens, ..base };
        out.push(s);
        out.push(KvBench {
            block: Some(64),
            ..s
        });
        if tokens == 32768 {
            out.push(KvBench {
                dtype: KvDType::Q8_0,
                ..s
            });
            out.push(KvBench { block: None, ..s });
        }
    }
    out
}

fn kv_cases(quick: bool) -> Vec<GpuCase> {
    kv_shapes(quick)
        .into_iter()
        .map(|s| {
            let case_id = s.case_id();
            let c2 = case_id.clone();
            GpuCase {
                id: case_id,
                run: Box::new(move |d, c, q| kv_case(d, c, q, s, c2)),
            }
        })
        .collect()
}

fn kv_case(
    dev: &Device,
    cal: &GpuCalibration,
    quick: bool,
    s: KvBench,
    case: CaseId,
) -> Result<Row> {
    let (nkv, d) = (s.n_kv_heads, s.head_dim);
    let copies = rotation(dev.info(), s.cache_bytes());
    // Fill every copy from the same random chunk of keys and values (f32, as `append` takes).
    let chunk = s.tokens.clamp(1, KV_FILL_CHUNK);
    let chunk_layout = HeadLayout::bshd(chunk, nkv, d);
    let k = dev.upload(&random_f32(chunk * nkv * d, 40))?;
    let v = dev.upload(&random_f32(chunk * nkv * d, 41))?;
    let mut caches: Vec<(DeviceKvCache, SeqId)> = Vec::with_capacity(copies);
    for _ in 0..copies {
        let mut cache = DeviceKvCache::new(dev, s.config())?;
        let seq = cache.add_sequence()?;
        let mut filled = 0;
        while filled < s.tokens {
            let n = chunk.min(s.tokens - filled);
            cache.append(dev, &[seq], n, &k, chunk_layout, &v, chunk_layout)?;
            filled += n;
        }
        let len = cache.seq_len(seq)?;
        if len != s.tokens {
            return Err(BenchError(format!(
                "the cache holds {len} tokens after filling {}",
                s.tokens
            )));
        }
        caches.push((cache, seq));
    }
    drop((k, v));
    dev.synchronize()?;
    let qo_layout = HeadLayout::bshd(1, s.n_heads, d);
    let q = dev.upload(&random_f32(s.n_heads * d, 42))?;
    let mut out: CudaSlice<f32> = dev.alloc_zeros(s.n_heads * d)?;
    let params = DeviceDecodeParams::new(d);
    let ours = time_gpu(dev, quick, |i| {
        let (cache, seq) = &mut caches[i % copies];
        cache
            .decode_attention(
                dev,
                &[*seq],
                s.n_heads,
                &q,
                qo_layout,
                &params,
                &mut out,
                qo_layout,
            )
            .map_err(Into::into)
    })?;
    let mut r = row(
        &case,
        &dev.info().arch,
        s.flops(),
        s.bytes(),
        ours,
        cal,
        None,
    );
    // Decode reads the cache once: held to the copy bandwidth.
    hold_to(&mut r, "memory", cal);
    r.note = Some(format!(
        "{:.1}% of the {:.0} GB/s device copy (target: 70% at 32k tokens); caches rotated over {copies} copies ({:.0} MiB)",
        r.peak_fraction * 100.0,
        cal.copy_gbs,
        (copies * s.cache_bytes()) as f64 / (1 << 20) as f64
    ));
    Ok(r)
}

/// Runs the selected GPU cases and prints the table as it goes.
pub fn run(cfg: &GpuConfig) -> Result<GpuOutcome> {
    let families: Vec<&str> = if cfg.families.is_empty() {
        FAMILIES.to_vec()
    } else {
        cfg.families.iter().map(String::as_str).collect()
    };
    if let Some(bad) = families.iter().find(|f| !FAMILIES.contains(f)) {
        return Err(BenchError(format!(
            "family {bad:?} has no CUDA benchmark (CUDA families: {})",
            FAMILIES.join(", ")
        )));
    }
    let dev = Device::new(0)?;
    let info = dev.info().clone();
    let mut cases = Vec::new();
    for f in &families {
        match *f {
            "gemm" => cases.extend(gemm_cases(&info, cfg.quick)),
            "quant" => cases.extend(quant_cases(cfg.quick)),
            "attention" => cases.extend(attention_cases(cfg.quick, info.has_sm90a())),
            "kv_cache" => cases.extend(kv_cases(cfg.quick)),
            "model" => cases.extend(super::cuda_model::cases(cfg.quick)),
            _ => {}
        }
    }
    cases.retain(|c| {
        let name = c.id.name();
        cfg.filters.is_empty() || cfg.filters.iter().any(|f| name.contains(f.as_str()))
    });
    if cases.is_empty() {
        return Err(BenchError(
            "no CUDA benchmark case matches the families and filters given".into(),
        ));
    }
    println!(
        "tessera bench --backend cuda: {} cases on {} ({}, {} SMs, L2 {} MiB, {:.0} GiB)",
        cases.len(),
        info.name,
        info.arch,
        info.sm_count,
        info.l2_bytes >> 20,
        info.total_mem as f64 / (1u64 << 30) as f64
    );
    eprintln!("calibrating (device copy bandwidth, cuBLAS f16 GEMM) ...");
    let calibration = calibrate(&dev, cfg.quick)?;
    println!(
        "calibration: copy {:.0} GB/s (read + write), cuBLAS f16 GEMM {}³ {:.1} TFLOP/s",
        calibration.copy_gbs,
        calibration.tensor_size,
        calibration.tensor_gflops / 1e3
    );
    // The attention peer runs once, for every selected attention shape, before anything else
    // is timed (it is another process on the same GPU).
    let selected: HashSet<String> = cases.iter().map(|c| c.id.name()).collect();
    let attn: Vec<(AttnBench, usize)> = if families.contains(&"attention") {
        attention_shapes(cfg.quick)
            .into_iter()
            .filter(|s| {
                selected.contains(&s.case_id().name())
                    || selected.contains(&wgmma_case_id(s).name())
            })
            .map(|s| (s, attention_copies(&info, &s)))
            .collect()
    } else {
        Vec::new()
    };
    let sdpa = (!attn.is_empty()).then(|| {
        eprintln!(
            "running the attention peer (torch SDPA, flash backend) on {} shapes ...",
            attn.len()
        );
        let t0 = Instant::now();
        let peer = run_sdpa_peer(&attn, cfg.quick);
        let answered = peer.results.values().filter(|r| r.is_ok()).count();
        println!(
            "attention peer (torch SDPA, flash backend): {}, {answered} of {} shapes in {:.1} s{}",
            peer.about.as_deref().unwrap_or("no torch"),
            attn.len(),
            t0.elapsed().as_secs_f64(),
            peer.failed
                .as_ref()
                .map_or_else(String::new, |why| format!(" ({why})"))
        );
        peer
    });
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let mut current = "";
    for case in cases {
        if case.id.family != current {
            current = case.id.family;
            println!("\n== cuda {current}");
            println!("{}", report::header("peer"));
        }
        let name = case.id.name();
        match (case.run)(&dev, &calibration, cfg.quick) {
            Ok(mut r) => {
                if let (Some(peer), "attention") = (&sdpa, case.id.family) {
                    peer.attach(&mut r, &sdpa_name(&name));
                }
                println!("{}", report::format_row(&r));
                if let Some(note) = report::format_note(&r) {
                    println!("{note}");
                }
                rows.push(r);
            }
            Err(e) => {
                eprintln!("FAILED {name}: {e}");
                failures.push((name, e));
            }
        }
    }
    Ok(GpuOutcome {
        calibration,
        rows,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn info(l2_mib: usize) -> DeviceInfo {
        DeviceInfo {
            name: "test".into(),
            compute_capability: (9, 0),
            arch: "sm_90a".into(),
            sm_count: 132,
            l2_bytes: l2_mib << 20,
            max_smem_per_block: 227 << 10,
            total_mem: 80 << 30,
        }
    }

    fn cal() -> GpuCalibration {
        GpuCalibration {
            copy_gbs: 3000.0,
            tensor_gflops: 600_000.0,
            tensor_size: 8192,
        }
    }

    #[test]
    fn families_are_listed() {
        assert_eq!(
            FAMILIES,
            ["gemm", "quant", "attention", "kv_cache", "model"]
        );
    }

    #[test]
    fn attention_flops_count_the_attended_pairs() {
        let s = AttnBench {
            batch: 3,
            seq: 4,
            heads: 2,
            head_dim: 8,
            causal: false,
        };
        assert_eq!(s.pairs(), 16);
        assert_eq!(s.flops(), 4.0 * 16.0 * 8.0 * 2.0 * 3.0);
        let c = AttnBench { causal: true, ..s };
        assert_eq!(c.pairs(), 10); // 1 + 2 + 3 + 4
        assert_eq!(c.flops(), 4.0 * 10.0 * 8.0 * 2.0 * 3.0);
        assert_eq!(s.elems(), 3 * 4 * 2 * 8);
        assert_eq!(s.input_bytes(), 3 * 2 * 192);
        assert_eq!(s.bytes(), (6 * 192 + 4 * 192) as f64);
        // 16k tokens, causal: 16384·16385/2 pairs, no overflow.
        let big = AttnBench {
            batch: 1,
            seq: 16384,
            heads: 32,
            head_dim: 64,
            causal: true,
        };
        assert_eq!(big.pairs(), 16384 * 16385 / 2);
        assert_eq!(big.flops(), 4.0 * (16384.0 * 16385.0 / 2.0) * 64.0 * 32.0);
    }

    #[test]
    fn attention_shapes_keep_hidden_and_tokens() {
        let full = attention_shapes(false);
        let quick = attention_shapes(true);
        assert_eq!(full.len(), 12);
        assert_eq!(quick.len(), 8);
        assert!(quick.iter().all(|s| full.contains(s) && s.seq <= 4096));
        for s in &full {
            assert_eq!(s.heads * s.head_dim, 2048, "{s:?}");
            assert_eq!(s.batch * s.seq, ATTN_TOKENS, "{s:?}");
            assert!(tessera_cuda::attention::MMA_HEAD_DIMS.contains(&s.head_dim));
        }
        for seq in [1024, 4096, 16384] {
            for d in [64, 128] {
                for causal in [false, true] {
                    assert!(
                        full.iter()
                            .any(|s| s.seq == seq && s.head_dim == d && s.causal == causal)
                    );
                }
            }
        }
        let names: HashSet<String> = full.iter().map(|s| s.case_id().name()).collect();
        assert_eq!(names.len(), full.len());
        let s = full[1];
        assert_eq!(
            s.case_id().name(),
            "attention/causal/16x1024x64h32/f16/bshd/t1"
        );
        assert_eq!(
            full[0].case_id().name(),
            "attention/bidir/16x1024x64h32/f16/bshd/t1"
        );
        // The cases are the shapes, in order; on sm_90a each is followed by its wgmma row,
        // which shares the shape's peer measurement.
        let cases = attention_cases(false, false);
        assert_eq!(cases.len(), full.len());
        for (c, s) in cases.iter().zip(&full) {
            assert_eq!(c.id, s.case_id());
        }
        let hopper = attention_cases(false, true);
        assert_eq!(hopper.len(), 2 * full.len());
        for (pair, s) in hopper.chunks(2).zip(&full) {
            assert_eq!(pair[0].id, s.case_id());
            assert_eq!(pair[1].id, wgmma_case_id(s));
            assert_eq!(pair[1].id.layout, WGMMA_LAYOUT);
            assert_eq!(sdpa_name(&pair[1].id.name()), s.case_id().name());
            assert_eq!(sdpa_name(&pair[0].id.name()), s.case_id().name());
        }
    }

    #[test]
    fn inputs_rotate_past_the_l2() {
        let s = attention_shapes(true)[0];
        // 3 × 64 MiB of f16 inputs against 4 × 50 MiB: two copies.
        assert_eq!(s.input_bytes(), 192 << 20);
        assert_eq!(attention_copies(&info(50), &s), 2);
        assert_eq!(attention_copies(&info(40), &s), 1);
        assert_eq!(rotation(&info(50), 16 << 20), 13);
        assert_eq!(rotation(&info(50), 1), 64);
        assert_eq!(rotation(&info(50), 0), 64);
    }

    #[test]
    fn kv_bytes_count_the_stored_rows() {
        let s = KvBench {
            tokens: 4096,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            dtype: KvDType::F16,
            block: Some(16),
        };
        assert_eq!(s.row_bytes(), 256);
        assert_eq!(s.cache_bytes(), 16 << 20); // 4096 tokens × 8 heads × (K, V) × 256 B
        assert_eq!(s.bytes(), ((16 << 20) + 2 * 4 * 32 * 128) as f64);
        assert_eq!(s.flops(), 4.0 * 4096.0 * 128.0 * 32.0);
        let q8 = KvBench {
            dtype: KvDType::Q8_0,
            ..s
        };
        assert_eq!(q8.row_bytes(), 4 * 34); // 4 blocks of 32 quants + an f16 scale
        assert_eq!(q8.cache_bytes(), 2 * 4096 * 8 * 136);
        // Odd widths are stored padded, as DeviceKvCache lays them out.
        let odd = KvBench { head_dim: 100, ..s };
        assert_eq!(odd.row_bytes(), 2 * 104);
        assert_eq!(
            KvBench {
                dtype: KvDType::Q8_0,
                ..odd
            }
            .row_bytes(),
            4 * 34
        );
        assert_eq!(
            KvBench {
                dtype: KvDType::F32,
                ..odd
            }
            .row_bytes(),
            4 * 104
        );
        // Layouts hold exactly the sequence.
        assert_eq!(
            s.layout(),
            KvLayout::Paged {
                block_size: 16,
                num_blocks: 256
            }
        );
        let odd_len = KvBench {
            tokens: 1000,
            block: Some(64),
            ..s
        };
        assert_eq!(
            odd_len.layout(),
            KvLayout::Paged {
                block_size: 64,
                num_blocks: 16
            }
        );
        let cont = KvBench { block: None, ..s };
        assert_eq!(
            cont.layout(),
            KvLayout::Contiguous {
                max_seqs: 1,
                max_len: 4096
            }
        );
        assert_eq!(cont.config().n_kv_heads, 8);
        assert_eq!(cont.config().dtype, KvDType::F16);
    }

    #[test]
    fn kv_shapes_are_the_issues() {
        let full = kv_shapes(false);
        let quick = kv_shapes(true);
        assert_eq!(full.len(), 8);
        assert_eq!(quick.len(), 6);
        assert!(quick.iter().all(|s| full.contains(s) && s.tokens <= 32768));
        for tokens in [4096, 32768, 131072] {
            for b in [16, 64] {
                assert!(
                    full.iter().any(|s| s.tokens == tokens
                        && s.block == Some(b)
                        && s.dtype == KvDType::F16)
                );
            }
        }
        let q8: Vec<_> = full.iter().filter(|s| s.dtype == KvDType::Q8_0).collect();
        let cont: Vec<_> = full.iter().filter(|s| s.block.is_none()).collect();
        assert_eq!((q8.len(), cont.len()), (1, 1));
        assert_eq!((q8[0].tokens, cont[0].tokens), (32768, 32768));
        for s in &full {
            assert_eq!((s.n_heads, s.n_kv_heads, s.head_dim), (32, 8, 128));
            assert_eq!(s.n_heads % s.n_kv_heads, 0);
        }
        let names: HashSet<String> = full.iter().map(|s| s.case_id().name()).collect();
        assert_eq!(names.len(), full.len());
        assert!(names.contains("kv_cache/decode/1x32768x128h32kv8/q8_0/pg16/t1"));
        assert!(names.contains("kv_cache/decode/1x32768x128h32kv8/f16/cont/t1"));
        assert!(names.contains("kv_cache/decode/1x131072x128h32kv8/f16/pg64/t1"));
        assert_eq!(kv_cases(false).len(), full.len());
        // The 128k cache fills in whole chunks.
        assert!(full.iter().all(|s| s.tokens % KV_FILL_CHUNK == 0));
    }

    #[test]
    fn peer_request_is_the_scripts_format() {
        let shapes = attention_shapes(true);
        let req = sdpa_request(&[(shapes[0], 2), (shapes[3], 5)], true);
        let v: serde_json::Value = serde_json::from_str(&req).unwrap();
        assert_eq!(v["quick"], true);
        let cases = v["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(
            cases[0]["name"],
            "attention/bidir/16x1024x64h32/f16/bshd/t1"
        );
        assert_eq!(cases[0]["batch"], 16);
        assert_eq!(cases[0]["seq"], 1024);
        assert_eq!(cases[0]["heads"], 32);
        assert_eq!(cases[0]["head_dim"], 64);
        assert_eq!(cases[0]["causal"], false);
        assert_eq!(cases[0]["copies"], 2);
        assert_eq!(cases[1]["causal"], true);
        assert_eq!(cases[1]["head_dim"], 128);
        assert_eq!(cases[1]["copies"], 5);
    }

    #[test]
    fn peer_answers_parse() {
        let out = "\
{\"torch\": \"2.11.0+cu130\", \"device\": \"NVIDIA H200\", \"backend\": \"flash\"}
a stray print
{\"name\": \"a\", \"seconds\": 0.00125, \"reps\": 70, \"tflops\": 300.5}
{\"name\": \"b\", \"error\": \"RuntimeError: No available kernel. Aborting execution.\"}
{\"name\": \"c\", \"seconds\": -1}
[1, 2]

";
        let p = SdpaPeer::parse(out);
        assert_eq!(
            p.about.as_deref(),
            Some("torch 2.11.0+cu130 on NVIDIA H200")
        );
        assert_eq!(p.failed, None);
        assert_eq!(p.lookup("a"), Ok(0.00125));
        let b = p.lookup("b").unwrap_err();
        assert!(b.contains("No available kernel"), "{b}");
        assert!(p.lookup("c").unwrap_err().contains("malformed"));
        assert!(p.lookup("d").unwrap_err().contains("no answer"));
        // A peer that could not start.
        let p = SdpaPeer::parse(
            "{\"error\": \"torch is not importable (ModuleNotFoundError: No module named 'torch')\"}\n",
        );
        assert!(p.results.is_empty() && p.about.is_none());
        let why = p.lookup("a").unwrap_err();
        assert!(
            why.contains("did not run") && why.contains("No module named"),
            "{why}"
        );
        assert!(SdpaPeer::parse("").lookup("a").is_err());
    }

    #[test]
    fn peer_times_land_on_the_rows() {
        let s = attention_shapes(true)[0];
        let name = s.case_id().name();
        let mut r = row(
            &s.case_id(),
            "sm_90a",
            s.flops(),
            s.bytes(),
            (1e-3, 10),
            &cal(),
            None,
        );
        r.note = Some("ours".into());
        let p = SdpaPeer::parse(&format!(
            "{{\"torch\": \"2.11\", \"device\": \"H\"}}\n{{\"name\": \"{name}\", \"seconds\": 0.002}}\n"
        ));
        let mut with = r.clone();
        p.attach(&mut with, &name);
        assert_eq!(with.peer.as_deref(), Some(SDPA_PEER));
        assert_eq!(with.peer_seconds, Some(0.002));
        assert_eq!(with.peer_ratio, Some(2.0));
        let note = with.note.unwrap();
        assert!(note.starts_with("ours; peer "), "{note}");
        assert!(
            note.contains("torch 2.11 on H") && note.contains("f16 output"),
            "{note}"
        );
        // Half our rate: the peer's TFLOP/s in the note.
        let peer_tflops = s.flops() / 0.002 / 1e12;
        assert!(
            note.contains(&format!("{peer_tflops:.1} TFLOP/s")),
            "{note}"
        );
        let mut without = r.clone();
        SdpaPeer::unavailable("off (TESSERA_PEER_PYTHON=none)").attach(&mut without, &name);
        assert_eq!(
            (without.peer, without.peer_seconds, without.peer_ratio),
            (None, None, None)
        );
        assert_eq!(
            without.note.as_deref(),
            Some("ours; no peer: torch-sdpa did not run: off (TESSERA_PEER_PYTHON=none)")
        );
    }

    #[test]
    fn gpu_rows_are_held_to_their_ceilings() {
        // Attention at 1k tokens, causal: about the machine balance, forced compute-bound by
        // the case; here the plain row arithmetic.
        let s = AttnBench {
            batch: 1,
            seq: 2,
            heads: 1,
            head_dim: 8,
            causal: false,
        };
        let r = row(&s.case_id(), "sm_90a", 6e11, 1e6, (1e-3, 5), &cal(), None);
        assert_eq!(r.gflops, 600_000.0);
        assert_eq!(r.bound, "compute");
        assert_eq!(r.peak_fraction, 1.0);
        let k = kv_shapes(true)[0];
        let r = row(
            &k.case_id(),
            "sm_90a",
            k.flops(),
            k.bytes(),
            (1e-5, 5),
            &cal(),
            None,
        );
        assert_eq!(r.bound, "memory");
        assert!((r.gbs - k.bytes() / 1e-5 / 1e9).abs() < 1e-6);
    }

    /// The peer script accepts the request the harness sends (needs `python3`, not torch:
    /// `--dry-run` never imports it).
    #[test]
    fn peer_script_reads_the_request() {
        let shapes = attention_shapes(true);
        let cases: Vec<(AttnBench, usize)> = shapes.iter().map(|&s| (s, 3)).collect();
        let script = match sdpa_script() {
            Ok(p) => p,
            // A test binary carried away from its source tree.
            Err(e) if !Path::new(env!("CARGO_MANIFEST_DIR")).is_dir() => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let out = match Command::new("python3")
            .arg(&script)
            .arg("--dry-run")
            .arg("--request")
            .arg(sdpa_request(&cases, true))
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipped: cannot run python3 ({e})");
                return;
            }
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), shapes.len());
        for (l, s) in lines.iter().zip(&shapes) {
            assert_eq!(l["name"], s.case_id().name().as_str());
            assert_eq!(l["flops"].as_f64(), Some(s.flops()));
            assert_eq!(l["copies"], 3);
            assert_eq!(l["quick"], true);
        }
        // Without torch the real run reports why, as one JSON line, and exits 2; with torch it
        // would run on the GPU, so only the failure form is checked, and only where torch is
        // missing.
        let has_torch = Command::new("python3")
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_torch {
            let out = Command::new("python3")
                .arg(&script)
                .arg("--request")
                .arg(sdpa_request(&cases[..1], true))
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2));
            let p = SdpaPeer::parse(&String::from_utf8_lossy(&out.stdout));
            assert!(p.failed.unwrap().contains("torch"));
            // The same through the harness's runner: every row gets the reason.
            let p = run_sdpa_script(Path::new("python3"), &cases, true, Duration::from_secs(60));
            let why = p.lookup(&shapes[0].case_id().name()).unwrap_err();
            assert!(why.contains("torch is not importable"), "{why}");
        }
    }

    #[test]
    fn a_missing_python_is_a_note_not_a_failure() {
        let cases = [(attention_shapes(true)[0], 1)];
        let p = run_sdpa_script(
            Path::new("/nonexistent/python3"),
            &cases,
            true,
            Duration::from_secs(5),
        );
        let why = p.lookup(&cases[0].0.case_id().name()).unwrap_err();
        assert!(
            why.contains("cannot run /nonexistent/python3") && why.contains("TESSERA_PEER_PYTHON"),
            "{why}"
        );
        // A python that fails without a word (`false` ignores its arguments).
        if Path::new("/bin/false").is_file() {
            let p = run_sdpa_script(
                Path::new("/bin/false"),
                &cases,
                true,
                Duration::from_secs(5),
            );
            let why = p.failed.unwrap();
            assert!(
                why.contains("exited with") && why.contains("(no output)"),
                "{why}"
            );
        }
        // A python that outlives the limit: a script that ignores its arguments and sleeps.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path =
                std::env::temp_dir().join(format!("tessera-slow-peer-{}", std::process::id()));
            std::fs::write(&path, "#!/bin/sh\nexec sleep 30\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            let t0 = Instant::now();
            let p = run_sdpa_script(&path, &cases, true, Duration::from_millis(300));
            let _ = std::fs::remove_file(&path);
            let why = p.failed.unwrap();
            assert!(why.contains("timed out after 0 s"), "{why}");
            assert!(t0.elapsed() < Duration::from_secs(10));
        }
    }
}
