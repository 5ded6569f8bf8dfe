//! Property tests of the KV cache and decode attention: every available ISA × storage dtype ×
//! layout against `tessera_core::reference::attention` run on the cache's stored (dequantized)
//! contents, and against the reference on the original f32 values within the storage
//! rounding bound documented on `KvDType`.
//!
//! Tolerance against the reference on the stored values (derived, not tuned), per output
//! element, with `u = 2⁻²⁴`, `γ_n = n·u / (1 − n·u)`, `n` the number of keys, `d` the head
//! dimension, and the reference's magnitude / sensitivity quantities:
//!
//! ```text
//! tol = γ_(d+6)·(sensitivity + magnitude·row_sensitivity)
//!     + (2·(c+1)·EXP_REL_ERR + γ_(n+c+8))·2·magnitude,       c = ⌈n / CHUNK⌉
//! ```
//!
//! * a score `scale·q·k + bias − m` is a dot product of `d` terms (any summation order) and
//!   three more roundings: its absolute error is below `γ_(d+6)·σ_j`; through `exp` it
//!   perturbs `p_j` relatively by as much, which reaches the numerator as `sensitivity` and the
//!   denominator as `magnitude·row_sensitivity`;
//! * each weight is the product of its own `exp`, the rescale factors of the later chunk
//!   maxima of its partition (at most one per chunk) and its partition's merge weight, each
//!   within `EXP_REL_ERR`, in the numerator and the denominator: `2·(c+1)·EXP_REL_ERR` (the
//!   generic form `2·(n+1)·EXP_REL_ERR`, one exp per key, would be `CHUNK` times looser);
//! * the weighted sums of `n` terms in f32, one rescale multiplication per chunk, the merge
//!   (two operations) and the final division: `γ_(n+c+8)` relative to `magnitude`, in the
//!   numerator and the denominator.

use proptest::prelude::*;
use tessera_core::Error;
use tessera_core::attention::{
    AttentionParams, AttentionShape, Bias, HeadLayout, Heads, HeadsMut, RelativeBias,
};
use tessera_core::reference;
use tessera_cpu::kv_cache::{
    self, CHUNK, DecodeOptions, DecodeParams, KvCache, KvCacheConfig, KvDType, KvLayout, PARTITION,
    SeqId,
};
use tessera_cpu::{Isa, Parallelism};

const U: f64 = 1.0 / (1u64 << 24) as f64;
/// The relative error bound of the kernels' vectorized `exp` (`tessera_cpu`'s crate-private
/// `simd::EXP_REL_ERR`, measured by its unit test over the whole domain): 4 ulp.
const EXP_REL_ERR: f64 = 4.0 * f32::EPSILON as f64;

fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U;
    nu / (1.0 - nu)
}

const DTYPES: [KvDType; 3] = [KvDType::F32, KvDType::F16, KvDType::Q8_0];

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

/// A `[1, n, heads, d]` operand in a random layout (dense bshd, dense bhsd, or padded), and
/// its values densely as `[n, heads, d]`.
fn operand(
    rng: &mut Rng,
    n: usize,
    heads: usize,
    d: usize,
    scale: f32,
) -> (Vec<f32>, HeadLayout, Vec<f32>) {
    let dense = rng.values(n * heads * d, scale);
    let layout = match rng.below(3) {
        0 => HeadLayout::bshd(n, heads, d),
        1 => HeadLayout::bhsd(n, heads, d),
        _ => HeadLayout {
            batch_stride: 0,
            seq_stride: heads * (d + 3) + 5,
            head_stride: d + 3,
        },
    };
    let len = layout.extent(1, n, heads, d).unwrap();
    let mut data = vec![f32::NAN; len];
    for t in 0..n {
        for h in 0..heads {
            let o = layout.offset(0, t, h);
            data[o..o + d].copy_from_slice(&dense[(t * heads + h) * d..][..d]);
        }
    }
    (data, layout, dense)
}

fn config(dtype: KvDType, layout: KvLayout, n_kv_heads: usize, head_dim: usize) -> KvCacheConfig {
    KvCacheConfig {
        n_kv_heads,
        head_dim,
        dtype,
        layout,
    }
}

/// Appends the dense `[n, nkv, d]` K and V to `seq` in pieces of random sizes, each in a
/// random layout.
fn append_dense(
    cache: &mut KvCache,
    seq: SeqId,
    k: &[f32],
    v: &[f32],
    rng: &mut Rng,
    max_piece: usize,
) {
    let c = *cache.config();
    let row = c.n_kv_heads * c.head_dim;
    let n = k.len() / row;
    let mut t = 0;
    while t < n {
        let piece = (1 + rng.below(max_piece)).min(n - t);
        let relayout = |x: &[f32], layout: HeadLayout| {
            let mut data =
                vec![f32::NAN; layout.extent(1, piece, c.n_kv_heads, c.head_dim).unwrap()];
            for i in 0..piece {
                for h in 0..c.n_kv_heads {
                    let o = layout.offset(0, i, h);
                    data[o..o + c.head_dim].copy_from_slice(
                        &x[((t + i) * c.n_kv_heads + h) * c.head_dim..][..c.head_dim],
                    );
                }
            }
            data
        };
        let layout = if rng.below(2) == 0 {
            HeadLayout::bshd(piece, c.n_kv_heads, c.head_dim)
        } else {
            HeadLayout::bhsd(piece, c.n_kv_heads, c.head_dim)
        };
        let kd = relayout(k, layout);
        let vd = relayout(v, layout);
        cache
            .append(seq, Heads::new(&kd, layout), Heads::new(&vd, layout), piece)
            .unwrap();
        t += piece;
    }
    assert_eq!(cache.seq_len(seq).unwrap(), n);
}

