// Per-row softmax statistics shared by the CPU (C++) and CUDA kernels.
//
// The accumulator of docs/math.md §1: over a row of z = x / tau, keep
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

// x / tau rounded once (IEEE division's result) without a division, given r = RN(1 / tau) (one
// division per row): q = RN(x r) is within an ulp of x / tau, its residual x - q tau is exact
// in one fma, and q + rem r rounds to RN(x / tau) (Markstein; checked bitwise against x / tau
// for fp32 over every significand at several exponents and temperatures; only quotients near
// the subnormal range, whose residual underflows, or within an ulp of overflow can differ). A q that is not finite (x =
// +-inf or NaN, or x r overflowed) is the quotient itself.
template <typename T>
PGK_HD T quotient_rn(T x, T tau, T r) {
  const T q = x * r;
  const T rem = std::fma(-q, tau, x);
  return q - q == T(0) ? std::fma(rem, r, q) : q;
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
// m - m' is clamped where its exp is already 0: a state of finfo.min logits is -3.4e38 below
// a real max, and (m - m') s1 would overflow into 0 * -inf = NaN as well.
template <typename T>
PGK_HD SoftmaxState<T> rescale(const SoftmaxState<T>& s, T m_new) {
  if (s.m == neg_inf<T>()) return {m_new, T(0), T(0), T(0)};
  T delta = s.m - m_new;  // <= 0, NaN when either max is NaN or both are +inf
  if (delta < exp_zero_below<T>()) delta = exp_zero_below<T>();
  const T a = std::exp(delta);
  return {m_new, a * s.s1, a * a * s.s2, a * (s.t + delta * s.s1)};
}

// The merge rule of docs/math.md §1. Deterministic: merge(a, b) is a fixed function of (a, b).
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
  T logprob;    // (z_c - m) - log s1 = z_c - L
  T entropy;    // log s1 - t / s1
  T collision;  // s2 / s1^2
  T lgp;        // 1 - 2 p_c + C, as ((s1 - e_c)^2 + (s2 - e_c^2)) / s1^2, clamped >= 0
  T lse;        // m + log s1
  T max_prob;   // e^{m - L} = 1 / s1
};

// The row max's own term in a row state's sums, where it did not enter as exactly 1 (CUDA's
// 16-bit forward: e = 2^eps, eps the rounding residual of its base-2 exponent): e as summed,
// log_e = log e, and d the exponent it was summed with (t holds e d). {1, 0, 0} elsewhere.
template <typename T>
struct MaxTerm {
  T e, log_e, d;
};

// docs/math.md §2 from a finished row state and the label's scaled logit relative to the
// row max, d_c = z_c - m. With a max term e != 1 the sums are relative to m - log e: every
// output is taken relative to that very term (log s1 - log e, max_prob = e / s1 <= 1, its t
// term as e log e), so the max's own rounding cancels instead of shifting lse and log p_c.
template <typename T>
PGK_HD TokenStatsRow<T> finalize_token_stats_relative(const SoftmaxState<T>& s, T d_label,
                                                      MaxTerm<T> max = {T(1), T(0), T(0)}) {
  if (!state_is_valid(s)) {
    const T nan = quiet_nan<T>();
    return {nan, nan, nan, nan, nan, nan};
  }
  const T log_s1 = std::log(s.s1) - max.log_e;
  const T lse = s.m + log_s1;
  // Relative to the max, not z_c - L: L carries ulp(L) (~4e-6 at L ~ 40), which would swamp
  // log p_c ~ -1e-4 on a peaked row; z_c - m is exact near the max.
  const T logprob = d_label - log_s1;
  const T collision = s.s2 / (s.s1 * s.s1);
  // 1 - 2 p_c + C as ((s1 - e_c)^2 + (s2 - e_c^2)) / s1^2, e_c the label's term in the sums:
  // (1 - p_c)^2 + sum_{j != c} p_j^2, and at the label = argmax (e_c = the max's own term) the
  // rests s1 - e_c, s2 - e_c^2 come out of the sums exactly. (1 - p_c)^2 + (C - p_c^2) took
  // the second term as a difference of two rounded numbers ~1: an lgp of 2.0e-17 read 2^-53.
  const T e_c = max.e * std::exp(d_label);
  const T rest1 = s.s1 - e_c;
  T lgp = (rest1 * rest1 + (s.s2 - e_c * e_c)) / (s.s1 * s.s1);
  lgp = lgp > T(0) ? lgp : T(0);
  // entropy = log s1 - t / s1 with t's max term e d taken as e log e, written relative to that
  // term: log(s1 / e) + log e (s1 - e) / s1 - rest / s1, rest = t - e d. t holds e d rounded in
  // fp32 (CUDA's 16-bit sums: ~4 roundings), ~2^-24 |e d| off: a rest within that is none (a
  // near one-hot bf16 row's entropy of 2.4e-16 came out 2.3e-14 on an H200), else the mass of
  // the other entries would be that rounding. With e = 1, d = 0 this is log s1 - t / s1.
  T rest = s.t - max.e * max.d;
  if (std::fabs(rest) <= std::fabs(max.e * max.d) * T(0x1p-22)) rest = T(0);
  const T entropy = (std::log(s.s1) - max.log_e) + (max.log_e * (s.s1 - max.e) - rest) / s.s1;
  return {logprob, entropy, collision, lgp, lse, max.e / s.s1};
}

