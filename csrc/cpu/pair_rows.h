// The pair pass of two logit tensors on the CPU (docs/math.md §§4 and 5), shared by
// divergence.cpp (kl_divergence, mismatch_stats) and step_stats.cpp: the per-lane pair sums
// (PairLanes), a chunk's pair state, the row's Neumaier sum of chunk states, the pass over a
// row, total variation from kept exps, the saved row state and the KL gradient row. See
// divergence.cpp's header for the design.
//
// Every chunk is loaded as d = (x - xm) / tau relative to its side's raw max xm
// (vec_rows.h's shift_divide_chunk), as token_stats' rows are, not as z - m from z = x / tau
// rounded: near the max, where the mass is, d is then nearly exact (z - m carried ulp(z) / 2 of
// z and of m; an fp32 KL of 2.0e-4 at tau 0.252, |z| ~ 50-64, was off by 3.9e-8 where plain
// PyTorch was 3.5e-9). The sums refer to xm / tau in row_sum_t (Temperature::reference).
// fp64 logits keep z = x / tau, divided first, then d = z - max z (PairFrame): the float64
// reference rounds z alike, and against a 50-digit truth the difference form measured 3.9e-12
// relative gradient error where z = x / tau and plain fp64 PyTorch have 1.1e-12 (fp64 [1, 3] at
// |z| ~ 1e4; the fuzzer, seed 20261201).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <memory>
#include <optional>

#include "vec_rows.h"

namespace pg_kernels::cpu {

// dst[0, n) = buf[0, n), rounded once to the output dtype.
template <typename acc_t, typename scalar_t>
void store_row(const acc_t* buf, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(buf, buf + n, dst);
  } else {
    at::vec::convert(buf, dst, n);
  }
}

// How a pair pass loads a side's logits: as x, with d = (x - xm) / tau formed per chunk under
// the row's temperature (fp32 and 16-bit logits), or, for fp64 logits, as z = x / tau rounded,
// with d = z - max z under unit temperature (see the header). `tau`: the temperature d is formed
// under; xm, the maxes and the references are in the loaded values' units.
template <typename acc_t>
struct PairFrame {
  static constexpr bool kDivideFirst = std::is_same_v<acc_t, double>;
  Temperature<acc_t> row_tau, tau;
  explicit PairFrame(Temperature<acc_t> t)
      : row_tau(t), tau(kDivideFirst ? temperature(acc_t(1)) : t) {}
  template <typename scalar_t>
  acc_t load(const scalar_t* src, int64_t n, acc_t* buf) const {  // returns the chunk's max
    if constexpr (kDivideFirst) return load_quotient_chunk(src, n, row_tau.tau, row_tau.r, buf);
    return load_chunk(src, n, buf);
  }
  acc_t value(acc_t x) const { return kDivideFirst ? row_tau.divide(x) : x; }  // one entry
};

// A pair pass sums and finishes a row in row_sum_t<acc_t> (vec_rows.h). The KL of near-equal
// rows, u / s1_w - log s1_w + log s1_v, cancels O(1) terms; with s1 summed in fp32 each log s1
// carried ~1e-7 (fp32 [2, 257], per-row tau: token_kl 4.8e-7 where the truth is ~0 and plain
// PyTorch's error 3.7e-8).

// d_w - d_v of one vector of a pair pass (dw clamped, dw_raw not), with the v side's d_v kept
// out of u where v_j = 0: the term is +inf when w_j > 0 (recorded in `inf`), and taking
// d_v = d_w there makes its difference 0. w_j > 0 is read off the logit (d_w > -inf), not off
// e_w: a finite logit whose e_w underflows (d_w < -104 in fp32) still has mass, and the KL is
// +inf at every precision, as the float64 reference and the Triton kernels give it.
template <typename acc_t>
PGK_VECTOR_INLINE Vec<acc_t> pair_difference(const Vec<acc_t>& dw, const Vec<acc_t>& dw_raw,
                                             const Vec<acc_t>& dv, Vec<acc_t>& inf) {
  const Vec<acc_t> ninf(neg_inf<acc_t>());
  const Vec<acc_t> v_zero = dv == ninf;
  inf = inf | (v_zero & (dw_raw > ninf));
  return dw - Vec<acc_t>::blendv(dv, dw, v_zero);
}

// The end of a chunk's run of full two-vector steps that may take the unmasked pair path.
template <typename acc_t>
int64_t unmasked_end(bool v_has_no_neg_inf, int64_t n) {
  constexpr int64_t step = 2 * Vec<acc_t>::size();
  return v_has_no_neg_inf ? n / step * step : 0;
}

// f(delta) = e^delta - 1 - delta (softmax_stats.h, expm1_excess) of each lane, delta = -diff,
// from its series: diff^2 P(-diff) with P(x) = sum_n x^n / (n + 2)! (excess_coef), accurate
// relative to f where |diff| < 1/4 (garbage elsewhere).
template <typename acc_t>
PGK_VECTOR_INLINE Vec<acc_t> excess_series(const Vec<acc_t>& diff) {
  const auto coef = [](int n) {
    return Vec<acc_t>(acc_t(n % 2 ? -excess_coef(n) : excess_coef(n)));
  };
  Vec<acc_t> p = coef(kExcessTerms<acc_t> - 1);
  for (int n = kExcessTerms<acc_t> - 2; n >= 0; --n) p = at::vec::fmadd(p, diff, coef(n));
  return diff * diff * p;
}

// f(-diff) and f(diff) together (add_near_from_v needs both): with y = diff^2 and the series
// split by parity, S(x) = E(y) + x O(y), f(+-diff) = y E +- y diff O, one shared evaluation
// (fp32: 9 operations against 15 for two excess_series). Returns f(-diff); f(diff) in f_plus.
template <typename acc_t>
PGK_VECTOR_INLINE Vec<acc_t> excess_series_both(const Vec<acc_t>& diff, Vec<acc_t>& f_plus) {
  constexpr int n = kExcessTerms<acc_t>;
  const auto coef = [](int k) { return Vec<acc_t>(acc_t(excess_coef(k))); };
  const Vec<acc_t> y = diff * diff;
  int top_even = (n - 1) % 2 == 0 ? n - 1 : n - 2, top_odd = (n - 1) % 2 ? n - 1 : n - 2;
  Vec<acc_t> even = coef(top_even), odd = coef(top_odd);
  for (int k = top_even - 2; k >= 0; k -= 2) even = at::vec::fmadd(even, y, coef(k));
  for (int k = top_odd - 2; k >= 1; k -= 2) odd = at::vec::fmadd(odd, y, coef(k));
  const Vec<acc_t> ye = y * even, yd = y * diff;
  f_plus = at::vec::fmadd(yd, odd, ye);
  return at::vec::fnmadd(yd, odd, ye);
}

