// Fused PPO loss: per-token loss terms, their masked means (loss and stats) and the gradients
// with respect to logp, entropy and values, already divided by the mask sum.
//
// Four launches, every sum in a fixed order (no float atomics, bitwise reproducible):
//   1. count:    block b sums the mask over its chunk of kChunk tokens → partial[b]
//   2. reduce:   one block sums the partials → Σ mask
//   3. main:     block b computes per-token loss terms and gradients (scaled by 1 / Σ mask) of its
//                chunk and writes its 7 partial sums
//   4. finalize: one block sums the partial sums and writes loss and stats
// The chunking depends on n only, so the result does not depend on the GPU's SM count either.
// Means divide by max(Σ mask, 1) as kernels/reference.py does: an all-masked batch gives 0.
// Token i weighs w_i·w_scale in the loss and its gradients: w = mask and w_scale = 1 / Σ mask
// (token mean), or w = loss_weight and w_scale = 1 (the op's weights for the other loss
// aggregations); the other stats are always token means. KL k1+/k3+: value of k1/k3, gradient d.
// log_ratio_clamp: logp - old_logp clamped before the exp (gradient 0 where clamped; approx_kl
// reads the clamped log-ratio).
#include "common.cuh"

namespace rlfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int kChunk = kThreads * kItems;
constexpr int kSums = 7;  // loss, policy, value, kl, entropy, clipped, approx_kl

__global__ void __launch_bounds__(kThreads) ppo_count_kernel(const float* __restrict__ mask, int64_t n,
                                                             float* __restrict__ partial) {
  __shared__ float scratch[32];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = start + j * kThreads + threadIdx.x;
    if (i < n) acc += mask[i];
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block: column sums of partial[nparts][width] for width <= kSums, each in a fixed order.
// FINAL == false: out[0] = Σ partial[:, 0] (the mask sum).
// FINAL == true:  loss and stats from the kSums column sums and the mask sum *count.
template <bool FINAL>
__global__ void __launch_bounds__(kThreads) ppo_reduce_kernel(const float* __restrict__ partial, int64_t nparts,
                                                              const float* __restrict__ count,
                                                              float* __restrict__ out,
                                                              float* __restrict__ stats, bool weighted) {
  __shared__ float scratch[32];
  constexpr int width = FINAL ? kSums : 1;
  float acc[width];
#pragma unroll
  for (int k = 0; k < width; ++k) acc[k] = 0.0f;
  for (int64_t b = threadIdx.x; b < nparts; b += kThreads) {
#pragma unroll
    for (int k = 0; k < width; ++k) acc[k] += partial[b * width + k];
  }
#pragma unroll
  for (int k = 0; k < width; ++k) acc[k] = block_sum(acc[k], scratch);
  if (threadIdx.x != 0) return;
  if (!FINAL) {
    out[0] = acc[0];
    return;
  }
  const float inv = 1.0f / fmaxf(*count, 1.0f);
#pragma unroll
  for (int k = 0; k < kSums; ++k) stats[k] = acc[k] * inv;
  if (weighted) stats[0] = acc[0];  // already Σ loss_weight·loss
  out[0] = stats[0];
}

__global__ void __launch_bounds__(kThreads) ppo_main_kernel(const rlfuse_ppo_args a, const float* __restrict__ count,
                                                            float* __restrict__ partial) {
  __shared__ float scratch[32];
  const float inv_cnt = 1.0f / fmaxf(*count, 1.0f);
  const rlfuse_ppo_options& o = a.opts;
  const float lo = 1.0f - o.clip_eps;
  const float hi = 1.0f + rlfuse_ppo_clip_high(&o);
  const bool clip_values = a.old_values != nullptr && o.has_value_clip;
  const int kl_code = rlfuse_kl_value_code(o.kl_estimator);
  const bool kl_st = rlfuse_kl_straight_through(o.kl_estimator) != 0;
  const float w_scale = a.loss_weight != nullptr ? 1.0f : inv_cnt;

  float acc[kSums];
#pragma unroll
  for (int k = 0; k < kSums; ++k) acc[k] = 0.0f;

  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
#pragma unroll 2
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = start + j * kThreads + threadIdx.x;
    if (i >= a.n) break;
    const float w = a.mask[i];
    if (w == 0.0f) {  // padding: no contribution, zero gradients, whatever the other inputs hold
      a.grad_logp[i] = 0.0f;
      if (a.grad_entropy != nullptr) a.grad_entropy[i] = 0.0f;
      if (a.grad_values != nullptr) a.grad_values[i] = 0.0f;
      continue;
    }
    const float lw = a.loss_weight != nullptr ? a.loss_weight[i] : w;  // loss weight, unscaled
    const float ws = lw * w_scale;
    const float logp = a.logp[i];
    const float adv = a.advantages[i];
    // policy term
    float log_ratio = logp - a.old_logp[i];
    bool ratio_stops = false;  // log_ratio_clamp: the clamped ratio has gradient 0
    if (o.has_log_ratio_clamp && (log_ratio > o.log_ratio_clamp || log_ratio < -o.log_ratio_clamp)) {
      log_ratio = log_ratio > 0.0f ? o.log_ratio_clamp : -o.log_ratio_clamp;
      ratio_stops = true;
    }
    const float ratio_m1 = expm1f(log_ratio);
    const float ratio = ratio_m1 + 1.0f;
    const float clipped_ratio = fminf(fmaxf(ratio, lo), hi);
    const float unclipped = -adv * ratio;
    const float clipped = -adv * clipped_ratio;
    const bool clip_active = clipped > unclipped;  // ties take the unclipped branch
    float pg = clip_active ? clipped : unclipped;
    float dpg = clip_active || ratio_stops ? 0.0f : -adv * ratio;
    if (o.has_dual_clip && adv < 0.0f) {
      const float cap = -adv * o.dual_clip;
      if (cap < pg) {
        pg = cap;
        dpg = 0.0f;
      }
    }
    float loss = pg;
    float dlogp = dpg;
    // KL to the reference
    float kl = 0.0f;
    if (a.ref_logp != nullptr) {
      const float d = logp - a.ref_logp[i];
      float dkl;
      if (kl_code == RLFUSE_KL_K1) {
        kl = d;
        dkl = 1.0f;
      } else if (kl_code == RLFUSE_KL_K2) {
        kl = 0.5f * d * d;
        dkl = d;
      } else {
        const float em1 = expm1f(-d);  // e^(-d) - 1
        kl = em1 + d;
        dkl = -em1;
      }
      if (kl_st) dkl = d;
      if (o.has_kl_clamp && (kl > o.kl_clamp || kl < -o.kl_clamp)) {  // clamped: gradient 0
        kl = kl > 0.0f ? o.kl_clamp : -o.kl_clamp;
        dkl = 0.0f;
      }
      loss += o.kl_coef * kl;
      dlogp += o.kl_coef * dkl;
    }
    // entropy bonus
    float ent = 0.0f;
    if (a.entropy != nullptr) {
      ent = a.entropy[i];
      loss -= o.entropy_coef * ent;
      a.grad_entropy[i] = -o.entropy_coef * ws;
    }
    // value term
    float vf = 0.0f;
    if (a.values != nullptr) {
      const float v = a.values[i];
      const float err = v - a.returns[i];
      float dvf = err;
      vf = 0.5f * err * err;
      if (clip_values) {
        const float old_v = a.old_values[i];
        const float v_clip = old_v + fminf(fmaxf(v - old_v, -o.value_clip), o.value_clip);
        const float err_c = v_clip - a.returns[i];
        const float vf_c = 0.5f * err_c * err_c;
        if (vf_c > vf) {
          vf = vf_c;
          dvf = fabsf(v - old_v) < o.value_clip ? err_c : 0.0f;
        }
      }
      loss += o.value_coef * vf;
      a.grad_values[i] = o.value_coef * dvf * ws;
    }
    a.grad_logp[i] = dlogp * ws;

    acc[0] += lw * loss;
    acc[1] += w * pg;
    acc[2] += w * vf;
    acc[3] += w * kl;
    acc[4] += w * ent;
    acc[5] += clip_active ? w : 0.0f;
    acc[6] += w * (ratio_m1 - log_ratio);  // approx_kl = (r - 1) - log r
  }
#pragma unroll
  for (int k = 0; k < kSums; ++k) acc[k] = block_sum(acc[k], scratch);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kSums; ++k) partial[static_cast<int64_t>(blockIdx.x) * kSums + k] = acc[k];
  }
}

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

}  // namespace
}  // namespace rlfuse

