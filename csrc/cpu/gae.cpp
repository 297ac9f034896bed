// Generalised advantage estimation: one reverse scan per row, rows in parallel.
//
// Masked positions are skipped: the recurrence state (next value, next advantage) passes
// through them unchanged and their outputs are 0. The value after a row's last valid
// position is 0. returns = advantages + values on valid positions.
//
// Each row's scan is a serial chain (an FMA per step), so one row at a time is bound by the
// FMA latency, not by memory. Both paths below advance several independent rows per step:
//  * AVX-512 (chosen at run time): 16 rows at once, one per lane. A 16x16 tile (16 rows x
//    16 steps) is loaded row-wise, transposed in registers, scanned column by column and the
//    advantages transposed back; returns and the zeros of masked positions are applied
//    row-wise on the way out, so every input and output is touched once, in cache lines.
//  * generic C++: 8 rows interleaved per step, so 8 chains overlap (also the AVX-512 path's
//    groups of under 8 rows, where 16 lanes would mostly idle).
// Both compute, per row and in the same order, delta = fma(gamma, next_v, r) - v,
// a = fma(gamma*lam, next_a, delta), ret = a + v (one rounding per fma wherever the CPU has
// FMA, whatever the build flags): results do not depend on the path taken for a row, the
// row's position in the batch or the thread count.

// gcc 12 flags the self-initialised placeholder inside its own AVX-512 unpack/convert
// intrinsics as "may be used uninitialized" once inlined (fixed in gcc 13): not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "common.h"
#include "ops.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define RLFUSE_GAE_AVX512 1
#else
#define RLFUSE_GAE_AVX512 0
#endif

namespace rlfuse {
namespace {

struct GaeArgs {
  const float* r;
  const float* v;
  const bool* m;
  float* adv;
  float* ret;
  int64_t b_len, t_len;
  float g, gl;  // gamma and gamma * lam, rounded to float once (as the torch backend does)
};

// kFma: one rounding per multiply-add, as the AVX-512 path always does (so both agree bit for
// bit); without it a*b+c, whatever the compiler makes of it (std::fma would be a libm call).
template <bool kFma>
RLFUSE_INLINE float mul_add(float a, float b, float c) {
  if constexpr (kFma) return std::fma(a, b, c);
  return a * b + c;
}

// kRows rows from row b, interleaved step by step: independent chains the core overlaps.
template <int kRows, bool kFma>
RLFUSE_INLINE void scan_rows(const GaeArgs& p, int64_t b) {
  const int64_t T = p.t_len;
  const int64_t off = b * T;
  float next_v[kRows] = {}, next_a[kRows] = {};
  for (int64_t t = T - 1; t >= 0; --t) {
    for (int j = 0; j < kRows; ++j) {
      const int64_t k = off + j * T + t;
      const bool on = p.m[k];  // branch-free: holes at random positions cost no mispredictions
      const float vk = p.v[k];
      const float delta = mul_add<kFma>(p.g, next_v[j], p.r[k]) - vk;
      const float a = mul_add<kFma>(p.gl, next_a[j], delta);
      p.adv[k] = on ? a : 0.0f;
      p.ret[k] = on ? a + vk : 0.0f;
      next_v[j] = on ? vk : next_v[j];
      next_a[j] = on ? a : next_a[j];
    }
  }
}

// Rows [b0, b1): groups of 8, then the rest one width down at a time.
template <bool kFma>
RLFUSE_INLINE void scan_rows_any(const GaeArgs& p, int64_t b0, int64_t b1) {
  int64_t b = b0;
  for (; b + 8 <= b1; b += 8) scan_rows<8, kFma>(p, b);
  if (b + 4 <= b1) scan_rows<4, kFma>(p, b), b += 4;
  if (b + 2 <= b1) scan_rows<2, kFma>(p, b), b += 2;
  if (b < b1) scan_rows<1, kFma>(p, b);
}

#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
constexpr bool kBuildFma = true;
#else
constexpr bool kBuildFma = false;
#endif

#if RLFUSE_GAE_AVX512
// A build without -mfma still rounds like the AVX-512 path on a CPU that has FMA.
__attribute__((target("fma"))) void gae_rows_fma(const GaeArgs& p, int64_t b0, int64_t b1) {
  scan_rows_any<true>(p, b0, b1);
}
#endif

void gae_rows_generic(const GaeArgs& p, int64_t b0, int64_t b1) {
#if RLFUSE_GAE_AVX512
  static const bool cpu_fma = __builtin_cpu_supports("fma");
  if (!kBuildFma && cpu_fma) return gae_rows_fma(p, b0, b1);
#endif
  scan_rows_any<kBuildFma>(p, b0, b1);
}

#if RLFUSE_GAE_AVX512
#define RLFUSE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define RLFUSE_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), always_inline)) inline

// x[i] (row i, 16 columns) -> x[j] (column j, 16 rows).
RLFUSE_AVX512_INLINE void transpose16(__m512 x[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows, interleaved per element
    t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // quads of rows, 4 consecutive rows of one column per 128 bits
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    x[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));      // columns 0, 4, 8, 12
    x[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));  // columns 1, 5, 9, 13
    x[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));  // columns 2, 6, 10, 14
    x[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));  // columns 3, 7, 11, 15
  }
  // x[4q + c] holds rows 4q..4q+3 of columns c, c+4, c+8, c+12 (one per 128-bit lane)
  for (int c = 0; c < 4; ++c) {
    const __m512 lo01 = _mm512_shuffle_f32x4(x[c], x[4 + c], 0x88);   // rows 0-7: cols c, c+8
    const __m512 hi01 = _mm512_shuffle_f32x4(x[c], x[4 + c], 0xdd);   // rows 0-7: cols c+4, c+12
    const __m512 lo23 = _mm512_shuffle_f32x4(x[8 + c], x[12 + c], 0x88);
    const __m512 hi23 = _mm512_shuffle_f32x4(x[8 + c], x[12 + c], 0xdd);
    t[c] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);       // column c
    t[c + 8] = _mm512_shuffle_f32x4(lo01, lo23, 0xdd);   // column c + 8
    t[c + 4] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);   // column c + 4
    t[c + 12] = _mm512_shuffle_f32x4(hi01, hi23, 0xdd);  // column c + 12
  }
  for (int i = 0; i < 16; ++i) x[i] = t[i];
}

