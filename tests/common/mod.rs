//! What the end-to-end model tests share: the fixtures of `tests/fixtures/models`, their
//! `transformers` reference outputs, and the relative-error comparison.
#![allow(dead_code)] // each test crate uses its own subset

use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use tessera::backend::KvDType;
use tessera::backend::{Backend, WeightDType};
use tessera::loader::Checkpoint;
use tessera::models::{Batch, GenerateOptions, LoadOptions, Model, Output};

/// The repository: where this test was built, or the current directory when the binary was
/// carried to another machine (the GPU machines run binaries built here from the repository
/// root, `scripts/gpu-bundle`).
pub fn repo_root() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures/models").is_dir() {
        built.to_path_buf()
    } else {
        std::env::current_dir().expect("a current directory")
    }
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/models")
}

pub fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("tests/fixtures/models exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 6, "expected the six fixtures, found {dirs:?}");
    dirs
}

/// The reference file of a fixture.
pub struct Reference {
    pub bytes: Vec<u8>,
}

impl Reference {
    pub fn open(dir: &Path) -> Reference {
        Reference {
            bytes: std::fs::read(dir.join("reference.safetensors")).unwrap(),
        }
    }
    pub fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    pub fn has(&self, name: &str) -> bool {
        self.st().names().contains(&name)
    }
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }
    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        let v = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }
    /// The unpadded sequences of `ids` under `mask` (`[b, L]` each; no mask: all tokens).
    pub fn batch(&self, ids: &str, mask: Option<&str>) -> Batch {
        let (shape, ids) = self.i64(ids);
        let mask = mask.map(|m| self.i64(m).1);
        let l = shape[1];
        let seqs = (0..shape[0])
            .map(|b| {
                (0..l)
                    .filter(|&j| mask.as_ref().is_none_or(|m| m[b * l + j] != 0))
                    .map(|j| ids[b * l + j] as u32)
                    .collect()
            })
            .collect();
        Batch::new(seqs).unwrap()
    }
    /// Generated ids per sequence, the -1 padding removed.
    pub fn generated(&self) -> Vec<Vec<u32>> {
        let (shape, ids) = self.i64("generated_ids");
        ids.chunks_exact(shape[1])
            .map(|r| r.iter().filter(|&&t| t >= 0).map(|&t| t as u32).collect())
            .collect()
    }
}

pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Runs the fixture's forward pass on `be`.
pub fn outputs<B: Backend>(
    be: &B,
    dir: &Path,
    reference: &Reference,
    dtype: WeightDType,
) -> Vec<Output> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let model = Model::load(&ckpt, be, &LoadOptions { dtype }).unwrap();
    let batch = reference.batch("input_ids", Some("attention_mask"));
    match &model {
        Model::Bert(m) => m
            .outputs(be, &batch, reference.has("sentence_embedding"))
            .unwrap(),
        Model::Gpt2(m) => m.outputs(be, &batch).unwrap(),
        Model::T5(m) => {
            let dec = reference.batch("decoder_input_ids", None);
            m.outputs(be, &batch, &dec).unwrap()
        }
    }
}

/// Compares every output the reference has; returns the largest relative error.
pub fn compare(name: &str, ours: &[Output], reference: &Reference) -> f64 {
    let mut worst = 0.0f64;
    let mut compared = 0;
    for o in ours {
        if !reference.has(o.name) {
            continue;
        }
        let (shape, r) = reference.f32(o.name);
        assert_eq!(o.shape, shape, "{name}: {} shape", o.name);
        let e = rel_err(&o.data, &r);
        println!("{name}: {:<26} rel err {e:.3e}", o.name);
        worst = worst.max(e);
        compared += 1;
    }
    assert!(compared >= 2, "{name}: only {compared} outputs compared");
    worst
}

/// RMS relative error of one weight stored in `dtype`. Rounding to a float format with a
/// `p`-bit significand is a relative error uniform in ±2⁻ᵖ: RMS 2⁻ᵖ/√3 (f16 p = 11, bf16
/// p = 8). A block format rounds to a step `d = amax / q` (Q8_0: q = 127; Q4_0: 8; Q4_K's
/// sub-block steps are no coarser than Q4_0's) with an error uniform in ±d/2, RMS d/√12; for
/// Gaussian-like weights the largest |w| of a 32-weight block is ≈ 2.5σ, so the RMS relative
/// error is ≈ 2.5 / (q·√12).
pub fn weight_error(dtype: WeightDType) -> f64 {
    match dtype {
        WeightDType::F32 => 2f64.powi(-24) / 3f64.sqrt(),
        WeightDType::F16 => 2f64.powi(-11) / 3f64.sqrt(),
        WeightDType::BF16 => 2f64.powi(-8) / 3f64.sqrt(),
        WeightDType::Q8_0 => 2.5 / (127.0 * 12f64.sqrt()),
        WeightDType::Q4_0 | WeightDType::Q4_K => 2.5 / (8.0 * 12f64.sqrt()),
    }
}

/// The bound held by a whole model run with weights stored in `dtype`, relative to the f32
/// reference: the per-weight error of [`weight_error`] times an amplification κ ≤ 20 through
/// the layers, norms and head (measured on these fixtures: κ ≈ 4–10 for every format), and
/// never above 0.6 (past that the outputs would no longer be correlated with the reference's).
pub fn lossy_bound(dtype: WeightDType) -> f64 {
    (20.0 * weight_error(dtype)).min(0.6)
}

/// A batch as `tessera run --ids` takes it (`1,2,3;4,5`).
pub fn ids_arg(batch: &Batch) -> String {
    batch
        .seqs
        .iter()
        .map(|s| s.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join(";")
}

/// Greedy generation through the paged KV cache on `be` (named `label` in the messages) on
/// every fixture with `generated_ids`: the same ids as `transformers` with an f32 cache. An
/// f16 cache rounds K and V (relative 2⁻¹¹); with the fixtures' margins of ≥ 1e-3 between the
/// two best logits, ids may still flip near the end, so its result is reported, not required.
pub fn check_generation<B: Backend>(be: &B, label: &str) {
    let mut checked = 0;
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let reference = Reference::open(&dir);
        if !reference.has("generated_ids") {
            continue;
        }
        let expected = reference.generated();
        let n = reference.i64("generated_ids").0[1];
        let ckpt = Checkpoint::open(&dir).unwrap();
        let model = Model::load(&ckpt, be, &LoadOptions::default()).unwrap();
        let batch = reference.batch("input_ids", Some("attention_mask"));
        for kv in [KvDType::F32, KvDType::F16] {
            let mut opts = GenerateOptions::new(n);
            opts.kv_dtype = kv;
            opts.block_size = 4; // several blocks per sequence even for short prompts
            let got = match &model {
                Model::Gpt2(m) => m.generate(be, &batch, &opts).unwrap(),
                Model::T5(m) => m.generate(be, &batch, &opts).unwrap(),
                Model::Bert(_) => panic!("{name}: BERT fixture with generated_ids"),
            };
            if kv == KvDType::F32 {
                assert_eq!(got, expected, "{label} {name}: generated ids (f32 cache)");
            } else {
                let same = got == expected;
                println!("{label} {name}: f16 KV cache gives the same ids: {same}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} fixtures had generated ids");
}
