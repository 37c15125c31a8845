/* speccompile.kernels::TopK: ONNX's TopK over the last axis, largest first and sorted (axis -1, largest 1,
 * sorted 1): each row's k largest values, descending, equal values the lower index first; a NaN ranks below every
 * number. Inputs: X [..., n] float, K [1] int64 (0 <= K <= n); outputs: values [..., K] float, indices [..., K]
 * int64. Why a kernel of our own: the exact greedy head picks its 65 candidates out of the whole vocabulary once
 * per row of every pass, and onnxruntime's TopK spends several times what a scan with a running threshold does
 * (docs/results.md, "The head's candidates"). The same outputs as onnxruntime's for numbers
 * (tests/test_q4_matmul.py). */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ort_abi.h"
#include "q4.h"

/* An item as one integer that orders as the ranking does: the value's bits made monotone (a NaN below -inf), then
 * the index inverted (a lower index ranks first among equal values). Rows are at most 2^32 long. */
typedef uint64_t Key;
static inline Key key(float v, int64_t i) {
  uint32_t b;
  memcpy(&b, &v, 4);
  b = isnan(v) ? 0u : (b & 0x80000000u) ? ~b : b | 0x80000000u;  /* -0 and +0 compare equal: one key */
  if (v == 0.f) b = 0x80000000u;
  return (Key)b << 32 | (uint32_t)~(uint32_t)i;
}
static inline int64_t index_of(Key k) { return (int64_t)(uint32_t)~(uint32_t)k; }
static inline float value_of(Key k) {  /* a NaN's key gives NaN */
  uint32_t b = (uint32_t)(k >> 32);
  b = b == 0u ? 0x7FC00000u : (b & 0x80000000u) ? b & 0x7FFFFFFFu : ~b;
  float v;
  memcpy(&v, &b, 4);
  return v;
}

/* heap[0] is the least of the k kept (a min-heap of keys) */
static inline void sift_down(Key* heap, int64_t k, int64_t at) {
  const Key x = heap[at];
  for (;;) {
    int64_t c = 2 * at + 1;
    if (c >= k) break;
    c += c + 1 < k && heap[c + 1] < heap[c];
    if (heap[c] >= x) break;
    heap[at] = heap[c];
    at = c;
  }
  heap[at] = x;
}

static int descending(const void* a, const void* b) {
  const Key x = *(const Key*)a, y = *(const Key*)b;
  return x > y ? -1 : x < y;
}

/* items from `from` on that rank above the least kept: only values that compare greater can (or any number, over
 * a NaN), as a later index loses a tie */
static __attribute__((target("avx2"))) void scan(const float* x, int64_t from, int64_t n, Key* heap, int64_t k) {
  int64_t j = from;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    unsigned mask = (unsigned)_mm256_movemask_ps(
        heap[0] >> 32 == 0 ? _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_GE_OQ)
                           : _mm256_cmp_ps(v, _mm256_set1_ps(value_of(heap[0])), _CMP_GT_OQ));
    for (; mask; mask &= mask - 1) {
      const int64_t t = j + __builtin_ctz(mask);
      const Key c = key(x[t], t);
      if (c > heap[0]) heap[0] = c, sift_down(heap, k, 0);
    }
  }
  for (; j < n; j++) {
    const Key c = key(x[j], j);
    if (c > heap[0]) heap[0] = c, sift_down(heap, k, 0);
  }
}

typedef struct { const float* x; float* values; int64_t* indices; int64_t n, k; int failed; } TopK;

static void top_row(void* arg, size_t row) {
  TopK* a = arg;
  const float* x = a->x + (int64_t)row * a->n;
  Key local[1024], *heap = a->k <= 1024 ? local : malloc(sizeof(Key) * (size_t)a->k);
  if (!heap) {  /* out of memory: the op fails (a worker cannot return an error) */
    a->failed = 1;
    return;
  }
  for (int64_t j = 0; j < a->k; j++) heap[j] = key(x[j], j);
  for (int64_t j = a->k / 2 - 1; j >= 0; j--) sift_down(heap, a->k, j);
  scan(x, a->k, a->n, heap, a->k);
  qsort(heap, (size_t)a->k, sizeof(Key), descending);
  for (int64_t j = 0; j < a->k; j++) {  /* the value as it was read (a NaN's payload, a zero's sign) */
    const int64_t i = index_of(heap[j]);
    a->values[(int64_t)row * a->k + j] = x[i];
    a->indices[(int64_t)row * a->k + j] = i;
  }
  if (heap != local) free(heap);
}

/* ---- the onnxruntime op ---- */

static const OrtApi* api;

static OrtStatus* fail(const char* message) { return ORT_SLOT(api, CreateStatus)(ORT_FAIL, message); }
#define CHECK(call) do { OrtStatus* s_ = (call); if (s_) return s_; } while (0)

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info, void** out) {
  (void)op, (void)a, (void)info;
  *out = NULL;
  return NULL;
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  (void)kernel;
  const OrtValue *xv, *kv;
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 0, &xv));
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 1, &kv));
  int64_t dims[16], kdims[1], rows = 1, k;
  size_t rank, krank;
  CHECK(ort_dims(api, xv, dims, 16, &rank, "TopK: X has 1 to 16 dimensions"));
  CHECK(ort_dims(api, kv, kdims, 1, &krank, "TopK: K is a 1-D tensor of one value"));
  if (kdims[0] != 1) return fail("TopK: K is a 1-D tensor of one value");
  void *xp, *kp, *vp, *ip;
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)kv, &kp));
  k = *(const int64_t*)kp;
  const int64_t n = dims[rank - 1];
  if (k < 0 || k > n) return fail("TopK: K must be between 0 and the last dimension");
  if (n > UINT32_MAX) return fail("TopK: rows of at most 2^32 values");
  for (size_t i = 0; i + 1 < rank; i++) rows *= dims[i];
  dims[rank - 1] = k;
  OrtValue *values, *indices;
  CHECK(ORT_SLOT(api, KernelContext_GetOutput)(ctx, 0, dims, rank, &values));
  CHECK(ORT_SLOT(api, KernelContext_GetOutput)(ctx, 1, dims, rank, &indices));
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)xv, &xp));
  CHECK(ORT_SLOT(api, GetTensorMutableData)(values, &vp));
  CHECK(ORT_SLOT(api, GetTensorMutableData)(indices, &ip));
  if (!rows || !k) return NULL;
  TopK a = {xp, vp, ip, n, k, 0};
  if (rows == 1)  /* a decode step's one row inline: handing it to a worker costs more than it takes */
    top_row(&a, 0);
  else
    CHECK(ORT_SLOT(api, KernelContext_ParallelFor)(ctx, top_row, (size_t)rows, 0, &a));
  return a.failed ? fail("TopK: out of memory") : NULL;
}

static const char* op_name(const OrtCustomOp* op) { (void)op; return "TopK"; }
static int input_type(const OrtCustomOp* op, size_t i) { (void)op; return i ? ORT_TENSOR_INT64 : ORT_TENSOR_FLOAT; }
static size_t two(const OrtCustomOp* op) { (void)op; return 2; }
static int output_type(const OrtCustomOp* op, size_t i) { (void)op; return i ? ORT_TENSOR_INT64 : ORT_TENSOR_FLOAT; }
static void destroy_kernel(void* kernel) { (void)kernel; }

OrtCustomOp top_k_op = {OP_SLOTS(op_name, input_type, two, output_type, two, op_required)};

void top_k_register(const OrtApi* a) { api = a; }
