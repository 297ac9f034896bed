// The one place where the flat tuple of kernels/ppo_options.py PPOLossOptions.as_op_args() becomes
// the C options struct. C++ (host code only): included by the CPU and the CUDA bindings alike.
#pragma once

#include <cstdint>
#include <optional>

#include "ppo_options.h"

inline rlfuse_ppo_options rlfuse_ppo_options_from_args(
    double clip_eps, std::optional<double> clip_eps_high, std::optional<double> dual_clip, double kl_coef,
    int64_t kl_estimator, double entropy_coef, std::optional<double> value_clip, double value_coef,
    int64_t loss_agg, std::optional<double> loss_agg_norm) {
  rlfuse_ppo_options o{};
  o.clip_eps = static_cast<float>(clip_eps);
  o.has_clip_eps_high = clip_eps_high.has_value();
  o.clip_eps_high = static_cast<float>(clip_eps_high.value_or(0.0));
  o.has_dual_clip = dual_clip.has_value();
  o.dual_clip = static_cast<float>(dual_clip.value_or(0.0));
  o.kl_coef = static_cast<float>(kl_coef);
  o.kl_estimator = static_cast<int>(kl_estimator);
  o.entropy_coef = static_cast<float>(entropy_coef);
  o.has_value_clip = value_clip.has_value();
  o.value_clip = static_cast<float>(value_clip.value_or(0.0));
  o.value_coef = static_cast<float>(value_coef);
  o.loss_agg = static_cast<int>(loss_agg);
  o.has_loss_agg_norm = loss_agg_norm.has_value();
  o.loss_agg_norm = static_cast<float>(loss_agg_norm.value_or(0.0));
  return o;
}
