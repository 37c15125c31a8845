/* speccompile_gumbel_row: one position's Gumbel noise row for sampling by the argmax (runtime/noise.py), T * G_v for
 * v < n, each G_v = -log(E_v), E_v = -log(u_v) ~ Exp(1), u_v uniform in (0, 1) from SplitMix64:
 *     seed  = mix(k0 ^ mix(k1 + (position + 1) * GOLDEN)),   u_v = ((mix(seed + (v + 1) * GOLDEN) >> 11) + 1/2) / 2^53
 * (mix: SplitMix64's output function), so a row depends on the request's key and its position only. In float32
 * with the tail of small E (the largest noise) kept to float32's precision (`exponential`). Why C: numpy's
 * generator and two passes of logs over a whole vocabulary are a visible share of every sampled decode step; this
 * loop vectorises (the logs are polynomials, no library calls, no fused multiply-adds) and takes a fraction of
 * that (docs/results.md, "Gumbel noise from the kernel library"). Where the CPU lacks AVX-512 (no 64-bit vector products) it returns 0 and noise.py draws with
 * numpy's generator instead. tests/test_noise_kernel.py holds it to a numpy transcription, bit for bit. */
#include <stdint.h>
#include <string.h>

#pragma GCC optimize("fp-contract=off", "no-trapping-math")  /* every step rounded alike; branches made selects */

#define GOLDEN 0x9e3779b97f4a7c15ULL

static inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/* 2 atanh(s) / s = 2 (1 + z/3 + z^2/5 + ... + z^6/13), z = s^2 (|s| <= 1/3: a relative error under 2e-8) */
static inline float series(float s) {
  const float z = s * s;
  return 2.f * (1.f + z * (1.f / 3 + z * (1.f / 5 + z * (1.f / 7 + z * (1.f / 9 + z * (1.f / 11 + z * (1.f / 13)))))));
}

/* x = 2^e m, m in [sqrt(1/2), sqrt(2)), for a normal float x > 0 */
static inline float split(float x, int32_t* e) {
  uint32_t b;
  memcpy(&b, &x, 4);
  *e = (int32_t)(b >> 23) - 127;
  b = (b & 0x007fffffu) | 0x3f800000u;
  float m;
  memcpy(&m, &b, 4);
  const int big = m > 1.41421356f;
  *e += big;
  return big ? m * 0.5f : m;
}

/* log x for a normal float x > 0: e log 2 + 2 atanh((m - 1) / (m + 1)) */
static inline float log_f(float x) {
  int32_t e;
  const float m = split(x, &e), s = (m - 1.f) / (m + 1.f);
  return (float)e * 0.693147181f + s * series(s);
}

/* E = -log u for u = (k + 1/2) / 2^53, k < 2^53, in float32 to float32's precision however close u is to 1: below
 * one half as log_f(u), above from w = 1 - u (exact as an integer) by log(1 - w) = 2 atanh(-w / (2 - w)); one
 * division either way, chosen per lane */
static inline float exponential(uint64_t k) {
  const int high = k >= (1ULL << 52);
  const float w = ((float)(int64_t)((1ULL << 53) - k) - 0.5f) * 0x1p-53f;
  int32_t e;
  const float m = split(((float)(int64_t)k + 0.5f) * 0x1p-53f, &e);
  const float s = (high ? -w : m - 1.f) / (high ? 2.f - w : m + 1.f);
  return -((float)(high ? 0 : e) * 0.693147181f + s * series(s));
}

static __attribute__((target("avx512f,avx512dq"))) void row_avx512(uint64_t k0, uint64_t k1, int64_t position,
                                                                  float temperature, float* out, int64_t n) {
  const uint64_t seed = mix(k0 ^ mix(k1 + ((uint64_t)position + 1) * GOLDEN));
  for (int64_t v = 0; v < n; v++)
    out[v] = -temperature * log_f(exponential(mix(seed + ((uint64_t)v + 1) * GOLDEN) >> 11));
}

int speccompile_cpu_supported(void);

/* 1 where the row was written; 0 where this CPU has no AVX-512 (the caller draws another way) */
int speccompile_gumbel_row(uint64_t k0, uint64_t k1, int64_t position, float temperature, float* out, int64_t n) {
  if (speccompile_cpu_supported() != 2) return 0;
  row_avx512(k0, k1, position, temperature, out, n);
  return 1;
}
