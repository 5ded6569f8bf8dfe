//! BERT (`BertModel` with its pooler): embeddings, post-norm encoder layers, tanh pooler.

use super::{Batch, LoadOptions, Output, Weights, check_heads, epsilon, positive, positive_or};
use crate::backend::{
    Activation, AttentionParams, AttentionShape, Backend, HeadsRef, Tensor, WeightDType,
};
use crate::loader::Checkpoint;
use crate::{Error, Result};
use tessera_core::attention::KeyPadding;

/// BERT hyper-parameters from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// `vocab_size`.
    pub vocab: usize,
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// `type_vocab_size`.
    pub type_vocab: usize,
    /// `layer_norm_eps`.
    pub eps: f32,
    /// `hidden_act`.
    pub act: Activation,
    /// `pad_token_id` (the id padded positions get).
    pub pad: u32,
}

impl BertConfig {
    /// Reads and checks the config.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<BertConfig> {
        let c = ckpt.config();
        let pe = c.str_or("position_embedding_type", "absolute")?;
        if pe != "absolute" {
            return Err(Error::Unsupported(format!(
                "BERT position_embedding_type {pe:?} (only \"absolute\")"
            )));
        }
        let cfg = BertConfig {
            vocab: positive(c, "vocab_size")?,
            hidden: positive(c, "hidden_size")?,
            layers: c.usize("num_hidden_layers")?,
            heads: positive(c, "num_attention_heads")?,
            intermediate: positive(c, "intermediate_size")?,
            max_positions: positive(c, "max_position_embeddings")?,
            type_vocab: positive_or(c, "type_vocab_size", 2)?,
            eps: epsilon(c, "layer_norm_eps", 1e-12)?,
            act: crate::backend::activation_from_hf(c.str_or("hidden_act", "gelu")?, "hidden_act")?,
            pad: u32::try_from(c.usize_or("pad_token_id", 0)?).map_err(|_| Error::Config {
                key: "pad_token_id".into(),
                what: "above u32::MAX".into(),
            })?,
        };
        check_heads(cfg.hidden, cfg.heads, "num_attention_heads")?;
        Ok(cfg)
    }
}

struct Layer<B: Backend> {
    qkv: B::Weight,
    qkv_b: B::Tensor,
    out: B::Weight,
    out_b: B::Tensor,
    ln1_w: B::Tensor,
    ln1_b: B::Tensor,
    up: B::Weight,
    up_b: B::Tensor,
    down: B::Weight,
    down_b: B::Tensor,
    ln2_w: B::Tensor,
    ln2_b: B::Tensor,
}

/// A loaded BERT encoder.
pub struct Bert<B: Backend> {
    /// Its configuration.
    pub config: BertConfig,
    word: B::Weight,
    position: B::Weight,
    token_type0: B::Tensor,
    emb_ln_w: B::Tensor,
    emb_ln_b: B::Tensor,
    layers: Vec<Layer<B>>,
    pooler: Option<(B::Weight, B::Tensor)>,
}

/// What [`Bert::forward`] returns.
pub struct BertOutput<B: Backend> {
    /// `[batch · seq, hidden]`: the last layer's output at every (padded) position.
    pub last_hidden_state: B::Tensor,
    /// `[batch, hidden]`: `tanh(W · h[CLS] + b)`, when the checkpoint has a pooler.
    pub pooler_output: Option<B::Tensor>,
}

