// Host (CPU) emulation of the small part of CUDA that the attention kernels use, so that the very
// same kernel source can be compiled by g++ and checked on a machine without a GPU (the tests do
// this; see emu/attention_emu.cpp). Not a general CUDA emulator:
//   - a block's threads are std::threads; __syncthreads() is a barrier; blocks run one by one,
//     each with a freshly poisoned (0xFF bytes = NaN) dynamic shared-memory buffer;
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
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

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

// Barrier for the threads of one block. A thread that returns from the kernel drops out, so the
// remaining threads' barriers still complete.
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

inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline unsigned char* g_smem = nullptr;
inline size_t g_smem_bytes = 0;
inline Barrier* g_barrier = nullptr;
inline std::mutex g_error_mutex;
inline std::string g_error;

inline unsigned char* shared_memory() { return g_smem; }

inline void fail(const std::string& msg) {
  std::lock_guard<std::mutex> lk(g_error_mutex);
  if (g_error.empty()) g_error = msg;
}

// Runs kernel(args) on grid x threads; returns nullptr or the first failure message.
template <class Args>
const char* launch(void (*kernel)(Args), dim3 grid, int threads, size_t smem, const Args& args) {
  static thread_local std::string last_error;
  g_error.clear();
  const size_t bytes = (smem + 127) / 128 * 128;
  std::unique_ptr<unsigned char, void (*)(void*)> buf(
      static_cast<unsigned char*>(aligned_alloc(128, bytes ? bytes : 128)), free);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        memset(buf.get(), 0xFF, bytes);  // poison: NaN as float, half and bfloat16
        Barrier bar(threads);
        g_smem = buf.get();
        g_smem_bytes = smem;
        g_barrier = &bar;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_idx = dim3(t);
            block_idx = dim3(x, y, z);
            kernel(args);
            bar.drop();
          });
        }
        for (auto& th : pool) th.join();
        if (!g_error.empty()) {
          last_error = g_error;
          return last_error.c_str();
        }
      }
  return nullptr;
}

inline void check_smem_range(const void* p, size_t first, size_t last_excl, const char* what) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c + first < g_smem || c + last_excl > g_smem + g_smem_bytes)
    fail(std::string(what) + ": tile outside the dynamic shared memory");
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)

inline void __syncthreads() { emu::g_barrier->wait(); }

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
