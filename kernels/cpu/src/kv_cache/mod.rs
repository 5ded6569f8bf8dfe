//! KV caches: contiguous and paged storage of past keys and values (f32, f16, Q8_0), and
//! decode attention over them.
//!
//! A [`KvCache`] holds **one layer's** keys and values for a batch of sequences of different
//! lengths. Each sequence is named by a [`SeqId`] handed out by [`KvCache::add_sequence`];
//! [`KvCache::append`] stores new tokens' K and V (converted to the cache's [`KvDType`]),
//! [`KvCache::read`] gathers them back as dense f32 and [`decode_attention`] lets one new query
//! token per sequence attend to everything its sequence has cached.
//!
//! # Storage
//! The cache is a pool of *pages* of `T` token rows, each page holding, for K and then for V,
//! `[n_kv_heads][T][row]` (head-major, so that one head's keys are contiguous in memory):
//!
//! * [`KvLayout::Contiguous`]: one page of `T = max_len` tokens per sequence slot
//!   (`max_seqs` pages); a sequence holds its slot's page from `add_sequence` to
//!   `free_sequence` and cannot grow past `max_len`;
//! * [`KvLayout::Paged`]: `num_blocks` pages ("blocks") of `T = block_size` tokens, shared by
//!   all sequences through a free list: a sequence's block table grows a block at a time as
//!   it is appended to, and [`KvCache::free_sequence`] returns its blocks for reuse.
//!
//! A row is `head_dim` values: f32, f16 (rounded to nearest even), or `ceil(head_dim / 32)`
//! GGML [`BlockQ8_0`] blocks quantized by [`tessera_core::quant::quantize`] (the last block
//! zero-padded).
//!
//! Every operation validates its arguments before it changes anything: an `Err` leaves the
//! cache exactly as it was (in particular, [`KvCache::append`] checks the capacity before it
//! writes a single row), and no error can touch another sequence's pages.
//!
//! # Decode attention
//! For every sequence `b` of the batch and query head `h`,
//! `out[b, h] = Σ_j softmax_j(scale · q[b, h] · k_j + bias_j) · v_j` over the `len` cached
//! keys of `b` (their stored, dequantized values), with `k`, `v` of key/value head
//! `h / (n_heads / n_kv_heads)`: [`tessera_core::reference::attention`] with `q_len = 1`
//! (see [`decode_attention`]).
//!
//! The kernel reads straight from the pages. One task per (sequence, key/value head,
//! partition of [`PARTITION`] keys) handles all the query heads that share the key/value
//! head, so each K and V row is read from memory once for the whole group; where a head's
//! rows in a page are short (small blocks of a paged cache), one task takes several (by
//! default all) key/value heads and walks each chunk's pages head after head: every head's K
//! rows of the chunk, then every head's V rows, so that the pages' K halves and
//! then their V halves are read front to back, as close to contiguous storage as the block
//! table allows. A task walks the keys in chunks
//! of [`CHUNK`] (at absolute key positions, whatever the page size): vector dot products of
//! the chunk's K rows with the group's queries (f16 widened and Q8_0 dequantized, exactly, a
//! vector at a time as the rows are loaded), reduced a register tile at a time by a
//! transposing add tree, the chunk maximum, an online-softmax rescale with a vectorized
//! `exp`, and the weighted sum of the V rows into register-blocked accumulators (two keys
//! at a time into two sets where registers allow). Partitions of a long sequence run as
//! separate tasks and are merged in a fixed order. Chunk and
//! partition boundaries depend only on key positions, so results are bit-identical for any
//! thread count and for contiguous and paged storage of the same values.

mod kernel;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use crate::parallel::SendPtr;
use crate::{Isa, Parallelism, scratch};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use tessera_core::attention::{
    AttentionParams, AttentionShape, Bias, HeadLayout, Heads, HeadsMut, KeyPadding, MAX_HEAD_DIM,
    RelativeBias, check_attention,
};
use tessera_core::kv_cache::PageBook;
use tessera_core::quant::{BlockQ8_0, QK};
use tessera_core::{Error, Result};

