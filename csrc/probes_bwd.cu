// CUDA entry point of the probe backward (see probes.h and probes.cuh).
#include "launch.cuh"
#include "probes.cuh"

namespace abft {

const char* probe_bwd(const ProbeBwdArgs& a, void* stream) {
  return run_probe_bwd(a, CudaLaunch{static_cast<cudaStream_t>(stream)});
}

}  // namespace abft
