// Generalised advantage estimation as two parallel reverse scans per row (one block per row).
//
// Position t of a row is valid when mask[t] != 0. With nv(t) the value at the nearest valid
// position right of t (0 when there is none):
//   δ_t = r_t + γ nv(t) − V_t,   A_t = δ_t + γλ A_{t+1}   on valid t,
//   A_t = A_{t+1}                                         on masked t (outputs are 0 there).
// Both quantities are reverse scans with an associative, non-commutative operator:
//   nv:  "leftmost valid (value) in a segment", scanned exclusively;
//   A:   the affine map a ↦ d + c·a of each position (c = γλ, d = δ on valid ones, the
//        identity c = 1, d = 0 on masked ones), composed right to left, scanned inclusively.
// The row is processed in tiles of blockDim.x * kItems positions from its end. Inside a tile,
// index k = tile_hi − 1 − t runs right to left, so both scans become forward scans over k with
// op(earlier, later) = "later ∘ earlier". Each thread owns kItems consecutive k (sequential
// scan), warps scan the per-thread aggregates with shuffles, warp 0 scans the warp aggregates,
// and the tile's result is folded into a carry that seeds the next tile to the left (the carry
// enters as the element at k = −1: (valid, value) for nv, the constant map a ↦ A_right for A).
#include "common.cuh"

namespace rlfuse {
namespace {

constexpr int kGaeItems = 8;
constexpr int kGaeMaxThreads = 256;
constexpr int kGaeTile = kGaeItems * kGaeMaxThreads;

// nearest-valid-value scan element
struct Nv {
  float valid;  // 1 if the segment holds a valid position
  float value;  // value of its leftmost valid position
};
// affine map a ↦ d + c·a
struct Aff {
  float c, d;
};

// `earlier` is the right-hand segment (smaller k), `later` the left-hand one.
struct NvOp {
  RL_DEV Nv operator()(const Nv& earlier, const Nv& later) const {
    return later.valid != 0.0f ? later : earlier;
  }
  static RL_DEV Nv identity() { return {0.0f, 0.0f}; }
};
struct AffOp {
  RL_DEV Aff operator()(const Aff& earlier, const Aff& later) const {
    // later ∘ earlier: a ↦ later.d + later.c (earlier.d + earlier.c a)
    return {later.c * earlier.c, fmaf(later.c, earlier.d, later.d)};
  }
  static RL_DEV Aff identity() { return {1.0f, 0.0f}; }
};

RL_DEV Nv shfl_up2(const Nv& s, int delta) {
  return {__shfl_up_sync(kFullMask, s.valid, delta), __shfl_up_sync(kFullMask, s.value, delta)};
}
RL_DEV Aff shfl_up2(const Aff& s, int delta) {
  return {__shfl_up_sync(kFullMask, s.c, delta), __shfl_up_sync(kFullMask, s.d, delta)};
}

// Exclusive block scan of one value per thread (thread order = k order), in a fixed order.
// Returns the exclusive prefix of this thread; `total` gets the whole block's aggregate.
// `scratch` is __shared__ S[32]; the function starts and ends with the scratch free.
template <typename S, typename Op>
RL_DEV S block_exclusive_scan(S x, S* scratch, S& total) {
  const Op op;
  const int lane = lane_id();
  const int warp = warp_id();
  const int nwarps = static_cast<int>(blockDim.x) >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const S y = shfl_up2(x, off);
    if (lane >= off) x = op(y, x);
  }
  S excl = shfl_up2(x, 1);
  if (lane == 0) excl = Op::identity();
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    S w = lane < nwarps ? scratch[lane] : Op::identity();
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const S y = shfl_up2(w, off);
      if (lane >= off) w = op(y, w);
    }
    scratch[lane] = w;  // inclusive prefix over the warps
  }
  __syncthreads();
  const S warp_prefix = warp > 0 ? scratch[warp - 1] : Op::identity();
  total = scratch[nwarps - 1];
  __syncthreads();
  return op(warp_prefix, excl);
}

