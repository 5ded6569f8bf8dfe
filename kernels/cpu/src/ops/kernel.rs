//! The `ops` kernels, generic over [`Simd`] and instantiated per instruction set inside
//! `#[target_feature]` entry points (see `mod.rs`).
//!
//! Every kernel walks its block of rows one row at a time. A row is processed `LANES`
//! columns at a time; the last `cols % LANES` columns are copied into a padded vector (padding
//! chosen so that it cannot change a reduction: 0 for sums, the row mean for centered sums,
//! `−∞` for maxima and exponentials), run through the same vector code, and only the real
//! lanes are stored. So every column is computed by the same operations, whatever its
//! position, and a row's result depends only on the row and the instruction set.

use super::{Activation, Gather, L2_NORM_MIN, Rows};
use crate::simd::{Simd, exp, load_as_f32};
use std::ptr;
use tessera_core::Element;

/// The widest vector of any variant, in f32 lanes.
const MAX_LANES: usize = 16;

/// Loads the `n < LANES` floats at `p` into the low lanes, `fill` into the others.
///
/// # Safety
/// `p` is valid for `n` reads; `S`'s ISA is available.
#[inline(always)]
unsafe fn load_part<S: Simd>(p: *const f32, n: usize, fill: f32) -> S::V {
    debug_assert!(n < S::LANES && S::LANES <= MAX_LANES);
    let mut buf = [fill; MAX_LANES];
    // SAFETY: n < LANES <= 16 floats read from p (caller contract) into buf.
    unsafe {
        ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        S::load(buf.as_ptr())
    }
}

/// Stores the low `n < LANES` lanes of `v` to `p`.
///
/// # Safety
/// `p` is valid for `n` writes; `S`'s ISA is available.
#[inline(always)]
unsafe fn store_part<S: Simd>(p: *mut f32, n: usize, v: S::V) {
    debug_assert!(n < S::LANES && S::LANES <= MAX_LANES);
    let mut buf = [0.0f32; MAX_LANES];
    // SAFETY: buf holds LANES floats; n of them are written to p (caller contract).
    unsafe {
        S::store(buf.as_mut_ptr(), v);
        ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
    }
}

/// A reduction step: `acc ∘ v`.
trait Step {
    /// The accumulator after taking in `v`.
    unsafe fn step<S: Simd>(acc: S::V, v: S::V) -> S::V;
}

/// `acc + v`.
struct Sum;
impl Step for Sum {
    #[inline(always)]
    unsafe fn step<S: Simd>(acc: S::V, v: S::V) -> S::V {
        // SAFETY: lane arithmetic; the ISA is available (caller contract).
        unsafe { S::add(acc, v) }
    }
}

/// `acc + v²`.
struct SumSq;
impl Step for SumSq {
    #[inline(always)]
    unsafe fn step<S: Simd>(acc: S::V, v: S::V) -> S::V {
        // SAFETY: as above.
        unsafe { S::fma(v, v, acc) }
    }
}

/// Sum over the `n` floats at `p` of `R`'s step, in four vector accumulators (the tail padded
/// with `fill`, which must leave a sum unchanged), then across lanes.
///
/// # Safety
/// `p` is valid for `n` reads; `S`'s ISA is available.
#[inline(always)]
unsafe fn reduce<S: Simd, R: Step>(p: *const f32, n: usize, fill: f32) -> f32 {
    let l = S::LANES;
    // SAFETY: every load covers columns below n (full vectors) or goes through load_part.
    unsafe {
        let mut acc = [S::zero(); 4];
        let mut c = 0;
        while c + 4 * l <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = R::step::<S>(*a, S::load(p.add(c + k * l)));
            }
            c += 4 * l;
        }
        while c + l <= n {
            acc[0] = R::step::<S>(acc[0], S::load(p.add(c)));
            c += l;
        }
        if c < n {
            acc[1] = R::step::<S>(acc[1], load_part::<S>(p.add(c), n - c, fill));
        }
        S::reduce_sum(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3])))
    }
}

