//! The decode-attention kernel, generic over [`Simd`] and instantiated per instruction set
//! inside `#[target_feature]` entry points (see `mod.rs`).
//!
//! One task: the `group` query heads that share key/value head `g` of one sequence, over the
//! keys `k0 .. k1` of one partition. Keys are taken in chunks of [`CHUNK`] at absolute
//! positions (multiples of `CHUNK`), so the arithmetic does not depend on the page size:
//!
//! 1. the chunk's K/V row addresses are computed from the page table (one division per
//!    chunk, not per key), the rows two chunks ahead are prefetched, and for Q8_0 the chunk's
//!    rows are dequantized into a scratch buffer (`q·d` is exact in f32);
//! 2. scores: register tiles of (query heads × keys) — 4×2, 2×4 or 1×8 accumulators — so
//!    every K vector is loaded (and widened) once per tile, not once per head;
//! 3. per head: the chunk's maximum, `p = exp(s − m)` vectorized over the chunk, and the
//!    online-softmax rescale of the running sum `l` and the output accumulator `o` when the
//!    maximum grew;
//! 4. `o += Σ p·v` with tiles of (query heads × vectors of the row) held in registers across
//!    the chunk's keys, so every V vector is loaded once per tile.
//!
//! A partition's result is either final (`o / l` written to the output) or a record
//! `[m, l, o]` merged by [`merge`] in partition order.

use super::{KvDType, MergeArgs, TaskArgs};
use crate::simd::{Simd, exp, load_as_f32};
use half::f16;
use tessera_core::Element;
use tessera_core::quant::{BlockQ8_0, QK};

/// Keys per chunk of the online softmax (the unit of the score tiles and the rescale).
pub const CHUNK: usize = 32;
/// Keys per partition: sequences longer than this are split into partitions of `PARTITION`
/// keys, processed as separate parallel tasks and merged in order. Fixed, so that results do
/// not depend on the thread count.
pub const PARTITION: usize = 2048;

const _: () = assert!(PARTITION.is_multiple_of(CHUNK) && CHUNK.is_multiple_of(16));