// The same from the label's scaled logit z_c.
template <typename T>
PGK_HD TokenStatsRow<T> finalize_token_stats(const SoftmaxState<T>& s, T z_label) {
  return finalize_token_stats_relative(s, z_label - s.m);
}

// Backward of docs/math.md §3. With d_j = z_j - L = log p_j:
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


// ---- topk_kl (docs/math.md §4, top-k rollout / teacher) ------------------------------------
// q is known on K distinct ids (log q_v given) plus one tail bucket of mass
// q_tail = 1 - sum_K q_v; p's tail P_tail is the mass of p off the K ids.
//   KL_k = sum_K q_v (log q_v - log p_v) + q_tail (log q_tail - log P_tail)

// One bucket's term q (log q - log p): exactly 0 when q = 0 (also against log p = -inf),
// +inf when q > 0 meets p = 0, NaN when log q is NaN.
template <typename T>
PGK_HD T kl_term(T q, T log_q, T log_p) {
  return q == T(0) ? T(0) : q * (log_q - log_p);
}

// q's tail mass from rest = 1 - Q_K, Q_K = sum_K q_v (taken by the caller as accurately as it
// can: -expm1(log q_max) - the other q's): rest clamped >= 0 (engines round log-probs, so Q_K
// can exceed 1 slightly), and exactly 0 when the K ids cover the vocabulary (no tail bucket:
// 1 - Q_K is then rounding noise that would meet P_tail = 0 and give +inf).
// Against a tail with no finite logit, 1 - sum_K q_v at most this is the K log-probs' own
// rounding (eps each, and the sum's), not a tail bucket: 2 K eps of the accumulation type
// (pg_kernels.reference.topk_kl and the Triton kernels use the same bound).
template <typename T>
PGK_HD T topk_tail_noise(int64_t K) {
  return T(2) * T(K) * std::numeric_limits<T>::epsilon();
}

template <typename T>
PGK_HD T topk_q_tail(T rest, bool has_tail) {
  return (has_tail && rest > T(0)) ? rest : T(0);
}

template <typename T>
struct TopkNormalizer {
  T lse;        // L = logsumexp of the whole row
  T logp_tail;  // log P_tail = LSE_tail - L; -inf when the tail has no finite logit
  T m;          // the row's max z, and
  T log_s;      // log sum_v exp(z_v - m) = L - m: log p_v = (z_v - m) - log_s, exact as
                // p_v -> 1 where z_v - L would lose ulp(L) (|z| ~ 1e4 at a small temperature)
};

