//! Fuzzes quantized block decoding and the quantized kernels of `tessera-cpu`: arbitrary bytes
//! are cast to each block type (Q8_0, Q4_0, Q4_K weights; Q8_0, Q8_K activations), whatever
//! their scales hold (NaN, infinities, subnormals, huge values) and whatever their quants.
//! Nothing may crash, and:
//!
//! * `tessera_core::quant::dequantize` is bit-identical to an independent decoding of the
//!   GGML layout written here (Q4_K's scales unpacked the way the `gguf` Python package does);
//! * `quant::quantize_act_with_isa` gives the bytes of `tessera_core::quant::quantize` on every
//!   available ISA, for any f32 input (NaN and infinities included), and refuses unavailable
//!   ISAs;
//! * `quant::dot_with_isa`: every available ISA succeeds or fails alike (an unavailable one
//!   fails; Q8_0 weights refuse a −128 activation quant, as documented), and with finite,
//!   moderate scales and the activation block sums the quantizers would produce, every ISA is
//!   within the derived bound of `tessera_core::reference::quant_dot`;
//! * `quant::matmul_with` on small shapes (with leading-dimension padding, and sometimes an
//!   inconsistent shape, which must be refused without touching `C`): it returns `Ok` exactly
//!   for valid input and an available ISA, writes every element of the `m x n` matrix and
//!   nothing else, gives the same bits on one thread and on several, and with finite,
//!   moderate activations and finite weight scales is within the derived bound of
//!   `tessera_core::reference::quant_matmul`.
//!
//! The bound (as in `kernels/cpu/tests/quant.rs`): exact integer block sums, then f32 scale
//! products and an f32 sum over the blocks: `γ_(terms+4)·magnitude + u·|ref| + f32::MIN_POSITIVE`,
//! `terms` the blocks (twice that for Q4_K: a scale and a min term each).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera_core::f16;
use tessera_core::quant::{
    self as q, BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, QK_K, QuantBlock, QuantFormat,
};
use tessera_core::reference::{DotReference, quant_dot, quant_matmul};
use tessera_core::{MatMut, MatRef};
use tessera_cpu::quant::{self, QuantOptions};
use tessera_cpu::{Isa, Parallelism};

/// Unit roundoff of f32.
const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(j: usize) -> f64 {
    let ju = j as f64 * U;
    ju / (1.0 - ju)
}

/// A C sentinel no arithmetic produces (a signaling NaN's payload: arithmetic quiets it).
const SENTINEL: u32 = 0x7fa0_1234;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Format {
    Q8_0,
    Q4_0,
    Q4K,
}

/// An activation value source for `matmul` and `quantize_act`.
#[derive(Arbitrary, Debug, Clone)]
enum Acts {
    /// Raw f32 bit patterns (cycled).
    Raw(Vec<u32>),
    /// Pseudo-random values in `[-2^exp, 2^exp)` (`exp` in -30..=30), with a few chosen
    /// values at chosen places.
    Fill {
        seed: u64,
        exp: i8,
        specials: Vec<(u16, Special)>,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Special {
    Zero,
    Nan,
    Inf,
    NegInf,
    Max,
    Tiny,
    /// A value on a rounding tie of the quantizers (x / 2).
    Half(i16),
}

impl Special {
    fn get(self) -> f32 {
        match self {
            Special::Zero => 0.0,
            Special::Nan => f32::NAN,
            Special::Inf => f32::INFINITY,
            Special::NegInf => f32::NEG_INFINITY,
            Special::Max => f32::MAX,
            Special::Tiny => f32::from_bits(1),
            Special::Half(x) => f32::from(x) / 2.0,
        }
    }
}

impl Acts {
    fn values(&self, len: usize) -> Vec<f32> {
        match self {
            Acts::Raw(bits) if !bits.is_empty() => (0..len)
                .map(|i| f32::from_bits(bits[i % bits.len()]))
                .collect(),
            Acts::Raw(_) => vec![0.0; len],
            Acts::Fill {
                seed,
                exp,
                specials,
            } => {
                let scale = 2f64.powi(i32::from(*exp).clamp(-30, 30));
                let mut state = *seed;
                let mut v: Vec<f32> = (0..len)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((state >> 40) as f64 / (1u64 << 23) as f64 - 1.0) as f32 * scale as f32
                    })
                    .collect();
                if len > 0 {
                    for &(at, x) in specials.iter().take(8) {
                        v[usize::from(at) % len] = x.get();
                    }
                }
                v
            }
        }
    }
}

