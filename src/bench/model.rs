//! The `model` family: whole models on Tessera's CPU backend, against Hugging Face
//! `transformers` on the same checkpoint.
//!
//! # Checkpoints
//! Two random-weight checkpoints in the Hugging Face layout, written by this module the first
//! time they are needed (no PyTorch involved) under `$CARGO_TARGET_DIR/bench-models/` (else
//! `<workspace>/target/bench-models/`): `gpt2-small/` (a `GPT2LMHeadModel` shaped like
//! GPT-2 small: 124M parameters, vocabulary 50257, 12 layers of 768, 1024 positions, tied
//! head; [`GPT2_SMALL`]) and `bert-base/` (a `BertModel` with pooler shaped like BERT-base:
//! 110M parameters; [`BERT_BASE`]). Every weight matrix and embedding is N(0, 0.02) from a
//! fixed-seed SplitMix64 stream, biases 0, layer-norm weights 1, f32, the tensors named as
//! `transformers` saves them. A marker file records what was written ([`MARKER`] and the
//! shape), so a checkpoint is rewritten only when it is missing or stale.
//!
//! # Rows
//! * `prefill` — GPT-2 `forward` over one sequence of 128 random tokens (logits at every
//!   position, as `transformers` computes them);
//! * `decode` — GPT-2 greedy generation of 128 tokens after a 128-token prompt, through the
//!   paged f32 KV cache: each repetition times `generate` with 129 new tokens and with 1
//!   (prefill + the first token) back to back, and the row's time is the median of the
//!   differences, i.e. 128 decode steps, each a forward pass of one token plus the head;
//! * `encode` — BERT `forward` (with the pooler) over a batch of 8 × 128 tokens.
//!
//! GPT-2 runs with its linear layers (and the head) stored f32, f16, Q8_0 and Q4_0, BERT f32
//! and Q8_0; each model is loaded once per storage type and shared by the rows of every
//! thread count. `--quick` uses 32 tokens (decode 32 + 32, encode 2 × 32).
//!
//! Prefill and encode are held to the FMA peak: GFLOP/s count `2·n·k` per token of every
//! linear layer (GPT-2's head included) plus `4·hidden` per attended (query, key) pair (causal
//! pairs only for GPT-2); GB/s count the weight bytes in their storage type. Decode is held to
//! the read bandwidth: GB/s count, per step, every linear weight and the head in their storage
//! type (Q8_0: 34 bytes per 32 weights, Q4_0: 18) plus the f32 keys and values the step
//! attends over. The line under each row gives tokens per second (prefill: prompt tokens,
//! decode: new tokens, encode: batch × sequence).
//!
//! # Peer
//! `benches/peers/transformers_model.py` runs the same work with `transformers` (PyTorch,
//! f32, CPU, `torch.set_num_threads` to the row's thread count, its default attention),
//! the same ids, in one long-lived process (`--serve`) started with the first row that needs
//! it: the python of `TESSERA_PEER_PYTHON` (`none` turns the peer off), else
//! `target/fixture-venv/bin/python` (made by `scripts/fixture-env`), else `python3`. It runs
//! once per kernel and thread count, right after Tessera's first row of that kernel and
//! thread count, and every storage type's row is compared with that one f32 measurement (the
//! ratio column: above 1 means Tessera is faster). Its decode uses `min_new_tokens` so it
//! never stops early. Without torch and transformers the rows carry no ratio and say so; the
//! peer's stderr goes to `bench-models/peer.log`. (The GPU family, `super::cuda_model`, asks
//! the same server for runs on `cuda` with the rows' weight type.)

use super::report::{CaseId, PeerTime, Row, Work};
use super::timing::{Stats, TimingConfig, measure};
use super::{BenchError, Case, Config, Ctx, Result, RunFn};
use crate::backend::{Backend, Cpu, WeightDType};
use crate::loader::{self, Checkpoint, OutTensor};
use crate::models::{Batch, Bert, GenerateOptions, Gpt2, LoadOptions};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tessera_core::quant::{BlockQ4_0, BlockQ4_K, BlockQ8_0};

/// Identifies the checkpoints this version writes; a different marker means rewrite.
pub const MARKER: &str = "tessera-bench-model 1: SplitMix64 seed 0x7e55e7a, N(0, 0.02)";
/// The file holding the marker inside a checkpoint directory.
pub const MARKER_FILE: &str = "tessera-bench-model.txt";
/// Seed of the weight stream.
const WEIGHT_SEED: u64 = 0x07e5_5e7a;
/// Standard deviation of the random weights (Hugging Face's `initializer_range`).
const INIT_STD: f32 = 0.02;

/// Storage types of the GPT-2 rows.
pub const GPT2_DTYPES: [WeightDType; 4] = [
    WeightDType::F32,
    WeightDType::F16,
    WeightDType::Q8_0,
    WeightDType::Q4_0,
];
/// Storage types of the BERT rows.
pub const BERT_DTYPES: [WeightDType; 2] = [WeightDType::F32, WeightDType::Q8_0];

// ---------------------------------------------------------------------------------------
// Random checkpoints.

/// SplitMix64: a tiny deterministic generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `(0, 1]` (53 bits).
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fills `out` with N(0, std²) values (Box–Muller, two per pair of draws).
    pub fn fill_normal(&mut self, out: &mut [f32], std: f32) {
        let std = f64::from(std);
        for pair in out.chunks_mut(2) {
            let r = (-2.0 * self.unit().ln()).sqrt() * std;
            let (s, c) = (std::f64::consts::TAU * self.unit()).sin_cos();
            pair[0] = (r * c) as f32;
            if let Some(x) = pair.get_mut(1) {
                *x = (r * s) as f32;
            }
        }
    }

    /// A token id in `[1, vocab - 1)`: never 0 (BERT's padding) nor `vocab - 1` (GPT-2's
    /// end-of-sequence token).
    pub fn token(&mut self, vocab: usize) -> u32 {
        1 + (self.next_u64() % (vocab.max(3) as u64 - 2)) as u32
    }
}

/// How a tensor of a random checkpoint is initialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// N(0, 0.02²).
    Normal,
    /// All ones (layer-norm weights).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// A tensor of a random checkpoint: name, shape, initialization.
pub type TensorSpec = (String, Vec<usize>, Init);

/// The shape of a GPT-2 checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gpt2Spec {
    /// Short name in the shape column (`gpt2s`).
    pub tag: &'static str,
    /// `vocab_size`.
    pub vocab: usize,
    /// `n_embd`.
    pub hidden: usize,
    /// `n_layer`.
    pub layers: usize,
    /// `n_head`.
    pub heads: usize,
    /// `n_positions`.
    pub positions: usize,
}

/// GPT-2 small (124M).
pub const GPT2_SMALL: Gpt2Spec = Gpt2Spec {
    tag: "gpt2s",
    vocab: 50257,
    hidden: 768,
    layers: 12,
    heads: 12,
    positions: 1024,
};

