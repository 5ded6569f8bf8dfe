//! `tessera run`: load a Hugging Face checkpoint and run it on Tessera's kernels.

use crate::backend::{Backend, Cpu, KvDType, WeightDType};
use crate::loader::{Checkpoint, OutTensor, save};
use crate::models::{Batch, GenerateOptions, LoadOptions, Model, Output};
use crate::{Error, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Run a BERT, GPT-2 or T5 checkpoint (config.json + safetensors) on Tessera's kernels.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Checkpoint directory: config.json and model.safetensors (or a sharded
    /// model.safetensors.index.json), optionally tokenizer.json.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Token ids: comma-separated, one sequence per `;` (e.g. "1,2,3;4,5").
    #[arg(long, value_name = "IDS", conflicts_with = "text")]
    pub ids: Option<String>,
    /// Text to tokenize with DIR/tokenizer.json (repeat for a batch).
    #[arg(long, value_name = "TEXT")]
    pub text: Vec<String>,
    /// T5: decoder input ids (teacher forcing), one sequence per `;`.
    #[arg(long, value_name = "IDS")]
    pub decoder_ids: Option<String>,
    /// GPT-2 and T5: greedily generate up to N new tokens per sequence (KV cache).
    #[arg(long, value_name = "N")]
    pub generate: Option<usize>,
    /// BERT: `mean` adds `sentence_embedding` (mean over unpadded tokens, L2-normalized).
    #[arg(long, value_name = "MODE")]
    pub pooling: Option<String>,
    /// Weight storage: f32, f16, bf16, q8_0, q4_0, q4_k.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Key/value cache storage for generation: f32, f16, q8_0.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: String,
    /// Where the kernels run: `cpu`, or `cuda` (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub backend: String,
    /// Threads of the CPU backend [default: every core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Write the outputs (f32, Hugging Face names) and generated_ids (i64) to a safetensors
    /// file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

fn kv_dtype(s: &str) -> Result<KvDType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(KvDType::F32),
        "f16" => Ok(KvDType::F16),
        "q8_0" => Ok(KvDType::Q8_0),
        other => Err(Error::Invalid(format!(
            "unknown KV cache dtype {other:?} (known: f32, f16, q8_0)"
        ))),
    }
}

/// DIR/tokenizer.json with its padding and truncation turned off: a batch is padded by the
/// model (each sequence keeps its own length), and a sequence longer than the model's
/// position table is an error rather than silently cut (sentence-transformers, for one,
/// overrides the file's truncation length with its own).
pub fn tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Corrupt {
        path: path.clone(),
        what: format!("cannot load the tokenizer: {e}"),
    })?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| Error::Corrupt {
        path,
        what: format!("cannot turn truncation off: {e}"),
    })?;
    Ok(tok)
}

