/* speccompile.kernels::MatMulQ4SiLU: a gated MLP's first product and its gate in one op,
 *     y[..., N/2] = silu(x @ W[:, :N/2]) * (x @ W[:, N/2:]),   silu(z) = z / (1 + e^-z),
 * for MatMulQ4's weight of the gate and up matrices joined along the outputs (N = 2 I). A task computes one tile
 * of 16 gate outputs and the matching tile of up outputs for every row (MatMulQ4's own tile functions, so each is
 * bit for bit MatMulQ4's), then the gate: the Split, Sigmoid and Mul nodes a layer ran after its product are gone,
 * each a pass's fixed cost on a CPU (docs/results.md, "A layer's gate in its product"). The gate is computed on
 * vectors.h's vectors with vexp_body.h's e^x: the same numbers on AVX-512 and AVX2, each row alone. */
#include <stdlib.h>
#include "q4.h"
#include "vectors.h"

#define ISA_BODY "gated_body.h"
#include "isa_variants.h"

#define LOCAL_ROWS 64  /* rows whose two tiles of sums fit the stack (8 KiB) */

/* tile t of the gated output: MatMulQ4's tiles t and t + N/32 into scratch (row r: 16 gate sums, then 16 up), then
 * the gate into y */
void q4_gated_tile(const Gated* g, size_t t, void (*tile)(const Product*, size_t), int avx512) {
  const Product* p = &g->product;
  const int nb = p->K / BLOCK;
  float local[LOCAL_ROWS * 2 * TILE], *sums = p->M <= LOCAL_ROWS ? local : malloc(sizeof(float) * 2 * TILE * p->M);
  if (!sums) {
    *g->failed = 1;  /* a worker cannot return an error: the op fails after the pass */
    return;
  }
  const size_t halves = (size_t)(p->N / 2 / TILE);
  Product gate = *p, up = *p;  /* tile 0 of a product whose records start at the tile's, into a row of 32 sums */
  gate.w = p->w + t * (size_t)nb * RECORD, gate.y = sums, gate.N = 2 * TILE;
  up.w = p->w + (t + halves) * (size_t)nb * RECORD, up.y = sums + TILE, up.N = 2 * TILE;
  tile(&gate, 0);
  tile(&up, 0);
  if (avx512) silu_gate_avx512(sums, p->M, g->y + t * TILE, p->N / 2);
  else silu_gate_avx2(sums, p->M, g->y + t * TILE, p->N / 2);
  if (sums != local) free(sums);
}
