// attention.cu — causal self-attention, forward and backward, tiled in the manner of FlashAttention:
// the (T, T) scores and probabilities are never stored; the forward keeps one log-sum-exp per query
// row and the backward recomputes the probabilities from it. Extra memory is O(T) per head.
//
// Math (npgpt.layers.attention; one head; i = query position, j = key position, scale = the factor
// on the scores, 1/sqrt(hs) in GPT-2, or 1 when q was pre-scaled as in npgpt.fast.attention):
//   s[i,j] = scale * q[i] . k[j]   for j <= i  (j > i is the future: -inf)
//   lse[i] = log sum_{j<=i} exp(s[i,j]);   P[i,j] = exp(s[i,j] - lse[i]);   out[i] = sum_j P[i,j] v[j]
// Backward, with dO = d out:
//   D[i]  = dO[i] . out[i]                      (= sum_j P[i,j] dP[i,j]; kernel attention_bwd_rowdot)
//   dP[i,j] = dO[i] . v[j];   dS[i,j] = P[i,j] (dP[i,j] - D[i])          (the softmax backward)
//   dv[j] = sum_{i>=j} P[i,j] dO[i];   dk[j] = scale * sum_{i>=j} dS[i,j] q[i]
//   dq[i] = dq_mult * scale * sum_{j<=i} dS[i,j] k[j]
// dq_mult is an extra factor on dq only (1 for the plain gradient). npgpt.fast.attention pre-scales q by
// 1/sqrt(hs) and wants the gradient of the unscaled q: it calls with scale = 1, dq_mult = 1/sqrt(hs),
// which is exactly attention_heads_backward_ with inv_sqrt = 1/sqrt(hs). No dropout here: with
// attention dropout on (training with drop_rate > 0) the fast step falls back to
// npgpt.fast.attention.attention_forward / attention_backward, which draw and apply the keep-mask.
//
// Shapes, dtypes, layout: q, k, v, out, dout, dq, dk, dv: (B, NH, T, hs) float32; within a head the
// (T, hs) rows are contiguous (row t at offset t * hs) and consecutive heads (b, h) -> (b, h + 1) ->
// (b + 1, 0) are `stride_bh` elements apart (stride_bh = T * hs when contiguous; larger when the
// arrays are views of buffers allocated for a longer T, as the fast step's are). lse and D: (B, NH, T)
// float32, heads `lse_stride_bh` elements apart. All eight (T, hs) arrays share stride_bh.
// hs must be one of 16, 32, 48, 64, 80, 96, 112, 128 (a multiple of 16, at most 128): each kernel is
// instantiated per head size, name suffix _hs<hs> (-DNPGPT_ATTENTION_ONLY_HS=<hs> builds just one).
// The (T, hs) arrays must be 16-byte aligned (float4 loads), and stride_bh a multiple of 4.
// B * NH <= 65535 (grid y) and T < 2^31 / hs.
//
// Launch configuration (ATT_BR = 64 rows per block, ATT_BC = 32 rows per shared-memory tile, block
// 256 threads = 64 rows x 4 threads; a "quad" of 4 adjacent lanes owns one row and each of its
// threads owns hs/16 float4 chunks of that row, chunks qd, qd + 4, qd + 8, ... for quad lane qd, so
// one row's dot products are reduced with two __shfl_xor_sync (xor 1, xor 2) inside the quad):
//   attention_fwd_hs<hs>       grid (ceil(T / 64), B * NH). Block x owns query rows
//                              [64 (gridDim.x - 1 - x), +64) (the longest rows are launched first).
//                              Loops over key tiles of 32 rows up to its last query row: loads K and V
//                              tiles into shared memory (2 x 32 x hs floats: 32 KB at hs = 128),
//                              computes the 32 scores of each row in registers, and updates the running
//                              max m, sum l and output accumulator o with the online-softmax rescaling.
//                              Writes out = o / l and lse = m + log(l).
//   attention_bwd_rowdot       grid (ceil(T / 8), B * NH), block 256: one warp per row, D = dO . out.
//                              (Not templated; takes hs.)
//   attention_bwd_dkdv_hs<hs>  grid (ceil(T / 64), B * NH). Block x owns key rows [64 x, +64) and keeps
//                              k, v, dk, dv rows in registers; loops over query tiles of 32 rows from
//                              its first key row to T: loads scale * q, dO, lse and D of the tile into
//                              shared memory (2 x 32 x hs + 64 floats), recomputes P and dS, accumulates
//                              dv and dk. Writes dk, dv (overwritten).
//   attention_bwd_dq_hs<hs>    grid and row ownership as the forward. Loops over key tiles (K, V in
//                              shared memory) recomputing P and dS, accumulates dq. Writes dq
//                              (overwritten).
//   Backward order: rowdot, dkdv, dq. dq is a separate kernel pass (no atomics): the backward is
//   deterministic. dout may alias dq (each dq row is written by the threads that read that dout row,
//   after reading it, and rowdot and dkdv have finished with dout by then); nothing else may alias.
//   Rows past T (the last block's tail) compute on zeros and are never written; every row has at
//   least one visible key (key 0), so no row's running max stays -inf.
//
// Matches: npgpt.fast.attention.attention_heads_forward, npgpt.fast.attention.attention_heads_backward_
// with keep=None (the fast ops over stacks of heads; npgpt.layers.attention.attention_forward/_backward
// without dropout). Wrappers: npgpt.cuda.kernels.attention_fwd / attention_bwd at the level of heads,
// and flash_attention_forward / flash_attention_backward with the arguments of
// npgpt.fast.attention.attention_forward / attention_backward. Float32 tolerance asserted by
// tests/test_cuda_kernels.py against the reference evaluated in float64 on the same inputs:
// |got - ref| <= 1e-4 |ref| + 1e-5 max|ref| for out and lse, and for dq, dk, dv with max|ref| taken
// over all three (at T = 1 the exact dq and dk are 0: the absolute term is the rounding of dP - D).
// rtol 1e-4: sums over up to T terms in float32.

