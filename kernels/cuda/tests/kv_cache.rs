//! GPU tests of the device KV cache: stored values bit for bit against the CPU cache's rounding
//! (f16 round to nearest even, `tessera_core`'s Q8_0 quantizer), decode attention against
//! `tessera_core::reference::attention` on the stored values and on the original values (within
//! the storage bounds documented on `KvDType`), paged decode against one causal pass of the
//! device attention kernel over the same sequence, and the all-or-nothing errors (capacity,
//! stale and repeated ids, bad operands) that must leave every sequence untouched. Every test
//! skips (passes, printing why once) without a GPU; the host bookkeeping is unit-tested in
//! `src/kv_cache.rs`.
//!
//! Tolerance of decode against the reference on the stored values (derived, not tuned), per
//! output element, with `u = 2⁻²⁴`, `γ_n = n·u/(1 − n·u)`, `n` the number of keys, `d` the
//! head dimension, `E = 2⁻²²` (expf: 2 ulp) and the reference's quantities:
//!
//! ```text
//! tol = γ_(d+6)·(sensitivity + magnitude·row_sensitivity) + (2·2·E + γ_(n+⌈n/512⌉+12))·2·magnitude
//! ```
//!
//! * a score is an f32 dot product of `d` terms (per-lane fma chains, a shuffle tree), the
//!   scale, the bias and the subtraction of the partition maximum: absolute error
//!   `<= γ_(d+6)·σ_j`, through `exp` a relative error of the same size in `p_j`;
//! * each weight is its own `expf` and, for sequences longer than one partition, the
//!   partition's merge weight `expf(m_p − M)`: `2·E`, in the numerator and the denominator;
//! * the weighted sums of `n` terms (per-lane chains, shuffle and 4-warp trees, the merge over
//!   `⌈n/512⌉` partitions) and the final division: `γ_(n+⌈n/512⌉+12)`, in each.

use half::f16;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tessera_core::attention::{
    AttentionParams, AttentionShape, Bias, HeadLayout, Heads, RelativeBias,
};
use tessera_core::quant::{BlockQ8_0, dequantize, quantize};
use tessera_core::reference;
use tessera_cuda::attention::{self as attn, DeviceAttentionParams};
use tessera_cuda::cudarc;
use tessera_cuda::cudarc::driver::CudaSlice;
use tessera_cuda::kv_cache::{
    DeviceDecodeParams, DeviceKvCache, DeviceRelativeBias, KvCacheConfig, KvDType, KvLayout,
    PARTITION, SeqId,
};
use tessera_cuda::{Device, launch::fill_u32, test_device};

const U: f64 = 1.0 / (1u64 << 24) as f64;
const EXP_ERR: f64 = 4.0 * U;
const POISON: u32 = 0x7fc0_0001;
const DTYPES: [KvDType; 3] = [KvDType::F32, KvDType::F16, KvDType::Q8_0];

fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U;
    nu / (1.0 - nu)
}

/// A small deterministic generator (the proptest seed drives it).
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 29) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Values with, sometimes, exact zeros and outliers.
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| match self.next_u64() % 16 {
                0 => 0.0,
                1 => self.unit() * scale * 8.0,
                _ => self.unit() * scale,
            })
            .collect()
    }
}

/// Uploads `x` with one spare element (no buffer is empty).
fn upload<T: cudarc::driver::DeviceRepr + Copy + Default>(dev: &Device, x: &[T]) -> CudaSlice<T> {
    let mut v = x.to_vec();
    v.push(T::default());
    dev.upload(&v).unwrap()
}

/// Dense `[n, heads, d]` values laid out as a `[batch, n, heads, d]` operand in layout `kind`
/// (0: dense bshd, 1: dense bhsd, 2: padded), for `batch` entries of `n` rows each.
fn relayout(
    kind: usize,
    dense: &[Vec<f32>],
    n: usize,
    heads: usize,
    d: usize,
) -> (Vec<f32>, HeadLayout) {
    let batch = dense.len();
    let layout = match kind {
        0 => HeadLayout::bshd(n, heads, d),
        1 => HeadLayout::bhsd(n, heads, d),
        _ => HeadLayout {
            batch_stride: n * (heads * (d + 3) + 5) + 7,
            seq_stride: heads * (d + 3) + 5,
            head_stride: d + 3,
        },
    };
    let len = layout.extent(batch, n, heads, d).unwrap();
    let mut data = vec![f32::NAN; len];
    for (b, x) in dense.iter().enumerate() {
        for t in 0..n {
            for h in 0..heads {
                let o = layout.offset(b, t, h);
                data[o..o + d].copy_from_slice(&x[(t * heads + h) * d..][..d]);
            }
        }
    }
    (data, layout)
}

