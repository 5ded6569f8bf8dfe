//! Fused flash-style attention on the GPU (`cuda/attention.cu`): `softmax(scale·Q·Kᵀ + bias +
//! mask)·V` tile by tile with an online softmax, never materializing a `q_len × kv_len` matrix.
//!
//! Semantics are those of [`tessera_core::attention`] and of the CPU family, term for term:
//! bidirectional or causal (query row `i` at key position `q_offset + i`), cross-attention
//! (`q_len != kv_len`), per-sequence key padding (lengths, or a byte mask), an additive bias
//! (dense `[batch, heads, q, k]` with element strides, or T5's bucketed relative-position table
//! evaluated in the kernel), any scale, grouped-query and multi-query heads (`n_kv_heads`
//! divides `n_heads`), any `head_dim` up to [`MAX_HEAD_DIM`]. A query row whose keys are all
//! masked yields zeros, never NaN.
//!
//! Q, K and V are f16 or bf16 ([`AttnElement`], one type for the three), in any
//! [`HeadLayout`]; the output is **f32** (as the CPU family's output), in any disjoint layout.
//!
//! # Kernels
//! * `head_dim` ∈ {32, 64, 80, 96, 128}: the tensor-core kernel (FlashAttention-2): a block of
//!   4 warps owns 64 query rows of one (batch entry, head) and walks the keys in tiles of 64;
//!   both products by `mma.sync.m16n8k16` with f32 accumulation, fragments by `ldmatrix`
//!   (`.trans` for V), K and V tiles copied by 16-byte `cp.async` while the other product runs.
//!   The softmax weights P are rounded to the input type for `P·V` (the row sums add the
//!   rounded weights). Key tiles past the last key the block's rows see are skipped.
//! * any other `head_dim` (up to 256, and up to 1024): a SIMT kernel, one warp per query row,
//!   f32 throughout.
//! * `head_dim` ∈ {64, 128} on Hopper (sm_90a), **opt-in** with [`AttnPath::Wgmma`]
//!   ([`attention_with_path`]): FlashAttention-3 style, one warpgroup per 64 query rows, both
//!   products by `wgmma.mma_async` (Q and K from 128-byte-swizzled shared memory, P from
//!   registers, V as an MN-major operand), K and V double-buffered by 16-byte `cp.async`. The
//!   same options, rounding of P and accuracy as the `mma.sync` kernel. It has not yet been run
//!   on an H100, so [`AttnPath::Auto`] never picks it: it stays opt-in until the GPU tests
//!   (`tests/attention.rs`, `*_wgmma`) have passed on one.
//!
//! Both read Q, K and V with 16-byte vector copies when the buffers are 16-byte aligned and every
//! stride in use is a multiple of 8 elements, element by element otherwise (same results).
//!
//! # Accuracy
//! With `u_p` the unit roundoff of the input type (2⁻¹¹ for f16, 2⁻⁸ for bf16; 0 on the SIMT
//! path), the result differs from the exact attention of the given (16-bit) inputs by about
//! `2·u_p` relative to `Σ_j p_j·|v_j| / Σ_j p_j`, plus the f32 rounding of the scores and sums
//! (tests/attention.rs states the bound and checks it against `tessera_core::reference`).

use crate::compile::Family;
use crate::error::DriverContext;
use crate::launch::{dim_i32, grid};
use crate::{Device, DeviceInfo, Error, Result};
use cudarc::driver::{CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use tessera_core::attention::{
    AttentionParams, AttentionShape, HeadLayout, KeyPadding, MAX_HEAD_DIM, check_attention,
};
use tessera_core::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An input element type of the attention kernels: f16 or bf16.
pub trait AttnElement: sealed::Sealed + tessera_core::Element + DeviceRepr {
    /// The kernels' name for the type (`f16`, `bf16`).
    const NAME: &'static str;
}

impl AttnElement for f16 {
    const NAME: &'static str = "f16";
}

impl AttnElement for bf16 {
    const NAME: &'static str = "bf16";
}

/// Head dimensions of the tensor-core kernel; others run on the SIMT kernel.
pub const MMA_HEAD_DIMS: [usize; 5] = [32, 64, 80, 96, 128];

/// Head dimensions of the Hopper `wgmma` kernel ([`AttnPath::Wgmma`]).
pub const WGMMA_HEAD_DIMS: [usize; 2] = [64, 128];

/// Which kernel family runs an attention call ([`attention_with_path`], [`kernel_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnPath {
    /// The fastest *verified* family: currently always [`AttnPath::Mma`] (the `wgmma` kernel
    /// is chosen only when asked for, until it has been verified on an H100).
    #[default]
    Auto,
    /// The sm_80 kernels, any device: `mma.sync` m16n8k16 for `head_dim` in
    /// [`MMA_HEAD_DIMS`], the SIMT kernel for every other `head_dim`.
    Mma,
    /// The Hopper `wgmma` kernel (sm_90a, `head_dim` in [`WGMMA_HEAD_DIMS`]); asking for it
    /// where it cannot run is [`Error::Unsupported`]. Opt-in: not yet verified on hardware.
    Wgmma,
}

