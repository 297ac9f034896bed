// Exact inverse-CDF sampling from softmax(z / T), one row per draw (the rollout sampler's pick).
//
// Per row, with x_i = z_i / T (float, skipped when T == 1) and m = max x:
//   pass 1  m
//   pass 2  w_i = exp(x_i - m) (float, kept in a row buffer), total = sum w_i in double lanes
//   pass 3  the first i whose running double sum of w passes u * total; blocks of kLanes
//           whose sum keeps the running sum <= u * total are skipped whole
// and the token's log-prob is (x_i - m) - log(total), computed in double, returned as float.
//
// The same draw as the torch path (cumsum of exp(log_softmax(x)) in float64, searchsorted
// right=True) up to float rounding at exact CDF boundaries, without its [B, V] float64 tensors.
// A zero-weight token never passes the running sum, so it can never be chosen; if rounding
// leaves u * total above the final running sum, the last token of non-zero weight is taken.
// Rows are independent (one thread each), so results do not depend on the thread count.
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace rlfuse {

std::tuple<at::Tensor, at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& uniforms,
                                               double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu(),
              "sample_rows: logits must be a float32 CPU tensor [B, V], got ", logits.scalar_type(), " ",
              logits.sizes());
  TORCH_CHECK(uniforms.dim() == 1 && uniforms.size(0) == logits.size(0) &&
                  uniforms.scalar_type() == at::kDouble && uniforms.device().is_cpu(),
              "sample_rows: uniforms must be float64 CPU [B] with B = ", logits.size(0));
  TORCH_CHECK(temperature > 0.0, "sample_rows: temperature must be > 0, got ", temperature);
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v > 0, "sample_rows: empty vocabulary");
  const at::Tensor z = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor u = uniforms.contiguous();
  at::Tensor tokens = at::empty({n}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({n}, logits.options());
  const float* zp = z.data_ptr<float>();
  const int64_t zstride = z.stride(0);
  const double* up = u.data_ptr<double>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logp.data_ptr<float>();
  const bool scaled = temperature != 1.0;
  const float t = static_cast<float>(temperature);
  std::atomic<int64_t> bad_row{-1};

  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> w(v);  // x, then the weights exp(x - m)
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = zp + r * zstride;
      float* x = w.data();
      const float* xs = row;  // x = z / T, read in place when T == 1
      if (scaled) {
        for (int64_t i = 0; i < v; ++i) x[i] = row[i] / t;
        xs = x;
      }
      const float m_row = max_skip_nan(xs, v);

      double acc[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= v; i += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const float e = fast_exp_nonpos(xs[i + j] - m_row);
          x[i + j] = e;
          acc[j] += static_cast<double>(e);
        }
      double total = 0.0;
      for (int j = 0; j < kLanes; ++j) total += acc[j];
      for (; i < v; ++i) {
        const float e = fast_exp_nonpos(xs[i] - m_row);
        x[i] = e;
        total += static_cast<double>(e);
      }
      // NaN anywhere, +inf, or every logit -inf: there is no distribution to sample
      if (!(total > 0.0 && std::isfinite(total) && std::isfinite(m_row))) {
        int64_t expected = -1;
        bad_row.compare_exchange_strong(expected, r);
        tp[r] = 0;
        lp[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }

      const double target = up[r] * total;
      double run = 0.0;
      int64_t tok = -1;
      i = 0;
      for (; i + kLanes <= v && tok < 0; i += kLanes) {
        double bs = 0.0;
        for (int j = 0; j < kLanes; ++j) bs += static_cast<double>(x[i + j]);
        if (run + bs <= target) {  // the CDF does not pass the target inside this block
          run += bs;
          continue;
        }
        for (int j = 0; j < kLanes; ++j) {
          run += static_cast<double>(x[i + j]);
          if (run > target) {
            tok = i + j;
            break;
          }
        }
      }
      for (; i < v && tok < 0; ++i) {
        run += static_cast<double>(x[i]);
        if (run > target) tok = i;
      }
      if (tok < 0) {  // rounding: u * total above the final running sum; the last token of weight > 0
        tok = v - 1;
        while (tok > 0 && !(x[tok] > 0.0f)) --tok;  // total > 0: some weight is positive
      }
      tp[r] = tok;
      const float xt = scaled ? row[tok] / t : row[tok];
      lp[r] = static_cast<float>((static_cast<double>(xt) - static_cast<double>(m_row)) - std::log(total));
    }
  });
  const int64_t bad = bad_row.load();
  TORCH_CHECK(bad < 0, "sample_rows: row ", bad, " has non-finite logits (NaN, +inf, or all -inf): nothing to sample");
  return {tokens, logp};
}

}  // namespace rlfuse
