//! Thin BERT, GPT-2 and T5 forward passes over a [`Backend`].
//!
//! Each model reads its Hugging Face `config.json`, maps the safetensors names onto backend
//! weights and calls backend operations; none of them contains kernel code. [`Model::load`]
//! picks the architecture from `model_type`.

pub mod bert;
pub mod gpt2;
pub mod t5;

use crate::backend::{Backend, KvCacheConfig, KvDType, KvLayout, WeightDType};
use crate::loader::{Checkpoint, Config};
use crate::{Error, Result};

pub use bert::Bert;
pub use gpt2::Gpt2;
pub use t5::T5;

/// How a model is loaded.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Storage type of the linear layers (embedding tables: [`WeightDType::for_embedding`]).
    pub dtype: WeightDType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: WeightDType::F32,
        }
    }
}

/// How greedy generation runs.
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    /// New tokens per sequence at most (a sequence stops early at its end-of-sequence token,
    /// which is kept, as `transformers` does).
    pub max_new_tokens: usize,
    /// Storage of the key/value cache.
    pub kv_dtype: KvDType,
    /// Tokens per block of the paged cache.
    pub block_size: usize,
}

impl GenerateOptions {
    /// `max_new_tokens` greedy tokens through an f32 paged cache of 16-token blocks.
    pub fn new(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            kv_dtype: KvDType::F32,
            block_size: 16,
        }
    }

    /// A paged cache config holding `seqs` sequences of up to `max_len` tokens each.
    pub(crate) fn cache_config(
        &self,
        n_kv_heads: usize,
        head_dim: usize,
        seqs: usize,
        max_len: usize,
    ) -> Result<KvCacheConfig> {
        if self.block_size == 0 {
            return Err(Error::Invalid(
                "KV cache block size must be positive".into(),
            ));
        }
        let blocks = max_len.div_ceil(self.block_size).max(1);
        let num_blocks = blocks
            .checked_mul(seqs.max(1))
            .ok_or_else(|| Error::Invalid("KV cache size overflows".into()))?;
        Ok(KvCacheConfig {
            n_kv_heads,
            head_dim,
            dtype: self.kv_dtype,
            layout: KvLayout::Paged {
                block_size: self.block_size,
                num_blocks,
            },
        })
    }
}

/// A batch of token sequences of different lengths, right-padded for the batched passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The sequences.
    pub seqs: Vec<Vec<u32>>,
}

impl Batch {
    /// A batch of the given sequences; an error if it is empty or a sequence is.
    pub fn new(seqs: Vec<Vec<u32>>) -> Result<Batch> {
        if seqs.is_empty() {
            return Err(Error::Invalid("empty batch".into()));
        }
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(Error::Invalid(format!(
                "sequence {i} of the batch is empty"
            )));
        }
        Ok(Batch { seqs })
    }

    /// Parses `"1,2,3;4,5"`: one sequence per `;`, ids separated by `,` (spaces allowed).
    pub fn parse(s: &str) -> Result<Batch> {
        let seqs = s
            .split(';')
            .map(|seq| {
                seq.split(',')
                    .map(|t| {
                        t.trim().parse::<u32>().map_err(|e| {
                            Error::Invalid(format!("token id {:?} in {s:?}: {e}", t.trim()))
                        })
                    })
                    .collect::<Result<Vec<u32>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Batch::new(seqs)
    }

    /// Sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Always false (a batch holds at least one sequence).
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Length of the longest sequence.
    pub fn max_len(&self) -> usize {
        self.seqs.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Each sequence's length.
    pub fn lengths(&self) -> Vec<usize> {
        self.seqs.iter().map(Vec::len).collect()
    }

    /// All ids, each sequence right-padded with `pad` to [`Batch::max_len`].
    pub fn padded(&self, pad: u32) -> Vec<u32> {
        let l = self.max_len();
        let mut out = Vec::with_capacity(l * self.len());
        for s in &self.seqs {
            out.extend_from_slice(s);
            out.extend(std::iter::repeat_n(pad, l - s.len()));
        }
        out
    }

    /// Errors if an id is not below `vocab`.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        for (b, s) in self.seqs.iter().enumerate() {
            if let Some((i, id)) = s.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
                return Err(Error::Invalid(format!(
                    "token id {id} (sequence {b}, position {i}) is outside the vocabulary of {vocab}"
                )));
            }
        }
        Ok(())
    }
}

/// One named f32 output of a forward pass, as Hugging Face names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// `last_hidden_state`, `pooler_output`, `logits`, …
    pub name: &'static str,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// A loaded model of any supported architecture.
pub enum Model<B: Backend> {
    /// BERT (`model_type: "bert"`), an encoder with pooler.
    Bert(Bert<B>),
    /// GPT-2 (`model_type: "gpt2"`) with its language-model head.
    Gpt2(Gpt2<B>),
    /// T5 (`model_type: "t5"`), encoder-decoder with its language-model head.
    T5(T5<B>),
}

impl<B: Backend> Model<B> {
    /// Loads the architecture `config.json` names.
    pub fn load(ckpt: &Checkpoint, be: &B, opts: &LoadOptions) -> Result<Model<B>> {
        match ckpt.config().model_type()? {
            "bert" => Ok(Model::Bert(Bert::load(ckpt, be, opts)?)),
            "gpt2" => Ok(Model::Gpt2(Gpt2::load(ckpt, be, opts)?)),
            "t5" => Ok(Model::T5(T5::load(ckpt, be, opts)?)),
            other => Err(Error::Unsupported(format!(
                "model_type {other:?} (supported: bert, gpt2, t5)"
            ))),
        }
    }

