//! A paged KV cache in device memory (`cuda/kv_cache.cu`): append, and decode attention over
//! the pages.
//!
//! [`DeviceKvCache`] is the CPU family's `KvCache` on the GPU: one layer's keys and values for
//! a batch of sequences of different lengths, each named by a [`SeqId`], stored in pages of
//! `T` tokens ([`KvLayout::Paged`]: `num_blocks` blocks of `block_size` tokens shared through a
//! free list; [`KvLayout::Contiguous`]: one page of `max_len` tokens per sequence slot), as f32,
//! f16 or Q8_0 ([`KvDType`]). The bookkeeping (slots with generations, block tables, free list,
//! lengths) is the CPU cache's, [`tessera_core::kv_cache::PageBook`], on the host; the block
//! tables and lengths are mirrored on the device, updated by a small scatter kernel with each
//! operation that changes them.
//!
//! # Device storage
//! Page `p` holds, for K and then for V, `[n_kv_heads][T]` rows (head-major, as on the CPU):
//! row `((p·2 + half)·n_kv_heads + head)·T + tok` of the pool. A row is `head_dim` values
//! rounded up to whole 16-byte vectors: f32 and f16 rows hold `round_up(head_dim, 8)` elements,
//! Q8_0 rows `32·⌈head_dim/32⌉` int8 quants with their `⌈head_dim/32⌉` f16 scales in a separate
//! pool (GGML's `block_q8_0`, its two fields split so that every row of quants is aligned).
//! Elements past `head_dim` are zero. Stored values are the CPU cache's bit for bit: f16 rounds
//! to nearest even, Q8_0 is [`tessera_core::quant`]'s quantizer (see the bounds on
//! [`KvDType`]).
//!
//! Every operation validates its arguments before it launches anything: an `Err` leaves the
//! cache as it was (in particular [`DeviceKvCache::append`] checks the capacity of the whole
//! batch before a single row is written), and no error can touch another sequence's pages.
//!
//! # Decode attention
//! [`DeviceKvCache::decode_attention`] lets one new query token per sequence attend to all its
//! cached tokens: [`tessera_core::reference::attention`] with `q_len = 1` and
//! `q_offset = len − 1` on the stored values, in f32. One block per (sequence, key/value head,
//! partition of [`PARTITION`] keys) computes the scores of all query heads sharing the key/value
//! head (any GQA ratio) straight from the pages through the block table (16-byte loads), the
//! partition's softmax and weighted sum of V; sequences longer than a partition are combined
//! by a second kernel (flash-decoding), in a fixed order, so results do not depend on timing.

use crate::compile::Family;
use crate::error::DriverContext;
use crate::launch::{dim_i32, grid};
use crate::{Device, Error, Result};
use cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use tessera_core::attention::{
    AttentionParams, AttentionShape, Bias, HeadLayout, KeyPadding, MAX_HEAD_DIM, check_attention,
};
use tessera_core::f16;
use tessera_core::kv_cache::{AppendPlan, PageBook};
use tessera_core::quant::QK;

/// Keys per partition of decode attention: longer sequences are split into partitions of this
/// many keys, each computed by its own block, and combined in order by a second kernel.
pub const PARTITION: usize = 512;

/// The cache's types, the CPU family's (see [`tessera_core::kv_cache`]).
pub use tessera_core::kv_cache::{KvCacheConfig, KvDType, KvLayout, SeqId};

/// T5's relative-position bias for decode attention: the query sits at position `len − 1`,
/// keys at `0..len`; `table` is `[num_buckets, n_heads]` on the device.
#[derive(Debug)]
pub struct DeviceRelativeBias<'a> {
    /// `[num_buckets, n_heads]` row-major.
    pub table: CudaView<'a, f32>,
    /// Buckets (32 in T5).
    pub num_buckets: usize,
    /// Distance beyond which all positions share the last bucket (128 in T5).
    pub max_distance: usize,
    /// Encoder (`true`) or decoder (normally `false` for decoding).
    pub bidirectional: bool,
}

/// Everything about a decode-attention call besides its operands.
#[derive(Debug)]
pub struct DeviceDecodeParams<'a> {
    /// Multiplies `q · k`.
    pub scale: f32,
    /// T5's relative-position bias, or none.
    pub bias: Option<DeviceRelativeBias<'a>>,
}