fn read_all(cache: &KvCache, seq: SeqId) -> (Vec<f32>, Vec<f32>) {
    let c = cache.config();
    let n = cache.seq_len(seq).unwrap() * c.n_kv_heads * c.head_dim;
    let (mut k, mut v) = (vec![0.0; n], vec![0.0; n]);
    cache.read(seq, &mut k, &mut v).unwrap();
    (k, v)
}

/// Every decode configuration to test: each available ISA, one and two threads.
fn all_options() -> Vec<DecodeOptions> {
    let mut v = Vec::new();
    for isa in Isa::available() {
        for parallelism in [Parallelism::Sequential, Parallelism::Threads(2)] {
            v.push(DecodeOptions {
                isa: Some(isa),
                parallelism,
            });
        }
    }
    v
}

/// The reference for query `q` (`[n_heads, d]` dense) over `len` keys `k`, `v` (dense
/// `[len, nkv, d]`), as decode sees it: `q_offset = len − 1`.
#[allow(clippy::too_many_arguments)]
fn decode_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    n_heads: usize,
    nkv: usize,
    d: usize,
    params: &DecodeParams<'_>,
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
        .with_scale(params.scale)
        .causal(len.saturating_sub(1))
        .with_bias(params.bias.map_or(Bias::None, Bias::Relative));
    reference::attention(
        &shape,
        Heads::new(q, HeadLayout::bshd(1, n_heads, d)),
        Heads::new(k, HeadLayout::bshd(len, nkv, d)),
        Heads::new(v, HeadLayout::bshd(len, nkv, d)),
        &p,
    )
    .unwrap()
}

/// The derived tolerance of element `i` of a reference row with `n` attended keys.
fn tolerance(r: &reference::AttentionReference, row: usize, i: usize, n: usize, d: usize) -> f64 {
    let chunks = n.div_ceil(CHUNK);
    gamma(d + 6) * (r.sensitivity[i] + r.magnitude[i] * r.row_sensitivity[row])
        + (2.0 * (chunks as f64 + 1.0) * EXP_REL_ERR + gamma(n + chunks + 8)) * 2.0 * r.magnitude[i]
        + f64::from(f32::MIN_POSITIVE)
}

/// A decode batch: the cache, its sequences, and a query per sequence.
struct Batch {
    seqs: Vec<SeqId>,
    n_heads: usize,
    q: Vec<f32>,
    q_layout: HeadLayout,
}

/// Decodes `batch` with `opts` into a fresh output (in a random-ish padded layout) and
/// returns it densely `[batch, n_heads, d]`.
fn decode(cache: &KvCache, b: &Batch, params: &DecodeParams<'_>, opts: &DecodeOptions) -> Vec<f32> {
    let d = cache.config().head_dim;
    let nb = b.seqs.len();
    let ol = HeadLayout {
        batch_stride: b.n_heads * (d + 1) + 2,
        seq_stride: 0,
        head_stride: d + 1,
    };
    let mut out = vec![f32::NAN; ol.extent(nb, 1, b.n_heads, d).unwrap()];
    kv_cache::decode_attention_with(
        opts,
        cache,
        &b.seqs,
        b.n_heads,
        Heads::new(&b.q, b.q_layout),
        HeadsMut::new(&mut out, ol),
        params,
    )
    .unwrap();
    let mut dense = vec![0.0; nb * b.n_heads * d];
    for s in 0..nb {
        for h in 0..b.n_heads {
            dense[(s * b.n_heads + h) * d..][..d].copy_from_slice(&out[ol.offset(s, 0, h)..][..d]);
        }
    }
    dense
}

/// The query of batch entry `s` as a dense `[n_heads, d]`.
fn query(b: &Batch, s: usize, d: usize) -> Vec<f32> {
    let mut q = Vec::with_capacity(b.n_heads * d);
    for h in 0..b.n_heads {
        q.extend_from_slice(&b.q[b.q_layout.offset(s, 0, h)..][..d]);
    }
    q
}

/// Checks `got` (dense `[batch, n_heads, d]`) against the reference on the stored values.
fn check_against_stored(
    cache: &KvCache,
    b: &Batch,
    params: &DecodeParams<'_>,
    got: &[f32],
    what: &str,
) -> Result<(), TestCaseError> {
    let c = cache.config();
    let d = c.head_dim;
    for (s, &seq) in b.seqs.iter().enumerate() {
        let (k, v) = read_all(cache, seq);
        let len = cache.seq_len(seq).unwrap();
        let q = query(b, s, d);
        let r = decode_reference(&q, &k, &v, len, b.n_heads, c.n_kv_heads, d, params);
        for h in 0..b.n_heads {
            for cc in 0..d {
                let i = h * d + cc;
                let g = got[(s * b.n_heads + h) * d + cc];
                if len == 0 {
                    prop_assert_eq!(g, 0.0, "{}: empty sequence must give zeros", what);
                    continue;
                }
                let tol = tolerance(&r, h, i, len, d);
                let err = (f64::from(g) - r.out[i]).abs();
                prop_assert!(
                    err <= tol,
                    "{}: seq {} (len {}) head {} col {}: got {} want {} err {:e} > tol {:e}",
                    what,
                    s,
                    len,
                    h,
                    cc,
                    g,
                    r.out[i],
                    err,
                    tol
                );
            }
        }
    }
    Ok(())
}

/// The documented per-element storage error bound of `dtype` for value `x` of a block whose
/// largest magnitude is `amax`.
fn storage_bound(dtype: KvDType, x: f32, amax: f32) -> f64 {
    let x = f64::from(x);
    match dtype {
        KvDType::F32 => 0.0,
        KvDType::F16 => x.abs() * 2f64.powi(-11) + 2f64.powi(-25),
        KvDType::Q8_0 => {
            let db = f64::from(amax) / 127.0;
            db * (0.5 + 127.0 * 2f64.powi(-11) + 2f64.powi(-14)) + 127.0 * 2f64.powi(-25)
        }
    }
}

