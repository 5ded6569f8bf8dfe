// attention.cu: fused flash-style forward attention (FlashAttention-2 algorithm).
//
//   out[b, i, h, :] = Σ_j softmax_j(scale·q[b,i,h]·k[b,j,g] + bias[b,h,i,j] + mask[b,i,j]) · v[b,j,g]
//
// with g = h / group (grouped-query attention), the mask 0 or −∞ (causal: key j visible to query
// row i iff j <= q_offset + i; key padding: j < lengths[b], and/or mask[b·kv_len + j] != 0), and
// the bias either a dense f32 [batch, heads, q, k] tensor (element strides, 0 broadcasts) or
// T5's bucketed relative-position table [num_buckets, n_heads] evaluated in the kernel. A query
// row whose keys are all masked writes zeros. Q, K and V are f16 or bf16 (the same type), the
// output is f32 (as the CPU family's), every operand [batch, seq, heads, head_dim] with element
// strides (head_dim contiguous). The semantics are tessera_core::attention's, term for term.
//
// Every kernel takes one argument, `AttnArgs` by value; kernels/cuda/src/attention.rs has its
// #[repr(C)] twin, field for field, and validates everything on the host first.
//
// ---------------------------------------------------------------------------------------------
// attn_fwd_{f16,bf16}_d{32,64,80,96,128}: the tensor-core kernel, D = head_dim exactly.
//   grid  (ceil(q_len / 64), n_heads, batch)   x is reversed: blockIdx.x = 0 takes the last
//                                              (under a causal mask the longest) query tile
//   block 128 threads = 4 warps; warp w owns query rows 16w .. 16w+15 of the block's 64
//   dynamic smem: attn_mma_smem(D) = 3·64·(D+8)·2 bytes (Q, K, V tiles; rows padded by 8
//                 elements so ldmatrix is bank-conflict free) + 128 floats (relative bias)
//                 = 52 736 bytes for D = 128: above 48 KiB, the launcher raises the limit.
//   The block loops over key tiles of 64: S = Q·Kᵀ by mma.sync.m16n8k16 (f32 accumulate; Q and
//   K fragments by ldmatrix from smem), scale, bias and masks per element, the online softmax
//   (running max and sum in f32, per row), P rounded to f16/bf16 in registers and O += P·V by
//   mma.sync (V fragments by ldmatrix.trans). The row sum adds the *rounded* P, so the output
//   is an exact convex combination of the rounded weights. K tile t+1 is copied (cp.async)
//   while tile t's softmax and P·V run, and V tile t while S = Q·Kᵀ runs (one buffer each).
//   Key tiles past the last key any row of the block sees (causal limit, padding length)
//   are skipped; per-element masking runs only on tiles that need it.
// attn_fwd_wgmma_{f16,bf16}_d{64,128}: the Hopper (sm_90a) kernel, same grid, block and
//   semantics, both products by wgmma.mma_async from 128-byte-swizzled shared memory (see its
//   section below). Opt-in (AttnPath::Wgmma) until verified on an H100; a trapping stub on
//   every other architecture.
// attn_fwd_simt_{f16,bf16}_e{8,32}: any head_dim <= 32·E (256 or 1024), plain SIMT.
//   grid  (ceil(q_len / 4), n_heads, batch), block 128 = 4 warps, one query row per warp;
//   static smem 4·32·E floats (the query rows). Lane l scores key j0 + l of each chunk of 32
//   keys, then the warp adds the chunk's weighted V rows, lane l owning columns l + 32e.
//   f32 throughout (P is not rounded).
// attn_rel_bucket_probe: out[t] = bucket(rp0 + t) for t < n (tests compare it with the Rust
//   relative_position_bucket). grid-stride, any geometry.
//
// Preconditions (checked by the launcher, never by the kernels):
//   * every (b, s, h) row the shape reaches lies inside its buffer; the output layout is
//     disjoint; n_heads = group · n_kv_heads; q_offset + q_len + 128 and kv_len + 128 fit int;
//   * `vec` != 0 only if Q, K and V are 16-byte aligned and every used stride is a multiple of
//     8 elements (16-byte cp.async); otherwise the kernels load element by element;
//   * `o_vec` != 0 only if the output is 8-byte aligned and every used stride is even;
//   * lengths (if not null) holds `batch` values (clamped to kv_len here); mask (if not null)
//     batch·kv_len bytes; a dense bias covers every (b, h, i < q_len, j < kv_len); a
//     relative table holds num_buckets·n_heads floats with max_distance > max_exact >= 1.
//
// The T5 bucket (rel_bucket) is Rust's tessera_core::attention::relative_position_bucket
// operation for operation in f32 (no FMA contraction: __fmul_rn/__fadd_rn/__fdiv_rn), except
// the logarithm: log_ratio = (float)log((double)ratio), i.e. the correctly rounded f32
// logarithm in all but astronomically rare cases, where Rust calls the platform's logf (glibc:
// < 1 ulp, correctly rounded for the ratios T5 meets). The bucket can differ only where
// `large` lies within about 2⁻²² (relative) of an integer; tests/attention.rs compares every
// bucket of the T5 configurations over ±4096 positions.
#include "common.cuh"

