//! Property tests: every available ISA x every B dtype x both B layouts against
//! `tessera_core::reference::gemm`, plus bad-input and IEEE behaviour.
//!
//! Tolerance (derived, not tuned): B's f16/bf16 values convert to f32 exactly and the
//! reference uses the same converted values, so the only error is f32 arithmetic. A length-k
//! dot product accumulated in f32 (in any order, fused or not) is within γ_k·Σ|aᵢbᵢ| of the
//! exact value, γ_j = j·u/(1 − j·u), u = 2⁻²⁴. The blocked kernel adds one rounding per `kc`
//! block when it adds the block's sum into C (at most k more) and one each for α and β, so
//! every element must satisfy |c − c_ref| ≤ γ_{2k+4}·(|α|·Σₚ|aᵢₚbₚⱼ| + |β·cᵢⱼ|), plus the
//! reference's own final rounding to f32 (u·|c_ref|) and the smallest normal f32 as a floor
//! for results that underflow.

use half::{bf16, f16};
use proptest::prelude::*;
use tessera_core::{Element, Error, MatMut, MatRef, Transpose, reference};
use tessera_cpu::gemm::{self, Blocking, GemmOptions};
use tessera_cpu::{Isa, Parallelism};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(j: usize) -> f64 {
    let ju = j as f64 * U;
    ju / (1.0 - ju)
}

/// A GEMM problem: shapes, strides, scalars and data.
#[derive(Debug, Clone)]
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    trans: Transpose,
    alpha: f32,
    beta: f32,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl Problem {
    fn b_dims(&self) -> (usize, usize) {
        match self.trans {
            Transpose::No => (self.k, self.n),
            Transpose::Yes => (self.n, self.k),
        }
    }
}

/// Dimensions that hit 0, 1, primes and one below / at / one above the tile edges of every
/// variant (MR 4, 6, 8, 12; NR 4, 12, 16, 32) and of the blocks the tests force.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..=3,
        4 => prop::sample::select(vec![
            5usize, 6, 7, 8, 9, 11, 12, 13, 15, 16, 17, 23, 24, 25, 31, 32, 33, 37, 47, 48, 49,
            61, 64, 65, 97,
        ]),
        3 => 1usize..80,
    ]
}

fn scalar_pair() -> impl Strategy<Value = (f32, f32)> {
    let alpha = prop_oneof![Just(1.0f32), Just(0.0), Just(-0.5), -2.0f32..2.0];
    let beta = prop_oneof![Just(0.0f32), Just(1.0), Just(-1.5), -2.0f32..2.0];
    (alpha, beta)
}

prop_compose! {
    fn problem()(
        m in dim(), n in dim(), k in dim(),
        pads in (0usize..3, 0usize..3, 0usize..3),
        trans in prop_oneof![Just(Transpose::No), Just(Transpose::Yes)],
        (alpha, beta) in scalar_pair(),
        seed in any::<u64>(),
    ) -> Problem {
        let lda = k + pads.0 * 3;
        let (brows, bcols) = match trans { Transpose::No => (k, n), Transpose::Yes => (n, k) };
        let ldb = bcols + pads.1 * 5;
        let ldc = n + pads.2 * 2;
        let mut rng = Lcg(seed);
        let mut fill = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next_f32()).collect() };
        let a = fill(if m == 0 { 0 } else { (m - 1) * lda + k });
        let b = fill(if brows == 0 { 0 } else { (brows - 1) * ldb + bcols });
        let c = fill(if m == 0 { 0 } else { (m - 1) * ldc + n });
        Problem { m, n, k, lda, ldb, ldc, trans, alpha, beta, a, b, c }
    }
}

