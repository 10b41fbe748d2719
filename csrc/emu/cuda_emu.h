// Host (CPU) emulation of the small part of CUDA that the attention kernels use, so that the very
// same kernel source can be compiled by g++ and checked on a machine without a GPU (the tests do
// this; see emu/attention_emu.cpp). Not a general CUDA emulator:
//   - a block's threads are fibers (ucontext) scheduled cooperatively on one OS thread: each runs
//     until it waits at __syncthreads() or in __shfl_xor_sync (a per-warp buffer between two warp
//     barriers); threads waiting at different barriers are reported as a deadlock. Blocks are
//     spread over a few OS threads; each block gets a freshly poisoned (0xFF bytes = NaN) dynamic
//     shared-memory buffer. With ABFT_EMU_THREADS defined, every CUDA thread is a std::thread
//     instead and the barriers are real ones: slower, but ThreadSanitizer then sees a missing
//     __syncthreads() as a data race (see sanitize_main.cpp);
//   - __half / __nv_bfloat16 are 16-bit storage types with round-to-nearest-even conversions;
//   - nvcuda::wmma (16 x 16 x 16, float accumulator) is emulated at the API level: a lane holds
//     whole A / B tiles but owns only the accumulator elements e = lane (mod 32) (the others are
//     NaN), which it alone loads, computes (in float) and stores, so lanes of a warp never race.
//     Pointer alignment (256 bits), leading dimensions (multiples of 16 bytes) and tiles lying
//     inside shared memory are checked; a violation makes the launch fail.
// It checks indexing, masking, tiling and barrier placement, not GPU timing, memory-model details
// or the register layout of real tensor-core fragments.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifndef ABFT_EMU_THREADS
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using std::max;
using std::min;

namespace emu {

inline std::mutex g_error_mutex;
inline std::string g_error;
inline std::atomic<bool> g_failed{false};

inline void fail(const std::string& msg) {
  std::lock_guard<std::mutex> lk(g_error_mutex);
  if (g_error.empty()) g_error = msg;
  g_failed = true;
}

inline const char* take_error() {
  static thread_local std::string last;
  if (!g_failed) return nullptr;
  std::lock_guard<std::mutex> lk(g_error_mutex);
  last = g_error;
  return last.c_str();
}

inline void reset_error() {
  std::lock_guard<std::mutex> lk(g_error_mutex);
  g_error.clear();
  g_failed = false;
}

struct SmemBuffer {  // 128-byte aligned, poisoned before every block
  explicit SmemBuffer(size_t n)
      : bytes(n), alloc((std::max<size_t>(n, 1) + 127) / 128 * 128),
        mem(static_cast<unsigned char*>(aligned_alloc(128, alloc)), free) {}
  void poison() { memset(mem.get(), 0xFF, alloc); }  // NaN as float, half and bfloat16
  size_t bytes, alloc;
  std::unique_ptr<unsigned char, void (*)(void*)> mem;
};

#ifdef ABFT_EMU_THREADS
// ---- one std::thread per CUDA thread -----------------------------------------------------------

// Barrier for the threads of one block (or warp). A thread that returns from the kernel drops out,
// so the remaining threads' barriers still complete.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const unsigned gen = gen_;
    if (++count_ >= n_) {
      release();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }
  void drop() {
    std::lock_guard<std::mutex> lk(m_);
    --n_;
    if (n_ > 0 && count_ >= n_) release();
  }

 private:
  void release() {
    count_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  unsigned gen_ = 0;
};

struct Warp {  // lane exchange for __shfl_xor_sync
  explicit Warp(int lanes) : bar(lanes) {}
  Barrier bar;
  float buf[32];
};

inline thread_local dim3 t_thread_idx;
inline dim3 g_block_idx;
inline SmemBuffer* g_smem = nullptr;
inline Barrier* g_barrier = nullptr;
inline std::vector<std::unique_ptr<Warp>>* g_warps = nullptr;

inline const dim3& thread_index() { return t_thread_idx; }
inline const dim3& block_index() { return g_block_idx; }
inline unsigned char* shared_memory() { return g_smem->mem.get(); }
inline size_t shared_memory_bytes() { return g_smem->bytes; }
inline void sync_block() { g_barrier->wait(); }

inline float shfl_xor(float v, int lane_mask) {
  Warp& w = *(*g_warps)[t_thread_idx.x / 32];
  const int lane = t_thread_idx.x % 32;
  w.buf[lane] = v;
  w.bar.wait();
  const float r = w.buf[lane ^ lane_mask];
  w.bar.wait();  // nobody overwrites buf before every lane has read
  return r;
}

template <class Args>
const char* launch(void (*kernel)(Args), dim3 grid, int threads, size_t smem, const Args& args) {
  reset_error();
  SmemBuffer buf(smem);
  g_smem = &buf;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x && !g_failed; ++x) {
        buf.poison();
        Barrier bar(threads);
        std::vector<std::unique_ptr<Warp>> warps;
        for (int w = 0; w * 32 < threads; ++w)
          warps.emplace_back(new Warp(std::min(32, threads - 32 * w)));
        g_block_idx = dim3(x, y, z);
        g_barrier = &bar;
        g_warps = &warps;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            t_thread_idx = dim3(t);
            kernel(args);
            bar.drop();
            warps[t / 32]->bar.drop();
          });
        }
        for (auto& th : pool) th.join();
      }
  return take_error();
}

