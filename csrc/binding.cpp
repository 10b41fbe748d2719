// Torch binding of the CUDA attention kernels (attention.h) and probe kernels (probes.h): argument
// checks, output allocation, current-stream launch. Exposes
//   fwd(q, k, v, key_padding_mask, causal, scale, window) -> [out, lse]
//   bwd(dout, q, k, v, out, lse, key_padding_mask, delta_extra, dq_extra, dk_extra,
//       causal, scale, window) -> [dq, dk, dv]
//   probe_fwd(q, k, rows, cols, key_padding_mask, causal, scale, window) -> [probs, lse]
//   probe_bwd(q, k, rows, lse, u, e, key_padding_mask, causal, scale, window) -> [dq_rows, dk]
// with the shapes and meaning of attention.h and probes.h (window <= 0: none). Compiled with
// -DABFT_EMULATION (tests only) it takes CPU tensors and runs the kernels through the CPU emulation
// instead.
#include <torch/extension.h>

#ifndef ABFT_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.h"
#include "probes.h"

namespace {

using at::Tensor;

abft::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return abft::DType::F32;
    case at::kHalf: return abft::DType::F16;
    case at::kBFloat16: return abft::DType::BF16;
    default:
      TORCH_CHECK(false, "abft_fast CUDA attention supports float32, float16 and bfloat16 inputs; "
                         "got ", t.scalar_type());
  }
}

void check_device(const Tensor& t, const char* name, const Tensor& ref) {
#ifdef ABFT_EMULATION
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor (emulation build)");
#else
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
#endif
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but q is on ",
              ref.device());
}

// 4-D tensor of q's dtype and device, with a contiguous last dimension.
Tensor prepare4(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [B, H, L, D], got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type());
  check_device(t, name, q);
  return t.stride(3) == 1 ? t : t.contiguous();
}

abft::Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Optional contiguous float32 tensor of the given shape, or an undefined tensor.
Tensor prepare_f32(const c10::optional<Tensor>& t, const char* name, at::IntArrayRef shape,
                   const Tensor& q) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  check_device(*t, name, q);
  return t->contiguous();
}

const float* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

int to_int(int64_t x, const char* what) {
  TORCH_CHECK(x >= 0 && x <= std::numeric_limits<int>::max(), what, " = ", x, " is too large");
  return static_cast<int>(x);
}

// Shape (and the key padding mask, kept alive in *kpm_keep) from q [B,Hq,Lq,D], k [B,Hkv,Lk,D].
abft::Shape make_shape(const Tensor& q, const Tensor& k, const Tensor& v,
                       const c10::optional<Tensor>& kpm, bool causal, double scale,
                       int64_t window, Tensor* kpm_keep) {
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "k batch size ", k.size(0), " != q batch size ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "k head dim ", k.size(3), " != q head dim ", q.size(3));
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= abft::kMaxHeadDim,
              "abft_fast CUDA attention supports head dims 1..", abft::kMaxHeadDim, ", got ",
              q.size(3));
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "q heads (", q.size(1),
              ") must be a multiple of k/v heads (", k.size(1), ")");
  abft::Shape s;
  s.B = to_int(q.size(0), "B");
  s.Hq = to_int(q.size(1), "Hq");
  s.Hkv = to_int(k.size(1), "Hkv");
  s.Lq = to_int(q.size(2), "Lq");
  s.Lk = to_int(k.size(2), "Lk");
  s.D = to_int(q.size(3), "D");
  s.scale = static_cast<float>(scale);
  s.causal = causal ? 1 : 0;
  s.window = window > 0 ? to_int(window, "window") : 0;
  s.kpm = nullptr;
  s.kpm_stride = 0;
  if (kpm.has_value() && kpm->defined()) {
    const Tensor& m = *kpm;
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte,
                "key_padding_mask must be bool or uint8, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(2),
                "key_padding_mask must have shape [B, Lk] = [", q.size(0), ", ", k.size(2),
                "], got ", m.sizes());
    check_device(m, "key_padding_mask", q);
    *kpm_keep = m.contiguous();
    s.kpm = static_cast<const uint8_t*>(kpm_keep->data_ptr());
    s.kpm_stride = kpm_keep->stride(0);
  }
  return s;
}

// For tests: in the emulation build, or with ABFT_FAST_CUDA_POISON=1 in the environment, outputs
// start as NaN, so an element the kernels never write shows up.
void poison(std::initializer_list<Tensor> ts) {
#ifndef ABFT_EMULATION
  const char* env = std::getenv("ABFT_FAST_CUDA_POISON");
  if (env == nullptr || std::strcmp(env, "1") != 0) return;
#endif
  for (Tensor t : ts) t.fill_(std::numeric_limits<double>::quiet_NaN());  // same storage
}