/// The input batch from `--ids` or `--text`.
fn input_batch(args: &RunArgs, dir: &Path) -> Result<Batch> {
    if let Some(ids) = &args.ids {
        return Batch::parse(ids);
    }
    if args.text.is_empty() {
        return Err(Error::Invalid("give --ids or --text".into()));
    }
    let tok = tokenizer(dir)?;
    let seqs = args
        .text
        .iter()
        .map(|t| {
            tok.encode(t.as_str(), true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Invalid(format!("cannot tokenize {t:?}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Batch::new(seqs)
}

/// What a run produced.
pub struct RunResult {
    /// Named f32 outputs.
    pub outputs: Vec<Output>,
    /// Generated tokens per sequence (when `--generate`).
    pub generated: Option<Vec<Vec<u32>>>,
    /// The padding id of `generated_ids` rows that stopped early.
    pub pad: i64,
}

/// Runs `model` on the batch as `args` say.
pub fn run_model<B: Backend>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    args: &RunArgs,
) -> Result<RunResult> {
    let mean = match args.pooling.as_deref() {
        None => false,
        Some("mean") => true,
        Some(p) => {
            return Err(Error::Invalid(format!(
                "unknown pooling {p:?} (known: mean)"
            )));
        }
    };
    if mean && !matches!(model, Model::Bert(_)) {
        return Err(Error::Invalid(
            "--pooling applies to BERT models only".into(),
        ));
    }
    let mut gen_opts = GenerateOptions::new(args.generate.unwrap_or(0));
    gen_opts.kv_dtype = kv_dtype(&args.kv_dtype)?;
    let (outputs, generated, pad) = match model {
        Model::Bert(m) => {
            if args.generate.is_some() || args.decoder_ids.is_some() {
                return Err(Error::Invalid(
                    "--generate and --decoder-ids do not apply to BERT".into(),
                ));
            }
            (m.outputs(be, batch, mean)?, None, i64::from(m.config.pad))
        }
        Model::Gpt2(m) => {
            if args.decoder_ids.is_some() {
                return Err(Error::Invalid("--decoder-ids applies to T5 only".into()));
            }
            let generated = match args.generate {
                Some(_) => Some(m.generate(be, batch, &gen_opts)?),
                None => None,
            };
            let pad = m.config.eos.map_or(-1, i64::from);
            (m.outputs(be, batch)?, generated, pad)
        }
        Model::T5(m) => {
            let decoder = match &args.decoder_ids {
                Some(ids) => Batch::parse(ids)?,
                None => Batch::new(vec![vec![m.config.decoder_start]; batch.len()])?,
            };
            let generated = match args.generate {
                Some(_) => Some(m.generate(be, batch, &gen_opts)?),
                None => None,
            };
            (
                m.outputs(be, batch, &decoder)?,
                generated,
                i64::from(m.config.pad),
            )
        }
    };
    Ok(RunResult {
        outputs,
        generated,
        pad,
    })
}

/// `tessera run`.
pub fn run(args: &RunArgs) -> Result<()> {
    match args.backend.as_str() {
        "cuda" => {
            if args.threads.is_some() {
                return Err(Error::Invalid(
                    "--threads applies to the cpu backend only".into(),
                ));
            }
            run_cuda(args)
        }
        _ => run_on(&Cpu::new(args.threads.unwrap_or(0)), args),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &RunArgs) -> Result<()> {
    let dev = tessera_cuda::Device::new(0)?;
    run_on(&crate::backend::Cuda::new(&dev), args)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &RunArgs) -> Result<()> {
    Err(Error::Unsupported(
        "this build has no CUDA backend: build it with `--features cuda` \
         (cargo run --release --features cuda -- run --backend cuda ...)"
            .into(),
    ))
}

/// `tessera run` on backend `be`.
fn run_on<B: Backend>(be: &B, args: &RunArgs) -> Result<()> {
    let dtype = WeightDType::parse(&args.dtype)?;
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(&args.model)?;
    let model = Model::load(&ckpt, be, &LoadOptions { dtype })?;
    let load_s = t0.elapsed().as_secs_f64();
    let batch = input_batch(args, &args.model)?;
    let t1 = Instant::now();
    let result = run_model(be, &model, &batch, args)?;
    let run_s = t1.elapsed().as_secs_f64();

    let tokens: usize = batch.lengths().iter().sum();
    println!(
        "{} on {} · weights {} · loaded in {load_s:.2} s",
        model.kind(),
        be.name(),
        dtype.name()
    );
    println!(
        "{} sequence(s), {tokens} tokens, ran in {:.3} s ({:.1} tokens/s)",
        batch.len(),
        run_s,
        tokens as f64 / run_s.max(1e-9)
    );
    for o in &result.outputs {
        println!("  {:<26} {:?}", o.name, o.shape);
    }
    if let Some(g) = &result.generated {
        let new: usize = g.iter().map(Vec::len).sum();
        println!("  generated {new} tokens");
        if args.out.is_none() {
            let tok = tokenizer(&args.model).ok();
            for (b, ids) in g.iter().enumerate() {
                match tok.as_ref().and_then(|t| t.decode(ids, true).ok()) {
                    Some(text) => println!("[{b}] {text}"),
                    None => println!("[{b}] {ids:?}"),
                }
            }
        }
    }
    if let Some(path) = &args.out {
        let mut tensors: Vec<(String, OutTensor)> = result
            .outputs
            .into_iter()
            .map(|o| {
                (
                    o.name.to_string(),
                    OutTensor::F32 {
                        shape: o.shape,
                        data: o.data,
                    },
                )
            })
            .collect();
        if let Some(g) = &result.generated {
            let n = g.iter().map(Vec::len).max().unwrap_or(0);
            let mut data = Vec::with_capacity(g.len() * n);
            for ids in g {
                data.extend(ids.iter().map(|&t| i64::from(t)));
                data.extend(std::iter::repeat_n(result.pad, n - ids.len()));
            }
            tensors.push((
                "generated_ids".into(),
                OutTensor::I64 {
                    shape: vec![g.len(), n],
                    data,
                },
            ));
        }
        save(path, &tensors)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
