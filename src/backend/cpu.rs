//! The CPU backend: `tessera-cpu`'s kernels on host memory.

use super::{
    Activation, AttentionParams, AttentionShape, Backend, DecodeParams, HeadsRef, KvCacheConfig,
    SeqId, Tensor, WeightDType, check_attention_out, check_decode_out, check_gated, check_linear,
    check_values, check_vector, gather_ids, quantize_blocks, tensor_len,
};
use crate::{Error, Result};
use half::{bf16, f16};
use tessera_core::attention::{HeadLayout, Heads, HeadsMut};
use tessera_core::quant::{BlockQ4_0, BlockQ4_K, BlockQ8_0, WeightBlock};
use tessera_core::{Element, MatMut, MatRef, Transpose};
use tessera_cpu::attention::{AttentionOptions, attention_with};
use tessera_cpu::gemm::{GemmOptions, gemm_with};
use tessera_cpu::kv_cache::{DecodeOptions, KvCache, decode_attention_with};
use tessera_cpu::ops::{self, OpsOptions};
use tessera_cpu::quant::{PackedWeights, QuantOptions, matmul_packed_with};
use tessera_cpu::{Isa, Parallelism};

/// The CPU backend: an instruction set and a thread count. By default every kernel family
/// runs on its own preferred instruction set ([`tessera_cpu::gemm::preferred_isa`],
/// [`tessera_cpu::quant::preferred_isa`], [`Isa::detect`] for the others); [`Cpu::with_isa`]
/// pins one for all of them.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    /// `None`: each family's own choice.
    isa: Option<Isa>,
    par: Parallelism,
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu {
            isa: None,
            par: Parallelism::Auto,
        }
    }
}

impl Cpu {
    /// Each family's preferred instruction set, `threads` threads (0: every thread of the
    /// rayon pool).
    pub fn new(threads: usize) -> Cpu {
        Cpu {
            isa: None,
            par: match threads {
                0 => Parallelism::Auto,
                1 => Parallelism::Sequential,
                n => Parallelism::Threads(n),
            },
        }
    }

    /// The same backend with every kernel on instruction set `isa` (an error if this CPU
    /// lacks it).
    pub fn with_isa(self, isa: Isa) -> Result<Cpu> {
        isa.check()?;
        Ok(Cpu {
            isa: Some(isa),
            ..self
        })
    }

    /// The instruction set pinned by [`Cpu::with_isa`], or `None` when each kernel family
    /// runs on its own preferred one.
    pub fn isa(&self) -> Option<Isa> {
        self.isa
    }

    fn ops(&self) -> OpsOptions {
        OpsOptions {
            isa: self.isa,
            parallelism: self.par,
        }
    }
}

/// A row-major f32 matrix in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl CpuTensor {
    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    fn mat(&self) -> MatRef<'_, f32> {
        MatRef::dense(&self.data, self.rows, self.cols)
    }

    fn mat_mut(&mut self) -> MatMut<'_, f32> {
        MatMut::dense(&mut self.data, self.rows, self.cols)
    }

    fn vector(&self, name: &str, len: usize) -> Result<&[f32]> {
        check_vector(self, name, len)?;
        Ok(&self.data)
    }
}