/// Rounds up to a whole cache line of floats.
const fn line(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Floats of per-task scratch: the output accumulators, `m` and `l`, the chunk's scores, and
/// (Q8_0) the chunk's dequantized K and V rows.
pub(crate) fn scratch_len(group: usize, head_dim: usize) -> usize {
    let dpad = head_dim.div_ceil(QK) * QK;
    line(group * head_dim) + line(2 * group) + group * CHUNK + 2 * CHUNK * dpad
}

/// `e^x` of one float with the vector `exp` (all lanes equal, so the maximum is it).
#[inline(always)]
unsafe fn exp1<S: Simd>(x: f32) -> f32 {
    // SAFETY: lane arithmetic only; the ISA is available (caller contract).
    unsafe { S::reduce_max(exp::<S>(S::splat(x))) }
}

/// Calls `f(j, offset)` for keys `c0 .. c0 + n`, `offset` being the store offset of key `j`'s
/// K row (head `g`): one division for the chunk, then increments.
///
/// # Safety
/// `c0 + n <= len`, so that every page index read is inside the sequence's page table.
#[inline(always)]
unsafe fn for_rows(a: &TaskArgs<'_>, c0: usize, n: usize, mut f: impl FnMut(usize, usize)) {
    let pt = a.page_tokens;
    let mut pi = c0 / pt;
    let mut tok = c0 % pt;
    // SAFETY: pages (c0 + j) / pt for j < n are inside the table (caller contract).
    let page_base = |pi: usize| unsafe { *a.pages.add(pi) as usize * a.page_elems + a.head_off };
    let mut base = page_base(pi);
    for j in 0..n {
        if tok == pt {
            tok = 0;
            pi += 1;
            base = page_base(pi);
        }
        f(j, base + tok * a.row_elems);
        tok += 1;
    }
}

/// Prefetches `bytes` bytes from `p` (hints only: never faults).
#[inline(always)]
fn prefetch_bytes<S: Simd>(p: *const u8, bytes: usize) {
    let mut o = 0;
    while o < bytes {
        S::prefetch(p.wrapping_add(o));
        o += 64;
    }
    S::prefetch(p.wrapping_add(bytes - 1));
}

/// Runs one task (see the module documentation).
///
/// # Safety
/// `S`'s ISA is available; `a` describes a validated call: the page table covers `a.len`
/// tokens and every row it names is inside the store, `k0 < k1 <= len` with `k0` a multiple
/// of [`CHUNK`], the `group` query rows (`head_dim` floats each) are readable, the output
/// rows or partial records writable and touched by no other task, and `a.scratch` holds
/// [`scratch_len`] floats.
#[inline(always)]
pub(crate) unsafe fn task<S: Simd>(a: &TaskArgs<'_>) {
    // SAFETY: forwarded contract; the store's element type is the one `dtype` names.
    unsafe {
        match a.dtype {
            KvDType::F32 => run::<S, f32, false>(a),
            KvDType::F16 => run::<S, f16, false>(a),
            KvDType::Q8_0 => run::<S, f32, true>(a),
        }
    }
}

/// [`task`] for storage element `B` read directly, or (`Q8`) Q8_0 blocks dequantized per
/// chunk into f32 scratch (`B = f32`).
#[inline(always)]
unsafe fn run<S: Simd, B: Element, const Q8: bool>(a: &TaskArgs<'_>) {
    let l = S::LANES;
    let d = a.head_dim;
    let g = a.group;
    let dpad = d.div_ceil(QK) * QK;
    let nb = d.div_ceil(QK);
    // SAFETY: every pointer below stays inside the regions the contract of `task` grants:
    // scratch offsets add up to `scratch_len`, rows come from `for_rows` over keys < len,
    // query/output rows are `head_dim` floats at the documented strides.
    unsafe {
        let o = a.scratch;
        let m = o.add(line(g * d));
        let lsum = m.add(g);
        let s = m.add(line(2 * g));
        let kb = s.add(g * CHUNK);
        let vb = kb.add(CHUNK * dpad);
        for i in 0..g {
            *m.add(i) = f32::NEG_INFINITY;
            *lsum.add(i) = 0.0;
        }
        std::slice::from_raw_parts_mut(o, g * d).fill(0.0);

        let row_bytes = if Q8 {
            nb * std::mem::size_of::<BlockQ8_0>()
        } else {
            d * std::mem::size_of::<B>()
        };
        let elem_bytes = if Q8 {
            std::mem::size_of::<BlockQ8_0>()
        } else {
            std::mem::size_of::<B>()
        };
        let store = a.store;
        let mut kp = [std::ptr::null::<B>(); CHUNK];
        let mut vp = [std::ptr::null::<B>(); CHUNK];

        let mut c0 = a.k0;
        while c0 < a.k1 {
            let n = CHUNK.min(a.k1 - c0);
            // 1. Row addresses (and Q8_0 dequantization).
            for_rows(a, c0, n, |j, off| {
                let koff = off;
                let voff = off + a.v_off;
                if Q8 {
                    let q8 = store.cast::<BlockQ8_0>();
                    dequant_row(q8.add(koff), nb, kb.add(j * dpad));
                    dequant_row(q8.add(voff), nb, vb.add(j * dpad));
                    kp[j] = kb.add(j * dpad).cast::<B>();
                    vp[j] = vb.add(j * dpad).cast::<B>();
                } else {
                    kp[j] = store.cast::<B>().add(koff);
                    vp[j] = store.cast::<B>().add(voff);
                }
            });
            // Prefetch the chunk after next (two chunks ahead measured better than one for
            // paged storage, whose blocks break the hardware prefetchers' streams), and at
            // the start of the partition the next one too.
            let first = if c0 == a.k0 { c0 + n } else { c0 + n + CHUNK };
            let mut ahead = first.min(a.k1);
            while ahead < (c0 + n + 2 * CHUNK).min(a.k1) {
                let next = CHUNK.min(a.k1 - ahead);
                for_rows(a, ahead, next, |_, off| {
                    prefetch_bytes::<S>(store.wrapping_add(off * elem_bytes), row_bytes);
                    prefetch_bytes::<S>(
                        store.wrapping_add((off + a.v_off) * elem_bytes),
                        row_bytes,
                    );
                });
                ahead += next;
            }

            // 2. Scores.
            let mut h = 0;
            while h + 4 <= g {
                score_rows::<S, B, 4, 2>(a, h, &kp, n, s);
                h += 4;
            }
            if h + 2 <= g {
                score_rows::<S, B, 2, 4>(a, h, &kp, n, s);
                h += 2;
            }
            if h < g {
                score_rows::<S, B, 1, 8>(a, h, &kp, n, s);
            }
            if let Some(rb) = a.bias {
                let qpos = (a.len - 1) as i64;
                for j in 0..n {
                    let bucket = rb.bucket((c0 + j) as i64 - qpos);
                    let row = &rb.table[bucket * a.n_heads + a.h0..][..g];
                    for (i, &b) in row.iter().enumerate() {
                        *s.add(i * CHUNK + j) += b;
                    }
                }
            }

            // 3. Online softmax.
            for i in 0..g {
                let srow = s.add(i * CHUNK);
                for j in n..CHUNK {
                    *srow.add(j) = f32::NEG_INFINITY;
                }
                let mut mx = S::splat(f32::NEG_INFINITY);
                let mut total = S::zero();
                let mut j = 0;
                while j < CHUNK {
                    let x = S::load(srow.add(j));
                    mx = S::max(mx, x);
                    total = S::add(total, x);
                    j += l;
                }
                let cmax = S::reduce_max(mx);
                // A NaN or +inf score (the max-based softmax would drop it) makes the row NaN,
                // as in the reference; −inf scores (a −inf bias) are weight 0.
                let total = S::reduce_sum(total);
                if total.is_nan() || total == f32::INFINITY {
                    *lsum.add(i) = f32::NAN;
                }
                let m_old = *m.add(i);
                let m_new = if cmax > m_old { cmax } else { m_old };
                if m_new == f32::NEG_INFINITY {
                    // Nothing attended so far: every weight is zero.
                    std::slice::from_raw_parts_mut(srow, CHUNK).fill(0.0);
                    continue;
                }
                let mv = S::splat(m_new);
                let mut sum = S::zero();
                let mut j = 0;
                while j < CHUNK {
                    let p = exp::<S>(S::sub(S::load(srow.add(j)), mv));
                    S::store(srow.add(j), p);
                    sum = S::add(sum, p);
                    j += l;
                }
                let alpha = if m_old == m_new {
                    1.0
                } else {
                    exp1::<S>(m_old - m_new)
                };
                *lsum.add(i) = *lsum.add(i) * alpha + S::reduce_sum(sum);
                if alpha != 1.0 {
                    scale_row::<S>(o.add(i * d), d, alpha);
                }
                *m.add(i) = m_new;
            }

            // 4. o += Σ p·v.
            let mut h = 0;
            while h + 4 <= g {
                accum::<S, B, 4, 2>(o, s, h, &vp, n, d);
                h += 4;
            }
            if h + 2 <= g {
                accum::<S, B, 2, 4>(o, s, h, &vp, n, d);
                h += 2;
            }
            if h < g {
                accum::<S, B, 1, 8>(o, s, h, &vp, n, d);
            }
            c0 += n;
        }

        // Result.
        for i in 0..g {
            let oi = o.add(i * d);
            if a.partial {
                let rec = a.out.add(i * (d + 2));
                *rec = *m.add(i);
                *rec.add(1) = *lsum.add(i);
                std::ptr::copy_nonoverlapping(oi, rec.add(2), d);
            } else {
                let out = a.out.add(i * a.out_head_stride);
                // l == 0 exactly when no key had a finite score and none was NaN.
                if *lsum.add(i) == 0.0 {
                    std::slice::from_raw_parts_mut(out, d).fill(0.0);
                } else {
                    scale_into::<S>(oi, out, d, 1.0 / *lsum.add(i));
                }
            }
        }
    }
}

/// Dequantizes a row of `nb` Q8_0 blocks at `src` into `nb · 32` floats at `dst`
/// (`q · d`, exactly as `BlockQ8_0::dequantize_block`).
#[inline(always)]
unsafe fn dequant_row(src: *const BlockQ8_0, nb: usize, dst: *mut f32) {
    for b in 0..nb {
        // SAFETY: the caller guarantees `nb` readable blocks and `nb · 32` writable floats.
        unsafe {
            // Local copies, so that the compiler sees no aliasing and vectorizes the
            // widening (the function is inlined into the ISA's entry point).
            let blk: BlockQ8_0 = src.add(b).read();
            let dd = blk.d.to_f32();
            let mut tmp = [0.0f32; QK];
            for (y, &q) in tmp.iter_mut().zip(&blk.qs) {
                *y = q as f32 * dd;
            }
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst.add(b * QK), QK);
        }
    }
}

