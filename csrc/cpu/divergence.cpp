// Divergences between two logit tensors on the CPU: kl_divergence and the exact part of
// mismatch_stats (docs/math.md §§4 and 5). One kernel family, one pair pass.
//
// Pair pass (softmax_stats.h, PairState): a row of a weight side z_w and an other side z_v is
// read once, chunk by chunk (each chunk loaded and converted into an L1-resident buffer, its
// max found, then d = (x - max) / tau formed in place, as vec_rows.h does for token_stats).
// Per chunk: both chunk maxes, then one exp per element of each side
// feeding s1_w, s1_v and u = sum e^{d_w} (d_w - d_v), kept per vector lane in two independent
// chains; the chunk's lanes sum to a chunk state that merges into the row state (two-level
// summation, like token_stats). Two exps per vocabulary entry: the floor of a forward KL.
//   kl_divergence forward   reads both [N, V] tensors once, writes 6 numbers per row
//                           (kl; each side's max and log s1 and E_w[d_w - d_v], saved for
//                           the backward).
//   kl_divergence backward  reads both once, writes the requested gradients once. The
//                           weight-side gradient needs only w_j (one exp per element); the
//                           other side's needs v_j too.
//   mismatch_stats forward  the pair pass with w = rollout, v = logits (forward KL(q || p))
//                           plus the label's log-prob and total variation 1/2 sum |p - q|.
//                           TV needs both normalizers, known only at the row's end: the pass
//                           keeps the per-element exps it computed (2 V floats per thread, in
//                           L2 for V = 32k) and the chunk maxes they are relative to; a second
//                           sweep over that scratch, with no exp and no read of the logits,
//                           sums |e_w a_k - e_v b_k| with per-chunk scales a_k = e^{m_w,k - L_w}.
//                           Without TV (tv = false) the pass keeps nothing.
//   mismatch_stats backward of logprob only: g (1[j = c] - p_j) / tau in one pass.
// Rows are independent, each computed by one thread in a fixed order: deterministic and
// batch invariant.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include "ops.h"
#include "pair_rows.h"

namespace pg_kernels::cpu {

std::vector<at::Tensor> kl_divergence_forward(
    const at::Tensor& logits, const at::Tensor& ref_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, const std::optional<at::Tensor>& ref_temperature,
    double ref_temperature_scalar, int64_t ignore_index, bool reverse, int64_t n_inner,
    int64_t stride_outer, int64_t stride_inner, int64_t ref_n_inner, int64_t ref_stride_outer,
    int64_t ref_stride_inner) {
  const int64_t V = logits.size(-1);
  const int64_t N = V > 0 ? logits.numel() / V : 0;
  check_pair_inputs("kl_divergence", logits, ref_logits, labels, temperature, ref_temperature);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc_dtype);
  // kl [N]; row_state [N, 5] = (max, log s1) of the logits, then of ref_logits, then
  // c = E_w[d_w - d_v] (softmax_stats.h, kl_grad_shift): what the backward needs.
  at::Tensor kl = at::empty({N}, opts), row_state = at::empty({N, kRowState}, opts);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  const RowLayout ref_layout{ref_n_inner, ref_stride_outer, ref_stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "kl_divergence_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t *x = logits.const_data_ptr<scalar_t>(),
                       *xr = ref_logits.const_data_ptr<scalar_t>();
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const RowTemperature<acc_t> tau_r{optional_data<acc_t>(ref_temperature),
                                          acc_t(ref_temperature_scalar)};
        acc_t *o_kl = kl.data_ptr<acc_t>(), *o_st = row_state.data_ptr<acc_t>();
        const std::optional<LabelReader> read_label =
            labels ? std::optional<LabelReader>(LabelReader(*labels)) : std::nullopt;
        // reverse KL(p || q): weight side p; forward KL(q || p): weight side q.
        const auto store = [&](const PairRow<acc_t>& row, Temperature<acc_t> tw,
                               Temperature<acc_t> tv, acc_t* st, int64_t r) {
          const auto& s = row.sums;
          const auto w = saved_side<scalar_t>(row.xm_w, tw, s.m_w, s.s1_w),
                     v = saved_side<scalar_t>(row.xm_v, tv, s.m_v, s.s1_v);
          const auto &p = reverse ? w.side : v.side, &q = reverse ? v.side : w.side;
          o_kl[r] = acc_t(finalize_kl(s));
          st[0] = p.m;
          st[1] = p.log_s1;
          st[2] = q.m;
          st[3] = q.log_s1;
          // c relative to the same points as the log s1
          st[4] = acc_t(kl_grad_shift(s) + w.moved - v.moved);
        };
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          alignas(64) acc_t bw[kBufferSize<acc_t>];
          alignas(64) acc_t bv[kBufferSize<acc_t>];
          for (int64_t r = begin; r < end; ++r) {
            acc_t* st = o_st + kRowState * r;
            if (read_label && (*read_label)(r) == ignore_index) {
              o_kl[r] = acc_t(0);
              std::fill(st, st + kRowState, acc_t(0));
              continue;
            }
            const scalar_t *xp = x + layout.offset(r), *xq = xr + ref_layout.offset(r);
            const Temperature<acc_t> tp = tau(r), tq = tau_r(r);
            const scalar_t *xw = reverse ? xp : xq, *xv = reverse ? xq : xp;
            const Temperature<acc_t> tw = reverse ? tp : tq, tv = reverse ? tq : tp;
            store(pair_row<scalar_t, acc_t, false>(xw, tw, xv, tv, V, true, bw, bv, nullptr),
                  tw, tv, st, r);
          }
        });
      });
  return {kl, row_state};
}