/// A deliberately inconsistent `matmul` argument.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Break {
    /// One weight block too few.
    ShortW,
    /// One weight block too many.
    LongW,
    /// `k` not a multiple of the block length.
    OddK,
    /// C has one column too many.
    WideC,
    /// A's slice one element short.
    ShortA,
    /// C's leading dimension below its width.
    SmallLdc,
}

#[derive(Arbitrary, Debug)]
struct Input {
    format: Format,
    /// Blocks per row (mod 5 for Q8_0 / Q4_0, mod 3 for Q4_K: zero included).
    kb: u8,
    /// Rows of `A` (mod 5) and of `W` (mod 9) in `matmul`.
    m: u8,
    n: u8,
    /// Extra columns of A's and C's leading dimensions (mod 4).
    pad_a: u8,
    pad_c: u8,
    /// Bytes of the weight blocks and of the `dot` activation blocks (cycled; zeros if empty).
    w_bytes: Vec<u8>,
    a_bytes: Vec<u8>,
    acts: Acts,
    /// `matmul_with`'s ISA: `None` or `Isa::ALL[i % 4]`.
    isa: Option<u8>,
    /// `Threads(1 + t % 4)`, or `Auto` when `None`.
    threads: Option<u8>,
    broken: Option<Break>,
}

/// `count` blocks from `bytes`, cycled (zeros when `bytes` is empty).
fn blocks_from<B: bytemuck::Pod>(bytes: &[u8], count: usize) -> Vec<B> {
    let size = std::mem::size_of::<B>();
    let mut buf = vec![0u8; count * size];
    if !bytes.is_empty() {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = bytes[i % bytes.len()];
        }
    }
    buf.chunks_exact(size)
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

fn same_bits(x: f32, y: f32) -> bool {
    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
}

/// The quant ISAs this machine runs.
fn isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|&i| quant::is_available(i))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Independent decoding of the GGML layouts.