#else
// ---- fibers: a block's threads take turns on one OS thread ------------------------------------

struct CoopBarrier {
  int n = 0, count = 0;
  unsigned gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  dim3 idx;
  bool done = false;
  const CoopBarrier* waiting = nullptr;
  unsigned wait_gen = 0;
};

struct Worker {  // one OS thread running blocks one after another
  static constexpr size_t kStack = 256 * 1024;
  Worker(int threads, size_t smem_bytes)
      : fibers(threads), smem(smem_bytes), warp_bar((threads + 31) / 32),
        warp_buf((threads + 31) / 32 * 32) {
    for (Fiber& f : fibers) f.stack.reset(new char[kStack]);
  }
  ucontext_t sched;
  std::vector<Fiber> fibers;
  int cur = 0;
  dim3 block_idx;
  SmemBuffer smem;
  CoopBarrier block_bar;
  std::vector<CoopBarrier> warp_bar;
  std::vector<float> warp_buf;
  std::function<void()> body;
};

inline thread_local Worker* t_worker = nullptr;

inline void coop_release(CoopBarrier& b) {
  b.count = 0;
  ++b.gen;
}

inline void coop_wait(CoopBarrier& b) {
  Worker& w = *t_worker;
  const unsigned gen = b.gen;
  if (++b.count >= b.n) {
    coop_release(b);
    return;
  }
  Fiber& f = w.fibers[w.cur];
  f.waiting = &b;
  f.wait_gen = gen;
  swapcontext(&f.ctx, &w.sched);
}

inline void coop_drop(CoopBarrier& b) {
  --b.n;
  if (b.n > 0 && b.count >= b.n) coop_release(b);
}

inline void fiber_entry() {
  Worker& w = *t_worker;
  w.body();
  w.fibers[w.cur].done = true;
  coop_drop(w.block_bar);
  coop_drop(w.warp_bar[w.cur / 32]);
}  // returns to w.sched through uc_link

inline void init_fiber(Worker& w, int t) {
  Fiber& f = w.fibers[t];
  f.idx = dim3(t);
  f.done = false;
  f.waiting = nullptr;
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc_stack.ss_size = Worker::kStack;
  f.ctx.uc_link = &w.sched;
  makecontext(&f.ctx, fiber_entry, 0);
}

// Runs the current block to completion; false on a deadlock.
inline bool run_block(Worker& w) {
  const int threads = static_cast<int>(w.fibers.size());
  w.block_bar = CoopBarrier{threads, 0, 0};
  for (size_t i = 0; i < w.warp_bar.size(); ++i)
    w.warp_bar[i] = CoopBarrier{std::min(32, threads - 32 * static_cast<int>(i)), 0, 0};
  for (int t = 0; t < threads; ++t) init_fiber(w, t);
  for (;;) {
    bool all_done = true, progress = false;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = w.fibers[t];
      if (f.done) continue;
      all_done = false;
      if (f.waiting != nullptr && f.waiting->gen == f.wait_gen) continue;  // still waiting
      f.waiting = nullptr;
      w.cur = t;
      swapcontext(&w.sched, &f.ctx);
      progress = true;
    }
    if (all_done) return true;
    if (!progress) {
      fail("deadlock: the threads of a block wait at different barriers");
      return false;
    }
  }
}

inline const dim3& thread_index() { return t_worker->fibers[t_worker->cur].idx; }
inline const dim3& block_index() { return t_worker->block_idx; }
inline unsigned char* shared_memory() { return t_worker->smem.mem.get(); }
inline size_t shared_memory_bytes() { return t_worker->smem.bytes; }
inline void sync_block() { coop_wait(t_worker->block_bar); }

inline float shfl_xor(float v, int lane_mask) {
  Worker& w = *t_worker;
  const int warp = w.cur / 32, lane = w.cur % 32;
  float* buf = &w.warp_buf[warp * 32];
  buf[lane] = v;
  coop_wait(w.warp_bar[warp]);
  const float r = buf[lane ^ lane_mask];
  coop_wait(w.warp_bar[warp]);  // nobody overwrites buf before every lane has read
  return r;
}