template <typename acc_t>
PGK_VECTOR_INLINE Vec<acc_t> near_lanes(const Vec<acc_t>& diff) {
  return diff.abs() < Vec<acc_t>(acc_t(0.25));  // NaN / inf: not near
}

// The excess terms e_w,j f(delta_j) of one vector (softmax_stats.h, PairState::k), delta =
// d_v - d_w = -diff (diff from pair_difference: 0 where v_j = 0, a term that went to inf).
// Where |delta_j| < 1/4, e_w f from the series (accurate relative to the term, ~delta^2 / 2);
// elsewhere e_v - e_w - e_w delta from the exps (the term is then >= 0.028 e_w, their roundings
// a few ulps of it), which also gives e_v for w_j = 0. No exp.
template <typename acc_t>
PGK_VECTOR_INLINE Vec<acc_t> excess_terms(const Vec<acc_t>& ew, const Vec<acc_t>& ev,
                                          const Vec<acc_t>& diff) {
  const Vec<acc_t> far = at::vec::fmadd(ew, diff, ev - ew);
  return Vec<acc_t>::blendv(far, ew * excess_series(diff), near_lanes(diff));
}


// Per-lane sums of one chunk of a pair pass: s1_w, s1_v in WideLanes (double lanes for fp32
// rows). u stays in acc_t lanes: its terms e_w (d_w - d_v) are small where the KL cancels
// (near-equal rows), and summing it in double too cost ~10 % more of the fp32 forward
// (kl_divergence at 1024x32000: 68-70 against 62-64 ms) for no measured gain. k, the excess
// sum, stays in acc_t lanes too: its terms are O(e_w delta^2), small beside its total.
template <typename acc_t>
struct PairLanes {
  WideLanes<acc_t> s1w, s1v;
  Vec<acc_t> u{acc_t(0)}, k{acc_t(0)}, inf{acc_t(0)};

  // One vector from exps computed elsewhere (step_stats shares the logits' exp between its
  // sums): dw clamped where exp is already 0 (dw_raw: not clamped), dv not (a tiny v_j is a
  // large, real log-ratio), ew = e^{dw}, ev = e^{max(dv, lowest)}. unmasked
  // (std::true_type): no d_v of the vector is -inf (no_neg_inf), so d_w - d_v needs none of
  // pair_difference's masking. kSumW / kSumV
  // false: that side's s1 lanes are the caller's (step_stats sums the logits' once, in its
  // token lanes, and hands them to both pairs: the same sum bitwise).
  template <bool kSumW = true, bool kSumV = true, typename Unmasked>
  PGK_VECTOR_INLINE void add_exps(Unmasked, const Vec<acc_t>& dw, const Vec<acc_t>& dw_raw,
                                  const Vec<acc_t>& ew, const Vec<acc_t>& dv,
                                  const Vec<acc_t>& ev) {
    Vec<acc_t> diff;
    if constexpr (Unmasked::value) {
      diff = dw - dv;
    } else {
      diff = pair_difference(dw, dw_raw, dv, inf);
    }
    if constexpr (kSumW) s1w.add(ew);
    if constexpr (kSumV) s1v.add(ev);
    u = at::vec::fmadd(ew, diff, u);
    k = k + excess_terms(ew, ev, diff);
  }

  // The same where every lane is near (|diff| < 1/4, diff = d_w - d_v unclamped, so v_j > 0):
  // e_v = e_w (1 + expm1(delta)) from the excess series instead of an exp (returned in ev).
  PGK_VECTOR_INLINE void add_near(const Vec<acc_t>& ew, const Vec<acc_t>& diff, Vec<acc_t>& ev) {
    const Vec<acc_t> f = excess_series(diff);
    ev = at::vec::fmadd(ew, f - diff, ew);
    s1w.add(ew);
    s1v.add(ev);
    u = at::vec::fmadd(ew, diff, u);
    k = at::vec::fmadd(ew, f, k);
  }

  // The same from the other end, e_v given (step_stats: the logits' exp, shared with the token
  // lanes, is the v side of its rollout pair): e_w = e_v e^{diff} = e_v (1 + diff + f(diff)),
  // f(diff) from the same series, instead of an exp (returned in ew). Equal d give e_w = e_v.
  // Both sides' s1 are the caller's (as add_exps<false, false>: step_stats sums them in its
  // token lanes' two chains).
  PGK_VECTOR_INLINE void add_near_from_v(const Vec<acc_t>& ev, const Vec<acc_t>& diff,
                                         Vec<acc_t>& ew) {
    Vec<acc_t> f_diff;
    const Vec<acc_t> f = excess_series_both(diff, f_diff);  // f(delta), delta = -diff
    ew = at::vec::fmadd(ev, diff + f_diff, ev);
    u = at::vec::fmadd(ew, diff, u);
    k = at::vec::fmadd(ew, f, k);
  }

  // The chunk's pair state from its lanes; mw, mv: the references of d_w, d_v.
  PairState<row_sum_t<acc_t>> state(row_sum_t<acc_t> mw, row_sum_t<acc_t> mv) const {
    using sum_t = row_sum_t<acc_t>;
    return {mw, s1w.total(), mv, s1v.total(), sum_t(sum_lanes(u)), sum_t(sum_lanes(k)),
            any_lane_set(inf)};
  }

  // The same from two chains of lanes.
  static PairState<row_sum_t<acc_t>> join(const PairLanes& lo, const PairLanes& hi,
                                          row_sum_t<acc_t> mw, row_sum_t<acc_t> mv) {
    return PairLanes{lo.s1w + hi.s1w, lo.s1v + hi.s1v, lo.u + hi.u, lo.k + hi.k, lo.inf | hi.inf}
        .state(mw, mv);
  }
};