impl Tensor for CpuTensor {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

/// A linear weight `[n, k]` in host memory, in its storage type.
#[derive(Debug, Clone)]
#[allow(non_camel_case_types)] // GGML spells the formats Q8_0, Q4_K
pub enum CpuWeight {
    /// f32 values.
    F32 { n: usize, k: usize, data: Vec<f32> },
    /// f16 values.
    F16 { n: usize, k: usize, data: Vec<f16> },
    /// bf16 values.
    BF16 { n: usize, k: usize, data: Vec<bf16> },
    /// Q8_0 blocks, `k / 32` per row, packed for the backend's ISA.
    Q8_0 {
        n: usize,
        k: usize,
        data: PackedWeights<BlockQ8_0>,
    },
    /// Q4_0 blocks, `k / 32` per row, packed for the backend's ISA.
    Q4_0 {
        n: usize,
        k: usize,
        data: PackedWeights<BlockQ4_0>,
    },
    /// Q4_K super-blocks, `k / 256` per row, packed for the backend's ISA.
    Q4_K {
        n: usize,
        k: usize,
        data: PackedWeights<BlockQ4_K>,
    },
}

/// `C = A·Wᵀ` for any storage type of `W`, then `C = alpha·C` where a kernel cannot fold it.
fn matmul_float<B: Element>(
    cpu: &Cpu,
    alpha: f32,
    x: MatRef<'_, f32>,
    w: &[B],
    n: usize,
    k: usize,
    out: MatMut<'_, f32>,
) -> Result<()> {
    let opts = GemmOptions {
        isa: cpu.isa,
        parallelism: cpu.par,
        blocking: None,
    };
    gemm_with(
        &opts,
        alpha,
        x,
        MatRef::dense(w, n, k),
        Transpose::Yes,
        0.0,
        out,
    )?;
    Ok(())
}

fn matmul_quant<W: WeightBlock>(
    cpu: &Cpu,
    x: MatRef<'_, f32>,
    w: &PackedWeights<W>,
    out: MatMut<'_, f32>,
) -> Result<()> {
    matmul_packed_with(&cpu.quant_options(), x, w, out)?;
    Ok(())
}

impl Cpu {
    fn quant_options(&self) -> QuantOptions {
        QuantOptions {
            isa: self.isa,
            parallelism: self.par,
        }
    }

    /// Quantized weights packed once for this backend's quant kernels (see
    /// [`PackedWeights`]: the decode GEMV then runs the packed-panel kernel).
    fn pack<W: WeightBlock>(&self, n: usize, k: usize, w: &[W]) -> Result<PackedWeights<W>> {
        Ok(PackedWeights::with_options(&self.quant_options(), w, n, k)?)
    }
}

fn heads<'a>(h: &HeadsRef<'a, CpuTensor>, name: &str) -> Result<Heads<'a, f32>> {
    let data = h.tensor.data.get(h.offset..).ok_or_else(|| {
        Error::Invalid(format!(
            "{name}: offset {} past a tensor of {} elements",
            h.offset,
            h.tensor.data.len()
        ))
    })?;
    Ok(Heads::new(data, h.layout))
}

impl Backend for Cpu {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = KvCache;