impl Gpt2Spec {
    /// The MLP width (4 × hidden, `n_inner: null`).
    pub fn inner(&self) -> usize {
        4 * self.hidden
    }

    /// The end-of-sequence (and beginning) token: the last id.
    pub fn eos(&self) -> usize {
        self.vocab - 1
    }

    /// `config.json`, as `transformers` writes it for a `GPT2LMHeadModel`.
    pub fn config_json(&self) -> Value {
        json!({
            "activation_function": "gelu_new",
            "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1,
            "bos_token_id": self.eos(),
            "dtype": "float32",
            "embd_pdrop": 0.1,
            "eos_token_id": self.eos(),
            "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-5,
            "model_type": "gpt2",
            "n_ctx": self.positions,
            "n_embd": self.hidden,
            "n_head": self.heads,
            "n_inner": null,
            "n_layer": self.layers,
            "n_positions": self.positions,
            "reorder_and_upcast_attn": false,
            "resid_pdrop": 0.1,
            "scale_attn_by_inverse_layer_idx": false,
            "scale_attn_weights": true,
            "tie_word_embeddings": true,
            "use_cache": true,
            "vocab_size": self.vocab,
        })
    }

    /// Every tensor, named as `GPT2LMHeadModel.save_pretrained` names them (the tied
    /// `lm_head.weight` is not stored). `Conv1D` weights are `[in, out]`.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (h, i) = (self.hidden, self.inner());
        let t = |name: String, shape: &[usize], init| (name, shape.to_vec(), init);
        let mut v = vec![
            t(
                "transformer.wte.weight".into(),
                &[self.vocab, h],
                Init::Normal,
            ),
            t(
                "transformer.wpe.weight".into(),
                &[self.positions, h],
                Init::Normal,
            ),
        ];
        for l in 0..self.layers {
            let p = |s: &str| format!("transformer.h.{l}.{s}");
            v.extend([
                t(p("ln_1.weight"), &[h], Init::Ones),
                t(p("ln_1.bias"), &[h], Init::Zeros),
                t(p("attn.c_attn.weight"), &[h, 3 * h], Init::Normal),
                t(p("attn.c_attn.bias"), &[3 * h], Init::Zeros),
                t(p("attn.c_proj.weight"), &[h, h], Init::Normal),
                t(p("attn.c_proj.bias"), &[h], Init::Zeros),
                t(p("ln_2.weight"), &[h], Init::Ones),
                t(p("ln_2.bias"), &[h], Init::Zeros),
                t(p("mlp.c_fc.weight"), &[h, i], Init::Normal),
                t(p("mlp.c_fc.bias"), &[i], Init::Zeros),
                t(p("mlp.c_proj.weight"), &[i, h], Init::Normal),
                t(p("mlp.c_proj.bias"), &[h], Init::Zeros),
            ]);
        }
        v.push(t("transformer.ln_f.weight".into(), &[h], Init::Ones));
        v.push(t("transformer.ln_f.bias".into(), &[h], Init::Zeros));
        v
    }

    /// `(n, k)` of every matrix product of one token: each layer's QKV, attention output,
    /// MLP up and down projections, then the language-model head.
    pub fn linears(&self) -> Vec<(usize, usize)> {
        let (h, i) = (self.hidden, self.inner());
        let mut v = Vec::with_capacity(4 * self.layers + 1);
        for _ in 0..self.layers {
            v.extend([(3 * h, h), (h, h), (i, h), (h, i)]);
        }
        v.push((self.vocab, h));
        v
    }
}

/// The shape of a BERT checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertSpec {
    /// Short name in the shape column (`bertb`).
    pub tag: &'static str,
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
    pub positions: usize,
    /// `type_vocab_size`.
    pub type_vocab: usize,
}

/// BERT-base (110M).
pub const BERT_BASE: BertSpec = BertSpec {
    tag: "bertb",
    vocab: 30522,
    hidden: 768,
    layers: 12,
    heads: 12,
    intermediate: 3072,
    positions: 512,
    type_vocab: 2,
};

impl BertSpec {
    /// `config.json`, as `transformers` writes it for a `BertModel`.
    pub fn config_json(&self) -> Value {
        json!({
            "architectures": ["BertModel"],
            "attention_probs_dropout_prob": 0.1,
            "classifier_dropout": null,
            "dtype": "float32",
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": self.positions,
            "model_type": "bert",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            "type_vocab_size": self.type_vocab,
            "use_cache": true,
            "vocab_size": self.vocab,
        })
    }

    /// Every tensor, named as `BertModel.save_pretrained` names them.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (h, i) = (self.hidden, self.intermediate);
        let t = |name: String, shape: &[usize], init| (name, shape.to_vec(), init);
        let mut v = vec![
            t(
                "embeddings.word_embeddings.weight".into(),
                &[self.vocab, h],
                Init::Normal,
            ),
            t(
                "embeddings.position_embeddings.weight".into(),
                &[self.positions, h],
                Init::Normal,
            ),
            t(
                "embeddings.token_type_embeddings.weight".into(),
                &[self.type_vocab, h],
                Init::Normal,
            ),
            t("embeddings.LayerNorm.weight".into(), &[h], Init::Ones),
            t("embeddings.LayerNorm.bias".into(), &[h], Init::Zeros),
        ];
        for l in 0..self.layers {
            let p = |s: &str| format!("encoder.layer.{l}.{s}");
            for qkv in ["query", "key", "value"] {
                v.push(t(
                    p(&format!("attention.self.{qkv}.weight")),
                    &[h, h],
                    Init::Normal,
                ));
                v.push(t(
                    p(&format!("attention.self.{qkv}.bias")),
                    &[h],
                    Init::Zeros,
                ));
            }
            v.extend([
                t(p("attention.output.dense.weight"), &[h, h], Init::Normal),
                t(p("attention.output.dense.bias"), &[h], Init::Zeros),
                t(p("attention.output.LayerNorm.weight"), &[h], Init::Ones),
                t(p("attention.output.LayerNorm.bias"), &[h], Init::Zeros),
                t(p("intermediate.dense.weight"), &[i, h], Init::Normal),
                t(p("intermediate.dense.bias"), &[i], Init::Zeros),
                t(p("output.dense.weight"), &[h, i], Init::Normal),
                t(p("output.dense.bias"), &[h], Init::Zeros),
                t(p("output.LayerNorm.weight"), &[h], Init::Ones),
                t(p("output.LayerNorm.bias"), &[h], Init::Zeros),
            ]);
        }
        v.push(t("pooler.dense.weight".into(), &[h, h], Init::Normal));
        v.push(t("pooler.dense.bias".into(), &[h], Init::Zeros));
        v
    }

    /// `(n, k)` of every matrix product of one token through the encoder layers (QKV as one,
    /// attention output, up, down); the pooler runs once per sequence and is not listed.
    pub fn linears(&self) -> Vec<(usize, usize)> {
        let (h, i) = (self.hidden, self.intermediate);
        let mut v = Vec::with_capacity(4 * self.layers);
        for _ in 0..self.layers {
            v.extend([(3 * h, h), (h, h), (i, h), (h, i)]);
        }
        v
    }
}

