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

// exp(x) in float, ~1 ulp (Cephes polynomial), branch-free so loops calling it vectorise.
// exp(-inf) = 0, exp(+inf) = inf, NaN propagates; results below FLT_MIN flush to 0.
RLFUSE_INLINE float fast_exp(float x) {
  constexpr float kHi = 88.3762626647949f;   // n = round(x / ln2) stays <= 127
  constexpr float kOverflow = 88.72283935546875f;  // ln(FLT_MAX)
  constexpr float kLo = -87.3365447505531f;  // ln(FLT_MIN)
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float xc = x < kLo ? kLo : x;  // comparisons are false for NaN, which passes through
  xc = xc > kHi ? kHi : xc;
  const float kf = xc * kLog2e + kMagic;
  const float n = kf - kMagic;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(float_to_bits(kf) - float_to_bits(kMagic));
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  float y = p * scale;
  y = x > kOverflow ? std::numeric_limits<float>::infinity() : y;
  y = x < kLo ? 0.0f : y;
  return y;
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
