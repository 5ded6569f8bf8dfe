// gemm.cu: the tensor-core GEMM family.
//
//   C[m,n] (f32, row-major, ldc) = alpha * A[m,k] * op(B) + beta * C
//
// A is row-major [m,k] with leading dimension lda; B is either [k,n] row-major ("kn",
// Transpose::No, op(B) = B) or [n,k] row-major ("nk", Transpose::Yes, op(B) = B^T: a Hugging
// Face Linear weight), leading dimension ldb. A and B are both f16 or both bf16; products are
// accumulated in f32. beta == 0 means C is not read (NaN in C does not propagate). Leading
// dimensions are elements and are passed as 64-bit integers; m, n, k are int (the launcher
// checks that they are at most INT_MAX - 1024, so that a tile's row and column indices past
// the edge, e.g. m0 + BM, cannot overflow). The launcher (kernels/cuda/src/gemm.rs) handles
// m == 0 or n == 0 (nothing launched) and k == 0 or alpha == 0 (tessera_gemm_scale_c only:
// A and B not read), so every GEMM kernel below runs with m, n, k >= 1. A one-row operand
// may be given any leading dimension (the launcher passes its row length rounded up to 8,
// since row 0 never steps by it).
//
// Kernels (extern "C"; DT = f16 | bf16, L = nk | kn):
//
// 1. tessera_gemm_mma_DT_L_{l,m,s,su}: sm_80+ path. mma.sync.aligned.m16n8k16 (f32 accumulate)
//    from ldmatrix fragments (ldmatrix.trans for the "kn" B tile), k-tile BK = 32, a STAGES-deep
//    cp.async pipeline (one commit group per k-tile), shared-memory rows padded by 8 halves
//    (16 bytes) so that every ldmatrix phase and cp.async store is conflict-free or nearly so.
//      variant  block tile  warps (MxN)  warp tile  stages  threads  launch bounds
//      l        128 x 256   2 x 4        64 x 64    3       256      (256, 1)
//      m        128 x 128   2 x 2        64 x 64    4       128      (128, 1)
//      s         64 x  64   2 x 2        32 x 32    4       128      (128, 4)
//      su        64 x  64   2 x 2        32 x 32    4       128      (128, 4)
//    grid  = (ceil(m/BM) * ceil(n/BN), 1, 1), tiles visited in groups of 8 tile rows (L2 reuse);
//    block = (threads, 1, 1);
//    dynamic smem = STAGES * 2 * (BM * 40 + (nk ? BN * 40 : 32 * (BN + 8))) bytes:
//      l: nk 92160, kn 81408;  m: nk 81920, kn 75776;  s/su: nk 40960, kn 38912.
//    Preconditions: l, m, s (16-byte cp.async) need A and B 16-byte aligned and lda, ldb
//    multiples of 8 elements; every 16-byte chunk that crosses the matrix edge is read with a
//    cp.async src-size of the valid bytes (the rest zero-filled), chunks outside the matrix are
//    not read at all (src-size 0, source clamped to the matrix base). Full k-tiles use row
//    pointers computed once per block; the last, partial k-tile is bounds-checked per chunk. su has no alignment precondition (element loads, bounds-checked, staged
//    through registers into the same pipeline). C needs only 4-byte alignment: the epilogue
//    stores float2 where C is 8-byte aligned and ldc is even, scalars otherwise; rows >= m and
//    columns >= n are never written.
//
// 2. tessera_gemm_wgmma_DT_L: sm_90a path (compiled to a trapping stub elsewhere; the launcher
//    uses it only when the device is sm_90a). Block tile 128 x 256, k-tile 64, 4 stages, 384
//    threads = 3 warpgroups with warp specialization: warpgroup 0 is the producer (one thread
//    issues the bulk tensor copies cp.async.bulk.tensor.2d, completing on per-stage "full"
//    mbarriers with expect_tx; setmaxnreg.dec to 40), warpgroups 1 and 2 are consumers
//    (setmaxnreg.inc to 232), each computing a 64 x 256 half of the tile with
//    wgmma.mma_async.m64n256k16 (f32 accumulators, 128 registers a thread) from 128-byte
//    swizzled shared memory read through matrix descriptors, and releasing a stage on its
//    "empty" mbarrier once the wgmma group reading it has completed (one group kept in flight).
//    Persistent: grid = (min(tiles, SM count), 1, 1), block = (384, 1, 1), each block walks
//    tiles blockIdx.x, blockIdx.x + gridDim.x, ... in the same grouped order as above.
//    dynamic smem = 4 * (16384 + 32768) + 1024 = 197632 bytes (the extra 1024 aligns the stage
//    buffers to the 1024-byte swizzle atom). Parameters: CUtensorMaps (passed by value as
//    const __grid_constant__) for A (dims {k, m}, box {64, 128}) and B (nk: dims {k, n}, box
//    {64, 256}; kn: dims {n, k}, box {64, 64}, four boxes a stage), 16-bit elements,
//    CU_TENSOR_MAP_SWIZZLE_128B, interleave none, OOB fill none (zeros), so edge tiles in m, n
//    and k are zero-filled by the copy engine. Preconditions: A and B 16-byte aligned, lda and
//    ldb multiples of 8 elements (tensor-map strides are multiples of 16 bytes, < 2^40).
//    Stores as in 1.
//
// 3. tessera_gemm_scale_c(C, m, n, ldc, beta): C = beta * C (C = 0 when beta == 0, C not
//    read), the k == 0 / alpha == 0 case. Grid-stride: any grid, any block size.
#include "common.cuh"

