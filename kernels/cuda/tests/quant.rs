//! The quantized matmul on the GPU: every weight format × kernel (GEMV, GEMM, Auto) against the
//! f64 product of the CPU-dequantized weights (`tessera_core::quant::dequantize`) with the f32
//! activations, on random shapes around every tile edge, with strided `x` / `y`, misaligned
//! weight and activation buffers (the 2-byte and scalar paths), outputs poisoned with NaN
//! before each launch, and NaN scales. GPU tests skip (pass) where `test_device()` finds no
//! device; the host-side validation and planning tests run everywhere.
//!
//! Tolerances (derived, not tuned). Write M = Σ_l mag_l·|x_l| for one output, where mag_l is
//! |w_l| for Q8_0 and Q4_0 and |d·sc·q| + |dmin·m| for Q4_K (the kernels sum the scale and
//! the min terms separately, as the CPU reference's magnitude does), u = 2⁻²⁴, u16 = 2⁻¹¹.
//! - GEMV: codes become floats exactly, d·sc and dmin·m are exact in f32, so every rounding is
//!   an f32 FMA or addition; the longest chain a term passes through is ≤ 18 operations inside
//!   a block (Q4_K: the 16-term sum of the activations, then the scale and min products), one
//!   addition per block the lane sees (≤ nb), 3 butterfly additions and ≤ 32 additions across
//!   lane groups. With the reference weights' own rounding (Q4_K's `d0·q − n0`), the error is
//!   ≤ γ_(nb+64)·M.
//! - GEMM: x and each weight are rounded to f16 (x: u16; Q8_0 / Q4_0 weights: one rounding,
//!   u16; Q4_K: d·sc and dmin·m rounded, then one fused rounding, ≤ 2u16 relative to mag), the
//!   f16 products are exact in the tensor core and accumulated in f32; the tensor cores'
//!   accumulation may truncate, so allow 2⁻²² per step over k/16 + 16 steps. Values in f16's
//!   subnormal range carry an absolute error ≤ 2⁻²⁵ each. So, with e_w = u16 (Q8_0, Q4_0) or
//!   2u16 (Q4_K):
//!
//! ```text
//! |err| ≤ (u16 + e_w + u16·e_w + u)·M + (k/16 + 16)·2⁻²²·M·(1 + 3u16)
//!       + 2⁻²⁵·Σ_l (mag_l + |x_l|)·(1 + 4u16)
//! ```

use half::f16;
use proptest::prelude::*;
use tessera_core::quant::{self as q, BlockQ4_0, BlockQ4_K, BlockQ8_0, QuantBlock};
use tessera_cuda::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use tessera_cuda::launch::fill_u32;
use tessera_cuda::quant::{
    self as cq, AUTO_GEMV_MAX_M, MAX_DIM, QuantArgs, QuantFormat, QuantKernel, QuantPath,
};
use tessera_cuda::{Device, Error, test_device};

const POISON: u32 = 0x7fc0_0001;
const U32: f64 = 1.0 / (1u64 << 24) as f64;
const U16: f64 = 1.0 / 2048.0;

fn gamma(j: usize) -> f64 {
    let ju = j as f64 * U32;
    ju / (1.0 - ju)
}

/// A small deterministic generator (the proptest seed drives it).
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 29) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Activations: uniform, with exact zeros and outliers.
fn activations(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v = rng.unit();
            match rng.next_u64() % 16 {
                0 => 0.0,
                1 => v * 8.0,
                _ => v,
            }
        })
        .collect()
}

/// Quantized weights of `n` rows of `k`: the raw bytes, the CPU-dequantized values and each
/// weight's magnitude (see the module docs).
struct Weights {
    bytes: Vec<u8>,
    deq: Vec<f32>,
    mag: Vec<f32>,
}

fn blocks_of<B: QuantBlock>(bytes: &[u8]) -> Vec<B> {
    let mut v = vec![B::zeroed(); bytes.len() / std::mem::size_of::<B>()];
    bytemuck::cast_slice_mut::<B, u8>(&mut v).copy_from_slice(bytes);
    v
}

fn quantize_rows<B: QuantBlock>(x: &[f32]) -> Vec<B> {
    let mut blocks = vec![B::zeroed(); x.len() / B::LEN];
    q::quantize(x, &mut blocks).unwrap();
    blocks
}

