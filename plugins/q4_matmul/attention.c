/* speccompile.kernels::TreeAttention, onnxruntime's CPU provider: grouped-query attention of a step's rows (a chain,
 * a draft tree, or several sequences' rows) over a static KV cache updated in place, with an additive bias that
 * says which cached and step columns each row sees. The op plugins/tree_attention defines (`reference_numpy`):
 *     K[P + i] = rotate(k_i, position_i), V[P + i] = v_i                       (P: the committed length)
 *     y_i[head] = softmax(rotate(q_i) . K[0 .. P + rows) / sqrt(D) + bias_i) V
 * per sequence n of the batch, rows i < its query_seqlens[n] (all S without that input; the others' output is 0).
 * Why a kernel of our own: onnxruntime's GroupQueryAttention computes a one-row step by another path than a step
 * of two rows or more (its last bits differ), so the "ort" lowering pays a copy row on every step; and it pays
 * per head and row far more than the arithmetic, which is small. Here every row of every head runs the same code
 * (attention_body.h): a row's result is the same bit for bit whatever its pass.
 * Inputs: qkv [N, S, (Hq + 2 Hkv) D] float, past_key and past_value [N, Hkv, L, D], seqlens_k [N] int32 (P + rows
 * - 1, as GroupQueryAttention takes it), cos and sin [positions, D / 2], position_ids [N, S] int64, attention_bias
 * [N, 1, S, T] (T >= P + rows), query_seqlens [N] int32 (optional). Outputs: y [N, S, Hq D], present_key and
 * present_value (bound to the past's buffers, no copy; else the past is copied first).
 * Attribute packed = 1 (a batched graph's packed rows): qkv is [1, P, C], each sequence's real rows one after
 * another (query_seqlens, required, gives how many; P their sum), and y [1, P, Hq D] likewise, so the graph's products
 * run those rows alone with no layout to gather them into; position_ids and attention_bias stay laid out [N, S].
 * speccompile.kernels::TreeAttentionF16 is the same op over a float16 cache (`build --kv-dtype float16`): the step's
 * rotated k and its v rounded to float16 (to nearest, ties to even) as they are written, every cached value widened
 * exactly as it is read, and everything else in float32 as above; a row still reads its own k and v from the cache,
 * so it gets the same numbers in every pass. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ort_abi.h"
#include "q4.h"

#include <immintrin.h>
#include "vectors.h"

#define ISA_BODY "attention_body.h"
#include "isa_variants.h"

#define MAX_HEAD_DIM 256

typedef struct {
  const float *qkv, *cos, *sin, *bias;
  const int64_t* positions;
  const int32_t* rows;  /* each sequence's real rows */
  const int64_t* first;  /* packed: each sequence's first row in qkv and y; NULL: row n S + i */
  const int32_t* seqlens;
  void *K, *V;  /* float, or float16's bits (half) */
  float* y;
  int64_t S, L, T, bias_n;
  int64_t batch, groups;  /* sequences; groups of `group_rows` rows the longest has */
  int group_rows, unit_heads;  /* a unit's rows of a sequence and its query heads (of one K/V head) */
  int Hq, Hkv, D, half;
  float scale;
  int avx512;
} Attention;

#define ROW_GROUP 16  /* rows (a row of one query head each) a unit scores together */
#define UNITS 8  /* units a pass of a few rows a sequence splits into where it can */
#define MIN_UNITS 6  /* fewer units than this leave a thread idle too long */

/* where row i of sequence n sits in qkv and y */
static inline int64_t row_at(const Attention* a, int64_t n, int64_t i) {
  return (a->first ? a->first[n] : n * a->S) + i;
}

/* unit u: query heads h0 .. h0 + unit_heads - 1 (sharing one K/V head) of one sequence's rows g group_rows ..
 * (g + 1) group_rows - 1, for g < groups = the most rows a sequence has over group_rows: every row of every head of
 * the unit is scored against the same keys, so a block of K and V is read once for all of them (a decode pass's one
 * row per sequence: the heads of its K/V head together). The last groups first: a prefill chunk's later rows see
 * more columns, and the pool hands units out in order, so the longest start first. */
