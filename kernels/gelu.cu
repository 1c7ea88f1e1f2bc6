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
// Shapes, dtypes, layout: float32, row-major, contiguous. h, pre, out, d, x: (N, C) seen as n = N * C
// elements; bias: (C,). n is a 64-bit count; C is the row length (for the bias index).
//
// Kernels and launch configuration: all are grid-stride loops, so any grid is correct; the wrappers
// (npgpt.cuda.kernels) launch block 256 and grid min(ceil(work / 256), 8192), work = n or n / 4.
//   gelu_bias_fwd        one element per thread per iteration.
//   gelu_bias_fwd_vec4   four elements (one float4) per thread per iteration. Requires n % 4 == 0,
//                        C % 4 == 0 and 16-byte aligned h, bias, pre, out (the wrapper checks and
//                        falls back to the scalar kernel otherwise). n4 = n / 4, C4 = C / 4.
//   gelu_bwd_inplace     d[i] *= gelu'(x[i]), one element per thread per iteration.
//   gelu_bwd_inplace_vec4  the same on float4s; requires n % 4 == 0 and 16-byte aligned d, x.
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

extern "C" __global__ void gelu_bias_fwd(const float* h, const float* __restrict__ bias, float* pre,
                                         float* __restrict__ out, long long n, int C, int has_bias) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = h[i];
        if (has_bias) {
            v += bias[i % C];
            pre[i] = v;
        }
        out[i] = gelu_f(v);
    }
}

extern "C" __global__ void gelu_bias_fwd_vec4(const float4* h, const float4* __restrict__ bias, float4* pre,
                                              float4* __restrict__ out, long long n4, int C4, int has_bias) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 v = h[i];
        if (has_bias) {
            const float4 bb = bias[i % C4];
            v.x += bb.x;
            v.y += bb.y;
            v.z += bb.z;
            v.w += bb.w;
            pre[i] = v;
        }
        out[i] = make_float4(gelu_f(v.x), gelu_f(v.y), gelu_f(v.z), gelu_f(v.w));
    }
}

extern "C" __global__ void gelu_bwd_inplace(float* __restrict__ d, const float* __restrict__ x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        d[i] *= gelu_grad_f(x[i]);
    }
}

extern "C" __global__ void gelu_bwd_inplace_vec4(float4* __restrict__ d, const float4* __restrict__ x, long long n4) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        const float4 xv = x[i];
        float4 dv = d[i];
        dv.x *= gelu_grad_f(xv.x);
        dv.y *= gelu_grad_f(xv.y);
        dv.z *= gelu_grad_f(xv.z);
        dv.w *= gelu_grad_f(xv.w);
        d[i] = dv;
    }
}
