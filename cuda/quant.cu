// quant.cu: y[m, n] = x[m, k] · Wᵀ with W stored as GGML blocks (Q8_0, Q4_0, Q4_K), f32
// activations (never quantized) and f32 results. The launcher is kernels/cuda/src/quant.rs; every
// geometry and precondition below is what it validates and sets up.
//
// Data (byte-for-byte tessera_core::quant / GGML):
//   Q8_0  34 B / 32 weights: f16 d, int8 qs[32];                 w_i = d·qs[i]
//   Q4_0  18 B / 32 weights: f16 d, u8 qs[16];  w_j = d·(lo(qs[j]) − 8), w_{j+16} = d·(hi(qs[j]) − 8)
//   Q4_K 144 B / 256 weights: f16 d, f16 dmin, u8 scales[12] (6-bit sc_j, m_j, GGML's
//        get_scale_min_k4 packing), u8 qs[128]: group g (0..3) = qs[32g..32g+32), low nibbles are
//        sub-block 2g, high nibbles sub-block 2g+1; w = d·sc_j·q − dmin·m_j.
//   W is n rows × nb = k / block_len blocks, row-major and contiguous (row_bytes = nb·block_bytes);
//   x is m × k f32 with row stride ldx, y is m × n f32 with row stride ldy.
//   Preconditions (host): k > 0 and a multiple of the block length, m, n >= 1, every dimension
//   and stride fits int with 4096 to spare, W 2-byte aligned; the buffers hold what the shapes
//   and strides need. Weight byte offsets are computed in 64 bits.
//
// ---- quant_gemv_{q8_0,q4_0,q4_k}(w, x, y, m, n, k, ldx, ldy, col_groups, rows_per_group, flags) -
//   Decode GEMV, memory-bound: each weight byte is read once per token, dequantized in registers
//   and multiplied with f32 activations by f32 FMA.
//   Block 256 threads = 32 lane groups of 8 lanes. A "unit" is 256 weights of a row: 8 Q8_0 / Q4_0
//   blocks (272 / 144 bytes) or one Q4_K block (144 bytes). col_groups = U (a power of two,
//   1..32, >= min(units per row, 32) rounded up) lane groups cover U consecutive units of the
//   same rows; the P = 32 / U row phases of a block take different rows. With R =
//   rows_per_group (1..8, chosen by the host to even out the last wave of blocks), lane group
//   (rho = grp / U, c = grp % U) owns rows blockIdx.x·RP + R·rho + 0..R-1 and units c, c + U, ...
//   For each unit it loads its lanes' 32 activations into registers once (x-stationary: reused
//   for R rows), then stages the unit of all R rows in shared memory (cp.async 16 B copies of
//   contiguous 16-byte chunks, all rows in flight in two commit groups; flags bit 0 clear:
//   2-byte loads instead) and decodes from there: Q8_0 / Q4_0 lane t takes block t of the unit
//   (5 / 9 aligned 32-bit shared loads, realigned with PRMT), Q4_K lane t takes qs bytes
//   16t..16t+15 (16 low-nibble weights of sub-block 2(t/2), 16 high of 2(t/2)+1) plus the header.
//   Codes become floats exactly (PRMT into 0x4B0000xx, minus 2^23 [+ offset]); scales apply per
//   block (Q4_K: per sub-block, the min term through the sum of the activations).
//   End: the (up to 8) row sums of a lane group are reduced over its lanes by a transposing
//   butterfly (lane t ends with row t), then over the U lane groups of a row in shared memory,
//   in a fixed order (deterministic).
//   Grid: (ceil(n / (R·P)), min(m, 65535)); blockIdx.y strides over the tokens.
//   Dynamic shared memory: 8 warps × 8 row slots × SLOT_WORDS × 4 B = 71680 (Q8_0),
//   40960 (Q4_0), 36864 (Q4_K) bytes (Q8_0 needs the opt-in above 48 KiB).
//   flags: bit 0 = weights 16-byte aligned in units (W % 16 == 0, and for Q8_0 / Q4_0
//   nb % 8 == 0) -> cp.async path, else 2-byte loads (any nb, partial last unit);
//   bit 1 = x rows 16-byte aligned (x % 16 == 0 and ldx % 4 == 0 or m == 1) -> float4 loads.
//
// ---- quant_gemm_{q8_0,q4_0,q4_k}_m{16,64}(w, x, y, m, n, k, ldx, ldy, flags) -------------------
//   Prefill GEMM on tensor cores: mma.sync.m16n8k16 f16 × f16 -> f32. Block 128 threads (4 warps),
//   tile BM tokens × BN = 64 weight rows × BK (32 for Q8_0 / Q4_0 = one block per row, 64 for
//   Q4_K = one 64-weight group). Per stage every thread loads its share of the raw weight bytes
//   (2 threads per weight row: 16 + 2 bytes Q8_0, 8 + 2 bytes Q4_0, 16 qs + 16 header bytes
//   Q4_K, 16-byte loads when flags bit 0) and of the x tile (f32, float4 when flags bit 1) into
//   registers one stage ahead, then dequantizes the weights to f16 (code -> f16 exactly, one
//   rounding for the scale product; Q4_K: d·sc and dmin·m rounded to f16, one fused rounding)
//   and converts x to f16 (round to nearest) into a double-buffered shared tile, rows padded by
//   8 halves (conflict-free ldmatrix). Warps: BM = 64 -> 2 × 2 warps of 32 × 32, BM = 16 -> 1 × 4
//   warps of 16 × 16. Rows beyond n and tokens beyond m are zero-filled and never stored.
//   Grid: (ceil(n / 64), min(ceil(m / BM), 65535)); blockIdx.y strides over the token tiles.
//   Static shared memory: 2 × (BM + 64) × (BK + 8) × 2 bytes (<= 36 KiB). flags as above
//   (bit 0: W % 16 == 0, used by Q4_K only; bit 1: x % 16 == 0 and ldx % 4 == 0).
//   f16 range: |x| or a dequantized |w| above 65504 becomes infinite (use the GEMV or
//   dequantize + an f32 GEMM for such data).
//
// ---- quant_dequantize_{q8_0,q4_0,q4_k}(w, out, nunits) ------------------------------------------
//   out[n·k] (contiguous) = the dequantized weights, bit-identical to tessera_core::quant::
//   dequantize (the same f32 operations, unfused). One thread per 32 weights (a Q8_0 / Q4_0
//   block or a Q4_K sub-block; nunits = n·nb, ×8 for Q4_K), grid-stride, 2-byte loads.
//
// ---- quant_zero_rows(y, m, n, ldy) ---------------------------------------------------------------
//   y[r·ldy + c] = 0 for r < m, c < n (k == 0). Grid-stride.
#include "common.cuh"

