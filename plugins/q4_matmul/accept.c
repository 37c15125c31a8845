/* speccompile.kernels::GreedyAccept: the verify extension's greedy acceptance (speccompile.graphs, "acceptance")
 * in one op. Inputs: input_ids [1, S], logits_index [R] (the verified rows' places in input_ids), node_parents [R]
 * or [1] (broadcast; -1 for a root, else an earlier row), argmax [R] (each row's greedy token), all int64.
 * Outputs: node_prob [R] float64 (zeros: greedy tests have no probabilities), accept_node, accept_len and
 * accept_token [1] int64.
 * A node passes when its token is its parent row's argmax; of siblings the first in row order that passes is kept;
 * the accepted path ends at the deepest row whose every ancestor (itself included) is a root or kept, the lowest
 * such row among equals; its length is that row's depth and the token after it that row's argmax. Why an op: the
 * standard-op form builds [R, R] relations from some eighty small nodes, and on a CPU each costs a verify pass more
 * than the arithmetic (docs/results.md, "A verify row's fixed costs"); the sampled rule stays in standard ops. */
#include <stdlib.h>
#include <string.h>
#include "ort_abi.h"

#define LOCAL_ROWS 256

/* end and length of the accepted path; -1 where the parents are not a forest of earlier rows */
static int64_t accepted(const int64_t* tok, const int64_t* par, const int64_t* argmax, int64_t R, char* kept,
                        int64_t* len) {
  for (int64_t r = 0; r < R; r++) {
    if (par[r] < -1 || par[r] >= r) return -1;
    kept[r] = par[r] < 0 || tok[r] == argmax[par[r]];
    for (int64_t j = 0; kept[r] && par[r] >= 0 && j < r; j++)  /* an earlier sibling that passed comes first */
      if (par[j] == par[r] && tok[j] == argmax[par[r]]) kept[r] = 0;
  }
  int64_t end = 0, best = -1;
  for (int64_t r = 0; r < R; r++) {
    int64_t depth = 0, at = r;
    int ok = kept[r];
    for (; ok && par[at] >= 0; depth++) at = par[at], ok = kept[at];
    if (ok && depth > best) best = depth, end = r;
  }
  *len = best;
  return end;
}

/* ---- the onnxruntime op ---- */

static const OrtApi* api;

static OrtStatus* fail(const char* message) { return ORT_SLOT(api, CreateStatus)(ORT_FAIL, message); }
#define CHECK(call) do { OrtStatus* s_ = (call); if (s_) return s_; } while (0)

static OrtStatus* input(OrtKernelContext* ctx, size_t i, const int64_t** data, int64_t* count) {
  const OrtValue* v;
  int64_t dims[8];
  size_t rank;
  CHECK(ORT_SLOT(api, KernelContext_GetInput)(ctx, i, &v));
  CHECK(ort_dims(api, v, dims, 8, &rank, "GreedyAccept: inputs of 1 to 8 dimensions"));
  *count = 1;
  for (size_t d = 0; d < rank; d++) *count *= dims[d];
  void* p;
  CHECK(ORT_SLOT(api, GetTensorMutableData)((OrtValue*)v, &p));
  *data = p;
  return NULL;
}

static OrtStatus* output(OrtKernelContext* ctx, size_t i, int64_t n, void** data) {
  OrtValue* v;
  CHECK(ORT_SLOT(api, KernelContext_GetOutput)(ctx, i, &n, 1, &v));
  return ORT_SLOT(api, GetTensorMutableData)(v, data);
}

static OrtStatus* decide(const int64_t* ids, int64_t S, const int64_t* index, const int64_t* parents, int64_t P,
                         const int64_t* argmax, int64_t R, int64_t* tok, int64_t* par, char* kept, int64_t out[3]) {
  for (int64_t r = 0; r < R; r++) {
    if (index[r] < 0 || index[r] >= S) return fail("GreedyAccept: a logits_index outside input_ids");
    tok[r] = ids[index[r]];
    par[r] = parents[P == 1 ? 0 : r];
  }
  out[0] = accepted(tok, par, argmax, R, kept, &out[1]);
  if (out[0] < 0) return fail("GreedyAccept: node_parents must name an earlier row or -1");
  out[2] = argmax[out[0]];
  return NULL;
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  (void)kernel;
  const int64_t *ids, *index, *parents, *argmax;
  int64_t S, R, P, A;
  CHECK(input(ctx, 0, &ids, &S));
  CHECK(input(ctx, 1, &index, &R));
  CHECK(input(ctx, 2, &parents, &P));
  CHECK(input(ctx, 3, &argmax, &A));
  if (R < 1 || A != R || (P != R && P != 1))
    return fail("GreedyAccept: logits_index and argmax have R >= 1 rows, node_parents R or 1");
  void *prob, *node, *len, *token;
  CHECK(output(ctx, 0, R, &prob));
  CHECK(output(ctx, 1, 1, &node));
  CHECK(output(ctx, 2, 1, &len));
  CHECK(output(ctx, 3, 1, &token));
  memset(prob, 0, sizeof(double) * (size_t)R);
  int64_t local[2 * LOCAL_ROWS], out[3] = {0, 0, 0};
  char local_kept[LOCAL_ROWS];
  int64_t* rows = R <= LOCAL_ROWS ? local : malloc(sizeof(int64_t) * 2 * (size_t)R);
  char* kept = R <= LOCAL_ROWS ? local_kept : malloc((size_t)R);
  OrtStatus* s = rows && kept ? decide(ids, S, index, parents, P, argmax, R, rows, rows + R, kept, out)
                              : fail("GreedyAccept: out of memory");
  if (rows != local) free(rows);
  if (kept != local_kept) free(kept);
  CHECK(s);
  *(int64_t*)node = out[0], *(int64_t*)len = out[1], *(int64_t*)token = out[2];
  return NULL;
}

static const char* op_name(const OrtCustomOp* op) { (void)op; return "GreedyAccept"; }
static int input_type(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return ORT_TENSOR_INT64; }
static size_t four(const OrtCustomOp* op) { (void)op; return 4; }
static int output_type(const OrtCustomOp* op, size_t i) { (void)op; return i ? ORT_TENSOR_INT64 : ORT_TENSOR_DOUBLE; }
static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info, void** out) {
  (void)op, (void)a, (void)info;
  *out = NULL;
  return NULL;
}
static void destroy_kernel(void* kernel) { (void)kernel; }

OrtCustomOp greedy_accept_op = {OP_SLOTS(op_name, input_type, four, output_type, four, op_required)};

void greedy_accept_register(const OrtApi* a) { api = a; }
