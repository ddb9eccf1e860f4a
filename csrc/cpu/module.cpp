// pg_kernels._C: the CPU kernels. The torch.library ops in pg_kernels/ops/ call these.
// Light headers, as csrc/cuda/module.cpp: torch/extension.h (all of libtorch's C++ API) made
// each source here compile in ~75 s instead of ~20-30 s on 2 cores (CONTRIBUTING.md).
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pg_kernels CPU kernels";
#if defined(CPU_CAPABILITY_AVX512)
  m.attr("cpu_capability") = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  m.attr("cpu_capability") = "avx2";
#else
  m.attr("cpu_capability") = "default";
#endif
  m.def("token_stats_forward", &pg_kernels::cpu::token_stats_forward);
  m.def("token_stats_backward", &pg_kernels::cpu::token_stats_backward);
  m.def("topk_kl_forward", &pg_kernels::cpu::topk_kl_forward);
  m.def("topk_kl_backward", &pg_kernels::cpu::topk_kl_backward);
  m.def("pruned_logprob_forward", &pg_kernels::cpu::pruned_logprob_forward);
  m.def("pruned_logprob_backward", &pg_kernels::cpu::pruned_logprob_backward);
  m.def("kl_divergence_forward", &pg_kernels::cpu::kl_divergence_forward);
  m.def("kl_divergence_backward", &pg_kernels::cpu::kl_divergence_backward);
  m.def("mismatch_stats_forward", &pg_kernels::cpu::mismatch_stats_forward);
  m.def("mismatch_stats_backward", &pg_kernels::cpu::mismatch_stats_backward);
  m.def("sampled_estimators_forward", &pg_kernels::cpu::sampled_estimators_forward);
  m.def("step_stats_forward", &pg_kernels::cpu::step_stats_forward);
  m.def("step_stats_backward", &pg_kernels::cpu::step_stats_backward);
}