/// Per-element storage bounds of dense `[n, nkv, d]` values (Q8_0 blocks of 32 per row).
fn storage_bounds(dtype: KvDType, x: &[f32], d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        for blk in row.chunks(32) {
            let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            out.extend(blk.iter().map(|&v| storage_bound(dtype, v, amax)));
        }
    }
    out
}

/// Checks `got` against the reference on the ORIGINAL values `k0`, `v0` of every sequence
/// within the kernel tolerance plus the storage bound (see `KvDType`).
fn check_against_original(
    cache: &KvCache,
    b: &Batch,
    params: &DecodeParams<'_>,
    originals: &[(Vec<f32>, Vec<f32>)],
    got: &[f32],
) -> Result<(), TestCaseError> {
    let c = cache.config();
    let (d, nkv, dtype) = (c.head_dim, c.n_kv_heads, c.dtype);
    let group = b.n_heads / nkv;
    for (s, &seq) in b.seqs.iter().enumerate() {
        let (k0, v0) = &originals[s];
        let (ks, vs) = read_all(cache, seq);
        let len = cache.seq_len(seq).unwrap();
        if len == 0 {
            continue;
        }
        let kb = storage_bounds(dtype, k0, d);
        let vb = storage_bounds(dtype, v0, d);
        // The documented bound holds element by element.
        for (i, ((&x, &y), &bnd)) in k0
            .iter()
            .zip(&ks)
            .chain(v0.iter().zip(&vs))
            .zip(kb.iter().chain(&vb))
            .enumerate()
        {
            prop_assert!(
                (f64::from(x) - f64::from(y)).abs() <= bnd,
                "{:?}: stored element {} is {} for {} (bound {:e})",
                dtype,
                i,
                y,
                x,
                bnd
            );
        }
        let q = query(b, s, d);
        let r_stored = decode_reference(&q, &ks, &vs, len, b.n_heads, nkv, d, params);
        let r_orig = decode_reference(&q, k0, v0, len, b.n_heads, nkv, d, params);
        for h in 0..b.n_heads {
            let g = h / group;
            // Largest score change: |scale|·Σ_c |q_c|·bound(k_jc).
            let mut ds = 0.0f64;
            for j in 0..len {
                let mut x = 0.0;
                for cc in 0..d {
                    x += f64::from(q[h * d + cc]).abs() * kb[(j * nkv + g) * d + cc];
                }
                ds = ds.max(x * f64::from(params.scale).abs());
            }
            let growth = (2.0 * ds).exp() - 1.0;
            for cc in 0..d {
                let mut dv = 0.0f64;
                let mut vmax = 0.0f64;
                for j in 0..len {
                    let e = (j * nkv + g) * d + cc;
                    dv = dv.max(vb[e]);
                    vmax = vmax.max(f64::from(v0[e]).abs());
                }
                let i = h * d + cc;
                let tol = tolerance(&r_stored, h, i, len, d) + dv + growth * vmax * (1.0 + 1e-12);
                let gv = got[(s * b.n_heads + h) * d + cc];
                let err = (f64::from(gv) - r_orig.out[i]).abs();
                prop_assert!(
                    err <= tol,
                    "{:?} vs original: seq {} head {} col {}: got {} want {} err {:e} > tol {:e}",
                    dtype,
                    s,
                    h,
                    cc,
                    gv,
                    r_orig.out[i],
                    err,
                    tol
                );
            }
        }
    }
    Ok(())
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
                1 => prop::sample::select(vec![31usize, 32, 33, 63, 64, 65]),
            ],
            1..4,
        ),
        prop_oneof![Just(1usize), Just(2), 1usize..4],
        prop_oneof![Just(1usize), Just(2), Just(4), 1usize..8],
        prop_oneof![
            prop::sample::select(vec![1usize, 3, 8, 16, 31, 32, 33, 64]),
            1usize..80,
        ],
        prop_oneof![Just(1usize), Just(16), 1usize..40],
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(lens, nkv, group, d, block_size, bias, seed)| Problem {
            lens,
            nkv,
            group,
            d,
            block_size,
            bias,
            seed,
        })
}