// The tail is summed separately, relative to its own max (s_tail = sum_{v not in K}
// exp(z_v - m_tail), which holds the tail max's own term 1), so log P_tail has no
// 1 - sum_K p_v cancellation and no underflow however far the tail lies below the head. The
// head enters as its max m_head and head_rest = sum_K exp(z_v - m_head) without one entry at
// m_head (the head's sum is 1 + head_rest). log s = log1p(rest), rest = the row's sum
// relative to its max without the max's own 1: log(1 + rest) rounds away a rest below ulp(1)
// (a near one-hot row's log p at the max, hence its KL). Meant for T = double (the CPU kernel
// finishes fp32 rows in double: in fp32, log s = log(tail + head) put ulp(log s) / 2 into
// every log-prob).
template <typename T>
PGK_HD TopkNormalizer<T> topk_normalizer(T m_tail, T s_tail, T m_head, T head_rest) {
  const bool tail_empty = m_tail == neg_inf<T>(), head_empty = m_head == neg_inf<T>();
  T m, head, tail, rest;
  if (!head_empty && (tail_empty || m_head >= m_tail)) {  // the head holds the row max
    m = m_head;
    head = T(1) + head_rest;
    tail = tail_empty ? T(0) : s_tail * std::exp(m_tail - m);
    rest = head_rest + tail;
  } else {  // the tail does (finite for a valid row)
    m = m_tail;
    head = head_empty ? T(0) : (T(1) + head_rest) * std::exp(m_head - m);
    tail = s_tail;
    rest = (s_tail - T(1)) + head;
  }
  const T log_s = std::log1p(rest);
  // A tail that holds most of the mass (log P_tail near 0) as -log1p(head / tail): the
  // difference of log s_tail and log s, two O(log V) numbers each rounded once, cancelled to
  // their roundings (fp32 [1, 321], k = 2, near-uniform rows: KL error 4.8e-7 where plain
  // PyTorch's was 2.3e-10). A far tail (head / tail > 1e30, log P_tail < -69) from the logs.
  T logp_tail = neg_inf<T>();
  if (!tail_empty) {
    logp_tail = head <= tail * T(1e30) ? -std::log1p(head / tail)
                                       : (m_tail - m) + std::log(s_tail) - log_s;
  }
  return {m + log_s, logp_tail, m, log_s};
}

// Gradient of KL_k w.r.t. z (derivation: d log p_v = e_v - p, d log P_tail = 1[j not in K]
// p_j / P_tail - p_j). With Q = Q_K + q_tail (= 1 unless Q_K > 1 clamped q_tail to 0):
//   j in K:      dKL/dz_j = Q p_j - q_j
//   j not in K:  dKL/dz_j = p_j (Q - q_tail / P_tail)      (= Q p_j - q_tail p_j / P_tail:
//                p minus q spread over the tail in proportion to p)
// The tail factor is kept in the log domain, dKL/dz_j = sign exp(z_j - L + tail_log), so that
// q_tail / P_tail may be huge (tail far below the head) without p_j underflowing to 0 times
// an overflowed factor. tail_log = -inf (factor 0) when q_tail = 0 and Q = 0, or when the tail
// has no finite logit (P_tail = 0: its logits are -inf and get 0; if q_tail > 0 the KL is +inf
// and the head keeps its finite limit Q p_j - q_j).
template <typename T>
struct TopkKLGradCoef {
  T head;      // Q
  T tail_log;  // log |Q - q_tail / P_tail|
  T tail_sign; // +1 or -1 (0 when tail_log = -inf)
};

template <typename T>
PGK_HD TopkKLGradCoef<T> topk_kl_grad_coef(T q_head_sum, T q_tail, T logp_tail) {
  const T q_all = q_head_sum + q_tail;
  if (q_tail == T(0)) {
    return {q_all, std::log(q_all), q_all > T(0) ? T(1) : T(0)};
  }
  if (logp_tail == neg_inf<T>()) return {q_all, neg_inf<T>(), T(0)};
  const T log_ratio = std::log(q_tail) - logp_tail;  // log(q_tail / P_tail), finite
  const T log_q = std::log(q_all);                   // q_all >= q_tail > 0
  if (log_ratio > log_q) {  // log(ratio - Q) = log_ratio + log(1 - Q / ratio)
    return {q_all, log_ratio + std::log1p(-std::exp(log_q - log_ratio)), T(-1)};
  }
  // log(Q - ratio); -inf (factor 0) when they are equal
  return {q_all, log_q + std::log1p(-std::exp(log_ratio - log_q)), T(1)};
}

