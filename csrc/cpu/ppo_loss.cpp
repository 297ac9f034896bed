// PPO loss forward + backward in one pass over the tokens.
//
// One OpenMP region: each thread counts the mask over its own blocks, the threads meet once
// (token mean needs the global count before any gradient is written, already scaled by
// 1 / count), then each thread runs its blocks computing, per token, every loss term, its
// masked contribution to the seven stats, and the gradients wrt logp, entropy and values.
// The mask is read as stored: float32, or bool / uint8 bytes (a quarter of the traffic).
//
// Memory traffic is the cost at large sizes (the pass is ~180 AVX-512 instructions per 16
// tokens, ~1.25 ns/token on one core with the data in cache):
//   * the gradients of large calls are stored non-temporally (no read-for-ownership of lines
//     that are only written);
//   * the gradient buffers come from a small pool of recently freed ones (GradPool below):
//     a fresh multi-MiB buffer costs a page fault plus the kernel zeroing the page per
//     4 KiB, measured at 2-3x the cost of the whole pass at 1M tokens.
//
// Determinism: tokens are cut into fixed blocks of kBlock; each block reduces into kLanes
// float lanes (fixed order), the lanes into one partial per block, and the partials are
// added in block order in double. The mask count is an exact integer. None of that depends on
// how blocks map to threads.
//
// Conventions (identical to backends/torch_backend.py):
//   policy: take the unclipped branch when unclipped >= clipped (its gradient -A r flows),
//           else the clipped constant (no gradient); clipfrac counts clipped > unclipped.
//   dual clip: where A < 0 and pg > -A c, pg = -A c with no gradient.
//   log-ratio clamp: logp - old_logp clamped to [-lr_max, lr_max] before the exp, the ratio's
//           gradient 0 where clamped; approx_kl reads the clamped log-ratio.
//   value:  unclipped branch when (v-R)^2 >= (v_clip-R)^2, else the clipped one whose
//           gradient flows only while |v - old_v| < value_clip.
//   KL:     k1+/k3+ run the k1/k3 value code with the gradient of k2 (d), a template flag.
//   weight: token i weighs w[i] * w_scale in the loss and its gradients: the mask and 1/count
//           (token mean), or the op's per-token loss weight and 1 (other loss aggregations).
//           The stats other than the loss are always token means.
//   mask:   0/1 (the op validates it); a token is valid where mask != 0, and values at
//           masked tokens (even inf/NaN) are selected away, never multiplied in.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <deque>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common/ppo_options.h"
#include "common.h"
#include "ops.h"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace rlfuse {
namespace {

constexpr int64_t kBlock = 4096;
// Blocks per thread: a thread must be worth a fork/join even on a busy host, where waking a
// second OpenMP thread can cost milliseconds; the pass runs at ~1 ns/token on one core.
constexpr int64_t kBlocksPerThread = 128;
constexpr int kStats = 7;  // loss, policy_loss, value_loss, kl, entropy, clipfrac, approx_kl
// From this many tokens the gradients (12 B/token) no longer stay in cache for the backward,
// so they are streamed to memory (non-temporal stores) instead of read-for-ownership first.
constexpr int64_t kStreamTokens = int64_t(1) << 19;

// ---------------------------------------------------------------------------------------
// GradPool: a CPU allocator that keeps a few recently freed large buffers for reuse.
//
// Only buffers of at least kPoolMinBytes go through it (smaller ones come from malloc's heap,
// which reuses them without faults). A request takes the smallest cached buffer that holds it
// and is at most 1.5x its size, else allocates. A freed buffer is cached, and the oldest
// cached ones freed while more than kPoolMaxBuffers / kPoolMaxBytes are held. The cache is
// what this op alone retains between calls (two calls' worth of gradients at 1M tokens).
constexpr size_t kPoolMinBytes = size_t(1) << 20;
constexpr size_t kPoolMaxBuffers = 8;
constexpr size_t kPoolMaxBytes = size_t(192) << 20;

class GradPool final : public c10::Allocator {
 public:
  static GradPool& instance() {
    static GradPool* pool = new GradPool();  // never destroyed: tensors may outlive statics
    return *pool;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kPoolMinBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    Block* blk = take(nbytes);
    if (blk == nullptr) {
      blk = new Block{c10::alloc_cpu(nbytes), nbytes};
    }
    return {blk->ptr, blk, &GradPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t capacity;
  };

  Block* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = cached_.end();
    for (auto it = cached_.begin(); it != cached_.end(); ++it) {
      const size_t cap = (*it)->capacity;
      if (cap >= nbytes && cap - nbytes <= nbytes / 2 && (best == cached_.end() || cap < (*best)->capacity)) {
        best = it;
      }
    }
    if (best == cached_.end()) return nullptr;
    Block* blk = *best;
    cached_.erase(best);
    cached_bytes_ -= blk->capacity;
    return blk;
  }