std::vector<at::Tensor> kl_divergence_backward(
    const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, const std::optional<at::Tensor>& ref_temperature,
    double ref_temperature_scalar, int64_t ignore_index, bool reverse, const at::Tensor& kl,
    const at::Tensor& row_state, bool need_logits_grad, bool need_ref_grad,
    const std::optional<at::Tensor>& outside_terms,
    int64_t n_inner, int64_t stride_outer, int64_t stride_inner, int64_t ref_n_inner,
    int64_t ref_stride_outer, int64_t ref_stride_inner) {
  const int64_t V = logits.size(-1);
  const int64_t N = V > 0 ? logits.numel() / V : 0;
  check_pair_inputs("kl_divergence_backward", logits, ref_logits, labels, temperature,
                    ref_temperature);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_kl, &kl, &row_state}) {
    TORCH_CHECK(t->scalar_type() == acc_dtype && t->is_contiguous(),
                "kl_divergence_backward: grad_kl, kl and row_state must be contiguous ",
                acc_dtype);
  }
  TORCH_CHECK(grad_kl.numel() == N && kl.numel() == N && row_state.numel() == kRowState * N,
              "kl_divergence_backward: expected ", N, " rows in grad_kl, kl and row_state");
  // A vocab-parallel shard's rows (pg_kernels.parallel): per row, the sum and summed size of
  // the weight side's terms on the other ranks (OutsideTerms); None for whole rows.
  if (outside_terms) {
    TORCH_CHECK(outside_terms->scalar_type() == acc_dtype && outside_terms->is_contiguous() &&
                    outside_terms->numel() == 2 * N,
                "kl_divergence_backward: outside_terms must be a contiguous [", N, ", 2] ",
                acc_dtype, " tensor");
  }
  // Fresh contiguous gradients (row r at r * V); an empty tensor for a side not requested.
  at::Tensor grad = need_logits_grad ? fresh_gradient(logits) : at::empty({0}, logits.options());
  at::Tensor grad_ref =
      need_ref_grad ? fresh_gradient(ref_logits) : at::empty({0}, ref_logits.options());
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  const RowLayout ref_layout{ref_n_inner, ref_stride_outer, ref_stride_inner};
  // The weight side w is the logits for reverse KL(p || q), the reference for forward.
  const bool need_w = reverse ? need_logits_grad : need_ref_grad;
  const bool need_v = reverse ? need_ref_grad : need_logits_grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "kl_divergence_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t *x = logits.const_data_ptr<scalar_t>(),
                       *xr = ref_logits.const_data_ptr<scalar_t>();
        scalar_t* g = need_logits_grad ? grad.data_ptr<scalar_t>() : nullptr;
        scalar_t* gr = need_ref_grad ? grad_ref.data_ptr<scalar_t>() : nullptr;
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const RowTemperature<acc_t> tau_r{optional_data<acc_t>(ref_temperature),
                                          acc_t(ref_temperature_scalar)};
        const acc_t *up = grad_kl.const_data_ptr<acc_t>(), *s_kl = kl.const_data_ptr<acc_t>(),
                    *s_st = row_state.const_data_ptr<acc_t>();
        const acc_t* s_out = outside_terms ? outside_terms->const_data_ptr<acc_t>() : nullptr;
        const std::optional<LabelReader> read_label =
            labels ? std::optional<LabelReader>(LabelReader(*labels)) : std::nullopt;
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          alignas(64) acc_t bw[kBufferSize<acc_t>];
          alignas(64) acc_t bv[kBufferSize<acc_t>];
          for (int64_t r = begin; r < end; ++r) {
            scalar_t* gp = g ? g + r * V : nullptr;
            scalar_t* gq = gr ? gr + r * V : nullptr;
            auto fill = [V](scalar_t* row, acc_t value) {
              if (row) std::fill(row, row + V, scalar_t(value));
            };
            const acc_t* st = s_st + kRowState * r;
            const SideState<acc_t> p{st[0], st[1]}, q{st[2], st[3]};
            const acc_t kl_r = s_kl[r];
            bool state_ok = true;  // the maxes and log s1 of both sides
            for (int i = 0; i < 4; ++i) state_ok = state_ok && is_finite(st[i]);
            if (read_label && (*read_label)(r) == ignore_index) {
              fill(gp, 0);
              fill(gq, 0);
            } else if (!state_ok || kl_r != kl_r) {  // a NaN row stays NaN
              fill(gp, quiet_nan<acc_t>());
              fill(gq, quiet_nan<acc_t>());
            } else if (up[r] == acc_t(0)) {  // also keeps a masked-out +inf row's gradient 0
              fill(gp, 0);
              fill(gq, 0);
            } else {
              scalar_t* grad_w = reverse ? gp : gq;
              scalar_t* grad_v = reverse ? gq : gp;
              // KL = +inf (some w_j > 0 has v_j = 0): the weight side's gradient is undefined
              // (NaN); the other side's, v - w, is finite and exact.
              const bool w_inf = !(kl_r < -neg_inf<acc_t>());
              const bool do_w = need_w && !w_inf;
              if (need_w && w_inf) fill(grad_w, quiet_nan<acc_t>());
              const scalar_t *xp = x + layout.offset(r), *xq = xr + ref_layout.offset(r);
              const Temperature<acc_t> tp = tau(r), tq = tau_r(r);
              const scalar_t *xw = reverse ? xp : xq, *xv = reverse ? xq : xp;
              const Temperature<acc_t> tw = reverse ? tp : tq, tv = reverse ? tq : tp;
              // Each side from the raw max rebuilt from its saved m (or read again:
              // frame_max), with the saved log s1 (relative to that max, saved_side).
              const SideState<acc_t> pw = reverse ? p : q, pv = reverse ? q : p;
              const SideState<acc_t> sw{frame_max(pw.m, tw, xw, V), pw.log_s1},
                  sv{frame_max(pv.m, tv, xv, V), pv.log_s1};
              const acc_t c = st[4];
              const acc_t dl = log_s1_difference(kl_r, c, sw.log_s1, sv.log_s1);
              const acc_t gw = up[r] / tw.tau, gv = up[r] / tv.tau;  // d/dx = d/dz / tau
              const OutsideTerms<acc_t> outside =
                  s_out ? OutsideTerms<acc_t>{s_out[2 * r], s_out[2 * r + 1]}
                        : OutsideTerms<acc_t>{};
              if (do_w && need_v) {
                kl_backward_row<scalar_t, acc_t, true, true>(xw, tw, xv, tv, V, sw, sv, c, dl, gw,
                                                             gv, outside, bw, bv, grad_w,
                                                             grad_v);
              } else if (do_w) {
                kl_backward_row<scalar_t, acc_t, true, false>(xw, tw, xv, tv, V, sw, sv, c, dl, gw,
                                                              gv, outside, bw, bv, grad_w,
                                                              grad_v);
              } else if (need_v) {
                kl_backward_row<scalar_t, acc_t, false, true>(xw, tw, xv, tv, V, sw, sv, c, dl, gw,
                                                              gv, outside, bw, bv, grad_w,
                                                              grad_v);
              }
            }
          }
        });
      });
  return {grad, grad_ref};
}

