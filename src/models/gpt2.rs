//! GPT-2 (`GPT2LMHeadModel`): token and position embeddings, pre-norm decoder layers with
//! `Conv1D` projections, final layer norm, the (tied) language-model head; greedy generation
//! through a paged key/value cache.

use super::{
    Batch, GenerateOptions, LoadOptions, Output, Weights, argmax, check_heads, epsilon, positive,
};
use crate::backend::{
    Activation, AttentionParams, AttentionShape, Backend, DecodeParams, HeadsRef, SeqId, Tensor,
};
use crate::loader::Checkpoint;
use crate::{Error, Result};
use tessera_core::attention::KeyPadding;

/// GPT-2 hyper-parameters from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// `vocab_size`.
    pub vocab: usize,
    /// `n_embd`.
    pub hidden: usize,
    /// `n_layer`.
    pub layers: usize,
    /// `n_head`.
    pub heads: usize,
    /// `n_inner` (4 × `n_embd` when null).
    pub inner: usize,
    /// `n_positions`.
    pub max_positions: usize,
    /// `layer_norm_epsilon`.
    pub eps: f32,
    /// `activation_function`.
    pub act: Activation,
    /// `scale_attn_weights`: scores scaled by `1/√head_dim`.
    pub scale_attn_weights: bool,
    /// `scale_attn_by_inverse_layer_idx`: scores of layer `i` further divided by `i + 1`.
    pub scale_by_layer: bool,
    /// `eos_token_id`: generation stops after it.
    pub eos: Option<u32>,
}

impl Gpt2Config {
    /// Reads and checks the config.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Gpt2Config> {
        let c = ckpt.config();
        let hidden = positive(c, "n_embd")?;
        let cfg = Gpt2Config {
            vocab: positive(c, "vocab_size")?,
            hidden,
            layers: c.usize("n_layer")?,
            heads: positive(c, "n_head")?,
            inner: match c.opt_usize("n_inner")? {
                Some(0) => {
                    return Err(Error::Config {
                        key: "n_inner".into(),
                        what: "must be positive".into(),
                    });
                }
                Some(n) => n,
                None => hidden.checked_mul(4).ok_or_else(|| Error::Config {
                    key: "n_embd".into(),
                    what: "4 × n_embd overflows".into(),
                })?,
            },
            max_positions: positive(c, "n_positions")?,
            eps: epsilon(c, "layer_norm_epsilon", 1e-5)?,
            act: crate::backend::activation_from_hf(
                c.str_or("activation_function", "gelu_new")?,
                "activation_function",
            )?,
            scale_attn_weights: c.bool_or("scale_attn_weights", true)?,
            scale_by_layer: c.bool_or("scale_attn_by_inverse_layer_idx", false)?,
            eos: token_id(c, "eos_token_id")?,
        };
        check_heads(cfg.hidden, cfg.heads, "n_head")?;
        Ok(cfg)
    }
}

/// An optional token id (`null` or absent: none; a list: its first entry).
pub(crate) fn token_id(c: &crate::loader::Config, key: &str) -> Result<Option<u32>> {
    let id = match c.json().get(key) {
        Some(serde_json::Value::Array(ids)) => match ids.first() {
            Some(v) => Some(v.as_u64().ok_or_else(|| Error::Config {
                key: key.into(),
                what: format!("{v} is not a token id"),
            })?),
            None => None,
        },
        _ => c.opt_usize(key)?.map(|v| v as u64),
    };
    id.map(|v| {
        u32::try_from(v).map_err(|_| Error::Config {
            key: key.into(),
            what: format!("{v} is above u32::MAX"),
        })
    })
    .transpose()
}

struct Layer<B: Backend> {
    ln1_w: B::Tensor,
    ln1_b: B::Tensor,
    qkv: B::Weight,
    qkv_b: B::Tensor,
    proj: B::Weight,
    proj_b: B::Tensor,
    ln2_w: B::Tensor,
    ln2_b: B::Tensor,
    fc: B::Weight,
    fc_b: B::Tensor,
    fc_proj: B::Weight,
    fc_proj_b: B::Tensor,
}

/// A loaded GPT-2 language model.
pub struct Gpt2<B: Backend> {
    /// Its configuration.
    pub config: Gpt2Config,
    wte: B::Weight,
    wpe: B::Weight,
    layers: Vec<Layer<B>>,
    lnf_w: B::Tensor,
    lnf_b: B::Tensor,
    /// The head when it is not `wte` itself (untied, or quantized).
    lm_head: Option<B::Weight>,
}

/// Per-layer caches and the sequences' ids in them.
struct Caches<B: Backend> {
    layers: Vec<B::KvCache>,
    /// `seqs[layer][b]`.
    seqs: Vec<Vec<SeqId>>,
}

