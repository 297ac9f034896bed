// Generalised advantage estimation: one reverse scan per row, rows in parallel.
//
// Masked positions are skipped: the recurrence state (next value, next advantage) passes
// through them unchanged and their outputs are 0. The value after a row's last valid
// position is 0. returns = advantages + values on valid positions.
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace rlfuse {

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
  const float g = static_cast<float>(gamma);
  const float gl = static_cast<float>(gamma * lam);
  const float* r = rewards.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  const bool* m = mask.data_ptr<bool>();
  float* a_out = adv.data_ptr<float>();
  float* r_out = ret.data_ptr<float>();
  // >= 256K steps (~0.3 ms) per task: below that a fork/join costs more than it saves on a busy host
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / t_len);
  at::parallel_for(0, b_len, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * t_len;
      float next_v = 0.0f, next_a = 0.0f;
      // branch-free: holes at random positions cost no mispredictions
      for (int64_t t = t_len - 1; t >= 0; --t) {
        const int64_t k = off + t;
        const bool on = m[k];
        const float vk = v[k];
        const float delta = (r[k] + g * next_v) - vk;
        const float a = delta + gl * next_a;
        a_out[k] = on ? a : 0.0f;
        r_out[k] = on ? a + vk : 0.0f;
        next_v = on ? vk : next_v;
        next_a = on ? a : next_a;
      }
    }
  });
  return {adv, ret};
}

}  // namespace rlfuse
