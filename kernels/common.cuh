// common.cuh — small device helpers shared by the kernels in this folder.
//
// Included with a relative path (#include "common.cuh"). nvcc finds it beside the including file;
// NVRTC needs the folder on its include path (-I<kernels>), and npgpt.cuda.kernels inlines this text
// into each source before handing it to CuPy, so CuPy's compile cache (which hashes the source string,
// not the headers it includes) can never serve a kernel built against an older copy of this file.
//
// Only what NVRTC provides without system headers is used: no <math.h>, no <cuda_runtime.h>, so no
// INFINITY / FLT_MAX macros (see NPGPT_NEG_INF below).

#pragma once

#define NPGPT_FULL_MASK 0xffffffffu

// -inf as a float without <math.h>: the IEEE-754 bit pattern 0xff800000.
#define NPGPT_NEG_INF (__int_as_float(0xff800000))

// Sum / max over the 32 lanes of a warp (butterfly: every lane ends with the result).
// Every lane of the warp must call these (full mask): never call them under a lane-divergent branch.
__device__ __forceinline__ float npgpt_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(NPGPT_FULL_MASK, v, off);
    return v;
}

__device__ __forceinline__ double npgpt_warp_sum_d(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(NPGPT_FULL_MASK, v, off);
    return v;
}

__device__ __forceinline__ float npgpt_warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(NPGPT_FULL_MASK, v, off));
    return v;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of 32 (<= 1024)
// and every thread of the block must call it (it contains __syncthreads). `scratch` is a
// __shared__ float[32]; it may be reused right after the call returns (the trailing barrier makes
// sure every thread has read the result before anyone writes scratch again).
__device__ __forceinline__ float npgpt_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = npgpt_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = (lane < nwarps) ? scratch[lane] : 0.0f;
    t = npgpt_warp_sum(t);  // every warp reduces the same partials: all threads get the total
    __syncthreads();
    return t;
}

__device__ __forceinline__ double npgpt_block_sum_d(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = npgpt_warp_sum_d(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = (lane < nwarps) ? scratch[lane] : 0.0;
    t = npgpt_warp_sum_d(t);
    __syncthreads();
    return t;
}

// GPT-2's tanh GELU constants (npgpt.layers.gelu.GELU_SCALE = sqrt(2/pi), GELU_CUBIC = 0.044715).
#define NPGPT_GELU_SCALE 0.7978845608028654f
#define NPGPT_GELU_CUBIC 0.044715f