static void attend_unit(void* arg, size_t u) {
  const Attention* a = arg;
  const int64_t N = a->batch, groups = a->groups, head_sets = a->Hq / a->unit_heads;
  const int H = a->unit_heads, h0 = (int)(u % head_sets) * H, n = (int)(u / head_sets % N);
  const int g = (int)(groups - 1 - (int64_t)(u / head_sets / N));
  const int kvh = h0 / (a->Hq / a->Hkv), D = a->D;
  const int rows = a->rows[n], width = a->seqlens[n] + 1, padded = (width + 15) & ~15;
  const int i0 = g * a->group_rows;
  if (g == 0)
    for (int64_t i = rows; i < a->S && !a->first; i++)  /* a batch's padding rows */
      memset(a->y + ((int64_t)n * a->S + i) * a->Hq * D + (int64_t)h0 * D, 0, sizeof(float) * D * H);
  if (i0 >= rows) return;
  const int R = (rows - i0 < a->group_rows ? rows - i0 : a->group_rows) * H;  /* row r: row i0 + r / H, head r % H */
  const int64_t C = (int64_t)(a->Hq + 2 * a->Hkv) * D;
  const size_t at = (((size_t)n * a->Hkv + kvh) * a->L * D) * (a->half ? 2 : 4);  /* bytes */
  const void *K = (const char*)a->K + at, *V = (const char*)a->V + at;
  float q[ROW_GROUP * MAX_HEAD_DIM];
  float stack[8192];
  /* scratch for the rows scored together: on the stack for a decode pass's few rows (no allocation per head and
   * layer), the heap for a prefill chunk at a long context */
  const size_t need = (size_t)R * padded;
  float* scores = need <= 8192 ? stack : malloc(sizeof(float) * need);
  const float* bias[ROW_GROUP];
  float* y[ROW_GROUP];
  for (int r = 0; r < R; r++) {
    const int h = h0 + r % H, row = i0 + r / H;
    const int64_t i = row_at(a, n, row), p = a->positions[n * a->S + row];
    bias[r] = a->bias + ((a->bias_n == 1 ? 0 : (int64_t)n) * a->S + row) * a->T;
    y[r] = a->y + i * a->Hq * D + (int64_t)h * D;
    const float *x = a->qkv + i * C + (int64_t)h * D, *cos = a->cos + p * (D / 2), *sin = a->sin + p * (D / 2);
    if (a->avx512) rotate_avx512(x, cos, sin, D, a->scale, q + r * D);
    else rotate_avx2(x, cos, sin, D, a->scale, q + r * D);
  }
  if (!scores) {  /* out of memory: zeros rather than a crash (the op cannot fail from a worker) */
    for (int r = 0; r < R; r++) memset(y[r], 0, sizeof(float) * D);
    return;
  }
  if (a->avx512) attend_avx512(q, R, K, V, a->half, bias, width, D, scores, y);
  else attend_avx2(q, R, K, V, a->half, bias, width, D, scores, y);
  if (scores != stack) free(scores);
}

/* n floats (a multiple of 8) to float16, to nearest with ties to even (the F16C instructions the library
 * requires) */
