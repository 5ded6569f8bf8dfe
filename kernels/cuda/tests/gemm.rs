//! The tensor-core GEMM against `tessera_core::reference::gemm`: property tests on the GPU
//! (f16 and bf16 × both B layouts × every `mma.sync` tile × `wgmma` where the device is
//! sm_90a; skipped with one line where there is no GPU), fixed edge cases (IEEE propagation,
//! α = 0, k = 0, empty shapes, refused paths), and host-only tests of `validate` / `path_for`
//! that run everywhere.
//!
//! Tolerance (derived, not tuned): A and B are generated as exact f16/bf16 values and the
//! reference is given the same values (A converted to f32 exactly), so every product is exact
//! in f32 and the only error is the accumulation. The tensor cores add the products of one
//! MMA in a multi-term adder that aligns to the largest exponent and truncates (Fasi, Higham,
//! Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", 2021): each of the k terms,
//! each of the ≤ 16 terms of one MMA step again at the alignment, and α·acc, β·c and their sum
//! can each lose up to one f32 ulp (round toward zero: relative 2⁻²³), so
//! |c − c_ref| ≤ (k + 16 + 3)·2⁻²³·(|α|·Σₚ|aᵢₚbₚⱼ| + |β·cᵢⱼ|) to first order. The test allows
//! twice that unit, (k + 32)·2⁻²², plus the reference's own rounding to f32 (2⁻²⁴·|c_ref|) and
//! the smallest normal f32 as a floor. A wrong index or a missed tile is an O(1) relative error.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tessera_core::{Element, MatMut, MatRef, Transpose, bf16, f16, reference};
use tessera_cuda::gemm::{
    self, GemmArgs, GemmElement, GemmPath, MmaTile, cublas_gemm_f32out, cublas_handle, path_for,
    validate,
};
use tessera_cuda::{Device, DeviceInfo, Error, test_device};

const POISON: u32 = 0x7fc0_0001;

// ---------------------------------------------------------------------------------------------
// Problems

/// A GEMM problem: shapes, strides, element offsets of the three buffers (to misalign them),
/// scalars and data (A and B hold values exact in f16 and bf16 alike: 8 significant bits).
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
    /// Elements before the matrix in each device buffer.
    offs: (usize, usize, usize),
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

    fn args(&self) -> GemmArgs {
        GemmArgs {
            m: self.m,
            n: self.n,
            k: self.k,
            lda: self.lda,
            ldb: self.ldb,
            ldc: self.ldc,
            trans_b: self.trans,
            alpha: self.alpha,
            beta: self.beta,
        }
    }
}

/// Small deterministic generator for bulk data.
struct Lcg(u64);
impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
    /// In [-1, 1) with 8 significant bits: exact in f16 (11) and bf16 (8).
    fn next_exact(&mut self) -> f32 {
        bf16::from_f32(self.next_f32()).to_f32()
    }
}

fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

/// Dimensions at 0, 1, primes and one below / at / one above every tile edge: mma tiles 64,
/// 128, 256 (m, n) and k-tile 32; wgmma tiles 128 (m), 256 (n), k-tile 64.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => 0usize..=3,
        5 => prop::sample::select(vec![
            1usize, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 37, 63, 64, 65, 97, 127, 128, 129, 191,
            192, 193, 255, 256, 257, 300,
        ]),
        3 => 1usize..200,
    ]
}

/// A leading dimension for a row of `cols`: dense, padded to a multiple of 8 (the 16-byte
/// paths), or padded by an odd amount.
fn ld_for(cols: usize, mode: u8) -> usize {
    match mode % 3 {
        0 => cols,
        1 => cols.div_ceil(8) * 8 + 8 * (mode as usize / 3 % 2),
        _ => cols + 1 + 2 * (mode as usize / 3 % 3),
    }
}

