//! `tessera bench --backend cuda`: the CUDA kernels on GPU 0, each against its peer in the same
//! run, placed on ceilings measured on the device itself.
//!
//! Calibration: the device-to-device copy bandwidth (`cuMemcpyDtoD` of a buffer many times the
//! L2, counting bytes read plus bytes written) and the tensor-core rate cuBLAS reaches on an
//! f16 GEMM (8192³; 4096³ with `--quick`) on random data. Timing: CUDA events around a batch
//! of calls after warm-up, the median over batches; inputs are rotated among enough copies that
//! together they exceed the L2 several times, so the L2 is not what is measured.
//!
//! Families: `gemm` (f16/bf16 tensor-core GEMM, `mma.sync` and the sm_90a `wgmma` path, against
//! cuBLAS `cublasGemmEx` with f32 output) and `quant` (Q8_0/Q4_0/Q4_K GEMV, GB/s of weight
//! bytes against the copy bandwidth; GEMM at M = 16/128/512 against cuBLAS on the same weights
//! dequantized to f16).

use super::report::{self, CaseId, Row};
use super::{BenchError, Result};
use tessera_core::quant::{BlockQ4_0, BlockQ4_K, BlockQ8_0, QuantBlock};
use tessera_core::{Transpose, bf16, f16};
use tessera_cuda::cudarc;
use tessera_cuda::cudarc::driver::CudaSlice;
use tessera_cuda::cudarc::driver::sys::CUevent_flags;
use tessera_cuda::gemm::{GemmArgs, GemmElement, GemmPath};
use tessera_cuda::quant::{QuantArgs, QuantFormat, QuantKernel};
use tessera_cuda::{Device, DeviceInfo};

impl From<tessera_cuda::Error> for BenchError {
    fn from(e: tessera_cuda::Error) -> Self {
        BenchError(e.to_string())
    }
}

/// The families this backend benches.
pub const FAMILIES: [&str; 2] = ["gemm", "quant"];

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
    /// Families to run (`gemm`, `quant`).
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
    Row {
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
        bound: bound.to_string(),
        peak_fraction: if bound == "memory" {
            gbs / cal.copy_gbs
        } else {
            gflops / cal.tensor_gflops
        },
        peer: peer.map(|p| p.0.to_string()),
        peer_seconds: peer.map(|p| p.1),
        peer_ratio: peer.map(|p| p.1 / seconds),
        peak_bytes: None,
        peer_peak_bytes: None,
        tokens_per_s: None,
        peer_tokens_per_s: None,
        note: None,
    }
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
        r.bound = "memory".into();
        r.peak_fraction = r.gbs / cal.copy_gbs;
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

/// Runs the selected GPU cases and prints the table as it goes.
pub fn run(cfg: &GpuConfig) -> Result<GpuOutcome> {
    let dev = Device::new(0)?;
    let info = dev.info().clone();
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
    let mut cases = Vec::new();
    for f in &families {
        match *f {
            "gemm" => cases.extend(gemm_cases(&info, cfg.quick)),
            _ => cases.extend(quant_cases(cfg.quick)),
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
            Ok(r) => {
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
