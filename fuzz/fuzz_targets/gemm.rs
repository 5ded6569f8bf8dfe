//! Fuzzes the public GEMM API of `tessera-cpu` (`gemm`, `gemm_with_isa`, `gemm_with`).
//!
//! Every input is a declared shape (m, n, k, leading dimensions; possibly huge, inconsistent
//! or overflowing), slices of arbitrary (possibly too short) length, a transpose flag, α/β
//! (NaN and infinities included), an instruction set (any of `Isa::ALL`), a parallelism, an
//! optional cache blocking (zero and huge included) and a B element type. The call must
//! never crash, and:
//!
//! * it returns `Ok` exactly when the input is valid by an independent model of the documented
//!   rules, and on `Err` leaves `C` untouched;
//! * on `Ok`, nothing outside the `m x n` matrix of `C` (leading-dimension padding, the tail of
//!   the slice) is written;
//! * on `Ok` with `α == 0` or `k == 0`, `C` is exactly `β·C` (zeros when `β == 0`);
//! * on `Ok` with a small problem, every element is within a derived bound of
//!   `tessera_core::reference::gemm`, NaN where the reference is NaN (for finite α and β),
//!   finite wherever no f32 intermediate can overflow, and bit-identical to the same call on
//!   one thread.
//!
//! Allocations stay bounded (at most `MAX_ELEMS` / `MAX_B_ELEMS` elements per slice whatever
//! the declared shape), which also bounds the work of an accepted call: `m·k`, `k·n` and `m·n`
//! are each at most a slice length, so `m·n·k` is at most 2²⁵.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera_core::{Element, Error, MatMut, MatRef, Transpose, bf16, f16, reference};
use tessera_cpu::gemm::{self, Blocking, GemmOptions};
use tessera_cpu::{Isa, Parallelism};

/// Largest slice (in elements) allocated for A and for C.
const MAX_ELEMS: usize = 1 << 16;
/// Largest slice allocated for B: enough for a one-row product to be split between threads
/// (the GEMV path gives each task at least 256 KiB of B).
const MAX_B_ELEMS: usize = 1 << 18;
/// Largest `m·n·max(k, 1)` checked against the (slow, f64) reference.
const REF_WORK: usize = 1 << 17;
/// Largest `m·n·max(k, 1)` re-run on one thread to compare bit for bit.
const SEQ_WORK: usize = 1 << 20;
/// Unit roundoff of f32.
const U: f64 = 1.0 / (1u64 << 24) as f64;
/// Smallest positive subnormal f32 (2⁻¹⁴⁹).
const ETA: f64 = 1.401_298_464_324_817e-45;

/// A declared dimension.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Dim {
    /// 0..=19: the tile edges of every variant.
    Tiny(u8),
    /// 0..=255.
    Small(u8),
    /// 0..=2047.
    Medium(u16),
    /// A power of two up to 2⁶³.
    Pow2(u8),
    /// Anything.
    Huge(usize),
    /// `usize::MAX`.
    Max,
}

impl Dim {
    fn get(self) -> usize {
        match self {
            Dim::Tiny(x) => usize::from(x % 20),
            Dim::Small(x) => usize::from(x),
            Dim::Medium(x) => usize::from(x % 2048),
            Dim::Pow2(x) => 1usize << (u32::from(x) % usize::BITS),
            Dim::Huge(x) => x,
            Dim::Max => usize::MAX,
        }
    }
}

/// A dimension that must agree with another one, usually does, and sometimes does not.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Related {
    selector: u8,
    other: Dim,
}

impl Related {
    fn get(self, same: usize) -> usize {
        if self.selector < 232 {
            same
        } else {
            self.other.get()
        }
    }
}

/// A leading dimension, relative to the row length it must cover.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ld {
    Dense,
    Pad(u8),
    Below(u8),
    Raw(Dim),
}