#include "common.cuh"

#define ATT_BR 64      // rows owned by a block
#define ATT_BC 32      // rows per shared-memory tile
#define ATT_THREADS 256

__device__ __forceinline__ float4 att_zero4() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }

__device__ __forceinline__ float att_dot4(float4 a, float4 b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

__device__ __forceinline__ void att_axpy4(float4& acc, float a, float4 x) {
    acc.x += a * x.x;
    acc.y += a * x.y;
    acc.z += a * x.z;
    acc.w += a * x.w;
}

__device__ __forceinline__ float4 att_scale4(float4 x, float a) { return make_float4(a * x.x, a * x.y, a * x.z, a * x.w); }

// Sum over the 4 lanes of a quad (lanes 4r .. 4r + 3 of a warp). All 32 lanes must call it.
// The two butterfly steps give every lane of the quad bitwise the same value.
__device__ __forceinline__ float att_quad_sum(float v) {
    v += __shfl_xor_sync(NPGPT_FULL_MASK, v, 1);
    v += __shfl_xor_sync(NPGPT_FULL_MASK, v, 2);
    return v;
}

// This thread's part of the dot product of a register row (NCH float4 chunks) with a shared row.
template <int HS>
__device__ __forceinline__ float att_partial_dot(const float4 (&r)[HS / 16], const float4* srow, int qd) {
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < HS / 16; ++j) acc += att_dot4(r[j], srow[qd + 4 * j]);
    return acc;
}

// Copy rows [r0, r0 + ATT_BC) of a (T, HS) head into a shared tile of ATT_BC x HS/4 float4, scaled by
// `mult`; rows >= T become zeros. Called by all threads of the block.
template <int HS>
__device__ __forceinline__ void att_load_tile(float4* tile, const float4* src, int r0, int T, float mult) {
    constexpr int HS4 = HS / 4;
    for (int e = threadIdx.x; e < ATT_BC * HS4; e += blockDim.x) {
        const int row = e / HS4, col = e - row * HS4;
        const int t = r0 + row;
        tile[e] = (t < T) ? att_scale4(src[(long long)t * HS4 + col], mult) : att_zero4();
    }
}

