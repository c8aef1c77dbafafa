// EXGRAMED_MULTIVERSION: compile a function for AVX-512, AVX2+FMA and baseline x86-64 and pick
// the best at load time (GCC target_clones); a no-op elsewhere.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EXGRAMED_MULTIVERSION __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define EXGRAMED_MULTIVERSION
#endif
