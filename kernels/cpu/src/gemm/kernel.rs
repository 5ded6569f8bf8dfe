//! The generic GEMM building blocks, written once against [`Simd`] and instantiated per ISA
//! (tile shape `MR x NR`, `NR = NV * LANES`) inside each variant's `#[target_feature]`
//! entry points.
//!
//! Packed layouts (BLIS-style):
//! * A block (`mb x kb`): strips of `MR` rows; strip `s` holds `kb` columns of `MR` values,
//!   `apack[s*MR*kb + p*MR + i] = A[s*MR + i, p]`, zero-padded past `mb`.
//! * B panel (`kb x nb` of `op(B)`): strips of `NR` columns, converted to f32,
//!   `bpack[s*NR*kb + p*NR + j] = op(B)[p, s*NR + j]`, zero-padded past `nb`.

use super::{GemvArgs, MacroArgs, PackAArgs, PackBArgs};
use crate::simd::{Simd, load_as_f32};
use tessera_core::{Element, Transpose};

/// Largest `MR * NR` of any variant (AVX-512: 12 x 32); sizes the edge-tile scratch.
pub(crate) const MAX_TILE: usize = 12 * 32;

/// Packs an `mb x kb` block of A into `MR`-row strips.
///
/// # Safety
/// `args.a` covers rows `0..mb` with leading dimension `lda` and `kb` columns; `args.out`
/// covers `mb.div_ceil(MR) * MR * kb` floats.
#[inline(always)]
pub(crate) unsafe fn pack_a<const MR: usize>(args: &PackAArgs) {
    let PackAArgs {
        mb,
        kb,
        a,
        lda,
        out,
    } = *args;
    // SAFETY: strip s starts at s*MR*kb, inside `out` (caller contract); rows s*MR + i < mb
    // and columns p < kb are inside A, and rows past `mb` are never dereferenced (zeros are
    // written instead); p*MR + i < MR*kb stays inside the strip.
    unsafe {
        for s in 0..mb.div_ceil(MR) {
            let rows = MR.min(mb - s * MR);
            let dst = out.add(s * MR * kb);
            let src = a.add(s * MR * lda);
            for p in 0..kb {
                for i in 0..MR {
                    let v = if i < rows { *src.add(i * lda + p) } else { 0.0 };
                    *dst.add(p * MR + i) = v;
                }
            }
        }
    }
}

/// Bytes ahead along a source row that the packing of a transposed B prefetches.
const PACK_PREFETCH: usize = 256;

/// Packs a `kb x nb` panel of `op(B)` into `NR`-column strips of f32.
///
/// # Safety
/// `S`'s ISA is available; `args.b` covers the panel (`kb` rows by `nb` columns of `op(B)`
/// with leading dimension `ldb` in its storage layout); `args.out` covers
/// `nb.div_ceil(NR) * NR * kb` floats.
#[inline(always)]
pub(crate) unsafe fn pack_b<S: Simd, B: Element, const NV: usize>(args: &PackBArgs<B>) {
    let PackBArgs {
        kb,
        nb,
        b,
        ldb,
        trans,
        out,
    } = *args;
    let l = S::LANES;
    let nr = NV * l;
    // SAFETY: strip s (s*nr*kb .. +nr*kb) lies inside `out`; every source access has
    // p < kb and column s*nr + j < nb, inside the panel that `args.b` covers (caller
    // contract); prefetch addresses are hints and never dereferenced; the ISA is available.
    unsafe {
        for s in 0..nb.div_ceil(nr) {
            let cols = nr.min(nb - s * nr);
            let dst = out.add(s * nr * kb);
            match trans {
                Transpose::No => {
                    // op(B)[p, j] = b[p*ldb + j]: rows of the strip are contiguous in memory.
                    let src = b.add(s * nr);
                    if cols == nr {
                        for p in 0..kb {
                            if p + 4 < kb {
                                // Four rows ahead (in bounds, so no overflow whatever ldb).
                                S::prefetch(src.add((p + 4) * ldb));
                            }
                            for v in 0..NV {
                                let x = load_as_f32::<S, B>(src.add(p * ldb + v * l));
                                S::store(dst.add(p * nr + v * l), x);
                            }
                        }
                    } else {
                        for p in 0..kb {
                            for j in 0..nr {
                                let x = if j < cols {
                                    (*src.add(p * ldb + j)).to_f32()
                                } else {
                                    0.0
                                };
                                *dst.add(p * nr + j) = x;
                            }
                        }
                    }
                }
                Transpose::Yes => {
                    // op(B)[p, j] = b[j*ldb + p]: each column of the strip is a contiguous row
                    // of the storage; convert LANES x LANES blocks and transpose them into
                    // place.
                    let src = b.add(s * nr * ldb);
                    let full_p = if cols == nr { kb - kb % l } else { 0 };
                    let mut rows = [S::zero(); 16];
                    // Groups outermost: only LANES source rows are live at a time, which
                    // matters when the row stride is a multiple of 4 KiB (one L1 set).
                    for g in 0..NV {
                        for p0 in (0..full_p).step_by(l) {
                            for (r, row) in rows.iter_mut().enumerate().take(l) {
                                let at = src.add((g * l + r) * ldb + p0);
                                // LANES strided streams are too many for the hardware
                                // prefetcher to follow well: fetch each a few lines ahead.
                                S::prefetch(at.wrapping_byte_add(PACK_PREFETCH));
                                *row = load_as_f32::<S, B>(at);
                            }
                            S::transpose_store(&rows[..l], dst.add(p0 * nr + g * l), nr);
                        }
                    }
                    for p in full_p..kb {
                        for j in 0..nr {
                            let x = if j < cols {
                                (*src.add(j * ldb + p)).to_f32()
                            } else {
                                0.0
                            };
                            *dst.add(p * nr + j) = x;
                        }
                    }
                }
            }
        }
    }
}

