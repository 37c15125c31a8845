/* The pieces of onnxruntime's C ABI this kernel uses, declared by position rather than by including
 * onnxruntime_c_api.h (which onnxruntime's Python wheels do not ship). OrtApi is a table of function pointers that
 * only ever grows: a function's slot is fixed from the release that added it, so these indices hold for every
 * onnxruntime that provides API version ORT_ABI_VERSION (1.17) or later. OrtCustomOp is the struct a library fills
 * to describe an op; onnxruntime reads only the fields its `version` says exist. */
#ifndef SPECCOMPILE_ORT_ABI_H
#define SPECCOMPILE_ORT_ABI_H
#include <stddef.h>
#include <stdint.h>

#define ORT_ABI_VERSION 17
#define ORT_FAIL 1                      /* OrtErrorCode */
#define ORT_TENSOR_FLOAT 1              /* ONNXTensorElementDataType */
#define ORT_TENSOR_UINT8 2
#define ORT_TENSOR_INT32 6
#define ORT_TENSOR_INT64 7
#define ORT_TENSOR_FLOAT16 10
#define ORT_TENSOR_DOUBLE 11
#define ORT_INPUT_OUTPUT_REQUIRED 0     /* OrtCustomOpInputOutputCharacteristic */
#define ORT_INPUT_OUTPUT_OPTIONAL 1
#define ORT_MEM_TYPE_DEFAULT 0          /* OrtMemType */

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;           /* opaque here: reached through ORT_SLOT */
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;

typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

/* slot index and signature of each OrtApi function used */
#define SLOT_CreateStatus 0
typedef OrtStatus* (*CreateStatus_t)(int code, const char* message);
#define SLOT_CreateCustomOpDomain 26
typedef OrtStatus* (*CreateCustomOpDomain_t)(const char* domain, OrtCustomOpDomain** out);
#define SLOT_CustomOpDomain_Add 27
typedef OrtStatus* (*CustomOpDomain_Add_t)(OrtCustomOpDomain* domain, const void* op);
#define SLOT_AddCustomOpDomain 28
typedef OrtStatus* (*AddCustomOpDomain_t)(OrtSessionOptions* options, OrtCustomOpDomain* domain);
#define SLOT_GetTensorMutableData 51
typedef OrtStatus* (*GetTensorMutableData_t)(OrtValue* value, void** out);
#define SLOT_GetDimensionsCount 61
typedef OrtStatus* (*GetDimensionsCount_t)(const OrtTensorTypeAndShapeInfo* info, size_t* out);
#define SLOT_GetDimensions 62
typedef OrtStatus* (*GetDimensions_t)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t count);
#define SLOT_GetTensorTypeAndShape 65
typedef OrtStatus* (*GetTensorTypeAndShape_t)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);
#define SLOT_KernelInfoGetAttribute_float 85
typedef OrtStatus* (*KernelInfoGetAttribute_float_t)(const OrtKernelInfo* info, const char* name, float* out);
#define SLOT_KernelInfoGetAttribute_int64 86
typedef OrtStatus* (*KernelInfoGetAttribute_int64_t)(const OrtKernelInfo* info, const char* name, int64_t* out);
#define SLOT_KernelContext_GetInput 90
typedef OrtStatus* (*KernelContext_GetInput_t)(const OrtKernelContext* context, size_t index, const OrtValue** out);
#define SLOT_KernelContext_GetOutput 91
typedef OrtStatus* (*KernelContext_GetOutput_t)(OrtKernelContext* context, size_t index, const int64_t* dims,
                                                size_t count, OrtValue** out);
#define SLOT_ReleaseStatus 93
typedef void (*ReleaseStatus_t)(OrtStatus* status);
#define SLOT_ReleaseTensorTypeAndShapeInfo 99
typedef void (*ReleaseTensorTypeAndShapeInfo_t)(OrtTensorTypeAndShapeInfo* info);
#define SLOT_KernelContext_ParallelFor 274
typedef OrtStatus* (*KernelContext_ParallelFor_t)(const OrtKernelContext* context, void (*fn)(void*, size_t),
                                                  size_t total, size_t num_batch, void* user_data);