// ---- pruned_logprob (docs/math.md §6, safe vocabulary) -------------------------------------
// S = {v : z_v >= m + log alpha} plus the label c. With every sum relative to the row max m,
// the label masked out of both (it is added back through e_c = exp(z_c - m)):
//   s_in  = sum_{v in S, v != c} exp(z_v - m),   s_out = sum_{v not in S, v != c} exp(z_v - m)
// LSE_S = m + log(s_in + e_c), L = m + log(s_in + s_out + e_c), and the tail mass
// 1 - exp(LSE_S - L) = s_out / (s_in + s_out + e_c) is a ratio of positive sums (no
// cancellation when the tail is tiny). s_in + e_c >= 1 (the max is in S), so it lies in [0, 1).
template <typename T>
struct PrunedRow {
  T logprob;    // z_c - LSE_S
  T tail_mass;  // 1 - p(S)
  T lse_safe;   // LSE_S, saved for backward
  bool in_safe; // z_c >= threshold
};

template <typename T>
PGK_HD PrunedRow<T> finalize_pruned(T m, T threshold, T s_in, T s_out, T z_label) {
  if (!(m > neg_inf<T>() && m < -neg_inf<T>())) {
    const T nan = quiet_nan<T>();
    return {nan, nan, nan, false};
  }
  const T e_c = std::exp(z_label - m);  // 0 for a -inf label
  const T s_safe = s_in + e_c;
  const T lse_safe = m + std::log(s_safe);
  return {z_label - lse_safe, s_out / (s_safe + s_out), lse_safe, z_label >= threshold};
}

// ---------------------------------------------------------------------------------------------
// Divergences between two distributions over the same vocabulary (docs/math.md §4).
//
// A "pair" pass reads a weight side w = softmax(z_w) and an other side v = softmax(z_v) and
// keeps, besides each side's max and sum of exps,
//   u = sum_j e^{d_w,j} (d_w,j - d_v,j),   d_w = z_w - m_w,  d_v = z_v - m_v
// so that KL(w || v) = sum w (log w - log v) = u / s1_w - log s1_w + log s1_v.
// Keeping u relative to both maxes (instead of sum e^{d_w} (z_w - z_v)) makes the result
// invariant to constant shifts of either side: no cancellation of m_w - m_v at the end.
// Of near-equal rows that form cancels O(1) logs to a KL of O(delta^2) (delta_j = d_v,j - d_w,j,
// the per-entry log-ratio up to a constant), and each exp's rounding (~1e-7 in fp32) shows up
// absolutely. So the pass also keeps the excess
//   k = sum_j e^{d_w,j} f(delta_j),  f(x) = e^x - 1 - x >= 0
// (each term O(delta^2), accurate relative to itself: f from its Taylor series where
// |delta_j| < 1/4), and with r = s1_v / s1_w - 1 = (k - u) / s1_w,
//   KL = u / s1_w + log1p(r) = k / s1_w - (r - log1p(r)),
// whose error scales with the KL where r is small (finalize_kl).
// Reverse KL(p || q) is the pair (w = p, v = q); forward KL(q || p) the pair (w = q, v = p).
//
// A term with w_j = 0 is exactly 0, whatever v_j. A term with w_j > 0 and v_j = 0 (z_v = -inf)
// makes the KL +inf: it is kept out of u and recorded in `inf` instead, so that u stays finite
// and every rescale below stays NaN-free.
template <typename T>
struct PairState {
  T m_w;   // max of z_w; -inf while no finite z_w has been seen
  T s1_w;  // sum exp(z_w - m_w)
  T m_v;   // max of z_v
  T s1_v;  // sum exp(z_v - m_v)
  T u;     // sum exp(z_w - m_w) ((z_w - m_w) - (z_v - m_v)) over terms with z_v > -inf
  T k;     // sum exp(z_w - m_w) f((z_v - m_v) - (z_w - m_w)), f(x) = e^x - 1 - x (0 where the
           // term went to inf)
  bool inf;  // some term has w_j > 0 and v_j = 0
};

template <typename T>
PGK_HD PairState<T> empty_pair() {
  return {neg_inf<T>(), T(0), neg_inf<T>(), T(0), T(0), T(0), false};
}

