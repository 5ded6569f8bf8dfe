//! GPU tests of the fused attention: every option combination × f16/bf16 × head_dim (tensor-core
//! and SIMT kernels, vector and element loads) against `tessera_core::reference::attention`,
//! plus invariances that must hold bit for bit (chunked causal prefill, padding, GQA vs repeated
//! heads, vector vs element loads), the T5 buckets of the device code against the Rust ones,
//! and bad input. Every test skips (passes, printing why once) without a GPU; the host-side
//! validation is unit-tested in `src/attention.rs`.
//!
//! The `*_wgmma` tests run the same checks with [`AttnPath::Wgmma`] forced (head_dim 64 and
//! 128, every other option as above, the same tolerance); they skip unless the device is
//! sm_90a. That path is opt-in until they have passed on an H100.
//!
//! Tolerance (derived, not tuned). The inputs are 16-bit values, exact inputs of the f64
//! reference. Write `p_j = exp(s_j − m)` for the exact softmax weights of a row and
//! `σ_j = scale·Σ_c|q_c k_jc| + |bias_j| + |s_j − m|` (the reference's quantities), `u = 2⁻²⁴`,
//! `u' = 2⁻²³` (tensor-core sums may truncate instead of rounding: twice f32's unit roundoff),
//! `γ'_n = n·u'/(1 − n·u')`, `E = 2⁻²²` (exp2f: 2 ulp), `t = ⌈kv/32⌉` (key tiles of 64 or
//! chunks of 32: rescalings of the running sums), and `u_p` the unit roundoff of the input type
//! (2⁻¹¹ f16, 2⁻⁸ bf16) with which the tensor-core kernel rounds the weights P for `P·V`:
//!
//! * a score is a `d`-term dot product of exact products plus the scale, the bias (both taken
//!   to log2 units) and the subtraction of the running maximum: absolute error
//!   `<= γ'_{d+8}·σ_j`, a relative error of the same size in `p_j`, reaching the numerator as
//!   `sensitivity` and the denominator as `magnitude·row_sensitivity`;
//! * each weight carries its own exp2f, at most `t` rescale factors (exp2f and a product each)
//!   and its rounding to 16 bits, *the same rounded weight in the numerator and the
//!   denominator* (the kernel sums the rounded P): `u_p + (t+1)·E` in each;
//! * the sums of `kv` terms in f32 (tensor cores: `u'`), `t` rescales and the final division:
//!   `γ'_{kv+2t+8}` in each;
//! * f16 weights below 2⁻¹⁴ are subnormal: absolute error `<= 2⁻²⁵` each, at most
//!   `2·kv·2⁻²⁵·max|v|` on the output (the row's largest weight is 1, so `Σ p >= 1`).
//!
//! `tol = 2·(γ'_{d+8}·(sens + mag·row_sens) + 2·(u_p + (t+1)·E + γ'_{kv+2t+8})·mag)
//!        + 2u·|o| + 2·kv·2⁻²⁵·max|v|`, doubled for second-order terms as the CPU tests do.

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tessera_core::attention::{
    AttentionParams, AttentionShape, Bias, HeadLayout, Heads, KeyPadding, RelativeBias,
    relative_position_bucket,
};
use tessera_core::{Element, reference};
use tessera_cuda::attention::{
    self, AttnElement, AttnKernel, AttnPath, DeviceAttentionParams, DeviceBias, DevicePadding,
};
use tessera_cuda::{Device, DeviceInfo, Error, launch::fill_u32, test_device};

const U: f64 = 1.0 / (1u64 << 24) as f64;
const U_TC: f64 = 2.0 * U;
const EXP_ERR: f64 = 4.0 * U;
const POISON: u32 = 0x7fc0_0001;

