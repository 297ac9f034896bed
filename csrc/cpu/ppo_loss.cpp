// PPO loss forward + backward in one pass over the tokens.
//
// A cheap serial pre-pass counts the mask (so the gradients can be written already scaled by
// 1 / count); then one pass computes, per token, every loss term, its masked contribution
// to the seven stats, and the gradients wrt logp, entropy and values.
//
// Determinism: tokens are cut into fixed blocks of kBlock; each block reduces into kLanes
// float lanes (fixed order), the lanes into one partial per block, and the partials are
// added in block order in double. None of that depends on how blocks map to threads.
//
// Conventions (identical to backends/torch_backend.py):
//   policy: take the unclipped branch when unclipped >= clipped (its gradient -A r flows),
//           else the clipped constant (no gradient); clipfrac counts clipped > unclipped.
//   dual clip: where A < 0 and pg > -A c, pg = -A c with no gradient.
//   value:  unclipped branch when (v-R)^2 >= (v_clip-R)^2, else the clipped one whose
//           gradient flows only while |v - old_v| < value_clip.
//   KL:     k1+/k3+ run the k1/k3 value code with the gradient of k2 (d), a runtime flag.
//   weight: token i weighs w[i] * w_scale in the loss and its gradients: the mask and 1/count
//           (token mean), or the op's per-token loss weight and 1 (other loss aggregations).
//           The stats other than the loss are always token means.
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/ppo_options.h"
#include "common.h"
#include "ops.h"

