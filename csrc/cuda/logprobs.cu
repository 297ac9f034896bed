// Log-probabilities of labels under softmax(z), with optional entropy, where z is the logit
// transformed by rlfuse_logit_transform (scale, optional tanh soft-cap, 1/T; rlfuse_cuda.h).
//
// Forward: one block per row, one pass over the vocabulary with an online log-sum-exp. Each
// thread keeps (m, s, t): the running max m of z = x / T, s = Σ e^(z-m) and t = Σ e^(z-m)(z-m);
// then lse = m + log s and H = lse - Σ p z = log s - t / s (t is kept relative to m so that H
// does not come out of a cancellation between two large numbers). The math stays in natural
// units although base 2 would save a multiply per element: the backward recomputes z = x · (1/T)
// the same way, so z - lse is exact wherever the forward's lse is (p = 1 for V = 1), which an
// lse converted to base 2 and back would not give. The row is read with 16-byte loads from its
// first 16-byte-aligned element on (a scalar head and tail cover the rest), so every row of a
// [N, V] tensor is vectorised whatever V, dtype or row stride.
//
// Backward: a 2-D grid (row, column chunk) recomputes p from the saved lse and writes
//   grad_x = (g_lp (δ_{j,y} - p) - g_H p (log p + H)) / T
// in the logits dtype, optionally over the logits buffer itself. Rows whose two incoming
// gradients are zero (padding) are written as zeros without reading the logits.
#include "common.cuh"