trait Decode: QuantBlock + DotReference {
    /// The block's values, decoded here without `tessera_core`.
    fn decode(bytes: &[u8]) -> Vec<f32>;
    /// Whether every scale is finite.
    fn finite_scales(&self) -> bool;
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl Decode for BlockQ8_0 {
    fn decode(b: &[u8]) -> Vec<f32> {
        let d = f16_at(b, 0);
        b[2..34].iter().map(|&x| f32::from(x as i8) * d).collect()
    }
    fn finite_scales(&self) -> bool {
        self.d.is_finite()
    }
}

impl Decode for BlockQ4_0 {
    fn decode(b: &[u8]) -> Vec<f32> {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        let lo = qs.iter().map(|&x| f32::from(x & 15) - 8.0);
        let hi = qs.iter().map(|&x| f32::from(x >> 4) - 8.0);
        lo.chain(hi).map(|x| d * x).collect()
    }
    fn finite_scales(&self) -> bool {
        self.d.is_finite()
    }
}

impl Decode for BlockQ4_K {
    /// The scales as `gguf`'s `Q4_K.get_scale_min` unpacks them: bytes 0..4 (`d`), 4..8 (`m`)
    /// and 8..12 (`m_d`) of the 12; `sc = [d & 63, (m_d & 15) | ((d >> 2) & 48)]`,
    /// `min = [m & 63, (m_d >> 4) | ((m >> 2) & 48)]`.
    fn decode(b: &[u8]) -> Vec<f32> {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let s = &b[4..16];
        let (sd, sm, smd) = (&s[0..4], &s[4..8], &s[8..12]);
        let mut sc = [0u8; 8];
        let mut mn = [0u8; 8];
        for j in 0..4 {
            sc[j] = sd[j] & 63;
            sc[j + 4] = (smd[j] & 15) | ((sd[j] >> 2) & 48);
            mn[j] = sm[j] & 63;
            mn[j + 4] = (smd[j] >> 4) | ((sm[j] >> 2) & 48);
        }
        let qs = &b[16..144];
        let mut out = Vec::with_capacity(QK_K);
        for j in 0..8 {
            let dj = d * f32::from(sc[j]);
            let mj = dmin * f32::from(mn[j]);
            for i in 0..32 {
                let byte = qs[32 * (j / 2) + i];
                let qv = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                out.push(dj * f32::from(qv) - mj);
            }
        }
        out
    }
    fn finite_scales(&self) -> bool {
        self.d.is_finite() && self.dmin.is_finite()
    }
}

/// An activation block type.
trait Act: QuantBlock {
    /// Whether every scale is finite and moderate (zero, or within 2^±60 for an f32 scale),
    /// so that no f32 scale product overflows or leaves the normal range.
    fn moderate_scale(&self) -> bool;
    /// Makes the block what the quantizers produce: Q8_K's `bsums` the sums of its quants.
    fn fix_sums(&mut self);
}

impl Act for BlockQ8_0 {
    fn moderate_scale(&self) -> bool {
        self.d.is_finite()
    }
    fn fix_sums(&mut self) {}
}

impl Act for BlockQ8_K {
    fn moderate_scale(&self) -> bool {
        let d = self.d.abs();
        d == 0.0 || (d.is_finite() && (2f32.powi(-60)..=2f32.powi(60)).contains(&d))
    }
    fn fix_sums(&mut self) {
        for (j, s) in self.bsums.iter_mut().enumerate() {
            *s = self.qs[16 * j..16 * j + 16]
                .iter()
                .map(|&x| i16::from(x))
                .sum();
        }
    }
}

// ---------------------------------------------------------------------------------------

fn check_dequantize<W: Decode>(w: &[W]) {
    let mut out = vec![f32::NAN; w.len() * W::LEN];
    q::dequantize(w, &mut out).expect("exact output length");
    for (bi, (b, o)) in w.iter().zip(out.chunks_exact(W::LEN)).enumerate() {
        let want = W::decode(bytemuck::bytes_of(b));
        for (i, (&x, &y)) in o.iter().zip(&want).enumerate() {
            assert!(
                same_bits(x, y),
                "{} block {bi} value {i}: dequantize {x:e}, independent decoding {y:e}: {b:?}",
                W::FORMAT
            );
        }
    }
    // A wrong output length is an error, not a panic.
    let mut short = vec![0f32; (w.len() * W::LEN).saturating_sub(1)];
    if !w.is_empty() {
        assert!(q::dequantize(w, &mut short).is_err());
    }
}

fn check_quantize_act<A: Act>(x: &[f32]) {
    let nb = x.len() / A::LEN;
    let x = &x[..nb * A::LEN];
    let mut want = vec![A::zeroed(); nb];
    q::quantize(x, &mut want).expect("whole blocks");
    for isa in Isa::ALL {
        let mut got = vec![A::zeroed(); nb];
        let r = quant::quantize_act_with_isa(isa, x, &mut got);
        if !quant::is_available(isa) {
            assert!(r.is_err(), "{isa}: unavailable ISA accepted");
            continue;
        }
        r.expect("valid activation quantization");
        for (bi, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                bytemuck::bytes_of(g),
                bytemuck::bytes_of(w),
                "{isa}: {} block {bi} differs from the reference quantizer; input {:?}",
                A::FORMAT,
                &x[bi * A::LEN..(bi + 1) * A::LEN]
            );
        }
    }
    // Lengths that are not whole blocks, or a wrong block count, are errors.
    let mut one = vec![A::zeroed(); nb + 1];
    assert!(quant::quantize_act_with_isa(Isa::Scalar, x, &mut one).is_err());
}

