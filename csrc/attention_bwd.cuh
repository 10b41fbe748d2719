// Backward kernels. With P = exp(scale q.k - lse) (0 where masked), dP = dO V^T and
// delta_r = sum_d dO_rd O_rd + delta_extra_r:
//   dS = P * (dP - delta),  dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K.
// Three launches, no atomics (deterministic):
//   attention_delta_kernel: delta [B, Hq, Lq];
//   attention_dkdv_kernel:  grid (cdiv(Lk, BN), Hkv, B); a block owns BN keys of one key/value
//     head, loops over the query heads of its GQA group and their visible query tiles, and sums
//     dK, dV in shared memory;
//   attention_dq_kernel:    grid (cdiv(Lq, BM), Hq, B); a block owns BM query rows and loops over
//     their visible key tiles.
#pragma once

#include "attention_common.cuh"

namespace abft {

template <class T, int P> using DkvCfg = TileCfg<T, P, DkvSmem>;
template <class T, int P> using DqCfg = TileCfg<T, P, DqSmem>;

constexpr int kDeltaRowsPerWarp = 8;
constexpr int kDeltaRows = kWarps * kDeltaRowsPerWarp;  // rows per block of the delta kernel

// delta[row] = sum_d dout[row, d] * out[row, d] + (delta_extra ? delta_extra[row] : 0);
// a warp per row at a time, lanes over d.
template <class T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(BwdArgs a) {
  const Shape& s = a.s;
  const int lane = threadIdx.x % 32;
  const int64_t nrows = (int64_t)s.B * s.Hq * s.Lq;
  const int64_t first = (int64_t)blockIdx.x * kDeltaRows + (threadIdx.x / 32) * kDeltaRowsPerWarp;
  for (int64_t row = first; row < first + kDeltaRowsPerWarp && row < nrows; ++row) {  // flat b,h,i
    const int i = (int)(row % s.Lq);
    const int64_t bh = row / s.Lq;
    const int h = (int)(bh % s.Hq), b = (int)(bh / s.Hq);
    const T* o = head_ptr<T>(a.out, a.out_st, b, h) + i * a.out_st.l;
    const T* g = head_ptr<T>(a.dout, a.dout_st, b, h) + i * a.dout_st.l;
    float acc = 0.0f;
    for (int d = lane; d < s.D; d += 32) acc = fmaf(to_f(o[d]), to_f(g[d]), acc);
    acc = group_sum<32>(acc);
    if (lane == 0) a.delta[row] = acc + (a.delta_extra != nullptr ? a.delta_extra[row] : 0.0f);
  }
}

// The shared-memory buffers that both backward kernels have, at the offsets of layout L (DkvSmem
// or DqSmem): Q, dO [BM][ldt], K, V [BN][ldt], S, dP [BM][lds], dS [BM][ldp], lse, delta [BM].
template <class T, class L> struct BwdTiles {
  T *q, *dout, *k, *v;
  float *s, *dp;
  T* ds;
  float *lse, *delta;

  __device__ __forceinline__ explicit BwdTiles(unsigned char* sm)
      : q(reinterpret_cast<T*>(sm + L::q)), dout(reinterpret_cast<T*>(sm + L::dout)),
        k(reinterpret_cast<T*>(sm + L::k)), v(reinterpret_cast<T*>(sm + L::v)),
        s(reinterpret_cast<float*>(sm + L::s)), dp(reinterpret_cast<float*>(sm + L::dp)),
        ds(reinterpret_cast<T*>(sm + L::ds)), lse(reinterpret_cast<float*>(sm + L::lse)),
        delta(reinterpret_cast<float*>(sm + L::delta)) {}
};

// Shared by both kernels, for query rows m0.. and keys n0.. (Q, dO, K, V, lse, delta ready in sm):
// S = Q K^T and dP = dO V^T, then P (into sP, unless nullptr) and dS = P (dP - delta) (into sm.ds)
// as T. The caller puts __syncthreads() after it, before P or dS are read.
template <int BM, int BN, int P, class T, class L>
__device__ __forceinline__ void probs_and_dscores(const BwdTiles<T, L>& sm, const Visibility& vis,
                                                  float scale, int m0, int n0, T* sP) {
  constexpr int lds = L::lds, ldp = L::ldp;
  gemm_nt<BM, BN, P>(sm.s, lds, sm.q, L::ldt, sm.k, L::ldt);
  gemm_nt<BM, BN, P>(sm.dp, lds, sm.dout, L::ldt, sm.v, L::ldt);
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const float lse = sm.lse[r];
    // lse = -inf: a row with no visible key (or a padding row), whose P is 0
    const float p = (lse != -INFINITY && vis(m0 + r, n0 + c))
                        ? expf(sm.s[r * lds + c] * scale - lse) : 0.0f;
    const float ds = p * (sm.dp[r * lds + c] - sm.delta[r]);
    if (sP != nullptr) sP[r * ldp + c] = from_f<T>(p);  // fp32: may overwrite S[r][c] in place
    sm.ds[r * ldp + c] = from_f<T>(ds);                  // fp32: may overwrite dP[r][c] in place
  }
}