// The fields of QkvArgs, shared by the forward and backward arguments.
void set_qkv(abft::QkvArgs* a, const abft::Shape& s, const Tensor& q, const Tensor& k,
             const Tensor& v) {
  a->dtype = dtype_of(q);
  a->s = s;
  a->q = q.data_ptr();
  a->q_st = strides_of(q);
  a->k = k.data_ptr();
  a->k_st = strides_of(k);
  a->v = v.data_ptr();
  a->v_st = strides_of(v);
}

void* current_stream() {
#ifdef ABFT_EMULATION
  return nullptr;
#else
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream());
#endif
}

std::vector<Tensor> fwd(Tensor q, Tensor k, Tensor v, c10::optional<Tensor> key_padding_mask,
                        bool causal, double scale, int64_t window) {
  q = prepare4(q, "q", q);
  k = prepare4(k, "k", q);
  v = prepare4(v, "v", q);
  Tensor kpm;
  const abft::Shape s = make_shape(q, k, v, key_padding_mask, causal, scale, window, &kpm);
#ifndef ABFT_EMULATION
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  Tensor out = at::empty({s.B, s.Hq, s.Lq, s.D}, q.options());
  Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(at::kFloat));
  poison({out, lse});
  abft::FwdArgs a;
  set_qkv(&a, s, q, k, v);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  const char* err = abft::attention_fwd(a, current_stream());
  TORCH_CHECK(err == nullptr, "abft_fast CUDA attention forward failed: ", err);
  return {out, lse};
}

std::vector<Tensor> bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                        c10::optional<Tensor> key_padding_mask, c10::optional<Tensor> delta_extra,
                        c10::optional<Tensor> dq_extra, c10::optional<Tensor> dk_extra,
                        bool causal, double scale, int64_t window) {
  q = prepare4(q, "q", q);
  k = prepare4(k, "k", q);
  v = prepare4(v, "v", q);
  out = prepare4(out, "out", q);
  dout = prepare4(dout, "dout", q);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "out ", out.sizes(),
              " and dout ", dout.sizes(), " must have q's shape ", q.sizes());
  Tensor kpm;
  const abft::Shape s = make_shape(q, k, v, key_padding_mask, causal, scale, window, &kpm);
  const Tensor lse_c = prepare_f32(lse, "lse", {s.B, s.Hq, s.Lq}, q);
  const Tensor extra = prepare_f32(delta_extra, "delta_extra", {s.B, s.Hq, s.Lq}, q);
  const Tensor dq_add = prepare_f32(dq_extra, "dq_extra", q.sizes(), q);
  const Tensor dk_add = prepare_f32(dk_extra, "dk_extra", k.sizes(), q);
#ifndef ABFT_EMULATION
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  Tensor delta = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(at::kFloat));
  Tensor dq = at::empty({s.B, s.Hq, s.Lq, s.D}, q.options());
  Tensor dk = at::empty({s.B, s.Hkv, s.Lk, s.D}, q.options());
  Tensor dv = at::empty({s.B, s.Hkv, s.Lk, s.D}, q.options());
  poison({delta, dq, dk, dv});
  abft::BwdArgs a;
  set_qkv(&a, s, q, k, v);
  a.out = out.data_ptr();
  a.out_st = strides_of(out);
  a.dout = dout.data_ptr();
  a.dout_st = strides_of(dout);
  a.lse = lse_c.data_ptr<float>();
  a.delta_extra = ptr_or_null(extra);
  a.dq_extra = ptr_or_null(dq_add);
  a.dk_extra = ptr_or_null(dk_add);
  a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  const char* err = abft::attention_bwd(a, current_stream());
  TORCH_CHECK(err == nullptr, "abft_fast CUDA attention backward failed: ", err);
  return {dq, dk, dv};
}

// Probe rows [B, R] (or columns [B, C]) as a contiguous int64 tensor on q's device.
Tensor prepare_index(const Tensor& t, const char* name, int64_t batch, const Tensor& q) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch, name, " must have shape [B, n] with B = ", batch,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  check_device(t, name, q);
  return t.contiguous();
}

// The fields of ProbeArgs (rows: the contiguous int64 probe rows, kept alive by the caller).
void set_probe(abft::ProbeArgs* a, const abft::Shape& s, const Tensor& q, const Tensor& k,
               const Tensor& rows) {
  a->dtype = dtype_of(q);
  a->s = s;
  a->q = q.data_ptr();
  a->q_st = strides_of(q);
  a->k = k.data_ptr();
  a->k_st = strides_of(k);
  a->rows = rows.data_ptr<int64_t>();
  a->R = to_int(rows.size(1), "R");
  a->n_split = abft::probe_splits(s.B, s.Hkv, s.Hq / s.Hkv, a->R, s.Lk);
}