template <class Args>
const char* launch(void (*kernel)(Args), dim3 grid, int threads, size_t smem, const Args& args) {
  reset_error();
  const long nblocks = (long)grid.x * grid.y * grid.z;
  const long nworkers = std::max(1L, std::min<long>(nblocks, std::min(
      8u, std::max(1u, std::thread::hardware_concurrency()))));
  std::vector<std::thread> pool;
  for (long wi = 0; wi < nworkers; ++wi) {
    pool.emplace_back([&, wi] {
      Worker w(threads, smem);
      t_worker = &w;
      w.body = [&] { kernel(args); };
      for (long b = wi; b < nblocks && !g_failed; b += nworkers) {
        w.block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / ((long)grid.x * grid.y));
        w.smem.poison();
        if (!run_block(w)) break;
      }
      t_worker = nullptr;
    });
  }
  for (auto& th : pool) th.join();
  return take_error();
}

#endif  // ABFT_EMU_THREADS

inline void check_smem_range(const void* p, size_t first, size_t last_excl, const char* what) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = shared_memory();
  if (c + first < base || c + last_excl > base + shared_memory_bytes())
    fail(std::string(what) + ": tile outside the dynamic shared memory");
}

}  // namespace emu

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())

inline void __syncthreads() { emu::sync_block(); }

// All lanes of the warp must call it (as with a full mask on the GPU).
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  return emu::shfl_xor(v, lane_mask);
}

// ---------------------------------------------------------------------------------------------
// 16-bit floating-point storage types

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline uint32_t emu_f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float emu_u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1Fu, man = h.bits & 0x3FFu;
  if (exp == 0x1F) return emu_u2f(sign | 0x7F800000u | (man << 13));  // inf / nan
  if (exp == 0) {                                                      // zero / subnormal
    const float f = ldexpf((float)man, -24);
    return sign ? -f : f;
  }
  return emu_u2f(sign | ((exp + 112) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = emu_f2u(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const float a = fabsf(f);
  if (a != a) return __half{(uint16_t)(sign | 0x7E00u)};
  if (a >= 65520.0f) return __half{(uint16_t)(sign | 0x7C00u)};  // rounds to inf
  if (a < ldexpf(1.0f, -14)) {                                    // subnormal half: units 2^-24
    const float q = nearbyintf(ldexpf(a, 24));                    // ties to even (default mode)
    return __half{(uint16_t)(sign | (uint16_t)q)};
  }
  const uint32_t au = emu_f2u(a);
  uint32_t exp = (au >> 23) - 112, man = au & 0x7FFFFFu;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rem = man & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: fine
  return __half{(uint16_t)(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return emu_u2f((uint32_t)b.bits << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = emu_f2u(f);
  if (f != f) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(u >> 16)};
}

// ---------------------------------------------------------------------------------------------
// WMMA

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> struct frag_shape;
template <int M, int N, int K> struct frag_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct frag_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct frag_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// A / B: every lane holds the whole tile (as float; 16-bit values are exactly representable).
// Accumulator: lane l owns elements e = l, l + 32, ... (row-major index); the rest are NaN.
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static constexpr int rows = frag_shape<Use, M, N, K>::rows;
  static constexpr int cols = frag_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[rows * cols];
};

inline float emu_load(const float& x) { return x; }
inline float emu_load(const __half& x) { return __half2float(x); }
inline float emu_load(const __nv_bfloat16& x) { return __bfloat162float(x); }

template <class T> inline void emu_check(const T* p, unsigned ldm, int rows, int cols,
                                         bool row_major_mem, const char* what) {
  const std::string w(what);
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail(w + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail(w + ": ldm not a multiple of 16 bytes");
  const size_t outer = row_major_mem ? rows : cols, inner = row_major_mem ? cols : rows;
  if (ldm < inner) emu::fail(w + ": ldm smaller than the tile");
  emu::check_smem_range(p, 0, ((outer - 1) * ldm + inner) * sizeof(T), what);
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators load with a layout");
  constexpr bool rm = std::is_same<Layout, row_major>::value;
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr int R = F::rows, C = F::cols;
  emu_check(p, ldm, R, C, rm, "load_matrix_sync");
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) f.x[r * C + c] = emu_load(rm ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  const bool rm = layout == mem_row_major;
  emu_check(p, ldm, M, N, rm, "load_matrix_sync(accumulator)");
  const int lane = threadIdx.x % 32;
  for (int e = 0; e < M * N; ++e) {
    const int r = e / N, c = e % N;
    f.x[e] = e % 32 == lane ? (rm ? p[r * ldm + c] : p[c * ldm + r]) : NAN;
  }
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  const bool rm = layout == mem_row_major;
  emu_check(p, ldm, M, N, rm, "store_matrix_sync");
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < M * N; e += 32) {  // the elements this lane owns
    const int r = e / N, c = e % N;
    (rm ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& x : f.x) x = v;
}

template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < M * N; e += 32) {  // the elements this lane owns (d may alias c)
    const int i = e / N, j = e % N;
    float s = c.x[e];
    for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
    d.x[e] = s;
  }
}

}  // namespace wmma
}  // namespace nvcuda
