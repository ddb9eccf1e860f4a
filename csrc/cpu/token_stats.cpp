// token_stats on the CPU: docs/math.md §§1-3.
//
// Forward: one pass over each row. Per chunk of the row (vec_rows.h): load + the raw max, then
// d = (x - x_max) / tau relative to the running max (shift_divide_chunk: the difference and the
// quotient each rounded once, quotient_rn, no division), then one exp per element feeding the
// three sums of the accumulator, kept per vector lane and rescaled once per chunk when the max
// rises (by (x_max_old - x_max_new) / tau, from references in double). Lanes merge in a fixed
// order at the row's end. log p_c = d_c - log s1. Reads N*V logits once, writes 7 numbers per
// row.
// Backward: one pass; recomputes log p_j = d_j - log s1 relative to the row max, with x_max the
// logit at the saved argmax and log s1 = -log(max_prob) (both saved by the forward), and writes
// the gradient once (reads N*V, writes N*V). Not z_j - L: the saved fp32 L carries ulp(L) / 2
// (1.9e-6 at L ~ 40), i.e. that relative error on every p_j, 1.9e-6 on p ~ 1 where PyTorch's
// error is ~1e-7; d_j is nearly exact near the max, and log s1 = -log(1 / s1) is accurate to
// ~1e-7 absolute.
// Not z = x / tau rounded, then z - m: z and m each carry ulp(z) / 2 (~1e-6 at |z| ~ 20), the
// largest error of log p at tau != 1 (benchmarks/fidelity.py's peaked fp32 rows at tau 0.7,
// 1024 x 32000: logprob rms error 4.5e-7 -> 1.0e-7, max 1.9e-6 -> 6.5e-7-1.5e-6; plain PyTorch
// rms 7.3e-7, max 2.2e-6-2.4e-6).
// Accuracy (fp32 [16, 4000], tau 0.7, peaked rows p 0.996-0.99996, lse 40, float64 truth;
// tests/test_token_stats.py::test_peaked_rows_logprob_gradient): log-prob gradient max error
// 4.9e-6 with x (1 / tau) and z - L, 4.3e-7 relative to the max with s1 summed in fp32, 1.7e-7
// with s1 in double lanes (WideLanes; plain fp32 PyTorch: 3.5e-7); logprob 3.5e-6 -> 2.6e-6
// (PyTorch 2.6e-6). Forward time at [512, 32000] fp32 unchanged within this 2-core box's noise
// (12-28 ms before and after).
// The row functions are step_stats' (step_rows.h) run without the rollout and the reference
// logits, so the bundle's token fields are token_stats' by construction.
// Rows are independent and each is computed by one thread in a fixed order, so results are
// deterministic and do not depend on the batch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include "ops.h"
#include "pg_kernels/gradient_output.h"
#include "step_rows.h"