fn scalar_pair() -> impl Strategy<Value = (f32, f32)> {
    let alpha = prop_oneof![Just(1.0f32), Just(0.0), Just(-0.5), -2.0f32..2.0];
    let beta = prop_oneof![Just(0.0f32), Just(1.0), Just(-1.5), -2.0f32..2.0];
    (alpha, beta)
}

prop_compose! {
    fn problem()(
        m in dim(), n in dim(), k in dim(),
        modes in (any::<u8>(), any::<u8>(), any::<u8>()),
        offs in prop_oneof![
            3 => Just((0usize, 0usize, 0usize)),
            1 => (0usize..3, 0usize..3, 0usize..3).prop_map(|(a, b, c)| (a * 8, b * 8, c * 2)),
            1 => (0usize..9, 0usize..9, 0usize..3),
        ],
        trans in prop_oneof![Just(Transpose::No), Just(Transpose::Yes)],
        (alpha, beta) in scalar_pair(),
        seed in any::<u64>(),
    ) -> Problem {
        let (brows, bcols) = match trans { Transpose::No => (k, n), Transpose::Yes => (n, k) };
        let lda = ld_for(k, modes.0);
        let ldb = ld_for(bcols, modes.1);
        let ldc = ld_for(n, modes.2);
        let mut rng = Lcg(seed);
        let a = (0..extent(m, k, lda)).map(|_| rng.next_exact()).collect();
        let b = (0..extent(brows, bcols, ldb)).map(|_| rng.next_exact()).collect();
        let c = (0..extent(m, n, ldc)).map(|_| rng.next_f32()).collect();
        Problem { m, n, k, lda, ldb, ldc, trans, alpha, beta, offs, a, b, c }
    }
}

// ---------------------------------------------------------------------------------------------
// Running and checking

/// Which launcher a check runs.
#[derive(Debug, Clone, Copy)]
enum Run {
    Path(GemmPath),
    Tile(MmaTile),
    Cublas,
}

/// Device buffers of a problem: each matrix at its element offset inside a longer buffer.
struct Buffers<E: GemmElement> {
    a: CudaSlice<E>,
    b: CudaSlice<E>,
    c: CudaSlice<f32>,
    /// The C buffer as uploaded (poisoned with NaN inside the matrix when β = 0).
    c_host: Vec<f32>,
}

fn upload<E: GemmElement + Element>(dev: &Device, p: &Problem) -> Buffers<E> {
    let to_e = |v: &[f32], off: usize| -> Vec<E> {
        let mut out = vec![E::from_f32(0.25); off];
        out.extend(v.iter().map(|&x| E::from_f32(x)));
        // Keep every buffer non-empty so that a view at the offset exists.
        out.push(E::from_f32(0.5));
        out
    };
    let mut c_host = vec![f32::from_bits(POISON); p.offs.2];
    for (idx, &x) in p.c.iter().enumerate() {
        let (i, j) = (idx / p.ldc.max(1), idx % p.ldc.max(1));
        let inside = i < p.m && j < p.n;
        c_host.push(if p.beta == 0.0 && inside {
            f32::from_bits(POISON)
        } else {
            x
        });
    }
    c_host.push(-7.0);
    Buffers {
        a: dev.upload(&to_e(&p.a, p.offs.0)).unwrap(),
        b: dev.upload(&to_e(&p.b, p.offs.1)).unwrap(),
        c: dev.upload(&c_host).unwrap(),
        c_host,
    }
}

fn launch<E: GemmElement, A: DevicePtr<E>, B: DevicePtr<E>, C: DevicePtrMut<f32>>(
    dev: &Device,
    run: Run,
    args: &GemmArgs,
    a: &A,
    b: &B,
    c: &mut C,
) -> tessera_cuda::Result<()> {
    match run {
        Run::Path(path) => gemm::gemm(dev, path, args, a, b, c),
        Run::Tile(tile) => gemm::gemm_mma_tile(dev, tile, args, a, b, c),
        Run::Cublas => {
            let blas = cublas_handle(dev)?;
            cublas_gemm_f32out(&blas, args, a, b, c)
        }
    }
}

