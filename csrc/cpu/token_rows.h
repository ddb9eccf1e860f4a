// token_stats' row arithmetic on the CPU (docs/math.md §§1-3), shared by token_stats.cpp and
// step_stats.cpp: the per-lane sums of the accumulator (s1 and s2 in double lanes for fp32
// rows, finished in double) and the backward's per-row numbers. See token_stats.cpp's header
// for the design and accuracy.
#pragma once

#include <cmath>

#include "vec_rows.h"

namespace pg_kernels::cpu {

// A row's per-lane sums relative to a running max: s1 = sum e, s2 = sum e^2 (WideLanes: in
// double lanes for fp32 rows) and t = sum e d.
template <typename acc_t>
struct LaneSums {
  WideLanes<acc_t> s1, s2;
  Vec<acc_t> t{acc_t(0)};

  // Move the lanes' reference max down by delta = m_old - m_new <= 0 (docs/math.md §1
  // rescale); the caller skips it while nothing is accumulated (m_old = -inf). delta is
  // clamped where e^delta is already 0: a chunk of finfo.min logits moved to a real max is
  // -3.4e38 below it, and delta s1 = -inf would make t 0 * -inf = NaN.
  void rescale(acc_t delta) {
    delta = std::max(delta, exp_zero_below<acc_t>());
    const acc_t a = std::exp(delta);
    t = Vec<acc_t>(a) * at::vec::fmadd(Vec<acc_t>(delta), s1.lanes(), t);
    s1.scale(a);
    s2.scale(row_sum_t<acc_t>(a) * row_sum_t<acc_t>(a));
  }

  // d = z - m <= 0, clamped where exp is already 0 so that -inf logits give e * d = 0.
  PGK_VECTOR_INLINE void add(const Vec<acc_t>& z, const Vec<acc_t>& m) {
    const Vec<acc_t> d = at::vec::clamp_min(z - m, Vec<acc_t>(exp_zero_below<acc_t>()));
    add_exp(d, vexp(d));
  }

  // The same from d (clamped as above) and e = e^d computed by the caller.
  PGK_VECTOR_INLINE void add_exp(const Vec<acc_t>& d, const Vec<acc_t>& e) {
    s1.add(e);
    s2.add_square(e);
    t = at::vec::fmadd(e, d, t);
  }

  // Add the two chains of one chunk (lo, hi) to these row lanes.
  void add(const LaneSums& lo, const LaneSums& hi) {
    s1 = s1 + (lo.s1 + hi.s1);
    s2 = s2 + (lo.s2 + hi.s2);
    t = t + (lo.t + hi.t);
  }

  // The row's accumulator state relative to its max m, in row_sum_t<acc_t>.
  SoftmaxState<row_sum_t<acc_t>> state(row_sum_t<acc_t> m) const {
    return {m, s1.total(), s2.total(), sum_lanes(t)};
  }
};

// A row finished in row_sum_t<acc_t>, each output rounded once to acc_t.
template <typename acc_t, typename T>
TokenStatsRow<acc_t> rounded_row(const TokenStatsRow<T>& r) {
  return {acc_t(r.logprob), acc_t(r.entropy), acc_t(r.collision),
          acc_t(r.lgp),     acc_t(r.lse),     acc_t(r.max_prob)};
}

// The backward's per-row numbers: the row's raw max xm and log s1 from the forward's saved
// argmax and max_prob, and the gradient coefficients divided by tau (in double, rounded once to
// acc_t).
template <typename acc_t>
struct BackwardRow {
  acc_t xm, log_s1;
  acc_t a, b, c;           // TokenStatsGradCoef / tau, for the vector loop
  double a_d, b_d, c_d, g_l;  // the same unrounded, and g_l / tau: the label's entry
};

// The backward row's numbers; false when the saved state is not a finished forward row's
// (argmax out of range, max_prob not in (0, 1]): the row is then NaN, like a NaN forward row.
template <typename scalar_t, typename acc_t>
bool backward_row_state(const scalar_t* x, int64_t V, Temperature<acc_t> tau, int64_t argmax,
                        acc_t max_prob, double g_logprob, double g_entropy, double g_collision,
                        double g_lse, double entropy, double collision, BackwardRow<acc_t>& out) {
  if (!(argmax >= 0 && argmax < V && max_prob > acc_t(0) && max_prob <= acc_t(1))) return false;
  const auto k =
      token_stats_grad_coef<double>(g_logprob, g_entropy, g_collision, g_lse, entropy, collision);
  const double t = double(tau.tau);
  const double a = k.a / t, b = k.b / t, c = k.c / t;
  out = {acc_t(x[argmax]), -std::log(max_prob), acc_t(a), acc_t(b), acc_t(c),
         a, b, c, g_logprob / t};
  return true;
}

}  // namespace pg_kernels::cpu
