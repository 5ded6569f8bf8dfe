//! T5 (`T5ForConditionalGeneration`): RMS-normed pre-norm encoder and decoder stacks with
//! bucketed relative-position biases (computed inside the attention kernels), unscaled
//! attention, ReLU or gated-GELU feed-forward, the tied-embedding rescale before the head;
//! greedy generation through a paged self-attention cache.

use super::gpt2::token_id;
use super::{
    Batch, GenerateOptions, LoadOptions, Output, Weights, argmax, epsilon, positive, positive_or,
};
use crate::backend::{
    Activation, AttentionParams, AttentionShape, Backend, DecodeParams, HeadLayout, HeadsRef,
    SeqId, Tensor,
};
use crate::loader::Checkpoint;
use crate::{Error, Result};
use tessera_core::attention::{Bias, KeyPadding, RelativeBias};

/// T5 hyper-parameters from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    /// `vocab_size`.
    pub vocab: usize,
    /// `d_model`.
    pub d_model: usize,
    /// `d_kv`: size of each head (`num_heads · d_kv` need not equal `d_model`).
    pub d_kv: usize,
    /// `d_ff`.
    pub d_ff: usize,
    /// `num_heads`.
    pub heads: usize,
    /// `num_layers` (encoder).
    pub encoder_layers: usize,
    /// `num_decoder_layers`.
    pub decoder_layers: usize,
    /// `relative_attention_num_buckets`.
    pub num_buckets: usize,
    /// `relative_attention_max_distance`.
    pub max_distance: usize,
    /// `layer_norm_epsilon`.
    pub eps: f32,
    /// The feed-forward activation (`feed_forward_proj`).
    pub act: Activation,
    /// Whether the feed-forward is gated (`gated-…`: `wi_0`, `wi_1`).
    pub gated: bool,
    /// Whether the decoder output is scaled by `d_model^-0.5` before the head (T5 v1.0's
    /// tied head): `scale_decoder_outputs` (transformers 5), else `tie_word_embeddings`.
    pub rescale: bool,
    /// `pad_token_id` (padding of encoder inputs).
    pub pad: u32,
    /// `decoder_start_token_id`.
    pub decoder_start: u32,
    /// `eos_token_id`.
    pub eos: Option<u32>,
}

impl T5Config {
    /// Reads and checks the config.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<T5Config> {
        let c = ckpt.config();
        let ff = c.str_or("feed_forward_proj", "relu")?;
        let (gated, act_name) = match ff.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, ff),
        };
        if act_name.contains('-') {
            return Err(Error::Config {
                key: "feed_forward_proj".into(),
                what: format!("{ff:?} is not `ACT` or `gated-ACT`"),
            });
        }
        // transformers: "gated-gelu" means the tanh approximation (legacy of T5 v1.1).
        let act_name = if ff == "gated-gelu" {
            "gelu_new"
        } else {
            act_name
        };
        let act = crate::backend::activation_from_hf(act_name, "feed_forward_proj")?;
        let encoder_layers = c.usize("num_layers")?;
        let num_buckets = positive_or(c, "relative_attention_num_buckets", 32)?;
        let max_distance = positive_or(c, "relative_attention_max_distance", 128)?;
        // The bucket formula needs max_distance > max_exact = num_buckets / 4 (bidirectional).
        if num_buckets < 4 || max_distance <= num_buckets / 2 {
            return Err(Error::Config {
                key: "relative_attention_max_distance".into(),
                what: format!(
                    "{max_distance} with {num_buckets} buckets: need at least 4 buckets and max_distance > num_buckets / 2"
                ),
            });
        }
        let id =
            |key: &str, default: u32| -> Result<u32> { Ok(token_id(c, key)?.unwrap_or(default)) };
        let cfg = T5Config {
            vocab: positive(c, "vocab_size")?,
            d_model: positive(c, "d_model")?,
            d_kv: positive(c, "d_kv")?,
            d_ff: positive(c, "d_ff")?,
            heads: positive(c, "num_heads")?,
            encoder_layers,
            decoder_layers: c.opt_usize("num_decoder_layers")?.unwrap_or(encoder_layers),
            num_buckets,
            max_distance,
            eps: epsilon(c, "layer_norm_epsilon", 1e-6)?,
            act,
            gated,
            rescale: match c.json().get("scale_decoder_outputs") {
                Some(serde_json::Value::Bool(b)) => *b,
                Some(serde_json::Value::Null) | None => c.bool_or("tie_word_embeddings", true)?,
                Some(v) => {
                    return Err(Error::Config {
                        key: "scale_decoder_outputs".into(),
                        what: format!("{v} is not a boolean"),
                    });
                }
            },
            pad: id("pad_token_id", 0)?,
            decoder_start: id("decoder_start_token_id", 0)?,
            eos: token_id(c, "eos_token_id")?,
        };
        if cfg.d_kv > tessera_core::attention::MAX_HEAD_DIM {
            return Err(Error::Unsupported(format!("d_kv {}", cfg.d_kv)));
        }
        cfg.heads
            .checked_mul(cfg.d_kv)
            .ok_or_else(|| Error::Config {
                key: "num_heads".into(),
                what: "num_heads × d_kv overflows".into(),
            })?;
        Ok(cfg)
    }

    fn inner(&self) -> usize {
        self.heads * self.d_kv
    }
}

