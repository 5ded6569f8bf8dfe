//! The reference quantizers and dequantizers of `tessera_core::quant` against an independent
//! implementation: the numpy quants of the `gguf` package, through the vectors that
//! `tests/fixtures/quant/generate.py` wrote (see that script for what each file holds).
//!
//! * Quantize: Q8_0 bytes must be identical. Q4_0 scales must be identical and each 4-bit
//!   code identical, except that a code may differ by one where the input is an exact tie of
//!   the quantizer's truncation (`x·id + 8.5` an integer up to the f32 rounding of that
//!   expression): such a difference is accepted only after checking that it is one.
//! * Dequantize (random blocks with finite scales, Q8_0 / Q4_0 / Q4_K): every f32 output
//!   bit-identical to gguf's.

use std::path::PathBuf;
use tessera_core::quant::{self, BlockQ4_0, BlockQ4_K, BlockQ8_0, QK, QuantBlock};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/quant")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); tests/fixtures/quant/generate.py writes it",
            path.display()
        )
    })
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(bytes.len() % 4, 0, "f32 file length");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The blocks stored in `bytes` (GGML layout, which is the layout of `B`, little-endian).
fn blocks<B: QuantBlock>(bytes: &[u8]) -> Vec<B> {
    let size = std::mem::size_of::<B>();
    assert_eq!(bytes.len() % size, 0, "{}: file length", B::FORMAT);
    bytes
        .chunks_exact(size)
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

fn input() -> Vec<f32> {
    let x = f32s(&fixture("input.f32"));
    assert!(!x.is_empty() && x.len().is_multiple_of(QK));
    x
}

fn quantized<B: QuantBlock>(x: &[f32]) -> Vec<B> {
    let mut out = vec![B::zeroed(); x.len() / B::LEN];
    quant::quantize(x, &mut out).unwrap();
    out
}

#[test]
fn q8_0_quantize_matches_gguf_byte_for_byte() {
    let x = input();
    let gguf = fixture("q8_0.quant.bin");
    let ours = quantized::<BlockQ8_0>(&x);
    let ours_bytes: &[u8] = bytemuck::cast_slice(&ours);
    assert_eq!(ours_bytes.len(), gguf.len(), "block count");
    let size = std::mem::size_of::<BlockQ8_0>();
    for (i, (a, b)) in ours_bytes
        .chunks_exact(size)
        .zip(gguf.chunks_exact(size))
        .enumerate()
    {
        assert_eq!(
            a,
            b,
            "q8_0 block {i} differs (input {:?})",
            &x[i * QK..(i + 1) * QK]
        );
    }
}

/// GGML's Q4_0 code of `x` for a block whose scale before f16 rounding is `d`: the value the
/// quantizer truncates is `x·id + 8.5`, `id = 1/d`, each operation rounded to f32.
fn q4_0_pre_trunc(x: f32, d: f32) -> (f32, f64) {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let rounded = x * id + 8.5;
    // The exact value of x·id + 8.5 for the same (rounded) id: the product of two f32 is
    // exact in f64, and adding 8.5 is exact at these magnitudes.
    let exact = f64::from(x) * f64::from(id) + 8.5;
    (rounded, exact)
}

#[test]
fn q4_0_quantize_matches_gguf_up_to_ties() {
    let x = input();
    let gguf = blocks::<BlockQ4_0>(&fixture("q4_0.quant.bin"));
    let ours = quantized::<BlockQ4_0>(&x);
    assert_eq!(ours.len(), gguf.len(), "block count");
    let code = |b: &BlockQ4_0, i: usize| -> u8 {
        if i < QK / 2 {
            b.qs[i] & 0x0f
        } else {
            b.qs[i - QK / 2] >> 4
        }
    };
    let mut ties = 0;
    for (bi, (o, g)) in ours.iter().zip(&gguf).enumerate() {
        let xb = &x[bi * QK..(bi + 1) * QK];
        assert_eq!(
            o.d.to_bits(),
            g.d.to_bits(),
            "q4_0 block {bi}: scale {} vs gguf {} (input {xb:?})",
            o.d,
            g.d
        );
        // The scale before f16 rounding, as both compute it: the value of largest magnitude
        // (the first one on ties) divided by -8.
        let max = xb
            .iter()
            .fold(0f32, |m, &v| if m.abs() < v.abs() { v } else { m });
        let d = max / -8.0;
        for (i, &xi) in xb.iter().enumerate() {
            let (co, cg) = (code(o, i), code(g, i));
            if co == cg {
                continue;
            }
            let (rounded, exact) = q4_0_pre_trunc(xi, d);
            let boundary = exact.round();
            // A tie: both codes are the two sides of the integer boundary `c`, and the exact
            // x·id + 8.5 lies within one f32 ulp at 16 (2^-19, the sum of the two roundings'
            // half-ulps) of it, so a differently rounded (e.g. fused) evaluation may fall on
            // either side.
            let is_tie = co.abs_diff(cg) == 1
                && f64::from(co.max(cg)) == boundary.min(15.0)
                && (exact - boundary).abs() <= 1.0 / f64::from(1u32 << 19);
            assert!(
                is_tie,
                "q4_0 block {bi} value {i} ({xi:e}): code {co}, gguf {cg}; x·id + 8.5 is \
                 {rounded} in f32, {exact} exactly: not a rounding tie"
            );
            ties += 1;
        }
    }
    println!(
        "q4_0: {} blocks, {ties} codes differ on exact ties",
        ours.len()
    );
}

fn check_dequantize<B: QuantBlock>(name: &str) {
    let bl = blocks::<B>(&fixture(&format!("{name}.blocks.bin")));
    let want = f32s(&fixture(&format!("{name}.dequant.f32")));
    assert!(!bl.is_empty());
    assert_eq!(want.len(), bl.len() * B::LEN, "{name}: value count");
    let mut got = vec![f32::NAN; want.len()];
    quant::dequantize(&bl, &mut got).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{name}: value {i} (block {}, {:?}) is {g:e}, gguf says {w:e}",
            i / B::LEN,
            bl[i / B::LEN]
        );
    }
}

