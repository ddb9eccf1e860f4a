// CPU entry points of pg_kernels._C and the input checks they share.
// Signatures follow the op schemas in pg_kernels/_library.py (float -> double, int -> int64_t).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "pg_kernels/gradient_output.h"

namespace pg_kernels::cpu {

// The Python layer validates user input with friendly messages; these checks guard the
// invariants the kernels rely on, so a direct call cannot read out of bounds.

// The kernels read a row's V entries at unit stride; a row of one entry (or no rows) has no
// stride to get wrong: torch.randn(1, N).t() is [N, 1] with stride (1, N).
inline bool last_dim_contiguous(const at::Tensor& t) {
  return t.dim() >= 1 && (t.stride(-1) == 1 || t.size(-1) == 1 || t.numel() == 0);
}

inline void check_row_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                             const std::optional<at::Tensor>& temperature) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(last_dim_contiguous(logits), op, ": logits must have a contiguous last dim");
  TORCH_CHECK(labels.dim() == 1 && labels.is_contiguous(), op, ": labels must be flat and contiguous");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(logits.numel() == labels.numel() * logits.size(-1), op,
              ": logits has ", logits.numel() / std::max<int64_t>(logits.size(-1), 1),
              " rows but labels has ", labels.numel());
  if (temperature) {
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(temperature->scalar_type() == acc && temperature->is_contiguous() &&
                    temperature->numel() == labels.numel(),
                op, ": per-row temperature must be a contiguous ", acc, " tensor of ",
                labels.numel(), " elements");
  }
}

// The logits and per-row temperature of an op over n_rows rows (topk_kl has no labels tensor
// to count rows by).
inline void check_rows(const char* op, const at::Tensor& logits, int64_t n_rows,
                       const std::optional<at::Tensor>& temperature) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(last_dim_contiguous(logits), op, ": logits must have a contiguous last dim");
  TORCH_CHECK(logits.numel() == n_rows * logits.size(-1), op, ": logits has ",
              logits.numel() / std::max<int64_t>(logits.size(-1), 1), " rows, expected ", n_rows);
  if (temperature) {
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(temperature->scalar_type() == acc && temperature->is_contiguous() &&
                    temperature->numel() == n_rows && temperature->device().is_cpu(),
                op, ": per-row temperature must be a contiguous ", acc, " tensor of ", n_rows,
                " elements");
  }
}

// Two [..., V] logit tensors of one divergence: same shape and dtype, optional labels and
// per-row temperatures of N = rows elements.
inline void check_pair_inputs(const char* op, const at::Tensor& logits, const at::Tensor& other,
                              const std::optional<at::Tensor>& labels,
                              const std::optional<at::Tensor>& temperature,
                              const std::optional<at::Tensor>& other_temperature) {
  TORCH_CHECK(logits.device().is_cpu() && other.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(last_dim_contiguous(logits) && last_dim_contiguous(other), op,
              ": logits must have a contiguous last dim");
  TORCH_CHECK(logits.sizes() == other.sizes() && logits.scalar_type() == other.scalar_type(),
              op, ": the two logit tensors must have the same shape and dtype");
  const int64_t V = logits.size(-1);
  const int64_t N = V > 0 ? logits.numel() / V : 0;
  if (labels) {
    TORCH_CHECK(labels->dim() == 1 && labels->is_contiguous() && labels->numel() == N, op,
                ": labels must be flat, contiguous and hold one label per row (", N, ")");
    TORCH_CHECK(labels->scalar_type() == at::kLong || labels->scalar_type() == at::kInt, op,
                ": labels must be int64 or int32, got ", labels->scalar_type());
    TORCH_CHECK(labels->device().is_cpu(), op, ": expected CPU tensors");
  }
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&temperature, &other_temperature}) {
    if (*t) {
      TORCH_CHECK((*t)->scalar_type() == acc && (*t)->is_contiguous() && (*t)->numel() == N &&
                      (*t)->device().is_cpu(),
                  op, ": per-row temperatures must be contiguous ", acc, " CPU tensors of ", N,
                  " elements");
    }
  }
}

// Reads int32 or int64 labels as int64.
struct LabelReader {
  const void* data;
  bool is_int32;
  explicit LabelReader(const at::Tensor& labels)
      : data(labels.const_data_ptr()), is_int32(labels.scalar_type() == at::kInt) {}
  int64_t operator()(int64_t r) const {
    return is_int32 ? static_cast<const int32_t*>(data)[r] : static_cast<const int64_t*>(data)[r];
  }
};

// On the CPU a bad label costs nothing to find: check them all before any kernel runs.
inline void check_labels_in_range(const char* op, const at::Tensor& labels, int64_t V,
                                  int64_t ignore_index) {
  const LabelReader read(labels);
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) {
    const int64_t c = read(i);
    TORCH_CHECK(c == ignore_index || (c >= 0 && c < V), op, ": labels.flatten()[", i, "] = ", c,
                " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
  }
}

#include "pg_kernels/token_stats_entry_points.inc"

std::vector<at::Tensor> topk_kl_forward(const at::Tensor& logits, const at::Tensor& topk_ids,
                                        const at::Tensor& topk_logprobs,
                                        const std::optional<at::Tensor>& labels,
                                        const std::optional<at::Tensor>& temperature,
                                        double temperature_scalar, int64_t ignore_index,
                                        int64_t n_inner, int64_t stride_outer,
                                        int64_t stride_inner);