/// Which keys each sequence of the batch may attend to ([`KeyPadding`] on the device).
#[derive(Debug, Default)]
pub enum DevicePadding<'a> {
    /// Every key.
    #[default]
    None,
    /// `lengths[b]` keys of sequence `b`, from the host: validated (`batch` values, each at
    /// most `kv_len`) and uploaded by the launcher (a small allocation per call; keep the
    /// lengths on the device with [`DevicePadding::DeviceLengths`] to avoid it).
    Lengths(&'a [usize]),
    /// `lengths[b]` keys of sequence `b`, already on the device: `batch` values. Their values
    /// cannot be checked without a copy back: the kernels clamp each to `kv_len`.
    DeviceLengths(CudaView<'a, u32>),
    /// `mask[b·kv_len + j] != 0` says that sequence `b` attends key `j` (Hugging Face's
    /// `attention_mask` as bytes): `batch·kv_len` values.
    Mask(CudaView<'a, u8>),
}

/// An additive bias on the scores ([`tessera_core::attention::Bias`] on the device).
#[derive(Debug, Default)]
pub enum DeviceBias<'a> {
    /// No bias.
    #[default]
    None,
    /// Element `(b, h, i, j)` at `b·batch_stride + h·head_stride + i·q_stride + j` (a zero
    /// stride broadcasts).
    Dense {
        /// The elements.
        data: CudaView<'a, f32>,
        /// Elements between batch entries (0 to broadcast).
        batch_stride: usize,
        /// Elements between heads (0 to broadcast).
        head_stride: usize,
        /// Elements between query rows (0 to broadcast).
        q_stride: usize,
    },
    /// T5's bucketed relative-position bias: `bias[h, i, j] = table[bucket(j − (q_offset + i))
    /// · n_heads + h]` ([`tessera_core::attention::RelativeBias`]), evaluated in the kernel.
    Relative {
        /// `[num_buckets, n_heads]` row-major.
        table: CudaView<'a, f32>,
        /// Buckets (32 in T5).
        num_buckets: usize,
        /// Distance beyond which all positions share the last bucket (128 in T5).
        max_distance: usize,
        /// Encoder (`true`) or decoder.
        bidirectional: bool,
    },
}

/// Everything about a device attention call besides its operands
/// ([`AttentionParams`] with device-side padding and bias).
#[derive(Debug)]
pub struct DeviceAttentionParams<'a> {
    /// Multiplies `q · k`.
    pub scale: f32,
    /// Whether query row `i` only sees keys `j <= q_offset + i`.
    pub causal: bool,
    /// Position of query row 0 in the key sequence (causal mask and relative bias).
    pub q_offset: usize,
    /// Per-sequence key padding.
    pub padding: DevicePadding<'a>,
    /// Additive score bias.
    pub bias: DeviceBias<'a>,
}

impl DeviceAttentionParams<'_> {
    /// Bidirectional attention with scale `1/√head_dim`, no mask and no bias.
    pub fn new(head_dim: usize) -> Self {
        DeviceAttentionParams {
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            causal: false,
            q_offset: 0,
            padding: DevicePadding::None,
            bias: DeviceBias::None,
        }
    }
}

impl<'a> DeviceAttentionParams<'a> {
    /// With the causal mask, query row 0 at key position `q_offset`.
    pub fn causal(mut self, q_offset: usize) -> Self {
        self.causal = true;
        self.q_offset = q_offset;
        self
    }

    /// With this score scale.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// With this key padding.
    pub fn with_padding(mut self, padding: DevicePadding<'a>) -> Self {
        self.padding = padding;
        self
    }

    /// With this bias.
    pub fn with_bias(mut self, bias: DeviceBias<'a>) -> Self {
        self.bias = bias;
        self
    }
}

/// The kernel argument block: `struct AttnArgs` of `cuda/attention.cu`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AttnArgs {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lengths: u64,
    mask: u64,
    bias: u64,
    q_bs: i64,
    q_ss: i64,
    q_hs: i64,
    k_bs: i64,
    k_ss: i64,
    k_hs: i64,
    v_bs: i64,
    v_ss: i64,
    v_hs: i64,
    o_bs: i64,
    o_ss: i64,
    o_hs: i64,
    bias_bs: i64,
    bias_hs: i64,
    bias_qs: i64,
    batch: i32,
    q_len: i32,
    kv_len: i32,
    n_heads: i32,
    group: i32,
    head_dim: i32,
    q_offset: i32,
    causal: i32,
    bias_kind: i32,
    num_buckets: i32,
    max_distance: i32,
    bidirectional: i32,
    vec: i32,
    o_vec: i32,
    scale: f32,
    rel_denom: f32,
}
const _: () = assert!(std::mem::size_of::<AttnArgs>() == 240);

// SAFETY: `AttnArgs` is `repr(C)` plain data (integers and floats) whose layout matches the C
// struct the kernels take by value (240 bytes, checked above and by the kernel source).
unsafe impl DeviceRepr for AttnArgs {}

