// ops.cu: the elementwise and row-wise operations of the BERT / GPT-2 / T5 forward passes:
// layer norm, RMS norm, softmax, L2 normalization (row kernels); activations, gated
// activations, residual add, bias add, scale, narrowing to f16 / bf16 and the f16 hi/lo split
// (elementwise kernels); embedding gather; mean over the rows of each sequence (mean pooling).
// Launched by kernels/cuda/src/ops.rs, which validates every shape, length and leading
// dimension on the host first and must match the launch geometry stated here.
//
// Conventions (every kernel):
// * f32 row-major matrices, each with its own leading dimension `ld` (elements); rows, cols
//   and ld are `int` (the launcher checks they fit), element offsets are 64-bit
//   (`(int64_t)row * ld + col`), so a matrix may span more than 2^31 elements.
// * `vec` (an int flag, uniform per launch): the launcher sets it when every matrix and
//   vector operand starts 16-byte aligned (8-byte for an f16/bf16 table) and every leading
//   dimension is a multiple of 4, so every row starts aligned. A thread then moves whole
//   float4 chunks (columns 4c .. 4c+3); the last, partial chunk of a row (cols % 4 != 0) goes
//   element by element. Without `vec` every access is scalar. Either way only the columns
//   0 .. cols-1 of a row are read or written: the padding between cols and ld is untouched.
// * Arithmetic is IEEE f32 as compiled by NVRTC's defaults (no fast math: IEEE division and
//   square root, denormals kept, expf/erfcf/tanhf of the CUDA math library; the compiler may
//   contract a*b+c into an fma, which only removes a rounding). NaN and infinities propagate
//   as the formulas say; softmax's special rows are as in tessera_core::reference::ops.
//
// Row kernels (layer norm, RMS norm, softmax, L2): each row is reduced by one "row group" of
// G threads: a warp (G = 32) or a whole block (G = blockDim.x). Reductions: each thread sums
// its own elements in order, then a warp butterfly (tessera_warp_sum / tessera_warp_max:
// every lane gets the same bits), then for block groups the per-warp partials through static
// shared memory, summed by every thread in warp order. Deterministic: a row's result depends
// only on the row, the variant and `vec`. Variants, chosen by the launcher from cols:
//   suffix   cols        grid                 block   G     floats cached per thread
//   _w8      <= 256      ceil(rows/4)         128     32    8    (4 rows per block, a warp each)
//   _w32     <= 1024     ceil(rows/4)         128     32    32   (4 rows per block, a warp each)
//   _b128    <= 4096     rows                 128     128  32
//   _b512    <= 16384    rows                 512     512  32
//   _loop    any         rows                 512     512  none (re-reads the row from memory)
// No dynamic shared memory (static: 2 floats per warp of a block group). The cached
// variants read the row once into registers and write it once: thread t of a group holds
// columns 4(t + jG) + e (j < N/4, e < 4) with `vec`, t + kG (k < N) without; slots past
// cols hold a neutral pad (0 for sums, -inf for the softmax max) and are never stored. The
// _loop variant streams the row two or three times (passes below), for any cols.
//   layer_norm (x, ldx, out, ldo, weight, bias, rows, cols, eps, vec), out distinct from x:
//     mu0 = sum(x)/n; s1 = sum(x - mu0), s2 = sum((x - mu0)^2); dm = s1/n;
//     var = max(s2/n - dm*dm, 0) (NaN stays NaN); rstd = 1/sqrt(var + eps);
//     out = fma(((x - mu0) - dm)*rstd, weight, bias)   (the CPU kernel's corrected two-pass).
//   rms_norm (x, ldx, out, ldo, weight, rows, cols, eps, vec): rs = 1/sqrt(sum(x^2)/n + eps);
//     out = (x*rs)*weight.
//   softmax (x, ld, rows, cols, vec), in place: m = max(x); a row holding a NaN or a +inf is
//     all NaN; a row of all -inf is all 0; else out = expf(x - m) * (1/sum(expf(x - m))),
//     -inf entries exactly 0.
//   l2_normalize (x, ld, rows, cols, vec), in place: out = x / max(sqrt(sum(x^2)), 1e-12).
//
// Elementwise kernels and the embedding gather: a 2-D grid over (column chunks, rows).
//   block (bx, by), bx * by = 256, bx = a power of two in 32..256 covering the chunks of a
//   row (chunks = ceil(cols/4) with vec, cols without), by = 256/bx rows per block;
//   grid (ceil(chunks/bx), min(ceil(rows/by), 65535)); thread (tx, ty) of block (X, Y) takes
//   chunk X*bx + tx (returns if past the row) of rows Y*by + ty, stepping gridDim.y*by.
//   The launcher may pass a matrix whose every operand is contiguous (ld == cols) as one row
//   of rows*cols elements (not add_bias, whose bias is indexed by column).
//   ops_act_{relu,gelu_erf,gelu_tanh,tanh} (x, ld, rows, cols, vec), in place: x = act(x).
//   ops_gated_{relu,gelu_erf,gelu_tanh,tanh} (gate, ldg, up, ldu, out, ldo, rows, cols, vec):
//     out = act(gate) * up; out distinct from gate and up (gate and up may overlap).
//   ops_add (x, ldx, y, ldy, rows, cols, vec): x += y (y distinct from x).
//   ops_add_bias (x, ld, bias, rows, cols, vec): x[r, c] += bias[c].
//   ops_scale (x, ld, rows, cols, factor, vec): x *= factor.
//   ops_embedding_{f32,f16,bf16} (table, ldt, vocab, ids, n, cols, out, ldo, vec): out row i
//     = table row ids[i] widened to f32 (exact); "rows" are the n ids. The launcher checked
//     every id < vocab; an id out of range is skipped (its row not written), never read.
//   ops_narrow_{f16,bf16} (x, ldx, out, ldo, rows, cols, vec): out (2-byte elements) = x
//     rounded to nearest even (__float2half_rn / __float2bfloat16_rn: f16 overflow gives
//     +-inf, subnormals kept); a NaN becomes half::f16/bf16::from_f32's NaN (sign and leading
//     payload bits kept, quiet bit set) rather than cvt's canonical 0x7fff, so the result is
//     bit-identical to the half crate's. With vec (x 16-byte, out 8-byte aligned, both ld
//     multiples of 4) a chunk is one float4 load and one 8-byte store of 4 packed values.
//   ops_split_f16 (x, ldx, hi, lo, ldo, rows, cols, vec): x as two f16 terms for a
//     higher-precision product on f16 tensor cores: hi = x narrowed as ops_narrow_f16 does,
//     lo = (x - hi)*2048 narrowed the same way (x - hi and the scaling are exact in f32), so
//     x = hi + lo/2048 to about 2^-22 relative (|x| < 65520; beyond, hi is +-inf and lo NaN or
//     inf). hi and lo are distinct buffers with the same leading dimension ldo; vec as for
//     narrow (x 16-byte, hi and lo 8-byte aligned, ldx and ldo multiples of 4).
//   Activations: relu = x < 0 ? 0 : x; gelu_erf = (0.5x)*erfcf(-x*(1/sqrt2)) (the exact GELU
//   in a form without cancellation for negative x); gelu_tanh = x * __frcp_rn(1 + expf(-2y)),
//   y = sqrt(2/pi)*(x + 0.044715x^3) (= 0.5x(1 + tanh y); expf overflowing to inf gives x*0);
//   tanh = tanhf.
//
// Mean pooling: ops_mean_rows (x, ldx, seq, lengths, batch, cols, out, ldo): x is
//   [batch*seq, cols], out [batch, cols] (distinct from x), lengths `batch` u32 in 1..=seq
//   (checked by the launcher; a sequence with another length is skipped, never read);
//   out[b, c] = (sum over r < lengths[b] of x[b*seq + r, c], in row order in f32) / (float)
//   lengths[b] (one IEEE division). One thread per (b, c), scalar accesses (a warp reads 32
//   consecutive columns of a row): block 256 threads, grid (ceil(cols/256),
//   min(batch, 65535)); thread t of block (X, Y) takes column X*256 + t (returns if past
//   cols) of sequences Y, Y + gridDim.y, ...
#include "common.cuh"

