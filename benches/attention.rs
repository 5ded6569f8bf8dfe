//! Attention benchmarks: Tessera's fused attention (`attention::attention_with`, f32 Q/K/V,
//! 12 heads of 64, batch 1) against the same-run peers of `tessera bench attention` — the
//! unfused path (per head: Tessera GEMM `scale·Q·Kᵀ`, mask + row softmax, GEMM `P·V`:
//! `unfused`) and candle-core tensor ops (`candle`) — and against the naive f64 reference
//! (`tessera_core::reference::attention`, 64 tokens only); and decode attention of one token
//! over a 4096-token f16 KV cache, contiguous and paged (`kv_cache::decode_attention_with`),
//! against the unfused decode path (read the sequence back as f32, GEMV, softmax, GEMV). All at
//! 1 and 2 threads.
//!
//! Groups `attention/<causal|bidir>/<SEQxSEQxDhH>` (throughput in elements of the unmasked
//! flops, so "elem/s" reads as flop/s) and `attention/decode/1x4096x64h12/f16/<cont|paged>`
//! (throughput in cache bytes); functions `tessera-t<N>`, `unfused-t<N>`, `candle-t1`,
//! `candle-split-t2` (the heads in two groups run as rayon tasks: candle's element-wise ops
//! are single-threaded), `reference`.
//!
//! The decode cache holds several identical sequences (3x the L3 in all, as the harness does)
//! and each call attends the next one, so every call reads its keys from memory.
//!
//! `cargo bench --bench attention -- --test` runs every function once (and the agreement
//! checks). HTML plots are off; `TESSERA_BENCH_PLOTS=1` turns them on.

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use std::hint::black_box;
use std::time::Duration;
use tessera::bench::attention::{
    CacheKind, CandleAttention, DecodeInputs, DecodeScratch, DecodeShape, HEADS, PrefillInputs,
    PrefillShape, cache_bytes, check_close, decode_copies, fused_attention, fused_decode,
    prefill_work, unfused_attention, unfused_decode,
};
use tessera_core::attention::{AttentionParams, Heads};
use tessera_cpu::kv_cache::KvDType;
use tessera_cpu::{CacheInfo, Isa};

const THREADS: [usize; 2] = [1, 2];

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, secs: f64) {
    // Flat sampling, 10 samples: a slow call takes 10 calls, not criterion's linear 55.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs_f64(secs));
}

fn bench_prefill(cr: &mut Criterion) {
    // Each kernel family's preferred instruction set.
    let isa: Option<Isa> = None;
    let pools: Vec<_> = THREADS.iter().map(|&t| (t, pool(t))).collect();
    for (seq, reference) in [(64, true), (512, false)] {
        for causal in [true, false] {
            let shape = PrefillShape {
                seq,
                heads: HEADS,
                head_dim: 64,
            };
            let x = PrefillInputs::new(shape);
            let n = shape.elems();
            let mut out = vec![f32::NAN; n];
            let mut want = vec![f32::NAN; n];
            let mut s = Vec::new();

            // Agreement checks (also in --test mode).
            fused_attention(&x, causal, &mut out, isa, 1).expect("fused attention");
            unfused_attention(&x, causal, &mut want, &mut s, isa, 1).expect("unfused attention");
            check_close(&out, &want, x.v_max(), 1e-3).expect("fused agrees with unfused");
            let candle: Vec<CandleAttention> = THREADS
                .iter()
                .map(|&t| {
                    let c = CandleAttention::new(&x, causal, t).expect("candle tensors");
                    want.fill(f32::NAN);
                    c.call_into(&mut want).expect("candle attention");
                    check_close(&out, &want, x.v_max(), 1e-3).expect("fused agrees with candle");
                    c
                })
                .collect();

            let mask = if causal { "causal" } else { "bidir" };
            let mut group = cr.benchmark_group(format!("attention/{mask}/{}", shape.name()));
            let flops = prefill_work(shape, causal).flops;
            group.throughput(Throughput::Elements(flops as u64));
            // Room for 10 calls at a pessimistic 10 GFLOP/s.
            configure(&mut group, (10.0 * flops / 10e9).clamp(0.8, 6.0));
            for ((t, pool), c) in pools.iter().zip(&candle) {
                let t = *t;
                group.bench_function(format!("tessera-t{t}"), |bn| {
                    pool.install(|| {
                        bn.iter(|| {
                            fused_attention(black_box(&x), causal, &mut out, isa, t)
                                .expect("fused attention")
                        })
                    })
                });
                group.bench_function(format!("unfused-t{t}"), |bn| {
                    pool.install(|| {
                        bn.iter(|| {
                            unfused_attention(black_box(&x), causal, &mut want, &mut s, isa, t)
                                .expect("unfused attention")
                        })
                    })
                });
                group.bench_function(format!("{}-t{t}", c.name()), |bn| {
                    pool.install(|| bn.iter(|| c.call().expect("candle attention")))
                });
            }
            if reference {
                let l = shape.layout();
                let mut params = AttentionParams::new(shape.head_dim);
                if causal {
                    params = params.causal(0);
                }
                group.bench_function("reference", |bn| {
                    bn.iter(|| {
                        tessera_core::reference::attention(
                            &shape.attention_shape(),
                            Heads::new(black_box(&x.q), l),
                            Heads::new(&x.k, l),
                            Heads::new(&x.v, l),
                            &params,
                        )
                        .expect("reference attention")
                    })
                });
            }
            group.finish();
        }
    }
}