struct FeedForward<B: Backend> {
    ln: B::Tensor,
    /// `wi` `[d_ff, d]`, or `wi_0` and `wi_1` stacked `[2·d_ff, d]`.
    wi: B::Weight,
    wo: B::Weight,
}

struct SelfAttention<B: Backend> {
    ln: B::Tensor,
    qkv: B::Weight,
    o: B::Weight,
}

struct CrossAttention<B: Backend> {
    ln: B::Tensor,
    q: B::Weight,
    kv: B::Weight,
    o: B::Weight,
}

struct EncoderLayer<B: Backend> {
    attn: SelfAttention<B>,
    ff: FeedForward<B>,
}

struct DecoderLayer<B: Backend> {
    attn: SelfAttention<B>,
    cross: CrossAttention<B>,
    ff: FeedForward<B>,
}

/// A loaded T5 encoder-decoder with its language-model head.
pub struct T5<B: Backend> {
    /// Its configuration.
    pub config: T5Config,
    shared: B::Weight,
    encoder: Vec<EncoderLayer<B>>,
    encoder_ln: B::Tensor,
    encoder_bias: Vec<f32>,
    decoder: Vec<DecoderLayer<B>>,
    decoder_ln: B::Tensor,
    decoder_bias: Vec<f32>,
    /// The head when it is not `shared` itself (untied, or quantized).
    lm_head: Option<B::Weight>,
}

/// Encoder output and the per-layer cross-attention keys and values computed from it.
struct Encoded<B: Backend> {
    /// `[batch · seq, d_model]`.
    hidden: B::Tensor,
    /// Per decoder layer, `[batch · seq, 2 · inner]`: keys then values.
    cross_kv: Vec<B::Tensor>,
    seq: usize,
    lengths: Vec<usize>,
}

