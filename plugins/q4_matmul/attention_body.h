/* TreeAttention's arithmetic, included by attention.c once per instruction set: TARGET is the functions'
 * target attribute, NAME(x) their names' suffix. GCC/clang vector types of 16 floats: one zmm on AVX-512, two
 * ymm on AVX2, the same operations in the same order either way. Every row of every head goes through the same
 * steps whatever the other rows are, so a row's output never depends on its pass. */

/* 16 consecutive values of a K or V row as floats: the float32 cache's own, or the float16 cache's widened (exactly,
 * the same on both instruction sets) */
static inline __attribute__((always_inline)) TARGET v16 NAME(kv16)(const void* base, size_t i, const int half) {
  if (!half) return load16((const float*)base + i);
  const uint16_t* p = (const uint16_t*)base + i;
#if ISA_WIDTH == 512
  return (v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#else
  typedef float v8 __attribute__((vector_size(32)));
  const v8 lo = (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  const v8 hi = (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
}

static inline __attribute__((always_inline)) TARGET float NAME(hsum)(v16 v) {
  v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

static inline __attribute__((always_inline)) TARGET float NAME(hmax)(v16 v) {
  v16 w = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = pick(v > w, v, w);
  w = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = pick(v > w, v, w);
  w = __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = pick(v > w, v, w);
  w = __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  v = pick(v > w, v, w);
  return v[0];
}

/* 16 vectors' lane sums as one vector (lane t: the sum of p[t]), by a fixed tree of pairwise halvings */
static inline __attribute__((always_inline)) TARGET v16 NAME(sums16)(v16* p) {
  for (int i = 0; i < 8; i++)
    p[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
           + __builtin_shufflevector(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                     30, 31);
  for (int i = 0; i < 4; i++)
    p[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; i++)
    p[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(p[0], p[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(p[0], p[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* Row r's scores (q[r] . K[j] + bias[r][j], j < width; -inf up to `padded`) for keys in blocks of 16: a block's
 * keys are read once from memory for every row. lim[r]: no column at or past it is visible to row r. */
static inline __attribute__((always_inline)) TARGET void NAME(score)(const float* q, int R, const void* K,
    const int half, const float* const* bias, const int* lim, int width, const int chunks, int padded,
    float* scores) {
  const int D = 16 * chunks;
  for (int j0 = 0; j0 < padded; j0 += 16) {
    for (int r = 0; r < R; r++) {
      const float* qr = q + (size_t)r * D;
      if (j0 >= lim[r]) {  /* every column masked (a prefill row's later columns): -inf, as below */
        store16(scores + (size_t)r * padded + j0, splat(-INFINITY));
        continue;
      }
      v16 p[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; t++) {
        const size_t k = (size_t)(j0 + t < width ? j0 + t : width - 1) * D;  /* past the end: any real key */
        v16 acc = load16(qr) * NAME(kv16)(K, k, half);
        for (int c = 1; c < chunks; c++) acc += load16(qr + 16 * c) * NAME(kv16)(K, k + 16 * c, half);
        p[t] = acc;
      }
      /* a masked column scores -inf whatever its key holds (a slot nothing wrote, NaN included) */
      float* out = scores + (size_t)r * padded + j0;
      if (j0 + 16 <= width) {
        const v16 b = load16(bias[r] + j0);
        store16(out, pick(b == splat(-INFINITY), b, NAME(sums16)(p) + b));
      } else {
        store16(out, NAME(sums16)(p));
        for (int t = 0; t < 16; t++)
          out[t] = j0 + t >= width || bias[r][j0 + t] == -INFINITY ? -INFINITY : out[t] + bias[r][j0 + t];
      }
    }
  }
}

/* The first column of w[0 .. width) whose weight is 0 (a masked column), or width. The weights are never negative:
 * a block of 16 holds a 0 where the largest of their negations is 0. */
static inline __attribute__((always_inline)) TARGET int NAME(first_zero)(const float* w, int width) {
  int j = 0;
  while (j + 16 <= width && NAME(hmax)(splat(0.f) - load16(w + j)) < 0.f)
    j += 16;
  for (; j < width; j++)
    if (w[j] == 0.f) return j;
  return width;
}

/* Rows r0 .. r0 + R - 1 (R at most 2): out[r] = sum over columns j of w[r][j] V[j] and l[r] = sum of w[r][j],
 * skipping the zero weights (masked columns: their V may be anything, even NaN, in a slot nothing wrote). Each sum
 * in two halves, in column order: the visible columns of even rank (the count of visible columns before one) and
 * those of odd rank, then the first half plus the second. A visible column's rank is the same whichever other
 * columns a pass lays out around a row's visible ones (a tree's nodes, another layout of the same keys: they keep
 * their order), so a row's sums are too; two halves make two chains of additions where one was a latency-bound
 * chain. Up to the first masked column of the rows (all of a plain step's) the rank is the column's index, and
 * two columns run a step with no test of the rank. */
static inline __attribute__((always_inline)) TARGET void NAME(weigh)(const int R, const float* w, int padded,
    const void* V, const int half, int width, const int* lim, const int chunks, float* l, v16* out) {
  v16 even[2 * 16], odd[2 * 16];
  float l_even[2] = {0.f, 0.f}, l_odd[2] = {0.f, 0.f};
  for (int i = 0; i < R * chunks; i++) even[i] = odd[i] = splat(0.f);
  int open = width;  /* columns [0, open): visible to every row of the group */
  for (int r = 0; r < R; r++) {
    const int z = NAME(first_zero)(w + (size_t)r * padded, open);
    open = z < open ? z : open;
  }
  int j = 0;
  for (; j + 2 <= open; j += 2) {
    const size_t v0 = (size_t)j * 16 * chunks, v1 = v0 + 16 * (size_t)chunks;
    for (int r = 0; r < R; r++) {
      const float x0 = w[(size_t)r * padded + j], x1 = w[(size_t)r * padded + j + 1];
      l_even[r] += x0;
      l_odd[r] += x1;
      for (int c = 0; c < chunks; c++) {
        even[r * chunks + c] += splat(x0) * NAME(kv16)(V, v0 + 16 * c, half);
        odd[r * chunks + c] += splat(x1) * NAME(kv16)(V, v1 + 16 * c, half);
      }
    }
  }
  for (int r = 0; r < R; r++) {  /* the rest one column at a time, each row counting its visible columns */
    int rank = j;
    for (int k = j; k < lim[r]; k++) {  /* past lim[r] every weight is 0 */
      const float x = w[(size_t)r * padded + k];
      if (x == 0.f) continue;
      const size_t v = (size_t)k * 16 * chunks;
      const int in_odd = rank++ & 1;
      v16* into = (in_odd ? odd : even) + r * chunks;
      if (in_odd) l_odd[r] += x;
      else l_even[r] += x;
      for (int c = 0; c < chunks; c++) into[c] += splat(x) * NAME(kv16)(V, v + 16 * c, half);
    }
    l[r] = l_even[r] + l_odd[r];
    for (int c = 0; c < chunks; c++) out[r * chunks + c] = even[r * chunks + c] + odd[r * chunks + c];
  }
}

/* Rows q [R][D] (rotated, scaled) of one head against columns 0 .. width - 1 of its K/V (rows of D floats), each
 * with its bias row: y[r] (D floats). scores: R x width rounded up to 16 floats of scratch. */
static inline __attribute__((always_inline)) TARGET void NAME(attend_d)(const float* q, int R, const void* K,
    const void* V, const int half, const float* const* bias, int width, const int chunks, float* scores,
    float* const* y) {
  const int padded = (width + 15) & ~15;
  int lim[16];  /* R <= 16: past each row's last visible column (a prefill row's later ones are masked) */
  for (int r = 0; r < R; r++) {
    int j = width;
    while (j > 0 && bias[r][j - 1] == -INFINITY) j--;
    lim[r] = j;
  }
  NAME(score)(q, R, K, half, bias, lim, width, chunks, padded, scores);
  for (int r = 0; r < R; r++) {  /* the weights e^(s - max); every column masked (max -inf): all 0 */
    float* s = scores + (size_t)r * padded;
    const int end = (lim[r] + 15) & ~15;  /* the blocks past it are all -inf: weights 0 */
    v16 top = splat(-INFINITY);
    for (int j = 0; j < end; j += 16) {
      v16 v = load16(s + j);
      top = pick(v > top, v, top);
    }
    const float m = NAME(hmax)(top);
    for (int j = 0; j < end; j += 16)
      store16(s + j, m == -INFINITY ? splat(0.f) : NAME(vexp)(load16(s + j) - splat(m)));
    for (int j = end; j < padded; j += 16) store16(s + j, splat(0.f));
  }
#if ISA_WIDTH == 512
  const int G = 2;  /* rows a group: four (reading V half as often) measured no faster */
#else
  const int G = 1;  /* two rows' sums spill AVX2's sixteen registers (the numbers are the same either way) */
#endif
  for (int r0 = 0; r0 < R; r0 += G) {
    float l[2];
    v16 out[2 * 16];
    const float* w = scores + (size_t)r0 * padded;
    const int n = R - r0 < G ? R - r0 : G;
    if (n == 2) NAME(weigh)(2, w, padded, V, half, width, lim + r0, chunks, l, out);
    else NAME(weigh)(1, w, padded, V, half, width, lim + r0, chunks, l, out);
    for (int r = r0; r < R && r < r0 + n; r++) {
      const v16 inv = splat(l[r - r0] > 0.f ? 1.f / l[r - r0] : 0.f);
      for (int c = 0; c < chunks; c++) store16(y[r] + 16 * c, out[(r - r0) * chunks + c] * inv);
    }
  }
}

/* attend_d with the head dimension a constant where it is a common one (the accumulators then stay in registers) */
static inline __attribute__((always_inline)) TARGET void NAME(attend_kv)(const float* q, int R, const void* K,
    const void* V, const int half, const float* const* bias, int width, int D, float* scores, float* const* y) {
  switch (D) {
    case 64: NAME(attend_d)(q, R, K, V, half, bias, width, 4, scores, y); break;
    case 128: NAME(attend_d)(q, R, K, V, half, bias, width, 8, scores, y); break;
    default: NAME(attend_d)(q, R, K, V, half, bias, width, D / 16, scores, y);
  }
}

/* attend_kv over a float32 cache (half 0) or a float16 one (half 1), each compiled on its own */
static TARGET void NAME(attend)(const float* q, int R, const void* K, const void* V, int half,
                                const float* const* bias, int width, int D, float* scores, float* const* y) {
  if (half) NAME(attend_kv)(q, R, K, V, 1, bias, width, D, scores, y);
  else NAME(attend_kv)(q, R, K, V, 0, bias, width, D, scores, y);
}

/* head dimension d and d + D/2 rotated together (half split), then times `scale` */
static TARGET void NAME(rotate)(const float* x, const float* cos, const float* sin, int D, float scale, float* out) {
  const int half = D / 2;
  for (int d = 0; d < half; d++) {
    const float a = x[d], b = x[d + half];
    out[d] = (a * cos[d] - b * sin[d]) * scale;
    out[d + half] = (b * cos[d] + a * sin[d]) * scale;
  }
}
