// Fused log-prob / entropy row kernels.
//
// Forward reads each row of logits once: the row is walked in blocks of kBlock elements
// that stay in L1; per block we take the block max, rescale the running (sum, entropy-sum)
// if the max grew, and add the block's exp terms (an online log-sum-exp). With
// z = logits / T and m the running max we keep
//     s = sum e^(z - m)          t = sum e^(z - m) * (z - m)
// and rescale both by c = e^(m - m') when the max becomes m':  s' = c s,  t' = c (t + (m - m') s).
// Then lse = m + log s, logp = z_y - lse and entropy = log s - t / s.
//
// Backward is one pass per row: p = exp(z - lse) from the saved lse, then
//     grad_z = g_lp (onehot - p) - g_H p (log p + H),   grad_logits = grad_z · dz/dx,
// written to a fresh tensor, a given one, or over the logits themselves (in place).
//
// z is the transformed logit (kernels/logprob_options.py): z = x·s / T without a soft-cap, and
// z = (c / T)·tanh(x·s / c) with one, so dz/dx = (s / T)·(1 - tanh²). A -inf logit has p = 0;
// its entropy term p·log p and its gradient are taken as 0 (never 0·inf = NaN).
//
// Rows are independent and each is done by one thread with a fixed lane layout, so the
// results do not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>

#include "common.h"
#include "ops.h"

namespace rlfuse {
namespace {

constexpr int64_t kBlock = 2048;  // floats per block: 8 KB, stays in L1
constexpr int64_t kPrefetchAhead = 2 * kBlock;  // elements: how far ahead the forward prefetches
constexpr float kLog2e = 1.44269504088896341f;

// Rows per parallel task: >= 256K logits (~0.1 ms), so a fork/join is always amortised.
inline int64_t row_grain(int64_t v) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(v, 1)); }

// tanh(x) in float, branch-free (Cephes tanhf): an odd polynomial below |x| = 0.625, else
// 1 - 2 / (e^(2|x|) + 1); tanh(±inf) = ±1, NaN propagates.
RLFUSE_INLINE float fast_tanh(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float big = 1.0f - 2.0f / (fast_exp(2.0f * ax) + 1.0f);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * ax + ax;
  const float r = ax < 0.625f ? small : big;
  return x < 0.0f ? -r : r;
}

// The logit transform of one op call. Without a cap the whole transform is one multiply
// folded into the load (load_scale = s / T); with one, the load gives u = x·s / c and
// z = cap_t·tanh(u), cap_t = c / T.
struct Transform {
  float load_scale;
  bool scaled;  // load_scale != 1
  bool capped;
  float cap_t;  // c / T
  float slope;  // dz/dx without a cap (s / T); with one, s / T times (1 - tanh²)

  Transform(double temperature, std::optional<double> softcap, double logit_scale) {
    const double st = logit_scale / temperature;
    capped = softcap.has_value();
    load_scale = static_cast<float>(capped ? logit_scale / *softcap : st);
    scaled = load_scale != 1.0f;
    cap_t = capped ? static_cast<float>(*softcap / temperature) : 1.0f;
    slope = static_cast<float>(st);
  }
};

// z of a block: the loaded values, soft-capped in buf when there is a cap.
template <typename T>
inline const float* load_z(const T* x, int64_t n, const Transform& tf, float* buf) {
  const float* u = load_block(x, n, tf.load_scale, tf.scaled, buf);
  if (!tf.capped) return u;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) buf[i] = tf.cap_t * fast_tanh(u[i]);
  return buf;
}

// A log-probability clamped to >= -200 (where e^x is 0 in float anyway): the -inf of a -inf
// logit becomes finite, so p·log p = 0·(-200) = 0 instead of NaN. Written as a clamp, not as
// a select on p > 0, because gcc vectorises the clamp and not the select (13x slower).
RLFUSE_INLINE float finite_log(float x) { return x < -200.0f ? -200.0f : x; }

