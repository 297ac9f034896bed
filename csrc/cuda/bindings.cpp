// pybind11 module rlfuse.kernels._C_cuda: checks the tensors, allocates the outputs, and calls
// the raw-pointer launchers of csrc/cuda/*.cu on torch's current CUDA stream.
//
// The Python side (kernels/backends/cuda.py) converts dtypes and makes tensors contiguous; this
// layer only checks, so a wrong call fails loudly instead of reading out of bounds.
// Built with RLFUSE_CUDA_EMU (tests/test_cuda_sources.py), the same bindings run the host
// emulation of the kernels on CPU tensors.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#ifndef RLFUSE_CUDA_EMU
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "rlfuse_cuda.h"
#include "../common/ppo_options.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#ifdef RLFUSE_CUDA_EMU
constexpr bool kOnCuda = false;
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t current_stream(const Tensor&) { return nullptr; }
const char* error_string(cudaError_t) { return "invalid launch arguments"; }
#else
constexpr bool kOnCuda = true;
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
const char* error_string(cudaError_t e) { return cudaGetErrorString(e); }
#endif

void check_device(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cuda() == kOnCuda, "rlfuse cuda: ", name,
              kOnCuda ? " must be a CUDA tensor" : " must be a CPU tensor (emulation build)");
  TORCH_CHECK(t.device() == like.device(), "rlfuse cuda: ", name, " is on ", t.device(), ", expected ", like.device());
}

void check_vec(const Tensor& t, const Tensor& like, const char* name, int64_t n, at::ScalarType dtype) {
  check_device(t, like, name);
  TORCH_CHECK(t.scalar_type() == dtype, "rlfuse cuda: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "rlfuse cuda: ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "rlfuse cuda: ", name, " must be contiguous");
}

const float* opt_ptr(const OptTensor& t, const Tensor& like, const char* name, int64_t n) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_vec(*t, like, name, n, at::kFloat);
  return t->data_ptr<float>();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rlfuse cuda: ", what, " failed: ", error_string(err));
}

int dtype_code(const Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return RLFUSE_F32;
    case at::kBFloat16:
      return RLFUSE_BF16;
    case at::kHalf:
      return RLFUSE_F16;
    default:
      TORCH_CHECK(false, "rlfuse cuda: logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
}

void check_logits(const Tensor& logits, const Tensor& labels) {
  check_device(logits, logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "rlfuse cuda: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK((logits.size(1) > 0 || logits.size(0) == 0) && logits.size(1) <= INT32_MAX,
              "rlfuse cuda: vocab size ", logits.size(1), " out of range");
  TORCH_CHECK(logits.size(0) <= INT32_MAX, "rlfuse cuda: too many rows: ", logits.size(0));
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1, "rlfuse cuda: logits must have a contiguous last dim");
  check_vec(labels, logits, "labels", logits.size(0), at::kLong);
}

// The logit transform of kernels/logprob_options.py as the kernels take it (rlfuse_cuda.h).
rlfuse_logit_transform logit_transform(double temperature, std::optional<double> softcap, double logit_scale) {
  TORCH_CHECK(temperature > 0.0, "rlfuse cuda: temperature must be > 0, got ", temperature);
  TORCH_CHECK(!softcap || *softcap > 0.0, "rlfuse cuda: softcap must be > 0, got ", softcap.value_or(0.0));
  TORCH_CHECK(logit_scale != 0.0, "rlfuse cuda: logit_scale must be nonzero");
  const double slope = logit_scale / temperature;
  if (!softcap) return {static_cast<float>(slope), 0.0f, static_cast<float>(slope)};
  return {static_cast<float>(logit_scale / *softcap), static_cast<float>(*softcap / temperature),
          static_cast<float>(slope)};
}

std::tuple<Tensor, Tensor, Tensor> logprobs_forward(const Tensor& logits, const Tensor& labels, double temperature,
                                                    bool with_entropy, std::optional<double> softcap,
                                                    double logit_scale) {
  check_logits(logits, labels);
  DeviceGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({n}, opts);
  Tensor lse = at::empty({n}, opts);
  Tensor entropy = at::empty({with_entropy ? n : 0}, opts);
  check_launch(rlfuse_cuda_logprobs_forward(logits.data_ptr(), dtype_code(logits), n, logits.size(1),
                                            logits.stride(0), labels.data_ptr<int64_t>(),
                                            logit_transform(temperature, softcap, logit_scale), logp.data_ptr<float>(),
                                            lse.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr,
                                            current_stream(logits)),
               "logprobs_forward");
  return {logp, lse, entropy};
}