// ------------------------------------------------------------------------------------------------
template <int HS>
__device__ __forceinline__ void attention_fwd_impl(const float* __restrict__ q, const float* __restrict__ k,
                                                   const float* __restrict__ v, float* __restrict__ out,
                                                   float* __restrict__ lse, int T, long long stride_bh,
                                                   long long lse_stride_bh, float scale) {
    constexpr int NCH = HS / 16, HS4 = HS / 4;
    __shared__ float4 Ks[ATT_BC * HS4];
    __shared__ float4 Vs[ATT_BC * HS4];
    const int qblock = gridDim.x - 1 - blockIdx.x;  // the longest rows first
    const long long head = (long long)blockIdx.y * stride_bh;
    const float4* q4 = reinterpret_cast<const float4*>(q + head);
    const float4* k4 = reinterpret_cast<const float4*>(k + head);
    const float4* v4 = reinterpret_cast<const float4*>(v + head);
    const int r = threadIdx.x >> 2, qd = threadIdx.x & 3;
    const int q0 = qblock * ATT_BR;
    const int qpos = q0 + r;
    const bool row_valid = qpos < T;

    float4 qr[NCH], o[NCH];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
        qr[j] = row_valid ? att_scale4(q4[(long long)qpos * HS4 + qd + 4 * j], scale) : att_zero4();
        o[j] = att_zero4();
    }
    float m_run = NPGPT_NEG_INF, l_run = 0.0f;

    const int kend = min(T, q0 + ATT_BR);  // keys [0, kend) are visible to some row of this block
    const int ntiles = (kend + ATT_BC - 1) / ATT_BC;
    for (int kt = 0; kt < ntiles; ++kt) {
        const int k0 = kt * ATT_BC;
        __syncthreads();  // everyone is done with the previous tile
        att_load_tile<HS>(Ks, k4, k0, T, 1.0f);
        att_load_tile<HS>(Vs, v4, k0, T, 1.0f);
        __syncthreads();

        float s[ATT_BC];
        float tmax = NPGPT_NEG_INF;
#pragma unroll
        for (int c = 0; c < ATT_BC; ++c) {
            const float dot = att_quad_sum(att_partial_dot<HS>(qr, Ks + c * HS4, qd));
            const int kpos = k0 + c;
            s[c] = (kpos > qpos || kpos >= T) ? NPGPT_NEG_INF : dot;
            tmax = fmaxf(tmax, s[c]);
        }
        // Key 0 is visible to every row and lies in tile 0, so m_new is finite from the first tile on;
        // a tile wholly in a row's future has tmax = -inf and leaves m unchanged (corr = 1, p = 0).
        const float m_new = fmaxf(m_run, tmax);
        const float corr = expf(m_run - m_new);  // exp(-inf) = 0 on the first tile
        l_run *= corr;
#pragma unroll
        for (int j = 0; j < NCH; ++j) o[j] = att_scale4(o[j], corr);
#pragma unroll
        for (int c = 0; c < ATT_BC; ++c) {
            const float p = expf(s[c] - m_new);  // 0 for masked entries
            l_run += p;
#pragma unroll
            for (int j = 0; j < NCH; ++j) att_axpy4(o[j], p, Vs[c * HS4 + qd + 4 * j]);
        }
        m_run = m_new;
    }

    if (row_valid) {
        float4* out4 = reinterpret_cast<float4*>(out + head);
        const float inv_l = 1.0f / l_run;
#pragma unroll
        for (int j = 0; j < NCH; ++j) out4[(long long)qpos * HS4 + qd + 4 * j] = att_scale4(o[j], inv_l);
        if (qd == 0) lse[(long long)blockIdx.y * lse_stride_bh + qpos] = m_run + logf(l_run);
    }
}

