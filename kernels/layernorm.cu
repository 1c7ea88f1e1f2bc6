// layernorm.cu — LayerNorm over the last axis (channels): forward, and backward in three kernels.
//
// Math (npgpt.layers.layernorm; N rows, C channels, row n):
//   forward:   mean = sum_c x[n,c] / C;  xc = x - mean;  var = sum_c xc^2 / C   (biased, two passes)
//              rstd = 1 / sqrt(var + eps);  xhat = xc * rstd;  out = xhat * w + b
//   backward:  g = dout * w;  dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
//              dw += sum_n dout * xhat;   db += sum_n dout        (accumulated into dw, db: "+=")
//
// Shapes, dtypes, layout: row-major, contiguous.
//   x, out, dout, dx: (N, C) of the activations' type T: float32, or bfloat16 / float16 with
//                     --precision bf16|fp16 (each kernel below is one template over T; the extern "C"
//                     names carry the suffix _bf16 / _f16 for the 16-bit T, none for float32);
//   w, b, dw, db: (C,) float32 (the master weights and their gradients, at every precision);
//   mean, rstd: (N,) float32;
//   partial: (nchunks, 2, C) float32 scratch for the deterministic dw/db reduction (row 2k: dw, row 2k+1: db).
// Arithmetic is float32 throughout: each 16-bit value is widened when loaded, and out/dx are rounded to T
// once, when stored (npgpt_to_float / npgpt_from_float in common.cuh), as the fast ops do at 16 bits.
//
// Kernels and launch configuration:
//   layernorm_fwd              grid (ceil(N / 8)), block 256 = 8 warps, no dynamic shared memory.
//                              One warp per row: lanes stride over the C channels (coalesced), warp
//                              shuffles reduce the sums; first pass the mean, second pass the variance
//                              of x - mean (as the reference does, not E[x^2] - mean^2), third pass
//                              writes out. Stores mean[n] and rstd[n] for the backward.
//   layernorm_bwd_dwdb_partial grid (ceil(C / 32), nchunks), block 256 seen as 32 columns x 8 row-lanes.
//                              Block (cx, k) owns channels [32 cx, 32 cx + 32) and rows
//                              [k * rows_per_chunk, min(N, (k + 1) * rows_per_chunk)); thread (tx, ty)
//                              sums rows ty, ty + 8, ... of column 32 cx + tx, then the 8 row-lanes are
//                              added in a fixed order through shared memory (2 x 8 x 33 floats) and
//                              written to partial[k, 0, c] (dw) and partial[k, 1, c] (db). The wrapper
//                              takes nchunks = min(128, ceil(N / 32)) chunks of equal row counts.
//   layernorm_bwd_dwdb_finalize grid (ceil(C / 256)), block 256: thread c adds partial[0..nchunks) in
//                              order and does dw[c] += ..., db[c] += ... (float32 only: it reads partial)
//   layernorm_bwd_dx           grid (ceil(N / 8)), block 256: one warp per row, as the forward; dx is
//                              overwritten (not accumulated).
//   dw/db therefore use the two-pass partial-sum scheme, no atomics: the result is deterministic (the
//   same bits on every run for the same nchunks). Launch order for a backward: dwdb_partial,
//   dwdb_finalize, dx. With that order dx may alias dout (each lane reads its own channels of the row
//   before writing them, and the dw/db kernels have already read dout); no other aliasing.
//
// Matches: npgpt.fast.layernorm.layernorm_forward, npgpt.fast.layernorm.layernorm_backward
// (the fast ops, same contracts: mean/rstd stored by the forward; dx overwritten, dw/db added into;
// their readable twin is npgpt.layers.layernorm). Wrappers with the fast ops' arguments:
// npgpt.cuda.kernels.layernorm_forward / layernorm_backward. Float32 tolerance asserted by
// tests/test_cuda_kernels.py against the reference evaluated in float64 on the same inputs:
// |got - ref| <= 1e-5 |ref| + 1e-5 max|ref| (rtol 1e-5; the absolute term covers entries near 0).
// bf16 / fp16: out and dx within one unit in the last place of T of the fast op's 16-bit result on the
// same inputs (both round a float32 value once; they differ only where the two float32 values straddle a
// rounding boundary); mean, rstd, dw, db (float32) as above, against float64 on the same 16-bit inputs.

#include "common.cuh"

#define LN_WARPS_PER_BLOCK 8  // rows per block in layernorm_fwd / layernorm_bwd_dx (block of 256)

