//! Property tests of the fused attention: every available ISA × K/V dtype × option
//! combination against `tessera_core::reference::attention`, plus invariances that must hold
//! exactly (thread count, padding, chunked causal prefill, GQA vs repeated heads) and bad
//! input.
//!
//! Tolerance (derived, not tuned). Write `p_j = exp(s_j − m)` for the exact softmax weights of
//! a row and `σ_j = scale·Σ_c|q_c k_jc| + |bias_j| + |s_j − m|`. The kernel computes each score
//! as a length-d f32 dot product of pre-scaled queries plus the bias and the padding mask, and
//! subtracts the running maximum: an absolute error of at most γ_{d+6}·σ_j, which becomes a
//! relative error of the same size in `p_j` (|e^δ − 1| ≤ 1.01·|δ| for the tiny δ here, folded
//! into the next γ). Each `exp` (of a score, and of every rescaling of the running sums, at most
//! one per key) adds `EXP_REL_ERR`; summing the row's weights and the weighted values in f32
//! adds γ_{kv+8} relative to `Σ p_j|v_j|`. With `o = N/D`, first-order error propagation gives
//!
//! |o − o_ref| ≤ γ_{d+6}·(Σ p_j|v_j|σ_j + |o|·Σ p_jσ_j)/D + 2·((kv+1)·EXP_REL_ERR + γ_{kv+8})·Σ p_j|v_j|/D
//!
//! which is `γ_{d+6}·(sensitivity + magnitude·row_sensitivity) + 2·(…)·magnitude` in the
//! reference's terms, doubled for the second-order terms, plus the f32 rounding of the result
//! and an underflow floor (weights below 2⁻¹²⁶ flush to zero: at most kv·2⁻¹²⁶·max|v|).

use half::{bf16, f16};
use proptest::prelude::*;
use tessera_core::attention::{
    AttentionParams, AttentionShape, Bias, HeadLayout, Heads, HeadsMut, KeyPadding, RelativeBias,
};
use tessera_core::{Element, Error, reference};
use tessera_cpu::attention::{self, AttentionOptions, EXP_REL_ERR};
use tessera_cpu::{Isa, Parallelism};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(j: usize) -> f64 {
    let ju = j as f64 * U;
    ju / (1.0 - ju)
}

#[derive(Debug, Clone, Copy)]
enum PadKind {
    None,
    Lengths,
    Mask,
}

#[derive(Debug, Clone, Copy)]
enum BiasKind {
    None,
    Dense {
        broadcast_batch: bool,
        broadcast_q: bool,
    },
    Relative {
        buckets: usize,
        max_distance: usize,
        bidirectional: bool,
    },
}

/// One attention problem with its data; every layout has optional gaps.
#[derive(Debug, Clone)]
struct Case {
    shape: AttentionShape,
    /// Per operand (Q, K, V, O): heads-major (`[b, h, s, d]`) or tokens-major, and a gap.
    layouts: [(bool, usize); 4],
    scale: f32,
    causal: bool,
    q_offset: usize,
    pad: PadKind,
    lengths: Vec<usize>,
    mask: Vec<bool>,
    bias_kind: BiasKind,
    bias: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn layout(heads_major: bool, gap: usize, seq: usize, heads: usize, d: usize) -> HeadLayout {
    let row = d + gap;
    if heads_major {
        HeadLayout {
            batch_stride: heads * (seq * row + gap) + gap,
            seq_stride: row,
            head_stride: seq * row + gap,
        }
    } else {
        HeadLayout {
            batch_stride: seq * (heads * row + gap) + gap,
            seq_stride: heads * row + gap,
            head_stride: row,
        }
    }
}

impl Case {
    fn layout(&self, which: usize) -> HeadLayout {
        let s = &self.shape;
        let (seq, heads) = match which {
            1 | 2 => (s.kv_len, s.n_kv_heads),
            _ => (s.q_len, s.n_heads),
        };
        let (hm, gap) = self.layouts[which];
        layout(hm, gap, seq, heads, s.head_dim)
    }