    /// The `model_type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Model::Bert(_) => "bert",
            Model::Gpt2(_) => "gpt2",
            Model::T5(_) => "t5",
        }
    }
}

/// Loads weights from a checkpoint onto a backend, resolving Hugging Face names.
pub(crate) struct Weights<'a, B: Backend> {
    pub ckpt: &'a Checkpoint,
    pub be: &'a B,
    pub dtype: WeightDType,
    /// Prepended to every name (e.g. `"bert."` for a checkpoint saved from a task model).
    pub prefix: String,
}

impl<'a, B: Backend> Weights<'a, B> {
    /// A loader whose prefix is the first of `prefixes` under which `probe` exists.
    pub fn new(
        ckpt: &'a Checkpoint,
        be: &'a B,
        dtype: WeightDType,
        probe: &str,
        prefixes: &[&str],
    ) -> Result<Self> {
        let prefix = prefixes
            .iter()
            .find(|p| ckpt.contains(&format!("{p}{probe}")))
            .ok_or_else(|| Error::MissingTensor {
                name: probe.to_string(),
            })?;
        Ok(Weights {
            ckpt,
            be,
            dtype,
            prefix: prefix.to_string(),
        })
    }

    pub fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.name(name))
    }

    /// A tensor's f32 values after checking its shape.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.ckpt.tensor(&self.name(name))?;
        t.expect_shape(shape)?;
        t.to_f32()
    }

    /// A `[1, len]` tensor (a bias, a norm weight).
    pub fn vector(&self, name: &str, len: usize) -> Result<B::Tensor> {
        let v = self.f32(name, &[len])?;
        self.be.upload(1, len, &v)
    }

    /// The concatenation of several vectors as one `[1, Σ len]` tensor.
    pub fn vectors(&self, names: &[&str], len: usize) -> Result<B::Tensor> {
        let mut all = Vec::new();
        for n in names {
            all.extend(self.f32(n, &[len])?);
        }
        self.be.upload(1, all.len(), &all)
    }

    /// A Hugging Face `Linear` weight `[n, k]` (out × in).
    pub fn linear(&self, name: &str, n: usize, k: usize) -> Result<B::Weight> {
        let w = self.f32(name, &[n, k])?;
        self.be.weight(n, k, &w, self.dtype)
    }

    /// Several `Linear` weights of input width `k` stacked along the output dimension (e.g.
    /// Q, K and V as one `[3n, k]` projection).
    pub fn linears(&self, names: &[&str], n: usize, k: usize) -> Result<B::Weight> {
        let mut all = Vec::new();
        for name in names {
            all.extend(self.f32(name, &[n, k])?);
        }
        self.be.weight(n * names.len(), k, &all, self.dtype)
    }

    /// A GPT-2 `Conv1D` weight, stored `[k, n]` (in × out), transposed to `[n, k]`.
    pub fn conv1d(&self, name: &str, k: usize, n: usize) -> Result<B::Weight> {
        let w = self.f32(name, &[k, n])?;
        let mut t = vec![0.0f32; w.len()];
        for (i, row) in w.chunks_exact(n).enumerate() {
            for (j, &x) in row.iter().enumerate() {
                t[j * k + i] = x;
            }
        }
        self.be.weight(n, k, &t, self.dtype)
    }

    /// An embedding table `[rows, cols]`, in [`WeightDType::for_embedding`].
    pub fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<B::Weight> {
        let w = self.f32(name, &[rows, cols])?;
        self.be.weight(rows, cols, &w, self.dtype.for_embedding())
    }
}

/// Reads a dimension that must be positive.
pub(crate) fn positive(cfg: &Config, key: &str) -> Result<usize> {
    let v = cfg.usize(key)?;
    if v == 0 {
        return Err(Error::Config {
            key: key.to_string(),
            what: "must be positive".into(),
        });
    }
    Ok(v)
}

/// Reads a positive dimension with a default.
pub(crate) fn positive_or(cfg: &Config, key: &str, default: usize) -> Result<usize> {
    let v = cfg.usize_or(key, default)?;
    if v == 0 {
        return Err(Error::Config {
            key: key.to_string(),
            what: "must be positive".into(),
        });
    }
    Ok(v)
}

/// Reads an epsilon: finite and positive, narrowed to f32.
pub(crate) fn epsilon(cfg: &Config, key: &str, default: f64) -> Result<f32> {
    let v = cfg.f64_or(key, default)?;
    if !(v > 0.0 && v < 1.0) {
        return Err(Error::Config {
            key: key.to_string(),
            what: format!("{v} is not an epsilon in (0, 1)"),
        });
    }
    Ok(v as f32)
}

/// Errors unless `heads · head_dim == hidden` and the head size is one the kernels take.
pub(crate) fn check_heads(hidden: usize, heads: usize, key: &str) -> Result<usize> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(Error::Config {
            key: key.to_string(),
            what: format!("{heads} heads do not divide the hidden size {hidden}"),
        });
    }
    let d = hidden / heads;
    if d > tessera_core::attention::MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "head size {d} (at most {})",
            tessera_core::attention::MAX_HEAD_DIM
        )));
    }
    Ok(d)
}

/// Index of the largest value (the first one on ties, as `torch.argmax`); NaN never wins.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] || (row[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best
}