#define QT_Q8_0 0
#define QT_Q4_0 1
#define QT_Q4_K 2

// A byte of v placed in the low mantissa bits of 2^23: the float 2^23 + byte, exactly.
#define QT_MAGIC 0x4B000000u
#define QT_TWO23 8388608.0f

template <int B>
TESSERA_DEVICE float qt_bytef(uint32_t v) {
    return __uint_as_float(__byte_perm(v, QT_MAGIC, 0x7540u | B));
}

template <int F>
struct QtFmt;

// SLOT_WORDS: one row slot of a warp = the 4 lane groups' units, at word offsets chosen so the
// 8 lanes × 4 groups of a decode load hit 32 different banks.
template <>
struct QtFmt<QT_Q8_0> {
    static constexpr int BLOCK_BYTES = 34, BLOCK_LEN = 32, UNIT_BLOCKS = 8, UNIT_VEC = 17;
    static constexpr int SLOT_WORDS = 280;
    // 0, 68, 144, 212: banks {0,4,16,20} + floor(8.5 t) cover all 32.
    static TESSERA_DEVICE int group_offset(int q) { return 68 * q + 8 * (q >> 1); }
};
template <>
struct QtFmt<QT_Q4_0> {
    static constexpr int BLOCK_BYTES = 18, BLOCK_LEN = 32, UNIT_BLOCKS = 8, UNIT_VEC = 9;
    static constexpr int SLOT_WORDS = 160;
    // 0, 40, 80, 120: banks {0,8,16,24} + floor(4.5 t) cover all 32.
    static TESSERA_DEVICE int group_offset(int q) { return 40 * q; }
};
template <>
struct QtFmt<QT_Q4_K> {
    static constexpr int BLOCK_BYTES = 144, BLOCK_LEN = 256, UNIT_BLOCKS = 1, UNIT_VEC = 9;
    static constexpr int SLOT_WORDS = 144;
    static TESSERA_DEVICE int group_offset(int q) { return 36 * q; }
};

// ---- small helpers ---------------------------------------------------------------------------------

TESSERA_DEVICE void qt_cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
TESSERA_DEVICE void qt_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
TESSERA_DEVICE void qt_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

TESSERA_DEVICE uint32_t qt_ld_u32_b2(const uint8_t* p) {  // 2-byte aligned 32-bit load
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return (uint32_t)__ldg(h) | ((uint32_t)__ldg(h + 1) << 16);
}

TESSERA_DEVICE uint4 qt_ld_u128(const uint8_t* p, bool vec) {  // vec: 16-byte aligned
    if (vec) return __ldg(reinterpret_cast<const uint4*>(p));
    return make_uint4(qt_ld_u32_b2(p), qt_ld_u32_b2(p + 4), qt_ld_u32_b2(p + 8), qt_ld_u32_b2(p + 12));
}

TESSERA_DEVICE float4 qt_ld_f4(const float* p, bool vec) {  // vec: 16-byte aligned
    if (vec) return __ldg(reinterpret_cast<const float4*>(p));
    return make_float4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
}

TESSERA_DEVICE float qt_half_bits(uint32_t bits) {
    return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu)));
}