// A chunk's pair state with u and k summed again term by term in row_sum_t where its acc_t
// lanes overflowed. A side masked with a huge finite fill (finfo(float32).min) where the other
// side has mass makes u's terms e_w (d_w - d_v) ~3.4e38 e_w, whose fp32 lane sums overflow
// (their KL, ~1e38 in float64 and in plain fp32 PyTorch, came out 0: inf - inf in the row's
// compensated sum, a NaN the clamp at 0 hid). dw, dv: the chunk's d as the lanes read them.
// Rare (a chunk with such terms); s1 stays the lanes'. A row whose terms overflow row_sum_t too
// (fp64 logits masked with finfo(float64).min) keeps them: its KL reads +inf (RowSum::add).
template <typename acc_t>
PairState<row_sum_t<acc_t>> resum_overflowed(PairState<row_sum_t<acc_t>> s, const acc_t* dw,
                                             const acc_t* dv, int64_t n) {
  using sum_t = row_sum_t<acc_t>;
  const bool finite = std::isfinite(s.u) && std::isfinite(s.k);
  if (finite || s.inf || !side_is_valid(s.m_w) || !side_is_valid(s.m_v)) return s;
  sum_t u = 0, k = 0;
  for (int64_t j = 0; j < n; ++j) {
    const sum_t ew = std::exp(sum_t(dw[j])), ev = std::exp(sum_t(dv[j]));
    if (ew == sum_t(0)) {  // the term is e_v - e_w - e_w delta = e_v (excess_terms)
      k += ev;
      continue;
    }
    const sum_t diff = sum_t(dw[j]) - sum_t(dv[j]);  // v_j > 0 here: `inf` is not set
    u += ew * diff;
    k += ew * expm1_excess(-diff);
  }
  s.u = u;
  s.k = k;
  return s;
}

// One vector of a pair pass from d_w, d_v, each side's scaled logits relative to its chunk's
// reference (shift_divide_chunk). Returns e_w, e_v through ew, ev (kept by mismatch_stats for
// its TV sweep). unmasked: as PairLanes::add_exps.
template <typename Unmasked, typename acc_t>
PGK_VECTOR_INLINE void add_pair(Unmasked unmasked, PairLanes<acc_t>& lanes,
                                const Vec<acc_t>& dw_raw, const Vec<acc_t>& dv, Vec<acc_t>& ew,
                                Vec<acc_t>& ev) {
  const Vec<acc_t> lowest(exp_zero_below<acc_t>());
  // d_w clamped where exp is already 0: -inf weights give e_w = 0 and finite e_w * (...).
  // d_v is not clamped: a tiny v_j is a large, real log-ratio.
  const Vec<acc_t> dw = at::vec::clamp_min(dw_raw, lowest);
  ew = vexp(dw);
  // Near-equal rows (mismatch_stats' rollout, a student near its teacher): every lane of most
  // vectors is near, and e_v comes from the excess series that k needs anyway, not an exp.
  const Vec<acc_t> diff = dw - dv;
  if (all_lanes_set(near_lanes(diff))) {
    lanes.add_near(ew, diff, ev);
    return;
  }
  ev = vexp(at::vec::clamp_min(dv, lowest));
  lanes.add_exps(unmasked, dw, dw_raw, ew, dv, ev);
}

// One chunk of a pair pass. bw, bv hold the chunk as d = (x - xm) / tau (padded with -inf to a
// multiple of kStep); rw, rv are its references xm / tau; v_no_neg_inf: no_neg_inf(bv, n), as
// shift_divide_chunk<true> found it. kKeepExps: e^d into ew_out, ev_out (to round_up(n, kStep)).
// prefetch(i): called once per 2 W elements (the caller's prefetch_next_chunk).
template <typename acc_t, bool kKeepExps, typename Prefetch>
PairState<row_sum_t<acc_t>> pair_chunk(const acc_t* bw, const acc_t* bv, int64_t n,
                                       row_sum_t<acc_t> rw, row_sum_t<acc_t> rv,
                                       bool v_no_neg_inf, acc_t* ew_out, acc_t* ev_out,
                                       const Prefetch& prefetch) {
  constexpr int64_t W = Vec<acc_t>::size();
  PairLanes<acc_t> lo, hi;
  Vec<acc_t> ew, ev;
  const auto step = [&](auto unmasked, int64_t i) __attribute__((always_inline)) {
    prefetch(i);
    add_pair(unmasked, lo, Vec<acc_t>::loadu(bw + i), Vec<acc_t>::loadu(bv + i), ew, ev);
    if constexpr (kKeepExps) {
      ew.store(ew_out + i);
      ev.store(ev_out + i);
    }
    add_pair(unmasked, hi, Vec<acc_t>::loadu(bw + i + W), Vec<acc_t>::loadu(bv + i + W), ew, ev);
    if constexpr (kKeepExps) {
      ew.store(ew_out + i + W);
      ev.store(ev_out + i + W);
    }
  };
  const int64_t n_pad = round_up(n, kStep<acc_t>);
  const int64_t n_unmasked = unmasked_end<acc_t>(v_no_neg_inf, n);
  int64_t i = 0;
  for (; i < n_unmasked; i += 2 * W) step(std::true_type{}, i);
  for (; i < n_pad; i += 2 * W) step(std::false_type{}, i);
  return resum_overflowed(PairLanes<acc_t>::join(lo, hi, rw, rv), bw, bv, n);
}

// Neumaier summation of chunk totals into the row total: on a peaked row one chunk holds an
// O(log V) term of u (the top token's d_w - d_v) and ~V / kChunk later chunks add tiny totals
// to it, each rounding at ulp(u); the low parts below carry those roundings (measured on a
// near one-hot fp64 row at V = 151936 against a 40-digit mpmath truth: gradient error
// 1.2e-14 without, 1.7e-15 with; the fp64 PyTorch reference's is 4.1e-15).
template <typename acc_t>
struct RowSum {
  PairState<acc_t> hi = empty_pair<acc_t>();
  acc_t lo_s1w = 0, lo_s1v = 0, lo_u = 0, lo_k = 0;