/// Largest of the `n >= 1` floats at `p` (NaN handling unspecified: the softmax detects NaN
/// separately).
///
/// # Safety
/// `p` is valid for `n` reads; `S`'s ISA is available.
#[inline(always)]
unsafe fn row_max<S: Simd>(p: *const f32, n: usize) -> f32 {
    let l = S::LANES;
    // SAFETY: as in `reduce`.
    unsafe {
        let ninf = S::splat(f32::NEG_INFINITY);
        let mut acc = [ninf; 2];
        let mut c = 0;
        while c + 2 * l <= n {
            acc[0] = S::max(acc[0], S::load(p.add(c)));
            acc[1] = S::max(acc[1], S::load(p.add(c + l)));
            c += 2 * l;
        }
        if c + l <= n {
            acc[0] = S::max(acc[0], S::load(p.add(c)));
            c += l;
        }
        if c < n {
            acc[1] = S::max(acc[1], load_part::<S>(p.add(c), n - c, f32::NEG_INFINITY));
        }
        S::reduce_max(S::max(acc[0], acc[1]))
    }
}

/// Lane-wise functions of one vector.
trait Lanewise {
    /// `f(x)` in every lane.
    unsafe fn apply<S: Simd>(x: S::V) -> S::V;
}

/// Bound on the absolute error of the vectorized `erf` over every f32 input, in every
/// variant: `|erf̂(x) − erf(x)| <= ERF_ABS_ERR`, about 1.4 units in the last place of values
/// in `[0.5, 1]`.
///
/// Measured exhaustively by the ignored test `erf_error_is_bounded_exhaustive` (every f32 in
/// `[0, 4.5]` against the f64 reference `erf`; the approximation is exactly odd and constant
/// beyond the clamp): at most 7.97e-8 with the scalar variant's unfused multiply-adds,
/// 7.09e-8 with fused ones (AVX2; AVX-512 and NEON perform the same IEEE operations per lane,
/// so they give bit-identical values: NEON, run on `[0.5, 4.5]` under qemu, has the same
/// maxima at the same arguments). The regular unit test checks the bound on a dense sweep
/// for every variant the machine has.
pub const ERF_ABS_ERR: f32 = 8.5e-8;

/// `erf(x)/x − 1 ≈ R(x²)` on `|x| < ERF_SPLIT` (degree 6 in `x²`, Chebyshev fit on `[0, 1]`;
/// approximation error 1.3e-9 in `erf`), highest degree first. `erf(x) = x + x·R(x²)`: the
/// leading `x` is exact, so the rounding of `2/√π` to f32 (5e-8 relative) does not enter.
const ERF_SMALL: [f32; 7] = [
    7.875875e-5,
    -8.0168643e-4,
    5.1890872e-3,
    -2.6854211e-2,
    1.1283594e-1,
    -3.7612626e-1,
    1.2837917e-1,
];

/// `ln(erfc(t)) ≈ Q(t)` on `ERF_SPLIT <= t <= ERF_CLAMP` (degree 6, minimax of the error
/// `erfc(t)·|Q(t) − ln erfc(t)|` it makes in `erf`: 1.1e-9), highest degree first.
const ERF_TAIL: [f32; 7] = [
    1.855749e-4,
    -2.9396156e-3,
    2.1805352e-2,
    -1.0303743e-1,
    -6.382256e-1,
    -1.12704,
    -3.5370892e-4,
];

/// Where `erf` switches from the odd polynomial to `1 − exp(Q(|x|))`.
const ERF_SPLIT: f32 = 1.0;

/// Beyond this `|x|`, `erfc(|x|) < 1.6e-8` and `1 − erfc` rounds to 1 in f32: `Q` is
/// evaluated at the clamp.
const ERF_CLAMP: f32 = 4.0;