// Q4_K: the 6-bit scales and mins of sub-blocks 2g and 2g+1 (get_scale_min_k4), from the header
// words hy = scales[0..3], hz = scales[4..7], hw = scales[8..11].
TESSERA_DEVICE void qt_q4k_scales(uint32_t hy, uint32_t hz, uint32_t hw, int g, float& sc0, float& sc1,
                                  float& m0, float& m1) {
    const uint32_t hs = (uint32_t)(g & 1) * 16u;
    const uint32_t y16 = (hy >> hs) & 0xffffu, z16 = (hz >> hs) & 0xffffu, w16 = (hw >> hs) & 0xffffu;
    uint32_t sc, mn;
    if (g >= 2) {
        sc = (w16 & 0x0f0fu) | ((y16 >> 2) & 0x3030u);
        mn = ((w16 >> 4) & 0x0f0fu) | ((z16 >> 2) & 0x3030u);
    } else {
        sc = y16 & 0x3f3fu;
        mn = z16 & 0x3f3fu;
    }
    const uint32_t pk = sc | (mn << 16);
    sc0 = qt_bytef<0>(pk) - QT_TWO23;
    sc1 = qt_bytef<1>(pk) - QT_TWO23;
    m0 = qt_bytef<2>(pk) - QT_TWO23;
    m1 = qt_bytef<3>(pk) - QT_TWO23;
}

// ---- GEMV ----------------------------------------------------------------------------------------

// Copies the unit at src (one row) into the slot dst: cp.async 16-byte chunks (vec) or 2-byte
// loads of the nblk blocks present. Lane t of the group takes chunks t, t + 8, ...
template <int F>
TESSERA_DEVICE void qt_stage_unit(uint32_t* dst, const uint8_t* src, int t, int nblk, bool vec) {
    using T = QtFmt<F>;
    if (vec) {
#pragma unroll
        for (int i = t; i < T::UNIT_VEC; i += 8) qt_cp_async16(dst + 4 * i, src + 16 * i);
    } else {
        uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
        const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
        const int nh = nblk * (T::BLOCK_BYTES / 2);
        for (int h = t; h < nh; h += 8) d16[h] = __ldg(s16 + h);
    }
}

// Lane t's 32 activations of unit u: Q8_0 / Q4_0: block 8u + t (xr[0..16) pair with the low
// nibbles / first half, xr[16..32) with the high nibbles / second half); Q4_K: weights
// 64g + 16h + 0..15 (low nibbles) and 64g + 32 + 16h + 0..15 (high), g = t / 2, h = t % 2.
template <int F>
TESSERA_DEVICE void qt_load_x(float (&xr)[32], const float* xt, int u, int t, bool valid, bool vec) {
    if (!valid) {
#pragma unroll
        for (int i = 0; i < 32; ++i) xr[i] = 0.f;
        return;
    }
    const float* p0;
    if (F == QT_Q4_K) {
        p0 = xt + (size_t)u * 256 + 64 * (t >> 1) + 16 * (t & 1);
    } else {
        p0 = xt + ((size_t)u * 8 + t) * 32;
    }
    const float* p1 = p0 + (F == QT_Q4_K ? 32 : 16);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float4 a = qt_ld_f4(p0 + 4 * i, vec);
        const float4 b = qt_ld_f4(p1 + 4 * i, vec);
        xr[4 * i] = a.x;
        xr[4 * i + 1] = a.y;
        xr[4 * i + 2] = a.z;
        xr[4 * i + 3] = a.w;
        xr[16 + 4 * i] = b.x;
        xr[16 + 4 * i + 1] = b.y;
        xr[16 + 4 * i + 2] = b.z;
        xr[16 + 4 * i + 3] = b.w;
    }
}

// The dot product of lane t's share of one staged unit (slot s) with its activations.
template <int F>
struct QtDot;

template <>
struct QtDot<QT_Q8_0> {
    static TESSERA_DEVICE float run(const uint32_t* s, int t, const float (&xr)[32], float, float) {
        // Block t starts at byte 34t of the unit: 9 words from floor(8.5t) cover it.
        const uint32_t* p = s + ((17 * t) >> 1);
        uint32_t wv[9];
#pragma unroll
        for (int i = 0; i < 9; ++i) wv[i] = p[i];
        const uint32_t odd = (uint32_t)t & 1u;
        const uint32_t sel = odd ? 0x7654u : 0x5432u;
        const float d = qt_half_bits(wv[0] >> (16u * odd));
        float a[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const uint32_t v = __byte_perm(wv[i], wv[i + 1], sel) ^ 0x80808080u;  // q + 128
            a[0] = fmaf(qt_bytef<0>(v) - 8388736.0f, xr[4 * i], a[0]);
            a[1] = fmaf(qt_bytef<1>(v) - 8388736.0f, xr[4 * i + 1], a[1]);
            a[2] = fmaf(qt_bytef<2>(v) - 8388736.0f, xr[4 * i + 2], a[2]);
            a[3] = fmaf(qt_bytef<3>(v) - 8388736.0f, xr[4 * i + 3], a[3]);
        }
        return d * ((a[0] + a[1]) + (a[2] + a[3]));
    }
};

