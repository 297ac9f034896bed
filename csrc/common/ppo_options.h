// Options of the fused PPO loss, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// Plain C so that it compiles under g++, nvcc and the CUDA host emulation alike. The codes are
// those of kernels/ppo_options.py (KL_CODES, LOSS_AGG_CODES), the one table; a test reads this
// header and checks that they agree. Both bindings fill the struct from the flat tuple of
// PPOLossOptions.as_op_args() with ppo_options_args.h. "Absent" is a has_* flag of 0.
#pragma once

#ifdef __CUDACC__
#define RLFUSE_PPO_HD __host__ __device__  // the helpers below run in kernels too
#else
#define RLFUSE_PPO_HD
#endif

#ifdef __cplusplus
extern "C" {
#endif

// in-loss KL estimators, d = logp - ref_logp; the "+" ones take the value of k1/k3 and the
// gradient of k2 (= d)
enum { RLFUSE_KL_K1 = 1, RLFUSE_KL_K2 = 2, RLFUSE_KL_K3 = 3, RLFUSE_KL_K1_PLUS = 4, RLFUSE_KL_K3_PLUS = 5 };
// loss aggregations; the kernels see them only as a per-token loss weight computed by the op
enum { RLFUSE_AGG_TOKEN_MEAN = 0, RLFUSE_AGG_SEQ_MEAN_TOKEN_MEAN = 1, RLFUSE_AGG_SEQ_MEAN_TOKEN_SUM_NORM = 2 };

typedef struct rlfuse_ppo_options {
  float clip_eps;           // ratio clipped to [1 - clip_eps, 1 + clip_eps_high]
  int has_clip_eps_high;    // 0: clip_eps_high = clip_eps
  float clip_eps_high;
  int has_dual_clip;        // 0: no dual clip
  float dual_clip;
  float kl_coef;
  int kl_estimator;         // RLFUSE_KL_*
  float entropy_coef;
  int has_value_clip;       // 0: no value clipping
  float value_clip;
  float value_coef;
  int loss_agg;             // RLFUSE_AGG_*
  int has_loss_agg_norm;
  float loss_agg_norm;
} rlfuse_ppo_options;

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
