//! Machine calibration: the roofline every benchmark row is measured against.
//!
//! * FMA peak: a tight loop of independent fused multiply-adds (enough accumulators to cover
//!   the FMA latency on two pipes), on one thread and on N threads at once (rates summed).
//!   GFLOP/s = 2 x lanes x FMAs / seconds.
//! * int8 dot-product peak: the same for the quantized kernels' inner operation, u8 × s8
//!   products summed into i32 lanes (`vpdpbusd` with AVX-512 VNNI, `vpmaddubsw` +
//!   `vpmaddwd` + `vpaddd` with AVX2), GOP/s = 2 x products / seconds; the quant rows are
//!   held to it instead of the f32 FMA peak.
//! * Memory read bandwidth: a vectorized reduction over a buffer far larger than the last-level
//!   cache, best of several passes, on one thread and on N threads (each its own slice).

use serde::Serialize;
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// One measured value at a thread count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Threads that ran concurrently.
    pub threads: usize,
    /// GFLOP/s (FMA peak) or GB/s (bandwidth), summed over the threads.
    pub value: f64,
}

/// This machine's compute and memory roofline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// The FMA loop that gave the peak (e.g. `avx2+fma x8 lanes`).
    pub fma_kernel: String,
    /// FMA peak, GFLOP/s, per thread count.
    pub fma: Vec<Point>,
    /// The int8 dot-product loop that gave the int8 peak, if this CPU has one.
    pub int8_kernel: Option<String>,
    /// int8 dot-product peak, GOP/s (a product and its addition count 2), per thread count;
    /// empty without an int8 loop.
    pub int8: Vec<Point>,
    /// Size of the buffer read for the bandwidth, bytes.
    pub buffer_bytes: usize,
    /// Memory read bandwidth, GB/s (1e9 bytes), per thread count.
    pub bandwidth: Vec<Point>,
    /// Wall time of the calibration, seconds.
    pub seconds: f64,
}

impl Calibration {
    /// Measures the FMA peak and the read bandwidth on 1 thread and on each count in `threads`.
    /// `quick` trades accuracy for time (smaller buffer, shorter loops).
    pub fn measure(threads: &[usize], quick: bool) -> Calibration {
        let start = Instant::now();
        let mut counts: Vec<usize> = threads.iter().copied().filter(|&t| t > 0).collect();
        counts.push(1);
        counts.sort_unstable();
        counts.dedup();

        // Many short trials, best kept: on a shared machine some trial runs unhindered.
        let fma_target = Duration::from_millis(if quick { 15 } else { 30 });
        let trials = if quick { 3 } else { 8 };
        let (kernel, mut fma) = best_loop(fma_kernels(), &counts, fma_target, trials)
            .expect("the scalar FMA loop always exists");
        at_least_per_thread_share(&mut fma);
        let (int8_kernel, int8) = match best_loop(int8_kernels(), &counts, fma_target, trials) {
            Some((k, mut pts)) => {
                at_least_per_thread_share(&mut pts);
                (Some(k.name.to_string()), pts)
            }
            None => (None, Vec::new()),
        };

        let buffer_bytes: usize = if quick { 256 << 20 } else { 1 << 30 };
        let passes = if quick { 2 } else { 4 };
        let buf = vec![1u64; buffer_bytes / 8]; // written once: every page is touched
        let bandwidth = counts
            .iter()
            .map(|&t| Point {
                threads: t,
                value: (0..passes)
                    .map(|_| read_bandwidth(&buf, t))
                    .fold(0.0, f64::max),
            })
            .collect();
        drop(buf);

        Calibration {
            fma_kernel: kernel.name.to_string(),
            fma,
            int8_kernel,
            int8,
            buffer_bytes,
            bandwidth,
            seconds: start.elapsed().as_secs_f64(),
        }
    }

    /// FMA peak in GFLOP/s for `threads` threads. Counts that were not measured are estimated
    /// from the nearest measured one below (FMA throughput scales linearly with cores).
    pub fn peak_gflops(&self, threads: usize) -> f64 {
        lookup(&self.fma, threads, true)
    }