namespace pg_kernels::cpu {

std::vector<at::Tensor> token_stats_forward(const at::Tensor& logits, const at::Tensor& labels,
                                            const std::optional<at::Tensor>& temperature,
                                            double temperature_scalar, int64_t ignore_index,
                                            int64_t n_inner, int64_t stride_outer,
                                            int64_t stride_inner) {
  const int64_t N = labels.numel();
  const int64_t V = logits.size(-1);
  check_row_inputs("token_stats", logits, labels, temperature);
  check_labels_in_range("token_stats", labels, V, ignore_index);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = labels.options().dtype(acc_dtype);
  at::Tensor logprob = at::empty({N}, opts), entropy = at::empty({N}, opts),
             collision = at::empty({N}, opts), lgp = at::empty({N}, opts),
             lse = at::empty({N}, opts), max_prob = at::empty({N}, opts),
             argmax = at::empty({N}, opts.dtype(at::kLong));
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_stats_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const RowTemperature<acc_t> tau{temperature ? temperature->const_data_ptr<acc_t>() : nullptr,
                                    acc_t(temperature_scalar)};
    acc_t *o_lp = logprob.data_ptr<acc_t>(), *o_h = entropy.data_ptr<acc_t>(),
          *o_c = collision.data_ptr<acc_t>(), *o_w = lgp.data_ptr<acc_t>(),
          *o_l = lse.data_ptr<acc_t>(), *o_mp = max_prob.data_ptr<acc_t>();
    int64_t* o_am = argmax.data_ptr<int64_t>();
    const LabelReader read_label(labels);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      StepScratch<acc_t> scratch(0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = read_label(r);
        if (c == ignore_index) {
          o_lp[r] = o_h[r] = o_c[r] = o_w[r] = o_l[r] = o_mp[r] = acc_t(0);
          o_am[r] = 0;
          continue;
        }
        // step_stats' row without the rollout and the reference logits.
        StepRow<acc_t> out;
        step_forward_row<scalar_t, acc_t, false, false>(x + layout.offset(r), tau(r), nullptr,
                                                        acc_t(1), nullptr, acc_t(1), true, false,
                                                        V, c, scratch, out);
        const TokenStatsRow<acc_t>& row = out.token;
        o_am[r] = out.argmax;
        o_lp[r] = row.logprob;
        o_h[r] = row.entropy;
        o_c[r] = row.collision;
        o_w[r] = row.lgp;
        o_l[r] = row.lse;
        o_mp[r] = row.max_prob;
      }
    });
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
  const int64_t N = labels.numel();
  const int64_t V = logits.size(-1);
  check_row_inputs("token_stats_backward", logits, labels, temperature);
  check_labels_in_range("token_stats_backward", labels, V, ignore_index);
  for (const at::Tensor* t : {&grad_logprob, &grad_entropy, &grad_collision, &grad_lse, &lse,
                              &entropy, &collision, &max_prob}) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == N && t->scalar_type() == lse.scalar_type(),
                "token_stats_backward: per-row tensors must be contiguous with ", N,
                " elements of one dtype");
  }
  TORCH_CHECK(lse.scalar_type() == (logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "token_stats_backward: per-row tensors must be fp32 (fp64 for fp64 logits)");
  TORCH_CHECK(argmax.is_contiguous() && argmax.numel() == N && argmax.scalar_type() == at::kLong,
              "token_stats_backward: argmax must be a contiguous int64 tensor of ", N,
              " elements");
  at::Tensor grad = gradient_output("token_stats_backward", logits, out);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_stats_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const RowTemperature<acc_t> tau{temperature ? temperature->const_data_ptr<acc_t>() : nullptr,
                                    acc_t(temperature_scalar)};
    const acc_t *g_lp = grad_logprob.const_data_ptr<acc_t>(), *g_h = grad_entropy.const_data_ptr<acc_t>(),
                *g_c = grad_collision.const_data_ptr<acc_t>(), *g_l = grad_lse.const_data_ptr<acc_t>(),
                *s_l = lse.const_data_ptr<acc_t>(), *s_h = entropy.const_data_ptr<acc_t>(),
                *s_c = collision.const_data_ptr<acc_t>(), *s_mp = max_prob.const_data_ptr<acc_t>();
    const int64_t* s_am = argmax.const_data_ptr<int64_t>();
    const LabelReader read_label(labels);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kBufferSize<acc_t>];
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* grad_row = g + r * V;
        const int64_t c = read_label(r);
        const scalar_t* x_row = x + layout.offset(r);
        const Temperature<acc_t> t = tau(r);
        BackwardRow<acc_t> row;
        const bool ignored = c == ignore_index;
        // A NaN L marks a NaN row; an infinite one is a max beyond the float range under the
        // row's temperature (finfo.min logits at tau < 1), whose gradient is finite.
        const bool valid = !ignored && s_l[r] == s_l[r] &&
                           backward_row_state(x_row, V, t, s_am[r], s_mp[r], g_lp[r], g_h[r],
                                              g_c[r], g_l[r], s_h[r], s_c[r], row);
        if (fill_skipped_row(grad_row, V, ignored, !valid)) continue;
        step_backward_row<scalar_t, acc_t>(0, true, false, x_row, t, nullptr, acc_t(1), V, c, row,
                                           KLBackward<acc_t>{}, buf, nullptr, grad_row, nullptr);
      }
    });
  });
  return grad;
}

}  // namespace pg_kernels::cpu