struct AttnArgs {
    const void* q;              // [batch, q_len, n_heads, head_dim] f16/bf16
    const void* k;              // [batch, kv_len, n_kv_heads, head_dim]
    const void* v;              // [batch, kv_len, n_kv_heads, head_dim]
    float* o;                   // [batch, q_len, n_heads, head_dim] f32
    const uint32_t* lengths;    // [batch] or null
    const uint8_t* mask;        // [batch, kv_len] or null
    const float* bias;          // dense bias, relative table, or null
    int64_t q_bs, q_ss, q_hs;   // element strides: batch, seq, head
    int64_t k_bs, k_ss, k_hs;
    int64_t v_bs, v_ss, v_hs;
    int64_t o_bs, o_ss, o_hs;
    int64_t bias_bs, bias_hs, bias_qs;  // dense bias strides (key index contiguous)
    int32_t batch, q_len, kv_len, n_heads, group, head_dim, q_offset;
    int32_t causal;             // 0 / 1
    int32_t bias_kind;          // 0 none, 1 dense, 2 relative
    int32_t num_buckets, max_distance, bidirectional;
    int32_t vec;                // 16-byte loads of Q/K/V legal
    int32_t o_vec;              // 8-byte output stores legal
    float scale;
    float rel_denom;            // (float)ln(max_distance / max_exact), computed in f64 as Rust does
};

static_assert(sizeof(AttnArgs) == 240, "AttnArgs must match kernels/cuda/src/attention.rs");

#define ATTN_LOG2E 1.4426950408889634f

// ---- the T5 relative-position bucket ---------------------------------------------------------

TESSERA_DEVICE int attn_rel_bucket(int rp, int bidirectional, int num_buckets, float denom) {
    int buckets = num_buckets;
    int base = 0;
    unsigned int r;
    if (bidirectional) {
        buckets /= 2;
        if (rp > 0) base = buckets;
        r = rp < 0 ? 0u - (unsigned int)rp : (unsigned int)rp;
    } else {
        r = rp < 0 ? 0u - (unsigned int)rp : 0u;
    }
    const unsigned int max_exact = (unsigned int)buckets / 2u;
    if (r < max_exact) return base + (int)r;
    const float ratio = __fdiv_rn((float)r, (float)max_exact);
    const float log_ratio = (float)log((double)ratio);
    const float span = __fsub_rn((float)buckets, (float)max_exact);
    const float large = __fadd_rn((float)max_exact, __fmul_rn(__fdiv_rn(log_ratio, denom), span));
    // Rust: `large as u64` truncates toward zero (large >= max_exact >= 1 here), then min.
    const unsigned long long li = (unsigned long long)large;
    const unsigned long long cap = (unsigned long long)(buckets - 1);
    return base + (int)(li < cap ? li : cap);
}

// bucket(j − pos) clamped to int: |rp| beyond max_distance all share the last bucket, so the
// clamp never changes a bucket.
TESSERA_DEVICE int attn_rel_pos(long long j, long long pos) {
    long long rp = j - pos;
    if (rp > 2147483647LL) rp = 2147483647LL;
    if (rp < -2147483647LL) rp = -2147483647LL;
    return (int)rp;
}

extern "C" __global__ void attn_rel_bucket_probe(int* __restrict__ out, int rp0, int n, int bidirectional,
                                                 int num_buckets, float denom) {
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n; t += gridDim.x * blockDim.x) {
        out[t] = attn_rel_bucket(attn_rel_pos(rp0 + (long long)t, 0), bidirectional, num_buckets, denom);
    }
}

// ---- element types ---------------------------------------------------------------------------