/// Which kernel runs a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// The tensor-core kernel for this exact `head_dim`.
    Mma {
        /// The head dimension (one of [`MMA_HEAD_DIMS`]).
        head_dim: usize,
    },
    /// The Hopper `wgmma` kernel for this exact `head_dim` (one of [`WGMMA_HEAD_DIMS`]).
    Wgmma {
        /// The head dimension.
        head_dim: usize,
    },
    /// The SIMT kernel holding `per_lane` output columns per lane (`head_dim <= 32·per_lane`).
    Simt {
        /// Output columns per lane: 8 (`head_dim <= 256`) or 32 (`<= 1024`).
        per_lane: usize,
    },
}

impl AttnKernel {
    /// The kernel for `head_dim` (`1..=MAX_HEAD_DIM`; larger is [`Error::Unsupported`]).
    pub fn for_head_dim(head_dim: usize) -> Result<AttnKernel> {
        if MMA_HEAD_DIMS.contains(&head_dim) {
            Ok(AttnKernel::Mma { head_dim })
        } else if head_dim <= 256 {
            Ok(AttnKernel::Simt { per_lane: 8 })
        } else if head_dim <= MAX_HEAD_DIM.min(1024) {
            Ok(AttnKernel::Simt { per_lane: 32 })
        } else {
            Err(Error::Unsupported(format!(
                "attention with head_dim {head_dim} (at most 1024 on the GPU)"
            )))
        }
    }

    /// Dynamic shared memory of a launch, in bytes.
    pub fn smem_bytes(self) -> usize {
        match self {
            AttnKernel::Mma { head_dim } => 3 * 64 * (head_dim + 8) * 2 + 128 * 4,
            // Q, K and V double-buffered (64 x head_dim each), two relative-bias rows, and
            // slack to align the swizzled tiles to 1024 bytes.
            AttnKernel::Wgmma { head_dim } => 5 * 64 * head_dim * 2 + 2 * 128 * 4 + 1024,
            AttnKernel::Simt { .. } => 0,
        }
    }

    fn name<T: AttnElement>(self) -> String {
        match self {
            AttnKernel::Mma { head_dim } => format!("attn_fwd_{}_d{head_dim}", T::NAME),
            AttnKernel::Wgmma { head_dim } => format!("attn_fwd_wgmma_{}_d{head_dim}", T::NAME),
            AttnKernel::Simt { per_lane } => format!("attn_fwd_simt_{}_e{per_lane}", T::NAME),
        }
    }
}

/// The kernel that runs a call of `head_dim` on a device described by `info` when `path` is
/// asked for. [`AttnPath::Auto`] and [`AttnPath::Mma`] give [`AttnKernel::for_head_dim`] (the
/// `wgmma` kernel is opt-in until verified on an H100); [`AttnPath::Wgmma`] gives
/// [`AttnKernel::Wgmma`] on sm_90a for `head_dim` in [`WGMMA_HEAD_DIMS`], and
/// [`Error::Unsupported`] on any other architecture or `head_dim`. Needs no GPU.
pub fn kernel_for(info: &DeviceInfo, head_dim: usize, path: AttnPath) -> Result<AttnKernel> {
    match path {
        AttnPath::Auto | AttnPath::Mma => AttnKernel::for_head_dim(head_dim),
        AttnPath::Wgmma => {
            if !info.has_sm90a() {
                return Err(Error::Unsupported(format!(
                    "the wgmma attention kernel needs an sm_90a device; {} is {}",
                    info.name, info.arch
                )));
            }
            if !WGMMA_HEAD_DIMS.contains(&head_dim) {
                return Err(Error::Unsupported(format!(
                    "the wgmma attention kernel takes head_dim 64 or 128, not {head_dim}"
                )));
            }
            Ok(AttnKernel::Wgmma { head_dim })
        }
    }
}

/// The sizes of a call's padding and bias, as [`validate`] sees them.
#[derive(Debug, Clone, Copy)]
enum PaddingDesc<'a> {
    None,
    Host(&'a [usize]),
    DeviceLengths(usize),
    Mask(usize),
}

