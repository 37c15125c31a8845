/* Includes vexp_body.h and ISA_BODY (a header name, defined by the includer) once per instruction set: the
 * AVX-512 variant of each function (suffix _avx512), then the AVX2 one (_avx2), from one source on vectors.h's
 * vectors, so the two compute the same numbers. */
#define TARGET __attribute__((target("avx512f,avx512bw,fma")))
#define NAME(x) x##_avx512
#include "vexp_body.h"
#include ISA_BODY
#undef TARGET
#undef NAME
#define TARGET __attribute__((target("avx2,fma")))
#define NAME(x) x##_avx2
#include "vexp_body.h"
#include ISA_BODY
#undef TARGET
#undef NAME
