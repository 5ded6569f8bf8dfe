//! The `gemm` family: `C = A·op(B)` with f32 `A`, `C` and f32/f16/bf16 `B`, against the `gemm`
//! crate's f32 GEMM on the same shape (with `B` converted to f32 beforehand, outside timing).
//!
//! Shapes: square 256 to 2048; the BERT-base / GPT-2-small MLP layers at 128 tokens
//! (768 → 3072 and 3072 → 768); the GPT-2 decode logits GEMV (one token, 768 → 50257).
//! `B` is stored `[n, k]` (a Hugging Face `Linear` weight, [`Transpose::Yes`]) in every row;
//! the square 2048 f32 case also runs with `B` stored `[k, n]` ([`Transpose::No`]).

use super::data::random_f32;
use super::report::{CaseId, PeerTime, Row, Work};
use super::timing::measure_pair;
use super::{BenchError, Case, Config, Ctx, Result, RunFn};
use tessera_core::{DType, Element, MatMut, MatRef, Transpose, bf16, f16};
use tessera_cpu::Parallelism;
use tessera_cpu::gemm::{GemmOptions, gemm_with};

/// A GEMM problem size: `C (m x n) = A (m x k) · op(B)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of A and C (tokens).
    pub m: usize,
    /// Columns of C (output features).
    pub n: usize,
    /// Reduction length (input features).
    pub k: usize,
}

impl GemmShape {
    /// `MxNxK`.
    pub fn name(&self) -> String {
        format!("{}x{}x{}", self.m, self.n, self.k)
    }

    /// `gemv` for a single row (decode), else `gemm`.
    pub fn kernel(&self) -> &'static str {
        if self.m == 1 { "gemv" } else { "gemm" }
    }

    fn is_square(&self) -> bool {
        self.m == self.n && self.n == self.k
    }

    /// Flops (2mnk) and the bytes every operand occupies (B in its storage type).
    pub fn work(&self, b_dtype: DType) -> Work {
        let (m, n, k) = (self.m as f64, self.n as f64, self.k as f64);
        Work {
            flops: 2.0 * m * n * k,
            bytes: n * k * b_dtype.size() as f64 + 4.0 * (m * k + m * n),
        }
    }
}

/// The benchmarked shapes (fewer and smaller with `quick`).
pub fn shapes(quick: bool) -> Vec<GemmShape> {
    let sq = |s| GemmShape { m: s, n: s, k: s };
    let mut v: Vec<GemmShape> = if quick {
        vec![sq(256), sq(512)]
    } else {
        vec![sq(256), sq(512), sq(1024), sq(2048)]
    };
    // BERT-base / GPT-2-small MLP at 128 tokens: 768 -> 3072 and 3072 -> 768.
    v.push(GemmShape {
        m: 128,
        n: 3072,
        k: 768,
    });
    if !quick {
        v.push(GemmShape {
            m: 128,
            n: 768,
            k: 3072,
        });
    }
    // GPT-2 decode: one token through the tied embedding (768 -> 50257 logits).
    v.push(GemmShape {
        m: 1,
        n: 50257,
        k: 768,
    });
    v
}

/// How a row names B's layout.
pub fn layout_name(trans_b: Transpose) -> &'static str {
    match trans_b {
        Transpose::Yes => "[n,k]",
        Transpose::No => "[k,n]",
    }
}

/// The family's cases: every shape x B dtype x thread count, B as `[n, k]`; plus `[k, n]` for
/// the largest square f32 case.
pub fn cases(cfg: &Config) -> Vec<Case> {
    let shapes = shapes(cfg.quick);
    let largest_square = shapes.iter().filter(|s| s.is_square()).map(|s| s.m).max();
    let mut out = Vec::new();
    for shape in shapes {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut layouts = vec![Transpose::Yes];
            if dtype == DType::F32 && shape.is_square() && Some(shape.m) == largest_square {
                layouts.push(Transpose::No);
            }
            for trans in layouts {
                for &threads in &cfg.threads {
                    let id = CaseId {
                        family: "gemm",
                        kernel: shape.kernel().to_string(),
                        shape: shape.name(),
                        dtype: dtype.name().to_string(),
                        layout: layout_name(trans).to_string(),
                        threads,
                    };
                    let case_id = id.clone();
                    let run: RunFn = Box::new(move |ctx| match dtype {
                        DType::F32 => run_case::<f32>(&case_id, shape, trans, ctx),
                        DType::F16 => run_case::<f16>(&case_id, shape, trans, ctx),
                        DType::BF16 => run_case::<bf16>(&case_id, shape, trans, ctx),
                    });
                    out.push(Case { id, run });
                }
            }
        }
    }
    out
}