template <typename T>
__device__ __forceinline__ void layernorm_fwd_t(const T* __restrict__ x, const float* __restrict__ w,
                                                const float* __restrict__ b, T* __restrict__ out,
                                                float* __restrict__ mean, float* __restrict__ rstd, int N, int C,
                                                float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;  // uniform over the warp: the whole warp leaves together
    const T* xr = x + (long long)row * C;
    T* outr = out + (long long)row * C;

    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += npgpt_to_float(xr[c]);
    const float m = npgpt_warp_sum(s) / (float)C;

    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float d = npgpt_to_float(xr[c]) - m;
        ss += d * d;
    }
    const float var = npgpt_warp_sum(ss) / (float)C;
    const float r = 1.0f / sqrtf(var + eps);

    for (int c = lane; c < C; c += 32) outr[c] = npgpt_from_float<T>((npgpt_to_float(xr[c]) - m) * r * w[c] + b[c]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

template <typename T>
__device__ __forceinline__ void layernorm_bwd_dwdb_partial_t(const T* __restrict__ dout, const T* __restrict__ x,
                                                             const float* __restrict__ mean,
                                                             const float* __restrict__ rstd,
                                                             float* __restrict__ partial, int N, int C,
                                                             int rows_per_chunk) {
    __shared__ float sdw[8][33];  // [row-lane][column]; 33 avoids bank conflicts on the column reads
    __shared__ float sdb[8][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // blockDim.x == 256: ty in [0, 8)
    const int c = blockIdx.x * 32 + tx;
    const int chunk = blockIdx.y;
    const long long r0 = (long long)chunk * rows_per_chunk;
    long long r1 = r0 + rows_per_chunk;
    if (r1 > N) r1 = N;

    float dw = 0.0f, db = 0.0f;
    if (c < C) {
        for (long long r = r0 + ty; r < r1; r += 8) {
            const float d = npgpt_to_float(dout[r * C + c]);
            const float xhat = (npgpt_to_float(x[r * C + c]) - mean[r]) * rstd[r];
            dw += d * xhat;
            db += d;
        }
    }
    sdw[ty][tx] = dw;
    sdb[ty][tx] = db;
    __syncthreads();
    if (ty == 0 && c < C) {
        float tw = 0.0f, tb = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {  // fixed order: deterministic
            tw += sdw[i][tx];
            tb += sdb[i][tx];
        }
        partial[(2LL * chunk) * C + c] = tw;
        partial[(2LL * chunk + 1) * C + c] = tb;
    }
}

extern "C" __global__ void layernorm_bwd_dwdb_finalize(const float* __restrict__ partial, float* __restrict__ dw,
                                                       float* __restrict__ db, int nchunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float tw = 0.0f, tb = 0.0f;
    for (int k = 0; k < nchunks; ++k) {
        tw += partial[(2LL * k) * C + c];
        tb += partial[(2LL * k + 1) * C + c];
    }
    dw[c] += tw;
    db[c] += tb;
}

// dout and dx may be the same buffer (see the header), so neither is __restrict__.
template <typename T>
__device__ __forceinline__ void layernorm_bwd_dx_t(const T* dout, const T* __restrict__ x,
                                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                                   const float* __restrict__ w, T* dx, int N, int C) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;  // uniform over the warp
    const T* dr = dout + (long long)row * C;
    const T* xr = x + (long long)row * C;
    T* dxr = dx + (long long)row * C;
    const float m = mean[row], r = rstd[row];

    float sg = 0.0f, sgx = 0.0f;  // sum of g, sum of g * xhat
    for (int c = lane; c < C; c += 32) {
        const float g = npgpt_to_float(dr[c]) * w[c];
        sg += g;
        sgx += g * ((npgpt_to_float(xr[c]) - m) * r);
    }
    const float g_mean = npgpt_warp_sum(sg) / (float)C;
    const float gx_mean = npgpt_warp_sum(sgx) / (float)C;

    for (int c = lane; c < C; c += 32) {
        const float g = npgpt_to_float(dr[c]) * w[c];
        const float xhat = (npgpt_to_float(xr[c]) - m) * r;
        dxr[c] = npgpt_from_float<T>(r * (g - g_mean - xhat * gx_mean));
    }
}

// The kernels, one instantiation per activation type T (suffix "" float32, _bf16, _f16):
//   layernorm_fwd{,_bf16,_f16}, layernorm_bwd_dwdb_partial{,_bf16,_f16}, layernorm_bwd_dx{,_bf16,_f16}.
#define LN_KERNELS(T, SUFFIX)                                                                                      \
    extern "C" __global__ void layernorm_fwd##SUFFIX(const T* __restrict__ x, const float* __restrict__ w,       \
                                                     const float* __restrict__ b, T* __restrict__ out,           \
                                                     float* __restrict__ mean, float* __restrict__ rstd, int N,  \
                                                     int C, float eps) {                                         \
        layernorm_fwd_t<T>(x, w, b, out, mean, rstd, N, C, eps);                                                   \
    }                                                                                                              \
    extern "C" __global__ void layernorm_bwd_dwdb_partial##SUFFIX(                                                 \
        const T* __restrict__ dout, const T* __restrict__ x, const float* __restrict__ mean,                       \
        const float* __restrict__ rstd, float* __restrict__ partial, int N, int C, int rows_per_chunk) {           \
        layernorm_bwd_dwdb_partial_t<T>(dout, x, mean, rstd, partial, N, C, rows_per_chunk);                       \
    }                                                                                                              \
    extern "C" __global__ void layernorm_bwd_dx##SUFFIX(const T* dout, const T* __restrict__ x,                    \
                                                        const float* __restrict__ mean,                            \
                                                        const float* __restrict__ rstd,                            \
                                                        const float* __restrict__ w, T* dx, int N, int C) {        \
        layernorm_bwd_dx_t<T>(dout, x, mean, rstd, w, dx, N, C);                                                   \
    }

LN_KERNELS(float, )
LN_KERNELS(__nv_bfloat16, _bf16)
LN_KERNELS(__half, _f16)
