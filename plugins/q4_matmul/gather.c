/* speccompile.kernels::GatherQ8F: rows of an int8 matrix in blocks of 32, as float32. Inputs: the rows, uint8
 * [N, K / 32, 36] (each block's 32 codes stored + 128, as MatMulQ8's are, then its scale as float32), and indices,
 * int64 [...] (ONNX Gather's: -N <= i < N, a negative one counting from the end); attributes K and N; output
 * float32 [..., K]: row i's element k is scale * (code - 128), one float32 product, exact (an 8-bit integer times
 * a scale of a float16's precision, as GGUF's Q8_0 stores them, needs at most 19 bits of mantissa).
 * Why: where an output head lies on the int8 grid exactly (a GGUF Q8_0 head), the exact greedy head's rescored
 * candidates and a tied model's embedding are its rows, and these int8 rows give them without a float32 copy of
 * the matrix in the bundle (compile/graph/head_screen.py head_rows). Row by row, not MatMulQ8's tiles: a
 * candidate's row is then a few consecutive cache lines, where a tile's interleaved codes would scatter it over
 * eight lines a block. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>
#include "ort_abi.h"
#include "q4.h"

#define ROW_BLOCK (BLOCK + 4)  /* a block's codes and scale */

static const OrtApi* api;

static OrtStatus* fail(const char* message) { return ORT_SLOT(api, CreateStatus)(ORT_FAIL, message); }
#define CHECK(call) do { OrtStatus* s_ = (call); if (s_) return s_; } while (0)

typedef struct { int64_t K, N; } Gather;

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info, void** out) {
  (void)op, (void)a;
  Gather g;
  CHECK(ORT_SLOT(api, KernelInfoGetAttribute_int64)(info, "K", &g.K));
  CHECK(ORT_SLOT(api, KernelInfoGetAttribute_int64)(info, "N", &g.N));
  if (g.K <= 0 || g.N <= 0 || g.K % BLOCK || g.K > (1 << 24) || g.N > (1 << 30))
    return fail("GatherQ8F: K must be a positive multiple of 32 (at most 2^24), N positive (at most 2^30)");
  Gather* kernel = malloc(sizeof *kernel);
  if (!kernel) return fail("GatherQ8F: out of memory");
  *kernel = g;
  *out = kernel;
  return NULL;
}

/* row v into y[0 .. K): eight codes at a time widened to int32, less 128, to float, times the block's scale */
static __attribute__((target("avx2"))) void row(const uint8_t* w, int64_t v, int64_t K, float* y) {
  const int64_t nb = K / BLOCK;
  const uint8_t* block = w + (size_t)v * (size_t)nb * ROW_BLOCK;
  const __m256i offset = _mm256_set1_epi32(128);
  for (int64_t b = 0; b < nb; b++, block += ROW_BLOCK, y += BLOCK) {
    float d;
    memcpy(&d, block + BLOCK, sizeof d);
    const __m256 scale = _mm256_set1_ps(d);
    for (int h = 0; h < BLOCK / 8; h++) {
      const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(block + 8 * h)));
      _mm256_storeu_ps(y + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(codes, offset)), scale));
    }
  }
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Gather* g = kernel;
  const OrtValue *wv, *iv;
  OrtValue* yv;
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 0, &wv));
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 1, &iv));
  int64_t dims[17], count = 1, wbytes = 1;
  size_t rank;
  /* the rows input must hold every row an index may name: a graph (a bundle) is not trusted to size it */
  CHECK(ort_dims(api, wv, dims, 16, &rank, "GatherQ8F: the rows have 1 to 16 dimensions"));
  for (size_t i = 0; i < rank; i++) wbytes *= dims[i];
  if (wbytes != g->N * (g->K / BLOCK) * ROW_BLOCK) return fail("GatherQ8F: the rows' size does not fit K and N");
  CHECK(ort_dims(api, iv, dims, 16, &rank, "GatherQ8F: indices have 1 to 16 dimensions"));
  for (size_t i = 0; i < rank; i++) count *= dims[i];
  dims[rank] = g->K;
  CHECK(ORT_SLOT(api, KernelContext_GetOutput)(ctx, 0, dims, rank + 1, &yv));
  void *wp, *ip, *yp;
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)wv, &wp));
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)iv, &ip));
  CHECK(ORT_SLOT(api, GetTensorMutableData)(yv, &yp));
  const int64_t* idx = ip;
  for (int64_t r = 0; r < count; r++)
    if (idx[r] < -g->N || idx[r] >= g->N) return fail("GatherQ8F: an index is outside the matrix's rows");
  for (int64_t r = 0; r < count; r++) row(wp, idx[r] < 0 ? idx[r] + g->N : idx[r], g->K, (float*)yp + r * g->K);
  return NULL;
}

static const char* op_name(const OrtCustomOp* op) { (void)op; return "GatherQ8F"; }
static int input_type(const OrtCustomOp* op, size_t i) { (void)op; return i ? ORT_TENSOR_INT64 : ORT_TENSOR_UINT8; }
static size_t two(const OrtCustomOp* op) { (void)op; return 2; }
static size_t one(const OrtCustomOp* op) { (void)op; return 1; }
static int output_type(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return ORT_TENSOR_FLOAT; }
static void destroy_kernel(void* kernel) { free(kernel); }

OrtCustomOp gather_q8f_op = {OP_SLOTS(op_name, input_type, two, output_type, one, op_required)};

void gather_q8f_register(const OrtApi* a) { api = a; }