__attribute__((target("avx,f16c"))) static void to_half(const float* x, uint16_t* out, int n) {
  for (int i = 0; i < n; i += 8)
    _mm_storeu_si128((__m128i*)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

/* the step's k (rotated) and v rows into the cache, after each sequence's committed ones */
static void write_cache(const Attention* a, int64_t N) {
  const int D = a->D, half = D / 2;
  const int64_t C = (int64_t)(a->Hq + 2 * a->Hkv) * D;
  float kc[MAX_HEAD_DIM];
  for (int64_t n = 0; n < N; n++) {
    const int rows = a->rows[n], P = a->seqlens[n] + 1 - rows;
    for (int i = 0; i < rows; i++) {
      const float* x = a->qkv + row_at(a, n, i) * C;
      const int64_t p = a->positions[n * a->S + i];
      const float *cos = a->cos + p * half, *sin = a->sin + p * half;
      for (int h = 0; h < a->Hkv; h++) {
        const float *k = x + (int64_t)(a->Hq + h) * D, *v = x + (int64_t)(a->Hq + a->Hkv + h) * D;
        for (int d = 0; d < half; d++) {
          kc[d] = k[d] * cos[d] - k[d + half] * sin[d];
          kc[d + half] = k[d + half] * cos[d] + k[d] * sin[d];
        }
        const int64_t at = ((n * a->Hkv + h) * a->L + P + i) * D;
        if (a->half) {
          to_half(kc, (uint16_t*)a->K + at, D);
          to_half(v, (uint16_t*)a->V + at, D);
        } else {
          memcpy((float*)a->K + at, kc, sizeof(float) * D);
          memcpy((float*)a->V + at, v, sizeof(float) * D);
        }
      }
    }
  }
}

/* ---- the onnxruntime op ---- */

static const OrtApi* api;
static int isa;  /* speccompile_cpu_supported(), when the library was registered */
typedef struct { int Hq, Hkv, D, half, packed; } Heads;


static OrtStatus* fail(const char* message) { return ORT_SLOT(api, CreateStatus)(ORT_FAIL, message); }
#define CHECK(call) do { OrtStatus* s_ = (call); if (s_) return s_; } while (0)

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info, void** out) {
  (void)a;
  int64_t hq, hkv, d;
  CHECK(ORT_SLOT(api, KernelInfoGetAttribute_int64)(info, "num_heads", &hq));
  CHECK(ORT_SLOT(api, KernelInfoGetAttribute_int64)(info, "kv_num_heads", &hkv));
  CHECK(ORT_SLOT(api, KernelInfoGetAttribute_int64)(info, "head_dim", &d));
  if (hq < 1 || hkv < 1 || hq > 1024 || hq % hkv || d < 16 || d > MAX_HEAD_DIM || d % 16)
    return fail("TreeAttention: num_heads must be a multiple of kv_num_heads, head_dim a multiple of 16 up to 256");
  Heads* heads = malloc(sizeof *heads);
  if (!heads) return fail("TreeAttention: out of memory");
  int64_t packed = 0;
  OrtStatus* absent = ORT_SLOT(api, KernelInfoGetAttribute_int64)(info, "packed", &packed);
  if (absent) ORT_SLOT(api, ReleaseStatus)(absent);  /* optional: 0 */
  *heads = (Heads){(int)hq, (int)hkv, (int)d, op == &tree_attention_f16_op, packed == 1};
  *out = heads;
  return NULL;
}

/* input i's data and dimensions (rank must be `rank`) */
static OrtStatus* input(OrtKernelContext* ctx, size_t i, size_t rank, int64_t* dims, void** data) {
  const OrtValue* v;
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, i, &v));
  if (!v) return fail("TreeAttention: a required input is missing");
  size_t r;
  const char* wrong = "TreeAttention: an input has the wrong rank";
  CHECK(ort_dims(api, v, dims, rank, &r, wrong));
  if (r != rank) return fail(wrong);
  return ORT_SLOT(api, GetTensorMutableData)((OrtValue*)v, data);
}

