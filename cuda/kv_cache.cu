// kv_cache.cu: paged KV-cache storage on the device, append, and decode attention over the
// pages (flash-decoding: long sequences are split in partitions whose partial results a second
// kernel combines).
//
// Storage (kernels/cuda/src/kv_cache.rs allocates it and owns the block tables):
//   a pool of `pages` pages of T = page_tokens token rows. Row
//       row(page, half, head, tok) = ((page·2 + half)·n_kv_heads + head)·T + tok
//   (half 0 = K, 1 = V: per page, all K rows head-major, then all V rows, as the CPU cache),
//   at element offset row·row_stride of the data pool:
//     f32: row_stride = round_up(head_dim, 8) floats, f16: round_up(head_dim, 8) halves,
//     Q8_0: row_stride = 32·nb int8 quants, nb = ceil(head_dim / 32), with the nb f16 scales
//           of the row at row·nb of the separate scale pool (GGML's block_q8_0 split in its two
//           fields, so that every row of quants is 32-byte aligned).
//   Every row starts 16-byte aligned; elements past head_dim are stored as 0 (the pool is
//   allocated zeroed and append writes whole rows), so decode reads whole 8-element pieces.
//   Q8_0 quantization is tessera_core's BlockQ8_0::quantize_block bit for bit: amax over the
//   32 values (NaN ignored), d = amax / 127, id = d ? 1/d : 0, q = roundf(x·id) saturated to
//   int8 (NaN -> 0), scale stored as f16(d); the last block of a row zero-padded.
//
// kv_append_{f32,f16,q8}(KvAppendArgs):
//   grid (ceil(rows·n_kv_heads·2 / 4)), block 128 = 4 warps, no smem. Warp w stores one row:
//   half = w & 1, head = (w >> 1) % n_kv_heads, r = (w >> 1) / n_kv_heads (the r-th of the
//   batch·n_tokens new tokens: sequence r / n_tokens, token r % n_tokens) into pool row
//   (dst[r] / T, K or V, head, dst[r] % T); the source row is k or v at
//   b·bs + t·ss + head·hs (f32).
// kv_scatter_u32(pairs, n, dst): dst[pairs[2i]] = pairs[2i + 1] for i < n (block-table and
//   length updates of the device mirror). grid-stride, any geometry.
// kv_decode_{f32,f16,q8}_h{1,2,4,8}(KvDecodeArgs):
//   grid (parts_max, n_kv_heads·hsplit, batch), block 128 = 4 warps,
//   dynamic smem kv_decode_smem = 4·(5·HB·DP + HB·512 + 2·HB) bytes, DP = row_stride (<= 1024/HB).
//   Block (p, g·hsplit + s, b) takes query heads g·group + s·HB .. + min(HB, group − s·HB) of
//   batch entry b (sequence slots[b], len = lens[slot]) over keys [512p, min(len, 512(p+1))):
//   scores of every key with all of its heads (LPK lanes per key, 32/LPK keys per warp step,
//   16-byte loads of 8-element pieces through the block table), the partition's softmax in
//   smem, and the weighted sum of the V rows (the same lane split; warp partial sums reduced
//   in a fixed order). One partition (len <= 512): the normalized output is written; more:
//   a partial record [m, l, o[head_dim]] at partials[((b·n_heads + h)·parts_max + p)·(d + 2)].
//   len = 0: block p = 0 writes zeros. Blocks with p >= ceil(len / 512) exit at once.
// kv_combine(KvCombineArgs):
//   grid (n_heads, batch), block 128: for sequences of more than one partition, the output
//   o = Σ_p o_p·e^(m_p − M) / Σ_p l_p·e^(m_p − M), M = max m_p (partitions in order).
//
// Preconditions (checked by the launcher): pages·T·2·n_kv_heads·row_stride fits the pool;
// every table entry the lengths reach is a page index < pages; slots are distinct live
// sequences; q / out / partials cover their (b, h) rows; head_dim <= row_stride; the relative
// table holds num_buckets·n_heads floats.
#include "common.cuh"

#define KV_PART 512
#define KV_LOG2E 1.4426950408889634f

