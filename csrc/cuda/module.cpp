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

// Defined in token_stats.cu (compiled by nvcc). Signatures follow the op schemas in
// pg_kernels/_library.py (float -> double, int -> int64_t) and match csrc/cpu/ops.h.
std::vector<at::Tensor> token_stats_forward(const at::Tensor& logits, const at::Tensor& labels,
                                            const std::optional<at::Tensor>& temperature,
                                            double temperature_scalar, int64_t ignore_index,
                                            int64_t n_inner, int64_t stride_outer,
                                            int64_t stride_inner);

at::Tensor token_stats_backward(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                                const at::Tensor& grad_collision, const at::Tensor& grad_lse,
                                const at::Tensor& logits, const at::Tensor& labels,
                                const std::optional<at::Tensor>& temperature,
                                double temperature_scalar, int64_t ignore_index,
                                const at::Tensor& lse, const at::Tensor& entropy,
                                const at::Tensor& collision, int64_t n_inner,
                                int64_t stride_outer, int64_t stride_inner);

}  // namespace gpu
}  // namespace pg_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pg_kernels CUDA kernels";
  m.def("token_stats_forward", &pg_kernels::gpu::token_stats_forward);
  m.def("token_stats_backward", &pg_kernels::gpu::token_stats_backward);
}
