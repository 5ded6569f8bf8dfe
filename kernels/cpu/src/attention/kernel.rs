//! The generic flash-attention building blocks, written once against [`Simd`] and
//! instantiated per ISA (register tile `MR x NR`, `NR = NV * LANES`) inside each variant's
//! `#[target_feature]` entry points.
//!
//! Packed layouts, per (batch entry, key/value head):
//! * K: strips of `NR` keys, `kpack[t*NR*d + c*NR + j] = K[t*NR + j, c]` (the "B panel" of
//!   `S = Q·Kᵀ`), zero past `kv_len`;
//! * V: `vpack[j*d_pad + c] = V[j, c]`, zero past `head_dim` and past `kv_len`;
//! * Q (per task): strips of `MR` rows, `qpack[s*MR*d + c*MR + i] = scale·Q[s*MR + i, c]`.

use super::{BlockArgs, PackArgs};
use crate::simd::{Simd, exp, load_as_f32};
use tessera_core::Element;

/// Keys per block of the online softmax for a tile `NR` wide: about 64, a multiple of `NR`.
pub(crate) const fn key_block(nr: usize) -> usize {
    nr * 64usize.div_ceil(nr)
}

/// Packs one (batch entry, key/value head)'s K and V.
///
/// # Safety
/// `S`'s ISA is available; `args.k` / `args.v` point at key row 0 of this head, with rows
/// `j < kv_len` at `j * k_stride` / `j * v_stride` holding `d` elements each; `args.kpack` holds
/// `kv_pad * d` and `args.vpack` `kv_pad * d_pad` floats, `kv_pad` a multiple of `NR`
/// at least `kv_len`, `d_pad` a multiple of `NR` at least `d`; `args.row` holds `d_pad`.
#[inline(always)]
pub(crate) unsafe fn pack_kv<S: Simd, K: Element, const NV: usize>(args: &PackArgs<K>) {
    let l = S::LANES;
    let nr = NV * l;
    let PackArgs {
        kv_len,
        kv_pad,
        d,
        d_pad,
        k,
        v,
        k_stride,
        v_stride,
        kpack,
        vpack,
        row,
    } = *args;
    let full = d - d % l;
    // SAFETY: every source read is row j < kv_len, columns < d (caller contract); writes stay
    // inside kpack (kv_pad*d), vpack (kv_pad*d_pad) and row (d_pad); the ISA is available.
    unsafe {
        // Converts one source row to f32 into `dst[..d]`.
        let convert = |src: *const K, dst: *mut f32| {
            for c in (0..full).step_by(l) {
                S::store(dst.add(c), load_as_f32::<S, K>(src.add(c)));
            }
            for c in full..d {
                *dst.add(c) = (*src.add(c)).to_f32();
            }
        };
        for j in 0..kv_pad {
            let dst_v = vpack.add(j * d_pad);
            let (t, jj) = (j / nr, j % nr);
            let dst_k = kpack.add(t * nr * d + jj);
            if j < kv_len {
                convert(v.add(j * v_stride), dst_v);
                for c in d..d_pad {
                    *dst_v.add(c) = 0.0;
                }
                convert(k.add(j * k_stride), row);
                for c in 0..d {
                    *dst_k.add(c * nr) = *row.add(c);
                }
            } else {
                for c in 0..d_pad {
                    *dst_v.add(c) = 0.0;
                }
                for c in 0..d {
                    *dst_k.add(c * nr) = 0.0;
                }
            }
        }
    }
}