namespace rlfuse {
namespace {

constexpr int64_t kBlock = 4096;
// Blocks per parallel task: a task must be worth a fork/join even on a busy host, where waking
// a second OpenMP thread can cost milliseconds; the pass runs at ~1 ns/token on one core.
constexpr int64_t kBlocksPerTask = 128;
constexpr int kStats = 7;  // loss, policy_loss, value_loss, kl, entropy, clipfrac, approx_kl

struct PpoArgs {
  const float* logp;
  const float* old_logp;
  const float* adv;
  const float* mask;
  const float* ref;
  const float* ent;
  const float* val;
  const float* old_val;
  const float* ret;
  const float* w;    // loss weight per token: the mask, or the op's loss weights
  float* g_logp;
  float* g_ent;
  float* g_val;
  float lo, hi;      // ratio clip range
  float dual;        // dual-clip constant
  float kl_coef, ent_coef, vclip, v_coef;
  float inv;         // 1 / max(count, 1)
  float w_scale;     // inv with the mask as weight, 1 with explicit loss weights
  bool kl_st;        // straight-through estimator: gradient d whatever the value
};

struct Terms {
  float total, pg, vf, kl, ent, clip, approx_kl;
};

// One token: writes its gradients, returns its (unmasked) loss terms.
// KL: 0 none, 1/2/3 = value of k1/k2/k3 (RLFUSE_KL_*); KST: the gradient is k2's (k1+/k3+).
// VAL: 0 none, 1 plain, 2 clipped against old values. Every switch is a template parameter: a
// runtime branch in this loop body stops gcc vectorising it (measured 20x slower).
template <int KL, bool KST, bool ENT, int VAL, bool DUAL>
RLFUSE_INLINE Terms token(const float* __restrict logp, const float* __restrict old_logp,
                          const float* __restrict adv, const float* __restrict mask,
                          const float* __restrict ref, const float* __restrict ent,
                          const float* __restrict val, const float* __restrict old_val,
                          const float* __restrict ret, const float* __restrict w,
                          float* __restrict g_logp,
                          float* __restrict g_ent, float* __restrict g_val, const PpoArgs& c,
                          int64_t i) {
  const float m = mask[i];
  const float lp = logp[i];
  const float log_ratio = lp - old_logp[i];
  const float ratio = fast_exp(log_ratio);
  const float A = adv[i];
  const float unclipped = -A * ratio;
  float rc = ratio < c.lo ? c.lo : ratio;
  rc = rc > c.hi ? c.hi : rc;
  const float clipped = -A * rc;
  const bool take = unclipped >= clipped;
  float pg = take ? unclipped : clipped;
  float g = take ? unclipped : 0.0f;
  if (DUAL) {
    const float cap = -A * c.dual;
    const bool capped = (A < 0.0f) & (pg > cap);
    pg = capped ? cap : pg;
    g = capped ? 0.0f : g;
  }
  float total = pg;
  float kl = 0.0f;
  if (KL != 0) {
    const float d = lp - ref[i];
    float dk;
    if (KL == 1) {
      kl = d;
      dk = 1.0f;
    } else if (KL == 2) {
      kl = 0.5f * d * d;
      dk = d;
    } else {
      const float e = fast_exp(-d);
      kl = e + d - 1.0f;
      dk = 1.0f - e;
    }
    if (KST) dk = d;
    total = total + c.kl_coef * kl;
    g = g + c.kl_coef * dk;
  }
  float entropy = 0.0f;
  if (ENT) {
    entropy = ent[i];
    total = total - c.ent_coef * entropy;
  }
  const bool on = m != 0.0f;
  const float wi = w[i];
  const float ms = wi * c.w_scale;
  float vf = 0.0f;
  if (VAL != 0) {
    const float v = val[i];
    const float R = ret[i];
    const float err = v - R;
    vf = err * err;
    float dv = err;
    if (VAL == 2) {
      const float ov = old_val[i];
      const float delta = v - ov;
      float dc = delta < -c.vclip ? -c.vclip : delta;
      dc = dc > c.vclip ? c.vclip : dc;
      const float err_c = ov + dc - R;
      const float vfc = err_c * err_c;
      const bool use_unclipped = vf >= vfc;
      const bool inside = std::fabs(delta) < c.vclip;
      vf = use_unclipped ? vf : vfc;
      dv = use_unclipped ? err : (inside ? err_c : 0.0f);
    }
    vf = 0.5f * vf;
    total = total + c.v_coef * vf;
    g_val[i] = on ? c.v_coef * dv * ms : 0.0f;
  }
  g_logp[i] = on ? g * ms : 0.0f;
  if (ENT) g_ent[i] = -c.ent_coef * ms;
  Terms t;
  t.total = on ? total * wi : 0.0f;
  t.pg = on ? pg * m : 0.0f;
  t.vf = on ? vf * m : 0.0f;
  t.kl = on ? kl * m : 0.0f;
  t.ent = on ? entropy * m : 0.0f;
  t.clip = on ? (clipped > unclipped ? m : 0.0f) : 0.0f;
  t.approx_kl = on ? (ratio - 1.0f - log_ratio) * m : 0.0f;
  return t;
}

template <int KL, bool KST, bool ENT, int VAL, bool DUAL>
void ppo_block(const PpoArgs& c, int64_t i0, int64_t i1, double* partial) {
  const float* __restrict logp = c.logp + i0;
  const float* __restrict old_logp = c.old_logp + i0;
  const float* __restrict adv = c.adv + i0;
  const float* __restrict mask = c.mask + i0;
  const float* __restrict ref = KL ? c.ref + i0 : nullptr;
  const float* __restrict ent = ENT ? c.ent + i0 : nullptr;
  const float* __restrict val = VAL ? c.val + i0 : nullptr;
  const float* __restrict ret = VAL ? c.ret + i0 : nullptr;
  const float* __restrict old_val = VAL == 2 ? c.old_val + i0 : nullptr;
  const float* __restrict w = c.w + i0;
  float* __restrict g_logp = c.g_logp + i0;
  float* __restrict g_ent = ENT ? c.g_ent + i0 : nullptr;
  float* __restrict g_val = VAL ? c.g_val + i0 : nullptr;
  const PpoArgs k = c;  // constants in a local copy the loop can keep in registers
  float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {}, a4[kLanes] = {},
        a5[kLanes] = {}, a6[kLanes] = {};
  const int64_t n = i1 - i0;
  auto step = [&](int64_t i, int j) RLFUSE_LAMBDA_INLINE {
    const Terms t = token<KL, KST, ENT, VAL, DUAL>(logp, old_logp, adv, mask, ref, ent, val, old_val,
                                              ret, w, g_logp, g_ent, g_val, k, i);
    a0[j] += t.total;
    a1[j] += t.pg;
    a2[j] += t.vf;
    a3[j] += t.kl;
    a4[j] += t.ent;
    a5[j] += t.clip;
    a6[j] += t.approx_kl;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // outputs never alias inputs and each lane owns its accumulators: no dependences
#pragma GCC ivdep
    for (int j = 0; j < kLanes; ++j) step(i + j, j);
  }
  for (int j = 0; i < n; ++i, ++j) step(i, j);
  partial[0] = lane_sum(a0);
  partial[1] = lane_sum(a1);
  partial[2] = lane_sum(a2);
  partial[3] = lane_sum(a3);
  partial[4] = lane_sum(a4);
  partial[5] = lane_sum(a5);
  partial[6] = lane_sum(a6);
}

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

template <typename F>
void with_kl(int kl, F&& f) {
  switch (kl) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 3>{}); break;
  }
}