template <typename T> struct AttnType;
template <> struct AttnType<__half> {
    static constexpr bool BF16 = false;
    static TESSERA_DEVICE float to_f(uint16_t x) { return __half2float(__ushort_as_half(x)); }
    static TESSERA_DEVICE float round(float x) { return __half2float(__float2half_rn(x)); }
    static TESSERA_DEVICE uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static TESSERA_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct AttnType<__nv_bfloat16> {
    static constexpr bool BF16 = true;
    static TESSERA_DEVICE float to_f(uint16_t x) { return __uint_as_float((uint32_t)x << 16); }
    static TESSERA_DEVICE float round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
    static TESSERA_DEVICE uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static TESSERA_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// ---- shared-memory helpers -------------------------------------------------------------------

TESSERA_DEVICE uint32_t attn_smem_addr(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

TESSERA_DEVICE void attn_ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

TESSERA_DEVICE void attn_ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

TESSERA_DEVICE void attn_cp_async16(void* sdst, const void* gsrc) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(attn_smem_addr(sdst)), "l"(gsrc)
                 : "memory");
}
TESSERA_DEVICE void attn_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
TESSERA_DEVICE void attn_cp_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Copies 8 elements (16 bytes) from global to shared memory: cp.async when `vec`, else 8
// element loads (any 2-byte alignment) and one 16-byte shared store.
TESSERA_DEVICE void attn_load_chunk(uint16_t* sdst, const uint16_t* gsrc, bool vec) {
    if (vec) {
        attn_cp_async16(sdst, gsrc);
    } else {
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) w[e] = (uint32_t)gsrc[2 * e] | ((uint32_t)gsrc[2 * e + 1] << 16);
        *reinterpret_cast<uint4*>(sdst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

TESSERA_DEVICE void attn_zero_chunk(uint16_t* sdst) {
    *reinterpret_cast<uint4*>(sdst) = make_uint4(0u, 0u, 0u, 0u);
}

// Keys of sequence b that padding leaves (lengths clamped to kv_len).
TESSERA_DEVICE int attn_len_b(const AttnArgs& a, int b) {
    if (a.lengths == nullptr) return a.kv_len;
    const uint32_t l = a.lengths[b];
    return l < (uint32_t)a.kv_len ? (int)l : a.kv_len;
}

// ---- pieces shared by the tensor-core kernels ----------------------------------------------
//
// Both tensor-core kernels (mma.sync and wgmma) hold a warp's scores and outputs in the m16n8
// accumulator layout: warp w of the block owns query rows 16w .. 16w+15 of the block's 64, and
// element [n][2·hr + e] of a thread's array sits at row rbase + 8·hr (rbase = 16w + lane/4) and
// column 8n + cq + e (cq = 2·(lane % 4)). The wgmma m64nN accumulator of a warpgroup has exactly
// this layout (d[4n + 2·hr + e]), so the score, softmax and store code below serves both.

#define ATTN_BM 64
#define ATTN_BN 64

// What a block of BM query rows of one (batch entry, head) works on (both kernels' grid:
// x reversed so the longest causal blocks start first, y the head, z the batch entry).
struct AttnBlock {
    int h, b, i0;
    int len_b;    // keys of sequence b (padding lengths)
    int k_end;    // keys any row of the block sees
    int k_full;   // keys every row of the block sees
    int n_tiles;  // key tiles of BN up to k_end
    const uint16_t* qg;
    const uint16_t* kg;
    const uint16_t* vg;
    const uint8_t* maskb;  // sequence b's padding mask, or null
};

template <int BM, int BN>
TESSERA_DEVICE AttnBlock attn_block(const AttnArgs& a) {
    AttnBlock k;
    k.h = blockIdx.y;
    k.b = blockIdx.z;
    const int g = k.h / a.group;
    k.i0 = (gridDim.x - 1 - blockIdx.x) * BM;
    k.len_b = attn_len_b(a, k.b);
    const int i_last = min(k.i0 + BM, a.q_len) - 1;
    k.k_end = a.causal ? min(k.len_b, a.q_offset + i_last + 1) : k.len_b;
    k.k_full = a.causal ? min(k.len_b, a.q_offset + k.i0 + 1) : k.len_b;
    k.n_tiles = (k.k_end + BN - 1) / BN;
    k.qg = static_cast<const uint16_t*>(a.q) + (int64_t)k.b * a.q_bs + (int64_t)k.h * a.q_hs;
    k.kg = static_cast<const uint16_t*>(a.k) + (int64_t)k.b * a.k_bs + (int64_t)g * a.k_hs;
    k.vg = static_cast<const uint16_t*>(a.v) + (int64_t)k.b * a.v_bs + (int64_t)g * a.v_hs;
    k.maskb = a.mask ? a.mask + (int64_t)k.b * a.kv_len : nullptr;
    return k;
}

// sRel[x] = relative-bias term of relative position j0 + x − (BM − 1) − (q_offset + i0), for
// x < BM + BN − 1: entry c − r + BM − 1 is the bias of (row i0 + r, key j0 + c).
TESSERA_DEVICE void attn_rel_fill(float* sRel, const AttnArgs& a, int h, int i0, int j0, int tid, int nthreads) {
    for (int x = tid; x < ATTN_BM + ATTN_BN - 1; x += nthreads) {
        const int rp = attn_rel_pos((long long)j0 + x, (long long)a.q_offset + i0 + (ATTN_BM - 1));
        const int bucket = attn_rel_bucket(rp, a.bidirectional, a.num_buckets, a.rel_denom);
        sRel[x] = a.bias[(int64_t)bucket * a.n_heads + h];
    }
}

// Scores in log2 units, in place: scale·log2e·(q·k) + log2e·bias, −∞ where masked, for the
// key tile starting at j0. Per-element masking runs only where some key of the tile may be
// masked: past k_full (the keys every row of the block sees) or under a byte mask.
template <int BN>
TESSERA_DEVICE void attn_scores(float (&s)[BN / 8][4], const AttnArgs& a, const float* sRel, const uint8_t* maskb,
                                int b, int h, int i0, int j0, int rbase, int cq, int len_b, int k_full,
                                float scale_log2) {
    const bool need_mask = (j0 + BN > k_full) || maskb != nullptr;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = rbase + hr * 8;
        const int i = i0 + r;
        const int limit = a.causal ? min(len_b, a.q_offset + i + 1) : len_b;
        const float* brow = nullptr;
        if (a.bias_kind == 1 && i < a.q_len) brow = a.bias + (int64_t)b * a.bias_bs + (int64_t)h * a.bias_hs + (int64_t)i * a.bias_qs;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int c = n * 8 + cq + e;
                const int j = j0 + c;
                float bias = 0.f;
                if (a.bias_kind == 1) {
                    if (brow != nullptr && j < a.kv_len) bias = brow[j];
                } else if (a.bias_kind == 2) {
                    bias = sRel[c - r + ATTN_BM - 1];
                }
                float x = fmaf(s[n][hr * 2 + e], scale_log2, bias * ATTN_LOG2E);
                if (need_mask && !(j < limit && (maskb == nullptr || maskb[j] != 0))) x = -INFINITY;
                s[n][hr * 2 + e] = x;
            }
        }
    }
}