/// `erf(x)` lane-wise, to [`ERF_ABS_ERR`]: `x + x·R(x²)` for `|x| < 1`, else
/// `±(1 − exp(Q(min(|x|, 4))))`. `erf(±∞) = ±1`; NaN lanes give an unspecified value (the
/// GELU built on it propagates NaN through its factor `x`).
///
/// # Safety
/// `S`'s ISA is available.
#[inline(always)]
pub(crate) unsafe fn erf<S: Simd>(x: S::V) -> S::V {
    // SAFETY: lane arithmetic only; the ISA is available (caller contract).
    unsafe {
        let zero = S::zero();
        let t = S::max(x, S::sub(zero, x));
        let s = S::mul(x, x);
        let mut p = S::splat(ERF_SMALL[0]);
        for &k in &ERF_SMALL[1..] {
            p = S::fma(p, s, S::splat(k));
        }
        let small = S::fma(x, p, x);
        let tc = S::min(t, S::splat(ERF_CLAMP));
        let mut q = S::splat(ERF_TAIL[0]);
        for &k in &ERF_TAIL[1..] {
            q = S::fma(q, tc, S::splat(k));
        }
        let big = S::sub(S::splat(1.0), exp::<S>(q));
        let big = S::select_lt(x, zero, S::sub(zero, big), big);
        S::select_lt(t, S::splat(ERF_SPLIT), small, big)
    }
}

/// `max(x, 0)`, NaN propagating (`x < 0` is false for NaN).
struct Relu;
impl Lanewise for Relu {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V) -> S::V {
        // SAFETY: lane arithmetic; the ISA is available (caller contract).
        unsafe { S::select_lt(x, S::zero(), S::zero(), x) }
    }
}

/// `0.5·x·(1 + erf(x/√2))` as `h + h·erf(x/√2)`, `h = 0.5·x`.
struct GeluErf;
impl Lanewise for GeluErf {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V) -> S::V {
        // SAFETY: as above.
        unsafe {
            let h = S::mul(x, S::splat(0.5));
            let e = erf::<S>(S::mul(x, S::splat(std::f32::consts::FRAC_1_SQRT_2)));
            S::fma(h, e, h)
        }
    }
}

/// `√(2/π)` = `(2/√π)·(1/√2)`.
const GELU_K: f64 = std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
/// `−2·√(2/π)`.
const GELU_TANH_C1: f32 = (-2.0 * GELU_K) as f32;
/// `−2·√(2/π)·0.044715`.
const GELU_TANH_C3: f32 = (-2.0 * GELU_K * 0.044715) as f32;
/// Where `−2y` exceeds this, `σ(2y) < e⁻⁸⁰` is taken as 0 (so that `x·σ` is `x·0`: `−0` for
/// finite `x`, NaN for `−∞`, as the defining formula gives).
const GELU_TANH_CUT: f32 = 80.0;

/// `0.5·x·(1 + tanh(y))` with `y = √(2/π)·(x + 0.044715·x³)`, as `x·σ(2y)` with
/// `σ(2y) = 1/(1 + exp(−2y))`.
struct GeluTanh;
impl Lanewise for GeluTanh {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V) -> S::V {
        // SAFETY: as above.
        unsafe {
            let x2 = S::mul(x, x);
            let arg = S::mul(
                x,
                S::fma(x2, S::splat(GELU_TANH_C3), S::splat(GELU_TANH_C1)),
            );
            let one = S::splat(1.0);
            let sig = S::div(one, S::add(one, exp::<S>(arg)));
            let sig = S::select_lt(S::splat(GELU_TANH_CUT), arg, S::zero(), sig);
            S::mul(x, sig)
        }
    }
}

/// Below this `|x|`, `tanh` is its odd Taylor polynomial (to `x⁷`: the next term is below
/// `2⁻⁵⁰·|x|`), which keeps full relative accuracy where `1 − e^{−2|x|}` would cancel.
pub(crate) const TANH_SMALL: f32 = 0.0625;