impl<B: Backend> T5<B> {
    /// Loads a `T5ForConditionalGeneration`.
    pub fn load(ckpt: &Checkpoint, be: &B, opts: &LoadOptions) -> Result<T5<B>> {
        let cfg = T5Config::from_checkpoint(ckpt)?;
        let w = Weights::new(ckpt, be, opts.dtype, "shared.weight", &[""])?;
        let (d, inner, ff) = (cfg.d_model, cfg.inner(), cfg.d_ff);
        let feed_forward = |p: &str| -> Result<FeedForward<B>> {
            let wi = if cfg.gated {
                w.linears(
                    &[
                        &format!("{p}.DenseReluDense.wi_0.weight"),
                        &format!("{p}.DenseReluDense.wi_1.weight"),
                    ],
                    ff,
                    d,
                )?
            } else {
                w.linear(&format!("{p}.DenseReluDense.wi.weight"), ff, d)?
            };
            Ok(FeedForward {
                ln: w.vector(&format!("{p}.layer_norm.weight"), d)?,
                wi,
                wo: w.linear(&format!("{p}.DenseReluDense.wo.weight"), d, ff)?,
            })
        };
        let self_attention = |p: &str| -> Result<SelfAttention<B>> {
            let a = |s: &str| format!("{p}.SelfAttention.{s}.weight");
            Ok(SelfAttention {
                ln: w.vector(&format!("{p}.layer_norm.weight"), d)?,
                qkv: w.linears(&[&a("q"), &a("k"), &a("v")], inner, d)?,
                o: w.linear(&a("o"), d, inner)?,
            })
        };
        let mut encoder = Vec::new();
        for l in 0..cfg.encoder_layers {
            encoder.push(EncoderLayer {
                attn: self_attention(&format!("encoder.block.{l}.layer.0"))?,
                ff: feed_forward(&format!("encoder.block.{l}.layer.1"))?,
            });
        }
        let mut decoder = Vec::new();
        for l in 0..cfg.decoder_layers {
            let p = format!("decoder.block.{l}.layer.1");
            let a = |s: &str| format!("{p}.EncDecAttention.{s}.weight");
            decoder.push(DecoderLayer {
                attn: self_attention(&format!("decoder.block.{l}.layer.0"))?,
                cross: CrossAttention {
                    ln: w.vector(&format!("{p}.layer_norm.weight"), d)?,
                    q: w.linear(&a("q"), inner, d)?,
                    kv: w.linears(&[&a("k"), &a("v")], inner, d)?,
                    o: w.linear(&a("o"), d, inner)?,
                },
                ff: feed_forward(&format!("decoder.block.{l}.layer.2"))?,
            });
        }
        let bias_table = |stack: &str| -> Result<Vec<f32>> {
            w.f32(
                &format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                &[cfg.num_buckets, cfg.heads],
            )
        };
        // The head is `lm_head.weight` when the file has one (untied v1.1 / flan-t5), else
        // the shared embedding (transformers ties them and does not save the head).
        let lm_head = if w.contains("lm_head.weight") {
            Some(w.linear("lm_head.weight", cfg.vocab, d)?)
        } else if opts.dtype.for_embedding() != opts.dtype {
            Some(w.linear("shared.weight", cfg.vocab, d)?)
        } else {
            None
        };
        Ok(T5 {
            shared: w.embedding("shared.weight", cfg.vocab, d)?,
            encoder_bias: if cfg.encoder_layers > 0 {
                bias_table("encoder")?
            } else {
                Vec::new()
            },
            decoder_bias: if cfg.decoder_layers > 0 {
                bias_table("decoder")?
            } else {
                Vec::new()
            },
            encoder,
            encoder_ln: w.vector("encoder.final_layer_norm.weight", d)?,
            decoder,
            decoder_ln: w.vector("decoder.final_layer_norm.weight", d)?,
            lm_head,
            config: cfg,
        })
    }

