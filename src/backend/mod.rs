//! The [`Backend`] trait: what a model needs from a device.
//!
//! A backend owns its buffers (activations as row-major f32 matrices, weights in their storage
//! type, key/value caches) and exposes Tessera's operation families on them: `gemm` / `quant`
//! (through [`Backend::linear`]), `attention`, `kv_cache` and `ops`. The models in
//! [`crate::models`] are generic over it and contain no kernel code; [`Cpu`] runs the
//! `tessera-cpu` kernels and, with the `cuda` feature, `Cuda` runs `tessera-cuda`'s on a GPU.
//!
//! Shapes travel with the tensors ([`Tensor::rows`], [`Tensor::cols`]); attention operands are
//! views into a tensor ([`HeadsRef`]: an element offset plus a [`HeadLayout`]), so the query,
//! key and value columns of one fused projection are used in place.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

pub use cpu::{Cpu, CpuTensor, CpuWeight};
#[cfg(feature = "cuda")]
pub use cuda::{Cuda, CudaTensor, CudaWeight};
pub use tessera_core::attention::{AttentionParams, AttentionShape, HeadLayout};
pub use tessera_cpu::kv_cache::{DecodeParams, KvCacheConfig, KvDType, KvLayout, SeqId};

use crate::Result;
use tessera_core::quant::QuantBlock;

/// `data` (whole rows of a weight matrix) quantized to blocks of `B`.
pub(crate) fn quantize_blocks<B: QuantBlock>(data: &[f32]) -> Result<Vec<B>> {
    let mut out = vec![B::zeroed(); data.len() / B::LEN];
    tessera_core::quant::quantize(data, &mut out)?;
    Ok(out)
}

/// How the weights of a linear layer (and embedding tables) are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // GGML spells the formats Q8_0, Q4_K
pub enum WeightDType {
    /// f32 (as most checkpoints are stored).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// GGML Q8_0 (32 weights per block, 8-bit).
    Q8_0,
    /// GGML Q4_0 (32 weights per block, 4-bit).
    Q4_0,
    /// GGML Q4_K (256-weight super-blocks, 4-bit with 6-bit sub-block scales).
    Q4_K,
}

impl WeightDType {
    /// Every storage type, in the order the CLI lists them.
    pub const ALL: [WeightDType; 6] = [
        WeightDType::F32,
        WeightDType::F16,
        WeightDType::BF16,
        WeightDType::Q8_0,
        WeightDType::Q4_0,
        WeightDType::Q4_K,
    ];

    /// The CLI name (`f32`, `f16`, `bf16`, `q8_0`, `q4_0`, `q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            WeightDType::F32 => "f32",
            WeightDType::F16 => "f16",
            WeightDType::BF16 => "bf16",
            WeightDType::Q8_0 => "q8_0",
            WeightDType::Q4_0 => "q4_0",
            WeightDType::Q4_K => "q4_k",
        }
    }

    /// Parses a CLI name (case-insensitive).
    pub fn parse(s: &str) -> Result<WeightDType> {
        let lower = s.to_ascii_lowercase();
        WeightDType::ALL
            .into_iter()
            .find(|d| d.name() == lower)
            .ok_or_else(|| {
                let known: Vec<_> = WeightDType::ALL.iter().map(|d| d.name()).collect();
                crate::Error::Invalid(format!(
                    "unknown weight dtype {s:?} (known: {})",
                    known.join(", ")
                ))
            })
    }

    /// Whether this is a block-quantized format.
    pub fn is_quantized(self) -> bool {
        matches!(
            self,
            WeightDType::Q8_0 | WeightDType::Q4_0 | WeightDType::Q4_K
        )
    }

    /// Values per quantization block (1 for the float types).
    pub fn block_len(self) -> usize {
        match self {
            WeightDType::F32 | WeightDType::F16 | WeightDType::BF16 => 1,
            WeightDType::Q8_0 | WeightDType::Q4_0 => 32,
            WeightDType::Q4_K => 256,
        }
    }

    /// The type a weight whose input width `k` this format cannot hold (not a multiple of
    /// its block length) is stored in instead: Q4_K falls back to Q4_0 when `k` is a multiple
    /// of 32, any quantized format to f16 otherwise (llama.cpp makes the same kind of choice
    /// for tensors whose rows do not fit its super-blocks).
    pub fn for_width(self, k: usize) -> WeightDType {
        if k.is_multiple_of(self.block_len()) {
            self
        } else if self == WeightDType::Q4_K && k.is_multiple_of(32) {
            WeightDType::Q4_0
        } else {
            WeightDType::F16
        }
    }

    /// The type embedding tables are kept in under this weight type: the float types as they
    /// are, f16 for the quantized ones (a gather reads one row per token, so block formats
    /// would only add error).
    pub fn for_embedding(self) -> WeightDType {
        if self.is_quantized() {
            WeightDType::F16
        } else {
            self
        }
    }
}

/// Elementwise activation functions (`Relu`, `GeluErf`, `GeluTanh`, `Tanh`), with the
/// definitions of Hugging Face `transformers`.
pub use tessera_core::reference::ops::Activation;