fn weights(
    format: QuantFormat,
    rng: &mut Rng,
    n: usize,
    k: usize,
    nan_block: Option<usize>,
) -> Weights {
    let mut src = Vec::with_capacity(n * k);
    for _ in 0..n {
        let row_scale = 0.1 + 1.9 * (rng.unit() + 1.0) / 2.0;
        src.extend((0..k).map(|_| rng.unit() * 0.5 * row_scale));
    }
    let mut bytes: Vec<u8> = match format {
        QuantFormat::Q8_0 => bytemuck::cast_slice(&quantize_rows::<BlockQ8_0>(&src)).to_vec(),
        QuantFormat::Q4_0 => bytemuck::cast_slice(&quantize_rows::<BlockQ4_0>(&src)).to_vec(),
        QuantFormat::Q4K => bytemuck::cast_slice(&quantize_rows::<BlockQ4_K>(&src)).to_vec(),
        QuantFormat::Q8K => unreachable!(),
    };
    if let Some(b) = nan_block {
        // Every format's first field is the f16 scale d.
        let off = b * format.block_bytes();
        bytes[off..off + 2].copy_from_slice(&f16::NAN.to_bits().to_le_bytes());
    }
    let mut deq = vec![0f32; n * k];
    let mut mag = vec![0f32; n * k];
    match format {
        QuantFormat::Q8_0 => {
            let blocks: Vec<BlockQ8_0> = blocks_of(&bytes);
            q::dequantize(&blocks, &mut deq).unwrap();
            mag.iter_mut().zip(&deq).for_each(|(m, w)| *m = w.abs());
        }
        QuantFormat::Q4_0 => {
            let blocks: Vec<BlockQ4_0> = blocks_of(&bytes);
            q::dequantize(&blocks, &mut deq).unwrap();
            mag.iter_mut().zip(&deq).for_each(|(m, w)| *m = w.abs());
        }
        QuantFormat::Q4K => {
            let blocks: Vec<BlockQ4_K> = blocks_of(&bytes);
            q::dequantize(&blocks, &mut deq).unwrap();
            for (b, out) in blocks.iter().zip(mag.chunks_exact_mut(256)) {
                let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
                for (i, o) in out.iter_mut().enumerate() {
                    let (j, g) = (i / 32, i / 64);
                    let (sc, m) = b.scale_min(j);
                    let byte = b.qs[32 * g + i % 32];
                    let qv = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                    *o = (d * sc as f32 * qv as f32).abs() + (dmin * m as f32).abs();
                }
            }
        }
        QuantFormat::Q8K => unreachable!(),
    }
    Weights { bytes, deq, mag }
}

/// A matmul problem.
#[derive(Debug, Clone)]
struct Problem {
    m: usize,
    n: usize,
    /// Blocks per row.
    kb: usize,
    ldx_pad: usize,
    ldy_pad: usize,
    /// Byte offset of the weights in their buffer (2: the 2-byte path).
    w_off: usize,
    /// Float offset of x in its buffer (1: the scalar activation path).
    x_off: usize,
    /// Poison the scale of the first block of this row (mod n) with NaN.
    nan_row: Option<usize>,
    seed: u64,
}

fn upload_at<T: tessera_cuda::cudarc::driver::DeviceRepr + Copy + Default>(
    dev: &Device,
    data: &[T],
    off: usize,
) -> CudaSlice<T> {
    let mut host = vec![T::default(); off + data.len() + 4];
    host[off..off + data.len()].copy_from_slice(data);
    dev.upload(&host).unwrap()
}

