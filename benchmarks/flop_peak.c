/* One core's arithmetic peak, measured: independent chains of one vector instruction, so the
 * loop runs at the core's issue rate for it (no loads, no dependencies a chain would wait on).
 *   fma_f32:    vfmadd231ps zmm      16 lanes x 2 FLOP                 = 32 FLOP / instruction
 *   dot_bf16:   vdpbf16ps zmm        16 lanes x 2 bf16 products x 2 FLOP = 64 FLOP / instruction
 * Built by benchmarks/flop_peak.py with the system C compiler and called through ctypes. Each
 * function returns a lane sum so the compiler cannot drop the loop. */
#include <immintrin.h>
#include <stdint.h>

#define CHAINS 16

__attribute__((target("avx512f,fma"))) float fma_f32(int64_t iters) {
  __m512 acc[CHAINS];
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_set1_ps((float)c);
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  __m512 s = acc[0];
  for (int c = 1; c < CHAINS; ++c) s = _mm512_add_ps(s, acc[c]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f,avx512bf16"))) float dot_bf16(int64_t iters) {
  __m512 acc[CHAINS];
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_set1_ps((float)c);
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  __m512 s = acc[0];
  for (int c = 1; c < CHAINS; ++c) s = _mm512_add_ps(s, acc[c]);
  return _mm512_reduce_add_ps(s);
}

/* FLOP per loop iteration of each function (CHAINS instructions). */
int64_t fma_f32_flop_per_iter(void) { return CHAINS * 32; }
int64_t dot_bf16_flop_per_iter(void) { return CHAINS * 64; }