/// `tanh(x) = sign(x)·(1 − e)/(1 + e)` with `e = exp(−2|x|) ∈ [0, 1]` (no overflow; `±∞`
/// give `±1`), and the Taylor polynomial below [`TANH_SMALL`].
struct Tanh;
impl Lanewise for Tanh {
    #[inline(always)]
    unsafe fn apply<S: Simd>(x: S::V) -> S::V {
        // SAFETY: as above.
        unsafe {
            let zero = S::zero();
            let one = S::splat(1.0);
            let t = S::max(x, S::sub(zero, x));
            let e = exp::<S>(S::mul(t, S::splat(-2.0)));
            let big = S::div(S::sub(one, e), S::add(one, e));
            let big = S::select_lt(x, zero, S::sub(zero, big), big);
            // x + x³·(−1/3 + x²·(2/15 − x²·17/315))
            let x2 = S::mul(x, x);
            let p = S::fma(x2, S::splat(-17.0 / 315.0), S::splat(2.0 / 15.0));
            let p = S::fma(x2, p, S::splat(-1.0 / 3.0));
            let small = S::fma(S::mul(x, x2), p, x);
            let r = S::select_lt(t, S::splat(TANH_SMALL), small, big);
            // A NaN lane fails both comparisons and keeps x (NaN propagates; `exp` and the
            // lane-wise max need not).
            let half = S::splat(0.5);
            S::select_lt(x, half, r, S::select_lt(zero, x, r, x))
        }
    }
}

/// `act(x)` for every element of the block (in place when `out == x`).
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x` and `out`.
#[inline(always)]
pub(crate) unsafe fn activation<S: Simd>(act: Activation, a: &Rows) {
    // SAFETY: forwarded contract.
    unsafe {
        match act {
            Activation::Relu => map_rows::<S, Relu>(a),
            Activation::GeluErf => map_rows::<S, GeluErf>(a),
            Activation::GeluTanh => map_rows::<S, GeluTanh>(a),
            Activation::Tanh => map_rows::<S, Tanh>(a),
        }
    }
}

/// [`activation`] for one lane-wise function.
///
/// # Safety
/// As [`activation`].
#[inline(always)]
unsafe fn map_rows<S: Simd, F: Lanewise>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    // SAFETY: rows r < a.rows of x and out hold cols floats at their leading dimensions;
    // full vectors stay below cols, the tail goes through load_part / store_part.
    unsafe {
        for r in 0..a.rows {
            let (x, o) = (a.x.add(r * a.ldx), a.out.add(r * a.ldo));
            let mut c = 0;
            while c + l <= n {
                S::store(o.add(c), F::apply::<S>(S::load(x.add(c))));
                c += l;
            }
            if c < n {
                let v = F::apply::<S>(load_part::<S>(x.add(c), n - c, 0.0));
                store_part::<S>(o.add(c), n - c, v);
            }
        }
    }
}

/// `act(gate) · up` for every element of the block (`x` is `gate`, `y` is `up`).
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x`, `y` and `out`.
#[inline(always)]
pub(crate) unsafe fn gated<S: Simd>(act: Activation, a: &Rows) {
    // SAFETY: forwarded contract.
    unsafe {
        match act {
            Activation::Relu => gated_rows::<S, Relu>(a),
            Activation::GeluErf => gated_rows::<S, GeluErf>(a),
            Activation::GeluTanh => gated_rows::<S, GeluTanh>(a),
            Activation::Tanh => gated_rows::<S, Tanh>(a),
        }
    }
}

/// [`gated`] for one lane-wise function.
///
/// # Safety
/// As [`gated`].
#[inline(always)]
unsafe fn gated_rows<S: Simd, F: Lanewise>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    // SAFETY: rows r < a.rows of x, y and out hold cols floats at their leading dimensions;
    // full vectors stay below cols, the tail goes through load_part / store_part.
    unsafe {
        for r in 0..a.rows {
            let (g, u, o) = (a.x.add(r * a.ldx), a.y.add(r * a.ldy), a.out.add(r * a.ldo));
            let mut c = 0;
            while c + l <= n {
                let v = S::mul(F::apply::<S>(S::load(g.add(c))), S::load(u.add(c)));
                S::store(o.add(c), v);
                c += l;
            }
            if c < n {
                let gv = load_part::<S>(g.add(c), n - c, 0.0);
                let uv = load_part::<S>(u.add(c), n - c, 0.0);
                store_part::<S>(o.add(c), n - c, S::mul(F::apply::<S>(gv), uv));
            }
        }
    }
}

