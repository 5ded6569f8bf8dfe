//! Quantized matmul benchmarks: Tessera's `quant::matmul_with` (`C = A·Wᵀ`, f32 activations,
//! Q8_0 / Q4_0 / Q4_K weights stored `[n, k]`) against the same-run peers of
//! `tessera bench quant` — dequantize + Tessera's f32 GEMM (`deq-gemm`) and candle-core's
//! `QMatMul` on the same blocks (`candle`) — and against the naive reference
//! (`tessera_core::reference::quant_matmul`, small shapes only), at 1 and 2 threads.
//!
//! Group `quant/<format>/<MxNxK>`; functions `tessera-t<N>`, `deq-gemm-t<N>`, `candle-t1`,
//! `candle-split-t2` (see below), `reference`. Throughput is in elements of 2mnk, so
//! criterion's "elem/s" reads as flop/s.
//!
//! GEMV shapes cycle through several copies of the weights (3x the L3 in all, as the harness
//! does), so every call reads its weights from memory.
//!
//! Threads: Tessera and `deq-gemm` run inside a rayon pool of exactly N threads. candle sizes
//! its own pool once per process from `CANDLE_NUM_THREADS`; unless the variable is set, this
//! bench sets it to 1 (`candle-t1`) and adds `candle-split-t2`: two single-threaded candle
//! calls on the two halves of the weight rows, run as rayon tasks. To time candle's own
//! threading instead, run e.g. `CANDLE_NUM_THREADS=2 cargo bench --bench quant -- candle`,
//! which names the function `candle-t2` (and skips the split).
//!
//! `cargo bench --bench quant -- --test` runs every function once (and the agreement checks).
//! HTML plots are off; `TESSERA_BENCH_PLOTS=1` turns them on.

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use std::hint::black_box;
use std::time::Duration;
use tessera::bench::gemm::{GemmShape, compare};
use tessera::bench::quant::{
    BenchBlock, CandlePeer, Weights, deq_gemm, rotation_copies, spot_check_dequantized,
    spot_check_reference,
};
use tessera_core::quant::{BlockQ4_0, BlockQ4_K, BlockQ8_0};
use tessera_core::{MatMut, MatRef};
use tessera_cpu::quant::{QuantOptions, matmul_with};
use tessera_cpu::{CacheInfo, Isa, Parallelism};

const THREADS: [usize; 2] = [1, 2];

struct Case {
    shape: GemmShape,
    /// Also time the naive reference (slow: small shapes only).
    reference: bool,
}

fn cases() -> Vec<Case> {
    let case = |m, n, k, reference| Case {
        shape: GemmShape { m, n, k },
        reference,
    };
    vec![
        // Small enough for the reference.
        case(1, 1024, 1024, true),
        case(16, 1024, 1024, true),
        // Decode GEMV: 4096 -> 4096 and 4096 -> 11008.
        case(1, 4096, 4096, false),
        case(1, 11008, 4096, false),
        // Prefill GEMM through 4096 -> 4096.
        case(16, 4096, 4096, false),
        case(128, 4096, 4096, false),
        case(512, 4096, 4096, false),
    ]
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn par(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Threads(threads)
    } else {
        Parallelism::Sequential
    }
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, s: GemmShape) {
    let flops = 2 * s.m * s.n * s.k;
    group.throughput(Throughput::Elements(flops as u64));
    // Flat sampling, 10 samples: a 0.3 s call takes 3 s, not criterion's linear 55 calls.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    // Room for 10 calls at a pessimistic 20 GFLOP/s; at least 0.8 s.
    let secs = (10.0 * flops as f64 / 20e9).clamp(0.8, 6.0);
    group.measurement_time(Duration::from_secs_f64(secs));
}

