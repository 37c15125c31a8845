/* MatMulQ4SiLU's gate, included by gated.c once per instruction set (TARGET, NAME as vexp_body.h's). */

/* y[r][c] = silu(g) * u for the rows' 16 gate sums g and 16 up sums u (sums: rows of 32); y's rows `stride` apart.
 * silu(z) = z s, s = 1 / (1 + e^-z) for z >= 0 and e^z / (1 + e^z) below: e^-|z| never overflows. */
static TARGET void NAME(silu_gate)(const float* sums, int64_t M, float* y, int64_t stride) {
  for (int64_t r = 0; r < M; r++) {
    const v16 z = load16(sums + r * 2 * TILE), u = load16(sums + r * 2 * TILE + TILE);
    const i16 negative = z < splat(0.f);
    const v16 t = NAME(vexp)(pick(negative, z, -z));  /* e^-|z| */
    const v16 d = splat(1.f) + t;
    const v16 s = pick(negative, t / d, splat(1.f) / d);
    store16(y + r * stride, z * s * u);
  }
}