fn check_dot<W: Decode>(w: &[W], a_raw: &[W::Act])
where
    W::Act: Act,
{
    // Raw activation blocks: no panic; every available ISA agrees on Ok / Err.
    let outcome = |a: &[W::Act]| -> Vec<(Isa, Result<f32, String>)> {
        Isa::ALL
            .into_iter()
            .map(|isa| {
                let r = quant::dot_with_isa(isa, w, a).map_err(|e| e.to_string());
                if !quant::is_available(isa) {
                    assert!(r.is_err(), "{isa}: unavailable ISA accepted");
                }
                (isa, r)
            })
            .filter(|(isa, _)| quant::is_available(*isa))
            .collect()
    };
    let has_min = W::FORMAT == QuantFormat::Q8_0
        && bytemuck::cast_slice::<W::Act, BlockQ8_0>(a_raw)
            .iter()
            .any(|b| b.qs.contains(&i8::MIN));
    let raw = outcome(a_raw);
    for (isa, r) in &raw {
        assert_eq!(
            r.is_ok(),
            !has_min,
            "{isa}: {} dot with raw activations: {r:?}",
            W::FORMAT
        );
    }
    // A length mismatch is an error.
    if !w.is_empty() {
        assert!(quant::dot_with_isa(Isa::Scalar, &w[1..], a_raw).is_err());
    }

    // Activations as the quantizers make them (sums consistent); compare with the reference
    // when every scale is finite and moderate.
    let mut a = a_raw.to_vec();
    a.iter_mut().for_each(Act::fix_sums);
    if has_min {
        return;
    }
    let (want, mag) = quant_dot(w, &a).expect("same lengths");
    let moderate = w.iter().all(Decode::finite_scales) && a.iter().all(Act::moderate_scale);
    let terms = if W::FORMAT == QuantFormat::Q4K {
        2 * w.len()
    } else {
        w.len()
    };
    let tol = gamma(terms + 4) * mag + U * want.abs() + f64::from(f32::MIN_POSITIVE);
    for (isa, r) in outcome(&a) {
        let got = r.expect("valid dot");
        if moderate {
            let got = f64::from(got);
            assert!(
                (got - want).abs() <= tol,
                "{isa}: {} dot {got} vs reference {want} (tol {tol:e}, {} blocks)",
                W::FORMAT,
                w.len()
            );
        }
    }
}

/// `(rows - 1)·ld + cols` (0 if empty), `None` when `ld < cols` (the documented rules).
fn extent(rows: usize, cols: usize, ld: usize) -> Option<usize> {
    if ld < cols {
        None
    } else if rows == 0 || cols == 0 {
        Some(0)
    } else {
        Some((rows - 1) * ld + cols)
    }
}