extern "C" int64_t rlfuse_cuda_ppo_workspace_floats(int64_t n) {
  // count partials, the count, the per-chunk sums
  return rlfuse::num_chunks(n) * (1 + rlfuse::kSums) + 1;
}

extern "C" cudaError_t rlfuse_cuda_ppo_loss_forward(const rlfuse_ppo_args* args, cudaStream_t stream) {
  const rlfuse_ppo_args a = *args;
  if (a.n < 0 || (a.values != nullptr && a.returns == nullptr)) return cudaErrorInvalidValue;
  if (a.opts.kl_estimator < RLFUSE_KL_K1 || a.opts.kl_estimator > RLFUSE_KL_K3_PLUS) return cudaErrorInvalidValue;
  // (an empty loss weight may have a null data pointer)
  if (a.n > 0 && (a.loss_weight != nullptr) != (a.opts.loss_agg != RLFUSE_AGG_TOKEN_MEAN)) return cudaErrorInvalidValue;
  if ((a.entropy != nullptr) != (a.grad_entropy != nullptr) || (a.values != nullptr) != (a.grad_values != nullptr))
    return cudaErrorInvalidValue;
  const int64_t nparts = rlfuse::num_chunks(a.n);
  if (nparts > INT32_MAX) return cudaErrorInvalidValue;
  float* count_part = a.workspace;
  float* count = a.workspace + nparts;
  float* sums_part = a.workspace + nparts + 1;
  const unsigned grid = static_cast<unsigned>(nparts);
  if (nparts > 0) {
    auto count_kernel = &rlfuse::ppo_count_kernel;
    RLFUSE_LAUNCH(count_kernel, grid, rlfuse::kThreads, stream, a.mask, a.n, count_part);
  }
  auto reduce_count = &rlfuse::ppo_reduce_kernel<false>;
  RLFUSE_LAUNCH(reduce_count, 1u, rlfuse::kThreads, stream, (const float*)count_part, nparts, (const float*)nullptr,
                count, (float*)nullptr, false);
  if (nparts > 0) {
    auto main_kernel = &rlfuse::ppo_main_kernel;
    RLFUSE_LAUNCH(main_kernel, grid, rlfuse::kThreads, stream, a, (const float*)count, sums_part);
  }
  auto finalize = &rlfuse::ppo_reduce_kernel<true>;
  RLFUSE_LAUNCH(finalize, 1u, rlfuse::kThreads, stream, (const float*)sums_part, nparts, (const float*)count, a.loss,
                a.stats, a.loss_weight != nullptr);
  return cudaGetLastError();
}