fn new_cache(
    dev: &Device,
    dtype: KvDType,
    layout: KvLayout,
    n_kv_heads: usize,
    head_dim: usize,
) -> DeviceKvCache {
    DeviceKvCache::new(
        dev,
        KvCacheConfig {
            n_kv_heads,
            head_dim,
            dtype,
            layout,
        },
    )
    .unwrap()
}

/// Appends the dense `[n, nkv, d]` K and V to `seq` in pieces of random sizes and layouts.
fn append_dense(
    dev: &Device,
    cache: &mut DeviceKvCache,
    seq: SeqId,
    k: &[f32],
    v: &[f32],
    rng: &mut Rng,
    max_piece: usize,
) {
    let c = *cache.config();
    let row = c.n_kv_heads * c.head_dim;
    let n = k.len() / row;
    let start = cache.seq_len(seq).unwrap();
    let mut t = 0;
    while t < n {
        let piece = (1 + rng.below(max_piece)).min(n - t);
        let kp = vec![k[t * row..(t + piece) * row].to_vec()];
        let vp = vec![v[t * row..(t + piece) * row].to_vec()];
        let (kd, layout) = relayout(rng.below(3), &kp, piece, c.n_kv_heads, c.head_dim);
        let (vd, vlayout) = relayout(rng.below(3), &vp, piece, c.n_kv_heads, c.head_dim);
        let (kb, vb) = (upload(dev, &kd), upload(dev, &vd));
        cache
            .append(dev, &[seq], piece, &kb, layout, &vb, vlayout)
            .unwrap();
        t += piece;
    }
    assert_eq!(cache.seq_len(seq).unwrap(), start + n);
}

fn read_all(dev: &Device, cache: &DeviceKvCache, seq: SeqId) -> (Vec<f32>, Vec<f32>) {
    let c = cache.config();
    let n = cache.seq_len(seq).unwrap() * c.n_kv_heads * c.head_dim;
    let (mut k, mut v) = (vec![0.0; n], vec![0.0; n]);
    cache.read(dev, seq, &mut k, &mut v).unwrap();
    (k, v)
}

/// What the CPU cache stores for dense `[n, nkv, d]` values: f16 rounding or Q8_0 of each row
/// (blocks of 32, the last zero-padded), dequantized.
fn stored(dtype: KvDType, x: &[f32], d: usize) -> Vec<f32> {
    match dtype {
        KvDType::F32 => x.to_vec(),
        KvDType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        KvDType::Q8_0 => {
            let nb = d.div_ceil(32);
            let mut out = Vec::with_capacity(x.len());
            for row in x.chunks(d) {
                let mut pad = vec![0.0f32; nb * 32];
                pad[..d].copy_from_slice(row);
                let mut blocks = vec![
                    BlockQ8_0 {
                        d: f16::ZERO,
                        qs: [0; 32]
                    };
                    nb
                ];
                quantize(&pad, &mut blocks).unwrap();
                dequantize(&blocks, &mut pad).unwrap();
                out.extend_from_slice(&pad[..d]);
            }
            out
        }
    }
}

/// The documented per-element storage error bound (see `KvDType`).
fn storage_bounds(dtype: KvDType, x: &[f32], d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        for blk in row.chunks(32) {
            let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            out.extend(blk.iter().map(|&v| {
                let v = f64::from(v);
                match dtype {
                    KvDType::F32 => 0.0,
                    KvDType::F16 => v.abs() * 2f64.powi(-11) + 2f64.powi(-25),
                    KvDType::Q8_0 => {
                        let db = f64::from(amax) / 127.0;
                        db * (0.5 + 127.0 * 2f64.powi(-11) + 2f64.powi(-14))
                            + 127.0 * 2f64.powi(-25)
                    }
                }
            }));
        }
    }
    out
}

