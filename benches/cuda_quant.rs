//! CUDA quantized matmul benchmarks (`tessera_cuda::quant`, `y = x·Wᵀ`, f32 activations, W in
//! Q8_0 / Q4_0 / Q4_K blocks), every format:
//!
//! - Decode GEMV, `1x14336x4096` (an 8B model's MLP up-projection): 8 copies of the weights,
//!   rotated so that together they are several times the L2 and every call reads its weights
//!   from memory. Throughput is the weight bytes read (`Throughput::Bytes`); the same group
//!   times `cuMemcpyDtoD` of one copy (`stream.memcpy_dtod`, counted as bytes read + written),
//!   the bandwidth ceiling it is measured against in the same run. A summary line per format
//!   prints the GEMV's fraction of the copy bandwidth.
//! - Prefill GEMM, `Mx4096x4096` for M = 16, 128, 512 (`Throughput::Elements(2mnk)`, so
//!   "elem/s" reads as flop/s), against cuBLAS on the dequantized weights: `cublas-f32`
//!   (SGEMM, f32 weights and activations) and `cublas-f16` (`cublasGemmEx`, f16 weights and
//!   activations, f32 accumulation: what Tessera's tensor-core GEMM computes, without the
//!   dequantization). The peers' conversions are done once, untimed.
//!
//! Group `cuda_quant/gemv/<format>/1x14336x4096` (functions `tessera-gemv`, `memcpy-dtod`) and
//! `cuda_quant/gemm/<format>/<M>x4096x4096` (`tessera-gemm`, `cublas-f32`, `cublas-f16`).
//! Timing: CUDA events around a batch of launches (criterion's `iter_custom`), after
//! criterion's warm-up. Before timing, each Tessera result is checked against a CPU reference
//! (GEMV, a sample of rows) or cuBLAS (GEMM).
//!
//! No GPU (or no NVRTC): one line saying why, exit 0. No cuBLAS: its functions are left out.
//! `cargo bench --features cli,cuda --bench cuda_quant -- --test` runs every function once.

use criterion::{Criterion, SamplingMode, Throughput};
use std::time::Duration;
use tessera::bench::cuda::time_events;
use tessera::bench::data::random_f32;
use tessera_core::quant::{self as q, BlockQ4_0, BlockQ4_K, BlockQ8_0, QuantBlock};
use tessera_core::{Transpose, f16};
use tessera_cuda::cudarc::cublas::sys::cublasOperation_t;
use tessera_cuda::cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use tessera_cuda::cudarc::driver::CudaSlice;
use tessera_cuda::gemm::{self, GemmArgs};
use tessera_cuda::quant::{self, QuantArgs, QuantFormat, QuantKernel};
use tessera_cuda::{Device, Error};

const FORMATS: [QuantFormat; 3] = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4K];
const GEMV_N: usize = 14336;
const GEMV_K: usize = 4096;
const GEMV_COPIES: usize = 8;
const GEMM_NK: usize = 4096;
const GEMM_M: [usize; 3] = [16, 128, 512];

fn blocks_bytes<B: QuantBlock>(src: &[f32]) -> Vec<u8> {
    let mut blocks = vec![B::zeroed(); src.len() / B::LEN];
    q::quantize(src, &mut blocks).expect("quantizing");
    bytemuck::cast_slice(&blocks).to_vec()
}

/// `n × k` random weights (scaled like a trained layer's) quantized to `format`.
fn quantized(format: QuantFormat, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let src: Vec<f32> = random_f32(n * k, seed)
        .into_iter()
        .map(|v| v * 0.05)
        .collect();
    match format {
        QuantFormat::Q8_0 => blocks_bytes::<BlockQ8_0>(&src),
        QuantFormat::Q4_0 => blocks_bytes::<BlockQ4_0>(&src),
        QuantFormat::Q4K => blocks_bytes::<BlockQ4_K>(&src),
        QuantFormat::Q8K => unreachable!("not a weight format"),
    }
}

/// The CPU-dequantized weights.
fn dequantized(format: QuantFormat, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
    fn deq<B: QuantBlock>(bytes: &[u8], out: &mut [f32]) {
        let mut blocks = vec![B::zeroed(); bytes.len() / std::mem::size_of::<B>()];
        bytemuck::cast_slice_mut::<B, u8>(&mut blocks).copy_from_slice(bytes);
        q::dequantize(&blocks, out).expect("dequantizing");
    }
    let mut out = vec![0f32; n * k];
    match format {
        QuantFormat::Q8_0 => deq::<BlockQ8_0>(bytes, &mut out),
        QuantFormat::Q4_0 => deq::<BlockQ4_0>(bytes, &mut out),
        QuantFormat::Q4K => deq::<BlockQ4_K>(bytes, &mut out),
        QuantFormat::Q8K => unreachable!("not a weight format"),
    }
    out
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
}