    fn len(&self, which: usize) -> usize {
        let s = &self.shape;
        let (seq, heads) = match which {
            1 | 2 => (s.kv_len, s.n_kv_heads),
            _ => (s.q_len, s.n_heads),
        };
        self.layout(which)
            .extent(s.batch, seq, heads, s.head_dim)
            .unwrap()
    }

    fn params(&self) -> AttentionParams<'_> {
        let s = &self.shape;
        let mut p = AttentionParams::new(s.head_dim).with_scale(self.scale);
        if self.causal {
            p = p.causal(self.q_offset);
        } else {
            p.q_offset = self.q_offset;
        }
        p.padding = match self.pad {
            PadKind::None => KeyPadding::None,
            PadKind::Lengths => KeyPadding::Lengths(&self.lengths),
            PadKind::Mask => KeyPadding::Mask(&self.mask),
        };
        p.bias = match self.bias_kind {
            BiasKind::None => Bias::None,
            BiasKind::Dense {
                broadcast_batch,
                broadcast_q,
            } => {
                let q_stride = if broadcast_q { 0 } else { s.kv_len };
                let head_stride = s.q_len * s.kv_len;
                let batch_stride = if broadcast_batch {
                    0
                } else {
                    s.n_heads * head_stride
                };
                Bias::Dense {
                    data: &self.bias,
                    batch_stride,
                    head_stride,
                    q_stride,
                }
            }
            BiasKind::Relative {
                buckets,
                max_distance,
                bidirectional,
            } => Bias::Relative(RelativeBias {
                table: &self.bias,
                num_buckets: buckets,
                max_distance,
                bidirectional,
            }),
        };
        p
    }
}

/// Sizes around every tile and block edge: MR 4/6/8/12, NR 4/12/16/32, key blocks 64/72,
/// task rows 64/66/72.
fn seq_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..=3,
        3 => prop::sample::select(vec![
            5usize, 6, 7, 11, 12, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 66, 67, 71, 72, 73,
            97, 128, 129,
        ]),
        3 => 1usize..80,
    ]
}

fn head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => prop::sample::select(vec![16usize, 24, 32, 64, 80, 128]),
        1 => prop::sample::select(vec![1usize, 3, 4, 7, 12, 31, 33, 47, 100]),
    ]
}

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

prop_compose! {
    fn case()(
        batch in 1usize..=3,
        q_len in seq_len(),
        kv_len in seq_len(),
        n_kv_heads in 1usize..=3,
        group in prop::sample::select(vec![1usize, 1, 2, 3, 4]),
        head_dim in head_dim(),
        layouts in prop::array::uniform4((any::<bool>(), prop_oneof![3 => Just(0usize), 1 => 1usize..5])),
        scale_kind in 0usize..3,
        causal in any::<bool>(),
        offset_kind in 0usize..3,
        pad_kind in 0usize..3,
        bias_sel in 0usize..4,
        bias_flags in (any::<bool>(), any::<bool>(), any::<bool>()),
        seed in any::<u64>(),
    ) -> Case {
        let n_heads = n_kv_heads * group;
        let shape = AttentionShape { batch, q_len, kv_len, n_heads, n_kv_heads, head_dim };
        let scale = match scale_kind {
            0 => 1.0 / (head_dim as f32).sqrt(),
            1 => 1.0,
            _ => 0.37,
        };
        // Whole sequence, a chunk at the end of a cache, or an arbitrary offset.
        let q_offset = match offset_kind {
            0 => 0,
            1 => kv_len.saturating_sub(q_len),
            _ => (seed % 7) as usize,
        };
        let lengths: Vec<usize> = (0..batch)
            .map(|b| if kv_len == 0 { 0 } else { (seed as usize >> (b * 5)) % (kv_len + 1) })
            .collect();
        let mask: Vec<bool> = values(batch * kv_len, seed ^ 0x55, 1.0)
            .into_iter()
            .map(|x| x > -0.6)
            .collect();
        let pad = [PadKind::None, PadKind::Lengths, PadKind::Mask][pad_kind];
        let (bias_kind, bias_len) = match bias_sel {
            0 | 1 => (BiasKind::None, 0),
            2 => (
                BiasKind::Dense { broadcast_batch: bias_flags.0, broadcast_q: bias_flags.1 },
                batch * n_heads * q_len * kv_len,
            ),
            _ => {
                let buckets = if bias_flags.0 { 32 } else { 8 };
                (
                    BiasKind::Relative {
                        buckets,
                        max_distance: if bias_flags.1 { 128 } else { 20 },
                        bidirectional: bias_flags.2,
                    },
                    buckets * n_heads,
                )
            }
        };
        let mut c = Case {
            shape, layouts, scale, causal, q_offset, pad, lengths, mask, bias_kind,
            bias: values(bias_len, seed ^ 0x77, 3.0),
            q: vec![], k: vec![], v: vec![],
        };
        c.q = values(c.len(0), seed ^ 1, 2.0);
        c.k = values(c.len(1), seed ^ 2, 2.0);
        c.v = values(c.len(2), seed ^ 3, 2.0);
        c
    }
}

