//! The decode-attention kernel, generic over [`Simd`] and instantiated per instruction set
//! inside `#[target_feature]` entry points (see `mod.rs`).
//!
//! One task: key/value heads `g0 .. g0 + kv_heads` of one sequence (usually one head; every
//! head of the page with small pages), each with the `group` query heads that share it, over
//! the keys `k0 .. k1` of one partition. Keys are taken in chunks of [`CHUNK`] at absolute
//! positions (multiples of `CHUNK`), so the arithmetic does not depend on the page size nor
//! on how heads are grouped into tasks. Per chunk, and per key/value head in turn:
//!
//! 1. the chunk's K/V row addresses are computed from the page table (one division per
//!    page, not per key); rows are read straight from the store, f16 widened and Q8_0
//!    dequantized (`q·d`, exact in f32) a vector at a time as they are loaded ([`Row`]);
//! 2. scores: register tiles of (query heads × keys) with `LANES` accumulators — 4×4, 2×8,
//!    1×16 for 16 lanes, 4×2, 2×4, 1×8 otherwise — the tile's key rows read front to back
//!    together, 2 at a time, each once per tile (the queries' vectors from L1), then
//!    reduced together by [`Simd::reduce_sums`];
//! 3. per query head: the chunk's maximum, `p = exp(s − m)` vectorized over the chunk, and
//!    the online-softmax rescale of the running sum `l` and the output accumulator `o` when
//!    the maximum grew;
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

/// Keys whose dot products a score tile steps through together (see [`dots`]).
const KGROUP: usize = 2;