/// Runs `run` on the problem with A and B stored as `E`, checks every element against the
/// reference within the derived bound and that nothing outside the matrix changed.
/// The reference result and the error-bound magnitudes of a problem with B stored as `E`.
struct Expected {
    want: Vec<f32>,
    mag: Vec<f64>,
}

fn expected<E: Element>(p: &Problem) -> Expected {
    let b_e: Vec<E> = p.b.iter().map(|&x| E::from_f32(x)).collect();
    let (br, bc) = p.b_dims();
    let a = MatRef::new(&p.a, p.m, p.k, p.lda);
    let bm = MatRef::new(&b_e, br, bc, p.ldb);
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
    Expected { want, mag }
}

fn check<E: GemmElement + Element>(
    dev: &Device,
    p: &Problem,
    exp: &Expected,
    run: Run,
) -> Result<(), TestCaseError> {
    let Expected { want, mag } = exp;
    let mut bufs = upload::<E>(dev, p);
    {
        let av = bufs.a.slice(p.offs.0..);
        let bv = bufs.b.slice(p.offs.1..);
        let mut cv = bufs.c.slice_mut(p.offs.2..);
        launch::<E, _, _, _>(dev, run, &p.args(), &av, &bv, &mut cv)
            .map_err(|e| TestCaseError::fail(format!("{run:?}: {e}")))?;
    }
    dev.synchronize()
        .map_err(|e| TestCaseError::fail(format!("{run:?}: {e}")))?;
    let got = dev.download(&bufs.c).unwrap();

    let unit = (p.k as f64 + 32.0) * 2f64.powi(-22);
    for (idx, (&g, &orig)) in got.iter().zip(&bufs.c_host).enumerate() {
        let inside_idx = idx.checked_sub(p.offs.2).filter(|&x| x < p.c.len());
        let pos = inside_idx.map(|x| (x / p.ldc.max(1), x % p.ldc.max(1)));
        match pos {
            Some((i, j)) if i < p.m && j < p.n => {
                let w = want[i * p.ldc + j];
                let tol = unit * mag[i * p.n + j]
                    + 2f64.powi(-24) * f64::from(w.abs())
                    + f64::from(f32::MIN_POSITIVE);
                let err = (f64::from(g) - f64::from(w)).abs();
                prop_assert!(
                    err <= tol,
                    "{:?} {}: ({}, {}) of {}x{}x{} {:?} lda {} ldb {} ldc {} offs {:?} α {} β {}: got {} want {} err {:e} > tol {:e}",
                    run,
                    <E as GemmElement>::DTYPE,
                    i,
                    j,
                    p.m,
                    p.n,
                    p.k,
                    p.trans,
                    p.lda,
                    p.ldb,
                    p.ldc,
                    p.offs,
                    p.alpha,
                    p.beta,
                    g,
                    w,
                    err,
                    tol
                );
            }
            _ => prop_assert_eq!(
                g.to_bits(),
                orig.to_bits(),
                "{:?}: element {} outside the matrix written ({}x{} ldc {} off {})",
                run,
                idx,
                p.m,
                p.n,
                p.ldc,
                p.offs.2
            ),
        }
    }
    Ok(())
}