fn bench_format<W: BenchBlock>(cr: &mut Criterion, candle_threads: usize) {
    let isa = tessera_cpu::quant::preferred_isa();
    let pools: Vec<_> = THREADS.iter().map(|&t| (t, pool(t))).collect();
    let l3 = CacheInfo::detect().l3;
    for case in cases() {
        let s = case.shape;
        let (m, n, k) = (s.m, s.n, s.k);
        let w = Weights::<W>::new(s, rotation_copies(s, W::FORMAT, l3));
        let copies = w.copies.len();
        let mut c = vec![f32::NAN; m * n];
        let mut wf = vec![0f32; n * k];
        let ours = |i: usize, c: &mut [f32], threads: usize| {
            let opts = QuantOptions {
                isa: Some(isa),
                parallelism: par(threads),
            };
            matmul_with(
                &opts,
                MatRef::dense(black_box(&w.a), m, k),
                &w.copies[i % copies],
                n,
                MatMut::dense(c, m, n),
            )
            .expect("valid matmul")
        };

        // Agreement checks (also in --test mode): a wrong call would make the numbers below
        // meaningless.
        ours(0, &mut c, 1);
        spot_check_reference(&w.a, &w.copies[0], s, &c).expect("tessera agrees with reference");
        let mut want = vec![f32::NAN; m * n];
        deq_gemm(s, &w.a, &w.copies[0], &mut wf, &mut want, Isa::detect(), 1).expect("deq+gemm");
        spot_check_dequantized(&w.a, &w.copies[0], s, &want, None).expect("deq+gemm is right");
        compare(&c, &want, n, 1e-2).expect("tessera agrees with deq+gemm");
        let candle: Vec<(usize, CandlePeer)> = THREADS
            .iter()
            .filter(|&&t| t == candle_threads || candle_threads == 1)
            .map(|&t| {
                let parts = if candle_threads == 1 { t } else { 1 };
                let peer = CandlePeer::new(&w, parts).expect("candle tensors");
                want.fill(f32::NAN);
                peer.call_into(0, &mut want).expect("candle matmul");
                compare(&c, &want, n, 1e-3).expect("tessera agrees with candle");
                peer.warm_up().expect("candle matmul");
                (t, peer)
            })
            .collect();

        let mut group = cr.benchmark_group(format!("quant/{}/{}", W::FORMAT, s.name()));
        configure(&mut group, s);
        let mut i = 0usize;
        for (t, pool) in &pools {
            let t = *t;
            group.bench_function(format!("tessera-t{t}"), |bn| {
                pool.install(|| {
                    bn.iter(|| {
                        i += 1;
                        ours(i, &mut c, t)
                    })
                })
            });
            group.bench_function(format!("deq-gemm-t{t}"), |bn| {
                pool.install(|| {
                    bn.iter(|| {
                        i += 1;
                        let wi = &w.copies[i % copies];
                        deq_gemm(s, black_box(&w.a), wi, &mut wf, &mut c, Isa::detect(), t)
                            .expect("deq+gemm")
                    })
                })
            });
            if let Some((_, peer)) = candle.iter().find(|(ct, _)| *ct == t) {
                group.bench_function(format!("{}-t{t}", peer.name()), |bn| {
                    pool.install(|| {
                        bn.iter(|| {
                            i += 1;
                            peer.call(i).expect("candle matmul")
                        })
                    })
                });
            }
        }
        if case.reference {
            group.bench_function("reference", |bn| {
                bn.iter(|| {
                    tessera_core::reference::quant_matmul(
                        MatRef::dense(black_box(&w.a), m, k),
                        &w.copies[0],
                        n,
                        MatMut::dense(&mut c, m, n),
                    )
                    .expect("valid matmul")
                })
            });
        }
        group.finish();
    }
}

fn main() {
    // candle's pool size is read once, lazily, from this variable: unless the user chose a
    // count, pin it to one thread before its first use (see the module comment).
    let candle_threads = match std::env::var("CANDLE_NUM_THREADS") {
        Ok(v) => v.trim().parse::<usize>().map_or(1, |n| n.max(1)),
        Err(_) => 1,
    };
    if candle_threads == 1 {
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let mut criterion = Criterion::default();
    if std::env::var_os("TESSERA_BENCH_PLOTS").is_none_or(|v| v != "1") {
        criterion = criterion.without_plots();
    }
    let mut criterion = criterion.configure_from_args();
    bench_format::<BlockQ8_0>(&mut criterion, candle_threads);
    bench_format::<BlockQ4_0>(&mut criterion, candle_threads);
    bench_format::<BlockQ4_K>(&mut criterion, candle_threads);
    criterion.final_summary();
}
