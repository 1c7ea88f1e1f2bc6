// attention_softmax.cu — attention's scale, causal mask, softmax and dropout as one pass over the scores,
// and its backward as one pass over the gradient. The matrix products around them (q k^T and P v, and
// the backward's dy v^T, D^T dy, dS k, dS^T q) are cuBLAS strided-batched GEMMs on tensor cores
// (npgpt/cuda/blas.py); these kernels are the only code that touches the (b, NH, t, t) matrices
// elementwise, and the probabilities are the only such matrix kept from the forward for the backward.
//
// Math (npgpt.layers.attention, one head; query row i, key column j; s = q k^T, the unscaled scores):
//   forward:    z_j = scale * s_j for j <= i (the causal mask hides j > i)
//               P_j = exp(z_j - max z) / sum_{k <= i} exp(z_k - max z);   P_j = 0 for j > i
//               with dropout (p > 0):  D_j = keep_j ? P_j / (1 - p) : 0,  the probabilities that multiply v
//   backward:   g_j = the gradient of the probabilities that multiplied v (of D, or of P when p = 0)
//               dP_j = keep_j ? g_j / (1 - p) : 0   (dP_j = g_j without dropout)
//               dS_j = scale * P_j * (dP_j - sum_{k <= i} P_k dP_k)  (softmax's backward, times the scale:
//               the gradient of the unscaled scores s);  dS_j = 0 for j > i
//   regenerate: D_j again, from the kept P (the backward's dv = D^T dy needs it; nothing kept it)
//   keep_j = (u_j >= p), u_j the Philox-4x32-10 uniform of (seed, layer, bh, i, j) (kernels/philox.cuh):
//   counter (j >> 2, i, bh, layer), key floor(seed * 2^53), word j & 3. bh = b * NH + h, the head's index
//   in the call. So the mask of an element depends on its position only, never on t or the buffers, and
//   the backward draws it again instead of reading it: nothing of the mask is stored.
//   D from P stored at 16 bits is D = round(float(P_stored) * (1/(1-p))): the forward and the
//   regeneration compute it from the same stored P, so they agree bit for bit.
//
// Shapes, dtypes, layout: each call works on n_bh = b * NH matrices of (t, t), element (bh, i, j) at
// bh * head_stride + i * row_stride + j (a view [:b, :, :t, :t] of a (B, NH, T, T) buffer has
// head_stride = T * T, row_stride = T; the (b, NH) axes must collapse into one stride). Storage:
// float32, bfloat16 or float16 (T: float, __nv_bfloat16, __half), one template instantiated per type
// under extern "C" names with the suffix of the other 16-bit kernels: none for float32, _bf16, _f16.
// All arithmetic is float32: every load widened (npgpt_to_float), every output rounded once, to nearest
// even (npgpt_from_float<T>; both in common.cuh). seed: one float64 on the device, a uniform in [0, 1)
// (the fast step draws it from its dropout generator, once per forward), read only when p > 0. scale: 1/sqrt(hs) in GPT-2. drop_scale: float32(1 / (1 - p)).
//   attention_softmax_fwd{,_bf16,_f16}(att, dropped, n_bh, t, head_stride, row_stride, scale, p, drop_scale, seed, layer)
//       att: the scores s on entry, P on exit (every column written: zeros right of the diagonal).
//       dropped: D (every column written), or not touched when p == 0 (pass att).
//   attention_softmax_bwd{,_bf16,_f16}(datt, att, n_bh, t, head_stride, row_stride, scale, p, drop_scale, seed, layer)
//       datt: g on entry, dS on exit (every column written); att: P, read only.
//   attention_dropout{,_bf16,_f16}(dropped, att, n_bh, t, head_stride, row_stride, p, drop_scale, seed, layer)
//       dropped = D from the kept P (every column written). att and datt / dropped do not alias.
//
// Launch configuration: block 256 threads = 8 warps, one warp per (bh, i) row; grid
// ceil(n_bh * t / 8) blocks in x (row r = 8 * block + warp; bh = r / t, i = r % t). Lane l takes the
// column groups g = l, l + 32, ... of four columns j = 4g .. 4g + 3 (one Philox call draws a group's
// four uniforms). The forward's first pass reads j <= i keeping a running (max, sum of exp) per lane,
// an online softmax; the lanes' pairs are merged by butterfly shuffles, so every lane ends with the
// row's max and sum. Its second pass reads j <= i again (the row is in L1/L2 by then) and writes every
// column of the row. The backward's first pass is the row's sum of P dP (a warp sum), its second
// writes. Rows past n_bh * t (the last block's tail) return before any shuffle, a whole warp at a
// time. No shared memory. Every lane of a row's warp takes part in every shuffle.
//
// Matches: npgpt.fast.attention.attention_softmax_forward_, npgpt.fast.attention.attention_softmax_backward_, npgpt.fast.attention.attention_dropout_
// (the fast ops, same positional arguments; with them npgpt.engine.attention.FusedSoftmaxAttention equals
// npgpt.layers.attention given npgpt.fast.dropout.AttentionDropoutRandom as the readable model's
// generator). Wrappers: npgpt.cuda.kernels.attention_softmax_forward_, attention_softmax_backward_,
// attention_dropout_. Tolerance asserted by tests/test_cuda_attention_softmax.py against the fast op on
// the same inputs: float32 |got - ref| <= 2e-6 (probabilities; dS relative to its largest entry); bfloat16 and
// float16 within one unit of the last place (a float32 result one ulp apart can round either way);
// the dropout masks and zeros equal exactly.

