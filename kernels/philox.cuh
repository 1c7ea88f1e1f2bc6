// philox.cuh — Philox-4x32-10, the counter-based random generator of the kernels' dropout.
//
// A counter-based generator is a pure function: four 32-bit words of counter and two of key in, four
// 32-bit words of random bits out. Nothing is stored and nothing is sequential, so any thread can draw
// the bits of any element, and a backward pass draws again exactly the bits its forward drew: a
// dropout mask needs no memory. Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011) is the generator cuRAND, PyTorch and JAX use for the same purpose: it
// passes TestU01's BigCrush, costs 20 32x32->64-bit multiplies per four outputs, and has published
// known-answer vectors (Random123's kat_vectors), against which tests/test_cuda_attention_softmax.py
// checks the NumPy twin, npgpt.fast.dropout.philox4x32_10, which the emulated kernels are then held
// equal to.
//
// One round (Random123's philox4x32round), with multipliers M0, M1 and the key (k0, k1):
//   (hi0, lo0) = M0 * c0 (64-bit product),  (hi1, lo1) = M1 * c2
//   c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// Ten rounds, the key bumped by the Weyl constants W0, W1 before every round but the first.
//
// A uniform in [0, 1) from one 32-bit word w: (w >> 8) * 2^-24, a float32 with 24 random bits and no
// rounding (the same numbers NumPy's Generator.random(dtype=float32) produces from its own bits).
//
// The attention kernels' counter for element (bh, i, j) of layer `layer` (npgpt.fast.dropout
// attention_dropout_keep): counter (j >> 2, i, bh, layer), key the step's 53-bit seed (low 32 bits,
// high 21), word j & 3 of the output: one call gives the uniforms of four adjacent columns.

#pragma once

#define NPGPT_PHILOX_M0 0xD2511F53u
#define NPGPT_PHILOX_M1 0xCD9E8D57u
#define NPGPT_PHILOX_W0 0x9E3779B9u
#define NPGPT_PHILOX_W1 0xBB67AE85u

struct npgpt_philox_out {
    unsigned w[4];
};

__device__ __forceinline__ npgpt_philox_out npgpt_philox4x32_10(unsigned c0, unsigned c1, unsigned c2, unsigned c3,
                                                                unsigned k0, unsigned k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += NPGPT_PHILOX_W0;
            k1 += NPGPT_PHILOX_W1;
        }
        const unsigned long long p0 = (unsigned long long)NPGPT_PHILOX_M0 * c0;
        const unsigned long long p1 = (unsigned long long)NPGPT_PHILOX_M1 * c2;
        const unsigned hi0 = (unsigned)(p0 >> 32), lo0 = (unsigned)p0;
        const unsigned hi1 = (unsigned)(p1 >> 32), lo1 = (unsigned)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    npgpt_philox_out out;
    out.w[0] = c0;
    out.w[1] = c1;
    out.w[2] = c2;
    out.w[3] = c3;
    return out;
}

// The uniform in [0, 1) of one word: its top 24 bits times 2^-24 (exact in float32).
__device__ __forceinline__ float npgpt_uniform24(unsigned w) { return (float)(w >> 8) * 5.9604644775390625e-08f; }

// The 64-bit key of a seed drawn as a float64 uniform u in [0, 1) (Generator.random): floor(u * 2^53),
// exact, so a NumPy twin given the same u gets the same key.
__device__ __forceinline__ unsigned long long npgpt_seed_key(double u) {
    return (unsigned long long)(u * 9007199254740992.0);
}
