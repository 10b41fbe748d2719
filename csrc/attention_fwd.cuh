// Forward kernel: flash attention with online softmax, writing out and lse (natural log).
//
// Grid (cdiv(Lq, BM), Hq, B); block = kThreads threads; one block owns BM query rows of one head
// and walks the key tiles that those rows can see (causal / window ranges skip the rest). Each row
// has kThreads / BM threads, which keep its running max m and sum l in registers. Per key tile:
//   K -> smem; S = Q K^T; V -> smem (same buffer) while the row threads turn S into
//   P = exp(s - m_new) and rescale their O row by exp(m_old - m_new); O += P V.
// Rows with no visible key end with l = 0: out = 0, lse = -inf.
#pragma once

#include "attention_common.cuh"

namespace abft {

template <class T, int P> using FwdCfg = TileCfg<T, P, FwdSmem>;

template <class T, int P>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(FwdArgs a) {
  constexpr int BM = FwdCfg<T, P>::BM, BN = FwdCfg<T, P>::BN;
  using L = typename FwdCfg<T, P>::Smem;
  const Shape& s = a.s;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (s.Hq / s.Hkv);
  const int tid = threadIdx.x;
  const Visibility vis(s, b);

  unsigned char* sm = smem_base();
  T* sQ = reinterpret_cast<T*>(sm + L::q);
  T* sKV = reinterpret_cast<T*>(sm + L::kv);
  float* sO = reinterpret_cast<float*>(sm + L::o);
  float* sS = reinterpret_cast<float*>(sm + L::s);
  T* sP = reinterpret_cast<T*>(sm + L::p);
  float* sInvL = reinterpret_cast<float*>(sm + L::stat);
  float* sLse = sInvL + BM;

  const T* q = head_ptr<T>(a.q, a.q_st, b, h);
  const T* k = head_ptr<T>(a.k, a.k_st, b, hk);
  const T* v = head_ptr<T>(a.v, a.v_st, b, hk);

  load_tile<BM, P>(sQ, L::ldt, q, a.q_st.l, m0, s.Lq, s.D);
  zero_acc<BM, P>(sO, L::ldo);
  // Softmax work: TPR consecutive threads (lanes of one warp) per row, thread `part` of row r
  // taking columns part, part + TPR, ...; each keeps identical copies of the row's running max
  // m_run and sum l_run.
  constexpr int TPR = kThreads / BM;
  static_assert(kThreads % BM == 0 && TPR <= 32, "a row's threads must lie in one warp");
  const int r = tid / TPR, part = tid % TPR;
  float m_run = -INFINITY, l_run = 0.0f;

  int j0, j1;
  vis.key_range(m0, min(m0 + BM, s.Lq), &j0, &j1);
  for (int n0 = j0; n0 < j1; n0 += BN) {
    load_tile<BN, P>(sKV, L::ldt, k, a.k_st.l, n0, s.Lk, s.D);
    __syncthreads();  // Q, K (and at n0 == j0 the zeroed O) ready
    gemm_nt<BM, BN, P>(sS, L::lds, sQ, L::ldt, sKV, L::ldt);
    __syncthreads();  // S complete, K no longer read
    load_tile<BN, P>(sKV, L::ldt, v, a.v_st.l, n0, s.Lk, s.D);
    float* srow = sS + r * L::lds;
    float mx = -INFINITY;
    for (int c = part; c < BN; c += TPR) {
      const float x = vis(m0 + r, n0 + c) ? srow[c] * s.scale : -INFINITY;
      srow[c] = x;
      mx = fmaxf(mx, x);
    }
    mx = group_max<TPR>(mx);
    const float m_new = fmaxf(m_run, mx);
    // all of the row masked so far: keep P = 0 and O untouched (alpha = 1)
    const float alpha = m_new == -INFINITY ? 1.0f : expf(m_run - m_new);
    float sum = 0.0f;
    T* prow = sP + r * L::ldp;
    for (int c = part; c < BN; c += TPR) {
      const float x = srow[c];
      const float pv = x == -INFINITY ? 0.0f : expf(x - m_new);
      sum += pv;
      prow[c] = from_f<T>(pv);  // fp32: overwrites S in place (same element, same thread)
    }
    l_run = l_run * alpha + group_sum<TPR>(sum);
    m_run = m_new;
    if (alpha != 1.0f) {  // the same in the row's TPR threads
      float* orow = sO + r * L::ldo;
      for (int d = part; d < P; d += TPR) orow[d] *= alpha;
    }
    __syncthreads();  // P, rescaled O and V ready
    gemm_nn_acc<BM, P, BN>(sO, L::ldo, sP, L::ldp, sKV, L::ldt);
    __syncthreads();  // O updated; sKV and sP free for the next tile
  }

  if (part == 0) {
    const bool has = l_run > 0.0f;
    sInvL[r] = has ? 1.0f / l_run : 0.0f;
    sLse[r] = has ? m_run + logf(l_run) : -INFINITY;
  }
  __syncthreads();
  const int64_t row_base = ((int64_t)b * s.Hq + h) * s.Lq;
  T* out = static_cast<T*>(a.out) + row_base * s.D;
  for (int e = tid; e < BM * s.D; e += kThreads) {
    const int row = e / s.D, d = e % s.D;
    if (m0 + row < s.Lq)
      out[(int64_t)(m0 + row) * s.D + d] = from_f<T>(sO[row * L::ldo + d] * sInvL[row]);
  }
  if (tid < BM && m0 + tid < s.Lq) a.lse[row_base + m0 + tid] = sLse[tid];  // tid as a row
}

}  // namespace abft

namespace abft {

// Checks the arguments and calls launch(kernel, grid, smem_bytes, args) -> error or nullptr.
template <class Launch> const char* run_attention_fwd(const FwdArgs& a, Launch&& launch) {
  return dispatch(a.dtype, a.s, [&](auto tt, auto pc) -> const char* {
    using T = typename decltype(tt)::type;
    constexpr int P = decltype(pc)::value;
    using C = FwdCfg<T, P>;
    return launch(&attention_fwd_kernel<T, P>, dim3(cdiv(a.s.Lq, C::BM), a.s.Hq, a.s.B),
                  C::Smem::bytes, a);
  });
}

}  // namespace abft
