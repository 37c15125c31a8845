/* speccompile.kernels::RMSNorm and ::SkipRMSNorm: a layer's RMSNorm, alone or after its residual add,
 *     RMSNorm:      y = x / sqrt(mean(x^2) + epsilon) * gamma
 *     SkipRMSNorm:  s = x + skip,  y = s / sqrt(mean(s^2) + epsilon) * gamma   (outputs y and s)
 * for x, skip [..., H] float32, gamma [H], attribute epsilon (float). Why a kernel of our own: onnxruntime's
 * SkipSimplifiedLayerNormalization hands two rows or more to its thread pool, and a verify pass's few rows of a
 * small model pay that hand-off at each of its norms, more than the norm itself (docs/results.md, "A verify row's
 * fixed costs"). Here a pass's rows run inline up to PARALLEL_ROWS (a prefill chunk's on the pool). Each row is
 * computed alone, its squares summed in sixteen lanes in a fixed order then folded in a fixed tree, so a row gets
 * the same numbers whatever rows share its pass, on every machine the library runs on. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ort_abi.h"

#define LANES 16
#define PARALLEL_ROWS 32

typedef struct { const float *x, *skip, *gamma; float *y, *sum; int64_t H; float eps; } Norm;

static __attribute__((target("avx2"))) void norm_row(void* arg, size_t row) {
  const Norm* a = arg;
  const int64_t H = a->H, at = (int64_t)row * H;
  const float* x = a->x + at;
  float* s = a->skip ? a->sum + at : NULL;
  if (s) {
    for (int64_t i = 0; i < H; i++) s[i] = x[i] + a->skip[at + i];
    x = s;
  }
  float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= H; i += LANES)
    for (int j = 0; j < LANES; j++) acc[j] += x[i + j] * x[i + j];
  for (int j = 0; i + j < H; j++) acc[j] += x[i + j] * x[i + j];
  for (int width = LANES / 2; width; width /= 2)
    for (int j = 0; j < width; j++) acc[j] += acc[j + width];
  const float inv = 1.f / sqrtf(acc[0] / (float)H + a->eps);
  float* y = a->y + at;
  for (i = 0; i < H; i++) y[i] = x[i] * inv * a->gamma[i];
}

/* ---- the onnxruntime ops ---- */

static const OrtApi* api;

static OrtStatus* fail(const char* message) { return ORT_SLOT(api, CreateStatus)(ORT_FAIL, message); }
#define CHECK(call) do { OrtStatus* s_ = (call); if (s_) return s_; } while (0)

typedef struct { float eps; int skip; } Kernel;

static OrtStatus* shape_of(const OrtValue* v, int64_t* dims, size_t* rank) {
  return ort_dims(api, v, dims, 8, rank, "RMSNorm: inputs of 1 to 8 dimensions");
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Kernel* k = kernel;
  const OrtValue *xv, *sv = NULL, *gv;
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 0, &xv));
  if (k->skip) CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 1, &sv));
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 1 + k->skip, &gv));
  int64_t dims[8], sdims[8], gdims[8], rows = 1;
  size_t rank, srank, grank;
  CHECK(shape_of(xv, dims, &rank));
  CHECK(shape_of(gv, gdims, &grank));
  const int64_t H = dims[rank - 1];
  if (grank != 1 || gdims[0] != H) return fail("RMSNorm: gamma is [H], H the last dimension of x");
  if (sv) {
    CHECK(shape_of(sv, sdims, &srank));
    if (srank != rank || memcmp(sdims, dims, rank * sizeof(int64_t)))
      return fail("SkipRMSNorm: skip has the shape of x");
  }
  for (size_t i = 0; i + 1 < rank; i++) rows *= dims[i];
  Norm a = {.H = H, .eps = k->eps};
  void* p;
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)xv, &p)); a.x = p;
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)gv, &p)); a.gamma = p;
  OrtValue *yv, *sumv;
  CHECK(ORT_SLOT(api, KernelContext_GetOutput)(ctx, 0, dims, rank, &yv));
  CHECK(ORT_SLOT(api, GetTensorMutableData)(yv, &p)); a.y = p;
  if (sv) {
    CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)sv, &p)); a.skip = p;
    CHECK(ORT_SLOT(api, KernelContext_GetOutput)(ctx, 1, dims, rank, &sumv));
    CHECK(ORT_SLOT(api, GetTensorMutableData)(sumv, &p)); a.sum = p;
  }
  if (!rows || !H) return NULL;
  if (rows < PARALLEL_ROWS) {
    for (int64_t r = 0; r < rows; r++) norm_row(&a, (size_t)r);
    return NULL;
  }
  return ORT_SLOT(api, KernelContext_ParallelFor)(ctx, norm_row, (size_t)rows, 0, &a);
}

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info, void** out);
static const char* op_name(const OrtCustomOp* op);
static int float_type(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return ORT_TENSOR_FLOAT; }
static size_t rms_inputs(const OrtCustomOp* op) { (void)op; return 2; }
static size_t skip_inputs(const OrtCustomOp* op) { (void)op; return 3; }
static size_t rms_outputs(const OrtCustomOp* op) { (void)op; return 1; }
static size_t skip_outputs(const OrtCustomOp* op) { (void)op; return 2; }
static void destroy_kernel(void* kernel) { free(kernel); }

#define NORM_OP(inputs, outputs) {OP_SLOTS(op_name, float_type, inputs, float_type, outputs, op_required)}
OrtCustomOp rms_norm_op = NORM_OP(rms_inputs, rms_outputs), skip_rms_norm_op = NORM_OP(skip_inputs, skip_outputs);

static const char* op_name(const OrtCustomOp* op) { return op == &skip_rms_norm_op ? "SkipRMSNorm" : "RMSNorm"; }

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info, void** out) {
  (void)a;
  Kernel k = {.skip = op == &skip_rms_norm_op};
  CHECK(ORT_SLOT(api, KernelInfoGetAttribute_float)(info, "epsilon", &k.eps));
  if (!(k.eps >= 0.f && isfinite(k.eps))) return fail("RMSNorm: epsilon is a finite number >= 0");
  Kernel* kernel = malloc(sizeof(Kernel));
  if (!kernel) return fail("RMSNorm: out of memory");
  *kernel = k;
  *out = kernel;
  return NULL;
}

void norm_register(const OrtApi* a) { api = a; }
