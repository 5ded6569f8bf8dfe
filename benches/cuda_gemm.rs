//! CUDA tensor-core GEMM benchmarks: Tessera's `mma.sync` path, its `wgmma` path (sm_90a
//! devices only) and cuBLAS (`cublasGemmEx`, f16/bf16 inputs, f32 output, `CUBLAS_COMPUTE_32F`)
//! on the same device, inputs and `C = A·op(B)` (α = 1, β = 0).
//!
//! Shapes: 4096³ and 8192³ (B stored `[n, k]` and `[k, n]`), and the BERT-base / GPT-2-small
//! MLP layers at 128 and 2048 tokens (`128x3072x768`, `128x768x3072`, `2048x3072x768`,
//! `2048x768x3072`; B stored `[n, k]`, a Hugging Face `Linear` weight), f16 and bf16.
//!
//! Group `cuda_gemm/<dtype>/<MxNxK>/<nk|kn>`; functions `tessera-mma`, `tessera-wgmma`,
//! `cublas`. Throughput is in elements of 2mnk, so criterion's "elem/s" reads as flop/s.
//!
//! Timing: CUDA events around a batch of launches (criterion's `iter_custom`: record, run N
//! GEMMs, record, synchronize, elapsed time), after criterion's warm-up; the launches cycle
//! through enough input/output sets that together exceed 3x the L2 cache, so that no operand
//! is served from L2 by the previous launch. Before timing, every Tessera path's output is
//! compared with cuBLAS's (a wrong result would make its number meaningless).
//!
//! No GPU (or no NVRTC): one line saying why, exit 0. No cuBLAS: its functions are left out.
//! `cargo bench --features cli,cuda --bench cuda_gemm -- --test` runs every function once.

use criterion::{Criterion, SamplingMode, Throughput};
use std::time::Duration;
use tessera::bench::cuda::time_events;
use tessera::bench::data::random_f32;
use tessera_core::{Element, Transpose, bf16, f16};
use tessera_cuda::cudarc::cublas::CudaBlas;
use tessera_cuda::cudarc::driver::CudaSlice;
use tessera_cuda::gemm::{self, GemmArgs, GemmElement, GemmPath};
use tessera_cuda::{Device, Error};

#[derive(Clone, Copy)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    trans: Transpose,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for s in [4096, 8192] {
        for trans in [Transpose::Yes, Transpose::No] {
            v.push(Case {
                m: s,
                n: s,
                k: s,
                trans,
            });
        }
    }
    for tokens in [128, 2048] {
        for (n, k) in [(3072, 768), (768, 3072)] {
            v.push(Case {
                m: tokens,
                n,
                k,
                trans: Transpose::Yes,
            });
        }
    }
    v
}

/// Input and output buffers, `sets` copies of each.
struct Sets<T: GemmElement> {
    a: Vec<CudaSlice<T>>,
    b: Vec<CudaSlice<T>>,
    c: Vec<CudaSlice<f32>>,
}

impl<T: GemmElement + Element> Sets<T> {
    fn new(dev: &Device, case: Case) -> tessera_cuda::Result<Self> {
        let (m, n, k) = (case.m, case.n, case.k);
        let bytes = (m * k + k * n) * 2 + m * n * 4;
        let sets = (3 * dev.info().l2_bytes).div_ceil(bytes).clamp(1, 16);
        let to16 = |x: Vec<f32>| -> Vec<T> { x.into_iter().map(T::from_f32).collect() };
        let mut s = Sets {
            a: Vec::new(),
            b: Vec::new(),
            c: Vec::new(),
        };
        for i in 0..sets as u64 {
            s.a.push(dev.upload(&to16(random_f32(m * k, 2 * i + 1)))?);
            s.b.push(dev.upload(&to16(random_f32(k * n, 2 * i + 2)))?);
            s.c.push(dev.alloc_zeros::<f32>(m * n)?);
        }
        Ok(s)
    }
}

impl<T: GemmElement> Sets<T> {
    fn len(&self) -> usize {
        self.a.len()
    }
}

#[derive(Clone, Copy, Debug)]
enum Peer {
    Tessera(GemmPath),
    Cublas,
}

fn launch<T: GemmElement>(
    peer: Peer,
    dev: &Device,
    blas: Option<&CudaBlas>,
    args: &GemmArgs,
    sets: &mut Sets<T>,
    i: usize,
) -> tessera_cuda::Result<()> {
    let i = i % sets.len();
    let (a, b, c) = (&sets.a[i], &sets.b[i], &mut sets.c[i]);
    match peer {
        Peer::Tessera(path) => gemm::gemm(dev, path, args, a, b, c),
        Peer::Cublas => gemm::cublas_gemm_f32out(blas.expect("cuBLAS handle"), args, a, b, c),
    }
}

