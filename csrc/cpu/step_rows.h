// The row kernels of step_stats (docs/math.md §9) on the CPU: the forward pass over a row of the
// logits and, when given, of the rollout and the reference logits together, and the backward
// row writing the logits' (and the reference's) gradient once. token_stats runs the same rows
// without the other tensors: its outputs are the bundle's token fields by construction.
// See step_stats.cpp's header for the design.
#pragma once

#include "pair_rows.h"
#include "token_rows.h"

namespace pg_kernels::cpu {

// Per-row numbers the backward needs from the KL part: the reference's (max, log s1) and the
// shift c = E_w[d_w - d_v] (softmax_stats.h, kl_grad_shift).
constexpr int64_t kKLState = 3;

// One row's results.
template <typename acc_t>
struct StepRow {
  TokenStatsRow<acc_t> token;
  int64_t argmax;
  acc_t token_kl, token_tv;  // against the rollout logits
  acc_t kl;                  // to the reference
  acc_t kl_state[kKLState];
};

// Buffers of one thread: each tensor's chunk, and for TV the row's exps of the rollout and of
// the logits (ExpScratch: only the exps are stored there; V_kept = 0 without TV).
template <typename acc_t>
struct StepScratch {
  ExpScratch<acc_t> exps;  // ew: rollout, ev: logits, chunk_xm: their raw maxes per chunk
  alignas(64) acc_t logits[kBufferSize<acc_t>];
  alignas(64) acc_t roll[kBufferSize<acc_t>];
  alignas(64) acc_t ref[kBufferSize<acc_t>];
  alignas(64) acc_t exps_p[kBufferSize<acc_t>];  // the logits' exps of a chunk (no TV)
  explicit StepScratch(int64_t V_kept) : exps(V_kept) {}
};

// The token lanes' sweep of a chunk d[0, n_pad) (d clamped here where exp is already 0), in two
// chains lo, hi; kKeepExps: e^d into exps too. Out of line, with its sums in locals: inlined
// into step_forward_row, GCC kept 9 of the 10 accumulators on the stack (AVX2).
template <bool kKeepExps, typename acc_t, typename Prefetch>
__attribute__((noinline)) void token_sweep(const acc_t* d, int64_t n_pad, acc_t* exps,
                                           Prefetch prefetch, LaneSums<acc_t>& lo_out,
                                           LaneSums<acc_t>& hi_out) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> lowest(exp_zero_below<acc_t>());
  LaneSums<acc_t> lo, hi;
  const auto step = [&](int64_t i, LaneSums<acc_t>& t) __attribute__((always_inline)) {
    const Vec<acc_t> dp = at::vec::clamp_min(Vec<acc_t>::loadu(d + i), lowest);
    const Vec<acc_t> ep = vexp(dp);
    t.add_exp(dp, ep);
    if constexpr (kKeepExps) ep.store(exps + i);
  };
  for (int64_t i = 0; i < n_pad; i += 2 * W) {
    prefetch(i);
    step(i, lo);
    step(i + W, hi);
  }
  lo_out = lo;
  hi_out = hi;
}

// A pair's sweep of a chunk of n elements (padded to kStep): step(unmasked, i, lanes, s1) on
// each vector, its u, k and inf lanes in one chain, the other side's s1 (the side the caller's
// token lanes do not sum) in two chains lo, hi in the token lanes' order (equal rows keep
// equal sums: token_tv and the KL exactly 0). unmasked (std::true_type): no d_v of the pair is
// -inf in the vector (pair_rows.h, no_neg_inf; v_no_neg_inf for the chunk). Out of line with
// its sums in locals, as token_sweep.
template <typename acc_t, typename Step>
__attribute__((noinline)) void pair_sweep(int64_t n, bool v_no_neg_inf, Step step,
                                          PairLanes<acc_t>& lanes_out, WideLanes<acc_t>& s1_out) {
  constexpr int64_t W = Vec<acc_t>::size();
  PairLanes<acc_t> lanes;
  WideLanes<acc_t> lo, hi;
  const int64_t n_pad = round_up(n, kStep<acc_t>);
  const int64_t n_unmasked = unmasked_end<acc_t>(v_no_neg_inf, n);
  int64_t i = 0;
  for (; i < n_unmasked; i += 2 * W) {
    step(std::true_type{}, i, lanes, lo);
    step(std::true_type{}, i + W, lanes, hi);
  }
  for (; i < n_pad; i += 2 * W) {
    step(std::false_type{}, i, lanes, lo);
    step(std::false_type{}, i + W, lanes, hi);
  }
  lanes_out = lanes;
  s1_out = lo + hi;
}