#[derive(Debug, Clone, Copy)]
enum BiasDesc {
    None,
    Dense {
        len: usize,
        batch_stride: usize,
        head_stride: usize,
        q_stride: usize,
    },
    Relative {
        len: usize,
        num_buckets: usize,
        max_distance: usize,
        bidirectional: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct ParamsDesc<'a> {
    scale: f32,
    causal: bool,
    q_offset: usize,
    padding: PaddingDesc<'a>,
    bias: BiasDesc,
}

impl<'a> ParamsDesc<'a> {
    fn of(p: &'a DeviceAttentionParams<'_>) -> Self {
        ParamsDesc {
            scale: p.scale,
            causal: p.causal,
            q_offset: p.q_offset,
            padding: match &p.padding {
                DevicePadding::None => PaddingDesc::None,
                DevicePadding::Lengths(l) => PaddingDesc::Host(l),
                DevicePadding::DeviceLengths(l) => PaddingDesc::DeviceLengths(l.len()),
                DevicePadding::Mask(m) => PaddingDesc::Mask(m.len()),
            },
            bias: match &p.bias {
                DeviceBias::None => BiasDesc::None,
                DeviceBias::Dense {
                    data,
                    batch_stride,
                    head_stride,
                    q_stride,
                } => BiasDesc::Dense {
                    len: data.len(),
                    batch_stride: *batch_stride,
                    head_stride: *head_stride,
                    q_stride: *q_stride,
                },
                DeviceBias::Relative {
                    table,
                    num_buckets,
                    max_distance,
                    bidirectional,
                } => BiasDesc::Relative {
                    len: table.len(),
                    num_buckets: *num_buckets,
                    max_distance: *max_distance,
                    bidirectional: *bidirectional,
                },
            },
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::Invalid(tessera_core::Error::InvalidArgument(msg))
}

fn stride_i64(what: &str, s: usize) -> Result<i64> {
    i64::try_from(s).map_err(|_| {
        Error::Invalid(tessera_core::Error::Overflow {
            what: format!("{what} stride {s} does not fit i64"),
        })
    })
}

/// Validates a call on the host (everything [`check_attention`] checks, the device padding and
/// bias sizes, and the kernels' integer and grid limits) and picks the kernel.
fn validate(
    shape: &AttentionShape,
    q: (usize, &HeadLayout),
    k: (usize, &HeadLayout),
    v: (usize, &HeadLayout),
    o: (usize, &HeadLayout),
    p: &ParamsDesc<'_>,
) -> Result<AttnKernel> {
    let core = AttentionParams {
        scale: p.scale,
        causal: p.causal,
        q_offset: p.q_offset,
        padding: match p.padding {
            PaddingDesc::Host(l) => KeyPadding::Lengths(l),
            _ => KeyPadding::None,
        },
        bias: tessera_core::attention::Bias::None,
    };
    check_attention(shape, q, k, v, o, &core)?;
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        n_heads,
        ..
    } = *shape;
    match p.padding {
        PaddingDesc::None | PaddingDesc::Host(_) => {}
        PaddingDesc::DeviceLengths(len) => {
            tessera_core::shape::check_len("device padding lengths", batch, len)?;
        }
        PaddingDesc::Mask(len) => {
            let expected = tessera_core::shape::checked_mul(batch, kv_len, "padding mask")?;
            tessera_core::shape::check_len("padding mask", expected, len)?;
        }
    }
    match p.bias {
        BiasDesc::None => {}
        BiasDesc::Dense {
            len,
            batch_stride,
            head_stride,
            q_stride,
        } => {
            if batch > 0 && q_len > 0 && n_heads > 0 && kv_len > 0 {
                let term = |n: usize, s: usize| (n - 1).checked_mul(s);
                let needed = term(batch, batch_stride)
                    .and_then(|x| x.checked_add(term(n_heads, head_stride)?))
                    .and_then(|x| x.checked_add(term(q_len, q_stride)?))
                    .and_then(|x| x.checked_add(kv_len))
                    .ok_or_else(|| {
                        Error::Invalid(tessera_core::Error::Overflow {
                            what: "extent of the dense bias".into(),
                        })
                    })?;
                if len < needed {
                    return Err(invalid(format!(
                        "bias: buffer holds {len} elements but a [{batch}, {n_heads}, {q_len}, {kv_len}] bias with strides ({batch_stride}, {head_stride}, {q_stride}, 1) needs {needed}"
                    )));
                }
            }
        }
        BiasDesc::Relative {
            len,
            num_buckets,
            max_distance,
            bidirectional,
        } => {
            let expected =
                tessera_core::shape::checked_mul(num_buckets, n_heads, "relative bias table")?;
            if len != expected {
                return Err(Error::Invalid(tessera_core::Error::LengthMismatch {
                    name: "relative bias table ([num_buckets, n_heads])",
                    expected,
                    actual: len,
                }));
            }
            let buckets = if bidirectional {
                num_buckets / 2
            } else {
                num_buckets
            };
            let max_exact = buckets / 2;
            if max_exact == 0 || max_distance <= max_exact {
                return Err(invalid(format!(
                    "relative bias: need num_buckets >= {} and max_distance > {max_exact}, got {num_buckets} and {max_distance}",
                    if bidirectional { 4 } else { 2 },
                )));
            }
            dim_i32("num_buckets", num_buckets)?;
        }
    }
    let kernel = AttnKernel::for_head_dim(shape.head_dim)?;
    // The kernels index with int: positions up to q_offset + q_len and kv_len, plus a tile.
    let q_end = p
        .q_offset
        .checked_add(q_len)
        .and_then(|x| x.checked_add(128));
    dim_i32("q_offset + q_len + 128", q_end.unwrap_or(usize::MAX))?;
    dim_i32("kv_len + 128", kv_len.saturating_add(128))?;
    grid("attention heads", n_heads, 1, true)?;
    grid("attention batch", batch, 1, true)?;
    grid("attention query tiles", q_len, 4, false)?;
    Ok(kernel)
}

/// Whether every stride of `l` that a `[batch, seq, heads, _]` operand uses is a multiple of
/// `m` elements.
fn strides_multiple(l: &HeadLayout, batch: usize, seq: usize, heads: usize, m: usize) -> bool {
    (batch <= 1 || l.batch_stride.is_multiple_of(m))
        && (seq <= 1 || l.seq_stride.is_multiple_of(m))
        && (heads <= 1 || l.head_stride.is_multiple_of(m))
}

/// Fused attention on the device: writes `out[b, i, h, :] = softmax_j(scale·q·kᵀ + bias +
/// mask)·v` for every batch entry, query row and head (see the [module documentation](self)).
///
/// `q` is `[batch, q_len, n_heads, head_dim]` in `q_layout`, `k` and `v` are `[batch, kv_len,
/// n_kv_heads, head_dim]`, `out` is `[batch, q_len, n_heads, head_dim]` f32 in `out_layout`
/// (elements outside the operand, e.g. gaps between rows, are never written). Only the
/// launch is enqueued: synchronize (or download) to see the result or a kernel fault.
///
/// # Errors
/// Before anything is launched, with nothing written: any operand too short for its layout,
/// an output layout that maps two elements to one place, `n_kv_heads` not dividing `n_heads`,
/// `head_dim` outside `1..=1024`, padding or bias of the wrong size, a relative table with
/// too few buckets, sizes past the kernels' 32-bit positions or the grid limits (`batch` and
/// `n_heads` at most 65535): see [`check_attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention<T: AttnElement>(
    dev: &Device,
    shape: &AttentionShape,
    q: &impl DevicePtr<T>,
    q_layout: HeadLayout,
    k: &impl DevicePtr<T>,
    k_layout: HeadLayout,
    v: &impl DevicePtr<T>,
    v_layout: HeadLayout,
    params: &DeviceAttentionParams<'_>,
    out: &mut impl DevicePtrMut<f32>,
    out_layout: HeadLayout,
) -> Result<()> {
    attention_with_path(
        dev,
        AttnPath::Auto,
        shape,
        q,
        q_layout,
        k,
        k_layout,
        v,
        v_layout,
        params,
        out,
        out_layout,
    )
}

/// [`attention`] with the kernel family chosen by `path` (see [`kernel_for`]):
/// [`AttnPath::Wgmma`] runs the Hopper kernel, which is opt-in until it has been verified on an
/// H100.
///
/// # Errors
/// Those of [`attention`], and [`Error::Unsupported`] for [`AttnPath::Wgmma`] on a device that
/// is not sm_90a or with a `head_dim` outside [`WGMMA_HEAD_DIMS`] (whatever the size, empty
/// problems included; nothing is launched).
#[allow(clippy::too_many_arguments)]
pub fn attention_with_path<T: AttnElement>(
    dev: &Device,
    path: AttnPath,
    shape: &AttentionShape,
    q: &impl DevicePtr<T>,
    q_layout: HeadLayout,
    k: &impl DevicePtr<T>,
    k_layout: HeadLayout,
    v: &impl DevicePtr<T>,
    v_layout: HeadLayout,
    params: &DeviceAttentionParams<'_>,
    out: &mut impl DevicePtrMut<f32>,
    out_layout: HeadLayout,
) -> Result<()> {
    let desc = ParamsDesc::of(params);
    let kernel = validate(
        shape,
        (q.len(), &q_layout),
        (k.len(), &k_layout),
        (v.len(), &v_layout),
        (out.len(), &out_layout),
        &desc,
    )?;
    let kernel = match path {
        AttnPath::Auto | AttnPath::Mma => kernel,
        AttnPath::Wgmma => kernel_for(dev.info(), shape.head_dim, path)?,
    };
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        n_heads,
        n_kv_heads,
        head_dim,
    } = *shape;
    if batch == 0 || q_len == 0 || n_heads == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let uploaded = match &params.padding {
        DevicePadding::Lengths(l) => {
            // Validated: every length is at most kv_len, which fits i32.
            let l32: Vec<u32> = l.iter().map(|&x| x as u32).collect();
            Some(dev.upload(&l32)?)
        }
        _ => None,
    };
    let smem = kernel.smem_bytes();
    let f = dev.function_with_smem(Family::Attention, &kernel.name::<T>(), smem)?;