struct Group16 {
  const float* r[16];
  const float* v[16];
  const bool* m[16];
  float* adv[16];
  float* ret[16];
  int n;  // rows really in the group; the spare lanes repeat the last row and store nothing
};

template <bool kFull>
RLFUSE_AVX512_INLINE __m512 load_cols(const float* src, __mmask16 cols) {
  return kFull ? _mm512_loadu_ps(src) : _mm512_maskz_loadu_ps(cols, src);  // never past the row
}

template <bool kFull>
RLFUSE_AVX512_INLINE void store_cols(float* dst, __mmask16 cols, __m512 x) {
  if (kFull) _mm512_storeu_ps(dst, x);
  else _mm512_mask_storeu_ps(dst, cols, x);
}

// Scan one tile given its validity (mrow4: row i's 16 bits at bit 16*(i%4) of word i/4).
// kAllValid: every position of the tile is valid, so the selects are dropped.
template <bool kFull, bool kAllValid>
RLFUSE_AVX512_INLINE void scan_tile(const Group16& grp, int64_t t0, __mmask16 cols, const uint64_t mrow4[4],
                                    __m512 g, __m512 gl, __m512& next_v, __m512& next_a) {
  __m512 rr[16], vv[16], aa[16];
  for (int i = 0; i < 16; ++i) {
    rr[i] = load_cols<kFull>(grp.r[i] + t0, cols);
    vv[i] = load_cols<kFull>(grp.v[i] + t0, cols);
  }
  transpose16(rr);
  transpose16(vv);
  if constexpr (kAllValid) {
    for (int t = 15; t >= 0; --t) {
      const __m512 delta = _mm512_sub_ps(_mm512_fmadd_ps(g, next_v, rr[t]), vv[t]);
      next_a = _mm512_fmadd_ps(next_a, gl, delta);
      next_v = vv[t];
      aa[t] = next_a;
    }
  } else {
    // lane i = row i's 16 validity bits; column t's validity over rows is one test per t.
    // Columns past the row end have no valid bit: the state passes through them unchanged.
    const __m512i mvec = _mm512_cvtepu16_epi32(
        _mm256_set_epi64x(int64_t(mrow4[3]), int64_t(mrow4[2]), int64_t(mrow4[1]), int64_t(mrow4[0])));
    for (int t = 15; t >= 0; --t) {
      const __mmask16 on = _mm512_test_epi32_mask(mvec, _mm512_set1_epi32(1 << t));
      const __m512 delta = _mm512_sub_ps(_mm512_fmadd_ps(g, next_v, rr[t]), vv[t]);
      next_a = _mm512_mask_fmadd_ps(next_a, on, gl, delta);  // next_a * gl + delta where valid
      next_v = _mm512_mask_mov_ps(next_v, on, vv[t]);
      aa[t] = next_a;  // stale on masked lanes: zeroed row-wise below
    }
  }
  transpose16(aa);
  for (int i = 0; i < grp.n; ++i) {
    const __m512 vrow = load_cols<kFull>(grp.v[i] + t0, cols);  // an L1 hit: fewer registers held
    if constexpr (kAllValid) {
      store_cols<kFull>(grp.adv[i] + t0, cols, aa[i]);
      store_cols<kFull>(grp.ret[i] + t0, cols, _mm512_add_ps(aa[i], vrow));
    } else {
      const __mmask16 on = __mmask16(mrow4[i >> 2] >> (16 * (i & 3)));
      store_cols<kFull>(grp.adv[i] + t0, cols, _mm512_maskz_mov_ps(on, aa[i]));
      store_cols<kFull>(grp.ret[i] + t0, cols, _mm512_maskz_add_ps(on, aa[i], vrow));
    }
  }
}