/// Where the bench checkpoints live: `$CARGO_TARGET_DIR/bench-models`, else
/// `<workspace>/target/bench-models`.
pub fn models_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
    };
    target.join("bench-models")
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError(format!("{}: {e}", path.display()))
}

/// Writes `config.json`, `model.safetensors` (f32, `tensors` filled from one SplitMix64
/// stream in order) and the marker into `dir`, unless the three are there and the marker
/// matches. Returns whether it wrote.
pub fn ensure_checkpoint(dir: &Path, config: &Value, tensors: &[TensorSpec]) -> Result<bool> {
    let marker = format!("{MARKER}\n{config}\n");
    let marker_path = dir.join(MARKER_FILE);
    let complete = dir.join(loader::CONFIG_FILE).is_file()
        && dir.join(loader::WEIGHTS_FILE).is_file()
        && std::fs::read_to_string(&marker_path).is_ok_and(|m| m == marker);
    if complete {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    // The marker goes first and last: a half-written checkpoint never looks complete.
    let _ = std::fs::remove_file(&marker_path);
    let mut rng = SplitMix64::new(WEIGHT_SEED);
    let out: Vec<(String, OutTensor)> = tensors
        .iter()
        .map(|(name, shape, init)| {
            let len = shape.iter().product();
            let data = match init {
                Init::Normal => {
                    let mut v = vec![0f32; len];
                    rng.fill_normal(&mut v, INIT_STD);
                    v
                }
                Init::Ones => vec![1f32; len],
                Init::Zeros => vec![0f32; len],
            };
            let shape = shape.clone();
            (name.clone(), OutTensor::F32 { shape, data })
        })
        .collect();
    let weights = dir.join(loader::WEIGHTS_FILE);
    loader::save(&weights, &out).map_err(|e| BenchError(e.to_string()))?;
    drop(out);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io_error(&path, e))
    };
    let pretty = serde_json::to_string_pretty(config).expect("JSON serializes");
    write(loader::CONFIG_FILE, &(pretty + "\n"))?;
    write(MARKER_FILE, &marker)?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------
// Work.

/// Bytes of an `[n, k]` weight stored as `dtype` (after [`WeightDType::for_width`]).
pub fn weight_bytes(dtype: WeightDType, n: usize, k: usize) -> f64 {
    let nk = (n * k) as f64;
    let per_block = |len: usize, bytes: usize| nk / len as f64 * bytes as f64;
    match dtype.for_width(k) {
        WeightDType::F32 => 4.0 * nk,
        WeightDType::F16 | WeightDType::BF16 => 2.0 * nk,
        WeightDType::Q8_0 => per_block(32, size_of::<BlockQ8_0>()),
        WeightDType::Q4_0 => per_block(32, size_of::<BlockQ4_0>()),
        WeightDType::Q4_K => per_block(256, size_of::<BlockQ4_K>()),
    }
}

fn linear_flops_per_token(linears: &[(usize, usize)]) -> f64 {
    linears.iter().map(|&(n, k)| 2.0 * (n * k) as f64).sum()
}

fn linear_bytes(linears: &[(usize, usize)], dtype: WeightDType) -> f64 {
    linears
        .iter()
        .map(|&(n, k)| weight_bytes(dtype, n, k))
        .sum()
}

/// GPT-2 `forward` over `tokens` tokens: every linear layer and the head for every token,
/// `4·hidden` flops per causal (query, key) pair in every layer; the weight bytes.
pub fn prefill_work(spec: &Gpt2Spec, dtype: WeightDType, tokens: usize) -> Work {
    let lin = spec.linears();
    let t = tokens as f64;
    let pairs = t * (t + 1.0) / 2.0;
    Work {
        flops: t * linear_flops_per_token(&lin) + (spec.layers * 4 * spec.hidden) as f64 * pairs,
        bytes: linear_bytes(&lin, dtype),
    }
}

/// `steps` GPT-2 decode steps after a `prompt`-token prompt: step `i` runs one token through
/// every linear layer and the head and attends over `prompt + i + 1` cached positions; its
/// bytes are every weight plus those f32 keys and values in every layer.
pub fn decode_work(spec: &Gpt2Spec, dtype: WeightDType, prompt: usize, steps: usize) -> Work {
    let lin = spec.linears();
    let (flops_w, bytes_w) = (linear_flops_per_token(&lin), linear_bytes(&lin, dtype));
    let per_pos = (spec.layers * spec.hidden) as f64;
    let (mut flops, mut bytes) = (0.0, 0.0);
    for i in 0..steps {
        let ctx = (prompt + i + 1) as f64;
        flops += flops_w + 4.0 * per_pos * ctx;
        bytes += bytes_w + 2.0 * 4.0 * per_pos * ctx;
    }
    Work { flops, bytes }
}

/// BERT over `batch` sequences of `seq` tokens: every linear layer for every token,
/// `4·hidden` flops per (query, key) pair of a sequence in every layer, the pooler once per
/// sequence; the weight bytes (pooler included).
pub fn encode_work(spec: &BertSpec, dtype: WeightDType, batch: usize, seq: usize) -> Work {
    let lin = spec.linears();
    let (b, s, h) = (batch as f64, seq as f64, spec.hidden);
    Work {
        flops: b * s * linear_flops_per_token(&lin)
            + (spec.layers * 4 * h) as f64 * b * s * s
            + b * 2.0 * (h * h) as f64,
        bytes: linear_bytes(&lin, dtype) + weight_bytes(dtype, h, h),
    }
}

// ---------------------------------------------------------------------------------------
// The peer.

/// What a row runs (its kernel column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// GPT-2 forward over a prompt.
    Prefill,
    /// GPT-2 greedy decoding.
    Decode,
    /// BERT forward over a batch.
    Encode,
}

impl Task {
    /// The kernel column, and the peer script's `--task`.
    pub fn name(self) -> &'static str {
        match self {
            Task::Prefill => "prefill",
            Task::Decode => "decode",
            Task::Encode => "encode",
        }
    }
}

/// One measurement asked of the peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRequest {
    /// The checkpoint.
    pub model_dir: PathBuf,
    /// What to run.
    pub task: Task,
    /// Sequence length (decode: prompt length and new tokens).
    pub tokens: usize,
    /// Sequences.
    pub batch: usize,
    /// `torch.set_num_threads`.
    pub threads: usize,
    /// Timed repetitions.
    pub reps: usize,
    /// Untimed repetitions first.
    pub warmup: usize,
    /// The `batch × tokens` input ids.
    pub ids: Vec<u32>,
    /// Where the peer runs: `cpu` or `cuda`.
    pub device: &'static str,
    /// The type the peer loads the checkpoint's weights in (`f32`, `f16` or `bf16`).
    pub dtype: WeightDType,
}