    /// int8 dot-product peak in GOP/s for `threads` threads (estimated as for
    /// [`Calibration::peak_gflops`]), or `None` where this CPU has no int8 loop.
    pub fn peak_int8_gops(&self, threads: usize) -> Option<f64> {
        (!self.int8.is_empty()).then(|| lookup(&self.int8, threads, true))
    }

    /// Memory read bandwidth in GB/s for `threads` threads. Counts that were not measured take
    /// the nearest measured one below (bandwidth saturates, it does not scale).
    pub fn bandwidth_gbs(&self, threads: usize) -> f64 {
        lookup(&self.bandwidth, threads, false)
    }

    /// Human-readable summary, several lines.
    pub fn summary(&self) -> String {
        let list = |pts: &[Point], unit: &str| {
            pts.iter()
                .map(|p| {
                    let s = if p.threads == 1 { "" } else { "s" };
                    format!("{} thread{s} {:.1} {unit}", p.threads, p.value)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let int8 = match &self.int8_kernel {
            Some(k) => format!("\n  int8 dot peak ({k}): {}", list(&self.int8, "GOP/s")),
            None => String::new(),
        };
        format!(
            "calibration ({:.1} s)\n  FMA peak ({}): {}{int8}\n  read bandwidth ({} MiB buffer): {}",
            self.seconds,
            self.fma_kernel,
            list(&self.fma, "GFLOP/s"),
            self.buffer_bytes >> 20,
            list(&self.bandwidth, "GB/s"),
        )
    }
}

/// One thread's FMA rate cannot be below a thread's share of a larger count's total: when
/// the one-thread trials were all slowed by other load, raise it to that share.
fn at_least_per_thread_share(fma: &mut [Point]) {
    let share = fma
        .iter()
        .map(|p| p.value / p.threads as f64)
        .fold(0.0, f64::max);
    for p in fma.iter_mut().filter(|p| p.threads == 1) {
        p.value = p.value.max(share);
    }
}

/// The loop of `loops` with the best one-thread rate (many short trials, best kept: on a
/// shared machine some trial runs unhindered), and its rate on every count of `counts`.
fn best_loop(
    loops: Vec<FmaKernel>,
    counts: &[usize],
    target: Duration,
    trials: usize,
) -> Option<(FmaKernel, Vec<Point>)> {
    let best_of = |k: &FmaKernel, t: usize, iters: u64| {
        (0..trials)
            .map(|_| k.rate_on_threads(t, iters))
            .fold(0.0, f64::max)
    };
    let (kernel, single) = loops
        .into_iter()
        .map(|k| {
            let rate = best_of(&k, 1, k.iters_for(target));
            (k, rate)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    let iters = kernel.iters_for(target);
    let points = counts
        .iter()
        .map(|&t| Point {
            threads: t,
            value: if t == 1 {
                single
            } else {
                best_of(&kernel, t, iters)
            },
        })
        .collect();
    Some((kernel, points))
}

fn lookup(points: &[Point], threads: usize, linear: bool) -> f64 {
    let threads = threads.max(1);
    if let Some(p) = points.iter().find(|p| p.threads == threads) {
        return p.value;
    }
    let below = points
        .iter()
        .filter(|p| p.threads < threads)
        .max_by_key(|p| p.threads);
    let base = below.or_else(|| points.iter().min_by_key(|p| p.threads));
    match base {
        Some(p) if linear => p.value * threads as f64 / p.threads as f64,
        Some(p) => p.value,
        None => f64::NAN,
    }
}

// ---------------------------------------------------------------------------------------
// FMA loops.

/// One FMA loop: `run(iters)` performs `iters x flops_per_iter` floating-point operations.
struct FmaKernel {
    name: &'static str,
    flops_per_iter: f64,
    run: fn(u64) -> f32,
}

impl FmaKernel {
    /// Iterations that take about `target` on one thread.
    fn iters_for(&self, target: Duration) -> u64 {
        let probe = 1u64 << 16;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t0 = Instant::now();
            black_box((self.run)(black_box(probe)));
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let per_iter = best.max(1e-9) / probe as f64;
        ((target.as_secs_f64() / per_iter) as u64).clamp(probe, 1 << 34)
    }

    /// GFLOP/s summed over `threads` threads running the loop concurrently.
    fn rate_on_threads(&self, threads: usize, iters: u64) -> f64 {
        let barrier = Barrier::new(threads);
        let flops = iters as f64 * self.flops_per_iter;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let t0 = Instant::now();
                        black_box((self.run)(black_box(iters)));
                        flops / t0.elapsed().as_secs_f64() / 1e9
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("FMA calibration thread panicked"))
                .sum()
        })
    }
}

/// The FMA loops this CPU can run.
fn fma_kernels() -> Vec<FmaKernel> {
    #[allow(unused_mut)]
    let mut v = vec![FmaKernel {
        name: "scalar x12",
        flops_per_iter: 2.0 * 12.0,
        run: fma_scalar,
    }];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(FmaKernel {
                name: "avx2+fma, 12 accumulators x 8 lanes",
                flops_per_iter: 2.0 * 8.0 * x86::AVX2_ACC as f64,
                run: x86::run_avx2,
            });
        }
        if is_x86_feature_detected!("avx512f") {
            v.push(FmaKernel {
                name: "avx512f, 16 accumulators x 16 lanes",
                flops_per_iter: 2.0 * 16.0 * x86::AVX512_ACC as f64,
                run: x86::run_avx512,
            });
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(FmaKernel {
                name: "neon, 16 accumulators x 4 lanes",
                flops_per_iter: 2.0 * 4.0 * arm::NEON_ACC as f64,
                run: arm::run_neon,
            });
        }
    }
    v
}