/// Runs the kernel; returns the output as dense `[b, q, h, d]`.
fn run<K: Element>(c: &Case, isa: Isa, threads: usize) -> Result<Vec<f32>, Error> {
    let k: Vec<K> = c.k.iter().map(|&x| K::from_f32(x)).collect();
    let v: Vec<K> = c.v.iter().map(|&x| K::from_f32(x)).collect();
    let ol = c.layout(3);
    // Poison the output: every element the kernel owns must be written.
    let mut out = vec![f32::NAN; c.len(3)];
    let opts = AttentionOptions {
        isa: Some(isa),
        parallelism: Parallelism::Threads(threads),
    };
    attention::attention_with(
        &opts,
        &c.shape,
        Heads::new(&c.q, c.layout(0)),
        Heads::new(&k, c.layout(1)),
        Heads::new(&v, c.layout(2)),
        HeadsMut::new(&mut out, ol),
        &c.params(),
    )?;
    let s = &c.shape;
    let mut dense = Vec::with_capacity(s.batch * s.q_len * s.n_heads * s.head_dim);
    for b in 0..s.batch {
        for i in 0..s.q_len {
            for h in 0..s.n_heads {
                dense.extend_from_slice(&out[ol.offset(b, i, h)..][..s.head_dim]);
            }
        }
    }
    Ok(dense)
}