    fn name(&self) -> String {
        let isa = match self.isa {
            Some(isa) => isa.name().to_string(),
            None => format!(
                "gemm {}, quant {}, others {}",
                tessera_cpu::gemm::preferred_isa(),
                tessera_cpu::quant::preferred_isa(),
                Isa::detect()
            ),
        };
        format!("cpu ({isa}, {} threads)", self.par.threads())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        let len = tensor_len(rows, cols)?;
        Ok(CpuTensor {
            data: vec![0.0; len],
            rows,
            cols,
        })
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuTensor> {
        check_values("upload", rows, cols, data.len())?;
        let mut t = self.zeros(rows, cols)?;
        t.data.copy_from_slice(data);
        Ok(t)
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn weight(&self, n: usize, k: usize, data: &[f32], dtype: WeightDType) -> Result<CpuWeight> {
        check_values("weight", n, k, data.len())?;
        Ok(match dtype.for_width(k) {
            WeightDType::F32 => CpuWeight::F32 {
                n,
                k,
                data: data.to_vec(),
            },
            WeightDType::F16 => CpuWeight::F16 {
                n,
                k,
                data: data.iter().map(|&x| f16::from_f32(x)).collect(),
            },
            WeightDType::BF16 => CpuWeight::BF16 {
                n,
                k,
                data: data.iter().map(|&x| bf16::from_f32(x)).collect(),
            },
            WeightDType::Q8_0 => CpuWeight::Q8_0 {
                n,
                k,
                data: self.pack(n, k, &quantize_blocks(data)?)?,
            },
            WeightDType::Q4_0 => CpuWeight::Q4_0 {
                n,
                k,
                data: self.pack(n, k, &quantize_blocks(data)?)?,
            },
            WeightDType::Q4_K => CpuWeight::Q4_K {
                n,
                k,
                data: self.pack(n, k, &quantize_blocks(data)?)?,
            },
        })
    }

    fn weight_info(&self, w: &CpuWeight) -> (usize, usize, WeightDType) {
        match w {
            CpuWeight::F32 { n, k, .. } => (*n, *k, WeightDType::F32),
            CpuWeight::F16 { n, k, .. } => (*n, *k, WeightDType::F16),
            CpuWeight::BF16 { n, k, .. } => (*n, *k, WeightDType::BF16),
            CpuWeight::Q8_0 { n, k, .. } => (*n, *k, WeightDType::Q8_0),
            CpuWeight::Q4_0 { n, k, .. } => (*n, *k, WeightDType::Q4_0),
            CpuWeight::Q4_K { n, k, .. } => (*n, *k, WeightDType::Q4_K),
        }
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuWeight,
        bias: Option<&CpuTensor>,
        alpha: f32,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let (n, k, dtype) = self.weight_info(w);
        check_linear(x, n, k, out)?;
        let xm = x.mat();
        let om = out.mat_mut();
        match w {
            CpuWeight::F32 { data, .. } => matmul_float(self, alpha, xm, data, n, k, om)?,
            CpuWeight::F16 { data, .. } => matmul_float(self, alpha, xm, data, n, k, om)?,
            CpuWeight::BF16 { data, .. } => matmul_float(self, alpha, xm, data, n, k, om)?,
            CpuWeight::Q8_0 { data, .. } => matmul_quant(self, xm, data, om)?,
            CpuWeight::Q4_0 { data, .. } => matmul_quant(self, xm, data, om)?,
            CpuWeight::Q4_K { data, .. } => matmul_quant(self, xm, data, om)?,
        }
        if dtype.is_quantized() && alpha != 1.0 {
            ops::scale_with(&self.ops(), out.mat_mut(), alpha)?;
        }
        if let Some(b) = bias {
            let b = b.vector("linear bias", n)?;
            ops::add_bias_with(&self.ops(), out.mat_mut(), b)?;
        }
        Ok(())
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32], out: &mut CpuTensor) -> Result<()> {
        let o = self.ops();
        let om = out.mat_mut();
        match table {
            CpuWeight::F32 { n, k, data } => {
                ops::embedding_with(&o, MatRef::dense(data, *n, *k), ids, om)?
            }
            CpuWeight::F16 { n, k, data } => {
                ops::embedding_with(&o, MatRef::dense(data, *n, *k), ids, om)?
            }
            CpuWeight::BF16 { n, k, data } => {
                ops::embedding_with(&o, MatRef::dense(data, *n, *k), ids, om)?
            }
            _ => {
                return Err(Error::Invalid(
                    "embedding tables must be stored as f32, f16 or bf16".into(),
                ));
            }
        }
        Ok(())
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize], out: &mut CpuTensor) -> Result<()> {
        let ids = gather_ids(rows)?;
        ops::embedding_with(&self.ops(), x.mat(), &ids, out.mat_mut())?;
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: &CpuTensor,
        eps: f32,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let w = weight.vector("layer norm weight", x.cols)?;
        let b = bias.vector("layer norm bias", x.cols)?;
        ops::layer_norm_with(&self.ops(), x.mat(), w, b, eps, out.mat_mut())?;
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        eps: f32,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let w = weight.vector("RMS norm weight", x.cols)?;
        ops::rms_norm_with(&self.ops(), x.mat(), w, eps, out.mat_mut())?;
        Ok(())
    }

    fn activation(&self, act: Activation, x: &mut CpuTensor) -> Result<()> {
        ops::activation_with(&self.ops(), act, x.mat_mut())?;
        Ok(())
    }

    fn gated(&self, act: Activation, x: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        let n = check_gated(x, out)?;
        let gate = MatRef::new(&x.data, x.rows, n, x.cols);
        let up = MatRef::new(x.data.get(n..).unwrap_or(&[]), x.rows, n, x.cols);
        ops::gated_activation_with(&self.ops(), act, gate, up, out.mat_mut())?;
        Ok(())
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        ops::add_with(&self.ops(), x.mat_mut(), y.mat())?;
        Ok(())
    }