/// The reference for query `q` (`[n_heads, d]`) over `len` keys `k`, `v` (`[len, nkv, d]`), as
/// decode sees it: the query at position `len − 1`.
#[allow(clippy::too_many_arguments)]
fn decode_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    n_heads: usize,
    nkv: usize,
    d: usize,
    scale: f32,
    table: Option<&[f32]>,
) -> reference::AttentionReference {
    let shape = AttentionShape {
        batch: 1,
        q_len: 1,
        kv_len: len,
        n_heads,
        n_kv_heads: nkv,
        head_dim: d,
    };
    let p = AttentionParams::new(d)
        .with_scale(scale)
        .causal(len.saturating_sub(1))
        .with_bias(table.map_or(Bias::None, |t| {
            Bias::Relative(RelativeBias {
                table: t,
                num_buckets: 32,
                max_distance: 128,
                bidirectional: false,
            })
        }));
    reference::attention(
        &shape,
        Heads::new(q, HeadLayout::bshd(1, n_heads, d)),
        Heads::new(k, HeadLayout::bshd(len, nkv, d)),
        Heads::new(v, HeadLayout::bshd(len, nkv, d)),
        &p,
    )
    .unwrap()
}

/// The derived tolerance of element `i` of reference row `row` with `n` keys.
fn tolerance(r: &reference::AttentionReference, row: usize, i: usize, n: usize, d: usize) -> f64 {
    gamma(d + 6) * (r.sensitivity[i] + r.magnitude[i] * r.row_sensitivity[row])
        + (2.0 * 2.0 * EXP_ERR + gamma(n + n.div_ceil(PARTITION) + 12)) * 2.0 * r.magnitude[i]
        + f64::from(f32::MIN_POSITIVE)
}

/// Decodes `seqs` into a poisoned output with gaps; returns it dense `[batch, n_heads, d]`
/// after checking that no gap was written.
#[allow(clippy::too_many_arguments)]
fn decode(
    dev: &Device,
    cache: &mut DeviceKvCache,
    seqs: &[SeqId],
    n_heads: usize,
    q: &CudaSlice<f32>,
    q_layout: HeadLayout,
    params: &DeviceDecodeParams<'_>,
) -> Vec<f32> {
    let d = cache.config().head_dim;
    let nb = seqs.len();
    let ol = HeadLayout {
        batch_stride: n_heads * (d + 1) + 2,
        seq_stride: 0,
        head_stride: d + 1,
    };
    let n_out = ol.extent(nb, 1, n_heads, d).unwrap();
    let mut out = dev.alloc_zeros::<f32>(n_out + 1).unwrap();
    fill_u32(dev, &mut out, POISON).unwrap();
    cache
        .decode_attention(dev, seqs, n_heads, q, q_layout, params, &mut out, ol)
        .unwrap();
    let host = dev.download(&out).unwrap();
    let mut dense = vec![0.0; nb * n_heads * d];
    let mut mine = vec![false; host.len()];
    for s in 0..nb {
        for h in 0..n_heads {
            let o = ol.offset(s, 0, h);
            dense[(s * n_heads + h) * d..][..d].copy_from_slice(&host[o..o + d]);
            mine[o..o + d].iter_mut().for_each(|m| *m = true);
        }
    }
    for (e, (&x, &m)) in host.iter().zip(&mine).enumerate() {
        assert!(
            m || x.to_bits() == POISON,
            "decode wrote element {e} outside its output"
        );
    }
    dense
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One random problem: a ragged batch of sequences, a head configuration and a bias.
#[derive(Debug, Clone)]
struct Problem {
    lens: Vec<usize>,
    nkv: usize,
    group: usize,
    d: usize,
    block_size: usize,
    bias: bool,
    seed: u64,
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        prop::collection::vec(
            prop_oneof![
                4 => 0usize..40,
                2 => 60usize..140,
                1 => Just(0usize),
                2 => prop::sample::select(vec![1usize, 511, 512, 513, 1023, 1025, 1600]),
            ],
            1..5,
        ),
        prop_oneof![Just(1usize), Just(2), 1usize..4],
        prop_oneof![Just(1usize), Just(2), Just(4), Just(8), Just(12), 1usize..8],
        prop_oneof![
            3 => prop::sample::select(vec![1usize, 7, 8, 24, 31, 32, 33, 64, 80, 128]),
            1 => prop::sample::select(vec![100usize, 256, 300, 1024]),
            1 => 1usize..80,
        ],
        prop_oneof![Just(1usize), Just(16), 1usize..40],
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(mut lens, mut nkv, mut group, d, block_size, bias, seed)| {
                // Keep the reference below ~10⁷ multiply-adds per dtype and layout.
                while lens.iter().sum::<usize>() * nkv * group * d > 10_000_000 {
                    if group > 1 {
                        group /= 2;
                    } else if nkv > 1 {
                        nkv -= 1;
                    } else {
                        lens.iter_mut().for_each(|l| *l /= 2);
                    }
                }
                Problem {
                    lens,
                    nkv,
                    group,
                    d,
                    block_size,
                    bias,
                    seed,
                }
            },
        )
}