template <>
struct QtDot<QT_Q4_0> {
    static TESSERA_DEVICE float run(const uint32_t* s, int t, const float (&xr)[32], float, float) {
        // Block t starts at byte 18t of the unit: 5 words from floor(4.5t) cover it.
        const uint32_t* p = s + ((9 * t) >> 1);
        uint32_t wv[5];
#pragma unroll
        for (int i = 0; i < 5; ++i) wv[i] = p[i];
        const uint32_t odd = (uint32_t)t & 1u;
        const uint32_t sel = odd ? 0x7654u : 0x5432u;
        const float d = qt_half_bits(wv[0] >> (16u * odd));
        float lo[2] = {0.f, 0.f}, hi[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t v = __byte_perm(wv[i], wv[i + 1], sel);  // qs[4i .. 4i+4)
            const uint32_t l = v & 0x0f0f0f0fu, h = v & 0xf0f0f0f0u;
            // low: 2^23 + q - (2^23 + 8) = q - 8; high: 2^23 + 16q - (2^23 + 128) = 16(q - 8).
            lo[0] = fmaf(qt_bytef<0>(l) - 8388616.0f, xr[4 * i], lo[0]);
            lo[1] = fmaf(qt_bytef<1>(l) - 8388616.0f, xr[4 * i + 1], lo[1]);
            lo[0] = fmaf(qt_bytef<2>(l) - 8388616.0f, xr[4 * i + 2], lo[0]);
            lo[1] = fmaf(qt_bytef<3>(l) - 8388616.0f, xr[4 * i + 3], lo[1]);
            hi[0] = fmaf(qt_bytef<0>(h) - 8388736.0f, xr[16 + 4 * i], hi[0]);
            hi[1] = fmaf(qt_bytef<1>(h) - 8388736.0f, xr[16 + 4 * i + 1], hi[1]);
            hi[0] = fmaf(qt_bytef<2>(h) - 8388736.0f, xr[16 + 4 * i + 2], hi[0]);
            hi[1] = fmaf(qt_bytef<3>(h) - 8388736.0f, xr[16 + 4 * i + 3], hi[1]);
        }
        return d * fmaf(0.0625f, hi[0] + hi[1], lo[0] + lo[1]);
    }
};

template <>
struct QtDot<QT_Q4_K> {
    // xs0, xs1: the sums of xr[0..16) and xr[16..32) (the min terms).
    static TESSERA_DEVICE float run(const uint32_t* s, int t, const float (&xr)[32], float xs0, float xs1) {
        const uint4 hd = *reinterpret_cast<const uint4*>(s);
        const uint4 qv = *reinterpret_cast<const uint4*>(s + 4 + 4 * t);
        const uint32_t qw[4] = {qv.x, qv.y, qv.z, qv.w};
        float a0[2] = {0.f, 0.f}, a1[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t l = qw[i] & 0x0f0f0f0fu, h = qw[i] & 0xf0f0f0f0u;  // q and 16q
            a0[0] = fmaf(qt_bytef<0>(l) - QT_TWO23, xr[4 * i], a0[0]);
            a0[1] = fmaf(qt_bytef<1>(l) - QT_TWO23, xr[4 * i + 1], a0[1]);
            a0[0] = fmaf(qt_bytef<2>(l) - QT_TWO23, xr[4 * i + 2], a0[0]);
            a0[1] = fmaf(qt_bytef<3>(l) - QT_TWO23, xr[4 * i + 3], a0[1]);
            a1[0] = fmaf(qt_bytef<0>(h) - QT_TWO23, xr[16 + 4 * i], a1[0]);
            a1[1] = fmaf(qt_bytef<1>(h) - QT_TWO23, xr[16 + 4 * i + 1], a1[1]);
            a1[0] = fmaf(qt_bytef<2>(h) - QT_TWO23, xr[16 + 4 * i + 2], a1[0]);
            a1[1] = fmaf(qt_bytef<3>(h) - QT_TWO23, xr[16 + 4 * i + 3], a1[1]);
        }
        float sc0, sc1, m0, m1;
        qt_q4k_scales(hd.y, hd.z, hd.w, t >> 1, sc0, sc1, m0, m1);
        const float d = qt_half_bits(hd.x), dmin = qt_half_bits(hd.x >> 16);
        // d·sc and dmin·m are exact in f32 (11 × 6 significant bits); ·1/16 undoes the 16q.
        const float ds0 = d * sc0, ds1 = d * sc1 * 0.0625f, dm0 = dmin * m0, dm1 = dmin * m1;
        return fmaf(ds0, a0[0] + a0[1], ds1 * (a1[0] + a1[1])) - fmaf(dm0, xs0, dm1 * xs1);
    }
};