fn gamma_tc(n: usize) -> f64 {
    let nu = n as f64 * U_TC;
    nu / (1.0 - nu)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PadKind {
    None,
    Host,
    Device,
    Mask,
}

#[derive(Debug, Clone, Copy, PartialEq)]
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

/// One attention problem; the data is generated from `seed`.
#[derive(Debug, Clone)]
struct Case {
    shape: AttentionShape,
    /// Per operand (Q, K, V, O): heads-major (`[b, h, s, d]`) or tokens-major, and a gap
    /// (0 and 8 keep 16-byte vector loads legal for head_dim % 8 == 0, 1..5 do not).
    layouts: [(bool, usize); 4],
    scale: f32,
    causal: bool,
    q_offset: usize,
    pad: PadKind,
    lengths: Vec<usize>,
    mask: Vec<bool>,
    bias_kind: BiasKind,
    seed: u64,
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

impl Case {
    fn dims(&self, which: usize) -> (usize, usize) {
        let s = &self.shape;
        match which {
            1 | 2 => (s.kv_len, s.n_kv_heads),
            _ => (s.q_len, s.n_heads),
        }
    }

    fn layout(&self, which: usize) -> HeadLayout {
        let (seq, heads) = self.dims(which);
        let (hm, gap) = self.layouts[which];
        layout(hm, gap, seq, heads, self.shape.head_dim)
    }

    fn len(&self, which: usize) -> usize {
        let (seq, heads) = self.dims(which);
        self.layout(which)
            .extent(self.shape.batch, seq, heads, self.shape.head_dim)
            .unwrap()
    }

    fn bias_len(&self) -> usize {
        let s = &self.shape;
        match self.bias_kind {
            BiasKind::None => 0,
            BiasKind::Dense { .. } => s.batch * s.n_heads * s.q_len * s.kv_len,
            BiasKind::Relative { buckets, .. } => buckets * s.n_heads,
        }
    }

    /// (batch, head, q) strides of the dense bias.
    fn bias_strides(&self) -> (usize, usize, usize) {
        let s = &self.shape;
        let BiasKind::Dense {
            broadcast_batch,
            broadcast_q,
        } = self.bias_kind
        else {
            return (0, 0, 0);
        };
        let q_stride = if broadcast_q { 0 } else { s.kv_len };
        let head_stride = s.q_len * s.kv_len;
        let batch_stride = if broadcast_batch {
            0
        } else {
            s.n_heads * head_stride
        };
        (batch_stride, head_stride, q_stride)
    }

    /// The reference's parameters over host data.
    fn params<'a>(&'a self, bias: &'a [f32]) -> AttentionParams<'a> {
        let s = &self.shape;
        let mut p = AttentionParams::new(s.head_dim).with_scale(self.scale);
        p.causal = self.causal;
        p.q_offset = self.q_offset;
        p.padding = match self.pad {
            PadKind::None => KeyPadding::None,
            PadKind::Host | PadKind::Device => KeyPadding::Lengths(&self.lengths),
            PadKind::Mask => KeyPadding::Mask(&self.mask),
        };
        let (batch_stride, head_stride, q_stride) = self.bias_strides();
        p.bias = match self.bias_kind {
            BiasKind::None => Bias::None,
            BiasKind::Dense { .. } => Bias::Dense {
                data: bias,
                batch_stride,
                head_stride,
                q_stride,
            },
            BiasKind::Relative {
                buckets,
                max_distance,
                bidirectional,
            } => Bias::Relative(RelativeBias {
                table: bias,
                num_buckets: buckets,
                max_distance,
                bidirectional,
            }),
        };
        p
    }
}

/// Sizes around every tile edge: the tensor-core kernel's 64-row query tiles and 64-key
/// tiles, the SIMT kernel's 4-row blocks and 32-key chunks.
fn seq_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => 0usize..=3,
        4 => prop::sample::select(vec![
            4usize, 5, 7, 13, 31, 32, 33, 63, 64, 65, 127, 128, 129, 191, 192, 193,
        ]),
        3 => 1usize..100,
    ]
}

fn head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => prop::sample::select(vec![16usize, 24, 32, 64, 80, 96, 128, 256]),
        1 => prop::sample::select(vec![1usize, 7, 33, 100, 300, 1024]),
    ]
}

/// Multiply-adds the reference spends on a shape (kept bounded so that a case runs in well
/// under a second in a debug build).
fn work(s: &AttentionShape) -> usize {
    s.batch * s.q_len.max(1) * s.kv_len.max(1) * s.n_heads * s.head_dim
}

prop_compose! {
    fn case_in(head_dims: BoxedStrategy<usize>)(
        batch in 1usize..=3,
        q_len in seq_len(),
        kv_len in seq_len(),
        n_kv_heads in 1usize..=3,
        group in prop::sample::select(vec![1usize, 1, 2, 3, 4]),
        head_dim in head_dims,
        layouts in prop::array::uniform4((any::<bool>(), prop_oneof![3 => Just(0usize), 1 => Just(8usize), 1 => 1usize..5])),
        scale_kind in 0usize..3,
        causal in any::<bool>(),
        offset_kind in 0usize..3,
        pad_kind in 0usize..4,
        bias_sel in 0usize..4,
        bias_flags in (any::<bool>(), any::<bool>(), any::<bool>()),
        seed in any::<u64>(),
    ) -> Case {
        let mut shape = AttentionShape {
            batch, q_len, kv_len, n_heads: n_kv_heads * group, n_kv_heads, head_dim,
        };
        while work(&shape) > 4_000_000 {
            if shape.batch > 1 {
                shape.batch -= 1;
            } else if shape.n_kv_heads > 1 {
                shape.n_kv_heads -= 1;
                shape.n_heads = shape.n_kv_heads * group;
            } else if shape.n_heads > 1 {
                shape.n_heads = 1;
                shape.n_kv_heads = 1;
            } else if shape.q_len > shape.kv_len {
                shape.q_len /= 2;
            } else {
                shape.kv_len /= 2;
            }
        }
        let AttentionShape { batch, q_len, kv_len, .. } = shape;
        let scale = match scale_kind {
            0 => 1.0 / (head_dim as f32).sqrt(),
            1 => 1.0,
            _ => 0.37,
        };
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
        let pad = [PadKind::None, PadKind::Host, PadKind::Device, PadKind::Mask][pad_kind];
        let bias_kind = match bias_sel {
            0 | 1 => BiasKind::None,
            2 => BiasKind::Dense { broadcast_batch: bias_flags.0, broadcast_q: bias_flags.1 },
            _ => BiasKind::Relative {
                buckets: if bias_flags.0 { 32 } else { 8 },
                max_distance: if bias_flags.1 { 128 } else { 20 },
                bidirectional: bias_flags.2,
            },
        };
        Case { shape, layouts, scale, causal, q_offset, pad, lengths, mask, bias_kind, seed }
    }
}

