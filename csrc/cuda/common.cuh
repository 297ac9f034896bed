// Device helpers shared by the rlfuse kernels: dtype conversion, 16-byte vector access, block
// sums, the launch macro. No torch headers.
//
// Under RLFUSE_CUDA_EMU (csrc/cuda/emu/cuda_emu.h) the same code compiles on the host, where each
// block's threads run as fibers, so the CPU tests exercise the kernels' indexing, scans and
// reductions; the few hardware intrinsics below have host equivalents there.
#pragma once

#include "rlfuse_cuda.h"

#include <stdint.h>

#ifndef RLFUSE_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define RL_DEV __device__ __forceinline__

#ifdef RLFUSE_CUDA_EMU
#define RLFUSE_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::rlfuse_emu::launch(kernel, dim3(grid), dim3(block), __VA_ARGS__))
#else
#define RLFUSE_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace rlfuse {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- element types ------------------------------------------------------------------------
// bf16 and fp16 are kept as raw uint16_t bits; conversion to/from fp32 is explicit.

RL_DEV float bf16_to_float(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }

#ifdef RLFUSE_CUDA_EMU
inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_float(uint16_t b) { return static_cast<float>(std::bit_cast<_Float16>(b)); }
inline uint16_t float_to_f16(float f) { return std::bit_cast<uint16_t>(static_cast<_Float16>(f)); }
#else
// hardware conversions (cvt.rn.bf16.f32 on sm_80+), round to nearest even
RL_DEV uint16_t float_to_bf16(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
RL_DEV float f16_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
RL_DEV uint16_t float_to_f16(float f) { return __half_as_ushort(__float2half_rn(f)); }
#endif

template <int DT>
struct Elem;

template <>
struct Elem<RLFUSE_F32> {
  using T = float;
  static RL_DEV float load(T x) { return x; }
  static RL_DEV T store(float x) { return x; }
};

template <>
struct Elem<RLFUSE_BF16> {
  using T = uint16_t;
  static RL_DEV float load(T x) { return bf16_to_float(x); }
  static RL_DEV T store(float x) { return float_to_bf16(x); }
};

template <>
struct Elem<RLFUSE_F16> {
  using T = uint16_t;
  static RL_DEV float load(T x) { return f16_to_float(x); }
  static RL_DEV T store(float x) { return float_to_f16(x); }
};

// 16 bytes of T viewed as a vector of VEC elements
template <typename T>
union Vec16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  uint4 raw;
  T e[kN];
};

#ifdef RLFUSE_CUDA_EMU
// the device faults on a misaligned vector access; x86 would not, so the emulation checks
#define RLFUSE_CHECK_ALIGNED16(p) \
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) throw std::logic_error("misaligned 16-byte access")
#else
#define RLFUSE_CHECK_ALIGNED16(p)
#endif

template <typename T>
RL_DEV uint4 load16(const T* p) {
  RLFUSE_CHECK_ALIGNED16(p);
#ifdef RLFUSE_CUDA_EMU
  return *reinterpret_cast<const uint4*>(p);
#else
  return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

template <typename T>
RL_DEV void store16(T* p, const uint4& v) {
  RLFUSE_CHECK_ALIGNED16(p);
  *reinterpret_cast<uint4*>(p) = v;
}

// Number of leading elements of row p to handle one by one so that p + head is 16-byte aligned
// (vocab when p is not even element-aligned: the whole row then goes scalar).
template <typename T>
RL_DEV int aligned_head(const T* p, int vocab) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return vocab;
  const int head = static_cast<int>(((16u - (a & 15u)) & 15u) / sizeof(T));
  return head < vocab ? head : vocab;
}

// ---- warp-level helpers -------------------------------------------------------------------

RL_DEV int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
RL_DEV int warp_id() { return static_cast<int>(threadIdx.x) >> 5; }

RL_DEV float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// Sum of x over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread,
// in a fixed order. `scratch` is __shared__ float[32]; the call ends with a barrier, so the
// scratch can be reused right after.
RL_DEV float block_sum(float x, float* scratch) {
  x = warp_sum(x);
  if (lane_id() == 0) scratch[warp_id()] = x;
  __syncthreads();
  const int nwarps = static_cast<int>(blockDim.x) >> 5;
  float y = lane_id() < nwarps ? scratch[lane_id()] : 0.0f;
  y = warp_sum(y);
  __syncthreads();
  return y;
}

}  // namespace rlfuse
