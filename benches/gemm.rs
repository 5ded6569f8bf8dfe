//! GEMM benchmarks: Tessera (f32, f16 and bf16 weights) against the `gemm` crate, the
//! `matrixmultiply` crate and Tessera's own naive reference, on square and transformer shapes,
//! at 1 and 2 threads. `B` is stored `[n, k]` (a Hugging Face `Linear` weight) everywhere.
//!
//! Group `gemm/<MxNxK>`; functions `tessera-<dtype>-t<N>`, `gemm-crate-t<N>`,
//! `matrixmultiply-t1`, `matrixmultiply-split-t2`, `reference`. Throughput is in elements of
//! 2mnk, so criterion's "elem/s" reads as flop/s.
//!
//! Threads: Tessera and the `gemm` crate run inside a rayon pool of exactly N threads.
//! `matrixmultiply` reads its thread count once per process from `MATMUL_NUM_THREADS` (its
//! pool is a lazily built static), so it cannot run at two counts in one process. Unless the
//! variable is set, this bench pins it to 1 thread (`matrixmultiply-t1`) and adds
//! `matrixmultiply-split-t2`: our own 2-way split of C's columns across two rayon tasks, each
//! a single-threaded `sgemm` call. To time its built-in threading instead, run e.g.
//! `MATMUL_NUM_THREADS=2 cargo bench --bench gemm -- matrixmultiply`, which names the
//! function `matrixmultiply-t2` (and skips the split).
//!
//! `cargo bench --bench gemm -- --test` runs every function once (and the agreement checks).
//! HTML plots are off (they dominate the run time); `TESSERA_BENCH_PLOTS=1` turns them on.

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use std::hint::black_box;
use std::time::Duration;
use tessera::bench::data::random_f32;
use tessera::bench::gemm::{GemmShape, compare, peer_gemm};
use tessera_core::{Element, MatMut, MatRef, Transpose, bf16, f16};
use tessera_cpu::Parallelism;
use tessera_cpu::gemm::gemm;

const THREADS: [usize; 2] = [1, 2];

struct Case {
    shape: GemmShape,
    /// Also time bf16 weights.
    bf16: bool,
    /// Also time the naive f64 reference (slow: small shapes only).
    reference: bool,
}

