/* MatMulQ4 on AVX-512 (F, BW, VNNI): a tile of 16 outputs is one zmm of int32 sums; vpdpbusd multiplies each
 * output's four codes by four input codes and adds them. */
#include <immintrin.h>
#include "q4.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c")))

int q4_has_avx512(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

static inline AVX512 float block_sum(__m512 v0, __m512 v1) {
  __m512 s16 = _mm512_add_ps(v0, v1);
  __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s16),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s16), 1)));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

AVX512 void q4_quantize_avx512(const float* x, int64_t M, int K, int8_t* xq, float* scale, float* sum,
                               int32_t* eights) {
  const int nb = K / BLOCK;
  for (int64_t r = 0; r < M; r++)
    for (int b = 0; b < nb; b++) {
      const float* p = x + r * K + b * BLOCK;
      __m512 v0 = _mm512_loadu_ps(p), v1 = _mm512_loadu_ps(p + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
      int8_t* q = xq + r * K + b * BLOCK;
      _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(q1));
      eights[r * nb + b] = 8 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));  /* |x * inv| <= 127 */
      scale[r * nb + b] = amax / 127.f;
      sum[r * nb + b] = block_sum(v0, v1);
    }
}

static inline __attribute__((always_inline)) AVX512 void tile(const int R, const Rows* g) {
  __m512 acc[ROWS];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int b = 0; b < g->nb; b++) {
    const uint8_t* rec = g->w + (size_t)b * RECORD;
    for (int line = 0; line < RECORD; line += 64) _mm_prefetch((const char*)(rec + 8 * RECORD + line), _MM_HINT_T0);
    __m512i c[8];
    for (int j = 0; j < 4; j++) {
      __m512i v = _mm512_loadu_si512(rec + 64 * j);
      c[j] = _mm512_and_si512(v, low);
      c[4 + j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(rec + 256)));
    __m512 offset = _mm512_fmadd_ps(_mm512_set1_ps(8.f), d,
                                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(rec + 288))));
    for (int r = 0; r < R; r++) {
      const int32_t* x4 = (const int32_t*)(g->xq + (size_t)r * g->K + b * BLOCK);  /* 4 int8 a lane */
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], _mm512_set1_epi32(x4[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[4], _mm512_set1_epi32(x4[4]));
      for (int j = 1; j < 4; j++) {
        s0 = _mm512_dpbusd_epi32(s0, c[j], _mm512_set1_epi32(x4[j]));
        s1 = _mm512_dpbusd_epi32(s1, c[4 + j], _mm512_set1_epi32(x4[4 + j]));
      }
      __m512i centred = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(g->eights[r * g->nb + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(d, _mm512_set1_ps(g->scale[r * g->nb + b])),
                               acc[r]);
      acc[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(g->sum[r * g->nb + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(g->y + r * g->N, acc[r]);
}

AVX512 void q4_tile_avx512(const Product* p, size_t t) { FOR_ROW_GROUPS(p, t, RECORD, 8, tile); }

/* MatMulQ8: vector j, lane c holds output c's codes k = 4j .. 4j + 3, stored + 128 (unsigned, as vpdpbusd takes
 * them): the dot less 128 times the block's sum of xq (16 * eights) is the signed codes' exact dot. With `bound`
 * (MatMulQ8Bound), also each output's block L1 norm, d times the sum of its codes' magnitudes (made signed again,
 * then vpabsb: -128 gives 0x80, 128 to vpdpbusd's unsigned side), weighed by each row's step and summed. */
static inline __attribute__((always_inline)) AVX512 void tile8(const int R, const Rows* g, const int bound) {
  __m512 acc[ROWS], err[ROWS];
  for (int r = 0; r < R; r++) acc[r] = err[r] = _mm512_setzero_ps();
  for (int b = 0; b < g->nb; b++) {
    const uint8_t* rec = g->w + (size_t)b * RECORD8;
    for (int line = 0; line < RECORD8; line += 64) _mm_prefetch((const char*)(rec + 8 * RECORD8 + line), _MM_HINT_T0);
    __m512i c[8];
    for (int j = 0; j < 8; j++) c[j] = _mm512_loadu_si512(rec + 64 * j);
    __m512 d = _mm512_loadu_ps((const float*)(rec + 512)), l1 = d;
    if (bound) {
      __m512i mags = _mm512_setzero_si512();
      for (int j = 0; j < 8; j++)
        mags = _mm512_dpbusd_epi32(mags, _mm512_abs_epi8(_mm512_xor_si512(c[j], _mm512_set1_epi8((char)0x80))),
                                   _mm512_set1_epi8(1));
      l1 = _mm512_mul_ps(_mm512_cvtepi32_ps(mags), d);
    }
    for (int r = 0; r < R; r++) {
      const int32_t* x4 = (const int32_t*)(g->xq + (size_t)r * g->K + b * BLOCK);
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], _mm512_set1_epi32(x4[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[4], _mm512_set1_epi32(x4[4]));
      for (int j = 1; j < 4; j++) {
        s0 = _mm512_dpbusd_epi32(s0, c[j], _mm512_set1_epi32(x4[j]));
        s1 = _mm512_dpbusd_epi32(s1, c[4 + j], _mm512_set1_epi32(x4[4 + j]));
      }
      __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(16 * g->eights[r * g->nb + b]));
      const __m512 step = _mm512_set1_ps(g->scale[r * g->nb + b]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, step), acc[r]);
      if (bound) err[r] = _mm512_fmadd_ps(l1, step, err[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    _mm512_storeu_ps(g->y + r * g->N, acc[r]);
    if (bound) _mm512_storeu_ps(g->upper + r * g->N, _mm512_fmadd_ps(err[r], _mm512_set1_ps(g->slack), acc[r]));
  }
}

AVX512 void q8_tile_avx512(const Product* p, size_t t) { FOR_ROW_GROUPS(p, t, RECORD8, 8, tile8, 0); }
AVX512 void q8b_tile_avx512(const Product* p, size_t t) { FOR_ROW_GROUPS(p, t, RECORD8, 8, tile8, 1); }