#define OPS_L2_NORM_MIN 1e-12f

// ---------------------------------------------------------------------------------------
// Row-group reductions. G = 32: the calling warp; G > 32: the whole block (G = blockDim.x,
// every thread calls). `red` is static shared memory of at least 2*G/32 floats; the block
// versions synchronize before returning, so it may be reused at once.

template <int G>
TESSERA_DEVICE float ops_group_sum(float v, float* red) {
    v = tessera_warp_sum(v);
    if constexpr (G == 32) {
        return v;
    } else {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) red[warp] = v;
        __syncthreads();
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < G / 32; ++w) s += red[w];
        __syncthreads();
        return s;
    }
}

// Two sums at once (one barrier pair).
template <int G>
TESSERA_DEVICE void ops_group_sum2(float& a, float& b, float* red) {
    a = tessera_warp_sum(a);
    b = tessera_warp_sum(b);
    if constexpr (G > 32) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) {
            red[warp] = a;
            red[G / 32 + warp] = b;
        }
        __syncthreads();
        float sa = 0.0f, sb = 0.0f;
#pragma unroll
        for (int w = 0; w < G / 32; ++w) {
            sa += red[w];
            sb += red[G / 32 + w];
        }
        __syncthreads();
        a = sa;
        b = sb;
    }
}