/// Runs `p` and checks every output and the untouched padding; returns the path taken.
fn check(
    dev: &Device,
    format: QuantFormat,
    kernel: QuantKernel,
    p: &Problem,
) -> Result<(), TestCaseError> {
    let k = p.kb * format.block_len();
    let (m, n) = (p.m, p.n);
    let ldx = k + p.ldx_pad;
    let ldy = n + p.ldy_pad;
    let mut rng = Rng(p.seed);
    let x_len = if m == 0 { 0 } else { (m - 1) * ldx + k };
    let x = activations(&mut rng, x_len);
    let nan_block = p.nan_row.map(|r| (r % n.max(1)) * p.kb);
    let w = weights(format, &mut rng, n, k, nan_block.filter(|_| n > 0 && k > 0));
    let y_len = if m == 0 { 0 } else { (m - 1) * ldy + n };

    let wbuf = upload_at(dev, &w.bytes, p.w_off);
    let xbuf = upload_at(dev, &x, p.x_off);
    let mut ybuf: CudaSlice<f32> = dev.alloc_zeros(y_len.max(1)).unwrap();
    fill_u32(dev, &mut ybuf, POISON).unwrap();
    let wv = wbuf.slice(p.w_off..p.w_off + w.bytes.len());
    let xv = xbuf.slice(p.x_off..p.x_off + x_len);
    let mut yv = ybuf.slice_mut(0..y_len);
    let args = QuantArgs {
        format,
        m,
        n,
        k,
        ldx,
        ldy,
    };
    cq::matmul(dev, kernel, &args, &xv, &wv, &mut yv)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    dev.synchronize()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let y = dev.download(&ybuf).unwrap();

    let gemv = match kernel {
        QuantKernel::Gemv => true,
        QuantKernel::Gemm => false,
        QuantKernel::Auto => m <= AUTO_GEMV_MAX_M,
    };
    let e_w = if format == QuantFormat::Q4K {
        2.0 * U16
    } else {
        U16
    };
    for i in 0..m {
        let xr = &x[i * ldx..i * ldx + k];
        for j in 0..n {
            let wr = &w.deq[j * k..(j + 1) * k];
            let mr = &w.mag[j * k..(j + 1) * k];
            let (mut exact, mut mag, mut abs_sum) = (0f64, 0f64, 0f64);
            for l in 0..k {
                exact += wr[l] as f64 * xr[l] as f64;
                mag += mr[l] as f64 * (xr[l] as f64).abs();
                abs_sum += mr[l] as f64 + (xr[l] as f64).abs();
            }
            let got = y[i * ldy + j];
            if exact.is_nan() {
                prop_assert!(got.is_nan(), "y[{i},{j}] = {got}, expected NaN (NaN scale)");
                continue;
            }
            let tol = if k == 0 {
                0.0
            } else if gemv {
                gamma(p.kb + 64) * mag
            } else {
                (U16 + e_w + U16 * e_w + U32) * mag
                    + (k / 16 + 16) as f64 * (1.0 / (1u64 << 22) as f64) * mag * (1.0 + 3.0 * U16)
                    + abs_sum / (1u64 << 25) as f64 * (1.0 + 4.0 * U16)
            };
            let err = (got as f64 - exact).abs();
            prop_assert!(
                got.is_finite() && err <= tol,
                "y[{i},{j}] = {got}, exact {exact}, |err| {err:e} > tol {tol:e} (M = {mag:e}; {p:?})"
            );
        }
        for j in n..ldy {
            let idx = i * ldy + j;
            if idx < y_len {
                prop_assert_eq!(
                    y[idx].to_bits(),
                    POISON,
                    "padding y[{},{}] was written",
                    i,
                    j
                );
            }
        }
    }
    Ok(())
}

/// One below / at / above the GEMV's rows per block (8·32/col_groups) and the GEMM's 64-row
/// tile, 1, primes.
fn rows() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => prop::sample::select(vec![
            1usize, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257
        ]),
        1 => 1usize..300,
    ]
}

/// Blocks per row for Q8_0 / Q4_0: one block, one below / at / above the 8-block unit, and
/// around 32 units (256 blocks: a second pass of the lane groups); the 32-block GEMM stage
/// divides everything.
fn kb_32() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => prop::sample::select(vec![1usize, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 255, 256, 257, 264]),
        1 => 1usize..80,
    ]
}

/// Blocks per row for Q4_K (one unit each): around the 32 lane groups of a pass.
fn kb_256() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => prop::sample::select(vec![1usize, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40]),
        1 => 1usize..12,
    ]
}

prop_compose! {
    fn problem(format: QuantFormat, tokens: BoxedStrategy<usize>)(
        m in tokens,
        n in rows(),
        kb in if format == QuantFormat::Q4K { kb_256().boxed() } else { kb_32().boxed() },
        ldx_pad in prop_oneof![2 => Just(0usize), 1 => 1usize..6],
        ldy_pad in prop_oneof![2 => Just(0usize), 1 => 1usize..4],
        w_off in prop::sample::select(vec![0usize, 0, 16, 2]),
        x_off in prop::sample::select(vec![0usize, 0, 4, 1]),
        nan_row in prop::option::weighted(0.15, 0usize..1000),
        seed in any::<u64>(),
    ) -> Problem {
        // Keep the reference (m·n·k in f64, debug build) and the CPU quantizer cheap.
        let k = kb * format.block_len();
        let budget = if format == QuantFormat::Q4K { 200_000 } else { 2_000_000 };
        let n = n.min((budget / k).max(1));
        let m = m.min((4_000_000 / (n * k)).max(1));
        Problem { m, n, kb, ldx_pad, ldy_pad, w_off, x_off, nan_row, seed }
    }
}

/// Tokens for the GEMV (any m; 1 and 2 are what Auto sends it).
fn gemv_tokens() -> BoxedStrategy<usize> {
    prop_oneof![4 => Just(1usize), 1 => 2usize..5].boxed()
}

/// Tokens for the GEMM: one below / at / above its 16- and 64-token tiles, 1, primes.
fn gemm_tokens() -> BoxedStrategy<usize> {
    prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 3, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129]),
        1 => 1usize..140,
    ]
    .boxed()
}

fn auto_tokens() -> BoxedStrategy<usize> {
    prop_oneof![Just(1usize), Just(2), Just(3), 4usize..70].boxed()
}

