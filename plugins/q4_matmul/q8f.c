/* speccompile.kernels::MatMulQ8F's tile functions (kernel.c says what the op computes): q8f_body.h, once per
 * instruction set, q8f_tile_avx512 and q8f_tile_avx2. */
#include "q4.h"
#include "vectors.h"  /* isa_variants.h's vexp_body.h is on its vectors */

#define ISA_BODY "q8f_body.h"
#include "isa_variants.h"
