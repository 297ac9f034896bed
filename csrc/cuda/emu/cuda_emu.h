// Host emulation of the small part of CUDA the rlfuse kernels use, for CPU tests only.
//
//   g++ -std=c++20 -fPIC -shared -x c++ -include csrc/cuda/emu/cuda_emu.h csrc/cuda/*.cu
//
// Each launch runs its blocks one after another. The threads of a block are fibers (ucontext) on
// the calling thread, switched only at __syncthreads and at warp shuffles, which act as barriers
// of the block and of the warp. At every barrier the waiting threads are resumed in a fresh
// pseudo-random order, so a read of shared memory that another thread writes in the same phase
// (a missing barrier) sees the old or the new value depending on the order and shows up as a
// wrong result. A barrier that not every thread of its block (or warp) reaches is reported as
// an error instead of hanging. __shared__ variables are function statics: shared by the block's
// threads exactly as on the device, reused by the next block.
// Not emulated: memory spaces, timing, the precision of the fast-math intrinsics (mapped to the
// libm functions), partially active warps (blocks must be a multiple of 32 threads).
//
// This folder is not compiled into the extension (setup.py globs csrc/cuda/*.cu only).
#pragma once
#define RLFUSE_CUDA_EMU 1

#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <stdexcept>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

using std::max;
using std::min;

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }

namespace rlfuse_emu {

class Block {
 public:
  enum State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

  Block(unsigned nthreads, uint64_t seed) : fibers_(nthreads), slots_(nthreads), rng_(seed) {
    // fiber stacks, kept for the next launches of this OS thread (allocated, never zeroed)
    thread_local std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() < nthreads) stacks.emplace_back(new char[kStackBytes]);
    for (unsigned t = 0; t < nthreads; ++t) fibers_[t].stack = stacks[t].get();
  }

  // Runs body() on every thread of one block, to completion.
  template <typename Body>
  void run(const Body& body, uint3 block_idx) {
    body_ = [&body] { body(); };
    block_idx_ = block_idx;
    for (unsigned t = 0; t < fibers_.size(); ++t) {
      Fiber& f = fibers_[t];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&Block::entry), 1, static_cast<int>(t));
      f.state = kReady;
    }
    std::vector<unsigned> order;
    for (;;) {
      order.clear();
      for (unsigned t = 0; t < fibers_.size(); ++t)
        if (fibers_[t].state == kReady) order.push_back(t);
      if (order.empty()) {
        if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
        if (!release_barriers()) break;  // every thread is done
        continue;
      }
      std::shuffle(order.begin(), order.end(), rng_);
      for (unsigned t : order) resume(t);
    }
  }

  // called from inside a thread
  void sync_block() { wait(kAtBlockBarrier); }
  void sync_warp() { wait(kAtWarpBarrier); }
  uint64_t& slot(unsigned tid) { return slots_.at(tid); }
  unsigned size() const { return static_cast<unsigned>(fibers_.size()); }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;
  struct Fiber {
    ucontext_t ctx;
    char* stack = nullptr;
    State state = kDone;
  };

  static void entry(int t);

  void resume(unsigned t) {
    current_ = t;
    threadIdx = {t, 0, 0};
    blockIdx = block_idx_;
    swapcontext(&main_, &fibers_[t].ctx);
  }

  void wait(State s) {
    Fiber& f = fibers_[current_];
    f.state = s;
    swapcontext(&f.ctx, &main_);
  }

  // All threads wait or are done: release the complete warp barriers, else a complete block
  // barrier. Returns false when every thread is done; throws on a barrier that cannot complete.
  bool release_barriers() {
    const unsigned n = size();
    bool released = false;
    for (unsigned w = 0; w * 32 < n; ++w) {
      const unsigned lo = w * 32, hi = std::min(n, lo + 32);
      unsigned at = 0;
      for (unsigned t = lo; t < hi; ++t) at += fibers_[t].state == kAtWarpBarrier;
      if (at == hi - lo) {
        for (unsigned t = lo; t < hi; ++t) fibers_[t].state = kReady;
        released = true;
      } else if (at != 0) {
        throw std::logic_error("emulated kernel: warp " + std::to_string(w) + ": " + std::to_string(at) +
                               " of its lanes wait at a shuffle, the others went elsewhere");
      }
    }
    if (released) return true;
    unsigned at_block = 0, done = 0;
    for (const Fiber& f : fibers_) {
      at_block += f.state == kAtBlockBarrier;
      done += f.state == kDone;
    }
    if (done == n) return false;
    if (at_block != n)
      throw std::logic_error("emulated kernel: __syncthreads reached by " + std::to_string(at_block) + " of " +
                             std::to_string(n) + " threads (" + std::to_string(done) + " had returned)");
    for (Fiber& f : fibers_) f.state = kReady;
    return true;
  }

  std::vector<Fiber> fibers_;
  std::vector<uint64_t> slots_;
  std::mt19937_64 rng_;
  std::function<void()> body_;
  uint3 block_idx_{};
  unsigned current_ = 0;
  ucontext_t main_{};
  std::exception_ptr error_;
};

inline thread_local Block* g_block = nullptr;  // the block being run on this OS thread

inline void Block::entry(int t) {
  Block* b = g_block;
  try {
    b->body_();
  } catch (...) {
    if (!b->error_) b->error_ = std::current_exception();
  }
  Fiber& f = b->fibers_[t];
  f.state = kDone;
  swapcontext(&f.ctx, &b->main_);
}

template <typename T>
T shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  const unsigned tid = threadIdx.x;
  const unsigned warp_base = tid / 32 * 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_block->slot(tid) = bits;
  g_block->sync_warp();
  T out = v;
  if (src_lane >= 0 && src_lane < 32 && warp_base + src_lane < g_block->size())
    std::memcpy(&out, &g_block->slot(warp_base + src_lane), sizeof(T));
  g_block->sync_warp();  // every lane has read before the slots are reused
  return out;
}

inline uint64_t g_launch_count = 0;

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024 || block.x % 32 != 0)
    throw std::invalid_argument("emulated launch: 1-D blocks of a multiple of 32 threads only");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::invalid_argument("emulated launch: empty grid");
  if (g_block != nullptr) throw std::logic_error("emulated launch from inside a kernel");
  Block b(block.x, 0x9e3779b97f4a7c15ull * ++g_launch_count);
  g_block = &b;
  blockDim = block;
  gridDim = grid;
  const auto body = [&] { kernel(static_cast<P>(args)...); };
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) b.run(body, uint3{x, y, z});
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
}

}  // namespace rlfuse_emu

inline void __syncthreads() { rlfuse_emu::g_block->sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { rlfuse_emu::g_block->sync_warp(); }

template <typename T>
T __shfl_sync(unsigned, T v, int src, int = 32) {
  return rlfuse_emu::shfl(v, src);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return rlfuse_emu::shfl(v, static_cast<int>(threadIdx.x % 32) ^ lane_mask);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
  const int src = static_cast<int>(threadIdx.x % 32) - static_cast<int>(delta);
  return rlfuse_emu::shfl(v, src < 0 ? static_cast<int>(threadIdx.x % 32) : src);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  const int src = static_cast<int>(threadIdx.x % 32) + static_cast<int>(delta);
  return rlfuse_emu::shfl(v, src > 31 ? static_cast<int>(threadIdx.x % 32) : src);
}