impl Ld {
    fn get(self, cols: usize) -> usize {
        match self {
            Ld::Dense => cols,
            Ld::Pad(x) => cols.saturating_add(usize::from(x % 40)),
            Ld::Below(x) => cols.saturating_sub(1 + usize::from(x)),
            Ld::Raw(d) => d.get(),
        }
    }
}

/// A slice length, relative to the extent the declared shape needs (then capped).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Exact,
    Extra(u8),
    Short(u8),
    Raw(u16),
}

impl Len {
    fn get(self, needed: Option<usize>, cap: usize) -> usize {
        let needed = needed.unwrap_or(usize::MAX);
        let len = match self {
            Len::Exact => needed,
            Len::Extra(x) => needed.saturating_add(usize::from(x % 64)),
            Len::Short(x) => needed.saturating_sub(1 + usize::from(x % 8)),
            Len::Raw(x) => usize::from(x),
        };
        len.min(cap)
    }
}

/// An α, β or special element value.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Scalar {
    Zero,
    NegZero,
    One,
    MinusOne,
    /// x / 16.
    Sixteenths(i8),
    Raw(u32),
    Nan,
    Inf,
    NegInf,
    Max,
    /// The smallest subnormal.
    Tiny,
}

impl Scalar {
    fn get(self) -> f32 {
        match self {
            Scalar::Zero => 0.0,
            Scalar::NegZero => -0.0,
            Scalar::One => 1.0,
            Scalar::MinusOne => -1.0,
            Scalar::Sixteenths(x) => f32::from(x) / 16.0,
            Scalar::Raw(bits) => f32::from_bits(bits),
            Scalar::Nan => f32::NAN,
            Scalar::Inf => f32::INFINITY,
            Scalar::NegInf => f32::NEG_INFINITY,
            Scalar::Max => f32::MAX,
            Scalar::Tiny => f32::from_bits(1),
        }
    }
}

/// The contents of a slice: pseudo-random values in `[-2^exp, 2^exp)` with a few chosen
/// values at chosen places (NaN, infinities, huge and subnormal values).
#[derive(Arbitrary, Debug, Clone)]
struct Fill {
    seed: u64,
    exp: i8,
    specials: Vec<(u16, Scalar)>,
}

impl Fill {
    fn values(&self, len: usize) -> Vec<f32> {
        let scale = 2f64.powi(i32::from(self.exp));
        let mut state = self.seed;
        let mut v: Vec<f32> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = (state >> 40) as f64 / (1u64 << 23) as f64 - 1.0;
                (unit * scale) as f32
            })
            .collect();
        if len > 0 {
            for &(at, x) in self.specials.iter().take(16) {
                v[usize::from(at) % len] = x.get();
            }
        }
        v
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum BType {
    F32,
    F16,
    Bf16,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Par {
    Sequential,
    Auto,
    Threads(u8),
    ThreadsRaw(Dim),
}

impl Par {
    fn get(self) -> Parallelism {
        match self {
            Par::Sequential => Parallelism::Sequential,
            Par::Auto => Parallelism::Auto,
            Par::Threads(t) => Parallelism::Threads(usize::from(t % 9)),
            Par::ThreadsRaw(d) => Parallelism::Threads(d.get()),
        }
    }
}

/// Which entry point to call.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Api {
    /// `gemm` (detected ISA, default blocking).
    Gemm,
    /// `gemm_with_isa(Isa::ALL[i % 4], ..)`.
    WithIsa(u8),
    /// `gemm_with(&GemmOptions { .. }, ..)`.
    With {
        isa: Option<u8>,
        blocking: Option<(Dim, Dim, Dim)>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    m: Dim,
    n: Dim,
    k: Dim,
    /// The reduction length of `op(B)`, rows and columns of `C`.
    b_k: Related,
    c_m: Related,
    c_n: Related,
    lda: Ld,
    ldb: Ld,
    ldc: Ld,
    a_len: Len,
    b_len: Len,
    c_len: Len,
    trans: bool,
    btype: BType,
    alpha: Scalar,
    beta: Scalar,
    api: Api,
    par: Par,
    a: Fill,
    b: Fill,
    c: Fill,
}

/// `(rows - 1)·ld + cols` (0 if empty), `None` on overflow.
fn extent(rows: usize, cols: usize, ld: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1).checked_mul(ld)?.checked_add(cols)
}