/// Runs a problem on every dtype × layout: stored values, decode against the reference on the
/// stored and on the original values; contiguous and paged storage give the same bits.
fn check_problem(dev: &Device, p: &Problem) -> Result<(), TestCaseError> {
    let mut rng = Rng(p.seed);
    let n_heads = p.nkv * p.group;
    let d = p.d;
    let row = p.nkv * d;
    let originals: Vec<(Vec<f32>, Vec<f32>)> = p
        .lens
        .iter()
        .map(|&n| (rng.values(n * row, 1.0), rng.values(n * row, 1.0)))
        .collect();
    let q_dense: Vec<Vec<f32>> = (0..p.lens.len())
        .map(|_| rng.values(n_heads * d, 1.5))
        .collect();
    let (q_host, q_layout) = relayout(rng.below(3), &q_dense, 1, n_heads, d);
    let q = upload(dev, &q_host);
    let table_host: Vec<f32> = (0..32 * n_heads).map(|_| rng.unit() * 2.0).collect();
    let table = upload(dev, &table_host);
    let scale = 1.0 / (d as f32).sqrt();
    let params = DeviceDecodeParams {
        scale,
        bias: p.bias.then(|| DeviceRelativeBias {
            table: table.slice(..32 * n_heads),
            num_buckets: 32,
            max_distance: 128,
            bidirectional: false,
        }),
    };
    let tab = p.bias.then_some(&table_host[..]);
    let max_len = p.lens.iter().copied().max().unwrap_or(0).max(1);
    let total_blocks: usize = p
        .lens
        .iter()
        .map(|&n| n.div_ceil(p.block_size))
        .sum::<usize>()
        + 1;
    for dtype in DTYPES {
        let mut results: Vec<Vec<u32>> = Vec::new();
        for layout in [
            KvLayout::Contiguous {
                max_seqs: p.lens.len() + 1,
                max_len,
            },
            KvLayout::Paged {
                block_size: p.block_size,
                num_blocks: total_blocks,
            },
        ] {
            let mut cache = new_cache(dev, dtype, layout, p.nkv, d);
            // A sequence added and freed first, so that slots and pages are reused.
            let junk = cache.add_sequence().unwrap();
            let seqs: Vec<SeqId> = (0..p.lens.len())
                .map(|_| cache.add_sequence().unwrap())
                .collect();
            cache.free_sequence(junk).unwrap();
            // A batched append of the tokens every sequence has, then the rest in pieces.
            let common = p.lens.iter().copied().min().unwrap_or(0).min(3);
            if common > 0 {
                let pieces: Vec<Vec<f32>> = originals
                    .iter()
                    .map(|(k, _)| k[..common * row].to_vec())
                    .collect();
                let (kd, kl) = relayout(rng.below(3), &pieces, common, p.nkv, d);
                let pieces: Vec<Vec<f32>> = originals
                    .iter()
                    .map(|(_, v)| v[..common * row].to_vec())
                    .collect();
                let (vd, vl) = relayout(rng.below(3), &pieces, common, p.nkv, d);
                let (kb, vb) = (upload(dev, &kd), upload(dev, &vd));
                cache.append(dev, &seqs, common, &kb, kl, &vb, vl).unwrap();
            }
            for (&s, (k0, v0)) in seqs.iter().zip(&originals) {
                append_dense(
                    dev,
                    &mut cache,
                    s,
                    &k0[common * row..],
                    &v0[common * row..],
                    &mut rng,
                    200,
                );
            }
            let got = decode(dev, &mut cache, &seqs, n_heads, &q, q_layout, &params);
            for (b, (&s, (k0, v0))) in seqs.iter().zip(&originals).enumerate() {
                let len = p.lens[b];
                let (ks, vs) = read_all(dev, &cache, s);
                // Stored values: the CPU cache's, bit for bit.
                prop_assert_eq!(
                    bits(&ks),
                    bits(&stored(dtype, k0, d)),
                    "{:?} K of seq {}",
                    dtype,
                    b
                );
                prop_assert_eq!(
                    bits(&vs),
                    bits(&stored(dtype, v0, d)),
                    "{:?} V of seq {}",
                    dtype,
                    b
                );
                let qb = &q_dense[b];
                let r = decode_reference(qb, &ks, &vs, len, n_heads, p.nkv, d, scale, tab);
                let r0 = decode_reference(qb, k0, v0, len, n_heads, p.nkv, d, scale, tab);
                let kb = storage_bounds(dtype, k0, d);
                let vb = storage_bounds(dtype, v0, d);
                for h in 0..n_heads {
                    let g = h / p.group;
                    // Largest score change through K, and the output change it allows.
                    let mut ds = 0.0f64;
                    for j in 0..len {
                        let x: f64 = (0..d)
                            .map(|c| f64::from(qb[h * d + c]).abs() * kb[(j * p.nkv + g) * d + c])
                            .sum();
                        ds = ds.max(x * f64::from(scale));
                    }
                    let growth = (2.0 * ds).exp() - 1.0;
                    for c in 0..d {
                        let i = h * d + c;
                        let gv = got[(b * n_heads + h) * d + c];
                        if len == 0 {
                            prop_assert_eq!(gv, 0.0, "empty sequence must give zeros");
                            continue;
                        }
                        let tol = tolerance(&r, h, i, len, d);
                        let err = (f64::from(gv) - r.out[i]).abs();
                        prop_assert!(
                            err <= tol,
                            "{:?} {:?}: seq {} (len {}) head {} col {}: got {} want {} err {:e} > tol {:e}",
                            dtype,
                            layout,
                            b,
                            len,
                            h,
                            c,
                            gv,
                            r.out[i],
                            err,
                            tol
                        );
                        let (mut dv, mut vmax) = (0.0f64, 0.0f64);
                        for j in 0..len {
                            let e = (j * p.nkv + g) * d + c;
                            dv = dv.max(vb[e]);
                            vmax = vmax.max(f64::from(v0[e]).abs());
                        }
                        let tol0 = tol + dv + growth * vmax * (1.0 + 1e-12);
                        let err0 = (f64::from(gv) - r0.out[i]).abs();
                        prop_assert!(
                            err0 <= tol0,
                            "{:?} vs original: seq {} head {} col {}: err {:e} > tol {:e}",
                            dtype,
                            b,
                            h,
                            c,
                            err0,
                            tol0
                        );
                    }
                }
            }
            results.push(bits(&got));
        }
        // Contiguous and paged storage of the same values: the same bits (partitions and all
        // reductions sit at key positions, whatever the page size).
        prop_assert_eq!(
            &results[0],
            &results[1],
            "{:?}: contiguous and paged differ",
            dtype
        );
    }
    Ok(())
}