struct KvAppendArgs {
    const float* k;
    const float* v;
    void* data;
    __half* scales;
    const uint32_t* dst;  // [rows] pool token index page·T + tok
    int64_t k_bs, k_ss, k_hs;
    int64_t v_bs, v_ss, v_hs;
    int64_t row_stride;
    int64_t warps;        // rows · n_kv_heads · 2
    int32_t n_tokens, nkv, head_dim, page_tokens, nb;
    int32_t pad_;
};

struct KvDecodeArgs {
    const void* data;
    const __half* scales;
    const uint32_t* tables;   // [slot_cap · table_cap]
    const uint32_t* lens;     // [slot_cap]
    const uint32_t* slots;    // [batch]
    const float* q;           // [batch, 1, n_heads, head_dim] f32
    float* out;               // [batch, 1, n_heads, head_dim] f32
    float* partials;          // [batch, n_heads, parts_max, head_dim + 2] or null
    const float* rel_table;   // [num_buckets, n_heads] or null
    int64_t q_bs, q_hs, o_bs, o_hs;
    int64_t row_stride;
    int32_t nb, page_tokens, nkv, n_heads, group, head_dim;
    int32_t hsplit, table_cap, parts_max, lpk, pieces;
    int32_t num_buckets, bidirectional;
    float scale, rel_denom;
    int32_t pad_;
};

struct KvCombineArgs {
    const float* partials;
    const uint32_t* lens;
    const uint32_t* slots;
    float* out;
    int64_t o_bs, o_hs;
    int32_t n_heads, head_dim, parts_max;
    int32_t pad_;
};

static_assert(sizeof(KvAppendArgs) == 128, "KvAppendArgs must match kernels/cuda/src/kv_cache.rs");
static_assert(sizeof(KvDecodeArgs) == 176, "KvDecodeArgs must match kernels/cuda/src/kv_cache.rs");
static_assert(sizeof(KvCombineArgs) == 64, "KvCombineArgs must match kernels/cuda/src/kv_cache.rs");

// ---- T5 relative-position bucket: identical to attention.cu's (see there) ---------------------

TESSERA_DEVICE int kv_rel_bucket(int rp, int bidirectional, int num_buckets, float denom) {
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
    const unsigned long long li = (unsigned long long)large;
    const unsigned long long cap = (unsigned long long)(buckets - 1);
    return base + (int)(li < cap ? li : cap);
}

// ---- append ----------------------------------------------------------------------------------

template <int DT>  // 0 f32, 1 f16, 2 Q8_0
__device__ __forceinline__ void kv_append(const KvAppendArgs& a) {
    const int lane = threadIdx.x & 31;
    const int64_t w = (int64_t)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (w >= a.warps) return;
    const int half = (int)(w & 1);
    const int64_t t2 = w >> 1;
    const int head = (int)(t2 % a.nkv);
    const int64_t r = t2 / a.nkv;
    const int64_t b = r / a.n_tokens, tt = r % a.n_tokens;
    const float* src = half ? a.v + b * a.v_bs + tt * a.v_ss + head * a.v_hs
                            : a.k + b * a.k_bs + tt * a.k_ss + head * a.k_hs;
    const uint32_t slot = a.dst[r];
    const int64_t page = slot / (uint32_t)a.page_tokens, tok = slot % (uint32_t)a.page_tokens;
    const int64_t row = ((page * 2 + half) * a.nkv + head) * a.page_tokens + tok;
    const int d = a.head_dim;
    if (DT == 0) {
        float* dst = static_cast<float*>(a.data) + row * a.row_stride;
        for (int c = lane; c < a.row_stride; c += 32) dst[c] = c < d ? src[c] : 0.f;
    } else if (DT == 1) {
        __half* dst = static_cast<__half*>(a.data) + row * a.row_stride;
        for (int c = lane; c < a.row_stride; c += 32) dst[c] = __float2half_rn(c < d ? src[c] : 0.f);
    } else {
        int8_t* dst = static_cast<int8_t*>(a.data) + row * a.row_stride;
        for (int blk = 0; blk < a.nb; ++blk) {
            const int c = blk * 32 + lane;
            const float x = c < d ? src[c] : 0.f;
            const float ax = fabsf(x);
            const float amax = tessera_warp_max(ax != ax ? 0.f : ax);  // NaN never wins
            const float dq = amax / 127.f;
            const float id = dq != 0.f ? 1.f / dq : 0.f;
            const float qf = roundf(x * id);
            const int qi = qf != qf ? 0 : (int)fminf(fmaxf(qf, -128.f), 127.f);
            dst[c] = (int8_t)qi;
            if (lane == 0) a.scales[row * a.nb + blk] = __float2half_rn(dq);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) kv_append_f32(const KvAppendArgs a) { kv_append<0>(a); }
extern "C" __global__ void __launch_bounds__(128) kv_append_f16(const KvAppendArgs a) { kv_append<1>(a); }
extern "C" __global__ void __launch_bounds__(128) kv_append_q8(const KvAppendArgs a) { kv_append<2>(a); }

extern "C" __global__ void kv_scatter_u32(const uint32_t* __restrict__ pairs, int n, uint32_t* __restrict__ dst) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        dst[pairs[2 * i]] = pairs[2 * i + 1];
    }
}