macro_rules! gpu_props {
    ($($name:ident: $format:expr, $kernel:expr, $tokens:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
            $(
                #[test]
                fn $name(p in problem($format, $tokens)) {
                    let Some(dev) = test_device() else { return Ok(()); };
                    check(dev, $format, $kernel, &p)?;
                }
            )*
        }
    };
}

gpu_props! {
    gemv_q8_0: QuantFormat::Q8_0, QuantKernel::Gemv, gemv_tokens();
    gemv_q4_0: QuantFormat::Q4_0, QuantKernel::Gemv, gemv_tokens();
    gemv_q4_k: QuantFormat::Q4K, QuantKernel::Gemv, gemv_tokens();
    gemm_q8_0: QuantFormat::Q8_0, QuantKernel::Gemm, gemm_tokens();
    gemm_q4_0: QuantFormat::Q4_0, QuantKernel::Gemm, gemm_tokens();
    gemm_q4_k: QuantFormat::Q4K, QuantKernel::Gemm, gemm_tokens();
    auto_q8_0: QuantFormat::Q8_0, QuantKernel::Auto, auto_tokens();
    auto_q4_0: QuantFormat::Q4_0, QuantKernel::Auto, auto_tokens();
    auto_q4_k: QuantFormat::Q4K, QuantKernel::Auto, auto_tokens();
}

const FORMATS: [QuantFormat; 3] = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4K];
const KERNELS: [QuantKernel; 3] = [QuantKernel::Gemv, QuantKernel::Gemm, QuantKernel::Auto];

fn fixed(
    m: usize,
    n: usize,
    kb: usize,
    w_off: usize,
    x_off: usize,
    nan_row: Option<usize>,
    seed: u64,
) -> Problem {
    Problem {
        m,
        n,
        kb,
        ldx_pad: 3,
        ldy_pad: 2,
        w_off,
        x_off,
        nan_row,
        seed,
    }
}

/// The shapes the benches and models use, aligned and misaligned, every kernel.
#[test]
fn realistic_shapes_every_path() {
    let Some(dev) = test_device() else { return };
    for format in FORMATS {
        let kb = 4096 / format.block_len();
        for kernel in KERNELS {
            for (m, w_off, x_off) in [(1, 0, 0), (1, 2, 1), (2, 0, 0), (17, 0, 0), (70, 2, 1)] {
                let p = fixed(m, 96, kb, w_off, x_off, None, 11 + m as u64);
                check(dev, format, kernel, &p)
                    .unwrap_or_else(|e| panic!("{format} {kernel:?} {p:?}: {e}"));
            }
        }
    }
}

/// A NaN scale makes exactly its row's outputs NaN, in every kernel.
#[test]
fn nan_scale_propagates_to_its_row_only() {
    let Some(dev) = test_device() else { return };
    for format in FORMATS {
        for kernel in KERNELS {
            for m in [1, 5, 40] {
                let p = fixed(m, 33, 9, 0, 0, Some(17), 5);
                check(dev, format, kernel, &p)
                    .unwrap_or_else(|e| panic!("{format} {kernel:?} m={m}: {e}"));
            }
        }
    }
}

/// k == 0 sets the m × n outputs to zero and leaves the row padding alone; m == 0 or n == 0
/// launches nothing.
#[test]
fn empty_reductions_and_empty_outputs() {
    let Some(dev) = test_device() else { return };
    for format in FORMATS {
        for kernel in KERNELS {
            let (m, n, ldy) = (3, 5, 7);
            let args = QuantArgs {
                format,
                m,
                n,
                k: 0,
                ldx: 0,
                ldy,
            };
            let x: CudaSlice<f32> = dev.alloc_zeros(1).unwrap();
            let w: CudaSlice<u8> = dev.alloc_zeros(2).unwrap();
            let mut y: CudaSlice<f32> = dev.alloc_zeros((m - 1) * ldy + n).unwrap();
            fill_u32(dev, &mut y, POISON).unwrap();
            let x0 = x.slice(0..0);
            let w0 = w.slice(0..0);
            cq::matmul(dev, kernel, &args, &x0, &w0, &mut y).unwrap();
            let host = dev.download(&y).unwrap();
            for (idx, v) in host.iter().enumerate() {
                if idx % ldy < n {
                    assert_eq!(v.to_bits(), 0, "{format} {kernel:?}: y[{idx}] not zeroed");
                } else {
                    assert_eq!(
                        v.to_bits(),
                        POISON,
                        "{format} {kernel:?}: padding y[{idx}] written"
                    );
                }
            }
            // m == 0 and n == 0: nothing is written.
            fill_u32(dev, &mut y, POISON).unwrap();
            let k = format.block_len();
            let xk: CudaSlice<f32> = dev.alloc_zeros(k).unwrap();
            let wk: CudaSlice<u8> = dev.alloc_zeros(format.block_bytes()).unwrap();
            let none = QuantArgs::dense(format, 0, 1, k);
            cq::matmul(dev, kernel, &none, &x0, &wk, &mut y).unwrap();
            let none = QuantArgs {
                ldy: 1,
                ..QuantArgs::dense(format, 1, 0, k)
            };
            cq::matmul(dev, kernel, &none, &xk, &w0, &mut y.slice_mut(0..0)).unwrap();
            dev.synchronize().unwrap();
            assert!(
                dev.download(&y)
                    .unwrap()
                    .iter()
                    .all(|v| v.to_bits() == POISON)
            );
        }
    }
}