/// A matrix operand as declared: shape, leading dimension and slice length.
#[derive(Debug, Clone, Copy)]
struct Decl {
    rows: usize,
    cols: usize,
    ld: usize,
    len: usize,
}

impl Decl {
    fn problem(&self, name: &str) -> Option<String> {
        if self.ld < self.cols {
            return Some(format!("{name}: ld < cols"));
        }
        match extent(self.rows, self.cols, self.ld) {
            None => Some(format!("{name}: extent overflows")),
            Some(e) if e > self.len => Some(format!("{name}: slice too short")),
            Some(_) => None,
        }
    }
}

/// The call, with every choice resolved.
#[derive(Debug, Clone, Copy)]
struct Call {
    api: Api,
    isa: Option<Isa>,
    par: Parallelism,
    blocking: Option<Blocking>,
    alpha: f32,
    beta: f32,
    trans: Transpose,
}

impl Call {
    fn run<E: Element>(
        &self,
        par: Parallelism,
        a: MatRef<'_, f32>,
        b: MatRef<'_, E>,
        c: MatMut<'_, f32>,
    ) -> Result<(), Error> {
        let (alpha, beta, trans) = (self.alpha, self.beta, self.trans);
        match self.api {
            Api::Gemm => gemm::gemm(alpha, a, b, trans, beta, c, par),
            Api::WithIsa(_) => {
                let isa = self.isa.expect("resolved");
                gemm::gemm_with_isa(isa, alpha, a, b, trans, beta, c, par)
            }
            Api::With { .. } => {
                let opts = GemmOptions {
                    isa: self.isa,
                    parallelism: par,
                    blocking: self.blocking,
                };
                gemm::gemm_with(&opts, alpha, a, b, trans, beta, c)
            }
        }
    }
}

/// Why the documented rules refuse the input, or `None` if they accept it.
fn refusal(call: &Call, a: Decl, b: Decl, c: Decl) -> Option<String> {
    if let Some(isa) = call.isa
        && !isa.is_available()
    {
        return Some(format!("{isa} unavailable"));
    }
    if let Some(p) = a.problem("A").or(b.problem("B")).or(c.problem("C")) {
        return Some(p);
    }
    let (m, k) = (a.rows, a.cols);
    let (bk, n) = match call.trans {
        Transpose::No => (b.rows, b.cols),
        Transpose::Yes => (b.cols, b.rows),
    };
    if bk != k || c.rows != m || c.cols != n {
        return Some("dimensions disagree".into());
    }
    if m.checked_mul(n).and_then(|x| x.checked_mul(k)).is_none() {
        return Some("m*n*k overflows".into());
    }
    if let Some(blk) = call.blocking
        && (blk.mc == 0 || blk.kc == 0 || blk.nc == 0)
    {
        return Some("zero blocking".into());
    }
    None
}

fn gamma(j: usize) -> f64 {
    let ju = j as f64 * U;
    ju / (1.0 - ju)
}

fn same_bits(x: f32, y: f32) -> bool {
    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
}

