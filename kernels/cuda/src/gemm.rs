//! Tensor-core GEMM: `C = α·A·op(B) + β·C` with `A` and `B` both f16 or both bf16, f32
//! accumulation and an f32 `C` (the kernels are in `cuda/gemm.cu`; its header comment is the
//! contract every launcher here matches).
//!
//! * `A` is row-major `[m, k]` (leading dimension `lda`); `B` is `[k, n]` ([`Transpose::No`])
//!   or `[n, k]` ([`Transpose::Yes`], a Hugging Face `Linear` weight), leading dimension `ldb`;
//!   `C` is row-major `[m, n]`, leading dimension `ldc`. Leading dimensions are in elements and
//!   may be anything `>=` the row length.
//! * `β == 0`: `C` is not read (NaN in `C` does not reach the result). `α == 0` or `k == 0`:
//!   `A` and `B` are not read, `C = β·C`. `m == 0` or `n == 0`: nothing is launched. These are
//!   the conventions of [`tessera_core::reference::gemm`].
//! * Two kernel families, chosen by [`GemmPath`] (see [`path_for`]):
//!   [`GemmPath::Mma`] (`mma.sync` m16n8k16, any sm_80+ device, any shape and alignment: the
//!   16-byte `cp.async` tiles need `A`/`B` 16-byte aligned and `lda`/`ldb` multiples of 8
//!   elements, otherwise a bounds-checked element-load variant runs) and [`GemmPath::Wgmma`]
//!   (Hopper `wgmma` fed by bulk tensor copies, sm_90a only, needs that same alignment; edge
//!   tiles in every dimension are handled by the copy engine's zero fill).
//! * Rows and columns outside `m x n` (the `ldc` padding) are never written.
//!
//! Every launcher validates lengths, leading dimensions and sizes on the host first
//! ([`validate`]); a bad argument is an [`Error::Invalid`], never a launch.

use crate::compile::Family;
use crate::error::DriverContext;
use crate::launch::{dim_i32, grid_stride};
use crate::{Device, DeviceInfo, Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys as cu;
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use tessera_core::shape::{check_matrix, checked_mul};
use tessera_core::{DType, Transpose, bf16, f16};

/// The 16-bit input types of the tensor-core GEMM ([`half::f16`], [`half::bf16`]).
pub trait GemmElement: DeviceRepr + Copy + Send + Sync + 'static {
    /// The runtime tag of the type.
    const DTYPE: DType;
}

impl GemmElement for f16 {
    const DTYPE: DType = DType::F16;
}

impl GemmElement for bf16 {
    const DTYPE: DType = DType::BF16;
}

/// Which kernel family runs a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPath {
    /// [`GemmPath::Wgmma`] where the device is sm_90a, the operands qualify (16-byte aligned
    /// `A` and `B`, `lda` and `ldb` multiples of 8 elements) and the output has enough
    /// 128 x 256 tiles for a quarter of the SMs; [`GemmPath::Mma`] otherwise (see [`path_for`]).
    #[default]
    Auto,
    /// `mma.sync` m16n8k16 tensor-core kernels (sm_80 and newer): every shape and alignment.
    Mma,
    /// Hopper `wgmma` kernels with bulk tensor copies (sm_90a only); asking for it where it
    /// cannot run is [`Error::Unsupported`].
    Wgmma,
}

/// Shape, strides and scalars of `C[m,n] = α·A[m,k]·op(B) + β·C`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmArgs {
    /// Rows of `A` and `C`.
    pub m: usize,
    /// Columns of `C` and of `op(B)`.
    pub n: usize,
    /// The reduction length: columns of `A`, rows of `op(B)`.
    pub k: usize,
    /// Leading dimension of `A` (elements between row starts, `>= k`).
    pub lda: usize,
    /// Leading dimension of `B` (`>= n` for [`Transpose::No`], `>= k` for [`Transpose::Yes`]).
    pub ldb: usize,
    /// Leading dimension of `C` (`>= n`).
    pub ldc: usize,
    /// How `B` is stored: `[k, n]` ([`Transpose::No`]) or `[n, k]` ([`Transpose::Yes`]).
    pub trans_b: Transpose,
    /// α.
    pub alpha: f32,
    /// β (0: `C` is not read).
    pub beta: f32,
}

