// token_stats' row arithmetic on the CPU (docs/math.md §§1-3), shared by token_stats.cpp and
// step_stats.cpp: the per-lane sums of the accumulator (s1 and s2 in double lanes for fp32
// rows, finished in double) and the backward's per-row numbers. See token_stats.cpp's header for the design and accuracy.
#pragma once

#include <cmath>

#include "vec_rows.h"

namespace pg_kernels::cpu {

// s1 = sum e and s2 = sum e^2 per vector lane, in acc_t; their totals in row_sum_t<acc_t>.
template <typename acc_t>
struct ExpLanes {
  Vec<acc_t> s1{acc_t(0)}, s2{acc_t(0)};
  void add(const Vec<acc_t>& e) {
    s1 = s1 + e;
    s2 = at::vec::fmadd(e, e, s2);
  }
  void scale(acc_t a) {
    s1 = Vec<acc_t>(a) * s1;
    s2 = Vec<acc_t>(a * a) * s2;
  }
  void add(const ExpLanes& a, const ExpLanes& b) {
    s1 = s1 + (a.s1 + b.s1);
    s2 = s2 + (a.s2 + b.s2);
  }
  Vec<acc_t> s1_lanes() const { return s1; }
  row_sum_t<acc_t> s1_total() const { return sum_lanes(s1); }
  row_sum_t<acc_t> s2_total() const { return sum_lanes(s2); }
};

#if defined(CPU_CAPABILITY_AVX2)
// fp32 rows keep s1 and s2 in double lanes (two __m256d each per float vector, e converted
// once, e^2 formed in double): in fp32 the lane holding the max (e = 1) rounds each later
// term to ulp(1) / 2.
//   - p at the argmax = 1 / s1 (max_prob, which the backward uses for log s1) had 3.0e-7
//     relative error on peaked rows where PyTorch's cascade sum has 1.8e-7.
//   - The logit-gradient proxy (1 - p_c)^2 + (C - p_c^2) takes s2 - 1, the rest's sum of e^2:
//     on peaked rows (lgp 5e-9 .. 3e-6) it was up to 3x off (1.8e-7 absolute); now 8e-8 relative
//     at tau = 1 (plain fp32 PyTorch: 0.5 relative, 3.7e-6 absolute).
// The totals stay double into the finish (finalize_token_stats in double, each output rounded
// once), as the CUDA kernel finishes.
template <>
struct ExpLanes<float> {
  __m256d s1_lo = _mm256_setzero_pd(), s1_hi = _mm256_setzero_pd();  // float lanes 0-3, 4-7
  __m256d s2_lo = _mm256_setzero_pd(), s2_hi = _mm256_setzero_pd();
  void add(const Vec<float>& e) {
    const __m256 v = e;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s1_lo = _mm256_add_pd(s1_lo, lo);
    s1_hi = _mm256_add_pd(s1_hi, hi);
    s2_lo = _mm256_fmadd_pd(lo, lo, s2_lo);
    s2_hi = _mm256_fmadd_pd(hi, hi, s2_hi);
  }
  void scale(float a) {
    const __m256d va = _mm256_set1_pd(a), va2 = _mm256_set1_pd(double(a) * double(a));
    s1_lo = _mm256_mul_pd(va, s1_lo);
    s1_hi = _mm256_mul_pd(va, s1_hi);
    s2_lo = _mm256_mul_pd(va2, s2_lo);
    s2_hi = _mm256_mul_pd(va2, s2_hi);
  }
  void add(const ExpLanes& a, const ExpLanes& b) {
    s1_lo = _mm256_add_pd(s1_lo, _mm256_add_pd(a.s1_lo, b.s1_lo));
    s1_hi = _mm256_add_pd(s1_hi, _mm256_add_pd(a.s1_hi, b.s1_hi));
    s2_lo = _mm256_add_pd(s2_lo, _mm256_add_pd(a.s2_lo, b.s2_lo));
    s2_hi = _mm256_add_pd(s2_hi, _mm256_add_pd(a.s2_hi, b.s2_hi));
  }
  Vec<float> s1_lanes() const {
    return _mm256_set_m128(_mm256_cvtpd_ps(s1_hi), _mm256_cvtpd_ps(s1_lo));
  }
  double s1_total() const { return total(s1_lo, s1_hi); }
  double s2_total() const { return total(s2_lo, s2_hi); }

  // Lanes 0-7 in a fixed order (deterministic).
  static double total(__m256d lo, __m256d hi) {
    alignas(32) double l[8];
    _mm256_store_pd(l, lo);
    _mm256_store_pd(l + 4, hi);
    double s = 0;
    for (int i = 0; i < 8; ++i) s += l[i];
    return s;
  }
};
#endif

template <typename acc_t>
struct LaneSums {
  ExpLanes<acc_t> s;
  Vec<acc_t> t{acc_t(0)};

  // Move the lanes' reference max from m_old to m_new (docs/math.md §1 rescale).
  void rescale(acc_t m_old, acc_t m_new) {
    if (m_old == neg_inf<acc_t>()) return;  // nothing accumulated yet
    const acc_t delta = m_old - m_new;
    const acc_t a = std::exp(delta);
    t = Vec<acc_t>(a) * at::vec::fmadd(Vec<acc_t>(delta), s.s1_lanes(), t);
    s.scale(a);
  }

  // d = z - m <= 0, clamped where exp is already 0 so that -inf logits give e * d = 0.
  void add(const Vec<acc_t>& z, const Vec<acc_t>& m) {
    const Vec<acc_t> d = at::vec::clamp_min(z - m, Vec<acc_t>(exp_zero_below<acc_t>()));
    add_exp(d, vexp(d));
  }

  // The same from d (clamped as above) and e = e^d computed by the caller.
  void add_exp(const Vec<acc_t>& d, const Vec<acc_t>& e) {
    s.add(e);
    t = at::vec::fmadd(e, d, t);
  }

  // Add the two chains of one chunk (lo, hi) to these row lanes.
  void add(const LaneSums& lo, const LaneSums& hi) {
    s.add(lo.s, hi.s);
    t = t + (lo.t + hi.t);
  }

  // The row's accumulator state relative to its max m, in row_sum_t<acc_t>.
  SoftmaxState<row_sum_t<acc_t>> state(acc_t m) const {
    return {m, s.s1_total(), s.s2_total(), sum_lanes(t)};
  }
};

// A row finished in row_sum_t<acc_t>, each output rounded once to acc_t.
template <typename acc_t, typename T>
TokenStatsRow<acc_t> rounded_row(const TokenStatsRow<T>& r) {
  return {acc_t(r.logprob), acc_t(r.entropy), acc_t(r.collision),
          acc_t(r.lgp),     acc_t(r.lse),     acc_t(r.max_prob)};
}

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