  static void release(void* ctx) {
    Block* blk = static_cast<Block*>(ctx);
    std::vector<Block*> evicted;
    {
      GradPool& pool = instance();
      std::lock_guard<std::mutex> lock(pool.mu_);
      pool.cached_.push_back(blk);
      pool.cached_bytes_ += blk->capacity;
      while (pool.cached_.size() > kPoolMaxBuffers || pool.cached_bytes_ > kPoolMaxBytes) {
        evicted.push_back(pool.cached_.front());
        pool.cached_bytes_ -= pool.cached_.front()->capacity;
        pool.cached_.pop_front();
      }
    }
    for (Block* b : evicted) {
      c10::free_cpu(b->ptr);
      delete b;
    }
  }

  std::mutex mu_;
  std::deque<Block*> cached_;  // oldest first
  size_t cached_bytes_ = 0;
};

at::Tensor grad_buffer(int64_t n) {
  return at::detail::empty_generic({n}, &GradPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   at::kFloat, std::nullopt);
}

// ---------------------------------------------------------------------------------------

struct PpoArgs {
  const float* logp;
  const float* old_logp;
  const float* adv;
  const float* mask_f;     // the mask as float32, or null when it is given as bytes
  const uint8_t* mask_b;   // the mask as bool / uint8 bytes (nonzero = valid)
  const float* ref;
  const float* ent;
  const float* val;
  const float* old_val;
  const float* ret;
  const float* w;          // explicit loss weight per token, or null: the mask is the weight
  float* g_logp;
  float* g_ent;
  float* g_val;
  float lo, hi;            // ratio clip range
  float dual;              // dual-clip constant
  float kl_coef, ent_coef, vclip, v_coef;
  float kl_max;            // KL estimates clamped to [-kl_max, kl_max]; +inf: no clamp
  float lr_max;            // log-ratios clamped to [-lr_max, lr_max] before the exp; +inf: no clamp
  float w_scale;           // 1 / max(count, 1) with the mask as weight, 1 with explicit weights
  bool stream;             // store the gradients non-temporally
};

// 16 gradients to dst: streamed past the caches (dst 64-byte aligned) or stored normally.
RLFUSE_INLINE void put_lanes(float* __restrict dst, const float* __restrict v, bool stream) {
  static_assert(kLanes == 16, "put_lanes writes 16 floats");
#if defined(__AVX512F__)
  if (stream) {
    _mm512_stream_ps(dst, _mm512_loadu_ps(v));
    return;
  }
#elif defined(__AVX__)
  if (stream) {
    _mm256_stream_ps(dst, _mm256_loadu_ps(v));
    _mm256_stream_ps(dst + 8, _mm256_loadu_ps(v + 8));
    return;
  }
#endif
  for (int j = 0; j < kLanes; ++j) dst[j] = v[j];
}

RLFUSE_INLINE void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();  // streamed stores are weakly ordered: publish them before the threads join
#endif
}

// Per-block accumulators: kLanes float lanes per stat (the lane of token i is i % kLanes).
struct Acc {
  float s[kStats][kLanes];
};

