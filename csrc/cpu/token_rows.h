// token_stats' row arithmetic on the CPU (docs/math.md §§1-3), shared by token_stats.cpp and
// step_stats.cpp: the per-lane sums of the accumulator (s1 in double lanes for fp32 rows) and
// the backward's per-row numbers. See token_stats.cpp's header for the design and accuracy.
#pragma once

#include <cmath>

#include "vec_rows.h"

namespace pg_kernels::cpu {

// s1 = sum e per vector lane, in acc_t.
template <typename acc_t>
struct S1Lanes {
  Vec<acc_t> v{acc_t(0)};
  void add(const Vec<acc_t>& e) { v = v + e; }
  void scale(acc_t a) { v = Vec<acc_t>(a) * v; }
  void add(const S1Lanes& a, const S1Lanes& b) { v = v + (a.v + b.v); }
  Vec<acc_t> lanes() const { return v; }
  acc_t total() const { return sum_lanes(v); }
};

#if defined(CPU_CAPABILITY_AVX2)
// fp32 rows keep s1 in double lanes (two __m256d per float vector): in fp32 the lane holding
// the max (e = 1) rounds each later term to ulp(1) / 2, and p at the argmax = 1 / s1 (max_prob,
// which the backward uses for log s1) had 3.0e-7 relative error on peaked rows where PyTorch's
// cascade sum has 1.8e-7. Rounded once to fp32 at the row's end.
template <>
struct S1Lanes<float> {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();  // float lanes 0-3, 4-7
  void add(const Vec<float>& e) {
    const __m256 v = e;
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  void scale(float a) {
    const __m256d va = _mm256_set1_pd(a);
    lo = _mm256_mul_pd(va, lo);
    hi = _mm256_mul_pd(va, hi);
  }
  void add(const S1Lanes& a, const S1Lanes& b) {
    lo = _mm256_add_pd(lo, _mm256_add_pd(a.lo, b.lo));
    hi = _mm256_add_pd(hi, _mm256_add_pd(a.hi, b.hi));
  }
  Vec<float> lanes() const { return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)); }
  float total() const {
    alignas(32) double l[8];
    _mm256_store_pd(l, lo);
    _mm256_store_pd(l + 4, hi);
    double s = 0;
    for (int i = 0; i < 8; ++i) s += l[i];
    return float(s);
  }
};
#endif

template <typename acc_t>
struct LaneSums {
  S1Lanes<acc_t> s1;
  Vec<acc_t> s2{acc_t(0)}, t{acc_t(0)};

  // Move the lanes' reference max from m_old to m_new (docs/math.md §1 rescale).
  void rescale(acc_t m_old, acc_t m_new) {
    if (m_old == neg_inf<acc_t>()) return;  // nothing accumulated yet
    const acc_t delta = m_old - m_new;
    const acc_t a = std::exp(delta);
    t = Vec<acc_t>(a) * at::vec::fmadd(Vec<acc_t>(delta), s1.lanes(), t);
    s1.scale(a);
    s2 = Vec<acc_t>(a * a) * s2;
  }

  // d = z - m <= 0, clamped where exp is already 0 so that -inf logits give e * d = 0.
  void add(const Vec<acc_t>& z, const Vec<acc_t>& m) {
    const Vec<acc_t> d = at::vec::clamp_min(z - m, Vec<acc_t>(exp_zero_below<acc_t>()));
    add_exp(d, vexp(d));
  }

  // The same from d (clamped as above) and e = e^d computed by the caller.
  void add_exp(const Vec<acc_t>& d, const Vec<acc_t>& e) {
    s1.add(e);
    s2 = at::vec::fmadd(e, e, s2);
    t = at::vec::fmadd(e, d, t);
  }

  // Add the two chains of one chunk (lo, hi) to these row lanes.
  void add(const LaneSums& lo, const LaneSums& hi) {
    s1.add(lo.s1, hi.s1);
    s2 = s2 + (lo.s2 + hi.s2);
    t = t + (lo.t + hi.t);
  }

  // The row's accumulator state relative to its max m.
  SoftmaxState<acc_t> state(acc_t m) const { return {m, s1.total(), sum_lanes(s2), sum_lanes(t)}; }
};

// The backward's per-row numbers: the row max m and log s1 from the forward's saved argmax and
// max_prob, and the gradient coefficients divided by tau (in double, rounded once to acc_t).
template <typename acc_t>
struct BackwardRow {
  acc_t m, log_s1;
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
  out = {tau.divide(acc_t(x[argmax])), -std::log(max_prob), acc_t(a), acc_t(b), acc_t(c),
         a, b, c, g_logprob / t};
  return true;
}

}  // namespace pg_kernels::cpu
