// Building blocks of the attention kernels: element types, block-wide tile GEMMs on shared memory
// (tensor-core WMMA for fp16 / bf16, scalar FMA for fp32), the visibility rule, shared-memory
// layouts with their tile sizes, and the dtype / head-dim dispatch.
//
// Every kernel runs kThreads threads per block. Operand tiles live in shared memory in the input
// type T (row stride P + pad, P = head dim rounded up to a supported size, the extra columns zero);
// scores and accumulators live in shared memory as float32. Nothing is ever L x L.
//
// Compiled by nvcc (attention_fwd.cu, attention_bwd.cu) and, for the CPU tests, by a host C++
// compiler with ABFT_EMULATION defined (emu/cuda_emu.h supplies threads, barriers and WMMA).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#ifdef ABFT_EMULATION
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include "attention.h"

namespace abft {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Dynamic shared memory per block. 99 KiB is the opt-in limit of sm_86 / sm_89 (A100: 163 KiB,
// H100: 227 KiB), so every configuration below runs on any sm_80+ GPU.
constexpr size_t kSmemBudget = 99 * 1024;

// ---------------------------------------------------------------------------------------------
// element types

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Row padding of T tiles, in elements: fp32 tiles are read by scalar code, where an odd stride
// avoids bank conflicts; 16-bit tiles feed WMMA, whose leading dimension must be a multiple of 8.
template <class T> constexpr int tile_pad() { return sizeof(T) == 4 ? 1 : 8; }

// Whether the tile GEMMs of element type T use tensor cores in this compilation pass.
template <class T> __device__ constexpr bool use_wmma() {
#if defined(ABFT_EMULATION)
  return !std::is_same<T, float>::value;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return !std::is_same<T, float>::value;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  return std::is_same<T, __half>::value;
#else
  return false;
#endif
}

__device__ __forceinline__ unsigned char* smem_base() {
#ifdef ABFT_EMULATION
  return emu::shared_memory();
#else
  extern __shared__ __align__(128) unsigned char abft_smem[];
  return abft_smem;
#endif
}

// Max / sum over groups of N consecutive lanes (N a power of two <= 32; every lane of the warp
// calls it); each lane of a group gets the same result.
template <int N> __device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int o = 1; o < N; o <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <int N> __device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = 1; o < N; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Block-wide tile GEMMs. All kThreads threads call them; the caller puts __syncthreads() between
// producing the operands and calling, and between calling and consuming C.
// M, N, K are the tile sizes; lda / ldb / ldc are row strides in elements.

// C[m][n] (+)= sum_k a(m, k) * b(k, n) with a(m, k) = A[m][k] (A_T: A[k][m], A stored K x M),
// b(k, n) = B[k][n] (B_T: B[n][k], B stored N x K); ACC: add to C, else overwrite it.
// Use the named forms below.
template <int M, int N, int K, bool A_T, bool B_T, bool ACC, class T>
__device__ __forceinline__ void gemm(float* C, int ldc, const T* A, int lda, const T* B, int ldb) {
  if constexpr (use_wmma<T>()) {
    static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "WMMA tiles are 16 x 16 x 16");
    namespace wmma = nvcuda::wmma;
    // a transposed operand is a column-major 16 x 16 tile
    using LayoutA = std::conditional_t<A_T, wmma::col_major, wmma::row_major>;
    using LayoutB = std::conditional_t<B_T, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x / 32;
    for (int t = warp; t < (M / 16) * (N / 16); t += kWarps) {
      const int tm = t / (N / 16), tn = t % (N / 16);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* c = C + tm * 16 * ldc + tn * 16;
      if constexpr (ACC) {
        wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
      for (int kk = 0; kk < K; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
        wmma::load_matrix_sync(a, A_T ? A + kk * lda + tm * 16 : A + tm * 16 * lda + kk, lda);
        wmma::load_matrix_sync(b, B_T ? B + tn * 16 * ldb + kk : B + kk * ldb + tn * 16, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
    }
  } else {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int m = e / N, n = e % N;
      float s = ACC ? C[m * ldc + n] : 0.0f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) {
        const T x = A_T ? A[k * lda + m] : A[m * lda + k];
        const T y = B_T ? B[n * ldb + k] : B[k * ldb + n];
        s = fmaf(to_f(x), to_f(y), s);
      }
      C[m * ldc + n] = s;
    }
  }
}

// C[m][n] = sum_k A[m][k] * B[n][k]
template <int M, int N, int K, class T>
__device__ __forceinline__ void gemm_nt(float* C, int ldc, const T* A, int lda, const T* B,
                                        int ldb) {
  gemm<M, N, K, false, true, false>(C, ldc, A, lda, B, ldb);
}

// C[m][n] += sum_k A[m][k] * B[k][n]
template <int M, int N, int K, class T>
__device__ __forceinline__ void gemm_nn_acc(float* C, int ldc, const T* A, int lda, const T* B,
                                            int ldb) {
  gemm<M, N, K, false, false, true>(C, ldc, A, lda, B, ldb);
}

// C[m][n] += sum_k A[k][m] * B[k][n]   (A stored K x M)
template <int M, int N, int K, class T>
__device__ __forceinline__ void gemm_tn_acc(float* C, int ldc, const T* A, int lda, const T* B,
                                            int ldb) {
  gemm<M, N, K, true, false, true>(C, ldc, A, lda, B, ldb);
}

// ---------------------------------------------------------------------------------------------
// tiles in and out of global memory

// Head h of batch row b of a [B, H, L, D] tensor with element strides st.
template <class T>
__device__ __forceinline__ const T* head_ptr(const void* base, const Strides& st, int b, int h) {
  return static_cast<const T*>(base) + b * st.b + h * st.h;
}

// dst[r][d] (row stride ld) = src[(row0 + r) * stride_l + d] for row0 + r < nrows and d < D,
// else 0; r < ROWS, d < P.
template <int ROWS, int P, class T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t stride_l,
                                          int row0, int nrows, int D) {
  const T zero = from_f<T>(0.0f);
  for (int e = threadIdx.x; e < ROWS * P; e += kThreads) {
    const int r = e / P, d = e % P;
    const int row = row0 + r;
    dst[r * ld + d] = (row < nrows && d < D) ? src[(int64_t)row * stride_l + d] : zero;
  }
}

template <int ROWS, int P>
__device__ __forceinline__ void zero_acc(float* acc, int ld) {
  for (int e = threadIdx.x; e < ROWS * P; e += kThreads) acc[(e / P) * ld + e % P] = 0.0f;
}

// out[(row0 + r) * D + d] = T(acc[r][d] * mul + (add ? add[(row0 + r) * D + d] : 0)),
// for row0 + r < nrows, d < D (out and add contiguous rows of D elements).
template <int ROWS, int P, class T>
__device__ __forceinline__ void store_rows(T* out, const float* acc, int ld, float mul,
                                           const float* add, int row0, int nrows, int D) {
  for (int e = threadIdx.x; e < ROWS * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const int row = row0 + r;
    if (row < nrows) {
      const int64_t o = (int64_t)row * D + d;
      float x = acc[r * ld + d] * mul;
      if (add != nullptr) x += add[o];
      out[o] = from_f<T>(x);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// visibility (abft_fast/masks.py)

struct Visibility {
  int lq, lk, off, causal, window;  // off = Lk - Lq
  const uint8_t* kpm;               // this batch row of the key padding mask, or nullptr

  __device__ __forceinline__ Visibility(const Shape& s, int b)
      : lq(s.Lq), lk(s.Lk), off(s.Lk - s.Lq), causal(s.causal), window(s.window),
        kpm(s.kpm ? s.kpm + (int64_t)b * s.kpm_stride : nullptr) {}

  __device__ __forceinline__ bool operator()(int i, int j) const {
    if (i >= lq || j >= lk) return false;
    const int pos = i + off;
    if (causal && j > pos) return false;
    if (window > 0 && j <= pos - window) return false;
    return kpm == nullptr || kpm[j] != 0;
  }

  // Keys that query rows [i0, i1) can see lie in [*j0, *j1).
  __device__ __forceinline__ void key_range(int i0, int i1, int* j0, int* j1) const {
    int lo = 0, hi = lk;
    if (causal) hi = min(hi, i1 - 1 + off + 1);
    if (window > 0) lo = max(lo, i0 + off - window + 1);
    *j0 = lo;
    *j1 = max(hi, lo);
  }

  // Queries that can see some key of [j0, j1) lie in [*i0, *i1).
  __device__ __forceinline__ void query_range(int j0, int j1, int* i0, int* i1) const {
    int lo = 0, hi = lq;
    if (causal) lo = max(lo, j0 - off);
    if (window > 0) hi = min(hi, j1 - 1 - off + window);
    *i0 = lo;
    *i1 = max(hi, lo);
  }
};

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// shared-memory layouts (byte offsets) and tile sizes

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Forward: Q [BM][ldt], K or V [BN][ldt] (one buffer, K then V), O [BM][ldo] f32,
// S [BM][lds] f32, P [BM][ldp] T (fp32: P overwrites S), inv_l and lse [BM] f32.
template <class T, int P, int BM, int BN> struct FwdSmem {
  static constexpr bool kAlias = sizeof(T) == 4;
  static constexpr int ldt = P + tile_pad<T>(), ldo = P + 4, lds = BN + 4;
  static constexpr int ldp = kAlias ? lds : BN + tile_pad<T>();
  static constexpr size_t q = 0;
  static constexpr size_t kv = q + align128(sizeof(T) * BM * ldt);
  static constexpr size_t o = kv + align128(sizeof(T) * BN * ldt);
  static constexpr size_t s = o + align128(4 * BM * ldo);
  static constexpr size_t p = kAlias ? s : s + align128(4 * BM * lds);
  static constexpr size_t stat = kAlias ? s + align128(4 * BM * lds)
                                        : p + align128(sizeof(T) * BM * ldp);
  static constexpr size_t bytes = stat + align128(4 * 2 * BM);
};

// Backward, dk / dv (block = BN keys, looping over query tiles of BM): K, V [BN][ldt] T,
// dK, dV [BN][lda] f32, Q, dO [BM][ldt] T, S, dP [BM][lds] f32, P, dS [BM][ldp] T (fp32: they
// overwrite S and dP), lse and delta [BM] f32.
template <class T, int P, int BM, int BN> struct DkvSmem {
  static constexpr bool kAlias = sizeof(T) == 4;
  static constexpr int ldt = P + tile_pad<T>(), lda = P + 4, lds = BN + 4;
  static constexpr int ldp = kAlias ? lds : BN + tile_pad<T>();
  static constexpr size_t k = 0;
  static constexpr size_t v = k + align128(sizeof(T) * BN * ldt);
  static constexpr size_t dk = v + align128(sizeof(T) * BN * ldt);
  static constexpr size_t dv = dk + align128(4 * BN * lda);
  static constexpr size_t q = dv + align128(4 * BN * lda);
  static constexpr size_t dout = q + align128(sizeof(T) * BM * ldt);
  static constexpr size_t s = dout + align128(sizeof(T) * BM * ldt);
  static constexpr size_t dp = s + align128(4 * BM * lds);
  static constexpr size_t p = kAlias ? s : dp + align128(4 * BM * lds);
  static constexpr size_t ds = kAlias ? dp : p + align128(sizeof(T) * BM * ldp);
  static constexpr size_t lse = kAlias ? dp + align128(4 * BM * lds)
                                       : ds + align128(sizeof(T) * BM * ldp);
  static constexpr size_t delta = lse + align128(4 * BM);
  static constexpr size_t bytes = delta + align128(4 * BM);
};

// Backward, dq (block = BM queries, looping over key tiles of BN): Q, dO [BM][ldt] T,
// dQ [BM][lda] f32, K, V [BN][ldt] T, S, dP [BM][lds] f32, dS [BM][ldp] T (fp32: overwrites dP),
// lse and delta [BM] f32.
template <class T, int P, int BM, int BN> struct DqSmem {
  static constexpr bool kAlias = sizeof(T) == 4;
  static constexpr int ldt = P + tile_pad<T>(), lda = P + 4, lds = BN + 4;
  static constexpr int ldp = kAlias ? lds : BN + tile_pad<T>();
  static constexpr size_t q = 0;
  static constexpr size_t dout = q + align128(sizeof(T) * BM * ldt);
  static constexpr size_t dq = dout + align128(sizeof(T) * BM * ldt);
  static constexpr size_t k = dq + align128(4 * BM * lda);
  static constexpr size_t v = k + align128(sizeof(T) * BN * ldt);
  static constexpr size_t s = v + align128(sizeof(T) * BN * ldt);
  static constexpr size_t dp = s + align128(4 * BM * lds);
  static constexpr size_t ds = kAlias ? dp : dp + align128(4 * BM * lds);
  static constexpr size_t lse = kAlias ? dp + align128(4 * BM * lds)
                                       : ds + align128(sizeof(T) * BM * ldp);
  static constexpr size_t delta = lse + align128(4 * BM);
  static constexpr size_t bytes = delta + align128(4 * BM);
};

struct Tile {
  int bm, bn;
};

// The first (BM, BN) of `cands` whose layout fits kSmemBudget (16-bit types: multiples of 16, as
// WMMA needs); {0, 0} if none does.
template <class T, int P, template <class, int, int, int> class Layout, int I = 0>
constexpr Tile pick_tile() {
  constexpr Tile cands[] = {{64, 64}, {64, 32}, {32, 64}, {32, 32}, {32, 16},
                            {16, 32}, {16, 16}, {8, 16},  {16, 8},  {8, 8}};
  if constexpr (I == sizeof(cands) / sizeof(cands[0])) {
    return Tile{0, 0};
  } else {
    constexpr Tile t = cands[I];
    constexpr bool ok16 = sizeof(T) == 4 || (t.bm % 16 == 0 && t.bn % 16 == 0);
    if constexpr (ok16 && Layout<T, P, t.bm, t.bn>::bytes <= kSmemBudget) {
      return t;
    } else {
      return pick_tile<T, P, Layout, I + 1>();
    }
  }
}

// Tile sizes BM x BN and shared-memory layout Smem of a kernel with layout Layout, for element
// type T and head-dim bucket P.
template <class T, int P, template <class, int, int, int> class Layout> struct TileCfg {
  static constexpr Tile t = pick_tile<T, P, Layout>();
  static_assert(t.bm > 0, "no tile of this kernel's layout fits the shared-memory budget");
  static constexpr int BM = t.bm, BN = t.bn;
  using Smem = Layout<T, P, BM, BN>;
};

// ---------------------------------------------------------------------------------------------
// dispatch: f(T{}, std::integral_constant<int, P>{}) with P the supported head-dim bucket >= D

template <class T> struct TypeTag { using type = T; };

template <class T, class F> const char* dispatch_head_dim(int D, F&& f) {
  if (D <= 16) return f(TypeTag<T>{}, std::integral_constant<int, 16>{});
  if (D <= 32) return f(TypeTag<T>{}, std::integral_constant<int, 32>{});
  if (D <= 64) return f(TypeTag<T>{}, std::integral_constant<int, 64>{});
  if (D <= 128) return f(TypeTag<T>{}, std::integral_constant<int, 128>{});
  if (D <= 256) return f(TypeTag<T>{}, std::integral_constant<int, 256>{});
  return "head dim > 256 is not supported by the CUDA kernels";
}

inline const char* check_shape(const Shape& s) {
  if (s.B < 1 || s.Hq < 1 || s.Hkv < 1 || s.Lq < 1 || s.Lk < 1)
    return "B, Hq, Hkv, Lq and Lk must be positive";
  if (s.Hq % s.Hkv != 0) return "Hq must be a multiple of Hkv";
  if (s.B > 65535 || s.Hq > 65535) return "B and Hq must be at most 65535 (CUDA grid limit)";
  if (s.kpm != nullptr && s.kpm_stride < s.Lk) return "key padding mask row stride < Lk";
  return nullptr;
}

// Checks the shape, then returns f(TypeTag<T>{}, std::integral_constant<int, P>{}) for the dtype
// and the head-dim bucket of s.D.
template <class F> const char* dispatch(DType dtype, const Shape& s, F&& f) {
  if (const char* err = check_shape(s)) return err;
  if (s.D < 1) return "head dim must be positive";
  switch (dtype) {
    case DType::F32: return dispatch_head_dim<float>(s.D, f);
    case DType::F16: return dispatch_head_dim<__half>(s.D, f);
    case DType::BF16: return dispatch_head_dim<__nv_bfloat16>(s.D, f);
  }
  return "unknown dtype (expected float32, float16 or bfloat16)";
}

}  // namespace abft