template <int G>
TESSERA_DEVICE float ops_group_max(float v, float* red) {
    v = tessera_warp_max(v);
    if constexpr (G == 32) {
        return v;
    } else {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) red[warp] = v;
        __syncthreads();
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < G / 32; ++w) m = fmaxf(m, red[w]);
        __syncthreads();
        return m;
    }
}

template <int G>
TESSERA_DEVICE bool ops_group_any(bool p) {
    if constexpr (G == 32) {
        return __any_sync(0xffffffffu, p) != 0;
    } else {
        return __syncthreads_or(p ? 1 : 0) != 0;
    }
}

// The thread's index t in its row group and the group's row.
template <int G, int RPB>
TESSERA_DEVICE void ops_group_index(int& t, int& row) {
    if constexpr (G == 32) {
        t = threadIdx.x & 31;
        row = blockIdx.x * RPB + (threadIdx.x >> 5);
    } else {
        t = threadIdx.x;
        row = blockIdx.x;
    }
}

TESSERA_DEVICE bool ops_is_nan(float v) { return v != v; }

// ---------------------------------------------------------------------------------------
// Row cache: N floats per thread (N a multiple of 4, N*G >= cols).

// The column held in slot k by thread t.
template <int G>
TESSERA_DEVICE int ops_slot_col(int k, int t, bool vec) {
    return vec ? 4 * (t + (k >> 2) * G) + (k & 3) : t + k * G;
}

template <int G, int N>
TESSERA_DEVICE void ops_load_row(float (&v)[N], const float* row, int cols, int t, bool vec,
                                 float pad) {
    if (vec) {
#pragma unroll
        for (int j = 0; j < N / 4; ++j) {
            const int c = 4 * (t + j * G);
            if (c + 4 <= cols) {
                const float4 q = *reinterpret_cast<const float4*>(row + c);
                v[4 * j] = q.x;
                v[4 * j + 1] = q.y;
                v[4 * j + 2] = q.z;
                v[4 * j + 3] = q.w;
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) v[4 * j + e] = c + e < cols ? row[c + e] : pad;
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const int c = t + k * G;
            v[k] = c < cols ? row[c] : pad;
        }
    }
}

