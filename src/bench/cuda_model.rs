//! The `model` family on the GPU: whole models on the CUDA backend against `transformers` on
//! the same GPU (see [`super::model`] for the CPU family it mirrors).
//!
//! # Rows
//! The checkpoints, token ids and work counts are the CPU family's ([`model::Suite`]: the
//! random GPT-2 small and BERT-base checkpoints under `bench-models/`, written on first use):
//!
//! * `model/prefill/gpt2s-1x128/f16` — GPT-2 `forward` over one sequence of 128 tokens
//!   (logits at every position), held to the tensor rate (cuBLAS f16 GEMM) with
//!   [`model::prefill_work`]'s flops;
//! * `model/decode/gpt2s-128+128/{f16,f32}` — greedy generation of 128 tokens after a
//!   128-token prompt through the paged f32 device KV cache, measured as on the CPU
//!   (`model::time_decode`: `generate(129)` minus `generate(1)`, the median of the
//!   differences), held to the device copy bandwidth with [`model::decode_work`]'s bytes
//!   (every weight and the head in its storage type, plus the f32 keys and values each step
//!   reads; an f32 weight is two f16 terms on this backend, 4 bytes, three f16 GEMMs);
//! * `model/encode/bertb-8x128/f16` — BERT `forward` (with the pooler) over 8 × 128 tokens,
//!   held to the tensor rate with [`model::encode_work`]'s flops.
//!
//! `--quick`: 32 tokens (decode 32 + 32, encode 2 × 32). The weights are f16 (the fast path)
//! in every row and f32 in the second decode row. Every row's layout column is `hf` and its
//! thread column 1 (one host thread drives the GPU); the line under it gives tokens per
//! second (prefill: prompt tokens, decode: new tokens, encode: batch × sequence).
//!
//! # Timing
//! The model API returns device tensors from `forward` and downloads the logits of every
//! step in `generate`, so rows are timed by the wall clock over whole calls: prefill and
//! encode time `forward` plus a stream synchronization (the first call, untimed, checks it
//! and pays for compiling the kernels; then warm-up calls and the median of the timed ones);
//! decode times `generate`, which has finished on the GPU when it returns. Each case loads
//! its model itself (a model borrows the device, which the harness passes to each case) and
//! frees it before its peer runs.
//!
//! # Peer
//! `benches/peers/transformers_model.py` in the CPU family's long-lived server
//! ([`model::Peer`]), asked for `device: cuda` and the row's weight type: `transformers` on
//! the same GPU with the checkpoint loaded in f16 (or f32), the same ids, each call bracketed
//! by `torch.cuda.synchronize()`, `torch.set_num_threads(1)`. The ratio column is its time
//! over Tessera's (above 1: Tessera is faster); decode rows also say how many greedy tokens
//! agree. Without torch, transformers or a CUDA device for them the row carries no ratio and
//! a note saying why; the run goes on.

use super::cuda::{GpuCalibration, GpuCase, GpuRun, id, row};
use super::model::{self, PeerRequest, PeerResult, Suite, Task};
use super::report::{CaseId, Row, Work};
use super::timing::{Stats, TimingConfig, measure};
use super::{BenchError, Result};
use crate::backend::{Backend, Cuda, WeightDType};
use crate::models::Batch;
use std::time::Duration;

/// The rows, in the order they run: what each runs and its weights' storage type.
const ROWS: [(Task, WeightDType); 4] = [
    (Task::Prefill, WeightDType::F16),
    (Task::Decode, WeightDType::F16),
    (Task::Decode, WeightDType::F32),
    (Task::Encode, WeightDType::F16),
];

/// The family's cases: GPT-2 small and BERT-base (see the [module docs](self)).
pub(super) fn cases(quick: bool) -> Vec<GpuCase> {
    cases_for(&Suite::standard(quick))
}

/// The cases for `suite` (its shapes; `quick` at run time sets the timing only). Listing
/// them writes nothing and starts no peer.
fn cases_for(suite: &Suite) -> Vec<GpuCase> {
    ROWS.iter()
        .map(|&(task, dtype)| {
            let case_id = case_id(suite, task, dtype);
            let (c2, s) = (case_id.clone(), suite.clone());
            let run: GpuRun = Box::new(move |dev, cal, quick| {
                let be = Cuda::new(dev);
                let sync = || dev.synchronize().map_err(BenchError::from);
                let target = Target {
                    be: &be,
                    sync: &sync,
                    arch: &dev.info().arch,
                    cal,
                    quick,
                };
                run_case(&target, &c2, &s, task, dtype)
            });
            GpuCase { id: case_id, run }
        })
        .collect()
}