/// Odd weight addresses, wrong lengths and Q8_K are refused on the device as on the host.
#[test]
fn device_side_refusals() {
    let Some(dev) = test_device() else { return };
    for format in FORMATS {
        let (m, n, k) = (2, 3, format.block_len());
        let bytes = cq::weight_bytes(format, n, k).unwrap();
        let w: CudaSlice<u8> = dev.alloc_zeros(bytes + 2).unwrap();
        let x: CudaSlice<f32> = dev.alloc_zeros(m * k).unwrap();
        let mut y: CudaSlice<f32> = dev.alloc_zeros(m * n).unwrap();
        let args = QuantArgs::dense(format, m, n, k);
        for kernel in KERNELS {
            let odd = w.slice(1..1 + bytes);
            let err = cq::matmul(dev, kernel, &args, &x, &odd, &mut y).unwrap_err();
            assert!(matches!(err, Error::Invalid(_)), "{err}");
            let short = w.slice(0..bytes - 1);
            assert!(cq::matmul(dev, kernel, &args, &x, &short, &mut y).is_err());
            let xs = x.slice(0..m * k - 1);
            assert!(cq::matmul(dev, kernel, &args, &xs, &w.slice(0..bytes), &mut y).is_err());
            let mut ys = y.slice_mut(0..m * n - 1);
            assert!(cq::matmul(dev, kernel, &args, &x, &w.slice(0..bytes), &mut ys).is_err());
        }
        let mut out: CudaSlice<f32> = dev.alloc_zeros(n * k).unwrap();
        assert!(cq::dequantize(dev, format, n, k, &w.slice(1..1 + bytes), &mut out).is_err());
        assert!(
            cq::dequantize(
                dev,
                format,
                n,
                k,
                &w.slice(0..bytes),
                &mut out.slice_mut(1..)
            )
            .is_err()
        );
    }
    let x: CudaSlice<f32> = dev.alloc_zeros(256).unwrap();
    let w: CudaSlice<u8> = dev.alloc_zeros(292).unwrap();
    let mut y: CudaSlice<f32> = dev.alloc_zeros(1).unwrap();
    let args = QuantArgs::dense(QuantFormat::Q8K, 1, 1, 256);
    let err = cq::matmul(dev, QuantKernel::Auto, &args, &x, &w, &mut y).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
}

/// The GPU dequantizer is bit-identical to the CPU's, aligned or not.
#[test]
fn dequantize_is_bit_exact() {
    let Some(dev) = test_device() else { return };
    for format in FORMATS {
        for (n, kb, off) in [(1, 1, 0), (7, 3, 2), (33, 9, 16)] {
            let k = kb * format.block_len();
            let w = weights(format, &mut Rng(n as u64 * 31 + kb as u64), n, k, None);
            let buf = upload_at(dev, &w.bytes, off);
            let view = buf.slice(off..off + w.bytes.len());
            let mut out: CudaSlice<f32> = dev.alloc_zeros(n * k).unwrap();
            fill_u32(dev, &mut out, POISON).unwrap();
            cq::dequantize(dev, format, n, k, &view, &mut out).unwrap();
            let got = dev.download(&out).unwrap();
            for (i, (g, e)) in got.iter().zip(&w.deq).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    e.to_bits(),
                    "{format} n={n} kb={kb} off={off}: element {i}"
                );
            }
        }
    }
}

// ---- host-side: validation and planning (no GPU needed) -------------------------------------------

#[test]
fn weight_bytes_per_format() {
    assert_eq!(
        cq::weight_bytes(QuantFormat::Q8_0, 3, 64).unwrap(),
        3 * 2 * 34
    );
    assert_eq!(
        cq::weight_bytes(QuantFormat::Q4_0, 5, 96).unwrap(),
        5 * 3 * 18
    );
    assert_eq!(
        cq::weight_bytes(QuantFormat::Q4K, 2, 512).unwrap(),
        2 * 2 * 144
    );
    assert_eq!(cq::weight_bytes(QuantFormat::Q4_0, 0, 32).unwrap(), 0);
    assert!(cq::weight_bytes(QuantFormat::Q8_0, 1, 33).is_err());
    assert!(cq::weight_bytes(QuantFormat::Q4K, 1, 128).is_err());
    assert!(matches!(
        cq::weight_bytes(QuantFormat::Q8K, 1, 256),
        Err(Error::Unsupported(_))
    ));
    assert!(cq::weight_bytes(QuantFormat::Q8_0, usize::MAX / 2, 64).is_err());
}

