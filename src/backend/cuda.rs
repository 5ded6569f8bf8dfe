//! The CUDA backend: `tessera-cuda`'s kernels on one GPU (`--features cuda`).
//!
//! Activations are row-major f32 matrices in device memory, as on the CPU. What differs is the
//! arithmetic of the products, which run on tensor cores:
//!
//! * **Linear layers.** f16 and bf16 weights are stored as such; each product rounds its f32
//!   input to the weight's type ([`tessera_cuda::ops::narrow`]) and accumulates in f32
//!   ([`tessera_cuda::gemm`]). The CUDA family has no f32 GEMM, so an f32 weight is stored
//!   as two f16 terms, `w ≈ hi + lo/2¹¹` ([`tessera_cuda::ops::split_f16`]), the input is
//!   split the same way on each call, and the product is three f16 tensor-core GEMMs,
//!   `x_hi·w_hi + (x_hi·w_lo + x_lo·w_hi)/2¹¹`, accumulated in f32: about 2⁻²¹ relative, close
//!   to an f32 GEMM, for three times the f16 work (choose f16 weights for speed). The split
//!   needs `|x|, |w| < 65520`. Quantized weights go to [`tessera_cuda::quant::matmul`], which
//!   takes the f32 activations as they are.
//! * **Attention.** Q, K and V are rounded to f16 once per call (each distinct source tensor
//!   once: the query, key and value columns of a fused projection share one copy), and the
//!   fused kernel writes f32 ([`tessera_cuda::attention`]).
//! * **KV cache and decode attention.** The cache is [`DeviceKvCache`]: paged or contiguous,
//!   f32, f16 or Q8_0 storage, with decode attention in f32 over the stored values.
//! * **Everything else** (norms, activations, residual adds, gathers, pooling) is f32, as on
//!   the CPU ([`tessera_cuda::ops`]).
//!
//! So a model with f32 weights has f32-grade linears and f16 attention inputs on this backend.
//! The end-to-end tests in `tests/cuda_models.rs` hold it to 1e-3 relative of the f32
//! reference, on the same fixtures as the CPU.
//!
//! Host data passed with a call (token ids, gathered rows, sequence lengths, T5's relative
//! bias table, a padding mask) is copied to a small device buffer for that call. Kernels are
//! enqueued on the device's stream; [`Backend::download`] waits for them, and reports any
//! kernel fault.

use super::{
    Activation, AttentionParams, AttentionShape, Backend, DecodeParams, HeadsRef, KvCacheConfig,
    SeqId, Tensor, WeightDType, check_attention_out, check_decode_out, check_gated, check_linear,
    check_values, check_vector, gather_ids, quantize_blocks, tensor_len,
};
use crate::{Error, Result};
use tessera_core::attention::{Bias, HeadLayout, KeyPadding};
use tessera_core::quant::{BlockQ4_0, BlockQ4_K, BlockQ8_0, QuantFormat};
use tessera_core::{Element, Transpose, bf16, f16};
use tessera_cuda::Device;
use tessera_cuda::attention::{DeviceAttentionParams, DeviceBias, DevicePadding};
use tessera_cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use tessera_cuda::gemm::{self, GemmArgs, GemmPath};
use tessera_cuda::kv_cache::{DeviceDecodeParams, DeviceKvCache, DeviceRelativeBias};
use tessera_cuda::ops::{self, DevMat, SPLIT_SCALE};
use tessera_cuda::quant::{self, QuantArgs, QuantKernel};

/// The CUDA backend on one [`Device`].
#[derive(Debug, Clone, Copy)]
pub struct Cuda<'d> {
    dev: &'d Device,
}

impl<'d> Cuda<'d> {
    /// The backend on `dev` (e.g. `Device::new(0)?`).
    pub fn new(dev: &'d Device) -> Cuda<'d> {
        Cuda { dev }
    }

    /// The device the kernels run on.
    pub fn device(&self) -> &'d Device {
        self.dev
    }

    /// `t` split into f16 `(hi, lo)` terms ([`ops::split_f16`]), densely packed.
    fn split(&self, t: &CudaTensor) -> Result<(CudaSlice<f16>, CudaSlice<f16>)> {
        let mut hi = self.dev.alloc_zeros::<f16>(t.data.len())?;
        let mut lo = self.dev.alloc_zeros::<f16>(t.data.len())?;
        let m = t.mat();
        ops::split_f16(self.dev, m, &t.data, m, &mut hi, &mut lo)?;
        Ok((hi, lo))
    }