/// The working buffers of one pass over `rows` tokens.
struct Buffers<B: Backend> {
    h: B::Tensor,
    qkv: B::Tensor,
    ctx: B::Tensor,
    y: B::Tensor,
    inner: B::Tensor,
}

impl<B: Backend> Gpt2<B> {
    /// Loads a `GPT2LMHeadModel` (or a bare `GPT2Model`, whose head is the tied `wte`).
    pub fn load(ckpt: &Checkpoint, be: &B, opts: &LoadOptions) -> Result<Gpt2<B>> {
        let cfg = Gpt2Config::from_checkpoint(ckpt)?;
        let w = Weights::new(ckpt, be, opts.dtype, "wte.weight", &["transformer.", ""])?;
        let (h, i) = (cfg.hidden, cfg.inner);
        let mut layers = Vec::new();
        for l in 0..cfg.layers {
            let p = |s: &str| format!("h.{l}.{s}");
            layers.push(Layer {
                ln1_w: w.vector(&p("ln_1.weight"), h)?,
                ln1_b: w.vector(&p("ln_1.bias"), h)?,
                qkv: w.conv1d(&p("attn.c_attn.weight"), h, 3 * h)?,
                qkv_b: w.vector(&p("attn.c_attn.bias"), 3 * h)?,
                proj: w.conv1d(&p("attn.c_proj.weight"), h, h)?,
                proj_b: w.vector(&p("attn.c_proj.bias"), h)?,
                ln2_w: w.vector(&p("ln_2.weight"), h)?,
                ln2_b: w.vector(&p("ln_2.bias"), h)?,
                fc: w.conv1d(&p("mlp.c_fc.weight"), h, i)?,
                fc_b: w.vector(&p("mlp.c_fc.bias"), i)?,
                fc_proj: w.conv1d(&p("mlp.c_proj.weight"), i, h)?,
                fc_proj_b: w.vector(&p("mlp.c_proj.bias"), h)?,
            });
        }
        let tied = ckpt.config().bool_or("tie_word_embeddings", true)?;
        // `lm_head.weight` sits outside the `transformer.` prefix.
        let untied_head = !tied && ckpt.contains("lm_head.weight");
        let lm_head = if untied_head {
            let t = ckpt.tensor("lm_head.weight")?;
            t.expect_shape(&[cfg.vocab, h])?;
            Some(be.weight(cfg.vocab, h, &t.to_f32()?, opts.dtype)?)
        } else if opts.dtype.for_embedding() != opts.dtype {
            // A quantized head: its own copy of the tied embedding.
            Some(w.linear("wte.weight", cfg.vocab, h)?)
        } else {
            None
        };
        Ok(Gpt2 {
            wte: w.embedding("wte.weight", cfg.vocab, h)?,
            wpe: w.embedding("wpe.weight", cfg.max_positions, h)?,
            layers,
            lnf_w: w.vector("ln_f.weight", h)?,
            lnf_b: w.vector("ln_f.bias", h)?,
            lm_head,
            config: cfg,
        })
    }

    fn buffers(&self, be: &B, rows: usize) -> Result<Buffers<B>> {
        let h = self.config.hidden;
        Ok(Buffers {
            h: be.zeros(rows, h)?,
            qkv: be.zeros(rows, 3 * h)?,
            ctx: be.zeros(rows, h)?,
            y: be.zeros(rows, h)?,
            inner: be.zeros(rows, self.config.inner)?,
        })
    }

    fn scale(&self, layer: usize) -> f32 {
        let d = self.config.hidden / self.config.heads;
        let mut s = if self.config.scale_attn_weights {
            1.0 / (d as f32).sqrt()
        } else {
            1.0
        };
        if self.config.scale_by_layer {
            s /= (layer + 1) as f32;
        }
        s
    }