/// Cases over every option, head_dim from [`head_dim`].
fn case() -> impl Strategy<Value = Case> {
    case_in(head_dim().boxed())
}

/// Cases over every option with the head dimensions of the `wgmma` kernel.
fn wgmma_case() -> impl Strategy<Value = Case> {
    case_in(prop::sample::select(vec![64usize, 128]).boxed())
}

/// The device when it can run the `wgmma` path (sm_90a), else `None` (printing why).
fn wgmma_device() -> Option<&'static Device> {
    let dev = test_device()?;
    if dev.info().has_sm90a() {
        Some(dev)
    } else {
        eprintln!(
            "tessera-cuda: skipping a wgmma attention test: {} is {}, not sm_90a",
            dev.info().name,
            dev.info().arch
        );
        None
    }
}

/// The case's Q, K, V as `T` (their exact f32 values for Q) and bias.
struct Data<T> {
    q: Vec<T>,
    q_f32: Vec<f32>,
    k: Vec<T>,
    v: Vec<T>,
    bias: Vec<f32>,
}

fn data<T: Element>(c: &Case) -> Data<T> {
    let conv = |x: Vec<f32>| -> Vec<T> { x.into_iter().map(T::from_f32).collect() };
    let q = conv(values(c.len(0), c.seed ^ 1, 2.0));
    let q_f32 = q.iter().map(|x| x.to_f32()).collect();
    Data {
        q,
        q_f32,
        k: conv(values(c.len(1), c.seed ^ 2, 2.0)),
        v: conv(values(c.len(2), c.seed ^ 3, 2.0)),
        bias: values(c.bias_len(), c.seed ^ 0x77, 3.0),
    }
}

/// Uploads `x` with one spare element (so that no buffer is empty).
fn upload<T: cudarc::driver::DeviceRepr + Copy + Default>(
    dev: &Device,
    x: &[T],
) -> cudarc::driver::CudaSlice<T> {
    let mut v = x.to_vec();
    v.push(T::default());
    dev.upload(&v).unwrap()
}

/// Runs the kernel family `path` on a poisoned output; returns the whole output buffer (its
/// `len(3)` first elements).
fn run_path<T: AttnElement + cudarc::driver::DeviceRepr + Default>(
    dev: &Device,
    path: AttnPath,
    c: &Case,
    d: &Data<T>,
) -> Vec<f32> {
    let s = &c.shape;
    let (q, k, v) = (upload(dev, &d.q), upload(dev, &d.k), upload(dev, &d.v));
    let bias = upload(dev, &d.bias);
    let lens32: Vec<u32> = c.lengths.iter().map(|&x| x as u32).collect();
    let lens = upload(dev, &lens32);
    let mask8: Vec<u8> = c.mask.iter().map(|&m| u8::from(m)).collect();
    let mask = upload(dev, &mask8);
    let n_out = c.len(3);
    let mut out = dev.alloc_zeros::<f32>(n_out + 1).unwrap();
    fill_u32(dev, &mut out, POISON).unwrap();
    let mut p = DeviceAttentionParams::new(s.head_dim).with_scale(c.scale);
    p.causal = c.causal;
    p.q_offset = c.q_offset;
    p.padding = match c.pad {
        PadKind::None => DevicePadding::None,
        PadKind::Host => DevicePadding::Lengths(&c.lengths),
        PadKind::Device => DevicePadding::DeviceLengths(lens.slice(..s.batch)),
        PadKind::Mask => DevicePadding::Mask(mask.slice(..s.batch * s.kv_len)),
    };
    let (batch_stride, head_stride, q_stride) = c.bias_strides();
    p.bias = match c.bias_kind {
        BiasKind::None => DeviceBias::None,
        BiasKind::Dense { .. } => DeviceBias::Dense {
            data: bias.slice(..d.bias.len()),
            batch_stride,
            head_stride,
            q_stride,
        },
        BiasKind::Relative {
            buckets,
            max_distance,
            bidirectional,
        } => DeviceBias::Relative {
            table: bias.slice(..d.bias.len()),
            num_buckets: buckets,
            max_distance,
            bidirectional,
        },
    };
    attention::attention_with_path::<T>(
        dev,
        path,
        s,
        &q,
        c.layout(0),
        &k,
        c.layout(1),
        &v,
        c.layout(2),
        &p,
        &mut out,
        c.layout(3),
    )
    .unwrap();
    dev.synchronize().unwrap();
    let mut o = dev.download(&out).unwrap();
    assert_eq!(
        o.pop().map(f32::to_bits),
        Some(POISON),
        "the spare element was written"
    );
    o
}