// ---- decode ----------------------------------------------------------------------------------

// Elements 8·pc .. 8·pc + 7 of pool row `row`, as f32 (16-byte loads; Q8_0: 8 quants and
// their block's scale).
template <int DT>
TESSERA_DEVICE void kv_load_piece(float (&x)[8], const KvDecodeArgs& a, int64_t row, int pc) {
    if (DT == 0) {
        const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(a.data) + row * a.row_stride + pc * 8);
        const float4 u = p[0], w = p[1];
        x[0] = u.x; x[1] = u.y; x[2] = u.z; x[3] = u.w;
        x[4] = w.x; x[5] = w.y; x[6] = w.z; x[7] = w.w;
    } else if (DT == 1) {
        const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const __half*>(a.data) + row * a.row_stride + pc * 8);
        const uint32_t wd[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&wd[e]));
            x[2 * e] = f.x;
            x[2 * e + 1] = f.y;
        }
    } else {
        const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const int8_t*>(a.data) + row * a.row_stride + pc * 8);
        const float dq = __half2float(a.scales[row * a.nb + (pc >> 2)]);
        const uint32_t wd[2] = {u.x, u.y};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int8_t qv = (int8_t)((wd[e >> 2] >> ((e & 3) * 8)) & 0xffu);
            x[e] = (float)qv * dq;
        }
    }
}