impl GemmArgs {
    /// Densely packed operands (every leading dimension equals its row length), `α = 1`,
    /// `β = 0`.
    pub fn dense(m: usize, n: usize, k: usize, trans_b: Transpose) -> Self {
        GemmArgs {
            m,
            n,
            k,
            lda: k,
            ldb: match trans_b {
                Transpose::No => n,
                Transpose::Yes => k,
            },
            ldc: n,
            trans_b,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `B` as stored: (rows, columns).
    fn b_dims(&self) -> (usize, usize) {
        match self.trans_b {
            Transpose::No => (self.k, self.n),
            Transpose::Yes => (self.n, self.k),
        }
    }
}

/// The `mma.sync` block tiles (`cuda/gemm.cu`, kernel 1). Chosen by the launcher from the
/// shape; exposed only so that the tests can run every variant.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmaTile {
    /// 128 x 256, 8 warps, 3 stages.
    Large,
    /// 128 x 128, 4 warps, 4 stages.
    Medium,
    /// 64 x 64, 4 warps, 4 stages (also the only tile of the unaligned element-load variant).
    Small,
}

impl MmaTile {
    /// Every tile.
    pub const ALL: [MmaTile; 3] = [MmaTile::Large, MmaTile::Medium, MmaTile::Small];

    /// (BM, BN, threads, stages), as instantiated in `cuda/gemm.cu`.
    const fn geometry(self) -> (usize, usize, u32, usize) {
        match self {
            MmaTile::Large => (128, 256, 256, 3),
            MmaTile::Medium => (128, 128, 128, 4),
            MmaTile::Small => (64, 64, 128, 4),
        }
    }

    fn suffix(self, vec: bool) -> &'static str {
        match (self, vec) {
            (MmaTile::Large, _) => "l",
            (MmaTile::Medium, _) => "m",
            (MmaTile::Small, true) => "s",
            (MmaTile::Small, false) => "su",
        }
    }

    /// Dynamic shared memory: STAGES · 2 · (BM·40 + (nk ? BN·40 : 32·(BN + 8))) bytes.
    fn smem_bytes(self, trans_b: Transpose) -> usize {
        let (bm, bn, _, stages) = self.geometry();
        let b = match trans_b {
            Transpose::Yes => bn * 40,
            Transpose::No => 32 * (bn + 8),
        };
        stages * 2 * (bm * 40 + b)
    }

    fn tiles(self, m: usize, n: usize) -> usize {
        let (bm, bn, _, _) = self.geometry();
        m.div_ceil(bm).saturating_mul(n.div_ceil(bn))
    }
}

/// The largest `mma.sync` tile that still gives every SM a block: big tiles reuse each loaded
/// element more, small ones keep a small problem spread over the whole device.
fn mma_tile_for(info: &DeviceInfo, m: usize, n: usize) -> MmaTile {
    let sms = info.sm_count.max(1) as usize;
    for tile in [MmaTile::Large, MmaTile::Medium] {
        if tile.tiles(m, n) >= sms {
            return tile;
        }
    }
    MmaTile::Small
}

/// `wgmma` kernel geometry (`cuda/gemm.cu`, kernel 2).
const WGMMA_BM: usize = 128;
const WGMMA_BN: usize = 256;
const WGMMA_THREADS: u32 = 384;
/// 4 stages of 16384 (A) + 32768 (B) bytes, plus 1024 to align them to the swizzle atom.
const WGMMA_SMEM: usize = 4 * (16384 + 32768) + 1024;