fn run_case<B: Element>(
    id: &CaseId,
    shape: GemmShape,
    trans: Transpose,
    ctx: &Ctx<'_>,
) -> Result<Row> {
    let GemmShape { m, n, k } = shape;
    let threads = id.threads;
    let isa = ctx
        .config
        .isa
        .unwrap_or_else(tessera_cpu::gemm::preferred_isa);
    let a = random_f32(m * k, 0x5EED_0001);
    let b: Vec<B> = random_f32(n * k, 0x5EED_0002)
        .into_iter()
        .map(B::from_f32)
        .collect();
    // The peer's B: the same values, exactly, in f32.
    let b_f32: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
    let (b_rows, b_cols) = match trans {
        Transpose::Yes => (n, k),
        Transpose::No => (k, n),
    };
    let opts = GemmOptions {
        isa: Some(isa),
        parallelism: if threads > 1 {
            Parallelism::Threads(threads)
        } else {
            Parallelism::Sequential
        },
        blocking: None,
    };
    let ours = |c: &mut [f32]| {
        gemm_with(
            &opts,
            1.0,
            MatRef::dense(&a, m, k),
            MatRef::dense(&b, b_rows, b_cols),
            trans,
            0.0,
            MatMut::dense(c, m, n),
        )
    };
    // NaN-filled outputs: β = 0 must overwrite every element without reading it.
    let mut c = vec![f32::NAN; m * n];
    let mut c_peer = vec![f32::NAN; m * n];
    ours(&mut c)?;
    peer_gemm(shape, &a, &b_f32, trans, &mut c_peer, threads);
    let fail = |what: &str, e: String| BenchError(format!("{}: {what}: {e}", id.name()));
    compare(&c, &c_peer, n, 1e-3).map_err(|e| fail("tessera and the gemm crate disagree", e))?;
    spot_check(shape, &a, &b_f32, trans, &c)
        .map_err(|e| fail("tessera disagrees with an f64 dot product", e))?;
    spot_check(shape, &a, &b_f32, trans, &c_peer)
        .map_err(|e| fail("the gemm crate disagrees with an f64 dot product", e))?;

    // Alternating calls: a change of load on a shared machine hits both alike.
    let (t, p) = measure_pair(
        &ctx.config.timing,
        || ours(&mut c).expect("the same call succeeded above"),
        || peer_gemm(shape, &a, &b_f32, trans, &mut c_peer, threads),
    );
    Ok(Row::new(
        id,
        isa.name(),
        shape.work(B::DTYPE),
        t.median,
        t.reps,
        ctx.calibration,
        Some(PeerTime {
            name: "gemm".into(),
            seconds: p.median,
        }),
    ))
}