Tensor logprobs_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse, const Tensor& entropy,
                         const Tensor& grad_logp, const OptTensor& grad_entropy, double temperature, bool inplace,
                         std::optional<double> softcap, double logit_scale, const OptTensor& out) {
  check_logits(logits, labels);
  const int64_t n = logits.size(0);
  check_vec(lse, logits, "lse", n, at::kFloat);
  check_vec(grad_logp, logits, "grad_logp", n, at::kFloat);
  const float* g_h = opt_ptr(grad_entropy, logits, "grad_entropy", n);
  const float* h = nullptr;
  if (g_h != nullptr) {
    TORCH_CHECK(entropy.defined() && entropy.numel() == n,
                "rlfuse cuda: a gradient for the entropy needs the forward's entropy");
    check_vec(entropy, logits, "entropy", n, at::kFloat);
    h = entropy.data_ptr<float>();
  }
  DeviceGuard guard(logits.device());
  Tensor grad = inplace ? logits : (out.has_value() && out->defined() ? *out : at::empty(logits.sizes(), logits.options()));
  if (!inplace && out.has_value() && out->defined()) {
    check_device(grad, logits, "out");
    TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && grad.dim() == 2 && grad.size(0) == n &&
                    grad.size(1) == logits.size(1) && (grad.stride(1) == 1 || grad.size(1) == 1),
                "rlfuse cuda: out must have logits' dtype and shape with a contiguous last dim");
  }
  check_launch(rlfuse_cuda_logprobs_backward(logits.data_ptr(), dtype_code(logits), n, logits.size(1),
                                             logits.stride(0), labels.data_ptr<int64_t>(), lse.data_ptr<float>(), h,
                                             grad_logp.data_ptr<float>(), g_h, logit_transform(temperature, softcap, logit_scale),
                                             grad.data_ptr(), grad.stride(0), current_stream(logits)),
               "logprobs_backward");
  return grad;
}