/// Rounds up to a whole cache line of floats.
const fn line(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Floats of per-task scratch: per key/value head of the task its output accumulators,
/// `m`, `l` and the chunk's scores.
pub(crate) fn scratch_len(group: usize, head_dim: usize, kv_heads: usize) -> usize {
    kv_heads * (line(group * head_dim) + line(2 * group) + group * CHUNK)
}

/// `e^x` of one float with the vector `exp` (all lanes equal, so the maximum is it).
#[inline(always)]
unsafe fn exp1<S: Simd>(x: f32) -> f32 {
    // SAFETY: lane arithmetic only; the ISA is available (caller contract).
    unsafe { S::reduce_max(exp::<S>(S::splat(x))) }
}

/// The store offsets of the K rows of keys `c0 .. c0 + n` (in `offs[..n]`) of the head whose
/// rows start at `head_off` in a page: one division for the chunk, then increments. (A
/// plain loop, not a callback: a closure is compiled without the ISA's target features, and
/// when the compiler did not inline one around the row work, decode ran 2x (Q8_0) to 25x
/// (f16) slower.)
///
/// # Safety
/// `c0 + n <= len` and `n <= CHUNK`, so that every page index read is inside the sequence's
/// page table.
#[inline(always)]
unsafe fn row_offsets(a: &TaskArgs<'_>, head_off: usize, c0: usize, n: usize) -> [usize; CHUNK] {
    let pt = a.page_tokens;
    let mut pi = c0 / pt;
    let mut tok = c0 % pt;
    let mut offs = [0usize; CHUNK];
    // SAFETY: pages (c0 + j) / pt for j < n are inside the table (caller contract).
    let page_base = |pi: usize| unsafe { *a.pages.add(pi) as usize * a.page_elems + head_off };
    let mut base = page_base(pi);
    for o in &mut offs[..n] {
        if tok == pt {
            tok = 0;
            pi += 1;
            base = page_base(pi);
        }
        *o = base + tok * a.row_elems;
        tok += 1;
    }
    offs
}

/// Runs one task (see the module documentation).
///
/// # Safety
/// `S`'s ISA is available; `a` describes a validated call: the page table covers `a.len`
/// tokens and every row it names is inside the store, `k0 < k1 <= len` with `k0` a multiple
/// of [`CHUNK`], the `kv_heads · group` query rows (`head_dim` floats each) are readable, the
/// output rows or partial records writable and touched by no other task, and `a.scratch`
/// holds [`scratch_len`] floats.
#[inline(always)]
pub(crate) unsafe fn task<S: Simd>(a: &TaskArgs<'_>) {
    // SAFETY: forwarded contract; the store's element type is the one `dtype` names.
    unsafe {
        match a.dtype {
            KvDType::F32 => run::<S, Plain<f32>>(a),
            KvDType::F16 => run::<S, Plain<f16>>(a),
            KvDType::Q8_0 => run::<S, Q8Row>(a),
        }
    }
}

/// The running state of one key/value head of a task, in scratch: output accumulators
/// (`group × head_dim`), running maxima `m` and sums `l` (`group` each).
#[derive(Clone, Copy)]
struct HeadState {
    o: *mut f32,
    m: *mut f32,
    l: *mut f32,
}

/// [`task`] for rows of kind `R` (f32, f16 or Q8_0), read directly from the store.
#[inline(always)]
unsafe fn run<S: Simd, R: Row>(a: &TaskArgs<'_>) {
    let d = a.head_dim;
    let g = a.group;
    // SAFETY: every pointer below stays inside the regions the contract of `task` grants:
    // scratch offsets add up to `scratch_len`, rows come from `row_offsets` over keys < len,
    // query/output rows are `head_dim` floats at the documented strides.
    unsafe {
        let state = |j: usize| {
            let o = a.scratch.add(j * (line(g * d) + line(2 * g)));
            let m = o.add(line(g * d));
            HeadState { o, m, l: m.add(g) }
        };
        let s = a.scratch.add(a.kv_heads * (line(g * d) + line(2 * g)));
        for j in 0..a.kv_heads {
            let st = state(j);
            for i in 0..g {
                *st.m.add(i) = f32::NEG_INFINITY;
                *st.l.add(i) = 0.0;
            }
            std::slice::from_raw_parts_mut(st.o, g * d).fill(0.0);
        }

        let mut kp = [R::NULL; CHUNK];
        let mut vp = [R::NULL; CHUNK];
        let sj = |j: usize| s.add(j * g * CHUNK);

        // Keys are walked in spans of about a page, so that memory is read page by page
        // while each head still sees its chunks in key order (the arithmetic of a head does
        // not depend on the walk). Pages of at least a chunk: every head takes the span's
        // chunks in turn, K then V of each chunk (a head's rows of a page are one run).
        // Smaller pages (a span is one chunk over several pages): every head's K rows of the
        // chunk, then every head's V rows, so that the pages' K halves and then their V
        // halves are read front to back instead of hopping between K and V every few rows
        // (measured 1.4-1.6x faster at 16-token pages).
        let span = (a.page_tokens.div_ceil(CHUNK) * CHUNK).clamp(CHUNK, PARTITION);
        let mut s0 = a.k0;
        while s0 < a.k1 {
            let s1 = (s0 + span).min(a.k1);
            if a.page_tokens < CHUNK {
                let n = s1 - s0;
                for j in 0..a.kv_heads {
                    rows::<R, true, false>(a, j, s0, n, &mut kp, &mut vp);
                    k_phase::<S, R>(a, state(j), sj(j), &kp, j, s0, n);
                }
                for j in 0..a.kv_heads {
                    rows::<R, false, true>(a, j, s0, n, &mut kp, &mut vp);
                    v_phase::<S, R>(a, state(j), sj(j), &vp, n);
                }
            } else {
                for j in 0..a.kv_heads {
                    let mut c0 = s0;
                    while c0 < s1 {
                        let n = CHUNK.min(s1 - c0);
                        rows::<R, true, true>(a, j, c0, n, &mut kp, &mut vp);
                        k_phase::<S, R>(a, state(j), sj(j), &kp, j, c0, n);
                        v_phase::<S, R>(a, state(j), sj(j), &vp, n);
                        c0 += n;
                    }
                }
            }
            s0 = s1;
        }

        // Result.
        for j in 0..a.kv_heads {
            let st = state(j);
            let out_j = a.out.add(j * a.out_kv_stride);
            for i in 0..g {
                let oi = st.o.add(i * d);
                if a.partial {
                    let rec = out_j.add(i * (d + 2));
                    *rec = *st.m.add(i);
                    *rec.add(1) = *st.l.add(i);
                    std::ptr::copy_nonoverlapping(oi, rec.add(2), d);
                } else {
                    let out = out_j.add(i * a.out_head_stride);
                    // l == 0 exactly when no key had a finite score and none was NaN.
                    if *st.l.add(i) == 0.0 {
                        std::slice::from_raw_parts_mut(out, d).fill(0.0);
                    } else {
                        scale_into::<S>(oi, out, d, 1.0 / *st.l.add(i));
                    }
                }
            }
        }
    }
}

/// The rows of keys `c0 .. c0 + n` of key/value head `j` of a task: the K rows into `kp`
/// (with `K`) and the V rows into `vp` (with `V`).
///
/// # Safety
/// As for [`run`]: `c0 + n <= len`, `n <= CHUNK`.
#[inline(always)]
unsafe fn rows<R: Row, const K: bool, const V: bool>(
    a: &TaskArgs<'_>,
    j: usize,
    c0: usize,
    n: usize,
    kp: &mut [R; CHUNK],
    vp: &mut [R; CHUNK],
) {
    // SAFETY: the offsets come from `row_offsets` over keys < len: rows inside the store.
    unsafe {
        let offs = row_offsets(a, a.head_off + j * a.head_elems, c0, n);
        for (t, &off) in offs[..n].iter().enumerate() {
            if K {
                kp[t] = R::at(a.store, off);
            }
            if V {
                vp[t] = R::at(a.store, off + a.v_off);
            }
        }
    }
}

/// The K half of chunk `c0 .. c0 + n` for key/value head `j` of a task, whose K rows are
/// `kp`: scores, bias, online softmax; the weights are left in `s` (`group × CHUNK`).
///
/// # Safety
/// As for [`run`]: `st` and `s` are the head's state and scores in scratch, `kp[..n]` its
/// rows of the chunk, `c0 + n <= len`.
#[inline(always)]
unsafe fn k_phase<S: Simd, R: Row>(
    a: &TaskArgs<'_>,
    st: HeadState,
    s: *mut f32,
    kp: &[R; CHUNK],
    j: usize,
    c0: usize,
    n: usize,
) {
    let (g, d) = (a.group, a.head_dim);
    // Query and bias rows of this key/value head's group.
    let h0 = j * g;
    // SAFETY: `s` holds the group's scores, the query rows `head_dim` floats (caller
    // contract).
    unsafe {
        let q = a.q.add(h0 * a.q_head_stride);
        if S::LANES >= 16 {
            score_heads::<S, R, 4, 4, 2, 8, 1, 16>(a, q, kp, n, s);
        } else {
            score_heads::<S, R, 4, 2, 2, 4, 1, 8>(a, q, kp, n, s);
        }
        if let Some(rb) = a.bias {
            let qpos = (a.len - 1) as i64;
            for t in 0..n {
                let bucket = rb.bucket((c0 + t) as i64 - qpos);
                let row = &rb.table[bucket * a.n_heads + a.h0 + h0..][..g];
                for (i, &b) in row.iter().enumerate() {
                    *s.add(i * CHUNK + t) += b;
                }
            }
        }
        softmax_chunk::<S>(st, s, n, g, d);
    }
}

/// The V half of a chunk for a head whose V rows are `vp`: `o += Σ p·v` with the weights
/// [`k_phase`] left in `s`.
///
/// # Safety
/// As for [`k_phase`], with `vp[..n]` the head's V rows of the chunk.
#[inline(always)]
unsafe fn v_phase<S: Simd, R: Row>(
    a: &TaskArgs<'_>,
    st: HeadState,
    s: *const f32,
    vp: &[R; CHUNK],
    n: usize,
) {
    let (g, d) = (a.group, a.head_dim);
    // SAFETY: forwarded.
    unsafe {
        let mut h = 0;
        while h + 4 <= g {
            accum::<S, R, 4>(st.o, s, h, vp, n, d);
            h += 4;
        }
        if h + 2 <= g {
            accum::<S, R, 2>(st.o, s, h, vp, n, d);
            h += 2;
        }
        if h < g {
            accum::<S, R, 1>(st.o, s, h, vp, n, d);
        }
    }
}

/// The online-softmax step of one chunk for the `g` query heads of a head state: turns the
/// scores `s[i·CHUNK + j]` (`j < n`) into weights `p = e^(s − m_new)` in place (zeros past
/// `n`), rescales `l` and the output accumulators when a maximum grew.
#[inline(always)]
unsafe fn softmax_chunk<S: Simd>(st: HeadState, s: *mut f32, n: usize, g: usize, d: usize) {
    let l = S::LANES;
    // SAFETY: `s` holds g · CHUNK floats, the state's rows g · d and g floats (caller).
    unsafe {
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
                *st.l.add(i) = f32::NAN;
            }
            let m_old = *st.m.add(i);
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
            *st.l.add(i) = *st.l.add(i) * alpha + S::reduce_sum(sum);
            if alpha != 1.0 {
                scale_row::<S>(st.o.add(i * d), d, alpha);
            }
            *st.m.add(i) = m_new;
        }
    }
}

