// Plain C++ interface of the CUDA probe kernels (probes.cuh): the attention probabilities of a
// few query rows ("probe rows") and their backward, for backend="cuda" (every mask: key padding,
// window, causal with Lq < Lk) and for backend="sdpa" where Triton cannot run; PyTorch's SDPA
// gives the output and its gradient (abft_fast/ops/cuda_backend.py). No CUDA or torch headers;
// shared by the CUDA launchers (probes_fwd.cu, probes_bwd.cu), the torch binding (binding.cpp)
// and the CPU emulation (emu/attention_emu.cpp). The semantics are those of kernels/probes.py
// (the Triton version).
//
// Per key/value head hk, the probe rows of its G = Hq / Hkv query heads form M = G x R rows; row
// m is query head hk * G + m / R, probe slot m % R, query position rows[b, m % R] (-1: unused).
// Visibility as in attention.h (causal bottom-right, window, key padding mask).
//
// Forward, two launches:
//   probe_stats_kernel  grid (n_split, cdiv(M, kProbeBM), B * Hkv): partial (max, sum) of
//                       exp(scale q_r . k_j) over the visible keys of one key chunk -> ml;
//   probe_probs_kernel  grid (cdiv(C, kProbeBN), cdiv(M, kProbeBM), B * Hkv): combines the
//                       chunks into lse, then P[r, c] = exp(scale q_r . k_col(c) - lse_r).
// Backward (E = P G scattered to full rows, u_r = sum_c P_rc G_rc; dS_rj = E_rj - u_r P_rj):
//   probe_dq_kernel     grid (n_split, cdiv(M, kProbeBM), B * Hkv): partial dq_r over one key
//                       chunk, sum_j dS_rj k_j -> dq_part (the binding sums the chunks and
//                       multiplies by scale);
//   probe_dk_kernel     grid (cdiv(Lk, BNk), B * Hkv): dk_j = scale sum_r dS_rj q_r for one block
//                       of keys, over every probe row of the group, written in the input dtype.
// O(M * Lk * D) work, O(M * Lk) memory; no L x L, no atomics (deterministic).
#pragma once

#include <stdint.h>

#include "attention.h"

namespace abft {

constexpr int kProbeBM = 16;  // probe rows per tile (a WMMA tile's height)
constexpr int kProbeBN = 64;  // keys per block of the row-side kernels (stats, probs, dq)

// Arguments of both directions. s.Lq, s.Lk, ..., s.kpm as in attention.h (s.D <= kMaxHeadDim).
struct ProbeArgs {
  DType dtype;
  Shape s;
  const void* q; Strides q_st;
  const void* k; Strides k_st;
  const int64_t* rows;  // contiguous [B, R]; -1 = unused slot
  int R;
  int n_split;          // key chunks of the stats and dq kernels (probe_splits)
};

struct ProbeFwdArgs : ProbeArgs {
  const int64_t* cols;  // contiguous [B, C]; -1 = unused; nullptr: every key (C = Lk)
  int C;
  float* ml;            // scratch, contiguous [B, Hq, R, n_split, 2] (max, sum)
  float* p;             // contiguous [B, Hq, R, C]
  float* lse;           // contiguous [B, Hq, R]; -inf on unused slots and rows without a key
};

struct ProbeBwdArgs : ProbeArgs {
  const float* lse;     // contiguous [B, Hq, R] from the forward
  const float* u;       // contiguous [B, Hq, R]
  const float* e;       // contiguous [B, Hq, R, Lk]
  float* dq_part;       // scratch, contiguous [n_split, B, Hq, R, D], unscaled
  void* dk;             // contiguous [B, Hkv, Lk, D], dtype of k
};

// Key chunks for the row-side kernels: enough blocks to fill a large GPU (about 512), at least
// one key block of kProbeBN per chunk.
inline int probe_splits(int B, int Hkv, int G, int R, int Lk) {
  const long m_tiles = (static_cast<long>(G) * R + kProbeBM - 1) / kProbeBM;
  const long kblocks = (static_cast<long>(Lk) + kProbeBN - 1) / kProbeBN;
  const long other = m_tiles * B * Hkv;
  if (other <= 0 || kblocks <= 0) return 1;
  long want = (512 + other - 1) / other;
  if (want > kblocks) want = kblocks;
  if (want > 1024) want = 1024;
  if (want < 1) want = 1;
  const long per = (kblocks + want - 1) / want;
  return static_cast<int>((kblocks + per - 1) / per);
}

// nullptr on success, else a message (see attention.h).
const char* probe_fwd(const ProbeFwdArgs& a, void* stream);
const char* probe_bwd(const ProbeBwdArgs& a, void* stream);

}  // namespace abft