pub use kernel::{CHUNK, PARTITION};
/// The cache's types, shared with every backend (see [`tessera_core::kv_cache`]).
pub use tessera_core::kv_cache::{KvCacheConfig, KvDType, KvLayout, SeqId};

/// The stored values: one typed vector of pages.
#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8(Vec<BlockQ8_0>),
}

/// One layer's key/value cache for a batch of sequences of different lengths (see the
/// [module documentation](self)).
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    /// Tokens per page (`max_len` or `block_size`).
    page_tokens: usize,
    /// Storage elements per row (`head_dim`, or Q8_0 blocks per row).
    row_elems: usize,
    /// Elements of one head's `T` rows (`T · row_elems`).
    head_elems: usize,
    /// Elements of a page's K half (`n_kv_heads · head_elems`); V follows it.
    half_elems: usize,
    store: Store,
    /// Sequences, lengths, block tables and the free list.
    book: PageBook,
}

/// Allocates `n` copies of `x`, reporting allocation failure as an error.
fn try_filled<T: Clone>(n: usize, x: T, what: &str) -> Result<Vec<T>> {
    let bytes = n.checked_mul(std::mem::size_of::<T>());
    if bytes.is_none_or(|b| b > isize::MAX as usize) {
        return Err(Error::Overflow {
            what: format!("{what}: {n} elements"),
        });
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| {
        Error::InvalidArgument(format!("{what}: cannot allocate {n} elements ({e})"))
    })?;
    v.resize(n, x);
    Ok(v)
}

fn overflow(what: &str) -> Error {
    Error::Overflow {
        what: what.to_string(),
    }
}

