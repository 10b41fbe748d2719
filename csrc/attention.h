// Plain C++ interface of the CUDA attention kernels (no CUDA or torch headers), shared by the
// CUDA launchers (attention_fwd.cu, attention_bwd.cu), the torch binding (binding.cpp) and the
// CPU emulation used by the tests (emu/attention_emu.cpp).
//
// Layout: q, out, dout, dq are [B, Hq, Lq, D]; k, v, dk, dv are [B, Hkv, Lk, D]; the last dimension
// is contiguous, the other three are addressed through the element strides below. lse, delta and
// delta_extra are contiguous float32 [B, Hq, Lq]; dq_extra [B, Hq, Lq, D] and dk_extra
// [B, Hkv, Lk, D] are contiguous float32. The outputs out, lse, dq, dk, dv are contiguous.
//
// Visibility (abft_fast/masks.py): query i sits at position i + (Lk - Lq); key j is visible iff
// kpm[b, j] (when kpm != nullptr), j <= i + Lk - Lq (when causal) and j > i + Lk - Lq - window
// (when window > 0). Query head h reads key/value head h / (Hq / Hkv).
#pragma once

#include <stdint.h>

namespace abft {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

constexpr int kMaxHeadDim = 256;

struct Strides {
  int64_t b, h, l;  // element strides of the batch, head and sequence dimensions
};

struct Shape {
  int B, Hq, Hkv, Lq, Lk, D;
  float scale;
  int causal;             // 0 or 1
  int window;             // <= 0: no sliding window
  const uint8_t* kpm;     // [B, Lk] bytes (nonzero = real key), row stride kpm_stride; or nullptr
  int64_t kpm_stride;
};

// What both directions read: the dtype, the shape and the inputs q, k, v.
struct QkvArgs {
  DType dtype;
  Shape s;
  const void* q; Strides q_st;
  const void* k; Strides k_st;
  const void* v; Strides v_st;
};

// Forward: out (dtype of q) and lse = log sum_j exp(scale q.k_j) over visible keys (natural log;
// -inf on rows without a visible key, whose out is 0).
struct FwdArgs : QkvArgs {
  void* out;     // contiguous [B, Hq, Lq, D]
  float* lse;    // contiguous [B, Hq, Lq]
};

// Backward of out = softmax(scale q k^T) v, with delta_r = sum_d dout_rd out_rd + delta_extra_r.
// Writes dq = dq_flash + dq_extra, dk = dk_flash + dk_extra (dk, dv summed over the GQA group),
// dv = dv_flash, all in the input dtype (accumulated in float32). delta is float32 scratch.
struct BwdArgs : QkvArgs {
  const void* out; Strides out_st;
  const void* dout; Strides dout_st;
  const float* lse;          // contiguous [B, Hq, Lq]
  const float* delta_extra;  // contiguous [B, Hq, Lq] or nullptr
  const float* dq_extra;     // contiguous [B, Hq, Lq, D] or nullptr
  const float* dk_extra;     // contiguous [B, Hkv, Lk, D] or nullptr
  float* delta;              // scratch, contiguous [B, Hq, Lq]
  void* dq;                  // contiguous outputs
  void* dk;
  void* dv;
};

// Both return nullptr on success, else a message saying what went wrong (a static string, or a
// CUDA error string). `stream` is a cudaStream_t (nullptr: the default stream).
const char* attention_fwd(const FwdArgs& a, void* stream);
const char* attention_bwd(const BwdArgs& a, void* stream);

}  // namespace abft