__global__ void __launch_bounds__(kGaeMaxThreads)
    gae_kernel(const float* __restrict__ rewards, const float* __restrict__ values,
               const uint8_t* __restrict__ mask, int64_t seq, float gamma, float gl, float* __restrict__ adv,
               float* __restrict__ ret) {
  __shared__ float s_r[kGaeTile];
  __shared__ float s_v[kGaeTile];
  __shared__ uint8_t s_m[kGaeTile];
  __shared__ Nv nv_scratch[32];
  __shared__ Aff aff_scratch[32];

  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int tile = nthreads * kGaeItems;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * seq;
  const NvOp nv_op;
  const AffOp aff_op;

  Nv nv_carry = {1.0f, 0.0f};   // beyond the row's last valid token the value is 0
  Aff aff_carry = {0.0f, 0.0f};  // constant map to A_right = 0

  for (int64_t hi = seq; hi > 0; hi -= tile) {
    const int64_t lo = hi > tile ? hi - tile : 0;
    const int len = static_cast<int>(hi - lo);
    for (int i = tid; i < len; i += nthreads) {  // coalesced staging
      s_r[i] = rewards[base + lo + i];
      s_v[i] = values[base + lo + i];
      s_m[i] = mask == nullptr ? 1 : (mask[base + lo + i] != 0);
    }
    __syncthreads();

    // this thread's items: k = tid * kItems + j, position lo + len - 1 - k
    float r[kGaeItems], v[kGaeItems];
    bool ok[kGaeItems];
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) {
      const int k = tid * kGaeItems + j;
      const int idx = len - 1 - k;
      const bool in = k < len;
      r[j] = in ? s_r[idx] : 0.0f;
      v[j] = in ? s_v[idx] : 0.0f;
      ok[j] = in && s_m[idx] != 0;
    }

    // scan 1: value at the nearest valid position to the right (exclusive)
    Nv agg = NvOp::identity();
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) agg = nv_op(agg, ok[j] ? Nv{1.0f, v[j]} : NvOp::identity());
    Nv nv_total;
    Nv run = nv_op(nv_carry, block_exclusive_scan<Nv, NvOp>(agg, nv_scratch, nv_total));
    Aff item[kGaeItems];
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) {
      // run.valid is 1: the carry always is
      item[j] = ok[j] ? Aff{gl, r[j] + gamma * run.value - v[j]} : AffOp::identity();
      if (ok[j]) run = Nv{1.0f, v[j]};
    }
    nv_carry = nv_op(nv_carry, nv_total);

    // scan 2: A = composition of the maps from this position to the row's end, applied to 0
    Aff aagg = AffOp::identity();
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) aagg = aff_op(aagg, item[j]);
    Aff aff_total;
    Aff arun = aff_op(aff_carry, block_exclusive_scan<Aff, AffOp>(aagg, aff_scratch, aff_total));
    // The staged inputs are all in registers now (block_exclusive_scan ended on a barrier),
    // so the outputs can go through the same shared arrays for a coalesced store.
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) {
      arun = aff_op(arun, item[j]);  // arun.c == 0: a constant map, arun.d is A at this position
      const int k = tid * kGaeItems + j;
      if (k < len) {
        const int idx = len - 1 - k;
        s_r[idx] = ok[j] ? arun.d : 0.0f;
        s_v[idx] = ok[j] ? arun.d + v[j] : 0.0f;
      }
    }
    aff_carry = aff_op(aff_carry, aff_total);
    __syncthreads();
    for (int i = tid; i < len; i += nthreads) {
      adv[base + lo + i] = s_r[i];
      ret[base + lo + i] = s_v[i];
    }
    __syncthreads();  // the next tile restages the shared arrays
  }
}

}  // namespace
}  // namespace rlfuse

extern "C" cudaError_t rlfuse_cuda_gae(const float* rewards, const float* values, const uint8_t* mask,
                                       int64_t batch, int64_t seq, float gamma, float lam, float* advantages,
                                       float* returns, cudaStream_t stream) {
  if (batch <= 0 || seq <= 0) return cudaSuccess;
  if (batch > INT32_MAX) return cudaErrorInvalidValue;
  // a warp at least, and no more threads than the row needs (each thread takes kGaeItems)
  int64_t threads = (seq + rlfuse::kGaeItems - 1) / rlfuse::kGaeItems;
  threads = (threads + 31) / 32 * 32;
  if (threads > rlfuse::kGaeMaxThreads) threads = rlfuse::kGaeMaxThreads;
  auto kernel = &rlfuse::gae_kernel;
  RLFUSE_LAUNCH(kernel, static_cast<unsigned>(batch), static_cast<unsigned>(threads), stream, rewards, values,
                mask, seq, gamma, gamma * lam, advantages, returns);
  return cudaGetLastError();
}