impl KvCache {
    /// An empty cache with every page allocated (zeroed) up front.
    ///
    /// Errors when a size is 0, `head_dim` exceeds [`MAX_HEAD_DIM`], a count exceeds
    /// `u32::MAX` (`n_kv_heads`, `max_seqs`, `num_blocks`), the storage size overflows, or the
    /// allocation fails.
    pub fn new(config: KvCacheConfig) -> Result<Self> {
        let KvCacheConfig {
            n_kv_heads,
            head_dim,
            dtype,
            layout,
        } = config;
        if n_kv_heads == 0 || n_kv_heads > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "n_kv_heads {n_kv_heads} is outside 1..=u32::MAX"
            )));
        }
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(Error::InvalidArgument(format!(
                "head_dim {head_dim} is outside 1..={MAX_HEAD_DIM}"
            )));
        }
        // Validates the layout: no zero size, at most u32::MAX slots or blocks.
        let book = PageBook::new(layout)?;
        let page_tokens = book.page_tokens();
        let pages = book.free_pages();
        let row_elems = match dtype {
            KvDType::F32 | KvDType::F16 => head_dim,
            KvDType::Q8_0 => head_dim.div_ceil(QK),
        };
        let head_elems = page_tokens
            .checked_mul(row_elems)
            .ok_or_else(|| overflow("KV cache page size"))?;
        let half_elems = head_elems
            .checked_mul(n_kv_heads)
            .ok_or_else(|| overflow("KV cache page size"))?;
        let total = half_elems
            .checked_mul(2)
            .and_then(|x| x.checked_mul(pages))
            .ok_or_else(|| overflow("KV cache size"))?;
        let store = match dtype {
            KvDType::F32 => Store::F32(try_filled(total, 0.0f32, "KV cache")?),
            KvDType::F16 => Store::F16(try_filled(total, f16::ZERO, "KV cache")?),
            KvDType::Q8_0 => Store::Q8(try_filled(
                total,
                <BlockQ8_0 as bytemuck::Zeroable>::zeroed(),
                "KV cache",
            )?),
        };
        Ok(KvCache {
            config,
            page_tokens,
            row_elems,
            head_elems,
            half_elems,
            store,
            book,
        })
    }

    /// The configuration the cache was made with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Starts a new, empty sequence.
    ///
    /// Errors when no slot is free (contiguous layout: `max_seqs` live sequences) or, for the
    /// paged layout, when `u32::MAX` sequences are live.
    pub fn add_sequence(&mut self) -> Result<SeqId> {
        Ok(self.book.add_sequence()?.0)
    }

    /// Ends a sequence: its slot (contiguous) or its blocks (paged) become free for reuse,
    /// and `seq` becomes stale. Errors for a stale or foreign id.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.book.free_sequence(seq)
    }

    /// Tokens cached for `seq`. Errors for a stale or foreign id.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        self.book.seq_len(seq)
    }

    /// Free blocks (paged layout) or free sequence slots (contiguous layout).
    pub fn free_blocks(&self) -> usize {
        self.book.free_pages()
    }

    /// Storage offset (in store elements) of the K row of token `tok` of page `page`, head
    /// `h`; the V row is `half_elems` further.
    #[inline]
    fn row_offset(&self, page: u32, h: usize, tok: usize) -> usize {
        page as usize * 2 * self.half_elems + h * self.head_elems + tok * self.row_elems
    }

    /// Appends `n_tokens` tokens to `seq`: `k` and `v` are `[1, n_tokens, n_kv_heads,
    /// head_dim]` in any layout (the batch stride is not used).
    ///
    /// All or nothing: errors (leaving the cache unchanged) for a stale id, an operand too
    /// short for its layout, or when the tokens do not fit (contiguous: past `max_len`;
    /// paged: more new blocks needed than are free).
    pub fn append(
        &mut self,
        seq: SeqId,
        k: Heads<'_, f32>,
        v: Heads<'_, f32>,
        n_tokens: usize,
    ) -> Result<()> {
        // A stale id is reported before a bad operand.
        self.book.seq_len(seq)?;
        let (nkv, d) = (self.config.n_kv_heads, self.config.head_dim);
        for (name, x) in [("K", &k), ("V", &v)] {
            let needed = x.layout.extent(1, n_tokens, nkv, d)?;
            if x.data.len() < needed {
                return Err(Error::InvalidArgument(format!(
                    "{name}: slice holds {} elements but a [1, {n_tokens}, {nkv}, {d}] operand with {:?} needs {needed}",
                    x.data.len(),
                    x.layout
                )));
            }
        }
        // Checks the capacity (contiguous: past `max_len`; paged: free blocks) and changes
        // nothing; the book takes the pages only at `commit`, after the rows are written.
        let plan = self.book.plan_append(&[seq], n_tokens)?;
        if n_tokens == 0 {
            return Ok(());
        }
        let len = plan.seq(0).old_len;
        let pt = self.page_tokens;
        let mut pad = [0.0f32; MAX_HEAD_DIM];
        for t in 0..n_tokens {
            let pos = len + t;
            let page = plan.page(0, pos);
            let tok = pos % pt;
            for h in 0..nkv {
                let off = self.row_offset(page, h, tok);
                let ks = &k.data[k.layout.offset(0, t, h)..][..d];
                let vs = &v.data[v.layout.offset(0, t, h)..][..d];
                self.write_row(off, ks, &mut pad);
                self.write_row(off + self.half_elems, vs, &mut pad);
            }
        }
        self.book.commit(plan);
        Ok(())
    }

    /// Stores one row of `head_dim` values at `off`. `pad` is zero past `head_dim` (only its
    /// first `head_dim` values are ever overwritten).
    fn write_row(&mut self, off: usize, x: &[f32], pad: &mut [f32; MAX_HEAD_DIM]) {
        let n = self.row_elems;
        match &mut self.store {
            Store::F32(s) => s[off..off + n].copy_from_slice(x),
            Store::F16(s) => s[off..off + n].convert_from_f32_slice(x),
            Store::Q8(s) => {
                pad[..x.len()].copy_from_slice(x);
                tessera_core::quant::quantize(&pad[..n * QK], &mut s[off..off + n])
                    .expect("row length is a whole number of blocks");
            }
        }
    }

    /// Reads one stored row at `off` into `out` (`head_dim` values).
    fn read_row(&self, off: usize, out: &mut [f32], pad: &mut [f32; MAX_HEAD_DIM]) {
        let n = self.row_elems;
        match &self.store {
            Store::F32(s) => out.copy_from_slice(&s[off..off + n]),
            Store::F16(s) => s[off..off + n].convert_to_f32_slice(out),
            Store::Q8(s) => {
                tessera_core::quant::dequantize(&s[off..off + n], &mut pad[..n * QK])
                    .expect("lengths match");
                out.copy_from_slice(&pad[..out.len()]);
            }
        }
    }

    /// Gathers the stored (dequantized) keys and values of `seq` as dense
    /// `[len, n_kv_heads, head_dim]` f32 (`len` = [`KvCache::seq_len`]); both slices must hold
    /// exactly `len · n_kv_heads · head_dim` values.
    pub fn read(&self, seq: SeqId, k_out: &mut [f32], v_out: &mut [f32]) -> Result<()> {
        let s = self.book.lookup(seq)?;
        let (nkv, d) = (self.config.n_kv_heads, self.config.head_dim);
        let n = s
            .len
            .checked_mul(nkv * d)
            .ok_or_else(|| overflow("sequence size"))?;
        tessera_core::shape::check_len("k_out", n, k_out.len())?;
        tessera_core::shape::check_len("v_out", n, v_out.len())?;
        let mut pad = [0.0f32; MAX_HEAD_DIM];
        let pt = self.page_tokens;
        for pos in 0..s.len {
            let page = s.pages[pos / pt];
            for h in 0..nkv {
                let off = self.row_offset(page, h, pos % pt);
                let o = (pos * nkv + h) * d;
                self.read_row(off, &mut k_out[o..o + d], &mut pad);
                self.read_row(off + self.half_elems, &mut v_out[o..o + d], &mut pad);
            }
        }
        Ok(())
    }

    /// The store's base pointer, as the kernel reads it.
    fn store_ptr(&self) -> *const u8 {
        match &self.store {
            Store::F32(s) => s.as_ptr().cast(),
            Store::F16(s) => s.as_ptr().cast(),
            Store::Q8(s) => s.as_ptr().cast(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Decode attention.

/// Everything about a decode-attention call besides its operands.
#[derive(Debug, Clone, Copy)]
pub struct DecodeParams<'a> {
    /// Multiplies `q · k` (GPT-2: `1/√head_dim`; T5: 1).
    pub scale: f32,
    /// T5's relative-position bias (`[num_buckets, n_heads]` table): the query sits at
    /// position `seq_len − 1`, keys at `0..seq_len` (a T5 decoder: `bidirectional` is
    /// normally `false`).
    pub bias: Option<RelativeBias<'a>>,
}

impl DecodeParams<'_> {
    /// Scale `1/√head_dim`, no bias.
    pub fn new(head_dim: usize) -> Self {
        DecodeParams {
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            bias: None,
        }
    }
}

/// Every knob of a decode-attention call.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeOptions {
    /// Instruction set; `None` picks [`Isa::detect`].
    pub isa: Option<Isa>,
    /// Threads to split the work for (results do not depend on it).
    pub parallelism: Parallelism,
}

