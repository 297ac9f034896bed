// Raw-pointer launchers of the rlfuse CUDA kernels.
//
// The .cu files define these with C linkage and include no torch header, so each one compiles
// on its own (`nvcc -c logprobs.cu`) and, under csrc/cuda/emu/cuda_emu.h, on the host with g++
// for the CPU emulation tests. bindings.cpp checks the tensors and calls them on torch's
// current stream. Every pointer is a device pointer; every launcher returns the launch error
// (cudaSuccess when all kernels were queued). Semantics: design.md §3 and kernels/reference.py.
#pragma once

#include <stdint.h>

#ifndef RLFUSE_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include "../common/ppo_options.h"

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of the logits buffer
enum { RLFUSE_F32 = 0, RLFUSE_BF16 = 1, RLFUSE_F16 = 2 };

// The logit transform of the log-prob ops (kernels/logprob_options.py), per logit x:
// u = x * load_scale; z = u without a soft-cap (cap_t == 0), z = cap_t * tanh(u) with one;
// dz/dx = slope (no cap) or slope * (1 - tanh(u)^2). Without a cap load_scale = slope =
// logit_scale / T; with a cap c: load_scale = logit_scale / c, cap_t = c / T, slope = logit_scale / T.
typedef struct {
  float load_scale;
  float cap_t;
  float slope;
} rlfuse_logit_transform;

// Per row i of logits [n_rows, vocab] (element (i, j) at logits[i * row_stride + j]) with z the
// transformed logits: lse[i] = logsumexp(z_i), logp[i] = z[i, labels[i]] - lse[i], and, when
// entropy != NULL, entropy[i] = H(softmax(z_i)) (-inf logits add 0 · log 0 = 0). One pass over the row.
cudaError_t rlfuse_cuda_logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                                         int64_t row_stride, const int64_t* labels, rlfuse_logit_transform tf,
                                         float* logp, float* lse, float* entropy, cudaStream_t stream);

// grad_logits[i, j] = dz/dx * (g_lp[i] (δ_{j,y} - p_ij) - g_H[i] p_ij (log p_ij + H_i)) (0 where p = 0),
// written with row stride grad_row_stride in the logits dtype. grad_entropy == NULL means
// g_H = 0 (entropy may then be NULL too). grad_logits may equal logits (in-place backward).
cudaError_t rlfuse_cuda_logprobs_backward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                                          int64_t row_stride, const int64_t* labels, const float* lse,
                                          const float* entropy, const float* grad_logp,
                                          const float* grad_entropy, rlfuse_logit_transform tf,
                                          void* grad_logits, int64_t grad_row_stride, cudaStream_t stream);

// GAE over rows of contiguous [batch, seq] float32 tensors; mask (uint8/bool, may be NULL = all
// valid) marks the tokens that take part; advantages/returns are 0 on masked positions.
cudaError_t rlfuse_cuda_gae(const float* rewards, const float* values, const uint8_t* mask, int64_t batch,
                            int64_t seq, float gamma, float lam, float* advantages, float* returns,
                            cudaStream_t stream);


typedef struct rlfuse_ppo_args {
  // inputs, 1-D float32 of length n; the optional ones may be NULL
  const float* logp;
  const float* old_logp;
  const float* advantages;
  const float* mask;        // token weights, normally 0/1
  const float* ref_logp;    // NULL: no KL term
  const float* entropy;     // NULL: no entropy term
  const float* values;      // NULL: no value term
  const float* old_values;  // NULL: value term is not clipped
  const float* returns;     // required when values != NULL
  const float* loss_weight; // NULL: token mean over mask; else loss = Σ loss_weight·term (the
                            // op's weights for the other loss aggregations), given exactly
                            // when opts.loss_agg != RLFUSE_AGG_TOKEN_MEAN
  int64_t n;
  rlfuse_ppo_options opts;  // csrc/common/ppo_options.h
  // outputs
  float* loss;          // [1]
  float* stats;         // [7] loss, policy_loss, value_loss, kl, entropy, clipfrac, approx_kl
  float* grad_logp;     // [n]  d loss / d logp
  float* grad_entropy;  // [n] or NULL when entropy == NULL
  float* grad_values;   // [n] or NULL when values == NULL
  float* workspace;     // rlfuse_cuda_ppo_workspace_floats(n) floats, contents ignored
} rlfuse_ppo_args;

int64_t rlfuse_cuda_ppo_workspace_floats(int64_t n);

// Loss, stats and per-token gradients in one pass over the tokens plus three tiny launches.
// Stats are Σ mask·x / max(Σ mask, 1) (kernels/reference.py), the loss too unless loss_weight
// is given, the gradients are those of the loss, and sums are reduced in a fixed order
// (bitwise reproducible).
cudaError_t rlfuse_cuda_ppo_loss_forward(const rlfuse_ppo_args* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