// kRoll / kRef: whether the rollout / reference logits are given; tv: whether token_tv is
// wanted (with the rollout: the row's exps kept in scratch.exps for its sweep).
template <typename scalar_t, typename acc_t, bool kRoll, bool kRef>
void step_forward_row(const scalar_t* xp, Temperature<acc_t> tp, const scalar_t* xr, acc_t tr,
                 const scalar_t* xq, acc_t tq, bool reverse, bool tv, int64_t V, int64_t label,
                 StepScratch<acc_t>& scratch, StepRow<acc_t>& out) {
  const Vec<acc_t> lowest(exp_zero_below<acc_t>());
  // token_stats' lanes, relative to the running max m. Sums run in two levels: per chunk (two
  // independent chains of at most kChunk / (2 W) terms per lane), then chunk totals into the
  // row total. Summation error then grows with kChunk / (2 W) + V / kChunk terms instead of
  // V / (2 W), close to PyTorch's cascade sum.
  LaneSums<acc_t> row;
  RowSum<row_sum_t<acc_t>> roll, kl;
  // Each side's chunks are loaded as d = (x - xm) / tau relative to its running max xm of the
  // raw logits (shift_divide_chunk: d near the max is nearly exact, where z - m from z = x / tau
  // rounded carried ulp(z) / 2 of z and of m: fp32 logprob at tau 0.7 on peaked rows, rms error
  // 4.5e-7 -> 1.0e-7, plain PyTorch 7.3e-7), and referred to xm / tau in row_sum_t
  // (Temperature::reference), so that rescaling a sum from one max to the next is accurate too.
  // The rollout's and the reference's running maxes are kept the same way, so that equal (or
  // constant-shifted) rows keep equal exps and token_tv, token_kl and the KL are exactly 0 for
  // them (relative to each chunk's own max, the reference's KL was 2.1e-9 on a shifted fp32 row
  // whose second chunk has a lower max).
  acc_t xm = neg_inf<acc_t>(), xmr = neg_inf<acc_t>(), xmq = neg_inf<acc_t>();
  // Each side's row max, read once where a chunk's frame kept a -inf (row_frame_shift).
  acc_t row_max_p = quiet_nan<acc_t>(), row_max_r = row_max_p, row_max_q = row_max_p;
  const Temperature<acc_t> tpr = temperature(tr), tpq = temperature(tq);
  int64_t argmax = 0;
  const bool keep = kRoll && tv;  // the exps kept for TV, else in chunk buffers
  for (int64_t begin = 0, k = 0; begin < V; begin += kChunk, ++k) {
    const int64_t n = std::min(kChunk, V - begin);
    acc_t* cp = scratch.logits;
    acc_t* cr = scratch.roll;
    acc_t* er_row = keep ? scratch.exps.ew() + begin : nullptr;  // the rollout's, for TV only
    const acc_t chunk_max = load_chunk(xp + begin, n, cp);
    if (!(chunk_max <= xm)) {  // a new max, or a NaN (as token_stats' forward_row)
      if (xm != neg_inf<acc_t>()) row.rescale(acc_t(tp.reference(xm) - tp.reference(chunk_max)));
      xm = chunk_max;
      // Strictly greater than every earlier max: its first index here is the row's first argmax.
      argmax = begin + find_first(cp, n, chunk_max);
    }
    if (!(xm < -neg_inf<acc_t>())) break;  // NaN or +inf logits: every field of the row is NaN
    // Whether each v side (the logits: rollout pair, forward KL; the reference: reverse KL) is
    // free of -inf here, from the pass that forms its d.
    const bool p_is_v = kRoll || (kRef && !reverse), q_is_v = kRef && reverse;
    bool p_no_neg_inf = p_is_v ? shift_divide_chunk<true>(cp, n, tp, finite_shift(xm))
                               : shift_divide_chunk(cp, n, tp, finite_shift(xm));
    bool q_no_neg_inf = true;
    if constexpr (kRoll) {
      xmr = max_nan(xmr, load_chunk(xr + begin, n, cr));
      shift_divide_chunk(cr, n, tpr, finite_shift(xmr));
      if (keep) {  // the exps of this chunk are e^{d}, relative to these raw maxes
        scratch.exps.chunk_xm()[2 * k] = xmr;
        scratch.exps.chunk_xm()[2 * k + 1] = xm;
      }
    }
    if constexpr (kRef) {
      xmq = max_nan(xmq, load_chunk(xq + begin, n, scratch.ref));
      q_no_neg_inf = q_is_v ? shift_divide_chunk<true>(scratch.ref, n, tpq, finite_shift(xmq))
                            : shift_divide_chunk(scratch.ref, n, tpq, finite_shift(xmq));
    }
    if (!p_no_neg_inf || !q_no_neg_inf) {  // a -inf may be a fill's quotient past the range
      // The w sides first (the rollout; the reference of the forward KL), then each v side
      // where its pairs' w sides have no mass (unmask_overflowed).
      const bool ref_is_w = kRef && !reverse;
      if constexpr (kRoll) unmask_overflowed(cr, xr + begin, n, tpr);
      if constexpr (kRef) {
        if (ref_is_w) unmask_overflowed(scratch.ref, xq + begin, n, tpq);
      }
      const acc_t* w_roll = kRoll ? cr : nullptr;
      const acc_t* w_ref = ref_is_w ? scratch.ref : nullptr;
      if (unmask_overflowed(cp, xp + begin, n, tp, w_roll, w_ref)) {  // mass in the rows' frames
        const acc_t to_roll = kRoll ? row_frame_shift(xr, V, xmr, tpr, row_max_r) : acc_t(0);
        const acc_t to_ref = ref_is_w ? row_frame_shift(xq, V, xmq, tpq, row_max_q) : acc_t(0);
        unmask_overflowed(cp, xp + begin, n, tp, w_roll, w_ref, to_roll, to_ref);
      }
      if constexpr (kRef) {
        if (!ref_is_w && unmask_overflowed(scratch.ref, xq + begin, n, tpq, cp)) {
          const acc_t to_row = row_frame_shift(xp, V, xm, tp, row_max_p);
          unmask_overflowed(scratch.ref, xq + begin, n, tpq, cp,
                            static_cast<const acc_t*>(nullptr), to_row);
        }
      }
      if (p_is_v) p_no_neg_inf = no_neg_inf(cp, n);
      if (q_is_v) q_no_neg_inf = no_neg_inf(scratch.ref, n);
    }
    // One sweep of the chunk per group of sums, each over the L1-resident buffers: the token
    // lanes (which keep the logits' exps), then the rollout pair, then the reference pair. In
    // one sweep the three groups held ~28 vector accumulators, and the exp and series constants
    // beside them, against AVX2's 16 registers (AVX-512's 32): ~40 % of the hot loop's vector
    // instructions went to the stack. Split (and out of line: token_sweep, pair_sweep), the
    // forward over three token_stats at 1024 x 32000 went 1.18 -> 1.09 (fp32) and 1.10-1.14 ->
    // 1.02 (bf16), AVX2, paired. Each sum keeps its order: the results are bitwise those of one
    // sweep.
    LaneSums<acc_t> lo, hi;
    // The logits' exps of this chunk: kept for TV in the row's scratch, else in a chunk buffer,
    // for the pair sweeps.
    acc_t* ep_chunk = keep ? scratch.exps.ev() + begin : scratch.exps_p;
    const int64_t n_pad = round_up(n, kStep<acc_t>);
    // The next chunk of each tensor, over the token sweep (by value: as roll_step below).
    const auto prefetch = [xp, xr, xq, begin, V](int64_t i) __attribute__((always_inline)) {
      prefetch_next_chunk<kStep<acc_t>>(xp, begin, V, i);
      if constexpr (kRoll) prefetch_next_chunk<kStep<acc_t>>(xr, begin, V, i);
      if constexpr (kRef) prefetch_next_chunk<kStep<acc_t>>(xq, begin, V, i);
    };
    token_sweep<kRoll || kRef>(cp, n_pad, ep_chunk, prefetch, lo, hi);
    PairLanes<acc_t> pr, pq;
    if constexpr (kRoll) {  // KL(pi_roll || pi_theta): w = rollout, v = logits
      // By value: a vector store may alias anything (__m256 is may_alias), and captured
      // references would be reloaded after each.
      const auto roll_step = [cp, ep_chunk, cr, er_row, keep, lowest](
                                 auto unmasked, int64_t i, PairLanes<acc_t>& pr,
                                 WideLanes<acc_t>& s1r) __attribute__((always_inline)) {
        const Vec<acc_t> dp_raw = Vec<acc_t>::loadu(cp + i);  // unclamped: a log-ratio term
        const Vec<acc_t> ep = Vec<acc_t>::loadu(ep_chunk + i);
        const Vec<acc_t> dr_raw = Vec<acc_t>::loadu(cr + i);
        const Vec<acc_t> dr = at::vec::clamp_min(dr_raw, lowest);
        // The rollout engine runs the same model: where every lane is near the logits, e_r
        // comes from e_p and the excess series, not from an exp (add_pair's near path, mirrored).
        const Vec<acc_t> diff = dr - dp_raw;
        Vec<acc_t> er;
        if (all_lanes_set(near_lanes(diff))) {
          pr.add_near_from_v(ep, diff, er);
        } else {
          er = vexp(dr);
          pr.template add_exps<false, false>(unmasked, dr, dr_raw, er, dp_raw, ep);
        }
        s1r.add(er);
        if (keep) er.store(er_row + i);  // loop-invariant
      };
      pair_sweep(n, p_no_neg_inf, roll_step, pr, pr.s1w);
    }
    if constexpr (kRef) {
      const acc_t* cq = scratch.ref;
      // kReverse: KL(p || q), w = logits, v = reference; else KL(q || p), w = reference.
      const auto ref_step = [cp, ep_chunk, cq, lowest](auto reverse) {
        return [cp, ep_chunk, cq, lowest](auto unmasked, int64_t i, PairLanes<acc_t>& pq,
                                          WideLanes<acc_t>& s1q) __attribute__((always_inline)) {
          const Vec<acc_t> dp_raw = Vec<acc_t>::loadu(cp + i);
          const Vec<acc_t> ep = Vec<acc_t>::loadu(ep_chunk + i);
          const Vec<acc_t> dq_raw = Vec<acc_t>::loadu(cq + i);
          const Vec<acc_t> dq = at::vec::clamp_min(dq_raw, lowest);
          const Vec<acc_t> eq = vexp(dq);
          if constexpr (decltype(reverse)::value) {
            pq.template add_exps<false, false>(unmasked, at::vec::clamp_min(dp_raw, lowest),
                                               dp_raw, ep, dq_raw, eq);
          } else {
            pq.template add_exps<false, false>(unmasked, dq, dq_raw, eq, dp_raw, ep);
          }
          s1q.add(eq);
        };
      };
      if (reverse) {
        pair_sweep(n, q_no_neg_inf, ref_step(std::true_type{}), pq, pq.s1v);
      } else {
        pair_sweep(n, p_no_neg_inf, ref_step(std::false_type{}), pq, pq.s1w);
      }
    }
    row.add(lo, hi);
    const auto m = tp.reference(xm);
    // The logits' s1 lanes, summed once (the token lanes), are both pairs' logits side.
    if constexpr (kRoll) {
      pr.s1v = lo.s1 + hi.s1;
      roll.merge(resum_overflowed(pr.state(tpr.reference(xmr), m), cr, cp, n));
    }
    if constexpr (kRef) {
      (reverse ? pq.s1w : pq.s1v) = lo.s1 + hi.s1;
      const auto mq = tpq.reference(xmq);
      kl.merge(reverse ? resum_overflowed(pq.state(m, mq), cp, scratch.ref, n)
                       : resum_overflowed(pq.state(mq, m), scratch.ref, cp, n));
    }
  }
  const auto state = row.state(tp.reference(xm));
  const bool valid = state_is_valid(state);
  using sum_t = row_sum_t<acc_t>;
  // d_c as the chunk buffer held it (at V = 1 exactly 0: logprob 0).
  const acc_t d_label = tp.divide(acc_t(xp[label]) - finite_shift(xm));
  out.token = rounded_row<acc_t>(finalize_token_stats_relative(state, sum_t(d_label)));
  out.argmax = valid ? argmax : -1;
  const acc_t nan = quiet_nan<acc_t>();
  if constexpr (kRoll) {
    const auto s = roll.total();
    out.token_kl = valid ? acc_t(finalize_kl(s)) : nan;
    out.token_tv = nan;
    if (tv && valid && side_is_valid(s.m_w)) {
      // Both sides' log s1 from the same pair sums (not the logits' from token_stats' lanes,
      // summed in another order): equal rows get equal scales.
      out.token_tv = total_variation(scratch.exps.ew(), scratch.exps.ev(), scratch.exps.chunk_xm(),
                                     V, ExpScale<acc_t>{xmr, tr, std::log(s.s1_w)},
                                     ExpScale<acc_t>{xm, tp.tau, std::log(s.s1_v)});
    }
  }
  if constexpr (kRef) {
    const auto s = kl.total();
    out.kl = valid ? acc_t(finalize_kl(s)) : nan;
    const SideState<acc_t> q =
        rounded<acc_t>(reverse ? side_state(s.m_v, s.s1_v) : side_state(s.m_w, s.s1_w));
    // The reference's raw max (its backward loads d as the forward did), NaN when invalid.
    out.kl_state[0] = is_finite(q.m) ? xmq : nan;
    out.kl_state[1] = q.log_s1;
    out.kl_state[2] = acc_t(kl_grad_shift(s));
  }
}