fn valid(a: &QuantArgs) -> (usize, usize, usize) {
    let x = if a.m == 0 { 0 } else { (a.m - 1) * a.ldx + a.k };
    let y = if a.m == 0 { 0 } else { (a.m - 1) * a.ldy + a.n };
    (x, cq::weight_bytes(a.format, a.n, a.k).unwrap(), y)
}

#[test]
fn validation_accepts_exact_buffers_and_refuses_every_short_one() {
    for format in FORMATS {
        let bl = format.block_len();
        for a in [
            QuantArgs::dense(format, 1, 1, bl),
            QuantArgs::dense(format, 7, 13, 3 * bl),
            QuantArgs {
                ldx: 3 * bl + 5,
                ldy: 20,
                ..QuantArgs::dense(format, 4, 13, 3 * bl)
            },
            QuantArgs::dense(format, 0, 5, bl),
            QuantArgs::dense(format, 5, 0, bl),
            QuantArgs::dense(format, 5, 3, 0),
        ] {
            let (x, w, y) = valid(&a);
            cq::validate(&a, x, w, y).unwrap_or_else(|e| panic!("{a:?}: {e}"));
            // Longer x / y are fine; the weights must be exact.
            cq::validate(&a, x + 9, w, y + 9).unwrap();
            if w > 0 {
                assert!(cq::validate(&a, x, w - 1, y).is_err(), "{a:?}");
            }
            assert!(cq::validate(&a, x, w + 1, y).is_err(), "{a:?}");
            if x > 0 {
                assert!(cq::validate(&a, x - 1, w, y).is_err(), "{a:?}");
            }
            if y > 0 {
                assert!(cq::validate(&a, x, w, y - 1).is_err(), "{a:?}");
            }
        }
    }
}

#[test]
fn validation_refuses_bad_shapes_and_strides() {
    let f = QuantFormat::Q4_0;
    let ok = QuantArgs::dense(f, 2, 3, 64);
    let (x, w, y) = valid(&ok);
    // Leading dimensions below the row, even for empty matrices.
    assert!(cq::validate(&QuantArgs { ldx: 63, ..ok }, x, w, y).is_err());
    assert!(cq::validate(&QuantArgs { ldy: 2, ..ok }, x, w, y).is_err());
    assert!(
        cq::validate(
            &QuantArgs {
                m: 0,
                ldx: 63,
                ..ok
            },
            0,
            w,
            0
        )
        .is_err()
    );
    // k not a multiple of the block length.
    assert!(
        cq::validate(
            &QuantArgs {
                k: 48,
                ldx: 48,
                ..ok
            },
            200,
            3 * 18,
            y
        )
        .is_err()
    );
    let k4 = QuantArgs::dense(QuantFormat::Q4K, 1, 1, 288);
    assert!(cq::validate(&k4, 288, 144, 1).is_err());
    // Q8_K is not a weight format here.
    let q8k = QuantArgs::dense(QuantFormat::Q8K, 1, 1, 256);
    assert!(matches!(
        cq::validate(&q8k, 256, 292, 1),
        Err(Error::Unsupported(_))
    ));
    // Dimensions beyond the kernels' int range.
    let big = MAX_DIM + 1;
    assert!(
        cq::validate(
            &QuantArgs::dense(f, big, 1, 32),
            (big - 1) * 32 + 32,
            18,
            big
        )
        .is_err()
    );
    assert!(
        cq::validate(
            &QuantArgs {
                ldy: big,
                ..QuantArgs::dense(f, 1, 1, 32)
            },
            32,
            18,
            1
        )
        .is_err()
    );
    assert!(
        cq::validate(
            &QuantArgs {
                ldx: usize::MAX,
                ..ok
            },
            usize::MAX,
            w,
            y
        )
        .is_err()
    );
    // Extents that overflow usize.
    assert!(
        cq::validate(
            &QuantArgs {
                m: usize::MAX,
                ldx: usize::MAX,
                ..ok
            },
            usize::MAX,
            w,
            usize::MAX
        )
        .is_err()
    );
}

/// SMs of an H100 / H200, for the host-side plans.
const SMS: u32 = 132;