/// `out = x + y` for every element of the block (in place: `out == x`).
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x`, `y` and `out`.
#[inline(always)]
pub(crate) unsafe fn add<S: Simd>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    // SAFETY: as in `gated_rows`.
    unsafe {
        for r in 0..a.rows {
            let (x, y, o) = (a.x.add(r * a.ldx), a.y.add(r * a.ldy), a.out.add(r * a.ldo));
            let mut c = 0;
            while c + l <= n {
                S::store(o.add(c), S::add(S::load(x.add(c)), S::load(y.add(c))));
                c += l;
            }
            if c < n {
                let xv = load_part::<S>(x.add(c), n - c, 0.0);
                let yv = load_part::<S>(y.add(c), n - c, 0.0);
                store_part::<S>(o.add(c), n - c, S::add(xv, yv));
            }
        }
    }
}

/// `out[r, c] = x[r, c] + bias[c]` for every element of the block (in place: `out == x`).
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x`, `out` and `bias`.
#[inline(always)]
pub(crate) unsafe fn add_bias<S: Simd>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    let b = a.bias;
    // SAFETY: as in `gated_rows`; bias holds cols floats.
    unsafe {
        for r in 0..a.rows {
            let (x, o) = (a.x.add(r * a.ldx), a.out.add(r * a.ldo));
            let mut c = 0;
            while c + l <= n {
                S::store(o.add(c), S::add(S::load(x.add(c)), S::load(b.add(c))));
                c += l;
            }
            if c < n {
                let xv = load_part::<S>(x.add(c), n - c, 0.0);
                let bv = load_part::<S>(b.add(c), n - c, 0.0);
                store_part::<S>(o.add(c), n - c, S::add(xv, bv));
            }
        }
    }
}

/// `out = eps · x` for every element of the block (`eps` carries the factor).
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x` and `out`.
#[inline(always)]
pub(crate) unsafe fn scale<S: Simd>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    // SAFETY: as in `add_bias`.
    unsafe {
        let f = S::splat(a.eps);
        for r in 0..a.rows {
            let (x, o) = (a.x.add(r * a.ldx), a.out.add(r * a.ldo));
            let mut c = 0;
            while c + l <= n {
                S::store(o.add(c), S::mul(S::load(x.add(c)), f));
                c += l;
            }
            if c < n {
                let xv = load_part::<S>(x.add(c), n - c, 0.0);
                store_part::<S>(o.add(c), n - c, S::mul(xv, f));
            }
        }
    }
}

/// Layer norm of every row of the block (see the module documentation of `ops` for the
/// corrected two-pass algorithm).
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x`, `out`, `weight`
/// and `bias` (`out` distinct from `x`).
#[inline(always)]
pub(crate) unsafe fn layer_norm<S: Simd>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    let nf = n as f32;
    let (w, b) = (a.weight, a.bias);
    // SAFETY: rows r < a.rows of x and out hold cols floats at their leading dimensions,
    // weight and bias cols floats; full vectors stay below cols, the tails go through
    // load_part / store_part.
    unsafe {
        for r in 0..a.rows {
            let (x, o) = (a.x.add(r * a.ldx), a.out.add(r * a.ldo));
            // Pass 1: the mean.
            let mean0 = reduce::<S, Sum>(x, n, 0.0) / nf;
            let m0 = S::splat(mean0);
            // Pass 2: Σ(x − μ₀) and Σ(x − μ₀)² (the tail padded with μ₀: zero deviation).
            let mut s1 = [S::zero(); 2];
            let mut s2 = [S::zero(); 2];
            let mut c = 0;
            while c + 2 * l <= n {
                for k in 0..2 {
                    let d = S::sub(S::load(x.add(c + k * l)), m0);
                    s1[k] = S::add(s1[k], d);
                    s2[k] = S::fma(d, d, s2[k]);
                }
                c += 2 * l;
            }
            if c + l <= n {
                let d = S::sub(S::load(x.add(c)), m0);
                s1[0] = S::add(s1[0], d);
                s2[0] = S::fma(d, d, s2[0]);
                c += l;
            }
            if c < n {
                let d = S::sub(load_part::<S>(x.add(c), n - c, mean0), m0);
                s1[1] = S::add(s1[1], d);
                s2[1] = S::fma(d, d, s2[1]);
            }
            let dm = S::reduce_sum(S::add(s1[0], s1[1])) / nf;
            let var = S::reduce_sum(S::add(s2[0], s2[1])) / nf - dm * dm;
            // Rounding can take a zero variance below 0; a NaN stays NaN.
            let var = if var < 0.0 { 0.0 } else { var };
            let rstd = S::splat(1.0 / (var + a.eps).sqrt());
            let dmv = S::splat(dm);
            // Pass 3: ((x − μ₀) − δμ)·rstd·weight + bias.
            let mut c = 0;
            while c + l <= n {
                let xc = S::sub(S::sub(S::load(x.add(c)), m0), dmv);
                let y = S::fma(S::mul(xc, rstd), S::load(w.add(c)), S::load(b.add(c)));
                S::store(o.add(c), y);
                c += l;
            }
            if c < n {
                let k = n - c;
                let xc = S::sub(S::sub(load_part::<S>(x.add(c), k, mean0), m0), dmv);
                let wv = load_part::<S>(w.add(c), k, 0.0);
                let bv = load_part::<S>(b.add(c), k, 0.0);
                store_part::<S>(o.add(c), k, S::fma(S::mul(xc, rstd), wv, bv));
            }
        }
    }
}