// out[c] = f(v, weight[c], bias[c]) for every column c < cols the thread holds (weight / bias
// read only when W / B; 0 is passed otherwise).
template <int G, int N, bool W, bool B, class F>
TESSERA_DEVICE void ops_store_row(const float (&v)[N], float* out, const float* w,
                                  const float* b, int cols, int t, bool vec, F f) {
    if (vec) {
#pragma unroll
        for (int j = 0; j < N / 4; ++j) {
            const int c = 4 * (t + j * G);
            if (c + 4 <= cols) {
                float4 wq = make_float4(0.0f, 0.0f, 0.0f, 0.0f), bq = wq;
                if (W) wq = *reinterpret_cast<const float4*>(w + c);
                if (B) bq = *reinterpret_cast<const float4*>(b + c);
                float4 o;
                o.x = f(v[4 * j], wq.x, bq.x);
                o.y = f(v[4 * j + 1], wq.y, bq.y);
                o.z = f(v[4 * j + 2], wq.z, bq.z);
                o.w = f(v[4 * j + 3], wq.w, bq.w);
                *reinterpret_cast<float4*>(out + c) = o;
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (c + e < cols) {
                        out[c + e] = f(v[4 * j + e], W ? w[c + e] : 0.0f, B ? b[c + e] : 0.0f);
                    }
                }
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const int c = t + k * G;
            if (c < cols) out[c] = f(v[k], W ? w[c] : 0.0f, B ? b[c] : 0.0f);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Streaming (no cache): thread t of a G-thread group visits its columns of a row.

// f(x) for every column of the row the thread covers, in column order.
template <int G, class F>
TESSERA_DEVICE void ops_for_each(const float* row, int cols, int t, bool vec, F f) {
    if (vec) {
        for (int64_t c = 4 * (int64_t)t; c < cols; c += 4 * G) {
            if (c + 4 <= cols) {
                const float4 q = *reinterpret_cast<const float4*>(row + c);
                f(q.x);
                f(q.y);
                f(q.z);
                f(q.w);
            } else {
                for (int64_t e = c; e < cols; ++e) f(row[e]);
            }
        }
    } else {
        for (int64_t c = t; c < cols; c += G) f(row[c]);
    }
}

// out[c] = f(in[c], weight[c], bias[c]) for every column the thread covers (in may be out:
// each element is read before it is written, by the same thread).
template <int G, bool W, bool B, class F>
TESSERA_DEVICE void ops_map_row(const float* in, float* out, const float* w, const float* b,
                                int cols, int t, bool vec, F f) {
    if (vec) {
        for (int64_t c = 4 * (int64_t)t; c < cols; c += 4 * G) {
            if (c + 4 <= cols) {
                const float4 q = *reinterpret_cast<const float4*>(in + c);
                float4 wq = make_float4(0.0f, 0.0f, 0.0f, 0.0f), bq = wq;
                if (W) wq = *reinterpret_cast<const float4*>(w + c);
                if (B) bq = *reinterpret_cast<const float4*>(b + c);
                float4 o;
                o.x = f(q.x, wq.x, bq.x);
                o.y = f(q.y, wq.y, bq.y);
                o.z = f(q.z, wq.z, bq.z);
                o.w = f(q.w, wq.w, bq.w);
                *reinterpret_cast<float4*>(out + c) = o;
            } else {
                for (int64_t e = c; e < cols; ++e) {
                    out[e] = f(in[e], W ? w[e] : 0.0f, B ? b[e] : 0.0f);
                }
            }
        }
    } else {
        for (int64_t c = t; c < cols; c += G) {
            out[c] = f(in[c], W ? w[c] : 0.0f, B ? b[c] : 0.0f);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Row operations. N > 0: cached in N floats per thread; N == 0: streaming.

template <int G, int N, int RPB>
TESSERA_DEVICE void ops_layer_norm(const float* __restrict__ x, int ldx, float* __restrict__ out,
                                   int ldo, const float* __restrict__ w,
                                   const float* __restrict__ b, int rows, int cols, float eps,
                                   bool vec) {
    __shared__ float red[2 * (G / 32)];
    int t, row;
    ops_group_index<G, RPB>(t, row);
    if (row >= rows) return;  // uniform over the group
    const float* xr = x + (int64_t)row * ldx;
    float* orow = out + (int64_t)row * ldo;
    const float n = (float)cols;
    if constexpr (N > 0) {
        float v[N];
        ops_load_row<G, N>(v, xr, cols, t, vec, 0.0f);
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < N; ++k) s += v[k];
        const float mean0 = ops_group_sum<G>(s, red) / n;
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            if (ops_slot_col<G>(k, t, vec) < cols) {
                const float d = v[k] - mean0;
                s1 += d;
                s2 = fmaf(d, d, s2);
            }
        }
        ops_group_sum2<G>(s1, s2, red);
        const float dm = s1 / n;
        float var = s2 / n - dm * dm;
        var = var < 0.0f ? 0.0f : var;  // rounding may take a zero variance below 0
        const float rstd = 1.0f / sqrtf(var + eps);
        ops_store_row<G, N, true, true>(v, orow, w, b, cols, t, vec,
                                        [=](float xv, float wv, float bv) {
                                            return fmaf(((xv - mean0) - dm) * rstd, wv, bv);
                                        });
    } else {
        float s = 0.0f;
        ops_for_each<G>(xr, cols, t, vec, [&](float xv) { s += xv; });
        const float mean0 = ops_group_sum<G>(s, red) / n;
        float s1 = 0.0f, s2 = 0.0f;
        ops_for_each<G>(xr, cols, t, vec, [&](float xv) {
            const float d = xv - mean0;
            s1 += d;
            s2 = fmaf(d, d, s2);
        });
        ops_group_sum2<G>(s1, s2, red);
        const float dm = s1 / n;
        float var = s2 / n - dm * dm;
        var = var < 0.0f ? 0.0f : var;
        const float rstd = 1.0f / sqrtf(var + eps);
        ops_map_row<G, true, true>(xr, orow, w, b, cols, t, vec,
                                   [=](float xv, float wv, float bv) {
                                       return fmaf(((xv - mean0) - dm) * rstd, wv, bv);
                                   });
    }
}

template <int G, int N, int RPB>
TESSERA_DEVICE void ops_rms_norm(const float* __restrict__ x, int ldx, float* __restrict__ out,
                                 int ldo, const float* __restrict__ w, int rows, int cols,
                                 float eps, bool vec) {
    __shared__ float red[2 * (G / 32)];
    int t, row;
    ops_group_index<G, RPB>(t, row);
    if (row >= rows) return;
    const float* xr = x + (int64_t)row * ldx;
    float* orow = out + (int64_t)row * ldo;
    const float n = (float)cols;
    float s = 0.0f;
    if constexpr (N > 0) {
        float v[N];
        ops_load_row<G, N>(v, xr, cols, t, vec, 0.0f);
#pragma unroll
        for (int k = 0; k < N; ++k) s = fmaf(v[k], v[k], s);
        const float rs = 1.0f / sqrtf(ops_group_sum<G>(s, red) / n + eps);
        ops_store_row<G, N, true, false>(v, orow, w, nullptr, cols, t, vec,
                                         [=](float xv, float wv, float) { return (xv * rs) * wv; });
    } else {
        ops_for_each<G>(xr, cols, t, vec, [&](float xv) { s = fmaf(xv, xv, s); });
        const float rs = 1.0f / sqrtf(ops_group_sum<G>(s, red) / n + eps);
        ops_map_row<G, true, false>(xr, orow, w, nullptr, cols, t, vec,
                                    [=](float xv, float wv, float) { return (xv * rs) * wv; });
    }
}

template <int G, int N, int RPB>
TESSERA_DEVICE void ops_l2_normalize(float* x, int ld, int rows, int cols, bool vec) {
    __shared__ float red[2 * (G / 32)];
    int t, row;
    ops_group_index<G, RPB>(t, row);
    if (row >= rows) return;
    float* xr = x + (int64_t)row * ld;
    float s = 0.0f;
    if constexpr (N > 0) {
        float v[N];
        ops_load_row<G, N>(v, xr, cols, t, vec, 0.0f);
#pragma unroll
        for (int k = 0; k < N; ++k) s = fmaf(v[k], v[k], s);
        const float norm = sqrtf(ops_group_sum<G>(s, red));
        const float d = norm < OPS_L2_NORM_MIN ? OPS_L2_NORM_MIN : norm;  // NaN stays NaN
        ops_store_row<G, N, false, false>(v, xr, nullptr, nullptr, cols, t, vec,
                                          [=](float xv, float, float) { return xv / d; });
    } else {
        ops_for_each<G>(xr, cols, t, vec, [&](float xv) { s = fmaf(xv, xv, s); });
        const float norm = sqrtf(ops_group_sum<G>(s, red));
        const float d = norm < OPS_L2_NORM_MIN ? OPS_L2_NORM_MIN : norm;
        ops_map_row<G, false, false>(xr, xr, nullptr, nullptr, cols, t, vec,
                                     [=](float xv, float, float) { return xv / d; });
    }
}

template <int G, int N, int RPB>
TESSERA_DEVICE void ops_softmax(float* x, int ld, int rows, int cols, bool vec) {
    __shared__ float red[2 * (G / 32)];
    int t, row;
    ops_group_index<G, RPB>(t, row);
    if (row >= rows) return;
    float* xr = x + (int64_t)row * ld;
    float m = -INFINITY;
    bool bad = false;  // a NaN or a +inf: the whole row is NaN (inf - inf)
    if constexpr (N > 0) {
        float v[N];
        ops_load_row<G, N>(v, xr, cols, t, vec, -INFINITY);
#pragma unroll
        for (int k = 0; k < N; ++k) {
            m = fmaxf(m, v[k]);
            bad = bad || ops_is_nan(v[k]) || v[k] == INFINITY;
        }
        bad = ops_group_any<G>(bad);
        m = ops_group_max<G>(m, red);
        if (bad || m == -INFINITY) {  // uniform over the group
            const float fill = bad ? __int_as_float(0x7fffffff) : 0.0f;
            ops_store_row<G, N, false, false>(v, xr, nullptr, nullptr, cols, t, vec,
                                              [=](float, float, float) { return fill; });
            return;
        }
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            v[k] = expf(v[k] - m);  // pads and -inf entries: exactly 0
            s += v[k];
        }
        const float inv = 1.0f / ops_group_sum<G>(s, red);  // >= 1: the maximum's own term
        ops_store_row<G, N, false, false>(v, xr, nullptr, nullptr, cols, t, vec,
                                          [=](float e, float, float) { return e * inv; });
    } else {
        ops_for_each<G>(xr, cols, t, vec, [&](float xv) {
            m = fmaxf(m, xv);
            bad = bad || ops_is_nan(xv) || xv == INFINITY;
        });
        bad = ops_group_any<G>(bad);
        m = ops_group_max<G>(m, red);
        if (bad || m == -INFINITY) {
            const float fill = bad ? __int_as_float(0x7fffffff) : 0.0f;
            ops_map_row<G, false, false>(xr, xr, nullptr, nullptr, cols, t, vec,
                                         [=](float, float, float) { return fill; });
            return;
        }
        float s = 0.0f;
        ops_for_each<G>(xr, cols, t, vec, [&](float xv) { s += expf(xv - m); });
        const float inv = 1.0f / ops_group_sum<G>(s, red);
        ops_map_row<G, false, false>(xr, xr, nullptr, nullptr, cols, t, vec,
                                     [=](float xv, float, float) { return expf(xv - m) * inv; });
    }
}

// The extern "C" entry points of the five variants of each row operation.
#define OPS_ROW_VARIANTS(NAME, PARAMS, ARGS)                                                     \
    extern "C" __global__ void __launch_bounds__(128) ops_##NAME##_w8 PARAMS {                   \
        ops_##NAME<32, 8, 4> ARGS;                                                               \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) ops_##NAME##_w32 PARAMS {                  \
        ops_##NAME<32, 32, 4> ARGS;                                                              \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) ops_##NAME##_b128 PARAMS {                 \
        ops_##NAME<128, 32, 1> ARGS;                                                             \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(512) ops_##NAME##_b512 PARAMS {                 \
        ops_##NAME<512, 32, 1> ARGS;                                                             \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(512) ops_##NAME##_loop PARAMS {                 \
        ops_##NAME<512, 0, 1> ARGS;                                                              \
    }

OPS_ROW_VARIANTS(layer_norm,
                 (const float* __restrict__ x, int ldx, float* __restrict__ out, int ldo,
                  const float* __restrict__ weight, const float* __restrict__ bias, int rows,
                  int cols, float eps, int vec),
                 (x, ldx, out, ldo, weight, bias, rows, cols, eps, vec != 0))
OPS_ROW_VARIANTS(rms_norm,
                 (const float* __restrict__ x, int ldx, float* __restrict__ out, int ldo,
                  const float* __restrict__ weight, int rows, int cols, float eps, int vec),
                 (x, ldx, out, ldo, weight, rows, cols, eps, vec != 0))
OPS_ROW_VARIANTS(softmax, (float* x, int ld, int rows, int cols, int vec),
                 (x, ld, rows, cols, vec != 0))
OPS_ROW_VARIANTS(l2_normalize, (float* x, int ld, int rows, int cols, int vec),
                 (x, ld, rows, cols, vec != 0))

// ---------------------------------------------------------------------------------------
// Elementwise kernels: the 2-D mapping of the header.

// The first column of this thread's chunk, and how many columns (0 to 4) it covers.
TESSERA_DEVICE int ops_chunk(int cols, bool vec, int64_t& c) {
    c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * (vec ? 4 : 1);
    if (c >= cols) return 0;
    if (!vec) return 1;
    const int64_t left = cols - c;
    return left < 4 ? (int)left : 4;
}

// out[r, c] = f(a[r, c], bsrc[r, c], bias[c]) over the thread's chunk of every row it takes.
// bsrc is read only when HAS_B, bias only when HAS_BIAS (0 is passed otherwise). `a` may be
// `out` (in place): each element is read before it is written, by the same thread.
template <bool HAS_B, bool HAS_BIAS, class F>
TESSERA_DEVICE void ops_elementwise(const float* a, int lda, const float* bsrc, int ldb,
                                    const float* bias, float* out, int ldo, int rows, int cols,
                                    bool vec, F f) {
    int64_t c;
    const int width = ops_chunk(cols, vec, c);
    if (width == 0) return;
    float bi[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (HAS_BIAS) {
        if (width == 4) {
            const float4 q = *reinterpret_cast<const float4*>(bias + c);
            bi[0] = q.x;
            bi[1] = q.y;
            bi[2] = q.z;
            bi[3] = q.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) bi[e] = e < width ? bias[c + e] : 0.0f;
        }
    }
    const int64_t step = (int64_t)gridDim.y * blockDim.y;
    for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += step) {
        const float* ar = a + r * lda + c;
        const float* br = HAS_B ? bsrc + r * ldb + c : nullptr;
        float* orow = out + r * ldo + c;
        if (width == 4) {
            const float4 av = *reinterpret_cast<const float4*>(ar);
            float4 bv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (HAS_B) bv = *reinterpret_cast<const float4*>(br);
            float4 o;
            o.x = f(av.x, bv.x, bi[0]);
            o.y = f(av.y, bv.y, bi[1]);
            o.z = f(av.z, bv.z, bi[2]);
            o.w = f(av.w, bv.w, bi[3]);
            *reinterpret_cast<float4*>(orow) = o;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (e < width) orow[e] = f(ar[e], HAS_B ? br[e] : 0.0f, bi[e]);
            }
        }
    }
}