fn bench_decode(cr: &mut Criterion) {
    // Each kernel family's preferred instruction set.
    let isa: Option<Isa> = None;
    let pools: Vec<_> = THREADS.iter().map(|&t| (t, pool(t))).collect();
    let l3 = CacheInfo::detect().l3;
    let shape = DecodeShape {
        len: 4096,
        heads: HEADS,
        head_dim: 64,
    };
    let dtype = KvDType::F16;
    for kind in [CacheKind::Contiguous, CacheKind::Paged] {
        let x = DecodeInputs::new(shape, dtype, kind, decode_copies(shape, dtype, l3))
            .expect("KV cache");
        let n = shape.heads * shape.head_dim;
        let mut out = vec![f32::NAN; n];
        let mut want = vec![f32::NAN; n];
        let mut scratch = DecodeScratch::default();
        fused_decode(&x, x.seq(0), &mut out, isa, 1).expect("decode attention");
        unfused_decode(&x, x.seq(0), &mut want, &mut scratch, isa, 1).expect("unfused decode");
        check_close(&out, &want, 1.0, 1e-3).expect("decode agrees with the unfused path");

        let mut group = cr.benchmark_group(format!(
            "attention/decode/{}/f16/{}",
            shape.name(),
            kind.tag()
        ));
        group.throughput(Throughput::Bytes(cache_bytes(shape, dtype) as u64));
        configure(&mut group, 1.0);
        let mut i = 0usize;
        for (t, pool) in &pools {
            let t = *t;
            group.bench_function(format!("tessera-t{t}"), |bn| {
                pool.install(|| {
                    bn.iter(|| {
                        i += 1;
                        fused_decode(black_box(&x), x.seq(i), &mut out, isa, t)
                            .expect("decode attention")
                    })
                })
            });
            group.bench_function(format!("unfused-t{t}"), |bn| {
                pool.install(|| {
                    bn.iter(|| {
                        i += 1;
                        unfused_decode(black_box(&x), x.seq(i), &mut want, &mut scratch, isa, t)
                            .expect("unfused decode")
                    })
                })
            });
        }
        group.finish();
    }
}

fn main() {
    let mut criterion = Criterion::default();
    if std::env::var_os("TESSERA_BENCH_PLOTS").is_none_or(|v| v != "1") {
        criterion = criterion.without_plots();
    }
    let mut criterion = criterion.configure_from_args();
    bench_prefill(&mut criterion);
    bench_decode(&mut criterion);
    criterion.final_summary();
}