/// The largest m, n or k: the kernels index rows and columns with 32-bit ints, including
/// indices up to one tile (at most 256) past an edge.
const DIM_LIMIT: usize = i32::MAX as usize - 1024;

/// Tensor-map strides must be below 2⁴⁰ bytes.
const TMA_MAX_STRIDE_BYTES: usize = 1 << 40;

/// The leading dimension a kernel is given: a one-row matrix never steps by it, so it is
/// replaced by its row length rounded up to 8 (any huge but valid `ld` of a single row then
/// neither overflows the kernels' arithmetic nor spoils the alignment checks).
fn effective_ld(rows: usize, cols: usize, ld: usize) -> usize {
    if rows <= 1 {
        cols.div_ceil(8).max(1) * 8
    } else {
        ld
    }
}

/// Effective (lda, ldb, ldc).
fn effective_lds(args: &GemmArgs) -> (usize, usize, usize) {
    let (br, bc) = args.b_dims();
    (
        effective_ld(args.m, args.k, args.lda),
        effective_ld(br, bc, args.ldb),
        effective_ld(args.m, args.n, args.ldc),
    )
}

fn ld_i64(what: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| {
        Error::Invalid(tessera_core::Error::Overflow {
            what: format!("{what} = {v} does not fit the kernels' 64-bit index"),
        })
    })
}

/// Host-side checks of a GEMM on operands of `a_len`, `b_len` and `c_len` elements: every
/// slice long enough for its shape and leading dimension (which must cover its row), no size
/// overflowing, `m`, `n`, `k` fitting the kernels' 32-bit indices (at most 2³¹ − 1025), the
/// grid within the device limits. Needs no GPU; [`gemm`] runs it before anything else.
pub fn validate<T: GemmElement>(
    args: &GemmArgs,
    a_len: usize,
    b_len: usize,
    c_len: usize,
) -> Result<()> {
    let (br, bc) = args.b_dims();
    check_matrix("A", args.m, args.k, args.lda, a_len)?;
    check_matrix("B", br, bc, args.ldb, b_len)?;
    check_matrix("C", args.m, args.n, args.ldc, c_len)?;
    checked_mul(args.m, args.n, "m*n").and_then(|mn| checked_mul(mn, args.k, "m*n*k"))?;
    for (what, v) in [("m", args.m), ("n", args.n), ("k", args.k)] {
        if v > DIM_LIMIT {
            return Err(Error::Invalid(tessera_core::Error::Overflow {
                what: format!(
                    "{what} = {v} exceeds {DIM_LIMIT}, the kernels' 32-bit index limit less one tile"
                ),
            }));
        }
    }
    let (lda, ldb, ldc) = effective_lds(args);
    ld_i64("lda", lda)?;
    ld_i64("ldb", ldb)?;
    ld_i64("ldc", ldc)?;
    // The small mma tile has the most blocks of any kernel; the grid is one-dimensional.
    let blocks = MmaTile::Small.tiles(args.m, args.n);
    if blocks > i32::MAX as usize {
        return Err(Error::Invalid(tessera_core::Error::Overflow {
            what: format!(
                "GEMM grid: {blocks} blocks of 64 x 64 for {} x {} exceed the limit {}",
                args.m,
                args.n,
                i32::MAX
            ),
        }));
    }
    let _ = T::DTYPE;
    Ok(())
}

/// Whether the `wgmma` kernel's 128 x 256 tiles give at least a quarter of the SMs a block:
/// for smaller outputs (e.g. 128 tokens through a 768 -> 3072 layer: 12 tiles on 132 SMs) the
/// `mma.sync` kernel's 64 x 64 tiles spread the work over far more of the device.
fn wgmma_fills_device(info: &DeviceInfo, m: usize, n: usize) -> bool {
    let tiles = m.div_ceil(WGMMA_BM).saturating_mul(n.div_ceil(WGMMA_BN));
    tiles.saturating_mul(4) >= info.sm_count.max(1) as usize
}