/// The int8 dot-product loops this CPU can run (none on other architectures: the quant rows
/// then keep the FMA peak). `flops_per_iter` counts 2 operations per u8 × s8 product.
fn int8_kernels() -> Vec<FmaKernel> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            v.push(FmaKernel {
                name: "avx2 vpmaddubsw+vpmaddwd+vpaddd, 8 accumulators x 32 products",
                flops_per_iter: 2.0 * 32.0 * x86::INT8_AVX2_ACC as f64,
                run: x86::run_int8_avx2,
            });
        }
        if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni") {
            v.push(FmaKernel {
                name: "avx512 vnni vpdpbusd, 12 accumulators x 64 products",
                flops_per_iter: 2.0 * 64.0 * x86::INT8_VNNI_ACC as f64,
                run: x86::run_int8_vnni,
            });
        }
    }
    v
}

/// Expands `$body` once per accumulator name (a hand-unrolled loop body).
macro_rules! each {
    ($($acc:ident),* => $body:ident) => { $( $body!($acc); )* };
}

/// The multiplier and addend of the FMA chains, hidden from the optimizer. With the
/// constants visible, LLVM folded away the chain that starts at 0.1 (the fixed point of
/// `a·0.999999 + 1e-7` in f32): the AVX2 loop ran 11 of its 12 FMAs per iteration and the
/// calibrated peak read 12/11 of the truth.
#[inline(always)]
fn opaque_xy() -> (f32, f32) {
    black_box((0.999_999, 1e-7))
}

/// Distinct starting values of up to 16 chains, none a fixed point the optimizer could see.
#[inline(always)]
fn opaque_init() -> [f32; 16] {
    black_box(std::array::from_fn(|i| 0.1 * (i + 1) as f32))
}

