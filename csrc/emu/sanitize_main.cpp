// Runs the emulated kernels (attention_emu.cpp: attention and probe kernels) over every dtype and
// head-dim bucket, on shapes that span several tiles, so that a sanitizer build can look for
// shared-memory overruns (AddressSanitizer) and missing __syncthreads() (ThreadSanitizer: with
// ABFT_EMU_THREADS every CUDA thread is a std::thread, so a missing barrier is a data race). Values
// are not checked here; the pytest suite does that. Build and run (a few minutes under
// ThreadSanitizer):
//
//   g++ -std=c++17 -O1 -g -fsanitize=thread -DABFT_EMULATION -DABFT_EMU_THREADS -pthread
//       -Wno-unknown-pragmas csrc/emu/sanitize_main.cpp csrc/emu/attention_emu.cpp -o /tmp/tsan
//   /tmp/tsan        (likewise with -fsanitize=address,undefined)
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vector>

#include "../attention.h"
#include "../probes.h"
#include "cuda_emu.h"

namespace {

uint32_t g_state = 12345u;

float next_uniform() {  // in [-1, 1)
  g_state = g_state * 1664525u + 1013904223u;
  return (g_state >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

// n random values in [-1, 1) of the given dtype.
void fill(std::vector<unsigned char>& buf, size_t n, int es, int dtype) {
  buf.resize(n * es);
  for (size_t i = 0; i < n; ++i) {
    const float x = next_uniform();
    if (dtype == static_cast<int>(abft::DType::F32)) {
      memcpy(&buf[i * es], &x, 4);
    } else if (dtype == static_cast<int>(abft::DType::F16)) {
      const __half h = __float2half_rn(x);
      memcpy(&buf[i * es], &h, 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(x);
      memcpy(&buf[i * es], &h, 2);
    }
  }
}

int run(int dtype, int D, int L, int window, bool use_kpm) {
  const int B = 1, Hq = 2, Hkv = 1;
  const int es = dtype == 0 ? 4 : 2;
  const size_t nq = (size_t)B * Hq * L * D, nk = (size_t)B * Hkv * L * D;
  std::vector<unsigned char> q, k, v, dout;
  fill(q, nq, es, dtype);
  fill(k, nk, es, dtype);
  fill(v, nk, es, dtype);
  fill(dout, nq, es, dtype);
  std::vector<unsigned char> out(nq * es), dq(nq * es), dk(nk * es), dv(nk * es);
  std::vector<float> lse((size_t)B * Hq * L), delta(lse.size());
  std::vector<uint8_t> kpm((size_t)B * L, 1);
  for (int j = 0; j < L / 5; ++j) kpm[j] = 0;  // left padding
  abft::Shape s{B, Hq, Hkv, L, L, D, 0.125f, 1, window, use_kpm ? kpm.data() : nullptr, L};
  const abft::Strides qs{(int64_t)Hq * L * D, (int64_t)L * D, D};
  const abft::Strides ks{(int64_t)Hkv * L * D, (int64_t)L * D, D};
  abft::FwdArgs f{static_cast<abft::DType>(dtype), s, q.data(), qs, k.data(), ks, v.data(), ks,
                  out.data(), lse.data()};
  const char* err = abft::attention_fwd(f, nullptr);
  if (err) {
    printf("fwd dtype %d D %d L %d: %s\n", dtype, D, L, err);
    return 1;
  }
  abft::BwdArgs b{static_cast<abft::DType>(dtype), s, q.data(), qs, k.data(), ks, v.data(), ks,
                  out.data(), qs, dout.data(), qs, lse.data(), nullptr, nullptr, nullptr,
                  delta.data(), dq.data(), dk.data(), dv.data()};
  err = abft::attention_bwd(b, nullptr);
  if (err) {
    printf("bwd dtype %d D %d L %d: %s\n", dtype, D, L, err);
    return 1;
  }
  return 0;
}

// The probe kernels (probes.h) on 2 query heads / 1 key-value head, 3 probe slots (one unused),
// 4 probe columns (one unused) or full rows.
int run_probes(int dtype, int D, int Lq, int L, int window, bool use_kpm, bool full) {
  const int B = 1, Hq = 2, Hkv = 1, R = 3, C = full ? L : 4;
  const int es = dtype == 0 ? 4 : 2;
  const size_t nq = (size_t)B * Hq * Lq * D, nk = (size_t)B * Hkv * L * D;
  std::vector<unsigned char> q, k, dk(nk * es);
  fill(q, nq, es, dtype);
  fill(k, nk, es, dtype);
  std::vector<uint8_t> kpm((size_t)B * L, 1);
  for (int j = 0; j < L / 5; ++j) kpm[j] = 0;  // left padding
  std::vector<int64_t> rows = {Lq - 1, Lq / 3, -1}, cols = {0, L / 2, -1, L - 1};
  abft::Shape s{B, Hq, Hkv, Lq, L, D, 0.125f, 1, window, use_kpm ? kpm.data() : nullptr, L};
  const abft::Strides qs{(int64_t)Hq * Lq * D, (int64_t)Lq * D, D};
  const abft::Strides ks{(int64_t)Hkv * L * D, (int64_t)L * D, D};
  const int n_split = abft::probe_splits(B, Hkv, Hq / Hkv, R, L);
  std::vector<float> ml((size_t)B * Hq * R * n_split * 2), p((size_t)B * Hq * R * C);
  std::vector<float> lse((size_t)B * Hq * R), u(lse.size(), 0.5f), e((size_t)B * Hq * R * L);
  std::vector<float> dq_part((size_t)n_split * B * Hq * R * D);
  abft::ProbeFwdArgs f;
  f.dtype = static_cast<abft::DType>(dtype);
  f.s = s;
  f.q = q.data();
  f.q_st = qs;
  f.k = k.data();
  f.k_st = ks;
  f.rows = rows.data();
  f.R = R;
  f.n_split = n_split;
  f.cols = full ? nullptr : cols.data();
  f.C = C;
  f.ml = ml.data();
  f.p = p.data();
  f.lse = lse.data();
  const char* err = abft::probe_fwd(f, nullptr);
  if (err) {
    printf("probe fwd dtype %d D %d L %d: %s\n", dtype, D, L, err);
    return 1;
  }
  for (size_t i = 0; i < e.size(); ++i) e[i] = 0.01f * (float)(i % 7);
  abft::ProbeBwdArgs b;
  static_cast<abft::ProbeArgs&>(b) = f;
  b.lse = lse.data();
  b.u = u.data();
  b.e = e.data();
  b.dq_part = dq_part.data();
  b.dk = dk.data();
  err = abft::probe_bwd(b, nullptr);
  if (err) {
    printf("probe bwd dtype %d D %d L %d: %s\n", dtype, D, L, err);
    return 1;
  }
  return 0;
}

}  // namespace

int main() {
  int failures = 0;
  for (int dtype = 0; dtype < 3; ++dtype)
    for (int D : {16, 32, 64, 100, 256}) {
      failures += run(dtype, D, 150, 0, true);
      failures += run(dtype, D, 97, 40, false);
      failures += run_probes(dtype, D, 150, 150, 0, true, false);
      failures += run_probes(dtype, D, 40, 200, 0, false, true);
      failures += run_probes(dtype, D, 97, 97, 40, false, false);
    }
  printf("%s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