/// Why the shape and strides of `args` cannot take the `wgmma` path (`None`: they can). The
/// pointers' 16-byte alignment is checked separately, at launch.
fn wgmma_refusal(args: &GemmArgs) -> Option<String> {
    let (lda, ldb, _) = effective_lds(args);
    if lda % 8 != 0 || ldb % 8 != 0 {
        return Some(format!(
            "the wgmma path needs lda and ldb to be multiples of 8 elements (lda {}, ldb {})",
            args.lda, args.ldb
        ));
    }
    if lda.saturating_mul(2) >= TMA_MAX_STRIDE_BYTES
        || ldb.saturating_mul(2) >= TMA_MAX_STRIDE_BYTES
    {
        return Some("the wgmma path needs row strides below 2^40 bytes".into());
    }
    None
}

/// The kernel family a GEMM with `args` runs on a device described by `info` when `requested`
/// is asked for. [`GemmPath::Auto`] picks [`GemmPath::Wgmma`] on sm_90a when `lda` and `ldb`
/// are multiples of 8 elements and the output has enough 128 x 256 tiles for a quarter of the
/// SMs (the launch still falls back to [`GemmPath::Mma`] if `A` or `B` turns out not to be
/// 16-byte aligned), [`GemmPath::Mma`] otherwise. An explicit `Wgmma` on another architecture
/// or with unsuitable strides is [`Error::Unsupported`] (whatever the size). Needs no GPU.
pub fn path_for(info: &DeviceInfo, args: &GemmArgs, requested: GemmPath) -> Result<GemmPath> {
    match requested {
        GemmPath::Mma => Ok(GemmPath::Mma),
        GemmPath::Auto => Ok(
            if info.has_sm90a()
                && wgmma_refusal(args).is_none()
                && wgmma_fills_device(info, args.m, args.n)
            {
                GemmPath::Wgmma
            } else {
                GemmPath::Mma
            },
        ),
        GemmPath::Wgmma => {
            if !info.has_sm90a() {
                return Err(Error::Unsupported(format!(
                    "the wgmma GEMM path needs an sm_90a device; {} is {}",
                    info.name, info.arch
                )));
            }
            match wgmma_refusal(args) {
                Some(why) => Err(Error::Unsupported(why)),
                None => Ok(GemmPath::Wgmma),
            }
        }
    }
}

fn dtype_name<T: GemmElement>() -> &'static str {
    T::DTYPE.name()
}

fn layout_name(t: Transpose) -> &'static str {
    match t {
        Transpose::Yes => "nk",
        Transpose::No => "kn",
    }
}

/// Runs `C = α·A·op(B) + β·C` on `dev` (see the module documentation for the conventions)
/// with the kernel family `path` ([`GemmPath::Auto`]: the fastest that can run, see
/// [`path_for`]). `a`, `b` and `c` hold at least the elements their shapes and leading
/// dimensions span; they belong to `dev` (its stream orders the launch after their writes).
/// Returns once the kernel is enqueued; [`Device::synchronize`] reports a fault.
pub fn gemm<T: GemmElement, A: DevicePtr<T>, B: DevicePtr<T>, C: DevicePtrMut<f32>>(
    dev: &Device,
    path: GemmPath,
    args: &GemmArgs,
    a: &A,
    b: &B,
    c: &mut C,
) -> Result<()> {
    run(dev, path, None, args, a, b, c)
}

/// [`gemm`] on the `mma.sync` path with the block tile forced (the tests run every variant).
#[doc(hidden)]
pub fn gemm_mma_tile<T: GemmElement, A: DevicePtr<T>, B: DevicePtr<T>, C: DevicePtrMut<f32>>(
    dev: &Device,
    tile: MmaTile,
    args: &GemmArgs,
    a: &A,
    b: &B,
    c: &mut C,
) -> Result<()> {
    run(dev, GemmPath::Mma, Some(tile), args, a, b, c)
}

