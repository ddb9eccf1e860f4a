// token_stats on CUDA: the torch glue of pg_kernels._C_cuda. Checks inputs (TORCH_CHECK: no
// host sync, nothing reads tensor values), allocates outputs and the [C][N] workspace, and
// launches the torch-free kernels of token_stats.cuh on the current stream of the logits' device
// (c10::cuda::getCurrentCUDAStream, which at::cuda::getCurrentCUDAStream forwards to: the ATen
// header would pull in cuBLAS / cuSPARSE headers that a minimal toolkit does not have).
// Interface and semantics mirror the CPU kernel (csrc/cpu/token_stats.cpp, ops.h), except that a
// label outside [0, V) (not ignore_index) or a per-row temperature that is not finite and > 0
// gives that row NaN outputs (argmax -1) and a NaN gradient instead of an error: finding it would
// need a host sync. Call pg_kernels.ops._common.check_labels for the error.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "pg_kernels/gradient_output.h"
#include "token_stats.cuh"

namespace pg_kernels {
namespace gpu {
namespace {

// c10 scalar type -> dtype tag of token_stats.cuh.
template <typename scalar_t>
struct TagOf;
template <>
struct TagOf<at::BFloat16> {
  using type = BF16;
};
template <>
struct TagOf<at::Half> {
  using type = F16;
};
template <>
struct TagOf<float> {
  using type = F32;
};
template <>
struct TagOf<double> {
  using type = F64;
};

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by forward and backward. They guard what the kernels rely on, so that a direct
// call with a wrong layout cannot read out of bounds.
void check_row_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                      const std::optional<at::Tensor>& temperature, double temperature_scalar,
                      int64_t n_inner, int64_t stride_outer, int64_t stride_inner) {
  TORCH_CHECK(logits.is_cuda(), op, ": expected CUDA tensors, got logits on ", logits.device());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels is on ", labels.device(),
              " but logits on ", logits.device());
  TORCH_CHECK(logits.dim() >= 1, op, ": logits must have shape [..., V]");
  TORCH_CHECK(logits.numel() == 0 || logits.size(-1) == 1 || logits.stride(-1) == 1, op,
              ": logits must have a contiguous last dim, got stride ", logits.stride(-1));
  TORCH_CHECK(labels.dim() == 1 && labels.is_contiguous(), op,
              ": labels must be flat and contiguous");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  const int64_t V = logits.size(-1);
  TORCH_CHECK(logits.numel() == labels.numel() * V, op, ": logits has ",
              logits.numel() / std::max<int64_t>(V, 1), " rows but labels has ", labels.numel());
  TORCH_CHECK(V <= kMaxVocab, op, ": vocab size ", V, " exceeds ", kMaxVocab);
  if (temperature) {
    const auto acc = acc_type_of(logits.scalar_type());
    TORCH_CHECK(temperature->device() == logits.device(), op, ": temperature is on ",
                temperature->device(), " but logits on ", logits.device());
    TORCH_CHECK(temperature->scalar_type() == acc && temperature->is_contiguous() &&
                    temperature->numel() == labels.numel(),
                op, ": per-row temperature must be a contiguous ", acc, " tensor of ",
                labels.numel(), " elements");
  } else {
    // A host value: checking it costs nothing (per-row values are checked in the kernel).
    TORCH_CHECK(std::isfinite(temperature_scalar) && temperature_scalar > 0, op,
                ": temperature must be finite and > 0, got ", temperature_scalar);
  }
  const int64_t N = labels.numel();
  if (N == 0 || V == 0) return;
  TORCH_CHECK(n_inner >= 1 && stride_outer >= 0 && stride_inner >= 0, op,
              ": bad row layout (n_inner ", n_inner, ", stride_outer ", stride_outer,
              ", stride_inner ", stride_inner, ")");
  // The last element any row can reach must lie inside the logits' storage.
  const int64_t last_outer = (N - 1) / n_inner;
  const int64_t last_inner = std::min<int64_t>(N - 1, n_inner - 1);
  const int64_t reach = last_outer * stride_outer + last_inner * stride_inner + V;
  const int64_t available =
      static_cast<int64_t>(logits.storage().nbytes() / logits.element_size()) -
      logits.storage_offset();
  TORCH_CHECK(reach <= available, op, ": row layout (n_inner ", n_inner, ", stride_outer ",
              stride_outer, ", stride_inner ", stride_inner, ") reads past the logits' storage");
}

template <typename acc_t>
RowInputs<acc_t> make_row_inputs(const at::Tensor& logits, const at::Tensor& labels,
                                 const std::optional<at::Tensor>& temperature,
                                 double temperature_scalar, int64_t ignore_index,
                                 int64_t n_inner, int64_t stride_outer, int64_t stride_inner,
                                 int vec) {
  RowInputs<acc_t> in{};
  in.logits = logits.const_data_ptr();
  in.labels = labels.const_data_ptr();
  in.labels_int32 = labels.scalar_type() == at::kInt;
  in.temperature = temperature ? temperature->const_data_ptr<acc_t>() : nullptr;
  in.inv_tau_scalar = acc_t(1) / acc_t(temperature_scalar);  // as the CPU kernel rounds it
  in.ignore_index = ignore_index;
  in.N = labels.numel();
  in.V = logits.size(-1);
  in.layout = RowLayout{n_inner, stride_outer, stride_inner};
  in.plan = plan_chunks(in.V, vec);
  return in;
}

// PGK_CUDA_TOP_SUMS=0: the forward sums each chunk's top thread in fp32 like the others
// (ForwardParams::top_sums), for timing it beside the default in one build
// (benchmarks/bench_token_stats.py's provider top32:cuda). Read on every call (~0.1 us).
bool top_sums_on() {
  const char* v = std::getenv("PGK_CUDA_TOP_SUMS");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

void check_per_row(const char* op, const char* name, const at::Tensor& t,
                   const at::Tensor& logits, int64_t N) {
  const auto acc = acc_type_of(logits.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(),
              " but logits on ", logits.device());
  TORCH_CHECK(t.scalar_type() == acc && t.is_contiguous() && t.numel() == N, op, ": ", name,
              " must be a contiguous ", acc, " tensor of ", N, " elements, got ", t.scalar_type(),
              " with ", t.numel(), " elements");
}

}  // namespace

std::vector<at::Tensor> token_stats_forward(const at::Tensor& logits, const at::Tensor& labels,
                                            const std::optional<at::Tensor>& temperature,
                                            double temperature_scalar, int64_t ignore_index,
                                            int64_t n_inner, int64_t stride_outer,
                                            int64_t stride_inner) {
  constexpr const char* op = "token_stats";
  check_row_inputs(op, logits, labels, temperature, temperature_scalar, n_inner, stride_outer,
                   stride_inner);
  // The logits' device is current while the kernels launch (allocations follow the tensors'
  // options anyway), on that device's current stream, whatever device the caller had current.
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device());
  const int64_t N = labels.numel();
  const auto opts = logits.options().dtype(acc_type_of(logits.scalar_type()));
  at::Tensor logprob = at::empty({N}, opts), entropy = at::empty({N}, opts),
             collision = at::empty({N}, opts), lgp = at::empty({N}, opts),
             lse = at::empty({N}, opts), max_prob = at::empty({N}, opts),
             argmax = at::empty({N}, opts.dtype(at::kLong));
  if (N == 0) return {logprob, entropy, collision, lgp, lse, max_prob, argmax};

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "token_stats_forward_cuda", [&] {
        using Tag = typename TagOf<scalar_t>::type;
        using acc_t = typename DTypeTraits<Tag>::acc_t;
        ForwardParams<acc_t> p{};
        p.in = make_row_inputs<acc_t>(logits, labels, temperature, temperature_scalar,
                                      ignore_index, n_inner, stride_outer, stride_inner,
                                      DTypeTraits<Tag>::kVec);
        // Workspace: 2 acc_t (m, t), 2 double (s1, s2) and 1 int32 per (chunk, row); every
        // valid row's C entries are written by the partial kernel before finalize reads them
        // (same stream), and invalid or ignored rows are never read, so no initialization is
        // needed.
        const int64_t CN = int64_t(p.in.plan.n_chunks) * N;
        at::Tensor ws = at::empty({2 * CN}, opts);
        at::Tensor ws_sums = at::empty({2 * CN}, opts.dtype(at::kDouble));
        at::Tensor ws_idx = at::empty({CN}, opts.dtype(at::kInt));
        acc_t* w = ws.data_ptr<acc_t>();
        p.ws_m = w;
        p.ws_t = w + CN;
        p.ws_s1 = ws_sums.data_ptr<double>();
        p.ws_s2 = p.ws_s1 + CN;
        p.ws_idx = ws_idx.data_ptr<int32_t>();
        p.logprob = logprob.data_ptr<acc_t>();
        p.entropy = entropy.data_ptr<acc_t>();
        p.collision = collision.data_ptr<acc_t>();
        p.lgp = lgp.data_ptr<acc_t>();
        p.lse = lse.data_ptr<acc_t>();
        p.max_prob = max_prob.data_ptr<acc_t>();
        p.argmax = argmax.data_ptr<int64_t>();
        p.top_sums = top_sums_on();
        const bool aligned = rows_are_16b_aligned(p.in.logits, logits.element_size(), N,
                                                  p.in.layout);
        C10_CUDA_CHECK(launch_token_stats_forward<Tag>(p, aligned, logits.get_device(), stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {logprob, entropy, collision, lgp, lse, max_prob, argmax};
}

at::Tensor token_stats_backward(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                                const at::Tensor& grad_collision, const at::Tensor& grad_lse,
                                const at::Tensor& logits, const at::Tensor& labels,
                                const std::optional<at::Tensor>& temperature,
                                double temperature_scalar, int64_t ignore_index,
                                const at::Tensor& lse, const at::Tensor& entropy,
                                const at::Tensor& collision, const at::Tensor& max_prob,
                                const at::Tensor& argmax, int64_t n_inner, int64_t stride_outer,
                                int64_t stride_inner, const std::optional<at::Tensor>& out) {
  constexpr const char* op = "token_stats_backward";
  check_row_inputs(op, logits, labels, temperature, temperature_scalar, n_inner, stride_outer,
                   stride_inner);
  const int64_t N = labels.numel();
  check_per_row(op, "grad_logprob", grad_logprob, logits, N);
  check_per_row(op, "grad_entropy", grad_entropy, logits, N);
  check_per_row(op, "grad_collision", grad_collision, logits, N);
  check_per_row(op, "grad_lse", grad_lse, logits, N);
  check_per_row(op, "lse", lse, logits, N);
  check_per_row(op, "entropy", entropy, logits, N);
  check_per_row(op, "collision", collision, logits, N);
  check_per_row(op, "max_prob", max_prob, logits, N);
  TORCH_CHECK(argmax.device() == logits.device(), op, ": argmax is on ", argmax.device(),
              " but logits on ", logits.device());
  TORCH_CHECK(argmax.scalar_type() == at::kLong && argmax.is_contiguous() && argmax.numel() == N,
              op, ": argmax must be a contiguous int64 tensor of ", N, " elements, got ",
              argmax.scalar_type(), " with ", argmax.numel(), " elements");
  // The logits' device is current while the kernels launch (allocations follow the tensors'
  // options anyway), on that device's current stream, whatever device the caller had current.
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device());
  at::Tensor grad = gradient_output(op, logits, out);
  if (grad.numel() == 0) return grad;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "token_stats_backward_cuda", [&] {
        using Tag = typename TagOf<scalar_t>::type;
        using acc_t = typename DTypeTraits<Tag>::acc_t;
        BackwardParams<acc_t> p{};
        p.in = make_row_inputs<acc_t>(logits, labels, temperature, temperature_scalar,
                                      ignore_index, n_inner, stride_outer, stride_inner,
                                      DTypeTraits<Tag>::kVec);
        p.g_logprob = grad_logprob.const_data_ptr<acc_t>();
        p.g_entropy = grad_entropy.const_data_ptr<acc_t>();
        p.g_collision = grad_collision.const_data_ptr<acc_t>();
        p.g_lse = grad_lse.const_data_ptr<acc_t>();
        p.lse = lse.const_data_ptr<acc_t>();
        p.entropy = entropy.const_data_ptr<acc_t>();
        p.collision = collision.const_data_ptr<acc_t>();
        p.max_prob = max_prob.const_data_ptr<acc_t>();
        p.argmax = argmax.const_data_ptr<int64_t>();
        p.grad = grad.data_ptr();
        // Vector loads need aligned logit rows, vector stores aligned gradient rows (r * V).
        const RowLayout dense{N, 0, p.in.V};
        const bool aligned =
            rows_are_16b_aligned(p.in.logits, logits.element_size(), N, p.in.layout) &&
            rows_are_16b_aligned(p.grad, grad.element_size(), N, dense);
        C10_CUDA_CHECK(launch_token_stats_backward<Tag>(p, aligned, logits.get_device(), stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

}  // namespace gpu
}  // namespace pg_kernels