// lse / delta rows m0.. of head (b, h) into smem; rows >= Lq get lse = -inf (P = 0) and delta 0.
template <int BM>
__device__ __forceinline__ void load_row_stats(float* sLse, float* sDelta, const BwdArgs& a,
                                               int64_t row_base, int m0) {
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const bool ok = m0 + r < a.s.Lq;
    sLse[r] = ok ? a.lse[row_base + m0 + r] : -INFINITY;
    sDelta[r] = ok ? a.delta[row_base + m0 + r] : 0.0f;
  }
}

template <class T, int P>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(BwdArgs a) {
  constexpr int BM = DkvCfg<T, P>::BM, BN = DkvCfg<T, P>::BN;
  using L = typename DkvCfg<T, P>::Smem;
  const Shape& s = a.s;
  const int n0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int group = s.Hq / s.Hkv;
  const Visibility vis(s, b);

  unsigned char* smem = smem_base();
  const BwdTiles<T, L> sm(smem);  // and this kernel's own dK, dV, P:
  float* sdK = reinterpret_cast<float*>(smem + L::dk);
  float* sdV = reinterpret_cast<float*>(smem + L::dv);
  T* sP = reinterpret_cast<T*>(smem + L::p);

  load_tile<BN, P>(sm.k, L::ldt, head_ptr<T>(a.k, a.k_st, b, hk), a.k_st.l, n0, s.Lk, s.D);
  load_tile<BN, P>(sm.v, L::ldt, head_ptr<T>(a.v, a.v_st, b, hk), a.v_st.l, n0, s.Lk, s.D);
  zero_acc<BN, P>(sdK, L::lda);
  zero_acc<BN, P>(sdV, L::lda);

  int i0, i1;
  vis.query_range(n0, min(n0 + BN, s.Lk), &i0, &i1);
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const T* q = head_ptr<T>(a.q, a.q_st, b, h);
    const T* dout = head_ptr<T>(a.dout, a.dout_st, b, h);
    const int64_t row_base = ((int64_t)b * s.Hq + h) * s.Lq;
    for (int m0 = i0; m0 < i1; m0 += BM) {
      load_tile<BM, P>(sm.q, L::ldt, q, a.q_st.l, m0, s.Lq, s.D);
      load_tile<BM, P>(sm.dout, L::ldt, dout, a.dout_st.l, m0, s.Lq, s.D);
      load_row_stats<BM>(sm.lse, sm.delta, a, row_base, m0);
      __syncthreads();  // Q, dO, stats (and K, V, zeroed dK, dV) ready
      probs_and_dscores<BM, BN, P>(sm, vis, s.scale, m0, n0, sP);
      __syncthreads();
      gemm_tn_acc<BN, P, BM>(sdV, L::lda, sP, L::ldp, sm.dout, L::ldt);  // dV += P^T dO
      gemm_tn_acc<BN, P, BM>(sdK, L::lda, sm.ds, L::ldp, sm.q, L::ldt);  // dK += dS^T Q
      __syncthreads();  // before the next tile overwrites Q, dO, P, dS
    }
  }
  __syncthreads();  // no query tile at all: zeroed dK, dV written by other threads
  const int64_t kv_base = ((int64_t)b * s.Hkv + hk) * s.Lk * s.D;
  store_rows<BN, P>(static_cast<T*>(a.dk) + kv_base, sdK, L::lda, s.scale,
                    a.dk_extra ? a.dk_extra + kv_base : nullptr, n0, s.Lk, s.D);
  store_rows<BN, P>(static_cast<T*>(a.dv) + kv_base, sdV, L::lda, 1.0f, nullptr, n0, s.Lk, s.D);
}

