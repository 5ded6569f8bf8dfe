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
//! default all) key/value heads and walks each chunk's pages head after head, so the
//! memory is read front to back as with contiguous storage. A task walks the keys in chunks
//! of [`CHUNK`] (at absolute key positions, whatever the page size): vector dot products of
//! the chunk's K rows with the group's queries (f16 widened on the fly, Q8_0 chunks
//! dequantized into an L1-resident buffer, exactly), reduced a register tile at a time by a
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
use tessera_core::quant::{BlockQ8_0, QK};
use tessera_core::{Error, Result};

pub use kernel::{CHUNK, PARTITION};

/// How a cache stores keys and values.
///
/// Storing rounds each value `x`; decode attention then computes with the stored values
/// exactly as [`tessera_core::reference::attention`] would on them. Against the original f32
/// values, the stored `x̃` satisfies, element by element:
///
/// * [`KvDType::F32`]: `x̃ = x`;
/// * [`KvDType::F16`]: `|x̃ − x| <= 2⁻¹¹·|x|` for `|x|` in f16's normal range
///   (`6.1e-5 <= |x| <= 65504`), `|x̃ − x| <= 2⁻²⁵` below it (subnormal spacing / 2); larger
///   values become infinite;
/// * [`KvDType::Q8_0`]: with `d_b = max|x| / 127` over the 32 values of `x`'s block (a
///   row is split in blocks of 32, the last one zero-padded),
///   `|x̃ − x| <= d_b·(1/2 + 127·2⁻¹¹ + 2⁻¹⁴) + 127·2⁻²⁵`: the quant is within ½ (plus
///   f32 rounding of `x·(1/d_b)`, below 2⁻¹⁴·d_b) of `x / d_b`, and the stored scale is `d_b`
///   rounded to f16 (relative error 2⁻¹¹, or absolute 2⁻²⁵ below f16's normal range), which
///   moves `q·d` by at most `127·2⁻¹¹·d_b` (so the plain `d_b / 2` of the rounding alone is
///   not a bound). As in GGML, a NaN is stored as 0, and a block with an infinite value or
///   with `max|x| > 65504·127` gets an infinite scale (its values become NaN or ±∞).
///
/// An attention output then moves by at most `max_j |ṽ_j − v_j|` through V, and through K by
/// the score changes `|scale·q·(k̃_j − k_j)|`, each of which changes the softmax weights by a
/// relative factor of at most `exp(2·max_j |Δs_j|) − 1` (the tests bound the output change by
/// `max|Δv| + (e^(2Δs) − 1)·max|v|`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDType {
    /// 4 bytes per value, exact.
    F32,
    /// 2 bytes per value (IEEE half, round to nearest even).
    F16,
    /// 34 bytes per 32 values (GGML Q8_0: an f16 scale and 32 signed bytes).
    Q8_0,
}

/// Where each sequence's tokens live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// One fixed region of `max_len` tokens per sequence, for at most `max_seqs` live
    /// sequences at a time.
    Contiguous {
        /// Live sequences at most (the number of slots).
        max_seqs: usize,
        /// Tokens per sequence at most.
        max_len: usize,
    },
    /// A pool of `num_blocks` blocks of `block_size` tokens shared by all sequences.
    Paged {
        /// Tokens per block.
        block_size: usize,
        /// Blocks in the pool.
        num_blocks: usize,
    },
}

/// The shape, element type and layout of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvCacheConfig {
    /// Key/value heads (1 to `u32::MAX`).
    pub n_kv_heads: usize,
    /// Elements per head (1 to [`MAX_HEAD_DIM`]).
    pub head_dim: usize,
    /// Storage element type.
    pub dtype: KvDType,
    /// Storage layout.
    pub layout: KvLayout,
}

/// A sequence of a [`KvCache`]. Ids are opaque; after [`KvCache::free_sequence`] an id is
/// stale and every use of it is an error, even once its slot is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId {
    slot: u32,
    generation: u32,
}

/// The stored values: one typed vector of pages.
#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8(Vec<BlockQ8_0>),
}