fn run<E: Element>(inp: &Input) {
    let (m, n, k) = (inp.m.get(), inp.n.get(), inp.k.get());
    let trans = if inp.trans {
        Transpose::Yes
    } else {
        Transpose::No
    };
    let b_k = inp.b_k.get(k);
    let (b_rows, b_cols) = match trans {
        Transpose::No => (b_k, n),
        Transpose::Yes => (n, b_k),
    };
    let (c_rows, c_cols) = (inp.c_m.get(m), inp.c_n.get(n));
    let decl = |rows: usize, cols: usize, ld: Ld, len: Len, cap: usize| {
        let ld = ld.get(cols);
        let len = len.get(extent(rows, cols, ld), cap);
        Decl {
            rows,
            cols,
            ld,
            len,
        }
    };
    let ad = decl(m, k, inp.lda, inp.a_len, MAX_ELEMS);
    let bd = decl(b_rows, b_cols, inp.ldb, inp.b_len, MAX_B_ELEMS);
    let cd = decl(c_rows, c_cols, inp.ldc, inp.c_len, MAX_ELEMS);

    let a = inp.a.values(ad.len);
    let b: Vec<E> = inp.b.values(bd.len).into_iter().map(E::from_f32).collect();
    let c0 = inp.c.values(cd.len);

    let (isa, blocking) = match inp.api {
        Api::Gemm => (None, None),
        Api::WithIsa(i) => (Some(Isa::ALL[usize::from(i) % Isa::ALL.len()]), None),
        Api::With { isa, blocking } => (
            isa.map(|i| Isa::ALL[usize::from(i) % Isa::ALL.len()]),
            blocking.map(|(mc, kc, nc)| Blocking {
                mc: mc.get(),
                kc: kc.get(),
                nc: nc.get(),
            }),
        ),
    };
    let call = Call {
        api: inp.api,
        isa,
        par: inp.par.get(),
        blocking,
        alpha: inp.alpha.get(),
        beta: inp.beta.get(),
        trans,
    };
    let expected = refusal(&call, ad, bd, cd);

    let am = MatRef::new(&a, ad.rows, ad.cols, ad.ld);
    let bm = MatRef::new(&b, bd.rows, bd.cols, bd.ld);
    let mut c = c0.clone();
    let res = call.run(
        call.par,
        am,
        bm,
        MatMut::new(&mut c, cd.rows, cd.cols, cd.ld),
    );
    let err = match res {
        Err(e) => {
            assert!(
                expected.is_some(),
                "refused a valid input: {e} ({call:?}, A {ad:?}, B {bd:?}, C {cd:?})"
            );
            assert!(
                c.iter().zip(&c0).all(|(x, y)| x.to_bits() == y.to_bits()),
                "C written by a refused call: {e}"
            );
            return;
        }
        Ok(()) => expected,
    };
    assert!(
        err.is_none(),
        "accepted an invalid input ({}): {call:?}, A {ad:?}, B {bd:?}, C {cd:?}",
        err.unwrap_or_default()
    );

    // Nothing outside the m x n matrix is written.
    let ldc = cd.ld;
    for (idx, (x, y)) in c.iter().zip(&c0).enumerate() {
        let inside = ldc > 0 && idx / ldc < m && idx % ldc < n;
        assert!(
            inside || x.to_bits() == y.to_bits(),
            "C[{idx}] outside the {m}x{n} matrix (ldc {ldc}) written: {y} -> {x}"
        );
    }

    if m == 0 || n == 0 {
        return; // Nothing inside (and the other dimension may be huge).
    }
    let work = m.saturating_mul(n).saturating_mul(k.max(1));
    if work <= SEQ_WORK && call.par.threads() > 1 {
        let mut c1 = c0.clone();
        call.run(
            Parallelism::Sequential,
            am,
            bm,
            MatMut::new(&mut c1, m, n, ldc),
        )
        .expect("the same call on one thread");
        for (idx, (x, y)) in c.iter().zip(&c1).enumerate() {
            assert!(
                same_bits(*x, *y),
                "C[{idx}]: {x} on {:?} but {y} on one thread",
                call.par
            );
        }
    }

    if call.alpha == 0.0 || k == 0 {
        check_scaled(&call, &c0, &c, m, n, ldc);
    } else if work <= REF_WORK {
        check_reference(&call, am, bm, &c0, &c, m, n, k, ldc);
    }
}