std::vector<at::Tensor> mismatch_stats_forward(
    const at::Tensor& logits, const at::Tensor& rollout_logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& temperature, double temperature_scalar,
    const std::optional<at::Tensor>& rollout_temperature, double rollout_temperature_scalar,
    int64_t ignore_index, bool tv, int64_t n_inner, int64_t stride_outer, int64_t stride_inner,
    int64_t rollout_n_inner, int64_t rollout_stride_outer, int64_t rollout_stride_inner) {
  const int64_t V = logits.size(-1);
  const int64_t N = labels.numel();
  check_pair_inputs("mismatch_stats", logits, rollout_logits, labels, temperature,
                    rollout_temperature);
  check_labels_in_range("mismatch_stats", labels, V, ignore_index);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc_dtype);
  // row_state [N, 2]: the logits' (max, log s1), saved for the backward of logprob.
  at::Tensor logprob = at::empty({N}, opts), token_kl = at::empty({N}, opts),
             token_tv = at::empty({tv ? N : 0}, opts), row_state = at::empty({N, 2}, opts);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  const RowLayout roll_layout{rollout_n_inner, rollout_stride_outer, rollout_stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "mismatch_stats_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t *x = logits.const_data_ptr<scalar_t>(),
                       *xr = rollout_logits.const_data_ptr<scalar_t>();
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const RowTemperature<acc_t> tau_r{optional_data<acc_t>(rollout_temperature),
                                          acc_t(rollout_temperature_scalar)};
        acc_t *o_lp = logprob.data_ptr<acc_t>(), *o_kl = token_kl.data_ptr<acc_t>(),
              *o_tv = token_tv.data_ptr<acc_t>(), *o_st = row_state.data_ptr<acc_t>();
        const LabelReader read_label(labels);
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          ExpScratch<acc_t> scratch(tv ? V : 0);
          alignas(64) acc_t bw[kBufferSize<acc_t>];
          alignas(64) acc_t bv[kBufferSize<acc_t>];
          for (int64_t r = begin; r < end; ++r) {
            const int64_t c = read_label(r);
            if (c == ignore_index) {
              o_lp[r] = o_kl[r] = o_st[2 * r] = o_st[2 * r + 1] = acc_t(0);
              if (tv) o_tv[r] = acc_t(0);
              continue;
            }
            const scalar_t *xp = x + layout.offset(r), *xq = xr + roll_layout.offset(r);
            const Temperature<acc_t> tp = tau(r), tq = tau_r(r);
            // KL(pi_roll || pi_theta): the weight side is the rollout distribution q. The exps
            // are kept only for TV (the same sums either way).
            const PairRow<acc_t> row =
                tv ? pair_row<scalar_t, acc_t, true>(xq, tq, xp, tp, V, false, bw, bv, &scratch)
                   : pair_row<scalar_t, acc_t, false>(xq, tq, xp, tp, V, false, bw, bv, nullptr);
            const auto& s = row.sums;
            const SideState<acc_t> p = saved_side<scalar_t>(row.xm_v, tp, s.m_v, s.s1_v).side;
            o_st[2 * r] = p.m;
            o_st[2 * r + 1] = p.log_s1;
            // d_c - log s1, both relative to the logits' raw max; NaN when the row is
            const PairFrame<acc_t> fp(tp);
            const acc_t d_c = fp.tau.divide(fp.value(acc_t(xp[c])) - row.xm_v);
            o_lp[r] = is_finite(p.m) ? acc_t(row_sum_t<acc_t>(d_c) - std::log(s.s1_v))
                                     : quiet_nan<acc_t>();
            o_kl[r] = acc_t(finalize_kl(s));
            if (!tv) continue;
            o_tv[r] = (side_is_valid(s.m_w) && side_is_valid(s.m_v))
                          ? total_variation(scratch.ew(), scratch.ev(), scratch.chunk_xm(), V,
                                            row.w_scale(), row.v_scale())
                          : quiet_nan<acc_t>();
          }
        });
      });
  return {logprob, token_kl, token_tv, row_state};
}

