// util.cu: buffer fills (the GPU tests poison every output before a launch, so an element a
// kernel fails to write is caught) and the copy kernel the bench harness calibrates with.
#include "common.cuh"

// dst[i] = pattern for i < n, 32-bit words.
extern "C" __global__ void util_fill_u32(uint32_t* __restrict__ dst, uint64_t n, uint32_t pattern) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride) dst[i] = pattern;
}

// dst[i] = src[i] for n 16-byte vectors, grid-stride; the bench's copy-bandwidth ceiling
// (bytes read + bytes written) beside cuMemcpyDtoD.
extern "C" __global__ void util_copy_v4(const uint4* __restrict__ src, uint4* __restrict__ dst, uint64_t n) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride) dst[i] = src[i];
}
