//! KV cache types shared by every backend, and the host bookkeeping of a cache's pages.
//!
//! A KV cache (the CPU's `tessera_cpu::kv_cache::KvCache`, the GPU's
//! `tessera_cuda::kv_cache::DeviceKvCache`) holds one layer's keys and values for a batch of
//! sequences of different lengths, in a pool of *pages* of `T` token rows each:
//!
//! * [`KvLayout::Contiguous`]: one page of `T = max_len` tokens per sequence slot
//!   (`max_seqs` pages); a sequence holds its slot's page from `add_sequence` to
//!   `free_sequence` and cannot grow past `max_len`;
//! * [`KvLayout::Paged`]: `num_blocks` pages ("blocks") of `T = block_size` tokens, shared by
//!   all sequences through a free list: a sequence's block table grows a block at a time as
//!   it is appended to, and freeing the sequence returns its blocks for reuse.
//!
//! [`PageBook`] is the part every backend shares: who owns which pages. It hands out the
//! [`SeqId`]s (slots with generations, so that an id is stale once its sequence is freed, even
//! after the slot is reused), keeps each sequence's length and block table and the free list,
//! and plans appends all or nothing ([`PageBook::plan_append`], then [`PageBook::commit`]),
//! so that a backend writes the new rows where the plan says and only then applies it. It
//! knows nothing of the stored values.

use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// How a cache stores keys and values.
///
/// Storing rounds each value `x`; decode attention then computes with the stored values
/// exactly as [`crate::reference::attention`] would on them. Against the original f32
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
    /// Key/value heads (at least 1; the CPU cache takes up to `u32::MAX`, the CUDA cache up
    /// to `i32::MAX`).
    pub n_kv_heads: usize,
    /// Elements per head (1 to [`MAX_HEAD_DIM`](crate::attention::MAX_HEAD_DIM)).
    pub head_dim: usize,
    /// Storage element type.
    pub dtype: KvDType,
    /// Storage layout.
    pub layout: KvLayout,
}

/// A sequence of a KV cache, minted by [`PageBook::add_sequence`]. Ids are opaque; after
/// [`PageBook::free_sequence`] an id is stale and every use of it is an error, even once its
/// slot is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId {
    slot: u32,
    generation: u32,
}

impl SeqId {
    /// The slot the sequence occupies (`< PageBook::slots()`), for indexing per-slot data such
    /// as a device copy of the block tables. Slots are reused after a sequence is freed, so a
    /// slot alone does not name a sequence: look ids up in their [`PageBook`].
    pub fn slot(self) -> u32 {
        self.slot
    }
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

/// A live sequence as its [`PageBook`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveSeq<'a> {
    /// Tokens cached.
    pub len: usize,
    /// The block table: page `pages[i]` holds tokens `i·T .. (i+1)·T`
    /// (`T` = [`PageBook::page_tokens`]). It covers at least `len` tokens: exactly
    /// `⌈len / T⌉` pages for the paged layout, always the slot's one page for the contiguous
    /// layout.
    pub pages: &'a [u32],
}

/// Source of distinct [`PageBook`] identities, so that a plan is never applied to a book it
/// was not made on.
static NEXT_BOOK: AtomicU64 = AtomicU64::new(0);

/// The host-side bookkeeping of a KV cache: sequence slots with generations, a block table and
/// a length per sequence, and the free list of pages (see the [module documentation](self)).
///
/// Pages are numbered `0..pages` (`pages` = `max_seqs` or `num_blocks`); the backend owns the
/// storage and places token `pos` of a sequence in row `pos % T` of page
/// `pages[pos / T]` of its block table. Every method validates its arguments before it
/// changes anything: an `Err` leaves the book as it was.
#[derive(Debug)]
pub struct PageBook {
    paged: bool,
    /// Tokens per page (`max_len` or `block_size`).
    page_tokens: usize,
    /// Tokens per sequence at most (contiguous: `max_len`; paged: unbounded).
    max_len: usize,
    seqs: Vec<Seq>,
    /// The free list is a stack: the pages `fresh .. pages`, never used yet (bottom, `fresh`
    /// on top), under the freed pages in `recycled` (top last). Pages are taken from the top.
    recycled: Vec<u32>,
    fresh: usize,
    pages: usize,
    free_slots: Vec<u32>,
    /// This book's identity (distinct for every book made).
    id: u64,
    /// Changes made so far (a plan is valid only until the next one).
    epoch: u64,
}