/// One stored K or V row, read as f32 vectors straight from the store.
///
/// # Safety
/// Implementations read only elements `c .. c + LANES` (or `c`) of the row they point at.
pub(crate) unsafe trait Row: Copy {
    /// A placeholder, never read.
    const NULL: Self;
    /// The row at element offset `off` of the store (in units of the store's element: a
    /// value, or a Q8_0 block).
    ///
    /// # Safety
    /// `off` is a row start inside the store.
    unsafe fn at(store: *const u8, off: usize) -> Self;
    /// Elements `c .. c + LANES` as f32 (`c` a multiple of `LANES`, `c + LANES <= head_dim`).
    ///
    /// # Safety
    /// `S`'s ISA is available and the row has `head_dim` elements.
    unsafe fn vec<S: Simd>(self, c: usize) -> S::V;
    /// Element `c` as f32.
    ///
    /// # Safety
    /// `c < head_dim`.
    unsafe fn elem(self, c: usize) -> f32;
}

/// A row of f32 or f16 values.
#[derive(Clone, Copy)]
pub(crate) struct Plain<B>(*const B);

// SAFETY: reads `LANES` (or one) of the row's own elements.
unsafe impl<B: Element> Row for Plain<B> {
    const NULL: Self = Plain(std::ptr::null());
    #[inline(always)]
    unsafe fn at(store: *const u8, off: usize) -> Self {
        // SAFETY: caller contract.
        Plain(unsafe { store.cast::<B>().add(off) })
    }
    #[inline(always)]
    unsafe fn vec<S: Simd>(self, c: usize) -> S::V {
        // SAFETY: caller contract.
        unsafe { load_as_f32::<S, B>(self.0.add(c)) }
    }
    #[inline(always)]
    unsafe fn elem(self, c: usize) -> f32 {
        // SAFETY: caller contract.
        unsafe { (*self.0.add(c)).to_f32() }
    }
}