#[test]
fn q8_0_dequantize_matches_gguf_exactly() {
    check_dequantize::<BlockQ8_0>("q8_0");
}

#[test]
fn q4_0_dequantize_matches_gguf_exactly() {
    check_dequantize::<BlockQ4_0>("q4_0");
}

#[test]
fn q4_k_dequantize_matches_gguf_exactly() {
    check_dequantize::<BlockQ4_K>("q4_K");
}

#[test]
fn fixtures_cover_the_interesting_inputs() {
    // Guards against a regenerated fixture that lost its point: inputs on the ties of both
    // quantizers, and scales that are zero, subnormal and infinite in f16.
    let x = input();
    let q8 = blocks::<BlockQ8_0>(&fixture("q8_0.quant.bin"));
    let q4 = blocks::<BlockQ4_0>(&fixture("q4_0.quant.bin"));
    assert!(q8.iter().any(|b| b.d.to_f32() == 0.0));
    assert!(
        q8.iter()
            .any(|b| b.d.to_f32() != 0.0 && !b.d.is_normal() && b.d.is_finite())
    );
    assert!(q8.iter().any(|b| b.d.is_infinite()));
    assert!(q4.iter().any(|b| b.d.is_infinite()));
    let mut near_ties = 0;
    for (bi, xb) in x.chunks_exact(QK).enumerate() {
        let max = xb
            .iter()
            .fold(0f32, |m, &v| if m.abs() < v.abs() { v } else { m });
        let d = max / -8.0;
        if d.is_finite() && d != 0.0 && q4[bi].d.is_finite() {
            for &xi in xb {
                let (_, exact) = q4_0_pre_trunc(xi, d);
                if (exact - exact.round()).abs() <= 1.0 / f64::from(1u32 << 19) {
                    near_ties += 1;
                }
            }
        }
    }
    assert!(near_ties >= 100, "only {near_ties} q4_0 tie inputs");
}