// f(x) = e^x - 1 - x = x^2 sum_n x^n / (n + 2)!: its Taylor coefficients 1 / (n + 2)!, and how
// many of them a type needs for |x| < 1/4 (the first one left out is below half an ulp of f
// there): fp32 6 (to x^5), fp64 12 (to x^11).
PGK_HD constexpr double excess_coef(int n) {
  constexpr double c[12] = {0.5, 1.6666666666666666e-01, 4.1666666666666664e-02,
                            8.333333333333333e-03, 1.3888888888888889e-03, 1.984126984126984e-04,
                            2.48015873015873e-05, 2.7557319223985893e-06, 2.755731922398589e-07,
                            2.505210838544172e-08, 2.08767569878681e-09, 1.6059043836821613e-10};
  return c[n];
}

template <typename T>
constexpr int kExcessTerms = sizeof(T) == 8 ? 12 : 6;

// f(x) = e^x - 1 - x accurate relative to itself: the series where |x| < 1/4, expm1(x) - x
// elsewhere (which cancels at most ~8x there).
template <typename T>
PGK_HD T expm1_excess(T x) {
  if (!(x < T(0.25) && x > T(-0.25))) return std::expm1(x) - x;
  T p = T(excess_coef(kExcessTerms<T> - 1));
  for (int n = kExcessTerms<T> - 2; n >= 0; --n) p = p * x + T(excess_coef(n));
  return x * x * p;
}

// Rescale a pair state to new (not smaller) maxes. With D_w = m_w - m_w', D_v = m_v - m_v':
//   s1_w <- e^{D_w} s1_w,  s1_v <- e^{D_v} s1_v,  u <- e^{D_w} (u + (D_w - D_v) s1_w)
//   k <- e^{D_v} k - e^{D_w} (expm1(D) u - f(D) s1_w),  D = D_v - D_w
// since every term's d_w moves by D_w and its d_v by D_v (delta_j by D, and
// f(delta + D) = e^D f(delta) + expm1(D) delta + f(D)); for |D| >= 1/4 as
// e^{D_v} k - (e^{D_v} - e^{D_w}) u + (e^{D_v} - e^{D_w} (1 + D)) s1_w, the same without e^D
// (which overflows where both maxes jump far). Term by term this holds for any term, also
// those of w_j = 0 (k_j = e_v,j: the pass's terms are e_v - e_w - e_w delta). An empty side
// (m = -inf) has nothing to rescale: its sums are 0, and an empty v side means every
// w-weighted term so far went to `inf`, so u and k hold no term to shift (the KL is +inf or
// s1_w = 0).
template <typename T>
PGK_HD PairState<T> rescale_pair(const PairState<T>& s, T m_w_new, T m_v_new) {
  const bool has_w = s.m_w != neg_inf<T>(), has_v = s.m_v != neg_inf<T>();
  const T dw = has_w ? s.m_w - m_w_new : T(0);
  const T dv = has_v ? s.m_v - m_v_new : T(0);
  const T a_w = has_w ? std::exp(dw) : T(0);
  const T a_v = has_v ? std::exp(dv) : T(0);
  const T d = dv - dw;
  T k = a_v * s.k;
  if (d != T(0)) {
    if (d < T(0.25) && d > T(-0.25)) {
      k = k - a_w * (std::expm1(d) * s.u - expm1_excess(d) * s.s1_w);
    } else {
      // Or, since k = s1_v - s1_w + u term by term, a_v s1_v + a_w (u - (1 + D) s1_w), which
      // takes no k: whichever rounds less. Where the state's own frames differ a lot (a chunk
      // whose w entries sit far above its v entries relative to each side's chunk max: k and u
      // ~1400 there) and its w side drops far below the row's (a_w = e^-6), the first form
      // cancels those undamped to a moved k of ~3 (a KL of 3.76 came out 1.1e-4 off, plain
      // 1e-6; another of 0.157 5.5e-6 off); the second adds a_w-damped terms to a_v s1_v.
      const T by_u = (a_v - a_w) * s.u, by_s = (a_v - a_w * (T(1) + d)) * s.s1_w;
      const T first = k - by_u + by_s;
      const T first_size = std::abs(k) + std::abs(by_u) + std::abs(by_s);
      const T from_v = a_v * s.s1_v, w_s = (T(1) + d) * s.s1_w;
      const T second = from_v + a_w * (s.u - w_s);
      const T second_size = from_v + a_w * (std::abs(s.u) + std::abs(w_s));
      k = second_size < first_size ? second : first;
    }
  }
  return {m_w_new, a_w * s.s1_w, m_v_new, a_v * s.s1_v, a_w * (s.u + (dw - dv) * s.s1_w), k,
          s.inf};
}