/// A row of `ceil(head_dim / 32)` Q8_0 blocks, dequantized as it is read: `q · d`, exactly
/// as [`BlockQ8_0::dequantize_block`] (an i8 times an f16 is exact in f32). A vector of
/// `LANES` (4, 8 or 16, dividing 32) elements never straddles two blocks.
#[derive(Clone, Copy)]
pub(crate) struct Q8Row(*const BlockQ8_0);

const _: () = assert!(QK.is_multiple_of(16));

// SAFETY: element `c` is byte `c % 32` of block `c / 32`'s quants, inside the row's
// `ceil(head_dim / 32)` blocks for `c < head_dim`; a vector stays inside one block.
unsafe impl Row for Q8Row {
    const NULL: Self = Q8Row(std::ptr::null());
    #[inline(always)]
    unsafe fn at(store: *const u8, off: usize) -> Self {
        // SAFETY: caller contract.
        Q8Row(unsafe { store.cast::<BlockQ8_0>().add(off) })
    }
    #[inline(always)]
    unsafe fn vec<S: Simd>(self, c: usize) -> S::V {
        // SAFETY: caller contract; see the impl's comment.
        unsafe {
            let b = &*self.0.add(c / QK);
            S::mul(S::load_i8(b.qs.as_ptr().add(c % QK)), S::splat_f16(b.d))
        }
    }
    #[inline(always)]
    unsafe fn elem(self, c: usize) -> f32 {
        // SAFETY: caller contract.
        unsafe {
            let b = &*self.0.add(c / QK);
            f32::from(b.qs[c % QK]) * b.d.to_f32()
        }
    }
}