template <int F>
TESSERA_DEVICE void qt_gemv(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                            int m, int n, int k, int ldx, int ldy, int col_groups, int rows_per_group,
                            int flags) {
    using T = QtFmt<F>;
    extern __shared__ __align__(16) uint32_t qt_smem[];
    __shared__ float red[32][8];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int grp = tid >> 3, t = tid & 7;
    const int U = col_groups, P = 32 / U;
    const int rho = grp / U, c = grp - rho * U;
    const int rpg = rows_per_group;  // 1..8
    const int rows_per_cta = rpg * P;
    const int nb = k / T::BLOCK_LEN;
    const int nu = (nb + T::UNIT_BLOCKS - 1) / T::UNIT_BLOCKS;
    const size_t row_bytes = (size_t)nb * T::BLOCK_BYTES;
    const size_t unit_bytes = (size_t)T::UNIT_BLOCKS * T::BLOCK_BYTES;
    const bool wvec = (flags & 1) != 0, xvec = (flags & 2) != 0;
    const int row0 = blockIdx.x * rows_per_cta + rpg * rho;
    const int nrows = max(0, min(rpg, n - row0));  // this lane group's rows
    uint32_t* slots = qt_smem + warp * 8 * T::SLOT_WORDS + T::group_offset(lane >> 3);

    for (int tok = blockIdx.y; tok < m; tok += gridDim.y) {
        const float* xt = x + (size_t)tok * ldx;
        float acc[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) acc[r] = 0.f;

        for (int u0 = 0; u0 < nu; u0 += U) {
            const int u = u0 + c;
            const bool active = u < nu;
            const int nblk = active ? min(T::UNIT_BLOCKS, nb - u * T::UNIT_BLOCKS) : 0;
            const bool lane_valid = active && (F == QT_Q4_K || t < nblk);
            // Weights of the 8 rows in flight (two commit groups), then the activations.
            if (active) {
                const uint8_t* wu = w + (size_t)u * unit_bytes;
#pragma unroll
                for (int r = 0; r < 8; ++r) {
                    if (r < nrows)
                        qt_stage_unit<F>(slots + r * T::SLOT_WORDS, wu + (size_t)(row0 + r) * row_bytes, t, nblk,
                                         wvec);
                    if (r == 3) qt_cp_async_commit();
                }
                qt_cp_async_commit();
            }
            float xr[32];
            qt_load_x<F>(xr, xt, u, t, lane_valid, xvec);
            float xs0 = 0.f, xs1 = 0.f;
            if (F == QT_Q4_K) {
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    xs0 += xr[i];
                    xs1 += xr[16 + i];
                }
            }
            qt_cp_async_wait<1>();
            __syncwarp();
#pragma unroll
            for (int r = 0; r < 4; ++r)
                if (lane_valid && r < nrows) acc[r] += QtDot<F>::run(slots + r * T::SLOT_WORDS, t, xr, xs0, xs1);
            qt_cp_async_wait<0>();
            __syncwarp();
#pragma unroll
            for (int r = 4; r < 8; ++r)
                if (lane_valid && r < nrows) acc[r] += QtDot<F>::run(slots + r * T::SLOT_WORDS, t, xr, xs0, xs1);
            __syncwarp();  // the slots are restaged by the next unit
        }

        // Transposing butterfly over the 8 lanes of the group: lane t ends with row t's sum.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float send = (t & 4) ? acc[i] : acc[i + 4];
            const float keep = (t & 4) ? acc[i + 4] : acc[i];
            acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float send = (t & 2) ? acc[i] : acc[i + 2];
            const float keep = (t & 2) ? acc[i + 2] : acc[i];
            acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
        }
        {
            const float send = (t & 1) ? acc[0] : acc[1];
            const float keep = (t & 1) ? acc[1] : acc[0];
            acc[0] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
        }
        red[grp][t] = acc[0];
        __syncthreads();
        if (tid < rows_per_cta) {
            const int rr = tid / rpg, tt = tid - rr * rpg;
            float s = 0.f;
            for (int cc = 0; cc < U; ++cc) s += red[rr * U + cc][tt];
            const int row = blockIdx.x * rows_per_cta + tid;
            if (row < n) y[(size_t)tok * ldy + row] = s;
        }
        __syncthreads();
    }
}

#define QT_GEMV_ARGS                                                                                        \
    const uint8_t *__restrict__ w, const float *__restrict__ x, float *__restrict__ y, int m, int n, int k, \
        int ldx, int ldy, int col_groups, int rows_per_group, int flags

extern "C" __global__ void __launch_bounds__(256, 2) quant_gemv_q8_0(QT_GEMV_ARGS) {
    qt_gemv<QT_Q8_0>(w, x, y, m, n, k, ldx, ldy, col_groups, rows_per_group, flags);
}
extern "C" __global__ void __launch_bounds__(256, 2) quant_gemv_q4_0(QT_GEMV_ARGS) {
    qt_gemv<QT_Q4_0>(w, x, y, m, n, k, ldx, ldy, col_groups, rows_per_group, flags);
}
extern "C" __global__ void __launch_bounds__(256, 2) quant_gemv_q4_k(QT_GEMV_ARGS) {
    qt_gemv<QT_Q4_K>(w, x, y, m, n, k, ldx, ldy, col_groups, rows_per_group, flags);
}

// ---- GEMM ----------------------------------------------------------------------------------------

TESSERA_DEVICE void qt_ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
}

TESSERA_DEVICE void qt_mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

TESSERA_DEVICE __half2 qt_u2h(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }
TESSERA_DEVICE uint32_t qt_h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// The raw bytes one thread holds for one stage of the weight tile (2 threads per weight row).
template <int F>
struct QtRaw;
template <>
struct QtRaw<QT_Q8_0> {
    uint32_t q[4], d;  // qs bytes 16h .. 16h+16 of the block, its scale
};
template <>
struct QtRaw<QT_Q4_0> {
    uint32_t q[2], d;  // qs bytes 8h .. 8h+8, the scale
};
template <>
struct QtRaw<QT_Q4_K> {
    uint4 hd, q;  // header (d, dmin, scales), qs bytes 32g + 16h .. +16
};

