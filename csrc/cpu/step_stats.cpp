// step_stats on the CPU: every per-token statistic of a training step from one read of each
// logits tensor (docs/math.md §9): token_stats of the policy logits, the exact mismatch
// KL(pi_roll || pi_theta) and TV against the rollout engine's logits, and the dense KL to a
// reference / teacher (reverse or forward), each of the other two optional.
//
// Forward: one pass over a row of every tensor given, chunk by chunk (vec_rows.h): each chunk of
// each tensor is loaded once into an L1-resident buffer as d = (x - x_max) / tau relative to that
// tensor's running max (vec_rows.h, shift_divide_chunk); then one exp per element
// of each tensor. The logits' exp, relative to their running row max exactly as in token_stats,
// feeds token_stats' lanes (token_rows.h) and both pair sums (pair_rows.h: PairLanes::add_exps),
// so a row costs at most three exps per vocabulary entry with both other tensors given, against
// five for token_stats + mismatch_stats + kl_divergence (and three reads of the logits instead
// of one); two where the rollout's vector is near the logits' (PairLanes::add_near_from_v).
// The token_stats fields are bitwise those of token_stats (same loads, same order of
// operations); token_kl and kl are those of the pair pass with the logits' side referred to
// the running row max instead of each chunk's max, and the u and k lanes in one chain instead
// of two (AVX2's 16 registers; equal up to rounding). TV needs both
// normalizers: as in mismatch_stats the pass keeps the logits' and the rollout logits' exps in
// a row-sized scratch (in L2 for V = 32k) and sweeps it once at the row's end (no exp); without
// TV (tv = false) the exps stay in chunk buffers.
// Backward: one pass over the logits (and over the reference logits only in rows whose KL
// upstream gradient is not 0) writes each requested gradient once. With log p_j = d_j - log s1
// recomputed as token_stats' backward does (x_max and log s1 from the saved argmax and
// max_prob; the reference's raw max is saved in kl_state):
//   grad_j = [p_j (a + b log p_j + c p_j) + g_l 1[j = c] + g_kl K_j] / tau
//   reverse KL(p || q):  K_j = p_j ((d_p,j - d_q,j) - E_p[d_p - d_q])   (0 where p_j = 0)
//   forward KL(q || p):  K_j = p_j - q_j
// with d = (x - x_max) / tau of that side, and the reference's gradient that of kl_divergence. The
// other side's p_j - q_j (forward) or q_j - p_j (reverse) is kl_divergence's too
// (pair_rows.h, other_side_difference: w_j expm1(log v_j - log w_j) where the two are close,
// with log s1_v - log s1_w = KL - c from the saved kl and shift).
// Rows are independent, each computed by one thread in a fixed order: deterministic and
// batch invariant.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include "ops.h"
#include "step_rows.h"

