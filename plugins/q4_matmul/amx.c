/* MatMulQ4 on AMX (Intel's tile unit), for the products of many rows: a prefill chunk's, a large tree's. Sixteen
 * rows at a time, one tdpbssd multiplies a block's int8 input codes (a 16 x 32 tile) by the block's 4-bit codes
 * less 8, unpacked to bytes (8 x 64: row j is avx512.c's vector j, four codes for each of the 16 outputs), giving
 * the same exact integer sums as avx512.c's vpdpbusd and its correction; the float steps after it are avx512.c's,
 * in its order, on the stored sums. So a row's result is bit for bit the VNNI kernel's, whatever the rows beside
 * it: the rows past the last group of 16 go to the VNNI tile function, and a pass of few rows (a decode step, a
 * verify pass) never runs here (its single tile op costs more than the VNNI kernel's few rows: docs/results.md). */
#include <immintrin.h>
#include <cpuid.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "q4.h"

#if defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11  /* the first with AMX intrinsics */
#define AMX __attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c,amx-tile,amx-int8")))
#define GROUP 16  /* rows a tile op multiplies */

/* Linux hands a process the tiles' 8 KiB of register state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA); without it the first tile instruction faults. */
int q4_has_amx(void) {
  unsigned a, b, c, d;
  if (!q4_has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  if (!(d & (1u << 24)) || !(d & (1u << 25))) return 0;  /* AMX-TILE, AMX-INT8 */
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

#define CHUNK 32  /* blocks whose codes are unpacked at a time (16 KiB) */

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

/* tiles 0 and 4: 16 rows x 32 input codes; 1 and 5: a block's codes, 8 x 64 bytes; 2 and 3: 16 x 16 int32 sums.
 * Two of each: a block's tile op runs while the previous block's sums go through the float steps. */
static AMX void configure(void) {
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 2; i++) {
    cfg.rows[4 * i] = GROUP, cfg.colsb[4 * i] = BLOCK;
    cfg.rows[4 * i + 1] = 8, cfg.colsb[4 * i + 1] = 64;
    cfg.rows[2 + i] = GROUP, cfg.colsb[2 + i] = 64;
  }
  _tile_loadconfig(&cfg);
}

/* blocks [b0, b1) of one tile's weight unpacked: each block's 32 codes of each output less 8, as bytes (block b at
 * (b - b0) * 512): the tile op's signed product then gives avx512.c's centred sum, xq . (q - 8), directly */
static inline AMX void unpack(const uint8_t* w, int b0, int b1, uint8_t* codes) {
  const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int b = b0; b < b1; b++) {
    const uint8_t* rec = w + (size_t)b * RECORD;
    uint8_t* c = codes + (b - b0) * 512;
    for (int j = 0; j < 4; j++) {
      __m512i v = _mm512_loadu_si512(rec + 64 * j);
      _mm512_store_si512(c + 64 * j, _mm512_sub_epi8(_mm512_and_si512(v, low), eight));
      _mm512_store_si512(c + 256 + 64 * j, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight));
    }
  }
}

/* avx512.c's float steps for block b of 16 rows, on the block's centred sums */
static inline __attribute__((always_inline)) AMX void float_steps(const Rows* g, int b, const int32_t* sums,
                                                                   __m512* acc) {
  const uint8_t* rec = g->w + (size_t)b * RECORD;
  __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(rec + 256)));
  __m512 offset = _mm512_fmadd_ps(_mm512_set1_ps(8.f), d,
                                  _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(rec + 288))));
#pragma GCC unroll 16
  for (int r = 0; r < GROUP; r++) {
    const int i = r * g->nb + b;
    __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(sums + r * TILE));
    acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(g->scale[i])), acc[r]);
    acc[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(g->sum[i]), acc[r]);
  }
}

/* the tile op of block b into sums tile C (2 or 3), from input tile A and codes tile B (0 and 1, or 4 and 5) */
#define TILE_OP(C, A, B, b) do {                                        \
    _tile_loadd(B, codes + ((b) - b0) * 512, 64);                       \
    _tile_loadd(A, g->xq + (b) * BLOCK, g->K);                          \
    _tile_zero(C);                                                      \
    _tile_dpbssd(C, A, B);                                              \
  } while (0)

/* blocks [b0, b1) of 16 rows, acc carried in and out */
static inline __attribute__((always_inline)) AMX void group(const Rows* g, int b0, int b1, const uint8_t* codes,
                                                             __m512* acc) {
  _Alignas(64) int32_t sums[2][GROUP * TILE];
  int b = b0;
  TILE_OP(2, 0, 1, b);
  _tile_stored(2, sums[0], 64);
  for (b = b0 + 1; b + 1 < b1; b += 2) {
    TILE_OP(3, 4, 5, b);
    float_steps(g, b - 1, sums[0], acc);
    _tile_stored(3, sums[1], 64);
    TILE_OP(2, 0, 1, b + 1);
    float_steps(g, b, sums[1], acc);
    _tile_stored(2, sums[0], 64);
  }
  if (b < b1) {
    TILE_OP(3, 4, 5, b);
    float_steps(g, b - 1, sums[0], acc);
    _tile_stored(3, sums[1], 64);
    float_steps(g, b, sums[1], acc);
  } else {
    float_steps(g, b - 1, sums[0], acc);
  }
}

AMX void q4_tile_amx(const Product* p, size_t t) {
  const int nb = p->K / BLOCK;
  const int64_t whole = p->M / GROUP * GROUP;
  if (whole) {
    _Alignas(64) uint8_t codes[CHUNK * 512];
    configure();
    for (int b0 = 0; b0 < nb; b0 += CHUNK) {  /* the rows' sums so far wait in y between chunks: the same floats */
      const int b1 = b0 + CHUNK < nb ? b0 + CHUNK : nb;
      unpack(p->w + t * (size_t)nb * RECORD, b0, b1, codes);
      for (int64_t r = 0; r < whole; r += GROUP) {
        const Rows g = rows_at(p, t, r, RECORD);
        __m512 acc[GROUP];
        for (int i = 0; i < GROUP; i++) acc[i] = b0 ? _mm512_loadu_ps(g.y + i * g.N) : _mm512_setzero_ps();
        group(&g, b0, b1, codes, acc);
        for (int i = 0; i < GROUP; i++) _mm512_storeu_ps(g.y + i * g.N, acc[i]);
      }
    }
    _tile_release();
  }
  if (whole == p->M) return;
  Product rest = *p;  /* the rows past the last 16, by the VNNI kernel */
  rest.xq += whole * p->K, rest.scale += whole * nb, rest.sum += whole * nb, rest.eights += whole * nb;
  rest.y += whole * p->N, rest.M -= whole;
  q4_tile_avx512(&rest, t);
}
#else
int q4_has_amx(void) { return 0; }
void q4_tile_amx(const Product* p, size_t t) { q4_tile_avx512(p, t); }
#endif