fn run<T: GemmElement, A: DevicePtr<T>, B: DevicePtr<T>, C: DevicePtrMut<f32>>(
    dev: &Device,
    requested: GemmPath,
    tile: Option<MmaTile>,
    args: &GemmArgs,
    a: &A,
    b: &B,
    c: &mut C,
) -> Result<()> {
    validate::<T>(args, a.len(), b.len(), c.len())?;
    let path = path_for(dev.info(), args, requested)?;
    if args.m == 0 || args.n == 0 {
        return Ok(());
    }
    let (m, n, k) = (
        dim_i32("m", args.m)?,
        dim_i32("n", args.n)?,
        dim_i32("k", args.k)?,
    );
    let (lda, ldb, ldc) = effective_lds(args);
    let (lda, ldb, ldc) = (
        ld_i64("lda", lda)?,
        ld_i64("ldb", ldb)?,
        ld_i64("ldc", ldc)?,
    );
    let stream = dev.stream();
    if args.k == 0 || args.alpha == 0.0 {
        let f = dev.function(Family::Gemm, "tessera_gemm_scale_c")?;
        let cfg = grid_stride(dev, args.m * args.n);
        let (c_ptr, _rc) = c.device_ptr_mut(stream);
        let mut launch = stream.launch_builder(&f);
        launch.arg(&c_ptr).arg(&m).arg(&n).arg(&ldc).arg(&args.beta);
        // SAFETY: tessera_gemm_scale_c(float*, int m, int n, long long ldc, float beta) reads
        // and writes C[r * ldc + c] for r < m, c < n only; validate() checked that C holds
        // (m - 1)·ldc + n elements (ldc is the caller's, or n rounded up when m == 1, where
        // it is never multiplied by a non-zero row).
        unsafe { launch.launch(cfg) }.ctx(|| "launching tessera_gemm_scale_c".into())?;
        return Ok(());
    }

    let (a_ptr, _ra) = a.device_ptr(stream);
    let (b_ptr, _rb) = b.device_ptr(stream);
    let aligned = a_ptr % 16 == 0 && b_ptr % 16 == 0 && lda % 8 == 0 && ldb % 8 == 0;
    let path = match path {
        GemmPath::Wgmma if !aligned => {
            if requested == GemmPath::Wgmma {
                return Err(Error::Unsupported(
                    "the wgmma GEMM path needs A and B 16-byte aligned".into(),
                ));
            }
            GemmPath::Mma
        }
        p => p,
    };
    let (c_ptr, _rc) = c.device_ptr_mut(stream);

    if path == GemmPath::Wgmma {
        let dt = match T::DTYPE {
            DType::BF16 => cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            _ => cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        };
        let (br, bc) = args.b_dims();
        // Tensor maps: dims {inner, outer}, the outer stride in bytes, boxes as in gemm.cu.
        let map_a = tensor_map(dev, dt, a_ptr, args.k, args.m, lda as usize * 2, 64, 128)?;
        let map_b = match args.trans_b {
            Transpose::Yes => tensor_map(dev, dt, b_ptr, bc, br, ldb as usize * 2, 64, 256)?,
            Transpose::No => tensor_map(dev, dt, b_ptr, bc, br, ldb as usize * 2, 64, 64)?,
        };
        let name = format!(
            "tessera_gemm_wgmma_{}_{}",
            dtype_name::<T>(),
            layout_name(args.trans_b)
        );
        let f = dev.function_with_smem(Family::Gemm, &name, WGMMA_SMEM)?;
        let tiles = args.m.div_ceil(WGMMA_BM) * args.n.div_ceil(WGMMA_BN);
        let blocks = tiles.min(dev.info().sm_count.max(1) as usize) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (WGMMA_THREADS, 1, 1),
            shared_mem_bytes: WGMMA_SMEM as u32,
        };
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(&map_a)
            .arg(&map_b)
            .arg(&c_ptr)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&ldc)
            .arg(&args.alpha)
            .arg(&args.beta);
        // SAFETY: the kernel (TesseraTensorMap a, TesseraTensorMap b, float* C, int m, int n,
        // int k, long long ldc, float alpha, float beta) reads A and B only through the tensor
        // maps, whose dims are exactly A's k x m and B's stored shape with the validated
        // leading dimensions (out-of-bounds box elements are zero-filled, never read), and
        // writes C[r * ldc + c] for r < m, c < n only, which validate() checked C holds.
        // A and B are 16-byte aligned and their strides multiples of 16 bytes (checked above);
        // the device is sm_90a (path_for), and the block gets WGMMA_SMEM bytes.
        unsafe { launch.launch(cfg) }.ctx(|| format!("launching {name}"))?;
        return Ok(());
    }

    let tile = if aligned {
        tile.unwrap_or_else(|| mma_tile_for(dev.info(), args.m, args.n))
    } else {
        MmaTile::Small
    };
    let (_, _, threads, _) = tile.geometry();
    let name = format!(
        "tessera_gemm_mma_{}_{}_{}",
        dtype_name::<T>(),
        layout_name(args.trans_b),
        tile.suffix(aligned)
    );
    let smem = tile.smem_bytes(args.trans_b);
    let f = dev.function_with_smem(Family::Gemm, &name, smem)?;
    // validate() bounds the small tile's count by i32::MAX; the others have fewer.
    let blocks = tile.tiles(args.m, args.n) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&a_ptr)
        .arg(&b_ptr)
        .arg(&c_ptr)
        .arg(&m)
        .arg(&n)
        .arg(&k)
        .arg(&lda)
        .arg(&ldb)
        .arg(&ldc)
        .arg(&args.alpha)
        .arg(&args.beta);
    // SAFETY: the kernel (const uint16_t* A, const uint16_t* B, float* C, int m, int n, int k,
    // long long lda, long long ldb, long long ldc, float alpha, float beta) reads A[r·lda + c]
    // for r < m, c < k, B[r·ldb + c] inside B's stored shape, and writes C[r·ldc + c] for
    // r < m, c < n only; validate() checked that each buffer spans its shape with these
    // leading dimensions (replaced by the row length only for one-row operands, where the row
    // index is always 0). The 16-byte cp.async variants ("l", "m", "s") run only when A and B
    // are 16-byte aligned and lda, ldb multiples of 8 (`aligned`); "su" has no alignment
    // needs. The block gets `smem` bytes, the size gemm.cu's header gives for this variant.
    unsafe { launch.launch(cfg) }.ctx(|| format!("launching {name}"))?;
    Ok(())
}

