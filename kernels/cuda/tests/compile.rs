//! Every kernel source compiles with NVRTC for each architecture Tessera targets. Needs only
//! `libnvrtc` (no GPU): `scripts/cuda-check --env` installs it from PyPI and prints the
//! exports; without it the test prints why and passes as skipped, unless
//! `TESSERA_REQUIRE_NVRTC=1` (set by `scripts/test`, which installs NVRTC) makes that a failure.

use tessera_cuda::compile::{self, Family};

fn skip(reason: &str) {
    assert!(
        std::env::var("TESSERA_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "TESSERA_REQUIRE_NVRTC=1 but {reason}"
    );
    eprintln!("tessera-cuda: skipping the NVRTC compile test: {reason}");
}

#[test]
fn every_family_compiles_for_sm80_and_sm90a() {
    if !compile::nvrtc_available() {
        skip("libnvrtc.so not found");
        return;
    }
    if compile::include_dirs().is_empty() {
        skip("no cuda_fp16.h found (set CUDA_INCLUDE_DIR)");
        return;
    }
    for arch in ["sm_80", "sm_90a"] {
        for family in Family::ALL {
            let c = compile::compile(family, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                c.cubin.len() > 64 && c.cubin.starts_with(b"\x7fELF"),
                "{} for {arch}: not an ELF cubin ({} bytes)",
                family.file(),
                c.cubin.len()
            );
            assert!(
                !c.log.contains("warning"),
                "{} for {arch} compiled with warnings:\n{}",
                family.file(),
                c.log
            );
        }
    }
}

#[test]
fn compile_errors_name_the_architecture() {
    if !compile::nvrtc_available() {
        skip("libnvrtc.so not found");
        return;
    }
    // A virtual architecture yields PTX, not a cubin: refused with a clear error.
    let err = compile::compile(Family::Util, "compute_80").unwrap_err();
    assert!(err.to_string().contains("compute_80"), "{err}");
}

#[test]
fn arch_mapping() {
    assert_eq!(compile::arch_for(9, 0).unwrap(), "sm_90a");
    assert_eq!(compile::arch_for(8, 6).unwrap(), "sm_86");
    assert_eq!(compile::arch_for(8, 0).unwrap(), "sm_80");
    assert!(compile::arch_for(7, 5).is_err());
}

#[test]
fn includes_are_spliced() {
    for family in Family::ALL {
        let src = compile::expanded_source(family);
        assert!(
            !src.contains("#include \"common.cuh\""),
            "{}",
            family.file()
        );
        assert!(src.contains("tessera_warp_sum"), "{}", family.file());
    }
}