/// Every launcher that can run the problem on this device: each mma tile, Auto, and wgmma
/// where it qualifies (where it does not, asking for it must be refused, not run).
fn check_all<E: GemmElement + Element>(dev: &Device, p: &Problem) -> Result<(), TestCaseError> {
    let exp = expected::<E>(p);
    for tile in MmaTile::ALL {
        check::<E>(dev, p, &exp, Run::Tile(tile))?;
    }
    check::<E>(dev, p, &exp, Run::Path(GemmPath::Mma))?;
    check::<E>(dev, p, &exp, Run::Path(GemmPath::Auto))?;
    let aligned_ptrs = p.offs.0.is_multiple_of(8) && p.offs.1.is_multiple_of(8);
    let wgmma_ok = path_for(dev.info(), &p.args(), GemmPath::Wgmma).is_ok();
    if wgmma_ok && (aligned_ptrs || p.m == 0 || p.n == 0 || p.k == 0 || p.alpha == 0.0) {
        check::<E>(dev, p, &exp, Run::Path(GemmPath::Wgmma))?;
    } else {
        let mut bufs = upload::<E>(dev, p);
        let av = bufs.a.slice(p.offs.0..);
        let bv = bufs.b.slice(p.offs.1..);
        let mut cv = bufs.c.slice_mut(p.offs.2..);
        let r = gemm::gemm(dev, GemmPath::Wgmma, &p.args(), &av, &bv, &mut cv);
        prop_assert!(
            matches!(r, Err(Error::Unsupported(_))),
            "wgmma not refused: {:?}",
            r
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
    runner(64)
        .run(&problem(), |p| check_all::<f16>(dev, &p))
        .unwrap();
}

#[test]
fn bf16_matches_reference() {
    let Some(dev) = test_device() else { return };
    runner(64)
        .run(&problem(), |p| check_all::<bf16>(dev, &p))
        .unwrap();
}

/// Larger shapes than the random strategy reaches: several groups of 8 tile rows (the grouped
/// block order), partial last groups, many k-tiles, every tile and path.
#[test]
fn large_shapes_and_grouped_order() {
    let Some(dev) = test_device() else { return };
    let mut rng = Lcg(7);
    for &(m, n, k, trans) in &[
        (1100usize, 600usize, 70usize, Transpose::Yes),
        (1029, 513, 131, Transpose::No),
        (2048, 1024, 64, Transpose::Yes),
        (130, 2000, 520, Transpose::No),
    ] {
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
            offs: (0, 0, 0),
            a: (0..m * k).map(|_| rng.next_exact()).collect(),
            b: (0..br * bc).map(|_| rng.next_exact()).collect(),
            c: (0..m * n).map(|_| rng.next_f32()).collect(),
        };
        check_all::<f16>(dev, &p).unwrap();
        check_all::<bf16>(dev, &p).unwrap();
    }
}

#[test]
fn cublas_peer_matches_reference() {
    let Some(dev) = test_device() else { return };
    if let Err(e) = cublas_handle(dev) {
        eprintln!("tessera-cuda: skipping the cuBLAS check: {e}");
        return;
    }
    let mut r = runner(24);
    r.run(&problem(), |p| {
        check::<f16>(dev, &p, &expected::<f16>(&p), Run::Cublas)?;
        check::<bf16>(dev, &p, &expected::<bf16>(&p), Run::Cublas)
    })
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Fixed cases on the GPU

/// The launchers to run fixed cases through on this device.
fn all_runs(dev: &Device) -> Vec<Run> {
    let mut v: Vec<Run> = MmaTile::ALL.iter().map(|&t| Run::Tile(t)).collect();
    v.push(Run::Path(GemmPath::Auto));
    if dev.info().has_sm90a() {
        v.push(Run::Path(GemmPath::Wgmma));
    }
    v
}

fn run_dense(dev: &Device, run: Run, args: &GemmArgs, a: &[f16], b: &[f16], c: &[f32]) -> Vec<f32> {
    let ab = dev.upload(a).unwrap();
    let bb = dev.upload(b).unwrap();
    let mut cb = dev.upload(c).unwrap();
    launch::<f16, _, _, _>(dev, run, args, &ab, &bb, &mut cb).unwrap();
    dev.synchronize().unwrap();
    dev.download(&cb).unwrap()
}

#[test]
fn nan_and_inf_propagate() {
    let Some(dev) = test_device() else { return };
    for run in all_runs(dev) {
        // Leading dimensions are multiples of 8, so that the wgmma path runs these too.
        for &(m, n, k) in &[(3usize, 8usize, 16usize), (7, 24, 72)] {
            let one = f16::from_f32(1.0);
            let mut a = vec![one; m * k];
            a[k - 1] = f16::NAN; // row 0 holds a NaN
            a[k] = f16::INFINITY; // row 1 holds +inf
            let b = vec![one; k * n];
            let args = GemmArgs::dense(m, n, k, Transpose::No);
            let c = run_dense(dev, run, &args, &a, &b, &vec![0.0; m * n]);
            assert!(
                c[..n].iter().all(|x| x.is_nan()),
                "{run:?}: NaN row {:?}",
                &c[..n]
            );
            assert!(
                c[n..2 * n].iter().all(|&x| x == f32::INFINITY),
                "{run:?}: inf row"
            );
            assert!(
                c[2 * n..].iter().all(|&x| x == k as f32),
                "{run:?}: finite rows"
            );
            // inf - inf = NaN through B (stored [n, k]).
            let a1 = vec![one; m * k];
            let mut bt = vec![one; n * k];
            bt[0] = f16::INFINITY;
            bt[1] = f16::NEG_INFINITY;
            let args = GemmArgs::dense(m, n, k, Transpose::Yes);
            let c = run_dense(dev, run, &args, &a1, &bt, &vec![0.0; m * n]);
            assert!((0..m).all(|i| c[i * n].is_nan()), "{run:?}: inf - inf");
            assert!(
                (0..m).all(|i| c[i * n + 1] == k as f32),
                "{run:?}: column 1"
            );
        }
    }
}

#[test]
fn beta_zero_ignores_c_and_alpha_zero_ignores_a_and_b() {
    let Some(dev) = test_device() else { return };
    for run in all_runs(dev) {
        let (m, n, k) = (5, 16, 8);
        let a = vec![f16::from_f32(2.0); m * k];
        let b = vec![f16::from_f32(1.0); k * n];
        let args = GemmArgs::dense(m, n, k, Transpose::No);
        let c = run_dense(dev, run, &args, &a, &b, &vec![f32::NAN; m * n]);
        assert!(c.iter().all(|&x| x == 16.0), "{run:?}: {c:?}");
        let a = vec![f16::NAN; m * k];
        let args = GemmArgs {
            alpha: 0.0,
            beta: 0.5,
            ..args
        };
        let c = run_dense(dev, run, &args, &a, &b, &vec![4.0; m * n]);
        assert!(c.iter().all(|&x| x == 2.0), "{run:?}: {c:?}");
        // α = 0 and β = 0: zeros, whatever C held.
        let args = GemmArgs { beta: 0.0, ..args };
        let c = run_dense(dev, run, &args, &a, &b, &vec![f32::NAN; m * n]);
        assert!(c.iter().all(|&x| x == 0.0), "{run:?}: {c:?}");
    }
}

#[test]
fn empty_reduction_scales_c_and_empty_outputs_are_untouched() {
    let Some(dev) = test_device() else { return };
    for run in all_runs(dev) {
        // k = 0: C = β·C (lda may be 0).
        let args = GemmArgs {
            ldc: 5,
            beta: -2.0,
            ..GemmArgs::dense(3, 4, 0, Transpose::Yes)
        };
        let c0: Vec<f32> = (0..14).map(|i| i as f32).collect();
        let c = run_dense(dev, run, &args, &[f16::ONE], &[f16::ONE], &c0);
        for (idx, (&g, &o)) in c.iter().zip(&c0).enumerate() {
            let want = if idx % 5 < 4 && idx < 14 { -2.0 * o } else { o };
            assert_eq!(g, want, "{run:?}: element {idx}");
        }
        // m = 0 or n = 0: nothing written.
        for (m, n) in [(0, 8), (3, 0)] {
            let args = GemmArgs::dense(m, n, 8, Transpose::No);
            let c = run_dense(dev, run, &args, &[f16::ONE; 64], &[f16::ONE; 64], &[9.0; 4]);
            assert_eq!(c, [9.0; 4], "{run:?}");
        }
    }
}

#[test]
fn refused_paths_and_bad_lengths() {
    let Some(dev) = test_device() else { return };
    let a = dev.upload(&[f16::ONE; 256]).unwrap();
    let b = dev.upload(&[f16::ONE; 256]).unwrap();
    let mut c = dev.alloc_zeros::<f32>(256).unwrap();
    let args = GemmArgs::dense(8, 8, 8, Transpose::Yes);
    if dev.info().has_sm90a() {
        // Misaligned A: explicit wgmma is refused, Auto falls back to mma and is right.
        let av = a.slice(1..);
        let r = gemm::gemm(dev, GemmPath::Wgmma, &args, &av, &b, &mut c);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        gemm::gemm(dev, GemmPath::Auto, &args, &av, &b, &mut c).unwrap();
        let got = dev.download(&c).unwrap();
        assert!(got[..64].iter().all(|&x| x == 8.0), "{got:?}");
        // lda not a multiple of 8.
        let odd = GemmArgs { lda: 9, ..args };
        let r = gemm::gemm(dev, GemmPath::Wgmma, &odd, &a, &b, &mut c);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    } else {
        let r = gemm::gemm(dev, GemmPath::Wgmma, &args, &a, &b, &mut c);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    }
    // Too-short buffers are refused before any launch.
    let big = GemmArgs::dense(17, 16, 16, Transpose::Yes);
    let r = gemm::gemm(dev, GemmPath::Mma, &big, &a, &b, &mut c);
    assert!(
        matches!(
            r,
            Err(Error::Invalid(tessera_core::Error::SliceTooShort {
                name: "A",
                ..
            }))
        ),
        "{r:?}"
    );
    let cv = &mut c.slice_mut(..100);
    let big = GemmArgs::dense(8, 16, 8, Transpose::No);
    let r = gemm::gemm(dev, GemmPath::Auto, &big, &a, &b, cv);
    assert!(
        matches!(
            r,
            Err(Error::Invalid(tessera_core::Error::SliceTooShort {
                name: "C",
                ..
            }))
        ),
        "{r:?}"
    );
    dev.synchronize().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Host-only: validation and path selection (no GPU needed)

fn info(arch: &str) -> DeviceInfo {
    DeviceInfo {
        name: "test device".into(),
        compute_capability: if arch == "sm_90a" { (9, 0) } else { (8, 0) },
        arch: arch.into(),
        sm_count: 132,
        l2_bytes: 50 << 20,
        max_smem_per_block: 227 << 10,
        total_mem: 80 << 30,
    }
}

#[test]
fn dense_args() {
    let a = GemmArgs::dense(3, 5, 7, Transpose::No);
    assert_eq!((a.lda, a.ldb, a.ldc, a.alpha, a.beta), (7, 5, 5, 1.0, 0.0));
    let a = GemmArgs::dense(3, 5, 7, Transpose::Yes);
    assert_eq!((a.lda, a.ldb, a.ldc), (7, 7, 5));
}

#[test]
fn validate_refuses_short_slices_and_small_leading_dimensions() {
    let args = GemmArgs::dense(4, 6, 5, Transpose::Yes);
    assert!(validate::<f16>(&args, 20, 30, 24).is_ok());
    for (lens, name) in [
        ((19, 30, 24), "A"),
        ((20, 29, 24), "B"),
        ((20, 30, 23), "C"),
    ] {
        let r = validate::<f16>(&args, lens.0, lens.1, lens.2);
        assert!(
            matches!(r, Err(Error::Invalid(tessera_core::Error::SliceTooShort { name: n, .. })) if n == name),
            "{name}: {r:?}"
        );
    }
    // Padded leading dimensions need the longer extents.
    let padded = GemmArgs {
        lda: 9,
        ldb: 8,
        ldc: 7,
        ..args
    };
    assert!(validate::<bf16>(&padded, 3 * 9 + 5, 5 * 8 + 5, 3 * 7 + 6).is_ok());
    assert!(validate::<bf16>(&padded, 3 * 9 + 4, 5 * 8 + 5, 3 * 7 + 6).is_err());
    for (bad, name) in [
        (GemmArgs { lda: 4, ..args }, "A"),
        (GemmArgs { ldb: 4, ..args }, "B"),
        (GemmArgs { ldc: 5, ..args }, "C"),
        (
            GemmArgs {
                ldb: 5,
                ..GemmArgs::dense(4, 6, 5, Transpose::No)
            },
            "B",
        ),
    ] {
        let r = validate::<f16>(&bad, 1 << 20, 1 << 20, 1 << 20);
        assert!(
            matches!(r, Err(Error::Invalid(tessera_core::Error::LeadingDimension { name: n, .. })) if n == name),
            "{name}: {r:?}"
        );
    }
    // A leading dimension below the row is refused even for an empty matrix.
    let empty = GemmArgs {
        lda: 2,
        ..GemmArgs::dense(0, 6, 5, Transpose::Yes)
    };
    assert!(validate::<f16>(&empty, 0, 30, 0).is_err());
}

#[test]
fn validate_refuses_overflow_and_oversized_dimensions() {
    // The extent of A overflows usize.
    let args = GemmArgs::dense(usize::MAX / 2, 1, 3, Transpose::No);
    let r = validate::<f16>(&args, usize::MAX, usize::MAX, usize::MAX);
    assert!(
        matches!(r, Err(Error::Invalid(tessera_core::Error::Overflow { .. }))),
        "{r:?}"
    );
    // m·n·k overflows with every extent representable (k = 0 columns of A).
    let args = GemmArgs::dense(1 << 40, 1 << 40, 0, Transpose::No);
    let r = validate::<f16>(&args, 0, 0, usize::MAX);
    assert!(
        matches!(r, Err(Error::Invalid(tessera_core::Error::Overflow { .. }))),
        "{r:?}"
    );
    // A dimension beyond the kernels' 32-bit index.
    let args = GemmArgs::dense(1, 1 << 31, 1, Transpose::Yes);
    let r = validate::<f16>(&args, usize::MAX, usize::MAX, usize::MAX);
    assert!(
        matches!(r, Err(Error::Invalid(tessera_core::Error::Overflow { .. }))),
        "{r:?}"
    );
    // ... or within one tile of it (the kernels index up to a tile past an edge).
    for big in [i32::MAX as usize - 1023, i32::MAX as usize] {
        let args = GemmArgs::dense(4, 4, big, Transpose::Yes);
        let r = validate::<f16>(&args, usize::MAX, usize::MAX, usize::MAX);
        assert!(
            matches!(r, Err(Error::Invalid(tessera_core::Error::Overflow { .. }))),
            "{r:?}"
        );
    }
    let args = GemmArgs::dense(4, 4, i32::MAX as usize - 1024, Transpose::Yes);
    assert!(validate::<f16>(&args, usize::MAX, usize::MAX, usize::MAX).is_ok());
    // Dimensions that fit but a 64 x 64 grid beyond 2^31 - 1 blocks.
    let big = i32::MAX as usize - 1024;
    let args = GemmArgs::dense(big, big, 1, Transpose::Yes);
    let r = validate::<f16>(&args, usize::MAX, usize::MAX, usize::MAX);
    assert!(
        matches!(r, Err(Error::Invalid(tessera_core::Error::Overflow { .. }))),
        "{r:?}"
    );
    // The largest grid that fits is accepted.
    let args = GemmArgs::dense(64 * 46340, 64 * 46340, 1, Transpose::Yes);
    assert!(validate::<f16>(&args, usize::MAX, usize::MAX, usize::MAX).is_ok());
}

#[test]
fn validate_accepts_huge_leading_dimensions_of_one_row() {
    let args = GemmArgs {
        lda: usize::MAX,
        ldc: usize::MAX,
        ..GemmArgs::dense(1, 16, 4, Transpose::No)
    };
    assert!(validate::<f16>(&args, 4, 64, 16).is_ok());
    // ... and such a one-row A still qualifies for wgmma (its stride is never used).
    assert_eq!(
        path_for(&info("sm_90a"), &args, GemmPath::Wgmma).unwrap(),
        GemmPath::Wgmma
    );
    // A leading dimension beyond i64 with two rows cannot be indexed: refused.
    let args = GemmArgs {
        lda: usize::MAX / 2 + 1,
        ..GemmArgs::dense(2, 16, 4, Transpose::No)
    };
    let r = validate::<f16>(&args, usize::MAX, 64, 32);
    assert!(
        matches!(r, Err(Error::Invalid(tessera_core::Error::Overflow { .. }))),
        "{r:?}"
    );
}

#[test]
fn path_selection() {
    let (ampere, hopper) = (info("sm_80"), info("sm_90a"));
    // 16 x 8 = 128 wgmma tiles of 128 x 256: enough for Auto on 132 SMs.
    let aligned = GemmArgs::dense(2048, 2048, 64, Transpose::Yes);
    let odd = GemmArgs { lda: 65, ..aligned };
    let odd_b = GemmArgs {
        ldb: 515,
        ..GemmArgs::dense(2048, 512, 64, Transpose::No)
    };
    // Mma is always available.
    for i in [&ampere, &hopper] {
        for a in [&aligned, &odd, &odd_b] {
            assert_eq!(path_for(i, a, GemmPath::Mma).unwrap(), GemmPath::Mma);
        }
    }
    // Ampere: Auto is Mma, Wgmma is refused.
    assert_eq!(
        path_for(&ampere, &aligned, GemmPath::Auto).unwrap(),
        GemmPath::Mma
    );
    let r = path_for(&ampere, &aligned, GemmPath::Wgmma);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    // Hopper: Wgmma where lda and ldb are multiples of 8, whatever m, n, k (edges are
    // zero-filled by the copy engine), Mma otherwise; explicit Wgmma then refused.
    assert_eq!(
        path_for(&hopper, &aligned, GemmPath::Auto).unwrap(),
        GemmPath::Wgmma
    );
    assert_eq!(
        path_for(&hopper, &aligned, GemmPath::Wgmma).unwrap(),
        GemmPath::Wgmma
    );
    let edges = GemmArgs {
        lda: 80,
        ldb: 80,
        ldc: 3,
        ..GemmArgs::dense(129, 3, 77, Transpose::Yes)
    };
    assert_eq!(
        path_for(&hopper, &edges, GemmPath::Wgmma).unwrap(),
        GemmPath::Wgmma
    );
    // ... but Auto leaves outputs too small to occupy a quarter of the SMs to mma.sync: 2
    // tiles here; 1 x 12 for 128 tokens through a 768 -> 3072 layer; 33 of 132 is enough.
    assert_eq!(
        path_for(&hopper, &edges, GemmPath::Auto).unwrap(),
        GemmPath::Mma
    );
    let layer = GemmArgs::dense(128, 3072, 768, Transpose::Yes);
    assert_eq!(
        path_for(&hopper, &layer, GemmPath::Auto).unwrap(),
        GemmPath::Mma
    );
    let quarter = GemmArgs::dense(128 * 3, 256 * 11, 768, Transpose::Yes);
    assert_eq!(
        path_for(&hopper, &quarter, GemmPath::Auto).unwrap(),
        GemmPath::Wgmma
    );
    let below = GemmArgs::dense(128 * 4, 256 * 8, 768, Transpose::Yes);
    assert_eq!(
        path_for(&hopper, &below, GemmPath::Auto).unwrap(),
        GemmPath::Mma
    );
    for a in [&odd, &odd_b] {
        assert_eq!(path_for(&hopper, a, GemmPath::Auto).unwrap(), GemmPath::Mma);
        let r = path_for(&hopper, a, GemmPath::Wgmma);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    }
    assert_eq!(GemmPath::default(), GemmPath::Auto);
}