#[test]
fn decode_matches_reference() {
    let Some(dev) = test_device() else { return };
    TestRunner::new(Config {
        cases: 48,
        source_file: Some(file!()),
        ..Config::default()
    })
    .run(&problem(), |p| check_problem(dev, &p))
    .unwrap();
}

/// Paged decode, one token at a time, equals one causal pass of the device attention kernel
/// over the whole sequence (the same f16 values), row by row, within the two kernels'
/// tolerances; and each step matches the reference.
#[test]
fn paged_decode_equals_a_causal_pass() {
    let Some(dev) = test_device() else { return };
    let (nkv, group, d, n) = (2usize, 3usize, 64usize, 700usize);
    let n_heads = nkv * group;
    let mut rng = Rng(42);
    // f16-representable values, so that the cache (f16) and the attention kernel see the
    // same numbers.
    let rounded =
        |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| f16::from_f32(v).to_f32()).collect() };
    let k = rounded(rng.values(n * nkv * d, 1.0));
    let v = rounded(rng.values(n * nkv * d, 1.0));
    let q = rounded(rng.values(n * n_heads * d, 1.0));
    let mut cache = new_cache(
        dev,
        KvDType::F16,
        KvLayout::Paged {
            block_size: 16,
            num_blocks: n.div_ceil(16),
        },
        nkv,
        d,
    );
    let seq = cache.add_sequence().unwrap();
    // The causal pass over all n tokens.
    let shape = AttentionShape {
        batch: 1,
        q_len: n,
        kv_len: n,
        n_heads,
        n_kv_heads: nkv,
        head_dim: d,
    };
    let h16 = |x: &[f32]| -> Vec<f16> { x.iter().map(|&v| f16::from_f32(v)).collect() };
    let (qd, kd, vd) = (
        upload(dev, &h16(&q)),
        upload(dev, &h16(&k)),
        upload(dev, &h16(&v)),
    );
    let ql = HeadLayout::bshd(n, n_heads, d);
    let kl = HeadLayout::bshd(n, nkv, d);
    let mut pass = dev.alloc_zeros::<f32>(n * n_heads * d).unwrap();
    let ap = DeviceAttentionParams::new(d).causal(0);
    attn::attention::<f16>(dev, &shape, &qd, ql, &kd, kl, &vd, kl, &ap, &mut pass, ql).unwrap();
    let pass = dev.download(&pass).unwrap();
    let params = DeviceDecodeParams::new(d);
    let qall = upload(dev, &q);
    let row = nkv * d;
    for t in 0..n {
        let (kb, vb) = (
            upload(dev, &k[t * row..(t + 1) * row]),
            upload(dev, &v[t * row..(t + 1) * row]),
        );
        let l1 = HeadLayout::bshd(1, nkv, d);
        cache.append(dev, &[seq], 1, &kb, l1, &vb, l1).unwrap();
        if t % 37 != 0 && t != n - 1 && t != 511 && t != 512 {
            continue;
        }
        let qt = qall.slice(t * n_heads * d..(t + 1) * n_heads * d);
        let ol = HeadLayout::bshd(1, n_heads, d);
        let mut out = dev.alloc_zeros::<f32>(n_heads * d).unwrap();
        fill_u32(dev, &mut out, POISON).unwrap();
        cache
            .decode_attention(dev, &[seq], n_heads, &qt, ol, &params, &mut out, ol)
            .unwrap();
        let got = dev.download(&out).unwrap();
        let len = t + 1;
        let r = decode_reference(
            &q[t * n_heads * d..(t + 1) * n_heads * d],
            &k[..len * row],
            &v[..len * row],
            len,
            n_heads,
            nkv,
            d,
            params.scale,
            None,
        );
        let kvt = len.div_ceil(32);
        for h in 0..n_heads {
            for c in 0..d {
                let i = h * d + c;
                let tol = tolerance(&r, h, i, len, d);
                let err = (f64::from(got[i]) - r.out[i]).abs();
                assert!(
                    err <= tol,
                    "step {t} head {h} col {c}: got {} want {} err {err:e} > {tol:e}",
                    got[i],
                    r.out[i]
                );
                // The attention kernel's f16 bound (tests/attention.rs) plus decode's.
                let u_tc = 2.0 * U;
                let g = |m: usize| m as f64 * u_tc / (1.0 - m as f64 * u_tc);
                let tol_pass = 2.0
                    * (g(d + 8) * (r.sensitivity[i] + r.magnitude[i] * r.row_sensitivity[h])
                        + 2.0
                            * (2f64.powi(-11) + (kvt + 1) as f64 * EXP_ERR + g(len + 2 * kvt + 8))
                            * r.magnitude[i])
                    + 2.0 * U * r.out[i].abs()
                    + 2.0 * len as f64 * 2f64.powi(-25) * 8.0;
                let p = pass[(t * n_heads + h) * d + c];
                assert!(
                    (f64::from(got[i]) - f64::from(p)).abs() <= tol + tol_pass,
                    "step {t} head {h} col {c}: decode {} vs causal pass {}",
                    got[i],
                    p
                );
            }
        }
    }
}