#include "common.cuh"
#include "philox.cuh"

#define ATT_SOFTMAX_THREADS 256
#define ATT_SOFTMAX_ROWS 8  // warps per block, one row each

struct att_row {
    long long offset;  // of the row's first element
    unsigned bh, i;
    bool valid;
};

__device__ __forceinline__ att_row att_row_of_warp(int n_bh, int t, long long head_stride, int row_stride) {
    const long long r = (long long)blockIdx.x * ATT_SOFTMAX_ROWS + (threadIdx.x >> 5);
    att_row row;
    row.valid = r < (long long)n_bh * t;
    row.bh = row.valid ? (unsigned)(r / t) : 0u;
    row.i = row.valid ? (unsigned)(r % t) : 0u;
    row.offset = (long long)row.bh * head_stride + (long long)row.i * row_stride;
    return row;
}

// The keep decisions of columns 4g .. 4g + 3 of row (bh, i): bit w set when column 4g + w is kept.
__device__ __forceinline__ unsigned att_keep_bits(unsigned g, att_row row, unsigned layer, unsigned long long key, float p) {
    const npgpt_philox_out r = npgpt_philox4x32_10(g, row.i, row.bh, layer, (unsigned)key, (unsigned)(key >> 32));
    unsigned bits = 0;
#pragma unroll
    for (int w = 0; w < 4; ++w) bits |= (npgpt_uniform24(r.w[w]) >= p ? 1u : 0u) << w;
    return bits;
}

template <typename T>
__device__ void att_softmax_fwd(T* __restrict__ att, T* __restrict__ dropped, int n_bh, int t, long long head_stride,
                                int row_stride, float scale, float p, float drop_scale, const double* __restrict__ seed,
                                unsigned layer) {
    const att_row row = att_row_of_warp(n_bh, t, head_stride, row_stride);
    if (!row.valid) return;  // a whole warp: rows are per warp
    const int lane = threadIdx.x & 31;
    T* a = att + row.offset;
    const int seen = (int)row.i + 1;  // columns 0..i are not masked
    float m = NPGPT_NEG_INF, s = 0.0f;
    for (int j0 = 4 * lane; j0 < seen; j0 += 128) {
        for (int j = j0; j < j0 + 4 && j < seen; ++j) npgpt_online_push(m, s, scale * npgpt_to_float(a[j]));
    }
    npgpt_warp_online_merge(m, s);
    const float inv = 1.0f / s;  // s >= 1: the max itself contributes exp(0)
    const bool drop = p > 0.0f;
    const unsigned long long key = drop ? npgpt_seed_key(seed[0]) : 0ull;
    T* d = dropped + row.offset;
    for (int j0 = 4 * lane; j0 < t; j0 += 128) {
        const unsigned keep = (drop && j0 < seen) ? att_keep_bits((unsigned)j0 >> 2, row, layer, key, p) : 0u;
        for (int w = 0; w < 4 && j0 + w < t; ++w) {
            const int j = j0 + w;
            // P_j, rounded once to the storage type; D is computed from the rounded value
            const T prob = npgpt_from_float<T>(j < seen ? expf(scale * npgpt_to_float(a[j]) - m) * inv : 0.0f);
            a[j] = prob;
            if (drop) d[j] = npgpt_from_float<T>(((keep >> w) & 1u) ? npgpt_to_float(prob) * drop_scale : 0.0f);
        }
    }
}

