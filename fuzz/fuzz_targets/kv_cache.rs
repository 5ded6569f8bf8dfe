//! Fuzzes the KV cache of `tessera-cpu` (`kv_cache::KvCache` and `decode_attention_with`):
//! arbitrary bytes drive a small cache (any dtype, a paged layout of a few small blocks, or a
//! contiguous one) through a sequence of add / append / read / decode / free operations, with
//! ids that may be live, freed (stale) or out of range, token counts that may not fit, and
//! values that include NaN, infinities, huge and subnormal numbers. Nothing may crash, and:
//!
//! * every operation succeeds exactly when an independent shadow model says it should
//!   (capacity: free slots, or free blocks counted from the shadow lengths), and
//!   `free_blocks` and every `seq_len` agree with the model after every operation;
//! * after every operation, every live sequence's `read` equals the shadow's contents: the
//!   f32 values appended, passed through the storage rounding (`f16::from_f32`, or GGML's
//!   Q8_0 quantize-then-dequantize of the zero-padded row), NaN matching NaN;
//! * a refused operation changes nothing (the checks above run after it too);
//! * `decode_attention_with` on a batch of live sequences succeeds on every available ISA,
//!   with the same bits on one thread and on two, gives zeros for empty sequences, and is
//!   refused (output untouched) for a batch holding a stale or repeated id.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera_core::attention::{HeadLayout, Heads, HeadsMut};
use tessera_core::f16;
use tessera_core::quant::{BlockQ8_0, QK, dequantize, quantize};
use tessera_cpu::kv_cache::{
    DecodeOptions, DecodeParams, KvCache, KvCacheConfig, KvDType, KvLayout, SeqId,
    decode_attention_with,
};
use tessera_cpu::{Isa, Parallelism};

#[derive(Arbitrary, Debug)]
struct Input {
    dtype: u8,
    contiguous: bool,
    n_kv_heads: u8,
    head_dim: u8,
    /// Paged: tokens per block; contiguous: max_len.
    page_tokens: u8,
    /// Paged: blocks; contiguous: max_seqs.
    pages: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Add,
    /// Frees sequence `which` (an index into live, then freed, ids).
    Free(u8),
    Append {
        which: u8,
        n_tokens: u8,
        /// Declared tokens beyond the slice (an operand too short) when non-zero.
        short: u8,
        bhsd: bool,
        seed: u32,
        special: u8,
    },
    Decode {
        /// Bit mask over live sequences.
        mask: u16,
        group: u8,
        scale: i8,
        /// Adds a stale or repeated id to the batch.
        bad: u8,
    },
}

/// A deterministic value generator with occasional special values.
struct Gen(u64, u8);
impl Gen {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (self.0 >> 40) as u32;
        let unit = (r >> 1) as f32 / (1u32 << 23) as f32 - 1.0;
        if self.1 != 0 && r % 61 == 0 {
            match self.1 % 8 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                3 => 1e30,
                4 => 1e-40,
                5 => 70000.0,
                6 => -0.0,
                _ => f32::MAX,
            }
        } else {
            unit * 4.0
        }
    }
}