  // sum += x, returns the rounding error: none once the sum overflowed (inf - inf would make
  // the total NaN where it is +inf: an fp64 KL past the range, finfo(float64).min masks).
  static acc_t add(acc_t& sum, acc_t x) {
    const acc_t s = sum + x;
    const acc_t e = std::abs(sum) >= std::abs(x) ? (sum - s) + x : (x - s) + sum;
    sum = s;
    return std::isfinite(s) ? e : acc_t(0);
  }

  void merge(const PairState<acc_t>& chunk) {
    const acc_t m_w = max_nan(hi.m_w, chunk.m_w), m_v = max_nan(hi.m_v, chunk.m_v);
    // The low parts rescale like the sums they belong to (rescale_pair, docs/math.md §1).
    const PairState<acc_t> lo =
        rescale_pair(PairState<acc_t>{hi.m_w, lo_s1w, hi.m_v, lo_s1v, lo_u, lo_k, false}, m_w,
                     m_v);
    const PairState<acc_t> a = rescale_pair(hi, m_w, m_v), b = rescale_pair(chunk, m_w, m_v);
    hi = a;
    hi.inf = hi.inf || chunk.inf;
    lo_s1w = lo.s1_w + add(hi.s1_w, b.s1_w);
    lo_s1v = lo.s1_v + add(hi.s1_v, b.s1_v);
    lo_u = lo.u + add(hi.u, b.u);
    lo_k = lo.k + add(hi.k, b.k);
  }

  PairState<acc_t> total() const {
    return {hi.m_w, hi.s1_w + lo_s1w, hi.m_v, hi.s1_v + lo_s1v, hi.u + lo_u, hi.k + lo_k,
            hi.inf};
  }
};

// A side of a pair pass as total_variation scales its kept exps: the row's raw max xm, its
// temperature and log s1 relative to xm / tau. The e^d of chunk k, relative to that chunk's raw
// max xm_k, times scale(xm_k) is the probability: e^{(xm_k - xm) / tau - log s1}, the exponent
// from the exact difference of two logits, in row_sum_t.
template <typename acc_t>
struct ExpScale {
  acc_t xm, tau;
  row_sum_t<acc_t> log_s1;
  row_sum_t<acc_t> exponent(acc_t xm_k) const {
    using sum_t = row_sum_t<acc_t>;
    if (xm_k == neg_inf<acc_t>()) return neg_inf<sum_t>();  // the side is all -inf here: e = 0
    return (sum_t(xm_k) - sum_t(xm)) / sum_t(tau) - log_s1;
  }
};

// Row-sized scratch of one thread for a TV sweep (mismatch_stats, step_stats): e_w, e_v and the
// raw chunk maxes they are relative to. The pass loads each chunk into L1-resident chunk buffers
// and stores only the exps here (256 KiB at V = 32000, in L2): loaded straight into these, every
// chunk's memory-bound load first read their lines from L2 (a write-allocate); step_stats'
// forward went 1.11 -> 1.075 (fp32) and 1.12 -> 1.09 (bf16) x three token_stats, 1024 x 32000.
template <typename acc_t>
struct ExpScratch {
  int64_t padded;
  std::unique_ptr<acc_t[]> data;
  explicit ExpScratch(int64_t V)
      : padded(round_up(V, kStep<acc_t>)),
        data(new acc_t[2 * padded + 2 * ((V + kChunk - 1) / kChunk)]) {}
  acc_t* ew() { return data.get(); }
  acc_t* ev() { return data.get() + padded; }
  acc_t* chunk_xm() { return data.get() + 2 * padded; }
};

// A pair pass's row: its sums, relative to each side's reference xm / tau, each side's max xm
// in PairFrame's units (-inf: no finite entry; NaN: the side holds a NaN) and the temperature
// its d were formed under (PairFrame::tau).
template <typename acc_t>
struct PairRow {
  PairState<row_sum_t<acc_t>> sums;
  acc_t xm_w, xm_v, tau_w, tau_v;
  ExpScale<acc_t> w_scale() const { return {xm_w, tau_w, std::log(sums.s1_w)}; }
  ExpScale<acc_t> v_scale() const { return {xm_v, tau_v, std::log(sums.s1_v)}; }
};

// The pair pass over one row, summed and finished in row_sum_t<acc_t>. Stops early once the
// v side is NaN / +inf (and the w side too when stop_on_w_invalid; mismatch_stats keeps going so
// that the logits' logsumexp survives a broken rollout row). bw, bv: chunk buffers
// (kBufferSize). kKeepExps: `keep` ends up holding every e^d, and keep->chunk_xm()[2k], [2k + 1]
// the raw maxes of chunk k that those d are relative to (total_variation).
template <typename scalar_t, typename acc_t, bool kKeepExps>
PairRow<acc_t> pair_row(const scalar_t* xw, Temperature<acc_t> tau_w, const scalar_t* xv,
                        Temperature<acc_t> tau_v, int64_t V, bool stop_on_w_invalid, acc_t* bw,
                        acc_t* bv, ExpScratch<acc_t>* keep) {
  using sum_t = row_sum_t<acc_t>;
  const PairFrame<acc_t> fw(tau_w), fv(tau_v);
  RowSum<sum_t> row;
  acc_t xm_w = neg_inf<acc_t>(), xm_v = neg_inf<acc_t>();
  acc_t row_max_w = quiet_nan<acc_t>();  // read once, where a chunk's frame kept a -inf
  for (int64_t begin = 0, k = 0; begin < V; begin += kChunk, ++k) {
    const int64_t n = std::min(kChunk, V - begin);
    const acc_t mw = fw.load(xw + begin, n, bw);
    const acc_t mv = fv.load(xv + begin, n, bv);
    shift_divide_chunk(bw, n, fw.tau, finite_shift(mw));
    bool v_no_neg_inf = shift_divide_chunk<true>(bv, n, fv.tau, finite_shift(mv));
    if (!v_no_neg_inf) {
      unmask_overflowed(bw, xw + begin, n, fw.tau);
      if (unmask_overflowed(bv, xv + begin, n, fv.tau, bw)) {  // w's mass in its row's frame
        const acc_t to_row = row_frame_shift(xw, V, mw, fw.tau, row_max_w);
        unmask_overflowed(bv, xv + begin, n, fv.tau, bw, static_cast<const acc_t*>(nullptr),
                          to_row);
      }
      v_no_neg_inf = no_neg_inf(bv, n);
    }
    xm_w = max_nan(xm_w, mw);
    xm_v = max_nan(xm_v, mv);
    acc_t *ew = nullptr, *ev = nullptr;
    if constexpr (kKeepExps) {
      keep->chunk_xm()[2 * k] = mw;
      keep->chunk_xm()[2 * k + 1] = mv;
      ew = keep->ew() + begin;
      ev = keep->ev() + begin;
    }
    const auto prefetch = [&](int64_t i) __attribute__((always_inline)) {
      prefetch_next_chunk<kStep<acc_t>>(xw, begin, V, i);
      prefetch_next_chunk<kStep<acc_t>>(xv, begin, V, i);
    };
    row.merge(pair_chunk<acc_t, kKeepExps>(bw, bv, n, fw.tau.reference(mw), fv.tau.reference(mv),
                                           v_no_neg_inf, ew, ev, prefetch));
    if (!(row.hi.m_v < -neg_inf<sum_t>())) break;  // NaN or +inf: the row is NaN, stop early
    if (stop_on_w_invalid && !(row.hi.m_w < -neg_inf<sum_t>())) break;
  }
  return {row.total(), xm_w, xm_v, fw.tau.tau, fv.tau.tau};
}

