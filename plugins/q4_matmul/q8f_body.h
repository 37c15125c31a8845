/* MatMulQ8F's tile function, written once, included by q8f.c once per instruction set (TARGET, NAME, ISA_WIDTH as
 * isa_variants.h defines them): the same operations in the same order on AVX-512 and AVX2, so both compute the same
 * numbers. A vector holds one register's lanes: the tile's 16 outputs on AVX-512, half of them on AVX2 (a half at a
 * time: its partial sums then fit the 16 registers). Each code made signed (stored ^ 0x80) and sign-extended from
 * its byte of the lane, to float (exact); four partial sums per block, one per byte i (k = 4j + i, j in order, one
 * fused multiply-add each: four dependency chains rather than one), added (s0 + s1) + (s2 + s3); then the block's
 * scale weighs that into the output, block after block. Each fused multiply-add is one expression, which the
 * compiler contracts. */

#define LANES (ISA_WIDTH / 32)  /* outputs a vector holds */
#define ROWS_Q8F (ISA_WIDTH == 512 ? 4 : 2)  /* rows a pass over the records computes: their sums fill the registers */
typedef float NAME(f32v) __attribute__((vector_size(ISA_WIDTH / 8)));
typedef int NAME(i32v) __attribute__((vector_size(ISA_WIDTH / 8)));
typedef unsigned NAME(u32v) __attribute__((vector_size(ISA_WIDTH / 8)));

/* outputs [h * LANES, (h + 1) * LANES) of tile t, rows r0 .. r0 + R - 1 */
static inline __attribute__((always_inline)) TARGET void NAME(q8f_rows)(const int R, const FloatProduct* p, size_t t,
                                                                        int64_t r0, int h) {
  const int nb = p->K / BLOCK;
  const uint8_t* w = p->w + t * (size_t)nb * RECORD8;
  const float* x = p->x + r0 * p->K;
  NAME(f32v) acc[ROWS_Q8F];
  for (int r = 0; r < R; r++) acc[r] = (NAME(f32v)){0};
  for (int b = 0; b < nb; b++) {
    const uint8_t* rec = w + (size_t)b * RECORD8;
    for (int line = 0; line < RECORD8; line += 64) __builtin_prefetch(rec + 8 * RECORD8 + line);
    NAME(f32v) part[ROWS_Q8F][4];
    for (int r = 0; r < R; r++)
      for (int i = 0; i < 4; i++) part[r][i] = (NAME(f32v)){0};
    for (int j = 0; j < 8; j++) {
      NAME(u32v) c;
      __builtin_memcpy(&c, rec + 64 * j + 4 * LANES * h, sizeof c);
      c ^= 0x80808080u;
      const NAME(f32v) wk[4] = {__builtin_convertvector((NAME(i32v))(c << 24) >> 24, NAME(f32v)),
                                __builtin_convertvector((NAME(i32v))(c << 16) >> 24, NAME(f32v)),
                                __builtin_convertvector((NAME(i32v))(c << 8) >> 24, NAME(f32v)),
                                __builtin_convertvector((NAME(i32v))c >> 24, NAME(f32v))};
      for (int r = 0; r < R; r++) {
        const float* xk = x + (size_t)r * p->K + b * BLOCK + 4 * j;
        for (int i = 0; i < 4; i++) part[r][i] = wk[i] * xk[i] + part[r][i];  /* xk[i] broadcast */
      }
    }
    NAME(f32v) d;
    __builtin_memcpy(&d, rec + 512 + 4 * LANES * h, sizeof d);
    for (int r = 0; r < R; r++) acc[r] = ((part[r][0] + part[r][1]) + (part[r][2] + part[r][3])) * d + acc[r];
  }
  for (int r = 0; r < R; r++) __builtin_memcpy(p->y + (r0 + r) * p->N + t * TILE + LANES * h, &acc[r], sizeof acc[r]);
}

TARGET void NAME(q8f_tile)(const FloatProduct* p, size_t t) {
  for (int h = 0; h < TILE / LANES; h++)
    for (int64_t r = 0; r < p->M; r += ROWS_Q8F)
      switch (p->M - r < ROWS_Q8F ? p->M - r : ROWS_Q8F) {  /* R a constant in each call: its loops unrolled */
#if ISA_WIDTH == 512
        case 4: NAME(q8f_rows)(4, p, t, r, h); break;
        case 3: NAME(q8f_rows)(3, p, t, r, h); break;
#endif
        case 2: NAME(q8f_rows)(2, p, t, r, h); break;
        default: NAME(q8f_rows)(1, p, t, r, h);
      }
}

#undef LANES
#undef ROWS_Q8F
