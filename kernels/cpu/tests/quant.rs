//! Property tests of the quantized kernels: every available ISA × every weight format, against
//! `tessera_core::reference` (the activation quantizers byte for byte; the matmul and dot
//! products against the exact integer computation), and against the f64 product of the
//! dequantized weights with the original f32 activations within the quantization error bound.
//!
//! Tolerance against the reference (derived, not tuned): every integer partial sum is exact in
//! both; a kernel converts its partial sums (a block's, or one SIMD lane's share of it) to f32
//! (exact below 2²⁴, one rounding above), multiplies by the product of the two scales (two
//! roundings) and adds them in f32 in some order, so each output is within
//! γ_(kb+4)·Σ_blocks |scales|·Σ|wᵢaᵢ| of the exact value (the reference's magnitude; `kb`
//! blocks, Q4_K counting its scale and min terms as two; a lane split adds at most log₂ 8 more
//! additions, covered by the +4), plus the reference's own final rounding u·|ref| and the
//! smallest normal f32 as a floor.

use bytemuck::Zeroable;
use half::f16;
use proptest::prelude::*;
use tessera_core::quant::{self as q, BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, QuantBlock};
use tessera_core::reference::{self, DotReference};
use tessera_core::{Error, MatMut, MatRef};
use tessera_cpu::quant::{self, QuantOptions};
use tessera_cpu::{Isa, Parallelism};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(j: usize) -> f64 {
    let ju = j as f64 * U;
    ju / (1.0 - ju)
}

/// The quant ISAs this machine runs.
fn isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|&i| quant::is_available(i))
        .collect()
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
    fn byte(&mut self) -> u8 {
        (self.next_u64() >> 20) as u8
    }
}

/// Activations: uniform values with, sometimes, outliers, exact zeros, repeated maxima of
/// either sign and values on the rounding ties of the quantizers.
fn activations(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let v = rng.unit() * scale;
            match rng.next_u64() % 16 {
                0 => 0.0,
                1 => v * 8.0,
                2 => -scale * 2.0,
                3 => scale * 2.0,
                // Ties: halves of the Q8 grid when the block max is 2·scale.
                4 => (i % 255) as f32 / 127.0 * scale * 2.0 * 0.5,
                _ => v,
            }
        })
        .collect()
}

/// A weight block of each format, either quantized from random floats (realistic) or random
/// bytes with a finite, moderate scale (every code, including Q8_0's −128).
trait TestWeight: DotReference + Copy {
    fn random(rng: &mut Rng, quantized: bool) -> Self;
}

fn scale_f16(rng: &mut Rng) -> f16 {
    f16::from_f32((rng.unit() * 0.05).abs() + 1e-3)
}

impl TestWeight for BlockQ8_0 {
    fn random(rng: &mut Rng, quantized: bool) -> Self {
        if quantized {
            return Self::quantize_block(&activations(rng, Self::LEN, 0.5));
        }
        let mut b = Self::zeroed();
        b.d = scale_f16(rng);
        b.qs.iter_mut().for_each(|x| *x = rng.byte() as i8);
        b
    }
}
impl TestWeight for BlockQ4_0 {
    fn random(rng: &mut Rng, quantized: bool) -> Self {
        if quantized {
            return Self::quantize_block(&activations(rng, Self::LEN, 0.5));
        }
        let mut b = Self::zeroed();
        b.d = scale_f16(rng);
        b.qs.iter_mut().for_each(|x| *x = rng.byte());
        b
    }
}
impl TestWeight for BlockQ4_K {
    fn random(rng: &mut Rng, quantized: bool) -> Self {
        if quantized {
            return Self::quantize_block(&activations(rng, Self::LEN, 0.5));
        }
        let mut b = Self::zeroed();
        b.d = scale_f16(rng);
        b.dmin = scale_f16(rng);
        b.scales.iter_mut().for_each(|x| *x = rng.byte());
        b.qs.iter_mut().for_each(|x| *x = rng.byte());
        b
    }
}

/// A matmul problem.
#[derive(Debug, Clone)]
struct Problem {
    m: usize,
    n: usize,
    kb: usize,
    lda_pad: usize,
    ldc_pad: usize,
    quantized_weights: bool,
    seed: u64,
}