/// A validated append to a batch of sequences, not yet applied: where each new token row goes.
/// Made by [`PageBook::plan_append`], applied by [`PageBook::commit`] on the same, unchanged
/// book (the backend writes the rows in between).
#[derive(Debug)]
pub struct AppendPlan {
    book: u64,
    epoch: u64,
    page_tokens: usize,
    n_tokens: usize,
    /// Pages taken off the end of the free list, by all sequences together.
    taken: usize,
    seqs: Vec<Planned>,
}

/// One sequence of an [`AppendPlan`].
#[derive(Debug)]
struct Planned {
    slot: u32,
    old_len: usize,
    /// Pages the sequence held before.
    old_pages: usize,
    /// Block-table index of `pages[0]`: `old_len / T`.
    first: usize,
    /// Block-table entries `first ..` up to the new length: the old pages the append writes
    /// into, then the new ones (from `old_pages − first` on).
    pages: Vec<u32>,
}

/// One sequence of an [`AppendPlan`], as a device mirror of the block tables needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedSeq<'a> {
    /// The sequence's slot ([`SeqId::slot`]).
    pub slot: u32,
    /// Its length before the append (its new tokens are positions
    /// `old_len .. old_len + n_tokens`).
    pub old_len: usize,
    /// Block-table entries it held before the append.
    pub old_pages: usize,
    /// The pages the append adds to its block table, in order (entries
    /// `old_pages .. old_pages + new_pages.len()`).
    pub new_pages: &'a [u32],
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn overflow(what: &str) -> Error {
    Error::Overflow {
        what: what.to_string(),
    }
}

impl PageBook {
    /// An empty book for `layout`: every page free, no sequence.
    ///
    /// Errors when a size of the layout is 0, or when it has more than `u32::MAX` slots
    /// (contiguous) or blocks (paged).
    pub fn new(layout: KvLayout) -> Result<PageBook> {
        let (paged, pages, page_tokens) = match layout {
            KvLayout::Contiguous { max_seqs, max_len } => (false, max_seqs, max_len),
            KvLayout::Paged {
                block_size,
                num_blocks,
            } => (true, num_blocks, block_size),
        };
        if pages == 0 || page_tokens == 0 {
            return Err(invalid(format!(
                "KV cache layout {layout:?} has a zero size"
            )));
        }
        if pages > u32::MAX as usize {
            return Err(invalid(format!(
                "KV cache layout {layout:?}: more than u32::MAX slots or blocks"
            )));
        }
        Ok(PageBook {
            paged,
            page_tokens,
            max_len: if paged { usize::MAX } else { page_tokens },
            seqs: Vec::new(),
            recycled: Vec::new(),
            fresh: 0,
            pages,
            free_slots: Vec::new(),
            id: NEXT_BOOK.fetch_add(1, Ordering::Relaxed),
            epoch: 0,
        })
    }

    /// Tokens per page `T`: `max_len` (contiguous) or `block_size` (paged).
    pub fn page_tokens(&self) -> usize {
        self.page_tokens
    }

    /// Whether the layout is [`KvLayout::Paged`].
    pub fn is_paged(&self) -> bool {
        self.paged
    }

    /// Free pages: free blocks (paged layout) or free sequence slots (contiguous layout).
    pub fn free_pages(&self) -> usize {
        self.recycled.len() + (self.pages - self.fresh)
    }

    /// The `i`-th free page from the top of the free list (`i < free_pages()`).
    fn free_page(&self, i: usize) -> u32 {
        let r = self.recycled.len();
        if i < r {
            self.recycled[r - 1 - i]
        } else {
            // `fresh + i − r < pages <= u32::MAX`.
            (self.fresh + (i - r)) as u32
        }
    }

    /// Removes the top `n` pages of the free list (`n <= free_pages()`).
    fn take_pages(&mut self, n: usize) {
        let from_recycled = n.min(self.recycled.len());
        self.recycled.truncate(self.recycled.len() - from_recycled);
        self.fresh += n - from_recycled;
        debug_assert!(self.fresh <= self.pages);
    }