// Stage kt of weight row p (null: beyond n, zeros), half h.
TESSERA_DEVICE void qt_gemm_load_w(QtRaw<QT_Q8_0>& r, const uint8_t* p, int kt, int h, bool) {
    if (p == nullptr) {
        r.q[0] = r.q[1] = r.q[2] = r.q[3] = 0u;
        r.d = 0u;
        return;
    }
    const uint8_t* b = p + (size_t)kt * 34;
    r.d = __ldg(reinterpret_cast<const uint16_t*>(b));
#pragma unroll
    for (int i = 0; i < 4; ++i) r.q[i] = qt_ld_u32_b2(b + 2 + 16 * h + 4 * i);
}
TESSERA_DEVICE void qt_gemm_load_w(QtRaw<QT_Q4_0>& r, const uint8_t* p, int kt, int h, bool) {
    if (p == nullptr) {
        r.q[0] = r.q[1] = 0u;
        r.d = 0u;
        return;
    }
    const uint8_t* b = p + (size_t)kt * 18;
    r.d = __ldg(reinterpret_cast<const uint16_t*>(b));
    r.q[0] = qt_ld_u32_b2(b + 2 + 8 * h);
    r.q[1] = qt_ld_u32_b2(b + 6 + 8 * h);
}
TESSERA_DEVICE void qt_gemm_load_w(QtRaw<QT_Q4_K>& r, const uint8_t* p, int kt, int h, bool vec) {
    if (p == nullptr) {
        r.hd = make_uint4(0u, 0u, 0u, 0u);
        r.q = make_uint4(0u, 0u, 0u, 0u);
        return;
    }
    const uint8_t* b = p + (size_t)(kt >> 2) * 144;
    r.hd = qt_ld_u128(b, vec);
    r.q = qt_ld_u128(b + 16 + 32 * (kt & 3) + 16 * h, vec);
}

// Dequantizes to f16 into row `row` of the tile (ld halves per row).
TESSERA_DEVICE void qt_gemm_store_w(__half* tile, int ld, int row, const QtRaw<QT_Q8_0>& r, int, int h) {
    const __half2 d2 = __half2half2(__ushort_as_half((unsigned short)r.d));
    const __half2 off = __float2half2_rn(1152.0f);  // 1024 + 128
    uint32_t o[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t v = r.q[i] ^ 0x80808080u;
        // Half 0x64XX = 1024 + XX, XX = q + 128: minus 1152 is q exactly; times d rounds once.
        o[2 * i] = qt_h2u(__hmul2(__hsub2(qt_u2h(__byte_perm(v, 0x64646464u, 0x4140u)), off), d2));
        o[2 * i + 1] = qt_h2u(__hmul2(__hsub2(qt_u2h(__byte_perm(v, 0x64646464u, 0x4342u)), off), d2));
    }
    uint4* dst = reinterpret_cast<uint4*>(tile + row * ld + 16 * h);
    dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
    dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
}
TESSERA_DEVICE void qt_gemm_store_w(__half* tile, int ld, int row, const QtRaw<QT_Q4_0>& r, int, int h) {
    const __half2 d2 = __half2half2(__ushort_as_half((unsigned short)r.d));
    const __half2 off = __float2half2_rn(1032.0f);  // 1024 + 8
    uint32_t lo[4], hi[4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            // bytes 2j, 2j+1 of the word into the two halves, then their nibbles.
            const uint32_t t2 = __byte_perm(r.q[i], 0u, j ? 0x4342u : 0x4140u);
            const uint32_t l = (t2 & 0x000f000fu) | 0x64006400u, hh = ((t2 >> 4) & 0x000f000fu) | 0x64006400u;
            lo[2 * i + j] = qt_h2u(__hmul2(__hsub2(qt_u2h(l), off), d2));
            hi[2 * i + j] = qt_h2u(__hmul2(__hsub2(qt_u2h(hh), off), d2));
        }
    }
    *reinterpret_cast<uint4*>(tile + row * ld + 8 * h) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
    *reinterpret_cast<uint4*>(tile + row * ld + 16 + 8 * h) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
}
TESSERA_DEVICE void qt_gemm_store_w(__half* tile, int ld, int row, const QtRaw<QT_Q4_K>& r, int kt, int h) {
    float sc0, sc1, m0, m1;
    qt_q4k_scales(r.hd.y, r.hd.z, r.hd.w, kt & 3, sc0, sc1, m0, m1);
    const float d = qt_half_bits(r.hd.x), dmin = qt_half_bits(r.hd.x >> 16);
    const __half2 s0 = __float2half2_rn(d * sc0), s1 = __float2half2_rn(d * sc1);
    const __half2 n0 = __float2half2_rn(-(dmin * m0)), n1 = __float2half2_rn(-(dmin * m1));
    const __half2 off = __float2half2_rn(1024.0f);
    const uint32_t qw[4] = {r.q.x, r.q.y, r.q.z, r.q.w};
    uint32_t lo[8], hi[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const uint32_t t2 = __byte_perm(qw[i], 0u, j ? 0x4342u : 0x4140u);
            const uint32_t l = (t2 & 0x000f000fu) | 0x64006400u, hh = ((t2 >> 4) & 0x000f000fu) | 0x64006400u;
            lo[2 * i + j] = qt_h2u(__hfma2(__hsub2(qt_u2h(l), off), s0, n0));
            hi[2 * i + j] = qt_h2u(__hfma2(__hsub2(qt_u2h(hh), off), s1, n1));
        }
    }
    uint4* dl = reinterpret_cast<uint4*>(tile + row * ld + 16 * h);
    uint4* dh = reinterpret_cast<uint4*>(tile + row * ld + 32 + 16 * h);
    dl[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
    dl[1] = make_uint4(lo[4], lo[5], lo[6], lo[7]);
    dh[0] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    dh[1] = make_uint4(hi[4], hi[5], hi[6], hi[7]);
}

