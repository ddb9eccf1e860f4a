// The backwards' gradient tensors: `fresh_gradient` for every CPU backward (csrc/cpu), and
// token_stats' `out`-or-fresh gradient shared by its CPU and CUDA (csrc/cuda/token_stats.cu)
// entry points.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <optional>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pg_kernels {
// A fresh contiguous tensor of `like`'s shape and options, for a backward to write whole. On a
// Linux CPU its 2 MiB-aligned interior is advised for transparent huge pages (where the system
// offers them on request: `madvise` mode), the page size PyTorch's THP_MEM_ALLOC_ENABLE=1 asks
// for: each 4 KiB page of a fresh tensor costs a fault and a zeroing on its first write, and at
// 1024 x 32000 fp32 (131 MB, ~32k faults) those were most of token_stats' backward.
inline at::Tensor fresh_gradient(const at::Tensor& like) {
  at::Tensor t =
      at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  constexpr size_t kMinBytes = size_t(4) << 20;  // below, a system call for at most one page
  if (t.is_cpu() && t.nbytes() >= kMinBytes) {
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
    // Advice only: where it is refused (no THP, `never`) the pages stay 4 KiB.
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// The backward's gradient: `out` when given, checked, else a fresh contiguous tensor (row r
// starts at r * V either way). `out` must not overlap the logits: the kernels read a row's
// label entry after writing the row.
inline at::Tensor gradient_output(const char* op, const at::Tensor& logits,
                                  const std::optional<at::Tensor>& out) {
  if (!out) return fresh_gradient(logits);
  TORCH_CHECK(out->sizes() == logits.sizes() && out->scalar_type() == logits.scalar_type() &&
                  out->device() == logits.device() && out->is_contiguous(),
              op, ": out must be a contiguous tensor of logits' shape ", logits.sizes(), ", dtype ",
              logits.scalar_type(), " and device ", logits.device(), ", got ", out->sizes(), " ",
              out->scalar_type(), " on ", out->device());
  at::assert_no_overlap(*out, logits);
  return *out;
}

}  // namespace pg_kernels