/// Token and row counts: 0, 1, and one below / at / one above the tiles (MR and NR up to 8).
fn count() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => 0usize..=2,
        5 => prop::sample::select(vec![3usize, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 16, 17, 23, 33]),
        2 => 1usize..40,
    ]
}

prop_compose! {
    fn problem(max_kb: usize)(
        m in count(), n in count(), kb in 0usize..=max_kb,
        lda_pad in 0usize..3, ldc_pad in 0usize..3,
        quantized_weights in any::<bool>(), seed in any::<u64>(),
    ) -> Problem {
        Problem { m, n, kb, lda_pad, ldc_pad, quantized_weights, seed }
    }
}

/// Weight rows for one token (GEMV): one below / at / above the AVX-512 GEMV's 16-row task
/// granularity and its multiples, and enough rows for several tasks per thread.
fn gemv_rows() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 3, 15, 16, 17, 31, 32, 33, 47, 48, 49]),
        2 => 1usize..200,
    ]
}

/// Blocks per row for one token: 1, odd counts, and one below / at / above the GEMV's groups
/// of 16 blocks (and of its scale windows: 4 and 8 blocks on AVX-512, 64 on AVX2), up to
/// `max`.
fn gemv_kb(max: usize) -> impl Strategy<Value = usize> {
    let edges: Vec<usize> = [
        1usize, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 66,
    ]
    .into_iter()
    .filter(|&k| k <= max)
    .collect();
    prop_oneof![3 => prop::sample::select(edges), 1 => 1usize..=max]
}

prop_compose! {
    fn gemv_problem(max_kb: usize)(
        n in gemv_rows(), kb in gemv_kb(max_kb),
        lda_pad in 0usize..3, ldc_pad in 0usize..3,
        quantized_weights in any::<bool>(), seed in any::<u64>(),
    ) -> Problem {
        Problem { m: 1, n, kb, lda_pad, ldc_pad, quantized_weights, seed }
    }
}

/// Runs the problem on `isa` with `threads` (through [`quant::PackedWeights`] when `packed`)
/// and checks it against the reference; returns C.
fn check_matmul<W: TestWeight>(p: &Problem, isa: Isa, threads: usize, packed: bool) -> Vec<f32> {
    let k = p.kb * W::LEN;
    let mut rng = Rng(p.seed);
    let lda = k + p.lda_pad;
    let ldc = p.n + p.ldc_pad;
    let a = activations(&mut rng, p.m.max(1) * lda, 1.0);
    let w: Vec<W> = (0..p.n * p.kb)
        .map(|_| W::random(&mut rng, p.quantized_weights))
        .collect();
    let c_len = if p.m == 0 { 0 } else { (p.m - 1) * ldc + p.n };
    let mut c = vec![f32::NAN; c_len];
    let mut c_ref = vec![f32::NAN; c_len];
    let opts = QuantOptions {
        isa: Some(isa),
        parallelism: Parallelism::Threads(threads),
    };
    if packed {
        let pw = quant::PackedWeights::with_options(&opts, &w, p.n, k).unwrap();
        assert_eq!((pw.rows(), pw.cols(), pw.isa()), (p.n, k, isa));
        quant::matmul_packed_with(
            &opts,
            MatRef::new(&a, p.m, k, lda),
            &pw,
            MatMut::new(&mut c, p.m, p.n, ldc),
        )
        .unwrap();
    } else {
        quant::matmul_with(
            &opts,
            MatRef::new(&a, p.m, k, lda),
            &w,
            p.n,
            MatMut::new(&mut c, p.m, p.n, ldc),
        )
        .unwrap();
    }
    let mags = reference::quant_matmul(
        MatRef::new(&a, p.m, k, lda),
        &w,
        p.n,
        MatMut::new(&mut c_ref, p.m, p.n, ldc),
    )
    .unwrap();
    let terms = if W::FORMAT == q::QuantFormat::Q4K {
        2 * p.kb
    } else {
        p.kb
    };
    for i in 0..p.m {
        for j in 0..p.n {
            let (got, want) = (c[i * ldc + j] as f64, c_ref[i * ldc + j] as f64);
            let tol =
                gamma(terms + 4) * mags[i * p.n + j] + U * want.abs() + f32::MIN_POSITIVE as f64;
            assert!(
                (got - want).abs() <= tol,
                "{isa:?} {:?} t{threads} C[{i},{j}] = {got}, reference {want}, tol {tol}",
                W::FORMAT
            );
        }
    }
    // Padding between rows of C is never written.
    for i in 0..p.m.saturating_sub(1) {
        for j in p.n..ldc {
            assert!(c[i * ldc + j].is_nan(), "padding C[{i},{j}] was written");
        }
    }
    c
}