/// The owned elements of an output in `c.layout(3)`, dense `[b, q, h, d]`, and a check that
/// every other element still holds the poison.
fn owned(c: &Case, out: &[f32]) -> Result<Vec<f32>, TestCaseError> {
    let s = &c.shape;
    let ol = c.layout(3);
    let mut mine = vec![false; out.len()];
    let mut dense = Vec::with_capacity(s.batch * s.q_len * s.n_heads * s.head_dim);
    for b in 0..s.batch {
        for i in 0..s.q_len {
            for h in 0..s.n_heads {
                let o = ol.offset(b, i, h);
                dense.extend_from_slice(&out[o..o + s.head_dim]);
                mine[o..o + s.head_dim].iter_mut().for_each(|m| *m = true);
            }
        }
    }
    for (e, (&x, &m)) in out.iter().zip(&mine).enumerate() {
        prop_assert!(
            m || x.to_bits() == POISON,
            "element {} outside the output was written ({})",
            e,
            x
        );
    }
    Ok(dense)
}

fn unit_roundoff<T: Element>() -> f64 {
    match T::DTYPE {
        tessera_core::DType::F16 => 2f64.powi(-11),
        tessera_core::DType::BF16 => 2f64.powi(-8),
        tessera_core::DType::F32 => 0.0,
    }
}

fn check_against_reference<T: AttnElement + cudarc::driver::DeviceRepr + Default>(
    dev: &Device,
    path: AttnPath,
    c: &Case,
) -> Result<(), TestCaseError> {
    let dt = data::<T>(c);
    let r = reference::attention(
        &c.shape,
        Heads::new(&dt.q_f32, c.layout(0)),
        Heads::new(&dt.k, c.layout(1)),
        Heads::new(&dt.v, c.layout(2)),
        &c.params(&dt.bias),
    )
    .unwrap();
    let got = owned(c, &run_path(dev, path, c, &dt))?;
    let s = &c.shape;
    let (d, kv) = (s.head_dim, s.kv_len);
    let vmax =
        dt.v.iter()
            .fold(0.0f64, |a, x| a.max(f64::from(x.to_f32()).abs()));
    let t = kv.div_ceil(32);
    let rel = 2.0 * (unit_roundoff::<T>() + (t + 1) as f64 * EXP_ERR + gamma_tc(kv + 2 * t + 8));
    let sub = 2.0 * kv as f64 * 2f64.powi(-25) * vmax;
    for (e, (&g, &want)) in got.iter().zip(&r.out).enumerate() {
        let row = e / d;
        if r.attended[row] == 0 {
            prop_assert_eq!(g, 0.0, "{}: fully masked row {} must be zero", T::NAME, row);
            continue;
        }
        let tol = 2.0
            * (gamma_tc(d + 8) * (r.sensitivity[e] + r.magnitude[e] * r.row_sensitivity[row])
                + rel * r.magnitude[e])
            + 2.0 * U * want.abs()
            + sub;
        let err = (f64::from(g) - want).abs();
        prop_assert!(
            err <= tol,
            "{} d={}: element {} (row {}) got {} want {} err {:e} > tol {:e}",
            T::NAME,
            d,
            e,
            row,
            g,
            want,
            err,
            tol
        );
    }
    Ok(())
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        source_file: Some(file!()),
        ..Config::default()
    })
}

#[test]
fn f16_matches_reference() {
    let Some(dev) = test_device() else { return };
    runner(96)
        .run(&case(), |c| {
            check_against_reference::<f16>(dev, AttnPath::Auto, &c)
        })
        .unwrap();
}

#[test]
fn bf16_matches_reference() {
    let Some(dev) = test_device() else { return };
    runner(96)
        .run(&case(), |c| {
            check_against_reference::<bf16>(dev, AttnPath::Auto, &c)
        })
        .unwrap();
}