// Dynamic shared memory of every kernel in this file (one extern declaration per translation
// unit; each kernel carves its own layout out of it).
extern __shared__ __align__(16) unsigned char tg_dyn_smem[];

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT_MAX.
TESSERA_DEVICE int tg_cdiv(int a, int b) { return a / b + (a % b != 0); }

TESSERA_DEVICE uint32_t tg_smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Tile (tm, tn) of linear block id `pid` in a grid of tiles_m x tiles_n tiles: column-major
// order inside groups of 8 tile rows, so that the blocks running at the same time share the
// same few A row panels and B column panels in L2.
TESSERA_DEVICE void tg_tile_coords(int pid, int tiles_m, int tiles_n, int& tm, int& tn) {
    const int group_rows = 8;
    const int per_group = group_rows * tiles_n;
    const int group = pid / per_group;
    const int first_m = group * group_rows;
    const int rows = min(tiles_m - first_m, group_rows);
    const int r = pid - group * per_group;
    tm = first_m + r % rows;
    tn = r / rows;
}

// Stores two horizontally adjacent outputs (row, col) and (row, col + 1) of
// C = alpha * acc + beta * C, skipping what lies outside m x n. `pair_ok`: C is 8-byte aligned
// and ldc is even, so (row, col) with even col is a float2.
TESSERA_DEVICE void tg_store_pair(float* __restrict__ C, long long ldc, int m, int n, int row, int col,
                                  float x0, float x1, float alpha, float beta, bool pair_ok) {
    if (row >= m || col >= n) return;
    float* p = C + (long long)row * ldc + col;
    const bool both = col + 1 < n;
    if (both && pair_ok) {
        float2 o;
        if (beta != 0.0f) {
            const float2 old = *reinterpret_cast<const float2*>(p);
            o.x = fmaf(alpha, x0, beta * old.x);
            o.y = fmaf(alpha, x1, beta * old.y);
        } else {
            o.x = alpha * x0;
            o.y = alpha * x1;
        }
        *reinterpret_cast<float2*>(p) = o;
    } else {
        p[0] = beta != 0.0f ? fmaf(alpha, x0, beta * p[0]) : alpha * x0;
        if (both) p[1] = beta != 0.0f ? fmaf(alpha, x1, beta * p[1]) : alpha * x1;
    }
}

TESSERA_DEVICE bool tg_pair_ok(const float* C, long long ldc) {
    return (reinterpret_cast<unsigned long long>(C) & 7ull) == 0 && (ldc & 1) == 0;
}

