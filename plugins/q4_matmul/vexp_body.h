/* e^x on vectors.h's vectors, included once per instruction set: TARGET is the function's target attribute,
 * NAME(x) its name's suffix (attention.c, gated.c). */

/* e^x lane by lane (Cephes' expf polynomial after x = n ln2 + r), exactly 0 below -87 (a masked column's -inf) */
static inline __attribute__((always_inline)) TARGET v16 NAME(vexp)(v16 x) {
  const v16 magic = splat(12582912.f);  /* 1.5 * 2^23: adding it rounds to a whole number */
  i16 zero = x < splat(-87.f);
  x = pick(zero, splat(-87.f), x);
  v16 t = x * splat(1.44269504088896341f) + magic;
  v16 n = t - magic;
  i16 e = ((i16)t - (i16)magic) << 23;
  v16 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  return (v16)(((i16)p + e) & ~zero);
}
