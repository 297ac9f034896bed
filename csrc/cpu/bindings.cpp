// Python bindings of the CPU kernels: rlfuse.kernels._C. Called through
// kernels/backends/cpp.py, which states the contract of each function.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlfuse CPU kernels: fused log-probs, GAE and PPO loss (OpenMP, vectorised)";
  m.def("logprobs_forward", &rlfuse::logprobs_forward, "log-probs (+ entropy) of labels from logits",
        py::arg("logits"), py::arg("labels"), py::arg("temperature"), py::arg("with_entropy"));
  m.def("logprobs_backward", &rlfuse::logprobs_backward,
        "gradient of the log-probs (+ entropy) wrt logits, optionally in place",
        py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("temperature"), py::arg("inplace"));
  m.def("gae", &rlfuse::gae, "generalised advantage estimation over padded rows",
        py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"), py::arg("lam"));
  m.def("ppo_loss_forward", &rlfuse::ppo_loss_forward,
        "PPO loss, stats and per-token gradients in one pass",
        py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"),
        py::arg("ref_logp"), py::arg("entropy"), py::arg("values"), py::arg("old_values"),
        py::arg("returns"), py::arg("clip_eps"), py::arg("clip_eps_high"), py::arg("dual_clip"),
        py::arg("kl_coef"), py::arg("kl_estimator"), py::arg("entropy_coef"),
        py::arg("value_clip"), py::arg("value_coef"));
}