/// A fixed ladder of wgmma cases, simplest first (a first GPU run reads the first failure):
/// one full tile, single rows, then causal + GQA + padding + relative bias, then a byte mask,
/// a dense bias and element loads.
#[test]
fn wgmma_fixed_cases_match_reference() {
    let Some(dev) = wgmma_device() else { return };
    let base = |d: usize, q_len: usize, kv_len: usize| Case {
        shape: AttentionShape {
            batch: 1,
            q_len,
            kv_len,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: d,
        },
        layouts: [(false, 0); 4],
        scale: 1.0 / (d as f32).sqrt(),
        causal: false,
        q_offset: 0,
        pad: PadKind::None,
        lengths: vec![],
        mask: vec![],
        bias_kind: BiasKind::None,
        seed: 17,
    };
    for d in attention::WGMMA_HEAD_DIMS {
        let mut cases = vec![base(d, 64, 64), base(d, 1, 1), base(d, 64, 200)];
        let mut c = base(d, 70, 130);
        c.shape.batch = 2;
        c.shape.n_heads = 4;
        c.shape.n_kv_heads = 2;
        c.causal = true;
        c.q_offset = 60;
        c.pad = PadKind::Host;
        c.lengths = vec![130, 77];
        c.bias_kind = BiasKind::Relative {
            buckets: 32,
            max_distance: 128,
            bidirectional: false,
        };
        cases.push(c.clone());
        c.causal = false;
        c.pad = PadKind::Mask;
        c.mask = values(2 * 130, 9, 1.0)
            .into_iter()
            .map(|x| x > -0.6)
            .collect();
        c.bias_kind = BiasKind::Dense {
            broadcast_batch: true,
            broadcast_q: false,
        };
        c.layouts = [(true, 3), (false, 1), (true, 0), (false, 2)];
        cases.push(c);
        for (n, c) in cases.iter().enumerate() {
            check_against_reference::<f16>(dev, AttnPath::Wgmma, c)
                .unwrap_or_else(|e| panic!("f16 d={d} case {n}: {e}"));
            check_against_reference::<bf16>(dev, AttnPath::Wgmma, c)
                .unwrap_or_else(|e| panic!("bf16 d={d} case {n}: {e}"));
        }
    }
}

#[test]
fn f16_matches_reference_wgmma() {
    let Some(dev) = wgmma_device() else { return };
    runner(96)
        .run(&wgmma_case(), |c| {
            check_against_reference::<f16>(dev, AttnPath::Wgmma, &c)
        })
        .unwrap();
}