#define ORT_SLOT(api, name) ((name##_t)(((void* const*)(api))[SLOT_##name]))

/* OrtCustomOp, field for field; the ones this op leaves NULL are declared as plain pointers */
typedef struct OrtCustomOp {
  uint32_t version;
  void* CreateKernel;
  const char* (*GetName)(const struct OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const struct OrtCustomOp* op);
  int (*GetInputType)(const struct OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp* op);
  int (*GetOutputType)(const struct OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp* op);
  void* KernelCompute;
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const struct OrtCustomOp* op, size_t index);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp* op, size_t index);
  int (*GetInputMemoryType)(const struct OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                               void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
  void* InferOutputShapeFn;
  int (*GetStartVersion)(const struct OrtCustomOp* op);
  int (*GetEndVersion)(const struct OrtCustomOp* op);
  void* GetMayInplace;
  void* ReleaseMayInplace;
  void* GetAliasMap;
  void* ReleaseAliasMap;
} OrtCustomOp;

/* The slots every op of the library fills alike: CPU, no variadic inputs, every opset. Each op then names its own
 * GetName, input and output types and counts, characteristics of its inputs, and its kernel's functions. */
static inline const char* op_cpu(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static inline int op_required(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return ORT_INPUT_OUTPUT_REQUIRED; }
static inline int op_memory(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return ORT_MEM_TYPE_DEFAULT; }
static inline int op_one(const OrtCustomOp* op) { (void)op; return 1; }
static inline int op_last_opset(const OrtCustomOp* op) { (void)op; return 1 << 30; }
/* v's dimensions into dims (room for max_rank) and its rank; a failed status with message `wrong_rank` where the
 * rank is not 1 .. max_rank. Every op of the library reads its inputs' shapes this way. */
static inline OrtStatus* ort_dims(const OrtApi* api, const OrtValue* v, int64_t* dims, size_t max_rank, size_t* rank,
                                  const char* wrong_rank) {
  OrtTensorTypeAndShapeInfo* info;
  OrtStatus* s = ORT_SLOT(api, GetTensorTypeAndShape)(v, &info);
  if (s) return s;
  s = ORT_SLOT(api, GetDimensionsCount)(info, rank);
  if (!s && (*rank < 1 || *rank > max_rank)) s = ORT_SLOT(api, CreateStatus)(ORT_FAIL, wrong_rank);
  if (!s) s = ORT_SLOT(api, GetDimensions)(info, dims, *rank);
  ORT_SLOT(api, ReleaseTensorTypeAndShapeInfo)(info);
  return s;
}

#define OP_COMMON_SLOTS                                                                                      \
  .version = ORT_ABI_VERSION, .GetExecutionProviderType = op_cpu, .GetOutputCharacteristic = op_required,   \
  .GetInputMemoryType = op_memory, .GetVariadicInputMinArity = op_one, .GetVariadicInputHomogeneity = op_one, \
  .GetVariadicOutputMinArity = op_one, .GetVariadicOutputHomogeneity = op_one, .GetStartVersion = op_one,     \
  .GetEndVersion = op_last_opset

/* An op's table: OP_COMMON_SLOTS, its name, input and output types and counts, its inputs' characteristic, and the
 * kernel functions every op file defines under the same names (create_kernel, compute, destroy_kernel). */
#define OP_SLOTS(name, in_type, in_count, out_type, out_count, in_characteristic)                               \
  OP_COMMON_SLOTS, .GetName = name, .GetInputType = in_type, .GetInputTypeCount = in_count,                     \
  .GetOutputType = out_type, .GetOutputTypeCount = out_count, .KernelDestroy = destroy_kernel,                   \
  .GetInputCharacteristic = in_characteristic, .CreateKernelV2 = create_kernel, .KernelComputeV2 = compute

#endif