/// Portable fallback: 12 independent multiply-add chains (2 flops each).
fn fma_scalar(iters: u64) -> f32 {
    let (x, y) = (black_box(0.999_999f32), black_box(1e-7f32));
    let (mut a0, mut a1, mut a2, mut a3) = (0.1f32, 0.2, 0.3, 0.4);
    let (mut a4, mut a5, mut a6, mut a7) = (0.5f32, 0.6, 0.7, 0.8);
    let (mut a8, mut a9, mut a10, mut a11) = (0.9f32, 1.0, 1.1, 1.2);
    for _ in 0..iters {
        macro_rules! step {
            ($a:ident) => {
                $a = $a * x + y
            };
        }
        each!(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11 => step);
    }
    a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 12 accumulators: FMA latency 4 x 2 pipes = 8 in flight, with margin; 12 + 2 constants
    /// fit the 16 ymm registers.
    pub const AVX2_ACC: usize = 12;
    /// 16 accumulators of the 32 zmm registers.
    pub const AVX512_ACC: usize = 16;

    pub fn run_avx2(iters: u64) -> f32 {
        assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { fma_avx2(iters) }
    }

    pub fn run_avx512(iters: u64) -> f32 {
        assert!(is_x86_feature_detected!("avx512f"));
        // SAFETY: the CPU has AVX-512F (checked above).
        unsafe { fma_avx512(iters) }
    }

    /// Accumulators of the int8 loops: AVX2 needs 2 temporaries and 3 constants of its 16
    /// ymm registers; `vpdpbusd` has latency 4-5 on 1-2 pipes.
    pub const INT8_AVX2_ACC: usize = 8;
    pub const INT8_VNNI_ACC: usize = 12;

    /// The byte vectors of the int8 loops: every u8 and every s8 is 1 (hidden from the
    /// optimizer), so each i32 lane gains exactly 4 per step.
    fn ones() -> i32 {
        std::hint::black_box(0x0101_0101)
    }

    pub fn run_int8_avx2(iters: u64) -> f32 {
        assert!(is_x86_feature_detected!("avx2"));
        // SAFETY: the CPU has AVX2 (checked above).
        unsafe { int8_avx2(iters) }
    }

    pub fn run_int8_vnni(iters: u64) -> f32 {
        assert!(is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni"));
        // SAFETY: the CPU has AVX-512 BW and VNNI (checked above).
        unsafe { int8_vnni(iters) }
    }

    /// The AVX2 int8 dot step of the quant kernels: `vpmaddubsw` (u8 × s8 pairs to i16),
    /// `vpmaddwd` by ones (pairs to i32), `vpaddd`. Returns the sum of all lanes.
    #[target_feature(enable = "avx2")]
    fn int8_avx2(iters: u64) -> f32 {
        let w = _mm256_set1_epi32(ones());
        let x = _mm256_set1_epi32(ones());
        let one16 = _mm256_set1_epi16(std::hint::black_box(1));
        let mut acc = [_mm256_setzero_si256(); INT8_AVX2_ACC];
        let mut x = x;
        for _ in 0..iters {
            for a in &mut acc {
                // `x` is laundered through an empty asm block before every use, so the
                // compiler can neither hoist the loop-invariant products out of the loop nor
                // share one product between the accumulators (it did both without this: the
                // loop ran only its adds and "measured" 1.7 TOP/s).
                // SAFETY: the asm is empty; it only makes `x` opaque.
                unsafe {
                    std::arch::asm!("/* {0} */", inout(ymm_reg) x, options(nomem, nostack, preserves_flags));
                }
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), one16);
                *a = _mm256_add_epi32(*a, p);
            }
        }
        let mut out = [0i32; 8];
        let s = acc
            .iter()
            .fold(_mm256_setzero_si256(), |s, &a| _mm256_add_epi32(s, a));
        // SAFETY: `out` holds 8 i32.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), s) };
        out.iter().map(|&v| v as f32).sum()
    }

    /// `vpdpbusd` chains on zmm registers. Returns the sum of all lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn int8_vnni(iters: u64) -> f32 {
        let w = _mm512_set1_epi32(ones());
        let x = _mm512_set1_epi32(ones());
        let mut acc = [_mm512_setzero_si512(); INT8_VNNI_ACC];
        for _ in 0..iters {
            for a in &mut acc {
                *a = _mm512_dpbusd_epi32(*a, w, x);
            }
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_si512(), |s, &a| _mm512_add_epi32(s, a));
        let mut out = [0i32; 16];
        // SAFETY: `out` holds 16 i32.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), s) };
        out.iter().map(|&v| v as f32).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    fn fma_avx2(iters: u64) -> f32 {
        let (x, y) = super::opaque_xy();
        let init = super::opaque_init();
        let x = _mm256_set1_ps(x);
        let y = _mm256_set1_ps(y);
        let mut a0 = _mm256_set1_ps(init[0]);
        let mut a1 = _mm256_set1_ps(init[1]);
        let mut a2 = _mm256_set1_ps(init[2]);
        let mut a3 = _mm256_set1_ps(init[3]);
        let mut a4 = _mm256_set1_ps(init[4]);
        let mut a5 = _mm256_set1_ps(init[5]);
        let mut a6 = _mm256_set1_ps(init[6]);
        let mut a7 = _mm256_set1_ps(init[7]);
        let mut a8 = _mm256_set1_ps(init[8]);
        let mut a9 = _mm256_set1_ps(init[9]);
        let mut a10 = _mm256_set1_ps(init[10]);
        let mut a11 = _mm256_set1_ps(init[11]);
        for _ in 0..iters {
            macro_rules! step {
                ($a:ident) => {
                    $a = _mm256_fmadd_ps($a, x, y)
                };
            }
            each!(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11 => step);
        }
        let s = _mm256_add_ps(
            _mm256_add_ps(
                _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)),
            ),
            _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)),
        );
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    fn fma_avx512(iters: u64) -> f32 {
        let (x, y) = super::opaque_xy();
        let init = super::opaque_init();
        let x = _mm512_set1_ps(x);
        let y = _mm512_set1_ps(y);
        let mut a0 = _mm512_set1_ps(init[0]);
        let mut a1 = _mm512_set1_ps(init[1]);
        let mut a2 = _mm512_set1_ps(init[2]);
        let mut a3 = _mm512_set1_ps(init[3]);
        let mut a4 = _mm512_set1_ps(init[4]);
        let mut a5 = _mm512_set1_ps(init[5]);
        let mut a6 = _mm512_set1_ps(init[6]);
        let mut a7 = _mm512_set1_ps(init[7]);
        let mut a8 = _mm512_set1_ps(init[8]);
        let mut a9 = _mm512_set1_ps(init[9]);
        let mut a10 = _mm512_set1_ps(init[10]);
        let mut a11 = _mm512_set1_ps(init[11]);
        let mut a12 = _mm512_set1_ps(init[12]);
        let mut a13 = _mm512_set1_ps(init[13]);
        let mut a14 = _mm512_set1_ps(init[14]);
        let mut a15 = _mm512_set1_ps(init[15]);
        for _ in 0..iters {
            macro_rules! step {
                ($a:ident) => {
                    $a = _mm512_fmadd_ps($a, x, y)
                };
            }
            each!(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 => step);
        }
        let s0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        let s1 = _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7));
        let s2 = _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11));
        let s3 = _mm512_add_ps(_mm512_add_ps(a12, a13), _mm512_add_ps(a14, a15));
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)))
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    /// 16 of the 32 vector registers: FMA latency 4 x up to 4 pipes.
    pub const NEON_ACC: usize = 16;

    pub fn run_neon(iters: u64) -> f32 {
        assert!(std::arch::is_aarch64_feature_detected!("neon"));
        // SAFETY: the CPU has NEON (checked above).
        unsafe { fma_neon(iters) }
    }

    #[target_feature(enable = "neon")]
    fn fma_neon(iters: u64) -> f32 {
        let (x, y) = super::opaque_xy();
        let init = super::opaque_init();
        let x = vdupq_n_f32(x);
        let y = vdupq_n_f32(y);
        let mut a0 = vdupq_n_f32(init[0]);
        let mut a1 = vdupq_n_f32(init[1]);
        let mut a2 = vdupq_n_f32(init[2]);
        let mut a3 = vdupq_n_f32(init[3]);
        let mut a4 = vdupq_n_f32(init[4]);
        let mut a5 = vdupq_n_f32(init[5]);
        let mut a6 = vdupq_n_f32(init[6]);
        let mut a7 = vdupq_n_f32(init[7]);
        let mut a8 = vdupq_n_f32(init[8]);
        let mut a9 = vdupq_n_f32(init[9]);
        let mut a10 = vdupq_n_f32(init[10]);
        let mut a11 = vdupq_n_f32(init[11]);
        let mut a12 = vdupq_n_f32(init[12]);
        let mut a13 = vdupq_n_f32(init[13]);
        let mut a14 = vdupq_n_f32(init[14]);
        let mut a15 = vdupq_n_f32(init[15]);
        for _ in 0..iters {
            macro_rules! step {
                ($a:ident) => {
                    $a = vfmaq_f32(y, $a, x)
                };
            }
            each!(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 => step);
        }
        let s0 = vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3));
        let s1 = vaddq_f32(vaddq_f32(a4, a5), vaddq_f32(a6, a7));
        let s2 = vaddq_f32(vaddq_f32(a8, a9), vaddq_f32(a10, a11));
        let s3 = vaddq_f32(vaddq_f32(a12, a13), vaddq_f32(a14, a15));
        vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)))
    }
}