std::tuple<Tensor, Tensor> gae(const Tensor& rewards, const Tensor& values, const OptTensor& mask, double gamma,
                               double lam) {
  check_device(rewards, rewards, "rewards");
  TORCH_CHECK(rewards.dim() == 2, "rlfuse cuda: rewards must be [B, T], got ", rewards.sizes());
  TORCH_CHECK(rewards.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "rlfuse cuda: rewards and values must be float32");
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous(), "rlfuse cuda: rewards and values must be contiguous");
  check_device(values, rewards, "values");
  TORCH_CHECK(values.sizes() == rewards.sizes(), "rlfuse cuda: values ", values.sizes(), " != rewards ",
              rewards.sizes());
  const uint8_t* m = nullptr;
  if (mask.has_value() && mask->defined()) {
    check_device(*mask, rewards, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte,
                "rlfuse cuda: mask must be bool or uint8");
    TORCH_CHECK(mask->sizes() == rewards.sizes() && mask->is_contiguous(),
                "rlfuse cuda: mask must be contiguous and shaped like rewards");
    m = static_cast<const uint8_t*>(mask->data_ptr());
  }
  DeviceGuard guard(rewards.device());
  Tensor adv = at::empty_like(rewards);
  Tensor ret = at::empty_like(rewards);
  check_launch(rlfuse_cuda_gae(rewards.data_ptr<float>(), values.data_ptr<float>(), m, rewards.size(0),
                               rewards.size(1), static_cast<float>(gamma), static_cast<float>(lam),
                               adv.data_ptr<float>(), ret.data_ptr<float>(), current_stream(rewards)),
               "gae");
  return {adv, ret};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ppo_loss_forward(
    const Tensor& logp, const Tensor& old_logp, const Tensor& advantages, const Tensor& mask,
    const OptTensor& ref_logp, const OptTensor& entropy, const OptTensor& values, const OptTensor& old_values,
    const OptTensor& returns, const OptTensor& loss_weight, const std::vector<double>& options) {
  TORCH_CHECK(options.size() == RLFUSE_PPO_OPTION_SLOTS, "rlfuse cuda: ppo_loss_forward takes the ",
              RLFUSE_PPO_OPTION_SLOTS, " floats of PPOLossOptions.pack(), got ", options.size());
  check_device(logp, logp, "logp");
  const int64_t n = logp.numel();
  check_vec(logp, logp, "logp", n, at::kFloat);
  check_vec(old_logp, logp, "old_logp", n, at::kFloat);
  check_vec(advantages, logp, "advantages", n, at::kFloat);
  check_vec(mask, logp, "mask", n, at::kFloat);
  const rlfuse_ppo_options o = rlfuse_ppo_options_unpack(options.data());
  TORCH_CHECK(o.kl_estimator >= RLFUSE_KL_K1 && o.kl_estimator <= RLFUSE_KL_K3_PLUS,
              "rlfuse cuda: unknown kl_estimator code ", o.kl_estimator);
  TORCH_CHECK(loss_weight.has_value() == (o.loss_agg != RLFUSE_AGG_TOKEN_MEAN),
              "rlfuse cuda: a loss weight is needed exactly when loss_agg is not token-mean");
  DeviceGuard guard(logp.device());
  const auto opts = logp.options();
  rlfuse_ppo_args a{};
  a.logp = logp.data_ptr<float>();
  a.old_logp = old_logp.data_ptr<float>();
  a.advantages = advantages.data_ptr<float>();
  a.mask = mask.data_ptr<float>();
  a.ref_logp = opt_ptr(ref_logp, logp, "ref_logp", n);
  a.entropy = opt_ptr(entropy, logp, "entropy", n);
  a.values = opt_ptr(values, logp, "values", n);
  a.old_values = opt_ptr(old_values, logp, "old_values", n);
  a.returns = opt_ptr(returns, logp, "returns", n);
  a.loss_weight = opt_ptr(loss_weight, logp, "loss_weight", n);
  TORCH_CHECK(a.values == nullptr || a.returns != nullptr, "rlfuse cuda: values need returns");
  a.n = n;
  a.opts = o;

  Tensor loss = at::empty({}, opts);
  Tensor stats = at::empty({7}, opts);
  Tensor grad_logp = at::empty({n}, opts);
  Tensor grad_entropy = at::empty({a.entropy != nullptr ? n : 0}, opts);
  Tensor grad_values = at::empty({a.values != nullptr ? n : 0}, opts);
  Tensor workspace = at::empty({rlfuse_cuda_ppo_workspace_floats(n)}, opts);
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.grad_logp = grad_logp.data_ptr<float>();
  a.grad_entropy = a.entropy != nullptr ? grad_entropy.data_ptr<float>() : nullptr;
  a.grad_values = a.values != nullptr ? grad_values.data_ptr<float>() : nullptr;
  a.workspace = workspace.data_ptr<float>();
  check_launch(rlfuse_cuda_ppo_loss_forward(&a, current_stream(logp)), "ppo_loss_forward");
  return {loss, stats, grad_logp, grad_entropy, grad_values};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlfuse CUDA kernels: log-prob gathering, GAE, fused PPO loss";
  m.def("logprobs_forward", &logprobs_forward, "(logp, lse, entropy) of labels under softmax(logits / T)",
        py::arg("logits"), py::arg("labels"), py::arg("temperature"), py::arg("with_entropy"),
        py::arg("softcap") = py::none(), py::arg("logit_scale") = 1.0);
  m.def("logprobs_backward", &logprobs_backward, "gradient wrt logits, optionally in place or into out",
        py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),
        py::arg("grad_entropy"), py::arg("temperature"), py::arg("inplace"), py::arg("softcap") = py::none(),
        py::arg("logit_scale") = 1.0, py::arg("out") = py::none());
  m.def("gae", &gae, "(advantages, returns) of masked rows", py::arg("rewards"), py::arg("values"),
        py::arg("mask"), py::arg("gamma"), py::arg("lam"));
  m.def("ppo_loss_forward", &ppo_loss_forward, "(loss, stats, grad_logp, grad_entropy, grad_values)",
        py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("ref_logp"),
        py::arg("entropy"), py::arg("values"), py::arg("old_values"), py::arg("returns"), py::arg("loss_weight"),
        py::arg("options"));
}
