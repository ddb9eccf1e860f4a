// The pair pass of two logit tensors on the CPU (docs/math.md §§4 and 5), shared by
// divergence.cpp (kl_divergence, mismatch_stats) and step_stats.cpp: loading a chunk as
// z = x / tau, the per-lane pair sums (PairLanes), a chunk's pair state, the row's Neumaier
// sum of chunk states, the pass over a row, total variation from kept exps, and the KL
// gradient row. See divergence.cpp's header for the design.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <memory>
#include <optional>

#include "vec_rows.h"

namespace pg_kernels::cpu {

// buf[0, n) = src[0, n) / tau in acc_t, padded with -inf to a multiple of kStep; returns the
// chunk's max (NaN if it holds a NaN). z = x / tau is rounded once, like docs/math.md's and
// PyTorch's z (vec_rows.h's load_quotient_chunk, no division per element), not twice as
// x * (1 / tau) would: it matters where a small difference of large log-probs is the output
// (log_ratio = logprob - rollout_logprobs at logprob ~ -100, tau 0.5 on a peaked row, had 5x
// plain PyTorch's error with 1 / tau).
template <typename scalar_t, typename acc_t>
acc_t load_divided_chunk(const scalar_t* src, int64_t n, acc_t tau, acc_t* buf) {
  return load_quotient_chunk(src, n, tau, acc_t(1) / tau, buf);
}

// dst[0, n) = buf[0, n), rounded once to the output dtype.
template <typename acc_t, typename scalar_t>
void store_row(const acc_t* buf, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(buf, buf + n, dst);
  } else {
    at::vec::convert(buf, dst, n);
  }
}

// Per-lane sums of one chunk of a pair pass.
template <typename acc_t>
struct PairLanes {
  Vec<acc_t> s1w{acc_t(0)}, s1v{acc_t(0)}, u{acc_t(0)}, inf{acc_t(0)};

  // zw, zv: scaled logits; mw, mv: the chunk maxes (0 in place of -inf, see pair_chunk).
  // Returns e_w, e_v through ew, ev (kept by mismatch_stats for its TV sweep).
  void add(const Vec<acc_t>& zw, const Vec<acc_t>& zv, const Vec<acc_t>& mw,
           const Vec<acc_t>& mv, Vec<acc_t>& ew, Vec<acc_t>& ev) {
    const Vec<acc_t> lowest(exp_zero_below<acc_t>());
    // d_w clamped where exp is already 0: -inf weights give e_w = 0 and finite e_w * (...).
    const Vec<acc_t> dw = at::vec::clamp_min(zw - mw, lowest);
    const Vec<acc_t> dv = zv - mv;  // not clamped: a tiny v_j is a large, real log-ratio
    ew = vexp(dw);
    ev = vexp(at::vec::clamp_min(dv, lowest));
    add_exps(dw, ew, dv, ev);
  }

  // The same from exps computed elsewhere (step_stats shares the logits' exp between its
  // sums): dw clamped as above, dv not, ew = e^{dw}, ev = e^{max(dv, lowest)}.
  void add_exps(const Vec<acc_t>& dw, const Vec<acc_t>& ew, const Vec<acc_t>& dv,
                const Vec<acc_t>& ev) {
    const Vec<acc_t> zero(acc_t(0)), ninf(neg_inf<acc_t>());
    s1w = s1w + ew;
    s1v = s1v + ev;
    // v_j = 0: the term is +inf when w_j > 0 (recorded in `inf`), and it is kept out of u by
    // taking d_v = d_w there (a zero difference). Elsewhere e_w = 0 makes the term 0.
    const Vec<acc_t> v_zero = dv == ninf;
    inf = inf | (v_zero & (ew > zero));
    u = at::vec::fmadd(ew, dw - Vec<acc_t>::blendv(dv, dw, v_zero), u);
  }