// Online softmax over one key tile: running max per row (the 4 threads of a quad share a row),
// P = exp2(s − max) rounded to the input type in place of the scores, the running (per-thread
// partial) sums and the output accumulators rescaled.
template <typename T, int BN, int D>
TESSERA_DEVICE void attn_softmax(float (&s)[BN / 8][4], float (&acc_o)[D / 8][4], float (&m_r)[2], float (&l_r)[2]) {
    typedef AttnType<T> Ty;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float mx = m_r[hr];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][hr * 2], s[n][hr * 2 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m_r[hr] - m_use);
        m_r[hr] = mx;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = Ty::round(exp2f(s[n][hr * 2 + e] - m_use));
                s[n][hr * 2 + e] = p;
                sum += p;
            }
        }
        l_r[hr] = l_r[hr] * alpha + sum;  // per-thread partial sum, reduced at the end
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc_o[n][hr * 2] *= alpha;
            acc_o[n][hr * 2 + 1] *= alpha;
        }
    }
}

// The A fragment of the 16-key step kk of P·V from the probabilities (the accumulator layout
// of two adjacent 8-key blocks is the A layout of one m16n8k16 / m64nNk16 k-step).
template <typename T, int BN>
TESSERA_DEVICE void attn_p_frag(uint32_t (&pf)[4], const float (&s)[BN / 8][4], int kk) {
    typedef AttnType<T> Ty;
    pf[0] = Ty::pack(s[2 * kk][0], s[2 * kk][1]);
    pf[1] = Ty::pack(s[2 * kk][2], s[2 * kk][3]);
    pf[2] = Ty::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pf[3] = Ty::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Normalizes and stores this thread's output elements of the rows inside q_len.
template <int D>
TESSERA_DEVICE void attn_store(const AttnArgs& a, const float (&acc_o)[D / 8][4], const float (&l_r)[2], int b, int h,
                               int i0, int rbase, int cq) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float l = l_r[hr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int i = i0 + rbase + hr * 8;
        if (i < a.q_len) {
            float* orow = a.o + (int64_t)b * a.o_bs + (int64_t)i * a.o_ss + (int64_t)h * a.o_hs;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const float x0 = acc_o[n][hr * 2] * inv, x1 = acc_o[n][hr * 2 + 1] * inv;
                float* p = orow + n * 8 + cq;
                if (a.o_vec) {
                    *reinterpret_cast<float2*>(p) = make_float2(x0, x1);
                } else {
                    p[0] = x0;
                    p[1] = x1;
                }
            }
        }
    }
}

// Copies rows j0 .. j0 + ROWS − 1 (CH chunks of 8 elements each, row stride ss) of `src` into
// the tile `s`, chunk c of tile row r at element off(r, c); rows at or past j_end, or masked out
// by the byte mask, are zero (so that P·V never multiplies a zero weight by a value it must not
// see, and Q rows past q_len are defined).
template <int ROWS, int CH, int NT, typename Off>
TESSERA_DEVICE void attn_load_tile(uint16_t* s, const uint16_t* src, int64_t ss, int j0, int j_end,
                                   const uint8_t* maskb, bool vec, int tid, Off off) {
    for (int idx = tid; idx < ROWS * CH; idx += NT) {
        const int r = idx / CH, c = idx % CH;
        uint16_t* dst = s + off(r, c);
        const int j = j0 + r;
        if (j < j_end && (maskb == nullptr || maskb[j] != 0)) attn_load_chunk(dst, src + (int64_t)j * ss + c * 8, vec);
        else attn_zero_chunk(dst);
    }
}

// ---- the tensor-core kernel ------------------------------------------------------------------

