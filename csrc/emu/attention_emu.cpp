// The entry points of attention.h and probes.h, running the real kernels (attention_fwd.cuh,
// attention_bwd.cuh, probes.cuh) on the CPU through the emulation in cuda_emu.h. Built only by
// the tests, together with binding.cpp compiled with -DABFT_EMULATION, as a CPU torch extension.
#ifndef ABFT_EMULATION
#define ABFT_EMULATION 1
#endif

#include "../attention_bwd.cuh"
#include "../attention_fwd.cuh"
#include "../probes.cuh"

namespace abft {
namespace {

struct EmuLaunch {
  template <class Args>
  const char* operator()(void (*kernel)(Args), dim3 grid, size_t smem, const Args& args) const {
    if (smem > kSmemBudget) return "shared memory above the budget";
    return emu::launch(kernel, grid, kThreads, smem, args);
  }
};

}  // namespace

const char* attention_fwd(const FwdArgs& a, void*) { return run_attention_fwd(a, EmuLaunch{}); }

const char* attention_bwd(const BwdArgs& a, void*) { return run_attention_bwd(a, EmuLaunch{}); }

const char* probe_fwd(const ProbeFwdArgs& a, void*) { return run_probe_fwd(a, EmuLaunch{}); }

const char* probe_bwd(const ProbeBwdArgs& a, void*) { return run_probe_bwd(a, EmuLaunch{}); }

}  // namespace abft