/// The shadow of one live sequence: its id and the f32 values appended (`[len, nkv, d]`).
struct Shadow {
    id: SeqId,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// What the cache should return for the original `x` (one row of `d` values at a time).
fn stored(dtype: KvDType, x: &[f32], d: usize) -> Vec<f32> {
    match dtype {
        KvDType::F32 => x.to_vec(),
        KvDType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        KvDType::Q8_0 => {
            let nb = d.div_ceil(QK);
            let mut out = Vec::with_capacity(x.len());
            let mut pad = vec![0.0f32; nb * QK];
            let mut blocks = vec![<BlockQ8_0 as bytemuck::Zeroable>::zeroed(); nb];
            for row in x.chunks(d) {
                pad[..d].copy_from_slice(row);
                quantize(&pad, &mut blocks).unwrap();
                dequantize(&blocks, &mut pad).unwrap();
                out.extend_from_slice(&pad[..d]);
                pad.fill(0.0);
            }
            out
        }
    }
}

fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

fuzz_target!(|input: Input| {
    let dtype = [KvDType::F32, KvDType::F16, KvDType::Q8_0][input.dtype as usize % 3];
    let nkv = 1 + input.n_kv_heads as usize % 3;
    let d = 1 + input.head_dim as usize % 70;
    let pt = 1 + input.page_tokens as usize % 9;
    let pages = 1 + input.pages as usize % 12;
    let layout = if input.contiguous {
        KvLayout::Contiguous {
            max_seqs: pages.min(4),
            max_len: pt * 3,
        }
    } else {
        KvLayout::Paged {
            block_size: pt,
            num_blocks: pages,
        }
    };
    let config = KvCacheConfig {
        n_kv_heads: nkv,
        head_dim: d,
        dtype,
        layout,
    };
    let mut cache = KvCache::new(config).unwrap();
    let row = nkv * d;
    let mut live: Vec<Shadow> = Vec::new();
    let mut dead: Vec<SeqId> = Vec::new();

    for op in input.ops.iter().take(48) {
        match *op {
            Op::Add => {
                let ok = match layout {
                    KvLayout::Contiguous { max_seqs, .. } => live.len() < max_seqs,
                    KvLayout::Paged { .. } => true,
                };
                match cache.add_sequence() {
                    Ok(id) => {
                        assert!(ok, "add_sequence succeeded with every slot taken");
                        assert!(!live.iter().any(|s| s.id == id) && !dead.contains(&id));
                        live.push(Shadow {
                            id,
                            k: Vec::new(),
                            v: Vec::new(),
                        });
                    }
                    Err(_) => assert!(!ok, "add_sequence refused with a free slot"),
                }
            }
            Op::Free(which) => {
                let w = which as usize;
                if w < live.len() {
                    let s = live.remove(w);
                    cache.free_sequence(s.id).unwrap();
                    dead.push(s.id);
                } else if let Some(&id) = dead.get(w - live.len()) {
                    assert!(cache.free_sequence(id).is_err());
                }
            }
            Op::Append {
                which,
                n_tokens,
                short,
                bhsd,
                seed,
                special,
            } => {
                let n = n_tokens as usize % 20;
                let mut g = Gen(seed as u64, special);
                let k: Vec<f32> = (0..n * row).map(|_| g.next()).collect();
                let v: Vec<f32> = (0..n * row).map(|_| g.next()).collect();
                let declared = n + short as usize % 3;
                let l = if bhsd {
                    HeadLayout::bhsd(declared, nkv, d)
                } else {
                    HeadLayout::bshd(declared, nkv, d)
                };
                // The operands in layout `l` for `declared` tokens, holding the first `n`
                // (cut short when `declared > n`).
                let place = |x: &[f32]| {
                    let mut data = vec![0.0f32; l.extent(1, declared, nkv, d).unwrap()];
                    for t in 0..n {
                        for h in 0..nkv {
                            let o = l.offset(0, t, h);
                            data[o..o + d].copy_from_slice(&x[(t * nkv + h) * d..][..d]);
                        }
                    }
                    if declared > n {
                        data.truncate(data.len() - 1);
                    }
                    data
                };
                let (kd, vd) = (place(&k), place(&v));
                let w = which as usize;
                if w < live.len() {
                    let len = live[w].k.len() / row;
                    let used: usize = live.iter().map(|s| (s.k.len() / row).div_ceil(pt)).sum();
                    let fits = match layout {
                        KvLayout::Contiguous { max_len, .. } => len + declared <= max_len,
                        KvLayout::Paged { num_blocks, .. } => {
                            (len + declared).div_ceil(pt) - len.div_ceil(pt) <= num_blocks - used
                        }
                    };
                    let ok = fits && declared == n;
                    let r =
                        cache.append(live[w].id, Heads::new(&kd, l), Heads::new(&vd, l), declared);
                    assert_eq!(r.is_ok(), ok, "append of {declared} to len {len}: {r:?}");
                    if ok {
                        live[w].k.extend_from_slice(&k);
                        live[w].v.extend_from_slice(&v);
                    }
                } else if let Some(&id) = dead.get(w - live.len()) {
                    assert!(
                        cache
                            .append(id, Heads::new(&kd, l), Heads::new(&vd, l), declared)
                            .is_err()
                    );
                }
            }
            Op::Decode {
                mask,
                group,
                scale,
                bad,
            } => {
                let group = 1 + group as usize % 4;
                let n_heads = nkv * group;
                let mut seqs: Vec<SeqId> = live
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask >> (i % 16) & 1 == 1)
                    .map(|(_, s)| s.id)
                    .collect();
                let bad_id = match bad % 4 {
                    1 => dead.first().copied(),
                    2 => seqs.first().copied(),
                    _ => None,
                };
                if let Some(id) = bad_id {
                    seqs.push(id);
                }
                let nb = seqs.len();
                let mut g = Gen(mask as u64 * 7 + 1, 0);
                let q: Vec<f32> = (0..nb * n_heads * d).map(|_| g.next()).collect();
                let ql = HeadLayout::bshd(1, n_heads, d);
                let params = DecodeParams {
                    scale: scale as f32 / 16.0,
                    bias: None,
                };
                let mut first: Option<Vec<f32>> = None;
                for isa in Isa::available() {
                    for parallelism in [Parallelism::Sequential, Parallelism::Threads(2)] {
                        let mut out = vec![-7.0f32; nb * n_heads * d];
                        let r = decode_attention_with(
                            &DecodeOptions {
                                isa: Some(isa),
                                parallelism,
                            },
                            &cache,
                            &seqs,
                            n_heads,
                            Heads::new(&q, ql),
                            HeadsMut::new(&mut out, ql),
                            &params,
                        );
                        if bad_id.is_some() {
                            assert!(r.is_err());
                            assert!(out.iter().all(|&x| x == -7.0));
                            continue;
                        }
                        r.unwrap();
                        for (b, id) in seqs.iter().enumerate() {
                            if cache.seq_len(*id).unwrap() == 0 {
                                assert!(
                                    out[b * n_heads * d..][..n_heads * d]
                                        .iter()
                                        .all(|&x| x == 0.0)
                                );
                            }
                        }
                        if parallelism == Parallelism::Sequential {
                            first = Some(out);
                        } else {
                            assert!(same(first.as_ref().unwrap(), &out), "threads differ");
                        }
                    }
                }
            }
        }

        // The cache agrees with the shadow model.
        let used: usize = live.iter().map(|s| (s.k.len() / row).div_ceil(pt)).sum();
        let free = match layout {
            KvLayout::Contiguous { max_seqs, .. } => max_seqs - live.len(),
            KvLayout::Paged { num_blocks, .. } => num_blocks - used,
        };
        assert_eq!(cache.free_blocks(), free);
        for s in &live {
            let n = s.k.len();
            assert_eq!(cache.seq_len(s.id).unwrap() * row, n);
            let (mut k, mut v) = (vec![0.0; n], vec![0.0; n]);
            cache.read(s.id, &mut k, &mut v).unwrap();
            assert!(
                same(&k, &stored(dtype, &s.k, d)),
                "K differs from the shadow"
            );
            assert!(
                same(&v, &stored(dtype, &s.v, d)),
                "V differs from the shadow"
            );
        }
        for &id in &dead {
            assert!(cache.seq_len(id).is_err());
        }
    }
});