/// Runs a problem on every dtype × layout × ISA × thread count.
fn check_problem(p: &Problem) -> Result<(), TestCaseError> {
    let mut rng = Rng(p.seed);
    let n_heads = p.nkv * p.group;
    let d = p.d;
    let row = p.nkv * d;
    let originals: Vec<(Vec<f32>, Vec<f32>)> = p
        .lens
        .iter()
        .map(|&n| (rng.values(n * row, 1.0), rng.values(n * row, 1.0)))
        .collect();
    let (q, q_layout, _) = operand(&mut rng, p.lens.len(), n_heads, d, 1.5);
    // The batch dimension of the query: `operand` made a [1, batch, ...] operand; use its
    // sequence stride as the batch stride.
    let q_layout = HeadLayout {
        batch_stride: q_layout.seq_stride,
        seq_stride: 0,
        head_stride: q_layout.head_stride,
    };
    let table: Vec<f32> = (0..32 * n_heads).map(|_| rng.unit() * 2.0).collect();
    let params = DecodeParams {
        scale: 1.0 / (d as f32).sqrt(),
        bias: p.bias.then_some(RelativeBias {
            table: &table,
            num_buckets: 32,
            max_distance: 128,
            bidirectional: false,
        }),
    };
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
            let mut cache = KvCache::new(config(dtype, layout, p.nkv, d)).unwrap();
            // A freed sequence first, so that slots and pages are reused.
            let junk = cache.add_sequence().unwrap();
            let jk = rng.values(row, 3.0);
            append_dense(&mut cache, junk, &jk, &jk, &mut rng, 3);
            cache.free_sequence(junk).unwrap();
            let mut seqs = Vec::new();
            for (k0, v0) in &originals {
                let s = cache.add_sequence().unwrap();
                append_dense(&mut cache, s, k0, v0, &mut rng, 17);
                seqs.push(s);
            }
            let b = Batch {
                seqs,
                n_heads,
                q: q.clone(),
                q_layout,
            };
            let mut first: Option<Vec<f32>> = None;
            for opts in all_options() {
                let got = decode(&cache, &b, &params, &opts);
                let what = format!(
                    "{dtype:?} {layout:?} {opts:?} d={d} heads={n_heads}/{}",
                    p.nkv
                );
                check_against_stored(&cache, &b, &params, &got, &what)?;
                // One vs two threads: bit-identical.
                if opts.parallelism != Parallelism::Sequential {
                    prop_assert_eq!(
                        bits(first.as_ref().unwrap()),
                        bits(&got),
                        "{}: threads differ",
                        what
                    );
                } else {
                    first = Some(got.clone());
                }
                if opts.isa == Some(Isa::detect()) && opts.parallelism == Parallelism::Sequential {
                    check_against_original(&cache, &b, &params, &originals, &got)?;
                    results.push(bits(&got));
                }
            }
        }
        // Paged storage gives exactly the contiguous result (chunking is by key position).
        prop_assert_eq!(
            &results[0],
            &results[1],
            "{:?}: paged differs from contiguous",
            dtype
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn decode_matches_reference(p in problem()) {
        check_problem(&p)?;
    }

    /// Appending token by token stores exactly what appending in chunks stores, and decodes
    /// to exactly the same output.
    #[test]
    fn token_by_token_equals_chunked(
        n in 1usize..70,
        nkv in 1usize..4,
        d in 1usize..70,
        block_size in 1usize..20,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let k = rng.values(n * nkv * d, 1.0);
        let v = rng.values(n * nkv * d, 1.0);
        for dtype in DTYPES {
            let layout = KvLayout::Paged { block_size, num_blocks: 2 * n.div_ceil(block_size) };
            let mut cache = KvCache::new(config(dtype, layout, nkv, d)).unwrap();
            let a = cache.add_sequence().unwrap();
            let b = cache.add_sequence().unwrap();
            append_dense(&mut cache, a, &k, &v, &mut rng, 1);
            append_dense(&mut cache, b, &k, &v, &mut rng, n);
            let (ka, va) = read_all(&cache, a);
            let (kb, vb) = read_all(&cache, b);
            prop_assert_eq!(bits(&ka), bits(&kb));
            prop_assert_eq!(bits(&va), bits(&vb));
            let n_heads = nkv * 2;
            let (q, ql, _) = operand(&mut rng, 1, n_heads, d, 1.0);
            let ql = HeadLayout { batch_stride: 0, ..ql };
            let params = DecodeParams::new(d);
            let opts = DecodeOptions::default();
            let oa = decode(&cache, &Batch { seqs: vec![a], n_heads, q: q.clone(), q_layout: ql }, &params, &opts);
            let ob = decode(&cache, &Batch { seqs: vec![b], n_heads, q, q_layout: ql }, &params, &opts);
            prop_assert_eq!(bits(&oa), bits(&ob));
        }
    }

    /// Generation: append a token, decode it; row by row this is the reference's causal
    /// attention over the whole sequence (with T5's decoder bias when `bias`).
    #[test]
    fn decode_step_by_step_equals_causal_reference(
        n in 1usize..50,
        nkv in 1usize..3,
        group in prop_oneof![Just(1usize), Just(2), Just(4)],
        d in 1usize..48,
        bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let n_heads = nkv * group;
        let k = rng.values(n * nkv * d, 1.0);
        let v = rng.values(n * nkv * d, 1.0);
        let q = rng.values(n * n_heads * d, 1.5);
        let table: Vec<f32> = (0..16 * n_heads).map(|_| rng.unit()).collect();
        let rb = RelativeBias { table: &table, num_buckets: 16, max_distance: 20, bidirectional: false };
        let params = DecodeParams { scale: 0.3, bias: bias.then_some(rb) };
        for dtype in DTYPES {
            for isa in Isa::available() {
                let mut cache = KvCache::new(config(dtype, KvLayout::Paged { block_size: 7, num_blocks: n.div_ceil(7) }, nkv, d)).unwrap();
                let seq = cache.add_sequence().unwrap();
                let mut outs = Vec::new();
                for t in 0..n {
                    let l = HeadLayout::bshd(1, nkv, d);
                    let r = (t * nkv * d)..((t + 1) * nkv * d);
                    cache.append(seq, Heads::new(&k[r.clone()], l), Heads::new(&v[r], l), 1).unwrap();
                    let b = Batch {
                        seqs: vec![seq],
                        n_heads,
                        q: q[t * n_heads * d..][..n_heads * d].to_vec(),
                        q_layout: HeadLayout::bshd(1, n_heads, d),
                    };
                    outs.push(decode(&cache, &b, &params, &DecodeOptions { isa: Some(isa), parallelism: Parallelism::Sequential }));
                }
                let (ks, vs) = read_all(&cache, seq);
                let shape = AttentionShape { batch: 1, q_len: n, kv_len: n, n_heads, n_kv_heads: nkv, head_dim: d };
                let ap = AttentionParams::new(d)
                    .with_scale(params.scale)
                    .causal(0)
                    .with_bias(params.bias.map_or(Bias::None, Bias::Relative));
                let r = reference::attention(
                    &shape,
                    Heads::new(&q, HeadLayout::bshd(n, n_heads, d)),
                    Heads::new(&ks, HeadLayout::bshd(n, nkv, d)),
                    Heads::new(&vs, HeadLayout::bshd(n, nkv, d)),
                    &ap,
                ).unwrap();
                for (t, out) in outs.iter().enumerate() {
                    for h in 0..n_heads {
                        let row = t * n_heads + h;
                        prop_assert_eq!(r.attended[row], t + 1);
                        for c in 0..d {
                            let i = row * d + c;
                            let tol = tolerance(&r, row, i, t + 1, d);
                            let err = (f64::from(out[h * d + c]) - r.out[i]).abs();
                            prop_assert!(err <= tol, "{:?} {:?} step {} head {} col {}: err {:e} > {:e}", dtype, isa, t, h, c, err, tol);
                        }
                    }
                }
            }
        }
    }
}