/// RMS norm of every row of the block: `x·(1/√(Σx²/n + eps))·weight`.
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x`, `out` and
/// `weight` (`out` distinct from `x`).
#[inline(always)]
pub(crate) unsafe fn rms_norm<S: Simd>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    let nf = n as f32;
    let w = a.weight;
    // SAFETY: as in `layer_norm`.
    unsafe {
        for r in 0..a.rows {
            let (x, o) = (a.x.add(r * a.ldx), a.out.add(r * a.ldo));
            let ms = reduce::<S, SumSq>(x, n, 0.0) / nf;
            let rs = S::splat(1.0 / (ms + a.eps).sqrt());
            let mut c = 0;
            while c + l <= n {
                let y = S::mul(S::mul(S::load(x.add(c)), rs), S::load(w.add(c)));
                S::store(o.add(c), y);
                c += l;
            }
            if c < n {
                let k = n - c;
                let xv = load_part::<S>(x.add(c), k, 0.0);
                let wv = load_part::<S>(w.add(c), k, 0.0);
                store_part::<S>(o.add(c), k, S::mul(S::mul(xv, rs), wv));
            }
        }
    }
}

/// Each row of the block divided by `max(‖row‖₂, L2_NORM_MIN)` (in place: `out == x`).
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x` and `out`.
#[inline(always)]
pub(crate) unsafe fn l2_normalize<S: Simd>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    // SAFETY: as in `map_rows`.
    unsafe {
        for r in 0..a.rows {
            let (x, o) = (a.x.add(r * a.ldx), a.out.add(r * a.ldo));
            let norm = reduce::<S, SumSq>(x, n, 0.0).sqrt();
            // `<` keeps a NaN norm NaN.
            let d = S::splat(if norm < L2_NORM_MIN {
                L2_NORM_MIN
            } else {
                norm
            });
            let mut c = 0;
            while c + l <= n {
                S::store(o.add(c), S::div(S::load(x.add(c)), d));
                c += l;
            }
            if c < n {
                let v = S::div(load_part::<S>(x.add(c), n - c, 0.0), d);
                store_part::<S>(o.add(c), n - c, v);
            }
        }
    }
}