// The activations (ids as in the kernel names: relu, gelu_erf, gelu_tanh, tanh).
template <int A>
TESSERA_DEVICE float ops_act(float x) {
    if constexpr (A == 0) {
        return x < 0.0f ? 0.0f : x;  // NaN stays NaN
    } else if constexpr (A == 1) {
        // 0.5x(1 + erf(x/sqrt2)) = 0.5x * erfc(-x/sqrt2); GELU(-inf) = -inf * 0 = NaN.
        return (0.5f * x) * erfcf(x * -0.70710678118654752f);
    } else if constexpr (A == 2) {
        // x * sigmoid(2y) = x * (1/(1 + exp(-2y))), -2y = x*(C1 + C3*x^2): three roundings
        // after expf (the add, the correctly rounded reciprocal, the product).
        const float c1 = -1.5957691216057308f;   // -2 sqrt(2/pi)
        const float c3 = -0.071354816272919f;    // -2 sqrt(2/pi) * 0.044715
        const float arg = x * fmaf(x * x, c3, c1);
        return x * __frcp_rn(1.0f + expf(arg));  // (1 + e) >= 1; rcp(inf) = 0
    } else {
        return tanhf(x);
    }
}

#define OPS_ACT_KERNELS(SUFFIX, A)                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        ops_act_##SUFFIX(float* x, int ld, int rows, int cols, int vec) {                       \
        ops_elementwise<false, false>(x, ld, nullptr, 0, nullptr, x, ld, rows, cols, vec != 0,  \
                                      [](float v, float, float) { return ops_act<A>(v); });     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        ops_gated_##SUFFIX(const float* gate, int ldg, const float* up, int ldu,                \
                           float* __restrict__ out, int ldo, int rows, int cols, int vec) {     \
        ops_elementwise<true, false>(gate, ldg, up, ldu, nullptr, out, ldo, rows, cols,         \
                                     vec != 0,                                                  \
                                     [](float g, float u, float) { return ops_act<A>(g) * u; }); \
    }