fn check_matmul<W: Decode>(inp: &Input, kb: usize, w: &[W])
where
    W::Act: Act,
{
    let (m, n) = (usize::from(inp.m % 5), usize::from(inp.n % 9));
    let k = kb * W::LEN;
    // The declared arguments: A is m x ak (lda), W has w_len blocks, C is m x cn (ldc).
    let mut ak = k;
    let mut cn = n;
    let mut lda = k + usize::from(inp.pad_a % 4);
    let mut ldc = n + usize::from(inp.pad_c % 4);
    let mut w_len = n * kb;
    match inp.broken {
        None => {}
        Some(Break::ShortW) => w_len = w_len.saturating_sub(1),
        Some(Break::LongW) => w_len += 1,
        Some(Break::OddK) => {
            ak = k + 1;
            lda = lda.max(ak);
        }
        Some(Break::WideC) => {
            cn = n + 1;
            ldc = ldc.max(cn);
        }
        Some(Break::ShortA) | Some(Break::SmallLdc) => {}
    }
    let mut a_len = extent(m, ak, lda).expect("lda >= ak");
    if let Some(Break::ShortA) = inp.broken {
        a_len = a_len.saturating_sub(1);
    }
    if let Some(Break::SmallLdc) = inp.broken {
        ldc = cn.saturating_sub(1);
    }
    let c_len = extent(m, cn, ldc.max(cn)).expect("ld >= cols");

    let wv: Vec<W> = (0..w_len)
        .map(|i| w.get(i).copied().unwrap_or_else(W::zeroed))
        .collect();
    let a = inp.acts.values(a_len);
    let c0 = vec![f32::from_bits(SENTINEL); c_len];
    let isa = inp.isa.map(|i| Isa::ALL[usize::from(i) % Isa::ALL.len()]);
    let par = inp.threads.map_or(Parallelism::Auto, |t| {
        Parallelism::Threads(1 + usize::from(t % 4))
    });
    let call = |isa: Option<Isa>, par: Parallelism, a: &[f32], c: &mut [f32]| {
        let opts = QuantOptions {
            isa,
            parallelism: par,
        };
        quant::matmul_with(
            &opts,
            MatRef::new(a, m, ak, lda),
            &wv,
            n,
            MatMut::new(c, m, cn, ldc),
        )
    };
    let mut c = c0.clone();
    let r = call(isa, par, &a, &mut c);
    // The documented rules, modelled independently.
    let expect_ok = isa.is_none_or(quant::is_available)
        && extent(m, ak, lda).is_some_and(|e| e <= a.len())
        && ak.is_multiple_of(W::LEN)
        && wv.len() == n * (ak / W::LEN)
        && cn == n
        && extent(m, cn, ldc).is_some_and(|e| e <= c.len());
    match r {
        Err(e) => {
            assert!(
                !expect_ok,
                "refused a valid input: {e} (m {m} n {n} k {k} isa {isa:?} {:?})",
                inp.broken
            );
            assert!(
                c.iter().zip(&c0).all(|(x, y)| x.to_bits() == y.to_bits()),
                "C written by a refused call: {e}"
            );
            return;
        }
        Ok(()) => assert!(
            expect_ok,
            "accepted an invalid input: m {m} n {n} k {ak} isa {isa:?} {:?}",
            inp.broken
        ),
    }
    // Every element of the m x n matrix written, nothing else.
    for (idx, x) in c.iter().enumerate() {
        let inside = ldc > 0 && idx % ldc < n && idx / ldc < m;
        assert_eq!(
            x.to_bits() == SENTINEL,
            !inside,
            "C[{idx}] (ldc {ldc}, {m}x{n}): {x}"
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty reduction: zeros. (Not compared with `reference::quant_matmul`, which
        // slices A's rows as `i·lda .. i·lda + k` and so panics on an empty A slice with
        // `lda > 0` and two rows or more.)
        for i in 0..m {
            assert!(c[i * ldc..i * ldc + n].iter().all(|&x| x == 0.0), "k = 0");
        }
        return;
    }
    // The same bits on one thread as on two, for every available ISA; each within the bound
    // of the reference when the inputs are moderate.
    let mut want = vec![0f32; m * n];
    let mags = quant_matmul(
        MatRef::new(&a, m, k, lda),
        &wv,
        n,
        MatMut::dense(&mut want, m, n),
    )
    .expect("the reference accepts what the kernel accepted");
    let moderate =
        a.iter().all(|x| x.is_finite() && x.abs() <= 1e6) && wv.iter().all(Decode::finite_scales);
    let terms = if W::FORMAT == QuantFormat::Q4K {
        2 * kb
    } else {
        kb
    };
    for isa in isas() {
        let mut c1 = c0.clone();
        call(Some(isa), Parallelism::Sequential, &a, &mut c1).expect("valid matmul");
        let mut c2 = c0.clone();
        call(Some(isa), Parallelism::Threads(2), &a, &mut c2).expect("valid matmul");
        for i in 0..m {
            for j in 0..n {
                let (x1, x2) = (c1[i * ldc + j], c2[i * ldc + j]);
                assert!(
                    same_bits(x1, x2),
                    "{isa}: C[{i},{j}] = {x1} on one thread, {x2} on two"
                );
                if moderate {
                    let w = f64::from(want[i * n + j]);
                    let tol = gamma(terms + 4) * mags[i * n + j]
                        + U * w.abs()
                        + f64::from(f32::MIN_POSITIVE);
                    assert!(
                        (f64::from(x1) - w).abs() <= tol,
                        "{isa}: {} C[{i},{j}] = {x1}, reference {w} (tol {tol:e}), {m}x{n}x{k}",
                        W::FORMAT
                    );
                }
            }
        }
    }
}

fn run<W: Decode>(inp: &Input, max_kb: u8)
where
    W::Act: Act,
{
    let kb = usize::from(inp.kb % (max_kb + 1));
    let n = usize::from(inp.n % 9);
    let w: Vec<W> = blocks_from(&inp.w_bytes, (n.max(1) * kb).max(1));
    check_dequantize(&w);
    let a: Vec<W::Act> = blocks_from(&inp.a_bytes, kb);
    check_dot(&w[..kb.min(w.len())], &a);
    let x = inp.acts.values(kb.max(1) * W::LEN);
    check_quantize_act::<W::Act>(&x);
    check_matmul(inp, kb, &w);
}

fuzz_target!(|inp: Input| {
    match inp.format {
        Format::Q8_0 => run::<BlockQ8_0>(&inp, 4),
        Format::Q4_0 => run::<BlockQ4_0>(&inp, 4),
        Format::Q4K => run::<BlockQ4_K>(&inp, 2),
    }
});
