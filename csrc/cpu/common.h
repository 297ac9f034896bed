// Shared helpers for the CPU kernels: a vectorisable exp, dtype load/store to float blocks,
// fixed-lane reductions and a dtype dispatcher.
//
// Everything here is written as plain loops over fixed-size lanes so that gcc -O3
// -march=native vectorises it without -ffast-math. Floating-point reductions always go
// through explicit lane arrays (kLanes accumulators, reduced in a fixed tree), so their
// order is fixed by the source, never by alignment peeling, thread count or timing.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace rlfuse {

#define RLFUSE_INLINE inline __attribute__((always_inline))
#define RLFUSE_LAMBDA_INLINE __attribute__((always_inline))

constexpr int kLanes = 16;  // accumulator lanes: one AVX-512 register, two AVX2 ones

RLFUSE_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

RLFUSE_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

namespace exp_detail {
constexpr float kHi = 88.3762626647949f;          // n = round(x / ln2) stays <= 127
constexpr float kOverflow = 88.72283935546875f;  // ln(FLT_MAX)
constexpr float kLo = -87.3365447505531f;         // ln(FLT_MIN)

// e^x for kLo <= x <= kHi: Cephes' range reduction x = n ln2 + r and degree-6 polynomial.
RLFUSE_INLINE float core(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kf = x * kLog2e + kMagic;
  const float n = kf - kMagic;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(float_to_bits(kf) - float_to_bits(kMagic));
  return p * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
}
}  // namespace exp_detail

// exp(x) in float, ~1 ulp (Cephes polynomial), branch-free so loops calling it vectorise.
// exp(-inf) = 0, exp(+inf) = inf, NaN propagates; results below FLT_MIN flush to 0.
RLFUSE_INLINE float fast_exp(float x) {
  using namespace exp_detail;
  float xc = x < kLo ? kLo : x;  // comparisons are false for NaN, which passes through
  xc = xc > kHi ? kHi : xc;
  float y = core(xc);
  y = x > kOverflow ? std::numeric_limits<float>::infinity() : y;
  y = x < kLo ? 0.0f : y;
  return y;
}

// fast_exp for arguments that cannot overflow (x <= 88.37): a logit minus its row's max or
// log-sum-exp, the softmax loops' case. Same values; without the upper clamp and the
// overflow select the loop body is about a third shorter (the forward is exp-bound).
RLFUSE_INLINE float fast_exp_nonpos(float x) {
  using namespace exp_detail;
  const float y = core(x < kLo ? kLo : x);
  return x < kLo ? 0.0f : y;
}

// 2^x for x <= 0, for the terms of a softmax sum (whose largest term is 1): rounds to an
// integer n and a fraction f in [-1/2, 1/2] with no ln2 reduction, and a degree-6 minimax
// polynomial for 2^f (max relative error 1.0e-7 evaluated in float, ~1.7 ulp). Below 2^-126
// it gives 2^-126 (FLT_MIN), not 0: beside the sum's term of 1 that is nothing, and dropping
// the select keeps this loop, the forward's whole cost, ~17 vector ops per 16 terms. NaN
// propagates; x must be <= 0 (no overflow handling).
RLFUSE_INLINE float fast_exp2_softmax_term(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < -126.0f ? -126.0f : x;  // false for NaN, which passes through
  const float kf = xc + kMagic;
  const float f = xc - (kf - kMagic);
  float p = 1.535335905e-04f;
  p = p * f + 1.339887502e-03f;
  p = p * f + 9.618436918e-03f;
  p = p * f + 5.550332367e-02f;
  p = p * f + 2.402264774e-01f;
  p = p * f + 6.931471825e-01f;
  p = p * f + 1.0f;
  const int32_t ni = static_cast<int32_t>(float_to_bits(kf) - float_to_bits(kMagic));
  return p * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
}

// The largest of x[0..n), NaNs skipped (a NaN never wins a `>`); -inf when n == 0 or all are
// NaN/-inf. Exact, so lane order cannot change it. Explicit AVX-512: gcc 12 leaves the lane
// loop below scalar (vmaxss), which was a third of the log-prob forward's time.
RLFUSE_INLINE float max_skip_nan(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 a = _mm512_set1_ps(m), b = a;
  // _mm512_max_ps(x, acc) returns acc when x is NaN, like the scalar `x > acc ? x : acc`
  for (; i + 32 <= n; i += 32) {
    a = _mm512_max_ps(_mm512_loadu_ps(x + i), a);
    b = _mm512_max_ps(_mm512_loadu_ps(x + i + 16), b);
  }
  m = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
#else
  float mx[kLanes];
  for (int j = 0; j < kLanes; ++j) mx[j] = m;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) mx[j] = x[i + j] > mx[j] ? x[i + j] : mx[j];
  for (int j = 0; j < kLanes; ++j) m = mx[j] > m ? mx[j] : m;
#endif
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Fixed-order tree sum of kLanes accumulators.
RLFUSE_INLINE float lane_sum(const float* a) {
  float t[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) t[j] = a[j] + a[j + kLanes / 2];
  for (int j = 0; j < 4; ++j) t[j] = t[j] + t[j + 4];
  return (t[0] + t[2]) + (t[1] + t[3]);
}

// ---------------------------------------------------------------------------------------
// Loading a run of elements of any supported dtype into float (times a scale), and storing
// floats back. load_block may return the source pointer itself (float32, scale 1).

inline const float* load_block(const float* src, int64_t n, float scale, bool scaled, float* buf) {
  if (!scaled) return src;
  for (int64_t i = 0; i < n; ++i) buf[i] = src[i] * scale;
  return buf;
}

inline const float* load_block(const double* src, int64_t n, float scale, bool scaled, float* buf) {
  if (scaled) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]) * scale;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  }
  return buf;
}

inline const float* load_block(const c10::BFloat16* src, int64_t n, float scale, bool scaled,
                               float* buf) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  if (scaled) {
    for (int64_t i = 0; i < n; ++i) buf[i] = bits_to_float(uint32_t(s[i]) << 16) * scale;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = bits_to_float(uint32_t(s[i]) << 16);
  }
  return buf;
}

inline const float* load_block(const c10::Half* src, int64_t n, float scale, bool scaled,
                               float* buf) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(h));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  if (scaled) {
    for (int64_t k = 0; k < n; ++k) buf[k] *= scale;
  }
  return buf;
}

inline void store_block(float* dst, const float* v, int64_t n) {
  if (dst != v) std::memcpy(dst, v, sizeof(float) * n);
}

inline void store_block(double* dst, const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<double>(v[i]);
}

// Round to nearest even, NaN -> quiet NaN: the same rounding as c10::BFloat16(float).
inline void store_block(c10::BFloat16* dst, const float* v, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = float_to_bits(v[i]);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    d[i] = v[i] != v[i] ? uint16_t(0x7FC0) : uint16_t(rounded);
  }
}

inline void store_block(c10::Half* dst, const float* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = c10::Half(v[i]);
}

// Calls fn(T{}) with T the C++ type of a logits dtype (fp32, fp64, bf16, fp16).
template <typename Fn>
void dispatch_logits_dtype(at::ScalarType dt, const char* name, Fn&& fn) {
  switch (dt) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dt, " (expected fp32/fp64/bf16/fp16)");
  }
}

}  // namespace rlfuse
