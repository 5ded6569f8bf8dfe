//! Scalar variant: portable code, one dot product at a time (a 1×1 tile), and the
//! block-level helpers the SIMD variants use for their reference-exact quantizers.

use super::{BlockQ4_0, BlockQ4_K, BlockQ8_0, BlockQ8_K, Kernels, QK, QK_K, Table, Tile};
use tessera_core::quant::QuantBlock;

pub(super) static TABLE: Table = Table {
    q8_0: Kernels {
        mr: 1,
        nr: 1,
        tile: tile_q8_0,
        gemv: None,
        panel: None,
    },
    q4_0: Kernels {
        mr: 1,
        nr: 1,
        tile: tile_q4_0,
        gemv: None,
        panel: None,
    },
    q4_k: Kernels {
        mr: 1,
        nr: 1,
        tile: tile_q4_k,
        gemv: None,
        panel: None,
    },
    quantize_q8_0,
    quantize_q8_k,
};

/// Integer dot product of a Q8_0 weight block and a Q8_0 activation block.
#[inline]
pub(crate) fn isum_q8_0(w: &BlockQ8_0, a: &BlockQ8_0) -> i32 {
    w.qs.iter()
        .zip(&a.qs)
        .map(|(&x, &y)| x as i32 * y as i32)
        .sum()
}

/// Integer dot product of a Q4_0 weight block (codes 0..15, offset 8) and a Q8_0 block,
/// given the sum of the activation quants.
#[inline]
pub(crate) fn isum_q4_0(w: &BlockQ4_0, a: &BlockQ8_0, a_sum: i32) -> i32 {
    let mut s = 0i32;
    for j in 0..QK / 2 {
        s += (w.qs[j] & 0x0f) as i32 * a.qs[j] as i32;
        s += (w.qs[j] >> 4) as i32 * a.qs[j + QK / 2] as i32;
    }
    s - 8 * a_sum
}

/// Q4_K · Q8_K for one super-block: the scale-weighted integer sum and the min-weighted sum of
/// the activation block sums (`bsums`).
#[inline]
pub(crate) fn isums_q4_k(w: &BlockQ4_K, a: &BlockQ8_K) -> (i32, i32) {
    let (mut scaled, mut mins) = (0i32, 0i32);
    for g in 0..QK_K / 64 {
        let (sc0, m0) = w.scale_min(2 * g);
        let (sc1, m1) = w.scale_min(2 * g + 1);
        let (mut lo, mut hi) = (0i32, 0i32);
        for i in 0..32 {
            let q = w.qs[32 * g + i];
            lo += (q & 0x0f) as i32 * a.qs[64 * g + i] as i32;
            hi += (q >> 4) as i32 * a.qs[64 * g + 32 + i] as i32;
        }
        scaled += sc0 as i32 * lo + sc1 as i32 * hi;
        let b = &a.bsums[4 * g..4 * g + 4];
        mins += m0 as i32 * (b[0] as i32 + b[1] as i32) + m1 as i32 * (b[2] as i32 + b[3] as i32);
    }
    (scaled, mins)
}

/// Runs `dot(row r, token t) -> f32` for every pair of the tile and stores it.
///
/// # Safety
/// The tile's pointers cover its rows, tokens and outputs (see [`Tile`]).
#[inline(always)]
unsafe fn each_pair<W: tessera_core::quant::WeightBlock>(
    t: &Tile<W>,
    dot: impl Fn(&[W], &[W::Act], &[i32]) -> f32,
) {
    for tk in 0..t.tokens {
        // SAFETY: token tk < tokens: kb activation blocks and kb sums at a/sums + tk·lda.
        let (a, sums) = unsafe {
            (
                std::slice::from_raw_parts(t.a.add(tk * t.lda), t.kb),
                std::slice::from_raw_parts(t.sums.add(tk * t.lda), t.kb),
            )
        };
        for r in 0..t.rows {
            // SAFETY: row r < rows: kb weight blocks at w + r·ldw; C[tk, r] is in bounds.
            unsafe {
                let w = std::slice::from_raw_parts(t.w.add(r * t.ldw), t.kb);
                *t.c.add(tk * t.ldc + r) = dot(w, a, sums);
            }
        }
    }
}

/// # Safety
/// See [`super::TileFn`].
unsafe fn tile_q8_0(t: &Tile<BlockQ8_0>) {
    // SAFETY: forwarded contract.
    unsafe {
        each_pair(t, |w, a, _| {
            let mut acc = 0f32;
            for (wb, ab) in w.iter().zip(a) {
                acc += (wb.d.to_f32() * ab.d.to_f32()) * isum_q8_0(wb, ab) as f32;
            }
            acc
        })
    }
}

/// # Safety
/// See [`super::TileFn`].
unsafe fn tile_q4_0(t: &Tile<BlockQ4_0>) {
    // SAFETY: forwarded contract.
    unsafe {
        each_pair(t, |w, a, sums| {
            let mut acc = 0f32;
            for ((wb, ab), &s) in w.iter().zip(a).zip(sums) {
                acc += (wb.d.to_f32() * ab.d.to_f32()) * isum_q4_0(wb, ab, s) as f32;
            }
            acc
        })
    }
}

/// # Safety
/// See [`super::TileFn`].
unsafe fn tile_q4_k(t: &Tile<BlockQ4_K>) {
    // SAFETY: forwarded contract.
    unsafe {
        each_pair(t, |w, a, _| {
            let mut acc = 0f32;
            for (wb, ab) in w.iter().zip(a) {
                let (scaled, mins) = isums_q4_k(wb, ab);
                acc += (ab.d * wb.d.to_f32()) * scaled as f32;
                acc -= (ab.d * wb.dmin.to_f32()) * mins as f32;
            }
            acc
        })
    }
}

/// # Safety
/// See [`super::QuantizeFn`].
unsafe fn quantize_q8_0(x: *const f32, nb: usize, out: *mut BlockQ8_0, sums: *mut i32) {
    for b in 0..nb {
        // SAFETY: block b < nb of x, out and sums.
        unsafe {
            let xs = std::slice::from_raw_parts(x.add(b * QK), QK);
            let y = BlockQ8_0::quantize_block(xs);
            *sums.add(b) = y.qs.iter().map(|&q| q as i32).sum();
            *out.add(b) = y;
        }
    }
}

/// # Safety
/// See [`super::QuantizeFn`].
unsafe fn quantize_q8_k(x: *const f32, nb: usize, out: *mut BlockQ8_K, sums: *mut i32) {
    for b in 0..nb {
        // SAFETY: block b < nb of x, out and sums.
        unsafe {
            let xs = std::slice::from_raw_parts(x.add(b * QK_K), QK_K);
            let y = BlockQ8_K::quantize_block(xs);
            *sums.add(b) = y.bsums.iter().map(|&s| s as i32).sum();
            *out.add(b) = y;
        }
    }
}