impl PeerRequest {
    /// The request line of the peer's `--serve` protocol.
    pub fn to_json(&self) -> Value {
        json!({
            "model_dir": self.model_dir,
            "task": self.task.name(),
            "tokens": self.tokens,
            "batch": self.batch,
            "threads": self.threads,
            "reps": self.reps,
            "warmup": self.warmup,
            "ids": self.ids,
            "device": self.device,
            "dtype": self.dtype.name(),
        })
    }
}

/// The peer's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerResult {
    /// Median seconds of the work (decode: the decode steps).
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Decode: the new tokens of its last generation.
    pub generated: Option<Vec<u32>>,
    /// e.g. `transformers 5.23.0, torch 2.15.0, sdpa`.
    pub about: String,
}

impl PeerResult {
    /// Parses a response line of the peer script; `Err` holds the peer's error.
    pub fn parse(line: &str) -> std::result::Result<PeerResult, String> {
        let v: Value = serde_json::from_str(line.trim())
            .map_err(|e| format!("unreadable answer {:?}: {e}", clip(line)))?;
        if let Some(e) = v.get("error") {
            return Err(e.as_str().map_or_else(|| e.to_string(), str::to_string));
        }
        let num = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("answer without a positive {k:?}: {}", clip(line)))
        };
        let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        let generated = v.get("generated").and_then(Value::as_array).map(|a| {
            a.iter()
                .map(|x| x.as_u64().map_or(u32::MAX, |x| x as u32))
                .collect()
        });
        Ok(PeerResult {
            seconds: num("seconds")?,
            tokens_per_s: num("tokens_per_s")?,
            generated,
            about: format!(
                "transformers {}, torch {}, {}",
                text("transformers"),
                text("torch"),
                text("attn_implementation")
            ),
        })
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else {
        s.to_string()
    }
}

/// The peer script: in the source tree this binary was built from, else (a binary carried to
/// another machine, run from a copy of the repository) under the current directory.
pub fn peer_script() -> PathBuf {
    const SCRIPT: &str = "benches/peers/transformers_model.py";
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(SCRIPT);
    match std::env::current_dir() {
        Ok(cwd) if !built.is_file() && cwd.join(SCRIPT).is_file() => cwd.join(SCRIPT),
        _ => built,
    }
}

/// The pythons to try, in order; `None` when `TESSERA_PEER_PYTHON` turns the peer off.
fn python_candidates() -> Option<Vec<PathBuf>> {
    match std::env::var_os("TESSERA_PEER_PYTHON") {
        Some(p) if p.is_empty() || p == "none" => None,
        Some(p) => Some(vec![PathBuf::from(p)]),
        None => {
            let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixture-venv/bin/python");
            let mut v = Vec::new();
            if venv.is_file() {
                v.push(venv);
            }
            v.push(PathBuf::from("python3"));
            Some(v)
        }
    }
}

/// The running `--serve` process.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
}

impl Server {
    /// Starts `python script --serve` and waits for its ready line; `Err` when it exits
    /// first (e.g. no torch), with the end of its log.
    fn start(python: &Path, log: &Path) -> std::result::Result<Server, String> {
        let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(python)
            .arg("-u")
            .arg(peer_script())
            .arg("--serve")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut server = Server {
            child,
            stdin,
            stdout,
            log: log.to_path_buf(),
        };
        let mut line = String::new();
        match server.stdout.read_line(&mut line) {
            Ok(n) if n > 0 && line.contains("\"ready\"") => Ok(server),
            _ => Err(format!(
                "{} cannot run the peer: {}",
                python.display(),
                server.log_tail()
            )),
        }
    }