    /// `x = wte[ids] + wpe[positions]`.
    fn embed(&self, be: &B, ids: &[u32], positions: &[u32]) -> Result<B::Tensor> {
        let h = self.config.hidden;
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p as usize >= self.config.max_positions)
        {
            return Err(Error::Invalid(format!(
                "position {p} is beyond n_positions {}",
                self.config.max_positions
            )));
        }
        let mut x = be.zeros(ids.len(), h)?;
        be.embedding(&self.wte, ids, &mut x)?;
        let mut p = be.zeros(ids.len(), h)?;
        be.embedding(&self.wpe, positions, &mut p)?;
        be.add(&mut x, &p)?;
        Ok(x)
    }

    /// The MLP half of a layer and both residual adds around the attention output in
    /// `buf.ctx`.
    fn finish_layer(
        &self,
        be: &B,
        layer: &Layer<B>,
        x: &mut B::Tensor,
        buf: &mut Buffers<B>,
    ) -> Result<()> {
        let eps = self.config.eps;
        be.linear(&buf.ctx, &layer.proj, Some(&layer.proj_b), 1.0, &mut buf.y)?;
        be.add(x, &buf.y)?;
        be.layer_norm(x, &layer.ln2_w, &layer.ln2_b, eps, &mut buf.h)?;
        be.linear(&buf.h, &layer.fc, Some(&layer.fc_b), 1.0, &mut buf.inner)?;
        be.activation(self.config.act, &mut buf.inner)?;
        be.linear(
            &buf.inner,
            &layer.fc_proj,
            Some(&layer.fc_proj_b),
            1.0,
            &mut buf.y,
        )?;
        be.add(x, &buf.y)?;
        Ok(())
    }

    /// The layers over a right-padded batch (causal, padded keys masked), appending every
    /// sequence's own keys and values to `caches` when given. Returns the final-norm output
    /// `[batch · seq, hidden]`.
    fn prefill(
        &self,
        be: &B,
        batch: &Batch,
        mut caches: Option<&mut Caches<B>>,
    ) -> Result<B::Tensor> {
        let cfg = &self.config;
        batch.check_vocab(cfg.vocab)?;
        let (nb, l, h) = (batch.len(), batch.max_len(), cfg.hidden);
        let d = h / cfg.heads;
        let lengths = batch.lengths();
        let positions: Vec<u32> = (0..nb).flat_map(|_| 0..l as u32).collect();
        let mut x = self.embed(be, &batch.padded(0), &positions)?;
        let mut buf = self.buffers(be, nb * l)?;
        let shape = AttentionShape {
            batch: nb,
            q_len: l,
            kv_len: l,
            n_heads: cfg.heads,
            n_kv_heads: cfg.heads,
            head_dim: d,
        };
        for (li, layer) in self.layers.iter().enumerate() {
            be.layer_norm(&x, &layer.ln1_w, &layer.ln1_b, cfg.eps, &mut buf.h)?;
            be.linear(&buf.h, &layer.qkv, Some(&layer.qkv_b), 1.0, &mut buf.qkv)?;
            if let Some(c) = caches.as_deref_mut() {
                for (b, &len) in lengths.iter().enumerate() {
                    be.kv_append(
                        &mut c.layers[li],
                        c.seqs[li][b],
                        HeadsRef::columns(&buf.qkv, len, d, b * l, h),
                        HeadsRef::columns(&buf.qkv, len, d, b * l, 2 * h),
                        len,
                    )?;
                }
            }
            let params = AttentionParams::new(d)
                .with_scale(self.scale(li))
                .causal(0)
                .with_padding(KeyPadding::Lengths(&lengths));
            be.attention(
                &shape,
                HeadsRef::columns(&buf.qkv, l, d, 0, 0),
                HeadsRef::columns(&buf.qkv, l, d, 0, h),
                HeadsRef::columns(&buf.qkv, l, d, 0, 2 * h),
                &mut buf.ctx,
                &params,
            )?;
            self.finish_layer(be, layer, &mut x, &mut buf)?;
        }
        be.layer_norm(&x, &self.lnf_w, &self.lnf_b, cfg.eps, &mut buf.h)?;
        Ok(buf.h)
    }

    fn logits(&self, be: &B, hidden: &B::Tensor) -> Result<B::Tensor> {
        let mut logits = be.zeros(hidden.rows(), self.config.vocab)?;
        be.linear(
            hidden,
            self.lm_head.as_ref().unwrap_or(&self.wte),
            None,
            1.0,
            &mut logits,
        )?;
        Ok(logits)
    }

    /// The whole right-padded batch at once: `(last_hidden_state, logits)`,
    /// `[batch · seq, hidden]` and `[batch · seq, vocab]`.
    pub fn forward(&self, be: &B, batch: &Batch) -> Result<(B::Tensor, B::Tensor)> {
        let hidden = self.prefill(be, batch, None)?;
        let logits = self.logits(be, &hidden)?;
        Ok((hidden, logits))
    }

    /// The forward pass as named outputs: `logits` `[b, L, vocab]` and `last_hidden_state`
    /// `[b, L, hidden]` (after the final layer norm).
    pub fn outputs(&self, be: &B, batch: &Batch) -> Result<Vec<Output>> {
        let (hidden, logits) = self.forward(be, batch)?;
        let (nb, l) = (batch.len(), batch.max_len());
        Ok(vec![
            Output {
                name: "logits",
                shape: vec![nb, l, self.config.vocab],
                data: be.download(&logits)?,
            },
            Output {
                name: "last_hidden_state",
                shape: vec![nb, l, self.config.hidden],
                data: be.download(&hidden)?,
            },
        ])
    }

    /// Greedy generation for every prompt of the batch: one batched prefill that fills a
    /// paged key/value cache per layer, then one token per step for the sequences still
    /// running, each step attending over the cache. Returns the new tokens of each sequence
    /// (stopping after the end-of-sequence token, which is kept).
    pub fn generate(&self, be: &B, batch: &Batch, opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
        let cfg = &self.config;
        let (nb, h) = (batch.len(), cfg.hidden);
        let d = h / cfg.heads;
        let n = opts.max_new_tokens;
        let mut out = vec![Vec::with_capacity(n); nb];
        if n == 0 {
            return Ok(out);
        }
        let max_len = batch.max_len() + n - 1;
        if max_len > cfg.max_positions {
            return Err(Error::Invalid(format!(
                "{} prompt tokens + {n} new tokens exceed n_positions {}",
                batch.max_len(),
                cfg.max_positions
            )));
        }
        let cache_cfg = opts.cache_config(cfg.heads, d, nb, max_len)?;
        let mut caches = Caches::<B> {
            layers: Vec::new(),
            seqs: Vec::new(),
        };
        for _ in 0..cfg.layers {
            let mut c = be.kv_cache(cache_cfg)?;
            let ids = (0..nb)
                .map(|_| be.kv_add_sequence(&mut c))
                .collect::<Result<Vec<_>>>()?;
            caches.layers.push(c);
            caches.seqs.push(ids);
        }
        let hidden = self.prefill(be, batch, Some(&mut caches))?;
        let l = batch.max_len();
        let last: Vec<usize> = batch
            .lengths()
            .iter()
            .enumerate()
            .map(|(b, &len)| b * l + len - 1)
            .collect();
        let mut rows = be.zeros(nb, h)?;
        be.gather_rows(&hidden, &last, &mut rows)?;
        let logits = be.download(&self.logits(be, &rows)?)?;
        let mut next: Vec<u32> = logits
            .chunks_exact(cfg.vocab)
            .map(|r| argmax(r) as u32)
            .collect();
        let mut active: Vec<usize> = (0..nb).collect();
        let mut pos: Vec<usize> = batch.lengths();
        for step in 0..n {
            active.retain(|&b| {
                out[b].push(next[b]);
                Some(next[b]) != cfg.eos
            });
            if active.is_empty() || step + 1 == n {
                break;
            }
            let ids: Vec<u32> = active.iter().map(|&b| next[b]).collect();
            let positions: Vec<u32> = active.iter().map(|&b| pos[b] as u32).collect();
            let hidden = self.decode_step(be, &ids, &positions, &active, &mut caches)?;
            let logits = be.download(&self.logits(be, &hidden)?)?;
            for (&b, r) in active.iter().zip(logits.chunks_exact(cfg.vocab)) {
                next[b] = argmax(r) as u32;
                pos[b] += 1;
            }
        }
        Ok(out)
    }

    /// One token for each sequence of `active` (indices into the batch): returns the final
    /// normed hidden states `[active.len(), hidden]`.
    fn decode_step(
        &self,
        be: &B,
        ids: &[u32],
        positions: &[u32],
        active: &[usize],
        caches: &mut Caches<B>,
    ) -> Result<B::Tensor> {
        let cfg = &self.config;
        let h = cfg.hidden;
        let d = h / cfg.heads;
        let na = active.len();
        let mut x = self.embed(be, ids, positions)?;
        let mut buf = self.buffers(be, na)?;
        for (li, layer) in self.layers.iter().enumerate() {
            be.layer_norm(&x, &layer.ln1_w, &layer.ln1_b, cfg.eps, &mut buf.h)?;
            be.linear(&buf.h, &layer.qkv, Some(&layer.qkv_b), 1.0, &mut buf.qkv)?;
            let seqs: Vec<SeqId> = active.iter().map(|&b| caches.seqs[li][b]).collect();
            for (i, &s) in seqs.iter().enumerate() {
                be.kv_append(
                    &mut caches.layers[li],
                    s,
                    HeadsRef::columns(&buf.qkv, 1, d, i, h),
                    HeadsRef::columns(&buf.qkv, 1, d, i, 2 * h),
                    1,
                )?;
            }
            let params = DecodeParams {
                scale: self.scale(li),
                bias: None,
            };
            be.decode_attention(
                &mut caches.layers[li],
                &seqs,
                cfg.heads,
                HeadsRef::columns(&buf.qkv, 1, d, 0, 0),
                &mut buf.ctx,
                &params,
            )?;
            self.finish_layer(be, layer, &mut x, &mut buf)?;
        }
        be.layer_norm(&x, &self.lnf_w, &self.lnf_b, cfg.eps, &mut buf.h)?;
        Ok(buf.h)
    }
}