// One token: computes its gradients into gl/ge/gv[j], adds its masked terms to lane j.
// KL: 0 none, 1/2/3 = value of k1/k2/k3 (RLFUSE_KL_*); KST: the gradient is k2's (k1+/k3+).
// VAL: 0 none, 1 plain, 2 clipped against old values. Every switch is a template parameter: a
// runtime branch in this loop body stops gcc vectorising it (measured 20x slower).
template <int KL, bool KST, bool ENT, int VAL, bool DUAL>
RLFUSE_INLINE void token(const PpoArgs& c, const float* __restrict logp, const float* __restrict old_logp,
                         const float* __restrict adv, const float* __restrict mask,
                         const float* __restrict ref, const float* __restrict ent,
                         const float* __restrict val, const float* __restrict old_val,
                         const float* __restrict ret, const float* __restrict w, int64_t i, int j,
                         float* __restrict gl, float* __restrict ge, float* __restrict gv, Acc& a) {
  const bool on = mask[i] != 0.0f;
  const float wi = w[i];
  const float ms = wi * c.w_scale;
  const float lp = logp[i];
  // log_ratio_clamp as single selects like kl_clamp below (gradient 0 where clamped; NaN stays NaN)
  float log_ratio = lp - old_logp[i];
  const bool lr_above = log_ratio > c.lr_max, lr_below = log_ratio < -c.lr_max;
  log_ratio = lr_above ? c.lr_max : log_ratio;
  log_ratio = lr_below ? -c.lr_max : log_ratio;
  const float ratio = fast_exp(log_ratio);
  const float A = adv[i];
  const float unclipped = -A * ratio;
  float rc = ratio < c.lo ? c.lo : ratio;
  rc = rc > c.hi ? c.hi : rc;
  const float clipped = -A * rc;
  const bool take = unclipped >= clipped;
  float pg = take ? unclipped : clipped;
  float g = take ? unclipped : 0.0f;
  g = lr_above ? 0.0f : g;
  g = lr_below ? 0.0f : g;
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
    // kl_clamp as single selects, not a branch nor a combined or nested condition (either stops
    // gcc vectorising the loop: tests/test_ops_ppo_loss_vectorised.py); NaN stays NaN
    const bool above = kl > c.kl_max, below = kl < -c.kl_max;
    dk = above ? 0.0f : dk;
    dk = below ? 0.0f : dk;
    kl = above ? c.kl_max : kl;
    kl = below ? -c.kl_max : kl;
    total = total + c.kl_coef * kl;
    g = g + c.kl_coef * dk;
  }
  float entropy = 0.0f;
  if (ENT) {
    entropy = ent[i];
    total = total - c.ent_coef * entropy;
    ge[j] = -c.ent_coef * ms;
  }
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
    gv[j] = on ? c.v_coef * dv * ms : 0.0f;
  }
  gl[j] = on ? g * ms : 0.0f;
  // the mask is 0/1, so a valid token's stats weigh 1 (the loss: its weight). Selected first,
  // then added unconditionally: a conditional add is control flow that stops the vectoriser.
  const float t_total = on ? total * wi : 0.0f;
  const float t_pg = on ? pg : 0.0f;
  const float t_vf = on ? vf : 0.0f;
  const float t_kl = on ? kl : 0.0f;
  const float t_ent = on ? entropy : 0.0f;
  const float t_clip = on ? (clipped > unclipped ? 1.0f : 0.0f) : 0.0f;
  const float t_akl = on ? ratio - 1.0f - log_ratio : 0.0f;
  a.s[0][j] += t_total;
  a.s[1][j] += t_pg;
  a.s[2][j] += t_vf;
  a.s[3][j] += t_kl;
  a.s[4][j] += t_ent;
  a.s[5][j] += t_clip;
  a.s[6][j] += t_akl;
}

// Tokens [i0, i1) (at most kBlock): gradients written, the block's stat partials returned.
// mask/w: this block's mask as float and its explicit weights (or the mask again).
template <int KL, bool KST, bool ENT, int VAL, bool DUAL>
void ppo_block(const PpoArgs& c, int64_t i0, int64_t i1, const float* mask, const float* w,
               double* partial) {
  const float* __restrict logp = c.logp + i0;
  const float* __restrict old_logp = c.old_logp + i0;
  const float* __restrict adv = c.adv + i0;
  const float* __restrict ref = KL ? c.ref + i0 : nullptr;
  const float* __restrict ent = ENT ? c.ent + i0 : nullptr;
  const float* __restrict val = VAL ? c.val + i0 : nullptr;
  const float* __restrict ret = VAL ? c.ret + i0 : nullptr;
  const float* __restrict old_val = VAL == 2 ? c.old_val + i0 : nullptr;
  float* __restrict g_logp = c.g_logp + i0;
  float* __restrict g_ent = ENT ? c.g_ent + i0 : nullptr;
  float* __restrict g_val = VAL ? c.g_val + i0 : nullptr;
  const PpoArgs k = c;  // constants in a local copy the loop can keep in registers
  Acc a{};
  alignas(64) float gl[kLanes], ge[kLanes], gv[kLanes];
  const int64_t n = i1 - i0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // outputs never alias inputs and each lane owns its accumulators: no dependences
#pragma GCC ivdep
    for (int j = 0; j < kLanes; ++j) {
      token<KL, KST, ENT, VAL, DUAL>(k, logp, old_logp, adv, mask, ref, ent, val, old_val, ret, w,
                                     i + j, j, gl, ge, gv, a);
    }
    put_lanes(g_logp + i, gl, k.stream);
    if (ENT) put_lanes(g_ent + i, ge, k.stream);
    if (VAL) put_lanes(g_val + i, gv, k.stream);
  }
  for (int j = 0; i < n; ++i, ++j) {
    token<KL, KST, ENT, VAL, DUAL>(k, logp, old_logp, adv, mask, ref, ent, val, old_val, ret, w,
                                   i, j, gl, ge, gv, a);
    g_logp[i] = gl[j];
    if (ENT) g_ent[i] = ge[j];
    if (VAL) g_val[i] = gv[j];
  }
  for (int s = 0; s < kStats; ++s) partial[s] = lane_sum(a.s[s]);
}