/// One k step of the microkernel: `NV` vector loads of B, `MR` broadcasts of A and
/// `MR x NV` FMAs into the accumulators.
///
/// # Safety
/// `S`'s ISA is available; `ap` covers `MR` and `bp` covers `NV * LANES` floats.
#[inline(always)]
unsafe fn k_step<S: Simd, const MR: usize, const NV: usize>(
    acc: &mut [[S::V; NV]; MR],
    ap: *const f32,
    bp: *const f32,
) {
    // SAFETY: forwarded contract.
    unsafe {
        let mut bv = [S::zero(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = S::load(bp.add(v * S::LANES));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = S::splat(*ap.add(i));
            for (x, &bx) in row.iter_mut().zip(bv.iter()) {
                *x = S::fma(av, bx, *x);
            }
        }
    }
}

/// `C[0..mr, 0..nr] = α·(Apanel·Bpanel) + β·C` for one `MR x NR` register tile.
///
/// # Safety
/// `S`'s ISA is available; `a` covers `MR*kb` and `b` covers `NR*kb` packed floats; `c`
/// covers `mr` rows of `nr` columns with leading dimension `ldc`; `mr <= MR`, `nr <= NR`,
/// `MR * NR <= MAX_TILE`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn microkernel<S: Simd, const MR: usize, const NV: usize>(
    kb: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    alpha: f32,
    beta: f32,
) {
    let l = S::LANES;
    let nrf = NV * l;
    // SAFETY: the ISA is available; the packed panels hold kb steps of MR and
    // NR floats; C accesses stay inside the mr x nr tile (or the local `edge` buffer).
    unsafe {
        // The C tile is read (β ≠ 0) and written after the loop; its rows are far apart and
        // usually cold, so start fetching them now, behind the FMAs.
        for i in 0..mr {
            let row = c.wrapping_add(i * ldc);
            S::prefetch(row);
            S::prefetch(row.wrapping_add(nr - 1));
        }
        let mut acc = [[S::zero(); NV]; MR];
        let (mut ap, mut bp) = (a, b);
        for _ in 0..kb / 4 {
            // B for four steps ahead (the micro-panel may have left L1 while the previous A
            // strips streamed through), A one cache line ahead.
            for q in 0..4 * nrf * 4 / 64 {
                S::prefetch(bp.wrapping_add(8 * nrf + q * 16));
            }
            S::prefetch(ap.wrapping_add(8 * MR));
            k_step::<S, MR, NV>(&mut acc, ap, bp);
            k_step::<S, MR, NV>(&mut acc, ap.add(MR), bp.add(nrf));
            k_step::<S, MR, NV>(&mut acc, ap.add(2 * MR), bp.add(2 * nrf));
            k_step::<S, MR, NV>(&mut acc, ap.add(3 * MR), bp.add(3 * nrf));
            ap = ap.add(4 * MR);
            bp = bp.add(4 * nrf);
        }
        for _ in 0..kb % 4 {
            k_step::<S, MR, NV>(&mut acc, ap, bp);
            ap = ap.add(MR);
            bp = bp.add(nrf);
        }

        if mr == MR && nr == nrf {
            store_tile::<S, MR, NV>(&acc, c, ldc, alpha, beta);
        } else {
            // Edge tiles go through a local full tile so that exactly the same vector
            // operations produce every element (results independent of tiling).
            let mut edge = [0.0f32; MAX_TILE];
            if beta != 0.0 {
                for i in 0..mr {
                    for j in 0..nr {
                        edge[i * nrf + j] = *c.add(i * ldc + j);
                    }
                }
            }
            store_tile::<S, MR, NV>(&acc, edge.as_mut_ptr(), nrf, alpha, beta);
            for i in 0..mr {
                for j in 0..nr {
                    *c.add(i * ldc + j) = edge[i * nrf + j];
                }
            }
        }
    }
}