/// The activation a Hugging Face config names (`hidden_act`, `activation_function`,
/// `dense_act_fn`); `key` names the config key in the error.
pub fn activation_from_hf(name: &str, key: &str) -> Result<Activation> {
    Activation::from_hf_name(name).ok_or_else(|| crate::Error::Config {
        key: key.to_string(),
        what: format!(
            "unsupported activation {name:?} (supported: relu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, tanh)"
        ),
    })
}

/// Activations on a device: a row-major f32 matrix.
pub trait Tensor {
    /// Rows (tokens).
    fn rows(&self) -> usize;
    /// Columns (features).
    fn cols(&self) -> usize;
}

// ---------------------------------------------------------------------------------------
// The argument checks every backend makes before it touches a buffer.

/// `rows · cols` elements, or an error when that overflows.
pub(crate) fn tensor_len(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols)
        .ok_or_else(|| crate::Error::Invalid(format!("a {rows}x{cols} tensor overflows usize")))
}

/// `what` (`upload`, `weight`) got `len` values for a `rows x cols` matrix.
pub(crate) fn check_values(what: &str, rows: usize, cols: usize, len: usize) -> Result<()> {
    if rows.checked_mul(cols) != Some(len) {
        return Err(crate::Error::Invalid(format!(
            "{what}: {len} values for a {rows}x{cols} matrix"
        )));
    }
    Ok(())
}

/// `t` is a `[1, len]` vector (a bias, a norm weight).
pub(crate) fn check_vector<T: Tensor>(t: &T, name: &str, len: usize) -> Result<()> {
    if t.rows() != 1 || t.cols() != len {
        return Err(crate::Error::Invalid(format!(
            "{name}: expected a [1, {len}] tensor, got [{}, {}]",
            t.rows(),
            t.cols()
        )));
    }
    Ok(())
}

/// `out = x · Wᵀ` for a weight `[n, k]`.
pub(crate) fn check_linear<T: Tensor>(x: &T, n: usize, k: usize, out: &T) -> Result<()> {
    if x.cols() != k || out.rows() != x.rows() || out.cols() != n {
        return Err(crate::Error::Invalid(format!(
            "linear: x [{}, {}] · Wᵀ [{k}, {n}] into [{}, {}]",
            x.rows(),
            x.cols(),
            out.rows(),
            out.cols()
        )));
    }
    Ok(())
}

/// `x` is `[m, 2n]` for a gated output `[m, n]`; returns `n`.
pub(crate) fn check_gated<T: Tensor>(x: &T, out: &T) -> Result<usize> {
    let n = out.cols();
    if Some(x.cols()) != n.checked_mul(2) || x.rows() != out.rows() {
        return Err(crate::Error::Invalid(format!(
            "gated: input [{}, {}] for an output [{}, {n}] (needs [{}, {}])",
            x.rows(),
            x.cols(),
            out.rows(),
            out.rows(),
            2 * n
        )));
    }
    Ok(n)
}

/// Row indices as the `u32` ids of a gather.
pub(crate) fn gather_ids(rows: &[usize]) -> Result<Vec<u32>> {
    rows.iter()
        .map(|&r| u32::try_from(r))
        .collect::<std::result::Result<Vec<u32>, _>>()
        .map_err(|_| crate::Error::Invalid("gather_rows: row index above u32::MAX".into()))
}

/// The attention output is `[batch·q_len, n_heads·head_dim]`.
pub(crate) fn check_attention_out<T: Tensor>(shape: &AttentionShape, out: &T) -> Result<()> {
    let cols = shape
        .n_heads
        .checked_mul(shape.head_dim)
        .ok_or_else(|| crate::Error::Invalid("attention: heads × head_dim overflows".into()))?;
    if out.cols() != cols || Some(out.rows()) != shape.batch.checked_mul(shape.q_len) {
        return Err(crate::Error::Invalid(format!(
            "attention: output [{}, {}] for {shape:?}",
            out.rows(),
            out.cols()
        )));
    }
    Ok(())
}

/// The decode-attention output is `[seqs, n_heads·head_dim]`.
pub(crate) fn check_decode_out<T: Tensor>(
    seqs: usize,
    n_heads: usize,
    head_dim: usize,
    out: &T,
) -> Result<()> {
    if out.rows() != seqs || Some(out.cols()) != n_heads.checked_mul(head_dim) {
        return Err(crate::Error::Invalid(format!(
            "decode attention: output [{}, {}] for {seqs} sequences × {n_heads} heads × {head_dim}",
            out.rows(),
            out.cols()
        )));
    }
    Ok(())
}

/// A view of attention heads inside a tensor: element `(b, s, h, :)` starts at
/// `offset + layout.offset(b, s, h)` in the tensor's row-major storage.
pub struct HeadsRef<'a, T> {
    /// The tensor holding the heads.
    pub tensor: &'a T,
    /// Element offset of `(0, 0, 0, 0)`.
    pub offset: usize,
    /// Strides of batch, sequence and head.
    pub layout: HeadLayout,
}