// The KL of a pair state is finalize_kl's, in kl_divergence, mismatch_stats' token_kl and
// step_stats' kl and token_kl alike. The pass above sums fp32 rows in double, but its exps are
// fp32 and each term keeps up to an ulp of its rounding: u / s1_w - log s1_w + log s1_v with
// sums of weight 1 is right to ~2^-22 absolute whatever the KL's size (bf16 V = 2, tau 16.7: a
// KL of 9.5e-8 off by 6.5e-9, plain PyTorch 2.3e-10). Near-equal rows finish from the excess
// k instead (excess_terms, softmax_stats.h's finalize_kl), whose terms are relative to
// themselves: 1.0e-11 there. Recomputing small KLs in double, exps included, had made those
// rows 2.4-3.3x slower; the series costs no exp.

// 1/2 sum |w_j - v_j| from the exps a pair_row<kKeepExps> pass left in ew, ev (and step_stats'
// row likewise): w_j = ew_j a_k with a_k = w_scale(xm_w,k), xm_w,k the raw max of the w side in
// the chunk k that holds j (chunk_xm[2k]), v_j = ev_j b_k likewise (chunk_xm[2k + 1]). No exp
// per element. Each chunk sums |x_j - y_j r| times s, with s = max(a_k, b_k) the larger side's
// scale, x_j its exps, y_j the other side's and r = min / max, from expm1 of the two scales'
// exponents' difference once per chunk in row_sum_t; near equal scales (r >= 1/2) as
// |(x_j - y_j) - y_j (r - 1)|: equal exps on equal scales give exactly 0 (identical rows, rows
// shifted by a constant) however the compiler fuses the products, and the top entries of near
// one-hot rows (x_j = y_j = 1) give |r - 1|, which x_j - y_j r with r rounded to acc_t lost
// below ulp(1) / 2 (fp32 rows whose rests are 1e-4 apart at tau 0.5: a TV of 6.3e-10 read
// 3.2e-10, half of it that entry). The log s1 of each side is log(s1) in row_sum_t, so rests
// below 1.1e-16 are still lost there (a TV of 6.2e-18 reads 3.2e-18, as plain fp32 PyTorch).
constexpr int64_t kTvBlock = 4;  // steps of kStep per lane sum in acc_t (total_variation)

template <typename acc_t>
acc_t total_variation(const acc_t* ew, const acc_t* ev, const acc_t* chunk_xm, int64_t V,
                      const ExpScale<acc_t>& w_scale, const ExpScale<acc_t>& v_scale) {
  using sum_t = row_sum_t<acc_t>;
  constexpr int64_t W = Vec<acc_t>::size();
  // The chunks' totals in row_sum_t: in fp32 each add rounded at ulp(TV) / 2 (a one-hot row
  // against a flat one, V = 40000 in 20 chunks: 1.8e-6 off, plain fp32 PyTorch 1.5e-7).
  sum_t total = 0;
  for (int64_t begin = 0, k = 0; begin < V; begin += kChunk, ++k) {
    const int64_t n_pad = round_up(std::min(kChunk, V - begin), kStep<acc_t>);
    const sum_t ea = w_scale.exponent(chunk_xm[2 * k]), eb = v_scale.exponent(chunk_xm[2 * k + 1]);
    const bool w_larger = !(ea < eb);  // NaN exponents: r - 1 below is NaN, and so is the row
    const acc_t s = acc_t(std::exp(w_larger ? ea : eb));
    if (s == acc_t(0)) continue;  // both sides' exps are 0 here
    const acc_t* x = w_larger ? ew : ev;
    const acc_t* y = w_larger ? ev : ew;
    // r = c + r', (c, r') = (1, r - 1) near equal scales, else (0, r): r - 1 near -1 keeps only
    // ulp(1) of r, the same sign in every term (a one-hot row against a flat one, V = 40000:
    // 2.4e-5 off where x - y r is 2e-7).
    const sum_t d = w_larger ? eb - ea : ea - eb;
    const sum_t r1 = std::expm1(d);
    const bool close = r1 >= sum_t(-0.5);
    const Vec<acc_t> c(close ? acc_t(1) : acc_t(0)), r(acc_t(close ? r1 : std::exp(d)));
    // The lanes go to row_sum_t every kTvBlock steps: a lane holding a top entry (~1) rounds
    // each later term at ulp(1) / 2, which 64 steps per chunk made 1.5e-6 of the TV of a
    // one-hot row against a flat one (V = 40000; plain fp32 PyTorch 1.5e-7).
    WideLanes<acc_t> chunk;
    for (int64_t block = begin; block < begin + n_pad; block += kTvBlock * kStep<acc_t>) {
      Vec<acc_t> lo(acc_t(0)), hi(acc_t(0));
      const int64_t end = std::min(begin + n_pad, block + kTvBlock * kStep<acc_t>);
      for (int64_t i = block; i < end; i += kStep<acc_t>) {
        const Vec<acc_t> y_lo = Vec<acc_t>::loadu(y + i), y_hi = Vec<acc_t>::loadu(y + i + W);
        lo = lo + ((Vec<acc_t>::loadu(x + i) - y_lo * c) - y_lo * r).abs();
        hi = hi + ((Vec<acc_t>::loadu(x + i + W) - y_hi * c) - y_hi * r).abs();
      }
      chunk.add(lo);
      chunk.add(hi);
    }
    total += sum_t(s) * chunk.total();
  }
  const acc_t tv = acc_t(sum_t(0.5) * total);
  return tv < acc_t(1) ? tv : acc_t(1);
}