/// Scores of query heads `h .. h + HT` against the chunk's `n` keys, `KT` keys per tile
/// (then one at a time): `s[i·CHUNK + j] = scale · q_i · k_j`.
#[inline(always)]
unsafe fn score_rows<S: Simd, B: Element, const HT: usize, const KT: usize>(
    a: &TaskArgs<'_>,
    h: usize,
    kp: &[*const B; CHUNK],
    n: usize,
    s: *mut f32,
) {
    // SAFETY: query rows h..h+HT < group are readable, `kp[..n]` are valid rows, `s` holds
    // group · CHUNK floats (caller contract).
    unsafe {
        let mut qs = [std::ptr::null::<f32>(); HT];
        for (i, q) in qs.iter_mut().enumerate() {
            *q = a.q.add((h + i) * a.q_head_stride);
        }
        let mut j = 0;
        while j + KT <= n {
            let mut ks = [std::ptr::null::<B>(); KT];
            ks.copy_from_slice(&kp[j..j + KT]);
            let r = dots::<S, B, HT, KT>(&qs, &ks, a.head_dim);
            for (i, ri) in r.iter().enumerate() {
                for (t, &x) in ri.iter().enumerate() {
                    *s.add((h + i) * CHUNK + j + t) = x * a.scale;
                }
            }
            j += KT;
        }
        while j < n {
            let r = dots::<S, B, HT, 1>(&qs, &[kp[j]], a.head_dim);
            for (i, ri) in r.iter().enumerate() {
                *s.add((h + i) * CHUNK + j) = ri[0] * a.scale;
            }
            j += 1;
        }
    }
}