    /// `t` rounded to `T` (f16 or bf16), densely packed.
    fn narrowed<T: Element + DeviceRepr + ValidAsZeroBits>(
        &self,
        t: &CudaTensor,
    ) -> Result<CudaSlice<T>> {
        let mut out = self.dev.alloc_zeros::<T>(t.data.len())?;
        let m = t.mat();
        ops::narrow(self.dev, m, &t.data, m, &mut out)?;
        Ok(out)
    }
}

/// A row-major f32 matrix in device memory.
#[derive(Debug)]
pub struct CudaTensor {
    data: CudaSlice<f32>,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    /// The device buffer (`rows · cols` values, row-major).
    pub fn data(&self) -> &CudaSlice<f32> {
        &self.data
    }

    fn mat(&self) -> DevMat {
        DevMat::dense(self.rows, self.cols)
    }

    /// Checks that the tensor is a `[1, len]` vector.
    fn vector(&self, name: &str, len: usize) -> Result<&CudaSlice<f32>> {
        check_vector(self, name, len)?;
        Ok(&self.data)
    }
}

impl Tensor for CudaTensor {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

/// What a [`CudaWeight`] holds.
#[derive(Debug)]
enum WeightData {
    /// An f32 weight as `hi + lo / SPLIT_SCALE` (module docs).
    Split {
        hi: CudaSlice<f16>,
        lo: CudaSlice<f16>,
    },
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
    /// Raw GGML block bytes.
    Quant(QuantFormat, CudaSlice<u8>),
}

/// A linear weight `[n, k]` in device memory, in its storage type.
#[derive(Debug)]
pub struct CudaWeight {
    n: usize,
    k: usize,
    dtype: WeightDType,
    data: WeightData,
}

/// A view of a tensor's storage from `h.offset` on.
fn view<'a>(h: &HeadsRef<'a, CudaTensor>, name: &str) -> Result<CudaView<'a, f32>> {
    h.tensor.data.try_slice(h.offset..).ok_or_else(|| {
        Error::Invalid(format!(
            "{name}: offset {} past a tensor of {} elements",
            h.offset,
            h.tensor.data.len()
        ))
    })
}

/// A view of `buf` from `offset` on (an offset a [`view`] already accepted).
fn sub<'a, T>(buf: &'a CudaSlice<T>, offset: usize, name: &str) -> Result<CudaView<'a, T>> {
    buf.try_slice(offset..)
        .ok_or_else(|| Error::Invalid(format!("{name}: offset {offset} past its tensor")))
}

impl<'d> Backend for Cuda<'d> {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = DeviceKvCache;