    /// The last line of the peer's stderr.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = text.lines().rev().find(|l| !l.trim().is_empty());
        last.map_or_else(|| "(no output)".to_string(), clip)
    }

    fn ask(&mut self, req: &PeerRequest) -> std::result::Result<PeerResult, String> {
        let stdin = self.stdin.as_mut().ok_or("the peer has exited")?;
        writeln!(stdin, "{}", req.to_json())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("the peer has exited ({e}): {}", self.log_tail()))?;
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(n) if n > 0 => PeerResult::parse(&line),
            _ => {
                self.stdin = None;
                Err(format!("the peer has exited: {}", self.log_tail()))
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // End of input ends the server; give it a moment, then make sure.
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Note of rows whose peer could not run because torch/transformers are missing.
pub const PEER_MISSING: &str = "transformers peer: not installed (run scripts/fixture-env)";

/// What a peer measurement is cached under: task, threads, device, weight type.
type PeerKey = (Task, usize, &'static str, WeightDType);

#[derive(Default)]
struct PeerState {
    /// `None`: not started yet.
    server: Option<std::result::Result<Server, String>>,
    results: HashMap<PeerKey, std::result::Result<PeerResult, String>>,
}

/// The `transformers` peer, shared by the rows of a run: starts its server on first use and
/// measures each (task, threads, device, weight type) once.
pub struct Peer {
    enabled: bool,
    state: Mutex<PeerState>,
}

impl Peer {
    /// The peer (off when `TESSERA_PEER_PYTHON=none`).
    pub fn new() -> Peer {
        Peer {
            enabled: python_candidates().is_some(),
            state: Mutex::new(PeerState::default()),
        }
    }

    /// A peer that never runs.
    pub fn disabled() -> Peer {
        Peer {
            enabled: false,
            state: Mutex::new(PeerState::default()),
        }
    }

    /// The measurement of `req` (cached per task, thread count, device and weight type);
    /// `Err` holds the note the row prints instead.
    pub fn measure(&self, req: &PeerRequest) -> std::result::Result<PeerResult, String> {
        if !self.enabled {
            return Err("transformers peer: off (TESSERA_PEER_PYTHON=none)".into());
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = (req.task, req.threads, req.device, req.dtype);
        if let Some(r) = st.results.get(&key) {
            return r.clone();
        }
        let server = st.server.get_or_insert_with(|| {
            let log = models_dir().join("peer.log");
            let mut why = Vec::new();
            for py in python_candidates().unwrap_or_default() {
                match Server::start(&py, &log) {
                    Ok(s) => return Ok(s),
                    Err(e) => why.push(e),
                }
            }
            let explicit = std::env::var_os("TESSERA_PEER_PYTHON").is_some();
            Err(if explicit {
                format!("transformers peer: {}", why.join("; "))
            } else {
                PEER_MISSING.to_string()
            })
        });
        let r = match server {
            Ok(s) => s
                .ask(req)
                .map_err(|e| format!("transformers peer failed: {e}")),
            Err(e) => Err(e.clone()),
        };
        st.results.insert(key, r.clone());
        r
    }
}

impl Default for Peer {
    fn default() -> Self {
        Peer::new()
    }
}

// ---------------------------------------------------------------------------------------
// Cases.

/// Token counts of the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    /// Prefill tokens.
    pub prefill: usize,
    /// Decode: prompt tokens, and new tokens measured.
    pub decode: usize,
    /// Encode: sequences.
    pub encode_batch: usize,
    /// Encode: tokens per sequence.
    pub encode_seq: usize,
}

impl Shapes {
    /// 128 tokens (decode 128 + 128, encode 8 × 128); `quick`: 32 (decode 32 + 32, encode
    /// 2 × 32).
    pub fn new(quick: bool) -> Shapes {
        if quick {
            Shapes {
                prefill: 32,
                decode: 32,
                encode_batch: 2,
                encode_seq: 32,
            }
        } else {
            Shapes {
                prefill: 128,
                decode: 128,
                encode_batch: 8,
                encode_seq: 128,
            }
        }
    }
}

/// What a run of the family uses: the checkpoints, their directories, the token counts and
/// the peer.
#[derive(Clone)]
pub struct Suite {
    /// GPT-2's shape.
    pub gpt2: Gpt2Spec,
    /// Its directory.
    pub gpt2_dir: PathBuf,
    /// BERT's shape.
    pub bert: BertSpec,
    /// Its directory.
    pub bert_dir: PathBuf,
    /// Token counts.
    pub shapes: Shapes,
    /// The peer.
    pub peer: Arc<Peer>,
}

impl Suite {
    /// GPT-2 small and BERT-base under [`models_dir`], the `transformers` peer.
    pub fn standard(quick: bool) -> Suite {
        let dir = models_dir();
        Suite {
            gpt2: GPT2_SMALL,
            gpt2_dir: dir.join("gpt2-small"),
            bert: BERT_BASE,
            bert_dir: dir.join("bert-base"),
            shapes: Shapes::new(quick),
            peer: Arc::new(Peer::new()),
        }
    }

    /// The shape column of `task`'s rows: `gpt2s-1x128` (prefill), `gpt2s-128+128` (decode:
    /// prompt + new tokens), `bertb-8x128` (encode: batch × sequence).
    pub fn shape(&self, task: Task) -> String {
        let sh = self.shapes;
        match task {
            Task::Prefill => format!("{}-1x{}", self.gpt2.tag, sh.prefill),
            Task::Decode => format!("{}-{}+{}", self.gpt2.tag, sh.decode, sh.decode),
            Task::Encode => format!("{}-{}x{}", self.bert.tag, sh.encode_batch, sh.encode_seq),
        }
    }
}

type Shared<M> = Arc<OnceLock<std::result::Result<M, BenchError>>>;

fn backend(threads: usize, ctx: &Ctx<'_>) -> Result<Cpu> {
    match ctx.config.isa {
        Some(isa) => Cpu::new(threads)
            .with_isa(isa)
            .map_err(|e| BenchError(e.to_string())),
        None => Ok(Cpu::new(threads)),
    }
}

pub(super) fn model_err(e: crate::Error) -> BenchError {
    BenchError(e.to_string())
}

/// GPT-2 of `spec` on `be` with its linear layers stored as `dtype`, from the checkpoint in
/// `dir` (written first if it is missing or stale).
pub(super) fn load_gpt2<B: Backend>(
    spec: &Gpt2Spec,
    dir: &Path,
    be: &B,
    dtype: WeightDType,
) -> Result<Gpt2<B>> {
    ensure_checkpoint(dir, &spec.config_json(), &spec.tensors())?;
    let ckpt = Checkpoint::open(dir).map_err(model_err)?;
    Gpt2::load(&ckpt, be, &LoadOptions { dtype }).map_err(model_err)
}

/// BERT of `spec` on `be`, as [`load_gpt2`].
pub(super) fn load_bert<B: Backend>(
    spec: &BertSpec,
    dir: &Path,
    be: &B,
    dtype: WeightDType,
) -> Result<Bert<B>> {
    ensure_checkpoint(dir, &spec.config_json(), &spec.tensors())?;
    let ckpt = Checkpoint::open(dir).map_err(model_err)?;
    Bert::load(&ckpt, be, &LoadOptions { dtype }).map_err(model_err)
}

/// `n` token ids of `vocab` from a fixed seed (see [`SplitMix64::token`]).
pub fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.token(vocab)).collect()
}

/// Timed repetitions the peer is asked for.
fn peer_reps(task: Task, quick: bool) -> usize {
    match (task, quick) {
        (Task::Prefill, false) => 5,
        (_, false) => 3,
        (Task::Prefill, true) => 2,
        (_, true) => 1,
    }
}

/// Puts a row on the roofline `bound` says, whatever the machine balance.
fn hold_to(row: &mut Row, bound: &str, ctx: &Ctx<'_>) {
    row.bound = bound.to_string();
    row.peak_fraction = if bound == "memory" {
        row.gbs / ctx.calibration.bandwidth_gbs(row.threads)
    } else {
        row.gflops / ctx.calibration.peak_gflops(row.threads)
    };
}

/// Builds the row: Tessera's time and tokens, the peer's when it ran (else its note).
#[allow(clippy::too_many_arguments)]
fn finish_row(
    id: &CaseId,
    ctx: &Ctx<'_>,
    work: Work,
    bound: &str,
    stats: Stats,
    seconds: f64,
    tokens: usize,
    peer: &std::result::Result<PeerResult, String>,
) -> Row {
    let peer_time = peer.as_ref().ok().map(|p| PeerTime {
        name: "transformers".into(),
        seconds: p.seconds,
    });
    let mut row = Row::new(
        id,
        ctx.config
            .isa
            .unwrap_or_else(tessera_cpu::Isa::detect)
            .name(),
        work,
        seconds,
        stats.reps,
        ctx.calibration,
        peer_time,
    );
    hold_to(&mut row, bound, ctx);
    row.tokens_per_s = Some(tokens as f64 / seconds);
    match peer {
        Ok(p) => {
            row.peer_tokens_per_s = Some(p.tokens_per_s);
            row.note = Some(format!("peer: {} (f32 weights)", p.about));
        }
        Err(note) => row.note = Some(note.clone()),
    }
    row
}

/// Times `f` (a forward pass): the first call checks that it succeeds and warms up, the
/// timed repetitions follow.
fn time_forward<T>(ctx: &Ctx<'_>, mut f: impl FnMut() -> crate::Result<T>) -> Result<Stats> {
    black_box(f().map_err(model_err)?);
    let timing = TimingConfig {
        warmup: 0,
        ..ctx.config.timing
    };
    Ok(measure(&timing, || {
        black_box(f().expect("the same call succeeded before timing"));
    }))
}

