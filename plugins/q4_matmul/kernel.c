/* speccompile.kernels::MatMulQ4, onnxruntime's CPU provider: y[..., N] = x[..., K] @ W for 4-bit weights in blocks
 * of 32 along K, each block with its own scale d and minimum m per output (W = d * q + m, q in 0..15: GGUF's Q4_1;
 * Q4_0 is m = -8 d). x is rounded to int8 per block of 32 (scale max|x| / 127), as onnxruntime's MatMulNBits does
 * at accuracy level 4, and each block's product is an exact integer sum:
 *     y[n] = sum over blocks b of  scale_x[b] * d[b, n] * (xq_b . (q_b[n] - 8))  +  (8 d[b, n] + m[b, n]) * (sum of x over b)
 * The codes are centred, as MatMulNBits' are, so x's rounding errors meet weights of at most 8 steps rather than 15
 * (uncentred, the logits' error grows); xq . (q - 8) is the unsigned-times-signed dot xq . q less 8 times the sum
 * of the block's xq, both exact integers.
 * Why a kernel of our own: MatMulNBits computes each row of a product by itself past a few rows, so a verify pass
 * pays nearly per row; here a tile of 16 outputs unpacks each block's codes once for eight rows (four on AVX2). avx512.c (VNNI)
 * and avx2.c compute it, the same numbers bit for bit; this file is the op onnxruntime calls.
 * Every row goes through the same operations in the same order whatever the other rows are or how many there
 * are, so a row's result never depends on its pass: speculative output stays bit for bit the plain decoding's.
 *
 * W's layout (plugins/q4_matmul/__init__.py: pack): [N / 16 tiles][K / 32 blocks][320 bytes]: four 64-byte
 * vectors of codes (vector j, lane c = the tile's output c: bytes i = 0..3 hold k = 4j + i in the low nibble and
 * k = 16 + 4j + i in the high one), then the 16 outputs' d and m as float16.
 *
 * speccompile.kernels::MatMulQ8, the same for int8 weights in blocks of 32 with a float32 scale d per block and
 * output (W = d * w, w in -128..127: GGUF's Q8_0 with a float32 scale; onnxruntime's 8-bit MatMulNBits): y[n] = sum
 * over blocks b of scale_x[b] * d[b, n] * (xq_b . w_b[n]), the dot an exact integer. Its weight:
 * [N / 16][K / 32][576 bytes]: eight 64-byte vectors of codes stored + 128 (vector j, lane c = output c: bytes
 * i = 0..3 hold k = 4j + i), then the 16 outputs' d as float32.
 *
 * speccompile.kernels::MatMulQ8F, the same weight times x as it is: y[n] = sum over blocks b of d[b, n] * (x_b .
 * w_b[n]), each block's dot a float32 sum of fused multiply-adds in k's order. The float32 product of a matrix that
 * is exactly int8 blocks (an output head stored as GGUF's Q8_0), reading a quarter of the float32 matrix's bytes.
 *
 * speccompile.kernels::MatMulQ8Bound, MatMulQ8 with a second output: upper[n] = y[n] + slack * sum over blocks b of
 * scale_x[b] * d[b, n] * |w_b[n]|_1 (scale_x: a whole step of x's rounding; attribute slack >= 1 covers the float
 * rounding): an upper bound on the product of x as it is (the exact greedy head's screen:
 * compile/graph/head_screen.py). The norms come from the codes as they stream by, so the bound reads nothing more. */
#include <stdlib.h>
#include <string.h>
#include "ort_abi.h"
#include "q4.h"

/* the instruction set's variant, chosen when the library is registered */
static void (*quantize)(const float*, int64_t, int, int8_t*, float*, float*, int32_t*);
static void (*product_tile)(const Product*, size_t);
static void (*product_tile8)(const Product*, size_t);
static void (*product_tile8b)(const Product*, size_t);
static void (*float_tile8)(const FloatProduct*, size_t);
static int amx;  /* MatMulQ4's products of AMX_ROWS rows or more on the tile unit (amx.c) */
static int avx512;  /* the AVX-512 variants chosen */

/* 2: AVX-512 VNNI, 1: AVX2, 0: neither; $SPECCOMPILE_Q4_ISA=avx2 picks AVX2 on an AVX-512 machine (tests) */
int speccompile_cpu_supported(void) {
  const char* isa = getenv("SPECCOMPILE_Q4_ISA");
  int avx2_only = isa && !strcmp(isa, "avx2");
  return q4_has_avx512() && !avx2_only ? 2 : q4_has_avx2() ? 1 : 0;
}

/* whether MatMulQ4 uses AMX for many rows: AVX-512 chosen, the CPU and the OS allow tiles, and not
 * $SPECCOMPILE_Q4_ISA=avx512 (tests: the VNNI kernel alone) */
int speccompile_amx(void) {
  const char* isa = getenv("SPECCOMPILE_Q4_ISA");
  return speccompile_cpu_supported() == 2 && !(isa && !strcmp(isa, "avx512")) && q4_has_amx();
}

/* x rounded in groups of QUANTIZE_ROWS rows, one group a task: a prefill chunk's rows on every thread (each row
 * rounds alone: the same numbers however the rows are split) */
