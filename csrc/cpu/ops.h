// Declarations of the CPU ops bound in bindings.cpp. Semantics: kernels/backends/__init__.py.
#pragma once

#include <ATen/ATen.h>

#include "../common/ppo_options.h"

#include <optional>
#include <tuple>

namespace rlfuse {

// logits [N, V] (fp32/fp64/bf16/fp16, last dim contiguous, any row stride), labels [N] int64.
// z = softcap·tanh(logits·logit_scale / softcap) / temperature (no tanh without a softcap).
// Returns (logp [N], lse [N] of z, entropy [N] or empty(0)), all float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits,
                                                                const at::Tensor& labels,
                                                                double temperature,
                                                                bool with_entropy,
                                                                std::optional<double> softcap,
                                                                double logit_scale);

// Gradient wrt logits of sum(grad_logp * logp + grad_entropy * entropy); written into
// ``logits`` itself when inplace (the returned tensor is then ``logits``), else into ``out``
// when given, else into a fresh tensor.
at::Tensor logprobs_backward(const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, double temperature,
                             bool inplace, std::optional<double> softcap, double logit_scale,
                             const std::optional<at::Tensor>& out);

// rewards, values [B, T] float32, mask [B, T] bool -> (advantages, returns) float32.
std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values,
                                       const at::Tensor& mask, double gamma, double lam);

// Options as in csrc/common/ppo_options.h; loss_weight is given exactly when o.loss_agg is not
// token-mean. Returns (loss 0-d, stats [7], grad_logp [N], grad_entropy [N] or empty(0),
// grad_values [N] or empty(0)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_forward(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& values,
    const std::optional<at::Tensor>& old_values, const std::optional<at::Tensor>& returns,
    const std::optional<at::Tensor>& loss_weight, const rlfuse_ppo_options& o);

}  // namespace rlfuse