at::Tensor topk_kl_backward(const at::Tensor& grad_kl, const at::Tensor& logits,
                            const at::Tensor& topk_ids, const at::Tensor& topk_logprobs,
                            const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& temperature,
                            double temperature_scalar, int64_t ignore_index,
                            const at::Tensor& row_max, const at::Tensor& log_s,
                            const at::Tensor& logp_tail, int64_t n_inner, int64_t stride_outer,
                            int64_t stride_inner);

std::vector<at::Tensor> pruned_logprob_forward(const at::Tensor& logits, const at::Tensor& labels,
                                               const std::optional<at::Tensor>& temperature,
                                               double temperature_scalar, double alpha,
                                               int64_t ignore_index, int64_t n_inner,
                                               int64_t stride_outer, int64_t stride_inner);

at::Tensor pruned_logprob_backward(const at::Tensor& grad_logprob, const at::Tensor& logits,
                                   const at::Tensor& labels,
                                   const std::optional<at::Tensor>& temperature,
                                   double temperature_scalar, int64_t ignore_index,
                                   const at::Tensor& lse_safe, const at::Tensor& threshold,
                                   const at::Tensor& row_max, int64_t n_inner,
                                   int64_t stride_outer, int64_t stride_inner);
// Divergences (divergence.cpp). Layout ints describe the logits' rows, then the other tensor's.
std::vector<at::Tensor> kl_divergence_forward(
    const at::Tensor& logits, const at::Tensor& ref_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, const std::optional<at::Tensor>& ref_temperature,
    double ref_temperature_scalar, int64_t ignore_index, bool reverse, int64_t n_inner,
    int64_t stride_outer, int64_t stride_inner, int64_t ref_n_inner, int64_t ref_stride_outer,
    int64_t ref_stride_inner);

std::vector<at::Tensor> kl_divergence_backward(
    const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, const std::optional<at::Tensor>& ref_temperature,
    double ref_temperature_scalar, int64_t ignore_index, bool reverse, const at::Tensor& kl,
    const at::Tensor& row_state, bool need_logits_grad, bool need_ref_grad,
    const std::optional<at::Tensor>& outside_terms,
    int64_t n_inner, int64_t stride_outer, int64_t stride_inner, int64_t ref_n_inner,
    int64_t ref_stride_outer, int64_t ref_stride_inner);

std::vector<at::Tensor> mismatch_stats_forward(
    const at::Tensor& logits, const at::Tensor& rollout_logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& temperature, double temperature_scalar,
    const std::optional<at::Tensor>& rollout_temperature, double rollout_temperature_scalar,
    int64_t ignore_index, bool tv, int64_t n_inner, int64_t stride_outer, int64_t stride_inner,
    int64_t rollout_n_inner, int64_t rollout_stride_outer, int64_t rollout_stride_inner);

at::Tensor mismatch_stats_backward(const at::Tensor& grad_logprob, const at::Tensor& logits,
                                   const at::Tensor& labels,
                                   const std::optional<at::Tensor>& temperature,
                                   double temperature_scalar, int64_t ignore_index,
                                   const at::Tensor& row_state, int64_t n_inner,
                                   int64_t stride_outer, int64_t stride_inner);

// The sampled-token estimators of mismatch_stats and step_stats (sampled_estimators.cpp):
// nine fields of the labels' shape, in the log-prob's dtype, from log-probs, rollout log-probs
// and labels of one shape.
std::vector<at::Tensor> sampled_estimators_forward(const at::Tensor& logprob,
                                                   const at::Tensor& rollout_logprobs,
                                                   const at::Tensor& labels, int64_t ignore_index,
                                                   double tis_cap, double icepop_low,
                                                   double icepop_high);

// step_stats (step_stats.cpp). Layout ints describe the logits' rows, then the rollout
// logits', then the reference logits'. tv = false (mismatch_stats too): no total variation,
// token_tv [0].
std::vector<at::Tensor> step_stats_forward(
    const at::Tensor& logits, const std::optional<at::Tensor>& rollout_logits,
    const std::optional<at::Tensor>& ref_logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& temperature, double temperature_scalar,
    const std::optional<at::Tensor>& rollout_temperature, double rollout_temperature_scalar,
    const std::optional<at::Tensor>& ref_temperature, double ref_temperature_scalar,
    bool reverse, int64_t ignore_index, bool tv, int64_t n_inner, int64_t stride_outer,
    int64_t stride_inner, int64_t rollout_n_inner, int64_t rollout_stride_outer,
    int64_t rollout_stride_inner, int64_t ref_n_inner, int64_t ref_stride_outer,
    int64_t ref_stride_inner);

std::vector<at::Tensor> step_stats_backward(
    const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& grad_collision, const at::Tensor& grad_lse,
    const std::optional<at::Tensor>& grad_kl, const at::Tensor& logits,
    const std::optional<at::Tensor>& ref_logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& temperature, double temperature_scalar,
    const std::optional<at::Tensor>& ref_temperature, double ref_temperature_scalar,
    bool reverse, int64_t ignore_index, const at::Tensor& lse, const at::Tensor& entropy,
    const at::Tensor& collision, const at::Tensor& max_prob, const at::Tensor& argmax,
    const std::optional<at::Tensor>& kl, const std::optional<at::Tensor>& kl_state,
    bool need_logits_grad, bool need_ref_grad, int64_t n_inner, int64_t stride_outer,
    int64_t stride_inner, int64_t ref_n_inner, int64_t ref_stride_outer,
    int64_t ref_stride_inner);

}  // namespace pg_kernels::cpu