OPS_ACT_KERNELS(relu, 0)
OPS_ACT_KERNELS(gelu_erf, 1)
OPS_ACT_KERNELS(gelu_tanh, 2)
OPS_ACT_KERNELS(tanh, 3)

extern "C" __global__ void __launch_bounds__(256)
    ops_add(float* x, int ldx, const float* y, int ldy, int rows, int cols, int vec) {
    ops_elementwise<true, false>(x, ldx, y, ldy, nullptr, x, ldx, rows, cols, vec != 0,
                                 [](float a, float b, float) { return a + b; });
}

extern "C" __global__ void __launch_bounds__(256)
    ops_add_bias(float* x, int ld, const float* bias, int rows, int cols, int vec) {
    ops_elementwise<false, true>(x, ld, nullptr, 0, bias, x, ld, rows, cols, vec != 0,
                                 [](float a, float, float b) { return a + b; });
}

extern "C" __global__ void __launch_bounds__(256)
    ops_scale(float* x, int ld, int rows, int cols, float factor, int vec) {
    ops_elementwise<false, false>(x, ld, nullptr, 0, nullptr, x, ld, rows, cols, vec != 0,
                                  [=](float a, float, float) { return a * factor; });
}

// ---------------------------------------------------------------------------------------
// Embedding gather (same 2-D mapping; the rows are the ids).

