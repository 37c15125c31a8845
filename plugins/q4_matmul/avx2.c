/* MatMulQ4 on AVX2 (with FMA and F16C): a tile's 16 outputs as two halves of 8 int32 lanes. Without VNNI, the
 * products go through vpmaddubsw (code * input, pairs summed to int16: at most 2 * 15 * 127 per pair, and the
 * eight pairs' sum at most 30480, so nothing saturates) and vpmaddwd by ones, the same exact integer sums as
 * avx512.c's vpdpbusd; the float operations are that file's, in its order. */
#include <immintrin.h>
#include "q4.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))

int q4_has_avx2(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

AVX2 void q4_quantize_avx2(const float* x, int64_t M, int K, int8_t* xq, float* scale, float* sum,
                           int32_t* eights) {
  const int nb = K / BLOCK;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = 0; r < M; r++)
    for (int b = 0; b < nb; b++) {
      const float* p = x + r * K + b * BLOCK;
      __m256 v[4];
      for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(p + 8 * i);
      __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                               _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
      __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i q[4];
      for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
      __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256((__m256i*)(xq + r * K + b * BLOCK), _mm256_permutevar8x32_epi32(bytes, order));
      __m256i qs = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i q4 = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
      q4 = _mm_add_epi32(q4, _mm_unpackhi_epi64(q4, q4));
      eights[r * nb + b] = 8 * (_mm_cvtsi128_si32(q4) + _mm_extract_epi32(q4, 1));
      scale[r * nb + b] = amax / 127.f;
      __m256 s8 = _mm256_add_ps(_mm256_add_ps(v[0], v[2]), _mm256_add_ps(v[1], v[3]));  /* block_sum's tree */
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
      __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      sum[r * nb + b] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
}

/* one half (8 outputs) of a tile for R <= ROWS_AVX2 rows */
static inline __attribute__((always_inline)) AVX2 void half(const int R, const Rows* g, int h) {
  __m256 acc[ROWS_AVX2];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int b = 0; b < g->nb; b++) {
    const uint8_t* rec = g->w + (size_t)b * RECORD;
    for (int line = 0; line < RECORD; line += 64) _mm_prefetch((const char*)(rec + 8 * RECORD + line), _MM_HINT_T0);
    __m256i c[8];
    for (int j = 0; j < 4; j++) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(rec + 64 * j + 32 * h));
      c[j] = _mm256_and_si256(v, low);
      c[4 + j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 256 + 16 * h)));
    __m256 offset = _mm256_fmadd_ps(_mm256_set1_ps(8.f), d,
                                    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 288 + 16 * h))));
    for (int r = 0; r < R; r++) {
      const int32_t* x4 = (const int32_t*)(g->xq + (size_t)r * g->K + b * BLOCK);
      __m256i pairs = _mm256_maddubs_epi16(c[0], _mm256_set1_epi32(x4[0]));
      for (int j = 1; j < 8; j++) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(c[j], _mm256_set1_epi32(x4[j])));
      __m256i centred = _mm256_sub_epi32(_mm256_madd_epi16(pairs, ones), _mm256_set1_epi32(g->eights[r * g->nb + b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_mul_ps(d, _mm256_set1_ps(g->scale[r * g->nb + b])),
                               acc[r]);
      acc[r] = _mm256_fmadd_ps(offset, _mm256_set1_ps(g->sum[r * g->nb + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) _mm256_storeu_ps(g->y + r * g->N + 8 * h, acc[r]);
}

AVX2 void q4_tile_avx2(const Product* p, size_t t) {
  for (int h = 0; h < 2; h++) FOR_ROW_GROUPS(p, t, RECORD, 4, half, h);
}

/* MatMulQ8, one half (8 outputs) of a tile: the codes made signed again (w = stored - 128), then vpmaddubsw of |w|
 * (at most 128) by x signed as w (|x| at most 127: a pair at most 32512, nothing saturates) and vpmaddwd by ones,
 * per vector: the exact dot avx512.c's vpdpbusd gives, less nothing. With `bound` (MatMulQ8Bound), the block L1
 * norms from the same |w| (pairs of at most 256), then the same float steps as avx512.c's. */
static inline __attribute__((always_inline)) AVX2 void half8(const int R, const Rows* g, int h, const int bound) {
  __m256 acc[ROWS_AVX2], err[ROWS_AVX2];
  for (int r = 0; r < R; r++) acc[r] = err[r] = _mm256_setzero_ps();
  const __m256i bias = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  for (int b = 0; b < g->nb; b++) {
    const uint8_t* rec = g->w + (size_t)b * RECORD8;
    for (int line = 0; line < RECORD8; line += 64) _mm_prefetch((const char*)(rec + 8 * RECORD8 + line), _MM_HINT_T0);
    __m256i c[8], mag[8];
    for (int j = 0; j < 8; j++) {
      c[j] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(rec + 64 * j + 32 * h)), bias);
      mag[j] = _mm256_abs_epi8(c[j]);
    }
    __m256 d = _mm256_loadu_ps((const float*)(rec + 512 + 32 * h)), l1 = d;
    if (bound) {
      __m256i pairs = _mm256_maddubs_epi16(mag[0], _mm256_set1_epi8(1));
      for (int j = 1; j < 8; j++) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(mag[j], _mm256_set1_epi8(1)));
      l1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), d);  /* 16-bit sums at most 2048 */
    }
    for (int r = 0; r < R; r++) {
      const int32_t* x4 = (const int32_t*)(g->xq + (size_t)r * g->K + b * BLOCK);
      __m256i dot = _mm256_setzero_si256();
      for (int j = 0; j < 8; j++) {
        __m256i signed_x = _mm256_sign_epi8(_mm256_set1_epi32(x4[j]), c[j]);
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(mag[j], signed_x), ones));
      }
      const __m256 step = _mm256_set1_ps(g->scale[r * g->nb + b]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, step), acc[r]);
      if (bound) err[r] = _mm256_fmadd_ps(l1, step, err[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    _mm256_storeu_ps(g->y + r * g->N + 8 * h, acc[r]);
    if (bound)
      _mm256_storeu_ps(g->upper + r * g->N + 8 * h, _mm256_fmadd_ps(err[r], _mm256_set1_ps(g->slack), acc[r]));
  }
}

AVX2 void q8_tile_avx2(const Product* p, size_t t) {
  for (int h = 0; h < 2; h++) FOR_ROW_GROUPS(p, t, RECORD8, 4, half8, h, 0);
}
AVX2 void q8b_tile_avx2(const Product* p, size_t t) {
  for (int h = 0; h < 2; h++) FOR_ROW_GROUPS(p, t, RECORD8, 4, half8, h, 1);
}