fn check_against_reference<K: Element>(c: &Case) -> Result<(), TestCaseError> {
    let k: Vec<K> = c.k.iter().map(|&x| K::from_f32(x)).collect();
    let v: Vec<K> = c.v.iter().map(|&x| K::from_f32(x)).collect();
    let r = reference::attention(
        &c.shape,
        Heads::new(&c.q, c.layout(0)),
        Heads::new(&k, c.layout(1)),
        Heads::new(&v, c.layout(2)),
        &c.params(),
    )
    .unwrap();
    let s = &c.shape;
    let d = s.head_dim;
    let kv = s.kv_len;
    let vmax = c.v.iter().fold(0.0f64, |a, &x| a.max(f64::from(x).abs()));
    let rel = 2.0 * ((kv + 1) as f64 * f64::from(EXP_REL_ERR) + gamma(kv + 8));
    for isa in Isa::available() {
        let out1 = run::<K>(c, isa, 1).unwrap();
        for (e, (&got, &want)) in out1.iter().zip(&r.out).enumerate() {
            let row = e / d;
            if r.attended[row] == 0 {
                prop_assert_eq!(got, 0.0, "{:?}: fully masked row {} must be zero", isa, row);
                continue;
            }
            let tol = 2.0
                * (gamma(d + 6) * (r.sensitivity[e] + r.magnitude[e] * r.row_sensitivity[row])
                    + rel * r.magnitude[e])
                + U * want.abs()
                + kv as f64 * f64::from(f32::MIN_POSITIVE) * vmax;
            let err = (f64::from(got) - want).abs();
            prop_assert!(
                err <= tol,
                "{:?} {}: element {} (row {}) got {} want {} err {:e} > tol {:e}",
                isa,
                K::DTYPE.name(),
                e,
                row,
                got,
                want,
                err,
                tol
            );
        }
        // Thread count never changes a bit.
        let out3 = run::<K>(c, isa, 3).unwrap();
        prop_assert!(
            out1.iter()
                .zip(&out3)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{:?}: 1 and 3 threads differ",
            isa
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn f32_kv_matches_reference(c in case()) {
        check_against_reference::<f32>(&c)?;
    }

    #[test]
    fn f16_kv_matches_reference(c in case()) {
        check_against_reference::<f16>(&c)?;
    }

    #[test]
    fn bf16_kv_matches_reference(c in case()) {
        check_against_reference::<bf16>(&c)?;
    }

    /// Padding a batch changes no unpadded sequence: each sequence run alone, with only its
    /// own keys, gives bit-identical rows.
    #[test]
    fn padding_does_not_change_sequences(mut c in case()) {
        c.pad = PadKind::Lengths;
        c.bias_kind = BiasKind::None;
        let s = c.shape;
        for isa in Isa::available() {
            let batched = run::<f32>(&c, isa, 2).unwrap();
            let row = s.q_len * s.n_heads * s.head_dim;
            for b in 0..s.batch {
                let len = c.lengths[b];
                let mut alone = Case {
                    shape: AttentionShape { batch: 1, kv_len: len, ..s },
                    layouts: [(false, 0); 4],
                    pad: PadKind::None,
                    lengths: vec![],
                    mask: vec![],
                    bias: vec![],
                    ..c.clone()
                };
                let dk = |src: &[f32], kl: HeadLayout| -> Vec<f32> {
                    let mut out = Vec::new();
                    for j in 0..len {
                        for g in 0..s.n_kv_heads {
                            out.extend_from_slice(&src[kl.offset(b, j, g)..][..s.head_dim]);
                        }
                    }
                    out
                };
                alone.k = dk(&c.k, c.layout(1));
                alone.v = dk(&c.v, c.layout(2));
                let ql = c.layout(0);
                alone.q = Vec::new();
                for i in 0..s.q_len {
                    for h in 0..s.n_heads {
                        alone.q.extend_from_slice(&c.q[ql.offset(b, i, h)..][..s.head_dim]);
                    }
                }
                let single = run::<f32>(&alone, isa, 1).unwrap();
                let part = &batched[b * row..(b + 1) * row];
                prop_assert!(
                    part.iter().zip(&single).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{:?}: sequence {} (length {}) changed by padding", isa, b, len
                );
            }
        }
    }

    /// A causal pass over a whole sequence equals two chunks, the second attending the first
    /// as a cached past (q_offset), bit for bit; and grouped-query attention equals multi-head
    /// attention with each K/V head repeated for its group.
    #[test]
    fn chunked_causal_and_gqa_are_exact(mut c in case(), split in 0usize..100) {
        let s = c.shape;
        c.causal = true;
        c.q_offset = 0;
        c.pad = PadKind::None;
        if let BiasKind::Dense { .. } = c.bias_kind {
            c.bias_kind = BiasKind::None;
        }
        c.layouts = [(false, 0); 4];
        c.shape.kv_len = s.q_len;
        c.k = values(c.len(1), 11, 2.0);
        c.v = values(c.len(2), 12, 2.0);
        let s = c.shape;
        let hd = s.n_heads * s.head_dim;
        for isa in Isa::available() {
            let whole = run::<f32>(&c, isa, 1).unwrap();
            let cut = if s.q_len == 0 { 0 } else { split % (s.q_len + 1) };
            for (lo, hi) in [(0, cut), (cut, s.q_len)] {
                // Queries lo..hi over keys 0..hi, one batch entry at a time.
                for b in 0..s.batch {
                    let mut part = Case {
                        shape: AttentionShape { batch: 1, q_len: hi - lo, kv_len: hi, ..s },
                        q_offset: lo,
                        ..c.clone()
                    };
                    let kvrow = s.n_kv_heads * s.head_dim;
                    part.q = c.q[(b * s.q_len + lo) * hd..(b * s.q_len + hi) * hd].to_vec();
                    part.k = c.k[b * s.kv_len * kvrow..][..hi * kvrow].to_vec();
                    part.v = c.v[b * s.kv_len * kvrow..][..hi * kvrow].to_vec();
                    let got = run::<f32>(&part, isa, 2).unwrap();
                    let want = &whole[(b * s.q_len + lo) * hd..(b * s.q_len + hi) * hd];
                    prop_assert!(
                        got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{:?}: chunk {}..{} differs from the whole pass", isa, lo, hi
                    );
                }
            }
            // GQA vs MHA with repeated K/V heads.
            let group = s.n_heads / s.n_kv_heads;
            if group > 1 {
                let mut mha = c.clone();
                mha.shape.n_kv_heads = s.n_heads;
                let repeat = |src: &[f32]| -> Vec<f32> {
                    let mut out = Vec::new();
                    for t in 0..s.batch * s.kv_len {
                        for h in 0..s.n_heads {
                            let g = h / group;
                            out.extend_from_slice(&src[(t * s.n_kv_heads + g) * s.head_dim..][..s.head_dim]);
                        }
                    }
                    out
                };
                mha.k = repeat(&c.k);
                mha.v = repeat(&c.v);
                let got = run::<f32>(&mha, isa, 1).unwrap();
                prop_assert!(
                    got.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{:?}: GQA differs from repeated-head MHA", isa
                );
            }
        }
    }
}

fn simple(
    shape: AttentionShape,
    q_len_elems: usize,
    kv_elems: usize,
    params: &AttentionParams<'_>,
) -> Result<(), Error> {
    let q = vec![0.5f32; q_len_elems];
    let k = vec![0.25f32; kv_elems];
    let mut o = vec![0.0f32; q_len_elems];
    let ql = HeadLayout::bshd(shape.q_len, shape.n_heads, shape.head_dim);
    let kl = HeadLayout::bshd(shape.kv_len, shape.n_kv_heads, shape.head_dim);
    attention::attention(
        &shape,
        Heads::new(&q, ql),
        Heads::new(&k, kl),
        Heads::new(&k, kl),
        HeadsMut::new(&mut o, ql),
        params,
        Parallelism::Sequential,
    )
}

#[test]
fn bad_input_is_an_error() {
    let shape = AttentionShape {
        batch: 2,
        q_len: 3,
        kv_len: 5,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
    };
    let p = AttentionParams::new(8);
    let (qe, ke) = (2 * 3 * 4 * 8, 2 * 5 * 2 * 8);
    assert!(simple(shape, qe, ke, &p).is_ok());
    // Heads not divisible.
    let bad = AttentionShape {
        n_kv_heads: 3,
        ..shape
    };
    assert!(matches!(
        simple(bad, qe, 2 * 5 * 3 * 8, &p),
        Err(Error::InvalidArgument(_))
    ));
    let bad = AttentionShape {
        n_kv_heads: 0,
        ..shape
    };
    assert!(simple(bad, qe, 0, &p).is_err());
    // Short slices.
    assert!(simple(shape, qe, ke - 1, &p).is_err());
    assert!(simple(shape, qe - 1, ke, &p).is_err());
    // head_dim 0 or too large.
    let bad = AttentionShape {
        head_dim: 0,
        ..shape
    };
    assert!(simple(bad, 0, 0, &p).is_err());
    // Padding and bias of the wrong size.
    let lens = [5usize, 6];
    assert!(simple(shape, qe, ke, &p.with_padding(KeyPadding::Lengths(&lens))).is_err());
    let lens = [5usize];
    assert!(simple(shape, qe, ke, &p.with_padding(KeyPadding::Lengths(&lens))).is_err());
    let mask = [true; 9];
    assert!(simple(shape, qe, ke, &p.with_padding(KeyPadding::Mask(&mask))).is_err());
    let bias = vec![0.0f32; 4 * 3 * 5 - 1];
    let dense = Bias::Dense {
        data: &bias,
        batch_stride: 0,
        head_stride: 15,
        q_stride: 5,
    };
    assert!(simple(shape, qe, ke, &p.with_bias(dense)).is_err());
    let table = vec![0.0f32; 31 * 4];
    let rel = Bias::Relative(RelativeBias {
        table: &table,
        num_buckets: 32,
        max_distance: 128,
        bidirectional: true,
    });
    assert!(simple(shape, qe, ke, &p.with_bias(rel)).is_err());
    // Overflowing strides.
    let q = vec![0.0f32; qe];
    let mut o = vec![0.0f32; qe];
    let huge = HeadLayout {
        batch_stride: usize::MAX / 2,
        seq_stride: 32,
        head_stride: 8,
    };
    let ql = HeadLayout::bshd(3, 4, 8);
    let kl = HeadLayout::bshd(5, 2, 8);
    let k = vec![0.0f32; ke];
    let r = attention::attention(
        &shape,
        Heads::new(&q, ql),
        Heads::new(&k, huge),
        Heads::new(&k, kl),
        HeadsMut::new(&mut o, ql),
        &p,
        Parallelism::Sequential,
    );
    assert!(r.is_err());
    // An output layout that overlaps itself.
    let overlapping = HeadLayout {
        batch_stride: 96,
        seq_stride: 32,
        head_stride: 4,
    };
    let r = attention::attention(
        &shape,
        Heads::new(&q, ql),
        Heads::new(&k, kl),
        Heads::new(&k, kl),
        HeadsMut::new(&mut o, overlapping),
        &p,
        Parallelism::Sequential,
    );
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}

#[test]
fn unavailable_isa_is_an_error() {
    for isa in Isa::ALL {
        if isa.is_available() {
            continue;
        }
        let shape = AttentionShape {
            batch: 1,
            q_len: 1,
            kv_len: 1,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let x = [1.0f32; 4];
        let mut o = [0.0f32; 4];
        let l = HeadLayout::bshd(1, 1, 4);
        let r = attention::attention_with(
            &AttentionOptions {
                isa: Some(isa),
                parallelism: Parallelism::Sequential,
            },
            &shape,
            Heads::new(&x, l),
            Heads::new(&x, l),
            Heads::new(&x, l),
            HeadsMut::new(&mut o, l),
            &AttentionParams::new(4),
        );
        assert!(
            matches!(r, Err(Error::IsaUnavailable { .. })),
            "{isa:?}: {r:?}"
        );
    }
}

#[test]
fn masked_rows_are_zero_and_large_scores_stay_finite() {
    // Causal with q_offset 0 and all keys of sequence 1 padded: sequence 1's rows have no
    // key; huge scores (|s| ~ 1e4) must not overflow the softmax.
    let shape = AttentionShape {
        batch: 2,
        q_len: 7,
        kv_len: 70,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 16,
    };
    let q = values(2 * 7 * 2 * 16, 5, 30.0);
    let k = values(2 * 70 * 16, 6, 30.0);
    let v = values(2 * 70 * 16, 7, 1.0);
    let lens = [70usize, 0];
    let p = AttentionParams::new(16)
        .with_scale(1.0)
        .with_padding(KeyPadding::Lengths(&lens));
    for isa in Isa::available() {
        let mut o = vec![f32::NAN; q.len()];
        attention::attention_with(
            &AttentionOptions {
                isa: Some(isa),
                parallelism: Parallelism::Threads(2),
            },
            &shape,
            Heads::new(&q, HeadLayout::bshd(7, 2, 16)),
            Heads::new(&k, HeadLayout::bshd(70, 1, 16)),
            Heads::new(&v, HeadLayout::bshd(70, 1, 16)),
            HeadsMut::new(&mut o, HeadLayout::bshd(7, 2, 16)),
            &p,
        )
        .unwrap();
        assert!(o[..7 * 2 * 16].iter().all(|x| x.is_finite()), "{isa:?}");
        assert!(o[7 * 2 * 16..].iter().all(|&x| x == 0.0), "{isa:?}");
        // Every output is a convex combination of V rows.
        assert!(o.iter().all(|x| x.abs() <= 1.0), "{isa:?}");
    }
}
