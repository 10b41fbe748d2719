// CUDA entry point of the attention backward (see attention.h and attention_bwd.cuh).
#include "attention_bwd.cuh"
#include "launch.cuh"

namespace abft {

const char* attention_bwd(const BwdArgs& a, void* stream) {
  return run_attention_bwd(a, CudaLaunch{static_cast<cudaStream_t>(stream)});
}

}  // namespace abft