// The KL part of a backward row: the reference's raw max xm and log s1, the shift c,
// dl = l_v - l_w (pair_rows.h's log_s1_difference, for the other side's gradient) and the
// upstream gradient divided by each side's temperature.
template <typename acc_t>
struct KLBackward {
  acc_t xm, log_s1, c, dl, g_p, g_q;
};

// One backward row. kKL: 0 no KL term, 1 reverse, 2 forward. kP / kQ: write the logits' /
// the reference's gradient. kDominant: the KL's weight side (the logits for reverse, the
// reference for forward) has a dominant entry whose KL term is written as minus the sum of
// the row's others (DominantEntry, as kl_divergence's); its other terms (token_stats') stay.
template <typename scalar_t, typename acc_t, int kKL, bool kP, bool kQ, bool kDominant>
void step_backward_row_impl(const scalar_t* xp, Temperature<acc_t> tp, const scalar_t* xq, acc_t tq,
                  int64_t V, int64_t label, const BackwardRow<acc_t>& row,
                  const KLBackward<acc_t>& kl, acc_t* bp, acc_t* bq, scalar_t* grad,
                  scalar_t* grad_ref) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> vls(row.log_s1), va(row.a), vb(row.b), vc(row.c), zero(acc_t(0)),
      lowest(exp_zero_below<acc_t>());
  const Vec<acc_t> vlq(kl.log_s1), vshift(kl.c), vdl(kl.dl), vgp(kl.g_p), vgq(kl.g_q);
  const Temperature<acc_t> tpq = temperature(tq);
  DominantEntry<acc_t> top;
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    // d relative to each side's max as the forward loaded it (shift_divide_chunk).
    load_chunk(xp + begin, n, bp);
    shift_divide_chunk(bp, n, tp, row.xm);
    if constexpr (kKL != 0) {
      load_chunk(xq + begin, n, bq);
      shift_divide_chunk(bq, n, tpq, kl.xm);
    }
    for (int64_t i = 0; i < n; i += W) {
      prefetch_next_chunk<W>(xp, begin, V, i);
      if constexpr (kKL != 0) prefetch_next_chunk<W>(xq, begin, V, i);
      const Vec<acc_t> dp_raw = Vec<acc_t>::loadu(bp + i);
      const Vec<acc_t> d = at::vec::clamp_min(dp_raw - vls, lowest);  // log p_j
      const Vec<acc_t> p = vexp(d);
      Vec<acc_t> g = zero, gq = zero;
      if constexpr (kP) g = p * at::vec::fmadd(vc, p, at::vec::fmadd(vb, d, va));
      if constexpr (kKL == 1) {  // reverse: w = p, v = q
        const Vec<acc_t> dq_raw = Vec<acc_t>::loadu(bq + i);
        if constexpr (kP) {
          const Vec<acc_t> delta = dp_raw - dq_raw;
          const Vec<acc_t> term =
              Vec<acc_t>::blendv(p * (delta - vshift) * vgp, zero, p == zero);
          if constexpr (kDominant) top.add(term, p, delta, g, kl.c, begin + i, true);
          g = g + term;
        }
        if constexpr (kQ) {
          const Vec<acc_t> q = vexp(at::vec::clamp_min(dq_raw - vlq, lowest));
          gq = other_side_difference(p, q, dp_raw, dq_raw, vdl) * vgq;  // q_j - p_j
        }
      } else if constexpr (kKL == 2) {  // forward: w = q, v = p
        const Vec<acc_t> dq_raw = Vec<acc_t>::loadu(bq + i);
        const Vec<acc_t> q = vexp(at::vec::clamp_min(dq_raw - vlq, lowest));
        if constexpr (kP) {
          g = at::vec::fmadd(other_side_difference(q, p, dq_raw, dp_raw, vdl), vgp, g);
        }
        if constexpr (kQ) {
          const Vec<acc_t> delta = dq_raw - dp_raw;
          gq = Vec<acc_t>::blendv(q * (delta - vshift) * vgq, zero, q == zero);
          if constexpr (kDominant) top.add(gq, q, delta, zero, kl.c, begin + i, true);
        }
      }
      if constexpr (kP) g.store(bp + i);
      if constexpr (kQ) gq.store(bq + i);
    }
    if constexpr (kDominant) top.end_chunk();
    if constexpr (kP) store_row(bp, grad + begin, n);
    if constexpr (kQ) store_row(bq, grad_ref + begin, n);
  }
  // The dominant entry's KL term as minus the others' (kDominant), where that is the better.
  row_sum_t<acc_t> others = 0;
  const bool rewrite = kDominant && top.minus_others(kKL == 1 ? kl.g_p : kl.g_q, others);
  if constexpr (kKL == 2 && kQ) {
    if (rewrite) grad_ref[top.top] = scalar_t(acc_t(others));
  }
  if constexpr (kP) {
    if (kKL == 1 && rewrite && top.top != label) {
      grad[top.top] = scalar_t(acc_t(row_sum_t<acc_t>(top.top_base) + others));
    }
    // The label's entry gets + g_l / tau, added in double before the one rounding (as in
    // token_stats' backward), its KL term recomputed in double too.
    const acc_t dp_c = tp.divide(acc_t(xp[label]) - row.xm);
    const acc_t d_c = std::max(dp_c - row.log_s1, exp_zero_below<acc_t>());
    const double p_c = std::exp(double(d_c));
    double value = p_c * (row.a_d + row.b_d * d_c + row.c_d * p_c) + row.g_l;
    if constexpr (kKL == 1) {
      const double dq_c = tpq.divide(acc_t(xq[label]) - kl.xm);
      // Where p_c is 0 in acc_t (d_c at the floor: the vector path's blend), no KL term: a
      // -inf label logit would otherwise add p_c (dp_c - ...) = -inf through the floor's p_c.
      if (rewrite && top.top == label) {
        value += double(others);
      } else if (d_c > exp_zero_below<acc_t>()) {
        value += double(kl.g_p) * p_c * ((double(dp_c) - dq_c) - double(kl.c));
      }
    } else if constexpr (kKL == 2) {
      const acc_t dq_c = tpq.divide(acc_t(xq[label]) - kl.xm);
      const double q_c = std::exp(double(std::max(dq_c - kl.log_s1, exp_zero_below<acc_t>())));
      const double delta = (double(dp_c) - double(dq_c)) - double(kl.dl);  // log p_c - log q_c
      value += double(kl.g_p) * other_side_difference(q_c, p_c, delta);
    }
    grad[label] = scalar_t(value);
  }
}