// Per-row numbers kl_divergence saves for its backward: (m, log s1) of the logits, of the
// reference, and c = E_w[d_w - d_v].
constexpr int64_t kRowState = 5;

// One side's row state as the backward needs it: max m and log s1 (NaN when invalid).
template <typename acc_t>
struct SideState {
  acc_t m, log_s1;
};

template <typename acc_t>
SideState<acc_t> side_state(acc_t m, acc_t s1) {
  if (!side_is_valid(m)) return {quiet_nan<acc_t>(), quiet_nan<acc_t>()};
  return {m, std::log(s1)};
}

// A side state finished in a pair pass's sum type, rounded once to acc_t.
template <typename acc_t, typename sum_t>
SideState<acc_t> rounded(const SideState<sum_t>& s) {
  return {acc_t(s.m), acc_t(s.log_s1)};
}

// The raw max a backward loads a saved side's row relative to (the state keeps the z-unit max
// m = x_max / tau rounded, which pg_kernels/parallel merges across shards): a = m tau, rounded to
// the logits' dtype when that is 16-bit, where it is then the max logit itself (m tau is within
// 2^-23 of it); for fp32 / fp64 logits the max logit or an ulp from it. Either way x - a is
// exact near the max. The Triton kernels rebuild the same a (triton/_pair.py, max_logit).
// m and a are in PairFrame's units (for fp64 logits z = x / tau: tau 1, a = m).
template <typename scalar_t, typename acc_t>
acc_t rebuilt_max(acc_t m, Temperature<acc_t> row_tau) {
  // m tau rounded, as an fma with 0 so that GCC (-ffp-contract=fast) cannot fuse the product
  // into a caller's xm - a: that gave the exact residual, not the rounded a's difference, and
  // a V = 1 fp32 row a saved log s1 of 1.3e-5 where the backward's d is 0.
  const acc_t a = std::fma(m, PairFrame<acc_t>(row_tau).tau.tau, acc_t(0));
  if constexpr (sizeof(scalar_t) == 2) return acc_t(scalar_t(a));
  return a;
}

// Whether a side of z-unit max m takes its frame from its raw max xm itself rather than from
// rebuilt_max(m): fp32 logits under a temperature with |m| >= 2^24, such as a row masked whole
// with a huge finite fill. There m tau rounded misses xm by up to an ulp of it (7.6e22 at -1e30),
// and log s1 relative to that a / tau, ~1e23 + log s1 in fp32, would lose log s1 (a side masked
// whole with -1e30 got a gradient of 0 at tau 0.73, where it is 1/V-weighted). The backward
// reads xm again (frame_max). 16-bit logits need none (rebuilt_max rounds back to xm), nor
// fp64 ones (divided first: a = m). Triton's _pair.reads_max decides alike.
template <typename scalar_t, typename acc_t>
bool reads_max(acc_t m, Temperature<acc_t> row_tau) {
  return std::is_same_v<scalar_t, float> && row_tau.tau != acc_t(1) && is_finite(m) &&
         std::abs(m) >= acc_t(16777216);
}

// The raw max a backward loads a saved side's row x [0, V) relative to: rebuilt_max(m), or for
// the rare rows reads_max picks the row's max logit read again.
template <typename scalar_t, typename acc_t>
acc_t frame_max(acc_t m, Temperature<acc_t> row_tau, const scalar_t* x, int64_t V) {
  if (!reads_max<scalar_t>(m, row_tau)) return rebuilt_max<scalar_t>(m, row_tau);
  acc_t xm = neg_inf<acc_t>();
  for (int64_t j = 0; j < V; ++j) xm = std::max(xm, acc_t(x[j]));
  return xm;
}

// One side of a finished pair pass (raw max xm, its reference ref = xm / tau in row_sum_t, s1
// relative to xm / tau) as kl_divergence and mismatch_stats save it for their backwards: the
// z-unit max m = ref rounded, and log s1 relative to a / tau (a = rebuilt_max(m)), the point the
// backward loads d = (x - a) / tau from: log s1 + d_max with d_max = (xm - a) / tau rounded as
// the backward rounds it, exactly 0 when a = xm (16-bit logits, most fp32 rows, and the rows
// reads_max picks, whose backward loads d relative to xm itself). So a V = 1 row
// gets log s1 = d_max and a gradient of exactly 0. (Moving log s1 to m instead, by xm / tau - m,
// and back in the backward left that move's rounding, ~2^-48 |z|: 4e-15 where the fuzzer's
// truth is 0.) moved = d_max: c moves with the log s1. NaN when the side is invalid (moved 0).
template <typename acc_t>
struct SavedSide {
  SideState<acc_t> side;
  row_sum_t<acc_t> moved;
};

template <typename scalar_t, typename acc_t>
SavedSide<acc_t> saved_side(acc_t xm, Temperature<acc_t> tau, row_sum_t<acc_t> ref,
                            row_sum_t<acc_t> s1) {
  using sum_t = row_sum_t<acc_t>;
  const acc_t m = acc_t(ref);
  if (!side_is_valid(ref) || !is_finite(m)) {
    return {{quiet_nan<acc_t>(), quiet_nan<acc_t>()}, sum_t(0)};
  }
  const sum_t moved(reads_max<scalar_t>(m, tau)
                        ? acc_t(0)
                        : PairFrame<acc_t>(tau).tau.divide(xm - rebuilt_max<scalar_t>(m, tau)));
  return {{m, acc_t(std::log(s1) + moved)}, moved};
}