/// Row-wise softmax of the block in place (`out == x`; see `ops::softmax_with` for the
/// special rows).
///
/// # Safety
/// `S`'s ISA is available; `a` satisfies the contract of [`Rows`] for `x` and `out`, with
/// `cols >= 1`.
#[inline(always)]
pub(crate) unsafe fn softmax<S: Simd>(a: &Rows) {
    let (n, l) = (a.cols, S::LANES);
    // SAFETY: as in `map_rows`; row_max needs n >= 1 (contract).
    unsafe {
        for r in 0..a.rows {
            let (x, o) = (a.x.add(r * a.ldx), a.out.add(r * a.ldo));
            let m = row_max::<S>(x, n);
            if m == f32::NEG_INFINITY || m.is_nan() {
                // All −∞ (zeros), or a NaN made the maximum −∞ or NaN (all NaN).
                let nan = m.is_nan() || (0..n).any(|c| (*x.add(c)).is_nan());
                let fill = if nan { f32::NAN } else { 0.0 };
                for c in 0..n {
                    *o.add(c) = fill;
                }
                continue;
            }
            // e = exp(x − m), stored; Σe; and Σ(x − m), which is NaN exactly when some
            // x − m is (a NaN entry, or ∞ − ∞ for a +∞ entry) and −∞ or finite otherwise.
            let mv = S::splat(m);
            let mut sum = S::zero();
            let mut dsum = S::zero();
            let mut c = 0;
            while c + l <= n {
                let d = S::sub(S::load(x.add(c)), mv);
                let e = exp::<S>(d);
                S::store(o.add(c), e);
                sum = S::add(sum, e);
                dsum = S::add(dsum, d);
                c += l;
            }
            if c < n {
                // Padding −∞: exp gives 0, the sums are unchanged (dsum may become −∞).
                let d = S::sub(load_part::<S>(x.add(c), n - c, f32::NEG_INFINITY), mv);
                let e = exp::<S>(d);
                store_part::<S>(o.add(c), n - c, e);
                sum = S::add(sum, e);
                dsum = S::add(dsum, d);
            }
            if S::reduce_sum(dsum).is_nan() {
                for c in 0..n {
                    *o.add(c) = f32::NAN;
                }
                continue;
            }
            // The maximum's own term is exp(0) = 1, so the sum is at least 1.
            let inv = S::splat(1.0 / S::reduce_sum(sum));
            let mut c = 0;
            while c + l <= n {
                S::store(o.add(c), S::mul(S::load(o.add(c)), inv));
                c += l;
            }
            if c < n {
                let v = S::mul(load_part::<S>(o.add(c), n - c, 0.0), inv);
                store_part::<S>(o.add(c), n - c, v);
            }
        }
    }
}