template <typename F>
void with_val(int val, F&& f) {
  switch (val) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    default: f(std::integral_constant<int, 2>{}); break;
  }
}

at::Tensor vec_f32(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "ppo_loss_forward: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.numel() == n, "ppo_loss_forward: ", name, " has ", t.numel(), " elements, expected ", n);
  return t.reshape({n}).to(at::kFloat).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_forward(
    const at::Tensor& logp_in, const at::Tensor& old_logp_in, const at::Tensor& adv_in,
    const at::Tensor& mask_in, const std::optional<at::Tensor>& ref_in,
    const std::optional<at::Tensor>& ent_in, const std::optional<at::Tensor>& val_in,
    const std::optional<at::Tensor>& old_val_in, const std::optional<at::Tensor>& ret_in,
    const std::optional<at::Tensor>& weight_in, const rlfuse_ppo_options& o) {
  const int64_t n = logp_in.numel();
  const at::Tensor logp = vec_f32(logp_in, n, "logp");
  const at::Tensor old_logp = vec_f32(old_logp_in, n, "old_logp");
  const at::Tensor adv = vec_f32(adv_in, n, "advantages");
  const at::Tensor mask = vec_f32(mask_in, n, "mask");
  TORCH_CHECK(o.kl_estimator >= RLFUSE_KL_K1 && o.kl_estimator <= RLFUSE_KL_K3_PLUS,
              "ppo_loss_forward: unknown kl_estimator code ", o.kl_estimator);
  TORCH_CHECK(weight_in.has_value() == (o.loss_agg != RLFUSE_AGG_TOKEN_MEAN),
              "ppo_loss_forward: a loss weight is needed exactly when loss_agg is not token-mean");
  const bool has_ref = ref_in.has_value(), has_ent = ent_in.has_value(), has_val = val_in.has_value();
  const bool clip_val = has_val && o.has_value_clip && old_val_in.has_value();
  TORCH_CHECK(!has_val || ret_in.has_value(), "ppo_loss_forward: values given without returns");
  at::Tensor ref, ent, val, old_val, ret;
  const at::Tensor weight = weight_in.has_value() ? vec_f32(*weight_in, n, "loss_weight") : mask;
  if (has_ref) ref = vec_f32(*ref_in, n, "ref_logp");
  if (has_ent) ent = vec_f32(*ent_in, n, "entropy");
  if (has_val) {
    val = vec_f32(*val_in, n, "values");
    ret = vec_f32(*ret_in, n, "returns");
  }
  if (clip_val) old_val = vec_f32(*old_val_in, n, "old_values");

  auto f32 = logp.options();
  at::Tensor g_logp = at::empty({n}, f32);
  at::Tensor g_ent = at::empty({has_ent ? n : 0}, f32);
  at::Tensor g_val = at::empty({has_val ? n : 0}, f32);
  at::Tensor stats = at::empty({kStats}, f32);

  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  const float* mk = mask.data_ptr<float>();

  // Pre-pass: the mask count, with the same fixed blocking. Serial: it reads one array at
  // memory speed, cheaper than waking a second thread for it.
  double count = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
    float acc[kLanes] = {0};
    int64_t i = i0;
    for (; i + kLanes <= i1; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) acc[j] += mk[i + j];
    }
    for (int j = 0; i < i1; ++i, ++j) acc[j] += mk[i];
    count += lane_sum(acc);
  }
  const float inv = 1.0f / std::max(static_cast<float>(count), 1.0f);

  PpoArgs a{};
  a.logp = logp.data_ptr<float>();
  a.old_logp = old_logp.data_ptr<float>();
  a.adv = adv.data_ptr<float>();
  a.mask = mk;
  a.ref = has_ref ? ref.data_ptr<float>() : nullptr;
  a.ent = has_ent ? ent.data_ptr<float>() : nullptr;
  a.val = has_val ? val.data_ptr<float>() : nullptr;
  a.ret = has_val ? ret.data_ptr<float>() : nullptr;
  a.old_val = clip_val ? old_val.data_ptr<float>() : nullptr;
  a.w = weight.data_ptr<float>();
  a.g_logp = g_logp.data_ptr<float>();
  a.g_ent = has_ent ? g_ent.data_ptr<float>() : nullptr;
  a.g_val = has_val ? g_val.data_ptr<float>() : nullptr;
  a.lo = 1.0f - o.clip_eps;
  a.hi = 1.0f + rlfuse_ppo_clip_high(&o);
  a.dual = o.has_dual_clip ? o.dual_clip : 0.0f;
  a.kl_coef = o.kl_coef;
  a.ent_coef = o.entropy_coef;
  a.vclip = clip_val ? o.value_clip : 0.0f;
  a.v_coef = o.value_coef;
  a.inv = inv;
  a.w_scale = weight_in.has_value() ? 1.0f : inv;
  a.kl_st = rlfuse_kl_straight_through(o.kl_estimator) != 0;

  std::vector<double> partials(n_blocks * kStats);
  const int kl = has_ref ? rlfuse_kl_value_code(o.kl_estimator) : 0;
  const int vmode = has_val ? (clip_val ? 2 : 1) : 0;
  with_kl(kl, [&](auto KL) {
   with_bool(kl != 0 && a.kl_st, [&](auto KST) {
    with_bool(has_ent, [&](auto ENT) {
      with_val(vmode, [&](auto VAL) {
        with_bool(o.has_dual_clip != 0, [&](auto DUAL) {
          at::parallel_for(0, n_blocks, kBlocksPerTask, [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
              ppo_block<decltype(KL)::value, decltype(KST)::value, decltype(ENT)::value,
                        decltype(VAL)::value, decltype(DUAL)::value>(a, i0, i1, partials.data() + b * kStats);
            }
          });
        });
      });
    });
   });
  });

  double sums[kStats] = {0};
  for (int64_t b = 0; b < n_blocks; ++b) {
    for (int k = 0; k < kStats; ++k) sums[k] += partials[b * kStats + k];
  }
  float* st = stats.data_ptr<float>();
  for (int k = 0; k < kStats; ++k) st[k] = static_cast<float>(sums[k]) * inv;
  st[0] = static_cast<float>(sums[0]) * a.w_scale;  // the loss: token mean or weighted sum
  at::Tensor loss = at::empty({}, f32);
  loss.fill_(st[0]);
  return {loss, stats, g_logp, g_ent, g_val};
}

}  // namespace rlfuse