// One 16x16 tile at columns [t0, t0 + 16) (kFull) or [t0, t0 + width).
template <bool kFull>
RLFUSE_AVX512_INLINE void gae_tile16(const Group16& grp, int64_t t0, int width, __m512 g, __m512 gl,
                                     __m512& next_v, __m512& next_a) {
  const __mmask16 cols = kFull ? __mmask16(0xffff) : __mmask16((1u << width) - 1);
  uint64_t mrow4[4];
  for (int q = 0; q < 4; ++q) {
    __m512i bytes = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      const bool* src = grp.m[4 * q + j] + t0;
      const __m128i row = kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src))
                                : _mm_maskz_loadu_epi8(cols, src);
      bytes = _mm512_inserti32x4(bytes, row, j);
    }
    mrow4[q] = _mm512_test_epi8_mask(bytes, bytes);
  }
  const uint64_t any = mrow4[0] | mrow4[1] | mrow4[2] | mrow4[3];
  const uint64_t all = mrow4[0] & mrow4[1] & mrow4[2] & mrow4[3];
  if (any == 0) {  // padding in every row: zeros out, the state passes through
    for (int i = 0; i < grp.n; ++i) {
      store_cols<kFull>(grp.adv[i] + t0, cols, _mm512_setzero_ps());
      store_cols<kFull>(grp.ret[i] + t0, cols, _mm512_setzero_ps());
    }
    return;
  }
  if constexpr (kFull) {
    if (all == ~uint64_t(0)) return scan_tile<true, true>(grp, t0, cols, mrow4, g, gl, next_v, next_a);
  }
  scan_tile<kFull, false>(grp, t0, cols, mrow4, g, gl, next_v, next_a);
}