/// Embedding gather: output row `i` of the block is table row `ids[i]`, widened to f32
/// (exact).
///
/// # Safety
/// `S`'s ISA is available; `g` satisfies the contract of [`Gather`] (every id in range).
#[inline(always)]
pub(crate) unsafe fn gather<S: Simd, T: Element>(g: &Gather<T>) {
    let (n, l) = (g.cols, S::LANES);
    // SAFETY: ids holds g.rows ids, each below the table's rows, whose rows hold cols
    // elements at leading dimension ldt; output rows i < g.rows hold cols floats.
    unsafe {
        for i in 0..g.rows {
            let id = *g.ids.add(i) as usize;
            let (src, dst) = (g.table.add(id * g.ldt), g.out.add(i * g.ldo));
            let mut c = 0;
            while c + l <= n {
                S::store(dst.add(c), load_as_f32::<S, T>(src.add(c)));
                c += l;
            }
            while c < n {
                *dst.add(c) = (*src.add(c)).to_f32();
                c += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Isa;
    use tessera_core::reference::ops::erf as erf_ref;

    /// `erf::<S>` of every element of `xs` into `out` (same length).
    ///
    /// # Safety
    /// `S`'s ISA is available.
    unsafe fn erf_slice<S: Simd>(xs: &[f32], out: &mut [f32]) {
        let l = S::LANES;
        for (x, o) in xs.chunks(l).zip(out.chunks_mut(l)) {
            let mut buf = [0.0f32; MAX_LANES];
            buf[..x.len()].copy_from_slice(x);
            // SAFETY: buf holds MAX_LANES >= LANES floats; the ISA is available (contract).
            unsafe { S::store(buf.as_mut_ptr(), erf::<S>(S::load(buf.as_ptr()))) };
            o.copy_from_slice(&buf[..x.len()]);
        }
    }

    /// `erf` of `xs` with `isa`'s variant (which must be available).
    fn erf_with(isa: Isa, xs: &[f32], out: &mut [f32]) {
        assert!(isa.is_available());
        match isa {
            // SAFETY: scalar code runs everywhere.
            Isa::Scalar => unsafe { erf_slice::<crate::simd::scalar::Scalar>(xs, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn run(xs: &[f32], out: &mut [f32]) {
                    // SAFETY: the features are enabled (checked by the caller).
                    unsafe { erf_slice::<crate::simd::avx2::Avx2>(xs, out) }
                }
                // SAFETY: AVX2, FMA and F16C were detected.
                unsafe { run(xs, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                #[target_feature(enable = "avx512f,avx2,fma,f16c")]
                unsafe fn run(xs: &[f32], out: &mut [f32]) {
                    // SAFETY: the features are enabled (checked by the caller).
                    unsafe { erf_slice::<crate::simd::avx512::Avx512>(xs, out) }
                }
                // SAFETY: AVX-512F was detected.
                unsafe { run(xs, out) }
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => {
                #[target_feature(enable = "neon")]
                unsafe fn run(xs: &[f32], out: &mut [f32]) {
                    // SAFETY: the features are enabled (checked by the caller).
                    unsafe { erf_slice::<crate::simd::neon::Neon>(xs, out) }
                }
                // SAFETY: NEON was detected.
                unsafe { run(xs, out) }
            }
            #[allow(unreachable_patterns)]
            _ => unreachable!(),
        }
    }

    /// Largest `|erf̂(x) − erf(x)|` over `xs` and where it is.
    fn max_error(isa: Isa, xs: &[f32]) -> (f64, f32) {
        let mut out = vec![0.0f32; xs.len()];
        erf_with(isa, xs, &mut out);
        xs.iter()
            .zip(&out)
            .map(|(&x, &y)| ((f64::from(y) - erf_ref(f64::from(x))).abs(), x))
            .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
    }

    #[test]
    fn erf_is_accurate() {
        // A dense sweep of [-6, 6] (steps of ~1.2e-4, every region of both branches), the
        // branch boundaries and the clamp, and tiny arguments.
        let mut xs: Vec<f32> = (-50_000..=50_000).map(|i| i as f32 * 1.2e-4).collect();
        for b in [ERF_SPLIT, ERF_CLAMP] {
            let mut u = b;
            for _ in 0..64 {
                xs.extend([u, -u]);
                u = f32::from_bits(u.to_bits() - 1);
            }
        }
        xs.extend([1e-30, -1e-30, 1e-38, f32::MIN_POSITIVE, 0.0, -0.0]);
        for isa in Isa::available() {
            let (e, at) = max_error(isa, &xs);
            assert!(
                e <= f64::from(ERF_ABS_ERR),
                "{isa}: erf error {e:e} at {at}"
            );
            let mut out = [0.0f32; 4];
            let inf = [f32::INFINITY, f32::NEG_INFINITY, 30.0, -1e30];
            erf_with(isa, &inf, &mut out);
            assert_eq!(out, [1.0, -1.0, 1.0, -1.0], "{isa}");
        }
    }

    /// Every f32 in `[0, 4.5]` (`erf` is odd, its approximation symmetric, and constant ±1
    /// from the clamp on): the measurement behind [`ERF_ABS_ERR`]. About a minute per
    /// instruction set in release mode:
    /// `cargo test --release -p tessera-cpu --lib -- --ignored erf_error_is_bounded`.
    #[test]
    #[ignore]
    fn erf_error_is_bounded_exhaustive() {
        use rayon::prelude::*;
        // Regions: the odd polynomial, the exp tail, and where erf rounds to ±1.
        let regions = [
            (0.0f32, 0.5f32),
            (0.5, ERF_SPLIT),
            (ERF_SPLIT, 2.0),
            (2.0, 4.5),
        ];
        for isa in Isa::available() {
            for (lo, hi) in regions {
                let (b0, b1) = (lo.to_bits() >> 16, hi.to_bits() >> 16);
                let (e, at) = (b0..b1)
                    .into_par_iter()
                    .map(|block| {
                        let xs: Vec<f32> = (block << 16..(block + 1) << 16)
                            .map(f32::from_bits)
                            .filter(|x| (lo..hi).contains(x))
                            .collect();
                        max_error(isa, &xs)
                    })
                    .reduce(|| (0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
                println!("{isa}: [{lo}, {hi}): max |erf error| = {e:e} at {at:e}");
                assert!(
                    e <= f64::from(ERF_ABS_ERR),
                    "{isa}: erf error {e:e} at {at}"
                );
            }
        }
    }
}
