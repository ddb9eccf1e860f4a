// The token_stats backward's gradient tensor, shared by the CPU (csrc/cpu/token_stats.cpp) and
// CUDA (csrc/cuda/token_stats.cu) entry points.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

namespace pg_kernels {
// The backward's gradient: `out` when given, checked, else a fresh contiguous tensor (row r
// starts at r * V either way). `out` must not overlap the logits: the kernels read a row's
// label entry after writing the row.
inline at::Tensor gradient_output(const char* op, const at::Tensor& logits,
                                  const std::optional<at::Tensor>& out) {
  if (!out) {
    return at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  }
  TORCH_CHECK(out->sizes() == logits.sizes() && out->scalar_type() == logits.scalar_type() &&
                  out->device() == logits.device() && out->is_contiguous(),
              op, ": out must be a contiguous tensor of logits' shape ", logits.sizes(), ", dtype ",
              logits.scalar_type(), " and device ", logits.device(), ", got ", out->sizes(), " ",
              out->scalar_type(), " on ", out->device());
  at::assert_no_overlap(*out, logits);
  return *out;
}

}  // namespace pg_kernels