/// Long sequences: several partitions (merged), partition edges, and a batch mixing them
/// with short ones; every ISA, 1 and 2 threads bit-identical, paged == contiguous.
#[test]
fn long_sequences_across_partitions() {
    for (lens, nkv, group, d, block_size) in [
        (vec![PARTITION + 1, 5, 2 * PARTITION + 37], 1, 4, 64, 16),
        (vec![PARTITION - 1, PARTITION, 0], 2, 1, 40, 33),
        // Several key/value heads in 16-token blocks: the decode tasks walk every head of
        // a page in turn, and their partition records interleave across heads.
        (vec![2 * PARTITION + 5, 3, PARTITION + 17], 3, 2, 24, 16),
    ] {
        let p = Problem {
            lens,
            nkv,
            group,
            d,
            block_size,
            bias: true,
            seed: 7,
        };
        check_problem(&p).unwrap();
    }
}

/// Large scores: the chunk maximum grows by a lot from chunk to chunk, so the online
/// rescale takes tiny factors; and scores are equal (ties) elsewhere.
#[test]
fn extreme_scores() {
    let d = 16;
    let n = 200;
    let mut k = vec![0.0f32; n * d];
    let v: Vec<f32> = (0..n * d).map(|i| (i % 7) as f32 - 3.0).collect();
    for j in 0..n {
        k[j * d] = j as f32 * 0.5; // score grows with j
    }
    let q: Vec<f32> = (0..d).map(|c| if c == 0 { 20.0 } else { 0.0 }).collect();
    for dtype in DTYPES {
        let mut cache = KvCache::new(config(
            dtype,
            KvLayout::Contiguous {
                max_seqs: 1,
                max_len: n,
            },
            1,
            d,
        ))
        .unwrap();
        let s = cache.add_sequence().unwrap();
        let l = HeadLayout::bshd(n, 1, d);
        cache
            .append(s, Heads::new(&k, l), Heads::new(&v, l), n)
            .unwrap();
        let b = Batch {
            seqs: vec![s],
            n_heads: 1,
            q: q.clone(),
            q_layout: HeadLayout::bshd(1, 1, d),
        };
        let params = DecodeParams {
            scale: 1.0,
            bias: None,
        };
        for opts in all_options() {
            let got = decode(&cache, &b, &params, &opts);
            check_against_stored(&cache, &b, &params, &got, "extreme").unwrap();
            assert!(got.iter().all(|x| x.is_finite()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bookkeeping and bad input: a clear Err, and the cache unchanged.

/// Everything observable about a cache's live sequences: the free blocks, and each
/// sequence's length and stored K and V bits.
type Snapshot = (usize, Vec<(usize, Vec<u32>, Vec<u32>)>);

fn snapshot(cache: &KvCache, seqs: &[SeqId]) -> Snapshot {
    let s = seqs
        .iter()
        .map(|&s| {
            let (k, v) = read_all(cache, s);
            (cache.seq_len(s).unwrap(), bits(&k), bits(&v))
        })
        .collect();
    (cache.free_blocks(), s)
}

fn dense_heads(x: &[f32], n: usize, nkv: usize, d: usize) -> Heads<'_, f32> {
    Heads::new(x, HeadLayout::bshd(n, nkv, d))
}

#[test]
fn config_is_validated() {
    let ok = config(
        KvDType::F16,
        KvLayout::Paged {
            block_size: 16,
            num_blocks: 4,
        },
        2,
        64,
    );
    assert_eq!(KvCache::new(ok).unwrap().config(), &ok);
    let bad = [
        KvCacheConfig {
            n_kv_heads: 0,
            ..ok
        },
        KvCacheConfig { head_dim: 0, ..ok },
        KvCacheConfig {
            head_dim: tessera_core::attention::MAX_HEAD_DIM + 1,
            ..ok
        },
        KvCacheConfig {
            layout: KvLayout::Paged {
                block_size: 0,
                num_blocks: 4,
            },
            ..ok
        },
        KvCacheConfig {
            layout: KvLayout::Paged {
                block_size: 16,
                num_blocks: 0,
            },
            ..ok
        },
        KvCacheConfig {
            layout: KvLayout::Contiguous {
                max_seqs: 0,
                max_len: 4,
            },
            ..ok
        },
        KvCacheConfig {
            layout: KvLayout::Contiguous {
                max_seqs: 4,
                max_len: 0,
            },
            ..ok
        },
        // Overflowing sizes.
        KvCacheConfig {
            layout: KvLayout::Paged {
                block_size: usize::MAX / 2,
                num_blocks: 4,
            },
            ..ok
        },
        KvCacheConfig {
            layout: KvLayout::Contiguous {
                max_seqs: 1 << 31,
                max_len: 1 << 31,
            },
            ..ok
        },
        // Fits usize but not memory: an error, not an abort.
        KvCacheConfig {
            layout: KvLayout::Paged {
                block_size: 1 << 20,
                num_blocks: 1 << 20,
            },
            ..ok
        },
        KvCacheConfig {
            layout: KvLayout::Paged {
                block_size: 1,
                num_blocks: 1 << 33,
            },
            ..ok
        },
    ];
    for c in bad {
        assert!(KvCache::new(c).is_err(), "{c:?} accepted");
    }
}

#[test]
fn contiguous_slots_and_capacity() {
    let (nkv, d) = (2, 5);
    let mut rng = Rng(3);
    for dtype in DTYPES {
        let mut cache = KvCache::new(config(
            dtype,
            KvLayout::Contiguous {
                max_seqs: 2,
                max_len: 6,
            },
            nkv,
            d,
        ))
        .unwrap();
        assert_eq!(cache.free_blocks(), 2);
        let a = cache.add_sequence().unwrap();
        let b = cache.add_sequence().unwrap();
        assert_eq!(cache.free_blocks(), 0);
        assert!(cache.add_sequence().is_err());
        let k = rng.values(7 * nkv * d, 1.0);
        cache
            .append(
                a,
                dense_heads(&k[..4 * nkv * d], 4, nkv, d),
                dense_heads(&k[..4 * nkv * d], 4, nkv, d),
                4,
            )
            .unwrap();
        cache
            .append(
                b,
                dense_heads(&k[..nkv * d], 1, nkv, d),
                dense_heads(&k[..nkv * d], 1, nkv, d),
                1,
            )
            .unwrap();
        let before = snapshot(&cache, &[a, b]);
        // 4 + 3 > max_len 6: refused, nothing written.
        let r = cache.append(
            a,
            dense_heads(&k[..3 * nkv * d], 3, nkv, d),
            dense_heads(&k[..3 * nkv * d], 3, nkv, d),
            3,
        );
        assert!(r.is_err());
        assert_eq!(snapshot(&cache, &[a, b]), before);
        // Exactly full is fine.
        cache
            .append(
                a,
                dense_heads(&k[..2 * nkv * d], 2, nkv, d),
                dense_heads(&k[..2 * nkv * d], 2, nkv, d),
                2,
            )
            .unwrap();
        assert_eq!(cache.seq_len(a).unwrap(), 6);
        cache.free_sequence(a).unwrap();
        assert_eq!(cache.free_blocks(), 1);
        assert!(cache.seq_len(a).is_err());
        assert!(cache.free_sequence(a).is_err());
        let c = cache.add_sequence().unwrap();
        assert_ne!(c, a);
        assert_eq!(cache.seq_len(c).unwrap(), 0);
        // The stale id does not name the new sequence in its old slot.
        assert!(cache.seq_len(a).is_err());
        let (kc, _) = read_all(&cache, c);
        assert!(kc.is_empty());
    }
}

#[test]
fn paged_blocks_are_reused_after_free() {
    let (nkv, d, bs) = (1, 8, 4);
    let mut rng = Rng(11);
    for dtype in DTYPES {
        let mut cache = KvCache::new(config(
            dtype,
            KvLayout::Paged {
                block_size: bs,
                num_blocks: 5,
            },
            nkv,
            d,
        ))
        .unwrap();
        let other = cache.add_sequence().unwrap();
        let ko = rng.values(3 * d, 1.0);
        append_dense(&mut cache, other, &ko, &ko, &mut rng, 3);
        assert_eq!(cache.free_blocks(), 4);
        let a = cache.add_sequence().unwrap();
        let ka = rng.values(16 * d, 1.0);
        append_dense(&mut cache, a, &ka, &ka, &mut rng, 5);
        assert_eq!(cache.free_blocks(), 0);
        // A full pool: one more token for either sequence is refused and changes nothing.
        let before = snapshot(&cache, &[other, a]);
        let one = rng.values(d, 1.0);
        assert!(
            cache
                .append(a, dense_heads(&one, 1, 1, d), dense_heads(&one, 1, 1, d), 1)
                .is_err()
        );
        // `other` still has room in its last block.
        cache
            .append(
                other,
                dense_heads(&one, 1, 1, d),
                dense_heads(&one, 1, 1, d),
                1,
            )
            .unwrap();
        assert!(
            cache
                .append(
                    other,
                    dense_heads(&one, 1, 1, d),
                    dense_heads(&one, 1, 1, d),
                    1
                )
                .is_err()
        );
        let mut before_other = before.1[0].clone();
        before_other.0 += 1;
        let (ko2, _) = read_all(&cache, other);
        assert_eq!(&bits(&ko2)[..3 * d], &before_other.1[..]);
        // Free `a`: its 4 blocks come back and serve a new sequence of the same size.
        cache.free_sequence(a).unwrap();
        assert_eq!(cache.free_blocks(), 4);
        let b = cache.add_sequence().unwrap();
        let kb = rng.values(16 * d, 2.0);
        let vb = rng.values(16 * d, 2.0);
        append_dense(&mut cache, b, &kb, &vb, &mut rng, 16);
        assert_eq!(cache.free_blocks(), 0);
        assert!(cache.seq_len(a).is_err());
        // b's contents are its own values (stored), other's are unchanged.
        let mut fresh = KvCache::new(config(
            dtype,
            KvLayout::Paged {
                block_size: bs,
                num_blocks: 4,
            },
            nkv,
            d,
        ))
        .unwrap();
        let fb = fresh.add_sequence().unwrap();
        append_dense(&mut fresh, fb, &kb, &vb, &mut rng, 16);
        assert_eq!(bits(&read_all(&cache, b).0), bits(&read_all(&fresh, fb).0));
        assert_eq!(bits(&read_all(&cache, b).1), bits(&read_all(&fresh, fb).1));
        assert_eq!(
            bits(&read_all(&cache, other).0)[..3 * d],
            before_other.1[..]
        );
    }
}

#[test]
fn bad_input_is_an_error_and_changes_nothing() {
    let (nkv, d) = (2, 8);
    let mut rng = Rng(5);
    for dtype in DTYPES {
        for layout in [
            KvLayout::Contiguous {
                max_seqs: 3,
                max_len: 20,
            },
            KvLayout::Paged {
                block_size: 3,
                num_blocks: 12,
            },
        ] {
            let mut cache = KvCache::new(config(dtype, layout, nkv, d)).unwrap();
            let a = cache.add_sequence().unwrap();
            let b = cache.add_sequence().unwrap();
            let ka = rng.values(7 * nkv * d, 1.0);
            let kb = rng.values(4 * nkv * d, 1.0);
            append_dense(&mut cache, a, &ka, &ka, &mut rng, 3);
            append_dense(&mut cache, b, &kb, &kb, &mut rng, 3);
            let dead = cache.add_sequence().unwrap();
            cache.free_sequence(dead).unwrap();
            let before = snapshot(&cache, &[a, b]);
            let x = rng.values(5 * nkv * d, 1.0);
            // Too short for its layout.
            assert!(
                cache
                    .append(
                        a,
                        dense_heads(&x[..5 * nkv * d - 1], 5, nkv, d),
                        dense_heads(&x, 5, nkv, d),
                        5
                    )
                    .is_err()
            );
            assert!(
                cache
                    .append(
                        a,
                        dense_heads(&x, 5, nkv, d),
                        dense_heads(&x[..3], 5, nkv, d),
                        5
                    )
                    .is_err()
            );
            // Overflowing layout / token count.
            let huge = HeadLayout {
                batch_stride: 0,
                seq_stride: usize::MAX / 2,
                head_stride: d,
            };
            assert!(
                cache
                    .append(a, Heads::new(&x, huge), Heads::new(&x, huge), 5)
                    .is_err()
            );
            assert!(
                cache
                    .append(
                        a,
                        dense_heads(&x, 5, nkv, d),
                        dense_heads(&x, 5, nkv, d),
                        usize::MAX
                    )
                    .is_err()
            );
            // Past the capacity.
            let big = rng.values(40 * nkv * d, 1.0);
            assert!(
                cache
                    .append(
                        b,
                        dense_heads(&big, 40, nkv, d),
                        dense_heads(&big, 40, nkv, d),
                        40
                    )
                    .is_err()
            );
            // Stale and foreign ids.
            assert!(
                cache
                    .append(
                        dead,
                        dense_heads(&x, 5, nkv, d),
                        dense_heads(&x, 5, nkv, d),
                        5
                    )
                    .is_err()
            );
            let mut foreign = KvCache::new(config(
                dtype,
                KvLayout::Paged {
                    block_size: 3,
                    num_blocks: 30,
                },
                nkv,
                d,
            ))
            .unwrap();
            let fid = (0..4)
                .map(|_| foreign.add_sequence().unwrap())
                .last()
                .unwrap();
            assert!(cache.seq_len(fid).is_err());
            assert!(
                cache
                    .append(
                        fid,
                        dense_heads(&x, 5, nkv, d),
                        dense_heads(&x, 5, nkv, d),
                        5
                    )
                    .is_err()
            );
            assert!(cache.seq_len(dead).is_err());
            assert!(cache.free_sequence(dead).is_err());
            // Wrong read lengths.
            let n = 7 * nkv * d;
            let (mut ko, mut vo) = (vec![0.0; n + 1], vec![0.0; n]);
            assert!(cache.read(a, &mut ko, &mut vo).is_err());
            assert!(cache.read(a, &mut ko[..n - 1], &mut vo).is_err());
            assert!(cache.read(dead, &mut ko[..0], &mut vo[..0]).is_err());
            // Zero tokens: fine, nothing changes.
            cache
                .append(
                    a,
                    dense_heads(&[], 0, nkv, d),
                    dense_heads(&[], 0, nkv, d),
                    0,
                )
                .unwrap();
            assert_eq!(snapshot(&cache, &[a, b]), before);

            // Decode: bad head counts, ids, operands; the output is not written.
            let n_heads = 4;
            let q = rng.values(2 * n_heads * d, 1.0);
            let ql = HeadLayout::bshd(1, n_heads, d);
            let ol = HeadLayout::bshd(1, n_heads, d);
            let mut out = vec![7.0f32; 2 * n_heads * d];
            let p = DecodeParams::new(d);
            let run = |cache: &KvCache,
                       seqs: &[SeqId],
                       nh: usize,
                       q: &[f32],
                       ql,
                       out: &mut [f32],
                       ol,
                       p: &DecodeParams<'_>| {
                kv_cache::decode_attention(
                    cache,
                    seqs,
                    nh,
                    Heads::new(q, ql),
                    HeadsMut::new(out, ol),
                    p,
                    Parallelism::Sequential,
                )
            };
            assert!(run(&cache, &[a, b], 3, &q, ql, &mut out, ol, &p).is_err());
            assert!(
                run(
                    &cache,
                    &[a, b],
                    0,
                    &q,
                    HeadLayout::bshd(1, 0, d),
                    &mut out,
                    HeadLayout::bshd(1, 0, d),
                    &p
                )
                .is_err()
            );
            assert!(run(&cache, &[a, a], n_heads, &q, ql, &mut out, ol, &p).is_err());
            assert!(run(&cache, &[a, dead], n_heads, &q, ql, &mut out, ol, &p).is_err());
            assert!(
                run(
                    &cache,
                    &[a, b],
                    n_heads,
                    &q[..q.len() - 1],
                    ql,
                    &mut out,
                    ol,
                    &p
                )
                .is_err()
            );
            let mut short = vec![7.0f32; out.len() - 1];
            assert!(run(&cache, &[a, b], n_heads, &q, ql, &mut short, ol, &p).is_err());
            let overlap = HeadLayout {
                batch_stride: 1,
                seq_stride: 0,
                head_stride: d,
            };
            assert!(run(&cache, &[a, b], n_heads, &q, ql, &mut out, overlap, &p).is_err());
            let table = vec![0.0f32; 31 * n_heads];
            let bad_bias = DecodeParams {
                scale: 1.0,
                bias: Some(RelativeBias {
                    table: &table,
                    num_buckets: 32,
                    max_distance: 128,
                    bidirectional: false,
                }),
            };
            assert!(run(&cache, &[a, b], n_heads, &q, ql, &mut out, ol, &bad_bias).is_err());
            assert!(out.iter().all(|&x| x == 7.0));
            assert!(short.iter().all(|&x| x == 7.0));
            // An unavailable ISA is an error.
            for isa in Isa::ALL.into_iter().filter(|i| !i.is_available()) {
                let r = kv_cache::decode_attention_with(
                    &DecodeOptions {
                        isa: Some(isa),
                        parallelism: Parallelism::Sequential,
                    },
                    &cache,
                    &[a, b],
                    n_heads,
                    Heads::new(&q, ql),
                    HeadsMut::new(&mut out, ol),
                    &p,
                );
                assert!(matches!(r, Err(Error::IsaUnavailable { .. })), "{r:?}");
            }
            // The empty batch is fine.
            run(&cache, &[], n_heads, &[], ql, &mut [], ol, &p).unwrap();
            assert_eq!(snapshot(&cache, &[a, b]), before);
        }
    }
}

#[test]
fn ids_from_another_slot_generation_are_stale() {
    let mut cache = KvCache::new(config(
        KvDType::F32,
        KvLayout::Paged {
            block_size: 2,
            num_blocks: 2,
        },
        1,
        4,
    ))
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..50 {
        let s = cache.add_sequence().unwrap();
        cache.free_sequence(s).unwrap();
        ids.push(s);
    }
    let live = cache.add_sequence().unwrap();
    for s in ids {
        assert!(cache.seq_len(s).is_err());
    }
    assert_eq!(cache.seq_len(live).unwrap(), 0);
    // Many live sequences in a paged cache (no pages until appended).
    let many: Vec<SeqId> = (0..100).map(|_| cache.add_sequence().unwrap()).collect();
    assert_eq!(cache.free_blocks(), 2);
    // Decoding empty sequences gives zeros.
    let q = vec![1.0f32; many.len() * 4];
    let mut out = vec![f32::NAN; many.len() * 4];
    let l = HeadLayout::bshd(1, 1, 4);
    kv_cache::decode_attention(
        &cache,
        &many,
        1,
        Heads::new(&q, l),
        HeadsMut::new(&mut out, l),
        &DecodeParams::new(4),
        Parallelism::Auto,
    )
    .unwrap();
    assert!(out.iter().all(|&x| x == 0.0));
}

/// Non-finite values propagate as in the reference: a NaN key makes its rows NaN (in short
/// and in multi-partition sequences), a NaN value the outputs it reaches (f32 and f16
/// storage; Q8_0 stores NaN as 0), a −∞ bias is a zero weight.
#[test]
fn non_finite_values_propagate() {
    let (nkv, group, d) = (2, 2, 8);
    let n_heads = nkv * group;
    for n in [5, PARTITION + 40] {
        for dtype in DTYPES {
            let mut rng = Rng(n as u64);
            let mut k = rng.values(n * nkv * d, 1.0);
            let mut v = rng.values(n * nkv * d, 1.0);
            k[(3 * nkv) * d + 2] = f32::NAN; // key 3, kv head 0
            v[(4 * nkv + 1) * d + 5] = f32::NAN; // key 4, kv head 1, column 5
            let layout = KvLayout::Paged {
                block_size: 16,
                num_blocks: n.div_ceil(16),
            };
            let mut cache = KvCache::new(config(dtype, layout, nkv, d)).unwrap();
            let s = cache.add_sequence().unwrap();
            let l = HeadLayout::bshd(n, nkv, d);
            cache
                .append(s, Heads::new(&k, l), Heads::new(&v, l), n)
                .unwrap();
            let b = Batch {
                seqs: vec![s],
                n_heads,
                q: rng.values(n_heads * d, 1.0),
                q_layout: HeadLayout::bshd(1, n_heads, d),
            };
            for opts in all_options() {
                let got = decode(&cache, &b, &DecodeParams::new(d), &opts);
                for h in 0..n_heads {
                    for c in 0..d {
                        let x = got[h * d + c];
                        // GGML's Q8_0 quantizer stores a NaN as 0.
                        let want_nan = dtype != KvDType::Q8_0 && (h / group == 0 || c == 5);
                        assert_eq!(
                            x.is_nan(),
                            want_nan,
                            "{dtype:?} {opts:?} n={n} head {h} col {c}: {x}"
                        );
                    }
                }
            }
        }
    }
    // A −∞ bias entry: weight 0, finite output, within the reference's tolerance.
    let d = 4;
    let n = 40;
    let mut rng = Rng(9);
    let k = rng.values(n * d, 1.0);
    let v = rng.values(n * d, 1.0);
    let mut table = vec![0.5f32; 32];
    table[0] = f32::NEG_INFINITY; // bucket 0: the query's own position
    let params = DecodeParams {
        scale: 1.0,
        bias: Some(RelativeBias {
            table: &table,
            num_buckets: 32,
            max_distance: 128,
            bidirectional: false,
        }),
    };
    let mut cache = KvCache::new(config(
        KvDType::F32,
        KvLayout::Contiguous {
            max_seqs: 1,
            max_len: n,
        },
        1,
        d,
    ))
    .unwrap();
    let s = cache.add_sequence().unwrap();
    let l = HeadLayout::bshd(n, 1, d);
    cache
        .append(s, Heads::new(&k, l), Heads::new(&v, l), n)
        .unwrap();
    let b = Batch {
        seqs: vec![s],
        n_heads: 1,
        q: rng.values(d, 1.0),
        q_layout: HeadLayout::bshd(1, 1, d),
    };
    for opts in all_options() {
        let got = decode(&cache, &b, &params, &opts);
        assert!(got.iter().all(|x| x.is_finite()));
        // The reference's sensitivities are NaN here (|bias| = ∞ times a zero weight): compare
        // with a plain bound instead (the scores are O(1), the weights of 39 keys).
        let r = decode_reference(&b.q, &k, &v, n, 1, 1, d, &params);
        for (c, (&x, &want)) in got.iter().zip(&r.out).enumerate() {
            assert!(
                (f64::from(x) - want).abs() <= 1e-5,
                "col {c}: {x} vs {want}"
            );
        }
    }
}