TESSERA_DEVICE float ops_widen(float v) { return v; }
TESSERA_DEVICE float ops_widen(__half v) { return __half2float(v); }
TESSERA_DEVICE float ops_widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// Four consecutive elements at p (aligned to 4 elements), widened exactly.
TESSERA_DEVICE float4 ops_load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
TESSERA_DEVICE float4 ops_load4(const __half* p) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    return make_float4(__half2float(__ushort_as_half((unsigned short)(q.x & 0xffffu))),
                       __half2float(__ushort_as_half((unsigned short)(q.x >> 16))),
                       __half2float(__ushort_as_half((unsigned short)(q.y & 0xffffu))),
                       __half2float(__ushort_as_half((unsigned short)(q.y >> 16))));
}
TESSERA_DEVICE float4 ops_load4(const __nv_bfloat16* p) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    return make_float4(__uint_as_float(q.x << 16), __uint_as_float(q.x & 0xffff0000u),
                       __uint_as_float(q.y << 16), __uint_as_float(q.y & 0xffff0000u));
}

template <typename T>
TESSERA_DEVICE void ops_embedding(const T* __restrict__ table, int ldt, int vocab,
                                  const uint32_t* __restrict__ ids, int n, int cols,
                                  float* __restrict__ out, int ldo, bool vec) {
    int64_t c;
    const int width = ops_chunk(cols, vec, c);
    if (width == 0) return;
    const int64_t step = (int64_t)gridDim.y * blockDim.y;
    for (int64_t i = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; i < n; i += step) {
        const uint32_t id = ids[i];
        if (id >= (uint32_t)vocab) continue;  // refused by the launcher; never read
        const T* src = table + (int64_t)id * ldt + c;
        float* dst = out + i * ldo + c;
        if (width == 4) {
            *reinterpret_cast<float4*>(dst) = ops_load4(src);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (e < width) dst[e] = ops_widen(src[e]);
            }
        }
    }
}

#define OPS_EMBEDDING_KERNEL(SUFFIX, T)                                                          \
    extern "C" __global__ void __launch_bounds__(256) ops_embedding_##SUFFIX(                    \
        const T* __restrict__ table, int ldt, int vocab, const uint32_t* __restrict__ ids, int n, \
        int cols, float* __restrict__ out, int ldo, int vec) {                                   \
        ops_embedding<T>(table, ldt, vocab, ids, n, cols, out, ldo, vec != 0);                   \
    }

