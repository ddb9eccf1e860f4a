// Per-row softmax statistics shared by the CPU (C++) and CUDA kernels.
//
// The accumulator of SPEC section 1: over a row of z = x / tau, keep
//   m  = max_j z_j
//   s1 = sum_j exp(z_j - m)
//   s2 = sum_j exp(2 (z_j - m))
//   t  = sum_j exp(z_j - m) (z_j - m)
// Partial states (vector lanes, blocks, threads, vocab shards) join with merge(), which
// rescales both sides to the larger max. Everything here is plain arithmetic on scalars so
// that nvcc and a host compiler build the same code; no torch headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define PGK_HD __host__ __device__ __forceinline__
#else
#define PGK_HD inline
#endif

namespace pg_kernels {

template <typename T>
PGK_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
PGK_HD T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// max that propagates NaN (std::max / fmax silently drop it, and a NaN row must stay NaN).
template <typename T>
PGK_HD T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// Below this, exp(x) rounds to exactly 0 in T (fp32: e^-128 < 2^-150; fp64: e^-1024 < 2^-1075).
// Clamping log-domain differences z - m or z - L to it keeps -inf logits from producing
// 0 * inf = NaN in terms like p d, and changes no result. Do not clamp to the lowest finite
// value: b * d then overflows to inf and 0 * inf is NaN again.
template <typename T>
PGK_HD T exp_zero_below() {
  return sizeof(T) == 8 ? T(-1024) : T(-128);
}

template <typename T>
struct SoftmaxState {
  T m;   // running max; -inf while the row has no finite entry yet
  T s1;  // sum exp(z - m)
  T s2;  // sum exp(2 (z - m))
  T t;   // sum exp(z - m) (z - m)
};

template <typename T>
PGK_HD SoftmaxState<T> empty_state() {
  return {neg_inf<T>(), T(0), T(0), T(0)};
}

// Rescale a state to a new (not smaller) max.
//   s1 <- s1 e^{m - m'},  s2 <- s2 e^{2(m - m')},  t <- e^{m - m'} (t + (m - m') s1)
// An empty state (m = -inf) has nothing to rescale; computing it would give 0 * -inf = NaN.
template <typename T>
PGK_HD SoftmaxState<T> rescale(const SoftmaxState<T>& s, T m_new) {
  if (s.m == neg_inf<T>()) return {m_new, T(0), T(0), T(0)};
  const T delta = s.m - m_new;  // <= 0, NaN when either max is NaN or both are +inf
  const T a = std::exp(delta);
  return {m_new, a * s.s1, a * a * s.s2, a * (s.t + delta * s.s1)};
}

// The merge rule of SPEC section 1. Deterministic: merge(a, b) is a fixed function of (a, b).
template <typename T>
PGK_HD SoftmaxState<T> merge(const SoftmaxState<T>& a, const SoftmaxState<T>& b) {
  if (b.m == neg_inf<T>()) return a;
  if (a.m == neg_inf<T>()) return b;
  const T m = max_nan(a.m, b.m);
  const SoftmaxState<T> ra = rescale(a, m);
  const SoftmaxState<T> rb = rescale(b, m);
  return {m, ra.s1 + rb.s1, ra.s2 + rb.s2, ra.t + rb.t};
}

// A row is valid when its max is finite: all -inf (empty), any NaN or any +inf make it NaN.
template <typename T>
PGK_HD bool state_is_valid(const SoftmaxState<T>& s) {
  return s.m > neg_inf<T>() && s.m < -neg_inf<T>();
}

template <typename T>
struct TokenStatsRow {
  T logprob;    // z_c - L
  T entropy;    // log s1 - t / s1
  T collision;  // s2 / s1^2
  T lgp;        // 1 - 2 p_c + C, as (1 - p_c)^2 + (C - p_c^2), clamped >= 0
  T lse;        // m + log s1
  T max_prob;   // e^{m - L} = 1 / s1
};

// SPEC section 2 from a finished row state and the label's scaled logit z_c.
template <typename T>
PGK_HD TokenStatsRow<T> finalize_token_stats(const SoftmaxState<T>& s, T z_label) {
  if (!state_is_valid(s)) {
    const T nan = quiet_nan<T>();
    return {nan, nan, nan, nan, nan, nan};
  }
  const T log_s1 = std::log(s.s1);
  const T lse = s.m + log_s1;
  const T logprob = z_label - lse;
  const T collision = s.s2 / (s.s1 * s.s1);
  const T p_c = std::exp(logprob);
  // Two non-negative terms instead of 1 - 2 p_c + C: no cancellation when p_c -> 1.
  T lgp = (T(1) - p_c) * (T(1) - p_c) + (collision - p_c * p_c);
  lgp = lgp > T(0) ? lgp : T(0);
  return {logprob, log_s1 - s.t / s.s1, collision, lgp, lse, T(1) / s.s1};
}

// Backward of SPEC section 3. With d_j = z_j - L = log p_j:
//   dz_j = g_l (1[j=c] - p_j) + g_H (-p_j (d_j + H)) + g_C (2 p_j (p_j - C)) + g_L p_j
//        = p_j (a + b d_j + c p_j) + g_l 1[j=c]
// so one exp and three FMAs per element. Multiply by 1 / tau for the gradient w.r.t. x.
template <typename T>
struct TokenStatsGradCoef {
  T a;  // g_L - g_l - g_H H - 2 g_C C
  T b;  // -g_H
  T c;  // 2 g_C
};

template <typename T>
PGK_HD TokenStatsGradCoef<T> token_stats_grad_coef(T g_logprob, T g_entropy, T g_collision,
                                                   T g_lse, T entropy, T collision) {
  return {g_lse - g_logprob - g_entropy * entropy - T(2) * g_collision * collision, -g_entropy,
          T(2) * g_collision};
}

}  // namespace pg_kernels