    /// Starts a new, empty sequence: its id and, for the contiguous layout, the page it holds
    /// until it is freed (`None` for the paged layout, whose sequences start with no page).
    ///
    /// Errors when no slot is free (contiguous layout: `max_seqs` live sequences) or, for the
    /// paged layout, when `u32::MAX` slots are in use or retired.
    pub fn add_sequence(&mut self) -> Result<(SeqId, Option<u32>)> {
        let page = if self.paged {
            None
        } else if self.free_pages() == 0 {
            return Err(invalid("KV cache: every sequence slot is in use".into()));
        } else {
            Some(self.free_page(0))
        };
        let slot = match self.free_slots.last() {
            Some(&s) => s,
            None => {
                if self.seqs.len() >= u32::MAX as usize {
                    return Err(invalid("KV cache: too many sequences".into()));
                }
                self.seqs
                    .try_reserve(1)
                    .map_err(|e| invalid(format!("KV cache: {e}")))?;
                self.free_slots
                    .try_reserve(1)
                    .map_err(|e| invalid(format!("KV cache: {e}")))?;
                self.seqs.push(Seq::default());
                self.free_slots.push((self.seqs.len() - 1) as u32);
                (self.seqs.len() - 1) as u32
            }
        };
        let mut pages = Vec::new();
        if let Some(p) = page {
            pages
                .try_reserve_exact(1)
                .map_err(|e| invalid(format!("KV cache: {e}")))?;
            pages.push(p);
            self.take_pages(1);
        }
        self.free_slots.pop();
        self.epoch += 1;
        let s = &mut self.seqs[slot as usize];
        s.live = true;
        s.len = 0;
        s.pages = pages;
        Ok((
            SeqId {
                slot,
                generation: s.generation,
            },
            page,
        ))
    }

