// EXGRAMED_MULTIVERSION: compile a function for AVX-512, for x86-64-v3 (AVX2 with FMA) and for baseline
// x86-64, and pick the best at load time (GCC target_clones); a no-op elsewhere. Each entry of the list is
// one clone ("avx2,fma" would be two: AVX2 without FMA, and FMA without AVX2).
//
// The clones compute the same bits: the builds pass -ffp-contract=off, so no clone fuses a multiply and
// an add. With contraction on, GCC fuses them in some clones and not others, and in the AVX-512 clone in
// the 512-bit loop body and the scalar tail but not in the 256-bit epilogue between them: an entry's
// rounding would depend on the CPU and on its position (tests/test_pair_scores.py checks every position).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EXGRAMED_MULTIVERSION __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define EXGRAMED_MULTIVERSION
#endif