impl<B: Backend> Bert<B> {
    /// Loads a `BertModel` (names with or without the `bert.` prefix of task models).
    pub fn load(ckpt: &Checkpoint, be: &B, opts: &LoadOptions) -> Result<Bert<B>> {
        let cfg = BertConfig::from_checkpoint(ckpt)?;
        let w = Weights::new(
            ckpt,
            be,
            opts.dtype,
            "embeddings.word_embeddings.weight",
            &["", "bert.", "model."],
        )?;
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let type_vocab = w.f32(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab, h],
        )?;
        let mut layers = Vec::new();
        for l in 0..cfg.layers {
            let p = |s: &str| format!("encoder.layer.{l}.{s}");
            let q = p("attention.self.query.weight");
            let k = p("attention.self.key.weight");
            let v = p("attention.self.value.weight");
            layers.push(Layer {
                qkv: w.linears(&[&q, &k, &v], h, h)?,
                qkv_b: w.vectors(
                    &[
                        &p("attention.self.query.bias"),
                        &p("attention.self.key.bias"),
                        &p("attention.self.value.bias"),
                    ],
                    h,
                )?,
                out: w.linear(&p("attention.output.dense.weight"), h, h)?,
                out_b: w.vector(&p("attention.output.dense.bias"), h)?,
                ln1_w: w.vector(&p("attention.output.LayerNorm.weight"), h)?,
                ln1_b: w.vector(&p("attention.output.LayerNorm.bias"), h)?,
                up: w.linear(&p("intermediate.dense.weight"), i, h)?,
                up_b: w.vector(&p("intermediate.dense.bias"), i)?,
                down: w.linear(&p("output.dense.weight"), h, i)?,
                down_b: w.vector(&p("output.dense.bias"), h)?,
                ln2_w: w.vector(&p("output.LayerNorm.weight"), h)?,
                ln2_b: w.vector(&p("output.LayerNorm.bias"), h)?,
            });
        }
        let pooler = if w.contains("pooler.dense.weight") {
            Some((
                w.linear("pooler.dense.weight", h, h)?,
                w.vector("pooler.dense.bias", h)?,
            ))
        } else {
            None
        };
        Ok(Bert {
            word: w.embedding("embeddings.word_embeddings.weight", cfg.vocab, h)?,
            position: w.embedding(
                "embeddings.position_embeddings.weight",
                cfg.max_positions,
                h,
            )?,
            token_type0: be.upload(1, h, &type_vocab[..h])?,
            emb_ln_w: w.vector("embeddings.LayerNorm.weight", h)?,
            emb_ln_b: w.vector("embeddings.LayerNorm.bias", h)?,
            layers,
            pooler,
            config: cfg,
        })
    }

    /// Storage type of the first layer's weights (after any fallback).
    pub fn weight_dtype(&self, be: &B) -> Option<WeightDType> {
        self.layers.first().map(|l| be.weight_info(&l.up).2)
    }

    /// The encoder over a right-padded batch (token type 0 everywhere, padded keys masked).
    pub fn forward(&self, be: &B, batch: &Batch) -> Result<BertOutput<B>> {
        let cfg = &self.config;
        batch.check_vocab(cfg.vocab)?;
        let (nb, l, h) = (batch.len(), batch.max_len(), cfg.hidden);
        if l > cfg.max_positions {
            return Err(Error::Invalid(format!(
                "sequence of {l} tokens is longer than max_position_embeddings {}",
                cfg.max_positions
            )));
        }
        let rows = nb * l;
        let lengths = batch.lengths();
        let mut x = be.zeros(rows, h)?;
        be.embedding(&self.word, &batch.padded(cfg.pad), &mut x)?;
        let positions: Vec<u32> = (0..nb).flat_map(|_| 0..l as u32).collect();
        let mut t = be.zeros(rows, h)?;
        be.embedding(&self.position, &positions, &mut t)?;
        be.add(&mut x, &t)?;
        be.add_bias(&mut x, &self.token_type0)?;
        be.layer_norm(&x, &self.emb_ln_w, &self.emb_ln_b, cfg.eps, &mut t)?;
        std::mem::swap(&mut x, &mut t);

        let d = h / cfg.heads;
        let shape = AttentionShape {
            batch: nb,
            q_len: l,
            kv_len: l,
            n_heads: cfg.heads,
            n_kv_heads: cfg.heads,
            head_dim: d,
        };
        let params = AttentionParams::new(d).with_padding(KeyPadding::Lengths(&lengths));
        let mut qkv = be.zeros(rows, 3 * h)?;
        let mut ctx = be.zeros(rows, h)?;
        let mut y = be.zeros(rows, h)?;
        let mut inner = be.zeros(rows, cfg.intermediate)?;
        for layer in &self.layers {
            be.linear(&x, &layer.qkv, Some(&layer.qkv_b), 1.0, &mut qkv)?;
            be.attention(
                &shape,
                HeadsRef::columns(&qkv, l, d, 0, 0),
                HeadsRef::columns(&qkv, l, d, 0, h),
                HeadsRef::columns(&qkv, l, d, 0, 2 * h),
                &mut ctx,
                &params,
            )?;
            be.linear(&ctx, &layer.out, Some(&layer.out_b), 1.0, &mut y)?;
            be.add(&mut y, &x)?;
            be.layer_norm(&y, &layer.ln1_w, &layer.ln1_b, cfg.eps, &mut x)?;
            be.linear(&x, &layer.up, Some(&layer.up_b), 1.0, &mut inner)?;
            be.activation(cfg.act, &mut inner)?;
            be.linear(&inner, &layer.down, Some(&layer.down_b), 1.0, &mut y)?;
            be.add(&mut y, &x)?;
            be.layer_norm(&y, &layer.ln2_w, &layer.ln2_b, cfg.eps, &mut x)?;
        }
        let pooler_output = match &self.pooler {
            Some((w, b)) => {
                let cls: Vec<usize> = (0..nb).map(|i| i * l).collect();
                let mut first = be.zeros(nb, h)?;
                be.gather_rows(&x, &cls, &mut first)?;
                let mut p = be.zeros(nb, h)?;
                be.linear(&first, w, Some(b), 1.0, &mut p)?;
                be.activation(Activation::Tanh, &mut p)?;
                Some(p)
            }
            None => None,
        };
        Ok(BertOutput {
            last_hidden_state: x,
            pooler_output,
        })
    }

    /// Sentence embeddings as sentence-transformers computes them with mean pooling and
    /// normalization: the mean of the last hidden state over each sequence's own tokens,
    /// divided by its L2 norm. `[batch, hidden]`.
    pub fn sentence_embedding(
        &self,
        be: &B,
        out: &BertOutput<B>,
        batch: &Batch,
    ) -> Result<B::Tensor> {
        let mut e = be.zeros(batch.len(), self.config.hidden)?;
        be.mean_rows(
            &out.last_hidden_state,
            batch.max_len(),
            &batch.lengths(),
            &mut e,
        )?;
        be.l2_normalize(&mut e)?;
        Ok(e)
    }

    /// The forward pass as named outputs (`last_hidden_state` `[b, L, h]`, `pooler_output`
    /// `[b, h]`, and `sentence_embedding` `[b, h]` when `mean_pooling`).
    pub fn outputs(&self, be: &B, batch: &Batch, mean_pooling: bool) -> Result<Vec<Output>> {
        let out = self.forward(be, batch)?;
        let (nb, l, h) = (batch.len(), batch.max_len(), self.config.hidden);
        let mut v = vec![Output {
            name: "last_hidden_state",
            shape: vec![nb, l, h],
            data: be.download(&out.last_hidden_state)?,
        }];
        if let Some(p) = &out.pooler_output {
            v.push(Output {
                name: "pooler_output",
                shape: vec![nb, h],
                data: be.download(p)?,
            });
        }
        if mean_pooling {
            let e = self.sentence_embedding(be, &out, batch)?;
            debug_assert_eq!(e.rows(), nb);
            v.push(Output {
                name: "sentence_embedding",
                shape: vec![nb, h],
                data: be.download(&e)?,
            });
        }
        Ok(v)
    }
}