using BlockFn = void (*)(const PpoArgs&, int64_t, int64_t, const float*, const float*, double*);

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

BlockFn pick_block(int kl, bool kst, bool ent, int vmode, bool dual) {
  BlockFn fn = nullptr;
  with_kl(kl, [&](auto KL) {
    with_bool(kl != 0 && kst, [&](auto KST) {
      with_bool(ent, [&](auto ENT) {
        with_val(vmode, [&](auto VAL) {
          with_bool(dual, [&](auto DUAL) {
            fn = &ppo_block<decltype(KL)::value, decltype(KST)::value, decltype(ENT)::value,
                            decltype(VAL)::value, decltype(DUAL)::value>;
          });
        });
      });
    });
  });
  return fn;
}

// Valid tokens of [i0, i1) (mask != 0), exactly.
int64_t count_valid(const PpoArgs& c, int64_t i0, int64_t i1) {
  int32_t lanes[kLanes] = {};
  int64_t total = 0;
  for (int64_t b0 = i0; b0 < i1; b0 += kBlock) {  // int32 lanes cannot overflow within a block
    const int64_t b1 = std::min(i1, b0 + kBlock);
    int64_t i = b0;
    if (c.mask_f) {
      const float* __restrict m = c.mask_f;
      for (; i + kLanes <= b1; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) lanes[j] += m[i + j] != 0.0f;
      }
      for (; i < b1; ++i) total += m[i] != 0.0f;
    } else {
      const uint8_t* __restrict m = c.mask_b;
      for (; i + kLanes <= b1; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) lanes[j] += m[i + j] != 0;
      }
      for (; i < b1; ++i) total += m[i] != 0;
    }
    for (int j = 0; j < kLanes; ++j) {
      total += lanes[j];
      lanes[j] = 0;
    }
  }
  return total;
}

at::Tensor vec_f32(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "ppo_loss_forward: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.numel() == n, "ppo_loss_forward: ", name, " has ", t.numel(), " elements, expected ", n);
  return t.reshape({n}).to(at::kFloat).contiguous();
}