/// Scores of the `g` query heads at `q` (rows `q_head_stride` apart) against the chunk's `n`
/// keys: tiles of `H1 × K1` (heads × keys), then `H2 × K2` for 2 remaining heads, `H3 × K3`
/// for the last one; `s[i·CHUNK + j] = scale · q_i · k_j`. Each tile's `H·K` dot products
/// are reduced together ([`Simd::reduce_sums`]), so `H·K = LANES` makes that a transpose.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn score_heads<
    S: Simd,
    R: Row,
    const H1: usize,
    const K1: usize,
    const H2: usize,
    const K2: usize,
    const H3: usize,
    const K3: usize,
>(
    a: &TaskArgs<'_>,
    q: *const f32,
    kp: &[R; CHUNK],
    n: usize,
    s: *mut f32,
) {
    let g = a.group;
    // SAFETY: forwarded (query rows h < g, `kp[..n]`, `s` of g · CHUNK floats).
    unsafe {
        let mut h = 0;
        while h + H1 <= g {
            score_rows::<S, R, H1, K1>(a, q, h, kp, n, s);
            h += H1;
        }
        if h + H2 <= g {
            score_rows::<S, R, H2, K2>(a, q, h, kp, n, s);
            h += H2;
        }
        while h < g {
            score_rows::<S, R, H3, K3>(a, q, h, kp, n, s);
            h += H3;
        }
    }
}

/// Scores of query heads `h .. h + HT` against the chunk's `n` keys, `KT` keys per tile
/// (then one at a time): `s[i·CHUNK + j] = scale · q_i · k_j`.
#[inline(always)]
unsafe fn score_rows<S: Simd, R: Row, const HT: usize, const KT: usize>(
    a: &TaskArgs<'_>,
    q: *const f32,
    h: usize,
    kp: &[R; CHUNK],
    n: usize,
    s: *mut f32,
) {
    // SAFETY: query rows h..h+HT < group are readable, `kp[..n]` are valid rows, `s` holds
    // group · CHUNK floats (caller contract).
    unsafe {
        let mut qs = [std::ptr::null::<f32>(); HT];
        for (i, qi) in qs.iter_mut().enumerate() {
            *qi = q.add((h + i) * a.q_head_stride);
        }
        let mut j = 0;
        while j + KT <= n {
            let mut ks = [R::NULL; KT];
            ks.copy_from_slice(&kp[j..j + KT]);
            let r = dots::<S, R, HT, KT>(&qs, &ks, a.head_dim);
            for i in 0..HT {
                for t in 0..KT {
                    *s.add((h + i) * CHUNK + j + t) = r[i * KT + t] * a.scale;
                }
            }
            j += KT;
        }
        while j < n {
            let r = dots::<S, R, HT, 1>(&qs, &[kp[j]], a.head_dim);
            for (i, &ri) in r.iter().take(HT).enumerate() {
                *s.add((h + i) * CHUNK + j) = ri * a.scale;
            }
            j += 1;
        }
    }
}

/// The `HT × KT` (at most 16) dot products of query rows `qs` with key rows `ks` (`d`
/// elements each), row-major in the first `HT·KT` entries.
#[inline(always)]
unsafe fn dots<S: Simd, R: Row, const HT: usize, const KT: usize>(
    qs: &[*const f32; HT],
    ks: &[R; KT],
    d: usize,
) -> [f32; 16] {
    const { assert!(HT * KT <= 16 && (KT < KGROUP || KT.is_multiple_of(KGROUP))) };
    let l = S::LANES;
    let full = d - d % l;
    // SAFETY: every row holds `d` readable elements (caller contract).
    unsafe {
        // Groups of up to KGROUP keys, each group's rows front to back together: one FMA
        // chain per (query, key) of the group, so the chains are independent. The order of
        // the FMAs into each accumulator is the same for any group size (c ascending), so is
        // the result. Two keys at a time: reading 8 rows side by side (8 streams a row apart)
        // measured 1.5-1.7x slower from memory on Zen 4 (16384 f16 keys of 128, AVX2 and
        // AVX-512, contiguous and paged) than 2 rows, while one row at a time is no faster
        // than 2 and leaves a single FMA chain per query for cached keys. The HT query
        // vectors of a step come from L1.
        let mut acc = [S::zero(); 16];
        let kg = if KT >= KGROUP { KGROUP } else { KT };
        let mut t0 = 0;
        while t0 < KT {
            let mut c = 0;
            while c < full {
                for t in t0..t0 + kg {
                    let kv = ks[t].vec::<S>(c);
                    for i in 0..HT {
                        acc[i * KT + t] = S::fma(S::load(qs[i].add(c)), kv, acc[i * KT + t]);
                    }
                }
                c += l;
            }
            t0 += kg;
        }
        let mut r = [0.0f32; 16];
        S::reduce_sums(&acc[..HT * KT], r.as_mut_ptr());
        if full < d {
            for i in 0..HT {
                for t in 0..KT {
                    let mut x = r[i * KT + t];
                    for cc in full..d {
                        x += *qs[i].add(cc) * ks[t].elem(cc);
                    }
                    r[i * KT + t] = x;
                }
            }
        }
        r
    }
}