    fn name(&self) -> String {
        let info = self.dev.info();
        format!("cuda ({}, {})", info.name, info.arch)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        let len = tensor_len(rows, cols)?;
        Ok(CudaTensor {
            data: self.dev.alloc_zeros(len)?,
            rows,
            cols,
        })
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaTensor> {
        check_values("upload", rows, cols, data.len())?;
        Ok(CudaTensor {
            data: self.dev.upload(data)?,
            rows,
            cols,
        })
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        Ok(self.dev.download(&t.data)?)
    }

    fn weight(&self, n: usize, k: usize, data: &[f32], dtype: WeightDType) -> Result<CudaWeight> {
        check_values("weight", n, k, data.len())?;
        let dev = self.dev;
        let (dtype, data) = match dtype.for_width(k) {
            // No f32 GEMM on the GPU: two f16 terms (module docs).
            WeightDType::F32 => {
                let (hi, lo): (Vec<f16>, Vec<f16>) =
                    data.iter().map(|&x| ops::split_f16_value(x)).unzip();
                if let Some(x) = data
                    .iter()
                    .zip(&hi)
                    .find_map(|(&x, h)| (x.is_finite() && !h.is_finite()).then_some(x))
                {
                    return Err(Error::Invalid(format!(
                        "weight value {x} is beyond the f16 range that the CUDA backend's \
                         f32 weights (two f16 terms) hold; store this model as bf16"
                    )));
                }
                let (hi, lo) = (dev.upload(&hi)?, dev.upload(&lo)?);
                (WeightDType::F32, WeightData::Split { hi, lo })
            }
            WeightDType::F16 => {
                let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                (WeightDType::F16, WeightData::F16(dev.upload(&h)?))
            }
            WeightDType::BF16 => {
                let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                (WeightDType::BF16, WeightData::BF16(dev.upload(&h)?))
            }
            WeightDType::Q8_0 => {
                let b = quantize_blocks::<BlockQ8_0>(data)?;
                let bytes = dev.upload(bytemuck::cast_slice::<_, u8>(&b))?;
                (
                    WeightDType::Q8_0,
                    WeightData::Quant(QuantFormat::Q8_0, bytes),
                )
            }
            WeightDType::Q4_0 => {
                let b = quantize_blocks::<BlockQ4_0>(data)?;
                let bytes = dev.upload(bytemuck::cast_slice::<_, u8>(&b))?;
                (
                    WeightDType::Q4_0,
                    WeightData::Quant(QuantFormat::Q4_0, bytes),
                )
            }
            WeightDType::Q4_K => {
                let b = quantize_blocks::<BlockQ4_K>(data)?;
                let bytes = dev.upload(bytemuck::cast_slice::<_, u8>(&b))?;
                (
                    WeightDType::Q4_K,
                    WeightData::Quant(QuantFormat::Q4K, bytes),
                )
            }
        };
        Ok(CudaWeight { n, k, dtype, data })
    }

    fn weight_info(&self, w: &CudaWeight) -> (usize, usize, WeightDType) {
        (w.n, w.k, w.dtype)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaTensor>,
        alpha: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (m, n, k) = (x.rows, w.n, w.k);
        check_linear(x, n, k, out)?;
        let bias = bias.map(|b| b.vector("linear bias", n)).transpose()?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let args = GemmArgs {
            alpha,
            ..GemmArgs::dense(m, n, k, Transpose::Yes)
        };
        match &w.data {
            WeightData::Split { hi, lo } => {
                let (xh, xl) = self.split(x)?;
                gemm::gemm(self.dev, GemmPath::Auto, &args, &xh, hi, &mut out.data)?;
                let small = GemmArgs {
                    alpha: alpha / SPLIT_SCALE,
                    beta: 1.0,
                    ..args
                };
                gemm::gemm(self.dev, GemmPath::Auto, &small, &xh, lo, &mut out.data)?;
                gemm::gemm(self.dev, GemmPath::Auto, &small, &xl, hi, &mut out.data)?;
            }
            WeightData::F16(data) => {
                let xh = self.narrowed::<f16>(x)?;
                gemm::gemm(self.dev, GemmPath::Auto, &args, &xh, data, &mut out.data)?;
            }
            WeightData::BF16(data) => {
                let xh = self.narrowed::<bf16>(x)?;
                gemm::gemm(self.dev, GemmPath::Auto, &args, &xh, data, &mut out.data)?;
            }
            WeightData::Quant(format, data) => {
                let qa = QuantArgs::dense(*format, m, n, k);
                quant::matmul(
                    self.dev,
                    QuantKernel::Auto,
                    &qa,
                    &x.data,
                    data,
                    &mut out.data,
                )?;
                if alpha != 1.0 {
                    ops::scale(self.dev, out.mat(), &mut out.data, alpha)?;
                }
            }
        }
        if let Some(b) = bias {
            ops::add_bias(self.dev, out.mat(), &mut out.data, b)?;
        }
        Ok(())
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaTensor) -> Result<()> {
        let tm = DevMat::dense(table.n, table.k);
        let om = out.mat();
        match &table.data {
            WeightData::Split { hi, lo } => {
                // out = hi + lo / SPLIT_SCALE, row by gathered row.
                ops::embedding(self.dev, tm, hi, ids, om, &mut out.data)?;
                let mut rest = self.zeros(out.rows, out.cols)?;
                ops::embedding(self.dev, tm, lo, ids, om, &mut rest.data)?;
                ops::scale(self.dev, om, &mut rest.data, 1.0 / SPLIT_SCALE)?;
                ops::add(self.dev, om, &mut out.data, om, &rest.data)?;
            }
            WeightData::F16(t) => ops::embedding(self.dev, tm, t, ids, om, &mut out.data)?,
            WeightData::BF16(t) => ops::embedding(self.dev, tm, t, ids, om, &mut out.data)?,
            WeightData::Quant(..) => {
                return Err(Error::Invalid(
                    "embedding tables must be stored as f32, f16 or bf16".into(),
                ));
            }
        }
        Ok(())
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize], out: &mut CudaTensor) -> Result<()> {
        let ids = gather_ids(rows)?;
        ops::embedding(self.dev, x.mat(), &x.data, &ids, out.mat(), &mut out.data)?;
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let w = weight.vector("layer norm weight", x.cols)?;
        let b = bias.vector("layer norm bias", x.cols)?;
        let om = out.mat();
        ops::layer_norm(self.dev, x.mat(), &x.data, w, b, eps, om, &mut out.data)?;
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let w = weight.vector("RMS norm weight", x.cols)?;
        let om = out.mat();
        ops::rms_norm(self.dev, x.mat(), &x.data, w, eps, om, &mut out.data)?;
        Ok(())
    }

