// Probe kernels (interface and grids: probes.h; semantics: kernels/probes.py).
//
// Every kernel runs kThreads threads per block and works on tiles of kProbeBM = 16 probe rows
// (row m of the tile: query head hk * G + m / R, slot m % R). The scores S = Q K^T of a tile of
// rows against a block of keys come from the block-wide tile GEMM of attention_common.cuh
// (tensor-core WMMA with float32 accumulation for fp16 / bf16, exact float32 FMA for float32);
// softmax statistics, dS = E - u P and the dq / dk products are float32, dq and dk accumulated in
// registers (each thread owns fixed elements of the block's accumulator tile).
#pragma once

#include "attention_common.cuh"
#include "probes.h"

namespace abft {

// Shared memory of every probe kernel: Q [BM][ldt] T, K [BN][ldt] T, S [BM][lds] f32, then the
// row data (query position or -1, lse, u [BM]), the key range [2] and the gathered columns [BN].
template <class T, int P, int BM, int BN> struct ProbeSmem {
  static constexpr int kP = P, ldt = P + tile_pad<T>(), lds = BN + 4;
  static constexpr size_t q = 0;
  static constexpr size_t k = q + align128(sizeof(T) * BM * ldt);
  static constexpr size_t s = k + align128(sizeof(T) * BN * ldt);
  static constexpr size_t info = s + align128(4 * BM * lds);
  static constexpr size_t bytes = info + align128(4 * (3 * BM + 2 + BN));
};

// ---------------------------------------------------------------------------------------------
// tile loads in 16-byte pieces (one 128-bit load per thread and piece on the GPU)

__device__ __forceinline__ void copy16(void* dst, const void* src) {
#ifdef ABFT_EMULATION
  memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void zero16(void* dst) {
#ifdef ABFT_EMULATION
  memset(dst, 0, 16);
#else
  *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
#endif
}

// dst[r][d] (row stride ld) = src(r)[d] for d < D, 0 for D <= d < P and for rows whose src(r) is
// nullptr; r < ROWS. src(r) points to a row of D contiguous elements. With 16-byte aligned rows
// of dst (ld a multiple of 16 bytes: the 16-bit tiles) the copy goes in 16-byte pieces,
// consecutive threads taking consecutive pieces; pieces of source rows that are not 16-byte
// aligned, or that hold the end of a row, go element by element.
template <int ROWS, int P, class T, class Src>
__device__ __forceinline__ void load_tile_rows(T* dst, int ld, int D, Src&& src) {
  constexpr int V = 16 / sizeof(T);
  const T zero = from_f<T>(0.0f);
  if constexpr (sizeof(T) == 2) {  // 16-bit tiles: ld = P + 8, rows 16-byte aligned
    constexpr int CH = P / V;
    for (int e = threadIdx.x; e < ROWS * CH; e += kThreads) {
      const int r = e / CH, c = (e % CH) * V;
      const T* row = src(r);
      T* d = dst + r * ld + c;
      if (row == nullptr || c >= D) {
        zero16(d);
      } else if (c + V <= D && reinterpret_cast<uintptr_t>(row + c) % 16 == 0) {
        copy16(d, row + c);
      } else {
        for (int i = 0; i < V; ++i) d[i] = c + i < D ? row[c + i] : zero;
      }
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * P; e += kThreads) {
      const int r = e / P, c = e % P;
      const T* row = src(r);
      dst[r * ld + c] = (row != nullptr && c < D) ? row[c] : zero;
    }
  }
}

// Rows row0 + r < nrows of a [L, D] head with row stride stride_l (zeros beyond).
template <int ROWS, int P, class T>
__device__ __forceinline__ void load_key_tile(T* dst, int ld, const T* src, int64_t stride_l,
                                              int row0, int nrows, int D) {
  load_tile_rows<ROWS, P>(dst, ld, D, [&](int r) -> const T* {
    return row0 + r < nrows ? src + (int64_t)(row0 + r) * stride_l : nullptr;
  });
}

// Keys per block of the dk kernel: its BN x P float32 accumulator stays at 32 registers a thread.
template <int P> __host__ __device__ constexpr int probe_dk_bn() {
  return P <= 64 ? 64 : (P == 128 ? 32 : 16);
}

template <class T, int P> using ProbeRowSmem = ProbeSmem<T, P, kProbeBM, kProbeBN>;
template <class T, int P> using ProbeDkSmem = ProbeSmem<T, P, kProbeBM, probe_dk_bn<P>()>;

// One tile of probe rows of (batch b, key/value head hk) and its shared-memory views.
template <class T, class L> struct ProbeTile {
  T *q, *k;
  float* s;
  int* row;     // [BM] query position, -1 for unused slots and rows outside the tile
  float *lse, *u;
  int* range;   // [2] keys [range[0], range[1]) that some row of the tile can see
  int* col;     // [BN] gathered key positions (probs kernel)
  const ProbeArgs& a;
  int b, hk, G, tile, m_rows;

  __device__ __forceinline__ ProbeTile(unsigned char* sm, const ProbeArgs& args, int b_, int hk_,
                                       int tile_)
      : q(reinterpret_cast<T*>(sm + L::q)), k(reinterpret_cast<T*>(sm + L::k)),
        s(reinterpret_cast<float*>(sm + L::s)), row(reinterpret_cast<int*>(sm + L::info)),
        lse(reinterpret_cast<float*>(sm + L::info) + kProbeBM),
        u(reinterpret_cast<float*>(sm + L::info) + 2 * kProbeBM),
        range(reinterpret_cast<int*>(sm + L::info) + 3 * kProbeBM),
        col(reinterpret_cast<int*>(sm + L::info) + 3 * kProbeBM + 2), a(args), b(b_), hk(hk_),
        G(args.s.Hq / args.s.Hkv), tile(tile_), m_rows(G * args.R) {}

  __device__ __forceinline__ bool in_tile(int m) const { return tile * kProbeBM + m < m_rows; }
  __device__ __forceinline__ int head(int m) const {
    return hk * G + (tile * kProbeBM + m) / a.R;
  }
  // Index of (b, head, slot) in [B, Hq, R] (m in the tile).
  __device__ __forceinline__ int64_t out_row(int m) const {
    const int mg = tile * kProbeBM + m;
    return ((int64_t)b * a.s.Hq + hk * G + mg / a.R) * a.R + mg % a.R;
  }

  // Step 1 (threads < BM): row positions, and lse / u of the rows when given (a row whose lse is
  // -inf sees no key and counts as unused). The caller syncs before step 2.
  __device__ __forceinline__ void load_rows(const float* lse_in, const float* u_in) {
    const int m = threadIdx.x;
    if (m >= kProbeBM) return;
    int r = -1;
    float l = -INFINITY, uu = 0.0f;
    if (in_tile(m)) {
      const int64_t x = a.rows[(int64_t)b * a.R + (tile * kProbeBM + m) % a.R];
      r = (x >= 0 && x < a.s.Lq) ? (int)x : -1;
      if (r >= 0 && lse_in != nullptr) {
        l = lse_in[out_row(m)];
        uu = u_in[out_row(m)];
        if (l == -INFINITY) r = -1;
      }
    }
    row[m] = r;
    lse[m] = l;
    u[m] = uu;
  }

  // Step 2: the key range of the tile (thread 0) and the Q tile (zeros on unused rows and beyond
  // D). The caller syncs before using them.
  __device__ __forceinline__ void load_q_and_range(const Visibility& vis) {
    if (threadIdx.x == 0) {
      int lo = a.s.Lk, hi = 0;
      for (int m = 0; m < kProbeBM; ++m) {
        if (row[m] < 0) continue;
        int j0, j1;
        vis.key_range(row[m], row[m] + 1, &j0, &j1);
        lo = min(lo, j0);
        hi = max(hi, j1);
      }
      range[0] = lo;
      range[1] = max(lo, hi);
    }
    load_tile_rows<kProbeBM, L::kP>(q, L::ldt, a.s.D, [&](int m) -> const T* {
      return row[m] < 0 ? nullptr
                        : head_ptr<T>(a.q, a.q_st, b, head(m)) + (int64_t)row[m] * a.q_st.l;
    });
  }

  // Keys [*j0, *j1) of key chunk `split` (of a.n_split, in whole blocks of kProbeBN) that the tile
  // can see.
  __device__ __forceinline__ void chunk(int split, int* j0, int* j1) const {
    const int per = cdiv(cdiv(a.s.Lk, kProbeBN), a.n_split) * kProbeBN;
    const int c0 = split * per, c1 = min(a.s.Lk, c0 + per);
    *j0 = max(c0, range[0]);
    *j1 = max(*j0, min(c1, range[1]));
  }
};

// ---------------------------------------------------------------------------------------------
// forward

// Partial softmax statistics of one tile of probe rows over one key chunk: ml[row, split] =
// (max_j s_j, sum_j exp(s_j - max)) with s_j = scale q_r . k_j over the visible keys of the chunk
// ((-inf, 0) when there is none).
template <class T, int P>
__global__ void __launch_bounds__(kThreads) probe_stats_kernel(ProbeFwdArgs a) {
  constexpr int BM = kProbeBM, BN = kProbeBN;
  using L = ProbeRowSmem<T, P>;
  const Shape& s = a.s;
  const int split = blockIdx.x, bhk = blockIdx.z;
  const int b = bhk / s.Hkv, hk = bhk % s.Hkv;
  ProbeTile<T, L> t(smem_base(), a, b, hk, blockIdx.y);
  const Visibility vis(s, b);
  t.load_rows(nullptr, nullptr);
  __syncthreads();
  t.load_q_and_range(vis);
  __syncthreads();
  int j0, j1;
  t.chunk(split, &j0, &j1);

  constexpr int TPR = kThreads / BM;  // threads per row, lanes of one warp
  static_assert(kThreads % BM == 0 && TPR <= 32, "a row's threads must lie in one warp");
  const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const int qrow = t.row[r];
  const T* k = head_ptr<T>(a.k, a.k_st, b, hk);
  float m_run = -INFINITY, l_run = 0.0f;
  for (int n0 = j0; n0 < j1; n0 += BN) {
    load_key_tile<BN, P>(t.k, L::ldt, k, a.k_st.l, n0, j1, s.D);
    __syncthreads();  // K ready (and every thread done with the previous S)
    gemm_nt<BM, BN, P>(t.s, L::lds, t.q, L::ldt, t.k, L::ldt);
    __syncthreads();  // S complete
    const float* srow = t.s + r * L::lds;
    float mx = -INFINITY;
    for (int c = part; c < BN; c += TPR) {
      const int j = n0 + c;
      if (qrow >= 0 && j < j1 && vis(qrow, j)) mx = fmaxf(mx, srow[c] * s.scale);
    }
    mx = group_max<TPR>(mx);
    const float m_new = fmaxf(m_run, mx);
    float sum = 0.0f;
    if (m_new != -INFINITY) {
      for (int c = part; c < BN; c += TPR) {
        const int j = n0 + c;
        if (qrow >= 0 && j < j1 && vis(qrow, j)) sum += expf(srow[c] * s.scale - m_new);
      }
    }
    sum = group_sum<TPR>(sum);
    if (m_new != -INFINITY) {
      l_run = (m_run == -INFINITY ? 0.0f : l_run * expf(m_run - m_new)) + sum;
      m_run = m_new;
    }
  }
  if (part == 0 && t.in_tile(r)) {
    float* o = a.ml + (t.out_row(r) * a.n_split + split) * 2;
    o[0] = m_run;
    o[1] = l_run;
  }
}

// lse of the tile's rows from the chunks' statistics (written by the blocks of blockIdx.x == 0),
// then P[row, c] = exp(scale q_r . k_col(c) - lse_r) for kProbeBN output columns.
template <class T, int P>
__global__ void __launch_bounds__(kThreads) probe_probs_kernel(ProbeFwdArgs a) {
  constexpr int BM = kProbeBM, BN = kProbeBN;
  using L = ProbeRowSmem<T, P>;
  const Shape& s = a.s;
  const int c0 = blockIdx.x * BN, bhk = blockIdx.z;
  const int b = bhk / s.Hkv, hk = bhk % s.Hkv;
  ProbeTile<T, L> t(smem_base(), a, b, hk, blockIdx.y);
  const Visibility vis(s, b);
  t.load_rows(nullptr, nullptr);
  if (threadIdx.x < BN) {
    const int c = c0 + threadIdx.x;
    int64_t j = -1;
    if (c < a.C) j = a.cols != nullptr ? a.cols[(int64_t)b * a.C + c] : c;
    t.col[threadIdx.x] = (j >= 0 && j < s.Lk) ? (int)j : -1;
  }
  __syncthreads();
  t.load_q_and_range(vis);
  // gathered K rows (zeros for unused columns)
  const T* k = head_ptr<T>(a.k, a.k_st, b, hk);
  load_tile_rows<BN, P>(t.k, L::ldt, s.D, [&](int n) -> const T* {
    return t.col[n] < 0 ? nullptr : k + (int64_t)t.col[n] * a.k_st.l;
  });
  // lse: TPR threads per row combine the chunks
  constexpr int TPR = kThreads / BM;
  const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
  float mx = -INFINITY;
  const float* ml = t.in_tile(r) ? a.ml + t.out_row(r) * a.n_split * 2 : nullptr;
  if (ml != nullptr)
    for (int sp = part; sp < a.n_split; sp += TPR) mx = fmaxf(mx, ml[2 * sp]);
  mx = group_max<TPR>(mx);
  float sum = 0.0f;
  if (ml != nullptr && mx != -INFINITY)
    for (int sp = part; sp < a.n_split; sp += TPR)
      if (ml[2 * sp] != -INFINITY) sum += ml[2 * sp + 1] * expf(ml[2 * sp] - mx);
  sum = group_sum<TPR>(sum);
  const float lse = sum > 0.0f ? mx + logf(sum) : -INFINITY;
  if (part == 0) {
    t.lse[r] = lse;
    if (blockIdx.x == 0 && t.in_tile(r)) a.lse[t.out_row(r)] = lse;
  }
  __syncthreads();  // Q, K, lse ready
  gemm_nt<BM, BN, P>(t.s, L::lds, t.q, L::ldt, t.k, L::ldt);
  __syncthreads();  // S complete
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int m = e / BN, c = e % BN;
    if (!t.in_tile(m) || c0 + c >= a.C) continue;
    const int i = t.row[m], j = t.col[c];
    const float l = t.lse[m];
    const bool ok = i >= 0 && j >= 0 && l != -INFINITY && vis(i, j);
    a.p[t.out_row(m) * a.C + c0 + c] = ok ? expf(t.s[m * L::lds + c] * s.scale - l) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// backward

// dS[m][c] = E[row, j] - u_row P[row, j] for keys j = n0 + c < j1, else 0 (in place over S, which
// holds the unscaled scores); P is 0 where (row, j) is not visible. Block-wide, no syncs.
template <class T, class L, int BN>
__device__ __forceinline__ void probe_ds(ProbeTile<T, L>& t, const ProbeBwdArgs& a,
                                         const Visibility& vis, int n0, int j1) {
  for (int e = threadIdx.x; e < kProbeBM * BN; e += kThreads) {
    const int m = e / BN, c = e % BN;
    const int i = t.row[m], j = n0 + c;
    float ds = 0.0f;
    if (i >= 0 && j < j1) {
      const float p = vis(i, j) ? expf(t.s[m * L::lds + c] * a.s.scale - t.lse[m]) : 0.0f;
      ds = a.e[t.out_row(m) * a.s.Lk + j] - t.u[m] * p;
    }
    t.s[m * L::lds + c] = ds;
  }
}

// Partial dq of one tile of probe rows over one key chunk: dq_part[split, row] = sum_j dS_rj k_j.
template <class T, int P>
__global__ void __launch_bounds__(kThreads) probe_dq_kernel(ProbeBwdArgs a) {
  constexpr int BM = kProbeBM, BN = kProbeBN;
  constexpr int NACC = BM * P / kThreads;  // accumulator elements per thread
  static_assert(BM * P % kThreads == 0, "accumulator tile must split evenly");
  using L = ProbeRowSmem<T, P>;
  const Shape& s = a.s;
  const int split = blockIdx.x, bhk = blockIdx.z;
  const int b = bhk / s.Hkv, hk = bhk % s.Hkv;
  ProbeTile<T, L> t(smem_base(), a, b, hk, blockIdx.y);
  const Visibility vis(s, b);
  t.load_rows(a.lse, a.u);
  __syncthreads();
  t.load_q_and_range(vis);
  __syncthreads();
  int j0, j1;
  t.chunk(split, &j0, &j1);
  const T* k = head_ptr<T>(a.k, a.k_st, b, hk);
  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
  for (int n0 = j0; n0 < j1; n0 += BN) {
    load_key_tile<BN, P>(t.k, L::ldt, k, a.k_st.l, n0, j1, s.D);
    __syncthreads();  // K ready
    gemm_nt<BM, BN, P>(t.s, L::lds, t.q, L::ldt, t.k, L::ldt);
    __syncthreads();  // S complete
    probe_ds<T, L, BN>(t, a, vis, n0, j1);
    __syncthreads();  // dS complete
#pragma unroll
    for (int i = 0; i < NACC; ++i) {
      const int e = threadIdx.x + i * kThreads;
      const int m = e / P, d = e % P;
      const float* ds = t.s + m * L::lds;
      const T* kc = t.k + d;
      float x = acc[i];
#pragma unroll 8
      for (int c = 0; c < BN; ++c) x = fmaf(ds[c], to_f(kc[c * L::ldt]), x);
      acc[i] = x;
    }
    __syncthreads();  // done with K and dS
  }
  const int64_t base = (int64_t)split * s.B * s.Hq * a.R;
#pragma unroll
  for (int i = 0; i < NACC; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int m = e / P, d = e % P;
    if (t.in_tile(m) && d < s.D) a.dq_part[(base + t.out_row(m)) * s.D + d] = acc[i];
  }
}

// dk of one block of keys: scale * sum over every probe row of the GQA group of dS_rj q_r.
template <class T, int P>
__global__ void __launch_bounds__(kThreads) probe_dk_kernel(ProbeBwdArgs a) {
  constexpr int BM = kProbeBM, BN = probe_dk_bn<P>();
  constexpr int NACC = BN * P / kThreads;
  static_assert(BN * P % kThreads == 0, "accumulator tile must split evenly");
  using L = ProbeDkSmem<T, P>;
  const Shape& s = a.s;
  const int n0 = blockIdx.x * BN, bhk = blockIdx.y;
  const int b = bhk / s.Hkv, hk = bhk % s.Hkv;
  const int G = s.Hq / s.Hkv;
  const Visibility vis(s, b);
  unsigned char* sm = smem_base();
  T* sk = reinterpret_cast<T*>(sm + L::k);
  load_key_tile<BN, P>(sk, L::ldt, head_ptr<T>(a.k, a.k_st, b, hk), a.k_st.l, n0, s.Lk, s.D);
  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
  const int tiles = cdiv(G * a.R, BM);
  for (int tile = 0; tile < tiles; ++tile) {
    ProbeTile<T, L> t(sm, a, b, hk, tile);
    __syncthreads();  // every thread done with the previous tile (and K loaded)
    t.load_rows(a.lse, a.u);
    __syncthreads();
    t.load_q_and_range(vis);
    __syncthreads();  // Q, rows, range ready
    if (t.range[1] <= n0 || t.range[0] >= n0 + BN) continue;  // no row sees these keys
    gemm_nt<BM, BN, P>(t.s, L::lds, t.q, L::ldt, t.k, L::ldt);
    __syncthreads();  // S complete
    probe_ds<T, L, BN>(t, a, vis, n0, s.Lk);
    __syncthreads();  // dS complete
#pragma unroll
    for (int i = 0; i < NACC; ++i) {
      const int e = threadIdx.x + i * kThreads;
      const int n = e / P, d = e % P;
      const T* qd = t.q + d;
      float x = acc[i];
#pragma unroll
      for (int m = 0; m < BM; ++m) x = fmaf(t.s[m * L::lds + n], to_f(qd[m * L::ldt]), x);
      acc[i] = x;
    }
  }
  T* dk = static_cast<T*>(a.dk) + (int64_t)bhk * s.Lk * s.D;
#pragma unroll
  for (int i = 0; i < NACC; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int n = e / P, d = e % P;
    if (n0 + n < s.Lk && d < s.D) dk[(int64_t)(n0 + n) * s.D + d] = from_f<T>(acc[i] * s.scale);
  }
}

// ---------------------------------------------------------------------------------------------
// launchers: check, then launch(kernel, grid, smem_bytes, args) -> error or nullptr

inline const char* check_probe_args(const ProbeArgs& a) {
  if (a.R < 0) return "R must not be negative";
  if (a.n_split < 1) return "n_split must be positive";
  if ((long)a.s.B * a.s.Hkv > 65535) return "B * Hkv must be at most 65535 (CUDA grid limit)";
  const long tiles = ((long)(a.s.Hq / a.s.Hkv) * a.R + kProbeBM - 1) / kProbeBM;
  if (tiles > 65535) return "too many probe rows per key/value head (CUDA grid limit)";
  return nullptr;
}

template <class Launch> const char* run_probe_fwd(const ProbeFwdArgs& a, Launch&& launch) {
  return dispatch(a.dtype, a.s, [&](auto tt, auto pc) -> const char* {
    using T = typename decltype(tt)::type;
    constexpr int P = decltype(pc)::value;
    if (const char* err = check_probe_args(a)) return err;
    if (a.R == 0) return nullptr;
    if (a.C < 1) return "C must be positive";
    const int tiles = cdiv(a.s.Hq / a.s.Hkv * a.R, kProbeBM), bh = a.s.B * a.s.Hkv;
    using L = ProbeRowSmem<T, P>;
    const char* err = launch(&probe_stats_kernel<T, P>, dim3(a.n_split, tiles, bh), L::bytes, a);
    if (err != nullptr) return err;
    return launch(&probe_probs_kernel<T, P>, dim3(cdiv(a.C, kProbeBN), tiles, bh), L::bytes, a);
  });
}

template <class Launch> const char* run_probe_bwd(const ProbeBwdArgs& a, Launch&& launch) {
  return dispatch(a.dtype, a.s, [&](auto tt, auto pc) -> const char* {
    using T = typename decltype(tt)::type;
    constexpr int P = decltype(pc)::value;
    if (const char* err = check_probe_args(a)) return err;
    const int tiles = cdiv(a.s.Hq / a.s.Hkv * a.R, kProbeBM), bh = a.s.B * a.s.Hkv;
    if (a.R > 0) {
      const char* err = launch(&probe_dq_kernel<T, P>, dim3(a.n_split, tiles, bh),
                               ProbeRowSmem<T, P>::bytes, a);
      if (err != nullptr) return err;
    }
    // with R == 0 the dk kernel loops over no tile and writes zeros
    return launch(&probe_dk_kernel<T, P>, dim3(cdiv(a.s.Lk, probe_dk_bn<P>()), bh),
                  ProbeDkSmem<T, P>::bytes, a);
  });
}

}  // namespace abft
