// Function multiversioning for the CPU kernels: the loops of csrc/core/*.h are SIMD-friendly, so on x86-64
// (GCC) each batch-range function gets an AVX2/FMA clone chosen at load time, and a baseline one.
// flatten: the per-matrix functions are too large for GCC to inline on its own, and only code inlined into
// a clone is compiled for its target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RP_CPU_CLONES __attribute__((flatten, target_clones("arch=x86-64-v3", "default")))
#else
#define RP_CPU_CLONES
#endif