template <typename T, int D>
__device__ __forceinline__ void attn_fwd_mma(const AttnArgs& a) {
    static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
    constexpr int BM = ATTN_BM, BN = ATTN_BN, LD = D + 8, CH = D / 8;
    typedef AttnType<T> Ty;
    extern __shared__ __align__(16) unsigned char attn_smem[];
    uint16_t* sQ = reinterpret_cast<uint16_t*>(attn_smem);
    uint16_t* sK = sQ + BM * LD;
    uint16_t* sV = sK + BN * LD;
    float* sRel = reinterpret_cast<float*>(sV + BN * LD);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const bool vec = a.vec != 0;
    const AttnBlock blk = attn_block<BM, BN>(a);
    const int h = blk.h, b = blk.b, i0 = blk.i0;
    const int len_b = blk.len_b, k_end = blk.k_end, k_full = blk.k_full, n_tiles = blk.n_tiles;
    const uint16_t *qg = blk.qg, *kg = blk.kg, *vg = blk.vg;
    const uint8_t* maskb = blk.maskb;

    // Q tile (rows past q_len are zero); K or V tile `t` into `s` (rows past k_end, or masked
    // out by the padding mask, are zero).
    auto pad_off = [](int r, int c) { return r * LD + c * 8; };
    attn_load_tile<BM, CH, 128>(sQ, qg, a.q_ss, i0, a.q_len, nullptr, vec, tid, pad_off);
    auto load_kv = [&](uint16_t* s, const uint16_t* src, int64_t ss, int t) {
        attn_load_tile<BN, CH, 128>(s, src, ss, t * BN, k_end, maskb, vec, tid, pad_off);
    };
    if (n_tiles > 0) load_kv(sK, kg, a.k_ss, 0);
    attn_cp_commit();

    float acc_o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[n][e] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY};
    float l_r[2] = {0.f, 0.f};

    const float scale_log2 = a.scale * ATTN_LOG2E;
    const int rbase = warp * 16 + (lane >> 2);  // this thread's rows: rbase, rbase + 8
    const int cq = (lane & 3) * 2;              // and columns cq, cq + 1 of each 8-wide tile
    // ldmatrix row addresses (see the fragment layouts of mma.m16n8k16).
    const uint32_t q_addr = attn_smem_addr(sQ + (warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);
    const uint32_t k_addr = attn_smem_addr(sK + ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
    const uint32_t v_addr = attn_smem_addr(sV + (((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);

    for (int t = 0; t < n_tiles; ++t) {
        const int j0 = t * BN;
        attn_cp_wait_all();
        __syncthreads();  // K tile t (and Q) landed; every warp is done with V tile t − 1
        load_kv(sV, vg, a.v_ss, t);
        attn_cp_commit();
        if (a.bias_kind == 2) attn_rel_fill(sRel, a, h, i0, j0, tid, 128);

        // S = Q·Kᵀ for this warp's 16 rows and the tile's 64 keys.
        float acc_s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t af[4];
            attn_ldsm_x4(q_addr + kk * 32, af[0], af[1], af[2], af[3]);
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t b0, b1, b2, b3;
                attn_ldsm_x4(k_addr + (np * 16 * LD + kk * 16) * 2, b0, b1, b2, b3);
                Ty::mma(acc_s[2 * np], af, b0, b1);
                Ty::mma(acc_s[2 * np + 1], af, b2, b3);
            }
        }
        attn_cp_wait_all();
        __syncthreads();  // V tile t landed; every warp is done with K tile t; sRel written
        if (t + 1 < n_tiles) load_kv(sK, kg, a.k_ss, t + 1);
        attn_cp_commit();

        attn_scores<BN>(acc_s, a, sRel, maskb, b, h, i0, j0, rbase, cq, len_b, k_full, scale_log2);
        attn_softmax<T, BN, D>(acc_s, acc_o, m_r, l_r);

        // O += P·V: P from the score registers (the accumulator layout of two 8-key tiles is
        // the A layout of one 16-key step), V fragments by ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t pf[4];
            attn_p_frag<T, BN>(pf, acc_s, kk);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b0, b1, b2, b3;
                attn_ldsm_x4_t(v_addr + (kk * 16 * LD + dp * 16) * 2, b0, b1, b2, b3);
                Ty::mma(acc_o[2 * dp], pf, b0, b1);
                Ty::mma(acc_o[2 * dp + 1], pf, b2, b3);
            }
        }
    }
    attn_cp_wait_all();

    attn_store<D>(a, acc_o, l_r, b, h, i0, rbase, cq);
}

#define ATTN_MMA(NAME, T, D) \
    extern "C" __global__ void __launch_bounds__(128) NAME(const AttnArgs a) { attn_fwd_mma<T, D>(a); }

ATTN_MMA(attn_fwd_f16_d32, __half, 32)
ATTN_MMA(attn_fwd_f16_d64, __half, 64)
ATTN_MMA(attn_fwd_f16_d80, __half, 80)
ATTN_MMA(attn_fwd_f16_d96, __half, 96)
ATTN_MMA(attn_fwd_f16_d128, __half, 128)
ATTN_MMA(attn_fwd_bf16_d32, __nv_bfloat16, 32)
ATTN_MMA(attn_fwd_bf16_d64, __nv_bfloat16, 64)
ATTN_MMA(attn_fwd_bf16_d80, __nv_bfloat16, 80)
ATTN_MMA(attn_fwd_bf16_d96, __nv_bfloat16, 96)
ATTN_MMA(attn_fwd_bf16_d128, __nv_bfloat16, 128)