// Join two partial pair states (chunks, threads, vocab shards). Deterministic in (a, b).
template <typename T>
PGK_HD PairState<T> merge_pair(const PairState<T>& a, const PairState<T>& b) {
  const T m_w = max_nan(a.m_w, b.m_w), m_v = max_nan(a.m_v, b.m_v);
  const PairState<T> ra = rescale_pair(a, m_w, m_v), rb = rescale_pair(b, m_w, m_v);
  return {m_w, ra.s1_w + rb.s1_w, m_v, ra.s1_v + rb.s1_v, ra.u + rb.u, ra.k + rb.k,
          a.inf || b.inf};
}

template <typename T>
PGK_HD bool side_is_valid(T m) {
  return m > neg_inf<T>() && m < -neg_inf<T>();
}

// finalize_kl takes the excess form below this KL: there the logs' form would lose digits
// (~1e-7 absolute of log s1 against a small KL), above it the excess form may (its moves).
constexpr double kNearKl = 0.25;

// KL(w || v) from a finished pair state: NaN if either side is invalid, +inf if some w_j > 0
// has v_j = 0, else u / s1_w - log s1_w + log s1_v clamped at 0 (the exact value is >= 0;
// rounding can leave -1e-8 when w = v). Of near-equal rows (that KL below kNearKl and
// |r| < 1/2, r = s1_v / s1_w - 1 = (k - u) / s1_w) it is k / s1_w - (r - log1p(r)) instead:
// no O(1) term cancels, and the exps' roundings enter relative to the KL (k) or damped by r
// (u). Far from it k / s1_w and r would cancel (k ~ s1_v); the logs do not. Rows far apart
// can have normalizers within 1/2 by chance (|r| = 0.4999 on the fuzzer's fp32 [1, 4095] row,
// whose KL of 3.76 came out 1.1e-4 off through k's moves, now fixed in rescale_pair): above
// kNearKl the logs' form is accurate and k is not needed.
template <typename T>
PGK_HD T finalize_kl(const PairState<T>& s) {
  if (!side_is_valid(s.m_w) || !side_is_valid(s.m_v)) return quiet_nan<T>();
  if (s.inf) return -neg_inf<T>();
  // The two logs first: when the normalizers agree they cancel exactly, and u / s1_w, which can
  // be far below either log, is added to their difference, not rounded to ulp(log s1) (a
  // double pass, fp64 or a refined fp32 row, with s1 = 1 + 1.1e-13 on both sides: u rounded to
  // the grid of 1.1e-13, 2^-94 = 5.0e-29 where the truth is 5.4e-29).
  const T kl = s.u / s.s1_w + (std::log(s.s1_v) - std::log(s.s1_w));
  const T r = (s.k - s.u) / s.s1_w;
  if (r < T(0.5) && r > T(-0.5) && kl < T(kNearKl)) {
    const T near = s.k / s.s1_w - (r - std::log1p(r));
    return near > T(0) ? near : T(0);
  }
  return kl < T(0) ? T(0) : kl;  // a NaN stays NaN (an overflow, never a silent 0)
}

// Gradients of KL(w || v) (one pass, recomputing w_j and v_j):
//   dKL/dz_w,j = w_j ((log w_j - log v_j) - KL)     (0 where w_j = 0)
//   dKL/dz_v,j = v_j - w_j
// In terms of d = z - m (each side's max; exact for the max entry itself) and l = log s1:
//   w_j = e^{d_w,j - l_w},  v_j = e^{d_v,j - l_v},
//   log w_j - log v_j - KL = (d_w,j - l_w) - (d_v,j - l_v) - (u / s1_w - l_w + l_v)
//                          = (d_w,j - d_v,j) - c,   c = u / s1_w = E_w[d_w - d_v]
// The log s1 terms cancel exactly, so the backward takes c from the forward instead of
// rebuilding it from KL (two roundings of O(log V) numbers fewer). Working from z - L instead
// of z - m would lose ulp(L) of every log-prob (L ~ 50 on peaked rows).
template <typename T>
PGK_HD T kl_grad_shift(const PairState<T>& s) {
  return s.u / s.s1_w;
}

}  // namespace pg_kernels