    let (q_ptr, _rq) = q.device_ptr(stream);
    let (k_ptr, _rk) = k.device_ptr(stream);
    let (v_ptr, _rv) = v.device_ptr(stream);
    let (o_ptr, _ro) = out.device_ptr_mut(stream);
    let (len_ptr, _rl) = match (&params.padding, &uploaded) {
        (_, Some(buf)) => {
            let (p, r) = buf.device_ptr(stream);
            (p, Some(r))
        }
        (DevicePadding::DeviceLengths(l), None) => {
            let (p, r) = l.device_ptr(stream);
            (p, Some(r))
        }
        _ => (0, None),
    };
    let (mask_ptr, _rm) = match &params.padding {
        DevicePadding::Mask(m) => {
            let (p, r) = m.device_ptr(stream);
            (p, Some(r))
        }
        _ => (0, None),
    };
    let mut a = AttnArgs {
        q: q_ptr,
        k: k_ptr,
        v: v_ptr,
        o: o_ptr,
        lengths: len_ptr,
        mask: mask_ptr,
        q_bs: stride_i64("Q batch", q_layout.batch_stride)?,
        q_ss: stride_i64("Q seq", q_layout.seq_stride)?,
        q_hs: stride_i64("Q head", q_layout.head_stride)?,
        k_bs: stride_i64("K batch", k_layout.batch_stride)?,
        k_ss: stride_i64("K seq", k_layout.seq_stride)?,
        k_hs: stride_i64("K head", k_layout.head_stride)?,
        v_bs: stride_i64("V batch", v_layout.batch_stride)?,
        v_ss: stride_i64("V seq", v_layout.seq_stride)?,
        v_hs: stride_i64("V head", v_layout.head_stride)?,
        o_bs: stride_i64("O batch", out_layout.batch_stride)?,
        o_ss: stride_i64("O seq", out_layout.seq_stride)?,
        o_hs: stride_i64("O head", out_layout.head_stride)?,
        batch: dim_i32("batch", batch)?,
        q_len: dim_i32("q_len", q_len)?,
        kv_len: dim_i32("kv_len", kv_len)?,
        n_heads: dim_i32("n_heads", n_heads)?,
        group: dim_i32("group", n_heads / n_kv_heads)?,
        head_dim: dim_i32("head_dim", head_dim)?,
        q_offset: dim_i32("q_offset", params.q_offset)?,
        causal: i32::from(params.causal),
        scale: params.scale,
        ..AttnArgs::default()
    };
    let _rb = match &params.bias {
        DeviceBias::None => None,
        DeviceBias::Dense {
            data,
            batch_stride,
            head_stride,
            q_stride,
        } => {
            let (p, r) = data.device_ptr(stream);
            a.bias = p;
            a.bias_kind = 1;
            a.bias_bs = stride_i64("bias batch", *batch_stride)?;
            a.bias_hs = stride_i64("bias head", *head_stride)?;
            a.bias_qs = stride_i64("bias query", *q_stride)?;
            Some(r)
        }
        DeviceBias::Relative {
            table,
            num_buckets,
            max_distance,
            bidirectional,
        } => {
            let (p, r) = table.device_ptr(stream);
            a.bias = p;
            a.bias_kind = 2;
            a.num_buckets = dim_i32("num_buckets", *num_buckets)?;
            a.max_distance = i32::try_from(*max_distance).unwrap_or(i32::MAX);
            a.bidirectional = i32::from(*bidirectional);
            let buckets = if *bidirectional {
                num_buckets / 2
            } else {
                *num_buckets
            };
            let max_exact = buckets / 2;
            // As tessera_core::attention::relative_position_bucket computes it.
            a.rel_denom = ((*max_distance as f64) / (max_exact as f64)).ln() as f32;
            Some(r)
        }
    };
    let vec16 = q_ptr.is_multiple_of(16)
        && k_ptr.is_multiple_of(16)
        && v_ptr.is_multiple_of(16)
        && strides_multiple(&q_layout, batch, q_len, n_heads, 8)
        && strides_multiple(&k_layout, batch, kv_len, n_kv_heads, 8)
        && strides_multiple(&v_layout, batch, kv_len, n_kv_heads, 8);
    a.vec = i32::from(vec16);
    a.o_vec = i32::from(
        o_ptr.is_multiple_of(8) && strides_multiple(&out_layout, batch, q_len, n_heads, 2),
    );