// ---------------------------------------------------------------------------------------------
// sm_80+ : mma.sync path

TESSERA_DEVICE void tg_cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}

TESSERA_DEVICE void tg_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
TESSERA_DEVICE void tg_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

TESSERA_DEVICE void tg_st_shared_v4(uint32_t dst, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
}

TESSERA_DEVICE void tg_ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

TESSERA_DEVICE void tg_ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a * b for one m16n8k16 tile: a = four .b32 registers (row-major 16 x 16 A fragment),
// b0/b1 = the two .b32 registers of the 16 x 8 ("col") B fragment.
template <bool BF16>
TESSERA_DEVICE void tg_mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (BF16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// One 16-byte (8-element) chunk of a row-major rows x cols matrix (leading dimension ld) at
// (row, col), col a multiple of 8, into shared memory at dst; elements outside the matrix are
// zero. VEC: cp.async with src-size = the valid bytes (needs base and ld 16-byte aligned);
// otherwise bounds-checked 2-byte loads and one 16-byte shared store.
template <bool VEC>
TESSERA_DEVICE void tg_load_chunk(uint32_t dst, const uint16_t* __restrict__ base, int row, int col, int rows,
                                  int cols, long long ld) {
    const int valid = row < rows ? min(max(cols - col, 0), 8) : 0;
    if constexpr (VEC) {
        const uint16_t* src = valid > 0 ? base + (long long)row * ld + col : base;
        tg_cp_async16(dst, src, valid * 2);
    } else {
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        if (valid > 0) {
            const uint16_t* src = base + (long long)row * ld + col;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                if (e < valid) w[e >> 1] |= static_cast<uint32_t>(src[e]) << ((e & 1) * 16);
            }
        }
        tg_st_shared_v4(dst, w[0], w[1], w[2], w[3]);
    }
}

