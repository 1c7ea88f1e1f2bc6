// gelu.cu — GPT-2's tanh GELU, forward fused with the bias add of the preceding linear layer, and
// backward in place.
//
// Math (npgpt.layers.gelu; s = GELU_SCALE = sqrt(2/pi), a = GELU_CUBIC = 0.044715):
//   forward:   pre = h + bias[c]                            (the MLP pre-activation, kept for the backward)
//              out = 0.5 * pre * (1 + tanh(s * (pre + a * pre^3)))
//   backward:  th = tanh(s * (x + a * x^3))
//              d *= 0.5 * (1 + th) + 0.5 * s * x * (1 + 3 a x^2) * (1 - th^2)       (in place on d)
//
// Contract of the forward: h is the (N, C) GEMM output *without* its bias; the kernel writes
// pre = h + bias into `pre` (which may be h itself: in place) and gelu(pre) into `out`. The backward
// needs `pre` (its x argument), exactly as npgpt.fast.gelu keeps `fc` (pre-activation incl. bias) for
// _gelu_bwd. has_bias = 0 skips the add: then h already is the pre-activation, `pre` is not written
// and bias is not read (both may be any pointer).
//
// Shapes, dtypes, layout: row-major, contiguous, every array of one type T: float32, or bfloat16 /
// float16 with --precision bf16|fp16 (the bias is then the 16-bit copy of the weights). h, pre, out, d,
// x: (N, C) seen as n = N * C elements; bias: (C,). n is a 64-bit count; C is the row length (for the
// bias index). Each kernel is one template over T; the extern "C" names carry _bf16 / _f16 for the 16-bit
// T, nothing for float32. Arithmetic is float32: loads are widened, stores round once to T. At 16 bits
// the bias add rounds too, as the fast op's 16-bit `x += bias` does: pre = T(h + bias), and GELU is taken
// of that rounded pre, the value the backward will read.
//
// Kernels and launch configuration: all are grid-stride loops, so any grid is correct; the wrappers
// (npgpt.cuda.kernels) launch block 256 and grid min(ceil(work / 256), 8192), work = n or n / P, where
// P = 16 / sizeof(T) is the elements in one 16-byte pack (npgpt_pack: 4 floats, 8 bf16/fp16 values).
//   gelu_bias_fwd{,_bf16,_f16}          one element per thread per iteration.
//   gelu_bias_fwd_vec4, gelu_bias_fwd_vec8_{bf16,f16}
//                                       one pack (P = 4 or 8 elements, a 128-bit load) per thread per
//                                       iteration. Requires n % P == 0, C % P == 0 and 16-byte aligned h,
//                                       bias, pre, out (the wrapper checks and falls back to the scalar
//                                       kernel otherwise). Arguments npacks = n / P, Cpacks = C / P.
//   gelu_bwd_inplace{,_bf16,_f16}       d[i] *= gelu'(x[i]), one element per thread per iteration.
//   gelu_bwd_inplace_vec4, gelu_bwd_inplace_vec8_{bf16,f16}
//                                       the same on packs; requires n % P == 0 and 16-byte aligned d, x.
//   No shared memory. `pre` may alias `h` (the element is read before it is written by the same
//   thread); `out` must not alias either. In the backward d and x must not alias.
//
// Matches: npgpt.fast.gelu.gelu_forward, npgpt.fast.gelu.gelu_backward_
// (the fast ops, the bias add fused the same way; their readable twin is npgpt.layers.gelu). Wrappers
// with the fast ops' arguments: npgpt.cuda.kernels.gelu_forward / gelu_backward_. Float32
// tolerance asserted by tests/test_cuda_kernels.py against the reference evaluated in float64 on the
// same inputs: |got - ref| <= 1e-5 |ref| + 1e-6 max|input| (rtol 1e-5; input = pre for the forward,
// d for the backward). The absolute term is needed: for x << 0, 1 + tanh(u) cancels in float32 and
// gelu(x) ~ -1e-6 carries an error of about |x| * 2^-24, in the reference's float32 form too.
// bf16 / fp16: pre bitwise equal to the fast op's, out and d within one unit in the last place of T of
// the fast op's 16-bit result on the same inputs (both round a float32 value once).

#include "common.cuh"

