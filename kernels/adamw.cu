// adamw.cu — AdamW over one flat parameter buffer in one launch, and the global squared L2 norm of a
// flat buffer (for gradient clipping).
//
// Math (npgpt.optim, PyTorch's AdamW; step t counts from 1; bc1 = 1 - b1^t, bc2 = 1 - b2^t):
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//   p = p * (1 - lr wd)                                  only where the element decays
//   p = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// The host computes the step-dependent scalars in double, as the reference does in Python floats, and
// passes them rounded to float32 (as NumPy/CuPy round a Python scalar against a float32 array):
//   one_minus_b1 = 1 - b1, one_minus_b2 = 1 - b2, decay_factor = 1 - lr * wd,
//   step_size = lr / bc1, inv_sqrt_bc2 = 1 / sqrt(bc2).
//
// Decay flag: a per-element uint8 mask (decay_mask[i] != 0: element i decays by decay_factor).
// use_mask = 0 ignores the mask (it may be any pointer) and decays every element by decay_factor, so
// "no decay at all" is use_mask = 0 with decay_factor = 1. npgpt.cuda.kernels.decay_mask_for builds the
// mask from AdamW's per-parameter flags and the flat layout (one byte per element).
//
// The 16-bit working copy (--precision bf16|fp16): the weights stay float32 ("master" weights, as the
// moments do), and the forward and backward read a bf16/fp16 copy of them (npgpt/precision.py).
// adamw_flat_bf16 / adamw_flat_f16 also round each updated weight into that copy, copy[i] = T(p[i]), in
// the same pass, so the step needs no second pass over the weights to refresh it. adamw_flat is the
// float32 kernel (no copy). One template, adamw_flat_t<T, kCopy>, computes all three.
//
// Squared norm: sum_i x[i]^2 in double. sq_norm_partial: each block writes its partial sum to
// partial[blockIdx.x]; sq_norm_finalize (one block) adds the partials in a fixed order into out[0].
// Two passes, no atomics: deterministic for a given grid size (the wrapper derives it from n only).
//
// Shapes, dtypes, layout: p, g, m, v: (n,) float32 contiguous (the fast step's grad_flat layout; p, m, v
// laid out the same way); copy: (n,) bfloat16 / float16, laid out as p; decay_mask: (n,) uint8; x: (n,) float32; partial: (grid,) float64;
// out: (1,) float64. n is a 64-bit count.
//
// Launch configuration:
//   adamw_flat, adamw_flat_bf16, adamw_flat_f16
//                     grid-stride loop, block 256, grid min(ceil(n / 256), 8192); one element per
//                     thread per iteration; no shared memory. p, g, m, v, copy must not alias each other.
//   sq_norm_partial   block 256 (must be a multiple of 32), grid G = min(ceil(n / 1024), 1024);
//                     grid-stride loop accumulating in double, then a block reduction (shared 32 doubles).
//   sq_norm_finalize  grid 1, block 256; thread i adds partial[i], partial[i + 256], ... then a block
//                     reduction; thread 0 writes out[0].
//
// Matches: npgpt.optim._adamw_update, npgpt.optim.grad_norm
// (what AdamW.step runs per tensor, and the norm's square; not layers, so no npgpt.fast twin).
// Wrappers: npgpt.cuda.kernels.adamw_flat_ / sq_norm. Float32 tolerance asserted by tests/test_cuda_kernels.py against the reference
// evaluated in float64 on the same inputs: p, m, v |got - ref| <= 1e-5 |ref| + 1e-7 max|ref|;
// squared norm rtol 1e-6 (it accumulates in double).
// The 16-bit copy: bitwise equal to the float32 p it was rounded from (T(p), round to nearest even).

#include "common.cuh"

template <typename T, bool kCopy>
__device__ __forceinline__ void adamw_flat_t(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                             float* __restrict__ v, const unsigned char* __restrict__ decay_mask,
                                             T* __restrict__ copy, long long n, float b1, float one_minus_b1, float b2,
                                             float one_minus_b2, float eps, float decay_factor, float step_size,
                                             float inv_sqrt_bc2, int use_mask) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i];
        const float mi = b1 * m[i] + one_minus_b1 * gi;
        const float vi = b2 * v[i] + one_minus_b2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        float pi = p[i];
        if (!use_mask || decay_mask[i]) pi *= decay_factor;
        const float denom = sqrtf(vi) * inv_sqrt_bc2 + eps;  // sqrt(v_hat) + eps
        pi -= step_size * (mi / denom);
        p[i] = pi;
        if (kCopy) copy[i] = npgpt_from_float<T>(pi);  // the 16-bit working copy, in the same pass
    }
}

extern "C" __global__ void adamw_flat(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, const unsigned char* __restrict__ decay_mask,
                                      long long n, float b1, float one_minus_b1, float b2, float one_minus_b2,
                                      float eps, float decay_factor, float step_size, float inv_sqrt_bc2,
                                      int use_mask) {
    adamw_flat_t<float, false>(p, g, m, v, decay_mask, nullptr, n, b1, one_minus_b1, b2, one_minus_b2, eps,
                               decay_factor, step_size, inv_sqrt_bc2, use_mask);
}

// adamw_flat_bf16, adamw_flat_f16: adamw_flat, and the 16-bit copy of the updated weights.
#define ADAMW_COPY_KERNEL(T, SUFFIX)                                                                               \
    extern "C" __global__ void adamw_flat##SUFFIX(                                                                 \
        float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,          \
        const unsigned char* __restrict__ decay_mask, T* __restrict__ copy, long long n, float b1,                 \
        float one_minus_b1, float b2, float one_minus_b2, float eps, float decay_factor, float step_size,          \
        float inv_sqrt_bc2, int use_mask) {                                                                        \
        adamw_flat_t<T, true>(p, g, m, v, decay_mask, copy, n, b1, one_minus_b1, b2, one_minus_b2, eps,            \
                              decay_factor, step_size, inv_sqrt_bc2, use_mask);                                    \
    }

ADAMW_COPY_KERNEL(__nv_bfloat16, _bf16)
ADAMW_COPY_KERNEL(__half, _f16)

extern "C" __global__ void sq_norm_partial(const float* __restrict__ x, long long n, double* __restrict__ partial) {
    __shared__ double scratch[32];
    const long long stride = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double xi = (double)x[i];
        acc += xi * xi;
    }
    acc = npgpt_block_sum_d(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void sq_norm_finalize(const double* __restrict__ partial, int G, double* __restrict__ out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < G; i += blockDim.x) acc += partial[i];
    acc = npgpt_block_sum_d(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc;
}