// v_j - w_j, the KL's gradient w.r.t. the other side's z (docs/math.md §4), from the two
// probabilities w_j = e^{d_w,j - l_w}, v_j = e^{d_v,j - l_v}, their d (unclamped) and
// dl = l_v - l_w (log_s1_difference) from the forward. Of near-equal rows v_j - w_j cancels two
// probabilities each rounded once (~3e-8 at 0.5, where the truth can be 1e-8): where
// |log v_j - log w_j| < 1/4 it is w_j expm1(delta_j) instead, delta_j = (d_v,j - d_w,j) - dl (dl:
// two small numbers when the rows are near-equal, not the difference of two rounded log s1).
// delta NaN or infinite (a -inf logit, KL = +inf) keeps v_j - w_j. kl_divergence's and
// step_stats' backwards both take it from here.
template <typename acc_t>
PGK_VECTOR_INLINE Vec<acc_t> other_side_difference(const Vec<acc_t>& w, const Vec<acc_t>& v,
                                                   const Vec<acc_t>& dw, const Vec<acc_t>& dv,
                                                   const Vec<acc_t>& dl) {
  const Vec<acc_t> delta = (dv - dw) - dl;  // log v_j - log w_j
  const Vec<acc_t> close = delta.abs() < Vec<acc_t>(acc_t(0.25));
  return Vec<acc_t>::blendv(v - w, w * delta.expm1(), close);
}

// dl = l_v - l_w for other_side_difference: from the forward's KL and c = E_w[d_w - d_v]
// (KL = c - l_w + l_v), or from the two saved logs. KL - c rounds at ~ulp(max(|KL|, |c|)), the
// logs at ~ulp(max(1, |l|)) (each log s1 of a sum >= 1, rounded on its own), so it takes the
// logs where KL or c exceeds max(1, |l_w|, |l_v|). Near-equal and peaked rows (KL and c
// below 1: the top entry of a peaked row's v_j - w_j, 2.9e-6 off from KL - c, 3.1e-3 from the
// logs, whose ulp(1) is large beside a c of ~1e-3) keep KL - c; a side masked in part with a
// fill where the other has mass (KL ~ 1e2 .. 1e29) takes the logs: KL - c was 0.62 off at
// -1e30 and 3.7e-5 at -1e4 (KL 853), where plain fp32 PyTorch is 2e-8 and 6e-7 off.
template <typename acc_t>
acc_t log_s1_difference(acc_t kl, acc_t c, acc_t l_w, acc_t l_v) {
  const acc_t logs = std::max({acc_t(1), std::abs(l_w), std::abs(l_v)});
  const bool by_logs = std::max(std::abs(kl), std::abs(c)) > logs;
  return by_logs ? l_v - l_w : kl - c;
}

// The same for one entry (step_stats' label entry, in double): delta = log v - log w.
inline double other_side_difference(double w, double v, double delta) {
  return std::abs(delta) < 0.25 ? w * std::expm1(delta) : v - w;
}

// The dominant entry of a whole row's weight-side KL gradient, written as minus the sum of the
// row's others. grad_w sums to 0 over a whole row (sum_j w_j (delta_j - c) = c - c); at the
// dominant w_j (> 1/2) of a row whose rest is below 2^-7 the direct form w_j (delta_j - c)
// cancels to ~rest x |delta| (0 for a one-hot row), below the rounding of delta_j and c at
// ulp(|delta|) (a one-hot reference row at tau 0.7: 1.2e-6 where the truth is ~0 and plain fp32
// PyTorch, whose sum_k w_k g_k with w_j rounded to 1 cancels g_j exactly, ~0), while the other
// entries' errors are relative to themselves. The loop adds each vector of weight-side terms
// (per chunk in acc_t lanes, the chunks in row_sum_t) and finds the entry with w_j > 1/2; only
// the chunk that may hold it looks. `base`: the rest of that entry's gradient, which the
// rewrite keeps (step_stats' token terms; 0 in kl_divergence).
// A vocab-parallel shard's row (pg_kernels.parallel): the sum and the summed size of the weight
// side's terms w_j ((d_w,j - d_v,j) - KL) over the row's entries on the other ranks, which the
// dominant entry's others include. 0 for a whole row.
template <typename acc_t>
struct OutsideTerms {
  acc_t sum = 0, size = 0;
};

template <typename acc_t>
struct DominantEntry {
  static constexpr int W = int(Vec<acc_t>::size());
  // Whether a row takes the form (l_w = -log(1 - rest) below 2^-7). Elsewhere the others' sum
  // is rarely the more accurate: with rests up to 1/2 the fidelity table's fp32 KL gradient
  // went 1.1e-7 -> 2.5e-7.
  static bool applies(acc_t log_s1_w) { return log_s1_w < acc_t(0x1p-7); }

  row_sum_t<acc_t> sum = 0, size = 0;  // of the terms and |terms| over the row
  Vec<acc_t> chunk_sum = Vec<acc_t>(acc_t(0)), chunk_size = Vec<acc_t>(acc_t(0));
  int64_t top = -1;  // the entry with w_j > 1/2, if the loop's w finds one
  acc_t top_term = 0, top_base = 0, top_scale = 0;  // its term, base, w_j (|delta_j| + |c|)

  void add(const Vec<acc_t>& term, const Vec<acc_t>& w, const Vec<acc_t>& delta,
           const Vec<acc_t>& base, acc_t c, int64_t at, bool look) {
    chunk_sum = chunk_sum + term;  // lanes past the row's end: w of the -inf padding, 0
    chunk_size = chunk_size + term.abs();
    const int small = look ? (w > Vec<acc_t>(acc_t(0.5))).zero_mask() : (1 << W) - 1;
    if (small != (1 << W) - 1) {
      const int lane = __builtin_ctz(~small);
      acc_t lanes_term[W], lanes_w[W], lanes_delta[W], lanes_base[W];
      term.store(lanes_term);
      w.store(lanes_w);
      delta.store(lanes_delta);
      base.store(lanes_base);
      top = at + lane;
      top_term = lanes_term[lane];
      top_base = lanes_base[lane];
      top_scale = lanes_w[lane] * (std::abs(lanes_delta[lane]) + std::abs(c));
    }
  }