    /// The live sequence `seq`. Errors for a stale or foreign id.
    pub fn lookup(&self, seq: SeqId) -> Result<LiveSeq<'_>> {
        match self.seqs.get(seq.slot as usize) {
            Some(s) if s.live && s.generation == seq.generation => Ok(LiveSeq {
                len: s.len,
                pages: &s.pages,
            }),
            _ => Err(invalid(format!(
                "KV cache: {seq:?} is not a live sequence of this cache"
            ))),
        }
    }

    /// Tokens cached for `seq`. Errors for a stale or foreign id.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.lookup(seq)?.len)
    }

    /// Ends a sequence: its page (contiguous) or its blocks (paged) go back to the free list,
    /// its slot becomes free for reuse, and `seq` becomes stale. Errors for a stale or foreign
    /// id.
    ///
    /// A slot whose generation would wrap is retired instead of reused, so that no stale id
    /// ever matches again.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.lookup(seq)?;
        let s = &self.seqs[seq.slot as usize];
        let retire = s.generation == u32::MAX;
        // Room first, so that nothing below can fail.
        self.recycled
            .try_reserve(s.pages.len())
            .map_err(|e| invalid(format!("KV cache: {e}")))?;
        if !retire {
            self.free_slots
                .try_reserve(1)
                .map_err(|e| invalid(format!("KV cache: {e}")))?;
        }
        let s = &mut self.seqs[seq.slot as usize];
        let pages = std::mem::take(&mut s.pages);
        s.live = false;
        s.len = 0;
        s.generation = s.generation.wrapping_add(1);
        // Reversed, so that the pages are handed out again in the order the sequence held them.
        self.recycled.extend(pages.iter().rev());
        if !retire {
            self.free_slots.push(seq.slot);
        }
        self.epoch += 1;
        Ok(())
    }

    /// Slots made so far, live or not: every [`SeqId::slot`] is below this.
    pub fn slots(&self) -> usize {
        self.seqs.len()
    }

    /// The live sequence in `slot`, or `None` when the slot is free, retired or was never made.
    pub fn slot(&self, slot: usize) -> Option<LiveSeq<'_>> {
        self.seqs.get(slot).filter(|s| s.live).map(|s| LiveSeq {
            len: s.len,
            pages: &s.pages,
        })
    }

    /// The lengths of a batch of distinct live sequences, in batch order.
    ///
    /// Errors for a stale or foreign id (the first in batch order), then for an id that
    /// appears twice (`"{what}: a sequence appears twice in the batch"`).
    pub fn batch_lens(&self, seqs: &[SeqId], what: &str) -> Result<Vec<usize>> {
        let mut lens = Vec::with_capacity(seqs.len());
        for &s in seqs {
            lens.push(self.lookup(s)?.len);
        }
        if seqs.len() < 2 {
            return Ok(lens);
        }
        let mut slots: Vec<u32> = seqs.iter().map(|s| s.slot).collect();
        slots.sort_unstable();
        if slots.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid(format!(
                "{what}: a sequence appears twice in the batch"
            )));
        }
        Ok(lens)
    }

    /// Plans appending `n_tokens` tokens to each of `seqs`, all or nothing: where every new
    /// token row goes ([`AppendPlan::page`]) and which pages each sequence takes from the free
    /// list (in free-list order, batch entry after batch entry).
    ///
    /// Errors, changing nothing, for a stale, foreign or repeated id, a length that overflows,
    /// when the batch does not fit (contiguous: a sequence past `max_len`; paged: more new
    /// blocks for the whole batch than are free), or when a length would pass `i32::MAX`
    /// tokens (the positions the kernels index with). It reserves room in the batch's block
    /// tables (so that [`PageBook::commit`] cannot fail) and changes nothing else.
    pub fn plan_append(&mut self, seqs: &[SeqId], n_tokens: usize) -> Result<AppendPlan> {
        let lens = self.batch_lens(seqs, "KV cache append")?;
        let pt = self.page_tokens;
        let mut extra_total = 0usize;
        let mut longest = 0usize;
        for (&s, &len) in seqs.iter().zip(&lens) {
            let new_len = len
                .checked_add(n_tokens)
                .ok_or_else(|| overflow("sequence length"))?;
            if new_len > self.max_len {
                return Err(invalid(format!(
                    "KV cache: {len} + {n_tokens} tokens exceed max_len {}",
                    self.max_len
                )));
            }
            let have = self.seqs[s.slot as usize].pages.len();
            // At most `free_pages` (checked below) per sequence, so the sum cannot overflow
            // before the check fails.
            extra_total = extra_total.saturating_add(new_len.div_ceil(pt).saturating_sub(have));
            longest = longest.max(new_len);
        }
        let free = self.free_pages();
        if extra_total > free {
            return Err(invalid(if seqs.len() == 1 {
                format!(
                    "KV cache: {n_tokens} more tokens need {extra_total} new blocks but {free} are free"
                )
            } else {
                format!(
                    "KV cache: {n_tokens} more tokens for {} sequences need {extra_total} new blocks but {free} are free",
                    seqs.len(),
                )
            }));
        }
        if longest > i32::MAX as usize {
            return Err(overflow("sequence length past the kernels' i32 positions"));
        }
        let mut plan = Vec::new();
        plan.try_reserve_exact(seqs.len())
            .map_err(|e| invalid(format!("KV cache: {e}")))?;
        // New pages come off the top of the free list, batch entry after batch entry.
        let mut next = 0;
        for (&s, &old_len) in seqs.iter().zip(&lens) {
            // Checked above.
            let new_len = old_len + n_tokens;
            let old = &self.seqs[s.slot as usize].pages;
            let extra = new_len.div_ceil(pt).saturating_sub(old.len());
            // The old pages cover `old_len`, so `first <= old.len()`.
            let first = old_len / pt;
            let mut pages = Vec::new();
            pages
                .try_reserve_exact(old.len() - first + extra)
                .map_err(|e| invalid(format!("KV cache: {e}")))?;
            pages.extend_from_slice(&old[first..]);
            pages.extend((next..next + extra).map(|i| self.free_page(i)));
            next += extra;
            plan.push(Planned {
                slot: s.slot,
                old_len,
                old_pages: old.len(),
                first,
                pages,
            });
        }
        for p in &plan {
            let extra = p.pages.len() - (p.old_pages - p.first);
            self.seqs[p.slot as usize]
                .pages
                .try_reserve(extra)
                .map_err(|e| invalid(format!("KV cache: {e}")))?;
        }
        Ok(AppendPlan {
            book: self.id,
            epoch: self.epoch,
            page_tokens: pt,
            n_tokens,
            taken: extra_total,
            seqs: plan,
        })
    }

    /// Applies a plan: the batch's sequences take their new pages off the free list and grow by
    /// `n_tokens`. Cannot fail.
    ///
    /// # Panics
    /// When `plan` was not made by [`PageBook::plan_append`] on this book, or the book changed
    /// since (a sequence was added or freed, or another plan was committed).
    pub fn commit(&mut self, plan: AppendPlan) {
        assert!(
            plan.book == self.id && plan.epoch == self.epoch,
            "AppendPlan committed to a book other than the unchanged one it was planned on"
        );
        self.take_pages(plan.taken);
        for p in &plan.seqs {
            let s = &mut self.seqs[p.slot as usize];
            s.pages.extend_from_slice(&p.pages[p.old_pages - p.first..]);
            s.len = p.old_len + plan.n_tokens;
        }
        self.epoch += 1;
    }
}

impl AppendPlan {
    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Tokens appended to each sequence.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Pages the whole batch takes from the free list.
    pub fn taken(&self) -> usize {
        self.taken
    }