/// One sequence slot.
#[derive(Debug, Default)]
struct Seq {
    generation: u32,
    live: bool,
    len: usize,
    /// The pages holding tokens `i·T .. (i+1)·T` (contiguous: exactly one).
    pages: Vec<u32>,
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
    free_pages: Vec<u32>,
    seqs: Vec<Seq>,
    free_slots: Vec<u32>,
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
        let (pages, page_tokens) = match layout {
            KvLayout::Contiguous { max_seqs, max_len } => (max_seqs, max_len),
            KvLayout::Paged {
                block_size,
                num_blocks,
            } => (num_blocks, block_size),
        };
        if pages == 0 || page_tokens == 0 {
            return Err(Error::InvalidArgument(format!(
                "KV cache layout {layout:?} has a zero size"
            )));
        }
        if pages > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "KV cache layout {layout:?}: more than u32::MAX slots or blocks"
            )));
        }
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
            free_pages: (0..pages as u32).rev().collect(),
            seqs: Vec::new(),
            free_slots: Vec::new(),
        })
    }

    /// The configuration the cache was made with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    fn is_paged(&self) -> bool {
        matches!(self.config.layout, KvLayout::Paged { .. })
    }

    /// Starts a new, empty sequence.
    ///
    /// Errors when no slot is free (contiguous layout: `max_seqs` live sequences) or, for the
    /// paged layout, when `u32::MAX` sequences are live.
    pub fn add_sequence(&mut self) -> Result<SeqId> {
        let page = if self.is_paged() {
            None
        } else {
            Some(*self.free_pages.last().ok_or_else(|| {
                Error::InvalidArgument("KV cache: every sequence slot is in use".into())
            })?)
        };
        let slot = match self.free_slots.last() {
            Some(&s) => s,
            None => {
                if self.seqs.len() >= u32::MAX as usize {
                    return Err(Error::InvalidArgument(
                        "KV cache: too many sequences".into(),
                    ));
                }
                self.seqs
                    .try_reserve(1)
                    .map_err(|e| Error::InvalidArgument(format!("KV cache: {e}")))?;
                self.seqs.push(Seq::default());
                self.free_slots.push((self.seqs.len() - 1) as u32);
                (self.seqs.len() - 1) as u32
            }
        };
        let mut pages = Vec::new();
        if let Some(p) = page {
            pages
                .try_reserve_exact(1)
                .map_err(|e| Error::InvalidArgument(format!("KV cache: {e}")))?;
            pages.push(p);
            self.free_pages.pop();
        }
        self.free_slots.pop();
        let s = &mut self.seqs[slot as usize];
        s.live = true;
        s.len = 0;
        s.pages = pages;
        Ok(SeqId {
            slot,
            generation: s.generation,
        })
    }

    fn lookup(&self, seq: SeqId) -> Result<&Seq> {
        match self.seqs.get(seq.slot as usize) {
            Some(s) if s.live && s.generation == seq.generation => Ok(s),
            _ => Err(Error::InvalidArgument(format!(
                "KV cache: {seq:?} is not a live sequence of this cache"
            ))),
        }
    }

    /// Ends a sequence: its slot (contiguous) or its blocks (paged) become free for reuse,
    /// and `seq` becomes stale. Errors for a stale or foreign id.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.lookup(seq)?;
        let s = &mut self.seqs[seq.slot as usize];
        let pages = std::mem::take(&mut s.pages);
        s.live = false;
        s.len = 0;
        // A slot whose generation would wrap is retired, so that no stale id ever matches.
        let retire = s.generation == u32::MAX;
        s.generation = s.generation.wrapping_add(1);
        self.free_pages.extend(pages.iter().rev());
        if !retire {
            self.free_slots.push(seq.slot);
        }
        Ok(())
    }

    /// Tokens cached for `seq`. Errors for a stale or foreign id.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.lookup(seq)?.len)
    }

    /// Free blocks (paged layout) or free sequence slots (contiguous layout).
    pub fn free_blocks(&self) -> usize {
        self.free_pages.len()
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
        let s = self.lookup(seq)?;
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
        let len = s.len;
        let new_len = len
            .checked_add(n_tokens)
            .ok_or_else(|| overflow("sequence length"))?;
        let pt = self.page_tokens;
        let needed_pages = new_len.div_ceil(pt);
        let extra = needed_pages.saturating_sub(s.pages.len());
        match self.config.layout {
            KvLayout::Contiguous { max_len, .. } => {
                if new_len > max_len {
                    return Err(Error::InvalidArgument(format!(
                        "KV cache: {len} + {n_tokens} tokens exceed max_len {max_len}"
                    )));
                }
            }
            KvLayout::Paged { .. } => {
                if extra > self.free_pages.len() {
                    return Err(Error::InvalidArgument(format!(
                        "KV cache: {n_tokens} more tokens need {extra} new blocks but {} are free",
                        self.free_pages.len()
                    )));
                }
            }
        }
        if n_tokens == 0 {
            return Ok(());
        }
        // Everything that can fail is done: take the pages, then write.
        let slot = seq.slot as usize;
        self.seqs[slot]
            .pages
            .try_reserve(extra)
            .map_err(|e| Error::InvalidArgument(format!("KV cache: {e}")))?;
        for _ in 0..extra {
            let p = self.free_pages.pop().expect("capacity checked above");
            self.seqs[slot].pages.push(p);
        }
        self.seqs[slot].len = new_len;

        let pages = std::mem::take(&mut self.seqs[slot].pages);
        let mut pad = [0.0f32; MAX_HEAD_DIM];
        for t in 0..n_tokens {
            let pos = len + t;
            let page = pages[pos / pt];
            let tok = pos % pt;
            for h in 0..nkv {
                let off = self.row_offset(page, h, tok);
                let ks = &k.data[k.layout.offset(0, t, h)..][..d];
                let vs = &v.data[v.layout.offset(0, t, h)..][..d];
                self.write_row(off, ks, &mut pad);
                self.write_row(off + self.half_elems, vs, &mut pad);
            }
        }
        self.seqs[slot].pages = pages;
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
        let s = self.lookup(seq)?;
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
    let mut lens = Vec::with_capacity(batch);
    for &s in seqs {
        lens.push(cache.lookup(s)?.len);
    }
    let mut slots: Vec<u32> = seqs.iter().map(|s| s.slot).collect();
    slots.sort_unstable();
    if slots.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument(
            "decode_attention: a sequence appears twice in the batch".into(),
        ));
    }

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
        let seq = &cache.seqs[seqs[t.b].slot as usize];
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
            pages: seq.pages.as_ptr(),
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
            len: seq.len,
            k0,
            k1: (k0 + PARTITION).min(seq.len),
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
