// bits16.cuh — bfloat16 and float16 arrays as the kernels see them: 16-bit patterns, read as float and
// written from float with one rounding.
//
// npgpt_bf16 and npgpt_f16 are structs holding the IEEE bit pattern (unsigned short): the memory layout
// of ml_dtypes.bfloat16 and numpy.float16 arrays (and of CUDA's __nv_bfloat16 and __half). No CUDA header
// is needed, so the same source compiles with nvcc, with NVRTC (which ships no headers by default) and,
// for npgpt.cuda.emulate, as plain C++ on the CPU.
//
//   npgpt_load(x) -> float:     float32 as is; bfloat16 shifted into a float's top half (exact);
//                               float16 by cvt.f32.f16 on a GPU, by its fields in the emulation (exact).
//   npgpt_store(T&, float):     round to nearest, ties to even, as ml_dtypes and NumPy do; overflow gives
//                               inf, NaN stays NaN. On a GPU one instruction (cvt.rn.bf16.f32, sm_80+;
//                               cvt.rn.f16.f32); in the emulation (no __CUDA_ARCH__) the same rounding
//                               in integer operations, which tests/test_cuda_kernels.py holds bit for bit
//                               to ml_dtypes / NumPy over every 16-bit value and a sweep of floats.
// Every kernel computes in float32 whatever it stores.

#pragma once

struct npgpt_bf16 {
    unsigned short bits;
};
struct npgpt_f16 {
    unsigned short bits;
};

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ unsigned npgpt_float_bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float npgpt_bits_float(unsigned u) { return __uint_as_float(u); }
#else
// The emulation (host C++): the bit casts through memcpy, which compilers turn into a register move.
__device__ __forceinline__ unsigned npgpt_float_bits(float f) {
    unsigned u;
    __builtin_memcpy(&u, &f, 4);
    return u;
}
__device__ __forceinline__ float npgpt_bits_float(unsigned u) {
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
#endif

__device__ __forceinline__ float npgpt_load(float x) { return x; }
__device__ __forceinline__ float npgpt_load(npgpt_bf16 x) { return npgpt_bits_float((unsigned)x.bits << 16); }

__device__ __forceinline__ float npgpt_load(npgpt_f16 x) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#else
    const unsigned h = x.bits, sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return npgpt_bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
        const float value = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -value : value;
    }
    return npgpt_bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15 -> 127
#endif
}

__device__ __forceinline__ void npgpt_store(float& out, float f) { out = f; }

__device__ __forceinline__ void npgpt_store(npgpt_bf16& out, float f) {
#if defined(__CUDA_ARCH__)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out.bits) : "f"(f));
#else
    const unsigned u = npgpt_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
        out.bits = (unsigned short)((u >> 16) | 0x40u);
        return;
    }
    // Add just under half of the dropped 16 bits' unit, plus 1 when the kept part is odd: ties go to even.
    out.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

__device__ __forceinline__ void npgpt_store(npgpt_f16& out, float f) {
#if defined(__CUDA_ARCH__)
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(f));
#else
    const unsigned u = npgpt_float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    unsigned h;
    if (a > 0x7f800000u) {
        h = 0x7e00u;  // NaN
    } else if (a >= 0x47800000u) {
        h = 0x7c00u;  // |f| >= 65536: inf (65520 and up round there too, below)
    } else if (a < 0x38800000u) {
        // |f| < 2^-14: a float16 subnormal (or zero), a multiple of 2^-24. Adding 0.5 (2^-1, whose
        // float32 unit is 2^-24) lets the float adder round |f| to that grid, ties to even; the low
        // bits of the sum are then the subnormal's mantissa.
        h = npgpt_float_bits(npgpt_bits_float(a) + 0.5f) - 0x3f000000u;
    } else {
        // A normal float16: rebias the exponent (127 -> 15) and drop 13 mantissa bits, rounding to
        // nearest even; a carry out of the mantissa moves to the next binade (65520 and up: inf).
        const unsigned rebiased = a - ((127u - 15u) << 23);
        h = (rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13;
    }
    out.bits = (unsigned short)(sign | h);
#endif
}