/// Capacity exhaustion, stale, foreign and repeated ids, and bad operands are errors before
/// anything is launched: no sequence changes, no output is written.
#[test]
fn errors_change_nothing() {
    let Some(dev) = test_device() else { return };
    let (nkv, d) = (2usize, 40usize);
    let row = nkv * d;
    let mut rng = Rng(7);
    for dtype in DTYPES {
        let mut cache = new_cache(
            dev,
            dtype,
            KvLayout::Paged {
                block_size: 4,
                num_blocks: 6,
            },
            nkv,
            d,
        );
        let a = cache.add_sequence().unwrap();
        let b = cache.add_sequence().unwrap();
        let (ka, va) = (rng.values(9 * row, 1.0), rng.values(9 * row, 1.0));
        let (kb, vb) = (rng.values(7 * row, 1.0), rng.values(7 * row, 1.0));
        append_dense(dev, &mut cache, a, &ka, &va, &mut rng, 4); // 3 blocks
        append_dense(dev, &mut cache, b, &kb, &vb, &mut rng, 4); // 2 blocks
        assert_eq!(cache.free_blocks(), 1);
        let q = upload(dev, &rng.values(2 * 4 * d, 1.0));
        let ql = HeadLayout::bshd(1, 4, d);
        let params = DeviceDecodeParams::new(d);
        let before = decode(dev, &mut cache, &[a, b], 4, &q, ql, &params);
        let (ra, rb) = (read_all(dev, &cache, a), read_all(dev, &cache, b));
        // a: 9 + 4 = 13 tokens need a 4th block, b: 7 + 4 = 11 a 3rd: 2 blocks, 1 free.
        let extra = upload(dev, &rng.values(2 * 4 * row, 1.0));
        let l = HeadLayout::bshd(4, nkv, d);
        assert!(cache.append(dev, &[a, b], 4, &extra, l, &extra, l).is_err());
        // One sequence alone fits; repeated ids do not.
        assert!(cache.append(dev, &[a, a], 1, &extra, l, &extra, l).is_err());
        // Too short an operand.
        let short = upload(dev, &rng.values(row - 1, 1.0));
        let l1 = HeadLayout::bshd(1, nkv, d);
        assert!(cache.append(dev, &[a], 1, &short, l1, &short, l1).is_err());
        // A stale id.
        let c = cache.add_sequence().unwrap();
        cache.free_sequence(c).unwrap();
        assert!(cache.append(dev, &[c], 1, &extra, l1, &extra, l1).is_err());
        assert!(cache.seq_len(c).is_err());
        assert!(cache.free_sequence(c).is_err());
        // Decode errors write nothing.
        let ol = HeadLayout::bshd(1, 4, d);
        let mut out = dev.alloc_zeros::<f32>(2 * 4 * d).unwrap();
        fill_u32(dev, &mut out, POISON).unwrap();
        assert!(
            cache
                .decode_attention(dev, &[a, c], 4, &q, ql, &params, &mut out, ol)
                .is_err()
        );
        assert!(
            cache
                .decode_attention(dev, &[a, a], 4, &q, ql, &params, &mut out, ol)
                .is_err()
        );
        assert!(
            cache
                .decode_attention(dev, &[a, b], 3, &q, ql, &params, &mut out, ol)
                .is_err()
        );
        assert!(
            cache
                .decode_attention(dev, &[a, b], 4, &short, ql, &params, &mut out, ol)
                .is_err()
        );
        let overlap = HeadLayout {
            batch_stride: d,
            seq_stride: 0,
            head_stride: d,
        };
        assert!(
            cache
                .decode_attention(dev, &[a, b], 4, &q, ql, &params, &mut out, overlap)
                .is_err()
        );
        let bad_table = upload(dev, &vec![0.0f32; 31 * 4]);
        let bad = DeviceDecodeParams {
            scale: 1.0,
            bias: Some(DeviceRelativeBias {
                table: bad_table.slice(..31 * 4),
                num_buckets: 32,
                max_distance: 128,
                bidirectional: false,
            }),
        };
        assert!(
            cache
                .decode_attention(dev, &[a, b], 4, &q, ql, &bad, &mut out, ol)
                .is_err()
        );
        assert!(
            dev.download(&out)
                .unwrap()
                .iter()
                .all(|x| x.to_bits() == POISON)
        );
        // Nothing changed.
        assert_eq!(cache.seq_len(a).unwrap(), 9);
        assert_eq!(cache.seq_len(b).unwrap(), 7);
        assert_eq!(cache.free_blocks(), 1);
        assert_eq!(read_all(dev, &cache, a), ra);
        assert_eq!(read_all(dev, &cache, b), rb);
        assert_eq!(
            bits(&decode(dev, &mut cache, &[a, b], 4, &q, ql, &params)),
            bits(&before)
        );
        // What fits still works; freed blocks are reused without touching b.
        cache
            .append(
                dev,
                &[a],
                3,
                &extra,
                HeadLayout::bshd(3, nkv, d),
                &extra,
                HeadLayout::bshd(3, nkv, d),
            )
            .unwrap();
        assert_eq!(cache.free_blocks(), 0);
        cache.free_sequence(a).unwrap();
        assert_eq!(cache.free_blocks(), 3);
        let e = cache.add_sequence().unwrap();
        let (ke, ve) = (rng.values(12 * row, 1.0), rng.values(12 * row, 1.0));
        append_dense(dev, &mut cache, e, &ke, &ve, &mut rng, 5);
        assert_eq!(read_all(dev, &cache, b), rb);
        let (se, _) = read_all(dev, &cache, e);
        assert_eq!(bits(&se), bits(&stored(dtype, &ke, d)));
        // Contiguous: past max_len is an error.
        let mut cont = new_cache(
            dev,
            dtype,
            KvLayout::Contiguous {
                max_seqs: 1,
                max_len: 5,
            },
            nkv,
            d,
        );
        let s = cont.add_sequence().unwrap();
        assert!(cont.add_sequence().is_err());
        let six = upload(dev, &rng.values(6 * row, 1.0));
        assert!(
            cont.append(
                dev,
                &[s],
                6,
                &six,
                HeadLayout::bshd(6, nkv, d),
                &six,
                HeadLayout::bshd(6, nkv, d)
            )
            .is_err()
        );
        assert_eq!(cont.seq_len(s).unwrap(), 0);
        cont.append(
            dev,
            &[s],
            5,
            &six,
            HeadLayout::bshd(5, nkv, d),
            &six,
            HeadLayout::bshd(5, nkv, d),
        )
        .unwrap();
        assert_eq!(cont.seq_len(s).unwrap(), 5);
    }
}