// ---- the Hopper (sm_90a) wgmma kernel --------------------------------------------------------
//
// attn_fwd_wgmma_{f16,bf16}_d{64,128}: FlashAttention-3 style, kept simple. Opt-in
// (AttnPath::Wgmma) until verified on an H100; on other architectures the symbols exist but
// trap (the launcher never selects them there).
//   grid  (ceil(q_len / 64), n_heads, batch), x reversed as in the mma.sync kernel
//   block 128 threads = one warpgroup; warp w owns query rows 16w .. 16w+15 of the block's 64
//         (the m64 accumulator layout of wgmma: the same per-warp layout as mma.sync's m16n8)
//   dynamic smem: 5·64·D·2 (Q; K and V double-buffered) + 2·128·4
//         (relative bias, double-buffered) + 1024 (alignment) bytes = 83 968 for D = 128,
//         43 008 for D = 64.
//   Every 64 x D tile (Q, K, V) is stored as D/64 panels of 64 rows x 64 elements, 128-byte
//   swizzled as the wgmma descriptors' mode 1 expects: 16-byte chunk c of row r of a panel at
//   byte r·128 + ((c ^ (r % 8))·16), panels 8192 bytes apart and 1024-byte aligned. Copies are
//   16-byte cp.async (element loads when `vec` is 0) with zero rows past the keys the block
//   sees, masked keys and query rows past q_len.
//   Key tile t + 1 (K, V and the relative-bias row) is copied while tile t computes:
//     S = Q·Kᵀ   D/16 × wgmma m64n64k16, A = Q and B = K (K-major) from smem descriptors;
//     scores, masks and the online softmax in registers (attn_scores / attn_softmax, shared
//     with the mma.sync kernel), P rounded to the input type;
//     O += P·V   4 × wgmma m64nDk16, A = P from registers (two adjacent n8 accumulator blocks
//     are one k16 A fragment), B = V as an MN-major operand (transpose flag 1).
//   Both products wait for their wgmma group before the registers are used (no intra-warpgroup
//   overlap of softmax and the next S yet).

TESSERA_DEVICE uint32_t attn_wgmma_smem_off(int r, int c) {
    // element offset of chunk c (8 elements) of tile row r in the 128-byte-swizzled panels
    return (c >> 3) * (64 * 64) + r * 64 + (((c & 7) ^ (r & 7)) << 3);
}

#if defined(TESSERA_SM90A)

TESSERA_DEVICE void attn_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
TESSERA_DEVICE void attn_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
TESSERA_DEVICE void attn_wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Makes this thread's generic-proxy shared-memory writes (cp.async, stores) visible to the
// async proxy that wgmma reads shared memory through.
TESSERA_DEVICE void attn_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Pins accumulator registers at this point of the instruction stream (wgmma writes them
// asynchronously: no access may move across wgmma.fence / wgmma.wait_group).
template <int N>
TESSERA_DEVICE void attn_fence_regs(float (&d)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[n][e])::"memory");
}
template <int N>
TESSERA_DEVICE void attn_fence_regs(uint32_t (&d)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(d[n][e])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (mode 1, bits 62-63), base offset 0 (the
// swizzle atoms are 1024-byte aligned); addresses and byte offsets encoded >> 4 (gemm.cu's
// tg_desc). K-major (Q, K): 128-byte rows of 64 elements, 8-row groups 1024 bytes apart
// (stride byte offset), leading byte offset unused (16). MN-major (V): 128-byte rows of 64 n
// per k, 8-k groups 1024 bytes apart (stride), 64-column panels of n 8192 bytes apart
// (leading byte offset).
TESSERA_DEVICE unsigned long long attn_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return static_cast<unsigned long long>((addr & 0x3FFFF) >> 4) |
           (static_cast<unsigned long long>((lbo & 0x3FFFF) >> 4) << 16) |
           (static_cast<unsigned long long>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// d (64 x 64 f32, the warpgroup's S tile) += Q (64 x 16, K-major smem descriptor) · Kᵀ (K as
// 64 keys x 16, K-major smem descriptor).
template <bool BF16>
TESSERA_DEVICE void attn_wgmma_qk(float (&d)[8][4], unsigned long long desc_q, unsigned long long desc_k) {
    if constexpr (BF16) {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "setp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n"
            "}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
            : "l"(desc_q), "l"(desc_k), "r"(1));
    } else {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "setp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n"
            "}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
            : "l"(desc_q), "l"(desc_k), "r"(1));
    }
}

// d (64 x N f32, the warpgroup's output rows) += P (64 x 16 from registers: the m64k16 A
// fragment, per warp that of mma.m16n8k16) · V (16 keys x N, MN-major smem descriptor:
// transpose flag 1).
template <bool BF16, int N>
TESSERA_DEVICE void attn_wgmma_pv(float (&d)[N / 8][4], const uint32_t (&pf)[4], unsigned long long desc_v) {
    static_assert(N == 64 || N == 128, "wgmma P·V: N is 64 or 128");
    if constexpr (N == 64) {
        if constexpr (BF16) {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "setp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n"
            "}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
            : "r"(pf[0]), "r"(pf[1]), "r"(pf[2]), "r"(pf[3]), "l"(desc_v), "r"(1));
        } else {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "setp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n"
            "}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
            : "r"(pf[0]), "r"(pf[1]), "r"(pf[2]), "r"(pf[3]), "l"(desc_v), "r"(1));
        }
    } else {
        if constexpr (BF16) {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "setp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
            "}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
            : "r"(pf[0]), "r"(pf[1]), "r"(pf[2]), "r"(pf[3]), "l"(desc_v), "r"(1));
        } else {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "setp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
            "}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
            : "r"(pf[0]), "r"(pf[1]), "r"(pf[2]), "r"(pf[3]), "l"(desc_v), "r"(1));
        }
    }
}