/// Tessera's output for set 0 against cuBLAS's: a relative agreement far looser than the
/// accumulation error of either, far tighter than any indexing mistake.
fn agree<T: GemmElement>(
    dev: &Device,
    peer: Peer,
    blas: &CudaBlas,
    args: &GemmArgs,
    sets: &mut Sets<T>,
) -> tessera_cuda::Result<()> {
    launch(Peer::Cublas, dev, Some(blas), args, sets, 0)?;
    let want = dev.download(&sets.c[0])?;
    launch::<T>(peer, dev, Some(blas), args, sets, 0)?;
    let got = dev.download(&sets.c[0])?;
    let scale = want.iter().fold(0.0f32, |s, &x| s.max(x.abs())).max(1.0);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(
            0.0f32,
            |s, d| if d.is_nan() { f32::INFINITY } else { s.max(d) },
        );
    assert!(
        worst <= 1e-3 * scale,
        "{peer:?} {}x{}x{} {:?}: differs from cuBLAS by {worst} (max |C| {scale})",
        args.m,
        args.n,
        args.k,
        args.trans_b
    );
    Ok(())
}

fn bench_dtype<T: GemmElement + Element>(
    cr: &mut Criterion,
    dev: &Device,
    blas: Option<&CudaBlas>,
) {
    let dtype = <T as GemmElement>::DTYPE;
    for case in cases() {
        let args = GemmArgs::dense(case.m, case.n, case.k, case.trans);
        let mut sets = match Sets::<T>::new(dev, case) {
            Ok(s) => s,
            Err(e) => {
                println!(
                    "cuda_gemm: skipping {dtype} {}x{}x{}: {e}",
                    case.m, case.n, case.k
                );
                continue;
            }
        };
        let mut peers = vec![("tessera-mma", Peer::Tessera(GemmPath::Mma))];
        if dev.info().has_sm90a() {
            peers.push(("tessera-wgmma", Peer::Tessera(GemmPath::Wgmma)));
        }
        if let Some(blas) = blas {
            for &(_, peer) in &peers {
                agree(dev, peer, blas, &args, &mut sets).expect("agreement check");
            }
            peers.push(("cublas", Peer::Cublas));
        }
        let layout = match case.trans {
            Transpose::Yes => "nk",
            Transpose::No => "kn",
        };
        let mut group = cr.benchmark_group(format!(
            "cuda_gemm/{dtype}/{}x{}x{}/{layout}",
            case.m, case.n, case.k
        ));
        group.throughput(Throughput::Elements((2 * case.m * case.n * case.k) as u64));
        group.sampling_mode(SamplingMode::Flat);
        group.sample_size(20);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        for (name, peer) in peers {
            group.bench_function(name, |bn| {
                bn.iter_custom(|iters| {
                    time_events(dev, iters, |i| {
                        launch(peer, dev, blas, &args, &mut sets, i).expect("GEMM launch")
                    })
                })
            });
        }
        group.finish();
    }
}

fn main() {
    let dev = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("cuda_gemm: skipping, no GPU: {e}");
            return;
        }
    };
    // Compile the kernels once up front: no NVRTC is a skip, not a failure.
    let probe = (|| {
        let a = dev.upload(&[f16::ONE; 64])?;
        let b = dev.upload(&[f16::ONE; 64])?;
        let mut c = dev.alloc_zeros::<f32>(64)?;
        gemm::gemm(
            &dev,
            GemmPath::Mma,
            &GemmArgs::dense(8, 8, 8, Transpose::Yes),
            &a,
            &b,
            &mut c,
        )?;
        dev.synchronize()
    })();
    match probe {
        Ok(()) => {}
        Err(e @ (Error::NvrtcUnavailable(_) | Error::Unavailable(_))) => {
            println!("cuda_gemm: skipping: {e}");
            return;
        }
        Err(e) => panic!("cuda_gemm: the probe GEMM failed: {e}"),
    }
    let blas = match gemm::cublas_handle(&dev) {
        Ok(b) => Some(b),
        Err(e) => {
            println!("cuda_gemm: no cuBLAS peer: {e}");
            None
        }
    };
    let mut criterion = Criterion::default();
    if std::env::var_os("TESSERA_BENCH_PLOTS").is_none_or(|v| v != "1") {
        criterion = criterion.without_plots();
    }
    let mut criterion = criterion.configure_from_args();
    bench_dtype::<f16>(&mut criterion, &dev, blas.as_ref());
    bench_dtype::<bf16>(&mut criterion, &dev, blas.as_ref());
    criterion.final_summary();
}