impl DeviceDecodeParams<'_> {
    /// Scale `1/√head_dim`, no bias.
    pub fn new(head_dim: usize) -> Self {
        DeviceDecodeParams {
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            bias: None,
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::Invalid(tessera_core::Error::InvalidArgument(msg))
}

fn overflow(what: &str) -> Error {
    Error::Invalid(tessera_core::Error::Overflow {
        what: what.to_string(),
    })
}

/// The pool token index `page·T + tok` of every new token row of `plan`, sequence-major.
fn dst_rows(plan: &AppendPlan, page_tokens: usize) -> Result<Vec<u32>> {
    let n_tokens = plan.n_tokens();
    let rows = plan
        .len()
        .checked_mul(n_tokens)
        .ok_or_else(|| overflow("appended rows"))?;
    let mut dst = Vec::new();
    dst.try_reserve_exact(rows)
        .map_err(|e| invalid(format!("KV cache append: {e}")))?;
    for b in 0..plan.len() {
        let len = plan.seq(b).old_len;
        for pos in len..len + n_tokens {
            // page·T + tok < pages·T <= u32::MAX (checked by `DeviceKvCache::new`).
            dst.push(plan.page(b, pos) * page_tokens as u32 + (pos % page_tokens) as u32);
        }
    }
    Ok(dst)
}

// ---------------------------------------------------------------------------------------
// Kernel argument blocks: the C structs of cuda/kv_cache.cu, field for field.

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct KvAppendArgs {
    k: u64,
    v: u64,
    data: u64,
    scales: u64,
    dst: u64,
    k_bs: i64,
    k_ss: i64,
    k_hs: i64,
    v_bs: i64,
    v_ss: i64,
    v_hs: i64,
    row_stride: i64,
    warps: i64,
    n_tokens: i32,
    nkv: i32,
    head_dim: i32,
    page_tokens: i32,
    nb: i32,
    pad_: i32,
}
const _: () = assert!(std::mem::size_of::<KvAppendArgs>() == 128);

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct KvDecodeArgs {
    data: u64,
    scales: u64,
    tables: u64,
    lens: u64,
    slots: u64,
    q: u64,
    out: u64,
    partials: u64,
    rel_table: u64,
    q_bs: i64,
    q_hs: i64,
    o_bs: i64,
    o_hs: i64,
    row_stride: i64,
    nb: i32,
    page_tokens: i32,
    nkv: i32,
    n_heads: i32,
    group: i32,
    head_dim: i32,
    hsplit: i32,
    table_cap: i32,
    parts_max: i32,
    lpk: i32,
    pieces: i32,
    num_buckets: i32,
    bidirectional: i32,
    scale: f32,
    rel_denom: f32,
    pad_: i32,
}
const _: () = assert!(std::mem::size_of::<KvDecodeArgs>() == 176);

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct KvCombineArgs {
    partials: u64,
    lens: u64,
    slots: u64,
    out: u64,
    o_bs: i64,
    o_hs: i64,
    n_heads: i32,
    head_dim: i32,
    parts_max: i32,
    pad_: i32,
}
const _: () = assert!(std::mem::size_of::<KvCombineArgs>() == 64);

// SAFETY: `repr(C)` plain data whose layout matches the C struct the kernels take by value
// (sizes checked above and by static_assert in cuda/kv_cache.cu); the same for the two below.
unsafe impl DeviceRepr for KvAppendArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for KvDecodeArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for KvCombineArgs {}

/// The decode launch shape for a head dimension and GQA group (host-side, see
/// `kv_decode` in cuda/kv_cache.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DecodeGeometry {
    /// Query heads per block (a power of two, at most 8, `hb·row_stride <= 1024`).
    hb: usize,
    /// Blocks per key/value head: `⌈group / hb⌉`.
    hsplit: usize,
    /// Lanes per key: the next power of two of the row's 8-element pieces, at most 32.
    lpk: usize,
    /// 8-element pieces per row.
    pieces: usize,
    /// Dynamic shared memory in bytes.
    smem: usize,
}