template <typename T, int D>
__device__ __forceinline__ void attn_fwd_wgmma(const AttnArgs& a) {
    static_assert(D == 64 || D == 128, "the wgmma kernel takes head_dim 64 or 128");
    constexpr int BM = ATTN_BM, BN = ATTN_BN, CH = D / 8;
    constexpr int PANEL_BYTES = 64 * 128;       // 64 rows x 64 elements x 2 bytes
    constexpr int TILE = BM * D;                // elements of one Q, K or V tile
    typedef AttnType<T> Ty;
    extern __shared__ __align__(16) unsigned char attn_smem[];
    const uint32_t raw = attn_smem_addr(attn_smem);
    const uint32_t aligned = (raw + 1023u) & ~1023u;
    uint16_t* sQ = reinterpret_cast<uint16_t*>(attn_smem + (aligned - raw));
    // sQ | sK[0] | sK[1] | sV[0] | sV[1] | sRel[0] | sRel[1]
    float* sRel = reinterpret_cast<float*>(sQ + 5 * TILE);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const bool vec = a.vec != 0;
    const AttnBlock blk = attn_block<BM, BN>(a);
    const int h = blk.h, b = blk.b, i0 = blk.i0;
    const int len_b = blk.len_b, k_end = blk.k_end, k_full = blk.k_full, n_tiles = blk.n_tiles;
    const uint16_t *qg = blk.qg, *kg = blk.kg, *vg = blk.vg;
    const uint8_t* maskb = blk.maskb;

    auto swz = [](int r, int c) { return attn_wgmma_smem_off(r, c); };
    // Key tile t (K, V, relative-bias row) into buffer `buf`.
    auto load_tile = [&](int t, int buf) {
        uint16_t* sK = sQ + (1 + buf) * TILE;
        uint16_t* sV = sQ + (3 + buf) * TILE;
        attn_load_tile<BN, CH, 128>(sK, kg, a.k_ss, t * BN, k_end, maskb, vec, tid, swz);
        attn_load_tile<BN, CH, 128>(sV, vg, a.v_ss, t * BN, k_end, maskb, vec, tid, swz);
        if (a.bias_kind == 2) attn_rel_fill(sRel + buf * 128, a, h, i0, t * BN, tid, 128);
    };
    attn_load_tile<BM, CH, 128>(sQ, qg, a.q_ss, i0, a.q_len, nullptr, vec, tid, swz);
    if (n_tiles > 0) load_tile(0, 0);
    attn_cp_commit();

    float acc_o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[n][e] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY};
    float l_r[2] = {0.f, 0.f};

    const float scale_log2 = a.scale * ATTN_LOG2E;
    const int rbase = warp * 16 + (lane >> 2);  // this thread's rows: rbase, rbase + 8
    const int cq = (lane & 3) * 2;              // and columns cq, cq + 1 of each 8-wide block
    const uint32_t q_s = attn_smem_addr(sQ);

    for (int t = 0; t < n_tiles; ++t) {
        const int j0 = t * BN;
        const int buf = t & 1;
        attn_cp_wait_all();
        attn_fence_proxy_async();
        __syncthreads();  // tile t (and Q) landed and visible to wgmma; tile t − 1 is done
        if (t + 1 < n_tiles) load_tile(t + 1, buf ^ 1);
        attn_cp_commit();
        const uint32_t k_s = q_s + (1 + buf) * TILE * 2;
        const uint32_t v_s = q_s + (3 + buf) * TILE * 2;

        // S = Q·Kᵀ: k-step kk is 32 bytes into panel kk / 4 of both operands.
        float acc_s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[n][e] = 0.f;
        attn_fence_regs<BN / 8>(acc_s);
        attn_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t off = (kk >> 2) * PANEL_BYTES + (kk & 3) * 32;
            attn_wgmma_qk<Ty::BF16>(acc_s, attn_desc(q_s + off, 16, 1024), attn_desc(k_s + off, 16, 1024));
        }
        attn_wgmma_commit();
        attn_wgmma_wait0();
        attn_fence_regs<BN / 8>(acc_s);

        attn_scores<BN>(acc_s, a, sRel + buf * 128, maskb, b, h, i0, j0, rbase, cq, len_b, k_full, scale_log2);
        attn_softmax<T, BN, D>(acc_s, acc_o, m_r, l_r);

        // O += P·V: k-step kk is keys 16kk .. 16kk+15, i.e. 16 rows of 128 bytes into V.
        uint32_t pf[BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) attn_p_frag<T, BN>(pf[kk], acc_s, kk);
        attn_fence_regs<BN / 16>(pf);
        attn_fence_regs<D / 8>(acc_o);
        attn_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            attn_wgmma_pv<Ty::BF16, D>(acc_o, pf[kk], attn_desc(v_s + kk * 16 * 128, PANEL_BYTES, 1024));
        }
        attn_wgmma_commit();
        attn_wgmma_wait0();
        attn_fence_regs<D / 8>(acc_o);
    }
    attn_cp_wait_all();

    attn_store<D>(a, acc_o, l_r, b, h, i0, rbase, cq);
}