// The mma.sync GEMM body; see the header comment for the variants.
template <bool BF16, bool B_NK, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool VEC>
TESSERA_DEVICE void tg_mma_gemm(const uint16_t* __restrict__ A, const uint16_t* __restrict__ B,
                                float* __restrict__ C, int m, int n, int k, long long lda, long long ldb,
                                long long ldc, float alpha, float beta) {
    constexpr int BK = 32;
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int WTM = BM / WARPS_M;
    constexpr int WTN = BN / WARPS_N;
    constexpr int MT = WTM / 16;  // m16 tiles per warp
    constexpr int NT = WTN / 8;   // n8 tiles per warp
    static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0, "warp tile");
    // Shared-memory layout in halves: [STAGES][BM][A_LD] then [STAGES][B_ROWS][B_LD].
    constexpr int A_LD = BK + 8;
    constexpr int B_ROWS = B_NK ? BN : BK;
    constexpr int B_LD = B_NK ? BK + 8 : BN + 8;
    constexpr int A_STAGE = BM * A_LD;
    constexpr int B_STAGE = B_ROWS * B_LD;
    constexpr int A_CHUNKS = BM * (BK / 8);
    constexpr int B_CHUNKS = B_NK ? BN * (BK / 8) : BK * (BN / 8);
    static_assert(A_CHUNKS % THREADS == 0 && B_CHUNKS % THREADS == 0, "loader split");

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm0 = (warp / WARPS_N) * WTM;
    const int wn0 = (warp % WARPS_N) * WTN;

    const int tiles_m = tg_cdiv(m, BM);
    const int tiles_n = tg_cdiv(n, BN);
    int tm, tn;
    tg_tile_coords(blockIdx.x, tiles_m, tiles_n, tm, tn);
    const int m0 = tm * BM;
    const int n0 = tn * BN;
    const int ktiles = tg_cdiv(k, BK);

    const uint32_t a_smem = tg_smem_u32(tg_dyn_smem);
    const uint32_t b_smem = a_smem + STAGES * A_STAGE * 2;

    // This thread's chunks: chunk i of a tile is row r0 + i * RS, columns c8 .. c8 + 7 (the
    // loader split keeps the column fixed), stored at dst0 + i * RS rows in the stage.
    constexpr int A_ITERS = A_CHUNKS / THREADS;
    constexpr int B_ITERS = B_CHUNKS / THREADS;
    constexpr int A_RS = THREADS / (BK / 8);
    constexpr int B_RS = B_NK ? THREADS / (BK / 8) : THREADS / (BN / 8);
    static_assert(THREADS % (BK / 8) == 0 && THREADS % (BN / 8) == 0, "loader rows");
    const int a_r0 = tid / (BK / 8);
    const int a_c8 = (tid % (BK / 8)) * 8;
    const int b_r0 = B_NK ? tid / (BK / 8) : tid / (BN / 8);
    const int b_c8 = B_NK ? (tid % (BK / 8)) * 8 : (tid % (BN / 8)) * 8;
    const uint32_t a_dst0 = (a_r0 * A_LD + a_c8) * 2;
    const uint32_t b_dst0 = (b_r0 * B_LD + b_c8) * 2;

    // Full k-tiles (k0 + 32 <= k) of the 16-byte variants take precomputed row pointers: a
    // chunk is then either wholly inside the matrix or (a row past m / n, or for kn columns
    // past n) read with src-size 0 from the matrix base. The last, partial k-tile and the
    // element-load variant go through the bounds-checked tg_load_chunk.
    const int kfull = k / BK;
    const uint16_t* a_row[A_ITERS];
    bool a_in[A_ITERS];
    const uint16_t* b_row[B_ITERS];
    bool b_in[B_ITERS];
    int b_bytes = 16;
    if constexpr (VEC) {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int row = m0 + a_r0 + i * A_RS;
            a_in[i] = row < m;
            a_row[i] = a_in[i] ? A + (long long)row * lda + a_c8 : A;
        }
        if constexpr (B_NK) {
#pragma unroll
            for (int i = 0; i < B_ITERS; ++i) {
                const int row = n0 + b_r0 + i * B_RS;
                b_in[i] = row < n;
                b_row[i] = b_in[i] ? B + (long long)row * ldb + b_c8 : B;
            }
        } else {
            b_bytes = min(max(n - (n0 + b_c8), 0), 8) * 2;
#pragma unroll
            for (int i = 0; i < B_ITERS; ++i) {
                b_in[i] = b_bytes > 0;
                b_row[i] = b_in[i] ? B + (long long)(b_r0 + i * B_RS) * ldb + n0 + b_c8 : B;
            }
        }
    }

    auto load_tile = [&](int stage, int kt) {
        const int k0 = kt * BK;
        const uint32_t a_st = a_smem + stage * A_STAGE * 2 + a_dst0;
        const uint32_t b_st = b_smem + stage * B_STAGE * 2 + b_dst0;
        if (VEC && kt < kfull) {
#pragma unroll
            for (int i = 0; i < A_ITERS; ++i) {
                tg_cp_async16(a_st + i * A_RS * A_LD * 2, a_in[i] ? a_row[i] + k0 : A, a_in[i] ? 16 : 0);
            }
            const long long b_off = B_NK ? (long long)k0 : (long long)k0 * ldb;
#pragma unroll
            for (int i = 0; i < B_ITERS; ++i) {
                tg_cp_async16(b_st + i * B_RS * B_LD * 2, b_in[i] ? b_row[i] + b_off : B, b_in[i] ? b_bytes : 0);
            }
        } else {
#pragma unroll
            for (int i = 0; i < A_ITERS; ++i) {
                tg_load_chunk<VEC>(a_st + i * A_RS * A_LD * 2, A, m0 + a_r0 + i * A_RS, k0 + a_c8, m, k, lda);
            }
#pragma unroll
            for (int i = 0; i < B_ITERS; ++i) {
                if constexpr (B_NK) {
                    tg_load_chunk<VEC>(b_st + i * B_RS * B_LD * 2, B, n0 + b_r0 + i * B_RS, k0 + b_c8, n, k, ldb);
                } else {
                    tg_load_chunk<VEC>(b_st + i * B_RS * B_LD * 2, B, k0 + b_r0 + i * B_RS, n0 + b_c8, k, n, ldb);
                }
            }
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // Per-lane ldmatrix offsets (halves) inside one stage.
    // A (x4): lanes 0-15 rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8 -> a0..a3.
    const int a_lane = (wm0 + (lane & 15)) * A_LD + (lane >> 4) * 8;
    // B nk (x4, [n][k]): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
    // B kn (x4.trans, [k][n]): matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
    const int b_lane = B_NK ? (wn0 + (lane & 7) + ((lane >> 4) << 3)) * B_LD + ((lane >> 3) & 1) * 8
                            : ((lane & 7) + ((lane >> 3) & 1) * 8) * B_LD + wn0 + ((lane >> 4) << 3);

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_tile(s, s);
        tg_cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; ++kt) {
        // Tile kt has landed (at most STAGES - 2 newer groups pending) for every thread, and
        // every warp is done with the stage the prefetch below overwrites (read at kt - 1).
        tg_cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < ktiles) load_tile(next % STAGES, next);
        tg_cp_async_commit();

        const int stage = kt % STAGES;
        const uint32_t a_base = a_smem + (stage * A_STAGE + a_lane) * 2;
        const uint32_t b_base = b_smem + (stage * B_STAGE + b_lane) * 2;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            uint32_t af[MT][4];
            uint32_t bf[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i) tg_ldmatrix_x4(af[i], a_base + (i * 16 * A_LD + kk * 16) * 2);
#pragma unroll
            for (int j = 0; j < NT / 2; ++j) {
                uint32_t r[4];
                if constexpr (B_NK) {
                    tg_ldmatrix_x4(r, b_base + (j * 16 * B_LD + kk * 16) * 2);
                } else {
                    tg_ldmatrix_x4_trans(r, b_base + (kk * 16 * B_LD + j * 16) * 2);
                }
                bf[2 * j][0] = r[0];
                bf[2 * j][1] = r[1];
                bf[2 * j + 1][0] = r[2];
                bf[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) tg_mma_16816<BF16>(acc[i][j], af[i], bf[j][0], bf[j][1]);
        }
    }
    tg_cp_async_wait<0>();

    // Epilogue: c0,c1 at (g, 2c), (g, 2c+1); c2,c3 at (g+8, ...), g = lane/4, c = lane%4.
    const bool pair_ok = tg_pair_ok(C, ldc);
    const int g = lane >> 2;
    const int c2 = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int row = m0 + wm0 + i * 16 + g;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int col = n0 + wn0 + j * 8 + c2;
            tg_store_pair(C, ldc, m, n, row, col, acc[i][j][0], acc[i][j][1], alpha, beta, pair_ok);
            tg_store_pair(C, ldc, m, n, row + 8, col, acc[i][j][2], acc[i][j][3], alpha, beta, pair_ok);
        }
    }
}