template <int DT, int HB>
__device__ __forceinline__ void kv_decode(const KvDecodeArgs& a) {
    extern __shared__ __align__(16) float kv_smem[];
    const int DP = (int)a.row_stride;   // floats per query row in smem (= 8·pieces)
    float* sq = kv_smem;                // [HB][DP]
    float* sred = sq + HB * DP;         // [4][HB][DP]
    float* ss = sred + 4 * HB * DP;     // [HB][KV_PART]
    float* sm = ss + HB * KV_PART;      // [HB]
    float* sl = sm + HB;                // [HB]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int part = blockIdx.x;
    const int g = blockIdx.y / a.hsplit, hs = blockIdx.y % a.hsplit;
    const int bb = blockIdx.z;
    const int h0 = g * a.group + hs * HB;
    const int nh = min(HB, a.group - hs * HB);
    const uint32_t slot = a.slots[bb];
    const int len = (int)a.lens[slot];
    const int d = a.head_dim;
    const int parts = (len + KV_PART - 1) / KV_PART;

    if (len == 0) {
        if (part == 0) {
            for (int idx = tid; idx < nh * d; idx += 128) {
                const int hh = idx / d, c = idx % d;
                a.out[(int64_t)bb * a.o_bs + (int64_t)(h0 + hh) * a.o_hs + c] = 0.f;
            }
        }
        return;
    }
    if (part >= parts) return;
    const int k0 = part * KV_PART;
    const int k1 = min(len, k0 + KV_PART);
    const int T = a.page_tokens;
    const uint32_t* table = a.tables + (int64_t)slot * a.table_cap;

    for (int idx = tid; idx < HB * DP; idx += 128) {
        const int hh = idx / DP, c = idx % DP;
        sq[idx] = (hh < nh && c < d) ? a.q[(int64_t)bb * a.q_bs + (int64_t)(h0 + hh) * a.q_hs + c] : 0.f;
    }
    __syncthreads();

    const int lpk = a.lpk;             // lanes per key (power of two <= 32)
    const int kpw = 32 / lpk;          // keys per warp step
    const int ks = lane / lpk, lp = lane % lpk;
    const int P = a.pieces;

    // Phase 1: scores.
    for (int base = k0 + warp * kpw; base < k1; base += 4 * kpw) {
        const int j = base + ks;
        float dot[HB];
#pragma unroll
        for (int hh = 0; hh < HB; ++hh) dot[hh] = 0.f;
        if (j < k1) {
            const int64_t page = table[j / T];
            const int64_t row = ((page * 2) * a.nkv + g) * T + j % T;
#pragma unroll 1
            for (int pc = lp; pc < P; pc += lpk) {
                float x[8];
                kv_load_piece<DT>(x, a, row, pc);
#pragma unroll
                for (int hh = 0; hh < HB; ++hh) {
                    const float4 q0 = *reinterpret_cast<const float4*>(sq + hh * DP + pc * 8);
                    const float4 q1 = *reinterpret_cast<const float4*>(sq + hh * DP + pc * 8 + 4);
                    float s = dot[hh];
                    s = fmaf(x[0], q0.x, s); s = fmaf(x[1], q0.y, s);
                    s = fmaf(x[2], q0.z, s); s = fmaf(x[3], q0.w, s);
                    s = fmaf(x[4], q1.x, s); s = fmaf(x[5], q1.y, s);
                    s = fmaf(x[6], q1.z, s); s = fmaf(x[7], q1.w, s);
                    dot[hh] = s;
                }
            }
        }
        for (int off = lpk >> 1; off > 0; off >>= 1) {
#pragma unroll
            for (int hh = 0; hh < HB; ++hh) dot[hh] += __shfl_xor_sync(0xffffffffu, dot[hh], off);
        }
        if (j < k1 && lp == 0) {
            int bucket = 0;
            if (a.rel_table != nullptr) bucket = kv_rel_bucket(j - (len - 1), a.bidirectional, a.num_buckets, a.rel_denom);
#pragma unroll
            for (int hh = 0; hh < HB; ++hh) {
                if (hh < nh) {
                    const float bias = a.rel_table != nullptr ? a.rel_table[(int64_t)bucket * a.n_heads + h0 + hh] : 0.f;
                    ss[hh * KV_PART + (j - k0)] = fmaf(dot[hh], a.scale, bias);
                }
            }
        }
    }
    __syncthreads();

    // Phase 2: the partition's softmax, one warp per head.
    const int n = k1 - k0;
    for (int hh = warp; hh < nh; hh += 4) {
        float mx = -INFINITY;
        for (int jj = lane; jj < n; jj += 32) mx = fmaxf(mx, ss[hh * KV_PART + jj]);
        mx = tessera_warp_max(mx);
        const float mu = mx == -INFINITY ? 0.f : mx;
        float sum = 0.f;
        for (int jj = lane; jj < n; jj += 32) {
            const float p = expf(ss[hh * KV_PART + jj] - mu);
            ss[hh * KV_PART + jj] = p;
            sum += p;
        }
        sum = tessera_warp_sum(sum);
        if (lane == 0) {
            sm[hh] = mx;
            sl[hh] = sum;
        }
    }
    for (int hh = nh + warp; hh < HB; hh += 4) {
        // Heads past nh: zero weights, so the V phase reads defined values.
        for (int jj = lane; jj < n; jj += 32) ss[hh * KV_PART + jj] = 0.f;
    }
    __syncthreads();

    // Phase 3: weighted sum of V, a piece round at a time.
    for (int r0 = 0; r0 < P; r0 += lpk) {
        const int pc = r0 + lp;
        float acc[HB][8];
#pragma unroll
        for (int hh = 0; hh < HB; ++hh)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[hh][e] = 0.f;
        if (pc < P) {
            for (int base = k0 + warp * kpw; base < k1; base += 4 * kpw) {
                const int j = base + ks;
                if (j < k1) {
                    const int64_t page = table[j / T];
                    const int64_t row = ((page * 2 + 1) * a.nkv + g) * T + j % T;
                    float x[8];
                    kv_load_piece<DT>(x, a, row, pc);
#pragma unroll
                    for (int hh = 0; hh < HB; ++hh) {
                        const float p = ss[hh * KV_PART + (j - k0)];
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[hh][e] = fmaf(p, x[e], acc[hh][e]);
                    }
                }
            }
        }
        for (int off = lpk; off < 32; off <<= 1) {
#pragma unroll
            for (int hh = 0; hh < HB; ++hh)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[hh][e] += __shfl_xor_sync(0xffffffffu, acc[hh][e], off);
        }
        if (ks == 0 && pc < P) {
#pragma unroll
            for (int hh = 0; hh < HB; ++hh) {
                float4* dst = reinterpret_cast<float4*>(sred + (warp * HB + hh) * DP + pc * 8);
                dst[0] = make_float4(acc[hh][0], acc[hh][1], acc[hh][2], acc[hh][3]);
                dst[1] = make_float4(acc[hh][4], acc[hh][5], acc[hh][6], acc[hh][7]);
            }
        }
    }
    __syncthreads();

    const int rec = d + 2;
    for (int idx = tid; idx < nh * d; idx += 128) {
        const int hh = idx / d, c = idx % d;
        float o = sred[hh * DP + c];
#pragma unroll
        for (int w = 1; w < 4; ++w) o += sred[(w * HB + hh) * DP + c];
        const int h = h0 + hh;
        if (parts == 1) {
            const float l = sl[hh];
            a.out[(int64_t)bb * a.o_bs + (int64_t)h * a.o_hs + c] = l > 0.f ? o / l : 0.f;
        } else {
            float* recp = a.partials + (((int64_t)bb * a.n_heads + h) * a.parts_max + part) * rec;
            if (c == 0) {
                recp[0] = sm[hh];
                recp[1] = sl[hh];
            }
            recp[2 + c] = o;
        }
    }
}