namespace rlfuse {
namespace {

constexpr int kFwdMaxThreads = 512;
constexpr int kBwdThreads = 256;
constexpr int kBwdVecsPerThread = 4;  // vectors each backward thread handles per column chunk

// Online softmax statistics of a set of z values: m = max, s = Σ e^(z-m), t = Σ e^(z-m)(z-m).
struct Lse {
  float m, s, t;
};

RL_DEV Lse lse_empty() { return {-INFINITY, 0.0f, 0.0f}; }

// Re-express (s, t) relative to a new max mn >= m. Empty states stay empty.
RL_DEV void lse_rebase(Lse& a, float mn) {
  if (a.s > 0.0f) {
    const float f = __expf(a.m - mn);
    a.t = f * fmaf(a.s, a.m - mn, a.t);
    a.s = f * a.s;
  } else {
    a.s = 0.0f;
    a.t = 0.0f;
  }
  a.m = mn;
}

RL_DEV Lse lse_merge(Lse a, Lse b) {
  const float mn = fmaxf(a.m, b.m);
  if (mn == -INFINITY) return lse_empty();
  lse_rebase(a, mn);
  lse_rebase(b, mn);
  return {mn, a.s + b.s, a.t + b.t};
}

// Add K values to the state: one rescale at most, one exp per value.
template <bool ENT, int K>
RL_DEV void lse_add(Lse& st, const float (&z)[K]) {
  float cm = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cm = fmaxf(cm, z[k]);
  if (cm > st.m) lse_rebase(st, cm);
  if (st.m == -INFINITY) return;  // every value so far is -inf: nothing to add
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = z[k] - st.m;
    const float e = __expf(d);
    st.s += e;
    if (ENT) st.t += e > 0.0f ? e * d : 0.0f;  // e == 0 for d == -inf: 0 * -inf must not be NaN
  }
}

// z of a logit x, and dz/dx.
RL_DEV float to_z(float x, const rlfuse_logit_transform& tf) {
  const float u = x * tf.load_scale;
  return tf.cap_t > 0.0f ? tf.cap_t * tanhf(u) : u;
}

RL_DEV float to_z(float x, const rlfuse_logit_transform& tf, float& dz_dx) {
  const float u = x * tf.load_scale;
  if (tf.cap_t > 0.0f) {
    const float th = tanhf(u);
    dz_dx = tf.slope * (1.0f - th * th);
    return tf.cap_t * th;
  }
  dz_dx = tf.slope;
  return u;
}

RL_DEV Lse shfl_xor(const Lse& a, int off) {
  return {__shfl_xor_sync(kFullMask, a.m, off), __shfl_xor_sync(kFullMask, a.s, off),
          __shfl_xor_sync(kFullMask, a.t, off)};
}

template <int DT, bool ENT>
__global__ void __launch_bounds__(kFwdMaxThreads)
    logprobs_fwd_kernel(const typename Elem<DT>::T* __restrict__ logits, int vocab, int64_t row_stride,
                        const int64_t* __restrict__ labels, rlfuse_logit_transform tf, float* __restrict__ logp,
                        float* __restrict__ lse_out, float* __restrict__ entropy) {
  using E = Elem<DT>;
  using T = typename E::T;
  constexpr int VEC = Vec16<T>::kN;
  __shared__ Lse warp_states[32];

  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;

  const int head = aligned_head(x, vocab);
  const int nvec = (vocab - head) / VEC;
  const int tail = head + nvec * VEC;

  Lse st = lse_empty();
  // scalar head [0, head) and tail [tail, vocab): fewer than VEC elements each
  for (int j = tid; j < head; j += nthreads) {
    const float z[1] = {to_z(E::load(x[j]), tf)};
    lse_add<ENT>(st, z);
  }
  for (int j = tail + tid; j < vocab; j += nthreads) {
    const float z[1] = {to_z(E::load(x[j]), tf)};
    lse_add<ENT>(st, z);
  }

  // body: 16-byte loads, two in flight per thread per step
  const T* xv = x + head;
  int i = tid;
  for (; i + nthreads < nvec; i += 2 * nthreads) {
    Vec16<T> a, b;
    a.raw = load16(xv + static_cast<int64_t>(i) * VEC);
    b.raw = load16(xv + static_cast<int64_t>(i + nthreads) * VEC);
    float z[2 * VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      z[k] = to_z(E::load(a.e[k]), tf);
      z[VEC + k] = to_z(E::load(b.e[k]), tf);
    }
    lse_add<ENT>(st, z);
  }
  if (i < nvec) {
    Vec16<T> a;
    a.raw = load16(xv + static_cast<int64_t>(i) * VEC);
    float z[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = to_z(E::load(a.e[k]), tf);
    lse_add<ENT>(st, z);
  }

  // block reduction in a fixed order: butterfly within warps, then warp 0 over the warps
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = lse_merge(st, shfl_xor(st, off));
  if (lane_id() == 0) warp_states[warp_id()] = st;
  __syncthreads();
  if (warp_id() == 0) {
    st = lane_id() < (nthreads >> 5) ? warp_states[lane_id()] : lse_empty();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st = lse_merge(st, shfl_xor(st, off));
    if (tid == 0) {
      const float log_s = __logf(st.s);
      const float zy = to_z(E::load(x[labels[row]]), tf);
      lse_out[row] = st.m + log_s;
      logp[row] = (zy - st.m) - log_s;
      if (ENT) entropy[row] = log_s - st.t / st.s;
    }
  }
}

// Gradient of one element given its logit x.
template <bool ENT>
RL_DEV float grad_elem(float x, float lse, float g_lp, float g_h, float h, bool is_label,
                       const rlfuse_logit_transform& tf) {
  float dz_dx;
  const float lp = to_z(x, tf, dz_dx) - lse;
  const float p = __expf(lp);
  float g = -g_lp * p;
  if (ENT) g -= g_h * (p > 0.0f ? p * (lp + h) : 0.0f);
  if (is_label) g += g_lp;
  return g * dz_dx;
}

template <int DT, bool ENT>
__global__ void __launch_bounds__(kBwdThreads)
    logprobs_bwd_kernel(const typename Elem<DT>::T* logits, int vocab, int64_t row_stride,
                        const int64_t* __restrict__ labels, const float* __restrict__ lse,
                        const float* __restrict__ entropy, const float* __restrict__ grad_logp,
                        const float* __restrict__ grad_entropy, rlfuse_logit_transform tf, typename Elem<DT>::T* out,
                        int64_t out_row_stride) {
  // logits and out may alias (in-place): no __restrict__ on them; every element is read and
  // then written by the same thread.
  using E = Elem<DT>;
  using T = typename E::T;
  constexpr int VEC = Vec16<T>::kN;
  constexpr int kChunkVecs = kBwdThreads * kBwdVecsPerThread;

  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* o = out + row * out_row_stride;
  const int tid = threadIdx.x;

  const float g_lp = grad_logp[row];
  const float g_h = ENT ? grad_entropy[row] : 0.0f;
  const bool zero_row = g_lp == 0.0f && g_h == 0.0f;
  const float row_lse = lse[row];
  const float h = ENT ? entropy[row] : 0.0f;
  const int64_t y = labels[row];

  const int head = aligned_head(x, vocab);
  const int nvec = (vocab - head) / VEC;
  const int tail = head + nvec * VEC;
  // 16-byte stores only when the output row has the same alignment phase as the input row
  const bool vec_out = aligned_head(o, vocab) == head;

  auto scalar = [&](int j) {
    const float g = zero_row ? 0.0f : grad_elem<ENT>(E::load(x[j]), row_lse, g_lp, g_h, h, j == y, tf);
    o[j] = E::store(g);
  };
  if (blockIdx.y == 0) {
    for (int j = tid; j < head; j += kBwdThreads) scalar(j);
    for (int j = tail + tid; j < vocab; j += kBwdThreads) scalar(j);
  }

  for (int c0 = blockIdx.y * kChunkVecs; c0 < nvec; c0 += gridDim.y * kChunkVecs) {
    const int c1 = min(c0 + kChunkVecs, nvec);
    for (int i = c0 + tid; i < c1; i += kBwdThreads) {
      const int j0 = head + i * VEC;
      Vec16<T> v;
      if (zero_row) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v.e[k] = E::store(0.0f);
      } else {
        v.raw = load16(x + j0);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          v.e[k] = E::store(grad_elem<ENT>(E::load(v.e[k]), row_lse, g_lp, g_h, h, j0 + k == y, tf));
      }
      if (vec_out) {
        store16(o + j0, v.raw);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[j0 + k] = v.e[k];
      }
    }
  }
}

int fwd_threads(int64_t vocab, int vec) {
  // enough threads that each handles >= 4 vectors, a warp at least, kFwdMaxThreads at most
  const int64_t work = (vocab + vec - 1) / vec;
  int t = 32;
  while (t < kFwdMaxThreads && 4 * static_cast<int64_t>(t) < work) t *= 2;
  return t;
}

template <int DT>
cudaError_t forward_impl(const void* logits, int64_t n_rows, int64_t vocab, int64_t row_stride,
                         const int64_t* labels, rlfuse_logit_transform tf, float* logp, float* lse, float* entropy,
                         cudaStream_t stream) {
  using T = typename Elem<DT>::T;
  const T* x = static_cast<const T*>(logits);
  const int threads = fwd_threads(vocab, Vec16<T>::kN);
  const int v = static_cast<int>(vocab);
  if (entropy != nullptr) {
    auto kernel = &logprobs_fwd_kernel<DT, true>;
    RLFUSE_LAUNCH(kernel, static_cast<unsigned>(n_rows), threads, stream, x, v, row_stride, labels, tf,
                  logp, lse, entropy);
  } else {
    auto kernel = &logprobs_fwd_kernel<DT, false>;
    RLFUSE_LAUNCH(kernel, static_cast<unsigned>(n_rows), threads, stream, x, v, row_stride, labels, tf,
                  logp, lse, entropy);
  }
  return cudaGetLastError();
}

template <int DT>
cudaError_t backward_impl(const void* logits, int64_t n_rows, int64_t vocab, int64_t row_stride,
                          const int64_t* labels, const float* lse, const float* entropy, const float* grad_logp,
                          const float* grad_entropy, rlfuse_logit_transform tf, void* grad_logits, int64_t grad_row_stride,
                          cudaStream_t stream) {
  using T = typename Elem<DT>::T;
  const T* x = static_cast<const T*>(logits);
  T* o = static_cast<T*>(grad_logits);
  const int64_t nvec = vocab / Vec16<T>::kN + 1;
  int64_t chunks = (nvec + kBwdThreads * kBwdVecsPerThread - 1) / (kBwdThreads * kBwdVecsPerThread);
  if (chunks > 65535) chunks = 65535;  // the kernel loops over the remaining chunks
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(chunks));
  const int v = static_cast<int>(vocab);
  if (grad_entropy != nullptr) {
    auto kernel = &logprobs_bwd_kernel<DT, true>;
    RLFUSE_LAUNCH(kernel, grid, kBwdThreads, stream, x, v, row_stride, labels, lse, entropy, grad_logp,
                  grad_entropy, tf, o, grad_row_stride);
  } else {
    auto kernel = &logprobs_bwd_kernel<DT, false>;
    RLFUSE_LAUNCH(kernel, grid, kBwdThreads, stream, x, v, row_stride, labels, lse, entropy, grad_logp,
                  grad_entropy, tf, o, grad_row_stride);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace rlfuse

extern "C" cudaError_t rlfuse_cuda_logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                                                    int64_t row_stride, const int64_t* labels,
                                                    rlfuse_logit_transform tf, float* logp, float* lse,
                                                    float* entropy, cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  if (vocab <= 0 || vocab > INT32_MAX || n_rows > INT32_MAX) return cudaErrorInvalidValue;
  switch (dtype) {
    case RLFUSE_F32:
      return rlfuse::forward_impl<RLFUSE_F32>(logits, n_rows, vocab, row_stride, labels, tf, logp,
                                              lse, entropy, stream);
    case RLFUSE_BF16:
      return rlfuse::forward_impl<RLFUSE_BF16>(logits, n_rows, vocab, row_stride, labels, tf, logp,
                                               lse, entropy, stream);
    case RLFUSE_F16:
      return rlfuse::forward_impl<RLFUSE_F16>(logits, n_rows, vocab, row_stride, labels, tf, logp,
                                              lse, entropy, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t rlfuse_cuda_logprobs_backward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                                                     int64_t row_stride, const int64_t* labels, const float* lse,
                                                     const float* entropy, const float* grad_logp,
                                                     const float* grad_entropy, rlfuse_logit_transform tf,
                                                     void* grad_logits, int64_t grad_row_stride,
                                                     cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  if (vocab <= 0 || vocab > INT32_MAX || n_rows > INT32_MAX) return cudaErrorInvalidValue;
  if (grad_entropy != nullptr && entropy == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case RLFUSE_F32:
      return rlfuse::backward_impl<RLFUSE_F32>(logits, n_rows, vocab, row_stride, labels, lse, entropy, grad_logp,
                                               grad_entropy, tf, grad_logits, grad_row_stride, stream);
    case RLFUSE_BF16:
      return rlfuse::backward_impl<RLFUSE_BF16>(logits, n_rows, vocab, row_stride, labels, lse, entropy,
                                                grad_logp, grad_entropy, tf, grad_logits,
                                                grad_row_stride, stream);
    case RLFUSE_F16:
      return rlfuse::backward_impl<RLFUSE_F16>(logits, n_rows, vocab, row_stride, labels, lse, entropy, grad_logp,
                                               grad_entropy, tf, grad_logits, grad_row_stride, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
