// Options of the fused PPO loss, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// Plain C so that it compiles under g++, nvcc and the CUDA host emulation alike. The block
// marked GENERATED is written from kernels/ppo_options.py (PPOLossOptions, the one table) by
// `python -m rlfuse.kernels.ppo_options --write`; a test fails while it is stale. Both bindings
// receive the options as the one list of PPOLossOptions.pack() and unpack it with
// rlfuse_ppo_options_unpack. "Absent" is a has_* flag of 0.
#pragma once

#ifdef __CUDACC__
#define RLFUSE_PPO_HD __host__ __device__  // the helpers below run in kernels too
#else
#define RLFUSE_PPO_HD
#endif

#ifdef __cplusplus
extern "C" {
#endif

// in-loss KL estimators (d = logp - ref_logp; the "+" ones take the value of k1/k3 and the
// gradient of k2 = d) and loss aggregations (the kernels see those only as a per-token loss
// weight computed by the op), then the options struct and its unpacker:
// BEGIN GENERATED from kernels/ppo_options.py
// (python -m rlfuse.kernels.ppo_options --write; do not edit by hand)
enum { RLFUSE_KL_K1 = 1, RLFUSE_KL_K2 = 2, RLFUSE_KL_K3 = 3, RLFUSE_KL_K1_PLUS = 4, RLFUSE_KL_K3_PLUS = 5 };  // kl_estimator
enum { RLFUSE_AGG_TOKEN_MEAN = 0, RLFUSE_AGG_SEQ_MEAN_TOKEN_MEAN = 1, RLFUSE_AGG_SEQ_MEAN_TOKEN_SUM_NORM = 2 };  // loss_agg
enum { RLFUSE_PPO_OPTION_SLOTS = 24 };  // len(PPOLossOptions().pack())

typedef struct rlfuse_ppo_options {
  float clip_eps;
  int has_clip_eps_high;  // 0: None
  float clip_eps_high;
  int has_dual_clip;  // 0: None
  float dual_clip;
  float kl_coef;
  int kl_estimator;  // RLFUSE_KL_*
  float entropy_coef;
  int has_value_clip;  // 0: None
  float value_clip;
  float value_coef;
  int loss_agg;  // RLFUSE_AGG_*
  int has_loss_agg_norm;  // 0: None
  float loss_agg_norm;
  int has_kl_clamp;  // 0: None
  float kl_clamp;
  int has_log_ratio_clamp;  // 0: None
  float log_ratio_clamp;
} rlfuse_ppo_options;

// the list of PPOLossOptions.pack() (RLFUSE_PPO_OPTION_SLOTS doubles) as the struct
static inline rlfuse_ppo_options rlfuse_ppo_options_unpack(const double* v) {
  rlfuse_ppo_options o;
  o.clip_eps = (float)v[1];
  o.has_clip_eps_high = v[2] != 0.0;
  o.clip_eps_high = (float)v[3];
  o.has_dual_clip = v[4] != 0.0;
  o.dual_clip = (float)v[5];
  o.kl_coef = (float)v[7];
  o.kl_estimator = (int)v[9];
  o.entropy_coef = (float)v[11];
  o.has_value_clip = v[12] != 0.0;
  o.value_clip = (float)v[13];
  o.value_coef = (float)v[15];
  o.loss_agg = (int)v[17];
  o.has_loss_agg_norm = v[18] != 0.0;
  o.loss_agg_norm = (float)v[19];
  o.has_kl_clamp = v[20] != 0.0;
  o.kl_clamp = (float)v[21];
  o.has_log_ratio_clamp = v[22] != 0.0;
  o.log_ratio_clamp = (float)v[23];
  return o;
}
// END GENERATED

// the upper clip width actually used
RLFUSE_PPO_HD static inline float rlfuse_ppo_clip_high(const rlfuse_ppo_options* o) {
  return o->has_clip_eps_high ? o->clip_eps_high : o->clip_eps;
}

// the estimator whose VALUE is computed (k1+ -> k1, k3+ -> k3) and whether the gradient is k2's
RLFUSE_PPO_HD static inline int rlfuse_kl_value_code(int code) {
  return code == RLFUSE_KL_K1_PLUS ? RLFUSE_KL_K1 : code == RLFUSE_KL_K3_PLUS ? RLFUSE_KL_K3 : code;
}
RLFUSE_PPO_HD static inline int rlfuse_kl_straight_through(int code) {
  return code == RLFUSE_KL_K1_PLUS || code == RLFUSE_KL_K3_PLUS;
}

#ifdef __cplusplus
}
#endif