OPS_EMBEDDING_KERNEL(f32, float)
OPS_EMBEDDING_KERNEL(f16, __half)
OPS_EMBEDDING_KERNEL(bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------
// Narrowing f32 to f16 / bf16 (the elementwise 2-D mapping; out holds 2-byte elements).

// The bits of v rounded to nearest even in T (cvt.rn: overflow to +-inf for f16, subnormals
// kept). A NaN becomes what half::f16::from_f32 / half::bf16::from_f32 give (sign and leading
// payload bits kept, the quiet bit set), not cvt's canonical 0x7fff.
TESSERA_DEVICE uint32_t ops_narrow_bits(float v, const __half*) {
    const uint32_t x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return ((x >> 16) & 0x8000u) | 0x7e00u | ((x >> 13) & 0x3ffu);
    }
    return __half_as_ushort(__float2half_rn(v));
}
TESSERA_DEVICE uint32_t ops_narrow_bits(float v, const __nv_bfloat16*) {
    const uint32_t x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40u;
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

template <typename T>
TESSERA_DEVICE void ops_narrow(const float* __restrict__ x, int ldx, T* __restrict__ out, int ldo,
                               int rows, int cols, bool vec) {
    int64_t c;
    const int width = ops_chunk(cols, vec, c);
    if (width == 0) return;
    const T* tag = nullptr;
    const int64_t step = (int64_t)gridDim.y * blockDim.y;
    for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += step) {
        const float* xr = x + r * ldx + c;
        uint16_t* orow = reinterpret_cast<uint16_t*>(out + r * ldo + c);
        if (width == 4) {
            const float4 v = *reinterpret_cast<const float4*>(xr);
            uint2 q;
            q.x = ops_narrow_bits(v.x, tag) | (ops_narrow_bits(v.y, tag) << 16);
            q.y = ops_narrow_bits(v.z, tag) | (ops_narrow_bits(v.w, tag) << 16);
            *reinterpret_cast<uint2*>(orow) = q;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (e < width) orow[e] = (uint16_t)ops_narrow_bits(xr[e], tag);
            }
        }
    }
}

#define OPS_NARROW_KERNEL(SUFFIX, T)                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        ops_narrow_##SUFFIX(const float* __restrict__ x, int ldx, T* __restrict__ out, int ldo, \
                            int rows, int cols, int vec) {                                    \
        ops_narrow<T>(x, ldx, out, ldo, rows, cols, vec != 0);                                \
    }

OPS_NARROW_KERNEL(f16, __half)
OPS_NARROW_KERNEL(bf16, __nv_bfloat16)

// x split into two f16 terms, x ~ hi + lo/2048 (the same 2-D mapping; hi and lo share ldo).
extern "C" __global__ void __launch_bounds__(256)
    ops_split_f16(const float* __restrict__ x, int ldx, __half* __restrict__ hi,
                  __half* __restrict__ lo, int ldo, int rows, int cols, int vec) {
    int64_t c;
    const int width = ops_chunk(cols, vec != 0, c);
    if (width == 0) return;
    const __half* tag = nullptr;
    const int64_t step = (int64_t)gridDim.y * blockDim.y;
    for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += step) {
        const float* xr = x + r * ldx + c;
        uint16_t* hrow = reinterpret_cast<uint16_t*>(hi + r * ldo + c);
        uint16_t* lrow = reinterpret_cast<uint16_t*>(lo + r * ldo + c);
        float v[4];
        if (width == 4) {
            const float4 q = *reinterpret_cast<const float4*>(xr);
            v[0] = q.x;
            v[1] = q.y;
            v[2] = q.z;
            v[3] = q.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) v[e] = e < width ? xr[e] : 0.0f;
        }
        uint32_t h[4], l[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            h[e] = ops_narrow_bits(v[e], tag);
            // Exact in f32 (hi is v rounded to 11 bits); the scale by 2^11 is exact too.
            const float rest = v[e] - __half2float(__ushort_as_half((unsigned short)h[e]));
            l[e] = ops_narrow_bits(rest * 2048.0f, tag);
        }
        if (width == 4) {
            *reinterpret_cast<uint2*>(hrow) = make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
            *reinterpret_cast<uint2*>(lrow) = make_uint2(l[0] | (l[1] << 16), l[2] | (l[3] << 16));
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (e < width) {
                    hrow[e] = (uint16_t)h[e];
                    lrow[e] = (uint16_t)l[e];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Mean over the first lengths[b] rows of each sequence (BERT mean pooling): one thread per
// (sequence, column), the mapping of the header.

extern "C" __global__ void __launch_bounds__(256)
    ops_mean_rows(const float* __restrict__ x, int ldx, int seq, const uint32_t* __restrict__ lengths,
                  int batch, int cols, float* __restrict__ out, int ldo) {
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
        const uint32_t len = lengths[b];
        if (len == 0 || len > (uint32_t)seq) continue;  // refused by the launcher; never read
        const float* xc = x + b * seq * ldx + c;
        float s = 0.0f;
#pragma unroll 4
        for (int64_t r = 0; r < len; ++r) s += xc[r * ldx];  // in row order
        out[b * ldo + c] = s / (float)len;
    }
}