// sum e^(z - m) and, when WithEnt, sum e^(z - m) (z - m), over one block. ``next`` is where
// the next block starts (in elements of T): it is prefetched while the exps run, so memory
// keeps streaming during this compute-bound pass instead of idling until the next block's max
// pass asks for it (without it the forward ran at ~30% of the bandwidth floor, the backward,
// which streams in its single pass, at ~90%).
template <bool WithEnt, typename T>
inline void block_exp_sums(const float* z, int64_t n, float m, const T* next, float& s_out, float& t_out) {
  float s[kLanes] = {0};
  float t[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    __builtin_prefetch(next + i, 0, 3);  // kLanes elements: a cache line of float, half of bf16's
    for (int j = 0; j < kLanes; ++j) {
      const float d = z[i + j] - m;
      const float e = fast_exp2_softmax_term(d * kLog2e);
      s[j] += e;
      if (WithEnt) t[j] += e * finite_log(d);  // -inf logit: 0·log 0 = 0, not 0·inf
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float d = z[i] - m;
    const float e = fast_exp2_softmax_term(d * kLog2e);
    s[j] += e;
    if (WithEnt) t[j] += e * finite_log(d);
  }
  s_out = lane_sum(s);
  t_out = WithEnt ? lane_sum(t) : 0.0f;
}

template <typename T, bool WithEnt>
void forward_rows(const T* base, int64_t row_stride, int64_t v, const int64_t* labels,
                  const Transform& tf, float* logp, float* lse, float* ent, int64_t r0, int64_t r1) {
  alignas(64) float buf[kBlock];
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = base + r * row_stride;
    float m = neg_inf, s = 0.0f, t = 0.0f;
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int64_t n = std::min(kBlock, v - j0);
      const float* z = load_z(x + j0, n, tf, buf);
      const float bm = max_skip_nan(z, n);
      if (bm > m) {
        if (s > 0.0f) {
          const float c = fast_exp(m - bm);
          if (WithEnt) t = c * (t + (m - bm) * s);
          s = c * s;
        }
        m = bm;
      }
      if (m == neg_inf) continue;  // everything so far is -inf: contributes nothing
      float bs, bt;
      // two blocks ahead (in a contiguous tensor that runs on into the next row; a prefetch
      // past the end never faults)
      const T* next = x + j0 + kPrefetchAhead;
      block_exp_sums<WithEnt>(z, n, m, next, bs, bt);
      s += bs;
      if (WithEnt) t += bt;
    }
    float zy_buf;
    const float zy = *load_z(x + labels[r], 1, tf, &zy_buf);
    const float log_s = std::log(s);
    const float l = m + log_s;
    lse[r] = l;
    logp[r] = zy - l;
    if (WithEnt) ent[r] = log_s - t / s;
  }
}

template <typename T, bool WithEnt, bool Capped>
void backward_rows(const T* base, int64_t row_stride, T* out, int64_t out_stride, int64_t v,
                   const int64_t* labels, const float* lse, const float* ent, const float* g_lp,
                   const float* g_ent, const Transform& tf, int64_t r0, int64_t r1) {
  alignas(64) float buf[kBlock];
  alignas(64) float obuf[kBlock];
  constexpr bool kFloatOut = std::is_same<T, float>::value;
  const float slope = tf.slope, cap_t = tf.cap_t;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = base + r * row_stride;
    T* o_row = out + r * out_stride;
    const float gl = g_lp[r];
    const float ge = WithEnt ? g_ent[r] : 0.0f;
    if (gl == 0.0f && ge == 0.0f) {  // e.g. masked tokens: the gradient row is 0
      std::fill(obuf, obuf + std::min(kBlock, v), 0.0f);
      for (int64_t j0 = 0; j0 < v; j0 += kBlock) store_block(o_row + j0, obuf, std::min(kBlock, v - j0));
      continue;
    }
    const float l = lse[r];
    const float h = WithEnt ? ent[r] : 0.0f;
    // grad_z_i = p_i * (-gl - ge (q_i + H)) (+ gl at the label), q_i = z_i - lse
    const float c0 = -gl - ge * h;
    const int64_t y = labels[r];
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int64_t n = std::min(kBlock, v - j0);
      // without a cap: z; with one: u = x·s/c, turned into tanh(u) here
      const float* u = load_block(x + j0, n, tf.load_scale, tf.scaled, buf);
      float* o = kFloatOut ? reinterpret_cast<float*>(o_row + j0) : obuf;
      if (Capped) {
#pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) buf[i] = fast_tanh(u[i]);
        u = buf;
      }
#pragma GCC ivdep
      for (int64_t i = 0; i < n; ++i) {
        const float th = u[i];
        const float q = (Capped ? cap_t * th : th) - l;
        const float p = fast_exp_nonpos(q);
        const float gz = WithEnt ? p * (c0 - ge * finite_log(q)) : p * c0;
        o[i] = gz * (Capped ? slope * (1.0f - th * th) : slope);
      }
      if (y >= j0 && y < j0 + n) {
        const float th = u[y - j0];
        o[y - j0] += gl * (Capped ? slope * (1.0f - th * th) : slope);
      }
      if (!kFloatOut) store_block(o_row + j0, obuf, n);
    }
  }
}

void check_rows(const at::Tensor& logits, const at::Tensor& labels, const char* fn) {
  TORCH_CHECK(logits.device().is_cpu(), fn, ": logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, fn,
              ": the vocabulary dimension of logits must be contiguous");
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == logits.size(0),
              fn, ": labels must be an int64 CPU tensor of shape [N]");
}