    fn activation(&self, act: Activation, x: &mut CudaTensor) -> Result<()> {
        let xm = x.mat();
        ops::activation(self.dev, act, xm, &mut x.data)?;
        Ok(())
    }

    fn gated(&self, act: Activation, x: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        let n = check_gated(x, out)?;
        if x.rows == 0 || n == 0 {
            return Ok(());
        }
        // The two column halves of x: row r of `gate` at r·2n, of `up` at r·2n + n.
        let half = DevMat::new(x.rows, n, x.cols);
        let up = sub(&x.data, n, "gated input")?;
        let om = out.mat();
        ops::gated_activation(self.dev, act, half, &x.data, half, &up, om, &mut out.data)?;
        Ok(())
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        let xm = x.mat();
        ops::add(self.dev, xm, &mut x.data, y.mat(), &y.data)?;
        Ok(())
    }

    fn add_bias(&self, x: &mut CudaTensor, bias: &CudaTensor) -> Result<()> {
        let b = bias.vector("bias", x.cols)?;
        let xm = x.mat();
        ops::add_bias(self.dev, xm, &mut x.data, b)?;
        Ok(())
    }

    fn l2_normalize(&self, x: &mut CudaTensor) -> Result<()> {
        let xm = x.mat();
        ops::l2_normalize(self.dev, xm, &mut x.data)?;
        Ok(())
    }

    fn mean_rows(
        &self,
        x: &CudaTensor,
        seq: usize,
        lengths: &[usize],
        out: &mut CudaTensor,
    ) -> Result<()> {
        let om = out.mat();
        ops::mean_rows(self.dev, x.mat(), &x.data, seq, lengths, om, &mut out.data)?;
        Ok(())
    }

