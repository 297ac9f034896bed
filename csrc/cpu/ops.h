// Declarations of the CPU ops bound in bindings.cpp. Semantics: kernels/backends/__init__.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace rlfuse {

// logits [N, V] (fp32/fp64/bf16/fp16, last dim contiguous, any row stride), labels [N] int64.
// Returns (logp [N], lse [N] of logits/temperature, entropy [N] or empty(0)), all float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits,
                                                                const at::Tensor& labels,
                                                                double temperature,
                                                                bool with_entropy);

// Gradient wrt logits of sum(grad_logp * logp + grad_entropy * entropy); written into
// ``logits`` itself when inplace (the returned tensor is then ``logits``).
at::Tensor logprobs_backward(const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, double temperature,
                             bool inplace);

// rewards, values [B, T] float32, mask [B, T] bool -> (advantages, returns) float32.
std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values,
                                       const at::Tensor& mask, double gamma, double lam);

// kl_estimator: 1 = k1, 2 = k2, 3 = k3. Returns (loss 0-d, stats [7], grad_logp [N],
// grad_entropy [N] or empty(0), grad_values [N] or empty(0)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_forward(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& values,
    const std::optional<at::Tensor>& old_values, const std::optional<at::Tensor>& returns,
    double clip_eps, double clip_eps_high, std::optional<double> dual_clip, double kl_coef,
    int64_t kl_estimator, double entropy_coef, std::optional<double> value_clip,
    double value_coef);

}  // namespace rlfuse