fn bench_gemv(cr: &mut Criterion, dev: &Device, format: QuantFormat) -> tessera_cuda::Result<()> {
    let (n, k) = (GEMV_N, GEMV_K);
    let bytes = quantized(format, n, k, 7);
    let copies: Vec<CudaSlice<u8>> = (0..GEMV_COPIES)
        .map(|_| dev.upload(&bytes))
        .collect::<tessera_cuda::Result<_>>()?;
    let mut scratch: CudaSlice<u8> = dev.alloc_zeros(bytes.len())?;
    let xh = random_f32(k, 11);
    let x = dev.upload(&xh)?;
    let mut y: CudaSlice<f32> = dev.alloc_zeros(n)?;
    let args = QuantArgs::dense(format, 1, n, k);

    // The result is right (a sample of rows against the f64 CPU product).
    quant::matmul(dev, QuantKernel::Gemv, &args, &x, &copies[0], &mut y)?;
    let got = dev.download(&y)?;
    let w = dequantized(format, &bytes, n, k);
    for row in (0..n).step_by(97) {
        let wr = &w[row * k..(row + 1) * k];
        let exact: f64 = wr.iter().zip(&xh).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mag: f64 = wr
            .iter()
            .zip(&xh)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum();
        assert!(
            (got[row] as f64 - exact).abs() <= 1e-5 * mag + 1e-30,
            "{format} GEMV row {row}: {} vs {exact}",
            got[row]
        );
    }
    let plan = quant::plan(&args, QuantKernel::Gemv, 0, 0, dev.info().sm_count)?;

    let mut group = cr.benchmark_group(format!("cuda_quant/gemv/{format}/1x{n}x{k}"));
    configure(&mut group);
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("tessera-gemv", |bn| {
        bn.iter_custom(|iters| {
            time_events(dev, iters, |i| {
                quant::matmul(
                    dev,
                    QuantKernel::Gemv,
                    &args,
                    &x,
                    &copies[i % GEMV_COPIES],
                    &mut y,
                )
                .expect("GEMV launch")
            })
        })
    });
    group.throughput(Throughput::Bytes(2 * bytes.len() as u64));
    group.bench_function("memcpy-dtod", |bn| {
        bn.iter_custom(|iters| {
            time_events(dev, iters, |i| {
                dev.stream()
                    .memcpy_dtod(&copies[i % GEMV_COPIES], &mut scratch)
                    .expect("memcpy_dtod")
            })
        })
    });
    group.finish();

    // Summary: the same two, 200 launches each after a warm-up, in GB/s.
    let rate = |bytes: usize, run: &mut dyn FnMut(usize)| {
        time_events(dev, 20, &mut *run);
        bytes as f64 * 200.0 / time_events(dev, 200, &mut *run).as_secs_f64() / 1e9
    };
    let gemv = rate(bytes.len(), &mut |i| {
        quant::matmul(
            dev,
            QuantKernel::Gemv,
            &args,
            &x,
            &copies[i % GEMV_COPIES],
            &mut y,
        )
        .expect("GEMV launch")
    });
    let copy = rate(2 * bytes.len(), &mut |i| {
        dev.stream()
            .memcpy_dtod(&copies[i % GEMV_COPIES], &mut scratch)
            .expect("memcpy_dtod")
    });
    println!(
        "cuda_quant: {format} GEMV 1x{n}x{k} ({}, {} weight bytes x {GEMV_COPIES} copies): \
         {gemv:.0} GB/s of weights, memcpy_dtod {copy:.0} GB/s (read + write): {:.0}% of the copy",
        plan.kernel,
        bytes.len(),
        100.0 * gemv / copy
    );
    Ok(())
}