  // The chunk's pair state from its two chains of lanes; mw, mv: the references of d_w, d_v.
  static PairState<acc_t> join(const PairLanes& lo, const PairLanes& hi, acc_t mw, acc_t mv);
};

template <typename acc_t>
bool any_lane_set(const Vec<acc_t>& mask) {
  constexpr int64_t W = Vec<acc_t>::size();
  acc_t lanes[W];
  mask.store(lanes);
  for (int64_t i = 0; i < W; ++i) {
    if (lanes[i] != acc_t(0)) return true;  // an all-ones lane reads as NaN, != 0
  }
  return false;
}

template <typename acc_t>
PairState<acc_t> PairLanes<acc_t>::join(const PairLanes& lo, const PairLanes& hi, acc_t mw,
                                        acc_t mv) {
  return {mw, sum_lanes(lo.s1w + hi.s1w), mv, sum_lanes(lo.s1v + hi.s1v),
          sum_lanes(lo.u + hi.u), any_lane_set(lo.inf | hi.inf)};
}

// One chunk of a pair pass. bw, bv hold the scaled chunk (padded with -inf to a multiple of
// kStep); mw, mv are its maxes. kKeepExps: overwrite bw, bv with e^{z - m} of the chunk.
template <typename acc_t, bool kKeepExps>
PairState<acc_t> pair_chunk(acc_t* bw, acc_t* bv, int64_t n, acc_t mw, acc_t mv) {
  constexpr int64_t W = Vec<acc_t>::size();
  // A side with no finite entry yet has m = -inf; subtracting 0 instead keeps its d = -inf
  // (e = 0) rather than -inf - (-inf) = NaN. NaN / +inf maxes pass through: the row is NaN.
  const Vec<acc_t> vmw(mw == neg_inf<acc_t>() ? acc_t(0) : mw);
  const Vec<acc_t> vmv(mv == neg_inf<acc_t>() ? acc_t(0) : mv);
  PairLanes<acc_t> lo, hi;
  Vec<acc_t> ew, ev;
  const int64_t n_pad = round_up(n, kStep<acc_t>);
  for (int64_t i = 0; i < n_pad; i += 2 * W) {
    lo.add(Vec<acc_t>::loadu(bw + i), Vec<acc_t>::loadu(bv + i), vmw, vmv, ew, ev);
    if constexpr (kKeepExps) {
      ew.store(bw + i);
      ev.store(bv + i);
    }
    hi.add(Vec<acc_t>::loadu(bw + i + W), Vec<acc_t>::loadu(bv + i + W), vmw, vmv, ew, ev);
    if constexpr (kKeepExps) {
      ew.store(bw + i + W);
      ev.store(bv + i + W);
    }
  }
  return PairLanes<acc_t>::join(lo, hi, mw, mv);
}

// Neumaier summation of chunk totals into the row total: on a peaked row one chunk holds an
// O(log V) term of u (the top token's d_w - d_v) and ~V / kChunk later chunks add tiny totals
// to it, each rounding at ulp(u); the low parts below carry those roundings (measured on a
// near one-hot fp64 row at V = 151936 against a 40-digit mpmath truth: gradient error
// 1.2e-14 without, 1.7e-15 with; the fp64 PyTorch reference's is 4.1e-15).
template <typename acc_t>
struct RowSum {
  PairState<acc_t> hi = empty_pair<acc_t>();
  acc_t lo_s1w = 0, lo_s1v = 0, lo_u = 0;

  static acc_t add(acc_t& sum, acc_t x) {  // sum += x, returns the rounding error
    const acc_t s = sum + x;
    const acc_t e = std::abs(sum) >= std::abs(x) ? (sum - s) + x : (x - s) + sum;
    sum = s;
    return e;
  }