fn run_prefill(
    id: &CaseId,
    m: &Gpt2<Cpu>,
    s: &Suite,
    dtype: WeightDType,
    ctx: &Ctx<'_>,
) -> Result<Row> {
    let be = backend(id.threads, ctx)?;
    let n = s.shapes.prefill;
    let ids = token_ids(n, s.gpt2.vocab, 1);
    let batch = Batch::new(vec![ids.clone()]).map_err(model_err)?;
    let stats = time_forward(ctx, || m.forward(&be, &batch))?;
    let peer = s.peer.measure(&PeerRequest {
        model_dir: s.gpt2_dir.clone(),
        task: Task::Prefill,
        tokens: n,
        batch: 1,
        threads: id.threads,
        reps: peer_reps(Task::Prefill, ctx.config.quick),
        warmup: 1,
        ids,
        device: "cpu",
        dtype: WeightDType::F32,
    });
    let work = prefill_work(&s.gpt2, dtype, n);
    Ok(finish_row(
        id,
        ctx,
        work,
        "compute",
        stats,
        stats.median,
        n,
        &peer,
    ))
}

/// Decode timing: fewer repetitions than a kernel (each is two whole generations), a longer
/// cap.
fn decode_timing(t: &TimingConfig, quick: bool) -> TimingConfig {
    TimingConfig {
        warmup: 0,
        min_reps: if quick { 2 } else { t.min_reps.min(3) },
        max_time: t.max_time * 6,
        ..*t
    }
}

fn run_decode(
    id: &CaseId,
    m: &Gpt2<Cpu>,
    s: &Suite,
    dtype: WeightDType,
    ctx: &Ctx<'_>,
) -> Result<Row> {
    let be = backend(id.threads, ctx)?;
    let n = s.shapes.decode;
    let ids = token_ids(n, s.gpt2.vocab, 2);
    let timing = decode_timing(&ctx.config.timing, ctx.config.quick);
    let DecodeTime {
        stats,
        seconds,
        steps,
        generated,
    } = time_decode(id, m, &be, &ids, n, 1, &timing)?;
    let peer = s.peer.measure(&PeerRequest {
        model_dir: s.gpt2_dir.clone(),
        task: Task::Decode,
        tokens: n,
        batch: 1,
        threads: id.threads,
        reps: peer_reps(Task::Decode, ctx.config.quick),
        warmup: 1,
        ids,
        device: "cpu",
        dtype: WeightDType::F32,
    });
    let work = decode_work(&s.gpt2, dtype, n, n);
    let mut row = finish_row(id, ctx, work, "memory", stats, seconds, n, &peer);
    let mut notes: Vec<String> = row.note.take().into_iter().collect();
    // The peer ran with f32 weights: its tokens are comparable with the f32 rows'.
    let theirs = match (dtype, &peer) {
        (WeightDType::F32, Ok(p)) => p.generated.as_deref(),
        _ => None,
    };
    notes.extend(decode_notes(steps, n, &generated, theirs));
    row.note = Some(notes.join("; "));
    Ok(row)
}

/// A decode measurement (see [`time_decode`]).
pub(super) struct DecodeTime {
    /// The differences, seconds.
    pub stats: Stats,
    /// The median difference scaled to the `n` steps asked for.
    pub seconds: f64,
    /// Decode steps the long generation made (`n` unless it ended at the end-of-sequence
    /// token).
    pub steps: usize,
    /// The new tokens of the last long generation.
    pub generated: Vec<u32>,
}

/// Times `n` greedy decode steps of `m` after the prompt `ids`: `warmup` untimed
/// `generate(2)` calls (the first also checks that generation works), then repetitions until
/// `timing` says stop, each timing `generate` with `n + 1` and with 1 new tokens back to back;
/// the samples are the differences (prefill and the first token cancel out). `generate`
/// downloads every step's logits, so each call has finished on the device when it returns.
/// Random weights can end generation at the end-of-sequence token: then the steps made are
/// timed and scaled to `n` (an error if there were none).
pub(super) fn time_decode<B: Backend>(
    id: &CaseId,
    m: &Gpt2<B>,
    be: &B,
    ids: &[u32],
    n: usize,
    warmup: usize,
    timing: &TimingConfig,
) -> Result<DecodeTime> {
    let batch = Batch::new(vec![ids.to_vec()]).map_err(model_err)?;
    let long = GenerateOptions::new(n + 1);
    let short = GenerateOptions::new(1);
    // Checks and warms up (prefill, one decode step).
    for _ in 0..warmup.max(1) {
        m.generate(be, &batch, &GenerateOptions::new(2))
            .map_err(model_err)?;
    }
    let mut diffs = Vec::new();
    let start = Instant::now();
    let generated = loop {
        let t0 = Instant::now();
        let tokens = m.generate(be, &batch, &long).map_err(model_err)?.remove(0);
        let t1 = Instant::now();
        black_box(m.generate(be, &batch, &short).map_err(model_err)?);
        let t2 = Instant::now();
        diffs.push(((t1 - t0).as_secs_f64() - (t2 - t1).as_secs_f64()).max(0.0));
        if timing.should_stop(diffs.len(), start.elapsed()) {
            break tokens;
        }
    };
    let stats = Stats::from_samples(&diffs).expect("finite samples");
    let steps = generated.len().saturating_sub(1);
    if steps == 0 {
        return Err(BenchError(format!(
            "{}: generation ended at once (end-of-sequence token first)",
            id.name()
        )));
    }
    Ok(DecodeTime {
        stats,
        seconds: stats.median * n as f64 / steps as f64,
        steps,
        generated,
    })
}

/// The notes of a decode row: whether generation stopped early, and how many of the peer's
/// greedy tokens (`theirs`, when comparable) ours equal from the start.
pub(super) fn decode_notes(
    steps: usize,
    n: usize,
    generated: &[u32],
    theirs: Option<&[u32]>,
) -> Vec<String> {
    let mut notes = Vec::new();
    if steps < n {
        notes.push(format!(
            "generation stopped at the end-of-sequence token after {steps} of {n} steps: time scaled to {n}"
        ));
    }
    if let Some(theirs) = theirs {
        let same = generated
            .iter()
            .zip(theirs)
            .take_while(|(a, b)| a == b)
            .count();
        notes.push(format!(
            "greedy tokens equal to transformers': {same} of {}",
            theirs.len()
        ));
    }
    notes
}