#define ATTN_WGMMA_BODY(T, D) attn_fwd_wgmma<T, D>(a);
#else
// Not sm_90a: the symbol exists so that every architecture's module has the same kernels, but
// the launcher never selects it there.
#define ATTN_WGMMA_BODY(T, D) __trap();
#endif  // TESSERA_SM90A

#define ATTN_WGMMA(NAME, T, D) \
    extern "C" __global__ void __launch_bounds__(128) NAME(const AttnArgs a) { ATTN_WGMMA_BODY(T, D) }

ATTN_WGMMA(attn_fwd_wgmma_f16_d64, __half, 64)
ATTN_WGMMA(attn_fwd_wgmma_f16_d128, __half, 128)
ATTN_WGMMA(attn_fwd_wgmma_bf16_d64, __nv_bfloat16, 64)
ATTN_WGMMA(attn_fwd_wgmma_bf16_d128, __nv_bfloat16, 128)

// ---- the generic SIMT kernel -----------------------------------------------------------------

template <typename T, int E>
__device__ __forceinline__ void attn_fwd_simt(const AttnArgs& a) {
    typedef AttnType<T> Ty;
    __shared__ float sq[4][32 * E];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * 4 + warp;
    const int h = blockIdx.y, b = blockIdx.z;
    if (i >= a.q_len) return;  // only warp-level synchronization below
    const int g = h / a.group;
    const int d = a.head_dim;
    const uint16_t* qr = static_cast<const uint16_t*>(a.q) + (int64_t)b * a.q_bs + (int64_t)i * a.q_ss + (int64_t)h * a.q_hs;
    for (int c = lane; c < 32 * E; c += 32) sq[warp][c] = c < d ? Ty::to_f(qr[c]) : 0.f;
    __syncwarp();

    const int len_b = attn_len_b(a, b);
    const int limit = a.causal ? min(len_b, a.q_offset + i + 1) : len_b;
    const uint16_t* kg = static_cast<const uint16_t*>(a.k) + (int64_t)b * a.k_bs + (int64_t)g * a.k_hs;
    const uint16_t* vg = static_cast<const uint16_t*>(a.v) + (int64_t)b * a.v_bs + (int64_t)g * a.v_hs;
    const uint8_t* maskb = a.mask ? a.mask + (int64_t)b * a.kv_len : nullptr;
    const float* brow = a.bias_kind == 1 ? a.bias + (int64_t)b * a.bias_bs + (int64_t)h * a.bias_hs + (int64_t)i * a.bias_qs : nullptr;
    const float scale_log2 = a.scale * ATTN_LOG2E;

    float acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (int j0 = 0; j0 < limit; j0 += 32) {
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j < limit && (maskb == nullptr || maskb[j] != 0)) {
            const uint16_t* kr = kg + (int64_t)j * a.k_ss;
            float dot = 0.f;
#pragma unroll 4
            for (int c = 0; c < d; ++c) dot = fmaf(sq[warp][c], Ty::to_f(kr[c]), dot);
            float bias = 0.f;
            if (a.bias_kind == 1) {
                bias = brow[j];
            } else if (a.bias_kind == 2) {
                const int bucket = attn_rel_bucket(attn_rel_pos(j, (long long)a.q_offset + i), a.bidirectional, a.num_buckets, a.rel_denom);
                bias = a.bias[(int64_t)bucket * a.n_heads + h];
            }
            s = fmaf(dot, scale_log2, bias * ATTN_LOG2E);
        }
        const float mx = fmaxf(m, tessera_warp_max(s));
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m - m_use);
        const float p = exp2f(s - m_use);
        l = l * alpha + tessera_warp_sum(p);
        m = mx;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] *= alpha;
        const int n = min(32, limit - j0);
        for (int jj = 0; jj < n; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            if (pj == 0.f) continue;  // warp-uniform; a masked key's V is never read
            const uint16_t* vr = vg + (int64_t)(j0 + jj) * a.v_ss;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const int c = lane + 32 * e;
                if (c < d) acc[e] = fmaf(pj, Ty::to_f(vr[c]), acc[e]);
            }
        }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* orow = a.o + (int64_t)b * a.o_bs + (int64_t)i * a.o_ss + (int64_t)h * a.o_hs;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int c = lane + 32 * e;
        if (c < d) orow[c] = acc[e] * inv;
    }
}

#define ATTN_SIMT(NAME, T, E) \
    extern "C" __global__ void __launch_bounds__(128) NAME(const AttnArgs a) { attn_fwd_simt<T, E>(a); }

ATTN_SIMT(attn_fwd_simt_f16_e8, __half, 8)
ATTN_SIMT(attn_fwd_simt_f16_e32, __half, 32)
ATTN_SIMT(attn_fwd_simt_bf16_e8, __nv_bfloat16, 8)
ATTN_SIMT(attn_fwd_simt_bf16_e32, __nv_bfloat16, 32)