fn case_id(suite: &Suite, task: Task, dtype: WeightDType) -> CaseId {
    id("model", task.name(), suite.shape(task), dtype.name(), "hf")
}

/// Timing of a `forward` (prefill, encode): a few milliseconds each on the GPU.
fn forward_timing(quick: bool) -> TimingConfig {
    if quick {
        TimingConfig {
            warmup: 2,
            min_time: Duration::from_millis(200),
            min_reps: 5,
            max_reps: 200,
            max_time: Duration::from_secs(5),
        }
    } else {
        TimingConfig {
            warmup: 5,
            min_time: Duration::from_secs(1),
            min_reps: 20,
            max_reps: 1000,
            max_time: Duration::from_secs(20),
        }
    }
}

/// Timing of decode: each repetition is two whole generations.
fn decode_timing(quick: bool) -> TimingConfig {
    if quick {
        TimingConfig {
            warmup: 0,
            min_time: Duration::ZERO,
            min_reps: 2,
            max_reps: 3,
            max_time: Duration::from_secs(20),
        }
    } else {
        TimingConfig {
            warmup: 0,
            min_time: Duration::from_secs(2),
            min_reps: 5,
            max_reps: 20,
            max_time: Duration::from_secs(60),
        }
    }
}

/// Untimed `generate(2)` calls before decode is timed (the first also compiles the kernels).
fn decode_warmup(quick: bool) -> usize {
    if quick { 1 } else { 2 }
}

/// `(reps, warmup)` the peer is asked for.
fn peer_reps(task: Task, quick: bool) -> (usize, usize) {
    match (task, quick) {
        (Task::Decode, false) => (5, 2),
        (Task::Decode, true) => (2, 1),
        (_, false) => (20, 5),
        (_, true) => (5, 2),
    }
}

/// The peer's request for `task` with `dtype` weights on the GPU over `ids`.
fn peer_request(
    s: &Suite,
    task: Task,
    dtype: WeightDType,
    ids: Vec<u32>,
    quick: bool,
) -> PeerRequest {
    let sh = s.shapes;
    let (model_dir, tokens, batch) = match task {
        Task::Prefill => (s.gpt2_dir.clone(), sh.prefill, 1),
        Task::Decode => (s.gpt2_dir.clone(), sh.decode, 1),
        Task::Encode => (s.bert_dir.clone(), sh.encode_seq, sh.encode_batch),
    };
    let (reps, warmup) = peer_reps(task, quick);
    PeerRequest {
        model_dir,
        task,
        tokens,
        batch,
        threads: 1,
        reps,
        warmup,
        ids,
        device: "cuda",
        dtype,
    }
}