/// The `HT × KT` dot products of query rows `qs` with key rows `ks` (`d` elements each).
#[inline(always)]
unsafe fn dots<S: Simd, B: Element, const HT: usize, const KT: usize>(
    qs: &[*const f32; HT],
    ks: &[*const B; KT],
    d: usize,
) -> [[f32; KT]; HT] {
    let l = S::LANES;
    let full = d - d % l;
    // SAFETY: every row holds `d` readable elements (caller contract).
    unsafe {
        let mut acc = [[S::zero(); KT]; HT];
        let mut c = 0;
        while c < full {
            let mut kv = [S::zero(); KT];
            for (t, x) in kv.iter_mut().enumerate() {
                *x = load_as_f32::<S, B>(ks[t].add(c));
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let qv = S::load(qs[i].add(c));
                for (t, x) in acc_i.iter_mut().enumerate() {
                    *x = S::fma(qv, kv[t], *x);
                }
            }
            c += l;
        }
        let mut r = [[0.0f32; KT]; HT];
        for i in 0..HT {
            for t in 0..KT {
                let mut x = S::reduce_sum(acc[i][t]);
                for cc in full..d {
                    x += *qs[i].add(cc) * (*ks[t].add(cc)).to_f32();
                }
                r[i][t] = x;
            }
        }
        r
    }
}

/// `o_i += Σ_j p_ij · v_j` for heads `h .. h + HT` over the chunk's `n` keys, `DV` vectors
/// of the row per tile, then single vectors, then scalar columns.
#[inline(always)]
unsafe fn accum<S: Simd, B: Element, const HT: usize, const DV: usize>(
    o: *mut f32,
    s: *const f32,
    h: usize,
    vp: &[*const B; CHUNK],
    n: usize,
    d: usize,
) {
    let l = S::LANES;
    // SAFETY: accumulator rows h..h+HT (`d` floats each) and weight rows (`CHUNK` floats)
    // are in scratch; `vp[..n]` are valid rows of `d` elements (caller contract).
    unsafe {
        let mut os = [std::ptr::null_mut::<f32>(); HT];
        let mut ps = [std::ptr::null::<f32>(); HT];
        for i in 0..HT {
            os[i] = o.add((h + i) * d);
            ps[i] = s.add((h + i) * CHUNK);
        }
        let mut c = 0;
        while c + DV * l <= d {
            accum_block::<S, B, HT, DV>(&os, &ps, vp, n, c);
            c += DV * l;
        }
        while c + l <= d {
            accum_block::<S, B, HT, 1>(&os, &ps, vp, n, c);
            c += l;
        }
        for cc in c..d {
            for i in 0..HT {
                let mut x = *os[i].add(cc);
                for (j, v) in vp.iter().enumerate().take(n) {
                    x += *ps[i].add(j) * (*v.add(cc)).to_f32();
                }
                *os[i].add(cc) = x;
            }
        }
    }
}