  void merge(const PairState<acc_t>& chunk) {
    const acc_t m_w = max_nan(hi.m_w, chunk.m_w), m_v = max_nan(hi.m_v, chunk.m_v);
    // The low parts rescale like the sums they belong to (rescale_pair, docs/math.md §1).
    const PairState<acc_t> lo =
        rescale_pair(PairState<acc_t>{hi.m_w, lo_s1w, hi.m_v, lo_s1v, lo_u, false}, m_w, m_v);
    const PairState<acc_t> a = rescale_pair(hi, m_w, m_v), b = rescale_pair(chunk, m_w, m_v);
    hi = a;
    hi.inf = hi.inf || chunk.inf;
    lo_s1w = lo.s1_w + add(hi.s1_w, b.s1_w);
    lo_s1v = lo.s1_v + add(hi.s1_v, b.s1_v);
    lo_u = lo.u + add(hi.u, b.u);
  }

  PairState<acc_t> total() const {
    return {hi.m_w, hi.s1_w + lo_s1w, hi.m_v, hi.s1_v + lo_s1v, hi.u + lo_u, hi.inf};
  }
};

// The pair pass over one row. Stops early once the v side is NaN / +inf (and the w side too
// when stop_on_w_invalid; mismatch_stats keeps going so that the logits' logsumexp survives a
// broken rollout row). kKeepExps: bw, bv are row-sized scratch that end up holding every
// e^{z - m_chunk}, and chunk_m[2k], chunk_m[2k + 1] the maxes of chunk k.
template <typename scalar_t, typename acc_t, bool kKeepExps>
PairState<acc_t> pair_row(const scalar_t* xw, acc_t tau_w, const scalar_t* xv, acc_t tau_v,
                          int64_t V, bool stop_on_w_invalid, acc_t* bw, acc_t* bv,
                          acc_t* chunk_m) {
  RowSum<acc_t> row;
  for (int64_t begin = 0, k = 0; begin < V; begin += kChunk, ++k) {
    const int64_t n = std::min(kChunk, V - begin);
    acc_t* cw = kKeepExps ? bw + begin : bw;
    acc_t* cv = kKeepExps ? bv + begin : bv;
    const acc_t mw = load_divided_chunk(xw + begin, n, tau_w, cw);
    const acc_t mv = load_divided_chunk(xv + begin, n, tau_v, cv);
    if constexpr (kKeepExps) {
      chunk_m[2 * k] = mw;
      chunk_m[2 * k + 1] = mv;
    }
    row.merge(pair_chunk<acc_t, kKeepExps>(cw, cv, n, mw, mv));
    if (!(row.hi.m_v < -neg_inf<acc_t>())) break;  // NaN or +inf: the row is NaN, stop early
    if (stop_on_w_invalid && !(row.hi.m_w < -neg_inf<acc_t>())) break;
  }
  return row.total();
}