template <class T, int P>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(BwdArgs a) {
  constexpr int BM = DqCfg<T, P>::BM, BN = DqCfg<T, P>::BN;
  using L = typename DqCfg<T, P>::Smem;
  const Shape& s = a.s;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (s.Hq / s.Hkv);
  const Visibility vis(s, b);

  unsigned char* smem = smem_base();
  const BwdTiles<T, L> sm(smem);  // and this kernel's own dQ:
  float* sdQ = reinterpret_cast<float*>(smem + L::dq);

  const T* k = head_ptr<T>(a.k, a.k_st, b, hk);
  const T* v = head_ptr<T>(a.v, a.v_st, b, hk);
  const int64_t row_base = ((int64_t)b * s.Hq + h) * s.Lq;
  load_tile<BM, P>(sm.q, L::ldt, head_ptr<T>(a.q, a.q_st, b, h), a.q_st.l, m0, s.Lq, s.D);
  load_tile<BM, P>(sm.dout, L::ldt, head_ptr<T>(a.dout, a.dout_st, b, h), a.dout_st.l, m0, s.Lq,
                   s.D);
  load_row_stats<BM>(sm.lse, sm.delta, a, row_base, m0);
  zero_acc<BM, P>(sdQ, L::lda);

  int j0, j1;
  vis.key_range(m0, min(m0 + BM, s.Lq), &j0, &j1);
  for (int n0 = j0; n0 < j1; n0 += BN) {
    load_tile<BN, P>(sm.k, L::ldt, k, a.k_st.l, n0, s.Lk, s.D);
    load_tile<BN, P>(sm.v, L::ldt, v, a.v_st.l, n0, s.Lk, s.D);
    __syncthreads();  // K, V (and Q, dO, stats, zeroed dQ) ready
    probs_and_dscores<BM, BN, P>(sm, vis, s.scale, m0, n0, static_cast<T*>(nullptr));
    __syncthreads();
    gemm_nn_acc<BM, P, BN>(sdQ, L::lda, sm.ds, L::ldp, sm.k, L::ldt);  // dQ += dS K
    __syncthreads();  // before the next tile overwrites K, V, dS
  }
  __syncthreads();
  store_rows<BM, P>(static_cast<T*>(a.dq) + row_base * s.D, sdQ, L::lda, s.scale,
                    a.dq_extra ? a.dq_extra + row_base * s.D : nullptr, m0, s.Lq, s.D);
}

}  // namespace abft

namespace abft {

// Checks the arguments and calls launch(kernel, grid, smem_bytes, args) -> error or nullptr for
// the delta, dk / dv and dq kernels in turn.
template <class Launch> const char* run_attention_bwd(const BwdArgs& a, Launch&& launch) {
  return dispatch(a.dtype, a.s, [&](auto tt, auto pc) -> const char* {
    using T = typename decltype(tt)::type;
    constexpr int P = decltype(pc)::value;
    const int64_t rows = (int64_t)a.s.B * a.s.Hq * a.s.Lq;
    if (rows / kDeltaRows >= 0x7fffffff) return "B * Hq * Lq is too large";
    const char* err = launch(&attention_delta_kernel<T>,
                             dim3((unsigned)((rows + kDeltaRows - 1) / kDeltaRows)), 0, a);
    if (err) return err;
    using Ckv = DkvCfg<T, P>;
    err = launch(&attention_dkdv_kernel<T, P>, dim3(cdiv(a.s.Lk, Ckv::BN), a.s.Hkv, a.s.B),
                 Ckv::Smem::bytes, a);
    if (err) return err;
    using Cq = DqCfg<T, P>;
    return launch(&attention_dq_kernel<T, P>, dim3(cdiv(a.s.Lq, Cq::BM), a.s.Hq, a.s.B),
                  Cq::Smem::bytes, a);
  });
}

}  // namespace abft
