// cross_entropy.cu — softmax cross-entropy over the vocabulary, one block per row, with the gradient
// written in place over the logits.
//
// Math (npgpt.layers.cross_entropy; row n of the logits z, target t = targets[n]):
//   M = max_j z[j];  S = sum_j exp(z[j] - M)
//   loss[n] = log(S) + M - z[t]                 (= -log softmax(z)[t]);  0 when t == ignore_index
//   with want_grad:  z[j] <- (exp(z[j] - M) / S - [j == t]) * scale       (the row of dlogits)
//                    z[j] <- 0 for every j when t == ignore_index
//   scale is dloss / n_valid (n_valid = rows whose target is not ignore_index), so the rows of the
//   logits buffer become the gradient of dloss * mean loss, and the probabilities are never stored
//   as a separate (N, V) array.
//
// Max and sum are found in ONE pass over the row with the online-softmax rescaling: each thread keeps
// a running (m, s) with s = sum exp(z - m) over the elements it has seen; a larger element x rescales
// s by exp(m - x). Pairs are merged as (max(m1, m2), s1 exp(m1 - M) + s2 exp(m2 - M)), across the warp
// by shuffles, then across warps through shared memory. The gradient is a second pass (read z again,
// write it). The running max starts at -FLT_MAX (finite), not -inf, so exp(m - x) is never
// exp(-inf - (-inf)) = NaN for threads that see no element (V < blockDim) or rows of -inf logits.
// A NaN logit gives a NaN loss (the caller's non-finite guard sees it).
//
// Shapes, dtypes, layout:
//   logits: (N, V) float32, or bfloat16 / float16 with --precision bf16|fp16, row-major, contiguous
//           (rows V elements apart; V need not be a multiple of 4 — GPT-2's 50257 is not — so loads
//           are scalar, coalesced across the block). The kernel is one template over the logits' type
//           T; the extern "C" names carry _bf16 / _f16 for the 16-bit T. The softmax, the loss and the
//           gradient are float32 whatever T is (each logit widened when read); the gradient is rounded
//           to T once, when it is written back over the logits, after the scale (which at fp16 carries
//           the loss scale) is applied, as the fast op does;
//   targets: (N,) int64, ids in [0, V) or ignore_index (another out-of-range id gives a NaN loss and
//            no one-hot term in its gradient row);
//   losses: (N,) float32 out, the per-row loss (0 for ignored rows); the wrapper sums them.
//
// Kernels: cross_entropy_fwd_bwd (float32 logits), cross_entropy_fwd_bwd_bf16, cross_entropy_fwd_bwd_f16.
// Launch configuration: grid (N), block 512 (any multiple of 32 up to 1024 works), static shared
// memory 2 x 32 floats. Block n computes row n: thread i strides over j = i, i + blockDim, ... Thread 0
// reads z[t] before the first barrier, so it is read before any thread overwrites the row.
//
// Matches: npgpt.fast.cross_entropy.cross_entropy_
// (the fast op, scale = dloss / n_valid, ignore_index = -100; its readable twin is
// npgpt.layers.cross_entropy.softmax_cross_entropy_forward/_backward). Wrapper with the fast op's
// arguments: npgpt.cuda.kernels.cross_entropy_. Float32
// tolerance asserted by tests/test_cuda_kernels.py against the reference evaluated in float64 on the
// same inputs: mean loss rtol 1e-5; gradient |got - ref| <= 1e-5 |ref| + 1e-6 max|ref|.
// bf16 / fp16: the loss (float32 arithmetic on the same 16-bit logits) as above against float64 on those
// logits; the gradient within one unit in the last place of T of the fast op's 16-bit result.

#include "common.cuh"

#define CE_NEG_BIG (-3.402823466e38f)  // -FLT_MAX

template <typename T>
__device__ __forceinline__ void cross_entropy_fwd_bwd_t(T* __restrict__ logits, const long long* __restrict__ targets,
                                                        float* __restrict__ losses, int N, int V, float scale,
                                                        int want_grad, long long ignore_index) {
    __shared__ float sh_m[32];
    __shared__ float sh_s[32];
    const int row = blockIdx.x;
    if (row >= N) return;  // uniform over the block
    T* z = logits + (long long)row * V;
    const long long t = targets[row];
    const bool ignored = (t == ignore_index);
    const bool in_range = (t >= 0 && t < (long long)V);

    float z_t = 0.0f;
    if (threadIdx.x == 0 && in_range) z_t = npgpt_to_float(z[t]);  // before the barriers below, so before any write

    // Pass 1: running max and rescaled sum.
    float m = CE_NEG_BIG, s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) npgpt_online_push(m, s, npgpt_to_float(z[j]));
    npgpt_warp_online_merge(m, s);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) {
        sh_m[warp] = m;
        sh_s[warp] = s;
    }
    __syncthreads();
    // Every warp merges the per-warp pairs, so every thread ends with the row's (M, S).
    m = (lane < nwarps) ? sh_m[lane] : CE_NEG_BIG;
    s = (lane < nwarps) ? sh_s[lane] : 0.0f;
    npgpt_warp_online_merge(m, s);
    const float M = m, S = s;

    if (threadIdx.x == 0) {
        float loss = 0.0f;
        if (!ignored) loss = in_range ? (logf(S) + M - z_t) : __int_as_float(0x7fc00000);  // NaN: bad target
        losses[row] = loss;
    }
    if (!want_grad) return;

    // Pass 2: the gradient row, in place.
    if (ignored) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) z[j] = npgpt_from_float<T>(0.0f);
        return;
    }
    const float inv_S = 1.0f / S;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float p = expf(npgpt_to_float(z[j]) - M) * inv_S;
        z[j] = npgpt_from_float<T>((p - ((long long)j == t ? 1.0f : 0.0f)) * scale);
    }
}

// The kernels, one instantiation per logits type T (suffix "" float32, _bf16, _f16).
#define CE_KERNEL(T, SUFFIX)                                                                                       \
    extern "C" __global__ void cross_entropy_fwd_bwd##SUFFIX(T* __restrict__ logits,                              \
                                                             const long long* __restrict__ targets,                \
                                                             float* __restrict__ losses, int N, int V, float scale, \
                                                             int want_grad, long long ignore_index) {              \
        cross_entropy_fwd_bwd_t<T>(logits, targets, losses, N, V, scale, want_grad, ignore_index);                \
    }

CE_KERNEL(float, )
CE_KERNEL(__nv_bfloat16, _bf16)
CE_KERNEL(__half, _f16)