namespace pg_kernels::cpu {

std::vector<at::Tensor> step_stats_forward(
    const at::Tensor& logits, const std::optional<at::Tensor>& rollout_logits,
    const std::optional<at::Tensor>& ref_logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& temperature, double temperature_scalar,
    const std::optional<at::Tensor>& rollout_temperature, double rollout_temperature_scalar,
    const std::optional<at::Tensor>& ref_temperature, double ref_temperature_scalar,
    bool reverse, int64_t ignore_index, bool tv, int64_t n_inner, int64_t stride_outer,
    int64_t stride_inner, int64_t rollout_n_inner, int64_t rollout_stride_outer,
    int64_t rollout_stride_inner, int64_t ref_n_inner, int64_t ref_stride_outer,
    int64_t ref_stride_inner) {
  const int64_t N = labels.numel();
  const int64_t V = logits.size(-1);
  check_row_inputs("step_stats", logits, labels, temperature);
  if (rollout_logits) {
    check_pair_inputs("step_stats", logits, *rollout_logits, labels, temperature,
                      rollout_temperature);
  }
  if (ref_logits) {
    check_pair_inputs("step_stats", logits, *ref_logits, labels, temperature, ref_temperature);
  }
  check_labels_in_range("step_stats", labels, V, ignore_index);
  const bool has_roll = rollout_logits.has_value(), has_ref = ref_logits.has_value();
  tv = tv && has_roll;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = labels.options().dtype(acc_dtype);
  const auto rows = [&](bool given) { return at::empty({given ? N : 0}, opts); };
  at::Tensor logprob = rows(true), entropy = rows(true), collision = rows(true), lgp = rows(true),
             lse = rows(true), max_prob = rows(true),
             argmax = at::empty({N}, opts.dtype(at::kLong)), token_kl = rows(has_roll),
             token_tv = rows(tv), kl = rows(has_ref),
             kl_state = at::empty({has_ref ? N : 0, kKLState}, opts);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  const RowLayout roll_layout{rollout_n_inner, rollout_stride_outer, rollout_stride_inner};
  const RowLayout ref_layout{ref_n_inner, ref_stride_outer, ref_stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "step_stats_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        const scalar_t* xr = has_roll ? rollout_logits->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* xq = has_ref ? ref_logits->const_data_ptr<scalar_t>() : nullptr;
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const RowTemperature<acc_t> tau_r{optional_data<acc_t>(rollout_temperature),
                                          acc_t(rollout_temperature_scalar)};
        const RowTemperature<acc_t> tau_q{optional_data<acc_t>(ref_temperature),
                                          acc_t(ref_temperature_scalar)};
        acc_t *o_lp = logprob.data_ptr<acc_t>(), *o_h = entropy.data_ptr<acc_t>(),
              *o_c = collision.data_ptr<acc_t>(), *o_w = lgp.data_ptr<acc_t>(),
              *o_l = lse.data_ptr<acc_t>(), *o_mp = max_prob.data_ptr<acc_t>(),
              *o_rkl = token_kl.data_ptr<acc_t>(), *o_tv = token_tv.data_ptr<acc_t>(),
              *o_kl = kl.data_ptr<acc_t>(), *o_st = kl_state.data_ptr<acc_t>();
        int64_t* o_am = argmax.data_ptr<int64_t>();
        const LabelReader read_label(labels);
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          StepScratch<acc_t> scratch(tv ? V : 0);
          for (int64_t r = begin; r < end; ++r) {
            const int64_t c = read_label(r);
            StepRow<acc_t> out{};
            if (c != ignore_index) {
              const scalar_t* xp = x + layout.offset(r);
              const scalar_t* xr_row = has_roll ? xr + roll_layout.offset(r) : nullptr;
              const scalar_t* xq_row = has_ref ? xq + ref_layout.offset(r) : nullptr;
              const acc_t tr = has_roll ? tau_r(r).tau : acc_t(1);
              const acc_t tq = has_ref ? tau_q(r).tau : acc_t(1);
              const auto run = [&](auto roll, auto ref) {
                step_forward_row<scalar_t, acc_t, decltype(roll)::value, decltype(ref)::value>(
                    xp, tau(r), xr_row, tr, xq_row, tq, reverse, tv, V, c, scratch, out);
              };
              using Yes = std::true_type;
              using No = std::false_type;
              if (has_roll && has_ref) run(Yes{}, Yes{});
              else if (has_roll) run(Yes{}, No{});
              else if (has_ref) run(No{}, Yes{});
              else run(No{}, No{});
            }  // an ignored row is all 0 (argmax 0, as token_stats)
            o_lp[r] = out.token.logprob;
            o_h[r] = out.token.entropy;
            o_c[r] = out.token.collision;
            o_w[r] = out.token.lgp;
            o_l[r] = out.token.lse;
            o_mp[r] = out.token.max_prob;
            o_am[r] = out.argmax;
            if (has_roll) {
              o_rkl[r] = out.token_kl;
              if (tv) o_tv[r] = out.token_tv;
            }
            if (has_ref) {
              o_kl[r] = out.kl;
              std::copy(out.kl_state, out.kl_state + kKLState, o_st + kKLState * r);
            }
          }
        });
      });
  return {logprob, entropy, collision, lgp, lse, max_prob, argmax, token_kl, token_tv, kl,
          kl_state};
}