fn run_encode(
    id: &CaseId,
    m: &Bert<Cpu>,
    s: &Suite,
    dtype: WeightDType,
    ctx: &Ctx<'_>,
) -> Result<Row> {
    let be = backend(id.threads, ctx)?;
    let (b, l) = (s.shapes.encode_batch, s.shapes.encode_seq);
    let ids = token_ids(b * l, s.bert.vocab, 3);
    let batch = Batch::new(ids.chunks(l).map(<[u32]>::to_vec).collect()).map_err(model_err)?;
    let stats = time_forward(ctx, || m.forward(&be, &batch))?;
    let peer = s.peer.measure(&PeerRequest {
        model_dir: s.bert_dir.clone(),
        task: Task::Encode,
        tokens: l,
        batch: b,
        threads: id.threads,
        reps: peer_reps(Task::Encode, ctx.config.quick),
        warmup: 1,
        ids,
        device: "cpu",
        dtype: WeightDType::F32,
    });
    let work = encode_work(&s.bert, dtype, b, l);
    Ok(finish_row(
        id,
        ctx,
        work,
        "compute",
        stats,
        stats.median,
        b * l,
        &peer,
    ))
}

fn case_id(kernel: Task, shape: String, dtype: WeightDType, threads: usize) -> CaseId {
    CaseId {
        family: "model",
        kernel: kernel.name().to_string(),
        shape,
        dtype: dtype.name().to_string(),
        layout: "hf".to_string(),
        threads,
    }
}

/// The family's cases for `suite`: GPT-2 (storage type × threads × prefill, decode), then
/// BERT (storage type × threads). Each model is loaded by the first of its rows that runs and
/// dropped after the last.
pub fn cases_for(cfg: &Config, suite: &Suite) -> Vec<Case> {
    let mut out = Vec::new();
    for dtype in GPT2_DTYPES {
        let model: Shared<Gpt2<Cpu>> = Arc::new(OnceLock::new());
        for &threads in &cfg.threads {
            for task in [Task::Prefill, Task::Decode] {
                let id = case_id(task, suite.shape(task), dtype, threads);
                let (case_id, model, s) = (id.clone(), Arc::clone(&model), suite.clone());
                let run: RunFn = Box::new(move |ctx| {
                    let m = model
                        .get_or_init(|| load_gpt2(&s.gpt2, &s.gpt2_dir, &Cpu::new(0), dtype))
                        .as_ref()
                        .map_err(Clone::clone)?;
                    match task {
                        Task::Decode => run_decode(&case_id, m, &s, dtype, ctx),
                        _ => run_prefill(&case_id, m, &s, dtype, ctx),
                    }
                });
                out.push(Case { id, run });
            }
        }
    }
    for dtype in BERT_DTYPES {
        let model: Shared<Bert<Cpu>> = Arc::new(OnceLock::new());
        for &threads in &cfg.threads {
            let id = case_id(Task::Encode, suite.shape(Task::Encode), dtype, threads);
            let (case_id, model, s) = (id.clone(), Arc::clone(&model), suite.clone());
            let run: RunFn = Box::new(move |ctx| {
                let m = model
                    .get_or_init(|| load_bert(&s.bert, &s.bert_dir, &Cpu::new(0), dtype))
                    .as_ref()
                    .map_err(Clone::clone)?;
                run_encode(&case_id, m, &s, dtype, ctx)
            });
            out.push(Case { id, run });
        }
    }
    out
}

