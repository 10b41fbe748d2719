// CUDA entry point of the probe forward (see probes.h and probes.cuh).
#include "launch.cuh"
#include "probes.cuh"

namespace abft {

const char* probe_fwd(const ProbeFwdArgs& a, void* stream) {
  return run_probe_fwd(a, CudaLaunch{static_cast<cudaStream_t>(stream)});
}

}  // namespace abft
