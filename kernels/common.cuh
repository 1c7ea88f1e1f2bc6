// common.cuh — small device helpers shared by the kernels in this folder.
//
// Included with a relative path (#include "common.cuh"). nvcc finds it beside the including file;
// NVRTC needs the folder on its include path (-I<kernels>), and npgpt.cuda.kernels inlines this text
// into each source before handing it to CuPy, so CuPy's compile cache (which hashes the source string,
// not the headers it includes) can never serve a kernel built against an older copy of this file.
//
// Only what NVRTC provides without system headers is used: no <math.h>, no <cuda_runtime.h>, so no
// INFINITY / FLT_MAX macros (see NPGPT_NEG_INF below). The two CUDA headers included below (the bf16 and
// fp16 types) are not system headers: they come with the CUDA runtime headers that CuPy 14 puts on NVRTC's
// include path for every kernel it compiles (cupy/_core/core.pyx, assemble_cupy_compiler_options, the
// directory of 'cudart'), and its own float16/bfloat16 kernels include them too. npgpt.cuda.nvrtc adds the
// same directory; npgpt.cuda.emulate has host stand-ins for both.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

// An online softmax's state over the values seen so far: m their max, s the sum of exp(z - m). None seen:
// m = NPGPT_NEG_INF, s = 0 (a finite start such as -FLT_MAX works the same for finite values).
__device__ __forceinline__ void npgpt_online_push(float& m, float& s, float z) {
    if (z > m) {  // the running sum is rescaled to the new max
        s = (m == NPGPT_NEG_INF ? 0.0f : s * expf(m - z)) + 1.0f;
        m = z;
    } else {
        s += expf(z - m);
    }
}

// Merge the state (m2, s2) into (m, s); a side whose max is -inf has seen nothing and adds nothing.
__device__ __forceinline__ void npgpt_online_merge(float& m, float& s, float m2, float s2) {
    const float M = fmaxf(m, m2);
    const float a = (m == NPGPT_NEG_INF) ? 0.0f : s * expf(m - M);
    const float b = (m2 == NPGPT_NEG_INF) ? 0.0f : s2 * expf(m2 - M);
    m = M;
    s = a + b;
}

// The merge over the 32 lanes of a warp (butterfly: every lane ends with the warp's state). Full mask,
// as npgpt_warp_sum.
__device__ __forceinline__ void npgpt_warp_online_merge(float& m, float& s) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(NPGPT_FULL_MASK, m, off);
        const float s2 = __shfl_xor_sync(NPGPT_FULL_MASK, s, off);
        npgpt_online_merge(m, s, m2, s2);
    }
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

// --- 16-bit storage, float32 arithmetic -------------------------------------------------------------------
// The kernels that take bf16/fp16 activations (--precision bf16|fp16, npgpt/precision.py) are templates over
// the storage type T: float, __nv_bfloat16 or __half. Every load is widened to float (npgpt_to_float), all
// arithmetic is float32, and every store rounds once to T, to nearest with ties to even
// (npgpt_from_float<T>), exactly as the CPU fast path rounds its float32 results (NumPy's float16,
// ml_dtypes' bfloat16). Widening is exact; T = float makes both functions the identity.

__device__ __forceinline__ float npgpt_to_float(float x) { return x; }
__device__ __forceinline__ float npgpt_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float npgpt_to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T npgpt_from_float(float x);
template <>
__device__ __forceinline__ float npgpt_from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 npgpt_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half npgpt_from_float<__half>(float x) { return __float2half_rn(x); }

// 16 bytes of T (4 floats, 8 bf16/fp16 values): one 128-bit load or store per thread, for the
// elementwise kernels' vectorised variants. The address must be 16-byte aligned.
template <typename T>
struct alignas(16) npgpt_pack {
    static constexpr int size = 16 / sizeof(T);
    T v[size];
};