/// `C = α·acc + β·C` for a full `MR x NR` tile (C not read when `β == 0`).
///
/// # Safety
/// `S`'s ISA is available; `c` covers `MR` rows of `NV * LANES` floats, `ldc` apart.
#[inline(always)]
unsafe fn store_tile<S: Simd, const MR: usize, const NV: usize>(
    acc: &[[S::V; NV]; MR],
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
) {
    // SAFETY: forwarded contract.
    unsafe {
        let va = S::splat(alpha);
        let vb = S::splat(beta);
        for (i, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                let p = c.add(i * ldc + v * S::LANES);
                let r = S::mul(x, va);
                let r = if beta == 0.0 {
                    r
                } else {
                    S::fma(S::load(p), vb, r)
                };
                S::store(p, r);
            }
        }
    }
}

/// Multiplies a packed A block by a packed B panel into C (the BLIS macro-kernel: B
/// micro-panels stay in L1 while A strips stream from L2).
///
/// # Safety
/// As for [`microkernel`], for every tile of the `mb x nb` block described by `args`.
#[inline(always)]
pub(crate) unsafe fn macro_kernel<S: Simd, const MR: usize, const NV: usize>(args: &MacroArgs) {
    let MacroArgs {
        mb,
        nb,
        kb,
        apack,
        bpack,
        c,
        ldc,
        alpha,
        beta,
    } = *args;
    let nr = NV * S::LANES;
    for jr in (0..nb).step_by(nr) {
        for ir in (0..mb).step_by(MR) {
            // SAFETY: tile (ir, jr) lies inside the block; the packed strips for it exist.
            unsafe {
                microkernel::<S, MR, NV>(
                    kb,
                    apack.add(ir * kb),
                    bpack.add(jr * kb),
                    c.add(ir * ldc + jr),
                    ldc,
                    MR.min(mb - ir),
                    nr.min(nb - jr),
                    alpha,
                    beta,
                );
            }
        }
    }
}

/// Bytes ahead of the current position that the GEMV prefetches.
pub(crate) const GEMV_PREFETCH: usize = 2048;
/// Columns per accumulator chunk of the `[k, n]` GEMV.
pub(crate) const GEMV_CHUNK: usize = 512;

/// One-row GEMM (`m == 1`, the decode GEMV), streaming `B` once without packing, for output
/// columns `j0..j1` of `c`.
///
/// # Safety
/// `S`'s ISA is available; the pointers cover the operands as validated by `gemm`, and
/// `j0 <= j1 <= n`.
#[inline(always)]
pub(crate) unsafe fn gemv<S: Simd, B: Element>(args: &GemvArgs<B>) {
    match args.trans {
        // SAFETY: forwarded contract.
        Transpose::Yes => unsafe { gemv_rows::<S, B>(args) },
        // SAFETY: forwarded contract.
        Transpose::No => unsafe { gemv_cols::<S, B>(args) },
    }
}