/// The peer: the `gemm` crate's f32 GEMM, `C = A·op(B)`, all dense row-major; `B` is `[n, k]`
/// for [`Transpose::Yes`] and `[k, n]` for [`Transpose::No`]. Runs on the current rayon pool.
///
/// The `gemm` crate computes `dst = alpha·dst + beta·lhs·rhs` (alpha scales dst) with strides
/// given as (column stride, row stride); `read_dst = false` ignores dst's contents.
pub fn peer_gemm(
    shape: GemmShape,
    a: &[f32],
    b: &[f32],
    trans: Transpose,
    c: &mut [f32],
    threads: usize,
) {
    let GemmShape { m, n, k } = shape;
    assert_eq!(a.len(), m * k, "A must be dense m x k");
    assert_eq!(b.len(), n * k, "B must be dense n x k or k x n");
    assert_eq!(c.len(), m * n, "C must be dense m x n");
    // rhs is k x n: element (p, j) is b[j*k + p] ([n,k] storage) or b[p*n + j] ([k,n]).
    let (rhs_cs, rhs_rs) = match trans {
        Transpose::Yes => (k as isize, 1),
        Transpose::No => (1, n as isize),
    };
    let par = if threads > 1 {
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
    };
    // SAFETY: the lengths were checked above, so every (row, column) the strides address lies
    // inside its slice; dst does not alias the inputs (it is a distinct &mut).
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `Ok` when `max |ours - peer| <= rel · max |peer|` (NaN anywhere fails); `n` is the row
/// length, used to name the worst element.
pub fn compare(ours: &[f32], peer: &[f32], n: usize, rel: f64) -> std::result::Result<(), String> {
    if ours.len() != peer.len() {
        return Err(format!("lengths {} and {}", ours.len(), peer.len()));
    }
    let scale = peer
        .iter()
        .map(|x| f64::from(x.abs()))
        .fold(0.0, f64::max)
        .max(f64::from(f32::MIN_POSITIVE));
    let mut worst = (0.0f64, 0usize);
    for (i, (&o, &p)) in ours.iter().zip(peer).enumerate() {
        let d = (f64::from(o) - f64::from(p)).abs();
        if d.is_nan() {
            return Err(format!(
                "NaN at ({}, {}): {o} vs {p}",
                i / n.max(1),
                i % n.max(1)
            ));
        }
        if d > worst.0 {
            worst = (d, i);
        }
    }
    if worst.0 > rel * scale {
        let i = worst.1;
        return Err(format!(
            "max |diff| {:.3e} at ({}, {}) ({} vs {}) exceeds {rel:e} x max |C| = {:.3e}",
            worst.0,
            i / n.max(1),
            i % n.max(1),
            ours[i],
            peer[i],
            rel * scale
        ));
    }
    Ok(())
}

/// Checks a few elements of `c` against f64 dot products (tolerance 1e-3 x Σ|a·b|): guards
/// against a peer and a kernel that are wrong in the same way.
pub fn spot_check(
    shape: GemmShape,
    a: &[f32],
    b: &[f32],
    trans: Transpose,
    c: &[f32],
) -> std::result::Result<(), String> {
    let GemmShape { m, n, k } = shape;
    let mut state = 12345u64;
    for t in 0..16 {
        // Corners first, then pseudo-random elements.
        let (i, j) = match t {
            0 => (0, 0),
            1 => (m - 1, n - 1),
            2 => (0, n - 1),
            3 => (m - 1, 0),
            _ => {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as usize % m, (state >> 13) as usize % n)
            }
        };
        let (mut exact, mut mag) = (0.0f64, 0.0f64);
        for p in 0..k {
            let bv = match trans {
                Transpose::Yes => b[j * k + p],
                Transpose::No => b[p * n + j],
            };
            let prod = f64::from(a[i * k + p]) * f64::from(bv);
            exact += prod;
            mag += prod.abs();
        }
        let got = f64::from(c[i * n + j]);
        if got.is_nan() || (got - exact).abs() > 1e-3 * mag + 1e-30 {
            return Err(format!(
                "C[{i}, {j}] = {got}, expected {exact} (Σ|a·b| = {mag})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: GemmShape = GemmShape { m: 5, n: 7, k: 3 };

    fn naive(a: &[f32], b: &[f32], trans: Transpose, s: GemmShape) -> Vec<f32> {
        let mut c = vec![0.0; s.m * s.n];
        for i in 0..s.m {
            for j in 0..s.n {
                for p in 0..s.k {
                    let bv = match trans {
                        Transpose::Yes => b[j * s.k + p],
                        Transpose::No => b[p * s.n + j],
                    };
                    c[i * s.n + j] += a[i * s.k + p] * bv;
                }
            }
        }
        c
    }

    #[test]
    fn peer_call_is_right_for_both_layouts_and_thread_counts() {
        for s in [SMALL, GemmShape { m: 1, n: 37, k: 20 }] {
            let a = random_f32(s.m * s.k, 1);
            let b = random_f32(s.n * s.k, 2);
            for trans in [Transpose::Yes, Transpose::No] {
                let want = naive(&a, &b, trans, s);
                for threads in [1, 2] {
                    let mut c = vec![f32::NAN; s.m * s.n];
                    peer_gemm(s, &a, &b, trans, &mut c, threads);
                    compare(&c, &want, s.n, 1e-5).unwrap();
                    spot_check(s, &a, &b, trans, &c).unwrap();
                }
            }
        }
    }

    #[test]
    fn compare_catches_wrong_and_nan() {
        let p = [1.0f32, -2.0, 3.0, 4.0];
        assert!(compare(&p, &p, 2, 1e-3).is_ok());
        assert!(compare(&[1.0, -2.0, 3.0, 4.003], &p, 2, 1e-3).is_ok());
        let e = compare(&[1.0, -2.0, 3.1, 4.0], &p, 2, 1e-3).unwrap_err();
        assert!(e.contains("(1, 0)"), "{e}");
        assert!(compare(&[1.0, f32::NAN, 3.0, 4.0], &p, 2, 1e-3).is_err());
        assert!(compare(&p[..3], &p, 2, 1e-3).is_err());
    }

    #[test]
    fn spot_check_catches_a_transposed_b() {
        let s = GemmShape { m: 4, n: 6, k: 6 };
        let a = random_f32(s.m * s.k, 3);
        let b = random_f32(s.n * s.k, 4);
        let c = naive(&a, &b, Transpose::No, s);
        assert!(spot_check(s, &a, &b, Transpose::No, &c).is_ok());
        assert!(spot_check(s, &a, &b, Transpose::Yes, &c).is_err());
    }

    #[test]
    fn names_work_and_case_list() {
        let s = GemmShape {
            m: 128,
            n: 3072,
            k: 768,
        };
        assert_eq!(s.name(), "128x3072x768");
        assert_eq!(s.kernel(), "gemm");
        let w = s.work(DType::F16);
        assert_eq!(w.flops, 2.0 * 128.0 * 3072.0 * 768.0);
        assert_eq!(
            w.bytes,
            3072.0 * 768.0 * 2.0 + 4.0 * (128.0 * 768.0 + 128.0 * 3072.0)
        );
        assert_eq!(GemmShape { m: 1, n: 9, k: 9 }.kernel(), "gemv");

        let cfg = Config {
            threads: vec![1, 2],
            quick: false,
            filters: vec![],
            isa: None,
            timing: super::super::TimingConfig::QUICK,
        };
        let ids: Vec<String> = cases(&cfg).iter().map(|c| c.id.name()).collect();
        // 7 shapes x 3 dtypes + one [k,n] case, each at 2 thread counts.
        assert_eq!(ids.len(), (7 * 3 + 1) * 2);
        assert!(ids.contains(&"gemm/gemm/2048x2048x2048/f32/[k,n]/t2".to_string()));
        assert!(ids.contains(&"gemm/gemv/1x50257x768/bf16/[n,k]/t1".to_string()));
        assert_eq!(ids.iter().filter(|s| s.contains("[k,n]")).count(), 2);
    }

    #[test]
    fn one_small_case_runs_end_to_end() {
        let cfg = Config {
            threads: vec![2],
            quick: true,
            filters: vec![],
            isa: None,
            timing: super::super::TimingConfig {
                warmup: 0,
                min_time: std::time::Duration::ZERO,
                min_reps: 2,
                max_reps: 2,
                max_time: std::time::Duration::from_secs(1),
            },
        };
        let cal = crate::bench::calibrate::tests_support::fixed();
        let ctx = Ctx {
            config: &cfg,
            calibration: &cal,
        };
        let id = CaseId {
            family: "gemm",
            kernel: "gemm".into(),
            shape: "33x65x17".into(),
            dtype: "f16".into(),
            layout: "[n,k]".into(),
            threads: 2,
        };
        let s = GemmShape {
            m: 33,
            n: 65,
            k: 17,
        };
        for trans in [Transpose::Yes, Transpose::No] {
            let row = run_case::<f16>(&id, s, trans, &ctx).unwrap();
            assert_eq!(row.reps, 2);
            assert!(row.seconds > 0.0 && row.gflops > 0.0 && row.peer_ratio.unwrap() > 0.0);
        }
    }
}
