// CUDA entry point of the attention forward (see attention.h and attention_fwd.cuh).
#include "attention_fwd.cuh"
#include "launch.cuh"

namespace abft {

const char* attention_fwd(const FwdArgs& a, void* stream) {
  return run_attention_fwd(a, CudaLaunch{static_cast<cudaStream_t>(stream)});
}

}  // namespace abft