/// One register tile of [`accum`]: columns `c .. c + DV·LANES` of `HT` accumulator rows.
#[inline(always)]
unsafe fn accum_block<S: Simd, B: Element, const HT: usize, const DV: usize>(
    os: &[*mut f32; HT],
    ps: &[*const f32; HT],
    vp: &[*const B; CHUNK],
    n: usize,
    c: usize,
) {
    let l = S::LANES;
    // SAFETY: columns c..c + DV·l are inside every row (the caller's loop bound).
    unsafe {
        let mut acc = [[S::zero(); DV]; HT];
        for i in 0..HT {
            for (v, x) in acc[i].iter_mut().enumerate() {
                *x = S::load(os[i].add(c + v * l));
            }
        }
        for (j, row) in vp.iter().enumerate().take(n) {
            let mut vv = [S::zero(); DV];
            for (v, x) in vv.iter_mut().enumerate() {
                *x = load_as_f32::<S, B>(row.add(c + v * l));
            }
            for i in 0..HT {
                let p = S::splat(*ps[i].add(j));
                for (v, x) in acc[i].iter_mut().enumerate() {
                    *x = S::fma(p, vv[v], *x);
                }
            }
        }
        for i in 0..HT {
            for (v, &x) in acc[i].iter().enumerate() {
                S::store(os[i].add(c + v * l), x);
            }
        }
    }
}

/// `x[..d] *= alpha`.
#[inline(always)]
unsafe fn scale_row<S: Simd>(x: *mut f32, d: usize, alpha: f32) {
    // SAFETY: `x` holds `d` floats (caller contract).
    unsafe { scale_into::<S>(x, x, d, alpha) }
}

/// `out[..d] = x[..d] · f` (`out` may equal `x`).
#[inline(always)]
unsafe fn scale_into<S: Simd>(x: *const f32, out: *mut f32, d: usize, f: f32) {
    let l = S::LANES;
    // SAFETY: both hold `d` floats (caller contract); each vector is loaded before it is
    // stored, so `out == x` is fine.
    unsafe {
        let fv = S::splat(f);
        let mut c = 0;
        while c + l <= d {
            S::store(out.add(c), S::mul(S::load(x.add(c)), fv));
            c += l;
        }
        for cc in c..d {
            *out.add(cc) = *x.add(cc) * f;
        }
    }
}

/// Merges the partition records of one (sequence, key/value head): for each query head of
/// the group, `M = max_p m_p`, `out = Σ_p e^(m_p − M)·o_p / Σ_p e^(m_p − M)·l_p`, the
/// partitions taken in order.
///
/// # Safety
/// `S`'s ISA is available; `a.partials` holds `parts · group` records of `head_dim + 2`
/// floats, and the `group` output rows are writable and touched by no other task.
#[inline(always)]
pub(crate) unsafe fn merge<S: Simd>(a: &MergeArgs) {
    let (g, d) = (a.group, a.head_dim);
    let l = S::LANES;
    let rec = |p: usize, i: usize| a.partials.wrapping_add((p * g + i) * (d + 2));
    // SAFETY: records and output rows are inside their buffers (contract).
    unsafe {
        for i in 0..g {
            let out = a.out.add(i * a.out_head_stride);
            let mut mm = f32::NEG_INFINITY;
            let mut nan = false;
            for p in 0..a.parts {
                let mp = *rec(p, i);
                if mp > mm {
                    mm = mp;
                }
                nan |= (*rec(p, i).add(1)).is_nan();
            }
            if nan {
                std::slice::from_raw_parts_mut(out, d).fill(f32::NAN);
                continue;
            }
            if mm == f32::NEG_INFINITY {
                std::slice::from_raw_parts_mut(out, d).fill(0.0);
                continue;
            }
            let mut lsum = 0.0f32;
            for p in 0..a.parts {
                let r = rec(p, i);
                let w = exp1::<S>(*r - mm);
                lsum += *r.add(1) * w;
                let op = r.add(2);
                let wv = S::splat(w);
                let mut c = 0;
                while c + l <= d {
                    let x = S::mul(S::load(op.add(c)), wv);
                    let y = if p == 0 {
                        x
                    } else {
                        S::add(S::load(out.add(c)), x)
                    };
                    S::store(out.add(c), y);
                    c += l;
                }
                for cc in c..d {
                    let x = *op.add(cc) * w;
                    *out.add(cc) = if p == 0 { x } else { *out.add(cc) + x };
                }
            }
            scale_row::<S>(out, d, 1.0 / lsum);
        }
    }
}
