//! End to end on the GPU: the BERT, GPT-2 and T5 fixtures of `tests/models.rs` on the CUDA
//! backend (`--features cuda`), against the same `transformers` references.
//!
//! * f32 checkpoints: every output within [`F16_COMPUTE_TOL`] (1e-3 relative). Attention runs
//!   on f16 Q/K/V, and the linears on the split f16 weights of [`tessera::backend::Cuda`].
//! * f16, bf16 and quantized weights: what the GPU adds to the CPU's run with the same weights
//!   is the rounding of the activations that enter its tensor cores (bf16 for bf16 weights,
//!   f16 otherwise: [`activation_type`]). So each output is within [`common::lossy_bound`] of
//!   that type of the CPU backend's output, and within the sum of the weight type's and the
//!   activation type's bounds of the `transformers` reference.
//! * Greedy generation through the paged device KV cache: the same ids as `transformers` with
//!   f32 storage (f16 storage is run and reported, as on the CPU).
//! * `tessera run --backend cuda` writes outputs that match.
//!
//! Without a GPU every test prints one line saying why and passes as skipped
//! ([`tessera_cuda::test_device`]); the CLI test then checks that the command fails with that
//! reason instead of panicking.

mod common;

use common::{Reference, compare, fixture_dirs, fixtures, lossy_bound, rel_err};
use tessera::backend::{Cpu, Cuda, WeightDType};
use tessera_cuda::test_device;

/// The bound for f32 checkpoints computed in f16 on the GPU.
const F16_COMPUTE_TOL: f64 = 1e-3;

fn gpu() -> Option<Cuda<'static>> {
    test_device().map(Cuda::new)
}

fn name_of(dir: &std::path::Path) -> String {
    dir.file_name().unwrap().to_string_lossy().to_string()
}

#[test]
fn f32_checkpoints_match_transformers() {
    let Some(be) = gpu() else { return };
    for dir in fixture_dirs() {
        let name = name_of(&dir);
        let reference = Reference::open(&dir);
        let ours = common::outputs(&be, &dir, &reference, WeightDType::F32);
        let worst = compare(&format!("cuda {name}"), &ours, &reference);
        assert!(
            worst <= F16_COMPUTE_TOL,
            "cuda {name}: relative error {worst:.3e} > {F16_COMPUTE_TOL:e}"
        );
    }
}

/// The type the CUDA backend rounds a linear layer's f32 input to for weights of `dtype`:
/// bf16 for bf16 weights; f16 for f16 weights, for the quantized GEMM (prefill) and for the
/// attention inputs.
fn activation_type(dtype: WeightDType) -> WeightDType {
    match dtype {
        WeightDType::BF16 => WeightDType::BF16,
        _ => WeightDType::F16,
    }
}

#[test]
fn reduced_precision_and_quantized_weights_match_the_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = Cpu::default();
    for dir in fixture_dirs() {
        let name = name_of(&dir);
        let reference = Reference::open(&dir);
        for dtype in [
            WeightDType::F16,
            WeightDType::BF16,
            WeightDType::Q8_0,
            WeightDType::Q4_0,
            WeightDType::Q4_K,
        ] {
            let label = format!("cuda {name} {}", dtype.name());
            let act = lossy_bound(activation_type(dtype));
            let ours = common::outputs(&be, &dir, &reference, dtype);
            let worst = compare(&label, &ours, &reference);
            let bound = lossy_bound(dtype) + act;
            assert!(worst <= bound, "{label}: {worst:.3e} > {bound:.3e}");
            let theirs = common::outputs(&cpu, &dir, &reference, dtype);
            for (o, c) in ours.iter().zip(&theirs) {
                assert_eq!(o.name, c.name);
                let e = rel_err(&o.data, &c.data);
                println!("{label}: {:<26} vs cpu {e:.3e} (bound {act:.3e})", o.name);
                assert!(
                    e <= act,
                    "{label}: {} differs from the CPU's by {e:.3e} > {act:.3e}",
                    o.name
                );
            }
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let Some(be) = gpu() else { return };
    common::check_generation(&be, "cuda");
}

/// `tessera run --backend cuda`: with a GPU, the written logits and ids match the reference;
/// without one, the command fails with the reason (a clean error, not a panic).
#[test]
fn cli_run_on_cuda() {
    let dir = fixtures().join("gpt2-a");
    let reference = Reference::open(&dir);
    let batch = reference.batch("input_ids", Some("attention_mask"));
    let ids = common::ids_arg(&batch);
    let n = reference.i64("generated_ids").0[1];
    let out = std::env::temp_dir().join(format!(
        "tessera-cli-cuda-{}.safetensors",
        std::process::id()
    ));
    // A carried test binary finds the carried `tessera` through TESSERA_BIN.
    let bin = std::env::var_os("TESSERA_BIN").map_or_else(
        || env!("CARGO_BIN_EXE_tessera").into(),
        std::path::PathBuf::from,
    );
    let result = std::process::Command::new(bin)
        .args(["run", "--backend", "cuda", "--model"])
        .arg(&dir)
        .args(["--ids", &ids, "--generate", &n.to_string(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    if test_device().is_none() {
        assert!(!result.status.success(), "ran without a GPU?");
        assert!(
            stderr.contains("cuda:") && !stderr.contains("panicked"),
            "expected a CUDA error, got: {stderr}"
        );
        return;
    }
    assert!(result.status.success(), "tessera run failed: {stderr}");
    let written = Reference {
        bytes: std::fs::read(&out).unwrap(),
    };
    std::fs::remove_file(&out).ok();
    let (shape, logits) = written.f32("logits");
    let (rshape, rlogits) = reference.f32("logits");
    assert_eq!(shape, rshape);
    let e = rel_err(&logits, &rlogits);
    assert!(e <= F16_COMPUTE_TOL, "logits: relative error {e:.3e}");
    assert_eq!(written.generated(), reference.generated());
}