std::vector<at::Tensor> step_stats_backward(
    const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& grad_collision, const at::Tensor& grad_lse,
    const std::optional<at::Tensor>& grad_kl, const at::Tensor& logits,
    const std::optional<at::Tensor>& ref_logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& temperature, double temperature_scalar,
    const std::optional<at::Tensor>& ref_temperature, double ref_temperature_scalar,
    bool reverse, int64_t ignore_index, const at::Tensor& lse, const at::Tensor& entropy,
    const at::Tensor& collision, const at::Tensor& max_prob, const at::Tensor& argmax,
    const std::optional<at::Tensor>& kl, const std::optional<at::Tensor>& kl_state,
    bool need_logits_grad, bool need_ref_grad, int64_t n_inner, int64_t stride_outer,
    int64_t stride_inner, int64_t ref_n_inner, int64_t ref_stride_outer,
    int64_t ref_stride_inner) {
  const int64_t N = labels.numel();
  const int64_t V = logits.size(-1);
  const char* op = "step_stats_backward";
  check_row_inputs(op, logits, labels, temperature);
  check_labels_in_range(op, labels, V, ignore_index);
  const bool has_ref = ref_logits.has_value();
  if (has_ref) {
    check_pair_inputs(op, logits, *ref_logits, labels, temperature, ref_temperature);
    TORCH_CHECK(grad_kl && kl && kl_state, op, ": ref_logits needs grad_kl, kl and kl_state");
  }
  TORCH_CHECK(!need_ref_grad || has_ref, op, ": need_ref_grad without ref_logits");
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<const at::Tensor*> per_row{&grad_logprob, &grad_entropy, &grad_collision,
                                         &grad_lse,     &lse,          &entropy,
                                         &collision,    &max_prob};
  if (has_ref) {
    per_row.push_back(&*grad_kl);
    per_row.push_back(&*kl);
  }
  for (const at::Tensor* t : per_row) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == N && t->scalar_type() == acc_dtype, op,
                ": per-row tensors must be contiguous ", acc_dtype, " with ", N, " elements");
  }
  TORCH_CHECK(argmax.is_contiguous() && argmax.numel() == N && argmax.scalar_type() == at::kLong,
              op, ": argmax must be a contiguous int64 tensor of ", N, " elements");
  if (has_ref) {
    TORCH_CHECK(kl_state->is_contiguous() && kl_state->numel() == kKLState * N &&
                    kl_state->scalar_type() == acc_dtype,
                op, ": kl_state must be a contiguous ", acc_dtype, " tensor of ", N, " x ",
                kKLState);
  }
  at::Tensor grad = need_logits_grad ? fresh_gradient(logits) : at::empty({0}, logits.options());
  at::Tensor grad_ref =
      need_ref_grad ? fresh_gradient(*ref_logits) : at::empty({0}, logits.options());
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  const RowLayout ref_layout{ref_n_inner, ref_stride_outer, ref_stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "step_stats_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        const scalar_t* xq = has_ref ? ref_logits->const_data_ptr<scalar_t>() : nullptr;
        scalar_t* g = need_logits_grad ? grad.data_ptr<scalar_t>() : nullptr;
        scalar_t* gr = need_ref_grad ? grad_ref.data_ptr<scalar_t>() : nullptr;
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const RowTemperature<acc_t> tau_q{optional_data<acc_t>(ref_temperature),
                                          acc_t(ref_temperature_scalar)};
        const acc_t *g_lp = grad_logprob.const_data_ptr<acc_t>(),
                    *g_h = grad_entropy.const_data_ptr<acc_t>(),
                    *g_c = grad_collision.const_data_ptr<acc_t>(),
                    *g_l = grad_lse.const_data_ptr<acc_t>(), *s_l = lse.const_data_ptr<acc_t>(),
                    *s_h = entropy.const_data_ptr<acc_t>(),
                    *s_c = collision.const_data_ptr<acc_t>(),
                    *s_mp = max_prob.const_data_ptr<acc_t>();
        const acc_t* g_kl = has_ref ? grad_kl->const_data_ptr<acc_t>() : nullptr;
        const acc_t* s_kl = has_ref ? kl->const_data_ptr<acc_t>() : nullptr;
        const acc_t* s_st = has_ref ? kl_state->const_data_ptr<acc_t>() : nullptr;
        const int64_t* s_am = argmax.const_data_ptr<int64_t>();
        const LabelReader read_label(labels);
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          alignas(64) acc_t bp[kBufferSize<acc_t>];
          alignas(64) acc_t bq[kBufferSize<acc_t>];
          const acc_t nan = quiet_nan<acc_t>();
          for (int64_t r = begin; r < end; ++r) {
            scalar_t* gp = g ? g + r * V : nullptr;
            scalar_t* gq = gr ? gr + r * V : nullptr;
            const auto fill = [V](scalar_t* row, acc_t value) {
              if (row) std::fill(row, row + V, scalar_t(value));
            };
            const int64_t c = read_label(r);
            if (c == ignore_index) {
              fill(gp, 0);
              fill(gq, 0);
              continue;
            }
            const scalar_t* xp = x + layout.offset(r);
            const Temperature<acc_t> tp = tau(r);
            BackwardRow<acc_t> row;
            const bool valid = s_l[r] == s_l[r] &&  // not NaN (token_stats.cpp)
                               backward_row_state(xp, V, tp, s_am[r], s_mp[r], g_lp[r], g_h[r],
                                                  g_c[r], g_l[r], s_h[r], s_c[r], row);
            // The KL term joins only where its upstream gradient is not 0 (so a KL that is not
            // in the loss never reads the reference, nor turns a row NaN).
            const acc_t up = has_ref ? g_kl[r] : acc_t(0);
            int kl_mode = up != acc_t(0) ? (reverse ? 1 : 2) : 0;
            const acc_t* st = has_ref ? s_st + kKLState * r : nullptr;
            bool do_p = gp != nullptr, do_q = gq != nullptr && kl_mode != 0;
            if (!do_q) fill(gq, 0);
            if (!valid || (kl_mode != 0 && (s_kl[r] != s_kl[r] || !is_finite(st[0]) ||
                                            !is_finite(st[1])))) {
              fill(gp, nan);  // a NaN row stays NaN
              if (do_q) fill(gq, nan);
              continue;
            }
            if (kl_mode != 0 && !(s_kl[r] < -neg_inf<acc_t>())) {
              // KL = +inf (some w_j > 0 has v_j = 0): the weight side's gradient is undefined
              // (NaN), the other side's finite (as kl_divergence).
              scalar_t*& weight = reverse ? gp : gq;
              bool& do_weight = reverse ? do_p : do_q;
              if (do_weight) fill(weight, nan);
              do_weight = false;
            }
            const scalar_t* xq_row = has_ref ? xq + ref_layout.offset(r) : nullptr;
            const acc_t tq = has_ref ? tau_q(r).tau : acc_t(1);
            // dl = l_v - l_w, the logits' log s1 from the token lanes: the pair's sums.
            const acc_t dl = kl_mode == 0 ? 0
                             : reverse    ? log_s1_difference(s_kl[r], st[2], row.log_s1, st[1])
                                          : log_s1_difference(s_kl[r], st[2], st[1], row.log_s1);
            const KLBackward<acc_t> klb =
                kl_mode == 0 ? KLBackward<acc_t>{0, 0, 0, 0, 0, 0}
                             : KLBackward<acc_t>{st[0], st[1], st[2], dl, up / tp.tau, up / tq};
            step_backward_row<scalar_t, acc_t>(kl_mode, do_p, do_q, xp, tp, xq_row, tq, V,
                                                   c, row, klb, bp, bq, gp, gq);
          }
        });
      });
  return {grad, grad_ref};
}

}  // namespace pg_kernels::cpu