/// With `α == 0` or `k == 0` the documented result is exactly `β·C` (zeros when `β == 0`,
/// whatever `C` holds), whatever `α` is.
///
/// Not compared with `reference::gemm`, which computes `α·0` and so returns NaN for `k == 0`
/// with an infinite or NaN `α`, against its own documentation.
fn check_scaled(call: &Call, c0: &[f32], got: &[f32], m: usize, n: usize, ldc: usize) {
    for i in 0..m {
        for j in 0..n {
            let idx = i * ldc + j;
            let want = if call.beta == 0.0 {
                0.0
            } else {
                call.beta * c0[idx]
            };
            assert!(
                same_bits(got[idx], want),
                "({i}, {j}): got {} want {want} = β·C; {call:?} m {m} n {n}",
                got[idx]
            );
        }
    }
}

/// Compares every element of the result with the f64 reference.
///
/// Bound (as in `kernels/cpu/tests/gemm.rs`): `γ_{2k+4}·mag + u·|ref| + f32::MIN_POSITIVE`,
/// plus `|α|·k·2⁻¹⁴⁹` for products that underflow in f32 before α scales them (gradual
/// underflow adds up to half a subnormal ulp per product on top of the relative error).
#[allow(clippy::too_many_arguments)]
fn check_reference<E: Element>(
    call: &Call,
    a: MatRef<'_, f32>,
    b: MatRef<'_, E>,
    c0: &[f32],
    got: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ldc: usize,
) {
    let (alpha, beta, trans) = (call.alpha, call.beta, call.trans);
    let mut want = c0.to_vec();
    reference::gemm(alpha, a, b, trans, beta, MatMut::new(&mut want, m, n, ldc))
        .expect("reference accepts what the kernel accepted");
    let c0m = MatRef::new(c0, m, n, ldc);
    let mag = reference::gemm_magnitude(alpha, a, b, trans, beta, c0m).expect("magnitude");
    // Σ|a·b| before α: bounds the f32 accumulators (α may be small).
    let raw = if alpha == 0.0 {
        vec![0.0; m * n]
    } else {
        reference::gemm_magnitude(1.0, a, b, trans, 0.0, c0m).expect("raw magnitude")
    };
    let g = gamma(2 * k + 4);
    for i in 0..m {
        for j in 0..n {
            let idx = i * ldc + j;
            let (x, w) = (got[idx], want[idx]);
            if w.is_nan() {
                // With finite α and β a NaN can only come from a NaN or infinite input, which
                // the kernel meets too; an infinite α or β can turn the rounding error of a
                // cancelling sum into a NaN for one and an infinity for the other.
                assert!(
                    !(alpha.is_finite() && beta.is_finite()) || x.is_nan(),
                    "({i}, {j}): reference NaN but got {x}; {call:?} m {m} n {n} k {k}"
                );
                continue;
            }
            if !w.is_finite() {
                continue; // The reference overflows f32: the kernel may overflow differently.
            }
            let (mg, rw) = (mag[i * n + j], raw[i * n + j]);
            // Skip when an f32 intermediate may overflow (or the magnitude is NaN).
            let bound = mg.max(rw) * (1.0 + 2.0 * g);
            if mg.is_nan() || rw.is_nan() || bound >= f64::from(f32::MAX) {
                continue;
            }
            let tol = g * mg
                + U * f64::from(w.abs())
                + f64::from(f32::MIN_POSITIVE)
                + f64::from(alpha.abs()) * k as f64 * ETA;
            let e = (f64::from(x) - f64::from(w)).abs();
            assert!(
                e <= tol,
                "({i}, {j}) of {m}x{n}x{k}: got {x} want {w} err {e:e} > tol {tol:e}; {call:?}"
            );
        }
    }
}

fuzz_target!(|inp: Input| {
    match inp.btype {
        BType::F32 => run::<f32>(&inp),
        BType::F16 => run::<f16>(&inp),
        BType::Bf16 => run::<bf16>(&inp),
    }
});