    fn attention(
        &self,
        shape: &AttentionShape,
        q: HeadsRef<'_, CudaTensor>,
        k: HeadsRef<'_, CudaTensor>,
        v: HeadsRef<'_, CudaTensor>,
        out: &mut CudaTensor,
        params: &AttentionParams<'_>,
    ) -> Result<()> {
        check_attention_out(shape, out)?;
        // Offsets first: a bad one is an error before anything is converted.
        for (h, name) in [(&q, "Q"), (&k, "K"), (&v, "V")] {
            view(h, name)?;
        }
        // Each distinct source tensor rounded to f16 once.
        let qh = self.narrowed::<f16>(q.tensor)?;
        let (same_kq, same_vq) = (
            std::ptr::eq(k.tensor, q.tensor),
            std::ptr::eq(v.tensor, q.tensor),
        );
        let kh = match same_kq {
            true => None,
            false => Some(self.narrowed::<f16>(k.tensor)?),
        };
        let vh = match same_vq || std::ptr::eq(v.tensor, k.tensor) {
            true => None,
            false => Some(self.narrowed::<f16>(v.tensor)?),
        };
        let k_src = kh.as_ref().unwrap_or(&qh);
        let v_src = match (&vh, same_vq) {
            (Some(b), _) => b,
            (None, true) => &qh,
            (None, false) => k_src,
        };
        let qv = sub(&qh, q.offset, "Q")?;
        let kv = sub(k_src, k.offset, "K")?;
        let vv = sub(v_src, v.offset, "V")?;

        // Host-side padding and bias, uploaded for the call.
        let mask: Option<CudaSlice<u8>> = match params.padding {
            KeyPadding::Mask(m) => {
                let bytes: Vec<u8> = m.iter().map(|&b| u8::from(b)).collect();
                Some(self.dev.upload(&bytes)?)
            }
            _ => None,
        };
        let bias_buf: Option<CudaSlice<f32>> = match params.bias {
            Bias::Dense { data, .. } => Some(self.dev.upload(data)?),
            Bias::Relative(r) => Some(self.dev.upload(r.table)?),
            Bias::None => None,
        };
        let padding = match (params.padding, &mask) {
            (KeyPadding::None, _) => DevicePadding::None,
            (KeyPadding::Lengths(l), _) => DevicePadding::Lengths(l),
            (KeyPadding::Mask(_), Some(m)) => DevicePadding::Mask(m.slice(..)),
            (KeyPadding::Mask(_), None) => unreachable!("the mask was uploaded above"),
        };
        let bias = match (params.bias, &bias_buf) {
            (Bias::None, _) | (_, None) => DeviceBias::None,
            (
                Bias::Dense {
                    batch_stride,
                    head_stride,
                    q_stride,
                    ..
                },
                Some(b),
            ) => DeviceBias::Dense {
                data: b.slice(..),
                batch_stride,
                head_stride,
                q_stride,
            },
            (Bias::Relative(r), Some(b)) => DeviceBias::Relative {
                table: b.slice(..),
                num_buckets: r.num_buckets,
                max_distance: r.max_distance,
                bidirectional: r.bidirectional,
            },
        };
        let dp = DeviceAttentionParams {
            scale: params.scale,
            causal: params.causal,
            q_offset: params.q_offset,
            padding,
            bias,
        };
        let out_layout = HeadLayout::bshd(shape.q_len, shape.n_heads, shape.head_dim);
        tessera_cuda::attention::attention::<f16>(
            self.dev,
            shape,
            &qv,
            q.layout,
            &kv,
            k.layout,
            &vv,
            v.layout,
            &dp,
            &mut out.data,
            out_layout,
        )?;
        Ok(())
    }

    fn kv_cache(&self, config: KvCacheConfig) -> Result<DeviceKvCache> {
        Ok(DeviceKvCache::new(self.dev, config)?)
    }

    fn kv_add_sequence(&self, cache: &mut DeviceKvCache) -> Result<SeqId> {
        Ok(cache.add_sequence()?)
    }

    fn kv_append(
        &self,
        cache: &mut DeviceKvCache,
        seq: SeqId,
        k: HeadsRef<'_, CudaTensor>,
        v: HeadsRef<'_, CudaTensor>,
        n_tokens: usize,
    ) -> Result<()> {
        let (kv, vv) = (view(&k, "K")?, view(&v, "V")?);
        cache.append(self.dev, &[seq], n_tokens, &kv, k.layout, &vv, v.layout)?;
        Ok(())
    }

    fn decode_attention(
        &self,
        cache: &mut DeviceKvCache,
        seqs: &[SeqId],
        n_heads: usize,
        q: HeadsRef<'_, CudaTensor>,
        out: &mut CudaTensor,
        params: &DecodeParams<'_>,
    ) -> Result<()> {
        let d = cache.config().head_dim;
        check_decode_out(seqs.len(), n_heads, d, out)?;
        let qv = view(&q, "Q")?;
        let table = params.bias.map(|r| self.dev.upload(r.table)).transpose()?;
        let dp = DeviceDecodeParams {
            scale: params.scale,
            bias: params
                .bias
                .zip(table.as_ref())
                .map(|(r, t)| DeviceRelativeBias {
                    table: t.slice(..),
                    num_buckets: r.num_buckets,
                    max_distance: r.max_distance,
                    bidirectional: r.bidirectional,
                }),
        };
        let layout = HeadLayout::bshd(1, n_heads, d);
        cache.decode_attention(
            self.dev,
            seqs,
            n_heads,
            &qv,
            q.layout,
            &dp,
            &mut out.data,
            layout,
        )?;
        Ok(())
    }
}