/// Many sequences and long block tables: the device mirror grows (rebuilds) and stays right.
#[test]
fn block_tables_grow() {
    let Some(dev) = test_device() else { return };
    let (nkv, group, d) = (1usize, 2usize, 32usize);
    let n_heads = nkv * group;
    let row = nkv * d;
    let mut rng = Rng(9);
    let mut cache = new_cache(
        dev,
        KvDType::F16,
        KvLayout::Paged {
            block_size: 2,
            num_blocks: 2000,
        },
        nkv,
        d,
    );
    let seqs: Vec<SeqId> = (0..20).map(|_| cache.add_sequence().unwrap()).collect();
    let lens: Vec<usize> = (0..20).map(|i| 3 + i * 9).collect();
    let data: Vec<(Vec<f32>, Vec<f32>)> = lens
        .iter()
        .map(|&n| (rng.values(n * row, 1.0), rng.values(n * row, 1.0)))
        .collect();
    for (&s, (k, v)) in seqs.iter().zip(&data) {
        append_dense(dev, &mut cache, s, k, v, &mut rng, 50);
    }
    let qd: Vec<f32> = rng.values(20 * n_heads * d, 1.0);
    let q = upload(dev, &qd);
    let ql = HeadLayout::bshd(1, n_heads, d);
    let params = DeviceDecodeParams::new(d);
    let got = decode(dev, &mut cache, &seqs, n_heads, &q, ql, &params);
    for (b, &s) in seqs.iter().enumerate() {
        let (ks, vs) = read_all(dev, &cache, s);
        let r = decode_reference(
            &qd[b * n_heads * d..][..n_heads * d],
            &ks,
            &vs,
            lens[b],
            n_heads,
            nkv,
            d,
            params.scale,
            None,
        );
        for i in 0..n_heads * d {
            let tol = tolerance(&r, i / d, i, lens[b], d);
            let err = (f64::from(got[b * n_heads * d + i]) - r.out[i]).abs();
            assert!(err <= tol, "seq {b} element {i}: err {err:e} > {tol:e}");
        }
    }
}