/// `B` stored `[n, k]`: each output is a dot product of `a` with a contiguous row of `B`.
///
/// Rows are taken one at a time, so with B stored densely the kernel reads one long linear
/// stream, which the hardware prefetchers (helped by a software prefetch a few KiB ahead)
/// follow best: measured on Zen 4, 4 rows at a time (4 short interleaved streams) reached
/// 42-59% of the read bandwidth for f16 B where one row reached 73-94%.
#[inline(always)]
unsafe fn gemv_rows<S: Simd, B: Element>(args: &GemvArgs<B>) {
    let l = S::LANES;
    let k = args.k;
    let step = 2 * l;
    let full = k - k % step;
    for j in args.j0..args.j1 {
        // SAFETY: j < n and p < k are inside B; p < k inside the one-row A;
        // the prefetch address is only a hint and is never dereferenced.
        unsafe {
            let row = args.b.add(j * args.ldb);
            let mut acc = [S::zero(); 2];
            let mut p = 0;
            while p < full {
                S::prefetch(row.wrapping_add(p).wrapping_byte_add(GEMV_PREFETCH));
                let a0 = S::load(args.a.add(p));
                let a1 = S::load(args.a.add(p + l));
                acc[0] = S::fma(a0, load_as_f32::<S, B>(row.add(p)), acc[0]);
                acc[1] = S::fma(a1, load_as_f32::<S, B>(row.add(p + l)), acc[1]);
                p += step;
            }
            let mut s = S::reduce_sum(S::add(acc[0], acc[1]));
            for q in full..k {
                s += *args.a.add(q) * (*row.add(q)).to_f32();
            }
            store_out(args, j, s);
        }
    }
}

/// `B` stored `[k, n]`: axpy of B's rows into a chunk of accumulators, 4 rows per pass.
#[inline(always)]
unsafe fn gemv_cols<S: Simd, B: Element>(args: &GemvArgs<B>) {
    let l = S::LANES;
    let k = args.k;
    let mut acc = [0.0f32; GEMV_CHUNK];
    let mut j0 = args.j0;
    while j0 < args.j1 {
        let w = GEMV_CHUNK.min(args.j1 - j0);
        let wv = w - w % l;
        acc[..w].fill(0.0);
        let accp = acc.as_mut_ptr();
        // SAFETY: p < k rows and columns j0..j0+w <= n are inside B; acc has w.
        unsafe {
            let mut p = 0;
            while p < k {
                let rows = 4.min(k - p);
                let brow = args.b.add(p * args.ldb + j0);
                let av: [S::V; 4] =
                    std::array::from_fn(|r| S::splat(*args.a.add(p + r.min(rows - 1))));
                // Rows of the next pass (in bounds: row p + rows + r < k).
                let ahead = 4.min(k - p - rows);
                let mut j = 0;
                while j < wv {
                    for r in 0..ahead {
                        S::prefetch(brow.add((rows + r) * args.ldb + j));
                    }
                    let mut x = S::load(accp.add(j));
                    for (r, &a) in av.iter().enumerate().take(rows) {
                        x = S::fma(a, load_as_f32::<S, B>(brow.add(r * args.ldb + j)), x);
                    }
                    S::store(accp.add(j), x);
                    j += l;
                }
                for jj in wv..w {
                    let mut x = *accp.add(jj);
                    for r in 0..rows {
                        x += *args.a.add(p + r) * (*brow.add(r * args.ldb + jj)).to_f32();
                    }
                    *accp.add(jj) = x;
                }
                p += rows;
            }
            for (jj, &s) in acc[..w].iter().enumerate() {
                store_out(args, j0 + jj, s);
            }
        }
        j0 += w;
    }
}

/// `c[j] = α·s + β·c[j]` (C not read when `β == 0`).
#[inline(always)]
unsafe fn store_out<B>(args: &GemvArgs<B>, j: usize, s: f32) {
    // SAFETY: j < n, inside the one-row C (caller contract).
    unsafe {
        let p = args.c.add(j);
        *p = if args.beta == 0.0 {
            args.alpha * s
        } else {
            args.alpha * s + args.beta * *p
        };
    }
}
