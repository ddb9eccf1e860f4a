// The sampled-token estimators of mismatch_stats and step_stats (docs/math.md §5): elementwise
// functions of the label's log-prob and the rollout engine's, in one pass. As nine PyTorch ops
// they were ~22 elementwise calls, ~49 us of host time per call at any small batch (2-core AMD
// EPYC VM) and 22 kernel launches on a GPU. Each field is computed in double and rounded once to
// the log-prob's dtype (the Triton kernel does the same, triton/sampled_estimators.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <vector>

#include "ops.h"
#include "pg_kernels/softmax_stats.h"

namespace pg_kernels::cpu {

namespace {

constexpr double kRatioClamp = 20.0;  // rho = exp(clamp(delta, -20, 20)), as RATIO_CLAMP
constexpr int64_t kFields = 9;

// The nine fields of one token into out[f][i] (docs/math.md §5; the order of `SAMPLED_FIELDS`
// in pg_kernels/ops/sampled_estimators.py). delta = 0 where not kept; NaN stays NaN in every
// field.
template <typename scalar_t>
void estimators(double lp, double rl, bool keep, double tis_cap, double low, double high,
                scalar_t* const* out, int64_t i) {
  const double delta = keep ? lp - rl : 0.0;
  // NaN passes through both comparisons, as torch.clamp.
  const double clamped = delta < -kRatioClamp ? -kRatioClamp
                         : delta > kRatioClamp ? kRatioClamp
                                               : delta;
  const double rho_m1 = std::expm1(clamped);
  // The ratio as its field holds it: the cap and the band compare that value (a ratio that
  // rounds to icepop_low is in the band, as in the field the user reads).
  const double rho = keep ? double(scalar_t(std::exp(clamped))) : 0.0;
  // e^delta - 1 - delta >= 0 inside the clamp: from its series where |delta| < 1/4, as
  // expm1(delta) - delta would cancel (2.4e-9 relative at |delta| ~ 1e-7, an fp64 k3's error).
  const double excess = std::abs(delta) <= kRatioClamp ? expm1_excess(delta) : rho_m1 - delta;
  const double fields[kFields] = {
      delta,                                                        // log_ratio
      rho,                                                          // ratio
      0.0 - delta,                                                  // k1 (+0 where not kept)
      0.5 * delta * delta,                                          // k2
      std::abs(delta) <= kRatioClamp && excess < 0 ? 0.0 : excess,  // k3
      std::abs(delta),                                              // abs_log_ratio
      rho_m1 * rho_m1,                                              // chi2
      rho > tis_cap ? tis_cap : rho,                                // tis_weight (NaN stays)
      rho < low || rho > high ? 0.0 : rho,                          // icepop_weight
  };
  for (int64_t f = 0; f < kFields; ++f) out[f][i] = scalar_t(fields[f]);
}

}  // namespace

std::vector<at::Tensor> sampled_estimators_forward(const at::Tensor& logprob,
                                                   const at::Tensor& rollout_logprobs,
                                                   const at::Tensor& labels, int64_t ignore_index,
                                                   double tis_cap, double icepop_low,
                                                   double icepop_high) {
  const int64_t n = labels.numel();
  // Each field its own tensor of the labels' shape: nine views of one [9, ...] tensor cost
  // ~5 us of host time in Python (unbind), as much as the whole call.
  std::vector<at::Tensor> out;
  for (int64_t f = 0; f < kFields; ++f) out.push_back(at::empty(labels.sizes(), logprob.options()));
  const at::Tensor lp = logprob.contiguous(), y = labels.contiguous();
  const at::Tensor rl = rollout_logprobs.contiguous();
  AT_DISPATCH_FLOATING_TYPES(logprob.scalar_type(), "sampled_estimators", [&] {
    using lp_t = scalar_t;
    const lp_t* lp_data = lp.const_data_ptr<lp_t>();
    lp_t* fields[kFields];
    for (int64_t f = 0; f < kFields; ++f) fields[f] = out[f].data_ptr<lp_t>();
    // tis_cap and the band as the log-prob's dtype holds them (as a PyTorch comparison with a
    // Python float does).
    const double cap = lp_t(tis_cap), low = lp_t(icepop_low), high = lp_t(icepop_high);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, rl.scalar_type(), "sampled_estimators_rollout", [&] {
          const scalar_t* rl_data = rl.const_data_ptr<scalar_t>();
          AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "sampled_estimators_labels", [&] {
            const index_t* y_data = y.const_data_ptr<index_t>();
            at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
              for (int64_t i = begin; i < end; ++i) {
                // The rollout's log-prob rounded to the log-prob's dtype first, as
                // rollout_logprobs.to(logprob.dtype) does.
                estimators(double(lp_data[i]), double(lp_t(rl_data[i])),
                           int64_t(y_data[i]) != ignore_index, cap, low, high, fields, i);
              }
            });
          });
        });
  });
  return out;
}

}  // namespace pg_kernels::cpu