__device__ __forceinline__ float gelu_f(float x) {
    const float u = NPGPT_GELU_SCALE * (x + NPGPT_GELU_CUBIC * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad_f(float x) {
    const float x2 = x * x;
    const float th = tanhf(NPGPT_GELU_SCALE * (x + NPGPT_GELU_CUBIC * x2 * x));
    return 0.5f * (1.0f + th) +
           0.5f * NPGPT_GELU_SCALE * x * (1.0f + 3.0f * NPGPT_GELU_CUBIC * x2) * (1.0f - th * th);
}

// pre = T(h + bias) (stored), returned widened: GELU is taken of the value the backward will read.
template <typename T>
__device__ __forceinline__ float gelu_pre(T h, T bias, T* pre) {
    const T p = npgpt_from_float<T>(npgpt_to_float(h) + npgpt_to_float(bias));
    *pre = p;
    return npgpt_to_float(p);
}

template <typename T>
__device__ __forceinline__ void gelu_bias_fwd_t(const T* h, const T* __restrict__ bias, T* pre, T* __restrict__ out,
                                                long long n, int C, int has_bias) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = has_bias ? gelu_pre(h[i], bias[i % C], pre + i) : npgpt_to_float(h[i]);
        out[i] = npgpt_from_float<T>(gelu_f(v));
    }
}

template <typename T>
__device__ __forceinline__ void gelu_bias_fwd_vec_t(const T* h, const T* __restrict__ bias, T* pre,
                                                    T* __restrict__ out, long long npacks, int Cpacks, int has_bias) {
    typedef npgpt_pack<T> P;
    const P* hp = reinterpret_cast<const P*>(h);
    const P* bp = reinterpret_cast<const P*>(bias);
    P* pp = reinterpret_cast<P*>(pre);
    P* op = reinterpret_cast<P*>(out);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < npacks; i += stride) {
        P hv = hp[i], ov;
        if (has_bias) {
            const P bv = bp[i % Cpacks];
            P pv;
#pragma unroll
            for (int k = 0; k < P::size; ++k) gelu_pre(hv.v[k], bv.v[k], &pv.v[k]);
            pp[i] = pv;
            hv = pv;
        }
#pragma unroll
        for (int k = 0; k < P::size; ++k) ov.v[k] = npgpt_from_float<T>(gelu_f(npgpt_to_float(hv.v[k])));
        op[i] = ov;
    }
}

template <typename T>
__device__ __forceinline__ void gelu_bwd_inplace_t(T* __restrict__ d, const T* __restrict__ x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        d[i] = npgpt_from_float<T>(npgpt_to_float(d[i]) * gelu_grad_f(npgpt_to_float(x[i])));
    }
}

template <typename T>
__device__ __forceinline__ void gelu_bwd_inplace_vec_t(T* __restrict__ d, const T* __restrict__ x, long long npacks) {
    typedef npgpt_pack<T> P;
    P* dp = reinterpret_cast<P*>(d);
    const P* xp = reinterpret_cast<const P*>(x);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < npacks; i += stride) {
        const P xv = xp[i];
        P dv = dp[i];
#pragma unroll
        for (int k = 0; k < P::size; ++k)
            dv.v[k] = npgpt_from_float<T>(npgpt_to_float(dv.v[k]) * gelu_grad_f(npgpt_to_float(xv.v[k])));
        dp[i] = dv;
    }
}

// The kernels, one instantiation per type T (suffix "" float32, _bf16, _f16; VEC names the pack:
// vec4 = 4 floats, vec8 = 8 16-bit values).
#define GELU_KERNELS(T, SUFFIX, VEC)                                                                               \
    extern "C" __global__ void gelu_bias_fwd##SUFFIX(const T* h, const T* __restrict__ bias, T* pre,              \
                                                     T* __restrict__ out, long long n, int C, int has_bias) {      \
        gelu_bias_fwd_t<T>(h, bias, pre, out, n, C, has_bias);                                                     \
    }                                                                                                              \
    extern "C" __global__ void gelu_bias_fwd_##VEC##SUFFIX(const T* h, const T* __restrict__ bias, T* pre,        \
                                                           T* __restrict__ out, long long npacks, int Cpacks,      \
                                                           int has_bias) {                                         \
        gelu_bias_fwd_vec_t<T>(h, bias, pre, out, npacks, Cpacks, has_bias);                                       \
    }                                                                                                              \
    extern "C" __global__ void gelu_bwd_inplace##SUFFIX(T* __restrict__ d, const T* __restrict__ x, long long n) { \
        gelu_bwd_inplace_t<T>(d, x, n);                                                                            \
    }                                                                                                              \
    extern "C" __global__ void gelu_bwd_inplace_##VEC##SUFFIX(T* __restrict__ d, const T* __restrict__ x,         \
                                                              long long npacks) {                                  \
        gelu_bwd_inplace_vec_t<T>(d, x, npacks);                                                                   \
    }

GELU_KERNELS(float, , vec4)
GELU_KERNELS(__nv_bfloat16, _bf16, vec8)
GELU_KERNELS(__half, _f16, vec8)