    fn relative<'a>(&self, table: &'a [f32], bidirectional: bool) -> Bias<'a> {
        if table.is_empty() {
            return Bias::None;
        }
        Bias::Relative(RelativeBias {
            table,
            num_buckets: self.config.num_buckets,
            max_distance: self.config.max_distance,
            bidirectional,
        })
    }

    fn feed_forward(&self, be: &B, ff: &FeedForward<B>, x: &mut B::Tensor) -> Result<()> {
        let c = &self.config;
        let rows = x.rows();
        let mut h = be.zeros(rows, c.d_model)?;
        be.rms_norm(x, &ff.ln, c.eps, &mut h)?;
        let mut act = be.zeros(rows, c.d_ff)?;
        if c.gated {
            let mut both = be.zeros(rows, 2 * c.d_ff)?;
            be.linear(&h, &ff.wi, None, 1.0, &mut both)?;
            be.gated(c.act, &both, &mut act)?;
        } else {
            be.linear(&h, &ff.wi, None, 1.0, &mut act)?;
            be.activation(c.act, &mut act)?;
        }
        be.linear(&act, &ff.wo, None, 1.0, &mut h)?;
        be.add(x, &h)
    }

    /// The encoder over a right-padded batch, and every decoder layer's cross keys/values.
    fn encode(&self, be: &B, batch: &Batch) -> Result<Encoded<B>> {
        let c = &self.config;
        batch.check_vocab(c.vocab)?;
        let (nb, l, d, inner) = (batch.len(), batch.max_len(), c.d_model, c.inner());
        let rows = nb * l;
        let lengths = batch.lengths();
        let mut x = be.zeros(rows, d)?;
        be.embedding(&self.shared, &batch.padded(c.pad), &mut x)?;
        let shape = AttentionShape {
            batch: nb,
            q_len: l,
            kv_len: l,
            n_heads: c.heads,
            n_kv_heads: c.heads,
            head_dim: c.d_kv,
        };
        let params = AttentionParams::new(c.d_kv)
            .with_scale(1.0)
            .with_padding(KeyPadding::Lengths(&lengths))
            .with_bias(self.relative(&self.encoder_bias, true));
        let mut h = be.zeros(rows, d)?;
        let mut qkv = be.zeros(rows, 3 * inner)?;
        let mut ctx = be.zeros(rows, inner)?;
        for layer in &self.encoder {
            be.rms_norm(&x, &layer.attn.ln, c.eps, &mut h)?;
            be.linear(&h, &layer.attn.qkv, None, 1.0, &mut qkv)?;
            be.attention(
                &shape,
                HeadsRef::columns(&qkv, l, c.d_kv, 0, 0),
                HeadsRef::columns(&qkv, l, c.d_kv, 0, inner),
                HeadsRef::columns(&qkv, l, c.d_kv, 0, 2 * inner),
                &mut ctx,
                &params,
            )?;
            be.linear(&ctx, &layer.attn.o, None, 1.0, &mut h)?;
            be.add(&mut x, &h)?;
            self.feed_forward(be, &layer.ff, &mut x)?;
        }
        be.rms_norm(&x, &self.encoder_ln, c.eps, &mut h)?;
        let mut cross_kv = Vec::with_capacity(self.decoder.len());
        for layer in &self.decoder {
            let mut kv = be.zeros(rows, 2 * inner)?;
            be.linear(&h, &layer.cross.kv, None, 1.0, &mut kv)?;
            cross_kv.push(kv);
        }
        Ok(Encoded {
            hidden: h,
            cross_kv,
            seq: l,
            lengths,
        })
    }

    /// Cross-attention of `y` (`[batch · q_len, d]`, `batch` = the encoded batch) over the
    /// encoder output, added to `y`.
    fn cross_attention(
        &self,
        be: &B,
        layer: usize,
        enc: &Encoded<B>,
        q_len: usize,
        y: &mut B::Tensor,
    ) -> Result<()> {
        let c = &self.config;
        let cross = &self.decoder[layer].cross;
        let (rows, inner) = (y.rows(), c.inner());
        let mut h = be.zeros(rows, c.d_model)?;
        be.rms_norm(y, &cross.ln, c.eps, &mut h)?;
        let mut q = be.zeros(rows, inner)?;
        be.linear(&h, &cross.q, None, 1.0, &mut q)?;
        let shape = AttentionShape {
            batch: enc.lengths.len(),
            q_len,
            kv_len: enc.seq,
            n_heads: c.heads,
            n_kv_heads: c.heads,
            head_dim: c.d_kv,
        };
        let params = AttentionParams::new(c.d_kv)
            .with_scale(1.0)
            .with_padding(KeyPadding::Lengths(&enc.lengths));
        let kv = &enc.cross_kv[layer];
        let mut ctx = be.zeros(rows, inner)?;
        be.attention(
            &shape,
            HeadsRef::columns(&q, q_len, c.d_kv, 0, 0),
            HeadsRef::columns(kv, enc.seq, c.d_kv, 0, 0),
            HeadsRef::columns(kv, enc.seq, c.d_kv, 0, inner),
            &mut ctx,
            &params,
        )?;
        be.linear(&ctx, &cross.o, None, 1.0, &mut h)?;
        be.add(y, &h)
    }

    fn logits(&self, be: &B, hidden: &B::Tensor) -> Result<B::Tensor> {
        let c = &self.config;
        let alpha = if c.rescale {
            1.0 / (c.d_model as f32).sqrt()
        } else {
            1.0
        };
        let mut logits = be.zeros(hidden.rows(), c.vocab)?;
        be.linear(
            hidden,
            self.lm_head.as_ref().unwrap_or(&self.shared),
            None,
            alpha,
            &mut logits,
        )?;
        Ok(logits)
    }

    /// Encoder over `batch` and decoder over `decoder` (teacher forcing; one decoder sequence
    /// per encoder sequence, right-padded with the pad id). Returns
    /// `(encoder_last_hidden_state, last_hidden_state, logits)`.
    pub fn forward(
        &self,
        be: &B,
        batch: &Batch,
        decoder: &Batch,
    ) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        let c = &self.config;
        if decoder.len() != batch.len() {
            return Err(Error::Invalid(format!(
                "{} decoder sequences for {} encoder sequences",
                decoder.len(),
                batch.len()
            )));
        }
        decoder.check_vocab(c.vocab)?;
        let enc = self.encode(be, batch)?;
        let (nb, ld, d, inner) = (decoder.len(), decoder.max_len(), c.d_model, c.inner());
        let rows = nb * ld;
        let mut y = be.zeros(rows, d)?;
        be.embedding(&self.shared, &decoder.padded(c.pad), &mut y)?;
        let shape = AttentionShape {
            batch: nb,
            q_len: ld,
            kv_len: ld,
            n_heads: c.heads,
            n_kv_heads: c.heads,
            head_dim: c.d_kv,
        };
        let params = AttentionParams::new(c.d_kv)
            .with_scale(1.0)
            .causal(0)
            .with_bias(self.relative(&self.decoder_bias, false));
        let mut h = be.zeros(rows, d)?;
        let mut qkv = be.zeros(rows, 3 * inner)?;
        let mut ctx = be.zeros(rows, inner)?;
        for (li, layer) in self.decoder.iter().enumerate() {
            be.rms_norm(&y, &layer.attn.ln, c.eps, &mut h)?;
            be.linear(&h, &layer.attn.qkv, None, 1.0, &mut qkv)?;
            be.attention(
                &shape,
                HeadsRef::columns(&qkv, ld, c.d_kv, 0, 0),
                HeadsRef::columns(&qkv, ld, c.d_kv, 0, inner),
                HeadsRef::columns(&qkv, ld, c.d_kv, 0, 2 * inner),
                &mut ctx,
                &params,
            )?;
            be.linear(&ctx, &layer.attn.o, None, 1.0, &mut h)?;
            be.add(&mut y, &h)?;
            self.cross_attention(be, li, &enc, ld, &mut y)?;
            self.feed_forward(be, &layer.ff, &mut y)?;
        }
        be.rms_norm(&y, &self.decoder_ln, c.eps, &mut h)?;
        let logits = self.logits(be, &h)?;
        Ok((enc.hidden, h, logits))
    }

    /// The forward pass as named outputs: `logits` `[b, Ld, vocab]`, `last_hidden_state`
    /// `[b, Ld, d]` (the decoder's final norm output, before the tied rescale) and
    /// `encoder_last_hidden_state` `[b, L, d]`.
    pub fn outputs(&self, be: &B, batch: &Batch, decoder: &Batch) -> Result<Vec<Output>> {
        let (enc, dec, logits) = self.forward(be, batch, decoder)?;
        let (nb, l, ld, d) = (
            batch.len(),
            batch.max_len(),
            decoder.max_len(),
            self.config.d_model,
        );
        Ok(vec![
            Output {
                name: "logits",
                shape: vec![nb, ld, self.config.vocab],
                data: be.download(&logits)?,
            },
            Output {
                name: "last_hidden_state",
                shape: vec![nb, ld, d],
                data: be.download(&dec)?,
            },
            Output {
                name: "encoder_last_hidden_state",
                shape: vec![nb, l, d],
                data: be.download(&enc)?,
            },
        ])
    }

    /// Greedy generation: encode the batch once (and every layer's cross keys/values), then
    /// decode from `decoder_start_token_id` one token per step for every sequence, the
    /// decoder's self-attention reading a paged key/value cache (relative-position bias
    /// computed inside the decode kernel). Returns the new tokens of each sequence (stopping
    /// after the end-of-sequence token, which is kept).
    pub fn generate(&self, be: &B, batch: &Batch, opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
        let c = &self.config;
        let nb = batch.len();
        let n = opts.max_new_tokens;
        let mut out = vec![Vec::with_capacity(n); nb];
        if n == 0 {
            return Ok(out);
        }
        let enc = self.encode(be, batch)?;
        let (d, inner) = (c.d_model, c.inner());
        let cache_cfg = opts.cache_config(c.heads, c.d_kv, nb, n)?;
        let mut caches = Vec::with_capacity(self.decoder.len());
        let mut seqs: Vec<Vec<SeqId>> = Vec::with_capacity(self.decoder.len());
        for _ in &self.decoder {
            let mut cache = be.kv_cache(cache_cfg)?;
            seqs.push(
                (0..nb)
                    .map(|_| be.kv_add_sequence(&mut cache))
                    .collect::<Result<Vec<_>>>()?,
            );
            caches.push(cache);
        }
        let bias = match self.relative(&self.decoder_bias, false) {
            Bias::Relative(r) => Some(r),
            _ => None,
        };
        let params = DecodeParams { scale: 1.0, bias };
        let mut tokens = vec![c.decoder_start; nb];
        let mut done = vec![false; nb];
        let mut h = be.zeros(nb, d)?;
        let mut qkv = be.zeros(nb, 3 * inner)?;
        let mut ctx = be.zeros(nb, inner)?;
        for _ in 0..n {
            let mut y = be.zeros(nb, d)?;
            be.embedding(&self.shared, &tokens, &mut y)?;
            for (li, layer) in self.decoder.iter().enumerate() {
                be.rms_norm(&y, &layer.attn.ln, c.eps, &mut h)?;
                be.linear(&h, &layer.attn.qkv, None, 1.0, &mut qkv)?;
                for (b, &s) in seqs[li].iter().enumerate() {
                    be.kv_append(
                        &mut caches[li],
                        s,
                        HeadsRef::columns(&qkv, 1, c.d_kv, b, inner),
                        HeadsRef::columns(&qkv, 1, c.d_kv, b, 2 * inner),
                        1,
                    )?;
                }
                be.decode_attention(
                    &mut caches[li],
                    &seqs[li],
                    c.heads,
                    HeadsRef {
                        tensor: &qkv,
                        offset: 0,
                        layout: HeadLayout {
                            batch_stride: 3 * inner,
                            seq_stride: 3 * inner,
                            head_stride: c.d_kv,
                        },
                    },
                    &mut ctx,
                    &params,
                )?;
                be.linear(&ctx, &layer.attn.o, None, 1.0, &mut h)?;
                be.add(&mut y, &h)?;
                self.cross_attention(be, li, &enc, 1, &mut y)?;
                self.feed_forward(be, &layer.ff, &mut y)?;
            }
            be.rms_norm(&y, &self.decoder_ln, c.eps, &mut h)?;
            let logits = be.download(&self.logits(be, &h)?)?;
            for (b, row) in logits.chunks_exact(c.vocab).enumerate() {
                let t = argmax(row) as u32;
                tokens[b] = t;
                if !done[b] {
                    out[b].push(t);
                    done[b] = Some(t) == c.eos;
                }
            }
            if done.iter().all(|&x| x) {
                break;
            }
        }
        Ok(out)
    }
}