// The mask as stored when it is float32, bool or uint8 (read in place), else as float32.
at::Tensor mask_vec(const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), "ppo_loss_forward: mask must be a CPU tensor");
  TORCH_CHECK(t.numel() == n, "ppo_loss_forward: mask has ", t.numel(), " elements, expected ", n);
  const auto dt = t.scalar_type();
  if (dt == at::kBool || dt == at::kByte || dt == at::kFloat) return t.reshape({n}).contiguous();
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
  const at::Tensor mask = mask_vec(mask_in, n);
  TORCH_CHECK(o.kl_estimator >= RLFUSE_KL_K1 && o.kl_estimator <= RLFUSE_KL_K3_PLUS,
              "ppo_loss_forward: unknown kl_estimator code ", o.kl_estimator);
  TORCH_CHECK(weight_in.has_value() == (o.loss_agg != RLFUSE_AGG_TOKEN_MEAN),
              "ppo_loss_forward: a loss weight is needed exactly when loss_agg is not token-mean");
  const bool has_ref = ref_in.has_value(), has_ent = ent_in.has_value(), has_val = val_in.has_value();
  const bool clip_val = has_val && o.has_value_clip && old_val_in.has_value();
  TORCH_CHECK(!has_val || ret_in.has_value(), "ppo_loss_forward: values given without returns");
  at::Tensor weight, ref, ent, val, old_val, ret;
  if (weight_in.has_value()) weight = vec_f32(*weight_in, n, "loss_weight");
  if (has_ref) ref = vec_f32(*ref_in, n, "ref_logp");
  if (has_ent) ent = vec_f32(*ent_in, n, "entropy");
  if (has_val) {
    val = vec_f32(*val_in, n, "values");
    ret = vec_f32(*ret_in, n, "returns");
  }
  if (clip_val) old_val = vec_f32(*old_val_in, n, "old_values");

  at::Tensor g_logp = grad_buffer(n);
  at::Tensor g_ent = has_ent ? grad_buffer(n) : at::empty({0}, logp.options());
  at::Tensor g_val = has_val ? grad_buffer(n) : at::empty({0}, logp.options());

  PpoArgs a{};
  a.logp = logp.data_ptr<float>();
  a.old_logp = old_logp.data_ptr<float>();
  a.adv = adv.data_ptr<float>();
  const bool mask_bytes = mask.scalar_type() != at::kFloat;
  a.mask_f = mask_bytes ? nullptr : mask.data_ptr<float>();
  a.mask_b = mask_bytes ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
  a.ref = has_ref ? ref.data_ptr<float>() : nullptr;
  a.ent = has_ent ? ent.data_ptr<float>() : nullptr;
  a.val = has_val ? val.data_ptr<float>() : nullptr;
  a.ret = has_val ? ret.data_ptr<float>() : nullptr;
  a.old_val = clip_val ? old_val.data_ptr<float>() : nullptr;
  a.w = weight_in.has_value() ? weight.data_ptr<float>() : nullptr;
  a.g_logp = g_logp.data_ptr<float>();
  a.g_ent = has_ent ? g_ent.data_ptr<float>() : nullptr;
  a.g_val = has_val ? g_val.data_ptr<float>() : nullptr;
  a.lo = 1.0f - o.clip_eps;
  a.hi = 1.0f + rlfuse_ppo_clip_high(&o);
  a.dual = o.has_dual_clip ? o.dual_clip : 0.0f;
  a.kl_coef = o.kl_coef;
  a.kl_max = o.has_kl_clamp ? o.kl_clamp : std::numeric_limits<float>::infinity();
  a.lr_max = o.has_log_ratio_clamp ? o.log_ratio_clamp : std::numeric_limits<float>::infinity();
  a.ent_coef = o.entropy_coef;
  a.vclip = clip_val ? o.value_clip : 0.0f;
  a.v_coef = o.value_coef;
  a.w_scale = 1.0f;  // token mean: set to 1 / count once the threads have counted
  auto aligned = [](const float* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 64 == 0; };
  a.stream = n >= kStreamTokens && aligned(a.g_logp) && aligned(a.g_ent) && aligned(a.g_val);

  const int kl = has_ref ? rlfuse_kl_value_code(o.kl_estimator) : 0;
  const BlockFn block = pick_block(kl, rlfuse_kl_straight_through(o.kl_estimator) != 0, has_ent,
                                   has_val ? (clip_val ? 2 : 1) : 0, o.has_dual_clip != 0);

  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  const bool token_mean = !weight_in.has_value();
  int threads = 1;
  if (!at::in_parallel_region()) {
    threads = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(at::get_num_threads(), (n_blocks + kBlocksPerThread - 1) / kBlocksPerThread)));
  }
  std::vector<double> partials(n_blocks * kStats);
  std::vector<int64_t> counts(threads, 0);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t b0 = n_blocks * tid / nth, b1 = n_blocks * (tid + 1) / nth;
    const int64_t t0 = b0 * kBlock, t1 = std::min(n, b1 * kBlock);
    counts[tid] = count_valid(a, t0, t1);
    PpoArgs c = a;
    if (token_mean) {
      // every gradient is scaled by 1 / count: wait for all the threads' counts (exact integers)
#pragma omp barrier
      int64_t count = 0;
      for (int t = 0; t < nth; ++t) count += counts[t];
      c.w_scale = 1.0f / std::max(static_cast<float>(count), 1.0f);
    }
    alignas(64) float mbuf[kBlock];  // a byte mask block widened to float
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
      const float* m = c.mask_f ? c.mask_f + i0 : mbuf;
      if (!c.mask_f) {
        const uint8_t* __restrict mb = c.mask_b + i0;
        for (int64_t i = 0; i < i1 - i0; ++i) mbuf[i] = mb[i] != 0 ? 1.0f : 0.0f;
      }
      block(c, i0, i1, m, c.w ? c.w + i0 : m, partials.data() + b * kStats);
    }
    if (c.stream) stream_fence();
  }

  int64_t count = 0;
  for (int64_t cnt : counts) count += cnt;
  const float inv = 1.0f / std::max(static_cast<float>(count), 1.0f);
  double sums[kStats] = {0};
  for (int64_t b = 0; b < n_blocks; ++b) {
    for (int k = 0; k < kStats; ++k) sums[k] += partials[b * kStats + k];
  }
  at::Tensor stats = at::empty({kStats}, logp.options());
  float* st = stats.data_ptr<float>();
  for (int k = 0; k < kStats; ++k) st[k] = static_cast<float>(sums[k]) * inv;
  st[0] = static_cast<float>(sums[0]) * (token_mean ? inv : 1.0f);  // token mean or weighted sum
  at::Tensor loss = at::empty({}, logp.options());
  loss.fill_(st[0]);
  return {loss, stats, g_logp, g_ent, g_val};
}

}  // namespace rlfuse