/// `S[MR x NR] = Qstrip · Kstrip` over `d`: the GEMM microkernel with both operands packed.
///
/// # Safety
/// `qp` holds `d * MR` floats, `kp` `d * NR`; `s` has `MR` rows of `NR` floats at stride `lds`.
#[inline(always)]
unsafe fn scores_tile<S: Simd, const MR: usize, const NV: usize>(
    qp: *const f32,
    kp: *const f32,
    d: usize,
    s: *mut f32,
    lds: usize,
) {
    let l = S::LANES;
    let nr = NV * l;
    // SAFETY: reads p*MR + i < d*MR and p*nr + v*l + l <= d*nr; writes i*lds + nr <= the
    // tile (caller contract); the ISA is available.
    unsafe {
        let mut acc = [[S::zero(); NV]; MR];
        for p in 0..d {
            let mut b = [S::zero(); NV];
            for (v, bv) in b.iter_mut().enumerate() {
                *bv = S::load(kp.add(p * nr + v * l));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let a = S::splat(*qp.add(p * MR + i));
                for v in 0..NV {
                    row[v] = S::fma(a, b[v], row[v]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                S::store(s.add(i * lds + v * l), x);
            }
        }
    }
}

/// `O[MR x NR] = diag(alpha)·O + P[MR x kn]·V[kn x NR]`, P row-major at stride `ldp`.
///
/// # Safety
/// `p` has `MR` rows of `kn` floats at stride `ldp`; `v` has `kn` rows of `NR` floats at
/// stride `ldv`; `o` has `MR` rows of `NR` floats at stride `ldo`; `alpha` holds `MR`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv_tile<S: Simd, const MR: usize, const NV: usize>(
    p: *const f32,
    ldp: usize,
    v: *const f32,
    ldv: usize,
    kn: usize,
    o: *mut f32,
    ldo: usize,
    alpha: *const f32,
) {
    let l = S::LANES;
    // SAFETY: all accesses are inside the operands the caller describes; ISA available.
    unsafe {
        let mut acc = [[S::zero(); NV]; MR];
        for (i, row) in acc.iter_mut().enumerate() {
            let a = S::splat(*alpha.add(i));
            for (vv, x) in row.iter_mut().enumerate() {
                *x = S::mul(S::load(o.add(i * ldo + vv * l)), a);
            }
        }
        for j in 0..kn {
            let mut b = [S::zero(); NV];
            for (vv, bv) in b.iter_mut().enumerate() {
                *bv = S::load(v.add(j * ldv + vv * l));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let a = S::splat(*p.add(i * ldp + j));
                for vv in 0..NV {
                    row[vv] = S::fma(a, b[vv], row[vv]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (vv, &x) in row.iter().enumerate() {
                S::store(o.add(i * ldo + vv * l), x);
            }
        }
    }
}

/// Flash attention for one task: `rows` query rows (packed, pre-scaled) against the keys
/// `0..k_end` of one packed key/value head, with an online softmax over key blocks; leaves
/// the normalized outputs in `o` (`rows` rows of `d_pad`), zero for rows with no key.
///
/// # Safety
/// `S`'s ISA is available and every pointer of `args` covers what [`BlockArgs`] documents.
#[inline(always)]
pub(crate) unsafe fn attend<S: Simd, const MR: usize, const NV: usize>(args: &BlockArgs) {
    let l = S::LANES;
    let nr = NV * l;
    let bc = key_block(nr);
    let BlockArgs {
        rows,
        d,
        d_pad,
        k_end,
        qpack,
        kpack,
        vpack,
        limits,
        bias,
        mask,
        s,
        o,
        m,
        lsum,
        alpha,
    } = *args;
    let strips = rows.div_ceil(MR);
    let rows_pad = strips * MR;
    // SAFETY: the buffers have the sizes `BlockArgs` documents: s holds rows_pad*bc, o
    // rows_pad*d_pad, m/lsum/alpha rows_pad; kpack/vpack cover kv_pad >= k_end rounded up to
    // nr keys; per-row bias pointers are valid for keys below the row's limit, mask for keys
    // below k_end. Vector accesses below stay inside those ranges (checked at each site).
    unsafe {
        for r in 0..rows_pad {
            *m.add(r) = f32::NEG_INFINITY;
            *lsum.add(r) = 0.0;
            *alpha.add(r) = 1.0;
        }
        for x in 0..rows_pad * d_pad {
            *o.add(x) = 0.0;
        }
        let neg_inf = S::splat(f32::NEG_INFINITY);
        for kb in (0..k_end).step_by(bc) {
            let kn = bc.min(k_end - kb);
            let kn_pad = kn.div_ceil(nr) * nr;
            // Scores of every row strip against the block's key strips.
            for ks in 0..kn_pad / nr {
                let kp = kpack.add((kb / nr + ks) * nr * d);
                for st in 0..strips {
                    scores_tile::<S, MR, NV>(
                        qpack.add(st * MR * d),
                        kp,
                        d,
                        s.add(st * MR * bc + ks * nr),
                        bc,
                    );
                }
            }
            // Bias, masks and the online softmax, row by row.
            for r in 0..rows_pad {
                let srow = s.add(r * bc);
                let lim = if r < rows {
                    (*limits.add(r)).min(kb + kn).saturating_sub(kb)
                } else {
                    0
                };
                if lim == 0 {
                    for j in 0..kn_pad {
                        *srow.add(j) = 0.0;
                    }
                    *alpha.add(r) = 1.0;
                    continue;
                }
                let brow = *bias.add(r);
                let full = lim - lim % l;
                let mut vmax = neg_inf;
                for j in (0..full).step_by(l) {
                    let mut x = S::load(srow.add(j));
                    if !brow.is_null() {
                        x = S::add(x, S::load(brow.add(kb + j)));
                    }
                    if !mask.is_null() {
                        x = S::add(x, S::load(mask.add(kb + j)));
                    }
                    S::store(srow.add(j), x);
                    vmax = S::max(vmax, x);
                }
                let mut mx = S::reduce_max(vmax);
                for j in full..lim {
                    let mut x = *srow.add(j);
                    if !brow.is_null() {
                        x += *brow.add(kb + j);
                    }
                    if !mask.is_null() {
                        x += *mask.add(kb + j);
                    }
                    *srow.add(j) = x;
                    mx = mx.max(x);
                }
                let m_old = *m.add(r);
                let m_new = m_old.max(mx);
                if m_new == f32::NEG_INFINITY {
                    // Every key so far is masked: nothing to accumulate yet.
                    for j in 0..kn_pad {
                        *srow.add(j) = 0.0;
                    }
                    *alpha.add(r) = 1.0;
                    continue;
                }
                for j in lim..kn_pad {
                    *srow.add(j) = f32::NEG_INFINITY;
                }
                let mv = S::splat(m_new);
                let mut vsum = S::zero();
                for j in (0..kn_pad).step_by(l) {
                    let p = exp::<S>(S::sub(S::load(srow.add(j)), mv));
                    S::store(srow.add(j), p);
                    vsum = S::add(vsum, p);
                }
                let sum = S::reduce_sum(vsum);
                // exp(-inf) == 0: the first block with a key rescales nothing.
                let a = S::reduce_max(exp::<S>(S::splat(m_old - m_new)));
                *alpha.add(r) = a;
                *lsum.add(r) = *lsum.add(r) * a + sum;
                *m.add(r) = m_new;
            }
            // O = diag(alpha)·O + P·V for the block.
            for st in 0..strips {
                for ct in 0..d_pad / nr {
                    pv_tile::<S, MR, NV>(
                        s.add(st * MR * bc),
                        bc,
                        vpack.add(kb * d_pad + ct * nr),
                        d_pad,
                        kn_pad,
                        o.add(st * MR * d_pad + ct * nr),
                        d_pad,
                        alpha.add(st * MR),
                    );
                }
            }
        }
        for r in 0..rows {
            let ls = *lsum.add(r);
            // No key attended: zeros (documented); NaN sums propagate.
            let inv = if ls == 0.0 { 0.0 } else { 1.0 / ls };
            let iv = S::splat(inv);
            for c in (0..d_pad).step_by(l) {
                let p = o.add(r * d_pad + c);
                S::store(p, S::mul(S::load(p), iv));
            }
        }
    }
}