at::Tensor f32_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == n, what, " must be a CPU tensor with ", n,
              " elements, got ", t.sizes());
  return t.reshape({n}).to(at::kFloat).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits,
                                                                const at::Tensor& labels_in,
                                                                double temperature,
                                                                bool with_entropy,
                                                                std::optional<double> softcap,
                                                                double logit_scale) {
  TORCH_CHECK(temperature > 0.0, "logprobs_forward: temperature must be > 0");
  TORCH_CHECK(!softcap || *softcap > 0.0, "logprobs_forward: softcap must be > 0");
  TORCH_CHECK(logit_scale != 0.0, "logprobs_forward: logit_scale must be nonzero");
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  check_rows(logits, labels, "logprobs_forward");
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v > 0 || n == 0, "logprobs_forward: empty vocabulary");
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), lse = at::empty({n}, f32);
  at::Tensor ent = at::empty({with_entropy ? n : 0}, f32);
  if (n == 0) return {logp, lse, ent};
  const Transform tf(temperature, softcap, logit_scale);
  const int64_t stride = logits.stride(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *ls = lse.data_ptr<float>();
  float* en = with_entropy ? ent.data_ptr<float>() : nullptr;
  dispatch_logits_dtype(logits.scalar_type(), "logprobs_forward", [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(logits.data_ptr());
    at::parallel_for(0, n, row_grain(v), [&](int64_t r0, int64_t r1) {
      if (with_entropy) {
        forward_rows<T, true>(base, stride, v, lab, tf, lp, ls, en, r0, r1);
      } else {
        forward_rows<T, false>(base, stride, v, lab, tf, lp, ls, en, r0, r1);
      }
    });
  });
  return {logp, lse, ent};
}

at::Tensor logprobs_backward(const at::Tensor& logits, const at::Tensor& labels_in,
                             const at::Tensor& lse_in, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, double temperature,
                             bool inplace, std::optional<double> softcap, double logit_scale,
                             const std::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(temperature > 0.0, "logprobs_backward: temperature must be > 0");
  TORCH_CHECK(!softcap || *softcap > 0.0, "logprobs_backward: softcap must be > 0");
  TORCH_CHECK(logit_scale != 0.0, "logprobs_backward: logit_scale must be nonzero");
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  check_rows(logits, labels, "logprobs_backward");
  const int64_t n = logits.size(0), v = logits.size(1);
  const bool with_ent = grad_entropy.has_value();
  at::Tensor lse = f32_vector(lse_in, n, "logprobs_backward: lse");
  at::Tensor glp = f32_vector(grad_logp, n, "logprobs_backward: grad_logp");
  at::Tensor ent, gent;
  if (with_ent) {
    TORCH_CHECK(entropy.has_value(), "logprobs_backward: grad_entropy given without entropy");
    ent = f32_vector(*entropy, n, "logprobs_backward: entropy");
    gent = f32_vector(*grad_entropy, n, "logprobs_backward: grad_entropy");
  }
  at::Tensor out;
  if (inplace) {
    out = logits;
  } else if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == logits.scalar_type() && out.dim() == 2 &&
                    out.size(0) == n && out.size(1) == v && (v <= 1 || out.stride(1) == 1),
                "logprobs_backward: out must be a CPU tensor of logits' dtype and shape [", n, ", ", v,
                "] with a contiguous last dim");
  } else {
    out = at::empty({n, v}, logits.options());
  }
  if (n == 0 || v == 0) return out;
  const Transform tf(temperature, softcap, logit_scale);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* ls = lse.data_ptr<float>();
  const float* gl = glp.data_ptr<float>();
  const float* en = with_ent ? ent.data_ptr<float>() : nullptr;
  const float* ge = with_ent ? gent.data_ptr<float>() : nullptr;
  const int64_t in_stride = logits.stride(0), out_stride = out.stride(0);
  dispatch_logits_dtype(logits.scalar_type(), "logprobs_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(logits.data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, n, row_grain(v), [&](int64_t r0, int64_t r1) {
      const auto rows = [&](auto ent_tag, auto cap_tag) {
        backward_rows<T, decltype(ent_tag)::value, decltype(cap_tag)::value>(
            base, in_stride, dst, out_stride, v, lab, ls, en, gl, ge, tf, r0, r1);
      };
      if (with_ent) {
        if (tf.capped) rows(std::true_type{}, std::true_type{}); else rows(std::true_type{}, std::false_type{});
      } else {
        if (tf.capped) rows(std::false_type{}, std::true_type{}); else rows(std::false_type{}, std::false_type{});
      }
    });
  });
  return out;
}

}  // namespace rlfuse
