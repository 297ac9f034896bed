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
//     grad_z = g_lp (onehot - p) - g_H p (log p + H),   grad_logits = grad_z / T,
// written to a fresh tensor or over the logits themselves (in place).
//
// Rows are independent and each is done by one thread with a fixed lane layout, so the
// results do not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"
#include "ops.h"

namespace rlfuse {
namespace {

constexpr int64_t kBlock = 2048;  // floats per block: 8 KB, stays in L1

// Rows per parallel task: >= 256K logits (~0.1 ms), so a fork/join is always amortised.
inline int64_t row_grain(int64_t v) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(v, 1)); }

inline float block_max(const float* z, int64_t n) {
  float mx[kLanes];
  for (int j = 0; j < kLanes; ++j) mx[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) mx[j] = z[i + j] > mx[j] ? z[i + j] : mx[j];
  }
  for (int j = 0; i < n; ++i, ++j) mx[j] = z[i] > mx[j] ? z[i] : mx[j];
  float m = mx[0];
  for (int j = 1; j < kLanes; ++j) m = mx[j] > m ? mx[j] : m;
  return m;
}

// sum e^(z - m) and, when WithEnt, sum e^(z - m) (z - m), over one block.
template <bool WithEnt>
inline void block_exp_sums(const float* z, int64_t n, float m, float& s_out, float& t_out) {
  float s[kLanes] = {0};
  float t[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float d = z[i + j] - m;
      const float e = fast_exp(d);
      s[j] += e;
      if (WithEnt) t[j] += e * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float d = z[i] - m;
    const float e = fast_exp(d);
    s[j] += e;
    if (WithEnt) t[j] += e * d;
  }
  s_out = lane_sum(s);
  t_out = WithEnt ? lane_sum(t) : 0.0f;
}

template <typename T, bool WithEnt>
void forward_rows(const T* base, int64_t row_stride, int64_t v, const int64_t* labels, float inv_t,
                  bool scaled, float* logp, float* lse, float* ent, int64_t r0, int64_t r1) {
  alignas(64) float buf[kBlock];
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = base + r * row_stride;
    float m = neg_inf, s = 0.0f, t = 0.0f;
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int64_t n = std::min(kBlock, v - j0);
      const float* z = load_block(x + j0, n, inv_t, scaled, buf);
      const float bm = block_max(z, n);
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
      block_exp_sums<WithEnt>(z, n, m, bs, bt);
      s += bs;
      if (WithEnt) t += bt;
    }
    float zy_buf;
    const float zy = *load_block(x + labels[r], 1, inv_t, scaled, &zy_buf);
    const float log_s = std::log(s);
    const float l = m + log_s;
    lse[r] = l;
    logp[r] = zy - l;
    if (WithEnt) ent[r] = log_s - t / s;
  }
}

template <typename T, bool WithEnt>
void backward_rows(const T* base, int64_t row_stride, T* out, int64_t out_stride, int64_t v,
                   const int64_t* labels, const float* lse, const float* ent, const float* g_lp,
                   const float* g_ent, float inv_t, bool scaled, int64_t r0, int64_t r1) {
  alignas(64) float buf[kBlock];
  alignas(64) float obuf[kBlock];
  constexpr bool kFloatOut = std::is_same<T, float>::value;
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
      const float* z = load_block(x + j0, n, inv_t, scaled, buf);
      float* o = kFloatOut ? reinterpret_cast<float*>(o_row + j0) : obuf;
#pragma GCC ivdep
      for (int64_t i = 0; i < n; ++i) {
        const float q = z[i] - l;
        const float p = fast_exp(q);
        o[i] = WithEnt ? p * (c0 - ge * q) * inv_t : p * c0 * inv_t;
      }
      if (y >= j0 && y < j0 + n) o[y - j0] += gl * inv_t;
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
                                                                bool with_entropy) {
  TORCH_CHECK(temperature > 0.0, "logprobs_forward: temperature must be > 0");
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  check_rows(logits, labels, "logprobs_forward");
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v > 0 || n == 0, "logprobs_forward: empty vocabulary");
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), lse = at::empty({n}, f32);
  at::Tensor ent = at::empty({with_entropy ? n : 0}, f32);
  if (n == 0) return {logp, lse, ent};
  const float inv_t = static_cast<float>(1.0 / temperature);
  const bool scaled = temperature != 1.0;
  const int64_t stride = logits.stride(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *ls = lse.data_ptr<float>();
  float* en = with_entropy ? ent.data_ptr<float>() : nullptr;
  dispatch_logits_dtype(logits.scalar_type(), "logprobs_forward", [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(logits.data_ptr());
    at::parallel_for(0, n, row_grain(v), [&](int64_t r0, int64_t r1) {
      if (with_entropy) {
        forward_rows<T, true>(base, stride, v, lab, inv_t, scaled, lp, ls, en, r0, r1);
      } else {
        forward_rows<T, false>(base, stride, v, lab, inv_t, scaled, lp, ls, en, r0, r1);
      }
    });
  });
  return {logp, lse, ent};
}

at::Tensor logprobs_backward(const at::Tensor& logits, const at::Tensor& labels_in,
                             const at::Tensor& lse_in, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, double temperature,
                             bool inplace) {
  TORCH_CHECK(temperature > 0.0, "logprobs_backward: temperature must be > 0");
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
  at::Tensor out = inplace ? logits : at::empty({n, v}, logits.options());
  if (n == 0 || v == 0) return out;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const bool scaled = temperature != 1.0;
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
      if (with_ent) {
        backward_rows<T, true>(base, in_stride, dst, out_stride, v, lab, ls, en, gl, ge, inv_t,
                               scaled, r0, r1);
      } else {
        backward_rows<T, false>(base, in_stride, dst, out_stride, v, lab, ls, en, gl, ge, inv_t,
                                scaled, r0, r1);
      }
    });
  });
  return out;
}

}  // namespace rlfuse