/* the inputs' shapes agree with each other and every index stays inside its tensor (a bundle is not trusted) */
static const char* check(const Attention* a, int64_t N, const int64_t* qkv, const int64_t* kc, const int64_t* vc,
                         const int64_t* seq, const int64_t* cs, const int64_t* sn, const int64_t* pos,
                         const int64_t* bias, int64_t positions) {
  const int64_t C = (int64_t)(a->Hq + 2 * a->Hkv) * a->D;
  if (qkv[2] != C) return "TreeAttention: qkv's last dimension is not (num_heads + 2 kv_num_heads) head_dim";
  if (a->first && (qkv[0] != 1 || a->first[N] != qkv[1]))
    return "TreeAttention: packed qkv is not [1, the sequences' rows, ...]";
  for (int i = 0; i < 4; i++)
    if (kc[i] != vc[i]) return "TreeAttention: past_key and past_value differ in shape";
  if (kc[0] != N || kc[1] != a->Hkv || kc[3] != a->D) return "TreeAttention: the cache is not [N, kv heads, L, D]";
  if (seq[0] != N || pos[0] != N || pos[1] != a->S) return "TreeAttention: seqlens_k or position_ids do not fit qkv";
  if (cs[1] != a->D / 2 || sn[0] != cs[0] || sn[1] != cs[1]) return "TreeAttention: cos/sin are not [positions, D/2]";
  if ((bias[0] != N && bias[0] != 1) || bias[1] != 1 || bias[2] != a->S) return "TreeAttention: bias not [N, 1, S, T]";
  for (int64_t n = 0; n < N; n++) {
    const int64_t rows = a->rows[n], width = (int64_t)a->seqlens[n] + 1;
    if (rows < 1 || rows > a->S || width < rows || width > a->L || width > a->T)
      return "TreeAttention: a sequence's rows and length do not fit the step, the cache or the bias";
    for (int64_t i = 0; i < rows; i++)
      if (a->positions[n * a->S + i] < 0 || a->positions[n * a->S + i] >= positions)
        return "TreeAttention: a position is outside the rotary tables";
  }
  return NULL;
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Heads* heads = kernel;
  Attention a = {.Hq = heads->Hq, .Hkv = heads->Hkv, .D = heads->D, .half = heads->half, .avx512 = isa >= 2};
  int64_t qkv[3], kc[4], vc[4], seq[1], cs[2], sn[2], pos[2], bias[4], qs[1];
  void *x, *pk, *pv, *sl, *c, *s, *p, *b, *q = NULL;
  CHECK(input(ctx, 0, 3, qkv, &x));
  CHECK(input(ctx, 1, 4, kc, &pk));
  CHECK(input(ctx, 2, 4, vc, &pv));
  CHECK(input(ctx, 3, 1, seq, &sl));
  CHECK(input(ctx, 4, 2, cs, &c));
  CHECK(input(ctx, 5, 2, sn, &s));
  CHECK(input(ctx, 6, 2, pos, &p));
  CHECK(input(ctx, 7, 4, bias, &b));
  const OrtValue* optional;
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, 8, &optional));
  const int64_t N = heads->packed ? seq[0] : qkv[0];
  if (optional) {
    CHECK(input(ctx, 8, 1, qs, &q));
    if (qs[0] != N) return fail("TreeAttention: query_seqlens does not fit qkv");
  } else if (heads->packed) {
    return fail("TreeAttention: packed rows need query_seqlens");
  }
  a.S = heads->packed ? pos[1] : qkv[1], a.L = kc[2], a.T = bias[3], a.bias_n = bias[0];
  int64_t starts[65], *first = NULL;  /* packed: each sequence's first row, then the rows in all */
  if (heads->packed) {
    first = N < 65 ? starts : malloc(sizeof(int64_t) * (size_t)(N + 1));
    if (!first) return fail("TreeAttention: out of memory");
    first[0] = 0;
    for (int64_t n = 0; n < N; n++) first[n + 1] = first[n] + ((const int32_t*)q)[n];
  }
  a.first = first;
  int32_t local[64], *all = NULL;  /* without query_seqlens every row is real (a one-sequence graph: N = 1) */
  if (!q) {
    all = N <= 64 ? local : malloc(sizeof(int32_t) * (size_t)N);
    if (!all) return fail("TreeAttention: out of memory");
    for (int64_t n = 0; n < N; n++) all[n] = (int32_t)a.S;
  }
  a.rows = q ? q : all, a.seqlens = sl, a.positions = p, a.qkv = x, a.cos = c, a.sin = s, a.bias = b;
  a.scale = 1.f / sqrtf((float)a.D);
  const char* wrong = N < 1 || a.S < 1 ? "TreeAttention: an empty step" :
                      check(&a, N, qkv, kc, vc, seq, cs, sn, pos, bias, cs[0]);
  OrtStatus* status = wrong ? fail(wrong) : NULL;
  int64_t ydims[3] = {first ? 1 : N, first ? qkv[1] : a.S, (int64_t)a.Hq * a.D};
  OrtValue *y, *ko, *vo;
  if (!status) status = ORT_SLOT(api, KernelContext_GetOutput)(ctx, 0, ydims, 3, &y);
  if (!status) status = ORT_SLOT(api, KernelContext_GetOutput)(ctx, 1, kc, 4, &ko);
  if (!status) status = ORT_SLOT(api, KernelContext_GetOutput)(ctx, 2, vc, 4, &vo);
  void *yp = NULL, *kp = NULL, *vp = NULL;
  if (!status) status = ORT_SLOT(api, GetTensorMutableData)(y, &yp);
  if (!status) status = ORT_SLOT(api, GetTensorMutableData)(ko, &kp);
  if (!status) status = ORT_SLOT(api, GetTensorMutableData)(vo, &vp);
  if (!status) {
    const size_t bytes = (a.half ? 2 : 4) * (size_t)(kc[0] * kc[1] * kc[2] * kc[3]);
    if (kp != pk) memcpy(kp, pk, bytes);  /* not bound in place: present starts as the past */
    if (vp != pv) memcpy(vp, pv, bytes);
    a.K = kp, a.V = vp, a.y = yp;
    write_cache(&a, N);
    int most = 1;
    for (int64_t n = 0; n < N; n++) most = a.rows[n] > most ? a.rows[n] : most;
    /* A pass of a few rows a sequence (decoding, a draft tree) scores every query head of a K/V head together,
     * its rows split into up to UNITS units, where that leaves at least MIN_UNITS to share out among the pool's
     * threads; else (a prefill chunk, or a single sequence's one row: too few units to keep the threads busy)
     * each head's rows run ROW_GROUP at a time. */
    const int per_kv = a.Hq / a.Hkv;
    a.unit_heads = 1, a.group_rows = ROW_GROUP;
    if ((int64_t)most * per_kv <= ROW_GROUP) {
      const int64_t want = (UNITS + N * a.Hkv - 1) / (N * a.Hkv), rows_each = (most + want - 1) / want;
      if (N * a.Hkv * ((most + rows_each - 1) / rows_each) >= MIN_UNITS)
        a.unit_heads = per_kv, a.group_rows = (int)rows_each;
    }
    a.batch = N, a.groups = (most + a.group_rows - 1) / a.group_rows;
    const size_t units = (size_t)(N * a.groups * (a.Hq / a.unit_heads));
    status = ORT_SLOT(api, KernelContext_ParallelFor)(ctx, attend_unit, units, 0, &a);
  }
  if (all != local) free(all);
  if (first != starts) free(first);
  return status;
}