/// Attention of one new query token per sequence over everything the sequence has cached, on
/// the best instruction set of this CPU.
///
/// * `q`, `out`: `[seqs.len(), 1, n_heads, head_dim]` in any [`HeadLayout`] (`out`'s must be
///   disjoint: [`HeadLayout::is_disjoint`]); row `b` belongs to sequence `seqs[b]`;
/// * `n_heads`: a positive multiple of the cache's `n_kv_heads`; query head `h` uses
///   key/value head `h / (n_heads / n_kv_heads)` (GQA; 1 key/value head is MQA);
/// * every key of each sequence is attended (the caller appends the new token's K and V
///   first); a sequence with no tokens yields zeros.
///
/// The result is that of [`tessera_core::reference::attention`] with `q_len = 1` and
/// `q_offset = seq_len − 1` on the stored (dequantized) keys and values, up to f32 rounding
/// and the error of the vectorized `exp` (4 ulp). Non-finite values propagate as in the
/// reference: a NaN in a query or key (a NaN or +∞ score) makes its row's output NaN, a NaN
/// in V the outputs it reaches; a −∞ score (from the bias table) is a zero weight.
/// Errors, before anything is written, for a
/// stale, foreign or repeated id, bad head counts, operands too short for their layouts, an
/// overlapping output layout, or a malformed bias table.
pub fn decode_attention(
    cache: &KvCache,
    seqs: &[SeqId],
    n_heads: usize,
    q: Heads<'_, f32>,
    out: HeadsMut<'_, f32>,
    params: &DecodeParams<'_>,
    par: Parallelism,
) -> Result<()> {
    let opts = DecodeOptions {
        isa: None,
        parallelism: par,
    };
    decode_attention_with(&opts, cache, seqs, n_heads, q, out, params)
}