#define KV_DECODE(NAME, DT, HB) \
    extern "C" __global__ void __launch_bounds__(128) NAME(const KvDecodeArgs a) { kv_decode<DT, HB>(a); }

KV_DECODE(kv_decode_f32_h1, 0, 1)
KV_DECODE(kv_decode_f32_h2, 0, 2)
KV_DECODE(kv_decode_f32_h4, 0, 4)
KV_DECODE(kv_decode_f32_h8, 0, 8)
KV_DECODE(kv_decode_f16_h1, 1, 1)
KV_DECODE(kv_decode_f16_h2, 1, 2)
KV_DECODE(kv_decode_f16_h4, 1, 4)
KV_DECODE(kv_decode_f16_h8, 1, 8)
KV_DECODE(kv_decode_q8_h1, 2, 1)
KV_DECODE(kv_decode_q8_h2, 2, 2)
KV_DECODE(kv_decode_q8_h4, 2, 4)
KV_DECODE(kv_decode_q8_h8, 2, 8)

extern "C" __global__ void __launch_bounds__(128) kv_combine(const KvCombineArgs a) {
    const int h = blockIdx.x, bb = blockIdx.y;
    const int len = (int)a.lens[a.slots[bb]];
    const int parts = (len + KV_PART - 1) / KV_PART;
    if (parts <= 1) return;
    const int d = a.head_dim, rec = d + 2;
    const float* base = a.partials + ((int64_t)bb * a.n_heads + h) * a.parts_max * rec;
    // Partitions whose scores were all −∞ (m = −∞, l = 0) carry no weight.
    float M = -INFINITY;
    for (int p = 0; p < parts; ++p) M = fmaxf(M, base[(int64_t)p * rec]);
    const float mu = M == -INFINITY ? 0.f : M;
    float L = 0.f;
    for (int p = 0; p < parts; ++p) {
        const float m = base[(int64_t)p * rec];
        if (m != -INFINITY) L += base[(int64_t)p * rec + 1] * expf(m - mu);
    }
    float* out = a.out + (int64_t)bb * a.o_bs + (int64_t)h * a.o_hs;
    for (int c = threadIdx.x; c < d; c += 128) {
        float o = 0.f;
        for (int p = 0; p < parts; ++p) {
            const float m = base[(int64_t)p * rec];
            if (m != -INFINITY) o += base[(int64_t)p * rec + 2 + c] * expf(m - mu);
        }
        out[c] = L > 0.f ? o / L : 0.f;
    }
}