fn same_bits(x: &[f32], y: &[f32]) -> bool {
    x.iter()
        .zip(y)
        .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// Every ISA, on the blocks as given and on packed weights, with 1 and 3 threads.
fn check_all_isas<W: TestWeight>(p: &Problem) {
    for isa in isas() {
        let one = check_matmul::<W>(p, isa, 1, false);
        let three = check_matmul::<W>(p, isa, 3, false);
        // Each output is computed by the same operations whichever thread runs it.
        assert!(
            same_bits(&one, &three),
            "{isa:?} {:?}: 1 and 3 threads differ",
            W::FORMAT
        );
        let packed = check_matmul::<W>(p, isa, 1, true);
        let packed3 = check_matmul::<W>(p, isa, 3, true);
        assert!(
            same_bits(&packed, &packed3),
            "{isa:?} {:?}: packed, 1 and 3 threads differ",
            W::FORMAT
        );
        // From 4 tokens on, `matmul` takes the packed-panel path where the ISA has one (and
        // packed weights without it keep the blocks): the same kernel, the same bits.
        if p.m >= 4 {
            assert!(
                same_bits(&one, &packed),
                "{isa:?} {:?}: packed and plain differ for {} tokens",
                W::FORMAT,
                p.m
            );
        }
    }
}

/// The kernels against the product of the dequantized weights with the original f32
/// activations: the difference is the activations' quantization error (at most half a step
/// of their grid, plus the f16 rounding of Q8_0's scale), weighted by |ŵ|, plus f32 rounding.
fn check_against_dequantized<W: TestWeight>(p: &Problem, isa: Isa) {
    let k = p.kb * W::LEN;
    if p.m == 0 || p.n == 0 || k == 0 {
        return;
    }
    let mut rng = Rng(p.seed ^ 0xdead_beef);
    let a = activations(&mut rng, p.m * k, 1.0);
    let w: Vec<W> = (0..p.n * p.kb).map(|_| W::random(&mut rng, true)).collect();
    let mut wd = vec![0f32; p.n * k];
    q::dequantize(&w, &mut wd).unwrap();
    let mut c = vec![0f32; p.m * p.n];
    let opts = QuantOptions {
        isa: Some(isa),
        parallelism: Parallelism::Sequential,
    };
    quant::matmul_with(
        &opts,
        MatRef::dense(&a, p.m, k),
        &w,
        p.n,
        MatMut::dense(&mut c, p.m, p.n),
    )
    .unwrap();
    // The reference on the same (byte-identical) quantized activations, with its magnitude.
    let mut c_ref = vec![0f32; p.m * p.n];
    let mags = reference::quant_matmul(
        MatRef::dense(&a, p.m, k),
        &w,
        p.n,
        MatMut::dense(&mut c_ref, p.m, p.n),
    )
    .unwrap();
    let terms = if W::FORMAT == q::QuantFormat::Q4K {
        2 * p.kb
    } else {
        p.kb
    };
    let act_len = <W::Act as QuantBlock>::LEN;
    // Split |c − exact| ≤ |c − R| + |R − exact|, R the exact value on the quantized
    // activations â = d̂·q (d̂ the stored scale):
    // * |c − R| ≤ γ_(terms+4)·magnitude (the bound of `check_matmul`);
    // * R − exact = Σ ŵ_true·â − Σ ŵ·x, with ŵ the f32 dequantized weight: ŵ_true = ŵ exactly
    //   for Q8_0/Q4_0 (a ≤ 18-bit product) and within u·|ŵ| for Q4_K (one rounding of
    //   d·sc·q − dmin·m), and |â − x| ≤ step: q = round(x·id) with id = 1/d in f32 (relative
    //   error u, so |x·id − q| ≤ 1/2 + 127u), d = amax/127 rounded (1 + u), and Q8_0 stores
    //   d in f16 (|q|·|d − f16(d)| ≤ 127·2⁻¹¹·d). So |R − exact| ≤ Σ|ŵ|·step + u_w·Σ|ŵ|·(|x| + step).
    let f16_term = if act_len == q::QK {
        127.0 / 2048.0
    } else {
        0.0
    };
    let u_w = if W::FORMAT == q::QuantFormat::Q4K {
        U
    } else {
        0.0
    };
    for i in 0..p.m {
        for j in 0..p.n {
            let (mut exact, mut bound) = (0f64, 0f64);
            for (xa, xw) in a[i * k..(i + 1) * k]
                .chunks(act_len)
                .zip(wd[j * k..(j + 1) * k].chunks(act_len))
            {
                let amax = xa.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                let step = amax / 127.0 * (1.0 + U) * (0.5 + 127.0 * U + f16_term);
                for (&x, &y) in xa.iter().zip(xw) {
                    let (x, y) = (x as f64, y as f64);
                    exact += x * y;
                    bound += y.abs() * step + u_w * y.abs() * (x.abs() + step);
                }
            }
            let tol = gamma(terms + 4) * mags[i * p.n + j] + bound + f32::MIN_POSITIVE as f64;
            let got = c[i * p.n + j] as f64;
            assert!(
                (got - exact).abs() <= tol,
                "{isa:?} {:?}: C[{i},{j}] = {got}, f64 of dequantized {exact}, bound {tol}",
                W::FORMAT
            );
        }
    }
}

prop_compose! {
    /// Q4_K rows of 15 to 40 super-blocks: across the tiles' chunks of unpacked block scales
    /// (16 blocks on AVX2), with several tokens.
    fn long_q4_k_problem()(
        m in 2usize..=20, n in 1usize..=9, kb in 15usize..=40,
        lda_pad in 0usize..3, ldc_pad in 0usize..3,
        quantized_weights in any::<bool>(), seed in any::<u64>(),
    ) -> Problem {
        Problem { m, n, kb, lda_pad, ldc_pad, quantized_weights, seed }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn q4_k_long_rows_match_reference(p in long_q4_k_problem()) {
        check_all_isas::<BlockQ4_K>(&p);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn q8_0_matches_reference(p in problem(9)) {
        check_all_isas::<BlockQ8_0>(&p);
    }

    #[test]
    fn q4_0_matches_reference(p in problem(9)) {
        check_all_isas::<BlockQ4_0>(&p);
    }

    #[test]
    fn q4_k_matches_reference(p in problem(3)) {
        check_all_isas::<BlockQ4_K>(&p);
    }

    #[test]
    fn q8_0_gemv_matches_reference(p in gemv_problem(70)) {
        check_all_isas::<BlockQ8_0>(&p);
    }

    #[test]
    fn q4_0_gemv_matches_reference(p in gemv_problem(70)) {
        check_all_isas::<BlockQ4_0>(&p);
    }

    #[test]
    fn q4_k_gemv_matches_reference(p in gemv_problem(17)) {
        check_all_isas::<BlockQ4_K>(&p);
    }

    #[test]
    fn quantized_matmul_is_within_the_quantization_error(p in problem(4)) {
        for isa in isas() {
            check_against_dequantized::<BlockQ8_0>(&p, isa);
            check_against_dequantized::<BlockQ4_0>(&p, isa);
            check_against_dequantized::<BlockQ4_K>(&p, isa);
        }
    }

    #[test]
    fn activation_quantizers_match_the_reference_bytes(
        nb in 0usize..12, scale_exp in -20i32..20, seed in any::<u64>(), specials in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let scale = 2f32.powi(scale_exp);
        let mut x = activations(&mut rng, nb * q::QK_K, scale);
        if specials && !x.is_empty() {
            let len = x.len();
            x[(seed as usize) % len] = f32::NAN;
            x[(seed as usize / 7) % len] = f32::INFINITY;
            x[(seed as usize / 13) % len] = -0.0;
        }
        let mut want0 = vec![BlockQ8_0::zeroed(); nb * 8];
        let mut wantk = vec![BlockQ8_K::zeroed(); nb];
        q::quantize(&x, &mut want0).unwrap();
        q::quantize(&x, &mut wantk).unwrap();
        for isa in isas() {
            let mut got0 = vec![BlockQ8_0::zeroed(); nb * 8];
            let mut gotk = vec![BlockQ8_K::zeroed(); nb];
            quant::quantize_act_with_isa(isa, &x, &mut got0).unwrap();
            quant::quantize_act_with_isa(isa, &x, &mut gotk).unwrap();
            let b = |v: &[BlockQ8_0]| bytemuck::cast_slice::<_, u8>(v).to_vec();
            prop_assert_eq!(b(&got0), b(&want0), "{:?} q8_0", isa);
            let bk = |v: &[BlockQ8_K]| bytemuck::cast_slice::<_, u8>(v).to_vec();
            prop_assert_eq!(bk(&gotk), bk(&wantk), "{:?} q8_K", isa);
        }
    }

    #[test]
    fn dot_matches_reference(kb in 0usize..20, seed in any::<u64>(), quantized in any::<bool>()) {
        let mut rng = Rng(seed);
        let x = activations(&mut rng, kb * q::QK_K, 1.0);
        let mut a0 = vec![BlockQ8_0::zeroed(); kb * 8];
        let mut ak = vec![BlockQ8_K::zeroed(); kb];
        q::quantize(&x, &mut a0).unwrap();
        q::quantize(&x, &mut ak).unwrap();
        let w8: Vec<BlockQ8_0> = (0..kb * 8).map(|_| BlockQ8_0::random(&mut rng, quantized)).collect();
        let w4: Vec<BlockQ4_0> = (0..kb * 8).map(|_| BlockQ4_0::random(&mut rng, quantized)).collect();
        let wk: Vec<BlockQ4_K> = (0..kb).map(|_| BlockQ4_K::random(&mut rng, quantized)).collect();
        for isa in isas() {
            let check = |got: f32, (want, mag): (f64, f64), terms: usize| {
                let tol = gamma(terms + 4) * mag + U * want.abs() + f32::MIN_POSITIVE as f64;
                assert!((got as f64 - want).abs() <= tol, "{isa:?}: {got} vs {want} (tol {tol})");
            };
            check(quant::dot_with_isa(isa, &w8, &a0).unwrap(), reference::quant_dot(&w8, &a0).unwrap(), kb * 8);
            check(quant::dot_with_isa(isa, &w4, &a0).unwrap(), reference::quant_dot(&w4, &a0).unwrap(), kb * 8);
            check(quant::dot_with_isa(isa, &wk, &ak).unwrap(), reference::quant_dot(&wk, &ak).unwrap(), kb * 2);
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let a = vec![0f32; 64];
    let w = vec![BlockQ8_0::zeroed(); 4];
    let mut c = vec![0f32; 4];
    for isa in isas() {
        let opts = QuantOptions {
            isa: Some(isa),
            parallelism: Parallelism::Sequential,
        };
        // k = 48 is not a multiple of 32.
        let r = quant::matmul_with(
            &opts,
            MatRef::dense(&a[..48], 1, 48),
            &w,
            2,
            MatMut::dense(&mut c[..2], 1, 2),
        );
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        // 4 blocks for n = 3 rows of 1 block.
        let r = quant::matmul_with(
            &opts,
            MatRef::dense(&a[..32], 1, 32),
            &w,
            3,
            MatMut::dense(&mut c[..3], 1, 3),
        );
        assert!(matches!(r, Err(Error::LengthMismatch { .. })), "{r:?}");
        // C too short: 2 x 2 with ldc 2 needs 4, give 3.
        let r = quant::matmul_with(
            &opts,
            MatRef::dense(&a, 2, 32),
            &w[..2],
            2,
            MatMut::new(&mut c[..3], 2, 2, 2),
        );
        assert!(matches!(r, Err(Error::SliceTooShort { .. })), "{r:?}");
        // C of the wrong shape.
        let r = quant::matmul_with(
            &opts,
            MatRef::dense(&a, 2, 32),
            &w[..2],
            2,
            MatMut::dense(&mut c[..2], 1, 2),
        );
        assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
        // A's leading dimension below its row.
        let r = quant::matmul_with(
            &opts,
            MatRef::new(&a, 2, 32, 16),
            &w[..2],
            2,
            MatMut::dense(&mut c, 2, 2),
        );
        assert!(matches!(r, Err(Error::LeadingDimension { .. })), "{r:?}");
        // Overflowing n x blocks.
        let r = quant::matmul_with(
            &opts,
            MatRef::dense(&a[..32], 1, 32),
            &w,
            usize::MAX,
            MatMut::dense(&mut c[..0], 1, 0),
        );
        assert!(r.is_err(), "{r:?}");
        // Dot products: length mismatch, and a Q8_0 activation quant of -128.
        let mut act = [BlockQ8_0::zeroed(); 2];
        assert!(quant::dot_with_isa(isa, &w[..1], &act).is_err());
        act[0].qs[5] = i8::MIN;
        assert!(quant::dot_with_isa(isa, &w[..2], &act).is_err());
        // Q4_0 reads any activation byte: -128 is fine there.
        let w4 = [BlockQ4_0::zeroed(); 2];
        assert!(quant::dot_with_isa(isa, &w4, &act).is_ok());
        // Activation quantizers: wrong lengths and a weight format.
        let mut out = [BlockQ8_0::zeroed(); 1];
        assert!(quant::quantize_act_with_isa(isa, &a[..33], &mut out).is_err());
        assert!(quant::quantize_act_with_isa(isa, &a[..64], &mut out).is_err());
        let mut bad = [BlockQ4_0::zeroed(); 1];
        assert!(quant::quantize_act_with_isa(isa, &a[..32], &mut bad).is_err());
    }
}

/// Bytes of `n` rows of `kb` blocks of `W` packed into panels of 8 rows (rows padded to a
/// whole panel), each block and row taking `extra` bytes more than in `W`, each panel
/// rounded up to a 64-byte line.
fn packed_bound<W>(n: usize, kb: usize, extra: usize) -> usize {
    n.div_ceil(8) * (8 * kb * (std::mem::size_of::<W>() + extra)).next_multiple_of(64)
}

fn check_packed_size<W: TestWeight + Zeroable>(extra: usize) {
    for isa in isas() {
        let opts = QuantOptions {
            isa: Some(isa),
            parallelism: Parallelism::Sequential,
        };
        for (n, kb) in [(1, 1), (8, 3), (13, 5), (64, 16)] {
            let w = vec![W::zeroed(); n * kb];
            let pw = quant::PackedWeights::with_options(&opts, &w, n, kb * W::LEN).unwrap();
            let bound = packed_bound::<W>(n, kb, extra);
            assert!(
                pw.size_bytes() <= bound,
                "{isa:?} {:?} {n}x{kb}: {} > {bound}",
                W::FORMAT,
                pw.size_bytes()
            );
        }
    }
}

/// Packed weights take the blocks' bytes (Q8_0, Q4_0), or 4 more per Q4_K block (its 6-bit
/// scales and mins as bytes), up to whole panels and lines: a one-token pass over packed
/// weights reads no more than one over the blocks.
#[test]
fn packed_weights_are_the_size_of_the_blocks() {
    check_packed_size::<BlockQ8_0>(0);
    check_packed_size::<BlockQ4_0>(0);
    check_packed_size::<BlockQ4_K>(4);
}

#[test]
fn packed_weights_bad_input_is_an_error() {
    let a = vec![0f32; 128];
    let w = vec![BlockQ8_0::zeroed(); 4];
    let mut c = vec![0f32; 4];
    for isa in isas() {
        let opts = QuantOptions {
            isa: Some(isa),
            parallelism: Parallelism::Sequential,
        };
        // k = 48 is not a multiple of 32; 4 blocks for 3 rows of 1; overflowing n x blocks.
        let r = quant::PackedWeights::with_options(&opts, &w, 1, 48);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let r = quant::PackedWeights::with_options(&opts, &w, 3, 32);
        assert!(matches!(r, Err(Error::LengthMismatch { .. })), "{r:?}");
        assert!(quant::PackedWeights::with_options(&opts, &w, usize::MAX, 32).is_err());
        // 2 rows of 2 blocks.
        let pw = quant::PackedWeights::with_options(&opts, &w, 2, 64).unwrap();
        // A with 32 columns against k = 64.
        let r = quant::matmul_packed_with(
            &opts,
            MatRef::dense(&a[..64], 2, 32),
            &pw,
            MatMut::dense(&mut c, 2, 2),
        );
        assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
        // C of the wrong shape, C too short, A's leading dimension below its row.
        let r = quant::matmul_packed_with(
            &opts,
            MatRef::dense(&a[..64], 1, 64),
            &pw,
            MatMut::dense(&mut c[..3], 1, 3),
        );
        assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
        let r = quant::matmul_packed_with(
            &opts,
            MatRef::dense(&a, 2, 64),
            &pw,
            MatMut::new(&mut c[..3], 2, 2, 2),
        );
        assert!(matches!(r, Err(Error::SliceTooShort { .. })), "{r:?}");
        let r = quant::matmul_packed_with(
            &opts,
            MatRef::new(&a, 2, 64, 32),
            &pw,
            MatMut::dense(&mut c, 2, 2),
        );
        assert!(matches!(r, Err(Error::LeadingDimension { .. })), "{r:?}");
        // Another ISA than the one the weights were packed for.
        for other in isas().into_iter().filter(|&o| o != isa) {
            let o = QuantOptions {
                isa: Some(other),
                ..opts
            };
            let r = quant::matmul_packed_with(
                &o,
                MatRef::dense(&a[..64], 1, 64),
                &pw,
                MatMut::dense(&mut c[..2], 1, 2),
            );
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        }
        // Nothing was written by the failed calls; a good one works.
        assert!(c.iter().all(|&x| x == 0.0));
        quant::matmul_packed_with(
            &opts,
            MatRef::dense(&a[..64], 1, 64),
            &pw,
            MatMut::dense(&mut c[..2], 1, 2),
        )
        .unwrap();
    }
}

#[test]
fn unavailable_isa_is_an_error() {
    for isa in Isa::ALL {
        if !quant::is_available(isa) {
            let r = quant::dot_with_isa(isa, &[BlockQ8_0::zeroed()], &[BlockQ8_0::zeroed()]);
            assert!(
                matches!(r, Err(Error::IsaUnavailable { .. })),
                "{isa:?}: {r:?}"
            );
        }
    }
}

#[test]
fn non_finite_weight_scales_propagate() {
    let k = q::QK_K * 2;
    let mut rng = Rng(11);
    let a = activations(&mut rng, 5 * k, 1.0);
    fn run<W: TestWeight>(a: &[f32], k: usize, poison: impl Fn(&mut W, f32)) {
        let mut rng = Rng(5);
        let n = 9;
        let kb = k / W::LEN;
        for bad in [f32::NAN, f32::INFINITY] {
            let mut w: Vec<W> = (0..n * kb).map(|_| W::random(&mut rng, true)).collect();
            // Row 4's second block gets the bad scale.
            poison(&mut w[4 * kb + 1], bad);
            // Five tokens (packed panels where the ISA has them), three (tiles) and one (the
            // GEMV path), on the blocks and on packed weights (C's rows m.. of `c`).
            for (isa, m) in isas().into_iter().flat_map(|i| [(i, 5), (i, 3), (i, 1)]) {
                let mut c = vec![0f32; m * n];
                let opts = QuantOptions {
                    isa: Some(isa),
                    parallelism: Parallelism::Threads(2),
                };
                quant::matmul_with(
                    &opts,
                    MatRef::dense(&a[..m * k], m, k),
                    &w,
                    n,
                    MatMut::dense(&mut c, m, n),
                )
                .unwrap();
                let mut cp = vec![0f32; m * n];
                let pw = quant::PackedWeights::with_options(&opts, &w, n, k).unwrap();
                quant::matmul_packed_with(
                    &opts,
                    MatRef::dense(&a[..m * k], m, k),
                    &pw,
                    MatMut::dense(&mut cp, m, n),
                )
                .unwrap();
                c.extend_from_slice(&cp);
                for t in 0..2 * m {
                    for j in 0..n {
                        let v = c[t * n + j];
                        if j == 4 {
                            assert!(
                                !v.is_finite(),
                                "{isa:?} {:?} {bad}: C[{t},{j}] = {v}",
                                W::FORMAT
                            );
                        } else {
                            assert!(v.is_finite(), "{isa:?} {:?}: C[{t},{j}] = {v}", W::FORMAT);
                        }
                    }
                }
            }
        }
    }
    run::<BlockQ8_0>(&a, k, |b, v| b.d = f16::from_f32(v));
    run::<BlockQ4_0>(&a, k, |b, v| b.d = f16::from_f32(v));
    run::<BlockQ4_K>(&a, k, |b, v| b.d = f16::from_f32(v));
    run::<BlockQ4_K>(&a, k, |b, v| b.dmin = f16::from_f32(v));
}