template <int F, int BM>
TESSERA_DEVICE void qt_gemm(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                            int m, int n, int k, int ldx, int ldy, int flags) {
    constexpr int BN = 64, BK = (F == QT_Q4_K) ? 64 : 32, LD = BK + 8;
    constexpr int WM = BM >= 64 ? 2 : 1, WN = 4 / WM;
    constexpr int TM = BM / WM, TN = BN / WN, MT = TM / 16, NT = TN / 8;
    constexpr int XC4 = BK / 4;            // float4 per x-tile row
    constexpr int XCH = BM * XC4 / 128;    // float4 per thread
    static_assert(XCH >= 1 && BM * XC4 % 128 == 0, "x tile split");
    static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0, "warp tile");
    __shared__ __align__(16) __half As[2][BM * LD];
    __shared__ __align__(16) __half Bs[2][BN * LD];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;
    const bool wvec = (flags & 1) != 0, xvec = (flags & 2) != 0;
    const int nb = k / QtFmt<F>::BLOCK_LEN;
    const size_t row_bytes = (size_t)nb * QtFmt<F>::BLOCK_BYTES;
    const int n0 = blockIdx.x * BN;
    const int KT = k / BK;
    const int wr = tid >> 1, hf = tid & 1;
    const uint8_t* wrow = (n0 + wr < n) ? w + (size_t)(n0 + wr) * row_bytes : nullptr;
    const int mtiles = (m + BM - 1) / BM;

    for (int mtile = blockIdx.y; mtile < mtiles; mtile += gridDim.y) {
        const int m0 = mtile * BM;
        float acc[MT][NT][4];
#pragma unroll
        for (int a = 0; a < MT; ++a)
#pragma unroll
            for (int b = 0; b < NT; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;

        float4 xv[XCH];
        QtRaw<F> wraw;
        auto load_x = [&](int kt) {
#pragma unroll
            for (int j = 0; j < XCH; ++j) {
                const int ci = tid + 128 * j, row = ci / XC4, c4 = ci % XC4;
                const int tok = m0 + row;
                xv[j] = tok < m ? qt_ld_f4(x + (size_t)tok * ldx + (size_t)kt * BK + 4 * c4, xvec)
                                : make_float4(0.f, 0.f, 0.f, 0.f);
            }
        };
        auto store_x = [&](__half* tile) {
#pragma unroll
            for (int j = 0; j < XCH; ++j) {
                const int ci = tid + 128 * j, row = ci / XC4, c4 = ci % XC4;
                const uint32_t lo = qt_h2u(__floats2half2_rn(xv[j].x, xv[j].y));
                const uint32_t hi = qt_h2u(__floats2half2_rn(xv[j].z, xv[j].w));
                *reinterpret_cast<uint2*>(tile + row * LD + 4 * c4) = make_uint2(lo, hi);
            }
        };

        load_x(0);
        qt_gemm_load_w(wraw, wrow, 0, hf, wvec);
        store_x(As[0]);
        qt_gemm_store_w(Bs[0], LD, wr, wraw, 0, hf);
        __syncthreads();

        for (int kt = 0; kt < KT; ++kt) {
            const int cur = kt & 1;
            const bool more = kt + 1 < KT;
            if (more) {
                load_x(kt + 1);
                qt_gemm_load_w(wraw, wrow, kt + 1, hf, wvec);
            }
            const __half* at = As[cur];
            const __half* bt = Bs[cur];
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t af[MT][4];
#pragma unroll
                for (int a = 0; a < MT; ++a)
                    qt_ldmatrix_x4(af[a], at + (wm * TM + a * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
                uint32_t bf[NT][2];
#pragma unroll
                for (int p = 0; p < NT / 2; ++p) {
                    uint32_t r4[4];
                    qt_ldmatrix_x4(r4, bt + (wn * TN + p * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 +
                                           ((lane >> 3) & 1) * 8);
                    bf[2 * p][0] = r4[0];
                    bf[2 * p][1] = r4[1];
                    bf[2 * p + 1][0] = r4[2];
                    bf[2 * p + 1][1] = r4[3];
                }
#pragma unroll
                for (int a = 0; a < MT; ++a)
#pragma unroll
                    for (int b = 0; b < NT; ++b) qt_mma16816(acc[a][b], af[a], bf[b][0], bf[b][1]);
            }
            if (more) {
                store_x(As[cur ^ 1]);
                qt_gemm_store_w(Bs[cur ^ 1], LD, wr, wraw, kt + 1, hf);
            }
            __syncthreads();
        }

#pragma unroll
        for (int a = 0; a < MT; ++a) {
#pragma unroll
            for (int b = 0; b < NT; ++b) {
                const int col = n0 + wn * TN + b * 8 + 2 * (lane & 3);
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int tok = m0 + wm * TM + a * 16 + (lane >> 2) + 8 * hh;
                    if (tok < m) {
                        float* yp = y + (size_t)tok * ldy + col;
                        if (col < n) yp[0] = acc[a][b][2 * hh];
                        if (col + 1 < n) yp[1] = acc[a][b][2 * hh + 1];
                    }
                }
            }
        }
    }
}

#define QT_GEMM_ARGS                                                                                        \
    const uint8_t *__restrict__ w, const float *__restrict__ x, float *__restrict__ y, int m, int n, int k, \
        int ldx, int ldy, int flags
// MINB: blocks per SM the register budget is sized for (4: <= 128 registers; 3: <= 168, for
// Q4_K's 64-wide x prefetch).
#define QT_GEMM_KERNEL(name, F, BM, MINB)                                        \
    extern "C" __global__ void __launch_bounds__(128, MINB) name(QT_GEMM_ARGS) { \
        qt_gemm<F, BM>(w, x, y, m, n, k, ldx, ldy, flags);                       \
    }

QT_GEMM_KERNEL(quant_gemm_q8_0_m16, QT_Q8_0, 16, 4)
QT_GEMM_KERNEL(quant_gemm_q8_0_m64, QT_Q8_0, 64, 4)
QT_GEMM_KERNEL(quant_gemm_q4_0_m16, QT_Q4_0, 16, 4)
QT_GEMM_KERNEL(quant_gemm_q4_0_m64, QT_Q4_0, 64, 4)
QT_GEMM_KERNEL(quant_gemm_q4_k_m16, QT_Q4_K, 16, 4)
QT_GEMM_KERNEL(quant_gemm_q4_k_m64, QT_Q4_K, 64, 3)

// ---- dequantize, zero ----------------------------------------------------------------------------

// One Q8_0 block per iteration: out[32i + j] = q_j · d.
extern "C" __global__ void quant_dequantize_q8_0(const uint8_t* __restrict__ w, float* __restrict__ out,
                                                 uint64_t nunits) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nunits; i += stride) {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(w + i * 34);
        const float d = qt_half_bits(__ldg(p));
        float* o = out + i * 32;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const uint32_t v = __ldg(p + 1 + j);
            o[2 * j] = __fmul_rn((float)(int8_t)(v & 0xffu), d);
            o[2 * j + 1] = __fmul_rn((float)(int8_t)(v >> 8), d);
        }
    }
}