#define QUANTIZE_ROWS 16
typedef struct { const float* x; int8_t* xq; float *scale, *sum; int32_t* eights; int64_t M; int K; } Rounding;
static void run_quantize(void* rounding, size_t i) {
  const Rounding* q = rounding;
  const int64_t r = (int64_t)i * QUANTIZE_ROWS, n = q->M - r < QUANTIZE_ROWS ? q->M - r : QUANTIZE_ROWS;
  const int nb = q->K / BLOCK;
  quantize(q->x + r * q->K, n, q->K, q->xq + r * q->K, q->scale + r * nb, q->sum + r * nb, q->eights + r * nb);
}

static void run_tile(void* p, size_t t) { product_tile(p, t); }
static void run_tile_amx(void* p, size_t t) { q4_tile_amx(p, t); }
static void run_gated(void* g, size_t t) {
  q4_gated_tile(g, t, amx && ((const Gated*)g)->product.M >= AMX_ROWS ? q4_tile_amx : product_tile, avx512);
}
static void run_tile8(void* p, size_t t) { product_tile8(p, t); }
static void run_tile8b(void* p, size_t t) { product_tile8b(p, t); }
static void run_tile8f(void* p, size_t t) { float_tile8(p, t); }

/* ---- the onnxruntime op ---- */

static const OrtApi* api;
typedef struct { int64_t K, N; int eight_bit, gated, floats, bound; float slack; } Kernel;
static OrtCustomOp matmul_q8, matmul_q8f, matmul_q8b, matmul_q4_silu;

static OrtStatus* fail(const char* message) { return ORT_SLOT(api, CreateStatus)(ORT_FAIL, message); }
#define CHECK(call) do { OrtStatus* s_ = (call); if (s_) return s_; } while (0)

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info, void** out) {
  (void)a;
  Kernel k = {.eight_bit = op == &matmul_q8 || op == &matmul_q8f || op == &matmul_q8b, .gated = op == &matmul_q4_silu,
              .floats = op == &matmul_q8f, .bound = op == &matmul_q8b};
  CHECK(ORT_SLOT(api, KernelInfoGetAttribute_int64)(info, "K", &k.K));
  CHECK(ORT_SLOT(api, KernelInfoGetAttribute_int64)(info, "N", &k.N));
  if (k.bound) {
    CHECK(ORT_SLOT(api, KernelInfoGetAttribute_float)(info, "slack", &k.slack));
    if (!(k.slack >= 1.f && k.slack <= 2.f)) return fail("MatMulQ8Bound: slack must be from 1 to 2");
  }
  if (k.K <= 0 || k.N <= 0 || k.K % BLOCK || k.N % (k.gated ? 2 * TILE : TILE) || k.K > (1 << 24) || k.N > (1 << 24))
    return fail("MatMulQ4/MatMulQ8: K must be a multiple of 32 and N of 16 (MatMulQ4SiLU: of 32), each at most 2^24");
  Kernel* kernel = malloc(sizeof *kernel);
  if (!kernel) return fail("MatMulQ4: out of memory");
  *kernel = k;
  *out = kernel;
  return NULL;
}