/// Arguments of one decode task (see `kernel::task`): query heads `h0 .. h0 + group` of one
/// sequence over keys `k0 .. k1` of its key/value head `g`.
pub(crate) struct TaskArgs<'a> {
    pub dtype: KvDType,
    /// The cache's store, as bytes; offsets below are in store elements of `dtype`.
    pub store: *const u8,
    /// The sequence's page table.
    pub pages: *const u32,
    pub page_tokens: usize,
    /// Elements per page (K and V halves).
    pub page_elems: usize,
    /// Offset of the task's first key/value head's rows within a page's K half.
    pub head_off: usize,
    /// Elements from one head's rows to the next head's within a page.
    pub head_elems: usize,
    /// Key/value heads of the task (consecutive, from the one at `head_off`).
    pub kv_heads: usize,
    /// Elements from a K row to its V row.
    pub v_off: usize,
    /// Store elements per row.
    pub row_elems: usize,
    pub head_dim: usize,
    pub group: usize,
    /// Query row of head `h0 + i` (`i < kv_heads · group`) at `q + i·q_head_stride`.
    pub q: *const f32,
    pub q_head_stride: usize,
    pub scale: f32,
    pub bias: Option<RelativeBias<'a>>,
    pub n_heads: usize,
    pub h0: usize,
    /// Cached tokens of the sequence (the query's position is `len − 1`).
    pub len: usize,
    pub k0: usize,
    pub k1: usize,
    /// The output of the task's key/value head `j` starts at `out + j·out_kv_stride`: the
    /// final rows of its query heads `i < group` at `+ i·out_head_stride`; or, when
    /// `partial`, `group` records of `[m, l, o[head_dim]]` at `+ i·(head_dim + 2)`.
    pub out: *mut f32,
    pub out_head_stride: usize,
    pub out_kv_stride: usize,
    pub partial: bool,
    /// Scratch of at least `kernel::scratch_len(group, head_dim)` floats.
    pub scratch: *mut f32,
}

/// Arguments of a merge of partition results (see `kernel::merge`).
pub(crate) struct MergeArgs {
    /// `parts` blocks of `group` records `[m, l, o[head_dim]]`, one block per partition.
    pub partials: *const f32,
    pub parts: usize,
    pub group: usize,
    pub head_dim: usize,
    pub out: *mut f32,
    pub out_head_stride: usize,
}