/// `o_i += Σ_j p_ij · v_j` for heads `h .. h + HT` over the chunk's `n` keys: register tiles
/// of `DV` vectors of the row (the widest that fits the register file, 8 down to 1), two
/// keys at a time into separate accumulators where registers allow (two FMA chains, added
/// at the end of the chunk), then scalar columns.
#[inline(always)]
unsafe fn accum<S: Simd, R: Row, const HT: usize>(
    o: *mut f32,
    s: *const f32,
    h: usize,
    vp: &[R; CHUNK],
    n: usize,
    d: usize,
) {
    let l = S::LANES;
    // Accumulators the register file holds with room for the V vectors: 16 of 32 zmm, 8 of
    // 16 ymm (and 8 elsewhere).
    let acc_max = if l >= 16 { 16 } else { 8 };
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
        macro_rules! cols {
            ($dv:literal) => {
                if HT * $dv <= acc_max {
                    while c + $dv * l <= d {
                        if 2 * HT * $dv <= acc_max {
                            accum_block::<S, R, HT, $dv, 2>(&os, &ps, vp, n, c);
                        } else {
                            accum_block::<S, R, HT, $dv, 1>(&os, &ps, vp, n, c);
                        }
                        c += $dv * l;
                    }
                }
            };
        }
        cols!(8);
        cols!(4);
        cols!(2);
        cols!(1);
        for cc in c..d {
            for i in 0..HT {
                let mut x = *os[i].add(cc);
                for (j, v) in vp.iter().enumerate().take(n) {
                    x += *ps[i].add(j) * v.elem(cc);
                }
                *os[i].add(cc) = x;
            }
        }
    }
}

/// One register tile of [`accum`]: columns `c .. c + DV·LANES` of `HT` accumulator rows,
/// keys taken `KU` (1 or 2) at a time into `KU` sets of accumulators.
#[inline(always)]
unsafe fn accum_block<S: Simd, R: Row, const HT: usize, const DV: usize, const KU: usize>(
    os: &[*mut f32; HT],
    ps: &[*const f32; HT],
    vp: &[R; CHUNK],
    n: usize,
    c: usize,
) {
    let l = S::LANES;
    // SAFETY: columns c..c + DV·l are inside every row (the caller's loop bound).
    unsafe {
        let mut acc = [[[S::zero(); DV]; HT]; KU];
        for i in 0..HT {
            for (v, x) in acc[0][i].iter_mut().enumerate() {
                *x = S::load(os[i].add(c + v * l));
            }
        }
        let mut j = 0;
        while j + KU <= n {
            for (u, acc_u) in acc.iter_mut().enumerate() {
                let row = vp[j + u];
                let mut vv = [S::zero(); DV];
                for (v, x) in vv.iter_mut().enumerate() {
                    *x = row.vec::<S>(c + v * l);
                }
                for i in 0..HT {
                    let p = S::splat(*ps[i].add(j + u));
                    for (v, x) in acc_u[i].iter_mut().enumerate() {
                        *x = S::fma(p, vv[v], *x);
                    }
                }
            }
            j += KU;
        }
        if j < n {
            let row = vp[j];
            for i in 0..HT {
                let p = S::splat(*ps[i].add(j));
                for (v, x) in acc[0][i].iter_mut().enumerate() {
                    *x = S::fma(p, row.vec::<S>(c + v * l), *x);
                }
            }
        }
        for i in 0..HT {
            for v in 0..DV {
                let mut x = acc[0][i][v];
                for acc_u in acc.iter().skip(1) {
                    x = S::add(x, acc_u[i][v]);
                }
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