// ------------------------------------------------------------------------------------------------
template <int HS>
__device__ __forceinline__ void attention_bwd_dkdv_impl(const float* __restrict__ q, const float* __restrict__ k,
                                                        const float* __restrict__ v, const float* __restrict__ lse,
                                                        const float* __restrict__ Dg, const float* __restrict__ dout,
                                                        float* __restrict__ dk, float* __restrict__ dv, int T,
                                                        long long stride_bh, long long lse_stride_bh, float scale) {
    constexpr int NCH = HS / 16, HS4 = HS / 4;
    __shared__ float4 Qs[ATT_BC * HS4];   // scale * q of the query tile
    __shared__ float4 dOs[ATT_BC * HS4];  // dO of the query tile
    __shared__ float lse_s[ATT_BC];
    __shared__ float D_s[ATT_BC];
    const long long head = (long long)blockIdx.y * stride_bh;
    const long long lhead = (long long)blockIdx.y * lse_stride_bh;
    const float4* q4 = reinterpret_cast<const float4*>(q + head);
    const float4* k4 = reinterpret_cast<const float4*>(k + head);
    const float4* v4 = reinterpret_cast<const float4*>(v + head);
    const float4* do4 = reinterpret_cast<const float4*>(dout + head);
    const int r = threadIdx.x >> 2, qd = threadIdx.x & 3;
    const int kb0 = blockIdx.x * ATT_BR;
    const int kpos = kb0 + r;
    const bool row_valid = kpos < T;

    float4 kr[NCH], vr[NCH], dkr[NCH], dvr[NCH];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
        kr[j] = row_valid ? k4[(long long)kpos * HS4 + qd + 4 * j] : att_zero4();
        vr[j] = row_valid ? v4[(long long)kpos * HS4 + qd + 4 * j] : att_zero4();
        dkr[j] = att_zero4();
        dvr[j] = att_zero4();
    }

    // Queries i >= kb0 can see this block's keys; kb0 is a multiple of ATT_BC, so tiles start there.
    const int qt_begin = kb0 / ATT_BC;
    const int qt_end = (T + ATT_BC - 1) / ATT_BC;
    for (int qt = qt_begin; qt < qt_end; ++qt) {
        const int i0 = qt * ATT_BC;
        __syncthreads();
        att_load_tile<HS>(Qs, q4, i0, T, scale);
        att_load_tile<HS>(dOs, do4, i0, T, 1.0f);
        if (threadIdx.x < ATT_BC) {
            const int i = i0 + threadIdx.x;
            lse_s[threadIdx.x] = (i < T) ? lse[lhead + i] : 0.0f;
            D_s[threadIdx.x] = (i < T) ? Dg[lhead + i] : 0.0f;
        }
        __syncthreads();

#pragma unroll 2
        for (int c = 0; c < ATT_BC; ++c) {
            const float s = att_quad_sum(att_partial_dot<HS>(kr, Qs + c * HS4, qd));
            const float dp = att_quad_sum(att_partial_dot<HS>(vr, dOs + c * HS4, qd));
            const int qpos = i0 + c;
            const bool visible = row_valid && kpos <= qpos && qpos < T;
            const float p = visible ? expf(s - lse_s[c]) : 0.0f;
            const float ds = p * (dp - D_s[c]);
#pragma unroll
            for (int j = 0; j < NCH; ++j) {
                att_axpy4(dvr[j], p, dOs[c * HS4 + qd + 4 * j]);
                att_axpy4(dkr[j], ds, Qs[c * HS4 + qd + 4 * j]);  // Qs holds scale * q
            }
        }
    }

    if (row_valid) {
        float4* dk4 = reinterpret_cast<float4*>(dk + head);
        float4* dv4 = reinterpret_cast<float4*>(dv + head);
#pragma unroll
        for (int j = 0; j < NCH; ++j) {
            dk4[(long long)kpos * HS4 + qd + 4 * j] = dkr[j];
            dv4[(long long)kpos * HS4 + qd + 4 * j] = dvr[j];
        }
    }
}

// ------------------------------------------------------------------------------------------------
// dout and dq may alias (see the header), so neither is __restrict__.
template <int HS>
__device__ __forceinline__ void attention_bwd_dq_impl(const float* __restrict__ q, const float* __restrict__ k,
                                                      const float* __restrict__ v, const float* __restrict__ lse,
                                                      const float* __restrict__ Dg, const float* dout, float* dq,
                                                      int T, long long stride_bh, long long lse_stride_bh,
                                                      float scale, float dq_mult) {
    constexpr int NCH = HS / 16, HS4 = HS / 4;
    __shared__ float4 Ks[ATT_BC * HS4];
    __shared__ float4 Vs[ATT_BC * HS4];
    const int qblock = gridDim.x - 1 - blockIdx.x;
    const long long head = (long long)blockIdx.y * stride_bh;
    const float4* q4 = reinterpret_cast<const float4*>(q + head);
    const float4* k4 = reinterpret_cast<const float4*>(k + head);
    const float4* v4 = reinterpret_cast<const float4*>(v + head);
    const float4* do4 = reinterpret_cast<const float4*>(dout + head);
    const int r = threadIdx.x >> 2, qd = threadIdx.x & 3;
    const int q0 = qblock * ATT_BR;
    const int qpos = q0 + r;
    const bool row_valid = qpos < T;

    float4 qr[NCH], dor[NCH], dqr[NCH];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
        qr[j] = row_valid ? att_scale4(q4[(long long)qpos * HS4 + qd + 4 * j], scale) : att_zero4();
        dor[j] = row_valid ? do4[(long long)qpos * HS4 + qd + 4 * j] : att_zero4();
        dqr[j] = att_zero4();
    }
    const long long lhead = (long long)blockIdx.y * lse_stride_bh;
    const float lse_i = row_valid ? lse[lhead + qpos] : 0.0f;
    const float D_i = row_valid ? Dg[lhead + qpos] : 0.0f;

    const int kend = min(T, q0 + ATT_BR);
    const int ntiles = (kend + ATT_BC - 1) / ATT_BC;
    for (int kt = 0; kt < ntiles; ++kt) {
        const int k0 = kt * ATT_BC;
        __syncthreads();
        att_load_tile<HS>(Ks, k4, k0, T, 1.0f);
        att_load_tile<HS>(Vs, v4, k0, T, 1.0f);
        __syncthreads();

        // Unrolled twice, except at HS = 32, where ptxas then spills 12-24 bytes of registers (sm_80, sm_90;
        // benchmarks/kernel_resources.py): once there, which spills nothing and takes no more registers.
#pragma unroll(HS == 32 ? 1 : 2)
        for (int c = 0; c < ATT_BC; ++c) {
            const float s = att_quad_sum(att_partial_dot<HS>(qr, Ks + c * HS4, qd));
            const float dp = att_quad_sum(att_partial_dot<HS>(dor, Vs + c * HS4, qd));
            const int kpos = k0 + c;
            const bool visible = row_valid && kpos <= qpos;  // kpos <= qpos < T
            const float p = visible ? expf(s - lse_i) : 0.0f;
            const float ds = p * (dp - D_i);
#pragma unroll
            for (int j = 0; j < NCH; ++j) att_axpy4(dqr[j], ds, Ks[c * HS4 + qd + 4 * j]);
        }
    }

    if (row_valid) {
        float4* dq4 = reinterpret_cast<float4*>(dq + head);
        const float mult = scale * dq_mult;
#pragma unroll
        for (int j = 0; j < NCH; ++j) dq4[(long long)qpos * HS4 + qd + 4 * j] = att_scale4(dqr[j], mult);
    }
}