/// The entry points of one instruction set's variant.
pub(crate) struct Kernels {
    pub task: unsafe fn(&TaskArgs<'_>),
    pub merge: unsafe fn(&MergeArgs),
}

/// Defines a variant's `#[target_feature]` entry points and its kernel table.
macro_rules! kv_variant {
    ($simd:ty $(, $features:literal)?) => {
        use super::{kernel, Kernels, MergeArgs, TaskArgs};

        $(#[target_feature(enable = $features)])?
        unsafe fn task(args: &TaskArgs<'_>) {
            // SAFETY: ISA checked by `kernels`; the driver upholds `kernel::task`'s contract.
            unsafe { kernel::task::<$simd>(args) }
        }
        $(#[target_feature(enable = $features)])?
        unsafe fn merge(args: &MergeArgs) {
            // SAFETY: ISA checked by `kernels`; the driver upholds `kernel::merge`'s contract.
            unsafe { kernel::merge::<$simd>(args) }
        }

        /// This variant's kernel table. Only hand it out after checking the ISA.
        pub(crate) const KERNELS: Kernels = Kernels { task, merge };
    };
}
use kv_variant;

/// The kernel table for `isa`, after checking that this CPU runs it.
fn kernels(isa: Isa) -> Result<&'static Kernels> {
    isa.check()?;
    match isa {
        Isa::Scalar => Ok(&scalar::KERNELS),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Ok(&avx2::KERNELS),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Ok(&avx512::KERNELS),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Ok(&neon::KERNELS),
        #[allow(unreachable_patterns)]
        _ => Err(Error::IsaUnavailable { isa: isa.name() }),
    }
}

/// One unit of parallel work: key/value heads `g0 .. g0 + heads` of sequence `b` over
/// partition `part` of its `parts`.
#[derive(Clone, Copy)]
struct Task {
    b: usize,
    g0: usize,
    heads: usize,
    part: usize,
    parts: usize,
    /// Index of the first partial record block of (sequence `b`, head `g0`), if the sequence
    /// has several partitions (head `g`'s blocks follow at `+ (g − g0)·parts`).
    partial_base: Option<usize>,
}

/// Key/value heads per task: all of them (each task then reads its keys' pages front to
/// back, head after head within a page, see `kernel`), split in halves while there would be
/// fewer than two tasks per thread. One task per head measured 2–4× slower than contiguous
/// storage with 16-token blocks: each head's rows of a page are a short run, and the
/// hardware prefetchers lost the stream at every one.
fn heads_per_task(nkv: usize, units: usize, threads: usize) -> usize {
    let mut hp = nkv;
    while hp > 1 && units * nkv.div_ceil(hp) < 2 * threads {
        hp = hp.div_ceil(2);
    }
    hp
}

/// [`decode_attention`] with every knob explicit.
pub fn decode_attention_with(
    opts: &DecodeOptions,
    cache: &KvCache,
    seqs: &[SeqId],
    n_heads: usize,
    q: Heads<'_, f32>,
    out: HeadsMut<'_, f32>,
    params: &DecodeParams<'_>,
) -> Result<()> {
    let kern = kernels(opts.isa.unwrap_or_else(Isa::detect))?;
    let (nkv, d) = (cache.config.n_kv_heads, cache.config.head_dim);
    if n_heads == 0 || !n_heads.is_multiple_of(nkv) {
        return Err(Error::InvalidArgument(format!(
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
    let attn_params = AttentionParams {
        scale: params.scale,
        causal: false,
        q_offset: 0,
        padding: KeyPadding::None,
        bias: params.bias.map_or(Bias::None, Bias::Relative),
    };
    // K and V are the cache (kv_len 0 here: nothing to check for them).
    let none = HeadLayout::bshd(0, nkv, d);
    check_attention(
        &shape,
        (q.data.len(), &q.layout),
        (0, &none),
        (0, &none),
        (out.data.len(), &out.layout),
        &attn_params,
    )?;
    let lens = cache.book.batch_lens(seqs, "decode_attention")?;
    // The block table of each batch entry (the ids are live: `batch_lens` checked them).
    let tables = seqs
        .iter()
        .map(|&s| Ok(cache.book.lookup(s)?.pages))
        .collect::<Result<Vec<&[u32]>>>()?;

    let group = n_heads / nkv;
    let rec = d + 2;
    let threads = opts.parallelism.threads();
    let units: usize = lens.iter().map(|l| l.div_ceil(PARTITION)).sum();
    let hp = heads_per_task(nkv, units, threads);
    let mut tasks = Vec::new();
    let mut merges = Vec::new();
    let mut n_partials = 0usize;
    for (b, &len) in lens.iter().enumerate() {
        if len == 0 {
            for h in 0..n_heads {
                out.data[out.layout.offset(b, 0, h)..][..d].fill(0.0);
            }
            continue;
        }
        let parts = len.div_ceil(PARTITION);
        let seq_base = (parts > 1).then(|| {
            let base = n_partials;
            n_partials += parts * nkv;
            for g in 0..nkv {
                merges.push((b, g, base + g * parts, parts));
            }
            base
        });
        for g0 in (0..nkv).step_by(hp) {
            for part in 0..parts {
                tasks.push(Task {
                    b,
                    g0,
                    heads: hp.min(nkv - g0),
                    part,
                    parts,
                    partial_base: seq_base.map(|base| base + g0 * parts),
                });
            }
        }
    }

    let mut pbuf = scratch::take();
    let partials = SendPtr(pbuf.get(n_partials * group * rec).as_mut_ptr());
    let optr = SendPtr(out.data.as_mut_ptr());
    let store = cache.store_ptr() as usize;
    let run_task = |t: &Task| {
        let (pages, len) = (tables[t.b], lens[t.b]);
        let h0 = t.g0 * group;
        let k0 = t.part * PARTITION;
        let (out_ptr, out_head_stride, out_kv_stride) = match t.partial_base {
            // SAFETY: record block `base + part` lies inside the partial buffer
            // (`n_partials · group · rec` floats), and no other task writes it; the task's
            // later heads' blocks follow `parts` blocks apart, inside the sequence's.
            Some(base) => (
                unsafe { partials.get().add((base + t.part) * group * rec) },
                rec,
                t.parts * group * rec,
            ),
            // SAFETY: (b, 0, h0) is inside `out` (checked by `check_attention`).
            None => (
                unsafe { optr.get().add(out.layout.offset(t.b, 0, h0)) },
                out.layout.head_stride,
                group * out.layout.head_stride,
            ),
        };
        let mut sbuf = scratch::take();
        let args = TaskArgs {
            dtype: cache.config.dtype,
            store: store as *const u8,
            pages: pages.as_ptr(),
            page_tokens: cache.page_tokens,
            page_elems: 2 * cache.half_elems,
            head_off: t.g0 * cache.head_elems,
            head_elems: cache.head_elems,
            kv_heads: t.heads,
            v_off: cache.half_elems,
            row_elems: cache.row_elems,
            head_dim: d,
            group,
            q: q.data[q.layout.offset(t.b, 0, h0)..].as_ptr(),
            q_head_stride: q.layout.head_stride,
            scale: params.scale,
            bias: params.bias,
            n_heads,
            h0,
            len,
            k0,
            k1: (k0 + PARTITION).min(len),
            out: out_ptr,
            out_head_stride,
            out_kv_stride,
            partial: t.partial_base.is_some(),
            scratch: sbuf
                .get(kernel::scratch_len(group, d, t.heads))
                .as_mut_ptr(),
        };
        // SAFETY: the ISA is available (`kernels` checked it); the page table covers
        // `len` tokens, the query and output rows of the group are inside their (validated)
        // operands, output rows of distinct tasks are disjoint (`is_disjoint`, distinct
        // sequences and heads, or distinct partial records), and the scratch is large enough.
        unsafe { (kern.task)(&args) };
        scratch::give(sbuf);
    };
    let run_merge = |&(b, g, base, parts): &(usize, usize, usize, usize)| {
        let args = MergeArgs {
            // SAFETY: the records of this (sequence, group) start at `base` blocks.
            partials: unsafe { partials.get().add(base * group * rec) },
            parts,
            group,
            head_dim: d,
            // SAFETY: (b, 0, g·group) is inside `out`.
            out: unsafe { optr.get().add(out.layout.offset(b, 0, g * group)) },
            out_head_stride: out.layout.head_stride,
        };
        // SAFETY: as for the tasks; every partial record was written by phase one.
        unsafe { (kern.merge)(&args) };
    };
    if opts.parallelism.threads() <= 1 {
        tasks.iter().for_each(run_task);
        merges.iter().for_each(run_merge);
    } else {
        tasks.par_iter().for_each(run_task);
        merges.par_iter().for_each(run_merge);
    }
    scratch::give(pbuf);
    Ok(())
}