// d logprob / dx_j = g (1[j = c] - p_j) / tau, p_j = e^{d_j - l} from the saved (m, l), d loaded
// relative to the rebuilt raw max as the forward loaded it (saved_side).
// The label's entry is g (-expm1(log p_c)) / tau: no cancellation of 1 - p_c when p_c -> 1.
// Reads N V logits, writes N V gradient (fresh, contiguous).
at::Tensor mismatch_stats_backward(const at::Tensor& grad_logprob, const at::Tensor& logits,
                                   const at::Tensor& labels,
                                   const std::optional<at::Tensor>& temperature,
                                   double temperature_scalar, int64_t ignore_index,
                                   const at::Tensor& row_state, int64_t n_inner,
                                   int64_t stride_outer, int64_t stride_inner) {
  const int64_t V = logits.size(-1);
  const int64_t N = labels.numel();
  check_row_inputs("mismatch_stats_backward", logits, labels, temperature);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_logprob, &row_state}) {
    TORCH_CHECK(t->scalar_type() == acc_dtype && t->is_contiguous(),
                "mismatch_stats_backward: grad_logprob and row_state must be contiguous ",
                acc_dtype);
  }
  TORCH_CHECK(grad_logprob.numel() == N && row_state.numel() == 2 * N,
              "mismatch_stats_backward: expected ", N, " rows in grad_logprob and row_state");
  at::Tensor grad = fresh_gradient(logits);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "mismatch_stats_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int64_t W = Vec<acc_t>::size();
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        scalar_t* g = grad.data_ptr<scalar_t>();
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const acc_t *up = grad_logprob.const_data_ptr<acc_t>(),
                    *st = row_state.const_data_ptr<acc_t>();
        const LabelReader read_label(labels);
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          alignas(64) acc_t buf[kBufferSize<acc_t>];
          for (int64_t r = begin; r < end; ++r) {
            scalar_t* grad_row = g + r * V;
            const int64_t c = read_label(r);
            const acc_t m = st[2 * r], l = st[2 * r + 1];
            const bool nan_row = !(is_finite(m) && is_finite(l));
            if (fill_skipped_row(grad_row, V, c == ignore_index, nan_row)) continue;
            const scalar_t* xr = x + layout.offset(r);
            const Temperature<acc_t> t = tau(r);
            const acc_t gt = up[r] / t.tau;
            const PairFrame<acc_t> frame(t);
            const acc_t a = frame_max(m, t, xr, V);
            const Vec<acc_t> vl(l), vneg(-gt), lowest(exp_zero_below<acc_t>());
            for (int64_t b = 0; b < V; b += kChunk) {
              const int64_t n = std::min(kChunk, V - b);
              frame.load(xr + b, n, buf);
              shift_divide_chunk(buf, n, frame.tau, a);
              for (int64_t i = 0; i < n; i += W) {
                // d/dz_j of -(L) = -p_j
                const Vec<acc_t> d = at::vec::clamp_min(Vec<acc_t>::loadu(buf + i) - vl, lowest);
                (vneg * vexp(d)).store(buf + i);
              }
              store_row(buf, grad_row + b, n);
            }
            // d/dz_c of z_c - L = 1 - p_c = -expm1(log p_c), added before the one rounding.
            const acc_t log_pc = frame.tau.divide(frame.value(acc_t(xr[c])) - a) - l;
            grad_row[c] = scalar_t(-std::expm1(log_pc) * gt);
          }
        });
      });
  return grad;
}

}  // namespace pg_kernels::cpu