// 1/2 sum |w_j - v_j| from the exps a pair_row<kKeepExps> pass left in ew, ev:
// w_j = ew_j e^{(m_w,k - m_w) - l_w} with m_w,k the max of the chunk k that holds j (m_w the
// row's max, l_w = log s1_w; shifting by m_w first is exact for the chunk holding the max).
// No exp per element.
template <typename acc_t>
acc_t total_variation(const acc_t* ew, const acc_t* ev, const acc_t* chunk_m, int64_t V,
                      acc_t m_w, acc_t log_s1_w, acc_t m_v, acc_t log_s1_v) {
  constexpr int64_t W = Vec<acc_t>::size();
  acc_t total = 0;
  for (int64_t begin = 0, k = 0; begin < V; begin += kChunk, ++k) {
    const int64_t n_pad = round_up(std::min(kChunk, V - begin), kStep<acc_t>);
    const acc_t mw = chunk_m[2 * k], mv = chunk_m[2 * k + 1];
    // A chunk whose side was all -inf holds e = 0 there; its scale is irrelevant (use 0).
    const Vec<acc_t> a(mw == neg_inf<acc_t>() ? acc_t(0) : std::exp((mw - m_w) - log_s1_w));
    const Vec<acc_t> b(mv == neg_inf<acc_t>() ? acc_t(0) : std::exp((mv - m_v) - log_s1_v));
    Vec<acc_t> lo(acc_t(0)), hi(acc_t(0));
    for (int64_t i = begin; i < begin + n_pad; i += 2 * W) {
      lo = lo + (Vec<acc_t>::loadu(ew + i) * a - Vec<acc_t>::loadu(ev + i) * b).abs();
      hi = hi + (Vec<acc_t>::loadu(ew + i + W) * a - Vec<acc_t>::loadu(ev + i + W) * b).abs();
    }
    total += sum_lanes(lo + hi);
  }
  const acc_t tv = acc_t(0.5) * total;
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

// Gradients of KL(w || v) for one row, times the upstream gradient g (docs/math.md §4), from
// d = z - m and l = log s1 of each side and c = E_w[d_w - d_v] (softmax_stats.h):
//   grad_w,j = g / tau_w * w_j ((d_w,j - d_v,j) - c),  w_j = e^{d_w,j - l_w},  0 where w_j = 0
//   grad_v,j = g / tau_v * (v_j - w_j),                 v_j = e^{d_v,j - l_v}
// kW / kV: which gradients to write; only grad_v needs v_j's exp.
template <typename scalar_t, typename acc_t, bool kW, bool kV>
void kl_backward_row(const scalar_t* xw, acc_t tau_w, const scalar_t* xv, acc_t tau_v,
                     int64_t V, SideState<acc_t> sw, SideState<acc_t> sv, acc_t c, acc_t gw,
                     acc_t gv, acc_t* bw, acc_t* bv, scalar_t* grad_w, scalar_t* grad_v) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> vmw(sw.m), vlw(sw.log_s1), vmv(sv.m), vlv(sv.log_s1), vc(c), vgw(gw),
      vgv(gv), zero(acc_t(0)), lowest(exp_zero_below<acc_t>());
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    load_divided_chunk(xw + begin, n, tau_w, bw);
    load_divided_chunk(xv + begin, n, tau_v, bv);
    for (int64_t i = 0; i < n; i += W) {
      const Vec<acc_t> dw = Vec<acc_t>::loadu(bw + i) - vmw;
      const Vec<acc_t> dv = Vec<acc_t>::loadu(bv + i) - vmv;
      const Vec<acc_t> w = vexp(at::vec::clamp_min(dw - vlw, lowest));
      if constexpr (kW) {
        // d/dz_w of sum w (log w - log v) = w_j (log w_j - log v_j - KL); the blend keeps
        // w_j = 0 terms at exactly 0 when z_v = -inf too ((-inf) - (-inf) = NaN).
        const Vec<acc_t> g = w * ((dw - dv) - vc) * vgw;
        Vec<acc_t>::blendv(g, zero, w == zero).store(bw + i);
      }
      if constexpr (kV) {
        // d/dz_v of -sum w log v = v_j sum w - w_j = v_j - w_j
        const Vec<acc_t> v = vexp(at::vec::clamp_min(dv - vlv, lowest));
        ((v - w) * vgv).store(bv + i);
      }
    }
    if constexpr (kW) store_row(bw, grad_w + begin, n);
    if constexpr (kV) store_row(bv, grad_v + begin, n);
  }
}

template <typename acc_t>
const acc_t* optional_data(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<acc_t>() : nullptr;
}

// Row-sized scratch of one thread for mismatch_stats' TV sweep: e_w, e_v and chunk maxes.
template <typename acc_t>
struct ExpScratch {
  int64_t padded;
  std::unique_ptr<acc_t[]> data;
  explicit ExpScratch(int64_t V)
      : padded(round_up(V, kStep<acc_t>)),
        data(new acc_t[2 * padded + 2 * ((V + kChunk - 1) / kChunk)]) {}
  acc_t* ew() { return data.get(); }
  acc_t* ev() { return data.get() + padded; }
  acc_t* chunk_m() { return data.get() + 2 * padded; }
};

}  // namespace pg_kernels::cpu
