// pg_kernels._C_cuda: the CUDA kernels. The torch.library ops in pg_kernels/ops/ call these with
// the same arguments as the CPU module pg_kernels._C (csrc/cpu/module.cpp); see token_stats.cu.
// Only the pybind11 type casters for at::Tensor / std::optional are needed here: including
// torch/csrc/utils/pybind.h instead of torch/extension.h (all of torch/all.h) cuts this file's
// compile time from ~53 s to ~22 s on a 2-core build machine.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

namespace pg_kernels {
namespace gpu {

// Defined in token_stats.cu (compiled by nvcc), declared like the CPU module's.
#include "pg_kernels/token_stats_entry_points.inc"

}  // namespace gpu
}  // namespace pg_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pg_kernels CUDA kernels";
  m.def("token_stats_forward", &pg_kernels::gpu::token_stats_forward);
  m.def("token_stats_backward", &pg_kernels::gpu::token_stats_backward);
}
