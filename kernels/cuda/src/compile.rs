//! Run-time compilation of the kernel sources in `cuda/` with NVRTC.
//!
//! The sources are embedded in the crate (`include_str!`), so a binary built here runs on a
//! GPU machine with no copy of the repository. Each family is one translation unit; the shared
//! header `cuda/common.cuh` is spliced in where a source includes it (NVRTC has no file system
//! view of the repository). The result is a cubin for the device's exact architecture
//! (`sm_90a` on Hopper, so the `wgmma` path is compiled; `sm_80`/`sm_86`/`sm_89` on Ampere and
//! Ada), cached per process and architecture.

use crate::{Error, Result};
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char};
use std::sync::{Arc, Mutex, OnceLock};

/// An operation family: one `.cu` file under `cuda/`, one compiled module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Family {
    /// `cuda/gemm.cu`: f16/bf16 tensor-core GEMM.
    Gemm,
    /// `cuda/quant.cu`: GEMV and GEMM on Q8_0, Q4_0 and Q4_K blocks.
    Quant,
    /// `cuda/ops.cu`: norms, softmax, activations, embedding gather, residual add.
    Ops,
    /// `cuda/attention.cu`: fused flash-style attention.
    Attention,
    /// `cuda/kv_cache.cu`: paged KV cache append and decode attention.
    KvCache,
    /// `cuda/util.cu`: buffer fills (test poisoning) and the copy kernel the bench calibrates with.
    Util,
}

const COMMON: &str = include_str!("../../../cuda/common.cuh");

impl Family {
    /// Every family, in file order.
    pub const ALL: [Family; 6] = [
        Family::Gemm,
        Family::Quant,
        Family::Ops,
        Family::Attention,
        Family::KvCache,
        Family::Util,
    ];

    /// The source file's name under `cuda/`.
    pub fn file(self) -> &'static str {
        match self {
            Family::Gemm => "gemm.cu",
            Family::Quant => "quant.cu",
            Family::Ops => "ops.cu",
            Family::Attention => "attention.cu",
            Family::KvCache => "kv_cache.cu",
            Family::Util => "util.cu",
        }
    }

    /// The embedded source text, as in the repository.
    pub fn source(self) -> &'static str {
        match self {
            Family::Gemm => include_str!("../../../cuda/gemm.cu"),
            Family::Quant => include_str!("../../../cuda/quant.cu"),
            Family::Ops => include_str!("../../../cuda/ops.cu"),
            Family::Attention => include_str!("../../../cuda/attention.cu"),
            Family::KvCache => include_str!("../../../cuda/kv_cache.cu"),
            Family::Util => include_str!("../../../cuda/util.cu"),
        }
    }
}

/// The source with `#include "common.cuh"` replaced by the header's text.
pub fn expanded_source(family: Family) -> String {
    let mut out = String::with_capacity(family.source().len() + COMMON.len());
    for line in family.source().lines() {
        if line.trim() == "#include \"common.cuh\"" {
            out.push_str(COMMON);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The NVRTC target for a compute capability: `sm_90a` for 9.0 (Hopper's `wgmma` and the
/// bulk tensor copy need the `a` target), `sm_XY` otherwise; before 8.0 (no bf16 `mma.sync`)
/// the device is not supported.
pub fn arch_for(major: i32, minor: i32) -> Result<String> {
    match (major, minor) {
        (9, 0) => Ok("sm_90a".into()),
        (m, n) if m >= 8 && (0..10).contains(&n) => Ok(format!("sm_{m}{n}")),
        (m, n) => Err(Error::Unavailable(format!(
            "compute capability {m}.{n}: Tessera's CUDA kernels need 8.0 or newer"
        ))),
    }
}

/// Where `cuda_fp16.h` and `cuda_bf16.h` are looked for: `CUDA_INCLUDE_DIR`, then
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`.
pub fn include_dirs() -> Vec<String> {
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("CUDA_INCLUDE_DIR") {
        dirs.push(d);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(d) = std::env::var(var) {
            dirs.push(format!("{d}/include"));
        }
    }
    dirs.push("/usr/local/cuda/include".into());
    dirs.retain(|d| std::path::Path::new(d).join("cuda_fp16.h").exists());
    dirs
}

/// Whether NVRTC can be loaded in this process (checked without panicking: cudarc's loader
/// panics on a missing library).
pub fn nvrtc_available() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the library by its known names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// A compiled module: the cubin for one family and architecture.
#[derive(Debug)]
pub struct Compiled {
    /// The family compiled.
    pub family: Family,
    /// The architecture it was compiled for.
    pub arch: String,
    /// The cubin image.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings), empty when clean.
    pub log: String,
}

type Cache = Mutex<HashMap<(Family, String), Arc<Compiled>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Compiles `family` for `arch` (e.g. `"sm_90a"`), once per process: later calls return the
/// cached cubin. A compile error carries NVRTC's log.
pub fn compile(family: Family, arch: &str) -> Result<Arc<Compiled>> {
    let key = (family, arch.to_string());
    if let Some(hit) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    let compiled = Arc::new(compile_uncached(family, arch)?);
    cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, compiled.clone());
    Ok(compiled)
}

fn compile_uncached(family: Family, arch: &str) -> Result<Compiled> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_available() {
        return Err(Error::NvrtcUnavailable(
            "libnvrtc.so could not be loaded".into(),
        ));
    }
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "-default-device".to_string(),
        "-lineinfo".to_string(),
        "-DTESSERA_NVRTC=1".to_string(),
    ];
    options.extend(
        include_dirs()
            .into_iter()
            .map(|d| format!("--include-path={d}")),
    );
    let compile_error = |log: String| Error::Compile {
        file: family.file(),
        arch: arch.to_string(),
        options: options.join(" "),
        log,
    };
    let src = CString::new(expanded_source(family))
        .map_err(|_| compile_error("the source holds a NUL byte".into()))?;
    let name = CString::new(family.file()).expect("file names hold no NUL");
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| compile_error(format!("nvrtcCreateProgram: {e:?}")))?;
    // The program is destroyed on every path out of this function.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: the program was created above and is destroyed exactly once, here.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let prog = Program(prog);
    // SAFETY: `prog.0` is a live program; the option strings are NUL-free (built above).
    let compiled = unsafe { result::compile_program(prog.0, &options) };
    // SAFETY: `prog.0` is a live program.
    let log = unsafe { result::get_program_log(prog.0) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(compile_error(format!("{e:?}\n{log}")));
    }
    let mut size = 0usize;
    // SAFETY: `prog.0` compiled successfully; `size` is a valid out-pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| compile_error(format!("nvrtcGetCUBINSize: {e:?}")))?;
    if size == 0 {
        return Err(compile_error(format!(
            "no cubin for {arch} (a virtual compute_ target gives PTX only)"
        )));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds exactly the `size` bytes NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| compile_error(format!("nvrtcGetCUBIN: {e:?}")))?;
    Ok(Compiled {
        family,
        arch: arch.to_string(),
        cubin,
        log,
    })
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    // The log is NUL-terminated; read up to the first NUL (or all of it).
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().trim().to_string(),
        Err(_) => String::from_utf8_lossy(&bytes).trim().to_string(),
    }
}