impl DecodeGeometry {
    fn new(row_stride: usize, group: usize) -> DecodeGeometry {
        let mut hb = group.clamp(1, 8).next_power_of_two();
        while hb > 1 && hb * row_stride > 1024 {
            hb /= 2;
        }
        let pieces = row_stride / 8;
        DecodeGeometry {
            hb,
            hsplit: group.div_ceil(hb),
            lpk: pieces.next_power_of_two().min(32),
            pieces,
            smem: 4 * (5 * hb * row_stride + hb * PARTITION + 2 * hb),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The cache.

#[derive(Debug)]
enum Pool {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    Q8 {
        qs: CudaSlice<i8>,
        scales: CudaSlice<f16>,
    },
}

/// The device copy of the block tables and lengths: `tables[slot·table_cap + i]` is page `i` of
/// the sequence in `slot`, `lens[slot]` its length.
#[derive(Debug)]
struct Mirror {
    tables: CudaSlice<u32>,
    lens: CudaSlice<u32>,
    slot_cap: usize,
    table_cap: usize,
    /// Rebuild from the host book before the next device use.
    stale: bool,
    /// Updates not yet sent: (index, value) of `tables` and of `lens`.
    tables_pending: Vec<(u32, u32)>,
    lens_pending: Vec<(u32, u32)>,
}

/// One layer's key/value cache in device memory (see the [module documentation](self)).
#[derive(Debug)]
pub struct DeviceKvCache {
    config: KvCacheConfig,
    page_tokens: usize,
    pages: usize,
    /// Storage elements per row (f32/f16: `round_up(head_dim, 8)`; Q8_0: `32·nb`).
    row_stride: usize,
    /// Q8_0 blocks per row (0 otherwise).
    nb: usize,
    pool: Pool,
    /// Sequences, lengths, block tables and the free list (on the host).
    book: PageBook,
    mirror: Mirror,
    /// Upload buffer of the per-call metadata (token rows, table updates, batch slots).
    staging: CudaSlice<u32>,
    /// Partial results of multi-partition decodes.
    partials: CudaSlice<f32>,
}

/// Keeps, for each index, only the last of its (index, value) updates, in index order.
fn last_update_only(updates: &mut Vec<(u32, u32)>) {
    // Stable: the updates of one index stay in the order they were made.
    updates.sort_by_key(|&(i, _)| i);
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(updates.len());
    for &(i, v) in updates.iter() {
        match out.last_mut() {
            Some(last) if last.0 == i => last.1 = v,
            _ => out.push((i, v)),
        }
    }
    *updates = out;
}

/// [`Error::Invalid`] unless `dev` is the device `buf` lives on.
fn same_device<T>(dev: &Device, buf: &CudaSlice<T>) -> Result<()> {
    if std::sync::Arc::ptr_eq(buf.context(), dev.context()) {
        Ok(())
    } else {
        Err(invalid(
            "KV cache: called with a device other than the one it was made on".into(),
        ))
    }
}

/// Grows `buf` to at least `n` elements (doubling), leaving its contents undefined.
fn ensure<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &Device,
    buf: &mut CudaSlice<T>,
    n: usize,
) -> Result<()> {
    if buf.len() < n {
        let cap = n.max(buf.len().saturating_mul(2)).max(1);
        *buf = dev.alloc_zeros::<T>(cap)?;
    }
    Ok(())
}

impl DeviceKvCache {
    /// An empty cache with every page allocated (zeroed) on `dev` up front.
    ///
    /// Errors when a size is 0, `head_dim` exceeds [`MAX_HEAD_DIM`], `n_kv_heads` exceeds
    /// `i32::MAX`, pages·tokens exceeds `u32::MAX` (the kernels' token index), the storage
    /// size overflows, or the allocation fails.
    pub fn new(dev: &Device, config: KvCacheConfig) -> Result<Self> {
        let (row_stride, nb, pages, page_tokens) = Self::sizes(&config)?;
        let book = PageBook::new(config.layout)?;
        let nkv = config.n_kv_heads;
        let rows = pages
            .checked_mul(2 * nkv)
            .and_then(|x| x.checked_mul(page_tokens))
            .ok_or_else(|| overflow("KV cache size"))?;
        let elems = rows
            .checked_mul(row_stride)
            .ok_or_else(|| overflow("KV cache size"))?;
        let pool = match config.dtype {
            KvDType::F32 => Pool::F32(dev.alloc_zeros::<f32>(elems)?),
            KvDType::F16 => Pool::F16(dev.alloc_zeros::<f16>(elems)?),
            KvDType::Q8_0 => Pool::Q8 {
                qs: dev.alloc_zeros::<i8>(elems)?,
                scales: dev.alloc_zeros::<f16>(
                    rows.checked_mul(nb)
                        .ok_or_else(|| overflow("KV cache size"))?,
                )?,
            },
        };
        let (slot_cap, table_cap) = if book.is_paged() {
            (8, pages.min(16))
        } else {
            (pages.min(64), 1)
        };
        Ok(DeviceKvCache {
            config,
            page_tokens,
            pages,
            row_stride,
            nb,
            pool,
            book,
            mirror: Mirror {
                tables: dev.alloc_zeros::<u32>(slot_cap * table_cap)?,
                lens: dev.alloc_zeros::<u32>(slot_cap)?,
                slot_cap,
                table_cap,
                stale: false,
                tables_pending: Vec::new(),
                lens_pending: Vec::new(),
            },
            staging: dev.alloc_zeros::<u32>(256)?,
            partials: dev.alloc_zeros::<f32>(1)?,
        })
    }

    /// (row_stride, nb, pages, page_tokens) of a configuration, validated.
    fn sizes(config: &KvCacheConfig) -> Result<(usize, usize, usize, usize)> {
        let KvCacheConfig {
            n_kv_heads,
            head_dim,
            dtype,
            layout,
        } = *config;
        if n_kv_heads == 0 || n_kv_heads > i32::MAX as usize {
            return Err(invalid(format!(
                "n_kv_heads {n_kv_heads} is outside 1..=i32::MAX"
            )));
        }
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(invalid(format!(
                "head_dim {head_dim} is outside 1..={MAX_HEAD_DIM}"
            )));
        }
        let (pages, page_tokens) = match layout {
            KvLayout::Contiguous { max_seqs, max_len } => (max_seqs, max_len),
            KvLayout::Paged {
                block_size,
                num_blocks,
            } => (num_blocks, block_size),
        };
        if pages == 0 || page_tokens == 0 {
            return Err(invalid(format!(
                "KV cache layout {layout:?} has a zero size"
            )));
        }
        if page_tokens > i32::MAX as usize
            || pages
                .checked_mul(page_tokens)
                .is_none_or(|t| t > u32::MAX as usize)
        {
            return Err(invalid(format!(
                "KV cache layout {layout:?}: more than u32::MAX token slots or i32::MAX tokens per page"
            )));
        }
        let (row_stride, nb) = match dtype {
            KvDType::F32 | KvDType::F16 => (head_dim.div_ceil(8) * 8, 0),
            KvDType::Q8_0 => (head_dim.div_ceil(QK) * QK, head_dim.div_ceil(QK)),
        };
        Ok((row_stride, nb, pages, page_tokens))
    }

    /// The configuration the cache was made with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Starts a new, empty sequence.
    ///
    /// Errors when no slot is free (contiguous layout: `max_seqs` live sequences) or when
    /// `u32::MAX` sequences are live.
    pub fn add_sequence(&mut self) -> Result<SeqId> {
        let (id, page) = self.book.add_sequence()?;
        let m = &mut self.mirror;
        let slot = id.slot();
        if slot as usize >= m.slot_cap {
            m.stale = true;
        } else if !m.stale {
            m.lens_pending.push((slot, 0));
            if let Some(p) = page {
                m.tables_pending
                    .push(((slot as usize * m.table_cap) as u32, p));
            }
        }
        Ok(id)
    }

    /// Ends a sequence: its slot (contiguous) or its blocks (paged) become free for reuse,
    /// and `seq` becomes stale. Errors for a stale or foreign id.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<()> {
        Ok(self.book.free_sequence(seq)?)
    }

