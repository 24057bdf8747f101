// DECAF_VECTOR_CLONES before a CPU function compiles it for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and
// the baseline, the best one chosen when the library loads (GCC target_clones, x86-64 only; elsewhere
// one build). DECAF_NO_CLONES gives one build for the compiler's -march instead, which is how
// csrc/tests/clone_test.cpp tests each level.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(DECAF_NO_CLONES)
#define DECAF_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DECAF_VECTOR_CLONES
#endif

// Forces inlining into each clone (GCC and Clang; elsewhere a plain inline).
#if defined(__GNUC__)
#define DECAF_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define DECAF_ALWAYS_INLINE inline
#endif