#define TG_MMA_KERNEL(NAME, BF16, NK, BM, BN, WM, WN, STAGES, VEC, MINB)                                  \
    extern "C" __global__ void __launch_bounds__((WM) * (WN) * 32, MINB)                                  \
        NAME(const uint16_t* __restrict__ A, const uint16_t* __restrict__ B, float* __restrict__ C, int m, \
             int n, int k, long long lda, long long ldb, long long ldc, float alpha, float beta) {          \
        tg_mma_gemm<BF16, NK, BM, BN, WM, WN, STAGES, VEC>(A, B, C, m, n, k, lda, ldb, ldc, alpha, beta); \
    }

#define TG_MMA_FAMILY(DT, BF16, L, NK)                                                   \
    TG_MMA_KERNEL(tessera_gemm_mma_##DT##_##L##_l, BF16, NK, 128, 256, 2, 4, 3, true, 1)  \
    TG_MMA_KERNEL(tessera_gemm_mma_##DT##_##L##_m, BF16, NK, 128, 128, 2, 2, 4, true, 1)  \
    TG_MMA_KERNEL(tessera_gemm_mma_##DT##_##L##_s, BF16, NK, 64, 64, 2, 2, 4, true, 4)    \
    TG_MMA_KERNEL(tessera_gemm_mma_##DT##_##L##_su, BF16, NK, 64, 64, 2, 2, 4, false, 4)

TG_MMA_FAMILY(f16, false, nk, true)
TG_MMA_FAMILY(f16, false, kn, false)
TG_MMA_FAMILY(bf16, true, nk, true)
TG_MMA_FAMILY(bf16, true, kn, false)

// C = beta * C over m x n (leading dimension ldc); beta == 0 writes zeros without reading C.
extern "C" __global__ void tessera_gemm_scale_c(float* __restrict__ C, int m, int n, long long ldc, float beta) {
    const long long total = (long long)m * n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long r = i / n;
        const long long c = i - r * n;
        float* p = C + r * ldc + c;
        *p = beta != 0.0f ? beta * *p : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// sm_90a : wgmma path

// CUDA's CUtensorMap (cuda.h, which NVRTC does not see): 128 opaque bytes, 64-byte aligned,
// encoded on the host by cuTensorMapEncodeTiled and passed by value.
struct alignas(64) TesseraTensorMap {
    unsigned long long opaque[16];
};

#if defined(TESSERA_SM90A)

// The 128 accumulator operands of wgmma m64n256k16 (f32 D): "%0" ... "%127" and d[0..127].
#define TG_WGMMA_D_REGS \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

#define TG_WGMMA_D_OPERANDS(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
    "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
    "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
    "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
    "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
    "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
    "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
    "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
    "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])


namespace tg90 {
constexpr int BM = 128;                  // block tile rows (two consumer warpgroups x 64)
constexpr int BN = 256;                  // block tile columns (one m64n256 wgmma per k16)
constexpr int BK = 64;                   // k-tile: one 128-byte swizzled row of 16-bit elements
constexpr int STAGES = 4;
constexpr int A_BYTES = BM * BK * 2;     // 16384
constexpr int B_BYTES = BN * BK * 2;     // 32768
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
constexpr int KN_BOX_BYTES = 64 * BK * 2;  // one {64 n, 64 k} box of the kn B tile: 8192
constexpr int CONSUMER_THREADS = 256;
}  // namespace tg90

TESSERA_DEVICE void tg_mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

TESSERA_DEVICE void tg_mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

TESSERA_DEVICE void tg_mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Waits until the phase of parity `parity` of the barrier has completed.
TESSERA_DEVICE void tg_mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "TG_MBAR_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra TG_MBAR_WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// 2-D bulk tensor copy of the box at element coordinates (c0 = inner, c1 = outer) into shared
// memory at dst, completing `bar`'s transaction count.
TESSERA_DEVICE void tg_tma_load_2d(uint32_t dst, const TesseraTensorMap* map, uint32_t bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

TESSERA_DEVICE void tg_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
TESSERA_DEVICE void tg_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
TESSERA_DEVICE void tg_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses of the accumulators across the asynchronous wgmma
// region boundaries (the registers are written by the tensor cores until wgmma.wait_group).
TESSERA_DEVICE void tg_fence_acc(float (&d)[128]) {
#pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (mode 1 in bits 62-63), base offset 0 (the
// swizzle atoms start on 1024-byte boundaries). Addresses and offsets in bytes, encoded >> 4.
//  K-major (A, and B of the nk layout): rows of 64 k (128 bytes), 8-row groups 1024 bytes
//    apart (stride byte offset); the leading byte offset is unused for swizzled K-major (1).
//  MN-major (B of the kn layout): rows of 64 n (128 bytes) per k, 8-k groups 1024 bytes apart
//    (stride byte offset), consecutive 64-column blocks of n 8192 bytes apart (leading byte
//    offset: the {64 n, 64 k} tensor-copy boxes are stored one after another).
TESSERA_DEVICE unsigned long long tg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return static_cast<unsigned long long>((addr & 0x3FFFF) >> 4) |
           (static_cast<unsigned long long>((lbo & 0x3FFFF) >> 4) << 16) |
           (static_cast<unsigned long long>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// d (64 x 256, f32) += A (64 x 16, K-major smem) * B (16 x 256, smem; K-major when TRANS_B == 0,
// N-major when 1), one warpgroup.
template <bool BF16, int TRANS_B>
TESSERA_DEVICE void tg_wgmma_m64n256k16(float (&d)[128], unsigned long long desc_a, unsigned long long desc_b) {
    const int scale_d = 1;
    if constexpr (BF16) {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "setp.ne.b32 p, %130, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" TG_WGMMA_D_REGS
            "}, %128, %129, p, 1, 1, 0, %131;\n"
            "}\n"
            : TG_WGMMA_D_OPERANDS(d)
            : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));
    } else {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "setp.ne.b32 p, %130, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {" TG_WGMMA_D_REGS
            "}, %128, %129, p, 1, 1, 0, %131;\n"
            "}\n"
            : TG_WGMMA_D_OPERANDS(d)
            : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));
    }
}

template <bool BF16, bool B_NK>
TESSERA_DEVICE void tg_wgmma_gemm(const TesseraTensorMap* tmap_a, const TesseraTensorMap* tmap_b,
                                  float* __restrict__ C, int m, int n, int k, long long ldc, float alpha,
                                  float beta) {
    using namespace tg90;
    __shared__ __align__(8) unsigned long long full_bar[STAGES];
    __shared__ __align__(8) unsigned long long empty_bar[STAGES];

    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const uint32_t smem = (tg_smem_u32(tg_dyn_smem) + 1023u) & ~1023u;
    const int tiles_m = tg_cdiv(m, BM);
    const int tiles_n = tg_cdiv(n, BN);
    const int num_tiles = tiles_m * tiles_n;
    const int ktiles = tg_cdiv(k, BK);

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            tg_mbar_init(tg_smem_u32(&full_bar[s]), 1);
            tg_mbar_init(tg_smem_u32(&empty_bar[s]), CONSUMER_THREADS);
        }
        // Make the initialized barriers visible to the other threads and the async proxy.
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer warpgroup: one thread streams the k-tiles of every tile of this block.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (tid == 0) {
            int it = 0;
            for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
                int tm, tn;
                tg_tile_coords(tile, tiles_m, tiles_n, tm, tn);
                const int m0 = tm * BM;
                const int n0 = tn * BN;
                // kn: boxes of 64 columns that start at or past n are not copied (their stale
                // shared-memory columns only reach outputs >= n, which are never stored).
                const int kn_boxes = min(4, tg_cdiv(n - n0, 64));
                const uint32_t bytes = B_NK ? STAGE_BYTES : A_BYTES + kn_boxes * KN_BOX_BYTES;
                for (int kt = 0; kt < ktiles; ++kt, ++it) {
                    const int s = it % STAGES;
                    const uint32_t parity = (it / STAGES) & 1;
                    const uint32_t full = tg_smem_u32(&full_bar[s]);
                    // First round: waiting on parity 1 of a fresh barrier returns at once.
                    tg_mbar_wait(tg_smem_u32(&empty_bar[s]), parity ^ 1);
                    tg_mbar_expect_tx(full, bytes);
                    const uint32_t sa = smem + s * STAGE_BYTES;
                    const uint32_t sb = sa + A_BYTES;
                    tg_tma_load_2d(sa, tmap_a, full, kt * BK, m0);
                    if constexpr (B_NK) {
                        tg_tma_load_2d(sb, tmap_b, full, kt * BK, n0);
                    } else {
                        for (int j = 0; j < kn_boxes; ++j) {
                            tg_tma_load_2d(sb + j * KN_BOX_BYTES, tmap_b, full, n0 + 64 * j, kt * BK);
                        }
                    }
                }
            }
        }
    } else {
        // Consumer warpgroups 1 and 2: rows 64 * (wg - 1) .. + 63 of each tile.
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        const int cw = wg - 1;
        const int t = tid & 127;
        const int lane = t & 31;
        const int row_in_tile = cw * 64 + (t >> 5) * 16 + (lane >> 2);
        const int c2 = (lane & 3) * 2;
        const bool pair_ok = tg_pair_ok(C, ldc);
        float d[128];
        int it = 0;
        for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
            int tm, tn;
            tg_tile_coords(tile, tiles_m, tiles_n, tm, tn);
            const int m0 = tm * BM;
            const int n0 = tn * BN;
#pragma unroll
            for (int i = 0; i < 128; ++i) d[i] = 0.0f;
            tg_fence_acc(d);
            int prev = -1;
            for (int kt = 0; kt < ktiles; ++kt, ++it) {
                const int s = it % STAGES;
                tg_mbar_wait(tg_smem_u32(&full_bar[s]), (it / STAGES) & 1);
                const uint32_t sa = smem + s * STAGE_BYTES + cw * (64 * 128);
                const uint32_t sb = smem + s * STAGE_BYTES + A_BYTES;
                tg_wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {
                    const unsigned long long da = tg_desc(sa + kk * 32, 16, 1024);
                    if constexpr (B_NK) {
                        tg_wgmma_m64n256k16<BF16, 0>(d, da, tg_desc(sb + kk * 32, 16, 1024));
                    } else {
                        tg_wgmma_m64n256k16<BF16, 1>(d, da, tg_desc(sb + kk * 16 * 128, KN_BOX_BYTES, 1024));
                    }
                }
                tg_wgmma_commit();
                // Keep this k-tile's group in flight; the previous one has finished reading
                // its stage, which goes back to the producer.
                tg_wgmma_wait<1>();
                if (prev >= 0) tg_mbar_arrive(tg_smem_u32(&empty_bar[prev]));
                prev = s;
            }
            tg_wgmma_wait<0>();
            tg_fence_acc(d);
            if (prev >= 0) tg_mbar_arrive(tg_smem_u32(&empty_bar[prev]));

            // Accumulator layout of m64nNk16 (per warp: rows 16w..16w+15): d[4j + 0..1] at
            // (g, 8j + 2c + 0..1), d[4j + 2..3] at (g + 8, ...), g = lane / 4, c = lane % 4.
            const int row = m0 + row_in_tile;
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                const int col = n0 + 8 * j + c2;
                tg_store_pair(C, ldc, m, n, row, col, d[4 * j], d[4 * j + 1], alpha, beta, pair_ok);
                tg_store_pair(C, ldc, m, n, row + 8, col, d[4 * j + 2], d[4 * j + 3], alpha, beta, pair_ok);
            }
        }
    }
}

#endif  // TESSERA_SM90A

#if defined(TESSERA_SM90A)
#define TG_WGMMA_BODY(BF16, NK) tg_wgmma_gemm<BF16, NK>(&tmap_a, &tmap_b, C, m, n, k, ldc, alpha, beta);
#else
// Not sm_90a: the symbol exists so that every architecture's module has the same kernels, but
// the launcher never selects it here.
#define TG_WGMMA_BODY(BF16, NK) __trap();
#endif

#define TG_WGMMA_KERNEL(NAME, BF16, NK)                                                                    \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                 \
        NAME(const __grid_constant__ TesseraTensorMap tmap_a, const __grid_constant__ TesseraTensorMap tmap_b, \
             float* __restrict__ C, int m, int n, int k, long long ldc, float alpha, float beta) {          \
        TG_WGMMA_BODY(BF16, NK)                                                                          \
    }

TG_WGMMA_KERNEL(tessera_gemm_wgmma_f16_nk, false, true)
TG_WGMMA_KERNEL(tessera_gemm_wgmma_f16_kn, false, false)
TG_WGMMA_KERNEL(tessera_gemm_wgmma_bf16_nk, true, true)
TG_WGMMA_KERNEL(tessera_gemm_wgmma_bf16_kn, true, false)