static void destroy_kernel(void* kernel) { free(kernel); }
static const char* op_name(const OrtCustomOp* op) {
  return op == &tree_attention_f16_op ? "TreeAttentionF16" : "TreeAttention";
}
static int input_type(const OrtCustomOp* op, size_t i) {
  if ((i == 1 || i == 2) && op == &tree_attention_f16_op) return ORT_TENSOR_FLOAT16;
  return i == 3 || i == 8 ? ORT_TENSOR_INT32 : i == 6 ? ORT_TENSOR_INT64 : ORT_TENSOR_FLOAT;
}
static size_t input_count(const OrtCustomOp* op) { (void)op; return 9; }
static int output_type(const OrtCustomOp* op, size_t i) {
  return i > 0 && op == &tree_attention_f16_op ? ORT_TENSOR_FLOAT16 : ORT_TENSOR_FLOAT;
}
static size_t output_count(const OrtCustomOp* op) { (void)op; return 3; }
static int input_required(const OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 8 ? ORT_INPUT_OUTPUT_OPTIONAL : ORT_INPUT_OUTPUT_REQUIRED;
}

#define TREE_ATTENTION_SLOTS OP_SLOTS(op_name, input_type, input_count, output_type, output_count, input_required)
OrtCustomOp tree_attention_op = {TREE_ATTENTION_SLOTS};
OrtCustomOp tree_attention_f16_op = {TREE_ATTENTION_SLOTS};

void tree_attention_register(const OrtApi* a, int instruction_set) { api = a, isa = instruction_set; }