    let cfg = match kernel {
        AttnKernel::Mma { .. } | AttnKernel::Wgmma { .. } => LaunchConfig {
            grid_dim: (
                grid("attention query tiles", q_len, 64, false)?,
                n_heads as u32,
                batch as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        },
        AttnKernel::Simt { .. } => LaunchConfig {
            grid_dim: (
                grid("attention query rows", q_len, 4, false)?,
                n_heads as u32,
                batch as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        },
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&a);
    // SAFETY: the kernel reads Q/K/V rows (b, s, h) for b < batch, s < q_len / kv_len,
    // h < n_heads / n_kv_heads, head_dim elements each, which `validate` proved inside the
    // buffers (check_attention's extents); it writes exactly the output rows of the validated,
    // disjoint out layout; lengths hold `batch` values (host lengths uploaded above, device
    // lengths checked), the mask batch·kv_len bytes, a dense bias every (b, h, i, j) the shape
    // reaches, a relative table num_buckets·n_heads floats with max_distance > max_exact >= 1;
    // 16-byte loads (`vec`) and 8-byte stores (`o_vec`) are enabled only when the pointers and
    // every used stride allow them; `AttnArgs` matches the C struct; grid and dynamic shared
    // memory are the kernel's documented geometry (smem limit raised by function_with_smem);
    // the wgmma kernel (same reads and writes) is selected only on sm_90a (kernel_for).
    unsafe { b.launch(cfg) }.ctx(|| format!("launching {}", kernel.name::<T>()))?;
    Ok(())
}

/// T5 buckets of relative positions `rp0 .. rp0 + n`, computed by the kernels' device code (for
/// tests comparing it with [`tessera_core::attention::relative_position_bucket`]).
///
/// # Errors
/// The same bucket constraints as [`DeviceBias::Relative`], `n` or positions past `i32`.
pub fn relative_buckets(
    dev: &Device,
    rp0: i64,
    n: usize,
    num_buckets: usize,
    max_distance: usize,
    bidirectional: bool,
) -> Result<Vec<usize>> {
    let buckets = if bidirectional {
        num_buckets / 2
    } else {
        num_buckets
    };
    let max_exact = buckets / 2;
    if max_exact == 0 || max_distance <= max_exact {
        return Err(invalid(format!(
            "relative bias: need more buckets and max_distance > {max_exact}, got {num_buckets} and {max_distance}"
        )));
    }
    let n32 = dim_i32("bucket probe count", n)?;
    let rp0_32 = i32::try_from(rp0)
        .ok()
        .filter(|&r| i64::from(r) + n as i64 <= i64::from(i32::MAX))
        .ok_or_else(|| invalid(format!("positions {rp0} + {n} exceed i32")))?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let denom = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let nb = dim_i32("num_buckets", num_buckets)?;
    let bi = i32::from(bidirectional);
    let mut out = dev.alloc_zeros::<i32>(n)?;
    let f = dev.function(Family::Attention, "attn_rel_bucket_probe")?;
    let cfg = crate::launch::grid_stride(dev, n);
    let stream = dev.stream();
    {
        let (ptr, _r) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(&f);
        b.arg(&ptr)
            .arg(&rp0_32)
            .arg(&n32)
            .arg(&bi)
            .arg(&nb)
            .arg(&denom);
        // SAFETY: attn_rel_bucket_probe(int*, int, int, int, int, float) writes out[t] for
        // t < n; `out` holds n ints; the argument types match the C signature.
        unsafe { b.launch(cfg) }.ctx(|| "launching attn_rel_bucket_probe".into())?;
    }
    Ok(dev
        .download(&out)?
        .into_iter()
        .map(|x| x.max(0) as usize)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(
        batch: usize,
        q_len: usize,
        kv_len: usize,
        h: usize,
        kvh: usize,
        d: usize,
    ) -> AttentionShape {
        AttentionShape {
            batch,
            q_len,
            kv_len,
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: d,
        }
    }

    fn none() -> ParamsDesc<'static> {
        ParamsDesc {
            scale: 1.0,
            causal: false,
            q_offset: 0,
            padding: PaddingDesc::None,
            bias: BiasDesc::None,
        }
    }

    fn run(s: &AttentionShape, p: &ParamsDesc<'_>) -> Result<AttnKernel> {
        let ql = HeadLayout::bshd(s.q_len, s.n_heads, s.head_dim);
        let kl = HeadLayout::bshd(s.kv_len, s.n_kv_heads, s.head_dim);
        let qn = ql.extent(s.batch, s.q_len, s.n_heads, s.head_dim)?;
        let kn = kl.extent(s.batch, s.kv_len, s.n_kv_heads, s.head_dim)?;
        validate(s, (qn, &ql), (kn, &kl), (kn, &kl), (qn, &ql), p)
    }

    #[test]
    fn kernel_choice() {
        for d in MMA_HEAD_DIMS {
            assert_eq!(
                AttnKernel::for_head_dim(d).unwrap(),
                AttnKernel::Mma { head_dim: d }
            );
        }
        for d in [1, 16, 24, 100, 256] {
            assert_eq!(
                AttnKernel::for_head_dim(d).unwrap(),
                AttnKernel::Simt { per_lane: 8 }
            );
        }
        for d in [257, 1000, 1024] {
            assert_eq!(
                AttnKernel::for_head_dim(d).unwrap(),
                AttnKernel::Simt { per_lane: 32 }
            );
        }
        assert!(AttnKernel::for_head_dim(1025).is_err());
        // The header's figures.
        assert_eq!(AttnKernel::Mma { head_dim: 128 }.smem_bytes(), 52_736);
        assert_eq!(AttnKernel::Wgmma { head_dim: 128 }.smem_bytes(), 83_968);
        assert_eq!(AttnKernel::Wgmma { head_dim: 64 }.smem_bytes(), 43_008);
    }

    #[test]
    fn validation_refuses_bad_calls() {
        let s = shape(2, 3, 5, 4, 2, 64);
        assert!(run(&s, &none()).is_ok());
        // Heads that do not divide, head_dim 0 and past MAX_HEAD_DIM.
        assert!(run(&shape(2, 3, 5, 4, 3, 64), &none()).is_err());
        assert!(run(&shape(2, 3, 5, 4, 0, 64), &none()).is_err());
        assert!(run(&shape(2, 3, 5, 4, 2, 0), &none()).is_err());
        assert!(run(&shape(1, 1, 1, 1, 1, 2048), &none()).is_err());
        // Short operands.
        let ql = HeadLayout::bshd(3, 4, 64);
        let kl = HeadLayout::bshd(5, 2, 64);
        let (qn, kn) = (2 * 3 * 4 * 64, 2 * 5 * 2 * 64);
        assert!(validate(&s, (qn, &ql), (kn, &kl), (kn, &kl), (qn, &ql), &none()).is_ok());
        assert!(validate(&s, (qn - 1, &ql), (kn, &kl), (kn, &kl), (qn, &ql), &none()).is_err());
        assert!(validate(&s, (qn, &ql), (kn - 1, &kl), (kn, &kl), (qn, &ql), &none()).is_err());
        assert!(validate(&s, (qn, &ql), (kn, &kl), (kn - 1, &kl), (qn, &ql), &none()).is_err());
        assert!(validate(&s, (qn, &ql), (kn, &kl), (kn, &kl), (qn - 1, &ql), &none()).is_err());
        // An overlapping output.
        let overlap = HeadLayout {
            batch_stride: 96,
            seq_stride: 32,
            head_stride: 4,
        };
        assert!(validate(&s, (qn, &ql), (kn, &kl), (kn, &kl), (qn, &overlap), &none()).is_err());
        // Padding of the wrong size, lengths past kv_len.
        let with = |padding| ParamsDesc { padding, ..none() };
        assert!(run(&s, &with(PaddingDesc::Host(&[5, 5]))).is_ok());
        assert!(run(&s, &with(PaddingDesc::Host(&[5, 6]))).is_err());
        assert!(run(&s, &with(PaddingDesc::Host(&[5]))).is_err());
        assert!(run(&s, &with(PaddingDesc::DeviceLengths(2))).is_ok());
        assert!(run(&s, &with(PaddingDesc::DeviceLengths(3))).is_err());
        assert!(run(&s, &with(PaddingDesc::Mask(10))).is_ok());
        assert!(run(&s, &with(PaddingDesc::Mask(9))).is_err());
        // Dense bias extents (broadcast over the batch).
        let dense = |len| ParamsDesc {
            bias: BiasDesc::Dense {
                len,
                batch_stride: 0,
                head_stride: 15,
                q_stride: 5,
            },
            ..none()
        };
        assert!(run(&s, &dense(60)).is_ok());
        assert!(run(&s, &dense(59)).is_err());
        let huge = ParamsDesc {
            bias: BiasDesc::Dense {
                len: usize::MAX,
                batch_stride: usize::MAX,
                head_stride: 0,
                q_stride: 0,
            },
            ..none()
        };
        assert!(run(&s, &huge).is_err());
        // Relative tables.
        let rel = |len, num_buckets, max_distance, bidirectional| ParamsDesc {
            bias: BiasDesc::Relative {
                len,
                num_buckets,
                max_distance,
                bidirectional,
            },
            ..none()
        };
        assert!(run(&s, &rel(32 * 4, 32, 128, true)).is_ok());
        assert!(run(&s, &rel(31 * 4, 32, 128, true)).is_err());
        assert!(run(&s, &rel(3 * 4, 3, 128, true)).is_err());
        assert!(run(&s, &rel(32 * 4, 32, 8, true)).is_err());
        assert!(run(&s, &rel(32 * 4, 32, 9, true)).is_ok());
        assert!(run(&s, &rel(2 * 4, 2, 2, false)).is_ok());
        // Positions and grids past the kernels' limits.
        let far = ParamsDesc {
            q_offset: i32::MAX as usize,
            causal: true,
            ..none()
        };
        assert!(run(&s, &far).is_err());
        assert!(run(&shape(1, 1, 1, 70_000, 1, 64), &none()).is_err());
        assert!(run(&shape(70_000, 1, 1, 1, 1, 64), &none()).is_err());
        assert!(run(&shape(65_535, 1, 1, 1, 1, 64), &none()).is_ok());
        // Empty problems are valid.
        assert!(run(&shape(0, 3, 5, 4, 2, 64), &none()).is_ok());
        assert!(run(&shape(2, 0, 5, 4, 2, 64), &none()).is_ok());
        assert!(run(&shape(2, 3, 0, 4, 2, 64), &none()).is_ok());
    }

    #[test]
    fn vector_load_legality() {
        let l = HeadLayout::bshd(7, 3, 64);
        assert!(strides_multiple(&l, 2, 7, 3, 8));
        let odd = HeadLayout::bshd(7, 3, 68);
        assert!(!strides_multiple(&odd, 2, 7, 3, 8));
        // A stride that is never used does not matter.
        assert!(strides_multiple(
            &HeadLayout {
                batch_stride: 3,
                seq_stride: 8,
                head_stride: 5
            },
            1,
            2,
            1,
            8
        ));
        assert!(!strides_multiple(
            &HeadLayout {
                batch_stride: 3,
                seq_stride: 8,
                head_stride: 5
            },
            1,
            2,
            2,
            8
        ));
    }
}