// step_backward_row_impl with its compile-time flags picked at run time.
template <typename scalar_t, typename acc_t>
void step_backward_row(int kl_mode, bool do_p, bool do_q, const scalar_t* xp,
                           Temperature<acc_t> tp, const scalar_t* xq, acc_t tq, int64_t V,
                           int64_t label, const BackwardRow<acc_t>& row,
                           const KLBackward<acc_t>& kl, acc_t* bp, acc_t* bq, scalar_t* grad,
                           scalar_t* grad_ref) {
  // The KL's weight side has a dominant entry (DominantEntry): the logits' for reverse, the
  // reference's for forward, when its gradient is asked for.
  const bool dominant = kl_mode == 1   ? do_p && DominantEntry<acc_t>::applies(row.log_s1)
                        : kl_mode == 2 ? do_q && DominantEntry<acc_t>::applies(kl.log_s1)
                                       : false;
#define PGK_ROW(K, P, Q)                                                                      \
  (dominant ? step_backward_row_impl<scalar_t, acc_t, K, P, Q, true>(                          \
                  xp, tp, xq, tq, V, label, row, kl, bp, bq, grad, grad_ref)                   \
            : step_backward_row_impl<scalar_t, acc_t, K, P, Q, false>(                         \
                  xp, tp, xq, tq, V, label, row, kl, bp, bq, grad, grad_ref))
  if (kl_mode == 0) {
    if (do_p) PGK_ROW(0, true, false);
  } else if (kl_mode == 1) {
    if (do_p && do_q) PGK_ROW(1, true, true);
    else if (do_p) PGK_ROW(1, true, false);
    else if (do_q) PGK_ROW(1, false, true);
  } else {
    if (do_p && do_q) PGK_ROW(2, true, true);
    else if (do_p) PGK_ROW(2, true, false);
    else if (do_q) PGK_ROW(2, false, true);
  }
#undef PGK_ROW
}

}  // namespace pg_kernels::cpu