    /// Batch entry `b`: its slot, old length and page count, and the pages it takes.
    ///
    /// # Panics
    /// When `b >= self.len()`.
    pub fn seq(&self, b: usize) -> PlannedSeq<'_> {
        let p = &self.seqs[b];
        PlannedSeq {
            slot: p.slot,
            old_len: p.old_len,
            old_pages: p.old_pages,
            new_pages: &p.pages[p.old_pages - p.first..],
        }
    }

    /// The page that will hold position `pos` of batch entry `b` (its row in the page is
    /// `pos % T`), for the new positions `old_len <= pos < old_len + n_tokens`.
    ///
    /// # Panics
    /// When `b >= self.len()` or `pos` is not one of the entry's new positions.
    pub fn page(&self, b: usize, pos: usize) -> u32 {
        let p = &self.seqs[b];
        assert!(
            pos >= p.old_len && pos - p.old_len < self.n_tokens,
            "position {pos} is not appended by this plan"
        );
        p.pages[pos / self.page_tokens - p.first]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paged(block_size: usize, num_blocks: usize) -> PageBook {
        PageBook::new(KvLayout::Paged {
            block_size,
            num_blocks,
        })
        .unwrap()
    }

    fn ids(book: &mut PageBook, n: usize) -> Vec<SeqId> {
        (0..n).map(|_| book.add_sequence().unwrap().0).collect()
    }

    fn append(book: &mut PageBook, seqs: &[SeqId], n: usize) -> Result<()> {
        let plan = book.plan_append(seqs, n)?;
        book.commit(plan);
        Ok(())
    }

    fn pages(book: &PageBook, s: SeqId) -> Vec<u32> {
        book.lookup(s).unwrap().pages.to_vec()
    }

    #[test]
    fn layouts_are_validated() {
        assert!(
            PageBook::new(KvLayout::Paged {
                block_size: 0,
                num_blocks: 4
            })
            .is_err()
        );
        assert!(
            PageBook::new(KvLayout::Contiguous {
                max_seqs: 4,
                max_len: 0
            })
            .is_err()
        );
        assert!(
            PageBook::new(KvLayout::Contiguous {
                max_seqs: 0,
                max_len: 4
            })
            .is_err()
        );
        let too_many = PageBook::new(KvLayout::Paged {
            block_size: 1,
            num_blocks: u32::MAX as usize + 1,
        });
        assert!(matches!(too_many, Err(Error::InvalidArgument(m)) if m.contains("u32::MAX")));
        let book = paged(16, 3);
        assert!(book.is_paged());
        assert_eq!(
            (book.page_tokens(), book.free_pages(), book.slots()),
            (16, 3, 0)
        );
        let book = PageBook::new(KvLayout::Contiguous {
            max_seqs: 2,
            max_len: 7,
        })
        .unwrap();
        assert!(!book.is_paged());
        assert_eq!((book.page_tokens(), book.free_pages()), (7, 2));
    }

    #[test]
    fn stale_ids_are_refused_even_after_slot_reuse() {
        let mut book = paged(4, 8);
        let s = ids(&mut book, 2);
        append(&mut book, &s, 3).unwrap();
        book.free_sequence(s[0]).unwrap();
        for _ in 0..2 {
            assert!(book.lookup(s[0]).is_err());
            assert!(book.seq_len(s[0]).is_err());
            assert!(book.free_sequence(s[0]).is_err());
            assert!(book.plan_append(&[s[0]], 1).is_err());
            assert!(book.batch_lens(&[s[1], s[0]], "x").is_err());
            // The other sequence is untouched.
            assert_eq!(book.seq_len(s[1]).unwrap(), 3);
            // Reuse the slot: a new generation, a different id.
            if book.slots() == 2 && book.slot(s[0].slot() as usize).is_none() {
                let (t, page) = book.add_sequence().unwrap();
                assert_eq!(page, None);
                assert_eq!(t.slot(), s[0].slot());
                assert_ne!(t, s[0]);
                assert_eq!(book.seq_len(t).unwrap(), 0);
                assert_eq!(book.slot(t.slot() as usize).unwrap().len, 0);
            }
        }
        assert_eq!(book.slots(), 2);
        // An id of a slot never made is foreign.
        let foreign = SeqId {
            slot: 7,
            generation: 0,
        };
        assert!(book.lookup(foreign).is_err());
        assert!(book.slot(7).is_none());
    }

    #[test]
    fn a_slot_whose_generation_would_wrap_is_retired() {
        let mut book = paged(4, 8);
        let (a, _) = book.add_sequence().unwrap();
        book.free_sequence(a).unwrap();
        // Fast-forward slot 0 to its last generation.
        book.seqs[0].generation = u32::MAX;
        let (b, _) = book.add_sequence().unwrap();
        assert_eq!((b.slot(), b.generation), (0, u32::MAX));
        append(&mut book, &[b], 5).unwrap();
        assert_eq!(book.free_pages(), 6);
        book.free_sequence(b).unwrap();
        // Its pages come back, but the slot does not: the next sequences get new slots, and
        // the slot's wrapped generation 0 does not revive the first id.
        assert_eq!(book.free_pages(), 8);
        let (c, _) = book.add_sequence().unwrap();
        let (d, _) = book.add_sequence().unwrap();
        assert_eq!((c.slot(), d.slot()), (1, 2));
        assert_eq!(book.slots(), 3);
        assert!(book.lookup(a).is_err());
        assert!(book.lookup(b).is_err());
        assert!(book.slot(0).is_none());
    }

    #[test]
    fn a_repeated_id_is_refused() {
        let mut book = paged(4, 8);
        let s = ids(&mut book, 2);
        assert_eq!(book.batch_lens(&s, "x").unwrap(), vec![0, 0]);
        let e = book.batch_lens(&[s[1], s[0], s[1]], "decode").unwrap_err();
        assert_eq!(
            e,
            Error::InvalidArgument("decode: a sequence appears twice in the batch".into())
        );
        assert!(book.plan_append(&[s[0], s[0]], 1).is_err());
        assert_eq!(book.seq_len(s[0]).unwrap(), 0);
        assert_eq!(book.free_pages(), 8);
        assert!(book.plan_append(&[], 1).unwrap().is_empty());
    }

    #[test]
    fn paged_capacity_is_all_or_nothing() {
        // 3 blocks of 4 tokens.
        let mut book = paged(4, 3);
        let s = ids(&mut book, 2);
        // 5 tokens each need 2 blocks each: 4 > 3, refused as a whole.
        let e = book.plan_append(&s, 5).unwrap_err();
        assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("need 4 new blocks but 3")));
        assert_eq!(book.batch_lens(&s, "x").unwrap(), vec![0, 0]);
        assert_eq!(book.free_pages(), 3);
        // Either alone fits.
        let plan = book.plan_append(&s[1..], 5).unwrap();
        assert_eq!((plan.len(), plan.taken(), plan.n_tokens()), (1, 2, 5));
        book.commit(plan);
        assert_eq!(book.free_pages(), 1);
        assert_eq!(pages(&book, s[1]), vec![0, 1]);
        // Three more still fit in the second block, four need a block more.
        assert_eq!(book.plan_append(&s[1..], 3).unwrap().taken(), 0);
        assert_eq!(book.plan_append(&s[1..], 4).unwrap().taken(), 1);
        // One block is free: s[0] may take it, or s[1], not both.
        assert!(book.plan_append(&s, 4).is_err());
        assert_eq!(book.batch_lens(&s, "x").unwrap(), vec![0, 5]);
        append(&mut book, &s, 3).unwrap();
        assert_eq!(book.batch_lens(&s, "x").unwrap(), vec![3, 8]);
        assert_eq!(book.free_pages(), 0);
        assert!(book.plan_append(&s[..1], 2).is_err());
        assert!(book.plan_append(&s[..1], 1).is_ok());
    }

    #[test]
    fn contiguous_capacity_is_all_or_nothing() {
        let mut book = PageBook::new(KvLayout::Contiguous {
            max_seqs: 2,
            max_len: 6,
        })
        .unwrap();
        let (a, pa) = book.add_sequence().unwrap();
        let (b, pb) = book.add_sequence().unwrap();
        assert_eq!((pa, pb), (Some(0), Some(1)));
        assert_eq!(book.free_pages(), 0);
        // No free slot.
        let e = book.add_sequence().unwrap_err();
        assert_eq!(
            e,
            Error::InvalidArgument("KV cache: every sequence slot is in use".into())
        );
        assert_eq!(book.slots(), 2);
        assert!(book.plan_append(&[a], 7).is_err());
        append(&mut book, &[a], 4).unwrap();
        // b fits 3 more, a does not: refused as a whole.
        let e = book.plan_append(&[b, a], 3).unwrap_err();
        assert_eq!(
            e,
            Error::InvalidArgument("KV cache: 4 + 3 tokens exceed max_len 6".into())
        );
        assert_eq!(book.batch_lens(&[a, b], "x").unwrap(), vec![4, 0]);
        let plan = book.plan_append(&[b, a], 2).unwrap();
        assert_eq!(plan.taken(), 0);
        assert_eq!(
            (plan.page(0, 0), plan.page(0, 1), plan.page(1, 5)),
            (1, 1, 0)
        );
        book.commit(plan);
        assert!(book.plan_append(&[a], 1).is_err());
        assert_eq!(pages(&book, a), vec![0]);
        // Freeing gives the slot and its page to the next sequence.
        book.free_sequence(a).unwrap();
        assert_eq!(book.free_pages(), 1);
        let (c, pc) = book.add_sequence().unwrap();
        assert_eq!(pc, Some(0));
        assert_eq!(
            book.lookup(c).unwrap(),
            LiveSeq {
                len: 0,
                pages: &[0]
            }
        );
        assert!(book.lookup(a).is_err());
    }

    #[test]
    fn plans_place_every_row() {
        let mut book = paged(4, 8);
        let s = ids(&mut book, 2);
        append(&mut book, &s[..1], 5).unwrap(); // s[0]: pages 0, 1
        let plan = book.plan_append(&s, 6).unwrap();
        // s[0]: positions 5..11 in its page 1 (5..8), then new page 2 (8..11); s[1]: positions
        // 0..6 in new pages 3 (0..4) and 4 (4..6).
        assert_eq!(plan.taken(), 3);
        assert_eq!(
            plan.seq(0),
            PlannedSeq {
                slot: s[0].slot(),
                old_len: 5,
                old_pages: 2,
                new_pages: &[2]
            }
        );
        assert_eq!(
            plan.seq(1),
            PlannedSeq {
                slot: s[1].slot(),
                old_len: 0,
                old_pages: 0,
                new_pages: &[3, 4]
            }
        );
        let rows0: Vec<u32> = (5..11).map(|p| plan.page(0, p)).collect();
        let rows1: Vec<u32> = (0..6).map(|p| plan.page(1, p)).collect();
        assert_eq!(rows0, vec![1, 1, 1, 2, 2, 2]);
        assert_eq!(rows1, vec![3, 3, 3, 3, 4, 4]);
        // Planning changes nothing.
        assert_eq!(book.free_pages(), 6);
        assert_eq!(book.seq_len(s[0]).unwrap(), 5);
        book.commit(plan);
        assert_eq!(book.free_pages(), 3);
        assert_eq!(
            book.lookup(s[0]).unwrap(),
            LiveSeq {
                len: 11,
                pages: &[0, 1, 2]
            }
        );
        assert_eq!(
            book.slot(s[1].slot() as usize).unwrap(),
            LiveSeq {
                len: 6,
                pages: &[3, 4]
            }
        );
        // A zero-token append plans nothing and changes nothing.
        let plan = book.plan_append(&s, 0).unwrap();
        assert_eq!(
            (plan.len(), plan.taken(), plan.seq(0).new_pages),
            (2, 0, &[][..])
        );
        book.commit(plan);
        assert_eq!(book.batch_lens(&s, "x").unwrap(), vec![11, 6]);
    }

    #[test]
    #[should_panic(expected = "not appended by this plan")]
    fn a_plan_refuses_positions_it_does_not_append() {
        let mut book = paged(4, 8);
        let s = ids(&mut book, 1);
        append(&mut book, &s, 2).unwrap();
        book.plan_append(&s, 3).unwrap().page(0, 1);
    }

    #[test]
    fn pages_are_reused_after_free() {
        let mut book = paged(2, 4);
        let s = ids(&mut book, 2);
        append(&mut book, &s[..1], 3).unwrap();
        append(&mut book, &s[1..], 1).unwrap();
        assert_eq!(
            (pages(&book, s[0]), pages(&book, s[1])),
            (vec![0, 1], vec![2])
        );
        assert_eq!(book.free_pages(), 1);
        // Four more tokens for s[1] do not fit until s[0] is freed.
        assert!(book.plan_append(&s[1..], 4).is_err());
        book.free_sequence(s[0]).unwrap();
        assert_eq!(book.free_pages(), 3);
        append(&mut book, &s[1..], 4).unwrap();
        // s[0]'s pages come back in the order it held them, after the one never used.
        assert_eq!(pages(&book, s[1]), vec![2, 0, 1]);
        assert_eq!(book.free_pages(), 1);
        let (t, _) = book.add_sequence().unwrap();
        append(&mut book, &[t], 2).unwrap();
        assert_eq!(pages(&book, t), vec![3]);
        assert_eq!(book.free_pages(), 0);
    }

    #[test]
    fn lengths_are_bounded() {
        // No storage behind a book: a huge block costs nothing.
        let mut book = paged(1 << 31, 2);
        let s = ids(&mut book, 1);
        let e = book.plan_append(&s, i32::MAX as usize + 1).unwrap_err();
        assert!(matches!(e, Error::Overflow { .. }));
        append(&mut book, &s, i32::MAX as usize).unwrap();
        assert!(matches!(
            book.plan_append(&s, 1),
            Err(Error::Overflow { .. })
        ));
        assert!(matches!(
            book.plan_append(&s, usize::MAX),
            Err(Error::Overflow { what }) if what == "sequence length"
        ));
        assert_eq!(book.seq_len(s[0]).unwrap(), i32::MAX as usize);
    }

    #[test]
    #[should_panic(expected = "AppendPlan committed")]
    fn a_plan_is_void_once_the_book_changes() {
        let mut book = paged(4, 8);
        let s = ids(&mut book, 1);
        let plan = book.plan_append(&s, 1).unwrap();
        book.add_sequence().unwrap();
        book.commit(plan);
    }

    #[test]
    #[should_panic(expected = "AppendPlan committed")]
    fn a_plan_is_void_in_another_book() {
        let mut a = paged(4, 8);
        let mut b = paged(4, 8);
        let sa = ids(&mut a, 1);
        ids(&mut b, 1);
        let plan = a.plan_append(&sa, 1).unwrap();
        b.commit(plan);
    }

    /// The book against the plainest model: the free list as one explicit stack, initially
    /// `(0..pages).rev()`, popped for new pages and pushed (reversed) on free.
    #[test]
    fn matches_an_explicit_free_stack() {
        for layout in [
            KvLayout::Paged {
                block_size: 3,
                num_blocks: 10,
            },
            KvLayout::Contiguous {
                max_seqs: 3,
                max_len: 5,
            },
        ] {
            let mut book = PageBook::new(layout).unwrap();
            let (paged, n_pages, pt) = match layout {
                KvLayout::Paged {
                    block_size,
                    num_blocks,
                } => (true, num_blocks, block_size),
                KvLayout::Contiguous { max_seqs, max_len } => (false, max_seqs, max_len),
            };
            let mut stack: Vec<u32> = (0..n_pages as u32).rev().collect();
            let mut live: Vec<(SeqId, usize, Vec<u32>)> = Vec::new();
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut next = |n: usize| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % n as u64) as usize
            };
            let (mut added, mut appended, mut refused) = (0, 0, 0);
            for _ in 0..2000 {
                match next(4) {
                    0 => {
                        let fits = paged || !stack.is_empty();
                        let r = book.add_sequence();
                        assert_eq!(r.is_ok(), fits);
                        if let Ok((id, page)) = r {
                            added += 1;
                            let pages = if paged {
                                vec![]
                            } else {
                                vec![stack.pop().unwrap()]
                            };
                            assert_eq!(page, pages.first().copied());
                            live.push((id, 0, pages));
                        }
                    }
                    1 if !live.is_empty() => {
                        let (id, _, pages) = live.swap_remove(next(live.len()));
                        book.free_sequence(id).unwrap();
                        stack.extend(pages.iter().rev());
                    }
                    _ if !live.is_empty() => {
                        // A batch of up to 3 distinct live sequences.
                        let mut batch: Vec<usize> = (0..live.len()).collect();
                        for i in 0..batch.len() {
                            let j = i + next(batch.len() - i);
                            batch.swap(i, j);
                        }
                        batch.truncate(1 + next(3.min(live.len())));
                        let n = next(2 * pt + 1);
                        let ids: Vec<SeqId> = batch.iter().map(|&i| live[i].0).collect();
                        let need: usize = batch
                            .iter()
                            .map(|&i| (live[i].1 + n).div_ceil(pt).saturating_sub(live[i].2.len()))
                            .sum();
                        let fits = need <= stack.len()
                            && (paged || batch.iter().all(|&i| live[i].1 + n <= pt));
                        let r = book.plan_append(&ids, n);
                        assert_eq!(r.is_ok(), fits, "{layout:?}: {n} tokens, need {need}");
                        match r {
                            Ok(plan) => {
                                appended += 1;
                                for (b, &i) in batch.iter().enumerate() {
                                    let (_, len, pages) = &mut live[i];
                                    while pages.len() < (*len + n).div_ceil(pt) {
                                        pages.push(stack.pop().unwrap());
                                    }
                                    for pos in *len..*len + n {
                                        assert_eq!(plan.page(b, pos), pages[pos / pt]);
                                    }
                                    *len += n;
                                }
                                book.commit(plan);
                            }
                            Err(_) => refused += 1,
                        }
                    }
                    _ => {}
                }
                assert_eq!(book.free_pages(), stack.len());
                for (id, len, pages) in &live {
                    assert_eq!(book.lookup(*id).unwrap(), LiveSeq { len: *len, pages });
                }
                let in_use = (0..book.slots())
                    .filter(|&i| book.slot(i).is_some())
                    .count();
                assert_eq!(in_use, live.len());
            }
            // The walk covered every kind of step.
            assert!(
                added > 50 && appended > 50 && refused > 10,
                "{added} {appended} {refused}"
            );
        }
    }
}