std::vector<Tensor> probe_fwd(Tensor q, Tensor k, Tensor rows, c10::optional<Tensor> cols,
                              c10::optional<Tensor> key_padding_mask, bool causal, double scale,
                              int64_t window) {
  q = prepare4(q, "q", q);
  k = prepare4(k, "k", q);
  Tensor kpm;
  const abft::Shape s = make_shape(q, k, k, key_padding_mask, causal, scale, window, &kpm);
  rows = prepare_index(rows, "probe_rows", s.B, q);
  Tensor cols_c;
  if (cols.has_value() && cols->defined()) cols_c = prepare_index(*cols, "probe_cols", s.B, q);
#ifndef ABFT_EMULATION
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  abft::ProbeFwdArgs a;
  set_probe(&a, s, q, k, rows);
  a.cols = cols_c.defined() ? cols_c.data_ptr<int64_t>() : nullptr;
  a.C = cols_c.defined() ? to_int(cols_c.size(1), "C") : s.Lk;
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor p = at::empty({s.B, s.Hq, a.R, a.C}, f32);
  Tensor lse = at::empty({s.B, s.Hq, a.R}, f32);
  if (a.R == 0) return {p, lse};
  if (a.C == 0) return {p, lse.fill_(-std::numeric_limits<double>::infinity())};
  Tensor ml = at::empty({s.B, s.Hq, a.R, a.n_split, 2}, f32);
  poison({p, lse, ml});
  a.ml = ml.data_ptr<float>();
  a.p = p.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  const char* err = abft::probe_fwd(a, current_stream());
  TORCH_CHECK(err == nullptr, "abft_fast CUDA probe forward failed: ", err);
  return {p, lse};
}

std::vector<Tensor> probe_bwd(Tensor q, Tensor k, Tensor rows, Tensor lse, Tensor u, Tensor e,
                              c10::optional<Tensor> key_padding_mask, bool causal, double scale,
                              int64_t window) {
  q = prepare4(q, "q", q);
  k = prepare4(k, "k", q);
  Tensor kpm;
  const abft::Shape s = make_shape(q, k, k, key_padding_mask, causal, scale, window, &kpm);
  rows = prepare_index(rows, "probe_rows", s.B, q);
  const int64_t R = rows.size(1);
  const Tensor lse_c = prepare_f32(lse, "lse", {s.B, s.Hq, R}, q);
  const Tensor u_c = prepare_f32(u, "u", {s.B, s.Hq, R}, q);
  const Tensor e_c = prepare_f32(e, "e", {s.B, s.Hq, R, s.Lk}, q);
#ifndef ABFT_EMULATION
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  abft::ProbeBwdArgs a;
  set_probe(&a, s, q, k, rows);
  Tensor dk = at::empty({s.B, s.Hkv, s.Lk, s.D}, k.options());
  Tensor dq_part = at::empty({a.n_split, s.B, s.Hq, R, s.D}, q.options().dtype(at::kFloat));
  poison({dk, dq_part});
  a.lse = lse_c.data_ptr<float>();
  a.u = u_c.data_ptr<float>();
  a.e = e_c.data_ptr<float>();
  a.dq_part = dq_part.data_ptr<float>();
  a.dk = dk.data_ptr();
  const char* err = abft::probe_bwd(a, current_stream());
  TORCH_CHECK(err == nullptr, "abft_fast CUDA probe backward failed: ", err);
  Tensor dq = a.n_split == 1 ? dq_part[0] : dq_part.sum(0);
  return {dq.mul_(scale), dk};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "abft_fast CUDA attention kernels (forward: out, lse; backward: dq, dk, dv) and probe "
            "kernels (probe_fwd: probs, lse; probe_bwd: dq of the probe rows, dk)";
  m.def("fwd", &fwd, "attention forward -> [out, lse]", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"), py::arg("window"));
  m.def("bwd", &bwd, "attention backward -> [dq, dk, dv]", py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("key_padding_mask"),
        py::arg("delta_extra"), py::arg("dq_extra"), py::arg("dk_extra"), py::arg("causal"),
        py::arg("scale"), py::arg("window"));
  m.def("probe_fwd", &probe_fwd, "probe rows forward -> [probs, lse]", py::arg("q"),
        py::arg("k"), py::arg("rows"), py::arg("cols"), py::arg("key_padding_mask"),
        py::arg("causal"), py::arg("scale"), py::arg("window"));
  m.def("probe_bwd", &probe_bwd, "probe rows backward -> [dq_rows (float32), dk]", py::arg("q"),
        py::arg("k"), py::arg("rows"), py::arg("lse"), py::arg("u"), py::arg("e"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"), py::arg("window"));
}