/// Small deterministic generator for bulk data (values in [-1, 1)).
struct Lcg(u64);
impl Lcg {
    fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Runs `opts` on the problem with B stored as `E`, checks every element against the
/// reference within the derived bound, and checks that elements outside the matrix (the
/// leading-dimension padding) are untouched. Returns the result for further comparisons.
fn check<E: Element>(p: &Problem, opts: &GemmOptions) -> Result<Vec<f32>, TestCaseError> {
    let b: Vec<E> = p.b.iter().map(|&x| E::from_f32(x)).collect();
    let (br, bc) = p.b_dims();
    let a = MatRef::new(&p.a, p.m, p.k, p.lda);
    let bm = MatRef::new(&b, br, bc, p.ldb);

    let mut want = p.c.clone();
    reference::gemm(
        p.alpha,
        a,
        bm,
        p.trans,
        p.beta,
        MatMut::new(&mut want, p.m, p.n, p.ldc),
    )
    .unwrap();
    let mag = reference::gemm_magnitude(
        p.alpha,
        a,
        bm,
        p.trans,
        p.beta,
        MatRef::new(&p.c, p.m, p.n, p.ldc),
    )
    .unwrap();

    let mut got = p.c.clone();
    gemm::gemm_with(
        opts,
        p.alpha,
        a,
        bm,
        p.trans,
        p.beta,
        MatMut::new(&mut got, p.m, p.n, p.ldc),
    )
    .unwrap();

    let g = gamma(2 * p.k + 4);
    for i in 0..p.m {
        for j in 0..p.ldc.min(got.len() - i * p.ldc) {
            let idx = i * p.ldc + j;
            if j >= p.n {
                prop_assert_eq!(
                    got[idx].to_bits(),
                    p.c[idx].to_bits(),
                    "padding ({}, {}) written",
                    i,
                    j
                );
                continue;
            }
            let tol = g * mag[i * p.n + j]
                + U * f64::from(want[idx].abs())
                + f64::from(f32::MIN_POSITIVE);
            let err = (f64::from(got[idx]) - f64::from(want[idx])).abs();
            prop_assert!(
                err <= tol,
                "({}, {}) of {}x{}x{} {:?} on {:?}: got {} want {} err {:e} > tol {:e}",
                i,
                j,
                p.m,
                p.n,
                p.k,
                p.trans,
                opts.isa,
                got[idx],
                want[idx],
                err,
                tol
            );
        }
    }
    Ok(got)
}

/// Small blocks so that multi-block paths (several kc blocks accumulating into C with β = 1,
/// several mc blocks, several nc panels) run on small shapes.
const SMALL_BLOCKS: Blocking = Blocking {
    mc: 13,
    kc: 7,
    nc: 21,
};

fn all_options() -> Vec<GemmOptions> {
    let mut v = Vec::new();
    for isa in Isa::available() {
        for blocking in [None, Some(SMALL_BLOCKS)] {
            for parallelism in [Parallelism::Sequential, Parallelism::Threads(3)] {
                v.push(GemmOptions {
                    isa: Some(isa),
                    parallelism,
                    blocking,
                });
            }
        }
    }
    v
}

fn check_all<E: Element>(p: &Problem) -> Result<(), TestCaseError> {
    for isa in Isa::available() {
        for blocking in [None, Some(SMALL_BLOCKS)] {
            let seq = GemmOptions {
                isa: Some(isa),
                parallelism: Parallelism::Sequential,
                blocking,
            };
            let one = check::<E>(p, &seq)?;
            // Multi-threaded: also within the bound, and bit-identical to one thread.
            let par = GemmOptions {
                parallelism: Parallelism::Threads(3),
                ..seq
            };
            let many = check::<E>(p, &par)?;
            let same = one
                .iter()
                .zip(&many)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            prop_assert!(same, "{:?}: 3 threads differ from 1", isa);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn f32_matches_reference(p in problem()) { check_all::<f32>(&p)?; }

    #[test]
    fn f16_matches_reference(p in problem()) { check_all::<f16>(&p)?; }

    #[test]
    fn bf16_matches_reference(p in problem()) { check_all::<bf16>(&p)?; }

    /// One-row products take the GEMV path: long rows and many columns.
    #[test]
    fn gemv_matches_reference(
        n in prop_oneof![1usize..40, 250usize..700],
        k in prop_oneof![1usize..40, 500usize..1100],
        trans in prop_oneof![Just(Transpose::No), Just(Transpose::Yes)],
        (alpha, beta) in scalar_pair(),
        seed in any::<u64>(),
    ) {
        let mut rng = Lcg(seed);
        let (br, bc) = match trans { Transpose::No => (k, n), Transpose::Yes => (n, k) };
        let p = Problem {
            m: 1, n, k, lda: k, ldb: bc, ldc: n, trans, alpha, beta,
            a: (0..k).map(|_| rng.next_f32()).collect(),
            b: (0..br * bc).map(|_| rng.next_f32()).collect(),
            c: (0..n).map(|_| rng.next_f32()).collect(),
        };
        check_all::<f16>(&p)?;
        check_all::<bf16>(&p)?;
        check_all::<f32>(&p)?;
    }
}

/// Shapes around the default (cache-derived) block edges, on the best ISA only: sizes the
/// random strategy does not reach.
#[test]
fn default_block_edges() {
    let isa = Isa::detect();
    let blk = gemm::blocking(isa).unwrap();
    let (mr, nr) = gemm::tile_shape(isa).unwrap();
    for (m, n, k) in [
        (blk.mc + 1, nr + 1, blk.kc + 1),
        (blk.mc - 1, 2 * nr - 1, blk.kc - 1),
        (2 * mr + 1, 3 * nr, 2 * blk.kc + 3),
    ] {
        let mut rng = Lcg((m * 31 + n * 7 + k) as u64);
        for trans in [Transpose::No, Transpose::Yes] {
            let (br, bc) = match trans {
                Transpose::No => (k, n),
                Transpose::Yes => (n, k),
            };
            let p = Problem {
                m,
                n,
                k,
                lda: k,
                ldb: bc,
                ldc: n,
                trans,
                alpha: 0.75,
                beta: -0.5,
                a: (0..m * k).map(|_| rng.next_f32()).collect(),
                b: (0..br * bc).map(|_| rng.next_f32()).collect(),
                c: (0..m * n).map(|_| rng.next_f32()).collect(),
            };
            for opts in [
                GemmOptions {
                    isa: Some(isa),
                    ..Default::default()
                },
                GemmOptions {
                    isa: Some(isa),
                    parallelism: Parallelism::Threads(2),
                    blocking: None,
                },
            ] {
                check::<f16>(&p, &opts).unwrap();
                check::<f32>(&p, &opts).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bad input: a clear Err, never a panic or an out-of-bounds access.

fn run(
    a: (&[f32], usize, usize, usize),
    b: (&[f32], usize, usize, usize),
    c: (&mut [f32], usize, usize, usize),
    trans: Transpose,
) -> Result<(), Error> {
    gemm::gemm(
        1.0,
        MatRef::new(a.0, a.1, a.2, a.3),
        MatRef::new(b.0, b.1, b.2, b.3),
        trans,
        0.0,
        MatMut::new(c.0, c.1, c.2, c.3),
        Parallelism::Auto,
    )
}

#[test]
fn short_slices_are_errors() {
    let (a, b, mut c) = (vec![0.0; 6], vec![0.0; 12], vec![0.0; 8]);
    // A needs 2 x 3 = 6; give 5.
    let e = run(
        (&a[..5], 2, 3, 3),
        (&b, 3, 4, 4),
        (&mut c, 2, 4, 4),
        Transpose::No,
    );
    assert!(
        matches!(
            e,
            Err(Error::SliceTooShort {
                name: "A",
                needed: 6,
                actual: 5,
                ..
            })
        ),
        "{e:?}"
    );
    let e = run(
        (&a, 2, 3, 3),
        (&b[..11], 3, 4, 4),
        (&mut c, 2, 4, 4),
        Transpose::No,
    );
    assert!(
        matches!(e, Err(Error::SliceTooShort { name: "B", .. })),
        "{e:?}"
    );
    let e = run(
        (&a, 2, 3, 3),
        (&b, 3, 4, 4),
        (&mut c[..7], 2, 4, 4),
        Transpose::No,
    );
    assert!(
        matches!(e, Err(Error::SliceTooShort { name: "C", .. })),
        "{e:?}"
    );
}

#[test]
fn leading_dimension_below_row_is_an_error() {
    let (a, b, mut c) = (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
    let e = run(
        (&a, 2, 3, 2),
        (&b, 3, 4, 4),
        (&mut c, 2, 4, 4),
        Transpose::No,
    );
    assert!(
        matches!(
            e,
            Err(Error::LeadingDimension {
                name: "A",
                ld: 2,
                cols: 3
            })
        ),
        "{e:?}"
    );
    let e = run(
        (&a, 2, 3, 3),
        (&b, 4, 3, 2),
        (&mut c, 2, 4, 4),
        Transpose::Yes,
    );
    assert!(
        matches!(e, Err(Error::LeadingDimension { name: "B", .. })),
        "{e:?}"
    );
    let e = run(
        (&a, 2, 3, 3),
        (&b, 3, 4, 4),
        (&mut c, 2, 4, 3),
        Transpose::No,
    );
    assert!(
        matches!(e, Err(Error::LeadingDimension { name: "C", .. })),
        "{e:?}"
    );
}

#[test]
fn mismatched_dimensions_are_errors() {
    let (a, b, mut c) = (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
    // k of A (3) vs rows of B (4).
    let e = run(
        (&a, 2, 3, 3),
        (&b, 4, 4, 4),
        (&mut c, 2, 4, 4),
        Transpose::No,
    );
    assert!(matches!(e, Err(Error::ShapeMismatch { .. })), "{e:?}");
    // Transposed B must be [n, k]: [4, 3] fits, [3, 4] does not.
    let e = run(
        (&a, 2, 3, 3),
        (&b, 3, 4, 4),
        (&mut c, 2, 4, 4),
        Transpose::Yes,
    );
    assert!(matches!(e, Err(Error::ShapeMismatch { .. })), "{e:?}");
    assert!(
        run(
            (&a, 2, 3, 3),
            (&b, 4, 3, 3),
            (&mut c, 2, 4, 4),
            Transpose::Yes
        )
        .is_ok()
    );
    // C of the wrong shape.
    let e = run(
        (&a, 2, 3, 3),
        (&b, 3, 4, 4),
        (&mut c, 3, 4, 4),
        Transpose::No,
    );
    assert!(matches!(e, Err(Error::ShapeMismatch { .. })), "{e:?}");
}

#[test]
fn size_overflow_is_an_error() {
    // Empty slices with huge dimensions: the extent overflows usize.
    let e = run(
        (&[], usize::MAX / 2, 3, 3),
        (&[], 3, 1, 1),
        (&mut [], usize::MAX / 2, 1, 1),
        Transpose::No,
    );
    assert!(matches!(e, Err(Error::Overflow { .. })), "{e:?}");
    // m*n*k overflows even though every matrix is empty-sized in one dimension... use k = 0
    // columns of A with huge m and n: A and C extents are fine only if a dimension is 0.
    let e = run(
        (&[], 1 << 40, 0, 0),
        (&[], 0, 1 << 40, 1 << 40),
        (&mut [], 1 << 40, 1 << 40, 1 << 40),
        Transpose::No,
    );
    assert!(matches!(e, Err(Error::Overflow { .. })), "{e:?}");
}

#[test]
fn unavailable_isa_is_an_error() {
    let (a, b, mut c) = ([1.0f32], [1.0f32], [0.0f32]);
    for isa in Isa::ALL {
        let r = gemm::gemm_with_isa(
            isa,
            1.0,
            MatRef::dense(&a, 1, 1),
            MatRef::dense(&b, 1, 1),
            Transpose::No,
            0.0,
            MatMut::dense(&mut c, 1, 1),
            Parallelism::Sequential,
        );
        if isa.is_available() {
            assert!(r.is_ok());
            assert_eq!(c, [1.0]);
        } else {
            assert_eq!(r, Err(Error::IsaUnavailable { isa: isa.name() }));
        }
    }
}

#[test]
fn zero_blocking_is_an_error() {
    let (a, b, mut c) = ([1.0f32], [1.0f32], [0.0f32]);
    let opts = GemmOptions {
        blocking: Some(Blocking {
            mc: 0,
            kc: 4,
            nc: 4,
        }),
        ..Default::default()
    };
    let r = gemm::gemm_with(
        &opts,
        1.0,
        MatRef::dense(&a, 1, 1),
        MatRef::dense(&b, 1, 1),
        Transpose::No,
        0.0,
        MatMut::dense(&mut c, 1, 1),
    );
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
}

// ---------------------------------------------------------------------------------------
// IEEE propagation.

#[test]
fn nan_and_inf_propagate() {
    for opts in all_options() {
        for (m, n, k) in [(1, 5, 9), (7, 19, 11)] {
            let mut a = vec![1.0f32; m * k];
            let b = vec![1.0f32; k * n];
            a[k - 1] = f32::NAN; // row 0 of A has a NaN
            if m > 1 {
                a[k] = f32::INFINITY; // row 1 has +inf
            }
            let mut c = vec![0.0f32; m * n];
            gemm::gemm_with(
                &opts,
                1.0,
                MatRef::dense(&a, m, k),
                MatRef::dense(&b, k, n),
                Transpose::No,
                0.0,
                MatMut::dense(&mut c, m, n),
            )
            .unwrap();
            assert!(c[..n].iter().all(|x| x.is_nan()), "{opts:?}: NaN row");
            if m > 1 {
                assert!(
                    c[n..2 * n].iter().all(|&x| x == f32::INFINITY),
                    "{opts:?}: inf row"
                );
                assert!(
                    c[2 * n..].iter().all(|&x| x == k as f32),
                    "{opts:?}: finite rows"
                );
            }
            // inf - inf = NaN through B.
            let mut b2 = b.clone();
            b2[0] = f32::INFINITY;
            b2[n] = f32::NEG_INFINITY;
            let a2 = vec![1.0f32; m * k];
            let mut c2 = vec![0.0f32; m * n];
            gemm::gemm_with(
                &opts,
                1.0,
                MatRef::dense(&a2, m, k),
                MatRef::dense(&b2, k, n),
                Transpose::No,
                0.0,
                MatMut::dense(&mut c2, m, n),
            )
            .unwrap();
            if k >= 2 {
                assert!((0..m).all(|i| c2[i * n].is_nan()), "{opts:?}: inf - inf");
            }
        }
    }
}

#[test]
fn beta_zero_ignores_nan_in_c_and_alpha_zero_ignores_a_and_b() {
    for opts in all_options() {
        let (m, n, k) = (5, 17, 3);
        let a = vec![2.0f32; m * k];
        let b = vec![1.0f32; k * n];
        let mut c = vec![f32::NAN; m * n];
        gemm::gemm_with(
            &opts,
            1.0,
            MatRef::dense(&a, m, k),
            MatRef::dense(&b, k, n),
            Transpose::No,
            0.0,
            MatMut::dense(&mut c, m, n),
        )
        .unwrap();
        assert!(c.iter().all(|&x| x == 6.0), "{opts:?}");
        let a = vec![f32::NAN; m * k];
        let mut c = vec![4.0f32; m * n];
        gemm::gemm_with(
            &opts,
            0.0,
            MatRef::dense(&a, m, k),
            MatRef::dense(&b, k, n),
            Transpose::No,
            0.5,
            MatMut::dense(&mut c, m, n),
        )
        .unwrap();
        assert!(c.iter().all(|&x| x == 2.0), "{opts:?}");
    }
}

/// Regression (found by the fuzzer): a valid but huge leading dimension of B (any ld ≥ n is
/// allowed when B has one row) must not overflow the GEMV's prefetch address arithmetic.
#[test]
fn huge_leading_dimension_of_a_one_row_b() {
    for opts in all_options() {
        let mut c = [0.0f32; 16];
        gemm::gemm_with(
            &opts,
            1.0,
            MatRef::dense(&[2.0f32], 1, 1),
            MatRef::new(&[1.5f32; 16], 1, 16, usize::MAX),
            Transpose::No,
            0.0,
            MatMut::dense(&mut c, 1, 16),
        )
        .unwrap();
        assert_eq!(c, [3.0; 16], "{opts:?}");
        // Two rows of A take the blocked (packing) path.
        let mut c = [0.0f32; 32];
        gemm::gemm_with(
            &opts,
            1.0,
            MatRef::dense(&[2.0f32, -1.0], 2, 1),
            MatRef::new(&[1.5f32; 16], 1, 16, usize::MAX),
            Transpose::No,
            0.0,
            MatMut::dense(&mut c, 2, 16),
        )
        .unwrap();
        assert_eq!(c[..16], [3.0; 16], "{opts:?}");
        assert_eq!(c[16..], [-1.5; 16], "{opts:?}");
        let mut c = [0.0f32; 1];
        gemm::gemm_with(
            &opts,
            1.0,
            MatRef::dense(&[1.0f32; 64], 1, 64),
            MatRef::new(&[0.5f32; 64], 1, 64, usize::MAX),
            Transpose::Yes,
            0.0,
            MatMut::dense(&mut c, 1, 1),
        )
        .unwrap();
        assert_eq!(c, [32.0], "{opts:?}");
    }
}