    fn add_bias(&self, x: &mut CpuTensor, bias: &CpuTensor) -> Result<()> {
        let b = bias.vector("bias", x.cols)?;
        ops::add_bias_with(&self.ops(), x.mat_mut(), b)?;
        Ok(())
    }

    fn l2_normalize(&self, x: &mut CpuTensor) -> Result<()> {
        ops::l2_normalize_with(&self.ops(), x.mat_mut())?;
        Ok(())
    }

    fn mean_rows(
        &self,
        x: &CpuTensor,
        seq: usize,
        lengths: &[usize],
        out: &mut CpuTensor,
    ) -> Result<()> {
        let d = x.cols;
        if out.rows != lengths.len()
            || out.cols != d
            || Some(x.rows) != seq.checked_mul(lengths.len())
            || lengths.iter().any(|&l| l == 0 || l > seq)
        {
            return Err(Error::Invalid(format!(
                "mean_rows: x [{}, {d}], {} sequences of {seq} rows, lengths {lengths:?}, out [{}, {}]",
                x.rows,
                lengths.len(),
                out.rows,
                out.cols
            )));
        }
        // The mean is a [1, len] · [len, d] product with weights 1/len: one GEMV per sequence.
        let opts = GemmOptions {
            isa: self.isa,
            parallelism: self.par,
            blocking: None,
        };
        for (b, &len) in lengths.iter().enumerate() {
            let w = vec![1.0 / len as f32; len];
            let rows = &x.data[b * seq * d..(b * seq + len) * d];
            let o = &mut out.data[b * d..(b + 1) * d];
            gemm_with(
                &opts,
                1.0,
                MatRef::dense(&w, 1, len),
                MatRef::dense(rows, len, d),
                Transpose::No,
                0.0,
                MatMut::dense(o, 1, d),
            )?;
        }
        Ok(())
    }

    fn attention(
        &self,
        shape: &AttentionShape,
        q: HeadsRef<'_, CpuTensor>,
        k: HeadsRef<'_, CpuTensor>,
        v: HeadsRef<'_, CpuTensor>,
        out: &mut CpuTensor,
        params: &AttentionParams<'_>,
    ) -> Result<()> {
        check_attention_out(shape, out)?;
        let opts = AttentionOptions {
            isa: self.isa,
            parallelism: self.par,
        };
        let layout = HeadLayout::bshd(shape.q_len, shape.n_heads, shape.head_dim);
        attention_with(
            &opts,
            shape,
            heads(&q, "Q")?,
            heads(&k, "K")?,
            heads(&v, "V")?,
            HeadsMut::new(&mut out.data, layout),
            params,
        )?;
        Ok(())
    }

    fn kv_cache(&self, config: KvCacheConfig) -> Result<KvCache> {
        Ok(KvCache::new(config)?)
    }

    fn kv_add_sequence(&self, cache: &mut KvCache) -> Result<SeqId> {
        Ok(cache.add_sequence()?)
    }

    fn kv_append(
        &self,
        cache: &mut KvCache,
        seq: SeqId,
        k: HeadsRef<'_, CpuTensor>,
        v: HeadsRef<'_, CpuTensor>,
        n_tokens: usize,
    ) -> Result<()> {
        cache.append(seq, heads(&k, "K")?, heads(&v, "V")?, n_tokens)?;
        Ok(())
    }

    fn decode_attention(
        &self,
        cache: &mut KvCache,
        seqs: &[SeqId],
        n_heads: usize,
        q: HeadsRef<'_, CpuTensor>,
        out: &mut CpuTensor,
        params: &DecodeParams<'_>,
    ) -> Result<()> {
        let d = cache.config().head_dim;
        check_decode_out(seqs.len(), n_heads, d, out)?;
        let opts = DecodeOptions {
            isa: self.isa,
            parallelism: self.par,
        };
        let layout = HeadLayout::bshd(1, n_heads, d);
        decode_attention_with(
            &opts,
            cache,
            seqs,
            n_heads,
            heads(&q, "Q")?,
            HeadsMut::new(&mut out.data, layout),
            params,
        )?;
        Ok(())
    }
}