impl<'a, T: Tensor> HeadsRef<'a, T> {
    /// Heads `[batch, seq, heads, head_dim]` stored in columns `col0..` of a
    /// `[batch·seq, cols]` tensor (e.g. the key columns of a fused QKV projection), starting
    /// at row `row0`.
    pub fn columns(tensor: &'a T, seq: usize, head_dim: usize, row0: usize, col0: usize) -> Self {
        let ld = tensor.cols();
        HeadsRef {
            tensor,
            offset: row0 * ld + col0,
            layout: HeadLayout {
                batch_stride: seq * ld,
                seq_stride: ld,
                head_stride: head_dim,
            },
        }
    }
}

/// What a model needs from a device. See the [module docs](self).
pub trait Backend {
    /// Activations.
    type Tensor: Tensor;
    /// A linear layer's weight `[n, k]` (out × in) in its storage type.
    type Weight;
    /// One layer's key/value cache for a batch of sequences.
    type KvCache;

    /// A short name for reports (`cpu`, `cuda`).
    fn name(&self) -> String;

    /// A `rows x cols` tensor of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A tensor holding `data` (`rows · cols` values, row-major).
    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Tensor>;
    /// The tensor's values, row-major.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    /// A linear weight from `[n, k]` row-major f32 values, stored as `dtype` (or as
    /// [`WeightDType::for_width`] says when `k` does not fit the block format).
    fn weight(&self, n: usize, k: usize, data: &[f32], dtype: WeightDType) -> Result<Self::Weight>;
    /// `(n, k)` and storage type of a weight.
    fn weight_info(&self, w: &Self::Weight) -> (usize, usize, WeightDType);

    /// `out = alpha · x · wᵀ (+ bias)`: `x` is `[m, k]`, `out` `[m, n]` (overwritten),
    /// `bias` a `[1, n]` tensor.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Tensor>,
        alpha: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `out[i] = table[ids[i]]`; the table is a weight `[vocab, d]` of a float type.
    fn embedding(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Tensor) -> Result<()>;
    /// `out[i] = x[rows[i]]` (e.g. the last token of every sequence).
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize], out: &mut Self::Tensor) -> Result<()>;
    /// Layer norm of each row with `[1, cols]` weight and bias tensors.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// RMS norm of each row (T5's layer norm) with a `[1, cols]` weight.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Applies `act` in place.
    fn activation(&self, act: Activation, x: &mut Self::Tensor) -> Result<()>;
    /// `out = act(x[:, ..n]) ⊙ x[:, n..]` for `x` `[m, 2n]` (a gated feed-forward whose two
    /// input projections were computed as one).
    fn gated(&self, act: Activation, x: &Self::Tensor, out: &mut Self::Tensor) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x[r] += bias` for every row, `bias` a `[1, cols]` tensor.
    fn add_bias(&self, x: &mut Self::Tensor, bias: &Self::Tensor) -> Result<()>;
    /// Each row divided by its L2 norm.
    fn l2_normalize(&self, x: &mut Self::Tensor) -> Result<()>;
    /// `out[b] = mean of x[b·seq .. b·seq + lengths[b]]` over rows (`x` is
    /// `[batch·seq, d]`, `out` `[batch, d]`).
    fn mean_rows(
        &self,
        x: &Self::Tensor,
        seq: usize,
        lengths: &[usize],
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// Fused attention; `out` is `[batch·q_len, n_heads·head_dim]`.
    fn attention(
        &self,
        shape: &AttentionShape,
        q: HeadsRef<'_, Self::Tensor>,
        k: HeadsRef<'_, Self::Tensor>,
        v: HeadsRef<'_, Self::Tensor>,
        out: &mut Self::Tensor,
        params: &AttentionParams<'_>,
    ) -> Result<()>;

    /// A new, empty key/value cache.
    fn kv_cache(&self, config: KvCacheConfig) -> Result<Self::KvCache>;
    /// A new sequence in `cache`.
    fn kv_add_sequence(&self, cache: &mut Self::KvCache) -> Result<SeqId>;
    /// Appends `n_tokens` rows of keys and values (`[1, n_tokens, n_kv_heads, head_dim]`
    /// views) to `seq`.
    fn kv_append(
        &self,
        cache: &mut Self::KvCache,
        seq: SeqId,
        k: HeadsRef<'_, Self::Tensor>,
        v: HeadsRef<'_, Self::Tensor>,
        n_tokens: usize,
    ) -> Result<()>;
    /// One query token per sequence over everything `seqs` have cached; `out` is
    /// `[seqs.len(), n_heads·head_dim]`. The cache is borrowed mutably because a device cache
    /// brings its device-side block tables up to date first; the cached tokens do not change.
    fn decode_attention(
        &self,
        cache: &mut Self::KvCache,
        seqs: &[SeqId],
        n_heads: usize,
        q: HeadsRef<'_, Self::Tensor>,
        out: &mut Self::Tensor,
        params: &DecodeParams<'_>,
    ) -> Result<()>;
}