/// Times `f` (a `forward`) with `sync` (waiting for the device) after each call: the first
/// call, untimed, checks that it succeeds; then `timing`. A failure during timing ends it as
/// an error.
fn time_forward<T>(
    sync: &dyn Fn() -> Result<()>,
    timing: &TimingConfig,
    mut f: impl FnMut() -> crate::Result<T>,
) -> Result<Stats> {
    let first = f().map_err(model::model_err)?;
    sync()?;
    drop(first);
    let mut failure: Option<BenchError> = None;
    let stats = measure(timing, || {
        if failure.is_some() {
            return;
        }
        let done = match f() {
            Ok(out) => {
                let synced = sync();
                drop(out);
                synced
            }
            Err(e) => Err(model::model_err(e)),
        };
        if let Err(e) = done {
            failure = Some(e);
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

/// The row: Tessera's time on the `bound` roofline of `cal` (`memory`: the copy bandwidth,
/// `compute`: the tensor rate), tokens per second, the peer's time and tokens per second when
/// it ran (else its note).
#[allow(clippy::too_many_arguments)]
fn finish(
    id: &CaseId,
    arch: &str,
    cal: &GpuCalibration,
    work: Work,
    bound: &str,
    (seconds, reps): (f64, usize),
    tokens: usize,
    dtype: WeightDType,
    peer: &std::result::Result<PeerResult, String>,
) -> Row {
    let peer_time = peer.as_ref().ok().map(|p| ("transformers", p.seconds));
    let mut r = row(
        id,
        arch,
        work.flops,
        work.bytes,
        (seconds, reps),
        cal,
        peer_time,
    );
    super::cuda::hold_to(&mut r, bound, cal);
    r.tokens_per_s = Some(tokens as f64 / seconds);
    match peer {
        Ok(p) => {
            r.peer_tokens_per_s = Some(p.tokens_per_s);
            r.note = Some(format!(
                "peer: {} ({} weights, cuda)",
                p.about,
                dtype.name()
            ));
        }
        Err(note) => r.note = Some(note.clone()),
    }
    r
}

/// Where a case runs: the backend, how to wait for its work, the isa column, the ceilings.
struct Target<'a, B> {
    be: &'a B,
    sync: &'a dyn Fn() -> Result<()>,
    arch: &'a str,
    cal: &'a GpuCalibration,
    quick: bool,
}

fn run_case<B: Backend>(
    t: &Target<'_, B>,
    id: &CaseId,
    s: &Suite,
    task: Task,
    dtype: WeightDType,
) -> Result<Row> {
    match task {
        Task::Prefill => run_prefill(t, id, s, dtype),
        Task::Decode => run_decode(t, id, s, dtype),
        Task::Encode => run_encode(t, id, s, dtype),
    }
}

fn run_prefill<B: Backend>(
    t: &Target<'_, B>,
    id: &CaseId,
    s: &Suite,
    dtype: WeightDType,
) -> Result<Row> {
    let n = s.shapes.prefill;
    let ids = model::token_ids(n, s.gpt2.vocab, 1);
    let batch = Batch::new(vec![ids.clone()]).map_err(model::model_err)?;
    let m = model::load_gpt2(&s.gpt2, &s.gpt2_dir, t.be, dtype)?;
    let timing = forward_timing(t.quick);
    let stats = time_forward(t.sync, &timing, || m.forward(t.be, &batch))?;
    drop(m);
    let req = peer_request(s, Task::Prefill, dtype, ids, t.quick);
    let peer = s.peer.measure(&req);
    let work = model::prefill_work(&s.gpt2, dtype, n);
    let timed = (stats.median, stats.reps);
    Ok(finish(
        id, t.arch, t.cal, work, "compute", timed, n, dtype, &peer,
    ))
}

fn run_decode<B: Backend>(
    t: &Target<'_, B>,
    id: &CaseId,
    s: &Suite,
    dtype: WeightDType,
) -> Result<Row> {
    let n = s.shapes.decode;
    let ids = model::token_ids(n, s.gpt2.vocab, 2);
    let m = model::load_gpt2(&s.gpt2, &s.gpt2_dir, t.be, dtype)?;
    let warmup = decode_warmup(t.quick);
    let timing = decode_timing(t.quick);
    let d = model::time_decode(id, &m, t.be, &ids, n, warmup, &timing)?;
    drop(m);
    let req = peer_request(s, Task::Decode, dtype, ids, t.quick);
    let peer = s.peer.measure(&req);
    let work = model::decode_work(&s.gpt2, dtype, n, n);
    let timed = (d.seconds, d.stats.reps);
    let mut r = finish(id, t.arch, t.cal, work, "memory", timed, n, dtype, &peer);
    let mut notes: Vec<String> = r.note.take().into_iter().collect();
    // The peer ran with the same weight type: its greedy tokens are the yardstick.
    let theirs = peer.as_ref().ok().and_then(|p| p.generated.as_deref());
    notes.extend(model::decode_notes(d.steps, n, &d.generated, theirs));
    r.note = Some(notes.join("; "));
    Ok(r)
}

fn run_encode<B: Backend>(
    t: &Target<'_, B>,
    id: &CaseId,
    s: &Suite,
    dtype: WeightDType,
) -> Result<Row> {
    let (b, l) = (s.shapes.encode_batch, s.shapes.encode_seq);
    let ids = model::token_ids(b * l, s.bert.vocab, 3);
    let seqs = ids.chunks(l).map(<[u32]>::to_vec).collect();
    let batch = Batch::new(seqs).map_err(model::model_err)?;
    let m = model::load_bert(&s.bert, &s.bert_dir, t.be, dtype)?;
    let timing = forward_timing(t.quick);
    let stats = time_forward(t.sync, &timing, || m.forward(t.be, &batch))?;
    drop(m);
    let req = peer_request(s, Task::Encode, dtype, ids, t.quick);
    let peer = s.peer.measure(&req);
    let work = model::encode_work(&s.bert, dtype, b, l);
    let timed = (stats.median, stats.reps);
    Ok(finish(
        id,
        t.arch,
        t.cal,
        work,
        "compute",
        timed,
        b * l,
        dtype,
        &peer,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::model::{BERT_BASE, GPT2_SMALL, Peer, Shapes};
    use std::path::PathBuf;
    use std::sync::Arc;

    fn names(cases: &[GpuCase]) -> Vec<String> {
        cases.iter().map(|c| c.id.name()).collect()
    }

    #[test]
    fn case_lists() {
        assert_eq!(
            names(&cases(false)),
            [
                "model/prefill/gpt2s-1x128/f16/hf/t1",
                "model/decode/gpt2s-128+128/f16/hf/t1",
                "model/decode/gpt2s-128+128/f32/hf/t1",
                "model/encode/bertb-8x128/f16/hf/t1",
            ]
        );
        assert_eq!(
            names(&cases(true)),
            [
                "model/prefill/gpt2s-1x32/f16/hf/t1",
                "model/decode/gpt2s-32+32/f16/hf/t1",
                "model/decode/gpt2s-32+32/f32/hf/t1",
                "model/encode/bertb-2x32/f16/hf/t1",
            ]
        );
        // Listing writes no checkpoint.
        let dir = std::env::temp_dir().join(format!("tessera-cuda-model-{}", std::process::id()));
        let suite = Suite {
            gpt2_dir: dir.join("gpt2"),
            bert_dir: dir.join("bert"),
            peer: Arc::new(Peer::disabled()),
            ..Suite::standard(true)
        };
        assert_eq!(cases_for(&suite).len(), ROWS.len());
        assert!(!dir.exists());
    }

    fn suite(quick: bool) -> Suite {
        Suite {
            gpt2: GPT2_SMALL,
            gpt2_dir: PathBuf::from("/m/gpt2"),
            bert: BERT_BASE,
            bert_dir: PathBuf::from("/m/bert"),
            shapes: Shapes::new(quick),
            peer: Arc::new(Peer::disabled()),
        }
    }

    #[test]
    fn peer_requests_run_on_cuda_with_the_rows_dtype() {
        let s = suite(false);
        let d = peer_request(&s, Task::Decode, WeightDType::F32, vec![7; 128], false);
        let j = d.to_json();
        assert_eq!(j["device"], "cuda");
        assert_eq!(j["dtype"], "f32");
        assert_eq!(j["task"], "decode");
        assert_eq!(j["model_dir"], "/m/gpt2");
        assert_eq!(j["tokens"], 128);
        assert_eq!(j["batch"], 1);
        assert_eq!(j["threads"], 1);
        assert_eq!(j["reps"], 5);
        assert_eq!(j["warmup"], 2);
        assert_eq!(j["ids"].as_array().unwrap().len(), 128);

        let p = peer_request(&s, Task::Prefill, WeightDType::F16, vec![1; 128], false);
        let j = p.to_json();
        assert_eq!(j["device"], "cuda");
        assert_eq!(j["dtype"], "f16");
        assert_eq!(j["tokens"], 128);
        assert_eq!(j["reps"], 20);
        assert_eq!(j["warmup"], 5);

        let q = suite(true);
        let e = peer_request(&q, Task::Encode, WeightDType::F16, vec![1; 64], true);
        let j = e.to_json();
        assert_eq!(j["task"], "encode");
        assert_eq!(j["model_dir"], "/m/bert");
        assert_eq!(j["tokens"], 32);
        assert_eq!(j["batch"], 2);
        assert_eq!(j["reps"], 5);
        assert_eq!(j["warmup"], 2);
        assert_eq!(j["dtype"], "f16");
        // The peer caches per device and dtype: the CPU family's f32 rows and these differ.
        let off = q.peer.measure(&e).unwrap_err();
        assert!(off.contains("off"), "{off}");
    }

    #[test]
    fn rows_are_held_to_the_bound_they_name() {
        let cal = GpuCalibration {
            copy_gbs: 4000.0,
            tensor_gflops: 800_000.0,
            tensor_size: 8192,
        };
        let id = case_id(&suite(false), Task::Decode, WeightDType::F16);
        let work = Work {
            flops: 1e9,
            bytes: 2e10,
        };
        let peer = Ok(PeerResult {
            seconds: 1.0,
            tokens_per_s: 128.0,
            generated: None,
            about: "transformers 5.0.0, torch 2.11.0, sdpa".into(),
        });
        let r = finish(
            &id,
            "sm_90a",
            &cal,
            work,
            "memory",
            (0.5, 7),
            128,
            WeightDType::F16,
            &peer,
        );
        assert_eq!(r.bound, "memory");
        assert_eq!((r.seconds, r.reps, r.threads), (0.5, 7, 1));
        assert!((r.gbs - 40.0).abs() < 1e-9);
        assert!((r.peak_fraction - 0.01).abs() < 1e-12);
        assert_eq!(r.peer.as_deref(), Some("transformers"));
        assert_eq!(r.peer_ratio, Some(2.0));
        assert_eq!(r.tokens_per_s, Some(256.0));
        assert_eq!(r.peer_tokens_per_s, Some(128.0));
        assert_eq!(r.isa, "sm_90a");
        assert!(r.note.as_deref().unwrap().contains("(f16 weights, cuda)"));

        let none = Err("transformers peer: not installed".to_string());
        let r = finish(
            &id,
            "sm_90a",
            &cal,
            work,
            "compute",
            (0.5, 7),
            128,
            WeightDType::F16,
            &none,
        );
        assert_eq!(r.bound, "compute");
        assert!((r.peak_fraction - 2.0 / 800_000.0).abs() < 1e-15);
        assert_eq!((r.peer_ratio, r.peer_tokens_per_s), (None, None));
        assert_eq!(r.note.as_deref(), Some("transformers peer: not installed"));
    }

    /// The GPU rows' code path on the CPU backend with tiny checkpoints: every row measures,
    /// and says why it has no peer.
    #[test]
    fn tiny_models_run_on_the_cpu_backend() {
        use crate::bench::model::tests::{TINY_BERT, TINY_GPT2};
        let dir =
            std::env::temp_dir().join(format!("tessera-cuda-model-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let suite = Suite {
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
        };
        let cal = GpuCalibration {
            copy_gbs: 100.0,
            tensor_gflops: 1000.0,
            tensor_size: 1024,
        };
        let be = crate::backend::Cpu::new(1);
        let synced = std::cell::Cell::new(0usize);
        let sync = || {
            synced.set(synced.get() + 1);
            Ok(())
        };
        let target = Target {
            be: &be,
            sync: &sync,
            arch: "cpu",
            cal: &cal,
            quick: true,
        };
        let mut rows = Vec::new();
        for (task, dtype) in ROWS {
            let id = case_id(&suite, task, dtype);
            let r = run_case(&target, &id, &suite, task, dtype).unwrap();
            assert_eq!(
                format!(
                    "{}/{}/{}/{}/{}/t{}",
                    r.family, r.kernel, r.shape, r.dtype, r.layout, r.threads
                ),
                id.name()
            );
            assert!(r.seconds > 0.0 && r.reps >= 2, "{r:?}");
            assert_eq!(r.peer_ratio, None);
            assert!(r.note.as_deref().unwrap().contains("off"), "{r:?}");
            let want = if task == Task::Decode {
                "memory"
            } else {
                "compute"
            };
            assert_eq!(r.bound, want);
            rows.push(r);
        }
        // Both forward rows synchronized after every call (first check, warm-up, timed).
        let forward_calls: usize = rows
            .iter()
            .filter(|r| r.kernel != "decode")
            .map(|r| 1 + forward_timing(true).warmup + r.reps)
            .sum();
        assert_eq!(synced.get(), forward_calls);
        let decode = &rows[1];
        assert!((decode.tokens_per_s.unwrap() * decode.seconds - 6.0).abs() < 1e-9);
        let encode = &rows[3];
        assert!((encode.tokens_per_s.unwrap() * encode.seconds - 30.0).abs() < 1e-9);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn timings_are_bounded() {
        for quick in [false, true] {
            let f = forward_timing(quick);
            let d = decode_timing(quick);
            assert!(f.warmup >= 1 && f.min_reps >= 3 && f.max_reps >= f.min_reps);
            assert!(d.min_reps >= 2 && d.max_reps >= d.min_reps && d.max_time > d.min_time);
            assert!(decode_warmup(quick) >= 1);
        }
    }
}