// One Q4_0 block per iteration: out[32i + j] = (lo(qs[j]) − 8)·d, out[32i + 16 + j] = (hi − 8)·d.
extern "C" __global__ void quant_dequantize_q4_0(const uint8_t* __restrict__ w, float* __restrict__ out,
                                                 uint64_t nunits) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nunits; i += stride) {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(w + i * 18);
        const float d = qt_half_bits(__ldg(p));
        float* o = out + i * 32;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const uint32_t v = __ldg(p + 1 + j);
            const uint32_t b0 = v & 0xffu, b1 = v >> 8;
            o[2 * j] = __fmul_rn((float)((int)(b0 & 15u) - 8), d);
            o[2 * j + 1] = __fmul_rn((float)((int)(b1 & 15u) - 8), d);
            o[16 + 2 * j] = __fmul_rn((float)((int)(b0 >> 4) - 8), d);
            o[16 + 2 * j + 1] = __fmul_rn((float)((int)(b1 >> 4) - 8), d);
        }
    }
}

// One Q4_K sub-block (32 weights) per iteration: unit i = block i / 8, sub-block j = i % 8;
// out[256·block + 32j + e] = (d·sc_j)·q − dmin·m_j, as the CPU computes it (no fused multiply-add).
extern "C" __global__ void quant_dequantize_q4_k(const uint8_t* __restrict__ w, float* __restrict__ out,
                                                 uint64_t nunits) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nunits; i += stride) {
        const uint64_t blk = i >> 3;
        const int j = (int)(i & 7);
        const uint8_t* b = w + blk * 144;
        const uint32_t hx = qt_ld_u32_b2(b), hy = qt_ld_u32_b2(b + 4), hz = qt_ld_u32_b2(b + 8),
                       hw = qt_ld_u32_b2(b + 12);
        float sc0, sc1, m0, m1;
        qt_q4k_scales(hy, hz, hw, j >> 1, sc0, sc1, m0, m1);
        const bool high = (j & 1) != 0;
        const float d = qt_half_bits(hx), dmin = qt_half_bits(hx >> 16);
        const float d0 = __fmul_rn(d, high ? sc1 : sc0), n0 = __fmul_rn(dmin, high ? m1 : m0);
        const uint16_t* qs = reinterpret_cast<const uint16_t*>(b + 16 + 32 * (j >> 1));
        float* o = out + blk * 256 + 32 * j;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            const uint32_t v = __ldg(qs + e);
            const uint32_t q0 = high ? (v >> 4) & 15u : v & 15u;
            const uint32_t q1 = high ? (v >> 12) & 15u : (v >> 8) & 15u;
            o[2 * e] = __fsub_rn(__fmul_rn(d0, (float)q0), n0);
            o[2 * e + 1] = __fsub_rn(__fmul_rn(d0, (float)q1), n0);
        }
    }
}

// y[r·ldy + c] = 0 for r < m, c < n.
extern "C" __global__ void quant_zero_rows(float* __restrict__ y, int m, int n, int ldy) {
    const uint64_t total = (uint64_t)m * (uint64_t)n;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const uint64_t r = i / (uint64_t)n, c = i % (uint64_t)n;
        y[r * (uint64_t)ldy + c] = 0.f;
    }
}