fn cases() -> Vec<Case> {
    let sq = |s| GemmShape { m: s, n: s, k: s };
    let case = |shape, bf16, reference| Case {
        shape,
        bf16,
        reference,
    };
    vec![
        case(sq(256), false, true),
        case(sq(512), false, false),
        case(sq(1024), false, false),
        case(sq(2048), false, false),
        // BERT-base / GPT-2-small MLP at 128 tokens.
        case(
            GemmShape {
                m: 128,
                n: 3072,
                k: 768,
            },
            true,
            false,
        ),
        case(
            GemmShape {
                m: 128,
                n: 768,
                k: 3072,
            },
            false,
            false,
        ),
        // GPT-2 decode logits: one token, 768 -> 50257 (the reference streams B once: cheap).
        case(
            GemmShape {
                m: 1,
                n: 50257,
                k: 768,
            },
            false,
            true,
        ),
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

fn tessera_call<B: Element>(s: GemmShape, a: &[f32], b: &[B], c: &mut [f32], threads: usize) {
    gemm(
        1.0,
        MatRef::dense(a, s.m, s.k),
        MatRef::dense(b, s.n, s.k),
        Transpose::Yes,
        0.0,
        MatMut::dense(c, s.m, s.n),
        par(threads),
    )
    .expect("valid GEMM");
}

/// `matrixmultiply::sgemm` on columns `j0..j1` of `C = A·Bᵀ` (B stored `[n, k]`, C dense
/// `m x n` at `c`).
///
/// # Safety
/// `c` must point at `m·n` writable floats, and no other thread may access columns `j0..j1`
/// of C during the call.
unsafe fn mm_sgemm_ptr(s: GemmShape, a: &[f32], b: &[f32], c: *mut f32, j0: usize, j1: usize) {
    assert!(a.len() == s.m * s.k && b.len() == s.n * s.k);
    assert!(j0 <= j1 && j1 <= s.n);
    let k = s.k as isize;
    // SAFETY: A and B lengths checked above; columns j0..j1 of op(B) start at b[j0 * k]
    // (column stride k, row stride 1); C's columns j0..j1 (row stride n) are inside the m·n
    // floats the caller guarantees, and are ours alone.
    unsafe {
        matrixmultiply::sgemm(
            s.m,
            s.k,
            j1 - j0,
            1.0,
            a.as_ptr(),
            k,
            1,
            b.as_ptr().add(j0 * s.k),
            1,
            k,
            0.0,
            c.add(j0),
            s.n as isize,
            1,
        )
    }
}

/// `matrixmultiply::sgemm`: `C = A·Bᵀ`, B stored `[n, k]`.
fn mm_sgemm(s: GemmShape, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert_eq!(c.len(), s.m * s.n);
    // SAFETY: c holds m·n floats and is borrowed exclusively.
    unsafe { mm_sgemm_ptr(s, a, b, c.as_mut_ptr(), 0, s.n) }
}

/// C's pointer, handed to the two halves of the split (they write disjoint columns).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the two tasks write disjoint column ranges of C, which outlives the join.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Two single-threaded `sgemm` calls on the two halves of C's columns, run by `rayon::join`.
fn mm_split2(s: GemmShape, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert_eq!(c.len(), s.m * s.n);
    let half = ((s.n / 2).div_ceil(16) * 16).min(s.n);
    let ptr = SendPtr(c.as_mut_ptr());
    let part = move |j0: usize, j1: usize| {
        let p = ptr;
        // SAFETY: c (m·n floats) stays exclusively borrowed for the whole join, and the two
        // tasks write the disjoint column ranges 0..half and half..n.
        unsafe { mm_sgemm_ptr(s, a, b, p.0, j0, j1) }
    };
    rayon::join(|| part(0, half), || part(half, s.n));
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, s: GemmShape) {
    let flops = 2 * s.m * s.n * s.k;
    group.throughput(Throughput::Elements(flops as u64));
    // Flat sampling: every sample runs the same number of iterations, so 10 samples of a
    // 0.3 s call take 3 s rather than criterion's linear 55 calls.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    // Room for 10 calls at a pessimistic 50 GFLOP/s; at least 0.8 s (the decode GEMV is
    // memory-bound, and its naive reference takes ~70 ms a call).
    let secs = (10.0 * flops as f64 / 50e9).clamp(0.8, 4.0);
    group.measurement_time(Duration::from_secs_f64(secs));
}

fn bench_gemm(cr: &mut Criterion, mm_threads: usize) {
    let pools: Vec<_> = THREADS.iter().map(|&t| (t, pool(t))).collect();
    for case in cases() {
        let s = case.shape;
        let a = random_f32(s.m * s.k, 1);
        let b32 = random_f32(s.n * s.k, 2);
        let b16: Vec<f16> = b32.iter().map(|&x| f16::from_f32(x)).collect();
        let bb16: Vec<bf16> = b32.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut c = vec![0.0f32; s.m * s.n];

        // Agreement check (also in --test mode): a wrong peer call would make every number
        // below meaningless.
        let mut want = vec![f32::NAN; s.m * s.n];
        peer_gemm(s, &a, &b32, Transpose::Yes, &mut want, 1);
        tessera_call(s, &a, &b32, &mut c, 1);
        compare(&c, &want, s.n, 1e-3).expect("tessera agrees with the gemm crate");
        c.fill(f32::NAN);
        mm_sgemm(s, &a, &b32, &mut c);
        compare(&c, &want, s.n, 1e-3).expect("matrixmultiply agrees with the gemm crate");
        c.fill(f32::NAN);
        mm_split2(s, &a, &b32, &mut c);
        compare(&c, &want, s.n, 1e-3).expect("split matrixmultiply agrees");

        let mut group = cr.benchmark_group(format!("gemm/{}", s.name()));
        configure(&mut group, s);
        for (t, pool) in &pools {
            let t = *t;
            group.bench_function(format!("tessera-f32-t{t}"), |bn| {
                pool.install(|| bn.iter(|| tessera_call(s, black_box(&a), &b32, &mut c, t)))
            });
            group.bench_function(format!("tessera-f16-t{t}"), |bn| {
                pool.install(|| bn.iter(|| tessera_call(s, black_box(&a), &b16, &mut c, t)))
            });
            if case.bf16 {
                group.bench_function(format!("tessera-bf16-t{t}"), |bn| {
                    pool.install(|| bn.iter(|| tessera_call(s, black_box(&a), &bb16, &mut c, t)))
                });
            }
            group.bench_function(format!("gemm-crate-t{t}"), |bn| {
                pool.install(|| {
                    bn.iter(|| peer_gemm(s, black_box(&a), &b32, Transpose::Yes, &mut c, t))
                })
            });
        }
        group.bench_function(format!("matrixmultiply-t{mm_threads}"), |bn| {
            bn.iter(|| mm_sgemm(s, black_box(&a), &b32, &mut c))
        });
        if mm_threads == 1 {
            let (_, pool2) = &pools[1];
            group.bench_function("matrixmultiply-split-t2", |bn| {
                pool2.install(|| bn.iter(|| mm_split2(s, black_box(&a), &b32, &mut c)))
            });
        }
        if case.reference {
            group.bench_function("reference", |bn| {
                bn.iter(|| {
                    tessera_core::reference::gemm(
                        1.0,
                        MatRef::dense(black_box(&a), s.m, s.k),
                        MatRef::dense(&b32, s.n, s.k),
                        Transpose::Yes,
                        0.0,
                        MatMut::dense(&mut c, s.m, s.n),
                    )
                    .expect("valid GEMM")
                })
            });
        }
        group.finish();
    }
}

fn main() {
    // matrixmultiply's pool size is read once, lazily, from this variable: unless the user
    // chose a count, pin it to one thread before its first call (see the module comment).
    let mm_threads = match std::env::var("MATMUL_NUM_THREADS") {
        Ok(v) => v.parse::<usize>().map_or(1, |n| n.clamp(1, 4)),
        Err(_) => {
            // SAFETY: no other thread exists yet, so nothing reads the environment
            // concurrently.
            unsafe { std::env::set_var("MATMUL_NUM_THREADS", "1") };
            1
        }
    };
    // Criterion's HTML plots cost ~10 s per function on this 2-core machine, several times the
    // measurement: off unless TESSERA_BENCH_PLOTS=1 (and --noplot still turns them off).
    let mut criterion = Criterion::default();
    if std::env::var_os("TESSERA_BENCH_PLOTS").is_none_or(|v| v != "1") {
        criterion = criterion.without_plots();
    }
    let mut criterion = criterion.configure_from_args();
    bench_gemm(&mut criterion, mm_threads);
    criterion.final_summary();
}
