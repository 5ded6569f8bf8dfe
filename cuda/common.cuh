// common.cuh: what every Tessera kernel source shares. Spliced into each family's source by
// tessera-cuda before NVRTC compiles it (NVRTC sees no file system); nvcc (scripts/cuda-check)
// finds it beside the .cu files.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifdef __CUDACC_RTC__
// NVRTC has no <stdint.h> and no INFINITY.
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#else
#include <stdint.h>
#include <math.h>
#endif

// The Hopper-only code paths (wgmma, setmaxnreg) are compiled only for the sm_90a target.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TESSERA_SM90A 1
#endif

#define TESSERA_DEVICE __device__ __forceinline__

TESSERA_DEVICE int tessera_ceil_div(int a, int b) { return (a + b - 1) / b; }

// Warp-wide reductions (all 32 lanes take part).
TESSERA_DEVICE float tessera_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

TESSERA_DEVICE float tessera_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
