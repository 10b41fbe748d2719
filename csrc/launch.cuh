// Kernel launch on a CUDA stream, shared by attention_fwd.cu and attention_bwd.cu.
#pragma once

#include <cuda_runtime.h>
#include <stdio.h>

#include "attention_common.cuh"

namespace abft {

// launch(kernel, grid, smem_bytes, args) for run_attention_fwd / run_attention_bwd.
struct CudaLaunch {
  cudaStream_t stream;

  template <class Args>
  const char* operator()(void (*kernel)(Args), dim3 grid, size_t smem, const Args& args) const {
    if (smem > 48 * 1024) {
      int dev = 0, limit = 0;
      cudaError_t e = cudaGetDevice(&dev);
      if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
      if (e != cudaSuccess) return cudaGetErrorString(e);
      if (static_cast<size_t>(limit) < smem) {
        static thread_local char msg[200];
        snprintf(msg, sizeof(msg),
                 "this kernel needs %zu bytes of shared memory per block, the GPU allows %d "
                 "(the CUDA backend needs an sm_80 or newer GPU)", smem, limit);
        return msg;
      }
      // opt in to more than 48 KiB of dynamic shared memory (per device; cheap to repeat)
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
      if (e != cudaSuccess) return cudaGetErrorString(e);
    }
    kernel<<<grid, kThreads, smem, stream>>>(args);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  }
};

}  // namespace abft
