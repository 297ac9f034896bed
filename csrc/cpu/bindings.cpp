// Python bindings of the CPU kernels: rlfuse.kernels._C. Called through
// kernels/backends/cpp.py, which states the contract of each function.
#include <torch/extension.h>

#include "ops.h"
#include "../common/ppo_options.h"

namespace {

using OptT = std::optional<at::Tensor>;


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_forward(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const OptT& ref_logp, const OptT& entropy, const OptT& values,
    const OptT& old_values, const OptT& returns, const OptT& loss_weight, const std::vector<double>& options) {
  TORCH_CHECK(options.size() == RLFUSE_PPO_OPTION_SLOTS, "rlfuse cpp: ppo_loss_forward takes the ",
              RLFUSE_PPO_OPTION_SLOTS, " floats of PPOLossOptions.pack(), got ", options.size());
  return rlfuse::ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
                                  returns, loss_weight, rlfuse_ppo_options_unpack(options.data()));
}

}  // namespace

namespace rlfuse {  // sample.cpp: exact inverse-CDF draws from softmax(z / T), one per row
std::tuple<at::Tensor, at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& uniforms, double temperature);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlfuse CPU kernels: fused log-probs, GAE and PPO loss (OpenMP, vectorised)";
  m.def("logprobs_forward", &rlfuse::logprobs_forward, "log-probs (+ entropy) of labels from logits",
        py::arg("logits"), py::arg("labels"), py::arg("temperature"), py::arg("with_entropy"),
        py::arg("softcap") = py::none(), py::arg("logit_scale") = 1.0);
  m.def("logprobs_backward", &rlfuse::logprobs_backward,
        "gradient of the log-probs (+ entropy) wrt logits, optionally in place or into out",
        py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("temperature"), py::arg("inplace"),
        py::arg("softcap") = py::none(), py::arg("logit_scale") = 1.0, py::arg("out") = py::none());
  m.def("sample_rows", &rlfuse::sample_rows, "(tokens, log-probs) drawn by inverse CDF from softmax(logits / T)",
        py::arg("logits"), py::arg("uniforms"), py::arg("temperature"));
  m.def("gae", &rlfuse::gae, "generalised advantage estimation over padded rows",
        py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"), py::arg("lam"));
  m.def("ppo_loss_forward", &ppo_loss_forward,
        "PPO loss, stats and per-token gradients in one pass; the options are the one list "
        "of rlfuse.kernels.ppo_options.PPOLossOptions.pack()",
        py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"),
        py::arg("ref_logp"), py::arg("entropy"), py::arg("values"), py::arg("old_values"),
        py::arg("returns"), py::arg("loss_weight"), py::arg("options"));
}