// ------------------------------------------------------------------------------------------------
extern "C" __global__ void attention_bwd_rowdot(const float* __restrict__ dout, const float* __restrict__ out,
                                                float* __restrict__ Dg, int T, int hs, long long stride_bh,
                                                long long lse_stride_bh) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (t >= T) return;  // uniform over the warp
    const long long row = (long long)blockIdx.y * stride_bh + (long long)t * hs;
    float acc = 0.0f;
    for (int d = lane; d < hs; d += 32) acc += dout[row + d] * out[row + d];
    acc = npgpt_warp_sum(acc);
    if (lane == 0) Dg[(long long)blockIdx.y * lse_stride_bh + t] = acc;
}

#define NPGPT_ATTENTION_KERNELS(HS)                                                                         \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                               \
        attention_fwd_hs##HS(const float* __restrict__ q, const float* __restrict__ k,                      \
                             const float* __restrict__ v, float* __restrict__ out, float* __restrict__ lse, \
                             int T, long long stride_bh, long long lse_stride_bh, float scale) {            \
        attention_fwd_impl<HS>(q, k, v, out, lse, T, stride_bh, lse_stride_bh, scale);                      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkdv_hs##HS(                    \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,              \
        const float* __restrict__ lse, const float* __restrict__ Dg, const float* __restrict__ dout,        \
        float* __restrict__ dk, float* __restrict__ dv, int T, long long stride_bh, long long lse_stride_bh, \
        float scale) {                                                                                      \
        attention_bwd_dkdv_impl<HS>(q, k, v, lse, Dg, dout, dk, dv, T, stride_bh, lse_stride_bh, scale);    \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_hs##HS(                      \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,              \
        const float* __restrict__ lse, const float* __restrict__ Dg, const float* dout, float* dq, int T,   \
        long long stride_bh, long long lse_stride_bh, float scale, float dq_mult) {                         \
        attention_bwd_dq_impl<HS>(q, k, v, lse, Dg, dout, dq, T, stride_bh, lse_stride_bh, scale, dq_mult); \
    }

// Expands its argument first, so NPGPT_ATTENTION_ONLY_HS (a macro) pastes as its value.
#define NPGPT_ATTENTION_KERNELS_FOR(HS) NPGPT_ATTENTION_KERNELS(HS)

#ifdef NPGPT_ATTENTION_ONLY_HS
// -DNPGPT_ATTENTION_ONLY_HS=64 builds the three templated kernels for one head size only (what the
// CuPy wrapper does: an eighth of the compile time at first use).
NPGPT_ATTENTION_KERNELS_FOR(NPGPT_ATTENTION_ONLY_HS)
#else
NPGPT_ATTENTION_KERNELS(16)
NPGPT_ATTENTION_KERNELS(32)
NPGPT_ATTENTION_KERNELS(48)
NPGPT_ATTENTION_KERNELS(64)
NPGPT_ATTENTION_KERNELS(80)
NPGPT_ATTENTION_KERNELS(96)
NPGPT_ATTENTION_KERNELS(112)
NPGPT_ATTENTION_KERNELS(128)
#endif