/// The family's cases: GPT-2 small and BERT-base (see the [module docs](self)).
pub fn cases(cfg: &Config) -> Vec<Case> {
    cases_for(cfg, &Suite::standard(cfg.quick))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::calibrate::tests_support::fixed;

    /// A 2-layer GPT-2 of width 64 (the GPU family's host test uses it too).
    pub(crate) const TINY_GPT2: Gpt2Spec = Gpt2Spec {
        tag: "gpt2t",
        vocab: 300,
        hidden: 64,
        layers: 2,
        heads: 4,
        positions: 64,
    };

    /// A 2-layer BERT of width 64.
    pub(crate) const TINY_BERT: BertSpec = BertSpec {
        tag: "bertt",
        vocab: 200,
        hidden: 64,
        layers: 2,
        heads: 4,
        intermediate: 96,
        positions: 32,
        type_vocab: 2,
    };

    fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!(
            "tessera-bench-model-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn cfg(threads: Vec<usize>, quick: bool) -> Config {
        Config {
            threads,
            quick,
            filters: vec![],
            isa: None,
            timing: TimingConfig {
                warmup: 0,
                min_time: Duration::ZERO,
                min_reps: 2,
                max_reps: 2,
                max_time: Duration::from_secs(5),
            },
        }
    }

    fn tiny_suite(dir: &Path) -> Suite {
        Suite {
            gpt2: TINY_GPT2,
            gpt2_dir: dir.join("gpt2"),
            bert: TINY_BERT,
            bert_dir: dir.join("bert"),
            shapes: Shapes {
                prefill: 12,
                decode: 6,
                encode_batch: 3,
                encode_seq: 10,
            },
            peer: Arc::new(Peer::disabled()),
        }
    }

    #[test]
    fn normal_stream_is_deterministic_with_the_right_moments() {
        let mut a = vec![0f32; 100_001];
        SplitMix64::new(5).fill_normal(&mut a, 0.02);
        let mut b = vec![0f32; 100_001];
        SplitMix64::new(5).fill_normal(&mut b, 0.02);
        assert_eq!(a, b);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 3e-4, "{mean}");
        assert!((var.sqrt() / 0.02 - 1.0).abs() < 0.01, "{}", var.sqrt());
        assert!(a.iter().all(|x| x.is_finite()));
        let ids = token_ids(10_000, 50257, 1);
        assert!(ids.iter().all(|&t| (1..50256).contains(&t)));
        assert_eq!(ids, token_ids(10_000, 50257, 1));
    }

    #[test]
    fn standard_specs_have_the_published_sizes() {
        let count = |t: &[TensorSpec]| -> usize {
            t.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum()
        };
        // GPT-2 small: 124,439,808 parameters; BERT-base with pooler: 109,482,240.
        assert_eq!(count(&GPT2_SMALL.tensors()), 124_439_808);
        assert_eq!(count(&BERT_BASE.tensors()), 109_482_240);
        let lin: usize = GPT2_SMALL.linears().iter().map(|&(n, k)| n * k).sum();
        assert_eq!(lin, 84_934_656 + 50257 * 768);
        let c = GPT2_SMALL.config_json();
        assert_eq!(c["eos_token_id"], 50256);
        assert_eq!(c["activation_function"], "gelu_new");
        assert_eq!(BERT_BASE.config_json()["layer_norm_eps"], 1e-12);
        assert!(models_dir().ends_with("bench-models"));
    }

    #[test]
    fn work_counts() {
        let s = TINY_GPT2;
        let per_tok: f64 = s.linears().iter().map(|&(n, k)| 2.0 * (n * k) as f64).sum();
        let w = prefill_work(&s, WeightDType::F32, 4);
        let attn = (2 * 4 * 64) as f64 * 10.0; // 2 layers x 4·64 x (1+2+3+4) pairs
        assert_eq!(w.flops, 4.0 * per_tok + attn);
        let elems: usize = s.linears().iter().map(|&(n, k)| n * k).sum();
        assert_eq!(w.bytes, 4.0 * elems as f64);
        assert_eq!(
            prefill_work(&s, WeightDType::Q4_0, 4).bytes,
            elems as f64 / 32.0 * 18.0
        );
        assert_eq!(weight_bytes(WeightDType::Q8_0, 64, 64), 64.0 * 2.0 * 34.0);
        assert_eq!(weight_bytes(WeightDType::F16, 3, 5), 30.0);
        // k = 5 does not fit a block: stored f16.
        assert_eq!(weight_bytes(WeightDType::Q4_0, 3, 5), 30.0);
        // Two steps after a 3-token prompt attend 4 and 5 positions.
        let d = decode_work(&s, WeightDType::F16, 3, 2);
        let kv = |c: f64| 2.0 * 4.0 * (2 * 64) as f64 * c;
        assert_eq!(d.bytes, 2.0 * 2.0 * elems as f64 + kv(4.0) + kv(5.0));
        assert_eq!(d.flops, 2.0 * per_tok + 4.0 * 128.0 * 9.0);
        let b = TINY_BERT;
        let e = encode_work(&b, WeightDType::F32, 3, 10);
        let per_tok: f64 = b.linears().iter().map(|&(n, k)| 2.0 * (n * k) as f64).sum();
        let want = 30.0 * per_tok + (2 * 4 * 64) as f64 * 3.0 * 100.0 + 3.0 * 2.0 * 4096.0;
        assert_eq!(e.flops, want);
    }

    #[test]
    fn peer_answers_parse() {
        let ok = r#"{"seconds": 0.5, "tokens_per_s": 256.0, "reps": 3, "samples": [0.5],
            "torch": "2.15.0", "transformers": "5.23.0", "attn_implementation": "sdpa",
            "generated": [5, 7]}"#;
        let p = PeerResult::parse(&ok.replace('\n', " ")).unwrap();
        assert_eq!(p.seconds, 0.5);
        assert_eq!(p.tokens_per_s, 256.0);
        assert_eq!(p.generated, Some(vec![5, 7]));
        assert_eq!(p.about, "transformers 5.23.0, torch 2.15.0, sdpa");
        assert_eq!(
            PeerResult::parse(r#"{"error": "PeerError: boom"}"#),
            Err("PeerError: boom".into())
        );
        assert!(PeerResult::parse(r#"{"seconds": 0}"#).is_err());
        assert!(PeerResult::parse("Traceback").is_err());
        let req = PeerRequest {
            model_dir: "/m".into(),
            task: Task::Decode,
            tokens: 2,
            batch: 1,
            threads: 2,
            reps: 3,
            warmup: 1,
            ids: vec![4, 5],
            device: "cpu",
            dtype: WeightDType::F32,
        };
        let j = req.to_json();
        assert_eq!(j["task"], "decode");
        assert_eq!(j["warmup"], 1);
        assert_eq!(j["device"], "cpu");
        assert_eq!(j["dtype"], "f32");
        assert_eq!(j["ids"], json!([4, 5]));
        assert_eq!(j["model_dir"], "/m");
        let off = Peer::disabled().measure(&req).unwrap_err();
        assert!(off.contains("off"), "{off}");
    }

    #[test]
    fn case_names_and_counts() {
        let dir = temp_dir("names");
        let names: Vec<String> = cases_for(&cfg(vec![1, 2], false), &tiny_suite(&dir))
            .iter()
            .map(|c| c.id.name())
            .collect();
        assert_eq!(names.len(), 4 * 2 * 2 + 2 * 2);
        let std_names: Vec<String> = cases(&cfg(vec![1, 2], false))
            .iter()
            .map(|c| c.id.name())
            .collect();
        for want in [
            "model/prefill/gpt2s-1x128/f32/hf/t1",
            "model/decode/gpt2s-128+128/q4_0/hf/t2",
            "model/encode/bertb-8x128/q8_0/hf/t2",
        ] {
            assert!(std_names.iter().any(|n| n == want), "missing {want}");
        }
        let quick: Vec<String> = cases(&cfg(vec![1], true))
            .iter()
            .map(|c| c.id.name())
            .collect();
        assert!(quick.contains(&"model/decode/gpt2s-32+32/f16/hf/t1".to_string()));
        assert!(quick.contains(&"model/encode/bertb-2x32/f32/hf/t1".to_string()));
        // Nothing was written by listing cases.
        assert!(!dir.exists());
    }

    #[test]
    fn checkpoints_are_written_once_and_load() {
        let dir = temp_dir("ckpt");
        let spec = TINY_GPT2;
        assert!(ensure_checkpoint(&dir, &spec.config_json(), &spec.tensors()).unwrap());
        assert!(!ensure_checkpoint(&dir, &spec.config_json(), &spec.tensors()).unwrap());
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert_eq!(ckpt.len(), spec.tensors().len());
        let w = ckpt.tensor("transformer.h.1.attn.c_attn.weight").unwrap();
        w.expect_shape(&[64, 192]).unwrap();
        let ln = ckpt
            .tensor("transformer.ln_f.weight")
            .unwrap()
            .to_f32()
            .unwrap();
        assert!(ln.iter().all(|&x| x == 1.0));
        // A stale marker means a rewrite, with the same bytes.
        let before = std::fs::read(dir.join(loader::WEIGHTS_FILE)).unwrap();
        std::fs::write(dir.join(MARKER_FILE), "old").unwrap();
        assert!(ensure_checkpoint(&dir, &spec.config_json(), &spec.tensors()).unwrap());
        assert_eq!(
            std::fs::read(dir.join(loader::WEIGHTS_FILE)).unwrap(),
            before
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tiny_models_run_end_to_end() {
        let dir = temp_dir("e2e");
        let suite = tiny_suite(&dir);
        let c = cfg(vec![1, 2], true);
        let cal = fixed();
        let ctx = Ctx {
            config: &c,
            calibration: &cal,
        };
        let mut rows = Vec::new();
        for case in cases_for(&c, &suite) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(case.id.threads)
                .build()
                .unwrap();
            let run = case.run;
            rows.push(pool.install(|| run(&ctx)).unwrap());
        }
        assert_eq!(rows.len(), 20);
        for r in &rows {
            assert!(r.seconds > 0.0 && r.tokens_per_s.unwrap() > 0.0, "{r:?}");
            assert_eq!(r.peer_ratio, None);
            assert!(r.note.as_deref().unwrap().contains("off"), "{r:?}");
            let want = if r.kernel == "decode" {
                "memory"
            } else {
                "compute"
            };
            assert_eq!(r.bound, want);
        }
        let decode = rows.iter().find(|r| r.kernel == "decode").unwrap();
        assert!((decode.tokens_per_s.unwrap() * decode.seconds - 6.0).abs() < 1e-9);
        let encode = rows.iter().find(|r| r.kernel == "encode").unwrap();
        assert!((encode.tokens_per_s.unwrap() * encode.seconds - 30.0).abs() < 1e-9);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
