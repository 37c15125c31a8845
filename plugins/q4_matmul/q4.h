/* MatMulQ4's and MatMulQ8's pieces shared by their instruction-set variants (avx512.c, avx2.c) and the ops
 * (kernel.c).
 * Every variant computes the same numbers bit for bit: the same integer sums, and the same float operations in the
 * same order (each 32-block's float sum by the fixed tree of block_sum's comment; fused multiply-adds alike). */
#ifndef SPECCOMPILE_Q4_H
#define SPECCOMPILE_Q4_H
#include <stddef.h>
#include <stdint.h>

#define BLOCK 32
#define TILE 16
#define RECORD 320
#define RECORD8 576  /* MatMulQ8: eight 64-byte vectors of codes (stored + 128), then 16 float32 scales */
/* The most rows a tile's pass over the blocks computes together: AVX-512's 32 registers hold eight rows' sums beside a
 * block's codes (a pass of 5 to 8 rows then reads and unpacks the weights once), AVX2's 16 hold four. */
#define ROWS 8
#define ROWS_AVX2 4
/* fn(R, ...) for the rows `left`, R at most 8 (or 4) and a constant in each call: each is fn's row loop unrolled */
#define BY_ROWS_8(left, fn, ...) do { switch ((left) < 8 ? (left) : 8) {                               \
    case 8: fn(8, __VA_ARGS__); break;                                                               \
    case 7: fn(7, __VA_ARGS__); break;                                                               \
    case 6: fn(6, __VA_ARGS__); break;                                                               \
    case 5: fn(5, __VA_ARGS__); break;                                                               \
    case 4: fn(4, __VA_ARGS__); break;                                                               \
    case 3: fn(3, __VA_ARGS__); break;                                                               \
    case 2: fn(2, __VA_ARGS__); break;                                                               \
    default: fn(1, __VA_ARGS__); } } while (0)
#define BY_ROWS_4(left, fn, ...) do { switch ((left) < 4 ? (left) : 4) {                               \
    case 4: fn(4, __VA_ARGS__); break;                                                               \
    case 3: fn(3, __VA_ARGS__); break;                                                               \
    case 2: fn(2, __VA_ARGS__); break;                                                               \
    default: fn(1, __VA_ARGS__); } } while (0)

/* Per row and 32-block of the input: the int8 codes, their scale, the block's float sum (halves added lane by lane,
 * x[i] + x[16 + i], then again at 8, 4, 2 and 1: a fixed tree), and 8 times the sum of its codes. */
typedef struct {
  const int8_t* xq; const float* scale; const float* sum; const int32_t* eights;
  const uint8_t* w; float* y; int64_t M, N; int K;
  float* upper; float slack;  /* MatMulQ8Bound's second output and its margin (NULL, 0: MatMulQ8) */
} Product;

/* One tile's weight records and a group of at most ROWS rows from row r: what a tile function reads and writes */
typedef struct {
  const uint8_t* w; const int8_t* xq; const float *scale, *sum; const int32_t* eights; float* y;
  int nb, K; int64_t N;
  float* upper; float slack;
} Rows;

static inline Rows rows_at(const Product* p, size_t t, int64_t r, int record) {
  const int nb = p->K / BLOCK;
  return (Rows){p->w + t * (size_t)nb * record, p->xq + r * p->K, p->scale + r * nb, p->sum + r * nb,
                p->eights + r * nb, p->y + r * p->N + t * TILE, nb, p->K, p->N,
                p->upper ? p->upper + r * p->N + t * TILE : NULL, p->slack};
}

/* fn(R, &rows, ...) over tile t's groups of at most `most` (8 or 4, a literal) rows (records of `record` bytes) */
#define FOR_ROW_GROUPS(p, t, record, most, fn, ...) do {           \
    for (int64_t r_ = 0; r_ < (p)->M; r_ += most) {                   \
      const Rows g_ = rows_at(p, t, r_, record);                      \
      BY_ROWS_##most((p)->M - r_, fn, &g_, ##__VA_ARGS__);            \
    }                                                                 \
  } while (0)

void q4_quantize_avx512(const float* x, int64_t M, int K, int8_t* xq, float* scale, float* sum, int32_t* eights);
void q4_tile_avx512(const Product* p, size_t tile);  /* outputs 16 * tile .. + 15 of every row */
void q4_quantize_avx2(const float* x, int64_t M, int K, int8_t* xq, float* scale, float* sum, int32_t* eights);
void q4_tile_avx2(const Product* p, size_t tile);
void q8_tile_avx512(const Product* p, size_t tile);  /* MatMulQ8's (p->sum unused) */
void q8_tile_avx2(const Product* p, size_t tile);
/* MatMulQ8Bound's: MatMulQ8's outputs, and in p->upper each output plus p->slack times the bound on its rounding
 * error, sum over blocks b of scale_x[b] * d[b, n] * |w_b[n]|_1 (kernel.c) */
void q8b_tile_avx512(const Product* p, size_t tile);
void q8b_tile_avx2(const Product* p, size_t tile);
/* MatMulQ8F: MatMulQ8's weight records times float32 inputs as they are (no rounding of x); q8f.c */
typedef struct { const float* x; const uint8_t* w; float* y; int64_t M, N; int K; } FloatProduct;
void q8f_tile_avx512(const FloatProduct* p, size_t tile);
void q8f_tile_avx2(const FloatProduct* p, size_t tile);
int q4_has_avx512(void);
/* amx.c: AMX_ROWS rows or more of MatMulQ4 on the tile unit, 16 at a time; the same numbers as q4_tile_avx512 */
#define AMX_ROWS 16
void q4_tile_amx(const Product* p, size_t tile);
int q4_has_amx(void);
int speccompile_amx(void);  /* kernel.c: whether MatMulQ4 uses it */
int q4_has_avx2(void);
int speccompile_cpu_supported(void);  /* kernel.c: 2 AVX-512 VNNI, 1 AVX2, 0 neither */

/* gated.c: speccompile.kernels::MatMulQ4SiLU's tile t (16 outputs of y, the gated half as wide as the product) */
typedef struct { Product product; float* y; int* failed; } Gated;
void q4_gated_tile(const Gated* g, size_t t, void (*tile)(const Product*, size_t), int avx512);

/* attention.c: speccompile.kernels::TreeAttention */
struct OrtCustomOp;
extern struct OrtCustomOp tree_attention_op, tree_attention_f16_op;  /* the float32 cache; a float16 one */
struct OrtApi;
void tree_attention_register(const struct OrtApi* api, int instruction_set);

/* topk.c: speccompile.kernels::TopK (ONNX's TopK over the last axis, largest first, sorted) */
extern struct OrtCustomOp top_k_op;
void top_k_register(const struct OrtApi* api);
/* gather.c: speccompile.kernels::GatherQ8F (rows of MatMulQ8's records as float32) */
extern struct OrtCustomOp gather_q8f_op;
void gather_q8f_register(const struct OrtApi* api);
/* norm.c, accept.c */
extern struct OrtCustomOp rms_norm_op, skip_rms_norm_op, greedy_accept_op;
void norm_register(const struct OrtApi* api);
void greedy_accept_register(const struct OrtApi* api);

#endif
