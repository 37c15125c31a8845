/* Includes vexp_body.h and ISA_BODY (a header name, defined by the includer) once per instruction set: the
 * AVX-512 variant of each function (suffix _avx512), then the AVX2 one (_avx2), from one source on vectors.h's
 * vectors, so the two compute the same numbers. ISA_WIDTH (512 or 256) where a body needs an intrinsic. */
#define TARGET __attribute__((target("avx512f,avx512bw,fma")))
#define NAME(x) x##_avx512
#define ISA_WIDTH 512
#include "vexp_body.h"
#include ISA_BODY
#undef TARGET
#undef NAME
#undef ISA_WIDTH
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define NAME(x) x##_avx2
#define ISA_WIDTH 256
#include "vexp_body.h"
#include ISA_BODY
#undef TARGET
#undef NAME
#undef ISA_WIDTH
