/* GCC/clang vector types of 16 floats for the kernels written once for AVX-512 and AVX2 (attention.c, gated.c):
 * one zmm on AVX-512, two ymm on AVX2, the same operations in the same order either way, so both variants compute
 * the same numbers. vexp_body.h holds the functions on them that both use, included once per instruction set. */
#ifndef SPECCOMPILE_VECTORS_H
#define SPECCOMPILE_VECTORS_H
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  /* the AVX2 variant's 64-byte vectors never cross a call: all inlined */
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int i16 __attribute__((vector_size(64)));
#define load16(p) ({ v16 v_; __builtin_memcpy(&v_, (p), 64); v_; })
#define store16(p, v) do { v16 s_ = (v); __builtin_memcpy((p), &s_, 64); } while (0)
#define pick(m, a, b) ((v16)(((i16)(a) & (m)) | ((i16)(b) & ~(m))))
#define splat(x) ((v16){0} + (x))
#endif