#[test]
fn gemv_rows_per_group_fills_the_last_wave() {
    let slots = SMS as usize * cq::GEMV_BLOCKS_PER_SM;
    // 4096 rows, 2 phases: 8 rows a group gives 256 blocks for 264 slots (0.97 of one wave);
    // 4 rows ties (512 blocks, 0.97 of two), so the larger wins.
    assert_eq!(cq::gemv_rows_per_group(4096, 2, slots), 8);
    // 14336 rows: 8 rows -> 896 blocks = 3.39 waves (85% full); 7 rows -> 1024 = 3.88 (97%).
    assert_eq!(cq::gemv_rows_per_group(14336, 2, slots), 7);
    // Fewer blocks than slots: more, smaller blocks.
    assert_eq!(cq::gemv_rows_per_group(300, 32, slots), 4);
    for n in [1, 7, 100, 4097, 1 << 20] {
        for phases in [1, 2, 4, 32] {
            let r = cq::gemv_rows_per_group(n, phases, slots);
            assert!((4..=8).contains(&r), "{n} {phases}: {r}");
        }
    }
    // No device information: still a valid choice.
    assert!((4..=8).contains(&cq::gemv_rows_per_group(1000, 2, 0)));
}

#[test]
fn plan_picks_the_kernel_and_geometry() {
    let p = |format, m, n, k, kernel, w: u64, x: u64| {
        cq::plan(&QuantArgs::dense(format, m, n, k), kernel, w, x, SMS).unwrap()
    };
    let gemv = |col_groups: u32, rows_per_group: u32| QuantPath::Gemv {
        col_groups,
        rows_per_group,
        rows_per_block: rows_per_group * (32 / col_groups),
    };
    // Auto: GEMV up to AUTO_GEMV_MAX_M tokens, then the 16-token GEMM, then the 64-token one.
    let a = p(
        QuantFormat::Q4_0,
        1,
        4096,
        4096,
        QuantKernel::Auto,
        256,
        256,
    );
    assert_eq!(a.kernel, "quant_gemv_q4_0");
    // 4096 / 256 = 16 units per row: 16 lane groups per row, 2 row phases of 8 rows.
    assert_eq!(a.path, gemv(16, 8));
    assert_eq!(a.config.grid_dim, (256, 1, 1));
    assert_eq!(a.config.block_dim, (256, 1, 1));
    assert_eq!(a.config.shared_mem_bytes, 40960);
    assert!(a.vector_weights && a.vector_x);
    // The bench's 14336 rows: 7 rows a group, 14 a block.
    let b = p(
        QuantFormat::Q4K,
        1,
        14336,
        4096,
        QuantKernel::Auto,
        256,
        256,
    );
    assert_eq!((b.kernel, b.path), ("quant_gemv_q4_k", gemv(16, 7)));
    assert_eq!(b.config.grid_dim, (1024, 1, 1));
    assert_eq!(b.config.shared_mem_bytes, 36864);
    for (m, name) in [
        (2, "quant_gemv_q4_0"),
        (3, "quant_gemm_q4_0_m16"),
        (16, "quant_gemm_q4_0_m16"),
    ] {
        assert_eq!(
            p(QuantFormat::Q4_0, m, 64, 256, QuantKernel::Auto, 0, 0).kernel,
            name
        );
    }
    let g = p(QuantFormat::Q4K, 17, 4097, 4096, QuantKernel::Auto, 0, 0);
    assert_eq!(g.kernel, "quant_gemm_q4_k_m64");
    assert_eq!(g.path, QuantPath::Gemm { tile_m: 64 });
    assert_eq!(g.config.grid_dim, (65, 1, 1));
    assert_eq!(g.config.block_dim, (128, 1, 1));
    assert_eq!(g.config.shared_mem_bytes, 0);
    let g = p(QuantFormat::Q8_0, 130, 64, 32, QuantKernel::Auto, 0, 0);
    assert_eq!(
        (g.kernel, g.config.grid_dim),
        ("quant_gemm_q8_0_m64", (1, 3, 1))
    );
    // Forced kernels.
    assert_eq!(
        p(QuantFormat::Q8_0, 1, 8, 32, QuantKernel::Gemm, 0, 0).kernel,
        "quant_gemm_q8_0_m16"
    );
    let v = p(QuantFormat::Q8_0, 100, 8, 14336, QuantKernel::Gemv, 0, 0);
    assert_eq!(v.kernel, "quant_gemv_q8_0");
    // 448 blocks = 56 units: 32 lane groups (two passes), one row phase; 8 rows make two
    // blocks of 7 and 1 (more blocks than one); one grid row per token.
    assert_eq!(v.path, gemv(32, 7));
    assert_eq!(v.config.grid_dim, (2, 100, 1));
    assert_eq!(v.config.shared_mem_bytes, 71680);
    // Tokens beyond the grid's y limit are strided over.
    let many = p(QuantFormat::Q8_0, 70_000, 8, 32, QuantKernel::Gemv, 0, 0);
    assert_eq!(many.config.grid_dim.1, 65_535);
    let many = p(
        QuantFormat::Q8_0,
        64 * 70_000,
        8,
        32,
        QuantKernel::Gemm,
        0,
        0,
    );
    assert_eq!(many.config.grid_dim.1, 65_535);
    // Small k: one unit, one lane group per row, 32 row phases.
    let s = p(QuantFormat::Q4K, 1, 300, 256, QuantKernel::Gemv, 0, 0);
    assert_eq!(s.path, gemv(1, 4));
    assert_eq!(s.config.grid_dim, (3, 1, 1));
    let s = p(QuantFormat::Q4_0, 1, 300, 96, QuantKernel::Gemv, 0, 0);
    assert_eq!(s.path, gemv(1, 4));
    // 5 units -> 8 lane groups, 4 phases.
    let s = p(QuantFormat::Q4_0, 1, 300, 5 * 256, QuantKernel::Gemv, 0, 0);
    assert_eq!(s.path, gemv(8, 4));
    assert_eq!(s.config.grid_dim, (19, 1, 1));
}