// ---------------------------------------------------------------------------------------
// Read bandwidth.

/// Sum of `buf` with 8 independent wrapping u64 lanes (vectorizes to full-width adds).
#[inline(always)]
fn sum_u64(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = buf.chunks_exact(8);
    let tail = chunks.remainder();
    for ch in chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a = a.wrapping_add(*x);
        }
    }
    let mut s = tail.iter().fold(0u64, |s, x| s.wrapping_add(*x));
    for a in acc {
        s = s.wrapping_add(a);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_u64_avx2(buf: &[u64]) -> u64 {
    sum_u64(buf)
}

fn read_sum(buf: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { sum_u64_avx2(buf) };
    }
    sum_u64(buf)
}

/// GB/s of one pass over `buf`, split into `threads` slices read concurrently (total bytes
/// over the slowest thread's time).
fn read_bandwidth(buf: &[u64], threads: usize) -> f64 {
    let per = buf.len().div_ceil(threads.max(1));
    let barrier = Barrier::new(threads.max(1));
    let slowest = std::thread::scope(|s| {
        let handles: Vec<_> = buf
            .chunks(per)
            .map(|slice| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let t0 = Instant::now();
                    black_box(read_sum(black_box(slice)));
                    t0.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bandwidth calibration thread panicked"))
            .fold(0.0, f64::max)
    });
    std::mem::size_of_val(buf) as f64 / slowest / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cal(fma: &[(usize, f64)], bw: &[(usize, f64)]) -> Calibration {
        let pts = |v: &[(usize, f64)]| {
            v.iter()
                .map(|&(threads, value)| Point { threads, value })
                .collect()
        };
        Calibration {
            fma_kernel: "test".into(),
            fma: pts(fma),
            int8_kernel: None,
            int8: Vec::new(),
            buffer_bytes: 0,
            bandwidth: pts(bw),
            seconds: 0.0,
        }
    }

    #[test]
    fn lookup_exact_and_extrapolated() {
        let c = cal(&[(1, 100.0), (2, 190.0)], &[(1, 20.0), (2, 30.0)]);
        assert_eq!(c.peak_gflops(1), 100.0);
        assert_eq!(c.peak_gflops(2), 190.0);
        // 4 threads: from the 2-thread point, scaled.
        assert_eq!(c.peak_gflops(4), 380.0);
        assert_eq!(c.bandwidth_gbs(4), 30.0);
        // 0 threads means 1.
        assert_eq!(c.peak_gflops(0), 100.0);
        // Only larger points measured: scale down from the smallest.
        let c = cal(&[(2, 200.0)], &[(2, 30.0)]);
        assert_eq!(c.peak_gflops(1), 100.0);
        assert_eq!(c.bandwidth_gbs(1), 30.0);
        assert!(cal(&[], &[]).peak_gflops(1).is_nan());
    }

    #[test]
    fn one_thread_peak_is_at_least_a_share_of_more() {
        let mut c = cal(&[(1, 57.0), (2, 164.0), (4, 200.0)], &[]);
        at_least_per_thread_share(&mut c.fma);
        assert_eq!(c.peak_gflops(1), 82.0);
        assert_eq!(c.peak_gflops(2), 164.0);
        // Already consistent: unchanged.
        let mut c = cal(&[(1, 100.0), (2, 190.0)], &[]);
        at_least_per_thread_share(&mut c.fma);
        assert_eq!(c.peak_gflops(1), 100.0);
    }

    #[test]
    fn fma_loops_compute_and_agree() {
        // Every loop computes the same recurrence from similar starts; all results are finite
        // and positive (the chains converge to y / (1 - x) = 0.1).
        for k in fma_kernels() {
            let r = (k.run)(1000);
            assert!(r.is_finite() && r > 0.0, "{}: {r}", k.name);
            assert!(k.rate_on_threads(2, 1 << 12) > 0.0);
        }
    }

    #[test]
    fn int8_loops_compute_their_stated_products() {
        // Every u8 and s8 is 1: each i32 lane gains 4 per step, so the lane sum is exactly
        // 4 · iters · lanes · accumulators, which ties `flops_per_iter` to what the loop
        // computes (a wrong count or a dropped accumulator fails). Work the compiler hoists
        // out of the loop leaves the sum unchanged: that is what the `asm!` laundering in the
        // AVX2 loop prevents, checked by its measured rate (half the VNNI one), not here.
        for k in int8_kernels() {
            let iters = 1000u64;
            let products = k.flops_per_iter / 2.0;
            assert_eq!((k.run)(iters) as f64, products * iters as f64, "{}", k.name);
            assert!(k.rate_on_threads(2, 1 << 12) > 0.0);
        }
        let c = cal(&[(1, 1.0)], &[(1, 1.0)]);
        assert_eq!(c.peak_int8_gops(1), None);
        assert!(!c.summary().contains("int8"));
    }

    #[test]
    fn read_sum_is_exact() {
        let buf: Vec<u64> = (0..1003).collect();
        assert_eq!(read_sum(&buf), 1002 * 1003 / 2);
        assert_eq!(sum_u64(&buf), 1002 * 1003 / 2);
        assert!(read_bandwidth(&buf, 3) > 0.0);
    }

    #[test]
    fn summary_mentions_every_point() {
        let c = cal(&[(1, 100.0), (2, 190.0)], &[(1, 20.0), (2, 30.5)]);
        let s = c.summary();
        assert!(
            s.contains("1 thread 100.0 GFLOP/s, 2 threads 190.0 GFLOP/s"),
            "{s}"
        );
        assert!(s.contains("2 threads 30.5 GB/s"), "{s}");
        let s = tests_support::fixed().summary();
        assert!(
            s.contains("int8 dot peak (fixed): 1 thread 400.0 GOP/s, 2 threads 800.0 GOP/s"),
            "{s}"
        );
    }
}

/// A fixed calibration for other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::{Calibration, Point};

    /// 100 GFLOP/s per thread, 20 GB/s.
    pub fn fixed() -> Calibration {
        let pts = |v: [(usize, f64); 2]| {
            v.iter()
                .map(|&(threads, value)| Point { threads, value })
                .collect()
        };
        Calibration {
            fma_kernel: "fixed".into(),
            fma: pts([(1, 100.0), (2, 200.0)]),
            int8_kernel: Some("fixed".into()),
            int8: pts([(1, 400.0), (2, 800.0)]),
            buffer_bytes: 0,
            bandwidth: pts([(1, 20.0), (2, 25.0)]),
            seconds: 0.0,
        }
    }
}