/* a tensor's dimensions (at most 16) */
static OrtStatus* shape(const OrtValue* v, int64_t* dims, size_t* rank) {
  return ort_dims(api, v, dims, 16, rank, "MatMulQ4: its inputs have 1 to 16 dimensions");
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Kernel* k = kernel;
  const OrtValue *x, *w;
  OrtValue* y;
  int64_t dims[16], M = 1, wbytes = 1;
  size_t rank;
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 0, &x));
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 1, &w));
  /* the weight must hold every record the op reads: a graph (a bundle) is not trusted to size it */
  CHECK(shape(w, dims, &rank));
  for (size_t i = 0; i < rank; i++) wbytes *= dims[i];
  if (wbytes != k->N / TILE * (k->K / BLOCK) * (k->eight_bit ? RECORD8 : RECORD))
    return fail("MatMulQ4/MatMulQ8: the weight's size does not fit K and N");
  CHECK(shape(x, dims, &rank));
  if (dims[rank - 1] != k->K) return fail("MatMulQ4: x's last dimension is not the op's K");
  for (size_t i = 0; i + 1 < rank; i++) M *= dims[i];
  dims[rank - 1] = k->gated ? k->N / 2 : k->N;
  CHECK(ORT_SLOT(api, KernelContext_GetOutput)(ctx, 0, dims, rank, &y));
  OrtValue* upper = NULL;
  void *xp, *wp, *yp, *up = NULL;
  if (k->bound) {
    CHECK(ORT_SLOT(api, KernelContext_GetOutput)(ctx, 1, dims, rank, &upper));
    CHECK(ORT_SLOT(api, GetTensorMutableData)(upper, &up));
  }
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)x, &xp));
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)w, &wp));
  CHECK(ORT_SLOT(api, GetTensorMutableData)(y, &yp));
  if (M == 0) return NULL;
  if (k->floats) {  /* MatMulQ8F: x as it is, no rounding */
    FloatProduct fp = {xp, wp, yp, M, k->N, (int)k->K};
    return ORT_SLOT(api, KernelContext_ParallelFor)(ctx, run_tile8f, (size_t)(k->N / TILE), 0, &fp);
  }
  OrtStatus* s = NULL;
  const int K = (int)k->K, nb = K / BLOCK;
  /* per row and block: scale, sum, eights (4 bytes each), then the codes; on the stack for a decode pass's few
   * rows (no allocation per product per step), the heap for a prefill chunk's many */
  _Alignas(64) unsigned char local[32768];
  const size_t need = 3 * sizeof(float) * (size_t)M * nb + (size_t)M * K;
  float* scale = need <= sizeof local ? (float*)local : malloc(need);
  if (!scale) return fail("MatMulQ4: out of memory");
  float* sum = scale + M * nb;
  int32_t* eights = (int32_t*)(sum + M * nb);
  int8_t* xq = (int8_t*)(eights + M * nb);
  Rounding rounding = {xp, xq, scale, sum, eights, M, K};
  const size_t groups = (size_t)((M + QUANTIZE_ROWS - 1) / QUANTIZE_ROWS);
  if (groups > 1)  /* a decode pass's few rows inline: handing one task out costs more than it saves */
    s = ORT_SLOT(api, KernelContext_ParallelFor)(ctx, run_quantize, groups, 0, &rounding);
  else
    run_quantize(&rounding, 0);
  Product p = {xq, scale, sum, eights, wp, yp, M, k->N, K, up, k->slack};
  void (*each)(void*, size_t) = k->bound ? run_tile8b : k->eight_bit ? run_tile8
                                : amx && M >= AMX_ROWS ? run_tile_amx : run_tile;
  int failed = 0;
  Gated gated = {p, yp, &failed};
  if (!s && k->gated)
    s = ORT_SLOT(api, KernelContext_ParallelFor)(ctx, run_gated, (size_t)(k->N / 2 / TILE), 0, &gated);
  else if (!s) s = ORT_SLOT(api, KernelContext_ParallelFor)(ctx, each, (size_t)(k->N / TILE), 0, &p);
  if (!s && failed) s = fail("MatMulQ4SiLU: out of memory");
  if ((unsigned char*)scale != local) free(scale);
  return s;
}

static void destroy_kernel(void* kernel) { free(kernel); }
static const char* op_name(const OrtCustomOp* op) {
  return op == &matmul_q8 ? "MatMulQ8" : op == &matmul_q8f ? "MatMulQ8F" : op == &matmul_q8b ? "MatMulQ8Bound"
         : op == &matmul_q4_silu ? "MatMulQ4SiLU" : "MatMulQ4";
}
static int input_type(const OrtCustomOp* op, size_t i) { (void)op; return i == 0 ? ORT_TENSOR_FLOAT : ORT_TENSOR_UINT8; }
static size_t input_count(const OrtCustomOp* op) { (void)op; return 2; }
static int output_type(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return ORT_TENSOR_FLOAT; }
static size_t output_count(const OrtCustomOp* op) { return op == &matmul_q8b ? 2 : 1; }

#define OP {OP_SLOTS(op_name, input_type, input_count, output_type, output_count, op_required)}
static OrtCustomOp matmul_q4 = OP, matmul_q8 = OP, matmul_q8f = OP, matmul_q8b = OP, matmul_q4_silu = OP;

/* onnxruntime calls this on SessionOptions.register_custom_ops_library(path) */
OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  api = base->GetApi(ORT_ABI_VERSION);
  if (!api) return NULL;  /* an onnxruntime older than 1.17: no domain registered, its load error names the op */
  switch (speccompile_cpu_supported()) {
    case 2: quantize = q4_quantize_avx512; product_tile = q4_tile_avx512; product_tile8 = q8_tile_avx512;
            product_tile8b = q8b_tile_avx512; float_tile8 = q8f_tile_avx512; break;
    case 1: quantize = q4_quantize_avx2; product_tile = q4_tile_avx2; product_tile8 = q8_tile_avx2;
            product_tile8b = q8b_tile_avx2; float_tile8 = q8f_tile_avx2; break;
    default: return fail("speccompile's MatMulQ4 needs a CPU with AVX2, FMA and F16C");
  }
  amx = speccompile_amx();
  avx512 = speccompile_cpu_supported() == 2;
  tree_attention_register(api, speccompile_cpu_supported());
  top_k_register(api);
  gather_q8f_register(api);
  norm_register(api);
  greedy_accept_register(api);
  OrtCustomOpDomain* domain;
  CHECK(ORT_SLOT(api, CreateCustomOpDomain)("speccompile.kernels", &domain));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &matmul_q4));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &matmul_q8));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &matmul_q8f));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &matmul_q8b));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &matmul_q4_silu));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &tree_attention_op));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &tree_attention_f16_op));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &top_k_op));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &gather_q8f_op));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &rms_norm_op));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &skip_rms_norm_op));
  CHECK(ORT_SLOT(api, CustomOpDomain_Add)(domain, &greedy_accept_op));
  return ORT_SLOT(api, AddCustomOpDomain)(options, domain);
}