#[test]
fn bf16_matches_reference_wgmma() {
    let Some(dev) = wgmma_device() else { return };
    runner(96)
        .run(&wgmma_case(), |c| {
            check_against_reference::<bf16>(dev, AttnPath::Wgmma, &c)
        })
        .unwrap();
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Dense `[b, s, h, d]` copy of an operand.
fn densify<T: Copy>(
    x: &[T],
    l: HeadLayout,
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(batch * seq * heads * d);
    for b in 0..batch {
        for s in 0..seq {
            for h in 0..heads {
                out.extend_from_slice(&x[l.offset(b, s, h)..][..d]);
            }
        }
    }
    out
}

/// `c` with dense tokens-major layouts and data `d` re-laid out accordingly.
fn dense_case<T: Copy>(c: &Case, d: &Data<T>) -> (Case, Data<T>) {
    let s = c.shape;
    let mut c2 = c.clone();
    c2.layouts = [(false, 0); 4];
    let dd = Data {
        q: densify(&d.q, c.layout(0), s.batch, s.q_len, s.n_heads, s.head_dim),
        q_f32: densify(
            &d.q_f32,
            c.layout(0),
            s.batch,
            s.q_len,
            s.n_heads,
            s.head_dim,
        ),
        k: densify(
            &d.k,
            c.layout(1),
            s.batch,
            s.kv_len,
            s.n_kv_heads,
            s.head_dim,
        ),
        v: densify(
            &d.v,
            c.layout(2),
            s.batch,
            s.kv_len,
            s.n_kv_heads,
            s.head_dim,
        ),
        bias: d.bias.clone(),
    };
    (c2, dd)
}

/// Layouts (vector or element loads) never change a bit.
fn layouts_are_exact(dev: &Device, path: AttnPath, c: &Case) -> Result<(), TestCaseError> {
    let d = data::<f16>(c);
    let a = owned(c, &run_path(dev, path, c, &d))?;
    let (c2, d2) = dense_case(c, &d);
    let b = owned(&c2, &run_path(dev, path, &c2, &d2))?;
    prop_assert_eq!(
        bits(&a),
        bits(&b),
        "layouts {:?} and dense differ",
        c.layouts
    );
    Ok(())
}

/// Padding a batch changes no sequence: each sequence run alone with only its own keys gives
/// bit-identical rows (tiles sit at the same key positions; skipped tiles and zero weights
/// change nothing).
fn padding_is_exact(dev: &Device, path: AttnPath, c: &Case) -> Result<(), TestCaseError> {
    let mut c = c.clone();
    c.pad = PadKind::Host;
    c.bias_kind = BiasKind::None;
    c.layouts = [(false, 0); 4];
    let s = c.shape;
    let d = data::<f16>(&c);
    let batched = owned(&c, &run_path(dev, path, &c, &d))?;
    let row = s.q_len * s.n_heads * s.head_dim;
    let kvrow = s.n_kv_heads * s.head_dim;
    for b in 0..s.batch {
        let len = c.lengths[b];
        let alone = Case {
            shape: AttentionShape {
                batch: 1,
                kv_len: len,
                ..s
            },
            pad: PadKind::None,
            lengths: vec![],
            mask: vec![],
            ..c.clone()
        };
        let da = Data {
            q: d.q[b * row..(b + 1) * row].to_vec(),
            q_f32: vec![],
            k: d.k[b * s.kv_len * kvrow..][..len * kvrow].to_vec(),
            v: d.v[b * s.kv_len * kvrow..][..len * kvrow].to_vec(),
            bias: vec![],
        };
        let single = owned(&alone, &run_path(dev, path, &alone, &da))?;
        prop_assert_eq!(
            bits(&batched[b * row..(b + 1) * row]),
            bits(&single),
            "sequence {} (length {}) changed by padding",
            b,
            len
        );
    }
    Ok(())
}

/// A causal pass over a whole sequence equals two chunks, the second attending the first as a
/// cached past (q_offset), bit for bit; grouped-query attention equals multi-head attention
/// with each K/V head repeated for its group.
fn chunks_and_gqa_are_exact(
    dev: &Device,
    path: AttnPath,
    c: &Case,
    split: usize,
) -> Result<(), TestCaseError> {
    let mut c = c.clone();
    c.causal = true;
    c.q_offset = 0;
    c.pad = PadKind::None;
    if let BiasKind::Dense { .. } = c.bias_kind {
        c.bias_kind = BiasKind::None;
    }
    c.layouts = [(false, 0); 4];
    c.shape.kv_len = c.shape.q_len;
    let s = c.shape;
    let d = data::<bf16>(&c);
    let whole = owned(&c, &run_path(dev, path, &c, &d))?;
    let hd = s.n_heads * s.head_dim;
    let kvrow = s.n_kv_heads * s.head_dim;
    let cut = if s.q_len == 0 {
        0
    } else {
        split % (s.q_len + 1)
    };
    for (lo, hi) in [(0, cut), (cut, s.q_len)] {
        for b in 0..s.batch {
            let part = Case {
                shape: AttentionShape {
                    batch: 1,
                    q_len: hi - lo,
                    kv_len: hi,
                    ..s
                },
                q_offset: lo,
                ..c.clone()
            };
            let dp = Data {
                q: d.q[(b * s.q_len + lo) * hd..(b * s.q_len + hi) * hd].to_vec(),
                q_f32: vec![],
                k: d.k[b * s.kv_len * kvrow..][..hi * kvrow].to_vec(),
                v: d.v[b * s.kv_len * kvrow..][..hi * kvrow].to_vec(),
                bias: d.bias.clone(),
            };
            let got = owned(&part, &run_path(dev, path, &part, &dp))?;
            let want = &whole[(b * s.q_len + lo) * hd..(b * s.q_len + hi) * hd];
            prop_assert_eq!(
                bits(&got),
                bits(want),
                "chunk {}..{} differs from the whole pass",
                lo,
                hi
            );
        }
    }
    let group = s.n_heads / s.n_kv_heads;
    if group > 1 {
        let mut mha = c.clone();
        mha.shape.n_kv_heads = s.n_heads;
        let repeat = |src: &[bf16]| -> Vec<bf16> {
            let mut out = Vec::new();
            for t in 0..s.batch * s.kv_len {
                for h in 0..s.n_heads {
                    out.extend_from_slice(
                        &src[(t * s.n_kv_heads + h / group) * s.head_dim..][..s.head_dim],
                    );
                }
            }
            out
        };
        let dm = Data {
            q: d.q.clone(),
            q_f32: vec![],
            k: repeat(&d.k),
            v: repeat(&d.v),
            bias: d.bias.clone(),
        };
        let got = owned(&mha, &run_path(dev, path, &mha, &dm))?;
        prop_assert_eq!(
            bits(&got),
            bits(&whole),
            "GQA differs from repeated-head MHA"
        );
    }
    Ok(())
}

#[test]
fn layouts_padding_chunks_and_gqa_are_exact() {
    let Some(dev) = test_device() else { return };
    runner(48)
        .run(&(case(), 0usize..1000), |(c, split)| {
            layouts_are_exact(dev, AttnPath::Auto, &c)?;
            padding_is_exact(dev, AttnPath::Auto, &c)?;
            chunks_and_gqa_are_exact(dev, AttnPath::Auto, &c, split)
        })
        .unwrap();
}

#[test]
fn layouts_padding_chunks_and_gqa_are_exact_wgmma() {
    let Some(dev) = wgmma_device() else { return };
    runner(48)
        .run(&(wgmma_case(), 0usize..1000), |(c, split)| {
            layouts_are_exact(dev, AttnPath::Wgmma, &c)?;
            padding_is_exact(dev, AttnPath::Wgmma, &c)?;
            chunks_and_gqa_are_exact(dev, AttnPath::Wgmma, &c, split)
        })
        .unwrap();
}

#[test]
fn device_buckets_match_rust() {
    let Some(dev) = test_device() else { return };
    for (nb, md) in [
        (32usize, 128usize),
        (8, 20),
        (64, 1000),
        (4, 3),
        (2, 2),
        (33, 77),
    ] {
        for bi in [true, false] {
            let buckets = if bi { nb / 2 } else { nb };
            if buckets / 2 == 0 || md <= buckets / 2 {
                continue;
            }
            let rp0 = -5000i64;
            let got = attention::relative_buckets(dev, rp0, 10_001, nb, md, bi).unwrap();
            for (t, &g) in got.iter().enumerate() {
                let rp = rp0 + t as i64;
                assert_eq!(
                    g,
                    relative_position_bucket(rp, bi, nb, md),
                    "bucket of {rp} ({nb} buckets, max_distance {md}, bidirectional {bi})"
                );
            }
        }
    }
}

#[test]
fn masked_rows_are_zero_and_large_scores_stay_finite() {
    let Some(dev) = test_device() else { return };
    // Every key of sequence 1 padded: sequence 1's rows have no key; scores of magnitude ~1e5
    // must not overflow the softmax. Both kernels (and the wgmma kernel on sm_90a).
    let mut runs = vec![(64usize, AttnPath::Auto), (24, AttnPath::Auto)];
    if dev.info().has_sm90a() {
        runs.extend([(64, AttnPath::Wgmma), (128, AttnPath::Wgmma)]);
    }
    for (d, path) in runs {
        let c = Case {
            shape: AttentionShape {
                batch: 2,
                q_len: 70,
                kv_len: 130,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: d,
            },
            layouts: [(false, 0); 4],
            scale: 1.0,
            causal: false,
            q_offset: 0,
            pad: PadKind::Host,
            lengths: vec![130, 0],
            mask: vec![],
            bias_kind: BiasKind::None,
            seed: 5,
        };
        let mut dt = data::<f16>(&c);
        let big = |x: &mut Vec<f16>, s: u64| {
            *x = values(x.len(), s, 100.0)
                .into_iter()
                .map(f16::from_f32)
                .collect();
        };
        big(&mut dt.q, 11);
        big(&mut dt.k, 12);
        let o = owned(&c, &run_path(dev, path, &c, &dt)).unwrap();
        let half = 70 * 2 * d;
        assert!(o[..half].iter().all(|x| x.is_finite()), "d={d}");
        assert!(o[half..].iter().all(|&x| x == 0.0), "d={d}");
        // Every output is a convex combination of V rows (|v| <= 2), up to f32 rounding.
        assert!(o.iter().all(|x| x.abs() <= 2.0 * (1.0 + 1e-5)), "d={d}");
    }
}

#[test]
fn bad_input_is_an_error_and_launches_nothing() {
    let Some(dev) = test_device() else { return };
    let shape = AttentionShape {
        batch: 2,
        q_len: 3,
        kv_len: 5,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
    };
    let ql = HeadLayout::bshd(3, 4, 64);
    let kl = HeadLayout::bshd(5, 2, 64);
    let (qe, ke) = (2 * 3 * 4 * 64, 2 * 5 * 2 * 64);
    let q = dev.upload(&vec![f16::from_f32(0.5); qe]).unwrap();
    let k = dev.upload(&vec![f16::from_f32(0.25); ke]).unwrap();
    let short = dev.upload(&vec![f16::from_f32(0.25); ke - 1]).unwrap();
    let mut out = dev.alloc_zeros::<f32>(qe).unwrap();
    fill_u32(dev, &mut out, POISON).unwrap();
    let p = DeviceAttentionParams::new(64);
    let call = |k: &cudarc::driver::CudaSlice<f16>,
                p: &DeviceAttentionParams<'_>,
                out: &mut cudarc::driver::CudaSlice<f32>,
                shape: &AttentionShape| {
        attention::attention::<f16>(dev, shape, &q, ql, k, kl, k, kl, p, out, ql)
    };
    assert!(call(&short, &p, &mut out, &shape).is_err());
    let bad = AttentionShape {
        n_kv_heads: 3,
        ..shape
    };
    assert!(call(&k, &p, &mut out, &bad).is_err());
    let lens = dev.upload(&[5u32, 5, 5]).unwrap();
    let p2 =
        DeviceAttentionParams::new(64).with_padding(DevicePadding::DeviceLengths(lens.slice(..)));
    assert!(call(&k, &p2, &mut out, &shape).is_err());
    let p3 = DeviceAttentionParams::new(64).with_padding(DevicePadding::Lengths(&[5, 6]));
    assert!(call(&k, &p3, &mut out, &shape).is_err());
    let mask = dev.upload(&[1u8; 9]).unwrap();
    let p4 = DeviceAttentionParams::new(64).with_padding(DevicePadding::Mask(mask.slice(..)));
    assert!(call(&k, &p4, &mut out, &shape).is_err());
    let bias = dev.upload(&vec![0.0f32; 4 * 3 * 5 - 1]).unwrap();
    let p5 = DeviceAttentionParams::new(64).with_bias(DeviceBias::Dense {
        data: bias.slice(..),
        batch_stride: 0,
        head_stride: 15,
        q_stride: 5,
    });
    assert!(call(&k, &p5, &mut out, &shape).is_err());
    let table = dev.upload(&vec![0.0f32; 31 * 4]).unwrap();
    let p6 = DeviceAttentionParams::new(64).with_bias(DeviceBias::Relative {
        table: table.slice(..),
        num_buckets: 32,
        max_distance: 128,
        bidirectional: true,
    });
    assert!(call(&k, &p6, &mut out, &shape).is_err());
    // The wgmma path where it cannot run (not sm_90a, or head_dim 64 on a 32-dim problem).
    let wgmma = |shape: &AttentionShape, out: &mut cudarc::driver::CudaSlice<f32>| {
        attention::attention_with_path::<f16>(
            dev,
            AttnPath::Wgmma,
            shape,
            &q,
            ql,
            &k,
            kl,
            &k,
            kl,
            &p,
            out,
            ql,
        )
    };
    if !dev.info().has_sm90a() {
        assert!(matches!(
            wgmma(&shape, &mut out),
            Err(Error::Unsupported(_))
        ));
        let empty = AttentionShape { q_len: 0, ..shape };
        assert!(matches!(
            wgmma(&empty, &mut out),
            Err(Error::Unsupported(_))
        ));
    }
    // Nothing was written by any refused call; an empty problem writes nothing either.
    let empty = AttentionShape { q_len: 0, ..shape };
    call(&k, &p, &mut out, &empty).unwrap();
    dev.synchronize().unwrap();
    assert!(
        dev.download(&out)
            .unwrap()
            .iter()
            .all(|x| x.to_bits() == POISON)
    );
    // The valid call writes everything.
    call(&k, &p, &mut out, &shape).unwrap();
    let o = dev.download(&out).unwrap();
    assert!(o.iter().all(|&x| x == 0.25), "{:?}", &o[..4]);
}

fn info(arch: &str, cc: (i32, i32)) -> DeviceInfo {
    DeviceInfo {
        name: format!("test {arch}"),
        compute_capability: cc,
        arch: arch.into(),
        sm_count: 132,
        l2_bytes: 50 << 20,
        max_smem_per_block: 227 << 10,
        total_mem: 80 << 30,
    }
}

/// Path selection, host only: Auto keeps the mma.sync (or SIMT) kernels everywhere, Wgmma is
/// refused off sm_90a and for head dimensions other than 64 and 128.
#[test]
fn path_selection() {
    let (h100, a100, l4) = (
        info("sm_90a", (9, 0)),
        info("sm_80", (8, 0)),
        info("sm_89", (8, 9)),
    );
    for d in [1usize, 32, 64, 80, 100, 128, 256, 1024] {
        let default = AttnKernel::for_head_dim(d).unwrap();
        for i in [&h100, &a100, &l4] {
            assert_eq!(
                attention::kernel_for(i, d, AttnPath::Auto).unwrap(),
                default
            );
            assert_eq!(attention::kernel_for(i, d, AttnPath::Mma).unwrap(), default);
        }
        for i in [&a100, &l4] {
            assert!(matches!(
                attention::kernel_for(i, d, AttnPath::Wgmma),
                Err(Error::Unsupported(_))
            ));
        }
        let w = attention::kernel_for(&h100, d, AttnPath::Wgmma);
        if attention::WGMMA_HEAD_DIMS.contains(&d) {
            assert_eq!(w.unwrap(), AttnKernel::Wgmma { head_dim: d });
        } else {
            assert!(matches!(w, Err(Error::Unsupported(_))), "head_dim {d}");
        }
    }
    assert_eq!(AttnPath::default(), AttnPath::Auto);
    assert!(attention::kernel_for(&h100, 1025, AttnPath::Auto).is_err());
}