template <typename T>
__device__ void att_softmax_bwd(T* __restrict__ datt, const T* __restrict__ att, int n_bh, int t, long long head_stride,
                                int row_stride, float scale, float p, float drop_scale, const double* __restrict__ seed,
                                unsigned layer) {
    const att_row row = att_row_of_warp(n_bh, t, head_stride, row_stride);
    if (!row.valid) return;
    const int lane = threadIdx.x & 31;
    T* g = datt + row.offset;
    const T* P = att + row.offset;
    const int seen = (int)row.i + 1;
    const bool drop = p > 0.0f;
    const unsigned long long key = drop ? npgpt_seed_key(seed[0]) : 0ull;
    float dot = 0.0f;  // sum over j <= i of P_j dP_j
    for (int j0 = 4 * lane; j0 < seen; j0 += 128) {
        const unsigned keep = drop ? att_keep_bits((unsigned)j0 >> 2, row, layer, key, p) : 0xfu;
        for (int w = 0; w < 4 && j0 + w < seen; ++w) {
            const float dP = ((keep >> w) & 1u) ? npgpt_to_float(g[j0 + w]) * (drop ? drop_scale : 1.0f) : 0.0f;
            dot += npgpt_to_float(P[j0 + w]) * dP;
        }
    }
    dot = npgpt_warp_sum(dot);
    for (int j0 = 4 * lane; j0 < t; j0 += 128) {
        const unsigned keep = (drop && j0 < seen) ? att_keep_bits((unsigned)j0 >> 2, row, layer, key, p) : 0xfu;
        for (int w = 0; w < 4 && j0 + w < t; ++w) {
            const int j = j0 + w;
            float dS = 0.0f;
            if (j < seen) {
                const float dP = ((keep >> w) & 1u) ? npgpt_to_float(g[j]) * (drop ? drop_scale : 1.0f) : 0.0f;
                dS = scale * (npgpt_to_float(P[j]) * (dP - dot));
            }
            g[j] = npgpt_from_float<T>(dS);
        }
    }
}

template <typename T>
__device__ void att_dropout(T* __restrict__ dropped, const T* __restrict__ att, int n_bh, int t, long long head_stride,
                            int row_stride, float p, float drop_scale, const double* __restrict__ seed, unsigned layer) {
    const att_row row = att_row_of_warp(n_bh, t, head_stride, row_stride);
    if (!row.valid) return;
    const int lane = threadIdx.x & 31;
    T* d = dropped + row.offset;
    const T* P = att + row.offset;
    const int seen = (int)row.i + 1;
    const unsigned long long key = npgpt_seed_key(seed[0]);
    for (int j0 = 4 * lane; j0 < t; j0 += 128) {
        const unsigned keep = j0 < seen ? att_keep_bits((unsigned)j0 >> 2, row, layer, key, p) : 0u;
        for (int w = 0; w < 4 && j0 + w < t; ++w) {
            const int j = j0 + w;
            d[j] = npgpt_from_float<T>((j < seen && ((keep >> w) & 1u)) ? npgpt_to_float(P[j]) * drop_scale : 0.0f);
        }
    }
}

#define ATT_SOFTMAX_ENTRIES(SUFFIX, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_SOFTMAX_THREADS)                                              \
        attention_softmax_fwd##SUFFIX(T* att, T* dropped, int n_bh, int t, long long head_stride, int row_stride,   \
                                       float scale, float p, float drop_scale, const double* seed, unsigned layer) {  \
        att_softmax_fwd<T>(att, dropped, n_bh, t, head_stride, row_stride, scale, p, drop_scale, seed, layer);       \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_SOFTMAX_THREADS)                                              \
        attention_softmax_bwd##SUFFIX(T* datt, const T* att, int n_bh, int t, long long head_stride,               \
                                       int row_stride, float scale, float p, float drop_scale, const double* seed,  \
                                       unsigned layer) {                                                             \
        att_softmax_bwd<T>(datt, att, n_bh, t, head_stride, row_stride, scale, p, drop_scale, seed, layer);          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_SOFTMAX_THREADS)                                              \
        attention_dropout##SUFFIX(T* dropped, const T* att, int n_bh, int t, long long head_stride, int row_stride, \
                                   float p, float drop_scale, const double* seed, unsigned layer) {                  \
        att_dropout<T>(dropped, att, n_bh, t, head_stride, row_stride, p, drop_scale, seed, layer);                  \
    }

ATT_SOFTMAX_ENTRIES(, float)
ATT_SOFTMAX_ENTRIES(_bf16, __nv_bfloat16)
ATT_SOFTMAX_ENTRIES(_f16, __half)