// Rows [b0, b1) in groups of 16; b0 is a multiple of 16 so groups never depend on threads.
RLFUSE_AVX512 void gae_rows_avx512(const GaeArgs& p, int64_t b0, int64_t b1) {
  // Below this many rows a group's 16 lanes cost more than interleaved scalar rows do.
  constexpr int kMinLanes = 8;
  const int64_t T = p.t_len;
  const int64_t full = T / 16;
  const int rest = static_cast<int>(T % 16);
  const __m512 g = _mm512_set1_ps(p.g), gl = _mm512_set1_ps(p.gl);
  for (int64_t b = b0; b < b1; b += 16) {
    Group16 grp;
    grp.n = static_cast<int>(std::min<int64_t>(16, b1 - b));
    if (grp.n < kMinLanes) {
      scan_rows_any<true>(p, b, b + grp.n);  // same fma roundings as the tiles
      continue;
    }
    for (int i = 0; i < 16; ++i) {
      const int64_t off = (b + std::min(i, grp.n - 1)) * T;
      grp.r[i] = p.r + off;
      grp.v[i] = p.v + off;
      grp.m[i] = p.m + off;
      grp.adv[i] = p.adv + off;
      grp.ret[i] = p.ret + off;
    }
    __m512 next_v = _mm512_setzero_ps(), next_a = _mm512_setzero_ps();
    if (rest) gae_tile16<false>(grp, full * 16, rest, g, gl, next_v, next_a);
    for (int64_t c = full - 1; c >= 0; --c) gae_tile16<true>(grp, c * 16, 16, g, gl, next_v, next_a);
  }
}

bool use_avx512() {
  static const bool cpu_has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  // RLFUSE_GAE_GENERIC=1 forces the portable path (tests run it on AVX-512 machines too)
  const char* force = std::getenv("RLFUSE_GAE_GENERIC");
  return cpu_has && !(force && force[0] == '1');
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                       const at::Tensor& mask_in, double gamma, double lam) {
  TORCH_CHECK(rewards_in.device().is_cpu() && values_in.device().is_cpu() && mask_in.device().is_cpu(),
              "gae: all tensors must be on the CPU");
  TORCH_CHECK(rewards_in.sizes() == values_in.sizes() && rewards_in.sizes() == mask_in.sizes(),
              "gae: rewards, values and mask must share a shape, got ", rewards_in.sizes(), ", ",
              values_in.sizes(), ", ", mask_in.sizes());
  TORCH_CHECK(rewards_in.dim() == 1 || rewards_in.dim() == 2, "gae: expected [B, T] or [T] tensors");
  const at::Tensor rewards = rewards_in.to(at::kFloat).contiguous();
  const at::Tensor values = values_in.to(at::kFloat).contiguous();
  const at::Tensor mask = mask_in.to(at::kBool).contiguous();
  at::Tensor adv = at::empty_like(rewards);
  at::Tensor ret = at::empty_like(rewards);
  const int64_t t_len = rewards.dim() == 2 ? rewards.size(1) : rewards.size(0);
  const int64_t b_len = t_len == 0 ? 0 : rewards.numel() / t_len;
  if (rewards.numel() == 0) return {adv, ret};
  // Same constants as the torch backend: gamma * next_value and (gamma * lam) * next_adv.
  const GaeArgs p{rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<bool>(),
                  adv.data_ptr<float>(), ret.data_ptr<float>(), b_len, t_len,
                  static_cast<float>(gamma), static_cast<float>(gamma * lam)};
  // Work in groups of 16 rows (the AVX-512 width) so a row's group never depends on the
  // thread count. >= 256K steps (~0.1 ms here) per task: on a busy host a fork/join whose
  // second thread is descheduled costs milliseconds (measured: 16 ms medians at load 5 with
  // 2 tasks of 128K steps, vs 0.1 ms on one thread), far more than it saves when idle.
  constexpr int64_t kGroup = 16;
  const int64_t groups = (b_len + kGroup - 1) / kGroup;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (kGroup * t_len));
#if RLFUSE_GAE_AVX512
  [[maybe_unused]] const bool wide = use_avx512();
#else
  [[maybe_unused]] const bool wide = false;
#endif
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t b0 = g0 * kGroup, b1 = std::min(b_len, g1 * kGroup);
#if RLFUSE_GAE_AVX512
    if (wide) return gae_rows_avx512(p, b0, b1);
#endif
    gae_rows_generic(p, b0, b1);
  });
  return {adv, ret};
}

}  // namespace rlfuse