  void end_chunk() {
    sum += row_sum_t<acc_t>(sum_lanes(chunk_sum));
    size += row_sum_t<acc_t>(sum_lanes(chunk_size));
    chunk_sum = chunk_size = Vec<acc_t>(acc_t(0));
  }

  // Minus the others' sum, where it is the more accurate: the direct form rounds at ~eps w_j
  // (|delta_j| + |c|) |g|, the others' sum at up to ~32 eps of their sizes (acc_t lanes, 128
  // terms per chunk). Where both sides share the argmax, delta_j ~ 0 there and the direct
  // form is exact to ~eps c: the sum's rounding was 10x larger (V = 151936, a spike of 16 and
  // 1e-3 of noise: 1.3-3.1e-6 relative against 0.7-4.4e-7). g: the upstream gradient over
  // the weight side's temperature. outside: the row's terms on other ranks, for a vocab-parallel
  // shard (the sum and summed size of w_j ((d_w,j - d_v,j) - KL) there, before g).
  bool minus_others(acc_t g, row_sum_t<acc_t>& out, OutsideTerms<acc_t> outside = {}) const {
    const row_sum_t<acc_t> others =
        sum - row_sum_t<acc_t>(top_term) + row_sum_t<acc_t>(outside.sum) * g;
    const row_sum_t<acc_t> others_size = size - std::abs(row_sum_t<acc_t>(top_term)) +
                                         row_sum_t<acc_t>(outside.size) * std::abs(g);
    out = -others;
    return top >= 0 && 32 * others_size < row_sum_t<acc_t>(top_scale) * std::abs(g) &&
           std::isfinite(others);
  }
};

// Gradients of KL(w || v) for one row, times the upstream gradient g (docs/math.md §4), from
// each side's rebuilt raw max a and l = log s1 relative to a / tau (saved_side), d = (x - a) / tau
// loaded as the forward loaded it, and c = E_w[d_w - d_v] relative to the same points:
//   grad_w,j = g / tau_w * w_j ((d_w,j - d_v,j) - c),  w_j = e^{d_w,j - l_w},  0 where w_j = 0
//   grad_v,j = g / tau_v * (v_j - w_j),                 v_j = e^{d_v,j - l_v}
// with v_j - w_j from other_side_difference (dl = log_s1_difference).
// kW / kV: which gradients to write; only grad_v needs v_j's exp.
//
// Where the w side's rest is below 2^-7, the entry at the dominant w_j is written as minus the
// sum of the row's others (DominantEntry), those on other ranks (`outside`) included.
template <typename scalar_t, typename acc_t, bool kW, bool kV>
void kl_backward_row(const scalar_t* xw, Temperature<acc_t> tau_w, const scalar_t* xv,
                     Temperature<acc_t> tau_v, int64_t V, SideState<acc_t> sw,
                     SideState<acc_t> sv, acc_t c, acc_t dl, acc_t gw, acc_t gv,
                     OutsideTerms<acc_t> outside, acc_t* bw, acc_t* bv, scalar_t* grad_w,
                     scalar_t* grad_v) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> vlw(sw.log_s1), vlv(sv.log_s1), vc(c), vgw(gw), vgv(gv), zero(acc_t(0)),
      lowest(exp_zero_below<acc_t>()), vdl(dl);
  const PairFrame<acc_t> fw(tau_w), fv(tau_v);
  // kDominant: the row's max has w = e^{-l_w} near 1 (DominantEntry); other rows pay nothing.
  const auto rows = [&](auto dominant) __attribute__((always_inline)) {
    constexpr bool kDominant = decltype(dominant)::value;
    DominantEntry<acc_t> top;
    for (int64_t begin = 0; begin < V; begin += kChunk) {
      const int64_t n = std::min(kChunk, V - begin);
      const acc_t mw = fw.load(xw + begin, n, bw);
      shift_divide_chunk(bw, n, fw.tau, sw.m);
      fv.load(xv + begin, n, bv);
      shift_divide_chunk(bv, n, fv.tau, sv.m);
      // Whether this chunk's max may be the dominant entry (with a margin for the roundings):
      // only there does the loop look for it.
      const bool look = kDominant && (mw - sw.m) / fw.tau.tau - sw.log_s1 > acc_t(-0.7);
      for (int64_t i = 0; i < n; i += W) {
        prefetch_next_chunk<W>(xw, begin, V, i);
        prefetch_next_chunk<W>(xv, begin, V, i);
        const Vec<acc_t> dw = Vec<acc_t>::loadu(bw + i);
        const Vec<acc_t> dv = Vec<acc_t>::loadu(bv + i);
        const Vec<acc_t> w = vexp(at::vec::clamp_min(dw - vlw, lowest));
        if constexpr (kW) {
          // d/dz_w of sum w (log w - log v) = w_j (log w_j - log v_j - KL); the blend keeps
          // w_j = 0 terms at exactly 0 when z_v = -inf too ((-inf) - (-inf) = NaN).
          const Vec<acc_t> delta = dw - dv;
          const Vec<acc_t> g = Vec<acc_t>::blendv(w * (delta - vc) * vgw, zero, w == zero);
          g.store(bw + i);
          if constexpr (kDominant) top.add(g, w, delta, zero, c, begin + i, look);
        }
        if constexpr (kV) {
          // d/dz_v of -sum w log v = v_j sum w - w_j = v_j - w_j
          const Vec<acc_t> v = vexp(at::vec::clamp_min(dv - vlv, lowest));
          (other_side_difference(w, v, dw, dv, vdl) * vgv).store(bv + i);
        }
      }
      if constexpr (kDominant) top.end_chunk();
      if constexpr (kW) store_row(bw, grad_w + begin, n);
      if constexpr (kV) store_row(bv, grad_v + begin, n);
    }
    row_sum_t<acc_t> value;
    if constexpr (kDominant) {
      if (top.minus_others(gw, value, outside)) grad_w[top.top] = scalar_t(acc_t(value));
    }
  };
  if (kW && DominantEntry<acc_t>::applies(sw.log_s1)) {
    rows(std::true_type{});
  } else {
    rows(std::false_type{});
  }
}

template <typename acc_t>
const acc_t* optional_data(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<acc_t>() : nullptr;
}

}  // namespace pg_kernels::cpu