#[test]
fn plan_vector_paths_follow_alignment() {
    let args = |format, m, k, ldx| QuantArgs {
        ldx,
        ..QuantArgs::dense(format, m, 8, k)
    };
    let plan = |a: &QuantArgs, kernel, w, x| cq::plan(a, kernel, w, x, SMS).unwrap();
    for kernel in [QuantKernel::Gemv, QuantKernel::Gemm] {
        // Q8_0 / Q4_0 GEMV units need whole 8-block groups; the GEMM reads them 2 bytes wide.
        for f in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let gemv = kernel == QuantKernel::Gemv;
            assert_eq!(
                plan(&args(f, 1, 256, 256), kernel, 0x100, 0).vector_weights,
                gemv
            );
            assert!(!plan(&args(f, 1, 224, 224), kernel, 0x100, 0).vector_weights);
            assert!(!plan(&args(f, 1, 256, 256), kernel, 0x102, 0).vector_weights);
        }
        assert!(plan(&args(QuantFormat::Q4K, 1, 256, 256), kernel, 0x110, 0).vector_weights);
        assert!(!plan(&args(QuantFormat::Q4K, 1, 256, 256), kernel, 0x112, 0).vector_weights);
        // Activations: 16-byte aligned rows.
        let f = QuantFormat::Q4_0;
        assert!(plan(&args(f, 1, 64, 64), kernel, 0, 0x40).vector_x);
        assert!(!plan(&args(f, 1, 64, 64), kernel, 0, 0x44).vector_x);
        assert!(
            plan(&args(f, 1, 64, 65), kernel, 0, 0x40).vector_x,
            "one row: ldx unused"
        );
        assert!(!plan(&args(f, 3, 64, 65), kernel, 0, 0x40).vector_x);
        assert!(plan(&args(f, 3, 64, 68), kernel, 0, 0x40).vector_x);
        // Odd weight addresses are refused.
        assert!(matches!(
            cq::plan(&args(f, 1, 64, 64), kernel, 0x101, 0, SMS),
            Err(Error::Invalid(_))
        ));
    }
    // Empty problems have no plan.
    for (m, n, k) in [(0, 8, 32), (1, 0, 32), (1, 8, 0)] {
        let a = QuantArgs::dense(QuantFormat::Q4_0, m, n, k);
        assert!(cq::plan(&a, QuantKernel::Auto, 0, 0, SMS).is_err());
    }
}

#[test]
fn dense_args_are_contiguous() {
    let a = QuantArgs::dense(QuantFormat::Q4K, 3, 5, 512);
    assert_eq!((a.m, a.n, a.k, a.ldx, a.ldy), (3, 5, 512, 512, 5));
    assert_eq!(QuantKernel::default(), QuantKernel::Auto);
}

/// The device pointers the tests pass are what the launchers see (a sub-slice's address is its
/// buffer's plus the offset), so the misaligned cases above do reach the 2-byte paths.
#[test]
fn sub_slices_shift_the_device_address() {
    let Some(dev) = test_device() else { return };
    let buf: CudaSlice<u8> = dev.alloc_zeros(64).unwrap();
    let (base, _a) = buf.device_ptr(dev.stream());
    let view = buf.slice(2..);
    let (shifted, _b) = view.device_ptr(dev.stream());
    assert_eq!(shifted, base + 2);
    let mut f: CudaSlice<f32> = dev.alloc_zeros(8).unwrap();
    let (fb, _c) = f.device_ptr_mut(dev.stream());
    assert_eq!(fb % 16, 0);
}