/// A `CUtensorMap` passed by value to a kernel (`const __grid_constant__ TesseraTensorMap`).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TensorMapParam(cu::CUtensorMap);

// SAFETY: 128 bytes of plain data with the layout of CUDA's CUtensorMap, which is what the
// kernels declare for these parameters; the driver copies it into the parameter space.
unsafe impl DeviceRepr for TensorMapParam {}

/// A 2-D tensor map over 16-bit elements at `ptr`: `inner` elements a row (contiguous),
/// `outer` rows `stride_bytes` apart, boxes of `box_inner x box_outer`, 128-byte swizzle,
/// out-of-bounds elements zero-filled.
#[allow(clippy::too_many_arguments)]
fn tensor_map(
    dev: &Device,
    dtype: cu::CUtensorMapDataType,
    ptr: u64,
    inner: usize,
    outer: usize,
    stride_bytes: usize,
    box_inner: u32,
    box_outer: u32,
) -> Result<TensorMapParam> {
    dev.context()
        .bind_to_thread()
        .ctx(|| "binding the context to encode a tensor map".into())?;
    let mut map = TensorMapParam(cu::CUtensorMap { opaque: [0; 16] });
    let dims = [inner as u64, outer as u64];
    let strides = [stride_bytes as u64];
    let boxes = [box_inner, box_outer];
    let element_strides = [1u32, 1];
    // SAFETY: every pointer refers to a live local array of the rank (2) the call is told,
    // strides has rank - 1 entries, and `map.0` is a 64-byte aligned CUtensorMap to write.
    // The global address is only recorded in the map, not accessed.
    unsafe {
        cu::cuTensorMapEncodeTiled(
            &mut map.0,
            dtype,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            cu::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            cu::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            cu::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .ctx(|| format!("cuTensorMapEncodeTiled ({inner} x {outer}, stride {stride_bytes} bytes)"))?;
    Ok(map)
}

/// Whether the cuBLAS library can be loaded (checked without panicking: cudarc's loader
/// panics on a missing library).
fn cublas_available() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the library by its known names.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// A cuBLAS handle on `dev`'s stream (the peer of the benches), or [`Error::Unavailable`]
/// when libcublas cannot be loaded.
pub fn cublas_handle(dev: &Device) -> Result<CudaBlas> {
    if !cublas_available() {
        return Err(Error::Unavailable(
            "the cuBLAS library (libcublas.so) is not installed".into(),
        ));
    }
    CudaBlas::new(dev.stream().clone())
        .map_err(|e| Error::Unsupported(format!("creating a cuBLAS handle: {e}")))
}

/// The same `C = α·A·op(B) + β·C` (row-major, f16/bf16 inputs, f32 output and accumulation:
/// `cublasGemmEx` with `CUBLAS_COMPUTE_32F`) through cuBLAS, the peer Tessera's kernels are
/// measured against. cuBLAS is column-major, so it computes `Cᵀ = op(B)ᵀ·Aᵀ`. `blas` must run
/// on the stream the buffers belong to (the [`Device::stream`] for buffers made by a
/// [`Device`]; [`cublas_handle`] makes such a handle); the arguments are validated as for
/// [`gemm`]. [`Error::Unavailable`] when libcublas cannot be loaded; a cuBLAS failure is
/// reported as [`Error::Unsupported`] with its status.
pub fn cublas_gemm_f32out<
    T: GemmElement,
    A: DevicePtr<T>,
    B: DevicePtr<T>,
    C: DevicePtrMut<f32>,
>(
    blas: &CudaBlas,
    args: &GemmArgs,
    a: &A,
    b: &B,
    c: &mut C,
) -> Result<()> {
    use cudarc::cublas::sys::{
        cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
    };
    validate::<T>(args, a.len(), b.len(), c.len())?;
    if args.m == 0 || args.n == 0 {
        return Ok(());
    }
    if !cublas_available() {
        return Err(Error::Unavailable(
            "the cuBLAS library (libcublas.so) is not installed".into(),
        ));
    }
    let int = |what: &str, v: usize| -> Result<i32> { dim_i32(what, v) };
    let (lda, ldb, ldc) = effective_lds(args);
    // cuBLAS wants every leading dimension >= max(1, rows of its column-major view).
    let (lda, ldb, ldc) = (
        int("lda", lda.max(1))?,
        int("ldb", ldb.max(1))?,
        int("ldc", ldc.max(1))?,
    );
    let (m, n, k) = (int("m", args.m)?, int("n", args.n)?, int("k", args.k)?);
    let dt = match T::DTYPE {
        DType::BF16 => cudaDataType_t::CUDA_R_16BF,
        _ => cudaDataType_t::CUDA_R_16F,
    };
    // Column-major: Cᵀ (n x m, ld ldc) = X (n x k) · Aᵀ (k x m: A's storage, ld lda), where
    // X = op(B)ᵀ is B's storage as is ([k, n] row-major = n x k column-major, ld ldb) or, for
    // B stored [n, k] (k x n column-major), its transpose.
    let op_x = match args.trans_b {
        Transpose::No => cublasOperation_t::CUBLAS_OP_N,
        Transpose::Yes => cublasOperation_t::CUBLAS_OP_T,
    };
    // The handle's stream is not readable back from cudarc: the buffers' own stream orders the
    // call (the documented precondition is that the handle runs on it).
    let stream = c.stream().clone();
    let (a_ptr, _ra) = a.device_ptr(&stream);
    let (b_ptr, _rb) = b.device_ptr(&stream);
    let (c_ptr, _rc) = c.device_ptr_mut(&stream);
    let (alpha, beta) = (args.alpha, args.beta);
    // SAFETY: the handle runs on the buffers' stream (the documented precondition), the pointers
    // are live device buffers validated for their shapes and leading dimensions, cuBLAS reads
    // A (k x m column-major, ld lda) and B (ld ldb) and writes C (n x m, ld ldc) within those
    // spans, and alpha/beta are host f32 values for the host pointer mode with 32F compute.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op_x,
            cublasOperation_t::CUBLAS_OP_N,
            n,
            m,
            k,
            (&alpha as *const f32).cast(),
            b_ptr as *const std::ffi::c_void,
            dt,
            ldb,
            a_ptr as *const std::ffi::c_void,
            dt,
            lda,
            (&beta as *const f32).cast(),
            c_ptr as *mut std::ffi::c_void,
            cudaDataType_t::CUDA_R_32F,
            ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(|e| Error::Unsupported(format!("cublasGemmEx failed: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(arch: &str, sms: u32) -> DeviceInfo {
        DeviceInfo {
            name: "test".into(),
            compute_capability: (9, 0),
            arch: arch.into(),
            sm_count: sms,
            l2_bytes: 50 << 20,
            max_smem_per_block: 227 << 10,
            total_mem: 80 << 30,
        }
    }

    #[test]
    fn smem_sizes_match_the_header() {
        let nk = Transpose::Yes;
        let kn = Transpose::No;
        assert_eq!(MmaTile::Large.smem_bytes(nk), 92160);
        assert_eq!(MmaTile::Large.smem_bytes(kn), 81408);
        assert_eq!(MmaTile::Medium.smem_bytes(nk), 81920);
        assert_eq!(MmaTile::Medium.smem_bytes(kn), 75776);
        assert_eq!(MmaTile::Small.smem_bytes(nk), 40960);
        assert_eq!(MmaTile::Small.smem_bytes(kn), 38912);
        assert_eq!(WGMMA_SMEM, 197632);
        // Every variant fits the 99 KiB opt-in limit of sm_86 / sm_89.
        for t in MmaTile::ALL {
            assert!(t.smem_bytes(nk) <= 99 * 1024 && t.smem_bytes(kn) <= 99 * 1024);
        }
    }

    #[test]
    fn tile_choice_fills_the_device() {
        let i = info("sm_80", 108);
        assert_eq!(mma_tile_for(&i, 8192, 8192), MmaTile::Large);
        assert_eq!(mma_tile_for(&i, 2048, 3072), MmaTile::Large);
        assert_eq!(mma_tile_for(&i, 1024, 2048), MmaTile::Medium);
        assert_eq!(mma_tile_for(&i, 1024, 1536), MmaTile::Small);
        assert_eq!(mma_tile_for(&i, 128, 3072), MmaTile::Small);
        assert_eq!(mma_tile_for(&i, 1, 1), MmaTile::Small);
    }

    #[test]
    fn one_row_operands_get_a_small_aligned_ld() {
        assert_eq!(effective_ld(1, 5, usize::MAX), 8);
        assert_eq!(effective_ld(0, 0, 0), 8);
        assert_eq!(effective_ld(1, 16, 17), 16);
        assert_eq!(effective_ld(2, 5, 7), 7);
    }
}