    /// Tokens cached for `seq`. Errors for a stale or foreign id.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.book.seq_len(seq)?)
    }

    /// Free blocks (paged layout) or free sequence slots (contiguous layout).
    pub fn free_blocks(&self) -> usize {
        self.book.free_pages()
    }

    /// Rebuilds the device tables and lengths from the book (growing them as needed).
    fn rebuild_mirror(&mut self, dev: &Device) -> Result<()> {
        let book = &self.book;
        let slots = book.slots().max(1);
        let longest = (0..book.slots())
            .filter_map(|slot| book.slot(slot))
            .map(|s| s.pages.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let m = &mut self.mirror;
        m.stale = true;
        let slot_cap = if slots > m.slot_cap {
            slots.next_power_of_two()
        } else {
            m.slot_cap
        };
        let table_cap = if longest > m.table_cap {
            longest.next_power_of_two().min(self.pages)
        } else {
            m.table_cap
        };
        let entries = slot_cap
            .checked_mul(table_cap)
            .filter(|&e| e <= u32::MAX as usize)
            .ok_or_else(|| overflow("KV cache block tables"))?;
        let mut tables = vec![0u32; entries];
        let mut lens = vec![0u32; slot_cap];
        for slot in 0..book.slots() {
            if let Some(s) = book.slot(slot) {
                tables[slot * table_cap..][..s.pages.len()].copy_from_slice(s.pages);
                lens[slot] = s.len as u32;
            }
        }
        if slot_cap != m.slot_cap || table_cap != m.table_cap {
            m.tables = dev.alloc_zeros::<u32>(entries)?;
            m.lens = dev.alloc_zeros::<u32>(slot_cap)?;
            m.slot_cap = slot_cap;
            m.table_cap = table_cap;
        }
        let stream = dev.stream();
        stream
            .memcpy_htod(&tables, &mut m.tables)
            .ctx(|| "uploading the KV cache block tables".into())?;
        stream
            .memcpy_htod(&lens, &mut m.lens)
            .ctx(|| "uploading the KV cache lengths".into())?;
        m.tables_pending.clear();
        m.lens_pending.clear();
        m.stale = false;
        Ok(())
    }

    /// Uploads `head` to the start of the staging buffer; with `flush`, also brings the device
    /// mirror up to date first (rebuilding it if stale, else sending the pending updates after
    /// `head` and scattering them with `kv_scatter_u32`).
    fn stage(&mut self, dev: &Device, head: &[u32], flush: bool) -> Result<()> {
        if flush && self.mirror.stale {
            self.rebuild_mirror(dev)?;
        }
        if flush {
            // One scatter launch applies its pairs in parallel: keep only the last update of
            // each index (a reused slot, an added sequence appended to at once).
            last_update_only(&mut self.mirror.tables_pending);
            last_update_only(&mut self.mirror.lens_pending);
        }
        let (nt, nl) = if flush {
            (
                self.mirror.tables_pending.len(),
                self.mirror.lens_pending.len(),
            )
        } else {
            (0, 0)
        };
        let total = head.len() + 2 * (nt + nl);
        if total == 0 {
            return Ok(());
        }
        let mut host = Vec::with_capacity(total);
        host.extend_from_slice(head);
        if flush {
            for &(i, v) in self
                .mirror
                .tables_pending
                .iter()
                .chain(&self.mirror.lens_pending)
            {
                host.push(i);
                host.push(v);
            }
        }
        ensure(dev, &mut self.staging, total)?;
        let stream = dev.stream();
        if nt + nl > 0 {
            // Until the updates are applied the device mirror is unknown: a failure below
            // leaves it marked for a rebuild.
            self.mirror.stale = true;
        }
        stream
            .memcpy_htod(&host, &mut self.staging)
            .ctx(|| "uploading KV cache metadata".into())?;
        if nt + nl == 0 {
            return Ok(());
        }
        let f = dev.function(Family::KvCache, "kv_scatter_u32")?;
        let (base, _rs) = self.staging.device_ptr(stream);
        let m = &mut self.mirror;
        for (off, n, dst) in [
            (head.len(), nt, &mut m.tables),
            (head.len() + 2 * nt, nl, &mut m.lens),
        ] {
            if n == 0 {
                continue;
            }
            let pairs = base + (off * 4) as u64;
            let n32 = dim_i32("KV cache metadata updates", n)?;
            let cfg = crate::launch::grid_stride(dev, n);
            let (dptr, _rd) = dst.device_ptr_mut(stream);
            let mut b = stream.launch_builder(&f);
            b.arg(&pairs).arg(&n32).arg(&dptr);
            // SAFETY: kv_scatter_u32(const uint32_t*, int, uint32_t*) reads n (index, value)
            // pairs at `pairs`, inside the staging buffer just uploaded, and writes
            // dst[index]: table indices slot·table_cap + i with slot < slot_cap and
            // i < table_cap, length indices slot < slot_cap, inside the mirror buffers
            // (slot_cap·table_cap and slot_cap elements; pending updates are dropped whenever
            // the capacities change).
            unsafe { b.launch(cfg) }.ctx(|| "launching kv_scatter_u32".into())?;
        }
        m.tables_pending.clear();
        m.lens_pending.clear();
        m.stale = false;
        Ok(())
    }

    /// Appends `n_tokens` tokens to each sequence of `seqs`: `k` and `v` are
    /// `[seqs.len(), n_tokens, n_kv_heads, head_dim]` f32 in any layout, batch entry `b` going to
    /// `seqs[b]`.
    ///
    /// All or nothing: errors, before anything is launched and leaving the cache unchanged,
    /// for a stale, foreign or repeated id, an operand too short for its layout, or when the
    /// batch does not fit (contiguous: past `max_len`; paged: more new blocks needed than are
    /// free).
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        dev: &Device,
        seqs: &[SeqId],
        n_tokens: usize,
        k: &impl DevicePtr<f32>,
        k_layout: HeadLayout,
        v: &impl DevicePtr<f32>,
        v_layout: HeadLayout,
    ) -> Result<()> {
        same_device(dev, &self.staging)?;
        let (nkv, d) = (self.config.n_kv_heads, self.config.head_dim);
        for (name, len, layout) in [("K", k.len(), &k_layout), ("V", v.len(), &v_layout)] {
            let needed = layout.extent(seqs.len(), n_tokens, nkv, d)?;
            if len < needed {
                return Err(invalid(format!(
                    "{name}: buffer holds {len} elements but a [{}, {n_tokens}, {nkv}, {d}] operand with {layout:?} needs {needed}",
                    seqs.len()
                )));
            }
        }
        let plan = self.book.plan_append(seqs, n_tokens)?;
        let dst = dst_rows(&plan, self.page_tokens)?;
        if dst.is_empty() {
            return Ok(());
        }
        let warps = dst
            .len()
            .checked_mul(2 * nkv)
            .ok_or_else(|| overflow("appended rows"))?;
        let blocks = grid("KV cache append", warps, 4, false)?;
        let s64 = |x: usize| i64::try_from(x).map_err(|_| overflow("append stride"));
        let mut args = KvAppendArgs {
            k_bs: s64(k_layout.batch_stride)?,
            k_ss: s64(k_layout.seq_stride)?,
            k_hs: s64(k_layout.head_stride)?,
            v_bs: s64(v_layout.batch_stride)?,
            v_ss: s64(v_layout.seq_stride)?,
            v_hs: s64(v_layout.head_stride)?,
            row_stride: self.row_stride as i64,
            warps: warps as i64,
            n_tokens: dim_i32("n_tokens", n_tokens)?,
            nkv: nkv as i32,
            head_dim: d as i32,
            page_tokens: self.page_tokens as i32,
            nb: self.nb as i32,
            ..KvAppendArgs::default()
        };
        let kernel = match self.config.dtype {
            KvDType::F32 => "kv_append_f32",
            KvDType::F16 => "kv_append_f16",
            KvDType::Q8_0 => "kv_append_q8",
        };
        let f = dev.function(Family::KvCache, kernel)?;
        // Mirror updates of this append, if the mirror has room; otherwise rebuild after.
        let rebuild = self.mirror.stale
            || (0..plan.len()).any(|b| {
                let s = plan.seq(b);
                s.old_pages + s.new_pages.len() > self.mirror.table_cap
                    || s.slot as usize >= self.mirror.slot_cap
            });
        if !rebuild {
            let table_cap = self.mirror.table_cap;
            for b in 0..plan.len() {
                let s = plan.seq(b);
                for (i, &p) in s.new_pages.iter().enumerate() {
                    self.mirror
                        .tables_pending
                        .push(((s.slot as usize * table_cap + s.old_pages + i) as u32, p));
                }
                self.mirror
                    .lens_pending
                    .push((s.slot, (s.old_len + n_tokens) as u32));
            }
        }
        let launched = (|| -> Result<()> {
            self.stage(dev, &dst, !rebuild)?;
            let stream = dev.stream();
            let (kp, _rk) = k.device_ptr(stream);
            let (vp, _rv) = v.device_ptr(stream);
            let (dst, _rs) = self.staging.device_ptr(stream);
            let (data, _rd, scales, _rsc) = match &mut self.pool {
                Pool::F32(b) => {
                    let (p, r) = b.device_ptr_mut(stream);
                    (p, r, 0, None)
                }
                Pool::F16(b) => {
                    let (p, r) = b.device_ptr_mut(stream);
                    (p, r, 0, None)
                }
                Pool::Q8 { qs, scales } => {
                    let (p, r) = qs.device_ptr_mut(stream);
                    let (s, rs) = scales.device_ptr_mut(stream);
                    (p, r, s, Some(rs))
                }
            };
            args.k = kp;
            args.v = vp;
            args.data = data;
            args.scales = scales;
            args.dst = dst;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&args);
            // SAFETY: warp w < warps reads source row (b, t, head) of K or V, b < seqs.len(),
            // t < n_tokens, head < n_kv_heads, head_dim floats (inside the validated
            // extents), and writes one pool row (row_stride elements, plus nb scales) at
            // token index dst[r] = page·T + tok with page < pages (a page this append took
            // from the free list or the sequence already owned), all inside the pool.
            unsafe { b.launch(cfg) }
                .ctx(|| format!("launching {kernel}"))
                .map(drop)
        })();
        if let Err(e) = launched {
            // The device mirror may already hold this append's lengths and pages: rebuild it
            // from the (unchanged) book before its next use.
            self.mirror.stale = true;
            return Err(e);
        }
        self.book.commit(plan);
        if rebuild {
            self.rebuild_mirror(dev)?;
        }
        Ok(())
    }

    /// Attention of one new query token per sequence over everything the sequence has cached.
    ///
    /// * `q`, `out`: `[seqs.len(), 1, n_heads, head_dim]` f32 in any [`HeadLayout`] (`out`'s
    ///   disjoint); row `b` belongs to `seqs[b]`; elements outside the operand are not written;
    /// * `n_heads`: a positive multiple of the cache's `n_kv_heads`; query head `h` uses
    ///   key/value head `h / (n_heads / n_kv_heads)`;
    /// * every cached key of each sequence is attended (append the new token's K and V first);
    ///   a sequence with no tokens yields zeros.
    ///
    /// The result is [`tessera_core::reference::attention`]'s with `q_len = 1` and `q_offset =
    /// len − 1` on the stored (dequantized) keys and values, up to f32 rounding and `expf`
    /// (2 ulp). Only the launches are enqueued.
    ///
    /// # Errors
    /// Before anything is launched: a stale, foreign or repeated id, bad head counts, operands
    /// too short for their layouts, an overlapping output layout, a malformed bias table, more
    /// than 65535 sequences.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &mut self,
        dev: &Device,
        seqs: &[SeqId],
        n_heads: usize,
        q: &impl DevicePtr<f32>,
        q_layout: HeadLayout,
        params: &DeviceDecodeParams<'_>,
        out: &mut impl DevicePtrMut<f32>,
        out_layout: HeadLayout,
    ) -> Result<()> {
        same_device(dev, &self.staging)?;
        let (nkv, d) = (self.config.n_kv_heads, self.config.head_dim);
        if n_heads == 0 || !n_heads.is_multiple_of(nkv) {
            return Err(invalid(format!(
                "n_heads ({n_heads}) must be a positive multiple of the cache's n_kv_heads ({nkv})"
            )));
        }
        let batch = seqs.len();
        let shape = AttentionShape {
            batch,
            q_len: 1,
            kv_len: 0,
            n_heads,
            n_kv_heads: nkv,
            head_dim: d,
        };
        let none = HeadLayout::bshd(0, nkv, d);
        let core = AttentionParams {
            scale: params.scale,
            causal: false,
            q_offset: 0,
            padding: KeyPadding::None,
            bias: Bias::None,
        };
        check_attention(
            &shape,
            (q.len(), &q_layout),
            (0, &none),
            (0, &none),
            (out.len(), &out_layout),
            &core,
        )?;
        let mut rel_denom = 0.0f32;
        if let Some(rb) = &params.bias {
            let expected =
                tessera_core::shape::checked_mul(rb.num_buckets, n_heads, "relative bias table")?;
            tessera_core::shape::check_len(
                "relative bias table ([num_buckets, n_heads])",
                expected,
                rb.table.len(),
            )?;
            let buckets = if rb.bidirectional {
                rb.num_buckets / 2
            } else {
                rb.num_buckets
            };
            let max_exact = buckets / 2;
            if max_exact == 0 || rb.max_distance <= max_exact {
                return Err(invalid(format!(
                    "relative bias: need num_buckets >= {} and max_distance > {max_exact}, got {} and {}",
                    if rb.bidirectional { 4 } else { 2 },
                    rb.num_buckets,
                    rb.max_distance
                )));
            }
            dim_i32("num_buckets", rb.num_buckets)?;
            rel_denom = ((rb.max_distance as f64) / (max_exact as f64)).ln() as f32;
        }
        let lens = self.book.batch_lens(seqs, "decode_attention")?;
        if batch == 0 {
            return Ok(());
        }
        grid("decode batch", batch, 1, true)?;
        dim_i32("n_heads", n_heads)?;
        let group = n_heads / nkv;
        let geo = DecodeGeometry::new(self.row_stride, group);
        grid("decode heads", nkv.saturating_mul(geo.hsplit), 1, true)?;
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let parts_max = max_len.div_ceil(PARTITION).max(1);
        let rec = d + 2;
        let partial_len = if parts_max > 1 {
            batch
                .checked_mul(n_heads)
                .and_then(|x| x.checked_mul(parts_max))
                .and_then(|x| x.checked_mul(rec))
                .ok_or_else(|| overflow("decode partial results"))?
        } else {
            0
        };
        let s64 = |x: usize| i64::try_from(x).map_err(|_| overflow("decode stride"));
        let mut args = KvDecodeArgs {
            q_bs: s64(q_layout.batch_stride)?,
            q_hs: s64(q_layout.head_stride)?,
            o_bs: s64(out_layout.batch_stride)?,
            o_hs: s64(out_layout.head_stride)?,
            row_stride: self.row_stride as i64,
            nb: self.nb as i32,
            page_tokens: self.page_tokens as i32,
            nkv: nkv as i32,
            n_heads: n_heads as i32,
            group: group as i32,
            head_dim: d as i32,
            hsplit: geo.hsplit as i32,
            parts_max: dim_i32("decode partitions", parts_max)?,
            lpk: geo.lpk as i32,
            pieces: geo.pieces as i32,
            scale: params.scale,
            rel_denom,
            ..KvDecodeArgs::default()
        };
        let dt = match self.config.dtype {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
            KvDType::Q8_0 => "q8",
        };
        let name = format!("kv_decode_{dt}_h{}", geo.hb);
        let f = dev.function_with_smem(Family::KvCache, &name, geo.smem)?;
        let fc = dev.function(Family::KvCache, "kv_combine")?;

        // Everything is validated: upload the batch's slots (and pending mirror updates).
        let slots: Vec<u32> = seqs.iter().map(|s| s.slot()).collect();
        self.stage(dev, &slots, true)?;
        if partial_len > 0 {
            ensure(dev, &mut self.partials, partial_len)?;
        }
        args.table_cap = self.mirror.table_cap as i32;
        let stream = dev.stream();
        let (qp, _rq) = q.device_ptr(stream);
        let (op, _ro) = out.device_ptr_mut(stream);
        let (sp, _rs) = self.staging.device_ptr(stream);
        let (tp, _rt) = self.mirror.tables.device_ptr(stream);
        let (lp, _rl) = self.mirror.lens.device_ptr(stream);
        let (pp, _rp) = self.partials.device_ptr_mut(stream);
        let (data, _rd, scales, _rsc) = match &self.pool {
            Pool::F32(b) => {
                let (p, r) = b.device_ptr(stream);
                (p, r, 0, None)
            }
            Pool::F16(b) => {
                let (p, r) = b.device_ptr(stream);
                (p, r, 0, None)
            }
            Pool::Q8 { qs, scales } => {
                let (p, r) = qs.device_ptr(stream);
                let (s, rs) = scales.device_ptr(stream);
                (p, r, s, Some(rs))
            }
        };
        let _rb = match &params.bias {
            Some(rb) => {
                let (p, r) = rb.table.device_ptr(stream);
                args.rel_table = p;
                args.num_buckets = rb.num_buckets as i32;
                args.bidirectional = i32::from(rb.bidirectional);
                Some(r)
            }
            None => None,
        };
        args.data = data;
        args.scales = scales;
        args.tables = tp;
        args.lens = lp;
        args.slots = sp;
        args.q = qp;
        args.out = op;
        args.partials = if partial_len > 0 { pp } else { 0 };
        let cfg = LaunchConfig {
            grid_dim: (parts_max as u32, (nkv * geo.hsplit) as u32, batch as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: geo.smem as u32,
        };
        let mut b = stream.launch_builder(&f);
        b.arg(&args);
        // SAFETY: block (p, y, b) reads slots[b] (the staging buffer holds the batch's
        // distinct live slots), its length and block-table row from the mirror (in sync with
        // the book: `stage` flushed every update), pool rows of pages that sequence owns
        // (< pages) for keys below its length, query rows (b, 0, h < n_heads) inside the
        // validated q, table entries bucket·n_heads + h inside the checked table; it writes
        // output rows (b, 0, h) of the validated disjoint layout, or partial records of
        // (b, h, p < parts_max) inside the partial buffer (partial_len floats) when the
        // sequence has more than one partition; smem is the geometry's (<= 48 KiB).
        unsafe { b.launch(cfg) }.ctx(|| format!("launching {name}"))?;
        if parts_max > 1 {
            let ca = KvCombineArgs {
                partials: pp,
                lens: lp,
                slots: sp,
                out: op,
                o_bs: args.o_bs,
                o_hs: args.o_hs,
                n_heads: n_heads as i32,
                head_dim: d as i32,
                parts_max: parts_max as i32,
                pad_: 0,
            };
            let cfg = LaunchConfig {
                grid_dim: (n_heads as u32, batch as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&fc);
            b.arg(&ca);
            // SAFETY: block (h, b) reads the partial records of (b, h) for the sequence's
            // partitions (written by the launch above, same stream) and writes output row
            // (b, 0, h), inside the validated output.
            unsafe { b.launch(cfg) }.ctx(|| "launching kv_combine".into())?;
        }
        Ok(())
    }

    /// Copies back the stored (dequantized) keys and values of `seq` as dense
    /// `[len, n_kv_heads, head_dim]` f32 (`len` = [`DeviceKvCache::seq_len`]); both slices must
    /// hold exactly `len · n_kv_heads · head_dim` values. Waits for the stream.
    pub fn read(
        &self,
        dev: &Device,
        seq: SeqId,
        k_out: &mut [f32],
        v_out: &mut [f32],
    ) -> Result<()> {
        same_device(dev, &self.staging)?;
        let s = self.book.lookup(seq)?;
        let (nkv, d) = (self.config.n_kv_heads, self.config.head_dim);
        let n = s
            .len
            .checked_mul(nkv * d)
            .ok_or_else(|| overflow("sequence size"))?;
        tessera_core::shape::check_len("k_out", n, k_out.len())?;
        tessera_core::shape::check_len("v_out", n, v_out.len())?;
        let pt = self.page_tokens;
        let rs = self.row_stride;
        let page_rows = 2 * nkv * pt;
        for (i, &page) in s.pages.iter().enumerate() {
            let t0 = i * pt;
            if t0 >= s.len {
                break;
            }
            let r0 = page as usize * page_rows;
            let vals: Vec<f32> = match &self.pool {
                Pool::F32(b) => dev.download(&b.slice(r0 * rs..(r0 + page_rows) * rs))?,
                Pool::F16(b) => dev
                    .download(&b.slice(r0 * rs..(r0 + page_rows) * rs))?
                    .into_iter()
                    .map(f16::to_f32)
                    .collect(),
                Pool::Q8 { qs, scales } => {
                    let q = dev.download(&qs.slice(r0 * rs..(r0 + page_rows) * rs))?;
                    let sc =
                        dev.download(&scales.slice(r0 * self.nb..(r0 + page_rows) * self.nb))?;
                    q.iter()
                        .enumerate()
                        .map(|(e, &x)| {
                            f32::from(x) * sc[(e / rs) * self.nb + (e % rs) / QK].to_f32()
                        })
                        .collect()
                }
            };
            for tok in 0..pt.min(s.len - t0) {
                for h in 0..nkv {
                    let o = ((t0 + tok) * nkv + h) * d;
                    let kr = (h * pt + tok) * rs;
                    let vr = ((nkv + h) * pt + tok) * rs;
                    k_out[o..o + d].copy_from_slice(&vals[kr..kr + d]);
                    v_out[o..o + d].copy_from_slice(&vals[vr..vr + d]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(book: &mut PageBook, n: usize) -> Vec<SeqId> {
        (0..n).map(|_| book.add_sequence().unwrap().0).collect()
    }

    #[test]
    fn paged_rows_go_through_the_block_tables() {
        // 4 blocks of 4 tokens.
        let mut book = PageBook::new(KvLayout::Paged {
            block_size: 4,
            num_blocks: 4,
        })
        .unwrap();
        let s = ids(&mut book, 2);
        let plan = book.plan_append(&s, 5).unwrap(); // 2 blocks each: exactly the pool
        assert_eq!(plan.taken(), 4);
        let dst = dst_rows(&plan, 4).unwrap();
        assert_eq!(dst.len(), 10);
        // Pages come off the free list in order: 0, 1 for the first sequence, then 2, 3.
        assert_eq!(&dst[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(&dst[5..], &[8, 9, 10, 11, 12]);
        book.commit(plan);
        assert_eq!(book.free_pages(), 0);
        // Freed blocks are reused: the second sequence's tokens 5..8 finish its block 3, and
        // 8..12 go to block 0, the first freed.
        book.free_sequence(s[0]).unwrap();
        let plan = book.plan_append(&s[1..], 7).unwrap();
        assert_eq!(
            (plan.taken(), plan.seq(0).old_pages, plan.seq(0).new_pages),
            (1, 2, &[0][..])
        );
        assert_eq!(dst_rows(&plan, 4).unwrap(), vec![13, 14, 15, 0, 1, 2, 3]);
        book.commit(plan);
        assert_eq!(book.lookup(s[1]).unwrap().pages, &[2, 3, 0]);
        // Nothing to place.
        assert!(
            dst_rows(&book.plan_append(&[], 1).unwrap(), 4)
                .unwrap()
                .is_empty()
        );
        assert!(
            dst_rows(&book.plan_append(&s[1..], 0).unwrap(), 4)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn contiguous_rows_go_to_the_slots_page() {
        let mut book = PageBook::new(KvLayout::Contiguous {
            max_seqs: 2,
            max_len: 6,
        })
        .unwrap();
        let (a, pa) = book.add_sequence().unwrap();
        let (b, pb) = book.add_sequence().unwrap();
        assert_eq!((pa, pb), (Some(0), Some(1)));
        let plan = book.plan_append(&[b, a], 4).unwrap();
        assert_eq!(plan.taken(), 0);
        assert_eq!(dst_rows(&plan, 6).unwrap(), vec![6, 7, 8, 9, 0, 1, 2, 3]);
        book.commit(plan);
        let plan = book.plan_append(&[a], 2).unwrap();
        assert_eq!(dst_rows(&plan, 6).unwrap(), vec![4, 5]);
    }

    #[test]
    fn sizes_are_validated() {
        let cfg = |n_kv_heads, head_dim, dtype, layout| KvCacheConfig {
            n_kv_heads,
            head_dim,
            dtype,
            layout,
        };
        let paged = KvLayout::Paged {
            block_size: 16,
            num_blocks: 8,
        };
        assert_eq!(
            DeviceKvCache::sizes(&cfg(2, 100, KvDType::F16, paged)).unwrap(),
            (104, 0, 8, 16)
        );
        assert_eq!(
            DeviceKvCache::sizes(&cfg(2, 100, KvDType::Q8_0, paged)).unwrap(),
            (128, 4, 8, 16)
        );
        assert!(DeviceKvCache::sizes(&cfg(0, 64, KvDType::F16, paged)).is_err());
        assert!(DeviceKvCache::sizes(&cfg(1, 0, KvDType::F16, paged)).is_err());
        assert!(DeviceKvCache::sizes(&cfg(1, MAX_HEAD_DIM + 1, KvDType::F16, paged)).is_err());
        let zero = KvLayout::Paged {
            block_size: 0,
            num_blocks: 8,
        };
        assert!(DeviceKvCache::sizes(&cfg(1, 64, KvDType::F16, zero)).is_err());
        let huge = KvLayout::Paged {
            block_size: 1 << 16,
            num_blocks: 1 << 16,
        };
        assert!(DeviceKvCache::sizes(&cfg(1, 64, KvDType::F16, huge)).is_err());
    }

    #[test]
    fn updates_keep_the_last_value_per_index() {
        let mut u = vec![(5, 0), (3, 1), (5, 9), (3, 2), (7, 4), (5, 6)];
        last_update_only(&mut u);
        assert_eq!(u, vec![(3, 2), (5, 6), (7, 4)]);
    }

    #[test]
    fn decode_geometry() {
        // head_dim 128 f16, MHA: one head per block, 16 lanes per key.
        let g = DecodeGeometry::new(128, 1);
        assert_eq!((g.hb, g.hsplit, g.lpk, g.pieces), (1, 1, 16, 16));
        // GQA 12: 8 heads per block, two blocks per key/value head.
        let g = DecodeGeometry::new(128, 12);
        assert_eq!((g.hb, g.hsplit), (8, 2));
        // Wide heads trade heads per block for shared memory.
        let g = DecodeGeometry::new(1024, 8);
        assert_eq!((g.hb, g.hsplit, g.lpk), (1, 8, 32));
        let g = DecodeGeometry::new(256, 3);
        assert_eq!((g.hb, g.hsplit), (4, 1));
        for rs in [8, 16, 104, 128, 256, 512, 1024] {
            for group in [1, 2, 3, 5, 8, 16, 64] {
                let g = DecodeGeometry::new(rs, group);
                assert!(g.hb * rs <= 1024 || g.hb == 1);
                assert!(g.hb * g.hsplit >= group && g.hb * (g.hsplit - 1) < group);
                assert!(g.smem <= 48 * 1024, "{rs} {group}: {}", g.smem);
                assert!(g.lpk.is_power_of_two() && g.lpk <= 32);
            }
        }
    }
}