fn bench_gemm(
    cr: &mut Criterion,
    dev: &Device,
    blas: Option<&CudaBlas>,
    format: QuantFormat,
) -> tessera_cuda::Result<()> {
    let (n, k) = (GEMM_NK, GEMM_NK);
    let bytes = quantized(format, n, k, 13);
    let w = dev.upload(&bytes)?;
    // The peers' weights: dequantized on the device (f32), and those rounded to f16.
    let mut w32: CudaSlice<f32> = dev.alloc_zeros(n * k)?;
    quant::dequantize(dev, format, n, k, &w, &mut w32)?;
    let w16h: Vec<f16> = dev.download(&w32)?.into_iter().map(f16::from_f32).collect();
    let w16 = dev.upload(&w16h)?;
    for m in GEMM_M {
        let xh = random_f32(m * k, 17 + m as u64);
        let x = dev.upload(&xh)?;
        let x16 = dev.upload(&xh.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>())?;
        let mut y: CudaSlice<f32> = dev.alloc_zeros(m * n)?;
        let mut y_peer: CudaSlice<f32> = dev.alloc_zeros(m * n)?;
        let args = QuantArgs::dense(format, m, n, k);
        let sgemm = |blas: &CudaBlas, y: &mut CudaSlice<f32>| {
            // Column-major: yᵀ[n, m] = W32[n, k] (stored k × n, transposed) · xᵀ[k, m].
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: n as i32,
                n: m as i32,
                k: k as i32,
                alpha: 1.0f32,
                lda: k as i32,
                ldb: k as i32,
                beta: 0.0f32,
                ldc: n as i32,
            };
            // SAFETY: w32 holds n·k, x m·k and y m·n f32 elements, the extents this column-major
            // call reads and writes (lda = ldb = k, ldc = n), all on the device's stream.
            unsafe { blas.gemm(cfg, &w32, &x, y) }.expect("cuBLAS SGEMM");
        };
        let hgemm = |blas: &CudaBlas, y: &mut CudaSlice<f32>| {
            gemm::cublas_gemm_f32out(
                blas,
                &GemmArgs::dense(m, n, k, Transpose::Yes),
                &x16,
                &w16,
                y,
            )
            .expect("cuBLAS GemmEx")
        };
        quant::matmul(dev, QuantKernel::Gemm, &args, &x, &w, &mut y)?;
        if let Some(blas) = blas {
            // Agreement with cuBLAS f32 on the same dequantized weights: within the f16 rounding
            // of both operands (2⁻¹⁰ relative per product) summed over k, far below any
            // indexing mistake.
            sgemm(blas, &mut y_peer);
            let (got, want) = (dev.download(&y)?, dev.download(&y_peer)?);
            let scale = want.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(
                    0f32,
                    |s, d| if d.is_nan() { f32::INFINITY } else { s.max(d) },
                );
            assert!(
                worst <= 2e-2 * scale,
                "{format} GEMM {m}x{n}x{k}: differs from cuBLAS by {worst} (max |y| {scale})"
            );
        }
        let mut group = cr.benchmark_group(format!("cuda_quant/gemm/{format}/{m}x{n}x{k}"));
        configure(&mut group);
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function("tessera-gemm", |bn| {
            bn.iter_custom(|iters| {
                time_events(dev, iters, |_| {
                    quant::matmul(dev, QuantKernel::Gemm, &args, &x, &w, &mut y)
                        .expect("GEMM launch")
                })
            })
        });
        if let Some(blas) = blas {
            group.bench_function("cublas-f32", |bn| {
                bn.iter_custom(|iters| time_events(dev, iters, |_| sgemm(blas, &mut y_peer)))
            });
            group.bench_function("cublas-f16", |bn| {
                bn.iter_custom(|iters| time_events(dev, iters, |_| hgemm(blas, &mut y_peer)))
            });
        }
        group.finish();
    }
    Ok(())
}

fn main() {
    let dev = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("cuda_quant: skipping, no GPU: {e}");
            return;
        }
    };
    // Compile the kernels once up front: no NVRTC is a skip, not a failure.
    let probe = (|| {
        let w = dev.upload(&[0u8; 34])?;
        let x = dev.upload(&[0f32; 32])?;
        let mut y = dev.alloc_zeros::<f32>(1)?;
        quant::matmul(
            &dev,
            QuantKernel::Gemv,
            &QuantArgs::dense(QuantFormat::Q8_0, 1, 1, 32),
            &x,
            &w,
            &mut y,
        )?;
        dev.synchronize()
    })();
    match probe {
        Ok(()) => {}
        Err(e @ (Error::NvrtcUnavailable(_) | Error::Unavailable(_))) => {
            println!("cuda_quant: skipping: {e}");
            return;
        }
        Err(e) => panic!("cuda_quant: the probe GEMV failed: {e}"),
    }
    let blas = match gemm::cublas_handle(&dev) {
        Ok(b) => Some(b),
        Err(e) => {
            println!("cuda_quant: no cuBLAS peer: {e}");
            None
        }
    };
    let mut criterion = Criterion::default();
    if std::env::var_os("TESSERA_BENCH_PLOTS").is_none_or(|v| v != "1") {
        criterion = criterion.without_plots();
    }
    let mut criterion = criterion.configure_from_args();
    for format in FORMATS {
        if let Err(e) = bench_gemv(&mut criterion, &dev, format) {
            println!("cuda_quant: skipping the {format} GEMV: {e}");
        }
    }
    for format in FORMATS {
        if let Err(e) = bench_gemm(&mut criterion, &dev, blas.as_ref(), format) {
            println!("cuda_quant: skipping the {format} GEMM: {e}");
        }
    }
    criterion.final_summary();
}
